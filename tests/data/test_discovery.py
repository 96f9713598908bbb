"""Discovery of the folder, Decathlon and nnU-Net layouts; matching rules; channel grouping; the split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medeman.data import (
    DataError,
    discover_labeled,
    discover_unlabeled,
    group_channels,
    label_id,
    match_labels,
    split_cases,
    write_split,
)
from medeman.data.discovery import case_key, discover_test, expand_exclude, screen_paths

# (image names, label names, in_channels, expected {case id: [image names]})
MATCH_CASES = [
    (["a.nii.gz", "b.nii.gz"], ["a.nii.gz", "b.nii.gz"], 1, {"a": ["a.nii.gz"], "b": ["b.nii.gz"]}),
    (
        ["a.nii.gz", "b.mha", "c.nrrd"],
        ["a_seg.nii.gz", "b_label.mha", "c_mask.nii"],
        1,
        {"a": ["a.nii.gz"], "b": ["b.mha"], "c": ["c.nrrd"]},
    ),
    (["a_0000.nii.gz", "b_0000.nii.gz"], ["a.nii.gz", "b.nii.gz"], 1, {"a": ["a_0000.nii.gz"], "b": ["b_0000.nii.gz"]}),
    (
        ["case_0001.nii.gz", "case_0002.nii.gz"],
        ["case_0001.nii.gz", "case_0002.nii.gz"],
        1,
        {"case_0001": ["case_0001.nii.gz"], "case_0002": ["case_0002.nii.gz"]},
    ),
    (
        ["a_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"],
        ["a.nii.gz", "b_seg.nii.gz"],
        2,
        {"a": ["a_0000.nii.gz", "a_0001.nii.gz"], "b": ["b_0000.nii.gz", "b_0001.nii.gz"]},
    ),
]

# (image names, label names, in_channels, substrings of the problems)
MISMATCH_CASES = [
    (["a.nii.gz", "b.nii.gz"], ["a.nii.gz"], 1, ["b.nii.gz: image without label"]),
    (["a.nii.gz"], ["a.nii.gz", "z_seg.nii.gz"], 1, ["z_seg.nii.gz: label without image"]),
    (["a.nii.gz"], ["a.nii.gz", "a_seg.nii.gz"], 1, ["a second label for case 'a'"]),
    (["a_0000.nii.gz"], ["a.nii.gz"], 2, ["case 'a' has channel files _0000, expected _0000.._0001"]),
    (["a.nii.gz"], ["a.nii.gz"], 2, ["a.nii.gz: no _0000.._0001 channel suffix"]),
]


@pytest.mark.parametrize("images, labels, in_channels, expected", MATCH_CASES)
def test_match_labels(tmp_path, images, labels, in_channels, expected):
    cases, problems = match_labels(
        [tmp_path / "images" / n for n in images], [tmp_path / "labels" / n for n in labels], in_channels
    )
    assert problems == []
    got = {
        c["id"]: [Path(p).name for p in ([c["image"]] if isinstance(c["image"], str) else c["image"])] for c in cases
    }
    assert got == expected
    assert all(Path(c["label"]).parent.name == "labels" for c in cases)


@pytest.mark.parametrize("images, labels, in_channels, messages", MISMATCH_CASES)
def test_match_labels_problems(tmp_path, images, labels, in_channels, messages):
    _, problems = match_labels(
        [tmp_path / "images" / n for n in images], [tmp_path / "labels" / n for n in labels], in_channels
    )
    for message in messages:
        assert any(message in p for p in problems), (message, problems)


@pytest.mark.parametrize(
    "name, expected",
    [("a_seg.nii.gz", "a"), ("a_label.mha", "a"), ("a_mask.nrrd", "a"), ("a.nii", "a"), ("_seg.nii.gz", "_seg")],
)
def test_label_id(name, expected):
    assert label_id(Path(name)) == expected


def test_group_channels_in_subfolders(tmp_path):
    files = [
        tmp_path / "x" / "a_0000.nii.gz",
        tmp_path / "x" / "a_0001.nii.gz",
        tmp_path / "y" / "a_0000.nii.gz",
        tmp_path / "y" / "a_0001.nii.gz",
    ]
    groups, problems = group_channels(files, 2, root=tmp_path)
    assert problems == [] and sorted(groups) == ["x/a", "y/a"]


def test_folder_layout(make_cohort, cfg):
    root = make_cohort(3, 2, label_suffix="_seg")
    labeled = discover_labeled(root / "labeled", cfg)
    assert [c["id"] for c in labeled] == ["case0", "case1", "case2"]
    assert all(c["label"].endswith("_seg.nii.gz") for c in labeled)
    assert [c["id"] for c in discover_unlabeled(root / "unlabeled", cfg)] == ["scan0", "scan1"]


def test_unlabeled_recursive_and_mixed_formats(tmp_path, volume_writer):
    volume = np.zeros((16, 16, 16), dtype=np.int16)
    for name in ("a/s1.nii.gz", "a/b/s2.mha", "s3.nrrd", "s4.nii"):
        volume_writer(tmp_path / "u" / name, volume)
    (tmp_path / "u" / "notes.txt").write_text("not an image")
    (tmp_path / "u" / ".hidden.nii.gz").write_text("")
    cases = discover_unlabeled(tmp_path / "u")
    assert [c["id"] for c in cases] == ["a/b/s2", "a/s1", "s3", "s4"]


def _write_msd(root: Path, writer, with_unlabeled: bool) -> None:
    image, label = np.zeros((16, 16, 16), np.int16), np.zeros((16, 16, 16), np.uint8)
    for i in range(2):
        writer(root / "imagesTr" / f"la_{i}.nii.gz", image)
        writer(root / "labelsTr" / f"la_{i}.nii.gz", label)
    writer(root / "imagesTs" / "la_9.nii.gz", image)
    meta = {
        "name": "Toy",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ"},
        "training": [{"image": f"./imagesTr/la_{i}.nii.gz", "label": f"./labelsTr/la_{i}.nii.gz"} for i in range(2)],
        "test": ["./imagesTs/la_9.nii.gz"],
    }
    if with_unlabeled:
        writer(root / "extra" / "u_0.nii.gz", image)
        meta["unlabeled"] = [{"image": "./extra/u_0.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("with_unlabeled, expected_unlabeled", [(True, ["u_0"]), (False, ["la_9"])])
def test_decathlon_layout(tmp_path, volume_writer, with_unlabeled, expected_unlabeled):
    _write_msd(tmp_path, volume_writer, with_unlabeled)
    labeled = discover_labeled(tmp_path / "dataset.json")
    assert [c["id"] for c in labeled] == ["la_0", "la_1"]
    assert Path(labeled[0]["label"]).parent.name == "labelsTr"
    assert [c["id"] for c in discover_unlabeled(tmp_path)] == expected_unlabeled


def test_decathlon_missing_file(tmp_path, volume_writer):
    _write_msd(tmp_path, volume_writer, False)
    (tmp_path / "labelsTr" / "la_1.nii.gz").unlink()
    with pytest.raises(DataError, match="la_1.nii.gz: listed as label"):
        discover_labeled(tmp_path)


def test_nnunet_v2_layout(tmp_path, volume_writer):
    image, label = np.zeros((16, 16, 16), np.int16), np.zeros((16, 16, 16), np.uint8)
    for case in ("BRATS_001", "BRATS_002"):
        for ch in range(2):
            volume_writer(tmp_path / "imagesTr" / f"{case}_{ch:04d}.nii.gz", image)
        volume_writer(tmp_path / "labelsTr" / f"{case}.nii.gz", label)
    for ch in range(2):
        volume_writer(tmp_path / "imagesTs" / f"BRATS_100_{ch:04d}.nii.gz", image)
    meta = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "tumor": 1},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    labeled = discover_labeled(tmp_path)
    assert [c["id"] for c in labeled] == ["BRATS_001", "BRATS_002"]
    assert [Path(p).name for p in labeled[0]["image"]] == ["BRATS_001_0000.nii.gz", "BRATS_001_0001.nii.gz"]
    unlabeled = discover_unlabeled(tmp_path)
    assert [c["id"] for c in unlabeled] == ["BRATS_100"] and len(unlabeled[0]["image"]) == 2


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "labeled folder does not exist"),
        (lambda root: root.mkdir(), "expected images/ and labels/ sub-folders"),
        (lambda root: ((root / "images").mkdir(parents=True), (root / "labels").mkdir()), "no labeled case found"),
        (lambda root: (root / "images").mkdir(parents=True), "labels folder does not exist"),
    ],
)
def test_labeled_folder_problems(tmp_path, setup, message):
    root = tmp_path / "lab"
    setup(root)
    with pytest.raises(DataError, match=message):
        discover_labeled(root)


def test_empty_unlabeled_folder(tmp_path):
    (tmp_path / "u").mkdir()
    with pytest.raises(DataError, match=r"u: empty unlabeled folder"):
        discover_unlabeled(tmp_path / "u")


def test_problems_collected_not_raised(tmp_path):
    problems: list[str] = []
    assert discover_unlabeled(tmp_path / "missing", problems=problems) == []
    assert len(problems) == 1 and "does not exist" in problems[0]


@pytest.mark.parametrize(
    "n, fraction, n_val", [(6, 0.2, 1), (6, 0.34, 2), (10, 0.2, 2), (1, 0.5, 0), (5, 0.0, 0), (2, 0.9, 1)]
)
def test_split_sizes_and_determinism(n, fraction, n_val):
    cases = [{"id": f"c{i}"} for i in range(n)]
    train, val = split_cases(cases, fraction, seed=3)
    assert len(val) == n_val and len(train) == n - n_val
    assert {c["id"] for c in train} | {c["id"] for c in val} == {c["id"] for c in cases}
    # the split depends on ids and seed only, not on the input order
    assert split_cases(list(reversed(cases)), fraction, seed=3) == (train, val)


def test_split_seed_changes_split_and_is_written(tmp_path):
    cases = [{"id": f"c{i}", "image": f"c{i}.nii.gz", "label": f"l{i}.nii.gz"} for i in range(20)]
    splits = {tuple(c["id"] for c in split_cases(cases, 0.25, seed)[1]) for seed in range(5)}
    assert len(splits) > 1
    train, val = split_cases(cases, 0.25, 0)
    record = json.loads(write_split(tmp_path / "run" / "split.json", train, val, 0.25, 0).read_text())
    assert record["val"] == [c["id"] for c in val] and record["seed"] == 0 and len(record["cases"]) == 20


# the one case-id rule of training, check-data, inference and evaluation: (file name, in_channels, (case id, channel) or None)
CASE_KEYS = [
    ("a.nii.gz", 1, ("a", 0)),
    ("a_0000.nii.gz", 1, ("a", 0)),  # nnU-Net's single channel, whatever lies beside it
    ("liver_0007.nii.gz", 1, ("liver_0007", 0)),  # a numbered case, not a channel
    ("a_0001.mha", 2, ("a", 1)),
    ("a_0000_0001.nrrd", 2, ("a_0000", 1)),
    ("a.nii.gz", 2, None),
]


@pytest.mark.parametrize("name, in_channels, expected", CASE_KEYS)
def test_case_key(name, in_channels, expected):
    assert case_key(Path("x") / name, in_channels) == expected


def test_one_case_id_rule_in_every_command(tmp_path):
    from medeman.evaluate import _image_index
    from medeman.infer import find_cases

    for name in ("a_0000.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    groups, _ = group_channels(sorted(tmp_path.iterdir()), 1)
    assert sorted(groups) == ["a", "b"]
    assert sorted(c.case_id for c in find_cases(tmp_path, 1)[0]) == ["a", "b"]
    assert sorted(_image_index(tmp_path)) == ["a", "b"]


def _cases(root: Path, labels: str = "labels") -> dict[str, list[dict]]:
    return {
        "labeled": [
            {
                "id": "c1",
                "image": str(root / "lab" / "images" / "c1.nii.gz"),
                "label": str(root / "lab" / labels / "c1.nii.gz"),
            }
        ]
    }


# (file below the unlabeled root, cohorts to protect, expected reason (None: kept), expected kind)
SCREEN_CASES = [
    ("u/s1.nii.gz", _cases, None, None),
    ("lab/images/c1.nii.gz", _cases, "the image of labeled case 'c1'", "labeled case"),
    ("lab/labels/c1.nii.gz", _cases, "the label of labeled case 'c1'", "labeled case"),
    ("lab/segs/c2.nii.gz", lambda r: _cases(r, "segs"), "in the label folder of the labeled cohort", "label folder"),
    ("other/labelsTs/z.nii.gz", _cases, "in a label folder (labelsTs/)", "label folder"),
    ("other/labels/deep/z.nii.gz", _cases, "in a label folder (labels/)", "label folder"),
    ("u/s1_mask.nrrd", _cases, "named like a label (_mask)", "label name"),
    ("u/_seg.nii.gz", _cases, None, None),  # only a suffix, no case id: a name, not a label rule
]


@pytest.mark.parametrize("rel, protect, reason, kind", SCREEN_CASES)
def test_screen_paths(tmp_path, rel, protect, reason, kind):
    flagged = []
    kept = screen_paths([tmp_path / rel], tmp_path, protect(tmp_path), flagged)
    if reason is None:
        assert kept == [tmp_path / rel] and flagged == []
    else:
        assert kept == [] and [(f.file, f.reason, f.kind, f.excluded) for f in flagged] == [
            (str(tmp_path / rel), reason, kind, True)
        ]


def test_screen_paths_warns_on_an_image_with_a_label_beside_it(tmp_path, volume_writer):
    image = volume_writer(tmp_path / "ts" / "imagesTs" / "q_0000.nii.gz", np.zeros((16, 16, 16), np.int16))
    volume_writer(tmp_path / "ts" / "labelsTs" / "q.nii.gz", np.zeros((16, 16, 16), np.uint8))
    other = volume_writer(tmp_path / "ts" / "imagesTs" / "r_0000.nii.gz", np.zeros((16, 16, 16), np.int16))
    flagged = []
    assert screen_paths([image, other], tmp_path, None, flagged) == [image, other]
    assert [(f.file, f.kind, f.excluded) for f in flagged] == [(str(image), "has a label", False)]
    assert f"it has a label ({tmp_path / 'ts' / 'labelsTs' / 'q.nii.gz'})" in flagged[0].reason


def test_expand_exclude_files_folders_globs(tmp_path, volume_writer):
    volume = np.zeros((16, 16, 16), np.int16)
    for name in ("t/a.nii.gz", "t/sub/b.mha", "c.nrrd", "d.nii.gz"):
        volume_writer(tmp_path / name, volume)
    problems = []
    cases = expand_exclude(
        [str(tmp_path / "t"), str(tmp_path / "c.nrrd"), str(tmp_path / "d*"), str(tmp_path / "nope" / "*")], problems
    )
    assert sorted(Path(c["image"]).name for c in cases) == ["a.nii.gz", "b.mha", "c.nrrd", "d.nii.gz"]
    assert problems == [
        f"{tmp_path / 'nope' / '*'}: data.exclude entry matches no image file (formats .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)"
    ]


def test_test_cohort_labeled_or_plain_folder(make_cohort):
    root = make_cohort(2, 2)
    assert [c["id"] for c in discover_test(root / "labeled")] == ["case0", "case1"]
    assert [c["id"] for c in discover_test(root / "unlabeled")] == ["scan0", "scan1"]
    with pytest.raises(DataError, match="empty test folder"):
        (root / "empty").mkdir()
        discover_test(root / "empty")


def test_unlabeled_folder_of_labels_only_is_an_error_that_counts_them(make_cohort):
    root = make_cohort(2, 0)
    with pytest.raises(
        DataError, match=r"labels: empty unlabeled folder: .*; 2 file\(s\) left out as labels or protected cases"
    ):
        discover_unlabeled(root / "labeled" / "labels", protect={"labeled": discover_labeled(root / "labeled")})
