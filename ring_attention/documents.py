"""Packed documents and any sequence length: where documents cut each pair (DESIGN §10, lesson 8).

``cu_seqlens`` cuts the sequence into documents, and each document is segmented from its own start: pair ``(w, r)``
cuts document ``[s, e)`` into whole segments ``[s + k w, s + (k + 1) w)`` and, when ``w`` does not divide its
length, a shorter last segment, its *tail* (a document shorter than ``w`` is one tail). Inside every segment
nothing changes: head ``h`` keeps positions ``o, o + r, ...`` counted from the segment's start, and attention
stays inside the segment. A tail is exactly a segment padded to ``w`` with keys nobody sees and queries nobody
reads; an unpacked sequence of any length is one document.

What a rank computes of a pair, from its shard ``[p L, (p + 1) L)``:

- a document's whole segments that lie inside the shard form a `Run`: consecutive pieces of length ``w``, whose
  kept rows are the pair's strided views (`ring_attention.pattern.row_view`) from the run's first token — no copy,
  as for an unpacked sequence; so is a long tail, a run of one piece;
- other tails inside the shard are *short pieces*: blocks of `ring_attention.varlen`, grouped into a few padded
  kernel calls;
- pieces that cross a shard boundary span ranks (`ring_attention.doc_spanning`).

The plan is made host-side from the boundaries, the same on every rank, once per layout (`LocalPieces`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ring_attention.doc_balance import balance_streams, migrated_pieces, piece_work
from ring_attention.kernels import block_attention, block_attention_backward
from ring_attention.merge import merge_into
from ring_attention.pattern import RowView, pair_heads, row_view, row_views
from ring_attention.streams import plan_streams, spanning_streams
from ring_attention.validation import Boundaries, check_head_mode, check_pairs, warn_uncovered
from ring_attention.varlen import Buckets, Rows


@dataclass(frozen=True)
class Piece:
    """Tokens ``[start, start + length)`` of one segment (global positions) in batch row ``row`` (``None``: every
    row, when the boundaries are shared); ``whole``: a segment of the full length ``w``."""

    row: int | None
    start: int
    length: int
    whole: bool


@dataclass(frozen=True)
class Run:
    """``pieces`` consecutive segments of ``length`` tokens of one document inside this rank's shard, from token
    ``start`` of the shard, in batch row ``row`` (``None``: every row): whole segments, or one long tail."""

    row: int | None
    start: int
    pieces: int
    length: int


VIEW_ROWS = 128  # a tail keeping at least this many rows per head is read through views, in a call of its own


def segments(boundaries: Boundaries, w: int) -> Iterator[Piece]:
    """Every segment of pair ``w`` in the sequence (``boundaries``: `check_cu_seqlens`'s, shared or one per batch
    row): each document cut from its own start, its tail last."""
    for row, bounds in enumerate(boundaries):
        for start, end in zip(bounds[:-1], bounds[1:]):
            whole = (end - start) // w
            for k in range(whole):
                yield Piece(row if len(boundaries) > 1 else None, start + k * w, w, True)
            if (end - start) % w:
                yield Piece(row if len(boundaries) > 1 else None, start + whole * w, (end - start) % w, False)


def local_pieces(boundaries: Boundaries, w: int, rate: int, lo: int, hi: int,
                 leave: set = frozenset()) -> tuple[list[Run], list[Piece]]:
    """What of pair ``(w, rate)`` lies inside the shard ``[lo, hi)``, with positions relative to the shard: runs
    (whole segments, and tails long enough to be worth a kernel call of their own: `VIEW_ROWS`) and short pieces.
    Pieces in ``leave`` (global positions) are computed elsewhere (`ring_attention.doc_balance`)."""
    runs: list[Run] = []
    short: list[Piece] = []
    for piece in segments(boundaries, w):
        if piece.start < lo or piece.start + piece.length > hi or piece in leave:
            continue
        start = piece.start - lo
        if not piece.whole:
            if piece.length // rate >= VIEW_ROWS:
                runs.append(Run(piece.row, start, 1, piece.length))
            else:
                short.append(Piece(piece.row, start, piece.length, False))
        elif runs and runs[-1].row == piece.row and runs[-1].length == w and \
                runs[-1].start + runs[-1].pieces * w == start:
            runs[-1] = Run(piece.row, runs[-1].start, runs[-1].pieces + 1, w)  # the next segment of the same run
        else:
            runs.append(Run(piece.row, start, 1, w))
    return runs, short


def kept_blocks(pieces: Sequence[Piece], batch: int, heads: Sequence[int], rate: int, heads_per_kv: int,
                first_head: int) -> tuple[Rows, Rows]:
    """One block per (piece, batch row, query head) that keeps a row: queries ``(b, start + o + i r, h)`` and keys
    ``(b, start + o + i r, j)`` with ``j`` the kv head and ``o`` its offset; head indices local (minus
    ``first_head``)."""
    q = Rows([], [], [], [], [])
    k = Rows([], [], [], [], [])
    first_kv = first_head // heads_per_kv
    for piece in pieces:
        for b in range(batch) if piece.row is None else (piece.row,):
            for h in heads:
                offset = (h // heads_per_kv) % rate
                count = len(range(offset, piece.length, rate))
                if count == 0:  # a piece no longer than this head's offset keeps none of its rows
                    continue
                for rows, head in ((q, h - first_head), (k, h // heads_per_kv - first_kv)):
                    for field, value in zip((rows.batch, rows.start, rows.step, rows.count, rows.head),
                                            (b, piece.start + offset, rate, count, head)):
                        field.append(value)
    return q, k


@dataclass(frozen=True)
class LocalPlan:
    """One pair's pieces inside this rank's shard: runs, read through ``views`` (the pair's kept rows as strided
    views, per piece length), and short pieces through `Buckets`. Made once per layout."""

    rate: int
    shard: int
    views: dict[int, tuple[RowView, ...]]
    runs: tuple[Run, ...]
    short: Buckets | None


class LocalPieces:
    """A call's part for one pair's pieces inside the shard (see `ring_attention.tiled` for what a part is)."""

    def __init__(self, plan: LocalPlan, kernel):
        self.rate, self.views, self.runs = plan.rate, plan.views, plan.runs
        self.short, self.shard, self.kernel = plan.short, plan.shard, kernel

    def _run_rows(self, batch: int) -> Iterator:
        """``rows(t, kv=False)`` for each kernel call of the runs: a view of every row at once when a shared run
        covers whole shards, else one per batch row."""
        for run in self.runs:
            whole_rows = run.row is None and run.start == 0 and run.pieces * run.length == self.shard
            for b in [None] if whole_rows else range(batch) if run.row is None else [run.row]:
                for view in self.views[run.length]:
                    def rows(t, kv=False, view=view, b=b, run=run):
                        if b is None:
                            return row_view(t, run.length, self.rate, view, kv)
                        return row_view(t[b: b + 1], run.length, self.rate, view, kv, start=run.start,
                                        pieces=run.pieces)

                    yield rows

    def forward(self, q, k, v, out, lse) -> None:
        kernel = self.kernel
        for rows in self._run_rows(q.shape[0]):
            part_out, part_lse = block_attention(rows(q), rows(k, True), rows(v, True), causal=kernel.causal,
                                                 scale=kernel.scale, backend=kernel.backend)
            merge_into(rows(out), rows(lse), part_out.to(out.dtype), part_lse)
        if self.short is not None:
            self.short.forward(q, k, v, out, lse, kernel)

    def backward(self, dout, q, k, v, out, lse, grads, kept) -> None:
        kernel = self.kernel
        for rows in self._run_rows(q.shape[0]):
            block_grads = block_attention_backward(
                rows(dout), rows(q), rows(k, True), rows(v, True), rows(out), rows(lse), causal=kernel.causal,
                scale=kernel.scale, backend=kernel.backend)
            for grad, block_grad, kv in zip(grads, block_grads, (False, True, True)):
                rows(grad, kv).add_(block_grad)
        if self.short is not None:
            self.short.backward(dout, q, k, v, out, lse, *grads, kernel)


def plan_documents(
    boundaries: Boundaries,
    seq_len: int,
    world_size: int,
    rank: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_mode: str,
    batch: int,
    causal: bool,
    device: torch.device,
    local_heads: range,
    comm_mode: str = "ring",
    load_balance: bool = True,
) -> list:
    """This rank's plan of every pair for documents ``boundaries`` (`check_cu_seqlens`) over ``seq_len`` tokens split
    into ``world_size`` shards: a `LocalPlan` for the pieces inside its shard and a
    `ring_attention.streams.StreamPlan` for those that cross a shard boundary, pair by pair. ``local_heads`` are the
    query heads it holds (offsets follow global indices)."""
    check_pairs(segment_lengths, dilation_rates)
    check_head_mode(head_mode, num_heads, len(segment_lengths))
    warn_uncovered(dilation_rates)
    shard = seq_len // world_size
    lo, hi = rank * shard, (rank + 1) * shard
    heads_per_kv = num_heads // num_kv_heads
    local_kv_heads = len(local_heads) // heads_per_kv
    pairs = [(w, r, [h for h in heads if h in local_heads]) for w, r, heads in
             zip(segment_lengths, dilation_rates, pair_heads(num_heads, len(segment_lengths), head_mode))]
    pairs = [(w, r, mine) for w, r, mine in pairs if mine]  # with the heads split over ranks, some take none here
    crossing = [[piece for piece in segments(boundaries, w)
                 if piece.start // shard != (piece.start + piece.length - 1) // shard] for w, _, _ in pairs]
    moved, loads = set(), [0] * world_size
    if load_balance and causal and world_size > 1:
        moved, loads = _balance_inputs(boundaries, pairs, crossing, shard, world_size, batch, heads_per_kv)
    plans = []
    for p, (w, r, mine) in enumerate(pairs):
        runs, short = local_pieces(boundaries, w, r, lo, hi, {piece for pair, piece in moved if pair == p})
        q_rows, k_rows = kept_blocks(short, batch, mine, r, heads_per_kv, local_heads.start)
        buckets = Buckets(q_rows, k_rows, causal, (batch, shard, len(local_heads)), (batch, shard, local_kv_heads),
                          device) if q_rows.count else None
        views = {length: row_views(mine, r, length, heads_per_kv, local_heads.start)
                 for length in {run.length for run in runs}}
        if runs or buckets is not None:
            plans.append(LocalPlan(rate=r, shard=shard, views=views, runs=tuple(runs), short=buckets))
        pieces = crossing[p] + sorted((piece for pair, piece in moved if pair == p), key=lambda x: (x.row or 0,
                                                                                                     x.start))
        streams = spanning_streams(pieces, batch, shard, mine, r, heads_per_kv, local_heads.start)
        if moved or loads != [0] * world_size:
            streams = balance_streams(streams, loads)
        spanning = plan_streams(streams, shard=shard, world_size=world_size, rank=rank, num_heads=len(local_heads),
                                num_kv_heads=local_kv_heads, causal=causal, comm_mode=comm_mode, device=device)
        if spanning is not None:
            plans.append(spanning)
    return plans


def _balance_inputs(boundaries, pairs, crossing, shard, world_size, batch, heads_per_kv) -> tuple[set, list[int]]:
    """What causal balance starts from: the pieces inside shards it moves off overloaded ranks, and each rank's work
    inside its shard without them (`ring_attention.doc_balance`)."""
    local, works, spanning_work = [], [], 0
    for (w, r, mine), spanning in zip(pairs, crossing):
        inside = [[piece for piece in segments(boundaries, w) if piece.start >= rank * shard
                   and piece.start + piece.length <= (rank + 1) * shard] for rank in range(world_size)]
        local.append(inside)
        works.append([[piece_work(piece, batch=batch, heads=mine, rate=r, heads_per_kv=heads_per_kv)
                       for piece in pieces] for pieces in inside])
        spanning_work += sum(piece_work(piece, batch=batch, heads=mine, rate=r, heads_per_kv=heads_per_kv)
                             for piece in spanning)
    moved = migrated_pieces(local, works, spanning_work)
    loads = [sum(work for p in range(len(local)) for piece, work in zip(local[p][rank], works[p][rank])
                 if (p, piece) not in moved) for rank in range(world_size)]
    return moved, loads


def documents_fingerprint(boundaries: Boundaries | None) -> int:
    """A 62-bit fingerprint of the documents (0: none), which the ranks compare before planning alike."""
    if boundaries is None:
        return 0
    digest = hashlib.blake2b(repr(boundaries).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2 or 1
