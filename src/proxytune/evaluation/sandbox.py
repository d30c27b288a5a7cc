"""Run untrusted (generated) Python in a separate, limited process; never in this one.

Each program runs in a fresh interpreter (``python -I``: no user site, no ``PYTHON*``
variables) in an empty temporary directory, with:

- a wall-clock time limit, after which its whole process group is killed;
- no network: a new network namespace (``unshare -n``, or ``unshare -rn`` without root) where
  the system allows it, and in every case a guard that makes ``socket`` refuse to connect;
- resource limits: address space, CPU seconds, written file size, core dumps off;
- a guard that disables the obvious ways to touch the machine (``os.system``, ``subprocess``,
  ``os.fork``, ``shutil.rmtree``, ...) before the program starts;
- stdout/stderr written to capped files, never piped into this process's memory.

A program that hangs, crashes the interpreter (segfault), exhausts memory or floods its
output ends as ``timeout`` or ``crashed``; the evaluating process only reads its status.
This is a guard against accidents, not a security boundary against a determined attacker:
run evaluations of untrusted models in a container.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

OUTPUT_LIMIT = 1 << 20
"""Bytes a program may write (to any file, stdout and stderr included) before it is killed."""

_GUARD = textwrap.dedent(
    """
    import builtins, os, resource, shutil, socket, subprocess, sys

    def _limit(kind, value):
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass

    _limit(resource.RLIMIT_AS, {memory})
    _limit(resource.RLIMIT_CPU, {cpu})
    _limit(resource.RLIMIT_FSIZE, {fsize})
    _limit(resource.RLIMIT_CORE, 0)

    def _refuse(*args, **kwargs):
        raise PermissionError("disabled in the proxytune sandbox")

    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the proxytune sandbox")

    socket.socket = _NoSocket
    socket.create_connection = _refuse
    socket.socketpair = _refuse
    socket.getaddrinfo = _refuse
    for _name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execvp", "execvpe",
                  "spawnv", "spawnve", "kill", "killpg", "putenv", "removedirs", "rmdir",
                  "setuid", "chroot", "fchdir", "truncate", "ftruncate"):
        if hasattr(os, _name):
            setattr(os, _name, _refuse)
    subprocess.Popen = _refuse
    subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = _refuse
    shutil.rmtree = shutil.move = shutil.chown = _refuse
    builtins.exit = builtins.quit = sys.exit
    del _limit, _refuse, _NoSocket, _name

    _path = sys.argv[1]
    with open(_path, encoding="utf-8") as _f:
        _source = _f.read()
    sys.argv = [_path]
    exec(compile(_source, "program.py", "exec"), {{"__name__": "__main__"}})
    """
)


@dataclass(frozen=True)
class ExecResult:
    """How a program ended."""

    status: str
    """``passed`` (exit 0), ``failed`` (non-zero exit: an exception, a failed assertion),
    ``timeout`` (killed at the time limit) or ``crashed`` (killed by a signal)."""
    returncode: int | None
    detail: str = ""
    """The last line of stderr (the exception), or what ended the program."""
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that runs a program in a new network namespace here, or ``()``."""
    for prefix in (("unshare", "-n"), ("unshare", "-rn")):
        try:
            done = subprocess.run(
                [*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def run_program(
    source: str,
    timeout: float = 10.0,
    memory_mb: int = 2048,
    python: str | None = None,
    marker: str | None = None,
) -> ExecResult:
    """Run ``source`` as ``__main__`` in a sandboxed child process and report how it ended.

    ``marker``: a string the program must print to pass (put it at the very end of the
    program, so that a program that exits 0 early, e.g. through ``os._exit(0)``, fails).
    """
    with tempfile.TemporaryDirectory(prefix="proxytune-sandbox-") as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(source, encoding="utf-8")
        guard = _GUARD.format(
            memory=memory_mb << 20, cpu=max(1, int(timeout) + 1), fsize=OUTPUT_LIMIT
        )
        (work / "guard.py").write_text(guard, encoding="utf-8")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        cmd = [*network_isolation(), python or sys.executable, "-I", "guard.py", "program.py"]
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: killed as a whole
            )
            try:
                code: int | None = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                code = None
            finally:
                _kill_group(proc)
        stdout = _tail(work / "stdout")
        stderr = _tail(work / "stderr")
    if timed_out:
        return ExecResult("timeout", None, f"timed out after {timeout:g} s", stdout, stderr)
    assert code is not None
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if code == 0:
        if marker is not None and marker not in stdout:
            return ExecResult("failed", 0, "exited before the end of the tests", stdout, stderr)
        return ExecResult("passed", 0, "", stdout, stderr)
    if code < 0:
        name = _signal_name(-code)
        return ExecResult("crashed", code, f"killed by {name}", stdout, stderr)
    return ExecResult("failed", code, last or f"exit code {code}", stdout, stderr)


def run_programs(
    sources: Sequence[str],
    timeout: float = 10.0,
    workers: int = 2,
    memory_mb: int = 2048,
    marker: str | None = None,
) -> list[ExecResult]:
    """:func:`run_program` on each source, ``workers`` at a time, results in order."""
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, timeout, memory_mb, marker=marker), sources))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, limit: int = 4000) -> str:
    data = path.read_bytes()
    return data[-limit:].decode("utf-8", errors="replace")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
