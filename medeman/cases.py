"""Cases: the scans a command works on, found on disk, read and preprocessed for the model, or
refused with one line that names the file (shared by ``medeman infer``, ``rank`` and ``evaluate``).

Typical use::

    cases, problems = find_cases("sample_data/test/images")
    image = preprocess_case(cases[0], cfg, preprocessing(cfg, keys=("image",)))   # or CaseError
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from medeman.data.discovery import group_channels, image_entry, list_images
from medeman.data.readers import IMAGE_SUFFIXES, image_suffix

# The formats medeman reads, as messages and --help list them: the usual .nii.gz first.
SUFFIXES = (".nii.gz", *(s for s in IMAGE_SUFFIXES if s != ".nii.gz"))


class CaseError(RuntimeError):
    """A case that cannot be segmented; the message names the file and the reason in one line."""


@dataclass
class Case:
    """One scan to segment: its id and its image files, one per channel in channel order."""

    case_id: str
    files: list[Path]


def find_cases(inputs: str | Path | Sequence[str | Path], in_channels: int = 1) -> tuple[list[Case], list[str]]:
    """Group image files into cases by medeman's one case-id rule (:func:`medeman.data.discovery.case_key`).

    With one channel each file is a case named after it, a trailing ``_0000`` dropped (so
    ``liver_0007.nii.gz`` stays ``liver_0007``); with more, ``<case>_0000``, ``<case>_0001``, ...
    are grouped per case. Training and evaluation name cases by the same rule.

    Returns:
        ``(cases, problems)``; a problem is a one-line message naming the file of a case whose
        channel files are incomplete or whose id is given twice.
    """
    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if path.is_dir():
            files = list_images(path)
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such input file or folder")
    else:
        files = [Path(p) for p in inputs]
    unsupported = [f for f in files if image_suffix(f.name) is None]
    if unsupported:
        raise ValueError(f"{unsupported[0]}: not an image file medeman reads ({', '.join(SUFFIXES)})")

    groups, problems = group_channels(files, in_channels)
    cases = [Case(case_id, channel_files) for case_id, channel_files in groups.items()]
    return cases, problems


def preprocess_case(case: Case, cfg: dict, transform) -> torch.Tensor:
    """Read and preprocess one case for the model; raise CaseError with a one-line reason.

    Shared by ``medeman infer`` and ``medeman rank`` so both refuse the same scans with the same words.
    """
    try:
        data = transform({"image": image_entry(case.files)})
    except Exception as err:
        raise CaseError(f"{case.files[0]}: cannot read or preprocess: {one_line(err)}") from None
    image = data["image"]
    expected = int(cfg["data"]["in_channels"])
    if image.shape[0] != expected:
        raise CaseError(f"{case.files[0]}: has {image.shape[0]} channel(s), the model takes {expected}")
    if not torch.isfinite(image).all():
        raise CaseError(_nonfinite_message(case))
    return image


def _nonfinite_message(case: Case) -> str:
    """The problem of a case whose preprocessed image is not finite, in train's words (:func:`nonfinite_problem`).

    A NaN in the scan spreads through resampling, so the raw files are read again (only on this
    failure) to name the file and count its voxels as ``medeman train`` and ``check-data`` do.
    """
    from medeman.data.checks import nonfinite_problem
    from medeman.data.readers import read_volume

    for path in case.files:
        try:
            problem = nonfinite_problem(path, read_volume(path)[0])
        except Exception:  # unreadable on a second read: the generic line below still names the case
            continue
        if problem:
            return f"{problem}; refused (replace them, e.g. with the scan's minimum, and run again)"
    return f"{case.files[0]}: preprocessing gave NaN/Inf intensities; refused"


def prepare_output_dir(folder: Path) -> None:
    """Create the output folder, or raise ValueError in one line: a file in its way, or no permission to write there."""
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == folder else f"{parent} is a file"
            raise ValueError(f"{folder}: {where}, not a folder; choose another output folder")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{folder}: cannot create the output folder ({err.strerror or one_line(err)})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: the output folder is not writable; choose another output folder")


def one_line(err: BaseException) -> str:
    """The innermost cause of ``err`` as one short line (MONAI wraps reader errors in transform errors)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."
