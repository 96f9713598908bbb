"""medeman.tune: search space, failures, the worker cap, and real studies on tiny data (SQLite, journal, PostgreSQL)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"spacing": None, "patch_size": [16, 16, 16], "num_workers": 0, "cache": "none",
             "batch_size_labeled": 1, "batch_size_unlabeled": 1, "val_fraction": 0.25},
    "model": {"channels": [4, 8], "num_res_units": 0},
    "train": {"max_steps": 4, "val_every_steps": 2, "accelerator": "cpu", "log_every_steps": 1},
    "tune": {"n_startup_trials": 1},
}

# (tune overrides, expected config values of the point {1-m: 0.001, weight: 2, threshold: 0.8, rampup: 300})
SPACE_CASES = [
    [{}, {("ssl", "ema_momentum"): 0.999, ("ssl", "consistency_weight"): 2.0}],
    [{"tune.pseudo_label_threshold": [0.5, 0.95], "tune.rampup_steps": [10, 1000]},
     {("ssl", "ema_momentum"): 0.999, ("ssl", "consistency_weight"): 2.0, ("ssl", "pseudo_label_threshold"): 0.8, ("ssl", "rampup_steps"): 300}],
]
BAD_SPACES = [
    {"tune.ema_momentum": [0.9, 1.0]},  # 1 - m = 0 has no logarithm
    {"tune.ema_momentum": [0.999, 0.9]},
    {"tune.consistency_weight": [0.0, 10.0]},
    {"tune.consistency_weight": None},
    {"tune.pseudo_label_threshold": [0.5, 1.5]},
    {"tune.rampup_steps": [10.5, 100]},
    {"tune.rampup_steps": 100},
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


def _stand_in(fail_on: set[int] = frozenset()):
    """A train_fn that scores a point without training: best near m = 0.99, weight = 1."""

    def train_fn(cfg, labeled, unlabeled, val, out_dir, *, callbacks=(), **kwargs):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if int(Path(out_dir).name.split("_")[1]) in fail_on:
            raise RuntimeError("out of memory (simulated)")
        m, w = cfg["ssl"]["ema_momentum"], cfg["ssl"]["consistency_weight"]
        return types.SimpleNamespace(best_dice_teacher=1 - abs(math.log10(1 - m) + 2) / 4 - abs(math.log10(w)) / 4)

    return train_fn


def _counts(study: optuna.Study) -> dict[str, int]:
    return {s.name: len(study.get_trials(states=(s,))) for s in TrialState}


@pytest.mark.parametrize("sets,expected", SPACE_CASES)
def test_search_space_maps_to_config(sets, expected):
    cfg = _cfg(sets)
    point = {"one_minus_ema_momentum": 0.001, "consistency_weight": 2.0, "pseudo_label_threshold": 0.8, "rampup_steps": 300}
    trial = optuna.trial.FixedTrial(point)
    assert tune.suggest(trial, cfg["tune"]) == pytest.approx(expected)
    resolved = tune.trial_config(cfg, trial.params)
    for (section, key), value in expected.items():
        assert resolved[section][key] == pytest.approx(value)
    assert cfg["ssl"]["ema_momentum"] == 0.99  # the base config is not touched


@pytest.mark.parametrize("sets", BAD_SPACES, ids=[next(iter(s)) + "=" + str(next(iter(s.values()))) for s in BAD_SPACES])
def test_bad_search_space_is_rejected(sets):
    with pytest.raises(ConfigError, match=next(iter(sets))):
        tune.check_space(_cfg(sets)["tune"])


def test_trial_shorter_than_validation_interval_is_rejected(tmp_path):
    cfg = _cfg({"tune.max_steps": 10, "train.val_every_steps": 50})
    with pytest.raises(ConfigError, match="never measure"):
        tune.run_study(cfg, "L", study_name="s", out_dir=tmp_path, n_trials=1, train_fn=_stand_in())


def test_failed_trial_is_recorded_and_study_goes_on(tmp_path):
    cfg = _cfg({"tune.max_steps": 10, "train.val_every_steps": 5})
    study = tune.run_study(cfg, "L", "U", study_name="s", out_dir=tmp_path, n_trials=3, train_fn=_stand_in(fail_on={1}))
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: out of memory (simulated)"
    assert "out of memory" in tune.summary_table(study).splitlines()[3]


def test_journal_storage_resumes_with_new_points(tmp_path):
    cfg = _cfg({"tune.max_steps": 10, "train.val_every_steps": 5})
    journal = str(tmp_path / "shared" / "study.log")
    tune.run_study(cfg, "L", "U", study_name="j", out_dir=tmp_path, storage=journal, n_trials=2, train_fn=_stand_in())
    study = tune.run_study(cfg, "L", "U", study_name="j", out_dir=tmp_path, storage=journal, n_trials=2, train_fn=_stand_in())
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert len({t.params["one_minus_ema_momentum"] for t in study.trials}) == 4  # a resumed study samples afresh


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
    assert study.trials[0].intermediate_values == pytest.approx({2: 0.9, 4: 0.9})  # reported at optimizer steps
    assert study.trials[1].intermediate_values == pytest.approx({2: 0.1})  # pruned at its first validation
    assert all((out / f"trial_{n:04d}" / "config.yaml").is_file() for n in range(3))

    study = tune.run_study(cfg, labeled, unlabeled, study_name="tiny", out_dir=out, n_trials=1, train_fn=pinned_fit)
    assert len(study.trials) == 4 and (out / "study.db").is_file()

    assert tune.report(study, cfg, out, [str(config)], plots=False)
    best = load_config([config, out / "best_params.yaml"])
    assert best["ssl"]["ema_momentum"] == pytest.approx(1 - study.trials[0].params["one_minus_ema_momentum"])
    assert best["ssl"]["consistency_weight"] == pytest.approx(study.trials[0].params["consistency_weight"])
    assert load_config([out / "best_config.yaml"])["ssl"] == best["ssl"]
    args = ["--config", str(config), "--config", str(out / "best_params.yaml"), "--labeled", str(labeled),
            "--unlabeled", str(unlabeled), "--out", str(tmp_path / "final"), "--set", "train.max_steps=2", "--no-progress"]
    assert train_main(args) == 0 and (tmp_path / "final" / "teacher.pt").is_file()


def _two_workers(tmp_path: Path, storage: str, study: str, cap: int = 3) -> optuna.Study:
    """Run two `medeman tune` processes against one storage with a total cap; return the shared study."""
    labeled, unlabeled, config = _write_tiny(tmp_path)
    command = [sys.executable, "-m", "medeman.cli", "tune", "--config", str(config), "--labeled", str(labeled),
               "--unlabeled", str(unlabeled), "--study", study, "--storage", storage, "--n-trials", "10",
               "--max-trials", str(cap), "--out", str(tmp_path / "tune"), "--no-plots",
               "--set", "train.max_steps=2", "--set", "tune.n_startup_trials=10"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    shared = optuna.load_study(study_name=study, storage=tune.open_storage(storage, tmp_path))
    counts = _counts(shared)
    assert counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"] == cap, (counts, outputs)
    numbers = [t.number for t in shared.get_trials(states=tune.FINISHED)]
    assert sorted(numbers) == list(range(cap))  # each trial run once, none twice
    assert sorted(p.name for p in (tmp_path / "tune").glob("trial_*")) == [f"trial_{n:04d}" for n in range(cap)]
    return shared


def test_two_workers_share_a_sqlite_study(tmp_path):
    _two_workers(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}", "shared")


def test_two_workers_share_a_postgresql_study(tmp_path):
    url = os.environ.get("MEDEMAN_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("MEDEMAN_TEST_POSTGRES_URL is not set: no PostgreSQL server to share a study on (CI starts one in .ci/postgres.sh)")
    study = f"test-{uuid.uuid4().hex[:8]}"
    try:
        _two_workers(tmp_path, url, study)
    finally:
        optuna.delete_study(study_name=study, storage=tune.database_url(url))
