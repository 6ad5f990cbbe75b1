"""Documents across ranks: the plan of the pieces that cross a shard boundary (DESIGN §10, lesson 8).

A piece (a segment of a document) that crosses a shard boundary is held in parts by the consecutive ranks it spans.
For one kv head, its kept rows form a *stream*: positions ``start + i r`` for ``i < count`` in one batch row, which
the query heads of that kv head share. Each stream's rows are *owned* in contiguous ranges by the ranks of its span:

- without balance, a rank owns the rows its shard holds (the *natural* owner: nothing moves);
- with causal load balance, each stream is cut into chunks of about equal causal work, which go to the ranks with
  the least work so far (`ring_attention.doc_balance`); a chunk's q, k, v rows move to its owner first, and its
  outputs move back (`Moves`).

An owner computes its query rows against the keys of every range it may see: those before (all of them, a full
block), its own (the causal diagonal, square), none after; without causality all of them. The keys reach it either
all at once, exactly the ranges it needs (``comm="allgather"``, `GatheredKeys`), or by rotating each stream's
blocks around its span, one block per step, as the ring does (``comm="ring"``, `RingSteps`). The plan is made
host-side from the boundaries, the same on every rank, and cached; it is what is sent, in which order, and which
blocks are computed (`ring_attention.varlen.Buckets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ring_attention.varlen import Buckets, Rows

if TYPE_CHECKING:
    from ring_attention.documents import Piece


@dataclass(frozen=True)
class Stream:
    """The kept rows of one spanning piece for one kv head: row ``i < count`` is global position
    ``start + i rate`` of batch row ``batch``; ``ranges`` are ``(owner, first row, end row)`` in row order."""

    batch: int
    start: int
    rate: int
    count: int
    kv_head: int  # local index
    q_heads: tuple[int, ...]  # local indices of the query heads that use it
    span: tuple[int, ...]  # the ranks the piece spans: its rows' natural owners
    ranges: tuple[tuple[int, int, int], ...]

    @property
    def members(self) -> tuple[int, ...]:
        """The ranks that own rows: they hold its keys, and rotate them in the ring."""
        return tuple(sorted({owner for owner, lo, hi in self.ranges if hi > lo}))

    def owned(self, rank: int) -> list[tuple[int, int]]:
        return [(lo, hi) for owner, lo, hi in self.ranges if owner == rank and hi > lo]


def _natural_ranges(start: int, rate: int, count: int, members: Sequence[int], shard: int):
    ranges = []
    for a in members:
        lo = max(0, -(-(a * shard - start) // rate))
        hi = min(count, -(-((a + 1) * shard - start) // rate))
        ranges.append((a, lo, max(lo, hi)))
    return tuple(ranges)


def spanning_streams(pieces: Sequence[Piece], batch: int, shard: int, heads: Sequence[int], rate: int,
                     heads_per_kv: int, first_head: int) -> list[Stream]:
    """The streams of the pieces that cross a shard boundary, owned by their natural owners, in one order every
    rank agrees on."""
    first_kv = first_head // heads_per_kv
    kv_heads = sorted({h // heads_per_kv for h in heads})
    streams = []
    for piece in pieces:
        span = tuple(range(piece.start // shard, (piece.start + piece.length - 1) // shard + 1))
        for b in range(batch) if piece.row is None else (piece.row,):
            for j in kv_heads:
                offset = j % rate
                count = len(range(offset, piece.length, rate))
                if count == 0:
                    continue
                start = piece.start + offset
                q_heads = tuple(h - first_head for h in heads if h // heads_per_kv == j)
                streams.append(Stream(b, start, rate, count, j - first_kv, q_heads, span,
                                      _natural_ranges(start, rate, count, span, shard)))
    return streams


def _blocks(q_ranges, k_ranges, causal: bool):
    """(query range, key range, diagonal) couples to compute: keys before the queries give full blocks, the
    queries' own range the causal diagonal; without causality every couple."""
    for q in q_ranges:
        for k in k_ranges:
            if not causal:
                yield q, k, False
            elif k[1] <= q[0]:
                yield q, k, False
            elif k == q:
                yield q, k, True


@dataclass
class Table:
    """Rows packed in one order: ``(stream, range, head)`` triples, each a run of consecutive rows."""

    offsets: dict = field(default_factory=dict)
    size: int = 0

    def add(self, key, length: int) -> None:
        self.offsets[key] = self.size
        self.size += length


def query_table(streams: Sequence[Stream], rank: int) -> Table:
    table = Table()
    for s, stream in enumerate(streams):
        for h in stream.q_heads:
            for lo, hi in stream.owned(rank):
                table.add((s, lo, h), hi - lo)
    return table


def key_table(streams: Sequence[Stream], rank: int) -> Table:
    table = Table()
    for s, stream in enumerate(streams):
        for lo, hi in stream.owned(rank):
            table.add((s, lo), hi - lo)
    return table


class BlockRows:
    """Collects the blocks of a plan as `Rows` in two tables (step 1, one head: ``[1, n, 1]`` spaces)."""

    def __init__(self):
        self.q, self.k = Rows([], [], [], [], []), Rows([], [], [], [], [])
        self.diagonal: list[bool] = []

    def add(self, q_start: int, k_start: int, n: int, m: int, diagonal: bool) -> None:
        for rows, start, count in ((self.q, q_start, n), (self.k, k_start, m)):
            for values, value in zip((rows.batch, rows.start, rows.step, rows.count, rows.head),
                                     (0, start, 1, count, 0)):
                values.append(value)
        self.diagonal.append(diagonal)

    def buckets(self, q_size: int, k_size: int, causal: bool, device) -> list[Buckets]:
        """`Buckets` for the diagonal blocks (causal) and for the others, in rounds: a `Buckets` merges each query
        row once, so a query range seeing several key ranges takes one round per key range."""
        seen: dict[tuple[int, int], int] = {}
        rounds = []
        for start, count in zip(self.q.start, self.q.count):
            rounds.append(seen.get((start, count), 0))
            seen[(start, count)] = rounds[-1] + 1
        out = []
        for diagonal, round_ in sorted({(d, r) for d, r in zip(self.diagonal, rounds)}, reverse=True):
            pick = [i for i, (d, r) in enumerate(zip(self.diagonal, rounds)) if (d, r) == (diagonal, round_)]
            q = Rows(*([getattr(self.q, f)[i] for i in pick] for f in ("batch", "start", "step", "count", "head")))
            k = Rows(*([getattr(self.k, f)[i] for i in pick] for f in ("batch", "start", "step", "count", "head")))
            out.append(Buckets(q, k, causal and diagonal, (1, q_size, 1), (1, k_size, 1), device))
        return out


def stream_blocks(streams, rank: int, q_table: Table, keys: dict, causal: bool, into: BlockRows) -> None:
    """Add the blocks of this rank's query ranges against the key ranges ``keys`` ``{(stream, lo): (hi, offset in
    the key space)}`` that are present."""
    for s, stream in enumerate(streams):
        present = sorted((lo, hi) for (t, lo), (hi, _) in keys.items() if t == s)
        for q, k, diagonal in _blocks(stream.owned(rank), present, causal):
            for h in stream.q_heads:
                into.add(q_table.offsets[(s, q[0], h)], keys[(s, k[0])][1], q[1] - q[0], k[1] - k[0], diagonal)


def _rows(stream: Stream, lo: int, hi: int, shard: int, heads: int, head: int):
    """Rows ``[lo, hi)`` of ``stream``: their natural owners and their indices in the owner's ``[B, L, H]`` space
    (contiguous numbering) for head ``head`` of ``heads``."""
    positions = stream.start + stream.rate * torch.arange(lo, hi)
    owners = positions.div(shard, rounding_mode="floor")
    return owners, (stream.batch * shard + positions - owners * shard) * heads + head


@dataclass
class Moves:
    """How a rank's tables are filled from the natural owners of their rows, and the reverse. ``local`` pairs table
    positions with this rank's own rows; ``incoming[a]`` are the table positions of the rows natural owner ``a``
    sends, in its order; ``outgoing[c]`` are this rank's rows (contiguous numbering) that owner ``c`` takes, in
    ``c``'s table order."""

    local_positions: torch.Tensor
    local_rows: torch.Tensor
    incoming: dict[int, torch.Tensor]
    outgoing: dict[int, torch.Tensor]


def moves(streams, rank: int, world_size: int, shard: int, heads: int, per_head: bool, device) -> Moves:
    """The `Moves` of the query table (``per_head``: one run per query head) or of the key table."""
    def entries(owner: int):
        table = query_table(streams, owner) if per_head else key_table(streams, owner)
        for (s, lo, *head), offset in table.offsets.items():
            stream = streams[s]
            hi = next(h for first, h in stream.owned(owner) if first == lo)
            yield offset, *_rows(stream, lo, hi, shard, heads, head[0] if per_head else stream.kv_head)

    mine = list(entries(rank))
    positions = torch.cat([offset + torch.arange(len(rows)) for offset, _, rows in mine] or [torch.zeros(0, dtype=
                                                                                                          torch.long)])
    owners = torch.cat([o for _, o, _ in mine] or [torch.zeros(0, dtype=torch.long)])
    rows = torch.cat([r for _, _, r in mine] or [torch.zeros(0, dtype=torch.long)])
    local = owners == rank
    incoming = {a: positions[owners == a].to(device) for a in range(world_size) if a != rank and (owners == a).any()}
    outgoing = {}
    for c in range(world_size):
        if c == rank:
            continue
        theirs = [(o, r) for _, o, r in entries(c)]
        wanted = torch.cat([r[o == rank] for o, r in theirs] or [torch.zeros(0, dtype=torch.long)])
        if wanted.numel():
            outgoing[c] = wanted.to(device)
    return Moves(positions[local].to(device), rows[local].to(device), incoming, outgoing)


@dataclass
class GatheredKeys:
    """``comm="allgather"``: every key range a rank's queries see, received at once. The key buffer is this rank's
    key table followed by what each peer sends (``receive[o]`` rows from rank ``o``, ascending); ``send[x]`` are the
    key-table positions rank ``x`` needs, in its order."""

    send: dict[int, torch.Tensor]
    receive: dict[int, int]
    buckets: list[Buckets]


def _needed(stream: Stream, rank: int, owner: int, lo: int, hi: int, causal: bool) -> bool:
    return hi > lo and owner != rank and any(not causal or hi <= q_lo for q_lo, _ in stream.owned(rank))


def gathered_keys(streams, rank: int, world_size: int, q_table: Table, keys: Table, causal: bool, device):
    present = {(s, lo): (hi, keys.offsets[(s, lo)]) for s, st in enumerate(streams) for lo, hi in st.owned(rank)}
    offset, receive = keys.size, {}
    for o in range(world_size):
        start = offset
        for s, stream in enumerate(streams):
            for owner, lo, hi in stream.ranges:
                if owner == o and _needed(stream, rank, o, lo, hi, causal):
                    present[(s, lo)] = (hi, offset)
                    offset += hi - lo
        if offset > start:
            receive[o] = offset - start
    send = {}
    for x in range(world_size):
        wanted = [keys.offsets[(s, lo)] + torch.arange(hi - lo) for s, stream in enumerate(streams)
                  for owner, lo, hi in stream.ranges if owner == rank and _needed(stream, x, rank, lo, hi, causal)]
        if wanted:
            send[x] = torch.cat(wanted).to(device)
    blocks = BlockRows()
    stream_blocks(streams, rank, q_table, present, causal, blocks)
    return GatheredKeys(send, receive, blocks.buckets(q_table.size, offset, causal, device))


@dataclass
class StreamPlan:
    """One pair's spanning streams on one rank: its table sizes, the moves that fill them, and how keys travel."""

    q_size: int
    k_size: int
    q_moves: Moves
    k_moves: Moves
    gathered: GatheredKeys | None
    ring: list[RingStep] | None


@dataclass
class RingStep:
    """One step of ``comm="ring"``: the blocks computed with the keys held, and how the held keys move on:
    ``send[x]`` are held-buffer positions for rank ``x``, ``receive[a]`` the next buffer's positions of what rank
    ``a`` sends. In the backward, the keys' accumulators move every step, the last time home:
    ``accumulate_send[x]`` are held positions, ``accumulate_receive[a]`` positions in the next buffer followed by
    the key table (``size_after`` + key-table position for an accumulator that comes home); a stream this rank
    owns alone keeps its accumulators: ``accumulate_home`` pairs their held and key-table positions."""

    size: int
    size_after: int
    buckets: list[Buckets]
    send: dict[int, torch.Tensor]
    receive: dict[int, torch.Tensor]
    accumulate_send: dict[int, torch.Tensor]
    accumulate_receive: dict[int, torch.Tensor]
    accumulate_home: tuple[torch.Tensor, torch.Tensor]


def journey(stream: Stream, origin: int, causal: bool) -> int:
    """How many hops the keys of ``origin`` travel around the stream's owners: as far as the last owner, in ring
    order, that may see them (with causality an owner sees only ranges before its own); every owner without."""
    members = stream.members
    size, start = len(members), members.index(origin)
    if not causal:
        return size - 1
    keys = stream.owned(origin)
    seen = [d for d in range(1, size) if any(k_hi <= q_lo for _, k_hi in keys
                                             for q_lo, _ in stream.owned(members[(start + d) % size]))]
    return max(seen, default=0)


def ring_steps(streams, rank: int, q_table: Table, keys: Table, causal: bool, device) -> list[RingStep]:
    """The steps of ``comm="ring"`` for this rank. Each stream's owners form its ring: at step ``t`` an owner holds the
    keys of the owner ``t`` places before it, while they still have someone to reach (`journey`: with causality,
    keys are not passed on past the last owner that sees them). In the backward the accumulators travel with the
    keys and, at the end of the journey, go straight home."""
    journeys = {(s, o): journey(stream, o, causal) for s, stream in enumerate(streams) if rank in stream.members
                for o in stream.members}

    def held(s: int, member: int, step: int) -> int | None:
        """The owner whose keys ``member`` holds at ``step`` (None: none reach it then)."""
        members = streams[s].members
        origin = members[(members.index(member) - step) % len(members)]
        return origin if step <= journeys[(s, origin)] else None

    def layout(step: int) -> dict[int, tuple[int, int, int]]:
        """This rank's held buffer at ``step``: ``{stream: (origin, offset, size)}``."""
        placed, offset = {}, 0
        for s, stream in enumerate(streams):
            origin = held(s, rank, step) if rank in stream.members else None
            if origin is not None:
                size = sum(hi - lo for lo, hi in stream.owned(origin))
                placed[s] = (origin, offset, size)
                offset += size
        return placed

    mine = [s for s, stream in enumerate(streams) if rank in stream.members]
    steps = []
    for step in range(max((len(streams[s].members) for s in mine), default=0)):
        here, after = layout(step), layout(step + 1)
        present = {}
        for s, (origin, offset, _) in here.items():
            for lo, hi in streams[s].owned(origin):
                present[(s, lo)] = (hi, offset)
                offset += hi - lo
        blocks = BlockRows()
        stream_blocks(streams, rank, q_table, present, causal, blocks)
        size_after = sum(n for _, _, n in after.values())
        send, receive, accumulate_send, accumulate_receive = {}, {}, {}, {}
        home_held, home_keys = [], []
        for s, stream in enumerate(streams):
            if rank not in stream.members:
                continue
            members = stream.members
            successor = members[(members.index(rank) + 1) % len(members)]
            predecessor = members[(members.index(rank) - 1) % len(members)]
            owned = stream.owned(rank)
            first = keys.offsets[(s, owned[0][0])] if owned else 0
            own_size = sum(hi - lo for lo, hi in owned)
            if s in here:  # what this rank holds: keys move on while they have someone to reach, else go home
                origin, offset, size = here[s]
                span = torch.arange(offset, offset + size)
                if step < journeys[(s, origin)]:
                    send.setdefault(successor, []).append(span)
                    accumulate_send.setdefault(successor, []).append(span)
                elif origin == rank:  # its own keys reached nobody else: their accumulators are home
                    home_held.append(span)
                    home_keys.append(first + torch.arange(size))
                else:
                    accumulate_send.setdefault(origin, []).append(span)
            if s in after:  # what arrives for the next step, with its accumulators
                arriving = torch.arange(after[s][1], after[s][1] + after[s][2])
                receive.setdefault(predecessor, []).append(arriving)
                accumulate_receive.setdefault(predecessor, []).append(arriving)
            if 0 < journeys[(s, rank)] == step:  # this rank's own accumulators come home from the journey's end
                last = members[(members.index(rank) + step) % len(members)]
                accumulate_receive.setdefault(last, []).append(size_after + first + torch.arange(own_size))
        pack = lambda d: {x: torch.cat(v).to(device) for x, v in d.items() if sum(t.numel() for t in v)}  # noqa: E731
        size = sum(n for _, _, n in here.values())
        empty = torch.zeros(0, dtype=torch.long)
        home = (torch.cat(home_held or [empty]).to(device), torch.cat(home_keys or [empty]).to(device))
        steps.append(RingStep(size, size_after, blocks.buckets(q_table.size, size, causal, device), pack(send),
                              pack(receive), pack(accumulate_send), pack(accumulate_receive), home))
    return steps


def plan_streams(streams: list[Stream], *, shard: int, world_size: int, rank: int, num_heads: int,
                 num_kv_heads: int, causal: bool, comm_mode: str, device) -> StreamPlan | None:
    """This rank's `StreamPlan` for a pair's streams (``None`` when it takes part in none). ``num_heads`` and
    ``num_kv_heads`` are the heads a rank holds."""
    if not any(rank in stream.members or rank in stream.span for stream in streams):
        return None
    q_table, keys = query_table(streams, rank), key_table(streams, rank)
    q_moves = moves(streams, rank, world_size, shard, num_heads, True, device)
    k_moves = moves(streams, rank, world_size, shard, num_kv_heads, False, device)
    gathered = ring = None
    if comm_mode == "allgather":
        gathered = gathered_keys(streams, rank, world_size, q_table, keys, causal, device)
    else:
        ring = ring_steps(streams, rank, q_table, keys, causal, device)
    return StreamPlan(q_table.size, keys.size, q_moves, k_moves, gathered, ring)
