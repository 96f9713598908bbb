"""medeman.resume: a stopped run resumed logs the same rows and ends with the same networks as an uninterrupted one."""

import csv
import hashlib

import lightning.pytorch as pl
import pytest
import torch

from medeman.config import load_config
from medeman.resume import changed_settings, is_fixed
from medeman.train import fit, main
from tiny_config import TINY_BASE

TINY = [
    *TINY_BASE,
    "train.val_every_steps=4",
    "ssl.rampup_steps=2",
    "ssl.warmup_steps=0",
    "ssl.recalibration_batches=2",
]


# the teacher pass's own log: its wall time differs between any two runs, and a pass made at the step of the
# checkpoint is logged in that step's row, which the resumed run rewrites without it (the pass is not redone:
# its results are in the checkpoint). What the pass changes is compared: the networks and the logged training values.
TEACHER_PASS_COLUMNS = ("focus/refresh_seconds", "focus/scans_with_centres")


def _rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TEACHER_PASS_COLUMNS} for row in csv.DictReader(handle)]


def _networks(run) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _files(run) -> dict:
    return {
        str(p.relative_to(run)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()
    }


def _assert_same_run(resumed, uninterrupted):
    assert _rows(resumed) == _rows(uninterrupted)  # every row at the same step, every value bit for bit
    expected, got = _networks(uninterrupted), _networks(resumed)
    assert got.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(got[name], expected[name])] == []


@pytest.fixture
def cohort(make_cohort, tmp_path):
    return make_cohort(3, 2, root=tmp_path / "cohort")


@pytest.mark.parametrize("first", [4, 6])  # at a validation, and mid-interval
def test_a_run_stopped_at_max_steps_and_resumed_longer_equals_the_uninterrupted_run(cohort, tmp_path, first):
    sets = TINY + [
        "train.lr_schedule=constant",
        "ssl.momentum_schedule=constant",
    ]  # schedules that do not depend on max_steps (warm-up and ramp-up in steps)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    fit(
        load_config(sets=sets + ["train.max_steps=10"]),
        cohort / "labeled",
        cohort / "unlabeled",
        out_dir=whole,
        progress_bar=False,
    )
    fit(
        load_config(sets=sets + [f"train.max_steps={first}"]),
        cohort / "labeled",
        cohort / "unlabeled",
        out_dir=parts,
        progress_bar=False,
    )
    fit(
        load_config([parts / "config.yaml"], ["train.max_steps=10"]),
        cohort / "labeled",
        cohort / "unlabeled",
        out_dir=parts,
        resume=True,
        progress_bar=False,
    )
    _assert_same_run(parts, whole)
    assert [int(r["step"]) for r in _rows(parts) if r["loss/total"]] == list(range(10))
    assert [int(r["step"]) for r in _rows(parts) if r["val/dice_teacher"]] == [3, 7]  # after steps 4 and 8


def _cli_run_of_4_steps(cohort, run):
    """Train a 4-step run into ``run`` through ``medeman train``; return the CLI's data and output arguments."""
    args = [
        "--labeled",
        str(cohort / "labeled"),
        "--unlabeled",
        str(cohort / "unlabeled"),
        "--out",
        str(run),
        "--no-progress",
    ]
    assert main(args + [x for s in TINY + ["train.max_steps=4"] for x in ("--set", s)]) == 0
    return args


def _without_threads_line(err: str) -> str:
    """stderr less the one line that says how many torch threads the process took (medeman.threads)."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("threads: "))


class _Killed(RuntimeError):
    pass


class _KillAt(pl.Callback):
    """Raises as training reaches ``step`` (or as the validation after it starts)."""

    def __init__(self, step: int, in_validation: bool = False):
        self.step, self.in_validation = step, in_validation

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step and not self.in_validation:
            raise _Killed(f"killed at step {self.step}")

    def on_validation_start(self, trainer, module):
        if trainer.global_step == self.step and self.in_validation:
            raise _Killed(f"killed in the validation of step {self.step}")


@pytest.mark.parametrize(
    "every, kill, in_validation, resumed_from, sets",
    [
        (0, 7, False, 4, []),  # last.ckpt at validations only: steps 4-6 run again
        (3, 7, False, 6, []),  # and every 3 steps: from mid-interval
        (3, 7, False, 6, ["data.num_workers=1"]),
        (3, 7, False, 6, ["train.accumulate_grad_batches=2"]),
        # FixMatch's distribution alignment: the frequencies of the last teacher pass travel in the checkpoint
        (
            3,
            7,
            False,
            6,
            ["ssl.method=fixmatch", "ssl.fixmatch_distribution_alignment=true", "ssl.fixmatch_threshold=0.4"],
        ),
        # lesion copy-paste into labeled and unlabeled patches: its draws come from the RNG seeded per batch
        (
            3,
            7,
            False,
            6,
            [
                "ssl.method=fixmatch",
                "ssl.fixmatch_threshold=0.4",
                "data.lesion_classes=[2]",
                "data.lesion_host_classes=[1]",
                "data.labeled_lesion_paste=1",
                "ssl.fixmatch_paste_probability=1",
            ],
        ),
        (4, 8, True, 4, []),  # killed in a validation: the checkpoint of its step is the one written after it
    ],
)
def test_a_run_killed_and_resumed_equals_the_uninterrupted_run(
    cohort, tmp_path, every, kill, in_validation, resumed_from, sets
):
    """The rows logged after the checkpoint and before the kill are logged once, by the resumed run."""
    cfg = load_config(
        sets=TINY
        + ["train.max_steps=10", "ssl.teacher_bn_refresh_every=3", f"train.checkpoint_every_steps={every}", *sets]
    )
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    fit(cfg, cohort / "labeled", cohort / "unlabeled", out_dir=whole, progress_bar=False)
    with pytest.raises(_Killed):
        fit(
            cfg,
            cohort / "labeled",
            cohort / "unlabeled",
            out_dir=killed,
            callbacks=[_KillAt(kill, in_validation)],
            progress_bar=False,
        )
    assert max(int(r["step"]) for r in _rows(killed)) == kill - 1
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == resumed_from
    fit(
        load_config([killed / "config.yaml"]),
        cohort / "labeled",
        cohort / "unlabeled",
        out_dir=killed,
        resume=True,
        progress_bar=False,
    )
    _assert_same_run(killed, whole)
    if "ssl.fixmatch_paste_probability=1" in sets:  # the case pastes at all
        assert any(float(r.get("ssl/pasted_fraction") or 0) > 0 for r in _rows(whole))


@pytest.mark.parametrize(
    "changed, named",
    [
        (["data.num_classes=4"], "data.num_classes 3 -> 4"),
        (
            ["model.channels=[4,16]", "data.patch_size=[8,8,8]"],
            "data.patch_size [16, 16, 16] -> [8, 8, 8], model.channels [4, 8] -> [4, 16]",
        ),
        (["data.spacing=[2,2,2]"], "data.spacing [1, 1, 1] -> [2, 2, 2]"),
    ],
)
def test_a_resume_that_changes_data_or_model_settings_is_refused_and_leaves_the_run_untouched(
    cohort, tmp_path, capsys, changed, named
):
    run = tmp_path / "run"
    args = _cli_run_of_4_steps(cohort, run)
    before = _files(run)
    capsys.readouterr()
    assert main(args + ["--resume"] + [x for s in changed for x in ("--set", s)]) == 2
    err = _without_threads_line(capsys.readouterr().err)
    assert err.count("\n") == 1 and err.startswith(
        f"error: cannot resume {run}: data or model settings differ from its config.yaml"
    )
    assert named in err
    assert _files(run) == before


def test_changed_optimisation_settings_are_used_and_recorded_with_their_step(cohort, tmp_path):
    run = tmp_path / "run"
    fit(
        load_config(sets=TINY + ["train.max_steps=4"]),
        cohort / "labeled",
        cohort / "unlabeled",
        out_dir=run,
        progress_bar=False,
    )
    seen = {}

    class _Rates(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.setdefault("group", dict(trainer.optimizers[0].param_groups[0]))

    cfg = load_config([run / "config.yaml"], ["train.max_steps=6", "train.lr=0.01", "train.weight_decay=0.001"])
    fit(
        cfg,
        cohort / "labeled",
        cohort / "unlabeled",
        out_dir=run,
        resume=True,
        callbacks=[_Rates()],
        progress_bar=False,
    )
    # poly schedule at step 4 of 6: lr = 0.01 * (1 - 4/6) ** 0.9
    assert seen["group"]["lr"] == pytest.approx(0.01 * (1 - 4 / 6) ** 0.9)
    assert seen["group"]["initial_lr"] == 0.01 and seen["group"]["weight_decay"] == 0.001
    first = (run / "config.yaml").read_text().splitlines()[0]
    # the schedules given as fractions of the run are pinned where the 4-step run had them (resume.pin_schedules)
    assert first == (
        "# resumed at step 4: ssl.adaptive_threshold_momentum None -> 0.0, ssl.bcp_pretrain_steps None -> 0, "
        "train.max_steps 4 -> 6, train.lr 0.001 -> 0.01, train.weight_decay 1e-05 -> 0.001"
    )
    saved = load_config([run / "config.yaml"])
    assert (saved["train"]["max_steps"], saved["train"]["lr"]) == (6, 0.01)


def test_resume_after_a_kill_before_the_first_checkpoint_says_to_overwrite(cohort, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "--labeled",
        str(cohort / "labeled"),
        "--unlabeled",
        str(cohort / "unlabeled"),
        "--out",
        str(run),
        "--no-progress",
    ]
    args += [x for s in TINY + ["train.max_steps=4"] for x in ("--set", s)]
    with pytest.raises(_Killed):
        fit(
            load_config(sets=TINY + ["train.max_steps=4"]),
            cohort / "labeled",
            cohort / "unlabeled",
            out_dir=run,
            callbacks=[_KillAt(1)],
            progress_bar=False,
        )
    assert main(args + ["--resume"]) == 2
    assert "start it again with --overwrite instead of --resume" in capsys.readouterr().err
    assert main(args) == 2
    assert "--overwrite to replace it" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(["--labeled", str(cohort / "labeled"), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "start a new run without --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, fixed",
    [
        ("data.num_classes", True),
        ("data.patch_size", True),
        ("data.flip_prob", True),
        ("model.channels", True),
        ("ssl.method", True),
        ("train.optimizer", True),
        ("data.num_workers", False),
        ("data.cache", False),
        ("train.max_steps", False),
        ("train.lr", False),
        ("ssl.consistency_weight", False),
        ("train.val_every_steps", False),
    ],
)
def test_which_settings_a_resume_must_keep(key, fixed):
    assert is_fixed(key) is fixed


def test_changed_settings_lists_each_differing_key():
    saved = load_config(sets=["train.lr=0.001"])
    assert changed_settings(saved, load_config(sets=["train.lr=0.01", "data.num_classes=4"])) == {
        "data.num_classes": (2, 4),
        "train.lr": (0.001, 0.01),
    }


def test_a_checkpoint_that_does_not_fit_the_network_is_refused_in_one_line(cohort, tmp_path, capsys):
    """A config.yaml edited by hand passes the settings check; the checkpoint's tensors still must fit."""
    run = tmp_path / "run"
    args = _cli_run_of_4_steps(cohort, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("channels: [4, 8]", "channels: [4, 16]"))
    before = _files(run)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = _without_threads_line(capsys.readouterr().err)
    assert err.count("\n") == 1
    assert err.startswith(
        f"error: {run / 'checkpoints' / 'last.ckpt'}: cannot resume: the checkpoint's network differs from this config's in "
    )
    assert _files(run) == before


def test_a_longer_resume_keeps_the_warmup_where_it_was(cohort, tmp_path):
    """Warm-up and ramp-up are fractions of max_steps: extending a 10-step run to 20 keeps them at 1 and 3 steps (recorded)."""
    run = tmp_path / "run"
    sets = [s for s in TINY if not s.startswith(("ssl.rampup_steps", "ssl.warmup_steps"))]
    fit(
        load_config(sets=sets + ["train.max_steps=10"]),
        cohort / "labeled",
        cohort / "unlabeled",
        out_dir=run,
        progress_bar=False,
    )
    cfg = load_config([run / "config.yaml"], ["train.max_steps=20"])
    fit(cfg, cohort / "labeled", cohort / "unlabeled", out_dir=run, resume=True, progress_bar=False)
    assert (cfg["ssl"]["warmup_steps"], cfg["ssl"]["rampup_steps"], cfg["ssl"]["bcp_pretrain_steps"]) == (1, 3, 1)
    saved = load_config([run / "config.yaml"])
    assert saved["ssl"]["warmup_steps"] == 1 and saved["train"]["max_steps"] == 20
    assert "ssl.warmup_steps None -> 1" in (run / "config.yaml").read_text().splitlines()[0]
