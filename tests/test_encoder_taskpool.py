"""Classification / GLUE taskpools: merged body + each task's own head."""
import csv
import json

import numpy as np
import pytest
import torch

from dare_lab.engine import merge_models
from dare_lab.engine.pool import ModelPool
from dare_lab.ops import MergeMethod, Merger, Sparsifier
from dare_lab.taskpool.classification import (
    ClassificationTaskPool,
    GlueTaskPool,
    TaskSpec,
    is_head_key,
    load_split,
    read_state_dict,
)
from dare_lab.train.tiny import make_tiny_bert, polarity_rows, topic_rows, write_csv


def _finetuned_like(base, out, num_labels, seed, problem_type=None):
    """base + small noise on every body tensor, a fresh random head of ``num_labels``."""
    from transformers import AutoModelForSequenceClassification

    make_tiny_bert(out, num_labels=num_labels, seed=seed + 100, problem_type=problem_type)  # tokenizer + fresh head
    model = AutoModelForSequenceClassification.from_pretrained(out)
    base_sd = read_state_dict(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not is_head_key(k) and k in base_sd:
                v.copy_(base_sd[k] + 0.05 * torch.randn(v.shape, generator=g))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    base = make_tiny_bert(root / "base", num_labels=2, seed=0)
    a = _finetuned_like(base, root / "pol", 2, seed=1)
    b = _finetuned_like(base, root / "top", 3, seed=2)
    pool = ModelPool(base=str(base), models={"polarity": str(a), "topic": str(b)})
    pol = write_csv(polarity_rows(90, seed=5), root / "pol_test.csv")
    top_rows = topic_rows(70, seed=6)
    top = root / "top_test.jsonl"
    top.write_text("\n".join(json.dumps({"sentence": r["text"], "y": r["label"]}) for r in top_rows))
    tasks = [
        {"name": "polarity", "files": {"test": str(pol)}, "labels": ["neg", "pos"], "max_length": 16},
        {"name": "topic", "files": {"test": str(top)}, "text_column": "sentence", "label_column": "y",
         "labels": ["food", "sport", "tech"], "metrics": ["accuracy", "macro_f1"]},
    ]
    return root, pool, tasks


def _manual_scores(body, model_dir, rows_texts, labels, max_length):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    own = model.state_dict()
    with torch.no_grad():
        for k, v in body.items():
            if not is_head_key(k):
                own[k].copy_(v)
    tok = AutoTokenizer.from_pretrained(model_dir)
    preds = []
    with torch.inference_mode():
        for t in rows_texts:  # one by one: no padding, no batching shortcuts
            preds.append(int(model(**tok(t, truncation=True, max_length=max_length, return_tensors="pt")).logits.argmax(-1)))
    return float(np.mean(np.array(preds) == np.array(labels)))


def test_merged_body_with_own_heads(setup, tmp_path):
    root, pool, tasks = setup
    method = MergeMethod("ta", Sparsifier("dare", 0.5), Merger("task_arithmetic", scaling=0.7), seed=3)
    merged = merge_models(pool.base, pool.models, method, tmp_path / "merged")
    merged_sd = read_state_dict(merged)
    # the engine keeps the base's (2-way) head in the merged dir; the topic task needs a 3-way head
    assert merged_sd["classifier.weight"].shape[0] == 2
    tp = ClassificationTaskPool(tasks, batch_size=8)
    res = tp.evaluate(merged, pool)
    assert set(res) == {"polarity/accuracy", "topic/accuracy", "topic/macro_f1"}
    for task, mdir in (("polarity", pool.models["polarity"]), ("topic", pool.models["topic"])):
        ex = load_split(tp.tasks[[t.name for t in tp.tasks].index(task)], "test")
        want = _manual_scores(merged_sd, mdir, ex.texts, ex.labels, 16 if task == "polarity" else 128)
        assert res[f"{task}/accuracy"] == pytest.approx(want, abs=1e-12)
    # heads survive: the cached task models hold their own heads and the merged body
    for task in tp.tasks:
        model, path = tp.task_model(task, pool)
        orig = read_state_dict(path)
        for k, v in model.state_dict().items():
            assert torch.equal(v, orig[k] if is_head_key(k) else merged_sd[k]), k
    # and the single-model baseline afterwards gets its own body back
    fresh = ClassificationTaskPool(tasks, batch_size=8).evaluate_models(pool)
    assert tp.evaluate_models(pool) == fresh


def test_identity_merge_scores_like_the_single_models(setup, tmp_path):
    root, pool, tasks = setup
    tp = ClassificationTaskPool(tasks)
    single = tp.evaluate_models(pool)
    for name in ("polarity", "topic"):
        one = merge_models(pool.base, {name: pool.models[name]}, MergeMethod("ta", Sparsifier(), Merger("task_arithmetic")),
                           tmp_path / name)
        res = ClassificationTaskPool([t for t in tasks if t["name"] == name]).evaluate(one, pool)
        for k, v in res.items():
            assert v == single[k]
    # the evaluation really runs the given body (random tiny models predict near-constant
    # classes, so check the weights in the scoring model rather than accuracies)
    base_sd = read_state_dict(pool.base)
    tp.evaluate_state_dict(base_sd, pool)
    model, path = tp.task_model(tp.tasks[0], pool)
    sd = model.state_dict()
    assert torch.equal(sd["bert.encoder.layer.0.attention.self.query.weight"],
                       base_sd["bert.encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(sd["classifier.weight"], read_state_dict(path)["classifier.weight"])
    assert tp.evaluate_models(pool) == single  # own body restored for the single-model baseline
    assert torch.equal(model.state_dict()["bert.encoder.layer.0.attention.self.query.weight"],
                       read_state_dict(path)["bert.encoder.layer.0.attention.self.query.weight"])


def test_glue_taskpool_with_local_hub_schema_files(tmp_path):
    base = make_tiny_bert(tmp_path / "base", num_labels=2, seed=0)
    mrpc = _finetuned_like(base, tmp_path / "mrpc", 2, seed=1)
    stsb = _finetuned_like(base, tmp_path / "stsb", 1, seed=2, problem_type="regression")
    pool = ModelPool(base=str(base), models={"mrpc": str(mrpc), "stsb": str(stsb)})
    rows = polarity_rows(40, seed=1)
    with open(tmp_path / "mrpc.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["sentence1", "sentence2", "label", "idx"])
        for i, r in enumerate(rows):
            w.writerow([r["text"], rows[-i]["text"], i % 2, i])
    (tmp_path / "stsb.jsonl").write_text("\n".join(json.dumps({"sentence1": r["text"], "sentence2": "good",
                                                              "label": float(i % 5), "idx": i}) for i, r in enumerate(rows)))
    tp = GlueTaskPool(tasks=["mrpc", "stsb"], files={"mrpc": {"test": str(tmp_path / "mrpc.tsv")},
                                                     "stsb": {"test": str(tmp_path / "stsb.jsonl")}})
    res = tp.evaluate_models(pool)
    assert set(res) == {"mrpc/accuracy", "mrpc/f1", "stsb/pearson", "stsb/spearman"}
    assert all(-1.0 <= v <= 1.0 for v in res.values())
    spec = tp.tasks[0]
    assert spec.text_pair_column == "sentence2" and spec.metrics == ("accuracy", "f1")
    # hub ids and splits are the paper's
    full = GlueTaskPool()
    assert [t.name for t in full.tasks] == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
    assert all(t.dataset == "nyu-mll/glue" for t in full.tasks)
    mnli = full.tasks[5]
    assert mnli.source_splits["test"] == "validation_matched" and mnli.metrics == ("accuracy",)
    assert full.tasks[0].metrics == ("matthews",)


def test_validation_split_is_derived_from_train(tmp_path):
    f = write_csv(polarity_rows(100, seed=0), tmp_path / "train.csv")
    spec = TaskSpec(name="p", files={"train": str(f)}, labels=["neg", "pos"])
    tr, va = load_split(spec, "train"), load_split(spec, "validation")
    assert len(tr) == 90 and len(va) == 10
    full = polarity_rows(100, seed=0)
    assert sorted(tr.texts + va.texts) == sorted(r["text"] for r in full)
    assert load_split(spec, "validation").texts == va.texts  # fixed seed
    with pytest.raises(ValueError, match="no 'test' split"):
        load_split(spec, "test")


def test_bad_inputs(setup, tmp_path):
    root, pool, tasks = setup
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ClassificationTaskPool([dict(tasks[0], files={"test": str(tmp_path / "nope.csv")})]).evaluate_models(pool)
    with pytest.raises(ValueError, match="'txt'"):
        ClassificationTaskPool([dict(tasks[0], text_column="txt")]).evaluate_models(pool)
    with pytest.raises(ValueError, match="label '(neg|pos)' .* is not one of"):
        ClassificationTaskPool([dict(tasks[0], labels=["a", "b"])]).evaluate_models(pool)
    with pytest.raises(ValueError, match="'polarity'"):
        ClassificationTaskPool([tasks[0]]).evaluate_models(ModelPool(base=pool.base, models={"x": pool.base}))
    with pytest.raises(ValueError, match="3 labels"):
        ClassificationTaskPool([dict(tasks[1], model="polarity")]).evaluate_models(pool)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        ClassificationTaskPool(tasks).evaluate(tmp_path / "missing_dir", pool)
    with pytest.raises(ValueError, match="unknown option"):
        ClassificationTaskPool([dict(tasks[0], colour="red")])
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'"):
        GlueTaskPool(tasks=["sst3"])


def test_a_sweeps_taskpools_share_data_and_head_models(setup, tmp_path, monkeypatch):
    """Each job of a Hydra sweep builds its own taskpool in the same process: the second one
    reuses the first one's rows, tokenised batches and head models (no re-read, no reload),
    scores the same, and a changed data file is read again."""
    import os

    import dare_lab.taskpool.classification as cl

    root, pool, tasks = setup
    cl.clear_shared_cache()
    calls = {"load_split": 0, "from_pretrained": 0}
    orig_split = cl.load_split
    monkeypatch.setattr(cl, "load_split", lambda *a, **k: calls.__setitem__("load_split", calls["load_split"] + 1)
                        or orig_split(*a, **k))
    from transformers import AutoModelForSequenceClassification
    orig_fp = AutoModelForSequenceClassification.from_pretrained.__func__

    def counting(cls, *a, **k):
        calls["from_pretrained"] += 1
        return orig_fp(cls, *a, **k)
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(counting))
    body = read_state_dict(pool.base)
    first = ClassificationTaskPool(tasks, batch_size=8)
    r1 = first.evaluate_state_dict(body, pool)
    assert calls == {"load_split": 2, "from_pretrained": 2}
    second = ClassificationTaskPool(tasks, batch_size=8)
    assert second.evaluate_state_dict(body, pool) == r1
    assert calls == {"load_split": 2, "from_pretrained": 2}
    assert second.task_model(second.tasks[0], pool)[0] is first.task_model(first.tasks[0], pool)[0]
    assert second.evaluate_models(pool) == ClassificationTaskPool(tasks, batch_size=8).evaluate_models(pool)
    # a data file that changed on disk is read again
    f = tasks[0]["files"]["test"]
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    ClassificationTaskPool(tasks, batch_size=8).evaluate_state_dict(body, pool)
    assert calls["load_split"] == 3
    cl.clear_shared_cache()
