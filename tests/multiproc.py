"""Helpers of the multi-process tests: spawn gloo ranks on 127.0.0.1 with a hard timeout.

A hung collective must fail the test, never hang the suite: ``spawn`` kills every rank past its
timeout. Rank functions take ``(rank, world_size, port, *args)`` and call :func:`init_gloo` first.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float = 60.0) -> None:
    """One thread per rank (the machine has few cores) and a gloo group on 127.0.0.1."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def spawn(fn, world_size: int, *args, timeout: float) -> None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` spawned processes; kill them all and
    fail if they are not done within ``timeout`` seconds."""
    ctx = mp.start_processes(fn, args=(world_size, free_port(), *args), nprocs=world_size, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            pytest.fail(f"{world_size} ranks still running after {timeout} s: killed (hung collective?)")
