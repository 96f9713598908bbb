"""The LightningModule: a student (and, for teacher methods, its EMA teacher) trained by one method.

The module owns the networks, the supervised Dice+CE, the optimizer and whole-volume validation;
the method object (:mod:`medeman.methods`, chosen by ``ssl.method``) says what a training step's
loss is, what follows an optimizer step (the teacher's EMA update), which networks are validated
and which one is deployed as ``teacher.pt``. So ablations differ in configuration, not code.

The teacher that is validated and deployed can be a copy whose BatchNorm statistics are
re-estimated from its own forward passes (``ssl.teacher_bn_recalibration``,
:func:`medeman.eman.recalibrate_batchnorm`); the teacher that makes pseudo-labels keeps its EMA'd
statistics.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from torch import nn

from medeman.data.batches import stream_seed
from medeman.predict import predict_volume
from medeman.classes import lesion_classes, lesion_host_classes
from medeman.labels import argmax_labels
from medeman.losses import class_weight_tensor
from medeman.methods import Method, build_method
from medeman.methods.lesion_paste import paste_into_labeled
from medeman.nets import build_network, deep_supervision_heads, deep_supervision_weights, main_output
from medeman.teacher_focus import TeacherFocus
from medeman.typed_config import Config, as_config


class SSLSegModule(pl.LightningModule):
    """Semi-supervised (or supervised) 3D segmentation by the method ``ssl.method`` names.

    Args:
        cfg: resolved medeman config (:mod:`medeman.config`).
        sync_batchnorm: convert the student's BatchNorm to SyncBatchNorm (multi-GPU). The teacher
            is made before the conversion, so its EMAN layers never synchronize.
        method: the method object ``medeman train`` built once for the run (its checks and the
            DataModule's views came from it); ``None`` builds ``ssl.method``'s (tests, checkpoints).

    Examples:
        >>> from medeman.config import load_config
        >>> module = SSLSegModule(load_config(sets=["model.channels=[4,8]"]))
        >>> module.teacher is not None
        True
    """

    def __init__(self, cfg: Config | dict[str, Any], sync_batchnorm: bool = False, method: Method | None = None):
        super().__init__()
        cfg = as_config(cfg)
        self.save_hyperparameters({"cfg": cfg.to_dict()})
        self.cfg = cfg
        self.ssl = cfg.ssl
        self.num_classes = cfg.data.num_classes
        self.student = build_network(cfg)
        if cfg.train.channels_last:  # NDHWC, oneDNN's and cuDNN's fast conv3d layout; the teacher copies it
            self.student = self.student.to(memory_format=torch.channels_last_3d)
        self.method = method if method is not None else build_method(cfg)
        # the method keeps the teacher object (its clock, schedule and updates); its network is a registered
        # submodule here, so checkpoints hold it under teacher.*; None for methods without a teacher
        ema = self.method.make_teacher(self.student)
        self.teacher: nn.Module | None = None if ema is None else ema.network
        self._validated: dict[str, nn.Module] = {}
        if sync_batchnorm:
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        if cfg.train.compile:  # in place (nn.Module.compile): state_dict keys and the EMAN update are unchanged
            for net in (self.student, self.teacher):
                if net is not None:
                    net.compile()
        train = cfg.train
        ce_weights = class_weight_tensor(train.ce_class_weights)
        self.supervised_loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=train.batch_dice, weight=ce_weights)
        if ce_weights is not None:  # MONAI weights its Dice too; train.ce_class_weights is for the cross-entropy only
            self.supervised_loss.dice.class_weight = None
        if train.deep_supervision:  # a list of heads, full resolution first, weighted 1/2^i (nnU-Net)
            self.supervised_loss = DeepSupervisionLoss(
                self.supervised_loss, weights=deep_supervision_weights(1 + train.deep_supervision_heads)
            )
        self.labeled_paste = (  # data.labeled_lesion_paste: (lesion classes, their hosts), or None
            (lesion_classes(cfg), lesion_host_classes(cfg)) if cfg.data.labeled_lesion_paste > 0 else None
        )
        for name, state in self.method.checkpointed_modules().items():  # e.g. adaptive pseudo-label thresholds
            self.add_module(name, state)
        # per validated network, made when the method first names it (Method.validated_networks)
        self.dice_metrics: dict[str, DiceMetric] = {}
        self.hd95_metrics: dict[str, HausdorffDistanceMetric] = {}

    # ---- training ----------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the global torch RNG (dropout, the methods' boxes and noise) from ``(train.seed, rank, batch)``.

        So what a step draws is a function of the step only: validation, BatchNorm re-estimation
        and a resume (Lightning does not save the global RNG) never shift it. About 20 us a batch on CPU.
        """
        accumulate = self.cfg.train.accumulate_grad_batches
        batch_index = self.global_step * accumulate + batch_idx % accumulate  # epochs are whole steps
        seed = stream_seed(self.cfg.train.seed, self.global_rank, 3, batch_index)
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.labeled_paste is not None:
            batch = {**batch, "labeled": self.paste_labeled_lesions(batch["labeled"])}
        loss, logs = self.method.training_loss(self, batch)
        if (
            not self.writes_training_logs()
        ):  # each self.log costs ~0.2 ms of Python: only on the steps the loggers write
            return loss
        batch_size = batch["labeled"]["image"].shape[0]
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log(
            "sup",
            logs.get("loss/sup", logs["loss/total"]),
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            logger=False,
            batch_size=batch_size,
        )
        if "loss/unsup" in logs:
            self.log(
                "unsup",
                logs["loss/unsup"],
                prog_bar=True,
                on_step=True,
                on_epoch=False,
                logger=False,
                batch_size=batch_size,
            )
        return loss

    def paste_labeled_lesions(self, labeled: dict) -> dict:
        """``data.labeled_lesion_paste``: the batch's lesions pasted into some of its labeled patches, for every method."""
        image = labeled["image"]
        chosen = torch.rand(image.shape[0]) < self.cfg.data.labeled_lesion_paste  # the RNG seeded per batch
        image, label = paste_into_labeled(image, labeled["label"], *self.labeled_paste, chosen)
        return {**labeled, "image": image, "label": label}

    def writes_training_logs(self) -> bool:
        """Whether the loggers write this training step's logs (Lightning's rule: ``(step + 1) % log_every_n_steps == 0``).

        Training losses are logged only then, and the per-class pseudo-label statistics (a device
        sync) are computed only then; outside a Trainer every step counts.
        """
        if self._trainer is None:
            return True
        every = int(self.trainer.log_every_n_steps)
        return every > 0 and (self.global_step + 1) % every == 0

    # ---- building blocks the methods call --------------------------------------------------------
    def supervised_loss_of(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Dice+CE of the student's logits on labeled patches (every deep-supervision head, if on)."""
        if self.cfg.train.deep_supervision:
            return self.supervised_loss([head.float() for head in deep_supervision_heads(logits)], label)
        return self.supervised_loss(logits.float(), label)

    @torch.no_grad()
    def teacher_probs(self, image: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 softmax on ``image`` (its main output)."""
        return torch.softmax(main_output(self.teacher(image)).float(), dim=1)

    def configure_callbacks(self) -> list:
        """The teacher's periodic pass over the unlabeled scans, when there is a teacher and something uses it: focused
        crops (``data.unlabeled_focus_fraction`` > 0) or a method's class frequencies (distribution alignment)."""
        if self.teacher is None or (
            self.cfg.data.unlabeled_focus_fraction <= 0 and not self.method.uses_unlabeled_frequencies()
        ):
            return []
        return [TeacherFocus(self.cfg)]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimizer, then EMA-update the teacher (so accumulation steps never update it).

        A step that 16-mixed's gradient scaler skips (inf/NaN gradients: the student did not move)
        updates no teacher and does not advance the momentum schedule, which counts teacher
        updates (``self.teacher_updates``, kept in checkpoints) rather than optimizer steps.
        """
        scale = self._grad_scale()
        super().optimizer_step(*args, **kwargs)
        if not (scale is not None and self._grad_scale() < scale):  # the scaler backs off only on a skip
            self.method.after_optimizer_step(self)  # a teacher method's EMA update (its clock advances)

    def _grad_scale(self) -> float | None:
        """The loss scale of 16-mixed's gradient scaler (``None`` without one)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    @property
    def teacher_updates(self) -> int:
        """The teacher's update count, its momentum schedule's clock (optimizer steps less those the grad scaler skipped)."""
        return 0 if self.method.teacher is None else self.method.teacher.updates

    @teacher_updates.setter
    def teacher_updates(self, value: int) -> None:
        if self.method.teacher is not None:
            self.method.teacher.updates = int(value)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medeman_teacher_updates"] = self.teacher_updates
        checkpoint["medeman_method_state"] = (
            self.method.state_dict()
        )  # e.g. which teacher statistics won the last validation

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._apply_optimisation_settings(checkpoint)
        self.teacher_updates = int(checkpoint.get("medeman_teacher_updates", checkpoint.get("global_step", 0)))
        state = checkpoint.get("medeman_method_state", {})
        if "medeman_teacher_statistics" in checkpoint:  # checkpoints written before medeman_method_state
            state = {"chosen_statistics": checkpoint["medeman_teacher_statistics"], **state}
        self.method.load_state_dict(state)

    def _apply_optimisation_settings(self, checkpoint: dict[str, Any]) -> None:
        """Give a resumed run this config's ``train.lr`` and ``train.weight_decay`` (the checkpoint holds the old ones).

        Called before Lightning restores optimizer and scheduler from ``checkpoint``: the scheduler's
        base learning rate becomes ``train.lr``; :meth:`on_train_start` then sets the current rate
        from the schedule (built from this config, so ``train.max_steps`` counts too): a changed
        setting takes effect at the step the run resumed from.
        """
        lr, weight_decay = self.cfg.train.lr, self.cfg.train.weight_decay
        for scheduler in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in scheduler:
                scheduler["base_lrs"] = [lr for _ in scheduler["base_lrs"]]
        for optimizer in checkpoint.get("optimizer_states", []):
            for group in optimizer.get("param_groups", []):
                group["initial_lr"], group["weight_decay"] = lr, weight_decay

    def on_train_start(self) -> None:
        """The learning rate of the step training starts at, from the schedule (after a resume: the resumed config's)."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, rate in zip(
                    scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas
                ):
                    group["lr"] = base * rate(scheduler.last_epoch)

    def configure_optimizers(self):
        train = self.cfg.train
        params = self.student.parameters()
        lr, wd = train.lr, train.weight_decay
        # one fused kernel over all parameters (on CPU PyTorch otherwise loops tensor by tensor: 1.4 ms
        # against 0.35 ms per step for the sample UNet, benchmarks/results/bench_train_step.md)
        fused = self.device.type in ("cpu", "cuda")
        if train.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=wd, fused=fused)
        elif train.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=fused)
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused)
        total = max(train.max_steps, 1)
        schedules = {
            "poly": lambda s: (1.0 - min(s, total) / total) ** 0.9,
            "cosine": lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)),
            "constant": lambda s: 1.0,
        }
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules[train.lr_schedule])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- the deployed network -------------------------------------------------------------------
    def recalibration_inputs(self):
        """Weak views of unlabeled patches (labeled images without them) from the DataModule, or ``None``."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        loader_of = getattr(datamodule, "recalibration_dataloader", None)
        if loader_of is None:
            return None
        return (
            (batch["weak"] if "weak" in batch else batch["image"]).to(self.device)
            for batch in loader_of(self.ssl.recalibration_batches)
        )

    def deployed_network(self) -> tuple[nn.Module, str]:
        """The network written to ``teacher.pt`` and which BatchNorm statistics it holds (the method decides).

        Returns:
            ``(network, stats)`` with ``stats`` one of ``"recalibrated"``, ``"ema"``, ``"batch"``, ``"none"``
            (:meth:`medeman.methods.base.Method.deployed_network`).
        """
        return self.method.deployed_network(self)

    # ---- validation: whole volumes, teacher and student -----------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._validated = self.method.validated_networks(self)
        for name in self._validated:
            if name not in self.dice_metrics:
                self.dice_metrics[name] = DiceMetric(
                    include_background=False, reduction="mean_batch", ignore_empty=False
                )
                self.hd95_metrics[name] = HausdorffDistanceMetric(
                    include_background=False, percentile=95, reduction="mean_batch"
                )

    def _networks(self) -> dict[str, nn.Module]:
        """The networks this validation scores, by name (set in :meth:`on_validation_epoch_start`)."""
        return self._validated

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image, label = batch["image"], batch["label"]
        onehot_label = nn.functional.one_hot(label[:, 0].long(), self.num_classes).movedim(-1, 1)
        spacing = self.cfg.data.spacing
        for name, net in self._networks().items():  # the same sliding window as `medeman infer`
            probs = torch.stack([predict_volume(net, volume, self.cfg) for volume in image])
            pred = nn.functional.one_hot(argmax_labels(probs, dim=1, dtype=torch.long), self.num_classes).movedim(-1, 1)
            self.dice_metrics[name](pred, onehot_label)
            self.hd95_metrics[name](pred, onehot_label, spacing=spacing)

    def _mean_over_processes(self, dice: torch.Tensor) -> float:
        """Mean class Dice over every process's validation cases (each holds its share under DDP)."""
        mean = dice.to(self.device).float().nanmean()
        if self._trainer is not None and self.trainer.world_size > 1:
            mean = self.trainer.strategy.reduce(mean, reduce_op="mean")
        return float(mean)

    def on_validation_epoch_end(self) -> None:
        results = {
            name: (self.dice_metrics[name].aggregate(), self.hd95_metrics[name].aggregate())
            for name in self._networks()
        }
        # the method names the deployed network's scores "teacher" (and, under teacher_bn_recalibration=best, chooses it)
        results, note = self.method.name_validation_results(
            results, lambda scores: self._mean_over_processes(scores[0])
        )
        if note:
            rank_zero_info(f"teacher validation Dice at step {self.global_step}: {note}")
        for name, (dice, hd95) in results.items():
            dice = dice.to(self.device).float()
            hd95 = hd95.to(self.device).float()
            hd95 = torch.where(torch.isfinite(hd95), hd95, torch.full_like(hd95, float("nan")))
            self.log(f"val/dice_{name}", dice.mean(), prog_bar=name == "teacher", sync_dist=True)
            if name in ("teacher_raw", "teacher_recalibrated"):
                continue
            self.log(f"val/hd95_{name}", hd95.nanmean(), sync_dist=True)
            for c, value in enumerate(dice, start=1):
                self.log(f"val/dice_{name}_class{c}", value, sync_dist=True)
        for metric in (*self.dice_metrics.values(), *self.hd95_metrics.values()):
            metric.reset()
