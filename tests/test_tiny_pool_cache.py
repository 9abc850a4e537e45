"""The cached tiny pool is shared by a sweep's parallel jobs: built once, never deleted under
another job (CI caught a submitit_local sweep where job B removed the pool job A was reading)."""

import threading
import time

import pytest

import dare_lab.pools.tiny as tiny


def test_concurrent_callers_build_once_and_see_a_complete_pool(tmp_path, monkeypatch):
    real, calls = tiny.make_tiny_pool, []

    def slow_build(root, *args, **kwargs):
        calls.append(root)
        time.sleep(0.3)  # widen the window in which a second caller could start its own build
        return real(root, *args, **kwargs)

    monkeypatch.setattr(tiny, "make_tiny_pool", slow_build)
    pools, errors = [], []

    def call():
        try:
            pool = tiny.cached_tiny_pool(tmp_path / "cache")
            assert (tmp_path / "cache" / "tiny_bert_k2_s0" / "base" / "config.json").exists()
            pools.append(pool)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(calls) == 1
    assert len({p.base for p in pools}) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == ["tiny_bert_k2_s0"]


def test_an_incomplete_folder_it_did_not_make_is_refused_not_deleted(tmp_path):
    root = tmp_path / "cache" / "tiny_bert_k2_s0"
    (root / "mine").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a finished build"):
        tiny.cached_tiny_pool(tmp_path / "cache")
    assert (root / "mine").is_dir()
