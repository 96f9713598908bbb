"""Tests for medeman.typed_config: the checked config as frozen per-section dataclasses."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

import medeman.methods  # noqa: F401 - registers the methods' own ssl keys, as every command does
from medeman import config
from medeman.config import SCHEMA, ConfigError, Option, load_config, save_config
from medeman.methods import METHODS, Method, register_method
from medeman.typed_config import Config, as_config, section_type

KEYS = [(section, key) for section, options in SCHEMA.items() for key in options]

# --set value -> the value read back as an attribute (converted by the schema), and its type
CONVERSIONS = [
    ("train.max_steps=2e3", "train", "max_steps", 2000, int),
    ("train.lr=1", "train", "lr", 1.0, float),
    ("train.precision=32", "train", "precision", "32", str),
    ("data.patch_size=[32,48,64]", "data", "patch_size", (32, 48, 64), tuple),
    ("data.labels={1: liver}", "data", "labels", {1: "liver"}, type(None)),
    ("ssl.rampup_steps=5e2", "ssl", "rampup_steps", 500, int),
    ("tune.momentum_window=null", "tune", "momentum_window", None, type(None)),
]


@pytest.mark.parametrize("section, key", KEYS, ids=[f"{s}.{k}" for s, k in KEYS])
def test_every_schema_key_is_an_attribute_with_its_default(section, key):
    value = getattr(getattr(as_config(load_config()), section), key)
    default = SCHEMA[section][key].default
    assert value == (tuple(default) if isinstance(default, list) else default)


def test_each_section_has_exactly_the_schema_keys():
    cfg = as_config(load_config())
    assert [field.name for field in dataclasses.fields(cfg)] == list(SCHEMA)
    for section, options in SCHEMA.items():
        assert [field.name for field in dataclasses.fields(getattr(cfg, section))] == list(options), section


@pytest.mark.parametrize("item, section, key, expected, kind", CONVERSIONS, ids=[c[0] for c in CONVERSIONS])
def test_set_values_read_back_converted(item, section, key, expected, kind):
    value = getattr(getattr(as_config(load_config(sets=[item])), section), key)
    assert value == expected
    if kind is not type(None):
        assert type(value) is kind


def test_the_config_is_frozen_and_its_lists_and_maps_are_read_only():
    cfg = as_config(load_config(sets=["data.labels={1: liver}", "train.ce_class_weights=[1, 2]"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = cfg.data  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.data.labels[2] = "kidney"  # type: ignore[index]
    assert cfg.train.ce_class_weights == (1, 2) and isinstance(cfg.model.channels, tuple)


def test_an_unknown_key_is_an_attribute_error():
    cfg = as_config(load_config())
    with pytest.raises(AttributeError, match="max_step"):
        cfg.train.max_step  # noqa: B018 - the typo is the test
    with pytest.raises(AttributeError):
        cfg.optim  # noqa: B018


def test_to_dict_round_trips_through_as_config_and_the_saved_yaml(tmp_path):
    plain = load_config(
        sets=["data.num_classes=3", "data.labels={1: liver, 2: tumour}", "model.channels=[4,8]", "train.lr=1"]
    )
    cfg = as_config(plain)
    assert cfg.to_dict() == plain  # lists again, as load_config gives
    assert isinstance(cfg.to_dict()["data"]["patch_size"], list) and isinstance(cfg.to_dict()["data"]["labels"], dict)
    assert as_config(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config([tmp_path / "config.yaml"]) == plain
    assert as_config(load_config([tmp_path / "config.yaml"])) == cfg


def test_pickle_and_deepcopy_give_an_equal_config():
    """Loader workers and Lightning copy what holds the config: the run-time-made section types survive it."""
    cfg = as_config(load_config(sets=["data.labels={1: liver}"]))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert copy.deepcopy(cfg) == cfg


def test_as_config_checks_a_dict_on_a_copy_and_keeps_a_config():
    plain = load_config()
    plain["train"]["max_steps"] = 3e3
    cfg = as_config(plain)
    assert cfg.train.max_steps == 3000 and plain["train"]["max_steps"] == 3e3  # the dict is not changed
    assert as_config(cfg) is cfg
    del plain["ssl"]["ema_momentum"]  # a dict without a key takes its default
    assert as_config(plain).ssl.ema_momentum == SCHEMA["ssl"]["ema_momentum"].default
    plain["train"]["lr"] = "abc"
    with pytest.raises(ConfigError, match=r"^train.lr: 'abc' is not a number$"):
        as_config(plain)
    plain["train"]["lr"], plain["train"]["optim"] = 1e-3, "sgd"
    with pytest.raises(ConfigError, match="unknown config key 'train.optim'"):
        as_config(plain)


class Entropy(Method):
    """A method from outside the package with an ssl key of its own."""

    summary = "supervised loss + the student's softmax entropy"
    options = {"entropy_weight": Option(0.1, "entropy: weight of the entropy term")}


@pytest.fixture
def outside_method():
    """Register :class:`Entropy` as ``entropy``; put the registry and schema back afterwards."""
    saved = (dict(METHODS), dict(SCHEMA["ssl"]), dict(config._METHOD_CHECKS), dict(config._METHOD_SUMMARIES))
    register_method("entropy")(Entropy)
    yield
    for live, old in zip((METHODS, SCHEMA["ssl"], config._METHOD_CHECKS, config._METHOD_SUMMARIES), saved):
        live.clear()
        live.update(old)


def test_a_method_registered_from_outside_has_its_option_as_an_attribute(outside_method):
    cfg = as_config(load_config(sets=["ssl.method=entropy", "ssl.entropy_weight=0.25"]))
    assert cfg.ssl.entropy_weight == 0.25 and cfg.ssl.method == "entropy"
    assert METHODS["entropy"](cfg).ssl.entropy_weight == 0.25  # what the method reads


def test_the_ssl_type_is_made_again_when_the_schema_changes(outside_method):
    with_entropy = section_type("ssl")
    assert "entropy_weight" in {field.name for field in dataclasses.fields(with_entropy)}
    del SCHEMA["ssl"]["entropy_weight"]
    assert section_type("ssl") is not with_entropy
    assert not hasattr(as_config(load_config()).ssl, "entropy_weight")


def test_config_sections_are_the_schema_sections():
    assert [field.name for field in dataclasses.fields(Config)] == list(SCHEMA)
