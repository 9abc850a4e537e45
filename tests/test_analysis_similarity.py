"""Embedding similarity: exact 1.0 at p = 0, DropOnly decreasing in p, streaming = whole."""

import numpy as np
import pytest
import torch

from dare_lab.analysis.similarity import LayerCosine, embedding_similarity, token_cosine
from dare_lab.pools.tiny import CORPUS, make_tiny_pool


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    return make_tiny_pool(tmp_path_factory.mktemp("tiny_sim"), "bert", n_models=1, seed=0)


def test_token_cosine_exact_and_bounded():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 7, 33, generator=g) * 100
    assert torch.equal(token_cosine(a, a), torch.ones(4, 7, dtype=torch.float64))
    assert torch.allclose(token_cosine(a, -a), -torch.ones(4, 7, dtype=torch.float64))
    b = torch.randn(4, 7, 33, generator=g)
    ref = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    assert torch.allclose(token_cosine(a, b), ref, atol=1e-12)


def test_streaming_accumulator_masks_padding_and_matches_whole():
    g = torch.Generator().manual_seed(1)
    ref = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    oth = [r + 0.5 * torch.randn(r.shape, generator=g) for r in ref]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    acc = LayerCosine()
    acc.update([r[:1] for r in ref], [o[:1] for o in oth], mask[:1])  # two batches …
    acc.update([r[1:] for r in ref], [o[1:] for o in oth], mask[1:])
    keep = mask.bool()
    for i in range(3):
        expect = token_cosine(ref[i], oth[i])[keep].mean().item()  # … equal the whole, padding excluded
        assert acc.means[i] == pytest.approx(expect, abs=1e-12)
    assert acc.counts.tolist() == [7, 7, 7] and acc.hist.sum() == 7


def test_p0_is_exactly_one_and_droponly_decreases(tiny_pool):
    rates = [0.0, 0.2, 0.5, 0.8]
    rows, hists = embedding_similarity(tiny_pool, "ft0", CORPUS[:12], methods=["drop_only"], drop_rates=rates,
                                       seeds=[0, 1, 2], batch_size=5, log=None)
    n_layers = 3  # embeddings + 2 encoder layers
    p0 = [r for r in rows if r["p"] == 0.0]
    assert len(p0) == n_layers and all(r["mean_cos"] == 1.0 for r in p0)
    assert hists["drop_only p=0"].sum() == p0[-1]["n_tokens"] and hists["drop_only p=0"][-1] == p0[-1]["n_tokens"]
    for layer in range(n_layers):
        means = [np.mean([r["mean_cos"] for r in rows if r["p"] == p and r["layer"] == layer]) for p in rates]
        assert all(x > y for x, y in zip(means, means[1:])), (layer, means)
        assert means[-1] < 0.999


def test_batching_does_not_change_the_result(tiny_pool):
    kw = dict(methods=["dare"], drop_rates=[0.5], seeds=[0], log=None)
    one, _ = embedding_similarity(tiny_pool, "ft0", CORPUS[:6], batch_size=1, **kw)
    many, _ = embedding_similarity(tiny_pool, "ft0", CORPUS[:6], batch_size=6, **kw)
    for a, b in zip(one, many):
        assert a["layer"] == b["layer"] and a["n_tokens"] == b["n_tokens"]
        assert a["mean_cos"] == pytest.approx(b["mean_cos"], abs=1e-5)


def test_decoder_similarity_and_fidelity(tmp_path):
    from dare_lab.analysis.fidelity import FidelityTaskPool
    from dare_lab.analysis.redundancy import redundancy_curves

    pool = make_tiny_pool(tmp_path, "llama", n_models=1, seed=0)
    rows, _ = embedding_similarity(pool, "ft0", CORPUS[:6], methods=["drop_only"], drop_rates=[0.0, 0.9], seeds=[0],
                                   batch_size=3, log=None)
    p0 = [r["mean_cos"] for r in rows if r["p"] == 0.0]
    p9 = [r["mean_cos"] for r in rows if r["p"] == 0.9]
    assert p0 == [1.0, 1.0, 1.0] and all(x < 1.0 for x in p9[1:])
    curves = redundancy_curves(pool, FidelityTaskPool(n=6), methods=["dare"], drop_rates=[0.0, 0.5], seeds=[0], log=None)
    by = {(r["metric"], r["p"]): r["value"] for r in curves}
    assert by[("ft0/agreement", 0.0)] == 1.0 and by[("ft0/logit_cos", 0.0)] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= by[("ft0/agreement", 0.5)] <= 1.0
