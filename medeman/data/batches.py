"""A training step's batches from one loader, handed from its worker to the trainer as one tensor.

A semi-supervised step needs a labeled batch (``image``, ``label``) and an unlabeled batch (``weak``,
``strong``). Drawn by two DataLoaders, that is two worker hand-overs and four shared-memory tensors
a step; on Linux the main process opens a socket back to the worker for every tensor it receives
(PyTorch's ``file_descriptor`` sharing), 0.3-0.5 ms each. Here one loader draws both batches of a
step: :class:`StepSampler` names the patches (``(part, index)`` pairs from one random stream per
part), :class:`StepDataset` makes each with its part's chain, :func:`pack_step` stacks them straight
into one buffer in the worker (no copy besides the stack), and :class:`StepLoader` hands out views
of it: ``{"labeled": {"image", "label"}, "unlabeled": {"weak", "strong"}}``.

Small steps skip even that one socket: a loader worker keeps a ring of shared buffers
(:class:`StepPacker`), sends each buffer to the main process once, and from then on only names the
slot it filled; the main process copies the step out and hands the slot back. Receiving a step fell
from 0.9 to 0.1 ms for the sample recipe's four 32^3 patches. Steps over ``ring_bytes`` (the copy
would cost more than the socket) and pinned-memory loaders (pinning copies what it receives, so
the worker's buffers would not stay shared) use one shared tensor per step as before.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Iterator, Mapping, Sequence

import torch
from monai.data import DataLoader
from monai.data.utils import set_rnd
from torch.utils.data import Dataset, Sampler, get_worker_info

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

    Args:
        items: the step's ``(part, sample)`` pairs, in sampler order.

    Returns:
        ``{"packed": 1-D tensor, "layout": ((part, key, shape), ...)}``; :func:`unpack_step` reads it.

    Raises:
        TypeError: a patch that is not float32 or not of its key's shape, named ``part/key``.
    """
    samples, layout = _collect(items)
    return {"packed": _fill(samples, layout, None), "layout": layout}


def _collect(items: Sequence[tuple[str, Any]]) -> tuple[dict[str, list[dict]], tuple]:
    """Each part's samples in order and the layout ``((part, key, (n, *shape)), ...)``, checked."""
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
    return samples, tuple(layout)


def _numel(layout: Sequence) -> int:
    return sum(math.prod(shape) for _, _, shape in layout)


def _fill(samples: dict[str, list[dict]], layout: Sequence, out: torch.Tensor | None) -> torch.Tensor:
    """Stack each part's samples into ``out`` (a new float32 buffer when ``None``) in ``layout``'s order."""
    packed = torch.empty(_numel(layout), dtype=torch.float32) if out is None else out
    offset = 0
    for part, key, shape in layout:
        size = math.prod(shape)
        torch.stack([d[key] for d in samples[part]], out=packed[offset:offset + size].view(shape))
        offset += size
    return packed


class StepPacker:
    """The step loader's ``collate_fn``: :func:`pack_step`, into a ring of reused shared buffers in a worker.

    In a loader worker, a step of at most ``ring_bytes`` is written into the next of ``slots``
    shared-memory buffers of that worker, and the message names the slot (``"ring": (worker token,
    slot)``). Shared flags (``(3, slots)`` int32) say what the main process holds: row 0, the
    slots it has not handed back yet; row 1, the buffers it has; ``[2, 0]``, whether it has these
    flags. A message carries a buffer or the flags only while the main process lacks them, so a
    message the main process never reads (an iteration abandoned half-way) costs nothing but a
    resend. A slot not handed back is never overwritten: that step goes out in a new shared tensor
    and the ring moves on, so correctness never depends on how far ahead the workers run. Outside
    a worker, and for larger steps, this is :func:`pack_step`.

    Args:
        slots: buffers per worker (>= 2).
        ring_bytes: largest step that goes through the ring; 0 turns the ring off.
    """

    def __init__(self, slots: int = 4, ring_bytes: int = 4 << 20):
        if slots < 2:
            raise ValueError(f"a ring needs at least 2 slots, got {slots}")
        self.slots, self.ring_bytes = int(slots), int(ring_bytes)
        self._ring: dict[str, Any] | None = None  # made in each worker at its first step

    def __call__(self, items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
        samples, layout = _collect(items)
        numel = _numel(layout)
        slot = self._next_free_slot(numel)
        if slot is None:
            return {"packed": _fill(samples, layout, None), "layout": layout}
        ring = self._ring
        flags, buffer = ring["flags"], ring["buffers"][slot]
        if buffer is None or buffer.numel() != numel:
            buffer = ring["buffers"][slot] = torch.empty(numel, dtype=torch.float32).share_memory_()
            flags[1, slot] = 0
        _fill(samples, layout, buffer)
        flags[0, slot] = 1
        return {"ring": (ring["token"], slot), "layout": layout,
                "buffer": None if int(flags[1, slot]) else buffer, "flags": None if int(flags[2, 0]) else flags}

    def _next_free_slot(self, numel: int) -> int | None:
        """The ring slot for a step of ``numel`` floats; ``None`` outside a worker, over ``ring_bytes``, or
        when the main process still holds the next slot (the ring moves on either way)."""
        if get_worker_info() is None or 4 * numel > self.ring_bytes:
            return None
        if self._ring is None:
            flags = torch.zeros((3, self.slots), dtype=torch.int32).share_memory_()
            self._ring = {"token": uuid.uuid4().hex, "flags": flags, "buffers": [None] * self.slots, "next": 0}
        slot = self._ring["next"]
        self._ring["next"] = (slot + 1) % self.slots
        return None if int(self._ring["flags"][0, slot]) else slot


class _RingReader:
    """The main process's side of :class:`StepPacker`'s rings: each worker's flags and buffers, by token."""

    def __init__(self) -> None:
        self.flags: dict[str, torch.Tensor] = {}
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._held: tuple[str, int] | None = None

    def read(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The step as :func:`pack_step` gives it: a ring slot copied out (and the previous one handed back)."""
        self.release()  # once the next message is in: the previous copy is long done
        if "ring" not in batch:
            return batch
        token, slot = batch["ring"]
        if batch["flags"] is not None:
            self.flags[token] = batch["flags"]
            self.flags[token][2, 0] = 1
        if batch["buffer"] is not None:
            self.buffers[(token, slot)] = batch["buffer"]
            self.flags[token][1, slot] = 1
        packed = self.buffers[(token, slot)].clone()
        self._held = (token, slot)
        return {"packed": packed, "layout": batch["layout"]}

    def release(self) -> None:
        """Hand the last slot read back to its worker."""
        if self._held is not None:
            token, slot = self._held
            self.flags[token][0, slot] = 0
            self._held = None


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

    Yielded tensors are the caller's own (views of one new tensor a step), whichever way the step
    came from the worker.

    Args:
        parts: ``{part: dataset}``.
        samplers: ``{part: sampler}``, one random stream per part.
        batch_sizes: ``{part: patches per step}``.
        ring_bytes: steps up to this size come through the workers' rings of reused buffers
            (:class:`StepPacker`); 0, or ``pin_memory=True``, turns that off.
        kwargs: for :class:`monai.data.DataLoader` (``num_workers``, ``generator``, ``pin_memory``, ...).
    """

    def __init__(self, parts: Mapping[str, Dataset], samplers: Mapping[str, Sampler], batch_sizes: Mapping[str, int],
                 ring_bytes: int = 4 << 20, **kwargs: Any):
        ring = 0 if kwargs.get("pin_memory") else ring_bytes
        prefetch = kwargs.get("prefetch_factor") or 2
        super().__init__(StepDataset(parts), batch_sampler=StepSampler(samplers, batch_sizes),
                         collate_fn=StepPacker(slots=prefetch + 2, ring_bytes=ring), **kwargs)
        self._rings = _RingReader()

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:  # type: ignore[override]
        rings = self._rings if self.persistent_workers else _RingReader()  # new workers each pass, new rings
        try:
            for batch in super().__iter__():
                yield unpack_step(rings.read(batch))
        finally:
            rings.release()
