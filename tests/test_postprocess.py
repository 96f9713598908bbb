"""Post-processing learned on hand-made validation volumes whose right rules are known."""

from __future__ import annotations

import numpy as np
import pytest

from medeman.postprocess import apply_postprocessing, describe, learn_postprocessing


def _box(shape, *slices_and_values):
    out = np.zeros(shape, dtype=np.uint8)
    for region, value in slices_and_values:
        out[region] = value
    return out


CUBE = (slice(2, 5), slice(2, 5), slice(2, 5))  # 27 voxels
SPECKLE_A = (slice(10, 11), slice(10, 11), slice(10, 11))  # 1 voxel
SPECKLE_B = (slice(14, 16), slice(2, 3), slice(2, 3))  # 2 voxels


def test_speckles_are_dropped_at_the_volume_between_them_and_the_true_structure():
    reference = _box((18, 18, 18), (CUBE, 1))
    prediction = _box((18, 18, 18), (CUBE, 1), (SPECKLE_A, 1), (SPECKLE_B, 1))
    rules = learn_postprocessing([prediction], [reference], voxel_mm3=[8.0], num_classes=2)
    rule = rules["classes"]["1"]
    # component volumes 8, 16 and 216 mm^3: the threshold midway between 16 and 216
    assert rule["min_volume_mm3"] == pytest.approx(116.0)
    assert rule["keep_largest"] == 0  # one component in every reference, but keeping 1 adds nothing once the speckles are gone
    assert rule["dice_before"] == pytest.approx(2 * 27 / (30 + 27)) and rule["dice_after"] == pytest.approx(1.0)
    cleaned = apply_postprocessing(prediction, rules, voxel_mm3=8.0)
    np.testing.assert_array_equal(cleaned, reference)
    assert prediction[SPECKLE_A].all()  # the input is not modified
    # the rule is a volume: on a grid of 1 mm^3 voxels the 27-voxel cube (27 mm^3) is under it and goes too
    assert apply_postprocessing(prediction, rules, voxel_mm3=1.0).max() == 0


def test_keep_the_k_largest_where_a_size_threshold_would_cut_true_components():
    shape = (24, 24, 12)
    kidney_l, kidney_r = (slice(2, 6), slice(2, 6), slice(2, 6)), (slice(14, 18), slice(2, 6), slice(2, 6))  # 64 voxels each
    false = (slice(2, 5), slice(14, 17), slice(2, 5))  # 27 voxels
    small_l, small_r = (slice(2, 5), slice(2, 5), slice(2, 5)), (slice(14, 17), slice(2, 5), slice(2, 5))  # 27 voxels each
    references = [_box(shape, (kidney_l, 1), (kidney_r, 1)), _box(shape, (small_l, 1), (small_r, 1))]
    predictions = [_box(shape, (kidney_l, 1), (kidney_r, 1), (false, 1)), references[1].copy()]
    rules = learn_postprocessing(predictions, references, voxel_mm3=[1.0, 1.0], num_classes=2)
    rule = rules["classes"]["1"]
    assert rule["min_volume_mm3"] == 0.0  # dropping 27-voxel components would remove the small kidneys too
    assert rule["keep_largest"] == 2
    assert rule["dice_before"] == pytest.approx((2 * 128 / (155 + 128) + 1.0) / 2) and rule["dice_after"] == pytest.approx(1.0)
    np.testing.assert_array_equal(apply_postprocessing(predictions[0], rules, 1.0), references[0])
    assert "keep the 2 largest" in describe(rules)


def test_no_rule_when_nothing_would_improve_and_other_classes_are_untouched():
    reference = _box((12, 12, 12), (CUBE, 1), (SPECKLE_A, 2))
    prediction = reference.copy()
    rules = learn_postprocessing([prediction], [reference], voxel_mm3=[1.0], num_classes=3)
    assert rules["classes"]["1"] == {"min_volume_mm3": 0.0, "keep_largest": 0, "dice_before": 1.0, "dice_after": 1.0}
    assert rules["classes"]["2"]["min_volume_mm3"] == 0.0
    assert apply_postprocessing(prediction, rules, 1.0) is prediction
    assert apply_postprocessing(prediction, None, 1.0) is prediction


def test_a_class_that_is_only_ever_false_is_dropped_entirely():
    reference = _box((18, 18, 18), (CUBE, 1))
    prediction = _box((18, 18, 18), (CUBE, 1), (SPECKLE_B, 2))
    rules = learn_postprocessing([prediction], [reference], voxel_mm3=[1.0], num_classes=3)
    assert rules["classes"]["2"]["min_volume_mm3"] == pytest.approx(4.0)  # twice the largest (2-voxel) component
    assert rules["classes"]["2"]["dice_before"] == 0.0 and rules["classes"]["2"]["dice_after"] == 1.0
    np.testing.assert_array_equal(apply_postprocessing(prediction, rules, 1.0), reference)
