"""SeparableSpacingd: MONAI Spacingd's output (values, grid, history) in three 1D passes, or Spacingd itself."""

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd, Spacingd

from medeman.data.readers import VolumeReader
from medeman.data.spacing import SeparableSpacingd
from tests.conftest import write_volume

RAS = (("L", "R"), ("P", "A"), ("I", "S"))


def _oblique(angle: float, zooms, origin=(10.0, -5.0, 3.0)) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


GEOMETRIES = [  # (name, affine, shape, target spacing)
    ("lps_anisotropic_downsample", np.diag([-0.8, -0.8, 3.0, 1.0]), (40, 50, 20), (1.5, 1.5, 1.5)),
    ("oblique_mixed", _oblique(0.3, (1.2, 0.9, 2.5)), (30, 31, 32), (2.0, 1.0, 1.7)),
    ("upsample", np.diag([2.0, 2.0, 2.0, 1.0]), (12, 13, 14), (0.7, 0.9, 1.1)),
    (
        "tilted_flipped",
        np.array([[-1.0, 0.0, 0.0, 5.0], [0.0, 0.97, -0.5, 2.0], [0.0, 0.26, 1.9, -7.0], [0, 0, 0, 1.0]]),
        (25, 22, 18),
        (1.3, 1.3, 1.3),
    ),
    ("same_spacing", np.diag([1.5, 1.5, 1.5, 1.0]), (16, 17, 18), (1.5, 1.5, 1.5)),
]


def _oriented(path):
    chain = Compose(
        [
            LoadImaged("image", reader=VolumeReader(), image_only=True),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS", labels=RAS),
        ]
    )
    return chain, chain({"image": str(path)})


@pytest.mark.parametrize("name, affine, shape, spacing", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_separable_resampling_equals_spacingd(tmp_path, name, affine, shape, spacing):
    rng = np.random.default_rng(0)
    path = write_volume(tmp_path / f"{name}.nii.gz", (rng.normal(size=shape) * 100).astype(np.float32), affine)
    chain, oriented = _oriented(path)
    spacingd = Spacingd("image", pixdim=spacing, mode="bilinear")
    reference = spacingd(dict(oriented))["image"]
    separable = SeparableSpacingd("image", pixdim=spacing, mode="bilinear")
    fast = separable(dict(oriented))["image"]
    assert not oriented["image"].pending_operations  # the input is left as it was
    assert fast.shape == reference.shape and fast.dtype == reference.dtype == torch.float32
    torch.testing.assert_close(
        fast.as_tensor(), reference.as_tensor(), atol=1e-3, rtol=1e-5
    )  # float32 rounding of |x| <= 500
    np.testing.assert_allclose(np.asarray(fast.affine), np.asarray(reference.affine), atol=1e-9)
    assert [op["class"] for op in fast.applied_operations] == [op["class"] for op in reference.applied_operations]
    assert not fast.pending_operations
    # Invertd undoes it as it undoes Spacingd: back on the scan's grid, same values
    back = {}
    for name, image, resampling in (("fast", fast, separable), ("reference", reference, spacingd)):
        inverter = Invertd(
            "image", transform=Compose([*chain.transforms, resampling]), orig_keys="image", nearest_interp=False
        )
        back[name] = inverter({"image": image.clone()})["image"]
    assert tuple(back["fast"].shape[1:]) == shape
    torch.testing.assert_close(back["fast"].as_tensor(), back["reference"].as_tensor(), atol=1e-3, rtol=1e-5)


def test_nearest_keys_and_lazy_use_go_through_spacingd_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    affine = _oblique(0.2, (1.1, 0.9, 2.0))
    image = write_volume(tmp_path / "image.nii.gz", rng.normal(size=(20, 21, 22)).astype(np.float32), affine)
    label = write_volume(tmp_path / "label.nii.gz", rng.integers(0, 3, size=(20, 21, 22)).astype(np.uint8), affine)
    load = Compose(
        [
            LoadImaged(["image", "label"], reader=VolumeReader(), image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            Orientationd(["image", "label"], axcodes="RAS", labels=RAS),
        ]
    )
    oriented = load({"image": str(image), "label": str(label)})
    kwargs = dict(keys=["image", "label"], pixdim=(1.4, 1.4, 1.4), mode=["bilinear", "nearest"])
    reference = Spacingd(**kwargs)(dict(oriented))
    fast = SeparableSpacingd(**kwargs)(dict(oriented))
    for key in ("image", "label"):  # a nearest key: the whole call is Spacingd's, bit for bit
        assert torch.equal(fast[key].as_tensor(), reference[key].as_tensor())
    lazy = SeparableSpacingd(**kwargs, lazy=True)(dict(oriented))
    assert len(lazy["image"].pending_operations) == 1 and tuple(lazy["image"].peek_pending_shape()) == tuple(
        reference["image"].shape[1:]
    )
