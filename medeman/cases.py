"""Cases: the scans a command works on, found on disk, read and preprocessed for the model, or
refused with one line that names the file (shared by ``medeman infer``, ``rank`` and ``evaluate``).

A folder of DICOM files is a folder of scans too: each series in it is a case
(:mod:`medeman.data.dicom`), read into a volume file in a temporary folder the cases keep alive.

Typical use::

    cases, problems = find_cases("sample_data/test/images")
    image = preprocess_case(cases[0], cfg, preprocessing(cfg, keys=("image",)))   # or CaseError
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from medeman.data.dicom import DicomSeries, dicom_files, find_series, is_dicom_file, write_series_volume
from medeman.data.discovery import group_channels, image_entry, list_images
from medeman.data.readers import IMAGE_SUFFIXES, image_suffix
from medeman.typed_config import Config, as_config

# The formats medeman reads, as messages and --help list them: the usual .nii.gz first.
SUFFIXES = (".nii.gz", *(s for s in IMAGE_SUFFIXES if s != ".nii.gz"))


class CaseError(RuntimeError):
    """A case that cannot be segmented; the message names the file and the reason in one line."""


@dataclass
class Case:
    """One scan to segment: its id and its image files, one per channel in channel order.

    A DICOM series has one file, its volume in a temporary folder (written when first read; the
    folder goes when the last case holding it does), and ``series`` says where it came from.
    """

    case_id: str
    files: list[Path]
    series: DicomSeries | None = None
    _scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False, compare=False)

    @property
    def source(self) -> str:
        """What messages name: the first image file, or the DICOM series' folder and number."""
        return self.series.where if self.series is not None else str(self.files[0])


def find_cases(
    inputs: str | Path | Sequence[str | Path], in_channels: int = 1, skipped: list[str] | None = None
) -> tuple[list[Case], list[str]]:
    """Group image files into cases by medeman's one case-id rule (:func:`medeman.data.discovery.case_key`).

    With one channel each file is a case named after it, a trailing ``_0000`` dropped (so
    ``liver_0007.nii.gz`` stays ``liver_0007``); with more, ``<case>_0000``, ``<case>_0001``, ...
    are grouped per case. Training and evaluation name cases by the same rule.

    A folder's DICOM files (below it too) are grouped into series, one case each; a broken series
    is a problem, a non-image one is appended to ``skipped`` with its reason.

    Returns:
        ``(cases, problems)``; a problem is a one-line message naming the file of a case whose
        channel files are incomplete or whose id is given twice, or a DICOM series that is not a volume.
    """
    series_cases: list[Case] = []
    series_problems: list[str] = []
    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if path.is_dir():
            files = list_images(path)
            if dicom_files(path):
                if in_channels != 1:
                    raise ValueError(
                        f"{path}: DICOM series are single-channel scans; the model takes {in_channels} channels"
                    )
                series_cases, series_problems = _series_cases(path, skipped)
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such input file or folder")
    else:
        files = [Path(p) for p in inputs]
    unsupported = [f for f in files if image_suffix(f.name) is None]
    if unsupported and is_dicom_file(unsupported[0]):
        raise ValueError(
            f"{unsupported[0]}: one DICOM slice; give the folder of its series (each series there is a scan)"
        )
    if unsupported:
        raise ValueError(f"{unsupported[0]}: not an image file medeman reads ({', '.join(SUFFIXES)})")

    groups, problems = group_channels(files, in_channels)
    cases = [Case(case_id, channel_files) for case_id, channel_files in groups.items()]
    for case in series_cases:
        if case.case_id in groups:
            problems.append(
                f"{case.source}: case id {case.case_id} is also the image file {groups[case.case_id][0]}; left out"
            )
        else:
            cases.append(case)
    return cases, problems + series_problems


def _series_cases(folder: Path, skipped: list[str] | None) -> tuple[list[Case], list[str]]:
    found = find_series(folder)
    if skipped is not None:
        skipped.extend(found.skipped)
    if not found.series:
        return [], found.errors
    scratch = tempfile.TemporaryDirectory(prefix="medeman-dicom-")
    cases = [Case(s.case_id, [Path(scratch.name) / f"{s.case_id}.nii"], s, scratch) for s in found.series]
    return cases, found.errors


def case_volume(case: Case) -> list[Path]:
    """The case's image files, a DICOM series' volume written first if it is not yet."""
    if case.series is not None and not case.files[0].exists():
        write_series_volume(case.series, case.files[0])
    return case.files


def preprocess_case(case: Case, cfg: Config | dict, transform) -> torch.Tensor:
    """Read and preprocess one case for the model; raise CaseError with a one-line reason.

    Shared by ``medeman infer`` and ``medeman rank`` so both refuse the same scans with the same words.
    """
    try:
        case_volume(case)
        data = transform({"image": image_entry(case.files)})
    except Exception as err:
        raise CaseError(f"{case.source}: cannot read or preprocess: {one_line(err)}") from None
    image = data["image"]
    expected = as_config(cfg).data.in_channels
    if image.shape[0] != expected:
        raise CaseError(f"{case.source}: has {image.shape[0]} channel(s), the model takes {expected}")
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
