"""Code verdicts that cannot be faked (issue 13 item 2).

Each program below is a wrong solution followed by a test that fails; the completion then
tries to get a "passed" verdict without the test running to its end. With exit status as the
verdict (the sandbox before issue 13) most of them passed. Now a program passes only if the
sandbox's own harness saw its last statement finish in the original process.
"""

import pytest

from dare_lab.taskpool.generation.code.sandbox import MODULE_NAME, Sandbox, SandboxLimits

WRONG = "def add(a, b):\n    return a - b\n"
TEST = "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n\n\ncheck(add)\n"
RIGHT = "def add(a, b):\n    return a + b\n"

# completion text inserted between the wrong solution and the failing test
FAKES = {
    "sys_exit_0": "import sys\nsys.exit(0)\n",
    "os_exit_0": "import os\nos._exit(0)\n",
    "unittest_main_under_guard": ("import unittest\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n"
                                  "if __name__ == '__main__':\n    unittest.main()\n"),
    "unittest_main_unguarded": "import unittest\nunittest.main(argv=['x'])\n",
    "atexit_os_exit_0": "import atexit, os\natexit.register(os._exit, 0)\n",
    "replaced_sys_exit": ("import os, sys\n_e = os._exit\nsys.exit = lambda *a, **k: _e(0)\nos._exit = lambda *a: _e(0)\n"
                          "sys.excepthook = lambda *a: _e(0)\n"),
    "replaced_builtins": ("import builtins, os\n_e = os._exit\nclass _X(Exception):\n    pass\n"
                          "builtins.BaseException = _X\nbuiltins.SystemExit = _X\nbuiltins.isinstance = lambda *a: True\n"
                          "builtins.exec = lambda *a, **k: None\nbuiltins.print = lambda *a, **k: _e(0)\n"),
    "systemexit_subclass": "class Quiet(SystemExit):\n    code = 0\nraise Quiet(0)\n",
    "systemexit_from_signal": ("import signal, sys, time\nsignal.signal(signal.SIGALRM, lambda *a: sys.exit(0))\n"
                               "signal.setitimer(signal.ITIMER_REAL, 0.05)\ntime.sleep(1)\n"),
    "keyboard_interrupt": "raise KeyboardInterrupt\n",
    "kill_own_process_group": "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
    "kill_self_sigterm": "import os, signal\nsignal.signal(signal.SIGTERM, lambda *a: os._exit(0))\nos.kill(os.getpid(), signal.SIGTERM)\n",
    "thread_exits_early": ("import os, threading, time\nthreading.Thread(target=lambda: os._exit(0)).start()\n"
                           "time.sleep(2)\n"),
    # the child fixes the answer and runs the test to its end; the original process exits 0
    "fork_child_reports": ("import os\npid = os.fork()\nif pid:\n    os.waitpid(pid, 0)\n    os._exit(0)\n"
                           "def add(a, b):\n    return a + b\n"),
    "prints_passed_marker": "print('passed')\nprint('ALL TESTS PASSED')\nimport os\nos._exit(0)\n",
    "writes_every_fd": ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32)\n        os.write(fd, b'passed')\n"
                        "    except OSError:\n        pass\nos._exit(0)\n"),
    # introspection: find the harness's reporter and call it, read its nonce, rewrite control flow
    "calls_harness_reporter": ("import os, sys\nf = sys._getframe()\nwhile f is not None:\n    for v in list(f.f_locals.values()):\n"
                               "        if callable(v) and getattr(v, '__name__', '') == 'send':\n            try:\n"
                               "                v(None)\n            except BaseException:\n                pass\n"
                               "    f = f.f_back\nos._exit(0)\n"),
    "reads_reporter_frame": ("import os, sys\nf = sys._getframe(1)\nfor v in list(f.f_locals.values()):\n"
                             "    try:\n        g = v.__self__.gi_frame\n        print(g.f_locals)\n    except Exception as e:\n"
                             "        pass\nos._exit(0)\n"),
    "gc_scan": "import gc, os\ntry:\n    gc.get_objects()\nexcept PermissionError:\n    pass\nos._exit(0)\n",
    "settrace_jump": ("import sys, os\ndef tr(frame, event, arg):\n    return tr\ntry:\n    sys.settrace(tr)\n"
                      "except PermissionError:\n    os._exit(0)\n"),
    "ctypes_memory": "import os\ntry:\n    import ctypes\nexcept Exception:\n    os._exit(0)\n",
    "ctypes_through_importlib": ("import os, importlib.util\nfor name in ('_ctypes', '_testcapi'):\n    try:\n"
                                 "        spec = importlib.util.find_spec(name)\n        importlib.util.module_from_spec(spec)\n"
                                 "        print('LOADED', name)\n    except Exception:\n        pass\nos._exit(0)\n"),
    "proc_self_mem": ("import os\nfor p in ('/proc/self/mem', 'mem'):\n    try:\n        open(p, 'rb')\n    except OSError:\n"
                      "        pass\nos._exit(0)\n"),
    "patched_hook_helpers": ("import os, posixpath, builtins\nposixpath.basename = lambda p: 'x'\n"
                             "os.path.realpath = lambda p, **k: '/tmp/x'\nbuiltins.isinstance = lambda *a: False\n"
                             "class S(str):\n    def partition(self, *a):\n        return ('x', '', '')\n"
                             "    def rpartition(self, *a):\n        return ('x', '', 'x')\n"
                             "for p in ('/proc/self/mem', S('/proc/self/mem'), b'/proc/self/mem'):\n    try:\n"
                             "        open(p, 'rb')\n        print('OPENED')\n    except OSError:\n        pass\n"
                             "import importlib\ntry:\n    importlib.import_module(S('_ctypes'))\n    print('IMPORTED')\n"
                             "except Exception:\n    pass\nos._exit(0)\n"),
    "spawns_fresh_python": ("import os, sys\ntry:\n    import subprocess\n    subprocess.run([sys.executable, '-c', 'print(1)'])\n"
                            "except Exception:\n    pass\ntry:\n    os.execv(sys.executable, [sys.executable, '-c', 'pass'])\n"
                            "except Exception:\n    pass\nos._exit(0)\n"),
}


@pytest.fixture(scope="module", params=["auto", "rlimit"])
def sandbox(request):
    return Sandbox(SandboxLimits(wall_s=8, cpu_s=4, memory_mb=512), isolation=request.param)


def test_right_answer_passes_wrong_answer_fails(sandbox):
    ok, bad = sandbox.run_many([RIGHT + TEST, WRONG + TEST])
    assert ok.passed and ok.completed, ok
    assert not bad.passed and not bad.completed and bad.status == "failed"


@pytest.mark.parametrize("name", list(FAKES))
def test_fake_pass_fails(sandbox, name):
    r = sandbox.run(WRONG + FAKES[name] + TEST)
    assert not r.passed and not r.completed, (name, r)


# tricks that end the program before its test: they fail even in front of a right answer
STOPPERS = [n for n in FAKES if n not in {"unittest_main_under_guard", "atexit_os_exit_0", "replaced_sys_exit",
                                          "replaced_builtins", "kill_own_process_group"}]


@pytest.mark.parametrize("name", STOPPERS)
def test_program_stopped_before_its_test_fails_even_with_a_right_answer(sandbox, name):
    r = sandbox.run(RIGHT + FAKES[name] + TEST)
    assert not r.passed and not r.completed, (name, r)


@pytest.mark.parametrize("name", ["unittest_main_under_guard", "atexit_os_exit_0", "replaced_sys_exit", "replaced_builtins"])
def test_tricks_that_leave_the_test_alone_are_judged_by_the_test(sandbox, name):
    assert sandbox.run(RIGHT + FAKES[name] + TEST).passed


def test_main_guard_does_not_run_and_name_is_not_main(sandbox):
    prog = (RIGHT + "print('NAME', __name__)\nif __name__ == '__main__':\n    input()\n    raise SystemExit(1)\n" + TEST)
    r = sandbox.run(prog)
    assert r.passed, r
    assert f"NAME {MODULE_NAME}" in r.stdout and MODULE_NAME != "__main__"


def test_ordinary_programs_still_work(sandbox):
    prog = ("from collections import namedtuple\nfrom dataclasses import dataclass\nfrom typing import TypeVar, NamedTuple\n"
            "import enum, functools, itertools, re, math, heapq, hashlib, json, threading, os\n"
            "P = namedtuple('P', 'x y')\nT = TypeVar('T')\nclass N(NamedTuple):\n    a: int\n"
            "@dataclass\nclass D:\n    a: int = 1\nclass E(enum.Enum):\n    A = 1\n"
            "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
            "def gen():\n    yield 1\nassert list(gen()) == [1]\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    import traceback; traceback.format_exc()\n"
            "pid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\n"
            "open('f.txt', 'w').write('x')\nassert open('f.txt').read() == 'x'\n"
            "print(P(1, 2), N(3), D(), E.A, math.sqrt(4))\n")
    r = sandbox.run(prog + RIGHT + TEST)
    assert r.passed, r.stderr


def test_forked_child_cannot_report(sandbox):
    # the original process fails after its child ran the (passing) test to the end
    prog = RIGHT + "import os\npid = os.fork()\nif pid:\n    os.waitpid(pid, 0)\n    raise SystemExit(0)\n" + TEST
    r = sandbox.run(prog)
    assert not r.passed and not r.completed, r


def test_syntax_error_and_swallowed_test_fail(sandbox):
    progs = [RIGHT + "def broken(:\n" + TEST, RIGHT + "'''\n" + TEST]
    assert [r.passed for r in sandbox.run_many(progs)] == [False, False]
