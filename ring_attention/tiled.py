"""What one rank computes of a pair when the pair's segments tile the sequence and the shards (the fast layout of an
unpacked sequence: every segment whole, none cut by a rank boundary unless it covers whole shards).

- `LocalPair`: the segments fit in a shard. Its kept rows are strided views of the ``[B, L, H, D]`` tensors
  (`ring_attention.pattern.row_view`): no row is copied, and each kernel's output is merged straight into the
  output through the same views; the backward adds the kernels' gradients through them.
- `SpanningRows`: the segments span ranks. Its kept rows are gathered into dense blocks, which travel by ring or
  all-gather (`ring_attention.spanning`), and the results are merged back.

Both are *parts* of a call: ``forward(q, k, v, out, lse)`` merges into the running output and LSE and returns what
its backward keeps; ``backward(dout, q, k, v, out, lse, grads, kept)`` adds into the gradients ``(dq, dk, dv)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ring_attention.kernels import block_attention, block_attention_backward
from ring_attention.merge import merge_into, merge_partials
from ring_attention.pattern import PairLayout, accumulate_rows, gather_rows, row_view, scatter_rows
from ring_attention.spanning import BlockKernel, SpanningPair

# a local pair's kernel calls per view, at most: a call's outputs (its gradients, in the backward) live beside the
# accumulators until they are merged, so each call is kept to ~1/8 of the shard (1/4 held 3/4 of a q-sized float32
# shard more at the backward's peak, for no measurable gain in speed)
CHUNKS = 8


class LocalPair:
    """A pair whose segments fit in a shard, computed view by view."""

    def __init__(self, layout: PairLayout, kernel: BlockKernel):
        self.layout, self.kernel = layout, kernel

    def _view_chunks(self, x: torch.Tensor) -> Iterator:
        """``rows(t, kv=False)`` for each kernel call on tensors shaped like ``x`` [B, L, ...]: every view, cut along
        its ``B L / piece_length`` pieces into at most `CHUNKS` calls, so that a call's outputs and gradients stay a
        fraction of the shard's size."""
        layout = self.layout
        pieces = x.shape[0] * (x.shape[1] // layout.piece_length)
        step = -(-pieces // CHUNKS)
        for view in layout.views:
            for start in range(0, pieces, step):
                def rows(t, kv=False, view=view, start=start):
                    view_rows = row_view(t, layout.piece_length, layout.rate, view, kv)  # [pieces, count, heads, ..]
                    return view_rows[start: start + step]

                yield rows

    def forward(self, q, k, v, out, lse) -> None:
        kernel = self.kernel
        for rows in self._view_chunks(q):
            part_out, part_lse = block_attention(rows(q), rows(k, True), rows(v, True), causal=kernel.causal,
                                                 scale=kernel.scale, backend=kernel.backend)
            merge_into(rows(out), rows(lse), part_out.to(out.dtype), part_lse)

    def backward(self, dout, q, k, v, out, lse, grads, kept) -> None:
        kernel = self.kernel
        for rows in self._view_chunks(q):
            block_grads = block_attention_backward(
                rows(dout), rows(q), rows(k, True), rows(v, True), rows(out), rows(lse), causal=kernel.causal,
                scale=kernel.scale, backend=kernel.backend)
            for grad, block_grad, kv in zip(grads, block_grads, (False, True, True)):
                rows(grad, kv).add_(block_grad)


class SpanningRows:
    """A pair whose segments span ranks: its kept rows gathered into blocks, computed across the segment group by
    `SpanningPair`, merged back."""

    def __init__(self, layout: PairLayout, pair: SpanningPair):
        sel = layout.span_rows
        self.pair = pair
        self.q_rows = (layout.piece_length, sel.q_positions, sel.q_heads)
        self.kv_rows = (layout.piece_length, sel.kv_positions, sel.kv_heads)

    def forward(self, q, k, v, out, lse):
        part_out, part_lse, kept = self.pair.forward(
            gather_rows(q, *self.q_rows), gather_rows(k, *self.kv_rows), gather_rows(v, *self.kv_rows))
        merged_out, merged_lse = merge_partials(gather_rows(out, *self.q_rows), gather_rows(lse, *self.q_rows),
                                                part_out, part_lse)
        scatter_rows(out, *self.q_rows, merged_out)
        scatter_rows(lse, *self.q_rows, merged_lse)
        return kept

    def backward(self, dout, q, k, v, out, lse, grads, kept) -> None:
        dout_rows, q_rows, out_rows, lse_rows = (gather_rows(t, *self.q_rows) for t in (dout, q, out, lse))
        block_grads = self.pair.backward(dout_rows, q_rows, gather_rows(k, *self.kv_rows),
                                         gather_rows(v, *self.kv_rows), out_rows, lse_rows, kept)
        for grad, block_grad, rows in zip(grads, block_grads, (self.q_rows, self.kv_rows, self.kv_rows)):
            accumulate_rows(grad, *rows, block_grad)


def tiled_parts(layouts: list[PairLayout], kernel: BlockKernel, comm_mode: str, group, rank: int,
                load_balance: bool) -> list:
    """The parts of a call in the tiled layout, pair by pair (a pair none of whose heads this rank holds has none)."""
    parts: list = []
    for layout in layouts:
        if not layout.views:  # head groups split over ranks (ulysses_size > 1): none of this pair's heads here
            continue
        if layout.spans_ranks:
            parts.append(SpanningRows(layout, SpanningPair(kernel, comm_mode, group, rank, layout, load_balance)))
        else:
            parts.append(LocalPair(layout, kernel))
    return parts
