"""Train a small Llama from scratch with its sequence split over processes, through ring dilated attention.

    torchrun --nproc-per-node 2 examples/hf_llama_sequence_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/hf_llama_sequence_parallel.py --cuda     # GPUs, NCCL

A character-level ``LlamaForCausalLM`` (built from a config, nothing downloaded) learns a text file (by default
a text generated here from a few templates, the same on every run). Every rank holds one contiguous slice of each
512-token sequence: ``apply_ring_dilated_attention``, ``shard_batch`` and ``sequence_parallel_loss`` are the three
lines that make a Hugging Face training loop sequence-parallel. The loss printed is the loss of whole sequences.
"""

from __future__ import annotations

import argparse
import os
import random

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from ring_attention.hf import apply_ring_dilated_attention, sequence_parallel_loss, shard_batch, sum_gradients

SEGMENTS, RATES = [64, 128, 256, 512], [1, 2, 4, 8]  # 512 tokens; on 2 ranks the last pair spans both


def generated_text(sentences: int = 4000) -> str:
    """Sentences from a few templates: structure a small model can learn, the same text on every run."""
    rng = random.Random(0)
    who = ["the ring", "every rank", "a query", "the kernel", "each head", "the segment", "the merge"]
    does = ["passes", "keeps", "attends to", "sends", "computes", "gathers", "returns"]
    what = ["its keys", "the dilated rows", "one block", "the log-sum-exp", "the next shard", "every value"]
    how = ["in order", "twice", "exactly", "at every step", "without a copy", "to its neighbour"]
    return " ".join(f"{rng.choice(who)} {rng.choice(does)} {rng.choice(what)} {rng.choice(how)}."
                    for _ in range(sentences))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", help="a text file to learn (default: generated)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cuda", action="store_true", help="one GPU per process, NCCL")
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    sequence_group = dist.group.WORLD  # here every rank holds a slice of the same sequences

    text = open(args.text).read() if args.text else generated_text()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    seq_len = SEGMENTS[-1]

    torch.manual_seed(0)  # the same initial model on every rank
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len)
    model = LlamaForCausalLM(config).to(device)
    apply_ring_dilated_attention(model, SEGMENTS, RATES, process_group=sequence_group)  # 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = torch.Generator().manual_seed(1)  # the same batches on every rank

    progress = tqdm(range(args.steps), desc="training", disable=rank != 0)
    for step in progress:
        starts = torch.randint(0, len(ids) - seq_len, (args.batch,), generator=batches)
        input_ids = torch.stack([ids[s: s + seq_len] for s in starts.tolist()]).to(device)
        input_ids, position_ids, labels = shard_batch(input_ids, process_group=sequence_group)  # 2
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        loss = sequence_parallel_loss(logits, labels, process_group=sequence_group)  # 3: this rank's share
        optimizer.zero_grad()
        loss.backward()
        sum_gradients(model, sequence_group)  # each rank's gradient covers its own tokens
        optimizer.step()
        whole = loss.detach().clone()
        dist.all_reduce(whole, group=sequence_group)  # the shares add up to the loss of whole sequences
        progress.set_postfix(loss=f"{whole.item():.3f}")
        if rank == 0 and step in (0, args.steps - 1):
            progress.write(f"step {step}: loss {whole.item():.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
