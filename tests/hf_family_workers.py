"""The transformers model families and what ring_attention.hf does with each, as tiny random models (no download).

`FAMILIES` is the one list behind both tests/test_hf_families.py and the families table of docs/huggingface.md
(`table` renders its rows; a test checks the page holds them). `battery` runs on 2 gloo ranks, once for all
families and the packed batches of `hf_packing_workers` (`battery_on_two_ranks`: one start of the processes for
test_hf_families.py and test_hf_packing.py), and returns what each case gave: losses and gradients, or the error
every rank raised.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import hf_packing_workers as hp
import hf_workers as hw
import torch
import torch.distributed as dist
import transformers

import ring_attention.hf as hf
from lessons.launch import run_on_ranks
from ring_attention.hf import apply_ring_dilated_attention, shard_batch

EXACT, ONE_PROCESS, NOT_WITH_A_GROUP, TEXT_MODEL, REFUSED = (
    "exact", "exact on one process; refused with a process group", "refused with a process group",
    "exact: its text model", "refused")
_COMMON = dict(vocab_size=hw.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2 * hw.SEQ, attention_dropout=0.0,
               bos_token_id=1, eos_token_id=2, pad_token_id=None)  # token ids inside the tiny vocabulary
_FULL = ["full_attention"] * 2


@dataclass(frozen=True)
class Family:
    """A ``model_type``, what ring dilated attention does with it (its status and the page's note), how the tiny
    model is built, and for a refused one the error expected (raised by ``apply`` or by the forward)."""

    model_type: str
    status: str
    note: str
    config: dict = field(default_factory=dict)
    model_class: str = "AutoModelForCausalLM"
    error: tuple[type, str] | None = None
    refused_by: str = "forward"
    float32_weights: str = ""  # parameters the model itself computes with in float32 (see `tolerance`)

    def tolerance(self, parameter: str) -> float:
        """1e-10, or 1e-6 for a gradient the model computes in float32 even in a float64 model (Gemma's RMSNorm, a
        DeepSeek router): summed over two ranks' tokens instead of one process's, it rounds differently."""
        return 1e-6 if self.float32_weights and re.search(self.float32_weights, parameter) else 1e-10

    def build(self, device: str = "cpu") -> torch.nn.Module:
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(self.model_type, **self.config)
        cls = getattr(transformers, self.model_class)
        with torch.device(device):
            model = (cls.from_config(config) if self.model_class.startswith("Auto") else cls(config)).double()
        if hasattr(config, "n_routed_experts"):  # float64 experts need the eager implementation on CPU
            model.set_experts_implementation("eager")
        return model

    def target(self, model: torch.nn.Module) -> torch.nn.Module:
        """What to switch: the model, or a multimodal model's text model."""
        return model.model.language_model if self.status == TEXT_MODEL else model


def _small(**overrides) -> dict:
    return {**_COMMON, **overrides}


_MLA = dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=6, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
            first_k_dense_replace=1, n_group=1, topk_group=1)
_LLAVA = dict(text_config=dict(model_type="llama", **_COMMON),
              vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=16))
_NOT_ON_INTERFACE = TypeError, "is not on transformers' attention interface"

FAMILIES = [
    Family("llama", EXACT, "grouped-query heads (4 on 2)", _small()),
    Family("mistral", EXACT, "built or loaded with `sliding_window=None`", _small(sliding_window=None)),
    Family("qwen2", EXACT, "no sliding layers (the default; else `layer_types` all `\"full_attention\"`)", _small()),
    Family("qwen3", EXACT, "", _small(head_dim=8)),
    Family("gemma", EXACT, "its RMSNorm computes in float32: those gradients match to 1e-6", _small(head_dim=8),
           float32_weights="norm"),
    Family("gemma3_text", EXACT, "built or loaded with `layer_types` all `\"full_attention\"`; float32 RMSNorm "
           "as Gemma",
           _small(head_dim=8, layer_types=_FULL), float32_weights="norm"),
    Family("phi", EXACT, "partial rotary embeddings", _small()),
    Family("gpt_neox", EXACT, "", _small()),
    Family("olmo", EXACT, "", _small()),
    Family("olmo2", EXACT, "", _small()),
    Family("stablelm", EXACT, "packed documents and padding refused: its layers do not receive `cu_seq_lens_q`",
           _small()),
    Family("starcoder2", EXACT, "built or loaded with `sliding_window=None`", _small(sliding_window=None)),
    Family("gpt2", EXACT, "learned absolute positions (from `shard_batch`'s global `position_ids`)",
           dict(vocab_size=hw.VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=2 * hw.SEQ, attn_pdrop=0.0,
                resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    Family("deepseek_v3", EXACT, "multi-head latent attention: values zero-padded to the key head size inside, "
           "output cut back (more bytes sent); float32 router: its gradient matches to 1e-6", _small(**_MLA),
           float32_weights=r"mlp\.gate\.weight"),
    Family("llava", TEXT_MODEL, "multimodal: `apply_ring_dilated_attention(model.model.language_model, ...)`; "
           "text-only batches tested", _LLAVA, "LlavaForConditionalGeneration",
           (TypeError, r"has sub-models with their own configs .* apply_ring_dilated_attention\("
                       r"model.model.language_model, \.\.\.\)"), "apply"),
    Family("lfm2", ONE_PROCESS, "short convolutions beside attention see only a rank's slice (and would cross "
           "packed documents: refused)",
           _small(layer_types=["conv", "full_attention"]),
           error=(TypeError, "Lfm2ForCausalLM mixes the sequence with Lfm2ShortConv beside attention"),
           refused_by="apply"),
    Family("jamba", NOT_WITH_A_GROUP, "Mamba layers; one process: accepted, not tested", {},
           error=(TypeError, "JambaForCausalLM mixes the sequence with .*JambaMambaMixer"), refused_by="apply"),
    Family("qwen3_next", NOT_WITH_A_GROUP, "gated delta nets; one process: accepted, not tested", {},
           error=(TypeError, "Qwen3NextForCausalLM mixes the sequence with .*Qwen3NextGatedDeltaNet"),
           refused_by="apply"),
    Family("bloom", REFUSED, "not on the attention interface", dict(hidden_size=32, n_layer=2, n_head=4,
           vocab_size=hw.VOCAB), error=_NOT_ON_INTERFACE, refused_by="apply"),
    Family("gpt_neo", REFUSED, "not on the attention interface", dict(hidden_size=32, num_layers=2, num_heads=4,
           attention_types=[[["global", "local"], 1]], vocab_size=hw.VOCAB), error=_NOT_ON_INTERFACE,
           refused_by="apply"),
    Family("mpt", REFUSED, "not on the attention interface", dict(d_model=32, n_layers=2, n_heads=4,
           vocab_size=hw.VOCAB), error=_NOT_ON_INTERFACE, refused_by="apply"),
    Family("mamba", REFUSED, "no attention layer", dict(hidden_size=32, num_hidden_layers=2, vocab_size=hw.VOCAB),
           error=(TypeError, "none of its layers calls it"), refused_by="apply"),
    Family("gemma2", REFUSED, "attention logit soft-capping (`attn_logit_softcapping`)",
           _small(head_dim=8, layer_types=_FULL), error=(NotImplementedError, r"softcap=50\.0 .* is not supported")),
    Family("gpt_oss", REFUSED, "attention sinks", _small(head_dim=8, layer_types=_FULL, num_local_experts=4,
           num_experts_per_tok=2), error=(NotImplementedError, r"s_aux \(attention sinks")),
    Family("llama4_text", REFUSED, "chunked attention (`attention_chunk_size`)",
           _small(head_dim=8, intermediate_size_mlp=64, attention_chunk_size=16, num_local_experts=2,
                  num_experts_per_tok=1), error=(NotImplementedError, r"chunked attention of 16 tokens is not "
                                                 r"supported: .* layer_types=\['full_attention'\] \* 2")),
    Family("t5", REFUSED, "relative position bias (`position_bias`); every encoder-decoder: cross-attention",
           dict(vocab_size=hw.VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0),
           "T5EncoderModel", (NotImplementedError, r"position_bias \(an additive bias")),
    Family("bart", REFUSED, "cross-attention in the decoder; its encoder alone is exact (`model.get_encoder()`)",
           dict(vocab_size=hw.VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=2 * hw.SEQ,
                dropout=0.0, attention_dropout=0.0), "BartModel",
           (NotImplementedError, "cross-attention is not supported: BartAttention was called with key_value_states")),
]


def table() -> list[str]:
    """The families table of the Hugging Face page, its rows in `FAMILIES`' order."""
    return ["| `model_type` | with ring dilated attention | note |", "|---|---|---|",
            *(f"| `{f.model_type}` | {f.status} | {f.note} |" for f in FAMILIES)]


def family(model_type: str) -> Family:
    return next(f for f in FAMILIES if f.model_type == model_type)


def raised(fn, *args, **kwargs) -> tuple[str, str] | None:
    """The type and message of what ``fn(*args, **kwargs)`` raised (None if nothing): ranks report errors rather
    than die, so one run of the battery checks every case."""
    try:
        fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the test checks the type
        return type(error).__name__, str(error)
    return None


def battery(rank, world_size):
    """On 2 ranks: each exact family's loss and summed gradients with LongNet pairs that span ranks (the ring; Llama
    and Qwen2 also the all-gather, Llama with all-to-all and with gradients summed in many small buffers); what
    every rank raised for the inputs refused on the data of one rank only, and for hybrid models."""
    group = dist.group.WORLD
    results = {}
    for f in FAMILIES:
        if f.status in (EXACT, TEXT_MODEL):
            for comm in ("ring", "allgather") if f.model_type in ("llama", "qwen2") else ("ring",):
                model = f.build()
                apply_ring_dilated_attention(f.target(model), *hw.PAIRS, process_group=group, comm=comm)
                results[f.model_type, comm] = hw.loss_and_gradients(model, hw.batch(), group)
        elif f.status in (ONE_PROCESS, NOT_WITH_A_GROUP):
            model = f.build("meta")
            results[f.model_type] = raised(apply_ring_dilated_attention, model, *hw.PAIRS, process_group=group)
    model = family("llama").build()
    apply_ring_dilated_attention(model, *hw.PAIRS, process_group=group, comm="allgather", ulysses_size=2)
    results["llama", "ulysses"] = hw.loss_and_gradients(model, hw.batch(), group)
    model = family("llama").build()
    apply_ring_dilated_attention(model, *hw.PAIRS, process_group=group)
    limits = hf._SMALL_BYTES, hf._BUCKET_BYTES
    hf._SMALL_BYTES, hf._BUCKET_BYTES = 4096, 1024  # gradients alone in place, and small ones in many buffers
    results["llama", "small buckets"] = hw.loss_and_gradients(model, hw.batch(), group)
    hf._SMALL_BYTES, hf._BUCKET_BYTES = limits
    results["refused"] = refused_on_one_rank(model, group)
    results["packing"] = hp.on_ranks(group)
    return results


@functools.cache
def battery_on_two_ranks() -> list[dict]:
    """`battery`'s results on 2 gloo ranks, one per rank; run once per test session."""
    return run_on_ranks(battery, 2)


def refused_on_one_rank(model, group) -> dict:
    """Inputs whose fault only one rank sees, as a data loader hands them over: every rank must raise."""
    rank = dist.get_rank(group)
    ids, positions, _ = shard_batch(hw.batch(2), process_group=group)
    padding = torch.ones(2, hw.SEQ, dtype=torch.long)
    padding[1, -5:] = 0  # right padding: only the last rank's slice has zeros
    packed = torch.cat([torch.arange(40), torch.arange(24)]).expand(2, hw.SEQ)  # a second document from 40 on
    mask = shard_batch(padding, process_group=group)[0]
    _, packed, _, documents = shard_batch(hw.batch(2), position_ids=packed, process_group=group)
    # documents that differ in rank 1's half only: rank 0's positions fit both, so only the operator's check sees it
    other = torch.tensor([0, 40, 50, 64, 104, 128], dtype=torch.int32)
    shifted = packed + (rank == 1)  # rank 1's positions count from 1
    return {
        "padding": raised(model, input_ids=ids, position_ids=positions, attention_mask=mask),
        "no position_ids": raised(model, input_ids=ids),
        "packed": raised(model, input_ids=ids, position_ids=packed),
        "packed, no cache": raised(model, input_ids=ids, position_ids=packed, use_cache=False),
        "documents differ": raised(model, input_ids=ids, position_ids=packed,
                                   cu_seq_lens_q=other if rank == 0 else documents),
        "positions off": raised(model, input_ids=ids, position_ids=shifted, cu_seq_lens_q=documents),
        "not divisible": raised(shard_batch, hw.batch(2)[:, :63], process_group=group),
    }
