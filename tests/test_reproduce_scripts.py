"""Every item of scripts/reproduce.sh runs end to end in its fast mode (tiny pool) and writes a
sane table and PNG under results/<experiment>/."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dare_lab_cache")  # the tiny pool is built once for all scripts


def _run(item: str, tmp_path: Path, cache_dir: Path) -> tuple[str, Path]:
    env = dict(os.environ, DARE_LAB_RESULTS=str(tmp_path / "results"), DARE_LAB_CACHE=str(cache_dir),
               PYTHON=sys.executable, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce.sh"), item, "--fast", "run_name=t"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, tmp_path / "results"


def _csv(path: Path) -> list[dict[str, str]]:
    assert path.exists(), path
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000, path


def test_every_paper_item_has_an_entry():
    expected = {"fig3_redundancy", "fig6_embedding_similarity", "fig8_droponly", "fig9_magnitude",
                "table6_delta_ranges", "fig11_finetuned_params", "table1_merge", "sparsifiers"}
    items = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce.sh"), "--list"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert set(items) == expected
    assert {p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")} >= expected


def test_unknown_item_is_one_line_exit_2():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce.sh"), "fig99"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: scripts/reproduce.sh <item>")


@pytest.mark.parametrize("script,experiment,methods", [
    ("fig3_redundancy", "fig3_redundancy", {"dare", "drop_only", "magnitude"}),
    ("fig8_droponly", "fig8_droponly", {"dare", "drop_only"}),
    ("fig9_magnitude", "fig9_magnitude", {"dare", "magnitude"}),
    ("fig11_finetuned_params", "fig11_finetuned_params", {"dare", "magnitude"}),
    ("sparsifiers", "sparsifiers", {"dare", "drop_only", "magnitude", "della", "breadcrumbs", "darex"}),
])
def test_redundancy_scripts(script, experiment, methods, tmp_path, cache_dir):
    out, res = _run(script, tmp_path, cache_dir)
    run = res / experiment / "t"
    rows = _csv(run / "tables" / "redundancy.csv")
    assert {r["method"] for r in rows} == methods and {r["model"] for r in rows} == {"ft0", "ft1"}
    for r in rows:
        v, s = float(r["mean"]), float(r["std"])
        assert -1.0 <= v <= 1.0 and s >= 0.0
        if float(r["p"]) == 0.0:
            assert v == pytest.approx(1.0, abs=1e-6)  # the SFT model agrees with itself
    target = "finetuned" if "fig11" in script else "delta"
    assert {r["target"] for r in _csv(run / "tables" / "redundancy_raw.csv")} == {target}
    wide = (run / "tables" / "redundancy_wide.md").read_text()
    assert wide.startswith("| model | metric | method | p=0 |") and wide.count("\n") == 2 + 2 * 2 * len(methods)
    for m in ("ft0", "ft1"):
        _png(run / "plots" / f"redundancy_{m}_{m}_agreement.png")
    assert "Paper reference" in out and "redundancy" in out


def test_fig6_embedding_similarity_script(tmp_path, cache_dir):
    out, res = _run("fig6_embedding_similarity", tmp_path, cache_dir)
    run = res / "fig6_embedding_similarity" / "t"
    rows = _csv(run / "tables" / "similarity_layers.csv")
    assert len(rows) == 2 * 2 * 3  # models × methods × p
    for r in rows:
        cells = [float(v.split("±")[0]) for k, v in r.items() if k.startswith("L")]
        assert len(cells) == 3 and all(-1 <= c <= 1 for c in cells)
        if float(r["p"]) == 0.0:
            assert cells == [1.0, 1.0, 1.0]
    _png(run / "plots" / "similarity_layers_ft0.png")
    _png(run / "plots" / "similarity_last_layer_ft0.png")
    assert "drop_only p=0.5: paper 0.85 | ours" in out


def test_table6_delta_ranges_script(tmp_path, cache_dir):
    out, res = _run("table6_delta_ranges", tmp_path, cache_dir)
    run = res / "table6_delta_ranges" / "t"
    rows = _csv(run / "tables" / "table6_deltas.csv")
    assert [r["model"] for r in rows] == ["ft0", "ft1"]
    for r in rows:
        q = [float(r[f"{i * 10}%"]) for i in range(11)]
        assert q == sorted(q) and q[0] < 0 < q[-1] and q[-1] < 0.1  # tiny pool: base + N(0, 0.01²)
    verdicts = (run / "verdict.txt").read_text()
    assert verdicts.count("98% of deltas within") == 2
    _png(run / "plots" / "delta_abs_hist.png")
    assert "Table 6 format" in out


def test_table1_merge_script(tmp_path, cache_dir):
    out, res = _run("table1_merge", tmp_path, cache_dir)
    (run,) = list((res / "table1_merge").iterdir())
    rows = _csv(run / "tables" / "table1_merge.csv")
    assert [r["method"] for r in rows] == ["task_arithmetic", "dare_task_arithmetic", "ties", "dare_ties"]
    assert all(0.0 <= float(r["ft0/agreement"]) <= 1.0 for r in rows)
    _png(run / "plots" / "table1_merge.png")
    assert "66.3" in out


def test_one_results_tree_per_run_printed_once(tmp_path, cache_dir):
    """An analysis run's record (config, metrics) and its tables and plots share one directory,
    results/<item>/<run_name>/, which is printed once; the experiment summary joins its runs."""
    out, res = _run("table6_delta_ranges", tmp_path, cache_dir)
    run = res / "table6_delta_ranges" / "t"
    assert {"config.yaml", "metrics.json", "run.json", "tables", "plots"} <= {p.name for p in run.iterdir()}
    assert [p.name for p in res.iterdir()] == ["table6_delta_ranges"]  # no second tree
    lines = [line for line in out.splitlines() if "results" in line.split(str(run))[0] and str(run) in line]
    assert lines == [f"dare-lab: results in {run} (config.yaml, metrics.json, tables/, plots/)"], lines
    rows = _csv(res / "table6_delta_ranges" / "summary.csv")
    assert [r["run"] for r in rows] == ["t"] and float(rows[0]["ft0/n_total"]) > 0
