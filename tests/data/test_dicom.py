"""DICOM series in: grouping by SeriesInstanceUID, slice order, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
from nibabel.affines import apply_affine

from dicom_series import write_series
from medeman.data.dicom import find_series, write_series_volume
from medeman.data.readers import read_volume
from test_infer import OBLIQUE_AFFINE, TILTED_AFFINE

RAS = np.diag([1.1, 0.9, 2.5, 1.0])


def _volume(shape=(7, 5, 6), seed=0):
    return np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.int16)


@pytest.mark.parametrize("affine", [RAS, OBLIQUE_AFFINE, TILTED_AFFINE], ids=["ras", "permuted", "tilted"])
def test_series_reads_back_as_the_volume_in_world_space(tmp_path, affine):
    volume = _volume()
    write_series(tmp_path / "study" / "ct", volume, affine)
    found = find_series(tmp_path / "study")
    assert [s.case_id for s in found.series] == ["ct"] and not found.errors and not found.skipped
    array, got_affine = read_volume(write_series_volume(found.series[0], tmp_path / "ct.nii"))
    # every voxel of the source lands at the same world position with the same HU
    ijk = np.argwhere(np.ones(volume.shape, bool))
    world = apply_affine(affine, ijk)
    back = np.round(apply_affine(np.linalg.inv(got_affine), world)).astype(int)
    np.testing.assert_allclose(apply_affine(got_affine, back), world, atol=1e-3)
    assert np.array_equal(array[tuple(back.T)], volume[tuple(ijk.T)])


def test_slices_are_ordered_by_position_not_by_file_name(tmp_path):
    files = write_series(tmp_path / "ct", _volume(), RAS)
    for i, f in enumerate(files):  # names now run against the positions
        f.rename(f.with_name(f"x{len(files) - i:03d}.dcm"))
    series = find_series(tmp_path / "ct").series[0]
    assert [f.name for f in series.files] == [f"x{len(files) - i:03d}.dcm" for i in range(len(files))]


def test_each_series_of_a_mixed_folder_is_a_scan(tmp_path):
    write_series(tmp_path / "study", _volume(), RAS, number=2, name_prefix="a")
    write_series(tmp_path / "study", _volume(seed=1), RAS, number=5, name_prefix="b")
    found = find_series(tmp_path / "study")
    assert [(s.case_id, len(s.files)) for s in found.series] == [("study_s2", 6), ("study_s5", 6)]


def _where(folder, number=1):
    return f"{folder} (series {number}, abdomen)"


def test_refusals_and_skips_name_the_series_in_one_line(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.77"
    write_series(tmp_path / "gap", _volume(), RAS, skip_slices=(3,))
    write_series(tmp_path / "uneven", _volume(), RAS, shift_slice={2: 0.5})
    write_series(tmp_path / "twice", _volume(), RAS, series_uid=uid, name_prefix="a")
    write_series(tmp_path / "twice", _volume(), RAS, series_uid=uid, name_prefix="b")
    write_series(tmp_path / "sizes", _volume((7, 5, 3)), RAS, series_uid=uid + "1", name_prefix="a")
    above = RAS.copy()
    above[2, 3] = 7.5  # the next three slices of the same series, one column narrower
    write_series(tmp_path / "sizes", _volume((6, 5, 3)), above, series_uid=uid + "1", name_prefix="b")
    write_series(tmp_path / "seg", _volume(), RAS, modality="SEG")
    write_series(tmp_path / "scout", _volume((7, 5, 1)), RAS)
    found = find_series(tmp_path)
    assert found.series == []
    assert sorted(found.errors) == sorted(
        [
            f"{_where(tmp_path / 'gap')}: slices missing: a 5.00 mm gap between 5.00 and 10.00 mm where slices are 2.50 mm apart"
            " (about 1 slice(s))",
            f"{_where(tmp_path / 'uneven')}: uneven slice spacing: 2.000 to 3.000 mm",
            f"{_where(tmp_path / 'twice')}: two slices at one position (0.00 mm): a000.dcm, b000.dcm",
            f"{_where(tmp_path / 'sizes')}: mixes slices of different sizes or pixel spacings: "
            "[(5, 6, 0.9, 1.1), (5, 7, 0.9, 1.1)]",
        ]
    )
    assert sorted(found.skipped) == sorted(
        [
            f"{_where(tmp_path / 'seg')}: a SEG object, not an image series",
            f"{_where(tmp_path / 'scout')}: one slice, not a volume",
        ]
    )
