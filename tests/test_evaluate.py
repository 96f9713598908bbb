"""Evaluation: Dice, HD95 and ASD in mm on hand-made masks whose scores are known (medeman.metrics), case matching,
class names (medeman.classes) and segment-then-score (medeman.score_run)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medeman.classes import load_class_names
from medeman.evaluate import evaluate_folder, label_case_id, main
from medeman.metrics import lesion_counts, mask_scores

SHAPE = (12, 10, 14)


def cube(lo, hi, shape=SHAPE):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def plane(axis, index, shape=SHAPE):
    """A one-voxel-thick full plane: every voxel is on its surface, so surface distances are exact."""
    mask = np.zeros(shape, dtype=bool)
    mask[(slice(None),) * axis + (index,)] = True
    return mask


NAN = math.nan
SCORE_CASES = [
    # (name, prediction, reference, spacing, expected (dice, hd95 mm, asd mm))
    ("identical", cube((2, 2, 2), (8, 8, 8)), cube((2, 2, 2), (8, 8, 8)), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0)),
    ("planes 3 apart in z, 2 mm slices", plane(2, 4), plane(2, 7), (0.7, 0.9, 2.0), (0.0, 6.0, 6.0)),
    ("planes 3 apart in x, 0.5 mm voxels", plane(0, 2), plane(0, 5), (0.5, 1.0, 3.0), (0.0, 1.5, 1.5)),
    ("planes 1 apart in y", plane(1, 6), plane(1, 5), (1.0, 1.25, 1.0), (0.0, 1.25, 1.25)),
    (
        "box shifted by 2 of 10 in z",
        cube((1, 0, 2), (11, 10, 12)),
        cube((1, 0, 4), (11, 10, 14)),
        (1.0, 1.0, 1.0),
        (0.8, None, None),
    ),
    (
        "half the reference",
        cube((0, 0, 0), (6, 10, 14)),
        cube((0, 0, 0), (12, 10, 14)),
        (1.0, 1.0, 1.0),
        (2 * 0.5 / 1.5, None, None),
    ),
    ("both empty", np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), (1.0, 1.0, 1.0), (1.0, NAN, NAN)),
    ("prediction empty", np.zeros(SHAPE, bool), cube((2, 2, 2), (5, 5, 5)), (1.0, 1.0, 1.0), (0.0, NAN, NAN)),
    ("reference empty", cube((2, 2, 2), (5, 5, 5)), np.zeros(SHAPE, bool), (1.0, 1.0, 1.0), (0.0, NAN, NAN)),
]


@pytest.mark.parametrize("name, pred, ref, spacing, expected", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_mask_scores_on_hand_made_masks(name, pred, ref, spacing, expected):
    got = mask_scores(pred, ref, spacing)
    for value, want in zip(got, expected):
        if want is None:
            continue
        if math.isnan(want):
            assert math.isnan(value), (name, got)
        else:
            assert value == pytest.approx(want, abs=1e-5), (name, got)


def test_mask_scores_refuses_different_shapes():
    with pytest.raises(ValueError, match="shape"):
        mask_scores(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), (1, 1, 1))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("case1.nii.gz", "case1"),
        ("case1_seg.nii.gz", "case1"),
        ("case1_label.nrrd", "case1"),
        ("case1_mask.mha", "case1"),
        ("case_seg_2.nii", "case_seg_2"),
        ("segment.nii.gz", "segment"),
    ],
)
def test_label_case_id(name, expected):
    assert label_case_id(name) == expected


AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])  # distances along z count 2 mm per voxel


def save(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.uint8), affine), str(path))
    return path


@pytest.fixture()
def cohort(tmp_path):
    """Three scored cases with known scores, plus a missing, an extra and a mismatched case."""
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    two = plane(2, 4).astype(np.uint8) + 2 * plane(2, 10)  # class 1 and class 2
    save(pred / "a.nii.gz", two)
    save(lab / "a_seg.nii.gz", two)  # perfect
    save(pred / "b.nii.gz", plane(2, 4))
    save(lab / "b_label.nii.gz", plane(2, 7))  # class 1: 3 slices = 6 mm off; no class 2
    save(pred / "b_probs.nii.gz", np.zeros(SHAPE + (2,)))  # probability maps are not predictions
    save(pred / "c.nii.gz", np.zeros(SHAPE))
    save(lab / "c_mask.nii.gz", plane(2, 4))  # class 1 missed entirely
    save(lab / "missing.nii.gz", plane(2, 4))  # no prediction
    save(pred / "extra.nii.gz", plane(2, 4))  # no label
    save(pred / "bad.nii.gz", np.zeros((12, 10, 13)))
    save(lab / "bad.nii.gz", np.zeros(SHAPE))  # shapes differ
    return pred, lab


def test_evaluate_folder_scores_and_names_every_problem(cohort, tmp_path):
    pred, lab = cohort
    summary = evaluate_folder(pred, lab, csv=tmp_path / "scores.csv")
    assert summary.cases == ["a", "b", "c"]
    by = {(s.case_id, s.label): s for s in summary.scores}
    assert set(by) == {(c, k) for c in "abc" for k in (1, 2)}
    assert (by["a", 1].dice, by["a", 1].hd95, by["a", 1].asd) == (1.0, 0.0, 0.0)
    assert by["b", 1].dice == 0.0 and by["b", 1].hd95 == pytest.approx(6.0) and by["b", 1].asd == pytest.approx(6.0)
    assert math.isnan(by["b", 2].dice) and by["b", 2].note == "absent from prediction and reference"  # not a Dice of 1
    assert by["c", 1].dice == 0.0 and math.isnan(by["c", 1].asd)
    stats = summary.per_class()
    assert stats[1]["n"] == 3 and stats[1]["dice_mean"] == pytest.approx(1 / 3)
    assert stats[1]["dice_std"] == pytest.approx(np.std([1.0, 0.0, 0.0]))
    assert stats[1]["hd95_n"] == 2 and stats[1]["hd95_mean"] == pytest.approx(3.0)
    problems = "\n".join(summary.problems)
    assert "missing: no prediction" in problems and "bad:" in problems and "(12, 10, 13)" in problems
    assert any(n.startswith("extra: no reference label") for n in summary.notes)

    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    scored = [r for r in rows if r["class"]]
    assert len(scored) == 6 and {r["case"] for r in scored} == {"a", "b", "c"}
    row = next(r for r in scored if r["case"] == "b" and r["class"] == "1")
    assert float(row["hd95_mm"]) == pytest.approx(6.0) and row["reference_voxels"] == str(12 * 10)
    assert {r["case"] for r in rows if not r["class"]} == {"missing", "bad", "extra"}


def test_main_prints_a_summary_and_fails_on_problems(cohort, capsys):
    pred, lab = cohort
    assert main(["--pred", str(pred), "--labels", str(lab)]) == 1
    out, err = capsys.readouterr()
    assert "±" in out and "HD95" in out and "(n=2)" in out
    assert "missing" in err and "bad" in err and "Traceback" not in err


def test_main_succeeds_on_a_clean_cohort(tmp_path, capsys):
    save(tmp_path / "p" / "x.nii.gz", cube((2, 2, 2), (6, 6, 6)))
    save(tmp_path / "l" / "x.nii.gz", cube((2, 2, 2), (6, 6, 6)))
    assert main(["--pred", str(tmp_path / "p"), "--labels", str(tmp_path / "l"), "--csv", str(tmp_path / "s.csv")]) == 0
    assert "1.000 ± 0.000" in capsys.readouterr().out


def test_unreadable_label_is_named(tmp_path, capsys):
    save(tmp_path / "p" / "x.nii.gz", cube((2, 2, 2), (6, 6, 6)))
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "x.nii.gz").write_bytes(b"garbage")
    assert main(["--pred", str(tmp_path / "p"), "--labels", str(tmp_path / "l")]) == 1
    err = capsys.readouterr().err
    assert "x.nii.gz: cannot read" in err and "Traceback" not in err


def test_evaluation_imports_no_inference():
    """Evaluation scores any folder of masks: it sits below inference (segment_and_score is in medeman.score_run)."""
    code = "import sys, medeman.evaluate; print(sorted(m for m in sys.modules if m in ('medeman.infer', 'medeman.predict')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_names_moved_out_of_evaluate_are_still_importable_from_it():
    import medeman.classes
    import medeman.evaluate
    import medeman.metrics

    for name in ("mask_scores", "lesion_counts", "case_scores", "LesionCounts", "ClassScore", "DEFAULT_LESION_OVERLAP"):
        assert getattr(medeman.evaluate, name) is getattr(medeman.metrics, name)
    for name in ("load_class_names", "load_lesion_classes"):
        assert getattr(medeman.evaluate, name) is getattr(medeman.classes, name)


def test_segment_and_score_runs_inference_then_evaluation(tmp_path):
    import torch

    from medeman.checkpoint import save_teacher
    from medeman.config import default_config
    from medeman.score_run import segment_and_score
    from medeman.nets import build_network

    cfg = default_config()
    cfg["model"]["channels"], cfg["model"]["num_res_units"] = [4, 8], 0
    cfg["data"]["patch_size"] = [16, 16, 16]
    torch.manual_seed(0)
    save_teacher(tmp_path / "teacher.pt", build_network(cfg), cfg, step=0)
    save(tmp_path / "images" / "x_0000.nii.gz", cube((2, 2, 2), (6, 6, 6)) * 200)
    save(tmp_path / "labels" / "x.nii.gz", cube((2, 2, 2), (6, 6, 6)))
    results, summary = segment_and_score(
        tmp_path / "teacher.pt",
        tmp_path / "images",
        tmp_path / "labels",
        tmp_path / "pred",
        png_dir=tmp_path / "png",
        device="cpu",
        progress=False,
    )
    assert [r.status for r in results] == ["written"]
    assert summary.cases == ["x"] and (tmp_path / "png" / "x.png").is_file()


@pytest.mark.parametrize("lesion_classes,table_has_lesions", [(None, False), ([1], True)])
def test_segment_and_score_names_classes_from_the_model(tmp_path, lesion_classes, table_has_lesions):
    """The demo's path: names and lesion classes come from the teacher's own config."""
    import torch

    from medeman.checkpoint import save_teacher
    from medeman.config import default_config
    from medeman.score_run import segment_and_score
    from medeman.nets import build_network

    cfg = default_config()
    cfg["model"]["channels"], cfg["model"]["num_res_units"] = [4, 8], 0
    cfg["data"]["patch_size"] = [16, 16, 16]
    cfg["data"]["labels"], cfg["data"]["lesion_classes"] = {1: "liver"}, lesion_classes
    torch.manual_seed(0)
    save_teacher(tmp_path / "teacher.pt", build_network(cfg), cfg, step=0)
    save(tmp_path / "images" / "x_0000.nii.gz", cube((2, 2, 2), (6, 6, 6)) * 200)
    save(tmp_path / "labels" / "x.nii.gz", cube((2, 2, 2), (6, 6, 6)))
    _, summary = segment_and_score(
        tmp_path / "teacher.pt",
        tmp_path / "images",
        tmp_path / "labels",
        tmp_path / "pred",
        csv=tmp_path / "s.csv",
        device="cpu",
        progress=False,
    )
    table = summary.table()
    assert "1 liver" in table and ("Lesion-wise" in table) == table_has_lesions
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert {r["name"] for r in rows if r["class"] == "1"} == {"liver"}


# ---- lesion-wise detection (connected components) -------------------------------------------

L = (16, 16, 16)
A, B, C = cube((2, 2, 2), (4, 4, 4), L), cube((2, 2, 5), (4, 4, 7), L), cube((10, 10, 10), (12, 12, 12), L)
A_NEXT = cube((2, 2, 4), (4, 4, 6), L)  # shares a face with A
CORNER = cube((4, 4, 4), (6, 6, 6), L)  # touches A only at a corner
BIG = cube((2, 2, 2), (6, 6, 6), L)  # 64 voxels
SPECK = cube((3, 3, 3), (4, 4, 4), L)  # one voxel inside BIG
EMPTY = np.zeros(L, bool)
LESION_CASES = [
    # (name, prediction, reference, overlap, connectivity,
    #  expected (reference, detected, predicted, true positive, lesion Dice))
    ("one hit", A, A, 0.1, 3, (1, 1, 1, 1, 1.0)),
    ("one miss", EMPTY, A, 0.1, 3, (1, 0, 0, 0, 0.0)),
    ("one false positive", A, EMPTY, 0.1, 3, (0, 0, 1, 0, 0.0)),
    ("neither", EMPTY, EMPTY, 0.1, 3, (0, 0, 0, 0, 1.0)),
    ("hit, miss and false positive", A | C, A | B, 0.1, 3, (2, 1, 2, 1, 1 / 3)),
    # two touching lesions are one component; half of it found: IoU 8/16, Dice 2*8/(16+8)
    ("two touching lesions are one", A, A | A_NEXT, 0.1, 3, (1, 1, 1, 1, 2 / 3)),
    ("corner contact joins at 26 neighbours", A, A | CORNER, 0.1, 3, (1, 1, 1, 1, 2 / 3)),
    ("corner contact splits at 6 neighbours", A, A | CORNER, 0.1, 1, (2, 1, 1, 1, 0.5)),
    # one component over two lesions (8 + 8 voxels, 20 predicted): each lesion IoU 8/20, Dice 16/28; one TP
    ("one prediction over two lesions", cube((2, 2, 2), (4, 4, 7), L), A | B, 0.1, 3, (2, 2, 1, 1, 16 / 28)),
    # one voxel of a 64-voxel lesion: IoU 1/64 is below 0.1 (a miss and a false positive) but any overlap counts at 0
    ("overlap below the IoU rule", SPECK, BIG, 0.1, 3, (1, 0, 1, 0, 2 / 65)),
    ("any overlap", SPECK, BIG, 0.0, 3, (1, 1, 1, 1, 2 / 65)),
]


@pytest.mark.parametrize(
    "name, pred, ref, overlap, connectivity, expected", LESION_CASES, ids=[c[0] for c in LESION_CASES]
)
def test_lesion_counts_on_hand_made_components(name, pred, ref, overlap, connectivity, expected):
    got = lesion_counts(pred, ref, overlap=overlap, connectivity=connectivity)
    assert (got.reference, got.detected, got.predicted, got.true_positive) == expected[:4], name
    assert got.dice == pytest.approx(expected[4]), name
    assert got.missed == expected[0] - expected[1] and got.false_positive == expected[2] - expected[3]


@pytest.mark.parametrize(
    "pred, ref, sensitivity, precision, f1",
    [
        (A | C, A | B, 0.5, 0.5, 0.5),
        (A, A | B, 0.5, 1.0, 2 * 0.5 / 1.5),
        (EMPTY, A, 0.0, NAN, NAN),  # no predicted lesion: precision and F1 undefined
        (C, A, 0.0, 0.0, 0.0),
    ],
)
def test_lesion_rates(pred, ref, sensitivity, precision, f1):
    got = lesion_counts(pred, ref)
    for value, want in ((got.sensitivity, sensitivity), (got.precision, precision), (got.f1, f1)):
        assert (math.isnan(value) and math.isnan(want)) or value == pytest.approx(want)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prediction": np.zeros((3, 3, 3)), "reference": np.zeros((3, 3, 4))}, "shape"),
        ({"prediction": A, "reference": A, "connectivity": 4}, "connectivity"),
    ],
)
def test_lesion_counts_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lesion_counts(**kwargs)


def test_lesion_figures_are_pooled_over_cases_in_csv_and_table(tmp_path, capsys):
    # case p: lesion class 2 hit + missed + a false positive; case q: one lesion hit; class 1 a large organ
    organ = cube((13, 0, 0), (16, 16, 16), L)
    save(tmp_path / "pred" / "p.nii.gz", organ + 2 * (A | C))
    save(tmp_path / "labels" / "p.nii.gz", organ + 2 * (A | B))
    save(tmp_path / "pred" / "q.nii.gz", organ + 2 * A)
    save(tmp_path / "labels" / "q.nii.gz", organ + 2 * A)
    assert (
        main(
            [
                "--pred",
                str(tmp_path / "pred"),
                "--labels",
                str(tmp_path / "labels"),
                "--csv",
                str(tmp_path / "s.csv"),
                "--classes",
                "1=liver,2=lesion",
                "--lesion-classes",
                "lesion",
                "--lesion-overlap",
                "0.2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "IoU >= 0.2" in out and "2 lesion" in out and "1 liver" in out
    lesion_table = out.split("Lesion-wise", 1)[1].splitlines()
    lesion_row = next(line for line in lesion_table if line.startswith("2 lesion"))
    # pooled: 3 reference lesions, 2 detected, 1 missed, 3 predicted, 1 FP; sensitivity = precision = F1 = 2/3;
    # lesion Dice per case 1/3 and 1: mean 2/3, std 1/3
    assert lesion_row.split()[2:10] == ["3", "2", "1", "3", "1", "0.667", "0.667", "0.667"]
    assert "0.667 ± 0.333" in lesion_row
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    row = next(r for r in rows if r["case"] == "p" and r["class"] == "2")
    assert row["name"] == "lesion" and (row["reference_lesions"], row["detected_lesions"], row["missed_lesions"]) == (
        "2",
        "1",
        "1",
    )
    assert (row["predicted_lesions"], row["false_positive_lesions"]) == ("2", "1")
    assert float(row["lesion_f1"]) == pytest.approx(0.5) and float(row["lesion_dice"]) == pytest.approx(1 / 3)
    # the organ is scored voxel-wise only: no lesion row, empty lesion cells
    assert not any(line.startswith("1 liver") for line in lesion_table)
    organ_row = next(r for r in rows if r["case"] == "p" and r["class"] == "1")
    assert organ_row["name"] == "liver" and organ_row["dice"] == "1" and organ_row["reference_lesions"] == ""


LESION_CLASS_CASES = [
    # (evaluate options, the config in the run folder (or None), classes with a lesion-wise row)
    ("organs only, no marking", [], None, []),
    ("by value", ["--lesion-classes", "2"], None, ["2 lesion"]),
    ("by name", ["--lesion-classes", "liver,lesion"], None, ["1 liver", "2 lesion"]),
    ("from the run's config", [], "data:\n  labels: {1: liver, 2: lesion}\n  lesion_classes: [lesion]\n", ["2 lesion"]),
    (
        "option over the config",
        ["--lesion-classes", "1"],
        "data:\n  labels: {1: liver, 2: lesion}\n  lesion_classes: [2]\n",
        ["1 liver"],
    ),
]


@pytest.mark.parametrize("name,options,config,expected", LESION_CLASS_CASES, ids=[c[0] for c in LESION_CLASS_CASES])
def test_lesion_table_only_for_classes_marked_as_lesions(tmp_path, capsys, name, options, config, expected):
    organ = cube((13, 0, 0), (16, 16, 16), L)
    save(tmp_path / "pred" / "p.nii.gz", organ + 2 * A)
    save(tmp_path / "labels" / "p.nii.gz", organ + 2 * (A | B))
    classes = "1=liver,2=lesion"
    if config is not None:
        _write(tmp_path / "run" / "config.yaml", config)
        classes = str(tmp_path / "run")
    assert (
        main(["--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels"), "--classes", classes, *options])
        == 0
    )
    out = capsys.readouterr().out
    assert "1 liver" in out and "2 lesion" in out  # the Dice table names both
    if not expected:
        assert "Lesion-wise" not in out
        return
    rows = [line.split("  ")[0].strip() for line in out.split("Lesion-wise", 1)[1].splitlines()[2:] if line.strip()]
    assert rows == expected


@pytest.mark.parametrize(
    "value,message",
    [
        ("tumour", "--lesion-classes: 'tumour' is neither a label value nor a class name (1=liver, 2=lesion)"),
        ("0", "--lesion-classes: 0 is not a foreground class (1 or more)"),
    ],
)
def test_unknown_lesion_class_is_one_line_error(tmp_path, capsys, value, message):
    save(tmp_path / "pred" / "p.nii.gz", cube((2, 2, 2), (6, 6, 6), L))
    save(tmp_path / "labels" / "p.nii.gz", cube((2, 2, 2), (6, 6, 6), L))
    assert (
        main(
            [
                "--pred",
                str(tmp_path / "pred"),
                "--labels",
                str(tmp_path / "labels"),
                "--classes",
                "liver,lesion",
                "--lesion-classes",
                value,
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == f"error: {message}"


# ---- class names -------------------------------------------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


NAME_CASES = [
    (
        "msd dataset.json",
        "dataset.json",
        '{"labels": {"0": "background", "1": "liver", "2": "tumour"}}',
        {1: "liver", 2: "tumour"},
    ),
    (
        "nnU-Net v2 dataset.json",
        "dataset.json",
        '{"labels": {"background": 0, "liver": 1, "tumour": 2}}',
        {1: "liver", 2: "tumour"},
    ),
    ("medeman config", "cfg.yaml", "data:\n  labels: {1: liver, 3: lesion}\n", {1: "liver", 3: "lesion"}),
    ("run folder", "run/config.yaml", "data:\n  labels: {2: kidneys}\n", {2: "kidneys"}),
]


@pytest.mark.parametrize("name, file, text, expected", NAME_CASES, ids=[c[0] for c in NAME_CASES])
def test_class_names_from_files(tmp_path, name, file, text, expected):
    path = _write(tmp_path / file, text)
    spec = path.parent if name == "run folder" else path
    assert load_class_names(spec) == expected


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("1=liver,3=lesion", {1: "liver", 3: "lesion"}),
        ("liver, kidneys ,lesion", {1: "liver", 2: "kidneys", 3: "lesion"}),
    ],
)
def test_class_names_written_out(spec, expected):
    assert load_class_names(spec) == expected


@pytest.mark.parametrize(
    "file, text, spec, message",
    [
        ("dataset.json", '{"name": "x"}', None, "no class names"),
        ("dataset.json", '{"labels": {"liver": [1, 2]}}', None, "region labels"),
        ("dataset.json", '["liver"]', None, "dataset.json: a JSON object is expected"),
        ("dataset.json", '{"labels": ', None, "unreadable dataset.json"),
        ("cfg.yaml", "data:\n  num_classes: 3\n", None, "no class names"),
        (None, None, "1=liver,kidneys", "give a dataset.json"),
    ],
)
def test_class_names_refused_with_the_reason(tmp_path, file, text, spec, message):
    if file:
        spec = str(_write(tmp_path / file, text))
    with pytest.raises(ValueError, match=message):
        load_class_names(spec)


def test_a_class_the_model_never_predicts_is_warned_about_and_not_scored_where_absent(tmp_path, capsys):
    """Issue 23: class 5 in one of 6 references and in no prediction scored Dice 0.833 ± 0.373 (five empty cases as 1)."""
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    for i in range(6):
        save(pred / f"c{i}.nii.gz", plane(2, 4))
        save(lab / f"c{i}.nii.gz", plane(2, 4).astype(np.uint8) + (5 * plane(2, 9) if i == 0 else 0))
    summary = evaluate_folder(pred, lab, csv=tmp_path / "s.csv")
    stats = summary.per_class()[5]
    assert (stats["n"], stats["dice_n"], stats["dice_mean"], stats["absent_n"]) == (6, 1, 0.0, 5)
    assert summary.warnings == [
        "class 5: in the labels of 1 case(s) but in no prediction "
        "(does the model predict this class? check data.num_classes and the label values)"
    ]
    assert summary.per_class()[1]["dice_mean"] == 1.0 and summary.per_class()[1]["absent_n"] == 0
    rows = [r for r in csv.DictReader(open(tmp_path / "s.csv")) if r["class"] == "5"]
    assert [(r["dice"], r["note"]) for r in rows] == [("0", "")] + [("nan", "absent from prediction and reference")] * 5

    assert main(["--pred", str(pred), "--labels", str(lab)]) == 0
    out, err = capsys.readouterr()
    assert "warning: class 5: in the labels of 1 case(s) but in no prediction" in err
    assert (
        "class 5: absent from prediction and reference in 5 of 6 case(s), not scored there (its Dice is over the other 1)"
        in out
    )
    assert "0.000 ± 0.000 (n=1)" in out


def test_nan_voxels_are_refused_in_drawn_scans_and_in_labels(tmp_path, capsys):
    save(tmp_path / "pred" / "x.nii.gz", cube((2, 2, 2), (6, 6, 6)))
    save(tmp_path / "labels" / "x.nii.gz", cube((2, 2, 2), (6, 6, 6)))
    scan = np.full(SHAPE, 40.0, dtype=np.float32)
    scan[0, 0, :3] = np.nan
    images = tmp_path / "images"
    images.mkdir()
    nib.save(nib.Nifti1Image(scan, AFFINE), str(images / "x.nii.gz"))
    code = main(
        [
            "--pred",
            str(tmp_path / "pred"),
            "--labels",
            str(tmp_path / "labels"),
            "--png",
            str(tmp_path / "png"),
            "--images",
            str(images),
        ]
    )
    assert code == 1
    assert (
        f"error: {images / 'x.nii.gz'}: 3 NaN/Inf intensities; refused, x drawn without the scan"
        in capsys.readouterr().err
    )
    assert (tmp_path / "png" / "x.png").is_file()

    label = cube((2, 2, 2), (6, 6, 6)).astype(np.float32)
    label[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(label, AFFINE), str(tmp_path / "labels" / "x.nii.gz"))
    summary = evaluate_folder(tmp_path / "pred", tmp_path / "labels")
    assert summary.problems == [f"{tmp_path / 'labels' / 'x.nii.gz'}: NaN/Inf label values"]
