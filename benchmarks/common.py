"""What every benchmark shares: the command line, the machine record, timing, memory and output files.

Each benchmark writes ``<name>.json`` (its numbers, the machine, torch version, thread count and the command
line) and PNG plots to ``benchmarks/results/`` — or to ``benchmarks/results/quick/`` with ``--quick``,
which runs a smaller version in under a minute and is not committed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

# glibc keeps freed heap memory for reuse, which hides a later call's allocations from resident-memory
# measurements. With this threshold every allocation of 64 KiB or more is its own mapping, returned to the
# system when freed, so a process's peak resident memory follows its live tensors. Child processes started
# by the benchmarks inherit it (glibc reads it when a process starts).
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a small run (under a minute), written to results/quick/")
    return parser.parse_args()


def output_dir(quick: bool) -> Path:
    path = RESULTS / "quick" if quick else RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(
        cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
        python=platform.python_version(), cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    )


def write_json(directory: Path, name: str, results: dict) -> Path:
    record = dict(benchmark=name, command=" ".join([Path(sys.executable).name, *sys.argv]),
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine(), results=results)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn()``, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """This machine's dense matmul FLOP/s for ``dtype``: the roofline the kernels are compared with."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_of(lambda: torch.mm(a, b), repeats)


def dilated_flops(seq_len: int, segment_lengths, dilation_rates, heads: int, head_dim: int, batch: int = 1,
                  causal: bool = False) -> float:
    """FLOPs of dilated attention forward + backward: 4 per score entry and head dim forward (QK^T, PV), 2.5x
    that for the backward (recomputed QK^T, dV, dP, dQ, dK); causal halves the diagonal blocks' work."""
    scores = 0.0
    for w, r in zip(segment_lengths, dilation_rates):
        w = min(w, seq_len)
        kept = -(-w // r)  # positions a head keeps per segment (the larger count)
        per_segment = kept * kept * (0.5 if causal else 1.0)
        scores += seq_len // w * per_segment
    return batch * heads * scores * head_dim * 4 * 3.5
