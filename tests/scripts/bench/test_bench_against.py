"""`scripts/bench/multiscale.py --against REV` and scripts/gpu_check.sh, at a tiny size (not timed)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from scripts.bench import multiscale as bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
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
def test_the_module_answers_help():
    done = subprocess.run([sys.executable, "-m", "scripts.bench.multiscale", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--against REV" in done.stdout


@pytest.mark.slow
def test_gpu_check_refuses_cleanly_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is what a machine without it shows")
    out = tmp_path / "gpu.json"
    # a generous preflight budget: importing torch on a loaded CPU can take longer than on the GPU host
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GPU_CHECK_LIMIT_preflight": "240"})
    assert done.returncode == 1
    assert "no CUDA device" in done.stdout + done.stderr
    assert "gpu_check: FAILED: stage 'preflight'" in done.stderr
    assert not out.exists()


STAGES = ("preflight", "tests", "train_fp16", "train_bf16", "eval", "bench", "data_cityscapes", "data_mapillary")
CHECKS = ("tests", "train_fp16", "train_bf16", "eval")  # soft stages: a failure does not stop the measurements


def stage_budgets() -> dict[str, int]:
    """The BUDGET table of scripts/gpu_check.sh: {stage: seconds}."""
    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    table = re.search(r"^declare -A BUDGET=\((.*?)^\)", text, re.S | re.M)
    assert table, "scripts/gpu_check.sh has no `declare -A BUDGET=(...)` table"
    return {name: int(seconds) for name, seconds in re.findall(r"^\s*\[(\w+)\]=(\d+)", table.group(1), re.M)}


def test_gpu_check_stage_budgets_add_up_to_at_most_300_s():
    budgets = stage_budgets()
    assert sum(budgets.values()) <= 300, budgets
    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    run = re.findall(r"^stage (?:--soft )?(\w+) ", text, re.M)  # every stage the script runs has a budget
    assert run == [*STAGES, "summary"] and set(budgets) == set(run)
    assert min(budgets.values()) >= 2


def run_check(tmp_path, env: dict[str, str] | None = None, timeout: float = 2400) -> subprocess.CompletedProcess:
    out = tmp_path / "gpu.json"
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_gpu_check_dry_run_writes_one_json(tmp_path):
    done = run_check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["dry_run"] is True and result["device"].startswith("CPU")
    assert list(result["stages"]) == list(STAGES) and result["timed_out"] == []
    for name, stage in result["stages"].items():
        assert stage["result"] == "ok" and 0 <= stage["seconds"] <= stage["limit_s"], (name, stage)
        assert stage["limit_s"] == 20 * stage_budgets()[name]  # the dry run's budgets
    for name, row in result["data"].items():
        assert row["workers"] == 4  # the recipes' data.num_workers
        assert row["loader_img_per_s"] == pytest.approx(4 * row["per_worker_img_per_s"])
        assert row["headroom"] == pytest.approx(row["loader_img_per_s"] / row["step_img_per_s"])
    assert result["data"]["mapillary"]["measured"]["dataset"] == "mapillary"
    assert "data mapillary: 4 workers" in done.stdout
    assert result["tests"]["tests"] == result["tests"]["skipped"] == 10  # without CUDA every GPU case skips
    assert result["failed"] == [] and "gpu_check: OK" in done.stdout
    assert {r["model"] for r in result["bench"]["train"]} == set(bench.PAIRS)
    # the training probes: 2 ranks (gloo, SyncBN), every iteration once, the preemption resumed
    for precision, launches in (("fp16", 2), ("bf16", 1)):
        train = result["train"][precision]
        assert train["problems"] == [] and train["iterations"] == [1, 2, 3, 4, 5]
        assert len(train["launches"]) == launches and len(train["facts"]) == 2 * launches
    assert result["train"]["fp16"]["launches"][0]["rc"] != 0 and result["train"]["fp16"]["launches"][1]["rc"] == 0
    # the evaluation probe: a constrained schedule planned inside eval.py; no allocator counter on a CPU
    evaluation = result["eval"]
    assert evaluation["problems"] == [] and evaluation["measured_peak"] is None
    # planned twice: the check before the first image (eval.scales must fit) and the first batch's schedule
    assert [c["unconstrained"] for c in evaluation["planner_calls"]] == [False, False]
    assert evaluation["predicted_peak"] <= evaluation["budget"] < evaluation["ladder"][0]["peak"]


@pytest.mark.slow
def test_gpu_check_measures_on_after_failing_tests_then_fails(tmp_path):
    # An interpreter whose pytest fails: the tests stage fails, the measurements are still taken and written.
    wrapper = tmp_path / "python"
    wrapper.write_text('#!/bin/sh\nif [ "$1 $2" = "-m pytest" ]; then echo "a GPU test failed (simulated)"; exit 1; fi\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "gpu.json"
    done = run_check(tmp_path, {"PYTHON": str(wrapper)})
    assert done.returncode == 1, done.stderr[-2000:]
    failure = "stage 'tests' exited with 1 (its output is above)"
    assert f"gpu_check: {failure}; the measurements go on" in done.stderr
    assert done.stderr.rstrip().endswith(f"gpu_check: FAILED: {failure}; the measurements are in {out}")
    result = json.loads(out.read_text())
    assert result["failed"] == [failure] and result["tests"] is None
    assert result["stages"]["tests"]["result"] == "failed: exit 1"
    assert [n for n, s in result["stages"].items() if s["result"] == "ok"] == [n for n in STAGES if n != "tests"]
    assert {r["model"] for r in result["bench"]["train"]} == set(bench.PAIRS)


@pytest.mark.slow
def test_gpu_check_a_hanging_stage_ends_in_a_named_timeout_within_its_budget(tmp_path):
    """Every stage after the preflight hangs (an interpreter that sleeps, the sleep in a session of its own as
    torchrun's workers are): each ends at its 4 s budget (TERM at 3 s, KILL at 4 s), named; the checks' time-outs
    let the measurements start, the bench's stops the rest; the JSON is written and the sleeps are killed."""
    pids = tmp_path / "pids"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = "-" ]; then exec {sys.executable} "$@"; fi\n'  # preflight, summary
                       f'setsid sleep 1000 &\necho $! >> {pids}\nwait\n')
    wrapper.chmod(0o755)
    hung = ("tests", "train_fp16", "train_bf16", "eval", "bench")
    limits = {f"GPU_CHECK_LIMIT_{name}": "4" for name in hung}
    out = tmp_path / "gpu.json"
    done = run_check(tmp_path, {"PYTHON": str(wrapper), **limits}, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["timed_out"] == list(hung)
    for name in hung:
        stage = result["stages"][name]
        assert stage["result"] == "timeout: ran past its 4s limit" and 3 <= stage["seconds"] <= 5.5, (name, stage)
    for name in ("data_cityscapes", "data_mapillary"):
        assert result["stages"][name]["result"] == "not run: stage 'bench' failed"
    assert "gpu_check: stage 'tests' ran past its 4s limit; the measurements go on" in done.stderr
    assert "gpu_check: stage 'bench' ran past its 4s limit; the stages after it do not run" in done.stderr
    assert result["failed"] == [f"stage '{name}' ran past its 4s limit" for name in hung]
    assert done.stderr.rstrip().endswith(f"the measurements are in {out}")
    started = pids.read_text().split()
    assert len(started) == len(hung)
    for pid in started:  # killed by the script, not left running (a zombie until init collects it at most)
        stat = f"/proc/{pid}/stat"
        assert not os.path.exists(stat) or open(stat).read().rsplit(")", 1)[1].split()[0] == "Z", pid
