"""Causal load balance for packed documents: every rank does about the same work (DESIGN §10, lesson 8).

Packed documents of every length give the shards very different work: a shard of long documents computes whole
segments, one of short documents only their few rows; and the pieces that cross a shard boundary add their causal
work where they fall. DESIGN §10 sketches a head-tail re-lay of each spanning piece inside its span; that alone
leaves the ranks as unequal as their local pieces are (measured: max / mean 1.19 on 8 ranks for the Benchmarks
page's documents). So balance works on the whole plan, host-side and the same on every rank:

1. the ranks' work inside their shards is counted (`piece_work`); a rank with more than the mean of all the work
   gives up its heaviest pieces until it has no more (`migrated_pieces`): they become streams too
   (`ring_attention.streams`), owned elsewhere;
2. every stream is cut into chunks of about equal causal work, and the chunks, heaviest first, go to the rank with
   the least work so far (`balance_streams`): rows move to the chunk's owner, outputs and gradients move back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ring_attention.streams import Stream

if TYPE_CHECKING:
    from ring_attention.documents import Piece


def causal_work(lo: int, hi: int) -> int:
    """Scores of rows ``[lo, hi)`` of a causal stream (row ``i`` sees ``i + 1`` keys), per query head."""
    return (hi * (hi + 1) - lo * (lo + 1)) // 2


CHUNKS_PER_RANK = 8  # balance cuts the spanning work into about this many chunks per rank
MIN_CHUNK_ROWS = 16  # and no chunk below this many rows (a kernel call's worth)


def balance_streams(streams: list[Stream], loads: list[int]) -> list[Stream]:
    """The streams re-owned for causal load balance, given each rank's work so far (``loads``, updated in place).

    Each stream is cut into chunks of about equal causal work (split at ``n sqrt(k / C)``: the work up to row ``i``
    grows as ``i^2``), at most one per `MIN_CHUNK_ROWS` rows; the chunks, heaviest first, each go to the rank with
    the least work (a rank of the piece's span on ties, then the lowest). Deterministic: every rank plans alike.
    """
    total = sum(causal_work(0, s.count) * len(s.q_heads) for s in streams)
    target = max(1, (total + sum(loads)) // (len(loads) * CHUNKS_PER_RANK))
    chunks = []  # (work, stream index, lo, hi)
    for index, stream in enumerate(streams):
        work = causal_work(0, stream.count) * len(stream.q_heads)
        count = max(1, min(-(-work // target), stream.count // MIN_CHUNK_ROWS))
        cuts = sorted({0, stream.count, *(round(stream.count * (k / count) ** 0.5) for k in range(1, count))})
        chunks += [(causal_work(lo, hi) * len(stream.q_heads), index, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
    owners: dict[tuple[int, int], int] = {}
    for work, index, lo, _ in sorted(chunks, key=lambda c: (-c[0], c[1], c[2])):
        span = streams[index].span
        owner = min(range(len(loads)), key=lambda r: (loads[r], r not in span, r))
        owners[(index, lo)] = owner
        loads[owner] += work
    balanced = []
    for index, stream in enumerate(streams):
        ranges: list[tuple[int, int, int]] = []
        for _, i, lo, hi in sorted((c for c in chunks if c[1] == index), key=lambda c: c[2]):  # in row order
            if ranges and ranges[-1][0] == owners[(i, lo)]:
                ranges[-1] = (ranges[-1][0], ranges[-1][1], hi)  # neighbouring chunks of one owner: one range
            else:
                ranges.append((owners[(i, lo)], lo, hi))
        balanced.append(Stream(stream.batch, stream.start, stream.rate, stream.count, stream.kv_head, stream.q_heads,
                               stream.span, tuple(ranges)))
    return balanced


def piece_work(piece: Piece, *, batch: int, heads: Sequence[int], rate: int, heads_per_kv: int) -> int:
    """The causal scores of one piece (every batch row it is in), over ``heads``."""
    copies = batch if piece.row is None else 1
    return copies * sum(causal_work(0, len(range((h // heads_per_kv) % rate, piece.length, rate))) for h in heads)


def migrated_pieces(local: list[list[list[Piece]]], works: list[list[list[int]]], spanning_work: int) -> set:
    """``(pair, piece)`` of the pieces inside shards that balance moves off their rank: from each rank whose work
    inside its shard exceeds the mean of all the work, its heaviest pieces until it does not.

    ``local[pair][rank]`` are a rank's pieces inside its shard for each pair, ``works`` their causal work and
    ``spanning_work`` the work of every piece that crosses a shard boundary.
    """
    world_size = len(local[0]) if local else 1
    loads = [sum(sum(works[p][r]) for p in range(len(local))) for r in range(world_size)]
    target = (sum(loads) + spanning_work) / world_size
    moved = set()
    for rank in range(world_size):
        heaviest = sorted(((works[p][rank][i], p, i) for p in range(len(local)) for i in range(len(local[p][rank]))),
                          reverse=True)
        for work, p, i in heaviest:
            if loads[rank] <= target:
                break
            if loads[rank] - work >= target / 2:  # never strip a rank below half of its share
                moved.add((p, local[p][rank][i]))
                loads[rank] -= work
    return moved
