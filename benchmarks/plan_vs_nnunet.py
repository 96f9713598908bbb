"""medeman's plan beside nnU-Net v2's, on the same cohorts.

    .venv/bin/python -m pip install -e ".[bench]"       # nnunetv2, for this script only
    .venv/bin/python -m pip uninstall -y torchvision     # PyPI's CUDA torchvision breaks a CPU torch; the planner does not need it
    .venv/bin/python benchmarks/plan_vs_nnunet.py

For each cohort (``sample_data/labeled`` and the lesion sample cohort, made here with
``python scripts/make_sample_data.py --lesions``), the script writes an nnU-Net v2 raw dataset
(``imagesTr/<case>_0000.nii.gz``, ``labelsTr``, ``dataset.json``) in a temporary folder, runs
nnU-Net's fingerprint extractor and ``ExperimentPlanner`` (default 8 GB GPU target) in-process,
and medeman's fingerprint and planner (``--device gpu --memory-gb 8`` and ``--device cpu``), and
prints the decisions side by side. nnU-Net lists axes as (z, y, x); they are turned to medeman's
(x, y, z) here. ``benchmarks/results/plan_vs_nnunet.md`` holds its output and why the plans differ. Without
nnunetv2 installed, only medeman's plans are printed. ``--smoke``: a 2-case cohort, temporary files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_lesion_cohort(out: Path, labeled: int) -> Path:
    from medeman.sample_data import main as make_sample_data

    make_sample_data(
        ["--out", str(out), "--lesions", "--labeled", str(labeled), "--unlabeled", "0", "--test", "0", "--seed", "11"]
    )
    return out / "labeled"


def make_organ_cohort(out: Path, labeled: int) -> Path:
    from medeman.sample_data import main as make_sample_data

    make_sample_data(["--out", str(out), "--labeled", str(labeled), "--unlabeled", "0", "--test", "0"])
    return out / "labeled"


def nnunet_raw(labeled: Path, root: Path, dataset_id: int, name: str, num_classes: int) -> str:
    """Copy a medeman labeled folder into an nnU-Net v2 raw dataset; return its folder name."""
    from medeman.data.discovery import discover_labeled

    folder = f"Dataset{dataset_id:03d}_{name}"
    images, labels = root / folder / "imagesTr", root / folder / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    cases = discover_labeled(labeled)
    for case in cases:
        image = case["image"][0] if isinstance(case["image"], list) else case["image"]
        shutil.copy(image, images / f"{case['id']}_0000.nii.gz")
        shutil.copy(case["label"], labels / f"{case['id']}.nii.gz")
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{f"class{c}": c for c in range(1, num_classes)}},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (root / folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    return folder


def nnunet_plan(labeled: Path, work: Path, dataset_id: int, name: str, num_classes: int) -> dict | None:
    """nnU-Net v2's 3d_fullres plan of ``labeled`` (axes turned to x, y, z), or None without nnunetv2."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(key, str(work / key))
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    try:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    except ImportError:
        return None
    folder = nnunet_raw(labeled, Path(os.environ["nnUNet_raw"]), dataset_id, name, num_classes)
    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=False, clean=True, verbose=False)
    plan_experiments([dataset_id])
    plans = json.loads((Path(os.environ["nnUNet_preprocessed"]) / folder / "nnUNetPlans.json").read_text())
    full = plans["configurations"]["3d_fullres"]
    arch = full["architecture"]["arch_kwargs"]
    fingerprint = json.loads(
        (Path(os.environ["nnUNet_preprocessed"]) / folder / "dataset_fingerprint.json").read_text()
    )
    intensity = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    return {
        "spacing (mm)": [round(s, 2) for s in full["spacing"][::-1]],
        "patch (voxels)": full["patch_size"][::-1],
        "batch": full["batch_size"],
        "network": f"{full['architecture']['network_class_name'].rsplit('.', 1)[-1]}, {arch['n_stages']} stages, "
        f"features {arch['features_per_stage'][0]}-{arch['features_per_stage'][-1]}, "
        f"{arch['norm_op'].rsplit('.', 1)[-1]}",
        "strides": " ".join("x".join(str(v) for v in s[::-1]) for s in arch["strides"]),
        "normalisation": f"{full['normalization_schemes'][0]} (clip {intensity['percentile_00_5']:.0f}..{intensity['percentile_99_5']:.0f})",
        "class sampling": "1/3 of each batch centred on a random foreground class (oversample_foreground_percent 0.33)",
        "loss": "Dice (batch Dice: " + str(full.get("batch_dice")) + ") + CE, deep supervision",
        "steps": "1000 epochs x 250 = 250 000",
    }


def medeman_plan(labeled: Path, device: str) -> dict:
    from medeman.fingerprint import fingerprint_cohort
    from medeman.planning import make_plan

    plan = make_plan(fingerprint_cohort(labeled)["summary"], device=device, memory_gb=8.0 if device == "gpu" else None)
    channels = plan.get("model", "channels")
    ratios = plan.get("data", "class_ratios")
    window = plan.get("data", "intensity_window")
    return {
        "spacing (mm)": plan.get("data", "spacing"),
        "patch (voxels)": plan.get("data", "patch_size"),
        "batch": plan.get("data", "batch_size_labeled"),
        "network": f"MONAI UNet, {len(channels)} levels, features {channels[0]}-{channels[-1]}, BatchNorm",
        "strides": " ".join(["2x2x2"] * (len(channels) - 1)),
        "normalisation": f"{plan.get('data', 'modality')} window {window[0]:.0f}..{window[1]:.0f} to [0, 1]"
        if window
        else "MR z-score per scan",
        "class sampling": f"class_ratios {ratios}"
        if ratios
        else "1/3 of patches centred on a random foreground class (fg_class_fraction 0.33)",
        "loss": "Dice (batch Dice) + CE"
        + (f", CE weights {plan.get('train', 'ce_class_weights')}" if plan.get("train", "ce_class_weights") else ""),
        "steps": str(plan.get("train", "max_steps")),
    }


def table(name: str, columns: dict[str, dict | None]) -> str:
    present = {k: v for k, v in columns.items() if v is not None}
    rows = [f"### {name}", "", "| | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for key in next(iter(present.values())):
        rows.append(f"| {key} | " + " | ".join(str(v[key]) for v in present.values()) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="2-case cohorts in a temporary folder; nothing written to results/"
    )
    parser.add_argument("--lesion-cases", type=int, default=12, help="labeled cases of the lesion sample cohort")
    args = parser.parse_args(argv)
    from medeman.fingerprint import fingerprint_cohort

    sections = []
    with tempfile.TemporaryDirectory(prefix="plan_vs_nnunet-") as tmp:
        work = Path(tmp)
        if args.smoke:
            cohorts = {
                "organs (2 cases)": make_organ_cohort(work / "organs", 2),
                "lesions (2 cases)": make_lesion_cohort(work / "lesions", 2),
            }
        else:
            cohorts = {
                "sample_data (organs, 6 cases)": REPO / "sample_data" / "labeled",
                f"lesion sample cohort ({args.lesion_cases} cases, seed 11)": make_lesion_cohort(
                    work / "lesions", args.lesion_cases
                ),
            }
        nnunet_missing = False
        for i, (name, labeled) in enumerate(cohorts.items()):
            num_classes = fingerprint_cohort(labeled)["summary"]["num_classes"]
            nnunet = nnunet_plan(labeled, work, 900 + i, f"cohort{i}", num_classes)
            nnunet_missing |= nnunet is None
            sections.append(
                table(
                    name,
                    {
                        "nnU-Net v2 3d_fullres": nnunet,
                        "medeman --device gpu (8 GB)": medeman_plan(labeled, "gpu"),
                        "medeman --device cpu": medeman_plan(labeled, "cpu"),
                    },
                )
            )
    report = "\n\n".join(sections)
    print(report)
    if nnunet_missing:
        print(
            "\nnnU-Net v2 is not installed here (pip install -e '.[bench]'): only medeman's plans are shown.",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
