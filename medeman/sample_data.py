"""A synthetic CT cohort of torso phantoms, small enough to commit and to train on with two CPU cores.

Every scan is rendered from a phantom defined in world (RAS, mm) coordinates, so per-case voxel
spacing, orientation (RAS, LPS, a tilted gantry) and field of view change the voxel grid but never
the anatomy. Each phantom has a body ellipse (skin, fat, muscle, spine, aorta, a spleen and bowel
gas as distractors) and two labeled organs that vary in shape, size and position: ``1`` a
liver-like large organ and ``2`` a pair of kidney-like small organs. Intensities are int16 HU:
each of a few simulated scanners has its own noise level, blur and cupping, and each case its own
contrast phase and bias field, so intensity statistics differ across cases as in real cohorts.
With ``lesions=True`` (``--lesions``) each liver also holds 1-3 small lesions, label ``3``, of varied
size (4.5-8 mm radius, about 0.1-0.2 % of the scan together) and look (hypodense, hyperdense, or a dark
core with an enhancing rim): a small-structure task like liver-tumour segmentation.

Run ``python scripts/make_sample_data.py`` to rebuild ``sample_data/`` (fixed seed), or with
``--out DIR --unlabeled 500`` for a larger cohort of the same kind.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_erosion, gaussian_filter
from medeman.data.readers import write_volume

CLASSES = {0: "background", 1: "liver", 2: "kidneys"}
LESION_LABEL = 3  # with lesions=True: small liver lesions, the rare class
LESION_CLASSES = {**CLASSES, LESION_LABEL: "lesion"}
FIELD_OF_VIEW_MM = (124.0, 100.0, 92.0)


@dataclass(frozen=True)
class Scanner:
    """A simulated scanner: voxel spacing choices, orientation written to the header, noise and blur."""

    name: str
    spacings: tuple[tuple[float, float, float], ...]
    orientation: str  # "RAS", "LPS" or "LPS-tilted" (gantry tilt about the x axis)
    noise_hu: tuple[float, float]
    blur_vox: float
    cupping_hu: tuple[float, float]
    hu_offset: float = 0.0  # a calibration drift that shifts every HU value


SCANNERS = (
    Scanner("A", ((2.2, 2.2, 2.5), (2.0, 2.0, 3.0)), "RAS", (6.0, 10.0), 0.5, (0.0, 10.0)),
    Scanner("B", ((2.5, 2.5, 3.0), (2.3, 2.3, 4.0)), "LPS", (12.0, 20.0), 0.7, (10.0, 30.0)),
    Scanner("C", ((2.0, 2.0, 2.5), (2.2, 2.2, 2.2)), "LPS-tilted", (8.0, 14.0), 0.6, (5.0, 20.0)),
)
# A scanner no labeled case comes from (``make_cohort(unseen_every=N)``): miscalibrated by +150 HU,
# twice the noise and more blur, so a model trained on A-C is genuinely unsure on its scans.
UNSEEN_SCANNER = Scanner(
    "D", ((2.4, 2.4, 2.4), (2.0, 2.0, 3.2)), "RAS", (25.0, 35.0), 1.0, (20.0, 40.0), hu_offset=150.0
)


def _affine(
    shape: tuple[int, ...], spacing: tuple[float, ...], orientation: str, shift: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Voxel-to-RAS affine centring the field of view on the table position ``shift``."""
    signs = {"RAS": (1.0, 1.0, 1.0)}.get(orientation, (-1.0, -1.0, 1.0))
    linear = np.diag(np.asarray(signs) * np.asarray(spacing))
    if orientation == "LPS-tilted":
        t = np.deg2rad(rng.uniform(6.0, 12.0))
        tilt = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        linear = tilt @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    centre = (np.asarray(shape) - 1) / 2.0
    affine[:3, 3] = shift - linear @ centre
    return affine


def _world_grid(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def _blob(
    p: np.ndarray, centre, radii, rng: np.random.Generator, wobble: float = 0.15, angle: float = 0.0
) -> np.ndarray:
    """Inside of a randomly deformed, rotated (about z) ellipsoid: low-frequency ripples change its shape."""
    c, s = np.cos(angle), np.sin(angle)
    d = p - np.asarray(centre, dtype=np.float32)
    local = np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1], d[..., 2]], axis=-1)
    q = local / np.asarray(radii, dtype=np.float32)
    f = (q**2).sum(-1)
    for _ in range(3):
        w = rng.normal(size=3).astype(np.float32) * 1.5
        f = f + wobble * rng.uniform(0.3, 1.0) * np.sin(q @ w + rng.uniform(0, 2 * np.pi))
    return f < 1.0


def _add_lesions(rng: np.random.Generator, p: np.ndarray, hu: np.ndarray, label: np.ndarray, liver: np.ndarray) -> None:
    """Draw 1-3 small lesions inside the liver into ``hu`` and ``label`` (``LESION_LABEL``), in place.

    Sizes, shapes and looks vary from lesion to lesion as in liver metastases and cysts: a radius of
    4.5-8 mm, a slightly irregular outline, and a hypodense (-40..-90 HU against the liver), a
    hyperdense (+35..+70 HU) or a rim-enhancing look (dark core, bright one-voxel rim). The scanner's
    blur and noise, added afterwards, take a third to a half of that contrast from the smallest ones.
    """
    inside = np.argwhere(liver)
    if not len(inside):
        return
    liver_hu = float(np.median(hu[liver]))
    for _ in range(rng.integers(1, 4)):
        centre = p[tuple(inside[rng.integers(len(inside))])]
        radius = rng.uniform(4.5, 8.0)
        lesion = _blob(p, centre, radius * rng.uniform(0.8, 1.2, 3), rng, 0.1, rng.uniform(0, np.pi)) & liver
        if not lesion.any():
            continue
        look = rng.choice(("hypo", "hyper", "rim"))
        delta = rng.uniform(35, 70) if look == "hyper" else -rng.uniform(40, 90)
        hu[lesion] = liver_hu + delta + rng.normal(0, 4, int(lesion.sum()))  # some texture of its own
        if look == "rim":
            rim = lesion & ~binary_erosion(lesion)
            hu[rim] = liver_hu + rng.uniform(30, 60)
        label[lesion] = LESION_LABEL


def make_case(
    rng: np.random.Generator, scanner: Scanner, lesions: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one phantom: ``(image int16 HU, label uint8, affine)``; with ``lesions``, liver lesions labeled 3."""
    spacing = np.asarray(scanner.spacings[rng.integers(len(scanner.spacings))]) * rng.uniform(0.95, 1.05, 3)
    spacing = np.round(spacing, 3)
    fov = np.asarray(FIELD_OF_VIEW_MM) * rng.uniform(0.95, 1.05, 3)
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing))
    affine = _affine(shape, tuple(spacing), scanner.orientation, rng.uniform(-6, 6, 3), rng)
    p = _world_grid(shape, affine)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]

    # body: an ellipse in the axial plane whose size drifts slowly along z, centred near the origin
    a0, b0 = rng.uniform(46, 56), rng.uniform(34, 41)
    a = a0 * (1 + 0.04 * np.sin(z / 30 + rng.uniform(0, 6)))
    b = b0 * (1 + 0.03 * np.sin(z / 25 + rng.uniform(0, 6)))
    cx, cy = rng.uniform(-3, 3, 2)
    r_body = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
    fat = rng.uniform(4, 9)
    r_inner = ((x - cx) / (a - fat)) ** 2 + ((y - cy) / (b - fat)) ** 2
    enhancement = rng.uniform(0, 70)  # contrast phase: 0 native ... 70 portal venous

    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r_body <= 1] = rng.uniform(-110, -90)  # subcutaneous fat
    hu[r_inner <= 1] = rng.uniform(35, 45)  # muscle wall / soft tissue
    visceral = ((x - cx) / (a - fat - 5)) ** 2 + ((y - cy) / (b - fat - 5)) ** 2 <= 1
    hu[visceral] = rng.uniform(-40, 10)  # mixed visceral fat and bowel

    spine_y = cy - (b0 - fat) * 0.62
    vertebra = ((x - cx) ** 2 + (y - spine_y) ** 2) <= rng.uniform(6, 8) ** 2
    disc = np.cos(2 * np.pi * z / rng.uniform(22, 28)) > 0.8
    hu[vertebra] = np.where(disc[vertebra], 80.0, rng.uniform(250, 400))
    hu[((x - cx) ** 2 + (y - spine_y) ** 2 <= 9.5**2) & ~vertebra] = 700.0  # cortical shell
    for side in (-1, 1):  # paraspinal muscles
        hu[((x - cx - side * 14) / 9) ** 2 + ((y - spine_y + 1) / 6) ** 2 <= 1] = 50.0
    aorta = (x - cx - 3) ** 2 + (y - spine_y - 13) ** 2 <= rng.uniform(4, 6) ** 2
    hu[aorta] = 40 + 3 * enhancement
    for _ in range(rng.integers(2, 6)):  # bowel gas
        gas = _blob(
            p,
            (cx + rng.uniform(-25, 15), cy + rng.uniform(0, b0 * 0.6), rng.uniform(-40, 40)),
            rng.uniform(3, 7, 3),
            rng,
            0.3,
        )
        hu[gas & visceral] = -900.0
    spleen = _blob(
        p,
        (cx - a0 * rng.uniform(0.45, 0.55), cy - rng.uniform(0, 8), rng.uniform(0, 20)),
        (10, 14, 18),
        rng,
        0.2,
        rng.uniform(-0.5, 0.5),
    )
    hu[spleen & visceral] = 50 + 0.9 * enhancement

    label = np.zeros(shape, dtype=np.uint8)
    liver = _blob(
        p,
        (cx + a0 * rng.uniform(0.28, 0.42), cy + rng.uniform(-6, 8), rng.uniform(0, 18)),
        (rng.uniform(20, 28), rng.uniform(17, 24), rng.uniform(22, 32)),
        rng,
        0.25,
        rng.uniform(-0.4, 0.4),
    ) & (r_inner <= 1)
    label[liver] = 1
    hu[liver] = rng.uniform(50, 65) + enhancement + 4 * np.sin(x[liver] / 5) * np.cos(y[liver] / 6)
    z_kidney = rng.uniform(-22, -5)
    for side in (-1, 1):
        kidney = (
            _blob(
                p,
                (cx + side * rng.uniform(18, 24), spine_y + rng.uniform(2, 7), z_kidney + rng.uniform(-5, 5)),
                (rng.uniform(8, 11), rng.uniform(10, 13), rng.uniform(15, 20)),
                rng,
                0.15,
                side * rng.uniform(0.2, 0.6),
            )
            & visceral
            & ~liver
        )
        label[kidney] = 2
        hu[kidney] = 35 + 1.8 * enhancement + rng.uniform(-5, 5)
    if lesions:  # a generator of its own: however many lesions, the draws after this stay the same
        _add_lesions(np.random.default_rng(rng.integers(2**63)), p, hu, label, liver)

    # scanner: point-spread blur, cupping and a smooth per-case bias field, then quantum noise
    hu = gaussian_filter(hu, scanner.blur_vox)
    body = r_body <= 1
    cupping = rng.uniform(*scanner.cupping_hu) * (1 - np.clip(r_body, 0, 1))
    g = rng.normal(size=3) * rng.uniform(3, 10) / 50.0
    bias = x * g[0] + y * g[1] + z * g[2]
    hu = hu - cupping + bias * body
    hu = hu + rng.normal(0, rng.uniform(*scanner.noise_hu), shape) + scanner.hu_offset
    # outside the circular reconstruction field of view scanners write the padding value -1024
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:2]], indexing="ij"), axis=-1)
    centre = (np.asarray(shape[:2]) - 1) / 2.0
    outside = (((ijk - centre) / (np.asarray(shape[:2]) / 2.0)) ** 2).sum(-1) > 1.0
    hu[outside] = -1024
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return image, label, affine


def make_cohort(
    out: str | Path,
    n_labeled: int = 6,
    n_unlabeled: int = 24,
    n_test: int = 6,
    seed: int = 0,
    other_formats: bool = True,
    n_val: int = 0,
    unlabeled_labels: bool = False,
    lesions: bool = False,
    unseen_every: int = 0,
    n_test_extra: int = 0,
) -> Path:
    """Write a cohort: ``labeled/{images,labels}``, ``unlabeled/`` and ``test/{images,labels}``.

    Args:
        out: output folder (created).
        n_labeled, n_unlabeled, n_test: cases per part; scanners alternate across cases.
        seed: the cohort depends only on it (and the counts).
        other_formats: write a few unlabeled scans as ``.mha`` and ``.nrrd`` as real cohorts mix formats.
        n_val: labeled validation cases in ``val/{images,labels}`` (``medeman train --val``); rendered
            after all other parts, so adding them leaves every other case unchanged.
        unlabeled_labels: also write the ground truth of each unlabeled scan, under the scan's own name,
            to ``unlabeled_labels/`` (outside ``unlabeled/``, so training never sees it): for
            "supervised on all labels" upper bounds in ablations.
        lesions: add 1-3 small liver lesions (label 3) to every case (see :func:`make_case`).
        unseen_every: when ``N > 0``, every N-th test and unlabeled case comes from
            :data:`UNSEEN_SCANNER`, which no labeled or validation case does (a new scanner in the
            pool, for active-learning benchmarks); ``scanners.csv`` then lists every case's scanner.
        n_test_extra: more test cases, in ``test/`` too, rendered after the validation cases: a test set
            grows (to measure finer differences) without changing any other case.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    index = 0
    manifest = []
    parts = (
        ("labeled", n_labeled),
        ("test", n_test),
        ("unlabeled", n_unlabeled),
        ("val", n_val),
        ("test", n_test_extra),
    )
    for part, count in parts:
        for i in range(count):
            rng = np.random.default_rng([seed, index])
            unseen = unseen_every > 0 and part in ("test", "unlabeled") and i % unseen_every == unseen_every - 1
            scanner = UNSEEN_SCANNER if unseen else SCANNERS[index % len(SCANNERS)]
            image, label, affine = make_case(rng, scanner, lesions=lesions)
            index += 1
            name = f"case_{index:03d}"
            manifest.append(f"{name},{part},{scanner.name}")
            if part == "unlabeled":
                suffix = {1: ".mha", 2: ".nrrd"}.get(i, ".nii.gz") if other_formats else ".nii.gz"
                write_volume(image, affine, out / part / f"{name}{suffix}")
                if unlabeled_labels:
                    write_volume(label, affine, out / "unlabeled_labels" / f"{name}{suffix}")
            else:
                write_volume(image, affine, out / part / "images" / f"{name}.nii.gz")
                write_volume(label, affine, out / part / "labels" / f"{name}.nii.gz")
    if unseen_every > 0:
        (out / "scanners.csv").write_text("\n".join(["case,part,scanner", *manifest]) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """``make_sample_data.py [--out DIR] [--labeled N] [--unlabeled N] [--test N] [--seed S]``."""
    parser = argparse.ArgumentParser(description="Write a synthetic CT torso cohort (labels: 1 liver, 2 kidneys).")
    parser.add_argument("--out", default="sample_data", help="output folder (default: sample_data)")
    parser.add_argument("--labeled", type=int, default=6, help="labeled cases")
    parser.add_argument("--unlabeled", type=int, default=24, help="unlabeled scans")
    parser.add_argument("--test", type=int, default=6, help="held-out labeled test cases")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the whole cohort")
    parser.add_argument("--val", type=int, default=0, help="labeled validation cases in <out>/val")
    parser.add_argument(
        "--unlabeled-labels",
        action="store_true",
        help="write the unlabeled scans' ground truth to <out>/unlabeled_labels",
    )
    parser.add_argument(
        "--lesions", action="store_true", help="add 1-3 small liver lesions per scan as label 3 (a rare class)"
    )
    args = parser.parse_args(argv)
    out = make_cohort(
        args.out,
        args.labeled,
        args.unlabeled,
        args.test,
        args.seed,
        n_val=args.val,
        unlabeled_labels=args.unlabeled_labels,
        lesions=args.lesions,
    )
    print(
        f"wrote {args.labeled} labeled, {args.val} validation, {args.unlabeled} unlabeled and {args.test} test cases to {out}"
    )
    return 0
