"""ONNX export of a multi-scale model for a fixed scale set, checked against PyTorch with ONNX Runtime."""
import importlib.util
import os

import onnx
import pytest

from tests.fixtures import make_setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export_script():
    spec = importlib.util.spec_from_file_location("export_onnx", os.path.join(ROOT, "scripts", "export_onnx.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_exported_multiscale_model_matches_pytorch(tmp_path, capsys):
    overrides, ckpt = make_setup(str(tmp_path), fit=False)
    out = tmp_path / "model.onnx"
    summary = export_script().main([*overrides, "--checkpoint", ckpt, "--out", str(out), "--num-check", "2",
                                    "eval.scales=[0.5,1.0,2.0]", "--size", "48", "64"])
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["images"] and [o.name for o in graph.graph.output] == ["logits"]
    assert summary["scales"] == [2.0, 1.0, 0.5] and summary["fusion"] == "attention"
    assert summary["pixels"] == 2 * 48 * 64
    assert summary["max_abs_diff"] < 1e-3
    assert summary["agreement"] >= 0.999
    assert "argmax agrees on" in capsys.readouterr().out


def test_export_refuses_a_scale_set_without_one(tmp_path):
    overrides, ckpt = make_setup(str(tmp_path), fit=False)
    with pytest.raises(SystemExit, match="contain 1.0"):
        export_script().main([*overrides, "--checkpoint", ckpt, "--out", str(tmp_path / "m.onnx"),
                              "eval.scales=[0.5,2.0]"])
