"""Dice, HD95 and average surface distance of predicted masks against reference labels, in millimetres.

Cases are matched by id: ``<case>.nii.gz`` predictions against ``<case>[_seg|_label|_mask].nii.gz``
labels (``.nii``, ``.nrrd`` and ``.mha`` too). Each class present in either mask is scored with
MONAI's ``compute_dice``, ``compute_hausdorff_distance(percentile=95)`` and
``compute_average_surface_distance(symmetric=True)`` (what ``DiceMetric``,
``HausdorffDistanceMetric`` and ``SurfaceDistanceMetric`` compute), with the label file's voxel
spacing so distances are in mm.

Empty masks: a class absent from exactly one of prediction and reference scores Dice 0. A class
seen in some case but absent from both masks of another is not scored there: its Dice is NaN with
the note "absent from prediction and reference", left out of the class mean, and the table says in
how many cases (a Dice of 1 for every empty case would make a class the model never predicts look
good). A surface distance needs two surfaces, so HD95 and ASD are NaN when either mask of the class
is empty; summary means leave NaN out and say over how many cases they were taken. A class in some
reference but in no prediction is warned about: the model may not predict it at all.

Lesion-wise figures (only for the classes marked as lesions, tumours, nodules: ``data.lesion_classes``
or ``--lesion-classes``; an organ is one structure, where component counts read as noise): each mask of the class is split
into connected components (:func:`scipy.ndimage.label`, 26-neighbourhood by default). A reference
lesion is *detected* when the predicted components that touch it cover it with an IoU of at least
``lesion_overlap`` (0: any overlap); a predicted component is a *true positive* under the same rule
against the reference lesions it touches, else a *false positive*. Sensitivity = detected /
reference lesions, precision = true-positive components / predicted components, F1 their harmonic
mean; the summary pools the counts over cases. One component covering two separate reference
lesions detects both and is one true positive; two lesions that touch are one component, as in
every connected-component count. Lesion-wise Dice (BraTS 2023): per reference lesion, the Dice
with the predicted components touching it (0 when none), averaged with a 0 for every predicted
component that touches no reference lesion; 1 when a case has neither.

Here: matching folders, the summary table, the CSV and the pictures. The scores themselves are
:mod:`medeman.metrics`, class names :mod:`medeman.classes`, file names :mod:`medeman.outputs`;
segmenting then scoring in one call is :func:`medeman.score_run.segment_and_score`.

Typical use::

    summary = evaluate_folder("runs/demo/pred", "sample_data/test/labels", csv="runs/demo/metrics.csv")
    print(summary.table())
"""

from __future__ import annotations

import argparse
import csv as csv_module
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from medeman.data.checks import nonfinite_problem
from medeman.data.discovery import group_channels, index_by_case, label_id, list_images
from medeman.data.readers import read_volume, voxel_spacing
from medeman.cases import CaseError, one_line
from medeman.classes import load_class_names, load_lesion_classes, resolve_classes
from medeman.checkpoint import ModelFileError, read_teacher_file
from medeman.metrics import (  # noqa: F401  (re-exported: the scores were defined here before medeman.metrics)
    DEFAULT_LESION_OVERLAP,
    ClassScore,
    LesionCounts,
    case_scores,
    f1_score,
    lesion_counts,
    mask_scores,
)
from medeman.outputs import picture_path, prediction_id
from medeman.postprocess import apply_postprocessing, class_scales, describe

label_case_id = label_id  # a label file's case id: name without image suffix and without _seg/_label/_mask
CSV_COLUMNS = (
    "case",
    "class",
    "name",
    "dice",
    "hd95_mm",
    "asd_mm",
    "reference_voxels",
    "predicted_voxels",
    "reference_lesions",
    "detected_lesions",
    "missed_lesions",
    "predicted_lesions",
    "false_positive_lesions",
    "lesion_sensitivity",
    "lesion_precision",
    "lesion_f1",
    "lesion_dice",
    "note",
)
ABSENT_NOTE = "absent from prediction and reference"


@dataclass
class EvaluationSummary:
    """Every score, the per-class mean ± std, and one line per case that could not be scored."""

    scores: list[ClassScore] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # unreadable, mismatched, missing prediction
    notes: list[str] = field(default_factory=list)  # predictions without a label, affine warnings
    warnings: list[str] = field(default_factory=list)  # label values no prediction contains
    cases: list[str] = field(default_factory=list)  # the case ids that were scored
    class_names: dict[int, str] = field(default_factory=dict)  # shown beside the label values
    lesion_overlap: float = DEFAULT_LESION_OVERLAP
    lesion_classes: list[int] = field(default_factory=list)  # scored lesion-wise; the others are organs

    @property
    def classes(self) -> list[int]:
        return sorted({s.label for s in self.scores})

    def class_name(self, label: int) -> str:
        """``"2 kidneys"`` when the class has a name, else ``"2"``."""
        name = self.class_names.get(int(label))
        return f"{label} {name}" if name else str(label)

    def lesion_totals(self) -> dict[int, dict[str, float]]:
        """Per class, lesion counts pooled over cases, sensitivity, precision and F1 of the pooled counts,
        and the lesion-wise Dice's mean and std over cases."""
        out = {}
        for label in self.classes:
            counts = [s.lesions for s in self.scores if s.label == label and s.lesions is not None]
            if not counts:
                continue
            total = {
                key: sum(getattr(c, key) for c in counts)
                for key in ("reference", "detected", "missed", "predicted", "true_positive", "false_positive")
            }
            total["sensitivity"] = total["detected"] / total["reference"] if total["reference"] else math.nan
            total["precision"] = total["true_positive"] / total["predicted"] if total["predicted"] else math.nan
            total["f1"] = f1_score(total["sensitivity"], total["precision"])
            dice = np.array([c.dice for c in counts], dtype=float)
            dice = dice[np.isfinite(dice)]  # cases where the class is in neither mask
            total["dice_mean"] = float(dice.mean()) if len(dice) else math.nan
            total["dice_std"] = float(dice.std()) if len(dice) else math.nan
            out[label] = total
        return out

    def lesion_table(self) -> str:
        """Lesion-wise detection per class: counts summed over cases, sensitivity/precision/F1 of the sums."""
        rule = "any overlap" if self.lesion_overlap <= 0 else f"IoU >= {self.lesion_overlap:g}"
        lines = [f"Lesion-wise (connected components; a lesion is detected at {rule}; counts summed over cases)"]
        width = max([7] + [len(self.class_name(c)) + 2 for c in self.classes])
        lines.append(
            f"{'class':<{width}}{'lesions':>8}{'detected':>9}{'missed':>7}{'predicted':>10}{'FP':>5}"
            f"{'sensitivity':>12}{'precision':>10}{'F1':>7}  lesion Dice"
        )
        for label, t in self.lesion_totals().items():

            def rate(value: float) -> str:
                return "n/a" if not math.isfinite(value) else f"{value:.3f}"

            lines.append(
                f"{self.class_name(label):<{width}}{t['reference']:>8}{t['detected']:>9}{t['missed']:>7}"
                f"{t['predicted']:>10}{t['false_positive']:>5}{rate(t['sensitivity']):>12}"
                f"{rate(t['precision']):>10}{rate(t['f1']):>7}  {t['dice_mean']:.3f} ± {t['dice_std']:.3f}"
            )
        return "\n".join(lines)

    def per_class(self) -> dict[int, dict[str, float]]:
        """Per class: ``n`` cases, ``dice_mean``/``dice_std``, and ``hd95_*``/``asd_*`` over finite values with their ``*_n``."""
        out = {}
        for label in self.classes:
            rows = [s for s in self.scores if s.label == label]
            stats: dict[str, float] = {"n": len(rows), "absent_n": sum(s.note == ABSENT_NOTE for s in rows)}
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
        width = max([7] + [len(self.class_name(c)) + 2 for c in self.classes])
        lines.append(f"{'class':<{width}}{'cases':>6}  {'Dice':<22}{'HD95 mm':<22}{'ASD mm':<22}")
        for label, st in self.per_class().items():

            def cell(name: str, digits: int) -> str:
                if not st[f"{name}_n"]:
                    return "n/a"
                text = f"{st[f'{name}_mean']:.{digits}f} ± {st[f'{name}_std']:.{digits}f}"
                return text if st[f"{name}_n"] == st["n"] else f"{text} (n={st[f'{name}_n']})"

            lines.append(
                f"{self.class_name(label):<{width}}{st['n']:>6}  {cell('dice', 3):<22}{cell('hd95', 2):<22}{cell('asd', 2):<22}"
            )
        for label, st in self.per_class().items():
            if st["absent_n"]:
                lines.append(
                    f"class {self.class_name(label)}: {ABSENT_NOTE} in {st['absent_n']} of {st['n']} case(s), "
                    f"not scored there (its Dice is over the other {st['n'] - st['absent_n']})"
                )
        if not self.classes:
            lines.append("(no foreground class in any prediction or reference)")
        elif self.lesion_totals():
            lines += ["", self.lesion_table()]
        return "\n".join(lines)


def _index(files: list[Path], case_id, what: str, problems: list[str]) -> dict[str, Path]:
    return index_by_case(files, case_id, problems, f"{{id}}: two {what} files, {{first}} and {{file}}; using the first")


def _image_index(images_dir: Path) -> dict[str, Path]:
    """Scans by case id, named by the rule of training and inference (:func:`medeman.data.discovery.case_key`):
    ``<case>_0000`` (a first channel, drawn under the contours) or ``<case>``."""
    groups, _ = group_channels(list_images(images_dir), 1)  # pictures only: a clash just goes undrawn
    return {case_id: files[0] for case_id, files in groups.items()}


def evaluate_folder(
    pred_dir: str | Path,
    label_dir: str | Path | None,
    csv: str | Path | None = None,
    png_dir: str | Path | None = None,
    images_dir: str | Path | None = None,
    class_names: dict[int, str] | None = None,
    lesion_overlap: float = DEFAULT_LESION_OVERLAP,
    connectivity: int = 3,
    lesion_classes: Iterable[int] = (),
    postprocessing: dict | None = None,
) -> EvaluationSummary:
    """Score every prediction in ``pred_dir`` against its label in ``label_dir``.

    Args:
        pred_dir: ``<case>.nii.gz`` masks (``*_probs.*`` maps are ignored).
        label_dir: reference masks; None only draws pictures.
        csv: write one row per case and class (and one per problem) here.
        png_dir: write ``<case>.png`` per case (see :func:`medeman.visualize.save_case_figure`).
        images_dir: the scans, drawn under the contours when given.
        class_names: names by label value for the table, CSV and pictures (see :func:`load_class_names`).
        lesion_overlap: IoU a lesion needs to count as detected (0: any overlap); see :func:`lesion_counts`.
        connectivity: neighbourhood of the connected components, 1 (6), 2 (18) or 3 (26 neighbours).
        lesion_classes: label values scored lesion-wise (connected components); none by default.
        postprocessing: component rules (:mod:`medeman.postprocess`) applied to each prediction before scoring.

    Returns:
        The :class:`EvaluationSummary`; nothing is printed.
    """
    pred_dir = Path(pred_dir)
    summary = EvaluationSummary(
        class_names=dict(class_names or {}),
        lesion_overlap=float(lesion_overlap),
        lesion_classes=sorted(int(c) for c in lesion_classes),
    )
    if not 0.0 <= summary.lesion_overlap <= 1.0:
        raise ValueError(f"lesion overlap {lesion_overlap!r} must be an IoU in [0, 1] (0: any overlap)")
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: no such prediction folder")
    preds = _index(
        [p for p in list_images(pred_dir) if prediction_id(p) is not None],
        prediction_id,
        "prediction",
        summary.problems,
    )
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
            pred = apply_postprocessing(pred, postprocessing, float(np.prod(voxel_spacing(affine))))
            ref = None
            if case_id in labels:
                ref, ref_affine = _read(labels[case_id])
                ref = _labels_3d(ref, labels[case_id])
                if pred.shape != ref.shape:
                    raise CaseError(
                        f"{case_id}: prediction {preds[case_id]} has shape {pred.shape}, "
                        f"label {labels[case_id]} has {ref.shape}; not scored"
                    )
                gap = float(np.abs(affine - ref_affine).max())
                if gap > 1e-3:
                    summary.notes.append(
                        f"{case_id}: affines of prediction and label differ by up to {gap:.3g}; "
                        "scored voxel by voxel with the label's spacing"
                    )
                scores = case_scores(
                    case_id, pred, ref, voxel_spacing(ref_affine), lesion_overlap, connectivity, summary.lesion_classes
                )
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
    summary.warnings.extend(never_predicted(summary))
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
        if not np.isfinite(array).all():
            raise CaseError(f"{path}: NaN/Inf label values")
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
            problem = nonfinite_problem(image_path, image)
            if problem:  # refused as train refuses it; the masks are still drawn
                summary.problems.append(f"{problem}; refused, {case_id} drawn without the scan")
                image = None
            elif image.shape != pred.shape:
                summary.notes.append(
                    f"{case_id}: scan {image_path} has shape {image.shape}, not the mask's "
                    f"{pred.shape}; drawn without it"
                )
                image = None
        except CaseError as err:
            summary.notes.append(f"{err}; drawn without the scan")
    scores = {s.label: s.dice for s in summary.scores if s.case_id == case_id}
    save_case_figure(
        picture_path(png_dir, case_id),
        pred,
        affine,
        reference=ref,
        image=image,
        title=case_id,
        scores=scores,
        names=summary.class_names,
    )


def _fill_absent_classes(summary: EvaluationSummary) -> None:
    """A class seen in some case but absent from both masks of another gets a row there that says so (no scores)."""
    seen = {(s.case_id, s.label) for s in summary.scores}
    for case_id in summary.cases:
        for label in summary.classes:
            if (case_id, label) not in seen:
                lesions = LesionCounts(dice=math.nan) if label in summary.lesion_classes else None
                summary.scores.append(
                    ClassScore(case_id, label, math.nan, math.nan, math.nan, 0, 0, lesions, note=ABSENT_NOTE)
                )
    summary.scores.sort(key=lambda s: (s.case_id, s.label))


def never_predicted(summary: EvaluationSummary) -> list[str]:
    """One warning per label value found in some reference but in no prediction (the model may not know the class)."""
    out = []
    for label in summary.classes:
        rows = [s for s in summary.scores if s.label == label]
        in_reference = sum(s.reference_voxels > 0 for s in rows)
        if in_reference and not any(s.predicted_voxels > 0 for s in rows):
            out.append(
                f"class {summary.class_name(label)}: in the labels of {in_reference} case(s) but in no prediction "
                "(does the model predict this class? check data.num_classes and the label values)"
            )
    return out


def write_csv(summary: EvaluationSummary, path: str | Path) -> Path:
    """One row per case and class, then one row per problem or note (case id and the message)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv_module.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for s in summary.scores:
            les = s.lesions
            lesion_cells = (
                [""] * 9
                if les is None
                else [  # an organ's cells stay empty
                    les.reference,
                    les.detected,
                    les.missed,
                    les.predicted,
                    les.false_positive,
                    _num(les.sensitivity),
                    _num(les.precision),
                    _num(les.f1),
                    _num(les.dice),
                ]
            )
            writer.writerow(
                [
                    s.case_id,
                    s.label,
                    summary.class_names.get(s.label, ""),
                    _num(s.dice),
                    _num(s.hd95),
                    _num(s.asd),
                    s.reference_voxels,
                    s.predicted_voxels,
                    *lesion_cells,
                    s.note,
                ]
            )
        for message in summary.problems + summary.warnings + summary.notes:
            writer.writerow([message.split(":", 1)[0]] + [""] * (len(CSV_COLUMNS) - 2) + [message])
    return path


def _num(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.6g}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medeman evaluate",
        description="Per case and class Dice, HD95 and average surface distance (mm) of predictions against labels.",
    )
    parser.add_argument("--pred", required=True, help="folder of predicted <case>.nii.gz masks")
    parser.add_argument(
        "--labels",
        help="folder of reference masks (<case>[_seg|_label|_mask].nii.gz); leave out to only draw --png pictures",
    )
    parser.add_argument("--csv", help="write per-case, per-class scores to this CSV file")
    parser.add_argument("--png", help="write one picture per case into this folder")
    parser.add_argument("--images", help="folder of the scans, drawn under the contours in --png pictures")
    parser.add_argument(
        "--classes",
        help="class names for the table and pictures: a dataset.json, a config or run folder "
        "(data.labels), or '1=liver,2=kidneys' / 'liver,kidneys'",
    )
    parser.add_argument(
        "--lesion-classes",
        help="classes scored lesion-wise (connected components), by value or name: "
        "'3' or 'lesion,cyst' (default: data.lesion_classes of a --classes "
        "config or run folder, else none: organs get no lesion-wise table)",
    )
    parser.add_argument(
        "--lesion-overlap",
        type=float,
        default=DEFAULT_LESION_OVERLAP,
        help="IoU with the prediction a reference lesion (connected component) needs to count as "
        f"detected; 0 means any overlap (default {DEFAULT_LESION_OVERLAP})",
    )
    parser.add_argument(
        "--connectivity",
        type=int,
        default=3,
        choices=(1, 2, 3),
        help="connected components over 6 (1), 18 (2) or 26 (3, default) neighbours",
    )
    parser.add_argument(
        "--postprocessing",
        metavar="MODEL",
        help="also score the predictions after MODEL's component rules learned on validation (run folder or "
        "teacher.pt; predictions from medeman infer --no-postprocessing): tables before and after",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``medeman evaluate``: 0 when every label was scored, 1 when any case could not be, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    if args.labels is None and args.png is None:
        print("error: give --labels to score, or --png to draw the predictions", file=sys.stderr)
        return 2
    try:
        names = load_class_names(args.classes) if args.classes else None
        if args.lesion_classes is not None:
            lesions = resolve_classes(args.lesion_classes, names, where="--lesion-classes")
        else:
            lesions = load_lesion_classes(args.classes) if args.classes else []
        summary = evaluate_folder(
            args.pred,
            args.labels,
            csv=args.csv,
            png_dir=args.png,
            images_dir=args.images,
            class_names=names,
            lesion_overlap=args.lesion_overlap,
            connectivity=args.connectivity,
            lesion_classes=lesions,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.postprocessing and args.labels is not None:
        try:
            rules = read_teacher_file(args.postprocessing)["extra"].get("postprocessing")
        except ModelFileError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        after = evaluate_folder(
            args.pred,
            args.labels,
            class_names=names,
            lesion_overlap=args.lesion_overlap,
            connectivity=args.connectivity,
            postprocessing=rules,
        )
        print(f"as predicted ({args.pred}):\n{summary.table()}\n")
        print(f"after the post-processing of {args.postprocessing} ({describe(rules)}):")
        if any(s != 1.0 for s in class_scales(rules) or []):
            print(
                f"note: {args.postprocessing} also scales class probabilities before the argmax, which masks cannot "
                "show: the table applies its component rules only (medeman infer with post-processing applies both)"
            )
        summary = after
    for note in summary.notes:
        print(f"note: {note}")
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
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
