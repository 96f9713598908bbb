"""Class-aware and teacher-focused patch sampling: the share of patches on a 10-voxel class, counted over many draws."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from monai.transforms import ClassesToIndicesd, Compose, RandomizableTrait

from medeman.data.sampling import FocusCentres, RandClassCropd, RandFocusCropd
from medeman.data.transforms import labeled_transforms, unlabeled_transforms

SHAPE, PATCH, DRAWS = (32, 32, 32), (8, 8, 8), 1500
TINY = (slice(14, 16), slice(14, 19), slice(15, 16))  # class 2: 2 x 5 x 1 = 10 voxels, well inside the volume


def _volume(classes: tuple[int, ...] = (1, 2)) -> dict:
    """A 32^3 volume: class 1 a 10^3 block, class 2 ten voxels, each only where listed in ``classes``."""
    label = torch.zeros((1, *SHAPE))
    if 1 in classes:
        label[0, 2:12, 2:12, 2:12] = 1
    if 2 in classes:
        label[0][TINY] = 2
    assert int((label == 2).sum()) == (10 if 2 in classes else 0)
    case = {"image": label.clone(), "label": label}
    return ClassesToIndicesd("label", num_classes=3)(case)


def _centre_classes(transform, case: dict, draws: int = DRAWS) -> np.ndarray:
    """Class of the centre voxel of ``draws`` patches (the patch is cropped from the label itself)."""
    transform.set_random_state(seed=0)
    centres = []
    for _ in range(draws):
        (out,) = transform(copy.copy(case))
        assert out["label"].shape[1:] == PATCH
        centres.append(int(out["label"][0, PATCH[0] // 2, PATCH[1] // 2, PATCH[2] // 2]))
    return np.array(centres)


def _within(observed: float, expected: float, n: int = DRAWS) -> bool:
    """Binomial share within 4 standard deviations (a false alarm about once in 16,000 runs)."""
    return abs(observed - expected) <= 4 * math.sqrt(max(expected * (1 - expected), 1e-4) / n)


# A random 8^3 window starts uniformly at 0..24 per axis, so its centre (start + 4) is uniform over 4..28:
RANDOM_ON_TINY = 10 / 25**3  # all ten class-2 voxels are possible centres
RANDOM_ON_BLOCK = (8 / 25) ** 3  # block 2..11: centres 4..11, 8 of 25 per axis

# (name, classes in the scan, fg_fraction, ratios, expected share of centres on class 2, on class 1 or None)
CLASS_CASES = [
    ("nnU-Net rule, two present classes: half of fg_fraction each", (1, 2), 0.33, None, 0.33 / 2, None),
    ("nnU-Net rule, every patch class-centred", (1, 2), 1.0, None, 0.5, 0.5),
    ("nnU-Net rule, the tiny class alone", (2,), 0.5, None, 0.5, 0.0),
    (
        "nnU-Net rule, tiny class absent: all class-centred patches go to class 1",
        (1,),
        0.33,
        None,
        0.0,
        0.33 + 0.67 * RANDOM_ON_BLOCK,
    ),
    ("nnU-Net rule, no foreground: random windows, no error", (), 0.33, None, 0.0, 0.0),
    ("ratios as RandCropByLabelClassesd", (1, 2), 0.0, [0.0, 1.0, 3.0], 0.75, 0.25),
    ("ratios, absent class renormalized away", (1,), 0.0, [0.0, 1.0, 3.0], 0.0, 1.0),
    ("ratios on absent classes only: random windows", (1,), 0.0, [0.0, 0.0, 1.0], 0.0, RANDOM_ON_BLOCK),
]


@pytest.mark.parametrize(
    "name, classes, fg_fraction, ratios, on_tiny, on_block", CLASS_CASES, ids=[c[0] for c in CLASS_CASES]
)
def test_class_aware_sampling_hits_a_ten_voxel_class_in_the_configured_share(
    name, classes, fg_fraction, ratios, on_tiny, on_block
):
    transform = RandClassCropd(["image", "label"], PATCH, num_classes=3, fg_fraction=fg_fraction, ratios=ratios)
    centres = _centre_classes(transform, _volume(classes))
    assert _within((centres == 2).mean(), on_tiny + (RANDOM_ON_TINY if on_tiny else 0.0)), (centres == 2).mean()
    if on_block is not None:
        assert _within((centres == 1).mean(), on_block), (centres == 1).mean()


def test_class_centred_patches_contain_the_tiny_class_whole():
    transform = RandClassCropd(["image", "label"], PATCH, num_classes=3, fg_fraction=1.0, ratios=[0, 0, 1])
    transform.set_random_state(seed=1)
    for _ in range(50):
        (out,) = transform(copy.copy(_volume()))
        assert out["label"][0, 4, 4, 4] == 2
        assert (
            int((out["label"] == 2).sum()) >= 8
        )  # the window c-4..c+3 keeps at least 4 of the 5 rows of the 2 x 5 x 1 class
        torch.testing.assert_close(out["image"], out["label"])  # image and label cropped identically


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratios": [1.0, 1.0]}, "must be 3 non-negative numbers"),
        ({"ratios": [1.0, -1.0, 1.0]}, "must be 3 non-negative numbers"),
        ({"fg_fraction": 1.5}, "must lie in"),
    ],
)
def test_bad_sampling_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandClassCropd(["image", "label"], PATCH, num_classes=3, **kwargs)


def test_labeled_chain_caches_class_locations_before_the_first_random_transform(cfg):
    chain = labeled_transforms(cfg)
    names = [type(t).__name__ for t in chain.transforms]
    first_random = chain.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait)
    )  # where CacheDataset stops caching
    assert names.index("ClassesToIndicesd") < first_random == names.index("RandClassCropd")


def test_labeled_chain_centres_on_the_tiny_class_of_a_scan_file(tmp_path, cfg, volume_writer):
    label = np.zeros((40, 40, 40), np.uint8)
    label[5:35, 5:35, 5:35] = 1
    label[20:22, 20:25, 20:21] = 2  # 10 voxels
    image = np.where(label > 0, 120, 40).astype(np.int16)
    case = {
        "image": str(volume_writer(tmp_path / "i.nii.gz", image)),
        "label": str(volume_writer(tmp_path / "l.nii.gz", label)),
    }
    cfg["data"].update(patch_size=[8, 8, 8], fg_class_fraction=1.0, flip_prob=0.0, rotate90_prob=0.0, affine_prob=0.0)
    chain = labeled_transforms(cfg)
    chain.set_random_state(seed=0)
    deterministic = chain.transforms[: chain.get_index_of_first(lambda t: type(t).__name__ == "RandClassCropd")]
    cached = case
    for t in deterministic:  # what CacheDataset keeps: the volume and its class locations
        cached = t(cached)
    assert [len(i) for i in cached["label_cls_indices"]][2] == 10
    sampler = Compose(chain.transforms[len(deterministic) :])
    hits = 0
    for _ in range(400):
        (out,) = sampler(copy.copy(cached))
        hits += bool((out["label"] == 2).any())
    assert _within(hits / 400, 0.5, 400)  # fg_class_fraction=1: half the patches centre on class 2 (of 2 present)


# ---- unlabeled: teacher-focused crops ----------------------------------------------------------------------


def test_focus_centres_store_and_draw():
    focus = FocusCentres(num_cases=2, capacity=4)
    rand = np.random.RandomState(0)
    assert focus.draw(0, rand) is None
    focus.set(0, np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1], [2, 2, 2]]))  # one more than capacity
    assert int(focus.counts[0]) == 4 and focus.draw(1, rand) is None
    drawn = {tuple(focus.draw(0, rand)) for _ in range(100)}
    assert drawn == {(1, 2, 3), (4, 5, 6), (7, 8, 9), (1, 1, 1)}
    focus.set(0, np.zeros((0, 3)))
    assert focus.draw(0, rand) is None


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_focused_unlabeled_crops_centre_on_the_stored_voxel_in_the_configured_share(fraction):
    focus = FocusCentres(num_cases=1)
    focus.set(0, np.array([[15, 16, 15]]))
    image = torch.zeros((1, *SHAPE))
    image[0, 15, 16, 15] = 1.0
    transform = RandFocusCropd("image", PATCH, focus, fraction)
    transform.set_random_state(seed=0)
    hits = 0
    for _ in range(DRAWS):
        out = transform({"image": image, "case_index": 0})
        assert out["image"].shape[1:] == PATCH
        hits += bool(out["image"][0, 4, 4, 4] == 1.0)
    assert _within(hits / DRAWS, fraction + (1 - fraction) / 25**3)


def test_focused_crop_near_the_border_stays_inside_the_volume():
    focus = FocusCentres(num_cases=1)
    focus.set(0, np.array([[0, 31, 2]]))
    image = torch.zeros((1, *SHAPE))
    image[0, 0, 31, 2] = 1.0
    out = RandFocusCropd("image", PATCH, focus, fraction=1.0)({"image": image, "case_index": 0})
    assert out["image"].shape[1:] == PATCH and out["image"].sum() == 1.0


def test_unlabeled_chain_uses_the_focus_only_when_asked(cfg):
    focus = FocusCentres(num_cases=1)
    assert "RandFocusCropd" not in [type(t).__name__ for t in unlabeled_transforms(cfg, focus).transforms]  # fraction 0
    cfg["data"]["unlabeled_focus_fraction"] = 0.5
    assert "RandFocusCropd" in [type(t).__name__ for t in unlabeled_transforms(cfg, focus).transforms]
    assert "RandFocusCropd" not in [type(t).__name__ for t in unlabeled_transforms(cfg).transforms]
