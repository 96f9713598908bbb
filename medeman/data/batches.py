"""A training step's batches from one loader, handed from its worker to the trainer as one tensor.

A semi-supervised step needs a labeled batch (``image``, ``label``) and an unlabeled batch (``weak``,
``strong``). Drawn by two DataLoaders, that is two worker hand-overs and four shared-memory tensors
a step; on Linux the main process opens a socket back to the worker for every tensor it receives
(PyTorch's ``file_descriptor`` sharing), 0.3-0.5 ms each. Here one loader draws both batches of a
step: :class:`StepSampler` names the patches (``(part, index)`` pairs from one random stream per
part), :class:`StepDataset` makes each with its part's chain, :func:`pack_step` stacks them straight
into one buffer in the worker (no copy besides the stack), and :class:`StepLoader` hands out views
of it: ``{"labeled": {"image", "label"}, "unlabeled": {"weak", "strong"}}``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import torch
from monai.data import DataLoader
from monai.data.utils import set_rnd
from torch.utils.data import Dataset, Sampler

class StepDataset(Dataset):
    """The patches of every part (``{"labeled": dataset, "unlabeled": dataset}``), indexed by ``(part, index)``.

    Items are ``(part, sample)``. MONAI's loaders seed random transforms through
    :meth:`set_random_state`, which gives each part's chain its own seed.
    """

    def __init__(self, parts: Mapping[str, Dataset]):
        self.parts = dict(parts)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[str, int]) -> tuple[str, Any]:
        part, index = key
        return part, self.parts[part][index]

    def set_random_state(self, seed: int | None = None, state: Any = None) -> StepDataset:
        """Seed each part's random transforms in turn (as :func:`monai.data.utils.set_rnd` does one dataset)."""
        next_seed = int(seed or 0)
        for part in self.parts.values():
            next_seed = set_rnd(part, next_seed)
        return self


class StepSampler(Sampler):
    """Batch sampler of a step's patches: ``sizes[part]`` indices of each part per step, from ``samplers[part]``.

    Every part's sampler must give ``sizes[part] * len(self)`` indices or more; a step is
    ``[(part, index), ...]``, parts in the order of ``sizes``.
    """

    def __init__(self, samplers: Mapping[str, Sampler], sizes: Mapping[str, int]):
        self.samplers, self.sizes = dict(samplers), dict(sizes)
        if set(self.samplers) != set(self.sizes):
            raise ValueError(f"samplers {sorted(self.samplers)} and batch sizes {sorted(self.sizes)} name different parts")

    def __len__(self) -> int:
        return min(len(self.samplers[part]) // size for part, size in self.sizes.items())  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[tuple[str, int]]]:
        streams = {part: iter(sampler) for part, sampler in self.samplers.items()}
        for _ in range(len(self)):
            yield [(part, int(next(streams[part]))) for part, size in self.sizes.items() for _ in range(size)]


def pack_step(items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Collate a step's ``(part, sample)`` items into one float32 buffer and the layout to read it back.

    A sample is a dict of float32 tensors, or a list of them (MONAI's patch samplers return lists);
    each part's samples are stacked along a new batch dimension in order, written into the buffer by
    ``torch.stack(out=...)``.

    Returns:
        ``{"packed": 1-D tensor, "layout": ((part, key, shape), ...)}``; :func:`unpack_step` reads it.
    """
    samples: dict[str, list[dict]] = {}
    for part, sample in items:
        samples.setdefault(part, []).extend(sample if isinstance(sample, list) else [sample])
    layout: list[tuple[str, str, tuple[int, ...]]] = []
    for part, dicts in samples.items():
        for key, value in dicts[0].items():
            tensors = [d[key] for d in dicts]
            bad = next((t for t in tensors if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != value.shape), None)
            if bad is not None:
                what = f"{type(bad).__name__} {getattr(bad, 'dtype', '')} {tuple(getattr(bad, 'shape', ()))}"
                raise TypeError(f"training batch {part}/{key}: every patch must be a float32 tensor of shape {tuple(value.shape)}, got {what}")
            layout.append((part, key, (len(tensors), *value.shape)))
    packed = torch.empty(sum(math.prod(shape) for _, _, shape in layout), dtype=torch.float32)
    offset = 0
    for part, key, shape in layout:
        size = math.prod(shape)
        torch.stack([d[key] for d in samples[part]], out=packed[offset:offset + size].view(shape))
        offset += size
    return {"packed": packed, "layout": tuple(layout)}


def unpack_step(batch: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The nested batch ``{part: {key: tensor}}`` of :func:`pack_step`'s output, as views of its buffer."""
    packed, layout = batch["packed"], batch["layout"]
    sizes = [math.prod(shape) for _, _, shape in layout]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (part, key, shape), flat in zip(layout, torch.split(packed, sizes)):
        out.setdefault(part, {})[key] = flat.view(shape)
    return out


class StepLoader(DataLoader):
    """MONAI ``DataLoader`` of :class:`StepDataset` steps that yields unpacked batches (see the module docstring).

    Args:
        parts: ``{part: dataset}``.
        samplers: ``{part: sampler}``, one random stream per part.
        batch_sizes: ``{part: patches per step}``.
        kwargs: for :class:`monai.data.DataLoader` (``num_workers``, ``generator``, ``pin_memory``, ...).
    """

    def __init__(self, parts: Mapping[str, Dataset], samplers: Mapping[str, Sampler], batch_sizes: Mapping[str, int], **kwargs: Any):
        super().__init__(StepDataset(parts), batch_sampler=StepSampler(samplers, batch_sizes), collate_fn=pack_step, **kwargs)

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:  # type: ignore[override]
        for batch in super().__iter__():
            yield unpack_step(batch)
