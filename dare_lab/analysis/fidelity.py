"""A label-free taskpool: how closely does a (sparsified/merged) model reproduce each SFT model?

For every fine-tuned model k of the pool, the evaluated body is put into k's own task model
(its head / LM head kept when the body does not carry one) and run on ``texts``:

* ``<k>/agreement``: share of predictions equal to the SFT model's own (argmax class for
  sequence classifiers, argmax next token over non-padding positions for causal LMs);
* ``<k>/logit_cos``: mean cosine similarity of the output logits to the SFT model's.

Useful where no labelled data exists (tiny test pools, the fast mode of the reproduce
scripts, any hub model pair): 1.0 means "behaves exactly like the SFT model".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dare_lab.engine.pool import ModelPool


def _load(ref: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from dare_lab.engine.sources import resolve_model_dir

    path = str(resolve_model_dir(ref))
    cfg = AutoConfig.from_pretrained(path)
    archs = " ".join(cfg.architectures or [])
    cls = AutoModelForCausalLM if "CausalLM" in archs else AutoModelForSequenceClassification
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model, tok


class FidelityTaskPool:
    """``texts``: inputs (default: the tiny corpus of ``dare_lab.pools.tiny``); ``n``: how many."""

    def __init__(self, texts: Sequence[str] | None = None, n: int = 28, batch_size: int = 16, max_length: int = 64):
        if texts is None:
            from dare_lab.pools.tiny import CORPUS

            texts = CORPUS
        self.texts = [str(t) for t in list(texts)[: int(n)]]
        if not self.texts:
            raise ValueError("fidelity taskpool has no texts")
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self._models: dict[str, tuple[Any, Any, dict, list]] = {}

    def _reference(self, name: str, ref: str):
        if name not in self._models:
            model, tok = _load(ref)
            original = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self._models[name] = (model, tok, original, self._outputs(model, tok))
        return self._models[name]

    @torch.inference_mode()
    def _outputs(self, model, tok) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outs = []
        for s in range(0, len(self.texts), self.batch_size):
            enc = tok(self.texts[s:s + self.batch_size], padding=True, truncation=True, max_length=self.max_length,
                      return_tensors="pt")
            logits = model(**enc).logits.float()
            outs.append((logits, enc["attention_mask"]))
        return outs

    def evaluate_state_dict(self, body: Mapping[str, torch.Tensor], pool: ModelPool, label: str = "model") -> dict[str, float]:
        from dare_lab.analysis.similarity import load_body_state, token_cosine

        results: dict[str, float] = {}
        for name, ref in pool.models.items():
            model, tok, original, ref_out = self._reference(name, ref)
            try:
                if load_body_state(model, body) == 0:
                    raise ValueError(f"{label}: no tensor matches the parameters of {name!r}")
                agree = total = 0
                cos_sum = 0.0
                for (ref_logits, mask), (logits, _) in zip(ref_out, self._outputs(model, tok)):
                    cos = token_cosine(ref_logits, logits)
                    same = ref_logits.argmax(-1) == logits.argmax(-1)
                    if logits.dim() == 3:  # causal LM: every non-padding position
                        keep = mask.bool()
                        cos, same = cos[keep], same[keep]
                    agree += int(same.sum())
                    total += same.numel()
                    cos_sum += float(cos.sum())
                results[f"{name}/agreement"] = agree / max(total, 1)
                results[f"{name}/logit_cos"] = cos_sum / max(total, 1)
            finally:
                model.load_state_dict(original)
        return results

    def evaluate(self, model_dir: str | Path, pool: ModelPool) -> dict[str, float]:
        from safetensors.torch import load_file

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors in {model_dir}")
        body: dict[str, torch.Tensor] = {}
        for f in files:
            body.update(load_file(str(f)))
        return self.evaluate_state_dict(body, pool, str(model_dir))
