"""The CUDA adapters pinned down without a GPU.

- Every CUDA adapter runs on ``meta`` tensors (PyTorch's meta kernels for these ops give the shapes and
  dtypes a GPU would), odd lengths, ``Lq != Lk``, head dims 64 and 128, causal or not; a dispatch mode
  records the arguments that reach the ops: no cumulative-length tensors for the dense flash kernel, ``out``
  with the row stride the memory-efficient kernel assumes, the LSE in the forward's padded layout.
- The op schemas are the ones the adapters call positionally.
- The flash-attn adapter runs against stand-ins of both interface generations (2.6 and 2.7/2.8), computing
  with the ``math`` oracle, so the argument mapping and the unpacking of results are checked on values.
- ``auto`` skips backends that cannot run (head dim, dtype, GPU generation, a flash-attn that does not import)
  and an explicitly named one raises a ``ValueError`` with the reason, checked with fake CUDA tensors.
- The production core, forward and backward, calls only the chosen CUDA kernel, and calls it right.
"""

import importlib.abc
import importlib.util
import itertools
import math
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import reference
from ring_attention import functional, kernels, ring_dilated_attention, varlen, varlen_kernels

aten = torch.ops.aten
CUDA_OPS = {
    aten._scaled_dot_product_flash_attention.default: "flash forward",
    aten._scaled_dot_product_flash_attention_backward.default: "flash backward",
    aten._scaled_dot_product_efficient_attention.default: "efficient forward",
    aten._scaled_dot_product_efficient_attention_backward.default: "efficient backward",
}


class RecordCalls(TorchDispatchMode):
    """Remember the arguments of every op of ``ops`` (the CUDA attention ops by default) that runs."""

    def __init__(self, ops: dict | None = None):
        super().__init__()
        self.calls, self.ops = [], CUDA_OPS if ops is None else ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.ops:  # every argument by its schema name, defaults filled in
            values = {a.name: args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
                      for i, a in enumerate(func._schema.arguments)}
            self.calls.append((self.ops[func], values))
        return func(*args, **kwargs)


def test_schemas_are_the_ones_the_adapters_call():
    names = {op: [a.name for a in op._schema.arguments] for op in CUDA_OPS}
    assert names[aten._scaled_dot_product_flash_attention.default] == [
        "query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale"]
    assert names[aten._scaled_dot_product_flash_attention_backward.default] == [
        "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
        "dropout_p", "is_causal", "philox_seed", "philox_offset", "scale"]
    assert names[aten._scaled_dot_product_efficient_attention.default] == [
        "query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "scale"]
    assert names[aten._scaled_dot_product_efficient_attention_backward.default] == [
        "grad_out_", "query", "key", "value", "attn_bias", "out", "logsumexp", "philox_seed", "philox_offset",
        "dropout_p", "grad_input_mask", "is_causal", "scale"]
    returns = [r.name for r in aten._scaled_dot_product_flash_attention.default._schema.returns]
    assert returns[:2] == ["output", "logsumexp"] and returns[2:4] == ["cum_seq_q", "cum_seq_k"]


def meta_cases():
    for backend, dtypes in (("cuda_flash", (torch.float16, torch.bfloat16)),
                            ("cuda_efficient", (torch.float32, torch.float16, torch.bfloat16))):
        for dtype in dtypes:
            for head_dim in (64, 128):
                for q_len, k_len, causal in ((1, 1, True), (33, 33, True), (100, 100, False), (33, 100, False),
                                             (100, 1, False)):
                    yield pytest.param(backend, dtype, head_dim, q_len, k_len, causal,
                                       id=f"{backend}-{str(dtype)[6:]}-d{head_dim}-{q_len}x{k_len}-"
                                          f"{'causal' if causal else 'full'}")


@pytest.mark.parametrize("backend, dtype, head_dim, q_len, k_len, causal", list(meta_cases()))
def test_cuda_adapter_on_meta_tensors(backend, dtype, head_dim, q_len, k_len, causal):
    batch, heads = 2, 3
    q = torch.empty(batch, q_len, heads, head_dim, device="meta", dtype=dtype)
    k, v = (torch.empty(batch, k_len, heads, head_dim, device="meta", dtype=dtype) for _ in range(2))
    recorder = RecordCalls()
    with recorder:
        out, lse = kernels._FORWARD[backend](q, k, v, causal, 0.125)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (batch, q_len, heads) and lse.dtype == torch.float32  # padding sliced off
    (name, args), = recorder.calls
    assert name.endswith("forward") and args["query"].shape == (batch, heads, q_len, head_dim)  # [B, H, L, D] views
    assert args["scale"] == 0.125 and args["dropout_p"] == 0.0 and args["is_causal"] == causal

    # the global out of the rows, as the ring has it: float32 merged, a strided [B, L, H, D] view
    global_out = torch.empty(batch, heads, q_len, head_dim, device="meta", dtype=torch.float32).transpose(1, 2)
    dout = torch.empty_like(q)
    with recorder:  # as block_attention_backward calls it: the global out cast to the blocks' dtype, strides kept
        grads = kernels._BACKWARD[backend](dout, q, k, v, global_out.to(dtype), lse, causal, 0.125)
    for grad, like in zip(grads, (q, k, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype
    name, args = recorder.calls[-1]
    assert name.endswith("backward") and args["scale"] == 0.125
    assert args["dropout_p"] == 0.0 and args["is_causal"] == causal
    if backend == "cuda_flash":
        assert args["cum_seq_q"] is None and args["cum_seq_k"] is None, "None selects the dense kernel"
        assert (args["max_q"], args["max_k"]) == (q_len, k_len)
        assert args["philox_seed"].shape == (2,) and args["philox_seed"].dtype == torch.uint64  # the forward's
        assert args["logsumexp"].shape == (batch, heads, q_len) and args["logsumexp"].is_contiguous()
    else:
        out, lse_arg = args["out"], args["logsumexp"]
        # the kernel assumes the row stride of a contiguous [B, L, H, D] out (a single row has no row stride)
        assert out.transpose(1, 2).is_contiguous()
        assert q_len == 1 or out.stride(2) == heads * head_dim
        assert lse_arg.shape == (batch, heads, math.ceil(q_len / 32) * 32) and lse_arg.is_contiguous()
        assert lse_arg.stride(1) % 8 == 0 and lse_arg.stride(0) % 8 == 0
        assert args["attn_bias"] is None and args["grad_input_mask"] == [True, True, True, False]


# --- flash-attn: stand-ins of both interface generations ---------------------------------------------------------


def _fake_forward_2_6(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax):
    assert (dropout_p, window_size, softcap, alibi_slopes, return_softmax) == (0.0, (-1, -1), 0.0, None, False)
    out, lse = kernels._math_forward(q, k, v, causal, softmax_scale)
    return out, q, k, v, out, lse.transpose(1, 2).contiguous(), None, torch.zeros(2, dtype=torch.int64)


def _fake_backward_2_6(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
                       softcap, alibi_slopes, deterministic, rng_state=None):
    assert (dropout_p, window_size, softcap, alibi_slopes) == (0.0, (-1, -1), 0.0, None)
    assert softmax_lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and softmax_lse.is_contiguous()
    grads = kernels._math_backward(dout, q, k, v, out, softmax_lse.transpose(1, 2), causal, softmax_scale)
    for buffer, grad in zip((dq, dk, dv), grads):
        buffer.copy_(grad)
    return torch.zeros(q.shape[0], q.shape[2], q.shape[1])


def _fake_forward_2_7(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                      alibi_slopes, return_softmax):
    assert (dropout_p, window_size_left, window_size_right, softcap, alibi_slopes) == (0.0, -1, -1, 0.0, None)
    out, lse = kernels._math_forward(q, k, v, causal, softmax_scale)
    return out, lse.transpose(1, 2).contiguous(), torch.empty(0), torch.zeros(2, dtype=torch.int64)


def _fake_backward_2_7(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                       window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
    assert (dropout_p, window_size_left, window_size_right, softcap) == (0.0, -1, -1, 0.0)
    return _fake_backward_2_6(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                              (-1, -1), softcap, alibi_slopes, deterministic, rng_state)


def _per_block(cu_q, cu_k, rows_q, rows_k, fn):
    """Run ``fn(block query rows, block key rows)`` on every packed block (``[T, H, D]`` -> ``[1, n, H, D]``)."""
    return [fn(slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))) for i in
            range(len(cu_q) - 1)]


def _fake_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                         causal, softcap, alibi_slopes, return_softmax, block_table, window_size=None,
                         window_size_left=None, window_size_right=None, leftpad_k=None, seqused_k=None):
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and (dropout_p, softcap, alibi_slopes) == (0.0, 0.0,
                                                                                                           None)
    assert (block_table, leftpad_k, seqused_k, return_softmax) == (None, None, None, False)
    assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    parts = _per_block(cu_seqlens_q, cu_seqlens_k, q, k, lambda a, b: kernels._math_forward(
        q[a].unsqueeze(0), k[b].unsqueeze(0), v[b].unsqueeze(0), causal, softmax_scale))
    out, lse = torch.cat([o[0] for o, _ in parts]), torch.cat([s[0] for _, s in parts]).transpose(0, 1).contiguous()
    if window_size is not None:  # 2.6
        return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)
    return out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)


def _fake_varlen_forward_2_6(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax, block_table,
                             leftpad_k=None, seqused_k=None):
    assert window_size == (-1, -1)
    return _fake_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                softmax_scale, causal, softcap, alibi_slopes, return_softmax, block_table,
                                window_size=window_size, leftpad_k=leftpad_k, seqused_k=seqused_k)


def _fake_varlen_forward_2_7(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                             alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                             seqused_k=None, zero_tensors=False):
    assert (window_size_left, window_size_right, zero_tensors) == (-1, -1, False)
    return _fake_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                softmax_scale, causal, softcap, alibi_slopes, return_softmax, block_table,
                                leftpad_k=leftpad_k, seqused_k=seqused_k)


def _fake_varlen_backward_2_6(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                              deterministic, rng_state=None):
    assert (dropout_p, window_size, softcap, alibi_slopes) == (0.0, (-1, -1), 0.0, None)
    assert softmax_lse.shape == (q.shape[1], q.shape[0]) and softmax_lse.is_contiguous()
    lse = softmax_lse.transpose(0, 1)
    for a, b in _per_block(cu_seqlens_q, cu_seqlens_k, q, k, lambda a, b: (a, b)):
        grads = kernels._math_backward(dout[a].unsqueeze(0), q[a].unsqueeze(0), k[b].unsqueeze(0), v[b].unsqueeze(0),
                                       out[a].unsqueeze(0), lse[a].unsqueeze(0), causal, softmax_scale)
        for buffer, rows, grad in zip((dq, dk, dv), (a, b, b), grads):
            buffer[rows] = grad[0]


def _fake_varlen_backward_2_7(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                              softcap, alibi_slopes, deterministic, rng_state=None, zero_tensors=False):
    assert (window_size_left, window_size_right, zero_tensors) == (-1, -1, False)
    _fake_varlen_backward_2_6(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, dropout_p, softmax_scale, causal, (-1, -1), softcap, alibi_slopes,
                              deterministic, rng_state)


GENERATIONS = {"2.6.3": (_fake_forward_2_6, _fake_backward_2_6), "2.8.3": (_fake_forward_2_7, _fake_backward_2_7)}
VARLEN_GENERATIONS = {"2.6.3": (_fake_varlen_forward_2_6, _fake_varlen_backward_2_6),
                      "2.8.3": (_fake_varlen_forward_2_7, _fake_varlen_backward_2_7)}


class BrokenExtension(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``flash_attn.flash_attn_interface`` as a flash-attn built for another torch does: it fails."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "flash_attn.flash_attn_interface" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """Install a stand-in ``flash_attn`` package: ``install(version, forward, backward)``."""

    def install(version, forward=None, backward=None, broken=False):
        package = types.ModuleType("flash_attn")
        package.__version__ = version
        package.__path__ = []  # a package, so that its submodule is looked up
        interface = types.ModuleType("flash_attn.flash_attn_interface")
        interface._flash_attn_forward, interface._flash_attn_backward = forward, backward
        interface._flash_attn_varlen_forward, interface._flash_attn_varlen_backward = VARLEN_GENERATIONS.get(
            version, VARLEN_GENERATIONS["2.8.3"])
        monkeypatch.setitem(sys.modules, "flash_attn", package)
        if broken:
            monkeypatch.delitem(sys.modules, "flash_attn.flash_attn_interface", raising=False)
            monkeypatch.setattr(sys, "meta_path", [BrokenExtension(), *sys.meta_path])
        else:
            monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)
        monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: object())
        kernels.flash_attn_problem.cache_clear()

    yield install
    kernels.flash_attn_problem.cache_clear()


def block(q_len, k_len, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_len, 3, 16, generator=gen, dtype=dtype)
    k, v = (torch.randn(2, k_len, 3, 16, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v, torch.randn(2, q_len, 3, 16, generator=gen, dtype=dtype)


@pytest.mark.parametrize("version", GENERATIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_adapter_fits_both_interface_generations(fake_flash_attn, version, causal):
    fake_flash_attn(version, *GENERATIONS[version])
    assert kernels.flash_attn_problem() is None
    q, k, v, dout = block(24, 24 if causal else 40, torch.float32)  # the stand-ins compute like the oracle
    out, lse = kernels._FORWARD["flash_attn"](q, k, v, causal, 0.25)
    out_m, lse_m = kernels._math_forward(q, k, v, causal, 0.25)
    assert lse.shape == (2, 24, 3)
    assert torch.equal(out, out_m) and torch.equal(lse, lse_m)
    grads = kernels._BACKWARD["flash_attn"](dout, q, k, v, out_m, lse_m, causal, 0.25)
    for grad, want in zip(grads, kernels._math_backward(dout, q, k, v, out_m, lse_m, causal, 0.25)):
        assert torch.equal(grad, want)


def test_flash_attn_outside_the_adapted_versions_is_refused(fake_flash_attn):
    fake_flash_attn("2.5.9", *GENERATIONS["2.6.3"])
    assert kernels.flash_attn_problem() == (
        "flash_attn 2.5.9 is installed; this package adapts to versions >= 2.6 and < 3")


def test_flash_attn_with_an_unknown_signature_is_refused(fake_flash_attn):
    def forward(q, k, v, dropout_p, softmax_scale, causal, sink_tokens):
        raise AssertionError("never called")

    fake_flash_attn("2.9.0", forward, _fake_backward_2_7)
    assert kernels.flash_attn_problem() == (
        "flash_attn 2.9.0: _flash_attn_forward takes parameters this package does not know: ['sink_tokens']")


def test_flash_attn_that_does_not_import_is_refused(fake_flash_attn):
    fake_flash_attn("2.8.3", broken=True)
    assert kernels.flash_attn_problem() == ("flash_attn is installed but does not import (ImportError: "
                                            "flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi)")


# --- auto never picks a backend that then fails -------------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """Fake CUDA tensors on a GPU of a given compute capability, with PyTorch's flash kernel built in."""

    def make(capability, shape, dtype):
        monkeypatch.setattr(kernels, "_cuda_capability", lambda device: capability)
        monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
        with FakeTensorMode():
            return torch.empty(shape, device="cuda", dtype=dtype)

    return make


@pytest.mark.parametrize(
    "capability, head_dim, dtype, flash_attn, expected",
    [
        ((9, 0), 64, torch.bfloat16, "2.8.3", "flash_attn"),
        ((9, 0), 64, torch.bfloat16, None, "cuda_flash"),  # not installed
        ((9, 0), 64, torch.bfloat16, "broken", "cuda_flash"),  # installed, does not import
        ((9, 0), 72, torch.float16, None, "cuda_flash"),
        ((9, 0), 60, torch.float16, "2.8.3", "math"),  # not a multiple of 8: no flash, no fp16 efficient kernel
        ((9, 0), 60, torch.float32, None, "cuda_efficient"),  # fp32 rows need multiples of 4
        ((9, 0), 288, torch.bfloat16, "2.8.3", "cuda_efficient"),  # above 256
        ((7, 5), 64, torch.float16, "2.8.3", "cuda_efficient"),  # Turing: no flash kernel
        ((7, 5), 64, torch.bfloat16, None, "math"),  # and no bf16 in the efficient kernel
        ((9, 0), 64, torch.float32, "2.8.3", "cuda_efficient"),
        ((9, 0), 62, torch.float32, None, "math"),  # rows of fp32 must be 16-byte multiples
        ((9, 0), 64, torch.float64, "2.8.3", "math"),
    ],
)
def test_auto_falls_back_to_a_backend_that_can_run(fake_gpu, fake_flash_attn, monkeypatch, capability, head_dim,
                                                   dtype, flash_attn, expected):
    if flash_attn == "broken":
        fake_flash_attn("2.8.3", broken=True)
    elif flash_attn is not None:
        fake_flash_attn(flash_attn, *GENERATIONS[flash_attn])
    else:
        monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
        kernels.flash_attn_problem.cache_clear()
    q = fake_gpu(capability, (1, 8, 2, head_dim), dtype)
    assert kernels.select_backend("auto", q) == expected


@pytest.mark.parametrize(
    "backend, capability, head_dim, dtype, reason",
    [
        ("cuda_flash", (9, 0), 60, torch.float16,
         "cuda_flash needs a head dim that is a multiple of 8 and at most 256, got 60"),
        ("cuda_flash", (7, 5), 64, torch.float16,
         "cuda_flash needs a GPU of compute capability 8.0 (Ampere) or newer, got 7.5"),
        ("cuda_flash", (9, 0), 64, torch.float32, "cuda_flash needs float16 or bfloat16, got torch.float32"),
        ("cuda_efficient", (7, 5), 64, torch.bfloat16,
         "cuda_efficient needs a GPU of compute capability 8.0 or newer for torch.bfloat16, got 7.5"),
        ("cuda_efficient", (9, 0), 12, torch.float16,
         "cuda_efficient needs a head dim that is a multiple of 8 for torch.float16, got 12"),
        ("flash_attn", (9, 0), 64, torch.float16, "flash_attn is not installed (pip install 'ring-attention[flash]')"),
    ],
)
def test_a_named_backend_that_cannot_run_raises(fake_gpu, monkeypatch, backend, capability, head_dim, dtype, reason):
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    kernels.flash_attn_problem.cache_clear()
    q = fake_gpu(capability, (1, 8, 2, head_dim), dtype)
    with pytest.raises(ValueError) as error:
        kernels.select_backend(backend, q)
    assert str(error.value) == f"backend={backend!r} cannot run here: {reason}"
    kernels.flash_attn_problem.cache_clear()


@pytest.mark.parametrize("backend, dtype", [("cuda_flash", torch.bfloat16), ("cuda_efficient", torch.float32),
                                            ("cuda_efficient", torch.bfloat16)])
@pytest.mark.parametrize("causal", [False, True])
def test_production_core_calls_only_the_chosen_kernel_correctly(monkeypatch, backend, dtype, causal):
    # meta tensors stand in for CUDA ones: the backend is taken as named instead of checked against the device
    monkeypatch.setattr(kernels, "select_backend", lambda name, q: name)
    monkeypatch.setattr(functional, "select_backend", lambda name, q: name)
    recorder = RecordCalls()
    q, k, v = (torch.empty(2, 96, 4, 64, device="meta", dtype=dtype, requires_grad=True) for _ in range(3))
    with recorder:
        out = ring_dilated_attention(q, k, v, [32, 96], [1, 3], causal=causal, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
    assert out.shape == q.shape and out.dtype == dtype
    assert [(g.shape, g.dtype) for g in grads] == [(q.shape, dtype)] * 3
    kernel = backend.removeprefix("cuda_")
    names = [name for name, _ in recorder.calls]
    # calls per strided view, cut along its pieces into at most 8: (32, 1) is one view of 2 x 3 pieces, 6 calls of
    # one piece; in (96, 3) heads 0-2 (offsets 0, 1, 2) are one view and head 3 another, 2 pieces each: 4 calls
    assert names.count(f"{kernel} forward") == names.count(f"{kernel} backward") == 10
    assert set(names) == {f"{kernel} forward", f"{kernel} backward"}
    for name, args in recorder.calls:
        if name == "flash backward":
            assert args["cum_seq_q"] is None and args["cum_seq_k"] is None
        if name == "efficient backward":
            assert args["out"].transpose(1, 2).is_contiguous() and args["logsumexp"].stride(1) % 8 == 0


# --- the variable-length path of packed documents (ring_attention.varlen_kernels) ----------------------------------

VARLEN_OPS = {aten._flash_attention_forward.default: "varlen forward",
              aten._flash_attention_backward.default: "varlen backward"}


def test_varlen_schemas_are_the_ones_the_adapter_calls():
    names = {op: [a.name for a in op._schema.arguments] for op in VARLEN_OPS}
    assert names[aten._flash_attention_forward.default][:10] == [
        "query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
        "return_debug_mask"]
    assert "scale" in names[aten._flash_attention_forward.default]
    assert names[aten._flash_attention_backward.default][:14] == [
        "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
        "dropout_p", "is_causal", "rng_state", "unused"]


@pytest.mark.parametrize("causal", [False, True])
def test_cuda_varlen_adapter_on_meta_tensors(causal):
    lengths_q, lengths_k = ([1, 33, 100], [1, 33, 100]) if causal else ([1, 33, 100], [7, 64, 100])
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device="meta")
                  for n in (lengths_q, lengths_k))
    q = torch.empty(sum(lengths_q), 1, 64, device="meta", dtype=torch.bfloat16)
    k, v = (torch.empty(sum(lengths_k), 1, 64, device="meta", dtype=torch.bfloat16) for _ in range(2))
    recorder = RecordCalls(CUDA_OPS | VARLEN_OPS)
    with recorder:
        out, lse = varlen_kernels.varlen_attention(q, k, v, cu_q, cu_k, 100, 100, causal=causal, scale=0.125,
                                                   backend="cuda_flash")
        grads = varlen_kernels.varlen_attention_backward(q, q, k, v, out, lse, cu_q, cu_k, 100, 100, causal=causal,
                                                         scale=0.125, backend="cuda_flash")
    assert out.shape == q.shape and lse.shape == (q.shape[0], 1) and lse.dtype == torch.float32
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    (forward_name, forward), (backward_name, backward) = recorder.calls
    assert (forward_name, backward_name) == ("varlen forward", "varlen backward")
    for args in (forward, backward):
        assert args["cum_seq_q"] is cu_q and args["cum_seq_k"] is cu_k and (args["max_q"], args["max_k"]) == (100, 100)
        assert args["dropout_p"] == 0.0 and args["is_causal"] == causal and args["scale"] == 0.125
    assert forward["return_debug_mask"] is False
    assert backward["logsumexp"].shape == (1, q.shape[0]) and backward["logsumexp"].is_contiguous()
    assert backward["rng_state"].dtype == torch.uint64


@pytest.mark.parametrize("version", GENERATIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_varlen_adapter_fits_both_generations(fake_flash_attn, version, causal):
    fake_flash_attn(version, *GENERATIONS[version])
    assert kernels.flash_attn_problem() is None
    gen = torch.Generator().manual_seed(3)
    lengths_q, lengths_k = ([5, 1, 12], [5, 1, 12]) if causal else ([5, 1, 12], [9, 4, 3])
    q, dout = (torch.randn(sum(lengths_q), 2, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(sum(lengths_k), 2, 16, generator=gen) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32) for n in (lengths_q, lengths_k))
    out, lse = varlen_kernels.varlen_attention(q, k, v, cu_q, cu_k, 12, 12, causal=causal, scale=0.25,
                                               backend="flash_attn")
    grads = varlen_kernels.varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, 12, 12, causal=causal,
                                                     scale=0.25, backend="flash_attn")
    for i in range(3):  # block by block, the oracle
        a, b = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        want_out, want_lse = kernels._math_forward(q[a][None], k[b][None], v[b][None], causal, 0.25)
        assert torch.equal(out[a], want_out[0]) and torch.equal(lse[a], want_lse[0])
        want = kernels._math_backward(dout[a][None], q[a][None], k[b][None], v[b][None], want_out, want_lse, causal,
                                      0.25)
        for grad, rows, w in zip(grads, (a, b, b), want):
            assert torch.equal(grad[rows], w[0])


@pytest.mark.parametrize("backend, dtype, operations", [
    ("cuda_flash", torch.bfloat16, {"flash forward", "flash backward", "varlen forward", "varlen backward"}),
    ("cuda_efficient", torch.float32, {"efficient forward", "efficient backward"}),
])
def test_packed_documents_call_only_the_chosen_kernels(monkeypatch, backend, dtype, operations):
    # documents cut the pairs into runs of whole segments (the dense kernel on views) and short pieces: packed for
    # the flash kernels' variable-length interface, padded buckets with a key mask for the efficient kernel
    monkeypatch.setattr(kernels, "select_backend", lambda name, q: name)
    monkeypatch.setattr(functional, "select_backend", lambda name, q: name)
    recorder = RecordCalls(CUDA_OPS | VARLEN_OPS)
    q, k, v = (torch.empty(2, 96, 4, 64, device="meta", dtype=dtype, requires_grad=True) for _ in range(3))
    with recorder:
        out = ring_dilated_attention(q, k, v, [32, 96], [1, 3], backend=backend, cu_seqlens=[0, 40, 45, 96])
        grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
    assert out.shape == q.shape and [(g.shape, g.dtype) for g in grads] == [(q.shape, dtype)] * 3
    recorded = [name for name, _ in recorder.calls]
    assert set(recorded) == operations
    for name, args in recorder.calls:
        if name == "efficient forward" and args["attn_bias"] is not None:  # a bucket's key mask, broadcast
            bias = args["attn_bias"]
            assert bias.stride(2) == 0 and bias.shape[-1] % 16 == 0


@pytest.mark.parametrize("causal", [False, True])
def test_the_packed_path_is_exact_on_values(monkeypatch, causal):
    # the flash backends' packing, merging and scattering, on the CPU: their kernels replaced by the oracle, block
    # by block, so that the whole core runs the CUDA path's bookkeeping against the float64 reference
    def varlen_math(q, k, v, cu_q, cu_k, max_q, max_k, *, causal, scale, backend):
        parts = _per_block(cu_q, cu_k, q, k, lambda a, b: kernels._math_forward(q[a][None], k[b][None], v[b][None],
                                                                               causal, scale))
        return torch.cat([o[0] for o, _ in parts]), torch.cat([s[0] for _, s in parts])

    def varlen_math_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *, causal, scale, backend):
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        for a, b in _per_block(cu_q, cu_k, q, k, lambda a, b: (a, b)):
            block = kernels._math_backward(dout[a][None], q[a][None], k[b][None], v[b][None], out[a][None],
                                           lse[a][None], causal, scale)
            for grad, rows, g in zip(grads, (a, b, b), block):
                grad[rows] += g[0]
        return grads

    monkeypatch.setattr(kernels, "select_backend", lambda name, q: name)
    monkeypatch.setattr(functional, "select_backend", lambda name, q: name)
    monkeypatch.setitem(kernels._FORWARD, "cuda_flash", kernels._math_forward)
    monkeypatch.setitem(kernels._BACKWARD, "cuda_flash", kernels._math_backward)
    monkeypatch.setattr(varlen, "varlen_attention", varlen_math)
    monkeypatch.setattr(varlen, "varlen_attention_backward", varlen_math_backward)
    gen = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(2, 60, 4, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    options = dict(causal=causal, cu_seqlens=[[0, 7, 8, 60], [0, 33, 60]])
    results = []
    for fn, extra in ((ring_dilated_attention, dict(backend="cuda_flash")), (reference.dilated_attention, {})):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, [16, 32], [1, 3], **options, **extra)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, dout)])
    for ours, truth in zip(*results):
        assert (ours - truth).abs().max() < 1e-12 * truth.abs().max()
