"""On a CUDA GPU: one-GPU SyncBatchNorm decision, bf16 and 16-mixed steps, channels_last, ``medeman infer --device cuda``.

Marked ``gpu``: skipped without CUDA (tests/conftest.py); ``benchmarks/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medeman.checkpoint import load_teacher
from medeman.config import load_config
from medeman.infer import main as infer_main
from medeman.train import fit
from tiny_config import TINY_BASE

pytestmark = pytest.mark.gpu

TINY = [
    *TINY_BASE,
    "train.val_every_steps=2",
    "ssl.rampup_steps=2",
    "ssl.warmup_steps=0",
    "train.max_steps=4",
    "train.accelerator=gpu",
    "train.devices=1",
]


class BatchNormProbe(pl.Callback):
    """Records the student's BatchNorm classes at the start of training (after Lightning's set-up)."""

    def __init__(self):
        self.kinds: set[type] = set()

    def on_train_start(self, trainer, module):
        self.kinds = {type(m) for m in module.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def first_loss(run) -> float:
    with open(run / "metrics.csv") as handle:
        return next(float(r["loss/total"]) for r in csv.DictReader(handle) if r.get("loss/total"))


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_a_mean_teacher_trains_on_one_gpu_in_each_precision(make_cohort, tmp_path, precision):
    root = make_cohort(3, 2)
    cfg = load_config(sets=TINY + [f"train.precision={precision}", "train.sync_batchnorm=true"])
    probe = BatchNormProbe()
    result = fit(
        cfg, root / "labeled", root / "unlabeled", out_dir=tmp_path / "run", callbacks=[probe], progress_bar=False
    )
    assert result.steps == 4 and math.isfinite(result.best_dice_teacher)
    # one GPU, one process: nothing to synchronize, so the student keeps plain BatchNorm
    assert probe.kinds and nn.SyncBatchNorm not in probe.kinds
    _, _, payload = load_teacher(tmp_path / "run")
    assert all(
        t.dtype == torch.float32 for t in payload["state_dict"].values() if t.is_floating_point()
    )  # EMA stays fp32


def test_channels_last_and_plain_layouts_train_the_same_first_step_on_gpu(make_cohort, tmp_path):
    root = make_cohort(3, 2)
    losses = {}
    for layout in ("true", "false"):
        cfg = load_config(sets=TINY + ["train.max_steps=1", f"train.channels_last={layout}", "train.seed=3"])
        fit(cfg, root / "labeled", root / "unlabeled", out_dir=tmp_path / layout, progress_bar=False)
        losses[layout] = first_loss(tmp_path / layout)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3)


def test_infer_on_cuda_writes_the_cpu_mask(make_cohort, tmp_path):
    root = make_cohort(3, 2)
    cfg = load_config(sets=TINY)
    fit(cfg, root / "labeled", root / "unlabeled", out_dir=tmp_path / "run", progress_bar=False)
    images = root / "labeled" / "images"
    masks = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"pred_{device}"
        assert (
            infer_main(
                ["--model", str(tmp_path / "run"), "--input", str(images), "--output", str(out), "--device", device]
            )
            == 0
        )
        masks[device] = {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(out.glob("*.nii.gz"))}
    assert masks["cpu"].keys() == masks["cuda"].keys() and masks["cpu"]
    for name, cpu in masks["cpu"].items():
        gpu = masks["cuda"][name]
        assert gpu.shape == cpu.shape and gpu.dtype == np.uint8
        assert (gpu != cpu).mean() < 1e-3, name  # cuDNN and oneDNN round differently: near-ties only
