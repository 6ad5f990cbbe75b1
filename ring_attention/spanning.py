"""Pairs whose segments span ranks: the ring and the all-gather, forward and backward.

A spanning pair's kept rows are gathered into dense blocks first (``[B, n, h, D]``, ``n = L / r`` rows per head
on every rank of the segment group): they are what travels. ``comm="ring"`` rotates the key/value blocks around
the segment group with point-to-point messages, each step's transfer posted before the current block is
computed; its backward sends the dk/dv accumulators home around the same ring (lesson 4). ``comm="allgather"``
gathers the group's blocks in one collective (LongNet's algorithm, lesson 3); its backward gathers them again
and reduce-scatters dk/dv to their owners.
"""

from __future__ import annotations

import math

import torch

from ring_attention import comm as C
from ring_attention.kernels import block_attention, block_attention_backward, lse_dtype
from ring_attention.pattern import PairLayout, Selection


class Attend:
    """How one block is computed: the kernel backend, the scale, causality, and grouped-query heads."""

    def __init__(self, causal: bool, scale: float, backend: str):
        self.causal, self.scale, self.backend = causal, scale, backend

    def forward(self, q, k, v, sel: Selection, diagonal: bool):
        out, lse = block_attention(q, expand_kv(k, sel), expand_kv(v, sel), causal=self.causal and diagonal,
                                   scale=self.scale, backend=self.backend)
        return out.to(lse.dtype), lse

    def backward(self, dout, q, k, v, out, lse, sel: Selection, diagonal: bool):
        dq, dk, dv = block_attention_backward(dout, q, expand_kv(k, sel), expand_kv(v, sel), out, lse,
                                              causal=self.causal and diagonal, scale=self.scale, backend=self.backend)
        return dq, reduce_kv(dk, sel), reduce_kv(dv, sel)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Attention over key sets A and B merged into attention over A ∪ B (``lse = -inf``: no key yet)."""
    peak = torch.maximum(lse_a, lse_b)
    empty = peak == -math.inf
    peak = torch.where(empty, torch.zeros_like(peak), peak)
    weight_a, weight_b = torch.exp(lse_a - peak), torch.exp(lse_b - peak)
    total = torch.where(empty, torch.ones_like(peak), weight_a + weight_b)
    out = (weight_a.unsqueeze(-1) * out_a + weight_b.unsqueeze(-1) * out_b) / total.unsqueeze(-1)
    return out, torch.where(empty, torch.full_like(peak, -math.inf), peak + torch.log(total))


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


def spanning_forward(attend: Attend, comm_mode: str, group, rank: int, q, k, v, layout: PairLayout, sel: Selection):
    """This rank's ``(out, lse)`` for a spanning pair: its rows ``q`` against the whole segment's keys."""
    me, size = rank % layout.group_size, layout.group_size
    out = lse = None

    def fold(o, s):
        nonlocal out, lse
        out, lse = (o, s) if out is None else merge_partials(out, lse, o, s)

    if comm_mode == "allgather":
        blocks = C.all_gather_blocks(torch.stack([k, v]), C.segment_process_group(layout, rank, group))
        for j in range(me + 1) if attend.causal else range(size):  # later ranks' keys are the future
            fold(*attend.forward(q, blocks[j, 0], blocks[j, 1], sel, diagonal=j == me))
        return out, lse
    send_to, recv_from = _ring_neighbours(layout, rank)
    held = [k, v]
    for step in range(size):
        pending = C.start_exchange(held, send_to, recv_from, group) if step < size - 1 else None
        source = (me - step) % size
        if not (attend.causal and source > me):
            fold(*attend.forward(q, *held, sel, diagonal=source == me))
        if pending is not None:
            held = C.finish_exchange(pending)
    return out, lse


def spanning_backward(attend: Attend, comm_mode: str, group, rank: int, dout, q, k, v, out, lse, layout: PairLayout,
                      sel: Selection):
    """dq of this rank's rows, and dk, dv of its own keys with every rank's contribution added."""
    me, size = rank % layout.group_size, layout.group_size
    acc = lse_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    if comm_mode == "allgather":
        segment_group = C.segment_process_group(layout, rank, group)
        blocks = C.all_gather_blocks(torch.stack([k, v]), segment_group)  # gathered again, not kept from forward
        dkv = torch.zeros(blocks.shape, dtype=acc, device=q.device)  # [G, 2, B, n, h_kv, D]
        for j in range(me + 1) if attend.causal else range(size):
            dq_b, dk_b, dv_b = attend.backward(dout, q, blocks[j, 0], blocks[j, 1], out, lse, sel, diagonal=j == me)
            dq += dq_b
            dkv[j, 0] += dk_b
            dkv[j, 1] += dv_b
        mine = C.reduce_scatter_blocks(dkv, segment_group)
        return dq, mine[0], mine[1]
    send_to, recv_from = _ring_neighbours(layout, rank)
    held = [k, v]
    dkv = [torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2)]  # travel with the keys
    for step in range(size):
        pending = C.start_exchange(held, send_to, recv_from, group) if step < size - 1 else None
        source = (me - step) % size
        if not (attend.causal and source > me):
            dq_b, dk_b, dv_b = attend.backward(dout, q, *held, out, lse, sel, diagonal=source == me)
            dq += dq_b
            dkv[0] += dk_b
            dkv[1] += dv_b
        if pending is not None:
            held = C.finish_exchange(pending)
        dkv = C.finish_exchange(C.start_exchange(dkv, send_to, recv_from, group))  # the last one: home
    return dq, dkv[0], dkv[1]
