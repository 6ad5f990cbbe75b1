"""Merging attention partials by their log-sum-exp, and grouped-query heads: one home for the lessons and the core.

A *partial* is attention over a subset of a row's keys: its output ``out`` (the softmax-weighted mean of those
keys' values) and its log-sum-exp ``lse`` (the log of the softmax denominator over those keys). Two partials over
disjoint key sets merge exactly into attention over their union (`merge_partials`); the ring merges one key block
at a time, and the dilated operator merges its pairs the same way (LongNet, Ding et al. 2023, Eq. 10).
"""

from __future__ import annotations

import math

import torch

from ring_attention.pattern import Selection


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention over key set A with attention over a disjoint key set B into attention over A ∪ B.

    Derivation, with ``Z_A = sum_{j in A} exp(s_j) = exp(lse_a)`` and ``out_a = sum_{j in A} exp(s_j) v_j / Z_A``:
        Z = Z_A + Z_B                        so  lse = log(exp(lse_a) + exp(lse_b))
        out = (Z_A out_a + Z_B out_b) / Z    so  out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b
        subtract the larger lse before exp, so nothing overflows.
    A row that saw no key in either part (``lse = -inf`` in both) stays ``out = 0, lse = -inf``; the ``where``
    calls choose safe values *before* exp/log, so that neither the result nor its gradient is NaN.
    ``out`` is ``[..., D]``, ``lse`` ``[...]``.
    """
    peak = torch.maximum(lse_a, lse_b)
    empty = peak == -math.inf
    peak = torch.where(empty, torch.zeros_like(peak), peak)
    weight_a, weight_b = torch.exp(lse_a - peak), torch.exp(lse_b - peak)
    total = torch.where(empty, torch.ones_like(peak), weight_a + weight_b)
    out = (weight_a.unsqueeze(-1) * out_a + weight_b.unsqueeze(-1) * out_b) / total.unsqueeze(-1)
    return out, torch.where(empty, torch.full_like(peak, -math.inf), peak + torch.log(total))


def merge_into(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Merge a partial ``(part_out, part_lse)`` into the running ``(out, lse)`` in place (views of accumulators).

    `merge_partials` without its guards, for the core: a kernel's ``part_lse`` is finite (every kept query sees at
    least itself), so ``logaddexp`` and the weights never meet ``-inf - -inf``; a running ``lse`` of ``-inf`` (no
    key yet) gives weight 0 to the running ``out`` (zeros) and exactly 1 to the partial.
    """
    merged = torch.logaddexp(lse, part_lse)
    out.mul_(torch.exp(lse - merged).unsqueeze(-1)).add_(torch.exp(part_lse - merged).unsqueeze(-1) * part_out)
    lse.copy_(merged)


def expand_kv(x: torch.Tensor, sel: Selection) -> torch.Tensor:
    """kv heads ``[B, n, h_kv, D]`` -> one per query head ``[B, n, h, D]`` (grouped-query attention)."""
    return x if sel.kv_heads.numel() == sel.q_heads.numel() else x.index_select(2, sel.kv_index)


def reduce_kv(grad: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Gradient per query head ``[B, n, h, D]`` -> per kv head ``[B, n, h_kv, D]``: query heads sharing a kv
    head add up."""
    if sel.kv_heads.numel() == sel.q_heads.numel():
        return grad
    shape = (*grad.shape[:2], sel.kv_heads.numel(), grad.shape[3])
    return grad.new_zeros(shape).index_add_(2, sel.kv_index, grad)
