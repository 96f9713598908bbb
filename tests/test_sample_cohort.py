"""The sample cohort generator's options: validation cases, the unlabeled scans' ground truth, lesions.

(Not test_sample_data.py: tests/data/ has one, and pytest needs unique basenames without __init__.py.)
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medeman.sample_data import SCANNERS, make_case, make_cohort


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize(
    "n_val, unlabeled_labels, extra",
    [
        (0, False, []),
        (1, False, ["val/images/case_005.nii.gz", "val/labels/case_005.nii.gz"]),
        (0, True, ["unlabeled_labels/case_003.nii.gz", "unlabeled_labels/case_004.nii.gz"]),
    ],
)
def test_layout_of_the_optional_parts(tmp_path, n_val, unlabeled_labels, extra):
    root = make_cohort(
        tmp_path / "c",
        n_labeled=1,
        n_unlabeled=2,
        n_test=1,
        other_formats=False,
        n_val=n_val,
        unlabeled_labels=unlabeled_labels,
    )
    base = [
        "labeled/images/case_001.nii.gz",
        "labeled/labels/case_001.nii.gz",
        "test/images/case_002.nii.gz",
        "test/labels/case_002.nii.gz",
        "unlabeled/case_003.nii.gz",
        "unlabeled/case_004.nii.gz",
    ]
    assert _files(root) == sorted(base + extra)


def test_validation_cases_leave_the_other_parts_unchanged(tmp_path):
    plain = make_cohort(tmp_path / "plain", n_labeled=1, n_unlabeled=1, n_test=1, other_formats=False)
    with_val = make_cohort(tmp_path / "val", n_labeled=1, n_unlabeled=1, n_test=1, other_formats=False, n_val=1)
    for rel in _files(plain):
        np.testing.assert_array_equal(_array(plain / rel), _array(with_val / rel), err_msg=rel)
    # the validation case is the next phantom of the cohort's sequence (index 3, scanner 3 % 3)
    image, label, affine = make_case(np.random.default_rng([0, 3]), SCANNERS[0])
    np.testing.assert_array_equal(_array(with_val / "val" / "images" / "case_004.nii.gz"), image)
    np.testing.assert_array_equal(_array(with_val / "val" / "labels" / "case_004.nii.gz"), label)


def test_unlabeled_ground_truth_is_the_scans_own_label_on_its_grid(tmp_path):
    root = make_cohort(tmp_path / "c", n_labeled=0, n_unlabeled=2, n_test=0, other_formats=False, unlabeled_labels=True)
    for index, name in enumerate(("case_001", "case_002")):
        _, label, affine = make_case(np.random.default_rng([0, index]), SCANNERS[index])
        scan = nib.load(str(root / "unlabeled" / f"{name}.nii.gz"))
        truth = nib.load(str(root / "unlabeled_labels" / f"{name}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(truth.dataobj), label)
        np.testing.assert_allclose(truth.affine, scan.affine, atol=1e-5)
        assert set(np.unique(label)) <= {0, 1, 2} and (label > 0).any()


def test_lesions_are_small_varied_components_inside_the_liver():
    from scipy import ndimage

    from medeman.sample_data import LESION_LABEL

    counts, fractions, contrasts = [], [], []
    for index in range(6):
        plain = make_case(np.random.default_rng([0, index]), SCANNERS[index % 3])[1]
        image, label, _ = make_case(np.random.default_rng([0, index]), SCANNERS[index % 3], lesions=True)
        # the lesions replace liver voxels and nothing else: the anatomy is the plain phantom's
        np.testing.assert_array_equal(np.where(label == LESION_LABEL, 1, label), plain)
        lesion = label == LESION_LABEL
        counts.append(ndimage.label(lesion, np.ones((3, 3, 3)))[1])
        fractions.append(lesion.mean())
        contrasts.append(float(np.median(image[lesion])) - float(np.median(image[label == 1])))
    assert set(np.unique(label)) == {0, 1, 2, 3}
    assert all(1 <= n <= 3 for n in counts)
    assert 0.0003 < np.mean(fractions) < 0.003  # about 0.1 % of the scan
    assert min(contrasts) < -10 and max(contrasts) > 10  # darker and brighter lesions both occur


def test_lesion_option_of_the_cohort_writer(tmp_path):
    root = make_cohort(tmp_path / "c", n_labeled=1, n_unlabeled=0, n_test=0, other_formats=False, lesions=True)
    assert (_array(root / "labeled" / "labels" / "case_001.nii.gz") == 3).any()
