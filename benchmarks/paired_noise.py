"""How much of a paired per-seed difference is the test set's? Seeds x cases decomposition of one class's Dice.

``lesion_benchmark.py`` compares two methods seed by seed: the same seed gives both the same initial network and
data order, and each seed's difference is the mean over the test cases of ``d[s, c] = dice_A[s, c] -
dice_B[s, c]``. Written as ``d[s, c] = mu + a[c] + b[s] + e[s, c]`` (a two-way layout with one run per cell), the
spread of the per-seed means over seeds is ``var(b) + var(e) / C``: training noise ``b`` that no test set removes,
and the network x case interaction ``e`` (which lesions this seed's network finds that the other's misses) that
shrinks with the number of test cases ``C``. The script estimates both from the runs' ``test_scores.csv`` (the
interaction from the residual mean square, ``var(b)`` as what is left of the seed means' variance, floored at 0),
and under a normal approximation the chance that one seed comes out ahead with ``C`` test cases, for ``--cases``.

    python benchmarks/paired_noise.py --out runs/lesion_benchmark --method fixmatch_da_paste_both_cw \\
        --base supervised_paste --class-label 3 --cases 8 48
    python benchmarks/paired_noise.py --smoke      # a second: made-up scores of 3 seeds x 4 cases
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from pathlib import Path

import numpy as np


def case_dice(csv_path: Path, label: int) -> dict[str, float]:
    """``{case: Dice}`` of class ``label`` in a ``medeman evaluate``-style ``*_scores.csv``."""
    if not csv_path.is_file():
        raise SystemExit(f"{csv_path}: no such file (is --out the benchmark's run folder, and was the run scored?)")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["class"] == str(label)]
    if not rows:
        raise SystemExit(f"{csv_path}: no rows of class {label}")
    empty = [row["case"] for row in rows if not row["dice"]]
    if empty:
        raise SystemExit(f"{csv_path}: class {label} has no Dice in {', '.join(empty)} (absent from both masks)")
    return {row["case"]: float(row["dice"]) for row in rows}


def differences(out: Path, method: str, base: str, seeds: list[int], label: int, part: str = "test") -> np.ndarray:
    """``d[s, c]``: per-case Dice of ``method`` minus ``base``, seeds x cases (the cases both runs of a seed scored)."""
    rows, cases = [], None
    for seed in seeds:
        a = case_dice(out / method / f"seed{seed}" / f"{part}_scores.csv", label)
        b = case_dice(out / base / f"seed{seed}" / f"{part}_scores.csv", label)
        if set(a) != set(b) or (cases is not None and set(a) != set(cases)):
            raise SystemExit(f"seed {seed}: {method} and {base} were scored on different {part} cases")
        cases = sorted(a)
        rows.append([a[c] - b[c] for c in cases])
    return np.asarray(rows, dtype=float)


def decompose(d: np.ndarray) -> dict[str, float]:
    """Seed and interaction variance of a seeds x cases table of paired differences (at least 2 x 2).

    Returns:
        ``mean`` (of all cells), ``seed_means_var`` (variance of the per-seed means, ddof 1), ``interaction_var``
        (residual mean square of the two-way layout, ``var(e)``), ``seed_var`` (``seed_means_var - var(e) / C``,
        floored at 0), ``cases`` and ``seeds``.
    """
    seeds, cases = d.shape
    if seeds < 2 or cases < 2:
        raise ValueError(f"need at least 2 seeds and 2 cases, got {seeds} x {cases}")
    resid = d - d.mean(axis=1, keepdims=True) - d.mean(axis=0, keepdims=True) + d.mean()
    interaction = float((resid**2).sum() / ((seeds - 1) * (cases - 1)))
    seed_means_var = float(d.mean(axis=1).var(ddof=1))
    return {
        "mean": float(d.mean()),
        "seed_means_var": seed_means_var,
        "interaction_var": interaction,
        "seed_var": max(seed_means_var - interaction / cases, 0.0),
        "cases": cases,
        "seeds": seeds,
    }


def chance_ahead(parts: dict[str, float], cases: int) -> float:
    """P(a seed's mean difference > 0) with ``cases`` test cases, if it is normal with the estimated spread."""
    sd = math.sqrt(parts["seed_var"] + parts["interaction_var"] / cases)
    return 0.5 * (1.0 + math.erf(parts["mean"] / (sd * math.sqrt(2.0)))) if sd > 0 else float(parts["mean"] > 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, help="the benchmark's run folder (<out>/<method>/seed<N>)")
    parser.add_argument("--method", default="method")
    parser.add_argument("--base", default="base")
    parser.add_argument("--class-label", type=int, default=3, help="label value scored (default 3: the lesion)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--part", default="test", choices=("test", "val"))
    parser.add_argument("--cases", type=int, nargs="+", default=[8, 48], help="test-set sizes to project to")
    parser.add_argument("--smoke", action="store_true", help="made-up scores in a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="paired_noise_") as tmp:
            write_made_up_scores(Path(tmp), args.method, args.base, seeds=3, cases=4, label=args.class_label)
            args.out, args.seeds = Path(tmp), [0, 1, 2]
            return report(args)
    if args.out is None:
        parser.error("--out is required (or --smoke)")
    return report(args)


def write_made_up_scores(out: Path, method: str, base: str, seeds: int, cases: int, label: int) -> None:
    """``<out>/<method|base>/seed<N>/test_scores.csv`` with random Dice (the smoke run's input)."""
    rng = np.random.default_rng(0)
    for name in (method, base):
        for seed in range(seeds):
            run = out / name / f"seed{seed}"
            run.mkdir(parents=True)
            lines = [f"case_{c:03d},{label},{rng.uniform():.4f}" for c in range(cases)]
            (run / "test_scores.csv").write_text("\n".join(["case,class,dice", *lines]) + "\n")


def report(args: argparse.Namespace) -> int:
    """Print the decomposition of ``args.method - args.base`` (see the module docstring)."""
    d = differences(args.out, args.method, args.base, args.seeds, args.class_label, args.part)
    parts = decompose(d)
    per_seed = d.mean(axis=1)
    print(f"{args.method} - {args.base}, class {args.class_label}, {parts['seeds']} seeds x {parts['cases']} cases")
    print(f"per-seed differences: {' '.join(f'{v:+.3f}' for v in per_seed)} (ahead {(per_seed > 0).sum()})")
    print(
        f"mean {parts['mean']:+.4f}; variance of the seed means {parts['seed_means_var']:.5f}: interaction / cases "
        f"{parts['interaction_var'] / parts['cases']:.5f}, seeds (the rest, at least 0) {parts['seed_var']:.5f}"
    )
    for cases in args.cases:
        print(f"{cases} cases: a seed ahead with probability {chance_ahead(parts, cases):.2f} (normal approximation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
