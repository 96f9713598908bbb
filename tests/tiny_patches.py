"""In-memory random patches and a DataModule shaped like SSLDataModule's training batches.

Used by tests/test_module.py and tests/ddp_worker.py, where files on disk would only cost time.
"""

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class Patches(Dataset):
    """``n`` random 16³ patches: labeled ``{"image", "label"}`` or unlabeled ``{"weak", "strong"}``.

    With ``per_rank``, every DDP rank draws different patches (scaled by rank + 1), as a distributed
    sampler would give it.
    """

    def __init__(self, n: int, unlabeled: bool, per_rank: bool = False):
        self.n, self.unlabeled, self.per_rank = n, unlabeled, per_rank

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rank = _rank() if self.per_rank else 0
        g = torch.Generator().manual_seed(1000 * rank + i + 100 * self.unlabeled)
        x = torch.randn(1, 16, 16, 16, generator=g) * (1 + rank)
        if self.unlabeled:
            return {"weak": x, "strong": x + 0.1 * torch.randn(x.shape, generator=g)}
        return {"image": x, "label": (x > 0.3).long()}


class TinyData(pl.LightningDataModule):
    """``{"labeled": ..., "unlabeled": ...}`` batches of 2 through a ``max_size_cycle`` CombinedLoader."""

    def __init__(self, n: int = 8, per_rank: bool = False):
        super().__init__()
        self.n, self.per_rank = n, per_rank

    def train_dataloader(self):
        loaders = {
            "labeled": DataLoader(Patches(self.n, False, self.per_rank), batch_size=2),
            "unlabeled": DataLoader(Patches(self.n, True, self.per_rank), batch_size=2),
        }
        return CombinedLoader(loaders, "max_size_cycle")

    def recalibration_dataloader(self, n_batches):
        return DataLoader(Patches(2 * n_batches, True, self.per_rank), batch_size=2)
