"""Peak memory per rank at fixed N for P = 1, 2, 4, 8, stages 2 to 5, against the N / P line.

    python benchmarks/memory.py [--quick]

N = 16384 tokens, pairs (2048, 1), (4096, 2), (8192, 4), (16384, 8), 4 heads of 64, float32, forward +
backward on gloo processes (each (stage, P) in fresh processes). Memory is how far each rank's peak
resident memory (Linux VmHWM, reset just before the second, measured call) rose above its resident memory
at that moment: a whole-process measure that includes allocator slack and gloo's buffers.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import output_dir, parse_args, write_json  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lessons.harness import DISTRIBUTED_STAGES, Problem, run_stage  # noqa: E402
from lessons.launch import run_on_ranks  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    if args.quick:
        problem = Problem(seq_len=4096, segment_lengths=(512, 1024, 2048, 4096), dilation_rates=(1, 2, 4, 8),
                          batch=1, heads=4, head_dim=64, dtype=torch.float32)
        world_sizes, stages = [1, 2, 4], ["stage 4: flash", "stage 5: production, ring"]
    else:
        problem = Problem(seq_len=16384, segment_lengths=(2048, 4096, 8192, 16384), dilation_rates=(1, 2, 4, 8),
                          batch=1, heads=4, head_dim=64, dtype=torch.float32)
        world_sizes, stages = [1, 2, 4, 8], [s for s in DISTRIBUTED_STAGES if not s.startswith("stage 1")]
    rows = []
    for stage in tqdm(stages, desc="memory"):
        for world_size in world_sizes:
            results = run_on_ranks(run_stage, world_size, DISTRIBUTED_STAGES[stage], problem, None, True)
            rows.append(dict(stage=stage, world_size=world_size,
                             peak_mib=max(r["peak_bytes"] for r in results) / 2**20,
                             seconds=max(r["seconds"] for r in results)))
    write_json(out, "memory", dict(problem=dict(seq_len=problem.seq_len, pairs=list(zip(problem.segment_lengths,
                                   problem.dilation_rates)), heads=problem.heads, head_dim=problem.head_dim,
                                   dtype="float32"), rows=rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in stages:
        sel = [r for r in rows if r["stage"] == stage]
        ax.plot([r["world_size"] for r in sel], [r["peak_mib"] for r in sel], "o-", label=stage)
    first = min(r["peak_mib"] for r in rows if r["world_size"] == 1)
    ax.plot(world_sizes, [first / p for p in world_sizes], "k--", label="N / P (from the lowest P = 1 value)")
    ax.set_xscale("log", base=2), ax.set_yscale("log")
    ax.set_xticks(world_sizes, [str(p) for p in world_sizes])
    ax.set_xlabel("ranks P"), ax.set_ylabel("peak MiB per rank")
    ax.set_title(f"N = {problem.seq_len}, forward + backward, gloo", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    for r in rows:
        print(f"{r['stage']:<32} P={r['world_size']}: peak {r['peak_mib']:8.1f} MiB/rank, {r['seconds']:.2f} s")


if __name__ == "__main__":
    main()
