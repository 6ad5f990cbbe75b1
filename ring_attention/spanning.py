"""Pairs whose segments span ranks: the ring and the all-gather, forward and backward, balanced or not.

A spanning pair's kept rows are gathered into dense blocks first (``[B, n, h, D]``, ``n = L / r`` rows per head on
every rank of the segment group): they are what travels. ``comm="ring"`` rotates the key/value blocks around the
segment group with point-to-point messages, each step's transfer posted before the current block is computed; its
backward rotates them again with the dk/dv accumulators, which take one last hop home (lesson 4). One driver,
`SpanningPair.ring`, runs both passes. ``comm="allgather"`` gathers the group's blocks in one collective (LongNet's
algorithm, lesson 3); its backward gathers them again and reduce-scatters dk/dv to their owners. Which blocks a rank
computes is `ring_attention.balance`'s schedule: with causal load balance the rows are re-laid in zigzag order
first, and laid back at the end; the re-laid q (and k, v for the ring) are kept for the backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ring_attention import comm as C
from ring_attention.balance import Block, balanced, gathered_blocks, relayout, ring_blocks
from ring_attention.kernels import block_attention, block_attention_backward, lse_dtype
from ring_attention.merge import expand_kv, merge_into, reduce_kv
from ring_attention.pattern import PairLayout, Selection


class BlockKernel:
    """How one block is computed: the kernel backend, the scale, and causality of the whole call."""

    def __init__(self, causal: bool, scale: float, backend: str):
        self.causal, self.scale, self.backend = causal, scale, backend

    def forward(self, q, k, v, sel: Selection, diagonal: bool):
        """``(out, lse)`` of query rows ``q`` ``[B, n, h, D]`` against kv rows ``[B, m, h_kv, D]``, both float32
        (float64 for float64 input)."""
        out, lse = block_attention(q, expand_kv(k, sel), expand_kv(v, sel), causal=diagonal, scale=self.scale,
                                   backend=self.backend)
        return out.to(lse.dtype), lse

    def backward(self, dout, q, k, v, out, lse, sel: Selection, diagonal: bool):
        """dq, and dk, dv per kv head, of one block given the rows' global ``out`` and ``lse``."""
        dq, dk, dv = block_attention_backward(dout, q, expand_kv(k, sel), expand_kv(v, sel), out, lse,
                                              causal=diagonal, scale=self.scale, backend=self.backend)
        return dq, reduce_kv(dk, sel), reduce_kv(dv, sel)


class SpanningPair:
    """One spanning pair on one rank: its segment group, its schedule, and its communication."""

    def __init__(self, kernel: BlockKernel, comm_mode: str, group, rank: int, layout: PairLayout, load_balance: bool):
        self.kernel, self.comm_mode, self.group, self.layout = kernel, comm_mode, group, layout
        self.sel = layout.span_rows
        self.members = layout.segment_group(rank)
        self.me, self.size = self.members.index(rank), layout.group_size
        self.balance = balanced(layout, kernel.causal, load_balance)
        self.gather = comm_mode == "allgather"  # then the keys are gathered in sequence order, never re-laid

    def _relayout(self, tensors: list[torch.Tensor], to_zigzag: bool) -> list[torch.Tensor]:
        return relayout(tensors, self.members, self.me, self.group, to_zigzag) if self.balance else tensors

    def _blocks(self, step: int, rows: int) -> list[Block]:
        if self.gather:
            return gathered_blocks(self.me, self.size, rows, self.kernel.causal, self.balance)
        return ring_blocks(self.me, self.size, step, rows, self.kernel.causal, self.balance)

    def _gathered(self, k, v) -> list[torch.Tensor]:
        """Every rank's keys and values, in rank order: ``[B, G n, h_kv, D]`` each."""
        group = C.segment_process_group(self.layout, self.members[self.me], self.group)
        blocks = C.all_gather_blocks(torch.stack([k, v]), group)  # [G, 2, B, n, h_kv, D]
        return [blocks[:, i].movedim(0, 1).flatten(1, 2) for i in (0, 1)]

    def ring(self, travelling: list[torch.Tensor], compute: Callable, accumulators: list | None = None):
        """Rotate ``travelling`` around the segment group: at step ``s`` this rank holds rank ``me - s``'s tensors
        and calls ``compute(s, *travelling, *accumulators)``; the next step's transfer is posted before it computes.
        ``accumulators`` travel after each computation, one hop per step, so the last hop brings them home."""
        send_to, recv_from = self.members[(self.me + 1) % self.size], self.members[(self.me - 1) % self.size]
        for step in range(self.size):
            pending = C.start_exchange(travelling, send_to, recv_from, self.group) if step < self.size - 1 else None
            compute(step, *travelling, *(accumulators or []))
            if pending is not None:
                travelling = C.finish_exchange(pending)
            if accumulators is not None:
                accumulators = C.finish_exchange(C.start_exchange(accumulators, send_to, recv_from, self.group))
        return accumulators

    def forward(self, q, k, v):
        """This rank's ``(out, lse)`` for its rows ``q`` ``[B, n, h, D]`` against the whole segment's keys, and what
        the backward keeps: the re-laid q (and k, v for the ring) when balanced, else nothing."""
        q, k, v = [*self._relayout([q], True), k, v] if self.gather else self._relayout([q, k, v], True)
        acc_dtype = lse_dtype(q.dtype)
        out = q.new_zeros(q.shape, dtype=acc_dtype)
        lse = q.new_full(q.shape[:3], -math.inf, dtype=acc_dtype)

        def compute(step, keys, values):
            for b in self._blocks(step, q.shape[1]):
                merge_into(out[:, b.q], lse[:, b.q], *self.kernel.forward(q[:, b.q], keys[:, b.k], values[:, b.k],
                                                                          self.sel, b.causal))

        if self.gather:
            compute(0, *self._gathered(k, v))
        else:
            self.ring([k, v], compute)
        kept = (q,) if self.gather else (q, k, v)
        return *self._relayout([out, lse], False), (kept if self.balance else None)

    def backward(self, dout, q, k, v, out, lse, kept):
        """dq of this rank's rows, and dk, dv of its own keys with every rank's contribution added. ``out`` and
        ``lse`` are the rows' global ones (merged over every pair); ``kept`` is what `forward` returned (``None``:
        re-lay q, k, v again, as a backward that cannot hold Python state between the passes does: the custom
        ops of `ring_attention.ops`)."""
        if self.balance:
            dout, out, lse = self._relayout([dout, out, lse], True)
            if kept is None:
                kept = tuple(self._relayout([q] if self.gather else [q, k, v], True))
            q, k, v = kept if not self.gather else (*kept, k, v)
        acc_dtype = lse_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)

        def compute(step, keys, values, dk, dv):
            for b in self._blocks(step, q.shape[1]):
                grads = self.kernel.backward(dout[:, b.q], q[:, b.q], keys[:, b.k], values[:, b.k], out[:, b.q],
                                             lse[:, b.q], self.sel, b.causal)
                dq[:, b.q] += grads[0]
                dk[:, b.k] += grads[1]
                dv[:, b.k] += grads[2]

        if self.gather:
            keys, values = self._gathered(k, v)  # gathered again: keeping them would hold w / r rows per head
            dkv = torch.zeros((2, *keys.shape), dtype=acc_dtype, device=q.device)  # [2, B, G n, h_kv, D]
            compute(0, keys, values, dkv[0], dkv[1])
            blocks = dkv.unflatten(2, (self.size, q.shape[1])).movedim(2, 0)  # [G, 2, B, n, h_kv, D]: one per owner
            group = C.segment_process_group(self.layout, self.members[self.me], self.group)
            dk, dv = C.reduce_scatter_blocks(blocks, group)  # in sequence order: nothing to lay back
            return *self._relayout([dq], False), dk, dv
        dkv = [torch.zeros(k.shape, dtype=acc_dtype, device=k.device) for _ in range(2)]
        return self._relayout([dq, *self.ring([k, v], compute, dkv)], False)
