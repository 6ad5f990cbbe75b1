"""The GPU check: one command that proves the CUDA path on one GPU, and measures it.

    python benchmarks/gpu.py              # on a CUDA machine (PYTHONPATH=. if not installed): < 8 minutes
    python benchmarks/gpu.py --dry-run    # the same code paths on the CPU, CPU backends, small sizes (CI runs it)

a. **kernels**: every backend that can run here against the ``math`` oracle on odd shapes (lengths 1, 33, 100,
   257, Lq != Lk, head dims 64 and 128, causal or not), and the ring case: keys split into blocks, each block's
   forward merged by LSE, each block's backward given the rows' global out and LSE, with that out contiguous
   and as a strided view;
b. **module**: ``ring_dilated_attention`` and ``RingMultiheadDilatedAttention`` forward + backward in bf16
   against the float64 reference at a small N, then the module's time and peak memory at N = 8K ... 128K;
c. **throughput**: achieved TFLOP/s of the dilated core against single-GPU SDPA (flash), for the dense pair
   ``(N, 1)`` (the same work as causal SDPA) and LongNet pairs;
d. **packed documents**: ``cu_seqlens`` in bf16 against the float64 reference, causal or not (short pieces run
   through the variable-length kernels on CUDA), and packed vs unpacked time at one N;
e. one summary line, ``GPU CHECK OK`` or ``GPU CHECK FAILED``; the exit status is 0 only when OK.

Results (with the GPU name and the torch, CUDA and flash-attn versions) go to ``benchmarks/results/gpu/gpu.json``;
a dry run writes ``benchmarks/results/quick/gpu_dry_run.json``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import torch
import torch.nn.functional as F
from common import RESULTS, dilated_flops, output_dir, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

import reference
from lessons.harness import peak_memory, reset_peak_memory
from ring_attention import RingMultiheadDilatedAttention, kernels, ring_dilated_attention
from ring_attention.merge import merge_partials

BF16_U = 2.0**-8
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4 * BF16_U, torch.float16: 4 * 2.0**-11}
# bf16 against float64: a few roundings of 2^-8 through projections, kernels and the merge
MODULE_TOLERANCE = {"out": 2.0**-6, "grads": 2.0**-5}
LONGNET = ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])


def longnet_pairs(seq_len: int, dry_run: bool) -> tuple[list[int], list[int]]:
    """LongNet's pairs (w / r = 2048); a dry run scales them to its small N (w / r = N / 8)."""
    if dry_run:
        return [seq_len // 8, seq_len // 4, seq_len // 2, seq_len], [1, 2, 4, 8]
    return LONGNET


def rel(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """max |a - b| relative to max |b| (or to ``scale``)."""
    scale = b.double().abs().max().item() if scale is None else scale
    return (a.double() - b.double()).abs().max().item() / scale


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """The fastest of ``repeats`` calls after a warm-up call, in seconds."""
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_memory(fn, device: torch.device) -> float:
    """Peak memory of one call above the memory in use before it, in MiB (allocator on CUDA, process on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = reset_peak_memory()
    fn()
    return (peak_memory() - before) / 2**20


# --- a. kernels ------------------------------------------------------------------------------------------------


def kernel_backends(device: torch.device) -> dict[str, list[torch.dtype]]:
    """Backends that can run here, with the dtypes to check each in."""
    wanted = {"flash_attn": [torch.bfloat16, torch.float16], "cuda_flash": [torch.bfloat16, torch.float16],
              "cuda_efficient": [torch.float32, torch.bfloat16], "cpu_flash": [torch.float32, torch.bfloat16]}
    found = {}
    for backend, dtypes in wanted.items():
        usable = [d for d in dtypes if kernels.unavailable_reason(backend, torch.empty(1, 1, 1, 64, dtype=d,
                                                                                       device=device)) is None]
        if usable:
            found[backend] = usable
    return found


def check_block(backend, dtype, device, q_len, k_len, head_dim, causal, gen) -> dict:
    """One block, forward and backward, against math; and the ring case: three key blocks merged."""
    q, dout = (torch.randn(2, q_len, 3, head_dim, generator=gen).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(2, k_len, 3, head_dim, generator=gen).to(device, dtype) for _ in range(2))
    scale = head_dim**-0.5
    tol = KERNEL_TOLERANCE[dtype]
    out, lse = kernels.block_attention(q, k, v, causal=causal, scale=scale, backend=backend)
    out_m, lse_m = kernels.block_attention(q, k, v, causal=causal, scale=scale, backend="math")
    errors = {"out": rel(out, out_m), "lse": rel(lse, lse_m)}
    grads = kernels.block_attention_backward(dout, q, k, v, out_m, lse_m, causal=causal, scale=scale, backend=backend)
    grads_m = kernels.block_attention_backward(dout, q, k, v, out_m, lse_m, causal=causal, scale=scale,
                                               backend="math")
    # gradients relative to the largest of the three: with one key per row dq and dk are exactly 0
    grad_scale = max(g.double().abs().max().item() for g in grads_m)
    errors.update({name: rel(g, g_m, grad_scale) for name, g, g_m in zip(("dq", "dk", "dv"), grads, grads_m)})
    if not causal and k_len >= 3:  # the ring case: the keys arrive in blocks
        cuts = [0, k_len // 3, 2 * k_len // 3, k_len]
        blocks = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
        merged = None
        for b in blocks:
            o, s = kernels.block_attention(q, k[:, b], v[:, b], causal=False, scale=scale, backend=backend)
            merged = (o.float(), s) if merged is None else merge_partials(*merged, o.float(), s)
        errors["ring out"] = rel(merged[0], out_m)
        strided_out = out_m.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, H, L, D] in memory
        for layout, global_out in (("contiguous", out_m), ("strided", strided_out)):
            parts = [kernels.block_attention_backward(dout, q, k[:, b], v[:, b], global_out, lse_m, causal=False,
                                                      scale=scale, backend=backend) for b in blocks]
            whole = (sum(p[0].float() for p in parts), *(torch.cat([p[i] for p in parts], dim=1) for i in (1, 2)))
            for name, g, g_m in zip(("dq", "dk", "dv"), whole, grads_m):
                errors[f"ring {name} ({layout} out)"] = rel(g, g_m, grad_scale)
    # the LSE is float32 on both paths, from the same low-precision scores: u of its size
    limits = {name: (BF16_U if name == "lse" and dtype != torch.float32 else tol) for name in errors}
    ok = all(errors[name] < limits[name] for name in errors)
    return dict(backend=backend, dtype=str(dtype).removeprefix("torch."), q_len=q_len, k_len=k_len,
                head_dim=head_dim, causal=causal, errors=errors, tolerance=tol, ok=ok)


def check_kernels(device: torch.device, dry_run: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 1, True), (33, 33, True), (100, 100, True), (33, 100, False), (100, 257, False), (1, 33, False)]
    head_dims = (64,) if dry_run else (64, 128)
    rows = []
    for backend, dtypes in kernel_backends(device).items():
        for dtype in dtypes:
            for head_dim in head_dims:
                for q_len, k_len, causal in shapes:
                    rows.append(check_block(backend, dtype, device, q_len, k_len, head_dim, causal, gen))
    return rows


# --- b. the production core and module against the float64 reference --------------------------------------------


class ReferenceAttention(torch.nn.Module):
    """The float64 reference in the place of a module's attention core."""

    def __init__(self, segment_lengths, dilation_rates, causal):
        super().__init__()
        self.pairs, self.causal = (segment_lengths, dilation_rates), causal

    def forward(self, q, k, v, *, causal=None, cu_seqlens=None):
        return reference.dilated_attention(q, k, v, *self.pairs, causal=self.causal, cu_seqlens=cu_seqlens)


def check_against_reference(device: torch.device, dry_run: bool) -> dict:
    seq_len, embed, heads = (256, 128, 4) if dry_run else (2048, 512, 8)
    segments, rates = [seq_len // 4, seq_len // 2, seq_len], [1, 2, 4]
    gen = torch.Generator().manual_seed(1)
    # the core: bf16 shards through the kernels vs float64 dense masks
    q, k, v, dout = (torch.randn(2, seq_len, heads, 64, generator=gen, dtype=torch.float64) for _ in range(4))
    low = [t.to(device, torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
    out = ring_dilated_attention(*low, segments, rates, causal=True)
    grads = torch.autograd.grad(out, low, dout.to(device, torch.bfloat16))
    exact = [t.to(device).requires_grad_(True) for t in (q, k, v)]
    truth = reference.dilated_attention(*exact, segments, rates, causal=True)
    truth_grads = torch.autograd.grad(truth, exact, dout.to(device))
    core = {"out": rel(out, truth), **{n: rel(g, t) for n, g, t in zip(("dq", "dk", "dv"), grads, truth_grads)}}
    # the module: bf16 parameters and input against a float64 copy whose attention core is the reference
    torch.manual_seed(2)
    module = RingMultiheadDilatedAttention(embed, heads, batch_first=True, segment_lengths=segments,
                                           dilation_rates=rates, causal=True, device=device)
    exact_module = RingMultiheadDilatedAttention(embed, heads, batch_first=True, segment_lengths=segments,
                                                 dilation_rates=rates, causal=True, device=device,
                                                 dtype=torch.float64)
    exact_module.load_state_dict(module.state_dict())
    exact_module.attention = ReferenceAttention(segments, rates, causal=True)
    module = module.to(torch.bfloat16)
    x = torch.randn(2, seq_len, embed, generator=gen, dtype=torch.float64).to(device)
    x_low = x.to(torch.bfloat16).requires_grad_(True)
    x_exact = x.clone().requires_grad_(True)
    y_low, y_exact = module(x_low, x_low, x_low)[0], exact_module(x_exact, x_exact, x_exact)[0]
    weight = torch.randn(y_exact.shape, generator=gen, dtype=torch.float64).to(device)
    (y_low * weight.to(torch.bfloat16)).sum().backward()
    (y_exact * weight).sum().backward()
    mod = {"out": rel(y_low, y_exact), "dx": rel(x_low.grad, x_exact.grad)}
    mod.update({f"d {name}": rel(p.grad, dict(exact_module.named_parameters())[name].grad)
                for name, p in module.named_parameters()})
    ok = all(e < MODULE_TOLERANCE["out" if n == "out" else "grads"] for e_set in (core, mod) for n, e in e_set.items())
    return dict(seq_len=seq_len, embed_dim=embed, heads=heads, pairs=list(zip(segments, rates)), core=core,
                module=mod, tolerance=MODULE_TOLERANCE, backend=kernels.select_backend("auto", low[0]), ok=ok)


def module_scaling(device: torch.device, dry_run: bool) -> list[dict]:
    sizes = [512, 1024] if dry_run else [8192, 16384, 32768, 65536, 131072]
    embed, heads = (128, 2) if dry_run else (1024, 16)
    rows = []
    for seq_len in sizes:
        segments, rates = longnet_pairs(seq_len, dry_run)
        torch.manual_seed(0)
        module = RingMultiheadDilatedAttention(embed, heads, batch_first=True, segment_lengths=segments,
                                               dilation_rates=rates, causal=True, device=device, dtype=torch.bfloat16)
        x = torch.randn(1, seq_len, embed, device=device, dtype=torch.bfloat16, requires_grad=True)

        def step(module=module, x=x):
            module(x, x, x)[0].float().square().mean().backward()

        seconds = timed(step, device, repeats=2)
        rows.append(dict(seq_len=seq_len, pairs=list(zip(segments, rates)), seconds=seconds,
                         peak_mib=measure_memory(step, device)))
    return rows


# --- c. throughput against dense SDPA ------------------------------------------------------------------------------


def throughput(device: torch.device, dry_run: bool) -> list[dict]:
    seq_len, heads, head_dim = (1024, 2, 64) if dry_run else (32768, 16, 64)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, seq_len, heads, head_dim, generator=gen).to(device, dtype) for _ in range(4))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # PyTorch's flash kernel, on CUDA and on the CPU
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        torch.autograd.grad(out.transpose(1, 2), (q, k, v), dout)

    dense_seconds = timed(sdpa, device)
    dense_flops = dilated_flops(seq_len, [seq_len], [1], heads, head_dim, causal=True)
    rows = [dict(kind="SDPA (dense, causal)", pairs=[(seq_len, 1)], seconds=dense_seconds, flops=dense_flops,
                 tflops=dense_flops / dense_seconds / 1e12)]
    for name, (segments, rates) in (("dilated, dense pair", ([seq_len], [1])),
                                    ("dilated, LongNet pairs", longnet_pairs(seq_len, dry_run))):

        def dilated(segments=segments, rates=rates):
            out = ring_dilated_attention(q, k, v, segments, rates, causal=True)
            torch.autograd.grad(out, (q, k, v), dout)

        seconds = timed(dilated, device)
        flops = dilated_flops(seq_len, segments, rates, heads, head_dim, causal=True)
        rows.append(dict(kind=name, pairs=list(zip(segments, rates)), seconds=seconds, flops=flops,
                         tflops=flops / seconds / 1e12))
    for row in rows:
        row["of_sdpa"] = row["tflops"] / rows[0]["tflops"]
    return rows


# --- d. packed documents ----------------------------------------------------------------------------------------------


def packed_documents(device: torch.device, dry_run: bool) -> dict:
    """Packed documents in bf16 against the float64 reference (short pieces go through the variable-length kernels
    on CUDA), then packed vs unpacked time at one N."""
    seq_len, heads = (256, 4) if dry_run else (4096, 8)
    segments, rates = [seq_len // 4, seq_len // 2, seq_len], [1, 2, 4]
    layout = [0, 1, seq_len // 8 + 3, seq_len // 3, seq_len // 2, seq_len - 5, seq_len]  # tails, a 1-token document
    gen = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(2, seq_len, heads, 64, generator=gen, dtype=torch.float64) for _ in range(4))
    results = []
    for dtype, fn in ((torch.bfloat16, ring_dilated_attention), (torch.float64, reference.dilated_attention)):
        leaves = [t.to(device, dtype).requires_grad_(True) for t in (q, k, v)]
        for causal in (False, True):
            out = fn(*leaves, segments, rates, causal=causal, cu_seqlens=layout)
            results.append([out, *torch.autograd.grad(out, leaves, dout.to(device, dtype))])
    half = len(results) // 2
    errors = {f"{name} {'causal' if i else 'full'}": rel(results[i][j], results[half + i][j])
              for i in range(half) for j, name in enumerate(("out", "dq", "dk", "dv"))}
    ok = all(e < MODULE_TOLERANCE["out" if n.startswith("out") else "grads"] for n, e in errors.items())
    timing_len = 1024 if dry_run else 32768
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, timing_len, 8, 64, generator=gen).to(device, torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    lengths, rng = [], torch.Generator().manual_seed(6)
    while sum(lengths) < timing_len:  # long-tailed document lengths
        lengths.append(int(torch.empty(1).log_normal_(math.log(timing_len / 32), 1.0, generator=rng).clamp(1, 8192)))
    lengths[-1] -= sum(lengths) - timing_len
    documents = [0, *itertools.accumulate(n for n in lengths if n > 0)]
    timing_pairs = longnet_pairs(timing_len, dry_run)
    seconds = {}
    for name, cu_seqlens in (("unpacked", None), ("packed", documents)):
        def step(cu_seqlens=cu_seqlens):
            out = ring_dilated_attention(q, k, v, *timing_pairs, causal=True, cu_seqlens=cu_seqlens)
            torch.autograd.grad(out, (q, k, v), dout)

        seconds[name] = timed(step, device, repeats=2)
    return dict(seq_len=seq_len, documents=layout, errors=errors, tolerance=MODULE_TOLERANCE, ok=ok,
                timing=dict(seq_len=timing_len, documents=len(documents) - 1, pairs=list(zip(*timing_pairs)),
                            seconds=seconds))


# --- e. the run ------------------------------------------------------------------------------------------------------


def versions(device: torch.device) -> dict:
    problem = kernels.flash_attn_problem()
    return dict(gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                capability=list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
                torch=torch.__version__, cuda=torch.version.cuda,
                flash_attn=sys.modules["flash_attn"].__version__ if problem is None else f"unavailable: {problem}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU at small sizes")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here: run on a GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    start = time.perf_counter()
    record = dict(dry_run=args.dry_run, versions=versions(device))
    record["kernels"] = check_kernels(device, args.dry_run)
    failed = [r for r in record["kernels"] if not r["ok"]]
    for r in failed:
        print(f"kernel FAILED: {r}")
    record["reference"] = check_against_reference(device, args.dry_run)
    record["scaling"] = module_scaling(device, args.dry_run)
    record["throughput"] = throughput(device, args.dry_run)
    record["documents"] = packed_documents(device, args.dry_run)
    record["seconds"] = time.perf_counter() - start
    ok = not failed and record["reference"]["ok"] and record["documents"]["ok"]
    backends = sorted({r["backend"] for r in record["kernels"]})
    largest = record["scaling"][-1]
    dense, longnet = record["throughput"][1], record["throughput"][2]
    ref = record["reference"]
    summary = (f"GPU CHECK {'OK' if ok else 'FAILED'}: {len(record['kernels']) - len(failed)}/{len(record['kernels'])} "
               f"kernel cases ({', '.join(backends)}); bf16 vs float64 reference: core out "
               f"{ref['core']['out']:.1e}, module out {ref['module']['out']:.1e}, worst gradient "
               f"{max(e for n, e in {**ref['core'], **ref['module']}.items() if n != 'out'):.1e} "
               f"({'within' if ref['ok'] else 'OUTSIDE'} tolerance); N={largest['seq_len']} module fwd+bwd "
               f"{largest['seconds']:.2f} s, {largest['peak_mib']:.0f} MiB; dilated core "
               f"{dense['tflops']:.1f} TFLOP/s on (N, 1) = {dense['of_sdpa']:.2f}x SDPA, "
               f"{longnet['tflops']:.1f} TFLOP/s on LongNet pairs; packed documents bf16 worst "
               f"{max(record['documents']['errors'].values()):.1e} "
               f"({'within' if record['documents']['ok'] else 'OUTSIDE'} tolerance); {record['seconds']:.0f} s")
    record["summary"], record["ok"] = summary, ok
    directory = output_dir(True) if args.dry_run else RESULTS / "gpu"
    directory.mkdir(parents=True, exist_ok=True)
    path = write_json(directory, "gpu_dry_run" if args.dry_run else "gpu", record)
    print(f"wrote {path}")
    print(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
