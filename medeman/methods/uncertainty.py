"""Uncertainty-aware consistency of UA-MT: the teacher's predictive entropy masks the consistency loss.

Yu, Wang, Li, Fu & Heng, "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left
Atrium Segmentation", MICCAI 2019. The teacher predicts each unlabeled patch ``T`` times under
random perturbation (Gaussian input noise, and dropout where the network has it); the mean
softmax ``μ`` gives a per-voxel predictive entropy ``u = −Σ_c μ_c ln μ_c``. Only voxels with
``u < H(t)`` enter the consistency loss, where the threshold rises with the sigmoid ramp-up from
``0.75 ln C`` to ``ln C`` (the entropy of the uniform distribution), so training starts with the
teacher's most certain voxels and ends with nearly all of them.

With an EMAN teacher the statistics stay fixed (the teacher is always in eval mode) and only the
input noise is stochastic; dropout, when present, is then off as well.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medeman.losses import sigmoid_rampup


@torch.no_grad()
def stochastic_mean_probs(
    teacher: nn.Module,
    image: torch.Tensor,
    passes: int = 8,
    noise_std: float = 0.1,
    noise_clip: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean softmax of ``passes`` teacher predictions, each on ``image`` plus clipped Gaussian noise.

    The passes run as one batched forward of ``passes * B`` patches (EMAN and eval-mode teachers
    normalize every sample on its own, so batching does not couple the passes).

    Args:
        teacher: the teacher network.
        image: ``(B, C, X, Y, Z)`` weak views.
        passes: T, the number of stochastic passes (8 in the paper).
        noise_std: standard deviation of the input noise (0.1 in the paper).
        noise_clip: the noise is clipped to ``[-noise_clip, noise_clip]`` (0.2 in the paper).
        generator: torch generator for reproducible noise (on ``image``'s device).

    Returns:
        ``(B, C, X, Y, Z)`` float32 mean probabilities.
    """
    if passes < 1:
        raise ValueError(f"UA-MT needs at least one stochastic pass, got {passes}")
    batch = image.shape[0]
    repeated = image.repeat(passes, *([1] * (image.dim() - 1)))
    noise = torch.randn(repeated.shape, generator=generator, device=image.device, dtype=image.dtype)
    noisy = repeated + (noise * noise_std).clamp(-noise_clip, noise_clip)
    probs = torch.softmax(teacher(noisy).float(), dim=1)
    return probs.view(passes, batch, *probs.shape[1:]).mean(dim=0)


def predictive_entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-voxel entropy ``−Σ_c p_c ln(p_c + eps)`` over the class axis 1: ``(B, C, ...) -> (B, ...)``."""
    probs = probs.float()
    return -(probs * torch.log(probs + eps)).sum(dim=1)


def uncertainty_threshold(step: int, rampup_steps: int, num_classes: int, start: float = 0.75) -> float:
    """UA-MT's entropy threshold ``(start + (1 − start) · rampup(step)) · ln C``, ``rampup = exp(−5(1−t)²)``."""
    if num_classes < 2:
        raise ValueError(f"the entropy threshold needs at least 2 classes, got {num_classes}")
    return (start + (1.0 - start) * sigmoid_rampup(step, rampup_steps)) * math.log(num_classes)


def uncertainty_masked_mse(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, certain: torch.Tensor
) -> torch.Tensor:
    """Softmax MSE between student and teacher averaged over the certain voxels (and classes).

    Args:
        student_logits: ``(B, C, X, Y, Z)``.
        teacher_probs: ``(B, C, X, Y, Z)`` the teacher's mean probabilities.
        certain: bool ``(B, X, Y, Z)``, True where the teacher's entropy is below the threshold.

    Returns:
        ``Σ certain·(p_s − p_t)² / (C · Σ certain)``; 0 when no voxel is certain.
    """
    squared = (torch.softmax(student_logits.float(), dim=1) - teacher_probs.float()) ** 2
    kept = certain.unsqueeze(1).to(squared.dtype)
    return (squared * kept).sum() / (kept.sum() * squared.shape[1]).clamp_min(1.0)
