"""Bad input: one clear line naming the culprit, a non-zero exit, and no output left behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dare_lab.engine import merge_models
from dare_lab.ops.presets import build_method
from dare_lab.pools.tiny import make_tiny_pool

TA = build_method("task_arithmetic")


def assert_nothing_left(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def copy_model(src, dst, edit=None):
    import shutil

    shutil.copytree(src, dst)
    if edit:
        f = Path(dst) / "model.safetensors"
        sd = load_file(f)
        edit(sd)
        save_file(sd, f, metadata={"format": "pt"})
    return str(dst)


def expect_error(tmp_path, base, models, match, method=TA, **kw):
    out = tmp_path / "merged"
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        merge_models(base, models, method, out, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert match in msg, msg
    assert_nothing_left(out)
    return msg


def test_shape_mismatch_names_tensor_and_model(tiny_bert_pool, tmp_path):
    def widen(sd):
        sd["bert.encoder.layer.0.output.dense.bias"] = torch.zeros(33)
    bad = copy_model(tiny_bert_pool.models["ft0"], tmp_path / "bad", widen)
    expect_error(tmp_path, tiny_bert_pool.base, {"bad": bad}, "shape mismatch in 'bert.encoder.layer.0.output.dense.bias': model 'bad' has [33]")


def test_architecture_mismatch(tiny_bert_pool, tiny_llama_pool, tmp_path):
    expect_error(tmp_path, tiny_bert_pool.base, {"llama": tiny_llama_pool.models["ft0"]}, "architecture mismatch: base is 'bert', model 'llama' is 'llama'")


def test_missing_tensor(tiny_bert_pool, tmp_path):
    bad = copy_model(tiny_bert_pool.models["ft0"], tmp_path / "bad", lambda sd: sd.pop("bert.pooler.dense.weight"))
    expect_error(tmp_path, tiny_bert_pool.base, {"ok": tiny_bert_pool.models["ft1"], "bad": bad},
                 "tensor 'bert.pooler.dense.weight' is missing in model 'bad'")


def test_nan_in_delta_is_reported_with_tensor_name(tiny_bert_pool, tmp_path):
    def poison(sd):
        sd["bert.encoder.layer.1.attention.self.query.weight"][3, 4] = float("nan")
    bad = copy_model(tiny_bert_pool.models["ft0"], tmp_path / "bad", poison)
    expect_error(tmp_path, tiny_bert_pool.base, {"bad": bad},
                 "NaN/Inf in the delta of tensor 'bert.encoder.layer.1.attention.self.query.weight' of model 'bad'")


def test_inf_in_delta_is_reported_during_a_threaded_merge(tiny_bert_pool, tmp_path):
    def poison(sd):
        sd["bert.embeddings.word_embeddings.weight"][0, 0] = float("inf")
    bad = copy_model(tiny_bert_pool.models["ft0"], tmp_path / "bad", poison)
    expect_error(tmp_path, tiny_bert_pool.base, {"bad": bad}, "NaN/Inf in the delta of tensor 'bert.embeddings.word_embeddings.weight'", threads=2)


def test_vocabulary_mismatch_is_an_error_by_default_and_truncate_is_explicit(tmp_path):
    pool = make_tiny_pool(tmp_path / "p", "llama", n_models=1)

    def add_token(sd):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], torch.zeros(1, sd[k].shape[1])])
    big = copy_model(pool.models["ft0"], tmp_path / "big", add_token)
    rows = load_file(Path(pool.base) / "model.safetensors")["model.embed_tokens.weight"].shape[0]
    msg = expect_error(tmp_path, pool.base, {"big": big}, f"model 'big' has {rows + 1} rows, base has {rows} (set vocab_policy=truncate")
    assert msg.startswith(("vocabulary mismatch in 'lm_head.weight'", "vocabulary mismatch in 'model.embed_tokens.weight'"))
    out = merge_models(pool.base, {"big": big}, TA, tmp_path / "ok", vocab_policy="truncate")
    assert load_file(out / "model.safetensors")["lm_head.weight"].shape[0] == rows


def test_nonexistent_path_and_offline_hub_id(tiny_bert_pool, tmp_path, monkeypatch):
    expect_error(tmp_path, tiny_bert_pool.base, {"x": str(tmp_path / "nope")}, f"model path does not exist: {tmp_path / 'nope'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    expect_error(tmp_path, tiny_bert_pool.base, {"x": "someone/not-cached-model"},
                 "model 'someone/not-cached-model' is not a local directory and cannot be fetched from the hub: offline")


def test_existing_output_is_not_overwritten_silently(tiny_bert_pool, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    with pytest.raises(FileExistsError, match="output directory already exists"):
        merge_models(tiny_bert_pool.base, tiny_bert_pool.models, TA, out)


def run_cli(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "dare_lab.shell.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,message", [
    ("method.drop_rate=1.0", "dare-lab: error: drop rate p=1.0 is outside [0, 1) (rescaling by 1/(1-p) needs p < 1)"),
    ("method.drop_rate=-0.2", "dare-lab: error: drop rate p=-0.2 is outside [0, 1)"),
    ("modelpool.base=/does/not/exist", "dare-lab: error: model path does not exist: /does/not/exist"),
])
def test_cli_bad_input_one_line_exit_2_no_run_dir(tiny_bert_pool, tmp_path, override, message):
    r = run_cli(tmp_path, "modelpool=custom", f"modelpool.base={tiny_bert_pool.base}",
                f"+modelpool.models={{a: {tiny_bert_pool.models['ft0']}}}", override)
    assert r.returncode == 2
    assert r.stderr.strip() == message
    runs = tmp_path / "results" / "default"
    assert not runs.exists() or not any(runs.iterdir())
