"""AlpacaEval: export outputs in AlpacaEval's JSON format, optionally judge them.

The export (``<output_dir>/alpacaeval/model_outputs.json``) is a list of
``{"instruction", "output", "generator", "dataset"}`` records that ``alpaca_eval
--model_outputs`` accepts. A judge compares each output with the reference output of the
dataset (``output`` field) and returns P(model's output is better); the win rate is the mean
× 100. Each pair is judged in both orders and averaged (position bias).

Judges (``judge:`` in the taskpool config):
* ``null``: no judge; the run logs and returns ``alpacaeval/judged = 0`` and says that only
  outputs were exported;
* ``{kind: api, model, api_key_env: OPENAI_API_KEY, base_url}``: an OpenAI-compatible chat
  completions endpoint; without the key in the environment it falls back to export-only and
  says so;
* ``{kind: local, model: <dir or hub id>}``: a local causal LM compares the next-token
  probabilities of "A" and "B";
* ``{kind: callable, target: "pkg.module:function"}`` or any callable
  ``f(instruction, reference, output) -> float``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JUDGE_PROMPT = ("You are comparing two responses to the same instruction. Pick the response that follows the "
                "instruction better and is more helpful, accurate and complete.\n\n"
                "Instruction:\n{instruction}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
                "Which response is better? Answer with a single letter, A or B.\nAnswer:")

Judge = Callable[[str, str, str], float]


def _both_orders(pref_b: Callable[[str, str, str], float]) -> Judge:
    """Wrap P(B better | instruction, A, B) into P(output better than reference), both orders."""

    def judge(instruction: str, reference: str, output: str) -> float:
        p1 = pref_b(instruction, reference, output)          # output shown as B
        p2 = 1.0 - pref_b(instruction, output, reference)    # output shown as A
        return 0.5 * (p1 + p2)

    return judge


class APIJudge:
    """OpenAI-compatible chat endpoint; answers 'A' or 'B' at temperature 0."""

    def __init__(self, model: str = "gpt-4o-mini", api_key: str = "", base_url: str = "https://api.openai.com/v1",
                 timeout_s: float = 60.0) -> None:
        self.model, self.api_key, self.base_url, self.timeout_s = model, api_key, base_url.rstrip("/"), timeout_s
        self._judge = _both_orders(self._pref_b)

    def _pref_b(self, instruction: str, a: str, b: str) -> float:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 2, "messages": [
            {"role": "user", "content": JUDGE_PROMPT.format(instruction=instruction, a=a, b=b)}]}).encode()
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            text = json.load(resp)["choices"][0]["message"]["content"].strip().upper()
        return 1.0 if text.startswith("B") else 0.0 if text.startswith("A") else 0.5

    def __call__(self, instruction: str, reference: str, output: str) -> float:
        return self._judge(instruction, reference, output)


class LocalJudge:
    """A local causal LM: P(B) = softmax over the next-token logits of "A" and "B"."""

    def __init__(self, model: Any, tokenizer: Any = None, dtype: str = "float32") -> None:
        from dare_lab.taskpool.generation.backends import HFBackend

        self.backend = HFBackend(model, tokenizer, dtype=dtype, batch_size=1)
        tok = self.backend.tokenizer
        self.ids = [tok.encode(x, add_special_tokens=False)[-1] for x in (" A", " B")]
        self._judge = _both_orders(self._pref_b)

    def _pref_b(self, instruction: str, a: str, b: str) -> float:
        import torch

        tok, model = self.backend.tokenizer, self.backend.model
        enc = tok(JUDGE_PROMPT.format(instruction=instruction, a=a, b=b), return_tensors="pt").to(self.backend.device)
        enc.pop("token_type_ids", None)
        with torch.inference_mode():
            logits = model(**enc).logits[0, -1, self.ids].float()
        return float(torch.softmax(logits, -1)[1])

    def __call__(self, instruction: str, reference: str, output: str) -> float:
        return self._judge(instruction, reference, output)


def build_judge(spec: Any) -> tuple[Judge | None, str]:
    """(judge or None, a one-line note saying what will happen)."""
    if spec is None:
        return None, "no judge configured"
    if callable(spec):
        return spec, "callable judge"
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "api":
        env = spec.pop("api_key_env", "OPENAI_API_KEY")
        key = os.environ.get(env, "")
        if not key:
            return None, f"API judge configured but ${env} is not set"
        return APIJudge(api_key=key, **spec), f"API judge {spec.get('model', 'gpt-4o-mini')}"
    if kind == "local":
        if "model" not in spec:
            raise ValueError("local AlpacaEval judge needs 'model' (a directory or hub id)")
        return LocalJudge(**spec), f"local judge {spec['model']}"
    if kind == "callable":
        target = spec.get("target", "")
        mod, _, fn = target.partition(":")
        if not mod or not fn:
            raise ValueError(f"callable judge target must be 'module:function', got {target!r}")
        return getattr(importlib.import_module(mod), fn), f"callable judge {target}"
    raise ValueError(f"unknown AlpacaEval judge kind {kind!r}; choose api, local or callable (or null)")


def export_and_judge(records: Sequence[dict], outputs: Sequence[str], ctx: dict) -> tuple[dict, list[dict]]:
    generator = ctx.get("generator", "merged")
    out_dir = Path(ctx.get("output_dir") or Path.cwd() / "dare_lab_outputs") / "alpacaeval"
    out_dir.mkdir(parents=True, exist_ok=True)
    export = [{"instruction": r["instruction"], "output": o, "generator": generator, "dataset": r.get("dataset", "")}
              for r, o in zip(records, outputs)]
    path = out_dir / "model_outputs.json"
    path.write_text(json.dumps(export, indent=2, ensure_ascii=False))
    judge, note = ctx.get("judge"), ctx.get("judge_note", "no judge configured")
    metrics: dict[str, float] = {"exported": float(len(export))}
    if judge is None:
        msg = (f"AlpacaEval: ONLY OUTPUTS WERE EXPORTED ({len(export)} to {path}); {note}, so no win rate was "
               f"computed. Judge them with `alpaca_eval --model_outputs {path}` or set taskpool judge=...")
        log.warning(msg)
        print(msg)
        metrics["judged"] = 0.0
        return metrics, [{"exported": True} for _ in export]
    missing = [i for i, r in enumerate(records) if not r.get("output")]
    if missing:
        raise ValueError(f"AlpacaEval judging needs a reference 'output' in every record; record {missing[0]} has none")
    prefs = [float(judge(r["instruction"], r["output"], o)) for r, o in zip(records, outputs)]
    metrics.update({"judged": 1.0, "win_rate": 100.0 * sum(prefs) / len(prefs)})
    (out_dir / "judgements.json").write_text(json.dumps({"judge": note, "preferences": prefs, **metrics}, indent=2))
    return metrics, [{"preference": p} for p in prefs]
