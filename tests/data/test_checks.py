"""Every kind of bad input is reported before training, one line naming the file and the problem."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from medeman.data import DataError, SSLDataModule, check_cases, inspect_case


def _shift(dx: float) -> np.ndarray:
    affine = np.eye(4)
    affine[0, 3] = dx
    return affine


def _nan_image(image):
    image = image.astype(np.float32)
    image[3, 3, 3] = np.nan
    image[4, 4, 4] = np.inf
    return image


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# name: (change of image array, change of label array, label affine, action on the written files, expected message)
BAD_CASES = {
    "shape mismatch": (None, lambda lab: lab[:, :, :-1], None, None, "label shape (20, 20, 15) differs from image shape (20, 20, 16)"),
    "affine mismatch": (None, None, _shift(2.0), None, "label affine differs from the affine of"),
    "label out of range": (None, lambda lab: np.where(lab == 2, 5, lab).astype(np.uint8), None, None, "label values 5 outside 0..2 (data.num_classes=3)"),
    "negative label": (None, lambda lab: np.where(lab == 2, -1, lab.astype(np.int16)), None, None, "label values -1 outside 0..2"),
    "non-integer label": (None, lambda lab: lab.astype(np.float32) * 0.5, None, None, "non-integer label values"),
    "2D image": (lambda img: img[:, :, 0], None, None, None, "not a 3D volume"),
    "5D image": (lambda img: img[..., None, None].repeat(2, 3).repeat(2, 4), None, None, None, "not a 3D volume"),
    "channels": (lambda img: np.stack([img, img], -1), None, None, None, "2 image channel(s), but data.in_channels=1"),
    "NaN/Inf": (_nan_image, None, None, None, "2 NaN/Inf intensities"),
    "truncated image": (None, None, None, lambda img, lab: _truncate(img), "unreadable or truncated file"),
    "garbage label": (None, None, None, lambda img, lab: lab.write_bytes(b"not a nifti at all"), "unreadable or truncated file"),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_case_is_reported(tmp_path, cfg, phantom_maker, volume_writer, name):
    change_image, change_label, label_affine, action, message = BAD_CASES[name]
    image, label = phantom_maker()
    image = change_image(image) if change_image else image
    label = change_label(label) if change_label else label
    img = volume_writer(tmp_path / "images" / "bad.nii.gz", image)
    lab = volume_writer(tmp_path / "labels" / "bad.nii.gz", label, label_affine)
    if action:
        action(img, lab)
    report = inspect_case({"id": "bad", "image": str(img), "label": str(lab)}, num_classes=3)
    assert any(message in p for p in report.problems), report.problems
    assert all(p.startswith(str(img)) or p.startswith(str(lab)) for p in report.problems)


def test_clean_case_and_small_affine_difference(tmp_path, phantom_maker, volume_writer):
    image, label = phantom_maker()
    img = volume_writer(tmp_path / "img.nii.gz", image)
    lab = volume_writer(tmp_path / "lab.nii.gz", label, _shift(1e-5))  # float rounding of a header: tolerated
    report = inspect_case({"id": "ok", "image": str(img), "label": str(lab)}, num_classes=3)
    assert report.problems == []
    assert report.shape == (20, 20, 16) and report.spacing == (1.0, 1.0, 1.0) and report.orientation == "RAS"
    assert report.classes == {0: int((label == 0).sum()), 1: 216, 2: 27}
    assert report.intensity == (float(image.min()), float(image.max()))


def test_checks_never_modify_inputs(make_cohort, cfg):
    root = make_cohort(2, 1)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}
    SSLDataModule(cfg, root / "labeled", root / "unlabeled").discover()
    assert {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files} == before
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files


def test_datamodule_lists_every_problem_before_training(make_cohort, cfg, volume_writer, phantom_maker):
    root = make_cohort(3, 2)
    (root / "labeled" / "labels" / "case1.nii.gz").unlink()  # image without label
    image, label = phantom_maker()
    label[0, 0, 0] = 7
    volume_writer(root / "labeled" / "labels" / "case2.nii.gz", label)  # out-of-range label
    volume_writer(root / "unlabeled" / "scan0.nii.gz", _nan_image(image))  # NaN in an unlabeled scan
    volume_writer(root / "labeled" / "labels" / "orphan_seg.nii.gz", label)  # label without image
    dm = SSLDataModule(cfg, root / "labeled", root / "unlabeled")
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    lines = str(err.value).splitlines()
    assert lines[0].startswith("4 problem(s)")
    for fragment in ("case1.nii.gz: image without label", "case2.nii.gz: label values 7 outside", "scan0.nii.gz: 2 NaN/Inf", "orphan_seg.nii.gz: label without image"):
        assert sum(fragment in line for line in lines) == 1, (fragment, lines)


@pytest.mark.parametrize("make_unlabeled, message", [
    (lambda root: (root / "empty").mkdir(), "empty: empty unlabeled folder"),
    (lambda root: None, "empty: unlabeled folder does not exist"),
])
def test_datamodule_rejects_missing_or_empty_unlabeled(make_cohort, cfg, make_unlabeled, message):
    root = make_cohort(2, 0)
    make_unlabeled(root)
    with pytest.raises(DataError, match=message):
        SSLDataModule(cfg, root / "labeled", root / "empty").setup("fit")


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_reports_are_cached(make_cohort, cfg):
    root = make_cohort(1, 0)
    case = {"id": "case0", "image": str(root / "labeled/images/case0.nii.gz"), "label": str(root / "labeled/labels/case0.nii.gz")}
    assert check_cases([case], cfg)[0] is check_cases([case], cfg)[0]
