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
from ring_attention.merge import merge_into, merge_partials
from ring_attention.pattern import (
    PairLayout,
    accumulate_rows,
    as_row_viewable,
    gather_rows,
    plan_pairs,
    row_view,
    scatter_rows,
)
from ring_attention.spanning import BlockKernel, SpanningPair
from ring_attention.ulysses import AllToAll, check_ulysses_size, ulysses_groups
from ring_attention.validation import check_pairs, check_qkv

COMM_MODES = ("ring", "allgather")
_CHUNKS = 4  # a local pair's kernel calls per view, at most: bounds each call's outputs to ~1/4 of the shard


class AttentionCall:
    """Everything one call needs besides tensors: the pairs' layouts, the group, and how blocks are computed."""

    def __init__(self, layouts: list[PairLayout], group, kernel: BlockKernel, comm_mode: str, load_balance: bool):
        self.layouts, self.group, self.kernel = layouts, group, kernel
        self.comm_mode, self.load_balance = comm_mode, load_balance
        self.rank, _ = C.group_rank_and_size(group)

    def spanning_pair(self, layout: PairLayout) -> SpanningPair:
        return SpanningPair(self.kernel, self.comm_mode, self.group, self.rank, layout, self.load_balance)

    def local_forward(self, q, k, v, out, lse, layout: PairLayout) -> None:
        """A local pair, view by view: each kernel call's result merged straight into the rows' running result."""
        for rows in _view_chunks(layout, q):
            part_out, part_lse = block_attention(rows(q), rows(k, True), rows(v, True), causal=self.kernel.causal,
                                                 scale=self.kernel.scale, backend=self.kernel.backend)
            merge_into(rows(out), rows(lse), part_out.to(out.dtype), part_lse)

    def spanning_forward(self, q, k, v, out, lse, layout: PairLayout):
        """A spanning pair: its rows gathered into blocks, computed across the segment group, merged back.
        Returns what its backward keeps."""
        sel = layout.span_rows
        q_rows, kv_rows = (layout.piece_length, sel.q_positions, sel.q_heads), (layout.piece_length,
                                                                                 sel.kv_positions, sel.kv_heads)
        part_out, part_lse, kept = self.spanning_pair(layout).forward(
            gather_rows(q, *q_rows), gather_rows(k, *kv_rows), gather_rows(v, *kv_rows))
        merged_out, merged_lse = merge_partials(gather_rows(out, *q_rows), gather_rows(lse, *q_rows), part_out,
                                                part_lse)
        scatter_rows(out, *q_rows, merged_out)
        scatter_rows(lse, *q_rows, merged_lse)
        return kept

    def local_backward(self, dout, q, k, v, out, lse, grads, layout: PairLayout) -> None:
        """A local pair, view by view: the kernels' gradients added into ``grads`` (dq, dk, dv) through the views."""
        for rows in _view_chunks(layout, q):
            block_grads = block_attention_backward(
                rows(dout), rows(q), rows(k, True), rows(v, True), rows(out), rows(lse), causal=self.kernel.causal,
                scale=self.kernel.scale, backend=self.kernel.backend)
            for grad, block_grad, kv in zip(grads, block_grads, (False, True, True)):
                rows(grad, kv).add_(block_grad)

    def spanning_backward(self, dout, q, k, v, out, lse, grads, layout: PairLayout, kept) -> None:
        sel = layout.span_rows
        q_rows, kv_rows = (layout.piece_length, sel.q_positions, sel.q_heads), (layout.piece_length,
                                                                                 sel.kv_positions, sel.kv_heads)
        dout_rows, q_dil, out_rows, lse_rows = (gather_rows(t, *q_rows) for t in (dout, q, out, lse))  # [B, n, h, ...]
        block_grads = self.spanning_pair(layout).backward(
            dout_rows, q_dil, gather_rows(k, *kv_rows), gather_rows(v, *kv_rows), out_rows, lse_rows, kept)
        for grad, block_grad, rows in zip(grads, block_grads, (q_rows, kv_rows, kv_rows)):
            accumulate_rows(grad, *rows, block_grad)


def _view_chunks(layout: PairLayout, x: torch.Tensor):
    """``rows(t, kv=False)`` for each kernel call of a local pair on tensors shaped like ``x`` [B, L, ...]: every
    view, cut along its ``B L / piece_length`` pieces into at most `_CHUNKS` calls, so that a call's outputs and
    gradients stay a fraction of the shard's size."""
    pieces = x.shape[0] * (x.shape[1] // layout.piece_length)
    step = -(-pieces // _CHUNKS)
    for view in layout.views:
        for start in range(0, pieces, step):
            def rows(t, kv=False, view=view, start=start):
                view_rows = row_view(t, layout.piece_length, layout.rate, view, kv)  # [pieces, count, heads, ...]
                return view_rows[start: start + step]

            yield rows


class _DilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, call: AttentionCall):
        batch, shard, heads, head_dim = q.shape
        acc_dtype = lse_dtype(q.dtype)
        out = q.new_zeros(batch, shard, heads, head_dim, dtype=acc_dtype)  # [B, L, H, D]
        lse = q.new_full((batch, shard, heads), -math.inf, dtype=acc_dtype)  # [B, L, H]: no key seen yet
        kept = {}
        for layout in call.layouts:
            if not layout.views:  # head groups split over ranks (ulysses_size > 1): none of this pair's heads here
                continue
            if layout.spans_ranks:
                kept[layout.index] = call.spanning_forward(q, k, v, out, lse, layout)
            else:
                call.local_forward(q, k, v, out, lse, layout)
        result = out.to(q.dtype)
        fctx.save_for_backward(q, k, v, result, lse)  # the output in the input dtype: what the kernels take
        fctx.call, fctx.kept = call, kept
        return result

    @staticmethod
    def backward(fctx, dout):
        q, k, v, out, lse = fctx.saved_tensors
        call: AttentionCall = fctx.call
        acc_dtype = lse_dtype(q.dtype)
        grads = [torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in (q, k, v)]  # dq, dk, dv
        dout = as_row_viewable(dout)
        with _autocast_off(q.device.type):
            for layout in call.layouts:
                if not layout.views:
                    continue
                if layout.spans_ranks:
                    call.spanning_backward(dout, q, k, v, out, lse, grads, layout, fctx.kept[layout.index])
                else:
                    call.local_backward(dout, q, k, v, out, lse, grads, layout)
        return *(grad.to(t.dtype) for grad, t in zip(grads, (q, k, v))), None


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
    kernel = BlockKernel(causal, scale or 1.0 / math.sqrt(head_dim), select_backend(backend, q))
    call = AttentionCall(layouts, pairs_group, kernel, comm, load_balance)
    q, k, v = (as_row_viewable(t) for t in (q, k, v))  # rows are read through strided views
    with _autocast_off(device_type):
        out = _DilatedAttention.apply(q, k, v, call)
    return AllToAll.apply(out, sub, False) if ulysses_size > 1 else out  # this rank's rows, every head
