"""Generation backends behind one interface: ``generate(prompts, max_new_tokens, stop) -> texts``.

* :class:`HFBackend` — transformers ``generate``: batched, left padding, greedy decoding;
  from a directory (e.g. the engine's output) or an in-memory model. Works on CPU.
* :class:`VLLMBackend` — vLLM (optional extra ``vllm``), greedy ``SamplingParams``; the
  engine runs in a **fresh worker process per evaluated model** (vLLM cannot be initialised
  twice in one process), with ``tensor_parallel_size`` from config. Needs a GPU.

Both return only the generated continuation, cut before the first stop string.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

BACKENDS = ("hf", "vllm")


class GenerationBackend(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]: ...

    def close(self) -> None: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i >= 0:
                cut = min(cut, i)
    return text[:cut]


def _dtype(value: str | torch.dtype | None) -> torch.dtype | str:
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value or "auto"
    try:
        dt = getattr(torch, str(value))
    except AttributeError:
        dt = None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}; use float32, bfloat16, float16 or auto")
    return dt


class _StopOnStrings:
    """Stopping criterion: a row is done once its continuation contains a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int) -> None:
        self.tok, self.stop, self.prompt_len = tokenizer, [s for s in stop if s], prompt_len
        self.tail = 4 + max((len(s) for s in self.stop), default=0)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        gen = input_ids[:, self.prompt_len:]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop or gen.shape[1] == 0:
            return done
        for i, row in enumerate(gen[:, -self.tail:].tolist()):
            text = self.tok.decode(row, skip_special_tokens=True)
            done[i] = any(s in text for s in self.stop)
        return done


class HFBackend:
    """transformers ``generate``; ``model`` is a path/hub id or a ``PreTrainedModel``."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any = None, *, batch_size: int = 8, dtype: str | torch.dtype | None = "float32",
                 device: str | None = None, max_input_tokens: int | None = None, trust_remote_code: bool = False,
                 num_threads: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.max_input_tokens = int(batch_size), max_input_tokens
        if num_threads is not None and int(num_threads) < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads  # CPU intra-op threads while generating (1 is fastest on a busy box)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, (str, os.PathLike)):
            path = str(model)
            if os.path.sep in path and not Path(path).exists():
                raise FileNotFoundError(f"HF backend: model directory {path} does not exist")
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), trust_remote_code=trust_remote_code)
            tokenizer = tokenizer if tokenizer is not None else path
            self.model.to(self.device)
        elif isinstance(model, torch.nn.Module):
            self.model = model
            self.device = str(next(model.parameters()).device)
            if tokenizer is None:
                raise ValueError("HF backend: an in-memory model needs a tokenizer (object or path)")
        else:
            raise TypeError(f"HF backend: model must be a path, hub id or torch module, got {type(model).__name__}")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            fallback = self.tokenizer.eos_token or self.tokenizer.unk_token
            if fallback is None:
                raise ValueError("HF backend: the tokenizer has no pad, eos or unk token to pad with")
            self.tokenizer.pad_token = fallback
        self.model.eval()

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        if self.num_threads is None:
            return self._generate(prompts, max_new_tokens, stop)
        before = torch.get_num_threads()
        torch.set_num_threads(int(self.num_threads))
        try:
            return self._generate(prompts, max_new_tokens, stop)
        finally:
            torch.set_num_threads(before)

    @torch.inference_mode()
    def _generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompts = list(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        out: list[str] = [""] * len(prompts)
        tok = self.tokenizer
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            kw = {"truncation": True, "max_length": self.max_input_tokens} if self.max_input_tokens else {}
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, **kw).to(self.device)
            enc.pop("token_type_ids", None)
            plen = enc["input_ids"].shape[1]
            gen = self.model.generate(**enc, max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                                      temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                                      eos_token_id=eos, stopping_criteria=[_StopOnStrings(tok, stop, plen)])
            texts = tok.batch_decode(gen[:, plen:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                out[i] = cut_at_stop(t, stop)
        return out

    def close(self) -> None:
        pass


def _vllm_worker(conn, model_dir: str, engine_kwargs: dict) -> None:  # runs in a spawned process
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=model_dir, **engine_kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg[0] == "close":
            break
        _, prompts, max_new_tokens, stop = msg
        try:
            params = SamplingParams(temperature=0.0, max_tokens=int(max_new_tokens), stop=list(stop) or None)
            outs = llm.generate(list(prompts), params)
            conn.send(("ok", [o.outputs[0].text for o in outs]))
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}"))
    conn.close()


def vllm_available() -> tuple[bool, str]:
    """(usable, reason): vLLM is importable and a CUDA device is present."""
    try:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return False, "vllm is not installed (pip install 'dare_lab[vllm]')"
    except Exception as e:  # noqa: BLE001
        return False, f"vllm cannot be located: {e}"
    if not torch.cuda.is_available():
        return False, "no CUDA device: vLLM needs a GPU"
    return True, "ok"


class VLLMBackend:
    """vLLM in a fresh spawned worker process for this model; ``close()`` ends it."""

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, seed: int = 0,
                 start_timeout_s: float = 1800.0, **engine_kwargs: Any) -> None:
        if not isinstance(model_dir, (str, os.PathLike)):
            raise TypeError("vLLM backend needs a model directory or hub id, not an in-memory model; use backend 'hf'")
        if int(tensor_parallel_size) < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.model_dir = str(model_dir)
        self.kwargs = {"tensor_parallel_size": int(tensor_parallel_size), "dtype": dtype,
                       "gpu_memory_utilization": float(gpu_memory_utilization), "seed": int(seed), **engine_kwargs}
        if max_model_len:
            self.kwargs["max_model_len"] = int(max_model_len)
        self.start_timeout_s = start_timeout_s
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        ok, reason = vllm_available()
        if not ok:
            raise RuntimeError(f"vLLM backend unavailable: {reason}")
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_vllm_worker, args=(child, self.model_dir, self.kwargs), daemon=False)
        self._proc.start()
        self._conn = parent
        t0 = time.monotonic()
        while not parent.poll(5):
            if not self._proc.is_alive():
                raise RuntimeError(f"vLLM worker for {self.model_dir} died during start-up (exit code {self._proc.exitcode})")
            if time.monotonic() - t0 > self.start_timeout_s:
                self.close()
                raise TimeoutError(f"vLLM worker for {self.model_dir} did not start within {self.start_timeout_s}s")
        kind, payload = parent.recv()
        if kind != "ready":
            self.close()
            raise RuntimeError(f"vLLM could not load {self.model_dir}: {payload}")

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        if self._proc is None:
            self._start()
        self._conn.send(("generate", list(prompts), int(max_new_tokens), list(stop)))
        kind, payload = self._conn.recv()
        if kind != "ok":
            raise RuntimeError(f"vLLM generation failed for {self.model_dir}: {payload}")
        return [cut_at_stop(t, stop) for t in payload]

    def close(self) -> None:
        if self._proc is not None:
            try:
                if self._proc.is_alive():
                    self._conn.send(("close",))
                self._proc.join(timeout=60)
            except (OSError, BrokenPipeError):
                pass
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._proc = None
            self._conn = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def make_backend(spec: dict | str | None, model: Any, tokenizer: Any = None) -> GenerationBackend:
    """Build a backend from ``{"name": "hf"|"vllm", **options}`` (or just the name) for ``model``.

    An object that already has ``generate`` (a custom or test backend) is returned as is.
    """
    if hasattr(spec, "generate"):
        return spec
    spec = {"name": spec} if isinstance(spec, str) or spec is None else dict(spec)
    name = spec.pop("name", None) or "hf"
    if name == "hf":
        return HFBackend(model, tokenizer, **spec)
    if name == "vllm":
        if isinstance(model, torch.nn.Module):
            raise TypeError("vLLM backend needs a model directory, got an in-memory model; use backend 'hf'")
        return VLLMBackend(model, **spec)
    raise ValueError(f"unknown generation backend {name!r}; choose one of {BACKENDS}")
