"""Resumable sweeps: kill a sweep twice (once between a job's results and its registry entry,
once in the middle of a merge), relaunch it, and get the summary of an uninterrupted run —
every row once, none lost. ``resume.force=true`` reruns everything. No secret is written."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from dare_lab.shell import cli

SECRET_OVERRIDE = "sk-SWEEPSECRET123456"
SECRET_ENV = "wandbkey-SECRET-abcdef0123"

CHILD = r"""
import os, sys, time, threading
lock = threading.Lock()
def say(text):
    with lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
_pwrite = os.pwrite
def slow_pwrite(fd, data, offset):
    say("W")
    time.sleep(0.01)
    return _pwrite(fd, data, offset)
os.pwrite = slow_pwrite
import dare_lab.shell.cli as cli
_record = cli.record_complete
def slow_record(*a, **k):
    say("REC")
    time.sleep(0.2)
    out = _record(*a, **k)
    say("REC done")
    return out
cli.record_complete = slow_record
sys.argv = ["dare-lab", *sys.argv[1:]]
cli.main()
"""

DROP_RATES = ("0.1", "0.3", "0.5")


def sweep_args(pool, sweep_dir):
    return ["-m", "modelpool=custom", f"modelpool.base={pool.base}",
            f"+modelpool.models={{a: {pool.models['ft0']}, b: {pool.models['ft1']}}}",
            f"method.drop_rate={','.join(DROP_RATES)}", "output.progress=false",
            f"+secrets.api_key={SECRET_OVERRIDE}", f"hydra.sweep.dir={sweep_dir}"]


def run_in_process(args, cwd, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["dare-lab", *args])
    GlobalHydra.instance().clear()
    try:
        cli.main()
    finally:
        GlobalHydra.instance().clear()
    return capsys.readouterr().out


def kill_child(args, cwd, trigger, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "WANDB_API_KEY": SECRET_ENV,
           "OMP_NUM_THREADS": "1", "DARE_LAB_CACHE": str(Path(cwd) / "cache"),
           "DARE_LAB_SKIP_PRECHECK": "1"}  # the override pre-check is tested in test_reliability_bad_input
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            seen.append(line.rstrip())
            if trigger(seen) or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    return seen


def summary_rows(sweep_dir):
    with open(Path(sweep_dir) / "summary.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in csv.DictReader(fh)]


def registry_entries(cwd):
    reg = Path(cwd) / "results" / "sweeps" / "default" / ".registry"
    return sorted(p.name for p in reg.iterdir() if not p.name.startswith(".")) if reg.exists() else []


def test_killed_sweep_resumes_to_the_uninterrupted_summary(tiny_bert_pool, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", SECRET_ENV)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work, ref = tmp_path / "work", tmp_path / "ref"
    work.mkdir(), ref.mkdir()
    sweep = work / "sweep"
    args = sweep_args(tiny_bert_pool, sweep)

    # kill point 1: job 1 has written metrics.json but not yet its registry entry
    seen = kill_child(args, work, lambda s: s[-1] == "REC" and s.count("REC") == 2)
    assert seen[-1] == "REC", seen[-20:]
    assert len(registry_entries(work)) == 1
    assert (sweep / "1" / "metrics.json").exists()
    assert len(summary_rows(sweep)) == 1  # the table of the jobs it finished

    # kill point 2: relaunched, job 0 is skipped, job 1 redone, killed in the middle of job 2's merge
    def mid_job2(s):
        done = [i for i, line in enumerate(s) if "dare-lab: results in" in line and line.rstrip().endswith("/1 (config.yaml, metrics.json)")]
        return bool(done) and s[-1] == "W" and s[done[0]:].count("W") >= 3

    seen = kill_child(args, work, mid_job2)
    assert any("is already complete" in line for line in seen), seen[-20:]
    assert seen[-1] == "W", seen[-20:]
    assert len(registry_entries(work)) == 2
    assert not (sweep / "2" / "merged").exists() and list((sweep / "2").glob(".merged.tmp-*"))

    # relaunch to completion (in process), and an uninterrupted reference sweep elsewhere
    out = run_in_process(args, work, monkeypatch, capsys)
    assert out.count("is already complete") == 2 and out.count("dare-lab: results in") == 1
    assert not list((sweep / "2").glob(".merged.tmp-*"))  # the killed attempt's leftovers are gone
    run_in_process(sweep_args(tiny_bert_pool, ref / "sweep"), ref, monkeypatch, capsys)

    resumed, uninterrupted = summary_rows(sweep), summary_rows(ref / "sweep")
    assert resumed == uninterrupted
    assert [r["job"] for r in resumed] == ["0", "1", "2"]
    assert len({r["run_id"] for r in resumed}) == 3
    assert registry_entries(work) == sorted(r["run_id"] for r in resumed) == registry_entries(ref)
    for job in range(3):
        info = json.loads((sweep / str(job) / "run.json").read_text())
        assert info["status"] == "complete" and info["run_id"] == resumed[job]["run_id"]

    # resume.force=true reruns every job; the table still has one row per job
    out = run_in_process([*args, "resume.force=true"], work, monkeypatch, capsys)
    assert "is already complete" not in out and out.count("dare-lab: results in") == 3
    assert len(summary_rows(sweep)) == 3 and len(registry_entries(work)) == 3

    # relaunched into a new sweep directory (the default: a new timestamp): every job skipped, same table
    out = run_in_process(sweep_args(tiny_bert_pool, work / "sweep2"), work, monkeypatch, capsys)
    assert out.count("is already complete") == 3
    assert summary_rows(work / "sweep2") == uninterrupted

    # no secret anywhere in results, configs or logs
    for root in (work, ref):
        for f in root.rglob("*"):
            if f.is_file() and "cache" not in f.parts:
                text = f.read_text(errors="replace")
                assert SECRET_OVERRIDE not in text and SECRET_ENV not in text, f
    assert "secrets.api_key=***" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text().replace("- +", "")


def test_a_rerun_clears_the_killed_attempts_tracker_files_only_for_the_same_run(tmp_path):
    """A killed job's tracker files (metrics history, tables, plots, W&B offline run) are the
    same run's: its rerun starts them afresh instead of appending; another run's stay."""
    from omegaconf import OmegaConf

    def job_dir(name, rid):
        d = tmp_path / name
        (d / "tables").mkdir(parents=True)
        (d / "tables" / "metrics.csv").write_text("metric,value\n")
        (d / "wandb" / "offline-run-1").mkdir(parents=True)
        (d / "metrics_history.jsonl").write_text('{"step": 0}\n')
        (d / "run.json").write_text(json.dumps({"run_id": rid}))
        (d / "notes.txt").write_text("the user's")
        return d

    cfg = OmegaConf.create({"output": {"model_dir": None}})
    mine = job_dir("mine", "rid-a")
    cli.clear_leftovers(mine, cfg, "rid-a")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    other = job_dir("other", "rid-b")
    cli.clear_leftovers(other, cfg, "rid-a")
    assert sorted(p.name for p in other.iterdir()) == ["metrics_history.jsonl", "notes.txt", "run.json", "tables", "wandb"]
