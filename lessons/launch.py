"""Run a function on ``world_size`` processes of this machine and collect what each returns.

Used by the tests, the notebooks and the tour. ``fn`` must be importable (defined in a module, not in a
notebook cell: the ranks import it by name). The ranks are forked from a server process that imported torch
once (multiprocessing's ``forkserver``), so starting 8 ranks takes a fraction of a second instead of 8
imports of torch; they see the caller's environment as it is at the launch (when it changed since the
server started, the ranks are spawned afresh instead: slower, but they read the new environment).

Every rank's return value (tensors included) comes back to the caller; a rank that raises makes
`run_on_ranks` terminate every rank and raise with that rank's traceback, and a group that does not finish
within ``timeout`` seconds is terminated too, so nothing hangs. Children print nothing: their output would
interleave unpredictably in a notebook, so results travel back through a queue and the caller prints them.

Under ``torchrun`` (the ``RANK``/``WORLD_SIZE`` variables are set) nothing is spawned: this process
joins the group through ``env://`` (pick ``backend="nccl"`` on GPUs), runs ``fn`` once, and every rank
receives the list of all ranks' results.
"""

from __future__ import annotations

import io
import multiprocessing.forkserver
import os
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what the fork server imports once for every rank (transformers too when the caller has imported it); not
# ring_attention: a rank may import another copy of it (benchmarks/overhead.py measures an earlier one)
_PRELOAD = ("torch", "torch.distributed")
_server_environment: dict[str, str] | None = None


def _environment() -> dict[str, str]:
    """This process's environment, less what pytest rewrites for every test (no rank reads it)."""
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


def _start_context():
    """The fork server's context, or spawn's where the server cannot serve this launch (see the module docstring)."""
    global _server_environment
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    if _server_environment is None:
        context = mp.get_context("forkserver")
        context.set_forkserver_preload([*_PRELOAD, *(m for m in ("transformers",) if m in sys.modules)])
        multiprocessing.forkserver.ensure_running()
        _server_environment = _environment()
    return mp.get_context("forkserver" if _environment() == _server_environment else "spawn")


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(fn, rank, world_size, args, backend, port, timeout, results) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    # share the cores instead of every rank starting one thread per core
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        results.put((rank, "ok", _to_bytes(fn(rank, world_size, *args))))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_under_torchrun(fn: Callable, args: tuple, backend: str) -> list:
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    result = fn(rank, world_size, *args)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, _to_bytes(result))
    return [torch.load(io.BytesIO(b), weights_only=False) for b in gathered]


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout: float = 300.0
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return the list of their results.

    Raises ``RuntimeError`` with the failing rank's traceback if any rank raises, and ``TimeoutError`` if
    the ranks have not all finished after ``timeout`` seconds; in both cases every rank is terminated.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _run_under_torchrun(fn, args, backend)
    ctx = _start_context()
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, args, backend, port, timeout, results))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(collected))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s; all ranks were stopped")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in collected]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            if p.is_alive() and len(collected) < world_size:
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [collected[rank] for rank in range(world_size)]
