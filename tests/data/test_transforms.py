"""Training chains whose random part runs without MONAI meta-data (medeman.data.transforms.PatchChain)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, get_track_meta
from monai.transforms import Compose, EnsureChannelFirstd, Lambdad, RandAffined, RandFlipd, RandGaussianNoised

from medeman.data.transforms import PatchChain


def _seen_tracking(log: list):
    """A random-part transform that records whether meta-data tracking is on when it runs."""
    return Lambdad("image", lambda x: log.append(get_track_meta()) or x)


def _transforms(log: list) -> list:
    return [
        # deterministic and needs the meta-data: fails on a plain tensor without a channel dimension
        EnsureChannelFirstd("image", channel_dim="no_channel"),
        RandFlipd("image", prob=0.5, spatial_axis=0),
        _seen_tracking(log),
        RandAffined("image", prob=1.0, rotate_range=0.3, scale_range=0.1),
        RandGaussianNoised("image", prob=1.0, std=0.1),
    ]


def _case() -> dict:
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) / 100
    return {"image": MetaTensor(torch.from_numpy(volume), meta={"original_channel_dim": "no_channel"})}


def _run(chain_class, seed: int, split: bool) -> tuple[torch.Tensor, list]:
    log: list = []
    chain = chain_class(_transforms(log))
    chain.set_random_state(seed)
    if split:  # as MONAI's cache datasets run a chain: the deterministic prefix, later the rest
        cached = chain(_case(), end=1)
        return chain(cached, start=1)["image"], log
    return chain(_case())["image"], log


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("seed", [0, 5])
def test_random_part_runs_untracked_and_gives_the_same_voxels(seed, split):
    expected, tracked = _run(Compose, seed, split=False)
    got, untracked = _run(PatchChain, seed, split=split)
    assert isinstance(expected, MetaTensor) and tracked == [True]
    assert not isinstance(got, MetaTensor) and untracked == [False]
    assert got.shape == (1, 5, 6, 7)
    assert torch.equal(got, expected.as_tensor())
    assert get_track_meta()  # the caller's setting is back


def test_a_chain_without_random_transforms_keeps_its_meta_data():
    out = PatchChain([EnsureChannelFirstd("image", channel_dim="no_channel")])(_case())["image"]
    assert isinstance(out, MetaTensor) and out.shape == (1, 5, 6, 7)


def test_tracking_is_restored_after_a_failing_random_transform():
    def fail(x):
        raise ValueError("broken patch")

    chain = PatchChain(
        [EnsureChannelFirstd("image", channel_dim="no_channel"), RandFlipd("image", prob=1.0), Lambdad("image", fail)]
    )
    with pytest.raises(RuntimeError) as error:
        chain(_case())
    assert "broken patch" in str(error.value.__cause__)
    assert get_track_meta()
