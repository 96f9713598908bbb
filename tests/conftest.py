"""Shared fixtures: tiny synthetic volumes and cohorts on disk (16-24 voxels a side)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medeman.config import default_config
from medeman.data.readers import write_volume as medeman_write_volume


def write_volume(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` (x, y, z) as NIfTI, or through SimpleITK for .nrrd/.mha/.mhd (affine taken as RAS)."""
    return medeman_write_volume(array, np.eye(4) if affine is None else affine, path)


def phantom(shape=(20, 20, 16), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 CT-like body (air -1000 outside) with a cube of class 1 and a smaller one of class 2."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, dtype=np.int16)
    image[2:-2, 2:-2, 1:-1] = 40 + rng.integers(-10, 10, size=(shape[0] - 4, shape[1] - 4, shape[2] - 2))
    label = np.zeros(shape, dtype=np.uint8)
    label[4:10, 4:10, 3:9] = 1
    label[12:15, 12:15, 8:11] = 2
    image[label == 1] = 120
    image[label == 2] = 200
    return image, label


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Commands called in-process set torch's threads (medeman.threads): each test starts with the count it had."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cfg() -> dict:
    """Default config sized for tiny volumes: 3 classes, 16^3 patches, no workers."""
    cfg = default_config()
    cfg["data"].update(
        spacing=[1.0, 1.0, 1.0],
        patch_size=[16, 16, 16],
        num_classes=3,
        num_workers=0,
        batch_size_labeled=2,
        batch_size_unlabeled=2,
        val_fraction=0.34,
    )
    cfg["train"].update(val_every_steps=3, accumulate_grad_batches=1)
    return cfg


@pytest.fixture
def make_cohort(tmp_path):
    """``make_cohort(n_labeled, n_unlabeled, root=...)`` writes images/labels/unlabeled NIfTI folders."""

    def make(n_labeled: int = 3, n_unlabeled: int = 2, root: Path | None = None, label_suffix: str = "") -> Path:
        root = Path(root or tmp_path / "cohort")
        for i in range(n_labeled):
            image, label = phantom(seed=i)
            write_volume(root / "labeled" / "images" / f"case{i}.nii.gz", image)
            write_volume(root / "labeled" / "labels" / f"case{i}{label_suffix}.nii.gz", label)
        for i in range(n_unlabeled):
            write_volume(root / "unlabeled" / f"scan{i}.nii.gz", phantom(seed=100 + i)[0])
        return root

    return make


@pytest.fixture
def volume_writer():
    """The :func:`write_volume` helper, as a fixture."""
    return write_volume


@pytest.fixture
def phantom_maker():
    """The :func:`phantom` helper, as a fixture."""
    return phantom


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
