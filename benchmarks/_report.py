"""Helpers the experiment scripts in this folder share for their result files (not a benchmark itself).

The scripts import it as ``from _report import ...``: Python puts a script's own folder first on
``sys.path``. Only medeman's public API is used here, as in the scripts.
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

NOTES_MARKER = "<!-- notes: text below this line is kept when the table is regenerated -->"


def mean_std(values: list[float], digits: int = 3) -> str:
    """``"mean ± sample std"`` of ``values``; NaN (an undefined score, e.g. precision with nothing predicted) left out, "–" if none is left."""
    values = [v for v in values if v == v]
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def hardware() -> str:
    """CPU model, cores, torch version and threads of this process."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU only"


def commit() -> str:
    """The short commit of the checkout medeman is imported from, ``+dirty`` with changes under ``medeman/``; ``"unknown"`` outside git."""
    import medeman

    root = Path(medeman.__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "medeman"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def code_version() -> str:
    """:func:`commit` in words, with the checkout's path."""
    import medeman

    root = Path(medeman.__file__).resolve().parents[1]
    version = commit()
    if version == "unknown":
        return f"medeman from {root} (not a git checkout)"
    head, _, dirty = version.partition("+")
    return f"medeman at commit `{head}`{' with local changes' if dirty else ''} ({root})"


def parse_grid(specs: list[str]) -> list[list[str]]:
    """``["a.b=1,10", "c.d=null,0.9"]`` -> every combination as ``--set`` lists."""
    axes = []
    for spec in specs:
        if "=" not in spec:
            raise SystemExit(f"--grid {spec!r}: expected KEY=V1,V2,...")
        key, values = spec.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)]


def grid_tag(sets: list[str]) -> str:
    """A folder name for one grid point: ``["ssl.fixmatch_threshold=0.7"]`` -> ``"fixmatch_threshold-0.7"``."""
    parts = []
    for item in sets:
        key, _, value = item.partition("=")
        parts.append(f"{key.split('.')[-1]}-{value}")  # the key's last part: a value's own dots stay
    return "_".join(parts)


def notes_below(md_path: Path) -> str | None:
    """The hand-written text below :data:`NOTES_MARKER` in an existing report (kept when it is regenerated); ``None``
    when there is no such file or marker."""
    old = Path(md_path).read_text(encoding="utf-8") if Path(md_path).is_file() else ""
    return old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else None
