"""scripts/size_finding.py: joins fig3_redundancy runs per model size, scores relative to SFT, verdict."""
import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("size_finding", ROOT / "scripts" / "size_finding.py")
sf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sf)


def _run(tmp_path, name, rows):
    d = tmp_path / name / "tables"
    d.mkdir(parents=True)
    with open(d / "redundancy_raw.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["model", "metric", "method", "p", "seed", "target", "value"])
        w.writeheader()
        for model, method, p, seed, value in rows:
            w.writerow({"model": model, "metric": f"{model}/accuracy", "method": method, "p": p, "seed": seed,
                        "target": "delta", "value": value})
    return tmp_path / name


def test_relative_scores_and_verdict(tmp_path, capsys):
    small = _run(tmp_path, "small", [("t", "dare", 0.0, 0, 0.8), ("t", "dare", 0.9, 0, 0.8), ("t", "dare", 0.9, 1, 0.76),
                                     ("t", "dare", 0.99, 0, 0.4), ("t", "dare", 0.99, 1, 0.4),
                                     ("t", "magnitude", 0.0, 0, 0.8), ("t", "magnitude", 0.9, 0, 0.7)])
    big_a = _run(tmp_path, "big_a", [("t", "dare", 0.0, 0, 0.5), ("t", "dare", 0.9, 0, 0.5), ("t", "dare", 0.99, 0, 0.49),
                                     ("t", "magnitude", 0.9, 0, 0.5)])
    big_b = _run(tmp_path, "big_b", [("t", "dare", 0.0, 0, 0.5), ("t", "dare", 0.99, 1, 0.47)])  # more seeds, p=0 again
    only_dare = _run(tmp_path, "only_dare", [("t", "dare", 0.0, 0, 0.6), ("t", "dare", 0.9, 0, 0.3)])
    out = tmp_path / "out"
    # a size with fewer methods first: the next sizes keep all of theirs
    assert sf.main(["--out", str(out), "--run", f"A={only_dare}", "--run", f"S={small}", "--run", f"B={tmp_path}/big_*"]) == 0
    with open(out / "verdict.csv") as fh:
        v = {(r["size"], r["method"]): r for r in csv.DictReader(fh)}
    assert (v[("S", "DARE")]["last p >= 0.95"], v[("S", "DARE")]["first p < 0.95"]) == ("0.9", "0.99")
    assert v[("S", "DARE")]["relative there"] == "0.5"
    assert v[("S", "MP")]["first p < 0.95"] == "0.9"  # 0.7 / 0.8 = 0.875
    assert v[("B", "MP")]["first p < 0.95"] == "none (<= 0.9)" and ("A", "MP") not in v
    assert (v[("A", "DARE")]["last p >= 0.95"], v[("A", "DARE")]["relative there"]) == ("0.0", "0.5")
    assert v[("B", "DARE")]["first p < 0.95"] == "none (<= 0.99)" and v[("B", "DARE")]["n_seeds"] == "2"
    with open(out / "curves.csv") as fh:
        c = {(r["size"], r["method"], r["p"]): r for r in csv.DictReader(fh)}
    assert float(c[("S", "dare", "0.9")]["mean"]) == pytest.approx(0.975) and float(c[("S", "dare", "0.9")]["std"]) == pytest.approx(0.025)
    assert float(c[("B", "dare", "0.99")]["mean"]) == pytest.approx(0.96)
    assert (out / "size_finding.png").stat().st_size > 1000
    assert "| t | DARE | S |" in capsys.readouterr().out


def test_bad_runs_are_one_line_errors(tmp_path, capsys):
    assert sf.main(["--out", str(tmp_path / "o"), "--run", f"S={tmp_path / 'nope'}"]) == 2
    assert "no " in capsys.readouterr().err
    a = _run(tmp_path, "a", [("t", "dare", 0.0, 0, 0.8)])
    b = _run(tmp_path, "b", [("t", "dare", 0.0, 0, 0.7)])
    assert sf.main(["--out", str(tmp_path / "o"), "--run", f"S={a}", "--run", f"S={b}"]) == 2
    assert "runs disagree" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sf.main(["--out", str(tmp_path / "o"), "--run", "no-equals-sign"])
