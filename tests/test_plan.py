"""``medeman plan`` on a tiny cohort: the files it writes, and its one-line errors."""

from __future__ import annotations

import json

from medeman.cli import main as cli_main
from medeman.config import load_config


def test_plan_writes_a_loadable_plan_and_the_fingerprint_beside_it(make_cohort, tmp_path, capsys):
    root = make_cohort(n_labeled=3, n_unlabeled=2)
    out = tmp_path / "plans" / "mine.yaml"
    assert cli_main(["plan", "--labeled", str(root / "labeled"), "--unlabeled", str(root / "unlabeled"), "--device", "cpu", "--out", str(out)]) == 0
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
    assert capsys.readouterr().err.strip() == f"error: {out} already exists; pass --overwrite to replace it, or choose another --out"
    assert out.read_text() == "mine\n"
    assert cli_main(["plan", "--labeled", str(root / "labeled"), "--out", str(tmp_path / "p.yaml"), "--time-budget", "soon"]) == 2
    assert capsys.readouterr().err.strip() == "error: --time-budget: time budget 'soon': expected a duration such as 900, 900s, 15m or 1h30m"
    assert cli_main(["plan", "--labeled", str(tmp_path / "missing"), "--out", str(tmp_path / "p.yaml")]) == 2
    assert "missing" in capsys.readouterr().err
