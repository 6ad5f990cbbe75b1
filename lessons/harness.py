"""A problem, its shards, and the per-rank worker that runs any stage on them.

The tests, the notebooks and the tour all ask the same question: "run stage X on P ranks, forward and
backward, and give me every rank's rows". The worker lives here, in an importable module, because
the ranks import it by name, and a function defined in a notebook cannot be imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import ring_attention

# stage name -> module exposing ring_dilated_attention(q, k, v, segment_lengths, dilation_rates, ...)
DISTRIBUTED_STAGES = {
    "stage 2: true ring": "lessons.stage2_true_ring",
    "stage 3: collective": "lessons.stage3_collective",
    "stage 4: flash": "lessons.stage4_flash",
    "stage 5: production, ring": "lessons.harness:production_ring",
    "stage 5: production, allgather": "lessons.harness:production_allgather",
    "stage 6: balanced, ring": "lessons.harness:balanced_ring",
    "stage 6: balanced, allgather": "lessons.harness:balanced_allgather",
}
# stage 7 needs heads (and kv heads) that the all-to-all's sub-group size divides
ALL_TO_ALL_STAGES = {
    "stage 7: hybrid (U=2), ring": "lessons.harness:hybrid_ring",
    "stage 7: all-to-all (U=P)": "lessons.harness:all_to_all",
}


@dataclass(frozen=True)
class Problem:
    """Full-sequence inputs, made the same way on every rank from ``seed``."""

    seq_len: int = 256
    segment_lengths: tuple[int, ...] = (32, 64, 128, 256)
    dilation_rates: tuple[int, ...] = (1, 2, 4, 8)
    batch: int = 2
    heads: int = 5
    head_dim: int = 8
    causal: bool = False
    head_mode: str = "all"
    dtype: torch.dtype = torch.float64
    seed: int = 0
    kv_heads: int | None = None  # grouped-query attention when fewer than heads (production stages only)
    cu_seqlens: tuple[int, ...] | None = None  # packed documents (production stages only)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q``, ``k``, ``v`` and the output gradient ``grad_out``, ``[B, N, H, D]`` (``k``, ``v``: ``kv_heads``)."""
        gen = torch.Generator().manual_seed(self.seed)
        kv_heads = self.kv_heads or self.heads
        shapes = [(self.batch, self.seq_len, h, self.head_dim) for h in (self.heads, kv_heads, kv_heads, self.heads)]
        return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(self.dtype) for shape in shapes)

    def options(self) -> dict:
        documents = {} if self.cu_seqlens is None else dict(cu_seqlens=list(self.cu_seqlens))
        return dict(causal=self.causal, head_mode=self.head_mode, **documents)


def production(q, k, v, segment_lengths, dilation_rates, *, comm: str, load_balance: bool, **options) -> torch.Tensor:
    """The production core with the sequence split over the whole world (the lessons' setting)."""
    return ring_attention.ring_dilated_attention(
        q, k, v, segment_lengths, dilation_rates, group=dist.group.WORLD, comm=comm, load_balance=load_balance,
        **options,
    )


production_ring = functools.partial(production, comm="ring", load_balance=False)
production_allgather = functools.partial(production, comm="allgather", load_balance=False)
balanced_ring = functools.partial(production, comm="ring", load_balance=True)
balanced_allgather = functools.partial(production, comm="allgather", load_balance=True)
hybrid_ring = functools.partial(production, comm="ring", load_balance=True, ulysses_size=2)


def all_to_all(q, k, v, segment_lengths, dilation_rates, **options) -> torch.Tensor:
    """The production core with all-to-all over heads across the whole world (``ulysses_size`` = world size)."""
    return production(q, k, v, segment_lengths, dilation_rates, comm="ring", load_balance=True,
                      ulysses_size=dist.get_world_size(), **options)


def shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of the sequence dimension (dim 1)."""
    return x.chunk(world_size, dim=1)[rank]


def reset_peak_memory() -> int:
    """Reset this process's peak resident memory (Linux ``VmHWM``); return its resident bytes now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory() -> int:
    """This process's peak resident bytes since the last `reset_peak_memory`."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


@contextlib.contextmanager
def counting_received_bytes():
    """Count the bytes this rank receives from other ranks while the block runs: ``with ... as counter``,
    then ``counter["bytes"]``. Wraps the ``torch.distributed`` calls every stage makes: batches of point-to-point
    messages (the ring, the re-layout of load balance, the all-to-all), all-gathers and reduce-scatters."""
    counter = {"bytes": 0}
    original = {name: getattr(dist, name) for name in ("batch_isend_irecv", "all_gather", "reduce_scatter")}
    receive = dist.irecv

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def batch_isend_irecv(ops):
        counter["bytes"] += sum(nbytes(op.tensor) for op in ops if op.op is receive)
        return original["batch_isend_irecv"](ops)

    def all_gather(tensors, tensor, group=None, **kwargs):
        counter["bytes"] += (len(tensors) - 1) * nbytes(tensor)  # everyone's block but this rank's own
        return original["all_gather"](tensors, tensor, group=group, **kwargs)

    def reduce_scatter(output, inputs, group=None, **kwargs):
        counter["bytes"] += (len(inputs) - 1) * nbytes(output)  # the other ranks' partial sums of my block
        return original["reduce_scatter"](output, inputs, group=group, **kwargs)

    for name, wrapper in (("batch_isend_irecv", batch_isend_irecv), ("all_gather", all_gather),
                          ("reduce_scatter", reduce_scatter)):
        setattr(dist, name, wrapper)
    try:
        yield counter
    finally:
        for name, fn in original.items():
            setattr(dist, name, fn)


def run_stage(
    rank: int, world_size: int, target: str, problem: Problem, options: dict | None = None, warmup: bool = False
) -> dict:
    """Run ``target`` on this rank's shard, forward and backward.

    ``target`` is a module exposing ``ring_dilated_attention`` or ``"module:function"`` for a function
    with the same leading arguments (the reference, stage 1); ``options`` are extra keyword arguments.
    With ``warmup`` the call is made once before the measured one (first calls set up connections).
    Returns this rank's ``out``, ``dq``, ``dk``, ``dv``, the wall time of forward+backward in seconds,
    ``received_bytes`` (what it received from other ranks, `counting_received_bytes`), and ``peak_bytes``:
    how far the process's peak resident memory rose, during the measured call, above its resident memory just
    before it (the peak, Linux ``VmHWM``, is reset before the call; a whole-process measure, allocator slack
    and communication buffers included).
    """
    module, _, name = target.partition(":")
    attention = getattr(importlib.import_module(module), name or "ring_dilated_attention")
    q, k, v, grad_out = (shard(t, rank, world_size) for t in problem.inputs())
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    pairs = list(problem.segment_lengths), list(problem.dilation_rates)
    kwargs = {**problem.options(), **(options or {})}
    for measured in ([False, True] if warmup else [True]):
        before = reset_peak_memory()
        with counting_received_bytes() as received:
            start = time.perf_counter()
            out = attention(q, k, v, *pairs, **kwargs)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
            seconds = time.perf_counter() - start
        if not measured:
            del out, dq, dk, dv
    peak = peak_memory() - before
    return dict(out=out.detach(), dq=dq, dk=dk, dv=dv, seconds=seconds, peak_bytes=max(peak, 0),
                received_bytes=received["bytes"])


def saved_for_backward(rank: int, world_size: int, target: str, problem: Problem) -> dict[str, int]:
    """Bytes autograd keeps for the backward after one forward of ``target`` on this rank's shard, by kind.

    Counted on the storages the saved tensors live in (each once): the gathered keys and values of stage 3's
    ``AllGather``, score-sized tensors (4-D blocks whose last dimension is a key length, not the head dim:
    scores and probabilities), and the rest (shards, outputs, log-sum-exps, rows).
    """
    import lessons.stage3_collective as stage3

    module, _, name = target.partition(":")
    attention = getattr(importlib.import_module(module), name or "ring_dilated_attention")
    gathered: set[int] = set()
    all_gather = stage3.AllGather.forward

    def recording_all_gather(ctx, x, group):
        out = all_gather(ctx, x, group)
        gathered.add(out.untyped_storage().data_ptr())
        return out

    storages: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() in gathered:
            kind = "gathered keys and values"
        elif t.dim() == 4 and t.shape[-1] != problem.head_dim:
            kind = "scores and probabilities"
        else:
            kind = "shards, outputs and the rest"
        storages.setdefault(storage.data_ptr(), (kind, storage.nbytes()))
        return t

    q, k, v, _ = (shard(t, rank, world_size).clone() for t in problem.inputs())
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    stage3.AllGather.forward = staticmethod(recording_all_gather)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attention(q, k, v, list(problem.segment_lengths), list(problem.dilation_rates), **problem.options())
    finally:
        stage3.AllGather.forward = staticmethod(all_gather)
    totals = dict.fromkeys(("scores and probabilities", "gathered keys and values", "shards, outputs and the rest"), 0)
    for kind, nbytes in storages.values():
        totals[kind] += nbytes
    return totals


def run_battery(rank: int, world_size: int, problems: list[Problem], modules: list[str]) -> list[list[dict]]:
    """``run_stage`` for every problem and module, in one process start: ``result[problem][module]``."""
    return [[run_stage(rank, world_size, m, p) for m in modules] for p in problems]


def gather_ranks(results: list[dict], key: str) -> torch.Tensor:
    """Concatenate every rank's ``key`` tensor along the sequence: the full ``[B, N, H, D]`` result."""
    return torch.cat([r[key] for r in results], dim=1)


def run_with_timeline(rank: int, world_size: int, problem: Problem, overlap: bool) -> list[dict]:
    """Stage 4 forward and backward with its per-step ``timeline``, times relative to the call's start.

    A first, unrecorded call sets up the connections, so that the timeline shows the steady state.
    """
    run_stage(rank, world_size, "lessons.stage4_flash", problem, {"overlap": overlap})
    timeline: list[dict] = []
    start = time.perf_counter()
    run_stage(rank, world_size, "lessons.stage4_flash", problem, {"overlap": overlap, "timeline": timeline})
    return [dict(entry, start=entry["start"] - start, end=entry["end"] - start) for entry in timeline]
