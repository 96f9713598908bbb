"""UA-MT: the mean teacher whose consistency is masked by the teacher's uncertainty.

Yu, Wang, Li, Fu & Heng, "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left
Atrium Segmentation", MICCAI 2019. The teacher predicts each weak view ``ssl.ua_mt_passes`` times
with clipped Gaussian input noise; voxels whose predictive entropy is below a threshold ramped from
``ssl.ua_mt_threshold_start · ln C`` to ``ln C`` over ``ssl.rampup_steps`` enter a softmax-MSE
consistency (:mod:`medeman.methods.uncertainty`).

Where medeman differs from the paper: the student sees the strong view (the paper feeds the
student the noisy image), the teacher is EMAN by default (its statistics stay fixed, so only the
input noise is stochastic; the paper's dropout is off in an EMAN teacher), and the threshold ramps
over ``ssl.rampup_steps`` instead of the whole run. ``ssl.consistency`` and pseudo-labels do not
apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

from medeman.methods.mean_teacher import MeanTeacher
from medeman.methods.options import option
from medeman.methods.registry import register_method
from medeman.methods.uncertainty import (
    predictive_entropy,
    stochastic_mean_probs,
    uncertainty_masked_mse,
    uncertainty_threshold,
)
from medeman.nets import main_output

if TYPE_CHECKING:
    from medeman.module import SSLSegModule


@dataclass(frozen=True)
class UAMTOptions:
    """UA-MT's own options, the config keys ``ssl.ua_mt_<field>``."""

    passes: int = option(
        8,
        "stochastic teacher passes T per unlabeled batch for the predictive entropy",
        rule=(lambda v: v >= 1, "at least 1 stochastic teacher pass"),
    )
    noise_std: float = option(
        0.1,
        "std of the Gaussian input noise of each teacher pass (normalized intensity units)",
        rule=(lambda v: v >= 0, "a non-negative standard deviation"),
    )
    noise_clip: float = option(
        0.2, "the input noise is clipped to [-clip, clip]", rule=(lambda v: v >= 0, "a non-negative clip")
    )
    threshold_start: float = option(
        0.75,
        "the entropy threshold ramps from this fraction of ln(num_classes) to ln(num_classes) over rampup_steps",
        rule=(lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]"),
    )


@register_method("ua_mt")
class UAMT(MeanTeacher):
    """Mean teacher + uncertainty-masked consistency (entropy of T noisy teacher passes)."""

    summary = "uncertainty-aware mean teacher, Yu et al. 2019"
    option_type = UAMTOptions
    own_options: UAMTOptions

    def unsupervised_loss(
        self, module: SSLSegModule, strong_logits: torch.Tensor, weak: torch.Tensor, logs: dict
    ) -> torch.Tensor:
        options = self.own_options
        teacher = self.teacher.network
        probs = stochastic_mean_probs(
            lambda x: main_output(teacher(x)),
            weak,
            passes=options.passes,
            noise_std=options.noise_std,
            noise_clip=options.noise_clip,
        )
        step = max(module.global_step - self.schedule.warmup_steps, 0)
        threshold = uncertainty_threshold(step, self.schedule.rampup_steps, module.num_classes, options.threshold_start)
        certain = predictive_entropy(probs) < threshold
        loss = uncertainty_masked_mse(strong_logits, probs, certain)
        logs["loss/consistency"] = loss.detach()
        logs["ssl/certain_fraction"] = certain.float().mean()
        logs["ssl/uncertainty_threshold"] = float(threshold)
        return loss
