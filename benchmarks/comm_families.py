"""The three families of sequence parallelism and the hybrid, side by side: time and bytes per rank.

    python benchmarks/comm_families.py [--quick]

The production core, forward + backward, N = 8192 tokens, 8 heads of 64 (8 kv heads), float32, not causal (so
that the bytes are those of the family alone), on P = 2, 4 and 8 gloo processes: the ring (``comm="ring"``), the
all-gather (``comm="allgather"``), all-to-all over heads across all P ranks (``ulysses_size=P``) and the hybrid
(``ulysses_size=2`` with the ring; from P = 4), for the dense pair (N, 1) and LongNet pairs (w / r = 1024). Every
rank counts the bytes it receives (``lessons.harness.counting_received_bytes``); the script stops unless they
equal the formulas of ``ring_attention.cost`` exactly. All P processes share this machine's cores: the times
compare the families with one another, not with a GPU cluster. ``--quick`` runs N = 2048 on P = 2 and 4.
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

from lessons.harness import counting_received_bytes  # noqa: E402
from lessons.launch import run_on_ranks  # noqa: E402
from ring_attention import ring_dilated_attention  # noqa: E402
from ring_attention.cost import received_bytes  # noqa: E402

HEADS, HEAD_DIM = 8, 64
FAMILIES = {"ring": ("ring", lambda p: 1), "all-gather": ("allgather", lambda p: 1),
            "all-to-all": ("ring", lambda p: p), "hybrid U=2": ("ring", lambda p: 2)}


def configurations(seq_len: int) -> dict[str, tuple[list[int], list[int]]]:
    step = seq_len // 8
    return {"dense (N, 1)": ([seq_len], [1]), "LongNet": ([step, 2 * step, 4 * step, 8 * step], [1, 2, 4, 8])}


def measure(rank: int, world_size: int, seq_len: int, configs: dict, families: list[str]) -> dict:
    """Every configuration and family in turn, in the same processes (a start costs seconds here)."""
    gen = torch.Generator().manual_seed(rank)
    q, k, v, dout = (torch.randn(1, seq_len // world_size, HEADS, HEAD_DIM, generator=gen, requires_grad=i < 3)
                     for i in range(4))
    results = {}
    for config, pairs in configs.items():
        for name in families:
            comm, ulysses = FAMILIES[name]

            def step(comm=comm, ulysses=ulysses, pairs=pairs):
                out = ring_dilated_attention(q, k, v, *pairs, group=dist.group.WORLD, comm=comm,
                                             ulysses_size=ulysses(world_size))
                torch.autograd.grad(out, (q, k, v), dout)

            step()  # warm-up: connections and process groups
            dist.barrier()
            with counting_received_bytes() as received:
                start = time.perf_counter()
                step()
                dist.barrier()
                seconds = time.perf_counter() - start
            results[config, name] = dict(seconds=seconds, received_bytes=received["bytes"])
    return results


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    seq_len, world_sizes = (2048, (2, 4)) if args.quick else (8192, (2, 4, 8))
    configs = configurations(seq_len)
    measured = {}
    for world_size in tqdm(world_sizes, desc="families"):
        families = [name for name in FAMILIES if not (name == "hybrid U=2" and world_size == 2)]
        per_rank = run_on_ranks(measure, world_size, seq_len, configs, families, timeout=1800)
        measured.update({(config, world_size, name): [r[config, name] for r in per_rank]
                         for config in configs for name in families})
    rows = []
    for (config, world_size, name), per_rank in sorted(measured.items(), key=lambda x: list(configs).index(x[0][0])):
        comm, ulysses = FAMILIES[name]
        expected = received_bytes(comm, world_size, seq_len, *configs[config], HEADS, HEADS, HEAD_DIM, torch.float32,
                                  ulysses_size=ulysses(world_size))
        counted = [r["received_bytes"] for r in per_rank]
        if counted != expected:
            raise AssertionError(f"{config} P={world_size} {name}: counted {counted}, formula {expected}")
        rows.append(dict(config=config, world_size=world_size, family=name, received_bytes=max(expected),
                         seconds=max(r["seconds"] for r in per_rank)))
    write_json(out, "comm_families", dict(seq_len=seq_len, heads=HEADS, kv_heads=HEADS, head_dim=HEAD_DIM,
                                          dtype="float32", causal=False,
                                          configurations={k: list(zip(*v)) for k, v in configurations(seq_len).items()},
                                          rows=rows))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for col, config in enumerate(configurations(seq_len)):
        for name in FAMILIES:
            sel = [r for r in rows if r["config"] == config and r["family"] == name]
            axes[0, col].plot([r["world_size"] for r in sel], [r["received_bytes"] / 2**20 for r in sel], "o-",
                              label=name)
            axes[1, col].plot([r["world_size"] for r in sel], [r["seconds"] for r in sel], "o-", label=name)
        axes[0, col].set_title(config, fontsize=10)
        axes[1, col].set_xlabel("processes P"), axes[1, col].set_xticks(list(world_sizes))
    axes[0, 0].set_ylabel("MiB received per rank"), axes[1, 0].set_ylabel("forward + backward (s)")
    axes[0, 1].legend(fontsize=8)
    fig.suptitle(f"N = {seq_len}, {HEADS} heads of {HEAD_DIM}, float32, gloo on one machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "comm_families.png", dpi=120)
    for r in rows:
        print(f"{r['config']:>13} P={r['world_size']} {r['family']:>11}: {r['received_bytes'] / 2**20:8.2f} MiB "
              f"received per rank (= formula), {r['seconds']:.2f} s")


if __name__ == "__main__":
    main()
