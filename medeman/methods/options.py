"""A method's own options as a frozen dataclass, from which the registry makes its flat ``ssl`` config keys.

Each field is one option (:func:`option`: default, one-line help, value rule). Registered with
``@register_method("bcp")``, the fields of ``BCPOptions`` become the keys ``ssl.bcp_<field>`` of the
schema (the names configs, tune spaces and ``configs/default.yaml`` use), and the method reads its
values typed, from its own object (:attr:`medeman.methods.base.Method.own_options`)::

    @dataclass(frozen=True)
    class BCPOptions:
        box_fraction: float = option(2 / 3, "side of the copy-paste box", rule=(lambda v: 0 < v <= 1, "a fraction in (0, 1]"))

    @register_method("bcp")
    class BCP(TeacherMethod):
        option_type = BCPOptions          # ssl.bcp_box_fraction
        ...
        self.own_options.box_fraction     # 0.666..., a float
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from medeman.config import Option

Rule = tuple[Callable[[Any], bool], str]


def option(
    default: Any, help: str, *, type: type | None = None, choices: tuple | None = None, rule: Rule | None = None
) -> Any:
    """A field of a method's options dataclass.

    Args:
        default: the default value (a tuple for a list).
        help: one line for ``configs/default.yaml``, without the method's name (the registry prefixes it).
        type: the value's type where the default does not say it (a ``None`` default).
        choices: the allowed values, if fixed.
        rule: ``(holds, requirement)``: ``ssl.<key>: value must be <requirement>`` when ``holds(value)`` is false.
    """
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "choices": choices, "rule": rule})


def schema_options(method: str, option_type: type) -> tuple[dict[str, Option], tuple[tuple[str, Any, str], ...]]:
    """The flat ``ssl`` keys (``<method>_<field>``) of ``option_type``'s fields and their value rules."""
    options, rules = {}, []
    for field in dataclasses.fields(option_type):
        key, meta = f"{method}_{field.name}", field.metadata
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        options[key] = Option(default, f"{method}: {meta['help']}", meta["choices"], meta["type"])
        if meta["rule"] is not None:
            rules.append((key, *meta["rule"]))
    return options, tuple(rules)


def read_options(method: str, option_type: type, ssl: Any) -> Any:
    """``option_type`` with the values of the config's ``ssl`` section (a :class:`~medeman.typed_config.Config`'s)."""
    return option_type(
        **{field.name: getattr(ssl, f"{method}_{field.name}") for field in dataclasses.fields(option_type)}
    )
