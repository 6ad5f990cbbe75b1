"""Packed documents: what packing costs and saves, on one process and across ranks.

    python benchmarks/packing.py [--quick]

One fixed distribution of document lengths (seeded, long-tailed: log-normal with a mean of about 2K tokens, at most
32K), LongNet's pairs (2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12), causal, float32, 4 heads of 64.

**One process**, N = 32K and 128K tokens of documents, forward + backward, each in a fresh process (peak memory):

- *packed*: the documents laid end to end, ``cu_seqlens`` their boundaries;
- *padded batch*: the same documents, one per row, each row padded to the longest (the padding a filler document of
  its row), run in batches of at most N tokens and timed together;
- *one call per document*: each document alone;
- *unpacked*: a sequence of the same N tokens as one document, the reference for the time per useful FLOP.

Reported: tokens per second (real tokens), peak memory, and the useful work (scores of the documents' pairs, from
the plan the core runs) against the work the bucketing of short pieces pads in. **Goals**: padded work at most 15%
of the useful work; packed at least 2x faster than the padded batch; time per useful FLOP within 1.25x of unpacked.

**Across ranks**, P = 2, 4, 8 at N = 128K: each rank's causal work, from the plan, max / mean with and without load
balance (**goal**: at most 1.1 balanced), and the bytes a rank receives against the unpacked sequence; then the
wall time of 2 processes (one thread each) at N = 32K, balanced and not.
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.distributed as dist
from common import output_dir, parse_args, write_json

from lessons.harness import peak_memory, reset_peak_memory
from lessons.launch import run_on_ranks
from ring_attention import ring_dilated_attention
from ring_attention.cost import received_bytes, score_pairs
from ring_attention.documents import LocalPlan, plan_documents
from ring_attention.streams import StreamPlan
from ring_attention.validation import check_cu_seqlens

PAIRS = ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])
HEADS, HEAD_DIM = 4, 64
FLOPS_PER_SCORE = 4 * HEAD_DIM * 3.5  # QK^T and PV forward, 2.5x that backward


def document_lengths(seq_len: int, seed: int = 0, mean: int = 2048, longest: int = 32768) -> list[int]:
    """Log-normal lengths (sigma 1.2, median ~1000, mean ~2048) filling ``seq_len`` exactly, the last one cut."""
    rng, sigma = random.Random(seed), 1.2
    mu = math.log(mean) - sigma**2 / 2
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(min(longest, max(1, round(rng.lognormvariate(mu, sigma)))))
    lengths[-1] -= sum(lengths) - seq_len
    return [n for n in lengths if n > 0]


def boundaries(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def run(rank: int, world_size: int, kind: str, lengths: list[int], pairs) -> dict:
    """Forward + backward of ``kind`` in this fresh process: seconds (best of 2 after a warm-up) and peak bytes."""
    torch.set_num_threads(1 if world_size > 1 else torch.get_num_threads())
    gen = torch.Generator().manual_seed(rank)
    group = dist.group.WORLD if world_size > 1 else None
    total = sum(lengths)
    calls = []  # (batch, seq_len, cu_seqlens)
    if kind == "padded batch":
        longest = max(lengths)
        rows = max(1, total // longest)
        for start in range(0, len(lengths), rows):
            chunk = lengths[start: start + rows]
            calls.append((len(chunk), longest, [[0, n, longest] if n < longest else [0, longest] for n in chunk]))
    elif kind == "one call per document":
        calls = [(1, n, None) for n in lengths]
    else:  # packed (documents) or unpacked (one document), possibly balanced
        calls = [(1, total // world_size, boundaries(lengths) if kind.startswith("packed") else None)]
    tensors = [[torch.randn(b, n, HEADS, HEAD_DIM, generator=gen, requires_grad=i < 3) for i in range(4)]
               for b, n, _ in calls]

    def step():
        for (_, _, documents), (q, k, v, dout) in zip(calls, tensors):
            out = ring_dilated_attention(q, k, v, *pairs, causal=True, cu_seqlens=documents, group=group,
                                         load_balance=not kind.endswith("unbalanced"))
            torch.autograd.grad(out, (q, k, v), dout)

    step()  # plans and process groups
    best = math.inf
    for _ in range(2):
        if group is not None:
            dist.barrier()
        before = reset_peak_memory()
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return dict(seconds=best, peak_bytes=peak_memory() - before)


def padded_fraction(documents: list[int], pairs) -> dict:
    """The scores the bucketing pads in, against the useful scores (of every piece, and of the bucketed ones)."""
    rows = check_cu_seqlens(documents, documents[-1], 1)
    plans = plan_documents(rows, documents[-1], 1, 0, *pairs, num_heads=HEADS, num_kv_heads=HEADS, head_mode="all",
                           batch=1, causal=True, device=torch.device("cpu"), local_heads=range(HEADS))
    buckets = [p.short for p in plans if isinstance(p, LocalPlan) and p.short is not None]
    buckets += [b for p in plans if isinstance(p, StreamPlan) for b in p.gathered.buckets if p.gathered]
    useful = score_pairs(documents[-1], 1, *pairs, HEADS, cu_seqlens=documents)[0]
    padded = sum(b.padded - b.useful for b in buckets)
    bucketed = sum(b.useful for b in buckets)
    return dict(useful_scores=useful, bucketed_scores=bucketed, padded_scores=padded, of_useful=padded / useful,
                of_bucketed=padded / max(bucketed, 1))


def one_process(seq_len: int, pairs, scale: int) -> dict:
    lengths = document_lengths(seq_len, mean=2048 // scale, longest=32768 // scale)
    documents = boundaries(lengths)
    useful = score_pairs(seq_len, 1, *pairs, HEADS, cu_seqlens=documents)[0]
    unpacked_work = score_pairs(seq_len, 1, *pairs, HEADS)[0]
    result = dict(seq_len=seq_len, documents=len(lengths), mean_length=seq_len / len(lengths),
                  longest=max(lengths), padding=padded_fraction(documents, pairs), runs={})
    for kind in ("packed", "padded batch", "one call per document", "unpacked"):
        measured = run_on_ranks(run, 1, kind, lengths, pairs, timeout=7200)[0]
        work = unpacked_work if kind == "unpacked" else useful
        measured.update(tokens_per_second=seq_len / measured["seconds"],
                        seconds_per_gflop=measured["seconds"] / (work * FLOPS_PER_SCORE / 1e9))
        result["runs"][kind] = measured
        print(f"N={seq_len} {kind:>22}: {measured['seconds']:8.2f} s, {measured['tokens_per_second']:9.0f} tokens/s, "
              f"peak {measured['peak_bytes'] / 2**20:7.0f} MiB", flush=True)
    runs = result["runs"]
    result["packed_vs_padded"] = runs["padded batch"]["seconds"] / runs["packed"]["seconds"]
    result["time_per_flop_vs_unpacked"] = runs["packed"]["seconds_per_gflop"] / runs["unpacked"]["seconds_per_gflop"]
    return result


def across_ranks(seq_len: int, world_sizes, pairs, scale: int) -> list[dict]:
    documents = boundaries(document_lengths(seq_len, mean=2048 // scale, longest=32768 // scale))
    rows = []
    for world_size in world_sizes:
        work = {balance: score_pairs(seq_len, world_size, *pairs, HEADS, cu_seqlens=documents,
                                     load_balance=balance) for balance in (False, True)}
        bytes_ = {name: max(received_bytes("ring", world_size, seq_len, *pairs, HEADS, HEADS, HEAD_DIM, torch.float32,
                                           causal=True, cu_seqlens=cu))
                  for name, cu in (("packed", documents), ("unpacked", None))}
        rows.append(dict(world_size=world_size, **{f"max_over_mean_{'balanced' if b else 'unbalanced'}":
                                                   max(w) / (sum(w) / world_size) for b, w in work.items()},
                         received_bytes_packed=bytes_["packed"], received_bytes_unpacked=bytes_["unpacked"]))
        print(f"P={world_size}: work max/mean {rows[-1]['max_over_mean_unbalanced']:.3f} unbalanced, "
              f"{rows[-1]['max_over_mean_balanced']:.3f} balanced; bytes per rank {bytes_['packed'] / 2**20:.1f} MiB "
              f"packed vs {bytes_['unpacked'] / 2**20:.1f} unpacked", flush=True)
    return rows


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    # --quick: the same code at small sizes (pairs scaled down 16x) so that it runs in about a minute
    pairs = ([w // 16 for w in PAIRS[0]], PAIRS[1]) if args.quick else PAIRS
    sizes, ranks_len, timing_len = ([2048], 8192, 2048) if args.quick else ([32768, 131072], 131072, 32768)
    scale = 16 if args.quick else 1
    results = dict(pairs=list(zip(*pairs)), heads=HEADS, head_dim=HEAD_DIM, dtype="float32", causal=True,
                   distribution=f"log-normal, mean ~{2048 // scale}, at most {32768 // scale}", one_process=[],
                   across_ranks=across_ranks(ranks_len, (2, 4, 8), pairs, scale))
    for seq_len in sizes:
        results["one_process"].append(one_process(seq_len, pairs, scale))
    lengths = document_lengths(timing_len, mean=2048 // scale, longest=32768 // scale)
    timing = {kind: max(r["seconds"] for r in run_on_ranks(run, 2, kind, lengths, pairs, timeout=7200))
              for kind in ("packed", "packed, unbalanced")}
    results["two_processes"] = dict(seq_len=timing_len, balanced=timing["packed"],
                                    unbalanced=timing["packed, unbalanced"],
                                    speedup=timing["packed, unbalanced"] / timing["packed"])
    print(f"2 processes, N={timing_len}: balanced {timing['packed']:.2f} s, unbalanced "
          f"{timing['packed, unbalanced']:.2f} s", flush=True)
    write_json(out, "packing", results)


if __name__ == "__main__":
    main()
