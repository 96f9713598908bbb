"""DICOM series as scans: found in a folder, checked slice by slice, read as one volume.

Every series in a folder (searched recursively, grouped by ``SeriesInstanceUID``) is one scan,
its slices ordered by their position along the slice normal. A series medeman cannot make a
volume of is named in one line: an *error* when it should be a volume but is broken (slices
missing, unevenly spaced, of mixed size or orientation, two at one position), a *skip* when it is
not a volume at all (a segmentation, structure set or report, a one-slice localizer, a multi-frame
object). Headers are read with pydicom (the ``deploy`` extra), pixels with SimpleITK (GDCM), which
applies the rescale slope and intercept (CT in HU) and gives the geometry in LPS.

Typical use::

    found = find_series("study/")            # found.series, found.errors, found.skipped
    image = read_series(found.series[0])     # a SimpleITK image
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Modalities that are never an image volume (segmentations, structure sets, reports, plans, ...)
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "PLAN"}
POSITION_TOLERANCE = 0.01  # a slice step may differ from the series' median step by this fraction
GAP_FACTOR = 1.5  # a step this many median steps long means slices are missing


@dataclass
class DicomSeries:
    """One image series: its files in slice order (along the slice normal) and what names it."""

    uid: str
    files: list[Path]
    folder: Path
    number: str = ""
    description: str = ""
    modality: str = ""
    case_id: str = ""

    @property
    def where(self) -> str:
        """How messages name the series: its folder and number or UID."""
        label = f"series {self.number}" if self.number else f"series {self.uid}"
        return f"{self.folder} ({label}{', ' + self.description if self.description else ''})"


@dataclass
class FoundSeries:
    """The outcome of :func:`find_series`: usable series, broken ones (errors) and non-volumes (skips)."""

    series: list[DicomSeries] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ImportError("reading DICOM needs pydicom: pip install 'medeman[deploy]'") from None
    return pydicom


def is_dicom_file(path: Path) -> bool:
    """A Part 10 DICOM file: ``DICM`` after the 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files in ``folder`` and below it (hidden files left out), sorted."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def find_series(folder: str | Path) -> FoundSeries:
    """Group the DICOM files below ``folder`` into series and check each; see the module docstring."""
    pydicom = _pydicom()
    folder = Path(folder)
    found = FoundSeries()
    headers: dict[str, list[tuple[Path, object]]] = {}
    for path in dicom_files(folder):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as err:  # a damaged header names its file; the other files still count
            found.errors.append(
                f"{path}: not a readable DICOM file: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            )
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            found.errors.append(f"{path}: no SeriesInstanceUID; cannot tell which series it belongs to")
            continue
        headers.setdefault(uid, []).append((path, ds))
    for uid, items in headers.items():
        series, error, skip = _check_series(uid, items)
        if error:
            found.errors.append(error)
        elif skip:
            found.skipped.append(skip)
        else:
            found.series.append(series)
    _name_cases(found.series, folder)
    return found


def _check_series(uid: str, items: list[tuple[Path, object]]) -> tuple[DicomSeries | None, str, str]:
    """``(series, "", "")`` for a usable series, else ``(None, error, "")`` or ``(None, "", skip reason)``."""
    paths = [p for p, _ in items]
    first = items[0][1]
    folders = sorted({p.parent for p in paths})
    series = DicomSeries(
        uid,
        paths,
        folders[0] if len(folders) == 1 else Path(*_common_parts(folders)),
        str(getattr(first, "SeriesNumber", "") or ""),
        str(getattr(first, "SeriesDescription", "") or ""),
        str(getattr(first, "Modality", "") or ""),
    )
    where = series.where
    if series.modality in NON_IMAGE_MODALITIES:
        return None, "", f"{where}: a {series.modality} object, not an image series"
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for _, ds in items):
        return None, "", f"{where}: multi-frame (enhanced) DICOM; export it as single-frame slices"
    if not all(
        hasattr(ds, "Rows")
        and hasattr(ds, "ImagePositionPatient")
        and hasattr(ds, "ImageOrientationPatient")
        and hasattr(ds, "PixelSpacing")
        for _, ds in items
    ):
        return (
            None,
            "",
            f"{where}: no image geometry (Rows, ImagePositionPatient, ImageOrientationPatient, PixelSpacing)",
        )
    if len(items) == 1:
        return None, "", f"{where}: one slice, not a volume"
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in items])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        return None, f"{where}: mixes slices of different orientations; split it into one series per orientation", ""
    sizes = {(int(ds.Rows), int(ds.Columns), *(round(float(v), 4) for v in ds.PixelSpacing)) for _, ds in items}
    if len(sizes) > 1:
        return None, f"{where}: mixes slices of different sizes or pixel spacings: {sorted(sizes)}", ""
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    depth = np.array([float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for _, ds in items])
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    series.files = [paths[i] for i in order]
    steps = np.diff(depth)
    if steps.min() < 1e-3:
        i = int(steps.argmin())
        return (
            None,
            f"{where}: two slices at one position ({depth[i]:.2f} mm): {series.files[i].name}, {series.files[i + 1].name}",
            "",
        )
    step = float(np.median(steps))
    if steps.max() > GAP_FACTOR * step:
        i = int(steps.argmax())
        missing = int(round(steps[i] / step)) - 1
        return (
            None,
            (
                f"{where}: slices missing: a {steps[i]:.2f} mm gap between {depth[i]:.2f} and {depth[i + 1]:.2f} mm "
                f"where slices are {step:.2f} mm apart (about {missing} slice(s))"
            ),
            "",
        )
    if np.abs(steps - step).max() > POSITION_TOLERANCE * step + 1e-3:
        return None, f"{where}: uneven slice spacing: {steps.min():.3f} to {steps.max():.3f} mm", ""
    return series, "", ""


def _common_parts(folders: list[Path]) -> tuple[str, ...]:
    parts = []
    for level in zip(*(f.parts for f in folders)):
        if len(set(level)) > 1:
            break
        parts.append(level[0])
    return tuple(parts) or (".",)


def _name_cases(series: list[DicomSeries], root: Path) -> None:
    """Case ids: a folder's name for its lone series; else the folder's name and the series number
    (with the UID's end where names still clash)."""
    series.sort(key=lambda s: (str(s.folder), _number(s.number), s.uid))
    per_folder = Counter(s.folder for s in series)
    names = []
    for s in series:
        base = _safe(s.folder.name or root.resolve().name)
        if per_folder[s.folder] > 1:
            base = f"{base}_s{_safe(s.number)}" if s.number else f"{base}_{_safe(s.uid)}"
        names.append(base)
    for s, name in zip(series, names):
        s.case_id = name if names.count(name) == 1 else f"{name}_{_safe(s.uid)[-12:]}"


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def _safe(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "series"


def read_series(series: DicomSeries):
    """The series as a SimpleITK image (GDCM), its slices in the checked order; rescale applied."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    return reader.Execute()


def write_series_volume(series: DicomSeries, path: str | Path) -> Path:
    """Write the series as one volume file (``.nii``, ``.nrrd``, ...) that medeman's readers read."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(read_series(series), str(path))
    return path
