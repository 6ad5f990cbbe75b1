"""`ring_attention.hf` under ``torch.compile(fullgraph=True)``: the tiny Llama (float64, grouped-query heads) compiles
with no graph break, a training step gives eager mode's logits, loss and gradients, a second step does not recompile,
and what eager mode refuses is refused alike (same type and message, on every rank), raised when the graph runs."""

import functools

import hf_compile_workers as cw
import hf_family_workers as fw
import hf_workers as hw
import pytest
import torch
from helpers import rel_err
from transformers.masking_utils import create_causal_mask

from lessons.launch import run_on_ranks
from ring_attention.hf import shard_batch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # every test counts its own compilations
    yield
    torch._dynamo.reset()


def assert_same_step(compiled: dict, eager: dict, tolerance: float, what) -> None:
    assert rel_err(compiled["logits"], eager["logits"]) < tolerance, what
    assert rel_err(compiled["loss"], eager["loss"]) < tolerance, what
    assert compiled["grads"].keys() == eager["grads"].keys()
    for name, grad in eager["grads"].items():
        assert rel_err(compiled["grads"][name], grad) < tolerance, (what, name)


def test_one_process_compiles_with_no_break_and_steps_as_eager():
    batch = shard_batch(hw.batch(2), process_group=None)
    assert cw.graph_breaks(hw.PAIRS, batch, None) == (1, 0)
    results = cw.eager_and_compiled(hw.PAIRS, batch, None)  # two SGD steps each
    assert results["frames"] == 1  # the second step ran the first one's graph
    assert_same_step(results["compiled"], results["eager"], 1e-12, "aot_eager")


def checkpointed_step(pairs) -> dict | str:
    """One compiled step of the activation-checkpointed model with ``pairs`` (None: sdpa), or the first line of what
    Dynamo raised."""
    torch._dynamo.reset()
    try:
        return cw.eager_and_compiled(pairs, shard_batch(hw.batch(2), process_group=None), None, steps=1,
                                     checkpointed=True)
    except torch._dynamo.exc.Unsupported as error:
        return str(error).splitlines()[0]


def test_activation_checkpointing_compiles_whenever_sdpa_does():
    """The layers' checks change no outside state when all is well, which Dynamo refuses inside a checkpointed layer.
    Whether a checkpointed model compiles at all is transformers' affair (5.25's output capture mutates a context
    variable there, with sdpa too): with ring dilated attention it compiles exactly when it does with sdpa, and then
    steps as eager mode does."""
    ring, sdpa = checkpointed_step(hw.PAIRS), checkpointed_step(None)
    assert isinstance(ring, str) == isinstance(sdpa, str), (ring, sdpa)
    if isinstance(ring, str):
        assert ring == sdpa  # the same refusal, of transformers' code, not of ours
    else:
        assert ring["frames"] == 1
        assert_same_step(ring["compiled"], ring["eager"], 1e-12, "checkpointed")


def test_inductor_step_equals_eager():
    """Inductor's own code for the model's float32 parts (transformers' RMSNorm and rotary embeddings compute in
    float32 even in a float64 model) differs from eager mode's by float32 rounding, ~1e-7 here, with transformers'
    ``sdpa`` as well as with ring dilated attention: so this step matches to 1e-6, the exact parity is aot_eager's."""
    batch = shard_batch(hw.batch(2), process_group=None)
    results = cw.eager_and_compiled(hw.PAIRS, batch, None, steps=1, backend="inductor")
    assert results["frames"] == 1
    assert_same_step(results["compiled"], results["eager"], 1e-6, "inductor")


def overlaid(model, **inputs) -> torch.Tensor:
    """The model after a mask with an overlay (image tokens attending both ways, say) was made for its layers."""
    ids = inputs["input_ids"]
    create_causal_mask(model.config, model.model.embed_tokens(ids), None, None, torch.arange(ids.shape[1])[None],
                       or_mask_function=lambda batch, head, q, kv: q < 0)
    return cw.logits(model, **inputs)


ONE_DOCUMENT_EACH = torch.tensor([0, hw.SEQ, 2 * hw.SEQ], dtype=torch.int32)
PACKED = torch.cat([torch.arange(32), torch.arange(32)]).expand(2, hw.SEQ)  # two documents in each row
PADDING = torch.ones(2, hw.SEQ, dtype=torch.long).index_fill(1, torch.tensor([hw.SEQ - 1]), 0)


@pytest.mark.parametrize("case, inputs, kind, words", [
    ("padding", dict(attention_mask=PADDING), NotImplementedError, "a padding attention_mask is not supported"),
    ("positions", dict(position_ids=PACKED, cu_seq_lens_q=ONE_DOCUMENT_EACH), ValueError,
     "position_ids do not number the documents of cu_seq_lens_q from 0: token 32 of row 0 has position 0"),
    # without a cache transformers adds its packed-sequence mask, read from its closures as Dynamo holds them
    ("packed", dict(position_ids=PACKED, use_cache=False), ValueError, r"position_ids restart inside a row"),
    ("overlay", dict(forward=overlaid), NotImplementedError, "transformers asked for a mask beyond the causal one"),
])
def test_refusals_are_eager_modes(case, inputs, kind, words):
    forward = inputs.pop("forward", cw.logits)
    raised = cw.raised_both_ways(forward, cw.model_for(hw.PAIRS, None), input_ids=hw.batch(2), **inputs)
    assert raised["frames"] == 1, case
    assert raised["compiled"] == raised["eager"], (case, raised)
    assert raised["eager"][0] == kind.__name__ and words in raised["eager"][1], (case, raised)


def test_documents_as_a_list_are_refused_under_compile_by_name():
    """A list of ints would be a constant of the graph (a new layout, a new compilation): compiled, the documents
    must be the tensor shard_batch returns; eager mode takes either."""
    ids, positions, _, documents = shard_batch(hw.batch(2), position_ids=PACKED, process_group=None)
    model = cw.model_for(hw.PAIRS, None)
    compiled = torch.compile(cw.logits, fullgraph=True, backend="aot_eager")
    as_list = documents.tolist()
    assert torch.equal(cw.logits(model, input_ids=ids, position_ids=positions, cu_seq_lens_q=as_list),
                       cw.logits(model, input_ids=ids, position_ids=positions, cu_seq_lens_q=documents))
    kind, message = fw.raised(compiled, model, input_ids=ids, position_ids=positions, cu_seq_lens_q=as_list)
    assert kind == "TypeError" and message == ("cu_seq_lens_q and cu_seq_lens_k must be tensors under torch.compile, "
                                               "as shard_batch returns them")


@functools.cache
def two_ranks() -> list[dict]:
    return run_on_ranks(cw.on_two_ranks, 2)


def test_two_ranks_step_as_eager_with_one_graph():
    for rank, results in enumerate(two_ranks()):
        assert results["breaks"] == (1, 0), rank
        for batch in ("plain", "packed"):
            assert results[batch]["frames"] == 1, (rank, batch)
            assert_same_step(results[batch]["compiled"], results[batch]["eager"], 1e-12, (rank, batch))


def test_two_ranks_refuse_one_ranks_data_together():
    expected = {"padding": ("NotImplementedError", "rank 1: a padding attention_mask is not supported"),
                "positions off": ("ValueError", "rank 1: position_ids do not number the documents of cu_seq_lens_q")}
    per_rank = [results["refused"] for results in two_ranks()]
    for case, (kind, words) in expected.items():
        assert all(refused[case]["frames"] == 1 for refused in per_rank), case
        errors = [refused[case][mode] for refused in per_rank for mode in ("eager", "compiled")]
        assert all(error == errors[0] for error in errors), case  # every rank, eager and compiled
        assert errors[0][0] == kind and words in errors[0][1] and "rank 0" not in errors[0][1], (case, errors[0])
