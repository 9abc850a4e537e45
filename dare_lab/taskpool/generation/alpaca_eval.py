"""AlpacaEval: export outputs in AlpacaEval's JSON format, judge them with alpaca_eval itself.

The export (``<output_dir>/alpacaeval/model_outputs.json``) is a list of
``{"instruction", "output", "generator", "dataset"}`` records, the file
``alpaca_eval --model_outputs`` reads (leaderboard-compatible).

Judges (``judge:`` in the taskpool config):

* ``null`` (the default, offline): no judge; the run logs and returns ``alpacaeval/judged =
  0`` and says that only outputs were exported.
* ``{kind: alpaca_eval, annotators_config: chatgpt_fn}``: **the paper's metric**. Calls
  ``alpaca_eval.evaluate(model_outputs=..., reference_outputs=..., annotators_config=...)``
  (the optional extra ``alpacaeval``, ``pip install 'dare_lab[alpacaeval]'``), i.e.
  alpaca_eval's own annotator prompts, parsers and win-rate metric; MergeLM's README scores
  the paper's outputs with ``alpaca_eval --annotators_config chatgpt_fn``. The reference
  outputs are the dataset's own ``output`` fields (text-davinci-003 on the default AlpacaEval
  1 source, as in the paper), or ``reference_outputs: <path>``; ``fn_metric`` is
  ``get_winrate`` (AlpacaEval 1) unless set (``get_length_controlled_winrate``). alpaca_eval
  writes ``leaderboard.csv`` and ``annotations.json`` under
  ``<output_dir>/alpacaeval/<annotators_config>/``. Without alpaca_eval installed or
  without ``$OPENAI_API_KEY`` (``api_key_env``; ``null`` skips the check) the run falls back
  to export-only and says why. ``alpacaeval/paper_metric`` is 1 when the run was the paper's
  (``chatgpt_fn``, ``get_winrate``, text-davinci-003 references).

dare_lab's own pairwise A/B judges (**not** the paper's metric, nor alpaca_eval's: one home-made
prompt, each pair judged in both orders and averaged; ``alpacaeval/paper_metric = 0``):

* ``{kind: api, model, api_key_env: OPENAI_API_KEY, base_url}``: an OpenAI-compatible chat
  completions endpoint; without the key in the environment it falls back to export-only and
  says so;
* ``{kind: local, model: <dir or hub id>}``: a local causal LM compares the next-token
  probabilities of "A" and "B";
* ``{kind: callable, target: "pkg.module:function"}`` or any callable
  ``f(instruction, reference, output) -> float`` (P(output better than reference)).
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


PAPER_ANNOTATOR = "chatgpt_fn"  # MergeLM README: alpaca_eval --annotators_config chatgpt_fn
PAPER_REFERENCE_GENERATOR = "text_davinci_003"  # AlpacaEval 1's reference outputs (tatsu-lab/alpaca_eval, alpaca_eval)
LEADERBOARD_METRICS = ("win_rate", "standard_error", "discrete_win_rate", "length_controlled_winrate",
                       "lc_standard_error", "n_wins", "n_draws", "n_total", "avg_length")


class AlpacaEvalJudge:
    """alpaca_eval's own evaluation: ``alpaca_eval.evaluate(model_outputs, reference_outputs, annotators_config)``.

    Not a per-pair callable: :meth:`evaluate` takes every output at once, as alpaca_eval does.
    """

    def __init__(self, annotators_config: str = PAPER_ANNOTATOR, reference_outputs: str | None = None,
                 fn_metric: str = "get_winrate", name: str | None = None, max_instances: int | None = None,
                 evaluate_kwargs: dict | None = None, module: Any = None) -> None:
        self.annotators_config, self.reference_outputs = str(annotators_config), reference_outputs
        self.fn_metric, self.name, self.max_instances = fn_metric, name, max_instances
        self.evaluate_kwargs = dict(evaluate_kwargs or {})
        self.module = module if module is not None else importlib.import_module("alpaca_eval")

    def evaluate(self, model_outputs: list[dict], references: list[dict] | None, out_dir: Path) -> tuple[dict, list]:
        """(metrics, per-record preference: 2 model wins, 1 reference wins, 1.5 draw, None unjudged)."""
        refs = self.reference_outputs if self.reference_outputs is not None else references
        if refs is None:
            raise ValueError("AlpacaEval (alpaca_eval judge) needs reference outputs: the dataset's 'output' fields "
                             "or judge.reference_outputs")
        name = self.name or (model_outputs[0]["generator"] if model_outputs else "model")
        sort_by = "length_controlled_winrate" if self.fn_metric == "get_length_controlled_winrate" else "win_rate"
        kwargs = dict(model_outputs=model_outputs, reference_outputs=refs, annotators_config=self.annotators_config,
                      name=name, output_path=str(out_dir), precomputed_leaderboard=None, is_cache_leaderboard=False,
                      is_return_instead_of_print=True, fn_metric=self.fn_metric, sort_by=sort_by,
                      max_instances=self.max_instances)
        kwargs.update(self.evaluate_kwargs)
        leaderboard, annotations = self.module.evaluate(**kwargs)
        row = leaderboard.loc[name] if hasattr(leaderboard, "loc") else leaderboard[name]
        row = row.to_dict() if hasattr(row, "to_dict") else dict(row)
        metrics = {k: float(row[k]) for k in LEADERBOARD_METRICS if isinstance(row.get(k), (int, float))}
        if "win_rate" not in metrics:
            raise ValueError(f"alpaca_eval returned no win_rate for {name!r} (columns {sorted(row)})")
        rows = annotations.to_dict("records") if hasattr(annotations, "to_dict") else list(annotations or [])
        by_instruction = {r.get("instruction"): r.get("preference") for r in rows}
        prefs = [by_instruction.get(o["instruction"]) for o in model_outputs]
        paper = (self.annotators_config == PAPER_ANNOTATOR and self.fn_metric == "get_winrate"
                 and self.reference_outputs is None and bool(references)
                 and all(r.get("generator") == PAPER_REFERENCE_GENERATOR for r in references))
        metrics["paper_metric"] = 1.0 if paper else 0.0
        return metrics, [None if p is None else float(p) for p in prefs]


def build_judge(spec: Any) -> tuple[Judge | AlpacaEvalJudge | None, str]:
    """(judge or None, a one-line note saying what will happen)."""
    if spec is None:
        return None, "no judge configured"
    if callable(spec):
        return spec, "callable judge (dare_lab pairwise; not the paper's metric)"
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "alpaca_eval":
        env = spec.pop("api_key_env", "OPENAI_API_KEY")
        try:
            module = importlib.import_module("alpaca_eval")
        except ImportError as e:
            return None, f"alpaca_eval judge configured but alpaca_eval cannot be imported ({e}; pip install 'dare_lab[alpacaeval]')"
        if env and not (os.environ.get(env) or os.environ.get(env + "S")):
            return None, f"alpaca_eval judge configured but ${env} is not set"
        judge = AlpacaEvalJudge(module=module, **spec)
        return judge, f"alpaca_eval judge, annotators_config {judge.annotators_config}"
    if kind == "api":
        env = spec.pop("api_key_env", "OPENAI_API_KEY")
        key = os.environ.get(env, "")
        if not key:
            return None, f"API judge configured but ${env} is not set"
        return APIJudge(api_key=key, **spec), f"API judge {spec.get('model', 'gpt-4o-mini')} (dare_lab pairwise A/B; not the paper's metric)"
    if kind == "local":
        if "model" not in spec:
            raise ValueError("local AlpacaEval judge needs 'model' (a directory or hub id)")
        return LocalJudge(**spec), f"local judge {spec['model']} (dare_lab pairwise A/B; not the paper's metric)"
    if kind == "callable":
        target = spec.get("target", "")
        mod, _, fn = target.partition(":")
        if not mod or not fn:
            raise ValueError(f"callable judge target must be 'module:function', got {target!r}")
        return getattr(importlib.import_module(mod), fn), f"callable judge {target} (not the paper's metric)"
    raise ValueError(f"unknown AlpacaEval judge kind {kind!r}; choose alpaca_eval (the paper's), or dare_lab's pairwise "
                     f"api, local or callable (or null: export only)")


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
    if isinstance(judge, AlpacaEvalJudge):
        if missing and judge.reference_outputs is None:
            raise ValueError(f"AlpacaEval judging needs a reference 'output' in every record (or judge.reference_outputs); "
                             f"record {missing[0]} has none")
        refs = None if missing else [{"instruction": r["instruction"], "output": r["output"],
                                      "generator": r.get("generator", "reference"), "dataset": r.get("dataset", "")}
                                     for r in records]
        found, prefs = judge.evaluate(export, refs, out_dir)
        metrics.update({"judged": 1.0, **found})
        log.info("AlpacaEval (alpaca_eval, %s): win rate %.2f%s", judge.annotators_config, metrics["win_rate"],
                 "" if metrics["paper_metric"] else " (not the paper's setting)")
        (out_dir / "judgements.json").write_text(json.dumps({"judge": note, "preferences": prefs, **metrics}, indent=2))
        return metrics, [{"preference": p} for p in prefs]
    if missing:
        raise ValueError(f"AlpacaEval judging needs a reference 'output' in every record; record {missing[0]} has none")
    prefs = [float(judge(r["instruction"], r["output"], o)) for r, o in zip(records, outputs)]
    metrics.update({"judged": 1.0, "win_rate": 100.0 * sum(prefs) / len(prefs), "paper_metric": 0.0})
    log.warning("AlpacaEval: win rate %.2f from %s: dare_lab's pairwise judge, NOT the paper's metric "
                "(use judge.kind=alpaca_eval, annotators_config=chatgpt_fn)", metrics["win_rate"], note)
    (out_dir / "judgements.json").write_text(json.dumps({"judge": note, "preferences": prefs, **metrics}, indent=2))
    return metrics, [{"preference": p} for p in prefs]
