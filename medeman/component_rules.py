"""Apply per-class connected-component rules to a class map: drop components below a volume, keep the k largest.

The rules are learned on validation by :func:`medeman.postprocess.learn_postprocessing`; this module only applies
them. It imports nothing from medeman (numpy and scipy only; torch for :func:`apply_to_prediction`), so that
``medeman export --format bundle`` copies it verbatim into a MONAI bundle (``scripts/component_rules.py``) and the
bundle cleans its masks with the very code ``medeman infer``, ``evaluate`` and ``rank`` use.

A rule per class value (as a string, as stored in ``teacher.pt``): ``{"min_volume_mm3": v, "keep_largest": k,
"drop": bool}``. The largest component of a class always stays under a volume rule (it removes speckles, never the
structure; Isensee et al. 2021, Nat. Methods 18:203 keep the largest component per class), ``keep_largest`` keeps
the k largest of those left, ``drop`` removes the class. Removed voxels become background (0). Components are
26-connected, as nnU-Net's and MONAI's component tools count them.

Examples:
    >>> import numpy as np
    >>> labels = np.zeros((6, 6, 6), dtype=np.uint8)
    >>> labels[0:3, 0:3, 0:3] = 2  # 27 voxels
    >>> labels[5, 5, 5] = 2  # a 1-voxel speckle
    >>> rules = {"2": {"min_volume_mm3": 5.0, "keep_largest": 0}}
    >>> int((apply_component_rules(labels, rules, voxel_mm3=1.0) == 2).sum())
    27
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy import ndimage

# 26-connectivity: diagonal neighbours are one component
STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def kept_components(sizes: np.ndarray, min_voxels: float, keep_largest: int) -> np.ndarray:
    """Which components of one class stay: at least ``min_voxels`` (the largest always), then the ``keep_largest`` largest.

    Args:
        sizes: voxel count of each component.
        min_voxels: the volume rule in voxels (0: none).
        keep_largest: keep at most this many, the largest first (0: no limit).

    Returns:
        A boolean mask over ``sizes``.
    """
    keep = sizes >= min_voxels
    if sizes.size and not keep.any():
        # a size rule removes speckles, never the structure: the largest component always stays (a rule
        # learned on a few validation cases once dropped a whole test liver that was a little smaller)
        keep[int(np.argmax(sizes))] = True
    if keep_largest > 0 and keep.sum() > keep_largest:
        order = np.argsort(-sizes, kind="stable")
        ranked = order[keep[order]][:keep_largest]
        keep = np.zeros_like(keep)
        keep[ranked] = True
    return keep


def active_rules(rules: Mapping[str, Mapping[str, Any]] | None) -> dict[int, Mapping[str, Any]]:
    """The rules that change a mask, by class value (empty: the mask stays as it is)."""
    return {
        int(c): r
        for c, r in (rules or {}).items()
        if r["min_volume_mm3"] > 0 or r["keep_largest"] > 0 or r.get("drop", False)
    }


def apply_component_rules(
    labels: np.ndarray, rules: Mapping[str, Mapping[str, Any]] | None, voxel_mm3: float
) -> np.ndarray:
    """``labels`` with each class's small (and surplus) components set to background.

    Args:
        labels: a class map (any integer or float dtype holding class values).
        rules: per class value (a string key), ``{"min_volume_mm3", "keep_largest"[, "drop"]}``.
        voxel_mm3: the volume of one voxel of ``labels`` in mm^3.

    Returns:
        A cleaned copy, or ``labels`` itself (the same array) when no rule changes anything.
    """
    active = active_rules(rules)
    if not active:
        return labels
    out = np.array(labels, copy=True)
    for c, rule in active.items():
        if rule.get("drop", False):
            out[out == c] = 0
            continue
        labelled, n = ndimage.label(out == c, structure=STRUCTURE)
        if n == 0:
            continue
        sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
        keep = kept_components(sizes, float(rule["min_volume_mm3"]) / voxel_mm3, int(rule["keep_largest"]))
        drop = np.flatnonzero(~keep) + 1
        if drop.size:
            out[np.isin(labelled, drop)] = 0
    return out


def apply_to_prediction(pred: Any, rules: Mapping[str, Mapping[str, Any]] | None) -> Any:
    """:func:`apply_component_rules` on a MONAI ``MetaTensor`` class map ``(1, X, Y, Z)`` on its scan's grid.

    The voxel volume is the product of the lengths of the affine's columns (the scan's voxel sizes), as
    ``medeman infer`` takes it from the scan file. The bundle's post-processing calls this after the argmax.
    """
    import torch

    affine = np.asarray(pred.affine, dtype=np.float64)
    voxel_mm3 = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)))
    labels = pred.detach().cpu().numpy()[0]
    cleaned = apply_component_rules(labels, rules, voxel_mm3)
    if cleaned is labels:  # no rule changes anything
        return pred
    out = pred.clone()
    out[0] = torch.as_tensor(cleaned, dtype=pred.dtype, device=pred.device)
    return out
