"""A mask as a DICOM Segmentation (DICOM-SEG) that references the series it was made from.

Written with highdicom (the ``deploy`` extra): one binary segment per foreground class, labelled
with its name from ``data.labels``, classes of ``data.lesion_classes`` coded as lesions and the
others as organs, one frame per source slice (empty frames left out). PACS viewers (OHIF) and
3D Slicer (QuantitativeReporting) open it over the series.

Typical use::

    write_dicom_seg(labels, case.files[0], case.series, "pred/case.dcm", {1: "liver", 2: "kidneys"})
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from medeman.classes import class_title
from medeman.data.dicom import DicomSeries
from medeman.data.readers import read_geometry

SOFTWARE = "medeman"


def source_datasets(series: DicomSeries) -> list:
    """The series' slices as pydicom datasets, in the series' slice order."""
    import pydicom

    return [pydicom.dcmread(str(path)) for path in series.files]


def write_dicom_seg(
    labels: np.ndarray,
    volume_file: str | Path,
    series: DicomSeries,
    path: str | Path,
    names: Mapping[int, str] | None = None,
    lesion_classes: set[int] | frozenset[int] = frozenset(),
    num_classes: int | None = None,
) -> Path:
    """Write ``labels`` (``[x, y, z]`` on the grid of the series' volume file) as a DICOM-SEG of ``series``.

    The volume file (:func:`medeman.data.dicom.write_series_volume`) holds slice ``k`` of the series
    (in its checked order) at ``z = k``, pixel ``[row, column]`` at ``[x = column, y = row]``.

    Args:
        labels: integer class map.
        volume_file: the series' volume file the labels lie on (its shape is checked).
        series: the source series; every slice is referenced.
        path: the ``.dcm`` file to write (its folder is created).
        names: segment labels by class value (``class 2`` where a class has none).
        lesion_classes: classes coded as lesions (SCT Lesion) rather than organs.
        num_classes: classes including background; every foreground class gets a segment (default:
            those up to the highest label present, at least 1).

    Returns:
        ``path``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labels = np.asarray(labels)
    shape, _ = read_geometry(volume_file)
    if tuple(labels.shape) != tuple(shape) or labels.shape[2] != len(series.files):
        raise ValueError(
            f"{series.where}: mask shape {labels.shape} does not match the series ({shape}, {len(series.files)} slices)"
        )
    frames = np.ascontiguousarray(np.transpose(labels, (2, 1, 0))).astype(np.uint16)  # (slice, row, column)
    top = int(num_classes) - 1 if num_classes is not None else max(int(labels.max()), 1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=SOFTWARE, version=_version(), family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for value in range(1, top + 1):
        lesion = value in lesion_classes
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=value,
                segment_label=class_title(value, names),
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure
                if lesion
                else codes.SCT.AnatomicalStructure,
                segmented_property_type=codes.SCT.Lesion if lesion else codes.SCT.Organ,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    sources = source_datasets(series)
    first = sources[0]
    number = int(getattr(first, "SeriesNumber", 0) or 0)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=number + 1000 if number < 1000 else 1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name="medeman teacher",
        software_versions=_version(),
        device_serial_number="0",
        series_description="medeman segmentation",
        content_label="MEDEMAN",
        content_description="mean-teacher (EMAN) segmentation",
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    seg.save_as(str(tmp))
    tmp.replace(path)  # never half a file under the final name
    return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medeman")
    except PackageNotFoundError:
        return "0"
