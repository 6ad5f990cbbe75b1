"""Which rows each pair selects, and how a pair sits on the ranks (docs/concepts.md: the operator, sharding).

This is bookkeeping shared by the lessons and the production code: the attention itself lives elsewhere.
A *piece* is the part of one segment that one rank holds: the whole segment when it fits in a shard
(a local pair), the whole shard when the segment spans several ranks. Inside a piece, head ``h`` keeps
positions ``o, o + r, ...`` with ``o`` the offset of its kv head (``h`` itself without grouped-query
attention). Heads whose offsets keep the same number of positions are gathered together, so one
attention call serves them all.
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
    """Heads of one pair that keep the same number ``n`` of positions per piece."""

    q_heads: torch.Tensor  # [h] query heads
    kv_heads: torch.Tensor  # [h_kv] their distinct kv heads
    kv_index: torch.Tensor  # [h] for each query head, the index of its kv head in kv_heads
    q_positions: torch.Tensor  # [n, h] positions inside a piece, per query head
    kv_positions: torch.Tensor  # [n, h_kv] positions inside a piece, per kv head


@dataclass(frozen=True)
class PairLayout:
    """One (segment length, dilation rate) pair placed on ``world_size`` shards of length ``shard``."""

    index: int
    segment: int  # effective segment length, min(w, N)
    rate: int
    heads: range  # query heads that take this pair
    piece: int  # tokens of one segment held by one rank
    group_size: int  # ranks one segment spans; 1 means the pair needs no communication
    selections: tuple[Selection, ...]

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


def head_selections(
    heads: range, rate: int, piece: int, num_heads: int, num_kv_heads: int, device: torch.device
) -> tuple[Selection, ...]:
    """Group ``heads`` by how many positions their offset keeps in a piece of length ``piece``."""
    heads_per_kv = num_heads // num_kv_heads
    by_count: dict[int, list[int]] = {}
    for h in heads:
        offset = (h // heads_per_kv) % rate
        by_count.setdefault(len(range(offset, piece, rate)), []).append(h)
    selections = []
    for count, q_heads in sorted(by_count.items()):
        kv_heads = sorted({h // heads_per_kv for h in q_heads})
        steps = torch.arange(count).unsqueeze(1) * rate  # [n, 1]
        q_offsets = torch.tensor([(h // heads_per_kv) % rate for h in q_heads])
        kv_offsets = torch.tensor([j % rate for j in kv_heads])
        selections.append(
            Selection(
                q_heads=torch.tensor(q_heads, device=device),
                kv_heads=torch.tensor(kv_heads, device=device),
                kv_index=torch.tensor([kv_heads.index(h // heads_per_kv) for h in q_heads], device=device),
                q_positions=(steps + q_offsets).to(device),
                kv_positions=(steps + kv_offsets).to(device),
            )
        )
    return tuple(selections)


def plan_pairs(
    seq_len: int,
    world_size: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    num_heads: int,
    head_mode: str = "all",
    num_kv_heads: int | None = None,
    device: torch.device | str = "cpu",
) -> list[PairLayout]:
    """Validate a configuration for a sequence of ``seq_len`` tokens on ``world_size`` ranks and lay it out."""
    check_pairs(segment_lengths, dilation_rates)
    check_sequence_length(seq_len, segment_lengths)
    check_head_mode(head_mode, num_heads, len(segment_lengths))
    shard = check_sharding(seq_len, world_size, segment_lengths, dilation_rates)
    warn_uncovered(dilation_rates)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    layouts = []
    for i, (w, r, heads) in enumerate(
        zip(segment_lengths, dilation_rates, pair_heads(num_heads, len(segment_lengths), head_mode))
    ):
        segment = min(w, seq_len)
        piece = min(segment, shard)
        selections = head_selections(heads, r, piece, num_heads, num_kv_heads, torch.device(device))
        layouts.append(PairLayout(i, segment, r, heads, piece, segment // piece, selections))
    return layouts


def gather_rows(x: torch.Tensor, piece: int, positions: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [B, L, H, ...] kept by a selection, as ``[B * L / piece, n, h, ...]`` (one batch row per piece)."""
    batch, length = x.shape[:2]
    pieces = x.reshape(batch * (length // piece), piece, *x.shape[2:])
    return pieces[:, positions, heads]


def scatter_rows(
    buffer: torch.Tensor, piece: int, positions: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor
) -> None:
    """Write ``rows`` (as returned by `gather_rows`) back into ``buffer`` [B, L, H, ...] in place."""
    batch, length = buffer.shape[:2]
    buffer.view(batch * (length // piece), piece, *buffer.shape[2:])[:, positions, heads] = rows


def accumulate_rows(
    buffer: torch.Tensor, piece: int, positions: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor
) -> None:
    """Add ``rows`` into ``buffer`` at a selection's rows, in place (gradients of keys shared by pairs add up)."""
    batch, length = buffer.shape[:2]
    buffer.view(batch * (length // piece), piece, *buffer.shape[2:])[:, positions, heads] += rows
