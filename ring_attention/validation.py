"""Argument checks shared by the reference, the lessons and the production package.

Every rule raises a ``ValueError`` (or ``TypeError``) whose message names the argument, the value it
had and how to fix it. Nothing is clamped or silently adjusted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

HEAD_MODES = ("all", "groups")


def check_pairs(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> None:
    """Check the (segment length, dilation rate) pairs of a configuration."""
    for name, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a list of positive ints, got {values!r}")
        if len(values) == 0:
            raise ValueError(f"{name} is empty; give at least one (segment length, dilation rate) pair")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must hold ints, got {value!r} in {list(values)}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value} in {list(values)}")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got "
            f"{len(segment_lengths)} and {len(dilation_rates)}: give one dilation rate per segment length"
        )
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        if r > w:
            raise ValueError(
                f"dilation_rates[{i}]={r} is larger than segment_lengths[{i}]={w}; "
                f"a segment must hold at least one position per head offset, use a rate <= {w}"
            )


def _sequence_length_problem(seq_len: int, segment_lengths: Sequence[int]) -> str | None:
    for i, w in enumerate(segment_lengths):
        if seq_len % min(w, seq_len) != 0:
            return (f"sequence length {seq_len} must be divisible by every segment length; "
                    f"{seq_len} % {w} != 0 (segment_lengths[{i}]): pad the sequence or change the segment")
    return None


def check_sequence_length(seq_len: int, segment_lengths: Sequence[int]) -> None:
    """The sequence must be cut into whole segments by every pair (segments longer than it are cut to it): the
    lessons' rule, and the production core's tiled layout (`tiles_shards`)."""
    problem = _sequence_length_problem(seq_len, segment_lengths)
    if problem:
        raise ValueError(problem)


def check_head_mode(head_mode: str, num_heads: int, num_pairs: int) -> None:
    if head_mode not in HEAD_MODES:
        raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    if head_mode == "groups" and num_heads < num_pairs:
        raise ValueError(
            f"head_mode='groups' needs num_heads >= number of pairs, got num_heads={num_heads} "
            f"for {num_pairs} pairs: use fewer pairs, more heads, or head_mode='all'"
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, allow_gqa: bool = False) -> None:
    """q, k, v are ``[batch, seq, heads, head_dim]`` on one device with one dtype.

    With ``allow_gqa`` k and v may have fewer heads than q, as long as they divide it.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype={t.dtype} differs from q.dtype={q.dtype}: cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name}.device={t.device} differs from q.device={q.device}: move them to one device")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, seq and head_dim "
            f"(dilated attention is self-attention over one sequence)"
        )
    heads, kv_heads = q.shape[2], k.shape[2]
    if allow_gqa:
        if heads % kv_heads != 0:
            raise ValueError(
                f"k has {kv_heads} heads, which does not divide q's {heads} heads: grouped-query attention "
                f"needs num_heads % num_kv_heads == 0"
            )
    elif heads != kv_heads:
        raise ValueError(f"q has {heads} heads and k has {kv_heads}: they must be equal here")


def warn_uncovered(dilation_rates: Sequence[int]) -> None:
    """Rows that no pair selects are 0; that is legal but rarely wanted, so say it once."""
    if 1 not in dilation_rates:
        warnings.warn(
            f"no pair has dilation rate 1 (dilation_rates={list(dilation_rates)}): some (head, position) "
            f"rows are selected by no pair and their output is 0",
            UserWarning,
            stacklevel=3,
        )


def _sharding_problem(seq_len: int, world_size: int, segment_lengths: Sequence[int],
                      dilation_rates: Sequence[int]) -> str | None:
    if seq_len % world_size != 0:
        return (f"sequence length {seq_len} must be divisible by world_size={world_size}: "
                f"pad the sequence or use a world size that divides it")
    shard = seq_len // world_size
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        w_eff = min(w, seq_len)
        if w_eff <= shard and shard % w_eff != 0:
            return (f"pair {i} (w={w}, r={r}): shard length {shard} must be a multiple of the segment length "
                    f"{w_eff} (L % w == 0) so that no segment is cut by a rank boundary")
        if w_eff > shard and w_eff % shard != 0:
            return (f"pair {i} (w={w}, r={r}): a segment longer than a shard must cover whole shards; "
                    f"{w_eff} % {shard} != 0 (w % L == 0): change the world size or the segment length")
        if w_eff > shard and shard % r != 0:
            return (f"pair {i} (w={w}, r={r}): shard length {shard} must be divisible by the dilation rate "
                    f"{r} (L % r == 0) so every rank holds the same number of dilated tokens")
    return None


def check_sharding(
    seq_len: int, world_size: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> int:
    """Check that a sequence of ``seq_len`` tokens can be split over ``world_size`` ranks in the tiled layout.

    Returns the shard length ``L``. Sharding (docs/concepts.md): a pair whose segment fits in a shard needs
    ``L % w == 0``; a pair whose segment spans ranks needs ``w % L == 0`` and ``L % r == 0``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    problem = _sharding_problem(seq_len, world_size, segment_lengths, dilation_rates)
    if problem:
        raise ValueError(problem)
    return seq_len // world_size


def tiles_shards(seq_len: int, world_size: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> bool:
    """Whether every pair's segments tile the sequence and its ``world_size`` shards (the rules of
    `check_sequence_length` and `check_sharding`): the production core's fast tiled layout. Other lengths are
    computed as one document with a shorter last segment (`ring_attention.documents`)."""
    return (_sequence_length_problem(seq_len, segment_lengths) is None
            and _sharding_problem(seq_len, world_size, segment_lengths, dilation_rates) is None)


Boundaries = tuple[tuple[int, ...], ...]  # one tuple of document boundaries shared by every row, or one per row
# what a caller may pass as cu_seqlens: boundaries shared by every row, or a list with one per row
CuSeqlens = torch.Tensor | Sequence[int] | Sequence[torch.Tensor | Sequence[int]]


def _abbreviated(values: Sequence[int]) -> str:
    values = list(values)
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:5]))}, ..., {values[-1]}]"


def _boundaries_of_row(row, seq_len: int, where: str, device: torch.device) -> tuple[int, ...]:
    if isinstance(row, torch.Tensor):
        if row.dim() != 1:
            raise ValueError(f"{where} must be 1-D, got a tensor of shape {tuple(row.shape)}: give one 1-D tensor of "
                             f"boundaries shared by every row, or a list with one 1-D tensor per batch row")
        if row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
            raise ValueError(f"{where} must hold integers, got dtype {row.dtype}: pass torch.int32 or torch.int64 "
                             f"boundaries")
        if row.device.type not in ("cpu", device.type) or (row.device.type == device.type != "cpu"
                                                          and row.device != device):
            raise ValueError(f"{where} is on device {row.device} but q is on {device}: pass it on q's device or "
                             f"on the CPU")
        values = [int(x) for x in row.tolist()]
    elif isinstance(row, Sequence) and not isinstance(row, (str, bytes)):
        if any(isinstance(x, bool) or not isinstance(x, int) for x in row):
            raise ValueError(f"{where} must hold integers, got {list(row)!r}: document boundaries are token indices")
        values = list(row)
    else:
        raise TypeError(f"{where} must be a 1-D integer tensor or a sequence of ints, got {type(row).__name__}")
    shown = _abbreviated(values)
    if len(values) < 2:
        raise ValueError(f"{where}={shown} needs at least two boundaries, [0, ..., {seq_len}]: the first document "
                         f"starts at 0 and the last ends at the sequence length")
    if values[0] != 0:
        raise ValueError(f"{where}={shown} must start at 0 (the first document's start), got {values[0]}")
    if values[-1] != seq_len:
        raise ValueError(f"{where}={shown} must end at the sequence length {seq_len}, got {values[-1]}: boundaries "
                         f"are over the whole (global) sequence; pad it with a filler document if needed")
    for i in range(1, len(values)):
        if values[i] <= values[i - 1]:
            raise ValueError(f"{where}={shown} must be strictly increasing: entry {i} ({values[i]}) <= entry {i - 1} "
                             f"({values[i - 1]}); every document holds at least one token")
    return tuple(values)


def _last_entry(cu_seqlens) -> object:
    """The last boundary when it can be read without a copy from another device (``None`` otherwise)."""
    if isinstance(cu_seqlens, torch.Tensor):
        readable = cu_seqlens.dim() == 1 and cu_seqlens.numel() > 0 and cu_seqlens.device.type != "meta"
        return int(cu_seqlens[-1]) if readable and not cu_seqlens.is_floating_point() else None
    is_list = isinstance(cu_seqlens, Sequence) and not isinstance(cu_seqlens, (str, bytes)) and len(cu_seqlens) > 0
    return cu_seqlens[-1] if is_list else None


def _flattened_rows(cu_seqlens, seq_len: int, batch: int, device: torch.device) -> Boundaries:
    """flash-attn's convention for a batch: boundaries over its rows laid end to end (``batch * seq_len`` tokens),
    which must include every row's end (no document crosses a row)."""
    values = _boundaries_of_row(cu_seqlens, batch * seq_len, "cu_seqlens", device)
    missing = [b * seq_len for b in range(1, batch) if b * seq_len not in values]
    if missing:
        raise ValueError(f"cu_seqlens={_abbreviated(values)} spans the {batch} rows of {seq_len} tokens laid end to "
                         f"end (flash-attn's convention) but has no boundary at {missing}: a document cannot cross "
                         f"rows; add the row ends, or give one list per row")
    return tuple(tuple(x - b * seq_len for x in values if b * seq_len <= x <= (b + 1) * seq_len)
                 for b in range(batch))


def check_cu_seqlens(cu_seqlens: CuSeqlens, seq_len: int, batch: int, device: torch.device | str = "cpu") -> Boundaries:
    """Document boundaries (flash-attn's ``cu_seqlens``) over a sequence of ``seq_len`` tokens, as host ints.

    ``cu_seqlens`` is a 1-D integer tensor or a sequence of ints shared by every batch row, or a list with one per
    row (``batch`` of them); each is ``[0 = b_0 < b_1 < ... < b_m = seq_len]``. A 1-D one that ends at
    ``batch * seq_len`` follows flash-attn's convention for a batch: the rows laid end to end, each row's end one of
    its boundaries. Returns a tuple holding one tuple of boundaries (shared) or ``batch`` of them (one per row). A
    tensor must be on the CPU or on ``device`` (q's).
    """
    device = torch.device(device)
    per_row = (isinstance(cu_seqlens, (list, tuple)) and len(cu_seqlens) > 0
               and all(isinstance(row, (torch.Tensor, list, tuple)) for row in cu_seqlens))
    if not per_row:
        if batch > 1 and _last_entry(cu_seqlens) == batch * seq_len:
            return _flattened_rows(cu_seqlens, seq_len, batch, device)
        return (_boundaries_of_row(cu_seqlens, seq_len, "cu_seqlens", device),)
    if len(cu_seqlens) != batch:
        raise ValueError(f"cu_seqlens has {len(cu_seqlens)} rows of boundaries but the batch has {batch} rows: give "
                         f"one per batch row, or one 1-D list shared by every row")
    return tuple(_boundaries_of_row(row, seq_len, f"cu_seqlens[{i}]", device) for i, row in enumerate(cu_seqlens))
