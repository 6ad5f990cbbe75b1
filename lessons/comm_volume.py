"""What each family of sequence parallelism sends: bytes a rank receives per forward + backward (lesson 7).

Non-causal (so that no load-balancing re-layout adds to it), for a sequence of ``N`` tokens on ``P`` ranks
(``L = N / P`` each), ``H`` query heads and ``H_kv`` kv heads of ``D``, ``e`` bytes per element, every tensor in
one dtype (float32 in the lesson). Per pair whose segment spans a segment group of ``G`` ranks, with
``n = L / r`` selected rows per head and rank:

- **ring**: forward, ``G - 1`` blocks of K and V; backward, ``G - 1`` blocks of K and V again and ``G`` of
  the dK, dV accumulators (the last hop brings them home): ``(3 G - 2) 2 n H_kv D e``;
- **all-gather**: forward, the other ``G - 1`` ranks' K and V; backward, gathered again, and the other ranks'
  partial dK, dV of this rank's block reduced to it: ``3 (G - 1) 2 n H_kv D e``;
- **all-to-all** over ``U`` ranks (Ulysses): q, k, v to head shards and the output back in the forward, the
  output's gradient to head shards and dq, dk, dv back in the backward, each time ``(U - 1) / U`` of the tensor:
  ``(U - 1) / U L D e (4 H + 4 H_kv)``, whatever the pairs;
- **hybrid**: the all-to-all over ``U`` ranks, then the ring (or the all-gather) over the ``P / U`` sub-groups,
  on shards of ``U L`` tokens and ``H / U``, ``H_kv / U`` heads.

Every call also checks that the ranks agree on their shards' shapes, dtypes and devices: a gather of 10
integers of 8 bytes from each of the ``P - 1`` others.
"""

from __future__ import annotations

from collections.abc import Sequence

from ring_attention.pattern import plan_pairs


def agreement_check_bytes(world_size: int) -> int:
    """What one call's agreement check brings a rank: 10 integers of 8 bytes from each other rank."""
    return 10 * 8 * (world_size - 1)


def received_bytes(family: str, world_size: int, seq_len: int, segment_lengths: Sequence[int],
                   dilation_rates: Sequence[int], heads: int, kv_heads: int, head_dim: int, element_bytes: int,
                   ulysses_size: int = 1) -> int:
    """Bytes one rank receives in a non-causal forward + backward: ``family`` is ``"ring"`` or ``"allgather"``
    for the pairs that span ranks, after an all-to-all over ``ulysses_size`` ranks (1: none)."""
    u = ulysses_size
    shard = seq_len // world_size
    total = agreement_check_bytes(world_size)
    total += (u - 1) * shard * head_dim * element_bytes * (4 * heads + 4 * kv_heads) // u
    inner = plan_pairs(seq_len, world_size // u, segment_lengths, dilation_rates, heads, num_kv_heads=kv_heads)
    for layout in inner:
        if not layout.spans_ranks:
            continue
        g, rows = layout.group_size, u * shard // layout.rate
        block = 2 * rows * kv_heads // u * head_dim * element_bytes  # K and V of one rank, its kv heads
        total += (3 * g - 2) * block if family == "ring" else 3 * (g - 1) * block
    return total
