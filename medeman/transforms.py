"""MONAI transform chains built from the ``data:`` section of the config.

:func:`preprocessing` is the deterministic part shared by training, validation and inference
(load, channel-first, RAS orientation, resampling, intensity normalization); it is invertible with
``monai.transforms.Invertd`` so predictions go back to each scan's own geometry.
"""

from __future__ import annotations

from typing import Any, Sequence

from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)


def preprocessing(cfg: dict[str, Any], keys: Sequence[str] = ("image", "label")) -> Compose:
    """Load and normalize ``keys`` of a case dict: RAS, target spacing, modality-specific intensity.

    Args:
        cfg: resolved medeman config; uses ``data.spacing``, ``data.modality`` and
            ``data.intensity_window``.
        keys: ``"image"`` and optionally ``"label"`` (labels are resampled with nearest neighbour).

    Returns:
        A ``Compose`` whose output tensors are MetaTensors carrying their transform history.
    """
    data = cfg["data"]
    keys = list(keys)
    modes = ["nearest" if key == "label" else "bilinear" for key in keys]
    chain: list = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if data["spacing"] is not None:
        chain.append(Spacingd(keys=keys, pixdim=[float(s) for s in data["spacing"]], mode=modes))
    if data["modality"] == "CT":
        low, high = (float(v) for v in data["intensity_window"])
        chain.append(ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    else:
        chain.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    chain.append(EnsureTyped(keys="image", dtype="float32", track_meta=True))
    return Compose(chain)
