"""Segment new scans with a trained teacher and write each mask in its scan's own geometry.

A case goes through the model's own preprocessing (:func:`medeman.data.transforms.preprocessing`,
rebuilt from the config saved in ``teacher.pt``), sliding-window inference with Gaussian blending
(:func:`medeman.predict.predict_volume`), and back to the scan's grid and orientation
(:func:`medeman.predict.labels_on_input`); the class map is written as ``<case>.nii.gz`` (``uint8``
up to 256 classes) with the scan's own affine (or as NRRD, or in the scan's own kind with ``output_format="input"``), so it
opens aligned with the scan in any viewer. A DICOM series (a folder of DICOM files is a folder of scans) can get
its mask as a DICOM-SEG that references it (:mod:`medeman.dicom_seg`), one segment per class named from ``data.labels``.

Typical use::

    results = infer_cases("runs/demo", "sample_data/test/images", "runs/demo/pred")
    failed = [r for r in results if r.status == "failed"]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from medeman.cases import SUFFIXES, Case, CaseError, find_cases, one_line, prepare_output_dir, preprocess_case
from medeman.checkpoint import ModelFileError, load_teacher
from medeman.classes import class_names, lesion_classes
from medeman.config import SCHEMA
from medeman.data.readers import image_suffix, read_geometry, voxel_spacing, write_volume
from medeman.data.transforms import preprocessing
from medeman.labels import argmax_labels, label_dtype
from medeman.outputs import mask_path, probabilities_path
from medeman.postprocess import apply_postprocessing, class_scales, scale_classes
from medeman.predict import invert_to_input, labels_on_input, predict_volume
from medeman.threads import apply_threads, choose_threads
from medeman.typed_config import Config, as_config

# With output_format="input", detached-header formats are written as their single-file twin.
SINGLE_FILE = {".nhdr": ".nrrd", ".mhd": ".mha"}
OUTPUT_SUFFIXES = {"nii.gz": ".nii.gz", "nifti": ".nii.gz", "nrrd": ".nrrd", "dicom-seg": ".dcm"}
OUTPUT_FORMATS = (*OUTPUT_SUFFIXES, "input")


@dataclass
class CaseResult:
    """What happened to one case: ``status`` is ``written``, ``skipped`` (output exists) or ``failed``."""

    case_id: str
    status: str
    seconds: float = 0.0
    output: Path | None = None
    probabilities: Path | None = None
    message: str = ""


# --------------------------------------------------------------------------- cases end to end


def infer_cases(
    model: str | Path | tuple[nn.Module, dict],
    inputs: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    *,
    tta: bool | None = None,
    probabilities: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    sw_batch_size: int | None = None,
    overlap: float | None = None,
    precision: str | None = None,
    output_format: str = "nii.gz",
    progress: bool = True,
    postprocess: bool = True,
) -> list[CaseResult]:
    """Segment every case of ``inputs`` and write ``<case>.nii.gz`` masks into ``output_dir``.

    Args:
        model: a run folder or ``teacher.pt`` (loaded with ``weights_only=True``), or an already
            loaded ``(network, config)`` pair.
        inputs: a folder of scans, one scan file, or a list of files (see :func:`find_cases`).
        output_dir: created if needed; an existing output is skipped unless ``overwrite``.
        tta, sw_batch_size, overlap, precision: override the config's ``infer`` section.
        probabilities: also write ``<case>_probs.nii.gz``, one float32 channel per class (4D).
        output_format: ``"nii.gz"`` (or ``"nifti"``), ``"nrrd"``, ``"dicom-seg"`` (DICOM series inputs only)
            or ``"input"`` (each mask in its scan's own kind: a DICOM series gets a DICOM-SEG).
        device: ``None`` picks CUDA when available.
        postprocess: apply the model's class scales and component rules learned on validation (``teacher.pt``'s
            ``extra["postprocessing"]``, :mod:`medeman.postprocess`) to the masks; False writes the raw argmax.

    Returns:
        One :class:`CaseResult` per case, in order; failures carry a one-line message naming the file.

    Raises:
        ModelFileError: ``model`` is not a medeman model file.
        FileNotFoundError, ValueError: ``inputs`` is missing or not image files.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    rules = None
    if isinstance(model, (str, Path)):
        net, cfg, payload = load_teacher(model, device)
        rules = payload["extra"].get("postprocessing") if postprocess else None
    else:
        net, cfg = model
        net = net.to(device).eval()
    cfg = as_config(cfg)
    tta = bool(cfg.infer.tta if tta is None else tta)
    transform = preprocessing(cfg, keys=("image",))
    in_channels = cfg.data.in_channels
    skipped: list[str] = []
    cases, problems = find_cases(inputs, in_channels, skipped=skipped)
    output_dir = Path(output_dir)
    if cases:  # no folder is left behind when there is nothing to segment
        prepare_output_dir(output_dir)

    results = [CaseResult(p.split(":", 1)[0], "failed", message=p) for p in problems]
    for message in skipped:
        tqdm.write(f"skipped: {message}", file=sys.stderr)
    for message in problems:
        tqdm.write(f"error: {message}", file=sys.stderr)
    plan: list[CaseResult | _Job] = []  # per case, in order: decided now (skip, refusal) or to segment
    for case in cases:
        out_path = mask_path(output_dir, case.case_id, output_suffix(case, output_format))
        probs_path = probabilities_path(output_dir, case.case_id) if probabilities else None
        targets = [p for p in (out_path, probs_path) if p is not None]
        if out_path.suffix == ".dcm" and case.series is None:
            plan.append(
                CaseResult(
                    case.case_id,
                    "failed",
                    message=f"{case.source}: a DICOM-SEG references a DICOM "
                    "series, and this scan is not one; choose --format nifti or nrrd",
                )
            )
        elif any(p.resolve() in {f.resolve() for f in case.files} for p in targets):
            plan.append(
                CaseResult(
                    case.case_id,
                    "failed",
                    message=f"{out_path}: would overwrite the input scan; choose another --output",
                )
            )
        elif not overwrite and any(p.exists() for p in targets):
            existing = next(p for p in targets if p.exists())
            plan.append(
                CaseResult(
                    case.case_id,
                    "skipped",
                    output=out_path,
                    message=f"{existing} exists; kept (pass --overwrite to replace)",
                )
            )
        else:
            plan.append(_Job(case, out_path, probs_path))
    jobs = [item for item in plan if isinstance(item, _Job)]
    segmented = _segment_cases(
        jobs,
        net,
        cfg,
        transform,
        tta=tta,
        device=device,
        sw_batch_size=sw_batch_size,
        postprocessing=rules,
        overlap=overlap,
        precision=precision,
    )
    bar = tqdm(plan, desc="infer", unit="case", disable=not progress, file=sys.stderr)
    with closing(segmented):  # its I/O thread ends here, also when a case raises past the per-case handling
        for item in bar:
            bar.set_postfix_str(item.case_id if isinstance(item, CaseResult) else item.case.case_id)
            result = next(segmented) if isinstance(item, _Job) else item
            results.append(result)
            if result.status == "written":
                tqdm.write(f"{result.case_id}: {result.seconds:.2f} s -> {result.output}")
            elif result.status == "skipped":
                tqdm.write(f"{result.case_id}: skipped, {result.message}")
            else:
                tqdm.write(f"error: {result.message}", file=sys.stderr)
    return results


def output_suffix(case: Case, output_format: str) -> str:
    """The mask's file suffix: the format's, or with ``"input"`` the scan's own kind (``.dcm`` DICOM-SEG for a series)."""
    if output_format != "input":
        return OUTPUT_SUFFIXES[output_format]
    if case.series is not None:
        return OUTPUT_SUFFIXES["dicom-seg"]
    suffix = image_suffix(case.files[0])
    return SINGLE_FILE.get(suffix, suffix)


@dataclass
class _Job:
    """A case to segment and where its outputs go."""

    case: Case
    out_path: Path
    probs_path: Path | None


def _segment_cases(jobs: list[_Job], net, cfg, transform, **predict_kwargs) -> Iterator[CaseResult]:
    """Segment ``jobs`` in order, yielding one :class:`CaseResult` each.

    While the network segments case i, one background thread reads and preprocesses case i+1 and
    writes case i-1's mask (gzip and file reads release the GIL), so a folder costs about the
    network's time plus one read and one write. Case i's result is yielded once its mask is on disk.
    """
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="medeman-infer-io") as io:
        reads: dict[int, Future] = {}

        def read_ahead(i: int) -> None:
            if i < len(jobs):
                reads[i] = io.submit(preprocess_case, jobs[i].case, cfg, transform)

        read_ahead(0)
        pending = None
        for i, job in enumerate(jobs):
            read_ahead(i + 1)
            start = time.perf_counter()
            try:
                labels, probs = _predict_case(job, reads.pop(i).result(), net, cfg, transform, **predict_kwargs)
                write, failure = io.submit(_write_case, job, labels, probs, cfg), None
            except Exception as err:  # one bad scan must not stop the others
                write, failure = None, (err, time.perf_counter())
            if pending is not None:
                yield _finished(*pending)
            pending = (job, start, write, failure)
        if pending is not None:
            yield _finished(*pending)


def _finished(job: _Job, start: float, write: Future | None, failure: tuple[Exception, float] | None) -> CaseResult:
    """The result of one case once its write (if it got that far) is done; its seconds end when it ended."""
    if write is not None:
        try:
            return CaseResult(job.case.case_id, "written", write.result() - start, job.out_path, job.probs_path)
        except Exception as err:
            failure = (err, time.perf_counter())
    error, ended = failure
    message = str(error) if isinstance(error, CaseError) else f"{job.case.source}: {one_line(error)}"
    return CaseResult(job.case.case_id, "failed", ended - start, message=message)


def _predict_case(
    job: _Job,
    image,
    net,
    cfg,
    transform,
    *,
    tta: bool,
    device: torch.device,
    sw_batch_size,
    overlap,
    precision,
    postprocessing: dict | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predict and invert one preprocessed case: the class map (and, if asked, the probabilities) on the scan's grid."""
    probs = predict_volume(
        net, image, cfg, tta, sw_batch_size=sw_batch_size, overlap=overlap, precision=precision, device=device
    )
    dtype = label_dtype(probs.shape[0])
    scales = class_scales(postprocessing)  # the operating point learned on validation (probabilities stay as they are)
    if job.probs_path is None:  # the class map alone: resampled without a scan-sized probability volume
        labels, probs = labels_on_input(scale_classes(probs, scales), image, transform, dtype), None
    else:
        probs = invert_to_input(probs, image, transform)
        labels = argmax_labels(scale_classes(probs, scales), dim=0, dtype=dtype)
    scan = job.case.files[0]
    shape, affine = read_geometry(scan)
    if tuple(labels.shape) != shape:
        raise CaseError(f"{job.case.source}: prediction came back as {tuple(labels.shape)}, not the scan's {shape}")
    mask = apply_postprocessing(labels.cpu().numpy(), postprocessing, float(np.prod(voxel_spacing(affine))))
    return mask, None if probs is None else np.moveaxis(probs.float().cpu().numpy(), 0, -1)


def _write_case(job: _Job, labels: np.ndarray, probs: np.ndarray | None, cfg: Config) -> float:
    """Write one case's mask (and probabilities); return when it finished (``time.perf_counter``)."""
    if job.out_path.suffix == ".dcm":
        from medeman.dicom_seg import write_dicom_seg  # highdicom only when a DICOM-SEG is asked for

        write_dicom_seg(
            labels,
            job.case.files[0],
            job.case.series,
            job.out_path,
            class_names(cfg),
            set(lesion_classes(cfg)),
            cfg.data.num_classes,
        )
    else:
        write_volume(labels, job.case.files[0], job.out_path, intent="label")
    if probs is not None:
        write_volume(probs, job.case.files[0], job.probs_path)
    return time.perf_counter()


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medeman infer",
        description="Segment scans with a trained medeman teacher; each mask has its scan's shape and affine.",
    )
    parser.add_argument("--model", required=True, help="run folder with teacher.pt, or the teacher.pt file")
    parser.add_argument(
        "--input",
        required=True,
        help=f"folder of scans ({', '.join(SUFFIXES)}, or DICOM files: each series is a scan) or one scan",
    )
    parser.add_argument("--output", required=True, help="folder for <case>.nii.gz masks")
    parser.add_argument(
        "--tta",
        action="store_true",
        default=None,
        help="average the softmax over 8 mirrorings (default: config infer.tta)",
    )
    parser.add_argument(
        "--probabilities", action="store_true", help="also write <case>_probs.nii.gz, one channel per class"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs (default: keep them and skip the case)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--sw-batch-size", type=int, help="sliding-window patches per forward pass (default: config)")
    parser.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (default: config)")
    parser.add_argument(
        "--precision",
        choices=SCHEMA["infer"]["precision"].choices,
        help="bf16 autocast where supported (default: config)",
    )
    parser.add_argument(
        "--format",
        choices=("nifti", "nrrd", "dicom-seg"),
        help="mask format (default: the input's own kind: NIfTI, NRRD or MetaImage as the scan, "
        "a DICOM-SEG referencing a DICOM series)",
    )
    parser.add_argument(
        "--output-format",
        choices=("nii.gz", "input"),
        help="older spelling: nii.gz (= --format nifti), or input (the default)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: OMP_NUM_THREADS, else the available cores)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--no-postprocessing",
        action="store_true",
        help="write the raw argmax, without the model's class scales and component rules learned on validation "
        "(to compare with medeman evaluate)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``medeman infer``: 0 when every case was written or kept, 1 when any failed, 2 on a bad model or input."""
    args = build_parser().parse_args(argv)
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        print(f"error: --overlap {args.overlap}: must be in [0, 1)", file=sys.stderr)
        return 2
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        print(f"error: --sw-batch-size {args.sw_batch_size}: must be at least 1", file=sys.stderr)
        return 2
    try:
        apply_threads(choose_threads(args.threads))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = None if args.device == "auto" else args.device
    try:
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            print(f"error: --device {device}: CUDA is not available here (use cpu or auto)", file=sys.stderr)
            return 2
    except RuntimeError as err:
        print(f"error: --device {device}: {one_line(err)}", file=sys.stderr)
        return 2
    try:
        results = infer_cases(
            args.model,
            args.input,
            args.output,
            tta=args.tta,
            probabilities=args.probabilities,
            overwrite=args.overwrite,
            device=device,
            sw_batch_size=args.sw_batch_size,
            overlap=args.overlap,
            precision=args.precision,
            output_format=args.format or args.output_format or "input",
            progress=not args.no_progress,
            postprocess=not args.no_postprocessing,
        )
    except (ModelFileError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
    print(
        f"infer: {counts['written']} written, {counts['skipped']} kept (already there), {counts['failed']} failed"
        f" -> {args.output}"
    )
    for r in results:
        if r.status == "failed":
            print(f"  failed: {r.message}", file=sys.stderr)
    if not results:
        print(f"error: {args.input}: no scans found ({', '.join(SUFFIXES)})", file=sys.stderr)
        return 1
    return 1 if counts["failed"] else 0
