"""Start N local processes the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT), gloo on 127.0.0.1,
one thread each, with a hard deadline: a hung collective kills every child and fails the test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nprocs: int, timeout: float, env: dict | None = None) -> list[tuple[int, str]]:
    """Run `python <args>` as ranks 0..nprocs-1; returns (returncode, stdout+stderr) per rank. Raises
    TimeoutError (after killing them all) when they are not done within `timeout` seconds."""
    port = free_port()
    procs = []
    for rank in range(nprocs):
        child_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                     "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                     "OMP_NUM_THREADS": "1", "NANOSEEK_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT),
                     **(env or {})}
        procs.append(subprocess.Popen([sys.executable, *args], env=child_env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    try:
        outputs = []
        for p in procs:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            outputs.append((p.returncode, out))
        return outputs
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{nprocs} processes still running after {timeout:.0f}s (hung collective?)") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
