"""Training entry point: config + folders -> Lightning run -> run folder with ``teacher.pt``.

Run folder layout::

    config.yaml           resolved configuration (commented, loads with --config)
    plan.yaml             the plan a run without --config trained with (medeman.planning), each key with its reason
    fingerprint.json      the dataset fingerprint the plan was made from (medeman.fingerprint)
    split.json            train/validation split of the labeled cases (when no --val folder)
    teacher.pt            the final-step teacher (train.deploy: last; best: the best val/dice_teacher):
                          state_dict + config (weights_only-safe), with extra["teacher_bn_stats"]:
                          recalibrated | ema | batch | none, and extra["candidates"]: validations it was chosen from
                          extra["postprocessing"]: per-class component rules learned on validation (medeman.postprocess)
    metrics.csv           every logged value (CSVLogger)
    tensorboard/          TensorBoard event files
    checkpoints/          Lightning checkpoints: best-*.ckpt and last.ckpt (at every validation and every
                          train.checkpoint_every_steps, for --resume)

A resumed run continues exactly (docs/resume.md, :mod:`medeman.resume`).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from medeman.checkpoint import read_teacher_file, save_teacher
from medeman.config import ConfigError, load_config, save_config, validate
from medeman.resume import (
    CadenceCheckpoint,
    ContinuedCSVLogger,
    ContinuedStepCount,
    check_resume,
    pin_schedules,
    record_resume,
)
from medeman.threads import set_threads_for_config
from medeman.typed_config import Config, as_config

if TYPE_CHECKING:  # the data stack is imported late (heavy)
    from medeman.data.datamodule import CohortCache

PLAN_OUTPUTS = ("plan.yaml", "fingerprint.json")
RUN_OUTPUTS = (
    *PLAN_OUTPUTS,
    "config.yaml",
    "split.json",
    "teacher.pt",
    "metrics.csv",
    "hparams.yaml",
    "tensorboard",
    "checkpoints",
    "cache",
)


# Warnings that say nothing wrong about a medeman run: the EMAN teacher's BN layers are in eval mode
# by design; a resumed run reuses its folders; an organ missed early in training has no HD95.
_EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode.*",
    r".*Experiment logs directory .* exists and is not empty.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*(prediction|ground truth) of class \d+ is all 0.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning internals on newer torch
    r".*always_return_as_numpy.*",  # MONAI's own HD95 code calls its deprecated argument
)


def _hide_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def hide_lightning_advert() -> None:
    """Drop Lightning's ``litlogger`` advert from the log of a command that trains (once; a library import changes no logger)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _hide_advert not in logger.filters:
        logger.addFilter(_hide_advert)


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    best_dice_teacher: float
    last_dice_teacher: float
    last_dice_student: float
    steps: int


class TeacherExport(Callback):
    """Writes ``teacher.pt``, the model users deploy, by the rule ``train.deploy`` fixes before training.

    ``last`` (default): the teacher after every validation and at the end of training, so the file
    holds the final-step teacher, chosen by nothing. ``best``: the teacher of the best
    ``val/dice_teacher`` so far; ``teacher.pt`` then records how many validations it was chosen
    from (``extra["candidates"]``), because the best of many noisy validation scores is optimistic.
    """

    def __init__(self, path: Path, cfg: Config | dict):
        self.path, self.cfg = Path(path), as_config(cfg)
        self.rule = self.cfg.train.deploy
        self.best = -math.inf
        self.validations = 0
        self.exported_step: int | None = None
        self.last: dict[str, float] = {}

    def _export(self, trainer: pl.Trainer, module: pl.LightningModule, score: float) -> None:
        if trainer.is_global_zero:
            net, stats = module.deployed_network()  # the teacher as validated (re-estimated statistics, if on)
            save_teacher(
                self.path,
                net,
                self.cfg,
                step=trainer.global_step,
                val_dice_teacher=score,
                teacher_bn_stats=stats,
                deploy=self.rule,
                candidates=self.validations if self.rule == "best" else 1,
            )
        self.exported_step = trainer.global_step

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/dice_")}
        score = self.last.get("val/dice_teacher", math.nan)
        if math.isnan(score):
            return
        self.validations += 1
        self.best = max(self.best, score)
        if self.rule == "last" or score >= self.best:
            self._export(trainer, module, score)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not self.path.exists() or (self.rule == "last" and self.exported_step != trainer.global_step):
            # never validated, or not validated at the final step: the final teacher, without a validation score
            self._export(trainer, module, math.nan)
        elif self.rule == "best" and trainer.is_global_zero:  # the best of how many: all of the run's validations
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
            payload["extra"]["candidates"] = self.validations
            torch.save(payload, str(self.path))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.validations = int(state_dict.get("validations", 0))


def _sync_batchnorm(cfg: Config | dict) -> bool:
    """Whether to convert the student to SyncBatchNorm: on, several processes, and GPUs."""
    train = as_config(cfg).train
    devices = train.devices
    several = (
        devices == -1
        or (isinstance(devices, int) and devices > 1)
        or (isinstance(devices, (list, tuple)) and len(devices) > 1)
        or train.num_nodes > 1
    )
    if not (train.sync_batchnorm and several):
        return False
    if train.accelerator in ("gpu", "auto") and torch.cuda.is_available():
        return True
    warnings.warn(
        "train.sync_batchnorm is on but this multi-process run is on CPU, where PyTorch refuses SyncBatchNorm: "
        "the student keeps plain BatchNorm (per-process statistics), and medeman averages them across "
        "processes before each EMAN teacher update.",
        stacklevel=2,
    )
    return False


def nothing_to_resume(out_dir: Path, missing: str) -> ConfigError:
    """The error of a --resume without ``missing``: what to run instead depends on whether a run is there."""
    if any((Path(out_dir) / name).exists() for name in RUN_OUTPUTS):
        return ConfigError(
            f"{out_dir}: nothing to resume (no {missing}: the run stopped before its first checkpoint); "
            "start it again with --overwrite instead of --resume"
        )
    return ConfigError(f"{out_dir}: nothing to resume (no {missing}); start a new run without --resume")


def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool, keep: Sequence[str] = ()) -> None:
    """Create the run folder; refuse to clobber an earlier run unless resuming or ``overwrite``.

    ``keep``: outputs this run already wrote (the plan of a run without ``--config``).
    """
    existing = [name for name in RUN_OUTPUTS if (out_dir / name).exists() and name not in keep]
    if resume:
        if not (out_dir / "checkpoints" / "last.ckpt").is_file():
            raise nothing_to_resume(out_dir, "checkpoints/last.ckpt")
        return
    if existing and not overwrite:
        if not (
            out_dir / "checkpoints" / "last.ckpt"
        ).is_file():  # stopped before its first checkpoint: --resume cannot help
            raise ConfigError(
                f"{out_dir} already holds a run that stopped before its first checkpoint ({', '.join(existing)}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        raise ConfigError(
            f"{out_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    for name in existing:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def fit(
    cfg: Config | dict,
    labeled: str | Path,
    unlabeled: str | Path | None = None,
    val: str | Path | None = None,
    out_dir: str | Path = "runs/medeman",
    *,
    test: str | Path | None = None,
    callbacks: Iterable[Callback] = (),
    resume: bool = False,
    overwrite: bool = False,
    progress_bar: bool = True,
    logger: bool = True,
    keep: Sequence[str] = (),
    cohorts: CohortCache | None = None,
) -> TrainResult:
    """Train a model as ``cfg`` says and leave a run folder (see module docstring).

    Args:
        cfg: resolved config (:func:`medeman.config.load_config`'s dict or its :class:`~medeman.typed_config.Config`);
            a resumed run's schedules are pinned in a dict in place (:func:`medeman.resume.pin_schedules`).
        labeled: labeled cohort (``images/`` + ``labels/``, an MSD ``dataset.json`` or nnU-Net folder).
        unlabeled: folder of unlabeled scans (required for ``mean_teacher``).
        val: optional labeled validation cohort; without it a split of ``labeled`` is used.
        out_dir: run folder.
        test: optional test cohort: never used as unlabeled scans (nor are copies of it); not trained or validated on.
        callbacks: extra Lightning callbacks (e.g. Optuna's pruning callback).
        resume: continue from ``out_dir/checkpoints/last.ckpt`` as if never stopped (docs/resume.md): data and
            model settings must equal the run's ``config.yaml``; changed others are recorded there.
        overwrite: replace an earlier run's outputs in ``out_dir``.
        progress_bar: show Lightning's progress bar.
        logger: write ``metrics.csv`` and TensorBoard logs.
        keep: run outputs already in ``out_dir`` that belong to this run (``plan.yaml``, ``fingerprint.json``).
        cohorts: a :class:`~medeman.data.datamodule.CohortCache` shared with other runs of this process
            (tuning trials): a cohort already prepared there is taken instead of read and checked again.

    Raises:
        ConfigError: inconsistent config or run folder. ``DataError``: bad input data.
    """
    from medeman.data import SSLDataModule  # imported late: the data stack is heavy
    from medeman.methods import build_method
    from medeman.module import SSLSegModule

    out_dir = Path(out_dir)
    method = build_method(
        cfg
    )  # built once: its checks, the DataModule's views and the module's training all come from it
    method.check(cfg, has_unlabeled=unlabeled is not None)
    # types, choices and the rules between keys (config.validate), also for a config built in code
    typed = as_config(cfg)
    prepare_run_dir(out_dir, resume, overwrite, keep)
    resume_step, changes = None, {}
    if resume:  # before anything in the run folder is written
        resume_step, changes, pinned = _check_resume(out_dir, cfg)
        if pinned != typed:  # schedules pinned where the stopped run had them: the method's schedule too
            typed, method = pinned, build_method(pinned)
    cfg = typed
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    datamodule = SSLDataModule(
        cfg,
        labeled=labeled,
        unlabeled=unlabeled if method.uses_unlabeled else None,
        val=val,
        run_dir=out_dir,
        test=test,
        cohorts=cohorts,
        views=method.unlabeled_views,
    )
    datamodule.setup("fit")  # every data check runs here, before any training
    cohort = datamodule.cohort
    if cohort is not None and (cohort.unlabeled or cohort.flagged) and rank_zero_only.rank == 0:
        print(cohort.summary())  # nothing is left out of the unlabeled scans silently
    module = SSLSegModule(cfg, sync_batchnorm=_sync_batchnorm(cfg), method=method)  # the one method object of the run
    if resume:
        record_resume(out_dir / "config.yaml", cfg, changes, resume_step)
    else:
        save_config(cfg, out_dir / "config.yaml")
    export = TeacherExport(out_dir / "teacher.pt", cfg)
    best = ModelCheckpoint(
        dirpath=out_dir / "checkpoints",
        filename="best-step{step}",
        monitor="val/dice_teacher",
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    # Lightning writes save_last only together with a new best; a plain per-epoch checkpoint keeps
    # last.ckpt at the final state, which is what --resume continues from (an epoch is a validation interval).
    last = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    every = cfg.train.checkpoint_every_steps
    if every > 0:  # the same last.ckpt between validations too: a resume from mid-interval is exact (docs/resume.md)
        callbacks = [*callbacks, CadenceCheckpoint(out_dir / "checkpoints", every)]
    loggers = (
        [ContinuedCSVLogger(out_dir, resume_step), TensorBoardLogger(out_dir, name="tensorboard", version="")]
        if logger
        else False
    )
    if resume:
        callbacks = [*callbacks, ContinuedStepCount()]
    train = cfg.train
    trainer = pl.Trainer(
        accelerator=train.accelerator,
        devices=list(train.devices) if isinstance(train.devices, tuple) else train.devices,
        num_nodes=train.num_nodes,
        strategy=train.strategy,
        precision=train.precision,
        max_steps=train.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=train.accumulate_grad_batches,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
        log_every_n_steps=train.log_every_steps,
        callbacks=[best, last, export, *callbacks],
        logger=loggers,
        default_root_dir=out_dir,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    ckpt_path = out_dir / "checkpoints" / "last.ckpt" if resume else None
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if resume else None)
    if trainer.is_global_zero and (out_dir / "teacher.pt").is_file():
        _learn_postprocessing(out_dir / "teacher.pt", datamodule)
    return TrainResult(
        run_dir=out_dir,
        best_dice_teacher=export.best if export.best > -math.inf else math.nan,
        last_dice_teacher=export.last.get("val/dice_teacher", math.nan),
        last_dice_student=export.last.get("val/dice_student", math.nan),
        steps=trainer.global_step,
    )


def _learn_postprocessing(model: Path, datamodule) -> None:
    """Learn the per-class component rules on the validation volumes with the exported teacher; store them in ``teacher.pt``."""
    from medeman.checkpoint import load_teacher, update_teacher_extra
    from medeman.postprocess import describe, learn_on_validation

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, cfg, _ = load_teacher(model, device)
    rules = learn_on_validation(net, cfg, datamodule.val_dataloader(), device)
    if rules is not None:
        update_teacher_extra(model, postprocessing=rules)
        print(f"post-processing learned on validation: {describe(rules)}")


def relearn_postprocessing(run_dir: str | Path, labeled: str | Path, val: str | Path) -> dict[str, Any] | None:
    """Learn a finished run's post-processing (class scales, component rules) again on ``val`` with this version's
    rules, and store it in its ``teacher.pt`` (the network is untouched); ``labeled`` is the folder it trained on."""
    from medeman.data.datamodule import SSLDataModule

    run_dir = Path(run_dir)
    cfg = load_config([run_dir / "config.yaml"])
    datamodule = SSLDataModule(cfg, labeled=labeled, val=val)
    datamodule.setup("fit")
    _learn_postprocessing(run_dir / "teacher.pt", datamodule)
    return read_teacher_file(run_dir / "teacher.pt")["extra"].get("postprocessing")


def _check_resume(out_dir: Path, cfg: Config | dict) -> tuple[int, dict[str, tuple[Any, Any]], Config]:
    """The step ``last.ckpt`` resumes from, the settings the resume changes and the config with its schedules pinned
    (in place too, for a dict: :func:`medeman.resume.pin_schedules`); a one-line ConfigError if it changes data or
    model settings (:func:`medeman.resume.check_resume`) or the checkpoint does not fit the network."""
    from medeman.module import SSLSegModule

    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        raise nothing_to_resume(out_dir, "config.yaml")
    saved = load_config([saved_path])
    cfg = cfg.to_dict() if isinstance(cfg, Config) else cfg
    pin_schedules(saved, cfg)
    changes = check_resume(out_dir, saved, validate(cfg))  # a diff of plain dicts (lists, as config.yaml has them)
    cfg = as_config(cfg)
    path = out_dir / "checkpoints" / "last.ckpt"
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ConfigError(f"{path}: cannot resume from it ({str(err).strip().splitlines()[0]})") from None
    expected = {k: tuple(v.shape) for k, v in SSLSegModule(cfg).state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
    differ = sorted(k for k in expected.keys() | saved.keys() if expected.get(k) != saved.get(k))
    if differ:
        raise ConfigError(
            f"{path}: cannot resume: the checkpoint's network differs from this config's in {len(differ)} "
            f"tensor(s) ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})"
        )
    return int(checkpoint["global_step"]), changes, cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medeman train",
        description="Train a 3D segmentation model from labeled and unlabeled scans: mean teacher with EMAN (or a baseline).",
    )
    parser.add_argument(
        "--labeled",
        required=True,
        help="labeled cohort: images/ + labels/, an MSD dataset.json, or an nnU-Net raw folder",
    )
    parser.add_argument("--unlabeled", help="folder of unlabeled scans (searched recursively)")
    parser.add_argument("--val", help="labeled validation cohort (default: a split of --labeled)")
    parser.add_argument(
        "--test", help="test cohort: never used as unlabeled scans, by path or by content (see medeman check-data)"
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML config; repeat to overlay (e.g. sample.yaml then mt_bn.yaml). Without it, medeman plans the recipe "
        "from the data (medeman plan) and keeps plan.yaml and fingerprint.json in --out",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. ssl.ema_momentum=0.999"
    )
    parser.add_argument("--out", default="runs/medeman", help="run folder (default: runs/medeman)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    parser.add_argument("--seed", type=int, help="shorthand for --set train.seed=N")
    parser.add_argument("--devices", help="shorthand for --set train.devices=N")
    parser.add_argument("--strategy", help="shorthand for --set train.strategy=NAME (e.g. ddp)")
    parser.add_argument("--num-nodes", type=int, help="shorthand for --set train.num_nodes=M")
    parser.add_argument(
        "--time-budget",
        help="fit the run in this time (e.g. 900, 15m, 1h30m): a few training steps are timed and "
        "train.max_steps (and, when planning, the network and patch) chosen to fit",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        help="without --config: plan for this device (default: gpu if one is present)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--threads", type=int, help="shorthand for --set train.num_threads=N (torch threads per process)"
    )
    return parser


def _plan_run(args: argparse.Namespace) -> None:
    """Without ``--config``: plan the recipe from the data into ``--out`` and train with it (``--set`` still overrides)."""
    from medeman.plan import plan_cohort

    out = Path(args.out)
    if rank_zero_only.rank != 0:  # a DDP process Lightning launched after rank 0 planned: train with rank 0's plan
        args.config = [str(out / "plan.yaml")]
        return
    prepare_run_dir(
        out, resume=False, overwrite=args.overwrite
    )  # refuse (or clear) an earlier run before writing the plan
    plan = plan_cohort(
        args.labeled, args.unlabeled, out / "plan.yaml", device=args.device, time_budget=args.time_budget
    )
    if rank_zero_only.rank == 0:
        print(f"no --config: planned from the data ({out / 'plan.yaml'}; --set overrides a key):\n{plan.summary()}")
    args.config = [str(out / "plan.yaml")]


def fit_time_budget(cfg: Config | dict, budget: str, sets: Sequence[str] = ()) -> dict:
    """``cfg`` with ``train.max_steps`` timed to fit ``budget`` and its step-based keys scaled with it.

    A ``--set train.max_steps`` wins over the budget. The ramp-up, warm-up and momentum window
    keep their share of the run (:func:`medeman.tune.run_config`), and so does the validation interval.
    """
    from medeman.planning import TIME_OVERHEAD, parse_duration, time_training_steps
    from medeman.tune import run_config

    if any(item.split("=", 1)[0].strip() == "train.max_steps" for item in sets):
        return cfg
    try:
        seconds = parse_duration(budget)
    except ValueError as err:
        raise ConfigError(f"--time-budget: {err}") from None
    typed = as_config(cfg)
    device = "cuda" if typed.train.accelerator in ("auto", "gpu") and torch.cuda.is_available() else "cpu"
    per_step = time_training_steps(typed, device=device)
    steps = max(1, int(seconds * (1.0 - TIME_OVERHEAD) / per_step))
    scale = steps / typed.train.max_steps
    out = run_config(typed, {}, steps)  # a dict: the scaled values (schedules, focus refresh) are written into it
    out["train"]["val_every_steps"] = max(1, min(steps, round(typed.train.val_every_steps * scale)))
    if rank_zero_only.rank == 0:
        print(
            f"--time-budget {budget}: {per_step:.3f} s per timed step -> train.max_steps={steps} (step-based keys scaled x{scale:.3g})"
        )
    return validate(out)


def config_from_args(args: argparse.Namespace) -> dict:
    """Resolve the config of a CLI call (a resumed run starts from its saved config.yaml)."""
    sets = list(args.set)
    for flag, key in (
        ("seed", "train.seed"),
        ("devices", "train.devices"),
        ("strategy", "train.strategy"),
        ("num_nodes", "train.num_nodes"),
        ("threads", "train.num_threads"),
    ):
        if getattr(args, flag, None) is not None:
            sets.append(f"{key}={getattr(args, flag)}")
    paths: list[str | Path] = list(args.config)
    if getattr(args, "resume", False):
        paths = [Path(args.out) / "config.yaml"]
        if not paths[0].is_file():
            raise nothing_to_resume(Path(args.out), "config.yaml")
    return load_config(paths, sets)


def main(argv: Sequence[str] | None = None) -> int:
    """``medeman train`` / ``scripts/train_ssl_seg.py``."""
    from medeman.data import DataError

    args = build_parser().parse_args(argv)
    hide_lightning_advert()
    new_folder = not Path(args.out).exists()
    try:
        planned = not args.config and not args.resume
        if planned:
            _plan_run(args)  # a time budget is fitted by the plan itself
        cfg = config_from_args(args)
        set_threads_for_config(cfg)
        if args.time_budget is not None and not planned and not args.resume:
            cfg = fit_time_budget(cfg, args.time_budget, args.set)
        result = fit(
            cfg,
            args.labeled,
            args.unlabeled,
            args.val,
            args.out,
            test=args.test,
            resume=args.resume,
            overwrite=args.overwrite,
            progress_bar=not args.no_progress,
            keep=PLAN_OUTPUTS if planned else (),
        )
    except (ConfigError, DataError) as err:
        out = Path(args.out)
        if new_folder and out.is_dir() and all(p.name in PLAN_OUTPUTS and p.is_file() for p in out.iterdir()):
            for written in out.iterdir():  # only this call's plan: a refused run leaves no run folder behind
                written.unlink()
            out.rmdir()
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"done: {result.steps} steps; validation Dice teacher {result.last_dice_teacher:.3f}, student {result.last_dice_student:.3f} "
        f"(best validation {result.best_dice_teacher:.3f}); model {result.run_dir / 'teacher.pt'} (train.deploy={as_config(cfg).train.deploy})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
