"""Run by tests/test_ddp.py: a few mean-teacher steps with 2-process CPU DDP (gloo); each rank saves its teacher.

Lightning's DDP launcher re-executes this file for rank 1, so it must be a script.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from medeman.config import load_config
from medeman.module import SSLSegModule


class RankPatches(Dataset):
    """Different random patches on every rank, as DDP would see with a distributed sampler."""

    def __init__(self, unlabeled: bool):
        self.unlabeled = unlabeled

    def __len__(self):
        return 6

    def __getitem__(self, i):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        g = torch.Generator().manual_seed(1000 * rank + i)
        x = torch.randn(1, 16, 16, 16, generator=g) * (1 + rank)
        if self.unlabeled:
            return {"weak": x, "strong": x + 0.1 * torch.randn(x.shape, generator=g)}
        return {"image": x, "label": (x > 0.3).long()}


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return CombinedLoader(
            {"labeled": DataLoader(RankPatches(False), batch_size=2), "unlabeled": DataLoader(RankPatches(True), batch_size=2)},
            "max_size_cycle",
        )


class SaveTeacher(pl.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, module):
        state = {k: v.detach().cpu() for k, v in module.teacher.state_dict().items()}
        torch.save(state, self.out / f"teacher_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    cfg = load_config(sets=["model.channels=[4,8]", "model.num_res_units=1", "data.patch_size=[16,16,16]", "ssl.ema_momentum=0.5", "ssl.rampup_steps=0"])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
        callbacks=[SaveTeacher(out)],
    )
    trainer.fit(SSLSegModule(cfg), datamodule=Data())
