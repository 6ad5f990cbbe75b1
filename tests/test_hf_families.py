"""Every transformers family of `hf_family_workers.FAMILIES` does what the families table of the Hugging Face page
says: exact (with the dense pair, loss and gradients equal ``sdpa``'s; on 2 gloo ranks with pairs that span them,
equal one process's), or refused by name, with the error type and the cause in the message."""

import re
from pathlib import Path

import hf_family_workers as fw
import hf_workers as hw
import pytest
from helpers import rel_err

from ring_attention.hf import apply_ring_dilated_attention

ON_ONE_PROCESS = [f for f in fw.FAMILIES if f.status in (fw.EXACT, fw.TEXT_MODEL, fw.ONE_PROCESS)]
TWO_RANKS = [f for f in fw.FAMILIES if f.status in (fw.EXACT, fw.TEXT_MODEL)]
REFUSED_ALONE = [f for f in fw.FAMILIES if f.status in (fw.REFUSED, fw.TEXT_MODEL)]


def assert_same(actual, expected, what, tolerance=lambda name: 1e-10):
    (loss, grads), (expected_loss, expected_grads) = actual, expected
    assert rel_err(loss, expected_loss) < 1e-10, what
    assert grads.keys() == expected_grads.keys(), what
    for name, grad in expected_grads.items():
        assert rel_err(grads[name], grad) < tolerance(name), (what, name)


@pytest.mark.parametrize("family", ON_ONE_PROCESS, ids=lambda f: f.model_type)
def test_the_dense_pair_equals_sdpa(family):
    model = family.build()
    model.set_attn_implementation("sdpa")
    expected = hw.loss_and_gradients(model, hw.batch(2), None)
    model.zero_grad()
    apply_ring_dilated_attention(family.target(model), [hw.SEQ], [1])
    assert_same(hw.loss_and_gradients(model, hw.batch(2), None), expected, family.model_type)


def test_two_ranks_equal_one_process_and_refuse_together():
    per_rank = fw.battery_on_two_ranks()  # a rank left waiting would end it with a TimeoutError
    for family in TWO_RANKS:
        model = family.build()
        apply_ring_dilated_attention(family.target(model), *hw.PAIRS)
        expected = hw.loss_and_gradients(model, hw.batch(), None)
        cases = [key for key in per_rank[0] if key[0] == family.model_type]
        assert len(cases) == (4 if family.model_type == "llama" else 2 if family.model_type == "qwen2" else 1)
        for key in cases:
            for rank, results in enumerate(per_rank):
                assert_same(results[key], expected, (key, rank), family.tolerance)
    for family in fw.FAMILIES:
        if family.status in (fw.ONE_PROCESS, fw.NOT_WITH_A_GROUP):
            kind, message = family.error
            for results in per_rank:
                assert results[family.model_type][0] == kind.__name__
                assert re.search(message, results[family.model_type][1]), family.model_type
    # a fault in one rank's data only: every rank raises the same error, which names that rank and the cause
    expected = {
        "padding": ("NotImplementedError", "rank 1: a padding attention_mask is not supported by the model call: give "
                                           "the full [batch, seq] mask to shard_batch(..., attention_mask=mask)"),
        "no position_ids": ("ValueError", "rank 1: position_ids start at 0 where this rank's tokens are positions "
                                          "32..63 of the sequence: pass shard_batch's position_ids"),
        "packed": ("ValueError", "rank 1: position_ids restart inside a row (packed documents), but the attention "
                                 "layers were given no documents"),
        "packed, no cache": ("ValueError", "rank 1: position_ids restart inside a row (packed documents)"),
        "positions off": ("ValueError", "rank 1: position_ids do not number the documents of cu_seq_lens_q from 0: "
                                        "token 32 of row 0 has position 33 but is token 32 of its document"),
    }
    for case, (kind, message) in expected.items():
        errors = [results["refused"][case] for results in per_rank]
        assert errors[0] == errors[1], case
        assert errors[0][0] == kind and message in errors[0][1] and "rank 0" not in errors[0][1], (case, errors[0])
    # the operator's own agreement check: documents that differ where only one rank's positions could tell
    for results in per_rank:
        kind, message = results["refused"]["documents differ"]
        assert kind == "ValueError" and "the q/k shards or the cu_seqlens differ between the ranks" in message
    assert per_rank[0]["refused"]["not divisible"] == per_rank[1]["refused"]["not divisible"] == (
        "ValueError", "the 63 tokens of each sequence do not split into 2 equal shards: pass the batch's "
                      "attention_mask (e.g. torch.ones_like(input_ids)) to shard_batch to pad it with a filler "
                      "document, and call the model with the cu_seq_lens_q it then returns")


@pytest.mark.parametrize("family", REFUSED_ALONE, ids=lambda f: f.model_type)
def test_refused_by_name(family):
    kind, message = family.error
    if family.refused_by == "apply":  # before anything changes: a model on the meta device is enough
        model = family.build("meta")
        previous = model.config._attn_implementation
        with pytest.raises(kind, match=message):
            apply_ring_dilated_attention(model, *hw.PAIRS)
        assert model.config._attn_implementation == previous
        return
    model = family.build()
    apply_ring_dilated_attention(model, [hw.SEQ], [1])
    ids = hw.batch(2)
    inputs = dict(input_ids=ids, decoder_input_ids=ids) if family.model_type == "bart" else dict(input_ids=ids)
    with pytest.raises(kind, match=message):
        model(**inputs)


def test_the_families_table_is_the_tested_list():
    page = (Path(__file__).parents[1] / "docs" / "huggingface.md").read_text()
    table = page.split("<!-- rows: tests/hf_family_workers.py -->\n")[1].split("\n\n")[0].splitlines()
    assert table == fw.table()
