"""Where the packed documents' time goes: a profile of `benchmarks/packing.py`'s packed, unpacked and one-call-per-
document runs, and the CPU flash kernel's cost per score by block length.

    python benchmarks/packing_profile.py [--quick]

The packing benchmark finds packed documents' time per useful FLOP above an unpacked sequence's. This script says
why. Its documents and pairs (N = 32K, one process, forward + backward) run once under ``torch.profiler``: the time
inside the attention kernel (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward) against the
rest (gathers, merges, Python). Then the kernel alone, causal, forward + backward, on blocks of one length, as the
short pieces' buckets call it (a key mask) and as whole segments call it (``is_causal``): its cost per score grows
as the blocks shorten, and a packed sequence is mostly short blocks — a document of ~1000 tokens makes segments
of ~1000 / r rows per head, where the unpacked sequence's long pairs make blocks of thousands.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from common import output_dir, parse_args, write_json
from packing import HEAD_DIM, HEADS, PAIRS, boundaries, document_lengths

from ring_attention import ring_dilated_attention
from ring_attention.cost import score_pairs

KERNEL = "aten::_scaled_dot_product_flash_attention_for_cpu"


def profiled(lengths: list[int], kind: str, pairs) -> dict:
    """Self CPU seconds of one forward + backward of ``kind``, in the kernel and in all, after a warm-up."""
    seq_len = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, seq_len, HEADS, HEAD_DIM, generator=gen, requires_grad=i < 3) for i in range(4))
    pieces = [(0, seq_len, boundaries(lengths) if kind == "packed" else None)]
    if kind == "one call per document":
        starts = boundaries(lengths)
        pieces = [(a, b, None) for a, b in zip(starts, starts[1:])]

    def step():
        for a, b, documents in pieces:
            parts = [t[:, a:b] for t in (q, k, v)]
            out = ring_dilated_attention(*parts, *pairs, causal=True, cu_seqlens=documents)
            torch.autograd.grad(out, parts, dout[:, a:b])

    step()
    with torch.profiler.profile() as profile:
        step()
    events = profile.key_averages()
    kernel = [e for e in events if e.key.startswith(KERNEL)]
    work = score_pairs(seq_len, 1, *pairs, HEADS, cu_seqlens=None if kind == "unpacked" else boundaries(lengths))[0]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    inside = sum(e.self_cpu_time_total for e in kernel) / 1e6
    return dict(seconds=total, kernel_seconds=inside, kernel_calls=sum(e.count for e in kernel) // 2,
                useful_scores=work, ns_per_score=1e9 * total / work)


def kernel_cost(length: int, masked: bool, budget: float) -> float:
    """Nanoseconds per causal score of the kernel, forward + backward, on ``[reps, HEADS, length, HEAD_DIM]``."""
    reps = max(1, int(budget // (length * length * HEADS)))
    q, k, v = (torch.randn(reps, HEADS, length, HEAD_DIM, requires_grad=True) for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool).tril() if masked else None

    def step():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked)
        out.backward(torch.ones_like(out))

    step()
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return 1e9 * best / (reps * HEADS * length * (length + 1) / 2)


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    scale = 16 if args.quick else 1
    pairs = ([w // scale for w in PAIRS[0]], PAIRS[1])
    lengths = document_lengths(32768 // scale, mean=2048 // scale, longest=32768 // scale)
    runs = {}
    for kind in ("packed", "unpacked", "one call per document"):
        runs[kind] = profiled(lengths, kind, pairs)
        r = runs[kind]
        print(f"{kind:>22}: {r['seconds']:.2f} s, {100 * r['kernel_seconds'] / r['seconds']:.0f}% in the kernel "
              f"({r['kernel_calls']} calls), {r['ns_per_score']:.2f} ns per useful score", flush=True)
    budget = 2e7 if args.quick else 4e8
    blocks = []
    for length, masked in ((64, False), (128, False), (512, False), (2730, False), (128, True), (512, True)):
        blocks.append(dict(length=length, masked=masked, ns_per_score=kernel_cost(length, masked, budget)))
        print(f"kernel, {length:5d} rows, {'key mask' if masked else 'is_causal':>9}: "
              f"{blocks[-1]['ns_per_score']:.2f} ns per score", flush=True)
    write_json(out, "packing_profile", dict(seq_len=sum(lengths), pairs=list(zip(*pairs)), heads=HEADS,
                                            head_dim=HEAD_DIM, dtype="float32", runs=runs, blocks=blocks))


if __name__ == "__main__":
    main()
