"""medeman export --format bundle: a MONAI bundle whose `monai.bundle run` writes medeman infer's masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medeman.checkpoint import save_teacher
from medeman.data.readers import write_volume
from medeman.export import main
from medeman.infer import infer_cases
from test_infer import OBLIQUE_AFFINE, TILTED_AFFINE
from tiny_teacher import smooth_scan, trained_teacher

SCANS = [
    # (name, shape, affine): an anisotropic RAS scan, axes permuted and flipped, a tilted gantry (oblique)
    ("ras", (30, 26, 12), np.diag([1.1, 0.9, 2.5, 1.0])),
    ("permuted", (19, 13, 21), OBLIQUE_AFFINE),
    ("oblique", (28, 24, 10), TILTED_AFFINE),
]


# post-processing as medeman learns it on validation: the bright class's probability x 1.5 before the argmax, then
# its components under 60 mm^3 dropped (the largest always stays) and at most 2 kept
RULES = {
    "class_scales": [1.0, 1.5],
    "classes": {"1": {"min_volume_mm3": 60.0, "keep_largest": 2, "drop": False, "dice_before": 0.5, "dice_after": 0.6}},
}


def _run_bundle(bundle, scans, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--bundle_root",
            str(bundle),
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--input_dir",
            str(scans),
            "--output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two runs (without and with learned post-processing), their bundles, the scans, and the masks of
    medeman infer (``medeman``, ``medeman_rules``, ``medeman_raw``: the second run without its post-processing) and of
    `python -m monai.bundle run` (``monai``, ``monai_rules``)."""
    root = tmp_path_factory.mktemp("bundle")
    net, cfg = trained_teacher()
    for i, (name, shape, affine) in enumerate(SCANS):
        write_volume(smooth_scan(shape, seed=i), affine, root / "scans" / f"{name}.nii.gz")
    for run, extra in (("run", {}), ("run_rules", {"postprocessing": RULES})):
        (root / run).mkdir()
        save_teacher(root / run / "teacher.pt", net, cfg, step=60, **extra)
    assert main(["--model", str(root / "run"), "--format", "bundle", "--out", str(root / "bundle")]) == 0
    assert main(["--model", str(root / "run_rules"), "--format", "bundle", "--out", str(root / "bundle_rules")]) == 0
    infer_cases(root / "run", root / "scans", root / "medeman", device="cpu", progress=False)
    infer_cases(root / "run_rules", root / "scans", root / "medeman_rules", device="cpu", progress=False)
    infer_cases(
        root / "run_rules", root / "scans", root / "medeman_raw", device="cpu", progress=False, postprocess=False
    )
    _run_bundle(root / "bundle", root / "scans", root / "monai")
    _run_bundle(root / "bundle_rules", root / "scans", root / "monai_rules")
    return root


def test_bundle_has_the_monai_layout_and_names_the_classes(exported):
    bundle = exported / "bundle"
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "LICENSE"):
        assert (bundle / part).is_file(), part
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    outputs = meta["network_data_format"]["outputs"]["pred"]
    assert outputs["num_channels"] == 2 and outputs["channel_def"] == {"0": "background", "1": "bright"}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16, 16]
    assert {
        "schema",
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
    } <= set(meta)


def test_bundle_network_loads_with_monai_alone(exported):
    """ConfigParser instantiates network_def and the weights load into it (as the bundle's CheckpointLoader does)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(exported / "bundle" / "configs" / "inference.json"))
    parser["bundle_root"] = str(exported / "bundle")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(str(exported / "bundle" / "models" / "model.pt"), weights_only=True))
    reference, _ = trained_teacher()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), reference(x), atol=1e-6)


def _masks(root, folder, name):
    image = nib.load(str(root / folder / f"{name}.nii.gz"))
    return np.asarray(image.dataobj), image.affine


@pytest.mark.parametrize("rules", [False, True], ids=["argmax", "learned_rules"])
@pytest.mark.parametrize("name,shape,affine", SCANS, ids=[s[0] for s in SCANS])
def test_bundle_masks_agree_with_medeman_infer(exported, name, shape, affine, rules):
    suffix = "_rules" if rules else ""
    a, ours_affine = _masks(exported, "medeman" + suffix, name)
    b, theirs_affine = _masks(exported, "monai" + suffix, name)
    assert a.shape == b.shape == shape
    np.testing.assert_allclose(theirs_affine, ours_affine, atol=1e-4)
    assert 0.1 < a.mean() < 0.9  # both classes cover a real share: boundaries run through the scan
    agreement = float((a == b).mean())
    assert agreement >= 0.995, f"{name}: {agreement:.4%} of voxels agree"


def test_bundle_applies_the_learned_rules(exported):
    """The rules change medeman's masks (more bright voxels from the scale, at most 2 components left), and the
    bundle's masks follow them, not the raw argmax; the bundle carries the component script and names the rules."""
    from scipy import ndimage

    changed = 0
    for name, _, _ in SCANS:
        raw, _ = _masks(exported, "medeman_raw", name)
        ruled, _ = _masks(exported, "medeman_rules", name)
        theirs, _ = _masks(exported, "monai_rules", name)
        changed += int((raw != ruled).sum())
        assert ndimage.label(theirs == 1, structure=np.ones((3, 3, 3)))[1] <= 2
        assert float((theirs == ruled).mean()) > float((theirs == raw).mean())
    assert changed > 0
    bundle = exported / "bundle_rules"
    assert (bundle / "scripts" / "component_rules.py").is_file()
    assert not (exported / "bundle" / "scripts" / "component_rules.py").exists()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())["medeman"]
    assert meta["class_scales"] == [1.0, 1.5]
    assert meta["component_rules"] == {"1": {"min_volume_mm3": 60.0, "keep_largest": 2, "drop": False}}
    readme = (bundle / "docs" / "README.md").read_text()
    assert "class probabilities x 1.5 (class 1)" in readme and "keep the 2 largest" in readme
    assert "plain argmax" in (exported / "bundle" / "docs" / "README.md").read_text()


def test_bundle_export_keeps_an_earlier_bundle_and_other_folders(exported, tmp_path, capsys):
    run, bundle = str(exported / "run"), exported / "bundle"
    assert main(["--model", run, "--format", "bundle", "--out", str(bundle)]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: {bundle}: a bundle is there; kept (pass --overwrite to replace it)"
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["--model", run, "--format", "bundle", "--out", str(tmp_path / "mine"), "--overwrite"]) == 2
    assert "not a MONAI bundle and not empty" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


PREPROCESSING_CASES = [
    # (modality, spacing, affine): the bundle's stock transforms against medeman's preprocessing
    ("CT", [1.5, 1.5, 1.5], TILTED_AFFINE),
    ("CT", None, OBLIQUE_AFFINE),
    ("MR", [1.0, 2.0, 1.5], OBLIQUE_AFFINE),
]


@pytest.mark.parametrize("modality,spacing,affine", PREPROCESSING_CASES)
def test_bundle_preprocessing_equals_medemans(tmp_path, modality, spacing, affine):
    import torch
    from monai.bundle import ConfigParser

    from medeman.bundle import preprocessing_config
    from medeman.data.transforms import preprocessing
    from tiny_teacher import teacher_config

    cfg = teacher_config(spacing=(1.0, 1.0, 1.0))
    cfg["data"].update(modality=modality, spacing=spacing)
    write_volume(smooth_scan((19, 13, 21)) + 10, affine, tmp_path / "scan.nii.gz")
    parser = ConfigParser({"preprocessing": preprocessing_config(cfg)})
    theirs = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "scan.nii.gz")})["image"]
    ours = preprocessing(cfg, keys=("image",))({"image": str(tmp_path / "scan.nii.gz")})["image"]
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(np.asarray(theirs.affine), np.asarray(ours.affine), atol=1e-5)
    assert torch.allclose(theirs.as_tensor(), ours.as_tensor(), atol=1e-5)
