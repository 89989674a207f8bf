"""`scripts/bench.py --against REV` and scripts/gpu_check.sh, at a tiny size (not timed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scripts import bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--width", "tiny", "--crop", "64x64", "--eval-size", "32x48", "--rounds", "2", "--calls", "1"]


def worktrees() -> str:
    return subprocess.run(["git", "-C", ROOT, "worktree", "list"], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_against_head_gives_a_row_per_workload_and_removes_its_worktree(tmp_path):
    before = worktrees()
    out = tmp_path / "against.json"
    results = bench.main(TINY + ["--against", "HEAD", "--out", str(out)])
    rows = results["against"]["rows"]
    assert {(r["workload"], r["model"]) for r in rows} == set(bench.AGAINST_WORKLOADS)
    for r in rows:
        assert len(r["round_speedups"]) == 2 and r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert r["ours_ms"] > 0 and r["theirs_ms"] > 0
        # HEAD differs from the working tree at most by exact or fp32-rounding changes
        assert r["outputs"] in ("bit-equal", "fp32 rounding"), r
        assert r["ours_output_err"] < 1e-4 and r["theirs_output_err"] < 1e-4
        assert (r["ours_update_err"] is None) == (r["workload"] == "eval")
    assert worktrees() == before  # the temporary checkout is gone
    saved = json.loads(out.read_text())
    assert saved["against"]["commit"] == subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                                        text=True, check=True).stdout.strip()
    table = bench.against_table(results["against"])
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(rows) and len({line.count("|") for line in lines}) == 1


def test_against_an_unknown_revision_fails_with_the_reason(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + ["--against", "no-such-revision-x"])
    assert "not a commit of this repository" in str(e.value)
    with pytest.raises(SystemExit):
        bench.parse_args(["--against", "HEAD", "--calls", "0"])
    assert "--calls" in capsys.readouterr().err


@pytest.mark.slow
def test_started_by_path_it_runs_as_the_module():
    done = subprocess.run([sys.executable, "scripts/bench.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--against REV" in done.stdout


@pytest.mark.slow
def test_gpu_check_refuses_cleanly_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is what a machine without it shows")
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "no CUDA device" in done.stdout + done.stderr
    assert "gpu_check: FAILED: stage 'preflight'" in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_gpu_check_dry_run_writes_one_json(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["device"].startswith("CPU")
    assert set(result["stage_seconds"]) == {"preflight", "tests", "bench", "data_cityscapes", "data_mapillary"}
    for name, row in result["data"].items():
        assert row["workers"] == 4  # the recipes' data.num_workers
        assert row["loader_img_per_s"] == pytest.approx(4 * row["per_worker_img_per_s"])
        assert row["headroom"] == pytest.approx(row["loader_img_per_s"] / row["step_img_per_s"])
    assert result["data"]["mapillary"]["measured"]["dataset"] == "mapillary"
    assert "data mapillary: 4 workers" in done.stdout
    assert result["tests"]["tests"] == result["tests"]["skipped"] == 7  # without CUDA every GPU case skips
    assert result["failed"] == [] and "gpu_check: OK" in done.stdout
    assert {r["model"] for r in result["bench"]["train"]} == set(bench.PAIRS)


@pytest.mark.slow
def test_gpu_check_measures_on_after_failing_tests_then_fails(tmp_path):
    # An interpreter whose pytest fails: the tests stage fails, the measurements are still taken and written.
    wrapper = tmp_path / "python"
    wrapper.write_text('#!/bin/sh\nif [ "$1 $2" = "-m pytest" ]; then echo "a GPU test failed (simulated)"; exit 1; fi\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHON": str(wrapper)})
    assert done.returncode == 1, done.stderr[-2000:]
    failure = "stage 'tests' exited with 1 (its output is above)"
    assert f"gpu_check: {failure}; the measurements go on" in done.stderr
    assert done.stderr.rstrip().endswith(f"gpu_check: FAILED: {failure}; the measurements are in {out}")
    result = json.loads(out.read_text())
    assert result["failed"] == [failure] and result["tests"] is None
    assert set(result["stage_seconds"]) == {"preflight", "tests", "bench", "data_cityscapes", "data_mapillary"}
    assert {r["model"] for r in result["bench"]["train"]} == set(bench.PAIRS)
