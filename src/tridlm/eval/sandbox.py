"""Running untrusted (model-written) Python: a subprocess with a time limit, resource limits, no
network, a private temporary working folder and a minimal environment.

Layers, outermost first:
* the parent kills the whole process group at the wall-clock limit (an infinite loop, a sleeping
  child) and reads at most `max_output` bytes of its output, which goes to size-limited files;
* rlimits: CPU seconds, address space, file size, open files, no core dumps;
* when started as root: a new network namespace (no interface but a down loopback: no network at
  all), then the program runs as `nobody`, so it cannot modify anything it does not own -- our files
  included -- wherever it writes;
* in the interpreter, before the program runs: an audit hook refuses sockets, starting processes,
  ctypes, and removing, renaming or writing files outside the working folder (what stands between
  the program and the files of the user running it when dropping to `nobody` is impossible);
* `python -I -S` with an environment of PATH, LANG and HOME (the working folder) only.

A program that the layers stop fails (exit status 1 with a PermissionError); it cannot pass.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

UNPRIVILEGED_USER = "nobody"
# an interpreter that `nobody` can run (a virtual environment under a private home may not be readable)
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16
    max_output: int = 64 * 1024  # bytes of stdout / stderr kept


@dataclass
class SandboxResult:
    status: str  # "passed" (exit 0) | "failed" | "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs first inside the child: trusted code that confines the rest of the process, then runs the program.
BOOTSTRAP = r'''
import os, resource, sys
cfg = dict(arg.split("=", 1) for arg in sys.argv[2:])
home = os.path.realpath(os.getcwd())
mb = 1 << 20
resource.setrlimit(resource.RLIMIT_CPU, (int(cfg["cpu"]), int(cfg["cpu"]) + 1))
resource.setrlimit(resource.RLIMIT_AS, (int(cfg["mem"]) * mb, int(cfg["mem"]) * mb))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(cfg["fsize"]) * mb, int(cfg["fsize"]) * mb))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
if os.geteuid() == 0:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        raise SystemExit("sandbox: cannot create a network namespace")
    uid, gid = int(cfg["uid"]), int(cfg["gid"])
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    del ctypes, libc
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.truncate", "shutil.rmtree", "os.chmod", "os.chown",
               "os.link", "os.symlink", "os.mkdir", "os.utime", "shutil.move", "shutil.copyfile"}
BLOCKED = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
           "socket.__new__", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
           "os.fork", "os.forkpty", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata"}

def inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except Exception:
        return False
    return p == home or p.startswith(home + os.sep)

def hook(event, args):
    if event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args and args[0] in ("ctypes", "_ctypes"):
        raise PermissionError("sandbox: ctypes is not allowed")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        writes = (mode is not None and any(c in str(mode) for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writes and not isinstance(path, int) and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} is not allowed")
    elif event in PATH_EVENTS:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                raise PermissionError(f"sandbox: {event} on {a!r} is not allowed")

program = open(sys.argv[1], encoding="utf-8").read()
code = compile(program, sys.argv[1], "exec")
sys.addaudithook(hook)
del hook
sys.argv = [sys.argv[1]]
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


def _interpreter() -> str:
    if os.geteuid() == 0 and os.access(SYSTEM_PYTHON, os.X_OK):
        return SYSTEM_PYTHON
    return sys.executable


def _ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(UNPRIVILEGED_USER)
    return pw.pw_uid, pw.pw_gid


def run_python(program: str, limits: Limits | None = None) -> SandboxResult:
    """Run `program` (Python source) in the sandbox; exit status 0 is a pass."""
    lim = limits or Limits()
    work = Path(tempfile.mkdtemp(prefix="tridlm-sandbox-"))
    t0 = time.perf_counter()
    try:
        uid, gid = _ids() if os.geteuid() == 0 else (os.getuid(), os.getgid())
        os.chmod(work, 0o700)
        if os.geteuid() == 0:
            os.chown(work, uid, gid)
        prog = work / "program.py"
        prog.write_text(program, encoding="utf-8")
        out_path, err_path = work / ".stdout", work / ".stderr"
        cmd = [_interpreter(), "-I", "-S", "-c", BOOTSTRAP, str(prog), f"cpu={int(lim.timeout_s) + 1}",
               f"mem={lim.memory_mb}", f"fsize={lim.file_mb}", f"uid={uid}", f"gid={gid}"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work)}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    close_fds=True, start_new_session=True)
            try:
                rc = proc.wait(timeout=lim.timeout_s)
                status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            finally:
                _kill_group(proc)
        return SandboxResult(status, rc, _head(out_path, lim.max_output), _head(err_path, lim.max_output),
                             time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _head(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(n).decode("utf-8", errors="replace")
    except OSError:
        return ""
