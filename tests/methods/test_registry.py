"""medeman.methods: the registry, and a method added from outside the package trains end to end."""

import csv
import dataclasses
import math

import pytest
import torch

from medeman import config
from medeman.checkpoint import load_teacher
from medeman.config import ConfigError, load_config
from medeman.methods import METHODS, Method, build_method
from medeman.methods.base import TeacherMethod
from medeman.train import fit

TINY = ["model.channels=[4,8]", "model.num_res_units=1", "data.patch_size=[16,16,16]", "data.spacing=[1,1,1]",
        "data.num_classes=3", "data.num_workers=0", "data.cache=none", "data.val_fraction=0.34",
        "train.val_every_steps=2", "train.log_every_steps=1", "ssl.rampup_steps=2", "ssl.warmup_steps=0"]


class EntropyMinimization(Method):
    """Grandvalet & Bengio 2004: supervised loss + the student's mean softmax entropy on unlabeled patches."""

    name = "entropy_min"
    unlabeled_views = ("weak", "strong")

    def training_loss(self, module, batch):
        sup, logs = super().training_loss(module, batch)
        probs = torch.softmax(module.student(batch["unlabeled"]["strong"]).float(), dim=1)
        entropy = -(probs * torch.log(probs + 1e-6)).sum(1).mean()
        loss = sup + 0.1 * entropy
        logs.update({"loss/entropy": entropy.detach(), "loss/total": loss.detach()})
        return loss, logs


def test_every_config_choice_is_a_registered_method_and_back():
    assert set(config.SCHEMA["ssl"]["method"].choices) == set(METHODS)
    for name, cls in METHODS.items():
        method = build_method(load_config(sets=[f"ssl.method={name}"]))
        assert isinstance(method, cls) and method.name == name


# method -> (has a teacher, uses unlabeled scans)
ROLES = {"supervised": (False, False), "supervised_ema": (True, False), "mean_teacher": (True, True),
         "ua_mt": (True, True), "bcp": (True, True)}


@pytest.mark.parametrize("name", sorted(ROLES))
def test_each_method_says_what_it_needs(name):
    method = build_method(load_config(sets=[f"ssl.method={name}"]))
    assert (isinstance(method, TeacherMethod), method.uses_unlabeled) == ROLES[name]


def test_unregistered_method_is_refused_with_the_registered_names():
    cfg = load_config()
    cfg["ssl"]["method"] = "mixmatch"
    with pytest.raises(ConfigError, match="registered: supervised, supervised_ema, mean_teacher, fixmatch"):
        build_method(cfg)


def test_bcp_needs_as_many_unlabeled_as_labeled_patches():
    cfg = load_config(sets=["ssl.method=bcp", "data.batch_size_unlabeled=4"])
    with pytest.raises(ConfigError, match="batch_size_unlabeled"):
        build_method(cfg).check(cfg, has_unlabeled=True)


def test_a_method_registered_outside_the_package_trains_and_exports(make_cohort, tmp_path, monkeypatch):
    """One class + one registry line + one config choice; no file of medeman is touched."""
    monkeypatch.setitem(METHODS, "entropy_min", EntropyMinimization)
    option = config.SCHEMA["ssl"]["method"]
    monkeypatch.setitem(config.SCHEMA["ssl"], "method", dataclasses.replace(option, choices=(*option.choices, "entropy_min")))
    root = make_cohort(3, 2)
    cfg = load_config(sets=TINY + ["ssl.method=entropy_min", "train.max_steps=3"])
    result = fit(cfg, root / "labeled", root / "unlabeled", out_dir=tmp_path / "run", progress_bar=False)
    assert result.steps == 3 and 0.0 <= result.best_dice_teacher <= 1.0
    with open(tmp_path / "run" / "metrics.csv") as handle:
        entropies = [float(row["loss/entropy"]) for row in csv.DictReader(handle) if row.get("loss/entropy")]
    assert len(entropies) == 3 and all(math.isfinite(e) for e in entropies)
    net, saved, payload = load_teacher(tmp_path / "run")
    assert saved["ssl"]["method"] == "entropy_min" and payload["extra"]["teacher_bn_stats"] == "batch"
