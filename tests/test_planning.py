"""Plan decisions on hand-made fingerprints: isotropic CT, anisotropic MR, tiny lesions; the time budget; plan.yaml."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medeman.config import load_config
from medeman.planning import (
    MIN_STEPS,
    TIME_OVERHEAD,
    ct_window,
    fit_patch,
    make_plan,
    parse_duration,
    rare_classes,
    target_spacing,
    unet_levels,
)


def summary(spacing, shape, *, p10=None, modality="CT", classes=None, unlabeled=0) -> dict:
    """A fingerprint summary as medeman.fingerprint.summarize makes it."""
    classes = classes or {"1": (0.8, 50_000.0, 40_000.0), "2": (0.2, 8_000.0, 6_000.0)}
    return {
        "num_labeled": 10,
        "num_unlabeled": unlabeled,
        "num_classes": len(classes) + 1,
        "median_spacing": list(spacing),
        "spacing_p10": list(p10 or spacing),
        "median_shape": list(shape),
        "median_size_mm": [s * n for s, n in zip(spacing, shape)],
        "orientations": ["RAS"],
        "intensity": {
            "p00_5": -80.0,
            "p99_5": 240.0,
            "mean": 90.0,
            "std": 40.0,
            "min": -1024.0 if modality == "CT" else 0.0,
        },
        "modality_guess": modality,
        "classes": {
            name: {
                "foreground_fraction": frac,
                "volume_fraction": frac / 10,
                "cases_with_class": 10,
                "components_per_case": [1] * 10,
                "component_volume_mm3": {"min": p05, "p05": p05, "median": median, "max": median},
            }
            for name, (frac, median, p05) in classes.items()
        },
    }


ISOTROPIC_CT = summary([1.0, 1.0, 1.0], [160, 160, 160])
ANISOTROPIC_MR = summary([0.7, 0.7, 5.0], [320, 320, 24], p10=[0.6, 0.6, 4.0], modality="MR")
TINY_LESIONS = summary(
    [1.0, 1.0, 1.0], [200, 200, 200], classes={"1": (0.99, 900_000.0, 800_000.0), "2": (0.004, 300.0, 100.0)}
)


@pytest.mark.parametrize(
    "fp, expected",
    [
        (ISOTROPIC_CT, [1.0, 1.0, 1.0]),
        # z: 5.0 > 3 x 0.7 and 24 slices x 3 < 320: its 10th percentile, 4.0 mm, not the median (nnU-Net)
        (ANISOTROPIC_MR, [0.7, 0.7, 4.0]),
        # 3.0 > 3 x 0.9 but 100 slices x 3 > 80 voxels: not low resolution, the median stays
        (summary([0.9, 0.9, 3.0], [80, 80, 100]), [0.9, 0.9, 3.0]),
        # the 10th percentile finer than the other axes: just above them
        (summary([1.0, 1.0, 4.0], [300, 300, 30], p10=[1.0, 1.0, 0.8]), [1.0, 1.0, 1.0]),
    ],
)
def test_target_spacing_is_the_median_except_on_an_anisotropic_axis(fp, expected):
    assert target_spacing(fp)[0] == pytest.approx(expected, abs=1e-3)


def test_isotropic_ct_plan_on_a_gpu():
    plan = make_plan(ISOTROPIC_CT, device="gpu", memory_gb=8)
    assert plan.get("data", "spacing") == [1.0, 1.0, 1.0]
    assert plan.get("data", "modality") == "CT"
    # the foreground percentiles -80..240 (320 HU) widened about their centre, 80 HU, to 400 HU
    assert plan.get("data", "intensity_window") == [-120.0, 280.0]
    patch, channels = plan.get("data", "patch_size"), plan.get("model", "channels")
    assert patch == [128, 128, 128]  # shrunk from 160^3 to fit 8 GB, evenly (an isotropic median shape)
    assert len(channels) == unet_levels(patch, 6) == 6 and channels[0] == 32 and max(channels) == 320
    assert plan.get("data", "class_ratios") is None and plan.get("train", "ce_class_weights") is None
    assert plan.get("ssl", "method") == "supervised" and plan.get("train", "max_steps") == 20000


@pytest.mark.parametrize(
    "p00_5, p99_5, width, expected",
    [
        (-5.0, 144.0, 500.0, [-180.5, 319.5]),  # the organ cohort's 149 HU: centre 69.5 +- 250
        (-5.0, 144.0, None, [-130.5, 269.5]),  # the planner's width, 400 HU
        (-300.0, 500.0, 400.0, [-300.0, 500.0]),  # wide enough: nnU-Net's clip as it is
        (0.0, 400.0, 400.0, [0.0, 400.0]),  # exactly the width
        (10.0, 20.0, 100.0, [-35.0, 65.0]),
    ],
)
def test_ct_window_is_the_foreground_clip_widened_about_its_centre(p00_5, p99_5, width, expected):
    window, reason = ct_window(p00_5, p99_5) if width is None else ct_window(p00_5, p99_5, width)
    assert window == expected
    assert f"[{p00_5:.1f}, {p99_5:.1f}]" in reason
    assert ("widened about their centre" in reason) == (p99_5 - p00_5 < (width or 400.0))


def test_anisotropic_mr_plan_keeps_thick_slices_and_a_flat_patch():
    plan = make_plan(ANISOTROPIC_MR, device="gpu", memory_gb=8)
    assert plan.get("data", "modality") == "MR" and plan.get("data", "intensity_window") is None
    assert plan.get("data", "spacing") == pytest.approx([0.7, 0.7, 4.0], abs=1e-3)
    x, y, z = plan.get("data", "patch_size")
    assert (
        abs(x - y) <= 8 and x > 2 * z
    )  # the patch follows the median shape (320 x 320 x 30 voxels), shrunk 8 at a time
    assert z >= 2 ** (len(plan.get("model", "channels")) - 1)  # the isotropic UNet can still halve z to the bottleneck
    cpu = make_plan(ANISOTROPIC_MR, device="cpu").get("data", "spacing")
    assert cpu[2] == pytest.approx(4.0, abs=1e-3) and 0.7 < cpu[0] == cpu[1] < 4.0  # a CPU coarsens the fine axes only


def test_tiny_lesions_are_oversampled_and_keep_their_resolution_on_a_cpu():
    assert set(rare_classes(TINY_LESIONS)) == {2}
    plan = make_plan(TINY_LESIONS, device="cpu")
    assert plan.get("data", "class_ratios") == [1, 1, 3]
    assert plan.get("train", "ce_class_weights") == [1, 1, 10]
    assert plan.get("train", "batch_dice") is True
    # a 200 mm scan would be coarsened to ~64^3 voxels (3.1 mm), but the 100 mm^3 lesions (5.8 mm across) stay 4 voxels across
    diameter = (6 * 100.0 / math.pi) ** (1 / 3)
    assert plan.get("data", "spacing") == pytest.approx([diameter / 4] * 3, abs=0.01)
    assert "class 2" in plan.to_yaml()


@pytest.mark.parametrize(
    "border, pasted",
    [
        ([0.1, 0.9, 0.0], True),  # the lesion lies in class 1: copy-paste into class 1
        ([0.6, 0.4, 0.0], False),  # mostly background around it: no organ to paste into
    ],
)
def test_rare_classes_inside_an_organ_are_lesions_pasted_into_it(border, pasted):
    fp = summary(
        [1.0, 1.0, 1.0], [200, 200, 200], classes={"1": (0.99, 900_000.0, 800_000.0), "2": (0.004, 300.0, 100.0)}
    )
    fp["classes"]["2"]["border_fraction"] = border
    plan = make_plan(fp, device="cpu")
    if pasted:
        assert plan.get("data", "lesion_classes") == [2] and plan.get("data", "lesion_host_classes") == [1]
        assert plan.get("data", "labeled_lesion_paste") == 0.5
        assert "class 2 inside class 1 (90 % of its border)" in plan.to_yaml()
        assert plan.config()["data"]["lesion_host_classes"] == [1]  # a valid config
    else:
        assert plan.get("data", "lesion_classes") is None and plan.get("data", "labeled_lesion_paste") is None
    assert plan.get("data", "class_ratios") == [1, 1, 3]  # rare either way


def test_cpu_plan_coarsens_large_organs_to_about_64_voxels():
    plan = make_plan(ISOTROPIC_CT, device="cpu")
    assert plan.get("data", "spacing") == pytest.approx([2.5] * 3)  # 160 mm / 64 voxels
    assert np.prod(plan.get("data", "patch_size")) <= 64**3


def test_unlabeled_scans_make_a_mean_teacher_with_schedules_scaled_to_the_steps():
    plan = make_plan(TINY_LESIONS, device="cpu", has_unlabeled=True)
    steps = plan.get("train", "max_steps")
    assert plan.get("ssl", "method") == "mean_teacher"
    assert plan.get("ssl", "rampup_steps") is None  # left to the schema's fraction of the run (medeman.schedules)
    assert plan.get("train", "val_every_steps") == steps // 5
    assert plan.get("data", "unlabeled_focus_classes") == [2]
    assert plan.get("data", "unlabeled_focus_every_fraction") == 0.25  # a quarter of the run, whatever its length
    assert plan.get("data", "unlabeled_focus_every_steps") is None


def test_time_budget_picks_the_largest_candidate_that_gets_enough_steps():
    timed = []

    def timer(cfg):  # 1 microsecond per voxel and feature of the first level
        patch = cfg["data"]["patch_size"]
        timed.append(patch)
        return float(np.prod(patch)) * cfg["model"]["channels"][0] * 1e-6

    budget = 1500.0
    plan = make_plan(ISOTROPIC_CT, device="cpu", time_budget_s=budget, step_timer=timer)
    chosen = plan.get("data", "patch_size")
    seconds = float(np.prod(chosen)) * plan.get("model", "channels")[0] * 1e-6
    assert plan.get("train", "max_steps") == int(budget * (1 - TIME_OVERHEAD) / seconds) >= MIN_STEPS
    assert timed[-1] == chosen and len(timed) >= 2  # larger candidates were timed and refused first
    for refused in timed[:-1]:
        assert int(budget * (1 - TIME_OVERHEAD) / (np.prod(refused) * 16e-6)) < MIN_STEPS


def test_a_budget_too_small_for_every_candidate_takes_the_smallest():
    plan = make_plan(ISOTROPIC_CT, device="cpu", time_budget_s=10.0, step_timer=lambda cfg: 1.0)
    assert plan.get("model", "channels")[0] == 8 and plan.get("train", "max_steps") == 7


@pytest.mark.parametrize("fp", [ISOTROPIC_CT, ANISOTROPIC_MR, TINY_LESIONS])
@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_plan_yaml_loads_as_a_config_and_gives_each_key_a_reason(fp, device, tmp_path):
    plan = make_plan(fp, device=device)
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    assert load_config([path]) == plan.config()
    keys = [line for line in path.read_text().splitlines() if line.startswith("  ")]
    assert len(keys) == len(plan.decisions)
    assert all("  # " in line and len(line.split("  # ", 1)[1]) > 10 for line in keys)


@pytest.mark.parametrize(
    "patch_shape, max_voxels, expected",
    [
        ([100, 100, 100], 1e9, [96, 96, 96]),  # to the nearest multiple of 16
        ([160, 160, 160], 128**3, [128, 128, 128]),
        # all sides equally long relative to the median shape: x, y, then z shrink by 16 in turn (z stops at 16),
        # then x and y down to 224 x 224 x 16 = 802 816 voxels
        ([320, 320, 30], 160 * 160 * 32, [224, 224, 16]),
        ([320, 320, 64], 1e9, [320, 320, 64]),
    ],
)
def test_fit_patch_shrinks_the_side_longest_relative_to_the_median_shape(patch_shape, max_voxels, expected):
    assert fit_patch(patch_shape, max_voxels, divisor=16) == expected


@pytest.mark.parametrize(
    "text, seconds", [("900", 900.0), ("90s", 90.0), ("15m", 900.0), ("1.5h", 5400.0), ("1h30m", 5400.0), (120, 120.0)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "10 minutes", "0m"])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError, match="time budget"):
        parse_duration(text)


@pytest.mark.parametrize(
    "method, teacher_passes", [("supervised", 0), ("mean_teacher", 3), ("fixmatch", 3), ("bcp", 3)]
)
def test_time_training_steps_runs_steady_state_steps_of_the_method(monkeypatch, method, teacher_passes):
    """Every timed step runs the method's whole step, the teacher's pass on the unlabeled patches included (the
    supervised warm-up at step 0 skips it: timing that under-planned the steps of a semi-supervised run)."""
    from medeman.module import SSLSegModule
    from medeman.planning import time_training_steps

    calls = []
    teacher_probs = SSLSegModule.teacher_probs
    monkeypatch.setattr(SSLSegModule, "teacher_probs", lambda self, x: calls.append(x.shape) or teacher_probs(self, x))

    cfg = load_config(
        sets=[
            "model.channels=[4,8]",
            "model.num_res_units=1",
            "data.patch_size=[16,16,16]",
            "data.num_classes=3",
            f"ssl.method={method}",
        ]
    )
    seconds = time_training_steps(cfg, steps=2, warmup=1)
    assert math.isfinite(seconds) and seconds > 0.0  # a duration, whatever the machine
    assert len(calls) == teacher_passes  # 1 untimed + 2 timed steps
    assert cfg["ssl"]["warmup_steps"] is None  # the caller's config is left as it was
