"""``torch.compile(..., fullgraph=True)``: the core, its modules, on one process and on 2 and 4 gloo ranks (every
family, balance, all-to-all, grouped-query heads, packed documents) give what eager gives, with no graph break and no
recompile on the next step with the same shapes; new documents change no graph (`ring_attention.ops`)."""

import compile_workers
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from lessons.launch import run_on_ranks
from ring_attention import RingDilatedAttention, RingMultiheadDilatedAttention, ring_dilated_attention

GEN = torch.Generator().manual_seed(0)
Q, K, V, GRAD = (torch.randn(2, 96, h, 8, generator=GEN, dtype=torch.float64) for h in (6, 3, 3, 6))


def forward_backward(fn, *args, **kwargs):
    leaves = [t.clone().requires_grad_(True) for t in (Q, K, V)]
    out = fn(*leaves, *args, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, leaves, GRAD)]


def largest_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("options", [
    dict(causal=True), dict(causal=False, head_mode="groups"),
    dict(causal=True, cu_seqlens=torch.tensor([0, 5, 60, 96])),
    dict(causal=False, cu_seqlens=[[0, 1, 96], [0, 50, 96]]),  # one list per row
], ids=["causal", "groups", "documents", "per-row documents"])
def test_the_compiled_core_equals_eager_without_recompiling(options):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ring_dilated_attention, fullgraph=True, backend=counter)
    eager = forward_backward(ring_dilated_attention, [16, 96], [1, 3], **options)
    for _ in range(2):  # the second step with the same shapes compiles nothing more
        assert largest_difference(forward_backward(compiled, [16, 96], [1, 3], **options), eager) < 1e-12
    assert counter.frame_count == 1


def test_no_graph_break():
    explained = torch._dynamo.explain(ring_dilated_attention)(Q, K, V, [16, 96], [1, 3], causal=True,
                                                              cu_seqlens=torch.tensor([0, 40, 96]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    mha = RingMultiheadDilatedAttention(16, 4, batch_first=True, dtype=torch.float64, segment_lengths=[16, 96],
                                        dilation_rates=[1, 3], causal=True)
    x = torch.randn(2, 96, 16, dtype=torch.float64)
    explained = torch._dynamo.explain(mha)(x, x, x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_new_documents_change_no_graph():
    # the boundaries are a graph input: once their length is dynamic (the first change of length marks it so, or
    # torch._dynamo.mark_dynamic beforehand), any new layout runs the same graph
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ring_dilated_attention, fullgraph=True, backend=counter)
    for layout in ([0, 96], [0, 10, 96], [0, 3, 50, 96], [0, 1, 2, 3, 96], [0, 95, 96]):
        documents = torch.tensor(layout)
        result = forward_backward(compiled, [16, 96], [1, 3], causal=True, cu_seqlens=documents)
        assert largest_difference(result, forward_backward(ring_dilated_attention, [16, 96], [1, 3], causal=True,
                                                           cu_seqlens=documents)) < 1e-12
    assert counter.frame_count == 2  # the first length, then a dynamic one for all the others


def test_the_modules_compile_with_inductor():
    torch.manual_seed(0)
    core = RingDilatedAttention([16, 96], [1, 3], causal=True)
    mha = RingMultiheadDilatedAttention(18, 6, num_kv_heads=3, batch_first=True, dtype=torch.float64,
                                        segment_lengths=[16, 96], dilation_rates=[1, 3], causal=True)
    x = torch.randn(2, 96, 18, dtype=torch.float64, generator=GEN)

    def mha_step(module):
        leaf = x.clone().requires_grad_(True)
        out = module(leaf, leaf, leaf)[0]
        grads = torch.autograd.grad(out, [leaf, *module.parameters()], torch.ones_like(out))
        return [out.detach(), *grads]

    counter = CompileCounterWithBackend("inductor")
    compiled_core, compiled_mha = (torch.compile(m, fullgraph=True, backend=counter) for m in (core, mha))
    assert largest_difference(forward_backward(compiled_core), forward_backward(core)) < 1e-12
    for _ in range(2):
        assert largest_difference(mha_step(compiled_mha), mha_step(mha)) < 1e-12
    assert counter.frame_count == 2  # one graph per module, compiled once


CONFIGS = [dict(comm=comm, load_balance=balance, causal=True, heads=(4, 2)) for comm in ("ring", "allgather")
           for balance in (False, True)] + [
    dict(comm="ring", ulysses_size=2, causal=True, heads=(4, 2)),
    dict(comm="allgather", ulysses_size=2, causal=False, heads=(4, 4)),
    dict(comm="ring", causal=True, heads=(4, 2), cu_seqlens=torch.tensor([0, 7, 64, 65, 128])),
    dict(comm="allgather", causal=False, heads=(4, 2), cu_seqlens=torch.tensor([0, 100, 128])),
    dict(comm="ring", ulysses_size=2, causal=True, heads=(4, 2), cu_seqlens=torch.tensor([0, 30, 128])),
]


@pytest.mark.parametrize("world_size", [2, 4])
def test_compiled_ranks_equal_eager_ranks(world_size):
    per_rank = run_on_ranks(compile_workers.compiled_against_eager, world_size, CONFIGS, timeout=900)
    for rank_results in per_rank:
        for config, result in zip(CONFIGS, rank_results):
            assert result["difference"] < 1e-12, config
            assert result["frames"] == 1, config
