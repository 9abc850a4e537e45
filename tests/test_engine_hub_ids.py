"""Any hub id (with or without an org, with @revision) resolves through the HF cache; offline,
an id that is not cached is a one-line error naming it."""

import subprocess
import sys

import pytest

from dare_lab.engine.sources import resolve_model_dir

SCRIPT = r"""
import os, sys
from pathlib import Path
cache = Path(sys.argv[1])
for repo, rev in (("bert-base-uncased", "main"), ("org/model", "v1")):
    root = cache / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"")
    (root / "refs").mkdir()
    (root / "refs" / rev).write_text("a" * 40)
from dare_lab.engine.sources import resolve_model_dir
for ref in sys.argv[2:]:
    try:
        print(ref, "->", resolve_model_dir(ref).name)
    except FileNotFoundError as e:
        print(ref, "!!", e)
"""


def test_hub_ids_with_and_without_org_and_revision_resolve_offline(tmp_path):
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    refs = ["bert-base-uncased", "org/model@v1", "roberta-base", "org/model@v2"]
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), *refs], env=env, capture_output=True,
                         text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert lines[0] == "bert-base-uncased -> " + "a" * 40, out.stderr[-2000:]
    assert lines[1] == "org/model@v1 -> " + "a" * 40
    assert lines[2] == ("roberta-base !! model 'roberta-base' is not a local directory and cannot be fetched from "
                        "the hub: offline (HF_HUB_OFFLINE=1) and not in the local cache")
    assert lines[3].startswith("org/model@v2 !! model 'org/model@v2' is not a local directory")


@pytest.mark.parametrize("ref", ["./missing", "/no/such/dir", "~/no-such-dir-xyz", "a/b/c", "has space"])
def test_paths_that_are_no_hub_id_say_the_path_does_not_exist(ref):
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        resolve_model_dir(ref)
