"""PEFT LoRA adapters as pool members (issue 16 item 3), checked against peft's own merge_and_unload.

Adapters are made with peft on tiny random models (``dare_lab.pools.tiny``), lora_A/lora_B
randomised so every delta is non-zero, and saved with ``save_pretrained``.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")

from dare_lab.engine import merge as engine_merge  # noqa: E402
from dare_lab.engine.lora import LoraAdapterError, LoraSource  # noqa: E402
from dare_lab.engine.merge import merge_models  # noqa: E402
from dare_lab.engine.scope import Scope  # noqa: E402
from dare_lab.engine.sources import CheckpointReader  # noqa: E402
from dare_lab.ops.presets import build_method  # noqa: E402

TA = build_method("task_arithmetic", scaling=1.0)
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _load_dir(path) -> dict:
    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _model(base_dir, arch, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    return cls.from_pretrained(base_dir, dtype=dtype).eval()


def make_adapter(base_dir, out, arch="llama", seed=0, safe=True, dtype=torch.float32, **lora_kwargs):
    """A peft LoRA over the model in ``base_dir`` with random A and B; returns (adapter dir,
    merge_and_unload state dict, the merged model saved as a full checkpoint)."""
    from peft import LoraConfig, get_peft_model

    kw = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, **lora_kwargs}
    pm = get_peft_model(_model(base_dir, arch, dtype), LoraConfig(**kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    out = Path(out)
    pm.save_pretrained(out / "adapter", safe_serialization=safe)
    merged = pm.merge_and_unload()
    merged.save_pretrained(out / "full")
    return out / "adapter", {k: v.detach().clone() for k, v in merged.state_dict().items()}, out / "full"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from dare_lab.pools.tiny import make_tiny_pool

    root = tmp_path_factory.mktemp("lora_llama")
    pool = make_tiny_pool(root / "pool", "llama", n_models=1, seed=0)
    adapter, merged, full = make_adapter(pool.base, root / "a", "llama", seed=1)
    return pool, adapter, merged, full


# ---- (a) one adapter, task arithmetic λ = 1, no sparsifier == peft's merge_and_unload ---------------

def _check_against_peft(base_dir, adapter, merged, scope=None, dtype=torch.float32):
    got = merge_models(str(base_dir), {"lora": str(adapter)}, TA, None, scope=scope, threads=1, dtype=dtype)
    base = _load_dir(base_dir)
    changed = 0
    for name, t in got.items():
        want = merged[name]
        # θ_PRE + (θ_k − θ_PRE) in float32: round-off of θ_k's entries only
        torch.testing.assert_close(t, want, rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(want.abs().max() + 1))
        changed += not torch.equal(want, base[name])
    return changed


def test_single_adapter_task_arithmetic_equals_merge_and_unload(llama):
    pool, adapter, merged, _ = llama
    assert _check_against_peft(pool.base, adapter, merged) == 2 * len(LLAMA_TARGETS)   # 2 layers × targets


@pytest.mark.parametrize("variant", ["rslora_patterns", "bin", "bert_embedding_modules_to_save", "gpt2_fan_in_fan_out"])
def test_adapter_variants_equal_merge_and_unload(variant, tmp_path):
    from dare_lab.pools.tiny import make_tiny_pool

    scope = None
    if variant.startswith("gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "base")
        base = tmp_path / "base"
        adapter, merged, _ = make_adapter(base, tmp_path, "gpt2", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
        assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    else:
        arch = "bert" if variant.startswith("bert") else "llama"
        base = make_tiny_pool(tmp_path / "pool", arch, n_models=1, seed=2).base
        kw = {}
        if variant == "rslora_patterns":
            kw = {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 16}}
        elif variant == "bin":
            kw = {"safe": False}
        elif arch == "bert":
            kw = {"target_modules": ["query", "value", "word_embeddings"], "modules_to_save": ["classifier"]}
            scope = Scope(exclude=())          # merge the head too: modules_to_save is a full tensor
        adapter, merged, _ = make_adapter(base, tmp_path, arch, seed=3, **kw)
        if variant == "bin":
            assert (adapter / "adapter_model.bin").exists() and not (adapter / "adapter_model.safetensors").exists()
    changed = _check_against_peft(base, adapter, merged, scope)
    assert changed > 0
    if variant.startswith("bert"):
        src = LoraSource(adapter, CheckpointReader(base))
        assert "bert.embeddings.word_embeddings.weight" in src.targets()
        assert "classifier.weight" in src._full and "classifier.bias" in src._full   # noqa: SLF001


def test_float64_compute_dtype(llama):
    pool, adapter, merged, _ = llama
    _check_against_peft(pool.base, adapter, merged, dtype=torch.float64)


def test_bf16_base_delta_built_in_float32(tmp_path):
    """A bf16 base: the reader builds θ_k in float32 (δ keeps its float32 bits until the one
    final cast), peft's merge rounds Δ to bf16 before adding it: they agree to one bf16 step,
    and the engine's result is the float32 sum rounded once."""
    from dare_lab.pools.tiny import make_tiny_pool

    base = make_tiny_pool(tmp_path / "pool", "llama", n_models=1, seed=4, dtype=torch.bfloat16).base
    adapter, merged, _ = make_adapter(base, tmp_path, "llama", seed=5, dtype=torch.bfloat16)
    reader = CheckpointReader(base)
    src = LoraSource(adapter, reader)
    got = merge_models(str(base), {"lora": str(adapter)}, TA, None, threads=1)
    for name in src.targets():
        assert src.dtype(name) == torch.float32 and got[name].dtype == torch.bfloat16
        theta0 = reader.get(name, torch.float32)
        assert torch.equal(got[name], (theta0 + (src.materialise(name) - theta0)).to(torch.bfloat16))
        torch.testing.assert_close(got[name].float(), merged[name].float(), rtol=2 ** -7, atol=1e-6)


# ---- (b) DARE + TIES on a mixed pool == the same pool with the adapter's merged checkpoint ----------

@pytest.mark.parametrize("fast", [True, False], ids=["streamed", "reference"])
def test_mixed_pool_dare_ties_bit_identical_to_merged_checkpoint(llama, tmp_path, fast, monkeypatch):
    """Bit-identical: the reader builds θ_k = W + (B @ A) * scale in float32 with peft's own
    operations (peft's merge adds the same float32 Δ to W), so the engine reads the very float32
    tensor that merge_and_unload saved, and every later step is the same computation."""
    pool, adapter, _, full = llama
    monkeypatch.setattr(engine_merge, "_FAST", fast)
    method = build_method("dare_ties", drop_rate=0.5, retain_ratio=0.5, scaling=0.8, seed=3)
    a = merge_models(pool.base, {"ft0": pool.models["ft0"], "lora": str(adapter)}, method, tmp_path / "a", threads=2)
    b = merge_models(pool.base, {"ft0": pool.models["ft0"], "lora": str(full)}, method, tmp_path / "b", threads=2)
    sa, sb = _load_dir(a), _load_dir(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    meta = json.loads((a / "dare_lab_merge.json").read_text())
    assert meta["models"]["lora"]["ref"] == str(adapter) and meta["models"]["lora"]["lora_targets"] == 2 * len(LLAMA_TARGETS)


def test_mixed_pool_dare_task_arithmetic_masks_seeded_as_usual(llama):
    """The adapter's DARE masks are those of (seed, model name, tensor name): in-memory merges of
    the adapter and of its merged checkpoint agree bit for bit under the same model name."""
    pool, adapter, _, full = llama
    method = build_method("dare_task_arithmetic", drop_rate=0.7, seed=11)
    a = merge_models(pool.base, {"lora": str(adapter), "ft0": pool.models["ft0"]}, method, None, threads=1)
    b = merge_models(pool.base, {"ft0": pool.models["ft0"], "lora": str(full)}, method, None, threads=1)
    assert all(torch.equal(a[n], b[n]) for n in a)


# ---- (c) unsupported adapters and name mismatches: one-line errors ---------------------------------

def _edited(adapter, tmp_path, config=None, tensors=None):
    out = tmp_path / "edited"
    out.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(config or {})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(adapter / "adapter_model.safetensors")
    if tensors:
        sd = tensors(sd)
    save_file(sd, out / "adapter_model.safetensors")
    return out


def _rename_first_target(sd):
    key = next(k for k in sd if "q_proj.lora_A" in k)
    return {(k.replace("q_proj", "qq_proj") if k.startswith(key.split("q_proj")[0] + "q_proj") else k): v for k, v in sd.items()}


def _add_magnitude(sd):
    key = next(k for k in sd if "q_proj.lora_A" in k)
    return {**sd, key.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(32)}


def _add_lora_bias(sd):
    key = next(k for k in sd if "q_proj.lora_B" in k)
    return {**sd, key.replace(".weight", ".bias"): torch.ones(32)}


@pytest.mark.parametrize("config, tensors, match", [
    ({"use_dora": True}, None, r"DoRA \(use_dora\)"),
    ({"peft_type": "LOHA"}, None, r"peft_type 'LOHA'"),
    ({"peft_type": "LOKR"}, None, r"peft_type 'LOKR'"),
    ({"peft_type": "IA3"}, None, r"peft_type 'IA3'"),
    ({"lora_bias": True}, None, r"LoRA biases"),
    (None, _add_magnitude, r"DoRA \(lora_magnitude_vector"),
    (None, _add_lora_bias, r"unsupported kind"),
    (None, _rename_first_target, r"targets module 'model\.layers\.0\.self_attn\.qq_proj'.*the base model lacks"),
    ({"r": 8}, None, r"has rank 4, adapter_config says 8"),
])
def test_unsupported_adapters_are_one_line_errors(llama, tmp_path, config, tensors, match):
    pool, adapter, _, _ = llama
    bad = _edited(adapter, tmp_path, config, tensors)
    with pytest.raises(LoraAdapterError, match=match) as err:
        merge_models(pool.base, {"ft0": pool.models["ft0"], "bad": str(bad)}, TA, tmp_path / "out")
    assert "\n" not in str(err.value) and "'bad'" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_real_dora_adapter_refused(llama, tmp_path):
    pool, _, _, _ = llama
    from peft import LoraConfig, get_peft_model

    get_peft_model(_model(pool.base, "llama"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path / "dora")
    with pytest.raises(LoraAdapterError, match="DoRA"):
        merge_models(pool.base, {"dora": str(tmp_path / "dora")}, TA, None)


def test_truncated_adapter_file_is_one_line(llama, tmp_path):
    pool, adapter, _, _ = llama
    bad = _edited(adapter, tmp_path)
    f = bad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"model 'bad': adapter_model.safetensors is truncated") as err:
        merge_models(pool.base, {"bad": str(bad)}, TA, None)
    assert "\n" not in str(err.value)


def test_adapter_as_base_is_refused(llama):
    pool, adapter, _, _ = llama
    with pytest.raises(LoraAdapterError, match="is a LoRA adapter, not a full model"):
        merge_models(str(adapter), {"ft0": pool.models["ft0"]}, TA, None)


def test_shape_mismatch_is_one_line(llama, tmp_path):
    pool, adapter, _, _ = llama

    def widen(sd):
        key = next(k for k in sd if "q_proj.lora_B" in k)
        return {**sd, key: torch.zeros(40, sd[key].shape[1])}
    bad = _edited(adapter, tmp_path, None, widen)
    with pytest.raises(LoraAdapterError, match=r"delta B·A is \[40, 32\], weight .* is \[32, 32\]"):
        merge_models(pool.base, {"bad": str(bad)}, TA, None)


# ---- (d) memory: the delta is built one tensor at a time, never cached -------------------------------

@pytest.mark.parametrize("method_name, fast", [("dare_ties", True), ("dare_task_arithmetic", True),
                                               ("dare_task_arithmetic", False)])
def test_adapter_materialised_one_tensor_at_a_time(llama, method_name, fast, monkeypatch):
    pool, adapter, _, _ = llama
    monkeypatch.setattr(engine_merge, "_FAST", fast)
    base = CheckpointReader(pool.base, "base")
    src = LoraSource(adapter, base, "lora")
    assert not any(isinstance(v, torch.Tensor) for v in vars(src).values())
    merge_models(base, {"lora": src, "ft0": pool.models["ft0"]}, build_method(method_name, drop_rate=0.5, seed=1),
                 None, threads=1)
    assert src.materialised == len(src.targets()) == 2 * len(LLAMA_TARGETS)   # each target built once
    assert src.peak_live == 1 and src.live == 0                                 # one at a time, all freed
    assert not any(isinstance(v, torch.Tensor) for v in vars(src).values())    # nothing cached


def test_two_workers_hold_at_most_two(llama):
    pool, adapter, _, _ = llama
    base = CheckpointReader(pool.base, "base")
    src = LoraSource(adapter, base, "lora")
    merge_models(base, {"lora": src}, build_method("dare_ties", drop_rate=0.5, seed=1), None, threads=2)
    assert src.materialised == len(src.targets()) and 1 <= src.peak_live <= 2 and src.live == 0


def test_cli_takes_an_adapter_in_a_pool(llama, tmp_path):
    import os
    import subprocess

    pool, adapter, _, full = llama
    method = build_method("dare_task_arithmetic", drop_rate=0.5, seed=0)
    want = merge_models(pool.base, {"ft0": pool.models["ft0"], "lora": str(adapter)}, method, tmp_path / "api")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run(["dare-lab", "modelpool=custom", f"modelpool.base={pool.base}",
                           f"+modelpool.models={{ft0: {pool.models['ft0']}, lora: {adapter}}}", "method.drop_rate=0.5",
                           f"output.model_dir={tmp_path / 'cli'}", "output.progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _load_dir(want), _load_dir(tmp_path / "cli")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
