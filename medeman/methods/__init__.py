"""Semi-supervised methods as plug-ins (one file per method), their building blocks, and the registry.

A method is a :class:`~medeman.methods.base.Method` subclass; :data:`METHODS` maps each
``ssl.method`` value to its class. Adding one: a file with the subclass, a line here, and the
name in ``ssl.method``'s choices in :mod:`medeman.config`.
"""

from __future__ import annotations

from typing import Any

from medeman.config import ConfigError
from medeman.methods.base import Method, TeacherMethod
from medeman.methods.bcp import BCP
from medeman.methods.fixmatch import FixMatch
from medeman.methods.mean_teacher import MeanTeacher
from medeman.methods.supervised import Supervised, SupervisedEMA
from medeman.methods.ua_mt import UAMT

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,  # labeled scans only
    "supervised_ema": SupervisedEMA,  # labeled scans only, deployed EMA teacher (the weight-averaging control)
    "mean_teacher": MeanTeacher,  # Tarvainen & Valpola 2017, EMAN teacher (Cai et al. 2021)
    "fixmatch": FixMatch,  # FixMatch-EMAN (Sohn et al. 2020; Cai et al. 2021)
    "ua_mt": UAMT,  # Yu et al., MICCAI 2019
    "bcp": BCP,  # Bai et al., CVPR 2023
}


def build_method(cfg: dict[str, Any]) -> Method:
    """The method object of ``cfg["ssl"]["method"]``."""
    name = cfg["ssl"]["method"]
    if name not in METHODS:
        raise ConfigError(f"ssl.method: unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name](cfg)


__all__ = ["METHODS", "Method", "TeacherMethod", "build_method"]
