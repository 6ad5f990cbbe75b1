"""Stage 1 (simulated ring) against the float64 ground truth, forward and gradients."""

import itertools
import random

import pytest
import torch
from helpers import forward_and_grads, random_qkv, rel_err

import reference
from lessons.stage1_simulated_ring import merge_partials, ring_schedule, simulated_ring_dilated_attention

# N=256 on P ranks: with P=8 (L=32) the (32,1) pair is local and the others span 2, 4 and 8 ranks
MIXED = ([32, 64, 128, 256], [1, 2, 4, 8])
LOCAL = ([16, 32], [1, 2])  # every segment fits in a shard up to P=8
SPANNING = ([256, 128], [1, 4])  # every segment spans ranks from P=2 on
CONFIGS = {"mixed": MIXED, "local": LOCAL, "spanning": SPANNING}


def assert_matches_reference(q, k, v, segments, rates, world_size, causal, head_mode, tol=1e-10):
    expected = forward_and_grads(
        lambda q, k, v: reference.dilated_attention(q, k, v, segments, rates, causal=causal, head_mode=head_mode),
        q, k, v,
    )
    actual = forward_and_grads(
        lambda q, k, v: simulated_ring_dilated_attention(
            q, k, v, segments, rates, world_size=world_size, causal=causal, head_mode=head_mode
        ),
        q, k, v,
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), actual, expected):
        err = rel_err(a, b)
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("head_mode", ["all", "groups"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_grid_float64_matches_reference(config, head_mode, causal, world_size):
    q, k, v = random_qkv(2, 256, 5, 8, seed=world_size)  # 5 heads: groups of 2,1,1,1 / 3,2 (uneven)
    assert_matches_reference(q, k, v, *CONFIGS[config], world_size, causal, head_mode)


def test_randomised_configurations():
    rng = random.Random(1234)
    for case in range(12):
        world_size = rng.choice([1, 2, 4, 8])
        shard = rng.choice([4, 6, 8, 12])
        seq_len = world_size * shard
        # a local pair (w divides the shard, any rate <= w) and a spanning pair (w = G * L, r divides L)
        local_w = rng.choice([d for d in range(1, shard + 1) if shard % d == 0])
        pairs = [(local_w, rng.randint(1, local_w))]
        if world_size > 1:
            group = rng.choice([g for g in (2, 4, 8) if g <= world_size and world_size % g == 0])
            pairs.append((group * shard, rng.choice([r for r in range(1, shard + 1) if shard % r == 0])))
        if all(r != 1 for _, r in pairs):
            pairs.append((shard, 1))
        heads = rng.randint(len(pairs), 6)
        q, k, v = random_qkv(1, seq_len, heads, 4, seed=case)
        segments, rates = [w for w, _ in pairs], [r for _, r in pairs]
        causal, mode = rng.random() < 0.5, rng.choice(["all", "groups"])
        assert_matches_reference(q, k, v, segments, rates, world_size, causal, mode)


def test_segments_not_divisible_by_rate():
    # the paper's kind of pair: w=12, r=5 keeps 3 positions for offsets 0,1 and 2 positions for 2,3,4
    q, k, v = random_qkv(1, 48, 6, 4)
    for world_size, causal in itertools.product([1, 2, 4], [False, True]):
        assert_matches_reference(q, k, v, [12, 48], [5, 1], world_size, causal, "all")


def test_float32_close_to_float64_reference():
    q, k, v = random_qkv(2, 256, 4, 16, dtype=torch.float32)
    out = simulated_ring_dilated_attention(q, k, v, *MIXED, world_size=4, causal=True)
    expected = reference.dilated_attention(q.double(), k.double(), v.double(), *MIXED, causal=True)
    assert out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-5


def test_merge_partials_handles_empty_rows_without_nan():
    out = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    lse = torch.tensor([0.5, -torch.inf, -torch.inf], dtype=torch.float64, requires_grad=True)
    empty_lse = torch.full((3,), -torch.inf, dtype=torch.float64)
    merged_out, merged_lse = merge_partials(out, lse, torch.zeros(3, 4, dtype=torch.float64), empty_lse)
    assert torch.equal(merged_out[1:], torch.zeros(2, 4, dtype=torch.float64))
    assert merged_lse.tolist() == [0.5, -torch.inf, -torch.inf]
    (merged_out.sum() + merged_lse[0]).backward()
    assert torch.isfinite(out.grad).all() and torch.isfinite(lse.grad).all()


def test_schedule_rotates_blocks_and_skips_the_future():
    schedule = ring_schedule(4, [8, 32], [1, 2], seq_len=32)
    assert schedule[0] == [[0, 1, 2, 3]]  # local pair: one step, every rank uses its own keys
    assert schedule[1] == [[0, 1, 2, 3], [3, 0, 1, 2], [2, 3, 0, 1], [1, 2, 3, 0]]
    causal = ring_schedule(4, [16], [1], seq_len=32, causal=True)  # segment groups {0,1} and {2,3}
    assert causal[0] == [[0, 1, 2, 3], [None, 0, None, 2]]
