"""Summaries read like a paper table: a column per swept key, a column per metric."""

import json
import os
import subprocess

import pytest
from omegaconf import OmegaConf

from dare_lab.tracking import read_csv
from dare_lab.tracking.summaries import collect_sweep, swept_columns, write_summary, write_sweep_summary


def _job(sweep, num, overrides, metrics):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    (job / "metrics.json").write_text(json.dumps(metrics))
    (job / "run.json").write_text(json.dumps({"run_id": f"id{num}"}))


def test_sweep_summary_has_a_column_per_swept_key(tmp_path):
    for i, (p, seed) in enumerate([(0.0, 0), (0.9, 0), (0.9, 1)]):
        _job(tmp_path, i, ["modelpool=tiny_bert", f"method.drop_rate={p}", f"+method.seed={seed}"],
             {"a/accuracy": 0.5 + i / 10, "method": "dare_task_arithmetic"})
    md = write_sweep_summary(tmp_path).read_text().splitlines()
    assert md[0] == "| job | drop_rate | seed | a/accuracy | method |"
    assert md[2:] == ["| 0 | 0.0 | 0 | 0.5 | dare_task_arithmetic |", "| 1 | 0.9 | 0 | 0.6 | dare_task_arithmetic |",
                      "| 2 | 0.9 | 1 | 0.7 | dare_task_arithmetic |"]
    rows = read_csv(tmp_path / "summary.csv")
    assert list(rows[0]) == ["job", "drop_rate", "seed", "a/accuracy", "method", "overrides", "run_id"]
    assert rows[2]["overrides"] == "modelpool=tiny_bert method.drop_rate=0.9 +method.seed=1" and rows[2]["run_id"] == "id2"


def test_swept_key_names_stay_whole_where_their_last_part_repeats(tmp_path):
    _job(tmp_path, 0, ["method.seed=0", "train.seed=1"], {"x": 1.0})
    _job(tmp_path, 1, ["method.seed=1", "train.seed=2"], {"x": 2.0})
    assert swept_columns(collect_sweep(tmp_path)) == {"method.seed": "method.seed", "train.seed": "train.seed"}


def test_experiment_summary_with_many_metrics_is_long_in_markdown(tmp_path):
    for run, frac in (("r0", 0.5), ("r1", 1.0)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "config.json").write_text(json.dumps({"analysis": {"fraction": frac}, "same": 1}))
        (tmp_path / run / "metrics.json").write_text(json.dumps({f"m{i}": float(i) for i in range(13)}))
    write_summary(tmp_path)
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "| run | analysis.fraction | metric | value |" and len(md) == 2 + 2 * 13
    assert md[2] == "| r0 | 0.5 | m0 | 0 |"
    assert len(read_csv(tmp_path / "summary.csv")[0]) == 2 + 13  # the CSV stays wide


def test_pivot_on_a_swept_key_gives_a_column_per_value(tmp_path):
    for i, (method, p) in enumerate([("dare", 0.0), ("dare", 0.9), ("mp", 0.0), ("mp", 0.9)]):
        _job(tmp_path, i, [f"method={method}", f"method.drop_rate={p}"], {"a/acc": 0.5 + i / 10, "b/acc": 0.1 * i})
    write_sweep_summary(tmp_path, pivot="method.drop_rate")
    md = (tmp_path / "summary_by_drop_rate.md").read_text().splitlines()
    assert md[0] == "| method | metric | drop_rate=0.0 | drop_rate=0.9 |"
    assert md[2:] == ["| dare | a/acc | 0.5 | 0.6 |", "| dare | b/acc | 0 | 0.1 |", "| mp | a/acc | 0.7 | 0.8 |",
                      "| mp | b/acc | 0.2 | 0.3 |"]
    with pytest.raises(ValueError, match=r"summary.pivot='seed' is not a swept key of this sweep; swept: \['method', 'drop_rate'\]"):
        write_sweep_summary(tmp_path, pivot="seed")


def test_cli_sweep_with_a_pivot_and_a_bad_pivot(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", DARE_LAB_CACHE=str(tmp_path / "cache"))
    base = ["dare-lab", "-m", "modelpool=tiny_bert", "method.drop_rate=0.0,0.5", "method.seed=0,1", "output.progress=false"]
    ok = subprocess.run([*base, "summary.pivot=drop_rate", f"hydra.sweep.dir={tmp_path / 's'}"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    wide = (tmp_path / "s" / "summary_by_drop_rate.md").read_text().splitlines()
    assert wide[0] == "| seed | metric | drop_rate=0.0 | drop_rate=0.5 |" and len(wide) == 2 + 2  # 2 seeds × merge/seconds
    bad = subprocess.run([*base, "summary.pivot=scaling", f"hydra.sweep.dir={tmp_path / 'b'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "summary.pivot='scaling' is not a swept key" in bad.stderr
    assert not (tmp_path / "b" / "0").exists()  # refused before job 0
