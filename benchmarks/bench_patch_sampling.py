"""How often does a training patch see the lesion? Labeled and unlabeled patch samplers on the lesion cohort, and the teacher focus's cost.

Three measurements, no training:

1. labeled patches: the share holding at least one lesion voxel (and the lesion voxels per patch)
   for the former ``RandCropByPosNegLabeld`` (pos 0.67, any label is foreground), the class-aware
   nnU-Net rule (``data.fg_class_fraction`` 0.33, the default) and explicit ``data.class_ratios``;
2. unlabeled patches: random crops against teacher-focused crops (``data.unlabeled_focus_fraction``
   0.5, focus class 3) with an *oracle* teacher (the scans' ground truth as its prediction): the
   upper bound of what the focus can do; a real teacher finds fewer lesions;
3. cost: one ``TeacherFocus.refresh`` over the unlabeled scans with the recipe's network (teacher
   passes, sliding window without overlap), against one training step's three network passes.

    python scripts/make_sample_data.py --out /tmp/lesion --lesions --labeled 3 --val 3 --unlabeled 24 --test 0 --unlabeled-labels
    python benchmarks/bench_patch_sampling.py --cohort /tmp/lesion --config configs/lesion.yaml --threads 1
    python benchmarks/bench_patch_sampling.py --cohort /tmp/lesion --config configs/lesion.yaml --threads 1 --set 'data.patch_size=[16,16,16]'
    python benchmarks/bench_patch_sampling.py --smoke      # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def cached(chain, case: dict) -> dict:
    """The deterministic prefix of a training chain applied to ``case`` (what CacheDataset keeps)."""
    from monai.transforms import RandomizableTrait

    out = dict(case)
    for t in chain.transforms[: chain.get_index_of_first(lambda t: isinstance(t, RandomizableTrait))]:
        out = t(out)
    return out


def lesion_share(sampler, volumes: list[dict], draws: int, lesion: int, seed: int = 0) -> tuple[float, float]:
    """Share of ``draws`` patches per volume holding a lesion voxel, and mean lesion voxels per patch."""
    sampler.set_random_state(seed=seed)
    hits, voxels = [], []
    for volume in volumes:
        for _ in range(draws):
            out = sampler(copy.copy(volume))
            out = out[0] if isinstance(out, list) else out
            n = int((out["label"] == lesion).sum())
            hits.append(n > 0)
            voxels.append(n)
    return float(np.mean(hits)), float(np.mean(voxels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, default=None, help="made with --lesions --unlabeled-labels (and --val)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "lesion.yaml")
    parser.add_argument("--draws", type=int, default=400, help="patches per scan and sampler")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lesion", type=int, default=3, help="the lesion's label value")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. data.patch_size=[16,16,16]")
    parser.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="a trained teacher.pt (preprocessed as --config): its focus beside the oracle's",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny generated cohort, 16^3 patches, a two-level UNet as (untrained) teacher, few draws: checks that it runs",
    )
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="bench-patch-sampling-") as tmp:
            smoke(args, Path(tmp))
        return
    if args.cohort is None:
        parser.error("--cohort is required (or --smoke)")
    run(args)


def smoke(args: argparse.Namespace, tmp: Path) -> None:
    """The whole benchmark on a generated 2 + 1 + 2 scan lesion cohort, in seconds."""
    from medeman.checkpoint import save_teacher
    from medeman.config import load_config
    from medeman.nets import build_network
    from medeman.sample_data import make_cohort

    args.cohort = make_cohort(
        tmp / "cohort", n_labeled=2, n_unlabeled=2, n_test=0, n_val=1, unlabeled_labels=True, lesions=True
    )
    args.set = ["data.patch_size=[16,16,16]", "model.channels=[4,8]", "model.num_res_units=1"]
    args.draws, args.threads = 8, 1
    cfg = load_config([args.config], sets=args.set)
    args.teacher = tmp / "teacher.pt"
    save_teacher(args.teacher, build_network(cfg), cfg, step=0)
    run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)

    from monai.transforms import Compose, FgBgToIndicesd, RandCropByPosNegLabeld

    from medeman.config import load_config
    from medeman.data import SSLDataModule
    from medeman.data.discovery import discover_labeled
    from medeman.data.sampling import FocusCentres, RandClassCropd, RandFocusCropd
    from medeman.data.transforms import labeled_transforms
    from medeman.nets import build_network
    from medeman.schedules import run_schedule
    from medeman.teacher_focus import TeacherFocus, focus_centres

    cfg = load_config([args.config], sets=args.set)
    data = cfg["data"]
    patch, C = [int(s) for s in data["patch_size"]], int(data["num_classes"])
    problems: list[str] = []
    cases = discover_labeled(args.cohort / "labeled", cfg, problems) + discover_labeled(
        args.cohort / "val", cfg, problems
    )
    chain = labeled_transforms(cfg)
    volumes = [cached(chain, case) for case in cases]
    share = np.mean([float((v["label"] == args.lesion).float().mean()) for v in volumes])
    print(
        f"{len(volumes)} labeled scans, cached at {list(volumes[0]['label'].shape[1:])} voxels, patch {patch}; "
        f"lesion = {100 * share:.3f} % of the voxels"
    )

    keys = ["image", "label"]
    posneg = Compose(
        [
            FgBgToIndicesd("label"),
            RandCropByPosNegLabeld(
                keys,
                "label",
                patch,
                pos=0.67,
                neg=0.33,
                num_samples=1,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
        ]
    )
    samplers = {
        "RandCropByPosNegLabeld, pos 0.67 (before)": posneg,
        "class-aware, fg_class_fraction 0.33 (default)": RandClassCropd(keys, patch, C, fg_fraction=0.33),
        "class-aware, fg_class_fraction 0.5": RandClassCropd(keys, patch, C, fg_fraction=0.5),
        f"class_ratios {[1, 1, 1, 3][:C]}": RandClassCropd(keys, patch, C, ratios=[1, 1, 1, 3][:C]),
    }
    print("\n| labeled sampler | patches with lesion | lesion voxels / patch |\n|---|---:|---:|")
    for name, sampler in samplers.items():
        hit, vox = lesion_share(sampler, volumes, args.draws, args.lesion)
        print(f"| {name} | {100 * hit:.1f} % | {vox:.1f} |")

    # unlabeled: the scans with their ground truth in the cached (cropped, padded) frame
    unlabeled = sorted(p for p in (args.cohort / "unlabeled").iterdir())
    truth = {p.name.split(".")[0]: p for p in (args.cohort / "unlabeled_labels").iterdir()}
    pairs = [
        {"image": str(p), "label": str(truth[p.name.split(".")[0]])} for p in unlabeled if p.name.split(".")[0] in truth
    ]
    volumes = [cached(chain, case) for case in pairs]
    focus = FocusCentres(len(volumes))
    rand = np.random.RandomState(0)
    for i, volume in enumerate(volumes):
        volume.pop("label_cls_indices", None)
        volume["case_index"] = i
        focus.set(
            i,
            focus_centres(
                volume["label"][0].long(), [args.lesion], focus.capacity, int(data["unlabeled_focus_stride"]), rand
            ),
        )
    print(
        f"\n| unlabeled sampler ({len(volumes)} scans) | patches with lesion | lesion voxels / patch |\n|---|---:|---:|"
    )
    for fraction in (0.0, 0.5):
        hit, vox = lesion_share(RandFocusCropd(keys, patch, focus, fraction), volumes, args.draws // 4, args.lesion)
        print(
            f"| unlabeled_focus_fraction {fraction}{' (oracle teacher)' if fraction else ''} | {100 * hit:.1f} % | {vox:.1f} |"
        )
    if args.teacher is not None:
        from types import SimpleNamespace

        from medeman.checkpoint import load_teacher

        teacher = load_teacher(args.teacher)[0]
        learned = FocusCentres(len(volumes))
        stand_in = SimpleNamespace(
            focus=learned, num_unlabeled=len(volumes), preprocessed_unlabeled=lambda i: volumes[i]["image"]
        )
        cfg_teacher = load_config([args.config], sets=[*args.set, f"data.unlabeled_focus_classes=[{args.lesion}]"])
        seconds, focused = TeacherFocus(cfg_teacher).refresh(stand_in, teacher, torch.device("cpu"))
        on_lesion = [
            bool(volumes[i]["label"][0][tuple(c)] == args.lesion)
            for i in range(len(volumes))
            for c in learned.centres[i, : int(learned.counts[i])].tolist()
        ]
        hit, vox = lesion_share(RandFocusCropd(keys, patch, learned, 0.5), volumes, args.draws // 4, args.lesion)
        print(f"| unlabeled_focus_fraction 0.5 (teacher {args.teacher}) | {100 * hit:.1f} % | {vox:.1f} |")
        print(
            f"\nthat teacher predicts the lesion in {focused} of {len(volumes)} unlabeled scans; "
            f"{100 * np.mean(on_lesion) if on_lesion else float('nan'):.1f} % of its centres lie on true lesion voxels ({seconds:.1f} s)"
        )

    # cost: one refresh over the unlabeled scans against one training step's passes
    root = args.cohort
    cfg_focus = load_config(
        [args.config],
        sets=[*args.set, "ssl.method=mean_teacher", "data.unlabeled_focus_fraction=0.5", "data.num_workers=0"],
    )
    dm = SSLDataModule(cfg_focus, root / "labeled", root / "unlabeled", val=root / "val")
    dm.setup("fit")
    teacher = build_network(cfg_focus)
    refresh = TeacherFocus(cfg_focus)
    seconds = [refresh.refresh(dm, teacher, torch.device("cpu"))[0] for _ in range(2)]
    student = build_network(cfg_focus)
    optimizer = torch.optim.AdamW(student.parameters())
    b = int(data["batch_size_labeled"]) + int(data["batch_size_unlabeled"])
    x = torch.randn(b, int(data["in_channels"]), *patch)
    steps = []
    for _ in range(6):
        start = time.perf_counter()
        loss = student(x).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            teacher(x[: int(data["batch_size_unlabeled"])])
        steps.append(time.perf_counter() - start)
    step = statistics.median(steps[1:])
    every = run_schedule(cfg_focus).focus_every_steps
    print(
        f"\nrefresh of {len(dm.unlabeled_cases)} unlabeled scans: {min(seconds):.2f} s; one step's network passes: {step:.3f} s "
        f"({args.threads} thread(s)); every {every} steps the refresh adds {min(seconds) / every:.4f} s per step "
        f"= {100 * min(seconds) / every / step:.1f} % of a step"
    )


if __name__ == "__main__":
    main()
