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


@pytest.mark.parametrize("sets, code, text", [
    (["data.num_classes=3"], 0, "data.num_classes=3"),
    (["data.num_classes=2"], 1, "label values 2 outside 0..1"),
    (["data.in_channels=2"], 1, "no _0000.._0001 channel suffix"),
])
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
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "check_data.py"), "--labeled", str(root / "labeled")],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    (root / "labeled" / "labels" / "case0.nii.gz").unlink()
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "check_data.py"), "--labeled", str(root / "labeled")],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 1 and "no labeled case found" in run.stdout
