"""DICOM series through medeman infer: NIfTI masks as for the same scan in NIfTI, and DICOM-SEG read back."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.affines import apply_affine

from dicom_series import LPS, write_series
from medeman.checkpoint import save_teacher
from medeman.data.readers import write_volume
from medeman.infer import infer_cases, main
from test_infer import TILTED_AFFINE
from tiny_teacher import smooth_scan, trained_teacher

RAS = np.diag([1.2, 1.0, 2.0, 1.0])


@pytest.fixture
def study(tmp_path):
    """Two CT series (one tilted), a SEG object among them, and the same two scans as NIfTI."""
    scans = {
        "tilted": (smooth_scan((24, 20, 10), seed=0), TILTED_AFFINE),
        "axial": (smooth_scan((22, 18, 9), seed=1), RAS),
    }
    for number, (name, (volume, affine)) in enumerate(scans.items(), start=1):
        write_series(tmp_path / "study" / name, volume, affine, number=number)
        write_volume(volume, affine, tmp_path / "nifti" / f"{name}.nii.gz")
    write_series(
        tmp_path / "study" / "axial", scans["axial"][0][..., :3], RAS, number=9, modality="SEG", name_prefix="seg"
    )
    return tmp_path


def test_dicom_series_masks_equal_the_nifti_scans_masks(study):
    model = trained_teacher()
    dicom = infer_cases(
        model, study / "study", study / "from_dicom", output_format="nifti", device="cpu", progress=False
    )
    nifti = infer_cases(model, study / "nifti", study / "from_nifti", device="cpu", progress=False)
    assert sorted((r.case_id, r.status) for r in dicom) == [("axial", "written"), ("tilted", "written")]
    assert all(r.status == "written" for r in nifti)
    for name in ("axial", "tilted"):
        a, b = (
            nib.load(str(study / "from_dicom" / f"{name}.nii.gz")),
            nib.load(str(study / "from_nifti" / f"{name}.nii.gz")),
        )
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        assert 0.1 < np.asarray(a.dataobj).mean() < 0.9


def test_dicom_seg_holds_the_nifti_masks_voxels_in_the_series_geometry(study, capsys):
    import highdicom as hd

    net, cfg = trained_teacher()
    (study / "run").mkdir()
    save_teacher(study / "run" / "teacher.pt", net, cfg, step=60)
    # default format for a DICOM input: DICOM-SEG; the SEG object among the series is skipped with its reason
    assert (
        main(
            [
                "--model",
                str(study / "run"),
                "--input",
                str(study / "study"),
                "--output",
                str(study / "seg"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        f"skipped: {study / 'study' / 'axial'} (series 9, abdomen): a SEG object, not an image series"
        in capsys.readouterr().err
    )
    infer_cases((net, cfg), study / "study", study / "masks", output_format="nifti", device="cpu", progress=False)
    for name in ("axial", "tilted"):
        seg = hd.seg.segread(str(study / "seg" / f"{name}.dcm"))
        sources = sorted((study / "study" / name).glob("slice*.dcm"))
        series_uid = pydicom.dcmread(str(sources[0]), stop_before_pixels=True).SeriesInstanceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["bright"]
        mask = nib.load(str(study / "masks" / f"{name}.nii.gz"))
        labels, to_voxel = np.asarray(mask.dataobj), np.linalg.inv(mask.affine)
        found = 0
        for path in sources:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            frame = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[ds.SOPInstanceUID],
                segment_numbers=[1],
                combine_segments=True,
                skip_overlap_checks=True,
            )[0]
            # every pixel of the source slice, through the slice's own DICOM geometry, to the NIfTI mask's voxel
            rows, cols = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            dr, dc = (float(v) for v in ds.PixelSpacing)
            lps = (
                np.array([float(v) for v in ds.ImagePositionPatient])
                + cols[..., None] * dc * iop[:3]
                + rows[..., None] * dr * iop[3:]
            )
            voxel = np.round(apply_affine(to_voxel, apply_affine(LPS, lps))).astype(int)
            assert np.array_equal(frame, labels[voxel[..., 0], voxel[..., 1], voxel[..., 2]])
            found += int(frame.sum())
        assert found == int(labels.sum()) > 0


def test_a_broken_series_is_named_in_one_line_and_the_others_written(tmp_path, capsys):
    net, cfg = trained_teacher()
    (tmp_path / "run").mkdir()
    save_teacher(tmp_path / "run" / "teacher.pt", net, cfg, step=60)
    write_series(tmp_path / "study" / "good", smooth_scan((20, 16, 6)), RAS)
    write_series(tmp_path / "study" / "gap", smooth_scan((20, 16, 6)), RAS, skip_slices=(4,))
    assert (
        main(
            [
                "--model",
                str(tmp_path / "run"),
                "--input",
                str(tmp_path / "study"),
                "--output",
                str(tmp_path / "out"),
                "--format",
                "nrrd",
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    message = (
        f"{tmp_path / 'study' / 'gap'} (series 1, abdomen): slices missing: a 4.00 mm gap between 6.00 and 10.00 mm "
        "where slices are 2.00 mm apart (about 1 slice(s))"
    )
    assert f"error: {message}\n" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nrrd"]


def test_dicom_seg_of_a_nifti_scan_is_refused_by_name(tmp_path, capsys):
    net, cfg = trained_teacher()
    write_volume(smooth_scan((20, 16, 6)), RAS, tmp_path / "scans" / "x.nii.gz")
    results = infer_cases(
        (net, cfg), tmp_path / "scans", tmp_path / "out", output_format="dicom-seg", device="cpu", progress=False
    )
    assert [(r.status, r.message) for r in results] == [
        (
            "failed",
            f"{tmp_path / 'scans' / 'x.nii.gz'}: a DICOM-SEG "
            "references a DICOM series, and this scan is not one; choose "
            "--format nifti or nrrd",
        )
    ]


def test_one_dicom_slice_as_input_asks_for_its_folder(tmp_path):
    files = write_series(tmp_path / "ct", smooth_scan((8, 6, 3)), RAS)
    with pytest.raises(ValueError) as err:
        infer_cases(trained_teacher(), files[0], tmp_path / "out", device="cpu", progress=False)
    assert str(err.value) == f"{files[0]}: one DICOM slice; give the folder of its series (each series there is a scan)"
