"""Generation backends behind one interface: ``generate(prompts, max_new_tokens, stop) -> texts``.

* :class:`HFBackend` — transformers ``generate``: batched, left padding, greedy decoding;
  from a directory (e.g. the engine's output) or an in-memory model. Works on CPU.
* :class:`VLLMBackend` — vLLM (optional extra ``vllm``), greedy ``SamplingParams``; the
  engine runs in a **fresh worker process per evaluated model** (vLLM cannot be initialised
  twice in one process), with ``tensor_parallel_size`` from config. Needs a GPU.

Both return only the generated continuation, cut before the first stop string. With
``max_input_tokens`` both keep the **end** of a long prompt (left truncation), so the
template's ``### Response:`` is never cut off.

A backend config keeps each backend's own options with it (:func:`route_backend_spec`)::

    backend: {name: hf, max_input_tokens: null,
              hf: {batch_size: 8, dtype: float32},
              vllm: {tensor_parallel_size: 1, dtype: auto, gpu_memory_utilization: 0.9}}

Only the block of the chosen backend is used; a key the chosen backend does not take is a
one-line ``ValueError``. :class:`Worker` runs a spawned process that never leaves the parent
blocked: a worker that dies (killed, segfault, ``os._exit``) or hangs past its timeout is a
one-line :class:`WorkerError` naming what it was doing.
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

BACKENDS = ("hf", "vllm")
# options only one generation backend takes (a flat key in this table that the chosen backend
# does not take is an error, not a silent pass-through to vLLM's LLM(...))
EXCLUSIVE_OPTIONS: dict[str, frozenset[str]] = {
    "hf": frozenset({"batch_size", "device", "num_threads"}),
    "vllm": frozenset({"tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "seed", "start_timeout_s",
                       "request_timeout_s", "pipeline_parallel_size", "swap_space", "enforce_eager", "quantization"}),
}


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

        if not isinstance(trust_remote_code, bool):  # a string such as "false" is truthy: never remote code by accident
            raise TypeError(f"HF backend: trust_remote_code={trust_remote_code!r}: expected true or false, got a "
                            f"{type(trust_remote_code).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_input_tokens is not None and int(max_input_tokens) < 1:
            raise ValueError(f"max_input_tokens must be >= 1, got {max_input_tokens}")
        self.batch_size = int(batch_size)
        self.max_input_tokens = int(max_input_tokens) if max_input_tokens else None
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
        self.tokenizer.truncation_side = "left"  # max_input_tokens keeps the end: "### Response:" survives
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


class WorkerError(ChildProcessError, RuntimeError):
    """A worker process died, hung past its timeout, or reported an error (one-line message).

    An ``OSError`` (``ChildProcessError``), so the ``dare-lab`` command prints it as one line,
    and a ``RuntimeError`` for callers that catch that.
    """


class BackendUnavailable(OSError, RuntimeError):
    """The backend cannot run here (vLLM not installed, no CUDA device): one line, before any work."""


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty line of ``text`` (an error message fit for one log line)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else str(text).strip()
    if len(lines) > 1:
        line += " (…)"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def describe_exit(exitcode: int | None) -> str:
    """``exited with code 3`` / ``killed by SIGKILL`` / ``still running``."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class Worker:
    """A spawned process that answers messages over a pipe; the parent never blocks forever.

    ``target(conn, *args)`` runs in a fresh ``spawn`` process. :meth:`wait` polls the pipe
    (``Connection.poll``) in ``poll_s`` steps and checks ``is_alive()`` between polls: a
    worker that died before answering (killed, segfault, ``os._exit``, closed pipe) or did
    not answer within ``timeout_s`` (``None``: no limit, death is still detected) raises
    :class:`WorkerError` naming ``label`` and what it was doing; a hung worker is killed.
    """

    def __init__(self, target: Callable, args: tuple, label: str, *, poll_s: float = 1.0, daemon: bool = False) -> None:
        ctx = mp.get_context("spawn")
        self.label, self.poll_s = label, float(poll_s)
        self.conn, child = ctx.Pipe()
        # not a daemon by default: vLLM starts processes of its own, which daemons may not
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=daemon)
        self.proc.start()
        child.close()  # the parent keeps only its end, so a dead worker reads as EOF at once

    def _dead(self, what: str) -> WorkerError:
        self.proc.join(timeout=5)
        return WorkerError(f"{self.label} {describe_exit(self.proc.exitcode)} while {what}, without answering")

    def send(self, msg: Any, what: str) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            raise self._dead(what) from None

    def wait(self, what: str, timeout_s: float | None) -> Any:
        deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        while True:
            step = self.poll_s if deadline is None else max(0.0, min(self.poll_s, deadline - time.monotonic()))
            try:
                if self.conn.poll(step):
                    return self.conn.recv()
            except (EOFError, ConnectionResetError, BrokenPipeError, OSError):
                raise self._dead(what) from None
            if not self.proc.is_alive():
                try:  # it may have answered just before exiting
                    if self.conn.poll(0):
                        return self.conn.recv()
                except (EOFError, ConnectionResetError, BrokenPipeError, OSError):
                    pass
                raise self._dead(what)
            if deadline is not None and time.monotonic() >= deadline:
                self.kill()
                raise WorkerError(f"{self.label} gave no answer within {float(timeout_s):g}s while {what}; "
                                  f"killed it (raise the timeout if the job is just slow)")

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=30)
        self.conn.close()

    def close(self, msg: Any = ("close",), grace_s: float = 60.0) -> None:
        """Ask the worker to stop (``msg``), wait ``grace_s``, then kill it."""
        try:
            if self.proc.is_alive() and msg is not None:
                self.conn.send(msg)
            self.proc.join(timeout=grace_s)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=30)
        self.conn.close()


def _truncate_left(tokenizer: Any, prompts: Sequence[str], max_input_tokens: int | None) -> list:
    """Prompts whose token count exceeds ``max_input_tokens`` become ``{"prompt_token_ids": last n ids}``."""
    if not max_input_tokens:
        return list(prompts)
    out: list = []
    for p in prompts:
        ids = tokenizer(p)["input_ids"]
        if len(ids) <= max_input_tokens:
            out.append(p)
            continue
        bos = getattr(tokenizer, "bos_token_id", None)
        keep = ids[len(ids) - max_input_tokens:]
        if bos is not None and ids[0] == bos and keep[0] != bos:
            keep = [bos] + ids[len(ids) - max_input_tokens + 1:]  # keep BOS, cut from the start of the text
        out.append({"prompt_token_ids": keep})
    return out


def _vllm_worker(conn, model_dir: str, engine_kwargs: dict, max_input_tokens: int | None = None) -> None:  # spawned
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=model_dir, **engine_kwargs)
        tokenizer = llm.get_tokenizer() if max_input_tokens else None
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {one_line(e)}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent is gone
            break
        if msg[0] == "close":
            break
        _, prompts, max_new_tokens, stop = msg
        try:
            params = SamplingParams(temperature=0.0, max_tokens=int(max_new_tokens), stop=list(stop) or None)
            outs = llm.generate(_truncate_left(tokenizer, prompts, max_input_tokens), params)
            conn.send(("ok", [o.outputs[0].text for o in outs]))
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {one_line(e)}"))
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
    """vLLM in a fresh spawned worker process for this model; ``close()`` ends it.

    ``dtype: auto`` (the default, and vLLM's) is what the paper ran: fp16 for fp16/fp32
    checkpoints, bf16 for bf16 ones. ``start_timeout_s`` bounds loading the model,
    ``request_timeout_s`` (``None``: no limit) one ``generate`` call; a worker that dies is
    reported at once either way.
    """

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, seed: int = 0,
                 max_input_tokens: int | None = None, start_timeout_s: float = 1800.0,
                 request_timeout_s: float | None = 4 * 3600.0, poll_s: float = 1.0, **engine_kwargs: Any) -> None:
        if not isinstance(model_dir, (str, os.PathLike)):
            raise TypeError("vLLM backend needs a model directory or hub id, not an in-memory model; use backend 'hf'")
        if int(tensor_parallel_size) < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if max_input_tokens is not None and int(max_input_tokens) < 1:
            raise ValueError(f"max_input_tokens must be >= 1, got {max_input_tokens}")
        trc = engine_kwargs.get("trust_remote_code", False)
        if not isinstance(trc, bool):
            raise TypeError(f"vLLM backend: trust_remote_code={trc!r}: expected true or false, got a {type(trc).__name__}")
        hf_only = sorted(set(engine_kwargs) & EXCLUSIVE_OPTIONS["hf"])
        if hf_only:
            raise ValueError(f"backend 'vllm' does not take {hf_only} (options of backend 'hf'); "
                             f"put them under backend.hf")
        self.model_dir = str(model_dir)
        self.kwargs = {"tensor_parallel_size": int(tensor_parallel_size), "dtype": dtype,
                       "gpu_memory_utilization": float(gpu_memory_utilization), "seed": int(seed), **engine_kwargs}
        if max_model_len:
            self.kwargs["max_model_len"] = int(max_model_len)
        self.max_input_tokens = int(max_input_tokens) if max_input_tokens else None
        self.start_timeout_s, self.request_timeout_s, self.poll_s = start_timeout_s, request_timeout_s, poll_s
        self._worker: Worker | None = None

    @property
    def _proc(self):  # the worker process (None before the first generate / after close)
        return self._worker.proc if self._worker is not None else None

    def _start(self) -> None:
        ok, reason = vllm_available()
        if not ok:
            raise BackendUnavailable(f"vLLM backend unavailable: {reason}")
        self._worker = Worker(_vllm_worker, (self.model_dir, self.kwargs, self.max_input_tokens),
                              f"vLLM worker for {self.model_dir}", poll_s=self.poll_s)
        try:
            kind, payload = self._worker.wait("loading the model", self.start_timeout_s)
        except WorkerError:
            worker, self._worker = self._worker, None
            worker.kill()
            raise
        if kind != "ready":
            self.close()
            raise WorkerError(f"vLLM could not load {self.model_dir}: {payload}")

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        if self._worker is None:
            self._start()
        what = f"generating {len(prompts)} completions (max_new_tokens {int(max_new_tokens)})"
        try:
            self._worker.send(("generate", list(prompts), int(max_new_tokens), list(stop)), what)
            kind, payload = self._worker.wait(what, self.request_timeout_s)
        except WorkerError:
            worker, self._worker = self._worker, None
            worker.kill()
            raise
        if kind != "ok":
            raise WorkerError(f"vLLM generation failed for {self.model_dir}: {payload}")
        if len(payload) != len(prompts):
            raise WorkerError(f"vLLM worker for {self.model_dir} returned {len(payload)} completions for {len(prompts)} prompts")
        return [cut_at_stop(t, stop) for t in payload]

    def close(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def route_backend_spec(spec: Any, *, backends: Sequence[str] = BACKENDS,
                       exclusive: Mapping[str, frozenset[str]] | None = None, what: str = "generation") -> tuple[str, dict]:
    """``{"name", <shared keys>, "hf": {...}, "vllm": {...}}`` → (name, options of that backend).

    The block named like the chosen backend is merged with the flat (shared) keys, flat keys
    winning; other backends' blocks are ignored; flat keys set to ``None`` are dropped (unset).
    A key that belongs only to another backend (``exclusive``) is a one-line ``ValueError``.
    """
    exclusive = EXCLUSIVE_OPTIONS if exclusive is None else exclusive
    spec = {"name": spec} if isinstance(spec, str) or spec is None else dict(spec)
    name = spec.pop("name", None) or backends[0]
    if name not in backends:
        raise ValueError(f"unknown {what} backend {name!r}; choose one of {tuple(backends)}")
    blocks = {b: spec.pop(b) for b in backends if b in spec}
    for b, block in blocks.items():
        if block is not None and not isinstance(block, Mapping):
            raise ValueError(f"{what} backend option {b!r} must be a mapping of {b} options, got {block!r}")
    opts = dict(blocks.get(name) or {})
    opts.update({k: v for k, v in spec.items() if v is not None})
    foreign = {k: b for b in backends if b != name for k in exclusive.get(b, ()) if k in opts
               and k not in exclusive.get(name, ())}
    if foreign:
        k = sorted(foreign)[0]
        raise ValueError(f"{what} backend {name!r} does not take {k!r} (an option of backend {foreign[k]!r}); "
                         f"put backend-specific options under backend.{foreign[k]} / backend.{name}")
    return name, opts


def _check_options(cls: type, opts: Mapping[str, Any], name: str, skip: int = 1) -> None:
    params = list(inspect.signature(cls.__init__).parameters.values())[1 + skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = {p.name for p in params}
    bad = sorted(set(opts) - known)
    if bad:
        raise ValueError(f"generation backend {name!r} does not take {bad}; its options are {sorted(known)}")


# typed options of each backend, checked before anything loads (check_backend_spec)
BOOL_OPTIONS = frozenset({"trust_remote_code", "enforce_eager"})
POSITIVE_INT_OPTIONS: dict[str, frozenset[str]] = {
    "hf": frozenset({"batch_size", "num_threads", "max_input_tokens"}),
    "vllm": frozenset({"tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "max_input_tokens"}),
}
NULLABLE_OPTIONS = frozenset({"num_threads", "max_input_tokens", "max_model_len", "request_timeout_s", "device", "dtype"})
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _kind(value: Any) -> str:
    return {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}.get(
        type(value), type(value).__name__)


def backend_available(name: str, key: str = "taskpool.backend.name") -> None:
    """Raise :class:`BackendUnavailable` (one line) when backend ``name``'s package is not installed
    (vLLM: ``vllm``; HF: ``transformers``). Whether a CUDA device is present is checked when the
    vLLM worker starts (the job may run on another machine than the one checking)."""
    import importlib.util

    package = "vllm" if name == "vllm" else "transformers"
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        extra = " (pip install 'dare_lab[vllm]'; vLLM needs a GPU machine) or use backend hf" if name == "vllm" else ""
        raise BackendUnavailable(f"{key}={name}: the {package} package is not installed{extra}")


def check_backend_spec(spec: Any, *, prefix: str = "taskpool.backend", backends: Sequence[str] = BACKENDS,
                       exclusive: Mapping[str, frozenset[str]] | None = None, what: str = "generation",
                       check_hf_options: bool = True) -> tuple[str, dict]:
    """Check a backend config without loading anything; return (name, routed options).

    One-line errors naming the key where it lives (``taskpool.backend.hf.trust_remote_code``):
    a boolean option that is not true/false (a string is never a boolean), a count that is not a
    positive integer, an unknown dtype, a vLLM ``gpu_memory_utilization`` outside (0, 1], an
    unknown HF option, an option of the other backend (:func:`route_backend_spec`), a backend
    whose package is not installed (:func:`backend_available`)."""
    if hasattr(spec, "generate"):  # a ready backend object (custom / tests)
        return getattr(spec, "name", "custom"), {}
    raw = {"name": spec} if isinstance(spec, str) or spec is None else spec
    if not isinstance(raw, Mapping):
        raise ValueError(f"{prefix}: expected a backend name or a mapping, got {_show(raw)}")
    name, opts = route_backend_spec(spec, backends=backends, exclusive=exclusive, what=what)
    where = {k: f"{prefix}.{name}.{k}" for k in (raw.get(name) or {})}
    where.update({k: f"{prefix}.{k}" for k, v in raw.items() if k not in backends and k != "name" and v is not None})
    ints = POSITIVE_INT_OPTIONS.get(name, frozenset()) if what == "generation" else (
        frozenset({"tensor_parallel_size", "max_model_len", "data_parallel_size"}) if name == "vllm" else frozenset())
    for k, v in opts.items():
        key = where.get(k, f"{prefix}.{k}")
        if k in BOOL_OPTIONS and not isinstance(v, bool):
            raise ValueError(f"{key}={_show(v)}: expected true or false, got a {_kind(v)} (a string is never a boolean)")
        if k in ints:
            if v is None and k in NULLABLE_OPTIONS:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                got = str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else f"a {_kind(v)}"
                raise ValueError(f"{key}={_show(v)}: expected a positive integer, got {got}")
        if k == "dtype" and v is not None:
            if name == "vllm":
                if v not in VLLM_DTYPES:
                    raise ValueError(f"{key}={_show(v)}: unknown vLLM dtype; choose one of {list(VLLM_DTYPES)}")
            else:
                try:
                    _dtype(v)
                except ValueError as e:
                    raise ValueError(f"{key}={_show(v)}: {e}") from None
        if k == "gpu_memory_utilization" and name == "vllm":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{key}={_show(v)}: expected a fraction in (0, 1]")
        if k in ("start_timeout_s", "request_timeout_s", "poll_s", "timeout_s"):
            if v is None and k in NULLABLE_OPTIONS | {"timeout_s"}:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{key}={_show(v)}: expected a positive number of seconds")
    if name == "hf" and check_hf_options and what == "generation":
        _check_options(HFBackend, opts, "hf", skip=2)
    if name in ("hf", "vllm"):
        backend_available(name, f"{prefix}.name")
    return name, opts


def make_backend(spec: dict | str | None, model: Any, tokenizer: Any = None) -> GenerationBackend:
    """Build a backend from ``{"name": "hf"|"vllm", hf: {...}, vllm: {...}, **shared}`` (or a name).

    See :func:`route_backend_spec`. An object that already has ``generate`` (a custom or test
    backend) is returned as is.
    """
    if hasattr(spec, "generate"):
        return spec
    name, opts = route_backend_spec(spec)
    if name == "hf":
        _check_options(HFBackend, opts, "hf", skip=2)
        return HFBackend(model, tokenizer, **opts)
    if isinstance(model, torch.nn.Module):
        raise TypeError("vLLM backend needs a model directory, got an in-memory model; use backend 'hf'")
    return VLLMBackend(model, **opts)
