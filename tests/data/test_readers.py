"""NRRD and MetaImage files read through SimpleITK with their spacing and orientation, like NIfTI; the one volume writer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medeman.config import default_config
from medeman.data import VolumeReader
from medeman.data.readers import image_suffix, read_volume, write_volume
from medeman.data.transforms import preprocessing

LPS_ANISOTROPIC = np.array([[-1.5, 0, 0, 10.0], [0, -2.0, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
TILTED = np.array(
    [
        [0.8, 0, 0, 0],
        [0, 0.8 * np.cos(0.2), -2.5 * np.sin(0.2), 0],
        [0, 0.8 * np.sin(0.2), 2.5 * np.cos(0.2), 0],
        [0, 0, 0, 1],
    ]
)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd", ".nii.gz", ".nii"])
@pytest.mark.parametrize("affine", [LPS_ANISOTROPIC, TILTED], ids=["lps-anisotropic", "tilted"])
def test_read_with_spacing(tmp_path, volume_writer, suffix, affine):
    array = np.arange(16 * 18 * 20, dtype=np.int16).reshape(16, 18, 20)
    path = volume_writer(tmp_path / f"scan{suffix}", array, affine)
    reader = VolumeReader()
    data, meta = reader.get_data(reader.read(str(path)))
    np.testing.assert_array_equal(np.asarray(data), array)
    np.testing.assert_allclose(meta["affine"], affine, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_preprocessing_resamples_by_header_spacing(tmp_path, volume_writer, suffix):
    path = volume_writer(tmp_path / f"scan{suffix}", np.zeros((16, 18, 20), np.int16), LPS_ANISOTROPIC)
    cfg = default_config()
    cfg["data"]["spacing"] = [3.0, 2.0, 1.5]
    out = preprocessing(cfg, ["image"])({"image": str(path)})
    # the extent between first and last voxel centres is kept: 15 x 1.5 mm / 3 + 1, 18, 19 x 3 mm / 1.5 + 1
    assert tuple(out["image"].shape) == (1, 8, 18, 39)


def test_multichannel_files_stack(tmp_path, volume_writer):
    files = [volume_writer(tmp_path / f"a_{c:04d}.mha", np.full((16, 16, 16), c, np.int16)) for c in range(2)]
    reader = VolumeReader()
    data, meta = reader.get_data(reader.read([str(f) for f in files]))
    assert data.shape == (2, 16, 16, 16) and meta["original_channel_dim"] == 0
    assert data[1].min() == 1


@pytest.mark.parametrize(
    "name, suffix",
    [
        ("a.nii.gz", ".nii.gz"),
        ("a.NII", ".nii"),
        ("b.mha", ".mha"),
        ("c.nrrd", ".nrrd"),
        ("d.txt", None),
        ("e.gz", None),
    ],
)
def test_image_suffix(name, suffix):
    assert image_suffix(name) == suffix


# ---------------------------------------------------------------- the one volume writer

# (output suffix, geometry given as: "affine" or the suffix of a reference image file)
WRITE_CASES = [
    (out, ref) for out in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd") for ref in ("affine", ".nii.gz", ".nrrd")
]


@pytest.mark.parametrize("out_suffix, geometry", WRITE_CASES)
def test_write_volume_round_trip(tmp_path, out_suffix, geometry):
    array = (np.arange(16 * 18 * 20) % 3).astype(np.uint8).reshape(16, 18, 20)
    if geometry == "affine":
        target = write_volume(array, TILTED, tmp_path / f"out{out_suffix}")
    else:
        reference = write_volume(np.zeros((16, 18, 20), np.int16), TILTED, tmp_path / f"ref{geometry}")
        target = write_volume(array, reference, tmp_path / f"out{out_suffix}", intent="label")
    data, affine = read_volume(target)
    np.testing.assert_array_equal(data, array)
    np.testing.assert_allclose(affine, TILTED, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left behind


def test_write_volume_like_a_nifti_with_rescaling(tmp_path):
    """A CT's header (scl_slope/scl_inter, qform code 2) is kept as geometry, never applied to the labels."""
    ref = nib.Nifti1Image(np.zeros((16, 16, 16), np.int16), LPS_ANISOTROPIC)
    ref.header.set_slope_inter(1.0, -1024.0)
    ref.set_qform(LPS_ANISOTROPIC, code=2)
    nib.save(ref, str(tmp_path / "ct.nii.gz"))
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[4:8, 4:8, 4:8] = 1
    out = nib.load(str(write_volume(mask, tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz", intent="label")))
    np.testing.assert_array_equal(np.asarray(out.dataobj), mask)
    assert out.get_data_dtype() == np.uint8 and int(out.header["qform_code"]) == 2
    assert out.header.get_intent()[0] == "label"
    np.testing.assert_allclose(out.affine, LPS_ANISOTROPIC)


def test_write_volume_vector_image(tmp_path):
    probs = np.random.default_rng(0).random((16, 16, 16, 3)).astype(np.float32)
    for suffix in (".nii.gz", ".mha"):
        data, _ = read_volume(write_volume(probs, np.eye(4), tmp_path / f"p{suffix}"))
        np.testing.assert_allclose(data, probs)
