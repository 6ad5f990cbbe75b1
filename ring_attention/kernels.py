"""Fused attention kernels that return the log-sum-exp, behind one small interface.

A ring computes attention one (query block, key block) pair at a time and merges the pieces by their
log-sum-exp (LSE), so it needs kernels that return the LSE next to the output, and a backward that can be
handed the *global* output and LSE of a row (the ring's, merged over every block): with those, the
kernel's backward on one key block returns that block's exact share of dq and the full dk, dv of the
block, because ``P = exp(S - lse_global)`` is the block's share of the row's softmax.

Blocks are ``[B, L, H, D]`` (``lse`` ``[B, L, H]``); the kernels want ``[B, H, L, D]``, which is a transpose,
a view, never a copy. In the causal case blocks are square (a rank's queries against its own keys), so
top-left and bottom-right causal alignment coincide; :func:`block_attention` asserts it.

Backends, in the order ``"auto"`` tries them:

| name | where | dtypes |
|---|---|---|
| ``flash_attn`` | CUDA, the optional flash-attn 2 package | fp16, bf16 |
| ``cuda_flash`` | CUDA, PyTorch's flash kernel | fp16, bf16 |
| ``cuda_efficient`` | CUDA, PyTorch's memory-efficient kernel | fp32 (and fp16, bf16) |
| ``cpu_flash`` | CPU, PyTorch's flash kernel | fp64, fp32, bf16, fp16 |
| ``math`` | anywhere: explicit matmuls, readable, the oracle | any floating point |
"""

from __future__ import annotations

import importlib.util
import math

import torch

BACKENDS = ("flash_attn", "cuda_flash", "cuda_efficient", "cpu_flash", "math")
_HALF = (torch.float16, torch.bfloat16)
_ops = torch.ops.aten


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The LSE is float64 for float64 blocks and float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unavailable_reason(backend: str, q: torch.Tensor) -> str | None:
    """Why ``backend`` cannot run blocks like ``q``, or ``None`` when it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'"
    if backend == "math":
        return None
    if backend == "cpu_flash":
        return None if q.device.type == "cpu" else f"cpu_flash runs on CPU tensors, got device {q.device}"
    if q.device.type != "cuda":
        return f"{backend} needs CUDA tensors, got device {q.device}"
    if backend == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed (pip install 'ring-attention[flash]')"
    if backend in ("flash_attn", "cuda_flash") and q.dtype not in _HALF:
        return f"{backend} needs float16 or bfloat16, got {q.dtype}"
    if backend == "cuda_efficient" and q.dtype == torch.float64:
        return "cuda_efficient does not support float64"
    return None


def select_backend(backend: str, q: torch.Tensor) -> str:
    """Resolve ``"auto"`` to the first backend that can run ``q``; check an explicitly named one."""
    if backend == "auto":
        return next(b for b in BACKENDS if unavailable_reason(b, q) is None)
    reason = unavailable_reason(backend, q)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return backend


def _heads_first(*blocks: torch.Tensor) -> list[torch.Tensor]:
    return [b.transpose(1, 2) for b in blocks]  # [B, L, H, D] -> [B, H, L, D], a view


def _math_forward(q, k, v, causal, scale):
    acc = lse_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Lq]
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(acc)).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    acc, dtype = lse_dtype(q.dtype), q.dtype
    dout, q, k, v, out = (t.to(acc) for t in (dout, q, k, v, out))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    probs = torch.exp(scores - lse.unsqueeze(-1).to(acc))  # this block's share of the row's softmax
    delta = (dout * out).sum(-1, keepdim=True)  # [B, H, Lq, 1]
    dscores = probs * (torch.matmul(dout, v.transpose(-1, -2)) - delta)
    grads = (torch.matmul(dscores, k) * scale, torch.matmul(dscores.transpose(-1, -2), q) * scale,
             torch.matmul(probs.transpose(-1, -2), dout))
    return tuple(g.to(dtype) for g in grads)


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a query block ``[B, Lq, H, D]`` to a key block ``[B, Lk, H, D]``.

    Returns ``out`` ``[B, Lq, H, D]`` in the input dtype and ``lse`` ``[B, Lq, H]`` (float32; float64 for
    float64 input). ``causal`` means the diagonal block: square, query ``i`` sees keys ``0..i``.
    """
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"a causal block must be square, got {q.shape[1]} queries and {k.shape[1]} keys")
    backend = select_backend(backend, q)
    qh, kh, vh = _heads_first(q, k, v)
    if backend == "math":
        out, lse = _math_forward(qh, kh, vh, causal, scale)
    elif backend == "cpu_flash":
        out, lse = _ops._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)
    elif backend == "cuda_flash":
        out, lse = _ops._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, False, scale=scale)[:2]
    elif backend == "cuda_efficient":
        out, lse = _ops._scaled_dot_product_efficient_attention(qh, kh, vh, None, True, 0.0, causal, scale=scale)[:2]
        lse = lse[:, :, : q.shape[1]]  # the kernel may pad the LSE along the length
    else:
        from flash_attn.flash_attn_interface import _flash_attn_forward

        out, lse = _flash_attn_forward(q, k, v, 0.0, scale, causal, -1, -1, 0.0, None, False)[:2]
        return out, lse.transpose(1, 2)
    return out.transpose(1, 2), lse.transpose(1, 2)


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the rows' **global** ``out`` ``[B, Lq, H, D]`` and ``lse`` ``[B, Lq, H]``.

    Returns ``dq`` (this block's share), ``dk`` and ``dv`` (the block's full gradients), each shaped and
    typed like its input.
    """
    backend = select_backend(backend, q)
    out = out.to(q.dtype)
    dh, qh, kh, vh, oh = _heads_first(dout, q, k, v, out)
    lse_h = lse.transpose(1, 2).contiguous()  # [B, H, Lq]
    if backend == "math":
        grads = _math_backward(dh, qh, kh, vh, oh, lse_h, causal, scale)
    elif backend == "cpu_flash":
        grads = _ops._scaled_dot_product_flash_attention_for_cpu_backward(
            dh, qh, kh, vh, oh, lse_h.to(lse_dtype(q.dtype)), 0.0, causal, scale=scale
        )
    elif backend == "cuda_flash":
        empty = torch.empty(0, device=q.device)
        grads = _ops._scaled_dot_product_flash_attention_backward(
            dh, qh, kh, vh, oh, lse_h.float(), empty, empty, q.shape[1], k.shape[1], 0.0, causal,
            torch.empty(2, dtype=torch.int64, device=q.device), empty, scale=scale,
        )
    elif backend == "cuda_efficient":
        padded = -(-q.shape[1] // 32) * 32  # the kernel reads an LSE padded to a multiple of 32
        lse_pad = torch.nn.functional.pad(lse_h.float(), (0, padded - q.shape[1]))
        empty = torch.empty(0, device=q.device)
        grads = _ops._scaled_dot_product_efficient_attention_backward(
            dh, qh, kh, vh, None, oh, lse_pad, empty, empty, 0.0, [True, True, True, False], causal, scale=scale
        )[:3]
    else:
        from flash_attn.flash_attn_interface import _flash_attn_backward

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(dout.contiguous(), q, k, v, out, lse_h.float(), dq, dk, dv, 0.0, scale, causal,
                             -1, -1, 0.0, None, False, None)
        return dq, dk, dv
    return tuple(g.transpose(1, 2) for g in grads)
