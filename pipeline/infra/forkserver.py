"""Warm stage processes: a fork server that has imported torch, diffusers and the metrics' libraries
once, and forks a child for each stage that asks, instead of each ``python -m stages.<name>`` paying for
those imports again (6-9 s a stage on a 2-core CPU, where a default stage's own work is often less).

``python cli.py run`` starts one (:func:`started`, which runs :func:`serve`) for the length of its
``dvc repro`` and names its socket in ``DMQ_FORKSERVER``. A stage process that finds the variable
(``stages/__init__.py`` calls :func:`hand_over_main_module` before anything else) hands the server its
module, arguments, working directory, environment and stdin / stdout / stderr, waits for the forked
child and exits with its status. The child imports the project's own modules afresh and runs the stage
as ``python -m`` would, so it computes what a cold process computes: only third-party libraries come
preloaded, and a request whose interpreter, module path or environment differs from the server's
(beyond the variables DVC and the shell set per stage) runs cold instead, as does every request when no
server answers. This module imports only the standard library until :func:`serve` preloads."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ADDRESS_VARIABLE = "DMQ_FORKSERVER"
# what the stages import from outside the standard library, slowest first (diffusers' model classes load
# on first attribute access, and pull in torch._dynamo and transformers)
PRELOAD = ("torch", "diffusers", "torch_fidelity", "zarr", "matplotlib.pyplot", "safetensors.torch", "pydantic")
PRELOAD_ATTRIBUTES = (("diffusers", "UNet2DModel"),)
# set per stage by DVC (DVC_ROOT, DVC_STAGE) and the shell it runs the command in, or by the launcher on
# every call (pyenv's shims set PYENV_* and prepend to PATH): the child runs with the requester's values,
# and the preloaded libraries read none of them as they load
VARIES_PER_STAGE = frozenset({"DVC_ROOT", "DVC_STAGE", "SHLVL", "_", "PWD", "OLDPWD", "PATH", ADDRESS_VARIABLE})
LAUNCHER_PREFIXES = ("PYENV_",)
STDIO = (0, 1, 2)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct("!I")
# seconds a connected requester has to send its request: one that sends nothing must not stall the others
REQUEST_TIMEOUT = 5.0


def _interpreter() -> dict:
    """What a request must share with the server to run warm: the same Python, module path and (but for
    the per-stage variables) environment, which libraries read as they load (threads, ISA, allocator).
    The server takes it before it preloads: importing torch sets a variable of its own."""
    return {
        "executable": sys.executable,
        "path": sys.path[1:],  # sys.path[0] is the working directory for `python -m`, checked as cwd
        "env": _compared(os.environ),
    }


def _compared(env) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in VARIES_PER_STAGE and not k.startswith(LAUNCHER_PREFIXES)}


def run_in_server(module: str, args: list[str]) -> int | None:
    """Run ``python -m module *args`` in a child of the server ``DMQ_FORKSERVER`` names and return its
    exit status; None when there is no server or it asks for a cold run (then run the module here)."""
    address = os.environ.get(ADDRESS_VARIABLE)
    if not address:
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(address)
    except OSError:  # not started yet, or gone: a cold run computes the same
        connection.close()
        return None
    with connection:
        request = {**_interpreter(), "module": module, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)}
        payload = json.dumps(request).encode()
        socket.send_fds(connection, [_HEADER.pack(len(payload))], list(STDIO))
        connection.sendall(payload)
        replies = connection.makefile("r")
        answer = replies.readline().split()
        if answer[:1] != ["run"]:
            return None
        child = int(answer[1])
        for signum in FORWARDED_SIGNALS:  # Ctrl-C and DVC's terminate reach the stage, as in a cold run
            signal.signal(signum, lambda signum, _frame: os.kill(child, signum))
        status = replies.readline()
    return int(status) if status else 1  # no status: the server died with the stage still running


def hand_over_main_module() -> None:
    """Call first thing in the ``__init__`` of a package whose modules run as ``python -m package.module``:
    when this process is such a run and a fork server answers, the module runs there and this process
    exits with its status; otherwise this returns and the module runs here."""
    argv = sys.orig_argv
    if sys.argv[:1] != ["-m"] or len(argv) < 3 or argv[1] != "-m":  # not `python -m` (a test, a child, flags)
        return
    status = run_in_server(argv[2], argv[3:])
    if status is not None:
        sys.exit(status)


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(connection, _HEADER.size, len(STDIO))
    (size,) = _HEADER.unpack(header)
    payload = b""
    while len(payload) < size:
        chunk = connection.recv(size - len(payload))
        if not chunk:
            raise ConnectionError("request cut short")
        payload += chunk
    return json.loads(payload), fds


def _mismatch(request: dict, ours: dict, cwd: str) -> str | None:
    """Why the request cannot run warm (a word, or the first environment variable that differs), or None."""
    if request["cwd"] != cwd:
        return "cwd"
    if different := next((key for key in ("executable", "path") if request[key] != ours[key]), None):
        return different
    theirs = _compared(request["env"])
    return next((k for k in sorted(theirs.keys() | ours["env"].keys()) if theirs.get(k) != ours["env"].get(k)), None)


def _become_stage(request: dict, fds: list[int], preloaded_env: dict[str, str]) -> int:
    """In the forked child: take the requester's stdio, directory and environment, run the module as
    ``python -m`` does and return its exit status (the interpreter then exits as a cold one would)."""
    import runpy
    import traceback

    for fd, theirs in zip(STDIO, fds):
        os.dup2(theirs, fd)
        os.close(theirs)
    sys.stdout = open(1, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors, closefd=False)  # noqa: SIM115
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    sys.stderr = open(2, "w", encoding=sys.stderr.encoding, errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr.reconfigure(line_buffering=True)
    sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**preloaded_env, **{k: v for k, v in request["env"].items() if k != ADDRESS_VARIABLE}})
    sys.argv = [request["module"], *request["args"]]
    for signum in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except BaseException as error:  # noqa: BLE001 -- reported as a cold interpreter reports it
        traceback.print_exc()
        return 128 + signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1
    return 0


def serve(address: str, idle_timeout: float = 3600.0) -> int:
    """Preload, listen on ``address`` (a Unix socket path) and fork a child per request until there has
    been no request for ``idle_timeout`` seconds or SIGTERM. Returns only in a forked child, with the
    stage's exit status; the server itself exits 0."""
    from pipeline.infra.allocator import keep_freed_memory

    keep_freed_memory()  # before torch allocates, as every stage process does
    ours, before = _interpreter(), dict(os.environ)
    for name in PRELOAD:
        __import__(name)
    for module, attribute in PRELOAD_ATTRIBUTES:
        getattr(sys.modules[module], attribute)
    preloaded_env = {k: v for k, v in os.environ.items() if before.get(k) != v}  # what the imports set
    cwd = os.getcwd()
    running: dict[int, socket.socket] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen()
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ)
    print(f"fork server ready on {address}", flush=True)
    last_request = time.monotonic()
    while running or time.monotonic() - last_request < idle_timeout:
        ready = events.select(timeout=0.05)
        for key, _ in ready:
            if key.fileobj is listener:
                connection, _ = listener.accept()
                last_request = time.monotonic()
                connection.settimeout(REQUEST_TIMEOUT)
                try:
                    request, fds = _receive(connection)
                except (OSError, ValueError):  # a requester gone or silent mid-request (socket.timeout is an OSError)
                    connection.close()
                    continue
                connection.settimeout(None)
                if reason := _mismatch(request, ours, cwd):
                    print(f"cold {request['module']} {' '.join(request['args'])}: {reason} differs", flush=True)
                    connection.sendall(f"cold {reason}\n".encode())
                    connection.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                child = os.fork()
                if child == 0:
                    events.close()
                    listener.close()
                    for other in running.values():
                        other.close()
                    connection.close()
                    return _become_stage(request, fds, preloaded_env)
                for fd in fds:
                    os.close(fd)
                print(f"forked {request['module']} {' '.join(request['args'])}", flush=True)
                connection.sendall(f"run {child}\n".encode())
                running[child] = connection
                events.register(connection, selectors.EVENT_READ, child)
            else:  # the requester hung up (killed): its stage goes with it
                os.kill(key.data, signal.SIGKILL)
        while running and (finished := os.waitpid(-1, os.WNOHANG))[0]:
            child, status = finished
            connection = running.pop(child)
            events.unregister(connection)
            try:
                code = os.waitstatus_to_exitcode(status)  # -N: killed by signal N, which a shell reports as 128 + N
                connection.sendall(f"{code if code >= 0 else 128 - code}\n".encode())
            except OSError:
                pass
            connection.close()
    return 0


@dataclass(frozen=True)
class Server:
    env: dict[str, str]  # this process's environment naming the server: the one to run `dvc repro` in
    log: Path  # a line per request: "forked <module> <args>", or "cold <module> <args>: <what> differs"

    def requests(self) -> list[str]:
        """The requests so far; read them inside the block (the log goes with the server)."""
        return self.log.read_text().splitlines()[1:] if self.log.exists() else []


@contextmanager
def started(cwd: Path | str = ".", wait: bool = False) -> Iterator[Server]:
    """A fork server for the stages that run in ``cwd`` (DVC runs them in the repository's root) while
    the block runs. It preloads for seconds: ``wait`` for it, or the stages that start meanwhile run cold."""
    folder = Path(tempfile.mkdtemp(prefix="dmq-stages-"))
    address, log = folder / "server.sock", folder / "server.log"
    env = dict(os.environ)  # given, not inherited: a C library's setenv reaches the process environment alone
    with log.open("w") as output:  # a session of its own: Ctrl-C reaches a stage once, through DVC's process
        server = subprocess.Popen(
            [sys.executable, "-m", __spec__.name, str(address)], cwd=cwd, env=env, stdout=output, start_new_session=True
        )
    try:
        while wait and not log.read_text() and server.poll() is None:
            time.sleep(0.1)
        if wait and server.poll() is not None:
            raise RuntimeError(f"the fork server exited with status {server.returncode} before it was ready")
        yield Server({**env, ADDRESS_VARIABLE: str(address)}, log)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
