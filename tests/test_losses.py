"""Losses and schedules of medeman.losses against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from medeman.losses import (
    masked_cross_entropy,
    masked_dice,
    sigmoid_rampup,
    softmax_kl,
    softmax_mse,
    unsupervised_weight,
    voxel_pseudo_labels,
)

RAMPUP_CASES = [  # step, rampup_steps, expected exp(-5 (1 - t)^2)
    (0, 100, math.exp(-5.0)),
    (50, 100, math.exp(-5.0 * 0.25)),
    (100, 100, 1.0),
    (250, 100, 1.0),
    (7, 0, 1.0),
]


@pytest.mark.parametrize("step, rampup, expected", RAMPUP_CASES)
def test_sigmoid_rampup(step, rampup, expected):
    assert sigmoid_rampup(step, rampup) == pytest.approx(expected)


WEIGHT_CASES = [  # step, weight, rampup, warmup, expected
    (0, 2.0, 10, 5, 0.0),
    (4, 2.0, 10, 5, 0.0),
    (5, 2.0, 10, 5, 2.0 * math.exp(-5.0)),
    (10, 2.0, 10, 5, 2.0 * math.exp(-5.0 * 0.25)),
    (15, 2.0, 10, 5, 2.0),
    (3, 0.5, 0, 0, 0.5),
]


@pytest.mark.parametrize("step, weight, rampup, warmup, expected", WEIGHT_CASES)
def test_unsupervised_weight_is_zero_in_warmup_then_ramps(step, weight, rampup, warmup, expected):
    assert unsupervised_weight(step, weight, rampup, warmup) == pytest.approx(expected)


def _two_voxel_case():
    # one image, 2 classes, 2 voxels: student logits chosen so that softmax is (0.5, 0.5) and (e/(1+e), 1/(1+e))
    logits = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).reshape(1, 2, 2, 1, 1)
    teacher = torch.tensor([[1.0, 0.25], [0.0, 0.75]]).reshape(1, 2, 2, 1, 1)
    return logits, teacher


def test_softmax_mse_is_mean_over_classes_and_voxels():
    logits, teacher = _two_voxel_case()
    p = 1 / (1 + math.exp(-1.0))  # student prob of class 0 at voxel 1
    squared = [(0.5 - 1.0) ** 2, (p - 0.25) ** 2, (0.5 - 0.0) ** 2, (1 - p - 0.75) ** 2]
    assert softmax_mse(logits, teacher).item() == pytest.approx(sum(squared) / 4, rel=1e-6)


def test_softmax_kl_is_mean_over_classes_and_voxels():
    logits, teacher = _two_voxel_case()
    p = 1 / (1 + math.exp(-1.0))
    # voxel 0: teacher (1, 0) vs student (0.5, 0.5): 1*log(1/0.5); voxel 1: teacher (0.25, 0.75) vs (p, 1-p)
    kl = math.log(2.0) + 0.25 * math.log(0.25 / p) + 0.75 * math.log(0.75 / (1 - p))
    assert softmax_kl(logits, teacher).item() == pytest.approx(kl / 4, rel=1e-6)
    assert softmax_kl(torch.log(teacher.clamp_min(1e-12)), teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_voxel_pseudo_labels_threshold_is_inclusive():
    probs = torch.tensor([[0.9, 0.4, 0.2], [0.1, 0.6, 0.8]]).reshape(1, 2, 3, 1, 1)
    labels, mask = voxel_pseudo_labels(probs, 0.6)
    assert labels.flatten().tolist() == [0, 1, 1]
    assert mask.flatten().tolist() == [True, True, True]
    _, mask = voxel_pseudo_labels(probs, 0.7)
    assert mask.flatten().tolist() == [True, False, True]


def test_masked_cross_entropy_averages_kept_voxels_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4, 4))
    mask = torch.rand(2, 4, 4, 4) > 0.5
    expected = F.cross_entropy(logits.permute(0, 2, 3, 4, 1)[mask], labels[mask])
    assert masked_cross_entropy(logits, labels, mask, "kept").item() == pytest.approx(expected.item(), rel=1e-5)
    assert masked_cross_entropy(logits, labels, torch.zeros_like(mask), "kept").item() == 0.0


# logits of 4 voxels (2 classes), labels, kept mask -> expected CE for reduction "all" and "kept", by hand
_CE = [math.log(2.0), math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(2.0)), math.log(1 + math.exp(-4.0))]
REDUCTION_CASES = [
    ([True, True, True, True], sum(_CE) / 4, sum(_CE) / 4),
    ([True, False, True, False], (_CE[0] + _CE[2]) / 4, (_CE[0] + _CE[2]) / 2),
    ([False, True, False, False], _CE[1] / 4, _CE[1]),
    ([False, False, False, False], 0.0, 0.0),
]


@pytest.mark.parametrize("kept, expected_all, expected_kept", REDUCTION_CASES)
def test_pseudo_label_reduction_all_divides_by_every_voxel_kept_by_kept_ones(kept, expected_all, expected_kept):
    # voxel logits (class 0, class 1) and labels: CE = log(1 + exp(z_other - z_label))
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]]).T.reshape(1, 2, 4, 1, 1)
    labels = torch.tensor([0, 0, 0, 1]).reshape(1, 4, 1, 1)
    mask = torch.tensor(kept).reshape(1, 4, 1, 1)
    assert masked_cross_entropy(logits, labels, mask, "all").item() == pytest.approx(expected_all, rel=1e-6)
    assert masked_cross_entropy(logits, labels, mask, "kept").item() == pytest.approx(expected_kept, rel=1e-6)
    assert masked_cross_entropy(logits, labels, mask).item() == pytest.approx(
        expected_all, rel=1e-6
    )  # FixMatch's is the default


@pytest.mark.parametrize(
    "kept, weights", [([True, True, True, True], [1.0, 10.0]), ([True, False, False, True], [0.5, 3.0])]
)
def test_class_weighted_pseudo_label_ce_weighs_each_voxel_by_its_labels_class(kept, weights):
    # the voxels of REDUCTION_CASES: labels 0, 0, 0, 1, so voxel 3's CE counts weights[1] times, the others weights[0]
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]]).T.reshape(1, 2, 4, 1, 1)
    labels = torch.tensor([0, 0, 0, 1]).reshape(1, 4, 1, 1)
    mask = torch.tensor(kept).reshape(1, 4, 1, 1)
    w = [weights[0], weights[0], weights[0], weights[1]]
    num = sum(wi * ce for wi, ce, k in zip(w, _CE, kept) if k)
    class_weights = torch.tensor(weights)
    assert masked_cross_entropy(logits, labels, mask, "all", class_weights).item() == pytest.approx(num / 4, rel=1e-6)
    kept_weight = sum(wi for wi, k in zip(w, kept) if k)
    assert masked_cross_entropy(logits, labels, mask, "kept", class_weights).item() == pytest.approx(
        num / kept_weight, rel=1e-6
    )
    assert masked_cross_entropy(logits, labels, mask, "all", torch.ones(2)).item() == pytest.approx(
        masked_cross_entropy(logits, labels, mask, "all").item(), rel=1e-7
    )


def test_unknown_pseudo_label_reduction_is_refused():
    with pytest.raises(ValueError, match="'all' or 'kept'"):
        masked_cross_entropy(
            torch.zeros(1, 2, 1, 1, 1),
            torch.zeros(1, 1, 1, 1, dtype=torch.long),
            torch.ones(1, 1, 1, 1, dtype=torch.bool),
            "sum",
        )


def test_masked_dice_is_zero_for_perfect_prediction_and_ignores_masked_voxels():
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    labels[:, :2] = 1
    perfect = F.one_hot(labels, 2).movedim(-1, 1).float() * 100.0
    mask = torch.ones_like(labels, dtype=torch.bool)
    assert masked_dice(perfect, labels, mask).item() == pytest.approx(0.0, abs=1e-4)
    wrong = perfect.clone()
    wrong[:, :, 2:] = wrong[:, :, 2:].flip(1)  # wrong in the second half only
    mask[:, 2:] = False
    assert masked_dice(wrong, labels, mask).item() == pytest.approx(0.0, abs=1e-4)
    mask[:] = True
    assert masked_dice(wrong, labels, mask).item() > 0.3
