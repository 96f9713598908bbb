"""Bad input, as a user meets it on the command line (issue 23's probes): each probe asserts the exit code,
the one-line message, and that no input file and no earlier output changed (hashes before and after)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medeman.checkpoint import save_teacher
from medeman.cli import main
from medeman.config import default_config
from medeman.nets import build_network

SUFFIXES = ".nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd"


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tiny_model_config() -> dict:
    cfg = default_config()
    cfg["model"].update(channels=[4, 8], num_res_units=0)
    cfg["data"].update(patch_size=[16, 16, 16], spacing=None, intensity_window=[0.0, 100.0], num_classes=2)
    return cfg


@pytest.fixture()
def world(tmp_path, volume_writer, phantom_maker, make_cohort):
    """Everything a probe needs in ``tmp_path``: a run folder with a tiny teacher, scans (one with NaN voxels),
    a training cohort, an earlier mask, and a file in the way of an output folder."""
    torch.manual_seed(0)
    cfg = tiny_model_config()
    (tmp_path / "run").mkdir()
    save_teacher(tmp_path / "run" / "teacher.pt", build_network(cfg), cfg, step=1)
    for i in range(2):
        volume_writer(tmp_path / "scans" / f"good{i}.nii.gz", phantom_maker(seed=i)[0])
    nan_scan = phantom_maker(seed=7)[0].astype(np.float32)
    nan_scan[5:10, 5:10, 5:10] = np.nan  # 125 voxels, as in the issue
    volume_writer(tmp_path / "nan_scans" / "bad.nii.gz", nan_scan)
    volume_writer(tmp_path / "nan_scans" / "fine.nii.gz", phantom_maker(seed=8)[0])
    (tmp_path / "empty").mkdir()
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "earlier.nii.gz").write_bytes(b"an earlier mask")
    (tmp_path / "a_file").write_text("not a folder")
    cohort = make_cohort(3, 2, root=tmp_path / "cohort")
    nan_cohort = make_cohort(3, 2, root=tmp_path / "nan_cohort")
    image = phantom_maker(seed=1)[0].astype(np.float32)
    image[0, 0, :3] = np.nan
    volume_writer(nan_cohort / "labeled" / "images" / "case1.nii.gz", image)
    stopped = tmp_path / "stopped_run"  # killed before its first checkpoint
    stopped.mkdir()
    (stopped / "config.yaml").write_text("data:\n  num_classes: 3\n")
    (stopped / "metrics.csv").write_text("step,train/loss\n0,1.5\n")
    assert cohort.is_dir()
    return tmp_path


TRAIN = [
    "train",
    "--labeled",
    "{t}/cohort/labeled",
    "--unlabeled",
    "{t}/cohort/unlabeled",
    "--out",
    "{t}/new_run",
    "--set",
    "data.patch_size=[16,16,16]",
    "--set",
    "data.spacing=null",
    "--set",
    "data.num_classes=3",
    "--set",
    "data.num_workers=0",
    "--set",
    "model.channels=[4,8]",
    "--set",
    "train.max_steps=2",
    "--no-progress",
]
TUNE = [
    "tune",
    "--labeled",
    "{t}/cohort/labeled",
    "--unlabeled",
    "{t}/cohort/unlabeled",
    "--study",
    "s",
    "--n-trials",
    "1",
    "--out",
    "{t}/tune",
    "--no-plots",
    *TRAIN[7:-1],
]


def replace(argv: list[str], old: str, new: str) -> list[str]:
    return [new if a == old else a for a in argv]


# name, argv ({t} is the probe's folder), exit code, the message line (exact), paths that must not exist afterwards
PROBES = [
    (
        "negative learning rate",
        TRAIN + ["--set", "train.lr=-1"],
        2,
        "error: train.lr: -1.0 must be a positive learning rate",
        ["new_run"],
    ),
    (
        "negative weight decay",
        TRAIN + ["--set", "train.weight_decay=-1"],
        2,
        "error: train.weight_decay: -1.0 must be a non-negative number",
        ["new_run"],
    ),
    (
        "no labeled patch per step",
        TRAIN + ["--set", "data.batch_size_labeled=0"],
        2,
        "error: data.batch_size_labeled: 0 must be at least 1 patch per step",
        ["new_run"],
    ),
    (
        "overlap of 1 (crashed at the first validation)",
        TRAIN + ["--set", "infer.overlap=1.0"],
        2,
        "error: infer.overlap: 1.0 must be a fraction in [0, 1) (1 would never move the window)",
        ["new_run"],
    ),
    (
        "zero threads",
        TRAIN + ["--threads", "0"],
        2,
        "error: train.num_threads: 0 must be null or a positive number of threads",
        ["new_run"],
    ),
    (
        "fresh run into a run stopped before its first checkpoint",
        replace(TRAIN, "{t}/new_run", "{t}/stopped_run"),
        2,
        "error: {t}/stopped_run already holds a run that stopped before its first checkpoint (config.yaml, metrics.csv); "
        "pass --overwrite to replace it, or choose another --out",
        [],
    ),
    (
        "train on a scan with NaN voxels",
        replace(
            replace(TRAIN, "{t}/cohort/labeled", "{t}/nan_cohort/labeled"),
            "{t}/cohort/unlabeled",
            "{t}/nan_cohort/unlabeled",
        ),
        2,
        "{t}/nan_cohort/labeled/images/case1.nii.gz: 3 NaN/Inf intensities",
        ["new_run"],
    ),
    (
        "tune storage of an unknown scheme",
        TUNE + ["--storage", "notaurl://x"],
        2,
        "error: --storage notaurl://x: unknown database scheme 'notaurl'; medeman supports sqlite:///path/study.db, "
        "postgresql://user@host/db, or a journal file path (no ://)",
        ["tune"],
    ),
    (
        "tune on a scan with NaN voxels",
        replace(
            replace(TUNE, "{t}/cohort/labeled", "{t}/nan_cohort/labeled"),
            "{t}/cohort/unlabeled",
            "{t}/nan_cohort/unlabeled",
        ),
        2,
        "{t}/nan_cohort/labeled/images/case1.nii.gz: 3 NaN/Inf intensities",
        ["tune/trial_0001"],
    ),
    (
        "infer --output at an existing file",
        ["infer", "--model", "{t}/run", "--input", "{t}/scans", "--output", "{t}/a_file"],
        2,
        "error: {t}/a_file: is a file, not a folder; choose another output folder",
        [],
    ),
    (
        "infer --output below a file",
        ["infer", "--model", "{t}/run", "--input", "{t}/scans", "--output", "{t}/a_file/masks"],
        2,
        "error: {t}/a_file/masks: {t}/a_file is a file, not a folder; choose another output folder",
        [],
    ),
    (
        "infer finds no scan",
        ["infer", "--model", "{t}/run", "--input", "{t}/empty", "--output", "{t}/masks"],
        1,
        f"error: {{t}}/empty: no scans found ({SUFFIXES})",
        ["masks"],
    ),
    (
        "infer on a scan with NaN voxels",
        [
            "infer",
            "--model",
            "{t}/run",
            "--input",
            "{t}/nan_scans",
            "--output",
            "{t}/pred",
            "--no-progress",
            "--device",
            "cpu",
        ],
        1,
        "  failed: {t}/nan_scans/bad.nii.gz: 125 NaN/Inf intensities; refused (replace them, e.g. with the scan's minimum, "
        "and run again)",
        ["pred/bad.nii.gz"],
    ),
    (
        "rank on a scan with NaN voxels",
        [
            "rank",
            "--model",
            "{t}/run",
            "--unlabeled",
            "{t}/nan_scans",
            "--out",
            "{t}/rank",
            "--no-progress",
            "--device",
            "cpu",
        ],
        1,
        "  failed: {t}/nan_scans/bad.nii.gz: 125 NaN/Inf intensities; refused (replace them, e.g. with the scan's minimum, "
        "and run again)",
        [],
    ),
    (
        "rank --out at an existing file",
        ["rank", "--model", "{t}/run", "--unlabeled", "{t}/scans", "--out", "{t}/a_file"],
        2,
        "error: {t}/a_file: is a file, not a folder; choose another --out",
        [],
    ),
]


@pytest.mark.parametrize("name, argv, code, message, absent", PROBES, ids=[p[0] for p in PROBES])
def test_probe(world, capsys, name, argv, code, message, absent):
    before = snapshot(world)
    assert main([a.replace("{t}", str(world)) for a in argv]) == code
    out, err = capsys.readouterr()
    assert message.replace("{t}", str(world)) in (out + err).splitlines(), err
    assert "Traceback" not in err
    after = snapshot(world)
    assert {path: after.get(path) for path in before} == before  # no input and no earlier output changed
    for path in absent:
        assert not (world / path).exists(), path


def test_infer_accepts_no_progress_and_writes_only_the_new_masks(world, capsys):
    before = snapshot(world)
    argv = [
        "infer",
        "--model",
        f"{world}/run",
        "--input",
        f"{world}/scans",
        "--output",
        f"{world}/pred",
        "--no-progress",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "threads: 1 torch thread per process (set explicitly; change with --threads)"
    after = snapshot(world)
    assert set(after) - set(before) == {"pred/good0.nii.gz", "pred/good1.nii.gz"}
    assert {path: after[path] for path in before} == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_infer_into_a_read_only_folder_is_one_line(world, capsys):
    locked = world / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(["infer", "--model", f"{world}/run", "--input", f"{world}/scans", "--output", f"{locked}/masks"])
    finally:
        locked.chmod(0o700)
    assert code == 2
    assert (
        f"error: {locked}/masks: cannot create the output folder (Permission denied)"
        in capsys.readouterr().err.splitlines()
    )
