"""The tiny Llama of `hf_workers` (float64, grouped-query heads) under ``torch.compile(fullgraph=True)``, and what
test_hf_compile.py compares: training steps eager and compiled on fresh identical models, the graph breaks, and what
a call raises; on one process, or on this rank of 2 gloo ranks (`on_two_ranks`, one start of the processes)."""

from __future__ import annotations

import functools

import hf_family_workers as fw
import hf_packing_workers as hp
import hf_workers as hw
import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounterWithBackend

from ring_attention.hf import apply_ring_dilated_attention, sequence_parallel_loss, shard_batch, sum_gradients


def forward_and_loss(model, input_ids, position_ids, labels, cu_seq_lens_q, group, use_cache=None):
    """The recipe's forward on this rank: the logits and this rank's share of the loss (what gets compiled)."""
    documents = {} if cu_seq_lens_q is None else {"cu_seq_lens_q": cu_seq_lens_q}
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache, **documents).logits
    return logits, sequence_parallel_loss(logits, labels, process_group=group)


def model_for(pairs, group, checkpointed: bool = False) -> torch.nn.Module:
    """The tiny Llama through ring dilated attention with ``pairs``; with ``pairs=None`` through transformers' sdpa."""
    model = hw.tiny()
    if pairs is not None:
        apply_ring_dilated_attention(model, *pairs, process_group=group)
    if checkpointed:  # each decoder layer recomputed in the backward
        model.gradient_checkpointing_enable()
    return model


def train(forward, model, batch: tuple, group, steps: int) -> dict:
    """``steps`` SGD steps of the recipe through ``forward`` (`forward_and_loss`, compiled or not); the last step's
    logits, its loss summed over the group and its gradients summed over the group (`sum_gradients`)."""
    input_ids, position_ids, labels, *documents = batch  # shard_batch's, with cu_seq_lens_q for packed documents
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        logits, loss = forward(model, input_ids, position_ids, labels, documents[0] if documents else None, group)
        loss.backward()
        sum_gradients(model, group)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
    total = loss.detach().clone()
    if group is not None:
        dist.all_reduce(total, group=group)
    return dict(logits=logits.detach(), loss=total, grads=grads)


def eager_and_compiled(pairs, batch: tuple, group, *, steps: int = 2, backend: str = "aot_eager",
                       checkpointed: bool = False) -> dict:
    """The same training steps eager and compiled: each one's last results, and how many frames were compiled over
    all the steps (1: the later steps, with the same shapes, run the first step's graph)."""
    # under activation checkpointing transformers would log that it drops the cache, which Dynamo cannot trace
    forward = functools.partial(forward_and_loss, use_cache=False) if checkpointed else forward_and_loss
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(forward, fullgraph=True, backend=counter)
    return dict(eager=train(forward, model_for(pairs, group, checkpointed), batch, group, steps),
                compiled=train(compiled, model_for(pairs, group, checkpointed), batch, group, steps),
                frames=counter.frame_count)


def graph_breaks(pairs, batch: tuple, group) -> tuple[int, int]:
    """``torch._dynamo.explain``'s count of graphs and of graph breaks for `forward_and_loss`."""
    input_ids, position_ids, labels, *documents = batch
    explained = torch._dynamo.explain(forward_and_loss)(model_for(pairs, group), input_ids, position_ids, labels,
                                                        documents[0] if documents else None, group)
    return explained.graph_count, explained.graph_break_count


def logits(model, **inputs) -> torch.Tensor:
    return model(**inputs).logits


def raised_both_ways(forward, model, **inputs) -> dict:
    """What ``forward(model, **inputs)`` raises eager and compiled (type name and message, None if nothing), and
    how many frames were compiled for it (1: the error came out of the compiled graph, not an eager fallback)."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(forward, fullgraph=True, backend=counter)
    return dict(eager=fw.raised(forward, model, **inputs), compiled=fw.raised(compiled, model, **inputs),
                frames=counter.frame_count)


def refused_on_one_rank(group) -> dict:
    """Inputs whose fault only rank 1 sees: a padding mask that has zeros on its slice only, and position_ids off by
    one there. Every rank must raise, compiled as eager."""
    model = model_for(hw.PAIRS, group)
    ids, positions, _ = shard_batch(hw.batch(2), process_group=group)
    padding = torch.ones(2, hw.SEQ, dtype=torch.long)
    padding[1, -5:] = 0  # right padding: only the last rank's slice has zeros
    mask = shard_batch(padding, process_group=group)[0]
    packed = torch.cat([torch.arange(40), torch.arange(24)]).expand(2, hw.SEQ)  # a second document from 40 on
    _, packed, _, documents = shard_batch(hw.batch(2), position_ids=packed, process_group=group)
    shifted = packed + (dist.get_rank(group) == 1)  # rank 1's positions count from 1
    return {
        "padding": raised_both_ways(logits, model, input_ids=ids, position_ids=positions, attention_mask=mask),
        "positions off": raised_both_ways(logits, model, input_ids=ids, position_ids=shifted, cu_seq_lens_q=documents),
    }


def on_two_ranks(rank, world_size) -> dict:
    """On 2 ranks: LongNet pairs that span them, the ring, on a batch of one document per row (two steps) and on the
    packed batch of `hf_packing_workers` with its documents; the graph breaks; the refusals of one rank's data."""
    group = dist.group.WORLD
    plain = shard_batch(hw.batch(), process_group=group)
    packed = shard_batch(**hp.batches()["packed"]["call"], process_group=group)
    return {"plain": eager_and_compiled(hw.PAIRS, plain, group),
            "packed": eager_and_compiled(hp.DILATED, packed, group, steps=1),
            "breaks": graph_breaks(hw.PAIRS, plain, group),
            "refused": refused_on_one_rank(group)}
