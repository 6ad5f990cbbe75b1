"""Stage 4 — flash: fused block kernels, a ring backward through the kernels' own backward, and
communication overlapped with compute.

What changes from stage 2 (and why):

1. **Every block goes through a fused kernel** (`ring_attention.kernels`): ``block_attention`` returns the
   block's output *and* its log-sum-exp without ever materialising the ``[Lq, Lk]`` score matrix, and
   ``block_attention_backward`` recomputes it tile by tile. Until stage 3 each block built its scores with
   explicit matmuls: memory quadratic in the block length. The kernels are production code; on the CPU
   they are PyTorch's flash kernel (``cpu_flash``), on CUDA flash-attn or PyTorch's CUDA kernels.
2. **The backward is the kernels' backward, given the ring's global output and LSE.** Stage 2 wrote
   the block gradient by hand; here the kernel's own backward computes it, because ``exp(S - lse_global)``
   is exactly the block's share of the row's softmax (see the kernels' module docstring): it returns the
   key block's share of dq and this query block's contribution to the key block's dk, dv.
3. **Communication overlaps compute.** Stage 2 computed a block, then exchanged, then computed the next.
   Here the next step's ``batch_isend_irecv`` is posted *before* the current block is computed and
   waited on after it, so the transfer runs while the kernel does (stage 2's ``exchange`` split in two:
   ``start_exchange`` and ``finish_exchange`` of `ring_attention.comm`). In the backward the keys travel ahead
   the same way; the dk/dv accumulators can only leave once the block's gradient is added, so that one
   transfer is not hidden. ``overlap=False`` gives the stage-2 order, for comparison; ``timeline`` records
   when each step computed and waited.

What does not change: the rows each kernel call sees are stage 2's selections (heads that keep the same
number of positions per piece, gathered into one tensor), and the merge is stage 1's.

The result is stage 3's, to float rounding: same rows, same gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from lessons.stage1_simulated_ring import accumulation_dtype, merge_partials, merge_rows, pair_selections
from lessons.stage2_true_ring import ring_neighbours
from ring_attention.comm import check_same_shards, finish_exchange, start_exchange
from ring_attention.kernels import block_attention, block_attention_backward, select_backend
from ring_attention.pattern import accumulate_rows, gather_rows, plan_pairs
from ring_attention.validation import check_qkv


@contextmanager
def timed(timeline: list | None, phase: str, **where):
    """Append ``{phase, start, end, **where}`` to ``timeline`` (when one is given) around the block."""
    start = time.perf_counter()
    yield
    if timeline is not None:
        timeline.append(dict(phase=phase, start=start, end=time.perf_counter(), **where))


def ring_forward(q_dil, k_dil, v_dil, layout, rank, *, causal, scale, group, backend, overlap, timeline):
    me, send_to, recv_from = ring_neighbours(layout, rank)
    acc = accumulation_dtype(q_dil.dtype)
    held = [k_dil, v_dil]
    out = lse = None
    for step in range(layout.group_size):
        last = step == layout.group_size - 1
        pending = start_exchange(held, send_to, recv_from, group) if overlap and not last else None
        source = (me - step) % layout.group_size
        with timed(timeline, "compute", pass_="forward", pair=layout.index, step=step):
            if not (causal and source > me):
                o, s = block_attention(q_dil, *held, causal=causal and source == me, scale=scale, backend=backend)
                o, s = o.to(acc), s.to(acc)
                out, lse = (o, s) if out is None else merge_partials(out, lse, o, s)
        if not last:
            with timed(timeline, "wait", pass_="forward", pair=layout.index, step=step):
                held = finish_exchange(pending or start_exchange(held, send_to, recv_from, group))
    return out, lse


def ring_backward(dout_dil, q_dil, k_dil, v_dil, out_dil, lse_dil, layout, rank, *, causal, scale, group, backend,
                  overlap, timeline):
    me, send_to, recv_from = ring_neighbours(layout, rank)
    acc = accumulation_dtype(q_dil.dtype)
    held = [k_dil, v_dil]
    dq = torch.zeros_like(q_dil, dtype=acc)
    dkv = [torch.zeros_like(k_dil, dtype=acc), torch.zeros_like(v_dil, dtype=acc)]  # travel with the keys
    for step in range(layout.group_size):
        last = step == layout.group_size - 1
        pending_keys = start_exchange(held, send_to, recv_from, group) if overlap and not last else None
        source = (me - step) % layout.group_size
        with timed(timeline, "compute", pass_="backward", pair=layout.index, step=step):
            if not (causal and source > me):
                dq_b, dk_b, dv_b = block_attention_backward(
                    dout_dil, q_dil, *held, out_dil, lse_dil, causal=causal and source == me, scale=scale,
                    backend=backend,
                )
                dq += dq_b
                dkv[0] += dk_b
                dkv[1] += dv_b
        with timed(timeline, "wait", pass_="backward", pair=layout.index, step=step):
            if not last:
                held = finish_exchange(pending_keys or start_exchange(held, send_to, recv_from, group))
            dkv = finish_exchange(start_exchange(dkv, send_to, recv_from, group))  # the last hop brings them home
    return dq, dkv[0], dkv[1]


class _FlashRingDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layouts, causal, scale, group, backend, overlap, timeline):
        rank = dist.get_rank(group)
        batch, shard, heads, head_dim = q.shape
        acc = accumulation_dtype(q.dtype)
        out = q.new_zeros(batch, shard, heads, head_dim, dtype=acc)  # [B, L, H, D]
        lse = q.new_full((batch, shard, heads), -math.inf, dtype=acc)  # [B, L, H]
        kw = dict(causal=causal, scale=scale, backend=backend)
        for layout in layouts:
            for sel in pair_selections(layout, q.device):
                q_dil = gather_rows(q, layout.piece_length, sel.q_positions, sel.q_heads)  # [B * pieces, n, h, D]
                k_dil, v_dil = (gather_rows(t, layout.piece_length, sel.kv_positions, sel.kv_heads) for t in (k, v))
                if layout.spans_ranks:
                    o, s = ring_forward(q_dil, k_dil, v_dil, layout, rank, group=group, overlap=overlap,
                                        timeline=timeline, **kw)
                else:
                    o, s = block_attention(q_dil, k_dil, v_dil, **kw)
                merge_rows(out, lse, layout.piece_length, sel.q_positions, sel.q_heads, o.to(acc), s.to(acc))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = dict(layouts=layouts, group=group, overlap=overlap, timeline=timeline, **kw)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        opts = dict(ctx.options)
        layouts, group, overlap, timeline = (opts.pop(key) for key in ("layouts", "group", "overlap", "timeline"))
        rank = dist.get_rank(group)
        acc = accumulation_dtype(q.dtype)
        dq, dk, dv = (torch.zeros_like(t, dtype=acc) for t in (q, k, v))
        for layout in layouts:
            for sel in pair_selections(layout, q.device):
                dout_dil, q_dil, out_dil, lse_dil = (
                    gather_rows(t, layout.piece_length, sel.q_positions, sel.q_heads) for t in (dout, q, out, lse)
                )
                k_dil, v_dil = (gather_rows(t, layout.piece_length, sel.kv_positions, sel.kv_heads) for t in (k, v))
                if layout.spans_ranks:
                    grads = ring_backward(dout_dil, q_dil, k_dil, v_dil, out_dil, lse_dil, layout, rank, group=group,
                                          overlap=overlap, timeline=timeline, **opts)
                else:
                    grads = block_attention_backward(dout_dil, q_dil, k_dil, v_dil, out_dil, lse_dil, **opts)
                accumulate_rows(dq, layout.piece_length, sel.q_positions, sel.q_heads, grads[0])
                accumulate_rows(dk, layout.piece_length, sel.kv_positions, sel.kv_heads, grads[1])
                accumulate_rows(dv, layout.piece_length, sel.kv_positions, sel.kv_heads, grads[2])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 7)


def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    head_mode: str = "all",
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    overlap: bool = True,
    timeline: list | None = None,
) -> torch.Tensor:
    """Stage 2's signature and result, with fused kernels and communication overlapped with compute.

    Args:
        q: this rank's queries ``[B, L, H, D]``.
        k: this rank's keys, same shape.
        v: this rank's values, same shape.
        segment_lengths: the segment length of each pair.
        dilation_rates: the dilation rate of each pair.
        causal: each query attends only to keys at or before it.
        head_mode: ``"all"`` or ``"groups"``.
        group: the process group holding the sequence (default: the world).
        backend: a kernel backend of `ring_attention.kernels`, or ``"auto"``.
        overlap: post each step's exchange before computing the current block (``False``: after it).
        timeline: if a list is given, one entry per ring step and phase (``"compute"``/``"wait"``) is
            appended, with ``perf_counter`` start and end times.
    """
    check_qkv(q, k, v)
    backend = select_backend(backend, q)
    group = group or dist.group.WORLD
    check_same_shards(q, k, group)
    world_size = dist.get_world_size(group)
    batch, shard, heads, head_dim = q.shape
    layouts = plan_pairs(
        shard * world_size, world_size, segment_lengths, dilation_rates, heads, head_mode, device=q.device
    )
    return _FlashRingDilatedAttention.apply(
        q, k, v, layouts, causal, 1.0 / math.sqrt(head_dim), group, backend, overlap, timeline
    )
