"""``Spacingd`` whose trilinear resampling runs as three 1D passes on axis-aligned grids.

MONAI's ``Spacingd`` resamples through a full 3D sampling grid (``affine_grid`` in float64, then
``grid_sample``): on a 160^3 CT about 0.1 s of one core, a sixth of the network's sliding-window
time for a small UNet. After ``Orientationd`` the target grid of ``Spacingd`` keeps the scan's
direction cosines and only changes the voxel size, so each target axis samples one source axis:
the same trilinear, border-padded values come from three 1D linear interpolations
(:mod:`medeman.resample`) in about a third of the time.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd

from medeman.resample import axis_maps, order_axes, resample_separable


class SeparableSpacingd(Spacingd):
    """``monai.transforms.Spacingd`` with separable trilinear resampling where it gives the same result.

    Keys in ``bilinear`` mode with ``border`` padding and ``align_corners=False`` (Spacingd's
    defaults) whose source and target grids are axis-aligned are resampled axis by axis; the
    output matches ``Spacingd``'s to float32 rounding (the 1D weights are exact, MONAI's 3D grid
    is built in float64 then sampled in float32), with the same affine, shape and transform
    history, so ``Invertd`` undoes it as it undoes ``Spacingd``. Any other key, lazy use, or a grid
    that is not axis-aligned goes through ``Spacingd`` unchanged.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        if self.lazy if lazy is None else lazy:
            return super().__call__(data, lazy)
        planned = super().__call__(data, lazy=True)  # target affine and shape, pending, nothing resampled
        out = dict(planned)
        for key, mode, padding_mode, align_corners in self.key_iterator(
            planned, self.mode, self.padding_mode, self.align_corners
        ):
            resampled = _separable(planned[key], mode, padding_mode, align_corners)
            if resampled is None:
                return super().__call__(data, lazy=False)
            out[key] = resampled
        return out


def _separable(image: torch.Tensor, mode, padding_mode, align_corners) -> MetaTensor | None:
    """Carry out ``image``'s one pending ``Spacing`` separably; ``None`` when that would not be exact."""
    if not isinstance(image, MetaTensor) or image.ndim != 4 or len(image.pending_operations) != 1:
        return None
    if str(mode) != "bilinear" or str(padding_mode) != "border" or align_corners not in (False, None):
        return None
    target_affine, target_shape = image.peek_pending_affine(), [int(n) for n in image.peek_pending_shape()]
    axes = axis_maps(image.affine, image.shape[1:], target_affine, target_shape, image.device)
    if axes is None:
        return None
    values = resample_separable(image.as_tensor().to(torch.float32), order_axes(axes), axes).contiguous()
    result = MetaTensor(values, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    result.affine = torch.as_tensor(target_affine, dtype=torch.float64)
    for operation in image.pending_operations:
        result.push_applied_operation(operation)
    return result
