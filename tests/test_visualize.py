"""Pictures: RAS reorientation, slice choice, and one PNG per case from evaluate."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread

from medeman.evaluate import evaluate_folder
from medeman.visualize import _views, centre_voxel, legend_labels, save_case_figure, to_ras

# Axis 0 runs to Posterior (0.8 mm), axis 1 to Superior (1.3 mm), axis 2 to Left (2.5 mm).
PIL_AFFINE = np.array([[0.0, 0.0, -2.5, 0.0], [-0.8, 0.0, 0.0, 0.0], [0.0, 1.3, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def test_to_ras_orders_axes_right_anterior_superior():
    array = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    ras, spacing = to_ras(array, PIL_AFFINE)
    assert ras.shape == (6, 4, 5) and spacing == pytest.approx((2.5, 0.8, 1.3))
    # Walking along each RAS axis must move right, anterior and superior in world space.
    index = np.argwhere(array == ras[0, 0, 0])[0]
    for axis, world_axis in enumerate((0, 1, 2)):
        step = [0, 0, 0]
        step[axis] = 1
        nxt = np.argwhere(array == ras[tuple(step)])[0]
        assert (PIL_AFFINE[:3, :3] @ (nxt - index))[world_axis] > 0


def test_views_are_radiological():
    volume = np.zeros((5, 6, 7))
    volume[4, 5, 6] = 1  # the most right, anterior, superior voxel
    axial, coronal, sagittal = _views(volume, (4, 5, 6))
    assert np.argwhere(axial)[0].tolist() == [0, 0]  # top (anterior), left (patient's right)
    assert np.argwhere(coronal)[0].tolist() == [0, 0]  # top (superior), left (patient's right)
    assert np.argwhere(sagittal)[0].tolist() == [0, 0]  # top (superior), left (anterior)


def test_centre_voxel_prefers_the_reference():
    ref = np.zeros((10, 10, 10), bool)
    ref[1:4, 1:4, 1:4] = True
    pred = np.zeros_like(ref)
    pred[6:9, 6:9, 6:9] = True
    assert centre_voxel(ref, pred) == (2, 2, 2)
    assert centre_voxel(np.zeros_like(ref), pred) == (7, 7, 7)
    assert centre_voxel(None, np.zeros_like(ref)) == (5, 5, 5)


@pytest.mark.parametrize("with_reference, with_image", [(True, True), (False, True), (True, False)])
def test_save_case_figure_writes_a_png(tmp_path, with_reference, with_image):
    ref = np.zeros((20, 16, 12), np.uint8)
    ref[5:12, 4:10, 3:8] = 1
    ref[13:16, 4:8, 3:6] = 2
    pred = np.roll(ref, 1, axis=0)
    image = np.random.default_rng(0).normal(size=ref.shape) + 3 * (ref > 0)
    path = save_case_figure(
        tmp_path / "fig" / "case.png",
        pred,
        np.diag([0.8, 0.8, 2.5, 1.0]),
        reference=ref if with_reference else None,
        image=image if with_image else None,
        title="case",
        scores={1: 0.9, 2: 0.5},
    )
    pixels = imread(str(path))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 900 and pixels[..., :3].std() > 0.05


def test_evaluate_writes_one_picture_per_case(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    mask = np.zeros((16, 16, 8), np.uint8)
    mask[4:12, 5:11, 2:6] = 1
    for folder, name, array in [
        ("pred", "a.nii.gz", mask),
        ("labels", "a_seg.nii.gz", mask),
        ("pred", "b.nii.gz", mask),
        ("images", "a_0000.nii.gz", mask * 100.0),
        ("images", "b_0000.nii.gz", mask * 100.0),
    ]:
        (tmp_path / folder).mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), str(tmp_path / folder / name))
    summary = evaluate_folder(
        tmp_path / "pred", tmp_path / "labels", png_dir=tmp_path / "png", images_dir=tmp_path / "images"
    )
    assert summary.cases == ["a"]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["a.png", "b.png"]  # b: over the scan, no label


@pytest.mark.parametrize(
    "label, with_reference, scores, names, expected",
    [
        (2, True, {2: 0.5}, {2: "kidneys"}, ["kidneys reference", "kidneys prediction (Dice 0.500)"]),
        (3, True, None, {2: "kidneys"}, ["class 3 reference", "class 3 prediction"]),
        (1, False, {1: float("nan")}, None, ["class 1 prediction"]),
    ],
)
def test_legend_names_classes_and_their_dice(label, with_reference, scores, names, expected):
    assert legend_labels(label, with_reference, scores, names) == expected


def test_evaluate_draws_with_class_names(tmp_path):
    mask = np.zeros((16, 16, 8), np.uint8)
    mask[4:12, 5:11, 2:6] = 1
    for folder in ("pred", "labels"):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / folder / "a.nii.gz"))
    summary = evaluate_folder(
        tmp_path / "pred", tmp_path / "labels", png_dir=tmp_path / "png", class_names={1: "liver"}
    )
    assert not summary.problems and (tmp_path / "png" / "a.png").is_file()
