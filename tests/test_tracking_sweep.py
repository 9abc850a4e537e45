"""A Hydra sweep of an analysis program: one local run per job, joined in summary.csv."""

import os
import subprocess
import sys

from dare_lab.tracking import read_csv


def test_multirun_jobs_are_joined_in_the_experiment_summary(tmp_path):
    env = dict(os.environ, DARE_LAB_RESULTS=str(tmp_path / "results"), DARE_LAB_CACHE=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "dare_lab.shell.cli", "-m", "+experiment=table6_delta_ranges",
                           "modelpool=tiny_bert", "analysis.fraction=0.5,1.0", "analysis.models=[ft0]"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    exp = tmp_path / "results" / "table6_delta_ranges"
    rows = read_csv(exp / "summary.csv")
    assert len(rows) == 2
    assert sorted(r["analysis.fraction"] for r in rows) == ["0.5", "1.0"]
    assert {r["run"] for r in rows} == {"0_analysis.fraction=0.5,analysis.models=_ft0_,modelpool=tiny_bert",
                                        "1_analysis.fraction=1.0,analysis.models=_ft0_,modelpool=tiny_bert"}
    by = {r["analysis.fraction"]: r for r in rows}
    assert float(by["1.0"]["ft0/n_sampled"]) == float(by["1.0"]["ft0/n_total"])
    assert float(by["0.5"]["ft0/n_sampled"]) < float(by["0.5"]["ft0/n_total"])
    assert (exp / "summary.md").read_text().startswith("| run |")
    for r in rows:
        assert (exp / r["run"] / "tables" / "table6_deltas.csv").exists()
