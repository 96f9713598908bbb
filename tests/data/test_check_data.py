"""``check_data.py`` / ``medeman check-data``: a table, one line per problem, exit code 0 or 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medeman.check_data import main
from medeman.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]


def test_clean_cohort_exits_0(make_cohort, capsys):
    root = make_cohort(2, 2)
    assert main(["--labeled", str(root / "labeled"), "--unlabeled", str(root / "unlabeled")]) == 0
    out = capsys.readouterr().out
    assert "case0" in out and "scan1" in out and "20x20x16" in out and "RAS" in out
    assert "label classes found: 0, 1, 2; set data.num_classes: 3" in out and "no problems found" in out


def test_broken_cohort_exits_1_naming_files(make_cohort, volume_writer, capsys):
    root = make_cohort(3, 2)
    bad = root / "labeled" / "images" / "case1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    (root / "labeled" / "labels" / "case2.nii.gz").unlink()
    volume_writer(root / "unlabeled" / "scan1.nii.gz", np.zeros((20, 20), np.int16))
    assert cli_main(["check-data", "--labeled", str(root / "labeled"), "--unlabeled", str(root / "unlabeled")]) == 1
    out = capsys.readouterr().out
    assert "3 problem(s):" in out
    assert f"{bad}: unreadable or truncated file" in out
    assert "case2.nii.gz: image without label" in out
    assert "scan1.nii.gz: not a 3D volume" in out


@pytest.mark.parametrize(
    "sets, code, text",
    [
        (["data.num_classes=3"], 0, "data.num_classes=3"),
        (["data.num_classes=2"], 1, "label values 2 outside 0..1"),
        (["data.in_channels=2"], 1, "no _0000.._0001 channel suffix"),
    ],
)
def test_config_drives_checks(make_cohort, capsys, sets, code, text):
    root = make_cohort(1, 0)
    args = ["--labeled", str(root / "labeled")]
    for item in sets:
        args += ["--set", item]
    assert main(args) == code
    assert text in capsys.readouterr().out


def test_config_file_and_bad_key(make_cohort, tmp_path, capsys):
    root = make_cohort(1, 0)
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  num_classes: 2\n")
    assert main(["--labeled", str(root / "labeled"), "--config", str(config)]) == 1
    config.write_text("data:\n  num_clases: 3\n")
    assert main(["--labeled", str(root / "labeled"), "--config", str(config)]) == 2
    assert "unknown config key 'data.num_clases'" in capsys.readouterr().err


def test_script_wrapper(make_cohort):
    root = make_cohort(1, 0)
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_data.py"), "--labeled", str(root / "labeled")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    (root / "labeled" / "labels" / "case0.nii.gz").unlink()
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_data.py"), "--labeled", str(root / "labeled")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 1 and "no labeled case found" in run.stdout


def _dataset_root(make_cohort, phantom_maker, volume_writer) -> Path:
    """A dataset root as users keep them: labeled cases, test cases, unlabeled scans, stray label files."""
    root = make_cohort(2, 3)
    for i in range(2):
        image, label = phantom_maker(seed=200 + i)
        volume_writer(root / "test" / "images" / f"t{i}.nii.gz", image)
        volume_writer(root / "test" / "labels" / f"t{i}.nii.gz", label)
    volume_writer(root / "unlabeled" / "scan0_seg.nii.gz", phantom_maker()[1])  # a label named like one
    volume_writer(root / "nnunet" / "labelsTr" / "x_001.nii.gz", phantom_maker()[1])  # a label folder by name
    (root / "unlabeled" / "scan2_copy.nii.gz").write_bytes((root / "labeled" / "images" / "case1.nii.gz").read_bytes())
    return root


# (--test given, expected unlabeled ids, expected "file: reason" fragments, expected warning fragments)
ROOT_CASES = [
    (
        True,
        ["unlabeled/scan0", "unlabeled/scan1", "unlabeled/scan2"],
        [
            "labeled/images/case0.nii.gz: the image of labeled case 'case0'",
            "labeled/labels/case1.nii.gz: the label of labeled case 'case1'",
            "test/images/t1.nii.gz: the image of test case 't1'",
            "test/labels/t0.nii.gz: the label of test case 't0'",
            "unlabeled/scan0_seg.nii.gz: named like a label (_seg)",
            "nnunet/labelsTr/x_001.nii.gz: in a label folder (labelsTr/)",
            "unlabeled/scan2_copy.nii.gz: same voxels as the image of labeled case 'case1'",
        ],
        [],
    ),
    (
        False,
        ["test/images/t0", "test/images/t1", "unlabeled/scan0", "unlabeled/scan1", "unlabeled/scan2"],
        ["test/labels/t1.nii.gz: in a label folder (labels/)", "unlabeled/scan2_copy.nii.gz: same voxels as"],
        [
            "test/images/t0.nii.gz: taken as unlabeled, but it has a label",
            "test/images/t1.nii.gz: taken as unlabeled, but it has a label",
        ],
    ),
]


@pytest.mark.parametrize("with_test, expected, left_out, warned", ROOT_CASES)
def test_dataset_root_as_unlabeled(
    make_cohort, phantom_maker, volume_writer, capsys, with_test, expected, left_out, warned
):
    root = _dataset_root(make_cohort, phantom_maker, volume_writer)
    args = ["--labeled", str(root / "labeled"), "--unlabeled", str(root), "--set", "data.num_classes=3"]
    assert main(args + (["--test", str(root / "test")] if with_test else [])) == 0
    out = capsys.readouterr().out
    rows = [line.split()[1] for line in out.splitlines() if line.startswith("unlabeled  ")]
    assert rows == expected
    n_out = 11 if with_test else 9  # 4 labeled files + 4 test files (or the 2 test labels) + 3 stray files
    assert f"\n{n_out} file(s) left out of the unlabeled scans:" in out
    named = [line for line in out.splitlines() if line.startswith(f"  {root}")]
    assert len(named) == n_out + len(warned)  # every file left out or warned about, by name
    for fragment in left_out + warned:
        assert sum(fragment in line for line in named) == 1, (fragment, named)
    assert f"unlabeled scans: {len(expected)} used; {n_out} file(s) left out" in out


def test_label_map_among_unlabeled_is_flagged(make_cohort, phantom_maker, volume_writer, capsys):
    root = make_cohort(1, 2)
    label = phantom_maker(seed=3)[1]
    label[0:3, 0:3, 0:3] = 1  # not a copy of the labeled case's label
    volume_writer(root / "unlabeled" / "scan9.nii.gz", label)
    args = ["--labeled", str(root / "labeled"), "--unlabeled", str(root / "unlabeled"), "--set", "data.num_classes=3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        f"  {root / 'unlabeled' / 'scan9.nii.gz'}: looks like a label map (only the values 0, 1, 2); set data.keep_label_like_unlabeled: true"
        in out
    )
    assert "2 unlabeled case(s)" in out
    assert main(args + ["--set", "data.keep_label_like_unlabeled=true"]) == 0
    out = capsys.readouterr().out
    assert "3 unlabeled case(s)" in out and "1 file(s) used as unlabeled scans, with a warning:" in out


def test_test_cohort_problems_are_reported(make_cohort, volume_writer, capsys):
    root = make_cohort(1, 1)
    volume_writer(root / "test" / "images" / "t0.nii.gz", np.zeros((20, 20), np.int16))
    (root / "test" / "labels").mkdir()
    assert (
        main(["--labeled", str(root / "labeled"), "--unlabeled", str(root / "unlabeled"), "--test", str(root / "test")])
        == 1
    )
    out = capsys.readouterr().out
    assert "t0.nii.gz: image without label" in out


def test_scans_folder_of_dicom_series_is_checked_series_by_series(tmp_path, capsys):
    """check-data --scans reads DICOM as medeman infer does: a row per series, broken ones named, SEG skipped."""
    from dicom_series import write_series

    volume = np.random.default_rng(0).integers(-500, 500, size=(8, 6, 5)).astype(np.int16)
    write_series(tmp_path / "study" / "ct", volume, np.diag([1.0, 1.0, 2.0, 1.0]))
    write_series(tmp_path / "study" / "broken", volume, np.diag([1.0, 1.0, 2.0, 1.0]), skip_slices=(2,))
    write_series(tmp_path / "study" / "seg", volume, np.eye(4), modality="SEG")
    assert main(["--scans", str(tmp_path / "study")]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("scans"))
    assert row.split()[:4] == ["scans", "ct", "8x6x5", "1.00x1.00x2.00"] and row.split()[-1] == "ok"
    assert f"{tmp_path / 'study' / 'seg'} (series 1, abdomen): a SEG object, not an image series" in out
    assert (
        f"{tmp_path / 'study' / 'broken'} (series 1, abdomen): slices missing: a 4.00 mm gap between 2.00 and 6.00 mm "
        "where slices are 2.00 mm apart (about 1 slice(s))"
    ) in out
