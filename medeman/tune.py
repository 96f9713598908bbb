"""Tune how much to trust the teacher (EMA momentum) and how hard to pull toward it (consistency weight).

Each Optuna trial is a (shortened) training run. What is searched, what is measured, and why:

* **Momentum as a window.** The teacher averages the student over about ``1 / (1 - m)`` steps, and
  with the EMA warm-up every ``m >= 1 - 1/T`` behaves alike in a ``T``-step run. So the search is
  over the averaging window as a fraction ``w`` of the run (``tune.momentum_window``, log-uniform
  in (0, 1]); a run of ``T`` steps gets ``m = 1 - 1/(w T)`` (with ``ssl.momentum_schedule: window``
  the config holds ``w`` itself). No part of the prior is degenerate, and the same ``w`` means the
  same thing in a 200-step trial and in the 20000-step run it stands for.
* **Shortened trials are the full run, scaled.** With ``tune.max_steps`` below ``train.max_steps``
  every step-based key is scaled by the same factor (ramp-up, warm-up, the momentum window; the
  learning-rate schedule follows ``train.max_steps``), and the written ``best_params.yaml`` and
  ``best_config.yaml`` hold the values for the full run (:func:`trial_config`, :func:`full_config`).
* **A robust objective.** A trial validates ``tune.validations`` times; its value is the mean
  ``val/dice_teacher`` of its last ``tune.objective_last_k`` validations, not the best single one
  (the maximum of noisy validations rewards noise). Pruning (``MedianPruner``) compares that same
  running mean at the same step, and only after ``tune.prune_after`` of the trial: early in a run
  a teacher with a long window lags the student by construction, so early teacher Dice would
  prune exactly the slow teachers the search is about.
* **TPE** is multivariate (momentum and weight interact) with a constant liar, so workers that
  share a study do not all sample the same point while their trials run.

The study lives in a storage that any number of workers may share, each running the same command:

* no ``--storage``: an SQLite file ``<out>/study.db``, so rerunning the command resumes the study;
* an SQLAlchemy URL (``postgresql://user@host/db``, ``sqlite:///path.db``): a database that workers
  on many machines share;
* any other value is a path to an Optuna journal file, for a shared filesystem without a database.

In a database, each running trial records a heartbeat (``tune.heartbeat_interval``); a trial whose
worker died (``kill -9``, a lost node) is failed after ``tune.grace_period`` by the next worker
that looks, and retried with the same parameters (``RetryHeartbeatStaleTrialCallback``, formerly
``RetryFailedTrialCallback``). ``--n-trials`` is what this worker runs; ``--max-trials`` caps the
study's total across all workers and runs, a retried trial counting once. Each trial's run folder
``<out>/trial_NNNN`` is kept. At the end the best parameters are written as a config overlay
(``best_params.yaml``) and a full config (``best_config.yaml``), a table of trials is printed and
plots are saved.

Example:
    medeman tune --config configs/sample.yaml --labeled sample_data/labeled \\
        --unlabeled sample_data/unlabeled --study demo --n-trials 4 --out runs/tune
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import random
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import optuna
import yaml
from lightning.pytorch.callbacks import Callback
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from medeman.config import ConfigError, load_config, render_yaml, validate
from medeman.data.errors import DataError
from medeman.threads import apply_threads, choose_threads, local_processes
from medeman.typed_config import Config, Section, as_config

if TYPE_CHECKING:  # the data stack is imported late (heavy)
    from medeman.data.datamodule import CohortCache

MONITOR = "val/dice_teacher"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STARTED = (TrialState.RUNNING, *FINISHED)
_log = logging.getLogger("medeman.tune")

# Optuna parameter -> the ``tune:`` range it is drawn from, and whether log-uniform. The values are
# in units of the full run (a window fraction, a weight, full-run ramp-up steps); how they become a
# run's config is :func:`run_config`, the one place for trials and best_*.yaml alike.
PARAMS: dict[str, bool] = {
    "momentum_window": True,
    "consistency_weight": True,
    "pseudo_label_threshold": False,
    "rampup_steps": True,
}


def suggest(trial: optuna.Trial, tune: Section | Mapping[str, Any]) -> dict[str, Any]:
    """Sample one point of the ``tune:`` search space (ranges checked by :func:`medeman.config.validate`)."""
    tune = tune.to_dict() if isinstance(tune, Section) else tune  # looked up by the names of PARAMS
    for name, log in PARAMS.items():
        if tune[name] is None:
            continue
        low, high = tune[name]
        if name == "rampup_steps":
            trial.suggest_int(name, int(low), int(high), log=log)
        else:
            trial.suggest_float(name, float(low), float(high), log=log)
    return dict(trial.params)


def trial_steps(cfg: Config | dict) -> int:
    """Optimizer steps of one trial."""
    cfg = as_config(cfg)
    return cfg.tune.max_steps if cfg.tune.max_steps is not None else cfg.train.max_steps


def momentum_window(cfg: Config | dict, params: dict[str, Any]) -> float | None:
    """The teacher's averaging window as a fraction of the run: the tuned one, else the config's.

    ``None`` for a config whose momentum is 1 (a frozen teacher has no window).
    """
    if "momentum_window" in params:
        return float(params["momentum_window"])
    cfg = as_config(cfg)
    ssl = cfg.ssl
    if ssl.momentum_schedule == "window":
        return ssl.momentum_window
    m = ssl.ema_momentum
    return None if m >= 1.0 else 1.0 / ((1.0 - m) * cfg.train.max_steps)


def momentum_for(window: float, steps: int) -> float:
    """EMA momentum whose averaging window is ``window`` of a ``steps``-step run: ``1 - 1/(window * steps)``, at least 0."""
    return round(max(0.0, 1.0 - 1.0 / (window * steps)), 12)


def run_config(cfg: Config | dict, params: dict[str, Any], steps: int) -> dict:
    """``cfg`` with the trial parameters ``params`` set, for a run of ``steps`` optimizer steps.

    ``cfg`` describes the full run (``train.max_steps``) and the parameters are in its units. With
    ``r = steps / train.max_steps``, the ramp-up, warm-up and focus refresh given in steps become ``round(r x)`` steps, and the
    momentum keeps its window fraction ``w``: ``ssl.momentum_window = w`` with the window schedule,
    else ``ssl.ema_momentum = 1 - 1/(w steps)`` (the start of the cosine schedule). ``cfg`` is not
    changed.
    """
    cfg = as_config(cfg)
    out = cfg.to_dict()  # a dict: the trial's values are written into it
    ssl = out["ssl"]
    full = cfg.train.max_steps
    scale = steps / full
    for key in ("consistency_weight", "pseudo_label_threshold"):
        if key in params:
            ssl[key] = float(params[key])
    # a schedule given in steps is scaled to the trial; a null one is a fraction of max_steps already
    rampup = params.get("rampup_steps", ssl["rampup_steps"])
    if rampup is not None:
        ssl["rampup_steps"] = max(1, round(int(rampup) * scale)) if int(rampup) > 0 else 0
    for key in ("warmup_steps", "bcp_pretrain_steps"):
        if ssl[key] is not None:
            ssl[key] = round(int(ssl[key]) * scale)
    focus_every = out["data"]["unlabeled_focus_every_steps"]
    if focus_every is not None:
        out["data"]["unlabeled_focus_every_steps"] = max(1, round(int(focus_every) * scale))
    window = momentum_window(cfg, params)
    if cfg.ssl.momentum_schedule == "window":
        ssl["momentum_window"] = window
    elif window is not None and ("momentum_window" in params or steps != full):
        ssl["ema_momentum"] = momentum_for(window, steps)
    out["train"]["max_steps"] = int(steps)
    return validate(out)


def validation_schedule(cfg: Config | dict) -> tuple[int, int]:
    """``(every, after)``: a trial validates every ``every`` steps, at the steps past ``after`` only.

    Only validations that can prune the trial or enter its objective are worth their cost: the
    ``tune.validations`` of them are spread evenly over the part of the trial after
    ``tune.prune_after``, the last at the trial's last step ``T``. ``every`` is the largest divisor
    of ``T`` up to ``ceil(T (1 - prune_after) / validations)`` (an epoch is one interval, and
    Lightning validates at epoch ends only), so a ``T`` with small divisors spreads them best.
    """
    steps, tune = trial_steps(cfg), as_config(cfg).tune
    target = max(1, math.ceil(steps * (1.0 - tune.prune_after) / tune.validations))
    every = max(d for d in range(1, target + 1) if steps % d == 0)
    return every, max(0, steps - every * tune.validations)


def trial_config(cfg: Config | dict, params: dict[str, Any]) -> dict:
    """The config of one trial: :func:`run_config` for ``tune.max_steps`` steps, validating as :func:`validation_schedule` says."""
    out = run_config(cfg, params, trial_steps(cfg))
    out["train"]["val_every_steps"] = validation_schedule(cfg)[0]
    return out


def full_config(cfg: Config | dict, params: dict[str, Any]) -> dict:
    """The config of the full run (``train.max_steps``) with the trial parameters ``params``: what best_config.yaml holds."""
    return run_config(cfg, params, as_config(cfg).train.max_steps)


def tuned_keys(cfg: Config | dict, params: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """The full-run config values that ``params`` set, ``{(section, key): value}``: best_params.yaml and the table."""
    full = full_config(cfg, params)
    keys = [("ssl", name) for name in params if name in PARAMS and name != "momentum_window"]
    if "momentum_window" in params:
        window_key = "momentum_window" if as_config(cfg).ssl.momentum_schedule == "window" else "ema_momentum"
        keys.insert(0, ("ssl", window_key))
    return {(section, key): full[section][key] for section, key in keys}


class TrialReporter(Callback):
    """Reports a trial's validations to Optuna and prunes it; its :meth:`value` is the trial's objective.

    At every validation the running mean of the last ``k`` ``val/dice_teacher`` values is reported
    at the optimizer step, so the median pruner compares the objective's own statistic between
    trials at the same step; ``MedianPruner(n_warmup_steps=...)`` holds pruning off for the first
    ``tune.prune_after`` of the trial. In a multi-process run rank 0 reports and decides, and every
    rank stops.
    """

    def __init__(self, trial: optuna.Trial, last_k: int, every: int = 1, after: int = 0):
        self.trial, self.last_k = trial, int(last_k)
        self.every, self.after = int(every), int(after)
        self.history: list[tuple[int, float]] = []
        self.pruned_at: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # An epoch is one validation interval (SSLDataModule); skip the validations at steps <= after,
        # which could neither prune the trial nor enter its objective (see validation_schedule).
        ends_at = (trainer.current_epoch + 1) * self.every
        trainer.check_val_every_n_epoch = 1 if ends_at > self.after else trainer.current_epoch + 2

    def value(self) -> float:
        """Mean of the last ``k`` validations (NaN when the run never validated)."""
        scores = [score for _, score in self.history[-self.last_k :]]
        return sum(scores) / len(scores) if scores else math.nan

    def record(self, step: int, score: float) -> bool:
        """Record a validation at ``step``, report the running objective; return whether to prune."""
        self.history.append((int(step), float(score)))
        self.trial.report(self.value(), step=int(step))
        return self.trial.should_prune()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(MONITOR)
        if score is None:
            warnings.warn(f"'{MONITOR}' was not logged at step {trainer.global_step}: the trial cannot be scored there")
            return
        prune = self.record(trainer.global_step, float(score)) if trainer.is_global_zero else False
        if trainer.world_size > 1:
            prune = trainer.strategy.broadcast(prune)
        if prune:
            self.pruned_at = int(trainer.global_step)
            if trainer.world_size > 1:
                trainer.should_stop = True  # an exception on one rank would hang the others
            else:
                raise optuna.TrialPruned(
                    f"pruned at step {self.pruned_at} with the mean of the last {self.last_k} {MONITOR}={self.value():.4f}"
                )

    def check_pruned(self) -> None:
        if self.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {self.pruned_at}")


def objective(
    trial: optuna.Trial,
    cfg: Config | dict,
    labeled: str | Path,
    unlabeled: str | Path | None,
    val: str | Path | None,
    out_dir: Path,
    train_fn: Callable | None = None,
    test: str | Path | None = None,
    cohorts: CohortCache | None = None,
) -> float:
    """Train once with the trial's parameters in ``<out_dir>/trial_NNNN``; return the mean of its last k ``val/dice_teacher``.

    ``test``: a test cohort that is never used as unlabeled scans (passed on to ``train_fn`` as ``test=``).
    With ``data.cache: disk`` and no ``data.cache_dir``, every trial (and every worker with this
    ``out_dir``) uses ``<out_dir>/cache``, where the preprocessed scans are keyed by the data config.
    ``cohorts``: the worker's :class:`~medeman.data.datamodule.CohortCache`, passed on to ``train_fn``.
    """
    if train_fn is None:
        from medeman.train import fit as train_fn
    cfg = as_config(cfg)
    params = suggest(trial, cfg.tune)
    run_dir = Path(out_dir) / f"trial_{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    reporter = TrialReporter(trial, cfg.tune.objective_last_k, *validation_schedule(cfg))
    config = trial_config(cfg, params)  # a dict: the cache folder is written into it
    if cfg.data.cache == "disk" and cfg.data.cache_dir is None:
        config["data"]["cache_dir"] = str((Path(out_dir) / "cache").resolve())
    try:
        train_fn(
            config,
            labeled,
            unlabeled,
            val,
            run_dir,
            callbacks=[reporter],
            overwrite=True,
            progress_bar=False,
            logger=True,
            **({"test": test} if test is not None else {}),  # stand-ins in tests need not know it
            **({"cohorts": cohorts} if cohorts is not None else {}),
        )
    finally:
        trial.set_user_attr("validations", [[step, round(score, 6)] for step, score in reporter.history])
    reporter.check_pruned()
    return reporter.value()


def database_url(url: str) -> str:
    """``url`` with the PostgreSQL driver that is installed: SQLAlchemy 2.1 reads a bare ``postgresql://``
    as psycopg 3, while medeman's ``postgres`` extra installs psycopg2."""
    import importlib.util

    if (
        url.startswith("postgresql://")
        and importlib.util.find_spec("psycopg") is None
        and importlib.util.find_spec("psycopg2") is not None
    ):
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def as_tune(tune: Section | Mapping[str, Any] | None) -> Section | None:
    """The ``tune`` section of a :class:`~medeman.typed_config.Config`; a mapping is read onto the defaults and checked."""
    if tune is None or isinstance(tune, Section):
        return tune
    return as_config({"tune": dict(tune)}).tune


def open_storage(
    storage: str | None, out_dir: Path, tune: Section | Mapping[str, Any] | None = None
) -> optuna.storages.BaseStorage:
    """Storage from ``--storage``: default SQLite in ``out_dir``, an SQLAlchemy URL, or a journal file path.

    A database storage records heartbeats of running trials (``tune.heartbeat_interval``, ``tune.grace_period``)
    and retries a trial whose heartbeat stopped up to ``tune.max_retries`` times; Optuna's journal
    storage has no heartbeat.
    """
    tune = as_tune(tune)
    if storage is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(out_dir / 'study.db').resolve()}"
    if "://" not in storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        if tune is not None and tune.heartbeat_interval is not None:
            _log.info(
                "a journal storage has no heartbeat: a trial whose worker dies stays RUNNING (use a database to retry it)"
            )
        return JournalStorage(JournalFileBackend(str(storage)))
    check_storage_url(storage)
    given, storage = storage, database_url(storage)
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {"pool_pre_ping": True}
    heartbeat: dict[str, Any] = {}
    if tune is not None and tune.heartbeat_interval is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = RetryHeartbeatStaleTrialCallback(max_retry=tune.max_retries)
        heartbeat = {
            "heartbeat_interval": tune.heartbeat_interval,
            "grace_period": tune.grace_period,
            "heartbeat_stale_trial_callback": retry,
        }
    # Workers that start together race to create the schema; the loser's error is harmless, so retry.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs, **heartbeat)
        except ModuleNotFoundError as err:  # the database's driver
            raise ConfigError(
                f"--storage {_where(given)}: the database driver {err.name} is not installed "
                "(pip install 'medeman[postgres]' for PostgreSQL)"
            ) from None
        except Exception as err:  # sqlalchemy's OperationalError/IntegrityError/ProgrammingError
            unreachable = type(err).__name__ == "OperationalError" and not storage.startswith("sqlite")
            if attempt == 4 or unreachable or "sqlalchemy" not in type(err).__module__:
                raise ConfigError(
                    f"--storage {_where(given)}: cannot open the study database: {_reason(err)}"
                ) from None
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


STORAGE_SCHEMES = ("sqlite", "postgresql")
"""Database URL schemes ``--storage`` takes (with an optional SQLAlchemy driver, ``postgresql+psycopg2://``)."""


def check_storage_url(url: str) -> None:
    """Refuse a ``--storage`` URL whose scheme medeman does not support, naming it and what is supported."""
    scheme = url.split("://", 1)[0]
    if scheme.split("+", 1)[0].lower() not in STORAGE_SCHEMES:
        raise ConfigError(
            f"--storage {_where(url)}: unknown database scheme '{scheme}'; medeman supports sqlite:///path/study.db, "
            "postgresql://user@host/db, or a journal file path (no ://)"
        )
    path = url.split(":///", 1)[1] if scheme.startswith("sqlite") and ":///" in url else ""
    if path and path != ":memory:" and not Path(path).parent.is_dir():
        raise ConfigError(
            f"--storage {url}: the folder {Path(path).parent} does not exist (SQLite creates the file, not its folder)"
        )


def _where(url: str) -> str:
    """The URL without its password, for messages: scheme, host and database."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: only the scheme is safe to show
        return url.split("://", 1)[0] + "://..."


def _reason(err: BaseException) -> str:
    """SQLAlchemy's first line without its ``(Background on this error ...)`` tail and SQL echo."""
    text = str(getattr(err, "orig", None) or err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:240]


def make_sampler(seed: int) -> optuna.samplers.TPESampler:
    """Multivariate TPE (momentum and weight interact), with a constant liar for the trials other workers are running."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def open_study(cfg: Config | dict, study_name: str, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study, or load it when it exists (another worker, or an earlier run of this command)."""
    tune = as_config(cfg).tune
    # Reports are keyed by optimizer step; nothing is pruned before prune_after of the trial.
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=tune.n_startup_trials,
        n_warmup_steps=math.ceil(tune.prune_after * trial_steps(cfg)),
    )
    return optuna.create_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(tune.sampler_seed),
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )


def original_number(trial: FrozenTrial) -> int:
    """The number of the trial that ``trial`` retries (its own number when it is no retry)."""
    history = trial.system_attrs.get("retry_history") or []
    return int(history[0]) if history else trial.number


def _counted(trials: Sequence[FrozenTrial]) -> set[int]:
    """Trials that count against ``--max-trials``: started ones and queued retries, a trial and its retries once."""
    return {
        original_number(t)
        for t in trials
        if t.state in STARTED or (t.state == TrialState.WAITING and t.system_attrs.get("retry_history"))
    }


def n_counted(study: optuna.Study) -> int:
    """How many trials the study holds for ``--max-trials`` (a retried trial counts once)."""
    return len(_counted(study.get_trials(deepcopy=False)))


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail the running trials whose heartbeat stopped (their worker died) and queue their retries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _claim(study: optuna.Study, storage: optuna.storages.BaseStorage, max_trials: int | None) -> optuna.Trial | None:
    """Start a trial (a queued retry first) unless the study holds ``max_trials`` already; ``None`` when it is full.

    Optuna's ``MaxTrialsCallback`` counts after a trial ends, so two workers that finish together
    can both start one more. Here a new trial that turns out to be beyond the cap (other workers
    took the last places between our count and our ask) goes back to the queue as WAITING,
    untouched, for the next run to take. A retry never exceeds the cap: its trial counts already.
    """
    full = max_trials is not None and n_counted(study) >= max_trials
    if full and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    if max_trials is None:
        return trial
    trials = study.get_trials(deepcopy=False)
    mine = next(t for t in trials if t.number == trial.number)
    if original_number(mine) != trial.number:
        return trial
    ahead = _counted([t for t in trials if t.number < trial.number]) - {trial.number}
    if full or len(ahead) >= max_trials:
        storage.set_trial_state_values(trial_id(storage, study, trial), TrialState.WAITING)
        return None
    return trial


def trial_id(storage: optuna.storages.BaseStorage, study: optuna.Study, trial: optuna.Trial) -> int:
    """The storage's id of ``trial``, asked through the public storage API (Optuna's ``Trial`` keeps it private)."""
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), trial.number
    )


def heartbeat_thread_factory() -> Callable[[int, optuna.storages.BaseStorage], contextlib.AbstractContextManager]:
    """Optuna's ``get_heartbeat_thread(trial_id, storage)``: the thread ``Study.optimize`` runs around each trial.

    Ask-and-tell has to start it itself, and Optuna offers it only from a private module: this is the
    one place medeman reaches it, and ``tests/test_tune.py`` fails with this message if it moves.

    Raises:
        RuntimeError: the installed Optuna no longer has it where medeman looks.
    """
    try:
        from optuna.storages._heartbeat import get_heartbeat_thread
    except ImportError as err:
        raise RuntimeError(
            f"optuna {optuna.__version__} has no optuna.storages._heartbeat.get_heartbeat_thread "
            f"({err}): medeman.tune.heartbeat_thread_factory must follow it to its new place"
        ) from None
    return get_heartbeat_thread


def _heartbeat(
    storage: optuna.storages.BaseStorage, study: optuna.Study, trial: optuna.Trial
) -> contextlib.AbstractContextManager:
    # The heartbeat thread Study.optimize runs around each trial; ask-and-tell has to start it itself.
    return heartbeat_thread_factory()(trial_id(storage, study, trial), storage)


def _run_trial(
    storage: optuna.storages.BaseStorage,
    study: optuna.Study,
    trial: optuna.Trial,
    func: Callable[[optuna.Trial], float],
) -> None:
    """Run one trial and record it: COMPLETE with its value, PRUNED, or FAIL with the error."""
    try:
        with _heartbeat(storage, study, trial):
            value = func(trial)
    except optuna.TrialPruned as err:
        study.tell(trial, state=TrialState.PRUNED)
        _log.info("trial %d pruned: %s", trial.number, err)
    except (ConfigError, DataError) as err:  # bad input fails every trial alike: stop here and say it once
        trial.set_user_attr("error", f"{type(err).__name__}: {err}")
        study.tell(trial, state=TrialState.FAIL)
        raise
    except BaseException as err:  # Lightning turns Ctrl-C into SystemExit: record the trial either way
        trial.set_user_attr("error", f"{type(err).__name__}: {err}" if isinstance(err, Exception) else "interrupted")
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
        study.tell(trial, state=TrialState.FAIL)
        if not isinstance(err, Exception):
            raise
        _log.warning("trial %d failed: %s", trial.number, traceback.format_exc())
    else:
        if math.isnan(value):
            trial.set_user_attr("error", f"no {MONITOR} was logged: the run never validated")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)
            _log.info("trial %d finished: mean of the last %s=%.4f", trial.number, MONITOR, value)
    finally:
        gc.collect()
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _others_running(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def run_study(
    cfg: Config | dict,
    labeled: str | Path,
    unlabeled: str | Path | None = None,
    val: str | Path | None = None,
    *,
    study_name: str,
    out_dir: str | Path = "runs/tune",
    storage: str | None = None,
    n_trials: int | None = None,
    max_trials: int | None = None,
    timeout: float | None = None,
    train_fn: Callable | None = None,
    test: str | Path | None = None,
) -> optuna.Study:
    """Run trials of ``study_name`` in this process until ``n_trials``, ``timeout`` or the study's ``max_trials``.

    Before each trial, running trials whose heartbeat stopped are failed and queued again with the
    same parameters; a queued retry is run before a new point is sampled. When the cap is reached
    while other workers' trials still run (database storages), the worker waits for them, so that a
    trial whose worker dies is still retried.

    Args:
        cfg: resolved config (:func:`medeman.config.load_config`); its ``tune:`` section is the search.
        labeled, unlabeled, val: data folders, as for :func:`medeman.train.fit`.
        test: test cohort, never used as unlabeled scans (as ``medeman train --test``); never tuned on.
        study_name: the study to create or join.
        out_dir: trial run folders ``trial_NNNN`` (and the default SQLite storage).
        storage: SQLAlchemy URL or journal file path; ``None`` is ``sqlite:///<out_dir>/study.db``.
        n_trials: trials this call runs at most (``None``: no limit, stop on ``timeout`` or ``max_trials``).
        max_trials: cap on the study's trials across every worker and run (running ones count, a
            retried trial once).
        timeout: seconds after which no new trial starts (nor does the worker wait any longer).
        train_fn: stand-in for :func:`medeman.train.fit` (same signature), for tests.

    Returns:
        The study, with the trials of every worker.
    """
    from medeman.data.datamodule import CohortCache

    cfg = as_config(cfg)
    out_dir = Path(out_dir)
    backend = open_storage(storage, out_dir, cfg.tune)
    study = open_study(cfg, study_name, backend)
    seed = cfg.tune.sampler_seed
    heartbeat = getattr(backend, "get_heartbeat_interval", lambda: None)() is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    done, waiting = 0, False
    cohorts = CohortCache()  # the trials of this worker preprocess the cohort once
    while n_trials is None or done < n_trials:
        if deadline is not None and time.monotonic() >= deadline:
            break
        fail_dead_trials(study)
        trial = _claim(study, backend, max_trials)
        if trial is None:
            if heartbeat and _others_running(study):
                if not waiting:
                    _log.info(
                        "study %s is at its cap of %d trials: waiting for the %d running one(s) "
                        "(a trial whose worker died is retried here)",
                        study_name,
                        max_trials,
                        _others_running(study),
                    )
                waiting = True
                time.sleep(cfg.tune.heartbeat_interval)
                continue
            _log.info("study %s holds %d trials, its cap: this worker stops", study_name, max_trials)
            break
        waiting = False
        # Seed each trial by its number: a resumed study or a second worker draws new points, and a
        # single worker's study is reproducible. TPE keeps no state beyond its RNG (history is in storage).
        study.sampler = make_sampler(seed + trial.number)
        retried = backend.get_trial(trial_id(backend, study, trial)).system_attrs.get("retry_history")
        if retried:
            _log.info("trial %d retries trial %d, whose worker stopped (same parameters)", trial.number, retried[-1])
        with warnings.catch_warnings():  # ask-and-tell with a heartbeat: _run_trial runs the heartbeat thread
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            _run_trial(
                backend,
                study,
                trial,
                lambda t: objective(t, cfg, labeled, unlabeled, val, out_dir, train_fn, test, cohorts),
            )
        done += 1
    return study


def best_overlay(study: optuna.Study, cfg: Config | dict) -> dict[str, dict[str, Any]]:
    """The best trial's parameters as a config overlay ``{section: {key: value}}`` for the full run."""
    overlay: dict[str, dict[str, Any]] = {}
    for (section, key), value in tuned_keys(cfg, study.best_trial.params).items():
        overlay.setdefault(section, {})[key] = value
    return overlay


def write_best(
    study: optuna.Study, cfg: Config | dict, out_dir: Path, config_paths: Sequence[str]
) -> tuple[Path, Path]:
    """Write ``best_params.yaml`` (overlay of the tuned keys) and ``best_config.yaml`` (the full config to train), both for the full run."""
    cfg = as_config(cfg)
    best = study.best_trial
    overlay = best_overlay(study, cfg)
    params_path = out_dir / "best_params.yaml"
    bases = " ".join(f"--config {p}" for p in [*config_paths, params_path])
    k = cfg.tune.objective_last_k
    header = (
        f"# Best of Optuna study '{study.study_name}': trial {best.number}, mean of the last {k} {MONITOR}={best.value:.4f} "
        f"in {trial_steps(cfg)}-step trials; values for the full run of train.max_steps={cfg.train.max_steps} steps.\n"
        f"# Overlay it on the tuned config: medeman train {bases} ...\n"
    )
    params_path.write_text(header + yaml.safe_dump(overlay, sort_keys=False), encoding="utf-8")
    config_path = out_dir / "best_config.yaml"
    config_path.write_text(
        f"# Full config: the tuned config with the best parameters of study '{study.study_name}' (trial {best.number}), "
        f"for train.max_steps={cfg.train.max_steps} steps.\n" + render_yaml(full_config(cfg, best.params)),
        encoding="utf-8",
    )
    return params_path, config_path


def summary_table(study: optuna.Study, cfg: Config | dict) -> str:
    """One line per trial: number, state, value, tuned keys (full-run values), duration, note."""
    cfg = as_config(cfg)
    trials = study.get_trials(deepcopy=False)
    best = study.best_trial.number if any(t.state == TrialState.COMPLETE for t in trials) else None
    values = [tuned_keys(cfg, t.params) if t.params else {} for t in trials]
    keys = list(dict.fromkeys(key for v in values for key in v))
    window = any("momentum_window" in t.params for t in trials) and ("ssl", "momentum_window") not in keys
    k = cfg.tune.objective_last_k
    full_m = any("momentum_window" in t.params for t in trials) and ("ssl", "ema_momentum") not in keys
    header = [
        "trial",
        "state",
        f"dice_teacher(last {k})",
        *(["window"] if window else []),
        *(key for _, key in keys),
        *(["m(full run)"] if full_m else []),
        "seconds",
        "note",
    ]
    rows = []
    for t, tuned in zip(trials, values):
        cells = [
            f"{t.number}{'*' if t.number == best else ''}",
            t.state.name,
            "-" if t.value is None else f"{t.value:.4f}",
        ]
        if window:
            cells.append(f"{t.params['momentum_window']:.4g}" if "momentum_window" in t.params else "-")
        for key in keys:
            value = tuned.get(key)
            cells.append("-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value))
        if full_m:
            w = t.params.get("momentum_window")
            cells.append("-" if w is None else f"{momentum_for(w, cfg.train.max_steps):.6g}")
        cells.append("-" if t.duration is None else f"{t.duration.total_seconds():.0f}")
        note = t.user_attrs.get("error", "") if t.state == TrialState.FAIL else ""
        if t.state == TrialState.FAIL and not note:
            note = "worker stopped (no heartbeat)"
        if t.state == TrialState.PRUNED and t.intermediate_values:
            note = f"pruned at step {max(t.intermediate_values)}"
        if original_number(t) != t.number:
            note = f"retry of {original_number(t)}" + (f"; {note}" if note else "")
        cells.append(note[:80])
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    footer = (
        f"\n* best trial; tuned values are for the full run of {cfg.train.max_steps} steps" if best is not None else ""
    )
    return "\n".join(lines) + footer


def save_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Save the optimization history, parameter importances and momentum x weight contour as PNGs.

    A plot that the study cannot support yet (too few complete trials) is skipped with a log line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {
        "history.png": lambda: ovm.plot_optimization_history(study, target_name=MONITOR),
        "importances.png": lambda: ovm.plot_param_importances(study, target_name=MONITOR),
    }
    if all(any(name in t.params for t in study.trials) for name in ("momentum_window", "consistency_weight")):
        plots["contour_momentum_weight.png"] = lambda: ovm.plot_contour(
            study,
            params=["momentum_window", "consistency_weight"],
            target_name=MONITOR,
        )
    written = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
                ax = plot()
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            figure.savefig(out_dir / name, dpi=120, bbox_inches="tight")
            plt.close(figure)
            written.append(out_dir / name)
        except Exception as err:  # e.g. importances need two complete trials with varying parameters
            _log.warning("%s skipped: %s", name, err)
            plt.close("all")
    return written


def report(
    study: optuna.Study, cfg: Config | dict, out_dir: Path, config_paths: Sequence[str], plots: bool = True
) -> bool:
    """Print the trials table, write the best parameters and plots; return False when no trial completed."""
    cfg = as_config(cfg)
    print(summary_table(study, cfg))
    counts = {state.name: len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    print("trials: " + ", ".join(f"{n} {name.lower()}" for name, n in counts.items() if n))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not counts["COMPLETE"]:
        print("no trial completed: no best parameters to write", file=sys.stderr)
        return False
    params_path, config_path = write_best(study, cfg, out_dir, config_paths)
    best = study.best_trial
    tuned = ", ".join(
        f"{s}.{k}={v:.6g}" if isinstance(v, float) else f"{s}.{k}={v}"
        for (s, k), v in tuned_keys(cfg, best.params).items()
    )
    if "momentum_window" in best.params:
        tuned += f" (EMA momentum m = {momentum_for(best.params['momentum_window'], cfg.train.max_steps):.6g})"
    print(
        f"best: trial {best.number}, mean of the last {cfg.tune.objective_last_k} {MONITOR}={best.value:.4f}; for the full run: {tuned}"
    )
    print(f"wrote {params_path} (overlay) and {config_path} (full config)")
    if plots:
        for path in save_plots(study, out_dir):
            print(f"wrote {path}")
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medeman tune",
        description="Tune EMA momentum and consistency weight (and optionally pseudo-label threshold, ramp-up) with Optuna. "
        "Run the same command in several processes or machines against one --storage to share the study.",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML config (its tune: section is the search space); repeat to overlay",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. tune.max_steps=2000"
    )
    parser.add_argument("--labeled", required=True, help="labeled cohort, as for medeman train")
    parser.add_argument("--unlabeled", help="folder of unlabeled scans")
    parser.add_argument("--val", help="labeled validation cohort (default: a split of --labeled)")
    parser.add_argument(
        "--test", help="test cohort: never used as unlabeled scans, nor tuned on (as for medeman train)"
    )
    parser.add_argument(
        "--study", required=True, help="study name; the same name in the same storage continues the study"
    )
    parser.add_argument(
        "--storage",
        help="SQLAlchemy URL (postgresql://user@host/db) or a journal file path; default sqlite:///<out>/study.db",
    )
    parser.add_argument(
        "--n-trials", type=int, help="trials this worker runs (default: until --timeout or --max-trials)"
    )
    parser.add_argument("--max-trials", type=int, help="cap on the study's trials over all workers and runs")
    parser.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")
    parser.add_argument(
        "--out", default="runs/tune", help="trial run folders, results and the default storage (default: runs/tune)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes to start on this machine, all on the same study; torch threads are divided among them (default: 1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per worker (default: OMP_NUM_THREADS, else the available cores shared by the workers)",
    )
    parser.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)  # a worker started by --workers N
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``medeman tune`` / ``scripts/tune.py``."""
    args = build_parser().parse_args(argv)
    if args.n_trials is None and args.timeout is None and args.max_trials is None:
        print("error: give --n-trials, --max-trials or --timeout (otherwise the study never ends)", file=sys.stderr)
        return 2
    if not _log.handlers:
        _log.addHandler(logging.StreamHandler())
        _log.setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.workers < 1:
        print(f"error: --workers {args.workers}: must be at least 1", file=sys.stderr)
        return 2
    from medeman.train import hide_lightning_advert  # imported late: the training stack is heavy

    hide_lightning_advert()
    out_dir = Path(args.out)
    workers = args.worker_of or args.workers
    started: list[subprocess.Popen] = []
    try:
        cfg = as_config(load_config(args.config, args.set))
        threads = args.threads if args.threads is not None else cfg.train.num_threads
        try:
            choice = choose_threads(
                threads,
                processes=workers * local_processes(cfg.train),
                loader_workers=cfg.data.num_workers,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
        apply_threads(choice, announce=args.worker_of is None)
        if args.worker_of is None and workers > 1:
            own = list(sys.argv[1:] if argv is None else argv)
            started = [
                subprocess.Popen([sys.executable, "-m", "medeman.tune", *own, "--worker-of", str(workers)])
                for _ in range(workers - 1)
            ]
        study = run_study(
            cfg,
            args.labeled,
            args.unlabeled,
            args.val,
            study_name=args.study,
            out_dir=out_dir,
            storage=args.storage,
            n_trials=args.n_trials,
            max_trials=args.max_trials,
            timeout=args.timeout,
            test=args.test,
        )
        failed_workers = sum(process.wait() != 0 for process in started)
    except (ConfigError, DataError) as err:
        _stop(started)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        _stop(started)
        print(
            "interrupted: the running trial is recorded as failed; rerun the command to continue the study",
            file=sys.stderr,
        )
        return 130
    if args.worker_of is not None:  # the first worker reports on the whole study once the others are done
        return 0
    if failed_workers:
        print(
            f"warning: {failed_workers} of the {workers - 1} other worker(s) stopped with an error (see above)",
            file=sys.stderr,
        )
    return 0 if report(study, cfg, out_dir, args.config, plots=not args.no_plots) else 1


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    """End the workers this worker started (they record their running trials as failed) and wait for them."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        process.wait()


if __name__ == "__main__":
    raise SystemExit(main())
