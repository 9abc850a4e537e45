"""scripts/paper_comparison.py on a small fake results tree: exact rows and verdicts."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper_comparison.py"


def _write(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


RED_HEADER = "model,metric,method,p,mean,std,n_seeds"


def _fake_tree(root: Path) -> None:
    # encoder: DARE keeps SFT at 0.9, DropOnly and MP fall behind
    _write(root / "fig3_redundancy" / "demo" / "tables" / "redundancy.csv", RED_HEADER, [
        "a,a/accuracy,dare,0.0,0.800,0.0,1", "a,a/macro_f1,dare,0.0,0.5,0.0,1",
        "a,a/accuracy,dare,0.9,0.795,0.004,3", "a,a/accuracy,dare,0.99,0.700,0.010,3",
        "a,a/accuracy,drop_only,0.9,0.400,0.020,3", "a,a/accuracy,magnitude,0.9,0.790,0.0,1"])
    # decoder: two models run separately (one run directory each); model b loses at p=0.9
    _write(root / "decoder_fig3_redundancy" / "run_a" / "tables" / "redundancy.csv", RED_HEADER, [
        "a,a/accuracy,dare,0.0,0.600,0.0,1", "a,a/accuracy,dare,0.9,0.600,0.0,2",
        "a,a/accuracy,drop_only,0.9,0.300,0.0,2"])
    _write(root / "decoder_fig3_redundancy" / "run_b" / "tables" / "redundancy.csv", RED_HEADER, [
        "b,b/accuracy,dare,0.0,0.900,0.0,1", "b,b/accuracy,dare,0.9,0.500,0.050,2",
        "b,b/accuracy,drop_only,0.9,0.450,0.0,2"])
    _write(root / "fig6_embedding_similarity" / "demo" / "tables" / "similarity_last_layer.csv",
           "model,method,p,mean,q10,median,q90,share_below_0.9", [
               "a,dare,0.5,0.99,0,0,0,0", "a,dare,0.9,0.96,0,0,0,0",
               "a,drop_only,0.5,0.80,0,0,0,0", "a,drop_only,0.9,0.50,0,0,0,0"])
    _write(root / "decoder_table1_merge" / "2026-01-01" / "tables" / "table1_merge.csv",
           "method,a/accuracy,b/accuracy,merge_seconds", [
               "sft,0.9,0.8,0", "task_arithmetic,0.5,0.7,1", "dare_task_arithmetic,0.6,0.7,1",
               "ties,0.6,0.6,1", "dare_ties,0.5,0.6,1"])
    _write(root / "table6_delta_ranges" / "demo" / "tables" / "delta_overview.csv",
           "model,min,max,typical_range", ["a,-0.004,0.003,0.0015"])


def _run(root: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), "--out", str(out)],
                          capture_output=True, text=True)


def _row(md: str, start: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {start}"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_rows_and_verdicts(tmp_path):
    root, out = tmp_path / "paper", tmp_path / "cmp.md"
    _fake_tree(root)
    r = _run(root, out)
    assert r.returncode == 0, r.stderr
    md = out.read_text()
    fig3 = _row(md, "Fig. 3/4: DARE keeps")
    assert fig3[2] == "a: SFT 0.800, DARE p=0.9 0.795±0.004" and fig3[3] == "holds"
    assert fig3[4] == "a: SFT 0.600, DARE p=0.9 0.600±0.000; b: SFT 0.900, DARE p=0.9 0.500±0.050"
    assert fig3[5] == "holds for some models"
    p99 = _row(md, "Fig. 3/4: … and 99%")
    assert p99[3] == "does not hold" and p99[5] == "not measured"
    fig8 = _row(md, "Fig. 8")
    assert fig8[2] == "a: p=0.9 0.795±0.004 vs 0.400±0.020" and fig8[3] == "holds"
    assert fig8[5] == "holds"  # a: 0.600 vs 0.300, b: 0.500 vs 0.450 (both more than 0.01 apart)
    fig9 = _row(md, "Fig. 9")
    assert fig9[3] == "does not hold"  # 0.795 vs 0.790: within the tolerance
    fig6 = _row(md, "Fig. 6")
    assert fig6[2] == "DARE 0.990 / 0.960; DropOnly 0.800 / 0.500 (p=0.5 / 0.9)" and fig6[3].startswith("holds")
    assert fig6[5] == "not measured"
    t1 = _row(md, "Table 1")
    assert t1[3] == "not measured"
    assert t1[4] == ("mean accuracy over tasks: task_arithmetic 0.600 → +DARE 0.650; ties 0.600 → +DARE 0.550 "
                     "(each task's own SFT model: 0.850)")
    assert t1[5] == "partly (DARE improves task_arithmetic, worsens ties)"
    t6 = _row(md, "Table 6")
    assert t6[2] == "a: 98% within ±0.0015, max \\|δ\\| 0.0040" and t6[3].startswith("holds")
    assert "size_finding" not in md  # no size row without its directory
    assert _row(md, "§4.6")[2:] == ["not measured"] * 4


def test_large_delta_row(tmp_path):
    root, out = tmp_path / "paper", tmp_path / "cmp.md"
    _fake_tree(root)   # ordinary encoder pool: a keeps 0.795 / 0.800 at p=0.9, 0.700 / 0.800 at p=0.99
    d = root / "large_delta"
    _write(d / "table6" / "tables" / "delta_overview.csv", "model,min,max,typical_range",
           ["a,-0.04,0.05,0.021", "b,-0.03,0.02,0.012", "c,-0.003,0.002,0.0012"])
    _write(d / "fig3" / "tables" / "redundancy.csv", RED_HEADER, [
        "a,a/accuracy,dare,0.0,0.800,0.0,1", "a,a/accuracy,dare,0.5,0.780,0.004,3", "a,a/accuracy,dare,0.9,0.640,0.020,3",
        "a,a/accuracy,dare,0.99,0.400,0.050,3",
        "b,b/accuracy,dare,0.0,0.900,0.0,1", "b,b/accuracy,dare,0.5,0.450,0.0,3",
        "c,c/accuracy,dare,0.0,0.900,0.0,1", "c,c/accuracy,dare,0.5,0.900,0.0,3"])
    assert _run(root, out).returncode == 0
    row = _row(out.read_text(), "§4.6")
    assert row[2] == ("a: 98% within ±0.0210, max \\|δ\\| 0.0500; DARE / SFT at p=0.5/0.9/0.99: 0.97 / 0.80 / 0.50 "
                      "(demo recipe: – / 0.99 / 0.87); b: 98% within ±0.0120, max \\|δ\\| 0.0300; DARE / SFT at p=0.5: 0.50; "
                      "c: 98% within ±0.0012, max \\|δ\\| 0.0030; DARE / SFT at p=0.5: 1.00")
    assert row[3] == ("partly on a (no collapse by p=0.5; degrades earlier, e.g. at p=0.99); holds on b; "
                      "not comparable (c: deltas within 0.005)")
    assert row[4:] == ["not measured", "not measured"]


def test_size_finding_row_when_present(tmp_path):
    root, out, d = _size_dir(tmp_path)
    (d / "verdict.txt").write_text("mpnet keeps its score to p=0.99, MiniLM to p=0.9: the size claim holds\n")
    assert _run(root, out).returncode == 0
    row = _row(out.read_text(), "Fig. 3/4: larger models")
    assert row[2] == "size_finding/verdict.txt: mpnet keeps its score to p=0.99, MiniLM to p=0.9: the size claim holds"
    assert row[3] == "holds"


def test_missing_tree_is_one_line_error(tmp_path):
    r = _run(tmp_path / "nope", tmp_path / "x.md")
    assert r.returncode == 2 and r.stderr.strip() == f"paper_comparison: results tree {tmp_path / 'nope'} does not exist"
    assert not (tmp_path / "x.md").exists()


def test_raw_tables_of_separate_seed_runs_join(tmp_path):
    root, out = tmp_path / "paper", tmp_path / "cmp.md"
    raw = "model,metric,method,p,seed,target,value"
    for run, rows in {"s0": ["a,a/accuracy,dare,0.0,0,delta,0.5", "a,a/accuracy,dare,0.9,0,delta,0.4"],
                      "s12": ["a,a/accuracy,dare,0.0,0,delta,0.5", "a,a/accuracy,dare,0.9,1,delta,0.5",
                              "a,a/accuracy,dare,0.9,2,delta,0.6", "a,a/macro_f1,dare,0.9,2,delta,0.1"]}.items():
        t = root / "decoder_fig3_redundancy" / run / "tables"
        _write(t / "redundancy_raw.csv", raw, rows)
        _write(t / "redundancy.csv", RED_HEADER, ["a,a/accuracy,dare,0.9,9.0,0.0,1"])  # ignored: raw wins
    assert _run(root, out).returncode == 0
    # seeds 0, 1, 2 at p=0.9: mean 0.5, population std sqrt(2/300) = 0.0816
    assert _row(out.read_text(), "Fig. 3/4: DARE keeps")[4] == "a: SFT 0.500, DARE p=0.9 0.500±0.082"


VERDICT_HEADER = "task,method,size,sft,last p >= 0.95,first p < 0.95,relative there,n_seeds\n"


def _size_dir(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A fake results tree with an empty size_finding/: (root, output file, size_finding dir)."""
    root, out = tmp_path / "paper", tmp_path / "cmp.md"
    _fake_tree(root)
    d = root / "size_finding"
    d.mkdir()
    return root, out, d


def test_size_row_reads_size_findings_verdict_table(tmp_path):
    root, out, d = _size_dir(tmp_path)
    (d / "verdict.csv").write_text(
        VERDICT_HEADER +
        "bbc,DARE,MPNet-base,0.79,0.9995,none (<= 0.9995),,3\n"
        "bbc,DARE,MiniLM-L6,0.56,0.9,0.99,0.93,3\n"
        "bbc,DropOnly,MPNet-base,0.79,0.0,0.9,0.72,3\n"
        "bbc,DropOnly,MiniLM-L6,0.56,0.0,0.9,0.67,3\n"
        "bbc,DARE,MiniLM-L6 full data,0.94,0.99,0.999,0.66,3\n"
        "tweets,DARE,MPNet-base,0.51,0.999,0.9995,0.86,3\n"
        "tweets,DARE,MiniLM-L6,0.34,0.9995,none (<= 0.9995),,3\n"
        "tweets,DropOnly,MPNet-base,0.51,0.9995,none (<= 0.9995),,3\n"
        "tweets,DropOnly,MiniLM-L6,0.34,0.9995,none (<= 0.9995),,3\n")
    assert _run(root, out).returncode == 0
    row = _row(out.read_text(), "Fig. 3/4: larger models")
    assert row[2] == ("bbc: DARE < 95 % of SFT from p=0.99 (MiniLM-L6) vs p=none (<= 0.9995) (MPNet-base); "
                      "tweets: DARE < 95 % of SFT from p=none (<= 0.9995) (MiniLM-L6) vs p=0.9995 (MPNet-base)")
    assert row[3] == "holds on bbc; tweets not comparable (MiniLM-L6, MPNet-base: even DropOnly keeps ≥ 95 %)"


def test_size_row_same_p_for_both_sizes_with_relative_scores(tmp_path):
    root, out, d = _size_dir(tmp_path)
    (d / "verdict.csv").write_text(
        VERDICT_HEADER +
        "bbc,DARE,MPNet-base,0.97,0.995,0.999,0.62,3\n"
        "bbc,DARE,MiniLM-L6,0.94,0.995,0.999,0.66,3\n"
        "bbc,DropOnly,MPNet-base,0.97,0.0,0.9,0.88,3\n"
        "bbc,DropOnly,MiniLM-L6,0.94,0.0,0.9,0.69,3\n")
    (d / "curves.csv").write_text(
        "size,task,metric,method,p,sft,mean,std,n_seeds\n"
        "MPNet-base,bbc,bbc/accuracy,dare,0.999,0.97,0.6214,0.1611,3\n"
        "MiniLM-L6,bbc,bbc/accuracy,dare,0.999,0.94,0.6568,0.1336,3\n")
    assert _run(root, out).returncode == 0
    row = _row(out.read_text(), "Fig. 3/4: larger models")
    assert row[2] == ("bbc: DARE < 95 % of SFT from p=0.999 (0.657±0.134 of SFT) (MiniLM-L6) vs "
                      "p=0.999 (0.621±0.161 of SFT) (MPNet-base)")
    assert row[3] == "does not hold on bbc (both sizes fall at the same p)"
