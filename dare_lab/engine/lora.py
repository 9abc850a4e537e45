"""PEFT LoRA adapters as pool members: a lazy source that presents θ_k = θ_PRE + scale·B·A.

An adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, or
``adapter_model.bin`` loaded only with ``torch.load(weights_only=True)``) is seen through the
same interface as a full checkpoint (:class:`~dare_lab.engine.sources.TensorSource` with
``chunk_reader``), under the *base model's* tensor names:

- a LoRA target ``<module>.weight``: θ_PRE + scale · B·A (transposed for ``fan_in_fan_out``;
  embedding LoRA ``lora_embedding_A/B``: θ_PRE + scale · (B·A)ᵀ), with scale = α / r, or
  α / √r with ``use_rslora`` (α, r per module through ``alpha_pattern`` / ``rank_pattern``, as
  peft matches them). Materialised when the engine asks for that tensor, one tensor per call,
  in float32 (float64 for a float64 base), and never cached: the reader holds the adapter's
  headers, not the model;
- a full tensor saved in the adapter (``modules_to_save``, trained biases, an embedding's
  ``base_layer``): that tensor (a ``base_layer`` is the starting point its LoRA delta adds to);
- every other base tensor: θ_PRE itself, read through the base source (its delta is 0).

So the engine computes δ = θ_k − θ_PRE per tensor as for a full fine-tune and every sparsifier
and merger applies unchanged; DARE masks are seeded by (seed, model name, tensor name) as
usual. The float32 materialisation uses peft's own operations (``(B @ A) * scale``, then
``W + Δ``), so a float32 adapter merges to the same bits as its ``merge_and_unload``
checkpoint. Unsupported adapter kinds (DoRA, other ``peft_type``s, LoRA biases, conv LoRA,
...) and modules the base lacks are one-line :class:`LoraAdapterError`\\ s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dare_lab.engine.sources import SAFE_DTYPES, ChunkReader, TensorSource, tensor_digest, xxhash
from dare_lab.engine.validate import check_safetensors_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
_PREFIX = "base_model.model."

# adapter_config keys that change what the adapter computes beyond scale·B·A (or the model's
# layout): refused when set, each named in the error
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)", "use_qalora": "QALoRA (use_qalora)", "use_bdlora": "BD-LoRA (use_bdlora)",
    "lora_bias": "LoRA biases (lora_bias)", "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)", "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)", "megatron_config": "Megatron layers (megatron_config)",
}
_LINEAR = re.compile(r"^(?P<mod>.+)\.(?P<ab>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBED = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?$")
_SAVED_MODULE = re.compile(r"\.modules_to_save\.[^.]+\.")   # un-stripped key of a modules_to_save copy


class LoraAdapterError(ValueError):
    """An adapter that cannot be merged as θ_PRE + scale·B·A (one line, names the adapter)."""


def is_adapter_dir(ref: Any) -> bool:
    """True for a local directory holding ``adapter_config.json`` (a PEFT adapter)."""
    try:
        return isinstance(ref, (str, os.PathLike)) and (Path(ref).expanduser() / ADAPTER_CONFIG).is_file()
    except OSError:
        return False


@dataclass(frozen=True)
class _Target:
    a: str              # adapter key of A (r × in; embeddings: r × num_embeddings)
    b: str              # adapter key of B (out × r; embeddings: dim × r)
    scale: float
    transpose: bool     # fan_in_fan_out (Conv1D) or embedding LoRA: Δ = (B·A)ᵀ
    start: str | None   # adapter key of a saved base_layer weight (else θ_PRE from the base)


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key``: the first pattern key matching the module name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


class LoraSource:
    """A PEFT LoRA adapter over ``base`` seen as a full model (θ_PRE + scale·B·A per target).

    ``materialised`` counts the target tensors built so far; ``live`` / ``peak_live`` how many
    built tensors are held at once by the readers and tensors this source handed out.
    """

    def __init__(self, ref: str | os.PathLike, base: TensorSource, label: str | None = None):
        self.ref = str(ref)
        self.label = label or self.ref
        self.path = Path(ref).expanduser()
        self.base = base
        self._lock = threading.Lock()
        self.materialised = self.live = self.peak_live = 0
        cfg_file = self.path / ADAPTER_CONFIG
        self._config_bytes = cfg_file.read_bytes()
        try:
            cfg = json.loads(self._config_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoraAdapterError(f"adapter {self.label!r}: {ADAPTER_CONFIG} is not valid JSON") from None
        if not isinstance(cfg, dict):
            raise LoraAdapterError(f"adapter {self.label!r}: {ADAPTER_CONFIG} is not a JSON object")
        self._check_config(cfg)
        self._open_file()
        self._plan(cfg)

    # ---- adapter file -------------------------------------------------------------------------
    def _check_config(self, cfg: dict) -> None:
        kind = cfg.get("peft_type")
        if str(kind).upper() != "LORA":
            raise LoraAdapterError(f"adapter {self.label!r}: peft_type {kind!r} is not supported "
                                   f"(only LORA adapters merge as scale·B·A; LoHa, LoKr, IA3, AdaLoRA, ... do not)")
        for key, what in _UNSUPPORTED_OPTIONS.items():
            if cfg.get(key):
                raise LoraAdapterError(f"adapter {self.label!r}: {what} is not supported (its delta is not scale·B·A)")

    def _open_file(self) -> None:
        safe, binf = self.path / ADAPTER_SAFE, self.path / ADAPTER_BIN
        self._bin: dict[str, torch.Tensor] | None = None
        if safe.is_file():
            self.file = safe
            header = check_safetensors_file(safe, self.label)   # layout checked: a damaged file fails here, in one line
            self._ainfo = {k: (tuple(v["shape"]), SAFE_DTYPES[v["dtype"]]) for k, v in header.items()}
            with open(safe, "rb") as fh:
                self._header_bytes = fh.read(8 + int.from_bytes(fh.read(8), "little"))[:1 << 26]
        elif binf.is_file():
            self.file = binf
            try:
                self._bin = torch.load(binf, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001
                raise LoraAdapterError(f"adapter {self.label!r}: cannot load {ADAPTER_BIN} with weights_only=True "
                                       f"({type(exc).__name__})") from None
            if not isinstance(self._bin, dict) or not all(isinstance(v, torch.Tensor) for v in self._bin.values()):
                raise LoraAdapterError(f"adapter {self.label!r}: {ADAPTER_BIN} is not a state dict of tensors")
            self._ainfo = {k: (tuple(v.shape), v.dtype) for k, v in self._bin.items()}
            self._header_bytes = json.dumps({k: [list(s), str(d)] for k, (s, d) in self._ainfo.items()}).encode()
        else:
            raise FileNotFoundError(f"adapter {self.label!r}: no {ADAPTER_SAFE} or {ADAPTER_BIN} in {self.path}")
        if not self._ainfo:
            raise LoraAdapterError(f"adapter {self.label!r}: {self.file.name} holds no tensors")

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[key]
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as fh:
            return fh.get_tensor(key)

    # ---- names ---------------------------------------------------------------------------------
    def _resolve(self, name: str) -> str | None:
        """The base tensor an adapter-side tensor name denotes: the same name, or the name with
        its first component dropped (a task model's adapter over a bare encoder), or with one
        leading component added (an adapter of a bare model over a task model)."""
        if name in self._base_set:
            return name
        tail = name.partition(".")[2]
        if tail in self._base_set:
            return tail
        return self._by_tail.get(name)

    def _plan(self, cfg: dict) -> None:
        base_names = self.base.names()
        self._base_set = set(base_names)
        self._by_tail: dict[str, str] = {}
        for n in base_names:
            if "." in n:
                self._by_tail.setdefault(n.partition(".")[2], n)
        parts: dict[str, dict[str, str]] = {}     # module → {"A"/"B": key, "embed": "1"}
        full: dict[str, str] = {}                  # adapter-side tensor name → key
        adapters: set[str] = set()
        for key in self._ainfo:
            k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _LINEAR.match(k) or _EMBED.match(k)
            if m:
                ab = m["ab"][-1]
                if m["adapter"]:
                    adapters.add(m["adapter"])
                slot = parts.setdefault(m["mod"], {})
                slot[ab] = key
                slot["embed"] = "1" if m.re is _EMBED else slot.get("embed", "")
                continue
            if "lora_magnitude_vector" in k:
                raise LoraAdapterError(f"adapter {self.label!r}: DoRA (lora_magnitude_vector in {key!r}) is not supported")
            if ".original_module." in k:
                continue                            # peft's copy of the base module beside modules_to_save
            k = _SAVED_MODULE.sub(".", k)
            if any(p.startswith(("lora_", "hada_", "lokr_", "ia3_", "token_adapter", "trainable_tokens"))
                   for p in k.split(".")):
                raise LoraAdapterError(f"adapter {self.label!r}: adapter tensor {key!r} is of an unsupported kind")
            full[k.replace(".base_layer.", ".")] = key
        if len(adapters) > 1:
            raise LoraAdapterError(f"adapter {self.label!r}: {self.file.name} holds several adapters {sorted(adapters)}; "
                                   f"save one per directory")
        r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        rslora, fan_in_fan_out = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
        ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        self._targets: dict[str, _Target] = {}
        self._full: dict[str, str] = {}
        self._extra: list[str] = []
        for mod, slot in parts.items():
            if "A" not in slot or "B" not in slot:
                raise LoraAdapterError(f"adapter {self.label!r}: module {mod!r} has lora_{'A' if 'A' not in slot else 'B'} missing")
            embed = bool(slot["embed"])
            ashape, bshape = self._ainfo[slot["A"]][0], self._ainfo[slot["B"]][0]
            if len(ashape) != 2 or len(bshape) != 2:
                raise LoraAdapterError(f"adapter {self.label!r}: module {mod!r} has {len(ashape)}-d LoRA weights "
                                       f"(convolution LoRA is not supported)")
            r = ashape[0]
            if bshape[1] != r:
                raise LoraAdapterError(f"adapter {self.label!r}: module {mod!r}: lora_A is {list(ashape)}, lora_B {list(bshape)}")
            want_r = _pattern_value(ranks, mod, r_default)
            if want_r != r:
                raise LoraAdapterError(f"adapter {self.label!r}: module {mod!r} has rank {r}, adapter_config says {want_r}")
            alpha = _pattern_value(alphas, mod, alpha_default)
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            wanted = f"{mod}.weight"
            name = self._resolve(wanted)
            if name is None:
                raise LoraAdapterError(f"adapter {self.label!r} targets module {mod!r}, whose weight {wanted!r} "
                                       f"the base model lacks")
            transpose = embed or fan_in_fan_out
            dshape = (bshape[0], ashape[1])[::-1] if transpose else (bshape[0], ashape[1])
            start = full.pop(wanted, None)
            shape = self._ainfo[start][0] if start else tuple(self.base.shape(name))
            if tuple(shape) != dshape:
                raise LoraAdapterError(f"adapter {self.label!r}: module {mod!r}: delta B·A{'ᵀ' if transpose else ''} is "
                                       f"{list(dshape)}, weight {name!r} is {list(shape)}"
                                       + ("" if transpose or not fan_in_fan_out else " (check fan_in_fan_out)"))
            self._targets[name] = _Target(slot["A"], slot["B"], scale, transpose, start)
        for n, key in full.items():
            name = self._resolve(n)
            if name is None:
                self._extra.append(n)               # e.g. a head the base lacks: the plan decides (scope)
                self._full[n] = key
            else:
                self._full[name] = key
        self._names = base_names + self._extra

    # ---- TensorSource ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._full:
            return self._ainfo[self._full[name]][0]
        t = self._targets.get(name)
        if t is not None and t.start:
            return self._ainfo[t.start][0]
        return tuple(self.base.shape(name))

    def _compute_dtype(self, name: str) -> torch.dtype:
        t = self._targets[name]
        stored = self._ainfo[t.start][1] if t.start else self.base.dtype(name)
        return torch.float64 if stored == torch.float64 else torch.float32

    def dtype(self, name: str) -> torch.dtype:
        if name in self._full:
            return self._ainfo[self._full[name]][1]
        if name in self._targets:
            return self._compute_dtype(name)
        return self.base.dtype(name)

    def targets(self) -> list[str]:
        """Base tensor names this adapter changes by scale·B·A."""
        return list(self._targets)

    def materialise(self, name: str) -> torch.Tensor:
        """θ_k of one LoRA target: W + (B @ A) * scale (Δ transposed for fan_in_fan_out and
        embeddings), W the saved base_layer or θ_PRE; float32 (float64 for a float64 base)."""
        t = self._targets[name]
        ct = self._compute_dtype(name)
        w = self._adapter_tensor(t.start) if t.start else self.base.get(name)
        a, b = self._adapter_tensor(t.a).to(ct), self._adapter_tensor(t.b).to(ct)
        delta = b @ a
        if t.transpose:
            delta = delta.T
        delta = delta * t.scale
        out = w.to(ct) + delta
        with self._lock:
            self.materialised += 1
        return out

    def _hold(self) -> None:
        with self._lock:
            self.live += 1
            self.peak_live = max(self.peak_live, self.live)

    def _release(self) -> None:
        with self._lock:
            self.live -= 1

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self._targets:
            t = self.materialise(name)
            t = t.to(dtype) if dtype is not None and t.dtype != dtype else t
            self._hold()
            weakref.finalize(t, self._release)
            return t
        if name in self._full:
            t = self._adapter_tensor(self._full[name])
            return t.to(dtype) if dtype is not None and t.dtype != dtype else t
        return self.base.get(name, dtype)

    def chunk_reader(self, name: str, key: str = "in") -> ChunkReader:
        if name in self._targets:
            reader = _HeldReader(self.materialise(name), self._release)
            self._hold()
            return reader
        if name in self._full:
            return ChunkReader.of_tensor(self._adapter_tensor(self._full[name]))
        if hasattr(self.base, "chunk_reader"):
            return self.base.chunk_reader(name, key)
        return ChunkReader.of_tensor(self.base.get(name))

    # ---- provenance -----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of adapter_config.json and the adapter file's header (its layout)."""
        return hashlib.sha256(self._config_bytes + b"\0" + self._header_bytes).hexdigest()

    def content_fingerprint(self, names) -> dict[str, Any]:
        """xxh3_128 over every adapter tensor (name, dtype, shape, bytes) and adapter_config.json:
        what this adapter adds; the base's own fingerprint covers θ_PRE."""
        if xxhash is None:
            return {"content_xxh3_128": "unavailable (xxhash not installed)"}
        h = xxhash.xxh3_128(self._config_bytes)
        total = 0
        for key in sorted(self._ainfo):
            digest, nbytes = tensor_digest(self._adapter_tensor(key))
            total += nbytes
            shape, dt = self._ainfo[key]
            h.update(f"{key}\t{str(dt).removeprefix('torch.')}\t{list(shape)}\t{nbytes}\t{digest}\n".encode())
        return {"content_xxh3_128": h.hexdigest(), "adapter_tensors_hashed": len(self._ainfo), "bytes_hashed": total,
                "lora_targets": len(self._targets)}


class _HeldReader(ChunkReader):
    """A chunk reader over one materialised tensor that frees it (and says so) when closed."""

    def __init__(self, tensor: torch.Tensor, release):
        super().__init__(None, tensor=tensor)
        self._release_cb = release

    def close(self) -> None:
        if self._release_cb is not None:
            self.flat = None
            self._release_cb()
            self._release_cb = None
        super().close()


def open_model(ref: Any, label: str, base: TensorSource | None = None) -> TensorSource:
    """A pool member: a source as is; a PEFT adapter directory as a :class:`LoraSource` over
    ``base``; anything else a :class:`~dare_lab.engine.sources.CheckpointReader`. Without a base
    (opening the base model itself), an adapter directory is a one-line error."""
    if hasattr(ref, "get") and hasattr(ref, "names"):
        return ref
    if is_adapter_dir(ref):
        if base is None:
            raise LoraAdapterError(f"model {label!r}: {ref} is a LoRA adapter, not a full model "
                                   f"(adapters are pool members; the base must be a full checkpoint)")
        return LoraSource(ref, base, label=label)
    from dare_lab.engine.sources import CheckpointReader

    return CheckpointReader(ref, label=label)
