"""Stage 5, the production package: API, grouped-query attention, mixed precision, composition with PyTorch."""

import production_workers as pw
import pytest
import torch
from helpers import random_qkv, rel_err
from torch import nn

import reference
from lessons.launch import run_on_ranks
from ring_attention import RingDilatedAttention, RingMultiheadDilatedAttention, ring_dilated_attention
from ring_attention.documents import documents_fingerprint


def with_grads(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))]


SEGMENTS, RATES = [16, 64], [1, 4]


@pytest.mark.parametrize("head_mode", ["all", "groups"])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_one_process_matches_oracle(causal, head_mode):
    q, k, v = random_qkv(2, 64, 6, 8, kv_heads=3)
    grad_out = torch.randn(2, 64, 6, 8, dtype=torch.float64)
    options = dict(causal=causal, head_mode=head_mode)
    ours = with_grads(lambda q, k, v: ring_dilated_attention(q, k, v, SEGMENTS, RATES, **options), q, k, v, grad_out)
    truth = with_grads(lambda q, k, v: reference.dilated_attention(q, k, v, SEGMENTS, RATES, **options),
                       q, k, v, grad_out)
    for a, b in zip(ours, truth):
        assert rel_err(a, b) < 1e-10


def in_layout(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, view)``: a tensor that requires grad, and a view of it with ``x``'s values in ``layout``."""
    if layout == "contiguous":
        leaf = x.clone().requires_grad_(True)
        return leaf, leaf
    if layout == "transposed":  # [B, H, L, D] memory, as Hugging Face hands it over
        leaf = x.transpose(1, 2).contiguous().requires_grad_(True)
        return leaf, leaf.transpose(1, 2)
    if layout == "packed":  # one of q, k, v packed along a dimension of one projection's output
        leaf = torch.stack([torch.zeros_like(x), x], dim=2).requires_grad_(True)
        return leaf, leaf[:, :, 1]
    if layout == "head-dim slice":
        leaf = torch.cat([x, torch.zeros_like(x)], dim=-1).requires_grad_(True)
        return leaf, leaf[..., : x.shape[-1]]
    leaf = x[:1].clone().requires_grad_(True)  # "expanded": one batch row for all, stride 0
    return leaf, leaf.expand(*x.shape)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "packed", "head-dim slice", "expanded"])
@pytest.mark.parametrize("causal", [False, True])
def test_any_input_layout_gives_the_same_rows_and_gradients(layout, causal):
    # batch 2 and a pair with 4 pieces per shard: views must split the length of whatever strides come in
    q, k, v = random_qkv(2, 128, 4, 16, kv_heads=2)
    if layout == "expanded":
        q, k, v = (t[:1].expand(*t.shape) for t in (q, k, v))
    grad_out = torch.randn(2, 128, 4, 16, dtype=torch.float64)
    results = []
    for attention in (ring_dilated_attention, reference.dilated_attention):
        leaves, views = zip(*(in_layout(t, layout) for t in (q, k, v)))
        out = attention(*views, [32, 128], [1, 4], causal=causal)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad_out)])
    for ours, truth in zip(*results):
        assert rel_err(ours, truth) < 1e-10


def test_any_input_layout_on_two_ranks():
    q, k, v = random_qkv(2, 256, 4, 16, kv_heads=2, seed=3)
    grad_out = torch.randn(2, 256, 4, 16, dtype=torch.float64)
    layouts = ["contiguous", "transposed", "packed", "head-dim slice"]
    per_rank = run_on_ranks(pw.input_layouts, 2, q, k, v, grad_out, layouts)
    truth = with_grads(lambda q, k, v: reference.dilated_attention(q, k, v, [32, 256], [1, 4], causal=True),
                       q, k, v, grad_out)
    for layout in layouts:
        for j, want in enumerate(truth):  # (256, 4) spans both ranks: its rows travel
            assert rel_err(torch.cat([r[layout][j] for r in per_rank], dim=1), want) < 1e-10, (layout, j)


@pytest.fixture(scope="module")
def four_rank_cases():
    """GQA in float64 and plain attention in bf16, on 4 ranks: both communication modes, alone and with all-to-all
    over heads (in pairs of ranks, and across all 4)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 64, h, 8, generator=gen, dtype=torch.float64) for h in (8, 4, 4))
    grad_out = torch.randn(2, 64, 8, 8, generator=gen, dtype=torch.float64)
    q16, k16, v16, g16 = (torch.randn(2, 64, 4, 16, generator=gen, dtype=torch.float64) for _ in range(4))
    cases = [
        (q, k, v, grad_out, dict(segment_lengths=SEGMENTS, dilation_rates=RATES, causal=True)),
        (q, k, v, grad_out, dict(segment_lengths=SEGMENTS, dilation_rates=RATES, head_mode="groups")),
        (q16.bfloat16(), k16.bfloat16(), v16.bfloat16(), g16.bfloat16(),
         dict(segment_lengths=SEGMENTS, dilation_rates=RATES, causal=True)),
    ]
    return cases, run_on_ranks(pw.gqa_and_bf16, 4, cases)


def test_gqa_on_four_ranks_matches_oracle(four_rank_cases):
    cases, per_rank = four_rank_cases
    for i, (q, k, v, grad_out, options) in enumerate(cases[:2]):
        truth = with_grads(lambda q, k, v: reference.dilated_attention(q, k, v, **options), q, k, v,  # noqa: B023
                           grad_out)
        for variant in pw.VARIANTS:
            for j, want in enumerate(truth):
                got = torch.cat([r[i][variant][j] for r in per_rank], dim=1)
                assert rel_err(got, want) < 1e-10, (i, variant, j)


def test_bf16_ring_error_is_within_1_5x_of_one_process(four_rank_cases):
    cases, per_rank = four_rank_cases
    q, k, v, grad_out, options = cases[2]
    truth = with_grads(lambda q, k, v: reference.dilated_attention(q, k, v, SEGMENTS, RATES, causal=True),
                       q.double(), k.double(), v.double(), grad_out.double())
    single = with_grads(lambda q, k, v: ring_dilated_attention(q, k, v, **options), q, k, v, grad_out)
    for variant in pw.VARIANTS:
        for j, want in enumerate(truth):
            ranks = torch.cat([r[2][variant][j] for r in per_rank], dim=1)
            assert ranks.dtype == torch.bfloat16
            assert rel_err(ranks, want) <= 1.5 * rel_err(single[j], want), (variant, j)


@pytest.mark.parametrize("batch_first", [False, True])
def test_module_equals_nn_multihead_attention_in_the_degenerate_case(batch_first):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=batch_first, dtype=torch.float64)
    ours = RingMultiheadDilatedAttention(16, 4, batch_first=batch_first, dtype=torch.float64,
                                         segment_lengths=[24], dilation_rates=[1])
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn((3, 24, 16) if batch_first else (24, 3, 16), dtype=torch.float64)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(24, dtype=torch.float64)
    for is_causal, mask in ((False, None), (True, causal_mask)):
        expected, _ = theirs(x, x, x, need_weights=False, attn_mask=mask, is_causal=is_causal)
        out, weights = ours(x, x, x, is_causal=is_causal)
        assert weights is None
        assert rel_err(out, expected) < 1e-10


def test_separate_projections_load_from_nn_multihead_attention():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, kdim=8, vdim=12, batch_first=True, dtype=torch.float64)
    ours = RingMultiheadDilatedAttention(16, 4, kdim=8, vdim=12, batch_first=True, dtype=torch.float64,
                                         segment_lengths=[24], dilation_rates=[1])
    ours.load_state_dict(theirs.state_dict())
    q, k, v = (torch.randn(2, 24, d, dtype=torch.float64) for d in (16, 8, 12))
    assert rel_err(ours(q, k, v)[0], theirs(q, k, v, need_weights=False)[0]) < 1e-10


def test_gqa_module_has_smaller_kv_projections():
    module = RingMultiheadDilatedAttention(16, 4, num_kv_heads=2, segment_lengths=[8], dilation_rates=[1])
    assert module.in_proj_weight is None
    assert module.k_proj_weight.shape == (8, 16) and module.in_proj_bias.shape == (16 + 8 + 8,)


def test_sub_layer_norm_sits_before_the_output_projection():
    module = RingMultiheadDilatedAttention(16, 4, batch_first=True, segment_lengths=[8], dilation_rates=[1],
                                           sub_layer_norm=True)
    assert {"inner_norm.weight", "inner_norm.bias"} <= module.state_dict().keys()
    with torch.no_grad():
        module.inner_norm.weight.zero_()
        module.out_proj.bias.copy_(torch.arange(16.0))
    out, _ = module(*(torch.randn(2, 8, 16),) * 3)
    assert torch.equal(out, torch.arange(16.0).expand(2, 8, 16))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dropout=0.1), "dropout=0.1 is not supported"),
        (dict(add_bias_kv=True), "add_bias_kv and add_zero_attn are not supported"),
        (dict(add_zero_attn=True), "add_bias_kv and add_zero_attn are not supported"),
    ],
)
def test_rejected_constructor_options(kwargs, words):
    with pytest.raises(NotImplementedError, match=words):
        RingMultiheadDilatedAttention(16, 4, segment_lengths=[8], dilation_rates=[1], **kwargs)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(need_weights=True), "need_weights=True is not supported"),
        (dict(attn_mask=torch.zeros(8, 8, dtype=torch.bool)),
         "attn_mask is not supported except for the causal mask: .* use causal=True"),
    ],
)
def test_rejected_forward_options(kwargs, words):
    module = RingMultiheadDilatedAttention(16, 4, batch_first=True, segment_lengths=[8], dilation_rates=[1])
    x = torch.randn(2, 8, 16)
    with pytest.raises(NotImplementedError, match=words):
        module(x, x, x, **kwargs)


def test_a_key_padding_mask_without_padding_changes_nothing():
    module = RingMultiheadDilatedAttention(16, 4, batch_first=True, segment_lengths=[8], dilation_rates=[1])
    x = torch.randn(2, 8, 16)
    out, _ = module(x, x, x, key_padding_mask=torch.zeros(2, 8, dtype=torch.bool))
    assert torch.equal(out, module(x, x, x)[0])


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda q: ring_dilated_attention(q, q, q, [8], [1], comm="p2p"), ValueError, "comm must be one of"),
        (lambda q: ring_dilated_attention(q, q, q, 8, [1]), TypeError,
         "segment_lengths must be a list of positive ints, got 8"),
        (lambda q: ring_dilated_attention(q, q, q, [8], [1], scale=-1.0), ValueError, "scale must be a positive"),
        (lambda q: ring_dilated_attention(q, q, q, [8], [1], load_balance="yes"), TypeError,
         "load_balance must be True or False, got 'yes'"),
        (lambda q: ring_dilated_attention(q, q, q, [8], [1], ulysses_size=0), ValueError,
         "ulysses_size must be a positive int, got 0"),
        (lambda q: ring_dilated_attention(q, q, q, [8], [1], group="world"), TypeError,
         "group must be a ProcessGroup, a 1-D DeviceMesh or None, got str"),
        (lambda q: ring_dilated_attention(q, q[:, :, :3], q[:, :, :3], [8], [1]), ValueError,
         "k has 3 heads, which does not divide q's 4 heads"),
        (lambda q: ring_dilated_attention(q, q, q, [8], [1], backend="cuda_flash"), ValueError,
         "backend='cuda_flash' cannot run here"),
        (lambda q: RingMultiheadDilatedAttention(16, 4, num_kv_heads=3, segment_lengths=[8], dilation_rates=[1]),
         ValueError, "num_kv_heads=3 must divide num_heads=4"),
        (lambda q: RingMultiheadDilatedAttention(18, 4, segment_lengths=[8], dilation_rates=[1]), ValueError,
         "embed_dim=18 must be divisible by num_heads=4"),
        (lambda q: RingMultiheadDilatedAttention(16, 4, segment_lengths=[8], dilation_rates=[1])(q, q, q),
         ValueError, r"query must be 3-D"),
    ],
)
def test_bad_arguments(call, exc, words):
    with pytest.raises(exc, match=words):
        call(torch.zeros(1, 8, 4, 4))


def test_autocast_runs_in_bf16_close_to_float32():
    torch.manual_seed(0)
    module = RingMultiheadDilatedAttention(32, 4, batch_first=True, segment_lengths=[16, 64], dilation_rates=[1, 4],
                                           causal=True)
    x = torch.randn(2, 64, 32)
    full, _ = module(x, x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = module(x, x, x)
    assert low.dtype == torch.bfloat16
    assert rel_err(low, full) < 2**-5  # a few bf16 roundings (2^-8 each) through projections and attention


def test_module_form_of_the_functional_core():
    q, k, v = random_qkv(1, 64, 4, 8)
    module = RingDilatedAttention(SEGMENTS, RATES, causal=True)
    assert torch.equal(module(q, k, v), ring_dilated_attention(q, k, v, SEGMENTS, RATES, causal=True))
    assert "segment_lengths=[16, 64]" in repr(module)


def test_checkpointing_gives_the_same_gradients():
    plain, checkpointed = run_on_ranks(pw.checkpointed_and_plain_gradients, 2)[0]
    for a, b in zip(plain, checkpointed):
        assert rel_err(b, a) < 1e-12


def test_data_times_sequence_parallel_training_reproduces_one_process():
    expected_losses, expected_params = pw.train_single_process()
    per_rank = run_on_ranks(pw.train_data_and_sequence_parallel, 4)
    for losses, params in per_rank:
        assert losses == pytest.approx(expected_losses, rel=1e-10, abs=0)
        for name, value in params.items():
            assert rel_err(value, expected_params[name]) < 1e-10, name
    assert expected_losses[2] < expected_losses[0]  # it trained


def test_all_to_all_inside_a_two_dimensional_mesh():
    results = run_on_ranks(pw.all_to_all_in_a_mesh, 8)
    for rank, (q, k, v, rows) in enumerate(results):
        expected = reference.dilated_attention(q, k, v, [16, 64], [1, 2], causal=True).chunk(4, dim=1)[rank % 4]
        assert rel_err(rows["torch.float64"], expected) < 1e-10
        assert rel_err(rows["torch.bfloat16"], expected) < 2**-5


def test_a_one_dimensional_mesh_is_a_sequence_group():
    results = run_on_ranks(pw.mesh_sequence_group, 4)
    for rank, (q, k, v, out, two_d_error) in enumerate(results):
        expected = reference.dilated_attention(q, k, v, pw.SEGMENTS, pw.RATES, causal=True)
        assert rel_err(out, expected.chunk(2, dim=1)[rank % 2]) < 1e-10
        assert two_d_error.startswith("group must be a 1-D DeviceMesh, got a 2-D mesh ('dp', 'sp'): pass the "
                                      "sequence dimension, e.g. mesh['sp']")


def test_a_transformer_encoder_of_dilated_layers_on_two_ranks_equals_one_process():
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected, expected_eval = pw.transformer_encoder(0, 1, x)
    assert rel_err(expected_eval, expected) < 1e-12
    per_rank = run_on_ranks(pw.transformer_encoder, 2, x)
    for mode in (0, 1):
        assert rel_err(torch.cat([r[mode] for r in per_rank], dim=1), expected) < 1e-10


def test_a_bad_sequence_group_fails_with_the_same_error_on_every_rank():
    per_rank = run_on_ranks(pw.bad_sequence_groups, 2, timeout=120)
    assert per_rank[0] == per_rank[1]  # every rank raised, with the same message
    errors = per_rank[0]
    fingerprints = [documents_fingerprint(((0, 5 + rank, 32),)) for rank in range(2)]
    assert errors["documents"] == (
        f"the q/k shards or the cu_seqlens differ between the ranks of the sequence group (rank 0: q [1, 16, 2, 4] "
        f"k [1, 16, 2, 4] torch.float32 cpu documents #{fingerprints[0]:x}, rank 1: q [1, 16, 2, 4] k [1, 16, 2, 4] "
        f"torch.float32 cpu documents #{fingerprints[1]:x}): every rank must pass its own equal-length slice of the "
        f"same sequence, with the same dtype, device type and documents (cu_seqlens over the whole sequence, the "
        f"same on every rank)")
    assert errors["shapes"] == (
        "the q/k shards or the cu_seqlens differ between the ranks of the sequence group (rank 0: q [1, 16, 2, 4] "
        "k [1, 16, 2, 4] torch.float32 cpu, rank 1: q [1, 8, 2, 4] k [1, 8, 2, 4] torch.float32 cpu): every rank must "
        "pass its own equal-length slice of the same sequence, with the same dtype, device type and documents "
        "(cu_seqlens over the whole sequence, the same on every rank)")
    assert errors["ulysses_size 3"] == ("ulysses_size=3 must divide the sequence group size 2: use a divisor of 2 "
                                        "(1 for the ring alone, 2 for all-to-all alone)")
    assert errors["ulysses_size 2, 3 heads"] == ("ulysses_size=2 must divide num_heads=3: each rank of a sub-group "
                                                 "takes num_heads / ulysses_size heads")
    assert errors["dtypes"] == (
        "the q/k shards or the cu_seqlens differ between the ranks of the sequence group (rank 0: q [1, 16, 2, 4] "
        "k [1, 16, 2, 4] torch.float32 cpu, rank 1: q [1, 16, 2, 4] k [1, 16, 2, 4] torch.float64 cpu): every rank "
        "must pass its own equal-length slice of the same sequence, with the same dtype, device type and documents "
        "(cu_seqlens over the whole sequence, the same on every rank)")


def test_gather_sequence_returns_each_rank_its_slice_of_the_gradient():
    results = run_on_ranks(pw.gather_round_trip, 2)
    weights = torch.arange(24.0).reshape(1, 24, 1)
    for rank, (full, grad, uneven_error) in enumerate(results):
        assert uneven_error == ("sequence length 5 (dim=1) must be divisible by the sequence group size 2: "
                                "pad the sequence")
        assert torch.equal(full, weights)
        expected = torch.zeros(1, 24, 1)
        expected[:, 12 * rank: 12 * (rank + 1)] = weights[:, 12 * rank: 12 * (rank + 1)]
        assert torch.equal(grad, expected)


def test_key_padding_across_ranks_equals_one_process():
    # row 0 is padded from token 20 (inside rank 1's slice), row 1 from 16 (exactly rank 1's first token)
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    alone_out, alone_grad = pw.padded_module(0, 1, x, [20, 16])
    per_rank = run_on_ranks(pw.padded_module, 2, x, [20, 16])
    assert rel_err(torch.cat([r[0] for r in per_rank], dim=1), alone_out) < 1e-12
    assert rel_err(torch.cat([r[1] for r in per_rank], dim=1), alone_grad) < 1e-12
    assert torch.equal(alone_out[0, 20:], torch.zeros(12, 16, dtype=torch.float64))


def test_bad_documents_on_one_rank_fail_on_every_rank():
    per_rank = run_on_ranks(pw.one_rank_with_bad_documents, 2, timeout=120)
    assert per_rank[1]["cu_seqlens"] == ("cu_seqlens=[0, 33] must end at the sequence length 32, got 33: "
                                         "boundaries are over the whole (global) sequence; pad it with a filler "
                                         "document if needed")
    assert per_rank[0]["cu_seqlens"].startswith("the q/k shards or the cu_seqlens differ between the ranks")
    assert per_rank[1]["key_padding_mask"].startswith("key_padding_mask must be boolean (True at padding) or a "
                                                      "float mask of 0 and -inf")
    assert per_rank[0]["key_padding_mask"] == "key_padding_mask was refused on another rank of the sequence group"
