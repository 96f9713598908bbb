"""FixMatch-EMAN's unsupervised loss against a hand computation, and BCP's connected-component clean-up."""

import math

import pytest
import torch

from medeman.config import load_config
from medeman.methods import build_method
from stand_in_module import FixedTeacherModule as _Teacher


def _two_voxels():
    # voxel 0: teacher 0.95 sure of class 1 (kept at tau 0.9); voxel 1: 0.6 sure of class 0 (dropped)
    probs = torch.tensor([[0.05, 0.6], [0.95, 0.4]]).reshape(1, 2, 2, 1, 1)
    logits = torch.tensor([[0.0, 1.0], [math.log(3.0), 0.0]]).reshape(1, 2, 2, 1, 1)  # p1 = 0.75 at voxel 0
    return probs, logits


@pytest.mark.parametrize("consistency_weight", [0.0, 2.0])
def test_fixmatch_loss_is_hard_pseudo_label_ce_over_all_voxels_plus_masked_dice(consistency_weight):
    cfg = load_config(
        sets=[
            "ssl.method=fixmatch",
            "ssl.fixmatch_threshold=0.9",
            "ssl.consistency=mse",
            f"ssl.fixmatch_consistency_weight={consistency_weight}",
        ]
    )
    probs, logits = _two_voxels()
    logs = {}
    loss = build_method(cfg).unsupervised_loss(_Teacher(probs), logits, None, logs)
    ce = -math.log(0.75) / 2  # FixMatch: the kept voxel's CE averaged over both voxels
    # masked Dice on the kept voxel only, over the classes it holds (class 1: target 1, predicted 0.75)
    eps = 1e-5
    dice = 1 - (2 * 0.75 + eps) / (0.75 + 1 + eps)
    expected = ce + dice
    if consistency_weight:
        student = torch.softmax(logits, 1)
        expected += consistency_weight * float((student - probs).square().mean())
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(logs["ssl/pseudo_label_fraction"]) == pytest.approx(0.5)


def test_distribution_alignment_pseudo_labels_the_aligned_teacher_probabilities():
    sets = ["ssl.method=fixmatch", "ssl.fixmatch_threshold=0.9"]
    probs, logits = _two_voxels()
    aligned_method = build_method(load_config(sets=sets + ["ssl.fixmatch_distribution_alignment=true"]))
    before = {}
    unaligned = float(aligned_method.unsupervised_loss(_Teacher(probs), logits, None, before))
    assert float(before["ssl/pseudo_label_fraction"]) == pytest.approx(0.5)  # the identity until a teacher pass
    # the labeled scans hold class 1 six times as often as the teacher predicts it: ratios (1/6, 6);
    # voxel 1 (0.6, 0.4) -> (0.1, 2.4) / 2.5 = (0.04, 0.96), now a confident class-1 pseudo-label
    aligned_method.set_unlabeled_frequencies(torch.tensor([0.5, 0.5]), torch.tensor([3.0, 1 / 12]))
    after = {}
    loss = aligned_method.unsupervised_loss(_Teacher(probs), logits, None, after)
    assert float(after["ssl/pseudo_label_fraction"]) == pytest.approx(1.0)
    by_hand = torch.tensor([[0.05 / 6, 0.6 / 6], [0.95 * 6, 0.4 * 6]]).reshape(1, 2, 2, 1, 1)
    by_hand = by_hand / by_hand.sum(1, keepdim=True)
    plain = build_method(load_config(sets=sets)).unsupervised_loss(_Teacher(by_hand), logits, None, {})
    assert float(loss) == pytest.approx(float(plain), rel=1e-6) and float(loss) != pytest.approx(unaligned)


def test_class_weighted_pseudo_labels_weigh_the_ce_by_train_ce_class_weights():
    sets = ["ssl.method=fixmatch", "ssl.fixmatch_threshold=0.9", "data.num_classes=2", "train.ce_class_weights=[1,4]"]
    probs, logits = _two_voxels()
    plain = float(build_method(load_config(sets=sets)).unsupervised_loss(_Teacher(probs), logits, None, {}))
    weighted_method = build_method(load_config(sets=sets + ["ssl.fixmatch_class_weighted=true"]))
    weighted = float(weighted_method.unsupervised_loss(_Teacher(probs), logits, None, {}))
    # the one kept voxel is a class-1 pseudo-label: its CE (-log 0.75, over 2 voxels) counts 4 times; the Dice is unchanged
    assert weighted - plain == pytest.approx(3 * -math.log(0.75) / 2, rel=1e-5)


def test_class_weighted_pseudo_labels_need_class_weights():
    from medeman.config import ConfigError

    with pytest.raises(ConfigError, match="ssl.fixmatch_class_weighted .* train.ce_class_weights, which is null"):
        load_config(sets=["ssl.method=fixmatch", "ssl.fixmatch_class_weighted=true"])
    load_config(sets=["ssl.method=mean_teacher", "ssl.fixmatch_class_weighted=true"])  # not FixMatch: not its concern


def _label_map():
    labels = torch.zeros(1, 12, 4, 4, dtype=torch.long)
    labels[0, 0:4] = 1  # class 1: a 4-slab (64 voxels) ...
    labels[0, 6, 0, 0] = 1  # ... and a one-voxel speck
    labels[0, 8:10] = 2  # class 2: components of 32 and 8 voxels, and a speck
    labels[0, 11, :, :2] = 2
    labels[0, 11, 3, 3] = 2
    return labels


@pytest.mark.parametrize(
    "keep, expected_counts",
    [
        ([1, 2], {1: 64, 2: 40}),  # liver-like: the largest; kidney-like: the two largest
        ([0, 1], {1: 65, 2: 32}),  # 0 leaves class 1 alone
        (None, {1: 65, 2: 41}),  # no clean-up
    ],
)
def test_bcp_keeps_the_k_largest_components_per_class(keep, expected_counts):
    sets = ["ssl.method=bcp", "data.num_classes=3"] + ([f"ssl.bcp_keep_components={keep}"] if keep else [])
    method = build_method(load_config(sets=sets))
    cleaned = method.keep_components(_label_map())
    assert cleaned.dtype == torch.long and cleaned.shape == (1, 12, 4, 4)
    assert {c: int((cleaned == c).sum()) for c in (1, 2)} == expected_counts


@pytest.mark.parametrize(
    "sets, message",
    [
        (["data.num_classes=3", "ssl.bcp_keep_components=[1]"], "one per foreground class"),
        (["ssl.fixmatch_threshold=0"], "ssl.fixmatch_threshold: 0.0 must be a confidence in (0, 1]"),
        (["ssl.warmup_fraction=1.0"], "ssl.warmup_fraction: 1.0 must be a fraction of train.max_steps in [0, 1)"),
        (["ssl.fixmatch_consistency_weight=-1"], "ssl.fixmatch_consistency_weight: -1.0 must be a non-negative weight"),
    ],
)
def test_bad_recipe_values_are_refused_at_load(sets, message):
    from medeman.config import ConfigError

    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        load_config(sets=sets)
