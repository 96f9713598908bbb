"""The ``medeman`` command: one sub-command per job, each the same as its ``scripts/*.py``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "check-data": ("medeman.check_data", "check a labeled/unlabeled cohort and print a table"),
    "plan": ("medeman.plan", "fingerprint a cohort and write the training recipe it calls for (plan.yaml)"),
    "train": ("medeman.train", "train a mean teacher with EMAN (or a baseline)"),
    "infer": ("medeman.infer", "segment scans with a trained EMA teacher"),
    "evaluate": ("medeman.evaluate", "Dice, HD95 and surface distance of predictions against labels"),
    "tune": ("medeman.tune", "tune EMA momentum and consistency weight with Optuna"),
    "rank": ("medeman.rank", "rank unlabeled scans for annotation by the teacher's doubt"),
    "export": ("medeman.export", "the teacher as a MONAI bundle, ONNX or TorchScript model"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``medeman COMMAND ...`` to the command's ``main``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: medeman COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
