"""``medeman plan`` on a tiny cohort: the files it writes, and its one-line errors."""

from __future__ import annotations

import json

from medeman.cli import main as cli_main
from medeman.config import load_config


def test_plan_writes_a_loadable_plan_and_the_fingerprint_beside_it(make_cohort, tmp_path, capsys):
    root = make_cohort(n_labeled=3, n_unlabeled=2)
    out = tmp_path / "plans" / "mine.yaml"
    assert (
        cli_main(
            [
                "plan",
                "--labeled",
                str(root / "labeled"),
                "--unlabeled",
                str(root / "unlabeled"),
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cfg = load_config([out])
    assert cfg["data"]["num_classes"] == 3 and cfg["ssl"]["method"] == "mean_teacher"
    assert cfg["data"]["spacing"] == [1.0, 1.0, 1.0]  # the phantoms' spacing; 20 mm scans are not coarsened
    fingerprint = json.loads((tmp_path / "plans" / "fingerprint.json").read_text())
    assert fingerprint["summary"]["num_labeled"] == 3 and fingerprint["summary"]["num_unlabeled"] == 2
    assert "data.spacing = [1.0, 1.0, 1.0]" in capsys.readouterr().out


def test_plan_refuses_to_overwrite_and_bad_budgets(make_cohort, tmp_path, capsys):
    root = make_cohort(n_labeled=2, n_unlabeled=0)
    out = tmp_path / "plan.yaml"
    out.write_text("mine\n")
    assert cli_main(["plan", "--labeled", str(root / "labeled"), "--out", str(out)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {out} already exists; pass --overwrite to replace it, or choose another --out"
    )
    assert out.read_text() == "mine\n"
    assert (
        cli_main(
            ["plan", "--labeled", str(root / "labeled"), "--out", str(tmp_path / "p.yaml"), "--time-budget", "soon"]
        )
        == 2
    )
    assert (
        capsys.readouterr().err.strip()
        == "error: --time-budget: time budget 'soon': expected a duration such as 900, 900s, 15m or 1h30m"
    )
    assert cli_main(["plan", "--labeled", str(tmp_path / "missing"), "--out", str(tmp_path / "p.yaml")]) == 2
    assert "missing" in capsys.readouterr().err


def test_train_without_config_plans_and_keeps_the_plan_in_the_run(make_cohort, tmp_path, capsys):
    from medeman.train import main as train_main

    root = make_cohort(n_labeled=3, n_unlabeled=2)
    run = tmp_path / "run"
    args = [
        "--labeled",
        str(root / "labeled"),
        "--unlabeled",
        str(root / "unlabeled"),
        "--out",
        str(run),
        "--no-progress",
        "--device",
        "cpu",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.val_every_steps=2",
        "--set",
        "data.num_workers=0",
    ]
    assert train_main(args) == 0
    assert "no --config: planned from the data" in capsys.readouterr().out
    planned = load_config([run / "plan.yaml"])
    used = load_config([run / "config.yaml"])
    assert used["train"]["max_steps"] == 2 and planned["train"]["max_steps"] == 2000  # --set overrides the plan
    assert (
        used["data"]["spacing"] == planned["data"]["spacing"]
        and used["data"]["patch_size"] == planned["data"]["patch_size"]
    )
    assert (run / "fingerprint.json").is_file() and (run / "teacher.pt").is_file()
    plan_text = (run / "plan.yaml").read_text()
    assert train_main(args) == 2  # the earlier run (and its plan) is kept without --overwrite
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "plan.yaml").read_text() == plan_text
    assert train_main(args + ["--overwrite"]) == 0


def test_time_budget_on_a_config_sets_the_steps_and_scales_the_schedules(monkeypatch):
    import medeman.planning
    from medeman.train import fit_time_budget

    monkeypatch.setattr(medeman.planning, "time_training_steps", lambda cfg, device="cpu": 0.1)
    cfg = load_config(sets=["train.max_steps=1000", "ssl.rampup_steps=400", "train.val_every_steps=200"])
    out = fit_time_budget(cfg, "100s")
    assert out["train"]["max_steps"] == 700  # 70 % of 100 s at 0.1 s a step
    assert out["ssl"]["rampup_steps"] == 280 and out["train"]["val_every_steps"] == 140
    assert fit_time_budget(cfg, "100s", ["train.max_steps=1000"]) is cfg  # an explicit --set wins


def test_train_without_config_on_an_anisotropic_mr_cohort(tmp_path, volume_writer, capsys):
    """0.7 x 0.7 x 5 mm MR-like scans: thick slices kept, per-scan z-score, and a run that trains and segments."""
    import numpy as np

    from medeman.infer import infer_cases
    from medeman.train import main as train_main

    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    rng = np.random.default_rng(0)
    for i in range(4):
        image = rng.normal(300, 20, size=(64, 64, 8)).astype(np.float32)
        label = np.zeros(image.shape, np.uint8)
        label[20 + i : 40 + i, 20:44, 2:6] = 1
        image[label == 1] += 200
        volume_writer(tmp_path / "mr" / "images" / f"case{i}.nii.gz", image, affine)
        volume_writer(tmp_path / "mr" / "labels" / f"case{i}.nii.gz", label, affine)
    run = tmp_path / "run"
    assert (
        train_main(
            [
                "--labeled",
                str(tmp_path / "mr"),
                "--out",
                str(run),
                "--no-progress",
                "--device",
                "cpu",
                "--set",
                "train.max_steps=2",
                "--set",
                "train.val_every_steps=2",
                "--set",
                "data.num_workers=0",
            ]
        )
        == 0
    )
    cfg = load_config([run / "config.yaml"])
    assert cfg["data"]["modality"] == "MR" and cfg["ssl"]["method"] == "supervised"
    assert cfg["data"]["spacing"] == [0.7, 0.7, 5.0]  # every scan alike: the 10th percentile of z is 5 mm too
    assert cfg["data"]["patch_size"] == [64, 64, 16]  # 8 slices padded to the 16 the 3-level UNet needs
    results = infer_cases(run, tmp_path / "mr" / "images", tmp_path / "pred", progress=False)
    assert [r.status for r in results] == ["written"] * 4
