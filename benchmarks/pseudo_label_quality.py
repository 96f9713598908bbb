"""What do the unlabeled scans teach? The trained teacher's predictions on them, against their hidden truth.

The consistency and pseudo-label losses pull the student toward the teacher's output on the
unlabeled scans, so they can only teach what that output gets right and the student does not
already know. For each run folder (``teacher.pt``, the network ``medeman train`` deploys) this
script segments the unlabeled scans at the training resolution and scores, per class, against the
scans' ground truth (which training never saw):

- **teacher Dice**: the argmax against the truth (what the soft consistency pulls toward);
- **confident recall**: share of the class's true voxels that get a correct pseudo-label of
  confidence >= ``--threshold`` (what FixMatch-style hard pseudo-labels can teach);
- **confident precision**: share of the confident voxels labelled with the class that are right;
- **errors at the border**: share of the wrong voxels (predicted xor true, for the class) within
  one voxel of the true class border -- boundary disagreement, which consistency cannot resolve
  because the teacher is as unsure there as the student;
- **confident errors**: share of the wrong voxels the teacher is confident about (>= threshold):
  the confirmation bias hard pseudo-labels would train in.

``--align-to LABELED`` adds a row per method whose probabilities are first aligned to the class
frequencies of the labeled scans (distribution alignment, Berthelot et al., "ReMixMatch", ICLR
2020: ``p(c) <- p(c) * prior(c) / marginal(c)``, renormalised, where ``marginal`` is the teacher's
mean probability over the unlabeled voxels): can a teacher that under-predicts a rare class be
corrected by the class frequencies alone?

Runs are grouped by their parent folder's name (``<out>/<method>/seed<N>``, as
``benchmarks/ssl_ablation.py`` and ``lesion_benchmark.py`` write them), mean ± std over seeds.

    python benchmarks/pseudo_label_quality.py --runs runs/ablation/*/seed* \\
        --unlabeled runs/ablation_cohort_val6/unlabeled --truth runs/ablation_cohort_val6/unlabeled_labels
    python benchmarks/pseudo_label_quality.py --smoke    # seconds: a tiny untrained run, checks that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import NOTES_MARKER, commit, hardware, mean_std, notes_below

REPO = Path(__file__).resolve().parents[1]
SCORES = ("dice", "confident_recall", "confident_precision", "errors_at_border", "confident_errors")


def border(mask: torch.Tensor) -> torch.Tensor:
    """Voxels within one voxel (26-neighbourhood) of the border of a boolean ``(X, Y, Z)`` mask, inside or out."""
    m = mask[None, None].float()
    dilated = F.max_pool3d(m, 3, stride=1, padding=1) > 0
    eroded = -F.max_pool3d(-m, 3, stride=1, padding=1) > 0
    return (dilated & ~eroded)[0, 0]


def class_scores(probs: torch.Tensor, truth: torch.Tensor, label: int, threshold: float) -> dict[str, float]:
    """The five scores of class ``label`` for one scan: ``probs`` ``(C, X, Y, Z)``, ``truth`` ``(X, Y, Z)`` integers.

    A ratio whose denominator is empty is NaN (left out of the means).
    """
    confidence, pred = probs.max(0)
    p, t = pred == label, truth == label
    confident = confidence >= threshold
    wrong = p ^ t

    def ratio(a: torch.Tensor, b: torch.Tensor) -> float:
        n = int(b.sum())
        return float((a & b).sum()) / n if n else float("nan")

    inter, total = int((p & t).sum()), int(p.sum() + t.sum())
    return {
        "dice": 2 * inter / total if total else float("nan"),
        "confident_recall": ratio(p & confident, t),
        "confident_precision": ratio(t, p & confident),
        "errors_at_border": ratio(border(t), wrong),
        "confident_errors": ratio(confident, wrong),
    }


def class_frequencies(cfg: dict, labeled: Path) -> torch.Tensor:
    """Class frequencies of ``labeled/labels`` at the training resolution (``labeled/images`` beside them), ``(C,)``."""
    from medeman.data.transforms import validation_transforms

    from medeman.pseudo_labels import class_shares

    transform = validation_transforms(cfg)
    cases = (
        transform({"image": str(labeled / "images" / label.name), "label": str(label)})
        for label in sorted((labeled / "labels").iterdir())
    )
    return class_shares((case["label"] for case in cases), cfg["data"]["num_classes"])


def score_run(
    net: torch.nn.Module,
    cfg: dict,
    pairs: list[tuple[Path, Path]],
    threshold: float,
    prior: torch.Tensor | None = None,
) -> dict[str, dict[int, dict[str, float]]]:
    """Per class, each score averaged over the unlabeled scans (NaNs left out), for a loaded teacher and its config.

    Returns ``{"": scores}``, and with a ``prior`` also ``{" aligned": scores}`` of the aligned probabilities.
    """
    from medeman.data.transforms import validation_transforms
    from medeman.predict import predict_volume
    from medeman.pseudo_labels import align_distribution

    transform = validation_transforms(cfg)
    cases = []
    for image, label in pairs:
        case = transform({"image": str(image), "label": str(label)})
        cases.append((predict_volume(net, case["image"], cfg), torch.as_tensor(case["label"])[0].round().long()))
    variants = {"": lambda probs: probs}
    if prior is not None:
        voxels = sum(probs[0].numel() for probs, _ in cases)
        marginal = sum(probs.flatten(1).sum(1) for probs, _ in cases) / voxels
        variants[" aligned"] = lambda probs: align_distribution(probs, prior, marginal, class_dim=0)
    results = {}
    for name, transform_probs in variants.items():
        per_class: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for probs, truth in cases:
            probs = transform_probs(probs)
            for c in range(1, probs.shape[0]):
                for key, value in class_scores(probs, truth, c, threshold).items():
                    if value == value:  # not NaN
                        per_class[c][key].append(value)
        results[name] = {c: {k: statistics.fmean(v) for k, v in scores.items()} for c, scores in per_class.items()}
    return results


def runs_summary(runs: list[Path]) -> str:
    """``root/{a,b}/seed{0,1}`` for run folders laid out as ``<root>/<method>/seed<N>``, else the folders."""
    roots = {run.parent.parent for run in runs}
    if len(roots) == 1 and all(run.name.startswith("seed") for run in runs):
        methods = ",".join(dict.fromkeys(run.parent.name for run in runs))
        seeds = ",".join(dict.fromkeys(run.name.removeprefix("seed") for run in runs))
        return f"`{roots.pop()}/{{{methods}}}/seed{{{seeds}}}`"
    return ", ".join(f"`{run}`" for run in runs)


def write_report(results: dict[str, list[dict]], names: dict[int, str], args: argparse.Namespace) -> str:
    lines = [
        "# What the teacher teaches: its predictions on the unlabeled scans against their hidden truth",
        "",
        f"Per class, mean ± std over runs (seeds) of the per-scan means over {args.n_scans} unlabeled scans; "
        f"confidence threshold {args.threshold}. Written by `benchmarks/pseudo_label_quality.py` (see its docstring "
        "for each score).",
        "",
        "| method | runs | class | teacher Dice | confident recall | confident precision | errors at the border | confident errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        for c in sorted(names):
            cols = [mean_std([r[c][k] for r in runs if c in r and k in r[c]]) for k in SCORES]
            lines.append(f"| {method} | {len(runs)} | {c} ({names[c]}) | {' | '.join(cols)} |")
    lines += [
        "",
        f"- Runs: {runs_summary(args.runs)}; unlabeled scans `{args.unlabeled}`, truth `{args.truth}`; code at {commit()}.",
        f"- Hardware: {hardware()}.",
        *(
            [
                f"- Rows `<method> aligned`: the same probabilities aligned to the class frequencies of `{args.align_to}` "
                "(ReMixMatch's distribution alignment, with the teacher's mean probability over the unlabeled voxels)."
            ]
            if args.align_to is not None
            else []
        ),
        "",
        NOTES_MARKER,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, help="run folders holding teacher.pt (<method>/seed<N>)")
    parser.add_argument("--unlabeled", type=Path, help="the unlabeled images the runs trained on")
    parser.add_argument("--truth", type=Path, help="their ground-truth labels (same file names)")
    parser.add_argument("--threshold", type=float, default=0.9, help="confidence of a hard pseudo-label")
    parser.add_argument(
        "--align-to",
        type=Path,
        default=None,
        help="labeled folder (images/, labels/): add rows with the probabilities aligned to its class frequencies",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the table here (.md) as well as printing it")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a tiny cohort and an untrained teacher")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from medeman.checkpoint import load_teacher

    with tempfile.TemporaryDirectory(prefix="pseudo-label-quality-") as tmp:
        if args.smoke:
            _smoke_inputs(args, Path(tmp))
        if not (args.runs and args.unlabeled and args.truth):
            parser.error("--runs, --unlabeled and --truth are required (or --smoke)")
        truth = {p.name: p for p in args.truth.iterdir()}
        pairs = [(p, truth[p.name]) for p in sorted(args.unlabeled.iterdir()) if p.name in truth]
        if not pairs:
            parser.error(f"no image of {args.unlabeled} has a label of the same name in {args.truth}")
        args.n_scans = len(pairs)
        results: dict[str, list[dict]] = defaultdict(list)
        names: dict[int, str] = {}
        for run in args.runs:
            if not (run / "teacher.pt").is_file():
                print(f"{run}: no teacher.pt, skipped", file=sys.stderr)
                continue
            net, cfg, _ = load_teacher(run)
            prior = class_frequencies(cfg, args.align_to) if args.align_to is not None else None
            labels = cfg["data"]["labels"] or {}
            for variant, scores in score_run(net, cfg, pairs, args.threshold, prior).items():
                results[run.parent.name + variant].append(scores)
                names.update({c: str(labels.get(c, f"class {c}")) for c in scores})
                print(
                    f"{run}{variant}: " + ", ".join(f"class {c} Dice {s['dice']:.3f}" for c, s in scores.items()),
                    flush=True,
                )
        report = write_report(results, names, args)
    print(report)
    if args.out is not None and not args.smoke:
        notes = (notes_below(args.out) or "").lstrip("\n")
        args.out.write_text(report + ("\n" + notes if notes else ""), encoding="utf-8")
    return 0


def _smoke_inputs(args: argparse.Namespace, tmp: Path) -> None:
    from medeman.checkpoint import save_teacher
    from medeman.config import load_config
    from medeman.nets import build_network
    from medeman.sample_data import make_cohort

    cohort = make_cohort(tmp / "cohort", n_labeled=1, n_unlabeled=2, n_test=0, n_val=0, unlabeled_labels=True)
    cfg = load_config([REPO / "configs" / "ablation.yaml"], ["data.patch_size=[16,16,16]", "model.channels=[4,8]"])
    run = tmp / "runs" / "untrained" / "seed0"
    run.mkdir(parents=True)
    save_teacher(run / "teacher.pt", build_network(cfg), cfg, step=0)
    args.runs, args.unlabeled, args.truth = [run], cohort / "unlabeled", cohort / "unlabeled_labels"
    args.align_to = cohort / "labeled"


if __name__ == "__main__":
    raise SystemExit(main())
