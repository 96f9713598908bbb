"""Validate a cohort before training: every file readable, 3D, finite, and labels that fit their images.

Each file is read once (header and array); the findings of a case are cached by file path, size
and modification time, so ``check-data`` and the DataModule's ``setup`` in one process read the
cohort only once. Input files are only read, never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import aff2axcodes

from medeman.data.errors import DataError
from medeman.data.readers import read_volume, voxel_spacing

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference (mm) between an image's and its label's affine entries, relative to the voxel size."""


@dataclass
class CaseReport:
    """What :func:`inspect_case` found in one case: its geometry, intensities, label classes and problems."""

    id: str
    image: str | list[str]
    label: str | None = None
    shape: tuple[int, ...] | None = None
    channels: int = 0
    spacing: tuple[float, ...] | None = None
    orientation: str = "?"
    intensity: tuple[float, float] | None = None
    classes: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


_CACHE: dict[tuple, CaseReport] = {}


@dataclass
class _Volume:
    array: np.ndarray  # (x, y, z) or (x, y, z, c)
    affine: np.ndarray


def _read(path: str, problems: list[str]) -> _Volume | None:
    try:
        array, affine = read_volume(path)
    except Exception as err:  # nibabel, SimpleITK and zlib raise many types for a bad file
        problems.append(f"{path}: unreadable or truncated file ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
        return None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4):
        problems.append(f"{path}: not a 3D volume (array shape {tuple(array.shape)})")
        return None
    return _Volume(array, affine)


def _orientation(affine: np.ndarray) -> str:
    codes = "".join(aff2axcodes(affine))
    direction = affine[:3, :3] / np.asarray(voxel_spacing(affine))
    oblique = not np.allclose(np.abs(direction), np.round(np.abs(direction)), atol=1e-3)
    return codes + ("~" if oblique else "")


def _key(case: dict, num_classes: int, in_channels: int) -> tuple:
    files = [case["image"]] if isinstance(case["image"], str) else list(case["image"])
    files += [case["label"]] if case.get("label") else []
    stats = []
    for f in files:
        try:
            st = Path(f).stat()
            stats.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((f, None, None))
    return tuple(stats), num_classes, in_channels


def inspect_case(case: dict, num_classes: int, in_channels: int = 1) -> CaseReport:
    """Read one case and report its geometry, intensity range, label classes and every problem.

    Problems (one line each, naming the file): unreadable/truncated file; not a 3D volume; a channel
    count other than ``in_channels``; NaN/Inf intensities; channel files or image and label that
    differ in shape or affine (beyond :data:`AFFINE_TOLERANCE_MM` times the voxel size); label values
    that are not integers in ``0..num_classes-1``.

    Args:
        case: ``{"id", "image", "label"?}`` as found by discovery.
        num_classes: classes including background.
        in_channels: channels the image must have.
    """
    key = _key(case, num_classes, in_channels)
    if key in _CACHE:
        return _CACHE[key]
    files = [case["image"]] if isinstance(case["image"], str) else list(case["image"])
    report = CaseReport(id=case["id"], image=case["image"], label=case.get("label"))
    problems = report.problems
    low, high, channels, ref = np.inf, -np.inf, 0, None
    for path in files:
        vol = _read(path, problems)
        if vol is None:
            continue
        arr = vol.array
        channels += 1 if arr.ndim == 3 else arr.shape[-1]
        if ref is None:
            ref = (path, vol)
        elif arr.shape[:3] != ref[1].array.shape[:3] or not _affines_close(vol.affine, ref[1].affine):
            problems.append(f"{path}: channel file differs in shape or affine from {ref[0]}")
        finite = np.isfinite(arr)
        if not finite.all():
            problems.append(f"{path}: {int((~finite).sum())} NaN/Inf intensities")
        if finite.any():
            low, high = min(low, float(arr[finite].min())), max(high, float(arr[finite].max()))
    if ref is not None:
        report.shape = tuple(int(s) for s in ref[1].array.shape[:3])
        report.spacing = voxel_spacing(ref[1].affine)
        report.orientation = _orientation(ref[1].affine)
        report.channels = channels
        report.intensity = (low, high) if low <= high else None
        if channels != in_channels and not problems:
            problems.append(f"{files[0]}: {channels} image channel(s), but data.in_channels={in_channels}")
    if case.get("label"):
        _check_label(case["label"], ref, num_classes, report)
    _CACHE[key] = report
    return report


def _affines_close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = max(1.0, max(voxel_spacing(a)))
    return bool(np.abs(a - b).max() <= AFFINE_TOLERANCE_MM * scale)


def _check_label(path: str, ref: tuple[str, _Volume] | None, num_classes: int, report: CaseReport) -> None:
    problems = report.problems
    vol = _read(path, problems)
    if vol is None:
        return
    arr = vol.array
    if arr.ndim != 3:
        problems.append(f"{path}: label must be a single-channel 3D volume, got array shape {tuple(arr.shape)}")
        return
    if ref is not None:
        image_path, image = ref
        if arr.shape != image.array.shape[:3]:
            problems.append(f"{path}: label shape {tuple(arr.shape)} differs from image shape {tuple(image.array.shape[:3])} of {image_path}")
        elif not _affines_close(vol.affine, image.affine):
            diff = float(np.abs(vol.affine - image.affine).max())
            problems.append(f"{path}: label affine differs from the affine of {image_path} by up to {diff:.4g} mm")
    if not np.isfinite(arr).all():
        problems.append(f"{path}: NaN/Inf label values")
        return
    values, counts = np.unique(arr, return_counts=True)
    if not np.allclose(values, np.round(values)):
        problems.append(f"{path}: non-integer label values (e.g. {values[values != np.round(values)][:3].tolist()})")
        return
    report.classes = {int(v): int(c) for v, c in zip(values, counts)}
    bad = [int(v) for v in values if v < 0 or v > num_classes - 1]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        problems.append(f"{path}: label values {shown} outside 0..{num_classes - 1} (data.num_classes={num_classes})")


def check_cases(cases: list[dict], cfg: dict[str, Any]) -> list[CaseReport]:
    """Inspect every case with the config's ``data.num_classes`` and ``data.in_channels``."""
    data = cfg["data"]
    return [inspect_case(c, int(data["num_classes"]), int(data["in_channels"])) for c in cases]


def report_problems(reports: list[CaseReport]) -> list[str]:
    """All problems of the reports, in case order."""
    return [p for r in reports for p in r.problems]


def raise_problems(problems: list[str], header: str = "") -> None:
    """Raise one :class:`DataError` listing ``problems``, one per line, if there are any."""
    if problems:
        lines = ([header] if header else []) + problems
        raise DataError("\n".join(lines))
