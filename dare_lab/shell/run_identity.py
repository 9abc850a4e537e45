"""Run identity, the resume registry, and secret redaction.

A run's identity is the sha256 of its resolved config with secrets redacted and with the
keys that cannot change its results removed (:data:`NOT_IDENTITY`: the ``output`` section,
the resume switches, the tracker, the experiment label, the thread count — merges are
bit-identical across thread counts — and Hydra's own node; and :data:`NOT_IDENTITY_NAMES`
anywhere: ``output_dir``, ``work_dir``, ``cache_dir``, ``log_dir``). Seeds, input model
references and every other knob are part of it, and so is the listing order of the pool's
models (:func:`order_aware`: per-model weights and scaling terms are positional).

The registry is a directory of complete runs, one entry per identity::

    <registry>/<run_id>/config.yaml    resolved config (secrets redacted)
    <registry>/<run_id>/metrics.json   the run's metrics
    <registry>/<run_id>/run.json       identity, where the run's outputs are, when it finished

An entry is written to a temporary sibling and renamed into place as the very last step of a
run, so it exists only for runs that finished; a run killed at any moment leaves no entry
and is redone on the next launch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REDACTED = "***"
# Key components (split on _ - . and camelCase) that mark a secret value.
_SECRET_PARTS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials", "auth"}
# ... except these well-known non-secret keys (tokenizer special tokens and friends).
_NOT_SECRET = re.compile(r"^(pad|bos|eos|unk|sep|cls|mask|additional_special|decoder_start|sort|max_new|max)_?tokens?(_ids?)?$"
                         r"|^(sort_keys|key_or_group|keys)$", re.IGNORECASE)
# Environment variables whose values are never written anywhere, whatever key carries them.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "OPENAI_API_KEY",
              "ANTHROPIC_API_KEY", "AWS_SECRET_ACCESS_KEY", "AZURE_OPENAI_API_KEY", "GITHUB_TOKEN")

# Top-level / dotted keys left out of the identity: they cannot change a run's results.
NOT_IDENTITY = ("hydra", "output", "resume", "tracker", "experiment_name", "engine.threads")
# Keys left out wherever they appear: where things are written or cached, not what is computed.
NOT_IDENTITY_NAMES = frozenset({"output_dir", "work_dir", "cache_dir", "log_dir"})


def is_secret_key(key: Any) -> bool:
    """True for keys like ``api_key``, ``hf_token``, ``WANDB_API_KEY``, ``db_password``, ``clientSecret``."""
    text = str(key)
    if _NOT_SECRET.match(text):
        return False
    parts = re.split(r"[_\-.\s]+|(?<=[a-z])(?=[A-Z])", text)
    return any(p.lower() in _SECRET_PARTS for p in parts if p)


def secret_values() -> list[str]:
    """Values of the secret environment variables that are set (long enough to matter)."""
    vals = [os.environ.get(k, "") for k in SECRET_ENV]
    vals += [v for k, v in os.environ.items() if k.endswith(("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD"))]
    return sorted({v for v in vals if len(v) >= 8}, key=len, reverse=True)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts/lists/scalars) with every secret-named key's value replaced by ``***``
    and every known secret environment value masked wherever it appears in a string."""
    envs = secret_values()

    def walk(o: Any) -> Any:
        if isinstance(o, Mapping):
            return {k: (REDACTED if is_secret_key(k) and v not in (None, "", False) and not isinstance(v, Mapping)
                        else walk(v)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        if isinstance(o, str):
            return redact_text(o, envs)
        return o

    return walk(obj)


_SECRET_ASSIGN = re.compile(r"(?P<k>[A-Za-z0-9_.\-]+)\s*(?P<sep>=|:\s)\s*(?P<v>[^\s,}\]]+)")


def redact_text(text: str, envs: list[str] | None = None) -> str:
    """Mask secret environment values and ``secret_key=value`` / ``secret_key: value`` pairs in free text."""
    for v in secret_values() if envs is None else envs:
        text = text.replace(v, REDACTED)

    def sub(m: re.Match) -> str:
        last = m.group("k").rsplit(".", 1)[-1].lstrip("+~")
        if is_secret_key(last) and m.group("v") not in ("null", "None", "''", '""', REDACTED):
            return f"{m.group('k')}{m.group('sep')}{REDACTED}"
        return m.group(0)

    return _SECRET_ASSIGN.sub(sub, text)


def config_container(cfg: Any) -> dict:
    """A resolved plain-dict copy of an OmegaConf config (or of a mapping)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps(cfg, default=str))


def _drop(d: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in d:
        return
    if not rest:
        d.pop(head)
    elif isinstance(d[head], dict):
        _drop(d[head], rest)


def identity_payload(cfg: Any) -> dict:
    """The part of the config that defines the run: redacted, without :data:`NOT_IDENTITY` keys."""
    d = redact(config_container(cfg))
    for key in NOT_IDENTITY:
        _drop(d, key)

    def prune(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: prune(v) for k, v in o.items() if k not in NOT_IDENTITY_NAMES}
        if isinstance(o, list):
            return [prune(v) for v in o]
        return o

    return order_aware(prune(d))


# Where a pool's listing order is kept in the identity: the model mapping of a pool node.
POOL_SECTIONS = ("modelpool",)


def order_aware(payload: dict) -> dict:
    """Keep the listing order of the pool's models in the identity.

    The identity is hashed as canonical JSON with sorted keys, which would forget the order of
    ``modelpool.models``; but settings such as ``method.weights`` (a list) and the scaling
    terms of data-aware methods are positional — the k-th value belongs to the k-th model —
    so the same pool listed in another order can give a different merge. The models are
    therefore written as an ordered list of ``[name, reference]`` pairs. Identities of two
    listings differ even where the results happen to agree (a needless rerun, never a reuse
    of a result that differs).
    """
    for section in POOL_SECTIONS:
        node = payload.get(section)
        if isinstance(node, dict) and isinstance(node.get("models"), Mapping):
            node = dict(node)
            node["models"] = {"__ordered__": [[str(k), v] for k, v in node["models"].items()]}
            payload = {**payload, section: node}
    return payload


def run_id(cfg: Any) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of :func:`identity_payload`."""
    blob = json.dumps(identity_payload(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- registry


def registry_entry(registry: str | os.PathLike, rid: str) -> Path:
    return Path(registry).expanduser() / rid


def is_complete(entry: Path) -> bool:
    """An entry counts only when all three files are there and parse (it is renamed in whole)."""
    try:
        json.loads((entry / "metrics.json").read_text())
        info = json.loads((entry / "run.json").read_text())
        return (entry / "config.yaml").is_file() and info.get("status") == "complete"
    except (OSError, ValueError):
        return False


def load_complete(registry: str | os.PathLike, rid: str) -> dict | None:
    """``{"metrics", "run", "config_yaml"}`` of a complete entry, or None."""
    entry = registry_entry(registry, rid)
    if not is_complete(entry):
        return None
    return {"metrics": json.loads((entry / "metrics.json").read_text()),
            "run": json.loads((entry / "run.json").read_text()),
            "config_yaml": (entry / "config.yaml").read_text()}


def record_complete(registry: str | os.PathLike, rid: str, config_yaml: str, metrics: Mapping[str, Any],
                    run_dir: str | os.PathLike) -> Path:
    """Write the registry entry of a finished run atomically (temporary sibling, then rename)."""
    from dare_lab.tracking.files import json_text

    entry = registry_entry(registry, rid)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{rid}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        info = {"run_id": rid, "status": "complete", "run_dir": str(Path(run_dir).resolve()),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for name, text in (("config.yaml", config_yaml), ("metrics.json", json_text(metrics)), ("run.json", json_text(info))):
            with open(tmp / name, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        if entry.exists():  # a rerun (force) or a twin job: replace the old entry in one rename
            trash = entry.parent / f".{rid}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(entry, trash)
            except OSError:
                pass
            else:
                shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:  # a concurrent twin committed first: its entry is as good as ours
            if not is_complete(entry):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry
