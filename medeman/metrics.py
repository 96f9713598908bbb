"""Per-class scores of a predicted mask against a reference mask: Dice, HD95 and ASD in mm, and lesion-wise detection.

The maths behind ``medeman evaluate`` (:mod:`medeman.evaluate` matches folders, builds the tables,
CSV and pictures). Each class is scored with MONAI's ``compute_dice``,
``compute_hausdorff_distance(percentile=95)`` and ``compute_average_surface_distance(symmetric=True)``
(what ``DiceMetric``, ``HausdorffDistanceMetric`` and ``SurfaceDistanceMetric`` compute), with the
reference's voxel spacing so distances are in mm. A class absent from exactly one mask scores Dice 0;
a surface distance needs two surfaces, so HD95 and ASD are NaN when either mask is empty.

Lesion-wise figures (for the classes marked as lesions; an organ is one structure): each mask is
split into connected components (:func:`scipy.ndimage.label`, 26-neighbourhood by default). A
reference lesion is *detected* when the predicted components that touch it cover it with an IoU of
at least ``overlap`` (0: any overlap); a predicted component is a *true positive* under the same
rule against the reference lesions it touches, else a *false positive*. Sensitivity = detected /
reference lesions, precision = true-positive components / predicted components, F1 their harmonic
mean. Lesion-wise Dice (BraTS 2023): per reference lesion, the Dice with the predicted components
touching it (0 when none), averaged with a 0 for every predicted component that touches no
reference lesion; 1 when a case has neither.

Typical use::

    dice, hd95, asd = mask_scores(pred == 1, ref == 1, spacing=(1.0, 1.0, 2.5))
    counts = lesion_counts(pred == 3, ref == 3, overlap=0.1)   # LesionCounts(reference=..., detected=...)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from scipy import ndimage

DEFAULT_LESION_OVERLAP = 0.1  # IoU a lesion needs to count as detected; 0 means any overlap


@dataclass(frozen=True)
class LesionCounts:
    """Connected-component detection figures of one class in one case (see the module docstring)."""

    reference: int = 0  # reference lesions (components)
    detected: int = 0  # reference lesions found at the overlap rule
    predicted: int = 0  # predicted components
    true_positive: int = 0  # predicted components that match reference lesions at the overlap rule
    dice: float = 1.0  # lesion-wise Dice (BraTS 2023)

    @property
    def missed(self) -> int:
        return self.reference - self.detected

    @property
    def false_positive(self) -> int:
        return self.predicted - self.true_positive

    @property
    def sensitivity(self) -> float:
        return self.detected / self.reference if self.reference else math.nan

    @property
    def precision(self) -> float:
        return self.true_positive / self.predicted if self.predicted else math.nan

    @property
    def f1(self) -> float:
        return f1_score(self.sensitivity, self.precision)


def f1_score(sensitivity: float, precision: float) -> float:
    """Harmonic mean; NaN when either is undefined (no reference or no predicted lesion), 0 when both are 0."""
    if not (math.isfinite(sensitivity) and math.isfinite(precision)):
        return math.nan
    total = sensitivity + precision
    return 2 * sensitivity * precision / total if total > 0 else 0.0


@dataclass
class ClassScore:
    """One class of one case."""

    case_id: str
    label: int
    dice: float
    hd95: float
    asd: float
    reference_voxels: int
    predicted_voxels: int
    lesions: LesionCounts | None = None  # only for lesion classes
    note: str = ""  # medeman.evaluate.ABSENT_NOTE when the class is in neither mask of this case


def mask_scores(prediction: np.ndarray, reference: np.ndarray, spacing) -> tuple[float, float, float]:
    """Dice, HD95 (mm) and symmetric average surface distance (mm) of two binary masks on one grid.

    The masks are cropped to their joint bounding box plus one voxel first, which changes no
    score. See the module docstring for empty masks.
    """
    pred, ref = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not (has_pred or has_ref):
        return 1.0, math.nan, math.nan
    if not (has_pred and has_ref):
        return 0.0, math.nan, math.nan
    nonzero = np.argwhere(pred | ref)
    low = np.maximum(nonzero.min(axis=0) - 1, 0)
    high = np.minimum(nonzero.max(axis=0) + 2, pred.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    p = torch.from_numpy(pred[box])[None, None].float()
    r = torch.from_numpy(ref[box])[None, None].float()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.5+ deprecation inside get_mask_edges
        dice = compute_dice(p, r, include_background=True, ignore_empty=False)
        hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=spacing)
    return float(dice[0, 0]), float(hd95[0, 0]), float(asd[0, 0])


def lesion_counts(
    prediction: np.ndarray, reference: np.ndarray, overlap: float = DEFAULT_LESION_OVERLAP, connectivity: int = 3
) -> LesionCounts:
    """Lesion-wise detection and lesion-wise Dice of two binary masks (rules in the module docstring).

    Args:
        prediction, reference: binary masks on one grid.
        overlap: IoU a lesion (or a predicted component) needs with what it touches to count as found;
            0 means any overlap.
        connectivity: 1 (6-), 2 (18-) or 3 (26-neighbourhood) for :func:`scipy.ndimage.label`.

    Returns:
        The :class:`LesionCounts`.

    Example:
        >>> ref = np.zeros((9, 9, 9), bool); ref[1:3, 1:3, 1:3] = ref[6:8, 6:8, 6:8] = True
        >>> pred = ref.copy(); pred[6:8, 6:8, 6:8] = False; pred[1:3, 6:8, 1:3] = True
        >>> lesion_counts(pred, ref)  # one lesion found, one missed, one false positive
        LesionCounts(reference=2, detected=1, predicted=2, true_positive=1, dice=0.3333333333333333)
    """
    pred, ref = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3 (6-, 18- or 26-neighbourhood), got {connectivity}")
    structure = ndimage.generate_binary_structure(3, connectivity)
    ref_ids, n_ref = ndimage.label(ref, structure)
    pred_ids, n_pred = ndimage.label(pred, structure)
    if n_ref == 0 and n_pred == 0:
        return LesionCounts()
    ref_size = np.bincount(ref_ids.ravel(), minlength=n_ref + 1).astype(float)
    pred_size = np.bincount(pred_ids.ravel(), minlength=n_pred + 1).astype(float)
    # voxels shared by each touching (reference, predicted) pair: sparse, never an n_ref x n_pred table
    both = ref & pred
    pairs, shared = np.unique(np.stack([ref_ids[both], pred_ids[both]]), axis=1, return_counts=True)
    r, p = pairs if pairs.size else (np.zeros(0, int), np.zeros(0, int))
    # components of one mask are disjoint, so a lesion's overlap with the union of the components
    # touching it is the sum of its pairwise overlaps, and that union's size the sum of their sizes
    ref_inter = np.bincount(r, weights=shared, minlength=n_ref + 1)[1:]
    ref_union_pred = np.bincount(r, weights=pred_size[p], minlength=n_ref + 1)[1:]
    pred_inter = np.bincount(p, weights=shared, minlength=n_pred + 1)[1:]
    pred_union_ref = np.bincount(p, weights=ref_size[r], minlength=n_pred + 1)[1:]

    def found(inter: np.ndarray, own: np.ndarray, touched: np.ndarray) -> np.ndarray:
        iou = inter / np.maximum(own + touched - inter, 1.0)
        return (inter > 0) & (iou >= overlap)

    detected = found(ref_inter, ref_size[1:], ref_union_pred)
    true_positive = found(pred_inter, pred_size[1:], pred_union_ref)
    per_lesion_dice = 2 * ref_inter / np.maximum(ref_size[1:] + ref_union_pred, 1.0)
    unmatched = int((pred_inter == 0).sum())  # predicted components touching no reference lesion
    dice = float(per_lesion_dice.sum() / (n_ref + unmatched))
    return LesionCounts(int(n_ref), int(detected.sum()), int(n_pred), int(true_positive.sum()), dice)


def case_scores(
    case_id: str,
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing,
    lesion_overlap: float = DEFAULT_LESION_OVERLAP,
    connectivity: int = 3,
    lesion_classes: Iterable[int] = (),
) -> list[ClassScore]:
    """Scores of every foreground class present in either label array; lesion-wise ones for ``lesion_classes``."""
    lesion_classes = {int(c) for c in lesion_classes}
    labels = sorted((set(np.unique(prediction).tolist()) | set(np.unique(reference).tolist())) - {0})
    out = []
    for label in labels:
        pred, ref = prediction == label, reference == label
        dice, hd95, asd = mask_scores(pred, ref, spacing)
        lesions = lesion_counts(pred, ref, lesion_overlap, connectivity) if label in lesion_classes else None
        out.append(ClassScore(case_id, int(label), dice, hd95, asd, int(ref.sum()), int(pred.sum()), lesions))
    return out
