"""The method registry: ``@register_method("name")`` makes a :class:`~medeman.methods.base.Method` subclass trainable.

Registering adds the name to ``ssl.method``'s choices and the class's own ``ssl`` keys
(:attr:`Method.options`, with their value rules and checks) to the config schema, so a new method
is one file, inside the package or out of it::

    @register_method("entropy_min")
    class EntropyMinimization(Method):
        summary = "supervised loss + the student's softmax entropy (Grandvalet & Bengio 2004)"
        options = {"entropy_min_weight": Option(0.1, "entropy_min: weight of the entropy term")}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from medeman.config import ConfigError, register_method_options
from medeman.methods.options import schema_options
from medeman.typed_config import Config

if TYPE_CHECKING:
    from medeman.methods.base import Method

METHODS: dict[str, type[Method]] = {}
_M = TypeVar("_M", bound="type[Method]")


def register_method(name: str) -> Callable[[_M], _M]:
    """Class decorator: register a method under the ``ssl.method`` value ``name``, with its own config keys.

    The class's ``name`` becomes ``name``; its ``summary``, and the options and ``check_options`` it
    defines itself (not inherited ones), go into :mod:`medeman.config`'s schema. Options are a frozen
    dataclass ``option_type`` (:mod:`medeman.methods.options`: its fields become the keys
    ``ssl.<name>_<field>``, read typed as ``Method.own_options``) or flat ``options`` and ``option_rules``.
    """

    def decorator(cls: _M) -> _M:
        own = vars(cls)
        options, rules = own.get("options", {}), own.get("option_rules", ())
        if "option_type" in own:
            derived = "option_prefix" in own  # filled by an earlier registration of this class
            if ("options" in own or "option_rules" in own) and not derived:
                raise ValueError(f"method {name}: declare its options as option_type or as options, not both")
            options, rules = schema_options(name, cls.option_type)
        register_method_options(  # first: a clash leaves nothing registered
            name,
            cls.summary,
            options,
            rules,
            option_check=cls.check_options if "check_options" in own else None,
            method_check=cls.check_config,
        )
        if "option_type" in own:  # the flat keys, as a method declaring options has them; read back under this name
            cls.options, cls.option_rules, cls.option_prefix = options, rules, name
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


def build_method(cfg: Config | Mapping[str, Any]) -> Method:
    """The method object of ``ssl.method`` (a dict is checked and frozen by the method, :func:`~medeman.typed_config.as_config`)."""
    # the name before the dict is checked: an unknown one gets the registry's answer
    name = cfg.ssl.method if isinstance(cfg, Config) else cfg["ssl"]["method"]
    if name not in METHODS:
        raise ConfigError(f"ssl.method: unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name](cfg)


def methods_markdown() -> str:
    """The registered methods as a Markdown table: name, summary and own ``ssl`` keys (``docs/development.md`` holds it)."""
    rows = ["| `ssl.method` | what it trains | its own `ssl` keys |", "|---|---|---|"]
    for name, cls in METHODS.items():
        keys = ", ".join(f"`{key}`" for key in vars(cls).get("options", {})) or "—"
        rows.append(f"| `{name}` | {cls.summary} | {keys} |")
    return "\n".join(rows) + "\n"
