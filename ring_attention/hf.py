"""Hugging Face ``transformers`` models with ring dilated attention, trained sequence-parallel (extra ``hf``).

The recipe in a training script (see the "Hugging Face models" page): one import, the switch once, and three
lines per step, with the model called with ``position_ids`` and without ``labels``::

    apply_ring_dilated_attention(model, [2048, 8192], [1, 4], process_group=sp)
    input_ids, position_ids, labels = shard_batch(batch["input_ids"], batch["labels"], process_group=sp)
    logits = model(input_ids=input_ids, position_ids=position_ids).logits
    loss = sequence_parallel_loss(logits, labels, process_group=sp)
    loss.backward()
    sum_gradients(model, sp)  # under FSDP over the data ranks; under DDP multiply the loss by sp's size instead

`apply_ring_dilated_attention` registers an attention function with ``transformers``' own attention interface
(``AttentionInterface.register``, and a mask function that makes no mask with ``AttentionMaskInterface``) under a
name that belongs to that model, switches the model to it and checks that every attention layer took the switch:
a model whose layers compute attention their own way, a multimodal model (apply it to its text model), or, under a
process group, a model with other sequence mixers (Mamba, linear attention, convolutions) is refused by name.
Every input the operator cannot honour raises with what to do, and the inputs that depend on the data (a padding
mask, positions) are refused on every rank of the sequence group together, so no rank is left waiting.

`shard_batch` gives each rank its contiguous slice of the tokens, their global positions (for rotary
embeddings) and labels shifted *before* sharding, so the last token of a slice predicts the first of the next.
`sequence_parallel_loss` is this rank's share of the mean over the whole sequence: summed over the sequence
ranks, it is the single-process loss (and so are the gradients: sum them over the sequence ranks, see
`sum_gradients`).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import re
import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ring_attention.comm import GroupLike, group_rank_and_size, resolve_group, shard_sequence
from ring_attention.functional import ring_dilated_attention

try:
    from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function
except ImportError as error:  # the package imports without the extra; this module needs it
    raise ImportError("ring_attention.hf needs transformers: pip install 'ring-attention[hf]'") from error

IGNORE_INDEX = -100
_NAMES = itertools.count()
_OURS: set[str] = set()  # the attention-implementation names this module registered

# --- what the attention function accepts, in one place ----------------------------------------------------------------
# keywords transformers' layers pass that change nothing in the attention itself
_HARMLESS = frozenset({"use_cache", "output_hidden_states", "output_router_logits", "num_items_in_batch"})
# keywords that say where packed documents start: refused until packed inputs are supported (DESIGN.md §10), by
# `_packing_problem`, with position_ids that restart inside a row: the one place to change
_PACKING = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
_REFUSED = {
    "position_bias": "position_bias (an additive bias on the attention scores, as T5's relative positions) is not "
                     "supported: the kernels compute plain softmax attention; use a model with rotary or absolute "
                     "position embeddings",
    "s_aux": "s_aux (attention sinks, as in gpt-oss) is not supported: the kernels have no sink logit; use a model "
             "without attention sinks",
    "sinks": "sinks (attention sinks) is not supported: the kernels have no sink logit; use a model without them",
    "output_attentions": "output_attentions=True is not supported: ring dilated attention never materialises the "
                         "attention weights; call the model with output_attentions=False",
}
# arguments of an attention layer's forward that bring keys and values from another sequence
_CROSS_INPUTS = ("key_value_states", "encoder_hidden_states", "cross_attention_states")
# class names of sequence mixers that are not attention (those that convolve along the sequence are found by their
# nn.Conv1d)
_MIXER_NAMES = re.compile(r"mamba|deltanet|shortconv|recurrent|rwkv|lstm|ssm", re.IGNORECASE)
_PADDING = ("a padding attention_mask is not supported by ring dilated attention: fill every sequence to the full "
            "length (give filler positions the label -100) and pass attention_mask=None")


def _sliding_window_fix(config) -> str:
    """How to build or load a model of this config without its sliding window or chunks. The layers fix their kind
    when they are built: setting ``config.sliding_window = None`` on a built Qwen2, Gemma 3 or gpt-oss crashes it."""
    if getattr(config, "layer_types", None) is not None:
        full = f"layer_types=['full_attention'] * {config.num_hidden_layers}"
        return (f"the dilation pattern replaces the window: build or load the model with every layer full, {full} "
                f"(e.g. from_pretrained(name, {full}))")
    return ("the dilation pattern replaces the window: build or load the model with sliding_window=None "
            "(e.g. from_pretrained(name, sliding_window=None))")


# --- which layers a model has -----------------------------------------------------------------------------------------
@functools.cache
def _calls_attention_interface(cls: type) -> bool:
    """Whether a module class's forward looks its attention function up in transformers' interface."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _class_names(modules) -> str:
    return ", ".join(sorted({type(m).__name__ for m in modules}))


def _other_attention(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Attention modules (by class name) that hold weights and neither call the interface nor contain a layer that
    does: they compute attention their own way (Falcon, Bloom, GPT-Neo, MPT, torch's nn.MultiheadAttention...)."""
    return [m for m in model.modules()
            if "attention" in type(m).__name__.lower() and next(m.parameters(), None) is not None
            and not any(_calls_attention_interface(type(inner)) for inner in m.modules())]


def _sequence_mixers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that mix tokens along the sequence without attention (Mamba, gated delta nets, short convolutions),
    the innermost of each nest (a Mamba mixer, not the decoder layer that holds it)."""
    def mixes(module):
        convolves = any(isinstance(child, torch.nn.Conv1d) for child in module.children())
        return not isinstance(module, PreTrainedModel) and (convolves or _MIXER_NAMES.search(type(module).__name__))

    return [m for m in model.modules() if mixes(m) and not any(mixes(inner) for inner in list(m.modules())[1:])]


def _sub_models(model: PreTrainedModel) -> dict[str, str]:
    """The sub-models of a multimodal model (a vision tower, a text model...): their paths and sub-config names."""
    config = model.config
    keys = {id(getattr(config, key)): key for key in config.sub_configs if getattr(config, key, None) is not None}
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        key = keys.get(id(getattr(module, "config", None))) if isinstance(module, PreTrainedModel) else None
        if key is not None and key not in found.values():
            found[path] = key
    return found


def _check_model(model: PreTrainedModel, group) -> None:
    """Refuse, before switching anything, a model the switch would leave silently wrong."""
    name = type(model).__name__
    sub_models = _sub_models(model)
    if sub_models:
        listed = ", ".join(f"model.{path} ({key})" for path, key in sub_models.items())
        text_config = model.config.get_text_config()
        text = next((p for p, key in sub_models.items() if getattr(model.config, key) is text_config), None)
        where = f"apply_ring_dilated_attention(model.{text}, ...)" if text else "apply it to one of them"
        raise TypeError(f"{name} has sub-models with their own configs ({listed}): switch its text model alone, "
                        f"{where}; the other sub-models keep their attention")
    others = _other_attention(model)
    if others:
        raise TypeError(f"{name} is not on transformers' attention interface: its {_class_names(others)} layers "
                        f"compute attention their own way and would keep doing so (under sequence parallelism each "
                        f"rank would attend only inside its slice); use a family whose attention layers call the "
                        f"interface (Llama, Mistral, Qwen2...: see the families table of the Hugging Face page)")
    if not any(_calls_attention_interface(type(m)) for m in model.modules()):
        raise TypeError(f"{name} is not on transformers' attention interface: none of its layers calls it, so there "
                        f"is no attention to switch")
    mixers = _sequence_mixers(model)
    if mixers and group_rank_and_size(group)[1] > 1:
        raise TypeError(f"{name} mixes the sequence with {_class_names(mixers)} beside attention: under sequence "
                        f"parallelism they would see only this rank's slice of it. Train it with process_group=None, "
                        f"or use a model whose every sequence mixer is attention")


def _check_switched(model: PreTrainedModel, attn_name: str, previous: str) -> None:
    """Every layer that calls the interface must now read our name from its config; otherwise switch back, refuse."""
    layers = [m for m in model.modules() if _calls_attention_interface(type(m))]
    stale = [m for m in layers if getattr(getattr(m, "config", None), "_attn_implementation", None) != attn_name]
    if stale or model.config._attn_implementation != attn_name:
        model.set_attn_implementation(previous)
        raise TypeError(f"{type(model).__name__} is not on transformers' attention interface: after the switch, "
                        f"{_class_names(stale) or 'its config'} still read another attention implementation")


# --- refusals at run time ---------------------------------------------------------------------------------------------
_CROSS_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its hook (one each, re-applied)


def _guard_cross_attention(model: torch.nn.Module) -> None:
    """Hook every layer whose forward can take keys and values from another sequence: called with them while on a
    ring dilated attention function (cross-attention, whatever the lengths), it raises."""
    for layer in model.modules():
        if not _calls_attention_interface(type(layer)):
            continue
        parameters = list(inspect.signature(layer.forward).parameters)
        inputs = {name: parameters.index(name) for name in _CROSS_INPUTS if name in parameters}
        if inputs and layer not in _CROSS_HOOKS:
            _CROSS_HOOKS[layer] = layer.register_forward_pre_hook(functools.partial(_refuse_cross, inputs),
                                                                  with_kwargs=True)


def _refuse_cross(inputs: dict[str, int], layer, args, kwargs) -> None:
    if layer.config._attn_implementation not in _OURS:
        return
    for name, index in inputs.items():
        if kwargs.get(name, args[index] if index < len(args) else None) is not None:
            raise NotImplementedError(
                f"cross-attention is not supported: {type(layer).__name__} was called with {name}, keys and values "
                f"from another sequence, and ring dilated attention attends within one sequence split over ranks; "
                f"switch only a model without cross-attention, e.g. an encoder-decoder's encoder "
                f"(apply_ring_dilated_attention(model.get_encoder(), ...))")


def _refuse_together(problem: tuple[type, str] | None, group, device: torch.device) -> None:
    """Raise on every rank of the sequence group when any rank's data is refused: a rank that raised alone would
    leave the others waiting in the operator's first exchange. One small all-reduce per call when all is well."""
    if group_rank_and_size(group)[1] == 1:
        if problem is not None:
            raise problem[0](problem[1])
        return
    flag = torch.tensor([problem is not None], dtype=torch.int32, device=device)
    dist.all_reduce(flag, group=group)
    if flag.item():
        problems = [None] * dist.get_world_size(group)
        dist.all_gather_object(problems, problem, group=group)
        failing = [(rank, p) for rank, p in enumerate(problems) if p is not None]
        listed = "; ".join(f"rank {rank}: {message}" for rank, (_, message) in failing)
        raise failing[0][1][0](f"refused on every rank of the sequence group ({listed})")


def _packing_problem(position_ids: torch.Tensor | None, kwargs: dict, rank: int, length: int, sequence_parallel: bool):
    """Why this rank's rows are not each one whole sequence (packed documents: refused until they are supported,
    DESIGN.md §10, here), or under sequence parallelism its position_ids not its tokens' global positions; None if
    all is well. The answer depends on the data, so the ranks agree on it before raising (`_refuse_together`)."""
    given = [name for name in _PACKING if kwargs.get(name) is not None]
    if given:
        return NotImplementedError, (f"{given[0]} (packed sequences, as DataCollatorWithFlattening makes) is not "
                                     f"supported yet: give each sequence its own batch row")
    if position_ids is None:
        return None
    if bool((position_ids.diff(dim=-1) != 1).any()):
        return NotImplementedError, ("position_ids that restart inside a row (packed sequences) are not supported yet: "
                                     "give each sequence its own batch row")
    start, starts = rank * length, position_ids[..., 0]
    if sequence_parallel and bool((starts != start).any()):
        return ValueError, (f"position_ids start at {starts[starts != start][0].item()} where this rank's tokens are "
                            f"positions {start}..{start + length - 1} of the sequence: pass shard_batch's "
                            f"position_ids (without them every rank counts from 0)")
    return None


def _check_keywords(kwargs: dict) -> None:
    """Every keyword is used, harmless, or refused by name: none is dropped silently."""
    for name, value in kwargs.items():
        if value is None or name in _HARMLESS or name in _PACKING:  # packing: `_packing_problem`
            continue
        if name in _REFUSED:
            if name == "output_attentions" and not value:
                continue
            raise NotImplementedError(_REFUSED[name])
        shown = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else repr(value)
        raise TypeError(f"the attention layer passed {name}={shown}, which ring dilated attention does not use and "
                        f"would otherwise drop: use attn_implementation='sdpa' for this model")


def _mask_function(state: dict):
    def no_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                attention_mask=None, local_size=None, config=None, **kwargs):
        """``transformers``' mask-creation signature: the operator applies the causal (or bidirectional) pattern
        itself, so no mask is made. What it cannot apply is noted for the attention layers of this forward (a model
        may make several masks first), which refuse it on every rank together: a padding mask, a sliding window or
        chunks that a layer uses, packed sequences, an overlay."""
        if state["layers_ran"]:  # the first mask of a forward: forget the last forward's problem
            state.update(problem=None, layers_ran=False)
        problem = None
        if attention_mask is not None and not bool(attention_mask.all()):
            problem = NotImplementedError, _PADDING
        elif local_size is not None:  # a sliding-window or chunked mask: unused when every layer is full
            layer_types = getattr(config, "layer_types", None)
            if layer_types is None or {"sliding_attention", "chunked_attention"} & set(layer_types):
                local = "chunked attention" if "chunked_attention" in (layer_types or ()) else "a sliding window"
                problem = NotImplementedError, f"{local} of {local_size} tokens is not supported: " + (
                    _sliding_window_fix(config))
        elif mask_function not in (causal_mask_function, bidirectional_mask_function):
            problem = NotImplementedError, (
                "transformers asked for a mask beyond the causal one (packed sequences with restarting position_ids, "
                "or an overlay such as image tokens attending both ways) and ring dilated attention applies its own "
                "pattern: give each sequence its own batch row, and remove mask overlays")
        state["problem"] = state["problem"] or problem
        return None

    return no_mask


def _attention_function(segment_lengths, dilation_rates, group, comm, load_balance, ulysses_size, backend, state):
    def ring_dilated_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                       sliding_window=None, softcap=None, is_causal=None, position_ids=None, **kwargs):
        """``transformers``' attention-function signature: ``[B, H, L, D]`` in, ``([B, L, H, D], None)`` out."""
        state["layers_ran"] = True  # the next mask made starts the next forward
        _check_keywords(kwargs)
        if sliding_window is not None:
            raise NotImplementedError(f"sliding_window={sliding_window} is not supported: "
                                      f"{_sliding_window_fix(module.config)}")
        if softcap is not None:
            raise NotImplementedError(f"softcap={softcap} (attention logit soft-capping) is not supported: the "
                                      f"fused kernels compute plain softmax attention; use a model without it")
        if dropout:
            raise NotImplementedError(f"attention dropout={dropout} is not supported: set config.attention_dropout "
                                      f"= 0 (dropout on the attention output is fine)")
        if query.shape[2] != key.shape[2]:
            raise NotImplementedError(
                f"queries ({query.shape[2]}) and keys ({key.shape[2]}) of different lengths, as in generation with a "
                f"key/value cache, are not supported: generate with attn_implementation='sdpa'")
        rank, size = group_rank_and_size(group)
        problem = _packing_problem(position_ids, kwargs, rank, query.shape[2], size > 1) or state["problem"]
        if problem is None and attention_mask is not None:  # `no_mask` makes none: this one was handed over ready
            problem = NotImplementedError, (f"an attention_mask of shape {tuple(attention_mask.shape)} is not "
                                            f"supported: ring dilated attention applies its own pattern; pass "
                                            f"attention_mask=None")
        _refuse_together(problem, group, query.device)
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        # multi-head latent attention (DeepSeek-V2/V3) has value heads narrower than key heads: zero columns make
        # them equal and are cut off the output, which is then exactly attention with the narrower values
        qk_dim, v_dim = query.shape[-1], value.shape[-1]
        scaling = qk_dim**-0.5 if scaling is None else scaling
        if v_dim < qk_dim:
            value = F.pad(value, (0, qk_dim - v_dim))
        elif qk_dim < v_dim:
            query, key = F.pad(query, (0, v_dim - qk_dim)), F.pad(key, (0, v_dim - qk_dim))
        out = ring_dilated_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), segment_lengths, dilation_rates,
            causal=causal, group=group, comm=comm, backend=backend, scale=scaling,
            load_balance=load_balance, ulysses_size=ulysses_size,
        )
        return out[..., :v_dim], None  # [B, L, H, D_v]: no attention weights are ever materialised

    return ring_dilated_attention_forward


# --- the public functions ---------------------------------------------------------------------------------------------
def apply_ring_dilated_attention(
    model: torch.nn.Module,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    process_group: GroupLike = None,
    comm: str = "ring",
    load_balance: bool = True,
    ulysses_size: int = 1,
    backend: str = "auto",
) -> str:
    """Make every attention layer of a ``transformers`` model compute ring dilated attention; returns the name
    the attention function is registered under.

    Only the dense pair (``segment_lengths=[N]``, ``dilation_rates=[1]``) computes what ``sdpa`` computes: any
    other pairs change the model's function, so a pretrained dense model switched to them must be fine-tuned.
    The settings belong to this model: each call registers its own function, so two models in one process may
    use different pairs or process groups. Query heads use their kv head's dilation offset (grouped-query
    attention: only the kv heads' selected rows travel).

    Refused with a ``TypeError`` naming the model class, before anything changes: a model with attention layers
    that do not call transformers' attention interface (Falcon, Bloom, GPT-Neo, MPT...), one with none, a
    multimodal model (pass its text model, as the message says), and with a process group of more than one
    rank a model with other sequence mixers (Mamba, gated delta nets, short convolutions: Jamba, Bamba,
    Qwen3-Next, LFM2...). After the switch every layer that calls the interface is checked to use it. At run
    time every input the operator cannot honour raises with what to do (a padding mask, packed sequences, a
    sliding window, soft-capping, a position bias, attention sinks, cross-attention, ``output_attentions``, any
    keyword it does not know), on every rank of the group together when it depends on one rank's data.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` (a multimodal model's text model is one).
        segment_lengths: segment length ``w_i`` of each pair, over the whole sequence.
        dilation_rates: dilation rate ``r_i`` of each pair.
        process_group: the sequence-parallel group, a ``ProcessGroup`` or a 1-D ``DeviceMesh`` (e.g.
            ``mesh["sp"]``); each rank must then be given `shard_batch`'s slices. ``None``: one process holds
            the whole sequence.
        comm: ``"ring"`` (point-to-point, overlapped with compute) or ``"allgather"`` (one collective per pair
            whose segments span ranks).
        load_balance: balance the causal work of pairs that span ranks, inside the operator (same results).
        ulysses_size: ``U`` > 1 swaps sequence shards for head shards within sub-groups of ``U`` consecutive
            ranks (all-to-all); ``U`` must divide the group's size and the model's head and kv-head counts.
        backend: the kernel backend (`ring_attention.kernels`); ``"auto"`` picks the best available.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    group = resolve_group(process_group)
    _check_model(model, group)
    name = f"ring_dilated_attention_{next(_NAMES)}"
    state = {"problem": None, "layers_ran": True}  # what the mask function noted for the layers, per forward
    AttentionInterface.register(name, _attention_function(list(segment_lengths), list(dilation_rates), group, comm,
                                                          load_balance, ulysses_size, backend, state))
    AttentionMaskInterface.register(name, _mask_function(state))
    _OURS.add(name)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    _check_switched(model, name, previous)
    _guard_cross_attention(model)
    return name


def shard_batch(
    input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, process_group: GroupLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``input_ids``, ``position_ids`` and next-token ``labels``, from a ``[B, N]`` batch.

    ``labels`` (default: ``input_ids``) are those of a causal language model: the label of position ``t`` is the
    token at ``t`` (the model predicts it from ``t - 1``). They are shifted *before* the sequence is cut, so each
    rank's label at its position ``t`` is the token at ``t + 1``, the first token of the next rank's slice for
    the last position, and ``-100`` (ignored) after the end of the sequence. ``position_ids`` are the global
    positions of this rank's tokens. Pass the labels to `sequence_parallel_loss`, not to the model: the
    model's own loss would shift them again.
    """
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and labels must both be [batch, seq], got {tuple(input_ids.shape)} and "
                         f"{tuple(labels.shape)}")
    next_tokens = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, N]: what position t must predict
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return tuple(shard_sequence(t, process_group, dim=1) for t in (input_ids, positions, next_tokens))


def sequence_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, *, process_group: GroupLike) -> torch.Tensor:
    """This rank's share of the mean cross-entropy over every labelled token of the whole sequences.

    ``logits`` ``[B, L, V]`` and ``labels`` ``[B, L]`` are this rank's (`shard_batch`). Computed in the logits'
    dtype; the count of labelled tokens is summed over the sequence group. Summed over the ranks of the group
    (``dist.all_reduce``), the shares are the single-process loss; so are the gradients, summed.
    """
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum()
    group = resolve_group(process_group)
    if group is not None:
        dist.all_reduce(count, group=group)
    return total / count


# gradients smaller than this travel together in flat buffers (one all-reduce for many); larger ones each travel in
# place in their own all-reduce, whose fixed cost is then small next to the transfer, and no copy is made of them
_SMALL_BYTES = 2**20
_BUCKET_BYTES = 16 * 2**20  # the most bytes of small gradients one flat buffer holds


def sum_gradients(model: torch.nn.Module, process_group: GroupLike) -> None:
    """Add up every parameter's gradient over the sequence group, in place (after ``backward``).

    Gradients under 1 MiB (norms, biases, small layers) travel together in flat buffers of up to 16 MiB, one
    all-reduce each, instead of one all-reduce per parameter; larger ones are summed in place, one all-reduce
    each, with no copy. With DDP over all data x sequence ranks, scale the loss by the sequence group's size
    instead (DDP averages). With FSDP sharding over the data ranks only, call this after ``backward``: each
    sequence rank holds the same shards of the parameters (their local shards are summed), and its gradient
    covers its own tokens.
    """
    group = resolve_group(process_group)
    if group_rank_and_size(group)[1] == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: a DTensor's local shard
    buckets: list[list[torch.Tensor]] = []  # in the parameters' order, the same on every rank
    filling: dict[tuple, tuple[list[torch.Tensor], int]] = {}  # (dtype, device) -> the bucket filling, its bytes
    for grad in grads:
        if grad.nbytes >= _SMALL_BYTES:
            buckets.append([grad])
            continue
        bucket, size = filling.get((grad.dtype, grad.device), (None, 0))
        if bucket is None or size + grad.nbytes > _BUCKET_BYTES:
            bucket, size = [], 0
            buckets.append(bucket)
        bucket.append(grad)
        filling[grad.dtype, grad.device] = bucket, size + grad.nbytes
    for bucket in buckets:
        if len(bucket) == 1 and bucket[0].is_contiguous():
            dist.all_reduce(bucket[0], group=group)
            continue
        flat = torch.cat([g.reshape(-1) for g in bucket])  # [sum of numel]
        dist.all_reduce(flat, group=group)
        for grad, summed in zip(bucket, flat.split([g.numel() for g in bucket])):
            grad.copy_(summed.view_as(grad))
