"""The configuration schema: one source of truth for every key, its default and its meaning.

A run's configuration is the schema's defaults, overlaid by YAML files (in order) and then by
``--set section.key=value`` overrides. Unknown keys and values outside a key's choices are
errors that name the valid ones, so a typo never silently falls back to a default.

``configs/default.yaml`` is rendered from this schema (:func:`render_yaml`); a test keeps the two
in step.
"""

from __future__ import annotations

import copy
import math
import re
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from medeman.classes import names_by_value, no_lesion_classes, resolve_classes
from medeman.eman import NORMS, SCHEDULES
from medeman.losses import CONSISTENCY_LOSSES, PSEUDO_LABEL_REDUCTIONS
from medeman.nets import NETWORKS


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
    """One configuration key: its default, a one-line meaning, the allowed values if fixed, and its type.

    ``type`` is what a value must be (a type or a tuple of types); left out, it is the default's
    type (a key whose default is ``None`` should declare it, or it is not checked). ``nullable`` (default: whether the
    default is ``None``) allows ``null``. An ``int`` is accepted for a ``float`` key, a whole
    ``float`` (``2e4``) for an ``int`` key and a number for a ``str`` key (YAML reads ``32`` as a
    number), each converted; anything else is refused at load time, naming the key.
    """

    default: Any
    help: str
    choices: tuple | None = None
    type: type | tuple[type, ...] | None = None
    nullable: bool | None = None

    def __post_init__(self) -> None:
        if self.type is None:
            # a None default without a declared type is not checked: declare one
            kind = object if self.default is None else list if isinstance(self.default, tuple) else type(self.default)
            object.__setattr__(self, "type", kind)
        if self.nullable is None:
            object.__setattr__(self, "nullable", self.default is None)

    def convert(self, name: str, value: Any) -> Any:
        """``value`` as this key's type (see the class docstring); raise ConfigError naming ``name``."""
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"{name}: null is not allowed (expected {_type_name(self.type)})")
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        for kind in types:
            if kind is bool and isinstance(value, bool):
                return value
            if kind is str and isinstance(value, bool) and self.choices and ("on" if value else "off") in self.choices:
                return "on" if value else "off"  # YAML 1.1 reads a bare off/on as false/true
            if isinstance(value, bool):  # YAML's true/false are not numbers here
                continue
            if kind is int and (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
                return int(value)
            if kind is float and isinstance(value, (int, float)):
                return float(value)
            if kind is str and isinstance(value, (str, int, float)):
                return str(value)
            if kind is list and isinstance(value, (list, tuple)):
                return list(value)
            if kind not in (bool, int, float, str, list) and isinstance(value, kind):
                return value
        raise ConfigError(f"{name}: {value!r} is not {_type_name(self.type)}")


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


SCHEMA: dict[str, dict[str, Option]] = {
    "data": {
        "spacing": Option(
            [1.5, 1.5, 1.5],
            "target voxel spacing in mm (x, y, z) after resampling; null keeps each scan's own",
            nullable=True,
        ),
        "patch_size": Option(
            [96, 96, 96],
            "training patch size in voxels (x, y, z); validation and inference use it as the sliding window",
        ),
        "modality": Option(
            "CT",
            "intensity normalization: CT clips to intensity_window and scales to [0, 1]; MR z-scores each scan on its foreground",
            ("CT", "MR"),
        ),
        "intensity_window": Option(
            [-175.0, 250.0], "CT window in HU [low, high] clipped and scaled to [0, 1] (ignored for MR)"
        ),
        "num_classes": Option(2, "number of classes including background; label values must lie in 0..num_classes-1"),
        "labels": Option(
            None,
            "class names by label value, e.g. {1: liver, 2: lesion}: tables, CSVs, pictures, exported models and DICOM-SEG segments use them; null: numbers only",
            type=dict,
        ),
        "lesion_classes": Option(
            None,
            "classes scored lesion-wise by medeman evaluate (connected components: detected, missed, false positives), by value or name, e.g. [3] or [lesion]; null: none, organs get Dice and distances only",
            type=list,
        ),
        "lesion_host_classes": Option(
            None,
            "classes the lesions lie in, by value or name (e.g. [liver]): where lesion copy-paste puts them "
            "(ssl.fixmatch_paste_probability, data.labeled_lesion_paste); null: every foreground class that is not a lesion class",
            type=list,
        ),
        "in_channels": Option(1, "image channels per case (nnU-Net _0000, _0001, ... files grouped into one case)"),
        "val_fraction": Option(0.2, "fraction of labeled cases held out for validation when no --val folder is given"),
        "split_seed": Option(0, "seed of the deterministic train/validation split"),
        "cache": Option(
            "memory",
            "cache of preprocessed volumes: memory (CacheDataset), disk (PersistentDataset) or none",
            ("memory", "disk", "none"),
        ),
        "cache_dir": Option(None, "folder for the disk cache; null means <run dir>/cache", type=str),
        "batch_size_labeled": Option(2, "labeled patches per training step"),
        "batch_size_unlabeled": Option(2, "unlabeled patches (weak+strong view pairs) per training step"),
        "num_workers": Option(
            4, "DataLoader worker processes for training batches, each making whole steps (labeled and unlabeled batch)"
        ),
        "fg_class_fraction": Option(
            0.33,
            "class_ratios null (nnU-Net rule): share of labeled patches centred on a voxel of a foreground class drawn uniformly among those present in the scan; the rest are random windows",
        ),
        "class_ratios": Option(
            None,
            "null: the fg_class_fraction rule; or one ratio per class, background first (e.g. [1, 1, 4] for a rare class 2), as MONAI RandCropByLabelClassesd: classes absent from a scan get 0, the rest are renormalized",
            type=list,
        ),
        "unlabeled_focus_fraction": Option(
            0.0,
            "share of unlabeled patches centred on a voxel the teacher assigns to a rare class (unlabeled_focus_classes); 0 turns it off",
        ),
        "unlabeled_focus_classes": Option(
            None,
            "classes the unlabeled focus centres on, e.g. [3]; null: every foreground class, drawn uniformly among those the teacher predicts in the scan",
            type=list,
        ),
        "unlabeled_focus_every_steps": Option(
            None,
            "the teacher re-segments the cached unlabeled volumes (sliding window, no overlap) every this many steps to refresh the focus centres; the first time at this step (random crops before), so the teacher has learned the class by then; null: unlabeled_focus_every_fraction of train.max_steps",
            type=int,
        ),
        "unlabeled_focus_every_fraction": Option(
            0.2,
            "unlabeled_focus_every_steps null: the focus centres are refreshed every this fraction of train.max_steps",
        ),
        "unlabeled_focus_stride": Option(
            4, "focus centres are taken on a grid of this stride in voxels (the low-resolution class map kept per scan)"
        ),
        "labeled_augmentation": Option(
            "nnunet",
            "augmentation of labeled patches, shared by every method: nnunet (nnU-Net's: rotation and scaling, mirroring, gamma, contrast, brightness, noise, blur, simulated low resolution) or basic (the flips, 90-degree rotations and affine_prob below, as the unlabeled views)",
            ("nnunet", "basic"),
        ),
        "labeled_lesion_paste": Option(
            0.0,
            "probability that a labeled patch gets the lesions (data.lesion_classes) of a labeled patch of its batch pasted "
            "where its ground truth shows their host organ (data.lesion_host_classes), shared by every method (object "
            "copy-paste, TumorCP, Yang et al. 2021); 0: off",
        ),
        "flip_prob": Option(0.5, "probability of a flip per axis, applied identically to both unlabeled views"),
        "rotate90_prob": Option(0.25, "probability of an axial 90-degree rotation, identical for both views"),
        "affine_prob": Option(0.0, "probability of a small random affine (rotation/scale), identical for both views"),
        "strong_noise_std": Option(0.1, "std of the Gaussian noise of the strong view (normalized intensity units)"),
        "strong_contrast": Option([0.7, 1.5], "gamma range of the strong view's contrast adjustment"),
        "strong_blur_sigma": Option([0.5, 1.0], "sigma range in voxels of the strong view's Gaussian blur"),
        "strong_brightness": Option(0.1, "max absolute intensity shift of the strong view"),
        "strong_prob": Option(
            0.8, "probability of each strong-view intensity augmentation (contrast, brightness, blur, noise, cut-out)"
        ),
        "strong_cutout": Option(False, "cut out random boxes of the strong view"),
        "unlabeled_from_imagesTs": Option(False, "nnU-Net/MSD layout: use imagesTs as unlabeled scans"),
        "exclude": Option(
            [],
            "files, folders or glob patterns never used as unlabeled scans, by path or by content (e.g. a test set: [/data/test/**])",
            type=list,
        ),
        "keep_label_like_unlabeled": Option(
            False,
            "keep unlabeled volumes that look like label maps (few non-negative integer values in 0..num_classes-1); false excludes and reports them",
        ),
    },
    "model": {
        "name": Option(
            "unet",
            "student architecture from MONAI, always built with BatchNorm",
            NETWORKS,
        ),
        "channels": Option(
            [16, 32, 64, 128, 256],
            "feature channels per resolution level (UNet, DynUNet; BasicUNet takes 6, SegResNet uses the first as init_filters)",
        ),
        "norm": Option(
            "batch", "normalization layers of the student; EMAN and the bn teacher need batch", ("batch", "instance")
        ),
        "num_res_units": Option(2, "residual units per UNet block"),
        "dropout": Option(0.0, "dropout probability in the student (and hence the teacher)"),
    },
    "ssl": {
        # choices, help and the methods' own keys (fixmatch_*, ua_mt_*, bcp_*, ...) are added by the registry
        # (medeman.methods.register_method) when the package imports medeman.methods (medeman/__init__.py)
        "method": Option("mean_teacher", "training method (medeman.methods)", ()),
        "teacher_norm": Option(
            "eman",
            "teacher normalization: eman (EMA'd running statistics, Cai et al. 2021), bn (batch statistics, classic mean teacher) or ema (weight EMA only, for networks without BatchNorm, e.g. model.norm=instance)",
            NORMS,
        ),
        "teacher_bn_recalibration": Option(
            "off",
            "the deployed teacher's BatchNorm statistics, a rule fixed before training: off (its own: EMAN's EMA'd ones, pure EMAN), always (re-estimated from its own forward passes, precise-BN, before each validation and export), export (re-estimated for teacher.pt only); best (opt-in, biased) validates both and keeps the better at each validation, a choice among twice the candidates that inflates validation Dice; pseudo-labels always keep the EMA'd statistics",
            ("off", "export", "always", "best"),
        ),
        "teacher_bn_refresh_every": Option(
            0,
            "every this many teacher updates, re-estimate the training teacher's BatchNorm statistics in place (precise-BN on recalibration_batches), EMA'd again in between; 0: never (pure EMAN). Not EMAN: for short runs whose EMA'd statistics lag the averaged weights",
        ),
        "recalibration_batches": Option(
            16,
            "unlabeled weak-view batches (labeled images without unlabeled scans) used to re-estimate the teacher's BatchNorm statistics",
        ),
        "ema_momentum": Option(
            0.99,
            "EMA momentum m of teacher weights (and EMAN statistics): theta' <- m theta' + (1-m) theta; the base of the constant and cosine schedules",
        ),
        "momentum_schedule": Option(
            "window",
            "EMA momentum over the run: constant (ema_momentum), cosine (BYOL: from ema_momentum to 1 over train.max_steps) or window (m = 1 - 1/(momentum_window * train.max_steps))",
            SCHEDULES,
        ),
        "momentum_window": Option(
            0.1, "window schedule: the teacher averages over about this fraction of train.max_steps"
        ),
        "momentum_warmup": Option(
            True, "use min(1 - 1/(step+1), scheduled momentum) so the teacher follows the student early on"
        ),
        "consistency": Option(
            "mse",
            "consistency loss between student and teacher softmax: mse, kl or none",
            (*CONSISTENCY_LOSSES, "none"),
        ),
        "consistency_weight": Option(1.0, "weight lambda of the unsupervised losses at the end of the ramp-up"),
        "pseudo_label_threshold": Option(
            None,
            "teacher confidence above which a voxel's argmax is a pseudo-label; null turns pseudo-labels off",
            type=float,
        ),
        "pseudo_label_weight": Option(1.0, "weight of the pseudo-label loss relative to the consistency loss"),
        "pseudo_label_dice": Option(False, "add a masked Dice term to the pseudo-label cross-entropy"),
        "pseudo_label_threshold_mode": Option(
            "fixed",
            "fixed: one threshold (pseudo_label_threshold) for every class; adaptive: per-class thresholds from the teacher's EMA'd confidence (FreeMatch-style, medeman.pseudo_labels), capped by pseudo_label_threshold",
            ("fixed", "adaptive"),
        ),
        "adaptive_threshold_momentum": Option(
            None,
            "EMA momentum m of the adaptive thresholds' confidence statistics (FreeMatch's lambda); they start at 1/num_classes and follow the teacher over ~1/(1-m) steps; null scales it to the run like the teacher: m = 1 - 1/(momentum_window * train.max_steps)",
            type=float,
        ),
        "pseudo_label_reduction": Option(
            "all",
            "pseudo-label cross-entropy averaged over all voxels, (ce * mask).mean() as FixMatch/EMAN, or over the kept voxels only",
            PSEUDO_LABEL_REDUCTIONS,
        ),
        "rampup_steps": Option(
            None,
            "steps of the sigmoid ramp-up exp(-5(1-t)^2) of the unsupervised weight, after the warm-up; null: rampup_fraction of train.max_steps",
            type=int,
        ),
        "rampup_fraction": Option(0.3, "rampup_steps null: the ramp-up lasts this fraction of train.max_steps"),
        "warmup_steps": Option(
            None,
            "supervised-only steps before the unsupervised losses start ramping up; at its end a teacher method sets the teacher to the student and estimates its BatchNorm statistics once (then pure EMAN); null: warmup_fraction of train.max_steps",
            type=int,
        ),
        "warmup_fraction": Option(
            0.1, "warmup_steps null: the supervised warm-up lasts this fraction of train.max_steps"
        ),
    },
    "train": {
        "max_steps": Option(20000, "optimizer steps of the whole run"),
        "lr": Option(1e-3, "learning rate"),
        "optimizer": Option("adamw", "optimizer", ("adamw", "adam", "sgd")),
        "weight_decay": Option(1e-5, "weight decay"),
        "batch_dice": Option(
            True,
            "supervised Dice over the whole batch (DiceCELoss(batch=True), nnU-Net) rather than per patch, so a class absent from one patch does not dilute it",
        ),
        "lr_schedule": Option(
            "poly",
            "learning-rate schedule over max_steps: poly (power 0.9), cosine or constant",
            ("poly", "cosine", "constant"),
        ),
        "val_every_steps": Option(500, "validate teacher and student on whole volumes every this many steps"),
        "deploy": Option(
            "last",
            "which teacher teacher.pt holds: last (the final-step teacher, no selection) or best (the best val/dice_teacher over the run's validations, opt-in: chosen among that many candidates, which teacher.pt records, so its validation Dice is optimistic)",
            ("last", "best"),
        ),
        "precision": Option("32", "Lightning precision: 32, bf16-mixed or 16-mixed", ("32", "bf16-mixed", "16-mixed")),
        "accumulate_grad_batches": Option(1, "batches per optimizer step"),
        "seed": Option(0, "global seed (python, numpy, torch, dataloader workers)"),
        "num_threads": Option(
            None,
            "torch intra-op threads per process (medeman train --threads); null: OMP_NUM_THREADS if set, else the available cores less one per loader worker, divided among the node's processes (medeman.threads)",
            type=int,
        ),
        "accelerator": Option("auto", "Lightning accelerator: auto uses a GPU when present", ("auto", "cpu", "gpu")),
        "devices": Option(1, "devices per node", type=(int, list, str)),
        "num_nodes": Option(1, "nodes"),
        "strategy": Option("auto", "Lightning strategy (auto, ddp, ...)"),
        "sync_batchnorm": Option(True, "convert the student's BatchNorm to SyncBatchNorm on more than one GPU"),
        "log_every_steps": Option(10, "log training losses every this many steps"),
        "checkpoint_every_steps": Option(
            100,
            "also write checkpoints/last.ckpt every this many steps (it is always written at each validation), so a stopped run resumes from there (--resume); 0: at validations only",
        ),
        "channels_last": Option(
            True,
            "train student and teacher in the channels_last_3d memory layout (NDHWC), the fast layout of oneDNN and cuDNN 3D convolutions; same results to float rounding",
        ),
        "compile": Option(
            False,
            "torch.compile student and teacher (inductor): 6 % faster steps of the sample UNet on a CPU after about 30 s of compilation, so for long runs and GPUs (README performance)",
        ),
        "ce_class_weights": Option(
            None,
            "per-class weights of the supervised cross-entropy, background first (e.g. [1, 1, 10]); null: unweighted",
            type=list,
        ),
        "deep_supervision": Option(
            False, "dynunet only: add the loss of the decoder's lower-resolution outputs with weights 1/2^i (nnU-Net)"
        ),
        "deep_supervision_heads": Option(
            2, "lower-resolution outputs used by deep_supervision (DynUNet deep_supr_num)"
        ),
    },
    "infer": {
        "sw_batch_size": Option(4, "sliding-window patches per forward pass"),
        "overlap": Option(0.5, "sliding-window overlap fraction"),
        "tta": Option(False, "average the softmax over flips along each axis"),
        "precision": Option("32", "inference precision: 32 or bf16 (autocast where supported)", ("32", "bf16")),
    },
    "tune": {
        "momentum_window": Option(
            [0.01, 0.5],
            "range of the teacher's averaging window as a fraction of the run, log-uniform; a run of T steps gets m = 1 - 1/(window * T) (ssl.momentum_window itself with the window schedule); null leaves the momentum out of the search",
            type=list,
            nullable=True,
        ),
        "consistency_weight": Option(
            [0.01, 100.0],
            "consistency weight range, log-uniform; null leaves it out of the search",
            type=list,
            nullable=True,
        ),
        "pseudo_label_threshold": Option(
            None, "pseudo-label threshold range [low, high]; null leaves it out of the search", type=list
        ),
        "rampup_steps": Option(
            None,
            "ramp-up length range [low, high] in steps of the full run (scaled in shorter trials), log-uniform; null leaves it out of the search",
            type=list,
        ),
        "max_steps": Option(
            None,
            "steps per trial; null uses train.max_steps. Shorter trials scale every step-based key (ramp-up, warm-up, momentum window) by max_steps / train.max_steps",
            type=int,
        ),
        "validations": Option(
            4,
            "validations per trial, evenly spaced after tune.prune_after of it and ending at its last step (none earlier: they could neither prune nor score it)",
        ),
        "objective_last_k": Option(
            2,
            "a trial's value is the mean val/dice_teacher of its last k validations (all of them if fewer), robust to one noisy validation",
        ),
        "prune_after": Option(
            0.5, "fraction of a trial's steps before it may be pruned (early teacher Dice favours fast teachers)"
        ),
        "n_startup_trials": Option(5, "complete trials before the pruner starts pruning"),
        "sampler_seed": Option(0, "seed of the TPE sampler (multivariate, constant liar)"),
        "heartbeat_interval": Option(
            60,
            "seconds between a running trial's heartbeats in a database storage; a trial silent for grace_period is failed and retried with the same parameters; null turns it off",
            type=int,
            nullable=True,
        ),
        "grace_period": Option(
            None,
            "seconds without a heartbeat before a running trial counts as dead; null: 2 x heartbeat_interval",
            type=int,
        ),
        "max_retries": Option(
            2, "times a dead worker's trial is retried (with the same parameters); it counts once against --max-trials"
        ),
    },
}


def default_config() -> dict[str, dict[str, Any]]:
    """Return a fresh nested dict of every key's default."""
    return {
        section: {key: copy.deepcopy(opt.default) for key, opt in options.items()}
        for section, options in SCHEMA.items()
    }


def _valid_keys() -> list[str]:
    return [f"{section}.{key}" for section, options in SCHEMA.items() for key in options]


def _unknown(name: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: unknown config key '{name}'. Valid keys: {', '.join(_valid_keys())}")


def merge(cfg: dict, overlay: Mapping, where: str = "config") -> dict:
    """Overlay a nested mapping onto ``cfg`` in place, rejecting unknown sections and keys."""
    if overlay is None:
        return cfg
    if not isinstance(overlay, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of sections ({', '.join(SCHEMA)}), got {type(overlay).__name__}"
        )
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
    """Check every key's type and choices, value constraints and the rules between keys; return ``cfg``.

    Values are converted to their key's type in place (``--set train.lr=1`` becomes ``1.0``,
    ``train.precision: 32`` becomes ``"32"``). This is the one place a config is checked: training
    and tuning rely on it.
    """
    for section, options in SCHEMA.items():
        for key, opt in options.items():
            value = cfg[section][key] = opt.convert(f"{section}.{key}", cfg[section][key])
            if opt.choices is not None and value not in opt.choices:
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
    if int(cfg["ssl"]["teacher_bn_refresh_every"]) < 0:
        raise ConfigError(
            f"ssl.teacher_bn_refresh_every: {cfg['ssl']['teacher_bn_refresh_every']!r} must be 0 (never) or a number of steps"
        )
    from medeman.typed_config import frozen  # the methods' rules read the converted values as attributes

    typed = frozen(cfg)
    for check in _OPTION_CHECKS:  # rules between a method's own keys and others (its keys are in every config)
        check(typed)
    thr = cfg["ssl"]["pseudo_label_threshold"]
    if thr is not None and not (isinstance(thr, (int, float)) and 0.0 <= thr <= 1.0):
        raise ConfigError(f"ssl.pseudo_label_threshold: {thr!r} must be null or a number in [0, 1]")
    if int(cfg["data"]["num_classes"]) < 2:
        raise ConfigError("data.num_classes must be at least 2 (background and one structure)")
    names = cfg["data"]["labels"]
    if names is not None and not (
        isinstance(names, dict)
        and all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < int(cfg["data"]["num_classes"]) for k in names
        )
    ):
        raise ConfigError(f"data.labels: {names!r} must be null or a map from label values 0..num_classes-1 to names")
    try:  # the dict's own values: classes.lesion_classes reads a checked Config
        lesions = resolve_classes(
            cfg["data"]["lesion_classes"], names_by_value(names), cfg["data"]["num_classes"], "data.lesion_classes"
        )
        hosts = resolve_classes(
            cfg["data"]["lesion_host_classes"],
            names_by_value(names),
            cfg["data"]["num_classes"],
            "data.lesion_host_classes",
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg["data"]["lesion_host_classes"] is not None and (not hosts or set(hosts) & set(lesions)):
        raise ConfigError(
            f"data.lesion_host_classes: {cfg['data']['lesion_host_classes']!r} must name at least one class the "
            f"lesions lie in, none of them a lesion class ({lesions})"
        )
    if cfg["data"]["labeled_lesion_paste"] > 0 and not lesions:
        raise ConfigError(no_lesion_classes("data.labeled_lesion_paste"))
    for key in ("patch_size",):
        value = cfg["data"][key]
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(int(v) > 0 for v in value)):
            raise ConfigError(f"data.{key}: {value!r} must be three positive integers")
    spacing = cfg["data"]["spacing"]
    if spacing is not None and not (
        isinstance(spacing, (list, tuple)) and len(spacing) == 3 and all(float(v) > 0 for v in spacing)
    ):
        raise ConfigError(f"data.spacing: {spacing!r} must be null or three positive numbers (mm)")
    for key in ("max_steps", "val_every_steps", "accumulate_grad_batches"):
        if int(cfg["train"][key]) < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {cfg['train'][key]!r}")
    if int(cfg["train"]["checkpoint_every_steps"]) < 0:
        raise ConfigError(
            f"train.checkpoint_every_steps must be 0 (at validations only) or a number of steps, got {cfg['train']['checkpoint_every_steps']!r}"
        )
    for name, holds, requirement in _VALUE_RULES:
        section, key = name.split(".")
        value = cfg[section][key]
        if value is not None and not holds(value):
            raise ConfigError(f"{name}: {value!r} must be {requirement}")
    _validate_small_structures(cfg)
    method_check = _METHOD_CHECKS.get(cfg["ssl"]["method"])
    if method_check is not None:  # e.g. a teacher method's teacher_norm=eman needs BatchNorm
        method_check(typed)
    _validate_tune(cfg)
    return cfg


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def _range(low_min: float) -> Any:
    return lambda v: (
        len(v) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        and low_min <= v[0] <= v[1]
    )


# Values that pass the type check but would crash or mislead later (issue 23): checked at load time, before
# anything is written. A null value (where allowed) is not checked here. The methods add the rules of their own
# keys when they register (register_method_options).
_VALUE_RULES: list[tuple[str, Any, str]] = [
    ("train.lr", _positive, "a positive learning rate"),
    ("train.weight_decay", _non_negative, "a non-negative number"),
    ("train.log_every_steps", _positive, "a positive number of steps"),
    ("train.num_nodes", _positive, "a positive number of nodes"),
    ("train.num_threads", _positive, "null or a positive number of threads"),
    ("data.batch_size_labeled", _positive, "at least 1 patch per step"),
    ("data.batch_size_unlabeled", _positive, "at least 1 patch per step"),
    ("data.num_workers", _non_negative, "0 (load in the main process) or a number of worker processes"),
    ("data.in_channels", _positive, "at least 1 channel"),
    ("data.val_fraction", lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)"),
    ("data.flip_prob", _fraction, "a probability in [0, 1]"),
    ("data.rotate90_prob", _fraction, "a probability in [0, 1]"),
    ("data.affine_prob", _fraction, "a probability in [0, 1]"),
    ("data.labeled_lesion_paste", _fraction, "a probability in [0, 1]"),
    ("data.strong_prob", _fraction, "a probability in [0, 1]"),
    ("data.strong_noise_std", _non_negative, "a non-negative standard deviation"),
    ("data.strong_brightness", _non_negative, "a non-negative intensity shift"),
    ("data.strong_contrast", lambda v: _range(0.0)(v) and v[0] > 0, "a gamma range [low, high] with 0 < low <= high"),
    ("data.strong_blur_sigma", _range(0.0), "a sigma range [low, high] with 0 <= low <= high"),
    ("data.unlabeled_focus_every_fraction", lambda v: 0.0 < v <= 1.0, "a fraction of train.max_steps in (0, 1]"),
    ("data.intensity_window", lambda v: _range(-math.inf)(v) and v[0] < v[1], "a window [low, high] with low < high"),
    (
        "model.channels",
        lambda v: len(v) >= 1 and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in v),
        "a list of positive integers (channels per level)",
    ),
    ("model.num_res_units", _non_negative, "a non-negative number of units"),
    ("model.dropout", lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)"),
    ("ssl.consistency_weight", _non_negative, "a non-negative weight"),
    ("ssl.pseudo_label_weight", _non_negative, "a non-negative weight"),
    ("ssl.rampup_steps", _non_negative, "a non-negative number of steps"),
    ("ssl.warmup_steps", _non_negative, "a non-negative number of steps"),
    ("ssl.warmup_fraction", lambda v: 0.0 <= v < 1.0, "a fraction of train.max_steps in [0, 1)"),
    ("ssl.rampup_fraction", lambda v: 0.0 <= v < 1.0, "a fraction of train.max_steps in [0, 1)"),
    ("infer.sw_batch_size", _positive, "at least 1 window per forward pass"),
    ("infer.overlap", lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1) (1 would never move the window)"),
]
# filled by register_method_options: cross-key rules of methods' own keys (every config), and each method's
# rules for a config that trains with it
_OPTION_CHECKS: list[Callable[[Any], None]] = []  # each called with a medeman.typed_config.Config
_METHOD_CHECKS: dict[str, Callable[[Any], None]] = {}
_METHOD_SUMMARIES: dict[str, str] = {}


def register_method_options(
    method: str,
    summary: str,
    options: Mapping[str, Option] | None = None,
    rules: Iterable[tuple[str, Any, str]] = (),
    option_check: Callable[[dict], None] | None = None,
    method_check: Callable[[dict], None] | None = None,
) -> None:
    """Make ``method`` a choice of ``ssl.method`` and add its own keys to the ``ssl`` section (called by the method registry).

    Args:
        method: the ``ssl.method`` value.
        summary: one line for ``ssl.method``'s help (and so ``configs/default.yaml``).
        options: the method's own ``ssl`` keys, flat (``bcp_box_fraction``), by name.
        rules: ``(key, holds, requirement)`` value rules of those keys, as :data:`_VALUE_RULES`' (key without ``ssl.``).
        option_check: rules between the method's keys and others, checked for every config (ConfigError);
            called with the :class:`~medeman.typed_config.Config` of the converted values.
        method_check: rules for a config that trains with ``method`` (ConfigError), called likewise.

    Raises:
        ValueError: a key another method or the schema already declares differently.
    """
    ssl = SCHEMA["ssl"]
    options = dict(options or {})
    for key, option in options.items():
        if key in ssl and ssl[key] != option:
            raise ValueError(f"ssl.{key} of method {method} is already declared (by the schema or another method)")
    ssl.update(options)
    for key, holds, requirement in rules:
        rule = (f"ssl.{key}", holds, requirement)
        if rule not in _VALUE_RULES:
            _VALUE_RULES.append(rule)
    if option_check is not None and option_check not in _OPTION_CHECKS:
        _OPTION_CHECKS.append(option_check)
    if method_check is not None:
        _METHOD_CHECKS[method] = method_check
    _METHOD_SUMMARIES[method] = summary
    names = ", ".join(f"{name} ({text})" for name, text in _METHOD_SUMMARIES.items())
    ssl["method"] = dataclasses.replace(
        ssl["method"],
        choices=tuple(_METHOD_SUMMARIES),
        help=f"training method (medeman.methods, one file each): {names}",
    )


def _tune_range(tune: dict, key: str, low_min: float, high_max: float, positive: bool = False) -> None:
    value = tune[key]
    if value is None:
        return
    if not (len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"tune.{key}: {value!r} must be a range [low, high] (or null to leave it out of the search)")
    low, high = float(value[0]), float(value[1])
    if not low_min <= low < high <= high_max or (positive and low <= 0):
        bound = f"0 < low < high <= {high_max}" if positive else f"{low_min} <= low < high <= {high_max}"
        raise ConfigError(f"tune.{key}: [{value[0]}, {value[1]}] must satisfy {bound}")


def _validate_tune(cfg: dict) -> None:
    """The ``tune:`` search space and trial budget (read by :mod:`medeman.tune`)."""
    tune = cfg["tune"]
    _tune_range(
        tune, "momentum_window", 0.0, 1.0, positive=True
    )  # a window over the whole run is the warm-up's plain average
    _tune_range(tune, "consistency_weight", 0.0, math.inf, positive=True)  # log-uniform
    _tune_range(tune, "pseudo_label_threshold", 0.0, 1.0)
    _tune_range(tune, "rampup_steps", 1.0, math.inf)
    if tune["rampup_steps"] is not None and not all(float(v).is_integer() for v in tune["rampup_steps"]):
        raise ConfigError(f"tune.rampup_steps: {tune['rampup_steps']!r} must be whole numbers of steps")
    steps = int(cfg["train"]["max_steps"] if tune["max_steps"] is None else tune["max_steps"])
    if steps < 1:
        raise ConfigError(f"tune.max_steps must be a positive integer or null, got {tune['max_steps']!r}")
    if tune["validations"] < 1:  # more than the trial's steps: it validates after every step
        raise ConfigError(f"tune.validations: {tune['validations']!r} must be a positive integer")
    if tune["objective_last_k"] < 1:  # more than the trial's validations: the mean of all of them
        raise ConfigError(f"tune.objective_last_k: {tune['objective_last_k']!r} must be a positive integer")
    if not 0.0 <= tune["prune_after"] <= 1.0:
        raise ConfigError(f"tune.prune_after: {tune['prune_after']!r} must be a fraction of the trial in [0, 1]")
    for key in ("heartbeat_interval", "grace_period"):
        if tune[key] is not None and tune[key] < 1:
            raise ConfigError(f"tune.{key}: {tune[key]!r} must be a positive number of seconds or null")
    if (
        tune["grace_period"] is not None
        and tune["heartbeat_interval"] is not None
        and tune["grace_period"] <= tune["heartbeat_interval"]
    ):
        raise ConfigError(
            f"tune.grace_period={tune['grace_period']} must exceed tune.heartbeat_interval={tune['heartbeat_interval']}"
        )
    if tune["max_retries"] < 0 or tune["n_startup_trials"] < 0:
        raise ConfigError("tune.max_retries and tune.n_startup_trials must be >= 0")


def _validate_small_structures(cfg: dict) -> None:
    """Patch sampling, adaptive pseudo-labels, CE class weights and deep supervision (issue 11)."""
    data, train = cfg["data"], cfg["train"]
    num_classes = int(data["num_classes"])

    def per_class(name: str, value: Any) -> None:
        if value is None:
            return
        if not (
            isinstance(value, (list, tuple))
            and len(value) == num_classes
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
            and sum(value) > 0
        ):
            raise ConfigError(
                f"{name}: {value!r} must be null or {num_classes} non-negative numbers (one per class, background first), not all 0"
            )

    per_class("data.class_ratios", data["class_ratios"])
    per_class("train.ce_class_weights", train["ce_class_weights"])
    for key in ("fg_class_fraction", "unlabeled_focus_fraction"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"data.{key}: {value!r} must be a number in [0, 1]")
    focus = data["unlabeled_focus_classes"]
    if focus is not None and not (
        isinstance(focus, (list, tuple))
        and focus
        and all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c < num_classes for c in focus)
    ):
        raise ConfigError(
            f"data.unlabeled_focus_classes: {focus!r} must be null or a list of foreground classes in 1..{num_classes - 1}"
        )
    for key in ("unlabeled_focus_every_steps", "unlabeled_focus_stride"):
        if data[key] is not None and int(data[key]) < 1:
            raise ConfigError(f"data.{key} must be a positive integer, got {data[key]!r}")
    momentum = cfg["ssl"]["adaptive_threshold_momentum"]
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ConfigError(f"ssl.adaptive_threshold_momentum: {momentum!r} must be a number in [0, 1)")
    if train["deep_supervision"] and cfg["model"]["name"] != "dynunet":
        raise ConfigError(
            f"train.deep_supervision needs model.name=dynunet (the MONAI network with deep-supervision heads), not {cfg['model']['name']}"
        )
    if train["deep_supervision"] and not 1 <= int(train["deep_supervision_heads"]) <= len(cfg["model"]["channels"]) - 2:
        raise ConfigError(
            f"train.deep_supervision_heads: {train['deep_supervision_heads']!r} must lie in 1..{len(cfg['model']['channels']) - 2} "
            f"(DynUNet with {len(cfg['model']['channels'])} levels)"
        )


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


def render_yaml(cfg: Any = None) -> str:
    """Render a config (a dict or a :class:`~medeman.typed_config.Config`) as YAML with each key's one-line meaning as a comment."""
    from medeman.typed_config import Config

    cfg = default_config() if cfg is None else cfg.to_dict() if isinstance(cfg, Config) else cfg
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


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (a dict or a :class:`~medeman.typed_config.Config`) as commented YAML."""
    Path(path).write_text(render_yaml(cfg), encoding="utf-8")
