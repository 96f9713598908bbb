"""The planner: a dataset fingerprint (:mod:`medeman.fingerprint`) in, a training recipe out.

The plan is a medeman config overlay (``plan.yaml``) where every key carries the reason it was
chosen. The rules follow nnU-Net v2's experiment planner (Isensee et al. 2021, Nat. Methods
18:203): median spacing with an anisotropy rule, a patch from the median shape shrunk until it
fits the memory, a network as deep as the patch allows, intensity handling by modality, and
batch Dice. medeman adds what its own runs showed: rare or small classes are over-sampled and
weighted, the semi-supervised schedules are scaled to the number of steps, and on a CPU the plan
times a few real training steps of candidate recipes to fit a time budget.

Examples:
    >>> from medeman.fingerprint import fingerprint_cohort
    >>> from medeman.planning import make_plan
    >>> plan = make_plan(fingerprint_cohort("sample_data/labeled")["summary"], device="cpu")
    >>> print(plan.to_yaml())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from medeman.config import SCHEMA, default_config, merge, validate
from medeman.schedules import steady_state_config
from medeman.typed_config import Config, as_config

# nnU-Net's anisotropy rule: an axis whose spacing is over 3x the finest one, and whose extent in
# voxels is under a third of the others', is "low resolution": it is not resampled to the median
ANISOTROPY_RATIO = 3.0
# A class is rare below 1 % of the foreground voxels (the lesion class: 0.07-0.18 % of a scan) ...
RARE_FOREGROUND_FRACTION = 0.01
# ... or when its typical component would fill under 1/1000 of a scan (a 2 cm lesion in a torso)
SMALL_COMPONENT_FRACTION = 0.001
# A rare class lies inside another when this share of its border (the voxels just outside it) is that class: a lesion
# in its organ, which copy-paste may put elsewhere in the organ
HOST_BORDER_FRACTION = 0.5
# what labeled lesion copy-paste measured on the lesion sample cohort, said in the plan's reason
PASTE_GAIN = "0.16 -> 0.32 on the lesion sample cohort, 10/10 seeds (benchmarks/results/lesion_benchmark_paste_3000.md)"
# Smallest structures stay at least this many voxels across when a CPU plan coarsens the spacing
MIN_VOXELS_ACROSS = 4.0
# Bytes of activations per voxel and feature in a training step (forward values kept for backward,
# gradients, BatchNorm buffers): calibrated so that nnU-Net's 3d_fullres reference (a 128^3 patch,
# batch 2, features 32-320 over 6 levels) just fits its ~8 GB budget
BYTES_PER_FEATURE_VOXEL = 22
# Share of a time budget left for the start (cache, workers), validations and the final export
TIME_OVERHEAD = 0.3
# Fewer steps than this and small structures are not learned at all (issue 22: lesion Dice 0.000 at 1000 steps with 32^3 patches)
MIN_STEPS = 1000
DEFAULT_CPU_STEPS = 2000
DEFAULT_GPU_STEPS = 20000
# A planned CT window is never narrower than this (HU), the abdominal soft-tissue window's width (W400). medeman scales
# the window to [0, 1] and its intensity augmentations (noise, brightness, contrast) act in those units, so a narrow
# window shrinks them in HU: nnU-Net's foreground clip (about 150 HU on both sample cohorts) cost the kidneys 0.054
# test Dice on the organ cohort (6/6 seeds) and 0.173 on the lesion cohort (4/4); of 400 and 500 HU, 400 had the
# better validation Dice averaged over the two cohorts (benchmarks/results/plan_ct_window.md)
MIN_CT_WINDOW_HU = 400.0


@dataclass
class Decision:
    """One planned config key, its value and why."""

    section: str
    key: str
    value: Any
    reason: str


@dataclass
class Plan:
    """A planned recipe: the decisions (in order) and the notes that explain the whole."""

    decisions: list[Decision] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def set(self, section: str, key: str, value: Any, reason: str) -> None:
        """Decide ``section.key`` (a later decision of the same key replaces the earlier one)."""
        if key not in SCHEMA[section]:
            raise KeyError(f"{section}.{key} is not a medeman config key")
        self.decisions = [d for d in self.decisions if (d.section, d.key) != (section, key)]
        self.decisions.append(Decision(section, key, value, reason))

    def get(self, section: str, key: str, default: Any = None) -> Any:
        """The planned value of ``section.key``, or ``default`` when the plan leaves it to the schema."""
        for d in self.decisions:
            if (d.section, d.key) == (section, key):
                return d.value
        return default

    def overlay(self) -> dict[str, dict[str, Any]]:
        """The plan as a nested config overlay (for :func:`medeman.config.merge`)."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.decisions:
            out.setdefault(d.section, {})[d.key] = copy.deepcopy(d.value)
        return out

    def config(self) -> dict:
        """The full validated config: schema defaults overlaid by the plan."""
        return validate(merge(default_config(), self.overlay(), where="plan"))

    def to_yaml(self) -> str:
        """``plan.yaml``: a config overlay (loads with ``--config``) with each key's reason as a comment."""
        lines = [
            "# medeman plan: a config overlay derived from the dataset fingerprint (medeman plan / plan-less medeman train)."
        ]
        lines += [f"# {note}" for note in self.notes]
        for section in SCHEMA:
            decided = [d for d in self.decisions if d.section == section]
            if not decided:
                continue
            lines.append(f"{section}:")
            for d in decided:
                value = yaml.safe_dump(d.value, default_flow_style=True, width=1000).strip()
                value = value.removesuffix("...").strip()
                lines.append(f"  {d.key}: {value}  # {d.reason}")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """The decisions as ``section.key = value  (reason)`` lines, for the terminal."""
        return "\n".join(f"  {d.section}.{d.key} = {d.value}  ({d.reason})" for d in self.decisions)


def parse_duration(text: str | float | int) -> float:
    """Seconds of a duration such as ``90``, ``90s``, ``30m``, ``1.5h`` or ``1h30m``."""
    if isinstance(text, (int, float)):
        return float(text)
    raw = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        return float(raw)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", raw)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", raw).strip():
        raise ValueError(f"time budget {text!r}: expected a duration such as 900, 900s, 15m or 1h30m")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"time budget {text!r} must be positive")
    return seconds


def target_spacing(summary: dict[str, Any]) -> tuple[list[float], str]:
    """nnU-Net's target spacing: the median, except for a low-resolution axis (anisotropy rule).

    When one axis' median spacing exceeds ``ANISOTROPY_RATIO`` times the finest and its median
    extent in voxels is under a third of the others', resampling it to the median would blur
    the thin slices of the better scans: its 10th percentile is taken (never finer than the other
    axes). Returns the spacing and the reason.
    """
    median = np.asarray(summary["median_spacing"], dtype=float)
    p10 = np.asarray(summary["spacing_p10"], dtype=float)
    size_vox = np.asarray(summary["median_size_mm"], dtype=float) / median
    worst = int(np.argmax(median))
    others = [i for i in range(3) if i != worst]
    spacing = median.copy()
    aniso_spacing = median[worst] > ANISOTROPY_RATIO * median[others].min()
    aniso_voxels = size_vox[worst] * ANISOTROPY_RATIO < size_vox[others].min()
    if aniso_spacing and aniso_voxels:
        spacing[worst] = max(float(p10[worst]), float(median[others].max()) + 1e-5)
        reason = (
            f"median spacing, but axis {'xyz'[worst]} is anisotropic ({median[worst]:.2f} mm > {ANISOTROPY_RATIO:g} x "
            f"{median[others].min():.2f} mm and {size_vox[worst]:.0f} voxels < a third of the others): its 10th percentile (nnU-Net)"
        )
    else:
        reason = "median spacing of the cohort (nnU-Net)"
    return [round(float(s), 3) for s in spacing], reason


def rare_classes(summary: dict[str, Any]) -> dict[int, str]:
    """Classes to over-sample: under 1 % of the foreground voxels, or components under 1/1000 of a scan."""
    scan_mm3 = float(np.prod(summary["median_size_mm"]))
    rare = {}
    for name, stats in summary["classes"].items():
        component = stats["component_volume_mm3"]["median"]
        if stats["foreground_fraction"] < RARE_FOREGROUND_FRACTION:
            rare[int(name)] = f"{100 * stats['foreground_fraction']:.2f} % of the foreground voxels"
        elif 0 < component < SMALL_COMPONENT_FRACTION * scan_mm3:
            rare[int(name)] = (
                f"median component {component:.0f} mm^3, under 1/{1 / SMALL_COMPONENT_FRACTION:.0f} of a scan"
            )
    return rare


def lesion_hosts(summary: dict[str, Any], rare: dict[int, str]) -> dict[int, int]:
    """The rare classes that lie inside one foreground class, and that class: ``{lesion: host}``.

    A class lies inside another when at least :data:`HOST_BORDER_FRACTION` of its border voxels
    (``border_fraction`` of the fingerprint) belong to it; a class bordering mostly background or
    several classes has no host.
    """
    hosts = {}
    for c in sorted(rare):
        border = summary["classes"].get(str(c), {}).get("border_fraction", [])
        if len(border) > 1:
            host = int(np.argmax(border[1:])) + 1
            if host != c and border[host] >= HOST_BORDER_FRACTION:
                hosts[c] = host
    return hosts


def smallest_structure_mm(summary: dict[str, Any]) -> float:
    """Diameter (mm) of a sphere as large as the 5th-percentile component of the smallest class."""
    volumes = [
        s["component_volume_mm3"]["p05"] for s in summary["classes"].values() if s["component_volume_mm3"]["p05"] > 0
    ]
    if not volumes:
        return math.inf
    return float((6.0 * min(volumes) / math.pi) ** (1.0 / 3.0))


def unet_levels(patch: Sequence[int], max_levels: int) -> int:
    """Resolution levels of a UNet on ``patch``: halve until the smallest side is 4 voxels (nnU-Net), 3 at least."""
    return int(max(3, min(max_levels, 1 + math.floor(math.log2(max(min(patch), 4) / 4)))))


def fit_patch(shape_vox: Sequence[float], max_voxels: float, divisor: int, min_side: int = 16) -> list[int]:
    """A patch of at most ``max_voxels``, as close to the median shape as that allows (nnU-Net's rule).

    Starts from the median shape (each side rounded to the nearest multiple of ``divisor``) and shortens, one ``divisor``
    at a time, the side that is longest relative to the median shape until it fits.
    """
    shape = np.maximum(np.asarray(shape_vox, dtype=float), 1.0)
    patch = [max(min_side, int(round(s / divisor)) * divisor) for s in shape]
    while np.prod(patch) > max_voxels:
        ratios = [p / s if p - divisor >= min_side else -1.0 for p, s in zip(patch, shape)]
        axis = int(np.argmax(ratios))
        if ratios[axis] < 0:
            break
        patch[axis] -= divisor
    return patch


def activation_gb(patch: Sequence[int], channels: Sequence[int], batch: int) -> float:
    """Estimated training memory (GB) of a UNet step: sum over levels of voxels x features x bytes, encoder and decoder."""
    voxels = float(np.prod(patch))
    per_voxel = sum(c / 8.0**level for level, c in enumerate(channels)) * 2
    return batch * voxels * per_voxel * BYTES_PER_FEATURE_VOXEL / 1e9


def unet_channels(levels: int, base: int, cap: int) -> list[int]:
    return [min(cap, base * 2**level) for level in range(levels)]


@dataclass
class Recipe:
    """A candidate network and patch for the time-budget search."""

    patch: list[int]
    channels: list[int]
    num_res_units: int


StepTimer = Callable[[dict], float]


def time_training_steps(cfg: Config | dict, steps: int = 5, device: str = "cpu", warmup: int = 2) -> float:
    """Median seconds of one real training step of ``cfg``'s method, network and patch on random data.

    Builds the LightningModule as training does and runs the method's loss, the backward pass, the
    optimizer step and the teacher update, after ``warmup`` untimed steps (with one, the timed steps
    still came out 25 % slower than the run's: allocator and oneDNN warm-up). The steps are the run's
    steady state (:func:`medeman.schedules.steady_state_config`: the unsupervised losses at full weight), not its supervised
    warm-up, which skips the unlabeled passes: on the sample cohort's planned mean-teacher recipe (2 threads)
    the warm-up step timed 0.057 s, the steady-state step 0.127 s and the run's mean step was 0.137 s, so a
    3-minute budget ran 5 minutes. Data loading is not included: the plan leaves :data:`TIME_OVERHEAD` of the budget for
    it, validation and the start.
    """
    import torch

    from medeman.module import SSLSegModule

    cfg = as_config(steady_state_config(cfg))
    torch.manual_seed(0)
    module = SSLSegModule(cfg).to(device)
    module.student.train()
    optimizer = module.configure_optimizers()["optimizer"]
    data = cfg.data
    patch = [int(s) for s in data.patch_size]
    n_lab, n_unl, channels = data.batch_size_labeled, data.batch_size_unlabeled, data.in_channels
    label = torch.randint(0, data.num_classes, (n_lab, 1, *patch), device=device).float()
    batch: dict[str, Any] = {"labeled": {"image": torch.randn(n_lab, channels, *patch, device=device), "label": label}}
    if module.method.uses_unlabeled:
        weak = torch.randn(n_unl, channels, *patch, device=device)
        batch["unlabeled"] = {"weak": weak, "strong": weak + 0.1 * torch.randn_like(weak)}
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        loss, _ = module.method.training_loss(module, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.method.after_optimizer_step(module)
        if device != "cpu":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def make_plan(
    summary: dict[str, Any],
    *,
    device: str = "cpu",
    memory_gb: float | None = None,
    time_budget_s: float | None = None,
    has_unlabeled: bool | None = None,
    step_timer: StepTimer | None = None,
) -> Plan:
    """Plan a training recipe from a fingerprint summary (:func:`medeman.fingerprint.summarize`).

    Args:
        summary: the fingerprint's ``summary``.
        device: ``"cpu"`` or ``"gpu"``: a GPU plan follows nnU-Net's sizes; a CPU plan coarsens the
            spacing (never below :data:`MIN_VOXELS_ACROSS` voxels across the smallest structures)
            and picks a smaller network and patch.
        memory_gb: memory for the activations of one step (GPU: default 8, nnU-Net's reference;
            CPU: default 4).
        time_budget_s: with it, the plan times candidate recipes (``step_timer``) and picks the
            largest that still gets :data:`MIN_STEPS` steps, and the steps that fill the budget.
        has_unlabeled: whether unlabeled scans are given (default: the fingerprint has some).
        step_timer: seconds per step of a full config (default :func:`time_training_steps`).

    Returns:
        The :class:`Plan`; ``plan.config()`` is the validated config.
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device {device!r}: expected cpu or gpu")
    plan = Plan()
    gpu = device == "gpu"
    memory = float(memory_gb if memory_gb is not None else (8.0 if gpu else 4.0))
    unlabeled = summary["num_unlabeled"] > 0 if has_unlabeled is None else has_unlabeled
    num_classes = int(summary["num_classes"])
    plan.notes.append(
        f"fingerprint: {summary['num_labeled']} labeled, {summary['num_unlabeled']} unlabeled scans; "
        f"median spacing {_mm(summary['median_spacing'])} mm, median shape {summary['median_shape']}, "
        f"modality guess {summary['modality_guess']}; planned for {device}, {memory:g} GB"
        + (f", time budget {time_budget_s:.0f} s" if time_budget_s else "")
    )

    # ---- spacing
    spacing, reason = target_spacing(summary)
    rare = rare_classes(summary)
    if not gpu:
        size_mm = np.asarray(summary["median_size_mm"], dtype=float)
        # a CPU trains ~50x slower: a coarser grid gives each patch the context a GPU patch has
        # (the median scan about 64^3 voxels), but the smallest structures stay MIN_VOXELS_ACROSS voxels across
        coarse = float((np.prod(size_mm / spacing) / 64.0**3) ** (1.0 / 3.0))
        finest_allowed = smallest_structure_mm(summary) / MIN_VOXELS_ACROSS
        factor = max(1.0, min(coarse, finest_allowed / min(spacing)))
        if factor > 1.0:
            if max(spacing) > ANISOTROPY_RATIO * min(
                spacing
            ):  # thick slices stay: only the fine axes are coarsened, up to them
                spacing = [round(min(s * factor, max(s, max(spacing))), 2) for s in spacing]
            else:
                spacing = [round(s * factor, 2) for s in spacing]
            reason += (
                f", coarsened x{factor:.2f} for a CPU: the median scan becomes ~{np.prod(size_mm / spacing) ** (1 / 3):.0f}^3 voxels"
                + (
                    f"; no coarser, so a {smallest_structure_mm(summary):.1f} mm structure stays {MIN_VOXELS_ACROSS:g} voxels across"
                    if factor < coarse
                    else ""
                )
            )
    plan.set("data", "spacing", spacing, reason)
    shape_vox = np.asarray(summary["median_size_mm"], dtype=float) / np.asarray(spacing)

    # ---- patch and network
    max_levels = 6 if gpu else 5
    base, cap = (32, 320) if gpu else (16, 128)
    batch = 2  # nnU-Net's minimum; BatchNorm statistics need more than one sample

    def recipe_for(max_voxels: float, base_features: int, feature_cap: int) -> Recipe:
        patch = fit_patch(shape_vox, max_voxels, divisor=8)  # 8: three halvings, as nnU-Net's patches
        levels = unet_levels(patch, max_levels)
        divisor = 2 ** (levels - 1)
        patch = [max(divisor * 2, int(math.ceil(p / divisor) * divisor)) for p in patch]
        return Recipe(patch, unet_channels(levels, base_features, feature_cap), 2 if gpu else 1)

    # the largest patch whose activations fit the memory (nnU-Net shrinks from the median shape)
    # patches whose activations a step keeps: the student's labeled (and strong-view) patches; the
    # teacher's weak views run without gradients, counted as half
    per_batch = batch * 2.5 if unlabeled else batch
    max_voxels = float(np.prod(np.ceil(shape_vox / 16) * 16))
    recipe = recipe_for(max_voxels, base, cap)
    while activation_gb(recipe.patch, recipe.channels, per_batch) > memory and max_voxels > 16**3:
        max_voxels *= 0.8
        recipe = recipe_for(max_voxels, base, cap)
    memory_reason = f"{activation_gb(recipe.patch, recipe.channels, per_batch):.1f} GB of activations estimated, within {memory:g} GB"
    candidates = [recipe]
    if not gpu:  # smaller recipes for the time budget: 64^3, 48^3 and 32^3-voxel patches, then half the features
        for voxels, feats in ((64.0**3, base), (48.0**3, base), (32.0**3, base), (32.0**3, base // 2)):
            if voxels < max_voxels or feats < base:
                candidates.append(recipe_for(min(voxels, max_voxels), feats, cap * feats // base))
        if time_budget_s is None:  # no budget to time against: at most 48^3 voxels (the sample configs' measured scale)
            candidates = [recipe_for(min(48.0**3, max_voxels), base, cap)]

    steps_reason = ""
    if time_budget_s is not None:
        timer = step_timer or (lambda c: time_training_steps(c, device="cuda" if gpu else "cpu"))
        usable = time_budget_s * (1.0 - TIME_OVERHEAD)
        chosen, timed = None, []
        for cand in candidates:
            trial = _candidate_config(plan, cand, num_classes, summary, unlabeled, batch, gpu)
            seconds = timer(trial)
            steps = int(usable / max(seconds, 1e-6))
            timed.append(f"{cand.patch} x {cand.channels}: {seconds:.3f} s/step -> {steps} steps")
            if steps >= MIN_STEPS or cand is candidates[-1]:
                chosen = (cand, steps, seconds)
                break
        recipe, steps, seconds = chosen
        plan.notes.append("timed candidates (largest first): " + "; ".join(timed))
        steps = max(steps, 1)
        steps_reason = (
            f"{seconds:.3f} s per timed step fills {1 - TIME_OVERHEAD:.0%} of the {time_budget_s:.0f} s budget "
            f"(the rest: caching, validations, export)"
        )
        size_reason = f"the largest candidate that gets {MIN_STEPS} steps in the time budget"
    else:
        recipe = candidates[0]
        steps = DEFAULT_GPU_STEPS if gpu else DEFAULT_CPU_STEPS
        steps_reason = "no --time-budget: " + (
            "the schema's GPU default" if gpu else "a CPU run of tens of minutes at this size"
        )
        size_reason = memory_reason if gpu else "the 48^3-voxel CPU recipe (no --time-budget to time against)"
    plan.set(
        "data",
        "patch_size",
        recipe.patch,
        f"median shape {np.round(shape_vox).astype(int).tolist()} voxels at this spacing, shrunk to fit: {size_reason}",
    )
    plan.set(
        "model",
        "name",
        "unet",
        "MONAI UNet with BatchNorm: EMAN averages BatchNorm statistics (nnU-Net uses InstanceNorm)",
    )
    plan.set(
        "model",
        "channels",
        recipe.channels,
        f"{len(recipe.channels)} levels: the patch halved down to >= 4 voxels at the bottleneck (nnU-Net); {recipe.channels[0]} features doubling per level, capped at {cap}",
    )
    plan.set(
        "model",
        "num_res_units",
        recipe.num_res_units,
        "two residual units per block on a GPU, one on a CPU (half the step time)",
    )
    _common(plan, summary, unlabeled, batch, num_classes, rare, gpu)
    plan.set("train", "max_steps", steps, steps_reason)
    _schedules(plan, steps, unlabeled, rare)
    return plan


def _candidate_config(
    plan: Plan, recipe: Recipe, num_classes: int, summary: dict, unlabeled: bool, batch: int, gpu: bool
) -> dict:
    trial = Plan(list(plan.decisions))
    trial.set("data", "patch_size", recipe.patch, "")
    trial.set("model", "channels", recipe.channels, "")
    trial.set("model", "num_res_units", recipe.num_res_units, "")
    _common(trial, summary, unlabeled, batch, num_classes, rare_classes(summary), gpu)
    return trial.config()


def ct_window(p00_5: float, p99_5: float, min_width: float = MIN_CT_WINDOW_HU) -> tuple[list[float], str]:
    """The planned CT window: the foreground's 0.5-99.5 percentiles (nnU-Net's CT clip), widened about their centre to
    ``min_width`` HU where narrower; and the plan's reason for it.

    Examples:
        >>> ct_window(-5.0, 144.0)[0]  # 149 HU wide: widened about 69.5 HU
        [-130.5, 269.5]
        >>> ct_window(-300.0, 500.0)[0]
        [-300.0, 500.0]
    """
    low, high = float(p00_5), float(p99_5)
    reason = (
        f"foreground 0.5-99.5 percentiles [{low:.1f}, {high:.1f}] (nnU-Net's CT clip), scaled to [0, 1]: an affine map "
        "of nnU-Net's z-score that the first convolution and BatchNorm absorb"
    )
    if high - low >= min_width:
        return [round(low, 1), round(high, 1)], reason
    centre = (low + high) / 2
    window = [round(centre - min_width / 2, 1), round(centre + min_width / 2, 1)]
    return window, (
        f"{reason}, widened about their centre to {min_width:.0f} HU: the intensity augmentations act in window units, "
        "and a narrower window shrinks them in HU (benchmarks/results/plan_ct_window.md)"
    )


def _common(
    plan: Plan, summary: dict, unlabeled: bool, batch: int, num_classes: int, rare: dict[int, str], gpu: bool
) -> None:
    """The decisions that do not depend on the recipe's size: classes, intensities, batches, sampling, method."""
    plan.set("data", "num_classes", num_classes, f"label values 0..{num_classes - 1} found in the labeled cases")
    intensity = summary["intensity"]
    if summary["modality_guess"] == "CT":
        window, reason = ct_window(intensity["p00_5"], intensity["p99_5"])
        plan.set("data", "modality", "CT", f"intensities in Hounsfield units (minimum {intensity['min']:.0f})")
        plan.set("data", "intensity_window", window, reason)
    else:
        plan.set(
            "data",
            "modality",
            "MR",
            "no Hounsfield units: each scan z-scored on its own foreground (nnU-Net's MR rule)",
        )
    plan.set(
        "data",
        "batch_size_labeled",
        batch,
        "2 labeled patches per step: nnU-Net's minimum, and BatchNorm needs more than one",
    )
    if unlabeled:
        plan.set("data", "batch_size_unlabeled", batch, "as many unlabeled as labeled patches")
    if not gpu:
        plan.set("data", "num_workers", 1, "one loader worker: on a CPU every other core trains")
    if rare:
        ratios = [1] * num_classes
        for c in rare:
            ratios[c] = 3
        listed = "; ".join(f"class {c}: {why}" for c, why in sorted(rare.items()))
        plan.set(
            "data",
            "class_ratios",
            ratios,
            f"rare classes ({listed}) centre 3 times as many patches (configs/lesion.yaml)",
        )
        weights = [1] * num_classes
        for c in rare:
            weights[c] = 10
        plan.set(
            "train",
            "ce_class_weights",
            weights,
            "rare classes weigh 10 in the cross-entropy (configs/lesion.yaml: a lesion unlearned after 600 steps without it)",
        )
        hosts = lesion_hosts(summary, rare)
        if hosts:
            inside = "; ".join(
                f"class {c} inside class {h} ({100 * summary['classes'][str(c)]['border_fraction'][h]:.0f} % of its border)"
                for c, h in hosts.items()
            )
            plan.set("data", "lesion_classes", sorted(hosts), f"rare classes inside an organ ({inside}): lesions")
            plan.set("data", "lesion_host_classes", sorted(set(hosts.values())), "the organs they lie in")
            plan.set(
                "data",
                "labeled_lesion_paste",
                0.5,
                "half the labeled patches get a lesion of their batch pasted into its organ: supervised lesion Dice "
                + PASTE_GAIN,
            )
    else:
        plan.set(
            "data",
            "class_ratios",
            None,
            "no rare class: the nnU-Net rule (data.fg_class_fraction of the patches on a foreground class)",
        )
    plan.set(
        "train",
        "batch_dice",
        True,
        "Dice over the whole batch (nnU-Net): a patch without a class does not dilute it"
        + (" - needed for the rare classes" if rare else ""),
    )
    method = "mean_teacher" if unlabeled else "supervised"
    plan.set(
        "ssl",
        "method",
        method,
        "unlabeled scans given: mean teacher with an EMAN teacher" if unlabeled else "no unlabeled scans: supervised",
    )
    if not gpu:
        plan.set("train", "lr", 0.003, "short CPU runs: the sample and lesion recipes' measured learning rate")
        plan.set(
            "infer",
            "overlap",
            0.25,
            "sliding-window overlap 0.25 on a CPU: validation and inference in half the time of 0.5",
        )


def _schedules(plan: Plan, steps: int, unlabeled: bool, rare: dict[int, str]) -> None:
    """Step-based keys scaled to the run (the lesion recipe's proportions)."""
    # warm-up, ramp-up and the EMA windows are the schema's fractions of train.max_steps (medeman.schedules): not set here
    plan.set(
        "train",
        "val_every_steps",
        max(1, steps // 5),
        "5 validations a run (the deployed teacher is the final-step one)",
    )
    if unlabeled:
        if rare:
            plan.set(
                "data",
                "unlabeled_focus_fraction",
                0.5,
                "half the unlabeled patches centred where the teacher sees a rare class",
            )
            plan.set("data", "unlabeled_focus_classes", sorted(rare), "the rare classes")
            plan.set(
                "data",
                "unlabeled_focus_every_fraction",
                0.25,
                "the teacher's rare-class map refreshed every quarter of the run",
            )


def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.2f}" for v in values)
