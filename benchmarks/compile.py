"""``torch.compile`` on a training step: the tiny language model of lesson 5, eager vs compiled, one process and 2.

    python benchmarks/compile.py [--quick]

`lessons.tiny_lm.TinyLM` (two pre-norm blocks whose attention is `RingMultiheadDilatedAttention`, causal) trains on
one process and on 2 gloo processes with the sequence split over them (the recipe: DistributedDataParallel over the
sequence ranks, loss scaled by their number), eager and with the model compiled by ``torch.compile`` (inductor).
Each run reports the first step (which compiles), the median of the following steps, and the losses, which must
agree with eager to float32 rounding (the script stops otherwise). The attention runs as one custom op per call
(`ring_attention.ops`); inductor fuses what surrounds it (norms, MLP, residuals). One thread per process.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from common import output_dir, parse_args, write_json
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lessons.launch import run_on_ranks
from lessons.tiny_lm import TinyLM, batches, encode
from ring_attention import shard_sequence


def train_steps(rank: int, world_size: int, compiled: bool, seq_len: int, steps: int) -> dict:
    torch.set_num_threads(1)
    group = dist.group.WORLD if world_size > 1 else None
    torch.manual_seed(0)
    model = TinyLM(encode()[1], seq_len, group=group, embed_dim=64, heads=4)
    if group is not None:
        model = DistributedDataParallel(model)
    if compiled:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = 2
    positions = shard_sequence(torch.arange(seq_len).expand(batch, seq_len), group, dim=1)
    losses, seconds = [], []
    for inputs, targets in batches(steps, batch, seq_len):
        start = time.perf_counter()
        inputs, targets = shard_sequence(inputs, group, dim=1), shard_sequence(targets, group, dim=1)
        token_loss = nn.functional.cross_entropy(model(inputs, positions).flatten(0, 1), targets.flatten(),
                                                 reduction="sum")
        optimizer.zero_grad()
        (token_loss / (batch * seq_len) * world_size).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        total = token_loss.detach() / (batch * seq_len)
        if group is not None:
            dist.all_reduce(total, group=group)
        losses.append(total.item())
    return dict(first=seconds[0], median=statistics.median(seconds[1:]), losses=losses)


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    seq_len, steps = (128, 4) if args.quick else (256, 20)  # the lesson's text has about 300 characters
    rows = []
    for world_size in (1, 2):
        eager, compiled = (run_on_ranks(train_steps, world_size, flag, seq_len, steps, timeout=1800)[0]
                           for flag in (False, True))
        gap = max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"]))
        if gap > 1e-4:
            raise AssertionError(f"P={world_size}: compiled losses {compiled['losses']} differ from eager "
                                 f"{eager['losses']} by {gap:.1e}")
        rows.append(dict(world_size=world_size, eager_step=eager["median"], compiled_step=compiled["median"],
                         speedup=eager["median"] / compiled["median"], first_compiled_step=compiled["first"],
                         first_eager_step=eager["first"], loss_gap=gap, losses=eager["losses"]))
        print(f"P={world_size}: eager {eager['median']:.3f} s/step, compiled {compiled['median']:.3f} s/step "
              f"(x{rows[-1]['speedup']:.2f}); first compiled step {compiled['first']:.1f} s; losses agree to "
              f"{gap:.1e}")
    write_json(out, "compile", dict(seq_len=seq_len, steps=steps, batch=2, embed_dim=64, heads=4, layers=2,
                                    pairs=[[16, 1], [seq_len, 4]], dtype="float32", threads_per_process=1,
                                    rows=rows))


if __name__ == "__main__":
    main()
