"""scripts/slurm/table3.sbatch on a real one-node SLURM cluster (tests/slurm_cluster.py): the three trainings as
array tasks 0-2, then the dependent job that measures, evaluates and writes the table. Skipped, with the reason,
where SLURM is missing or cannot run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.scripts.experiments.test_table3 import EXPECTED, tiny_overrides
from tests.slurm_cluster import started_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
ONE_TASK = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=20"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started_cluster(tmp_path_factory, "slurm")


def test_table3_array_then_the_table(cluster, tmp_path):
    env = {**cluster.env(), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = tmp_path / "t3"
    args = [str(out), *tiny_overrides(tmp_path / "data")]
    array = cluster.sbatch(*ONE_TASK, "--array=0-2", f"--output={tmp_path}/train-%a.out",
                           "scripts/slurm/table3.sbatch", *args, cwd=ROOT, env=env)
    final = cluster.sbatch(*ONE_TASK, f"--dependency=afterok:{array}", f"--output={tmp_path}/final.out",
                           "scripts/slurm/table3.sbatch", *args, cwd=ROOT, env=env)
    for task, model in enumerate(("single", "explicit", "hierarchical")):
        info = cluster.wait_job(f"{array}_{task}", timeout=600)
        text = (tmp_path / f"train-{task}.out").read_text()
        assert info["JobState"] == "COMPLETED", text[-3000:] + cluster.logs(15)
        assert f"training the {model} model of Table 3" in text
        assert (out / "runs" / model / "ckpt_00000002.pth").exists()
    info = cluster.wait_job(final, timeout=900)
    text = (tmp_path / "final.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:] + cluster.logs(15)
    rows = json.loads((out / "table3.json").read_text())
    assert [(r["method"], r["train_scales"], r["eval_scales"]) for r in rows] == EXPECTED
    assert (out / "table3.md").exists() and (out / "table3.png").exists()
