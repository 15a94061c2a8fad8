"""Stages forked from one warm interpreter: the libraries are imported once per `lowbit run`, not once per stage.

Every dvc.yaml stage is `python -m tasks.<stage>`. Run as a fresh process, each stage spent about
5.5 s importing torch, transformers, peft and bitsandbytes and 1.5 s tearing them down at exit
(bench/overhead.py measures both): about a minute of a default run, for nothing the stage needs.
The host is that command's interpreter started once, in the project folder, with every stage
module imported. For each stage it forks a child that does what `python -m tasks.<stage>` does
(`stage_main` of the module, the same code and params), with the caller's environment, working
folder, stdout and stderr, and reports the child's exit status. Outputs, dvc.lock and the DVC
cache are therefore the same as after `dvc repro`, which still runs the commands as written.

    with stage_host(root) as address:
        execute_stage(root, "baseline", host=address)   # flows/dvc_stages.py

Only a command that is exactly `python -m tasks.<stage>` is forked; an edited command runs as
written, in a subprocess, and so does every stage when the host cannot be reached (it failed to
start: the subprocess then shows the same import error as the stage's own). Dask workers, other
processes possibly on other machines, run their stages as subprocesses.

Memory figures stay those of a fresh process: a forked child holds the host's library code pages
only once touched, so, as lowbit.isolation does for evaluated variants, the child touches the
pages that were resident after the imports and resets its peak RSS before the stage begins.

Protocol, one connection per stage on a Unix socket: the caller sends one byte carrying its
stdout and stderr descriptors (SCM_RIGHTS), then the request as JSON and a half-close; the host
answers with the child's exit status (as subprocess reports it: -N for signal N) and closes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Iterator

from tasks import STAGES

# The command each forkable stage has in dvc.yaml (tests check every stage has it).
FORKABLE = {stage: f"python -m tasks.{stage}" for stage in STAGES}
# How often the host looks for finished children: the most an exit status waits to be reported.
REAP_INTERVAL_S = 0.1
# A host stops within one reap interval of being told, or once its imports end (about 9 s here).
STOP_WAIT_S = 60


def stage_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a stage command runs in: this one, this interpreter's folder first on PATH."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(extra_env or {}))


@contextlib.contextmanager
def stage_host(root: Path, env: dict[str, str]) -> Iterator[str]:
    """Start a host in `root` with `env` (what the stage commands would get); yield its address.

    The socket is bound here, before the host starts, so a stage sent at once waits in the
    listen queue while the host imports; this process keeps no copy of it, so a host that died
    refuses connections (and stages fall back to subprocesses) instead of leaving callers waiting."""
    folder = tempfile.mkdtemp(prefix="lowbit-host-")  # short: a socket path is limited to ~100 bytes
    address = os.path.join(folder, "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
        listener.listen(16)
        host = subprocess.Popen([sys.executable, "-m", "flows.stage_host", str(listener.fileno())], cwd=root, env=env,
                                stdin=subprocess.PIPE, pass_fds=[listener.fileno()])
    finally:
        listener.close()
    try:
        yield address
    finally:
        host.stdin.close()  # the host's signal to stop; children still running finish on their own
        try:
            host.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:  # stuck in an import or a library call: nothing of it is needed
            host.kill()
            host.wait()
        shutil.rmtree(folder, ignore_errors=True)


def run_in_host(address: str, stage: str, cwd: Path, env: dict[str, str], stderr_line) -> int | None:
    """Run `stage` in a child of the host at `address`; each stderr line goes to `stderr_line`.

    Returns the exit status, or None when no host answers at `address` (the caller runs the
    stage as a subprocess instead)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    read_end, write_end = os.pipe()
    with sock, open(read_end, errors="replace") as stderr:
        sys.stdout.flush()
        try:  # descriptor 1, not sys.stdout: what a subprocess inherits, whatever sys.stdout was replaced by
            socket.send_fds(sock, [b"F"], [1, write_end])
        finally:
            os.close(write_end)  # from here the child holds the only write end: EOF when it exits
        sock.sendall(json.dumps({"stage": stage, "cwd": str(cwd), "env": env}).encode())
        sock.shutdown(socket.SHUT_WR)
        for line in stderr:
            stderr_line(line)
        status = b"".join(iter(lambda: sock.recv(64), b""))
    if not status:
        raise ConnectionError(f"the stage host at {address} ended before reporting how stage {stage} ended")
    return int(status)


def serve(listener: socket.socket) -> None:
    """Fork a child per request until stdin closes; report each child's exit status on its connection."""
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection its status goes to
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ)
    events.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in events.select(timeout=REAP_INTERVAL_S):
            if key.fileobj is sys.stdin:
                if not sys.stdin.buffer.read1(1):  # the flow is done (or gone)
                    return
            else:
                connection = listener.accept()[0]
                try:
                    waiting[fork_stage(connection, listener)] = connection
                except (OSError, ValueError):  # a caller that failed mid-request: it is told nothing, the host goes on
                    connection.close()
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            with waiting.pop(pid) as connection:
                with contextlib.suppress(OSError):  # a caller that went away has nobody to tell
                    connection.sendall(str(os.waitstatus_to_exitcode(status)).encode())


def fork_stage(connection: socket.socket, listener: socket.socket) -> int:
    _, (stdout, stderr), _, _ = socket.recv_fds(connection, 1, 2)
    request = json.loads(b"".join(iter(lambda: connection.recv(65536), b"")))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            listener.close()
            connection.close()
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            code = run_stage_here(request)
        finally:
            os._exit(code)  # no interpreter teardown: the stage has flushed and closed what it wrote
    os.close(stdout)
    os.close(stderr)
    return pid


def run_stage_here(request: dict) -> int:
    """In the child: what `python -m tasks.<stage>` does, in the caller's folder and environment."""
    from lowbit.isolation import as_if_fresh_process
    from tasks.plumbing import stage_main

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops a stage, as it would a subprocess
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    stage = request["stage"]
    as_if_fresh_process()
    try:
        stage_main(stage, importlib.import_module(f"tasks.{stage}").run)
        return 0
    except SystemExit as end:
        return end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main() -> None:
    listener = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the flow and the running stage; the flow stops the host
    for stage in STAGES:
        importlib.import_module(f"tasks.{stage}")
    importlib.import_module("lowbit.isolation").remember_resident_pages()  # after every import: what a child touches
    serve(listener)


if __name__ == "__main__":
    main()
