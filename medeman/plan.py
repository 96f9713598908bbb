"""``medeman plan``: fingerprint a cohort and write the recipe it calls for as ``plan.yaml``.

    medeman plan --labeled L [--unlabeled U] [--device cpu|gpu] [--memory-gb N] [--time-budget 30m] --out plan.yaml

The fingerprint is cached as ``fingerprint.json`` beside ``plan.yaml``; the plan loads with
``medeman train --config plan.yaml`` (see :mod:`medeman.planning` for the rules).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from medeman.config import ConfigError


def default_device() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def plan_cohort(
    labeled: str | Path,
    unlabeled: str | Path | None,
    plan_path: str | Path,
    *,
    device: str | None = None,
    memory_gb: float | None = None,
    time_budget: str | float | None = None,
):
    """Fingerprint ``labeled`` (+ ``unlabeled``), plan, and write ``plan_path`` and ``fingerprint.json`` beside it.

    Returns:
        The :class:`~medeman.planning.Plan`. Raises ConfigError on a bad time budget, DataError on bad data.
    """
    from medeman.fingerprint import fingerprint_cohort
    from medeman.planning import make_plan, parse_duration

    try:
        budget = parse_duration(time_budget) if time_budget is not None else None
    except ValueError as err:
        raise ConfigError(f"--time-budget: {err}") from None
    plan_path = Path(plan_path)
    fingerprint = fingerprint_cohort(labeled, unlabeled, cache=plan_path.parent / "fingerprint.json")
    plan = make_plan(
        fingerprint["summary"],
        device=device or default_device(),
        memory_gb=memory_gb,
        time_budget_s=budget,
        has_unlabeled=unlabeled is not None,
    )
    plan_path.write_text(plan.to_yaml(), encoding="utf-8")
    return plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medeman plan",
        description="Fingerprint a cohort (spacing, shapes, intensities, classes, components) and write the training recipe it calls for.",
    )
    parser.add_argument(
        "--labeled",
        required=True,
        help="labeled cohort: images/ + labels/, an MSD dataset.json, or an nnU-Net raw folder",
    )
    parser.add_argument(
        "--unlabeled",
        help="folder of unlabeled scans (their spacing and shape count; the plan then trains a mean teacher)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "gpu"), help="plan for this device (default: gpu if one is present)"
    )
    parser.add_argument(
        "--memory-gb", type=float, help="memory for one training step's activations (default: 8 on a GPU, 4 on a CPU)"
    )
    parser.add_argument(
        "--time-budget",
        help="fit the run in this time, e.g. 900, 15m, 1h30m: candidate recipes are timed for a few steps",
    )
    parser.add_argument(
        "--out", default="plan.yaml", help="plan file to write (default: plan.yaml); fingerprint.json goes beside it"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``medeman plan``."""
    from medeman.data import DataError

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise ConfigError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        if args.memory_gb is not None and args.memory_gb <= 0:
            raise ConfigError(f"--memory-gb: {args.memory_gb} must be positive")
        out.parent.mkdir(parents=True, exist_ok=True)
        plan = plan_cohort(
            args.labeled,
            args.unlabeled,
            out,
            device=args.device,
            memory_gb=args.memory_gb,
            time_budget=args.time_budget,
        )
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.summary())
    print(
        f"plan: {out} (fingerprint: {out.parent / 'fingerprint.json'}); train with: medeman train --labeled {args.labeled} --config {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
