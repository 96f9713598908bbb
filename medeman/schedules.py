"""Run-relative schedules: the warm-up, ramp-up and statistics windows of a run, resolved once from the config.

Every schedule of a semi-supervised run is a fraction of ``train.max_steps`` unless the config
gives it in steps, so a 500-step CPU run and a 20k-step GPU run get the same shape of training:
a supervised warm-up (``ssl.warmup_fraction``), then the unsupervised weight ramps up
(``ssl.rampup_fraction``, Laine & Aila's ``exp(-5(1-t)^2)``), and statistics that are EMA'd
(the teacher, the adaptive thresholds) average over the same window of the run
(``ssl.momentum_window``); the teacher-focused crops are refreshed every
``data.unlabeled_focus_every_fraction`` of the run. One function resolves them; methods, tuning
and the docs read it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from medeman.eman import scheduled_momentum
from medeman.typed_config import Config, as_config


@dataclass(frozen=True)
class RunSchedule:
    """The step counts of one run's schedules.

    Attributes:
        max_steps: optimizer steps of the run.
        warmup_steps: supervised-only steps; a teacher method starts its teacher from the student at their end.
        rampup_steps: steps of the unsupervised weight's sigmoid ramp-up after the warm-up.
        bcp_pretrain_steps: BCP's labeled-only copy-paste pre-training (the warm-up unless set).
        threshold_momentum: EMA momentum of the adaptive pseudo-label thresholds' statistics.
        focus_every_steps: the teacher-focused unlabeled crops' refresh period (``medeman.teacher_focus``).
    """

    max_steps: int
    warmup_steps: int
    rampup_steps: int
    bcp_pretrain_steps: int
    threshold_momentum: float
    focus_every_steps: int


def run_schedule(cfg: Config | dict[str, Any]) -> RunSchedule:
    """Resolve ``cfg``'s schedules to steps: a key given in steps wins, ``null`` takes its fraction of ``train.max_steps``.

    Examples:
        >>> s = run_schedule(load_config(sets=["train.max_steps=1000"]))
        >>> s.warmup_steps, s.rampup_steps, round(s.threshold_momentum, 3), s.focus_every_steps
        (100, 300, 0.99, 200)
    """
    cfg = as_config(cfg)
    ssl, steps = cfg.ssl, cfg.train.max_steps

    def resolved(steps_given: int | None, fraction: float) -> int:
        return steps_given if steps_given is not None else round(fraction * steps)

    warmup = resolved(ssl.warmup_steps, ssl.warmup_fraction)
    momentum = ssl.adaptive_threshold_momentum
    return RunSchedule(
        max_steps=steps,
        warmup_steps=warmup,
        rampup_steps=resolved(ssl.rampup_steps, ssl.rampup_fraction),
        bcp_pretrain_steps=ssl.bcp_pretrain_steps if ssl.bcp_pretrain_steps is not None else warmup,
        threshold_momentum=momentum
        if momentum is not None
        else scheduled_momentum(0, steps, schedule="window", window=ssl.momentum_window),
        focus_every_steps=max(
            1, resolved(cfg.data.unlabeled_focus_every_steps, cfg.data.unlabeled_focus_every_fraction)
        ),
    )


def steady_state_config(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (a validated plain-dict copy) without the run's opening phases: no supervised warm-up, no ramp-up, no BCP
    pre-training, so every method runs all of its passes from step 0, as most of a run's steps do (what
    :func:`medeman.planning.time_training_steps` times)."""
    from medeman.config import validate

    plain_cfg = copy.deepcopy(cfg.to_dict() if isinstance(cfg, Config) else cfg)
    ssl = plain_cfg["ssl"]
    ssl.update(warmup_steps=0, rampup_steps=0)
    if "bcp_pretrain_steps" in ssl:  # BCP's own key: present when the method is BCP
        ssl["bcp_pretrain_steps"] = 0
    return validate(plain_cfg)
