"""Hydra launchers beyond the basic one: SLURM through submitit (``dare_lab[slurm]``) is
exercised with ``submitit_local``, which runs the same pickled jobs as local processes."""

import csv
import os
import subprocess

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def test_submitit_local_sweep_runs_every_job(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               DARE_LAB_CACHE=str(tmp_path / "cache"), DARE_LAB_RESULTS=str(tmp_path / "results"))
    sweep = tmp_path / "sweep"
    cmd = ["dare-lab", "-m", "modelpool=tiny_bert", "method.drop_rate=0.0,0.5", "hydra/launcher=submitit_local",
           f"hydra.sweep.dir={sweep}", "output.progress=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert ["method.drop_rate=0.0" in rows[0]["overrides"], "method.drop_rate=0.5" in rows[1]["overrides"]] == [True, True]
    for job in ("0", "1"):
        assert (sweep / job / "merged" / "model.safetensors").exists()
