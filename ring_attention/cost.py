"""What a call costs each rank: the work its kernels do and the bytes it receives (lessons 6 and 7, benchmarks).

Both are counted from the same plan and schedules the core runs, not estimated, so that a test can compare them
with what the code really does (the bytes a rank receives are counted on real processes by
``lessons.harness.counting_received_bytes``).

**Bytes**, for a sequence of ``N`` tokens on ``P`` ranks (``L = N / P``), ``H`` query heads and ``H_kv`` kv heads of
``D``, inputs of ``e`` bytes per element and accumulators of ``a`` bytes (float32 for fp32/bf16/fp16 inputs,
float64 for float64). Per pair whose segment spans a segment group of ``G`` ranks, with ``n = L / r`` kept rows
per head on each rank, and one block ``b = n H_kv D`` (the keys, or the values, of one rank):

- **ring**: forward ``2 (G - 1) b e`` (keys and values, ``G - 1`` steps); backward the keys and values again,
  ``2 (G - 1) b e``, plus the dK, dV accumulators, which travel with them and take one last hop home:
  ``2 G b a`` — ``G`` hops, because after the ``G - 1`` rotations they sit one rank before their owner;
- **all-gather**: forward ``2 (G - 1) b e``; backward gathered again, ``2 (G - 1) b e``, and the other ranks'
  partial dK, dV of this rank's block, reduce-scattered to it: ``2 (G - 1) b a``;
- **all-to-all** over ``U`` ranks: each of q, k, v, the output, its gradient and dq, dk, dv crosses once, a fraction
  ``(U - 1) / U`` of it reaching a rank from the others: ``(U - 1) / U  L D e (4 H + 4 H_kv)`` (q, out, dout, dq:
  ``4 H``; k, v, dk, dv: ``4 H_kv``);
- **hybrid**: the all-to-all over ``U`` ranks, then the ring or all-gather over ``P / U`` ranks on blocks of
  ``U L`` tokens with ``H / U`` and ``H_kv / U`` heads;
- **causal load balance** (`ring_attention.balance`) adds, per balanced pair, the halves of re-laid rows that change
  rank (`halves_received`): forward, q (and k, v for the ring) into the zigzag order and the output and its LSE
  (accumulator dtype) back; backward, dO and the row's *global* output (input dtype) and LSE into the zigzag order,
  and dq (and dk, dv for the ring) back, in the accumulator dtype. The forward's re-laid q, k, v are kept for the
  backward; its output and LSE cannot be: the backward needs each row's output merged over every pair;
- every call checks that the ranks agree on their shards and documents: 11 integers of 8 bytes from each other rank.

**Work**: `score_pairs` counts the (query, key) scores each rank's kernels compute in the forward, from the
schedules of `ring_attention.balance`: a causal diagonal block of ``n`` rows counts ``n (n + 1) / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ring_attention.balance import Block, balanced, gathered_blocks, relayout_moves, ring_blocks
from ring_attention.documents import plan_documents
from ring_attention.kernels import lse_dtype
from ring_attention.pattern import plan_pairs
from ring_attention.streams import StreamPlan
from ring_attention.validation import check_cu_seqlens, tiles_shards

__all__ = ["agreement_check_bytes", "document_bytes", "halves_received", "received_bytes", "score_pairs"]


def agreement_check_bytes(world_size: int) -> int:
    """What one call's agreement check brings a rank: 11 integers of 8 bytes from each other rank."""
    return 11 * 8 * (world_size - 1)


def halves_received(me: int, size: int, to_zigzag: bool) -> int:
    """How many halves of a row block rank ``me`` of a segment group of ``size`` receives from another rank in one
    re-layout (`ring_attention.balance.relayout`): 0, 1 or 2."""
    return sum(src != me for src, _ in relayout_moves(me, size, to_zigzag)[0])


def received_bytes(
    family: str,
    world_size: int,
    seq_len: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    batch: int = 1,
    ulysses_size: int = 1,
    causal: bool = False,
    load_balance: bool = True,
    head_mode: str = "all",
    backward: bool = True,
    cu_seqlens=None,
) -> list[int]:
    """Bytes each rank receives from the others in one call, forward (+ backward): one number per rank.

    ``family`` is ``"ring"`` or ``"allgather"`` (the pairs that span ranks), after an all-to-all over
    ``ulysses_size`` ranks (1: none); ``dtype`` is the inputs' dtype, ``batch`` their batch size. With documents
    (``cu_seqlens``), or a length the segments do not tile, the bytes are read off the plan the core runs
    (`document_bytes`).
    """
    u, e = ulysses_size, torch.empty((), dtype=dtype).element_size()
    a = torch.empty((), dtype=lse_dtype(dtype)).element_size()
    shard = seq_len // world_size
    all_to_all = batch * (u - 1) * shard * head_dim * e * (2 * num_heads + 2 * num_kv_heads) // u
    rows = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, seq_len, batch)
    if not ((rows is None or all(b == (0, seq_len) for b in rows))
            and tiles_shards(seq_len, world_size // u, segment_lengths, dilation_rates)):
        plans = [plan_documents(rows or ((0, seq_len),), seq_len, world_size // u, rank // u, segment_lengths,
                                dilation_rates, num_heads=num_heads, num_kv_heads=num_kv_heads, head_mode=head_mode,
                                batch=batch, causal=causal, device=torch.device("cpu"), comm_mode=family,
                                load_balance=load_balance, local_heads=range(rank % u * num_heads // u,
                                                                             (rank % u + 1) * num_heads // u))
                 for rank in range(world_size)]
        return [agreement_check_bytes(world_size) + all_to_all * (2 if backward else 1) + sum(
            document_bytes(plan, head_dim, e, a, backward) for plan in rank_plans if isinstance(plan, StreamPlan))
            for rank_plans in plans]
    per_part = [plan_pairs(seq_len, world_size // u, segment_lengths, dilation_rates, num_heads, head_mode,
                           num_kv_heads, local_heads=range(part * num_heads // u, (part + 1) * num_heads // u))
                for part in range(u)]  # the heads a rank holds after the all-to-all: its part of the sub-group
    totals = []
    for rank in range(world_size):
        total = 0
        for layout in per_part[rank % u]:
            if layout.span_rows is None:
                continue
            g, me, n = layout.group_size, (rank // u) % layout.group_size, u * shard // layout.rate
            heads, kv_heads = layout.span_rows.q_heads.numel(), layout.span_rows.kv_heads.numel()
            block = n * kv_heads * head_dim  # one rank's keys (or values) of the pair per batch row, elements
            total += 2 * (g - 1) * block * e  # forward: K and V
            if backward:
                total += 2 * (g - 1) * block * e + 2 * (g if family == "ring" else g - 1) * block * a
            if balanced(layout, causal, load_balance):
                into = halves_received(me, g, to_zigzag=True) * n // 2  # rows that reach this rank
                back = halves_received(me, g, to_zigzag=False) * n // 2
                relaid = heads + (2 * kv_heads if family == "ring" else 0)  # q (, k, v)
                total += into * relaid * head_dim * e + back * heads * (head_dim + 1) * a  # q...; out, LSE back
                if backward:
                    total += into * heads * (2 * head_dim * e + a) + back * relaid * head_dim * a  # dO, out, LSE; dq...
        totals.append(agreement_check_bytes(world_size) + all_to_all * (2 if backward else 1) + batch * total)
    return totals


def document_bytes(plan: StreamPlan, head_dim: int, element: int, accumulator: int, backward: bool) -> int:
    """Bytes one rank receives for one pair's spanning pieces of documents, read off its plan
    (`ring_attention.streams`): rows moved in for the tables (q; k, v) and the outputs and LSE moved back; the keys
    gathered, or received at each ring step; in the backward dO, the global output and LSE moved in, the keys again
    (ring) with their accumulators, the gathered keys' gradients returned (all-gather), and the gradients moved back."""
    d, e, a = head_dim, element, accumulator
    q_in = sum(len(rows) for rows in plan.q_moves.incoming.values())
    q_back = sum(len(rows) for rows in plan.q_moves.outgoing.values())
    k_in = sum(len(rows) for rows in plan.k_moves.incoming.values())
    k_back = sum(len(rows) for rows in plan.k_moves.outgoing.values())
    if plan.gathered is not None:
        keys, returned = sum(plan.gathered.receive.values()), sum(len(r) for r in plan.gathered.send.values())
        carried = 0
    else:
        keys, returned = sum(len(r) for step in plan.ring for r in step.receive.values()), 0
        carried = sum(len(r) for step in plan.ring for r in step.accumulate_receive.values())
    total = q_in * d * e + k_in * 2 * d * e + keys * 2 * d * e + q_back * (d + 1) * a
    if backward:
        total += q_in * (2 * d * e + a) + (0 if plan.gathered is not None else keys * 2 * d * e)
        total += (returned + carried) * 2 * d * a + q_back * d * a + k_back * 2 * d * a
    return total


def score_pairs(
    seq_len: int,
    world_size: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    num_heads: int,
    *,
    causal: bool = True,
    head_mode: str = "all",
    num_kv_heads: int | None = None,
    comm: str = "ring",
    load_balance: bool = True,
    cu_seqlens=None,
    batch: int = 1,
) -> list[int]:
    """(query, key) score pairs each rank's kernels compute in the forward of ``batch`` rows: the per-rank work.

    Counted from the plan and the same schedules the core runs: a causal diagonal block of ``n`` rows counts
    ``n (n + 1) / 2``, any other block its full rectangle. With documents (``cu_seqlens``), or a length the segments
    do not tile, it is read off the documents' plan: each run's views, each bucket's blocks (not their padding).
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    rows = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, seq_len, batch)
    if not ((rows is None or all(b == (0, seq_len) for b in rows))
            and tiles_shards(seq_len, world_size, segment_lengths, dilation_rates)):
        return [document_work(plan_documents(
            rows or ((0, seq_len),), seq_len, world_size, rank, segment_lengths, dilation_rates, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_mode=head_mode, batch=batch, causal=causal, device=torch.device("cpu"),
            local_heads=range(num_heads), comm_mode=comm, load_balance=load_balance), batch, causal)
            for rank in range(world_size)]
    layouts = plan_pairs(seq_len, world_size, segment_lengths, dilation_rates, num_heads, head_mode, num_kv_heads)
    shard = seq_len // world_size

    def block_pairs(block: Block) -> int:
        n, m = block.q.stop - block.q.start, block.k.stop - block.k.start
        return n * (n + 1) // 2 if block.causal else n * m

    work = []
    for rank in range(world_size):
        total = 0
        for layout in layouts:
            heads = sum(view.heads for view in layout.views)
            if not layout.spans_ranks:
                for view in layout.views:
                    total += (shard // layout.piece_length) * view.heads * _square(view.count, causal)
                continue
            me, size, rows_per_head = rank % layout.group_size, layout.group_size, shard // layout.rate
            balance = balanced(layout, causal, load_balance)
            blocks = (gathered_blocks(me, size, rows_per_head, causal, balance) if comm == "allgather" else
                      [b for step in range(size) for b in ring_blocks(me, size, step, rows_per_head, causal, balance)])
            total += heads * sum(block_pairs(b) for b in blocks)
        work.append(batch * total)
    return work


def _square(n: int, causal: bool) -> int:
    return n * (n + 1) // 2 if causal else n * n


def document_work(plans: list, batch: int, causal: bool) -> int:
    """The scores one rank's documents plan (`ring_attention.documents.plan_documents`) computes: its runs' views
    and its buckets' blocks."""
    total = 0
    for plan in plans:
        if isinstance(plan, StreamPlan):
            buckets = plan.gathered.buckets if plan.gathered is not None else [b for step in plan.ring
                                                                                for b in step.buckets]
        else:
            buckets = [plan.short] if plan.short is not None else []
            for run in plan.runs:
                copies = batch if run.row is None else 1
                total += copies * run.pieces * sum(view.heads * _square(view.count, causal)
                                                   for view in plan.views[run.length])
        total += sum(b.useful for b in buckets)
    return total
