"""Separable trilinear resampling between two axis-aligned voxel grids.

When every axis of one grid runs along one axis of the other (medeman's preprocessing only
permutes, flips and rescales axes: ``Orientationd`` then ``Spacingd``, which keeps the direction
cosines), MONAI's 3D ``grid_sample`` resampling, trilinear with border padding, is the product of
three 1D linear interpolations: one pass per axis, a fraction of the cost of building and sampling
a full 3D grid, and identity axes are skipped. Used to go from the scan to the model grid
(:class:`medeman.data.spacing.SeparableSpacingd`) and back (:func:`medeman.predict.labels_on_input`).

Typical use::

    axes = axis_maps(source_affine, source_shape, target_affine, target_shape)   # None: not axis-aligned
    out = resample_separable(volume, order_axes(axes), permute=axes)             # (C, *target_shape)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Axis:
    """How one target axis samples the source grid: ``lerp(source[lo], source[hi], weight)``."""

    source: int  # the source axis it runs along
    lo: torch.Tensor  # (n,) lower neighbour per target index
    hi: torch.Tensor  # (n,) upper neighbour (== lo at the last voxel)
    weight: torch.Tensor  # (n,) float32 weight of ``hi``, in [0, 1)
    gather_only: bool  # every weight is 0 (a flip, a crop): no interpolation
    identity: bool  # target index i is source index i: nothing to do
    ratio: float  # target length / source length: axes that shrink the volume go first


def axis_maps(
    source_affine,
    source_shape: Sequence[int],
    target_affine,
    target_shape: Sequence[int],
    device: torch.device | str = "cpu",
    atol: float = 1e-3,
) -> list[Axis] | None:
    """Per target axis, where it samples the source grid; None when the grids are not axis-aligned.

    The map from target voxel to source voxel is ``inv(A_source) @ A_target`` (voxel-centre
    affines). It is axis-aligned when each target axis moves along one source axis only; an
    off-axis component that shifts samples by less than ``atol`` voxels across the whole target
    (rounding in the affines) counts as zero. Samples beyond the source are clamped to its edge
    (MONAI's ``border`` padding).

    Args:
        source_affine, source_shape: the grid the data lives on (4x4 affine, 3 spatial sizes).
        target_affine, target_shape: the grid to resample onto.
        device: where the index and weight tensors go.
        atol: tolerance in source voxels for off-axis rounding.
    """
    source = np.asarray(source_affine, dtype=np.float64)
    target = np.asarray(target_affine, dtype=np.float64)
    shape = [int(n) for n in target_shape]
    size = [int(n) for n in source_shape]
    mapping = np.linalg.solve(source, target)
    linear, offset = mapping[:3, :3], mapping[:3, 3]
    sources = [int(p) for p in np.abs(linear).argmax(axis=0)]
    if sorted(sources) != [0, 1, 2]:
        return None
    axes = []
    for d, (n, p) in enumerate(zip(shape, sources)):
        if np.abs(np.delete(linear[:, d], p)).max() * max(n - 1, 1) > atol:
            return None
        x = np.clip(linear[p, d] * np.arange(n) + offset[p], 0, size[p] - 1)  # border padding, as Spacingd
        lo = np.floor(x).astype(np.int64)
        hi = np.minimum(lo + 1, size[p] - 1)
        weight = (x - lo).astype(np.float32)
        weight[weight < 1e-6] = 0.0  # rounding of an on-grid sample must not make it a two-voxel blend
        identity = n == size[p] and bool(np.array_equal(lo, np.arange(n))) and not weight.any()
        axes.append(
            Axis(
                p,
                torch.from_numpy(lo).to(device),
                torch.from_numpy(hi).to(device),
                torch.from_numpy(weight).to(device),
                not weight.any(),
                identity,
                n / size[p],
            )
        )
    return axes


def order_axes(axes: list[Axis]) -> list[Axis]:
    """The non-identity axes, those that shrink the volume first (the passes then work on less data)."""
    return sorted((a for a in axes if not a.identity), key=lambda a: a.ratio)


def lerp_axis(volume: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Resample ``volume``'s dimension ``axis.source + 1`` onto the target's samples along it."""
    dim = axis.source + 1
    lo = volume.index_select(dim, axis.lo)
    if axis.gather_only:
        return lo
    weight = axis.weight.view([-1 if i == dim else 1 for i in range(volume.ndim)]).to(volume.dtype)
    return lo.lerp_(volume.index_select(dim, axis.hi), weight)  # in place: one scan-sized allocation fewer


def resample_separable(volume: torch.Tensor, axes: list[Axis], permute: list[Axis] | None = None) -> torch.Tensor:
    """Resample ``(k, X, Y, Z)`` along each of ``axes`` (in this order), then put the dimensions
    in target order when ``permute`` (all three axes, in target order) is given."""
    for axis in axes:
        volume = lerp_axis(volume, axis)
    return volume if permute is None else volume.permute(0, *(a.source + 1 for a in permute))
