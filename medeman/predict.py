"""Prediction for one preprocessed volume: Gaussian-blended sliding windows, test-time mirroring,
and the way back to the scan's own voxel grid.

Used by validation during training (:mod:`medeman.module`) and by ``medeman infer``
(:mod:`medeman.infer`, which adds file I/O and the command line), so the validated network is
scored exactly as it will be deployed.

Typical use::

    probs = predict_volume(net, image, cfg, tta=False)      # (C, X, Y, Z) on the preprocessed grid
    probs = invert_to_input(probs, image, transform)         # (C, x, y, z) on the scan's grid
"""

from __future__ import annotations

import contextlib
import warnings
from itertools import combinations

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd
from torch import nn

# Test-time augmentation mirrors each patch along every combination of the three spatial axes
# (identity, 3 single, 3 pairs, all three: 8 passes, as nnU-Net) and averages the softmax.
TTA_FLIPS: tuple[tuple[int, ...], ...] = tuple(c for n in range(4) for c in combinations((2, 3, 4), n))


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
    cfg: dict,
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
    infer = cfg["infer"]
    sw_batch_size = int(infer["sw_batch_size"] if sw_batch_size is None else sw_batch_size)
    overlap = float(infer["overlap"] if overlap is None else overlap)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    dtype = autocast_dtype(infer["precision"] if precision is None else precision, device)
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
            x, roi_size=[int(s) for s in cfg["data"]["patch_size"]], sw_batch_size=sw_batch_size,
            predictor=predictor, overlap=overlap, mode="gaussian", sw_device=device, device=device,
        )
    probs = probs.as_tensor() if isinstance(probs, MetaTensor) else probs
    return probs[0].float()


def invert_to_input(probs: torch.Tensor, image: MetaTensor, transform) -> torch.Tensor:
    """Map ``(C, X, Y, Z)`` probabilities on the preprocessed grid back to the scan's voxel grid.

    ``Invertd`` undoes resampling (linearly, so the argmax afterwards is a smooth boundary) and
    reorientation using ``image``'s transform history.
    """
    data = {"image": image, "pred": MetaTensor(probs.detach().cpu(), affine=image.affine)}
    inverter = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False, to_tensor=True)
    out = inverter(data)["pred"]
    return out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
