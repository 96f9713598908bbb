"""medeman.train: short real runs on tiny cohorts, resume, run-folder safety and config errors."""

import csv
import math

import lightning.pytorch as pl
import pytest
import torch

from medeman.checkpoint import load_teacher, read_teacher_file
from medeman.config import ConfigError, load_config
from medeman.infer import main as infer_main
from medeman.train import fit, main
from tiny_config import TINY


def _metrics(run):
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


METHODS = [
    ("supervised", ["ssl.method=supervised"]),
    ("supervised_ema", ["ssl.method=supervised_ema"]),
    ("mt_eman", ["ssl.teacher_norm=eman"]),
    (
        "mt_eman_export_recalibration",
        ["ssl.teacher_bn_recalibration=export", "ssl.pseudo_label_threshold=0.6", "ssl.pseudo_label_reduction=kept"],
    ),
    (
        "mt_eman_no_recalibration_cosine",
        ["ssl.teacher_bn_recalibration=off", "ssl.momentum_schedule=cosine", "train.batch_dice=false"],
    ),
    ("mt_ema_instancenorm", ["model.norm=instance", "ssl.teacher_norm=ema"]),
    ("ua_mt", ["ssl.method=ua_mt", "ssl.ua_mt_passes=2"]),
    ("bcp", ["ssl.method=bcp", "ssl.bcp_pretrain_steps=2"]),
    (
        "mt_bn_kl_pseudo",
        ["ssl.teacher_norm=bn", "ssl.consistency=kl", "ssl.pseudo_label_threshold=0.5", "ssl.pseudo_label_dice=true"],
    ),
    ("mt_eman_bf16", ["ssl.teacher_norm=eman", "train.precision=bf16-mixed"]),
]


@pytest.mark.parametrize("name, sets", METHODS, ids=[m[0] for m in METHODS])
def test_each_method_trains_and_leaves_a_run_folder(make_cohort, tmp_path, name, sets):
    root = make_cohort(3, 2)
    cfg = load_config(sets=TINY + sets + ["train.max_steps=4"])
    run = tmp_path / name
    result = fit(cfg, root / "labeled", root / "unlabeled", out_dir=run, progress_bar=False)
    assert result.steps == 4
    for item in ("teacher.pt", "config.yaml", "metrics.csv", "split.json", "checkpoints/last.ckpt", "tensorboard"):
        assert (run / item).exists(), item
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    rows = _metrics(run)
    losses = [float(r["loss/total"]) for r in rows if r.get("loss/total")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert 0.0 <= result.best_dice_teacher <= 1.0
    net, saved_cfg, payload = load_teacher(run)
    assert all(
        t.dtype == torch.float32 for t in payload["state_dict"].values() if t.is_floating_point()
    )  # EMA stays fp32
    assert saved_cfg["ssl"]["method"] == cfg["ssl"]["method"]
    assert load_config([run / "config.yaml"]) == cfg
    # teacher_bn_recalibration=best (the default) keeps the re-estimated or the teacher's own statistics, whichever validated better
    expected_stats = {
        "supervised": {"batch"},
        "mt_eman_export_recalibration": {"recalibrated"},
        "mt_eman_no_recalibration_cosine": {"ema"},
        "mt_bn_kl_pseudo": {"recalibrated", "batch"},
        "mt_ema_instancenorm": {"none"},
    }.get(name, {"recalibrated", "ema"})
    assert payload["extra"]["teacher_bn_stats"] in expected_stats
    assert (
        infer_main(["--model", str(run), "--input", str(root / "unlabeled"), "--output", str(tmp_path / "pred")]) == 0
    )
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["scan0.nii.gz", "scan1.nii.gz"]
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"ua_mt": {"ssl/certain_fraction", "ssl/uncertainty_threshold"}, "bcp": {"loss/copy_paste"}}.get(
        name, set()
    ) <= logged
    if name == "mt_bn_kl_pseudo":
        kept = [float(r["ssl/pseudo_label_fraction"]) for r in rows if r.get("ssl/pseudo_label_fraction")]
        assert kept and all(0.0 <= v <= 1.0 for v in kept)


def test_unsupervised_weight_is_zero_in_warmup_then_ramps(make_cohort, tmp_path):
    root = make_cohort(3, 2)
    cfg = load_config(
        sets=TINY + ["train.max_steps=6", "ssl.warmup_steps=2", "ssl.rampup_steps=3", "ssl.consistency_weight=2.0"]
    )
    fit(cfg, root / "labeled", root / "unlabeled", out_dir=tmp_path / "run", progress_bar=False)
    rows = [r for r in _metrics(tmp_path / "run") if r.get("ssl/weight")]
    weights = [float(r["ssl/weight"]) for r in rows]
    expected = [0.0, 0.0] + [2.0 * math.exp(-5 * (1 - min(s / 3, 1)) ** 2) for s in range(4)]
    assert weights == pytest.approx(expected, rel=1e-5)
    assert all(not r.get("loss/unsup") for r in rows[:2])  # no unlabeled pass at all in the warm-up
    assert all(r.get("loss/unsup") for r in rows[2:])


class _TeacherAtStart(pl.Callback):
    def on_train_start(self, trainer, module):
        self.step = trainer.global_step
        self.state = {k: v.detach().clone() for k, v in module.teacher.state_dict().items()}


def test_resume_continues_at_the_right_step_with_the_identical_teacher(make_cohort, tmp_path):
    root = make_cohort(3, 2)
    run = tmp_path / "run"
    cfg = load_config(sets=TINY + ["train.max_steps=4"])
    fit(cfg, root / "labeled", root / "unlabeled", out_dir=run, progress_bar=False)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    saved_teacher = {k[len("teacher.") :]: v for k, v in saved["state_dict"].items() if k.startswith("teacher.")}
    probe = _TeacherAtStart()
    cfg = load_config([run / "config.yaml"], ["train.max_steps=6"])
    result = fit(
        cfg, root / "labeled", root / "unlabeled", out_dir=run, resume=True, callbacks=[probe], progress_bar=False
    )
    assert probe.step == 4 and result.steps == 6
    assert saved_teacher.keys() == probe.state.keys()
    for name, value in saved_teacher.items():
        torch.testing.assert_close(probe.state[name], value, rtol=0, atol=0, msg=name)
    assert read_teacher_file(run)["step"] in (2, 4, 6)  # the best validation of either part
    steps = [int(r["step"]) for r in _metrics(run) if r.get("loss/total")]
    assert steps == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]  # metrics.csv keeps the rows from before the resume, and goes on at the next step


def test_existing_run_folder_is_never_replaced_without_overwrite(make_cohort, tmp_path, capsys):
    root = make_cohort(3, 2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "teacher.pt").write_bytes(b"user's file")
    args = [
        "--labeled",
        str(root / "labeled"),
        "--unlabeled",
        str(root / "unlabeled"),
        "--out",
        str(run),
        "--no-progress",
    ]
    args += [x for s in TINY + ["train.max_steps=2"] for x in ("--set", s)]
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "teacher.pt").read_bytes() == b"user's file"
    assert main(args + ["--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


BAD = [
    (["--set", "ssl.ema_momentun=0.9"], "unknown config key 'ssl.ema_momentun'"),
    (["--set", "model.norm=instance"], "or ssl.teacher_norm=ema"),
    (["--set", "ssl.teacher_norm=batch"], "ssl.teacher_norm: 'batch' is not one of eman, bn, ema"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_configs_fail_with_their_message(make_cohort, tmp_path, capsys, extra, message):
    root = make_cohort(3, 2)
    args = ["--labeled", str(root / "labeled"), "--unlabeled", str(root / "unlabeled"), "--out", str(tmp_path / "run")]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "teacher.pt").exists()


def test_mean_teacher_without_unlabeled_scans_is_refused(make_cohort, tmp_path, capsys):
    root = make_cohort(3, 0)
    # (without --config and without unlabeled scans the plan trains supervised: ask for the mean teacher)
    assert (
        main(["--labeled", str(root / "labeled"), "--out", str(tmp_path / "run"), "--set", "ssl.method=mean_teacher"])
        == 2
    )
    assert "needs unlabeled scans" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--labeled", str(root / "labeled"), "--unlabeled", str(empty), "--out", str(tmp_path / "run2")]
    args += [x for s in TINY for x in ("--set", s)]
    assert main(args) == 2
    assert str(empty) in capsys.readouterr().err


def test_unknown_key_in_config_file_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ssl:\n  consistancy: mse\n")
    with pytest.raises(ConfigError, match="unknown config key 'ssl.consistancy'.*ssl.consistency"):
        load_config([bad])


def test_cpu_multiprocess_run_warns_that_syncbatchnorm_is_unavailable():
    from medeman.train import _sync_batchnorm

    cfg = load_config(sets=["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp"])
    with pytest.warns(UserWarning, match="PyTorch refuses SyncBatchNorm"):
        assert _sync_batchnorm(cfg) is False
    assert (
        _sync_batchnorm(load_config(sets=["train.accelerator=cpu", "train.devices=2", "train.sync_batchnorm=false"]))
        is False
    )


def test_best_statistics_are_chosen_on_validation_logged_and_exported(make_cohort, tmp_path):
    """teacher_bn_recalibration=best: every validation scores both teachers; val/dice_teacher and teacher.pt follow the better."""
    root = make_cohort(3, 2)
    cfg = load_config(
        sets=TINY + ["train.max_steps=6", "ssl.teacher_bn_recalibration=best", "ssl.recalibration_batches=2"]
    )
    run = tmp_path / "run"
    fit(cfg, root / "labeled", root / "unlabeled", out_dir=run, progress_bar=False)
    rows = {int(r["step"]): r for r in _metrics(run) if r.get("val/dice_teacher")}
    assert len(rows) == 3  # validations after steps 2, 4 and 6
    for row in rows.values():
        raw, recalibrated = float(row["val/dice_teacher_raw"]), float(row["val/dice_teacher_recalibrated"])
        assert float(row["val/dice_teacher"]) == pytest.approx(max(raw, recalibrated))
    payload = read_teacher_file(run)
    row = rows[payload["step"] - 1]  # Lightning logs validation metrics at the step before the counter moves on
    expected = (
        "ema" if float(row["val/dice_teacher_raw"]) > float(row["val/dice_teacher_recalibrated"]) else "recalibrated"
    )
    assert payload["extra"]["teacher_bn_stats"] == expected
    assert payload["extra"]["val_dice_teacher"] == pytest.approx(float(row["val/dice_teacher"]))


def test_choose_teacher_prefers_the_higher_validation_dice_and_the_re_estimated_on_a_tie():
    from medeman.methods import METHODS

    method = METHODS["mean_teacher"](load_config(sets=["ssl.teacher_bn_recalibration=best"]))
    assert method.choose_teacher(0.71, 0.70) == "raw" and method.chosen_statistics == "raw"
    assert method.choose_teacher(0.70, 0.71) == "recalibrated"
    assert method.choose_teacher(0.70, 0.70) == "recalibrated"


@pytest.mark.parametrize(
    "mode, raw, recalibrated, teacher, kept",
    [
        ("best", 0.8, 0.7, "raw", "EMA'd"),
        ("best", 0.7, 0.8, "re-estimated", "re-estimated"),
        ("always", 0.8, 0.7, "re-estimated", None),  # scored both (the first validation) but no choice to make
    ],
)
def test_validation_results_name_the_chosen_teacher(mode, raw, recalibrated, teacher, kept):
    from medeman.methods import METHODS

    method = METHODS["mean_teacher"](load_config(sets=[f"ssl.teacher_bn_recalibration={mode}"]))
    scores = {"student": ("s",), "teacher": ("re-estimated",), "teacher_raw": ("raw",)}
    dice = {"s": 0.5, "re-estimated": recalibrated, "raw": raw}
    named, note = method.name_validation_results(scores, lambda s: dice[s[0]])
    assert named["teacher"] == (teacher,) and named["student"] == ("s",) and scores["teacher"] == ("re-estimated",)
    assert ("teacher_recalibrated" in named) == (mode == "best")
    assert note.startswith(
        f"{raw:.3f} with its EMA'd BatchNorm statistics, {recalibrated:.3f} re-estimated (ssl.teacher_bn_recalibration={mode})"
    )
    assert (f"keeps the {kept} ones" in note) if kept else ("keeps" not in note)
    only_teacher = {"student": ("s",), "teacher": ("re-estimated",)}
    assert method.name_validation_results(only_teacher, lambda s: dice[s[0]]) == (only_teacher, None)


def test_without_a_teacher_the_student_is_logged_as_the_teacher():
    from medeman.methods import METHODS

    named, note = METHODS["supervised"](load_config(sets=["ssl.method=supervised"])).name_validation_results(
        {"student": ("s",)}, float
    )
    assert named == {"student": ("s",), "teacher": ("s",)} and note is None


def test_recalibrated_teacher_is_validated_deployed_and_compared_once_with_the_raw_one(make_cohort, tmp_path, capsys):
    """teacher.pt holds re-estimated statistics; the training teacher keeps its EMA'd ones; raw Dice logged once."""
    root = make_cohort(3, 2)
    cfg = load_config(
        sets=TINY + ["train.max_steps=4", "ssl.teacher_bn_recalibration=always", "ssl.recalibration_batches=3"]
    )
    run = tmp_path / "run"
    fit(cfg, root / "labeled", root / "unlabeled", out_dir=run, progress_bar=False)
    raw = [r["val/dice_teacher_raw"] for r in _metrics(run) if r.get("val/dice_teacher_raw")]
    assert len(raw) == 1 and 0.0 <= float(raw[0]) <= 1.0  # first validation only (val every 2 of 4 steps)
    payload = read_teacher_file(run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    means = [k for k in payload["state_dict"] if k.endswith("running_mean")]
    params = [k for k in payload["state_dict"] if k.endswith("weight")]
    assert means and params
    if payload["step"] == 4:  # the deployed copy: same weights as the EMA teacher, other statistics
        assert all(torch.equal(payload["state_dict"][k], ckpt["teacher." + k]) for k in params)
        assert not all(torch.equal(payload["state_dict"][k], ckpt["teacher." + k]) for k in means)


@pytest.mark.parametrize("rule", ["last", "best"])
def test_teacher_pt_holds_the_final_step_teacher_or_says_how_many_candidates_the_best_was_chosen_from(
    make_cohort, tmp_path, rule
):
    """train.deploy=last (default): teacher.pt is the final teacher, chosen by nothing; best: the best validation of 3, and it says so."""
    root = make_cohort(3, 2)
    cfg = load_config(sets=TINY + ["train.max_steps=6", f"train.deploy={rule}"])
    run = tmp_path / "run"
    result = fit(cfg, root / "labeled", root / "unlabeled", out_dir=run, progress_bar=False)
    scores = {int(r["step"]): float(r["val/dice_teacher"]) for r in _metrics(run) if r.get("val/dice_teacher")}
    assert sorted(scores) == [1, 3, 5]  # validations after steps 2, 4 and 6
    payload = read_teacher_file(run)
    assert payload["extra"]["deploy"] == rule
    if rule == "last":
        final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        assert payload["step"] == 6 and payload["extra"]["candidates"] == 1
        assert all(torch.equal(value, final["teacher." + name]) for name, value in payload["state_dict"].items())
        assert (
            payload["extra"]["val_dice_teacher"] == pytest.approx(scores[5]) == pytest.approx(result.last_dice_teacher)
        )
    else:
        best_step = max(scores, key=lambda s: (scores[s], s))  # ties go to the later validation
        assert payload["extra"]["candidates"] == 3
        assert payload["step"] == best_step + 1 and payload["extra"]["val_dice_teacher"] == pytest.approx(
            max(scores.values())
        )


def _student_after(make_cohort, tmp_path, name: str, sets: list[str]) -> dict:
    root = tmp_path / "cohort"
    if not root.exists():
        make_cohort(3, 2, root=root)
    cfg = load_config(sets=TINY + ["train.max_steps=12", "train.log_every_steps=5", *sets])
    module_states = {}

    class _Student(pl.Callback):
        def on_train_end(self, trainer, module):
            module_states.update({k: v.detach().clone() for k, v in module.student.state_dict().items()})

    fit(cfg, root / "labeled", root / "unlabeled", out_dir=tmp_path / name, callbacks=[_Student()], progress_bar=False)
    return module_states


@pytest.mark.parametrize("workers", [0, 1])
def test_training_does_not_depend_on_how_often_it_validates(make_cohort, tmp_path, workers):
    """Validation and both BatchNorm re-estimations (of the validated copy, and in place every 2 steps) never
    touch the training stream: runs validating every 3 and every 12 steps end with the same student, bit for bit."""
    sets = [
        f"data.num_workers={workers}",
        "ssl.teacher_bn_recalibration=best",
        "ssl.teacher_bn_refresh_every=2",
        "ssl.recalibration_batches=2",
    ]
    often = _student_after(make_cohort, tmp_path, "often", sets + ["train.val_every_steps=3"])
    rarely = _student_after(make_cohort, tmp_path, "rarely", sets + ["train.val_every_steps=12"])
    assert often.keys() == rarely.keys()
    different = [name for name in often if not torch.equal(often[name], rarely[name])]
    assert different == []


def test_the_number_of_loader_workers_does_not_change_the_run(make_cohort, tmp_path):
    """Every patch is seeded by its step, whichever worker makes it: 0 and 2 workers train the same student."""
    sets = ["data.cache=memory", "train.val_every_steps=3"]
    inline = _student_after(make_cohort, tmp_path, "inline", sets + ["data.num_workers=0"])
    workers = _student_after(make_cohort, tmp_path, "workers", sets + ["data.num_workers=2"])
    assert [name for name in inline if not torch.equal(inline[name], workers[name])] == []


def test_fit_builds_the_method_once_and_hands_it_to_module_and_datamodule(make_cohort, tmp_path, monkeypatch):
    """One method object per run: its checks, the DataModule's views and the module's training steps."""
    import medeman.methods
    import medeman.methods.registry
    import medeman.module
    from medeman.data.datamodule import SSLDataModule

    built, views = [], []

    def counting(cfg):
        built.append(medeman.methods.registry.build_method(cfg))
        return built[-1]

    for owner in (medeman.methods, medeman.module):
        monkeypatch.setattr(owner, "build_method", counting)
    setup = SSLDataModule.setup
    monkeypatch.setattr(
        SSLDataModule, "setup", lambda self, stage=None: (views.append(self.views), setup(self, stage))[1]
    )
    root = make_cohort(3, 2)
    fit(
        load_config(sets=TINY + ["ssl.method=fixmatch", "train.max_steps=2"]),
        root / "labeled",
        root / "unlabeled",
        out_dir=tmp_path / "run",
        progress_bar=False,
    )
    assert len(built) == 1  # the module built none of its own (it would have called build_method)
    assert views and set(views) == {("weak", "strong")}
    assert built[0].teacher.updates == 2  # the one method object trained the run: its teacher took both updates
