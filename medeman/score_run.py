"""Segment a folder of scans with a model, then score the masks: inference and evaluation in one call.

What ``make demo`` and the benchmarks run on a test cohort. It sits above both commands, so that
:mod:`medeman.evaluate` never imports inference: evaluation scores any folder of masks, whoever made them.

Typical use::

    results, summary = segment_and_score("runs/demo", "sample_data/test/images", "sample_data/test/labels",
                                         "runs/demo/pred", csv="runs/demo/test_scores.csv")
    print(summary.table())
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from medeman.checkpoint import load_teacher
from medeman.classes import class_names as config_names, lesion_classes as config_lesions
from medeman.evaluate import evaluate_folder
from medeman.infer import infer_cases
from medeman.metrics import DEFAULT_LESION_OVERLAP


def segment_and_score(
    model,
    images_dir: str | Path,
    labels_dir: str | Path | None,
    output_dir: str | Path,
    png_dir: str | Path | None = None,
    csv: str | Path | None = None,
    class_names: dict[int, str] | None = None,
    lesion_overlap: float = DEFAULT_LESION_OVERLAP,
    lesion_classes: Iterable[int] | None = None,
    **infer_options,
):
    """Segment every scan of ``images_dir`` into ``output_dir``, then score and draw them (what ``make demo`` shows).

    Args:
        model: a run folder, ``teacher.pt`` or ``(network, config)``, as for :func:`medeman.infer.infer_cases`.
        class_names, lesion_overlap, lesion_classes: as for :func:`medeman.evaluate.evaluate_folder`; names and lesion
            classes left out (None) are the model's own (``data.labels``, ``data.lesion_classes``).
        infer_options: passed to :func:`~medeman.infer.infer_cases` (``overwrite``, ``tta``, ``device``, ...).

    Returns:
        ``(case results, EvaluationSummary)``; print ``summary.table()`` for the table.
    """
    # a run folder goes to infer_cases as it is, so the masks are exactly medeman infer's (its post-processing included)
    cfg = load_teacher(model)[1] if isinstance(model, (str, Path)) else model[1]
    class_names = config_names(cfg) if class_names is None else class_names
    lesion_classes = config_lesions(cfg) if lesion_classes is None else lesion_classes
    results = infer_cases(model, images_dir, output_dir, **infer_options)
    summary = evaluate_folder(
        output_dir,
        labels_dir,
        csv=csv,
        png_dir=png_dir,
        images_dir=images_dir,
        class_names=class_names,
        lesion_overlap=lesion_overlap,
        lesion_classes=lesion_classes,
    )
    return results, summary
