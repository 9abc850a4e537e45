"""Engine safety (issue 14): overwrite replaces only a previous dare_lab output; merged bits do not
depend on the order the models are listed in; index entries stay inside their model directory;
the content fingerprint changes with one weight and not with the thread count; malformed
safetensors headers and config.json files are one-line errors naming the file."""

import hashlib
import itertools
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dare_lab.engine import merge as engine_merge
from dare_lab.engine import merge_models
from dare_lab.ops.presets import build_method

TA = build_method("task_arithmetic")
BERT_MAIN = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def pool3(tmp_path_factory):
    """Base + 3 tiny BERT fine-tunes (K = 3: sums over models depend on their order)."""
    from dare_lab.pools.tiny import make_tiny_pool

    return make_tiny_pool(tmp_path_factory.mktemp("pool3"), "bert", n_models=3, seed=5, noise=0.05)


def shard_digests(out: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(out).glob("*.safetensors"))}


def one_line(exc) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg, msg
    return msg


# ----------------------------------------------------------------- 1. overwrite only our own output


def copy_pool(pool, root: Path):
    """The pool's models copied under ``root`` (so a wrongly allowed overwrite damages only copies)."""
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    shutil.copytree(pool.base, base)
    models = {m: str(shutil.copytree(p, root / m)) for m, p in pool.models.items()}
    return str(base), models


def tree_snapshot(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(path).rglob("*")) if f.is_file()}


def _refusal(tmp, base, models, target, expected, **kw):
    before = tree_snapshot(tmp)
    with pytest.raises(FileExistsError) as info:
        merge_models(base, models, TA, target, overwrite=True, threads=1, **kw)
    msg = one_line(info.value)
    assert re.search(expected, msg), msg
    assert msg.startswith(f"refusing to overwrite {Path(target).resolve()}"), msg
    assert tree_snapshot(tmp) == before    # nothing deleted, nothing changed
    assert not [p for p in Path(target).resolve().parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("which", ["input model", "base model", "parent of all inputs", "child of an input",
                                   "foreign non-empty dir", "file", "old output plus a foreign file",
                                   "fake metadata"])
def test_overwrite_refuses_what_is_not_a_previous_output(tiny_bert_pool, tmp_path, which):
    base, models = copy_pool(tiny_bert_pool, tmp_path / "pool")
    if which == "input model":
        target, expected = models["ft0"], r"it is an input \(model 'ft0'\)"
    elif which == "base model":
        target, expected = base, r"it is an input \(base model\)"
    elif which == "parent of all inputs":
        target, expected = tmp_path / "pool", r"it contains an input \(base model: "
    elif which == "child of an input":
        target = Path(models["ft1"]) / "sub"
        target.mkdir()
        expected = r"it lies inside an input \(model 'ft1': "
    elif which == "foreign non-empty dir":
        target = tmp_path / "mine"
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
        expected = r"a non-empty directory that is not a dare_lab output \(no dare_lab_merge\.json\)"
    elif which == "file":
        target = tmp_path / "notes.txt"
        target.write_text("keep me")
        expected = r"it is not a directory"
    elif which == "old output plus a foreign file":
        target = merge_models(base, models, TA, tmp_path / "out", threads=1)
        (target / "results.csv").write_text("a,b\n")
        expected = r"it holds 'results\.csv', which is not part of a dare_lab output"
    else:   # someone else's dir with a file of that name
        target = tmp_path / "fake"
        target.mkdir()
        (target / "dare_lab_merge.json").write_text("[1, 2]")
        (target / "data.bin").write_bytes(b"\0" * 10)
        expected = r"its dare_lab_merge\.json is not dare_lab metadata"
    _refusal(tmp_path, base, models, target, expected)


def test_overwrite_refuses_cwd_home_and_root(tiny_bert_pool, tmp_path, monkeypatch):
    base, models = copy_pool(tiny_bert_pool, tmp_path / "pool")
    work = tmp_path / "work"
    (work / "deep").mkdir(parents=True)
    (work / "deep" / "file.txt").write_text("x")
    monkeypatch.chdir(work / "deep")
    _refusal(tmp_path, base, models, work / "deep", r"it is the current working directory$")
    _refusal(tmp_path, base, models, work, r"it contains the current working directory")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    _refusal(tmp_path, base, models, home, r"it is the home directory$")
    with pytest.raises(FileExistsError, match=r"^refusing to overwrite /: it is the file system root$"):
        merge_models(base, models, TA, "/", overwrite=True, threads=1)


def test_overwrite_replaces_a_previous_output(tiny_bert_pool, tmp_path):
    base, models = copy_pool(tiny_bert_pool, tmp_path / "pool")
    out = merge_models(base, models, TA, tmp_path / "out", threads=1)
    meta = json.loads((out / "dare_lab_merge.json").read_text())
    assert sorted(meta["files"]) == sorted(os.listdir(out))
    ties = build_method("ties", retain_ratio=0.5)
    again = merge_models(base, models, ties, tmp_path / "out", overwrite=True, threads=1)
    assert json.loads((again / "dare_lab_merge.json").read_text())["method"]["name"] == "ties"
    # an output written before the metadata listed its files is recognised by its file names
    meta = json.loads((again / "dare_lab_merge.json").read_text())
    del meta["files"], meta["format"]
    (again / "dare_lab_merge.json").write_text(json.dumps(meta))
    merge_models(base, models, TA, tmp_path / "out", overwrite=True, threads=1)
    # an empty directory may be replaced too; without overwrite nothing existing is
    (tmp_path / "empty").mkdir()
    merge_models(base, models, TA, tmp_path / "empty", overwrite=True, threads=1)
    with pytest.raises(FileExistsError, match="output directory already exists"):
        merge_models(base, models, TA, tmp_path / "empty", threads=1)


# ----------------------------------------------------------------- 2. canonical accumulation order

ORDER_METHODS = {
    "task_arithmetic": dict(name="task_arithmetic", scaling=0.7),
    "weighted_ta": dict(name="task_arithmetic", weights=(0.2, 0.5, 1.3)),
    "dare_ta": dict(name="dare_task_arithmetic", drop_rate=0.5, seed=3),
    "ties": dict(name="ties", retain_ratio=0.5),
    "weighted_dare_ties": dict(name="dare_ties", drop_rate=0.3, retain_ratio=0.6, weights=(1.5, 0.25, 0.75), seed=1),
    "average": dict(name="average"),
}


def _listed(pool, order, spec):
    """The pool listed in ``order`` and the method with its positional weights permuted along."""
    models = {m: pool.models[m] for m in order}
    spec = dict(spec)
    if "weights" in spec:
        by_name = dict(zip(sorted(pool.models), spec["weights"]))
        spec["weights"] = tuple(by_name[m] for m in order)
    return models, build_method(**spec)


@pytest.mark.parametrize("fast", [True, False], ids=["streamed", "reference"])
@pytest.mark.parametrize("key", list(ORDER_METHODS))
def test_listing_order_does_not_change_bits(pool3, tmp_path, key, fast, monkeypatch):
    monkeypatch.setattr(engine_merge, "_FAST", fast)
    spec = ORDER_METHODS[key]
    got = {}
    for order in itertools.permutations(sorted(pool3.models)):
        models, method = _listed(pool3, order, spec)
        out = merge_models(pool3.base, models, method, tmp_path / "-".join(order), threads=2, out_dtype="bfloat16"
                           if key == "dare_ta" else None)
        got[order] = shard_digests(out)
    assert len({json.dumps(v, sort_keys=True) for v in got.values()}) == 1, got


def test_listing_order_in_memory_and_name_keyed_weights(pool3):
    spec = ORDER_METHODS["weighted_dare_ties"]
    names = sorted(pool3.models)
    keyed = build_method(**{**spec, "weights": dict(zip(names, spec["weights"]))})
    ref = None
    for order in itertools.permutations(names):
        models, method = _listed(pool3, order, spec)
        for m in (method, keyed):
            sd = merge_models(pool3.base, models, m, None, threads=1)
            if ref is None:
                ref = sd
            assert all(torch.equal(sd[k].view(torch.uint8) if sd[k].is_floating_point() else sd[k],
                                   ref[k].view(torch.uint8) if ref[k].is_floating_point() else ref[k]) for k in ref)
    with pytest.raises(ValueError, match=r"^method weights must name exactly the pool's models \['ft0', 'ft1', 'ft2'\]: "
                                         r"no weight for 'ft2'$"):
        merge_models(pool3.base, pool3.models, build_method("task_arithmetic", weights={"ft0": 1.0, "ft1": 1.0}), None)


def test_metadata_records_weights_by_name(pool3, tmp_path):
    order = ["ft2", "ft0", "ft1"]
    models = {m: pool3.models[m] for m in order}
    out = merge_models(pool3.base, models, build_method("task_arithmetic", weights=(0.1, 0.2, 0.3)), tmp_path / "o")
    meta = json.loads((out / "dare_lab_merge.json").read_text())
    assert meta["method"]["merger"]["weights"] == {"ft0": 0.2, "ft1": 0.3, "ft2": 0.1}
    assert meta["accumulation_order"] == ["ft0", "ft1", "ft2"]


# ----------------------------------------------------------------- 3. index entries stay inside


def _sharded_copy(pool, tmp, name="bad"):
    dst = tmp / name
    shutil.copytree(pool.models["ft0"], dst)
    return dst


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entry_outside_the_model_dir_is_refused(tiny_llama_pool, tmp_path, how):
    bad = _sharded_copy(tiny_llama_pool, tmp_path)
    other = _sharded_copy(tiny_llama_pool, tmp_path, "other-model")
    index = bad / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    shard = "model-00001-of-00007.safetensors"
    if how == "dotdot":
        entry = f"../other-model/{shard}"
    elif how == "absolute":
        entry = str(other / shard)
    else:
        entry = shard
        (bad / shard).unlink()
        (bad / shard).symlink_to(other / shard)
    idx["weight_map"] = {k: (entry if v == shard else v) for k, v in idx["weight_map"].items()}
    index.write_text(json.dumps(idx))
    if how != "symlink":
        (bad / shard).unlink()      # the tensors now exist only in the other model
    with pytest.raises(ValueError) as info:
        merge_models(tiny_llama_pool.base, {"bad": str(bad)}, TA, tmp_path / "out")
    msg = one_line(info.value)
    assert msg.startswith(f"model 'bad': model.safetensors.index.json entry {entry!r} "), msg
    assert ("points outside" if how != "symlink" else "resolves outside") in msg, msg
    assert not (tmp_path / "out").exists()


def test_hub_cache_snapshot_links_into_blobs_are_fine(tiny_llama_pool, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in Path(tiny_llama_pool.models["ft0"]).iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    got = merge_models(tiny_llama_pool.base, {"ft0": str(snap)}, TA, None, threads=1)
    ref = merge_models(tiny_llama_pool.base, {"ft0": tiny_llama_pool.models["ft0"]}, TA, None, threads=1)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# ----------------------------------------------------------------- 4. content fingerprint


def _meta(out):
    return json.loads((Path(out) / "dare_lab_merge.json").read_text())


def _flip_one_weight(model_dir: Path, name: str) -> None:
    """Change one entry of one tensor in place, keeping the file layout (header) byte for byte."""
    for f in sorted(model_dir.glob("*.safetensors")):
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        if name in header:
            pos = 8 + n + header[name]["data_offsets"][0]
            raw[pos] ^= 0x01
            f.write_bytes(bytes(raw))
            return
    raise AssertionError(name)


@pytest.mark.parametrize("pool_name", ["tiny_bert_pool", "tiny_llama_pool"])
def test_fingerprint_changes_with_one_weight_and_not_with_threads(pool_name, request, tmp_path):
    pool = request.getfixturevalue(pool_name)
    base, models = copy_pool(pool, tmp_path / "pool")
    method = build_method("dare_ties", drop_rate=0.5, retain_ratio=0.5, seed=2)
    m1 = _meta(merge_models(base, models, method, tmp_path / "t1", threads=1))
    m2 = _meta(merge_models(base, models, method, tmp_path / "t2", threads=2))
    for k in ("base", "models"):
        assert m1[k] == m2[k]
    fp = m1["models"]["ft0"]
    assert re.fullmatch(r"[0-9a-f]{32}", fp["content_xxh3_128"]) and fp["tensors_hashed"] > 0
    assert fp["bytes_hashed"] > 0
    # the reference (whole-tensor) path computes the same digests
    engine_merge._FAST = False
    try:
        m3 = _meta(merge_models(base, models, method, tmp_path / "t3", threads=2))
    finally:
        engine_merge._FAST = True
    assert m3["models"] == m1["models"] and m3["base"] == m1["base"]
    # one weight of one merged tensor of one model changes: its fingerprint changes, the header hash does not
    names = [n for f in sorted(Path(models["ft1"]).glob("*.safetensors")) for n in load_file(f)]
    name = next(n for n in names if ".layer" in n and n.endswith("weight") and "norm" not in n)
    _flip_one_weight(Path(models["ft1"]), name)
    m4 = _meta(merge_models(base, models, method, tmp_path / "t4", threads=2))
    assert m4["models"]["ft1"]["content_xxh3_128"] != fp_of(m1, "ft1")
    assert m4["models"]["ft1"]["index_sha256"] == m1["models"]["ft1"]["index_sha256"]
    assert m4["models"]["ft0"] == m1["models"]["ft0"] and m4["base"] == m1["base"]
    # and the same for the base
    _flip_one_weight(Path(base), name)
    m5 = _meta(merge_models(base, models, method, tmp_path / "t5", threads=1))
    assert m5["base"]["content_xxh3_128"] != m1["base"]["content_xxh3_128"]


def fp_of(meta, m):
    return meta["models"][m]["content_xxh3_128"]


def test_fingerprint_covers_exactly_the_tensors_read(tiny_bert_pool, tmp_path):
    """Base: every tensor (merged or copied). Models: the merged tensors; their heads, outside the
    merge scope, are not read and not hashed (counted in ``tensors_not_hashed``)."""
    import xxhash

    meta = _meta(merge_models(tiny_bert_pool.base, tiny_bert_pool.models, TA, tmp_path / "o"))
    sd = load_file(Path(tiny_bert_pool.models["ft0"]) / "model.safetensors")
    base_sd = load_file(Path(tiny_bert_pool.base) / "model.safetensors")
    merged = [n for n in base_sd if not n.startswith("classifier")]
    h = xxhash.xxh3_128()
    for n in sorted(merged):
        t = sd[n]
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(f"{n}\t{str(t.dtype).removeprefix('torch.')}\t{list(t.shape)}\t{raw.nbytes}\t"
                 f"{xxhash.xxh3_128_hexdigest(raw)}\n".encode())
    fp = meta["models"]["ft0"]
    assert fp["content_xxh3_128"] == h.hexdigest()
    assert fp["tensors_hashed"] == len(merged) and fp["tensors_not_hashed"] == len(sd) - len(merged) > 0
    assert meta["base"]["tensors_hashed"] == len(base_sd) and meta["base"]["tensors_not_hashed"] == 0


# ----------------------------------------------------------------- 5. malformed headers, config.json


def _rewrite_header(model_dir: Path, edit) -> None:
    f = model_dir / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header = edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    f.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])


def _entry(key, value):
    def edit(h):
        if value is KeyError:
            del h[BERT_MAIN][key]
        else:
            h[BERT_MAIN][key] = value
        return h
    return edit


Q = re.escape(repr(BERT_MAIN))
HEADER_CASES = [
    ("header is a list", lambda h: [1, 2, 3], r"corrupt safetensors header \(not a JSON object but a list\)"),
    ("header is a string", lambda h: "weights", r"corrupt safetensors header \(not a JSON object but a str\)"),
    ("entry without data_offsets", _entry("data_offsets", KeyError), rf"corrupt safetensors header \(tensor {Q}: no data_offsets\)"),
    ("entry without dtype", _entry("dtype", KeyError), rf"corrupt safetensors header \(tensor {Q}: no dtype\)"),
    ("entry is a list", lambda h: {**h, BERT_MAIN: [1, 2]}, rf"corrupt safetensors header \(tensor {Q}: entry is a list, not an object\)"),
    ("dtype not a string", _entry("dtype", 5), rf"corrupt safetensors header \(tensor {Q}: dtype is not a string: 5\)"),
    ("unknown dtype", _entry("dtype", "F7"), rf"corrupt safetensors header \(tensor {Q}: unsupported dtype F7\)"),
    ("shape with strings", _entry("shape", ["32", "32"]), rf"corrupt safetensors header \(tensor {Q}: shape is not a list of non-negative integers: \[\"32\", \"32\"\]\)"),
    ("shape a number", _entry("shape", 1024), rf"corrupt safetensors header \(tensor {Q}: shape is not a list of non-negative integers: 1024\)"),
    ("negative shape", _entry("shape", [-32, -32]), rf"corrupt safetensors header \(tensor {Q}: shape is not a list of non-negative integers: \[-32, -32\]\)"),
    ("negative offsets", _entry("data_offsets", [-4096, 0]), rf"corrupt safetensors header \(tensor {Q}: data_offsets is not two non-negative integers: \[-4096, 0\]\)"),
    ("float offsets", _entry("data_offsets", [0.5, 4096.5]), rf"corrupt safetensors header \(tensor {Q}: data_offsets is not two non-negative integers: \[0\.5, 4096\.5\]\)"),
    ("three offsets", _entry("data_offsets", [0, 1, 2]), rf"corrupt safetensors header \(tensor {Q}: data_offsets is not two non-negative integers: \[0, 1, 2\]\)"),
    ("string offsets", _entry("data_offsets", "0-4096"), rf"corrupt safetensors header \(tensor {Q}: data_offsets is not two non-negative integers: \"0-4096\"\)"),
    ("offsets backwards", _entry("data_offsets", [4096, 0]), rf"corrupt safetensors header \(tensor {Q}: data_offsets end 0 is before start 4096\)"),
    ("metadata a list", lambda h: {**h, "__metadata__": ["pt"]}, r"corrupt safetensors header \(__metadata__ is not an object of strings\)"),
]


@pytest.mark.parametrize("edit,expected", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
@pytest.mark.parametrize("who", ["model", "base"])
def test_malformed_header_is_one_line(tiny_bert_pool, tmp_path, edit, expected, who):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert_pool.base if who == "base" else tiny_bert_pool.models["ft0"], bad)
    _rewrite_header(bad, edit)
    base, models = (str(bad), dict(tiny_bert_pool.models)) if who == "base" else (tiny_bert_pool.base, {"bad": str(bad)})
    with pytest.raises(ValueError) as info:
        merge_models(base, models, TA, tmp_path / "out" / "m")
    msg = one_line(info.value)
    assert re.fullmatch(rf"{re.escape(str(bad / 'model.safetensors'))}: {expected}", msg), msg
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_validator_words_the_same_problems(tiny_bert_pool, tmp_path):
    """validate.check_safetensors_file (also used on the written output) shares the shape check."""
    from dare_lab.engine.validate import CorruptCheckpointError, check_safetensors_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert_pool.models["ft0"], bad)
    _rewrite_header(bad, _entry("shape", ["32", "32"]))
    with pytest.raises(CorruptCheckpointError, match=rf"^model 'bad': model\.safetensors has a corrupt header \(tensor {Q}: shape"):
        check_safetensors_file(bad / "model.safetensors", "bad")


def _config(kind):
    def make(d: Path):
        cfg = d / "config.json"
        if kind == "list":
            cfg.write_text("[1, 2]")
        elif kind == "string":
            cfg.write_text('"bert"')
        elif kind == "null":
            cfg.write_text("null")
        elif kind == "directory":
            cfg.unlink()
            cfg.mkdir()
        elif kind == "model_type number":
            cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_type": 7}))
        elif kind == "not utf-8":
            cfg.write_bytes(b'{"model_type": "\xff\xfe"}')
    return make


CONFIG_CASES = [
    ("list", r"config\.json is not a JSON object \(it holds a list\)"),
    ("string", r"config\.json is not a JSON object \(it holds a string\)"),
    ("null", r"config\.json is not a JSON object \(it holds a null\)"),
    ("directory", r"config\.json is a directory, expected a JSON file \(\S+/config\.json\)"),
    ("model_type number", r"config\.json model_type is not a string \(7\)"),
    ("not utf-8", r"config\.json is not valid JSON"),
]


@pytest.mark.parametrize("kind,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
@pytest.mark.parametrize("who", ["model", "base"])
def test_config_json_shapes_are_one_line(tiny_bert_pool, tmp_path, kind, expected, who):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert_pool.base if who == "base" else tiny_bert_pool.models["ft0"], bad)
    _config(kind)(bad)
    base, models = (str(bad), dict(tiny_bert_pool.models)) if who == "base" else (tiny_bert_pool.base, {"bad": str(bad)})
    with pytest.raises(ValueError) as info:
        merge_models(base, models, TA, tmp_path / "out" / "m")
    msg = one_line(info.value)
    label = "base" if who == "base" else "bad"
    assert re.fullmatch(rf"model '{label}': {expected}", msg), msg
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("weight_map,expected", [
    ([["a", "b"]], r"corrupt index \S+ \(weight_map is not an object\)"),
    ({"model.norm.weight": 3}, r"model\.safetensors\.index\.json entry 3 is not a file name"),
])
def test_index_of_the_wrong_shape_is_one_line(tiny_llama_pool, tmp_path, weight_map, expected):
    bad = _sharded_copy(tiny_llama_pool, tmp_path)
    index = bad / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"] = weight_map if isinstance(weight_map, list) else {**idx["weight_map"], **weight_map}
    index.write_text(json.dumps(idx))
    with pytest.raises(ValueError) as info:
        merge_models(tiny_llama_pool.base, {"bad": str(bad)}, TA, tmp_path / "out")
    assert re.fullmatch(rf"model 'bad': {expected}", one_line(info.value)), str(info.value)


# ----------------------------------------------------------------- through the CLI: one line, exit 2


@pytest.mark.parametrize("which", ["input model", "foreign dir"])
def test_cli_overwrite_refusal_is_one_line_exit_2(tiny_bert_pool, tmp_path, which):
    import subprocess
    import sys

    base, models = copy_pool(tiny_bert_pool, tmp_path / "pool")
    if which == "input model":
        target, reason = Path(models["ft0"]), "it is an input (model 'a')"
    else:
        target = tmp_path / "mine"
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
        reason = "it is a non-empty directory that is not a dare_lab output (no dare_lab_merge.json)"
    before = tree_snapshot(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    (tmp_path / "cwd").mkdir()
    r = subprocess.run([sys.executable, "-m", "dare_lab.shell.cli", "modelpool=custom", f"modelpool.base={base}",
                        f"+modelpool.models={{a: {models['ft0']}}}", f"+output.model_dir={target}",
                        "output.overwrite=true"], cwd=tmp_path / "cwd", env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == f"dare-lab: error: refusing to overwrite {target.resolve()}: {reason}", r.stderr[-2000:]
    assert {k: v for k, v in tree_snapshot(tmp_path).items() if not k.startswith("cwd/")} == before


def test_fingerprint_of_a_reused_reader_is_recomputed(tiny_bert_pool, tmp_path):
    from dare_lab.engine import CheckpointReader

    base, models = copy_pool(tiny_bert_pool, tmp_path / "pool")
    reader = CheckpointReader(models["ft0"], "ft0")
    m1 = _meta(merge_models(base, {"ft0": reader, "ft1": models["ft1"]}, TA, tmp_path / "a"))
    _flip_one_weight(Path(models["ft0"]), BERT_MAIN)
    m2 = _meta(merge_models(base, {"ft0": reader, "ft1": models["ft1"]}, TA, tmp_path / "b"))
    assert fp_of(m1, "ft0") != fp_of(m2, "ft0") and fp_of(m1, "ft1") == fp_of(m2, "ft1")
