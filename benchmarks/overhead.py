"""Time and memory outside the kernels: this checkout against an earlier implementation, side by side.

    python benchmarks/overhead.py [--quick] [--baseline COMMIT]    # default baseline: 7fff37b, the first release

Both implementations run the same measurements, each in fresh processes, in one run:

1. **kernel share**: forward + backward of ``ring_dilated_attention`` at the configuration of ``scaling.py``
   (N = 32768, pairs (2048, 1) ... (32768, 16), causal, 4 heads of 64, float32, one process), under the
   profiler: the fused kernels' share of the wall time, and the ops that take the rest. Goal: >= 85%.
2. **memory**: peak memory of forward + backward against dense SDPA (measured as in ``memory.py``) at
   N = 32K, 64K and 128K. Goal: <= 1.3x SDPA.
3. **speed-up as a fraction of the FLOP ratio**: dense SDPA time over dilated time at N = 32K, divided by the
   ratio of their FLOPs. Goal: >= 0.85.
4. **a million tokens**: ``million_tokens.py``'s run (8 processes) with each implementation. Goal: >= 1.5x
   faster than the baseline.

The baseline is checked out with ``git worktree`` into a temporary folder; its measuring processes import its
``ring_attention`` in place of this checkout's (``OVERHEAD_IMPLEMENTATION``). ``--quick`` runs at N = 8192 (memory
at 8192 only) and 16,384 tokens on 2 processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _use_implementation(root: str) -> None:
    """Import ``ring_attention`` from ``root`` before anything else does (also in spawned ranks)."""
    spec = importlib.util.spec_from_file_location("ring_attention", f"{root}/ring_attention/__init__.py",
                                                  submodule_search_locations=[f"{root}/ring_attention"])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ring_attention"] = module
    spec.loader.exec_module(module)


if os.environ.get("OVERHEAD_IMPLEMENTATION"):
    _use_implementation(os.environ["OVERHEAD_IMPLEMENTATION"])

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import dilated_flops, output_dir, write_json  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lessons.harness import peak_memory, reset_peak_memory  # noqa: E402

SEGMENTS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
HEADS, HEAD_DIM = 4, 64
KERNELS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
BASELINE = "7fff37b"


def _inputs(seq_len: int):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, seq_len, HEADS, HEAD_DIM, generator=gen).requires_grad_(i < 3) for i in range(4)]


def _step(kind: str, q, k, v, dout) -> None:
    if kind == "dilated":
        from ring_attention import ring_dilated_attention

        out = ring_dilated_attention(q, k, v, SEGMENTS, RATES, causal=True)
    else:
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    torch.autograd.grad(out, (q, k, v), dout)


def measure(task: str, kind: str, seq_len: int) -> dict:
    """One measurement in this process: ``profile``, ``time`` or ``memory`` of ``kind`` at ``seq_len``."""
    q, k, v, dout = _inputs(seq_len)
    # warm-up: thread pools, the allocator, and the dilated core's plan for this N (dense SDPA has no plan, and
    # its full-size step takes minutes at 128K: it warms up on a short sequence)
    _step(kind, *(_inputs(4096) if kind == "dense" else (q, k, v, dout)))
    if task == "memory":
        before = reset_peak_memory()
        _step(kind, q, k, v, dout)
        return dict(peak_mib=(peak_memory() - before) / 2**20)
    if task == "time":
        start = time.perf_counter()
        _step(kind, q, k, v, dout)
        return dict(seconds=time.perf_counter() - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        _step(kind, q, k, v, dout)
        wall = time.perf_counter() - start
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    kernel = sum(e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in KERNELS)
    others = sorted(((name, t) for name, t in ops.items() if name not in KERNELS), key=lambda x: -x[1])[:6]
    return dict(wall=wall, kernel_seconds=kernel, kernel_share=kernel / wall,
                other_ops=[dict(op=name, seconds=t, share=t / wall) for name, t in others])


def million(quick: bool) -> dict:
    from million_tokens import run

    from lessons.launch import run_on_ranks

    seq_len, world_size = (16384, 2) if quick else (1048576, 8)
    results = run_on_ranks(run, world_size, seq_len, timeout=3600)
    return dict(seq_len=seq_len, world_size=world_size, seconds=max(r["seconds"] for r in results),
                peak_mib=max(r["peak_mib"] for r in results))


def in_fresh_process(implementation: str | None, *task) -> dict:
    """Run ``measure`` (or ``million``) in a new Python process, with ``implementation``'s ring_attention."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OVERHEAD_IMPLEMENTATION=implementation or "")
    command = [sys.executable, __file__, "--task", json.dumps(task)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run, written to results/quick/")
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # one measurement, in a process of its own
    args = parser.parse_args()
    if args.task:
        task = json.loads(args.task)
        print(json.dumps(million(task[1]) if task[0] == "million" else measure(*task)))
        return
    baseline = args.baseline
    out_dir = output_dir(args.quick)
    speed_n = 8192 if args.quick else 32768
    memory_ns = [8192] if args.quick else [32768, 65536, 131072]
    with tempfile.TemporaryDirectory() as folder:
        worktree = Path(folder) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(worktree), baseline],
                       check=True, capture_output=True)
        try:
            implementations = {"baseline": str(worktree), "this checkout": str(ROOT)}
            steps = [(name, task) for name in implementations
                     for task in [("profile", "dilated", speed_n), ("time", "dilated", speed_n),
                                  *[("memory", "dilated", n) for n in memory_ns], ("million", args.quick)]]
            steps += [(None, ("time", "dense", speed_n)), *[(None, ("memory", "dense", n)) for n in memory_ns]]
            results = {}
            for name, task in tqdm(steps, desc="overhead"):
                results[(name, task)] = in_fresh_process(implementations.get(name), *task)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=True)
    flop_ratio = (dilated_flops(speed_n, [speed_n], [1], HEADS, HEAD_DIM, causal=True)
                  / dilated_flops(speed_n, SEGMENTS, RATES, HEADS, HEAD_DIM, causal=True))
    dense_seconds = results[(None, ("time", "dense", speed_n))]["seconds"]
    rows = {}
    for name in implementations:
        profile = results[(name, ("profile", "dilated", speed_n))]
        seconds = results[(name, ("time", "dilated", speed_n))]["seconds"]
        rows[name] = dict(
            kernel_share=profile["kernel_share"], other_ops=profile["other_ops"], seconds=seconds,
            speedup_over_dense=dense_seconds / seconds, fraction_of_flop_ratio=dense_seconds / seconds / flop_ratio,
            memory=[dict(seq_len=n, peak_mib=results[(name, ("memory", "dilated", n))]["peak_mib"],
                         dense_mib=results[(None, ("memory", "dense", n))]["peak_mib"]) for n in memory_ns],
            million=results[(name, ("million", args.quick))],
        )
        for m in rows[name]["memory"]:
            m["ratio"] = m["peak_mib"] / m["dense_mib"]
    speedup = rows["baseline"]["million"]["seconds"] / rows["this checkout"]["million"]["seconds"]
    write_json(out_dir, "overhead", dict(baseline=baseline, seq_len=speed_n, pairs=list(zip(SEGMENTS, RATES)),
                                         heads=HEADS, head_dim=HEAD_DIM, dtype="float32", causal=True,
                                         flop_ratio=flop_ratio, dense_seconds=dense_seconds, rows=rows,
                                         million_speedup=speedup))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, marker in zip(rows, ("s--", "o-")):
        axes[0].plot(memory_ns, [m["ratio"] for m in rows[name]["memory"]], marker, label=name)
    axes[0].axhline(1.3, color="grey", linestyle=":", label="goal: 1.3x")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("N"), axes[0].set_ylabel("peak memory / dense SDPA")
    names = list(rows)
    axes[1].bar(names, [rows[n]["kernel_share"] * 100 for n in names])
    axes[1].axhline(85, color="grey", linestyle=":")
    axes[1].set_ylabel(f"% of fwd+bwd time in kernels, N = {speed_n}")
    axes[0].legend()
    fig.suptitle(f"overhead outside the kernels: this checkout vs {baseline}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "overhead.png", dpi=120)
    for name, row in rows.items():
        print(f"{name}: kernels {100 * row['kernel_share']:.0f}% of the time; {row['seconds']:.2f} s at N={speed_n} "
              f"({row['fraction_of_flop_ratio']:.2f} of the FLOP ratio {flop_ratio:.1f}); memory vs SDPA "
              + ", ".join(f"{m['ratio']:.2f}x at {m['seq_len']}" for m in row["memory"])
              + f"; {row['million']['seq_len']:,} tokens in {row['million']['seconds']:.1f} s")
    print(f"a million tokens: {speedup:.2f}x faster than {baseline}")


if __name__ == "__main__":
    main()
