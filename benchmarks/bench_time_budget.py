"""Does a plan-less ``medeman train --time-budget B`` end within B? Wall time of the whole command against B.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_time_budget.py --budget 90

Runs ``medeman train`` without ``--config`` on ``sample_data/`` (planning, timing the candidate
recipes, caching, training, validations, learning the post-processing), and prints the budget, the
wall time, their ratio and the planned steps. The plan aims at the budget from below (30 % of it is
left for everything but training steps); the issue's bar is within 20 %. ``--smoke``: a 2-case cohort and a 15 s budget.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=90.0, help="seconds (default 90)")
    parser.add_argument("--smoke", action="store_true", help="a 2-case cohort, a 15 s budget, temporary files")
    args = parser.parse_args(argv)
    from medeman.config import load_config
    from medeman.sample_data import main as make_sample_data
    from medeman.train import main as train

    with tempfile.TemporaryDirectory(prefix="bench_time_budget-") as tmp:
        work = Path(tmp)
        if args.smoke:
            with contextlib.redirect_stdout(io.StringIO()):
                make_sample_data(["--out", str(work / "data"), "--labeled", "3", "--unlabeled", "2", "--test", "0"])
            labeled, unlabeled, budget = work / "data" / "labeled", work / "data" / "unlabeled", 15.0
        else:
            labeled, unlabeled, budget = (
                REPO / "sample_data" / "labeled",
                REPO / "sample_data" / "unlabeled",
                args.budget,
            )
        run = work / "run"
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as log:
            code = train(
                [
                    "--labeled",
                    str(labeled),
                    "--unlabeled",
                    str(unlabeled),
                    "--out",
                    str(run),
                    "--device",
                    "cpu",
                    "--time-budget",
                    f"{budget:g}s",
                    "--no-progress",
                ]
            )
        wall = time.perf_counter() - start
        if code != 0:
            print(log.getvalue()[-3000:])
            return code
        cfg = load_config([run / "config.yaml"])
    print("| budget (s) | wall (s) | wall / budget | planned steps | patch | channels |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {budget:.0f} | {wall:.1f} | {wall / budget:.2f} | {cfg['train']['max_steps']} | {cfg['data']['patch_size']} | {cfg['model']['channels']} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
