"""Isolation probes (issue 14 item 6): no host socket of any kind, private temp dirs, own /proc.

Each probe runs a program that tries to reach something the test set up on the host. With
namespaces unavailable the sandbox must refuse ``isolation="namespace"`` (tested in
tests/test_sandbox.py); these probes then skip, since rlimit isolation shares the host.
"""

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dare_lab.taskpool.generation.code.sandbox import Sandbox, SandboxLimits


@pytest.fixture(scope="module")
def sb():
    s = Sandbox(SandboxLimits(wall_s=8, cpu_s=4, memory_mb=512), isolation="auto")
    if s.isolation != "namespace":
        pytest.skip(f"namespace isolation unavailable here: {s.unavailable}")
    return s


def _listen_unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    return s


def _accepted(server: socket.socket) -> bool:
    server.settimeout(0.2)
    try:
        conn, _ = server.accept()
    except (TimeoutError, socket.timeout, BlockingIOError, OSError):
        return False
    conn.close()
    return True


CONNECT = """
import socket
def probe(family, addr, kind=socket.SOCK_STREAM):
    s = socket.socket(family, kind)
    s.settimeout(2)
    try:
        s.connect(addr)
        s.sendall(b"hello from the sandbox")
        return "CONNECTED"
    except OSError as e:
        return "REFUSED %s" % type(e).__name__
"""


def _host_socket_dirs(tmp_path: Path) -> list[str]:
    """Writable host directories outside the usual temp dirs too (short paths: AF_UNIX needs < 108 bytes)."""
    dirs = [str(tmp_path)]
    for root in (os.path.expanduser("~"), "/run", "/var/run", str(Path(__file__).resolve().parent)):
        try:
            d = tempfile.mkdtemp(prefix=".sbxp", dir=root)
        except OSError:
            continue
        dirs.append(d)
    return dirs


def test_host_unix_sockets_on_the_filesystem_are_unreachable(sb, tmp_path):
    dirs = _host_socket_dirs(tmp_path)
    servers, paths = [], []
    try:
        for d in dirs:
            p = os.path.join(d, "s.sock")
            if len(p) >= 100:
                continue
            servers.append(_listen_unix(p))
            os.chmod(p, 0o777)
            os.chmod(d, 0o755)
            paths.append(p)
        # the host can connect: the probe is real
        c = socket.socket(socket.AF_UNIX)
        c.connect(paths[0])
        c.close()
        assert _accepted(servers[0])
        code = CONNECT + "".join(f"print('PROBE', {p!r}, probe(socket.AF_UNIX, {p!r}))\n" for p in paths)
        r = sb.run(code)
        assert r.passed, r.stderr
        assert "CONNECTED" not in r.stdout and r.stdout.count("REFUSED") == len(paths), r.stdout
        assert not any(_accepted(s) for s in servers)
    finally:
        for s in servers:
            s.close()
        for d in dirs[1:]:
            subprocess.run(["rm", "-rf", d], check=False)


def test_abstract_unix_socket_is_unreachable(sb):
    name = "\0dare_lab_probe_" + secrets.token_hex(8)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(name)
    srv.listen(8)
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(name)
        c.close()
        assert _accepted(srv)
        r = sb.run(CONNECT + f"print(probe(socket.AF_UNIX, {name!r}))\n")
        assert r.passed and "REFUSED" in r.stdout and "CONNECTED" not in r.stdout, r.stdout + r.stderr
        assert not _accepted(srv)
    finally:
        srv.close()


def test_tcp_to_a_host_loopback_listener_is_unreachable(sb):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        code = CONNECT + (f"print(probe(socket.AF_INET, ('127.0.0.1', {port})))\n"
                          f"print(probe(socket.AF_INET6, ('::1', {port})))\n"
                          f"print(probe(socket.AF_INET, ('127.0.0.1', {port}), socket.SOCK_DGRAM))\n")
        r = sb.run(code)
        assert r.passed and r.stdout.count("REFUSED") == 3 and "CONNECTED" not in r.stdout, r.stdout + r.stderr
        assert not _accepted(srv)
    finally:
        srv.close()


def test_netlink_and_raw_sockets_see_no_host_interfaces(sb):
    r = sb.run("import socket\nprint(sorted(n for _, n in socket.if_nameindex()))\n")
    assert r.passed and r.stdout.strip() == "['lo']", r.stdout + r.stderr


def test_temp_dirs_are_private_and_do_not_persist(sb, tmp_path):
    tag = "dare_sbx_probe_" + secrets.token_hex(6)
    host_marker = Path(tempfile.gettempdir(), tag + "_host")
    host_marker.write_text("host")
    try:
        code = ("import os\nfor d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
                f"    print(d, sorted(x for x in os.listdir(d) if x.startswith({tag!r})))\n"
                f"    open(os.path.join(d, {tag!r} + '_sbx'), 'w').write('x')\n"
                "print('WROTE')\n")
        r = sb.run(code)
        assert r.passed and "WROTE" in r.stdout, r.stdout + r.stderr
        assert f"/tmp []" in r.stdout, r.stdout  # the host's /tmp file is not visible
        for d in ("/tmp", "/var/tmp", "/dev/shm", tempfile.gettempdir()):
            assert not Path(d, tag + "_sbx").exists(), d
    finally:
        host_marker.unlink()


def test_proc_is_private(sb):
    secret = "dare-lab-secret-" + secrets.token_hex(8)
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", secret])
    try:
        for _ in range(100):  # the host can read it: the probe is real
            if secret.encode() in Path(f"/proc/{host.pid}/cmdline").read_bytes():
                break
            time.sleep(0.05)
        assert secret.encode() in Path(f"/proc/{host.pid}/cmdline").read_bytes()
        code = ("import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\nfound = []\nfor p in pids:\n"
                "    try:\n        c = open('/proc/%s/cmdline' % p, 'rb').read()\n    except OSError:\n        continue\n"
                f"    if {secret.encode()!r} in c:\n        found.append(p)\n"
                "print('PIDS', len(pids), 'FOUND', found, 'ME', os.getpid())\n")
        r = sb.run(code)
        assert r.passed, r.stderr
        assert "FOUND []" in r.stdout, r.stdout
        assert int(r.stdout.split("PIDS")[1].split()[0]) <= 3, r.stdout  # only the sandbox's own processes
    finally:
        host.kill()
        host.wait()


def test_host_files_are_absent(sb):
    here = str(Path(__file__).resolve().parent.parent)
    paths = [here, os.path.expanduser("~"), os.getcwd(), sys.prefix, "/etc/shadow", "/sys", "/run", "/home"]
    prefix = os.path.realpath(sys.base_prefix)  # bound read-only: its ancestors show only the way to it
    code = ("import os\n" + "".join(f"print({p!r}, os.listdir({p!r}) if os.path.isdir({p!r}) else os.path.exists({p!r}))\n"
                                    for p in paths))
    r = sb.run(code)
    assert r.passed, r.stderr
    seen = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    for p in paths:
        rp = os.path.realpath(p)
        if prefix.startswith(rp.rstrip("/") + "/"):
            assert seen[p] == str([prefix[len(rp.rstrip("/")) + 1:].split("/")[0]]), (p, seen[p])
        else:
            assert seen[p] == "False", (p, seen[p])


def test_system_dirs_are_read_only_and_uid_is_dropped(sb):
    code = ("import os\nfor d in ('/usr', '/etc', '/', os.path.dirname(os.__file__)):\n    try:\n"
            "        open(os.path.join(d, 'x_probe'), 'w')\n        print('WRITABLE', d)\n    except OSError:\n"
            "        pass\nprint('UID', os.getuid())\n"
            "print([l for l in open('/proc/self/status').read().splitlines() if l.startswith(('CapEff', 'CapBnd', 'NoNewPrivs'))])\n")
    r = sb.run(code)
    assert r.passed and "WRITABLE" not in r.stdout, r.stdout + r.stderr
    assert "'CapEff:\\t0000000000000000'" in r.stdout and "'CapBnd:\\t0000000000000000'" in r.stdout, r.stdout
    assert "'NoNewPrivs:\\t1'" in r.stdout, r.stdout
    if os.geteuid() == 0:
        assert "UID 0" not in r.stdout


def test_concurrent_programs_do_not_see_each_other(sb):
    tag = secrets.token_hex(6)
    code = ("import os, time\n"
            f"open('/tmp/{tag}_' + str(os.getpid()) + '_' + str(time.time_ns()), 'w').write('x')\ntime.sleep(0.5)\n"
            f"print(len([x for x in os.listdir('/tmp') if x.startswith({tag!r})]))\n")
    res = sb.run_many([code] * 4, workers=4)
    assert all(r.passed and r.stdout.strip() == "1" for r in res), [r.stdout + r.stderr for r in res]


def _world_python() -> str | None:
    """An interpreter an unprivileged user can run (the venv's may live under a 0700 /root)."""
    for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(p)
        parts = Path(real).parents
        if os.path.exists(real) and all(os.stat(d).st_mode & 0o001 for d in parts) and os.stat(real).st_mode & 0o001:
            return real
    return None


def test_unprivileged_evaluator_gets_the_same_isolation_through_a_user_namespace(tmp_path):
    """The non-root path (unshare --user --map-root-user): same root, no capabilities; or a one-line refusal."""
    import shutil

    py, setpriv = _world_python(), shutil.which("setpriv")
    if os.geteuid() != 0 or py is None or setpriv is None:
        pytest.skip("needs root (to switch to nobody), setpriv and an interpreter nobody can run")
    src = Path(__file__).resolve().parent.parent / "dare_lab/taskpool/generation/code/sandbox.py"
    base = Path(tempfile.mkdtemp(prefix="dare_sbx_nr_", dir="/tmp"))
    try:
        mod_dir = base / "a/b/c/d"
        mod_dir.mkdir(parents=True)
        shutil.copy(src, mod_dir / "sbx.py")
        script = base / "probe.py"
        script.write_text(
            "import sys\nsys.path.insert(0, sys.argv[1])\nimport sbx\n"
            "try:\n    sb = sbx.Sandbox(sbx.SandboxLimits(wall_s=8), isolation='namespace')\n"
            "except RuntimeError as e:\n    print('REFUSED', e)\n    raise SystemExit(0)\n"
            "r = sb.run(\"import os\\nprint('ROOT', sorted(os.listdir('/')))\\n"
            "print([l for l in open('/proc/self/status').read().splitlines() if l.startswith('CapEff')])\\n\")\n"
            "print('STATUS', r.status, r.stdout, r.stderr[-300:])\n"
            "print('EXIT0', sb.run('import os\\nos._exit(0)\\n').status)\n")
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", py, str(script), str(mod_dir)],
                           capture_output=True, text=True, timeout=120, cwd=base,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(base), "TMPDIR": "/tmp"})
        assert r.returncode == 0, r.stdout + r.stderr
        if "REFUSED" in r.stdout:  # the kernel forbids it for unprivileged users: refused in one line
            assert r.stdout.count("\n") == 1 and "unavailable here" in r.stdout, r.stdout
            return
        assert "STATUS passed" in r.stdout and "'CapEff:\\t0000000000000000'" in r.stdout, r.stdout + r.stderr
        assert "'tmp'" in r.stdout and "'work'" not in r.stdout.split("ROOT")[1].split("\n")[0], r.stdout
        assert "EXIT0 failed" in r.stdout, r.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)
