"""Communication for sequence parallelism: process groups, ring exchanges, gathers, sequence helpers.

Ranks are *group-relative* everywhere in this package (rank ``p`` of the sequence group holds tokens
``[p L, (p + 1) L)``); point-to-point messages are addressed with the global rank resolved from the group,
so a sequence group inside a 2-D (data x sequence) mesh works.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ring_attention.pattern import PairLayout

GroupLike = dist.ProcessGroup | DeviceMesh | None

# (default group, global ranks) -> process group of those ranks (a segment group, a sub-group), made once per process
_GROUPS: dict[tuple, dist.ProcessGroup] = {}


def resolve_group(group: GroupLike) -> dist.ProcessGroup | None:
    """A ``ProcessGroup`` for a group or a 1-D ``DeviceMesh``; ``None`` stays ``None`` (no sequence parallelism)."""
    if group is None or isinstance(group, dist.ProcessGroup):
        return group
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"group must be a 1-D DeviceMesh, got a {group.ndim}-D mesh {group.mesh_dim_names}: "
                f"pass the sequence dimension, e.g. mesh['sp']"
            )
        return group.get_group()
    raise TypeError(f"group must be a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


# what a shard's dtype and device type are encoded as when the ranks compare their shards
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "meta")


def _describe(code: list[int]) -> str:
    dtype = _DTYPES[code[8]] if 0 <= code[8] < len(_DTYPES) else "another dtype"
    device = _DEVICE_TYPES[code[9]] if 0 <= code[9] < len(_DEVICE_TYPES) else "another device type"
    documents = "" if code[10] == 0 else f" documents #{code[10]:x}"
    return f"q {code[:4]} k {code[4:8]} {dtype} {device}{documents}"


def check_same_shards(q: torch.Tensor, k: torch.Tensor, group: dist.ProcessGroup, documents: int = 0) -> None:
    """Raise the same ``ValueError`` on every rank when the ranks' shards differ in shape, dtype or device type, or
    their documents (``documents``: a fingerprint of the ``cu_seqlens`` boundaries, 0 for none) differ.

    Every later message assumes that all ranks send tensors of one size and plan the same documents: a rank that
    disagreed would hang in a receive, or read half of another rank's bytes. One small all-gather settles it first.
    """
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    device = _DEVICE_TYPES.index(q.device.type) if q.device.type in _DEVICE_TYPES else -1
    mine = torch.tensor([*q.shape, *k.shape, dtype, device, documents], device=q.device)
    codes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(codes, mine, group=group)
    if any(not torch.equal(c, codes[0]) for c in codes):
        listed = ", ".join(f"rank {r}: {_describe(c.tolist())}" for r, c in enumerate(codes))
        raise ValueError(
            f"the q/k shards or the cu_seqlens differ between the ranks of the sequence group ({listed}): every rank "
            f"must pass its own equal-length slice of the same sequence, with the same dtype, device type and "
            f"documents (cu_seqlens over the whole sequence, the same on every rank)"
        )


def post(sends: list[tuple[torch.Tensor, int]], receives: list[tuple[torch.Tensor, int]], group: dist.ProcessGroup):
    """Post every ``(tensor, group rank)`` send and receive in one batch; returns the requests (wait on each)."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, peer), group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for t, peer in receives]
    return dist.batch_isend_irecv(ops) if ops else []


def start_exchange(tensors: list[torch.Tensor], send_to: int, recv_from: int, group: dist.ProcessGroup):
    """Post sends to group rank ``send_to`` and receives from ``recv_from``; returns (buffers, requests)."""
    incoming = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    return incoming, post([(t, send_to) for t in tensors], [(t, recv_from) for t in incoming], group)


def finish_exchange(pending) -> list[torch.Tensor]:
    """Wait for an exchange posted by `start_exchange` and return the received tensors."""
    incoming, requests = pending
    for request in requests:
        request.wait()
    return incoming


def send_and_receive(sends: list[tuple[torch.Tensor, int]], receives: list[tuple[torch.Tensor, int]],
                     group: dist.ProcessGroup) -> None:
    """Post every ``(tensor, group rank)`` send and receive in one batch and wait for all of them.

    Messages between two ranks are matched in the order they are posted: post them in the same order on both.
    """
    for request in post(sends, receives, group):
        request.wait()


def subgroup(group: dist.ProcessGroup, members: list[int]) -> dist.ProcessGroup:
    """The process group of ``members`` (ranks of ``group``), made once per process and cached; ``group`` itself
    when they are all of it.

    Made with ``use_local_synchronization=True``: only the members take part, so each sequence group of a 2-D
    mesh (or each sub-group of one sequence group) makes its own without the others. Members make their groups
    in the same order (pair by pair, sub-group before inter-group).
    """
    if len(members) == dist.get_world_size(group):
        return group
    ranks = tuple(dist.get_global_rank(group, r) for r in members)
    key = (dist.group.WORLD, ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _GROUPS[key]


def segment_process_group(layout: PairLayout, rank: int, group: dist.ProcessGroup) -> dist.ProcessGroup:
    """The process group of ``rank``'s segment group for a pair that spans ranks (`subgroup`)."""
    return subgroup(group, layout.segment_group(rank))


def all_gather_blocks(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x`` from every rank of ``group``, stacked: ``[G, *x.shape]``."""
    blocks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(blocks, x.contiguous(), group=group)
    return torch.stack(blocks)


def reduce_scatter_blocks(blocks: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of `all_gather_blocks` for gradients: rank ``j`` receives ``sum over ranks of blocks[j]``."""
    pieces = list(blocks.contiguous().unbind(0))
    mine = torch.empty_like(pieces[0])
    dist.reduce_scatter(mine, pieces, group=group)
    return mine


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return torch.cat(list(all_gather_blocks(x, group).unbind(0)), dim=dim)

    @staticmethod
    def backward(ctx, grad):
        rank, size = group_rank_and_size(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None


def _check_sequence_dim(x: torch.Tensor, size: int, dim: int) -> None:
    if x.shape[dim] % size != 0:
        raise ValueError(
            f"sequence length {x.shape[dim]} (dim={dim}) must be divisible by the sequence group size {size}: "
            f"pad the sequence"
        )


def shard_sequence(x: torch.Tensor, group: GroupLike, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of ``x`` along ``dim``: rank ``p`` of ``group`` gets the ``p``-th of ``P``.

    A plain slice (its gradient flows back to the full tensor); ``group=None`` returns ``x``.
    """
    pg = resolve_group(group)
    rank, size = group_rank_and_size(pg)
    _check_sequence_dim(x, size, dim)
    return x.chunk(size, dim=dim)[rank]


def gather_sequence(x: torch.Tensor, group: GroupLike, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's shard along ``dim`` (inverse of `shard_sequence`), differentiably.

    Every rank receives the full tensor; the backward returns each rank the gradient of its own slice
    (so the computation after the gather is expected to be the same on every rank of the group).
    """
    pg = resolve_group(group)
    return x if pg is None else _GatherSequence.apply(x, pg, dim)
