"""The launcher: results come back, failures and hangs end every rank within a bounded time."""

import time

import pytest
import torch
import workers

from lessons.harness import Problem
from lessons.launch import run_on_ranks


def test_results_come_back_in_rank_order():
    assert run_on_ranks(workers.all_reduce_sum, 3) == [torch.tensor([6.0])] * 3


def test_a_raising_rank_stops_every_rank_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed:.*ValueError: rank one gives up"):
        run_on_ranks(workers.raise_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 30


def test_a_stuck_group_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish within 4 s"):
        run_on_ranks(workers.sleep_forever, 2, timeout=4)
    assert time.monotonic() - start < 20


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        run_on_ranks(workers.all_reduce_sum, 0)


def test_ranks_with_different_shard_shapes_fail_everywhere():
    with pytest.raises(RuntimeError, match=r"(?s)ValueError: the q/k shards or the cu_seqlens differ between the "
                                           r"ranks of the sequence group \(rank 0: q \[2, 32, 5, 8\].*rank 1: "
                                           r"q \[2, 16, 5, 8\]"):
        run_on_ranks(workers.shard_shapes_disagree, 2, "lessons.stage2_true_ring", timeout=60)


def test_only_dilated_shards_travel():
    # N=256 on 4 ranks (L=64); pair (256, 8) spans 4 ranks, (128, 4) spans 2: each message is L / r rows
    problem = Problem(segment_lengths=(32, 128, 256), dilation_rates=(1, 4, 8))
    sent = run_on_ranks(workers.record_exchanged_shapes, 4, problem)
    for shapes in sent:
        assert sorted({s[1] for s in shapes}) == [64 // 8, 64 // 4]
        assert all(s[0] == problem.batch for s in shapes)
        # per spanning pair (one head selection each, since L % r == 0): forward (G - 1) x (k, v),
        # backward (G - 1) x (k, v, dk, dv) plus the last hop (dk, dv): G=2 gives 8 tensors, G=4 gives 20
        assert len(shapes) == 8 + 20
