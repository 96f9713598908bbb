"""The method interface: what a semi-supervised method adds to training, and the shared teacher machinery.

:class:`SSLSegModule <medeman.module.SSLSegModule>` holds one :class:`Method` and asks it, rather
than comparing ``ssl.method`` strings, what a training step's loss is, what happens after an
optimizer step, which networks are validated and which one is deployed as ``teacher.pt``; the
DataModule asks it which unlabeled views to produce, and ``medeman train`` asks it whether the
config and data fit.

A new method is one file with a subclass registered by ``@register_method("name")``, which
also declares the method's own config keys (:mod:`medeman.methods.registry`; docs/development.md).
The teacher is an :class:`~medeman.eman.EMANTeacher` the method owns; a method changes only its
own state and its teacher's, never the module's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from medeman.config import ConfigError, Option
from medeman.eman import EMANTeacher, tracked_batchnorms
from medeman.methods.options import read_options
from medeman.schedules import RunSchedule, run_schedule
from medeman.typed_config import Config, as_config

if TYPE_CHECKING:  # the module imports the methods, not the other way round (no import circle)
    from medeman.module import SSLSegModule


class Method:
    """One training method, as the LightningModule, DataModule, exporter and tuner see it.

    Override what the method changes; the defaults are the supervised baseline.

    Attributes:
        name: the ``ssl.method`` value (set by :func:`~medeman.methods.registry.register_method`).
        unlabeled_views: the views of each unlabeled patch the DataModule must produce
            (``()``: the method uses no unlabeled scans; ``("weak", "strong")``: a voxel-aligned pair).
        teacher: the teacher object (:meth:`make_teacher`), or ``None``.
        summary: one line for ``ssl.method``'s help.
        option_type: a frozen dataclass of the method's own options (:mod:`medeman.methods.options`);
            registering the class makes its fields the keys ``ssl.<name>_<field>`` and fills
            :attr:`options` and :attr:`option_rules` from it.
        own_options: an ``option_type`` object with this config's values (``None`` without one).
        options: the method's own ``ssl`` keys (flat names, e.g. ``bcp_box_fraction``), added to
            the config schema when the class is registered.
        option_rules: ``(key, holds, requirement)`` value rules of those keys (``ssl.key: value
            must be requirement`` when ``holds(value)`` is false).
    """

    name = "supervised"
    unlabeled_views: tuple[str, ...] = ()
    teacher: EMANTeacher | None = None
    summary = "labeled data only, the baseline"
    option_type: type | None = None
    option_prefix = ""  # the registered name of the class that declared option_type
    own_options: Any = None
    options: dict[str, Option] = {}
    option_rules: tuple[tuple[str, Callable[[Any], bool], str], ...] = ()

    @classmethod
    def check_options(cls, cfg: Config) -> None:
        """Rules between this class's own :attr:`options` and other keys, checked for every config (they are in every one).

        Value rules of one key alone go in :attr:`option_rules` (``(key, holds, requirement)``).
        """

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Rules between config keys for a config that trains with this method (``ConfigError``), checked at load time."""

    def __init__(self, cfg: Config | dict[str, Any]):
        self.cfg = as_config(cfg)
        self.ssl = self.cfg.ssl  # the method's own options too (e.g. self.ssl.bcp_box_fraction)
        self.schedule: RunSchedule = run_schedule(self.cfg)
        if self.option_type is not None:
            self.own_options = read_options(self.option_prefix, self.option_type, self.ssl)

    @property
    def uses_unlabeled(self) -> bool:
        """Whether training draws unlabeled batches."""
        return bool(self.unlabeled_views)

    def check(self, cfg: Config | dict[str, Any], has_unlabeled: bool) -> None:
        """Refuse a config or input this method cannot train with (``ConfigError``), before any data is read.

        Rules between config keys alone (e.g. ``teacher_norm: eman`` needs BatchNorm) live in
        :func:`medeman.config.validate`; this is for what depends on the method and the inputs.
        """
        if self.uses_unlabeled and not has_unlabeled:
            raise ConfigError(
                f"ssl.method={self.name} needs unlabeled scans: pass --unlabeled DIR, or use ssl.method=supervised"
            )

    def make_teacher(self, student: nn.Module) -> EMANTeacher | None:
        """The teacher object this method keeps as :attr:`teacher`, or ``None``; the module registers its network."""
        return None

    def training_loss(self, module: SSLSegModule, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of one training batch and what to log (``loss/sup`` and ``loss/total`` at least)."""
        labeled = batch["labeled"]
        sup = module.supervised_loss_of(module.student(labeled["image"]), labeled["label"])
        return sup, {"loss/sup": sup.detach(), "loss/total": sup.detach(), "ssl/weight": 0.0}

    def after_optimizer_step(self, module: SSLSegModule) -> None:
        """Called after every optimizer step the student took (not after skipped or accumulation steps)."""

    def checkpointed_modules(self) -> dict[str, nn.Module]:
        """Modules with state of the method's own (e.g. adaptive thresholds) that the module registers by name, so checkpoints hold them."""
        return {}

    def uses_unlabeled_frequencies(self) -> bool:
        """Whether the method wants the class frequencies of the periodic teacher pass (:meth:`set_unlabeled_frequencies`)."""
        return False

    def set_unlabeled_frequencies(self, labeled: torch.Tensor, unlabeled: torch.Tensor) -> None:
        """Receive, after each teacher pass over the whole unlabeled scans (:class:`~medeman.teacher_focus.TeacherFocus`),
        the labeled scans' class frequencies and the teacher's mean probability per class on the unlabeled ones, both ``(C,)``."""

    def state_dict(self) -> dict[str, Any]:
        """What the method must carry across a resume besides the networks (plain values; saved in Lightning checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (keys it does not know are ignored: older checkpoints)."""

    def validated_networks(self, module: SSLSegModule) -> dict[str, nn.Module]:
        """The networks to score at a validation, by name; ``"teacher"`` is the deployed one."""
        return {"student": module.student}

    def name_validation_results(
        self, results: dict[str, Any], mean_dice: Callable[[Any], float]
    ) -> tuple[dict[str, Any], str | None]:
        """The validation's results by the name they are logged under, and a line for the log (or ``None``).

        Args:
            results: ``{network name: scores}`` of :meth:`validated_networks`' networks.
            mean_dice: the mean class Dice over all processes of a network's scores.

        Returns:
            ``results`` with ``"teacher"`` naming the deployed network's scores; here, unless a
            ``"teacher"`` was validated, the student's.
        """
        return ({**results, "teacher": results["student"]} if "teacher" not in results else results), None

    def deployed_network(self, module: SSLSegModule) -> tuple[nn.Module, str]:
        """The network written to ``teacher.pt`` and which BatchNorm statistics it holds.

        Returns:
            ``(network, stats)``, ``stats`` one of ``"recalibrated"`` (re-estimated from its own forward
            passes), ``"ema"`` (EMAN's EMA of the student's), ``"batch"`` (running averages of batch
            statistics: a bn teacher's own, or a student's) and ``"none"`` (no BatchNorm).
        """
        return module.student, "batch" if tracked_batchnorms(module.student) else "none"


class TeacherMethod(Method):
    """A method with an EMA teacher (``ssl.teacher_norm``: eman | bn | ema), validated and deployed.

    The teacher is an :class:`~medeman.eman.EMANTeacher` (:attr:`teacher`, made by :meth:`make_teacher`):
    after each optimizer step it becomes ``m θ' + (1 - m) θ`` with its scheduled momentum. At the end of the supervised warm-up
    (:meth:`teacher_start_step`) the teacher is set to the student and its BatchNorm statistics are
    estimated once from its own forward passes, so self-training starts from a teacher as good as
    the student instead of one that still averages the random start; then pure EMAN. The validated and deployed teacher is, with
    ``ssl.teacher_bn_recalibration``, a copy with BatchNorm statistics re-estimated from its own
    forward passes (:func:`medeman.eman.recalibrate_batchnorm`); the teacher used in training keeps
    its EMA'd statistics (that is EMAN). The first validation also scores the raw teacher
    (``val/dice_teacher_raw``) so the effect is visible; with ``teacher_bn_recalibration: best``
    every validation scores both and the better one on validation is the teacher (:meth:`choose_teacher`).
    """

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """EMAN averages BatchNorm running statistics: a teacher with ``teacher_norm: eman`` needs a BatchNorm student."""
        if cfg.ssl.teacher_norm == "eman" and cfg.model.norm != "batch":
            raise ConfigError(
                f"ssl.teacher_norm=eman needs a BatchNorm network, but model.norm={cfg.model.norm} "
                "(InstanceNorm has no running statistics for EMAN to average): set model.norm=batch, "
                "or ssl.teacher_norm=ema (a plain weight-EMA teacher)"
            )

    def __init__(self, cfg: Config | dict[str, Any]):
        super().__init__(cfg)
        self._recalibrated: dict[
            str, Any
        ] = {}  # {"step": int, "net": the re-estimated copy}, outside the module's state
        self._compare_raw_teacher = True
        self.chosen_statistics = (
            "recalibrated"  # teacher_bn_recalibration=best: which scored higher at the last validation
        )

    def make_teacher(self, student: nn.Module) -> EMANTeacher:
        self.teacher = EMANTeacher.from_config(student, self.cfg)
        return self.teacher

    def state_dict(self) -> dict[str, Any]:
        return {"chosen_statistics": self.chosen_statistics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("chosen_statistics") in ("raw", "recalibrated"):
            self.chosen_statistics = state["chosen_statistics"]

    def after_optimizer_step(self, module: SSLSegModule) -> None:
        teacher = self.teacher
        teacher.update(module.student)
        if teacher.updates == self.teacher_start_step() > 0:
            self.start_teacher_from_student(module)
        every = self.ssl.teacher_bn_refresh_every
        if every > 0 and teacher.updates % every == 0 and tracked_batchnorms(teacher.network):
            self.refresh_teacher_statistics(module)

    def teacher_start_step(self) -> int:
        """The teacher update after which the teacher restarts as the student: the end of the warm-up (0: never)."""
        return self.schedule.warmup_steps

    def start_teacher_from_student(self, module: SSLSegModule) -> None:
        """Set the teacher to the student (weights and buffers), then estimate its BatchNorm statistics once (precise-BN)."""
        inputs = module.recalibration_inputs() if tracked_batchnorms(self.teacher.network) else None
        if self.teacher.set(module.student, inputs):
            self._recalibrated = {}  # a cached re-estimated copy belongs to the statistics it replaced

    def refresh_teacher_statistics(self, module: SSLSegModule) -> None:
        """Re-estimate the *training* teacher's BatchNorm statistics in place (``ssl.teacher_bn_refresh_every``).

        Not EMAN: its statistics are EMA'd from the student's, and early in a short run, while the
        student moves fast, those lag the averaged weights (the re-estimated copy validates far
        better then). This lets the teacher that makes pseudo-targets use statistics of its own
        averaged weights (precise-BN, :meth:`medeman.eman.EMANTeacher.recalibrate`), EMA'd from the
        student's again until the next refresh. Under DDP each process re-estimates on its own
        batches and the statistics are then pooled over the processes (mean of the variances plus
        variance of the means), so every teacher stays identical. Without batches nothing changes.
        """
        inputs = module.recalibration_inputs()
        if inputs is not None and self.teacher.recalibrate(inputs):
            self._recalibrated = {}  # a cached re-estimated copy belongs to the statistics it replaced

    # ---- the validated and deployed teacher --------------------------------------------------------
    def _recalibrates(self, module: SSLSegModule, when: str) -> bool:
        if not tracked_batchnorms(self.teacher.network):
            return False
        mode = self.ssl.teacher_bn_recalibration
        if mode == "best":  # validate both; export what won the last validation
            return when == "validation" or self.chosen_statistics == "recalibrated"
        return mode == "always" or (mode == "export" and when == "export")

    def recalibrated_teacher(self, module: SSLSegModule) -> nn.Module | None:
        """A copy of the teacher with re-estimated BatchNorm statistics at this step (cached per step).

        ``None`` when no batches can be drawn (no DataModule with ``recalibration_dataloader``).
        """
        if self._recalibrated.get("step") == module.global_step:
            return self._recalibrated["net"]
        inputs = module.recalibration_inputs()
        net = None if inputs is None else self.teacher.recalibrated_copy(inputs)
        if net is None:
            return None
        self._recalibrated = {"step": module.global_step, "net": net}
        return net

    def validated_networks(self, module: SSLSegModule) -> dict[str, nn.Module]:
        nets = {"student": module.student, "teacher": self.teacher.network}
        teacher = self.recalibrated_teacher(module) if self._recalibrates(module, "validation") else None
        if teacher is not None:
            nets["teacher"] = teacher
            if self._compare_raw_teacher or self.ssl.teacher_bn_recalibration == "best":
                nets["teacher_raw"] = (
                    self.teacher.network
                )  # with its EMA'd (or own) statistics: the first time, or every time to choose
                self._compare_raw_teacher = False
        return nets

    def name_validation_results(
        self, results: dict[str, Any], mean_dice: Callable[[Any], float]
    ) -> tuple[dict[str, Any], str | None]:
        """Name the validated teachers' scores; with ``teacher_bn_recalibration: best`` choose the teacher.

        When both teachers were scored (``"teacher"``: re-estimated statistics, ``"teacher_raw"``:
        its EMA'd or own ones), the line for the log compares them; under ``best`` the re-estimated
        scores are kept as ``"teacher_recalibrated"`` and ``"teacher"`` names the winner's
        (:meth:`choose_teacher`).
        """
        if "teacher_raw" not in results:
            return results, None
        held = "EMA'd" if self.ssl.teacher_norm == "eman" else "own"
        raw, recalibrated = mean_dice(results["teacher_raw"]), mean_dice(results["teacher"])
        mode = self.ssl.teacher_bn_recalibration
        note = ""
        if mode == "best":
            results = {**results, "teacher_recalibrated": results["teacher"]}
            if self.choose_teacher(raw, recalibrated) == "raw":
                results["teacher"] = results["teacher_raw"]
            note = (
                f": the teacher keeps the {'re-estimated' if self.chosen_statistics == 'recalibrated' else held} ones"
            )
        return results, (
            f"{raw:.3f} with its {held} BatchNorm statistics, {recalibrated:.3f} re-estimated "
            f"(ssl.teacher_bn_recalibration={mode}){note}"
        )

    def choose_teacher(self, raw_dice: float, recalibrated_dice: float) -> str:
        """``teacher_bn_recalibration=best``: keep the statistics that scored higher on validation.

        Returns:
            ``"raw"`` or ``"recalibrated"``: which validated teacher is *the* teacher from now on
            (logged as ``val/dice_teacher`` and written to ``teacher.pt``); a tie keeps the re-estimated one.
        """
        self.chosen_statistics = "raw" if raw_dice > recalibrated_dice else "recalibrated"
        return self.chosen_statistics

    def deployed_network(self, module: SSLSegModule) -> tuple[nn.Module, str]:
        if not tracked_batchnorms(self.teacher.network):
            return self.teacher.network, "none"
        if self._recalibrates(module, "export"):
            net = self.recalibrated_teacher(module)
            if net is not None:
                return net, "recalibrated"
        return self.teacher.network, "ema" if self.ssl.teacher_norm == "eman" else "batch"
