"""vLLM backend: exercised only where vLLM and a CUDA device are present."""

import pytest

from dare_lab.taskpool.generation import HFBackend, VLLMBackend, vllm_available
from dare_lab.pools.tiny import make_tiny_pool

OK, REASON = vllm_available()


def test_vllm_refuses_in_memory_models_and_bad_options():
    with pytest.raises(TypeError, match="in-memory model"):
        VLLMBackend(object())
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        VLLMBackend("/some/dir", tensor_parallel_size=0)


@pytest.mark.skipif(OK, reason="vLLM is available here")
def test_vllm_unavailable_is_reported():
    print(f"vLLM backend skipped: {REASON}")
    with pytest.raises(RuntimeError, match="vLLM backend unavailable"):
        VLLMBackend("/some/dir").generate(["hi"], 4)


@pytest.mark.gpu
@pytest.mark.skipif(not OK, reason=f"vLLM backend not exercised: {REASON}")
def test_vllm_matches_hf_greedy_in_fresh_workers(tmp_path):
    pool = make_tiny_pool(tmp_path, arch="llama", n_models=1)
    prompts = ["question: what is 2 plus 3? answer:", "the movie was"]
    outs = []
    for _ in range(2):  # a second model in the same process needs a fresh worker
        be = VLLMBackend(pool.base, tensor_parallel_size=1, dtype="float32", gpu_memory_utilization=0.3)
        try:
            out = be.generate(prompts, 8)
        finally:
            be.close()
        assert len(out) == 2 and all(isinstance(o, str) for o in out)
        outs.append(out)
    assert outs[0] == outs[1]  # greedy and deterministic across fresh workers
    # a random tiny model has near-tied logits, so only report agreement with HF
    hf = HFBackend(pool.base, batch_size=2, device="cuda").generate(prompts, 8)
    print("vLLM vs HF greedy agree:", outs[0] == hf)


@pytest.mark.gpu
@pytest.mark.skipif(not OK, reason=f"vLLM backend not exercised: {REASON}")
def test_vllm_from_the_gsm8k_preset_block_with_left_truncation(tmp_path):
    """The preset's vllm block (dtype auto, as the paper ran) and max_input_tokens on a real vLLM."""
    from dare_lab.taskpool.generation import make_backend

    pool = make_tiny_pool(tmp_path, arch="llama", n_models=1)
    spec = {"name": "vllm", "max_input_tokens": 16, "hf": {"batch_size": 8, "dtype": "float32"},
            "vllm": {"tensor_parallel_size": 1, "dtype": "auto", "gpu_memory_utilization": 0.3}}
    be = make_backend(spec, pool.base)
    try:
        out = be.generate(["word " * 200 + "### Response:", "short"], 4)
    finally:
        be.close()
    assert len(out) == 2 and be.kwargs["dtype"] == "auto" and "batch_size" not in be.kwargs
