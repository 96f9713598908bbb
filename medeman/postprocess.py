"""Post-processing learned on validation: per-class operating points, then per class, drop connected components
below a volume, keep the k largest.

A network trained on a few labeled scans under-calls the instances of a small structure that look unlike the few
it saw: on the lesion cohort the teachers of 3 labeled scans (with lesion copy-paste) segment 60 % of the voxels of
the lesions they find, those of all 27 scans 83 % (``docs/small_structures.md``). Scaling a class's probability by ``s`` before the argmax moves its
decision boundary (the Bayes rule under a class-prior shift, Saerens et al., Neural Computation 14:21, 2002); medeman
learns ``s`` per foreground class on the validation volumes (:func:`learn_class_scales`), rarest class first, from
:data:`SCALE_CANDIDATES`, and keeps it only where it raises the mean foreground Dice by :data:`MIN_SCALE_GAIN`.

A segmentation network's false positives on small structures are mostly speckles: components far
smaller than any true one. nnU-Net determines on its validation folds, per class, whether keeping
only the largest component raises Dice (Isensee et al. 2021, Nat. Methods 18:203). medeman learns,
per class, the minimum component volume (mm^3) that maximises mean validation Dice (the largest
component of a class always stays: the rule removes speckles, not the structure), and, where every
validation case holds the same number k of components of the class (k kidneys), whether keeping
the k largest raises it further (learned on the masks the scales give). Removed voxels become background. The rules
are plain values, stored in ``teacher.pt`` (``extra["postprocessing"]``) and applied by ``medeman infer`` and ``rank``
(``--no-postprocessing``: the raw argmax).

Examples:
    >>> rules = learn_postprocessing([prediction], [reference], voxel_mm3=[8.0], num_classes=3)  # doctest: +SKIP
    >>> cleaned = apply_postprocessing(prediction, rules, voxel_mm3=8.0)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from medeman.component_rules import STRUCTURE, apply_component_rules, kept_components

if TYPE_CHECKING:
    from medeman.typed_config import Config

# the probability scales tried per class (>= 1: a class the network under-calls gets a lower bar, never a higher one)
SCALE_CANDIDATES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
# a scale stays only if it raises the mean foreground validation Dice by this much: on 2-6 validation cases smaller
# gains are noise, and an organ the network already calls well keeps its plain argmax
MIN_SCALE_GAIN = 0.005


@dataclass
class _Components:
    """One case's predicted components of one class: their sizes (voxels) and overlaps with the reference."""

    sizes: np.ndarray
    overlaps: np.ndarray
    reference: int


def _components(prediction: np.ndarray, reference: np.ndarray, c: int) -> _Components:
    labelled, n = ndimage.label(prediction == c, structure=STRUCTURE)
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    overlaps = np.bincount(labelled.ravel(), weights=(reference == c).ravel(), minlength=n + 1)[1:]
    return _Components(sizes.astype(np.int64), overlaps.astype(np.int64), int((reference == c).sum()))


def _dice(comp: _Components, keep: np.ndarray) -> float:
    predicted = int(comp.sizes[keep].sum())
    if predicted + comp.reference == 0:
        return 1.0  # nothing predicted where nothing is: a perfect case, as nnU-Net scores it
    return 2.0 * float(comp.overlaps[keep].sum()) / (predicted + comp.reference)


def _mean_dice(cases: list[_Components], volumes: Sequence[float], min_mm3: float, keep_largest: int) -> float:
    return float(
        np.mean(
            [_dice(comp, kept_components(comp.sizes, min_mm3 / v, keep_largest)) for comp, v in zip(cases, volumes)]
        )
    )


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
        # margin on both sides); the largest component of a case always stays (kept_components)
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
        counts = {int(ndimage.label(r == c, structure=STRUCTURE)[1]) for r in references}
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


def scale_classes(probs: torch.Tensor, scales: Sequence[float] | None, dim: int = 0) -> torch.Tensor:
    """``probs`` with each class multiplied by its scale along ``dim`` (the input itself when there is nothing to scale).

    The argmax of the result is the learned operating point; the result is not renormalised (only its argmax is used).
    """
    if not scales or all(float(s) == 1.0 for s in scales):
        return probs
    if len(scales) != probs.shape[dim]:
        raise ValueError(f"{len(scales)} class scales for {probs.shape[dim]} classes")
    shape = [1] * probs.ndim
    shape[dim] = len(scales)
    return probs * torch.tensor([float(s) for s in scales], dtype=probs.dtype, device=probs.device).view(shape)


def class_scales(rules: dict[str, Any] | None) -> list[float] | None:
    """The per-class probability scales of a model's rules (``None``: none learned, plain argmax)."""
    return None if not rules else rules.get("class_scales")


def _foreground_dice(confusions: torch.Tensor) -> torch.Tensor:
    """Per case, the mean Dice over foreground classes of ``(N, C, C)`` confusion counts (reference, prediction).

    A class absent from both reference and prediction scores 1, as nnU-Net scores an empty case."""
    overlap = confusions.diagonal(dim1=1, dim2=2)[:, 1:]
    sizes = confusions.sum(dim=2)[:, 1:] + confusions.sum(dim=1)[:, 1:]
    dice = torch.where(sizes > 0, 2 * overlap / sizes.clamp_min(1), torch.ones_like(sizes))
    return dice.mean(dim=1)


def _confusion(probs: torch.Tensor, reference: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    num_classes = probs.shape[0]
    pred = (probs * scales.view(-1, *([1] * (probs.ndim - 1)))).argmax(dim=0)
    pairs = reference.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes).double()


def learn_class_scales(
    probabilities: Sequence[torch.Tensor],
    references: Sequence[torch.Tensor],
    candidates: Sequence[float] = SCALE_CANDIDATES,
    min_gain: float = MIN_SCALE_GAIN,
) -> dict[str, Any]:
    """Per foreground class, the probability scale that maximises mean foreground validation Dice.

    One pass of coordinate ascent, rarest class (smallest reference volume) first: each class's scale is chosen
    from ``candidates`` with the others held at their current values, and kept only if it beats the current mean
    Dice by more than ``min_gain`` (else 1; ties: the smaller scale).

    Args:
        probabilities: per validation case ``(C, *spatial)`` softmax probabilities.
        references: per case the ``(*spatial)`` integer label map on the same grid.
        candidates: the scales tried per class.
        min_gain: the mean-Dice gain a scale must bring.

    Returns:
        ``{"scales": [1.0, s_1, ...], "dice_before": d0, "dice_after": d1}``: one scale per class (background
        1) and the mean foreground validation Dice with plain argmax and with the scales.
    """
    num_classes = probabilities[0].shape[0]
    refs = [torch.as_tensor(r).long() for r in references]
    scales = torch.ones(num_classes, dtype=torch.float64)

    def score(trial: torch.Tensor) -> float:
        confusions = torch.stack([_confusion(p, r, trial.to(p.dtype)) for p, r in zip(probabilities, refs)])
        return float(_foreground_dice(confusions).mean())

    before = current = score(scales)
    volume = torch.stack([torch.bincount(r.reshape(-1), minlength=num_classes)[:num_classes] for r in refs]).sum(0)
    for c in sorted(range(1, num_classes), key=lambda k: (int(volume[k]), k)):
        best_scale, best = 1.0, current
        for s in sorted(float(s) for s in candidates):  # ascending: a tie keeps the smaller scale
            trial = scales.clone()
            trial[c] = s
            trial_score = score(trial)
            if trial_score > best + 1e-12:
                best_scale, best = s, trial_score
        if best > current + min_gain:
            scales[c], current = best_scale, best
    return {"scales": [float(s) for s in scales], "dice_before": round(before, 6), "dice_after": round(current, 6)}


def apply_postprocessing(labels: np.ndarray, rules: dict[str, Any] | None, voxel_mm3: float) -> np.ndarray:
    """``labels`` with each class's small (and surplus) components set to background; ``rules`` from :func:`learn_postprocessing`.

    ``None`` or empty rules return ``labels`` unchanged (the same array). The rules are applied by
    :func:`medeman.component_rules.apply_component_rules`, the code an exported MONAI bundle runs too.
    """
    return apply_component_rules(labels, (rules or {}).get("classes"), voxel_mm3)


def learn_on_validation(net, cfg: Config | dict, loader, device: str | Any = "cpu") -> dict[str, Any] | None:
    """Segment the whole validation volumes of ``loader`` with ``net`` and learn the rules on them: the class scales
    (:func:`learn_class_scales`), then the component rules on the masks they give.

    Args:
        net: the deployed teacher, in eval mode.
        cfg: its config (``data.spacing`` gives the voxel volume; null: each volume's own affine).
        loader: batches ``{"image": (1, C, ...), "label": (1, 1, ...)}`` as ``SSLDataModule.val_dataloader``.

    Returns:
        The rules of :func:`learn_postprocessing` with ``"class_scales"`` (one per class) and ``"scale_dice"``
        (mean foreground validation Dice before and after the scales), or ``None`` without validation volumes.
    """
    from medeman.data.readers import voxel_spacing
    from medeman.labels import argmax_labels
    from medeman.predict import predict_volume
    from medeman.typed_config import as_config

    cfg = as_config(cfg)
    probabilities, references, volumes = [], [], []
    for batch in loader:
        image = batch["image"][0]
        probabilities.append(predict_volume(net, image, cfg, device=device).float().cpu())
        references.append(
            torch.from_numpy(np.rint(torch.as_tensor(batch["label"])[0, 0].cpu().numpy()).astype(np.int64))
        )
        spacing = cfg.data.spacing
        if spacing is None:
            spacing = voxel_spacing(np.asarray(image.affine))
        volumes.append(float(np.prod([float(s) for s in spacing])))
    if not probabilities:
        return None
    learned = learn_class_scales(probabilities, references)
    predictions = [argmax_labels(scale_classes(p, learned["scales"]), dim=0).numpy() for p in probabilities]
    rules = learn_postprocessing(predictions, [r.numpy() for r in references], volumes, cfg.data.num_classes)
    rules["class_scales"] = learned["scales"]
    rules["scale_dice"] = [learned["dice_before"], learned["dice_after"]]
    return rules


def describe(rules: dict[str, Any] | None) -> str:
    """One line per class: its rule and validation Dice before and after."""
    scaled = {c: s for c, s in enumerate(class_scales(rules) or []) if s != 1.0}
    if not rules or not (rules.get("classes") or scaled):
        return "no post-processing"
    lines = []
    if scaled:
        before, after = rules.get("scale_dice", (float("nan"), float("nan")))
        lines.append(
            "class probabilities x "
            + ", ".join(f"{s:g} (class {c})" for c, s in scaled.items())
            + f" before the argmax (mean validation Dice {before:.3f} -> {after:.3f})"
        )
    for c, r in rules.get("classes", {}).items():
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
