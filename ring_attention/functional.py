"""The functional core: exact dilated attention on this rank's shard of a sequence.

One ``torch.autograd.Function`` computes every pair of the operator with the fused kernels of
`ring_attention.kernels` and merges the pieces by their log-sum-exp in float32 (float64 for float64 input). A call
is a list of *parts*, each computing some pairs' rows and merging them into the running output and LSE:

- when every pair's segments tile the sequence and the shards (`ring_attention.validation.tiles_shards`), a pair
  whose segments fit in a shard is computed on strided views, and one whose segments span ranks gathers its kept
  rows into blocks that travel by ring or all-gather (`ring_attention.tiled`);
- otherwise (packed documents, ``cu_seqlens``, or any other length) each document is segmented from its own start:
  whole segments are strided views again, shorter ones variable-length blocks (`ring_attention.documents`).

The backward recomputes every block through the kernels' backward from the saved inputs and the rows' global output
and LSE, so only O(L) activations are kept, and accumulates dq, dk, dv part by part.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ring_attention import comm as C
from ring_attention.doc_spanning import SpanningStreams
from ring_attention.documents import LocalPieces, LocalPlan, documents_fingerprint, plan_documents
from ring_attention.kernels import lse_dtype, select_backend
from ring_attention.pattern import as_row_viewable, plan_pairs
from ring_attention.spanning import BlockKernel
from ring_attention.tiled import tiled_parts
from ring_attention.ulysses import AllToAll, check_ulysses_size, ulysses_groups
from ring_attention.validation import Boundaries, CuSeqlens, check_cu_seqlens, check_pairs, check_qkv, tiles_shards

COMM_MODES = ("ring", "allgather")


class _DilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, parts: list):
        batch, shard, heads, head_dim = q.shape
        acc_dtype = lse_dtype(q.dtype)
        out = q.new_zeros(batch, shard, heads, head_dim, dtype=acc_dtype)  # [B, L, H, D]
        lse = q.new_full((batch, shard, heads), -math.inf, dtype=acc_dtype)  # [B, L, H]: no key seen yet
        kept = [part.forward(q, k, v, out, lse) for part in parts]
        result = out.to(q.dtype)
        fctx.save_for_backward(q, k, v, result, lse)  # the output in the input dtype: what the kernels take
        fctx.parts, fctx.kept = parts, kept
        return result

    @staticmethod
    def backward(fctx, dout):
        q, k, v, out, lse = fctx.saved_tensors
        acc_dtype = lse_dtype(q.dtype)
        grads = [torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in (q, k, v)]  # dq, dk, dv
        dout = as_row_viewable(dout)
        with _autocast_off(q.device.type):
            for part, kept in zip(fctx.parts, fctx.kept):
                part.backward(dout, q, k, v, out, lse, grads, kept)
        return *(grad.to(t.dtype) for grad, t in zip(grads, (q, k, v))), None


# the device types with autocast, read once: Dynamo of torch 2.11 cannot trace torch.amp.is_autocast_available
_AUTOCAST_DEVICE_TYPES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "maia",
                                               torch._C._get_privateuse1_backend_name())
                                   if torch.amp.is_autocast_available(t))


def _has_autocast(device_type: str) -> bool:
    return device_type in _AUTOCAST_DEVICE_TYPES if torch.compiler.is_compiling() else \
        torch.amp.is_autocast_available(device_type)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """The kernels and merges choose their own precision: autocast is off inside (where the device has it)."""
    if _has_autocast(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def _plan(seq_len, size, segment_lengths, dilation_rates, heads, head_mode, kv_heads, device, local_heads):
    # a model calls this every layer and step with the same configuration: build the index tensors once
    return plan_pairs(seq_len, size, list(segment_lengths), list(dilation_rates), heads, head_mode,
                      num_kv_heads=kv_heads, device=device, local_heads=local_heads)


@functools.lru_cache(maxsize=8)
def _document_plan(rows, seq_len, size, rank, segment_lengths, dilation_rates, heads, head_mode, kv_heads, batch,
                   causal, device, local_heads, comm, load_balance):
    # every layer of a model sees the same documents in a step: plan them once (the plans hold index tensors)
    return plan_documents(rows, seq_len, size, rank, segment_lengths, dilation_rates, num_heads=heads,
                          num_kv_heads=kv_heads, head_mode=head_mode, batch=batch, causal=causal, device=device,
                          local_heads=local_heads, comm_mode=comm, load_balance=load_balance)


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
    cu_seqlens: CuSeqlens | None = None,
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
            an odd number of selected rows per head keeps the unbalanced schedule. With documents, the pieces
            that cross a shard boundary are cut into chunks of equal causal work that go to the ranks with the
            least work, their pieces inside the shard counted first (`ring_attention.streams`). No effect without
            ``causal`` or without pieces that span ranks.
        ulysses_size: ``U`` > 1 adds all-to-all over heads (`ring_attention.ulysses`): each sub-group of ``U``
            consecutive ranks swaps sequence shards for head shards, and the pairs run across the sub-groups
            on blocks of ``U L`` tokens. ``U`` must divide the group size, ``heads`` and ``kv_heads``; ``U`` equal
            to the group size is all-to-all alone. The user's layout does not change.
        cu_seqlens: document boundaries over the whole (global) sequence, ``[0 = b_0 < b_1 < ... < b_m = N]``, as
            flash-attn's ``cu_seqlens``: a 1-D integer tensor (on the CPU or q's device) or sequence of ints shared
            by every batch row, or a list with one per row. No query attends across a boundary, and each document
            is segmented from its own start: its last segment may be shorter than ``w`` (a *tail*), which gives
            exactly what padding the document to a multiple of ``w`` with unseen keys would. Each document's rows
            are what it would get alone (packing invariance). ``None``: one document of length ``N``, which may
            be any length.

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
    size = 1 if pg is None else pg.size()
    batch, shard, heads, head_dim = q.shape
    check_ulysses_size(ulysses_size, size, heads, k.shape[2])
    check_pairs(segment_lengths, dilation_rates)  # before they become the cache key
    config = CallConfig(segment_lengths=tuple(segment_lengths), dilation_rates=tuple(dilation_rates), causal=causal,
                        head_mode=head_mode, comm=comm, backend=backend, scale=scale or 1.0 / math.sqrt(head_dim),
                        load_balance=load_balance, ulysses_size=ulysses_size, num_heads=heads, num_kv_heads=k.shape[2])
    device_type = q.device.type
    autocast = _has_autocast(device_type) and torch.is_autocast_enabled(device_type)
    if autocast and q.dtype == torch.float32:
        low = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(low), k.to(low), v.to(low)
    if torch.compiler.is_compiling():  # the same computation as custom ops: no graph break (ring_attention.ops)
        from ring_attention.ops import compiled_attention

        return compiled_attention(q, k, v, cu_seqlens, config, pg)
    rows = checked_documents(cu_seqlens, shard * size, batch, q.device, q, k, pg)
    if ulysses_size > 1:  # sequence shards -> head shards of the sub-group's U L tokens; pairs over the inter-group
        sub = ulysses_groups(pg, ulysses_size)[0]
        q, k, v = (AllToAll.apply(t, sub, True) for t in (q, k, v))  # [B, U L, H / U, D]
    parts = call_parts(q, rows, config, pg)
    q, k, v = (as_row_viewable(t) for t in (q, k, v))  # rows are read through strided views
    with _autocast_off(device_type):
        out = _DilatedAttention.apply(q, k, v, parts)
    return AllToAll.apply(out, sub, False) if ulysses_size > 1 else out  # this rank's rows, every head


def checked_documents(cu_seqlens, seq_len: int, batch: int, device, q, k, group) -> Boundaries | None:
    """``cu_seqlens`` as host boundaries (`check_cu_seqlens`), once the ranks of ``group`` agree on their shards and
    documents: a rank given bad boundaries, or other ones, raises a ``ValueError`` and so does every other rank."""
    rows, problem = None, None
    if cu_seqlens is not None:
        try:
            rows = check_cu_seqlens(cu_seqlens, seq_len, batch, device)
        except (ValueError, TypeError) as error:  # first tell the other ranks, which would wait for this one
            problem = error
    if group is not None and group.size() > 1:
        try:
            C.check_same_shards(q, k, group, -1 if problem is not None else documents_fingerprint(rows))
        except ValueError:
            if problem is None:
                raise
    if problem is not None:  # this rank's own reason, after the others learned that it has one
        raise problem
    return rows


@dataclass(frozen=True)
class CallConfig:
    """What a call computes, besides its tensors: the pairs, the heads (global counts) and how to run them."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    causal: bool
    head_mode: str
    comm: str
    backend: str
    scale: float
    load_balance: bool
    ulysses_size: int
    num_heads: int
    num_kv_heads: int


def call_parts(q: torch.Tensor, rows: Boundaries | None, config: CallConfig, group) -> list:
    """The parts of a call on this rank's ``q`` (after the all-to-all when ``ulysses_size > 1``), from the plan:
    the tiled layout's pairs, or the documents' pieces."""
    size = 1 if group is None else group.size()
    pairs_group, local_heads = group, range(config.num_heads)
    if config.ulysses_size > 1:
        sub, pairs_group = ulysses_groups(group, config.ulysses_size)
        part, per_part = dist.get_rank(sub), config.num_heads // config.ulysses_size
        local_heads = range(part * per_part, (part + 1) * per_part)
    pairs_size = size // config.ulysses_size
    seq_len = q.shape[1] * pairs_size
    pairs = config.segment_lengths, config.dilation_rates
    kernel = BlockKernel(config.causal, config.scale, select_backend(config.backend, q))
    pairs_rank = C.group_rank_and_size(pairs_group)[0]
    heads, kv_heads, mode = config.num_heads, config.num_kv_heads, config.head_mode
    if (rows is None or all(bounds == (0, seq_len) for bounds in rows)) and tiles_shards(seq_len, pairs_size, *pairs):
        layouts = _plan(seq_len, pairs_size, *pairs, heads, mode, kv_heads, q.device, local_heads)
        return tiled_parts(layouts, kernel, config.comm, pairs_group, pairs_rank, config.load_balance)
    plans = _document_plan(rows or ((0, seq_len),), seq_len, pairs_size, pairs_rank, *pairs, heads, mode, kv_heads,
                           q.shape[0], config.causal, q.device, local_heads, config.comm, config.load_balance)
    return [LocalPieces(plan, kernel) if isinstance(plan, LocalPlan) else SpanningStreams(plan, kernel, pairs_group)
            for plan in plans]
