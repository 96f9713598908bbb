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

Two additions make the teacher right at any training length:

* :func:`scheduled_momentum` sets m from the run length (a window of a fixed fraction of the run,
  or BYOL's cosine increase to 1), so a short run does not average over most of its own history;
* :func:`recalibrate_batchnorm` re-estimates a (copy of the) teacher's BatchNorm statistics from
  its own forward passes before it is validated or deployed (precise-BN), because EMA'd
  statistics lag and over-estimate the variance while the student still moves within the
  averaging window.

Typical use, through the teacher object (:class:`EMANTeacher`, after timm's ``ModelEmaV3``)::

    teacher = EMANTeacher(student, norm="eman", max_steps=max_steps, schedule="window", window=0.1)
    ...
    optimizer.step()
    teacher.update(student)                           # its own clock picks the momentum
    ...
    deployed = teacher.recalibrated_copy(weak_view_batches)

or with the free functions it is built on::

    teacher = make_teacher(student, norm="eman")
    m = momentum_at(step, scheduled_momentum(step, max_steps, schedule="window", window=0.1))
    update_teacher(teacher, student, m)
    deployed = recalibrate_batchnorm(copy.deepcopy(teacher), weak_view_batches)
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medeman.distributed_bn import average_bn_statistics

if TYPE_CHECKING:
    from medeman.typed_config import Config

# the choices of ssl.teacher_norm and ssl.momentum_schedule (medeman.config takes them from here)
NORMS = ("eman", "bn", "ema")
SCHEDULES = ("constant", "cosine", "window")
_NORM_ATTR = "medeman_teacher_norm"
# teacher -> (weakref to the student it was last checked against, [(teacher submodule, student submodule)]);
# kept outside the teacher so the teacher still pickles, and weak so a freed student's id can never pass for a checked one.
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


def _eval_mode(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of ``eman``/``ema`` teachers: the whole teacher runs as in ``eval()``.

    A module-level function (not a lambda) so that the teacher still pickles and deep-copies.
    Dropout, and any other layer that behaves differently in training, is thereby off, whatever
    ``.train()`` calls or Lightning's mode restoring did since (the official EMAN code keeps the
    teacher in ``eval()``).
    """
    if any(m.training for m in module.modules()):
        module.train(False)


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
            and, in training, uses the statistics of its own current batch. ``"ema"`` - a plain
            weight-EMA teacher for networks without BatchNorm (InstanceNorm, GroupNorm): parameters
            are averaged, buffers are the teacher's own. ``eman`` and ``ema`` teachers always run as
            in ``eval()`` (dropout off), so their outputs are deterministic.

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
        raise ValueError(
            f"unknown teacher norm {norm!r}: use 'eman' (EMA'd BatchNorm statistics), 'bn' (batch statistics) "
            "or 'ema' (weight EMA only, for networks without BatchNorm)"
        )
    student = unwrap(student)
    if norm == "eman" and not tracked_batchnorms(student):
        raise ValueError(
            f"norm='eman' needs BatchNorm layers that track running statistics, and {type(student).__name__} has none. "
            "MONAI's UNet defaults to InstanceNorm and SegResNet to GroupNorm: build the network with norm='batch' "
            "(e.g. UNet(..., norm='batch')), or use norm='ema' (weight EMA only) or norm='bn'."
        )
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    for param in teacher.parameters():
        param.grad = None  # deepcopy also copies the student's accumulated gradients
    if norm == "eman":
        for module in tracked_batchnorms(teacher):
            module.__class__ = _eman_class(type(module))
    if norm in ("eman", "ema"):
        teacher.register_forward_pre_hook(_eval_mode)
        teacher.train(False)
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
    (``num_batches_tracked``) are copied; in ``bn`` and ``ema`` mode the teacher's buffers are its own.
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
    pairs = _CHECKED.get(teacher)
    if pairs is None or pairs[0]() is not student:
        _check_same_architecture(teacher, student)
        # submodules only: a value that held the teacher itself would keep its weak key alive forever
        pairs = (weakref.ref(student), list(zip(teacher.modules(), student.modules()))[1:])
        _CHECKED[teacher] = pairs
    # each step from the modules' own tensor dicts: .to() and friends may have replaced buffers since
    # (walking named_modules() for parameters() and buffers() cost 0.27 ms a step, twice the update)
    t_float: list[torch.Tensor] = []
    s_float: list[torch.Tensor] = []
    t_int: list[torch.Tensor] = []
    s_int: list[torch.Tensor] = []
    eman = teacher_norm(teacher) == "eman"
    for t_mod, s_mod in [(teacher, student), *pairs[1]]:
        for name, t_param in t_mod._parameters.items():
            if t_param is not None:
                t_float.append(t_param)
                s_float.append(s_mod._parameters[name])
        if eman:
            for name, t_buf in t_mod._buffers.items():
                if t_buf is None:
                    continue
                floating = t_buf.is_floating_point()
                (t_float if floating else t_int).append(t_buf)
                (s_float if floating else s_int).append(s_mod._buffers[name])
    if t_int:
        torch._foreach_copy_(t_int, s_int)
    if t_float:
        torch._foreach_lerp_(t_float, s_float, 1.0 - float(momentum))


@torch.no_grad()
def set_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """Make the teacher a copy of the student in place: every parameter and buffer, whatever ``teacher_norm``.

    Where self-training starts (after a supervised warm-up, or BCP's pre-training), so the teacher
    does not carry the average of a random start. Like timm's ``ModelEmaV3.set``.

    Raises:
        ValueError: a teacher of another architecture.
    """
    teacher, student = unwrap(teacher), unwrap(student)
    _check_same_architecture(teacher, student)
    t_state, s_state = teacher.state_dict(keep_vars=True), student.state_dict(keep_vars=True)
    torch._foreach_copy_([t.data for t in t_state.values()], [s_state[name].data for name in t_state])


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


def scheduled_momentum(
    step: int, max_steps: int, base: float = 0.99, schedule: str = "constant", window: float = 0.1
) -> float:
    """EMA momentum before warm-up at optimizer step ``step`` of a ``max_steps`` run (pure).

    * ``constant``: ``base``.
    * ``cosine`` (BYOL; Grill et al., NeurIPS 2020): ``1 - (1 - base) (cos(pi k / K) + 1) / 2``,
      rising from ``base`` at step 0 to 1 at ``max_steps``; the teacher freezes as the student
      converges.
    * ``window``: ``1 - 1 / (window * max_steps)``, constant over the run: the teacher averages
      over about the last ``window`` fraction of the run's steps, whatever its length (0 when the
      window is shorter than one step: the teacher is then the student).

    Combine with the warm-up as ``momentum_at(step, scheduled_momentum(...))``.

    Args:
        step: optimizer steps taken before this update (clipped to ``max_steps``).
        max_steps: optimizer steps of the whole run (``train.max_steps``).
        base: the momentum of ``constant`` and the start of ``cosine``, in [0, 1].
        schedule: one of :data:`SCHEDULES`.
        window: the ``window`` schedule's fraction of ``max_steps``, > 0.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown momentum schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {base}")
    if step < 0 or max_steps < 1:
        raise ValueError(f"need step >= 0 and max_steps >= 1, got step={step}, max_steps={max_steps}")
    if schedule == "constant":
        return float(base)
    if schedule == "cosine":
        progress = min(step, max_steps) / max_steps
        return float(1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0)
    if not window > 0.0:
        raise ValueError(f"the momentum window must be a positive fraction of the run, got {window}")
    return float(max(0.0, 1.0 - 1.0 / (window * max_steps)))


class _Moments:
    """Per-channel count, sum and sum of squares of a BatchNorm layer's inputs, in float64."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().to(torch.float64).transpose(0, 1).reshape(args[0].shape[1], -1)
        self.count += x.shape[1]
        self.sum += x.sum(1).cpu()
        self.sumsq += (x * x).sum(1).cpu()


def _plain_class(cls: type) -> type:
    """The ordinary BatchNorm class under an EMAN layer's always-eval mixin."""
    return next(c for c in cls.__mro__ if issubclass(c, _BatchNorm) and not issubclass(c, _AlwaysEvalNorm))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate ``model``'s BatchNorm running statistics from its own forward passes (precise-BN).

    The model's weights are averages of the student's, and so should its statistics be: statistics
    of the *averaged* network's activations. An EMAN teacher's statistics are instead an EMA of the
    student's, which lag and over-estimate the variance while the student still moves within the
    averaging window. As for averaged weights in SWA (``torch.optim.swa_utils.update_bn``; Izmailov
    et al., UAI 2018) and as precise-BN (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021),
    the statistics are recomputed: every tracked BatchNorm layer normalizes each batch with its
    batch statistics (as in training, dropout off) while the per-channel mean and unbiased
    variance of its inputs are pooled over *all* voxels of *all* batches, so they do not depend on
    how the same voxels were grouped into batches at that layer. Parameters and
    ``num_batches_tracked`` are untouched; modes, classes and momenta are restored.

    Use it on a copy (``copy.deepcopy(teacher)``) when the EMA'd statistics must live on: the EMAN
    teacher that makes pseudo-labels during training keeps them (that is EMAN).

    Args:
        model: a network (an EMAN, bn or plain one) on the batches' device.
        batches: input tensors ``(B, C, ...)``; e.g. weak views of unlabeled patches.

    Returns:
        The number of batches used (0 leaves the statistics unchanged, as does a model without
        tracked BatchNorm).

    Examples:
        >>> teacher = make_teacher(student, norm="eman")
        >>> deployed = copy.deepcopy(teacher)
        >>> recalibrate_batchnorm(deployed, (torch.randn(2, 1, 16, 16, 16) for _ in range(8)))
        8
    """
    layers = tracked_batchnorms(unwrap(model))
    if not layers:
        return 0
    modes = {m: m.training for m in model.modules()}
    classes = {bn: type(bn) for bn in layers}
    moments = {bn: _Moments(bn.num_features) for bn in layers}
    handles = [bn.register_forward_pre_hook(moments[bn]) for bn in layers]
    hooks = dict(model._forward_pre_hooks)  # an EMAN teacher's _eval_mode hook would undo train mode
    model._forward_pre_hooks.clear()
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in layers]
    n = 0
    try:
        model.train(False)
        for bn in layers:
            bn.__class__ = _plain_class(classes[bn])
            bn.train(True)  # normalize with batch statistics, as the student does in training
        for batch in batches:
            model(batch)
            n += 1
    finally:
        model._forward_pre_hooks.update(hooks)
        for handle in handles:
            handle.remove()
        for bn, (mean, var, count) in zip(layers, saved):
            bn.__class__ = classes[bn]
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)
        for module, mode in modes.items():
            module.training = mode
    if n == 0:
        return 0
    for bn in layers:
        stats = moments[bn]
        mean = stats.sum / stats.count
        var = (stats.sumsq - stats.count * mean * mean) / max(stats.count - 1, 1)
        bn.running_mean.copy_(mean.to(bn.running_mean))
        bn.running_var.copy_(var.clamp_min(0.0).to(bn.running_var))
    return n


class EMANTeacher:
    """The mean teacher as one object: its network, its update counter and its momentum schedule.

    After timm's ``ModelEmaV3`` (``update``, ``set``, its own step): the teacher is a frozen copy of
    the student (:func:`make_teacher`) that changes only through :meth:`update` (the EMA step of
    :func:`update_teacher`, EMAN's statistics included, with the momentum of :meth:`momentum` at its
    own update count), :meth:`set` (a copy of the student, e.g. at the end of a supervised warm-up)
    and :meth:`recalibrate` (precise-BN). The counter counts updates, not optimizer steps: a step
    that a gradient scaler skipped never calls :meth:`update`, so it does not advance the schedule.

    Create it from the plain student, after moving the student to its device and before any
    SyncBatchNorm conversion or DDP wrapping (so the teacher's BatchNorm never synchronizes).
    Under multi-process DDP with plain BatchNorm the statistics it averages are pooled over the
    processes first (:func:`medeman.distributed_bn.average_bn_statistics`), so every process keeps
    the same teacher.

    Args:
        student: the network to average.
        norm: ``eman``, ``bn`` or ``ema`` (:func:`make_teacher`).
        max_steps: optimizer steps of the whole run (``train.max_steps``), for the schedule.
        momentum: the base momentum (``ssl.ema_momentum``).
        schedule: ``constant``, ``cosine`` or ``window`` (:func:`scheduled_momentum`).
        window: the ``window`` schedule's fraction of the run.
        warmup: :func:`momentum_at`'s warm-up (the teacher follows the young student).
        pool: called with a network whose BatchNorm statistics must agree across processes;
            ``None`` disables pooling.

    Examples:
        >>> student = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4))
        >>> teacher = EMANTeacher(student, max_steps=100, momentum=0.99, schedule="constant")
        >>> teacher.update(student)  # after each optimizer step
        >>> teacher.updates, teacher.momentum()
        (1, 0.5)
    """

    def __init__(
        self,
        student: nn.Module,
        norm: str = "eman",
        max_steps: int = 1,
        momentum: float = 0.99,
        schedule: str = "constant",
        window: float = 0.1,
        warmup: bool = True,
        pool: Callable[[nn.Module], None] | None = average_bn_statistics,
    ):
        self.network = make_teacher(student, norm=norm)
        self.norm = norm
        self.max_steps = int(max_steps)
        self.base_momentum = float(momentum)
        self.schedule = schedule
        self.window = float(window)
        self.warmup = bool(warmup)
        self.pool = pool
        self.updates = 0

    @classmethod
    def from_config(cls, student: nn.Module, cfg: Config | dict[str, Any]) -> EMANTeacher:
        """The teacher ``ssl.teacher_norm``, ``ssl.ema_momentum``, ``ssl.momentum_*`` and ``train.max_steps`` describe."""
        from medeman.typed_config import as_config

        cfg = as_config(cfg)
        ssl = cfg.ssl
        return cls(
            student,
            norm=ssl.teacher_norm,
            max_steps=cfg.train.max_steps,
            momentum=ssl.ema_momentum,
            schedule=ssl.momentum_schedule,
            window=ssl.momentum_window,
            warmup=ssl.momentum_warmup,
        )

    def momentum(self, step: int | None = None) -> float:
        """The momentum of the update after ``step`` earlier updates (default: the next one's)."""
        step = self.updates if step is None else step
        return momentum_at(
            step, scheduled_momentum(step, self.max_steps, self.base_momentum, self.schedule, self.window), self.warmup
        )

    def _pool(self, network: nn.Module) -> None:
        if self.pool is not None:
            self.pool(network)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student`` with the scheduled momentum; the counter advances by one."""
        if self.norm == "eman":  # bn and ema teachers keep their own buffers
            self._pool(student)
        update_teacher(self.network, student, self.momentum())
        self.updates += 1

    def set(self, student: nn.Module, batches: Iterable[torch.Tensor] | None = None) -> int:
        """Make the teacher a copy of ``student``, then (with ``batches``) estimate its BatchNorm statistics once.

        Returns:
            The number of batches the statistics were estimated from (0: the student's are kept).
        """
        set_teacher(self.network, student)
        if batches is None or not tracked_batchnorms(self.network):
            return 0
        return self.recalibrate(batches)

    def recalibrate(self, batches: Iterable[torch.Tensor]) -> int:
        """Re-estimate the teacher's own BatchNorm statistics in place (:func:`recalibrate_batchnorm`), pooled over processes.

        Returns:
            The number of batches used (0 leaves the statistics unchanged).
        """
        n = recalibrate_batchnorm(self.network, batches)
        if n:
            self._pool(self.network)
        return n

    def recalibrated_copy(self, batches: Iterable[torch.Tensor]) -> nn.Module | None:
        """A copy of the teacher with statistics re-estimated from ``batches``; ``None`` when none were drawn.

        The teacher itself keeps its EMA'd statistics (that is EMAN).
        """
        net = copy.deepcopy(self.network)
        return net if recalibrate_batchnorm(net, batches) else None

    def __call__(self, x: torch.Tensor) -> Any:
        return self.network(x)
