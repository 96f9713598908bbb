"""Post-processing learned on hand-made validation volumes whose right rules are known."""

from __future__ import annotations

import numpy as np
import pytest

from medeman.postprocess import (
    apply_postprocessing,
    describe,
    learn_class_scales,
    learn_postprocessing,
    scale_classes,
)
from tiny_config import TINY_BASE


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
    assert (
        rule["keep_largest"] == 0
    )  # one component in every reference, but keeping 1 adds nothing once the speckles are gone
    assert rule["dice_before"] == pytest.approx(2 * 27 / (30 + 27)) and rule["dice_after"] == pytest.approx(1.0)
    cleaned = apply_postprocessing(prediction, rules, voxel_mm3=8.0)
    np.testing.assert_array_equal(cleaned, reference)
    assert prediction[SPECKLE_A].all()  # the input is not modified
    # the rule is a volume: on a grid of 1 mm^3 voxels the 27-voxel cube (27 mm^3) is under it too, but the
    # largest component of a class always stays: a size rule removes speckles, never the structure
    np.testing.assert_array_equal(apply_postprocessing(prediction, rules, voxel_mm3=1.0), reference)


def test_keep_the_k_largest_where_a_size_threshold_would_cut_true_components():
    shape = (24, 24, 12)
    kidney_l, kidney_r = (
        (slice(2, 6), slice(2, 6), slice(2, 6)),
        (slice(14, 18), slice(2, 6), slice(2, 6)),
    )  # 64 voxels each
    false = (slice(2, 5), slice(14, 17), slice(2, 5))  # 27 voxels
    small_l, small_r = (
        (slice(2, 5), slice(2, 5), slice(2, 5)),
        (slice(14, 17), slice(2, 5), slice(2, 5)),
    )  # 27 voxels each
    references = [_box(shape, (kidney_l, 1), (kidney_r, 1)), _box(shape, (small_l, 1), (small_r, 1))]
    predictions = [_box(shape, (kidney_l, 1), (kidney_r, 1), (false, 1)), references[1].copy()]
    rules = learn_postprocessing(predictions, references, voxel_mm3=[1.0, 1.0], num_classes=2)
    rule = rules["classes"]["1"]
    assert rule["min_volume_mm3"] == 0.0  # dropping 27-voxel components would remove the small kidneys too
    assert rule["keep_largest"] == 2
    assert rule["dice_before"] == pytest.approx((2 * 128 / (155 + 128) + 1.0) / 2) and rule[
        "dice_after"
    ] == pytest.approx(1.0)
    np.testing.assert_array_equal(apply_postprocessing(predictions[0], rules, 1.0), references[0])
    assert "keep the 2 largest" in describe(rules)


def test_no_rule_when_nothing_would_improve_and_other_classes_are_untouched():
    reference = _box((12, 12, 12), (CUBE, 1), (SPECKLE_A, 2))
    prediction = reference.copy()
    rules = learn_postprocessing([prediction], [reference], voxel_mm3=[1.0], num_classes=3)
    assert rules["classes"]["1"] == {
        "min_volume_mm3": 0.0,
        "keep_largest": 0,
        "drop": False,
        "dice_before": 1.0,
        "dice_after": 1.0,
    }
    assert rules["classes"]["2"]["min_volume_mm3"] == 0.0
    assert apply_postprocessing(prediction, rules, 1.0) is prediction
    assert apply_postprocessing(prediction, None, 1.0) is prediction


def test_a_class_in_no_validation_reference_is_dropped_entirely():
    reference = _box((18, 18, 18), (CUBE, 1))
    prediction = _box((18, 18, 18), (CUBE, 1), (SPECKLE_B, 2))
    rules = learn_postprocessing([prediction], [reference], voxel_mm3=[1.0], num_classes=3)
    assert rules["classes"]["2"]["drop"] is True and rules["classes"]["1"]["drop"] is False
    assert rules["classes"]["2"]["dice_before"] == 0.0 and rules["classes"]["2"]["dice_after"] == 1.0
    assert "class 2: drop the class (in no validation reference)" in describe(rules)
    np.testing.assert_array_equal(apply_postprocessing(prediction, rules, 1.0), reference)


TINY = [*TINY_BASE, "train.val_every_steps=2", "ssl.method=supervised", "train.max_steps=2"]


def _under_called_lesion():
    """An organ (class 1) holding a lesion (class 2) that the network calls at 0.3 against the organ's 0.7."""
    import torch

    reference = torch.zeros(10, 10, 10, dtype=torch.long)
    reference[2:8, 2:8, 2:8] = 1  # 216 voxels of organ ...
    reference[4:6, 4:6, 4:6] = 2  # ... 8 of them lesion: 208 organ
    probs = torch.zeros(3, 10, 10, 10)
    probs[0] = 1.0
    probs[:, reference == 1] = torch.tensor([0.05, 0.9, 0.05])[:, None]
    probs[:, reference == 2] = torch.tensor([0.0, 0.7, 0.3])[:, None]
    return probs, reference


def test_class_scale_lowers_the_bar_of_an_under_called_class_by_hand():
    probs, reference = _under_called_lesion()
    learned = learn_class_scales([probs], [reference])
    # x2 leaves 0.6 < 0.7; x3 gives 0.9 > 0.7, the smallest scale that recovers the lesion (x4 ... tie: the smaller);
    # the organ keeps 1 (any scale of it takes the lesion back: 0.7 x 1.5 > 0.9)
    assert learned["scales"] == [1.0, 1.0, 3.0]
    # plain argmax: organ predicted on all 216 voxels of 208 (Dice 2 * 208 / 424), lesion missed (0)
    assert learned["dice_before"] == pytest.approx((2 * 208 / 424 + 0.0) / 2, abs=1e-6)
    assert learned["dice_after"] == pytest.approx(1.0)
    assert describe({"classes": {}, "class_scales": learned["scales"], "scale_dice": [0.49, 1.0]}) == (
        "class probabilities x 3 (class 2) before the argmax (mean validation Dice 0.490 -> 1.000)"
    )


def test_class_scale_stays_one_below_the_gain_it_must_bring():
    probs, reference = _under_called_lesion()
    assert learn_class_scales([probs], [reference], min_gain=0.6)["scales"] == [1.0, 1.0, 1.0]  # gain 0.509
    assert learn_class_scales([probs], [reference], min_gain=0.5)["scales"] == [1.0, 1.0, 3.0]


def test_scale_classes_multiplies_along_the_class_axis_and_checks_the_count():
    import torch

    probs = torch.tensor([[0.6, 0.2], [0.4, 0.8]])  # (C=2, 2 voxels)
    assert torch.equal(scale_classes(probs, [1.0, 2.0]), torch.tensor([[0.6, 0.2], [0.8, 1.6]]))
    assert scale_classes(probs, None) is probs and scale_classes(probs, [1.0, 1.0]) is probs
    with pytest.raises(ValueError, match="3 class scales for 2 classes"):
        scale_classes(probs, [1.0, 1.0, 2.0])


def test_training_stores_the_rules_and_infer_and_rank_apply_them(make_cohort, tmp_path):
    import torch

    from medeman.checkpoint import read_teacher_file, update_teacher_extra
    from medeman.config import load_config
    from medeman.data.readers import read_volume
    from medeman.infer import infer_cases
    from medeman.rank import rank_cases
    from medeman.train import fit

    root = make_cohort(3, 1)
    run = tmp_path / "run"
    fit(load_config(sets=TINY), root / "labeled", out_dir=run, progress_bar=False, logger=False)
    learned = read_teacher_file(run)["extra"]["postprocessing"]
    assert set(learned["classes"]) == {"1", "2"}
    assert len(learned["class_scales"]) == 3 and learned["class_scales"][0] == 1.0
    assert learned["scale_dice"][1] >= learned["scale_dice"][0]
    # a finished run learns them again (on the folder given as validation) into its teacher.pt, network untouched
    from medeman.train import relearn_postprocessing

    update_teacher_extra(run / "teacher.pt", postprocessing=None)
    weights = read_teacher_file(run)["state_dict"]
    relearned = relearn_postprocessing(run, root / "labeled", root / "labeled")
    assert set(relearned["classes"]) == {"1", "2"} and len(relearned["class_scales"]) == 3
    assert read_teacher_file(run)["extra"]["postprocessing"] == relearned
    assert all(torch.equal(v, read_teacher_file(run)["state_dict"][k]) for k, v in weights.items())
    assert all(r["dice_after"] >= r["dice_before"] for r in learned["classes"].values())
    # a rule that drops both classes shows that infer applies it
    drop_all = {
        "classes": {
            c: {"min_volume_mm3": 0.0, "keep_largest": 0, "drop": True, "dice_before": 0.0, "dice_after": 0.0}
            for c in ("1", "2")
        }
    }
    update_teacher_extra(run / "teacher.pt", postprocessing=drop_all)
    assert torch.load(run / "teacher.pt", weights_only=True)["extra"]["postprocessing"] == drop_all
    # a network that says class 1 everywhere: the raw mask is all 1, the post-processed one all background
    payload = read_teacher_file(run)
    for name, value in payload["state_dict"].items():
        if value.is_floating_point():
            value.zero_()
    bias = [n for n in payload["state_dict"] if n.endswith("bias")][-1]
    payload["state_dict"][bias][1] = 5.0
    torch.save(payload, run / "teacher.pt")
    infer_cases(run, root / "unlabeled", tmp_path / "raw", postprocess=False, progress=False)
    infer_cases(run, root / "unlabeled", tmp_path / "clean", progress=False)
    assert (read_volume(tmp_path / "raw" / "scan0.nii.gz")[0] == 1).all()
    assert (read_volume(tmp_path / "clean" / "scan0.nii.gz")[0] == 0).all()
    rows, _ = rank_cases(run, root / "unlabeled", None, strategy="random", progress=False)
    assert rows[0]["volume_ml_c1"] == 0.0  # rank scores the post-processed mask
    # and the demo's segment_and_score writes (and scores) exactly the masks medeman infer writes
    from medeman.score_run import segment_and_score

    segment_and_score(run, root / "unlabeled", None, tmp_path / "demo", progress=False)
    assert (read_volume(tmp_path / "demo" / "scan0.nii.gz")[0] == 0).all()
    # class scales alone: class 2 (softmax ~e^-5 of class 1's) x 1000 wins everywhere, with and without probabilities
    payload["extra"]["postprocessing"] = {"classes": {}, "class_scales": [1.0, 1.0, 1000.0], "scale_dice": [0.0, 0.0]}
    torch.save(payload, run / "teacher.pt")
    infer_cases(run, root / "unlabeled", tmp_path / "scaled", progress=False)
    infer_cases(run, root / "unlabeled", tmp_path / "scaled_probs", probabilities=True, progress=False)
    assert (read_volume(tmp_path / "scaled" / "scan0.nii.gz")[0] == 2).all()
    assert (read_volume(tmp_path / "scaled_probs" / "scan0.nii.gz")[0] == 2).all()
    probs = read_volume(tmp_path / "scaled_probs" / "scan0_probs.nii.gz")[0]
    assert (probs[..., 1] > probs[..., 2]).all()  # the written probabilities are the network's, unscaled
    rows, _ = rank_cases(run, root / "unlabeled", None, strategy="random", progress=False)
    assert rows[0]["volume_ml_c1"] == 0.0 and rows[0]["volume_ml_c2"] > 0


def test_evaluate_reports_before_and_after_a_models_post_processing(tmp_path, volume_writer, capsys):
    import torch

    from medeman.evaluate import main as evaluate_main

    reference = _box((18, 18, 18), (CUBE, 1))
    prediction = _box((18, 18, 18), (CUBE, 1), (SPECKLE_A, 1), (SPECKLE_B, 1))
    volume_writer(tmp_path / "labels" / "a.nii.gz", reference)
    volume_writer(tmp_path / "pred" / "a.nii.gz", prediction)
    rules = learn_postprocessing([prediction], [reference], voxel_mm3=[1.0], num_classes=2)
    rules["class_scales"] = [1.0, 2.0]  # scales cannot be applied to masks: a note says the table leaves them out
    torch.save(
        {"format": "medeman-teacher-v1", "config": {}, "step": 0, "state_dict": {}, "extra": {"postprocessing": rules}},
        tmp_path / "teacher.pt",
    )
    assert (
        evaluate_main(
            [
                "--pred",
                str(tmp_path / "pred"),
                "--labels",
                str(tmp_path / "labels"),
                "--postprocessing",
                str(tmp_path / "teacher.pt"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    before, after = out.split("after the post-processing of")
    assert f"{2 * 27 / 57:.3f}" in before and "1.000" in after
    assert "also scales class probabilities before the argmax, which masks cannot show" in after
    assert (
        "drop components < 14.5 mm^3" in after
    )  # midway between the 2-voxel speckle and the 27-voxel cube of 1 mm^3 voxels
