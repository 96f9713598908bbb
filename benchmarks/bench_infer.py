"""Time ``medeman infer`` on one 160^3 CT-like scan against the bare sliding-window compute it wraps.

The scan is a torso phantom of :mod:`medeman.sample_data` on a 160^3 grid with anisotropic voxels
(``--scan-spacing``) in a tilted-gantry LPS orientation, so reorientation, resampling to the
model's spacing and the inversion back are real work. The model is a sample-sized UNet
(``configs/sample.yaml``, or ``--config``; untrained: weights do not change the timing) saved with
``save_teacher``; ``--model-spacing`` sets its ``data.spacing``.

    end to end     ``infer_cases(teacher.pt, scan, out)``: load model and scan, preprocess, sliding
                   window, inversion to the scan's grid, argmax, write ``.nii.gz``
    bare compute   ``monai.inferers.sliding_window_inference`` on the already preprocessed tensor,
                   same network, window, overlap, batch and Gaussian blending (with ``--tta``: the
                   same 8 mirrorings averaged inside the predictor)

After one warm-up, the two are timed in turns (bare, end to end, staged; ``--repeats`` rounds) so
a load spike from another process hits both; medians are reported, the end-to-end time split into
its stages (the calls ``infer_cases`` makes, timed one by one). The mask is compared with the one
MONAI ``Invertd`` gives for the same probabilities (medeman's inversion before issue 15).

    python benchmarks/bench_infer.py --repeats 5 --threads 1
    python benchmarks/bench_infer.py --smoke          # a 24^3 scan, one round: checks that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024.0 if sys.platform != "darwin" else 1024.0**2)


def make_scan(path: Path, size: int, spacing: tuple[float, float, float], seed: int = 0) -> None:
    """Render a phantom scan of exactly ``size``^3 voxels, tilted-gantry LPS, at about ``spacing`` mm.

    ``make_case`` renders the phantom's field of view; the volume is tiled (``np.pad(mode="wrap")``)
    or cropped at the far end to ``size``^3, so the whole grid holds body-like content and the
    affine (voxel 0 unchanged) still holds.
    """
    from medeman.data.readers import write_volume
    from medeman.sample_data import Scanner, make_case

    scanner = Scanner("bench", (spacing,), "LPS-tilted", (8.0, 14.0), 0.6, (5.0, 20.0))
    image, _, affine = make_case(np.random.default_rng(seed), scanner)
    image = np.pad(image, [(0, max(0, size - n)) for n in image.shape], mode="wrap")[:size, :size, :size]
    write_volume(np.ascontiguousarray(image), affine, path)


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each function, after one warm-up each, timed in turns ``repeats`` times.

    CPU time (``time.process_time``, all threads of this process) is what a call costs whoever
    else runs on the machine; on an idle machine with one thread it equals the wall time.
    """
    for fn in fns.values():
        fn()  # warm-up: first-call allocations and kernel selection
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up (medians are reported)")
    parser.add_argument("--size", type=int, default=160, help="scan side in voxels")
    parser.add_argument("--scan-spacing", type=float, nargs=3, default=(1.0, 1.0, 2.0), help="scan voxel size in mm")
    parser.add_argument(
        "--model-spacing", type=float, nargs=3, default=(1.5, 1.5, 1.5), help="the model's data.spacing in mm"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "sample.yaml",
        help="the model's config (network, window, infer.*)",
    )
    parser.add_argument(
        "--tta", choices=("off", "on", "both"), default="both", help="test-time augmentation (8 mirrorings)"
    )
    parser.add_argument("--precision", choices=("32", "bf16"), default="32", help="inference precision")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: see benchmarks/README.md)")
    parser.add_argument(
        "--cases", type=int, default=4, help="also time a folder of this many scans (per scan; 0 or 1: skip)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (e.g. infer.overlap=0.5)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a 24^3 scan and one round with TTA off and on: checks that the benchmark runs, in seconds",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.repeats, args.scan_spacing, args.model_spacing, args.threads, args.cases = (
            24,
            1,
            (4.0, 4.0, 6.0),
            (5.0, 5.0, 5.0),
            1,
            2,
        )
        args.set = [
            *args.set,
            "model.channels=[4,8]",
            "model.num_res_units=0",
            "data.patch_size=[16,16,16]",
        ]  # tiny wins

    from medeman.config import load_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spacing = ",".join(str(s) for s in args.model_spacing)
    cfg = load_config([args.config], [f"data.spacing=[{spacing}]", f"infer.precision={args.precision}", *args.set])
    with tempfile.TemporaryDirectory(prefix="medeman-bench-infer-") as folder:
        run(args, cfg, Path(folder))


def run(args: argparse.Namespace, cfg: dict, tmp: Path) -> None:
    from monai.transforms import Invertd

    from medeman.checkpoint import save_teacher
    from medeman.data.transforms import preprocessing
    from medeman.data.readers import read_geometry, write_volume
    from medeman.infer import infer_cases
    from medeman.labels import argmax_labels, label_dtype
    from medeman.nets import build_network
    from medeman.predict import autocast_dtype, labels_on_input, predict_volume

    infer = cfg["infer"]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    roi = [int(s) for s in cfg["data"]["patch_size"]]
    scan = tmp / "scan.nii.gz"
    make_scan(scan, args.size, tuple(args.scan_spacing))
    net = build_network(cfg).eval().to(device)
    save_teacher(tmp / "teacher.pt", net, cfg, step=0)
    transform = preprocessing(cfg, keys=("image",))
    image = transform({"image": str(scan)})["image"]
    x = image.as_tensor()[None].float().to(device)
    shape, _ = read_geometry(scan)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"scan {shape} voxels at {tuple(args.scan_spacing)} mm, tilted-gantry LPS; model spacing {tuple(args.model_spacing)} mm "
        f"-> preprocessed {tuple(x.shape[2:])}; {cfg['model']['name']} channels={cfg['model']['channels']}, window {roi}, "
        f"overlap {infer['overlap']}, sw_batch_size {infer['sw_batch_size']}, precision {args.precision}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {where}"
    )
    print(f"medians of {args.repeats} interleaved rounds after one warm-up\n")

    dtype = autocast_dtype(args.precision, device)
    labels_dtype = label_dtype(int(cfg["data"]["num_classes"]))
    rows = []
    for tta in {"off": (False,), "on": (True,), "both": (False, True)}[args.tta]:
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if tta else [()]

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            total = torch.zeros((), device=patch.device)
            for dims in flips:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = net(patch.flip(dims) if dims else patch)
                probs = torch.softmax(logits.float(), dim=1)
                total = total + (probs.flip(dims) if dims else probs)
            return total / len(flips)

        def bare() -> None:
            with torch.inference_mode():
                sliding_window_inference(
                    x, roi, int(infer["sw_batch_size"]), predictor, float(infer["overlap"]), mode="gaussian"
                )
            sync()

        def run_infer(inputs: Path, out: Path) -> None:
            with contextlib.redirect_stdout(io.StringIO()):  # infer_cases prints one line per case
                results = infer_cases(
                    tmp / "teacher.pt", inputs, out, tta=tta, overwrite=True, progress=False, device=device
                )
            if any(r.status != "written" for r in results):
                sys.exit(f"infer_cases failed on {inputs}: {[r.message for r in results if r.message]}")

        def end_to_end() -> None:
            run_infer(scan, tmp / "out")

        stages: dict[str, list[float]] = {
            "load + preprocess": [],
            "predict_volume": [],
            "invert + argmax": [],
            "write": [],
        }

        def staged() -> None:  # the stages of medeman infer for one case, one by one
            marks = [time.perf_counter()]
            img = transform({"image": str(scan)})["image"]
            marks.append(time.perf_counter())
            probs = predict_volume(net, img, cfg, tta, device=device)
            sync()
            marks.append(time.perf_counter())
            labels = labels_on_input(probs, img, transform, labels_dtype)
            sync()
            marks.append(time.perf_counter())
            write_volume(labels.cpu().numpy(), scan, tmp / "staged.nii.gz", intent="label")
            marks.append(time.perf_counter())
            for name, a, b in zip(stages, marks, marks[1:]):
                stages[name].append(b - a)

        folder = tmp / "folder"
        for i in range(
            args.cases if args.cases > 1 else 0
        ):  # copies of the scan: a folder medeman infer reads ahead in and writes behind
            folder.mkdir(exist_ok=True)
            shutil.copyfile(scan, folder / f"scan{i}.nii.gz")

        def whole_folder() -> None:
            run_infer(folder, tmp / "folder_out")

        fns = {"bare": bare, "end to end": end_to_end, "staged": staged}
        if args.cases > 1:
            fns["folder"] = whole_folder
        times = interleaved_medians(fns, args.repeats)
        # the same probabilities through MONAI Invertd: how many voxels of the written mask differ
        probs = predict_volume(net, image, cfg, tta, device=device).cpu()
        reference = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)(
            {"image": image, "pred": MetaTensor(probs, affine=image.affine)}
        )["pred"]
        written = np.asarray(nib.load(str(tmp / "out" / "scan.nii.gz")).dataobj)
        differ = int((argmax_labels(torch.as_tensor(np.asarray(reference)), dim=0).numpy() != written).sum())
        rows.append(
            (
                tta,
                times["bare"],
                times["end to end"],
                {k: statistics.median(v[1:]) for k, v in stages.items()},
                differ,
                written.size,
                written.dtype,
                times.get("folder"),
            )
        )

    header = (
        f"{'tta':<4} {'bare sliding window s':>21} {'medeman infer s':>15} {'ratio':>6}  {'CPU s: bare':>11} "
        f"{'infer':>6} {'ratio':>6}  {'mask vs Invertd':>16}   stages of medeman infer, wall s"
    )
    print(header)
    print("-" * len(header))
    for tta, (t_bare, c_bare), (t_full, c_full), stage, differ, total, mask_dtype, folder_times in rows:
        split = ", ".join(f"{k} {v:.2f}" for k, v in stage.items())
        print(
            f"{'on' if tta else 'off':<4} {t_bare:>21.2f} {t_full:>15.2f} {t_full / t_bare:>5.2f}x  {c_bare:>11.2f} "
            f"{c_full:>6.2f} {c_full / c_bare:>5.2f}x  {f'{differ} voxels differ':>16}   {split}"
        )
    if any(row[7] for row in rows):
        print(
            f"\na folder of {args.cases} copies of the scan through one infer_cases call (the next scan is read and the "
            f"last mask written while the network runs), per scan:"
        )
        for tta, (t_bare, c_bare), _, _, _, _, _, folder_times in rows:
            if folder_times:
                wall, cpu = (t / args.cases for t in folder_times)
                print(
                    f"{'on' if tta else 'off':<4} {t_bare:>21.2f} {wall:>15.2f} {wall / t_bare:>5.2f}x  {c_bare:>11.2f} "
                    f"{cpu:>6.2f} {cpu / c_bare:>5.2f}x"
                )
    print(
        f"\nmask dtype {rows[0][6]}, {rows[0][5]} voxels; peak RSS {peak_rss_mib():.0f} MiB (whole benchmark process)"
    )


if __name__ == "__main__":
    main()
