"""medeman export --format onnx / torchscript: the network's logits as PyTorch's, and the metadata beside it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medeman.checkpoint import save_teacher
from medeman.export import example_input, export_model, main
from tiny_teacher import trained_teacher


@pytest.fixture
def run_dir(tmp_path):
    net, cfg = trained_teacher()
    cfg["data"]["lesion_classes"] = ["bright"]
    (tmp_path / "run").mkdir()
    rules = {"classes": {"1": {"min_volume_mm3": 5.0, "keep_largest": 0}}, "class_scales": [1.0, 3.0]}
    save_teacher(tmp_path / "run" / "teacher.pt", net, cfg, step=60, postprocessing=rules)
    return tmp_path / "run"


def _logits(net, x):
    with torch.no_grad():
        return net(x).numpy()


def test_onnx_logits_equal_pytorch_within_1e_4(run_dir, tmp_path):
    import onnxruntime

    model, meta = export_model(run_dir, "onnx", tmp_path / "onnx")
    net, cfg = trained_teacher()
    x = example_input(cfg, batch=3, seed=7)  # another batch size and patch than the export traced
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits"]
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == (3, 2, 16, 16, 16)
    np.testing.assert_allclose(got, _logits(net, x), atol=1e-4, rtol=0)


def test_torchscript_logits_equal_pytorch_within_1e_4(run_dir, tmp_path):
    model, _ = export_model(run_dir, "torchscript", tmp_path / "ts")
    net, cfg = trained_teacher()
    x = example_input(cfg, batch=2, seed=3)
    loaded = torch.jit.load(str(model))
    np.testing.assert_allclose(_logits(loaded, x), _logits(net, x), atol=1e-4, rtol=0)


def test_metadata_beside_the_model_says_preprocessing_and_classes(run_dir, tmp_path):
    _, meta = export_model(run_dir, "onnx", tmp_path / "onnx")
    got = json.loads(meta.read_text())
    assert got["model_file"] == "model.onnx"
    assert got["classes"] == {"0": "background", "1": "bright"} and got["lesion_classes"] == {"1": "bright"}
    assert got["preprocessing"]["spacing"] == [1.5, 1.5, 1.5] and got["preprocessing"]["orientation"] == "RAS"
    assert got["preprocessing"]["intensity"] == {"window": [0.0, 100.0], "to": [0.0, 1.0], "clip": True}
    assert got["sliding_window"]["roi_size"] == [16, 16, 16] and got["sliding_window"]["overlap"] == 0.5
    assert got["input"]["shape"] == ["batch", 1, 16, 16, 16] and got["output"]["shape"] == ["batch", 2, 16, 16, 16]
    # the operating point and component rules learned on validation, for a service to apply as medeman infer does
    assert got["class_scales"] == [1.0, 3.0] and got["component_rules"] == {
        "1": {"min_volume_mm3": 5.0, "keep_largest": 0}
    }


def test_export_keeps_earlier_files_without_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "ts"
    assert main(["--model", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 0
    before = (out / "model.ts").read_bytes()
    assert main(["--model", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out / 'model.ts'} exists; kept (pass --overwrite to replace it)"
    assert (out / "model.ts").read_bytes() == before
    assert main(["--model", str(run_dir), "--format", "torchscript", "--out", str(out), "--overwrite"]) == 0


def test_export_refuses_a_file_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "teacher.pt").write_bytes(b"not a model")
    assert main(["--model", str(tmp_path / "teacher.pt"), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'teacher.pt'}: refused") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "name,channels", [("basicunet", [4, 4, 8, 8]), ("segresnet", [4, 8, 16, 32]), ("dynunet", [4, 8, 16])]
)
def test_every_architecture_exports_to_onnx_and_torchscript(tmp_path, name, channels):
    import onnxruntime

    from medeman.nets import build_network
    from tiny_teacher import teacher_config

    cfg = teacher_config()
    cfg["model"].update(name=name, channels=channels)
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    onnx_file, _ = export_model((net, cfg), "onnx", tmp_path / "onnx")
    ts_file, _ = export_model((net, cfg), "torchscript", tmp_path / "ts")
    x = example_input(cfg, batch=2, seed=5)
    expected = _logits(net, x)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_logits(torch.jit.load(str(ts_file)), x), expected, atol=1e-4, rtol=0)
