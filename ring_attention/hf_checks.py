"""What `ring_attention.hf` refuses, and why: the model checks made when switching, and the inputs refused at run time.

A model is refused before anything changes when the switch would leave it silently wrong (layers off transformers'
attention interface, sub-models, other sequence mixers under a process group). At run time every input the operator
cannot honour raises with what to do; the faults that depend on one rank's data (a padding mask, positions, the
documents) are agreed on by every rank of the sequence group first (`refuse_together`), so none is left waiting.

Each attention layer's call is gathered into a `LayerCall` and judged (`judge`). Under ``torch.compile`` the same
judgement runs inside the custom op ``ring_attention::hf_checks`` when the graph runs (`judge_in_graph`): Dynamo can
neither read tensor values nor raise while tracing, so nothing is checked at trace time, and the same errors come out.
"""

from __future__ import annotations

import functools
import inspect
import re
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from ring_attention.comm import group_rank_and_size
from ring_attention.ops import group_by_name, group_name
from ring_attention.validation import Boundaries, CuSeqlens, check_cu_seqlens

Problem = tuple[type, str] | None  # an exception type and its message, or nothing wrong
# the attention-implementation names ring_attention.hf registered -> the run-time state of each (`new_state`)
STATES: dict[str, dict] = {}

# keywords transformers' layers pass that change nothing in the attention itself; max_length_q/k only size
# flash-attn's kernels, ours read the lengths off the boundaries
_HARMLESS = frozenset({"use_cache", "output_hidden_states", "output_router_logits", "num_items_in_batch",
                      "max_length_q", "max_length_k"})
DOCUMENTS = "cu_seq_lens_q"  # the keyword that carries the documents down to the attention layers
_REFUSED = {
    "position_bias": "position_bias (an additive bias on the attention scores, as T5's relative positions) is not "
                     "supported: the kernels compute plain softmax attention; use a model with rotary or absolute "
                     "position embeddings",
    "s_aux": "s_aux (attention sinks, as in gpt-oss) is not supported: the kernels have no sink logit; use a model "
             "without attention sinks",
    "sinks": "sinks (attention sinks) is not supported: the kernels have no sink logit; use a model without them",
    "output_attentions": "output_attentions=True is not supported: ring dilated attention never materialises the "
                         "attention weights; call the model with output_attentions=False",
    "seq_idx": "seq_idx (the document of each token) is not used: give the documents as cu_seq_lens_q, the "
               "boundaries shard_batch returns",
}
# arguments of an attention layer's forward that bring keys and values from another sequence
_CROSS_INPUTS = ("key_value_states", "encoder_hidden_states", "cross_attention_states")
# class names of sequence mixers that are not attention (those that convolve along the sequence are found by their
# nn.Conv1d)
_MIXER_NAMES = re.compile(r"mamba|deltanet|shortconv|recurrent|rwkv|lstm|ssm", re.IGNORECASE)
PADDING = ("a padding attention_mask is not supported by the model call: give the full [batch, seq] mask to "
           "shard_batch(..., attention_mask=mask) instead, and call the model with the position_ids and cu_seq_lens_q "
           "it returns and attention_mask=None (the padding becomes a filler document)")
PACKED = ("position_ids restart inside a row (packed documents), but the attention layers were given no documents: "
          "shard_batch(..., position_ids=...) returns them; call the model with "
          "model(input_ids=..., position_ids=..., cu_seq_lens_q=...)")


def sliding_window_fix(config) -> str:
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
    does: they compute attention their own way (Bloom, GPT-Neo, MPT, torch's nn.MultiheadAttention...)."""
    return [m for m in model.modules()
            if "attention" in type(m).__name__.lower() and next(m.parameters(), None) is not None
            and not any(_calls_attention_interface(type(inner)) for inner in m.modules())]


def sequence_mixers(model: torch.nn.Module) -> list[torch.nn.Module]:
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


def check_model(model: PreTrainedModel, group) -> None:
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
    mixers = sequence_mixers(model)
    if mixers and group_rank_and_size(group)[1] > 1:
        raise TypeError(f"{name} mixes the sequence with {_class_names(mixers)} beside attention: under sequence "
                        f"parallelism they would see only this rank's slice of it. Train it with process_group=None, "
                        f"or use a model whose every sequence mixer is attention")


def check_switched(model: PreTrainedModel, attn_name: str, previous: str) -> None:
    """Every layer that calls the interface must now read our name from its config; otherwise switch back, refuse."""
    layers = [m for m in model.modules() if _calls_attention_interface(type(m))]
    stale = [m for m in layers if getattr(getattr(m, "config", None), "_attn_implementation", None) != attn_name]
    if stale or model.config._attn_implementation != attn_name:
        model.set_attn_implementation(previous)
        raise TypeError(f"{type(model).__name__} is not on transformers' attention interface: after the switch, "
                        f"{_class_names(stale) or 'its config'} still read another attention implementation")


def new_state(model: PreTrainedModel, mixers: list[torch.nn.Module]) -> dict:
    """What the hooks and the mask function note for the attention layers of a forward (the masks made, and under
    ``torch.compile`` a cross-attention call), and what they need to know of the model: its class name and its other
    sequence mixers (which would cross documents)."""
    return dict(masks=[], packed=[], cross=None, documents_given=False, not_received=set(),
                model=type(model).__name__, mixers=_class_names(mixers))


def _state_of(module: torch.nn.Module) -> dict | None:
    return STATES.get(getattr(getattr(module, "config", None), "_attn_implementation", None))


# --- hooks ----------------------------------------------------------------------------------------------------------
_CROSS_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its hook (one each, re-applied)
_DOCUMENT_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its hooks


def guard_cross_attention(model: torch.nn.Module) -> None:
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
    state = _state_of(layer)
    if state is None:
        return
    for name, index in inputs.items():
        if kwargs.get(name, args[index] if index < len(args) else None) is not None:
            problem = NotImplementedError, (
                f"cross-attention is not supported: {type(layer).__name__} was called with {name}, keys and values "
                f"from another sequence, and ring dilated attention attends within one sequence split over ranks; "
                f"switch only a model without cross-attention, e.g. an encoder-decoder's encoder "
                f"(apply_ring_dilated_attention(model.get_encoder(), ...))")
            if not torch.compiler.is_compiling():
                raise problem[0](problem[1])
            state["cross"] = problem  # a traced raise would end the compilation: the layer's checks raise it


def guard_documents(model: torch.nn.Module) -> None:
    """Hook the switched model: when it is called with ``cu_seq_lens_q``, every attention layer of that forward must
    receive it. A model that does not pass it on (StableLM) would attend across documents: it raises when the forward
    ends, on every rank alike (its layers are the same on all). A layer recomputed under gradient checkpointing runs
    no model hook, so only forwards are judged. The base model (the decoder stack of a ``...ForCausalLM``) ends its
    forwards too, so a caller of it alone does not carry one forward's masks into the next."""
    if model not in _DOCUMENT_HOOKS:
        ends = {id(m): m for m in (model, getattr(model, "base_model", model))}.values()
        _DOCUMENT_HOOKS[model] = (model.register_forward_pre_hook(_note_documents, with_kwargs=True),
                                  *(m.register_forward_hook(_end_forward, always_call=True) for m in ends))


def _note_documents(model, args, kwargs) -> None:
    state = _state_of(model)
    if state is not None:
        state.update(documents_given=kwargs.get(DOCUMENTS) is not None, not_received=set())


def documents_lost(model: str, not_received: set[str]) -> str:
    return (f"{model} was called with cu_seq_lens_q, but its {', '.join(sorted(not_received))} "
            f"layers did not receive it (the model does not pass it on to attention): packed documents and padding "
            f"are not supported for this model")


def _end_forward(model, args, output) -> None:
    """Forget the masks of this forward, also when it raised (the next forward makes its own; under ``torch.compile``
    none is kept as an output of the graph), and refuse documents that some layers did not receive (under
    ``torch.compile`` those layers' checks raise it)."""
    state = _state_of(model)
    if state is None:
        return
    state.update(masks=[], packed=[])
    if output is not None and state["documents_given"] and state["not_received"] and not torch.compiler.is_compiling():
        raise NotImplementedError(documents_lost(state["model"], state["not_received"]))


# --- refusals at run time ---------------------------------------------------------------------------------------------
@dataclass
class LayerCall:
    """What one attention layer's call is judged on (`judge`): the tensors whose values decide, and the refusals known
    without reading any. The masks of the forward come as the padding masks they were given, up to and including the
    first mask refused for what it is (``mask_problem``), and transformers' packed-sequence indices."""

    refused: Problem  # raised at once (the same on every rank): a keyword, a window, dropout, lengths, cross-attention
    position_ids: torch.Tensor | None  # [B or 1, L]
    documents: CuSeqlens | None  # cu_seq_lens_q
    keys: CuSeqlens | None  # cu_seq_lens_k
    padding: list[torch.Tensor]  # [B, N] each: 1 (or True) for a real token
    mask_problem: Problem
    packed: list[torch.Tensor]  # [B, N] each: the index of each token's sequence in its row
    mixers: str | None  # why documents are refused for this model, whatever they are
    lost: str | None  # documents were given to the model and some layers did not receive them
    given_mask: Problem  # an attention mask handed to the layer ready-made


def layer_call(state: dict, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               attention_mask: torch.Tensor | None, kwargs: dict, *, position_ids, dropout, sliding_window,
               softcap) -> LayerCall:
    """An attention layer's call (``query`` ``[B, H, L, D]``, ``key`` ``[B, H_kv, L_k, D]``) and what this forward's
    masks noted in ``state``, as `judge` takes them."""
    # Dynamo refuses a change of outside state inside an activation-checkpointed layer: in the usual case none is made
    documents, keys = kwargs.get(DOCUMENTS), kwargs.get("cu_seq_lens_k")
    not_received = state["not_received"]
    if documents is None and keys is None and state["documents_given"]:
        if torch.compiler.is_compiling():  # this layer's checks raise it (`judge_in_graph`)
            not_received = not_received | {type(module).__name__}
        else:  # the forward hook raises it at the end (`_end_forward`), unless a layer's data are refused first
            not_received.add(type(module).__name__)
    cross = state["cross"]
    if cross is not None:
        state["cross"] = None
    refused = cross or keyword_problem(kwargs) or _setting_problem(module, query, key, dropout, sliding_window, softcap)
    if torch.compiler.is_compiling() and not all(x is None or torch.is_tensor(x) for x in (documents, keys)):
        refused = refused or (TypeError, "cu_seq_lens_q and cu_seq_lens_k must be tensors under torch.compile, as "
                                         "shard_batch returns them")
    padding, mask_problem = [], None
    for mask, problem in state["masks"]:  # in the order they were made
        if mask is not None:
            padding.append(mask)
        if problem is not None:  # its padding first, then itself: a later mask's is never reached
            mask_problem = problem
            break
    given_mask = None
    if attention_mask is not None:  # the mask function makes none: this one was handed over ready
        given_mask = NotImplementedError, (f"an attention_mask of shape {tuple(attention_mask.shape)} is not "
                                           f"supported: ring dilated attention applies its own pattern; pass "
                                           f"attention_mask=None")
    mixers = None
    if state["mixers"]:
        mixers = (f"{state['model']} mixes the sequence with {state['mixers']} beside attention, which would cross "
                  f"the documents: packed documents and padding need a model whose every sequence mixer is attention")
    return LayerCall(refused=refused, position_ids=position_ids, documents=documents, keys=keys, padding=padding,
                     mask_problem=mask_problem, packed=state["packed"], mixers=mixers,
                     lost=documents_lost(state["model"], not_received) if not_received else None,
                     given_mask=given_mask)


def _setting_problem(module, query, key, dropout, sliding_window, softcap) -> Problem:
    if sliding_window is not None:
        return NotImplementedError, (f"sliding_window={sliding_window} is not supported: "
                                     f"{sliding_window_fix(module.config)}")
    if softcap is not None:
        return NotImplementedError, (f"softcap={softcap} (attention logit soft-capping) is not supported: the fused "
                                     f"kernels compute plain softmax attention; use a model without it")
    if dropout:
        return NotImplementedError, (f"attention dropout={dropout} is not supported: set config.attention_dropout = 0 "
                                     f"(dropout on the attention output is fine)")
    if query.shape[2] != key.shape[2]:
        return NotImplementedError, (
            f"queries ({query.shape[2]}) and keys ({key.shape[2]}) of different lengths, as in generation with a "
            f"key/value cache, are not supported: generate with attn_implementation='sdpa'")
    return None


def judge(call: LayerCall, group, batch: int, length: int, device: torch.device, *, raise_lost: bool) -> None:
    """Raise what a layer's call of ``length`` tokens cannot honour: what the call itself shows on this rank at once,
    what its data shows on every rank of the sequence group together. With ``raise_lost`` documents lost by some
    layers are refused here rather than when the forward ends."""
    if call.refused is not None:
        raise call.refused[0](call.refused[1])
    rank, size = group_rank_and_size(group)
    rows, problem = documents_of(call.documents, call.keys, batch, length * size, device)
    if rows is not None and call.mixers is not None:
        raise TypeError(call.mixers)
    problem = problem or positions_problem(call.position_ids, rows, rank, length, size)
    if problem is None and any(not bool(mask.all()) for mask in call.padding):
        problem = NotImplementedError, PADDING
    problem = problem or call.mask_problem
    # transformers' packed-sequence restriction: the positions restart inside a row
    if problem is None and rows is None and any(bool((p != p[..., :1]).any()) for p in call.packed):
        problem = ValueError, PACKED
    if problem is not None and problem[1] == PACKED and call.lost is not None:
        problem = NotImplementedError, call.lost
    refuse_together(problem or call.given_mask, group, device)
    if raise_lost and call.lost is not None:
        raise NotImplementedError(call.lost)


def refuse_together(problem: Problem, group, device: torch.device) -> None:
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


def keyword_problem(kwargs: dict) -> Problem:
    """Every keyword is used, harmless, or refused by name: none is dropped silently."""
    for name, value in kwargs.items():
        if value is None or name in _HARMLESS or name in (DOCUMENTS, "cu_seq_lens_k"):  # see `documents_of`
            continue
        if name in _REFUSED:
            if name == "output_attentions" and not value:
                continue
            return NotImplementedError, _REFUSED[name]
        shown = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else repr(value)
        return TypeError, (f"the attention layer passed {name}={shown}, which ring dilated attention does not use and "
                           f"would otherwise drop: use attn_implementation='sdpa' for this model")
    return None


def documents_of(given: CuSeqlens | None, keys: CuSeqlens | None, batch: int, seq_len: int,
                 device: torch.device) -> tuple[Boundaries | None, Problem]:
    """The documents an attention layer was given (``cu_seq_lens_q`` over the whole sequence of ``seq_len`` tokens),
    as host ints, or why they are refused (checked before the ranks agree, so a bad value raises on every rank)."""
    if keys is not None and (given is None or torch.as_tensor(keys).tolist() != torch.as_tensor(given).tolist()):
        return None, (ValueError, "cu_seq_lens_k must equal cu_seq_lens_q (the documents of the keys are those of "
                                  "the queries: self-attention); pass cu_seq_lens_q alone")
    if given is None:
        return None, None
    try:
        return check_cu_seqlens(given, seq_len, batch, device), None
    except (ValueError, TypeError) as error:
        message = str(error).replace("cu_seqlens", DOCUMENTS, 1)
        return None, (type(error), f"{message} (cu_seq_lens_q: the documents over the whole sequence of all ranks, "
                                   f"as shard_batch returns them)")


def document_positions(rows: Boundaries, start: int, length: int, device: torch.device) -> torch.Tensor:
    """``[len(rows), length]``: the position of tokens ``start .. start + length - 1`` inside their documents."""
    tokens = torch.arange(start, start + length)
    positions = []
    for boundaries in rows:
        starts = torch.tensor(boundaries[:-1])
        positions.append(tokens - starts[torch.searchsorted(starts, tokens, right=True) - 1])
    return torch.stack(positions).to(device)


def positions_problem(position_ids: torch.Tensor | None, rows: Boundaries | None, rank: int, length: int,
                      size: int) -> Problem:
    """Why this rank's ``position_ids`` are not those of its tokens: with documents, each token's place in its
    document (counted from 0, as the document alone would be numbered); without, under sequence parallelism, its
    global position, and on one process any run of consecutive positions. None if all is well."""
    if position_ids is None:
        return None
    if rows is None:
        if bool((position_ids.diff(dim=-1) != 1).any()):
            return ValueError, PACKED
        if size == 1:
            return None
        start, starts = rank * length, position_ids[..., 0]
        if bool((starts != start).any()):
            return ValueError, (f"position_ids start at {starts[starts != start][0].item()} where this rank's tokens "
                                f"are positions {start}..{start + length - 1} of the sequence: pass shard_batch's "
                                f"position_ids (without them every rank counts from 0)")
        return None
    try:
        given, expected = torch.broadcast_tensors(
            position_ids, document_positions(rows, rank * length, length, position_ids.device))
    except RuntimeError:  # shapes that do not broadcast
        return ValueError, (f"position_ids of shape {tuple(position_ids.shape)} do not fit the {len(rows)} rows of "
                            f"documents given as cu_seq_lens_q: pass shard_batch's position_ids")
    wrong = (given != expected).nonzero()
    if len(wrong) == 0:
        return None
    where = tuple(wrong[0].tolist())
    row = where[-2] if len(where) > 1 else 0
    return ValueError, (f"position_ids do not number the documents of cu_seq_lens_q from 0: token "
                        f"{rank * length + where[-1]} of row {row} has position {given[where].item()} but is token "
                        f"{expected[where].item()} of its document; pass the position_ids shard_batch returns with "
                        f"these documents")


# --- under torch.compile ----------------------------------------------------------------------------------------------
# Dynamo can neither read a tensor's values nor raise without ending the compilation (fullgraph=True refuses a graph
# break): the data checks and every refusal run in one custom op, on the host, when the compiled graph runs. What
# is known while tracing travels as strings, a refusal as "ExceptionName: message".
_KINDS = {kind.__name__: kind for kind in (ValueError, TypeError, NotImplementedError)}


def _text(problem: Problem) -> str:
    return "" if problem is None else f"{problem[0].__name__}: {problem[1]}"


def _problem(text: str) -> Problem:
    kind, _, message = text.partition(": ")
    return (_KINDS[kind], message) if text else None


def judge_in_graph(call: LayerCall, query: torch.Tensor, group) -> torch.Tensor:
    """`judge` under ``torch.compile``: the op ``ring_attention::hf_checks`` runs it when the graph runs. Returns a
    0-dim zero of ``query``'s dtype, which the caller adds to the query: the attention then depends on the checks,
    which no compiler can drop or move after it, and the query and its gradient are unchanged."""
    documents, keys = (x if torch.is_tensor(x) else None for x in (call.documents, call.keys))  # else refused
    return _judge_op(query.detach(), call.position_ids, documents, keys, call.padding, call.packed,
                     _text(call.refused), _text(call.mask_problem), call.mixers or "", call.lost or "",
                     _text(call.given_mask), group_name(group))


@torch.library.custom_op("ring_attention::hf_checks", mutates_args=())
def _judge_op(query: torch.Tensor, position_ids: torch.Tensor | None, documents: torch.Tensor | None,
              keys: torch.Tensor | None, padding: list[torch.Tensor], packed: list[torch.Tensor], refused: str,
              mask_problem: str, mixers: str, lost: str, given_mask: str, group: str) -> torch.Tensor:
    """`judge` of one layer's call, `LayerCall`'s fields as arguments (refusals as `_text`); the layer's ``query``
    ``[B, H, L, D]`` gives the sizes and the device. Documents lost by some layers are refused here: the model's
    forward hook cannot raise under ``torch.compile``."""
    call = LayerCall(refused=_problem(refused), position_ids=position_ids, documents=documents, keys=keys,
                     padding=padding, mask_problem=_problem(mask_problem), packed=packed, mixers=mixers or None,
                     lost=lost or None, given_mask=_problem(given_mask))
    judge(call, group_by_name(group), query.shape[0], query.shape[2], query.device, raise_lost=True)
    return query.new_zeros(())


@_judge_op.register_fake
def _(query, *args):
    return query.new_zeros(())
