"""Side by side with the public ``ring-attention-pytorch`` package on the dense case it supports.

    pip install -e ".[bench]"
    python benchmarks/vs_public.py [--quick]

One pair (N, 1) — plain softmax attention with the sequence split over the ranks — causal and not, on 2
and 4 gloo processes. Both projects get the same shards: ours is ``ring_attention.ring_dilated_attention``
with ``comm="ring"``; theirs is ``ring_attention_pytorch.ring_flash_attn`` with ``ring_reduce_col=True``
(its ring across processes). Reported for each: forward + backward time and the largest relative error of
the output and of dq, dk, dv against a float64 single-process ground truth (``reference.attention``), with
float32 inputs — so wrong gradients, if any, show up as large errors; for dk it also tries every shift of
ranks, to tell gradients that land on the wrong rank from wrong values. Ours is also run with float64 inputs;
the public package raises on float64 inputs (0.5.20), and the script records the message it raises.
"""

from __future__ import annotations

import importlib.util
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import output_dir, parse_args, write_json  # noqa: E402
from tqdm import tqdm  # noqa: E402

import reference  # noqa: E402
from lessons.launch import run_on_ranks  # noqa: E402
from ring_attention import ring_dilated_attention  # noqa: E402

NAMES = ("out", "dq", "dk", "dv")


def inputs(seq_len: int, dtype: torch.dtype, heads: int = 4, head_dim: int = 64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, seq_len, heads, head_dim, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4)]


def attention_fn(project: str, seq_len: int, causal: bool):
    if project == "ours":
        return lambda q, k, v: ring_dilated_attention(q, k, v, [seq_len], [1], causal=causal,
                                                      group=dist.group.WORLD, comm="ring")
    from ring_attention_pytorch import ring_flash_attn

    return lambda q, k, v: ring_flash_attn(q, k, v, causal=causal, ring_reduce_col=True)


def run(rank: int, world_size: int, seq_len: int, causal: bool) -> dict:
    results = {}
    for project, dtype in (("ours", torch.float32), ("public", torch.float32), ("ours", torch.float64),
                           ("public", torch.float64)):
        fn = attention_fn(project, seq_len, causal)
        q, k, v, dout = (t.chunk(world_size, dim=1)[rank] for t in inputs(seq_len, dtype))
        q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
        try:
            for _ in range(2):  # a warm-up call, then the timed one
                start = time.perf_counter()
                out = fn(q, k, v)
                grads = torch.autograd.grad(out, (q, k, v), dout)
                seconds = time.perf_counter() - start
        except RuntimeError as error:  # recorded and reported: the public package rejects float64 inputs
            results[project, str(dtype)[6:]] = dict(error=str(error))
            continue
        results[project, str(dtype)[6:]] = dict(seconds=seconds, rows=[out.detach(), *grads])
    return results


def main() -> None:
    args = parse_args(__doc__)
    if importlib.util.find_spec("ring_attention_pytorch") is None:
        sys.exit("ring-attention-pytorch is not installed: pip install -e '.[bench]'")
    out = output_dir(args.quick)
    seq_len = 1024 if args.quick else 8192
    rows = []
    for world_size, causal in tqdm([(p, c) for p in (2, 4) for c in (False, True)], desc="vs public"):
        per_rank = run_on_ranks(run, world_size, seq_len, causal)
        q, k, v, dout = (t.requires_grad_(i < 3) for i, t in enumerate(inputs(seq_len, torch.float64)))
        truth = reference.attention(q, k, v, causal=causal)
        truth = [truth.detach(), *torch.autograd.grad(truth, (q, k, v), dout)]
        for project in ("ours", "public"):
            row = dict(project=project, world_size=world_size, causal=causal,
                       seconds=max(r[project, "float32"]["seconds"] for r in per_rank))
            for dtype in ("float32", "float64"):
                if "error" in per_rank[0][project, dtype]:
                    row[f"{dtype}_raises"] = per_rank[0][project, dtype]["error"]
                    continue
                row[f"{dtype}_errors"] = {
                    name: (torch.cat([r[project, dtype]["rows"][i] for r in per_rank], dim=1).double() - truth[i])
                    .abs().max().item() / truth[i].abs().max().item()
                    for i, name in enumerate(NAMES)
                }
            # is a large dk error only the key gradients landing on the wrong rank? try every rank shift
            true_dk = truth[2].chunk(world_size, dim=1)
            row["float32_dk_error_best_rank_shift"] = min(
                max((per_rank[r][project, "float32"]["rows"][2].double() - true_dk[(r + shift) % world_size])
                    .abs().max().item() / truth[2].abs().max().item() for r in range(world_size))
                for shift in range(world_size)
            )
            rows.append(row)
    write_json(out, "vs_public", dict(seq_len=seq_len, heads=4, head_dim=64, public="ring-attention-pytorch 0.5.20",
                                      rows=rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [f"P={r['world_size']}{' causal' if r['causal'] else ''}" for r in rows if r["project"] == "ours"]
    for j, project in enumerate(("ours", "public")):
        sel = [r for r in rows if r["project"] == project]
        xs = [i + 0.4 * j for i in range(len(sel))]
        axes[0].bar(xs, [r["seconds"] for r in sel], 0.4, label=project)
        axes[1].bar(xs, [max(r["float32_errors"].values()) for r in sel], 0.4, label=project)
    for ax in axes:
        ax.set_xticks([i + 0.2 for i in range(len(labels))], labels)
        ax.legend()
    axes[0].set_ylabel("forward + backward, float32 (s)")
    axes[1].set_ylabel("float32: max rel. error vs float64 truth")
    axes[1].set_yscale("log")
    fig.suptitle(f"one pair (N, 1), N = {seq_len}, 4 heads of 64, gloo", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "vs_public.png", dpi=120)
    for r in rows:
        for dtype in ("float32", "float64"):
            if f"{dtype}_raises" in r:
                detail = f"raises: {r[f'{dtype}_raises']}"
            else:
                detail = "errors " + ", ".join(f"{n} {e:.1e}" for n, e in r[f"{dtype}_errors"].items())
            print(f"{r['project']:>6} P={r['world_size']} causal={r['causal']!s:<5} {r['seconds']:.3f} s (float32); "
                  f"{dtype}: {detail}")


if __name__ == "__main__":
    main()
