"""Training robustness (issue 13 item 3): skipped 16-mixed steps leave the teacher alone, per-rank BatchNorm
statistics pool into the statistics of all the data, and a resumed run draws new batches."""

import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from medeman.config import load_config
from medeman.distributed_bn import pool_statistics
from medeman.module import SSLSegModule
from tiny_patches import TinyData

TINY = [
    "model.channels=[4,8]",
    "model.num_res_units=1",
    "data.patch_size=[16,16,16]",
    "data.spacing=null",
    "train.lr=0.01",
    "ssl.rampup_steps=0",
    "ssl.warmup_steps=0",
    "ssl.momentum_schedule=constant",
    "ssl.ema_momentum=0.5",
    "ssl.teacher_bn_recalibration=off",
]

# (per-rank shifts, per-rank scales): ranks whose batches differ in mean, in spread, or in both
POOL_CASES = [
    [(0.0, 0.0), (1.0, 1.0)],
    [(-2.0, 3.0), (1.0, 1.0)],
    [(0.0, 0.0, 0.0), (1.0, 2.0, 0.5)],
    [(5.0, -1.0, 0.0, 2.0), (0.3, 1.0, 2.0, 1.5)],
]


@pytest.mark.parametrize("shifts, scales", POOL_CASES)
def test_pooled_statistics_are_those_of_all_ranks_data(shifts, scales):
    g = torch.Generator().manual_seed(0)
    data = torch.stack(
        [torch.randn(3, 500, generator=g, dtype=torch.float64) * s + m for m, s in zip(shifts, scales)]
    )  # (ranks, C, n)
    mean, var = pool_statistics(data.mean(2), data.var(2, unbiased=False))
    everything = data.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean, everything.mean(1))
    torch.testing.assert_close(var, everything.var(1, unbiased=False))
    if len(set(shifts)) > 1:  # averaging the variances alone would miss the spread between ranks
        assert (var > data.var(2, unbiased=False).mean(0) + 0.1).all()


class _PoisonGradients(pl.Callback):
    """Makes the gradients of the given optimizer steps infinite (before the scaler unscales them), and
    snapshots the teacher and the loss scale before and after every step."""

    def __init__(self, poisoned: set[int]):
        self.poisoned, self.teachers, self.scales = poisoned, [], []

    def on_after_backward(self, trainer, module):
        if trainer.global_step in self.poisoned:
            next(module.student.parameters()).grad.fill_(float("inf"))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.teachers.append({k: v.clone() for k, v in module.teacher.state_dict().items()})
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def test_step_skipped_by_the_grad_scaler_leaves_the_teacher_unchanged():
    cfg = load_config(sets=TINY + ["train.max_steps=4", "train.precision=16-mixed"])
    module = SSLSegModule(cfg)
    probe = _PoisonGradients({2})
    # Lightning turns 16-mixed into bf16 on CPU; its fp16 plugin with a CPU grad scaler is the GPU code path
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(
        accelerator="cpu",
        plugins=[plugin],
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[probe],
    )
    trainer.fit(module, datamodule=TinyData())
    final = module.teacher.state_dict()
    before, after = probe.teachers[2], probe.teachers[3]
    assert probe.scales[3] < probe.scales[2]  # the scaler skipped step 2 (and backed off)...
    for name in before:
        torch.testing.assert_close(
            after[name], before[name], rtol=0, atol=0, msg=name
        )  # ...and the teacher did not move
    assert any(not torch.equal(final[k], after[k]) for k in final)  # the steps that were taken did move it
    assert module.teacher_updates == 3  # the momentum clock counts the 3 real updates, not the 4 optimizer steps


def test_teacher_update_count_survives_a_checkpoint():
    module = SSLSegModule(load_config(sets=TINY))
    module.teacher_updates = 7
    checkpoint = {"global_step": 9}
    module.on_save_checkpoint(checkpoint)
    restored = SSLSegModule(load_config(sets=TINY))
    restored.on_load_checkpoint(checkpoint)
    assert restored.teacher_updates == 7
    restored.on_load_checkpoint({"global_step": 9})  # a checkpoint from before the counter: the optimizer steps
    assert restored.teacher_updates == 9


def _sampled_indices(tmp_path, step: int) -> list[int]:
    from medeman.data.datamodule import SSLDataModule

    cfg = load_config(sets=["train.val_every_steps=20", "data.batch_size_labeled=1"])
    dm = SSLDataModule(cfg, tmp_path, run_dir=tmp_path)
    dm._datasets["labeled"] = list(range(50))  # the sampler only needs a length
    dm.trainer = types.SimpleNamespace(global_step=step, global_rank=0)
    return [index for step in dm._train_loader().batch_sampler for _, index, _ in step]


def test_resumed_run_draws_the_batches_the_uninterrupted_run_draws(tmp_path):
    fresh = _sampled_indices(tmp_path, 0)
    assert _sampled_indices(tmp_path, 0) == fresh  # a run is reproducible
    resumed = _sampled_indices(
        tmp_path, 10
    )  # a run resumed at step 10 draws the steps from 10 on, not the stream's start
    assert resumed != fresh and resumed[:10] == fresh[10:]
