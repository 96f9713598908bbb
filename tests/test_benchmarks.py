"""Every script in benchmarks/ runs end to end in its smoke mode, and uses only the package's public API.

Nothing else runs the benchmarks, so without this a refactor breaks one unseen (issue 15: a merged
volume writer left ``bench_infer.py`` calling ``sample_data._write``). Scripts are discovered, not
listed: a new ``benchmarks/*.py`` or ``*.sh`` is tested as soon as it exists, and one without a
``--smoke`` mode fails here, it is never skipped. The smoke contract (``benchmarks/README.md``):

- ``--smoke`` runs the whole script at tiny sizes, one repeat and one seed, in seconds on a CPU;
- it needs nothing from the working directory (the test runs it from an empty folder) and writes
  only to temporary folders: ``benchmarks/results/`` stays untouched (the test runs a copy of the
  script in a mirror of the repository whose ``benchmarks/results/`` starts empty and must stay so;
  other processes writing the real one meanwhile cannot fool it);
- it exits 0, or non-zero with the reason on stderr.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
# every script; ``_name.py`` files are helpers the scripts import (``benchmarks/_report.py``), not scripts
SCRIPTS = sorted(p for p in [*BENCHMARKS.glob("*.py"), *BENCHMARKS.glob("*.sh")] if not p.name.startswith("_"))
HELPERS = sorted(BENCHMARKS.glob("_*.py"))
SMOKE_TIMEOUT_S = 300  # a smoke run takes seconds; this only stops a hung one on a loaded machine


def mirror_repository(root: Path) -> Path:
    """A repository at ``root`` that links to everything of the real one but ``benchmarks/``, which
    is copied with an empty ``results/``: whatever a script writes there is its own doing."""
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("benchmarks", ".git"):
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (root / "benchmarks" / "results").mkdir(parents=True)
    for script in [*SCRIPTS, *HELPERS]:
        shutil.copy2(script, root / "benchmarks" / script.name)
    return root / "benchmarks"


def has_smoke_flag(script: Path) -> bool:
    return "--smoke" in script.read_text()


def private_uses(source: str) -> list[str]:
    """Where a script reaches past medeman's public API: ``_private`` names, or assigns to a package attribute."""
    tree = ast.parse(source)
    aliases: set[str] = set()  # local names bound to medeman modules
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "medeman":
                    aliases.add(alias.asname or "medeman")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "medeman":
            for alias in node.names:
                if alias.name.startswith("_"):
                    problems.append(f"line {node.lineno}: imports {node.module}.{alias.name}")
                aliases.add(
                    alias.asname or alias.name
                )  # a submodule or a function: either way its attributes are the package's
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                problems.append(f"line {node.lineno}: uses {node.value.id}.{node.attr}")
            if isinstance(node.ctx, ast.Store):
                problems.append(f"line {node.lineno}: assigns {node.value.id}.{node.attr} (patches the package)")
    return problems


PRIVATE_CASES = [
    ("from medeman.sample_data import make_case\nmake_case(1, 2)\n", []),
    ("from medeman import sample_data\nsample_data._write(1)\n", ["uses sample_data._write"]),
    ("from medeman.infer import _segment_case\n", ["imports medeman.infer._segment_case"]),
    ("import medeman.sample_data as sd\nsd.FIELD_OF_VIEW_MM = (1, 2, 3)\n", ["assigns sd.FIELD_OF_VIEW_MM"]),
    ("import numpy as np\nnp._private = 1\n", []),
]


@pytest.mark.parametrize("source, expected", PRIVATE_CASES)
def test_private_use_detector(source, expected):
    found = private_uses(source)
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found)), found


@pytest.mark.parametrize("script", [s for s in [*SCRIPTS, *HELPERS] if s.suffix == ".py"], ids=lambda p: p.name)
def test_benchmark_uses_only_public_package_functions(script):
    assert private_uses(script.read_text()) == [], f"{script.name} reaches past medeman's public API"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_runs_end_to_end_in_smoke_mode(script, tmp_path):
    if not has_smoke_flag(script):
        pytest.fail(
            f"{script.relative_to(REPO)} has no --smoke mode: add one (tiny sizes, one repeat, temporary "
            "outputs, seconds; see benchmarks/README.md) so that the test suite runs it"
        )
    benchmarks = mirror_repository(tmp_path / "repo")
    work = tmp_path / "work"
    work.mkdir()
    copy = benchmarks / script.name
    command = ["bash", str(copy)] if script.suffix == ".sh" else [sys.executable, str(copy)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONWARNINGS": "ignore",
        "OUT": str(work / "out"),
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        [*command, "--smoke"], cwd=work, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S
    )
    assert proc.returncode == 0, (
        f"{script.name} --smoke exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    assert proc.stdout.strip(), f"{script.name} --smoke printed nothing"
    written = sorted(p.name for p in (benchmarks / "results").iterdir())
    assert written == [], f"{script.name} --smoke wrote {written} into benchmarks/results/"


def test_report_mean_std_leaves_out_undefined_scores():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _report import mean_std
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert mean_std([1.0, 2.0, float("nan")]) == "1.500 ± 0.707"  # stdev of (1, 2) = 1/sqrt(2)
    assert mean_std([5.0], digits=0) == "5 ± 0"
    assert mean_std([]) == mean_std([float("nan")]) == "–"


def test_pseudo_label_quality_scores_a_hand_made_prediction():
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from pseudo_label_quality import border, class_scores
    finally:
        sys.path.remove(str(BENCHMARKS))
    # truth: a 4-voxel bar of class 1 on a 1 x 1 x 8 line; prediction: 5 voxels of class 1 (one too many, at its end)
    truth = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0]).reshape(1, 1, 8)
    pred = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0]).reshape(1, 1, 8)
    confidence = torch.tensor([0.99, 0.99, 0.6, 0.95, 0.95, 0.95, 0.95, 0.6]).reshape(1, 1, 8)
    probs = torch.stack(
        [torch.where(pred == 0, confidence, 1 - confidence), torch.where(pred == 1, confidence, 1 - confidence)]
    )
    assert border(truth == 1).flatten().tolist() == [0, 1, 1, 0, 0, 1, 1, 0]  # one voxel either side of each edge
    scores = class_scores(probs, truth, 1, threshold=0.9)
    assert scores["dice"] == 2 * 4 / (5 + 4)
    assert scores["confident_recall"] == 3 / 4  # voxel 2 is right but at 0.6
    assert scores["confident_precision"] == 3 / 4  # confident class-1 voxels 3, 4, 5, 6; voxel 6 is wrong
    assert scores["errors_at_border"] == 1.0  # the one wrong voxel (6) touches the bar's end
    assert scores["confident_errors"] == 1.0  # and the teacher is sure of it (0.95)


def test_lesion_extent_counts_the_voxels_of_found_lesions_only(tmp_path):
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from lesion_looks import EXTENT, LESION, detection_by_look
    finally:
        sys.path.remove(str(BENCHMARKS))
    # two lesions: a 2x2x2 cube (8 voxels) whose prediction covers 4 of them (IoU 0.5: found), and a lone voxel
    # that is missed; extent counts the found one alone: 4 / 8
    big = np.zeros((12, 12, 12), dtype=bool)
    big[1:3, 1:3, 1:3] = True
    small = np.zeros_like(big)
    small[9, 9, 9] = True
    pred = np.zeros(big.shape, dtype=np.uint8)
    pred[1:3, 1:3, 1:2] = LESION
    (tmp_path / "run" / "pred_test").mkdir(parents=True)
    nib.save(nib.Nifti1Image(pred, np.eye(4)), str(tmp_path / "run" / "pred_test" / "a.nii.gz"))
    shares = detection_by_look(tmp_path / "run", {"a.nii.gz": [(big, "hyperdense"), (small, "faint")]}, 0.1)
    assert shares == {"hyperdense": 1.0, "faint": 0.0, EXTENT: 0.5}


def _benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (imported with ``benchmarks/`` on the path, as the script runs)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _cohort_files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*.nii.gz") if not p.is_symlink()}


SMALL_COHORT = {"n_labeled": 1, "n_val": 1, "n_unlabeled": 1, "n_test": 1}


@pytest.mark.parametrize(
    "grow, added",
    [
        ({"n_val": 2}, [Path("val/images/case_005.nii.gz"), Path("val/labels/case_005.nii.gz")]),
        # case 1 labeled, 2 test, 3 unlabeled, 4 validation: the extra test cases are 5 and 6
        (
            {"n_test_extra": 2},
            [Path(f"test/{sub}/case_{i:03d}.nii.gz") for sub in ("images", "labels") for i in (5, 6)],
        ),
    ],
    ids=["validation", "extra test cases"],
)
def test_lesion_cohort_grows_a_part_without_touching_any_other_case(tmp_path, grow, added):
    """A cohort written with fewer validation (or extra test) cases gets the missing ones, the cases a fresh cohort of
    that size has; every existing file stays as it was."""
    make_lesion_cohort = _benchmark("lesion_benchmark").make_lesion_cohort
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    make_lesion_cohort(grown, SMALL_COHORT)
    before = _cohort_files(grown)
    make_lesion_cohort(grown, {**SMALL_COHORT, **grow})
    make_lesion_cohort(fresh, {**SMALL_COHORT, **grow})
    after = _cohort_files(grown)
    assert {k: after[k] for k in before} == before  # nothing rewritten
    assert sorted(set(after) - set(before)) == added
    assert after == _cohort_files(fresh)  # the added cases are the ones a fresh cohort of that size has


def test_lesion_cohort_refuses_to_grow_validation_past_extra_test_cases_or_to_score_fewer_test_cases(tmp_path):
    make_lesion_cohort = _benchmark("lesion_benchmark").make_lesion_cohort
    make_lesion_cohort(tmp_path, {**SMALL_COHORT, "n_test_extra": 2})
    with pytest.raises(SystemExit, match="validation set cannot grow to 2 cases once it has extra test cases"):
        make_lesion_cohort(tmp_path, {**SMALL_COHORT, "n_val": 2, "n_test_extra": 2})
    with pytest.raises(SystemExit, match="holds 3 test cases, 1 asked for"):
        make_lesion_cohort(tmp_path, SMALL_COHORT)  # a smaller test set than the folder's: scores would mix the two


def test_reused_runs_are_scored_again_only_on_the_parts_whose_cases_changed(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import lesion_benchmark
    finally:
        sys.path.remove(str(BENCHMARKS))
    data, run = tmp_path / "data", tmp_path / "run"
    for part, cases in (("test", ["case_002", "case_005"]), ("val", ["case_004"])):
        (data / part / "labels").mkdir(parents=True)
        for case in cases:
            (data / part / "labels" / f"{case}.nii.gz").write_bytes(b"")
    run.mkdir()
    (run / "test_scores.csv").write_text(
        "case,class,dice\ncase_002,1,0.5\ncase_002,3,0.1\n"
    )  # before the test set grew
    (run / "val_scores.csv").write_text("case,class,dice\ncase_004,1,0.5\n")
    calls = []

    def fake_score(run_dir, data_dir, overlap, part="test"):
        calls.append(part)
        return {"lesion_dice": 0.25}

    monkeypatch.setattr(lesion_benchmark, "score_teacher", fake_score)
    args = argparse.Namespace(data=data, lesion_overlap=0.1)
    record = {"scores": {"lesion_dice": 0.1}, "val_scores": {"lesion_dice": 0.3}}
    assert lesion_benchmark._score_new_cases(record, run, args)
    assert calls == ["test"] and record["scores"] == {"lesion_dice": 0.25} and record["test_cases"] == 2
    assert record["val_scores"] == {"lesion_dice": 0.3}
    (run / "test_scores.csv").write_text("case,class,dice\ncase_002,1,0.5\ncase_005,1,0.4\n")
    assert not lesion_benchmark._score_new_cases(record, run, args) and calls == ["test"]


def test_grid_points_get_one_folder_each_even_when_values_hold_dots():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _report import grid_tag, parse_grid
    finally:
        sys.path.remove(str(BENCHMARKS))
    combos = parse_grid(["ssl.fixmatch_threshold=0.9,0.7", "ssl.consistency_weight=0.3,1.3"])
    assert combos[1] == ["ssl.fixmatch_threshold=0.9", "ssl.consistency_weight=1.3"]
    tags = [grid_tag(c) for c in combos]
    assert tags[1] == "fixmatch_threshold-0.9_consistency_weight-1.3"
    assert len(set(tags)) == 4  # 0.3 and 1.3 once both became "3"


def test_lesion_grid_report_pairs_each_point_with_the_methods_own_runs_and_chooses_on_validation(tmp_path):
    import argparse

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from lesion_benchmark import write_grid_results
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path / "runs"

    def record(sets: str, seed: int, lesion_val: float, lesion_test: float) -> dict:
        # the method's own config (sets "") runs in <out>/<method>, the table's folder
        folder = out / "grid" / "fixmatch_da" / sets.replace("=", "-") if sets else out / "fixmatch_da"
        val = {"dice_liver": 0.9, "dice_kidneys": 0.6, "lesion_dice": lesion_val}
        return {
            "method": "fixmatch_da",
            "sets": sets,
            "seed": seed,
            "train_s": 100.0,
            "run_dir": str(folder / f"seed{seed}"),
            "val_scores": val,
            "scores": {"lesion_dice": lesion_test},
        }

    # own config: val lesion 0.3 and 0.1; the 0.7 point: 0.6 and 0.0 (ahead at seed 0 only), its test scores lower
    records = [
        record("", 0, 0.3, 0.5),
        record("ssl.fixmatch_threshold=0.7", 0, 0.6, 0.1),
        record("", 1, 0.1, 0.5),
        record("ssl.fixmatch_threshold=0.7", 1, 0.0, 0.1),
    ]
    data = tmp_path / "data"
    args = argparse.Namespace(results=str(tmp_path / "results"), tag="t", data=data, out=str(out), config="c", set=[])

    def rows() -> tuple[list[str], list[str]]:
        text = write_grid_results(records, args, "cmd").read_text()
        cells = {
            line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines()
            if line.startswith("| fixmatch_da")
        }
        return cells["`as configured`"], cells["`ssl.fixmatch_threshold=0.7`"]

    own, low = rows()
    assert own[5:7] == ["own", "own"]
    # val Dice = mean(0.9, 0.6, lesion): the 0.7 point is +0.3/3 at seed 0, -0.1/3 at seed 1: +0.033 on the mean, 1/2 ahead
    assert low[5] == "+0.033 (1/2)"
    assert low[6] == "+0.100 (1/2)"
    assert own[9] == "**yes**" and low[9] == ""  # ahead on the mean, but in 1 of 2 seeds: the own config stays
    assert (tmp_path / "results" / "lesion_benchmark_grid_t.csv").read_text().count("\n") == 5
    records[3]["val_scores"]["lesion_dice"] = 0.2  # now ahead in both seeds (+0.1/3 at seed 1)
    own, low = rows()
    assert low[5] == "+0.067 (2/2)"
    assert low[9] == "**yes**" and own[9] == ""  # chosen on validation although its test lesion Dice is 0.1 vs 0.5


@pytest.mark.parametrize(
    "method, reused",
    [("supervised", True), ("fixmatch", False)],  # a FixMatch option and the unlabeled batch change a FixMatch run only
)
def test_lesion_benchmark_reuses_a_run_whatever_the_options_of_methods_it_does_not_train_with(method, reused):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from lesion_benchmark import what_trains
    finally:
        sys.path.remove(str(BENCHMARKS))
    from medeman.config import load_config

    before = load_config(sets=[f"ssl.method={method}"])
    after = load_config(sets=[f"ssl.method={method}", "ssl.fixmatch_threshold=0.7"])
    assert (what_trains(before) == what_trains(after)) is reused
    more_unlabeled = load_config(sets=[f"ssl.method={method}", "data.batch_size_unlabeled=4"])
    assert (what_trains(before) == what_trains(more_unlabeled)) is reused  # read by a method that uses unlabeled scans
    heavier = load_config(sets=[f"ssl.method={method}", "ssl.consistency_weight=0.3"])
    assert (what_trains(before) == what_trains(heavier)) is reused  # weighs the unlabeled scans' loss only
    changed = load_config(sets=[f"ssl.method={method}", "train.lr=0.5"])
    assert what_trains(before) != what_trains(changed)  # a key every method reads always counts


def test_lesion_gap_closed_against_the_copy_paste_baselines():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from lesion_benchmark import PASTE_BASELINES, gap_closed
    finally:
        sys.path.remove(str(BENCHMARKS))

    def run(method: str, seed: int, dice: float) -> dict:
        return {"method": method, "seed": seed, "scores": {"lesion_dice": dice}}

    # seed 0: baseline 0.30, method 0.33, upper bound 0.40 (30 % of the gap); seed 1: 0.20, 0.26, 0.40 (30 %)
    records = [
        run("supervised_few", 0, 0.10),
        run("supervised_all", 0, 0.50),
        *[
            run(m, 0, d)
            for m, d in zip(("supervised_paste", "fixmatch_da_paste_both", "supervised_all_paste"), (0.30, 0.33, 0.40))
        ],
        *[
            run(m, 1, d)
            for m, d in zip(("supervised_paste", "fixmatch_da_paste_both", "supervised_all_paste"), (0.20, 0.26, 0.40))
        ],
    ]
    share, per_seed = gap_closed(records, "lesion_dice", "fixmatch_da_paste_both", PASTE_BASELINES)
    assert share == "30 %"  # mean gain 0.045 over mean gap 0.15
    assert per_seed == pytest.approx([0.3, 0.3])
    # against the runs without paste (seed 0 only): (0.33 - 0.10) / (0.50 - 0.10), the paste's own gain counted in
    assert gap_closed(records, "lesion_dice", "fixmatch_da_paste_both") == ("58 %", pytest.approx([0.575]))


def _paired_noise():
    return _benchmark("paired_noise")


@pytest.mark.parametrize(
    "table, interaction, seed_means_var, seed_var",
    [
        ([[1.0, 3.0], [3.0, 5.0]], 0.0, 2.0, 2.0),  # additive: seed means 2 and 4, no residual
        ([[1.0, 0.0], [0.0, 1.0]], 1.0, 0.0, 0.0),  # residuals +-0.5: 4 x 0.25 / (1 x 1); seeds 0 - 1/2, floored
        # row means 0.1, 0; column means 0.1, 0, 0.05; grand 0.05; residuals (0.05, -0.05, 0), (-0.05, 0.05, 0):
        # 4 x 0.0025 / (1 x 2) = 0.005; seed means' variance (0.1 - 0)^2 / 2 = 0.005; seeds 0.005 - 0.005 / 3
        ([[0.2, 0.0, 0.1], [0.0, 0.0, 0.0]], 0.005, 0.005, 0.005 - 0.005 / 3),
    ],
)
def test_paired_noise_splits_the_seed_spread_into_seed_and_interaction_variance(
    table, interaction, seed_means_var, seed_var
):
    parts = _paired_noise().decompose(np.asarray(table))
    assert parts["interaction_var"] == pytest.approx(interaction)
    assert parts["seed_means_var"] == pytest.approx(seed_means_var)
    assert parts["seed_var"] == pytest.approx(seed_var, abs=1e-12)


def test_paired_noise_reads_per_case_dice_and_refuses_runs_scored_on_other_cases(tmp_path, capsys):
    noise = _paired_noise()
    rows = {("a", 0): (0.5, 0.2), ("b", 0): (0.3, 0.2), ("a", 1): (0.4, 0.6), ("b", 1): (0.4, 0.3)}
    for (method, seed), (x, y) in rows.items():
        run = tmp_path / method / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "test_scores.csv").write_text(f"case,class,dice\nc1,1,0.9\nc1,3,{x}\nc2,3,{y}\nc2,1,0.8\n")
    d = noise.differences(tmp_path, "a", "b", [0, 1], 3)
    assert d == pytest.approx(np.array([[0.2, 0.0], [0.0, 0.3]]))
    assert noise.main(["--out", str(tmp_path), "--method", "a", "--base", "b", "--seeds", "0", "1"]) == 0
    assert "per-seed differences: +0.100 +0.150 (ahead 2)" in capsys.readouterr().out
    (tmp_path / "b" / "seed1" / "test_scores.csv").write_text("case,class,dice\nc1,3,0.4\nc3,3,0.3\n")
    with pytest.raises(SystemExit, match="seed 1: a and b were scored on different test cases"):
        noise.differences(tmp_path, "a", "b", [0, 1], 3)
    (tmp_path / "b" / "seed1" / "test_scores.csv").write_text("case,class,dice\nc1,3,\nc2,3,0.3\n")
    with pytest.raises(SystemExit, match="class 3 has no Dice in c1"):
        noise.differences(tmp_path, "a", "b", [0, 1], 3)
    with pytest.raises(SystemExit, match="seed2/test_scores.csv: no such file"):
        noise.differences(tmp_path, "a", "b", [2], 3)
