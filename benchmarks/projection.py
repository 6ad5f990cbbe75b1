"""A cost model of ring dilated attention, checked against the runs measured here, then projected to a billion tokens.

    python benchmarks/projection.py [--quick]

For one forward + backward of the attention on ``P`` ranks: per rank, the FLOPs, the bytes received (each rank sends
as many: every schedule is a permutation), the peak memory and the time. Work and bytes are the code's own counts
(`ring_attention.cost`): the work walks the plan and the schedules `score_pairs` walks (and is checked against it),
adding the kernels' tiles on causal diagonal blocks (a tile is computed whole); the bytes are `received_bytes`, split
into the parts the time needs (the split is checked to add up to it). Time follows the code's overlap: a ring step's
key/value transfer is posted before the step computes; the accumulators' hops, all-gathers, re-layouts and
all-to-all wait. On a CPU the ranks share the cores and so does gloo's copying: compute and communication add up
over the machine. Memory at the backward's peak: the saved output and log-sum-exp, the dq, dk, dv accumulators
(float32 for half precision, then the returned gradients), the larger of a share of a shard for the local pairs'
kernel calls (calibrated once on ``scaling.json``) and the largest spanning pair's blocks (they are not live
together), and a fixed amount per rank of a process group.

The CPU profile comes from the committed runs, measured together on this machine (but million_tokens.json, which
calibrates only the bf16 rate at head dim 32, on an earlier one): float32 kernel FLOP/s from ``kernels.json``, and
five quantities no committed run measures directly, each calibrated on named runs (`calibrated`); the model is then
compared with every committed run of scaling, memory, ring_overhead, comm_families and million_tokens, and the
largest errors leave the calibrating runs out. The H100 profile is published figures (the
output names them); LongNet's geometric pairs (w / r = 4096, each w four times the last, up to N: those of
``million_tokens.py``) are projected at N = 1M, 16M, 256M and 1B: the smallest P that fits 80 GB and the time of one
attention layer. ``--quick`` checks every sixth run and projects up to 16M tokens.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, output_dir, parse_args, write_json  # noqa: E402

from ring_attention.balance import balanced, gathered_blocks, ring_blocks  # noqa: E402
from ring_attention.cost import agreement_check_bytes, received_bytes, score_pairs  # noqa: E402
from ring_attention.kernels import lse_dtype  # noqa: E402
from ring_attention.pattern import plan_pairs  # noqa: E402

MIB, GB = 2**20, 1e9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LONGNET = dict(heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")  # the projected layer (8B-Llama-like heads)


@dataclass(frozen=True)
class Config:
    """One call. ``family``: ``ring``, ``allgather``, ``all-to-all`` (over all P ranks) or ``hybrid`` (all-to-all
    over ``ulysses`` ranks, then the ring); ``module`` adds `RingMultiheadDilatedAttention`'s projections; ``inputs``
    counts the inputs in the memory (the measured runs made them before measuring)."""

    seq_len: int
    world_size: int
    pairs: tuple
    family: str = "ring"
    ulysses: int = 1
    load_balance: bool = True
    causal: bool = True
    dtype: str = "float32"
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64
    module: bool = False
    inputs: bool = False  # count q, k, v and the output's gradient, which exist before the call

    @property
    def split(self) -> tuple[str, int]:
        """The core's ``comm`` and ``ulysses_size`` for this family."""
        u = {"all-to-all": self.world_size, "hybrid": self.ulysses}.get(self.family, 1)
        return ("allgather" if self.family == "allgather" else "ring"), u


@dataclass(frozen=True)
class Hardware:
    """Per rank: attention kernel FLOP/s by (dtype, head dim) (forward + backward, full tiles), bytes/s inside a node
    and between nodes, seconds per message, memory. ``shared_cores``: the ranks share this many cores, communication
    included (a CPU). ``tiles``: the kernel's (query, key) tile, computed whole on a causal diagonal."""

    name: str
    kernel_flops: dict
    link_bytes_per_s: float
    network_bytes_per_s: float
    ranks_per_node: int
    latency_s: float
    memory_bytes: float
    fixed_bytes: float
    tiles: tuple | None = None
    shared_cores: int | None = None
    transient: float = 1.0  # the kernels' block outputs and copies, in output accumulators of a shard
    group_bytes: float = 0.0  # what a rank of a process group holds beyond one process (gloo's buffers)
    sources: tuple = ()


H100 = Hardware(
    name="H100 SXM, 8 per node (NVLink inside a node, one 400 Gb/s InfiniBand port per GPU between nodes)",
    kernel_flops={("bfloat16", 128): 740e12}, link_bytes_per_s=450e9, network_bytes_per_s=50e9, ranks_per_node=8,
    latency_s=10e-6, memory_bytes=80e9, fixed_bytes=2e9, tiles=(128, 128),
    sources=("NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 tensor core 1,979 TFLOP/s with sparsity, 989 dense; "
             "NVLink 900 GB/s, 450 GB/s each way; 80 GB of HBM3",
             "Shah et al. 2024, FlashAttention-3 (arXiv:2407.08608), abstract: BF16 attention up to 740 TFLOP/s on "
             "H100 (75% of the dense peak); used for forward and backward alike: an optimistic kernel rate",
             "NVIDIA DGX BasePOD reference architecture, DGX H100: eight single-port ConnectX-7, up to 400 Gb/s "
             "InfiniBand or Ethernet: 50 GB/s each way per GPU",
             "assumed, not published: 10 us per message, 2 GB per rank of fixed memory (CUDA context, NCCL buffers), "
             "kernel tiles of 128 x 128"))


def cpu_tiles(rows: int) -> tuple[int, int]:
    """PyTorch's CPU flash kernel: query tiles of 256 rows (64 from 192 rows, 32 below), key tiles of 512 keys
    (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``)."""
    return (256 if rows >= 768 else 64 if rows >= 192 else 32), 512


def block_scores(rows: int, keys: int, causal: bool, hw: Hardware | None) -> int:
    """Scores one kernel call computes; ``hw=None``: exactly the causal triangle, as `score_pairs` counts."""
    if not causal:
        return rows * keys
    if hw is None:
        return rows * (rows + 1) // 2
    q_tile, k_tile = cpu_tiles(rows) if hw.shared_cores else hw.tiles
    return sum(min(q_tile, rows - s) * min(math.ceil(min(s + q_tile, keys) / k_tile) * k_tile, keys)
               for s in range(0, rows, q_tile))


def layouts(c: Config) -> list:
    """The pair layouts one rank of a sub-group sees (after the all-to-all: ``H / U`` heads, ``P / U`` ranks)."""
    u = c.split[1]
    segments, rates = (list(x) for x in zip(*c.pairs))
    return plan_pairs(c.seq_len, c.world_size // u, segments, rates, c.heads // u, num_kv_heads=c.kv_heads // u)


def rank_work(c: Config, rank: int, hw: Hardware | None) -> tuple[int, list[list[int]]]:
    """Scores ``rank`` computes per batch row, forward: its local pairs, and for each spanning pair one number per
    ring step (one for the all-gather), from the schedules of `ring_attention.balance`."""
    comm, u = c.split
    shard = u * c.seq_len // c.world_size
    local, spanning = 0, []
    for lay in layouts(c):
        if not lay.spans_ranks:
            local += sum(shard // lay.piece_length * v.heads * block_scores(v.count, v.count, c.causal, hw)
                         for v in lay.views)
            continue
        me, g, rows = (rank // u) % lay.group_size, lay.group_size, shard // lay.rate
        balance, heads = balanced(lay, c.causal, c.load_balance), sum(v.heads for v in lay.views)
        steps = ([gathered_blocks(me, g, rows, c.causal, balance)] if comm == "allgather" else
                 [ring_blocks(me, g, s, rows, c.causal, balance) for s in range(g)])
        spanning.append([heads * sum(block_scores(b.q.stop - b.q.start, b.k.stop - b.k.start, b.causal, hw)
                                     for b in blocks) for blocks in steps])
    return local, spanning


def predict(c: Config, hw: Hardware, batch: int = 1) -> dict:
    """The slowest rank's FLOPs, bytes received, peak memory and seconds, with the compute and communication parts."""
    comm, u = c.split
    e, a = (torch.empty((), dtype=t).element_size() for t in (DTYPES[c.dtype], lse_dtype(DTYPES[c.dtype])))
    segments, rates = (list(x) for x in zip(*c.pairs))
    count = (comm, c.world_size, c.seq_len, segments, rates, c.heads, c.kv_heads, c.head_dim, DTYPES[c.dtype])
    received = received_bytes(*count, batch=batch, ulysses_size=u, causal=c.causal, load_balance=c.load_balance)
    unbalanced = received_bytes(*count, batch=batch, ulysses_size=u, causal=c.causal, load_balance=False)
    if u == 1 and c.world_size <= 64:  # the walk here is score_pairs' walk: check it before trusting it
        exact = [w[0] + sum(map(sum, w[1])) for w in (rank_work(c, r, None) for r in range(c.world_size))]
        assert exact == score_pairs(c.seq_len, c.world_size, segments, rates, c.heads, causal=c.causal,
                                    num_kv_heads=c.kv_heads, comm=comm, load_balance=c.load_balance), c
    spans = [lay for lay in layouts(c) if lay.spans_ranks]
    shard, flop = c.seq_len // c.world_size, 4 * c.head_dim * batch  # forward FLOPs per score; backward 2.5x
    rate = hw.kernel_flops[(c.dtype, c.head_dim)]
    # groups are consecutive ranks: one wider than a node crosses nodes (the slowest link sets a ring step's pace)
    widest = u * max([lay.group_size for lay in spans] + [1])
    bw = hw.network_bytes_per_s if widest > hw.ranks_per_node else hw.link_bytes_per_s
    ranks = range(c.world_size) if c.world_size <= 64 else sorted({0, c.world_size // 2, c.world_size - 1})
    per_rank = []
    for rank in ranks:
        local, spanning = rank_work(c, rank, hw)
        seconds = 3.5 * flop * local / rate
        a2a = 2 * batch * (u - 1) * shard * c.head_dim * e * (2 * c.heads + 2 * c.kv_heads) // u
        serial = (received[rank] - unbalanced[rank]) + a2a + agreement_check_bytes(c.world_size)
        # messages that wait: the agreement check, the all-to-alls, each balanced pair's four re-layouts, an
        # all-gather's steps, a ring's accumulator hops (its key/value steps travel behind the compute)
        messages, parts = 1 + (4 if u > 1 else 0), agreement_check_bytes(c.world_size) + a2a
        for lay, steps in zip(spans, spanning):
            g, n = lay.group_size, shard * u // lay.rate
            block = batch * n * lay.span_rows.kv_heads.numel() * c.head_dim  # one rank's keys, elements
            kv, acc = 4 * (g - 1) * block * e, 2 * (g if comm == "ring" else g - 1) * block * a
            parts += kv + acc
            messages += 4 * balanced(lay, c.causal, c.load_balance)
            if comm == "allgather":  # gather, compute; gather again, compute, reduce-scatter: nothing overlaps
                serial, messages = serial + kv + acc, messages + 3 * (g - 1)
                seconds += 3.5 * flop * steps[0] / rate
                continue
            serial, messages = serial + acc, messages + g
            travel = [2 * block * e / bw + hw.latency_s] * (g - 1) + [0.0]  # the last step posts nothing
            seconds += sum(max(f * flop * w / rate, t) for w, t in zip(steps, travel) for f in (1.0, 2.5))
        parts += received[rank] - unbalanced[rank]
        assert parts == received[rank], (c, rank, parts, received[rank])  # the same bytes as the code counts
        per_rank.append(dict(work=local + sum(map(sum, spanning)), bytes=received[rank], messages=messages,
                             seconds=seconds + serial / bw + messages * hw.latency_s,
                             compute=3.5 * flop * (local + sum(map(sum, spanning))) / rate))
    flops = 3.5 * flop * max(r["work"] for r in per_rank)
    if hw.shared_cores:  # one machine: the ranks share the cores and the loopback, whose copying takes CPU time
        threads = max(1, hw.shared_cores // c.world_size)
        compute = max(flops / (rate * threads / hw.shared_cores), 3.5 * flop * sum(r["work"] for r in per_rank) / rate)
        waits = max(r["messages"] for r in per_rank) * hw.latency_s if c.world_size > 1 else 0.0
        seconds = compute + sum(received) / bw + waits
    else:
        seconds = max(r["seconds"] for r in per_rank)
        compute = max(r["compute"] for r in per_rank)
    return dict(flops=flops, bytes=max(received), memory=memory(c, hw, spans, batch, e, a), seconds=seconds,
                compute_seconds=compute, comm_seconds=seconds - compute)


def memory(c: Config, hw: Hardware, spans: list, batch: int, e: int, a: int) -> float:
    """Peak bytes per rank, at the backward (see the module docstring)."""
    u, tokens = c.split[1], batch * c.seq_len // c.world_size
    heads, both = c.heads * c.head_dim, (c.heads + 2 * c.kv_heads) * c.head_dim  # per token: q; q, k, v
    peak = hw.fixed_bytes + tokens * (heads * e + both * a)  # the output, the dq, dk, dv accumulators
    if c.world_size > 1:
        peak += hw.group_bytes
    transient = tokens * hw.transient * heads * e  # the local pairs' kernel calls: not live with a spanning pair's
    if e != a:  # the output's float32 accumulator lives through the forward, the returned gradients end the backward
        peak += tokens * max(heads * a, both * e)
    if c.module or c.inputs:  # q, k, v and the output (the module makes them inside the call) or its gradient
        peak += tokens * (both + heads) * e
    if spans:
        gather = c.split[0] == "allgather"  # which pair holds the most: the most rows gathered, or in flight
        lay = max(spans, key=lambda s: (s.group_size if gather else 1) / s.rate)
        n, kv = u * tokens // lay.rate, lay.span_rows.kv_heads.numel() * c.head_dim
        rows = n * lay.span_rows.q_heads.numel() * c.head_dim
        spanning = 3 * rows * e + rows * a  # the pair's q, out and dout rows, and its dq accumulator
        # all-gather: the gathered keys and values and their copy in sequence order, the dk, dv accumulators and
        # their copy for the reduce-scatter; ring: two blocks of each in flight
        spanning += lay.group_size * n * kv * 4 * (e + a) if gather else 4 * n * kv * (e + a)
        transient = max(transient, spanning)
    return peak + transient


def cpu_profile() -> Hardware:
    """This machine, from the committed runs (measured together, on an idle machine): kernel FLOP/s from
    ``kernels.json`` (the fused CPU kernel, non-causal, every core); the rest is calibrated below."""
    rates = {(r["dtype"], 64): r["gflops"] * 1e9 for r in load("kernels")["results"]["rows"]
             if r["backend"] == "cpu_flash" and not r["causal"]}
    return Hardware(name=f"this machine's CPU ({os.cpu_count()} cores, gloo over the loopback)", kernel_flops=rates,
                    link_bytes_per_s=math.inf, network_bytes_per_s=math.inf, ranks_per_node=1 << 30, latency_s=0.0,
                    memory_bytes=0.0, fixed_bytes=0.0, shared_cores=os.cpu_count())


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def pairs_of(record: dict, key: str = "pairs") -> tuple:
    return tuple(tuple(p) for p in record[key])


def measured_runs() -> list[tuple[str, Config, dict, bool]]:
    """Every committed measurement the model can be held to: (name, configuration, measured, first call)."""
    runs = []
    scaling = load("scaling")["results"]
    for row in scaling["rows"]:
        if row["kind"] == "dilated":
            c = Config(row["seq_len"], 1, pairs_of(scaling))
            runs.append((f"scaling N={row['seq_len']}", c, dict(seconds=row["seconds"], mib=row["peak_mib"]), True))
    problem = load("memory")["results"]["problem"]
    for row in load("memory")["results"]["rows"]:
        if row["stage"].startswith(("stage 5", "stage 6")):
            family = "allgather" if row["stage"].endswith("allgather") else "ring"
            c = Config(problem["seq_len"], row["world_size"], pairs_of(problem), family, causal=False)
            runs.append((f"memory {row['stage'][9:]} P={row['world_size']}", c,
                         dict(seconds=row["seconds"], mib=row["peak_mib"]), False))
    overhead = load("ring_overhead")["results"]
    for row in overhead["rows"]:
        family = "ring" if row["mode"] == "one process" else row["mode"]
        c = Config(overhead["seq_len"], row["world_size"], pairs_of(overhead), family, load_balance=row["load_balance"])
        runs.append((f"ring_overhead {row['mode']}{' balanced' if row['load_balance'] else ''} P={row['world_size']}",
                     c, dict(seconds=row["seconds"], bytes=row["total_bytes"]), False))
    families = load("comm_families")["results"]
    for row in families["rows"]:
        name = row["family"]
        family = {"all-gather": "allgather", "hybrid U=2": "hybrid"}.get(name, name)
        c = Config(families["seq_len"], row["world_size"], pairs_of(families["configurations"], row["config"]),
                   family, ulysses=2, causal=False, heads=families["heads"], kv_heads=families["kv_heads"])
        runs.append((f"comm_families {row['config']} {name} P={row['world_size']}", c,
                     dict(seconds=row["seconds"], bytes=row["received_bytes"]), False))
    million = load("million_tokens")["results"]
    c = Config(million["seq_len"], million["world_size"], pairs_of(million), dtype="bfloat16", heads=million["heads"],
               kv_heads=million["heads"], head_dim=million["head_dim"], module=True)
    runs.append(("million_tokens", c, dict(seconds=million["seconds"], mib=million["peak_mib_per_rank"]), True))
    return runs


CALIBRATION = {"scaling": "mib", "memory production, ring P=8": "mib", "ring_overhead": "seconds",
               "million_tokens": "seconds"}


def calibrated(hw: Hardware, runs: dict) -> tuple[Hardware, float]:
    """Fit what no committed measurement gives directly, each from the runs of `CALIBRATION` (marked so in the
    output and left out of the largest errors): the kernels' transient share of a shard and the fixed bytes of a
    first call (a least-squares line through scaling.json's peaks); what a rank of a process group holds beyond one
    process (gloo's buffers and connections: the P = 8 ring run of memory.json, where shards are smallest); gloo's
    loopback bandwidth and its time per waiting message (together, by least squares over ring_overhead.json's runs,
    which comm_families.json and memory.json then check); the bf16 kernel rate at head dim 32 (the million-token
    run: no kernel measurement of that shape is committed)."""
    rows = [r for r in load("scaling")["results"]["rows"] if r["kind"] == "dilated"]
    unit = [r["seq_len"] * 4 * 64 * 4 / MIB for r in rows]  # MiB of one [N, H, D] float32 tensor
    peaks = [r["peak_mib"] for r in rows]
    mean_u, mean_p = sum(unit) / len(unit), sum(peaks) / len(peaks)
    slope = sum((u - mean_u) * (p - mean_p) for u, p in zip(unit, peaks)) / sum((u - mean_u) ** 2 for u in unit)
    hw = replace(hw, transient=slope - 4)  # 4: the output and dq, dk, dv
    c, measured = runs["memory production, ring P=8"]
    hw = replace(hw, group_bytes=measured["mib"] * MIB - predict(c, hw)["memory"])

    # on a CPU, time = compute + bytes / bandwidth + waiting messages x seconds per message: both fitted at once, by
    # least squares on relative errors, over every ring_overhead run (a single run leaves the communication a small
    # difference of two large, noisy times)
    rows, targets = [], []
    for name, (c, measured) in runs.items():
        if name.startswith("ring_overhead") and c.world_size > 1:
            free = replace(hw, link_bytes_per_s=math.inf, network_bytes_per_s=math.inf, latency_s=0.0)
            base = predict(c, free)["seconds"]
            per_byte = predict(c, replace(free, link_bytes_per_s=1.0, network_bytes_per_s=1.0))["seconds"] - base
            per_message = predict(c, replace(free, latency_s=1.0))["seconds"] - base
            t = measured["seconds"]
            rows.append((per_byte / t, per_message / t))
            targets.append((t - base) / t)
    # the normal equations of [bytes, messages] x [seconds per byte, seconds per message] = targets
    bytes_bytes = sum(b * b for b, _ in rows)
    bytes_messages = sum(b * m for b, m in rows)
    messages_messages = sum(m * m for _, m in rows)
    bytes_target = sum(b * y for (b, _), y in zip(rows, targets))
    messages_target = sum(m * y for (_, m), y in zip(rows, targets))
    det = bytes_bytes * messages_messages - bytes_messages**2
    seconds_per_byte = (messages_messages * bytes_target - bytes_messages * messages_target) / det
    latency = (bytes_bytes * messages_target - bytes_messages * bytes_target) / det
    if latency < 0:  # a negative cost is noise: fit the other one alone
        seconds_per_byte, latency = max(0.0, bytes_target / bytes_bytes), 0.0
    elif seconds_per_byte < 0:
        seconds_per_byte, latency = 0.0, max(0.0, messages_target / messages_messages)
    bandwidth = 1 / seconds_per_byte if seconds_per_byte > 0 else math.inf
    hw = replace(hw, link_bytes_per_s=bandwidth, network_bytes_per_s=bandwidth, latency_s=latency)
    c, measured = runs["million_tokens"]
    hw = replace(hw, kernel_flops={**hw.kernel_flops, ("bfloat16", 32): 1.0})
    seconds = predict(c, hw)["compute_seconds"]  # at 1 FLOP/s: the FLOPs the slowest share of the machine does
    rest = predict(c, hw)["seconds"] - seconds
    hw = replace(hw, kernel_flops={**hw.kernel_flops, ("bfloat16", 32): seconds / (measured["seconds"] - rest)})
    return hw, (mean_p - slope * mean_u) * MIB


def check(hw: Hardware, first_call_bytes: float, runs: list) -> list[dict]:
    """The model against each committed run: relative errors of time and memory, bytes off (exact is 0); a
    quantity a run calibrated is named in ``calibrates``."""
    rows = []
    for name, c, measured, first_call in runs:
        p = predict(c, replace(hw, fixed_bytes=first_call_bytes if first_call else 0.0))
        predicted = dict(seconds=p["seconds"], mib=p["memory"] / MIB, bytes=p["bytes"])
        error = {k: predicted[k] / v - 1 for k, v in measured.items() if k != "bytes"}
        if "bytes" in measured:
            error["bytes_off"] = predicted["bytes"] - measured["bytes"]
        rows.append(dict(run=name, measured=measured, predicted={k: predicted[k] for k in measured}, error=error,
                         calibrates=CALIBRATION.get(name, CALIBRATION.get(name.split()[0]))))
    return rows


def longnet_pairs(seq_len: int) -> tuple:
    """Geometric pairs with w / r = 4096, each segment four times the last, up to the whole sequence."""
    return tuple((4096 * 4**i, 4**i) for i in range(20) if 4096 * 4**i <= seq_len)


def project(hw: Hardware, lengths: tuple = (2**20, 2**24, 2**28, 2**30)) -> list[dict]:
    """For each N, the smallest power-of-two P whose ranks fit in memory, on the ring and the all-gather."""
    rows = []
    for seq_len in lengths:
        for family in ("ring", "allgather"):
            for world_size in (2**k for k in range(0, 21)):
                c = Config(seq_len, world_size, longnet_pairs(seq_len), family, inputs=True, **LONGNET)
                try:
                    p = predict(c, hw)
                except ValueError:  # the pairs do not tile this many shards
                    continue
                if p["memory"] <= hw.memory_bytes:
                    rows.append(dict(seq_len=seq_len, family=family, world_size=world_size, nodes=max(
                        1, world_size // hw.ranks_per_node), **{k: v for k, v in p.items()}))
                    break
    return rows


def plot(checks: list[dict], projected: list[dict], path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, marker, label in (("seconds", "o", "time (s)"), ("mib", "s", "peak memory (MiB)")):
        pts = [(r["measured"][key], r["predicted"][key]) for r in checks if key in r["measured"]]
        axes[0].loglog(*zip(*pts), marker, alpha=0.7, label=label)
    low, high = axes[0].get_xlim()
    axes[0].loglog([low, high], [low, high], "k:", label="prediction = measurement")
    axes[0].set_xlabel("measured on this CPU"), axes[0].set_ylabel("predicted by the model")
    axes[0].set_title("measured runs: prediction against measurement", fontsize=10)
    axes[0].legend(fontsize=8)
    for family, marker in (("ring", "o-"), ("allgather", "s--")):
        sel = [r for r in projected if r["family"] == family]
        axes[1].semilogx([r["seq_len"] for r in sel], [1e3 * r["seconds"] for r in sel], marker, label=family)
        if family == "ring":
            axes[1].semilogx([r["seq_len"] for r in sel], [1e3 * r["compute_seconds"] for r in sel], "k:",
                             label="compute alone")
            for r in sel:
                axes[1].annotate(f"P={r['world_size']}", (r["seq_len"], 1e3 * r["seconds"]), fontsize=8,
                                 xytext=(4, 6), textcoords="offset points")
    axes[1].set_ylim(bottom=0)
    axes[1].set_xlabel("tokens N"), axes[1].set_ylabel("ms per attention layer, forward + backward")
    axes[1].set_title("projected, not measured: H100s, the smallest P that fits 80 GB", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args(__doc__)
    out = output_dir(args.quick)
    runs = measured_runs()
    cpu, first_call = calibrated(cpu_profile(), {name: (c, measured) for name, c, measured, _ in runs})
    checks = check(cpu, first_call, runs[::6] if args.quick else runs)
    for r in checks:
        print(f"{r['run']:<52} " + ", ".join(
            f"{k} {r['measured'][k]:.4g} -> {r['predicted'][k]:.4g} " + (
                f"({100 * r['error'][k]:+.0f}%)" if k != "bytes" else f"({r['error']['bytes_off']:+d} bytes)")
            for k in r["measured"]) + (f" [calibrates the {r['calibrates']}]" if r["calibrates"] else ""))
    worst = {k: max(abs(r["error"][k]) for r in checks if k in r["error"] and r["calibrates"] != k)
             for k in ("seconds", "mib", "bytes_off")}
    print(f"largest errors: time {100 * worst['seconds']:.1f}% (goal 25%), memory {100 * worst['mib']:.1f}% "
          f"(goal 10%), bytes {worst['bytes_off']} bytes off (goal 0); runs with bytes off: "
          + (", ".join(r["run"] for r in checks if r["error"].get("bytes_off")) or "none"))
    projected = project(H100, (2**20, 2**24) if args.quick else (2**20, 2**24, 2**28, 2**30))
    for r in projected:
        print(f"N={r['seq_len']:>13,} {r['family']:<9} P={r['world_size']:>6} ({r['nodes']} nodes): "
              f"{r['memory'] / 1e9:5.1f} GB per rank, {r['seconds']:8.3f} s per layer "
              f"(compute {r['compute_seconds']:.3f} s, communication {r['comm_seconds']:.3f} s)")
    write_json(out, "projection", dict(
        cpu_profile=dict(kernel_flops={f"{d}, head dim {h}": v for (d, h), v in cpu.kernel_flops.items()},
                         loopback_bytes_per_s=cpu.link_bytes_per_s, seconds_per_message=cpu.latency_s,
                         transient=cpu.transient, group_mib=cpu.group_bytes / MIB,
                         first_call_mib=first_call / MIB, load_average=os.getloadavg()),
        checks=checks, calibration=CALIBRATION, largest_error=worst, goals=dict(seconds=0.25, mib=0.10, bytes_off=0),
        h100=dict(name=H100.name, sources=list(H100.sources), kernel_tflops=H100.kernel_flops[("bfloat16", 128)] / 1e12,
                  link_gb_per_s=H100.link_bytes_per_s / GB, network_gb_per_s=H100.network_bytes_per_s / GB),
        projected_layer=dict(LONGNET, pairs="w / r = 4096, w = 4096 * 4^i up to N", causal=True, load_balance=True,
                             memory="one layer's call with its inputs q, k, v and output gradient; the rest of a "
                                    "model's activations come on top"),
        projected=projected))
    plot(checks, projected, out / "projection.png")


if __name__ == "__main__":
    main()
