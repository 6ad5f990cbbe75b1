"""Summing the weight gradients over the sequence ranks: a few flat buckets against one all-reduce per parameter.

    python benchmarks/sum_gradients.py [--quick]

``ring_attention.hf.sum_gradients`` all-reduces the gradients under 1 MiB together in flat buffers of up to 16 MiB
(one per dtype and device) and each larger one in place, alone; before, it ran one all-reduce per parameter (kept
here as ``per_parameter``). Both run on 2 gloo
processes (one thread each) on the same gradients of two Llama models built from configs, float32: the tiny model
of the tests (2 layers of width 32) and a small one (8 layers of width 512); their tensor and parameter counts are
recorded. Each rank times each way alternately, best of ``repeats`` after a warm-up, with a barrier
before each call; the slower rank's time is kept. The bucketed sums must equal the per-parameter sums exactly.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from common import output_dir, parse_args, write_json
from transformers import LlamaConfig, LlamaForCausalLM

from lessons.launch import run_on_ranks
from ring_attention.hf import sum_gradients

MODELS = {
    "tiny (the tests' model)": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4),
}


def per_parameter(model: torch.nn.Module, group) -> None:
    """The previous ``sum_gradients``: one all-reduce per parameter."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, group=group)


def timed(way, model: torch.nn.Module, grads: list[torch.Tensor], group) -> float:
    """Seconds of one call of ``way`` on fresh copies of ``grads``, started together on every rank."""
    for parameter, grad in zip(model.parameters(), grads):
        parameter.grad = grad.clone()
    dist.barrier()
    start = time.perf_counter()
    way(model, group)
    return time.perf_counter() - start


def measure(rank: int, world_size: int, repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    group = dist.group.WORLD
    rows = []
    for name, sizes in MODELS.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**sizes))
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(rank + i))
                 for i, p in enumerate(model.parameters())]

        timed(sum_gradients, model, grads, group)  # a warm-up of each way, and their results
        bucketed = [p.grad.clone() for p in model.parameters()]
        timed(per_parameter, model, grads, group)
        if any(not torch.equal(a, p.grad) for a, p in zip(bucketed, model.parameters())):
            raise AssertionError(f"{name}: the bucketed sums differ from the per-parameter sums")
        best = {sum_gradients: float("inf"), per_parameter: float("inf")}
        for _ in range(repeats):
            for way in best:  # alternately
                best[way] = min(best[way], timed(way, model, grads, group))
        rows.append(dict(model=name, tensors=len(grads), parameters=sum(g.numel() for g in grads),
                         buckets=best[sum_gradients], per_parameter=best[per_parameter]))
    return rows


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    repeats = 3 if args.quick else 20
    per_rank = run_on_ranks(measure, 2, repeats)
    rows = []
    for row, other in zip(*per_rank):
        buckets, each = max(row["buckets"], other["buckets"]), max(row["per_parameter"], other["per_parameter"])
        rows.append(dict(model=row["model"], tensors=row["tensors"], parameters=row["parameters"],
                         buckets_ms=1e3 * buckets, per_parameter_ms=1e3 * each, speedup=each / buckets))
        print(f"{row['model']}: {row['tensors']} tensors, {row['parameters']:,} parameters: buckets "
              f"{1e3 * buckets:.2f} ms, per parameter {1e3 * each:.2f} ms ({each / buckets:.1f}x)")
    write_json(out, "sum_gradients", dict(world_size=2, threads_per_rank=1, dtype="float32", repeats=repeats,
                                          rows=rows))


if __name__ == "__main__":
    main()
