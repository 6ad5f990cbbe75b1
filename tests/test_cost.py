"""`ring_attention.cost`: the bytes formula equals the bytes each rank really receives, forward and backward, for
every family, with and without causal load balance, grouped-query heads, both head modes and bf16 (whose dK/dV
accumulators travel in float32)."""

import itertools
import random

import pytest
import torch
import workers

from lessons.launch import run_on_ranks
from ring_attention.cost import document_work, halves_received, received_bytes, score_pairs
from ring_attention.doc_balance import balance_streams, causal_work
from ring_attention.documents import Piece, plan_documents, segments
from ring_attention.streams import journey, spanning_streams

PAIRS = ([16, 64, 128], [1, 2, 4])
CASES = [
    dict(comm=comm, load_balance=balance, causal=causal, ulysses_size=u, head_mode=mode, heads=4, kv_heads=kv,
         dtype=dtype, seq_len=128, pairs=PAIRS)
    for comm in ("ring", "allgather")
    for balance, causal in ((False, False), (False, True), (True, True))
    for u, mode, kv, dtype in ((1, "all", 2, torch.float32), (1, "groups", 4, torch.bfloat16), (2, "all", 2,
                                                                                              torch.float64))
] + [  # packed documents (one starting exactly on a shard boundary, 64), and a length no segment tiles
    dict(comm=comm, load_balance=balance, causal=causal, ulysses_size=u, head_mode="all", heads=4, kv_heads=2,
         dtype=dtype, seq_len=128, pairs=PAIRS, cu_seqlens=documents)
    for comm in ("ring", "allgather")
    for balance, causal in ((False, False), (True, True))
    for u, dtype, documents in ((1, torch.float32, [0, 5, 50, 64, 101, 128]), (2, torch.bfloat16, [0, 77, 128]))
] + [dict(comm="ring", load_balance=True, causal=True, ulysses_size=1, head_mode="all", heads=4, kv_heads=2,
          dtype=torch.float32, seq_len=132, pairs=PAIRS)]


@pytest.fixture(scope="module")
def counted():
    return run_on_ranks(workers.counted_bytes, 4, CASES)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_received_bytes_equal_the_formula_on_every_rank(counted, index):
    case = dict(CASES[index])
    arguments = dict(seq_len=case.pop("seq_len"), pairs=case.pop("pairs"))
    expected = {backward: received_bytes(case["comm"], 4, arguments["seq_len"], *arguments["pairs"], case["heads"],
                                         case["kv_heads"], 8, case["dtype"], batch=2, ulysses_size=case["ulysses_size"],
                                         causal=case["causal"], load_balance=case["load_balance"],
                                         head_mode=case["head_mode"], backward=backward,
                                         cu_seqlens=case.get("cu_seqlens"))
                for backward in (False, True)}
    assert [rank[index][0] for rank in counted] == expected[False]
    assert [rank[index][1] for rank in counted] == expected[True]


def test_a_rank_receives_at_most_two_halves_per_relayout():
    for size in (2, 3, 4, 8):
        for to_zigzag in (True, False):
            got = [halves_received(me, size, to_zigzag) for me in range(size)]
            assert all(0 <= h <= 2 for h in got)
            assert sum(got) == sum(halves_received(me, size, not to_zigzag) for me in range(size))  # same moves
    # G = 4: rank p holds chunks 2p, 2p + 1 and wants p, 7 - p. Rank 0 wants 0 (its own) and 7 (rank 3's); rank 1
    # wants 1 (rank 0's) and 6 (rank 3's); rank 2 wants 2 (rank 1's) and 5 (its own); rank 3 wants 3 and 4 (ranks
    # 1 and 2)
    assert [halves_received(me, 4, True) for me in range(4)] == [1, 2, 1, 2]


def test_the_documents_plan_counts_the_same_work_as_the_tiled_schedule():
    # one document that the segments tile: the documents' plan (its streams) and the tiled schedules agree rank by rank
    pairs = ([32, 64, 128, 256], [1, 2, 4, 8])
    for comm in ("ring", "allgather"):
        tiled = score_pairs(256, 4, *pairs, 4, comm=comm, load_balance=False)
        planned = [document_work(plan_documents(((0, 256),), 256, 4, rank, *pairs, num_heads=4, num_kv_heads=4,
                                                head_mode="all", batch=1, causal=True, device=torch.device("cpu"),
                                                local_heads=range(4), comm_mode=comm, load_balance=False), 1, True)
                   for rank in range(4)]
        assert planned == tiled


def test_balance_spreads_packed_causal_work_within_10_percent():
    # packed documents of every length (fixed seed, long-tailed): shards get very different local work, and balance
    # moves chunks of the spanning pieces to even it out; the total work is unchanged
    rng = random.Random(0)
    lengths = []
    while sum(lengths) < 8192:
        lengths.append(max(1, int(rng.lognormvariate(5.5, 1.3))))
    lengths[-1] -= sum(lengths) - 8192
    layout = [0, *itertools.accumulate(n for n in lengths if n > 0)]
    pairs = ([512, 1024, 2048, 4096, 8192], [1, 2, 4, 6, 12])
    for world_size in (2, 4, 8):
        work = {balance: score_pairs(8192, world_size, *pairs, 4, cu_seqlens=layout, load_balance=balance)
                for balance in (False, True)}
        assert sum(work[True]) == sum(work[False])
        assert max(work[True]) / (sum(work[True]) / world_size) <= 1.1


def test_balanced_streams_cover_every_row_once_in_order():
    # balance re-owns each spanning stream in chunks: whatever the layout, the ranges still tile [0, count)
    rng = random.Random(4)
    for _ in range(20):
        seq_len, world_size = 64 * rng.randint(2, 8), rng.choice([2, 4, 8])
        layout = ((0, *sorted(rng.sample(range(1, seq_len), rng.randint(1, 9))), seq_len),)
        shard, w, rate = seq_len // world_size, rng.choice([32, 64, 128, 512]), rng.choice([1, 2, 3])
        crossing = [p for p in segments(layout, w) if p.start // shard != (p.start + p.length - 1) // shard]
        streams = spanning_streams(crossing, 1, shard, range(4), rate, 2, 0)
        loads = [rng.randint(0, 10**6) for _ in range(world_size)]
        before = sum(loads)
        balanced = balance_streams(streams, loads)
        assert sum(loads) - before == sum(causal_work(0, s.count) * len(s.q_heads) for s in streams)
        for stream in balanced:
            starts = [lo for _, lo, _ in stream.ranges]
            ends = [hi for _, _, hi in stream.ranges]
            assert starts[0] == 0 and ends[-1] == stream.count and starts[1:] == ends[:-1] and all(
                hi > lo for lo, hi in zip(starts, ends))


def test_causal_ring_passes_keys_only_to_the_parts_after_them():
    # a piece across 4 shards, owned naturally: the keys of the part on span rank i travel G - 1 - i hops (to the
    # later parts, which see them), never round the ring back to the earlier ones; without causality, every hop
    pieces = [Piece(None, 10, 200, False)]  # tokens [10, 210) over shards of 64: ranks 0 to 3
    (stream,) = spanning_streams(pieces, 1, 64, [0], 1, 1, 0)
    assert stream.members == (0, 1, 2, 3)
    assert [journey(stream, rank, causal=True) for rank in stream.members] == [3, 2, 1, 0]
    assert [journey(stream, rank, causal=False) for rank in stream.members] == [3, 3, 3, 3]
