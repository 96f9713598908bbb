"""``medeman export``: the trained teacher as a MONAI bundle, an ONNX model or a TorchScript module.

``onnx`` and ``torchscript`` write the bare network (``(B, in_channels, *patch_size)`` float32 in,
``(B, num_classes, *patch_size)`` logits out; the batch may vary) as ``model.onnx`` / ``model.ts``,
with ``model.json`` beside it holding what a runtime must do around it: the preprocessing
(orientation, spacing, intensity), the sliding window, and the classes with their names. ``bundle``
writes a MONAI bundle that runs the whole of ``medeman infer`` (see :mod:`medeman.bundle`).

Typical use::

    medeman export --model runs/demo --format onnx --out runs/demo/onnx
    medeman export --model runs/demo --format bundle --out runs/demo/bundle
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from medeman.bundle import channel_names, write_bundle
from medeman.checkpoint import ModelFileError, load_teacher
from medeman.classes import lesion_classes
from medeman.postprocess import class_scales
from medeman.typed_config import Config, as_config, plain

FORMATS = ("bundle", "onnx", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
METADATA_FORMAT = "medeman-deploy-v1"


class ExportError(ValueError):
    """An export that cannot be written (existing outputs, an unsupported model)."""


def deployment_metadata(cfg: Config | dict, model_file: str, rules: dict | None = None) -> dict:
    """What runs around the exported network: ``model.json`` beside ``model.onnx`` / ``model.ts``.

    Everything a runtime needs to reproduce ``medeman infer``: reorient to RAS, resample to
    ``spacing`` (trilinear), normalize intensities, slide ``patch_size`` windows with Gaussian
    weights over the *softmax* of the logits, resample the probabilities back to the scan's grid
    (trilinear) and take the argmax of the probabilities times ``class_scales`` (the operating point
    learned on validation, ``rules`` from ``teacher.pt``'s ``extra["postprocessing"]``; 1 without);
    class names by output channel. ``component_rules`` are :mod:`medeman.postprocess`'s, for a service
    that applies them too.
    """
    cfg = as_config(cfg)
    data, infer = cfg.data, cfg.infer
    ct = data.modality == "CT"
    names = channel_names(cfg)
    return {
        "format": METADATA_FORMAT,
        "model_file": model_file,
        "input": {
            "name": "image",
            "shape": ["batch", data.in_channels, *[int(s) for s in data.patch_size]],
            "dtype": "float32",
        },
        "output": {
            "name": "logits",
            "shape": ["batch", data.num_classes, *[int(s) for s in data.patch_size]],
            "dtype": "float32",
            "activation": "softmax over the class axis (1)",
        },
        "preprocessing": {
            "orientation": "RAS",
            "spacing": plain(data.spacing),  # a list, as in the saved config
            "resampling": "trilinear, border values beyond the edge",
            "modality": data.modality,
            "intensity": (
                {"window": [float(v) for v in data.intensity_window], "to": [0.0, 1.0], "clip": True}
                if ct
                else {"zscore": "per channel over the nonzero voxels"}
            ),
        },
        "sliding_window": {
            "roi_size": [int(s) for s in data.patch_size],
            "overlap": infer.overlap,
            "blend": "gaussian",
            "of": "softmax probabilities",
            "tta": infer.tta,
        },
        "postprocessing": "probabilities back to the scan's grid (trilinear), then argmax of probabilities x class_scales",
        "class_scales": [float(s) for s in class_scales(rules) or [1.0] * data.num_classes],
        "component_rules": (rules or {}).get("classes", {}),
        "num_classes": data.num_classes,
        "classes": names,
        "lesion_classes": {str(c): names[str(c)] for c in lesion_classes(cfg)},
        "model": cfg.model.name,
    }


def example_input(cfg: Config | dict, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random ``(batch, in_channels, *patch_size)`` patch in the normalized intensity range."""
    generator = torch.Generator().manual_seed(seed)
    data = as_config(cfg).data
    shape = (batch, data.in_channels, *[int(s) for s in data.patch_size])
    return torch.rand(shape, generator=generator)


def export_torchscript(net: nn.Module, cfg: Config | dict, path: str | Path) -> Path:
    """Trace the network in eval mode on one patch and save it (``torch.jit.load`` reads it back)."""
    net = net.cpu().eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, example_input(cfg))
    traced.save(str(path))
    return Path(path)


def export_onnx(net: nn.Module, cfg: Config | dict, path: str | Path) -> Path:
    """Export the network to ONNX (``image`` -> ``logits``, the batch dimension dynamic)."""
    net = net.cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        net,
        (example_input(cfg, batch=2),),
        dynamo=True,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    program.save(str(path))
    return Path(path)


def export_model(
    model: str | Path | tuple[nn.Module, dict], fmt: str, out_dir: str | Path, overwrite: bool = False
) -> list[Path]:
    """Write the teacher of ``model`` in format ``fmt`` into ``out_dir``.

    Args:
        model: a run folder or ``teacher.pt``, or a loaded ``(network, config)`` pair.
        fmt: ``bundle``, ``onnx`` or ``torchscript``.
        out_dir: for ``bundle`` the bundle folder (new, empty, or an earlier bundle with ``overwrite``);
            else the folder that gets ``model.onnx``/``model.ts`` and ``model.json``.
        overwrite: replace an earlier export there.

    Returns:
        The files written (the bundle folder for ``bundle``).

    Raises:
        ModelFileError: ``model`` is not a medeman teacher.
        ExportError: outputs exist without ``overwrite``, or the folder is not an earlier bundle.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    rules = None
    if isinstance(model, (str, Path)):
        net, cfg, payload = load_teacher(model)
        rules = payload["extra"].get("postprocessing")
    else:
        net, cfg = model
    cfg = as_config(cfg)
    net = net.cpu().eval()
    out_dir = Path(out_dir)
    if fmt == "bundle":
        _clear_bundle(out_dir, overwrite)
        try:
            return [write_bundle(net, cfg, out_dir, rules)]
        except ValueError as err:
            raise ExportError(str(err)) from None
    model_path, meta_path = out_dir / MODEL_FILES[fmt], out_dir / "model.json"
    existing = [p for p in (model_path, meta_path) if p.exists()]
    if existing and not overwrite:
        raise ExportError(f"{existing[0]} exists; kept (pass --overwrite to replace it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (export_onnx if fmt == "onnx" else export_torchscript)(net, cfg, model_path)
    meta_path.write_text(
        json.dumps(deployment_metadata(cfg, model_path.name, rules), indent=2) + "\n", encoding="utf-8"
    )
    return [model_path, meta_path]


def _clear_bundle(out_dir: Path, overwrite: bool) -> None:
    """Make way for a bundle: a missing or empty folder is fine; an earlier bundle goes only with ``overwrite``."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir}: is a file; give a folder for the bundle")
    if not any(out_dir.iterdir()):
        out_dir.rmdir()  # init_bundle creates the folder itself
        return
    if not (out_dir / "configs" / "metadata.json").is_file():
        raise ExportError(f"{out_dir}: a folder that is not a MONAI bundle and not empty; give a new folder")
    if not overwrite:
        raise ExportError(f"{out_dir}: a bundle is there; kept (pass --overwrite to replace it)")
    shutil.rmtree(out_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medeman export",
        description="Export a trained teacher as a MONAI bundle, an ONNX model or a TorchScript module.",
    )
    parser.add_argument("--model", required=True, help="run folder with teacher.pt, or the teacher.pt file")
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="bundle: a MONAI bundle that runs medeman infer's whole pipeline; onnx / torchscript: "
        "the network alone, with model.json (preprocessing, sliding window, classes) beside it",
    )
    parser.add_argument(
        "--out", required=True, help="the bundle folder, or the folder for model.onnx / model.ts and model.json"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``medeman export``: 0 when written, 2 on a bad model, format or output folder."""
    args = build_parser().parse_args(argv)
    try:
        written = export_model(args.model, args.format, args.out, overwrite=args.overwrite)
    except (ModelFileError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"export: {args.format} -> " + ", ".join(str(p) for p in written))
    return 0
