"""What splitting the sequence costs: P gloo processes vs one process, at equal total work.

    python benchmarks/ring_overhead.py [--quick]

The production core on N = 16384 tokens (4 heads of 64, float32, causal, pairs with w / r = 2048), forward
+ backward, once on one process (``group=None``) and on P = 2, 4, 8 processes for both ``comm`` modes, with
causal load balance off and on. Each rank counts the bytes it receives from other ranks
(``lessons.harness.counting_received_bytes``) and the time it spends waiting on communication (by wrapping
``ring_attention.comm``). The forward's bytes must equal the formulas of docs/concepts.md: each spanning pair
moves ``(G - 1) L / r`` tokens of K and V per rank and kv head; balanced, it also moves the halves of its
selected rows that change rank (q, k, v into the zigzag order for the ring, q alone for the all-gather) and the
output and log-sum-exp back; and every call's agreement check brings 11 integers from each other rank. The
forward's and the forward + backward's bytes must equal ``ring_attention.cost.received_bytes`` on every rank:
the script stops otherwise. On this machine all P
processes share the same cores, so the P-rank time includes that contention: the ratio is an upper bound
of the overhead, not a speed-up measurement. The four cases of one P run one after the other in the same
processes. ``--quick`` runs N = 4096 on P = 2 and 4.
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

import ring_attention.comm as comm  # noqa: E402
from lessons.harness import counting_received_bytes  # noqa: E402
from lessons.launch import run_on_ranks  # noqa: E402
from ring_attention import ring_dilated_attention  # noqa: E402
from ring_attention.cost import received_bytes  # noqa: E402

HEADS, HEAD_DIM = 4, 64


def pairs(seq_len: int) -> tuple[list[int], list[int]]:
    segments = [s for s in (2048, 4096, 8192, 16384) if s <= seq_len]
    return segments, [s // 2048 for s in segments]


class Waiting:
    """Wraps the communication functions of `ring_attention.comm` that block to add up the time spent in them."""

    def __init__(self):
        self.seconds = 0.0
        for name in ("finish_exchange", "all_gather_blocks", "reduce_scatter_blocks", "send_and_receive"):
            setattr(comm, name, self.timed(getattr(comm, name)))

    def timed(self, fn):
        def wrapper(*args):
            start = time.perf_counter()
            result = fn(*args)
            self.seconds += time.perf_counter() - start
            return result
        return wrapper


def measure(rank: int, world_size: int, seq_len: int, cases: list[tuple[str, bool]]) -> list[dict]:
    """Every ``(comm mode, load balance)`` case in turn, in the same processes (a start costs seconds here)."""
    shard = seq_len // world_size
    gen = torch.Generator().manual_seed(rank)
    q, k, v, dout = (torch.randn(1, shard, HEADS, HEAD_DIM, generator=gen, requires_grad=i < 3) for i in range(4))
    group = dist.group.WORLD if world_size > 1 else None
    segments, rates = pairs(seq_len)
    waiting = Waiting()
    results = []
    for mode, load_balance in cases:

        def step(mode=mode, load_balance=load_balance):
            with counting_received_bytes() as received:
                out = ring_dilated_attention(q, k, v, segments, rates, causal=True, group=group, comm=mode,
                                             load_balance=load_balance)
                forward_bytes = received["bytes"]
                torch.autograd.grad(out, (q, k, v), dout)
            return forward_bytes, received["bytes"]

        step()  # warm-up: connections and process groups
        waiting.seconds = 0.0
        start = time.perf_counter()
        forward_bytes, total_bytes = step()
        seconds = time.perf_counter() - start
        results.append(dict(seconds=seconds, wait=waiting.seconds, forward_bytes=forward_bytes,
                            total_bytes=total_bytes))
    return results


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    seq_len, world_sizes = (4096, [2, 4]) if args.quick else (16384, [2, 4, 8])
    single = run_on_ranks(measure, 1, seq_len, [("ring", False)])[0][0]
    rows = [dict(mode="one process", load_balance=False, world_size=1, seconds=single["seconds"], wait=0.0,
                 forward_bytes=0, total_bytes=0, ratio=1.0)]
    cases = [(mode, balance) for mode in ("ring", "allgather") for balance in (False, True)]
    measured = {}
    for world_size in tqdm(world_sizes, desc="ring overhead"):
        per_rank = run_on_ranks(measure, world_size, seq_len, cases)
        for c, case in enumerate(cases):
            measured[case, world_size] = [r[c] for r in per_rank]
    for (mode, balance), world_size in ((case, p) for case in cases for p in world_sizes):
        results = measured[(mode, balance), world_size]
        for backward, key in ((False, "forward_bytes"), (True, "total_bytes")):
            expected = received_bytes(mode, world_size, seq_len, *pairs(seq_len), HEADS, HEADS, HEAD_DIM,
                                      torch.float32, causal=True, load_balance=balance, backward=backward)
            if [r[key] for r in results] != expected:
                raise AssertionError(f"{mode} balance={balance} P={world_size}: {key} "
                                     f"{[r[key] for r in results]} differ from the formula {expected}")
        seconds = max(r["seconds"] for r in results)
        rows.append(dict(mode=mode, load_balance=balance, world_size=world_size, seconds=seconds,
                         wait=max(r["wait"] for r in results),
                         forward_bytes=max(r["forward_bytes"] for r in results),
                         total_bytes=max(r["total_bytes"] for r in results),
                         ratio=seconds / single["seconds"]))
    write_json(out, "ring_overhead", dict(seq_len=seq_len, pairs=list(zip(*pairs(seq_len))), heads=HEADS,
                                          head_dim=HEAD_DIM, dtype="float32", causal=True, rows=rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for (mode, balance), marker in zip(cases, ("o-", "o--", "s-", "s--")):
        sel = [r for r in rows if r["mode"] == mode and r["load_balance"] == balance]
        name = f"{mode}{', balanced' if balance else ''}"
        ax.plot([r["world_size"] for r in sel], [r["seconds"] for r in sel], marker, label=f"{name}: total")
        ax.plot([r["world_size"] for r in sel], [r["wait"] for r in sel], marker[0] + ":",
                label=f"{name}: waiting")
    ax.axhline(single["seconds"], color="k", linestyle="--", label="one process")
    ax.set_xlabel("processes P (sharing the same cores)"), ax.set_ylabel("forward + backward (s)")
    ax.set_xticks(world_sizes)
    ax.set_title(f"N = {seq_len}, equal total work", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ring_overhead.png", dpi=120)
    for r in rows:
        print(f"{r['mode']:>11} balanced={r['load_balance']!s:<5} P={r['world_size']}: {r['seconds']:.3f} s "
              f"(x{r['ratio']:.2f} of one process), "
              f"waiting {r['wait']:.3f} s, forward {r['forward_bytes'] / 2**20:.2f} MiB received (most on a rank), "
              f"forward+backward {r['total_bytes'] / 2**20:.2f} MiB (both = ring_attention.cost.received_bytes)")


if __name__ == "__main__":
    main()
