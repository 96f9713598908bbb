"""Small structures in training: CE class weights, DynUNet deep supervision, adaptive thresholds and the teacher focus, wired."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from medeman.config import ConfigError, load_config
from medeman.data import SSLDataModule
from medeman.module import SSLSegModule
from medeman.nets import build_network, deep_supervision_weights
from medeman.teacher_focus import TeacherFocus, focus_centres
from tiny_config import TINY_BASE
from tiny_patches import TinyData

TINY = [
    "model.channels=[4,8]",
    "model.num_res_units=1",
    "data.patch_size=[16,16,16]",
    "data.spacing=null",
    "train.lr=0.01",
]
DYNUNET = ["model.name=dynunet", "model.channels=[4,8,16]", "data.patch_size=[16,16,16]", "data.spacing=null"]


def _fit(cfg, steps=2):
    module = SSLSegModule(cfg)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=TinyData())
    return module, trainer


def _logits_and_label():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    label = torch.randint(0, 3, (2, 1, 4, 4, 4))
    return logits, label


def test_ce_class_weights_weight_the_cross_entropy_only():
    logits, label = _logits_and_label()
    plain = SSLSegModule(load_config(sets=TINY + ["data.num_classes=3"])).supervised_loss
    weighted = SSLSegModule(
        load_config(sets=TINY + ["data.num_classes=3", "train.ce_class_weights=[1, 2, 10]"])
    ).supervised_loss
    ce = nn.functional.cross_entropy(logits, label[:, 0])
    weighted_ce = nn.functional.cross_entropy(logits, label[:, 0], weight=torch.tensor([1.0, 2.0, 10.0]))
    # same Dice in both: the difference is exactly the difference of the cross-entropies
    assert (weighted(logits, label) - plain(logits, label)).item() == pytest.approx((weighted_ce - ce).item(), rel=1e-5)


def test_deep_supervision_loss_is_the_weighted_sum_over_heads():
    cfg = load_config(
        sets=DYNUNET + ["data.num_classes=3", "train.deep_supervision=true", "train.deep_supervision_heads=1"]
    )
    module = SSLSegModule(cfg)
    plain = SSLSegModule(load_config(sets=DYNUNET + ["data.num_classes=3"])).supervised_loss
    logits, label = _logits_and_label()
    low = torch.randn_like(logits)
    w = deep_supervision_weights(2)
    assert w == pytest.approx([2 / 3, 1 / 3])
    expected = w[0] * plain(logits, label) + w[1] * plain(low, label)
    assert module.supervised_loss([logits, low], label).item() == pytest.approx(expected.item(), rel=1e-5)


def test_deep_supervision_trains_and_evaluates_with_one_output():
    cfg = load_config(
        sets=DYNUNET
        + [
            "train.deep_supervision=true",
            "train.deep_supervision_heads=1",
            "ssl.pseudo_label_threshold=0.5",
            "ssl.rampup_steps=0",
            "ssl.warmup_steps=0",
        ]
    )
    module, trainer = _fit(cfg)
    assert trainer.global_step == 2
    x = torch.randn(1, 1, 16, 16, 16)
    module.student.train()
    assert module.student(x).shape == (1, 2, 2, 16, 16, 16)  # full resolution + 1 deep-supervision head, stacked
    module.eval()
    assert module.student(x).shape == module.teacher(x).shape == (1, 2, 16, 16, 16)  # validation, export, inference
    deployed = build_network(cfg)  # what medeman.checkpoint rebuilds from teacher.pt's config
    deployed.load_state_dict(module.teacher.state_dict())


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.deep_supervision=true"], "needs model.name=dynunet"),
        (DYNUNET + ["train.deep_supervision=true", "train.deep_supervision_heads=2"], "must lie in 1..1"),
        (["train.ce_class_weights=[1, 2, 3]"], "must be null or 2 non-negative numbers"),
        (["data.class_ratios=[0, 0]"], "not all 0"),
        (["data.fg_class_fraction=1.5"], "must be a number in"),
        (["data.unlabeled_focus_classes=[0]"], "foreground classes in 1..1"),
        (["ssl.adaptive_threshold_momentum=1.0"], "must be a number in"),
    ],
)
def test_bad_small_structure_settings_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(sets=sets)


def test_adaptive_thresholds_train_and_travel_in_the_checkpoint(tmp_path):
    cfg = load_config(
        sets=TINY
        + [
            "ssl.pseudo_label_threshold=0.9",
            "ssl.pseudo_label_threshold_mode=adaptive",
            "ssl.adaptive_threshold_momentum=0.5",
            "ssl.rampup_steps=0",
            "ssl.warmup_steps=0",
        ]
    )
    module, trainer = _fit(cfg)
    state = module.adaptive_thresholds.state_dict()
    assert not torch.allclose(state["class_confidence"], torch.full((2,), 0.5))  # moved off 1/C
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(saved["adaptive_thresholds.class_confidence"], state["class_confidence"])
    assert (module.adaptive_thresholds.thresholds() <= 0.9).all()
    logged = trainer.callback_metrics  # logged at the logging steps (log_every_n_steps=1: every step)
    assert {"ssl/threshold_class0", "ssl/threshold_class1"} <= set(logged)
    assert any(key.startswith("ssl/pseudo_label_kept_class") for key in logged)


def test_fixed_mode_has_no_adaptive_state():
    assert "adaptive_thresholds" not in dict(
        SSLSegModule(load_config(sets=TINY + ["ssl.pseudo_label_threshold=0.9"])).named_children()
    )


# ---- teacher focus -------------------------------------------------------------------------------------


def test_focus_centres_choose_the_class_uniformly_then_the_voxel():
    labels = torch.zeros(16, 16, 16, dtype=torch.long)
    labels[:8] = 1  # a big class: 2048 voxels
    labels[10, 10, 10] = 2  # one voxel
    centres = focus_centres(labels, [1, 2], 400, 1, __import__("numpy").random.RandomState(0))
    on_two = (centres == [10, 10, 10]).all(axis=1).mean()
    assert 0.4 < on_two < 0.6  # half the centres on the one-voxel class
    assert (labels[tuple(torch.as_tensor(centres).T)] > 0).all()
    on_grid = focus_centres(labels, [1, 2], 50, 4, __import__("numpy").random.RandomState(0))
    assert (on_grid % 4 == 0).all() and not (on_grid == [10, 10, 10]).all(
        axis=1
    ).any()  # (10,10,10) is off the stride-4 grid
    assert len(focus_centres(labels, [3], 10, 1, __import__("numpy").random.RandomState(0))) == 0


class _BrightIsClassTwo(nn.Module):
    """A stand-in teacher: class 2 wherever the normalized intensity exceeds 0.8 (the phantom's 200 HU organ)."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x), 10.0 * (x > 0.8).float()], dim=1)


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_refreshed_focus_centres_unlabeled_patches_on_the_teacher_class(make_cohort, cfg, tmp_path, cache):
    root = make_cohort(2, 3)
    cfg["data"].update(
        cache=cache,
        unlabeled_focus_fraction=1.0,
        unlabeled_focus_stride=1,
        flip_prob=0.0,
        rotate90_prob=0.0,
        strong_prob=0.0,
        patch_size=[8, 8, 8],
    )
    dm = SSLDataModule(cfg, root / "labeled", root / "unlabeled", run_dir=tmp_path)
    dm.setup("fit")
    assert dm.focus is not None and dm.focus.centres.is_shared()  # loader workers see refreshes in place
    _, focused = TeacherFocus(cfg).refresh(dm, _BrightIsClassTwo(), torch.device("cpu"))
    assert focused == 3
    for _ in range(2):
        batch = next(iter(dm.train_dataloader()))["unlabeled"]["weak"]
        assert (batch[:, 0, 4, 4, 4] > 0.8).all()  # every patch centred on a voxel the teacher calls class 2


def test_module_adds_the_focus_callback_only_when_asked():
    assert SSLSegModule(load_config(sets=TINY)).configure_callbacks() == []
    callbacks = SSLSegModule(load_config(sets=TINY + ["data.unlabeled_focus_fraction=0.5"])).configure_callbacks()
    assert [type(c) for c in callbacks] == [TeacherFocus]
    assert (
        SSLSegModule(
            load_config(sets=TINY + ["data.unlabeled_focus_fraction=0.5", "ssl.method=supervised"])
        ).configure_callbacks()
        == []
    )


@pytest.mark.parametrize(
    "sets, every",
    [
        (["train.max_steps=1000"], 200),  # the schema's 0.2 of the run
        (["train.max_steps=3000", "data.unlabeled_focus_every_fraction=0.25"], 750),
        (["train.max_steps=3000", "data.unlabeled_focus_every_steps=500"], 500),  # given in steps: not scaled
    ],
)
def test_focus_refresh_period_is_a_fraction_of_the_run_unless_given_in_steps(sets, every):
    assert TeacherFocus(load_config(sets=TINY + ["data.unlabeled_focus_fraction=0.5", *sets])).every == every


def test_a_resume_that_extends_the_run_keeps_the_focus_refresh_where_it_was():
    from medeman.resume import pin_schedules

    saved = load_config(sets=["train.max_steps=1000", "data.unlabeled_focus_fraction=0.5"])
    extended = load_config(sets=["train.max_steps=3000", "data.unlabeled_focus_fraction=0.5"])
    pin_schedules(saved, extended)
    assert extended["data"]["unlabeled_focus_every_steps"] == 200  # 0.2 of the stopped run, not 600
    unfocused = load_config(sets=["train.max_steps=3000"])
    pin_schedules(load_config(sets=["train.max_steps=1000"]), unfocused)
    assert unfocused["data"]["unlabeled_focus_every_steps"] is None  # no focus: nothing to pin


def test_focus_centres_and_draw_state_travel_in_the_checkpoint(make_cohort, tmp_path):
    """A resumed run starts with the centres of the last refresh (not random crops until the next one)."""
    from medeman.train import fit

    class CentresAtStart(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if not hasattr(self, "counts"):
                self.counts = trainer.datamodule.focus.counts.clone()
                self.centres = trainer.datamodule.focus.centres.clone()
                focus = next(c for c in trainer.callbacks if isinstance(c, TeacherFocus))
                self.last_refresh, self.draw = focus.last_refresh, focus.rand.rand()

    root = make_cohort(3, 3)
    run = tmp_path / "run"
    sets = [
        *TINY_BASE,
        "data.cache=memory",
        "data.unlabeled_focus_fraction=0.5",
        "data.unlabeled_focus_every_steps=2",
        "data.unlabeled_focus_stride=1",
        "train.max_steps=4",
        "train.val_every_steps=4",
    ]
    fit(load_config(sets=sets), root / "labeled", root / "unlabeled", out_dir=run, progress_bar=False)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if "TeacherFocus" in k]
    assert state["last_refresh"] == 4 and state["counts"].shape == (3,)
    probe = CentresAtStart()
    fit(
        load_config([run / "config.yaml"], ["train.max_steps=5"]),
        root / "labeled",
        root / "unlabeled",
        out_dir=run,
        resume=True,
        callbacks=[probe],
        progress_bar=False,
    )
    assert torch.equal(probe.counts, state["counts"]) and torch.equal(probe.centres, state["centres"])
    assert probe.last_refresh == 4
    expected = __import__("numpy").random.RandomState()
    expected.set_state(("MT19937", state["rand"].numpy().astype("uint32"), state["rand_pos"], *state["rand_gauss"]))
    assert probe.draw == expected.rand()


class _FrequencyUser:
    """Stands in for a method that asks for the teacher pass's class frequencies (FixMatch's distribution alignment)."""

    def __init__(self):
        self.received = None

    def uses_unlabeled_frequencies(self):
        return True

    def set_unlabeled_frequencies(self, labeled, unlabeled):
        self.received = labeled, unlabeled


def test_teacher_pass_gives_the_method_labeled_frequencies_and_the_teacher_marginal_without_focus(
    make_cohort, cfg, tmp_path
):
    import nibabel as nib

    root = make_cohort(2, 3)
    cfg["data"].update(patch_size=[8, 8, 8], val_fraction=0.0)
    dm = SSLDataModule(cfg, root / "labeled", root / "unlabeled", run_dir=tmp_path)
    dm.setup("fit")
    assert dm.focus is None  # no focused crops: the pass runs for the method alone
    method = _FrequencyUser()
    TeacherFocus(cfg).refresh(dm, _BrightIsClassTwo(), torch.device("cpu"), method)
    labeled, unlabeled = method.received
    # labeled: the two label files' class counts (1 mm phantoms at the 1 mm training spacing); the body crop
    # removes background only, so the organs keep their counts and their ratio, and background loses share
    counts = sum(
        torch.bincount(torch.as_tensor(nib.load(case["label"]).get_fdata()).round().long().flatten(), minlength=3)
        for case in dm.train_cases
    ).double()
    assert float(labeled.sum()) == pytest.approx(1.0)
    assert float(labeled[1] / labeled[2]) == pytest.approx(float(counts[1] / counts[2]), rel=1e-5)
    assert 0 < float(labeled[0]) < float(counts[0] / counts.sum())
    # unlabeled: the stand-in's softmax, (1, 1, e^10) / (2 + e^10) where bright, uniform elsewhere, averaged
    bright = torch.cat([(dm.preprocessed_unlabeled(i) > 0.8).flatten() for i in range(3)]).double().mean()
    sure = math.exp(10) / (2 + math.exp(10))
    rest = (1 - sure) / 2
    expected = torch.tensor([(1 - bright) / 3 + bright * rest] * 2 + [(1 - bright) / 3 + bright * sure])
    torch.testing.assert_close(unlabeled, expected.float())
    assert 0 < float(bright) < 1  # both kinds of voxel present: the check has something to weigh


def test_module_adds_the_teacher_pass_for_distribution_alignment_without_focus():
    aligned = TINY + ["ssl.method=fixmatch", "data.unlabeled_focus_fraction=0"]
    assert SSLSegModule(load_config(sets=aligned)).configure_callbacks() == []
    module = SSLSegModule(load_config(sets=aligned + ["ssl.fixmatch_distribution_alignment=true"]))
    assert [type(c) for c in module.configure_callbacks()] == [TeacherFocus]
    assert {"distribution_alignment.prior", "distribution_alignment.marginal"} <= set(module.state_dict())
