"""Time ``medeman infer`` on one 160^3 CT-like scan against the bare sliding-window compute it wraps.

The scan is a torso phantom of :mod:`medeman.sample_data` rendered on a 160^3 grid with
anisotropic voxels (``--scan-spacing``) in a tilted-gantry LPS orientation, so reorientation,
resampling to the model's spacing and the inversion back are real work. The model is a
sample-sized UNet (``configs/sample.yaml``, untrained: weights do not change the timing) saved with
``save_teacher``; ``--model-spacing`` sets its ``data.spacing``.

    end to end     ``infer_cases(teacher.pt, scan, out)``: load model and scan, preprocess, sliding
                   window, ``Invertd`` to the scan's grid, argmax, write ``.nii.gz``
    bare compute   ``monai.inferers.sliding_window_inference`` on the already preprocessed tensor,
                   same window, overlap, batch and Gaussian blending (with ``--tta``: the same 8
                   mirrorings averaged inside the predictor)

Both are timed ``--repeats`` times after one warm-up; medians are reported, with the end-to-end
time split into its stages (the same calls ``infer_cases`` makes, timed one by one) and the peak
RSS of the process.

    python benchmarks/bench_infer.py --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024.0 if sys.platform != "darwin" else 1024.0 ** 2)


def make_scan(path: Path, size: int, spacing: tuple[float, float, float], seed: int = 0) -> None:
    """Render a phantom scan of exactly ``size``^3 voxels, tilted-gantry LPS, at ``spacing`` mm."""
    from medeman import sample_data

    scanner = sample_data.Scanner("bench", (spacing,), "LPS-tilted", (8.0, 14.0), 0.6, (5.0, 20.0))
    default_fov = sample_data.FIELD_OF_VIEW_MM
    sample_data.FIELD_OF_VIEW_MM = tuple(size * s for s in spacing)  # make_case sizes its grid from this field of view
    try:
        image, label, affine = sample_data.make_case(np.random.default_rng(seed), scanner)
    finally:
        sample_data.FIELD_OF_VIEW_MM = default_fov
    # make_case jitters field of view and spacing by a few percent: crop or pad (air) at the far end, the affine still holds
    fitted = np.full((size,) * 3, -1024, dtype=image.dtype)
    common = tuple(slice(0, min(size, n)) for n in image.shape)
    fitted[common] = image[common]
    sample_data._write(fitted, affine, path)


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement after one warm-up (the median is reported)")
    parser.add_argument("--size", type=int, default=160, help="scan side in voxels")
    parser.add_argument("--scan-spacing", type=float, nargs=3, default=(1.0, 1.0, 2.0), help="scan voxel size in mm")
    parser.add_argument("--model-spacing", type=float, nargs=3, default=(1.5, 1.5, 1.5), help="the model's data.spacing in mm")
    parser.add_argument("--tta", choices=("off", "on", "both"), default="both", help="test-time augmentation (8 mirrorings)")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32", help="inference precision")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: see benchmarks/README.md)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (e.g. infer.overlap=0.5)")
    args = parser.parse_args(argv)

    from medeman.config import load_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spacing = ",".join(str(s) for s in args.model_spacing)
    cfg = load_config([REPO / "configs" / "sample.yaml"], [f"data.spacing=[{spacing}]", f"infer.precision={args.precision}", *args.set])
    with tempfile.TemporaryDirectory(prefix="medeman-bench-infer-") as folder:
        run(args, cfg, Path(folder))


def run(args: argparse.Namespace, cfg: dict, tmp: Path) -> None:
    from medeman.checkpoint import save_teacher
    from medeman.data.readers import write_volume
    from medeman.infer import infer_cases, read_geometry
    from medeman.predict import invert_to_input, predict_volume
    from medeman.labels import argmax_labels
    from medeman.nets import build_network
    from medeman.data.transforms import preprocessing

    infer = cfg["infer"]
    roi = [int(s) for s in cfg["data"]["patch_size"]]
    scan = tmp / "scan.nii.gz"
    make_scan(scan, args.size, tuple(args.scan_spacing))
    net = build_network(cfg).eval()
    save_teacher(tmp / "teacher.pt", net, cfg, step=0)
    transform = preprocessing(cfg, keys=("image",))
    image = transform({"image": str(scan)})["image"]
    x = image.as_tensor()[None].float()
    shape, _ = read_geometry(scan)
    print(f"scan {shape} voxels at {tuple(args.scan_spacing)} mm, tilted-gantry LPS; model spacing {tuple(args.model_spacing)} mm "
          f"-> preprocessed {tuple(x.shape[2:])}; UNet channels={cfg['model']['channels']}, window {roi}, overlap {infer['overlap']}, "
          f"sw_batch_size {infer['sw_batch_size']}, precision {args.precision}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU")
    print(f"median of {args.repeats} runs after one warm-up\n")

    dtype = torch.bfloat16 if args.precision == "bf16" else None
    rows = []
    for tta in {"off": (False,), "on": (True,), "both": (False, True)}[args.tta]:
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if tta else [()]

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            total = torch.zeros(())
            for dims in flips:
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    logits = net(patch.flip(dims) if dims else patch)
                probs = torch.softmax(logits.float(), dim=1)
                total = total + (probs.flip(dims) if dims else probs)
            return total / len(flips)

        def bare() -> None:
            with torch.inference_mode():
                sliding_window_inference(x, roi, int(infer["sw_batch_size"]), predictor, float(infer["overlap"]), mode="gaussian")

        def end_to_end() -> None:
            with contextlib.redirect_stdout(io.StringIO()):  # infer_cases prints one line per case
                results = infer_cases(tmp / "teacher.pt", scan, tmp / "out", tta=tta, overwrite=True, progress=False)
            if results[0].status != "written":
                sys.exit(f"infer_cases failed: {results[0].message}")

        stages: dict[str, list[float]] = {"load + preprocess": [], "predict_volume": [], "invert": [], "argmax + write": []}

        def staged() -> None:  # the calls of infer._segment_case, one by one
            marks = [time.perf_counter()]
            img = transform({"image": str(scan)})["image"]
            marks.append(time.perf_counter())
            probs = predict_volume(net, img, cfg, tta)
            marks.append(time.perf_counter())
            probs = invert_to_input(probs, img, transform)
            marks.append(time.perf_counter())
            write_volume(argmax_labels(probs, dim=0).numpy(), scan, tmp / "staged.nii.gz", intent="label")
            marks.append(time.perf_counter())
            for name, a, b in zip(stages, marks, marks[1:]):
                stages[name].append(b - a)

        t_bare = median_s(bare, args.repeats)
        t_full = median_s(end_to_end, args.repeats)
        median_s(staged, args.repeats)
        rows.append((tta, t_bare, t_full, {k: statistics.median(v[1:]) for k, v in stages.items()}))

    header = f"{'tta':<4} {'bare sliding window s':>21} {'medeman infer s':>15} {'ratio':>6}   stages of medeman infer (s)"
    print(header)
    print("-" * len(header))
    for tta, t_bare, t_full, stage in rows:
        split = ", ".join(f"{k} {v:.2f}" for k, v in stage.items())
        print(f"{'on' if tta else 'off':<4} {t_bare:>21.2f} {t_full:>15.2f} {t_full / t_bare:>5.2f}x   {split}")
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB (whole benchmark process)")


if __name__ == "__main__":
    main()
