"""Hugging Face models (`ring_attention.hf`): exact against transformers' own attention, sequence-parallel on
gloo processes, under FSDP2. Every family: test_hf_families.py; what is refused: test_hf_refusals.py."""

import hf_workers as hw
import pytest
import torch
from helpers import rel_err
from transformers import AttentionInterface

from lessons.launch import run_on_ranks
from ring_attention.hf import apply_ring_dilated_attention, sequence_parallel_loss, shard_batch


def logits_and_gradients(model, input_ids):
    model.zero_grad()
    ids, positions, labels = shard_batch(input_ids, process_group=None)
    logits = model(input_ids=ids, position_ids=positions).logits
    sequence_parallel_loss(logits, labels, process_group=None).backward()
    return [logits.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_dense_pair_is_transformers_attention(family):
    model = hw.tiny(family)
    ids = hw.batch(2)
    model.set_attn_implementation("sdpa")
    sdpa = logits_and_gradients(model, ids)
    model.set_attn_implementation("eager")
    eager = logits_and_gradients(model, ids)
    apply_ring_dilated_attention(model, [hw.SEQ], [1])
    ours = logits_and_gradients(model, ids)
    for a, b, c in zip(ours, sdpa, eager):
        assert rel_err(a, b) < 1e-10
        # transformers' eager attention rounds its softmax to float32, even in a float64 model
        assert rel_err(a, c) < 1e-6


def test_two_models_keep_their_own_settings():
    dense, dilated = hw.tiny(), hw.tiny()
    ids = hw.batch(2)
    first = apply_ring_dilated_attention(dense, [hw.SEQ], [1])
    second = apply_ring_dilated_attention(dilated, *hw.PAIRS)
    assert first != second and first in AttentionInterface() and dense.config._attn_implementation == first
    ours = dense(input_ids=ids).logits
    dense.set_attn_implementation("sdpa")
    assert rel_err(ours, dense(input_ids=ids).logits) < 1e-10
    assert rel_err(dilated(input_ids=ids).logits, ours) > 1e-3  # the pattern is really used


def test_labels_are_shifted_before_sharding():
    ids = torch.arange(8).reshape(1, 8)
    halves = [shard_batch(ids, process_group=None)]
    ids_, positions, labels = halves[0]
    assert labels.tolist() == [[1, 2, 3, 4, 5, 6, 7, -100]] and positions.tolist() == [list(range(8))]
    with pytest.raises(ValueError, match=r"input_ids and labels must both be \[batch, seq\], got \(8,\)"):
        shard_batch(torch.arange(8), process_group=None)


def test_sequence_parallel_loss_and_gradients_equal_one_process_on_4_ranks():
    # 2 ranks: test_hf_families.py, with every family in one start of the processes
    per_rank = run_on_ranks(hw.sequence_parallel, 4)
    for family in ("llama", "qwen2"):
        model = hw.tiny(family)
        apply_ring_dilated_attention(model, *hw.PAIRS)
        loss, grads = hw.loss_and_gradients(model, hw.batch(), None)
        for comm in ("ring", "allgather"):
            for rank_loss, rank_grads in (r[(family, comm)] for r in per_rank):
                assert rel_err(rank_loss, loss) < 1e-10, (family, comm)
                for name, grad in grads.items():
                    assert rel_err(rank_grads[name], grad) < 1e-10, (family, comm, name)


def test_fsdp2_over_data_ranks_reproduces_one_process_training():
    expected_losses, expected_params = hw.train_single_process()
    per_rank = run_on_ranks(hw.train_fsdp, 4)
    assert expected_losses[-1] < expected_losses[0]  # it trained
    for losses, params in per_rank:
        assert losses == pytest.approx(expected_losses, rel=1e-10, abs=0)
        for name, value in params.items():
            assert rel_err(value, expected_params[name]) < 1e-10, name
