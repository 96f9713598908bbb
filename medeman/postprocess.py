"""Post-processing learned on validation: per class, drop connected components below a volume, keep the k largest.

A segmentation network's false positives on small structures are mostly speckles: components far
smaller than any true one. nnU-Net determines on its validation folds, per class, whether keeping
only the largest component raises Dice (Isensee et al. 2021, Nat. Methods 18:203). medeman learns,
per class, the minimum component volume (mm^3) that maximises mean validation Dice (the largest
component of a class always stays: the rule removes speckles, not the structure), and, where every
validation case holds the same number k of components of the class (k kidneys), whether keeping
the k largest raises it further. Removed voxels become background. The rules are plain values,
stored in ``teacher.pt`` (``extra["postprocessing"]``) and applied by ``medeman infer`` and ``rank``.

Examples:
    >>> rules = learn_postprocessing([prediction], [reference], voxel_mm3=[8.0], num_classes=3)  # doctest: +SKIP
    >>> cleaned = apply_postprocessing(prediction, rules, voxel_mm3=8.0)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from medeman.typed_config import Config

# 26-connectivity, as nnU-Net's and MONAI's component tools: diagonal neighbours are one component
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


@dataclass
class _Components:
    """One case's predicted components of one class: their sizes (voxels) and overlaps with the reference."""

    sizes: np.ndarray
    overlaps: np.ndarray
    reference: int


def _components(prediction: np.ndarray, reference: np.ndarray, c: int) -> _Components:
    labelled, n = ndimage.label(prediction == c, structure=_STRUCTURE)
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    overlaps = np.bincount(labelled.ravel(), weights=(reference == c).ravel(), minlength=n + 1)[1:]
    return _Components(sizes.astype(np.int64), overlaps.astype(np.int64), int((reference == c).sum()))


def _kept(comp: _Components, min_voxels: float, keep_largest: int) -> np.ndarray:
    keep = comp.sizes >= min_voxels
    if comp.sizes.size and not keep.any():
        # a size rule removes speckles, never the structure: the largest component always stays (a rule
        # learned on a few validation cases once dropped a whole test liver that was a little smaller)
        keep[int(np.argmax(comp.sizes))] = True
    if keep_largest > 0 and keep.sum() > keep_largest:
        order = np.argsort(-comp.sizes, kind="stable")
        ranked = order[keep[order]][:keep_largest]
        keep = np.zeros_like(keep)
        keep[ranked] = True
    return keep


def _dice(comp: _Components, keep: np.ndarray) -> float:
    predicted = int(comp.sizes[keep].sum())
    if predicted + comp.reference == 0:
        return 1.0  # nothing predicted where nothing is: a perfect case, as nnU-Net scores it
    return 2.0 * float(comp.overlaps[keep].sum()) / (predicted + comp.reference)


def _mean_dice(cases: list[_Components], volumes: Sequence[float], min_mm3: float, keep_largest: int) -> float:
    return float(np.mean([_dice(comp, _kept(comp, min_mm3 / v, keep_largest)) for comp, v in zip(cases, volumes)]))


def learn_postprocessing(
    predictions: Sequence[np.ndarray], references: Sequence[np.ndarray], voxel_mm3: Sequence[float], num_classes: int
) -> dict[str, Any]:
    """Per class, the component rules that maximise mean validation Dice (ties: the mildest rule).

    Args:
        predictions, references: label maps of the validation cases (same grid per pair).
        voxel_mm3: each case's voxel volume in mm^3 (thresholds are volumes, so they hold on any grid).
        num_classes: classes including background.

    Returns:
        ``{"classes": {"c": {"min_volume_mm3", "keep_largest", "drop", "dice_before", "dice_after"}}}``: a
        class whose rules would not raise its Dice gets ``min_volume_mm3 = 0`` and ``keep_largest = 0`` (off);
        ``drop`` removes a class that no validation reference holds but the network predicts.
    """
    rules: dict[str, Any] = {}
    for c in range(1, num_classes):
        cases = [_components(p, r, c) for p, r in zip(predictions, references)]
        before = _mean_dice(cases, voxel_mm3, 0.0, 0)
        # candidate thresholds: midway between consecutive predicted component volumes (the widest
        # margin on both sides); the largest component of a case always stays (_kept)
        volumes = sorted({float(s) * v for comp, v in zip(cases, voxel_mm3) for s in comp.sizes})
        best_mm3, best = 0.0, before
        for threshold in [(a + b) / 2 for a, b in zip(volumes, volumes[1:])]:
            score = _mean_dice(cases, voxel_mm3, threshold, 0)
            if score > best + 1e-12:
                best_mm3, best = threshold, score
        drop = False
        if not any(comp.reference for comp in cases) and any(comp.sizes.size for comp in cases):
            # in no validation reference, yet predicted: every prediction of it is false (nnU-Net drops it too)
            drop, best = True, 1.0
        keep = 0
        counts = {int(ndimage.label(r == c, structure=_STRUCTURE)[1]) for r in references}
        if len(counts) == 1 and (k := counts.pop()) > 0:  # the anatomy has k components in every case
            score = _mean_dice(cases, voxel_mm3, best_mm3, k)
            if not drop and score > best + 1e-12:
                keep, best = k, score
        rules[str(c)] = {
            "min_volume_mm3": round(best_mm3, 3),
            "keep_largest": keep,
            "drop": drop,
            "dice_before": round(before, 6),
            "dice_after": round(best, 6),
        }
    return {"classes": rules}


def apply_postprocessing(labels: np.ndarray, rules: dict[str, Any] | None, voxel_mm3: float) -> np.ndarray:
    """``labels`` with each class's small (and surplus) components set to background; ``rules`` from :func:`learn_postprocessing`.

    ``None`` or empty rules return ``labels`` unchanged (the same array).
    """
    if not rules or not rules.get("classes"):
        return labels
    active = {
        int(c): r
        for c, r in rules["classes"].items()
        if r["min_volume_mm3"] > 0 or r["keep_largest"] > 0 or r.get("drop", False)
    }
    if not active:
        return labels
    out = np.array(labels, copy=True)
    for c, rule in active.items():
        if rule.get("drop", False):
            out[out == c] = 0
            continue
        labelled, n = ndimage.label(out == c, structure=_STRUCTURE)
        if n == 0:
            continue
        sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
        comp = _Components(sizes, np.zeros_like(sizes), 0)
        keep = _kept(comp, float(rule["min_volume_mm3"]) / voxel_mm3, int(rule["keep_largest"]))
        drop = np.flatnonzero(~keep) + 1
        if drop.size:
            out[np.isin(labelled, drop)] = 0
    return out


def learn_on_validation(net, cfg: Config | dict, loader, device: str | Any = "cpu") -> dict[str, Any] | None:
    """Segment the whole validation volumes of ``loader`` with ``net`` and learn the rules on them.

    Args:
        net: the deployed teacher, in eval mode.
        cfg: its config (``data.spacing`` gives the voxel volume; null: each volume's own affine).
        loader: batches ``{"image": (1, C, ...), "label": (1, 1, ...)}`` as ``SSLDataModule.val_dataloader``.

    Returns:
        The rules of :func:`learn_postprocessing`, or ``None`` without validation volumes.
    """
    import torch

    from medeman.data.readers import voxel_spacing
    from medeman.labels import argmax_labels
    from medeman.predict import predict_volume
    from medeman.typed_config import as_config

    cfg = as_config(cfg)
    predictions, references, volumes = [], [], []
    for batch in loader:
        image = batch["image"][0]
        probs = predict_volume(net, image, cfg, device=device)
        predictions.append(argmax_labels(probs, dim=0).cpu().numpy())
        references.append(np.rint(torch.as_tensor(batch["label"])[0, 0].cpu().numpy()).astype(np.int64))
        spacing = cfg.data.spacing
        if spacing is None:
            spacing = voxel_spacing(np.asarray(image.affine))
        volumes.append(float(np.prod([float(s) for s in spacing])))
    if not predictions:
        return None
    return learn_postprocessing(predictions, references, volumes, cfg.data.num_classes)


def describe(rules: dict[str, Any] | None) -> str:
    """One line per class: its rule and validation Dice before and after."""
    if not rules or not rules.get("classes"):
        return "no post-processing"
    lines = []
    for c, r in rules["classes"].items():
        rule = []
        if r["min_volume_mm3"] > 0:
            volume = r["min_volume_mm3"]
            rule.append(
                f"drop components < {volume:.0f} mm^3" if volume >= 100 else f"drop components < {volume:.3g} mm^3"
            )
        if r["keep_largest"] > 0:
            rule.append(f"keep the {r['keep_largest']} largest")
        if r.get("drop", False):
            rule.append("drop the class (in no validation reference)")
        lines.append(
            f"class {c}: {', '.join(rule) or 'none'} (validation Dice {r['dice_before']:.3f} -> {r['dice_after']:.3f})"
        )
    return "; ".join(lines)
