"""``make demo``: the whole job on ``sample_data/`` — train, infer with the EMA teacher, evaluate.

Writes into one run folder (default ``runs/demo``, replaced on each demo run): the training run
(``teacher.pt``, ``config.yaml``, ``metrics.csv``, TensorBoard logs), ``pred/`` (masks of the
held-out test scans in their own geometry), ``test_scores.csv`` and ``png/`` (one picture per case).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Sequence

from medeman.checkpoint import read_teacher_file
from medeman.config import load_config
from medeman.score_run import segment_and_score
from medeman.threads import set_threads_for_config
from medeman.train import fit, hide_lightning_advert
from medeman.typed_config import as_config


def _peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0  # Linux reports KiB


def main(argv: Sequence[str] | None = None) -> int:
    """Train on sample_data/labeled + unlabeled, segment sample_data/test, print the Dice table."""
    parser = argparse.ArgumentParser(prog="python -m medeman.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sample_data", help="sample cohort folder (labeled/, unlabeled/, test/)")
    parser.add_argument("--config", action="append", default=None, help="config file(s) (default configs/sample.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default="runs/demo", help="run folder, replaced on each demo run")
    args = parser.parse_args(argv)
    hide_lightning_advert()
    data, out = Path(args.data), Path(args.out)
    cfg = as_config(load_config(args.config or ["configs/sample.yaml"], args.set))
    set_threads_for_config(cfg)  # make demo beside another training: threads that fit the machine

    start = time.perf_counter()
    print(
        f"[1/3] training {cfg.ssl.method} (teacher_norm={cfg.ssl.teacher_norm}) on {data / 'labeled'} + {data / 'unlabeled'} -> {out}"
    )
    result = fit(cfg, data / "labeled", data / "unlabeled", out_dir=out, overwrite=True)
    trained = time.perf_counter()
    print(
        f"      validation Dice after {result.steps} steps: teacher {result.last_dice_teacher:.3f}, student {result.last_dice_student:.3f} "
        f"({out / 'teacher.pt'} holds the {'final-step' if cfg.train.deploy == 'last' else 'best-validation'} teacher)"
    )
    stats = read_teacher_file(out / "teacher.pt")["extra"].get("teacher_bn_stats", "unknown")
    print(
        f"      teacher.pt holds {stats} BatchNorm statistics (ssl.teacher_bn_recalibration={cfg.ssl.teacher_bn_recalibration})"
    )

    print(f"[2/3] segmenting {data / 'test/images'} with the EMA teacher -> {out / 'pred'}")
    results, summary = segment_and_score(
        out,
        data / "test" / "images",
        data / "test" / "labels",
        out / "pred",
        png_dir=out / "png",
        csv=out / "test_scores.csv",
        overwrite=True,
        progress=False,
    )
    failed = [r for r in results if r.status == "failed"]
    print(f"[3/3] test set: Dice of the teacher's masks against {data / 'test/labels'}")
    print(summary.table())
    for line in summary.problems:
        print(f"problem: {line}")
    print(f"\npictures: {out / 'png'}   per-case scores: {out / 'test_scores.csv'}   masks: {out / 'pred'}")
    print(
        f"time: training {trained - start:.0f} s, inference+evaluation {time.perf_counter() - trained:.0f} s; peak RSS {_peak_rss_mib():.0f} MiB"
    )
    return 1 if failed or summary.problems else 0


if __name__ == "__main__":
    sys.exit(main())
