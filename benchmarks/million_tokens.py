"""A million tokens, forward and backward, through `RingMultiheadDilatedAttention` on 8 gloo processes.

    python benchmarks/million_tokens.py [--quick]

N = 1,048,576 tokens, one sequence, split over 8 processes on this machine's CPU (131,072 tokens each).
Pairs with constant w / r = 4096: (4096, 1), (16384, 4), (65536, 16) are local to a rank; (262144, 64) spans
2 ranks and (1048576, 256) spans all 8. 4 heads of 32, bf16 parameters and activations, causal. Each rank
builds only its own slice of the input. Reported: wall time of forward + backward, peak memory per rank, and
the attention FLOP/s achieved by all ranks together against this machine's bf16 matmul FLOP/s. ``--quick``
runs 16,384 tokens on 4 processes, against a smaller matmul.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from common import dilated_flops, matmul_flops, output_dir, parse_args, write_json
from tqdm import tqdm

from lessons.harness import peak_memory, reset_peak_memory
from lessons.launch import run_on_ranks
from ring_attention import RingMultiheadDilatedAttention

EMBED, HEADS = 128, 4


def pairs(seq_len: int) -> tuple[list[int], list[int]]:
    segments = [s for s in (4096, 16384, 65536, 262144, 1048576) if s <= seq_len]
    return segments, [s // 4096 for s in segments]


def run(rank: int, world_size: int, seq_len: int) -> dict:
    segments, rates = pairs(seq_len)
    torch.manual_seed(0)
    attention = RingMultiheadDilatedAttention(EMBED, HEADS, batch_first=True, dtype=torch.bfloat16,
                                              segment_lengths=segments, dilation_rates=rates, causal=True,
                                              process_group=dist.group.WORLD)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(1, seq_len // world_size, EMBED, generator=gen).to(torch.bfloat16).requires_grad_(True)
    before = reset_peak_memory()
    dist.barrier()
    start = time.perf_counter()
    out, _ = attention(x, x, x)
    forward = time.perf_counter() - start
    out.float().square().mean().backward()
    dist.barrier()
    return dict(forward=forward, seconds=time.perf_counter() - start, peak_mib=(peak_memory() - before) / 2**20,
                finite=bool(torch.isfinite(x.grad).all()))


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    seq_len, world_size = (16384, 4) if args.quick else (1048576, 8)
    roofline = matmul_flops(torch.bfloat16, size=512 if args.quick else 2048)  # bf16 matmuls are slow on some CPUs
    with tqdm(total=1, desc=f"{seq_len} tokens on {world_size} processes") as bar:
        results = run_on_ranks(run, world_size, seq_len, timeout=3600)
        bar.update()
    segments, rates = pairs(seq_len)
    seconds = max(r["seconds"] for r in results)
    flops = dilated_flops(seq_len, segments, rates, HEADS, EMBED // HEADS, causal=True)
    record = dict(seq_len=seq_len, world_size=world_size, pairs=list(zip(segments, rates)), heads=HEADS,
                  head_dim=EMBED // HEADS, dtype="bfloat16", causal=True, seconds=seconds,
                  forward_seconds=max(r["forward"] for r in results),
                  peak_mib_per_rank=max(r["peak_mib"] for r in results), attention_tflop=flops / 1e12,
                  achieved_gflops=flops / seconds / 1e9, roofline_gflops=roofline / 1e9,
                  percent_of_roofline=100 * flops / seconds / roofline,
                  gradients_finite=all(r["finite"] for r in results))
    write_json(out, "million_tokens", record)
    print(f"{seq_len:,} tokens on {world_size} processes: forward+backward {seconds:.1f} s "
          f"(forward {record['forward_seconds']:.1f} s), peak {record['peak_mib_per_rank']:.0f} MiB per rank, "
          f"{record['achieved_gflops']:.0f} GFLOP/s of attention = {record['percent_of_roofline']:.0f}% of the "
          f"bf16 matmul roofline ({record['roofline_gflops']:.0f} GFLOP/s); gradients finite: "
          f"{record['gradients_finite']}")


if __name__ == "__main__":
    main()
