"""The dataset fingerprint: what the planner (:mod:`medeman.plan`) needs to know about a cohort.

Per labeled case: voxel spacing, shape and orientation, a sample of foreground intensities, the
voxel count of each class and its connected components (count and volumes in mm^3). Per unlabeled
scan: spacing and shape from the header only. Summed up: median spacing and shape, foreground
intensity percentiles, a modality guess, per-class foreground fractions and component sizes.

This is nnU-Net v2's ``dataset_fingerprint.json`` (Isensee et al. 2021, "nnU-Net: a self-configuring
method for deep learning-based biomedical image segmentation", Nat. Methods 18:203) plus the
component statistics that small structures need. It is cached as ``fingerprint.json`` and reused
while the cohort's files (paths, sizes, modification times) stay the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from medeman.data.discovery import discover_labeled, discover_unlabeled
from medeman.data.errors import DataError
from medeman.data.readers import read_geometry, read_volume, voxel_spacing

VERSION = 2  # 2: each class's border (neighbours)
# nnU-Net samples 10 000 foreground voxels per case for its intensity statistics: enough for
# stable 0.5/99.5 percentiles, and it keeps the fingerprint's JSON small
INTENSITY_SAMPLES_PER_CASE = 10_000


def _files_key(paths: list[Path]) -> list[list]:
    """What makes a cached fingerprint stale: each file's path, size and modification time."""
    key = []
    for path in sorted({Path(p) for p in paths}):
        stat = path.stat()
        key.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return key


def _first_file(image: str | list[str]) -> str:
    return image[0] if isinstance(image, (list, tuple)) else image


def case_fingerprint(
    image_path: str | Path, label_path: str | Path, num_classes: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Fingerprint of one labeled case (first image channel).

    Returns:
        ``{"spacing", "shape", "orientation", "num_classes", "class_voxels", "components",
        "foreground_intensities", "image_min"}``: spacing in mm and shape in (x, y, z) RAS order,
        ``class_voxels[c]`` voxels of class c, ``components[c]`` the volumes (mm^3) of class c's
        connected components (26-connectivity), ``neighbours[c]`` the classes of the voxels just outside
        class c (:func:`border_classes`), a sample of foreground intensities.
    """
    image, affine = _read(image_path)
    label, _ = _read(label_path)
    if image.ndim == 4:
        image = image[..., 0]
    if label.shape[:3] != image.shape[:3] or label.size != int(np.prod(image.shape[:3])):
        raise DataError(
            f"{label_path}: label shape {label.shape} differs from its image's {image.shape[:3]} ({image_path})"
        )
    if label.min() < 0 or not np.all(np.mod(label, 1) == 0):
        raise DataError(f"{label_path}: a label map must hold non-negative integer labels")
    label = label.reshape(label.shape[:3]).astype(np.int64)
    spacing = [float(s) for s in voxel_spacing(affine)]
    voxel_mm3 = float(np.prod(spacing))
    classes = int(label.max()) + 1 if num_classes is None else int(num_classes)
    counts = np.bincount(label.ravel(), minlength=classes)
    components: dict[str, list[float]] = {}
    for c in range(1, classes):
        labelled, n = ndimage.label(label == c, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:] if n else np.zeros(0, int)
        components[str(c)] = [round(float(s) * voxel_mm3, 3) for s in sizes]
    neighbours = {str(c): border_classes(label, c, classes) for c in range(1, classes)}
    foreground = image[label > 0]
    rng = np.random.default_rng(seed)
    if foreground.size > INTENSITY_SAMPLES_PER_CASE:
        foreground = rng.choice(foreground, INTENSITY_SAMPLES_PER_CASE, replace=False)
    return {
        "image": str(image_path),
        "label": str(label_path),
        "spacing": spacing,
        "shape": [int(s) for s in image.shape[:3]],
        "orientation": "".join(nib.aff2axcodes(affine)),
        "num_classes": classes,
        "class_voxels": [int(v) for v in counts],
        "components": components,
        "neighbours": neighbours,
        "foreground_intensities": [float(v) for v in foreground],
        "image_min": float(image.min()),
    }


def border_classes(label: np.ndarray, c: int, num_classes: int) -> list[int]:
    """Voxel counts per class of class ``c``'s border: the voxels one step (26 neighbours) outside its mask.

    A lesion inside the liver has a border of liver voxels; what it lies in tells where copy-paste may put it
    (:mod:`medeman.planning`).
    """
    mask = label == c
    if not mask.any():
        return [0] * num_classes
    shell = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool)) & ~mask
    return [int(v) for v in np.bincount(label[shell], minlength=num_classes)[:num_classes]]


def _read(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        return read_volume(path)
    except Exception as err:  # any reader failure is one line naming the file, never a reader traceback
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise DataError(f"{path}: cannot read: {lines[0] if lines else type(err).__name__}") from None


def guess_modality(image_min: float, foreground_p005: float) -> str:
    """``"CT"`` when the scans hold Hounsfield units (air near -1000 HU), else ``"MR"``.

    CT numbers are calibrated: air is -1000 HU (padding -1024 or less), so a scan whose minimum
    lies below -500 is CT. MR intensities are arbitrary and non-negative in practice.
    """
    return "CT" if image_min < -500 or foreground_p005 < -500 else "MR"


def summarize(cases: list[dict[str, Any]], unlabeled: list[dict[str, Any]]) -> dict[str, Any]:
    """Cohort statistics from the per-case fingerprints (see :func:`fingerprint_cohort`)."""
    num_classes = max(c["num_classes"] for c in cases)
    spacings = np.array([c["spacing"] for c in cases + unlabeled], dtype=float)
    shapes_mm = np.array([np.multiply(c["shape"], c["spacing"]) for c in cases + unlabeled], dtype=float)
    intensities = np.concatenate([np.asarray(c["foreground_intensities"], dtype=float) for c in cases])
    voxels = np.zeros(num_classes, dtype=np.int64)
    for c in cases:
        voxels[: len(c["class_voxels"])] += c["class_voxels"]
    foreground = max(int(voxels[1:].sum()), 1)
    classes = {}
    for k in range(1, num_classes):
        volumes = [v for c in cases for v in c["components"].get(str(k), [])]
        per_case = [len(c["components"].get(str(k), [])) for c in cases]
        border = np.zeros(num_classes, dtype=np.int64)
        for c in cases:
            counts = c.get("neighbours", {}).get(str(k), [])
            border[: len(counts)] += counts
        classes[str(k)] = {
            "border_fraction": [float(v) for v in border / max(int(border.sum()), 1)],
            "foreground_fraction": float(voxels[k] / foreground),
            "volume_fraction": float(voxels[k] / max(int(voxels.sum()), 1)),
            "cases_with_class": int(sum(n > 0 for n in per_case)),
            "components_per_case": per_case,
            "component_volume_mm3": {
                "min": float(min(volumes)) if volumes else 0.0,
                "p05": float(np.percentile(volumes, 5)) if volumes else 0.0,
                "median": float(np.median(volumes)) if volumes else 0.0,
                "max": float(max(volumes)) if volumes else 0.0,
            },
        }
    p = (
        {name: float(np.percentile(intensities, q)) for name, q in (("p00_5", 0.5), ("p99_5", 99.5))}
        if intensities.size
        else {"p00_5": 0.0, "p99_5": 0.0}
    )
    image_min = min(c["image_min"] for c in cases)
    return {
        "num_labeled": len(cases),
        "num_unlabeled": len(unlabeled),
        "num_classes": int(num_classes),
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "spacing_p10": [float(v) for v in np.percentile(spacings, 10, axis=0)],
        "median_shape": [int(round(v)) for v in np.median([c["shape"] for c in cases + unlabeled], axis=0)],
        "median_size_mm": [float(v) for v in np.median(shapes_mm, axis=0)],
        "orientations": sorted({c["orientation"] for c in cases + unlabeled}),
        "intensity": {
            **p,
            "mean": float(intensities.mean()) if intensities.size else 0.0,
            "std": float(intensities.std()) if intensities.size else 1.0,
            "min": image_min,
        },
        "modality_guess": guess_modality(image_min, p["p00_5"]),
        "classes": classes,
    }


def _unlabeled_geometry(path: str | Path) -> dict[str, Any]:
    shape, affine = read_geometry(path)
    return {
        "image": str(path),
        "spacing": [float(s) for s in voxel_spacing(affine)],
        "shape": list(shape),
        "orientation": "".join(nib.aff2axcodes(affine)),
    }


def fingerprint_cohort(
    labeled: str | Path, unlabeled: str | Path | None = None, cache: str | Path | None = None, cfg: dict | None = None
) -> dict[str, Any]:
    """Fingerprint a labeled cohort (and the headers of an unlabeled one), reusing ``cache`` if current.

    Args:
        labeled: labeled cohort as ``medeman train --labeled`` takes it.
        unlabeled: optional folder of unlabeled scans (only their spacing and shape are read).
        cache: ``fingerprint.json`` to reuse when it was made from the same files, and to write.
        cfg: config whose ``data`` section guides discovery (``in_channels``, ``exclude``).

    Returns:
        ``{"version", "files", "cases", "unlabeled", "summary"}`` (see :func:`summarize`).
    """
    cases = discover_labeled(labeled, cfg)
    scans: list[dict] = []
    if unlabeled is not None:
        scans = discover_unlabeled(unlabeled, cfg, protect={"labeled": cases})
    files = [Path(_first_file(c["image"])) for c in cases] + [Path(c["label"]) for c in cases]
    files += [Path(_first_file(s["image"])) for s in scans]
    key = _files_key(files)
    if cache is not None and Path(cache).is_file():
        try:
            cached = json.loads(Path(cache).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            cached = None
        if isinstance(cached, dict) and cached.get("version") == VERSION and cached.get("files") == key:
            return cached
    per_case = [case_fingerprint(_first_file(c["image"]), c["label"], seed=i) for i, c in enumerate(cases)]
    per_scan = [_unlabeled_geometry(_first_file(s["image"])) for s in scans]
    result = {
        "version": VERSION,
        "files": key,
        "cases": per_case,
        "unlabeled": per_scan,
        "summary": summarize(per_case, per_scan),
    }
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps(result), encoding="utf-8")
    return result
