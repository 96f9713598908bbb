"""The configuration schema: one source of truth for every key, its default and its meaning.

A run's configuration is the schema's defaults, overlaid by YAML files (in order) and then by
``--set section.key=value`` overrides. Unknown keys and values outside a key's choices are
errors that name the valid ones, so a typo never silently falls back to a default.

``configs/default.yaml`` is rendered from this schema (:func:`render_yaml`); a test keeps the two
in step.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a float: PyYAML's YAML 1.1 rules need a dot
    (``1.0e-4``) and would hand ``train.lr: 1e-4`` or ``--set train.lr=1e-4`` over as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(stream: Any) -> Any:
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration file or override that medeman cannot use."""


@dataclass(frozen=True)
class Option:
    """One configuration key: its default, a one-line meaning, and the allowed values if fixed."""

    default: Any
    help: str
    choices: tuple | None = None


SCHEMA: dict[str, dict[str, Option]] = {
    "data": {
        "spacing": Option([1.5, 1.5, 1.5], "target voxel spacing in mm (x, y, z) after resampling; null keeps each scan's own"),
        "patch_size": Option([96, 96, 96], "training patch size in voxels (x, y, z); validation and inference use it as the sliding window"),
        "modality": Option("CT", "intensity normalization: CT clips to intensity_window and scales to [0, 1]; MR z-scores each scan on its foreground", ("CT", "MR")),
        "intensity_window": Option([-175.0, 250.0], "CT window in HU [low, high] clipped and scaled to [0, 1] (ignored for MR)"),
        "num_classes": Option(2, "number of classes including background; label values must lie in 0..num_classes-1"),
        "labels": Option(None, "class names by label value, e.g. {1: liver, 2: lesion}, shown by medeman evaluate --classes; null: numbers only"),
        "in_channels": Option(1, "image channels per case (nnU-Net _0000, _0001, ... files grouped into one case)"),
        "val_fraction": Option(0.2, "fraction of labeled cases held out for validation when no --val folder is given"),
        "split_seed": Option(0, "seed of the deterministic train/validation split"),
        "cache": Option("memory", "cache of preprocessed volumes: memory (CacheDataset), disk (PersistentDataset) or none", ("memory", "disk", "none")),
        "cache_dir": Option(None, "folder for the disk cache; null means <run dir>/cache"),
        "batch_size_labeled": Option(2, "labeled patches per training step"),
        "batch_size_unlabeled": Option(2, "unlabeled patches (weak+strong view pairs) per training step"),
        "num_workers": Option(4, "DataLoader worker processes for training batches"),
        "fg_class_fraction": Option(0.33, "class_ratios null (nnU-Net rule): share of labeled patches centred on a voxel of a foreground class drawn uniformly among those present in the scan; the rest are random windows"),
        "class_ratios": Option(None, "null: the fg_class_fraction rule; or one ratio per class, background first (e.g. [1, 1, 4] for a rare class 2), as MONAI RandCropByLabelClassesd: classes absent from a scan get 0, the rest are renormalized"),
        "unlabeled_focus_fraction": Option(0.0, "share of unlabeled patches centred on a voxel the teacher assigns to a rare class (unlabeled_focus_classes); 0 turns it off"),
        "unlabeled_focus_classes": Option(None, "classes the unlabeled focus centres on, e.g. [3]; null: every foreground class, drawn uniformly among those the teacher predicts in the scan"),
        "unlabeled_focus_every_steps": Option(500, "the teacher re-segments the cached unlabeled volumes (sliding window, no overlap) every this many steps to refresh the focus centres"),
        "unlabeled_focus_stride": Option(4, "focus centres are taken on a grid of this stride in voxels (the low-resolution class map kept per scan)"),
        "flip_prob": Option(0.5, "probability of a flip per axis, applied identically to both unlabeled views"),
        "rotate90_prob": Option(0.25, "probability of an axial 90-degree rotation, identical for both views"),
        "affine_prob": Option(0.0, "probability of a small random affine (rotation/scale), identical for both views"),
        "strong_noise_std": Option(0.1, "std of the Gaussian noise of the strong view (normalized intensity units)"),
        "strong_contrast": Option([0.7, 1.5], "gamma range of the strong view's contrast adjustment"),
        "strong_blur_sigma": Option([0.5, 1.0], "sigma range in voxels of the strong view's Gaussian blur"),
        "strong_brightness": Option(0.1, "max absolute intensity shift of the strong view"),
        "strong_prob": Option(0.8, "probability of each strong-view intensity augmentation (contrast, brightness, blur, noise, cut-out)"),
        "strong_cutout": Option(False, "cut out random boxes of the strong view"),
        "unlabeled_from_imagesTs": Option(False, "nnU-Net/MSD layout: use imagesTs as unlabeled scans"),
    },
    "model": {
        "name": Option("unet", "student architecture from MONAI, always built with BatchNorm", ("unet", "basicunet", "vnet", "segresnet", "dynunet")),
        "channels": Option([16, 32, 64, 128, 256], "feature channels per resolution level (UNet, DynUNet; BasicUNet takes 6, SegResNet uses the first as init_filters)"),
        "norm": Option("batch", "normalization layers of the student; EMAN and the bn teacher need batch", ("batch", "instance")),
        "num_res_units": Option(2, "residual units per UNet block"),
        "dropout": Option(0.0, "dropout probability in the student (and hence the teacher)"),
    },
    "ssl": {
        "method": Option("mean_teacher", "supervised (labeled data only, the baseline), supervised_ema (labeled data only, deployed EMA teacher: the weight-averaging control) or mean_teacher", ("supervised", "supervised_ema", "mean_teacher")),
        "teacher_norm": Option("eman", "teacher normalization: eman (EMA'd running statistics, Cai et al. 2021), bn (batch statistics, classic mean teacher) or ema (weight EMA only, for networks without BatchNorm, e.g. model.norm=instance)", ("eman", "bn", "ema")),
        "teacher_bn_recalibration": Option("always", "re-estimate the teacher's BatchNorm statistics from its own forward passes (precise-BN) before each teacher validation and export (always), only for teacher.pt (export), or never (off); pseudo-labels keep the EMA'd statistics", ("off", "export", "always")),
        "recalibration_batches": Option(16, "unlabeled weak-view batches (labeled images without unlabeled scans) used to re-estimate the teacher's BatchNorm statistics"),
        "ema_momentum": Option(0.99, "EMA momentum m of teacher weights (and EMAN statistics): theta' <- m theta' + (1-m) theta; the base of the constant and cosine schedules"),
        "momentum_schedule": Option("window", "EMA momentum over the run: constant (ema_momentum), cosine (BYOL: from ema_momentum to 1 over train.max_steps) or window (m = 1 - 1/(momentum_window * train.max_steps))", ("constant", "cosine", "window")),
        "momentum_window": Option(0.1, "window schedule: the teacher averages over about this fraction of train.max_steps"),
        "momentum_warmup": Option(True, "use min(1 - 1/(step+1), scheduled momentum) so the teacher follows the student early on"),
        "consistency": Option("mse", "consistency loss between student and teacher softmax: mse, kl or none", ("mse", "kl", "none")),
        "consistency_weight": Option(1.0, "weight lambda of the unsupervised losses at the end of the ramp-up"),
        "pseudo_label_threshold": Option(None, "teacher confidence above which a voxel's argmax is a pseudo-label; null turns pseudo-labels off"),
        "pseudo_label_weight": Option(1.0, "weight of the pseudo-label loss relative to the consistency loss"),
        "pseudo_label_dice": Option(False, "add a masked Dice term to the pseudo-label cross-entropy"),
        "pseudo_label_threshold_mode": Option("fixed", "fixed: one threshold (pseudo_label_threshold) for every class; adaptive: per-class thresholds from the teacher's EMA'd confidence (FreeMatch-style, medeman.pseudo_labels), capped by pseudo_label_threshold", ("fixed", "adaptive")),
        "adaptive_threshold_momentum": Option(0.999, "EMA momentum m of the adaptive thresholds' confidence statistics (FreeMatch's lambda); they start at 1/num_classes and follow the teacher over ~1/(1-m) steps: 0.999 for runs of 10k+ steps, about 0.99 for a few hundred"),
        "pseudo_label_reduction": Option("all", "pseudo-label cross-entropy averaged over all voxels, (ce * mask).mean() as FixMatch/EMAN, or over the kept voxels only", ("all", "kept")),
        "pseudo_label_reduction": Option("all", "pseudo-label cross-entropy averaged over all voxels, (ce * mask).mean() as FixMatch/EMAN, or over the kept voxels only", ("all", "kept")),
        "rampup_steps": Option(1000, "steps of the sigmoid ramp-up exp(-5(1-t)^2) of the unsupervised weight"),
        "warmup_steps": Option(0, "supervised-only steps before the unsupervised losses start ramping up"),
    },
    "train": {
        "max_steps": Option(20000, "optimizer steps of the whole run"),
        "lr": Option(1e-3, "learning rate"),
        "optimizer": Option("adamw", "optimizer", ("adamw", "adam", "sgd")),
        "weight_decay": Option(1e-5, "weight decay"),
        "batch_dice": Option(True, "supervised Dice over the whole batch (DiceCELoss(batch=True), nnU-Net) rather than per patch, so a class absent from one patch does not dilute it"),
        "lr_schedule": Option("poly", "learning-rate schedule over max_steps: poly (power 0.9), cosine or constant", ("poly", "cosine", "constant")),
        "val_every_steps": Option(500, "validate teacher and student on whole volumes every this many steps"),
        "precision": Option("32", "Lightning precision: 32, bf16-mixed or 16-mixed", ("32", "bf16-mixed", "16-mixed")),
        "accumulate_grad_batches": Option(1, "batches per optimizer step"),
        "seed": Option(0, "global seed (python, numpy, torch, dataloader workers)"),
        "accelerator": Option("auto", "Lightning accelerator: auto uses a GPU when present", ("auto", "cpu", "gpu")),
        "devices": Option(1, "devices per node"),
        "num_nodes": Option(1, "nodes"),
        "strategy": Option("auto", "Lightning strategy (auto, ddp, ...)"),
        "sync_batchnorm": Option(True, "convert the student's BatchNorm to SyncBatchNorm on more than one GPU"),
        "log_every_steps": Option(10, "log training losses every this many steps"),
        "ce_class_weights": Option(None, "per-class weights of the supervised cross-entropy, background first (e.g. [1, 1, 10]); null: unweighted"),
        "deep_supervision": Option(False, "dynunet only: add the loss of the decoder's lower-resolution outputs with weights 1/2^i (nnU-Net)"),
        "deep_supervision_heads": Option(2, "lower-resolution outputs used by deep_supervision (DynUNet deep_supr_num)"),
    },
    "infer": {
        "sw_batch_size": Option(4, "sliding-window patches per forward pass"),
        "overlap": Option(0.5, "sliding-window overlap fraction"),
        "tta": Option(False, "average the softmax over flips along each axis"),
        "precision": Option("32", "inference precision: 32 or bf16 (autocast where supported)", ("32", "bf16")),
    },
    "tune": {
        "ema_momentum": Option([0.9, 0.9999], "EMA momentum range, sampled log-uniformly on 1 - m"),
        "consistency_weight": Option([0.01, 100.0], "consistency weight range, log-uniform"),
        "pseudo_label_threshold": Option(None, "pseudo-label threshold range [low, high]; null leaves it out of the search"),
        "rampup_steps": Option(None, "ramp-up length range [low, high]; null leaves it out of the search"),
        "max_steps": Option(None, "steps per trial; null uses train.max_steps"),
        "sampler_seed": Option(0, "seed of the TPE sampler"),
        "pruner_warmup_steps": Option(0, "validation reports before a trial may be pruned"),
        "n_startup_trials": Option(5, "trials before the pruner starts pruning"),
    },
}


def default_config() -> dict[str, dict[str, Any]]:
    """Return a fresh nested dict of every key's default."""
    return {section: {key: copy.deepcopy(opt.default) for key, opt in options.items()} for section, options in SCHEMA.items()}


def _valid_keys() -> list[str]:
    return [f"{section}.{key}" for section, options in SCHEMA.items() for key in options]


def _unknown(name: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: unknown config key '{name}'. Valid keys: {', '.join(_valid_keys())}")


def merge(cfg: dict, overlay: Mapping, where: str = "config") -> dict:
    """Overlay a nested mapping onto ``cfg`` in place, rejecting unknown sections and keys."""
    if overlay is None:
        return cfg
    if not isinstance(overlay, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(SCHEMA)}), got {type(overlay).__name__}")
    for section, values in overlay.items():
        if section not in SCHEMA:
            raise _unknown(str(section), where)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise _unknown(f"{section}.{key}", where)
            cfg[section][key] = value
    return cfg


def parse_set(item: str) -> tuple[str, str, Any]:
    """Parse one ``section.key=value`` override; the value is read as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. ssl.ema_momentum=0.999")
    name, raw = item.split("=", 1)
    parts = name.strip().split(".")
    if len(parts) != 2 or parts[0] not in SCHEMA or parts[1] not in SCHEMA[parts[0]]:
        raise _unknown(name.strip(), "--set")
    return parts[0], parts[1], _load_yaml(raw)


def validate(cfg: dict) -> dict:
    """Check choices and basic value constraints; return ``cfg``."""
    for section, options in SCHEMA.items():
        for key, opt in options.items():
            value = cfg[section][key]
            if opt.choices is not None:
                value = str(value) if key == "precision" else value
                cfg[section][key] = value
                if value not in opt.choices:
                    raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(map(str, opt.choices))}")
    m = cfg["ssl"]["ema_momentum"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m <= 1.0:
        raise ConfigError(f"ssl.ema_momentum: {m!r} must be a number in [0, 1]")
    window = cfg["ssl"]["momentum_window"]
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not window > 0.0:
        raise ConfigError(f"ssl.momentum_window: {window!r} must be a positive fraction of train.max_steps")
    batches = cfg["ssl"]["recalibration_batches"]
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ConfigError(f"ssl.recalibration_batches: {batches!r} must be a positive integer")
    thr = cfg["ssl"]["pseudo_label_threshold"]
    if thr is not None and not (isinstance(thr, (int, float)) and 0.0 <= thr <= 1.0):
        raise ConfigError(f"ssl.pseudo_label_threshold: {thr!r} must be null or a number in [0, 1]")
    if int(cfg["data"]["num_classes"]) < 2:
        raise ConfigError("data.num_classes must be at least 2 (background and one structure)")
    names = cfg["data"]["labels"]
    if names is not None and not (isinstance(names, dict) and all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < int(cfg["data"]["num_classes"]) for k in names)):
        raise ConfigError(f"data.labels: {names!r} must be null or a map from label values 0..num_classes-1 to names")
    for key in ("patch_size",):
        value = cfg["data"][key]
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(int(v) > 0 for v in value)):
            raise ConfigError(f"data.{key}: {value!r} must be three positive integers")
    spacing = cfg["data"]["spacing"]
    if spacing is not None and not (isinstance(spacing, (list, tuple)) and len(spacing) == 3 and all(float(v) > 0 for v in spacing)):
        raise ConfigError(f"data.spacing: {spacing!r} must be null or three positive numbers (mm)")
    for key in ("max_steps", "val_every_steps", "accumulate_grad_batches"):
        if int(cfg["train"][key]) < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {cfg['train'][key]!r}")
    _validate_small_structures(cfg)
    return cfg


def _validate_small_structures(cfg: dict) -> None:
    """Patch sampling, adaptive pseudo-labels, CE class weights and deep supervision (issue 11)."""
    data, train = cfg["data"], cfg["train"]
    num_classes = int(data["num_classes"])

    def per_class(name: str, value: Any) -> None:
        if value is None:
            return
        if not (isinstance(value, (list, tuple)) and len(value) == num_classes
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value) and sum(value) > 0):
            raise ConfigError(f"{name}: {value!r} must be null or {num_classes} non-negative numbers (one per class, background first), not all 0")

    per_class("data.class_ratios", data["class_ratios"])
    per_class("train.ce_class_weights", train["ce_class_weights"])
    for key in ("fg_class_fraction", "unlabeled_focus_fraction"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"data.{key}: {value!r} must be a number in [0, 1]")
    focus = data["unlabeled_focus_classes"]
    if focus is not None and not (isinstance(focus, (list, tuple)) and focus and all(
            isinstance(c, int) and not isinstance(c, bool) and 1 <= c < num_classes for c in focus)):
        raise ConfigError(f"data.unlabeled_focus_classes: {focus!r} must be null or a list of foreground classes in 1..{num_classes - 1}")
    for key in ("unlabeled_focus_every_steps", "unlabeled_focus_stride"):
        if int(data[key]) < 1:
            raise ConfigError(f"data.{key} must be a positive integer, got {data[key]!r}")
    momentum = cfg["ssl"]["adaptive_threshold_momentum"]
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ConfigError(f"ssl.adaptive_threshold_momentum: {momentum!r} must be a number in [0, 1)")
    if train["deep_supervision"] and cfg["model"]["name"] != "dynunet":
        raise ConfigError(f"train.deep_supervision needs model.name=dynunet (the MONAI network with deep-supervision heads), not {cfg['model']['name']}")
    if train["deep_supervision"] and not 1 <= int(train["deep_supervision_heads"]) <= len(cfg["model"]["channels"]) - 2:
        raise ConfigError(f"train.deep_supervision_heads: {train['deep_supervision_heads']!r} must lie in 1..{len(cfg['model']['channels']) - 2} "
                          f"(DynUNet with {len(cfg['model']['channels'])} levels)")


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file safely (``1e-4`` is a float), turning read and syntax errors into ConfigError."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return _load_yaml(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_config(paths: Iterable[str | Path] = (), sets: Iterable[str] = ()) -> dict:
    """Build a run's configuration: defaults, then each YAML file in order, then ``--set`` overrides.

    Args:
        paths: YAML files, each a partial config (sections and keys of :data:`SCHEMA`).
        sets: ``section.key=value`` strings; values are parsed as YAML.

    Returns:
        The resolved, validated nested dict.

    Raises:
        ConfigError: on an unreadable file, an unknown key (listing the valid ones) or a bad value.
    """
    cfg = default_config()
    for path in paths:
        merge(cfg, read_yaml(path), where=str(path))
    for item in sets:
        section, key, value = parse_set(item)
        cfg[section][key] = value
    return validate(cfg)


def render_yaml(cfg: dict | None = None) -> str:
    """Render a config as YAML with each key's one-line meaning as a comment."""
    cfg = default_config() if cfg is None else cfg
    lines = ["# medeman configuration: every key, its default and its meaning (rendered from medeman/config.py)."]
    for section, options in SCHEMA.items():
        lines.append(f"{section}:")
        for key, opt in options.items():
            value = yaml.safe_dump(cfg[section][key], default_flow_style=True, width=1000).strip()
            if value.endswith("\n..."):
                value = value[: -len("\n...")]
            value = value.removesuffix("...").strip()
            choices = f" [{' | '.join(map(str, opt.choices))}]" if opt.choices else ""
            lines.append(f"  {key}: {value}  # {opt.help}{choices}")
    return "\n".join(lines) + "\n"


def save_config(cfg: dict, path: str | Path) -> None:
    """Write the resolved config as commented YAML."""
    Path(path).write_text(render_yaml(cfg), encoding="utf-8")
