"""Fisher merging and RegMean: pure formulas, streamed statistics and the merge driver."""
from pathlib import Path

import pytest
import torch

from dare_lab.data_aware import DataAwareMerge, fisher_diagonal, gram_matrices
from dare_lab.engine.pool import ModelPool
from dare_lab.ops import dare, tensor_generator
from dare_lab.ops.data_aware import fisher_merge, reduce_off_diagonal, regmean_merge
from dare_lab.taskpool.classification import TaskSpec, load_split, read_state_dict
from dare_lab.train.tiny import polarity_rows, topic_rows, write_csv


# ----------------------------------------------------------------------------- pure formulas

def test_fisher_merge_formula():
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    f1, f2 = torch.rand(4, 3, generator=g), torch.rand(4, 3, generator=g)
    f1[0, 0] = f2[0, 0] = 0.0
    out = fisher_merge([t1, t2], [f1, f2], [0.3, 0.7], min_fisher=1e-6)
    want = (0.3 * (f1 + 1e-6) * t1 + 0.7 * (f2 + 1e-6) * t2) / (0.3 * (f1 + 1e-6) + 0.7 * (f2 + 1e-6))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-7)
    # zero Fisher everywhere, no epsilon: the λ-weighted mean, not NaN
    out0 = fisher_merge([t1, t2], [f1, f2], [0.3, 0.7], min_fisher=0.0)
    assert out0[0, 0] == pytest.approx(float(0.3 * t1[0, 0] + 0.7 * t2[0, 0]), abs=1e-6)
    assert torch.isfinite(out0).all()
    # a model with all the Fisher mass wins
    big = fisher_merge([t1, t2], [torch.full_like(f1, 1e6), torch.zeros_like(f2)], min_fisher=1e-6)
    torch.testing.assert_close(big, t1, rtol=1e-5, atol=1e-5)


def test_regmean_single_linear_layer_closed_form():
    """α=1: W* minimises Σ_k ||X_k Wᵀ − X_k W_kᵀ||², checked with an independent least-squares solve."""
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64)
    w1, w2 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    out = regmean_merge([w1, w2], [x1.T @ x1, x2.T @ x2], alpha=1.0)
    X = torch.cat([x1, x2])
    Y = torch.cat([x1 @ w1.T, x2 @ w2.T])
    want = torch.linalg.lstsq(X, Y).solution.T
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    # α < 1: the explicit-inverse form with off-diagonals scaled
    a = 0.6
    g1, g2 = reduce_off_diagonal(x1.T @ x1, a), reduce_off_diagonal(x2.T @ x2, a)
    want_a = (torch.linalg.inv(g1 + g2) @ (g1 @ w1.T + g2 @ w2.T)).T
    torch.testing.assert_close(regmean_merge([w1, w2], [x1.T @ x1, x2.T @ x2], alpha=a), want_a, rtol=1e-9, atol=1e-9)
    assert torch.equal(torch.diagonal(g1), torch.diagonal(x1.T @ x1))
    assert g1[0, 1] == pytest.approx(a * float((x1.T @ x1)[0, 1]))
    # α = 0 with diagonal Grams: per-input-feature weighted average of the columns
    d = regmean_merge([w1, w2], [torch.eye(5, dtype=torch.float64) * 2, torch.eye(5, dtype=torch.float64)], alpha=0.0)
    torch.testing.assert_close(d, (2 * w1 + w2) / 3)
    # identical weights come back unchanged, even with a singular Gram sum
    sing = torch.zeros(5, 5, dtype=torch.float64)
    sing[0, 0] = 1.0
    torch.testing.assert_close(regmean_merge([w1, w1], [x1.T @ x1, x2.T @ x2], 0.9), w1, rtol=1e-9, atol=1e-9)
    assert torch.isfinite(regmean_merge([w1, w2], [sing, sing], 1.0)).all()


def test_bad_formula_input():
    t = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="one Fisher per model"):
        fisher_merge([t, t], [t])
    with pytest.raises(ValueError, match="alpha"):
        reduce_off_diagonal(torch.eye(2), 1.5)
    with pytest.raises(ValueError, match="does not fit"):
        regmean_merge([t], [torch.eye(3)])


# ----------------------------------------------------------------------------- statistics

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, noisy_bert_trio):
    root = tmp_path_factory.mktemp("da")
    base, a, b = noisy_bert_trio  # fine-tuned-like: base + noise (keep their own random heads)
    tasks = [
        {"name": "a", "files": {"train": str(write_csv(polarity_rows(60, 1), root / "a.csv"))}, "labels": ["neg", "pos"],
         "max_length": 16},
        {"name": "b", "files": {"train": str(write_csv(topic_rows(60, 2), root / "b.csv"))},
         "labels": ["food", "sport", "tech"], "max_length": 16},
    ]
    return root, ModelPool(base=str(base), models={"a": str(a), "b": str(b)}), tasks


def _load(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_gram_matrices_equal_direct_computation_and_ignore_padding(tiny):
    root, pool, tasks = tiny
    model, tok = _load(pool.models["a"])
    ex = load_split(TaskSpec.from_any(tasks[0]), "train")
    n = 6
    grams = gram_matrices(model, tok, ex, num_examples=n, max_length=16, batch_size=4)
    assert "classifier.weight" not in grams and "bert.pooler.dense.weight" in grams
    # direct: the input of layer 0's query projection is the embedding output, token by token
    want_q = torch.zeros(32, 32)
    want_p = torch.zeros(32, 32)
    with torch.inference_mode():
        for t in ex.texts[:n]:
            out = model(**tok(t, return_tensors="pt", truncation=True, max_length=16), output_hidden_states=True)
            h0 = out.hidden_states[0][0]
            want_q += h0.T @ h0
            cls = out.hidden_states[-1][0, :1]  # the pooler sees the [CLS] state only
            want_p += cls.T @ cls
    assert all(g.dtype == torch.float64 for g in grams.values())  # accumulated in float64 for the solve
    torch.testing.assert_close(grams["bert.encoder.layer.0.attention.self.query.weight"], want_q / n, rtol=1e-4, atol=1e-4,
                               check_dtype=False)
    torch.testing.assert_close(grams["bert.pooler.dense.weight"], want_p / n, rtol=1e-4, atol=1e-4, check_dtype=False)
    # normalize="sum": the RegMean paper's unnormalised Σ XᵀX
    summed = gram_matrices(model, tok, ex, num_examples=n, max_length=16, batch_size=4, normalize="sum")
    torch.testing.assert_close(summed["bert.pooler.dense.weight"], want_p, rtol=1e-4, atol=1e-4, check_dtype=False)
    one = gram_matrices(model, tok, ex, num_examples=n, max_length=16, batch_size=1)
    for k in grams:
        torch.testing.assert_close(grams[k], one[k], rtol=1e-4, atol=1e-4)


def test_fisher_diagonal_closed_form_on_the_head(tiny):
    """For logits = W h + b: ∇_W log p_y = (e_y − p) hᵀ, so F_W = mean_i Σ_y p_y ((e_y − p) hᵀ)²."""
    root, pool, tasks = tiny
    model, tok = _load(pool.models["b"])
    spec = TaskSpec.from_any(tasks[1])
    ex = load_split(spec, "train")
    n = 5
    fisher = fisher_diagonal(model, tok, ex, num_examples=n, max_length=16, exclude=())
    emp = fisher_diagonal(model, tok, ex, num_examples=n, max_length=16, exclude=(), estimator="empirical")
    want = torch.zeros(3, 32)
    want_emp = torch.zeros(3, 32)
    with torch.inference_mode():
        for t, y_gold in zip(ex.texts[:n], ex.labels[:n]):
            enc = tok(t, return_tensors="pt", truncation=True, max_length=16)
            h = model.bert(**enc).pooler_output[0]
            p = torch.softmax(model.classifier(h), -1)
            for y in range(3):
                g = (torch.nn.functional.one_hot(torch.tensor(y), 3).float() - p)[:, None] * h[None, :]
                want += p[y] * g.pow(2)
                if y == y_gold:
                    want_emp += g.pow(2)
    torch.testing.assert_close(fisher["classifier.weight"], want / n, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(emp["classifier.weight"], want_emp / n, rtol=1e-4, atol=1e-6)
    assert (fisher["bert.encoder.layer.0.attention.self.query.weight"] > 0).any()
    default = fisher_diagonal(model, tok, ex, num_examples=2, max_length=16)
    assert not any(k.startswith("classifier") for k in default)


# ----------------------------------------------------------------------------- driver

def test_identical_models_come_back_unchanged(tiny, tmp_path):
    root, pool, tasks = tiny
    same = ModelPool(base=pool.base, models={"a": pool.models["a"], "a2": pool.models["a"]})
    t2 = [tasks[0], dict(tasks[0], name="a2")]
    want = read_state_dict(pool.models["a"])
    for kind in ("fisher", "regmean"):
        merged = DataAwareMerge(kind, tasks=t2, num_examples=4, scaling=[0.3, 0.9]).merge_pool(same)
        for k, v in merged.items():
            if k.startswith("classifier"):
                continue
            torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5, msg=f"{kind} {k}")


def test_dare_fisher_equals_dense_formula(tiny):
    root, pool, tasks = tiny
    p, seed = 0.5, 7
    method = DataAwareMerge("fisher", tasks=tasks, num_examples=3, scaling=[0.4, 0.6], drop_rate=p, seed=seed)
    merged = method.merge_pool(pool)
    base = read_state_dict(pool.base)
    thetas, fishers = {}, {}
    for m, spec in zip(("a", "b"), tasks):
        sd = read_state_dict(pool.models[m])
        sp = {k: (v if k.startswith("classifier") else
                  base[k] + dare(v - base[k], p, tensor_generator(seed, m, k))) for k, v in sd.items()}
        model, tok = _load(pool.models[m])
        model.load_state_dict(sp)
        thetas[m] = sp
        fishers[m] = fisher_diagonal(model, tok, load_split(TaskSpec.from_any(spec), "train"), 3, 16)
    k = "bert.encoder.layer.1.output.dense.weight"
    fa, fb = fishers["a"][k] + 1e-6, fishers["b"][k] + 1e-6
    want = (0.4 * fa * thetas["a"][k] + 0.6 * fb * thetas["b"][k]) / (0.4 * fa + 0.6 * fb)
    torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-6)
    # masks really dropped entries, and the head is the base's
    assert (thetas["a"][k] == base[k]).float().mean() > 0.3
    assert torch.equal(merged["classifier.weight"], base["classifier.weight"])


def test_regmean_driver_writes_a_loadable_model(tiny, tmp_path):
    root, pool, tasks = tiny
    method = DataAwareMerge("regmean", tasks=tasks, num_examples=4, alpha=0.9)
    out = method.merge(pool, tmp_path / "merged")
    merged = read_state_dict(out)
    base = read_state_dict(pool.base)
    a, b = read_state_dict(pool.models["a"]), read_state_dict(pool.models["b"])
    ln = "bert.encoder.layer.0.output.LayerNorm.weight"
    torch.testing.assert_close(merged[ln], (a[ln] + b[ln]) / 2)  # non-linear: averaged
    lin = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.allclose(merged[lin], (a[lin] + b[lin]) / 2)
    assert torch.equal(merged["classifier.weight"], base["classifier.weight"])
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(out)
    from dare_lab.taskpool.classification import ClassificationTaskPool

    res = ClassificationTaskPool([dict(t, files={"test": t["files"]["train"]}) for t in tasks]).evaluate(out, pool)
    assert set(res) == {"a/accuracy", "b/accuracy"}


def test_bad_driver_input(tiny):
    root, pool, tasks = tiny
    with pytest.raises(ValueError, match="unknown data-aware merge 'fishr'"):
        DataAwareMerge("fishr")
    with pytest.raises(ValueError, match="needs data"):
        DataAwareMerge("fisher").merge_pool(pool)
    with pytest.raises(ValueError, match="'b'"):
        DataAwareMerge("fisher", tasks=[tasks[0]]).merge_pool(pool)
    with pytest.raises(ValueError, match="alpha"):
        DataAwareMerge("regmean", alpha=2)


def test_overwrite_replaces_only_a_previous_data_aware_output(tiny, tmp_path):
    from dare_lab.engine.writer import OverwriteRefused

    root, pool, tasks = tiny
    method = DataAwareMerge("regmean", tasks=tasks, num_examples=4, alpha=0.9)
    out = method.merge(pool, tmp_path / "merged")
    assert method.merge(pool, out, overwrite=True) == out                     # its own previous output
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(OverwriteRefused, match="not a dare_lab output"):
        method.merge(pool, foreign, overwrite=True)
    with pytest.raises(OverwriteRefused, match="it is an input"):
        method.merge(pool, pool.models["a"], overwrite=True)
    assert (foreign / "todo.txt").read_text() == "mine" and (Path(pool.models["a"]) / "config.json").exists()
