"""SSLSegModule: the teacher is the EMA of the student's history, updated once per optimizer step."""

import lightning.pytorch as pl
import pytest
import torch

from medeman.config import load_config
from medeman.eman import momentum_at, tracked_batchnorms
from medeman.module import SSLSegModule
from tiny_patches import TinyData

TINY = ["model.channels=[4,8]", "model.num_res_units=1", "data.patch_size=[16,16,16]", "data.spacing=null", "train.lr=0.01"]


class _StudentHistory(pl.Callback):
    """Snapshots of the student after every optimizer step."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.states):  # an optimizer step (and teacher update) just happened
            self.states.append({k: v.detach().clone() for k, v in module.student.state_dict().items()})


def _train(sets, steps=4, accumulate=1):
    cfg = load_config(sets=TINY + sets + [f"train.max_steps={steps}"])
    module = SSLSegModule(cfg)
    initial = {k: v.detach().clone() for k, v in module.student.state_dict().items()}
    history = _StudentHistory()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accumulate_grad_batches=accumulate, callbacks=[history],
    )
    trainer.fit(module, datamodule=TinyData())
    return cfg, module, initial, history.states


@pytest.mark.parametrize("norm, accumulate", [("eman", 1), ("bn", 1), ("eman", 2)])
def test_teacher_equals_hand_computed_ema_of_student_history(norm, accumulate):
    cfg, module, initial, states = _train([f"ssl.teacher_norm={norm}", "ssl.ema_momentum=0.8", "ssl.rampup_steps=0"], 4, accumulate)
    assert len(states) == 4  # one teacher update per optimizer step, whatever the accumulation
    expected = {k: v.clone() for k, v in initial.items()}
    for step, student in enumerate(states):
        m = momentum_at(step, 0.8, warmup=True)
        for name, value in student.items():
            if value.is_floating_point():
                expected[name] = m * expected[name] + (1 - m) * value
            else:
                expected[name] = value.clone()
    teacher = module.teacher.state_dict()
    params = {name for name, _ in module.teacher.named_parameters()}
    for name, value in teacher.items():
        if name in params or norm == "eman":
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    if norm == "eman":
        assert not any(bn.training for bn in tracked_batchnorms(module.teacher))
        assert teacher[[k for k in teacher if k.endswith("num_batches_tracked")][0]].item() == states[-1][[k for k in teacher if k.endswith("num_batches_tracked")][0]].item()


def test_bn_teacher_keeps_its_own_buffers():
    _, module, initial, states = _train(["ssl.teacher_norm=bn", "ssl.ema_momentum=0.8"], 3)
    key = [k for k in initial if k.endswith("running_mean")][0]
    # a bn teacher runs in train mode on the weak views: its running mean is its own, not the student's EMA
    assert not torch.allclose(module.teacher.state_dict()[key], states[-1][key])


def test_supervised_has_no_teacher_and_trains():
    _, module, initial, _ = _train(["ssl.method=supervised"], 2)
    assert module.teacher is None
    key = [k for k in initial if k.endswith("weight")][0]
    assert not torch.equal(module.student.state_dict()[key], initial[key])


def test_teacher_gets_no_gradient_and_is_not_optimized():
    cfg = load_config(sets=TINY)
    module = SSLSegModule(cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.teacher.parameters()}
    assert all(not p.requires_grad for p in module.teacher.parameters())
