"""The functional core: exact dilated attention on this rank's shard of a sequence.

One ``torch.autograd.Function`` computes every pair of the operator with the fused kernels of
`ring_attention.kernels` and merges the pieces by their log-sum-exp in float32 (float64 for float64 input):

- a pair whose segments fit in a shard (a *local* pair) is computed on strided views of the ``[B, L, H, D]``
  tensors (`ring_attention.pattern.row_view`): no row is copied, and each kernel's output is merged straight
  into the output through the same views;
- a pair whose segments span ranks gathers its kept rows into dense blocks, which travel by ring or
  all-gather (`ring_attention.spanning`).

The backward recomputes every block through the kernels' backward from the saved inputs and the rows'
global output and LSE, so only O(L) activations are kept, and accumulates dq, dk, dv through the same views.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ring_attention import comm as C
from ring_attention.kernels import block_attention, block_attention_backward, lse_dtype, select_backend
from ring_attention.pattern import (
    PairLayout,
    accumulate_rows,
    gather_rows,
    plan_pairs,
    row_view,
    scatter_rows,
    viewable,
)
from ring_attention.spanning import Attend, SpanningPair, merge_into, merge_partials
from ring_attention.ulysses import AllToAll, check_ulysses_size, ulysses_groups
from ring_attention.validation import check_pairs, check_qkv

COMM_MODES = ("ring", "allgather")
_CHUNKS = 4  # a local pair's kernel calls per view, at most: bounds each call's outputs to ~1/4 of the shard


class _Context:
    """Everything one call needs besides tensors: layout, group, and how blocks are computed."""

    def __init__(self, layouts: list[PairLayout], group, causal: bool, scale: float, backend: str, comm_mode: str,
                 load_balance: bool):
        self.layouts, self.group, self.comm_mode, self.load_balance = layouts, group, comm_mode, load_balance
        self.attend = Attend(causal, scale, backend)
        self.rank, _ = C.group_rank_and_size(group)

    def local_forward(self, q, k, v, out, lse, layout: PairLayout, first: bool) -> None:
        """A local pair, view by view; ``first``: the rows hold nothing yet, so results are written, not merged."""
        a = self.attend
        for rows in _view_chunks(layout, q):
            o, s = block_attention(rows(q), rows(k, True), rows(v, True), causal=a.causal, scale=a.scale,
                                   backend=a.backend)
            if first:
                rows(out).copy_(o)
                rows(lse).copy_(s)
            else:
                merge_into(rows(out), rows(lse), o.to(out.dtype), s)

    def spanning_forward(self, q, k, v, out, lse, layout: PairLayout, first: bool) -> None:
        """A spanning pair: its rows gathered into blocks, computed across the segment group, scattered back."""
        (sel,) = layout.selections  # L % r == 0: every head keeps L / r rows, one selection
        q_rows = (layout.piece, sel.q_positions, sel.q_heads)
        kv_rows = (layout.piece, sel.kv_positions, sel.kv_heads)
        pair = SpanningPair(self.attend, self.comm_mode, self.group, self.rank, layout, sel, self.load_balance)
        o, s = pair.forward(gather_rows(q, *q_rows), gather_rows(k, *kv_rows), gather_rows(v, *kv_rows))
        if not first:
            o, s = merge_partials(gather_rows(out, *q_rows), gather_rows(lse, *q_rows), o, s)
        scatter_rows(out, *q_rows, o)
        scatter_rows(lse, *q_rows, s)

    def local_backward(self, dout, q, k, v, out, lse, dq, dk, dv, layout: PairLayout, first: bool) -> None:
        """A local pair, view by view; ``first``: the gradients are written, not added (a covering first pair)."""
        a = self.attend
        for rows in _view_chunks(layout, q):
            grads = block_attention_backward(rows(dout), rows(q), rows(k, True), rows(v, True), rows(out), rows(lse),
                                             causal=a.causal, scale=a.scale, backend=a.backend)
            for acc, grad, kv in zip((dq, dk, dv), grads, (False, True, True)):
                if first:
                    rows(acc, kv).copy_(grad)
                else:
                    rows(acc, kv).add_(grad)

    def spanning_backward(self, dout, q, k, v, out, lse, dq, dk, dv, layout: PairLayout, first: bool) -> None:
        (sel,) = layout.selections
        q_rows = (layout.piece, sel.q_positions, sel.q_heads)
        kv_rows = (layout.piece, sel.kv_positions, sel.kv_heads)
        pair = SpanningPair(self.attend, self.comm_mode, self.group, self.rank, layout, sel, self.load_balance)
        dout_, q_, out_, lse_ = (gather_rows(t, *q_rows) for t in (dout, q, out, lse))  # [B, n, h, ...]
        grads = pair.backward(dout_, q_, gather_rows(k, *kv_rows), gather_rows(v, *kv_rows), out_, lse_)
        accumulate_rows(dq, *q_rows, grads[0])
        accumulate_rows(dk, *kv_rows, grads[1])
        accumulate_rows(dv, *kv_rows, grads[2])


def _view_chunks(layout: PairLayout, x: torch.Tensor):
    """``rows(t, kv=False)`` for each kernel call of a local pair on tensors shaped like ``x`` [B, L, ...]: every
    view, cut along its ``B L / piece`` pieces into at most `_CHUNKS` calls, so that a call's outputs and
    gradients stay a fraction of the shard's size."""
    pieces = x.shape[0] * (x.shape[1] // layout.piece)
    step = -(-pieces // _CHUNKS)
    for view in layout.views:
        for start in range(0, pieces, step):
            def rows(t, kv=False, view=view, start=start):
                return row_view(t, layout.piece, layout.rate, view, kv)[start: start + step]  # [pieces, n, h, ...]

            yield rows


class _DilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, ctx: _Context):
        batch, shard, heads, head_dim = q.shape
        acc = lse_dtype(q.dtype)
        if _covers(ctx.layouts[0], heads):  # the first pair writes every row once: nothing to initialise
            out = q.new_empty(batch, shard, heads, head_dim, dtype=acc)  # [B, L, H, D]
            lse = q.new_empty(batch, shard, heads, dtype=acc)  # [B, L, H]
        else:
            out = q.new_zeros(batch, shard, heads, head_dim, dtype=acc)
            lse = q.new_full((batch, shard, heads), -math.inf, dtype=acc)
        for i, layout in enumerate(ctx.layouts):
            if not layout.views:  # head groups split over ranks (ulysses_size > 1): none of this pair's heads here
                continue
            compute = ctx.spanning_forward if layout.spans_ranks else ctx.local_forward
            compute(q, k, v, out, lse, layout, first=i == 0)
        result = out.to(q.dtype)
        fctx.save_for_backward(q, k, v, result, lse)  # the output in the input dtype: what the kernels take
        fctx.ctx = ctx
        return result

    @staticmethod
    def backward(fctx, dout):
        q, k, v, out, lse = fctx.saved_tensors
        ctx: _Context = fctx.ctx
        acc = lse_dtype(q.dtype)
        written = _covers(ctx.layouts[0], q.shape[2]) and not ctx.layouts[0].spans_ranks
        new = torch.empty if written else torch.zeros
        dq, dk, dv = (new(t.shape, dtype=acc, device=t.device) for t in (q, k, v))  # contiguous
        dout = viewable(dout)
        with _autocast_off(q.device.type):
            for i, layout in enumerate(ctx.layouts):
                if not layout.views:
                    continue
                compute = ctx.spanning_backward if layout.spans_ranks else ctx.local_backward
                compute(dout, q, k, v, out, lse, dq, dk, dv, layout, first=written and i == 0)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _covers(layout: PairLayout, heads: int) -> bool:
    """Whether ``layout`` keeps every row of every head exactly once, in one view: rate 1, all heads, no
    grouped-query members (which would each hold the kv rows)."""
    return layout.rate == 1 and len(layout.views) == 1 and layout.views[0].heads == heads


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """The kernels and merges choose their own precision: autocast is off inside (where the device has it)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def _plan(seq_len, size, segment_lengths, dilation_rates, heads, head_mode, kv_heads, device, local_heads):
    # a model calls this every layer and step with the same configuration: build the index tensors once
    return plan_pairs(seq_len, size, list(segment_lengths), list(dilation_rates), heads, head_mode,
                      num_kv_heads=kv_heads, device=device, local_heads=local_heads)


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
    load_balance: bool = True,
    ulysses_size: int = 1,
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
        load_balance: with ``causal``, balance the work of pairs whose segments span ranks: their selected rows
            are re-laid in zigzag order across the segment group inside the call (`ring_attention.balance`) and
            laid back, so the result and the user's layout are the same as without it. A pair whose ranks hold
            an odd number of selected rows per head keeps the unbalanced schedule. No effect without
            ``causal`` or without spanning pairs.
        ulysses_size: ``U`` > 1 adds all-to-all over heads (`ring_attention.ulysses`): each sub-group of ``U``
            consecutive ranks swaps sequence shards for head shards, and the pairs run across the sub-groups
            on blocks of ``U L`` tokens. ``U`` must divide the group size, ``heads`` and ``kv_heads``; ``U`` equal
            to the group size is all-to-all alone. The user's layout does not change.

    fp16/bf16 inputs run the kernels in their dtype and merge in float32; the output has the input dtype.
    Under ``torch.autocast`` float32 inputs are cast to the autocast dtype first.
    """
    check_qkv(q, k, v, allow_gqa=True)
    if comm not in COMM_MODES:
        raise ValueError(f"comm must be one of {COMM_MODES}, got {comm!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    if not isinstance(load_balance, bool):
        raise TypeError(f"load_balance must be True or False, got {load_balance!r}")
    pg = C.resolve_group(group)
    _, size = C.group_rank_and_size(pg)
    batch, shard, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    check_ulysses_size(ulysses_size, size, heads, kv_heads)
    if size > 1:
        C.check_same_shards(q, k, pg)
    device_type = q.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast and q.dtype == torch.float32:
        low = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(low), k.to(low), v.to(low)
    check_pairs(segment_lengths, dilation_rates)  # before they become the cache key
    pairs_group, local_heads = pg, range(heads)
    if ulysses_size > 1:  # sequence shards -> head shards of the sub-group's U L tokens; pairs over the inter-group
        sub, pairs_group = ulysses_groups(pg, ulysses_size)
        part = dist.get_rank(sub)
        local_heads = range(part * heads // ulysses_size, (part + 1) * heads // ulysses_size)
        q, k, v = (AllToAll.apply(t, sub, True) for t in (q, k, v))  # [B, U L, H / U, D]
    pairs_size = size // ulysses_size
    layouts = _plan(shard * size, pairs_size, tuple(segment_lengths), tuple(dilation_rates), heads, head_mode,
                    kv_heads, q.device, local_heads)
    ctx = _Context(layouts, pairs_group, causal, scale or 1.0 / math.sqrt(head_dim), select_backend(backend, q), comm,
                   load_balance)
    q, k, v = viewable(q), viewable(k), viewable(v)  # rows are read through strided views
    with _autocast_off(device_type):
        out = _DilatedAttention.apply(q, k, v, ctx)
    return AllToAll.apply(out, sub, False) if ulysses_size > 1 else out  # this rank's rows, every head
