"""medeman.methods.options: a method's options dataclass becomes flat ssl keys and a typed object of the method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from medeman import config
from medeman.config import SCHEMA, ConfigError, Option, load_config
from medeman.methods import METHODS, Method, build_method, register_method
from medeman.methods.bcp import BCPOptions
from medeman.methods.fixmatch import FixMatchOptions
from medeman.methods.options import option, schema_options
from medeman.methods.ua_mt import UAMTOptions


@dataclass(frozen=True)
class DropOptions:
    rate: float = option(
        0.5, "share of the unlabeled patches dropped", rule=(lambda v: 0 <= v < 1, "a share in [0, 1)")
    )
    mode: str = option("random", "which patches are dropped", choices=("random", "hardest"))
    every: int | None = option(None, "drop every this many steps; null: every step", type=int)


class Drop(Method):
    """A method from outside the package with its options as a dataclass."""

    summary = "drops unlabeled patches"
    option_type = DropOptions


@pytest.fixture
def drop_registered():
    """Register :class:`Drop` as ``drop``; put the registry and schema back afterwards."""
    saved = (
        dict(METHODS),
        dict(SCHEMA["ssl"]),
        list(config._VALUE_RULES),
        dict(config._METHOD_CHECKS),
        dict(config._METHOD_SUMMARIES),
    )
    register_method("drop")(Drop)
    yield
    for live, old in zip(
        (METHODS, SCHEMA["ssl"], config._VALUE_RULES, config._METHOD_CHECKS, config._METHOD_SUMMARIES), saved
    ):
        live.clear()
        (live.extend if isinstance(live, list) else live.update)(old)


def test_the_fields_become_flat_ssl_keys_with_the_method_name(drop_registered):
    assert SCHEMA["ssl"]["drop_rate"] == Option(0.5, "drop: share of the unlabeled patches dropped")
    assert SCHEMA["ssl"]["drop_mode"] == Option("random", "drop: which patches are dropped", ("random", "hardest"))
    assert SCHEMA["ssl"]["drop_every"] == Option(None, "drop: drop every this many steps; null: every step", type=int)
    assert list(Drop.options) == ["drop_rate", "drop_mode", "drop_every"]  # what the docs table lists
    assert "  drop_every: null  # drop: drop every this many steps; null: every step" in config.render_yaml()


def test_the_method_reads_its_options_typed(drop_registered):
    method = build_method(load_config(sets=["ssl.method=drop", "ssl.drop_rate=0", "ssl.drop_every=1e2"]))
    assert method.own_options == DropOptions(rate=0.0, mode="random", every=100)
    assert type(method.own_options.rate) is float and type(method.own_options.every) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.own_options.rate = 0.1  # type: ignore[misc]


# item, the one-line error
BAD_VALUES = [
    ("ssl.drop_rate=1", r"^ssl.drop_rate: 1.0 must be a share in \[0, 1\)$"),
    ("ssl.drop_mode=easiest", r"^ssl.drop_mode: 'easiest' is not one of random, hardest$"),
    ("ssl.drop_every=x", r"^ssl.drop_every: 'x' is not an integer$"),
]


@pytest.mark.parametrize("item, message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_of_the_fields_are_refused_at_load_time(drop_registered, item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(sets=[item])


def test_options_declared_twice_are_refused(drop_registered):
    class Both(Method):
        option_type = DropOptions
        options = {"both_rate": Option(0.5, "both: rate")}

    with pytest.raises(ValueError, match="method both: declare its options as option_type or as options, not both"):
        register_method("both")(Both)
    assert "both" not in METHODS and "both_rate" not in SCHEMA["ssl"]


# built-in method, its options type, --set items, the typed options expected
BUILT_IN = [
    ("bcp", BCPOptions, ["ssl.bcp_keep_components=[1, 2]", "data.num_classes=3"], {"keep_components": (1, 2)}),
    ("bcp", BCPOptions, ["ssl.bcp_pretrain_steps=5"], {"pretrain_steps": 5}),
    ("ua_mt", UAMTOptions, ["ssl.ua_mt_passes=2", "ssl.ua_mt_noise_std=0"], {"passes": 2, "noise_std": 0.0}),
    ("fixmatch", FixMatchOptions, ["ssl.fixmatch_threshold=0.8"], {"threshold": 0.8}),
]


@pytest.mark.parametrize("name, kind, sets, changed", BUILT_IN, ids=[f"{b[0]}-{b[2][0]}" for b in BUILT_IN])
def test_built_in_methods_read_their_config_keys_as_options(name, kind, sets, changed):
    method = build_method(load_config(sets=[f"ssl.method={name}", *sets]))
    assert method.own_options == dataclasses.replace(kind(), **changed)


@pytest.mark.parametrize("name, kind", [("bcp", BCPOptions), ("ua_mt", UAMTOptions), ("fixmatch", FixMatchOptions)])
def test_built_in_keys_are_their_options_fields(name, kind):
    options, _ = schema_options(name, kind)
    assert {key: SCHEMA["ssl"][key] for key in options} == options
    assert METHODS[name].options == options
