"""medeman.component_rules: the component clean-up medeman infer and an exported bundle both run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medeman.component_rules import apply_component_rules, apply_to_prediction, kept_components

KEPT_CASES = [
    # (sizes, min_voxels, keep_largest, expected): by hand
    ([5, 40, 3, 40], 4, 0, [True, True, False, True]),  # the 3-voxel speckle goes
    ([5, 40, 3, 40], 50, 0, [False, True, False, False]),  # all below the bar: the largest (first of a tie) stays
    ([5, 40, 3, 40], 4, 2, [False, True, False, True]),  # the two largest of those above the bar
    ([5, 40, 3, 40], 0, 3, [True, True, False, True]),
    ([], 10, 2, []),
]


@pytest.mark.parametrize("sizes,min_voxels,keep_largest,expected", KEPT_CASES)
def test_kept_components_by_hand(sizes, min_voxels, keep_largest, expected):
    kept = kept_components(np.array(sizes, dtype=np.int64), min_voxels, keep_largest)
    assert kept.tolist() == expected


def _two_components() -> np.ndarray:
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[0:3, 0:3, 0:3] = 1  # 27 voxels
    labels[6:8, 6:8, 6] = 1  # 4 voxels, 26-connected to nothing else
    labels[5, 0, 0] = 2  # another class, untouched by class 1's rule
    return labels


@pytest.mark.parametrize(
    "voxel_sizes,expected_class1",
    [((1.0, 1.0, 1.0), 27), ((2.0, 2.0, 2.0), 31)],  # the 4-voxel part is 4 mm^3 (< 20: dropped) or 32 mm^3 (kept)
)
def test_bundle_entry_takes_the_voxel_volume_from_the_affine(voxel_sizes, expected_class1):
    rules = {"1": {"min_volume_mm3": 20.0, "keep_largest": 0, "drop": False}}
    # a rotated affine: the voxel sizes are the lengths of its columns
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array(voxel_sizes)
    labels = _two_components()
    pred = MetaTensor(torch.from_numpy(labels[None].astype(np.float32)), affine=torch.as_tensor(affine))
    out = apply_to_prediction(pred, rules)
    assert isinstance(out, MetaTensor) and out.shape == pred.shape
    np.testing.assert_allclose(np.asarray(out.affine), affine)
    assert int((out[0] == 1).sum()) == expected_class1
    assert int((out[0] == 2).sum()) == 1
    np.testing.assert_array_equal(labels, _two_components())  # the input is not modified
    assert int((pred[0] == 1).sum()) == 31


def test_no_active_rule_returns_the_input_itself():
    labels = _two_components()
    pred = MetaTensor(torch.from_numpy(labels[None].astype(np.float32)), affine=torch.eye(4))
    assert apply_to_prediction(pred, {"1": {"min_volume_mm3": 0.0, "keep_largest": 0}}) is pred
    inactive = {"1": {"min_volume_mm3": 0.0, "keep_largest": 0, "drop": False}}
    assert apply_component_rules(labels, inactive, 1.0) is labels
    assert apply_component_rules(labels, None, 1.0) is labels
    dropped = apply_component_rules(labels, {"2": {"min_volume_mm3": 0.0, "keep_largest": 0, "drop": True}}, 1.0)
    assert int((dropped == 2).sum()) == 0 and int((dropped == 1).sum()) == 31
