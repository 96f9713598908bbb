"""Ablation: supervised vs mean teacher (BN teacher) vs mean teacher with EMAN, several seeds each.

Every method trains on the same labeled cases (the config's deterministic train/validation
split of ``<data>/labeled``), the same unlabeled scans and the same step budget; methods differ
only by their overlay config (``configs/supervised.yaml``, ``mt_bn.yaml``, ``mt_eman.yaml``) and
seeds only by ``train.seed``. Each run is then scored on the held-out ``<data>/test`` cases as
three models:

    teacher_best   the run's ``teacher.pt``: the teacher at its best validation Dice (what users deploy)
    teacher_last   the teacher of the final state (``teacher.*`` of ``final_state.pt``, see :class:`FinalState`)
    student_last   the student of the final state (``student.*`` of ``final_state.pt``)

(the supervised baseline has no teacher: its "teacher" rows are its student, best and last).
A case's score is its mean foreground Dice (classes 1..C-1); a run's score is the mean over the
test cases; the table gives mean ± std over seeds. Runs go one at a time; a run folder that
already holds ``scores.json`` is reused with ``--reuse``, so an interrupted ablation continues;
text under the notes marker of an existing result file is kept when the table is rewritten.

    python benchmarks/ssl_ablation.py --seeds 0 1 2 --out runs/ablation
    python benchmarks/ssl_ablation.py --methods mt_bn mt_eman --set ssl.ema_momentum=0.97 --out runs/abl_m097 --tag m097
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "supervised": "configs/supervised.yaml",
    "mt_bn": "configs/mt_bn.yaml",
    "mt_eman": "configs/mt_eman.yaml",
}
MODELS = ("teacher_best", "teacher_last", "student_last")
NOTES_MARKER = "<!-- notes: text below this line is kept when the table is regenerated -->"
CSV_COLUMNS = ("method", "seed", "model", "dice_fg", "dice_class1", "dice_class2", "val_best_teacher",
               "steps", "last_ckpt_step", "train_s", "run_dir")


class FinalState(Callback):
    """Saves the module's state_dict at the end of training to ``final_state.pt``.

    ``checkpoints/last.ckpt`` is not always the final state: Lightning 2.6's ModelCheckpoint writes
    ``last`` only when it also writes a top-k (best ``val/dice_teacher``) checkpoint, so when the
    last validation does not improve, last.ckpt is the best step's state, not the last step's.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        torch.save({"global_step": trainer.global_step, "state_dict": state}, str(self.path))


def last_state_networks(run_dir: Path, cfg: dict) -> dict[str, torch.nn.Module]:
    """Teacher and student of ``final_state.pt`` (only the student for the supervised baseline)."""
    from medeman.nets import build_network

    state = torch.load(str(run_dir / "final_state.pt"), map_location="cpu", weights_only=True)["state_dict"]
    nets = {}
    for name in ("teacher", "student"):
        prefix = f"{name}."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            net = build_network(cfg)
            net.load_state_dict(weights)
            nets[name] = net.eval()
    nets.setdefault("teacher", nets["student"])
    return nets


def score_model(model, cfg: dict, data: Path, pred_dir: Path) -> dict[str, float]:
    """Segment ``<data>/test/images`` with ``(net, cfg)`` and return the mean foreground and per-class Dice."""
    from medeman.evaluate import segment_and_score

    _, summary = segment_and_score((model, cfg), data / "test" / "images", data / "test" / "labels", pred_dir,
                                   overwrite=True, progress=False, device="cpu")
    if summary.problems:
        raise RuntimeError(f"{pred_dir}: {len(summary.problems)} test case(s) not scored: {summary.problems[0]}")
    classes = range(1, int(cfg["data"]["num_classes"]))
    dice = {(s.case_id, s.label): s.dice for s in summary.scores}
    per_case = [statistics.fmean(dice[(case, c)] for c in classes) for case in summary.cases]
    out = {"dice_fg": statistics.fmean(per_case)}
    for c in classes:
        out[f"dice_class{c}"] = statistics.fmean(dice[(case, c)] for case in summary.cases)
    return out


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one (method, seed) run unless ``--reuse`` finds it finished, then score its three models."""
    from medeman.checkpoint import load_teacher
    from medeman.config import load_config
    from medeman.train import fit

    run_dir = Path(args.out) / method / f"seed{seed}"
    done = run_dir / "scores.json"
    if args.reuse and done.is_file():
        return json.loads(done.read_text())
    cfg = load_config([args.config, REPO / METHODS[method]], [*args.set, f"train.seed={seed}"])
    trained = run_dir / "train.json"
    if args.reuse and trained.is_file() and (run_dir / "final_state.pt").is_file():
        record = json.loads(trained.read_text())  # trained earlier, scoring failed or was cut short
    else:
        start = time.perf_counter()
        result = fit(cfg, args.data / "labeled", args.data / "unlabeled", out_dir=run_dir, progress_bar=False, overwrite=True,
                     callbacks=[FinalState(run_dir / "final_state.pt")])
        last_ckpt_step = torch.load(str(run_dir / "checkpoints" / "last.ckpt"), map_location="cpu", weights_only=True)["global_step"]
        record = {"method": method, "seed": seed, "steps": result.steps, "last_ckpt_step": last_ckpt_step, "train_s": round(time.perf_counter() - start, 1),
                  "val_best_teacher": result.best_dice_teacher, "run_dir": str(run_dir), "models": {}}
        trained.write_text(json.dumps(record, indent=1))
    best, _, _ = load_teacher(run_dir)
    last = last_state_networks(run_dir, cfg)
    models = {"teacher_best": best, "teacher_last": last["teacher"], "student_last": last["student"]}
    for name, net in models.items():
        record["models"][name] = score_model(net, cfg, args.data, run_dir / f"pred_{name}")
    done.write_text(json.dumps(record, indent=1))
    return record


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def write_results(records: list[dict], args: argparse.Namespace, wall_s: float, command: str) -> tuple[Path, Path]:
    """Write the CSV of every run and model, and the markdown table of mean ± std over seeds."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "ssl_ablation" + (f"_{args.tag}" if args.tag else "")
    csv_path, md_path = results / f"{stem}.csv", results / f"{stem}.md"
    rows = []
    for r in records:
        for model, scores in r["models"].items():
            rows.append({"method": r["method"], "seed": r["seed"], "model": model, **{k: f"{v:.4f}" for k, v in scores.items()},
                         "val_best_teacher": f"{r['val_best_teacher']:.4f}", "steps": r["steps"],
                         "last_ckpt_step": r.get("last_ckpt_step", ""), "train_s": r["train_s"],
                         "run_dir": r["run_dir"]})
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    from medeman.config import load_config

    # the budget as the runs recorded it (the base config may have changed since they trained)
    cfg = load_config([Path(records[0]["run_dir"]) / "config.yaml"] if records else [args.config], [] if records else args.set)
    train, ssl = cfg["train"], cfg["ssl"]
    lines = [
        "# Semi-supervised ablation: supervised vs mean teacher (BN) vs mean teacher + EMAN",
        "",
        f"Test Dice on `{args.data}/test` (mean foreground Dice per case, classes 1 and 2, averaged over the test cases), "
        "mean ± std over seeds. `teacher (best)` is the run's `teacher.pt` (best validation Dice); `teacher (last)` and "
        "`student (last)` are the networks of the final state (saved at the end of training, `final_state.pt`). The supervised baseline has no "
        "teacher: its teacher rows are its student.",
        "",
        "| method | model | seeds | Dice (fg mean) | Dice class 1 | Dice class 2 | val Dice (best teacher) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        runs = [r for r in records if r["method"] == method]
        for model in MODELS:
            label = model.replace("_", " (") + ")"
            cols = [mean_std([r["models"][model][key] for r in runs]) for key in ("dice_fg", "dice_class1", "dice_class2")]
            val = mean_std([r["val_best_teacher"] for r in runs]) if model == "teacher_best" else ""
            lines.append(f"| {method} | {label} | {len(runs)} | {' | '.join(cols)} | {val} |")
    lines += [
        "",
        f"- Command: `{command}`",
        f"- Cohort: `{args.data}`: {_count(args.data / 'labeled' / 'labels')} labeled cases split by `data.split_seed="
        f"{cfg['data']['split_seed']}`, `data.val_fraction={cfg['data']['val_fraction']}` into training and validation "
        f"(the same for every run), {_count(args.data / 'unlabeled')} unlabeled scans, {_count(args.data / 'test' / 'labels')} test cases.",
        f"- Budget (every run, from the runs' `config.yaml`): `{args.config}` — {train['max_steps']} steps, lr {train['lr']} ({train['lr_schedule']}), "
        f"batch {cfg['data']['batch_size_labeled']} labeled + {cfg['data']['batch_size_unlabeled']} unlabeled patches of "
        f"{cfg['data']['patch_size']}; mean teacher: ema_momentum {ssl['ema_momentum']}, {ssl['consistency']} consistency "
        f"weight {ssl['consistency_weight']}, ramp-up {ssl['rampup_steps']} steps"
        + (f"; overrides {' '.join(args.set)}" if args.set else "") + ".",
        f"- Seeds: {' '.join(map(str, args.seeds))} (`train.seed`).",
        f"- Hardware: {_hardware()}; one run at a time.",
        f"- Wall time: training {sum(r['train_s'] for r in records) / 60:.1f} min over {len(records)} runs "
        f"({mean_std([r['train_s'] for r in records])} s per run; `train_s` per run in the CSV), this invocation "
        f"{wall_s / 60:.1f} min (training + test inference of the runs it did not reuse).",
        f"- Every run and model: `{csv_path.name}`.",
    ]
    notes = ""
    if md_path.is_file() and NOTES_MARKER in md_path.read_text(encoding="utf-8"):  # hand-written findings survive a rerun
        notes = md_path.read_text(encoding="utf-8").split(NOTES_MARKER, 1)[1]
    md_path.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + (notes or "\n"), encoding="utf-8")
    return md_path, csv_path


def _count(folder: Path) -> int:
    return sum(1 for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith((".nii.gz", ".nii", ".mha", ".nrrd")))


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU only"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("sample_data"), help="cohort with labeled/, unlabeled/, test/")
    parser.add_argument("--config", type=Path, default=Path("configs/sample.yaml"), help="base config: the budget shared by all methods")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--out", default="runs/ablation", help="folder of the run folders (<out>/<method>/seed<N>)")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where the .md and .csv go")
    parser.add_argument("--tag", default="", help="suffix of the result files (ssl_ablation_<tag>.md) for side studies")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs (their scores.json) instead of retraining")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table from finished runs; train nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python benchmarks/ssl_ablation.py " + " ".join(a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only")
    start = time.perf_counter()
    records = []
    for seed in args.seeds:  # seed-major: a cut-short ablation still has every method at the seeds it reached
        for method in args.methods:
            t0 = time.perf_counter()
            if args.report_only and not (Path(args.out) / method / f"seed{seed}" / "scores.json").is_file():
                continue
            args.reuse = args.reuse or args.report_only
            try:
                record = run_one(method, seed, args)
            except Exception as err:  # one failed run must not cost the others; rerun with --reuse
                print(f"{method} seed {seed}: FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            records.append(record)
            scores = record["models"]
            print(f"{method} seed {seed}: test Dice teacher best {scores['teacher_best']['dice_fg']:.3f}, "
                  f"teacher last {scores['teacher_last']['dice_fg']:.3f}, student last {scores['student_last']['dice_fg']:.3f} "
                  f"(val best {record['val_best_teacher']:.3f}; {time.perf_counter() - t0:.0f} s)", flush=True)
            md, _ = write_results(records, args, time.perf_counter() - start, command)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
