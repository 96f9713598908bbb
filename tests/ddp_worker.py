"""Run by tests/test_ddp.py: a few mean-teacher steps with 2-process CPU DDP (gloo); each rank saves its teacher.

Lightning's DDP launcher re-executes this file for rank 1, so it must be a script.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from medeman.config import load_config
from medeman.module import SSLSegModule
from tiny_patches import TinyData


class SaveTeacher(pl.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, module):
        state = {k: v.detach().cpu() for k, v in module.teacher.state_dict().items()}
        torch.save(state, self.out / f"teacher_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    cfg = load_config(
        sets=[
            "model.channels=[4,8]",
            "model.num_res_units=1",
            "data.patch_size=[16,16,16]",
            "ssl.ema_momentum=0.5",
            "ssl.rampup_steps=0",
            "ssl.warmup_steps=0",
        ]
    )
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[SaveTeacher(out)],
    )
    trainer.fit(SSLSegModule(cfg), datamodule=TinyData(n=6, per_rank=True))
