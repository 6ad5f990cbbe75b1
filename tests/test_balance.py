"""Causal load balance (`ring_attention.balance`): the schedules cover every causal (query, key) couple exactly
once, every rank does the same work, and the zigzag re-layout is undone exactly, on real processes."""

import pytest
import torch
import workers
from helpers import rel_err

import reference
from lessons.launch import run_on_ranks
from ring_attention.balance import gathered_blocks, ring_blocks
from ring_attention.cost import score_pairs


def covered(blocks_per_rank, size, rows, chunk_of):
    """How often each (query position, key position) of the segment group is computed, from the schedules.

    ``chunk_of(rank, row)`` is the segment position of a rank's row; a causal block keeps key <= query.
    """
    count = torch.zeros(size * rows, size * rows, dtype=torch.long)
    for rank, blocks in enumerate(blocks_per_rank):
        for source, b in blocks:
            for i in range(b.q.start, b.q.stop):
                for j in range(b.k.start, b.k.stop):
                    qi, kj = chunk_of(rank, i), chunk_of(source, j)
                    if not b.causal or j - b.k.start <= i - b.q.start:
                        count[qi, kj] += 1
    return count


def zigzag_position(size, rows):
    half = rows // 2

    def position(rank, row):
        chunk = rank if row < half else 2 * size - 1 - rank
        return chunk * half + row % half

    return position


@pytest.mark.parametrize("size", [2, 3, 4, 8])
@pytest.mark.parametrize("balance", [False, True])
def test_ring_schedule_covers_the_causal_triangle_once(size, balance):
    rows = 4
    blocks = [[((rank - step) % size, b) for step in range(size) for b in ring_blocks(rank, size, step, rows, True,
                                                                                        balance)]
              for rank in range(size)]
    position = zigzag_position(size, rows) if balance else (lambda rank, row: rank * rows + row)
    assert torch.equal(covered(blocks, size, rows, position), torch.ones(size * rows, size * rows).tril().long())


@pytest.mark.parametrize("size", [2, 3, 4, 8])
@pytest.mark.parametrize("balance", [False, True])
def test_gathered_schedule_covers_the_causal_triangle_once(size, balance):
    rows = 4
    # the gathered keys are in sequence order: "source" 0 with rows 0 .. size * rows
    blocks = [[(0, b) for b in gathered_blocks(rank, size, rows, True, balance)] for rank in range(size)]
    queries = zigzag_position(size, rows) if balance else (lambda rank, row: rank * rows + row)

    def position(rank, row):
        return row if rank == "keys" else queries(rank, row)

    count = torch.zeros(size * rows, size * rows, dtype=torch.long)
    for rank, rank_blocks in enumerate(blocks):
        for _, b in rank_blocks:
            for i in range(b.q.start, b.q.stop):
                for j in range(b.k.start, b.k.stop):
                    if not b.causal or j - b.k.start <= i - b.q.start:
                        count[queries(rank, i), j] += 1
    assert torch.equal(count, torch.ones(size * rows, size * rows).tril().long())


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("pairs", [([16384], [1]), ([2048, 4096, 8192, 16384], [1, 2, 4, 8])], ids=["dense", "longnet"])
@pytest.mark.parametrize("comm", ["ring", "allgather"])
def test_balanced_work_is_within_5_percent_of_the_mean(world_size, pairs, comm):
    balanced = score_pairs(16384, world_size, *pairs, 8, comm=comm, load_balance=True)
    unbalanced = score_pairs(16384, world_size, *pairs, 8, comm=comm, load_balance=False)
    assert sum(balanced) == sum(unbalanced)  # the same work, spread differently
    assert max(balanced) / (sum(balanced) / world_size) <= 1.05
    if pairs[0] == [16384]:  # rank p of G computes p + 1/2 of G blocks' worth: (G - 1/2) / (G / 2)
        assert max(unbalanced) / (sum(unbalanced) / world_size) == pytest.approx((2 * world_size - 1) / world_size,
                                                                                 rel=1e-3)


def test_odd_rows_keep_the_unbalanced_schedule():
    # 24 tokens on 2 ranks, pair (24, 4): 12 / 4 = 3 rows per head on each rank, which do not halve
    pairs = ([12, 24], [1, 4])
    assert score_pairs(24, 2, *pairs, 4, load_balance=True) == score_pairs(24, 2, *pairs, 4, load_balance=False)


def test_relayout_round_trip_and_odd_rows_on_four_ranks():
    q, k, v = (torch.randn(2, 96, 4, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i in range(3))
    per_rank = run_on_ranks(workers.balance_checks, 4, q, k, v)
    for rank, result in enumerate(per_rank):
        # the group's 96 numbered rows in 8 chunks of 12: rank p holds chunks p and 7 - p
        expected = torch.cat([torch.arange(12 * c, 12 * c + 12) for c in (rank, 7 - rank)]).float()
        assert torch.equal(result["zigzag"], expected)
        assert torch.equal(result["round trip"], torch.arange(24 * rank, 24 * rank + 24).float())
    # (96, 8) on 4 ranks: 24 / 8 = 3 rows per head, odd: unbalanced, and still exact
    truth = reference.dilated_attention(q, k, v, [24, 96], [1, 8], causal=True)
    assert rel_err(torch.cat([r["odd rows"] for r in per_rank], dim=1), truth) < 1e-10
