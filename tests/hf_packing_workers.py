"""Packed and padded batches through a tiny Llama (float64, no download): the batches, what a sequence-parallel rank
computes of them (`on_ranks`, run inside `hf_family_workers.battery`, the one start of 2 processes), and each
document alone on one process (`alone`), which test_hf_packing.py compares them with.

On 2 ranks every batch below is 61 tokens long, padded by `shard_batch` to 62 (a filler document of one token), so
rank 0 holds tokens 0..30 and rank 1 tokens 31..61: each batch has a document that crosses the shard boundary, and
the first two one that ends exactly on it.
"""

from __future__ import annotations

import hf_workers as hw
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

from ring_attention.hf import apply_ring_dilated_attention, sequence_parallel_loss, shard_batch, sum_gradients

LENGTH = 61
DENSE, DILATED = ([62], [1]), ([8, 16, 32], [1, 2, 4])  # the dense pair over the padded sequence; LongNet pairs
# the configurations each batch runs on 2 ranks: (pairs, options of apply_ring_dilated_attention)
CONFIGS = {
    "packed": {"dense": (DENSE, {}), "dilated": (DILATED, {}), "dilated, all-gather": (DILATED, {"comm": "allgather"}),
               "dilated, all-to-all": (DILATED, {"ulysses_size": 2})},
    "padded": {"dense": (DENSE, {}), "dilated": (DILATED, {})},
    "collated": {"dilated": (DILATED, {})},
}
PACKED_ROWS = ([13, 18, 19, 11], [7, 40, 14])  # documents of each row: row 0's second ends at 31, row 1's crosses
PADDED_ROWS = (31, 50)  # real tokens of each row: row 0 ends at 31, row 1 crosses
COLLATED = [9, 30, 14, 8]  # DataCollatorWithFlattening's documents, one row: the second crosses


def tokens(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, hw.VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def batches() -> dict[str, dict]:
    """Each batch: the keywords of its `shard_batch` call, and its documents as (row, start, end)."""
    packed = torch.stack([tokens(LENGTH, seed) for seed in (1, 2)])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in PACKED_ROWS])
    padded = torch.stack([tokens(LENGTH, seed) for seed in (3, 4)])
    mask = (torch.arange(LENGTH) < torch.tensor(PADDED_ROWS)[:, None]).long()
    collated = DataCollatorWithFlattening()([{"input_ids": tokens(n, 5 + i).tolist()} for i, n in enumerate(COLLATED)])
    return {
        "packed": dict(call=dict(input_ids=packed, position_ids=positions), documents=documents(PACKED_ROWS)),
        "padded": dict(call=dict(input_ids=padded, attention_mask=mask),
                       documents=[(row, 0, n) for row, n in enumerate(PADDED_ROWS)]),
        "collated": dict(call=dict(input_ids=collated["input_ids"], labels=collated["labels"],
                                   position_ids=collated["position_ids"]), documents=documents([COLLATED])),
    }


def documents(rows) -> list[tuple[int, int, int]]:
    found = []
    for row, lengths in enumerate(rows):
        ends = torch.tensor(lengths).cumsum(0).tolist()
        found += [(row, end - n, end) for n, end in zip(lengths, ends)]
    return found


def model_for(pairs, options: dict, group) -> torch.nn.Module:
    model = hw.tiny("llama")
    apply_ring_dilated_attention(model, *pairs, process_group=group, **options)
    return model


def step(model, call: dict, group) -> dict:
    """The recipe with documents on this rank: its logits and labels, `sequence_parallel_loss` summed over the ranks,
    and the weight gradients of the sum of the tokens' losses, summed over the ranks (`sum_gradients`). A sum
    splits exactly into the documents' sums; a mean would scale the gradients before the float32 steps of the
    model's RMSNorm, which then round them differently from the documents' sums scaled after."""
    input_ids, position_ids, labels, cu_seq_lens_q = shard_batch(**call, process_group=group)
    logits = model(input_ids=input_ids, position_ids=position_ids, cu_seq_lens_q=cu_seq_lens_q).logits
    loss = sequence_parallel_loss(logits, labels, process_group=group).detach()
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    sum_gradients(model, group)
    if group is not None:
        dist.all_reduce(loss, group=group)
    return dict(logits=logits.detach(), labels=labels, loss=loss, cu_seq_lens_q=cu_seq_lens_q,
                grads={name: p.grad.clone() for name, p in model.named_parameters()})


def on_ranks(group) -> dict:
    """Every batch in each of its configurations, on this rank of ``group``."""
    results = {}
    for name, batch in batches().items():
        for config, (pairs, options) in CONFIGS[name].items():
            results[name, config] = step(model_for(pairs, options, group), batch["call"], group)
    return results


def alone(pairs, input_ids: torch.Tensor) -> dict:
    """One document alone through the model on one process (no documents, no padding): its logits, the sum of its
    tokens' losses (each predicts the next) and that sum's weight gradients."""
    model = model_for(pairs, {}, None)
    logits = model(input_ids=input_ids[None]).logits[0]  # [n, V]
    loss = F.cross_entropy(logits[:-1], input_ids[1:], reduction="sum")
    loss.backward()
    return dict(logits=logits.detach(), loss=loss.detach(),
                grads={name: p.grad.clone() for name, p in model.named_parameters()})
