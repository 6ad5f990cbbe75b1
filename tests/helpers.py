"""Small helpers shared by the tests (importable by spawned workers too)."""

from __future__ import annotations

import subprocess

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are 0)."""
    scale = expected.abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def random_qkv(batch, seq_len, heads, head_dim, *, dtype=torch.float64, seed=0, kv_heads=None):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.randn(batch, seq_len, heads, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen, dtype=dtype)
    return q, k, v


def forward_and_grads(fn, q, k, v, grad_out_seed=1):
    """Run ``fn(q, k, v)`` and backward with a fixed random output gradient; returns (out, dq, dk, dv)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), dq, dk, dv


def stop_launcher(launcher: subprocess.Popen) -> None:
    """End a launcher still running: SIGTERM first, on which torchrun stops its workers, then SIGKILL."""
    if launcher.poll() is None:
        launcher.terminate()
        try:
            launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
