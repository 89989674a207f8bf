"""scripts/plan_memory.py: the plan table and its JSON, run as a module, without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plan(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "scripts.plan_memory", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_plan_prints_json_with_the_three_peaks():
    out = plan("eval.flip=true", "data.batch_size=2", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["device"] == "cpu" and result["budget_bytes"] is None
    assert 0 < result["eval_min_bytes"] <= result["eval_peak_bytes"]
    assert result["eval_min_bytes"] == min(r["peak_bytes"] for r in result["schedules"] if r["exact"])
    assert result["train_peak_bytes"] > 0 and "data.batch_size=2" in result["train_step"]


@pytest.mark.slow
def test_table_with_a_budget_and_a_bad_budget():
    out = plan("eval.memory_budget=1MiB")
    assert out.returncode == 0, out.stderr
    assert "| unconstrained | yes |" in out.stdout and "none fits" in out.stdout and "does NOT fit" in out.stdout
    bad = plan("eval.memory_budget=huge")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: eval.memory_budget: expected a byte count or a size such as '12GiB' or '800MB', got 'huge'"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["configs/cityscapes/eval_hmsa_ocrnet_hrnet_w48.yaml",
                                    "configs/mapillary/eval_hmsa_ocrnet_hrnet_w48_2177.yaml"])
def test_full_width_recipes_plan_on_a_cpu(recipe):
    out = plan("--config", recipe, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["eval_peak_bytes"] > 2**30 and result["train_peak_bytes"] > 2**30
