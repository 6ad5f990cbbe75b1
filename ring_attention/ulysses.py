"""All-to-all over heads (DeepSpeed-Ulysses, Jacobs et al. 2023) and its hybrid with the ring (USP, Fang & Zhao
2024), for dilated attention (lesson 7).

With ``ulysses_size=U`` the sequence group of ``P`` ranks is cut into ``P / U`` *sub-groups* of ``U``
consecutive ranks. Inside a sub-group one all-to-all turns this rank's sequence shard ``[B, L, H, D]`` into a
head shard ``[B, U L, H / U, D]``: the ``U L`` tokens of the whole sub-group for the ``H / U`` heads
``[u H / U, (u + 1) H / U)`` of sub-group rank ``u`` (kv heads alike, ``H_kv / U`` each). The pairs then run over
the *inter-group* — the ``P / U`` ranks that hold the same heads, one per sub-group — with the ring or the
all-gather on blocks of ``U L`` tokens, and a second all-to-all returns this rank's rows. Heads keep their
global indices, so their dilation offsets do not change. ``U = 1`` is the ring alone; ``U = P`` is pure
Ulysses, where every pair is local. The backward of an all-to-all is the inverse all-to-all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ring_attention import comm as C


def check_ulysses_size(ulysses_size: int, group_size: int, num_heads: int, num_kv_heads: int) -> None:
    """``ulysses_size`` must be a positive int that divides the sequence group's size and both head counts."""
    if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int) or ulysses_size < 1:
        raise ValueError(f"ulysses_size must be a positive int, got {ulysses_size!r}")
    if group_size % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size} must divide the sequence group size {group_size}: use a "
                         f"divisor of {group_size} (1 for the ring alone, {group_size} for all-to-all alone)")
    for name, heads in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if heads % ulysses_size:
            raise ValueError(f"ulysses_size={ulysses_size} must divide {name}={heads}: each rank of a sub-group "
                             f"takes {name} / ulysses_size heads")


def ulysses_groups(group: dist.ProcessGroup, ulysses_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """This rank's sub-group (``U`` consecutive ranks) and inter-group (the ranks holding the same heads; ``None``
    when ``U`` is the whole group: all-to-all alone)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    first = rank - rank % ulysses_size
    sub = C.subgroup(group, list(range(first, first + ulysses_size)))
    if ulysses_size == size:
        return sub, None
    return sub, C.subgroup(group, list(range(rank % ulysses_size, size, ulysses_size)))


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, to_heads: bool) -> torch.Tensor:
    """``[B, L, H, ...]`` -> ``[B, U L, H / U, ...]`` (``to_heads``), or back."""
    size, me = dist.get_world_size(group), dist.get_rank(group)
    split, join = (2, 1) if to_heads else (1, 2)  # cut along heads and stack tokens, or the reverse
    pieces = x.chunk(size, dim=split)  # piece j goes to sub-group rank j
    received = [pieces[me] if j == me else torch.empty_like(pieces[j]) for j in range(size)]
    C.send_and_receive([(pieces[j], j) for j in range(size) if j != me],
                       [(received[j], j) for j in range(size) if j != me], group)
    return torch.cat(received, dim=join)


class AllToAll(torch.autograd.Function):
    """`_all_to_all` with its inverse as backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.to_heads = group, to_heads
        return _all_to_all(x, group, to_heads)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group, not ctx.to_heads), None, None
