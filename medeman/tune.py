"""Tune how much to trust the teacher (EMA momentum) and how hard to pull toward it (consistency weight).

Each Optuna trial is a (shortened) training run; its value is the best ``val/dice_teacher``. The
search space is the config's ``tune:`` section: EMA momentum sampled log-uniformly on ``1 - m``
(0.99 and 0.999 are as far apart as 0.9 and 0.99), consistency weight log-uniform, and optionally
the pseudo-label threshold and the ramp-up length. Trials that fall behind the median at the same
step are pruned (``MedianPruner`` fed by Optuna's Lightning callback).

The study lives in a storage that any number of workers may share, each running the same command:

* no ``--storage``: an SQLite file ``<out>/study.db``, so rerunning the command resumes the study;
* an SQLAlchemy URL (``postgresql://user@host/db``, ``sqlite:///path.db``): a database that workers
  on many machines share;
* any other value is a path to an Optuna journal file, for a shared filesystem without a database.

``--n-trials`` is what this worker runs; ``--max-trials`` caps the study's total across all
workers and runs. Each trial's run folder ``<out>/trial_NNNN`` is kept. At the end the best
parameters are written as a config overlay (``best_params.yaml``) and a full config
(``best_config.yaml``), a table of trials is printed and plots are saved.

Example:
    medeman tune --config configs/sample.yaml --labeled sample_data/labeled \\
        --unlabeled sample_data/unlabeled --study demo --n-trials 4 --out runs/tune
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import math
import random
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
import yaml
from optuna.trial import TrialState

from medeman.config import ConfigError, load_config, render_yaml

MONITOR = "val/dice_teacher"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STARTED = (TrialState.RUNNING, *FINISHED)
_log = logging.getLogger("medeman.tune")

# Optuna parameter name -> (config key, value from the sampled number). The one place that says how a
# trial's parameters become a config, used by the trials and by best_params.yaml alike.
PARAMS: dict[str, tuple[str, str, Callable[[float], Any]]] = {
    "one_minus_ema_momentum": ("ssl", "ema_momentum", lambda x: round(1.0 - x, 12)),
    "consistency_weight": ("ssl", "consistency_weight", float),
    "pseudo_label_threshold": ("ssl", "pseudo_label_threshold", float),
    "rampup_steps": ("ssl", "rampup_steps", int),
}


def _range(tune: dict, key: str, low_min: float, high_max: float) -> tuple[float, float] | None:
    value = tune[key]
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise ConfigError(f"tune.{key}: {value!r} must be a range [low, high] (or null to leave it out)")
    low, high = float(value[0]), float(value[1])
    if not low_min <= low < high <= high_max:
        raise ConfigError(f"tune.{key}: [{low}, {high}] must satisfy {low_min} <= low < high <= {high_max}")
    return low, high


def check_space(tune: dict) -> None:
    """Validate the ``tune:`` ranges before any trial starts; raise ConfigError naming the bad key."""
    momentum = _range(tune, "ema_momentum", 0.0, 1.0)
    if momentum is None or momentum[1] >= 1.0:
        raise ConfigError(f"tune.ema_momentum: {tune['ema_momentum']!r} must be a range [low, high] with high < 1")
    if _range(tune, "consistency_weight", 0.0, math.inf) is None or tune["consistency_weight"][0] <= 0:
        raise ConfigError(f"tune.consistency_weight: {tune['consistency_weight']!r} must be a positive range (it is log-uniform)")
    _range(tune, "pseudo_label_threshold", 0.0, 1.0)
    rampup = _range(tune, "rampup_steps", 1.0, math.inf)
    if rampup is not None and not all(float(v).is_integer() for v in rampup):
        raise ConfigError(f"tune.rampup_steps: {tune['rampup_steps']!r} must be whole numbers of steps")


def suggest(trial: optuna.Trial, tune: dict) -> dict[str, Any]:
    """Sample one point of the ``tune:`` search space; return it as config overrides ``{(section, key): value}``."""
    low, high = _range(tune, "ema_momentum", 0.0, 1.0)
    trial.suggest_float("one_minus_ema_momentum", 1.0 - high, 1.0 - low, log=True)
    trial.suggest_float("consistency_weight", *_range(tune, "consistency_weight", 0.0, math.inf), log=True)
    if (threshold := _range(tune, "pseudo_label_threshold", 0.0, 1.0)) is not None:
        trial.suggest_float("pseudo_label_threshold", *threshold)
    if (rampup := _range(tune, "rampup_steps", 1.0, math.inf)) is not None:
        trial.suggest_int("rampup_steps", int(rampup[0]), int(rampup[1]), log=True)
    return overrides(trial.params)


def overrides(params: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """Turn a trial's Optuna parameters into config overrides ``{(section, key): value}``."""
    return {(PARAMS[name][0], PARAMS[name][1]): PARAMS[name][2](value) for name, value in params.items() if name in PARAMS}


def trial_config(cfg: dict, params: dict[str, Any], shortened: bool = True) -> dict:
    """A deep copy of ``cfg`` with the trial's parameters set (and ``tune.max_steps`` as the run length)."""
    cfg = copy.deepcopy(cfg)
    for (section, key), value in overrides(params).items():
        cfg[section][key] = value
    if shortened and cfg["tune"]["max_steps"] is not None:
        cfg["train"]["max_steps"] = int(cfg["tune"]["max_steps"])
    return cfg


def trial_steps(cfg: dict) -> int:
    """Optimizer steps of one trial."""
    return int(cfg["tune"]["max_steps"] if cfg["tune"]["max_steps"] is not None else cfg["train"]["max_steps"])


def _pruning_callback_class():
    from optuna_integration import PyTorchLightningPruningCallback

    class StepPruningCallback(PyTorchLightningPruningCallback):
        """Optuna's Lightning pruning callback, reporting at the optimizer step instead of the epoch.

        medeman's runs are counted in steps; keying reports by step makes every trial's curve
        comparable at the same point of training whatever an epoch is. Distributed runs keep the
        upstream logic.
        """

        def on_validation_end(self, trainer, pl_module) -> None:
            if self.is_ddp_backend or trainer.sanity_checking:
                return super().on_validation_end(trainer, pl_module)
            score = trainer.callback_metrics.get(self.monitor)
            if score is None:
                warnings.warn(f"'{self.monitor}' was not logged at step {trainer.global_step}: the trial cannot be pruned there")
                return
            step = int(trainer.global_step)
            self._trial.report(float(score), step=step)
            if self._trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} with {self.monitor}={float(score):.4f}")

    return StepPruningCallback


def objective(
    trial: optuna.Trial,
    cfg: dict,
    labeled: str | Path,
    unlabeled: str | Path | None,
    val: str | Path | None,
    out_dir: Path,
    train_fn: Callable | None = None,
) -> float:
    """Train once with the trial's parameters in ``<out_dir>/trial_NNNN``; return the best ``val/dice_teacher``."""
    if train_fn is None:
        from medeman.train import fit as train_fn
    suggest(trial, cfg["tune"])
    run_dir = Path(out_dir) / f"trial_{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    pruning = _pruning_callback_class()(trial, monitor=MONITOR)
    result = train_fn(
        trial_config(cfg, trial.params), labeled, unlabeled, val, run_dir,
        callbacks=[pruning], overwrite=True, progress_bar=False, logger=True,
    )
    pruning.check_pruned()  # distributed runs defer the pruning decision to here
    return float(result.best_dice_teacher)


def database_url(url: str) -> str:
    """``url`` with the PostgreSQL driver that is installed: SQLAlchemy 2.1 reads a bare ``postgresql://``
    as psycopg 3, while medeman's ``postgres`` extra installs psycopg2."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_storage(storage: str | None, out_dir: Path) -> optuna.storages.BaseStorage:
    """Storage from ``--storage``: default SQLite in ``out_dir``, an SQLAlchemy URL, or a journal file path."""
    if storage is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(out_dir / 'study.db').resolve()}"
    if "://" not in storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(storage)))
    storage = database_url(storage)
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {"pool_pre_ping": True}
    # Workers that start together race to create the schema; the loser's error is harmless, so retry.
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
        except Exception as err:  # sqlalchemy's OperationalError/IntegrityError/ProgrammingError
            if attempt == 4 or "sqlalchemy" not in type(err).__module__:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def open_study(cfg: dict, study_name: str, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study, or load it when it exists (another worker, or an earlier run of this command)."""
    tune = cfg["tune"]
    # Reports are keyed by optimizer step, one every val_every_steps: skipping k reports means
    # pruning from step k * val_every_steps + 1 on.
    warmup_reports = int(tune["pruner_warmup_steps"])
    warmup_steps = warmup_reports * int(cfg["train"]["val_every_steps"]) + 1 if warmup_reports > 0 else 0
    pruner = optuna.pruners.MedianPruner(n_startup_trials=int(tune["n_startup_trials"]), n_warmup_steps=warmup_steps)
    sampler = optuna.samplers.TPESampler(seed=int(tune["sampler_seed"]))
    return optuna.create_study(
        study_name=study_name, storage=storage, sampler=sampler, pruner=pruner, direction="maximize", load_if_exists=True,
    )


def _n_started(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=STARTED))


def _claim(study: optuna.Study, storage: optuna.storages.BaseStorage, max_trials: int | None) -> optuna.Trial | None:
    """Start a trial unless the study holds ``max_trials`` already; ``None`` when it is full.

    Optuna's ``MaxTrialsCallback`` counts after a trial ends, so two workers that finish together
    can both start one more. Here a trial that turns out to be beyond the cap (other workers took
    the last places between our count and our ask) goes back to the queue as WAITING, untouched,
    for the next run to take.
    """
    if max_trials is not None and _n_started(study) >= max_trials:
        return None
    trial = study.ask()
    if max_trials is None:
        return trial
    ahead = sum(1 for t in study.get_trials(deepcopy=False, states=STARTED) if t.number < trial.number)
    if ahead >= max_trials:
        storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
        return None
    return trial


def _run_trial(study: optuna.Study, trial: optuna.Trial, func: Callable[[optuna.Trial], float]) -> None:
    """Run one trial and record it: COMPLETE with its value, PRUNED, or FAIL with the error."""
    try:
        value = func(trial)
    except optuna.TrialPruned as err:
        study.tell(trial, state=TrialState.PRUNED)
        _log.info("trial %d pruned: %s", trial.number, err)
    except BaseException as err:  # Lightning turns Ctrl-C into SystemExit: record the trial either way
        trial.set_user_attr("error", f"{type(err).__name__}: {err}" if isinstance(err, Exception) else "interrupted")
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
        study.tell(trial, state=TrialState.FAIL)
        if not isinstance(err, Exception):
            raise
        _log.warning("trial %d failed: %s", trial.number, traceback.format_exc())
    else:
        if math.isnan(value):
            trial.set_user_attr("error", f"no {MONITOR} was logged: the run never validated (train.val_every_steps > steps?)")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)
            _log.info("trial %d finished: %s=%.4f", trial.number, MONITOR, value)
    finally:
        gc.collect()
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_study(
    cfg: dict,
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
) -> optuna.Study:
    """Run trials of ``study_name`` in this process until ``n_trials``, ``timeout`` or the study's ``max_trials``.

    Args:
        cfg: resolved config (:func:`medeman.config.load_config`); its ``tune:`` section is the search.
        labeled, unlabeled, val: data folders, as for :func:`medeman.train.fit`.
        study_name: the study to create or join.
        out_dir: trial run folders ``trial_NNNN`` (and the default SQLite storage).
        storage: SQLAlchemy URL or journal file path; ``None`` is ``sqlite:///<out_dir>/study.db``.
        n_trials: trials this call runs at most (``None``: no limit, stop on ``timeout`` or ``max_trials``).
        max_trials: cap on the study's trials across every worker and run (running ones count).
        timeout: seconds after which no new trial starts.
        train_fn: stand-in for :func:`medeman.train.fit` (same signature), for tests.

    Returns:
        The study, with the trials of every worker.
    """
    check_space(cfg["tune"])
    if trial_steps(cfg) < int(cfg["train"]["val_every_steps"]):
        raise ConfigError(
            f"a trial runs {trial_steps(cfg)} steps but validates every train.val_every_steps={cfg['train']['val_every_steps']}: "
            "it would never measure val/dice_teacher; lower train.val_every_steps or raise tune.max_steps"
        )
    out_dir = Path(out_dir)
    backend = open_storage(storage, out_dir)
    study = open_study(cfg, study_name, backend)
    seed = int(cfg["tune"]["sampler_seed"])
    deadline = None if timeout is None else time.monotonic() + timeout
    done = 0
    while n_trials is None or done < n_trials:
        if deadline is not None and time.monotonic() >= deadline:
            break
        trial = _claim(study, backend, max_trials)
        if trial is None:
            _log.info("study %s holds %d trials, its cap: this worker stops", study_name, max_trials)
            break
        # Seed each trial by its number: a resumed study or a second worker draws new points, and a
        # single worker's study is reproducible. TPE keeps no state beyond its RNG (history is in storage).
        study.sampler = optuna.samplers.TPESampler(seed=seed + trial.number)
        _run_trial(study, trial, lambda t: objective(t, cfg, labeled, unlabeled, val, out_dir, train_fn))
        done += 1
    return study


def best_overlay(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The best trial's parameters as a config overlay ``{section: {key: value}}``."""
    overlay: dict[str, dict[str, Any]] = {}
    for (section, key), value in overrides(study.best_trial.params).items():
        overlay.setdefault(section, {})[key] = value
    return overlay


def write_best(study: optuna.Study, cfg: dict, out_dir: Path, config_paths: Sequence[str]) -> tuple[Path, Path]:
    """Write ``best_params.yaml`` (overlay of the tuned keys) and ``best_config.yaml`` (the full config to train)."""
    best = study.best_trial
    overlay = best_overlay(study)
    params_path = out_dir / "best_params.yaml"
    bases = " ".join(f"--config {p}" for p in [*config_paths, params_path])
    header = (
        f"# Best of Optuna study '{study.study_name}': trial {best.number}, {MONITOR}={best.value:.4f} "
        f"after {trial_steps(cfg)} steps.\n"
        f"# Overlay it on the tuned config: medeman train {bases} ...\n"
    )
    params_path.write_text(header + yaml.safe_dump(overlay, sort_keys=False), encoding="utf-8")
    config_path = out_dir / "best_config.yaml"
    full = trial_config(cfg, best.params, shortened=False)
    config_path.write_text(
        f"# Full config: the tuned config with the best parameters of study '{study.study_name}' (trial {best.number}).\n"
        + render_yaml(full), encoding="utf-8",
    )
    return params_path, config_path


def summary_table(study: optuna.Study) -> str:
    """One line per trial: number, state, value, parameters (as config values), duration, note."""
    trials = study.get_trials(deepcopy=False)
    names = [name for name in PARAMS if any(name in t.params for t in trials)]
    best = study.best_trial.number if any(t.state == TrialState.COMPLETE for t in trials) else None
    header = ["trial", "state", "dice_teacher", *(PARAMS[n][1] for n in names), "seconds", "note"]
    rows = []
    for t in trials:
        values = overrides(t.params)
        cells = [f"{t.number}{'*' if t.number == best else ''}", t.state.name, "-" if t.value is None else f"{t.value:.4f}"]
        for name in names:
            value = values.get((PARAMS[name][0], PARAMS[name][1]))
            cells.append("-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value))
        cells.append("-" if t.duration is None else f"{t.duration.total_seconds():.0f}")
        note = t.user_attrs.get("error", "")
        if t.state == TrialState.PRUNED and t.intermediate_values:
            note = f"pruned at step {max(t.intermediate_values)}"
        cells.append(note[:80])
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + ("\n* best trial" if best is not None else "")


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
        "contour_momentum_weight.png": lambda: ovm.plot_contour(
            study, params=["one_minus_ema_momentum", "consistency_weight"], target_name=MONITOR,
        ),
    }
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


def report(study: optuna.Study, cfg: dict, out_dir: Path, config_paths: Sequence[str], plots: bool = True) -> bool:
    """Print the trials table, write the best parameters and plots; return False when no trial completed."""
    print(summary_table(study))
    counts = {state.name: len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    print("trials: " + ", ".join(f"{n} {name.lower()}" for name, n in counts.items() if n))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not counts["COMPLETE"]:
        print("no trial completed: no best parameters to write", file=sys.stderr)
        return False
    params_path, config_path = write_best(study, cfg, out_dir, config_paths)
    best = study.best_trial
    print(f"best: trial {best.number}, {MONITOR}={best.value:.4f}, " + ", ".join(f"{s}.{k}={v}" for (s, k), v in overrides(best.params).items()))
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
    parser.add_argument("--config", action="append", default=[], help="YAML config (its tune: section is the search space); repeat to overlay")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. tune.max_steps=2000")
    parser.add_argument("--labeled", required=True, help="labeled cohort, as for medeman train")
    parser.add_argument("--unlabeled", help="folder of unlabeled scans")
    parser.add_argument("--val", help="labeled validation cohort (default: a split of --labeled)")
    parser.add_argument("--study", required=True, help="study name; the same name in the same storage continues the study")
    parser.add_argument("--storage", help="SQLAlchemy URL (postgresql://user@host/db) or a journal file path; default sqlite:///<out>/study.db")
    parser.add_argument("--n-trials", type=int, help="trials this worker runs (default: until --timeout or --max-trials)")
    parser.add_argument("--max-trials", type=int, help="cap on the study's trials over all workers and runs")
    parser.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")
    parser.add_argument("--out", default="runs/tune", help="trial run folders, results and the default storage (default: runs/tune)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
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
    out_dir = Path(args.out)
    try:
        cfg = load_config(args.config, args.set)
        study = run_study(
            cfg, args.labeled, args.unlabeled, args.val, study_name=args.study, out_dir=out_dir,
            storage=args.storage, n_trials=args.n_trials, max_trials=args.max_trials, timeout=args.timeout,
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        print("interrupted: the running trial is recorded as failed; rerun the command to continue the study", file=sys.stderr)
        return 130
    return 0 if report(study, cfg, out_dir, args.config, plots=not args.no_plots) else 1


if __name__ == "__main__":
    raise SystemExit(main())
