"""PyTorch's key padding as documents: each row's trailing padding becomes a filler document of its own.

A padded batch is documents too: the real tokens of a row, and the padding after them, which no real token may see
(`ring_attention.documents`). `RingMultiheadDilatedAttention` takes ``key_padding_mask`` this way, and its output
rows at padding are 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ring_attention.validation import Boundaries, check_cu_seqlens


def padding_documents(padding: torch.Tensor, boundaries: Boundaries | None, seq_len: int) -> Boundaries:
    """Document boundaries per batch row once each row's trailing padding (``padding`` ``[B, N]``, ``True`` at a
    padded token) is a filler document of its own: the ``boundaries`` (``None``: one document) with the
    padding's first token added. Raises ``ValueError`` when a row's padding is not trailing."""
    valid = (~padding).sum(1)  # [B] tokens before the padding
    trailing = torch.arange(seq_len, device=padding.device).unsqueeze(0) >= valid.unsqueeze(1)
    if not torch.equal(trailing, padding):
        row = int((trailing != padding).any(1).nonzero()[0])
        raise ValueError(f"key_padding_mask row {row} is not trailing padding (True only after the last real token: "
                         f"{padding[row].int().tolist()}): put each row's padding at its end, or pass its documents "
                         f"as cu_seqlens")
    boundaries = boundaries or ((0, seq_len),)
    documents = []
    for b, start in enumerate(valid.tolist()):
        bounds = boundaries[b if len(boundaries) > 1 else 0]
        documents.append(tuple(sorted({*bounds, start})) if 0 < start < seq_len else bounds)
    return tuple(documents)


def _padding_problem(key_padding_mask, shape) -> str | None:
    if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != tuple(shape):
        got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, torch.Tensor) else key_padding_mask
        return f"key_padding_mask must be a [batch, seq] = {list(shape)} tensor, got {got}"
    if key_padding_mask.dtype == torch.bool:
        return None
    if key_padding_mask.is_floating_point() and bool(((key_padding_mask == 0) | key_padding_mask.isneginf()).all()):
        return None
    return (f"key_padding_mask must be boolean (True at padding) or a float mask of 0 and -inf, got dtype "
            f"{key_padding_mask.dtype} with other values: an additive bias per key is not supported")


def key_padding_documents(key_padding_mask: torch.Tensor, shape: tuple[int, int], cu_seqlens, group) -> tuple[
        torch.Tensor, Boundaries]:
    """PyTorch's ``key_padding_mask`` (``True``, or ``-inf``, at padding) of this rank's ``[batch, seq]`` slice as
    this rank's boolean padding and the documents of the whole sequence, the padding of each row a filler document
    of its own (`padding_documents`). Under a sequence group the ranks share their masks first, and a bad mask on
    any rank raises a ``ValueError`` on every rank."""
    problem = _padding_problem(key_padding_mask, shape)
    size = 1 if group is None else group.size()
    seq_len, rows = shape[1] * size, None
    if problem is None and cu_seqlens is not None:
        try:
            rows = check_cu_seqlens(cu_seqlens, seq_len, shape[0], key_padding_mask.device)
        except (ValueError, TypeError) as error:
            problem = str(error)
    if size > 1:
        refused = torch.tensor([problem is not None], dtype=torch.int32)
        dist.all_reduce(refused, op=dist.ReduceOp.MAX, group=group)
        if refused.item():
            raise ValueError(problem or "key_padding_mask was refused on another rank of the sequence group")
    elif problem is not None:
        raise ValueError(problem)
    padding = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask.isneginf()
    whole = padding
    if size > 1:
        slices = [torch.empty_like(padding, dtype=torch.uint8) for _ in range(size)]
        dist.all_gather(slices, padding.to(torch.uint8), group=group)
        whole = torch.cat(slices, dim=1).bool()  # [B, N]
    return padding, padding_documents(whole, rows, seq_len)
