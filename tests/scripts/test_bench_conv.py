"""scripts/bench_conv.py: the convolutions of a training step collected from the model, each weight gradient route
timed against oneDNN's, with its error against float64; a table and a JSON file."""
from __future__ import annotations

import json

from scripts import bench_conv


def test_tiny_model_table_and_json(tmp_path, capsys):
    out = tmp_path / "conv.json"
    results = bench_conv.main(["--models", "hmsa_deeplabv3plus", "--width", "tiny", "--crop", "32x32",
                               "--repeats", "1", "--top", "3", "--out", str(out)])
    text = capsys.readouterr().out
    (result,) = results
    rows = result["rows"]
    # the multi-scale step runs each trunk convolution at both scales: every geometry of the 0.5x pass appears
    assert len(rows) > 20 and sum(r["calls"] for r in rows) > len(rows)
    assert {r["route"] for r in rows} <= {"native", "onednn", "flat", "taps"}
    for r in rows:
        assert r["forward_ms"] > 0 and r["weight_onednn_ms"] > 0 and r["weight_routed_ms"] > 0
        assert r["weight_onednn_err"] < 1e-5 and r["weight_routed_err"] < 1e-5
    assert result["totals_s"]["weight_routed"] > 0
    assert text.count("\n| ") == 1 + 3  # the header and three rows (the rule line starts "|---")
    assert "Per step, " in text and "on the convolutions" in text
    saved = json.loads(out.read_text())
    assert saved["results"][0]["rows"] == json.loads(json.dumps(rows))
