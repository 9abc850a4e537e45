"""The sandbox tests pass wherever the checkout lives (issue 14): under /tmp, in a path with spaces.

Before, a checkout under /tmp failed ``test_project_files_are_hidden``: the project was
"hidden" by a tmpfs mounted over a path inside the temp dir the program also ran in. Now the
sandbox's root holds only system directories and the interpreter, so the checkout is absent
whatever its path.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _copy_checkout(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "dare_lab", dest / "dare_lab", ignore=ignore)
    (dest / "tests").mkdir()
    for name in ("test_sandbox.py", "conftest.py"):
        shutil.copy2(ROOT / "tests" / name, dest / "tests" / name)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


@pytest.mark.parametrize("where", ["tmp", "tmp with spaces"])
def test_sandbox_suite_passes_from_a_checkout_under_tmp(where):
    parent = Path(tempfile.mkdtemp(prefix="dare lab co " if " " in where else "dare_lab_co_", dir="/tmp"))
    clone = parent / ("c with space" if " " in where else "c")
    try:
        _copy_checkout(clone)
        env = {**os.environ, "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "offline", "TMPDIR": "/tmp"}
        where_pkg = subprocess.run([sys.executable, "-c", "import dare_lab; print(dare_lab.__file__)"], cwd=clone,
                                   env=env, capture_output=True, text=True, check=True).stdout.strip()
        assert where_pkg.startswith(str(clone)), where_pkg  # the copy's package, not the editable install
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sandbox.py",
                            "-k", "not humaneval", "--basetemp", str(parent / "pt")], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]
    finally:
        shutil.rmtree(parent, ignore_errors=True)
