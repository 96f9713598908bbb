"""Class names and lesion classes: how every table, CSV, picture and exported model names a label value.

``data.labels`` maps label values to names (``{1: liver, 2: kidneys}``); ``data.lesion_classes``
says which classes are lesions (tumours, nodules: many small components, scored lesion-wise by
``medeman evaluate``) rather than organs (one structure, where a connected-component count reads
as noise). Both may name a class by its value or its name.

Typical use::

    names = class_names(cfg)                       # {1: "liver", 2: "kidneys"}
    lesions = lesion_classes(cfg)                  # [3]
    class_title(2, names)                          # "kidneys"
"""

from __future__ import annotations

from typing import Iterable, Mapping


def class_names(cfg: dict) -> dict[int, str]:
    """``data.labels`` as ``{label value: name}``, background (0) left out; empty when unnamed."""
    names = cfg["data"].get("labels") or {}
    return {int(k): str(v) for k, v in names.items() if int(k) != 0}


def class_title(label: int, names: Mapping[int, str] | None = None) -> str:
    """What a picture calls a class: its name, or ``class 2`` when it has none."""
    return (names or {}).get(int(label)) or f"class {int(label)}"


def resolve_classes(items: Iterable[int | str] | str | None, names: Mapping[int, str] | None = None,
                    num_classes: int | None = None, where: str = "lesion classes") -> list[int]:
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


def lesion_classes(cfg: dict) -> list[int]:
    """``data.lesion_classes`` as label values (names resolved through ``data.labels``)."""
    data = cfg["data"]
    return resolve_classes(data.get("lesion_classes"), class_names(cfg), int(data["num_classes"]), "data.lesion_classes")
