"""Semi-supervised methods as plug-ins (one file per method), their building blocks, and the registry.

A method is a :class:`~medeman.methods.base.Method` subclass registered with
``@register_method("name")`` (:mod:`medeman.methods.registry`); :data:`METHODS` maps each
``ssl.method`` value to its class. Importing this package registers the built-in methods (in this
order: it is the order of ``ssl.method``'s choices and of their keys in ``configs/default.yaml``).
"""

from __future__ import annotations

from medeman.methods.base import Method, TeacherMethod
from medeman.methods.registry import METHODS, build_method, register_method

# the built-in methods register themselves on import
from medeman.methods.supervised import Supervised, SupervisedEMA  # noqa: E402  # isort: skip
from medeman.methods.mean_teacher import MeanTeacher  # noqa: E402  # isort: skip
from medeman.methods.fixmatch import FixMatch  # noqa: E402  # isort: skip
from medeman.methods.ua_mt import UAMT  # noqa: E402  # isort: skip
from medeman.methods.bcp import BCP  # noqa: E402  # isort: skip

__all__ = [
    "BCP",
    "FixMatch",
    "METHODS",
    "MeanTeacher",
    "Method",
    "Supervised",
    "SupervisedEMA",
    "TeacherMethod",
    "UAMT",
    "build_method",
    "register_method",
]
