"""Inference: masks come back in the scan's own geometry, TTA, refusals, skip-and-report, no overwrite."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from torch import nn

from medeman.checkpoint import FORMAT, save_teacher
from medeman.config import default_config
from medeman.infer import find_cases, infer_cases, main, read_geometry
from medeman.predict import TTA_FLIPS, predict_volume
from medeman.nets import build_network

# Odd shape, anisotropic spacing, axes permuted and flipped (an "LIP"-like scan, far from RAS).
OBLIQUE_AFFINE = np.array(
    [
        [0.0, 0.0, -2.5, 40.0],
        [-0.8, 0.0, 0.0, 12.0],
        [0.0, 1.3, 0.0, -30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (19, 13, 9)
_t = np.deg2rad(15.0)  # a tilted gantry: RAS-like axes rotated about x, anisotropic
TILTED_AFFINE = np.array(
    [
        [0.9, 0.0, 0.0, -8.0],
        [0.0, 0.7 * np.cos(_t), -2.0 * np.sin(_t), 5.0],
        [0.0, 0.7 * np.sin(_t), 2.0 * np.cos(_t), 60.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def tiny_config(spacing=(1.5, 1.5, 1.5), in_channels=1):
    cfg = default_config()
    cfg["model"]["channels"] = [4, 8]
    cfg["model"]["num_res_units"] = 0
    cfg["data"]["patch_size"] = [16, 16, 16]
    cfg["data"]["spacing"] = None if spacing is None else list(spacing)
    cfg["data"]["intensity_window"] = [0.0, 100.0]
    cfg["data"]["in_channels"] = in_channels
    return cfg


class ThresholdNet(nn.Module):
    """Foreground where the (normalized) intensity exceeds 0.5: its mask says where the model looked."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        fg = 40.0 * (x[:, :1] - 0.5) + self.anchor
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def blob(shape=SHAPE):
    """A scan in HU-like units: 100 inside an off-centre box, 0 elsewhere (so orientation errors show)."""
    data = np.zeros(shape, dtype=np.int16)
    data[2:9, 3:11, 1:5] = 100
    return data


@pytest.fixture()
def model_file(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    path = tmp_path / "run" / "teacher.pt"
    path.parent.mkdir()
    save_teacher(path, build_network(cfg), cfg, step=0)
    return path


def write_scan(path: Path, data: np.ndarray, affine: np.ndarray = OBLIQUE_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".nrrd", ".mha")):
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        image = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)))
        image.SetSpacing(spacing.tolist())
        image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
        image.SetOrigin(lps[:3, 3].tolist())
        sitk.WriteImage(image, str(path))
    else:
        nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


GEOMETRY_CASES = [
    # (scan file name, its affine, data.spacing, output format, expected output name)
    ("scan_0000.nii.gz", OBLIQUE_AFFINE, None, "nii.gz", "scan.nii.gz"),
    ("scan_0000.nii.gz", OBLIQUE_AFFINE, (1.5, 1.5, 1.5), "nii.gz", "scan.nii.gz"),
    ("scan.nii", OBLIQUE_AFFINE, (1.0, 2.0, 1.5), "nii.gz", "scan.nii.gz"),
    ("scan.nii.gz", TILTED_AFFINE, (1.2, 1.2, 1.2), "nii.gz", "scan.nii.gz"),
    ("scan.nrrd", OBLIQUE_AFFINE, (1.5, 1.5, 1.5), "nii.gz", "scan.nii.gz"),
    ("scan.mha", TILTED_AFFINE, None, "input", "scan.mha"),
]


@pytest.mark.parametrize("name, affine, spacing, output_format, expected", GEOMETRY_CASES)
def test_mask_has_the_scans_shape_affine_and_content(tmp_path, name, affine, spacing, output_format, expected):
    scan = write_scan(tmp_path / "in" / name, blob(), affine)
    cfg = tiny_config(spacing)
    results = infer_cases(
        (ThresholdNet(), cfg),
        scan,
        tmp_path / "out",
        output_format=output_format,
        probabilities=True,
        device="cpu",
        progress=False,
    )
    assert [r.status for r in results] == ["written"], results
    out = tmp_path / "out" / expected
    assert results[0].output == out
    in_shape, in_affine = read_geometry(scan)
    out_shape, out_affine = read_geometry(out)
    assert out_shape == in_shape == SHAPE
    np.testing.assert_allclose(out_affine, in_affine, atol=1e-5)
    if out.name.endswith(".nii.gz"):
        assert nib.load(str(out)).get_data_dtype() == np.uint8
        np.testing.assert_allclose(nib.load(str(out)).affine, affine, atol=1e-5)
        mask = np.asarray(nib.load(str(out)).dataobj)
    else:
        mask = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), (2, 1, 0))
    truth = blob() > 50
    if spacing is None:  # reorientation alone is exact
        np.testing.assert_array_equal(mask, truth)
    else:  # a resampling round trip: the box comes back where it was, edges may move by a voxel
        assert dice(mask > 0, truth) > 0.8
    probs = nib.load(str(tmp_path / "out" / "scan_probs.nii.gz"))
    assert probs.shape == SHAPE + (2,)
    np.testing.assert_allclose(probs.affine, in_affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-4)


INVERSION_CASES = [
    # (scan file, its affine, data.spacing): the geometry cases plus an anisotropic RAS scan at its own spacing
    *[(name, affine, spacing) for name, affine, spacing, _, _ in GEOMETRY_CASES],
    ("scan.mha", OBLIQUE_AFFINE, (1.0, 2.0, 1.5)),
    ("ras.nii.gz", np.diag([0.8, 1.3, 2.5, 1.0]), (0.8, 1.3, 2.5)),
]


def smooth_probabilities(shape, classes=3, seed=0):
    """Softmax of smoothed noise: several class boundaries cross the volume, few near-ties."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.nn.functional.avg_pool3d(torch.randn(1, classes, *shape, generator=gen) * 6, 3, stride=1, padding=1)
    return torch.softmax(logits[0], dim=0)


@pytest.mark.parametrize("name, affine, spacing", INVERSION_CASES)
def test_inversion_matches_monai_invertd(tmp_path, name, affine, spacing):
    """The separable inversion gives Invertd's probabilities (to float rounding) and exactly its mask."""
    from monai.transforms import Invertd

    from medeman.data.transforms import preprocessing
    from medeman.labels import argmax_labels
    from medeman.predict import invert_to_input, labels_on_input, scan_axes

    scan = write_scan(tmp_path / name, blob(), affine)
    transform = preprocessing(tiny_config(spacing), keys=("image",))
    image = transform({"image": str(scan)})["image"]
    probs = smooth_probabilities(image.shape[1:])
    reference = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)(
        {"image": image, "pred": MetaTensor(probs.clone(), affine=image.affine)}
    )["pred"].as_tensor()
    assert scan_axes(image) is not None  # medeman's preprocessing is always axis-aligned with the scan
    inverted = invert_to_input(probs, image, transform)
    assert inverted.shape == reference.shape == (3, *SHAPE)
    torch.testing.assert_close(inverted, reference, atol=1e-5, rtol=0)
    labels = labels_on_input(probs, image, transform)
    assert labels.dtype == torch.uint8
    assert torch.equal(labels, argmax_labels(reference, dim=0))
    assert labels.unique().numel() == 3  # every class has a boundary to get right


@pytest.mark.parametrize("classes", [1, 2, 4])
def test_class_map_matches_the_argmax_of_the_inverted_probabilities_for_any_class_count(tmp_path, classes):
    """The running argmax (class 1 against 0 first, then a running maximum) for 1, 2 and 4 classes."""
    from medeman.data.transforms import preprocessing
    from medeman.labels import argmax_labels
    from medeman.predict import invert_to_input, labels_on_input

    name, affine, spacing = INVERSION_CASES[-2]  # the oblique MetaImage, anisotropic spacing
    scan = write_scan(tmp_path / name, blob(), affine)
    transform = preprocessing(tiny_config(spacing), keys=("image",))
    image = transform({"image": str(scan)})["image"]
    probs = smooth_probabilities(image.shape[1:], classes=classes, seed=classes)
    labels = labels_on_input(probs, image, transform)
    assert labels.shape == SHAPE
    assert torch.equal(labels, argmax_labels(invert_to_input(probs, image, transform), dim=0))
    assert labels.unique().numel() == classes


@pytest.mark.parametrize(
    "affine, identity, gather_only",
    [
        (np.diag([1.5, 1.5, 1.5, 1.0]), [True, True, True], [True, True, True]),  # RAS at the model's spacing
        (np.diag([1.5, -1.5, 1.5, 1.0]), [True, False, True], [True, True, True]),  # a flip: a gather, no blend
        (
            np.diag([1.5, 1.5, 3.0, 1.0]),
            [True, True, False],
            [True, True, True],
        ),  # z upsampled 2x: scan voxels are on the grid
        (np.diag([1.5, 1.5, 2.0, 1.0]), [True, True, False], [True, True, False]),  # resampled along z only
    ],
)
def test_identity_axes_are_skipped_and_flips_are_gathers(tmp_path, affine, identity, gather_only):
    from medeman.data.transforms import preprocessing
    from medeman.predict import scan_axes

    scan = write_scan(tmp_path / "scan.nii.gz", blob(), affine)
    image = preprocessing(tiny_config((1.5, 1.5, 1.5)), keys=("image",))({"image": str(scan)})["image"]
    axes = scan_axes(image)
    assert [a.identity for a in axes] == identity
    assert [a.gather_only for a in axes] == gather_only


def test_a_grid_rotated_against_the_scan_is_not_separable():
    from medeman.predict import scan_axes

    t = np.deg2rad(20.0)
    rotated = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    image = MetaTensor(
        torch.zeros(1, 8, 8, 8),
        affine=torch.as_tensor(rotated),
        meta={"original_affine": np.eye(4), "spatial_shape": np.array([8, 8, 8])},
    )
    assert scan_axes(image) is None


def test_tta_averages_the_eight_mirrorings(model_file, tmp_path):
    from medeman.checkpoint import load_teacher

    net, cfg, _ = load_teacher(model_file)
    torch.manual_seed(1)
    image = torch.rand(1, 16, 16, 16)  # one window, so mirroring the patch is mirroring the volume
    plain = predict_volume(net, image, cfg, tta=False, device="cpu")
    tta = predict_volume(net, image, cfg, tta=True, device="cpu")
    manual = sum(
        predict_volume(net, image.flip([d - 1 for d in dims]), cfg, device="cpu").flip([d - 1 for d in dims])
        for dims in TTA_FLIPS
    ) / len(TTA_FLIPS)
    assert len(TTA_FLIPS) == 8 and tta.shape == plain.shape == (2, 16, 16, 16) and tta.dtype == torch.float32
    torch.testing.assert_close(tta, manual, atol=1e-5, rtol=0)
    assert not torch.allclose(tta, plain, atol=1e-4)
    torch.testing.assert_close(tta.sum(0), torch.ones(16, 16, 16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tta", [False, True])
def test_infer_end_to_end_with_and_without_tta(model_file, tmp_path, tta, capsys):
    scan = write_scan(tmp_path / "in" / "a_0000.nii.gz", blob())
    args = [
        "--model",
        str(model_file.parent),
        "--input",
        str(scan.parent),
        "--output",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--sw-batch-size",
        "2",
        "--overlap",
        "0.25",
    ] + (["--tta"] if tta else [])
    assert main(args) == 0
    out = nib.load(str(tmp_path / "out" / "a.nii.gz"))
    assert out.shape == SHAPE and np.allclose(out.affine, OBLIQUE_AFFINE)
    captured = capsys.readouterr()
    assert "a: " in captured.out and " s -> " in captured.out and "1 written" in captured.out


def test_bf16_keeps_float32_probabilities(model_file):
    from medeman.checkpoint import load_teacher

    net, cfg, _ = load_teacher(model_file)
    image = torch.rand(1, 20, 17, 16)
    full = predict_volume(net, image, cfg, device="cpu", precision="32")
    half = predict_volume(net, image, cfg, device="cpu", precision="bf16")
    assert half.dtype == torch.float32 and half.shape == full.shape == (2, 20, 17, 16)
    torch.testing.assert_close(half, full, atol=0.05, rtol=0)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_malicious_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "teacher.pt"
    torch.save({"format": FORMAT, "config": default_config(), "state_dict": {}, "payload": Evil(marker)}, str(bad))
    scan = write_scan(tmp_path / "in" / "a.nii.gz", blob())
    code = main(["--model", str(bad), "--input", str(scan), "--output", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert not marker.exists()
    assert "refused" in err and str(bad) in err and "Traceback" not in err


def test_a_file_that_is_not_a_medeman_model_is_refused(tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, str(other))
    scan = write_scan(tmp_path / "in" / "a.nii.gz", blob())
    assert main(["--model", str(other), "--input", str(scan), "--output", str(tmp_path / "out")]) == 2
    assert "not a medeman model" in capsys.readouterr().err


def test_a_corrupt_case_is_reported_and_skipped(model_file, tmp_path, capsys):
    write_scan(tmp_path / "in" / "good.nii.gz", blob())
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a scan" * 10)
    (tmp_path / "in" / "empty.nrrd").write_bytes(b"")
    code = main(
        [
            "--model",
            str(model_file),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert (tmp_path / "out" / "good.nii.gz").is_file()
    assert not (tmp_path / "out" / "broken.nii.gz").exists()
    assert "broken.nii.gz" in captured.err and "empty.nrrd" in captured.err
    assert "Traceback" not in captured.err and "2 failed" in captured.out


def test_existing_outputs_are_kept_without_overwrite(model_file, tmp_path, capsys):
    scan = write_scan(tmp_path / "in" / "a.nii.gz", blob())
    out = tmp_path / "out" / "a.nii.gz"
    out.parent.mkdir()
    out.write_bytes(b"precious")
    args = ["--model", str(model_file), "--input", str(scan), "--output", str(out.parent), "--device", "cpu"]
    assert main(args) == 0
    assert out.read_bytes() == b"precious"
    assert "--overwrite" in capsys.readouterr().out
    assert main(args + ["--overwrite"]) == 0
    assert nib.load(str(out)).shape == SHAPE


def test_the_output_never_replaces_the_scan(model_file, tmp_path):
    scan = write_scan(tmp_path / "a.nii.gz", blob())
    before = scan.read_bytes()
    assert (
        main(
            [
                "--model",
                str(model_file),
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path),
                "--overwrite",
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    assert scan.read_bytes() == before


def test_channels_of_a_case_are_grouped(tmp_path):
    cfg = tiny_config(spacing=None, in_channels=2)
    for case in ("p1", "p2"):
        for channel in (0, 1):
            write_scan(tmp_path / "in" / f"{case}_{channel:04d}.nii.gz", blob())
    results = infer_cases((ThresholdNet(), cfg), tmp_path / "in", tmp_path / "out", device="cpu", progress=False)
    assert [(r.case_id, r.status) for r in results] == [("p1", "written"), ("p2", "written")]
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "out" / "p1.nii.gz")).dataobj), blob() > 50)


FIND_CASES = [
    # (file names, in_channels, expected cases {id: [files]}, expected problem substrings)
    (["a_0000.nii.gz", "b_0000.nii.gz"], 1, {"a": ["a_0000.nii.gz"], "b": ["b_0000.nii.gz"]}, []),
    (
        ["liver_0007.nii.gz", "liver_0008.nii.gz"],
        1,
        {"liver_0007": ["liver_0007.nii.gz"], "liver_0008": ["liver_0008.nii.gz"]},
        [],
    ),
    (
        ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz"],
        2,
        {"a": ["a_0000.nii.gz", "a_0001.nii.gz"]},
        ["b_0000.nii.gz: case 'b' has channel files _0000, expected _0000.._0001"],
    ),
    # one case-id rule with training: a lone _0000 is dropped even next to a file without a suffix
    (["a_0000.nii.gz", "b.nii.gz"], 1, {"a": ["a_0000.nii.gz"], "b": ["b.nii.gz"]}, []),
    (["a.nii.gz", "a_0000.nii.gz"], 1, {"a": ["a.nii.gz"]}, ["a_0000.nii.gz: same case and channel as"]),
    (
        ["a_0000.nii.gz", "b.nii.gz"],
        2,
        {},
        ["b.nii.gz: no _0000.._0001 channel suffix", "case 'a' has channel files _0000,"],
    ),
    (["x.nii.gz", "x.nrrd", "y.mha"], 1, {"x": ["x.nii.gz"], "y": ["y.mha"]}, ["same case"]),
]


@pytest.mark.parametrize("names, channels, expected, problems", FIND_CASES)
def test_find_cases(tmp_path, names, channels, expected, problems):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    cases, found = find_cases(tmp_path, channels)
    assert {c.case_id: [f.name for f in c.files] for c in cases} == expected
    assert len(found) == len(problems) and all(p in f for p, f in zip(problems, found))


def test_a_folder_gives_each_case_the_mask_it_gets_alone_in_order(model_file, tmp_path, monkeypatch):
    """Reading ahead and writing behind: results in case order, a failed read, a skip and a failed write in between."""
    import medeman.infer as infer_module

    rng = np.random.default_rng(0)
    for i in range(5):
        write_scan(tmp_path / "in" / f"c{i}.nii.gz", blob() + rng.normal(0, 40, SHAPE).astype(np.float32))
    (tmp_path / "in" / "c1.nii.gz").write_bytes(b"\x1f\x8b not a scan" * 10)  # read fails (in the read-ahead thread)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "c2.nii.gz").write_bytes(b"kept")  # skipped without --overwrite
    write_volume = infer_module.write_volume

    def failing_write(array, geometry, path, **kwargs):
        if Path(path).name == "c3.nii.gz":
            raise OSError("disk full")
        return write_volume(array, geometry, path, **kwargs)

    monkeypatch.setattr(infer_module, "write_volume", failing_write)
    results = infer_cases(model_file, tmp_path / "in", tmp_path / "out", progress=False, device="cpu")
    assert [(r.case_id, r.status) for r in results] == [
        ("c0", "written"),
        ("c1", "failed"),
        ("c2", "skipped"),
        ("c3", "failed"),
        ("c4", "written"),
    ]
    assert "c1.nii.gz" in results[1].message and "disk full" in results[3].message and "c3.nii.gz" in results[3].message
    assert (tmp_path / "out" / "c2.nii.gz").read_bytes() == b"kept" and not (tmp_path / "out" / "c3.nii.gz").exists()
    monkeypatch.setattr(infer_module, "write_volume", write_volume)
    for case in ("c0", "c4"):  # the same mask as inferring the scan alone
        alone = infer_cases(
            model_file, tmp_path / "in" / f"{case}.nii.gz", tmp_path / "alone", progress=False, device="cpu"
        )
        assert alone[0].status == "written"
        assert np.array_equal(
            np.asarray(nib.load(str(tmp_path / "alone" / f"{case}.nii.gz")).dataobj),
            np.asarray(nib.load(str(tmp_path / "out" / f"{case}.nii.gz")).dataobj),
        )
