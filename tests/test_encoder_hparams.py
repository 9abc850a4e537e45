"""Table 5 sweeps: presets compose, a tiny multirun reports validation + test, select_best picks on validation."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dare_lab.taskpool.classification import select_best
from dare_lab.train.tiny import make_tiny_bert, polarity_rows, write_csv

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_presets_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for preset, method in [("ties", "ties"), ("dare_ties", "dare_ties"), ("regmean", "regmean"),
                               ("dare_fisher", "dare_fisher"), ("task_arithmetic", "task_arithmetic")]:
            cfg = compose("config", overrides=[f"method={method}", f"+hparams={preset}", "taskpool=classification"],
                          return_hydra_config=True)
            params = cfg.hydra.sweeper.params
            assert cfg.taskpool.also_splits == ["validation"]
            for key in params:
                assert key.split(".", 1)[1] in cfg.method, (preset, key)
        cfg = compose("config", overrides=["method=dare_ties", "+hparams=dare_ties"], return_hydra_config=True)
        assert cfg.hydra.sweeper.params["method.drop_rate"] == "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
        assert cfg.hydra.sweeper.params["method.retain_ratio"] == "0.1,0.2,0.3"
        cfg = compose("config", overrides=["method=ties", "+hparams=[ties,joblib]"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
        assert cfg.hydra.sweeper.params["method.scaling"] == "0.1,0.3,0.5,0.7,0.9,1.0"


def test_select_best_uses_validation_and_reports_test(tmp_path):
    rows = [
        {"job": "0", "overrides": "method.scaling=0.1", "a/accuracy": 0.9, "a/validation_accuracy": 0.5, "b/accuracy": 0.9,
         "b/validation_accuracy": 0.5},
        {"job": "1", "overrides": "method.scaling=0.5", "a/accuracy": 0.6, "a/validation_accuracy": 0.8, "b/accuracy": 0.7,
         "b/validation_accuracy": 0.7},
        {"job": "2", "overrides": "method.scaling=1.0", "a/accuracy": 0.8, "a/validation_accuracy": 0.9, "b/accuracy": 0.1,
         "b/validation_accuracy": 0.4},
    ]
    with open(tmp_path / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best = select_best(tmp_path)
    assert best["job"] == "1" and best["validation_score"] == pytest.approx(0.75)  # not the best on test (job 0)
    assert best["test"] == {"a/accuracy": 0.6, "b/accuracy": 0.7}
    assert json.loads((tmp_path / "best.json").read_text())["job"] == "1"
    with pytest.raises(FileNotFoundError, match="summary.csv"):
        select_best(tmp_path / "nothing")


@pytest.mark.skipif(not any(Path(p, "dare-lab").exists() for p in os.environ.get("PATH", "").split(os.pathsep)),
                    reason="dare-lab entry point not installed")
def test_tiny_multirun_end_to_end(tmp_path):
    base = make_tiny_bert(tmp_path / "base", num_labels=2, seed=0)
    a = make_tiny_bert(tmp_path / "a", num_labels=2, seed=1)
    b = make_tiny_bert(tmp_path / "b", num_labels=2, seed=2)
    train = write_csv(polarity_rows(40, 1), tmp_path / "train.csv")
    test = write_csv(polarity_rows(20, 2), tmp_path / "test.csv")
    task = "{files: {train: %s, test: %s}, labels: [neg, pos], max_length: 16}" % (train, test)
    cmd = ["dare-lab", "-m", "modelpool=custom", f"modelpool.base={base}", f"+modelpool.models={{a: {a}, b: {b}}}",
           "method=task_arithmetic", "+hparams=task_arithmetic", "method.scaling=0.5,1.0",
           "taskpool=classification", f"taskpool.tasks=[{task[:-1]}, name: a}}, {task[:-1]}, name: b}}]",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", "output.progress=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = select_best(tmp_path / "sweep")
    assert best["trials"] == 2
    assert set(best["test"]) == {"a/accuracy", "b/accuracy"}
