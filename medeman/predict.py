"""Prediction for one preprocessed volume: Gaussian-blended sliding windows, test-time mirroring,
and the way back to the scan's own voxel grid.

Used by validation during training (:mod:`medeman.module`) and by ``medeman infer``
(:mod:`medeman.infer`, which adds file I/O and the command line), so the validated network is
scored exactly as it will be deployed.

Typical use::

    probs = predict_volume(net, image, cfg, tta=False)      # (C, X, Y, Z) on the preprocessed grid
    labels = labels_on_input(probs, image, transform)        # (x, y, z) uint8 class map on the scan's grid
    probs = invert_to_input(probs, image, transform)         # (C, x, y, z) probabilities there
"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd
from torch import nn

from medeman.labels import argmax_labels
from medeman.resample import Axis, axis_maps, lerp_axis, order_axes, resample_separable
from medeman.typed_config import Config, as_config

# Test-time augmentation mirrors each patch along every combination of the three spatial axes
# (identity, 3 single, 3 pairs, all three: 8 passes, as nnU-Net) and averages the softmax.
TTA_FLIPS: tuple[tuple[int, ...], ...] = tuple(c for n in range(4) for c in itertools.combinations((2, 3, 4), n))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: bfloat16 where supported, else None (float32)."""
    if str(precision) != "bf16":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn(f"bf16 is not supported on {torch.cuda.get_device_name(device)}; inferring in float32")
        return None
    if device.type not in ("cuda", "cpu"):
        warnings.warn(f"bf16 autocast is not supported on {device.type}; inferring in float32")
        return None
    return torch.bfloat16


def predict_volume(
    net: nn.Module,
    image: torch.Tensor,
    cfg: Config | dict,
    tta: bool = False,
    *,
    sw_batch_size: int | None = None,
    overlap: float | None = None,
    precision: str | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Softmax probabilities of one preprocessed image by Gaussian-blended sliding windows.

    Args:
        net: the network in eval mode (its parameters' device is used unless ``device`` is given).
        image: ``(in_channels, X, Y, Z)``, preprocessed; a MetaTensor's metadata is ignored.
        cfg: the model's config: ``data.patch_size`` is the window, ``infer.*`` the defaults of the
            keyword arguments.
        tta: average the softmax over the 8 mirrorings in :data:`TTA_FLIPS`.
        precision: ``"bf16"`` runs the network under autocast where supported; the blending and
            the returned probabilities are float32 either way.

    Returns:
        ``(num_classes, X, Y, Z)`` float32 probabilities on ``device``.
    """
    cfg = as_config(cfg)
    infer = cfg.infer
    sw_batch_size = int(infer.sw_batch_size if sw_batch_size is None else sw_batch_size)
    overlap = float(infer.overlap if overlap is None else overlap)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    dtype = autocast_dtype(infer.precision if precision is None else precision, device)
    flips = TTA_FLIPS if tta else ((),)

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=patch.device)
        for dims in flips:
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                logits = net(patch.flip(dims) if dims else patch)
            probs = torch.softmax(logits.float(), dim=1)
            total = total + (probs.flip(dims) if dims else probs)
        return total / len(flips)

    x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    x = x.to(device=device, dtype=torch.float32)[None]
    with torch.inference_mode():
        probs = sliding_window_inference(
            x,
            roi_size=[int(s) for s in cfg.data.patch_size],
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
            sw_device=device,
            device=device,
        )
    probs = probs.as_tensor() if isinstance(probs, MetaTensor) else probs
    return probs[0].float()


def invert_to_input(probs: torch.Tensor, image: MetaTensor, transform) -> torch.Tensor:
    """Map ``(C, X, Y, Z)`` probabilities on the preprocessed grid back to the scan's voxel grid.

    The same trilinear resampling (border values beyond the edge) and reorientation that MONAI
    ``Invertd`` applies from ``image``'s transform history, done on ``probs``' device. When the
    preprocessed grid is axis-aligned with the scan's (always with medeman's preprocessing:
    ``Orientationd`` permutes and flips axes, ``Spacingd`` keeps the direction cosines and scales
    them) the trilinear interpolation is separable: three 1D linear interpolations, one per axis,
    a fraction of the cost of a 3D grid; identity axes are skipped. Other grids go through
    ``Invertd``.

    Returns:
        ``(C, x, y, z)`` float32 probabilities on the scan's grid, on ``probs``' device.
    """
    axes = scan_axes(image, probs.device)
    if axes is None:
        return _invertd(probs, image, transform)
    # one channel at a time bounds the memory to about two scan-sized float volumes
    return torch.cat([resample_separable(probs[c : c + 1], order_axes(axes), axes) for c in range(probs.shape[0])])


def labels_on_input(
    probs: torch.Tensor, image: MetaTensor, transform, dtype: torch.dtype = torch.uint8
) -> torch.Tensor:
    """The class map on the scan's grid: the argmax of :func:`invert_to_input`'s probabilities, faster.

    Interpolation is linear, so the argmax of the resampled probabilities is the argmax of
    ``[0, p_1 - p_0, ..., p_{C-1} - p_0]`` resampled: one channel fewer to resample. The last axis
    is resampled one channel at a time straight into the running maximum, so no ``(C, x, y, z)``
    float volume on the scan's grid is ever made. Only rounding can tell the two apart, on voxels
    where two classes tie to about 1e-7.

    Args:
        probs: ``(C, X, Y, Z)`` probabilities on the preprocessed grid.
        image: the preprocessed image (its metadata holds both grids).
        transform: the preprocessing ``Compose``, used only when the grids are not axis-aligned.
        dtype: integer dtype of the labels (ties go to the lower class, as with ``argmax_labels``).
    """
    axes = scan_axes(image, probs.device)
    if axes is None:
        return argmax_labels(invert_to_input(probs, image, transform), dim=0, dtype=dtype)
    *first, last = order_axes(axes) or [None]
    best = labels = None
    for c in range(1, probs.shape[0]):
        score = resample_separable(probs[c : c + 1] - probs[:1], first, permute=None)
        if last is not None:
            score = lerp_axis(score, last)
        score = score[0].permute(*(a.source for a in axes))
        if c == 1:  # class 1 against class 0 (score 0): ties stay 0
            labels = (score > 0).to(dtype)
            best = score.clamp_(min=0) if probs.shape[0] > 2 else None
            continue
        better = score > best
        labels.masked_fill_(better, c)
        torch.maximum(best, score, out=best)
    if labels is None:  # one class
        labels = torch.zeros([int(a.lo.numel()) for a in axes], dtype=dtype, device=probs.device)
    return labels


def scan_axes(image: MetaTensor, device: torch.device | str = "cpu", atol: float = 1e-3) -> list[Axis] | None:
    """Per scan axis, where it samples the preprocessed grid; None when the grids are not axis-aligned.

    The map from scan voxel to preprocessed voxel is ``inv(A_pre) @ A_scan`` (both voxel-centre
    affines, from ``image.affine`` and the ``original_affine``/``spatial_shape`` that
    ``LoadImaged`` recorded); see :func:`medeman.resample.axis_maps`.
    """
    meta = getattr(image, "meta", {})
    if "original_affine" not in meta or "spatial_shape" not in meta:
        return None
    shape = [int(n) for n in np.asarray(meta["spatial_shape"]).ravel()[:3]]
    return axis_maps(image.affine, image.shape[1:4], meta["original_affine"], shape, device, atol)


def _invertd(probs: torch.Tensor, image: MetaTensor, transform) -> torch.Tensor:
    """MONAI ``Invertd`` on the CPU: undoes resampling (trilinear) and reorientation from ``image``'s history."""
    data = {"image": image, "pred": MetaTensor(probs.detach().cpu(), affine=image.affine)}
    inverter = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False, to_tensor=True)
    out = inverter(data)["pred"]
    out = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
    return out.to(probs.device)
