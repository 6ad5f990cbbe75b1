"""Stage 1 — the simulated ring: dilated attention computed the way P ranks would, in one process.

What changes from stage 0 (``reference``): nothing is dense any more. The sequence is cut into
``world_size`` contiguous shards and each *virtual rank* computes only its own rows:

1. For every pair, a rank keeps just the *dilated* rows of its shard (the positions its heads select,
   ``ring_attention.pattern``), so a pair with rate ``r`` costs ``L / r`` rows per head.
2. A pair whose segment fits in a shard is computed locally. A pair whose segment spans ``G`` ranks is
   computed by a ring: every rank starts with its own dilated keys/values, attends to them, passes them
   to the next rank and receives the previous rank's, ``G`` times. Here the "network" is a Python
   list rotated by one place; stage 2 makes it real.
3. The partial results (one per key block, one per pair) are combined by the online log-sum-exp merge,
   `merge_partials`, which is exact: the ring computes the same numbers as the dense softmax.

Causal attention skips key blocks that lie wholly in the future (they are never computed) and masks the
diagonal block, where a rank attends to its own keys. Gradients come from autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ring_attention.merge import merge_partials
from ring_attention.pattern import PairLayout, Selection, gather_rows, plan_pairs, scatter_rows, selection
from ring_attention.validation import check_pairs, check_qkv, check_sequence_length, check_sharding


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges run in float64 for float64 inputs, else in float32 (bf16/fp16 sums would lose the tail)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one query block to one key block, returning ``(out, lse)``.

    ``q`` is ``[B, Lq, h, D]``, ``k``/``v`` ``[B, Lk, h, D]``; ``out`` is ``[B, Lq, h, D]`` and ``lse``
    ``[B, Lq, h]``, both in the accumulation dtype. With ``causal`` the block is the diagonal one (a rank's
    queries against its own keys, square), so query ``i`` sees keys ``0..i``: never an empty row.
    """
    acc = accumulation_dtype(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale  # [B, h, Lq, Lk]
    if causal:
        assert q.shape[1] == k.shape[1], "a causal block must be square (the diagonal block)"
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, h, Lq]
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse.unsqueeze(-1)), v.to(acc))
    return out, lse.transpose(1, 2)


def pair_selections(layout: PairLayout, device: torch.device | str = "cpu") -> tuple[Selection, ...]:
    """A pair's heads grouped by how many positions they keep in a piece, one `Selection` per count.

    Heads whose offsets keep the same number of positions gather into one dense ``[B * pieces, n, h, D]``
    tensor; when the piece is not a multiple of the rate (the paper's ``w = 16384, r = 6``), offsets keep
    different counts and make separate selections.
    """
    by_count: dict[int, list[int]] = {}
    for h in layout.heads:
        by_count.setdefault(len(range(h % layout.rate, layout.piece_length, layout.rate)), []).append(h)
    return tuple(selection(heads, layout.rate, layout.piece_length, 1, 0, torch.device(device))
                 for _, heads in sorted(by_count.items()))


def merge_rows(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    piece_length: int,
    positions: torch.Tensor,
    heads: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Merge one selection's partial ``(out, lse)`` into a rank's running ``[B, L, H, D]``/``[B, L, H]`` result."""
    merged_out, merged_lse = merge_partials(
        gather_rows(acc_out, piece_length, positions, heads), gather_rows(acc_lse, piece_length, positions, heads),
        out, lse,
    )
    scatter_rows(acc_out, piece_length, positions, heads, merged_out)
    scatter_rows(acc_lse, piece_length, positions, heads, merged_lse)


def ring_pass(
    q_blocks: Sequence[torch.Tensor],
    kv_blocks: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    causal: bool,
    scale: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Simulate the ring of one segment group of ``G`` ranks; returns each rank's merged ``(out, lse)``.

    At step ``s`` rank ``i`` holds the key block of rank ``(i - s) % G``; after computing with it, every rank
    passes its block to rank ``i + 1``. A block from a later rank is entirely in the future: skipped.
    """
    group_size = len(q_blocks)
    held = list(kv_blocks)
    partials: list = [None] * group_size
    for step in range(group_size):
        for i in range(group_size):
            source = (i - step) % group_size
            if causal and source > i:
                continue
            out, lse = block_attention(q_blocks[i], *held[i], causal=causal and source == i, scale=scale)
            partials[i] = (out, lse) if partials[i] is None else merge_partials(*partials[i], out, lse)
        held = held[-1:] + held[:-1]  # the "communication": rank i now holds what rank i - 1 held
    return partials


def ring_schedule(
    world_size: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    seq_len: int,
    causal: bool = False,
) -> list[list[list[int | None]]]:
    """The ring's plan: ``schedule[pair][step][rank]`` is the rank whose keys ``rank`` uses at that step.

    ``None`` marks a skipped block (causal: keys from a later rank). A local pair has a single step.
    """
    check_pairs(segment_lengths, dilation_rates)
    check_sequence_length(seq_len, segment_lengths)
    shard = check_sharding(seq_len, world_size, segment_lengths, dilation_rates)
    schedule = []
    for w in segment_lengths:
        group_size = max(1, min(w, seq_len) // shard)
        steps = []
        for step in range(group_size):
            row: list[int | None] = []
            for rank in range(world_size):
                first, i = rank - rank % group_size, rank % group_size
                source = (i - step) % group_size
                row.append(None if causal and source > i else first + source)
            steps.append(row)
        schedule.append(steps)
    return schedule


def simulated_ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    world_size: int,
    causal: bool = False,
    head_mode: str = "all",
) -> torch.Tensor:
    """Dilated attention of full ``[B, N, H, D]`` tensors, computed by ``world_size`` virtual ranks.

    Each virtual rank only ever touches its own shard of ``q`` and the dilated key/value blocks that
    reach it through the (simulated) ring. Returns the ``[B, N, H, D]`` output, rank shards concatenated;
    differentiable by autograd.
    """
    check_qkv(q, k, v)
    batch, seq_len, num_heads, head_dim = q.shape
    layouts = plan_pairs(
        seq_len, world_size, segment_lengths, dilation_rates, num_heads, head_mode, device=q.device
    )
    scale = 1.0 / math.sqrt(head_dim)
    q_shards, k_shards, v_shards = (t.chunk(world_size, dim=1) for t in (q, k, v))  # each [B, L, H, D]
    acc = accumulation_dtype(q.dtype)
    shard = seq_len // world_size
    acc_out = [q.new_zeros(batch, shard, num_heads, head_dim, dtype=acc) for _ in range(world_size)]
    acc_lse = [q.new_full((batch, shard, num_heads), -math.inf, dtype=acc) for _ in range(world_size)]
    for layout in layouts:
        for sel in pair_selections(layout, q.device):
            # each rank's dilated rows: [B * pieces, n, h, D]
            q_dil = [gather_rows(x, layout.piece_length, sel.q_positions, sel.q_heads) for x in q_shards]
            k_dil = [gather_rows(x, layout.piece_length, sel.kv_positions, sel.kv_heads) for x in k_shards]
            v_dil = [gather_rows(x, layout.piece_length, sel.kv_positions, sel.kv_heads) for x in v_shards]
            for first in range(0, world_size, layout.group_size):
                group = range(first, first + layout.group_size)
                partials = ring_pass(
                    [q_dil[p] for p in group], [(k_dil[p], v_dil[p]) for p in group], causal=causal, scale=scale
                )
                for p, (out, lse) in zip(group, partials):
                    merge_rows(acc_out[p], acc_lse[p], layout.piece_length, sel.q_positions, sel.q_heads, out, lse)
    return torch.cat(acc_out, dim=1).to(q.dtype)
