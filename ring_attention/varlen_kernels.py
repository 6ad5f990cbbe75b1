"""Variable-length kernels on CUDA: many blocks of different lengths in one call, packed end to end, no padding.

The flash kernels take no key mask, so `ring_attention.varlen.Buckets` does not pad for them: it packs every block's
query rows one after the other (``[T_q, 1, D]``), the key rows likewise, and passes the cumulative lengths
(``cu_q``, ``cu_k``, int32) and the longest block — flash-attn's variable-length interface:

- ``flash_attn``: flash-attn's ``_flash_attn_varlen_forward`` / ``_backward`` (internal, called by parameter name
  like the dense adapter, versions 2.6 to 2.8);
- ``cuda_flash``: PyTorch's ``aten._flash_attention_forward`` / ``_backward`` with cumulative lengths, which is
  what ``torch.nn.attention.varlen.varlen_attn`` runs; that public function's backward is autograd's and cannot be
  handed the rows' global output and LSE that the ring needs (`ring_attention.kernels`), so the ops are called
  directly, positionally up to ``return_debug_mask`` (stable since PyTorch 2.4) and ``scale`` by name.

Both return the LSE as ``[H, T_q]``; here it is ``[T_q, H]`` like the dense adapters'. ``tests/test_kernels_cuda.py``
pins every call on ``meta`` tensors and against stand-ins of flash-attn.
"""

from __future__ import annotations

import importlib

import torch

from ring_attention.kernels import _flash_attn_call, _parameters

PACKED_BACKENDS = ("flash_attn", "cuda_flash")
_ops = torch.ops.aten


def _flash_attn_interface():
    return importlib.import_module("flash_attn.flash_attn_interface")


def varlen_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool, scale: float, backend: str):
    """Attention of packed blocks: ``q`` ``[T_q, H, D]``, ``k``, ``v`` ``[T_k, H, D]``; block ``i`` is rows
    ``cu_q[i]:cu_q[i + 1]`` against rows ``cu_k[i]:cu_k[i + 1]`` (``causal``: square blocks). Returns ``out``
    ``[T_q, H, D]`` and ``lse`` ``[T_q, H]`` float32."""
    if backend == "cuda_flash":
        out, lse = _ops._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                 scale=scale)[:2]
        return out, lse.transpose(0, 1)
    forward = _flash_attn_interface()._flash_attn_varlen_forward
    result = _flash_attn_call(forward, q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                              max_seqlen_k=max_k, softmax_scale=scale, causal=causal, return_softmax=False)
    # 2.6 returns (out, q, k, v, out_padded, lse, S_dmask, rng_state); 2.7 and 2.8 (out, lse, S_dmask, rng_state)
    lse = result[5] if "window_size" in _parameters(forward) else result[1]
    return result[0], lse.transpose(0, 1)


def varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool,
                              scale: float, backend: str):
    """Gradients of packed blocks given the rows' global ``out`` ``[T_q, H, D]`` and ``lse`` ``[T_q, H]``."""
    lse_h = lse.transpose(0, 1).float().contiguous()  # [H, T_q]
    if backend == "cuda_flash":
        # without dropout the rng state is never read: stand-ins shaped like the forward's
        rng_state, unused = q.new_zeros(2, dtype=torch.uint64), q.new_empty(0, dtype=torch.uint64)
        return _ops._flash_attention_backward(dout, q, k, v, out, lse_h, cu_q, cu_k, max_q, max_k, 0.0, causal,
                                              rng_state, unused, scale=scale)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_attn_call(_flash_attn_interface()._flash_attn_varlen_backward, dout=dout.contiguous(), q=q, k=k, v=v,
                     out=out, softmax_lse=lse_h, dq=dq, dk=dk, dv=dv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                     max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=scale, causal=causal, deterministic=False,
                     rng_state=None)
    return dq, dk, dv
