"""The tour: every stage built so far, on one problem, in one table.

    python -m lessons.tour            # 4 gloo processes on this machine's CPU
    python -m lessons.tour --quick    # a smaller problem

Each stage runs forward and backward in float64 in fresh processes (so each peak-memory number is its
own): stage 0 and stage 1 in one process (stage 1 simulates the 4 ranks), the later stages on 4 ranks.
Errors are the largest relative error of the output and of dq, dk, dv against stage 0, the reference (stage 8, the
same tokens packed as documents, against the reference given the same documents); the last column is what a rank
received from the others (the most of any rank), which shows what load balance, all-to-all and documents cost in
communication.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch
from tqdm import tqdm

from lessons.harness import ALL_TO_ALL_STAGES, DISTRIBUTED_STAGES, Problem, gather_ranks, run_stage
from lessons.launch import run_on_ranks

NAMES = ("out", "dq", "dk", "dv")


def tour_problem(quick: bool) -> Problem:
    if quick:
        return Problem(seq_len=512, segment_lengths=(64, 128, 256, 512), dilation_rates=(1, 2, 4, 8),
                       batch=1, heads=4, head_dim=32, causal=True)
    return Problem(seq_len=1024, segment_lengths=(128, 256, 512, 1024), dilation_rates=(1, 2, 4, 8),
                   batch=1, heads=8, head_dim=64, causal=True)


def relative_error(rows: dict, truth: dict) -> float:
    return max(((rows[n] - truth[n]).abs().max() / truth[n].abs().max()).item() for n in NAMES)


def run_tour(world_size: int = 4, quick: bool = False) -> list[dict]:
    """Run every stage and return one row per stage: name, error vs reference, seconds, peak MiB and MiB
    received (forward + backward) per rank, the most of any rank."""
    problem = tour_problem(quick)
    stages = [
        ("stage 0: reference", "reference:dilated_attention", 1, None),
        ("stage 1: simulated ring", "lessons.stage1_simulated_ring:simulated_ring_dilated_attention", 1,
         {"world_size": world_size}),
        *[(name, module, world_size, None) for name, module in {**DISTRIBUTED_STAGES, **ALL_TO_ALL_STAGES}.items()],
    ]
    # stage 8: the same tokens packed as documents (a document crossing every shard boundary, one of a single
    # token), against the reference with the same documents
    n = problem.seq_len
    documents = dataclasses.replace(problem, cu_seqlens=(0, n // 8 + 3, n // 2 + 1, n // 2 + 2, n - 5, n))
    stages += [("stage 8: documents, reference", "reference:dilated_attention", 1, None, documents),
               ("stage 8: documents, balanced", "lessons.harness:balanced_ring", world_size, None, documents)]
    rows, truth = [], {}
    for name, target, ranks, options, *packed in tqdm(stages, desc="tour", unit="stage"):
        results = run_on_ranks(run_stage, ranks, target, packed[0] if packed else problem, options, True)
        gathered = {n: gather_ranks(results, n) for n in NAMES}
        truth.setdefault(bool(packed), gathered)
        if packed and name.endswith("reference"):  # the truth of the row after it, not a stage of its own
            continue
        rows.append(dict(
            stage=name,
            error=relative_error(gathered, truth[bool(packed)]),
            seconds=max(r["seconds"] for r in results),
            peak_mib=max(r["peak_bytes"] for r in results) / 2**20,
            received_mib=max(r["received_bytes"] for r in results) / 2**20,
            processes=ranks,
        ))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'stage':<31} {'processes':>9} {'max rel. error':>15} {'fwd+bwd (s)':>12} {'peak MiB/rank':>14} "
             f"{'MiB received/rank':>18}"]
    for r in rows:
        lines.append(f"{r['stage']:<31} {r['processes']:>9} {r['error']:>15.1e} {r['seconds']:>12.3f} "
                     f"{r['peak_mib']:>14.1f} {r['received_mib']:>18.2f}")
    return "\n".join(lines)


def main() -> None:
    # freed allocations of 64 KiB or more go back to the system, so the ranks' resident memory (the peak
    # memory column) follows their live tensors; the ranks inherit it when they start
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a smaller problem")
    args = parser.parse_args()
    problem = tour_problem(args.quick)
    print(f"problem: N={problem.seq_len}, B={problem.batch}, H={problem.heads}, D={problem.head_dim}, "
          f"pairs={list(zip(problem.segment_lengths, problem.dilation_rates))}, causal, float64, "
          f"{args.world_size} gloo processes, torch {torch.__version__}")
    print(format_table(run_tour(args.world_size, args.quick)))


if __name__ == "__main__":
    main()
