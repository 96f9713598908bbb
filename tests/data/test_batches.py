"""One loader for a step's labeled and unlabeled batches, handed over as one tensor (medeman.data.batches)."""

from __future__ import annotations

import pytest
import torch
from monai.data import list_data_collate
from monai.transforms import Randomizable
from torch.utils.data import Dataset

from medeman.data.batches import StepDataset, StepLoader, StepSampler, pack_step, share_random_state, unpack_step


def _labeled(i: int) -> list[dict]:  # as MONAI's patch samplers return: a one-element list
    return [{"image": torch.full((1, 3, 2, 2), float(i)), "label": torch.full((1, 3, 2, 2), float(i % 3))}]


def _unlabeled(i: int) -> dict:
    return {"weak": torch.arange(8.0).reshape(1, 2, 2, 2) + i, "strong": -torch.arange(8.0).reshape(1, 2, 2, 2) - i}


class _Numbers(Dataset):
    def __init__(self, make, n: int):
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.make(index)


class _Draws(Dataset, Randomizable):
    """Each item is a draw from the dataset's random state (as a random transform's)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> dict:
        return {"draw": torch.tensor([float(self.R.randint(1 << 20))])}


@pytest.mark.parametrize("labeled, unlabeled", [([0, 4], [1, 2]), ([3], [0, 5, 2]), ([1, 1], [])])
def test_pack_then_unpack_equals_monai_collate_of_each_part(labeled, unlabeled):
    items = [("labeled", _labeled(i)) for i in labeled] + [("unlabeled", _unlabeled(i)) for i in unlabeled]
    batch = unpack_step(pack_step(items))
    expected = {"labeled": list_data_collate([_labeled(i) for i in labeled])}
    if unlabeled:
        expected["unlabeled"] = list_data_collate([_unlabeled(i) for i in unlabeled])
    assert set(batch) == set(expected)
    for part, tensors in expected.items():
        assert set(batch[part]) == set(tensors)
        for key, tensor in tensors.items():
            assert torch.equal(batch[part][key], tensor), (part, key)


def test_a_packed_step_is_one_tensor_and_its_parts_are_views():
    packed = pack_step([("labeled", _labeled(1)), ("unlabeled", _unlabeled(2))])
    assert [k for k, v in packed.items() if isinstance(v, torch.Tensor)] == ["packed"]
    assert packed["packed"].numel() == 2 * 12 + 2 * 8
    batch = unpack_step(packed)
    batch["unlabeled"]["strong"].zero_()  # writes through to the one buffer
    assert packed["packed"][-8:].abs().sum() == 0 and packed["packed"][:24].abs().sum() > 0


def test_unpack_reads_a_layout_rebuilt_as_lists():
    """Collate and pinning code that rebuilds a batch may turn tuples into lists (older PyTorch pinning did): same views."""
    packed = pack_step([("labeled", _labeled(1)), ("unlabeled", _unlabeled(2))])
    as_lists = {
        "packed": packed["packed"],
        "layout": [[part, key, list(shape)] for part, key, shape in packed["layout"]],
    }
    expected, got = unpack_step(packed), unpack_step(as_lists)
    for part in expected:
        for key in expected[part]:
            assert (
                torch.equal(got[part][key], expected[part][key]) and got[part][key].shape == expected[part][key].shape
            )


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (torch.zeros((1, 2, 2, 2), dtype=torch.int64), "torch.int64"),
        (torch.zeros((1, 2, 2, 3)), "(1, 2, 2, 3)"),
    ],
)
def test_a_patch_of_another_dtype_or_shape_is_named(bad, fragment):
    items = [("unlabeled", _unlabeled(0)), ("unlabeled", {**_unlabeled(1), "strong": bad})]
    with pytest.raises(TypeError, match="unlabeled/strong") as error:
        pack_step(items)
    assert fragment in str(error.value)


def test_step_sampler_draws_each_step_from_its_own_seed():
    sampler = StepSampler({"labeled": 6, "unlabeled": 9}, {"labeled": 2, "unlabeled": 3}, seed=7, steps=3)
    steps = list(sampler)
    assert len(steps) == len(sampler) == 3
    for step in steps:
        assert [part for part, _, _ in step] == ["labeled"] * 2 + ["unlabeled"] * 3
        assert all(0 <= i < {"labeled": 6, "unlabeled": 9}[part] and 0 <= s < 1 << 32 for part, i, s in step)
    assert steps == [sampler.step(b) for b in range(3)] and steps[0] != steps[1]
    with pytest.raises(ValueError, match="different parts"):
        StepSampler({"labeled": 6, "unlabeled": 9}, {"labeled": 2}, seed=7, steps=3)


def test_step_stream_is_the_same_however_it_is_cut_into_passes():
    """Steps 0-11 as one pass, as passes of 3 or 5 steps, or resumed at step 7: the same steps (the stream is a function of seed and step)."""
    sizes, lengths = {"labeled": 2, "unlabeled": 2}, {"labeled": 10, "unlabeled": 10}
    whole = list(StepSampler(lengths, sizes, seed=1, steps=12))

    def in_passes(steps: int, first: int = 0) -> list:
        position = {"step": first}
        sampler = StepSampler(lengths, sizes, seed=1, steps=steps, start=lambda: position["step"])
        out = []
        while position["step"] < 12:
            out += list(sampler)[: 12 - position["step"]]
            position["step"] += steps
        return out

    assert in_passes(3) == in_passes(5) == whole
    assert in_passes(5, first=7) == whole[7:]
    assert list(StepSampler(lengths, sizes, seed=2, steps=12)) != whole


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_step_loader_yields_each_part_in_sampler_order(workers):
    parts = {"labeled": _Numbers(_labeled, 10), "unlabeled": _Numbers(_unlabeled, 10)}
    sampler = StepSampler({"labeled": 10, "unlabeled": 10}, {"labeled": 2, "unlabeled": 2}, seed=1, steps=6)
    loader = StepLoader(parts, sampler, num_workers=workers)
    steps = list(sampler)
    batches = list(loader)
    assert len(batches) == len(steps) == len(loader) == 6
    for batch, step in zip(batches, steps):
        labeled = [i for part, i, _ in step if part == "labeled"]
        unlabeled = [i for part, i, _ in step if part == "unlabeled"]
        assert torch.equal(batch["labeled"]["image"][:, 0, 0, 0, 0], torch.tensor(labeled, dtype=torch.float32))
        assert torch.equal(batch["unlabeled"]["weak"][:, 0, 0, 0, 0], torch.tensor(unlabeled, dtype=torch.float32))
        # both halves arrived in one shared tensor
        assert (
            batch["labeled"]["label"].untyped_storage().data_ptr()
            == batch["unlabeled"]["strong"].untyped_storage().data_ptr()
        )


def _draws(seed: int, workers: int, loader_seed: int = 0) -> tuple[list, list]:
    parts = {"labeled": _Draws(), "unlabeled": _Draws()}
    sampler = StepSampler({name: 6 for name in parts}, {"labeled": 3, "unlabeled": 3}, seed=seed, steps=4)
    loader = StepLoader(parts, sampler, num_workers=workers, generator=torch.Generator().manual_seed(loader_seed))
    batches = list(loader)
    return (
        [b["labeled"]["draw"].flatten().tolist() for b in batches],
        [b["unlabeled"]["draw"].flatten().tolist() for b in batches],
    )


def test_each_patch_is_seeded_by_its_step_whatever_the_workers_or_the_loader_seed():
    labeled, unlabeled = _draws(0, workers=0)
    assert labeled != unlabeled  # identical chains, seeded apart
    assert _draws(0, workers=1) == _draws(0, workers=2) == _draws(0, workers=0, loader_seed=5) == (labeled, unlabeled)
    assert _draws(1, workers=0) != (labeled, unlabeled)


def test_a_part_s_random_transforms_share_one_state():
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised

    chain = Compose([RandFlipd(keys="image", prob=0.5), Compose([RandGaussianNoised(keys="image", prob=0.5)])])
    dataset = StepDataset({"labeled": _Numbers(_labeled, 2)})
    assert share_random_state(chain, dataset._states["labeled"]) == 2
    noise = chain.transforms[1].transforms[0]
    assert chain.transforms[0].R is noise.R is noise.rand_gaussian_noise.R is dataset._states["labeled"]


def test_step_dataset_indexes_by_part():
    dataset = StepDataset({"labeled": _Numbers(_labeled, 3), "unlabeled": _Numbers(_unlabeled, 4)})
    assert len(dataset) == 7
    part, sample = dataset[("unlabeled", 2)]
    assert part == "unlabeled" and torch.equal(sample["weak"], _unlabeled(2)["weak"])


def _step(i: int) -> list:
    return [("labeled", _labeled(i)), ("unlabeled", _unlabeled(i))]


def _expected(i: int) -> torch.Tensor:
    return pack_step(_step(i))["packed"]


@pytest.fixture
def in_a_worker(monkeypatch):
    """Run StepPacker as a loader worker does (get_worker_info() is not None there)."""
    monkeypatch.setattr("medeman.data.batches.get_worker_info", lambda: object())


def test_ring_sends_each_buffer_once_and_never_overwrites_a_slot_in_use(in_a_worker):
    from medeman.data.batches import StepPacker, _RingReader

    packer, reader = StepPacker(slots=2), _RingReader()
    first, second = packer(_step(0)), packer(_step(1))
    assert first["ring"][1] == 0 and second["ring"][1] == 1
    assert first["buffer"] is not None and first["flags"] is not None  # not yet read: buffers and flags travel
    assert second["buffer"] is not None and second["flags"] is not None
    third = packer(_step(2))  # slot 0 still in flight: a fresh tensor instead of an overwrite, and the ring moves on
    assert "ring" not in third and torch.equal(third["packed"], _expected(2))

    got = reader.read(first)["packed"]
    flags = first["flags"]
    assert torch.equal(got, _expected(0)) and got.data_ptr() != first["buffer"].data_ptr()  # a copy, the caller's own
    assert flags.tolist() == [[1, 1], [1, 0], [1, 0]]  # slot 0 is handed back only when the next step arrives
    assert torch.equal(reader.read(second)["packed"], _expected(1))
    assert flags.tolist() == [[0, 1], [1, 1], [1, 0]]
    fourth = packer(_step(3))  # slot 1 is still held: fresh tensor
    assert "ring" not in fourth
    fifth = packer(_step(4))
    assert fifth["ring"][1] == 0 and fifth["buffer"] is None and fifth["flags"] is None  # the main process has both
    for message, i in ((third, 2), (fourth, 3), (fifth, 4)):
        assert torch.equal(reader.read(message)["packed"], _expected(i))
    assert torch.equal(got, _expected(0))  # the first step's copy is untouched by the slot's reuse
    reader.release()
    assert flags[0].tolist() == [0, 0]


def test_a_message_never_read_is_resent_whole(in_a_worker):
    """An iteration abandoned half-way drops messages: whatever they carried travels again."""
    from medeman.data.batches import StepPacker, _RingReader

    packer, reader = StepPacker(slots=3), _RingReader()
    lost = packer(_step(0))  # never read: its slot stays taken, its buffer and flags never arrive
    kept = packer(_step(1))
    assert kept["flags"] is not None and kept["buffer"] is not None
    assert torch.equal(reader.read(kept)["packed"], _expected(1))
    through_ring = []
    for i in range(2, 6):  # slots 2, 0 (taken by the lost step: a fresh tensor), 1, 2
        message = packer(_step(i))
        through_ring.append("ring" in message)
        assert torch.equal(reader.read(message)["packed"], _expected(i))
    assert through_ring == [True, False, True, True] and lost["ring"][1] == 0


def test_steps_over_the_ring_size_and_the_main_process_use_one_tensor_each(in_a_worker, monkeypatch):
    from medeman.data.batches import StepPacker

    assert "packed" in StepPacker(ring_bytes=4 * 39)(_step(0))  # 40 floats: over the limit
    assert "ring" in StepPacker(ring_bytes=4 * 40)(_step(0))
    monkeypatch.setattr("medeman.data.batches.get_worker_info", lambda: None)
    assert "packed" in StepPacker()(_step(0))
    with pytest.raises(ValueError, match="at least 2 slots"):
        StepPacker(slots=1)


@pytest.mark.parametrize("workers", [1, 2])
def test_step_loader_reuses_ring_buffers_and_yields_its_own_tensors(workers):
    parts = {"labeled": _Numbers(_labeled, 10), "unlabeled": _Numbers(_unlabeled, 10)}

    def batches(ring_bytes: int) -> tuple[list, StepLoader]:
        sampler = StepSampler({"labeled": 10, "unlabeled": 10}, {"labeled": 2, "unlabeled": 2}, seed=1, steps=20)
        loader = StepLoader(parts, sampler, num_workers=workers, ring_bytes=ring_bytes, persistent_workers=True)
        return list(loader), loader  # kept: every step must still hold its own values after the ring slots were reused

    through_ring, loader = batches(4 << 20)
    one_tensor_each, _ = batches(0)
    assert len(through_ring) == 20
    for ring_step, plain_step in zip(through_ring, one_tensor_each):
        for part in plain_step:
            for key in plain_step[part]:
                assert torch.equal(ring_step[part][key], plain_step[part][key]), (part, key)
    assert 0 < len(loader._rings.buffers) <= workers * loader.collate_fn.slots  # 20 steps through a few buffers
    assert len(list(loader)) == 20  # a second pass over the same (persistent) workers and rings


def test_pinned_loaders_do_not_use_the_ring():
    parts = {"labeled": _Numbers(_labeled, 4)}
    loader = StepLoader(parts, StepSampler({"labeled": 4}, {"labeled": 2}, seed=0, steps=2), pin_memory=True)
    assert loader.collate_fn.ring_bytes == 0
