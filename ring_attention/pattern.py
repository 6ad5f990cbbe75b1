"""Which rows each pair keeps, and how a pair sits on the ranks (docs/concepts.md: the operator, sharding).

This is bookkeeping: the attention itself lives elsewhere. A *piece* is the part of one segment that one rank
holds: the whole segment when it fits in a shard (a local pair), the whole shard when the segment spans several
ranks. Inside a piece, head ``h`` keeps positions ``o, o + r, ...`` with ``o`` the offset of its kv head (``h``
itself without grouped-query attention). The production core reads a pair's kept rows two ways:

- **views** (`RowView`): the rows of a local pair as strided views of the ``[B, L, H, D]`` tensor itself, no copy
  (`row_view`). Position ``o + i r`` of head ``h`` sits at ``(o + i r) * stride(L) + h * stride(H)``: for heads
  that share an offset that is affine in (piece, i, head), and so it is for heads whose offsets advance one by
  one with the head index (head ``h`` keeps ``o + h + i r``: position and head advance together).
- **a selection** (`Selection`): the rows of a pair that spans ranks, as index tensors; `gather_rows` copies them
  into one dense ``[B, n, h, D]`` block, which is what travels between ranks. Every head keeps the same number of
  rows there (``L % r == 0``). The lessons group a local pair's heads into several selections by count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ring_attention.validation import (
    check_head_mode,
    check_pairs,
    check_sequence_length,
    check_sharding,
    warn_uncovered,
)


@dataclass(frozen=True)
class Selection:
    """Query heads of one pair that keep the same number ``n`` of positions per piece, as index tensors."""

    q_heads: torch.Tensor  # [h] query heads
    kv_heads: torch.Tensor  # [h_kv] their distinct kv heads
    kv_index: torch.Tensor  # [h] for each query head, the index of its kv head in kv_heads
    q_positions: torch.Tensor  # [n, h] positions inside a piece, per query head
    kv_positions: torch.Tensor  # [n, h_kv] positions inside a piece, per kv head


@dataclass(frozen=True)
class RowView:
    """Kept rows of one pair that form one strided view of a ``[B, L, H, D]`` tensor.

    Head ``k`` of the view (``k < heads``) is query head ``q_head + k q_step`` and kv head
    ``kv_head + k kv_step``; it keeps the piece positions ``offset + k shift + i rate`` for ``i < count``
    (``shift`` 0: the heads share one offset; 1: the offset advances with the head).
    """

    offset: int
    count: int
    heads: int
    shift: int
    q_head: int
    q_step: int
    kv_head: int
    kv_step: int


@dataclass(frozen=True)
class PairLayout:
    """One (segment length, dilation rate) pair placed on ``world_size`` shards of length ``shard``."""

    index: int
    rate: int
    heads: range  # query heads that take this pair (global indices)
    piece_length: int  # tokens of one segment held by one rank
    group_size: int  # ranks one segment spans; 1 means the pair needs no communication
    views: tuple[RowView, ...]  # this rank's heads' kept rows (none: none of its heads takes the pair)
    span_rows: Selection | None  # the same rows as one selection, for a pair that spans ranks

    @property
    def spans_ranks(self) -> bool:
        return self.group_size > 1

    def segment_group(self, rank: int) -> list[int]:
        """The group-relative ranks that share ``rank``'s segment (rank's own position is ``rank % G``)."""
        first = rank - rank % self.group_size
        return list(range(first, first + self.group_size))


def pair_heads(num_heads: int, num_pairs: int, head_mode: str) -> list[range]:
    """Query heads taking each pair: all of them, or contiguous groups (remainder to the first groups)."""
    if head_mode == "all":
        return [range(num_heads)] * num_pairs
    base, extra = divmod(num_heads, num_pairs)
    sizes = [base + (i < extra) for i in range(num_pairs)]
    starts = [sum(sizes[:i]) for i in range(num_pairs)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def selection(
    heads: Sequence[int], rate: int, piece_length: int, heads_per_kv: int, first_head: int, device: torch.device
) -> Selection:
    """The kept rows of ``heads`` (global query heads that all keep the same number of positions per piece).

    Head indices in the selection are local: global minus ``first_head`` (the first query head this rank holds;
    its kv heads start at ``first_head // heads_per_kv``).
    """
    first_kv = first_head // heads_per_kv
    kv_heads = sorted({h // heads_per_kv for h in heads})
    (count,) = {len(range((h // heads_per_kv) % rate, piece_length, rate)) for h in heads}
    steps = torch.arange(count).unsqueeze(1) * rate  # [n, 1]
    return Selection(
        q_heads=torch.tensor([h - first_head for h in heads], device=device),
        kv_heads=torch.tensor([j - first_kv for j in kv_heads], device=device),
        kv_index=torch.tensor([kv_heads.index(h // heads_per_kv) for h in heads], device=device),
        q_positions=(steps + torch.tensor([(h // heads_per_kv) % rate for h in heads])).to(device),
        kv_positions=(steps + torch.tensor([j % rate for j in kv_heads])).to(device),
    )


def row_views(
    heads: Sequence[int], rate: int, piece_length: int, heads_per_kv: int, first_head: int
) -> tuple[RowView, ...]:
    """The kept rows of ``heads`` (global query heads taking a pair) as few strided views as possible.

    Query heads ``j g + m`` (``g = heads_per_kv``) of one *member* ``m`` use kv heads ``j``, so each member makes
    its own views (without grouped-query attention there is one member). Two decompositions compete, and the one
    with fewer views (fewer kernel calls) wins: one view per offset (kv heads ``o, o + r, ...`` share offset
    ``o``), or one view per run of consecutive kv heads whose offsets advance one by one (cut where the offset
    wraps to 0, or where the count of kept positions changes because ``piece_length`` is not a multiple of
    ``rate``). With 8 heads and rate 4, for example, the first gives 4 views of 2 heads, the second 2 views of 4.
    """
    first_kv = first_head // heads_per_kv

    def count(offset: int) -> int:
        return len(range(offset, piece_length, rate))

    by_offset, by_run = [], []
    for member in range(heads_per_kv):
        # a head whose offset is past the piece's end keeps nothing (a segment cut shorter than its rate)
        kv_heads = sorted({h // heads_per_kv for h in heads if h % heads_per_kv == member and count(
            (h // heads_per_kv) % rate)})
        for offset in sorted({j % rate for j in kv_heads}):
            sharing = [j for j in kv_heads if j % rate == offset]  # consecutive kv heads r apart
            by_offset.append(RowView(
                offset=offset, count=count(offset), heads=len(sharing), shift=0,
                q_head=sharing[0] * heads_per_kv + member - first_head, q_step=rate * heads_per_kv,
                kv_head=sharing[0] - first_kv, kv_step=rate))
        runs: list[list[int]] = []
        for j in kv_heads:
            joins = runs and j == runs[-1][-1] + 1 and j % rate != 0 and count(j % rate) == count(runs[-1][0] % rate)
            if joins:
                runs[-1].append(j)
            else:
                runs.append([j])
        by_run += [RowView(offset=run[0] % rate, count=count(run[0] % rate), heads=len(run), shift=1,
                           q_head=run[0] * heads_per_kv + member - first_head, q_step=heads_per_kv,
                           kv_head=run[0] - first_kv, kv_step=1) for run in runs]
    return tuple(by_offset if len(by_offset) <= len(by_run) else by_run)


def plan_pairs(
    seq_len: int,
    world_size: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    num_heads: int,
    head_mode: str = "all",
    num_kv_heads: int | None = None,
    device: torch.device | str = "cpu",
    local_heads: range | None = None,
) -> list[PairLayout]:
    """Validate a configuration for a sequence of ``seq_len`` tokens on ``world_size`` ranks and lay it out.

    ``local_heads`` are the query heads this rank holds (all of them by default; a contiguous range of whole
    kv-head groups when the heads are split over ranks); views and selections index them from 0, while the
    offsets and head modes follow the global head indices.
    """
    check_pairs(segment_lengths, dilation_rates)
    check_sequence_length(seq_len, segment_lengths)
    check_head_mode(head_mode, num_heads, len(segment_lengths))
    shard = check_sharding(seq_len, world_size, segment_lengths, dilation_rates)
    warn_uncovered(dilation_rates)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    heads_per_kv = num_heads // num_kv_heads
    local_heads = range(num_heads) if local_heads is None else local_heads
    layouts = []
    for i, (w, r, heads) in enumerate(
        zip(segment_lengths, dilation_rates, pair_heads(num_heads, len(segment_lengths), head_mode))
    ):
        segment = min(w, seq_len)
        piece_length = min(segment, shard)
        mine = [h for h in heads if h in local_heads]
        spanning = segment > shard and bool(mine)
        layouts.append(PairLayout(
            index=i, rate=r, heads=heads, piece_length=piece_length, group_size=segment // piece_length,
            views=row_views(mine, r, piece_length, heads_per_kv, local_heads.start),
            span_rows=selection(mine, r, piece_length, heads_per_kv, local_heads.start, torch.device(device))
            if spanning else None,
        ))
    return layouts


def gather_rows(x: torch.Tensor, piece_length: int, positions: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [B, L, H, ...] kept by a selection, as ``[B * L / piece_length, n, h, ...]`` (a batch row per
    piece)."""
    batch, length = x.shape[:2]
    pieces = x.reshape(batch * (length // piece_length), piece_length, *x.shape[2:])
    return pieces[:, positions, heads]


def scatter_rows(
    buffer: torch.Tensor, piece_length: int, positions: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor
) -> None:
    """Write ``rows`` (as returned by `gather_rows`) back into a contiguous ``buffer`` [B, L, H, ...] in place."""
    batch, length = buffer.shape[:2]
    buffer.view(batch * (length // piece_length), piece_length, *buffer.shape[2:])[:, positions, heads] = rows


def accumulate_rows(
    buffer: torch.Tensor, piece_length: int, positions: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor
) -> None:
    """Add ``rows`` into a contiguous ``buffer`` [B, L, H, ...] at a selection's rows, in place (gradients of keys
    shared by pairs add up)."""
    batch, length = buffer.shape[:2]
    buffer.view(batch * (length // piece_length), piece_length, *buffer.shape[2:])[:, positions, heads] += rows


def as_row_viewable(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, L, ...] itself if its rows can be viewed piece by piece (`row_view`), else a contiguous copy.

    That needs the batch and length dimensions to merge into one (``stride(0) == L stride(1)``, or one batch
    row), no zero strides (expanded tensors) and a contiguous last dimension, as the kernels want.
    """
    batch, length = x.shape[:2]
    mergeable = batch == 1 or x.stride(0) == length * x.stride(1)
    return x if mergeable and 0 not in x.stride()[1:] and x.stride(-1) == 1 else x.contiguous()


def row_view(
    x: torch.Tensor, piece_length: int, rate: int, view: RowView, kv: bool = False, *, start: int = 0,
    pieces: int | None = None,
) -> torch.Tensor:
    """The rows of ``view`` in ``x`` [B, L, H, ...] (query heads, or kv heads with ``kv``), as a
    ``[pieces, count, heads, ...]`` view sharing ``x``'s memory: by default every piece of every batch row
    (``B L / piece_length``; ``x`` must be `as_row_viewable`'s), or ``pieces`` consecutive pieces from token
    ``start`` of a one-row ``x`` (a document's run of whole segments)."""
    batch, length = x.shape[:2]
    stride_l, stride_h = x.stride(1), x.stride(2)
    head, step = (view.kv_head, view.kv_step) if kv else (view.q_head, view.q_step)
    return x.as_strided(
        (batch * (length // piece_length) if pieces is None else pieces, view.count, view.heads, *x.shape[3:]),
        (piece_length * stride_l, rate * stride_l, view.shift * stride_l + step * stride_h, *x.stride()[3:]),
        x.storage_offset() + (start + view.offset) * stride_l + head * stride_h,
    )
