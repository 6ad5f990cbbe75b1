"""Causal load balance for the pairs whose segments span ranks, with the user's layout unchanged (lesson 6).

With causal attention, rank ``p`` of a segment group of ``G`` ranks needs the keys of ranks ``0 .. p`` only:
the last rank computes ``G`` key blocks while the first computes one, and every step waits for the last.
The public ring projects balance this by permuting the whole sequence across ranks (zigzag, striped), which
every user must then do to inputs, positions and labels. Here only a spanning pair's *selected* rows —
``L / r`` per head, ``r`` times fewer than the shard's — are re-laid, inside the call, and laid back before it
returns:

- cut the segment group's selected rows into ``2 G`` chunks in sequence order (rank ``p`` holds chunks
  ``2p`` and ``2p + 1``), and give rank ``p`` chunks ``p`` and ``2G - 1 - p`` (zigzag): an early one and a late one,
  with one message to each of at most two ranks and from at most two (`relayout`);
- every rank then does the same work: two chunk-blocks per ring step (`ring_blocks`), or ``2 G`` half-blocks
  against the gathered keys (`gathered_blocks`).

A pair whose rank holds an odd number of rows per head cannot be cut in two halves; it keeps the unbalanced
schedule. `ring_attention.cost.score_pairs` counts what each rank's kernels compute, from the same schedules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ring_attention import comm as C
from ring_attention.pattern import PairLayout


@dataclass(frozen=True)
class Block:
    """One kernel call: rows ``q`` of this rank's queries against rows ``k`` of the keys it holds."""

    q: slice
    k: slice
    causal: bool  # the diagonal block: square, query i sees keys <= i


def balanced(layout: PairLayout, causal: bool, load_balance: bool) -> bool:
    """Whether the pair is re-laid: spanning, causal, asked for, and ``L / r`` rows that split in two halves."""
    return load_balance and causal and layout.spans_ranks and (layout.piece_length // layout.rate) % 2 == 0


def ring_blocks(me: int, size: int, step: int, rows: int, causal: bool, balance: bool) -> list[Block]:
    """The blocks rank ``me`` of a ring of ``size`` computes at ``step``, holding the keys of rank ``me - step``.

    Without balance a causal rank skips the keys of later ranks. With it (zigzag chunks: ``early`` is chunk
    ``me``, ``late`` chunk ``2 size - 1 - me``): its own keys give the early and late diagonals and late x early;
    an earlier rank's keys: both query chunks against that rank's early chunk (its late one is the future); a
    later rank's keys: only the late query chunk, against both. Two chunk-blocks every step, on every rank.
    """
    source = (me - step) % size
    whole = slice(0, rows)
    if not balance:
        return [] if causal and source > me else [Block(whole, whole, causal and source == me)]
    early, late = slice(0, rows // 2), slice(rows // 2, rows)
    if source == me:
        return [Block(early, early, True), Block(late, early, False), Block(late, late, True)]
    return [Block(whole, early, False)] if source < me else [Block(late, whole, False)]


def gathered_blocks(me: int, size: int, rows: int, causal: bool, balance: bool) -> list[Block]:
    """The blocks rank ``me`` computes against the keys of its whole segment group, gathered in rank order."""
    if not causal:
        return [Block(slice(0, rows), slice(0, size * rows), False)]
    if balance:
        half = rows // 2
        parts = [(slice(0, half), me), (slice(half, rows), 2 * size - 1 - me)]  # query chunk, its index
    else:
        half, parts = rows, [(slice(0, rows), me)]
    blocks = []
    for q_rows, chunk in parts:
        if chunk > 0:  # every earlier chunk at once
            blocks.append(Block(q_rows, slice(0, chunk * half), False))
        blocks.append(Block(q_rows, slice(chunk * half, (chunk + 1) * half), True))
    return blocks


def _zigzag_owner(chunk: int, size: int) -> int:
    return chunk if chunk < size else 2 * size - 1 - chunk


def relayout(tensors: Sequence[torch.Tensor], members: Sequence[int], me: int, group, to_zigzag: bool):
    """Move ``[B, n, ...]`` row blocks between the sequence order and the zigzag order of a segment group.

    ``members`` are the group ranks of the segment group, ``me`` this rank's index in it. In sequence order this
    rank holds chunks ``2 me`` and ``2 me + 1`` (its two halves); in zigzag order chunks ``me`` and
    ``2 size - 1 - me``. Halves that stay are copied; the others travel in one batch of messages.
    """
    wanted, given = relayout_moves(me, len(members), to_zigzag)
    outputs, sends, receives = [], [], []
    for t in tensors:
        halves = t.chunk(2, dim=1)
        received = [halves[src_half] if src == me else torch.empty_like(halves[0]) for src, src_half in wanted]
        sends += [(halves[h], members[dst]) for h, dst in enumerate(given) if dst != me]  # in half order
        receives += [(buffer, members[src]) for (src, _), buffer in sorted(zip(wanted, received), key=lambda x: x[0])
                     if src != me]  # in the sender's half order
        outputs.append(received)
    C.send_and_receive(sends, receives, group)
    return [torch.cat(halves, dim=1) for halves in outputs]


def relayout_moves(me: int, size: int, to_zigzag: bool) -> tuple[list[tuple[int, int]], list[int]]:
    """For each half this rank ends with, (the segment-group index holding it, that rank's half); and for each
    half it holds, the index it goes to."""
    zigzag = (me, 2 * size - 1 - me)
    in_sequence = [(_zigzag_owner(2 * me + h, size), (2 * me + h) // size) for h in (0, 1)]  # where mine are
    in_zigzag = [(chunk // 2, chunk % 2) for chunk in zigzag]  # where my zigzag chunks are in sequence order
    if to_zigzag:
        return in_zigzag, [dst for dst, _ in in_sequence]
    return in_sequence, [dst for dst, _ in in_zigzag]
