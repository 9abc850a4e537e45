"""Embedding similarity (paper Fig. 6 and 7): how far do sparsified models' hidden states move?

For a fine-tuned model θ_SFT and a sparsified version θ̂ (DARE / DropOnly / MP on δ, or on
θ_SFT itself), both are run on the same task inputs with ``output_hidden_states=True``; for
every layer ℓ (0 = embedding output) and every non-padding token t the cosine similarity

    cos_ℓ,t = ⟨h_ℓ,t, ĥ_ℓ,t⟩ / sqrt(⟨h,h⟩·⟨ĥ,ĥ⟩)       (float64; exactly 1 when ĥ = h)

is accumulated batch by batch into per-layer sums and counts, and the last layer's values into
a fixed-bin histogram: only one batch of hidden states of two models is ever held in memory.
Works for encoders and decoders alike (``AutoModel``; padding is masked out).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

HIST_EDGES = np.linspace(-1.0, 1.0, 2001)  # bin width 0.001


@dataclass
class LayerCosine:
    """Streaming per-layer mean cosine + last-layer histogram."""

    sums: np.ndarray | None = None
    counts: np.ndarray | None = None
    mins: np.ndarray | None = None
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES) - 1, dtype=np.int64))

    def update(self, ref: Sequence[torch.Tensor], other: Sequence[torch.Tensor], mask: torch.Tensor | None) -> None:
        if len(ref) != len(other):
            raise ValueError(f"models return {len(ref)} vs {len(other)} hidden-state layers")
        n_layers = len(ref)
        if self.sums is None:
            self.sums, self.counts = np.zeros(n_layers), np.zeros(n_layers, dtype=np.int64)
            self.mins = np.full(n_layers, np.inf)
        keep = None if mask is None else mask.bool()
        for i, (a, b) in enumerate(zip(ref, other)):
            cos = token_cosine(a, b)
            if keep is not None:
                cos = cos[keep]
            cos = cos.flatten()
            self.sums[i] += float(cos.sum())
            self.counts[i] += cos.numel()
            if cos.numel():
                self.mins[i] = min(self.mins[i], float(cos.min()))
            if i == n_layers - 1:
                self.hist += np.histogram(cos.numpy(), bins=HIST_EDGES)[0]

    @property
    def means(self) -> list[float]:
        if self.sums is None:
            return []
        return [float(s / c) if c else float("nan") for s, c in zip(self.sums, self.counts)]


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dim in float64, clamped to [-1, 1].

    Computed as ⟨a,b⟩ / sqrt(⟨a,a⟩⟨b,b⟩), which is exactly 1.0 when a == b (IEEE sqrt of a
    square is exact); zero vectors give 1 if both are zero, else 0.
    """
    a64, b64 = a.double(), b.double()
    dot = (a64 * b64).sum(-1)
    aa, bb = (a64 * a64).sum(-1), (b64 * b64).sum(-1)
    denom = torch.sqrt(aa * bb)
    cos = torch.where(denom > 0, dot / denom.clamp_min(1e-300), (aa == bb).double())
    return cos.clamp_(-1.0, 1.0)


def batches(tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128) -> Iterable[dict[str, torch.Tensor]]:
    """Tokenised batches (sorted by length to waste little padding)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[s:s + batch_size]]
        yield tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.inference_mode()
def hidden_state_similarity(ref_model: torch.nn.Module, model: torch.nn.Module, encoded: Iterable[Mapping[str, torch.Tensor]],
                            device: str | torch.device = "cpu") -> LayerCosine:
    """Stream the batches through both models and accumulate the per-layer token cosines."""
    acc = LayerCosine()
    for batch in encoded:
        batch = {k: v.to(device) for k, v in batch.items()}
        h_ref = ref_model(**batch, output_hidden_states=True).hidden_states
        h = model(**batch, output_hidden_states=True).hidden_states
        mask = batch.get("attention_mask")
        acc.update([x.float().cpu() for x in h_ref], [x.float().cpu() for x in h], None if mask is None else mask.cpu())
        del h_ref, h
    return acc


def load_body_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], skip_heads: bool = True) -> int:
    """Copy tensors of ``state`` into ``model`` matching names exactly, without the first name
    component ("bert.x" → "x") or with the model's base prefix added; returns how many.

    Task heads (``classifier`` / ``score``, never merged) are skipped: the model keeps its own.
    """
    from dare_lab.engine.scope import Scope

    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    heads = Scope()
    loaded = 0
    with torch.no_grad():
        for name, t in state.items():
            if skip_heads and heads.excludes_explicitly(name):
                continue
            for cand in (name, name.partition(".")[2], f"{prefix}.{name}" if prefix else None):
                if cand and cand in own and tuple(own[cand].shape) == tuple(t.shape):
                    own[cand].copy_(t.to(own[cand].dtype))
                    loaded += 1
                    break
    return loaded


def task_texts(taskpool: Any, model_name: str, n: int = 256) -> list[str]:
    """Inputs for the similarity probe: the texts of ``model_name``'s own tasks when the
    taskpool exposes them (``tasks`` + ``examples(task)``, or a ``texts`` list), else the
    tiny built-in corpus."""
    texts: list[str] = []
    tasks = getattr(taskpool, "tasks", None)
    if tasks and hasattr(taskpool, "examples"):
        mine = [t for t in tasks if getattr(t, "head_model", getattr(t, "name", None)) == model_name] or list(tasks)
        for t in mine:
            texts += list(taskpool.examples(t).texts)[:n]
    elif getattr(taskpool, "texts", None):
        texts = list(taskpool.texts)
    if not texts:
        from dare_lab.pools.tiny import CORPUS

        texts = list(CORPUS)
    return [str(x) for x in texts[:n]]


def embedding_similarity(pool: Any, model_name: str, texts: Sequence[str], methods: Sequence[str] = ("dare", "drop_only"),
                         drop_rates: Sequence[float] = (0.0, 0.1, 0.5, 0.9, 0.99), seeds: Sequence[int] = (0,),
                         target: str = "delta", scope: Any = None, batch_size: int = 16, max_length: int = 128,
                         device: str = "cpu", log: Any = print,
                         knobs: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Per-layer mean cosine similarity between ``model_name`` and its sparsified versions.

    Returns ``rows`` ({model, method, p, seed, layer, mean_cos, min_cos, n_tokens}) and the
    last-layer histograms ``{"<method> p=<p>": counts over HIST_EDGES}`` (summed over seeds).
    p = 0 is the SFT model itself (every sparsifier is the identity there). ``knobs``: per
    sparsifier kind, its own knobs (e.g. ``{"della": {"epsilon": 0.005}, "darex": {"rescale_q": 0.05}}``).
    """
    import copy

    from transformers import AutoModel, AutoTokenizer

    from dare_lab.analysis.redundancy import DETERMINISTIC, single_model_method, sparsified_state
    from dare_lab.engine.sources import resolve_model_dir

    ref_dir = str(resolve_model_dir(pool.models[model_name]))
    tok = AutoTokenizer.from_pretrained(ref_dir)
    encoded = list(batches(tok, list(texts), batch_size, max_length))
    ref_model = AutoModel.from_pretrained(ref_dir, dtype=torch.float32).to(device).eval()
    rows: list[dict[str, Any]] = []
    hists: dict[str, np.ndarray] = {}
    for kind in methods:
        for p in [float(x) for x in drop_rates]:
            for seed in ([seeds[0]] if (p == 0.0 or kind in DETERMINISTIC) else list(seeds)):
                variant = copy.deepcopy(ref_model)
                if p > 0.0:
                    state = sparsified_state(pool.base, pool.models[model_name], model_name,
                                             single_model_method(kind, p, int(seed), target,
                                                                 knobs=(knobs or {}).get(kind)), scope)
                    if load_body_state(variant, state) == 0:
                        raise ValueError(f"no sparsified tensor matches the parameters of {model_name!r}")
                    del state
                acc = hidden_state_similarity(ref_model, variant, encoded, device)
                del variant
                key = f"{kind} p={p:g}"
                hists[key] = hists.get(key, 0) + acc.hist
                for layer, (m, lo, c) in enumerate(zip(acc.means, acc.mins, acc.counts)):
                    rows.append({"model": model_name, "method": kind, "p": p, "seed": int(seed), "layer": layer,
                                 "mean_cos": m, "min_cos": float(lo), "n_tokens": int(c)})
                if log:
                    log(f"[similarity] {model_name} {kind} p={p:g} seed={seed}: "
                        + " ".join(f"{m:.4f}" for m in acc.means))
    return rows, hists


def layer_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Wide table: one row per (model, method, p) with mean±std over seeds per layer."""
    groups: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], float(r["p"])), {}).setdefault(int(r["layer"]), []).append(float(r["mean_cos"]))
    out = []
    for (model, method, p), layers in groups.items():
        row: dict[str, Any] = {"model": model, "method": method, "p": p}
        for layer in sorted(layers):
            a = np.asarray(layers[layer])
            row[f"L{layer}"] = f"{a.mean():.4f}" + (f"±{a.std():.4f}" if a.size > 1 and a.std() > 0 else "")
        out.append(row)
    return out
