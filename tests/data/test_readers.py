"""NRRD and MetaImage files read through SimpleITK with their spacing and orientation, like NIfTI."""

from __future__ import annotations

import numpy as np
import pytest

from medeman.config import default_config
from medeman.data import VolumeReader
from medeman.data.readers import image_suffix
from medeman.data.transforms import preprocessing

LPS_ANISOTROPIC = np.array([[-1.5, 0, 0, 10.0], [0, -2.0, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
TILTED = np.array([[0.8, 0, 0, 0], [0, 0.8 * np.cos(0.2), -2.5 * np.sin(0.2), 0], [0, 0.8 * np.sin(0.2), 2.5 * np.cos(0.2), 0], [0, 0, 0, 1]])


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


@pytest.mark.parametrize("name, suffix", [("a.nii.gz", ".nii.gz"), ("a.NII", ".nii"), ("b.mha", ".mha"), ("c.nrrd", ".nrrd"), ("d.txt", None), ("e.gz", None)])
def test_image_suffix(name, suffix):
    assert image_suffix(name) == suffix
