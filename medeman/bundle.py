"""A trained teacher as a MONAI bundle: ``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``.

The bundle runs with MONAI alone (``python -m monai.bundle run``; MONAI Label and MONAI Deploy load
the same layout) and reproduces ``medeman infer``: the same network (:func:`medeman.nets.network_definition`),
the same preprocessing as :func:`medeman.data.transforms.preprocessing` written with MONAI's stock
transforms (``Orientationd`` to RAS, ``Spacingd`` trilinear, the CT window or the MR z-score), the same
Gaussian-blended sliding window over the *softmax* (medeman blends probabilities, not logits), and the
way back to each scan's grid (``Invertd``, trilinear on the probabilities, then the argmax), and the
post-processing learned on validation (``teacher.pt``'s ``extra["postprocessing"]``): the probabilities times the
class scales before the argmax (``Lambdad``), then the component rules, run by ``scripts/component_rules.py``, a
verbatim copy of :mod:`medeman.component_rules` (numpy and scipy; loaded with ``runpy``, so no ``PYTHONPATH``).
Test-time mirroring is left out (``medeman infer`` leaves it out unless ``--tta``).

The files start from MONAI's own templates (``monai.bundle.init_bundle`` with
``DEFAULT_METADATA``/``DEFAULT_INFERENCE``) and are checked with ``monai.bundle.verify_net_in_out``.

Typical use::

    write_bundle(net, cfg, "runs/demo/bundle", rules=payload["extra"].get("postprocessing"))
    # python -m monai.bundle run --bundle_root runs/demo/bundle \
    #     --config_file runs/demo/bundle/configs/inference.json --input_dir scans --output_dir masks
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from torch import nn

from medeman import component_rules
from medeman.classes import class_names, lesion_classes
from medeman.nets import network_definition
from medeman.postprocess import class_scales, describe
from medeman.typed_config import Config, as_config, plain

# verify_metadata downloads this schema; the bundle names it as every MONAI model-zoo bundle does
METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
INPUT_PATTERNS = ("*.nii.gz", "*.nii")  # what MONAI's LoadImaged reads without ITK
COMPONENT_SCRIPT = "scripts/component_rules.py"  # medeman.component_rules, copied into the bundle


def _scales(rules: dict | None) -> list[float] | None:
    """The learned class scales, or None where they change nothing."""
    scales = class_scales(rules)
    return [float(s) for s in scales] if scales and any(float(s) != 1.0 for s in scales) else None


def _component_rules(rules: dict | None) -> dict[str, dict] | None:
    """The component rules that change a mask (plain values, as stored in ``teacher.pt``), or None."""
    active = component_rules.active_rules((rules or {}).get("classes"))
    if not active:
        return None
    return {str(c): {k: r[k] for k in ("min_volume_mm3", "keep_largest", "drop") if k in r} for c, r in active.items()}


def channel_names(cfg: Config | dict) -> dict[str, str]:
    """Output channel -> class name (``class 2`` where unnamed), background first, as bundle metadata keys."""
    cfg = as_config(cfg)
    names = class_names(cfg)
    return {str(c): "background" if c == 0 else names.get(c, f"class {c}") for c in range(cfg.data.num_classes)}


def preprocessing_config(cfg: Config | dict) -> dict[str, Any]:
    """:func:`medeman.data.transforms.preprocessing` of ``cfg`` as a bundle ``Compose`` of stock MONAI transforms."""
    data = as_config(cfg).data
    chain: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
    ]
    if data.spacing is not None:
        chain.append(
            {"_target_": "Spacingd", "keys": "image", "pixdim": [float(s) for s in data.spacing], "mode": "bilinear"}
        )
    if data.modality == "CT":
        low, high = (float(v) for v in data.intensity_window)
        chain.append(
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": low,
                "a_max": high,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        )
    else:
        chain.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True})
    chain.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    return {"_target_": "Compose", "transforms": chain}


def inference_config(cfg: Config | dict, rules: dict | None = None) -> dict[str, Any]:
    """``configs/inference.json``: MONAI's default inference bundle config made to run medeman's teacher.

    Args:
        cfg: the teacher's resolved config.
        rules: the post-processing learned on validation (``teacher.pt``'s ``extra["postprocessing"]``); None: the
            plain argmax.
    """
    from monai.bundle.utils import DEFAULT_INFERENCE

    cfg = as_config(cfg)
    scales, components = _scales(rules), _component_rules(rules)
    after_argmax: list[dict[str, Any]] = []
    before_argmax: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if scales:  # the operating point learned on validation: the argmax of probabilities x scales
        extra["class_scales"] = scales
        before_argmax.append(
            {
                "_target_": "Lambdad",
                "keys": "pred",
                "func": "$lambda p: p * torch.tensor(@class_scales, dtype=p.dtype, device=p.device)"
                ".view(-1, *[1] * (p.ndim - 1))",
            }
        )
    if components:
        extra["component_rules"] = components
        extra["component_script"] = "$runpy.run_path(os.path.join(@bundle_root, " + repr(COMPONENT_SCRIPT) + "))"
        after_argmax.append(
            {
                "_target_": "Lambdad",
                "keys": "pred",
                "func": "$lambda p: @component_script['apply_to_prediction'](p, @component_rules)",
            }
        )
    infer, patch = cfg.infer, [int(s) for s in cfg.data.patch_size]
    config = copy.deepcopy(DEFAULT_INFERENCE)
    config.pop("dataset_dir", None)
    config.pop("evaluating", None)
    config.update(
        {
            "imports": ["$import glob", "$import os", "$import runpy"],
            "bundle_root": ".",
            "input_dir": "$@bundle_root + '/input'",
            "output_dir": "$@bundle_root + '/eval'",
            "datalist": "$[{'image': f} for p in "
            + repr(list(INPUT_PATTERNS))
            + " for f in sorted(glob.glob(os.path.join(@input_dir, p)))]",
            "network_def": network_definition(cfg),
            # medeman blends the windows' softmax (Gaussian weights), so the network ends in one
            "network": "$torch.nn.Sequential(@network_def, torch.nn.Softmax(dim=1)).to(@device).eval()",
            "preprocessing": preprocessing_config(cfg),
            "inferer": {
                "_target_": "SlidingWindowInferer",
                "roi_size": patch,
                "sw_batch_size": infer.sw_batch_size,
                "overlap": infer.overlap,
                "mode": "gaussian",
            },
            "postprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {
                        "_target_": "Invertd",
                        "keys": "pred",
                        "transform": "@preprocessing",
                        "orig_keys": "image",
                        "nearest_interp": False,
                        "to_tensor": True,
                    },
                    *before_argmax,
                    {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                    *after_argmax,
                    {
                        "_target_": "SaveImaged",
                        "keys": "pred",
                        "output_dir": "@output_dir",
                        "output_postfix": "",
                        "output_ext": ".nii.gz",
                        "output_dtype": "$numpy.uint8",
                        "resample": False,
                        "separate_folder": False,
                        "print_log": False,
                    },
                ],
            },
            "handlers": [
                {
                    "_target_": "CheckpointLoader",
                    "load_path": "@ckpt_path",
                    "load_dict": {"model": "@network_def"},
                    "map_location": "@device",
                }
            ],
            "run": ["$@evaluator.run()"],
            **extra,
        }
    )
    config["dataset"]["data"] = "@datalist"
    config["evaluator"]["amp"] = False
    return config


def metadata_config(cfg: Config | dict, rules: dict | None = None) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's default metadata with the network's inputs, outputs, classes and the
    post-processing ``rules`` learned on validation (None: the plain argmax)."""
    from monai.bundle.utils import DEFAULT_METADATA

    cfg = as_config(cfg)
    data = cfg.data
    patch = [int(s) for s in data.patch_size]
    channels = channel_names(cfg)
    lesions = lesion_classes(cfg)
    ct = data.modality == "CT"
    meta = copy.deepcopy(DEFAULT_METADATA)
    meta.update(
        {
            "schema": METADATA_SCHEMA,
            "required_packages_version": {"pytorch-ignite": _version("ignite")},
            "task": f"{data.modality} segmentation of " + ", ".join(v for k, v in channels.items() if k != "0"),
            "description": "Mean-teacher (EMAN) teacher network trained with medeman; inference.json reproduces "
            "medeman infer (RAS, resampling, intensity normalization, Gaussian sliding window over "
            "the softmax, inversion to each scan's grid).",
            "authors": "exported by medeman",
            "copyright": "the owner of the training data and of this model",
            "data_type": "nibabel",
            "image_classes": f"one {data.modality} channel"
            if data.in_channels == 1
            else f"{data.in_channels} channels",
            "pred_classes": ", ".join(f"{k}: {v}" for k, v in channels.items()),
            "intended_use": "research only",
            "references": [
                "Cai et al., Exponential Moving Average Normalization for Self-supervised and Semi-supervised "
                "Learning, CVPR 2021",
                "Tarvainen and Valpola, Mean teachers are better role models, NeurIPS 2017",
            ],
            "network_data_format": {
                "inputs": {
                    "image": {
                        "type": "image",
                        "format": "hounsfield" if ct else "magnitude",
                        "modality": data.modality,
                        "num_channels": data.in_channels,
                        "spatial_shape": patch,
                        "dtype": "float32",
                        "value_range": [0, 1] if ct else [],
                        "is_patch_data": True,
                        "channel_def": {str(i): "image" for i in range(data.in_channels)},
                    }
                },
                "outputs": {
                    "pred": {
                        "type": "image",
                        "format": "segmentation",
                        "num_channels": data.num_classes,
                        "spatial_shape": patch,
                        "dtype": "float32",
                        "value_range": [],
                        "is_patch_data": True,
                        "channel_def": channels,
                    }
                },
            },
            "medeman": {
                "spacing": plain(data.spacing),
                "orientation": "RAS",
                "modality": data.modality,
                "intensity_window": plain(data.intensity_window) if ct else None,
                "lesion_classes": {str(c): channels[str(c)] for c in lesions},
                "class_scales": _scales(rules) or [1.0] * data.num_classes,
                "component_rules": _component_rules(rules) or {},
            },
        }
    )
    return meta


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def write_bundle(net: nn.Module, cfg: Config | dict, out_dir: str | Path, rules: dict | None = None) -> Path:
    """Write the bundle folder ``out_dir`` (which must not exist yet) and check the network against its metadata.

    Args:
        net: the teacher network (its weights go to ``models/model.pt``).
        cfg: the teacher's resolved config.
        out_dir: the bundle folder to create.
        rules: the post-processing learned on validation (``teacher.pt``'s ``extra["postprocessing"]``): class scales
            and component rules, applied by the bundle as ``medeman infer`` applies them; None: the plain argmax.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: a multi-channel model (the bundle reads one image file per case).
    """
    from monai.bundle import init_bundle, verify_net_in_out

    cfg = as_config(cfg)
    if cfg.data.in_channels != 1:
        raise ValueError(
            f"data.in_channels {cfg.data.in_channels}: the bundle reads one image file per case; "
            "export multi-channel models as onnx or torchscript"
        )
    out_dir = Path(out_dir)
    init_bundle(
        out_dir,
        network=net.cpu().eval(),
        metadata_str=metadata_config(cfg, rules),
        inference_str=inference_config(cfg, rules),
    )
    if _component_rules(rules):
        script = out_dir / COMPONENT_SCRIPT
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(Path(component_rules.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    (out_dir / "docs" / "README.md").write_text(bundle_readme(cfg, rules), encoding="utf-8")
    (out_dir / "LICENSE").write_text(
        "The weights are the owner's of the training data: state their terms here.\n", encoding="utf-8"
    )
    monai_logger = logging.getLogger("monai.bundle.scripts")
    level = monai_logger.level
    monai_logger.setLevel(logging.WARNING)  # verify_net_in_out logs its whole argument list
    try:
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(out_dir / "configs" / "metadata.json"),
            config_file=str(out_dir / "configs" / "inference.json"),
            device="cpu",
        )
    finally:
        monai_logger.setLevel(level)
    return out_dir


def bundle_readme(cfg: Config | dict, rules: dict | None = None) -> str:
    """``docs/README.md``: what the bundle segments, its post-processing and the command that runs it."""
    channels = channel_names(cfg)
    post = (
        f"Post-processing learned on validation, as `medeman infer` applies it: {describe(rules)}."
        + (f" The component rules run `{COMPONENT_SCRIPT}` (numpy and scipy)." if _component_rules(rules) else "")
        if _scales(rules) or _component_rules(rules)
        else "No post-processing was learned: the masks are the plain argmax."
    )
    data = as_config(cfg).data
    spacing, window, patch = plain(data.spacing), plain(data.intensity_window), plain(data.patch_size)
    classes = "\n".join(f"| {k} | {v} |" for k, v in channels.items())
    return f"""# medeman teacher ({data.modality})

A mean-teacher (EMAN) segmentation network exported by `medeman export --format bundle`.
`configs/inference.json` reproduces `medeman infer` without test-time mirroring: RAS orientation,
resampling to {spacing} mm, {"CT window " + str(window) + " HU to [0, 1]" if data.modality == "CT" else "z-score on the foreground"},
Gaussian-blended {patch} sliding windows over the softmax, inversion to each scan's grid, argmax.
{post}

    python -m monai.bundle run --bundle_root BUNDLE --config_file BUNDLE/configs/inference.json \\
        --input_dir SCANS --output_dir MASKS

reads `SCANS/*.nii.gz` and `*.nii` (single-channel NIfTI) and writes `MASKS/<scan>.nii.gz` (uint8, the scan's affine).
Needs `monai`, `torch`, `nibabel` and `pytorch-ignite`.

| label | class |
| --- | --- |
{classes}
"""
