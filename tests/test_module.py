"""SSLSegModule: the teacher is the EMA of the student's history, updated once per optimizer step."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch

from medeman.config import load_config
from medeman.eman import make_teacher, momentum_at, recalibrate_batchnorm, tracked_batchnorms, update_teacher
from medeman.module import SSLSegModule
from tiny_patches import TinyData

TINY = [
    "model.channels=[4,8]",
    "model.num_res_units=1",
    "data.patch_size=[16,16,16]",
    "data.spacing=null",
    "train.lr=0.01",
]


class _StudentHistory(pl.Callback):
    """Snapshots of the student after every optimizer step."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.states):  # an optimizer step (and teacher update) just happened
            self.states.append({k: v.detach().clone() for k, v in module.student.state_dict().items()})


def _train(sets, steps=4, accumulate=1):
    cfg = load_config(sets=TINY + sets + [f"train.max_steps={steps}"])
    module = SSLSegModule(cfg)
    initial = {k: v.detach().clone() for k, v in module.student.state_dict().items()}
    history = _StudentHistory()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
        callbacks=[history],
    )
    trainer.fit(module, datamodule=TinyData())
    return cfg, module, initial, history.states


@pytest.mark.parametrize(
    "norm, accumulate, method",
    [
        ("eman", 1, "mean_teacher"),
        ("bn", 1, "mean_teacher"),
        ("eman", 2, "mean_teacher"),
        ("eman", 1, "supervised_ema"),
    ],
)
def test_teacher_equals_hand_computed_ema_of_student_history(norm, accumulate, method):
    cfg, module, initial, states = _train(
        [
            f"ssl.teacher_norm={norm}",
            "ssl.ema_momentum=0.8",
            "ssl.momentum_schedule=constant",
            "ssl.rampup_steps=0",
            "ssl.warmup_steps=0",
            f"ssl.method={method}",
        ],
        4,
        accumulate,
    )
    assert len(states) == 4  # one teacher update per optimizer step, whatever the accumulation
    expected = {k: v.clone() for k, v in initial.items()}
    for step, student in enumerate(states):
        m = momentum_at(step, 0.8, warmup=True)
        for name, value in student.items():
            if value.is_floating_point():
                expected[name] = m * expected[name] + (1 - m) * value
            else:
                expected[name] = value.clone()
    teacher = module.teacher.state_dict()
    params = {name for name, _ in module.teacher.named_parameters()}
    for name, value in teacher.items():
        if name in params or norm == "eman":
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    if norm == "eman":
        assert not any(bn.training for bn in tracked_batchnorms(module.teacher))
        assert (
            teacher[[k for k in teacher if k.endswith("num_batches_tracked")][0]].item()
            == states[-1][[k for k in teacher if k.endswith("num_batches_tracked")][0]].item()
        )


def test_bn_teacher_keeps_its_own_buffers():
    _, module, initial, states = _train(["ssl.teacher_norm=bn", "ssl.ema_momentum=0.8"], 3)
    key = [k for k in initial if k.endswith("running_mean")][0]
    # a bn teacher runs in train mode on the weak views: its running mean is its own, not the student's EMA
    assert not torch.allclose(module.teacher.state_dict()[key], states[-1][key])


def test_supervised_has_no_teacher_and_trains():
    _, module, initial, _ = _train(["ssl.method=supervised"], 2)
    assert module.teacher is None
    key = [k for k in initial if k.endswith("weight")][0]
    assert not torch.equal(module.student.state_dict()[key], initial[key])


def test_teacher_gets_no_gradient_and_is_not_optimized():
    cfg = load_config(sets=TINY)
    module = SSLSegModule(cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.teacher.parameters()}
    assert all(not p.requires_grad for p in module.teacher.parameters())


@pytest.mark.parametrize(
    "schedule, window, expected", [("constant", 0.1, 0.8), ("cosine", 0.1, 0.9), ("window", 0.25, 0.8)]
)
def test_module_momentum_follows_the_schedule_after_warmup(schedule, window, expected):
    """max_steps=20: cosine from 0.8 is 0.9 at step 10; a window of 25 % of 20 steps gives 1 - 1/5 = 0.8."""
    module = SSLSegModule(
        load_config(
            sets=TINY
            + [
                "train.max_steps=20",
                "ssl.ema_momentum=0.8",
                f"ssl.momentum_schedule={schedule}",
                f"ssl.momentum_window={window}",
            ]
        )
    )
    assert module.method.teacher.momentum(10) == pytest.approx(min(expected, 1 - 1 / 11))
    assert module.method.teacher.momentum(0) == 0.0  # the warm-up starts as a copy of the student


def _dice_ce_by_hand(logits, label, batch):
    """MONAI DiceCELoss(to_onehot_y, softmax, include_background) written out: Dice over (B, C) or C, plus mean CE."""
    probs = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(label[:, 0], logits.shape[1]).movedim(-1, 1).float()
    dims = (0, 2, 3, 4) if batch else (2, 3, 4)
    inter, total = (probs * onehot).sum(dims), probs.sum(dims) + onehot.sum(dims)
    dice = 1.0 - (2.0 * inter + 1e-5) / (total + 1e-5)
    return dice.mean() + torch.nn.functional.cross_entropy(logits, label[:, 0])


@pytest.mark.parametrize("batch_dice", [True, False])
def test_supervised_loss_batch_dice_switch_matches_hand_computation(batch_dice):
    """Patch 2 has no class 2: per-patch Dice counts that as a near-total loss, batch Dice does not."""
    module = SSLSegModule(
        load_config(sets=TINY + [f"train.batch_dice={str(batch_dice).lower()}", "data.num_classes=3"])
    )
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    label = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    label[0, 0, :2] = 1
    label[0, 0, 2:, :2] = 2
    label[1, 0, :, :3] = 1
    expected = _dice_ce_by_hand(logits, label, batch_dice)
    assert module.supervised_loss(logits, label).item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() != pytest.approx(_dice_ce_by_hand(logits, label, not batch_dice).item(), rel=1e-3)


def test_deployed_teacher_has_recalibrated_statistics_and_the_training_teacher_keeps_its_ema():
    _, module, _, _ = _train(["ssl.teacher_bn_recalibration=export", "ssl.recalibration_batches=2"], 3)
    ema_state = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    deployed, stats = module.deployed_network()
    assert stats == "recalibrated" and deployed is not module.teacher
    for name, value in module.teacher.state_dict().items():
        assert torch.equal(value, ema_state[name]), name  # EMAN's pseudo-label teacher is untouched
    deployed_state = deployed.state_dict()
    means = [k for k in ema_state if k.endswith("running_mean")]
    assert means and not all(torch.equal(deployed_state[k], ema_state[k]) for k in means)
    assert all(torch.equal(deployed_state[k], v) for k, v in module.teacher.named_parameters())


@pytest.mark.parametrize("every, refreshed", [(2, True), (3, False), (0, False)])
def test_refresh_puts_re_estimated_statistics_into_the_training_teacher(every, refreshed):
    """ssl.teacher_bn_refresh_every: after update 4 (every 2) the training teacher holds precise-BN statistics of its weights."""
    _, module, _, _ = _train(
        [f"ssl.teacher_bn_refresh_every={every}", "ssl.recalibration_batches=2", "ssl.teacher_bn_recalibration=off"], 4
    )
    again = copy.deepcopy(module.teacher)
    assert recalibrate_batchnorm(again, module.recalibration_inputs()) == 2
    pairs = [
        (k, v, again.state_dict()[k])
        for k, v in module.teacher.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    ]
    assert (
        pairs and all(torch.allclose(a, b, atol=1e-6) for _, a, b in pairs) == refreshed
    )  # re-estimating again changes nothing


@pytest.mark.parametrize(
    "sets, stats",
    [
        (["ssl.teacher_bn_recalibration=off"], "ema"),
        (["ssl.teacher_norm=bn", "ssl.teacher_bn_recalibration=off"], "batch"),
        (["ssl.method=supervised"], "batch"),
    ],
)
def test_deployed_network_names_the_statistics_it_holds(sets, stats):
    _, module, _, _ = _train(sets, 1)
    net, held = module.deployed_network()
    assert held == stats
    assert net is (module.student if module.teacher is None else module.teacher)


def _student_then_precise_bn(module, state, norm="eman"):
    """A teacher made from ``module``'s student holding ``state``, its BatchNorm statistics re-estimated on TinyData's weak views."""
    student = copy.deepcopy(module.student)
    student.load_state_dict(state)
    expected = make_teacher(student, norm=norm)
    batches = TinyData().recalibration_dataloader(module.ssl.recalibration_batches)
    assert recalibrate_batchnorm(expected, (batch["weak"] for batch in batches)) > 0
    return expected


@pytest.mark.parametrize(
    "sets",
    [
        ["ssl.method=bcp", "ssl.bcp_pretrain_steps=2"],  # BCP: after its labeled-only copy-paste pre-training
        ["ssl.method=bcp", "ssl.warmup_steps=2"],  # BCP: the pre-training is the warm-up unless set
        ["ssl.method=mean_teacher", "ssl.warmup_steps=2"],  # a mean teacher: after the supervised warm-up
        [
            "ssl.method=fixmatch",
            "ssl.warmup_fraction=0.5",
        ],  # FixMatch-EMAN: the warm-up as a fraction of the run (2 of 4 steps)
    ],
    ids=["bcp_pretrain", "bcp_warmup", "mean_teacher_warmup", "fixmatch_warmup_fraction"],
)
def test_teacher_restarts_as_the_student_with_estimated_statistics_after_the_warmup(sets):
    """At the end of the warm-up the teacher is the student's weights with BatchNorm statistics estimated once
    from its own forward passes (precise-BN), not the average of a random start; then EMA updates resume."""
    steps = 4 if "ssl.warmup_fraction=0.5" in sets else 2
    _, module, _, states = _train(
        sets + ["ssl.recalibration_batches=3", "ssl.ema_momentum=0.99", "ssl.momentum_schedule=constant"], steps
    )
    expected = _student_then_precise_bn(module, states[1])
    if steps == 2:
        for name, value in module.teacher.state_dict().items():
            torch.testing.assert_close(value, expected.state_dict()[name], msg=name)
    else:  # two more EMA updates with m = 0.99 (after the warm-up of momentum_at: min(1 - 1/(t + 1), m))
        for t in (2, 3):
            update_teacher(expected, _with_state(module.student, states[t]), momentum_at(t, 0.99))
        for name, value in module.teacher.state_dict().items():
            torch.testing.assert_close(value, expected.state_dict()[name], msg=name)


def _with_state(net, state):
    copied = copy.deepcopy(net)
    copied.load_state_dict(state)
    return copied


def test_ua_mt_masks_the_consistency_by_the_teacher_entropy():
    """The logged threshold is UA-MT's (0.75 + 0.25 ramp) ln C, and a fraction of voxels is kept."""

    class Logs(pl.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("ssl/")})

    cfg = load_config(
        sets=TINY
        + ["ssl.method=ua_mt", "ssl.ua_mt_passes=2", "ssl.rampup_steps=4", "ssl.warmup_steps=0", "train.max_steps=2"]
    )
    logs = Logs()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[logs],
        log_every_n_steps=1,
    )
    trainer.fit(SSLSegModule(cfg), datamodule=TinyData())
    for step, row in enumerate(logs.rows):
        assert row["ssl/uncertainty_threshold"] == pytest.approx(
            (0.75 + 0.25 * math.exp(-5 * (1 - step / 4) ** 2)) * math.log(2), rel=1e-5
        )
        assert 0.0 <= row["ssl/certain_fraction"] <= 1.0


def test_training_logs_are_made_only_on_the_steps_the_logger_writes(tmp_path):
    """log_every_n_steps=3 over 7 steps: rows at steps 2 and 5 only, with the per-class pseudo-label statistics in them."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    class Recorded(SSLSegModule):
        steps = []

        def log_dict(self, *args, **kwargs):
            self.steps.append(self.global_step)
            super().log_dict(*args, **kwargs)

    cfg = load_config(
        sets=TINY + ["ssl.pseudo_label_threshold=0.5", "ssl.rampup_steps=0", "ssl.warmup_steps=0", "train.max_steps=7"]
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=7,
        logger=CSVLogger(tmp_path, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=3,
    )
    trainer.fit(Recorded(cfg), datamodule=TinyData())
    assert Recorded.steps == [2, 5]
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 5]
    assert all(r["loss/sup"] and r["ssl/pseudo_label_kept_class0"] for r in rows)


@pytest.mark.parametrize(
    "saved, expected",
    [
        ({"medeman_method_state": {"chosen_statistics": "raw"}}, "raw"),
        ({"medeman_teacher_statistics": "raw"}, "raw"),  # a checkpoint from before medeman_method_state
        ({}, "recalibrated"),  # nothing saved: the default
        ({"medeman_method_state": {"chosen_statistics": "bogus"}}, "recalibrated"),
    ],
)
def test_method_state_travels_in_checkpoints(saved, expected):
    """Which teacher statistics won the last validation is restored on resume, also from older checkpoints."""
    cfg = load_config(sets=TINY + ["ssl.teacher_bn_recalibration=best"])
    module = SSLSegModule(cfg)
    module.method.chosen_statistics = "raw"
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["medeman_method_state"] == {"chosen_statistics": "raw"}
    resumed = SSLSegModule(cfg)
    resumed.on_load_checkpoint(saved)
    assert resumed.method.chosen_statistics == expected


def test_a_method_without_state_saves_an_empty_one():
    module = SSLSegModule(load_config(sets=TINY + ["ssl.method=supervised"]))
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["medeman_method_state"] == {}
    module.on_load_checkpoint({"medeman_method_state": {"chosen_statistics": "raw"}})  # ignored, no error
