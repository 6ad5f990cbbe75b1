"""Kernel adapters: every backend that can run here against the explicit ``math`` oracle.

Each case checks the forward output, the LSE, and the backward given a *global* output and LSE (the way
the ring calls it): the gradients of two key blocks, each computed from the global row statistics, must
add up (dq) and concatenate (dk, dv) to the gradient of the whole block.
"""

import importlib.util

import pytest
import torch

from ring_attention.kernels import BACKENDS, block_attention, block_attention_backward, select_backend

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. Both paths start from the same bf16 inputs and
# accumulate in fp32; they differ by where results are rounded to bf16: the output once (<= u |out|), and in
# the fused kernel also the probabilities before P @ V (<= u sum_j p_j |v_j| <= u max|v|). The gradients go
# through two such rounded products (dP = dO V^T, then dS K or dS^T Q), so allow 4u relative to the largest
# entry for outputs and gradients. The LSE is fp32 on both paths from the same bf16 scores: u of its size.
BF16_U = 2.0**-8
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 4 * BF16_U, torch.float16: 4 * 2.0**-11}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def cases():
    for device in ["cpu", "cuda"]:
        marks = [pytest.mark.cuda] if device == "cuda" else []
        if device == "cuda" and not torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="no CUDA GPU present"))
        for backend in BACKENDS[:-1]:
            if (backend == "cpu_flash") != (device == "cpu"):
                continue
            backend_marks = list(marks)
            if backend == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
                backend_marks.append(pytest.mark.skip(reason="flash-attn is not installed"))
            dtypes = {"cpu_flash": [torch.float64, torch.float32, torch.bfloat16],
                      "cuda_efficient": [torch.float32, torch.bfloat16]}.get(backend, [torch.bfloat16, torch.float16])
            for dtype in dtypes:
                for causal in (False, True):
                    yield pytest.param(device, backend, dtype, causal, marks=backend_marks,
                                       id=f"{backend}-{str(dtype)[6:]}-{'causal' if causal else 'full'}")


def make_block(device, dtype, heads, q_len, k_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_len, heads, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, k_len, heads, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, k_len, heads, 16, generator=gen, dtype=torch.float64)
    dout = torch.randn(2, q_len, heads, 16, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]


@pytest.mark.parametrize("device, backend, dtype, causal", list(cases()))
@pytest.mark.parametrize("heads", [1, 3])
def test_backend_matches_math(device, backend, dtype, causal, heads):
    q_len, k_len = (24, 24) if causal else (24, 40)
    q, k, v, dout = make_block(device, dtype, heads, q_len, k_len)
    tol = TOLERANCE[dtype]
    out, lse = block_attention(q, k, v, causal=causal, scale=0.25, backend=backend)
    out_m, lse_m = block_attention(q, k, v, causal=causal, scale=0.25, backend="math")
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel(out, out_m) < tol
    assert rel(lse, lse_m) < (BF16_U if dtype in (torch.bfloat16, torch.float16) else tol)

    grads = block_attention_backward(dout, q, k, v, out_m, lse_m, causal=causal, scale=0.25, backend=backend)
    grads_m = block_attention_backward(dout, q, k, v, out_m, lse_m, causal=causal, scale=0.25, backend="math")
    for g, g_m, t in zip(grads, grads_m, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert rel(g, g_m) < tol


@pytest.mark.parametrize("backend", ["math", "cpu_flash"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_with_global_lse_splits_exactly_over_key_blocks(backend, dtype):
    q, k, v, dout = make_block("cpu", dtype, 3, 16, 48, seed=1)
    out, lse = block_attention(q, k, v, causal=False, scale=0.25, backend="math")  # the "global" statistics
    whole = block_attention_backward(dout, q, k, v, out, lse, causal=False, scale=0.25, backend=backend)
    parts = [
        block_attention_backward(dout, q, k[:, s], v[:, s], out, lse, causal=False, scale=0.25, backend=backend)
        for s in (slice(0, 16), slice(16, 48))
    ]
    tol = TOLERANCE[dtype]
    assert rel(parts[0][0] + parts[1][0], whole[0]) < tol
    assert rel(torch.cat([parts[0][1], parts[1][1]], dim=1), whole[1]) < tol
    assert rel(torch.cat([parts[0][2], parts[1][2]], dim=1), whole[2]) < tol


def test_math_is_plain_attention():
    q, k, v, _ = make_block("cpu", torch.float64, 2, 20, 20)
    for causal in (False, True):
        out, _ = block_attention(q, k, v, causal=causal, scale=0.25, backend="math")
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=0.25
        ).transpose(1, 2)
        assert rel(out, expected) < 1e-12


def test_auto_picks_cpu_flash_on_cpu():
    assert select_backend("auto", torch.zeros(1, 4, 1, 8)) == "cpu_flash"


@pytest.mark.parametrize(
    "backend, dtype, words",
    [
        ("cuda_flash", torch.float16, "cuda_flash needs CUDA tensors, got device cpu"),
        ("cuda_efficient", torch.float32, "cuda_efficient needs CUDA tensors, got device cpu"),
        ("flash_attn", torch.bfloat16, "flash_attn needs CUDA tensors"),
        ("triton", torch.float32, "unknown backend 'triton'"),
    ],
)
def test_unavailable_backend_named_explicitly_raises(backend, dtype, words):
    q = torch.zeros(1, 4, 1, 8, dtype=dtype)
    with pytest.raises(ValueError, match=f"backend={backend!r} cannot run here: {words}"):
        block_attention(q, q, q, causal=False, scale=1.0, backend=backend)


def test_causal_block_must_be_square():
    q, k = torch.zeros(1, 4, 1, 8), torch.zeros(1, 6, 1, 8)
    with pytest.raises(ValueError, match="a causal block must be square, got 4 queries and 6 keys"):
        block_attention(q, k, k, causal=True, scale=1.0)
