"""The functional core: exact dilated attention on this rank's shard of a sequence.

One ``torch.autograd.Function`` computes every (pair, head selection) of the operator with the fused
kernels of `ring_attention.kernels` and merges the pieces by their log-sum-exp in float32 (float64 for
float64 input). Pairs whose segments span ranks communicate in one of two ways:

- ``comm="ring"``: the dilated keys/values rotate around the segment group with point-to-point messages,
  each step's transfer posted before the current block is computed; the backward sends the dk/dv
  accumulators home around the same ring (lesson 4).
- ``comm="allgather"``: the segment group's dilated keys/values are all-gathered in one collective (LongNet's
  algorithm, lesson 3); the backward gathers them again and reduce-scatters dk/dv to their owners.

The backward recomputes every block through the kernels' backward from the saved shards and the rows'
global output and LSE, so only O(L) activations are kept.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import torch

from ring_attention import comm as C
from ring_attention.kernels import block_attention, block_attention_backward, lse_dtype, select_backend
from ring_attention.pattern import PairLayout, Selection, accumulate_rows, gather_rows, plan_pairs, scatter_rows
from ring_attention.validation import check_pairs, check_qkv

COMM_MODES = ("ring", "allgather")


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Attention over key sets A and B merged into attention over A ∪ B (``lse = -inf``: no key yet)."""
    peak = torch.maximum(lse_a, lse_b)
    empty = peak == -math.inf
    peak = torch.where(empty, torch.zeros_like(peak), peak)
    weight_a, weight_b = torch.exp(lse_a - peak), torch.exp(lse_b - peak)
    total = torch.where(empty, torch.ones_like(peak), weight_a + weight_b)
    out = (weight_a.unsqueeze(-1) * out_a + weight_b.unsqueeze(-1) * out_b) / total.unsqueeze(-1)
    return out, torch.where(empty, torch.full_like(peak, -math.inf), peak + torch.log(total))


class _Context:
    """Everything one call needs besides tensors: layout, group, and how blocks are computed."""

    def __init__(self, layouts, group, causal, scale, backend, comm_mode):
        self.layouts, self.group, self.causal, self.scale = layouts, group, causal, scale
        self.backend, self.comm_mode = backend, comm_mode
        self.rank, _ = C.group_rank_and_size(group)

    def attend(self, q, k, v, sel: Selection, diagonal: bool):
        k, v = expand_kv(k, sel), expand_kv(v, sel)
        out, lse = block_attention(q, k, v, causal=self.causal and diagonal, scale=self.scale, backend=self.backend)
        return out.to(lse.dtype), lse

    def attend_backward(self, dout, q, k, v, out, lse, sel: Selection, diagonal: bool):
        dq, dk, dv = block_attention_backward(
            dout, q, expand_kv(k, sel), expand_kv(v, sel), out, lse, causal=self.causal and diagonal,
            scale=self.scale, backend=self.backend,
        )
        return dq, reduce_kv(dk, sel), reduce_kv(dv, sel)


def expand_kv(x: torch.Tensor, sel: Selection) -> torch.Tensor:
    """kv heads ``[B, n, h_kv, D]`` -> one per query head ``[B, n, h, D]`` (grouped-query attention)."""
    return x if sel.kv_heads.numel() == sel.q_heads.numel() else x.index_select(2, sel.kv_index)


def reduce_kv(grad: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Gradient per query head -> per kv head: the query heads sharing a kv head add up."""
    if sel.kv_heads.numel() == sel.q_heads.numel():
        return grad
    shape = (*grad.shape[:2], sel.kv_heads.numel(), grad.shape[3])
    return grad.new_zeros(shape).index_add_(2, sel.kv_index, grad)


def _ring_neighbours(layout: PairLayout, rank: int) -> tuple[int, int]:
    """The group ranks ``rank`` sends to and receives from in its segment group's ring."""
    members = layout.segment_group(rank)
    me = members.index(rank)
    return members[(me + 1) % len(members)], members[(me - 1) % len(members)]


def _spanning_forward(ctx: _Context, q, k, v, layout: PairLayout, sel: Selection):
    me, size = ctx.rank % layout.group_size, layout.group_size
    out = lse = None

    def fold(o, s):
        nonlocal out, lse
        out, lse = (o, s) if out is None else merge_partials(out, lse, o, s)

    if ctx.comm_mode == "allgather":
        blocks = C.all_gather_blocks(torch.stack([k, v]), C.segment_process_group(layout, ctx.rank, ctx.group))
        for j in range(me + 1) if ctx.causal else range(size):  # later ranks' keys are the future
            fold(*ctx.attend(q, blocks[j, 0], blocks[j, 1], sel, diagonal=j == me))
        return out, lse
    send_to, recv_from = _ring_neighbours(layout, ctx.rank)
    held = [k, v]
    for step in range(size):
        pending = C.start_exchange(held, send_to, recv_from, ctx.group) if step < size - 1 else None
        source = (me - step) % size
        if not (ctx.causal and source > me):
            fold(*ctx.attend(q, *held, sel, diagonal=source == me))
        if pending is not None:
            held = C.finish_exchange(pending)
    return out, lse


def _spanning_backward(ctx: _Context, dout, q, k, v, out, lse, layout: PairLayout, sel: Selection):
    me, size = ctx.rank % layout.group_size, layout.group_size
    acc = lse_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc)
    if ctx.comm_mode == "allgather":
        segment_group = C.segment_process_group(layout, ctx.rank, ctx.group)
        blocks = C.all_gather_blocks(torch.stack([k, v]), segment_group)  # gathered again, not kept from forward
        dkv = torch.zeros_like(blocks, dtype=acc)  # [G, 2, B, n, h_kv, D]
        for j in range(me + 1) if ctx.causal else range(size):
            dq_b, dk_b, dv_b = ctx.attend_backward(dout, q, blocks[j, 0], blocks[j, 1], out, lse, sel, diagonal=j == me)
            dq += dq_b
            dkv[j, 0] += dk_b
            dkv[j, 1] += dv_b
        mine = C.reduce_scatter_blocks(dkv, segment_group)
        return dq, mine[0], mine[1]
    send_to, recv_from = _ring_neighbours(layout, ctx.rank)
    held = [k, v]
    dkv = [torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)]  # travel with the keys
    for step in range(size):
        pending = C.start_exchange(held, send_to, recv_from, ctx.group) if step < size - 1 else None
        source = (me - step) % size
        if not (ctx.causal and source > me):
            dq_b, dk_b, dv_b = ctx.attend_backward(dout, q, *held, out, lse, sel, diagonal=source == me)
            dq += dq_b
            dkv[0] += dk_b
            dkv[1] += dv_b
        if pending is not None:
            held = C.finish_exchange(pending)
        dkv = C.finish_exchange(C.start_exchange(dkv, send_to, recv_from, ctx.group))  # the last one: home
    return dq, dkv[0], dkv[1]


class _DilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, ctx: _Context):
        batch, shard, heads, head_dim = q.shape
        acc = lse_dtype(q.dtype)
        out = q.new_zeros(batch, shard, heads, head_dim, dtype=acc)  # [B, L, H, D]
        lse = q.new_full((batch, shard, heads), -math.inf, dtype=acc)  # [B, L, H]
        for layout in ctx.layouts:
            for sel in layout.selections:
                q_dil = gather_rows(q, layout.piece, sel.q_positions, sel.q_heads)  # [B * pieces, n, h, D]
                k_dil, v_dil = (gather_rows(t, layout.piece, sel.kv_positions, sel.kv_heads) for t in (k, v))
                if layout.spans_ranks:
                    o, s = _spanning_forward(ctx, q_dil, k_dil, v_dil, layout, sel)
                else:
                    o, s = ctx.attend(q_dil, k_dil, v_dil, sel, diagonal=True)
                rows = (layout.piece, sel.q_positions, sel.q_heads)
                merged = merge_partials(gather_rows(out, *rows), gather_rows(lse, *rows), o, s)
                scatter_rows(out, *rows, merged[0])
                scatter_rows(lse, *rows, merged[1])
        fctx.save_for_backward(q, k, v, out, lse)
        fctx.ctx = ctx
        return out.to(q.dtype)

    @staticmethod
    def backward(fctx, dout):
        q, k, v, out, lse = fctx.saved_tensors
        ctx: _Context = fctx.ctx
        acc = lse_dtype(q.dtype)
        dq, dk, dv = (torch.zeros_like(t, dtype=acc) for t in (q, k, v))
        with _autocast_off(q.device.type):
            for layout in ctx.layouts:
                for sel in layout.selections:
                    q_rows = (layout.piece, sel.q_positions, sel.q_heads)
                    kv_rows = (layout.piece, sel.kv_positions, sel.kv_heads)
                    dout_dil, q_dil, out_dil, lse_dil = (gather_rows(t, *q_rows) for t in (dout, q, out, lse))
                    k_dil, v_dil = gather_rows(k, *kv_rows), gather_rows(v, *kv_rows)
                    if layout.spans_ranks:
                        grads = _spanning_backward(ctx, dout_dil, q_dil, k_dil, v_dil, out_dil, lse_dil, layout, sel)
                    else:
                        grads = ctx.attend_backward(dout_dil, q_dil, k_dil, v_dil, out_dil, lse_dil, sel, diagonal=True)
                    accumulate_rows(dq, *q_rows, grads[0])
                    accumulate_rows(dk, *kv_rows, grads[1])
                    accumulate_rows(dv, *kv_rows, grads[2])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """The kernels and merges choose their own precision: autocast is off inside (where the device has it)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def _plan(seq_len, size, segment_lengths, dilation_rates, heads, head_mode, kv_heads, device):
    # a model calls this every layer and step with the same configuration: build the index tensors once
    return plan_pairs(seq_len, size, list(segment_lengths), list(dilation_rates), heads, head_mode,
                      num_kv_heads=kv_heads, device=device)


def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    head_mode: str = "all",
    group: C.GroupLike = None,
    comm: str = "ring",
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Dilated attention (LongNet) of this rank's ``[B, L, H, D]`` shard; returns this rank's output rows.

    Args:
        q: queries ``[batch, L, heads, head_dim]``: this rank's contiguous slice of the sequence.
        k: keys ``[batch, L, kv_heads, head_dim]``; ``kv_heads`` must divide ``heads`` (grouped-query
            attention: query head ``h`` uses kv head ``h // (heads / kv_heads)``, whose offset sets the
            positions both keep).
        v: values, shaped like ``k``.
        segment_lengths: segment length ``w_i`` of each pair.
        dilation_rates: dilation rate ``r_i`` of each pair.
        causal: each query attends only to keys at or before its position.
        head_mode: ``"all"`` (every head takes every pair) or ``"groups"`` (head group ``i`` takes pair ``i``).
        group: the ranks the sequence is split over, as a ``ProcessGroup`` or a 1-D ``DeviceMesh``
            (ranks are group-relative: rank ``p`` holds tokens ``[p L, (p+1) L)``). ``None`` means no
            sequence parallelism: ``q`` is the whole sequence. Never defaults to the world group.
        comm: ``"ring"`` (point-to-point, overlapped) or ``"allgather"`` (one collective per spanning pair).
        backend: kernel backend (`ring_attention.kernels`), ``"auto"`` picks the best available.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.

    fp16/bf16 inputs run the kernels in their dtype and merge in float32; the output has the input dtype.
    Under ``torch.autocast`` float32 inputs are cast to the autocast dtype first.
    """
    check_qkv(q, k, v, allow_gqa=True)
    if comm not in COMM_MODES:
        raise ValueError(f"comm must be one of {COMM_MODES}, got {comm!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    pg = C.resolve_group(group)
    _, size = C.group_rank_and_size(pg)
    if size > 1:
        C.check_same_shards(q, k, pg)
    device_type = q.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast and q.dtype == torch.float32:
        low = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(low), k.to(low), v.to(low)
    batch, shard, heads, head_dim = q.shape
    check_pairs(segment_lengths, dilation_rates)  # before they become the cache key
    layouts = _plan(shard * size, size, tuple(segment_lengths), tuple(dilation_rates), heads, head_mode, k.shape[2],
                    q.device)
    ctx = _Context(layouts, pg, causal, scale or 1.0 / math.sqrt(head_dim), select_backend(backend, q), comm)
    with _autocast_off(device_type):
        return _DilatedAttention.apply(q, k, v, ctx)
