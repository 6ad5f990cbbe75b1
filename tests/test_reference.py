"""Stage 0: the dense ground truth against plain softmax attention and hand-checked patterns."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import forward_and_grads, random_qkv, rel_err

import reference


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    ).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
def test_one_pair_n_1_is_plain_attention(causal):
    q, k, v = random_qkv(2, 48, 3, 8)
    ours = forward_and_grads(
        lambda q, k, v: reference.dilated_attention(q, k, v, [48], [1], causal=causal), q, k, v
    )
    theirs = forward_and_grads(lambda q, k, v: sdpa(q, k, v, causal), q, k, v)
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < 1e-12


def test_segment_longer_than_sequence_is_cut_to_it():
    q, k, v = random_qkv(1, 16, 2, 4)
    long = reference.dilated_attention(q, k, v, [64], [1])
    assert rel_err(long, sdpa(q, k, v, False)) < 1e-12


def test_attention_lse_matches_logsumexp_of_scores():
    q, k, v = random_qkv(1, 10, 2, 4)
    _, lse = reference.attention(q, k, v, return_lse=True)
    scores = torch.einsum("bqhd,bkhd->bqhk", q, k) / math.sqrt(4)
    assert rel_err(lse, scores.logsumexp(-1)) < 1e-14


def test_mask_offsets_and_segments_by_hand():
    # N=8, one pair (w=4, r=2), 3 heads: head h keeps positions t with t % 2 == h % 2 inside each segment
    mask = reference.dilation_mask(8, [4], [2], 3)[0]
    even = [0, 2, 4, 6]
    expected_head0 = torch.zeros(8, 8, dtype=torch.bool)
    for a in even:
        for b in even:
            expected_head0[a, b] = a // 4 == b // 4
    assert torch.equal(mask[0], expected_head0)
    assert torch.equal(mask[2], expected_head0)  # offset 2 % 2 == 0, same as head 0
    assert mask[1].nonzero().tolist() == [[1, 1], [1, 3], [3, 1], [3, 3], [5, 5], [5, 7], [7, 5], [7, 7]]


def test_mask_segment_not_divisible_by_rate():
    # w=5, r=3: offset 0 keeps 0,3; offset 1 keeps 1,4; offset 2 keeps only 2
    mask = reference.dilation_mask(10, [5], [3], 3)[0]
    assert mask[0, :5, :5].nonzero().tolist() == [[0, 0], [0, 3], [3, 0], [3, 3]]
    assert mask[2].nonzero().tolist() == [[2, 2], [7, 7]]


def test_mask_causal_keeps_only_the_past():
    mask = reference.dilation_mask(8, [4], [2], 2, causal=True)[0]
    assert mask[1].nonzero().tolist() == [[1, 1], [3, 1], [3, 3], [5, 5], [7, 5], [7, 7]]


def test_mask_groups_mode_gives_each_pair_its_heads():
    # H=12, 5 pairs: groups of 3,3,2,2,2 (remainder to the first groups)
    masks = reference.dilation_mask(8, [1, 2, 4, 8, 8], [1, 1, 1, 1, 2], 12, head_mode="groups")
    heads_used = [masks[i].flatten(1).any(1).nonzero().flatten().tolist() for i in range(5)]
    assert heads_used == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9], [10, 11]]
    # offsets still follow the global head index: head 11 on pair (8, 2) has offset 1
    assert masks[4, 11].diagonal().nonzero().flatten().tolist() == [1, 3, 5, 7]


def test_merge_partials_is_attention_over_the_union_and_order_free():
    q, k, v = random_qkv(1, 12, 2, 4)
    owner = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 1, 0, 0, 1])  # three disjoint key sets
    parts = [reference.attention(q, k, v, (owner == i)[None, :], return_lse=True) for i in range(3)]
    full_out, full_lse = reference.attention(q, k, v, return_lse=True)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        out, lse = reference.merge_partials([parts[i][0] for i in order], [parts[i][1] for i in order])
        assert rel_err(out, full_out) < 1e-14
        assert rel_err(lse, full_lse) < 1e-14
    # associativity: merging a merge equals merging all at once
    ab = reference.merge_partials([parts[0][0], parts[1][0]], [parts[0][1], parts[1][1]])
    abc = reference.merge_partials([ab[0], parts[2][0]], [ab[1], parts[2][1]])
    assert rel_err(abc[0], full_out) < 1e-14


def test_rows_without_keys_are_zero_with_finite_gradients():
    q, k, v = random_qkv(1, 8, 2, 4)
    with pytest.warns(UserWarning, match="no pair has dilation rate 1"):
        out, dq, dk, dv = forward_and_grads(
            lambda q, k, v: reference.dilated_attention(q, k, v, [4], [2], causal=True), q, k, v
        )
    # head 0 keeps even positions, head 1 odd ones: the other rows are selected by no pair
    assert torch.equal(out[0, 1::2, 0], torch.zeros(4, 4))
    assert torch.equal(out[0, 0::2, 1], torch.zeros(4, 4))
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert torch.equal(dq[0, 1::2, 0], torch.zeros(4, 4))


def test_key_shared_by_two_pairs_weighs_twice():
    # docs/concepts.md: the mixture is one softmax where a key counts once per pair that contains it
    q, k, v = random_qkv(1, 8, 1, 4)
    out = reference.dilated_attention(q, k, v, [8, 4], [1, 1])
    mask = reference.dilation_mask(8, [8, 4], [1, 1], 1)[:, 0].double()  # [2, N, N]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)[0, 0] / 2.0
    counts = mask.sum(0)  # how many pairs hold each (query, key)
    weights = counts * scores.exp()
    expected = (weights / weights.sum(-1, keepdim=True)) @ v[0, :, 0]
    assert rel_err(out[0, :, 0], expected) < 1e-13


@pytest.mark.parametrize("head_mode", ["all", "groups"])
def test_grouped_query_heads_keep_the_positions_of_their_kv_head(head_mode):
    # 6 query heads on 3 kv heads: query head h keeps what kv head h // 2 would keep as a head of its own
    segments, rates = [8, 16, 32], [1, 2, 4]
    gqa = reference.dilation_mask(32, segments, rates, 6, head_mode=head_mode, num_kv_heads=3)
    per_kv = reference.dilation_mask(32, segments, rates, 3)
    taking = reference.head_groups(6, 3) if head_mode == "groups" else [range(6)] * 3
    for i, heads in enumerate(taking):
        for h in range(6):
            expected = per_kv[i, h // 2] if h in heads else torch.zeros(32, 32, dtype=torch.bool)
            assert torch.equal(gqa[i, h], expected)


def test_grouped_query_attention_is_attention_with_repeated_kv_heads():
    # with one pair of rate 1 every head sees every key: GQA is plain attention on repeated k, v
    q, k, v = random_qkv(2, 16, 4, 8, kv_heads=2)
    out = reference.dilated_attention(q, k, v, [16], [1], causal=True)
    expected = reference.attention(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2), causal=True)
    assert rel_err(out, expected) < 1e-14


def test_kv_heads_must_divide_query_heads():
    q, k, v = random_qkv(1, 8, 4, 4, kv_heads=3)
    with pytest.raises(ValueError, match="k has 3 heads, which does not divide q's 4 heads"):
        reference.dilated_attention(q, k, v, [8], [1])
