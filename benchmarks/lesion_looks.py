"""Which lesions do the labeled scans show, and which do the trained teachers find? Detection by how a lesion looks.

The sample cohort's lesions are hypodense, hyperdense or rim-enhancing (``medeman.sample_data``); blur and
noise take much of the contrast of the smallest. This script reads each lesion's look from the image as a
reader would, against the median intensity of the liver (label 1) of its scan:

- **hyperdense**: the lesion's mean is more than ``+15`` above the liver;
- **rim-enhancing**: else, its one-voxel border (the voxels a 6-neighbour erosion removes, as the generator
  draws the rim) is more than ``25`` brighter than its core;
- **hypodense**: else, its core is more than ``20`` below the liver;
- **faint**: none of these (the scan's blur and noise took the contrast).

It also gives each run's *extent*: of the voxels of the test lesions it finds, the share its mask covers (a network
that finds a lesion but segments only its core scores low Dice for it).

It counts the looks among the labeled training scans' lesions and the test scans' (``--data``:
``labeled/`` and ``test/``, each ``images/`` + ``labels/``), and for each run folder (``pred_test/``, the
test predictions ``benchmarks/lesion_benchmark.py`` writes) the share of each look's test lesions that
are found: the IoU of the lesion with the predicted components touching it >= ``--lesion-overlap``, as
``medeman evaluate`` counts a detected lesion (:func:`medeman.metrics.lesion_counts` on that lesion
alone). Runs are grouped by their parent folder's name (``<out>/<method>/seed<N>``), mean ± std over seeds.

    python benchmarks/lesion_looks.py --data runs/lesion_data --runs runs/lesion_benchmark/*/seed*
    python benchmarks/lesion_looks.py --smoke      # seconds: a tiny cohort whose "predictions" are its labels
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
from _report import NOTES_MARKER, commit, mean_std, notes_below
from scipy import ndimage

LIVER, LESION = 1, 3
LOOKS = ("hypodense", "hyperdense", "rim-enhancing", "faint")
EXTENT = "extent"  # of the voxels of the test lesions a run finds, the share it segments


def lesion_looks(image: np.ndarray, label: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """Each lesion (26-connected component of ``LESION``) of one scan as ``(mask, look)``, by the rules above."""
    liver = float(np.median(image[label == LIVER])) if (label == LIVER).any() else float(np.median(image))
    components, n = ndimage.label(label == LESION, np.ones((3, 3, 3)))
    out = []
    for i in range(1, n + 1):
        mask = components == i
        core = ndimage.binary_erosion(mask)
        rim = mask & ~core
        core_mean = float(image[core].mean()) if core.any() else float(image[mask].mean())
        if image[mask].mean() - liver > 15:
            look = "hyperdense"
        elif image[rim].mean() - core_mean > 25:
            look = "rim-enhancing"
        elif core_mean - liver < -20:
            look = "hypodense"
        else:
            look = "faint"
        out.append((mask, look))
    return out


def read_part(folder: Path) -> dict[str, list[tuple[np.ndarray, str]]]:
    """Case file name -> its lesions and looks, for ``folder/images`` + ``folder/labels``."""
    cases = {}
    for label_path in sorted((folder / "labels").glob("*.nii*")):
        image = np.asarray(nib.load(str(folder / "images" / label_path.name)).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(str(label_path)).dataobj).astype(np.int64)
        cases[label_path.name] = lesion_looks(image, label)
    return cases


def detection_by_look(run: Path, test: dict, overlap: float) -> dict[str, float]:
    """Share of the test lesions of each look that ``run``'s ``pred_test/`` finds."""
    from medeman.metrics import lesion_counts

    found = defaultdict(list)
    covered = size = 0  # voxels of the found lesions: segmented, in all
    for name, lesions in test.items():
        pred = np.asarray(nib.load(str(run / "pred_test" / name)).dataobj) == LESION
        for mask, look in lesions:
            detected = lesion_counts(pred, mask, overlap).detected
            found[look].append(detected)
            if detected:
                covered += int((pred & mask).sum())
                size += int(mask.sum())
    shares = {look: statistics.fmean(hits) for look, hits in found.items()}
    if size:
        shares[EXTENT] = covered / size
    return shares


def report(labeled: dict, test: dict, results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    def count(cases: dict, look: str) -> int:
        return sum(1 for lesions in cases.values() for _, seen in lesions if seen == look)

    lines = [
        "# Lesions by look: what the labeled scans show, what the teachers find",
        "",
        f"Looks read from the images (rules in `benchmarks/lesion_looks.py`); *found*: share of the test lesions of that "
        f"look detected at IoU >= {args.lesion_overlap:g}, mean ± std over seeds; *extent*: of the voxels of the "
        "lesions a run finds (any look), the share its mask covers.",
        "",
        "| | " + " | ".join(LOOKS) + " | extent |",
        "|---|" + "---|" * (len(LOOKS) + 1),
        f"| lesions in the {len(labeled)} labeled training scans | "
        + " | ".join(str(count(labeled, k)) for k in LOOKS)
        + " | |",
        f"| lesions in the {len(test)} test scans | " + " | ".join(str(count(test, k)) for k in LOOKS) + " | |",
    ]
    for method, runs in results.items():
        cols = [mean_std([r[k] for r in runs if k in r], 2) for k in (*LOOKS, EXTENT)]
        lines.append(f"| found by {method} ({len(runs)} runs) | " + " | ".join(cols) + " |")
    lines += ["", f"- Cohort `{args.data}`; code at {commit()}.", "", NOTES_MARKER]
    return "\n".join(lines) + "\n"


def _smoke_inputs(args: argparse.Namespace, root: Path) -> None:
    """A tiny lesion cohort and one "run" whose test predictions are the test labels (every lesion found)."""
    from medeman.sample_data import make_cohort

    args.data = make_cohort(
        root / "data", n_labeled=1, n_unlabeled=0, n_test=1, seed=11, other_formats=False, lesions=True
    )
    run = root / "runs" / "truth" / "seed0"
    shutil.copytree(args.data / "test" / "labels", run / "pred_test")
    args.runs = [run]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="the lesion cohort (labeled/ and test/, each images/ + labels/)")
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="run folders holding pred_test/")
    parser.add_argument("--lesion-overlap", type=float, default=0.1, help="IoU a lesion needs to count as found")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (.md) as well as printing it")
    parser.add_argument("--smoke", action="store_true", help="a tiny cohort, its labels as the predictions")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lesion-looks-") as tmp:
        if args.smoke:
            _smoke_inputs(args, Path(tmp))
            args.out = None
        if args.data is None:
            parser.error("--data is required (or --smoke)")
        labeled, test = read_part(args.data / "labeled"), read_part(args.data / "test")
        results: dict[str, list[dict]] = defaultdict(list)
        for run in args.runs:
            if not (run / "pred_test").is_dir():
                parser.error(f"{run}: no pred_test/ (the test predictions lesion_benchmark.py writes)")
            results[run.parent.name].append(detection_by_look(run, test, args.lesion_overlap))
        text = report(labeled, test, results, args)
        if args.smoke and any(v != 1.0 for r in results["truth"] for v in r.values()):
            raise SystemExit("smoke: the labels as predictions must find every lesion")
    print(text)
    if args.out is not None:
        notes = (notes_below(args.out) or "").lstrip("\n")
        args.out.write_text(text + ("\n" + notes if notes else ""), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
