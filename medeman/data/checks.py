"""Validate a cohort before training: every file readable, 3D, finite, labels that fit their images,
and unlabeled scans that are scans and never labeled, validation or test cases.

Each file is read once (header and array); the findings of a case, with a content hash of each
volume (:func:`voxel_digest`), are cached by file path, size and modification time, so
``check-data`` and the DataModule's ``setup`` in one process read the cohort only once. Input files
are only read, never modified. :func:`gather_cohort` is the whole pass that both run.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import aff2axcodes

from medeman.data.discovery import Flagged, discover_labeled, discover_test, discover_unlabeled, expand_exclude
from medeman.data.errors import DataError
from medeman.data.readers import read_volume, voxel_spacing
from medeman.typed_config import Config, as_config

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference (mm) between an image's and its label's affine entries, relative to the voxel size."""
LABEL_LIKE_MAX_VALUES = 32
"""An unlabeled volume with at most this many distinct values, all non-negative integers, looks like a label map
(a scan has hundreds: noise alone gives them)."""


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
    digests: dict[str, str] = field(default_factory=dict)
    """:func:`voxel_digest` of each readable image file."""
    label_digest: str | None = None
    label_values: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Image files of a case without label that look like label maps, with their values (see :func:`label_like_values`)."""


class ReportCache:
    """The last ``maxsize`` case reports and file digests, keyed by the files' paths, sizes and modification times.

    A report is read once per process for as long as its files are unchanged (tuning re-checks the
    cohort for every trial; ``medeman check-data`` and training check it again). Only copies go in
    and out, so a caller that edits the report it got (or the cache's next user) never sees another's edits.
    """

    def __init__(self, maxsize: int = 4096) -> None:
        if maxsize < 1:
            raise ValueError(f"a report cache holds at least one entry, got maxsize={maxsize}")
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def get(self, key: tuple) -> Any:
        """A copy of the entry under ``key`` (now the most recently used); KeyError when there is none."""
        value = self._entries[key]
        self._entries.move_to_end(key)
        return deepcopy(value)

    def put(self, key: tuple, value: Any) -> None:
        """Keep a copy of ``value``; the least recently used entry goes when the cache is full."""
        self._entries[key] = deepcopy(value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


REPORTS = ReportCache()
"""Case reports and the digests of single files (``data.exclude``) of this process (see :class:`ReportCache`)."""


@dataclass
class _Volume:
    array: np.ndarray  # (x, y, z) or (x, y, z, c)
    affine: np.ndarray


def _read(path: str, problems: list[str]) -> _Volume | None:
    try:
        array, affine = read_volume(path)
    except Exception as err:  # nibabel, SimpleITK and zlib raise many types for a bad file
        problems.append(
            f"{path}: unreadable or truncated file ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        )
        return None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4):
        problems.append(f"{path}: not a 3D volume (array shape {tuple(array.shape)})")
        return None
    return _Volume(array, affine)


def voxel_digest(array: np.ndarray) -> str:
    """Content key of a volume: its shape, then a BLAKE2 hash of its voxels as float32.

    The shape leads, so keys of volumes that differ in shape differ at a glance; float32 makes the
    key independent of the file format (nibabel reads a NIfTI as float32, SimpleITK an NRRD in its
    stored type), so a renamed or re-saved copy has the key of its original.
    """
    data = np.ascontiguousarray(array, dtype=np.float32)
    return "x".join(map(str, data.shape)) + ":" + hashlib.blake2b(data, digest_size=16).hexdigest()


def label_like_values(array: np.ndarray) -> tuple[int, ...] | None:
    """The values of a volume that looks like a label map: at most :data:`LABEL_LIKE_MAX_VALUES` distinct
    non-negative integers; ``None`` for anything else.

    A strided sample (1 voxel in 64) rules out a scan cheaply; only a volume whose sample passes is
    read in full.
    """
    for part in (array[::4, ::4, ::4], array):
        if part.size == 0 or part.min() < 0:  # a CT's air: no unique() needed
            return None
        values = np.unique(part)
        if (
            len(values) > LABEL_LIKE_MAX_VALUES
            or not np.isfinite(values).all()
            or values.min() < 0
            or not np.array_equal(values, np.round(values))
        ):
            return None
    return tuple(int(v) for v in values)


def nonfinite_problem(path: str | Path, array: Any, finite: np.ndarray | None = None) -> str | None:
    """The one-line problem of a scan with NaN or Inf voxels (naming ``path`` and how many), or ``None``.

    Every command refuses such a scan with these words (``train``, ``check-data``, ``infer``, ``rank``,
    ``evaluate --images``): a NaN spreads through resampling and normalization and silently changes
    the segmentation of a whole region (issue 23: 125 NaN voxels changed 20,375 mask voxels).
    ``finite``: ``np.isfinite(array)`` when the caller has it already.
    """
    finite = np.isfinite(np.asarray(array)) if finite is None else finite
    if finite.all():
        return None
    return f"{path}: {int((~finite).sum())} NaN/Inf intensities"


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
    if key in REPORTS:
        return REPORTS.get(key)
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
        report.digests[path] = voxel_digest(arr)
        if not case.get("label"):
            values = label_like_values(arr)
            if values is not None:
                report.label_values[path] = values
        finite = np.isfinite(arr)
        problem = nonfinite_problem(path, arr, finite)
        if problem:
            problems.append(problem)
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
    REPORTS.put(key, report)
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
    report.label_digest = voxel_digest(arr)
    if arr.ndim != 3:
        problems.append(f"{path}: label must be a single-channel 3D volume, got array shape {tuple(arr.shape)}")
        return
    if ref is not None:
        image_path, image = ref
        if arr.shape != image.array.shape[:3]:
            problems.append(
                f"{path}: label shape {tuple(arr.shape)} differs from image shape {tuple(image.array.shape[:3])} of {image_path}"
            )
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


def check_cases(cases: list[dict], cfg: Config | dict[str, Any]) -> list[CaseReport]:
    """Inspect every case with the config's ``data.num_classes`` and ``data.in_channels``."""
    data = as_config(cfg).data
    return [inspect_case(c, data.num_classes, data.in_channels) for c in cases]


def report_problems(reports: list[CaseReport]) -> list[str]:
    """All problems of the reports, in case order."""
    return [p for r in reports for p in r.problems]


def raise_problems(problems: list[str], header: str = "") -> None:
    """Raise one :class:`DataError` listing ``problems``, one per line, if there are any."""
    if problems:
        lines = ([header] if header else []) + problems
        raise DataError("\n".join(lines))


def _file_digest(path: str, problems: list[str]) -> str | None:
    """:func:`voxel_digest` of one file (e.g. a ``data.exclude`` entry), cached like the case reports."""
    try:
        st = Path(path).stat()
    except OSError:
        st = None
    key = ("digest", path, st and st.st_size, st and st.st_mtime_ns)
    if key not in REPORTS:
        vol = _read(path, problems)
        REPORTS.put(key, None if vol is None else voxel_digest(vol.array))
    return REPORTS.get(key)


def screen_content(
    unlabeled: list[dict],
    reports: list[CaseReport],
    protected: dict[str, list[CaseReport]],
    num_classes: int,
    keep_label_like: bool = False,
    extra_digests: dict[str, str] | None = None,
) -> tuple[list[dict], list[CaseReport], list[Flagged]]:
    """Leave out the unlabeled cases that are copies of protected cases or look like label maps.

    A copy is an image file whose :func:`voxel_digest` (shape first, then a hash of the voxels)
    equals that of an image or label of a protected cohort, whatever its name or format. A label
    map is a volume of a few non-negative integer values (:func:`label_like_values`) within
    ``0..num_classes-1``: left out, or kept with a warning when ``keep_label_like``.

    Args:
        unlabeled: the unlabeled cases, as discovered.
        reports: their :func:`inspect_case` reports, in the same order.
        protected: reports of the cohorts whose cases must never be unlabeled, by cohort name.
        num_classes: classes including background (``data.num_classes``).
        keep_label_like: keep label-like volumes (``data.keep_label_like_unlabeled``).
        extra_digests: more protected volumes, ``{digest: description}`` (``data.exclude`` files).

    Returns:
        ``(cases, reports, flagged)``: the kept cases and their reports, and one entry per file left out or warned about.
    """
    index: dict[str, str] = dict(extra_digests or {})
    for cohort, cohort_reports in protected.items():
        for r in cohort_reports:
            for file, digest in r.digests.items():
                index.setdefault(digest, f"the image of {cohort} case '{r.id}' ({file})")
            if r.label_digest is not None:
                index.setdefault(r.label_digest, f"the label of {cohort} case '{r.id}' ({r.label})")
    kept, kept_reports, flagged = [], [], []
    for case, report in zip(unlabeled, reports):
        copy = next(((file, index[d]) for file, d in report.digests.items() if d in index), None)
        label_like = {f: v for f, v in report.label_values.items() if v[-1] <= num_classes - 1}
        if copy is not None:
            flagged.append(Flagged(copy[0], f"same voxels as {copy[1]}: a copy", "copy"))
            continue
        if label_like:
            file, values = next(iter(label_like.items()))
            shown = ", ".join(map(str, values))
            if keep_label_like:
                flagged.append(
                    Flagged(
                        file,
                        f"looks like a label map (only the values {shown}); kept, as data.keep_label_like_unlabeled is true",
                        "label-like",
                        excluded=False,
                    )
                )
            else:
                flagged.append(
                    Flagged(
                        file,
                        f"looks like a label map (only the values {shown}); "
                        "set data.keep_label_like_unlabeled: true if it is a scan",
                        "label-like",
                    )
                )
                continue
        kept.append(case)
        kept_reports.append(report)
    return kept, kept_reports, flagged


@dataclass
class Cohort:
    """Every case of a run, checked: the parts in use, what was left out of the unlabeled scans and why, and every problem."""

    labeled: list[dict] = field(default_factory=list)
    val: list[dict] | None = None
    test: list[dict] = field(default_factory=list)
    unlabeled: list[dict] = field(default_factory=list)
    reports: dict[str, list[CaseReport]] = field(default_factory=dict)
    """Reports by part (``labeled``, ``val``, ``test``, ``unlabeled``), for the parts that were checked."""
    flagged: list[Flagged] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the unlabeled scans kept, the files left out and warned about, by kind."""

        def by_kind(items: list[Flagged]) -> str:
            return ", ".join(f"{n} {kind}" for kind, n in Counter(f.kind for f in items).most_common())

        out = [f for f in self.flagged if f.excluded]
        warned = [f for f in self.flagged if not f.excluded]
        line = f"unlabeled scans: {len(self.unlabeled)} used"
        line += f"; {len(out)} file(s) left out ({by_kind(out)})" if out else "; none left out"
        if warned:
            line += f"; {len(warned)} used with a warning ({by_kind(warned)})"
        return line + ("; medeman check-data lists each file and why" if self.flagged else "")


def gather_cohort(
    cfg: Config | dict[str, Any],
    labeled: str | Path,
    unlabeled: str | Path | None = None,
    val: str | Path | None = None,
    test: str | Path | None = None,
    *,
    check_unlabeled: bool = True,
) -> Cohort:
    """Discover, check and screen every part of a run; the one pass of ``check-data`` and the DataModule.

    Unlabeled scans are screened against the labeled, validation and test cohorts and
    ``data.exclude``: by path and folder (:func:`medeman.data.discovery.screen_paths`), then by content
    (:func:`screen_content`). Problems are collected in ``Cohort.problems``, never raised.

    Args:
        cfg: resolved config (``data.num_classes``, ``in_channels``, ``exclude``, ``keep_label_like_unlabeled``).
        labeled: labeled folder or dataset root.
        unlabeled: unlabeled folder or dataset root; ``None``: none.
        val: labeled validation folder, if any.
        test: test cohort (labeled layout or a folder of images), if any: checked, and never unlabeled.
        check_unlabeled: read and screen the unlabeled scans by content (off when they are not used).
    """
    cohort, problems = Cohort(), []
    cfg = as_config(cfg)
    data = cfg.data

    def collect(fn, path):
        try:
            return fn(path, cfg, problems)
        except DataError as err:  # an unreadable dataset.json stops the discovery of that part
            problems.extend(str(err).splitlines())
            return []

    cohort.labeled = collect(discover_labeled, labeled)
    cohort.val = collect(discover_labeled, val) if val is not None else None
    cohort.test = collect(discover_test, test) if test is not None else []
    excluded = expand_exclude(list(data.exclude or []), problems)
    protect = {"labeled": cohort.labeled, "val": cohort.val or [], "test": cohort.test, "data.exclude": excluded}
    if unlabeled is not None:
        cohort.unlabeled = collect(lambda p, c, pr: discover_unlabeled(p, c, pr, cohort.flagged, protect), unlabeled)
    parts = [("labeled", cohort.labeled), ("val", cohort.val or []), ("test", cohort.test)]
    if check_unlabeled:
        parts.append(("unlabeled", cohort.unlabeled))
    for part, cases in parts:
        if cases or part in ("labeled", "unlabeled"):
            cohort.reports[part] = check_cases(cases, cfg)
    if check_unlabeled and cohort.unlabeled:
        digests = {}
        for case in excluded:
            digest = _file_digest(case["image"], problems)
            if digest is not None:
                digests.setdefault(digest, f"{case['image']} (data.exclude)")
        protected = {part: cohort.reports.get(part, []) for part in ("labeled", "val", "test")}
        cohort.unlabeled, cohort.reports["unlabeled"], flagged = screen_content(
            cohort.unlabeled,
            cohort.reports["unlabeled"],
            protected,
            data.num_classes,
            data.keep_label_like_unlabeled,
            digests,
        )
        cohort.flagged += flagged
    cohort.problems = problems + [p for reports in cohort.reports.values() for p in report_problems(reports)]
    return cohort
