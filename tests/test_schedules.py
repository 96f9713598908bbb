"""Run-relative schedules: fractions of train.max_steps unless given in steps."""

import pytest

from medeman.config import load_config
from medeman.schedules import run_schedule

CASES = [  # sets, (warmup, rampup, bcp pre-training, threshold momentum, focus refresh)
    (["train.max_steps=1000"], (100, 300, 100, 0.99, 200)),
    (["train.max_steps=500"], (50, 150, 50, 0.98, 100)),
    (["train.max_steps=20000", "ssl.momentum_window=0.05"], (2000, 6000, 2000, 0.999, 4000)),
    (["train.max_steps=1000", "ssl.warmup_steps=0", "ssl.rampup_steps=40"], (0, 40, 0, 0.99, 200)),
    (
        ["train.max_steps=1000", "ssl.bcp_pretrain_steps=250", "ssl.adaptive_threshold_momentum=0.9"],
        (100, 300, 250, 0.9, 200),
    ),
    (["train.max_steps=1000", "ssl.warmup_fraction=0.2", "ssl.rampup_fraction=0.5"], (200, 500, 200, 0.99, 200)),
    (["train.max_steps=3000", "data.unlabeled_focus_every_fraction=0.25"], (300, 900, 300, 1 - 1 / 300, 750)),
    (["train.max_steps=3000", "data.unlabeled_focus_every_steps=500"], (300, 900, 300, 1 - 1 / 300, 500)),
    (["train.max_steps=2"], (0, 1, 0, 0.0, 1)),  # a refresh period never rounds to 0 steps
]


@pytest.mark.parametrize("sets, expected", CASES)
def test_schedules_scale_with_the_run_unless_given_in_steps(sets, expected):
    s = run_schedule(load_config(sets=sets))
    assert (s.warmup_steps, s.rampup_steps, s.bcp_pretrain_steps) == expected[:3]
    assert s.threshold_momentum == pytest.approx(expected[3])
    assert s.focus_every_steps == expected[4]
