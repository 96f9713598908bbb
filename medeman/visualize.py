"""One picture per case: axial, coronal and sagittal slices with the prediction's contours over the reference's.

Slices are cut through the centroid of the reference foreground (the prediction's when there is no
reference) after reorienting to RAS, and shown the radiological way: the patient's right on the
left, anterior and superior at the top, pixels at their true aspect ratio. Reference contours are
solid, prediction contours dashed, one colour per class; the scan is the underlay when given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from nibabel.orientations import apply_orientation, io_orientation

from medeman.classes import class_title
from medeman.data.readers import voxel_spacing

COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#ffe119", "#469990")


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorder and flip a ``[x, y, z]`` array so its axes run to Right, Anterior, Superior; return it and its voxel sizes."""
    ornt = io_orientation(affine)
    spacing = voxel_spacing(affine)
    ras_spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        ras_spacing[int(target)] = float(spacing[axis])
    return apply_orientation(array, ornt), tuple(ras_spacing)


def centre_voxel(*masks: np.ndarray | None) -> tuple[int, int, int]:
    """The rounded centroid of the first non-empty mask, else the volume's centre."""
    shape = next(m.shape for m in masks if m is not None)
    for mask in masks:
        if mask is not None and mask.any():
            return tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))
    return tuple(s // 2 for s in shape)


def _views(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices of a RAS volume as display images (row 0 at the top)."""
    x, y, z = centre
    axial = volume[::-1, ::-1, z].T  # rows: anterior at top; columns: patient's right on the left
    coronal = volume[::-1, y, ::-1].T  # rows: superior at top
    sagittal = volume[x, ::-1, ::-1].T  # columns: anterior on the left
    return [axial, coronal, sagittal]


def legend_labels(
    label: int, with_reference: bool, scores: Mapping[int, float] | None = None, names: Mapping[int, str] | None = None
) -> list[str]:
    """Legend entries of one class: ``["liver reference", "liver prediction (Dice 0.912)"]``."""
    name = class_title(label, names)
    score = scores.get(label) if scores else None
    score = f" (Dice {score:.3f})" if score is not None and np.isfinite(score) else ""
    return ([f"{name} reference"] if with_reference else []) + [f"{name} prediction{score}"]


def save_case_figure(
    path: str | Path,
    prediction: np.ndarray,
    affine: np.ndarray,
    reference: np.ndarray | None = None,
    image: np.ndarray | None = None,
    title: str = "",
    scores: Mapping[int, float] | None = None,
    names: Mapping[int, str] | None = None,
) -> Path:
    """Write a PNG of three orthogonal slices with per-class contours.

    Args:
        path: the PNG to write (its folder is created).
        prediction: integer label array ``[x, y, z]``.
        affine: the arrays' RAS affine (for orientation and aspect ratio).
        reference: the reference labels on the same grid, or None.
        image: the scan on the same grid, the grey underlay, or None.
        title: shown above the panels (e.g. the case id).
        scores: per-class Dice added to the legend, or None.
        names: class names by label value for the legend (``class 2`` when a class has none).

    Returns:
        ``path``.
    """
    prediction = np.asarray(prediction)
    pred, (sx, sy, sz) = to_ras(prediction, affine)
    ref = to_ras(np.asarray(reference), affine)[0] if reference is not None else None
    img = to_ras(np.asarray(image, dtype=np.float32), affine)[0] if image is not None else None
    classes = sorted(
        int(c) for c in set(np.unique(pred)) | (set(np.unique(ref)) if ref is not None else set()) if c != 0
    )
    centre = centre_voxel(ref > 0 if ref is not None else None, pred > 0)

    fig = Figure(figsize=(13, 5.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    aspects = (sy / sx, sz / sx, sz / sy)  # height / width of a pixel in each view
    view_names = ("axial", "coronal", "sagittal")
    sides = (("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I"))  # left, right, top, bottom
    if img is not None:
        low, high = np.percentile(img, [0.5, 99.5])
        underlays = _views(img, centre)
    else:
        low, high = 0.0, 1.0
        underlays = [np.full(v.shape, 0.15, dtype=np.float32) for v in _views(pred, centre)]
    pred_views = _views(pred, centre)
    ref_views = _views(ref, centre) if ref is not None else [None] * 3
    for ax, name, side, aspect, under, pv, rv in zip(
        axes, view_names, sides, aspects, underlays, pred_views, ref_views
    ):
        ax.imshow(
            under, cmap="gray", vmin=low, vmax=high if high > low else low + 1, aspect=aspect, interpolation="nearest"
        )
        for i, c in enumerate(classes):
            colour = COLOURS[i % len(COLOURS)]
            if rv is not None and (rv == c).any():
                ax.contour(rv == c, levels=[0.5], colors=[colour], linewidths=1.6, linestyles="solid")
            if (pv == c).any():
                ax.contour(pv == c, levels=[0.5], colors=[colour], linewidths=1.6, linestyles="dashed")
        ax.set_title(name)
        for (x, y), letter in zip(((0.02, 0.5), (0.98, 0.5), (0.5, 0.97), (0.5, 0.03)), side):
            ax.text(x, y, letter, transform=ax.transAxes, color="yellow", fontsize=9, ha="center", va="center")
        ax.set_axis_off()
    handles = []
    for i, c in enumerate(classes):
        colour = COLOURS[i % len(COLOURS)]
        for style, label in zip(("solid", "dashed")[ref is None :], legend_labels(c, ref is not None, scores, names)):
            handles.append(Line2D([], [], color=colour, linestyle=style, label=label))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False)
    else:
        fig.text(0.5, 0.04, "no foreground in prediction or reference", ha="center")
    fig.suptitle(title + ("" if ref is not None else "  (no reference: prediction over the scan)"))
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.12, wspace=0.03)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path
