"""Stage 3 — the collective: LongNet's all-gather of the dilated keys/values (Ding et al. 2023, §3.1).

What changes from stage 2: instead of passing key blocks around the ring ``G - 1`` times, every rank of a
segment group gathers *all* the group's dilated keys/values with one ``all_gather`` per pair, then
attends its own dilated queries to them. Same bytes on the wire per rank, ``(G - 1) L / r`` tokens, but in
one collective instead of ``G - 1`` steps, and the rank now holds the gathered ``w / r`` tokens at once
(constant when ``w / r`` is constant, the paper's argument for its pair choice).

Gradients: the all-gather is a small ``torch.autograd.Function`` (`AllGather`) whose backward is a
``reduce_scatter``: the gradient of the gathered buffer holds, on every rank, a piece for each owner, and
each owner receives the sum of its pieces. Everything else is plain autograd, as in stage 1, so this
stage needs no hand-written attention backward. The gathers run on one process group per segment group,
created once (``dist.new_group`` is collective: every rank creates every group, in the same order) and
cached.
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
from ring_attention.pattern import PairLayout, gather_rows, plan_pairs
from ring_attention.validation import check_qkv

# global ranks of a segment group -> its process group, shared by every call in this process
SEGMENT_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def segment_process_group(layout: PairLayout, rank: int, group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The process group of ``rank``'s segment group; on first use, every segment group of the pair is made."""
    group = group or dist.group.WORLD
    world_size = dist.get_world_size(group)
    for first in range(0, world_size, layout.group_size):
        members = tuple(dist.get_global_rank(group, r) for r in range(first, first + layout.group_size))
        if members not in SEGMENT_GROUPS:
            SEGMENT_GROUPS[members] = dist.new_group(list(members))
    return SEGMENT_GROUPS[tuple(dist.get_global_rank(group, r) for r in layout.segment_group(rank))]


class AllGather(torch.autograd.Function):
    """``[...]`` on each of ``G`` ranks -> ``[G, ...]`` on all of them; backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        blocks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(blocks, x.contiguous(), group=group)
        return torch.stack(blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # contiguous first: gloo's collectives read raw memory, a strided gradient would be misread
        pieces = list(grad.contiguous().unbind(0))
        mine = torch.empty_like(pieces[0])
        dist.reduce_scatter(mine, pieces, group=ctx.group)
        return mine, None


def attend_gathered(q_dil, kv_blocks, me, *, causal, scale):
    """Rank ``me``'s dilated queries against the gathered blocks ``[G, 2, B, n, h, D]`` of its group."""
    visible = range(me + 1) if causal else range(kv_blocks.shape[0])  # later ranks' keys are the future
    out = lse = None
    for j in visible:
        o, s = block_attention(q_dil, kv_blocks[j, 0], kv_blocks[j, 1], causal=causal and j == me, scale=scale)
        out, lse = (o, s) if out is None else merge_partials(out, lse, o, s)
    return out, lse


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
    """Stage 2's signature and result, computed with one differentiable all-gather per spanning pair.

    ``group`` must contain every rank of the world: the segment groups are created with
    ``dist.new_group``, which every rank of the world has to call.
    """
    check_qkv(q, k, v)
    world_size = dist.get_world_size(group)
    if world_size != dist.get_world_size():
        raise ValueError(
            f"group has {world_size} of the world's {dist.get_world_size()} ranks: stage 3 creates its segment "
            f"groups with dist.new_group, which every rank must call; pass group=None (the world)"
        )
    check_same_shards(q, k, group or dist.group.WORLD)
    rank = dist.get_rank(group)
    batch, shard, heads, head_dim = q.shape
    layouts = plan_pairs(
        shard * world_size, world_size, segment_lengths, dilation_rates, heads, head_mode, device=q.device
    )
    scale = 1.0 / math.sqrt(head_dim)
    acc = accumulation_dtype(q.dtype)
    out = q.new_zeros(batch, shard, heads, head_dim, dtype=acc)  # [B, L, H, D]
    lse = q.new_full((batch, shard, heads), -math.inf, dtype=acc)  # [B, L, H]
    for layout in layouts:
        for sel in pair_selections(layout, q.device):
            q_dil = gather_rows(q, layout.piece_length, sel.q_positions, sel.q_heads)  # [B * pieces, n, h, D]
            k_dil, v_dil = (gather_rows(t, layout.piece_length, sel.kv_positions, sel.kv_heads) for t in (k, v))
            if layout.spans_ranks:
                kv_blocks = AllGather.apply(torch.stack([k_dil, v_dil]), segment_process_group(layout, rank, group))
                o, s = attend_gathered(q_dil, kv_blocks, rank % layout.group_size, causal=causal, scale=scale)
            else:
                o, s = block_attention(q_dil, k_dil, v_dil, causal=causal, scale=scale)
            merge_rows(out, lse, layout.piece_length, sel.q_positions, sel.q_heads, o, s)
    return out.to(q.dtype)
