"""Fused attention kernels that return the log-sum-exp, behind one small interface.

A ring computes attention one (query block, key block) pair at a time and merges the pieces by their
log-sum-exp (LSE), so it needs kernels that return the LSE next to the output, and a backward that can be
handed the *global* output and LSE of a row (the ring's, merged over every block): with those, the
kernel's backward on one key block returns that block's exact share of dq, and this query block's
contribution to the dk, dv of the key block, because ``P = exp(S - lse_global)`` is the block's share of
the row's softmax. (The other query blocks that see the same keys add theirs: in the ring, as the dk/dv
accumulators travel.)

Blocks are ``[B, L, H, D]`` (``lse`` ``[B, L, H]``); the kernels want ``[B, H, L, D]``, which is a transpose,
a view, never a copy. In the causal case blocks are square (a rank's queries against its own keys), so
top-left and bottom-right causal alignment coincide; :func:`block_attention` asserts it.

Backends, in the order ``"auto"`` tries them (it takes the first that can run the blocks, so it never picks
one that then fails):

| name | where | dtypes | head dim | GPU |
|---|---|---|---|---|
| ``flash_attn`` | CUDA, optional flash-attn 2 (2.6 to 2.8) | fp16, bf16 | multiple of 8, <= 256 | capability 8.0+ |
| ``cuda_flash`` | CUDA, PyTorch's flash kernel | fp16, bf16 | multiple of 8, <= 256 | 8.0+ |
| ``cuda_efficient`` | CUDA, PyTorch's memory-efficient kernel | fp32, fp16, bf16 | 16-byte rows | 5.0+ (bf16: 8.0+) |
| ``cpu_flash`` | CPU, PyTorch's flash kernel | fp64, fp32, bf16, fp16 | any | |
| ``math`` | anywhere: explicit matmuls, readable, the oracle | any floating point | any | |

The CUDA calls follow what PyTorch's own dense forward returns and what each kernel assumes about memory:
see the comments in the adapters; ``tests/test_kernels.py`` checks every call on ``meta`` tensors.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable

import torch

BACKENDS = ("flash_attn", "cuda_flash", "cuda_efficient", "cpu_flash", "math")
FLASH_ATTN_VERSIONS = ((2, 6), (3, 0))  # the flash-attn releases whose internal interface is adapted here: [low, high)
_HALF = (torch.float16, torch.bfloat16)
_ops = torch.ops.aten


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The LSE is float64 for float64 blocks and float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def _parameters(fn: Callable) -> list[str]:
    # flash-attn >= 2.7 registers its internals as torch custom ops; the Python function is kept as _init_fn
    return list(inspect.signature(getattr(fn, "_init_fn", fn)).parameters)


# every parameter of flash-attn's internal forward/backward that the adapter knows how to fill
_FLASH_ATTN_KNOWN = {
    "q", "k", "v", "dout", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p", "softmax_scale", "causal",
    "window_size", "window_size_left", "window_size_right", "softcap", "alibi_slopes", "return_softmax",
    "deterministic", "rng_state",
    # the variable-length interface (ring_attention.varlen_kernels)
    "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "block_table", "leftpad_k", "seqused_k",
    "zero_tensors",
}
_FLASH_ATTN_FUNCTIONS = ("_flash_attn_forward", "_flash_attn_backward", "_flash_attn_varlen_forward",
                         "_flash_attn_varlen_backward")


@functools.cache
def flash_attn_problem() -> str | None:
    """Why the installed flash-attn cannot be used here, or ``None`` when it can (checked once per process)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed (pip install 'ring-attention[flash]')"
    try:
        package = importlib.import_module("flash_attn")
        interface = importlib.import_module("flash_attn.flash_attn_interface")
    except (ImportError, OSError, RuntimeError) as error:  # e.g. its CUDA extension built for another torch
        return f"flash_attn is installed but does not import ({type(error).__name__}: {error})"
    version = str(getattr(package, "__version__", "unknown"))
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    low, high = FLASH_ATTN_VERSIONS
    if len(numbers) != 2 or not low <= numbers < high:
        return f"flash_attn {version} is installed; this package adapts to versions >= 2.6 and < 3"
    for name in _FLASH_ATTN_FUNCTIONS:
        if not hasattr(interface, name):
            return f"flash_attn {version} has no {name}"
        unknown = set(_parameters(getattr(interface, name))) - _FLASH_ATTN_KNOWN
        if unknown:
            return f"flash_attn {version}: {name} takes parameters this package does not know: {sorted(unknown)}"
    return None


def unavailable_reason(backend: str, q: torch.Tensor) -> str | None:
    """Why ``backend`` cannot run blocks like ``q`` (``[B, L, H, D]``), or ``None`` when it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'"
    if backend == "math":
        return None
    if backend == "cpu_flash":
        return None if q.device.type == "cpu" else f"cpu_flash runs on CPU tensors, got device {q.device}"
    if q.device.type != "cuda":
        return f"{backend} needs CUDA tensors, got device {q.device}"
    head_dim = q.shape[-1]
    if backend == "cuda_efficient":
        if q.dtype == torch.float64:
            return "cuda_efficient does not support float64"
        alignment = 16 // q.element_size()  # the kernel reads rows in 16-byte vectors
        if head_dim % alignment:
            return f"cuda_efficient needs a head dim that is a multiple of {alignment} for {q.dtype}, got {head_dim}"
        major, minor = _cuda_capability(q.device)
        needed = (8, 0) if q.dtype == torch.bfloat16 else (5, 0)
        if (major, minor) < needed:
            return (f"cuda_efficient needs a GPU of compute capability {needed[0]}.{needed[1]} or newer for "
                    f"{q.dtype}, got {major}.{minor}")
        return None
    if q.dtype not in _HALF:
        return f"{backend} needs float16 or bfloat16, got {q.dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"{backend} needs a head dim that is a multiple of 8 and at most 256, got {head_dim}"
    major, minor = _cuda_capability(q.device)
    if (major, minor) < (8, 0):
        return f"{backend} needs a GPU of compute capability 8.0 (Ampere) or newer, got {major}.{minor}"
    if backend == "cuda_flash":
        return None if torch.backends.cuda.is_flash_attention_available() else "this PyTorch has no flash kernel"
    return flash_attn_problem()


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


# --- the adapters: [B, L, H, D] blocks in, (out [B, L, H, D], lse [B, L, H]) or (dq, dk, dv) out ---------------


def _math_forward(q, k, v, causal, scale, key_mask=None):
    q, k, v = _heads_first(q, k, v)
    acc = lse_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if key_mask is not None:
        scores = scores + key_mask.to(acc)
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Lq]
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(acc)).to(q.dtype)
    return out.transpose(1, 2), lse.transpose(1, 2)


def _math_backward(dout, q, k, v, out, lse, causal, scale, key_mask=None):
    acc, dtype = lse_dtype(q.dtype), q.dtype
    dout, q, k, v, out = (t.to(acc) for t in _heads_first(dout, q, k, v, out))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        scores = scores + key_mask.to(acc)
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    probs = torch.exp(scores - lse.transpose(1, 2).unsqueeze(-1).to(acc))  # this block's share of the row's softmax
    delta = (dout * out).sum(-1, keepdim=True)  # [B, H, Lq, 1]
    dscores = probs * (torch.matmul(dout, v.transpose(-1, -2)) - delta)
    grads = (torch.matmul(dscores, k) * scale, torch.matmul(dscores.transpose(-1, -2), q) * scale,
             torch.matmul(probs.transpose(-1, -2), dout))
    return tuple(g.to(dtype).transpose(1, 2) for g in grads)


def _cpu_flash_forward(q, k, v, causal, scale, key_mask=None):
    out, lse = _ops._scaled_dot_product_flash_attention_for_cpu(*_heads_first(q, k, v), 0.0, causal,
                                                                attn_mask=key_mask, scale=scale)
    return out.transpose(1, 2), lse.transpose(1, 2)


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale, key_mask=None):
    lse_h = lse.transpose(1, 2).to(lse_dtype(q.dtype)).contiguous()  # [B, H, Lq]
    grads = _ops._scaled_dot_product_flash_attention_for_cpu_backward(
        *_heads_first(dout, q, k, v, out), lse_h, 0.0, causal, attn_mask=key_mask, scale=scale
    )
    return tuple(g.transpose(1, 2) for g in grads)


def _cuda_flash_forward(q, k, v, causal, scale, key_mask=None):
    out, lse = _ops._scaled_dot_product_flash_attention(*_heads_first(q, k, v), 0.0, causal, False, scale=scale)[:2]
    return out.transpose(1, 2), lse.transpose(1, 2)


def _cuda_flash_backward(dout, q, k, v, out, lse, causal, scale, key_mask=None):
    # Pass what the dense forward returns. Its cumulative lengths are None: a defined tensor there, even an
    # empty one, selects the variable-length kernel. Its rng state ([2] and [] uint64) is never read without
    # dropout.
    lse_h = lse.transpose(1, 2).float().contiguous()  # [B, H, Lq]
    rng_state, unused = q.new_empty(2, dtype=torch.uint64), q.new_empty((), dtype=torch.uint64)
    grads = _ops._scaled_dot_product_flash_attention_backward(
        *_heads_first(dout, q, k, v, out), lse_h, None, None, q.shape[1], k.shape[1], 0.0, causal, rng_state, unused,
        scale=scale,
    )
    return tuple(g.transpose(1, 2) for g in grads)


def _cuda_efficient_forward(q, k, v, causal, scale, key_mask=None):
    bias = _efficient_bias(key_mask, q.shape[1])
    out, lse = _ops._scaled_dot_product_efficient_attention(*_heads_first(q, k, v), bias, True, 0.0, causal,
                                                            scale=scale)[:2]
    return out.transpose(1, 2), lse[:, :, : q.shape[1]].transpose(1, 2)  # the LSE comes padded along the length


def _efficient_bias(key_mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
    # The kernel reads its bias [B, H, Lq, Lk] through strides, so a key mask [B, 1, 1, Lk] is broadcast, not
    # copied; its key length must be a multiple of 16 (`varlen` pads the keys of such buckets to one).
    return None if key_mask is None else key_mask.expand(key_mask.shape[0], 1, q_len, key_mask.shape[-1])


def _cuda_efficient_backward(dout, q, k, v, out, lse, causal, scale, key_mask=None):
    # The kernel reads `out` with the row stride of a contiguous [B, L, H, D] tensor whatever its real strides
    # (it takes only out's batch and head strides), and wants the LSE as the forward returns it: [B, H, Lq]
    # padded along the length to a multiple of 32, so that its head and batch strides are multiples of 8.
    out = out.contiguous()
    batch, length, heads = lse.shape
    lse_h = q.new_zeros(batch, heads, -(-length // 32) * 32, dtype=torch.float32)  # [B, H, padded Lq]
    lse_h[:, :, :length] = lse.transpose(1, 2)
    seed, offset = q.new_empty((), dtype=torch.int64), q.new_empty((), dtype=torch.int64)  # unread without dropout
    grads = _ops._scaled_dot_product_efficient_attention_backward(
        *_heads_first(dout, q, k, v), _efficient_bias(key_mask, q.shape[1]), out.transpose(1, 2), lse_h, seed, offset,
        0.0, [True, True, True, False],
        causal, scale=scale,
    )[:3]
    return tuple(g.transpose(1, 2) for g in grads)


def _flash_attn_call(fn: Callable, **values):
    """Call a flash-attn internal by parameter name: its positions changed between releases (2.6 took one
    ``window_size`` tuple, 2.7 two integers)."""
    names = _parameters(fn)
    if "window_size" in names:
        values["window_size"] = (-1, -1)
    values.update(window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                  block_table=None, leftpad_k=None, seqused_k=None, zero_tensors=False)
    return fn(**{name: values[name] for name in names if name in values})


def _flash_attn_forward(q, k, v, causal, scale, key_mask=None):
    forward = importlib.import_module("flash_attn.flash_attn_interface")._flash_attn_forward
    result = _flash_attn_call(forward, q=q, k=k, v=v, softmax_scale=scale, causal=causal, return_softmax=False)
    # 2.6 returns (out, q, k, v, out_padded, lse, S_dmask, rng_state); 2.7 and 2.8 (out, lse, S_dmask, rng_state)
    lse = result[5] if "window_size" in _parameters(forward) else result[1]
    return result[0], lse.transpose(1, 2)  # lse [B, H, Lq] -> [B, Lq, H]


def _flash_attn_backward(dout, q, k, v, out, lse, causal, scale, key_mask=None):
    backward = importlib.import_module("flash_attn.flash_attn_interface")._flash_attn_backward
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse_h = lse.transpose(1, 2).float().contiguous()  # [B, H, Lq]
    _flash_attn_call(backward, dout=dout.contiguous(), q=q, k=k, v=v, out=out, softmax_lse=lse_h, dq=dq, dk=dk, dv=dv,
                     softmax_scale=scale, causal=causal, deterministic=False, rng_state=None)
    return dq, dk, dv


_FORWARD = {"math": _math_forward, "cpu_flash": _cpu_flash_forward, "cuda_flash": _cuda_flash_forward,
            "cuda_efficient": _cuda_efficient_forward, "flash_attn": _flash_attn_forward}
_BACKWARD = {"math": _math_backward, "cpu_flash": _cpu_flash_backward, "cuda_flash": _cuda_flash_backward,
             "cuda_efficient": _cuda_efficient_backward, "flash_attn": _flash_attn_backward}


MASKED_BACKENDS = ("cuda_efficient", "cpu_flash", "math")  # the backends that take a key mask


def _check_key_mask(backend: str, key_mask: torch.Tensor | None) -> None:
    if key_mask is not None and backend not in MASKED_BACKENDS:
        raise ValueError(f"backend {backend!r} takes no key mask; use one of {MASKED_BACKENDS} for padded blocks, or "
                         f"its variable-length kernels (ring_attention.varlen)")


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    backend: str = "auto",
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a query block ``[B, Lq, H, D]`` to a key block ``[B, Lk, H, D]``.

    Returns ``out`` ``[B, Lq, H, D]`` in the input dtype and ``lse`` ``[B, Lq, H]`` (float32; float64 for
    float64 input). ``causal`` means the diagonal block: square, query ``i`` sees keys ``0..i``. ``key_mask``
    (``[B, 1, 1, Lk]``, q's dtype, 0 or ``-inf``) hides padded keys; only `MASKED_BACKENDS` take it.
    """
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"a causal block must be square, got {q.shape[1]} queries and {k.shape[1]} keys")
    backend = select_backend(backend, q)
    _check_key_mask(backend, key_mask)
    return _FORWARD[backend](q, k, v, causal, scale, key_mask)


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
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the rows' **global** ``out`` ``[B, Lq, H, D]`` and ``lse`` ``[B, Lq, H]``.

    Returns ``dq`` (this key block's share of the rows' gradient) and ``dk``, ``dv`` (this query block's
    contribution to the key block's gradients), each shaped and typed like its input. ``key_mask`` as in
    `block_attention`.
    """
    backend = select_backend(backend, q)
    _check_key_mask(backend, key_mask)
    return _BACKWARD[backend](dout, q, k, v, out.to(q.dtype), lse, causal, scale, key_mask)
