"""Every kind of bad input is reported before training, one line naming the file and the problem."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from medeman.data import DataError, SSLDataModule, check_cases, inspect_case
from medeman.data import checks
from medeman.data.checks import gather_cohort, label_like_values, voxel_digest
from medeman.data.readers import read_volume, write_volume


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
    "shape mismatch": (
        None,
        lambda lab: lab[:, :, :-1],
        None,
        None,
        "label shape (20, 20, 15) differs from image shape (20, 20, 16)",
    ),
    "affine mismatch": (None, None, _shift(2.0), None, "label affine differs from the affine of"),
    "label out of range": (
        None,
        lambda lab: np.where(lab == 2, 5, lab).astype(np.uint8),
        None,
        None,
        "label values 5 outside 0..2 (data.num_classes=3)",
    ),
    "negative label": (
        None,
        lambda lab: np.where(lab == 2, -1, lab.astype(np.int16)),
        None,
        None,
        "label values -1 outside 0..2",
    ),
    "non-integer label": (None, lambda lab: lab.astype(np.float32) * 0.5, None, None, "non-integer label values"),
    "2D image": (lambda img: img[:, :, 0], None, None, None, "not a 3D volume"),
    "5D image": (lambda img: img[..., None, None].repeat(2, 3).repeat(2, 4), None, None, None, "not a 3D volume"),
    "channels": (lambda img: np.stack([img, img], -1), None, None, None, "2 image channel(s), but data.in_channels=1"),
    "NaN/Inf": (_nan_image, None, None, None, "2 NaN/Inf intensities"),
    "truncated image": (None, None, None, lambda img, lab: _truncate(img), "unreadable or truncated file"),
    "garbage label": (
        None,
        None,
        None,
        lambda img, lab: lab.write_bytes(b"not a nifti at all"),
        "unreadable or truncated file",
    ),
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
    for fragment in (
        "case1.nii.gz: image without label",
        "case2.nii.gz: label values 7 outside",
        "scan0.nii.gz: 2 NaN/Inf",
        "orphan_seg.nii.gz: label without image",
    ):
        assert sum(fragment in line for line in lines) == 1, (fragment, lines)


@pytest.mark.parametrize(
    "make_unlabeled, message",
    [
        (lambda root: (root / "empty").mkdir(), "empty: empty unlabeled folder"),
        (lambda root: None, "empty: unlabeled folder does not exist"),
    ],
)
def test_datamodule_rejects_missing_or_empty_unlabeled(make_cohort, cfg, make_unlabeled, message):
    root = make_cohort(2, 0)
    make_unlabeled(root)
    with pytest.raises(DataError, match=message):
        SSLDataModule(cfg, root / "labeled", root / "empty").setup("fit")


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_reports_are_cached_and_handed_out_as_copies(make_cohort, cfg, monkeypatch):
    root = make_cohort(1, 0)
    case = {
        "id": "case0",
        "image": str(root / "labeled/images/case0.nii.gz"),
        "label": str(root / "labeled/labels/case0.nii.gz"),
    }
    first = check_cases([case], cfg)[0]
    reads = []
    monkeypatch.setattr(checks, "_read", lambda path, problems: reads.append(path))
    first.problems.append("edited by a caller")
    second = check_cases([case], cfg)[0]
    assert reads == []  # read once: the second report came from the cache
    assert second is not first and second.problems == [] and second.classes == first.classes


def test_report_cache_keeps_the_most_recently_used_entries():
    cache = checks.ReportCache(maxsize=2)
    cache.put(("a",), [1])
    cache.put(("b",), [2])
    assert cache.get(("a",)) == [1]  # "a" is now the most recently used
    cache.put(("c",), [3])
    assert ("b",) not in cache and ("a",) in cache and ("c",) in cache and len(cache) == 2
    with pytest.raises(ValueError, match="at least one entry"):
        checks.ReportCache(maxsize=0)


# ---------------------------------------------------------------- unlabeled scans that are not scans


def _scan(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 400, (20, 20, 16)).astype(np.int16)


def _copy(src: str):
    return lambda root, dst: dst.write_bytes((root / src).read_bytes())


def _resave(src: str):
    def make(root, dst):
        array, affine = read_volume(root / src)
        write_volume(array.astype(np.int16), affine, dst)

    return make


def _label_map(dtype, values=(0, 1, 2)):
    def make(root, dst):
        label = np.zeros((18, 20, 16), dtype)
        for i, v in enumerate(values):
            label[2 * i : 2 * i + 2, 3:9, 2:5] = v
        write_volume(label, np.eye(4), dst)

    return make


# name: (how the unlabeled file is made from the cohort, its name, expected kind or None when kept, fragment of the reason)
CONTENT_CASES = {
    "renamed copy of a labeled image": (
        _copy("labeled/images/case0.nii.gz"),
        "scan_x.nii.gz",
        "copy",
        "same voxels as the image of labeled case 'case0'",
    ),
    "labeled image re-saved as NRRD": (
        _resave("labeled/images/case1.nii.gz"),
        "other.nrrd",
        "copy",
        "same voxels as the image of labeled case 'case1'",
    ),
    "renamed copy of a label": (
        _copy("labeled/labels/case1.nii.gz"),
        "ct9.nii.gz",
        "copy",
        "same voxels as the label of labeled case 'case0'",
    ),  # the phantoms share one label map
    "renamed copy of a test image": (
        _copy("test/images/t0.nii.gz"),
        "t_copy.nii.gz",
        "copy",
        "same voxels as the image of test case 't0'",
    ),
    "unseen uint8 label map": (
        _label_map(np.uint8),
        "scan_new.nii.gz",
        "label-like",
        "looks like a label map (only the values 0, 1, 2)",
    ),
    "float binary mask": (_label_map(np.float32, (0, 1)), "mask.mha", "label-like", "only the values 0, 1)"),
    "integers beyond num_classes": (_label_map(np.uint8, (0, 1, 7)), "ints.nii.gz", None, ""),
    "another scan": (lambda root, dst: write_volume(_scan(7), np.eye(4), dst), "fresh.nii.gz", None, ""),
}


@pytest.mark.parametrize("name", list(CONTENT_CASES))
def test_unlabeled_screened_by_content(make_cohort, cfg, tmp_path, name):
    make, file_name, kind, fragment = CONTENT_CASES[name]
    root = make_cohort(2, 1)
    write_volume(_scan(50), np.eye(4), root / "test" / "images" / "t0.nii.gz")
    write_volume(np.zeros((20, 20, 16), np.uint8), np.eye(4), root / "test" / "labels" / "t0.nii.gz")
    make(root, root / "unlabeled" / file_name)
    cohort = gather_cohort(cfg, root / "labeled", root / "unlabeled", test=root / "test")
    assert cohort.problems == []
    flagged = {Path(f.file).name: f for f in cohort.flagged}
    ids = [c["id"] for c in cohort.unlabeled]
    if kind is None:
        assert flagged == {} and len(ids) == 2
    else:
        assert ids == ["scan0"], ids
        assert flagged[file_name].kind == kind and flagged[file_name].excluded and fragment in flagged[file_name].reason


def test_label_like_kept_on_request_with_a_warning(make_cohort, cfg):
    root = make_cohort(1, 1)
    _label_map(np.uint8)(root, root / "unlabeled" / "odd.nii.gz")
    cfg["data"]["keep_label_like_unlabeled"] = True
    cohort = gather_cohort(cfg, root / "labeled", root / "unlabeled")
    assert [c["id"] for c in cohort.unlabeled] == ["odd", "scan0"]
    assert [(f.kind, f.excluded) for f in cohort.flagged] == [("label-like", False)]
    assert "1 used with a warning (1 label-like)" in cohort.summary()


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.zeros((8, 8, 8), np.uint8), (0,)),
        (np.arange(512).reshape(8, 8, 8) % 3, (0, 1, 2)),
        ((np.arange(512).reshape(8, 8, 8) % 3).astype(np.float32), (0, 1, 2)),
        ((np.arange(512).reshape(8, 8, 8) % 3).astype(np.float32) + 0.5, None),  # not integers
        (np.arange(512).reshape(8, 8, 8) % 3 - 1, None),  # negative
        (np.arange(512).reshape(8, 8, 8) % 40, None),  # more than a handful of values
        (np.where(np.arange(512).reshape(8, 8, 8) == 100, np.nan, 1.0), None),  # NaN
    ],
)
def test_label_like_values(array, expected):
    assert label_like_values(array) == expected


def test_voxel_digest_ignores_format_and_sees_one_voxel(tmp_path):
    image = _scan(0)
    nii = write_volume(image, np.eye(4), tmp_path / "a.nii.gz")
    nrrd = write_volume(image, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "b.nrrd")  # another header, same voxels
    digests = {voxel_digest(read_volume(p)[0]) for p in (nii, nrrd)}
    assert len(digests) == 1 and digests.pop().startswith("20x20x16:")
    changed = image.copy()
    changed[5, 5, 5] += 1
    assert voxel_digest(changed) != voxel_digest(image)
    assert voxel_digest(image.reshape(20, 16, 20)) != voxel_digest(image)  # same bytes, other shape


def test_data_exclude_refuses_files_and_copies(make_cohort, cfg, tmp_path):
    root = make_cohort(1, 3)
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    (held_out / "h.nii.gz").write_bytes((root / "unlabeled" / "scan1.nii.gz").read_bytes())  # scan1 is a copy of it
    cfg["data"]["exclude"] = [str(root / "unlabeled" / "scan2.nii.gz"), str(held_out)]
    cohort = gather_cohort(cfg, root / "labeled", root / "unlabeled")
    assert [c["id"] for c in cohort.unlabeled] == ["scan0"] and cohort.problems == []
    reasons = {Path(f.file).name: f.reason for f in cohort.flagged}
    assert reasons["scan2.nii.gz"] == "listed in data.exclude"
    assert reasons["scan1.nii.gz"].startswith(f"same voxels as {held_out / 'h.nii.gz'} (data.exclude)")


def test_data_exclude_entry_that_matches_nothing_is_a_problem(make_cohort, cfg, tmp_path):
    root = make_cohort(1, 1)
    cfg["data"]["exclude"] = [str(tmp_path / "tset" / "**")]
    cohort = gather_cohort(cfg, root / "labeled", root / "unlabeled")
    assert cohort.problems == [
        f"{tmp_path / 'tset' / '**'}: data.exclude entry matches no image file (formats .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)"
    ]


def test_datamodule_leaves_out_test_cases_and_says_so(make_cohort, cfg, phantom_maker):
    root = make_cohort(3, 2)
    for i, name in enumerate(("t0", "t1")):
        image, label = phantom_maker(seed=60 + i)
        write_volume(image, np.eye(4), root / "test" / "images" / f"{name}.nii.gz")
        write_volume(label, np.eye(4), root / "test" / "labels" / f"{name}.nii.gz")
    dm = SSLDataModule(cfg, root / "labeled", root, test=root / "test")  # the dataset root as the unlabeled folder
    dm.setup("fit")
    assert sorted(c["id"] for c in dm.unlabeled_cases) == ["unlabeled/scan0", "unlabeled/scan1"]
    assert dm.cohort.summary() == (
        "unlabeled scans: 2 used; 10 file(s) left out (6 labeled case, 4 test case); "
        "medeman check-data lists each file and why"
    )
