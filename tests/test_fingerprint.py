"""Fingerprint of synthetic cohorts whose spacing, classes and components are known by construction."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import medeman.fingerprint as fingerprint_module
from medeman.fingerprint import fingerprint_cohort, guess_modality

SPACING = (2.0, 2.0, 5.0)  # mm; one voxel = 20 mm^3


def _case(root: Path, name: str, volume_writer, offset: int = 0, ct: bool = True, spacing=SPACING) -> None:
    """A 20x16x10 scan: class 1 two cubes (2^3 and 3^3 voxels), class 2 one 4x4x2 box; foreground intensities 100..."""
    image = np.full((20, 16, 10), -1000 if ct else 0, dtype=np.int16)
    image[1:-1, 1:-1, 1:-1] = 10
    label = np.zeros(image.shape, dtype=np.uint8)
    label[2:4, 2:4, 2:4] = 1
    label[10:13, 10:13, 5:8] = 1
    label[14:18, 2:6, 1:3] = 2
    image[label > 0] = 100 + offset
    affine = np.diag([*spacing, 1.0])
    volume_writer(root / "images" / f"{name}.nii.gz", image, affine)
    volume_writer(root / "labels" / f"{name}.nii.gz", label, affine)


@pytest.fixture
def cohort(tmp_path, volume_writer) -> Path:
    root = tmp_path / "labeled"
    _case(root, "a", volume_writer, offset=0)
    _case(root, "b", volume_writer, offset=50, spacing=(1.0, 1.0, 3.0))
    _case(root, "c", volume_writer, offset=100)
    return root


def test_case_fingerprint_has_the_written_spacing_shape_classes_and_components(cohort):
    fp = fingerprint_cohort(cohort)
    a = fp["cases"][0]
    assert a["spacing"] == pytest.approx(SPACING)
    assert a["shape"] == [20, 16, 10]
    assert a["orientation"] == "RAS"
    assert a["num_classes"] == 3
    assert a["class_voxels"][1:] == [8 + 27, 32]
    assert sorted(a["components"]["1"]) == pytest.approx([8 * 20.0, 27 * 20.0])  # mm^3
    assert a["components"]["2"] == pytest.approx([32 * 20.0])
    assert set(a["foreground_intensities"]) == {100.0}


def test_a_class_border_counts_the_classes_just_outside_it():
    from medeman.fingerprint import border_classes

    label = np.zeros((7, 7, 7), dtype=np.int64)
    label[1:6, 1:6, 1:6] = 1  # an organ, 5^3 ...
    label[3, 3, 3] = 2  # ... with a one-voxel lesion in its middle: its 26 neighbours are organ
    label[0, 0, 0] = 2  # and a lesion in the corner, outside the organ: 7 neighbours, 1 of them organ
    assert border_classes(label, 2, 3) == [6, 26 + 1, 0]
    # the organ's border: the 7^3 - 5^3 shell, background but for the corner lesion, and the hole of the middle one
    assert border_classes(label, 1, 3) == [7**3 - 5**3 - 1, 0, 2]
    assert border_classes(label, 2, 4) == [6, 27, 0, 0] and border_classes(np.zeros((2, 2, 2), np.int64), 1, 2) == [
        0,
        0,
    ]


def test_summary_takes_medians_fractions_and_intensity_percentiles(cohort):
    summary = fingerprint_cohort(cohort)["summary"]
    assert summary["num_labeled"] == 3 and summary["num_classes"] == 3
    assert summary["median_spacing"] == pytest.approx([2.0, 2.0, 5.0])
    assert summary["median_shape"] == [20, 16, 10]
    assert summary["median_size_mm"] == pytest.approx([40.0, 32.0, 50.0])
    assert summary["classes"]["1"]["foreground_fraction"] == pytest.approx(35 / 67)
    assert summary["classes"]["2"]["foreground_fraction"] == pytest.approx(32 / 67)
    assert summary["classes"]["1"]["components_per_case"] == [2, 2, 2]
    # each class lies in background: the cubes and the box are apart (the box's border at the image edge, z 0..3)
    assert summary["classes"]["2"]["border_fraction"] == [1.0, 0.0, 0.0]
    assert summary["classes"]["2"]["component_volume_mm3"]["min"] == pytest.approx(32 * 3.0)  # case b: 1x1x3 mm voxels
    values = np.repeat([100.0, 150.0, 200.0], 67)
    assert summary["intensity"]["p00_5"] == pytest.approx(np.percentile(values, 0.5))
    assert summary["intensity"]["p99_5"] == pytest.approx(np.percentile(values, 99.5))
    assert summary["modality_guess"] == "CT"


@pytest.mark.parametrize(
    "image_min, p005, expected", [(-1024.0, 20.0, "CT"), (-1000.0, -900.0, "CT"), (0.0, 15.0, "MR"), (-50.0, 3.0, "MR")]
)
def test_modality_guess_by_hounsfield_air(image_min, p005, expected):
    assert guess_modality(image_min, p005) == expected


def test_mr_cohort_is_guessed_mr(tmp_path, volume_writer):
    root = tmp_path / "mr"
    _case(root, "a", volume_writer, ct=False)
    assert fingerprint_cohort(root)["summary"]["modality_guess"] == "MR"


def test_unlabeled_scans_count_by_header(cohort, tmp_path, volume_writer):
    volume_writer(tmp_path / "unlabeled" / "u.nii.gz", np.zeros((30, 30, 30), np.int16), np.diag([1.0, 1.0, 1.0, 1.0]))
    fp = fingerprint_cohort(cohort, tmp_path / "unlabeled")
    assert fp["unlabeled"][0]["shape"] == [30, 30, 30]
    assert fp["summary"]["num_unlabeled"] == 1
    assert fp["summary"]["median_spacing"] == pytest.approx([1.5, 1.5, 4.0])  # median of 2, 1, 2, 1 and 5, 3, 5, 1


def test_cached_fingerprint_is_reused_until_a_file_changes(cohort, tmp_path, monkeypatch):
    cache = tmp_path / "run" / "fingerprint.json"
    first = fingerprint_cohort(cohort, cache=cache)
    assert json.loads(cache.read_text())["summary"] == first["summary"]

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a current fingerprint")

    monkeypatch.setattr(fingerprint_module, "case_fingerprint", fail)
    assert fingerprint_cohort(cohort, cache=cache)["summary"] == first["summary"]
    label = cohort / "labels" / "a.nii.gz"
    stat = label.stat()  # same bytes, a later modification time: the cache is stale
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="recomputed"):
        fingerprint_cohort(cohort, cache=cache)


def test_bad_cases_are_one_line_errors_naming_the_file(tmp_path, volume_writer):
    from medeman.data.errors import DataError

    root = tmp_path / "labeled"
    _case(root, "a", volume_writer)
    volume_writer(root / "labels" / "a.nii.gz", np.zeros((5, 5, 5), np.uint8), np.diag([*SPACING, 1.0]))
    with pytest.raises(
        DataError, match=r"labels/a.nii.gz: label shape \(5, 5, 5\) differs from its image's \(20, 16, 10\)"
    ):
        fingerprint_cohort(root)
    volume_writer(root / "labels" / "a.nii.gz", np.full((20, 16, 10), 0.5, np.float32), np.diag([*SPACING, 1.0]))
    with pytest.raises(DataError, match="labels/a.nii.gz: a label map must hold non-negative integer labels"):
        fingerprint_cohort(root)
    (root / "labels" / "a.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(DataError, match="labels/a.nii.gz: cannot read: "):
        fingerprint_cohort(root)
