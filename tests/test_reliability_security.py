"""Security defaults: no remote code unless a config asks for it, pickles only with
``weights_only=True``, and no secret in anything dare_lab writes."""

import ast
from pathlib import Path

import pytest
import yaml

from dare_lab.shell.run_identity import REDACTED, is_secret_key, redact, redact_text

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "dare_lab").rglob("*.py"))
# torch.load calls allowed without weights_only=True: (file, reason). Keep this list empty or justified.
PICKLE_ALLOWLIST: dict[str, str] = {}


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            yield name, node


def test_trust_remote_code_is_never_hard_wired_on():
    for src in SOURCES:
        for name, node in calls(ast.parse(src.read_text())):
            for kw in node.keywords:
                if kw.arg == "trust_remote_code":
                    assert not (isinstance(kw.value, ast.Constant) and kw.value.value is True), f"{src}:{node.lineno}"
    for cfg in (ROOT / "configs").rglob("*.yaml"):
        def walk(o, where):
            if isinstance(o, dict):
                for k, v in o.items():
                    assert not (k == "trust_remote_code" and v is True), f"{cfg}: {where}{k}"
                    walk(v, f"{where}{k}.")
            elif isinstance(o, list):
                for v in o:
                    walk(v, where)
        walk(yaml.safe_load(cfg.read_text()) or {}, "")


def test_torch_load_only_with_weights_only_true():
    for src in SOURCES:
        rel = str(src.relative_to(ROOT))
        for name, node in calls(ast.parse(src.read_text())):
            if name != "load" or not isinstance(node.func, ast.Attribute) or getattr(node.func.value, "id", "") != "torch":
                continue
            ok = any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                     for kw in node.keywords)
            assert ok or rel in PICKLE_ALLOWLIST, f"{rel}:{node.lineno}: torch.load without weights_only=True"


@pytest.mark.parametrize("key", ["api_key", "WANDB_API_KEY", "hf_token", "token", "secret", "client_secret",
                                 "db_password", "openaiApiKey", "auth_token", "access-token", "key"])
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["max_new_tokens", "pad_token", "eos_token_id", "tokenizer", "keys", "sort_keys",
                                 "monkey", "tokens", "author", "seed", "drop_rate"])
def test_not_secret_keys(key):
    assert not is_secret_key(key)


def test_redact_nested_and_environment_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-0123456789abcdef")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-9876543210")
    cfg = {"tracker": {"api_key": "sk-live-1", "project": "p"}, "judge": {"openai": {"token": "x" * 20, "model": "gpt"}},
           "notes": "run with key wandb-0123456789abcdef", "list": [{"password": "pw"}], "tokenizer": {"pad_token": "<pad>"},
           "hf_token": None, "cmd": "train --token=tok-9876543210"}
    out = redact(cfg)
    assert out["tracker"] == {"api_key": REDACTED, "project": "p"}
    assert out["judge"]["openai"] == {"token": REDACTED, "model": "gpt"}
    assert out["notes"] == f"run with key {REDACTED}"
    assert out["list"] == [{"password": REDACTED}]
    assert out["tokenizer"] == {"pad_token": "<pad>"} and out["hf_token"] is None
    assert "tok-9876543210" not in out["cmd"]
    assert cfg["tracker"]["api_key"] == "sk-live-1"  # a copy: the live config keeps its key


def test_redact_override_lines():
    assert redact_text("method.drop_rate=0.5 +tracker.api_key=sk-1234 +x.hf_token=abc") == \
        f"method.drop_rate=0.5 +tracker.api_key={REDACTED} +x.hf_token={REDACTED}"
    assert redact_text("max_new_tokens=512 pad_token=<pad>") == "max_new_tokens=512 pad_token=<pad>"
