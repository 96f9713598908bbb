r"""MONAI transform chains built from the ``data:`` section of the config.

:func:`preprocessing` is the deterministic part shared by training, validation and inference
(load, channel-first, RAS orientation, resampling (:class:`~medeman.data.spacing.SeparableSpacingd`,
MONAI's ``Spacingd`` in three 1D passes), intensity normalization); it is invertible with
``monai.transforms.Invertd`` so predictions go back to each scan's own geometry.

The training chains add a foreground crop and padding to the patch size (still deterministic, so
``CacheDataset``/``PersistentDataset`` cache everything up to there), then random patches:
:func:`labeled_transforms` samples them class-aware (:class:`~medeman.data.sampling.RandClassCropd`,
the nnU-Net rule, from class locations cached with the volume); :func:`unlabeled_transforms`
takes a random crop (or one centred where the teacher sees a rare class), applies the spatial
augmentation once and only then copies it into a ``weak`` (teacher) and a ``strong`` (student)
view, so both views hold the same voxels and only the strong view's intensities are perturbed.
Both are :class:`PatchChain`\ s: their random part runs with MONAI's meta-data tracking off.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Sequence

import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    ClassesToIndicesd,
    CopyItemsd,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCoarseDropoutd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    Randomizable,
    RandSpatialCropd,
    ScaleIntensityRanged,
    SelectItemsd,
    SpatialPadd,
)

from medeman.data.readers import VolumeReader
from medeman.data.spacing import SeparableSpacingd
from medeman.data.sampling import MAX_LOCATIONS_PER_CLASS, FocusCentres, RandClassCropd, RandFocusCropd
from medeman.typed_config import Config, as_config


class PatchChain(Compose):
    """A training chain whose random part (patch sampling, augmentation) runs without MONAI meta-data.

    Training patches are never inverted, yet MONAI's transforms keep MetaTensor bookkeeping for
    them (affine updates, transform history, deep-copied meta dicts): half the loader's CPU time
    per step (7.2 -> 3.2 ms for the sample recipe's four 32^3 patches), time the loader worker takes
    from the training process's core. From the first random transform on, this chain switches
    tracking off (:func:`monai.data.set_track_meta`) and restores the caller's setting after, so
    the random transforms draw the same numbers and give the same voxels as plain tensors. The
    deterministic part (loading, reorienting, resampling: these need the meta-data) runs as
    usual, whether a cache dataset runs it apart (``end=``/``start=``, as MONAI's cache datasets
    do) or it runs with the rest.
    """

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        stop = len(self.transforms) if end is None else end
        first_random = self.get_index_of_first(lambda t: isinstance(t, Randomizable))
        if first_random is None or stop <= first_random:
            return super().__call__(input_, start, end, threading, lazy)
        if start < first_random:
            input_ = super().__call__(input_, start, first_random, threading, lazy)
            start = first_random
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, start, end, threading, lazy)
        finally:
            set_track_meta(tracking)


def preprocessing(cfg: Config | dict[str, Any], keys: Sequence[str] = ("image", "label")) -> Compose:
    """Load and normalize ``keys`` of a case dict: RAS, target spacing, modality-specific intensity.

    Args:
        cfg: resolved medeman config; uses ``data.spacing``, ``data.modality`` and
            ``data.intensity_window``.
        keys: ``"image"`` and optionally ``"label"`` (labels are resampled with nearest neighbour).

    Returns:
        A ``Compose`` whose output tensors are MetaTensors carrying their transform history.
    """
    data = as_config(cfg).data
    keys = list(keys)
    modes = _modes(keys)
    chain: list = [
        load_images(keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if data.spacing is not None:
        chain.append(SeparableSpacingd(keys=keys, pixdim=[float(s) for s in data.spacing], mode=modes))
    if data.modality == "CT":
        low, high = (float(v) for v in data.intensity_window)  # list items are not converted by the schema
        chain.append(ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    else:
        chain.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    chain.append(EnsureTyped(keys="image", dtype="float32", track_meta=True))
    return Compose(chain)


def load_images(keys: Sequence[str]) -> LoadImaged:
    """``LoadImaged`` with medeman's :class:`VolumeReader`.

    ``LoadImaged`` also builds every default reader MONAI knows; with pydicom installed (the
    ``deploy`` extra) its nvImageCodec DICOM reader warns on each build that the GPU decoder plugin
    is missing (a warning and a log line), about a reader medeman never uses.
    """
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            return LoadImaged(keys=list(keys), reader=VolumeReader(), image_only=True)
    finally:
        plugin_log.setLevel(level)


def _modes(keys: Sequence[str], label_mode: str = "nearest", image_mode: str = "bilinear") -> list[str]:
    return [label_mode if key == "label" else image_mode for key in keys]


def _patch(cfg: Config) -> list[int]:
    return [int(s) for s in cfg.data.patch_size]


def is_foreground(image: torch.Tensor) -> torch.Tensor:
    """Body voxels: after normalization air is exactly 0 (CT below the window, MR outside the foreground)."""
    return image != 0


def _cropped_and_padded(cfg: Config, keys: Sequence[str]) -> list:
    keys = list(keys)
    return [
        *preprocessing(cfg, keys).transforms,
        CropForegroundd(keys=keys, source_key="image", select_fn=is_foreground, allow_smaller=True),
        SpatialPadd(keys=keys, spatial_size=_patch(cfg)),
        # training patches are never inverted: plain tensors from here (and in the cache) halve the
        # CPU cost of the random transforms that follow, which runs every step in the loader workers
        EnsureTyped(keys=keys, track_meta=False),
    ]


def spatial_augmentation(cfg: Config | dict[str, Any], keys: Sequence[str]) -> list:
    """Random flips, axial 90-degree rotations and a small affine, identical for every key of a sample.

    The rotation is left out when the patch is not square in-plane (it would change the patch shape).
    """
    cfg = as_config(cfg)
    data, keys = cfg.data, list(keys)
    chain: list = [RandFlipd(keys=keys, prob=data.flip_prob, spatial_axis=axis) for axis in range(3)]
    patch = _patch(cfg)
    if data.rotate90_prob > 0 and patch[0] == patch[1]:
        chain.append(RandRotate90d(keys=keys, prob=data.rotate90_prob, spatial_axes=(0, 1)))
    if data.affine_prob > 0:
        chain.append(
            RandAffined(
                keys=keys,
                prob=data.affine_prob,
                rotate_range=(0.15, 0.15, 0.15),
                scale_range=(0.1, 0.1, 0.1),
                mode=_modes(keys),
                padding_mode="zeros",
            )
        )
    return chain


def nnunet_augmentation(cfg: Config | dict[str, Any], keys: Sequence[str] = ("image", "label")) -> list:
    """nnU-Net's default augmentation of a labeled patch (Isensee et al., Nature Methods 2021), as MONAI transforms.

    Spatial, identical for image and label (nearest for the label): rotation by up to 30 degrees
    about each axis and scaling by 0.7-1.4 (each with probability 0.2, as one affine), mirroring
    along each axis (``data.flip_prob``). Intensity, image only, with nnU-Net's probabilities:
    Gaussian noise (0.1), blur (0.2), brightness x0.75-1.25 (0.15), contrast x0.75-1.25 about the
    mean (0.15), simulated low resolution (0.25), gamma 0.7-1.5 (0.3). The patch keeps its size
    (rotated-in corners are zero, the air value).
    """
    flip_prob = as_config(cfg).data.flip_prob
    keys = list(keys)
    image = keys[0]
    rotation = 30.0 * math.pi / 180.0
    return [
        RandAffined(
            keys=keys,
            prob=0.36,
            rotate_range=(rotation,) * 3,
            scale_range=((-0.3, 0.4),) * 3,
            mode=_modes(keys),
            padding_mode="zeros",
        ),  # 1 - 0.8^2: rotation or scaling, each p=0.2
        *[RandFlipd(keys=keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)],
        RandGaussianNoised(keys=image, prob=0.1, mean=0.0, std=0.1),
        RandGaussianSmoothd(keys=image, prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd(keys=image, prob=0.15, factors=0.25),
        RandScaleIntensityFixedMeand(keys=image, prob=0.15, factors=0.25, preserve_range=True),
        RandSimulateLowResolutiond(keys=image, prob=0.25, zoom_range=(0.5, 1.0)),
        RandAdjustContrastd(keys=image, prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
    ]


def strong_augmentation(cfg: Config | dict[str, Any], key: str = "strong") -> list:
    """Intensity perturbations of the student's view: contrast (gamma), brightness, blur, noise, cut-out."""
    cfg = as_config(cfg)
    data = cfg.data
    p = data.strong_prob
    sigma = tuple(float(s) for s in data.strong_blur_sigma)  # a range of two numbers (ints allowed): as floats
    chain: list = [
        RandAdjustContrastd(keys=key, prob=p, gamma=tuple(float(g) for g in data.strong_contrast)),
        RandShiftIntensityd(keys=key, prob=p, offsets=data.strong_brightness),
        RandGaussianSmoothd(keys=key, prob=p, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma),
        RandGaussianNoised(keys=key, prob=p, mean=0.0, std=data.strong_noise_std),
    ]
    if data.strong_cutout:
        hole = [max(1, s // 6) for s in _patch(cfg)]
        chain.append(RandCoarseDropoutd(keys=key, prob=p, holes=4, spatial_size=hole, fill_value=0.0))
    return chain


def labeled_transforms(cfg: Config | dict[str, Any]) -> PatchChain:
    """Labeled training chain: preprocessing, foreground crop, padding, class locations (all cached),
    then one class-aware patch (:class:`~medeman.data.sampling.RandClassCropd`) with augmentation
    (``data.labeled_augmentation``: :func:`nnunet_augmentation` or :func:`spatial_augmentation`).

    ``data.class_ratios`` null: ``data.fg_class_fraction`` of the patches are centred on a foreground
    class drawn uniformly among those present in the scan, the rest are random (nnU-Net); a list:
    per-class ratios as MONAI ``RandCropByLabelClassesd``.

    Output (a one-element list, as MONAI's patch samplers return; collate with
    ``monai.data.list_data_collate``): ``{"image": float32 (C, *patch), "label": float32 (1, *patch)}``.
    """
    cfg = as_config(cfg)
    data = cfg.data
    keys = ["image", "label"]
    num_classes = data.num_classes
    return PatchChain(
        [
            *_cropped_and_padded(cfg, keys),
            # deterministic, so CacheDataset/PersistentDataset keep the class locations with the volume
            ClassesToIndicesd(
                keys="label",
                indices_postfix="_cls_indices",
                num_classes=num_classes,
                max_samples_per_class=MAX_LOCATIONS_PER_CLASS,
            ),
            RandClassCropd(
                keys=keys,
                spatial_size=_patch(cfg),
                num_classes=num_classes,
                fg_fraction=data.fg_class_fraction,
                ratios=None if data.class_ratios is None else list(data.class_ratios),
                label_key="label",
                indices_key="label_cls_indices",
            ),
            *(
                nnunet_augmentation(cfg, keys)
                if data.labeled_augmentation == "nnunet"
                else spatial_augmentation(cfg, keys)
            ),
            SelectItemsd(keys=keys),
            EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
        ]
    )


def unlabeled_transforms(
    cfg: Config | dict[str, Any], focus: FocusCentres | None = None, views: Sequence[str] = ("weak", "strong")
) -> PatchChain:
    """Unlabeled training chain: preprocessing, foreground crop, padding, a random patch, spatial
    augmentation, then two views of the same voxels.

    With ``focus`` (and ``data.unlabeled_focus_fraction`` > 0) that share of patches is centred on
    the teacher's rare-class voxels (:class:`~medeman.data.sampling.RandFocusCropd`); the case dicts
    must then carry their row in ``focus`` as ``"case_index"``.

    Args:
        views: the views the method trains on (``Method.unlabeled_views``): ``("weak", "strong")``,
            or ``("weak",)`` to skip the strong view's copy and intensity augmentation (BCP).

    Output: ``{"weak": float32 (C, *patch), "strong": float32 (C, *patch)}`` (``strong`` only when
    asked for); ``strong`` is ``weak`` after :func:`strong_augmentation`.
    """
    views = list(views)
    if views not in (["weak", "strong"], ["weak"]):
        raise ValueError(f"unlabeled views {views}: medeman makes ('weak', 'strong') or ('weak',)")
    cfg = as_config(cfg)
    fraction = cfg.data.unlabeled_focus_fraction
    if focus is not None and fraction > 0:
        crop = RandFocusCropd(
            keys="image", spatial_size=_patch(cfg), focus=focus, fraction=fraction, index_key="case_index"
        )
    else:
        crop = RandSpatialCropd(keys="image", roi_size=_patch(cfg), random_size=False)
    return PatchChain(
        [
            *_cropped_and_padded(cfg, ["image"]),
            crop,
            *spatial_augmentation(cfg, ["image"]),
            CopyItemsd(keys="image", times=len(views), names=views),
            *(strong_augmentation(cfg, "strong") if "strong" in views else []),
            SelectItemsd(keys=views),
            EnsureTyped(keys=views, dtype=torch.float32, track_meta=False),
        ]
    )


def validation_transforms(cfg: Config | dict[str, Any], keys: Sequence[str] = ("image", "label")) -> Compose:
    """Whole preprocessed volumes for validation, padded to at least the patch size (MetaTensors)."""
    cfg = as_config(cfg)
    keys = list(keys)
    return Compose([*preprocessing(cfg, keys).transforms, SpatialPadd(keys=keys, spatial_size=_patch(cfg))])
