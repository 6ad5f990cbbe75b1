"""`ring_attention.cost`: the bytes formula equals the bytes each rank really receives, forward and backward, for
every family, with and without causal load balance, grouped-query heads, both head modes and bf16 (whose dK/dV
accumulators travel in float32)."""

import pytest
import torch
import workers

from lessons.launch import run_on_ranks
from ring_attention.cost import halves_received, received_bytes

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
