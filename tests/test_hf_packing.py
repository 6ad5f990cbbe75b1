"""Packed documents and padding through `ring_attention.hf`, in float64 on tiny random models: every document of a
packed or padded batch gets, on 2 ranks and on one process, the logits, the loss and the gradients of that document
alone; `shard_batch` numbers, labels and pads documents; what cannot be honoured is refused by name."""

import hf_family_workers as fw
import hf_packing_workers as hp
import hf_workers as hw
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from transformers import DataCollatorWithFlattening

from ring_attention.hf import apply_ring_dilated_attention, sequence_parallel_loss, shard_batch

EXACT = [f for f in fw.FAMILIES if f.status in (fw.EXACT, fw.TEXT_MODEL) and f.model_type != "stablelm"]


def test_every_document_on_2_ranks_is_that_document_alone():
    per_rank = fw.battery_on_two_ranks()
    for name, batch in hp.batches().items():
        ids = batch["call"]["input_ids"]
        for config, (pairs, _) in hp.CONFIGS[name].items():
            what = (name, config)
            ranks = [results["packing"][what] for results in per_rank]
            assert torch.equal(ranks[0]["cu_seq_lens_q"], ranks[1]["cu_seq_lens_q"]), what
            logits = torch.cat([r["logits"] for r in ranks], dim=1)  # [B, 62, V]: the whole padded sequence
            labels = torch.cat([r["labels"] for r in ranks], dim=1)
            assert logits.shape[1] == 62, what
            total, count, grads = 0.0, 0, {}
            for row, start, end in batch["documents"]:
                one = hp.alone(pairs, ids[row, start:end])
                assert rel_err(logits[row, start:end], one["logits"]) < 1e-10, (what, start)
                assert labels[row, end - 1] == -100  # the last token of a document predicts nothing
                loss = F.cross_entropy(logits[row, start:end], labels[row, start:end], reduction="sum")
                assert rel_err(loss, one["loss"]) < 1e-10, (what, start)
                total, count = total + one["loss"], count + end - start - 1
                grads = {k: grads.get(k, 0) + g for k, g in one["grads"].items()}
            assert (labels != -100).sum() == count, what  # padding, filler and document ends carry no label
            for r in ranks:  # sequence_parallel_loss: the mean over every labelled token
                assert rel_err(r["loss"], total / count) < 1e-10, what
                for parameter, grad in grads.items():  # of the sum of the tokens' losses: the documents' sums
                    assert rel_err(r["grads"][parameter], grad) < 1e-10, (what, parameter)


@pytest.mark.parametrize("family", EXACT, ids=lambda f: f.model_type)
def test_the_dense_pair_on_a_packed_batch_is_sdpa_on_each_document(family):
    batch = hp.batches()["packed"]
    model = family.build()
    model.set_attn_implementation("sdpa")
    expected, grads = [], {}
    for row, start, end in batch["documents"]:
        model.zero_grad()
        document = batch["call"]["input_ids"][row, start:end]
        logits = model(input_ids=document[None]).logits[0]
        F.cross_entropy(logits[:-1], document[1:], reduction="sum").backward()
        expected.append(logits.detach())
        grads = {k: grads.get(k, 0) + p.grad for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    apply_ring_dilated_attention(family.target(model), [hp.LENGTH], [1])
    input_ids, position_ids, labels, cu_seq_lens_q = shard_batch(**batch["call"], process_group=None)
    logits = model(input_ids=input_ids, position_ids=position_ids, cu_seq_lens_q=cu_seq_lens_q).logits
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    for (row, start, end), alone in zip(batch["documents"], expected):
        assert rel_err(logits[row, start:end], alone) < 1e-10, (family.model_type, row, start)
    for name, grad in grads.items():
        assert rel_err(model.get_parameter(name).grad, grad) < family.tolerance(name), (family.model_type, name)


def test_data_collator_with_flattening_straight_into_the_model():
    """On one process the collator's own output, its flash-attention keywords included, is the documents' input."""
    documents = [hp.tokens(n, seed) for seed, n in enumerate(hp.COLLATED)]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": d.tolist()} for d in documents])
    model = hw.tiny()
    apply_ring_dilated_attention(model, *hp.DILATED)
    for use_cache in (True, False):  # without a cache transformers asks for its packed mask: the documents do it
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=use_cache).logits[0]
        for (_, start, end), document in zip(hp.documents([hp.COLLATED]), documents):
            assert rel_err(logits[start:end], model(input_ids=document[None]).logits[0]) < 1e-10


def test_shard_batch_numbers_labels_and_pads_the_documents():
    ids = torch.arange(10, 17)[None]  # documents of 3 and 4 tokens
    ids_, positions, labels, cu_seq_lens_q = shard_batch(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]),
                                                         process_group=None)
    assert torch.equal(ids_, ids) and positions.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert labels.tolist() == [[11, 12, -100, 14, 15, 16, -100]] and cu_seq_lens_q.tolist() == [0, 3, 7]
    assert cu_seq_lens_q.dtype == torch.int32 and cu_seq_lens_q.device.type == "cpu"
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # right padding: rows of 5 and 2 real tokens
    batch = torch.arange(10).reshape(2, 5)
    ids_, positions, labels, cu_seq_lens_q = shard_batch(batch, attention_mask=mask, process_group=None)
    assert torch.equal(ids_, batch) and positions.tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    assert labels.tolist() == [[1, 2, 3, 4, -100], [6, -100, -100, -100, -100]]
    assert cu_seq_lens_q.tolist() == [0, 5, 7, 10]  # the rows laid end to end; row 1's padding a filler document
    # the collator's labels (-100 on each document's first token) give the same as the ids
    collated = DataCollatorWithFlattening()([{"input_ids": [10, 11, 12]}, {"input_ids": [13, 14, 15, 16]}])
    assert torch.equal(shard_batch(collated["input_ids"], collated["labels"], position_ids=collated["position_ids"],
                                   process_group=None)[2], labels.new_tensor([[11, 12, -100, 14, 15, 16, -100]]))


def test_sequence_parallel_loss_counts_the_labelled_tokens_of_a_padded_batch():
    batch, mask = torch.randint(0, hw.VOCAB, (2, 6)), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    _, _, labels, _ = shard_batch(batch, attention_mask=mask, process_group=None)
    logits = torch.randn(2, 6, hw.VOCAB, dtype=torch.float64)
    expected = (F.cross_entropy(logits[0, :5], batch[0, 1:], reduction="sum")
                + F.cross_entropy(logits[1, :2], batch[1, 1:3], reduction="sum")) / 7  # 5 + 2 labelled tokens
    assert rel_err(sequence_parallel_loss(logits, labels, process_group=None), expected) < 1e-14


@pytest.mark.parametrize("call, words", [
    (dict(attention_mask=torch.tensor([[0, 1, 1, 1]])), r"attention_mask row 0 is not right padding \(a real token "
                                                        r"follows padding\): .*\(tokenizer.padding_side = 'right'\)"),
    (dict(attention_mask=torch.tensor([[1, 2, 1, 0]])), r"attention_mask must hold 1 \(a real token\) and 0 "
                                                        r"\(padding\), got the values \[0, 1, 2\]"),
    (dict(attention_mask=torch.ones(1, 2)), r"attention_mask must be the full \[batch, seq\] = \[1, 4\] mask, not "
                                            r"this rank's slice, got shape \(1, 2\)"),
    (dict(position_ids=torch.tensor([[0, 1, 3, 4]])), r"position_ids\[0, 2\] = 3 after 1: packed position_ids count "
                                                      r"0, 1, 2\.\.\. within each document and restart at 0"),
    (dict(position_ids=torch.tensor([[1, 2, 3, 4]])), r"position_ids\[0, 0\] = 1: packed position_ids count"),
    (dict(position_ids=torch.arange(4)), r"position_ids must be \[batch, seq\] = \[1, 4\] \(or \[1, 4\], shared by "
                                         r"the rows\), got shape \(4,\)"),
])
def test_shard_batch_refuses_what_it_cannot_read(call, words):
    with pytest.raises(ValueError, match=words):
        shard_batch(torch.arange(4)[None], process_group=None, **call)


def test_documents_the_model_cannot_honour_are_refused():
    model = hw.tiny()
    apply_ring_dilated_attention(model, *hp.DILATED)
    ids, positions, _, documents = shard_batch(hp.tokens(20, 0)[None], position_ids=torch.cat(
        [torch.arange(8), torch.arange(12)])[None], process_group=None)
    refused = [
        (ValueError, dict(position_ids=positions), r"position_ids restart inside a row \(packed documents\), but the "
                                                   r"attention layers were given no documents: shard_batch\(\.\.\., "
                                                   r"position_ids=\.\.\.\) returns them"),
        (ValueError, dict(cu_seq_lens_q=documents),
         "position_ids do not number the documents of cu_seq_lens_q from 0: token 8 of row 0 has position 8 but is "
         "token 0 of its document"),
        (ValueError, dict(position_ids=positions, cu_seq_lens_q=torch.tensor([0, 8, 16])),
         r"cu_seq_lens_q=\[0, 8, 16\] must end at the sequence length 20, got 16: .* \(cu_seq_lens_q: the documents "
         r"over the whole sequence of all ranks, as shard_batch returns them\)"),
        (ValueError, dict(position_ids=positions, cu_seq_lens_q=documents, cu_seq_lens_k=torch.tensor([0, 20])),
         r"cu_seq_lens_k must equal cu_seq_lens_q \(the documents of the keys are those of the queries"),
        (NotImplementedError, dict(position_ids=positions, cu_seq_lens_q=documents,
                                   seq_idx=torch.zeros(1, 20, dtype=torch.int32)),
         r"seq_idx \(the document of each token\) is not used: give the documents as cu_seq_lens_q"),
        (NotImplementedError, dict(position_ids=positions, cu_seq_lens_q=documents,
                                   attention_mask=torch.ones(1, 20).index_fill(1, torch.tensor([19]), 0)),
         r"a padding attention_mask is not supported by the model call: give the full \[batch, seq\] mask to "
         r"shard_batch\(\.\.\., attention_mask=mask\) instead"),
    ]
    for kind, keywords, words in refused:
        with pytest.raises(kind, match=words):
            model(input_ids=ids, **keywords)
    stablelm = fw.family("stablelm").build()  # its decoder layers do not pass cu_seq_lens_q on to attention
    apply_ring_dilated_attention(stablelm, [20], [1])
    lost = ("StableLmForCausalLM was called with cu_seq_lens_q, but its StableLmAttention layers did not receive it "
            r"\(the model does not pass it on to attention\): packed documents and padding are not supported")
    with pytest.raises(NotImplementedError, match=lost):  # found by the positions that restart
        stablelm(input_ids=ids, position_ids=positions, cu_seq_lens_q=documents)
    with pytest.raises(NotImplementedError, match=lost):  # one document per row: found when the forward ends
        stablelm(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 20]))
    lfm2 = fw.family("lfm2").build()
    apply_ring_dilated_attention(lfm2, [20], [1])
    with pytest.raises(TypeError, match="Lfm2ForCausalLM mixes the sequence with Lfm2ShortConv beside attention, "
                                        "which would cross the documents"):
        lfm2(input_ids=ids, position_ids=positions, cu_seq_lens_q=documents)
