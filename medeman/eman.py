"""The mean teacher with EMAN: a frozen EMA copy of the student whose BatchNorm uses EMA'd statistics.

Exponential Moving Average Normalization (EMAN; Cai, Ravichandran, Maji, Fowlkes, Tu, Soatto,
"Exponential Moving Average Normalization for Self-supervised and Semi-supervised Learning",
CVPR 2021) replaces the teacher's batch-statistics BatchNorm of a classic mean teacher
(Tarvainen & Valpola, NeurIPS 2017) by BatchNorm that always normalizes with running statistics,
and those statistics are an EMA of the student's with the same momentum as the weights::

    theta'  <- m theta'  + (1 - m) theta      (every parameter)
    mu'     <- m mu'     + (1 - m) mu         (every BN running_mean)
    sigma'2 <- m sigma'2 + (1 - m) sigma2     (every BN running_var)

So a scan's teacher output no longer depends on the other scans in its batch, and the statistics
match the averaged weights.

Typical use::

    teacher = make_teacher(student, norm="eman")
    ...
    optimizer.step()
    update_teacher(teacher, student, momentum_at(step, 0.99))
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

NORMS = ("eman", "bn")
_NORM_ATTR = "medeman_teacher_norm"
# teacher -> weakref to the student it was last checked against; kept outside the teacher so the
# teacher still pickles, and weak so a freed student's id can never pass for a checked one.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _AlwaysEvalNorm:
    """Mixin for the teacher's BatchNorm layers: they never switch to batch statistics.

    ``training`` is pinned to False rather than only overriding ``.train()``, because Lightning
    restores module modes by assigning ``module.training`` directly.
    """

    @property
    def training(self) -> bool:
        return False

    @training.setter
    def training(self, mode: bool) -> None:
        pass


class EMANBatchNorm1d(_AlwaysEvalNorm, nn.BatchNorm1d):
    """BatchNorm1d that always normalizes with its (EMA'd) running statistics."""


class EMANBatchNorm2d(_AlwaysEvalNorm, nn.BatchNorm2d):
    """BatchNorm2d that always normalizes with its (EMA'd) running statistics."""


class EMANBatchNorm3d(_AlwaysEvalNorm, nn.BatchNorm3d):
    """BatchNorm3d that always normalizes with its (EMA'd) running statistics."""


class EMANSyncBatchNorm(_AlwaysEvalNorm, nn.SyncBatchNorm):
    """SyncBatchNorm that always normalizes with its (EMA'd) running statistics (no cross-rank sync)."""


_EMAN_CLASSES: dict[type, type] = {
    nn.BatchNorm1d: EMANBatchNorm1d,
    nn.BatchNorm2d: EMANBatchNorm2d,
    nn.BatchNorm3d: EMANBatchNorm3d,
    nn.SyncBatchNorm: EMANSyncBatchNorm,
}


def _eman_class(cls: type) -> type:
    if issubclass(cls, _AlwaysEvalNorm):
        return cls
    if cls not in _EMAN_CLASSES:  # other _BatchNorm subclasses (lazy, user-defined)
        _EMAN_CLASSES[cls] = type(f"EMAN{cls.__name__}", (_AlwaysEvalNorm, cls), {})
    return _EMAN_CLASSES[cls]


def unwrap(model: nn.Module) -> nn.Module:
    """Return the plain module inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def tracked_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers (1d/2d/3d/Sync) of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def make_teacher(student: nn.Module, norm: str = "eman") -> nn.Module:
    """Build the mean teacher: a frozen deep copy of ``student``.

    The teacher has no gradients and must never be handed to an optimizer; it changes only through
    :func:`update_teacher`.

    Args:
        student: the network being trained (may be wrapped in DDP or compiled).
        norm: ``"eman"`` - every BatchNorm layer always normalizes with its running statistics,
            even after ``.train()`` on the teacher or any parent module, and those statistics are
            EMA'd from the student's (Cai et al., CVPR 2021). They start as a copy of the student's
            statistics, just as the weights start as a copy of the student's weights, so weights
            and statistics stay a matched pair from step 0. ``"bn"`` - the classic mean-teacher
            baseline (as in SSL4MIS): the teacher's BatchNorm follows the module's train/eval mode
            and, in training, uses the statistics of its own current batch.

    Returns:
        The teacher module.

    Raises:
        ValueError: unknown ``norm``, or ``norm="eman"`` on a network without BatchNorm that
            tracks running statistics.

    Examples:
        >>> from monai.networks.nets import UNet
        >>> student = UNet(3, 1, 2, (8, 16), (2,), norm="batch")
        >>> teacher = make_teacher(student, norm="eman")
        >>> teacher.train()  # Lightning does this; EMAN layers stay on running statistics
        >>> any(bn.training for bn in tracked_batchnorms(teacher))
        False
    """
    if norm not in NORMS:
        raise ValueError(f"unknown teacher norm {norm!r}: use 'eman' (EMA'd BatchNorm statistics) or 'bn' (batch statistics)")
    student = unwrap(student)
    if norm == "eman" and not tracked_batchnorms(student):
        raise ValueError(
            f"norm='eman' needs BatchNorm layers that track running statistics, and {type(student).__name__} has none. "
            "MONAI's UNet defaults to InstanceNorm and SegResNet to GroupNorm: build the network with norm='batch' "
            "(e.g. UNet(..., norm='batch')), or use norm='bn'."
        )
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    for param in teacher.parameters():
        param.grad = None  # deepcopy also copies the student's accumulated gradients
    if norm == "eman":
        for module in tracked_batchnorms(teacher):
            module.__class__ = _eman_class(type(module))
    setattr(teacher, _NORM_ATTR, norm)
    return teacher


def teacher_norm(teacher: nn.Module) -> str:
    """The ``norm`` a teacher was made with."""
    norm = getattr(teacher, _NORM_ATTR, None)
    if norm is None:
        raise ValueError("not a teacher made by medeman.eman.make_teacher")
    return norm


def _check_same_architecture(teacher: nn.Module, student: nn.Module) -> None:
    t_state, s_state = teacher.state_dict(), student.state_dict()
    if list(t_state) != list(s_state):
        missing = sorted(set(t_state) ^ set(s_state))[:5]
        raise ValueError(
            f"teacher and student have different architectures (tensors differ, e.g. {missing}); "
            "build the teacher with make_teacher(student)"
        )
    for name, tensor in t_state.items():
        if tensor.shape != s_state[name].shape:
            raise ValueError(
                f"teacher and student have different architectures: {name} is {tuple(tensor.shape)} in the teacher "
                f"and {tuple(s_state[name].shape)} in the student; build the teacher with make_teacher(student)"
            )


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMA-update the teacher from the student in place: ``t <- m t + (1 - m) s``.

    Parameters are always averaged. In ``eman`` mode every floating buffer (BatchNorm
    ``running_mean`` and ``running_var``) is averaged with the same momentum and integer buffers
    (``num_batches_tracked``) are copied; in ``bn`` mode the teacher's buffers are its own.
    All floating tensors go through one fused ``torch._foreach_lerp_``.

    Args:
        teacher: made by :func:`make_teacher` from ``student`` (may be compiled).
        student: the trained network, plain, DDP-wrapped or compiled.
        momentum: m in [0, 1]; 1 freezes the teacher, 0 copies the student.

    Raises:
        ValueError: momentum outside [0, 1], or a teacher of another architecture.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    teacher, student = unwrap(teacher), unwrap(student)
    checked = _CHECKED.get(teacher)
    if checked is None or checked() is not student:
        _check_same_architecture(teacher, student)
        _CHECKED[teacher] = weakref.ref(student)
    t_float = list(teacher.parameters())
    s_float = list(student.parameters())
    if teacher_norm(teacher) == "eman":
        t_int, s_int = [], []
        for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
            if t_buf.is_floating_point():
                t_float.append(t_buf)
                s_float.append(s_buf)
            else:
                t_int.append(t_buf)
                s_int.append(s_buf)
        if t_int:
            torch._foreach_copy_(t_int, s_int)
    if t_float:
        torch._foreach_lerp_(t_float, s_float, 1.0 - float(momentum))


def momentum_at(step: int, base: float, warmup: bool = True) -> float:
    """EMA momentum at optimizer step ``step`` (0-based): ``min(1 - 1/(step + 1), base)`` with warm-up.

    The warm-up (Tarvainen & Valpola 2017) lets the teacher follow the young student closely: the
    teacher after step t is then the plain average of the students so far until ``base`` takes over.

    Args:
        step: optimizer steps taken before this update.
        base: the target momentum in [0, 1].
        warmup: without it the momentum is ``base`` from the first step.
    """
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {base}")
    if step < 0:
        raise ValueError(f"step counts optimizer steps taken and must be >= 0, got {step}")
    if not warmup:
        return float(base)
    return float(min(1.0 - 1.0 / (step + 1), base))
