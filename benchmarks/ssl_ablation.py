"""Ablation: do the unlabeled scans help? Supervised, an EMA-of-weights control, mean teachers, and the upper bound.

Cohort (generated once by :func:`medeman.sample_data.make_cohort`, which knows the ground truth of
its unlabeled scans): ``--labeled`` training cases with labels, ``--val`` validation cases (every
hyper-parameter is chosen on them), ``--unlabeled`` scans and ``--test`` held-out cases. The rows:

    supervised      the labeled cases only                                  configs/ablation_supervised.yaml
    supervised_ema  labeled only, deployed EMA-of-weights teacher (the      configs/ablation_supervised_ema.yaml
                    control: weight averaging without unlabeled data)
    mt_bn           mean teacher, BN teacher (batch statistics, SSL4MIS)    configs/ablation_mt_bn.yaml
    mt_eman         mean teacher, EMAN teacher (Cai et al., CVPR 2021)      configs/ablation_mt_eman.yaml
    fixmatch        FixMatch-EMAN: hard pseudo-labels of the EMAN teacher's   configs/ablation_fixmatch.yaml
                    weak view above a confidence threshold on the strong view
    mt_eman_refresh EMAN teacher whose training statistics are re-estimated  configs/ablation_mt_eman_refresh.yaml
                    (precise-BN) every 50 steps: the early-lag diagnostic
    ua_mt, bcp      UA-MT (Yu et al. 2019), bidirectional copy-paste        configs/ablation_ua_mt.yaml, ablation_bcp.yaml
                    (Bai et al. 2023), both on an EMAN teacher
    upper           supervised on ALL labels: the labeled cases plus the    configs/ablation_supervised.yaml
                    unlabeled scans with their true labels

Every run shares the base config (``--config``, the budget: network, patches, steps) and the
validation cases; methods differ only by their overlay, seeds only by ``train.seed``. Each run is
scored on the test cases as two models: ``teacher``, the deployed ``teacher.pt`` (the final-step
teacher, ``train.deploy: last``: chosen by nothing; for supervised/upper the final student), and
``student``, the final student. The ``val`` column is the deployed model's last validation Dice. A case's score is
its mean foreground Dice; a run's the mean over test cases. The report gives mean ± std over seeds,
the fraction of the supervised→upper gap each method closes, ``(method - supervised) / (upper -
supervised)`` on the seed means, and paired per-seed differences with their mean and sign count.

Hyper-parameters are chosen on validation only: ``--grid KEY=V1,V2 ...`` trains every combination
for each method at the ``--seeds`` given (one seed is enough), ranks them by the deployed teacher's
final validation Dice, writes ``ssl_ablation_grid.{md,csv}`` and, with ``--write-chosen``, the winner
into ``configs/ablation_<method>.yaml``. A main-table run whose config and data equal a grid run's
reuses it. Runs go one at a time (``--threads`` torch threads); ``--reuse`` continues an interrupted
ablation; two invocations with different ``--seeds`` and the same ``--out`` may run side by side,
then ``--report-only`` writes the table of everything finished.

    python benchmarks/ssl_ablation.py --grid ssl.consistency_weight=1,10 --methods mt_bn mt_eman --seeds 0 --write-chosen
    python benchmarks/ssl_ablation.py --seeds 0 1 2 3 4 --reuse
    python benchmarks/ssl_ablation.py --seeds 0 1 2 3 4 --report-only
    python benchmarks/ssl_ablation.py --smoke     # seconds: the whole script at tiny sizes, outputs in $OUT or a temp folder
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _report import NOTES_MARKER, code_version, grid_tag, hardware, mean_std, notes_below, parse_grid

REPO = Path(__file__).resolve().parents[1]
# name: (overlay config, uses the unlabeled scans, labeled training part of the cohort, one-line description)
METHODS = {
    "supervised": ("configs/ablation_supervised.yaml", False, "labeled", "supervised, labeled cases only"),
    "supervised_ema": (
        "configs/ablation_supervised_ema.yaml",
        False,
        "labeled",
        "supervised + EMA-of-weights teacher (control, no unlabeled data)",
    ),
    "mt_bn": ("configs/ablation_mt_bn.yaml", True, "labeled", "mean teacher, BN teacher"),
    "mt_eman": ("configs/ablation_mt_eman.yaml", True, "labeled", "mean teacher, EMAN teacher"),
    "fixmatch": (
        "configs/ablation_fixmatch.yaml",
        True,
        "labeled",
        "FixMatch-EMAN: hard thresholded pseudo-labels of the EMAN teacher",
    ),
    "fixmatch_da": (
        "configs/ablation_fixmatch_da.yaml",
        True,
        "labeled",
        "FixMatch-EMAN, the teacher aligned to the labeled class frequencies (distribution alignment)",
    ),
    "mt_eman_refresh": (
        "configs/ablation_mt_eman_refresh.yaml",
        True,
        "labeled",
        "mean teacher, EMAN teacher whose statistics are re-estimated every 50 steps",
    ),
    "mt_eman_focus": (
        "configs/ablation_mt_eman_focus.yaml",
        True,
        "labeled",
        "mean teacher, EMAN teacher, half the unlabeled crops centred on the teacher's kidneys",
    ),
    "mt_eman_focus_liver": (
        "configs/ablation_mt_eman_focus_liver.yaml",
        True,
        "labeled",
        "control of mt_eman_focus: the same sampler centred on the teacher's liver",
    ),
    "mt_eman_focus_placebo": (
        "configs/ablation_mt_eman_focus_placebo.yaml",
        True,
        "labeled",
        "placebo of mt_eman_focus: the focused sampler without a refresh (every crop random)",
    ),
    "mt_eman_focus_unused": (
        "configs/ablation_mt_eman_focus_unused.yaml",
        True,
        "labeled",
        "placebo of mt_eman_focus: the refresh runs, its centres are never used",
    ),
    "ua_mt": ("configs/ablation_ua_mt.yaml", True, "labeled", "UA-MT, EMAN teacher"),
    "bcp": ("configs/ablation_bcp.yaml", True, "labeled", "bidirectional copy-paste, EMAN teacher"),
    "upper": (
        "configs/ablation_supervised.yaml",
        False,
        "all",
        "upper bound: supervised on all labels (unlabeled scans with their true labels)",
    ),
}
DEFAULT_METHODS = ("supervised", "supervised_ema", "mt_bn", "mt_eman", "fixmatch", "bcp", "upper")
MODELS = ("teacher", "student")
# paired comparisons of the report: (a, b), a - b per seed
PAIRS = (
    ("fixmatch", "supervised"),
    ("fixmatch", "mt_eman"),
    ("fixmatch", "supervised_ema"),
    ("fixmatch_da", "supervised"),
    ("fixmatch_da", "fixmatch"),
    ("mt_eman", "mt_bn"),
    ("mt_eman", "supervised"),
    ("mt_bn", "supervised"),
    ("mt_eman", "supervised_ema"),
    ("mt_bn", "supervised_ema"),
    ("supervised_ema", "supervised"),
    ("ua_mt", "supervised"),
    ("bcp", "supervised"),
    ("ua_mt", "mt_eman"),
    ("bcp", "mt_eman"),
    ("mt_eman_focus", "supervised"),
    ("mt_eman_focus", "mt_eman"),
    ("mt_eman_focus", "supervised_ema"),
    ("mt_eman_focus", "mt_eman_focus_liver"),
    ("mt_eman_focus_liver", "mt_eman"),
    ("mt_eman_focus", "mt_eman_focus_placebo"),
    ("mt_eman_focus_placebo", "mt_eman"),
    ("mt_eman_focus_unused", "mt_eman_focus_placebo"),
)
CSV_COLUMNS = (
    "method",
    "seed",
    "model",
    "dice_fg",
    "dice_class1",
    "dice_class2",
    "val_teacher",
    "steps",
    "train_s",
    "score_s",
    "run_dir",
)


# ---- cohort -------------------------------------------------------------------------------------
def ensure_cohort(args: argparse.Namespace) -> Path:
    """Generate the cohort once (with the unlabeled scans' ground truth) and the ``all/`` labeled set of the upper bound."""
    from medeman.sample_data import make_cohort

    root = Path(args.cohort)
    spec = {
        "labeled": args.labeled,
        "val": args.val,
        "unlabeled": args.unlabeled,
        "test": args.test,
        "seed": args.cohort_seed,
    }
    stamp = root / "cohort.json"
    if stamp.is_file():
        found = json.loads(stamp.read_text())
        if found != spec:
            raise SystemExit(
                f"{root}: holds a cohort made with {found}, not {spec}; pass another --cohort or matching counts"
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise SystemExit(
            f"{root}: exists and is not an ablation cohort (no cohort.json); pass an empty or new --cohort"
        )
    # written aside and renamed, so that two ablation processes started together never read a half-written cohort
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    make_cohort(
        tmp,
        n_labeled=args.labeled,
        n_unlabeled=args.unlabeled,
        n_test=args.test,
        seed=args.cohort_seed,
        other_formats=False,
        n_val=args.val,
        unlabeled_labels=True,
    )
    # the upper bound's training set: the labeled cases plus the unlabeled scans with their true labels
    for src_images, src_labels in (
        (tmp / "labeled" / "images", tmp / "labeled" / "labels"),
        (tmp / "unlabeled", tmp / "unlabeled_labels"),
    ):
        for image in sorted(src_images.glob("*.nii.gz")):
            for src, part in ((image, "images"), (src_labels / image.name, "labels")):
                (tmp / "all" / part).mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, tmp / "all" / part / src.name)
    (tmp / "cohort.json").write_text(json.dumps(spec))
    if root.exists():
        root.rmdir()  # empty (checked above)
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: use its cohort
        shutil.rmtree(tmp)
        return ensure_cohort(args)
    return root


# ---- one run ------------------------------------------------------------------------------------
def _final_state_callback(path: Path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    class FinalState(Callback):
        """Saves the student's state_dict at the end of training (``final_state.pt``): the final student.

        ``checkpoints/last.ckpt`` is not that: Lightning writes ``last`` only together with a top-k checkpoint.
        """

        def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            state = {k: v.detach().cpu().clone() for k, v in module.student.state_dict().items()}
            torch.save({"global_step": trainer.global_step, "student": state}, str(path))

    return FinalState()


def final_student(run_dir: Path, cfg: dict) -> torch.nn.Module:
    from medeman.nets import build_network

    state = torch.load(str(run_dir / "final_state.pt"), map_location="cpu", weights_only=True)["student"]
    net = build_network(cfg)
    net.load_state_dict(state)
    return net.eval()


def score_model(model, cfg: dict, cohort: Path, pred_dir: Path) -> dict[str, float]:
    """Segment ``<cohort>/test/images`` and return the mean foreground Dice and per-class Dice over the test cases."""
    from medeman.score_run import segment_and_score

    _, summary = segment_and_score(
        (model, cfg),
        cohort / "test" / "images",
        cohort / "test" / "labels",
        pred_dir,
        overwrite=True,
        progress=False,
        device="cpu",
    )
    if summary.problems:
        raise RuntimeError(f"{pred_dir}: {len(summary.problems)} test case(s) not scored: {summary.problems[0]}")
    classes = range(1, int(cfg["data"]["num_classes"]))
    dice = {(s.case_id, s.label): s.dice for s in summary.scores}
    per_case = [statistics.fmean(dice[(case, c)] for c in classes) for case in summary.cases]
    out = {"dice_fg": statistics.fmean(per_case)}
    for c in classes:
        out[f"dice_class{c}"] = statistics.fmean(dice[(case, c)] for case in summary.cases)
    return out


def _config_key(cfg: dict, labeled: Path, unlabeled: Path | None) -> str:
    return json.dumps({"cfg": cfg, "labeled": str(labeled), "unlabeled": str(unlabeled)}, sort_keys=True, default=str)


def _equivalent_run(out: Path, key: str, exclude: Path) -> Path | None:
    """A finished run under ``out`` trained with the same config and data (a grid run reused by the main table)."""
    for record in sorted(out.rglob("train.json")):
        if record.parent == exclude or not (record.parent / "final_state.pt").is_file():
            continue
        try:
            if json.loads(record.read_text()).get("key") == key:
                return record.parent
        except (OSError, json.JSONDecodeError):
            continue
    return None


def run_one(method: str, seed: int, run_dir: Path, sets: list[str], args: argparse.Namespace, cohort: Path) -> dict:
    """Train one (method, seed, sets) run unless a finished one can be reused, then score its teacher and student."""
    from medeman.checkpoint import load_teacher
    from medeman.config import load_config
    from medeman.train import fit

    overlay, uses_unlabeled, part, _ = METHODS[method]
    cfg = load_config([args.config, REPO / overlay], [*args.set, *sets, f"train.seed={seed}"])
    labeled, unlabeled = cohort / part, (cohort / "unlabeled" if uses_unlabeled else None)
    key = _config_key(cfg, labeled, unlabeled)
    done, trained = run_dir / "scores.json", run_dir / "train.json"
    if args.reuse and done.is_file() and json.loads(done.read_text()).get("key") == key:
        return load_record(done)
    source = (
        run_dir
        if (
            args.reuse
            and trained.is_file()
            and (run_dir / "final_state.pt").is_file()
            and json.loads(trained.read_text()).get("key") == key
        )
        else None
    )
    source = source or _equivalent_run(Path(args.out), key, run_dir)
    if source is not None:  # trained earlier (scoring failed or was cut short), or the same run in the grid
        record = json.loads((source / "train.json").read_text())
    else:
        start = time.perf_counter()
        result = fit(
            cfg,
            labeled,
            unlabeled,
            cohort / "val",
            out_dir=run_dir,
            progress_bar=False,
            overwrite=True,
            callbacks=[_final_state_callback(run_dir / "final_state.pt")],
        )
        record = {
            "method": method,
            "seed": seed,
            "sets": sets,
            "key": key,
            "steps": result.steps,
            "train_s": round(time.perf_counter() - start, 1),
            "val_teacher": result.last_dice_teacher,
            "run_dir": str(run_dir),
            "code": code_version(),
            "models": {},
        }
        trained.write_text(json.dumps(record, indent=1))
        source = run_dir
    start = time.perf_counter()
    teacher, teacher_cfg, payload = load_teacher(source)
    record["teacher_stats"] = payload.get("extra", {}).get("teacher_bn_stats", "")
    record["curves"] = val_curves(source / "metrics.csv")
    models = {"teacher": teacher, "student": final_student(source, cfg)}
    with contextlib.redirect_stdout(io.StringIO()):  # one line per test case and model otherwise
        record["models"] = {
            name: score_model(net, cfg, cohort, run_dir / f"pred_{name}") for name, net in models.items()
        }
    record["score_s"] = round(time.perf_counter() - start, 1)
    record["run_dir"], record["trained_in"] = str(run_dir), str(source)
    run_dir.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(record, indent=1))
    return record


def load_record(path: Path) -> dict:
    """A run's ``scores.json`` (JSON turns the curves' integer steps into strings: turned back)."""
    record = json.loads(Path(path).read_text())
    record["curves"] = {
        net: {int(step): value for step, value in curve.items()} for net, curve in record.get("curves", {}).items()
    }
    return record


def val_curves(metrics: Path) -> dict[str, dict[int, float]]:
    """Validation Dice per step of each network the run validated (``val/dice_<name>`` columns of metrics.csv)."""
    curves: dict[str, dict[int, float]] = {}
    if not metrics.is_file():
        return curves
    with open(metrics, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for column, value in row.items():
                if column and column.startswith("val/dice_") and "_class" not in column and value not in ("", None):
                    curves.setdefault(column[len("val/dice_") :], {})[int(row["step"])] = float(value)
    return curves


# ---- report -------------------------------------------------------------------------------------
def _dice(records: list[dict], method: str, model: str) -> dict[int, float]:
    return {r["seed"]: r["models"][model]["dice_fg"] for r in records if r["method"] == method}


def paired(records: list[dict], a: str, b: str, model: str) -> tuple[list[tuple[int, float]], float, int] | None:
    """Per-seed differences a - b over the seeds both have, their mean and the count of seeds where a > b."""
    da, db = _dice(records, a, model), _dice(records, b, model)
    seeds = sorted(set(da) & set(db))
    if not seeds:
        return None
    diffs = [(s, da[s] - db[s]) for s in seeds]
    return diffs, statistics.fmean(d for _, d in diffs), sum(d > 0 for _, d in diffs)


def gap_closed(records: list[dict], method: str, model: str) -> float | None:
    """``(method - supervised) / (upper - supervised)`` on the seed means (supervised and upper: their deployed model)."""
    m, s, u = _dice(records, method, model), _dice(records, "supervised", "teacher"), _dice(records, "upper", "teacher")
    if not (m and s and u) or statistics.fmean(u.values()) == statistics.fmean(s.values()):
        return None
    return (statistics.fmean(m.values()) - statistics.fmean(s.values())) / (
        statistics.fmean(u.values()) - statistics.fmean(s.values())
    )


def write_results(records: list[dict], args: argparse.Namespace, cohort: Path, command: str) -> Path:
    """Write the CSV of every run and model, and the markdown report."""
    from medeman.config import load_config

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "ssl_ablation" + (f"_{args.tag}" if args.tag else "")
    csv_path, md_path = results / f"{stem}.csv", results / f"{stem}.md"
    _write_csv(csv_path, records)
    methods = [m for m in args.methods if any(r["method"] == m for r in records)]
    missing = [m for m in args.methods if m not in methods]
    seeds = sorted({r["seed"] for r in records})
    # the budget as the runs recorded it (the base config may have changed since they trained)
    saved = [Path(r.get(k, "")) / "config.yaml" for r in records for k in ("trained_in", "run_dir")]
    saved = [p for p in saved if p.is_file()]
    cfg = load_config(saved[:1]) if saved else load_config([args.config])
    lines = [
        "# Semi-supervised ablation: do the unlabeled scans help?",
        "",
        f"Test Dice (mean foreground Dice per case, averaged over the {_count(cohort / 'test' / 'labels')} test cases), mean ± std over "
        f"seeds {' '.join(map(str, seeds))}. **teacher** is the deployed `teacher.pt` (the final-step teacher, chosen by nothing; for supervised and upper the "
        "final student), **student** the final student. **gap closed** = (method − supervised) / (upper − supervised) on the seed means "
        "of the deployed models.",
        "",
        "| method | runs | teacher (deployed) | student (final) | gap closed (teacher) | gap closed (student) | val Dice (deployed) | train s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        gaps = [gap_closed(records, method, model) for model in MODELS]
        lines.append(
            f"| {method} | {len(runs)} | {mean_std([r['models']['teacher']['dice_fg'] for r in runs])} | "
            f"{mean_std([r['models']['student']['dice_fg'] for r in runs])} | "
            + " | ".join("–" if g is None else f"{100 * g:.0f} %" for g in gaps)
            + f" | {mean_std([r['val_teacher'] for r in runs])} | {statistics.fmean(r['train_s'] for r in runs):.0f} |"
        )
    lines += [
        "",
        "Paired per-seed differences (test Dice, a − b; wins = seeds where a > b):",
        "",
        "| a − b | model | per seed | mean | wins |",
        "|---|---|---|---|---|",
    ]
    for a, b in PAIRS:
        for model in MODELS:
            result = paired(records, a, b, model)
            if result is None:
                continue
            diffs, mean, wins = result
            per_seed = ", ".join(f"{d:+.3f}" for _, d in diffs)
            lines.append(f"| {a} − {b} | {model} | {per_seed} | {mean:+.3f} | {wins}/{len(diffs)} |")
    lines += _per_class_table(records, methods)
    lines += [
        "",
        "Validation Dice over training (mean over seeds; `teacher` is what is validated and exported, "
        "`teacher_raw` where present the EMAN teacher with its EMA'd statistics):",
        "",
    ]
    lines += _curve_table(records, methods)
    per_class = [
        f"{m}: class 1 {mean_std([r['models']['teacher']['dice_class1'] for r in records if r['method'] == m])}, "
        f"class 2 {mean_std([r['models']['teacher']['dice_class2'] for r in records if r['method'] == m])}"
        for m in methods
    ]
    train, data = cfg["train"], cfg["data"]
    wall = sum(r["train_s"] + r.get("score_s", 0.0) for r in records)
    lines += [
        "",
        f"- Command: `{command}`",
        "- Code: " + "; ".join(f"{', '.join(ms)}: {code}" for code, ms in _codes(records, methods).items()) + ".",
        f"- Cohort: `{cohort}` from `medeman.sample_data.make_cohort` (seed {args.cohort_seed}): "
        f"{_count(cohort / 'labeled' / 'labels')} labeled training cases, {_count(cohort / 'val' / 'labels')} validation cases "
        f"(`--val`, the same for every run; hyper-parameters are chosen on them), {_count(cohort / 'unlabeled')} unlabeled scans "
        f"(their ground truth, `unlabeled_labels/`, only trains the upper bound), {_count(cohort / 'test' / 'labels')} test cases.",
        f"- Budget (base `{args.config}`, every run): {train['max_steps']} steps, lr {train['lr']} ({train['lr_schedule']}), "
        f"batch {data['batch_size_labeled']} labeled + {data['batch_size_unlabeled']} unlabeled patches of {data['patch_size']}, "
        f"{cfg['model']['name']} channels {cfg['model']['channels']}, validation every {train['val_every_steps']} steps"
        + (f"; overrides {' '.join(args.set)}" if args.set else "")
        + ".",
        "- Method settings: " + "; ".join(f"`{m}` {_overlay_summary(m)}" for m in methods) + ".",
        "- Teacher statistics in `teacher.pt`: "
        + ", ".join(
            f"{m} {sorted({r.get('teacher_stats') or '?' for r in records if r['method'] == m})}" for m in methods
        )
        + ".",
        "- Per class (teacher): " + "; ".join(per_class) + ".",
        f"- Hardware: {hardware()}; runs one at a time per process.",
        f"- Wall time: {wall / 60:.1f} min of training + test scoring over {len(records)} runs; per method and run: "
        + ", ".join(f"{m} {mean_std([r['train_s'] for r in records if r['method'] == m], 0)} s" for m in methods)
        + " (2 cores shared with other jobs, so wall times vary). Every run and model: "
        f"`{csv_path.name}`.",
    ]
    if missing:
        lines.append(f"- Not run: {', '.join(missing)} (no finished runs in `{args.out}`).")
    notes = notes_below(md_path)  # hand-written findings survive a rerun
    notes = "\n" if notes is None else notes
    md_path.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + notes, encoding="utf-8")
    return md_path


def _per_class_table(records: list[dict], methods: list[str]) -> list[str]:
    """Per class, the deployed model's test Dice, its paired difference to supervised and the share of the gap it closes."""
    classes = sorted(
        {int(k[len("dice_class") :]) for r in records for k in r["models"]["teacher"] if k.startswith("dice_class")}
    )
    lines = [
        "",
        "Per class (deployed model; class 2, the kidneys, is the small structure): test Dice, paired difference "
        "to supervised with the seeds ahead, and the gap to the upper bound closed:",
        "",
        "| class | method | test Dice | − supervised | ahead | gap closed |",
        "|---|---|---|---|---|---|",
    ]
    for c in classes:
        key = f"dice_class{c}"
        by = {(r["method"], r["seed"]): r["models"]["teacher"][key] for r in records}
        base = {s: v for (m, s), v in by.items() if m == "supervised"}
        upper = {s: v for (m, s), v in by.items() if m == "upper"}
        for method in methods:
            mine = {s: v for (m, s), v in by.items() if m == method}
            diffs = [mine[s] - base[s] for s in sorted(mine) if s in base]
            full = statistics.fmean(upper.values()) - statistics.fmean(base.values()) if upper and base else 0.0
            gap = (
                f"{100 * (statistics.fmean(mine.values()) - statistics.fmean(base.values())) / full:.0f} %"
                if base and abs(full) > 1e-9
                else "–"
            )
            lines.append(
                f"| {c} | {method} | {mean_std(list(mine.values()))} | "
                f"{mean_std(diffs) if diffs and method != 'supervised' else '–'} | "
                f"{sum(d > 0 for d in diffs) if method != 'supervised' else '–'}/{len(diffs)} | {gap} |"
            )
    return lines


def _codes(records: list[dict], methods: list[str]) -> dict[str, list[str]]:
    """Which medeman code trained which methods (runs record it; older records: the code writing the report)."""
    codes: dict[str, list[str]] = {}
    for method in methods:
        for code in dict.fromkeys(r.get("code") or code_version() for r in records if r["method"] == method):
            codes.setdefault(code, []).append(method)
    return codes


def _curve_table(records: list[dict], methods: list[str]) -> list[str]:
    steps = sorted({s for r in records for c in r.get("curves", {}).values() for s in c})
    if not steps:
        return ["(no metrics.csv)"]
    lines = ["| method | network | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        for net in sorted({n for r in runs for n in r.get("curves", {})}):
            cells = []
            for s in steps:
                values = [r["curves"][net][s] for r in runs if s in r.get("curves", {}).get(net, {})]
                cells.append(f"{statistics.fmean(values):.3f}" if values else "")
            lines.append(f"| {method} | {net} | " + " | ".join(cells) + " |")
    return lines


def _overlay_summary(method: str) -> str:
    overlay = yaml.safe_load((REPO / METHODS[method][0]).read_text()) or {}
    flat = [f"{section}.{k}={v}" for section, values in overlay.items() for k, v in (values or {}).items()]
    return (
        f"({METHODS[method][0]}: {', '.join(flat)}"
        + (", trained on all labels" if METHODS[method][2] == "all" else "")
        + ")"
    )


def _write_csv(path: Path, records: list[dict]) -> None:
    rows = []
    for r in records:
        for model, scores in r["models"].items():
            rows.append(
                {
                    "method": r["method"],
                    "seed": r["seed"],
                    "model": model,
                    **{k: f"{v:.4f}" for k, v in scores.items()},
                    "val_teacher": f"{r['val_teacher']:.4f}",
                    "steps": r["steps"],
                    "train_s": r["train_s"],
                    "score_s": r.get("score_s", ""),
                    "run_dir": r["run_dir"],
                }
            )
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _count(folder: Path) -> int:
    return sum(
        1 for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith((".nii.gz", ".nii", ".mha", ".nrrd"))
    )


# ---- grid on validation -------------------------------------------------------------------------
def run_grid(args: argparse.Namespace, cohort: Path, command: str) -> int:
    combos = parse_grid(args.grid)
    rows = []
    for method in args.methods:
        for sets in combos:
            tag = grid_tag(sets)
            for seed in args.seeds:
                record = run_one(
                    method, seed, Path(args.out) / "grid" / method / tag / f"seed{seed}", sets, args, cohort
                )
                print(
                    f"grid {method} {' '.join(sets)} seed {seed}: val {record['val_teacher']:.3f} "
                    f"(test teacher {record['models']['teacher']['dice_fg']:.3f}; {record['train_s']:.0f} s)",
                    flush=True,
                )
                rows.append(
                    {
                        "method": method,
                        "sets": " ".join(sets),
                        "seed": seed,
                        "val": record["val_teacher"],
                        "test_teacher": record["models"]["teacher"]["dice_fg"],
                        "train_s": record["train_s"],
                    }
                )
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "ssl_ablation_grid.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Hyper-parameters of the ablation, chosen on validation",
        "",
        f"Each method trained with every combination at seed(s) {' '.join(map(str, args.seeds))}; the choice is the best "
        "**validation** Dice of the deployed teacher (the validation cases, never the test cases). The test column is shown "
        "only for the record, it played no part in the choice.",
        "",
        "| method | setting | val Dice (deployed teacher) | test Dice (not used) | train s | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        by_set = {s: [r for r in mine if r["sets"] == s] for s in dict.fromkeys(r["sets"] for r in mine)}
        best = max(by_set, key=lambda s: statistics.fmean(r["val"] for r in by_set[s]))
        for s, runs in by_set.items():
            lines.append(
                f"| {method} | `{s}` | {statistics.fmean(r['val'] for r in runs):.3f} | "
                f"{statistics.fmean(r['test_teacher'] for r in runs):.3f} | {statistics.fmean(r['train_s'] for r in runs):.0f} | "
                f"{'**yes**' if s == best else ''} |"
            )
        if args.write_chosen:
            write_chosen(method, best.split(), command)
    lines += [
        "",
        f"- Command: `{command}`",
        f"- Code: {code_version()}.",
        f"- Base config `{args.config}`"
        + (f", overrides {' '.join(args.set)}" if args.set else "")
        + f"; hardware: {hardware()}.",
    ]
    (results / "ssl_ablation_grid.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def write_chosen(method: str, sets: list[str], command: str) -> None:
    """Put the validation-chosen values into the method's overlay ``configs/ablation_<method>.yaml`` (keeps its header comment)."""
    path = REPO / METHODS[method][0]
    text = path.read_text(encoding="utf-8")
    header = "".join(
        line + "\n" for line in text.splitlines() if line.startswith("#") and "chosen on validation" not in line
    )
    overlay = yaml.safe_load(text) or {}
    for item in sets:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        overlay.setdefault(section, {})[name] = yaml.safe_load(value)
    chosen = ", ".join(sets)
    path.write_text(
        header
        + f"# {chosen}: chosen on validation (benchmarks/results/ssl_ablation_grid.md)\n"
        + yaml.safe_dump(overlay, sort_keys=False),
        encoding="utf-8",
    )


# ---- main ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--cohort", default="runs/ablation_cohort_val6", help="cohort folder, generated on first use")
    parser.add_argument("--labeled", type=int, default=2, help="labeled training cases of a generated cohort")
    parser.add_argument("--val", type=int, default=6, help="validation cases of a generated cohort")
    parser.add_argument("--unlabeled", type=int, default=24, help="unlabeled scans of a generated cohort")
    parser.add_argument("--test", type=int, default=12, help="test cases of a generated cohort")
    parser.add_argument("--cohort-seed", type=int, default=0, help="seed of a generated cohort")
    parser.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "ablation.yaml",
        help="base config: the budget shared by all methods",
    )
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument(
        "--grid", nargs="+", default=None, metavar="KEY=V1,V2", help="validation grid instead of the table"
    )
    parser.add_argument(
        "--write-chosen", action="store_true", help="with --grid: write each method's best setting into its overlay"
    )
    parser.add_argument("--out", default="runs/ablation", help="folder of the run folders (<out>/<method>/seed<N>)")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where the .md and .csv go")
    parser.add_argument("--tag", default="", help="suffix of the result files (ssl_ablation_<tag>.md) for side studies")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse finished runs (their scores.json) instead of retraining"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite the table from finished runs; train nothing"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (the CPUs are shared)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long end-to-end check (benchmarks/README.md): a tiny cohort, network and budget, one seed, "
        "a two-point grid; everything under $OUT or a temporary folder",
    )
    return parser


SMOKE_SETS = [
    "model.channels=[4,8]",
    "model.num_res_units=0",
    "data.patch_size=[16,16,16]",
    "train.max_steps=4",
    "train.val_every_steps=2",
    "ssl.rampup_steps=2",
    "ssl.recalibration_batches=1",
    "infer.sw_batch_size=1",
]


def smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    """Tiny sizes that win over the command line; outputs only under ``$OUT`` (or a new temporary folder)."""
    root = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="ssl_ablation_smoke_"))
    args.cohort, args.out, args.results = str(root / "cohort"), str(root / "runs"), str(root / "results")
    args.labeled, args.val, args.unlabeled, args.test, args.seeds = 2, 1, 2, 1, [0]
    args.set = [*args.set, *SMOKE_SETS]
    args.reuse = args.report_only = args.write_chosen = False
    return args


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/ssl_ablation.py " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"
    )
    if args.smoke:
        args = smoke_args(args)
        cohort = ensure_cohort(args)
        grid = argparse.Namespace(**{**vars(args), "methods": ["mt_eman"], "grid": ["ssl.consistency_weight=1,10"]})
        run_grid(grid, cohort, command)
    cohort = ensure_cohort(args)
    if args.grid:
        return run_grid(args, cohort, command)
    records = []
    md = None
    for seed in args.seeds:  # seed-major: a cut-short ablation still has every method at the seeds it reached
        for method in args.methods:
            run_dir = Path(args.out) / method / f"seed{seed}"
            if args.report_only:
                if not (run_dir / "scores.json").is_file():
                    continue
                records.append(load_record(run_dir / "scores.json"))
                continue
            try:
                record = run_one(method, seed, run_dir, [], args, cohort)
            except Exception as err:  # one failed run must not cost the others; rerun with --reuse
                print(f"{method} seed {seed}: FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            records.append(record)
            scores = record["models"]
            print(
                f"{method} seed {seed}: test Dice teacher {scores['teacher']['dice_fg']:.3f}, student {scores['student']['dice_fg']:.3f} "
                f"(val {record['val_teacher']:.3f}; train {record['train_s']:.0f} s)",
                flush=True,
            )
            md = write_results(records, args, cohort, command)
    if args.report_only and records:
        md = write_results(records, args, cohort, command)
    if md is not None:
        print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
