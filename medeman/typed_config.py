"""The typed configuration: a checked config as frozen objects, one per schema section.

:func:`medeman.config.load_config` gives the writable nested dict (``--set`` overrides, tuning
and resume write into it); :func:`as_config` checks it once and turns it into a :class:`Config`
whose sections are frozen dataclasses made from :data:`medeman.config.SCHEMA`, so code reads
``cfg.train.max_steps`` (an ``int``, converted by the schema) instead of
``int(cfg["train"]["max_steps"])``, and a mistyped key fails as an ``AttributeError``.

Values are frozen too: lists become tuples, mappings (``data.labels``) read-only mappings;
:meth:`Config.to_dict` gives the plain dict back (lists again) for YAML, checkpoints and tuning.
The section types are made from the *current* schema: a method registered later
(:func:`medeman.methods.register_method`) adds its ``ssl`` keys, and the ``ssl`` type is made
again with them.

Examples:
    >>> from medeman.config import load_config
    >>> cfg = as_config(load_config(sets=["train.max_steps=2e3"]))
    >>> cfg.train.max_steps, cfg.data.patch_size
    (2000, (96, 96, 96))
"""

from __future__ import annotations

import copy
import dataclasses
import types
from typing import Any, Mapping

from medeman.config import SCHEMA, default_config, merge, validate


class Section:
    """Base of the frozen per-section dataclasses (:func:`section_type`); ``to_dict`` gives the plain values."""

    section: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The section's keys and values as a plain dict (tuples as lists, read-only mappings as dicts)."""
        return {field.name: plain(getattr(self, field.name)) for field in dataclasses.fields(self)}

    def __reduce__(self) -> tuple:
        # the section types are made at run time, so pickling (loader workers, deepcopy) goes through the values
        return _section_from_dict, (self.section, self.to_dict())


_TYPES: dict[tuple[str, tuple[str, ...]], type[Section]] = {}


def section_type(section: str) -> type[Section]:
    """The frozen dataclass of ``section`` with one field per key the schema holds now (made once per set of keys)."""
    keys = tuple(SCHEMA[section])
    made = _TYPES.get((section, keys))
    if made is None:
        made = dataclasses.make_dataclass(
            f"{section.capitalize()}Config",
            [(key, Any) for key in keys],
            bases=(Section,),
            namespace={"section": section, "__module__": __name__},
            frozen=True,
        )
        _TYPES[(section, keys)] = made
    return made


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    return value


def plain(value: Any) -> Any:
    """A config value as plain data again: tuples as lists, read-only mappings as dicts (for JSON, YAML and text)."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def _section_from_dict(section: str, values: Mapping[str, Any]) -> Section:
    return section_type(section)(**{key: _freeze(value) for key, value in values.items()})


@dataclasses.dataclass(frozen=True)
class Config:
    """A checked medeman configuration, one frozen section per :data:`~medeman.config.SCHEMA` section.

    Made by :func:`as_config`; each section has one attribute per key, with the value the schema
    converted (``train.max_steps`` an ``int``, ``train.lr`` a ``float``, lists as tuples).
    """

    data: Section
    model: Section
    ssl: Section
    train: Section
    infer: Section
    tune: Section

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The plain nested dict (as :func:`medeman.config.load_config` gives), for saving and for changing values."""
        return {field.name: getattr(self, field.name).to_dict() for field in dataclasses.fields(self)}


def as_config(cfg: Config | Mapping[str, Mapping[str, Any]]) -> Config:
    """``cfg`` as a :class:`Config`: a Config as it is, a nested dict checked (:func:`medeman.config.validate`) and frozen.

    The dict is not changed (it is checked on a copy); a key it lacks takes its default.

    Raises:
        ConfigError: a dict the schema refuses (missing or unknown keys, bad values).
    """
    if isinstance(cfg, Config):
        return cfg
    return frozen(validate(merge(default_config(), copy.deepcopy(dict(cfg)))))


def frozen(checked: Mapping[str, Mapping[str, Any]]) -> Config:
    """A dict whose values :func:`~medeman.config.validate` converted, as a :class:`Config`, without checking it again.

    For the rules :func:`~medeman.config.validate` runs on the typed values (the methods' ``check_config``).
    """
    return Config(
        **{
            section: _section_from_dict(section, {key: checked[section][key] for key in options})
            for section, options in SCHEMA.items()
        }
    )
