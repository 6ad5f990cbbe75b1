"""Every bad input (the rules of docs/concepts.md: the operator, the sharding) raises with the argument named."""

import pytest
import torch

import reference
from lessons.stage1_simulated_ring import ring_schedule, simulated_ring_dilated_attention


def qkv(shape=(1, 16, 4, 8), dtype=torch.float64):
    return tuple(torch.zeros(shape, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize(
    "segments, rates, exc, words",
    [
        ([], [], ValueError, "segment_lengths is empty"),
        ([8, 16], [1], ValueError, "segment_lengths and dilation_rates must have the same length"),
        ([8, 0], [1, 1], ValueError, "segment_lengths must be positive, got 0"),
        ([8], [-1], ValueError, "dilation_rates must be positive, got -1"),
        ([8.0], [1], TypeError, "segment_lengths must hold ints, got 8.0"),
        ([8], [True], TypeError, "dilation_rates must hold ints, got True"),
        ("8", [1], TypeError, "segment_lengths must be a list"),
        ([4], [8], ValueError, "dilation_rates[0]=8 is larger than segment_lengths[0]=4"),
    ],
)
def test_bad_pairs(segments, rates, exc, words):
    with pytest.raises(exc) as info:
        reference.dilated_attention(*qkv(), segments, rates)
    assert words in str(info.value)


def test_lessons_need_whole_segments_and_name_the_pair():
    # the lessons teach the tiled layout, where every segment is whole; the reference and the production core take
    # any length (a document's last segment may be shorter: lesson 8)
    with pytest.raises(ValueError) as info:
        simulated_ring_dilated_attention(*qkv(), [16, 12], [1, 1], world_size=1)
    assert "16 % 12 != 0 (segment_lengths[1])" in str(info.value)
    with pytest.raises(ValueError, match=r"sequence length 12000 must be divisible by every segment length; "
                                         r"12000 % 8192 != 0"):
        ring_schedule(1, [1000, 8192], [1, 2], seq_len=12000)


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
        (lambda q, k, v: (q, k.float(), v), ValueError, "k.dtype=torch.float32 differs from q.dtype"),
        (lambda q, k, v: (q, k, v[:, :8]), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q, k[:, :8], v[:, :8]), ValueError, "must agree on batch, seq and head_dim"),
        (lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), ValueError, "k has 3 heads, which does not divide q's 4 heads"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "q must be a floating point tensor"),
        (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k.device=meta differs from q.device=cpu"),
    ],
)
def test_bad_tensors(mutate, exc, words):
    with pytest.raises(exc) as info:
        reference.dilated_attention(*mutate(*qkv()), [8], [1])
    assert words in str(info.value)


def test_bad_head_mode():
    with pytest.raises(ValueError, match="head_mode must be one of"):
        reference.dilated_attention(*qkv(), [8], [1], head_mode="some")
    with pytest.raises(ValueError, match="head_mode='groups' needs num_heads >= number of pairs, got num_heads=4"):
        reference.dilated_attention(*qkv(), [1, 2, 4, 8, 16], [1, 1, 1, 1, 1], head_mode="groups")


def test_uncovered_rows_warn():
    with pytest.warns(UserWarning, match=r"no pair has dilation rate 1 \(dilation_rates=\[2\]\)"):
        reference.dilated_attention(*qkv(), [8], [2])


@pytest.mark.parametrize(
    "seq_len, world, segments, rates, words",
    [
        (16, 3, [8], [1], "sequence length 16 must be divisible by world_size=3"),
        (16, 0, [8], [1], "world_size must be a positive int, got 0"),
        (48, 4, [16], [1], "pair 0 (w=16, r=1): a segment longer than a shard must cover whole shards; "
                           "16 % 12 != 0 (w % L == 0)"),
        (32, 4, [32], [3], "pair 0 (w=32, r=3): shard length 8 must be divisible by the dilation rate 3 "
                           "(L % r == 0)"),
        (24, 2, [4, 24], [1, 5], "pair 1 (w=24, r=5): shard length 12 must be divisible by the dilation rate 5"),
    ],
)
def test_bad_sharding(seq_len, world, segments, rates, words):
    q, k, v = qkv((1, seq_len, 2, 4))
    with pytest.raises(ValueError) as info:
        simulated_ring_dilated_attention(q, k, v, segments, rates, world_size=world)
    assert words in str(info.value)
    with pytest.raises(ValueError) as info:
        ring_schedule(world, segments, rates, seq_len=seq_len)
    assert words in str(info.value)


def test_shard_not_multiple_of_local_segment():
    # 36 tokens on 2 ranks: L = 18; w = 12 fits in a shard but 18 % 12 != 0 (36 % 12 == 0 so the operator is fine)
    q, k, v = qkv((1, 36, 2, 4))
    with pytest.raises(ValueError, match=r"pair 0 \(w=12, r=1\): shard length 18 must be a multiple of the "
                                         r"segment length 12 \(L % w == 0\)"):
        simulated_ring_dilated_attention(q, k, v, [12], [1], world_size=2)


def test_the_lessons_want_as_many_kv_heads_as_query_heads():
    from lessons.stage1_simulated_ring import simulated_ring_dilated_attention

    q, k, v = qkv()
    with pytest.raises(ValueError, match="q has 4 heads and k has 2: they must be equal here"):
        simulated_ring_dilated_attention(q, k[:, :, :2], v[:, :, :2], [8], [1], world_size=1)
