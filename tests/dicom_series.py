"""Small synthetic DICOM series written with pydicom, for the DICOM-in and DICOM-SEG tests.

``write_series(folder, volume, affine)`` writes one CT slice file per ``z`` index of an ``[x, y, z]``
int16 HU volume whose voxel-to-world RAS affine is ``affine`` (the NIfTI convention medeman
uses): DICOM's LPS positions and direction cosines follow from it, pixel ``[row, column]`` is
voxel ``[column, row]`` of the slice, stored as uint16 with a rescale intercept of -1024.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_series(
    folder: str | Path,
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    series_uid: str | None = None,
    number: int = 1,
    description: str = "abdomen",
    modality: str = "CT",
    study_uid: str | None = None,
    frame_uid: str | None = None,
    skip_slices: tuple[int, ...] = (),
    shift_slice: dict | None = None,
    name_prefix: str = "slice",
) -> list[Path]:
    """Write ``volume`` as a DICOM series into ``folder``; return the files (z order).

    Args:
        skip_slices: z indices not written (a series with missing slices).
        shift_slice: ``{z: mm}`` moves those slices along the normal (uneven spacing).
    """
    from pydicom.dataset import FileMetaDataset, Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or "1.2.826.0.1.3680043.8.498.1"
    frame_uid = frame_uid or generate_uid()
    lps = LPS @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    normal = np.cross(row_dir, col_dir)
    files = []
    for z in range(volume.shape[2]):
        if z in skip_slices:
            continue
        position = lps[:3, :3] @ np.array([0.0, 0.0, z]) + lps[:3, 3] + normal * (shift_slice or {}).get(z, 0.0)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PHANTOM1", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "medeman-tests"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, number, z + 1
        ds.SeriesDescription = description
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
        ds.PixelSpacing = [
            f"{spacing[1]:.6g}",
            f"{spacing[0]:.6g}",
        ]  # row spacing (between rows, y), column spacing (x)
        ds.SliceThickness = f"{spacing[2]:.6g}"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.PixelData = np.ascontiguousarray((volume[:, :, z].T.astype(np.int32) + 1024).astype(np.uint16)).tobytes()
        path = folder / f"{name_prefix}{z:03d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files
