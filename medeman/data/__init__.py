"""Data: cohort discovery, input checks, readers, MONAI transform chains, and the semi-supervised DataModule.

The package face is lazy (PEP 562 ``__getattr__``): ``import medeman.data`` loads nothing heavy, and
each name imports its submodule on first use, so ``medeman.data.readers``/``transforms`` never pull in
Lightning through the DataModule (and no submodule import can close a circle through this file).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CaseReport": "checks",
    "check_cases": "checks",
    "inspect_case": "checks",
    "raise_problems": "checks",
    "report_problems": "checks",
    "SSLDataModule": "datamodule",
    "discover_labeled": "discovery",
    "discover_unlabeled": "discovery",
    "group_channels": "discovery",
    "label_id": "discovery",
    "match_labels": "discovery",
    "read_dataset_json": "discovery",
    "split_cases": "discovery",
    "write_split": "discovery",
    "DataError": "errors",
    "IMAGE_SUFFIXES": "readers",
    "SimpleITKReader": "readers",
    "VolumeReader": "readers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medeman.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"medeman.data.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
