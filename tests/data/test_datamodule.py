"""SSLDataModule batches and the training chains: shapes, epoch length, voxel-aligned weak/strong views."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from monai.data import set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
)

from medeman.data import SSLDataModule
from medeman.data.transforms import labeled_transforms, nnunet_augmentation, unlabeled_transforms

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data"

# data overrides for the spatial augmentation: all applied with certainty, or each in turn
SPATIAL_CASES = [
    {"flip_prob": 1.0, "rotate90_prob": 1.0, "affine_prob": 0.0, "labeled_augmentation": "basic"},
    {"flip_prob": 0.0, "rotate90_prob": 0.0, "affine_prob": 1.0, "labeled_augmentation": "basic"},
    {"flip_prob": 0.5, "rotate90_prob": 0.5, "affine_prob": 0.5, "labeled_augmentation": "basic"},
]


def _pattern_scan(tmp_path, volume_writer) -> str:
    """A body of a smooth random HU field inside the CT window: views correlate only where aligned."""
    field = gaussian_filter(np.random.default_rng(0).normal(size=(20, 18, 16)), 1.5)
    image = np.full((24, 22, 20), -1000, np.int16)
    image[2:-2, 2:-2, 2:-2] = np.clip(np.round(40 + 150 * field / field.std()), -150, 240)
    return str(volume_writer(tmp_path / "pattern.nii.gz", image))


@pytest.mark.parametrize("spatial", SPATIAL_CASES)
def test_views_identical_without_intensity_augmentation(tmp_path, cfg, volume_writer, spatial):
    cfg["data"].update(spatial, strong_prob=0.0)
    chain = unlabeled_transforms(cfg)
    chain.set_random_state(seed=1)
    for _ in range(4):
        out = chain({"image": _pattern_scan(tmp_path, volume_writer)})
        assert set(out) == {"weak", "strong"}
        assert out["weak"].shape == (1, 16, 16, 16) and out["weak"].dtype == torch.float32
        torch.testing.assert_close(out["weak"], out["strong"])


@pytest.mark.parametrize("spatial", SPATIAL_CASES)
def test_views_voxel_aligned_with_strong_augmentation(tmp_path, cfg, volume_writer, spatial):
    cfg["data"].update(
        spatial, strong_prob=1.0, strong_cutout=True, strong_noise_std=0.02
    )  # noise would swamp the correlation
    chain = unlabeled_transforms(cfg)
    chain.set_random_state(seed=2)
    for _ in range(4):
        out = chain({"image": _pattern_scan(tmp_path, volume_writer)})
        weak, strong = out["weak"].flatten(), out["strong"]
        kept = strong.flatten() != 0  # outside cut-out boxes
        aligned = np.corrcoef(weak[kept], strong.flatten()[kept])[0, 1]
        flipped = np.corrcoef(weak[kept], torch.flip(strong, dims=(1,)).flatten()[kept])[0, 1]
        assert not torch.equal(out["weak"], out["strong"])
        assert aligned > 0.7 and aligned > flipped + 0.4, (aligned, flipped)


def test_weak_only_chain_makes_the_same_weak_view_without_a_strong_one(tmp_path, cfg, volume_writer):
    """BCP asks for the weak view alone: same patches and spatial augmentation, no strong copy."""
    cfg["data"].update(strong_prob=1.0)
    scan = _pattern_scan(tmp_path, volume_writer)
    both, weak_only = unlabeled_transforms(cfg), unlabeled_transforms(cfg, views=("weak",))
    assert "strong" not in str([getattr(t, "keys", ()) for t in weak_only.transforms])
    both.set_random_state(seed=4)
    weak_only.set_random_state(seed=4)
    for _ in range(3):
        a, b = both({"image": scan}), weak_only({"image": scan})
        assert set(b) == {"weak"}
        torch.testing.assert_close(a["weak"], b["weak"])
    with pytest.raises(ValueError, match="unlabeled views"):
        unlabeled_transforms(cfg, views=("strong",))


def _only(chain, kinds, prob):
    """``chain``'s transforms of the given kinds, each forced to probability ``prob`` (others dropped)."""
    picked = [t for t in chain if isinstance(t, kinds)]
    for t in picked:
        t.prob = prob
    return Compose(picked)


def test_nnunet_spatial_augmentation_moves_image_and_label_together(cfg):
    """Rotation/scaling and mirroring apply the same geometry to image and label (nearest for the label)."""
    label = torch.zeros(1, 16, 16, 16)
    label[0, 3:9, 4:12, 5:10] = 1
    label[0, 10:14, 2:6, 8:15] = 2
    spatial = _only(nnunet_augmentation(cfg), (RandAffined, RandFlipd), 1.0)
    spatial.set_random_state(seed=0)
    set_track_meta(False)
    try:
        for _ in range(4):
            out = spatial({"image": label / 2, "label": label.clone()})
            assert set(out["label"].unique().tolist()) <= {0.0, 1.0, 2.0}  # nearest: no new label values
            assert not torch.equal(out["label"], label)  # it did move
            agree = ((out["image"] * 2).round() == out["label"]).float().mean()
            assert agree > 0.95  # bilinear image and nearest label differ only along edges
    finally:
        set_track_meta(True)


def test_nnunet_intensity_augmentation_never_touches_the_label(cfg):
    label = torch.randint(0, 3, (1, 16, 16, 16)).float()
    image = torch.rand(1, 16, 16, 16)
    intensity = _only(
        nnunet_augmentation(cfg),
        (
            RandGaussianNoised,
            RandGaussianSmoothd,
            RandScaleIntensityd,
            RandScaleIntensityFixedMeand,
            RandSimulateLowResolutiond,
            RandAdjustContrastd,
        ),
        1.0,
    )
    assert len(intensity.transforms) == 6
    intensity.set_random_state(seed=1)
    set_track_meta(False)
    try:
        out = intensity({"image": image.clone(), "label": label.clone()})
    finally:
        set_track_meta(True)
    assert torch.equal(out["label"], label) and not torch.allclose(out["image"], image)


@pytest.mark.parametrize("spatial", SPATIAL_CASES)
def test_labeled_patch_keeps_label_on_its_voxels(tmp_path, cfg, volume_writer, phantom_maker, spatial):
    cfg["data"].update(spatial, fg_class_fraction=1.0)
    image, label = phantom_maker((24, 22, 20))
    case = {
        "image": str(volume_writer(tmp_path / "i.nii.gz", image)),
        "label": str(volume_writer(tmp_path / "l.nii.gz", label)),
    }
    chain = labeled_transforms(cfg)
    chain.set_random_state(seed=3)
    for _ in range(4):
        (out,) = chain(copy.deepcopy(case))
        img, lab = out["image"][0], out["label"][0]
        assert out["image"].shape == out["label"].shape == (1, 16, 16, 16)
        assert (lab > 0).any()  # fg_class_fraction=1 centres on a foreground class
        if spatial["affine_prob"] == 0:  # without interpolation intensities and labels coincide exactly
            assert torch.equal(img > 0.6, lab > 0)  # organs are 120/200 HU (> 0.69), tissue at most 50 HU (< 0.53)
        else:
            assert ((img > 0.6) == (lab > 0)).float().mean() > 0.95


def test_datamodule_batches_and_epoch_length(make_cohort, cfg, tmp_path):
    root = make_cohort(3, 2)
    cfg["train"].update(val_every_steps=3, accumulate_grad_batches=2)
    dm = SSLDataModule(cfg, root / "labeled", root / "unlabeled", run_dir=tmp_path / "run")
    dm.setup("fit")
    assert (len(dm.train_cases), len(dm.val_cases), len(dm.unlabeled_cases)) == (2, 1, 2)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["train"] == [c["id"] for c in dm.train_cases] and split["val"] == [c["id"] for c in dm.val_cases]
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    labeled, unlabeled = batches[0]["labeled"], batches[0]["unlabeled"]
    assert set(labeled) == {"image", "label"} and set(unlabeled) == {"weak", "strong"}
    assert labeled["image"].shape == labeled["label"].shape == (2, 1, 16, 16, 16)
    assert labeled["image"].dtype == unlabeled["weak"].dtype == unlabeled["strong"].dtype == torch.float32
    assert unlabeled["weak"].shape == unlabeled["strong"].shape == (2, 1, 16, 16, 16)
    assert set(torch.unique(labeled["label"]).tolist()) <= {0.0, 1.0, 2.0}
    (val,) = list(dm.val_dataloader())
    assert val["image"].shape == val["label"].shape == (1, 1, 20, 20, 16)


def test_supervised_and_no_unlabeled_give_labeled_only(make_cohort, cfg):
    root = make_cohort(3, 1)
    cfg["ssl"]["method"] = "supervised"
    dm = SSLDataModule(cfg, root / "labeled", root / "unlabeled")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"labeled"}
    cfg["ssl"]["method"] = "mean_teacher"
    dm = SSLDataModule(cfg, root / "labeled", val=root / "labeled")
    dm.setup("fit")
    assert len(dm.val_cases) == 3 and len(dm.train_cases) == 3
    assert set(next(iter(dm.train_dataloader()))) == {"labeled"}


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_batches_reproducible_from_train_seed(make_cohort, cfg, tmp_path, cache):
    root = make_cohort(3, 2)
    cfg["data"]["cache"] = cache

    def first_batch(seed: int, run: str):
        cfg["train"]["seed"] = seed
        dm = SSLDataModule(cfg, root / "labeled", root / "unlabeled", run_dir=tmp_path / run)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    a, b, c = first_batch(0, "a"), first_batch(0, "b"), first_batch(1, "c")
    for part, key in (("labeled", "image"), ("unlabeled", "strong")):
        torch.testing.assert_close(a[part][key], b[part][key])
    assert not torch.equal(a["unlabeled"]["strong"], c["unlabeled"]["strong"])
    if cache == "disk":
        (labeled_cache,) = (tmp_path / "a" / "cache").glob("labeled-*")  # named by the data config's digest
        assert any(labeled_cache.iterdir())


def test_preprocessed_unlabeled_scan_is_the_same_from_every_cache_and_read_from_the_cache(
    make_cohort, cfg, tmp_path, monkeypatch
):
    """The teacher focus reads preprocessed scans through public dataset access (no private MONAI cache)."""
    from monai.transforms import LoadImaged

    root = make_cohort(2, 2)
    scans = {}
    for cache in ("none", "memory", "disk"):
        cfg["data"]["cache"] = cache
        dm = SSLDataModule(cfg, root / "labeled", root / "unlabeled", run_dir=tmp_path / cache)
        dm.setup("fit")
        scans[cache] = [dm.preprocessed_unlabeled(i) for i in range(len(dm.unlabeled_cases))]  # disk: writes the cache
        if cache != "none":  # now the cache holds every scan: none is read again
            monkeypatch.setattr(LoadImaged, "__call__", lambda *a, **k: pytest.fail(f"{cache}: read a scan again"))
            again = [dm.preprocessed_unlabeled(i) for i in range(len(dm.unlabeled_cases))]
            monkeypatch.undo()
            for got, want in zip(again, scans[cache]):
                torch.testing.assert_close(got, want)
    assert len(scans["none"]) == 2
    for cache in ("memory", "disk"):
        for got, want in zip(scans[cache], scans["none"]):
            torch.testing.assert_close(
                got.as_tensor() if hasattr(got, "as_tensor") else got,
                want.as_tensor() if hasattr(want, "as_tensor") else want,
            )


@pytest.mark.skipif(not (SAMPLE_DATA / "labeled").is_dir(), reason="sample_data/ not present")
def test_sample_data_batches(cfg, tmp_path):
    cfg["data"].update(spacing=[2.0, 2.0, 2.0], patch_size=[32, 32, 32], batch_size_labeled=2, batch_size_unlabeled=2)
    cfg["train"]["val_every_steps"] = 1
    dm = SSLDataModule(cfg, SAMPLE_DATA / "labeled", SAMPLE_DATA / "unlabeled", run_dir=tmp_path)
    dm.setup("fit")
    assert (len(dm.train_cases), len(dm.val_cases), len(dm.unlabeled_cases)) == (4, 2, 24)
    (batch,) = list(dm.train_dataloader())
    assert batch["labeled"]["image"].shape == batch["unlabeled"]["weak"].shape == (2, 1, 32, 32, 32)
    assert set(torch.unique(batch["labeled"]["label"]).tolist()) <= {0.0, 1.0, 2.0}
