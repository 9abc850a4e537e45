"""The bad-input corpus: each case is one damaged input or wrong setting and the exact one-line
message it must produce. Engine cases also check that nothing is left at the output path;
override cases go through the same pre-check ``dare-lab`` runs before any job starts.

The file's damage happens on copies of the session's tiny pools (tests/conftest.py).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dare_lab.engine import Scope, merge_models
from dare_lab.ops.presets import build_method

TA = build_method("task_arithmetic")
BERT_MAIN = "bert.encoder.layer.0.attention.self.query.weight"


# ----------------------------------------------------------------- damage helpers


def copy(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


def edit_single(model_dir, edit):
    f = Path(model_dir) / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def header_of(file):
    raw = Path(file).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_with_header(file, header, data):
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    Path(file).write_bytes(len(hb).to_bytes(8, "little") + hb + data)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/dare_lab_pwned",))


# ----------------------------------------------------------------- the corpus
# Each case: (id, build(tmp, bert, llama) -> (base, models, kwargs), expected message as a regex)


def c_truncated(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return bert.base, {"bad": str(bad)}, {}


def c_corrupt_header_json(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    f = bad / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:16] = b"#garbage"
    f.write_bytes(bytes(raw))
    return bert.base, {"bad": str(bad)}, {}


def c_header_length_too_big(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    f = bad / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes((10**9).to_bytes(8, "little") + raw[8:])
    return bert.base, {"bad": str(bad)}, {}


def c_tiny_file(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    (bad / "model.safetensors").write_bytes(b"\x01\x02")
    return bert.base, {"bad": str(bad)}, {}


def c_wrong_span(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    f = bad / "model.safetensors"
    header, data = header_of(f)
    header[BERT_MAIN]["dtype"] = "F16"  # offsets still span 32x32 float32
    write_with_header(f, header, data)
    return bert.base, {"bad": str(bad)}, {}


def c_trailing_bytes(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"\0" * 64)
    return bert.base, {"bad": str(bad)}, {}


def c_missing_shard(tmp, bert, llama):
    bad = copy(llama.models["ft0"], tmp / "bad")
    (bad / "model-00003-of-00007.safetensors").unlink()
    return llama.base, {"bad": str(bad)}, {}


def c_index_names_wrong_shard(tmp, bert, llama):
    bad = copy(llama.models["ft0"], tmp / "bad")
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "model-00001-of-00007.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    return llama.base, {"bad": str(bad)}, {}


def c_corrupt_index(tmp, bert, llama):
    bad = copy(llama.models["ft0"], tmp / "bad")
    (bad / "model.safetensors.index.json").write_text("{not json")
    return llama.base, {"bad": str(bad)}, {}


def c_tensor_in_two_shards(tmp, bert, llama):
    bad = copy(llama.models["ft0"], tmp / "bad")
    f1 = bad / "model-00001-of-00007.safetensors"
    sd = load_file(f1)
    sd["model.norm.weight"] = load_file(bad / "model-00007-of-00007.safetensors")["model.norm.weight"]
    save_file(sd, f1, metadata={"format": "pt"})
    return llama.base, {"bad": str(bad)}, {}


def c_int_dtype(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    edit_single(bad, lambda sd: sd.__setitem__(BERT_MAIN, sd[BERT_MAIN].to(torch.int32)))
    return bert.base, {"bad": str(bad)}, {}


def c_int_head(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    edit_single(bad, lambda sd: sd.__setitem__("classifier.weight", sd["classifier.weight"].to(torch.int64)))
    return bert.base, {"bad": str(bad)}, {}


def c_nan_in_base(tmp, bert, llama):
    base = copy(bert.base, tmp / "base")
    edit_single(base, lambda sd: sd[BERT_MAIN].__setitem__((1, 2), float("nan")))
    return str(base), dict(bert.models), {}


def c_inf_in_model(tmp, bert, llama):
    bad = copy(bert.models["ft1"], tmp / "bad")
    edit_single(bad, lambda sd: sd["bert.pooler.dense.bias"].__setitem__(0, float("-inf")))
    return bert.base, {"ok": bert.models["ft0"], "bad": str(bad)}, {}


def c_wrong_vocab(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    key = "bert.embeddings.word_embeddings.weight"
    edit_single(bad, lambda sd: sd.__setitem__(key, torch.cat([sd[key], torch.zeros(3, sd[key].shape[1])])))
    return bert.base, {"bad": str(bad)}, {}


def c_shape_mismatch(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    edit_single(bad, lambda sd: sd.__setitem__(BERT_MAIN, sd[BERT_MAIN][:, :16].contiguous()))
    return bert.base, {"bad": str(bad)}, {}


def c_missing_tensor(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    edit_single(bad, lambda sd: sd.pop("bert.pooler.dense.bias"))
    return bert.base, {"ok": bert.models["ft1"], "bad": str(bad)}, {}


def c_extra_tensor(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    edit_single(bad, lambda sd: sd.__setitem__("bert.adapter.weight", torch.zeros(4, 4)))
    return bert.base, {"bad": str(bad)}, {}


def c_architecture(tmp, bert, llama):
    return bert.base, {"llama": llama.models["ft0"]}, {}


def c_bad_config_json(tmp, bert, llama):
    bad = copy(bert.models["ft0"], tmp / "bad")
    (bad / "config.json").write_text("{oops")
    return bert.base, {"bad": str(bad)}, {}


def c_nonexistent(tmp, bert, llama):
    return bert.base, {"x": str(tmp / "nope")}, {}


def c_file_not_dir(tmp, bert, llama):
    return bert.base, {"x": str(Path(bert.models["ft0"]) / "config.json")}, {}


def c_no_weights(tmp, bert, llama):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "config.json").write_text("{}")
    return bert.base, {"x": str(tmp / "empty")}, {}


def c_pickle_bin(tmp, bert, llama):
    bad = tmp / "evil"
    bad.mkdir()
    shutil.copy(Path(bert.models["ft0"]) / "config.json", bad / "config.json")
    torch.save({"w": torch.zeros(2), "evil": Evil()}, bad / "pytorch_model.bin")  # zip format, code in the pickle
    return bert.base, {"evil": str(bad)}, {}


def c_empty_pool(tmp, bert, llama):
    return bert.base, {}, {}


def c_scope_selects_nothing(tmp, bert, llama):
    return bert.base, dict(bert.models), {"scope": Scope(include=("^nothing$",))}


def c_bad_dtype(tmp, bert, llama):
    return bert.base, dict(bert.models), {"dtype": "float8"}


def c_bad_vocab_policy(tmp, bert, llama):
    return bert.base, dict(bert.models), {"vocab_policy": "pad"}


P = r"\S+"  # a temporary path
ENGINE_CASES = [
    ("truncated safetensors", c_truncated, rf"{P}/bad/model\.safetensors: truncated safetensors file \(tensors need \d+ bytes, file has \d+\)"),
    ("corrupt header (not JSON)", c_corrupt_header_json, rf"{P}/bad/model\.safetensors: corrupt safetensors header \(not JSON\)"),
    ("header length beyond the file", c_header_length_too_big, rf"{P}/bad/model\.safetensors: corrupt safetensors header \(declares 1000000000 header bytes, file has \d+\)"),
    ("2-byte file", c_tiny_file, rf"{P}/bad/model\.safetensors: truncated safetensors file \(2 bytes\)"),
    ("tensor span does not match shape", c_wrong_span, rf"model 'bad': model\.safetensors: tensor '{BERT_MAIN}' declares 4096 bytes for shape \[32, 32\] F16 \(2048 expected\)"),
    ("bytes after the last tensor", c_trailing_bytes, r"model 'bad': model\.safetensors has 64 bytes after its last tensor"),
    ("missing shard named in index", c_missing_shard, r"model 'bad': shard model-00003-of-00007\.safetensors named in model\.safetensors\.index\.json is missing"),
    ("index names the wrong shard", c_index_names_wrong_shard, r"model 'bad': model\.safetensors\.index\.json names tensor 'model\.norm\.weight' in model-00001-of-00007\.safetensors, which does not hold it"),
    ("corrupt index", c_corrupt_index, rf"model 'bad': corrupt index {P}/bad/model\.safetensors\.index\.json"),
    ("tensor stored in two shards", c_tensor_in_two_shards, r"model 'bad': tensor 'model\.norm\.weight' is stored twice \(model-00001-of-00007\.safetensors and model-00007-of-00007\.safetensors\)"),
    ("int dtype tensor", c_int_dtype, rf"tensor '{BERT_MAIN}' of model 'bad' has non-float dtype torch\.int32"),
    ("int dtype in a copied tensor", c_int_head, r"dtype mismatch in 'classifier\.weight': base has torch\.float32, model 'bad' has torch\.int64"),
    ("NaN in base", c_nan_in_base, rf"NaN/Inf in tensor '{BERT_MAIN}' of the base model 'base'"),
    ("Inf in a fine-tuned model", c_inf_in_model, r"NaN/Inf in the delta of tensor 'bert\.pooler\.dense\.bias' of model 'bad'"),
    ("wrong vocab", c_wrong_vocab, r"vocabulary mismatch in 'bert\.embeddings\.word_embeddings\.weight': model 'bad' has \d+ rows, base has \d+ \(set vocab_policy=truncate to keep the base's \d+ rows\)"),
    ("shape mismatch", c_shape_mismatch, rf"shape mismatch in '{BERT_MAIN}': model 'bad' has \[32, 16\], base has \[32, 32\]"),
    ("missing tensor", c_missing_tensor, r"tensor 'bert\.pooler\.dense\.bias' is missing in model 'bad'"),
    ("tensor missing in the base", c_extra_tensor, r"tensor 'bert\.adapter\.weight' of model 'bad' is missing in the base model"),
    ("architecture mismatch", c_architecture, r"architecture mismatch: base is 'bert', model 'llama' is 'llama'"),
    ("config.json not JSON", c_bad_config_json, r"model 'bad': config\.json is not valid JSON"),
    ("nonexistent path", c_nonexistent, rf"model path does not exist: {P}/nope"),
    ("file instead of a directory", c_file_not_dir, rf"model '{P}/config\.json' is a file, expected a model directory"),
    ("directory without weights", c_no_weights, rf"model 'x': no model\.safetensors, safetensors index or pytorch_model\.bin in {P}/empty"),
    ("pickle .bin with code", c_pickle_bin, r"model 'evil': cannot load pytorch_model\.bin with weights_only=True \(UnpicklingError\)"),
    ("empty pool", c_empty_pool, r"the model pool has no fine-tuned models"),
    ("scope selects nothing", c_scope_selects_nothing, r"no tensor is selected for merging: check scope include/exclude"),
    ("unknown compute dtype", c_bad_dtype, r"unknown dtype 'float8'; choose one of \[.*\]"),
    ("unknown vocab policy", c_bad_vocab_policy, r"unknown vocab_policy 'pad'; choose one of \('error', 'truncate'\)"),
]


@pytest.mark.parametrize("build,expected", [c[1:] for c in ENGINE_CASES], ids=[c[0] for c in ENGINE_CASES])
def test_engine_bad_input(build, expected, tiny_bert_pool, tiny_llama_pool, tmp_path):
    base, models, kwargs = build(tmp_path, tiny_bert_pool, tiny_llama_pool)
    out = tmp_path / "out" / "merged"
    with pytest.raises((ValueError, FileNotFoundError, TypeError)) as info:
        merge_models(base, models, TA, out, threads=2, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert re.fullmatch(expected, msg), msg
    assert not out.parent.exists() or not list(out.parent.iterdir())  # nothing left, not even a hidden tmp
    assert not Path("/tmp/dare_lab_pwned").exists()


# ----------------------------------------------------------------- settings and overrides

SETTING_CASES = [
    ("unknown method name", lambda: build_method("dare_tie"),
     r"unknown merge method 'dare_tie'; choose one of \[.*'dare_ties'.*\] or set sparsifier and merger"),
    ("bad regex in scope", lambda: Scope(include=("(unclosed",)),
     r"invalid scope regex '\(unclosed': missing \), unterminated subpattern at position 0"),
    ("drop rate 1", lambda: build_method("dare_ties", drop_rate=1.0),
     r"drop rate p=1\.0 is outside \[0, 1\) \(rescaling by 1/\(1-p\) needs p < 1\)"),
]


@pytest.mark.parametrize("make,expected", [c[1:] for c in SETTING_CASES], ids=[c[0] for c in SETTING_CASES])
def test_setting_errors(make, expected):
    with pytest.raises(ValueError) as info:
        make()
    assert re.fullmatch(expected, str(info.value)), str(info.value)


# every option of the method group, as the message must list them
METHODS = ", ".join(sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "method").glob("*.yaml")))
OVERRIDE_CASES = [
    (["method=dare_tie"], f"unknown method 'dare_tie' (method=dare_tie); did you mean 'dare_ties'? choose one of: {METHODS}"),
    (["-m", "method=ties,nope"], f"unknown method 'nope' (method=nope); choose one of: {METHODS}"),
    (["modelpool=tiny_bret"], "unknown modelpool 'tiny_bret' (modelpool=tiny_bret); did you mean 'tiny_bert'? choose one of: "),
    (["engine.thread=2"], "unknown config key 'engine.thread'; did you mean 'threads'? valid keys under 'engine': dtype, out_dtype, "
                          "threads, max_shard_size, vocab_policy, scope (use +engine.thread=... to add a new key)"),
    (["methd=ties"], "unknown config key 'methd'; did you mean 'method'? valid keys at the top level: "),
    (["engine.threads=two"], "engine.threads=two: expected an integer (default 2)"),
    (["-m", "method.drop_rate=0.1,high"], "method.drop_rate=high: expected a number (default 0.9)"),
    (["output.overwrite=yes"], "output.overwrite=yes: expected true or false (default false)"),
    (["method.seed=1.5"], "method.seed=1.5: expected an integer (default 0)"),
    (["engine=fast"], "engine=fast: expected a config group/mapping (default {dtype, out_dtype, threads, max_shard_size, vocab_policy, scope})"),
    (["+method.drop_rat=0.5"], "unknown parameter 'drop_rat' of method (dare_lab.ops.presets.build_method); did you mean 'drop_rate'? valid: "
                              "name, sparsifier, drop_rate, rescale, target, sampler, merger, scaling, retain_ratio, merge_func, "
                              "weights, weighted_election, seed"),
    (["engine.threads=[1,2"], "cannot parse the overrides: no viable alternative at input '[1,2'"),
]


@pytest.mark.parametrize("argv,expected", OVERRIDE_CASES, ids=[" ".join(c[0]) for c in OVERRIDE_CASES])
def test_override_errors_name_the_valid_choices(argv, expected):
    from dare_lab.shell.cli import precheck

    msg = precheck(argv)
    assert msg is not None and "\n" not in msg
    assert msg.startswith(expected), msg


def test_valid_overrides_pass_the_precheck(tiny_bert_pool):
    from dare_lab.shell.cli import precheck

    # every job's inputs are checked too (preflight): real models, values that act on each method
    assert precheck(["-m", "method=dare_task_arithmetic,dare_ties", "method.drop_rate=0.1,0.5", "engine.threads=1",
                     "modelpool=custom", f"modelpool.base={tiny_bert_pool.base}",
                     f"+modelpool.models={{a: {tiny_bert_pool.models['ft0']}}}",
                     "hydra.sweep.dir=/tmp/x", "resume.force=true", "+secrets.api_key=x"]) is None
    assert precheck(["--cfg", "job", "method=nope"]) is None  # left to Hydra


def test_cli_override_error_is_one_line_exit_2_and_no_run_dir(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "dare_lab.shell.cli", "method=dare_tie", "+api_token=hunter2-secret"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == f"dare-lab: error: unknown method 'dare_tie' (method=dare_tie); did you mean 'dare_ties'? choose one of: {METHODS}"
    assert not (tmp_path / "results").exists()


def test_corpus_size():
    assert len(ENGINE_CASES) + len(SETTING_CASES) + len(OVERRIDE_CASES) >= 15
