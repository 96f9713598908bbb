"""Class names and lesion classes: values and names resolve to label values, bad ones are named."""

from __future__ import annotations

import pytest

from medeman.classes import class_names, class_title, lesion_classes, resolve_classes
from medeman.config import ConfigError, default_config, validate

NAMES = {1: "liver", 2: "kidneys", 3: "lesion"}

RESOLVE_CASES = [
    # (items, expected label values)
    (None, []),
    ([3], [3]),
    (["lesion"], [3]),
    ("Lesion, 1", [1, 3]),  # names case-insensitive, comma-separated string
    ([3, "lesion", 2], [2, 3]),  # unique, sorted
]


@pytest.mark.parametrize("items,expected", RESOLVE_CASES)
def test_resolve_classes(items, expected):
    assert resolve_classes(items, NAMES, num_classes=4) == expected


ILL_CASES = [
    (["tumour"], "x: 'tumour' is neither a label value nor a class name (1=liver, 2=kidneys, 3=lesion)"),
    ([0], "x: 0 is not a foreground class (1..3)"),
    ([4], "x: 4 is not a foreground class (1..3)"),
    ([True], "x: True is neither a label value nor a class name"),
]


@pytest.mark.parametrize("items,message", ILL_CASES)
def test_resolve_classes_refuses(items, message):
    with pytest.raises(ValueError) as err:
        resolve_classes(items, NAMES, num_classes=4, where="x")
    assert str(err.value) == message


def test_config_names_and_lesion_classes():
    cfg = default_config()
    cfg["data"].update(num_classes=4, labels={0: "background", **NAMES}, lesion_classes=["lesion"])
    cfg = validate(cfg)
    assert class_names(cfg) == NAMES and lesion_classes(cfg) == [3]
    assert class_title(2, class_names(cfg)) == "kidneys" and class_title(2, {}) == "class 2"


def test_config_refuses_an_unknown_lesion_class_at_load_time():
    cfg = default_config()
    cfg["data"].update(num_classes=3, labels={1: "liver", 2: "kidneys"}, lesion_classes=["tumour"])
    with pytest.raises(ConfigError, match=r"^data.lesion_classes: 'tumour' is neither"):
        validate(cfg)


@pytest.mark.parametrize(
    "path,names,lesions",
    [
        ("configs/sample.yaml", {1: "liver", 2: "kidneys"}, []),
        ("configs/lesion.yaml", {1: "liver", 2: "kidneys", 3: "lesion"}, [3]),
    ],
)
def test_shipped_configs_name_their_classes(path, names, lesions):
    from pathlib import Path

    from medeman.config import load_config

    cfg = load_config([Path(__file__).resolve().parents[1] / path])
    assert class_names(cfg) == names and lesion_classes(cfg) == lesions
