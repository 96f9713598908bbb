"""Find the cases of a cohort: plain folders, the Medical Segmentation Decathlon and nnU-Net v2 layouts.

A case is a dict ``{"id": str, "image": path or [path per channel], "label": path}`` (no
``"label"`` for unlabeled scans), the form MONAI's dictionary transforms take.

Layouts of a labeled folder ``LABELED``:

* ``LABELED/images/*`` and ``LABELED/labels/*``, matched by case id: the label has the image's
  name, or the name with a ``_seg``, ``_label`` or ``_mask`` suffix. With ``data.in_channels > 1``
  nnU-Net's ``_0000``, ``_0001``, ... suffixes group the channel files of one case; with one
  channel a ``_0000`` suffix is dropped from the id.
* ``LABELED/dataset.json`` of the Decathlon (its ``training`` list and optional ``unlabeled``
  list) or of nnU-Net v2 (``imagesTr``, ``labelsTr``; ``imagesTs`` is unlabeled on request).

An unlabeled folder is any folder of images, searched recursively, or such a dataset root; what is
not an unlabeled scan by its path (label folders, label-named files, the files of the labeled,
validation and test cohorts) is left out and reported (:func:`screen_paths`). Every command names
cases by one rule, :func:`case_key`.
Discovery functions collect every problem rather than stop at the first; pass a ``problems``
list to receive them, otherwise they are raised together as one :class:`DataError`.
"""

from __future__ import annotations

import glob
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from medeman.data.errors import DataError
from medeman.data.readers import IMAGE_SUFFIXES, image_stem, image_suffix
from medeman.typed_config import Config, as_config

LABEL_SUFFIXES = ("_seg", "_label", "_mask")
LABEL_FOLDERS = ("labels", "labelsTr", "labelsTs")
"""Folders of label maps (plain, nnU-Net/MSD): never searched for unlabeled scans."""
IMAGE_FOLDERS = {"images": "labels", "imagesTr": "labelsTr", "imagesTs": "labelsTs"}
"""Image folders and the label folder beside them (for the warning on labeled cases taken as unlabeled)."""
CHANNEL_SUFFIX = re.compile(r"^(?P<id>.+)_(?P<channel>\d{4})$")
"""nnU-Net's channel files: a file stem ``<id>_0000``, ``<id>_0001``, ... (groups ``id`` and ``channel``)."""


@dataclass(frozen=True)
class Flagged:
    """A file found among the unlabeled scans that is, or may be, something else; reported by name.

    ``kind`` is a short category for summaries (``label folder``, ``labeled case``, ``test case``,
    ``copy``, ``label-like``, ...); ``excluded`` is False for a file kept with a warning.
    """

    file: str
    reason: str
    kind: str
    excluded: bool = True


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (or below it, ``recursive``), hidden files left out, sorted."""
    folder = Path(folder)
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and not p.name.startswith(".") and image_suffix(p))


def image_entry(files: list[str | Path]) -> str | list[str]:
    """A case's ``"image"`` entry: the path of its one file, or a list of paths, one per channel."""
    return str(files[0]) if len(files) == 1 else [str(f) for f in files]


def index_by_case(
    files: Iterable[Path], case_id: Callable[[Path], str], problems: list[str], duplicate: str
) -> dict[str, Path]:
    """Files by ``case_id(file)``, the first of each id kept.

    A later file with a taken id is left out and reported in ``problems`` as
    ``duplicate.format(id=..., file=..., first=...)``.
    """
    out: dict[str, Path] = {}
    for file in files:
        key = case_id(file)
        if key in out:
            problems.append(duplicate.format(id=key, file=file, first=out[key]))
            continue
        out[key] = file
    return out


def _dataset_root(path: str | Path) -> Path:
    """The folder of a cohort given as the folder or as its ``dataset.json``."""
    path = Path(path)
    return path.parent if path.name == "dataset.json" else path


def _raise_or_collect(problems: list[str] | None, found: list[str]) -> None:
    if problems is None:
        if found:
            raise DataError("\n".join(found))
    else:
        problems.extend(found)


def _in_channels(cfg: Config | dict | None) -> int:
    return as_config(cfg).data.in_channels if cfg else 1


def case_key(path: str | Path, in_channels: int = 1) -> tuple[str, int] | None:
    """The one case-id rule of medeman (training, check-data, inference, evaluation): ``(case id, channel)`` of a file.

    With one channel every file is a case, named after the file without its image suffix and
    without a trailing ``_0000`` (nnU-Net's single channel): ``a_0000.nii.gz`` is case ``a`` next to
    ``b.nii.gz`` as well, and ``liver_0007.nii.gz`` stays ``liver_0007``. With more channels a file
    must be named ``<id>_<NNNN>`` (nnU-Net): it is channel ``NNNN`` of case ``<id>``.

    Returns:
        ``(case id, channel)``, or ``None`` for a file without a channel suffix when ``in_channels > 1``.
    """
    stem = image_stem(path)
    match = CHANNEL_SUFFIX.match(stem)
    if in_channels == 1:
        return (match["id"] if match and match["channel"] == "0000" else stem), 0
    return (match["id"], int(match["channel"])) if match else None


def group_channels(
    files: list[Path], in_channels: int, root: Path | None = None
) -> tuple[dict[str, list[Path]], list[str]]:
    """Group image files into cases by :func:`case_key`: ``{case id: [file per channel]}``, and the problems found.

    A case must have exactly the channels ``0000`` to ``in_channels - 1``; an incomplete case, a
    file without a channel suffix (``in_channels > 1``) and a second file of the same case and
    channel are left out and reported, one line each, naming the file.

    Args:
        files: image files.
        in_channels: channels per case (``data.in_channels``, or the model's).
        root: when given, ids are paths relative to it (so equal names in sub-folders stay apart).
    """
    cases: dict[str, dict[int, Path]] = {}
    problems: list[str] = []
    for path in files:
        key = case_key(path, in_channels)
        if key is None:
            problems.append(
                f"{path}: no _0000.._{in_channels - 1:04d} channel suffix, but data.in_channels={in_channels}"
            )
            continue
        prefix = "" if root is None else str(Path(path).parent.relative_to(root)).replace("\\", "/")
        prefix = "" if prefix in ("", ".") else prefix + "/"
        channels = cases.setdefault(prefix + key[0], {})
        if key[1] in channels:
            problems.append(f"{path}: same case and channel as {channels[key[1]]}; left out")
            continue
        channels[key[1]] = path
    grouped: dict[str, list[Path]] = {}
    for case_id, channels in cases.items():
        if sorted(channels) != list(range(in_channels)):
            found = ", ".join(f"_{c:04d}" for c in sorted(channels))
            problems.append(
                f"{channels[min(channels)]}: case '{case_id}' has channel files {found}, expected _0000.._{in_channels - 1:04d} (data.in_channels={in_channels})"
            )
            continue
        grouped[case_id] = [channels[c] for c in sorted(channels)]
    return grouped, problems


def label_id(path: str | Path) -> str:
    """Case id of a label file: its name without extension and without a ``_seg``/``_label``/``_mask`` suffix."""
    stem = image_stem(path)
    for suffix in LABEL_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def match_labels(
    image_files: list[Path], label_files: list[Path], in_channels: int = 1
) -> tuple[list[dict], list[str]]:
    """Pair image files with label files by case id; return the cases and every unmatched file.

    Args:
        image_files: image files (channel files of a case are grouped, see :func:`group_channels`).
        label_files: label files, named like the case or with a ``_seg``/``_label``/``_mask`` suffix.
        in_channels: channels per case.

    Returns:
        ``(cases, problems)``: case dicts sorted by id, and one line per problem naming the file.
    """
    groups, problems = group_channels(image_files, in_channels)
    labels = index_by_case(label_files, label_id, problems, "{file}: a second label for case '{id}' (first: {first})")
    cases, used = [], set()
    for case_id, files in sorted(groups.items()):
        full = image_stem(files[0])
        key = case_id if case_id in labels else full if full in labels else None
        if key is None:
            problems.append(
                f"{files[0]}: image without label (expected {case_id}{image_suffix(files[0])} or {case_id}_seg/_label/_mask in the labels folder)"
            )
            continue
        used.add(key)
        cases.append({"id": case_id, "image": image_entry(files), "label": str(labels[key])})
    for key, path in sorted(labels.items()):
        if key not in used:
            problems.append(f"{path}: label without image (no image named {key}* in the images folder)")
    return cases, problems


def _require_folder(path: Path, what: str) -> list[str]:
    if not path.exists():
        return [f"{path}: {what} folder does not exist"]
    if not path.is_dir():
        return [f"{path}: {what} is not a folder"]
    return []


def read_dataset_json(path: str | Path, layout: bool = True) -> dict[str, Any]:
    """Read a Decathlon or nnU-Net v2 ``dataset.json``, raising :class:`DataError` if it is unusable.

    The one reader of ``dataset.json``: cohorts here, class names in :func:`medeman.classes.load_class_names`
    (``layout=False``: only its ``labels`` map is wanted, so no ``training`` list or ``file_ending`` is asked for).
    """
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable dataset.json ({err})") from None
    if layout and not (
        isinstance(meta, dict) and ("training" in meta or "file_ending" in meta or "channel_names" in meta)
    ):
        raise DataError(
            f"{path}: neither a Decathlon dataset.json (no 'training' list) nor an nnU-Net v2 one (no 'file_ending'/'channel_names')"
        )
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a dataset.json: a JSON object is expected, got {type(meta).__name__}")
    return meta


def _msd_entry(root: Path, entry: Any, key: str) -> str | list[str]:
    value = entry[key] if isinstance(entry, dict) else entry
    if isinstance(value, (list, tuple)):
        return [str((root / v).resolve()) for v in value]
    return str((root / value).resolve())


def _msd_id(image: str | list[str]) -> str:
    return image_stem(image[0] if isinstance(image, list) else image)


def _dataset_labeled(root: Path, meta: dict, in_channels: int) -> tuple[list[dict], list[str]]:
    if "training" in meta:  # Decathlon: explicit list of image/label pairs (multi-modal images are 4D files)
        cases, problems = [], []
        for entry in meta["training"]:
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                problems.append(f"{root / 'dataset.json'}: training entry {entry!r} lacks 'image' or 'label'")
                continue
            case = {"image": _msd_entry(root, entry, "image"), "label": _msd_entry(root, entry, "label")}
            for key in ("image", "label"):
                for file in case[key] if isinstance(case[key], list) else [case[key]]:
                    if not Path(file).is_file():
                        problems.append(f"{file}: listed as {key} in {root / 'dataset.json'} but missing")
            cases.append({"id": _msd_id(case["image"]), **case})
        return sorted(cases, key=lambda c: c["id"]), problems
    n_channels = len(meta.get("channel_names", meta.get("modality", {}))) or in_channels
    problems = _require_folder(root / "imagesTr", "imagesTr") + _require_folder(root / "labelsTr", "labelsTr")
    if problems:
        return [], problems
    return match_labels(list_images(root / "imagesTr"), list_images(root / "labelsTr"), n_channels)


def discover_labeled(
    path: str | Path, cfg: Config | dict | None = None, problems: list[str] | None = None
) -> list[dict]:
    """Find the labeled cases under ``path`` (``images/`` + ``labels/``, or a ``dataset.json`` root).

    Args:
        path: the labeled folder, or a Decathlon/nnU-Net ``dataset.json`` (or its folder).
        cfg: resolved config; ``data.in_channels`` decides channel grouping (default 1).
        problems: if given, problems are appended here instead of raised.

    Returns:
        Case dicts ``{"id", "image", "label"}`` sorted by id.

    Raises:
        DataError: listing every problem (missing folder, unmatched image or label, no case at all).
    """
    root = _dataset_root(path)
    found = _require_folder(root, "labeled")
    cases: list[dict] = []
    if not found:
        if (root / "dataset.json").is_file():
            cases, found = _dataset_labeled(root, read_dataset_json(root / "dataset.json"), _in_channels(cfg))
        elif (root / "images").is_dir() or (root / "labels").is_dir():
            found = _require_folder(root / "images", "images") + _require_folder(root / "labels", "labels")
            if not found:
                cases, found = match_labels(
                    list_images(root / "images"), list_images(root / "labels"), _in_channels(cfg)
                )
        else:
            found = [f"{root}: expected images/ and labels/ sub-folders or a dataset.json (Decathlon / nnU-Net v2)"]
        if not cases:
            found.append(
                f"{root}: no labeled case found (images with matching labels, formats {', '.join(IMAGE_SUFFIXES)})"
            )
    _raise_or_collect(problems, found)
    return cases


def discover_unlabeled(
    path: str | Path,
    cfg: Config | dict | None = None,
    problems: list[str] | None = None,
    flagged: list[Flagged] | None = None,
    protect: dict[str, list[dict]] | None = None,
) -> list[dict]:
    """Find the unlabeled scans under ``path``, searched recursively, leaving out what is not an unlabeled scan.

    A Decathlon/nnU-Net root gives its ``unlabeled`` list if it has one, else ``imagesTs``. Left out
    by path (see :func:`screen_paths`): files of the ``protect`` cohorts (labeled, validation, test,
    ``data.exclude``), files in label folders (``labels``, ``labelsTr``, ``labelsTs``, and the label
    folder of any protected cohort) and files named like labels (``_seg``, ``_label``, ``_mask``).
    Copies by content and label-like volumes need the voxels: :func:`medeman.data.checks.screen_content`.

    Args:
        path: a folder of images (any depth), or a dataset root.
        cfg: resolved config; ``data.in_channels`` decides channel grouping (default 1).
        problems: if given, problems are appended here instead of raised.
        flagged: if given, every file left out (and every file kept with a warning) is appended here.
        protect: cohorts whose files are never unlabeled scans, by name: ``{"labeled": cases, ...}``.

    Returns:
        Case dicts ``{"id", "image"}`` sorted by id.

    Raises:
        DataError: if the folder is missing or holds no image.
    """
    root = _dataset_root(path)
    found = _require_folder(root, "unlabeled")
    flagged = [] if flagged is None else flagged
    in_channels = _in_channels(cfg)
    cases: list[dict] = []
    if not found:
        if (root / "dataset.json").is_file():
            meta = read_dataset_json(root / "dataset.json")
            if meta.get("unlabeled"):
                for entry in meta["unlabeled"]:
                    image = _msd_entry(root, entry, "image")
                    files = [Path(f) for f in (image if isinstance(image, list) else [image])]
                    for file in files:
                        if not file.is_file():
                            found.append(f"{file}: listed as unlabeled in {root / 'dataset.json'} but missing")
                    if len(screen_paths(files, root, protect, flagged, in_channels)) == len(files):
                        cases.append({"id": _msd_id(image), "image": image})
            elif (root / "imagesTs").is_dir():
                n_channels = len(meta.get("channel_names", {})) or in_channels
                files = screen_paths(list_images(root / "imagesTs"), root, protect, flagged, n_channels)
                groups, found = group_channels(files, n_channels)
                cases = [{"id": k, "image": image_entry(v)} for k, v in groups.items()]
        else:
            files = screen_paths(list_images(root, recursive=True), root, protect, flagged, in_channels)
            groups, found = group_channels(files, in_channels, root=root)
            cases = [{"id": k, "image": image_entry(v)} for k, v in groups.items()]
        if not cases:
            left_out = sum(f.excluded for f in flagged)
            found.append(
                f"{root}: empty unlabeled folder: no image found (formats {', '.join(IMAGE_SUFFIXES)}, searched recursively)"
                + (f"; {left_out} file(s) left out as labels or protected cases" if left_out else "")
            )
    _raise_or_collect(problems, found)
    return sorted(cases, key=lambda c: c["id"])


def is_label_name(path: str | Path) -> bool:
    """Whether a file is named like a label map: ``<id>_seg``, ``<id>_label`` or ``<id>_mask``."""
    return label_id(path) != image_stem(path)


def _case_files(case: dict) -> list[tuple[str, str]]:
    """``(role, file)`` pairs of a case: its image file(s) and label, if any."""
    images = case["image"] if isinstance(case["image"], list) else [case["image"]]
    return [("image", f) for f in images] + ([("label", case["label"])] if case.get("label") else [])


def screen_paths(
    files: list[Path], root: Path, protect: dict[str, list[dict]] | None, flagged: list[Flagged], in_channels: int = 1
) -> list[Path]:
    """The candidate unlabeled files that are scans by path; each other file is appended to ``flagged``.

    Left out, in this order of reasons: a file of a ``protect`` cohort (same resolved path); a file
    in the label folder of a protected cohort, or below ``root`` in a folder named ``labels``,
    ``labelsTr`` or ``labelsTs``; a file named like a label (:func:`is_label_name`). A kept file in an
    ``images``/``imagesTr``/``imagesTs`` folder with a matching label beside it is kept but flagged:
    it is a labeled case (perhaps of a test set) that the user did not name.
    """
    known: dict[Path, tuple[str, str]] = {}  # resolved file: (reason, kind)
    label_dirs: dict[Path, str] = {}
    for cohort, cases in (protect or {}).items():
        for case in cases:
            for role, file in _case_files(case):
                if cohort == "data.exclude":
                    known.setdefault(Path(file).resolve(), ("listed in data.exclude", "data.exclude"))
                else:
                    known.setdefault(
                        Path(file).resolve(), (f"the {role} of {cohort} case '{case['id']}'", f"{cohort} case")
                    )
                if role == "label":
                    label_dirs.setdefault(Path(file).resolve().parent, cohort)
    kept, beside = [], _LabelsBeside(in_channels)
    for file in files:
        resolved = Path(file).resolve()
        try:
            folders = Path(file).parent.relative_to(root).parts
        except ValueError:  # a dataset.json may list files outside its folder
            folders = Path(file).parent.parts[-1:]
        label_folder = next((f for f in folders if f in LABEL_FOLDERS), None)
        if resolved in known:
            flagged.append(Flagged(str(file), *known[resolved]))
        elif resolved.parent in label_dirs:
            flagged.append(
                Flagged(str(file), f"in the label folder of the {label_dirs[resolved.parent]} cohort", "label folder")
            )
        elif label_folder is not None:
            flagged.append(Flagged(str(file), f"in a label folder ({label_folder}/)", "label folder"))
        elif is_label_name(file):
            flagged.append(
                Flagged(str(file), f"named like a label ({image_stem(file)[len(label_id(file)) :]})", "label name")
            )
        else:
            kept.append(file)
            label = beside(Path(file))
            if label is not None:
                flagged.append(
                    Flagged(
                        str(file),
                        f"taken as unlabeled, but it has a label ({label}): if {Path(file).parent.parent} is a test "
                        "cohort, pass it as --test (or list it in data.exclude)",
                        "has a label",
                        excluded=False,
                    )
                )
    return kept


class _LabelsBeside:
    """The label file of an image in an ``images``-type folder, found in the label folder beside it (listed once per folder)."""

    def __init__(self, in_channels: int) -> None:
        self.in_channels = in_channels
        self.folders: dict[Path, dict[str, Path]] = {}

    def __call__(self, file: Path) -> Path | None:
        if file.parent.name not in IMAGE_FOLDERS:
            return None
        folder = file.parent.parent / IMAGE_FOLDERS[file.parent.name]
        if folder not in self.folders:
            self.folders[folder] = {label_id(f): f for f in list_images(folder)} if folder.is_dir() else {}
        key = case_key(file, self.in_channels)
        return None if key is None else self.folders[folder].get(key[0])


def expand_exclude(patterns: list[str], problems: list[str]) -> list[dict]:
    """The image files that ``data.exclude`` names (files, folders searched recursively, ``glob`` patterns with ``**``),
    as cases ``{"id", "image"}``; an entry that matches no image file is a problem (a typo must not let a test set in)."""
    cases: dict[str, dict] = {}
    for pattern in patterns:
        path = Path(str(pattern)).expanduser()
        matches = [path] if path.exists() else [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
        files = [f for m in matches for f in (list_images(m, recursive=True) if m.is_dir() else [m]) if image_suffix(f)]
        if not files:
            problems.append(
                f"{pattern}: data.exclude entry matches no image file (formats {', '.join(IMAGE_SUFFIXES)})"
            )
        for file in files:
            cases.setdefault(str(file.resolve()), {"id": str(file), "image": str(file)})
    return list(cases.values())


def discover_test(path: str | Path, cfg: Config | dict | None = None, problems: list[str] | None = None) -> list[dict]:
    """Find the cases of a test cohort: a labeled layout (as :func:`discover_labeled`) or any folder of images."""
    root = _dataset_root(path)
    if (root / "dataset.json").is_file() or (root / "images").is_dir() or (root / "labels").is_dir():
        return discover_labeled(path, cfg, problems)
    found: list[str] = []
    cases = discover_unlabeled(path, cfg, found)
    _raise_or_collect(problems, [p.replace("unlabeled folder", "test folder") for p in found])
    return cases


def has_unlabeled_list(path: str | Path, cfg: Config | dict | None = None) -> bool:
    """Whether a dataset root offers unlabeled scans (a Decathlon ``unlabeled`` list, or ``imagesTs`` when
    ``data.unlabeled_from_imagesTs`` is set)."""
    root = _dataset_root(path)
    if not (root / "dataset.json").is_file():
        return False
    meta = read_dataset_json(root / "dataset.json")
    return bool(meta.get("unlabeled")) or bool(
        cfg and as_config(cfg).data.unlabeled_from_imagesTs and (root / "imagesTs").is_dir()
    )


def split_cases(cases: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministically split labeled cases into training and validation.

    The cases are sorted by id and shuffled with ``random.Random(seed)``, so the split depends only
    on the case ids, the fraction and the seed. At least one case stays in training, and at least
    one goes to validation when ``val_fraction > 0`` and there are two cases or more.

    Returns:
        ``(train, val)`` lists of case dicts.
    """
    ordered = sorted(cases, key=lambda c: c["id"])
    random.Random(seed).shuffle(ordered)
    n_val = 0
    if val_fraction > 0 and len(ordered) >= 2:
        n_val = min(max(1, round(val_fraction * len(ordered))), len(ordered) - 1)
    val, train = ordered[:n_val], ordered[n_val:]
    return sorted(train, key=lambda c: c["id"]), sorted(val, key=lambda c: c["id"])


def write_split(path: str | Path, train: list[dict], val: list[dict], val_fraction: float, seed: int) -> Path:
    """Write the split as JSON (``{"train": [ids], "val": [ids], "val_fraction", "seed", "cases"}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "val_fraction": val_fraction,
        "seed": seed,
        "train": [c["id"] for c in train],
        "val": [c["id"] for c in val],
        "cases": {c["id"]: {k: v for k, v in c.items() if k != "id"} for c in train + val},
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path
