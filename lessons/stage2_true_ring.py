"""Stage 2 — the true ring: real processes, point-to-point K/V rotation, and a ring backward.

What changes from stage 1: the ``world_size`` virtual ranks become processes (``torch.distributed``;
gloo on the CPU). Each process holds only its own ``[B, L, H, D]`` shard and returns its own rows. The
list rotation of `lessons.stage1_simulated_ring.ring_pass` becomes `exchange`, a
``batch_isend_irecv`` that sends the held dilated keys/values to the next rank of the segment group and
receives the previous rank's. The block math and the merge are stage 1's, unchanged.

What is new is the backward. Autograd cannot see through ``isend``/``irecv``, so the whole operator is a
custom ``torch.autograd.Function``. Its forward saves only the local shards, the output and the
log-sum-exp (LSE). Its backward recomputes each block's probabilities from the *global* LSE of the row,
``P = exp(S - lse)``, which is the block's exact share of the full softmax, so each block yields its
exact piece of dq, dk and dv (`block_attention_backward`). dq stays home; the dk/dv of a key block
belong to the rank that owns those keys, so they travel around the ring with the keys and take one last
hop home (Liu et al. 2023, "Ring Attention with Blockwise Transformers").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from lessons.stage1_simulated_ring import (
    accumulation_dtype,
    block_attention,
    merge_partials,
    merge_rows,
    pair_selections,
)
from ring_attention.comm import check_same_shards
from ring_attention.pattern import PairLayout, accumulate_rows, gather_rows, plan_pairs
from ring_attention.validation import check_qkv


def exchange(
    tensors: Sequence[torch.Tensor], send_to: int, recv_from: int, group: dist.ProcessGroup | None
) -> list[torch.Tensor]:
    """Send ``tensors`` to group rank ``send_to`` and receive same-shaped ones from ``recv_from``."""
    group = group or dist.group.WORLD
    outgoing = [t.contiguous() for t in tensors]
    incoming = [torch.empty_like(t) for t in outgoing]
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, send_to), group) for t in outgoing]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, recv_from), group) for t in incoming]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return incoming


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block, given the row's *global* ``out`` ``[B, Lq, h, D]`` and ``lse`` ``[B, Lq, h]``.

    With ``P = exp(S - lse)`` the block's share of the softmax and ``delta = rowsum(dout * out)``:
    ``dV = P^T dout``, ``dS = P * (dout V^T - delta)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``.
    """
    acc = accumulation_dtype(q.dtype)
    q, k, v, dout, out = (t.to(acc) for t in (q, k, v, dout, out))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, h, Lq, Lk]
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, -math.inf)
    probs = torch.exp(scores - lse.transpose(1, 2).unsqueeze(-1).to(acc))
    delta = (dout * out).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, h, Lq, 1]
    dscores = probs * (torch.einsum("bqhd,bkhd->bhqk", dout, v) - delta)
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q) * scale
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout)
    return dq, dk, dv


def ring_neighbours(layout: PairLayout, rank: int) -> tuple[int, int, int]:
    """``rank``'s index in its segment group, the rank it sends to and the rank it receives from."""
    members = layout.segment_group(rank)
    me = members.index(rank)
    return me, members[(me + 1) % len(members)], members[(me - 1) % len(members)]


def ring_forward(q_dil, k_dil, v_dil, layout, rank, *, causal, scale, group):
    """This rank's ``(out, lse)`` for one spanning pair: its dilated queries against the group's keys."""
    me, send_to, recv_from = ring_neighbours(layout, rank)
    held = [k_dil, v_dil]
    out = lse = None
    for step in range(layout.group_size):
        source = (me - step) % layout.group_size
        if not (causal and source > me):
            o, s = block_attention(q_dil, *held, causal=causal and source == me, scale=scale)
            out, lse = (o, s) if out is None else merge_partials(out, lse, o, s)
        if step < layout.group_size - 1:
            held = exchange(held, send_to, recv_from, group)
    return out, lse


def ring_backward(dout_dil, q_dil, k_dil, v_dil, out_dil, lse_dil, layout, rank, *, causal, scale, group):
    """dq of this rank's dilated rows, and dk/dv of its own keys after they have travelled the ring."""
    me, send_to, recv_from = ring_neighbours(layout, rank)
    acc = accumulation_dtype(q_dil.dtype)
    held = [k_dil, v_dil]
    dq = torch.zeros_like(q_dil, dtype=acc)
    dkv = [torch.zeros_like(k_dil, dtype=acc), torch.zeros_like(v_dil, dtype=acc)]  # travel with the keys
    for step in range(layout.group_size):
        source = (me - step) % layout.group_size
        if not (causal and source > me):
            dq_b, dk_b, dv_b = block_attention_backward(
                dout_dil, q_dil, *held, out_dil, lse_dil, causal=causal and source == me, scale=scale
            )
            dq += dq_b
            dkv[0] += dk_b
            dkv[1] += dv_b
        if step < layout.group_size - 1:
            *held, dk, dv = exchange([*held, *dkv], send_to, recv_from, group)
            dkv = [dk, dv]
        else:
            dkv = exchange(dkv, send_to, recv_from, group)  # the last hop brings them home
    return dq, dkv[0], dkv[1]


class _RingDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layouts, causal, scale, group):
        rank = dist.get_rank(group)
        batch, shard, heads, head_dim = q.shape
        acc = accumulation_dtype(q.dtype)
        out = q.new_zeros(batch, shard, heads, head_dim, dtype=acc)  # [B, L, H, D]
        lse = q.new_full((batch, shard, heads), -math.inf, dtype=acc)  # [B, L, H]
        for layout in layouts:
            for sel in pair_selections(layout, q.device):
                q_dil = gather_rows(q, layout.piece_length, sel.q_positions, sel.q_heads)  # [B * pieces, n, h, D]
                k_dil, v_dil = (gather_rows(t, layout.piece_length, sel.kv_positions, sel.kv_heads) for t in (k, v))
                if layout.spans_ranks:
                    o, s = ring_forward(q_dil, k_dil, v_dil, layout, rank, causal=causal, scale=scale, group=group)
                else:
                    o, s = block_attention(q_dil, k_dil, v_dil, causal=causal, scale=scale)
                merge_rows(out, lse, layout.piece_length, sel.q_positions, sel.q_heads, o, s)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layouts, ctx.causal, ctx.scale, ctx.group = layouts, causal, scale, group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        rank = dist.get_rank(ctx.group)
        acc = accumulation_dtype(q.dtype)
        dq, dk, dv = (torch.zeros_like(t, dtype=acc) for t in (q, k, v))
        for layout in ctx.layouts:
            for sel in pair_selections(layout, q.device):
                dout_dil, q_dil, out_dil, lse_dil = (
                    gather_rows(t, layout.piece_length, sel.q_positions, sel.q_heads) for t in (dout, q, out, lse)
                )
                k_dil, v_dil = (gather_rows(t, layout.piece_length, sel.kv_positions, sel.kv_heads) for t in (k, v))
                kw = dict(causal=ctx.causal, scale=ctx.scale)
                if layout.spans_ranks:
                    grads = ring_backward(
                        dout_dil, q_dil, k_dil, v_dil, out_dil, lse_dil, layout, rank, group=ctx.group, **kw
                    )
                else:
                    grads = block_attention_backward(dout_dil, q_dil, k_dil, v_dil, out_dil, lse_dil, **kw)
                accumulate_rows(dq, layout.piece_length, sel.q_positions, sel.q_heads, grads[0])
                accumulate_rows(dk, layout.piece_length, sel.kv_positions, sel.kv_heads, grads[1])
                accumulate_rows(dv, layout.piece_length, sel.kv_positions, sel.kv_heads, grads[2])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


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
) -> torch.Tensor:
    """Dilated attention of this rank's ``[B, L, H, D]`` shard; returns this rank's ``[B, L, H, D]`` rows.

    Call it on every rank of ``group`` (default: the world) with the rank's contiguous shard of the
    sequence (rank ``p`` holds tokens ``p*L .. (p+1)*L - 1``). Pairs whose segments span ranks rotate
    their dilated keys/values around each segment group; the backward sends dk/dv home the same way.
    """
    check_qkv(q, k, v)
    check_same_shards(q, k, group or dist.group.WORLD)  # fail on every rank rather than hang in a receive
    world_size = dist.get_world_size(group)
    batch, shard, heads, head_dim = q.shape
    layouts = plan_pairs(
        shard * world_size, world_size, segment_lengths, dilation_rates, heads, head_mode, device=q.device
    )
    return _RingDilatedAttention.apply(q, k, v, layouts, causal, 1.0 / math.sqrt(head_dim), group)
