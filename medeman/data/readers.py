"""Reading medeman's image files: NIfTI through nibabel, NRRD and MetaImage (``.mha``/``.mhd``) through SimpleITK.

MONAI reads NRRD/MetaImage through ITK (``itk``) or pynrrd, neither of which medeman depends on;
SimpleITK is already a dependency, so :class:`SimpleITKReader` plugs it into ``LoadImage``. NIfTI
stays with MONAI's ``NibabelReader``. :func:`read_volume` and :func:`read_geometry` give the same
arrays and RAS affines outside a transform chain (evaluation, data checks, inference outputs).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader, NibabelReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""ITK stores LPS world coordinates, NIfTI and MONAI RAS: the first two world axes flip (its own inverse)."""


def image_suffix(path: str | Path) -> str | None:
    """Return the image suffix of ``path`` (``.nii.gz``, ``.mha``, ...) or ``None`` if it is not an image."""
    name = str(path).lower()
    return next((s for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def image_stem(path: str | Path) -> str:
    """The file name of ``path`` without its image suffix (the whole name if it has none)."""
    name, suffix = Path(path).name, image_suffix(path)
    return name[: -len(suffix)] if suffix else name


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm along the array's three axes: the lengths of the affine's columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


class SimpleITKReader(ImageReader):
    """Read ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` with SimpleITK as ``(x, y, z[, c])`` arrays and a RAS affine.

    Several files are stacked as channels on a new first axis, as MONAI's readers do.

    Examples:
        >>> from monai.transforms import LoadImage
        >>> img = LoadImage(reader=SimpleITKReader(), image_only=True)("scan.mha")
    """

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        return all(str(f).lower().endswith(SITK_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> list[sitk.Image] | sitk.Image:
        names = ensure_tuple(data)
        if not self.verify_suffix(names):
            raise ValueError(f"SimpleITKReader reads {', '.join(SITK_SUFFIXES)} only, got {names}")
        images = [sitk.ReadImage(str(n)) for n in names]
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        arrays, meta = [], {}
        for image in img if isinstance(img, (list, tuple)) else [img]:  # ensure_tuple would iterate a sitk.Image
            array = sitk.GetArrayFromImage(image)  # (z, y, x[, c])
            ndim = image.GetDimension()
            array = np.transpose(array, tuple(reversed(range(ndim))) + tuple(range(ndim, array.ndim)))
            affine = ras_affine(image)
            header = {
                MetaKeys.AFFINE: affine,
                MetaKeys.ORIGINAL_AFFINE: affine.copy(),
                MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[:ndim]),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if array.ndim > ndim else float("nan"),
                "spacing": np.asarray(image.GetSpacing()),
            }
            if not meta:
                meta = header
            elif not np.allclose(meta[MetaKeys.AFFINE], affine) or not np.array_equal(
                meta[MetaKeys.SPATIAL_SHAPE], header[MetaKeys.SPATIAL_SHAPE]
            ):
                raise RuntimeError("channel files of one case differ in shape or affine")
            arrays.append(array)
        if len(arrays) == 1:
            return arrays[0], meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta


def sitk_affine(image: sitk.Image | sitk.ImageFileReader) -> np.ndarray:
    """The 4x4 LPS voxel-to-world affine of a 3D SimpleITK image or read header (direction x spacing, origin)."""
    ndim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(ndim, ndim)
    affine = np.eye(4)
    affine[:ndim, :ndim] = direction * np.asarray(image.GetSpacing(), dtype=float)
    affine[:ndim, 3] = image.GetOrigin()
    return affine


def ras_affine(image: sitk.Image | sitk.ImageFileReader) -> np.ndarray:
    """The 4x4 RAS voxel-to-world affine of a SimpleITK image or read header, as NIfTI and MONAI use."""
    return LPS_TO_RAS @ sitk_affine(image)


class VolumeReader(ImageReader):
    """Every medeman image format in one reader: NIfTI through nibabel, NRRD/MetaImage through SimpleITK.

    One reader (rather than a list that ``LoadImage`` tries in turn) keeps a truncated file's own
    error message instead of a chain of "unable to load" attempts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nifti, self.sitk = NibabelReader(), SimpleITKReader()

    def _pick(self, filename) -> ImageReader:
        return self.sitk if self.sitk.verify_suffix(filename) else self.nifti

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        return all(image_suffix(f) is not None for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs):
        return self._pick(data).read(data, **kwargs)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        first = img[0] if isinstance(img, (list, tuple)) else img
        return (self.sitk if isinstance(first, sitk.Image) else self.nifti).get_data(img)


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one image file as ``(array indexed [x, y, z(, c)], RAS affine)`` with :class:`VolumeReader`.

    Raises:
        Exception: whatever nibabel, SimpleITK or zlib raise for a missing, unreadable or truncated file.
    """
    reader = VolumeReader()
    array, meta = reader.get_data(reader.read(str(path)))
    return np.asarray(array), np.asarray(meta[MetaKeys.AFFINE], dtype=float)


def read_geometry(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and RAS affine of an image file, reading only its header."""
    if str(path).lower().endswith(SITK_SUFFIXES):
        header = sitk.ImageFileReader()
        header.SetFileName(str(path))
        header.ReadImageInformation()
        return tuple(int(s) for s in header.GetSize()[:3]), ras_affine(header)
    image = nib.load(str(path))
    return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=float)


def set_sitk_geometry(image: sitk.Image, affine: np.ndarray) -> None:
    """Give a SimpleITK image the geometry of a RAS voxel-to-world ``affine`` (SimpleITK is LPS)."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])


def write_volume(
    array: np.ndarray, geometry: np.ndarray | str | Path, path: str | Path, intent: str | None = None
) -> Path:
    """Write an ``(x, y, z[, c])`` array as NIfTI (``.nii``/``.nii.gz``) or NRRD/MetaImage through SimpleITK.

    The one volume writer of medeman: sample data, inference masks and probability maps, uncertainty maps.

    Args:
        array: voxels indexed ``[x, y, z]``, or ``[x, y, z, c]`` for a vector image (e.g. class probabilities).
        geometry: a 4x4 RAS voxel-to-world affine, or an image file the array lies on the grid of.
            A NIfTI reference keeps its header (qform/sform codes, units) exactly; a NRRD/MetaImage
            reference written as NRRD/MetaImage keeps its origin, spacing and direction exactly.
        path: output file; its suffix picks the format. Missing folders are created.
        intent: NIfTI intent code name (``"label"`` for masks); ``None`` leaves it unset.

    The file is written in a hidden folder beside ``path`` and renamed into place (with a detached
    ``.mhd``/``.nhdr`` data file), so a crash never leaves half a file under the final name, and the
    name stored in a ``.gz`` header is the final one.

    Examples:
        >>> write_volume(mask.astype(np.uint8), "scan.nii.gz", "scan_mask.nii.gz", intent="label")
        >>> write_volume(image, np.eye(4), "phantom.mha")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp_dir.mkdir(exist_ok=True)
    try:
        if path.name.lower().endswith(SITK_SUFFIXES):
            _write_sitk(array, geometry, tmp_dir / path.name)
        else:
            _write_nifti(array, geometry, tmp_dir / path.name, intent)
        written = sorted(tmp_dir.iterdir(), key=lambda f: f.name == path.name)  # the header file last
        for file in written:
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _write_nifti(array: np.ndarray, geometry: np.ndarray | str | Path, path: Path, intent: str | None) -> None:
    reference = Path(geometry) if isinstance(geometry, (str, Path)) else None
    if reference is not None and reference.name.lower().endswith(NIFTI_SUFFIXES):
        ref = nib.load(str(reference))  # keep its qform/sform codes and units exactly
        img = nib.Nifti1Image(array, ref.affine, header=ref.header.copy())
        img.header.set_data_dtype(array.dtype)
        img.header.set_slope_inter(1.0, 0.0)  # a CT's rescale intercept must not shift the labels
        img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    else:
        affine = np.asarray(geometry, dtype=float) if reference is None else read_geometry(reference)[1]
        img = nib.Nifti1Image(array, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        if reference is not None:
            img.header.set_xyzt_units("mm")
    if intent is not None:
        img.header.set_intent(intent)
    nib.save(img, str(path))


def _write_sitk(array: np.ndarray, geometry: np.ndarray | str | Path, path: Path) -> None:
    out = sitk.GetImageFromArray(
        np.ascontiguousarray(np.transpose(array, (2, 1, 0) + tuple(range(3, array.ndim)))), isVector=array.ndim == 4
    )
    reference = Path(geometry) if isinstance(geometry, (str, Path)) else None
    if reference is not None and reference.name.lower().endswith(SITK_SUFFIXES):
        header = sitk.ImageFileReader()
        header.SetFileName(str(reference))
        header.ReadImageInformation()
        out.SetOrigin(header.GetOrigin())
        out.SetSpacing(header.GetSpacing())
        out.SetDirection(header.GetDirection())
    else:
        set_sitk_geometry(out, np.asarray(geometry, dtype=float) if reference is None else read_geometry(reference)[1])
    sitk.WriteImage(out, str(path), useCompression=True)
