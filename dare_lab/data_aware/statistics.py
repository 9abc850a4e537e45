"""Streamed data statistics of one model at a time: diagonal Fisher and input Gram matrices.

Both run on a model's own task examples and keep only the running sums (one float64 tensor
per parameter, or one in × in float64 matrix per linear layer); activations are never stored
beyond the current batch. The forward/backward passes run in the model's dtype (float32); every
product is accumulated in float64, so an ill-conditioned Gram sum (a pooler's, condition number
~1e8) keeps the digits its solve needs.

Fisher (``estimator="exact"``, the definition):
    F = (1/N) Σ_i Σ_y p(y|x_i) (∇_θ log p(y|x_i))²          (classification)
    F = (1/N) Σ_i (∇_θ f(x_i))²                              (regression, unit-variance Gaussian)
``estimator="empirical"`` uses the gold label instead of the expectation over y.

Gram (forward hooks on every ``nn.Linear`` in scope):
    G = Σ_i Σ_t x_{i,t} x_{i,t}ᵀ over the non-padding tokens t of example i (``normalize="sum"``,
    the RegMean paper's XᵀX), or that sum / N (``normalize="mean"``, the per-model mean).

N is ``min(num_examples, len(examples))``: ``on_short_data="error"`` refuses fewer examples than
asked, ``"warn"`` warns in one line; :func:`examples_used` gives the N actually used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from dare_lab.engine.scope import DEFAULT_EXCLUDE

FISHER_ESTIMATORS = ("exact", "empirical")
GRAM_NORMALIZE = ("sum", "mean")
SHORT_DATA = ("warn", "error")


def examples_used(num_examples: int, examples, on_short_data: str = "warn", label: str = "task") -> int:
    """N actually used: ``min(num_examples, len(examples))``; fewer than asked warns or raises (one line)."""
    if on_short_data not in SHORT_DATA:
        raise ValueError(f"on_short_data={on_short_data!r}; choose one of {SHORT_DATA}")
    have = len(examples)
    if have < 1:
        raise ValueError(f"{label}: no examples to compute statistics on")
    n = min(int(num_examples), have)
    if n < int(num_examples):
        msg = f"{label}: num_examples={int(num_examples)} but only {have} examples; using N={n}"
        if on_short_data == "error":
            raise ValueError(msg + " (on_short_data=error)")
        import warnings

        warnings.warn(msg, stacklevel=3)
    return n


def _is_excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in exclude)


def _example_batches(tokenizer, examples, num_examples: int, max_length: int, batch_size: int):
    n = min(int(num_examples), len(examples))
    if n < 1:
        raise ValueError("data-aware statistics need at least one example")
    for s in range(0, n, batch_size):
        idx = range(s, min(n, s + batch_size))
        texts = [examples.texts[i] for i in idx]
        pairs = None if examples.pairs is None else [examples.pairs[i] for i in idx]
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt") \
            if pairs is not None else tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        yield dict(enc), [examples.labels[i] for i in idx]


def fisher_diagonal(model: torch.nn.Module, tokenizer, examples, num_examples: int = 256, max_length: int = 128,
                    regression: bool = False, estimator: str = "exact", exclude: Sequence[str] = DEFAULT_EXCLUDE,
                    device: str | torch.device = "cpu", progress: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of every trainable parameter not matched by ``exclude``.

    Accumulated in float64, returned as float32 (the merge weights need no more); examples are
    processed one at a time in order, so the sum's order is fixed.
    """
    if estimator not in FISHER_ESTIMATORS:
        raise ValueError(f"unknown Fisher estimator {estimator!r}; choose one of {FISHER_ESTIMATORS}")
    model = model.to(device).eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and not _is_excluded(n, exclude)}
    if not params:
        raise ValueError("no parameter is in scope for the Fisher")
    fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    from tqdm.auto import tqdm

    n_total = min(int(num_examples), len(examples))
    bar = tqdm(total=n_total, desc="Fisher", disable=not progress, unit="ex")
    for enc, labels in _example_batches(tokenizer, examples, num_examples, max_length, batch_size=1):
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model(**enc).logits[0]
        if regression:
            terms = [(out[0], 1.0)]
        else:
            logp = torch.log_softmax(out.to(torch.promote_types(out.dtype, torch.float32)), -1)
            if estimator == "empirical":
                terms = [(logp[int(labels[0])], 1.0)]
            else:
                probs = logp.detach().exp()
                terms = [(logp[y], float(probs[y])) for y in range(logp.shape[0])]
        for j, (obj, weight) in enumerate(terms):
            grads = torch.autograd.grad(obj, list(params.values()), retain_graph=j < len(terms) - 1, allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[n].add_(g.double().pow(2), alpha=weight)
        count += 1
        bar.update(1)
    bar.close()
    return {n: (f / count).float() for n, f in fisher.items()}


class _GramHooks:
    """Forward hooks accumulating XᵀX of every in-scope nn.Linear's input (padding masked)."""

    def __init__(self, model: torch.nn.Module, exclude: Sequence[str]):
        self.mask: torch.Tensor | None = None
        self.grams: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and not _is_excluded(name + ".weight", exclude):
                self.handles.append(mod.register_forward_hook(self._hook(name)))
        if not self.handles:
            raise ValueError("no nn.Linear layer is in scope for RegMean")

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            if x.ndim == 3 and self.mask is not None and x.shape[:2] == self.mask.shape:
                x = x[self.mask]
            x = x.reshape(-1, x.shape[-1]).double()  # float64: products and sums keep their digits
            g = x.T @ x
            key = name + ".weight"
            if key in self.grams:
                self.grams[key].add_(g)
            else:
                self.grams[key] = g
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def gram_matrices(model: torch.nn.Module, tokenizer, examples, num_examples: int = 256, max_length: int = 128,
                  batch_size: int = 16, exclude: Sequence[str] = DEFAULT_EXCLUDE, device: str | torch.device = "cpu",
                  progress: bool = False, normalize: str = "mean") -> dict[str, torch.Tensor]:
    """``{"<linear>.weight": G}`` (float64) with G = Σ_i Σ_t x xᵀ of the layer's inputs over N examples.

    ``normalize="mean"`` divides by N (the per-model mean); ``"sum"`` keeps RegMean's XᵀX.
    """
    if normalize not in GRAM_NORMALIZE:
        raise ValueError(f"unknown Gram normalize={normalize!r}; choose one of {GRAM_NORMALIZE}")
    model = model.to(device).eval()
    hooks = _GramHooks(model, exclude)
    count = 0
    from tqdm.auto import tqdm

    try:
        for enc, _ in tqdm(_example_batches(tokenizer, examples, num_examples, max_length, batch_size),
                           desc="Gram", disable=not progress, unit="batch"):
            enc = {k: v.to(device) for k, v in enc.items()}
            hooks.mask = enc["attention_mask"].bool() if "attention_mask" in enc else None
            model(**enc)
            count += enc["input_ids"].shape[0]
    finally:
        hooks.remove()
    return {n: (g / count if normalize == "mean" else g) for n, g in hooks.grams.items()}
