"""Tests for medeman.eman: the EMAN teacher, its EMA update and the momentum warm-up."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import VNet, BasicUNet, SegResNet, UNet
from torch import nn

from medeman.eman import (
    EMANBatchNorm1d,
    EMANBatchNorm3d,
    EMANTeacher,
    make_teacher,
    momentum_at,
    recalibrate_batchnorm,
    scheduled_momentum,
    teacher_norm,
    tracked_batchnorms,
    unwrap,
    update_teacher,
)

SIDE = 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_net() -> nn.Module:
    """Conv -> BN3d -> ReLU -> Conv: one of each tensor kind (weight, bias, running stats, counter)."""
    return nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2), nn.ReLU(), nn.Conv3d(2, 1, 1))


def small_unet() -> nn.Module:
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(4, 8, 16),
        strides=(2, 2),
        num_res_units=1,
        norm="batch",
    )


def fill(model: nn.Module, param: float, mean: float, var: float, count: int) -> None:
    """Set every parameter, running_mean, running_var and num_batches_tracked of ``model`` to a constant."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(param)
        for bn in tracked_batchnorms(model):
            bn.running_mean.fill_(mean)
            bn.running_var.fill_(var)
            bn.num_batches_tracked.fill_(count)


def train_student(student: nn.Module, steps: int = 3, batch: int = 4) -> None:
    """A few SGD steps in train mode so weights and BN running statistics move away from their init."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    student.train()
    for _ in range(steps):
        x = torch.randn(batch, 1, SIDE, SIDE, SIDE) * 2.0 + 0.5
        loss = student(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ---------------------------------------------------------------- the update formulas, by hand

# [momentum, student (param, mean, var, count), teacher (param, mean, var, count)]
UPDATE_CASES = [
    [0.9, (1.0, 0.5, 2.0, 7), (3.0, -1.0, 4.0, 3)],
    [0.5, (-2.0, 4.0, 0.25, 11), (2.0, 0.0, 1.0, 0)],
    [0.0, (1.5, 1.0, 3.0, 5), (-1.0, 2.0, 9.0, 1)],  # m = 0 copies the student
    [1.0, (1.5, 1.0, 3.0, 5), (-1.0, 2.0, 9.0, 1)],  # m = 1 freezes the teacher's floats
    [0.99, (0.25, -0.75, 0.5, 100), (0.125, 0.375, 1.5, 2)],
]


@pytest.mark.parametrize("momentum, s, t", UPDATE_CASES)
def test_update_eman_by_hand(momentum, s, t):
    student = tiny_net()
    teacher = make_teacher(student, norm="eman")
    fill(student, *s)
    fill(teacher, *t)
    update_teacher(teacher, student, momentum)
    expected = [momentum * tv + (1.0 - momentum) * sv for tv, sv in zip(t[:3], s[:3])]
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, expected[0]))
    (bn,) = tracked_batchnorms(teacher)
    torch.testing.assert_close(bn.running_mean, torch.full_like(bn.running_mean, expected[1]))
    torch.testing.assert_close(bn.running_var, torch.full_like(bn.running_var, expected[2]))
    assert bn.num_batches_tracked.dtype == torch.long
    assert int(bn.num_batches_tracked) == s[3]  # integer buffers are copied, never averaged


@pytest.mark.parametrize("momentum, s, t", UPDATE_CASES)
def test_update_bn_leaves_buffers_to_teacher(momentum, s, t):
    student = tiny_net()
    teacher = make_teacher(student, norm="bn")
    fill(student, *s)
    fill(teacher, *t)
    update_teacher(teacher, student, momentum)
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, momentum * t[0] + (1.0 - momentum) * s[0]))
    (bn,) = tracked_batchnorms(teacher)
    torch.testing.assert_close(bn.running_mean, torch.full_like(bn.running_mean, t[1]))
    torch.testing.assert_close(bn.running_var, torch.full_like(bn.running_var, t[2]))
    assert int(bn.num_batches_tracked) == t[3]


def test_update_does_not_touch_student():
    student = tiny_net()
    teacher = make_teacher(student)
    fill(student, 1.0, 0.5, 2.0, 7)
    fill(teacher, 3.0, -1.0, 4.0, 3)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    update_teacher(teacher, student, 0.7)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_update_reaches_buffers_replaced_after_the_first_update():
    """``.to(dtype)`` replaces buffer tensors; the next update must average the new ones, not the old."""
    student = tiny_net()
    teacher = make_teacher(student)
    update_teacher(teacher, student, 0.5)  # the module pairs are cached here
    student.double()
    teacher.double()
    fill(student, 1.0, 0.5, 2.0, 7)
    fill(teacher, 3.0, -1.0, 4.0, 3)
    update_teacher(teacher, student, 0.75)
    (bn,) = tracked_batchnorms(teacher)
    assert bn.running_mean.dtype == torch.float64
    torch.testing.assert_close(bn.running_mean, torch.full_like(bn.running_mean, 0.75 * -1.0 + 0.25 * 0.5))
    torch.testing.assert_close(bn.running_var, torch.full_like(bn.running_var, 0.75 * 4.0 + 0.25 * 2.0))
    assert int(bn.num_batches_tracked) == 7
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.75 * 3.0 + 0.25 * 1.0))


def test_update_per_element_on_unet():
    """Element-wise formula on a real UNet with non-constant tensors (after training the student)."""
    student = small_unet()
    teacher = make_teacher(student)
    train_student(student)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_state = student.state_dict()
    m = 0.75
    update_teacher(teacher, student, m)
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, m * t_before[k] + (1 - m) * s_state[k])
        else:
            assert torch.equal(v, s_state[k]), k


def test_teacher_statistics_start_as_student_copy():
    student = small_unet()
    train_student(student)
    teacher = make_teacher(student)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert list(t_state) == list(s_state)
    for k in s_state:
        assert torch.equal(t_state[k], s_state[k]), k
        assert t_state[k].data_ptr() != s_state[k].data_ptr(), f"{k} shares storage with the student"


# ---------------------------------------------------------------- momentum warm-up

MOMENTUM_CASES = [
    # step, base, warmup, expected
    [0, 0.99, True, 0.0],
    [1, 0.99, True, 0.5],
    [3, 0.99, True, 0.75],
    [9, 0.99, True, 0.9],
    [99, 0.99, True, 0.99],
    [10_000, 0.99, True, 0.99],
    [5, 0.5, True, 0.5],
    [0, 0.99, False, 0.99],
    [123, 0.999, False, 0.999],
    [0, 0.0, True, 0.0],
    [7, 1.0, True, 1.0 - 1.0 / 8],
]


@pytest.mark.parametrize("step, base, warmup, expected", MOMENTUM_CASES)
def test_momentum_at(step, base, warmup, expected):
    assert momentum_at(step, base, warmup) == pytest.approx(expected)


def test_warmup_teacher_is_running_average_of_students():
    """With warm-up and a high base, the teacher after steps 0..n-1 is the plain mean of the n students."""
    student = tiny_net()
    teacher = make_teacher(student)
    snapshots = []
    for step in range(5):
        fill(student, float(step * step), float(step), 1.0 + step, step)
        snapshots.append(float(step * step))
        update_teacher(teacher, student, momentum_at(step, 0.999))
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, sum(snapshots) / len(snapshots)))
    (bn,) = tracked_batchnorms(teacher)
    torch.testing.assert_close(bn.running_mean, torch.full_like(bn.running_mean, sum(range(5)) / 5))


# ---------------------------------------------------------------- cross-sample independence


def _batch_dependence(teacher: nn.Module, scans: torch.Tensor) -> float:
    """Max |teacher(scan alone) - teacher(scan in the batch)| over every scan of ``scans``."""
    with torch.no_grad():
        together = teacher(scans)
        alone = torch.cat([teacher(scans[i : i + 1]) for i in range(scans.shape[0])])
    return (together - alone).abs().max().item()


def test_eman_output_independent_of_batch():
    student = small_unet()
    train_student(student)
    teacher = make_teacher(student, norm="eman")
    teacher.train()  # Lightning calls this on the whole LightningModule
    scans = torch.randn(4, 1, SIDE, SIDE, SIDE)
    scans[1:] = scans[1:] * 3.0 + 1.0  # the other scans have very different intensity statistics
    assert _batch_dependence(teacher, scans) < 1e-5


def test_bn_output_depends_on_batch():
    student = small_unet()
    train_student(student)
    teacher = make_teacher(student, norm="bn")
    teacher.train()
    scans = torch.randn(4, 1, SIDE, SIDE, SIDE)
    scans[1:] = scans[1:] * 3.0 + 1.0
    assert _batch_dependence(teacher, scans) > 1e-2


def test_eman_forward_does_not_change_statistics():
    student = small_unet()
    train_student(student)
    teacher = make_teacher(student)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        teacher(torch.randn(2, 1, SIDE, SIDE, SIDE) * 5.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


class _Pair(nn.Module):
    """A parent holding student and teacher, as a LightningModule does."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student, self.teacher = student, teacher


def test_teacher_stays_eman_after_parent_train():
    student = small_unet()
    pair = _Pair(student, make_teacher(student))
    pair.eval()
    pair.train()
    assert pair.teacher.training and pair.student.training  # the rest of the teacher follows its parent
    bns = tracked_batchnorms(pair.teacher)
    assert bns and all(isinstance(bn, EMANBatchNorm3d) for bn in bns)
    assert not any(bn.training for bn in bns)
    assert all(bn.training for bn in tracked_batchnorms(pair.student))
    scans = torch.randn(3, 1, SIDE, SIDE, SIDE) * torch.tensor([1.0, 3.0, 0.2]).view(3, 1, 1, 1, 1)
    assert _batch_dependence(pair.teacher, scans) < 1e-5


def test_teacher_stays_eman_after_direct_training_assignment():
    """Lightning restores modes by assigning ``module.training``; EMAN layers must ignore it."""
    student = small_unet()
    teacher = make_teacher(student)
    for module in teacher.modules():
        module.training = True
    assert not any(bn.training for bn in tracked_batchnorms(teacher))
    scans = torch.randn(3, 1, SIDE, SIDE, SIDE) * torch.tensor([1.0, 3.0, 0.2]).view(3, 1, 1, 1, 1)
    assert _batch_dependence(teacher, scans) < 1e-5


@pytest.mark.parametrize(
    "bn_cls, eman_cls, shape",
    [[nn.BatchNorm1d, EMANBatchNorm1d, (4, 3, 5)], [nn.BatchNorm3d, EMANBatchNorm3d, (4, 3, 2, 2, 2)]],
)
def test_eman_converts_each_batchnorm_kind(bn_cls, eman_cls, shape):
    student = nn.Sequential(bn_cls(3))
    teacher = make_teacher(student)
    assert isinstance(teacher[0], eman_cls) and isinstance(teacher[0], bn_cls)
    assert type(student[0]) is bn_cls  # the student is untouched
    teacher.train()
    x = torch.randn(*shape) * 4.0 + 2.0
    torch.testing.assert_close(teacher(x), x / math.sqrt(1.0 + teacher[0].eps))  # running stats 0 and 1


def test_eman_converts_syncbatchnorm():
    student = nn.Sequential(nn.SyncBatchNorm(3))
    teacher = make_teacher(student)
    teacher.train()
    assert isinstance(teacher[0], nn.SyncBatchNorm) and not teacher[0].training
    x = torch.randn(2, 3, 4, 4, 4) * 4.0
    torch.testing.assert_close(teacher(x), x / math.sqrt(1.0 + teacher[0].eps))  # runs without a process group


def test_bn_teacher_keeps_plain_batchnorm():
    student = small_unet()
    teacher = make_teacher(student, norm="bn")
    assert teacher_norm(teacher) == "bn"
    assert all(type(bn) is nn.BatchNorm3d for bn in tracked_batchnorms(teacher))
    teacher.train()
    assert all(bn.training for bn in tracked_batchnorms(teacher))


def test_teacher_pickles():
    import pickle

    student = small_unet()
    teacher = make_teacher(student)
    update_teacher(teacher, student, 0.5)
    loaded = pickle.loads(pickle.dumps(teacher))  # e.g. for ddp_spawn; teacher.pt itself holds only a state_dict
    assert teacher_norm(loaded) == "eman"
    assert all(isinstance(bn, EMANBatchNorm3d) for bn in tracked_batchnorms(loaded))


# ---------------------------------------------------------------- no gradients


def test_teacher_gets_no_gradients():
    student = small_unet()
    x = torch.randn(2, 1, SIDE, SIDE, SIDE)
    student(x).sum().backward()  # the student has gradients when the teacher is made
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    student_ptrs = {p.data_ptr() for group in optimizer.param_groups for p in group["params"]}
    assert not student_ptrs & {p.data_ptr() for p in teacher.parameters()}

    teacher.train()
    t_out = teacher(x)
    assert not t_out.requires_grad
    loss = (student(x).softmax(1) - t_out.softmax(1)).pow(2).mean()  # a consistency loss
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ---------------------------------------------------------------- MONAI networks


def _without_dropout(net: nn.Module) -> nn.Module:
    for module in net.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return net


MONAI_CASES = [
    ["UNet", lambda: UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2, norm="batch")],
    [
        "BasicUNet",
        lambda: BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4), norm="batch"),
    ],
    # BatchNorm-only; dropout off, as the teacher's dropout follows train mode and would randomize outputs
    ["VNet", lambda: _without_dropout(VNet(spatial_dims=3, in_channels=1, out_channels=2))],
    ["SegResNet", lambda: SegResNet(spatial_dims=3, init_filters=4, in_channels=1, out_channels=2, norm="batch")],
]


@pytest.mark.parametrize("name, build", MONAI_CASES, ids=[c[0] for c in MONAI_CASES])
def test_monai_networks(name, build):
    student = build()
    teacher = make_teacher(student)
    n_bn = len(tracked_batchnorms(student))
    assert n_bn > 0
    assert len(tracked_batchnorms(teacher)) == n_bn
    assert all(isinstance(bn, EMANBatchNorm3d) for bn in tracked_batchnorms(teacher))
    train_student(student, steps=1, batch=2)
    update_teacher(teacher, student, 0.5)
    s_bn, t_bn = tracked_batchnorms(student)[0], tracked_batchnorms(teacher)[0]
    assert int(t_bn.num_batches_tracked) == int(s_bn.num_batches_tracked) == 1
    teacher.train()
    scans = torch.randn(3, 1, SIDE, SIDE, SIDE) * torch.tensor([1.0, 3.0, 0.2]).view(3, 1, 1, 1, 1)
    assert _batch_dependence(teacher, scans) < 1e-4, name


# ---------------------------------------------------------------- wrapped students


def _ddp_wrapper(module: nn.Module) -> nn.parallel.DistributedDataParallel:
    """A ``DistributedDataParallel`` around ``module`` without a process group.

    What medeman reads of DDP is the class and ``.module``. A real process group inside the pytest process once hung
    a CI machine for its whole run (gloo through a tcp:// store on 127.0.0.1); real two-rank DDP runs in its own
    processes, with a timeout, in tests/test_ddp.py.
    """
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = module
    return ddp


def test_ddp_wrapped_student():
    plain = tiny_net()
    ddp = _ddp_wrapper(plain)
    assert next(iter(ddp.state_dict())).startswith("module.")
    assert unwrap(ddp) is plain
    teacher = make_teacher(ddp)
    assert list(teacher.state_dict()) == list(plain.state_dict())  # no "module." prefix
    fill(plain, 1.0, 0.5, 2.0, 7)
    fill(teacher, 3.0, -1.0, 4.0, 3)
    update_teacher(teacher, ddp, 0.9)
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.9 * 3.0 + 0.1 * 1.0))
    (bn,) = tracked_batchnorms(teacher)
    torch.testing.assert_close(bn.running_var, torch.full_like(bn.running_var, 0.9 * 4.0 + 0.1 * 2.0))
    assert int(bn.num_batches_tracked) == 7


def test_dataparallel_wrapped_student():
    plain = tiny_net()
    wrapped = nn.DataParallel(plain)
    assert unwrap(wrapped) is plain
    teacher = make_teacher(wrapped)
    fill(plain, 2.0, 0.0, 1.0, 4)
    fill(teacher, 0.0, 1.0, 3.0, 1)
    update_teacher(teacher, wrapped, 0.5)
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.0))
    assert int(tracked_batchnorms(teacher)[0].num_batches_tracked) == 4


def test_compiled_student_and_teacher():
    """``torch.compile`` wraps lazily: unwrapping and updating never needs to run the compiled model."""
    plain = tiny_net()
    compiled = torch.compile(plain)
    assert "_orig_mod." in next(iter(compiled.state_dict()))
    assert unwrap(compiled) is plain
    assert unwrap(nn.DataParallel(compiled)) is plain
    teacher = make_teacher(compiled)
    assert list(teacher.state_dict()) == list(plain.state_dict())
    fill(plain, 1.0, 0.5, 2.0, 7)
    fill(teacher, 3.0, -1.0, 4.0, 3)
    compiled_teacher = torch.compile(teacher)
    update_teacher(compiled_teacher, compiled, 0.5)
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 2.0))
    torch.testing.assert_close(tracked_batchnorms(teacher)[0].running_mean, torch.full((2,), 0.5 * -1.0 + 0.5 * 0.5))


# ---------------------------------------------------------------- errors

ERROR_CASES = [
    # id, callable, message fragment
    ["unet-instancenorm", lambda: make_teacher(UNet(3, 1, 2, (4, 8), (2,)), norm="eman"), "norm='batch'"],
    ["segresnet-groupnorm", lambda: make_teacher(SegResNet(3, init_filters=8), norm="eman"), "norm='batch'"],
    [
        "no-running-stats",
        lambda: make_teacher(nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2, track_running_stats=False))),
        "running statistics",
    ],
    ["unknown-norm", lambda: make_teacher(tiny_net(), norm="group"), "'eman'"],
    ["unknown-norm-none", lambda: make_teacher(tiny_net(), norm=None), "'bn'"],
    ["momentum-negative", lambda: update_teacher(make_teacher(tiny_net()), tiny_net(), -0.1), "[0, 1]"],
    ["momentum-above-one", lambda: update_teacher(make_teacher(tiny_net()), tiny_net(), 1.01), "[0, 1]"],
    ["momentum-nan", lambda: update_teacher(make_teacher(tiny_net()), tiny_net(), float("nan")), "[0, 1]"],
    ["momentum_at-base", lambda: momentum_at(3, 1.5), "[0, 1]"],
    ["momentum_at-step", lambda: momentum_at(-1, 0.99), ">= 0"],
    ["schedule-unknown", lambda: scheduled_momentum(0, 10, schedule="linear"), "cosine"],
    ["schedule-window", lambda: scheduled_momentum(0, 10, schedule="window", window=0.0), "positive"],
    ["schedule-steps", lambda: scheduled_momentum(0, 0), "max_steps >= 1"],
    [
        "arch-widths",
        lambda: update_teacher(
            make_teacher(small_unet()), UNet(3, 1, 2, (4, 8, 32), (2, 2), num_res_units=1, norm="batch"), 0.9
        ),
        "different architectures",
    ],
    [
        "arch-depth",
        lambda: update_teacher(
            make_teacher(small_unet()), UNet(3, 1, 2, (4, 8), (2,), num_res_units=1, norm="batch"), 0.9
        ),
        "different architectures",
    ],
    [
        "arch-family",
        lambda: update_teacher(make_teacher(tiny_net()), nn.Sequential(nn.Linear(2, 2)), 0.9),
        "make_teacher(student)",
    ],
    ["not-a-teacher", lambda: update_teacher(tiny_net(), tiny_net(), 0.9), "make_teacher"],
]


@pytest.mark.parametrize("name, call, fragment", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, call, fragment):
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value), f"{name}: {info.value}"


def test_bn_teacher_allowed_without_batchnorm():
    """The baseline has no BatchNorm requirement: norm='bn' works on any network."""
    teacher = make_teacher(UNet(3, 1, 2, (4, 8), (2,)), norm="bn")
    assert teacher_norm(teacher) == "bn"


def test_architecture_checked_again_for_new_student():
    """A teacher checked against one student is checked again when handed another."""
    student = small_unet()
    teacher = make_teacher(student)
    update_teacher(teacher, student, 0.9)
    del student
    for _ in range(3):  # freed ids get reused; the check must not be skipped for them
        with pytest.raises(ValueError, match="different architectures"):
            update_teacher(teacher, UNet(3, 1, 2, (4, 8, 32), (2, 2), num_res_units=1, norm="batch"), 0.9)


# ---------------------------------------------------------------- momentum schedules

# [schedule, base, window, T, {step: expected}]
SCHEDULE_CASES = [
    ["constant", 0.99, 0.1, 500, {0: 0.99, 250: 0.99, 500: 0.99}],
    ["cosine", 0.99, 0.1, 500, {0: 0.99, 250: 0.995, 500: 1.0, 900: 1.0}],
    ["cosine", 0.9, 0.1, 2000, {0: 0.9, 1000: 0.95, 2000: 1.0}],
    ["window", 0.5, 0.1, 500, {0: 1 - 1 / 50, 250: 1 - 1 / 50, 500: 1 - 1 / 50}],
    ["window", 0.5, 0.1, 2000, {0: 1 - 1 / 200, 1000: 1 - 1 / 200, 2000: 1 - 1 / 200}],
    ["window", 0.5, 0.01, 50, {0: 0.0, 25: 0.0, 50: 0.0}],  # a window under one step copies the student
]


@pytest.mark.parametrize("schedule, base, window, total, expected", SCHEDULE_CASES)
def test_scheduled_momentum_at_start_middle_and_end(schedule, base, window, total, expected):
    for step, value in expected.items():
        assert scheduled_momentum(step, total, base, schedule, window) == pytest.approx(value, abs=1e-12), step


def test_warmup_stays_exact_under_a_schedule():
    """The warm-up 1 - 1/(k+1) still wins early: the teacher is the plain average of the first students."""
    for step in range(10):
        assert momentum_at(step, scheduled_momentum(step, 500, 0.99, "cosine")) == 1.0 - 1.0 / (step + 1)


# ---------------------------------------------------------------- precise-BN re-estimation


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(torch.split(x, size))


def _hand_stats(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance per channel of the BN input (conv1(x)) over every voxel of every scan."""
    with torch.no_grad():
        h = net[0](x).transpose(0, 1).reshape(2, -1).double()
    return h.mean(1), h.var(1, unbiased=True)


@pytest.mark.parametrize("norm", ["eman", "bn"])
def test_recalibration_equals_hand_statistics_and_leaves_weights_untouched(norm):
    student = tiny_net()
    train_student(student)
    teacher = make_teacher(student, norm=norm)
    weights = {k: v.clone() for k, v in teacher.named_parameters()}
    count = tracked_batchnorms(teacher)[0].num_batches_tracked.clone()
    x = torch.randn(8, 1, 4, 4, 4) * 3.0 + 1.0
    assert recalibrate_batchnorm(teacher, _batches(x, 2)) == 4
    mean, var = _hand_stats(teacher, x)
    bn = tracked_batchnorms(teacher)[0]
    torch.testing.assert_close(bn.running_mean, mean.float())
    torch.testing.assert_close(bn.running_var, var.float())
    for name, value in teacher.named_parameters():
        assert torch.equal(value, weights[name]), name
    assert torch.equal(bn.num_batches_tracked, count)
    if norm == "eman":  # still an EMAN layer in eval mode afterwards
        assert isinstance(bn, EMANBatchNorm3d) and not bn.training


@pytest.mark.parametrize("sizes", [(8,), (4,), (2,), (1,), (3,)])
def test_recalibration_is_independent_of_batch_composition(sizes):
    """The same eight scans, grouped into batches differently (shuffled too), give the same statistics."""
    student = tiny_net()
    train_student(student)
    x = torch.randn(8, 1, 4, 4, 4) * 2.0 - 0.5
    reference = make_teacher(student)
    recalibrate_batchnorm(reference, [x])
    teacher = make_teacher(student)
    recalibrate_batchnorm(teacher, _batches(x[torch.randperm(8)], sizes[0]))
    for a, b in zip(tracked_batchnorms(teacher), tracked_batchnorms(reference)):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)


def test_recalibration_without_batches_or_batchnorm_changes_nothing():
    teacher = make_teacher(tiny_net())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert recalibrate_batchnorm(teacher, []) == 0
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    instance = make_teacher(UNet(3, 1, 2, (4, 8), (2,)), norm="ema")
    assert recalibrate_batchnorm(instance, [torch.randn(2, 1, 8, 8, 8)]) == 0


def test_recalibrated_unet_still_normalizes_each_scan_alone():
    """After re-estimation the EMAN teacher again normalizes with running statistics (batch-independent)."""
    student = small_unet()
    train_student(student)
    teacher = make_teacher(student)
    recalibrate_batchnorm(teacher, [torch.randn(2, 1, SIDE, SIDE, SIDE) for _ in range(3)])
    teacher.train()
    x = torch.randn(4, 1, SIDE, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x)[:1], teacher(x[:1]))


# ---------------------------------------------------------------- deterministic teacher, plain EMA


def dropout_unet(norm: str = "batch") -> nn.Module:
    return UNet(3, 1, 2, (4, 8), (2,), num_res_units=1, norm=norm, dropout=0.5)


@pytest.mark.parametrize(
    "norm, net_norm, deterministic",
    [("eman", "batch", True), ("ema", "instance", True), ("ema", "batch", True), ("bn", "batch", False)],
)
def test_teacher_output_after_train_is_deterministic_except_bn(norm, net_norm, deterministic):
    teacher = make_teacher(dropout_unet(net_norm), norm=norm)
    teacher.train()
    x = torch.randn(2, 1, SIDE, SIDE, SIDE)
    with torch.no_grad():
        first, second = teacher(x), teacher(x)
    assert torch.equal(first, second) == deterministic


def test_ema_teacher_on_instancenorm_averages_weights_only():
    student = UNet(3, 1, 2, (4, 8), (2,), num_res_units=1)  # MONAI's default InstanceNorm, no running statistics
    teacher = make_teacher(student, norm="ema")
    assert teacher_norm(teacher) == "ema"
    fill(student, 1.0, 0.0, 1.0, 0)
    fill(teacher, 3.0, 0.0, 1.0, 0)
    update_teacher(teacher, student, 0.75)
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 2.5))


# ---- EMANTeacher: the teacher as one object (network, clock, schedule) ------------------------------
def _fill(net: nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(value)


@pytest.mark.parametrize("norm, stats_follow", [("eman", True), ("bn", False)])
def test_teacher_object_updates_with_its_own_clock_by_hand(norm, stats_follow):
    """Constant momentum 0.5 with warm-up: updates 0, 1, 2 use m = 0, 0.5, 0.5; from 0, students 1, 2, 4 give 1, 1.5, 2.75."""
    student = tiny_net()
    teacher = EMANTeacher(student, norm=norm, max_steps=10, momentum=0.5, schedule="constant", pool=None)
    _fill(teacher.network, 0.0)
    for value, expected in [(1.0, 1.0), (2.0, 1.5), (4.0, 2.75)]:
        _fill(student, value)
        teacher.update(student)
        assert float(teacher.network[0].weight.flatten()[0]) == pytest.approx(expected)
        assert float(teacher.network[1].running_mean[0]) == pytest.approx(expected if stats_follow else 0.0)
    assert teacher.updates == 3
    assert teacher.momentum() == 0.5 and teacher.momentum(0) == 0.0


def test_teacher_object_momentum_is_the_schedule_after_warmup():
    teacher = EMANTeacher(tiny_net(), max_steps=20, momentum=0.8, schedule="cosine")
    assert teacher.momentum(10) == pytest.approx(min(momentum_at(10, scheduled_momentum(10, 20, 0.8, "cosine")), 0.9))
    assert EMANTeacher(tiny_net(), max_steps=20, momentum=0.8, warmup=False).momentum(0) == 0.8


def test_teacher_object_set_copies_the_student_then_estimates_statistics_and_pools_them():
    student = tiny_net()
    pooled = []
    teacher = EMANTeacher(student, pool=pooled.append)
    _fill(student, 3.0)
    assert teacher.set(student) == 0  # no batches: the student's statistics
    assert float(teacher.network[1].running_mean[0]) == 3.0 and float(teacher.network[0].weight.flatten()[0]) == 3.0
    batches = [torch.randn(2, 1, 4, 4, 4) for _ in range(3)]
    assert teacher.set(student, batches) == 3
    reference = make_teacher(student)
    recalibrate_batchnorm(reference, batches)
    torch.testing.assert_close(teacher.network[1].running_var, reference[1].running_var)
    assert pooled == [teacher.network]  # pooled once, after the estimate, never after a plain copy
    assert teacher.updates == 0  # setting is not an update: the schedule's clock stays


def test_teacher_object_recalibrated_copy_leaves_the_teacher_alone():
    student = tiny_net()
    teacher = EMANTeacher(student, pool=None)
    before = teacher.network[1].running_var.clone()
    copy_ = teacher.recalibrated_copy([torch.randn(2, 1, 4, 4, 4) * 5])
    assert copy_ is not None and copy_ is not teacher.network
    torch.testing.assert_close(teacher.network[1].running_var, before)
    assert not torch.allclose(copy_[1].running_var, before)
    assert teacher.recalibrated_copy([]) is None
