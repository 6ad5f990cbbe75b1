"""`RingMultiheadDilatedAttention` as the ``self_attn`` of PyTorch's own Transformer layers, in every mode.

In evaluation without autograd, ``nn.TransformerEncoderLayer`` has a fast path that skips ``self_attn.forward``
and computes dense attention from the projection weights; these tests prove the layers compute *dilated*
attention in training, in ``eval()`` under ``no_grad`` and under ``inference_mode`` alike.
"""

import copy

import pytest
import torch
from helpers import rel_err
from torch import nn

from ring_attention import RingMultiheadDilatedAttention
from ring_attention.modules import is_causal_mask

D_MODEL, HEADS, SEQ = 16, 4, 32
PAIRS = dict(segment_lengths=[8, 32], dilation_rates=[1, 4])


def dilated_like(mha: nn.MultiheadAttention, causal: bool) -> RingMultiheadDilatedAttention:
    """A dilated module with ``mha``'s weights."""
    ours = RingMultiheadDilatedAttention(D_MODEL, HEADS, batch_first=mha.batch_first, dtype=torch.float64,
                                         causal=causal, **PAIRS)
    ours.load_state_dict(mha.state_dict())
    return ours


def layer_pair(kind: str, causal: bool):
    """(dense layer, the same layer with dilated self-attention), same weights, dropout 0."""
    torch.manual_seed(0)
    options = dict(dim_feedforward=32, dropout=0.0, batch_first=True, dtype=torch.float64)
    if kind == "encoder":
        dense = nn.TransformerEncoderLayer(D_MODEL, HEADS, **options)
    elif kind == "decoder":
        dense = nn.TransformerDecoderLayer(D_MODEL, HEADS, **options)
    else:
        dense = nn.Transformer(D_MODEL, HEADS, num_encoder_layers=2, num_decoder_layers=2, **options)
    dilated = copy.deepcopy(dense)
    for module in dilated.modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            module.self_attn = dilated_like(module.self_attn, causal)
    return dense, dilated


def run(layer, kind, x, memory, mask):
    if kind == "encoder":
        return layer(x, src_mask=mask, is_causal=mask is not None)
    if kind == "decoder":
        return layer(x, memory, tgt_mask=mask, tgt_is_causal=mask is not None)
    return layer(memory, x, tgt_mask=mask, tgt_is_causal=mask is not None)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "transformer"])
def test_layer_computes_dilated_attention_in_training_and_in_evaluation(kind, causal):
    dense, dilated = layer_pair(kind, causal)
    gen = torch.Generator().manual_seed(1)
    x, memory = (torch.randn(2, SEQ, D_MODEL, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = nn.Transformer.generate_square_subsequent_mask(SEQ, dtype=torch.float64) if causal else None

    dilated.train()
    training = run(dilated, kind, x, memory, mask)
    dilated.eval()
    with torch.no_grad():
        no_grad = run(dilated, kind, x, memory, mask)
    with torch.inference_mode():
        inference = run(dilated, kind, x, memory, mask)
    assert rel_err(no_grad, training) < 1e-12
    assert rel_err(inference, training) < 1e-12

    dense.eval()
    with torch.no_grad():
        dense_out = run(dense, kind, x, memory, mask)
    assert rel_err(no_grad, dense_out) > 1e-2  # the dilation pattern is really used


def test_the_encoder_fast_path_is_declined():
    _, dilated = layer_pair("encoder", causal=False)
    assert dilated.self_attn._qkv_same_embed_dim is False
    assert dilated.self_attn.in_proj_weight is not None  # the parameters are packed all the same


@pytest.mark.parametrize("batch_first", [False, True])
def test_a_causal_mask_means_causal(batch_first):
    torch.manual_seed(0)
    module = RingMultiheadDilatedAttention(D_MODEL, HEADS, batch_first=batch_first, dtype=torch.float64, **PAIRS)
    x = torch.randn((2, SEQ, D_MODEL) if batch_first else (SEQ, 2, D_MODEL), dtype=torch.float64)
    causal = module(x, x, x, is_causal=True)[0]
    float_mask = nn.Transformer.generate_square_subsequent_mask(SEQ, dtype=torch.float64)
    bool_mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    assert torch.equal(module(x, x, x, attn_mask=float_mask)[0], causal)
    assert torch.equal(module(x, x, x, attn_mask=bool_mask)[0], causal)
    assert rel_err(module(x, x, x)[0], causal) > 1e-2


@pytest.mark.parametrize(
    "mask",
    [torch.zeros(SEQ, SEQ, dtype=torch.bool), torch.ones(SEQ, SEQ, dtype=torch.bool).triu(2),
     torch.zeros(SEQ, SEQ).masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), -1e9),
     torch.ones(SEQ - 1, SEQ - 1, dtype=torch.bool).triu(1)],
    ids=["none-masked", "shifted", "large-negative", "wrong-length"],
)
def test_any_other_mask_is_refused(mask):
    module = RingMultiheadDilatedAttention(D_MODEL, HEADS, batch_first=True, **PAIRS)
    x = torch.randn(2, SEQ, D_MODEL)
    assert not is_causal_mask(mask, SEQ)
    with pytest.raises(NotImplementedError, match="attn_mask is not supported except for the causal mask"):
        module(x, x, x, attn_mask=mask)
