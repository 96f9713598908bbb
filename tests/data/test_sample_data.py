"""The synthetic cohort generator: layout, HU range, classes, per-case geometry, determinism."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from medeman.data import discover_labeled, discover_unlabeled
from medeman.sample_data import SCANNERS, make_case, make_cohort


def test_cohort_layout_and_content(tmp_path):
    out = make_cohort(tmp_path / "c", n_labeled=2, n_unlabeled=3, n_test=1, seed=5)
    labeled = discover_labeled(out / "labeled")
    assert [c["id"] for c in labeled] == ["case_001", "case_002"]
    assert len(discover_labeled(out / "test")) == 1
    unlabeled = discover_unlabeled(out / "unlabeled")
    assert sorted(c["image"].rsplit(".", 1)[-1] for c in unlabeled) == ["gz", "mha", "nrrd"]
    image = nib.load(labeled[0]["image"])
    label = nib.load(labeled[0]["label"])
    assert image.get_data_dtype() == np.int16 and np.allclose(image.affine, label.affine)
    hu = np.asarray(image.dataobj)
    assert hu.min() == -1024 and 200 < hu.max() < 3072
    assert set(np.unique(np.asarray(label.dataobj))) == {0, 1, 2}


def test_cases_vary_and_are_deterministic():
    cases = [make_case(np.random.default_rng([0, i]), SCANNERS[i % 3]) for i in range(3)]
    shapes = {c[0].shape for c in cases}
    spacings = {tuple(np.round(np.sqrt((c[2][:3, :3] ** 2).sum(0)), 2)) for c in cases}
    assert len(shapes) == 3 and len(spacings) == 3
    assert any(abs(c[2][1, 2]) > 0.1 for c in cases)  # a tilted gantry: non-axis-aligned affine
    again = make_case(np.random.default_rng([0, 0]), SCANNERS[0])
    assert np.array_equal(again[0], cases[0][0]) and np.array_equal(again[1], cases[0][1])
