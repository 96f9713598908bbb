"""BCP: bidirectional copy-paste between labeled and unlabeled 3D patches, on an EMA (EMAN) teacher.

Bai, Chen, Li, Shen & Wang, "Bidirectional Copy-Paste for Semi-Supervised Medical Image
Segmentation", CVPR 2023. Each step a random 3D box (``ssl.bcp_box_fraction`` of every side, the
paper's 2/3) of an unlabeled patch is pasted into a labeled one and a labeled box into an
unlabeled one; the student learns both mixed patches with Dice+CE against mixed targets — ground
truth where the voxels came from a labeled patch, the teacher's argmax elsewhere, weighted
``ssl.bcp_unlabeled_weight`` (the paper's α = 0.5). The pre-training stage
(``ssl.bcp_pretrain_steps``, by default the run's warm-up, ``ssl.warmup_fraction`` of it) mixes
labeled patches with each other only; then the teacher starts as a copy of the pre-trained
student with its BatchNorm statistics estimated once, as in the paper. The teacher's argmax is
cleaned per class to its largest connected components (``ssl.bcp_keep_components``: k where the
anatomy has k, e.g. two kidneys), as the paper keeps the largest one. Mixing and loss:
:mod:`medeman.methods.copy_paste`.

Where medeman differs from the paper: one box per sample; the components are kept per patch
(the paper's patches hold the whole left atrium); pre-training and self-training are one run
(one learning-rate schedule) instead of two; the teacher is EMAN by default; deep-supervision
heads other than the main output are not trained by the mixed loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING, Any

import torch

from medeman.config import ConfigError
from medeman.labels import argmax_labels, keep_largest_components
from medeman.methods.base import TeacherMethod
from medeman.methods.options import option
from medeman.methods.registry import register_method
from medeman.methods.copy_paste import bidirectional_copy_paste, copy_paste_loss, random_boxes
from medeman.nets import main_output
from medeman.typed_config import Config, as_config

if TYPE_CHECKING:
    from medeman.module import SSLSegModule


@dataclass(frozen=True)
class BCPOptions:
    """BCP's own options, the config keys ``ssl.bcp_<field>``."""

    box_fraction: float = option(
        2.0 / 3.0,
        "side of the copy-paste box as a fraction of each patch side (the paper's 2/3)",
        rule=(lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]"),
    )
    unlabeled_weight: float = option(
        0.5,
        "weight alpha of the pseudo-labeled voxels of the mixed patches (ground truth weighs 1)",
        rule=(lambda v: v >= 0, "a non-negative weight"),
    )
    pretrain_steps: int | None = option(
        None,
        "first steps of copy-paste pre-training on labeled patches only; the teacher then starts as a copy of the student (BatchNorm statistics estimated once); null: the warm-up (ssl.warmup_steps)",
        type=int,
        rule=(lambda v: v >= 0, "a non-negative number of steps"),
    )
    keep_components: tuple[int, ...] | None = option(
        None,
        "per foreground class, keep only the k largest connected components of the teacher's pseudo-labels in each patch (the paper keeps the largest; e.g. [1, 2] for liver and two kidneys); 0 keeps a class as it is; null: no clean-up",
        type=list,
    )


@register_method("bcp")
class BCP(TeacherMethod):
    """Bidirectional copy-paste; the teacher's argmax labels the unlabeled parts of both mixed patches."""

    summary = "bidirectional copy-paste, Bai et al. 2023"
    option_type = BCPOptions
    own_options: BCPOptions

    @classmethod
    def check_options(cls, cfg: Config) -> None:
        """The per-class component counts: one whole number per foreground class."""
        keep = cfg.ssl.bcp_keep_components
        classes = cfg.data.num_classes - 1
        if keep is not None and not (
            len(keep) == classes and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in keep)
        ):
            raise ConfigError(
                f"ssl.bcp_keep_components: {None if keep is None else list(keep)!r} must be null or {classes} whole numbers >= 0 (one per foreground class)"
            )

    unlabeled_views = ("weak",)

    def check(self, cfg: Config | dict[str, Any], has_unlabeled: bool) -> None:
        super().check(cfg, has_unlabeled)
        data = as_config(cfg).data
        if data.batch_size_unlabeled != data.batch_size_labeled:
            raise ConfigError(
                f"ssl.method=bcp pairs labeled and unlabeled patches one to one: set data.batch_size_unlabeled "
                f"({data.batch_size_unlabeled}) equal to data.batch_size_labeled ({data.batch_size_labeled})"
            )

    def training_loss(self, module: SSLSegModule, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        labeled = batch["labeled"]
        image, label = labeled["image"], labeled["label"]
        unlabeled = batch.get("unlabeled")
        box = random_boxes(image.shape[0], image.shape[2:], self.own_options.box_fraction, device=image.device)
        if module.global_step < self.schedule.bcp_pretrain_steps or unlabeled is None:
            # pre-training: the pasted patch is the next labeled one, and its target is ground truth too
            other, other_label = image.roll(1, dims=0), label.roll(1, dims=0)[:, 0].long()
            mixed = bidirectional_copy_paste(image, label, other, other_label, box)
            weight = 1.0
        else:
            weak = unlabeled["weak"]
            with torch.no_grad():
                pseudo = self.keep_components(argmax_labels(module.teacher_probs(weak), dim=1, dtype=torch.long))
            mixed = bidirectional_copy_paste(image, label, weak, pseudo, box)
            weight = self.own_options.unlabeled_weight
        logits = main_output(module.student(mixed.image))
        loss = copy_paste_loss(logits, mixed, pseudo_weight=weight)
        return loss, {"loss/copy_paste": loss.detach(), "loss/total": loss.detach(), "ssl/weight": weight}

    def teacher_start_step(self) -> int:
        """Self-training starts from the pre-trained student (``ssl.bcp_pretrain_steps``, by default the warm-up)."""
        return self.schedule.bcp_pretrain_steps

    def keep_components(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` ``(B, *spatial)`` with each class cut to its ``ssl.bcp_keep_components`` largest components per patch."""
        keep = self.own_options.keep_components
        if not keep:
            return labels
        per_class = {c: int(k) for c, k in enumerate(keep, start=1)}
        return torch.stack([keep_largest_components(sample, per_class) for sample in labels])
