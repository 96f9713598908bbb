"""The baselines: supervised training on the labeled scans, with and without a deployed EMA teacher.

``supervised_ema`` is the control that separates what weight averaging gives from what the
unlabeled scans give: the same teacher machinery as the mean teacher (EMA of the student's weights,
EMAN statistics, re-estimation, the teacher deployed as ``teacher.pt``), but no unlabeled data and
no unsupervised loss — Polyak averaging (Polyak & Juditsky 1992; Izmailov et al. 2018) of a
supervised run.
"""

from __future__ import annotations

from medeman.methods.base import Method, TeacherMethod
from medeman.methods.registry import register_method


@register_method("supervised")
class Supervised(Method):
    """Labeled scans only; the student is validated and deployed (logged as both teacher and student)."""

    summary = "labeled data only, the baseline"


@register_method("supervised_ema")
class SupervisedEMA(TeacherMethod):
    """Labeled scans only, with an EMA teacher that is validated and deployed (the weight-averaging control)."""

    summary = "labeled data only, deployed EMA teacher: the weight-averaging control"
    training_loss = Method.training_loss
