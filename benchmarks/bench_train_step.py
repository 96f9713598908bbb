"""Time one semi-supervised training step: the compute floor, medeman through Lightning, an SSL4MIS-style loop.

Every variant does the same three network passes on the same net, patch and batch (student on
``cat(labeled, strong)`` with backward and an AdamW step, teacher on ``weak`` without grad) and
the same losses (DiceCE on the labeled half + softmax MSE to the teacher):

    a  floor      the passes and the optimizer step on pre-made tensors (8 real steps drawn once from
                  the cohort, cycled): no Lightning, no loader
    b  medeman    ``medeman.train.fit`` on a generated NIfTI cohort (cache: memory): Lightning, the
                  DataModule's loaders and augmentation, logging, the EMAN teacher update
    c  ssl4mis    a Python loop over uncached MONAI Datasets (each item re-reads its NIfTI file, as
                  SSL4MIS re-reads h5), a ``copy.deepcopy`` teacher kept in train mode and the
                  per-tensor parameter EMA
    d, e          (b) and (a) with ``train.compile=true`` (student and teacher through ``torch.compile``;
                  compilation falls in the warm-up steps, so give ``--warmup`` >= 10)

The last table puts medeman's fastest step (of b and d, in any precision) against (c) in fp32, as
SSL4MIS trains.

A step is timed from one step's start to the next one's (loader waits count); ``--warmup`` steps
are left out and the median of ``--steps`` is reported, with the window mean (wall time of all
timed steps / steps) beside it so nothing hides between steps. (b) never validates:
``train.val_every_steps`` is set past the run. Each variant runs in its own process, so the peak
RSS printed for it (``ru_maxrss`` of the process, and of its largest loader worker) is its own.

    python benchmarks/bench_train_step.py --steps 60 --warmup 10 --rounds 2 --threads 1
    python benchmarks/bench_train_step.py --smoke      # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "a": "floor (tensors, no Lightning)",
    "b": "medeman fit (Lightning + loaders)",
    "c": "ssl4mis loop (uncached, EMA loop)",
    "d": "medeman fit, train.compile=true",
    "e": "floor, torch.compile",
}
COMPILED = {"d": "b", "e": "a"}  # variant -> the eager variant it compiles (student and teacher through torch.compile)
LIGHTNING_PRECISION = {"32": "32", "bf16": "bf16-mixed"}


def peak_rss_mib() -> tuple[float, float]:
    """Peak resident set size of this process and of its largest finished child (loader workers), MiB."""
    scale = 1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0  # ru_maxrss is KiB on Linux, bytes on macOS
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale,
    )


def bench_config(args: argparse.Namespace, precision: str) -> dict:
    from medeman.config import load_config

    total = args.warmup + args.steps + 1
    sets = [
        f"data.patch_size=[{','.join(str(n) for n in patch_size(args))}]",
        f"data.batch_size_labeled={args.batch}",
        f"data.batch_size_unlabeled={args.batch}",
        f"train.max_steps={total}",
        f"train.val_every_steps={total + 100}",
        f"train.precision={LIGHTNING_PRECISION[precision]}",
        f"train.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "train.devices=1",
        *args.set,
    ]
    if args.num_workers is not None:
        sets.append(f"data.num_workers={args.num_workers}")
    return load_config([REPO / "configs" / "sample.yaml"], sets)


def cpu_seconds() -> float:
    """CPU time of this process and of its live children (the loader workers), in seconds.

    On a shared machine wall time per step includes waiting for a core; CPU time is what the step
    costs, whoever else runs (Linux: children from /proc; elsewhere this process only).
    """
    total = time.process_time()
    try:
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    except OSError:
        return total
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in children:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def now() -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, minor page faults of this process so far) at a step's start.

    Page faults are how glibc's allocator shows up: memory it hands back to the kernel between
    steps (large freed blocks are unmapped or trimmed) is faulted in again, page by page, next step.
    """
    return time.perf_counter(), cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def patch_size(args: argparse.Namespace) -> list[int]:
    return list(args.patch) * 3 if len(args.patch) == 1 else list(args.patch)


def autocast(precision: str, device: str = "cpu"):
    import torch

    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def synchronize(device: str) -> None:
    """Wait for the GPU, so a step's time is its own (CUDA kernels run asynchronously)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def step_loss(student, teacher, dice_ce, image, label, weak, strong, precision: str):
    """The step's compute, shared by (a) and (c): one student pass on cat(labeled, strong), one teacher pass on weak."""
    import torch

    from medeman.losses import softmax_mse

    n = image.shape[0]
    with autocast(precision, image.device.type):
        logits = student(torch.cat([image, strong]))
        with torch.no_grad():
            teacher_probs = torch.softmax(teacher(weak).float(), dim=1)
    return dice_ce(logits[:n].float(), label) + softmax_mse(logits[n:], teacher_probs)


FLOOR_STEPS = 8  # distinct pre-made steps the floor cycles through


def premade_steps(cfg: dict, data: Path, device: str) -> list[tuple]:
    """``FLOOR_STEPS`` real training steps (image, label, weak, strong) drawn once from the cohort.

    The floor trains on real patches, not random voxels: PyTorch's CPU PReLU backward is slower on
    the activations of a net trained on random labels (0.77 instead of 0.43 ms a call, 3 ms a step;
    likely its per-element choice by sign, which the CPU then cannot predict), and that once made
    the floor slower than medeman itself.
    """
    from medeman.data import SSLDataModule

    dm = SSLDataModule(cfg, data / "labeled", data / "unlabeled")
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    steps = []
    for _ in range(FLOOR_STEPS):
        step = next(batches)
        lab, unl = step["labeled"], step["unlabeled"]
        steps.append(tuple(t.clone().to(device) for t in (lab["image"], lab["label"], unl["weak"], unl["strong"])))
    del batches, dm
    gc.collect()  # the loader's workers exit before the timing starts
    return steps


def run_floor(args: argparse.Namespace, cfg: dict, precision: str, data: Path) -> dict:
    """(a) the passes and the optimizer step on real steps made once (no loader while timing)."""
    import torch
    from monai.losses import DiceCELoss

    from medeman.eman import make_teacher
    from medeman.nets import build_network

    steps = premade_steps(cfg, data, args.device)
    torch.manual_seed(int(cfg["train"]["seed"]))
    student = build_network(cfg).train().to(args.device)
    if cfg["train"]["channels_last"]:  # the floor of the same compute medeman does: its layout, and compiled if it is
        student = student.to(memory_format=torch.channels_last_3d)
    teacher = make_teacher(student, norm=cfg["ssl"]["teacher_norm"])
    if cfg["train"]["compile"]:
        student.compile()
        teacher.compile()
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=float(cfg["train"]["lr"]), weight_decay=float(cfg["train"]["weight_decay"]), fused=True
    )  # as medeman's
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    starts = []
    for i in range(args.warmup + args.steps + 1):
        synchronize(args.device)
        starts.append(now())
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(student, teacher, dice_ce, *steps[i % len(steps)], precision)
        loss.backward()
        optimizer.step()
    return {"starts": starts}


def run_medeman(args: argparse.Namespace, cfg: dict, precision: str, data: Path) -> dict:
    """(b) ``medeman.train.fit`` exactly as ``medeman train`` runs it, minus the progress bar."""
    from lightning.pytorch.callbacks import Callback

    from medeman.train import fit

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            synchronize(args.device)
            self.starts.append(now())

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="medeman-bench-run-") as run:
        start = time.perf_counter()
        fit(
            cfg,
            data / "labeled",
            data / "unlabeled",
            out_dir=run,
            callbacks=[timer],
            progress_bar=False,
            logger=not args.no_logger,
        )
        total = time.perf_counter() - start
    return {"starts": timer.starts, "fit_s": total}


def run_ssl4mis(args: argparse.Namespace, cfg: dict, precision: str, data: Path) -> dict:
    """(c) the SSL4MIS training loop on medeman's crops: uncached datasets, train-mode teacher, per-tensor EMA."""
    import torch
    from monai.data import DataLoader, Dataset, list_data_collate
    from monai.losses import DiceCELoss

    from medeman.data import transforms as tfm
    from medeman.data import SSLDataModule
    from medeman.nets import build_network

    dm = SSLDataModule(cfg, data / "labeled", data / "unlabeled")
    dm.discover()  # the same training cases as (b)
    # medeman's one loader has data.num_workers processes making whole steps; the loop's two loaders get half each, rounded up
    workers = -(-int(cfg["data"]["num_workers"]) // 2)
    torch.manual_seed(int(cfg["train"]["seed"]))
    student = build_network(cfg).train().to(args.device)  # SSL4MIS: plain layout, eager
    teacher = copy.deepcopy(student)  # SSL4MIS: create_model(ema=True), never put in eval mode
    for param in teacher.parameters():
        param.detach_()
    loaders = [
        DataLoader(
            Dataset(cases, chain),
            batch_size=args.batch,
            shuffle=True,
            num_workers=workers,
            collate_fn=list_data_collate,
            drop_last=True,
            persistent_workers=workers > 0,
        )
        for cases, chain in (
            (dm.train_cases, tfm.labeled_transforms(cfg)),
            (dm.unlabeled_cases, tfm.unlabeled_transforms(cfg)),
        )
    ]
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=float(cfg["train"]["lr"]), weight_decay=float(cfg["train"]["weight_decay"])
    )  # SSL4MIS: defaults
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    alpha, base_lr, max_steps = (
        float(cfg["ssl"]["ema_momentum"]),
        float(cfg["train"]["lr"]),
        int(cfg["train"]["max_steps"]),
    )

    def forever(loader):
        while True:
            yield from loader

    labeled, unlabeled = forever(loaders[0]), forever(loaders[1])
    starts = []
    for step in range(args.warmup + args.steps + 1):
        starts.append(now())
        lab, unl = next(labeled), next(unlabeled)
        lab, unl = ({k: v.to(args.device) for k, v in d.items() if isinstance(v, torch.Tensor)} for d in (lab, unl))
        loss = step_loss(student, teacher, dice_ce, lab["image"], lab["label"], unl["weak"], unl["strong"], precision)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        a = min(1 - 1 / (step + 1), alpha)
        for ema_p, p in zip(teacher.parameters(), student.parameters()):
            ema_p.data.mul_(a).add_(p.data, alpha=1 - a)
        for group in optimizer.param_groups:  # SSL4MIS's per-iteration poly learning rate
            group["lr"] = base_lr * (1.0 - step / max_steps) ** 0.9
        float(loss)  # SSL4MIS logs loss.item() every iteration
    del labeled, unlabeled, loaders
    return {"starts": starts}


def child(args: argparse.Namespace) -> None:
    """Run one variant in this process and print its timings as one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    cfg = bench_config(args, args.precision)
    data = Path(args.data)
    if args.variant in COMPILED:
        cfg["train"]["compile"] = True
    variant = COMPILED.get(args.variant, args.variant)
    run = {"a": run_floor, "b": run_medeman, "c": run_ssl4mis}[variant]
    out = run(args, cfg, args.precision, data)
    gc.collect()  # loader workers exit and are reaped before their peak RSS is read
    starts = out.pop("starts")
    timed = slice(args.warmup, args.warmup + args.steps)
    # per step: wall seconds, CPU seconds, page faults (the differences of consecutive now() readings)
    steps, cpu_steps, faults = ([b[k] - a[k] for a, b in zip(starts, starts[1:])][timed] for k in range(3))
    rss, workers_rss = peak_rss_mib()
    print(
        "RESULT "
        + json.dumps(
            {
                "steps": steps,
                "cpu_steps": cpu_steps,
                "faults": faults,
                "window_s": starts[args.warmup + len(steps)][0] - starts[args.warmup][0],
                "rss_mib": rss,
                "workers_rss_mib": workers_rss,
                "threads": torch.get_num_threads(),
                **out,
            }
        )
    )


def make_data(args: argparse.Namespace) -> Path:
    from medeman.sample_data import make_cohort

    root = Path(tempfile.mkdtemp(prefix="medeman-bench-data-"))
    make_cohort(root, n_labeled=args.labeled, n_unlabeled=args.unlabeled, n_test=0, seed=1, other_formats=False)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before timing")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every variant this many times, interleaved; steps are pooled"
    )
    parser.add_argument(
        "--patch",
        type=int,
        nargs="+",
        default=[32],
        help="patch side, or x y z (configs/sample.yaml: 32; MSD heart: 112 112 80)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where all three variants run")
    parser.add_argument(
        "--batch", type=int, default=2, help="labeled and unlabeled patches per step, each (sample.yaml: 2)"
    )
    parser.add_argument("--precision", choices=("32", "bf16"), nargs="+", default=["32", "bf16"])
    parser.add_argument(
        "--variants",
        default="abc",
        help="which of a, b, c, d, e to run (d, e: compiled; minutes of compilation on a CPU)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads in every variant (1: see benchmarks/README.md)"
    )
    parser.add_argument("--num-workers", type=int, help="data.num_workers for (b) and (c) (default: sample.yaml's)")
    parser.add_argument("--labeled", type=int, default=6, help="labeled cases of the generated cohort")
    parser.add_argument("--unlabeled", type=int, default=12, help="unlabeled scans of the generated cohort")
    parser.add_argument("--data", help="use this cohort (labeled/, unlabeled/) instead of generating one")
    parser.add_argument("--no-logger", action="store_true", help="(b) without the CSV/TensorBoard loggers")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every variant"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny UNet, 16^3 patches, 2 timed steps, fp32: checks that the benchmark runs, in seconds",
    )
    parser.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)  # internal: run one variant
    args = parser.parse_args(argv)
    if args.smoke and not args.variant:
        args.steps, args.warmup, args.rounds, args.patch, args.batch = 2, 1, 1, [16], 1
        args.labeled, args.unlabeled, args.num_workers, args.precision, args.threads = 3, 2, 0, ["32"], 1
        args.set = [*args.set, "model.channels=[4,8]", "model.num_res_units=0"]  # tiny wins over the sizes given
    if args.variant:
        args.precision = args.precision[0]
        child(args)
        return

    start = time.perf_counter()
    data = Path(args.data) if args.data else make_data(args)
    print(f"cohort: {data} ({time.perf_counter() - start:.0f} s to write)", flush=True)
    try:
        run_all(args, data)
    finally:
        if not args.data:
            shutil.rmtree(data, ignore_errors=True)


def run_all(args: argparse.Namespace, data: Path) -> None:
    """Run every variant in its own process, ``--rounds`` times interleaved, and print the table."""
    forwarded = [
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        "--patch",
        *map(str, args.patch),
        f"--batch={args.batch}",
        f"--device={args.device}",
        f"--threads={args.threads}",
        f"--data={data}",
        *[f"--set={s}" for s in args.set],
    ]
    if args.num_workers is not None:
        forwarded.append(f"--num-workers={args.num_workers}")
    if args.no_logger:
        forwarded.append("--no-logger")
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for precision in args.precision:
            for variant in args.variants:
                cmd = [sys.executable, __file__, f"--variant={variant}", f"--precision={precision}", *forwarded]
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}
                )
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    sys.exit(f"variant {variant} {precision} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                result = json.loads(lines[-1][len("RESULT ") :])
                results.setdefault((variant, precision), []).append(result)
                print(f"  {variant} {precision}: median {statistics.median(result['steps']):.4f} s/step", flush=True)

    import torch

    from medeman.nets import build_network

    cfg = bench_config(args, "32")
    n_params = sum(p.numel() for p in build_network(cfg).parameters())
    print(
        f"\nUNet channels={cfg['model']['channels']} num_res_units={cfg['model']['num_res_units']} ({n_params / 1e6:.2f} M params), "
        f"patch {'x'.join(map(str, patch_size(args)))}, batch {args.batch} labeled + {args.batch} unlabeled, data.num_workers={cfg['data']['num_workers']}, "
        f"{args.threads} torch threads, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU'}"
    )
    print(
        f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} round(s); cohort {args.labeled} labeled "
        f"(split into train/val) + {args.unlabeled} unlabeled NIfTI scans\n"
    )
    header = (
        f"{'variant':<36} {'precision':>9} {'median s/step':>13} {'window s/step':>13} {'vs (a)':>7} "
        f"{'CPU s/step':>10} {'vs (a)':>7} {'faults/step':>11} {'peak RSS MiB':>12} {'workers MiB':>11}"
    )
    print(header)
    print("-" * len(header))
    for precision in args.precision:
        floor = statistics.median([t for r in results.get(("a", precision), []) for t in r["steps"]] or [float("nan")])
        floor_cpu = statistics.median(
            [t for r in results.get(("a", precision), []) for t in r["cpu_steps"]] or [float("nan")]
        )
        for variant in args.variants:
            runs = results[(variant, precision)]
            median = statistics.median([t for r in runs for t in r["steps"]])
            cpu = statistics.median([t for r in runs for t in r["cpu_steps"]])
            window = sum(r["window_s"] for r in runs) / sum(len(r["steps"]) for r in runs)
            faults = statistics.median(
                [f for r in runs for f in r["faults"]]
            )  # minor page faults of the training process
            rss = max(r["rss_mib"] for r in runs)
            workers = max(r["workers_rss_mib"] for r in runs)
            rounds = (
                " (rounds: " + ", ".join(f"{statistics.median(r['steps']):.4f}" for r in runs) + ")"
                if len(runs) > 1
                else ""
            )
            print(
                f"{variant + ' ' + VARIANTS[variant]:<36} {precision:>9} {median:>13.4f} {window:>13.4f} {median / floor:>6.2f}x "
                f"{cpu:>10.4f} {cpu / floor_cpu:>6.2f}x {faults:>11.0f} {rss:>12.0f} {workers:>11.0f}{rounds}"
            )
    for variant in "bd":
        if variant in args.variants:
            fits = ", ".join(
                f"{p} {statistics.mean(r['fit_s'] for r in results[(variant, p)]):.1f} s" for p in args.precision
            )
            print(
                f"\n({variant}) whole fit() call incl. discovery, caching, {'compilation, ' if variant == 'd' else ''}Trainer set-up and teardown: "
                f"{fits} for {args.warmup + args.steps + 1} steps",
                end="",
            )
    ours_variants = [v for v in "bd" if v in args.variants]
    if ours_variants and "c" in args.variants:
        # the headline: medeman's fastest step (eager or compiled, any precision) against the SSL4MIS-style loop as SSL4MIS runs it (fp32)
        reference = "32" if "32" in args.precision else args.precision[0]
        header = f"{'':<10} {'medeman, best (variant, precision)':<36} {'ssl4mis-style loop (c)':<26} {'speed-up':>8}"
        print(f"\n\n{header}\n{'-' * len(header)}")
        for label, key in (("wall", "steps"), ("CPU", "cpu_steps")):
            step = {k: statistics.median([t for r in runs for t in r[key]]) for k, runs in results.items()}
            best = min(((v, p) for v in ours_variants for p in args.precision), key=step.__getitem__)
            ours, theirs = step[best], step[("c", reference)]
            # each round's own ratio too: the host's speed drifts over minutes, a round's variants run close together
            paired = [
                statistics.median(c[key]) / statistics.median(b[key])
                for c, b in zip(results[("c", reference)], results[best])
            ]
            per_round = f"  (rounds: {', '.join(f'{r:.2f}x' for r in paired)})" if len(paired) > 1 else ""
            print(
                f"{label + ' s/step':<10} {f'{ours:.4f} ({best[0]}, {best[1]})':<36} {f'{theirs:.4f} ({reference})':<26} {theirs / ours:>7.2f}x{per_round}"
            )
    else:
        print()


if __name__ == "__main__":
    main()
