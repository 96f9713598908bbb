"""A training step's batches from one loader, handed from its worker to the trainer as one tensor.

A semi-supervised step needs a labeled batch (``image``, ``label``) and an unlabeled batch (``weak``,
``strong``). Drawn by two DataLoaders, that is two worker hand-overs and four shared-memory tensors
a step; on Linux the main process opens a socket back to the worker for every tensor it receives
(PyTorch's ``file_descriptor`` sharing), 0.3-0.5 ms each. Here one loader draws both batches of a
step: :class:`StepSampler` names the patches and their augmentation seeds (``(part, index, seed)``,
drawn from the step's own seed, so the stream is a function of the run's seed and the step only),
:class:`StepDataset` makes each with its part's chain seeded so, :func:`pack_step` stacks them straight
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
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.data import DataLoader
from monai.transforms import Compose, Randomizable
from torch.utils.data import Dataset, Sampler, get_worker_info


def stream_seed(*keys: int) -> int:
    """A 32-bit seed that is a pure function of ``keys`` (e.g. run seed, rank, stream, step), well mixed by
    :class:`numpy.random.SeedSequence`: neighbouring steps get unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def share_random_state(obj: Any, state: np.random.RandomState) -> int:
    """Make every random transform of a chain (or a dataset's ``transform``) draw from ``state``; returns how many.

    Re-seeding one shared state before each sample costs 1.5 us; MONAI's ``set_random_state(seed=)``
    builds a new state per transform (2 ms for the labeled chain), too slow to do per sample.
    """
    if isinstance(obj, Compose):  # its own set_random_state would give each child a new state
        obj.R = state
        return sum(share_random_state(t, state) for t in obj.transforms)
    if isinstance(obj, Randomizable):  # dictionary transforms pass the state on to the array transforms inside
        obj.set_random_state(state=state)
        return 1
    transform = getattr(obj, "transform", None)
    return share_random_state(transform, state) if transform is not None else 0


class StepDataset(Dataset):
    """The patches of every part (``{"labeled": dataset, "unlabeled": dataset}``), indexed by ``(part, index, seed)``.

    Items are ``(part, sample)``. Each part's random transforms share one random state, seeded with
    the key's ``seed`` before the sample is made: a patch and its augmentation depend on the key
    only, never on which worker makes it or what was drawn before (a ``(part, index)`` key leaves
    the state as it is). The parts' transforms are changed in place to share the state, so a
    dataset used elsewhere too (BatchNorm re-estimation) should be given its own copy there.
    """

    def __init__(self, parts: Mapping[str, Dataset]):
        self.parts = dict(parts)
        self._states = {name: np.random.RandomState(0) for name in self.parts}
        for name, part in self.parts.items():
            share_random_state(part, self._states[name])

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())  # type: ignore[arg-type]

    def __getitem__(self, key: tuple) -> tuple[str, Any]:
        part, index, *seed = key
        if seed:
            self._states[part].seed(int(seed[0]))
        return part, self.parts[part][index]

    def set_random_state(self, seed: int | None = None, state: Any = None) -> StepDataset:
        """Nothing to do: MONAI's loaders call this (per worker, or per loader without workers), but every
        sample is seeded from its key, so the stream does not depend on the workers or on when a loader was made."""
        return self


class StepSampler(Sampler):
    """Batch sampler of whole steps, each a pure function of ``(seed, step)``.

    Step ``b`` draws, from a generator seeded with ``stream_seed(seed, b)``, ``sizes[part]``
    indices of each part (uniformly, with replacement; parts in the order of ``sizes``) and one
    augmentation seed per patch: ``[(part, index, patch seed), ...]``. A pass yields ``steps`` steps
    from ``start()`` (the first step of the pass, e.g. the trainer's step), so the batches of step
    ``b`` are the same however the run is cut into passes (validation intervals) or resumed.

    Args:
        lengths: ``{part: number of items}``.
        sizes: ``{part: patches per step}``.
        seed: the stream's seed.
        steps: steps per pass.
        start: the first step of the next pass: an int or a callable asked at each pass.
    """

    def __init__(
        self,
        lengths: Mapping[str, int],
        sizes: Mapping[str, int],
        seed: int,
        steps: int,
        start: int | Callable[[], int] = 0,
    ):
        self.lengths, self.sizes = dict(lengths), dict(sizes)
        if set(self.lengths) != set(self.sizes):
            raise ValueError(f"parts {sorted(self.lengths)} and batch sizes {sorted(self.sizes)} name different parts")
        self.seed, self.steps, self.start = int(seed), int(steps), start

    def __len__(self) -> int:
        return self.steps

    def step(self, index: int) -> list[tuple[str, int, int]]:
        """The patches of step ``index``: ``[(part, item index, augmentation seed), ...]``."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, index))
        keys: list[tuple[str, int, int]] = []
        for part, size in self.sizes.items():
            items = torch.randint(self.lengths[part], (size,), generator=generator).tolist()
            seeds = torch.randint(1 << 32, (size,), generator=generator).tolist()  # RandomState takes 32-bit seeds
            keys += [(part, i, s) for i, s in zip(items, seeds)]
        return keys

    def __iter__(self) -> Iterator[list[tuple[str, int, int]]]:
        first = self.start() if callable(self.start) else int(self.start)
        for index in range(first, first + self.steps):
            yield self.step(index)


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
            bad = next(
                (
                    t
                    for t in tensors
                    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != value.shape
                ),
                None,
            )
            if bad is not None:
                what = f"{type(bad).__name__} {getattr(bad, 'dtype', '')} {tuple(getattr(bad, 'shape', ()))}"
                raise TypeError(
                    f"training batch {part}/{key}: every patch must be a float32 tensor of shape {tuple(value.shape)}, got {what}"
                )
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
        torch.stack([d[key] for d in samples[part]], out=packed[offset : offset + size].view(shape))
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
        return {
            "ring": (ring["token"], slot),
            "layout": layout,
            "buffer": None if int(flags[1, slot]) else buffer,
            "flags": None if int(flags[2, 0]) else flags,
        }

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
        sampler: the steps (:class:`StepSampler`).
        ring_bytes: steps up to this size come through the workers' rings of reused buffers
            (:class:`StepPacker`); 0, or ``pin_memory=True``, turns that off.
        kwargs: for :class:`monai.data.DataLoader` (``num_workers``, ``generator``, ``pin_memory``, ...).
    """

    def __init__(self, parts: Mapping[str, Dataset], sampler: StepSampler, ring_bytes: int = 4 << 20, **kwargs: Any):
        ring = 0 if kwargs.get("pin_memory") else ring_bytes
        prefetch = kwargs.get("prefetch_factor") or 2
        super().__init__(
            StepDataset(parts),
            batch_sampler=sampler,
            collate_fn=StepPacker(slots=prefetch + 2, ring_bytes=ring),
            **kwargs,
        )
        self._rings = _RingReader()

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:  # type: ignore[override]
        rings = self._rings if self.persistent_workers else _RingReader()  # new workers each pass, new rings
        try:
            for batch in super().__iter__():
                yield unpack_step(rings.read(batch))
        finally:
            rings.release()
