"""Loading the compiled loops does not import scipy.linalg (numba's BLAS probe, ~0.3 s of start-up),
and leaves numba's linear algebra usable afterwards."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

CHECK = r"""
import sys
from dare_lab.engine import kernels
import numpy as np
assert kernels.AVAILABLE
state = np.zeros(625, dtype=np.uint32)
kernels.mt_seed(5489, state)   # a compiled call: numba's registries are loaded by now
assert state[1] == 1301868182  # init_genrand(5489)'s second word
print("scipy.linalg" in sys.modules, kernels.BLAS_PROBE in sys.modules)
import numba, numpy as np

@numba.njit
def dot(a, b):
    return np.dot(a, b)

print(dot(np.arange(3.0), np.arange(3.0)))
"""


def _run(cache: Path, prelude: str = "") -> list[str]:
    r = subprocess.run([sys.executable, "-c", prelude + CHECK], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "NUMBA_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_kernels_load_without_scipy_linalg_and_blas_still_works(tmp_path):
    assert _run(tmp_path) == ["False", "False", "5.0"]   # np.dot compiled after the load still finds scipy's BLAS


def test_nothing_changes_when_scipy_linalg_is_already_imported(tmp_path):
    assert _run(tmp_path, "import scipy.linalg\n") == ["True", "True", "5.0"]
