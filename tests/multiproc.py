"""Helpers of the multi-process tests: gloo ranks on 127.0.0.1, spawned with a hard timeout.

A hung collective must fail the test, never hang the suite: ``spawn`` kills every rank past its
timeout. A rank function decorated with :func:`gloo_rank` runs as ``fn(rank, world_size, out_dir)``
inside a gloo group (``out_dir``: a directory all ranks share); what it returns is saved, and
:func:`run` hands the parent every rank's result.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_rank(fn):
    """``fn(rank, world_size, out_dir)`` as a spawnable rank: one thread (the machine has few cores), a gloo
    group whose collectives time out after ``group_timeout`` seconds, the result saved for :func:`run`."""
    @functools.wraps(fn)
    def rank_main(rank: int, world_size: int, port: int, out_dir: str, group_timeout: float) -> None:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=group_timeout))
        try:
            torch.save(fn(rank, world_size, Path(out_dir)), Path(out_dir) / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()
        # The rank's result is saved: leave without the interpreter's shutdown, which now and then
        # aborted a rank here after a correct run ("terminate called without an active exception",
        # SIGABRT; docs/operations.md step 6), failing the test for nothing the test is about. An error
        # above still reaches spawn, which reports it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return rank_main


def spawn(fn, world_size: int, *args, timeout: float = 240.0) -> None:
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


def run(rank_main, world_size: int, out_dir: Path, *, timeout: float, group_timeout: float = 60.0) -> list[Any]:
    """Spawn a :func:`gloo_rank` function on ``world_size`` ranks; every rank's result, in rank order."""
    spawn(rank_main, world_size, str(out_dir), group_timeout, timeout=timeout)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
