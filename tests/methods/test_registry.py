"""medeman.methods: the registry, and a method added from outside the package trains end to end."""

import csv
import math

import pytest
import torch

from medeman import config
from medeman.checkpoint import load_teacher
from medeman.config import ConfigError, load_config
from medeman.config import Option
from medeman.methods import METHODS, Method, build_method, register_method
from medeman.methods.base import TeacherMethod
from medeman.train import fit
from tiny_config import TINY


class EntropyMinimization(Method):
    """Grandvalet & Bengio 2004: supervised loss + the student's mean softmax entropy on unlabeled patches."""

    summary = "supervised loss + the student's softmax entropy, Grandvalet & Bengio 2004"
    unlabeled_views = ("weak", "strong")
    options = {"entropy_min_weight": Option(0.1, "entropy_min: weight of the entropy term")}
    option_rules = (("entropy_min_weight", lambda v: v >= 0, "a non-negative weight"),)

    def training_loss(self, module, batch):
        sup, logs = super().training_loss(module, batch)
        probs = torch.softmax(module.student(batch["unlabeled"]["strong"]).float(), dim=1)
        entropy = -(probs * torch.log(probs + 1e-6)).sum(1).mean()
        weight = self.ssl.entropy_min_weight
        loss = sup + weight * entropy
        logs.update({"loss/entropy": entropy.detach(), "loss/total": loss.detach(), "ssl/weight": weight})
        return loss, logs


@pytest.fixture
def registry_restored():
    """Registering changes the package's registry and schema: put them back after the test."""
    saved = (
        dict(METHODS),
        dict(config.SCHEMA["ssl"]),
        list(config._VALUE_RULES),
        list(config._OPTION_CHECKS),
        dict(config._METHOD_CHECKS),
        dict(config._METHOD_SUMMARIES),
    )
    yield
    for live, old in zip(
        (
            METHODS,
            config.SCHEMA["ssl"],
            config._VALUE_RULES,
            config._OPTION_CHECKS,
            config._METHOD_CHECKS,
            config._METHOD_SUMMARIES,
        ),
        saved,
    ):
        live.clear()
        (live.extend if isinstance(live, list) else live.update)(old)


def test_every_config_choice_is_a_registered_method_and_back():
    assert set(config.SCHEMA["ssl"]["method"].choices) == set(METHODS)
    for name, cls in METHODS.items():
        method = build_method(load_config(sets=[f"ssl.method={name}"]))
        assert isinstance(method, cls) and method.name == name


# method -> (has a teacher, uses unlabeled scans)
ROLES = {
    "supervised": (False, False),
    "supervised_ema": (True, False),
    "mean_teacher": (True, True),
    "ua_mt": (True, True),
    "bcp": (True, True),
}


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


def test_a_method_registered_outside_the_package_trains_and_exports(make_cohort, tmp_path, registry_restored):
    """One decorated class with an option of its own; no file of medeman is touched."""
    register_method("entropy_min")(EntropyMinimization)
    assert METHODS["entropy_min"] is EntropyMinimization and "entropy_min" in config.SCHEMA["ssl"]["method"].choices
    assert "entropy_min_weight: 0.1" in config.render_yaml()  # a key of configs/default.yaml once registered
    with pytest.raises(ConfigError, match=r"^ssl.entropy_min_weight: -1.0 must be a non-negative weight$"):
        load_config(sets=["ssl.method=entropy_min", "ssl.entropy_min_weight=-1"])
    root = make_cohort(3, 2)
    cfg = load_config(sets=TINY + ["ssl.method=entropy_min", "ssl.entropy_min_weight=0.25", "train.max_steps=3"])
    result = fit(cfg, root / "labeled", root / "unlabeled", out_dir=tmp_path / "run", progress_bar=False)
    assert result.steps == 3 and 0.0 <= result.best_dice_teacher <= 1.0
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("loss/entropy")]
    entropies = [float(row["loss/entropy"]) for row in rows]
    assert len(entropies) == 3 and all(math.isfinite(e) for e in entropies)
    assert {float(row["ssl/weight"]) for row in rows} == {0.25}  # the method read its own option
    net, saved, payload = load_teacher(tmp_path / "run")
    assert saved["ssl"]["method"] == "entropy_min" and payload["extra"]["teacher_bn_stats"] == "batch"
    assert saved["ssl"]["entropy_min_weight"] == 0.25


def test_registering_a_key_twice_differently_is_refused(registry_restored):
    class Clash(Method):
        options = {"bcp_box_fraction": Option(0.5, "another meaning")}

    with pytest.raises(ValueError, match="ssl.bcp_box_fraction of method clash is already declared"):
        register_method("clash")(Clash)


def test_each_method_declares_its_own_keys_in_its_file():
    """The method-specific keys live in the method's class, not in the shared schema file."""
    owners = {key: name for name, cls in METHODS.items() for key in vars(cls).get("options", {})}
    assert owners == {
        "fixmatch_threshold": "fixmatch",
        "fixmatch_consistency_weight": "fixmatch",
        "fixmatch_class_weighted": "fixmatch",
        "fixmatch_paste_probability": "fixmatch",
        "fixmatch_distribution_alignment": "fixmatch",
        "ua_mt_passes": "ua_mt",
        "ua_mt_noise_std": "ua_mt",
        "ua_mt_noise_clip": "ua_mt",
        "ua_mt_threshold_start": "ua_mt",
        "bcp_box_fraction": "bcp",
        "bcp_unlabeled_weight": "bcp",
        "bcp_pretrain_steps": "bcp",
        "bcp_keep_components": "bcp",
    }
    assert set(owners) <= set(config.SCHEMA["ssl"])


def test_the_docs_list_every_registered_method_and_its_keys():
    from pathlib import Path

    from medeman.methods.registry import methods_markdown

    text = (Path(__file__).parents[2] / "docs" / "development.md").read_text()
    table = text.split("<!-- methods table: begin -->\n")[1].split("<!-- methods table: end -->")[0]
    assert table == methods_markdown()
