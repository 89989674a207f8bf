"""scripts/bench/conv.py: the convolutions of a training step collected from the model, each weight gradient route
timed against oneDNN's, with its error against float64; a table and a JSON file."""
from __future__ import annotations

import json

import pytest

from scripts.bench import conv as bench_conv


@pytest.mark.slow
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
    assert "Per step, " in text and "on the convolutions" in text and "Floor, " in text
    t = result["totals_s"]
    for r in rows:
        assert r["forward_nchw_ms"] > 0 and r["weight_nchw_ms"] > 0
        assert bench_conv.floor_ms(r) <= r["forward_ms"] + r["input_ms"] + r["weight_routed_ms"]
    assert 0 < t["floor"] <= min(t["forward"] + t["input"] + min(t["weight_onednn"], t["weight_routed"]),
                                 t["forward_nchw"] + t["input_nchw"] + t["weight_nchw"])
    saved = json.loads(out.read_text())
    assert saved["results"][0]["rows"] == json.loads(json.dumps(rows))


@pytest.mark.parametrize("args,message", [(["--batch", "1"], "--batch must be >= 2"),
                                          (["--repeats", "0"], "--repeats, --threads and --top must be >= 1")])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_conv.parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_rule_option_times_the_routes_of_that_rule(tmp_path, capsys):
    """`--rule avx2` on any machine: every row's route is the AVX2 rule's, which routes the larger convolutions."""
    from utils.runtime.cpu_tuning import conv_out_shape, weight_grad_route

    out = tmp_path / "conv.json"
    (result,) = bench_conv.main(["--models", "hmsa_deeplabv3plus", "--width", "tiny", "--crop", "64x64",
                                 "--repeats", "1", "--top", "1", "--rule", "avx2", "--out", str(out)])
    assert "routes for oneDNN's AVX2 kernels" in capsys.readouterr().out
    rows = result["rows"]
    for r in rows:
        geometry = tuple(tuple(r[k]) for k in ("stride", "padding", "dilation"))
        out_shape = conv_out_shape(r["input"], r["weight"], *geometry)
        assert r["route"] == weight_grad_route(r["input"], r["weight"], out_shape, *geometry, avx512=False)
    assert {"native", "flat", "taps"} <= {r["route"] for r in rows}
    saved = json.loads(out.read_text())
    assert saved["results"][0]["rule"] == "avx2" and isinstance(saved["onednn_avx512"], bool)
