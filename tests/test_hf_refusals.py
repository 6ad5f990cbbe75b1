"""What `ring_attention.hf` refuses on one process: every input the operator would otherwise drop raises, with its
cause and what to do; what is harmless works. (Refusals that one rank's data causes, raised on every rank: in
test_hf_families.py, with the families refused as a whole.)"""

import copy

import hf_family_workers as fw
import hf_workers as hw
import pytest
import torch
from helpers import rel_err
from transformers import AttentionInterface, Qwen2ForCausalLM

from ring_attention.hf import apply_ring_dilated_attention


def switched_with_padding():
    """The tiny Llama switched to ring dilated attention, a batch, and a padding mask for it (row 0 ends padded)."""
    ids = hw.batch(2)
    model = hw.tiny()
    apply_ring_dilated_attention(model, *hw.PAIRS)
    padding = torch.ones_like(ids)
    padding[0, -4:] = 0
    return model, ids, padding


def test_the_operator_refuses_what_it_cannot_honour():
    model, ids, padding = switched_with_padding()
    with pytest.raises(NotImplementedError, match="a padding attention_mask is not supported"):
        model(input_ids=ids, attention_mask=padding)
    assert rel_err(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, model(input_ids=ids).logits) == 0
    with pytest.raises(NotImplementedError, match="as in generation with a key/value cache, are not supported"):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    dropping = hw.tiny(attention_dropout=0.1)
    apply_ring_dilated_attention(dropping, *hw.PAIRS)
    with pytest.raises(NotImplementedError, match="attention dropout=0.1 is not supported"):
        dropping(input_ids=ids)
    sliding = hw.tiny("mistral", sliding_window=16)
    apply_ring_dilated_attention(sliding, *hw.PAIRS)
    with pytest.raises(NotImplementedError, match=r"sliding_window=16 is not supported: the dilation pattern replaces "
                                                  r"the window: build or load the model with sliding_window=None"):
        sliding(input_ids=ids)
    packed = torch.cat([torch.arange(32), torch.arange(32)]).expand(2, 64)  # two sequences packed in one row
    for use_cache in (True, False):  # without a cache transformers also asks for a packed mask
        with pytest.raises(ValueError, match=r"position_ids restart inside a row \(packed documents\), but the "
                                             r"attention layers were given no documents"):
            model(input_ids=ids, position_ids=packed, use_cache=use_cache)
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel, got Linear"):
        apply_ring_dilated_attention(torch.nn.Linear(2, 2), [8], [1])


def test_a_refusal_ends_with_its_forward_whichever_module_is_called():
    """The masks of a forward are forgotten when it ends, also when the caller runs the decoder stack alone."""
    model, ids, padding = switched_with_padding()
    for forward in (model, model.model):
        clean = forward(input_ids=ids)[0]  # the logits, or the decoder stack's hidden states
        for _ in range(2):
            with pytest.raises(NotImplementedError, match="a padding attention_mask is not supported"):
                forward(input_ids=ids, attention_mask=padding)
            assert rel_err(forward(input_ids=ids)[0], clean) == 0


def test_every_keyword_is_used_harmless_or_refused():
    model = hw.tiny()
    forward = AttentionInterface()[apply_ring_dilated_attention(model, [hw.SEQ], [1])]
    layer = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, hw.SEQ, 8, generator=gen, dtype=torch.float64) for heads in (4, 2, 2))
    plain = forward(layer, q, k, v, None)[0]
    harmless = dict(use_cache=True, num_items_in_batch=torch.tensor(9), output_attentions=False, position_bias=None,
                    position_ids=torch.arange(hw.SEQ)[None], sliding_window=None, softcap=None, max_length_q=64,
                    max_length_k=64, cu_seq_lens_q=torch.tensor([0, hw.SEQ]), cu_seq_lens_k=torch.tensor([0, hw.SEQ]))
    assert torch.equal(forward(layer, q, k, v, None, **harmless)[0], plain)
    refused = [
        (NotImplementedError, dict(position_bias=torch.zeros(1, 4, hw.SEQ, hw.SEQ)), r"position_bias \(an additive"),
        (NotImplementedError, dict(s_aux=torch.zeros(4)), r"s_aux \(attention sinks, as in gpt-oss\)"),
        (NotImplementedError, dict(sinks=torch.zeros(4)), r"sinks \(attention sinks\) is not supported"),
        (NotImplementedError, dict(output_attentions=True), "output_attentions=True is not supported"),
        (NotImplementedError, dict(softcap=50.0), r"softcap=50.0 \(attention logit soft-capping\)"),
        (NotImplementedError, dict(sliding_window=16), r"sliding_window=16 is not supported: .* sliding_window=None"),
        (TypeError, dict(indices=torch.zeros(3)), r"passed indices=a tensor of shape \(3,\), which ring dilated "
                                                  r"attention does not use"),
        (TypeError, dict(chunk_size=16), "passed chunk_size=16, which ring dilated attention does not use"),
    ]
    for kind, keywords, message in refused:
        with pytest.raises(kind, match=message):
            forward(layer, q, k, v, None, **keywords)
    with pytest.raises(NotImplementedError, match=r"an attention_mask of shape \(1, 1, 64, 64\) is not supported"):
        forward(layer, q, k, v, torch.ones(1, 1, hw.SEQ, hw.SEQ, dtype=torch.bool))
    # through the model: what a caller passes reaches the layers
    ids = hw.batch(2)
    with pytest.raises(NotImplementedError, match="output_attentions=True is not supported"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(TypeError, match=r"passed extra=a tensor of shape \(2,\)"):
        model(input_ids=ids, extra=torch.zeros(2))


def test_unequal_key_and_value_head_sizes_are_exact():
    """Multi-head latent attention (DeepSeek-V2/V3, whose model is in test_hf_families.py) has narrower values than
    keys: both ways round, the zero columns added inside change nothing."""
    model = hw.tiny()
    forward = AttentionInterface()[apply_ring_dilated_attention(model, [hw.SEQ], [1])]
    gen = torch.Generator().manual_seed(0)
    for qk_dim, v_dim in ((12, 8), (8, 12)):
        q = torch.randn(2, 4, hw.SEQ, qk_dim, generator=gen, dtype=torch.float64)
        k = torch.randn(2, 2, hw.SEQ, qk_dim, generator=gen, dtype=torch.float64)
        v = torch.randn(2, 2, hw.SEQ, v_dim, generator=gen, dtype=torch.float64)
        out = forward(model.model.layers[0].self_attn, q, k, v, None, scaling=0.3)[0]  # [B, L, H, D_v]
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
        assert out.shape == (2, hw.SEQ, 4, v_dim) and rel_err(out, expected.transpose(1, 2)) < 1e-12


def test_a_layer_that_missed_the_switch_is_refused_and_the_model_switched_back():
    model = hw.tiny()
    model.model.layers[1].self_attn.config = copy.deepcopy(model.config)  # a config the switch does not reach
    with pytest.raises(TypeError, match="LlamaForCausalLM is not on transformers' attention interface: after the "
                                        "switch, LlamaAttention still read another attention implementation"):
        apply_ring_dilated_attention(model, *hw.PAIRS)
    assert model.config._attn_implementation == "sdpa"


def test_an_encoder_decoders_encoder_alone_is_exact():
    model = fw.family("bart").build()  # its decoder's cross-attention is refused (test_hf_families.py)
    encoder, ids = model.get_encoder(), hw.batch(2)
    expected = encoder(input_ids=ids).last_hidden_state
    apply_ring_dilated_attention(encoder, [hw.SEQ], [1])
    assert rel_err(encoder(input_ids=ids).last_hidden_state, expected) < 1e-10


def test_the_sliding_window_advice_works_on_qwen2(tmp_path):
    ids = hw.batch(2)
    sliding = hw.tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)  # every layer slides
    apply_ring_dilated_attention(sliding, [hw.SEQ], [1])
    advice = "layer_types=['full_attention'] * 2"
    with pytest.raises(NotImplementedError, match=r"sliding_window=16 is not supported: the dilation pattern replaces "
                                                  r"the window: build or load the model with every layer full, "
                                                  + advice.replace("[", r"\[").replace("*", r"\*")):
        sliding(input_ids=ids)
    sliding.save_pretrained(tmp_path)
    full = Qwen2ForCausalLM.from_pretrained(tmp_path, layer_types=["full_attention"] * 2, dtype=torch.float64)
    full.set_attn_implementation("sdpa")
    expected = full(input_ids=ids).logits
    apply_ring_dilated_attention(full, [hw.SEQ], [1])
    assert rel_err(full(input_ids=ids).logits, expected) < 1e-10
