"""Pairs whose segments span ranks: the ring and the all-gather, forward and backward, balanced or not.

A spanning pair's kept rows are gathered into dense blocks first (``[B, n, h, D]``, ``n = L / r`` rows per head
on every rank of the segment group): they are what travels. ``comm="ring"`` rotates the key/value blocks around
the segment group with point-to-point messages, each step's transfer posted before the current block is
computed; its backward sends the dk/dv accumulators home around the same ring (lesson 4). ``comm="allgather"``
gathers the group's blocks in one collective (LongNet's algorithm, lesson 3); its backward gathers them again
and reduce-scatters dk/dv to their owners. Which blocks a rank computes is `ring_attention.balance`'s schedule:
with causal load balance the rows are re-laid in zigzag order first, and laid back at the end.
"""

from __future__ import annotations

import math

import torch

from ring_attention import comm as C
from ring_attention.balance import balanced, gathered_blocks, relayout, ring_blocks
from ring_attention.kernels import block_attention, block_attention_backward, lse_dtype
from ring_attention.pattern import PairLayout, Selection


class Attend:
    """How one block is computed: the kernel backend, the scale, causality, and grouped-query heads."""

    def __init__(self, causal: bool, scale: float, backend: str):
        self.causal, self.scale, self.backend = causal, scale, backend

    def forward(self, q, k, v, sel: Selection, diagonal: bool):
        out, lse = block_attention(q, expand_kv(k, sel), expand_kv(v, sel), causal=diagonal, scale=self.scale,
                                   backend=self.backend)
        return out.to(lse.dtype), lse

    def backward(self, dout, q, k, v, out, lse, sel: Selection, diagonal: bool):
        dq, dk, dv = block_attention_backward(dout, q, expand_kv(k, sel), expand_kv(v, sel), out, lse,
                                              causal=diagonal, scale=self.scale, backend=self.backend)
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


def merge_into(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, s: torch.Tensor) -> None:
    """Merge a partial ``(o, s)`` into the running ``(out, lse)`` in place (views of the accumulators).

    The online softmax merge of `merge_partials`, without its guards: a kernel's ``s`` is finite (every
    kept query sees at least itself), so ``logaddexp`` and the weights never meet ``-inf - -inf``.
    """
    merged = torch.logaddexp(lse, s)
    out.mul_(torch.exp(lse - merged).unsqueeze(-1)).add_(torch.exp(s - merged).unsqueeze(-1) * o)
    lse.copy_(merged)


def expand_kv(x: torch.Tensor, sel: Selection) -> torch.Tensor:
    """kv heads ``[B, n, h_kv, D]`` -> one per query head ``[B, n, h, D]`` (grouped-query attention)."""
    return x if sel.kv_heads.numel() == sel.q_heads.numel() else x.index_select(2, sel.kv_index)


def reduce_kv(grad: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Gradient per query head -> per kv head: the query heads sharing a kv head add up."""
    if sel.kv_heads.numel() == sel.q_heads.numel():
        return grad
    shape = (*grad.shape[:2], sel.kv_heads.numel(), grad.shape[3])
    return grad.new_zeros(shape).index_add_(2, sel.kv_index, grad)


class SpanningPair:
    """One spanning pair on one rank: its segment group, its schedule, and its communication."""

    def __init__(self, attend: Attend, comm_mode: str, group, rank: int, layout: PairLayout, sel: Selection,
                 load_balance: bool):
        self.attend, self.comm_mode, self.group, self.layout, self.sel = attend, comm_mode, group, layout, sel
        self.members = layout.segment_group(rank)
        self.me, self.size = self.members.index(rank), layout.group_size
        self.balance = balanced(layout, attend.causal, load_balance)

    def _neighbours(self) -> tuple[int, int]:
        return self.members[(self.me + 1) % self.size], self.members[(self.me - 1) % self.size]

    def _relayout(self, tensors, to_zigzag: bool):
        return relayout(tensors, self.members, self.me, self.group, to_zigzag) if self.balance else list(tensors)

    def _gather(self, k, v):
        """Every rank's keys and values, in rank order: ``[B, G n, h_kv, D]`` each."""
        blocks = C.all_gather_blocks(torch.stack([k, v]), C.segment_process_group(self.layout, self.members[self.me],
                                                                                  self.group))
        return [blocks[:, i].movedim(0, 1).flatten(1, 2) for i in (0, 1)]  # [G, B, n, ...] -> [B, G n, ...]

    def forward(self, q, k, v):
        """This rank's ``(out, lse)``: its rows ``q`` ``[B, n, h, D]`` against the whole segment's keys."""
        gather = self.comm_mode == "allgather"  # then the keys are gathered in sequence order, not re-laid
        q, k, v = self._relayout([q], to_zigzag=True) + [k, v] if gather else self._relayout([q, k, v], True)
        rows, acc = q.shape[1], lse_dtype(q.dtype)
        out = q.new_zeros(q.shape, dtype=acc)
        lse = q.new_full(q.shape[:3], -math.inf, dtype=acc)

        def compute(blocks, keys, values):
            for b in blocks:
                o, s = self.attend.forward(q[:, b.q], keys[:, b.k], values[:, b.k], self.sel, b.causal)
                merge_into(out[:, b.q], lse[:, b.q], o, s)

        causal = self.attend.causal
        if gather:
            compute(gathered_blocks(self.me, self.size, rows, causal, self.balance), *self._gather(k, v))
        else:
            send_to, recv_from = self._neighbours()
            held = [k, v]
            for step in range(self.size):
                pending = C.start_exchange(held, send_to, recv_from, self.group) if step < self.size - 1 else None
                compute(ring_blocks(self.me, self.size, step, rows, causal, self.balance), *held)
                if pending is not None:
                    held = C.finish_exchange(pending)
        return self._relayout([out, lse], to_zigzag=False)

    def backward(self, dout, q, k, v, out, lse):
        """dq of this rank's rows, and dk, dv of its own keys with every rank's contribution added."""
        gather = self.comm_mode == "allgather"
        dout, q, out, lse = self._relayout([dout, q, out, lse], to_zigzag=True)
        if not gather:
            k, v = self._relayout([k, v], to_zigzag=True)
        rows, acc = q.shape[1], lse_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)

        def compute(blocks, keys, values, dk, dv):
            for b in blocks:
                grads = self.attend.backward(dout[:, b.q], q[:, b.q], keys[:, b.k], values[:, b.k], out[:, b.q],
                                             lse[:, b.q], self.sel, b.causal)
                dq[:, b.q] += grads[0]
                dk[:, b.k] += grads[1]
                dv[:, b.k] += grads[2]

        causal = self.attend.causal
        if gather:
            keys, values = self._gather(k, v)  # gathered again, not kept from the forward
            dkv = torch.zeros((2, *keys.shape), dtype=acc, device=q.device)  # [2, B, G n, h_kv, D]
            compute(gathered_blocks(self.me, self.size, rows, causal, self.balance), keys, values, dkv[0], dkv[1])
            blocks = dkv.unflatten(2, (self.size, rows)).movedim(2, 0)  # [G, 2, B, n, h_kv, D]: one per owner
            mine = C.reduce_scatter_blocks(blocks, C.segment_process_group(self.layout, self.members[self.me],
                                                                           self.group))
            return [*self._relayout([dq], to_zigzag=False), mine[0], mine[1]]  # dk, dv come home in sequence order
        send_to, recv_from = self._neighbours()
        held = [k, v]
        dkv = [torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2)]  # travel with the keys
        for step in range(self.size):
            pending = C.start_exchange(held, send_to, recv_from, self.group) if step < self.size - 1 else None
            compute(ring_blocks(self.me, self.size, step, rows, causal, self.balance), *held, *dkv)
            if pending is not None:
                held = C.finish_exchange(pending)
            dkv = C.finish_exchange(C.start_exchange(dkv, send_to, recv_from, self.group))  # the last one: home
        return self._relayout([dq, *dkv], to_zigzag=False)
