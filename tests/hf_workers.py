"""Tiny Hugging Face models built locally (no download), and the functions spawned ranks run for test_hf.py."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ring_attention.hf import apply_ring_dilated_attention, sequence_parallel_loss, shard_batch, sum_gradients

VOCAB, SEQ = 64, 64
PAIRS = ([16, 32, 64], [1, 2, 4])  # on 2 or 4 ranks (L = 32 or 16) the longer pairs span ranks


def tiny(family: str = "llama", **overrides):
    """A 2-layer model of ``family`` in float64, from a fixed seed; Llama with grouped-query heads (4 on 2)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2 * SEQ, attention_dropout=0.0)
    config, model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                     "mistral": (MistralConfig, MistralForCausalLM)}[family]
    if family == "mistral":
        common["sliding_window"] = None
    return model(config(**{**common, **overrides})).double()


def batch(size: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, SEQ), generator=torch.Generator().manual_seed(seed))


def loss_and_gradients(model, input_ids, group):
    """The loss of this rank's share and the gradients, summed over the sequence group (of the parameters that have
    one: a vision tower's have none on text-only batches)."""
    ids, positions, labels = shard_batch(input_ids, process_group=group)
    loss = sequence_parallel_loss(model(input_ids=ids, position_ids=positions).logits, labels, process_group=group)
    loss.backward()
    sum_gradients(model, group)
    total = loss.detach().clone()
    if group is not None:
        dist.all_reduce(total, group=group)
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def sequence_parallel(rank, world_size):
    """Llama (grouped-query) and Qwen2 with LongNet pairs on all ranks: loss and summed gradients, per comm."""
    results = {}
    for family in ("llama", "qwen2"):
        for comm in ("ring", "allgather"):
            model = tiny(family)
            apply_ring_dilated_attention(model, *PAIRS, process_group=dist.group.WORLD, comm=comm)
            results[(family, comm)] = loss_and_gradients(model, batch(), dist.group.WORLD)
    return results


def train_fsdp(rank, world_size, steps=3):
    """FSDP2 over the data ranks of a (dp = 2) x (sp = 2) mesh, gradients summed over the sequence ranks."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    model = tiny("llama")
    apply_ring_dilated_attention(model, *PAIRS, process_group=mesh["sp"])
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    dp_rank = mesh["dp"].get_local_rank()
    data = batch()[2 * dp_rank: 2 * dp_rank + 2]  # this data rank's half of the batch
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        ids, positions, labels = shard_batch(data, process_group=mesh["sp"])
        loss = sequence_parallel_loss(model(input_ids=ids, position_ids=positions).logits, labels,
                                      process_group=mesh["sp"])
        loss.backward()  # FSDP averages over the data ranks
        sum_gradients(model, mesh["sp"])  # every sequence rank's tokens count
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)  # over all 4 ranks: 2 data shards, each the sum of its 2 sequence shares
        losses.append((total / 2).item())
    return losses, {name: p.full_tensor().detach() for name, p in model.named_parameters()}


def train_single_process(steps=3):
    model = tiny("llama")
    apply_ring_dilated_attention(model, *PAIRS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        ids, positions, labels = shard_batch(batch(), process_group=None)
        loss = sequence_parallel_loss(model(input_ids=ids, position_ids=positions).logits, labels, process_group=None)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}
