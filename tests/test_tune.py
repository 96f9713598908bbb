"""medeman.tune: search space, failures, the worker cap, and real studies on tiny data (SQLite, journal, PostgreSQL)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import pytest
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState

from medeman import tune
from medeman.config import ConfigError, load_config
from medeman.schedules import run_schedule

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {
        "spacing": None,
        "patch_size": [16, 16, 16],
        "num_workers": 0,
        "cache": "none",
        "batch_size_labeled": 1,
        "batch_size_unlabeled": 1,
        "val_fraction": 0.25,
    },
    "model": {"channels": [4, 8], "num_res_units": 0},
    "train": {"max_steps": 4, "val_every_steps": 2, "accelerator": "cpu", "log_every_steps": 1},
    "ssl": {"teacher_bn_recalibration": "off"},
    "tune": {"n_startup_trials": 1, "validations": 2, "prune_after": 0.5},
}

# A 500-step run tuned with 200-step trials (r = 0.4), a ramp-up of 200 and a warm-up of 50 steps, 4 validations
# per trial; the point w = 0.05 (window), weight 2. By hand: the trial averages over 0.05 * 200 = 10 steps,
# m = 1 - 1/10 = 0.9; the full run over 25 steps, m = 0.96; ramp-up 80 / 200, warm-up 20 / 50;
# the trial validates 4 times after half of it (tune.prune_after), every 100 / 4 = 25 steps; the full run keeps its 100.
BASE = {
    "train.max_steps": 500,
    "train.val_every_steps": 100,
    "tune.max_steps": 200,
    "ssl.rampup_steps": 200,
    "ssl.warmup_steps": 50,
}
POINT = {"momentum_window": 0.05, "consistency_weight": 2.0}
SCALE_CASES = [
    # id, extra sets, extra params, expected trial values, expected full-run values
    [
        "constant",
        {"ssl.momentum_schedule": "constant"},
        {},
        {
            "ema_momentum": 0.9,
            "rampup_steps": 80,
            "warmup_steps": 20,
            "consistency_weight": 2.0,
            "max_steps": 200,
            "val_every_steps": 25,
        },
        {
            "ema_momentum": 0.96,
            "rampup_steps": 200,
            "warmup_steps": 50,
            "consistency_weight": 2.0,
            "max_steps": 500,
            "val_every_steps": 100,
        },
    ],
    [
        "cosine-starts-at-the-window",
        {"ssl.momentum_schedule": "cosine"},
        {},
        {"ema_momentum": 0.9, "rampup_steps": 80},
        {"ema_momentum": 0.96, "rampup_steps": 200},
    ],
    [
        "window-schedule-keeps-the-fraction",
        {"ssl.momentum_schedule": "window"},
        {},
        {"momentum_window": 0.05, "ema_momentum": 0.99, "rampup_steps": 80},
        {"momentum_window": 0.05, "ema_momentum": 0.99},
    ],
    [
        "tuned-rampup-in-full-run-steps",
        {"ssl.momentum_schedule": "constant", "tune.rampup_steps": "[10, 1000]"},
        {"rampup_steps": 300},
        {"rampup_steps": 120, "ema_momentum": 0.9},
        {"rampup_steps": 300, "ema_momentum": 0.96},
    ],
    # momentum not searched: the config's m = 0.99 (a 100-step window, 0.2 of the run) keeps its window: 1 - 1/40
    [
        "untuned-momentum-keeps-its-window",
        {"ssl.momentum_schedule": "constant", "tune.momentum_window": None},
        {"momentum_window": None},
        {"ema_momentum": 0.975, "rampup_steps": 80},
        {"ema_momentum": 0.99, "rampup_steps": 200},
    ],
]
BAD_SPACES = [
    {"tune.momentum_window": [0.0, 0.5]},  # a window of 0 steps has no logarithm
    {"tune.momentum_window": [0.1, 1.5]},  # longer than the run: the warm-up's plain average throughout
    {"tune.momentum_window": [0.5, 0.1]},
    {"tune.consistency_weight": [0.0, 10.0]},
    {"tune.pseudo_label_threshold": [0.5, 1.5]},
    {"tune.rampup_steps": [10.5, 100]},
    {"tune.rampup_steps": 100},
    {"tune.objective_last_k": 0},
    {"tune.prune_after": 1.5},
    {"tune.grace_period": 30},  # not longer than the heartbeat interval (60)
]


def _cfg(sets: dict | None = None) -> dict:
    return load_config([], [f"{k}={'null' if v is None else v}" for k, v in (sets or {}).items()])


def _write_tiny(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Four labeled and two unlabeled random 24^3 volumes with a sphere, and the tiny config."""
    rng = np.random.default_rng(0)
    for sub in ("labeled/images", "labeled/labels", "unlabeled"):
        (tmp_path / sub).mkdir(parents=True)

    def volume():
        z, y, x = np.mgrid[:24, :24, :24]
        c, r = rng.uniform(9, 15, 3), rng.uniform(4, 8)
        label = (((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < r * r).astype(np.uint8)
        return (label * 200 - 50 + rng.normal(0, 30, label.shape)).astype(np.float32), label

    for i in range(4):
        image, label = volume()
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / f"labeled/images/case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / f"labeled/labels/case{i}.nii.gz")
    for i in range(2):
        nib.save(nib.Nifti1Image(volume()[0], np.eye(4)), tmp_path / f"unlabeled/u{i}.nii.gz")
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    return tmp_path / "labeled", tmp_path / "unlabeled", config


def _stand_in(fail_on: set[int] = frozenset(), scores: dict[int, list[float]] | None = None):
    """A train_fn that scores a point without training: best near w = 0.02, weight = 1, reported at each validation.

    ``scores`` gives a trial's validation series instead (by trial number).
    """

    def train_fn(cfg, labeled, unlabeled, val, out_dir, *, callbacks=(), **kwargs):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        number = int(Path(out_dir).name.split("_")[1])
        if number in fail_on:
            raise RuntimeError("out of memory (simulated)")
        w, weight = cfg["ssl"]["momentum_window"], cfg["ssl"]["consistency_weight"]
        value = 1 - abs(math.log10(w / 0.02)) / 4 - abs(math.log10(weight)) / 4
        every, after = tune.validation_schedule(cfg)
        steps = [s for s in range(every, cfg["train"]["max_steps"] + 1, every) if s > after]
        series = (scores or {}).get(number, [value] * len(steps))
        for step, score in zip(steps, series):
            if callbacks[0].record(step, score):
                raise optuna.TrialPruned()
        return types.SimpleNamespace(best_dice_teacher=max(series))

    return train_fn


def _counts(study: optuna.Study) -> dict[str, int]:
    return {s.name: len(study.get_trials(states=(s,))) for s in TrialState}


@pytest.mark.parametrize("name, sets, params, in_trial, in_full_run", SCALE_CASES, ids=[c[0] for c in SCALE_CASES])
def test_shortened_trial_scales_every_step_key_and_best_config_is_for_the_full_run(
    name, sets, params, in_trial, in_full_run
):
    cfg = _cfg({**BASE, **sets})
    point = {k: v for k, v in {**POINT, **params}.items() if v is not None}
    trial, full = tune.trial_config(cfg, point), tune.full_config(cfg, point)
    for key, value in in_trial.items():
        section = "train" if key in ("max_steps", "val_every_steps") else "ssl"
        assert trial[section][key] == pytest.approx(value), f"trial {section}.{key}"
    for key, value in in_full_run.items():
        section = "train" if key in ("max_steps", "val_every_steps") else "ssl"
        assert full[section][key] == pytest.approx(value), f"full run {section}.{key}"
    assert cfg["train"]["max_steps"] == 500 and cfg["ssl"]["rampup_steps"] == 200  # the base config is not touched


@pytest.mark.parametrize("every, in_trial", [(100, 40), (None, None)])
def test_shortened_trial_scales_the_focus_refresh(every, in_trial):
    # a 200-step trial of a 500-step run: a refresh given in steps shrinks with it; a null one is a fraction already
    cfg = _cfg({**BASE, "data.unlabeled_focus_fraction": 0.5, "data.unlabeled_focus_every_steps": every})
    trial = tune.trial_config(cfg, POINT)
    assert trial["data"]["unlabeled_focus_every_steps"] == in_trial
    assert run_schedule(trial).focus_every_steps == 40  # 100 of 500 steps -> 40 of 200, either way


def test_search_space_draws_the_window_fraction_log_uniformly():
    cfg = _cfg({"tune.pseudo_label_threshold": "[0.5, 0.95]"})
    trial = optuna.trial.FixedTrial({"momentum_window": 0.05, "consistency_weight": 2.0, "pseudo_label_threshold": 0.8})
    assert tune.suggest(trial, cfg["tune"]) == pytest.approx(
        {"momentum_window": 0.05, "consistency_weight": 2.0, "pseudo_label_threshold": 0.8}
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    draws = [tune.suggest(study.ask(), cfg["tune"])["momentum_window"] for _ in range(400)]
    assert all(0.01 <= w <= 0.5 for w in draws)
    below = sum(w < math.sqrt(0.01 * 0.5) for w in draws) / len(
        draws
    )  # the geometric midpoint halves a log-uniform prior
    assert 0.4 < below < 0.6


@pytest.mark.parametrize(
    "sets", BAD_SPACES, ids=[next(iter(s)) + "=" + str(next(iter(s.values()))) for s in BAD_SPACES]
)
def test_bad_search_space_is_rejected_at_load_time(sets):
    with pytest.raises(ConfigError, match=next(iter(sets))):
        _cfg(sets)


def test_objective_is_the_mean_of_the_last_k_validations(tmp_path):
    # 200-step trials validating at 125, 150, 175, 200 (4 validations after half the trial); trial 1 is far behind
    cfg = _cfg(
        {
            "tune.max_steps": 200,
            "tune.validations": 4,
            "tune.objective_last_k": 2,
            "tune.prune_after": 0.5,
            "tune.n_startup_trials": 1,
        }
    )
    scores = {0: [0.9, 0.2, 0.5, 0.7], 1: [0.1, 0.1, 0.1, 0.1], 2: [0.95, 0.95, 0.95, 0.95]}
    study = tune.run_study(
        cfg, "L", "U", study_name="s", out_dir=tmp_path, n_trials=3, train_fn=_stand_in(scores=scores)
    )
    first, behind, good = study.trials
    assert first.value == pytest.approx(0.6)  # mean of 0.5 and 0.7, not the best single 0.9
    assert first.intermediate_values == pytest.approx(
        {125: 0.9, 150: 0.55, 175: 0.35, 200: 0.6}
    )  # the running objective
    assert behind.state == TrialState.PRUNED and behind.intermediate_values == pytest.approx({125: 0.1})
    assert good.state == TrialState.COMPLETE and study.best_trial.number == 2
    assert first.user_attrs["validations"] == [[125, 0.9], [150, 0.2], [175, 0.5], [200, 0.7]]


def test_pruning_starts_after_the_configured_fraction_of_the_trial(tmp_path):
    cfg = _cfg({"tune.max_steps": 200, "tune.prune_after": 0.5, "tune.n_startup_trials": 1, "tune.objective_last_k": 1})
    study = tune.open_study(cfg, "p", tune.open_storage(None, tmp_path))
    leader = tune.TrialReporter(study.ask(), last_k=1)
    for step in (50, 100, 150, 200):
        leader.record(step, 0.9)
    study.tell(leader.trial, leader.value())
    behind = tune.TrialReporter(study.ask(), last_k=1)
    assert not behind.record(50, 0.1)  # far behind, but a quarter into the trial: a slow teacher still lags there
    assert behind.record(100, 0.1)  # half the trial: now it may be pruned


# (trial steps, prune_after, validations) -> the steps a trial validates at
SCHEDULE_CASES = [
    [(200, 0.5, 4), [125, 150, 175, 200]],
    [(200, 0.5, 3), [150, 175, 200]],  # 100 / 3 -> 34 is no divisor of 200: every 25
    [(200, 0.0, 4), [50, 100, 150, 200]],
    [(6, 0.5, 2), [4, 6]],
    [(16, 0.5, 1), [16]],
    [(199, 0.5, 4), [196, 197, 198, 199]],  # a prime: the last steps
]


@pytest.mark.parametrize("args, expected", SCHEDULE_CASES, ids=[str(c[0]) for c in SCHEDULE_CASES])
def test_trial_validates_only_where_it_can_be_pruned_or_scored(args, expected):
    steps, prune_after, validations = args
    cfg = _cfg({"tune.max_steps": steps, "tune.prune_after": prune_after, "tune.validations": validations})
    every, after = tune.validation_schedule(cfg)
    assert [s for s in range(every, steps + 1, every) if s > after] == expected
    assert tune.trial_config(cfg, {})["train"]["val_every_steps"] == every


def test_failed_trial_is_recorded_and_study_goes_on(tmp_path):
    cfg = _cfg({"tune.max_steps": 10})
    study = tune.run_study(cfg, "L", "U", study_name="s", out_dir=tmp_path, n_trials=3, train_fn=_stand_in(fail_on={1}))
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: out of memory (simulated)"
    assert "out of memory" in tune.summary_table(study, cfg).splitlines()[3]


def test_bad_input_data_stops_the_study_after_one_failed_trial(tmp_path):
    """A NaN scan fails every trial alike: the first one records it and the study stops with the data error."""
    from medeman.data.errors import DataError

    def train_fn(*args, **kwargs):
        raise DataError("L/images/case0.nii.gz: 3 NaN/Inf intensities")

    cfg = _cfg({"tune.max_steps": 10})
    with pytest.raises(DataError, match="case0.nii.gz: 3 NaN/Inf intensities"):
        tune.run_study(cfg, "L", "U", study_name="s", out_dir=tmp_path, n_trials=3, train_fn=train_fn)
    trials = optuna.load_study(study_name="s", storage=tune.open_storage(None, tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs["error"] == "DataError: L/images/case0.nii.gz: 3 NaN/Inf intensities"


STORAGE_ERRORS = [
    (
        "unknown scheme",
        "notaurl://x",
        "--storage notaurl://x: unknown database scheme 'notaurl'; medeman supports sqlite:///path/study.db, "
        "postgresql://user@host/db, or a journal file path (no ://)",
    ),
    ("password hidden", "mysql://me:secret@db/x", "--storage mysql://me:***@db/x: unknown database scheme 'mysql'"),
    (
        "SQLite folder missing",
        "sqlite:////nonexistent_medeman/dir/x.db",
        "--storage sqlite:////nonexistent_medeman/dir/x.db: the folder /nonexistent_medeman/dir does not exist",
    ),
    (
        "PostgreSQL server not listening",
        "postgresql://me:secret@127.0.0.1:1/x",
        '--storage postgresql://me:***@127.0.0.1:1/x: cannot open the study database: connection to server at "127.0.0.1", port 1 failed',
    ),
]


@pytest.mark.parametrize("name, url, message", STORAGE_ERRORS, ids=[c[0] for c in STORAGE_ERRORS])
def test_storage_that_cannot_be_used_is_one_line_naming_scheme_or_host(tmp_path, name, url, message):
    pytest.importorskip("psycopg2") if url.startswith("postgresql") else None
    with pytest.raises(ConfigError) as info:
        tune.open_storage(url, tmp_path)
    assert str(info.value).startswith(message) and "\n" not in str(info.value) and "secret" not in str(info.value)


def test_journal_storage_resumes_with_new_points(tmp_path):
    cfg = _cfg({"tune.max_steps": 10})
    journal = str(tmp_path / "shared" / "study.log")
    tune.run_study(cfg, "L", "U", study_name="j", out_dir=tmp_path, storage=journal, n_trials=2, train_fn=_stand_in())
    study = tune.run_study(
        cfg, "L", "U", study_name="j", out_dir=tmp_path, storage=journal, n_trials=2, train_fn=_stand_in()
    )
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert len({t.params["momentum_window"] for t in study.trials}) == 4  # a resumed study samples afresh


def test_trial_beyond_the_cap_goes_back_to_the_queue(tmp_path):
    storage = tune.open_storage(None, tmp_path)
    study = tune.open_study(_cfg(), "race", storage)
    other = optuna.load_study(study_name="race", storage=storage)
    ask = study.ask
    study.ask = lambda: (other.ask(), ask())[1]  # another worker takes the last place between our count and ask
    assert tune._claim(study, storage, max_trials=1) is None
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.WAITING]
    study.ask = ask
    assert tune._claim(study, storage, max_trials=2).number == 1  # a later run with room takes the queued trial


def test_retried_trial_counts_once_against_the_cap(tmp_path):
    cfg = _cfg({"tune.heartbeat_interval": 1, "tune.grace_period": 2})
    storage = tune.open_storage(None, tmp_path, cfg["tune"])
    study = tune.open_study(cfg, "retry", storage)
    dead = tune._claim(study, storage, max_trials=2)
    tune.suggest(dead, cfg["tune"])
    storage.record_heartbeat(tune.trial_id(storage, study, dead))
    done = tune._claim(study, storage, max_trials=2)
    tune.suggest(done, cfg["tune"])
    study.tell(done, 0.5)
    assert tune._claim(study, storage, max_trials=2) is None  # full: the dead trial still looks alive
    time.sleep(3.1)  # past the grace period
    tune.fail_dead_trials(study)
    assert tune.n_counted(study) == 2  # failed trial + its queued retry: one
    retry = tune._claim(study, storage, max_trials=2)  # a full study still runs its retries
    assert retry is not None and retry.params == study.trials[dead.number].params
    assert tune.original_number(study.trials[retry.number]) == dead.number
    assert tune._claim(study, storage, max_trials=2) is None


def test_trial_id_from_the_public_storage_api_is_optunas_own(tmp_path):
    cfg = _cfg({"tune.heartbeat_interval": 1})
    storage = tune.open_storage(None, tmp_path, cfg["tune"])
    study = tune.open_study(cfg, "ids", storage)
    trials = [study.ask() for _ in range(3)]
    assert [tune.trial_id(storage, study, t) for t in trials] == [t._trial_id for t in trials]


def test_optunas_heartbeat_thread_is_where_medeman_reaches_it(tmp_path):
    """Fails with a clear message when Optuna moves its private heartbeat helper (see tune.heartbeat_thread_factory)."""
    cfg = _cfg({"tune.heartbeat_interval": 1, "tune.grace_period": 2})
    storage = tune.open_storage(None, tmp_path, cfg["tune"])
    study = tune.open_study(cfg, "beat", storage)
    beating, silent = study.ask(), study.ask()
    with tune.heartbeat_thread_factory()(tune.trial_id(storage, study, beating), storage):
        pass  # the thread records one heartbeat as it starts
    time.sleep(3.1)  # past the grace period
    tune.fail_dead_trials(study)  # a trial is dead when its last heartbeat is old; one that never beat is not judged
    states = {t.number: t.state for t in study.get_trials()}
    assert states[beating.number] == TrialState.FAIL and states[silent.number] == TrialState.RUNNING


def test_a_moved_heartbeat_helper_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna.storages._heartbeat", types.ModuleType("optuna.storages._heartbeat"))
    with pytest.raises(RuntimeError, match="no optuna.storages._heartbeat.get_heartbeat_thread .*must follow it"):
        tune.heartbeat_thread_factory()


class PinDice(Callback):
    """Replaces the logged val/dice_teacher by a fixed value, so the median pruner's choice is known."""

    def __init__(self, value: float):
        self.value = value

    def on_fit_start(self, trainer, module):
        log = module.log

        def pinned(name, value, *args, **kwargs):
            return log(name, self.value if name == "val/dice_teacher" else value, *args, **kwargs)

        module.log = pinned


def test_study_prunes_resumes_and_writes_best_params(tmp_path):
    from medeman.train import fit, main as train_main

    labeled, unlabeled, config = _write_tiny(tmp_path)
    cfg = load_config([config])

    def pinned_fit(cfg, labeled, unlabeled, val, out_dir, *, callbacks=(), **kwargs):
        value = 0.9 if Path(out_dir).name == "trial_0000" else 0.1  # later trials are worse at every step
        return fit(cfg, labeled, unlabeled, val, out_dir, callbacks=[PinDice(value), *callbacks], **kwargs)

    out = tmp_path / "tune"
    study = tune.run_study(cfg, labeled, unlabeled, study_name="tiny", out_dir=out, n_trials=3, train_fn=pinned_fit)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert study.trials[0].intermediate_values == pytest.approx(
        {3: 0.9, 4: 0.9}
    )  # reported at optimizer steps, after half the trial
    assert study.trials[1].intermediate_values == pytest.approx({3: 0.1})  # pruned at its first validation
    assert all((out / f"trial_{n:04d}" / "config.yaml").is_file() for n in range(3))

    study = tune.run_study(cfg, labeled, unlabeled, study_name="tiny", out_dir=out, n_trials=1, train_fn=pinned_fit)
    assert len(study.trials) == 4 and (out / "study.db").is_file()

    assert tune.report(study, cfg, out, [str(config)], plots=False)
    best = load_config([config, out / "best_params.yaml"])
    assert best["ssl"]["momentum_window"] == pytest.approx(
        study.trials[0].params["momentum_window"]
    )  # the window schedule holds w
    assert best["ssl"]["consistency_weight"] == pytest.approx(study.trials[0].params["consistency_weight"])
    assert load_config([out / "best_config.yaml"]) == best
    args = [
        "--config",
        str(config),
        "--config",
        str(out / "best_params.yaml"),
        "--labeled",
        str(labeled),
        "--unlabeled",
        str(unlabeled),
        "--out",
        str(tmp_path / "final"),
        "--set",
        "train.max_steps=2",
        "--no-progress",
    ]
    assert train_main(args) == 0 and (tmp_path / "final" / "teacher.pt").is_file()


def _two_workers_one_killed(tmp_path: Path, storage: str, study: str, cap: int = 2) -> optuna.Study:
    """Two `medeman tune` workers share a study with a cap; worker A is SIGKILLed in the middle of its first trial.

    Worker B must fail A's trial once its heartbeat is older than the grace period, run it again with
    the same parameters, and stop with ``cap`` trials counted (the failed one and its retry once).
    """
    labeled, unlabeled, config = _write_tiny(tmp_path)

    def worker(name: str) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "medeman.cli",
            "tune",
            "--config",
            str(config),
            "--labeled",
            str(labeled),
            "--unlabeled",
            str(unlabeled),
            "--study",
            study,
            "--storage",
            storage,
            "--n-trials",
            "10",
            "--max-trials",
            str(cap),
            "--out",
            str(tmp_path / name),
            "--no-plots",
            "--set",
            "train.max_steps=8",
            "--set",
            "tune.validations=1",
            "--set",
            "tune.n_startup_trials=10",
            "--set",
            "tune.heartbeat_interval=1",
            "--set",
            "tune.grace_period=2",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    # B starts only once A is inside its first trial: started together, B could take every place in
    # the study before A's first trial began (a race, not the behaviour under test).
    a = worker("a")
    hang_guard = time.monotonic() + 120  # fail instead of hanging CI if A never gets going; not a speed check
    while not list((tmp_path / "a").glob("trial_*/config.yaml")):  # A is training its first trial
        if a.poll() is not None:
            pytest.fail(f"worker A exited before its first trial: {a.communicate()[0][-3000:]}")
        if time.monotonic() > hang_guard:
            pytest.fail("worker A never started a trial")
        time.sleep(0.05)
    b = worker("b")
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    output = b.communicate(timeout=300)[0]
    assert b.returncode == 0, output[-3000:]
    (killed_dir,) = (tmp_path / "a").glob("trial_*")
    killed = int(killed_dir.name.split("_")[1])

    shared = optuna.load_study(study_name=study, storage=tune.open_storage(storage, tmp_path))
    trials = shared.get_trials()
    assert trials[killed].state == TrialState.FAIL, (_counts(shared), output[-3000:])
    (retry,) = [t for t in trials if tune.original_number(t) == killed and t.number != killed]
    assert retry.params == trials[killed].params and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert f"trial {retry.number} retries trial {killed}" in output
    assert len(trials) == cap + 1 and tune.n_counted(shared) == cap  # the cap counts the retried trial once
    assert _counts(shared)["COMPLETE"] + _counts(shared)["PRUNED"] == cap and _counts(shared)["FAIL"] == 1
    assert sorted(p.name for p in (tmp_path / "b").glob("trial_*")) == [
        f"trial_{t.number:04d}" for t in trials if t.number != killed
    ]
    return shared


def test_killed_worker_trial_is_failed_and_retried_once_sqlite(tmp_path):
    _two_workers_one_killed(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}", "shared")


def test_killed_worker_trial_is_failed_and_retried_once_postgresql(tmp_path):
    url = os.environ.get("MEDEMAN_TEST_POSTGRES_URL")
    if not url:
        pytest.skip(
            "MEDEMAN_TEST_POSTGRES_URL is not set: no PostgreSQL server to share a study on (CI starts one in .ci/postgres.sh)"
        )
    study = f"test-{uuid.uuid4().hex[:8]}"
    try:
        _two_workers_one_killed(tmp_path, url, study)
    finally:
        optuna.delete_study(study_name=study, storage=tune.database_url(url))


def test_trials_of_a_worker_share_the_preprocessed_cohort(tmp_path):
    from medeman.data.datamodule import CohortCache, SSLDataModule, preprocessing_digest

    labeled, unlabeled, config = _write_tiny(tmp_path)
    cfg = load_config([config], ["data.cache=memory"])
    other = load_config([config], ["data.cache=memory", "data.intensity_window=[-100, 100]"])

    def module(cfg, run, cohorts=None):
        dm = SSLDataModule(cfg, labeled, unlabeled, run_dir=tmp_path / run, cohorts=cohorts)
        (tmp_path / run).mkdir()
        dm.setup("fit")
        return dm

    cohorts = CohortCache()
    first, second, changed = module(cfg, "t0", cohorts), module(cfg, "t1", cohorts), module(other, "t2", cohorts)
    alone = module(cfg, "t3")
    assert second._datasets["labeled"] is first._datasets["labeled"]  # preprocessed once
    assert second._datasets["unlabeled"] is first._datasets["unlabeled"] and second.val_cases == first.val_cases
    assert changed._datasets["labeled"] is not first._datasets["labeled"]  # another preprocessing, another cohort
    assert len(cohorts) == 2
    assert alone._datasets["labeled"] is not first._datasets["labeled"]  # without the cache nothing is shared
    assert (tmp_path / "t1" / "split.json").read_text() == (tmp_path / "t0" / "split.json").read_text()
    assert preprocessing_digest(cfg["data"]) != preprocessing_digest(other["data"])
    assert preprocessing_digest(cfg["data"]) == preprocessing_digest({**cfg["data"], "cache_dir": "/elsewhere"})


def test_the_trials_of_a_study_get_one_cohort_cache_and_the_next_study_another(tmp_path):
    from medeman.data.datamodule import CohortCache

    seen = []

    def train_fn(cfg, *args, callbacks=(), cohorts=None, **kwargs):
        seen.append(cohorts)
        return _stand_in()(cfg, *args, callbacks=callbacks, **kwargs)

    cfg = _cfg({"tune.max_steps": 10})
    tune.run_study(cfg, "L", "U", study_name="c", out_dir=tmp_path, n_trials=2, train_fn=train_fn)
    tune.run_study(cfg, "L", "U", study_name="c", out_dir=tmp_path, n_trials=1, train_fn=train_fn)
    assert all(isinstance(c, CohortCache) for c in seen) and len(seen) == 3
    assert seen[0] is seen[1] and seen[2] is not seen[0]


def test_disk_cache_is_shared_by_the_trials(tmp_path):
    seen = []

    def train_fn(cfg, *args, callbacks=(), **kwargs):
        seen.append(cfg["data"]["cache_dir"])
        return _stand_in()(cfg, *args, callbacks=callbacks, **kwargs)

    cfg = _cfg({"data.cache": "disk", "tune.max_steps": 10})
    tune.run_study(cfg, "L", "U", study_name="d", out_dir=tmp_path, n_trials=2, train_fn=train_fn)
    assert seen == [str((tmp_path / "cache").resolve())] * 2


def test_workers_flag_starts_workers_on_one_study_and_divides_the_threads(make_cohort, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    root = make_cohort(3, 1)
    out = tmp_path / "tune"
    sets = [
        "data.patch_size=[16,16,16]",
        "data.spacing=null",
        "data.num_classes=3",
        "data.num_workers=0",
        "model.channels=[4,8]",
        "train.max_steps=2",
        "tune.max_steps=2",
        "tune.validations=1",
        "data.val_fraction=0.34",
    ]
    argv = [
        "--labeled",
        str(root / "labeled"),
        "--unlabeled",
        str(root / "unlabeled"),
        "--study",
        "w",
        "--n-trials",
        "1",
        "--workers",
        "2",
        "--out",
        str(out),
        "--no-plots",
        *[a for s in sets for a in ("--set", s)],
    ]
    assert tune.main(argv) == 0
    err = capsys.readouterr().err
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // 2)  # no loader workers: the cores divided by the 2 workers
    assert [line for line in err.splitlines() if line.startswith("threads:")] == [  # said once, by the first worker
        f"threads: {threads} torch thread{'s' if threads > 1 else ''} per process "
        f"({cores} core{'s' if cores > 1 else ''} shared by 2 processes; change with --threads)"
    ]
    study = optuna.load_study(study_name="w", storage=tune.open_storage(None, out))
    assert sorted(t.state for t in study.trials) == [TrialState.COMPLETE] * 2  # one trial from each worker
