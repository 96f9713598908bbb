"""Active learning: does labeling the scans `medeman rank` puts first beat labeling random scans?

Each seed gets its own cohort from the sample generator (:func:`medeman.sample_data.make_cohort`
with ``unseen_every=3``): a small labeled set and validation cases from scanners A-C only, and a
pool of unlabeled scans and test cases of which every third comes from scanner D, which no labeled
case comes from (+80 HU calibration drift, twice the noise, more blur; see
:data:`medeman.sample_data.UNSEEN_SCANNER`). The generator keeps every pool scan's truth
(``unlabeled_labels/``), so "annotating" a scan means copying it with its true label into the
labeled set.

Round 0 trains a mean teacher (EMAN) on the initial labeled set with the pool as unlabeled data
and scores its ``teacher.pt`` on the test cases. Each following round, each strategy ranks the
remaining pool with :func:`medeman.rank.rank_cases` using the previous round's run, moves its top
``K`` into the labeled set and trains again from scratch with the same budget. All strategies of
a seed start from the same round-0 run, so differences are paired per seed. A case's score is its
mean foreground Dice (classes 1..C-1); the table reports the mean over test cases, also split into
scanners A-C ("seen") and D ("unseen"), as mean ± std over seeds.

    nice -n 5 python benchmarks/active_learning.py --seeds 0 1 2 --rounds 2 --k 4 --out runs/active_learning
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import mean_std

REPO = Path(__file__).resolve().parents[1]
# --smoke: a tiny network and cohort, a few steps, one seed and round; outputs in a temporary folder
SMOKE_SETS = [
    "train.val_every_steps=2",
    "model.channels=[4,8]",
    "model.num_res_units=0",
    "data.cache=none",
    "data.num_workers=0",
    "ssl.recalibration_batches=1",
]
STUDY_SCORES = ("entropy_fg", "entropy_mean", "argmax_differs", "volume_ml_c1")
CSV_COLUMNS = (
    "seed",
    "strategy",
    "round",
    "n_labeled",
    "dice_fg",
    "dice_seen",
    "dice_unseen",
    "picked",
    "picked_unseen",
    "val_best_teacher",
    "train_s",
)


# --------------------------------------------------------------------------- cohort and labeled sets


def make_data(seed: int, args: argparse.Namespace) -> Path:
    """The seed's cohort (written once): labeled/, val/ from scanners A-C; unlabeled/ (+ truth), test/ with scanner D."""
    from medeman.sample_data import make_cohort

    cohort = Path(args.out) / f"cohort_seed{seed}"
    if not (cohort / "scanners.csv").is_file():
        make_cohort(
            cohort,
            n_labeled=args.initial,
            n_unlabeled=args.pool,
            n_test=args.test,
            seed=1000 + seed,
            other_formats=False,
            n_val=args.val,
            unlabeled_labels=True,
            unseen_every=args.unseen_every,
        )
    return cohort


def scanners(cohort: Path) -> dict[str, str]:
    """Case id -> scanner name, from the generator's ``scanners.csv``."""
    with open(cohort / "scanners.csv", newline="") as handle:
        return {row["case"]: row["scanner"] for row in csv.DictReader(handle)}


def case_id(path: Path) -> str:
    return path.name.split(".")[0]


def build_sets(cohort: Path, acquired: list[str], folder: Path) -> tuple[Path, Path]:
    """``folder/labeled`` (initial cases + acquired pool scans with their truth) and ``folder/unlabeled`` (the rest of the pool)."""
    if folder.exists():
        shutil.rmtree(folder)
    labeled, unlabeled = folder / "labeled", folder / "unlabeled"
    for sub in ("images", "labels"):
        shutil.copytree(cohort / "labeled" / sub, labeled / sub)
    unlabeled.mkdir(parents=True)
    for scan in sorted((cohort / "unlabeled").iterdir()):
        if case_id(scan) in acquired:
            shutil.copy(scan, labeled / "images" / scan.name)
            shutil.copy(cohort / "unlabeled_labels" / scan.name, labeled / "labels" / scan.name)
        else:
            shutil.copy(scan, unlabeled / scan.name)
    return labeled, unlabeled


# --------------------------------------------------------------------------- one round


def train_and_score(cohort: Path, acquired: list[str], run_dir: Path, seed: int, args: argparse.Namespace) -> dict:
    """Train on the initial set + ``acquired``, score ``teacher.pt`` on the test cases; reuse a finished round."""
    done = run_dir / "round.json"
    if done.is_file():
        return json.loads(done.read_text())
    from medeman.config import load_config
    from medeman.score_run import segment_and_score
    from medeman.train import fit

    labeled, unlabeled = build_sets(cohort, acquired, run_dir / "data")
    cfg = load_config([args.config], [*args.set, f"train.seed={seed}", f"train.max_steps={args.steps}"])
    start = time.perf_counter()
    result = fit(
        cfg,
        labeled,
        unlabeled,
        val=cohort / "val",
        out_dir=run_dir / "run",
        overwrite=True,
        progress_bar=False,
        logger=False,
    )
    train_s = time.perf_counter() - start
    _, summary = segment_and_score(
        run_dir / "run",
        cohort / "test" / "images",
        cohort / "test" / "labels",
        run_dir / "pred",
        overwrite=True,
        progress=False,
        device="cpu",
    )
    if summary.problems:
        raise RuntimeError(f"{run_dir}: test cases not scored: {summary.problems[0]}")
    classes = range(1, int(cfg["data"]["num_classes"]))
    dice = {(s.case_id, s.label): s.dice for s in summary.scores}
    per_case = {case: statistics.fmean(dice[(case, c)] for c in classes) for case in summary.cases}
    kind = scanners(cohort)
    seen = [v for case, v in per_case.items() if kind[case] != "D"]
    unseen = [v for case, v in per_case.items() if kind[case] == "D"]
    record = {
        "n_labeled": args.initial + len(acquired),
        "dice_fg": statistics.fmean(per_case.values()),
        "dice_seen": statistics.fmean(seen) if seen else float("nan"),
        "dice_unseen": statistics.fmean(unseen) if unseen else float("nan"),
        "val_best_teacher": result.best_dice_teacher,
        "train_s": round(train_s, 1),
    }
    shutil.rmtree(run_dir / "data" / "labeled")  # copies; the record lists what was labeled
    done.write_text(json.dumps(record, indent=1))
    return record


def acquire(run_dir: Path, unlabeled: Path, strategy: str, k: int, seed: int) -> list[str]:
    """The ``k`` scans ``strategy`` ranks first among ``unlabeled``, by the run in ``run_dir``."""
    from medeman.rank import rank_cases

    rows, problems = rank_cases(
        run_dir / "run", unlabeled, None, strategy=strategy, top=k, seed=seed, device="cpu", progress=False
    )
    if problems:
        raise RuntimeError(f"{unlabeled}: scans not ranked: {problems[0]}")
    return [row["case"] for row in rows[:k]]


def score_study(cohort: Path, round_dir: Path, seed: int, k: int) -> list[dict]:
    """How well each score finds the pool scans the round-0 teacher gets wrong (the generator knows their truth).

    For each score: Spearman's rho with the teacher's true error (1 - mean foreground Dice) over the
    pool, and the mean true error of the ``k`` scans it ranks first (random picks expect the pool mean).
    """
    from scipy.stats import spearmanr

    from medeman.score_run import segment_and_score
    from medeman.rank import rank_cases
    from medeman.rank_scores import rank_fraction

    rows, _ = rank_cases(round_dir / "run", cohort / "unlabeled", None, device="cpu", progress=False)
    _, summary = segment_and_score(
        round_dir / "run",
        cohort / "unlabeled",
        cohort / "unlabeled_labels",
        round_dir / "pool_pred",
        overwrite=True,
        progress=False,
        device="cpu",
    )
    classes = sorted({s.label for s in summary.scores})
    dice = {(s.case_id, s.label): s.dice for s in summary.scores}
    error = np.array([1.0 - statistics.fmean(dice[(r["case"], c)] for c in classes) for r in rows])
    kind = scanners(cohort)
    candidates = {name: np.array([r[name] for r in rows], dtype=float) for name in STUDY_SCORES}
    candidates["disagreement"] = np.array([statistics.fmean(r[f"disagree_c{c}"] for c in classes) for r in rows])
    for name in ("entropy_fg", "entropy_mean"):  # mean rank fractions; the second is the strategy "combined"
        candidates[f"{name} + disagreement"] = (
            rank_fraction(candidates[name]) + rank_fraction(candidates["disagreement"])
        ) / 2
    out = []
    for name, values in candidates.items():
        values = np.where(np.isnan(values), np.inf, values)
        top = np.argsort(-values, kind="stable")[:k]
        out.append(
            {
                "seed": seed,
                "score": name,
                "spearman": float(spearmanr(values, error).statistic),
                "top_k_error": float(error[top].mean()),
                "pool_error": float(error.mean()),
                "top_k_unseen": int(sum(kind[rows[i]["case"]] == "D" for i in top)),
            }
        )
    return out


def run_seed(seed: int, args: argparse.Namespace) -> list[dict]:
    """Round 0, then ``args.rounds`` acquisition rounds per strategy, all from the same round-0 run."""
    cohort = make_data(seed, args)
    kind = scanners(cohort)
    base = Path(args.out) / f"seed{seed}"
    first = train_and_score(cohort, [], base / "round0", seed, args)
    records = [
        {"seed": seed, "strategy": s, "round": 0, "picked": "", "picked_unseen": 0, **first} for s in args.strategies
    ]
    print(
        f"seed {seed} round 0: test Dice {first['dice_fg']:.3f} (seen {first['dice_seen']:.3f}, unseen {first['dice_unseen']:.3f})",
        flush=True,
    )
    for strategy in args.strategies:
        acquired: list[str] = []
        previous = base / "round0"
        for round_ in range(1, args.rounds + 1):
            folder = base / strategy / f"round{round_}"
            picks_file = folder / "picked.json"
            if picks_file.is_file():
                picked = json.loads(picks_file.read_text())
            else:
                _, pool = build_sets(cohort, acquired, folder / "ranked_pool")
                picked = acquire(previous, pool, strategy, args.k, seed=100 * seed + round_)
                shutil.rmtree(folder / "ranked_pool")
                folder.mkdir(parents=True, exist_ok=True)
                picks_file.write_text(json.dumps(picked))
            acquired = acquired + picked
            record = train_and_score(cohort, acquired, folder, seed, args)
            n_unseen = sum(kind[c] == "D" for c in picked)
            records.append(
                {
                    "seed": seed,
                    "strategy": strategy,
                    "round": round_,
                    "picked": " ".join(picked),
                    "picked_unseen": n_unseen,
                    **record,
                }
            )
            print(
                f"seed {seed} {strategy} round {round_}: picked {len(picked)} ({n_unseen} from scanner D), "
                f"test Dice {record['dice_fg']:.3f} (seen {record['dice_seen']:.3f}, unseen {record['dice_unseen']:.3f}; "
                f"train {record['train_s']:.0f} s)",
                flush=True,
            )
            previous = folder
    return records


# --------------------------------------------------------------------------- report


def write_results(records: list[dict], args: argparse.Namespace, command: str, wall_s: float) -> Path:
    """``active_learning.csv`` (every seed, strategy, round), ``.md`` (table, paired differences) and ``.png``."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "active_learning.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()})

    def pick(strategy, round_, key):
        return [
            r[key]
            for r in sorted(records, key=lambda r: r["seed"])
            if r["strategy"] == strategy and r["round"] == round_
        ]

    seeds = sorted({r["seed"] for r in records})
    strategies = [s for s in args.strategies if any(r["strategy"] == s for r in records)]
    lines = [
        "# Active learning: label the scans `medeman rank` puts first, or random ones?",
        "",
        f"Test Dice (mean foreground Dice per case, averaged over the test cases) after each round, mean ± std over "
        f"{len(seeds)} seeds; `seen` = test cases from scanners A-C, `unseen` = from scanner D, which no initial labeled "
        "case comes from. `D picked` = scans from scanner D among those labeled so far (of the strategy's picks).",
        "",
        "| round | labeled | strategy | test Dice | seen (A-C) | unseen (D) | D picked | Δ Dice vs random (per seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for round_ in range(args.rounds + 1):
        for strategy in strategies if round_ else strategies[:1]:
            dice = pick(strategy, round_, "dice_fg")
            if not dice:
                continue
            picked = [
                sum(
                    r["picked_unseen"]
                    for r in records
                    if r["seed"] == s and r["strategy"] == strategy and 0 < r["round"] <= round_
                )
                for s in seeds
                if pick(strategy, round_, "dice_fg")
            ]
            delta = ""
            if (
                round_
                and strategy != "random"
                and "random" in strategies
                and len(pick("random", round_, "dice_fg")) == len(dice)
            ):
                diffs = [a - b for a, b in zip(dice, pick("random", round_, "dice_fg"))]
                delta = f"{statistics.fmean(diffs):+.3f} ({', '.join(f'{d:+.3f}' for d in diffs)})"
            name = strategy if round_ else "(initial, shared)"
            lines.append(
                f"| {round_} | {pick(strategy, round_, 'n_labeled')[0]} | {name} | {mean_std(dice)} | "
                f"{mean_std(pick(strategy, round_, 'dice_seen'))} | {mean_std(pick(strategy, round_, 'dice_unseen'))} | "
                f"{statistics.fmean(picked):.1f} / {args.k * round_} | {delta} |"
            )
    lines += [
        "",
        f"- Command: `{command}`",
        f"- Cohort per seed (`make_cohort(seed=1000+seed, unseen_every={args.unseen_every})`): {args.initial} labeled and "
        f"{args.val} validation cases (scanners A-C), a pool of {args.pool} unlabeled scans and {args.test} test cases, "
        f"every {args.unseen_every}rd of them from scanner D.",
        f"- Each round trains from scratch: `{_relative(args.config)}`, {args.steps} steps, {' '.join(args.set) or 'no overrides'}; "
        f"K = {args.k} scans labeled per round; the deployed `teacher.pt` (best validation Dice) is scored and ranks the pool.",
        f"- Wall time {wall_s / 60:.1f} min for this invocation, one process, 1 thread "
        f"({statistics.fmean(r['train_s'] for r in records):.0f} s per training on average).",
        "- Every seed, strategy and round, with the scans each strategy picked: `active_learning.csv`; plot: `active_learning.png`.",
    ]
    md = results / "active_learning.md"
    marker = "<!-- notes: text below this line is kept when the table is regenerated -->"
    notes = md.read_text().split(marker, 1)[1] if md.is_file() and marker in md.read_text() else "\n"
    md.write_text("\n".join(lines) + "\n\n" + marker + notes)
    _plot(records, strategies, seeds, args, results / "active_learning.png")
    return md


def _relative(path: str | Path) -> str:
    """A path as the README shows it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _plot(records: list[dict], strategies: list[str], seeds: list[int], args, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    colours = {"random": "#808080", "combined": "#e6194b", "entropy": "#4363d8", "disagreement": "#3cb44b"}
    for ax, key, title in zip(axes, ("dice_fg", "dice_unseen"), ("all test cases", "unseen scanner D")):
        for strategy in strategies:
            rounds = [
                r for r in range(args.rounds + 1) if any(x["strategy"] == strategy and x["round"] == r for x in records)
            ]
            labeled = [args.initial + args.k * r for r in rounds]
            for seed in seeds:
                ys = [
                    next(x[key] for x in records if x["seed"] == seed and x["strategy"] == strategy and x["round"] == r)
                    for r in rounds
                    if any(x["seed"] == seed and x["strategy"] == strategy and x["round"] == r for x in records)
                ]
                ax.plot(labeled[: len(ys)], ys, color=colours.get(strategy, "k"), alpha=0.25, linewidth=1)
            means = [
                statistics.fmean(x[key] for x in records if x["strategy"] == strategy and x["round"] == r)
                for r in rounds
            ]
            ax.plot(labeled, means, color=colours.get(strategy, "k"), marker="o", linewidth=2, label=strategy)
        ax.set_title(f"test Dice, {title}")
        ax.set_xlabel("labeled scans")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean foreground Dice")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(str(path))


def write_study(records: list[dict], args: argparse.Namespace, command: str) -> Path:
    """``active_learning_scores.{csv,md}``: per score, rho with the true error and the error of its top K, over seeds."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "active_learning_scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in records)
    seeds = sorted({r["seed"] for r in records})
    pool_error = statistics.fmean(r["pool_error"] for r in records if r["score"] == records[0]["score"])
    lines = [
        "# Which score finds the scans the model gets wrong? (pilot for the default strategy)",
        "",
        f"Round-0 teacher of seeds {' '.join(map(str, seeds))} (cohorts `make_cohort(seed=1000+seed, unseen_every={args.unseen_every})`, "
        f"not the seeds of the active-learning table); the pool's true error is 1 - mean foreground Dice of the teacher's mask "
        f"against the generator's truth. Spearman's rho of each score with that error over the {args.pool} pool scans, and the "
        f"mean true error of the {args.k} scans each score ranks first (random picks: the pool mean, {pool_error:.3f}); "
        "`D in top K`: of those, scans from the unseen scanner. Mean ± std over seeds.",
        "",
        f"| score | rho with true error | error of top {args.k} | D in top {args.k} |",
        "|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["score"] for r in records):
        rows = [r for r in records if r["score"] == name]
        lines.append(
            f"| {name} | {mean_std([r['spearman'] for r in rows])} | {mean_std([r['top_k_error'] for r in rows])} | "
            f"{statistics.fmean(r['top_k_unseen'] for r in rows):.1f} |"
        )
    lines += [
        "",
        f"- Command: `{command}`",
        f"- Training: `{_relative(args.config)}`, {args.steps} steps, {' '.join(args.set) or 'no overrides'}.",
    ]
    md = results / "active_learning_scores.md"
    marker = "<!-- notes: text below this line is kept when the table is regenerated -->"
    notes = md.read_text().split(marker, 1)[1] if md.is_file() and marker in md.read_text() else "\n"
    md.write_text("\n".join(lines) + "\n\n" + marker + notes)
    return md


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "sample.yaml"), help="base config of every training")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every training")
    parser.add_argument("--strategies", nargs="+", default=["random", "combined", "entropy"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="acquisition rounds after the initial training")
    parser.add_argument("--k", type=int, default=4, help="scans labeled per round")
    parser.add_argument("--steps", type=int, default=300, help="training steps per round")
    parser.add_argument("--initial", type=int, default=4, help="initially labeled cases (scanners A-C)")
    parser.add_argument("--val", type=int, default=2, help="validation cases (scanners A-C)")
    parser.add_argument("--pool", type=int, default=24, help="unlabeled pool")
    parser.add_argument("--test", type=int, default=9, help="test cases")
    parser.add_argument("--unseen-every", type=int, default=3, help="every N-th pool and test scan from scanner D")
    parser.add_argument(
        "--out", default="runs/active_learning", help="work folder (cohorts, runs); finished rounds are reused"
    )
    parser.add_argument(
        "--results", default=str(REPO / "benchmarks" / "results"), help="where the .md, .csv and .png go"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny net and cohort, 4 steps, one seed and round, benchmark and study in a temporary folder",
    )
    parser.add_argument(
        "--study",
        action="store_true",
        help="only round 0 and the score study (active_learning_scores.md): run on seeds other than the benchmark's",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = build_parser().parse_args(argv)
    command = "python benchmarks/active_learning.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    records: list[dict] = []
    if args.smoke:  # everything under a temporary folder: the recorded results are never touched
        with tempfile.TemporaryDirectory(prefix="active_learning_smoke_") as scratch:
            args.out, args.results = str(Path(scratch) / "runs"), str(Path(scratch) / "results")
            args.seeds, args.rounds, args.k, args.steps = args.seeds[:1], 1, 2, 4
            args.initial, args.val, args.pool, args.test = 2, 1, 6, 3
            args.strategies, args.set = ["random", "combined"], [*SMOKE_SETS, *args.set]
            records = run_seed(args.seeds[0], args)
            print(write_results(records, args, command, time.perf_counter() - start).read_text())
            cohort, round0 = make_data(args.seeds[0], args), Path(args.out) / f"seed{args.seeds[0]}" / "round0"
            print(write_study(score_study(cohort, round0, args.seeds[0], args.k), args, command).read_text())
        return 0
    if args.study:
        for seed in args.seeds:
            cohort = make_data(seed, args)
            train_and_score(cohort, [], Path(args.out) / f"seed{seed}" / "round0", seed, args)
            records += score_study(cohort, Path(args.out) / f"seed{seed}" / "round0", seed, args.k)
            md = write_study(records, args, command)
        print(md.read_text())
        return 0
    for seed in args.seeds:
        records += run_seed(seed, args)
        md = write_results(records, args, command, time.perf_counter() - start)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
