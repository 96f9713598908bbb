"""Lesion benchmark: can a 0.1 % class be learned from few labels, and how much do unlabeled scans add?

On the lesion sample cohort (``medeman.sample_data`` with ``lesions=True``: liver, kidneys and 1-3
small liver lesions per scan, label 3) every method trains with ``configs/lesion.yaml`` (the base,
whose own method is FixMatch-EMAN with distribution alignment, class-weighted pseudo-labels and lesion copy-paste
into labeled and unlabeled patches) on the same step budget, over several seeds, and is scored on the same held-out
test cases. Rows without copy-paste layer ``lesion_no_paste.yaml`` under their own overlays:

    supervised_few   the few labeled scans only (``supervised.yaml``)                -- the baseline
    supervised_paste the few labeled scans, lesions of the batch pasted into half of its patches' livers:
                     what copy-paste gives without unlabeled scans                  -- the copy-paste baseline
    supervised_ema   the few labeled scans, an EMA teacher deployed (the weight-averaging control)
    mt_bn, mt_eman   + the unlabeled scans, mean teacher with a BN / EMAN teacher (``lesion_mean_teacher.yaml``)
    fixmatch         + the unlabeled scans, FixMatch-EMAN, 2 unlabeled patches a step (``fixmatch_unaligned.yaml``)
    fixmatch_da      + the teacher aligned to the labeled class frequencies
    fixmatch_da_cw   + each pseudo-label's cross-entropy weighted by its class's ``train.ce_class_weights``
                     (``fixmatch_class_weighted.yaml``)
    fixmatch_da_u4   fixmatch_da with 4 unlabeled patches a step (``lesion_unlabeled_batch4.yaml``)
    fixmatch_da_paste  fixmatch_da pasting labeled lesions into half of the unlabeled strong views' livers
                     (``fixmatch_lesion_paste.yaml``)
    fixmatch_da_paste_both  and into half of the labeled patches, unweighted pseudo-labels (``fixmatch_unweighted.yaml``)
    fixmatch_da_paste_both_cw  and class-weighted pseudo-labels: ``configs/lesion.yaml`` as it is (the default)
    bcp              + the unlabeled scans, bidirectional copy-paste on an EMAN teacher (``ablation_bcp.yaml``)
    supervised_all   every scan labeled (the labeled ones + the unlabeled ones with their ground truth)
                     -- the upper bound the unlabeled scans could reach at most
    supervised_all_paste  every scan labeled, pasting as supervised_paste   -- the copy-paste upper bound

Every run validates on the same ``val/`` cases (so model selection never sees the test cases) and
is scored through ``teacher.pt``, the network ``medeman train`` leaves for deployment, with
``medeman.evaluate``: the lesion class's voxel Dice per case (mean over cases), and its
lesion-wise detection (connected components, a lesion found at IoU >= 0.1; sensitivity,
precision and F1 of the counts pooled over the test cases) and lesion-wise Dice. Methods are
compared per seed (paired: the same seed gives the same initial network and data order), and the
share of the gap that the unlabeled scans close is ``(method - few) / (all - few)``; for the methods that paste
into their labeled patches also ``(method - supervised_paste) / (supervised_all_paste - supervised_paste)``.

    python benchmarks/lesion_benchmark.py --seeds 0 1 2 3 4 5 6 7 8 9     # the recorded study at 3000 steps (lesion.yaml's)
    python benchmarks/lesion_benchmark.py --seeds 0 1 2 3 4 5 6 7 8 9 --set train.max_steps=1000   # and at 1000
    python benchmarks/lesion_benchmark.py --seeds 0 1 2 3 4 5 6 7 8 9 --methods fixmatch_da --tag fixmatch \
        --grid ssl.fixmatch_threshold=0.7 --grid ssl.consistency_weight=1.0     # a recipe chosen on validation
    python benchmarks/lesion_benchmark.py --smoke                   # seconds: does it run end to end

Each ``--grid`` is a product of values; the method's own config is always a point, and a point that leaves it as it is
shares its runs (``<out>/<method>/seed<N>``, the table's); the others train under
``<out>/grid/<method>/<point>/seed<N>``. The grid report (``lesion_benchmark_grid_<tag>.md``) pairs each point with
the method's own config on the validation cases; the test cases are shown, never chosen on.

Runs go one at a time (``nice``, one torch thread is the caller's choice); a finished run
(``scores.json``) is reused with ``--reuse``; ``--report-only`` rewrites the table from finished runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _report import NOTES_MARKER, commit, grid_tag, hardware, mean_std, notes_below, parse_grid

REPO = Path(__file__).resolve().parents[1]
# method -> (overlays on the base config, labeled folder). configs/lesion.yaml's own method is FixMatch-EMAN with
# distribution alignment, class-weighted pseudo-labels at weight 1.0 and lesion copy-paste into the labeled patches and
# every unlabeled strong view (fixmatch_da_paste_both_cw_w1); the rows before it set weight 0.3 and half the views back
# (configs/fixmatch_weight03_paste05.yaml); every row trained without copy-paste sets it back (configs/lesion_no_paste.yaml,
# which also sets FixMatch's weight 0.3), the mean-teacher rows and the EMA control then set every ssl key lesion.yaml
# sets (configs/lesion_mean_teacher.yaml, over it).
NO_PASTE = "configs/lesion_no_paste.yaml"
BEFORE_W1 = "configs/fixmatch_weight03_paste05.yaml"
METHODS = {
    "supervised_few": (("configs/supervised.yaml", NO_PASTE), "labeled"),
    "supervised_paste": (("configs/supervised.yaml",), "labeled"),
    "supervised_ema": (
        (NO_PASTE, "configs/lesion_mean_teacher.yaml", "configs/ablation_supervised_ema.yaml"),
        "labeled",
    ),
    "mt_bn": ((NO_PASTE, "configs/lesion_mean_teacher.yaml", "configs/mt_bn.yaml"), "labeled"),
    "mt_eman": ((NO_PASTE, "configs/lesion_mean_teacher.yaml"), "labeled"),
    "fixmatch": ((NO_PASTE, "configs/fixmatch_unaligned.yaml"), "labeled"),
    "fixmatch_da": ((NO_PASTE,), "labeled"),
    "fixmatch_da_cw": ((NO_PASTE, "configs/fixmatch_class_weighted.yaml"), "labeled"),
    "fixmatch_da_u4": ((NO_PASTE, "configs/lesion_unlabeled_batch4.yaml"), "labeled"),
    "fixmatch_da_paste": ((NO_PASTE, "configs/fixmatch_lesion_paste.yaml"), "labeled"),
    "fixmatch_da_paste_both": ((BEFORE_W1, "configs/fixmatch_unweighted.yaml"), "labeled"),
    "fixmatch_da_paste_both_cw": ((BEFORE_W1,), "labeled"),
    "fixmatch_da_paste_both_cw_w1": ((), "labeled"),
    "bcp": ((NO_PASTE, "configs/lesion_mean_teacher.yaml", "configs/ablation_bcp.yaml"), "labeled"),
    "supervised_all": (("configs/supervised.yaml", NO_PASTE), "all_labeled"),
    "supervised_all_paste": (("configs/supervised.yaml",), "all_labeled"),
}
BASELINES = ("supervised_few", "supervised_all", "supervised_all_paste")
# the methods that paste lesions into their labeled patches are also measured against the supervised run that does
# the same (the copy-paste baseline), and their gap against the all-labeled run that does the same
PASTE_BASELINES = ("supervised_paste", "supervised_all_paste")
METHOD_PAIRS = (
    ("mt_eman", "mt_bn"),
    ("mt_eman", "supervised_ema"),
    ("fixmatch", "supervised_ema"),
    ("fixmatch", "mt_eman"),
    ("fixmatch_da", "fixmatch"),
    ("fixmatch_da_cw", "fixmatch_da"),
    ("fixmatch_da_u4", "fixmatch_da"),
    ("fixmatch_da_paste", "fixmatch_da"),
    ("fixmatch_da_paste_both", "supervised_paste"),
    ("fixmatch_da_paste_both", "fixmatch_da_paste"),
    ("fixmatch_da_paste_both_cw", "supervised_paste"),
    ("fixmatch_da_paste_both_cw", "fixmatch_da_paste_both"),
    ("fixmatch_da_paste_both_cw_w1", "supervised_paste"),
    ("fixmatch_da_paste_both_cw_w1", "fixmatch_da_paste_both_cw"),
)
LESION = 3
CHOICE_SEEDS_AHEAD = 0.8  # a grid point replaces the method's own config only if ahead on validation in 8 of 10 seeds
COHORT = {"n_labeled": 3, "n_val": 6, "n_unlabeled": 24, "n_test": 8, "n_test_extra": 40}  # 48 test cases: with 8 the
# per-seed spread of paired differences was all network x case interaction (lesion_benchmark_op_3000_t48.md)
SMOKE_COHORT = {"n_labeled": 1, "n_val": 1, "n_unlabeled": 2, "n_test": 1}
SMOKE_SETS = [
    "train.max_steps=4",
    "train.val_every_steps=2",
    "model.channels=[4,8]",
    "model.num_res_units=0",
    "data.cache=none",
    "data.num_workers=0",
    "ssl.recalibration_batches=1",
]
CSV_COLUMNS = (
    "method",
    "seed",
    "lesion_dice",
    "lesion_f1",
    "lesion_sensitivity",
    "lesion_precision",
    "lesionwise_dice",
    "reference_lesions",
    "detected",
    "predicted",
    "false_positives",
    "dice_liver",
    "dice_kidneys",
    "val_best_teacher",
    "steps",
    "train_s",
    "commit",
    "run_dir",
)


def make_lesion_cohort(root: Path, counts: dict) -> Path:
    """Write the lesion cohort (once) and ``all_labeled/``: the labeled scans plus the unlabeled ones with their truth.

    ``all_labeled`` holds symbolic links, so the upper bound trains on exactly the scans the
    others see; its validation cases are the shared ``val/`` folder. A cohort written with fewer validation or extra
    test cases than ``counts`` gets the missing ones (:func:`_grow_cohort`).
    """
    from medeman.sample_data import make_cohort

    if not (root / "test" / "labels").is_dir():
        make_cohort(root, seed=11, other_formats=False, unlabeled_labels=True, lesions=True, **counts)
    else:
        _grow_cohort(root, counts)
    everything = root / "all_labeled"
    if not everything.is_dir():
        for sub in ("images", "labels"):
            (everything / sub).mkdir(parents=True)
        for scan in sorted((root / "labeled" / "images").iterdir()):
            (everything / "images" / scan.name).symlink_to(scan.resolve())
            (everything / "labels" / scan.name).symlink_to((root / "labeled" / "labels" / scan.name).resolve())
        for scan in sorted((root / "unlabeled").iterdir()):
            (everything / "images" / scan.name).symlink_to(scan.resolve())
            (everything / "labels" / scan.name).symlink_to((root / "unlabeled_labels" / scan.name).resolve())
    return root


def _grow_cohort(root: Path, counts: dict) -> None:
    """Add the validation and test cases ``counts`` asks for and ``root`` lacks, changing no case it holds.

    ``make_cohort`` renders the validation cases after every training and test case, and the extra test cases
    (``n_test_extra``) after those: the missing ones are the last cases of a cohort of the asked size. The validation
    set cannot grow once extra test cases exist (they would no longer be the cases that follow it).
    """
    from medeman.sample_data import make_cohort

    want = {"val": counts["n_val"], "test": counts["n_test"] + counts.get("n_test_extra", 0)}
    if _count(root / "test" / "labels") > want["test"]:
        raise SystemExit(
            f"{root}: holds {_count(root / 'test' / 'labels')} test cases, {want['test']} asked for "
            f"(--test-extra {counts.get('n_test_extra', 0)}): use the cohort folder of that test set"
        )
    missing = [part for part, n in want.items() if _count(root / part / "labels") < n]
    if not missing:
        return
    if "val" in missing and _count(root / "test" / "labels") > counts["n_test"]:
        raise SystemExit(
            f"{root}: the validation set cannot grow to {counts['n_val']} cases once it has extra test cases "
            "(they are rendered after it); write the cohort anew in another folder"
        )
    with tempfile.TemporaryDirectory(prefix="lesion_grow_") as tmp:
        full = make_cohort(Path(tmp), seed=11, other_formats=False, unlabeled_labels=True, lesions=True, **counts)
        for part in missing:
            for sub in ("images", "labels"):
                for scan in sorted((full / part / sub).iterdir()):
                    if not (root / part / sub / scan.name).exists():
                        shutil.copy2(scan, root / part / sub / scan.name)


def score_teacher(run_dir: Path, data: Path, lesion_overlap: float, part: str = "test") -> dict[str, float]:
    """Segment ``<data>/<part>/images`` with the run's ``teacher.pt``; lesion and organ figures of those cases.

    ``part`` "val": the final-step teacher on the validation cases, the figures methods are chosen on
    (training never depends on validation, so scoring it afterwards on more cases changes nothing else).
    """
    from medeman.score_run import segment_and_score

    _, summary = segment_and_score(
        run_dir,
        data / part / "images",
        data / part / "labels",
        run_dir / f"pred_{part}",
        csv=run_dir / f"{part}_scores.csv",
        lesion_overlap=lesion_overlap,
        lesion_classes=[LESION],
        overwrite=True,
        progress=False,
        device="cpu",
    )
    if summary.problems:
        raise RuntimeError(f"{run_dir}: {len(summary.problems)} {part} case(s) not scored: {summary.problems[0]}")
    dice = summary.per_class()
    lesions = summary.lesion_totals().get(LESION)
    if lesions is None:  # neither reference nor prediction has the class: cannot happen on this cohort
        raise RuntimeError(f"{data}/{part}: no lesion class in any case")

    def class_dice(label: int) -> float:
        return dice[label]["dice_mean"] if label in dice else float("nan")

    return {
        "lesion_dice": class_dice(LESION),
        "lesion_f1": lesions["f1"],
        "lesion_sensitivity": lesions["sensitivity"],
        "lesion_precision": lesions["precision"],
        "lesionwise_dice": lesions["dice_mean"],
        "reference_lesions": lesions["reference"],
        "detected": lesions["detected"],
        "predicted": lesions["predicted"],
        "false_positives": lesions["false_positive"],
        "dice_liver": class_dice(1),
        "dice_kidneys": class_dice(2),
    }


def what_trains(cfg: dict) -> dict:
    """``cfg`` without the ``ssl`` options of the methods it does not train with, and without the unlabeled batch
    size and the unsupervised loss's weight for a method that reads no unlabeled scans (a supervised run is the same
    run whatever ``ssl.fixmatch_*``, ``ssl.consistency_weight`` or ``data.batch_size_unlabeled`` say): what decides
    whether a finished run can be reused."""
    from medeman.methods import METHODS, build_method

    trained = METHODS[cfg["ssl"]["method"]].__mro__  # FixMatch reads the mean teacher's options too
    unused = {key for cls in METHODS.values() if cls not in trained for key in vars(cls).get("options", {})}
    data = dict(cfg["data"])
    if not build_method(cfg).uses_unlabeled:
        data.pop("batch_size_unlabeled")
        unused.add("consistency_weight")  # weighs the loss of the unlabeled scans only
    return {**cfg, "data": data, "ssl": {k: v for k, v in cfg["ssl"].items() if k not in unused}}


def run_config(method: str, seed: int, args: argparse.Namespace, sets: tuple[str, ...] = ()) -> tuple[dict, Path]:
    """The config one (method, seed, grid point) run trains with, and its folder (rules in :func:`run_one`)."""
    from medeman.config import load_config

    overlays = METHODS[method][0]
    sources = [args.config, *(REPO / o for o in overlays)]
    cfg = load_config(sources, [*args.set, *sets, f"train.seed={seed}"])
    run_dir = Path(args.out) / method / f"seed{seed}"
    if sets and cfg != load_config(sources, [*args.set, f"train.seed={seed}"]):
        run_dir = Path(args.out) / "grid" / method / grid_tag(list(sets)) / f"seed{seed}"
    return cfg, run_dir


def run_one(method: str, seed: int, args: argparse.Namespace, sets: tuple[str, ...] = ()) -> dict:
    """Train one (method, seed) run unless ``--reuse`` finds it scored, then score its teacher on the test cases.

    ``sets`` are a grid point's overrides; a point that leaves the method's config as it is shares the method's
    own run (``<out>/<method>/seed<N>``), any other trains under ``<out>/grid/<method>/<grid_tag>/seed<N>``. A run is
    reused only if its saved ``config.yaml`` trains as the config it would be trained with now (:func:`what_trains`;
    a changed base config or overlay retrains it).
    """
    from medeman.config import load_config
    from medeman.methods import build_method
    from medeman.train import fit

    cfg, run_dir = run_config(method, seed, args, sets)
    labeled = METHODS[method][1]
    done, trained = run_dir / "scores.json", run_dir / "train.json"
    saved = run_dir / "config.yaml"
    same_config = saved.is_file() and what_trains(load_config([saved])) == what_trains(cfg)
    if args.reuse and saved.is_file() and not same_config:
        print(f"{run_dir}: trained with another config than now, retraining it", flush=True)
    if args.relearn_postprocessing and same_config and trained.is_file() and (run_dir / "teacher.pt").is_file():
        from medeman.train import relearn_postprocessing

        relearn_postprocessing(run_dir, args.data / labeled, args.data / "val")
        done.unlink(missing_ok=True)  # scored again below, through the new rules
    if args.reuse and same_config and done.is_file():
        record = json.loads(done.read_text())
        # the folder may have moved (or been copied from a grid point to the row it became); the point asked for
        record.update(method=method, run_dir=str(run_dir), sets=" ".join(sets))
        if _score_new_cases(record, run_dir, args):  # scored before the validation or test set grew
            done.write_text(json.dumps(record, indent=1))
        return record
    if args.reuse and same_config and trained.is_file() and (run_dir / "teacher.pt").is_file():
        record = json.loads(trained.read_text())
    else:
        start = time.perf_counter()
        unlabeled = args.data / "unlabeled" if build_method(cfg).uses_unlabeled else None
        result = fit(
            cfg,
            args.data / labeled,
            unlabeled,
            val=args.data / "val",
            out_dir=run_dir,
            progress_bar=False,
            logger=not args.smoke,
            overwrite=True,
        )
        record = {
            "method": method,
            "seed": seed,
            "steps": result.steps,
            "train_s": round(time.perf_counter() - start, 1),
            "val_best_teacher": result.last_dice_teacher,
            "commit": args.commit,
        }
    record.update(method=method, run_dir=str(run_dir), sets=" ".join(sets))
    trained.write_text(json.dumps(record, indent=1))
    record["scores"] = score_teacher(run_dir, args.data, args.lesion_overlap)
    _score_new_cases(record, run_dir, args)
    done.write_text(json.dumps(record, indent=1))
    return record


def _score_new_cases(record: dict, run_dir: Path, args: argparse.Namespace) -> bool:
    """Score the run's teacher again on each part (test, validation) whose cases are not the ones its
    ``<part>_scores.csv`` holds (the part grew, :func:`_grow_cohort`); True if anything was scored.

    Training never depends on validation or test cases, so scoring more of them changes nothing else.
    """
    from medeman.data.readers import image_stem  # the case name medeman evaluate writes

    scored = False
    for part, key in (("test", "scores"), ("val", "val_scores")):
        cases = {image_stem(p) for p in (args.data / part / "labels").iterdir()}
        if key in record and _scored_cases(run_dir / f"{part}_scores.csv") == cases:
            continue
        record[key] = score_teacher(run_dir, args.data, args.lesion_overlap, part)
        record[f"{part}_cases"] = len(cases)
        scored = True
    return scored


def _scored_cases(csv_path: Path) -> set[str]:
    """The cases a ``*_scores.csv`` written by :func:`score_teacher` holds (none if it is missing)."""
    if not csv_path.is_file():
        return set()
    with open(csv_path, newline="", encoding="utf-8") as handle:
        return {row["case"] for row in csv.DictReader(handle)}


def paired(records: list[dict], method: str, base: str, key: str) -> list[float]:
    """Per-seed differences ``method - base`` of one score, over the seeds both finished."""
    by = {(r["method"], r["seed"]): r["scores"][key] for r in records}
    return [
        by[method, s] - by[base, s]
        for s in sorted({r["seed"] for r in records})
        if (method, s) in by and (base, s) in by
    ]


def gap_closed(
    records: list[dict],
    key: str,
    method: str = "mt_eman",
    baselines: tuple[str, str] = ("supervised_few", "supervised_all"),
) -> tuple[str, list[float]]:
    """Share of the few -> all gap (``baselines``) ``method`` closes: from the seed means, and per seed."""
    few, all_ = baselines
    ssl, full = paired(records, method, few, key), paired(records, all_, few, key)
    per_seed = [a / b for a, b in zip(ssl, full) if abs(b) > 1e-9]
    if not ssl or not full or statistics.fmean(full) <= 1e-9:
        return "n/a (all labels do not beat few)", per_seed
    return f"{100 * statistics.fmean(ssl) / statistics.fmean(full):.0f} %", per_seed


def write_results(records: list[dict], args: argparse.Namespace, wall_s: float, command: str) -> Path:
    """The CSV of every run and the markdown report (table, paired differences, set-up)."""
    from medeman.config import load_config

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "lesion_benchmark" + (f"_{args.tag}" if args.tag else "")
    csv_path, md_path = results / f"{stem}.csv", results / f"{stem}.md"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in records:
            row = {k: r.get(k, "") for k in CSV_COLUMNS}
            row.update({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r["scores"].items()})
            row["val_best_teacher"] = f"{r['val_best_teacher']:.4f}"
            writer.writerow(row)

    cfg = (
        load_config([Path(records[0]["run_dir"]) / "config.yaml"]) if records else load_config([args.config], args.set)
    )
    train, data, model = cfg["train"], cfg["data"], cfg["model"]
    keys = [
        ("lesion_dice", "lesion Dice"),
        ("lesion_f1", "lesion F1"),
        ("lesion_sensitivity", "sensitivity"),
        ("lesion_precision", "precision"),
        ("lesionwise_dice", "lesion-wise Dice"),
        ("dice_liver", "liver Dice"),
        ("dice_kidneys", "kidney Dice"),
    ]
    lines = [
        "# Lesion benchmark: supervised on few vs semi-supervised vs supervised on all",
        "",
        f"Test scores of each run's `teacher.pt` on `{args.data}/test` ({_count(args.data / 'test' / 'labels')} cases), "
        "mean ± std over seeds. Lesion = class 3 (1-3 small liver lesions per scan, about 0.1 % of the volume). "
        "*lesion Dice*: voxel Dice of class 3 per case, averaged over cases; *lesion F1, sensitivity, precision*: "
        f"connected components, a lesion found at IoU >= {args.lesion_overlap:g}, counts pooled over the test cases; "
        "*lesion-wise Dice*: BraTS 2023 (per reference lesion, 0 for each false-positive component). "
        f"*val*: the same teacher on the {_count(args.data / 'val' / 'labels')} validation cases, the mean of the three "
        "classes' Dice and the lesion's: the only figures a recipe is chosen on.",
        "",
        "| method | seeds | " + " | ".join(name for _, name in keys) + " | val Dice | val lesion Dice | train s |",
        "|---|---|" + "---|" * (len(keys) + 3),
    ]
    for method in METHODS:
        runs = [r for r in records if r["method"] == method]
        if not runs:
            continue
        cols = [mean_std([r["scores"][k] for r in runs]) for k, _ in keys]
        lines.append(
            f"| {method} | {len(runs)} | {' | '.join(cols)} | {mean_std([_val_dice(r) for r in runs])} | "
            f"{mean_std([r['val_scores']['lesion_dice'] for r in runs])} | "
            f"{statistics.fmean(r['train_s'] for r in runs):.0f} |"
        )
    against_few = [
        (key, name, method)
        for key, name in keys[:2] + keys[4:]
        for method in METHODS
        if method not in BASELINES and paired(records, method, "supervised_few", key)
    ]
    if against_few:  # a study without supervised_few (e.g. the copy-paste rows alone) has no such table
        lines += [
            "",
            "Paired per-seed differences (same seed: same initial network and data order), mean ± std over seeds, "
            "and the share of the few -> all gap each method closes (from the seed means; per seed in brackets):",
            "",
            "| score | method | method - few | seeds ahead | all - few | gap closed |",
            "|---|---|---|---|---|---|",
        ]
    for key, name, method in against_few:
        diffs = paired(records, method, "supervised_few", key)
        share, per_seed = gap_closed(records, key, method)
        lines.append(
            f"| {name} | {method} | {mean_std(diffs)} | {sum(d > 0 for d in diffs)}/{len(diffs)} | "
            f"{mean_std(paired(records, 'supervised_all', 'supervised_few', key))} | {share} "
            f"({', '.join(f'{100 * v:.0f} %' for v in per_seed) or '–'}) |"
        )
    configs = _method_configs(records)
    pasting = [m for m, c in configs.items() if c["data"]["labeled_lesion_paste"] > 0 and m not in PASTE_BASELINES]
    against_paste = [
        (key, name, m)
        for key, name in keys[:1] + keys[4:]
        for m in pasting
        if paired(records, m, PASTE_BASELINES[0], key)
    ]
    if against_paste:
        few, all_ = PASTE_BASELINES
        lines += [
            "",
            f"Against the copy-paste baseline: the methods that paste lesions into their labeled patches, paired with "
            f"`{few}` (the few labeled scans, pasting the same way), and the gap to `{all_}` (every scan labeled, "
            "pasting the same way):",
            "",
            f"| score | method | method - {few} | seeds ahead | {all_} - {few} | gap closed |",
            "|---|---|---|---|---|---|",
        ]
        for key, name, method in against_paste:
            diffs = paired(records, method, few, key)
            share, per_seed = gap_closed(records, key, method, PASTE_BASELINES)
            lines.append(
                f"| {name} | {method} | {mean_std(diffs)} | {sum(d > 0 for d in diffs)}/{len(diffs)} | "
                f"{mean_std(paired(records, all_, few, key)) if paired(records, all_, few, key) else '–'} | {share} "
                f"({', '.join(f'{100 * v:.0f} %' for v in per_seed) or '–'}) |"
            )
    between = [
        (a, b, key, name) for a, b in METHOD_PAIRS for key, name in (keys[0], keys[6]) if paired(records, a, b, key)
    ]
    if between:
        lines += [
            "",
            "Between methods (per seed, then mean and seeds where the first is ahead): the EMA control separates what "
            "the weight average gives from what the unlabeled scans give; BN vs EMAN teacher.",
            "",
            "| a − b | score | per seed | mean | ahead |",
            "|---|---|---|---|---|",
        ]
        for a, b, key, name in between:
            diffs = paired(records, a, b, key)
            lines.append(
                f"| {a} − {b} | {name} | {', '.join(f'{d:+.3f}' for d in diffs)} | {statistics.fmean(diffs):+.3f} | "
                f"{sum(d > 0 for d in diffs)}/{len(diffs)} |"
            )
    commits = sorted({r.get("commit", "?") for r in records})
    lines += [
        "",
        f"- Command: `{command}`; code at commit(s) {', '.join(commits)} when the process that trained them started "
        "(`+dirty`: the shared tree also held uncommitted edits of others).",
        f"- Cohort: `medeman.sample_data.make_cohort(seed=11, lesions=True)`: {_count(args.data / 'labeled' / 'labels')} labeled "
        f"training scans, {_count(args.data / 'val' / 'labels')} validation scans (the final-step teacher scored on them after training), "
        f"{_count(args.data / 'unlabeled')} unlabeled scans (their ground truth only for `supervised_all`), "
        f"{_count(args.data / 'test' / 'labels')} test scans.",
        f"- Budget (every run, `{args.config}` from the runs' `config.yaml`): {train['max_steps']} steps, lr {train['lr']}, "
        f"batch {data['batch_size_labeled']} labeled patches (and the unlabeled ones each recipe below names) of "
        f"{data['patch_size']} at {data['spacing']} mm, {model['name']} {model['channels']}; batch Dice {train['batch_dice']}; "
        f"labeled patches: {_sampling(data)}"
        + "".join(f"; {method}: {_ssl_recipe(cfg)}" for method, cfg in _method_configs(records).items())
        + (f"; overrides {' '.join(args.set)}" if args.set else "")
        + ".",
        f"- Seeds: {' '.join(str(s) for s in sorted({r['seed'] for r in records}))} (`train.seed`).",
        f"- Hardware: {hardware()}; one run at a time per process. Training wall time {sum(r['train_s'] for r in records) / 60:.1f} min "
        f"over {len(records)} runs; this invocation {wall_s / 60:.1f} min (runs it did not reuse, with test inference).",
        f"- Every run: `{csv_path.name}`.",
    ]
    write_keeping_notes(md_path, lines)
    return md_path


def write_keeping_notes(md_path: Path, lines: list[str]) -> None:
    """Write the generated ``lines``; hand-written findings below :data:`NOTES_MARKER` survive a rerun."""
    md_path.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + (notes_below(md_path) or "\n"), encoding="utf-8")


def run_grid(args: argparse.Namespace, command: str) -> Path | None:
    """The method's own config and every combination of each ``--grid``, for every method and seed; the report says
    which validates best."""
    combos = list(dict.fromkeys([(), *(tuple(sets) for spec in args.grid for sets in parse_grid(spec))]))
    records, md = [], None
    for seed in args.seeds:
        for method in args.methods:
            for sets in combos:
                if args.report_only and not (run_config(method, seed, args, sets)[1] / "scores.json").is_file():
                    continue
                args.reuse = args.reuse or args.report_only
                try:
                    record = run_one(method, seed, args, sets)
                except Exception as err:  # as in the table: one failed run must not cost the others
                    print(
                        f"grid {method} {' '.join(sets)} seed {seed}: FAILED: {type(err).__name__}: {err}", flush=True
                    )
                    if args.smoke:
                        raise
                    continue
                records.append(record)
                print(
                    f"grid {method} {' '.join(sets)} seed {seed}: val Dice {_val_dice(record):.3f}, val lesion "
                    f"{record['val_scores']['lesion_dice']:.3f} (test lesion {record['scores']['lesion_dice']:.3f}, not used)",
                    flush=True,
                )
                md = write_grid_results(records, args, command)
    return md


def write_grid_results(records: list[dict], args: argparse.Namespace, command: str) -> Path:
    """``lesion_benchmark_grid[_tag].{md,csv}``: each grid point's validation figures, paired with the method's own config."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "lesion_benchmark_grid" + (f"_{args.tag}" if args.tag else "")
    columns = ("method", "sets", "seed", "val_dice", "val_lesion_dice", "lesion_dice", "train_s", "run_dir")
    with open(results / f"{stem}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for r in records:
            writer.writerow(
                {
                    **{k: r[k] for k in ("method", "sets", "seed", "train_s", "run_dir")},
                    "val_dice": f"{_val_dice(r):.4f}",
                    "val_lesion_dice": f"{r['val_scores']['lesion_dice']:.4f}",
                    "lesion_dice": f"{r['scores']['lesion_dice']:.4f}",
                }
            )
    lines = [
        "# Lesion recipe: grid points chosen on validation",
        "",
        f"Each method trained at every grid point and seed; the final-step teacher scored on the "
        f"{_count(args.data / 'val' / 'labels')} validation cases (*val Dice*: the mean of the liver, kidney and lesion "
        "Dice; *val lesion*: the lesion's). *vs own*: paired per seed against the method's own config (the point that "
        "changes nothing, marked *own*), with the seeds ahead. Chosen: the best mean val Dice among the own config and "
        f"the points ahead of it on val Dice in at least {CHOICE_SEEDS_AHEAD:.0%} of the seeds (a point that only wins on "
        "the mean, by seed noise, does not replace the recipe). The test column is there for the record: it played no "
        "part in the choice.",
        "",
        "| method | setting | seeds | val Dice | val lesion Dice | val Dice vs own (ahead) | val lesion vs own (ahead) "
        "| test lesion Dice (not used) | train s | chosen |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        own = {r["seed"]: r for r in mine if Path(r["run_dir"]).parent == Path(args.out) / method}
        by_set = {s: [r for r in mine if r["sets"] == s] for s in dict.fromkeys(r["sets"] for r in mine)}

        def is_own(runs: list[dict]) -> bool:
            return all(r["seed"] in own and r["run_dir"] == own[r["seed"]]["run_dir"] for r in runs)

        def eligible(runs: list[dict]) -> bool:
            diffs = [_val_dice(r) - _val_dice(own[r["seed"]]) for r in runs if r["seed"] in own]
            return (
                not own
                or is_own(runs)
                or (bool(diffs) and sum(d > 0 for d in diffs) >= CHOICE_SEEDS_AHEAD * len(diffs))
            )

        best = max(
            (s for s in by_set if eligible(by_set[s])),
            key=lambda s: statistics.fmean(_val_dice(r) for r in by_set[s]),
            default=None,
        )
        for sets, runs in by_set.items():
            paired_cols = []
            for score in (_val_dice, lambda r: r["val_scores"]["lesion_dice"]):
                diffs = [score(r) - score(own[r["seed"]]) for r in runs if r["seed"] in own]
                paired_cols.append(
                    "own"
                    if is_own(runs)
                    else (
                        f"{statistics.fmean(diffs):+.3f} ({sum(d > 0 for d in diffs)}/{len(diffs)})" if diffs else "–"
                    )
                )
            lines.append(
                f"| {method} | `{sets or 'as configured'}` | {len(runs)} | {mean_std([_val_dice(r) for r in runs])} | "
                f"{mean_std([r['val_scores']['lesion_dice'] for r in runs])} | {' | '.join(paired_cols)} | "
                f"{mean_std([r['scores']['lesion_dice'] for r in runs])} | {statistics.fmean(r['train_s'] for r in runs):.0f} | "
                f"{'**yes**' if sets == best else ''} |"
            )
    lines += [
        "",
        f"- Command: `{command}`; code at commit(s) {', '.join(sorted({r.get('commit', '?') for r in records}))}.",
        f"- Base config `{args.config}`"
        + (f", overrides {' '.join(args.set)}" if args.set else "")
        + f"; seeds {' '.join(str(s) for s in sorted({r['seed'] for r in records}))}; hardware: {hardware()}.",
    ]
    md_path = results / f"{stem}.md"
    write_keeping_notes(md_path, lines)
    return md_path


def _sampling(data: dict) -> str:
    if "class_ratios" not in data:
        return f"RandCropByPosNegLabeld, pos_fraction {data.get('pos_fraction')}"
    if data["class_ratios"]:
        return f"class ratios {data['class_ratios']}"
    return f"nnU-Net rule, {data.get('fg_class_fraction')} centred on a present foreground class"


def _val_dice(record: dict) -> float:
    """The final-step teacher's validation Dice: the mean of liver, kidney and lesion Dice over the validation cases."""
    val = record["val_scores"]
    return statistics.fmean([val["dice_liver"], val["dice_kidneys"], val["lesion_dice"]])


def _method_configs(records: list[dict]) -> dict[str, dict]:
    """The config of each semi-supervised method's first run, from its ``config.yaml``."""
    from medeman.config import load_config

    first = {}
    for r in records:
        if r["method"] not in BASELINES and r["method"] not in first:
            first[r["method"]] = load_config([Path(r["run_dir"]) / "config.yaml"])
    return first


def _ssl_recipe(cfg: dict) -> str:
    """One method's teacher, unlabeled batch and unsupervised losses, in words."""
    ssl = cfg["ssl"]
    pasted = f"lesions pasted into {cfg['data']['labeled_lesion_paste']} of the labeled patches"
    if ssl["method"] == "supervised":
        return f"supervised, {pasted}" if cfg["data"]["labeled_lesion_paste"] > 0 else "supervised"
    pasted = f"{pasted}, " if cfg["data"]["labeled_lesion_paste"] > 0 else ""
    recipe = f"{pasted}{cfg['data']['batch_size_unlabeled']} unlabeled patches, {ssl['teacher_norm']} teacher, ema_momentum {ssl['ema_momentum']} ({ssl['momentum_schedule']}), warm-up {ssl['warmup_fraction']}"
    if ssl["method"] == "fixmatch":
        aligned = ", aligned to the labeled class frequencies" if ssl.get("fixmatch_distribution_alignment") else ""
        aligned += ", class-weighted as the labels" if ssl.get("fixmatch_class_weighted") else ""
        if ssl.get("fixmatch_paste_probability"):
            aligned += f", lesions pasted into {ssl['fixmatch_paste_probability']} of the strong views"
        return (
            f"{recipe}, hard pseudo-labels >= {ssl['fixmatch_threshold']}{aligned}, weight {ssl['consistency_weight']}"
        )
    if ssl["method"] == "supervised_ema":
        return recipe
    return (
        f"{recipe}, {ssl['consistency']} consistency weight {ssl['consistency_weight']}, pseudo-labels {_pseudo(ssl)}"
    )


def _pseudo(ssl: dict) -> str:
    if ssl.get("pseudo_label_threshold") is None:
        return "off"
    return f"{ssl.get('pseudo_label_threshold_mode', 'fixed')} threshold {ssl['pseudo_label_threshold']} weight {ssl['pseudo_label_weight']}"


def _count(folder: Path) -> int:
    """Image files in ``folder`` (any format medeman reads; 0 where the folder is absent)."""
    from medeman.data.readers import image_suffix

    return sum(1 for p in Path(folder).iterdir() if image_suffix(p)) if Path(folder).is_dir() else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path("runs/lesion_data"), help="the lesion cohort (written here if absent)"
    )
    parser.add_argument(
        "--config", type=Path, default=REPO / "configs" / "lesion.yaml", help="base config shared by every method"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument(
        "--lesion-overlap", type=float, default=0.1, help="IoU a lesion needs to count as detected (0: any overlap)"
    )
    parser.add_argument(
        "--test-extra",
        type=int,
        default=COHORT["n_test_extra"],
        help=f"test cases beyond the first {COHORT['n_test']} (default {COHORT['n_test_extra']}; 0: the 8-case test set of "
        "the tables before lesion_benchmark_op_3000_t48.md). A cohort folder with fewer gets them added, and reused "
        "runs are scored again on the grown set",
    )
    parser.add_argument("--out", default="runs/lesion_benchmark", help="run folders: <out>/<method>/seed<N>")
    parser.add_argument(
        "--results", default=str(REPO / "benchmarks" / "results"), help="where lesion_benchmark.md/.csv go"
    )
    parser.add_argument(
        "--tag", default="", help="suffix of the result files (lesion_benchmark_<tag>.md) for side studies"
    )
    parser.add_argument(
        "--relearn-postprocessing",
        action="store_true",
        help="with --reuse: learn each finished run's post-processing (class scales, component rules) again on the "
        "validation cases with this version's rules, then score it again (run a copy of --out to keep the old scores)",
    )
    parser.add_argument(
        "--grid",
        nargs="+",
        action="append",
        default=None,
        metavar="KEY=V1,V2",
        help="validation grid instead of the table: every combination, beside the method's own config, for each of "
        "--methods and --seeds (lesion_benchmark_grid[_<tag>].md); repeat --grid for points that are not one product",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--reuse", action="store_true", help="reuse scored runs (scores.json) instead of retraining")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from scored runs")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny cohort, 4 steps, one seed, results in a temporary folder"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python benchmarks/lesion_benchmark.py " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"
    )
    torch.set_num_threads(args.threads)
    args.commit = commit()  # the code this process runs: modules are imported once, at its start
    scratch = None
    if args.smoke:  # everything under a temporary folder: the recorded results are never touched
        scratch = tempfile.TemporaryDirectory(prefix="lesion_smoke_")
        root = Path(scratch.name)
        args.data, args.out, args.results = root / "data", str(root / "runs"), str(root / "results")
        args.seeds, args.set = args.seeds[:1], [*SMOKE_SETS, *args.set]
    make_lesion_cohort(args.data, SMOKE_COHORT if args.smoke else {**COHORT, "n_test_extra": args.test_extra})
    if args.grid and not args.smoke:
        md = run_grid(args, command)
        if md is not None:
            print(md.read_text())
        return 0 if md is not None else 1
    start = time.perf_counter()
    records = []
    for seed in args.seeds:  # seed-major: a cut-short study still has every method at the seeds it reached
        for method in args.methods:
            if args.report_only and not (Path(args.out) / method / f"seed{seed}" / "scores.json").is_file():
                continue
            args.reuse = args.reuse or args.report_only
            t0 = time.perf_counter()
            try:
                record = run_one(method, seed, args)
            except Exception as err:  # one failed run must not cost the others; rerun with --reuse
                print(f"{method} seed {seed}: FAILED: {type(err).__name__}: {err}", flush=True)
                if args.smoke:
                    raise
                continue
            records.append(record)
            s = record["scores"]
            print(
                f"{method} seed {seed}: lesion Dice {s['lesion_dice']:.3f}, lesion F1 {s['lesion_f1']:.3f} "
                f"({s['detected']}/{s['reference_lesions']} found, {s['false_positives']} FP), liver {s['dice_liver']:.3f}, "
                f"kidneys {s['dice_kidneys']:.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            md = write_results(records, args, time.perf_counter() - start, command)
    if records:
        print(md.read_text())
    if args.smoke:  # and a two-point grid: the point that changes nothing reuses the table's run
        grid = argparse.Namespace(**{**vars(args), "methods": ["fixmatch_da"], "reuse": True})
        grid.grid = args.grid or [["ssl.fixmatch_threshold=0.7"]]
        print(run_grid(grid, command).read_text())
    if scratch is not None:
        scratch.cleanup()
    return 0 if records else 1


if __name__ == "__main__":
    raise SystemExit(main())
