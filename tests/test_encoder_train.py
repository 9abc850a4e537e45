"""Fine-tuning program on a tiny random BERT and a synthetic task."""
import json

import pytest
import torch

from dare_lab.taskpool.classification import TaskSpec, load_split, train_val_split
from dare_lab.train.finetune import FinetuneConfig, finetune
from dare_lab.train.tiny import make_tiny_bert, polarity_rows, write_csv


@pytest.fixture(scope="module")
def polarity(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    base = make_tiny_bert(root / "base", num_labels=2, seed=0)
    train = write_csv(polarity_rows(320, seed=1), root / "train.csv")
    test = write_csv(polarity_rows(100, seed=2), root / "test.csv")
    spec = TaskSpec(name="polarity", files={"train": str(train), "test": str(test)}, labels=["neg", "pos"], max_length=16)
    return root, base, spec


CFG = dict(epochs=5, learning_rate=2e-3, batch_size=16, warmup_ratio=0.1, progress=False, log_every_steps=5)


def test_train_val_split_is_fixed_and_disjoint():
    tr, va = train_val_split(50, 0.1, seed=42)
    tr2, va2 = train_val_split(50, 0.1, seed=42)
    assert (tr == tr2).all() and (va == va2).all()
    assert len(va) == 5 and len(tr) == 45 and not set(tr) & set(va)
    assert sorted([*tr, *va]) == list(range(50))
    assert list(train_val_split(50, 0.1, seed=1)[1]) != list(va)


def test_finetune_beats_chance_and_loads(polarity, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, base, spec = polarity
    out = tmp_path / "model"
    summary = finetune(base, spec, out, CFG)
    assert summary["status"] == "done"
    assert summary["train_examples"] == 288 and summary["validation_examples"] == 32  # 90/10 of 320
    assert summary["validation"]["accuracy"] > 0.8
    # the output is a regular HF classification model with its head and labels
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 2 and model.config.id2label[1] == "pos"
    test = load_split(spec, "test")
    with torch.inference_mode():
        logits = model(**tok(test.texts, padding=True, return_tensors="pt")).logits
    acc = (logits.argmax(-1) == torch.tensor(test.labels)).float().mean().item()
    assert acc > 0.8
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "validation/accuracy" in r] == [1, 2, 3, 4, 5]
    assert not (out / "_checkpoint").exists()
    # a finished directory is reused, not retrained
    again = finetune(base, spec, out, CFG)
    assert again["train_seconds"] == summary["train_seconds"]


def test_finetune_resumes_from_checkpoint(polarity, tmp_path):
    root, base, spec = polarity
    out = tmp_path / "model"
    cfg = dict(CFG, epochs=2)
    part = finetune(base, spec, out, cfg, stop_after_steps=7)
    assert part == {"status": "interrupted", "step": 7, "total_steps": 36}
    assert (out / "_checkpoint" / "state.json").exists() and not (out / "finetune.json").exists()
    done = finetune(base, spec, out, cfg)
    assert done["status"] == "done" and done["steps"] == 36
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [5, 10, 15, 20, 25, 30, 35]  # no step repeated after resuming at 7


def test_regression_task(tmp_path):
    base = make_tiny_bert(tmp_path / "base", num_labels=2, seed=0)
    rows = [{"text": r["text"], "label": 1.0 if r["label"] == "pos" else 0.0} for r in polarity_rows(320, seed=3)]
    spec = TaskSpec(name="score", files={"train": str(write_csv(rows, tmp_path / "train.csv"))}, regression=True,
                    metrics=("pearson", "spearman"), max_length=16)
    summary = finetune(base, spec, tmp_path / "out", dict(CFG, epochs=5))
    assert summary["validation"]["pearson"] > 0.7
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tmp_path / "out")
    assert cfg.num_labels == 1 and cfg.problem_type == "regression"


def test_bad_config():
    with pytest.raises(ValueError, match="epochs"):
        FinetuneConfig(epochs=0)
    with pytest.raises(ValueError, match="lr_typo"):
        FinetuneConfig.from_any({"lr_typo": 1})


def test_cli(polarity, tmp_path, capsys):
    from dare_lab.train.__main__ import main

    root, base, spec = polarity
    rc = main(["--base", str(base), "--out", str(tmp_path / "m"), "--train", spec.files["train"], "--labels", "neg,pos",
               "--epochs", "1", "--learning-rate", "0.002", "--max-length", "16"])
    assert rc == 0 and (tmp_path / "m" / "finetune.json").exists()
    assert '"validation"' in capsys.readouterr().out
    rc = main(["--base", str(base), "--out", str(tmp_path / "m2"), "--train", str(tmp_path / "missing.csv")])
    assert rc == 2 and "missing.csv" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["roberta", "mpnet"])
def test_other_architectures_train_and_evaluate(arch, tmp_path):
    from dare_lab.engine.pool import ModelPool
    from dare_lab.taskpool.classification import ClassificationTaskPool

    base = make_tiny_bert(tmp_path / "base", num_labels=2, seed=0, arch=arch)
    train = write_csv(polarity_rows(64, seed=1), tmp_path / "train.csv")
    spec = TaskSpec(name="polarity", files={"train": str(train), "test": str(train)}, labels=["neg", "pos"], max_length=16)
    summary = finetune(base, spec, tmp_path / "m", dict(CFG, epochs=1))
    assert summary["status"] == "done"
    pool = ModelPool(base=str(base), models={"polarity": str(tmp_path / "m")})
    tp = ClassificationTaskPool([spec])
    own = tp.evaluate_models(pool)
    # the fine-tuned body + its own head scores the same through the merged-body path
    assert tp.evaluate(tmp_path / "m", pool) == own
    # RoBERTa/MPNet heads are classifier.dense + classifier.out_proj: all kept from the task model
    from dare_lab.taskpool.classification import is_head_key, read_state_dict

    heads = [k for k in read_state_dict(tmp_path / "m") if is_head_key(k)]
    assert any("out_proj" in k for k in heads) and any("dense" in k for k in heads)


def test_a_new_head_prints_no_load_report(polarity, tmp_path):
    import subprocess
    import sys

    root, base, spec = polarity
    code = ("import sys; from dare_lab.taskpool.classification import TaskSpec; from dare_lab.train.finetune import finetune; "
            "spec = TaskSpec(name='three', files={'train': sys.argv[2], 'test': sys.argv[3]}, labels=['neg', 'pos', 'other'], "
            "max_length=16); finetune(sys.argv[1], spec, sys.argv[4], dict(epochs=1, batch_size=16, progress=False)); "
            "from transformers.utils import logging; print('verbosity', logging.get_verbosity())")
    proc = subprocess.run([sys.executable, "-c", code, str(base), spec.files["train"], spec.files["test"], str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOAD REPORT" not in proc.stdout + proc.stderr and "MISMATCH" not in proc.stdout + proc.stderr  # base head: 2 labels
    assert "verbosity 30" in proc.stdout  # WARNING again after the load
