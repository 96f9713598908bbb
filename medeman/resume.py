"""Continuing a stopped run: which settings a resume may change, where the changes are recorded, and the log that goes on.

A resumed run continues from ``checkpoints/last.ckpt`` (written at every validation) and replays
exactly what the uninterrupted run would have drawn from there (the training stream is a function
of the seed and the step, :mod:`medeman.data.batches`). Data and model settings cannot change under
a trained network; optimisation settings (``train.max_steps``, ``train.lr``, loss weights, ...)
may, and take effect at the step the run resumed from, noted in ``config.yaml``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from medeman.config import ConfigError, SCHEMA, render_yaml

# Settings that shape the data or the networks (and their saved state): a resume must keep them.
# Every data.* key is one, less those that only say how the data are loaded.
LOADING_ONLY = ("data.num_workers", "data.cache", "data.cache_dir")
FIXED = (
    "ssl.method",
    "ssl.teacher_norm",
    "ssl.pseudo_label_threshold_mode",
    "train.optimizer",
    "train.accumulate_grad_batches",
    "train.seed",
    "train.deep_supervision",
    "train.deep_supervision_heads",
)
HISTORY = "# resumed at step"


def changed_settings(saved: dict, cfg: dict) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (saved value, new value)}`` for every key whose value differs."""
    return {
        f"{section}.{key}": (saved[section][key], cfg[section][key])
        for section, options in SCHEMA.items()
        for key in options
        if saved[section][key] != cfg[section][key]
    }


def is_fixed(key: str) -> bool:
    """Whether a resume must keep ``key`` (a data or model setting)."""
    return (key.startswith(("data.", "model.")) and key not in LOADING_ONLY) or key in FIXED


def check_resume(run_dir: Path, saved: dict, cfg: dict) -> dict[str, tuple[Any, Any]]:
    """The settings a resume changes; a one-line ConfigError naming them if any is a data or model setting.

    Raises:
        ConfigError: e.g. ``cannot resume runs/x: data or model settings differ from its config.yaml:
            data.num_classes 3 -> 4; ...``.
    """
    changes = changed_settings(saved, cfg)
    refused = {key: values for key, values in changes.items() if is_fixed(key)}
    if refused:
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise ConfigError(
            f"cannot resume {run_dir}: data or model settings differ from its config.yaml ({listed}); "
            "resume with them unchanged, or start a new run (another --out, or --overwrite)"
        )
    return changes


def record_resume(path: Path, cfg: dict, changes: dict[str, tuple[Any, Any]], step: int) -> None:
    """Rewrite ``config.yaml`` with the resumed run's settings, keeping one comment line per resume that changed any."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    history = [line for line in text.splitlines() if line.startswith(HISTORY)]
    if changes:
        history.append(
            f"{HISTORY} {step}: " + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
        )
    path.write_text("\n".join(history) + ("\n" if history else "") + render_yaml(cfg), encoding="utf-8")


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps an earlier ``metrics.csv`` (Lightning's deletes it when it starts).

    With ``resume_step``, the rows of steps from ``resume_step`` on (written after the checkpoint,
    before the run stopped, so about to be logged again) are dropped when the first new row is
    saved: not before, so a resume that fails earlier leaves the file as it was.
    """

    def __init__(self, log_dir: str, resume_step: int | None):
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        pass  # an earlier run's metrics.csv is kept (prepare_run_dir removes it for a new run)

    def save(self) -> None:
        if not self.metrics:  # Lightning also saves before anything was logged
            return
        if self._resume_step is not None and Path(self.metrics_file_path).is_file():
            with open(self.metrics_file_path, newline="") as handle:
                reader = csv.DictReader(handle)
                keys = list(reader.fieldnames or [])
                rows = [row for row in reader if row.get("step") and int(row["step"]) < self._resume_step]
            with open(self.metrics_file_path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
            self.metrics_keys = sorted(keys)  # the header the new rows are appended under (widened as keys appear)
        self._resume_step = None
        super().save()


class ContinuedCSVLogger(CSVLogger):
    """``metrics.csv`` of a run, continued (not restarted) by a resume from ``resume_step``."""

    def __init__(self, save_dir: str | Path, resume_step: int | None = None):
        super().__init__(save_dir, name="", version="")
        self._resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            Path(self.root_dir).mkdir(parents=True, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self._resume_step)
        return self._experiment


class ContinuedStepCount(pl.Callback):
    """Logs a resumed run's rows at the steps the uninterrupted run logs them.

    Lightning adds one to its logging step count after restoring a checkpoint written at the end
    of a training epoch (as ``last.ckpt`` is), so every later row sat one step late and a
    ``log_every_n_steps`` row went missing. Before every training batch the count is the step.
    """

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


class CadenceCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every`` steps between validations (``train.checkpoint_every_steps``).

    The last step of a validation interval is left to the checkpoint written after its
    validation: resumed from a checkpoint written before it, Lightning runs that validation but
    logs none of it.
    """

    def __init__(self, dirpath: Path, every: int):
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            every_n_train_steps=every,
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 < trainer.num_training_batches:
            super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)


def pin_schedules(saved: dict, cfg: dict) -> None:
    """Keep a resumed run's warm-up, ramp-up, BCP pre-training and focus refresh where the stopped run had them, in steps.

    They are fractions of ``train.max_steps`` unless given in steps (:mod:`medeman.schedules`): a resume
    that extends the run would otherwise move the end of the warm-up, and the teacher would restart as
    the student a second time. Pinned values are ordinary changed settings, recorded in ``config.yaml``.
    """
    from medeman.schedules import run_schedule

    if saved["train"]["max_steps"] == cfg["train"]["max_steps"]:
        return
    before = run_schedule(saved)
    for key in ("warmup_steps", "rampup_steps", "bcp_pretrain_steps"):
        if cfg["ssl"][key] is None:
            cfg["ssl"][key] = getattr(before, key)
    if cfg["ssl"]["adaptive_threshold_momentum"] is None:
        cfg["ssl"]["adaptive_threshold_momentum"] = before.threshold_momentum
    if cfg["data"]["unlabeled_focus_fraction"] > 0 and cfg["data"]["unlabeled_focus_every_steps"] is None:
        cfg["data"]["unlabeled_focus_every_steps"] = before.focus_every_steps
