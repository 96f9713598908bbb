"""``medeman check-data``: print a table of a cohort, every file left out of the unlabeled scans and why, and every problem; exit 1 if there is any problem.

Usage::

    python scripts/check_data.py --labeled DIR [--unlabeled DIR] [--val DIR] [--test DIR] [--config FILE ...]
    python scripts/check_data.py --scans DIR [--config FILE ...]     # scans to segment, DICOM series too
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable

from medeman.cases import case_volume, find_cases, one_line
from medeman.classes import class_names
from medeman.config import ConfigError, load_config, read_yaml
from medeman.data.checks import CaseReport, gather_cohort, inspect_case
from medeman.data.discovery import image_entry
from medeman.typed_config import Config, as_config

COLUMNS = ("set", "case", "shape", "spacing (mm)", "orient", "intensity", "classes (voxels)", "status")


def _row(part: str, r: CaseReport, names: dict[int, str] | None = None) -> tuple[str, ...]:
    shape = "x".join(map(str, r.shape)) + (f" c{r.channels}" if r.channels > 1 else "") if r.shape else "-"
    spacing = "x".join(f"{s:.2f}" for s in r.spacing) if r.spacing else "-"
    intensity = f"{r.intensity[0]:.6g}..{r.intensity[1]:.6g}" if r.intensity else "-"
    classes = " ".join(f"{(names or {}).get(k, k)}:{v}" for k, v in sorted(r.classes.items())) if r.classes else "-"
    status = "ok" if not r.problems else f"{len(r.problems)} problem(s)"
    return part, r.id, shape, spacing, r.orientation, intensity, classes, status


def format_table(rows: Iterable[tuple[str, ...]]) -> str:
    """Left-aligned plain-text table with a header row."""
    rows = [COLUMNS, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _check_scans(folder: str, cfg: Config) -> int:
    """Check the scans ``medeman infer`` would segment in ``folder``: a table row each, then every problem; 0 when clean."""
    skipped: list[str] = []
    try:
        cases, problems = find_cases(folder, cfg.data.in_channels, skipped=skipped)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rows = []
    for case in cases:
        try:
            files = case_volume(case)
        except Exception as err:  # an unreadable series is named, the others still checked
            problems.append(f"{case.source}: cannot read: {one_line(err)}")
            continue
        report = inspect_case(
            {"id": case.case_id, "image": image_entry(files)},
            cfg.data.num_classes,
            cfg.data.in_channels,
        )
        rows.append(_row("scans", report))
        # a DICOM series' volume is a temporary file: messages name the series
        problems += [p.replace(str(files[0]), case.source) for p in report.problems]
    print(format_table(rows))
    print(f"\n{len(rows)} scan(s) in {folder}")
    if skipped:
        print(f"\n{len(skipped)} DICOM series skipped:")
        print("\n".join(f"  {line}" for line in skipped))
    if problems:
        print(f"\n{len(problems)} problem(s):")
        print("\n".join(problems))
        return 1
    print("\nno problems found")
    return 0


def _declares_num_classes(configs: list[str], sets: list[str]) -> bool:
    if any(item.split("=", 1)[0].strip() == "data.num_classes" for item in sets):
        return True
    for path in configs:
        raw = read_yaml(path)
        if isinstance(raw, dict) and isinstance(raw.get("data"), dict) and "num_classes" in raw["data"]:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Check the cohort; return 0 when clean, 1 when any problem was found, 2 on a bad config."""
    parser = argparse.ArgumentParser(prog="medeman check-data", description=__doc__.splitlines()[0])
    parser.add_argument("--labeled", help="labeled folder (images/ + labels/) or Decathlon/nnU-Net dataset root")
    parser.add_argument(
        "--scans",
        help="folder of scans to segment (as medeman infer reads it: image files, or DICOM "
        "files, each series one scan); checked, every broken or skipped series named",
    )
    parser.add_argument(
        "--unlabeled",
        help="folder of unlabeled scans, searched recursively (label folders, labeled/validation/test cases and copies of them are left out)",
    )
    parser.add_argument("--val", help="labeled validation folder")
    parser.add_argument(
        "--test",
        help="test cohort (images/ + labels/, or a folder of images): checked, and never used as unlabeled scans",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML config (repeatable); uses data.num_classes (if not set, the classes found are reported) and data.in_channels",
    )
    parser.add_argument(
        "--set", action="append", default=[], dest="sets", metavar="SECTION.KEY=VALUE", help="config override"
    )
    args = parser.parse_args(argv)
    if args.labeled is None and args.scans is None:
        parser.error("give --labeled (a training cohort) or --scans (scans to segment)")
    try:
        cfg = load_config(args.config, args.sets)
        declared = _declares_num_classes(args.config, args.sets)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.scans is not None:
        code = _check_scans(args.scans, as_config(cfg))
        if args.labeled is None:
            return code
        print()
    if not declared:  # check label values for integers >= 0 only, then report the classes found
        cfg["data"]["num_classes"] = 2**31  # written into the dict, then checked and frozen
    cfg = as_config(cfg)
    cohort = gather_cohort(cfg, args.labeled, args.unlabeled, args.val, args.test)
    parts = [
        ("labeled", cohort.labeled),
        ("val", cohort.val),
        ("test", cohort.test if args.test else None),
        ("unlabeled", cohort.unlabeled if args.unlabeled else None),
    ]
    parts = [(part, cases) for part, cases in parts if cases is not None]
    rows, classes = [], set()
    for part, _ in parts:
        for report in cohort.reports.get(part, []):
            rows.append(_row(part, report, class_names(cfg)))
            classes.update(report.classes)
    print(format_table(rows))
    counts = ", ".join(f"{len(cases)} {part}" for part, cases in parts)
    print(f"\n{counts} case(s); data.in_channels={cfg.data.in_channels}")
    if declared:
        print(f"data.num_classes={cfg.data.num_classes}")
    elif classes:
        n = max(classes) + 1
        missing = sorted(set(range(n)) - classes)
        print(
            f"label classes found: {', '.join(map(str, sorted(classes)))}; set data.num_classes: {n} in your config"
            + (f" (classes {', '.join(map(str, missing))} never appear)" if missing else "")
        )
    left_out = [f for f in cohort.flagged if f.excluded]
    warned = [f for f in cohort.flagged if not f.excluded]
    if left_out:
        print(f"\n{len(left_out)} file(s) left out of the unlabeled scans:")
        print("\n".join(f"  {f.file}: {f.reason}" for f in left_out))
    if warned:
        print(f"\n{len(warned)} file(s) used as unlabeled scans, with a warning:")
        print("\n".join(f"  {f.file}: {f.reason}" for f in warned))
    if args.unlabeled:
        print("\n" + cohort.summary().replace("; medeman check-data lists each file and why", ""))
    problems = cohort.problems
    if problems:
        print(f"\n{len(problems)} problem(s):")
        print("\n".join(problems))
        return 1
    print("\nno problems found")
    return 0
