"""Dense dilated attention with explicit masks: slow, obviously correct, the ground truth of every test.

Everything here materialises the full ``[N, N]`` score matrix, so keep sizes small and use float64.
The definition (LongNet, Ding et al. 2023, §2.2-§2.4) is on the Concepts page (`docs/concepts.md`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ring_attention.validation import (
    CuSeqlens,
    check_cu_seqlens,
    check_head_mode,
    check_pairs,
    check_qkv,
    warn_uncovered,
)


def _lse_and_weights(scores: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp along ``dim`` and ``exp(scores - lse)``, with -inf (not NaN) where every entry is -inf.

    The ``where`` calls pick safe stand-ins *before* ``log`` and ``exp`` run, so that rows with nothing to
    sum give finite values (and zero, not NaN, gradients) in both passes.
    """
    peak = scores.amax(dim=dim, keepdim=True)
    empty = peak == -math.inf
    peak = torch.where(empty, torch.zeros_like(peak), peak)
    weights = torch.exp(scores - peak)
    total = weights.sum(dim=dim, keepdim=True)
    safe_total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, -math.inf), peak + torch.log(safe_total))
    return lse.squeeze(dim), weights / safe_total


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention on ``[B, N, H, D]`` tensors with an optional boolean mask.

    Args:
        q: queries ``[batch, seq, heads, head_dim]``.
        k: keys, same shape.
        v: values, same shape.
        mask: boolean, broadcastable to ``[B, H, N_q, N_k]``; ``True`` means "may attend".
        causal: also forbid keys after the query.
        return_lse: also return the log-sum-exp of the scores, ``[B, N, H]`` (``-inf`` for a query
            with no allowed key, whose output is 0).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, Nq, Nk]
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, -math.inf)
    lse, probs = _lse_and_weights(scores, dim=-1)  # [B, H, Nq], [B, H, Nq, Nk]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return (out, lse.transpose(1, 2)) if return_lse else out


def head_groups(num_heads: int, num_pairs: int) -> list[range]:
    """Contiguous head groups for ``head_mode="groups"``; the first ``num_heads % num_pairs`` get one extra."""
    size, extra = divmod(num_heads, num_pairs)
    groups, start = [], 0
    for i in range(num_pairs):
        end = start + size + (1 if i < extra else 0)
        groups.append(range(start, end))
        start = end
    return groups


def dilation_mask(
    seq_len: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    num_heads: int,
    *,
    causal: bool = False,
    head_mode: str = "all",
    num_kv_heads: int | None = None,
    cu_seqlens: Sequence[int] | None = None,
) -> torch.Tensor:
    """Which keys each query sees, per pair: a boolean ``[num_pairs, H, N, N]`` tensor.

    ``mask[i, h, a, b]`` is ``True`` when pair ``i`` lets query ``a`` of head ``h`` attend key ``b``. The sequence
    is cut into documents at ``cu_seqlens`` (one document of length ``N`` by default), and each document into
    segments of length ``w_i`` counted from its own start (the last one, the *tail*, may be shorter; a segment
    longer than the document is the whole document). ``a`` and ``b`` must lie in the same segment of the same
    document, both at a position ``t`` (counted from the segment start) with ``t % r_i == o``, the head takes pair
    ``i``, and (causal) ``b <= a``. The offset ``o`` is that of the head's kv head,
    ``(h // (num_heads / num_kv_heads)) % r_i`` (grouped-query attention), which is ``h % r_i`` without it. The
    combined ``[H, N, N]`` pattern of all pairs is ``mask.any(0)``; ``mask.sum(0)`` counts the pairs holding each
    (query, key) couple, which is how much that key weighs in the merged softmax.
    """
    check_pairs(segment_lengths, dilation_rates)
    check_head_mode(head_mode, num_heads, len(segment_lengths))
    (bounds,) = check_cu_seqlens([0, seq_len] if cu_seqlens is None else cu_seqlens, seq_len, 1)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    heads_per_kv = num_heads // num_kv_heads
    num_pairs = len(segment_lengths)
    heads_of_pair = [range(num_heads)] * num_pairs if head_mode == "all" else head_groups(num_heads, num_pairs)
    pos = torch.arange(seq_len)
    document = torch.bucketize(pos, torch.tensor(bounds[1:]), right=True)  # [N]: which document holds each token
    in_document = pos - torch.tensor(bounds)[document]  # [N]: position counted from the document's start
    masks = torch.zeros(num_pairs, num_heads, seq_len, seq_len, dtype=torch.bool)
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        segment = document * seq_len + in_document // w  # [N]: a segment id, unique over documents
        same_segment = segment[:, None] == segment[None, :]
        for h in heads_of_pair[i]:
            selected = (in_document % w) % r == (h // heads_per_kv) % r
            masks[i, h] = same_segment & selected[:, None] & selected[None, :]
    if causal:
        masks &= torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return masks


def merge_partials(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention partials over disjoint key sets by their softmax denominators.

    ``outs[i]`` is ``[..., D]`` and ``lses[i]`` is ``[...]``. The result is the attention over the union of
    the key sets: ``lse = logsumexp_i lse_i`` and ``out = sum_i exp(lse_i - lse) * out_i``. The merge is
    associative and commutative; a row with ``lse = -inf`` everywhere gives ``out = 0``.
    """
    lse_stack = torch.stack(list(lses))  # [K, ...]
    out_stack = torch.stack(list(outs))  # [K, ..., D]
    lse, weights = _lse_and_weights(lse_stack, dim=0)
    return (weights.unsqueeze(-1) * out_stack).sum(0), lse


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    head_mode: str = "all",
    cu_seqlens: CuSeqlens | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LongNet dilated attention, dense: one masked attention per pair, merged by log-sum-exp (Eq. 10).

    Args:
        q: queries ``[batch, seq, heads, head_dim]``.
        k: keys ``[batch, seq, kv_heads, head_dim]``, same dtype and device as ``q``; ``kv_heads`` divides
            ``heads`` (grouped-query attention: query head ``h`` uses kv head ``h // (heads / kv_heads)``,
            whose offset sets the positions both keep).
        v: values, shaped like ``k``.
        segment_lengths: the segment length ``w_i`` of each pair.
        dilation_rates: the dilation rate ``r_i`` of each pair.
        causal: a query attends only to keys at or before its position.
        head_mode: ``"all"`` (every head takes every pair) or ``"groups"`` (head group i takes pair i).
        cu_seqlens: document boundaries ``[0, ..., N]`` shared by every row, or a list with one per row (see
            `dilation_mask`); ``None`` is one document of length ``N``. Any ``N`` works: a document's last segment
            may be shorter than ``w_i``.
        return_lse: also return the merged log-sum-exp ``[B, N, H]``.
    """
    check_qkv(q, k, v, allow_gqa=True)
    check_pairs(segment_lengths, dilation_rates)
    warn_uncovered(dilation_rates)
    batch, seq_len, heads, kv_heads = *q.shape[:3], k.shape[2]
    rows = check_cu_seqlens([0, seq_len] if cu_seqlens is None else cu_seqlens, seq_len, batch, q.device)
    masks = torch.stack([dilation_mask(seq_len, segment_lengths, dilation_rates, heads, causal=causal,
                                       head_mode=head_mode, num_kv_heads=kv_heads, cu_seqlens=bounds)
                         for bounds in rows], dim=1).to(q.device)  # [pairs, 1 or B, H, N, N]
    k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))  # kv head j serves query heads j*g ...
    partials = [attention(q, k, v, mask, return_lse=True) for mask in masks]
    out, lse = merge_partials([o for o, _ in partials], [s for _, s in partials])
    return (out, lse) if return_lse else out
