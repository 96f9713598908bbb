"""Class names and lesion classes: how every table, CSV, picture and exported model names a label value.

``data.labels`` maps label values to names (``{1: liver, 2: kidneys}``); ``data.lesion_classes``
says which classes are lesions (tumours, nodules: many small components, scored lesion-wise by
``medeman evaluate``) rather than organs (one structure, where a connected-component count reads
as noise). Both may name a class by its value or its name.

Typical use::

    names = class_names(cfg)                       # {1: "liver", 2: "kidneys"}
    lesions = lesion_classes(cfg)                  # [3]
    class_title(2, names)                          # "kidneys"
    load_class_names("Task03_Liver/dataset.json")  # {1: "liver", 2: "cancer"}  (medeman evaluate --classes)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from medeman.typed_config import Config


def class_names(cfg: Config | Mapping[str, Any]) -> dict[int, str]:
    """``data.labels`` as ``{label value: name}``, background (0) left out; empty when unnamed."""
    from medeman.typed_config import as_config

    return names_by_value(as_config(cfg).data.labels)


def names_by_value(labels: Mapping | None) -> dict[int, str]:
    """A ``data.labels`` map as ``{label value: name}``, background (0) left out; empty for ``None``."""
    return {int(k): str(v) for k, v in (labels or {}).items() if int(k) != 0}


def class_title(label: int, names: Mapping[int, str] | None = None) -> str:
    """What a picture calls a class: its name, or ``class 2`` when it has none."""
    return (names or {}).get(int(label)) or f"class {int(label)}"


def resolve_classes(
    items: Iterable[int | str] | str | None,
    names: Mapping[int, str] | None = None,
    num_classes: int | None = None,
    where: str = "lesion classes",
) -> list[int]:
    """Label values of ``items``, each a value (``3``) or a name from ``names`` (``lesion``); sorted, unique.

    Args:
        items: a list, or a comma-separated string (``"3"``, ``"lesion,cyst"``); None gives ``[]``.
        names: ``{label value: name}`` the names are looked up in.
        num_classes: when given, values must lie in ``1..num_classes-1``.
        where: names the setting in error messages.

    Raises:
        ValueError: a name not in ``names``, or a value that is background or beyond the classes.
    """
    if items is None:
        return []
    if isinstance(items, str):
        items = [item.strip() for item in items.split(",") if item.strip()]
    by_name = {str(v).lower(): int(k) for k, v in (names or {}).items()}
    out = set()
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool):
            raise ValueError(f"{where}: {item!r} is neither a label value nor a class name")
        if text.lstrip("-").isdigit():
            value = int(text)
        elif text.lower() in by_name:
            value = by_name[text.lower()]
        else:
            known = ", ".join(f"{k}={v}" for k, v in sorted((names or {}).items())) or "no names (data.labels)"
            raise ValueError(f"{where}: {text!r} is neither a label value nor a class name ({known})")
        if value < 1 or (num_classes is not None and value >= num_classes):
            top = f"..{num_classes - 1}" if num_classes is not None else " or more"
            raise ValueError(f"{where}: {value} is not a foreground class (1{top})")
        out.add(value)
    return sorted(out)


def lesion_classes(cfg: Config | Mapping[str, Any]) -> list[int]:
    """``data.lesion_classes`` as label values (names resolved through ``data.labels``)."""
    from medeman.typed_config import as_config

    data = as_config(cfg).data
    return resolve_classes(data.lesion_classes, names_by_value(data.labels), data.num_classes, "data.lesion_classes")


def no_lesion_classes(key: str) -> str:
    """The error of a copy-paste setting ``key`` turned on while ``data.lesion_classes`` names no class."""
    return (
        f"{key} pastes the classes of data.lesion_classes, which is empty: name the lesion classes "
        "(e.g. data.lesion_classes=[lesion]) or set it to 0"
    )


def lesion_host_classes(cfg: Config | Mapping[str, Any]) -> list[int]:
    """``data.lesion_host_classes`` as label values; when null, every foreground class that is not a lesion class."""
    from medeman.typed_config import as_config

    data = as_config(cfg).data
    if data.lesion_host_classes is None:
        lesions = lesion_classes(cfg)
        return [c for c in range(1, data.num_classes) if c not in lesions]
    return resolve_classes(
        data.lesion_host_classes, names_by_value(data.labels), data.num_classes, "data.lesion_host_classes"
    )


def load_class_names(spec: str | Path) -> dict[int, str]:
    """Class names by label value, from a file or written out.

    Args:
        spec: one of
            - an MSD or nnU-Net v2 ``dataset.json`` (``"labels": {"1": "liver"}`` or ``{"liver": 1}``);
            - a medeman YAML config or a run folder (its ``config.yaml``): the ``data.labels`` map;
            - a folder holding a ``dataset.json``;
            - names written out: ``1=liver,2=kidneys`` or ``liver,kidneys`` (classes 1, 2, ... in order).

    Returns:
        ``{label value: name}``, background left out.

    Raises:
        ValueError: a file without a usable map, or a map that is not label values and names.
    """
    from medeman.config import read_yaml

    path = Path(spec)
    if path.is_dir():
        found = [f for f in (path / "config.yaml", path / "dataset.json") if f.is_file()]
        if not found:
            raise ValueError(f"{path}: no config.yaml (run folder) or dataset.json with class names in it")
        path = found[0]
    if path.is_file():
        if path.suffix == ".json":
            from medeman.data.discovery import read_dataset_json  # the one dataset.json reader

            raw = read_dataset_json(path, layout=False).get("labels")
        else:
            cfg = read_yaml(path)
            raw = ((cfg or {}).get("data") or {}).get("labels") if isinstance(cfg, dict) else None
        if not raw:
            raise ValueError(f"{path}: no class names in it (a 'labels' map in dataset.json, data.labels in a config)")
        return _names_from_map(raw, str(path))
    text = str(spec).strip()
    items = [item.strip() for item in text.split(",") if item.strip()]
    if items and all("=" in item for item in items):
        return _names_from_map(dict(item.split("=", 1) for item in items), f"--classes {text}")
    if items and not any("=" in item for item in items):
        return {i: name for i, name in enumerate(items, start=1)}
    raise ValueError(
        f"--classes {text!r}: give a dataset.json, a config or run folder, '1=liver,2=kidneys' or 'liver,kidneys'"
    )


def load_lesion_classes(spec: str | Path) -> list[int]:
    """``data.lesion_classes`` of a medeman config or run folder (``[]`` for anything else: names written out, dataset.json)."""
    from medeman.config import read_yaml

    path = Path(spec)
    path = path / "config.yaml" if path.is_dir() else path
    if not path.is_file() or path.suffix not in (".yaml", ".yml"):
        return []
    data = (read_yaml(path) or {}).get("data") or {}
    return resolve_classes(
        data.get("lesion_classes"),
        load_class_names(path) if data.get("labels") else {},
        where=f"{path}: data.lesion_classes",
    )


def _names_from_map(raw, where: str) -> dict[int, str]:
    """``{value: name}`` (MSD, medeman) or ``{name: value}`` (nnU-Net v2) -> ``{int value: name}`` without background."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: class names must be a map of label values and names, got {raw!r}")
    out = {}
    for key, value in raw.items():
        number, name = (key, value) if str(key).strip().lstrip("-").isdigit() else (value, key)
        if isinstance(number, bool) or not str(number).strip().isdigit():
            raise ValueError(
                f"{where}: {key!r}: {value!r} is not a label value and a name "
                "(nnU-Net region labels with several values are not supported)"
            )
        out[int(str(number).strip())] = str(name).strip()
    out.pop(0, None)
    return out
