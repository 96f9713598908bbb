"""Where training patches are centred: class-aware crops of labeled scans, teacher-focused crops of unlabeled ones.

A structure that covers 0.1 % of a scan is almost never inside a random patch, and with
``RandCropByPosNegLabeld`` every label counts as foreground, so a patch centred on a large organ
counts as "positive" and a lesion is still rarely seen. nnU-Net (Isensee et al., Nature Methods
2021) fixes the labeled half: a fixed share of patches is centred on a voxel of a foreground class
chosen uniformly among the classes *present in the scan*, the rest are random. :class:`RandClassCropd`
does that from class locations cached with the preprocessed volume (MONAI ``ClassesToIndicesd`` in
the deterministic part of the chain), so a draw is a few random numbers and one crop, never a pass
over the voxels.

:class:`RandFocusCropd` does the same for unlabeled scans, where the "labels" are the teacher's:
:class:`FocusCentres` holds crop centres on the voxels the teacher assigns to rare classes, refreshed
every N steps by :class:`medeman.teacher_focus.TeacherFocus` in shared memory, so persistent loader
workers see each refresh without being restarted.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, SpatialCrop
from monai.transforms.utils import generate_label_classes_crop_centers

# Class locations kept per class and scan: nnU-Net keeps 10,000 per class too; a larger class is
# subsampled evenly in raster order, so its centres stay spread over the whole structure.
MAX_LOCATIONS_PER_CLASS = 10_000


def _random_window_centre(rand: np.random.RandomState, shape: Sequence[int], roi: Sequence[int]) -> list[int]:
    """Centre of a window whose start is uniform over the valid starts (as ``RandSpatialCrop``)."""
    starts = [rand.randint(0, max(s - r, 0) + 1) for s, r in zip(shape, roi)]
    return [start + min(r, s) // 2 for start, r, s in zip(starts, roi, shape)]


def _crop(d: dict, keys: Sequence[Hashable], centre: Sequence[int], roi: Sequence[int]) -> dict:
    cropper = SpatialCrop(roi_center=[int(c) for c in centre], roi_size=list(roi))
    for key in keys:
        d[key] = cropper(d[key])
    return d


class RandClassCropd(Randomizable, MapTransform):
    """One patch per sample, centred on a foreground class present in the scan with a fixed probability.

    Two rules:

    - ``ratios=None`` (the nnU-Net rule): with probability ``fg_fraction`` the centre is a random
      voxel of a foreground class drawn uniformly among the classes present in the scan; otherwise
      (and for scans without any foreground) the patch is a uniformly random window.
    - ``ratios=[r_0, ..., r_{C-1}]`` (MONAI ``RandCropByLabelClassesd``): the centre's class is drawn
      with these ratios, background included. Absent classes get ratio 0 and the rest are
      renormalized, as MONAI does (silently here); when no class with a positive ratio is present
      the patch is random instead of MONAI's division by zero.

    Expects the class locations from ``ClassesToIndicesd(keys=label_key, num_classes=C)`` under
    ``indices_key``; the class of every centre is exact, the centre is shifted inward only where
    the patch would leave the volume (MONAI's ``correct_crop_centers``). Returns a one-element list,
    like MONAI's patch samplers.

    Args:
        keys: keys to crop (image and label).
        spatial_size: patch size.
        num_classes: classes including background.
        fg_fraction: share of class-centred patches under the nnU-Net rule.
        ratios: per-class ratios (length ``num_classes``) or ``None``.
        label_key: the label, whose spatial shape the locations index.
        indices_key: the cached class locations.

    Examples:
        >>> chain = Compose([ClassesToIndicesd("label", num_classes=3, max_samples_per_class=10_000),
        ...                  RandClassCropd(["image", "label"], (32, 32, 32), num_classes=3)])
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int],
        num_classes: int,
        fg_fraction: float = 0.33,
        ratios: Sequence[float] | None = None,
        label_key: str = "label",
        indices_key: str = "label_cls_indices",
    ) -> None:
        MapTransform.__init__(self, keys)
        if ratios is not None:
            if len(ratios) != num_classes or any(float(r) < 0 for r in ratios):
                raise ValueError(
                    f"class ratios {list(ratios)!r} must be {num_classes} non-negative numbers (background first)"
                )
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction {fg_fraction!r} must lie in [0, 1]")
        self.spatial_size = [int(s) for s in spatial_size]
        self.num_classes = int(num_classes)
        self.fg_fraction = float(fg_fraction)
        self.ratios = None if ratios is None else [float(r) for r in ratios]
        self.label_key, self.indices_key = label_key, indices_key

    def class_ratios(self, indices: Sequence[Any]) -> list[float] | None:
        """Draw this sample's class ratios: ``None`` for a random window, else ratios over present classes."""
        present = [len(idx) > 0 for idx in indices]
        if self.ratios is None:
            if self.R.rand() >= self.fg_fraction or not any(present[1:]):
                return None
            return [0.0] + [1.0 if p else 0.0 for p in present[1:]]
        ratios = [r if p else 0.0 for r, p in zip(self.ratios, present)]
        return ratios if sum(ratios) > 0 else None

    def randomize(self, indices: Sequence[Any], shape: Sequence[int]) -> list[int]:  # type: ignore[override]
        ratios = self.class_ratios(indices)
        if ratios is None:
            return _random_window_centre(self.R, shape, self.spatial_size)
        (centre,) = generate_label_classes_crop_centers(
            self.spatial_size, 1, shape, indices, ratios, rand_state=self.R, allow_smaller=True, warn=False
        )
        return [int(c) for c in centre]

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict]:  # type: ignore[override]
        d = dict(data)
        indices = d.pop(self.indices_key)
        if len(indices) != self.num_classes:
            raise ValueError(f"{self.indices_key}: locations of {len(indices)} classes, expected {self.num_classes}")
        centre = self.randomize(indices, d[self.label_key].shape[1:])
        return [_crop(d, list(self.key_iterator(d)), centre, self.spatial_size)]


class FocusCentres:
    """Crop centres per unlabeled scan, in shared memory: written by the trainer, read by loader workers.

    ``centres[i, :counts[i]]`` are voxel coordinates (in the cached, cropped-and-padded volume of
    scan ``i``) on which the teacher last predicted a rare class; ``counts[i] == 0`` means none yet.
    Both tensors are allocated once in shared memory before the workers start, and refreshed in place.

    Args:
        num_cases: unlabeled scans.
        capacity: centres kept per scan.
    """

    def __init__(self, num_cases: int, capacity: int = 256) -> None:
        self.capacity = int(capacity)
        self.centres = torch.zeros((num_cases, self.capacity, 3), dtype=torch.int32).share_memory_()
        self.counts = torch.zeros(num_cases, dtype=torch.int32).share_memory_()

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    def set(self, case: int, centres: torch.Tensor | np.ndarray) -> None:
        """Replace scan ``case``'s centres by (at most ``capacity``) rows of an ``(N, 3)`` array."""
        centres = torch.as_tensor(centres, dtype=torch.int32).reshape(-1, 3)[: self.capacity]
        self.counts[case] = 0  # a worker reading mid-update sees "no centres", never a half-written row
        self.centres[case, : len(centres)] = centres
        self.counts[case] = len(centres)

    def draw(self, case: int, rand: np.random.RandomState) -> list[int] | None:
        """One stored centre of scan ``case``, uniformly, or ``None`` when it has none."""
        count = int(self.counts[case])
        if count == 0:
            return None
        return self.centres[case, rand.randint(count)].tolist()


class RandFocusCropd(Randomizable, MapTransform):
    """A random patch of an unlabeled scan, centred with probability ``fraction`` on a teacher focus centre.

    Without stored centres for the scan (before the first refresh, or when the teacher predicts no
    rare class in it) the patch is a uniformly random window, as ``RandSpatialCropd``.

    Args:
        keys: keys to crop.
        spatial_size: patch size.
        focus: the shared centres.
        fraction: share of focused patches.
        index_key: the key holding the scan's row in ``focus``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int],
        focus: FocusCentres,
        fraction: float,
        index_key: str = "case_index",
    ) -> None:
        MapTransform.__init__(self, keys)
        self.spatial_size = [int(s) for s in spatial_size]
        self.focus, self.fraction, self.index_key = focus, float(fraction), index_key

    def randomize(self, case: int, shape: Sequence[int]) -> list[int]:  # type: ignore[override]
        focused = self.R.rand() < self.fraction
        centre = self.focus.draw(case, self.R) if focused else None
        if centre is None:
            return _random_window_centre(self.R, shape, self.spatial_size)
        # the stored centre is exact; shift inward only where the patch would leave the volume
        low = [min(r, s) // 2 for r, s in zip(self.spatial_size, shape)]
        high = [s - (min(r, s) - min(r, s) // 2) for r, s in zip(self.spatial_size, shape)]
        return [min(max(c, lo), hi) for c, lo, hi in zip(centre, low, high)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:  # type: ignore[override]
        d = dict(data)
        keys = list(self.key_iterator(d))
        centre = self.randomize(int(d[self.index_key]), d[keys[0]].shape[1:])
        return _crop(d, keys, centre, self.spatial_size)
