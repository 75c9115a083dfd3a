"""Start N local processes the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT), gloo on 127.0.0.1,
one thread each, with a hard deadline: a hung collective kills every child and fails the test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nprocs: int, timeout: float, kill_rank: int | None = None,
           kill_when: Path | None = None, kill_signal: int = signal.SIGKILL) -> list[tuple[int, str]]:
    """Run `python <args>` as ranks 0..nprocs-1; returns (returncode, output) per rank. With `kill_rank`,
    that rank gets `kill_signal` as soon as the path `kill_when` exists: SIGKILL for a crashed machine,
    SIGSTOP for a hung one (its return code is then reported as None, and it is killed once the others
    are done). Raises TimeoutError, after killing every child, when they are not all done within
    `timeout` seconds."""
    port = free_port()
    procs, logs = [], []
    for rank in range(nprocs):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
               "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "NANOSEEK_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
        log = tempfile.TemporaryFile("w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    try:
        signalled = False
        while any(p.poll() is None for rank, p in enumerate(procs) if not (signalled and rank == kill_rank)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} processes still running after {timeout:.0f}s (hung collective?)")
            if kill_rank is not None and not signalled and kill_when.exists():
                procs[kill_rank].send_signal(kill_signal)
                signalled = True
            time.sleep(0.05)
        outputs = []
        for p, log in zip(procs, logs):
            log.seek(0)
            outputs.append((p.poll(), log.read()))
        return outputs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def torchrun(args: list[str], nprocs: int, timeout: float = 120) -> str:
    """`python -m torch.distributed.run --nproc-per-node nprocs <args>` (the real launcher) on 127.0.0.1;
    returns its output after asserting it succeeded. A launch still running after `timeout` seconds is
    killed with its whole process group and fails the test."""
    import pytest

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOSEEK_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout:.0f} s")
    assert proc.returncode == 0, log[-3000:]
    return log
