"""Packed documents and any length on one process (DESIGN §10): the core against the float64 reference over random
layouts, packing invariance (each document's rows equal that document alone), tails, the unpacked path unchanged,
the modules' ``cu_seqlens`` and ``key_padding_mask``, and every bad ``cu_seqlens`` refused by name."""

import random
import warnings

import pytest
import torch
from helpers import rel_err

import reference
from ring_attention import RingDilatedAttention, RingMultiheadDilatedAttention, ring_dilated_attention

PAIRS = ([4, 8, 16], [1, 2, 3])  # a rate that divides no segment (3), tails of every kind below


def with_grads(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))]


def inputs(batch, seq_len, heads, kv_heads, seed, dtype=torch.float64, head_dim=8):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, seq_len, h, head_dim) for h in (heads, kv_heads, kv_heads, heads)]
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


def random_layout(rng: random.Random, seq_len: int, documents: int) -> list[int]:
    return [0, *sorted(rng.sample(range(1, seq_len), min(seq_len - 1, documents - 1))), seq_len]


def check_against_reference(segments, rates, cu_seqlens, batch, seq_len, heads, kv_heads, causal, head_mode, seed):
    q, k, v, grad_out = inputs(batch, seq_len, heads, kv_heads, seed)
    options = dict(causal=causal, head_mode=head_mode, cu_seqlens=cu_seqlens)
    ours = with_grads(lambda q, k, v: ring_dilated_attention(q, k, v, segments, rates, **options), q, k, v, grad_out)
    truth = with_grads(lambda q, k, v: reference.dilated_attention(q, k, v, segments, rates, **options), q, k, v,
                       grad_out)
    return max(rel_err(a, b) for a, b in zip(ours, truth))


# documents of length 1, shorter than a rate (2 < 3), exactly a segment (4, 8, 16), a segment plus one (5, 17), and
# longer than the largest segment (37: two whole segments of 16 and a tail of 5)
EDGE_LAYOUT = [0, 1, 3, 7, 15, 31, 36, 53, 90]


@pytest.mark.parametrize("head_mode", ["all", "groups"])
@pytest.mark.parametrize("causal", [False, True])
def test_edge_documents_match_the_reference(causal, head_mode):
    assert check_against_reference(*PAIRS, EDGE_LAYOUT, 2, 90, 6, 3, causal, head_mode, seed=0) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_random_layouts_match_the_reference(causal):
    rng = random.Random(1 if causal else 2)
    for trial in range(12):
        seq_len = rng.randint(2, 70)
        heads, kv_heads = rng.choice([(4, 2), (3, 3), (6, 2)])
        batch, head_mode = rng.choice([1, 2]), rng.choice(["all", "groups"])
        layout = random_layout(rng, seq_len, rng.randint(1, 7))
        per_row = batch == 2 and trial % 2 == 0
        cu_seqlens = [layout, random_layout(rng, seq_len, 3)] if per_row else torch.tensor(layout)
        err = check_against_reference(*PAIRS, cu_seqlens, batch, seq_len, heads, kv_heads, causal, head_mode, trial)
        assert err < 1e-10, (trial, layout, per_row)


def test_any_length_is_one_document_with_tails():
    for seq_len in (1, 2, 13, 37, 100):  # none of them a multiple of every segment
        assert check_against_reference(*PAIRS, None, 2, seq_len, 4, 2, True, "all", seq_len) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_each_document_gets_what_it_would_get_alone(causal):
    # packing invariance over random layouts (fixed seeds): forward and every gradient, row by row
    rng = random.Random(3)
    for trial in range(6):
        seq_len = rng.randint(20, 80)
        layout = random_layout(rng, seq_len, rng.randint(2, 6))
        q, k, v, grad_out = inputs(2, seq_len, 4, 2, trial)
        packed = with_grads(lambda q, k, v, layout=layout: ring_dilated_attention(
            q, k, v, *PAIRS, causal=causal, cu_seqlens=layout), q, k, v, grad_out)
        for start, end in zip(layout[:-1], layout[1:]):
            alone = with_grads(lambda q, k, v: ring_dilated_attention(q, k, v, *PAIRS, causal=causal),
                               *(t[:, start:end] for t in (q, k, v, grad_out)))
            for a, b in zip(packed, alone):  # relative to the whole tensor: a one-token document's dq is 0 +- 1e-17
                assert (a[:, start:end] - b).abs().max() < 1e-12 * a.abs().max()


def test_the_unpacked_path_is_unchanged_bit_for_bit():
    q, k, v, grad_out = inputs(2, 64, 4, 2, 5)
    unpacked = with_grads(lambda q, k, v: ring_dilated_attention(q, k, v, *PAIRS[:1], [1, 2, 4], causal=True),
                          q, k, v, grad_out)
    for one_document in ([0, 64], torch.tensor([0, 64]), [[0, 64], [0, 64]]):
        same = with_grads(lambda q, k, v, c=one_document: ring_dilated_attention(
            q, k, v, *PAIRS[:1], [1, 2, 4], causal=True, cu_seqlens=c), q, k, v, grad_out)
        assert all(torch.equal(a, b) for a, b in zip(same, unpacked))


def test_float32_matches_float64_and_bf16_runs():
    q, k, v, grad_out = inputs(2, 90, 6, 3, 7)
    call = lambda q, k, v: ring_dilated_attention(q, k, v, *PAIRS, causal=True, cu_seqlens=EDGE_LAYOUT)  # noqa: E731
    exact = with_grads(call, q, k, v, grad_out)
    single = with_grads(call, *(t.float() for t in (q, k, v)), grad_out.float())
    assert max(rel_err(a, b) for a, b in zip(single, exact)) < 1e-5
    half = with_grads(call, *(t.bfloat16() for t in (q, k, v)), grad_out.bfloat16())
    assert half[0].dtype == torch.bfloat16 and max(rel_err(a, b) for a, b in zip(half, exact)) < 2**-6


def test_strided_inputs_give_the_same_rows():
    q, k, v, grad_out = inputs(2, 50, 4, 4, 8)
    call = lambda q, k, v: ring_dilated_attention(q, k, v, *PAIRS, cu_seqlens=[0, 3, 21, 50])  # noqa: E731
    contiguous = with_grads(call, q, k, v, grad_out)
    leaves = [t.transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v)]  # [B, H, L, D] memory
    out = call(*(t.transpose(1, 2) for t in leaves))
    transposed = [out.detach(), *(g.transpose(1, 2) for g in torch.autograd.grad(out, leaves, grad_out))]
    assert max(rel_err(a, b) for a, b in zip(transposed, contiguous)) < 1e-13


@pytest.mark.parametrize("cu_seqlens, error, words", [
    ([1, 20, 40], ValueError, "cu_seqlens=[1, 20, 40] must start at 0"),
    ([0, 20, 39], ValueError, "cu_seqlens=[0, 20, 39] must end at the sequence length 40"),
    ([0, 20, 20, 40], ValueError, "must be strictly increasing: entry 2 (20) <= entry 1 (20)"),
    ([0, 25, 20, 40], ValueError, "must be strictly increasing: entry 2 (20) <= entry 1 (25)"),
    ([0, 20.0, 40], ValueError, "cu_seqlens must hold integers, got [0, 20.0, 40]"),
    (torch.tensor([0.0, 20.0, 40.0]), ValueError, "cu_seqlens must hold integers, got dtype torch.float32"),
    ([[0, 40], [0, 20, 40], [0, 40]], ValueError, "cu_seqlens has 3 rows of boundaries but the batch has 2 rows"),
    ([[0, 40], [0, 41]], ValueError, "cu_seqlens[1]=[0, 41] must end at the sequence length 40"),
    (torch.tensor([[0, 40], [0, 40]]), ValueError, "cu_seqlens must be 1-D, got a tensor of shape (2, 2)"),
    (torch.tensor([0, 40], device="meta"), ValueError, "cu_seqlens is on device meta but q is on cpu"),
    ([0], ValueError, "cu_seqlens=[0] needs at least two boundaries"),
    ("0, 40", TypeError, "cu_seqlens must be a 1-D integer tensor or a sequence of ints, got str"),
])
def test_bad_cu_seqlens_is_refused_by_name(cu_seqlens, error, words):
    q, k, v, _ = inputs(2, 40, 2, 2, 0)
    with pytest.raises(error) as info:
        ring_dilated_attention(q, k, v, *PAIRS, cu_seqlens=cu_seqlens)
    assert words in str(info.value)


def test_flash_attn_batch_convention_is_one_list_per_row():
    q, k, v, _ = inputs(2, 30, 4, 2, 10)
    per_row = ring_dilated_attention(q, k, v, *PAIRS, causal=True, cu_seqlens=[[0, 11, 30], [0, 4, 30]])
    flattened = ring_dilated_attention(q, k, v, *PAIRS, causal=True, cu_seqlens=torch.tensor([0, 11, 30, 34, 60]))
    assert torch.equal(per_row, flattened)
    with pytest.raises(ValueError, match=r"cu_seqlens=\[0, 11, 34, 60\] spans the 2 rows of 30 tokens laid end to end "
                                         r"\(flash-attn's convention\) but has no boundary at \[30\]"):
        ring_dilated_attention(q, k, v, *PAIRS, cu_seqlens=[0, 11, 34, 60])


def test_modules_take_cu_seqlens():
    q, k, v, _ = inputs(2, 30, 4, 2, 9)
    layout = [0, 11, 30]
    module = RingDilatedAttention(*PAIRS, causal=True)
    assert torch.equal(module(q, k, v, cu_seqlens=layout),
                       ring_dilated_attention(q, k, v, *PAIRS, causal=True, cu_seqlens=layout))
    mha = RingMultiheadDilatedAttention(16, 4, num_kv_heads=2, batch_first=True, dtype=torch.float64,
                                        segment_lengths=PAIRS[0], dilation_rates=PAIRS[1], causal=True)
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    packed, _ = mha(x, x, x, cu_seqlens=layout)
    for start, end in zip(layout[:-1], layout[1:]):
        assert rel_err(packed[:, start:end], mha(*(x[:, start:end],) * 3)[0]) < 1e-12


@pytest.mark.parametrize("float_mask", [False, True])
def test_trailing_key_padding_is_a_filler_document_with_zero_rows(float_mask):
    mha = RingMultiheadDilatedAttention(16, 4, batch_first=True, dtype=torch.float64, segment_lengths=PAIRS[0],
                                        dilation_rates=PAIRS[1], causal=True)
    x = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    real = [30, 19]  # row 1 is padded after 19 tokens
    padding = torch.arange(30).unsqueeze(0) >= torch.tensor(real).unsqueeze(1)
    mask = torch.zeros(2, 30, dtype=torch.float64).masked_fill(padding, -torch.inf) if float_mask else padding
    out, _ = mha(x, x, x, key_padding_mask=mask, cu_seqlens=[0, 7, 30])
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out[1, 19:], torch.zeros(11, 16, dtype=torch.float64))
    assert torch.equal(grad[1, 19:], torch.zeros(11, 16, dtype=torch.float64))  # padding reaches nothing
    alone = mha(*(x[1:, :19],) * 3, cu_seqlens=[0, 7, 19])[0]
    assert rel_err(out[1:, :19], alone) < 1e-12
    assert rel_err(out[:1], mha(*(x[:1],) * 3, cu_seqlens=[0, 7, 30])[0]) < 1e-12


@pytest.mark.parametrize("mask, words", [
    (torch.tensor([[False] * 10, [True] + [False] * 9]), "key_padding_mask row 1 is not trailing padding"),
    (torch.zeros(2, 10).masked_fill(torch.eye(2, 10, dtype=torch.bool), 0.5), "an additive bias per key"),
    (torch.zeros(2, 9, dtype=torch.bool), "key_padding_mask must be a [batch, seq] = [2, 10] tensor"),
])
def test_other_key_padding_masks_are_refused(mask, words):
    mha = RingMultiheadDilatedAttention(8, 2, batch_first=True, segment_lengths=[10], dilation_rates=[1])
    x = torch.randn(2, 10, 8)
    with pytest.raises(ValueError) as info:
        mha(x, x, x, key_padding_mask=mask)
    assert words in str(info.value)


def test_a_pair_without_rate_one_still_warns_once_per_plan():
    q, k, v, _ = inputs(1, 12, 2, 2, 0)
    with pytest.warns(UserWarning, match="no pair has dilation rate 1"):
        ring_dilated_attention(q, k, v, [4], [2], cu_seqlens=[0, 5, 12])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plan is cached: the same call does not warn again
        ring_dilated_attention(q, k, v, [4], [2], cu_seqlens=[0, 5, 12])
