"""Trackers: local results are complete with or without W&B; W&B offline logs its tables; no network."""

import json
from pathlib import Path

import pytest

from dare_lab import tracking
from dare_lab.analysis.plots import line_plot
from dare_lab.tracking import LocalTracker, NullTracker, WandbTracker, read_csv, resolve_mode, write_summary


def _log_everything(t, tmp_path):
    png = line_plot(tmp_path / "img.png", [0, 1], {"a": [1, 2]})
    t.start(experiment="exp", run_name="r1", config={"analysis": {"p": 0.5}, "seed": 1})
    t.log_metrics({"acc": 0.75, "loss": 1.5})
    t.log_table("curve", [{"p": 0.0, "score": 1.0}, {"p": 0.9, "score": 0.5}])
    t.log_line("line", [0.0, 0.5], {"dare": [1.0, 0.9], "drop_only": [1.0, 0.7]}, xname="p", yname="acc")
    t.log_image("img", png)
    t.finish(summary={"best": 0.9})
    t.finish()  # idempotent


def _assert_local_complete(run: Path):
    assert json.loads((run / "config.json").read_text())["analysis"]["p"] == 0.5
    assert "analysis" in (run / "config.yaml").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == {"acc": 0.75, "loss": 1.5, "best": 0.9}
    assert read_csv(run / "tables" / "curve.csv") == [{"p": "0.0", "score": "1.0"}, {"p": "0.9", "score": "0.5"}]
    assert (run / "tables" / "curve.md").read_text().startswith("| p | score |")
    assert read_csv(run / "lines" / "line.csv")[1] == {"p": "0.5", "dare": "0.9", "drop_only": "0.7"}
    for png in ("line.png", "img.png"):
        assert (run / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = read_csv(run.parent / "summary.csv")
    assert summary[0]["run"] == run.name and summary[0]["acc"] == "0.75"


def test_local_tracker_writes_everything(tmp_path, no_network):
    t = LocalTracker(root=tmp_path / "results")
    _log_everything(t, tmp_path)
    assert t.run_dir == tmp_path / "results" / "exp" / "r1"
    _assert_local_complete(t.run_dir)


def test_wandb_offline_creates_run_with_table(tmp_path, no_network):
    t = WandbTracker(mode="offline", root=tmp_path / "results")
    _log_everything(t, tmp_path)
    _assert_local_complete(tmp_path / "results" / "exp" / "r1")
    runs = list((tmp_path / "results" / "exp" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    tables = list(runs[0].glob("files/media/table/curve_*.table.json"))
    assert tables, sorted(p.name for p in runs[0].rglob("*"))
    data = json.loads(tables[0].read_text())
    assert data["columns"] == ["p", "score"] and data["data"] == [[0.0, 1.0], [0.9, 0.5]]
    assert list(runs[0].glob("files/media/images/img_*.png"))


def test_wandb_disabled_still_writes_local_results(tmp_path, no_network):
    t = WandbTracker(mode="disabled", root=tmp_path / "results")
    _log_everything(t, tmp_path)
    _assert_local_complete(tmp_path / "results" / "exp" / "r1")
    assert not (tmp_path / "results" / "exp" / "wandb").exists() or not list((tmp_path / "results" / "exp" / "wandb").glob("offline-run-*"))


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled"
    assert resolve_mode("offline") == "offline"
    with pytest.raises(ValueError):
        resolve_mode("sometimes")


def test_sweep_summary_joins_runs_and_shows_swept_keys(tmp_path):
    for i, p in enumerate([0.1, 0.9]):
        t = LocalTracker(root=tmp_path, experiment="sweep", run_name=f"job{i}")
        t.start(config={"method": {"drop_rate": p}, "seed": 0})
        t.log_metrics({"acc": 1 - p})
        t.finish()
    rows = read_csv(tmp_path / "sweep" / "summary.csv")
    assert [r["run"] for r in rows] == ["job0", "job1"]
    assert [r["method.drop_rate"] for r in rows] == ["0.1", "0.9"] and "seed" not in rows[0]
    assert [float(r["acc"]) for r in rows] == pytest.approx([0.9, 0.1])
    assert not list((tmp_path / "sweep").glob(".*.tmp"))
    assert write_summary(tmp_path / "empty") is None


def test_from_config_null_tracker_and_current(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"experiment_name": "e", "tracker": {"_target_": "dare_lab.tracking.LocalTracker",
                                                                "root": str(tmp_path)}})
    t = tracking.from_config(cfg, run_name="x")
    assert isinstance(t, LocalTracker) and tracking.current() is t and t.run_dir == tmp_path / "e" / "x"
    t.finish()
    assert tracking.current() is None
    n = NullTracker()
    n.log_metrics({"a": 1})
    n.finish()
    assert n.run_dir is None


def test_tracker_configs_compose(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    cfg_dir = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.3"):
        for name, cls in (("wandb", WandbTracker), ("local", LocalTracker)):
            cfg = compose("config", overrides=[f"tracker={name}", "+experiment=fig3_redundancy"])
            t = instantiate(cfg.tracker)
            assert isinstance(t, cls)
            assert cfg.program == "dare_lab.programs.redundancy:run"


def test_program_with_wandb_offline_and_with_null_tracker(tmp_path, no_network, monkeypatch):
    """An analysis program under tracker=wandb (offline) logs to W&B and keeps local results;
    under a NullTracker it still writes complete local results."""
    from hydra import compose, initialize_config_dir

    from dare_lab.programs import delta_stats

    monkeypatch.setenv("DARE_LAB_RESULTS", str(tmp_path / "results"))
    cfg_dir = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.3"):
        for tracker, run in (("wandb", "wb"), ("none", "quiet")):
            extra = ["tracker.mode=offline"] if tracker == "wandb" else ["+tracker._target_=dare_lab.tracking.NullTracker"]
            cfg = compose("config", overrides=["+experiment=table6_delta_ranges", f"tracker={tracker}", *extra,
                                               f"cache_dir={tmp_path / 'cache'}", f"run_name={run}", "analysis.fraction=1.0"])
            metrics = delta_stats.run(cfg)
            local = tmp_path / "results" / "table6_delta_ranges" / run
            assert metrics["results_dir"] == str(local)
            rows = read_csv(local / "tables" / "table6_deltas.csv")
            assert [r["model"] for r in rows] == ["ft0", "ft1"]
            assert (local / "plots" / "delta_abs_hist.png").read_bytes()[:4] == b"\x89PNG"
            assert json.loads((local / "metrics.json").read_text())["ft0/n_total"] > 0
            assert tracking.current() is None
    runs = list((tmp_path / "results" / "table6_delta_ranges" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("files/media/table/table6_deltas_*.table.json"))
    assert list(runs[0].glob("files/media/images/delta_abs_hist_*.png"))


def test_result_files_get_the_umask_mode_not_owner_only(tmp_path):
    """mkstemp alone makes 0600 files; results must read like a plain open() would write them."""
    import os

    from dare_lab.tracking.files import atomic_write

    umask = os.umask(0o022)
    os.umask(umask)
    p = atomic_write(tmp_path / "metrics.json", "{}")
    assert (p.stat().st_mode & 0o777) == 0o666 & ~umask
