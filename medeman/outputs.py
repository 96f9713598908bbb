"""Where the commands put a case's files: one rule per kind of output, so what ``infer`` writes ``evaluate`` reads.

A case id is the one of :func:`medeman.data.discovery.case_key` (scans) or
:func:`~medeman.data.discovery.label_id` (reference labels); an output file is named by the case id
alone, so every command finds a case's files without a table.

Typical use::

    mask_path("runs/demo/pred", "case_007")            # runs/demo/pred/case_007.nii.gz
    probabilities_path("runs/demo/pred", "case_007")   # runs/demo/pred/case_007_probs.nii.gz
    prediction_id("runs/demo/pred/case_007.nii.gz")    # "case_007"; None for a _probs map
"""

from __future__ import annotations

from pathlib import Path

from medeman.data.readers import image_stem

PROBABILITIES_SUFFIX = "_probs"
"""Ends the name of a class-probability map (``<case>_probs.nii.gz``), which is no mask to score."""


def mask_path(folder: str | Path, case_id: str, suffix: str = ".nii.gz") -> Path:
    """The predicted mask of ``case_id`` (``suffix`` names the format: ``.nii.gz``, ``.nrrd``, ``.dcm``)."""
    return Path(folder) / f"{case_id}{suffix}"


def probabilities_path(folder: str | Path, case_id: str) -> Path:
    """The class-probability map of ``case_id`` (``medeman infer --probabilities``)."""
    return Path(folder) / f"{case_id}{PROBABILITIES_SUFFIX}.nii.gz"


def uncertainty_path(folder: str | Path, case_id: str) -> Path:
    """The teacher's normalized-entropy map of ``case_id`` (``medeman rank --maps``)."""
    return Path(folder) / "uncertainty" / f"{case_id}.nii.gz"


def picture_path(folder: str | Path, case_id: str) -> Path:
    """The picture of ``case_id`` (``medeman evaluate --png``)."""
    return Path(folder) / f"{case_id}.png"


def prediction_id(path: str | Path) -> str | None:
    """The case id of a predicted mask file: its name without suffix; None for a probability map."""
    stem = image_stem(path)
    return None if stem.endswith(PROBABILITIES_SUFFIX) else stem
