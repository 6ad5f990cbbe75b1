"""Cost vs sequence length: the production core (one process) against dense SDPA.

    python benchmarks/scaling.py [--quick]

Forward + backward time and peak memory of ``ring_attention.ring_dilated_attention`` for N from 4K to 128K
tokens at fixed pairs with constant w / r (2048), causal, 4 heads of 64, float32, against
``torch.nn.functional.scaled_dot_product_attention`` (dense causal attention) up to the size where it
finishes in reasonable time here. Every measurement runs in a fresh process; memory is the peak resident
memory above the resident memory before the calls (the peak reset first). The log-log plot shows the N and
N^2 guide lines; the fitted exponent of the dilated times says how far they deviate from linear.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import best_of, output_dir, parse_args, write_json  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lessons.harness import peak_memory, reset_peak_memory  # noqa: E402
from lessons.launch import run_on_ranks  # noqa: E402
from ring_attention import ring_dilated_attention  # noqa: E402

SEGMENTS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
HEADS, HEAD_DIM = 4, 64


def measure(rank: int, world_size: int, kind: str, seq_len: int) -> dict:
    torch.set_num_threads(torch.get_num_threads() * world_size)  # one process: use every core
    q, k, v, dout = (torch.randn(1, seq_len, HEADS, HEAD_DIM, requires_grad=i < 3) for i in range(4))

    def step():
        if kind == "dilated":
            out = ring_dilated_attention(q, k, v, SEGMENTS, RATES, causal=True)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True).transpose(1, 2)
        torch.autograd.grad(out, (q, k, v), dout)

    before = reset_peak_memory()
    seconds = best_of(step, repeats=2)
    return dict(kind=kind, seq_len=seq_len, seconds=seconds, peak_mib=(peak_memory() - before) / 2**20)


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    sizes = [4096, 8192, 16384] if args.quick else [4096, 8192, 16384, 32768, 65536, 131072]
    dense_limit = 8192 if args.quick else 32768
    cases = [("dilated", n) for n in sizes] + [("dense", n) for n in sizes if n <= dense_limit]
    rows = [run_on_ranks(measure, 1, kind, n)[0] for kind, n in tqdm(cases, desc="scaling")]
    dilated = [r for r in rows if r["kind"] == "dilated"]
    # least-squares slope of log(time) against log(N): 1 is linear, 2 is quadratic
    xs, ys = [math.log(r["seq_len"]) for r in dilated], [math.log(r["seconds"]) for r in dilated]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    exponent = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    write_json(out, "scaling", dict(pairs=list(zip(SEGMENTS, RATES)), heads=HEADS, head_dim=HEAD_DIM,
                                    dtype="float32", causal=True, rows=rows, dilated_time_exponent=exponent))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("dilated", "o-"), ("dense", "s-")):
        sel = [r for r in rows if r["kind"] == kind]
        axes[0].loglog([r["seq_len"] for r in sel], [r["seconds"] for r in sel], marker, label=kind)
        axes[1].loglog([r["seq_len"] for r in sel], [max(r["peak_mib"], 1e-1) for r in sel], marker, label=kind)
    n0, t0 = dilated[0]["seq_len"], dilated[0]["seconds"]
    guide = [sizes[0], sizes[-1]]
    axes[0].loglog(guide, [t0 * n / n0 for n in guide], "k:", label="∝ N")
    axes[0].loglog(guide, [t0 * (n / n0) ** 2 for n in guide], "k--", label="∝ N²")
    axes[0].set_ylabel("forward + backward (s)")
    axes[1].set_ylabel("peak MiB above start")
    for ax in axes:
        ax.set_xlabel("sequence length N")
        ax.legend()
    fig.suptitle(f"dilated (w/r = 2048, causal) vs dense SDPA, H={HEADS}, D={HEAD_DIM}, float32; "
                 f"dilated time ∝ N^{exponent:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    for r in rows:
        print(f"{r['kind']:>8} N={r['seq_len']:>7}: {r['seconds']:8.3f} s, peak {r['peak_mib']:8.1f} MiB")
    print(f"dilated time grows as N^{exponent:.2f}")


if __name__ == "__main__":
    main()
