"""medeman rank: scores against hand computation, ranking order and CSV, geometry of maps, refusals."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medeman.checkpoint import save_teacher
from medeman.config import default_config
from medeman.data.readers import read_geometry, write_volume
from medeman.nets import build_network
from medeman.rank import main, rank_cases
from medeman.rank_scores import (
    disagreement_scores,
    diverse_order,
    entropy_scores,
    flip_variance,
    normalized_entropy,
    rank_fraction,
    strategy_scores,
    volume_scores,
)

# a scan far from RAS: axes permuted and flipped, anisotropic voxels of 0.8 x 1.3 x 2.5 mm
OBLIQUE_AFFINE = np.array(
    [
        [0.0, 0.0, -2.5, 40.0],
        [-0.8, 0.0, 0.0, 12.0],
        [0.0, 1.3, 0.0, -30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (19, 13, 9)
BOX = (slice(2, 9), slice(3, 11), slice(1, 5))  # 7 x 8 x 4 = 224 voxels


def tiny_config(spacing=(1.5, 1.5, 1.5), num_classes: int = 2) -> dict:
    cfg = default_config()
    cfg["model"].update(channels=[4, 8], num_res_units=0)
    cfg["data"].update(
        patch_size=[16, 16, 16],
        spacing=None if spacing is None else list(spacing),
        intensity_window=[0.0, 100.0],
        num_classes=num_classes,
    )
    return cfg


def box_scan(value: int = 100) -> np.ndarray:
    data = np.zeros(SHAPE, dtype=np.int16)
    data[BOX] = value
    return data


class BoxNet(nn.Module):
    """Foreground logit ``40 (x - 0.5) + offset``: inside the box (x = 1) it is ``20 + offset``, outside ``-20 + offset``."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    def forward(self, x):
        fg = 40.0 * (x[:, :1] - 0.5) + self.offset
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)


# --------------------------------------------------------------------------- scores by hand

ENTROPY_CASES = [
    # (probabilities along the class axis, expected entropy / log C)
    ([1.0, 0.0], 0.0),
    ([0.5, 0.5], 1.0),
    ([1 / 3, 1 / 3, 1 / 3], 1.0),
    ([0.5, 0.5, 0.0], math.log(2) / math.log(3)),
    ([0.75, 0.25], binary_entropy(0.75)),
    ([0.7, 0.2, 0.1], -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)),
]


@pytest.mark.parametrize("probs, expected", ENTROPY_CASES)
def test_normalized_entropy_of_known_probabilities(probs, expected):
    p = torch.tensor(probs).reshape(-1, 1, 1, 1).expand(-1, 2, 3, 2)
    assert torch.allclose(normalized_entropy(p), torch.full((2, 3, 2), expected), atol=1e-6)


def test_entropy_over_foreground_and_whole_scan():
    entropy = torch.tensor([[[0.0, 0.2], [0.4, 0.6]]])
    labels = torch.tensor([[[0, 1], [2, 0]]])
    scores = entropy_scores(entropy, labels)
    assert scores["entropy_fg"] == pytest.approx((0.2 + 0.4) / 2)
    assert scores["entropy_mean"] == pytest.approx(0.3)
    assert math.isnan(entropy_scores(entropy, torch.zeros_like(labels))["entropy_fg"])


DISAGREEMENT_CASES = [
    # (teacher mask, student mask, num_classes, expected scores)
    ([1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], 2, {"disagree_c1": 1 - 2 * 2 / 6, "argmax_differs": 2 / 6}),
    ([1, 1, 2, 2, 0, 0], [1, 1, 2, 2, 0, 0], 3, {"disagree_c1": 0.0, "disagree_c2": 0.0, "argmax_differs": 0.0}),
    ([1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 2, 2], 3, {"disagree_c1": 1.0, "disagree_c2": 1.0, "argmax_differs": 4 / 6}),
    ([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], 3, {"disagree_c1": 0.0, "disagree_c2": 0.0, "argmax_differs": 0.0}),
    (
        [2, 2, 2, 1, 0, 0],
        [2, 1, 1, 1, 0, 0],
        3,
        {"disagree_c1": 1 - 2 * 1 / 4, "disagree_c2": 1 - 2 * 1 / 4, "argmax_differs": 2 / 6},
    ),
]


@pytest.mark.parametrize("teacher, student, num_classes, expected", DISAGREEMENT_CASES)
def test_disagreement_of_known_masks(teacher, student, num_classes, expected):
    t, s = torch.tensor(teacher).reshape(1, 2, 3), torch.tensor(student).reshape(1, 2, 3)
    assert disagreement_scores(t, s, num_classes) == pytest.approx(expected)


def test_disagreement_of_masks_of_different_shapes_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        disagreement_scores(torch.zeros(2, 2, 2), torch.zeros(2, 2, 3), 2)


def test_volumes_in_millilitres():
    labels = torch.zeros(10, 10, 10, dtype=torch.uint8)
    labels[:5, :5, :5] = 1  # 125 voxels of 2 x 2 x 2 mm = 1000 mm³
    labels[0, 9, 9] = 2
    assert volume_scores(labels, (2.0, 2.0, 2.0), 3) == pytest.approx({"volume_ml_c1": 1.0, "volume_ml_c2": 0.008})


def test_flip_variance_is_the_class_mean_of_the_variance_across_flips():
    flips = torch.tensor([[0.8, 0.2], [0.4, 0.6]]).reshape(2, 2, 1, 1, 1)  # per class: values 0.8/0.4 and 0.2/0.6
    assert flip_variance(flips).item() == pytest.approx(0.04)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([3.0, 1.0, 2.0], [1.0, 0.0, 0.5]),
        ([1.0, 1.0, 4.0], [0.25, 0.25, 1.0]),
        ([0.2, float("nan"), 0.1], [0.5, 1.0, 0.0]),  # NaN (no foreground predicted) counts as most uncertain
        ([5.0], [1.0]),
    ],
)
def test_rank_fraction(values, expected):
    assert rank_fraction(values) == pytest.approx(expected)


ROWS = [  # entropy_fg ranks: a < b < c; entropy_mean: b < c < a; disagreement: c < a < b
    {"entropy_fg": 0.1, "entropy_mean": 0.05, "disagree_c1": 0.5, "disagree_c2": 0.3},
    {"entropy_fg": 0.2, "entropy_mean": 0.01, "disagree_c1": 0.9, "disagree_c2": 0.9},
    {"entropy_fg": 0.3, "entropy_mean": 0.02, "disagree_c1": 0.0, "disagree_c2": 0.0},
]


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("entropy", [0.1, 0.2, 0.3]),
        ("disagreement", [0.4, 0.9, 0.0]),
        ("combined", [(1.0 + 0.5) / 2, (0.0 + 1.0) / 2, (0.5 + 0.0) / 2]),
    ],
)
def test_strategy_scores(strategy, expected):
    assert strategy_scores(ROWS, strategy) == pytest.approx(expected)


def test_random_strategy_depends_only_on_the_seed_and_unknown_names_are_refused():
    assert np.array_equal(strategy_scores(ROWS, "random", seed=3), strategy_scores(ROWS, "random", seed=3))
    assert not np.array_equal(strategy_scores(ROWS, "random", seed=3), strategy_scores(ROWS, "random", seed=4))
    with pytest.raises(ValueError, match="choose one of"):
        strategy_scores(ROWS, "loudest")


def test_diverse_order_skips_a_near_copy_of_a_scan_already_picked():
    scores = [0.9, 0.8, 0.1, 0.5]
    embeddings = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, -1.0]])  # scan 1 is a near-copy of scan 0
    order, similarity = diverse_order(scores, embeddings, k=2, penalty=1.0)
    assert order[:2] == [0, 3] and sorted(order) == [0, 1, 2, 3]
    assert order[2:] == [1, 2]  # after the greedy part, by score
    plain, _ = diverse_order(scores, embeddings, k=2, penalty=0.0)
    assert plain == [0, 1, 3, 2]
    assert math.isnan(similarity[0]) and similarity[3] < 0.5


# --------------------------------------------------------------------------- a pool end to end


def test_scores_of_a_known_network_on_a_scan_far_from_ras(tmp_path):
    """Teacher sure at 75 % inside the box, student sees nothing: every score follows by hand."""
    write_volume(box_scan(), OBLIQUE_AFFINE, tmp_path / "pool" / "a.nii.gz")
    cfg = tiny_config(spacing=None)
    teacher, student = BoxNet(offset=-20.0 + math.log(3.0)), BoxNet(offset=-60.0)
    rows, problems = rank_cases(
        (teacher, cfg), tmp_path / "pool", tmp_path / "out", student=student, device="cpu", progress=False
    )
    assert problems == []
    (row,) = rows
    box = 7 * 8 * 4
    assert row["entropy_fg"] == pytest.approx(binary_entropy(0.75), abs=1e-4)
    assert row["entropy_mean"] == pytest.approx(binary_entropy(0.75) * box / np.prod(SHAPE), abs=1e-4)
    assert row["disagree_c1"] == pytest.approx(1.0)
    assert row["argmax_differs"] == pytest.approx(box / np.prod(SHAPE))
    assert row["volume_ml_c1"] == pytest.approx(box * 0.8 * 1.3 * 2.5 / 1000)


@pytest.fixture()
def run_dir(tmp_path):
    """A run folder with a tiny teacher.pt and a checkpoints/last.ckpt whose student differs from it."""
    cfg = tiny_config(num_classes=3)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    save_teacher(run / "teacher.pt", build_network(cfg), cfg, step=1)
    student = build_network(cfg)
    torch.save(
        {"global_step": 1, "state_dict": {f"student.{k}": v for k, v in student.state_dict().items()}},
        str(run / "checkpoints" / "last.ckpt"),
    )
    return run


@pytest.fixture()
def pool(tmp_path):
    """Three scans in three formats and geometries."""
    folder = tmp_path / "pool"
    lps = np.diag([-1.6, -1.4, 2.0, 1.0])
    lps[:3, 3] = (10.0, -4.0, 7.0)
    rng = np.random.default_rng(0)
    write_volume(box_scan(), OBLIQUE_AFFINE, folder / "oblique.nii.gz")
    write_volume((rng.random((17, 15, 11)) * 100).astype(np.int16), lps, folder / "lps.mha")
    write_volume(box_scan(60), np.diag([1.2, 1.2, 1.7, 1.0]), folder / "ras.nrrd")
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_ranking_csv_maps_and_pictures_keep_each_scans_geometry(run_dir, pool, tmp_path, capsys):
    out = tmp_path / "rank"
    code = main(
        [
            "--model",
            str(run_dir),
            "--unlabeled",
            str(pool),
            "--out",
            str(out),
            "--top",
            "2",
            "--png",
            "--maps",
            "--tta",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = read_csv(out / "ranking.csv")
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert sorted(r["case"] for r in rows) == ["lps", "oblique", "ras"]
    assert list(rows[0])[:3] == ["rank", "case", "score"] and list(rows[0])[-1] == "file"
    for column in (
        "entropy_fg",
        "entropy_mean",
        "tta_variance_fg",
        "tta_variance_mean",
        "disagree_c1",
        "disagree_c2",
        "argmax_differs",
        "volume_ml_c1",
        "volume_ml_c2",
    ):
        assert column in rows[0]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for row in rows:
        shape, affine = read_geometry(row["file"])
        out_shape, out_affine = read_geometry(out / "uncertainty" / f"{row['case']}.nii.gz")
        assert out_shape == shape
        assert np.allclose(out_affine, affine, atol=1e-5)
        entropy = np.asarray(nib.load(str(out / "uncertainty" / f"{row['case']}.nii.gz")).dataobj)
        assert entropy.dtype == np.float32 and 0.0 <= entropy.min() and entropy.max() <= 1.0 + 1e-6
    pictures = sorted(p.name for p in (out / "png").iterdir())
    assert pictures == [f"001_{rows[0]['case']}.png", f"002_{rows[1]['case']}.png"]


def test_diverse_ranking_lists_every_scan_once_with_its_similarity(run_dir, pool, tmp_path):
    rows, _ = rank_cases(run_dir, pool, None, top=2, diverse=True, device="cpu", progress=False)
    assert sorted(r["case"] for r in rows) == ["lps", "oblique", "ras"]
    assert math.isnan(rows[0]["similarity"]) and -1.0 <= rows[1]["similarity"] <= 1.0


def test_a_corrupt_scan_is_reported_and_skipped(run_dir, pool, tmp_path, capsys):
    (pool / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a scan" * 10)
    code = main(["--model", str(run_dir), "--unlabeled", str(pool), "--out", str(tmp_path / "rank"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.nii.gz" in captured.err and "Traceback" not in captured.err
    assert sorted(r["case"] for r in read_csv(tmp_path / "rank" / "ranking.csv")) == ["lps", "oblique", "ras"]


def test_a_file_that_is_not_a_medeman_teacher_is_refused(pool, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, str(other))
    assert main(["--model", str(other), "--unlabeled", str(pool), "--out", str(tmp_path / "rank")]) == 2
    assert "not a medeman model" in capsys.readouterr().err
    assert not (tmp_path / "rank" / "ranking.csv").exists()


def test_an_earlier_ranking_is_kept_without_overwrite(run_dir, pool, tmp_path, capsys):
    args = ["--model", str(run_dir), "--unlabeled", str(pool), "--out", str(tmp_path / "rank"), "--device", "cpu"]
    assert main(args) == 0
    before = (tmp_path / "rank" / "ranking.csv").read_text()
    assert main(args + ["--strategy", "random"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "rank" / "ranking.csv").read_text() == before
    assert main(args + ["--strategy", "random", "--overwrite"]) == 0


def test_without_a_student_disagreement_is_empty_and_its_strategy_refused(run_dir, pool, tmp_path, capsys):
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    rows, _ = rank_cases(run_dir, pool, None, device="cpu", progress=False)
    assert all(math.isnan(r["argmax_differs"]) for r in rows)
    assert (
        main(
            [
                "--model",
                str(run_dir),
                "--unlabeled",
                str(pool),
                "--out",
                str(tmp_path / "rank"),
                "--strategy",
                "disagreement",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "needs the run's student" in capsys.readouterr().err


def test_the_benchmark_cohort_has_the_unseen_scanner_only_in_the_pool_and_the_test_set(tmp_path):
    """benchmarks/active_learning.py relies on it: no labeled or validation case comes from scanner D."""
    from medeman.sample_data import UNSEEN_SCANNER, make_cohort

    make_cohort(tmp_path, n_labeled=2, n_unlabeled=3, n_test=3, n_val=1, other_formats=False, unseen_every=3)
    rows = read_csv(tmp_path / "scanners.csv")
    unseen = [(r["part"], r["case"]) for r in rows if r["scanner"] == UNSEEN_SCANNER.name]
    assert unseen == [("test", "case_005"), ("unlabeled", "case_008")]
    assert len(rows) == 9 and (tmp_path / "unlabeled_labels").exists() is False
    assert (tmp_path / "unlabeled" / "case_008.nii.gz").is_file()


def test_a_dicom_series_is_ranked_as_the_same_scan_in_nifti(tmp_path):
    """The pool may be DICOM: each series one scan, the same scores as its NIfTI twin, named by its folder."""
    from dicom_series import write_series

    volume = box_scan()
    write_series(tmp_path / "dicom" / "a", volume, OBLIQUE_AFFINE)
    write_volume(volume, OBLIQUE_AFFINE, tmp_path / "nifti" / "a.nii.gz")
    cfg = tiny_config(spacing=None)
    teacher, student = BoxNet(offset=-20.0 + math.log(3.0)), BoxNet(offset=-60.0)
    rows = {}
    for pool in ("dicom", "nifti"):
        found, problems = rank_cases(
            (teacher, cfg), tmp_path / pool, None, student=student, device="cpu", progress=False
        )
        assert problems == [] and [r["case"] for r in found] == ["a"]
        rows[pool] = found[0]
    assert rows["dicom"]["file"] == f"{tmp_path / 'dicom' / 'a'} (series 1, abdomen)"
    for key in ("entropy_fg", "entropy_mean", "disagree_c1", "argmax_differs", "volume_ml_c1"):
        assert rows["dicom"][key] == pytest.approx(rows["nifti"][key], abs=1e-6), key


def test_a_supervised_model_has_no_disagreement_scores_and_says_which(run_dir, pool, tmp_path, capsys):
    """Issue 23: a supervised run's teacher.pt is its student, so every disagreement was exactly 0, without a word."""
    cfg = tiny_config(num_classes=3)
    cfg["ssl"]["method"] = "supervised"
    torch.manual_seed(0)
    save_teacher(run_dir / "teacher.pt", build_network(cfg), cfg, step=1)  # last.ckpt (a student) is still there
    assert (
        main(
            [
                "--model",
                str(run_dir),
                "--unlabeled",
                str(pool),
                "--out",
                str(tmp_path / "rank"),
                "--device",
                "cpu",
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert (
        f"note: {run_dir}: a supervised model has no teacher-student pair, so the disagreement scores "
        "(disagree_c*, argmax_differs) need one and are left out"
    ) in err
    rows = read_csv(tmp_path / "rank" / "ranking.csv")
    assert len(rows) == 3 and all(r["argmax_differs"] == "nan" and r["disagree_c1"] == "nan" for r in rows)
