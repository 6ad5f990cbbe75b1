"""Attention blocks of many different lengths, computed in a few kernel calls (lesson 8).

Packed documents cut a pair into pieces of every length: a document's tail, a document shorter than a segment,
the part of a piece that one rank holds. Each piece and head is one *block*: ``n`` query rows against ``m`` key rows,
both arithmetic progressions of positions (the kept rows of the piece, ``start + i step``) of one head. A kernel call
per block would cost more in Python than in arithmetic, so blocks are grouped into *buckets* of similar lengths and
each bucket is one call on ``[blocks, 1, T, D]`` tensors padded to the bucket's lengths:

On CUDA the flash kernels take no key mask: there the blocks are packed end to end instead, without padding, for
the variable-length kernels (`ring_attention.varlen_kernels`). Elsewhere (the CPU, PyTorch's memory-efficient
kernel, the ``math`` oracle) each bucket is padded:

- padded query rows are zeros and their output is dropped (their gradient is zero, and so is what they add to
  the keys' gradients: their output gradient is zero);
- padded key rows are hidden by a key mask of ``-inf``, except on a causal (square) block, where they come after
  every real query and causality already hides them;
- bucket lengths come from a ladder, exact up to 16 rows and then in steps of at most 5%, so a block of more than
  16 rows computes at most ~10% more than its own work (``1.05^2``); smaller ones pad more, but their work is
  tiny; `Buckets.padded_work` measures what a plan pads.

Rows are gathered from any ``[B, L, H, D]`` source whose rows are ``D`` contiguous elements (every layout a caller
hands over, copied once otherwise, `RowSource`), or from a packed table ``[n, D]`` (rows received from other ranks).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import torch

from ring_attention.kernels import block_attention, block_attention_backward
from ring_attention.merge import merge_partials
from ring_attention.varlen_kernels import PACKED_BACKENDS, varlen_attention, varlen_attention_backward

LADDER_STEP = 1.05  # bucket lengths grow by at most 5% above 16 rows


def _ladder(limit: int) -> list[int]:
    """Padded lengths: every length up to 16, then steps of at most `LADDER_STEP`."""
    lengths = list(range(1, 17))
    while lengths[-1] < limit:
        lengths.append(max(lengths[-1] + 1, int(lengths[-1] * LADDER_STEP)))
    return lengths


def padded_length(n: int, ladder: list[int]) -> int:
    return ladder[bisect.bisect_left(ladder, n)]


@dataclass(frozen=True)
class Rows:
    """One arithmetic progression of rows per block, in a ``[B, L, H, ...]`` space: row ``i < count[s]`` of block ``s``
    is ``(batch[s], start[s] + i step[s], head[s])``. Host-side lists of ints."""

    batch: list[int]
    start: list[int]
    step: list[int]
    count: list[int]
    head: list[int]


def _canonical(rows: Rows, blocks: list[int], length: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Row indices of ``blocks`` padded to ``length``, in the contiguous ``[B * L * H]`` numbering of ``shape``
    (``[S, length]``, padding points at row 0), and which are real (``[S, length]``)."""
    pick = torch.tensor(blocks)
    batch, start, step, count, head = (torch.tensor(getattr(rows, name))[pick].unsqueeze(1)
                                       for name in ("batch", "start", "step", "count", "head"))
    i = torch.arange(length).unsqueeze(0)
    valid = i < count
    index = ((batch * shape[1] + start + i * step) * shape[2] + head).masked_fill(~valid, 0)
    return index, valid


@dataclass(frozen=True)
class Packed:
    """Every block's real rows end to end: query and key rows (contiguous numbering), cumulative lengths (int32,
    one more than blocks) and the longest block."""

    q_rows: torch.Tensor
    k_rows: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


@dataclass(frozen=True)
class Bucket:
    """One kernel call: ``S`` blocks padded to ``q_length`` queries and ``k_length`` keys."""

    q_index: torch.Tensor  # [S, Tq] query rows (contiguous numbering of the query space)
    q_valid: torch.Tensor  # [S, Tq]
    k_index: torch.Tensor  # [S, Tk] key rows (contiguous numbering of the key space)
    k_valid: torch.Tensor  # [S, Tk]
    q_real: torch.Tensor  # [n] the real query rows, in the padded [S * Tq] order
    k_real: torch.Tensor  # [m] the real key rows, in the padded [S * Tk] order
    masked: bool  # whether keys are padded where causality does not hide them


class Buckets:
    """Blocks ``q_rows`` x ``k_rows`` (causal: square diagonal blocks) grouped into padded kernel calls.

    ``q_shape`` and ``k_shape`` are ``(B, L, H)`` of the query space and of the key space (the kv tensors, or a
    table ``(1, n, 1)``). Built once per plan; `forward` and `backward` run it on a call's tensors.
    """

    def __init__(self, q_rows: Rows, k_rows: Rows, causal: bool, q_shape, k_shape, device):
        self.causal, self.q_shape, self.k_shape = causal, tuple(q_shape), tuple(k_shape)
        self._packed: Packed | None = None
        align = 16 if torch.device(device).type == "cuda" else 1  # the efficient kernel's bias rows: 16-aligned
        longest = max([0, *q_rows.count, *k_rows.count])
        ladder = _ladder(longest)
        groups: dict[tuple[int, int], list[int]] = {}
        for s, (n, m) in enumerate(zip(q_rows.count, k_rows.count)):
            if causal and n != m:
                raise ValueError(f"a causal block must be square, got {n} queries and {m} keys")
            key = (padded_length(n, ladder), -(-padded_length(m, ladder) // align) * align)
            groups.setdefault(key, []).append(s)
        self.buckets, self.useful, self.padded = [], 0, 0
        self._q_counts, self._k_counts = [], []  # per block, in bucket order
        for (tq, tk), blocks in sorted(groups.items()):
            self._q_counts += [q_rows.count[s] for s in blocks]
            self._k_counts += [k_rows.count[s] for s in blocks]
            q_index, q_valid = _canonical(q_rows, blocks, tq, q_shape)
            k_index, k_valid = _canonical(k_rows, blocks, tk, k_shape)
            masked = not bool(k_valid.all()) and not (causal and tq == tk)
            self.buckets.append(Bucket(q_index.to(device), q_valid.to(device), k_index.to(device), k_valid.to(device),
                                       q_valid.flatten().nonzero().squeeze(1).to(device),
                                       k_valid.flatten().nonzero().squeeze(1).to(device), masked))
            for s in blocks:
                n, m = q_rows.count[s], k_rows.count[s]
                self.useful += n * (n + 1) // 2 if causal else n * m
            self.padded += len(blocks) * (tq * (tq + 1) // 2 if causal else tq * tk)

    @property
    def padded_work(self) -> float:
        """The scores computed for padding, as a fraction of the useful ones."""
        return (self.padded - self.useful) / max(self.useful, 1)

    def packed(self) -> Packed:
        """The blocks packed end to end for the variable-length kernels (`ring_attention.varlen_kernels`)."""
        if self._packed is None:
            q_rows = torch.cat([b.q_index.flatten()[b.q_real] for b in self.buckets])
            k_rows = torch.cat([b.k_index.flatten()[b.k_real] for b in self.buckets])
            device = q_rows.device
            cumulative = [torch.tensor([0, *itertools.accumulate(c)], dtype=torch.int32).to(device)
                          for c in (self._q_counts, self._k_counts)]  # host counts: no sync, and meta-friendly
            self._packed = Packed(q_rows, k_rows, *cumulative, max(self._q_counts), max(self._k_counts))
        return self._packed

    def forward(self, q, k, v, out, lse, kernel) -> None:
        """Merge every block's attention into ``out`` ``[B, L, H, D]`` and ``lse`` ``[B, L, H]`` (contiguous
        accumulators shaped like the query space), in place."""
        q_rows, k_rows, v_rows = RowSource(q), RowSource(k), RowSource(v)
        out_rows, lse_rows = out.view(-1, out.shape[-1]), lse.view(-1)
        if kernel.backend in PACKED_BACKENDS:
            p = self.packed()
            block_out, block_lse = varlen_attention(
                q_rows.take(p.q_rows).unsqueeze(1), k_rows.take(p.k_rows).unsqueeze(1),
                v_rows.take(p.k_rows).unsqueeze(1), p.cu_q, p.cu_k, p.max_q, p.max_k, causal=self.causal,
                scale=kernel.scale, backend=kernel.backend)
            merged_out, merged_lse = merge_partials(out_rows.index_select(0, p.q_rows),
                                                    lse_rows.index_select(0, p.q_rows),
                                                    block_out.squeeze(1).to(out.dtype), block_lse.squeeze(1))
            out_rows.index_copy_(0, p.q_rows, merged_out)
            lse_rows.index_copy_(0, p.q_rows, merged_lse)
            return
        for b in self.buckets:
            qb = q_rows.take(b.q_index).masked_fill_(~b.q_valid.unsqueeze(-1), 0)  # [S, Tq, D]
            kb, vb = k_rows.take(b.k_index), v_rows.take(b.k_index)  # [S, Tk, D]
            block_out, block_lse = block_attention(qb.unsqueeze(2), kb.unsqueeze(2), vb.unsqueeze(2),
                                                   causal=self.causal, scale=kernel.scale, backend=kernel.backend,
                                                   key_mask=self._mask(b, q.dtype))
            where = b.q_index.flatten().index_select(0, b.q_real)  # each query row once: a pair covers it once
            part_out = block_out.reshape(-1, out.shape[-1]).index_select(0, b.q_real).to(out.dtype)
            merged_out, merged_lse = merge_partials(out_rows.index_select(0, where), lse_rows.index_select(0, where),
                                                    part_out, block_lse.flatten().index_select(0, b.q_real))
            out_rows.index_copy_(0, where, merged_out)
            lse_rows.index_copy_(0, where, merged_lse)

    def backward(self, dout, q, k, v, out, lse, dq, dk, dv, kernel) -> None:
        """Add every block's gradients into ``dq`` (shaped like the query space) and ``dk``, ``dv`` (like the key
        space): contiguous accumulators. ``out``, ``lse`` are the rows' global ones."""
        sources = [RowSource(t) for t in (dout, q, out)]
        k_rows, v_rows, lse_rows = RowSource(k), RowSource(v), lse.reshape(-1)
        grad_rows = [g.view(-1, g.shape[-1]) for g in (dq, dk, dv)]
        if kernel.backend in PACKED_BACKENDS:
            p = self.packed()
            doutp, qp, outp = (source.take(p.q_rows).unsqueeze(1) for source in sources)
            grads = varlen_attention_backward(
                doutp, qp, k_rows.take(p.k_rows).unsqueeze(1), v_rows.take(p.k_rows).unsqueeze(1), outp,
                lse_rows.index_select(0, p.q_rows).unsqueeze(1), p.cu_q, p.cu_k, p.max_q, p.max_k,
                causal=self.causal, scale=kernel.scale, backend=kernel.backend)
            for grad, rows, index in zip(grads, grad_rows, (p.q_rows, p.k_rows, p.k_rows)):
                rows.index_put_((index,), grad.squeeze(1).to(rows.dtype), accumulate=True)
            return
        for b in self.buckets:
            pad = ~b.q_valid.unsqueeze(-1)
            doutb, qb, outb = (source.take(b.q_index).masked_fill_(pad, 0) for source in sources)  # [S, Tq, D]
            lseb = lse_rows.index_select(0, b.q_index.flatten()).view(b.q_index.shape).masked_fill_(~b.q_valid, 0)
            kb, vb = k_rows.take(b.k_index), v_rows.take(b.k_index)
            grads = block_attention_backward(
                doutb.unsqueeze(2), qb.unsqueeze(2), kb.unsqueeze(2), vb.unsqueeze(2), outb.unsqueeze(2),
                lseb.unsqueeze(2), causal=self.causal, scale=kernel.scale, backend=kernel.backend,
                key_mask=self._mask(b, q.dtype))
            # index_put_ with accumulate: grouped-query heads add into one kv row (and it is much faster than
            # index_add_ on the CPU)
            for grad, rows, index, real in zip(grads, grad_rows, (b.q_index, b.k_index, b.k_index),
                                               (b.q_real, b.k_real, b.k_real)):
                values = grad.reshape(-1, grad.shape[-1]).index_select(0, real).to(rows.dtype)
                rows.index_put_((index.flatten().index_select(0, real),), values, accumulate=True)

    def _mask(self, b: Bucket, dtype: torch.dtype) -> torch.Tensor | None:
        if not b.masked:
            return None
        mask = torch.zeros(b.k_valid.shape, dtype=dtype, device=b.k_valid.device).masked_fill_(~b.k_valid, -math.inf)
        return mask[:, None, None, :]  # [S, 1, 1, Tk]


class RowSource:
    """Rows of a ``[B, L, H, D]`` tensor (or a ``[n, D]`` table), read by their contiguous numbering
    ``(b L + pos) H + h`` without copying ``x``: when every stride is a multiple of ``D``, each row is ``D``
    contiguous elements at a storage row of its own; otherwise ``x`` is copied once."""

    def __init__(self, x: torch.Tensor):
        d = x.shape[-1]
        self.x, self.d = x, d
        rows_apart = x.stride(-1) == 1 and all(s % d == 0 for s in (*x.stride()[:-1], x.storage_offset()))
        self.strided = not x.is_contiguous()
        if self.strided and rows_apart:
            storage_rows = x.untyped_storage().nbytes() // x.element_size() // d
            self.table = x.as_strided((storage_rows, d), (d, 1), 0)
        else:
            self.strided = False
            self.table = x.contiguous().view(-1, d)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (any shape, contiguous numbering) as a new ``[*index.shape, D]`` tensor."""
        if self.strided:
            _, length, heads = self.x.shape[:3]
            b, rest = index.div(length * heads, rounding_mode="floor"), index.remainder(length * heads)
            pos, h = rest.div(heads, rounding_mode="floor"), rest.remainder(heads)
            offset = b * self.x.stride(0) + pos * self.x.stride(1) + h * self.x.stride(2) + self.x.storage_offset()
            index = offset.div(self.d, rounding_mode="floor")
        return self.table.index_select(0, index.flatten()).view(*index.shape, self.d)
