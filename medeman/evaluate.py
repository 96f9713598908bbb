"""Dice, HD95 and average surface distance of predicted masks against reference labels, in millimetres.

Cases are matched by id: ``<case>.nii.gz`` predictions against ``<case>[_seg|_label|_mask].nii.gz``
labels (``.nii``, ``.nrrd`` and ``.mha`` too). Each class present in either mask is scored with
MONAI's ``compute_dice``, ``compute_hausdorff_distance(percentile=95)`` and
``compute_average_surface_distance(symmetric=True)`` (what ``DiceMetric``,
``HausdorffDistanceMetric`` and ``SurfaceDistanceMetric`` compute), with the label file's voxel
spacing so distances are in mm.

Empty masks: a class absent from both prediction and reference scores Dice 1; absent from exactly
one, Dice 0. A surface distance needs two surfaces, so HD95 and ASD are NaN when either mask of
the class is empty; summary means leave NaN out and say over how many cases they were taken.

Typical use::

    summary = evaluate_folder("runs/demo/pred", "sample_data/test/labels", csv="runs/demo/metrics.csv")
    print(summary.table())
"""

from __future__ import annotations

import argparse
import csv as csv_module
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

from medeman.data.discovery import CHANNEL_SUFFIX, index_by_case, label_id, list_images
from medeman.data.readers import image_stem, read_volume, voxel_spacing
from medeman.infer import CaseError, one_line

label_case_id = label_id  # a label file's case id: name without image suffix and without _seg/_label/_mask
CSV_COLUMNS = ("case", "class", "dice", "hd95_mm", "asd_mm", "reference_voxels", "predicted_voxels", "note")


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


@dataclass
class EvaluationSummary:
    """Every score, the per-class mean ± std, and one line per case that could not be scored."""

    scores: list[ClassScore] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # unreadable, mismatched, missing prediction
    notes: list[str] = field(default_factory=list)     # predictions without a label, affine warnings
    cases: list[str] = field(default_factory=list)     # the case ids that were scored

    @property
    def classes(self) -> list[int]:
        return sorted({s.label for s in self.scores})

    def per_class(self) -> dict[int, dict[str, float]]:
        """Per class: ``n`` cases, ``dice_mean``/``dice_std``, and ``hd95_*``/``asd_*`` over finite values with their ``*_n``."""
        out = {}
        for label in self.classes:
            rows = [s for s in self.scores if s.label == label]
            stats: dict[str, float] = {"n": len(rows)}
            for name in ("dice", "hd95", "asd"):
                values = np.array([getattr(s, name) for s in rows], dtype=float)
                values = values[np.isfinite(values)]
                stats[f"{name}_n"] = len(values)
                stats[f"{name}_mean"] = float(values.mean()) if len(values) else math.nan
                stats[f"{name}_std"] = float(values.std()) if len(values) else math.nan
            out[label] = stats
        return out

    def table(self) -> str:
        """The summary table: mean ± std per class, distances in mm."""
        lines = [f"{len(self.cases)} case(s) scored; HD95 and ASD in mm, NaN (a mask empty) left out of the mean"]
        lines.append(f"{'class':<7}{'cases':>6}  {'Dice':<17}{'HD95 mm':<22}{'ASD mm':<22}")
        for label, st in self.per_class().items():
            def cell(name: str, digits: int) -> str:
                if not st[f"{name}_n"]:
                    return "n/a"
                text = f"{st[f'{name}_mean']:.{digits}f} ± {st[f'{name}_std']:.{digits}f}"
                return text if st[f"{name}_n"] == st["n"] else f"{text} (n={st[f'{name}_n']})"
            lines.append(f"{label:<7}{st['n']:>6}  {cell('dice', 3):<17}{cell('hd95', 2):<22}{cell('asd', 2):<22}")
        if not self.classes:
            lines.append("(no foreground class in any prediction or reference)")
        return "\n".join(lines)


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


def case_scores(case_id: str, prediction: np.ndarray, reference: np.ndarray, spacing) -> list[ClassScore]:
    """Scores of every foreground class present in either label array."""
    labels = sorted((set(np.unique(prediction).tolist()) | set(np.unique(reference).tolist())) - {0})
    out = []
    for label in labels:
        pred, ref = prediction == label, reference == label
        dice, hd95, asd = mask_scores(pred, ref, spacing)
        out.append(ClassScore(case_id, int(label), dice, hd95, asd, int(ref.sum()), int(pred.sum())))
    return out


def _index(files: list[Path], case_id, what: str, problems: list[str]) -> dict[str, Path]:
    return index_by_case(files, case_id, problems, f"{{id}}: two {what} files, {{first}} and {{file}}; using the first")


def _image_index(images_dir: Path) -> dict[str, Path]:
    """Scans by case id: ``<case>_0000`` (first channel) or ``<case>``."""
    out: dict[str, Path] = {}
    for file in list_images(images_dir):
        stem = image_stem(file)
        match = CHANNEL_SUFFIX.match(stem)
        if match and int(match["channel"]) == 0:
            out[match["id"]] = file
        elif not match:
            out.setdefault(stem, file)
    return out


def evaluate_folder(
    pred_dir: str | Path,
    label_dir: str | Path | None,
    csv: str | Path | None = None,
    png_dir: str | Path | None = None,
    images_dir: str | Path | None = None,
) -> EvaluationSummary:
    """Score every prediction in ``pred_dir`` against its label in ``label_dir``.

    Args:
        pred_dir: ``<case>.nii.gz`` masks (``*_probs.*`` maps are ignored).
        label_dir: reference masks; None only draws pictures.
        csv: write one row per case and class (and one per problem) here.
        png_dir: write ``<case>.png`` per case (see :func:`medeman.visualize.save_case_figure`).
        images_dir: the scans, drawn under the contours when given.

    Returns:
        The :class:`EvaluationSummary`; nothing is printed.
    """
    pred_dir = Path(pred_dir)
    summary = EvaluationSummary()
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: no such prediction folder")
    preds = _index([p for p in list_images(pred_dir) if not image_stem(p).endswith("_probs")],
                   image_stem, "prediction", summary.problems)
    labels: dict[str, Path] = {}
    if label_dir is not None:
        if not Path(label_dir).is_dir():
            raise FileNotFoundError(f"{label_dir}: no such label folder")
        labels = _index(list_images(label_dir), label_id, "label", summary.problems)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise FileNotFoundError(f"{images_dir}: no such image folder")
    images = _image_index(Path(images_dir)) if images_dir is not None else {}

    for case_id in sorted(set(labels) - set(preds)):
        summary.problems.append(f"{case_id}: no prediction for label {labels[case_id]}")
    if label_dir is not None:
        for case_id in sorted(set(preds) - set(labels)):
            summary.notes.append(f"{case_id}: no reference label for prediction {preds[case_id]}; not scored")

    for case_id in sorted(preds):
        try:
            pred, affine = _read(preds[case_id])
            pred = _labels_3d(pred, preds[case_id])
            ref = None
            if case_id in labels:
                ref, ref_affine = _read(labels[case_id])
                ref = _labels_3d(ref, labels[case_id])
                if pred.shape != ref.shape:
                    raise CaseError(f"{case_id}: prediction {preds[case_id]} has shape {pred.shape}, "
                                    f"label {labels[case_id]} has {ref.shape}; not scored")
                gap = float(np.abs(affine - ref_affine).max())
                if gap > 1e-3:
                    summary.notes.append(f"{case_id}: affines of prediction and label differ by up to {gap:.3g}; "
                                         "scored voxel by voxel with the label's spacing")
                scores = case_scores(case_id, pred, ref, voxel_spacing(ref_affine))
                summary.scores.extend(scores)
                summary.cases.append(case_id)
                affine = ref_affine
            if png_dir is not None:
                _draw(case_id, pred, ref, affine, images.get(case_id), Path(png_dir), summary)
        except CaseError as err:
            summary.problems.append(str(err))
        except Exception as err:  # one bad case is named, the others still scored
            summary.problems.append(f"{case_id}: {preds[case_id]}: {one_line(err)}")

    _fill_absent_classes(summary)
    if csv is not None:
        write_csv(summary, csv)
    return summary


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~medeman.data.readers.read_volume`; a reader failure is a one-line :class:`CaseError` naming the file."""
    try:
        return read_volume(path)
    except Exception as err:  # any reader failure is reported, never a reader traceback
        raise CaseError(f"{path}: cannot read: {one_line(err)}") from None


def _labels_3d(array: np.ndarray, path: Path) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise CaseError(f"{path}: a label mask must be 3D, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise CaseError(f"{path}: a label mask must hold integer labels, found fractional values")
    return array.astype(np.int64)


def _draw(case_id, pred, ref, affine, image_path, png_dir: Path, summary: EvaluationSummary) -> None:
    from medeman.visualize import save_case_figure  # matplotlib only when pictures are asked for

    image = None
    if image_path is not None:
        try:
            image, _ = _read(image_path)
            image = np.asarray(image, dtype=np.float32)
            image = image[..., 0] if image.ndim == 4 else image
            if image.shape != pred.shape:
                summary.notes.append(f"{case_id}: scan {image_path} has shape {image.shape}, not the mask's "
                                     f"{pred.shape}; drawn without it")
                image = None
        except CaseError as err:
            summary.notes.append(f"{err}; drawn without the scan")
    scores = {s.label: s.dice for s in summary.scores if s.case_id == case_id}
    save_case_figure(png_dir / f"{case_id}.png", pred, affine, reference=ref, image=image, title=case_id, scores=scores)


def _fill_absent_classes(summary: EvaluationSummary) -> None:
    """A class seen in some case but absent from both masks of another scores Dice 1 there (distances NaN)."""
    seen = {(s.case_id, s.label) for s in summary.scores}
    for case_id in summary.cases:
        for label in summary.classes:
            if (case_id, label) not in seen:
                summary.scores.append(ClassScore(case_id, label, 1.0, math.nan, math.nan, 0, 0))
    summary.scores.sort(key=lambda s: (s.case_id, s.label))


def write_csv(summary: EvaluationSummary, path: str | Path) -> Path:
    """One row per case and class, then one row per problem or note (case id and the message)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv_module.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for s in summary.scores:
            writer.writerow([s.case_id, s.label, _num(s.dice), _num(s.hd95), _num(s.asd),
                             s.reference_voxels, s.predicted_voxels, ""])
        for message in summary.problems + summary.notes:
            writer.writerow([message.split(":", 1)[0], "", "", "", "", "", "", message])
    return path


def _num(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.6g}"


def segment_and_score(
    model,
    images_dir: str | Path,
    labels_dir: str | Path | None,
    output_dir: str | Path,
    png_dir: str | Path | None = None,
    csv: str | Path | None = None,
    **infer_options,
):
    """Segment every scan of ``images_dir`` into ``output_dir``, then score and draw them (what ``make demo`` shows).

    Args:
        model: a run folder, ``teacher.pt`` or ``(network, config)``, as for :func:`medeman.infer.infer_cases`.
        infer_options: passed to :func:`~medeman.infer.infer_cases` (``overwrite``, ``tta``, ``device``, ...).

    Returns:
        ``(case results, EvaluationSummary)``; print ``summary.table()`` for the table.
    """
    from medeman.infer import infer_cases

    results = infer_cases(model, images_dir, output_dir, **infer_options)
    summary = evaluate_folder(output_dir, labels_dir, csv=csv, png_dir=png_dir, images_dir=images_dir)
    return results, summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medeman evaluate",
        description="Per case and class Dice, HD95 and average surface distance (mm) of predictions against labels.",
    )
    parser.add_argument("--pred", required=True, help="folder of predicted <case>.nii.gz masks")
    parser.add_argument("--labels", help="folder of reference masks (<case>[_seg|_label|_mask].nii.gz); "
                                         "leave out to only draw --png pictures")
    parser.add_argument("--csv", help="write per-case, per-class scores to this CSV file")
    parser.add_argument("--png", help="write one picture per case into this folder")
    parser.add_argument("--images", help="folder of the scans, drawn under the contours in --png pictures")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``medeman evaluate``: 0 when every label was scored, 1 when any case could not be, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    if args.labels is None and args.png is None:
        print("error: give --labels to score, or --png to draw the predictions", file=sys.stderr)
        return 2
    try:
        summary = evaluate_folder(args.pred, args.labels, csv=args.csv, png_dir=args.png, images_dir=args.images)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in summary.notes:
        print(f"note: {note}")
    for problem in summary.problems:
        print(f"error: {problem}", file=sys.stderr)
    if args.labels is not None:
        print(summary.table())
    if args.csv:
        print(f"scores written to {args.csv}")
    if args.png:
        print(f"pictures written to {args.png}")
    if args.labels is not None and not summary.cases:
        print(f"error: no case of {args.pred} could be scored against {args.labels}", file=sys.stderr)
        return 1
    return 1 if summary.problems else 0
