"""Kernel backends vs the machine's matmul roofline, fp32 and bf16 blocks.

    python benchmarks/kernels.py [--quick] [--dtypes float32 [bfloat16]]

For each backend that can run here, forward + backward time of one ``[1, L, H, D]`` block (causal and not)
and the achieved FLOP/s as a percentage of this machine's dense matmul FLOP/s in the same dtype, measured in
the same run. On a CPU without bf16 matrix units a bf16 matmul is slow (1.2 GFLOP/s on the machine of
2026-12-07), and the bf16 roofline and `math` oracle take minutes per call: ``--dtypes float32`` leaves bf16
out. Every run records the bf16 matmul rate of a small block (512), so the page can say why.
"""

from __future__ import annotations

import argparse
from functools import partial

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import best_of, matmul_flops, output_dir, write_json  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ring_attention.kernels import BACKENDS, block_attention, block_attention_backward, unavailable_reason  # noqa: E402


def forward_backward(q, k, v, dout, causal: bool, backend: str) -> None:
    scale = q.shape[-1] ** -0.5
    out, lse = block_attention(q, k, v, causal=causal, scale=scale, backend=backend)
    block_attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, backend=backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run, written to results/quick/")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    args = parser.parse_args()
    out = output_dir(args.quick)
    length, heads, head_dim, repeats = (1024, 4, 64, 2) if args.quick else (4096, 8, 64, 3)
    rows = []
    roofline = {}
    dtypes = [getattr(torch, name) for name in args.dtypes]
    cases = [(dtype, backend, causal) for dtype in dtypes for backend in BACKENDS for causal in (False, True)]
    for dtype, backend, causal in tqdm(cases, desc="kernels"):
        if dtype not in roofline:  # --quick: a small matmul (bf16 matmuls are slow on CPUs without bf16 units)
            roofline[dtype] = matmul_flops(dtype, size=512 if args.quick else 2048)
        q, k, v, dout = (torch.randn(1, length, heads, head_dim, dtype=dtype) for _ in range(4))
        if unavailable_reason(backend, q) is not None:
            continue

        seconds = best_of(partial(forward_backward, q, k, v, dout, causal, backend), repeats)
        flops = heads * length * length * head_dim * 4 * 3.5 * (0.5 if causal else 1.0)
        rows.append(dict(backend=backend, dtype=str(dtype)[6:], causal=causal, seconds=seconds,
                         gflops=flops / seconds / 1e9, roofline_gflops=roofline[dtype] / 1e9,
                         percent_of_roofline=100 * flops / seconds / roofline[dtype]))
    write_json(out, "kernels", dict(block=dict(length=length, heads=heads, head_dim=head_dim), rows=rows,
                                    bf16_matmul_gflops_512=matmul_flops(torch.bfloat16, size=512) / 1e9))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['backend']}\n{r['dtype']}{' causal' if r['causal'] else ''}" for r in rows]
    ax.bar(range(len(rows)), [r["percent_of_roofline"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("% of matmul FLOP/s")
    ax.set_title(f"fused block forward+backward, L={length}, H={heads}, D={head_dim}, "
                 f"{torch.get_num_threads()} threads")
    fig.tight_layout()
    fig.savefig(out / "kernels.png", dpi=120)
    for r in rows:
        print(f"{r['backend']:>10} {r['dtype']:>9} causal={r['causal']!s:<5} {r['seconds'] * 1e3:8.1f} ms "
              f"{r['gflops']:7.1f} GFLOP/s  {r['percent_of_roofline']:5.1f}% of {r['roofline_gflops']:.0f}")


if __name__ == "__main__":
    main()
