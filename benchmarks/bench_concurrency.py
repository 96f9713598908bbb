"""Several ``medeman train`` runs started together on one machine: wall time per run against one run alone.

Before issue 23, medeman left torch at one OpenMP thread per core in every process, so two runs on a
2-core machine ran four spinning threads on two cores: 204 s for two 100-step runs instead of 16 s
with ``OMP_NUM_THREADS=1``. Now each command fits its threads to the machine (:mod:`medeman.threads`).

Each round starts 1, then 2, then 4 (``--together``) identical short runs of ``medeman train`` on
``sample_data/`` with ``configs/sample.yaml`` (``--steps`` steps, one validation at the end) as
separate processes at the same moment, with the environment as a user has it: ``OMP_NUM_THREADS``
and ``MKL_NUM_THREADS`` are removed, nothing is set. A run's wall time is from its start to its
exit (start-up and validation included). The table gives, per number of runs together, the median
wall time of one run over all runs of all rounds and its ratio to one run alone; the target is
``2 together <= 1.5 x alone`` on a 2-core machine. ``--old-threads`` adds the same with
``--threads <cores>`` (every run takes every core, the behaviour before issue 23), to see the
collapse on the same machine.

    python benchmarks/bench_concurrency.py                     # 100 steps, 1/2/4 together, 1 round
    python benchmarks/bench_concurrency.py --rounds 3 --old-threads
    python benchmarks/bench_concurrency.py --smoke              # a tiny cohort, 2 steps: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_concurrency.md"


def start_runs(
    count: int, labeled: Path, unlabeled: Path, config: Path, steps: int, out: Path, threads: int | None
) -> list[float]:
    """Start ``count`` trainings at once; return each one's wall time in seconds (raises if any fails)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    processes = []
    for i in range(count):
        command = [
            sys.executable,
            "-m",
            "medeman.cli",
            "train",
            "--labeled",
            str(labeled),
            "--unlabeled",
            str(unlabeled),
            "--config",
            str(config),
            "--set",
            f"train.max_steps={steps}",
            "--set",
            f"train.val_every_steps={steps}",
            "--set",
            f"ssl.rampup_steps={max(1, steps // 2)}",
            "--out",
            str(out / f"run{i}"),
            "--overwrite",
            "--no-progress",
            *(["--threads", str(threads)] if threads else []),
        ]
        log = open(out / f"run{i}.log", "w")
        processes.append(
            (time.perf_counter(), subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        )
    walls = []
    for started, process, log in processes:
        code = process.wait()
        walls.append(time.perf_counter() - started)
        log.close()
        if code != 0:
            raise RuntimeError(f"medeman train exited {code}: see {log.name}:\n" + Path(log.name).read_text()[-2000:])
    return walls


def table(results: dict[tuple[str, int], list[float]], alone: dict[str, float]) -> str:
    lines = ["| threads | runs together | wall per run, median s (min-max) | ratio to one alone |", "|---|---|---|---|"]
    for (label, count), walls in results.items():
        median = statistics.median(walls)
        lines.append(
            f"| {label} | {count} | {median:.1f} ({min(walls):.1f}-{max(walls):.1f}) | {median / alone[label]:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per run (default: 100)")
    parser.add_argument(
        "--together", type=int, nargs="+", default=[1, 2, 4], help="runs started together (default: 1 2 4)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the whole sequence (default: 1)")
    parser.add_argument(
        "--old-threads", action="store_true", help="also run with --threads <cores> (the behaviour before issue 23)"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help=f"result file (default: {RESULTS.relative_to(REPO)})"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny generated cohort, 2 steps, 1 and 2 together; writes no result file"
    )
    args = parser.parse_args(argv)

    from medeman.sample_data import make_cohort
    from medeman.threads import available_cores

    with tempfile.TemporaryDirectory(prefix="medeman-concurrency-") as scratch:
        scratch = Path(scratch)
        data, config = REPO / "sample_data", REPO / "configs" / "sample.yaml"
        steps, together, rounds = args.steps, args.together, args.rounds
        if args.smoke:
            data = make_cohort(scratch / "data", n_labeled=3, n_unlabeled=1, n_test=0, other_formats=False)
            config = scratch / "smoke.yaml"
            config.write_text(
                "data: {spacing: [6.0, 6.0, 6.0], patch_size: [16, 16, 16], num_classes: 3, num_workers: 0, val_fraction: 0.34}\n"
                "model: {channels: [4, 8], num_res_units: 0}\n"
            )
            steps, together, rounds = 2, [1, 2], 1
        cores = available_cores()
        load = os.getloadavg()[0]  # other processes on the machine share the cores too
        settings = [("medeman's rule", None)] + ([(f"--threads {cores} (before)", cores)] if args.old_threads else [])
        results: dict[tuple[str, int], list[float]] = {}
        raw: list[str] = []
        for _ in range(rounds):
            for label, threads in settings:
                for count in together:
                    walls = start_runs(count, data / "labeled", data / "unlabeled", config, steps, scratch, threads)
                    results.setdefault((label, count), []).extend(walls)
                    raw.append(f"{label}: {count} together: " + ", ".join(f"{w:.1f} s" for w in walls))
                    print(raw[-1], flush=True)
        alone = {label: statistics.median(results.get((label, min(together)), [float("nan")])) for label, _ in settings}
        text = table(results, alone)
    header = (
        f"`medeman train` on {'a tiny generated cohort' if args.smoke else 'sample_data/ with configs/sample.yaml'}, "
        f"{steps} steps, {rounds} round(s); {cores} cores available (sched_getaffinity), no OMP_NUM_THREADS; "
        f"1-minute load average {load:.1f} before the first run"
    )
    print(header)
    print(text)
    if not args.smoke:
        sys.path.insert(0, str(Path(__file__).parent))
        from _report import code_version, hardware

        args.results.write_text(
            f"# bench_concurrency\n\n`python benchmarks/bench_concurrency.py {' '.join(argv or sys.argv[1:])}`"
            f" on {hardware()}; {code_version()}\n\n{header}\n\n{text}\n\nEach run's wall time, in order:\n\n"
            + "".join(f"- {line}\n" for line in raw),
            encoding="utf-8",
        )
        print(f"written to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
