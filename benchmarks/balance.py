"""Causal load balance: the work each rank does, and the time it saves.

    python benchmarks/balance.py [--quick]

1. **per-rank work**: the (query, key) score pairs each rank's kernels compute, counted from the plan and the
   schedules the core runs (``ring_attention.cost.score_pairs``), max / mean over the ranks, for P = 2, 4, 8,
   causal, the dense pair ``(N, 1)`` and LongNet pairs, both ``comm`` modes, balanced and not. Goal: max / mean
   <= 1.05 in every balanced configuration.
2. **wall time**, forward + backward, 2 processes with one thread each (no oversubscription on 2 cores): the
   causal pair ``(16384, 1)``, 8 heads of 64, float32, and a LongNet configuration, balanced and not, side by
   side in the same processes (alternating, best of 3 after a warm-up). Goal: >= 1.3x faster (ideal 1.5x).

``--quick`` runs N = 4096 for the wall time.
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import output_dir, parse_args, write_json  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lessons.launch import run_on_ranks  # noqa: E402
from ring_attention import ring_dilated_attention  # noqa: E402
from ring_attention.cost import score_pairs  # noqa: E402

HEADS, HEAD_DIM = 8, 64


def configurations(seq_len: int) -> dict[str, tuple[list[int], list[int]]]:
    longnet = [w for w in (2048, 4096, 8192, 16384) if w <= seq_len]
    return {"dense (N, 1)": ([seq_len], [1]), "LongNet": (longnet, [w // 2048 for w in longnet])}


def work_table(seq_len: int) -> list[dict]:
    rows = []
    for name, pairs in configurations(seq_len).items():
        for world_size in (2, 4, 8):
            for comm in ("ring", "allgather"):
                for balance in (False, True):
                    work = score_pairs(seq_len, world_size, *pairs, HEADS, comm=comm, load_balance=balance)
                    rows.append(dict(config=name, world_size=world_size, comm=comm, load_balance=balance,
                                     work=work, max_over_mean=max(work) / (sum(work) / world_size)))
    return rows


def timed(rank: int, world_size: int, seq_len: int, pairs, repeats: int) -> dict:
    """Both schedules in these processes, alternating: this rank's best forward + backward time of each."""
    gen = torch.Generator().manual_seed(rank)
    q, k, v, dout = (torch.randn(1, seq_len // world_size, HEADS, HEAD_DIM, generator=gen, requires_grad=i < 3)
                     for i in range(4))
    best = {False: float("inf"), True: float("inf")}
    for attempt in range(repeats + 1):
        for balance in (False, True):
            dist.barrier()
            start = time.perf_counter()
            out = ring_dilated_attention(q, k, v, *pairs, causal=True, group=dist.group.WORLD,
                                         load_balance=balance)
            torch.autograd.grad(out, (q, k, v), dout)
            dist.barrier()  # the step ends when the slowest rank is done
            if attempt > 0:
                best[balance] = min(best[balance], time.perf_counter() - start)
    return {"unbalanced": best[False], "balanced": best[True]}


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    work = work_table(16384)
    seq_len = 4096 if args.quick else 16384
    timings = []
    for name, pairs in tqdm(configurations(seq_len).items(), desc="balance"):
        per_rank = run_on_ranks(timed, 2, seq_len, pairs, 1 if args.quick else 3, timeout=3600)
        seconds = {kind: max(r[kind] for r in per_rank) for kind in ("unbalanced", "balanced")}
        timings.append(dict(config=name, pairs=list(zip(*pairs)), seq_len=seq_len, world_size=2, threads_per_rank=1,
                            **seconds, speedup=seconds["unbalanced"] / seconds["balanced"]))
    write_json(out, "balance", dict(heads=HEADS, head_dim=HEAD_DIM, dtype="float32", causal=True, work_seq_len=16384,
                                    work=work, timings=timings))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (name, comm), marker in zip([(n, c) for n in configurations(16384) for c in ("ring", "allgather")],
                                    ("o", "s", "^", "v")):
        for balance, style in ((False, ":"), (True, "-")):
            sel = [r for r in work if r["config"] == name and r["comm"] == comm and r["load_balance"] == balance]
            axes[0].plot([r["world_size"] for r in sel], [r["max_over_mean"] for r in sel], marker + style,
                         label=f"{name}, {comm}{', balanced' if balance else ''}")
    axes[0].axhline(1.05, color="grey", linestyle="--")
    axes[0].set_xlabel("ranks P"), axes[0].set_ylabel("work: max / mean over ranks"), axes[0].set_xticks([2, 4, 8])
    axes[0].legend(fontsize=6)
    names = [t["config"] for t in timings]
    xs = range(len(names))
    axes[1].bar([x - 0.2 for x in xs], [t["unbalanced"] for t in timings], 0.4, label="unbalanced")
    axes[1].bar([x + 0.2 for x in xs], [t["balanced"] for t in timings], 0.4, label="balanced")
    axes[1].set_xticks(list(xs), names)
    axes[1].set_ylabel(f"forward + backward (s), N = {seq_len}, 2 ranks")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "balance.png", dpi=120)
    for r in work:
        print(f"{r['config']:>13} P={r['world_size']} {r['comm']:>9} balanced={r['load_balance']!s:<5} "
              f"max/mean work {r['max_over_mean']:.3f}")
    for t in timings:
        print(f"{t['config']}: unbalanced {t['unbalanced']:.2f} s, balanced {t['balanced']:.2f} s, "
              f"{t['speedup']:.2f}x faster")


if __name__ == "__main__":
    main()
