"""Adaptive per-class pseudo-label thresholds against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from medeman.pseudo_labels import (
    AdaptiveThresholds,
    DistributionAlignment,
    align_distribution,
    class_shares,
    class_confidence,
    class_thresholds,
    kept_fraction_per_class,
)


def _probs(rows: list[list[float]]) -> torch.Tensor:
    """Voxel class distributions as a (1, C, N, 1, 1) batch."""
    return torch.tensor(rows).T.reshape(1, len(rows[0]), len(rows), 1, 1)


# four voxels: two confident background, one class-1 and one class-2 voxel at 0.6 confidence
BATCH = _probs([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6]])


def test_batch_statistics_by_hand():
    stats, counts, labels = class_confidence(BATCH)
    assert labels.flatten().tolist() == [0, 0, 1, 2]
    torch.testing.assert_close(stats, torch.tensor([0.9 + 0.8 + 0.6 + 0.6, 0.9 + 0.8, 0.6, 0.6]))
    assert counts.tolist() == [4, 2, 1, 1]


# (momentum, cap, expected thresholds after one update of BATCH from the 1/3 initialisation)
# global: m/3 + (1-m) 0.725; classes: m/3 + (1-m) [0.85, 0.6, 0.6]; thresholds: global * class / max(class)
def _by_hand(m: float, cap: float) -> list[float]:
    tau = m / 3 + (1 - m) * 0.725
    cls = [m / 3 + (1 - m) * v for v in (0.85, 0.6, 0.6)]
    return [min(cap, tau * c / max(cls)) for c in cls]


THRESHOLD_CASES = [
    (0.5, 1.0, [0.529167, 0.417371, 0.417371]),
    (0.5, 0.5, [0.5, 0.417371, 0.417371]),  # capped by the fixed threshold
    (0.0, 1.0, [0.725, 0.725 * 0.6 / 0.85, 0.725 * 0.6 / 0.85]),  # no memory: this batch's statistics
]


@pytest.mark.parametrize("momentum, cap, expected", THRESHOLD_CASES)
def test_thresholds_after_one_update_match_hand_computation(momentum, cap, expected):
    assert _by_hand(momentum, cap) == pytest.approx(expected, abs=1e-6)
    thresholds = AdaptiveThresholds(3, momentum=momentum, cap=cap)
    labels, mask = thresholds(BATCH)
    torch.testing.assert_close(thresholds.thresholds(), torch.tensor(expected), atol=1e-6, rtol=0)
    assert labels.flatten().tolist() == [0, 0, 1, 2]
    expected_mask = [conf >= expected[c] for conf, c in ((0.9, 0), (0.8, 0), (0.6, 1), (0.6, 2))]
    assert mask.flatten().tolist() == expected_mask


def test_rare_class_is_kept_where_the_fixed_threshold_drops_it():
    """Teacher sure of background (0.95), unsure of the lesion (0.55): fixed 0.9 drops every lesion voxel."""
    batch = _probs([[0.95, 0.05]] * 9 + [[0.45, 0.55]])
    thresholds = AdaptiveThresholds(2, momentum=0.0, cap=0.9)
    labels, mask = thresholds(batch)
    # tau = (9 * 0.95 + 0.55) / 10 = 0.91 -> capped 0.9 for background; lesion 0.91 * 0.55 / 0.95 = 0.5268
    torch.testing.assert_close(thresholds.thresholds(), torch.tensor([0.9, 0.91 * 0.55 / 0.95]))
    kept = kept_fraction_per_class(labels, mask, 2)
    assert kept.tolist() == [1.0, 1.0]
    fixed = batch.max(dim=1).values >= 0.9
    assert kept_fraction_per_class(labels, fixed, 2).tolist() == [1.0, 0.0]


def test_a_class_absent_from_the_batch_keeps_its_statistic():
    thresholds = AdaptiveThresholds(3, momentum=0.5)
    thresholds.update(BATCH)
    before = thresholds.class_confidence.clone()
    thresholds.update(_probs([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]))  # nothing predicted as class 2
    assert thresholds.class_confidence[2] == before[2]
    torch.testing.assert_close(thresholds.class_confidence[:2], 0.5 * before[:2] + 0.5 * torch.tensor([0.7, 0.8]))
    torch.testing.assert_close(thresholds.global_confidence, torch.tensor(0.5 * (0.5 / 3 + 0.5 * 0.725) + 0.5 * 0.75))


def test_state_is_in_the_state_dict_and_restores():
    trained = AdaptiveThresholds(3, momentum=0.5, cap=0.95)
    trained.update(BATCH)
    assert set(trained.state_dict()) == {"global_confidence", "class_confidence"}
    fresh = AdaptiveThresholds(3, momentum=0.5, cap=0.95)
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh.thresholds(), trained.thresholds())


def test_initial_thresholds_are_one_over_c():
    torch.testing.assert_close(AdaptiveThresholds(4).thresholds(), torch.full((4,), 0.25))
    torch.testing.assert_close(
        class_thresholds(torch.tensor(0.8), torch.tensor([0.9, 0.45]), cap=0.7), torch.tensor([0.7, 0.4])
    )


def test_kept_fraction_per_class_by_hand():
    labels = torch.tensor([[0, 0, 1, 2, 2, 2]])
    mask = torch.tensor([[True, False, True, False, True, True]])
    kept = kept_fraction_per_class(labels, mask, 4)
    assert kept[:3].tolist() == pytest.approx([0.5, 1.0, 2 / 3])
    assert math.isnan(kept[3])  # never predicted


# two voxels, two classes; the model predicts class 1 half as often as the labeled scans hold it:
# weights prior / marginal = (0.75, 2): voxel 0 (0.8, 0.2) -> (0.6, 0.4); voxel 1 (0.4, 0.6) -> (0.3, 1.2) / 1.5 = (0.2, 0.8)
ALIGN_PROBS, ALIGNED = torch.tensor([[0.8, 0.4], [0.2, 0.6]]), torch.tensor([[0.6, 0.2], [0.4, 0.8]])
PRIOR, MARGINAL = torch.tensor([0.6, 0.4]), torch.tensor([0.8, 0.2])


@pytest.mark.parametrize("class_dim", [0, 1])
def test_distribution_alignment_by_hand(class_dim):
    probs, expected = (ALIGN_PROBS, ALIGNED) if class_dim == 0 else (ALIGN_PROBS.T, ALIGNED.T)
    torch.testing.assert_close(align_distribution(probs, PRIOR, MARGINAL, class_dim=class_dim), expected)
    calibrated = align_distribution(probs, MARGINAL, MARGINAL, class_dim=class_dim)
    torch.testing.assert_close(calibrated, probs)  # a calibrated teacher is left alone


def test_alignment_module_is_the_identity_until_set_and_keeps_its_frequencies_in_the_state_dict():
    probs = ALIGN_PROBS.reshape(1, 2, 2, 1, 1)
    alignment = DistributionAlignment(2)
    torch.testing.assert_close(alignment(probs), probs)
    alignment.set_frequencies(PRIOR, MARGINAL)
    torch.testing.assert_close(alignment(probs), ALIGNED.reshape(1, 2, 2, 1, 1))
    torch.testing.assert_close(alignment.ratios(), torch.tensor([0.75, 2.0]))
    restored = DistributionAlignment(2)
    restored.load_state_dict(alignment.state_dict())
    torch.testing.assert_close(restored(probs), alignment(probs))


def test_class_shares_by_hand():
    # 6 voxels of class 0, 3 of class 1, 1 of class 2 over two maps of different shapes (float labels are rounded)
    maps = [torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 1.0]]), torch.tensor([0, 0, 0, 1.0])]
    torch.testing.assert_close(class_shares(maps, 3), torch.tensor([0.6, 0.3, 0.1]))
