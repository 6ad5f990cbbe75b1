"""Hugging Face ``transformers`` models with ring dilated attention, trained sequence-parallel (extra ``hf``).

The recipe in a training script (see the "Hugging Face models" page): one import, the switch once, and three
lines per step, with the model called with ``position_ids`` and without ``labels``::

    apply_ring_dilated_attention(model, [2048, 8192], [1, 4], process_group=sp)
    input_ids, position_ids, labels = shard_batch(batch["input_ids"], batch["labels"], process_group=sp)
    logits = model(input_ids=input_ids, position_ids=position_ids).logits
    loss = sequence_parallel_loss(logits, labels, process_group=sp)
    loss.backward()
    sum_gradients(model, sp)  # under FSDP over the data ranks; under DDP multiply the loss by sp's size instead

Packed documents (``DataCollatorWithFlattening``'s ``position_ids``) and right-padded batches (a full
``attention_mask``) go through `shard_batch` too, which then also returns the documents, ``cu_seq_lens_q``, for
the model call: ``model(input_ids=..., position_ids=..., cu_seq_lens_q=...)``. Each document then gets exactly
what it would get alone, whichever ranks it lands on; padding becomes a filler document that nobody attends to.

`apply_ring_dilated_attention` registers an attention function with ``transformers``' own attention interface
(``AttentionInterface.register``, and a mask function that makes no mask with ``AttentionMaskInterface``) under a
name that belongs to that model, switches the model to it and checks that every attention layer took the switch.
What it refuses, at the switch and at run time, is in `ring_attention.hf_checks`: every input the operator cannot
honour raises with what to do, on every rank of the sequence group together when it depends on one rank's data.

`shard_batch` gives each rank its contiguous slice of the tokens, their positions (for rotary embeddings) and
labels shifted *before* sharding, so the last token of a slice predicts the first of the next.
`sequence_parallel_loss` is this rank's share of the mean over the whole sequence: summed over the sequence
ranks, it is the single-process loss (and so are the gradients: sum them over the sequence ranks, see
`sum_gradients`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ring_attention.comm import GroupLike, group_rank_and_size, resolve_group, shard_sequence
from ring_attention.functional import ring_dilated_attention

try:
    from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
    from transformers.masking_utils import causal_mask_function

    from ring_attention import hf_checks as checks
    from ring_attention import hf_masks as masks
except ImportError as error:  # the package imports without the extra; this module needs it
    raise ImportError("ring_attention.hf needs transformers: pip install 'ring-attention[hf]'") from error

IGNORE_INDEX = -100
_NAMES = itertools.count()


def _mask_function(state: dict):
    def no_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                attention_mask=None, local_size=None, config=None, **kwargs):
        """``transformers``' mask-creation signature: the operator applies the causal (or bidirectional) pattern
        and the documents itself, so no mask is made. What it would have to apply is noted for the attention layers
        of this forward (a model may make several masks first; the notes are dropped when the forward ends), which
        refuse it on every rank together: the padding mask given, a sliding window or chunks that a layer uses, an
        overlay; and the packed-sequence indices, refused unless the layers get documents
        (`ring_attention.hf_checks.judge`)."""
        parts, packed = masks.mask_parts(mask_function)
        problem = None
        if local_size is not None:  # a sliding-window or chunked mask: unused when every layer is full
            layer_types = getattr(config, "layer_types", None)
            if layer_types is None or {"sliding_attention", "chunked_attention"} & set(layer_types):
                local = "chunked attention" if "chunked_attention" in (layer_types or ()) else "a sliding window"
                problem = NotImplementedError, f"{local} of {local_size} tokens is not supported: " + (
                    checks.sliding_window_fix(config))
        elif "overlay" in parts:
            problem = NotImplementedError, (
                "transformers asked for a mask beyond the causal one and the documents (an overlay such as image "
                "tokens attending both ways), and ring dilated attention applies its own pattern: remove the overlay")
        elif "unread" in parts:
            problem = NotImplementedError, masks.UNREAD
        state["masks"].append((attention_mask, problem))
        state["packed"].extend(packed)
        return None

    return no_mask


def _attention_function(segment_lengths, dilation_rates, group, comm, load_balance, ulysses_size, backend, state):
    def ring_dilated_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                       sliding_window=None, softcap=None, is_causal=None, position_ids=None, **kwargs):
        """``transformers``' attention-function signature: ``[B, H, L, D]`` in, ``([B, L, H, D], None)`` out; the
        documents, if any, come as ``cu_seq_lens_q`` over the whole sequence. Under ``torch.compile`` the checks run
        in a custom op when the graph runs (`ring_attention.hf_checks.judge_in_graph`), as they do here in eager."""
        call = checks.layer_call(state, module, query, key, attention_mask, kwargs, position_ids=position_ids,
                                 dropout=dropout, sliding_window=sliding_window, softcap=softcap)
        if torch.compiler.is_compiling():
            zero = checks.judge_in_graph(call, query, group)
            if call.refused is not None:  # the checks raise it first: the attention could not even be traced
                return zero.expand(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
            query = query + zero
        else:
            checks.judge(call, group, query.shape[0], query.shape[2], query.device, raise_lost=False)
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
            load_balance=load_balance, ulysses_size=ulysses_size, cu_seqlens=kwargs.get(checks.DOCUMENTS),
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
    that do not call transformers' attention interface (Bloom, GPT-Neo, MPT...), one with none, a
    multimodal model (pass its text model, as the message says), and with a process group of more than one
    rank a model with other sequence mixers (Mamba, gated delta nets, short convolutions: Jamba, Bamba,
    Qwen3-Next, LFM2...). After the switch every layer that calls the interface is checked to use it. At run
    time every input the operator cannot honour raises with what to do (a padding mask given to the model, packed
    sequences without their documents, a sliding window, soft-capping, a position bias, attention sinks,
    cross-attention, ``output_attentions``, any keyword it does not know), on every rank of the group together
    when it depends on one rank's data. Under ``torch.compile`` (``fullgraph=True`` too) the model compiles with
    no graph break: every check runs when the graph runs, inside one custom op per layer, and raises as in eager
    mode.

    Packed documents and padding: call the model with the ``cu_seq_lens_q`` that `shard_batch` returns (document
    boundaries over the whole sequence, the same on every rank); every document then gets what it would get
    alone. Refused: documents for a model whose layers do not receive them (StableLM) or with other sequence
    mixers, and ``position_ids`` that do not number each document from 0.

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
    checks.check_model(model, group)
    name = f"ring_dilated_attention_{next(_NAMES)}"
    state = checks.new_state(model, checks.sequence_mixers(model))
    AttentionInterface.register(name, _attention_function(list(segment_lengths), list(dilation_rates), group, comm,
                                                          load_balance, ulysses_size, backend, state))
    AttentionMaskInterface.register(name, _mask_function(state))
    checks.STATES[name] = state
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    checks.check_switched(model, name, previous)
    checks.guard_cross_attention(model)
    checks.guard_documents(model)
    return name


def shard_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    process_group: GroupLike,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """This rank's ``input_ids``, ``position_ids`` and next-token ``labels`` from a ``[B, N]`` batch; with packed
    documents or padding, also the documents to call the model with.

    ``labels`` (default: ``input_ids``) are those of a causal language model: the label of position ``t`` is the
    token at ``t`` (the model predicts it from ``t - 1``). They are shifted *before* the sequence is cut, so each
    rank's label at its position ``t`` is the token at ``t + 1`` (the first token of the next rank's slice for the
    last position) and ``-100`` (ignored) on the last token of every document: no label crosses a document. Pass
    the labels to `sequence_parallel_loss`, not to the model: the model's own loss would shift them again.

    Without ``position_ids`` and ``attention_mask``, each row is one sequence, ``N`` must be a multiple of the
    group's size, and the ``position_ids`` returned are the tokens' global positions: returns ``(input_ids,
    position_ids, labels)``. With either, returns ``(input_ids, position_ids, labels, cu_seq_lens_q)``: the
    sequence is padded to a multiple of the group's size with a filler document (token id 0, labels ``-100``), so is
    each row's padding, and the positions count from 0 in every document. Call the model with
    ``model(input_ids=input_ids, position_ids=position_ids, cu_seq_lens_q=cu_seq_lens_q)`` and no
    ``attention_mask``: ``cu_seq_lens_q`` holds the document boundaries over the whole padded sequence, the same on
    every rank (int32, on the CPU; flash-attn's convention: the rows laid end to end, ``[0, ..., B * N_padded]``).

    Args:
        input_ids: ``[B, N]`` token ids of the whole sequences.
        labels: ``[B, N]`` labels as a causal language model takes them, unshifted (``-100``: ignored);
            ``DataCollatorWithFlattening``'s are such. Default: ``input_ids``.
        process_group: the sequence-parallel group (``ProcessGroup`` or 1-D ``DeviceMesh``); ``None``: one process.
        position_ids: ``[B, N]`` (or ``[1, N]``) positions of packed documents, counting 0, 1, 2... within each
            document and restarting at 0 where the next one starts, as ``DataCollatorWithFlattening`` makes them.
        attention_mask: ``[B, N]``, the full (not sharded) mask of a right-padded batch, 1 for a real token and 0
            for padding, which must come after the row's real tokens.
    """
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and labels must both be [batch, seq], got {tuple(input_ids.shape)} and "
                         f"{tuple(labels.shape)}")
    group = resolve_group(process_group)
    size = group_rank_and_size(group)[1]
    batch, length = input_ids.shape
    if position_ids is None and attention_mask is None:
        if length % size:
            raise ValueError(f"the {length} tokens of each sequence do not split into {size} equal shards: pass the "
                             f"batch's attention_mask (e.g. torch.ones_like(input_ids)) to shard_batch to pad it with "
                             f"a filler document, and call the model with the cu_seq_lens_q it then returns")
        next_tokens = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, N]: what position t must predict
        positions = torch.arange(length, device=input_ids.device).expand_as(input_ids)
        return tuple(shard_sequence(t, group, dim=1) for t in (input_ids, positions, next_tokens))
    padded = -(-length // size) * size
    rows, real = _documents(input_ids, position_ids, attention_mask, padded)
    ends = torch.zeros(batch, padded + 1, dtype=torch.bool)  # [B, N_padded + 1]: a document ends before token t
    for row, boundaries in enumerate(rows):
        ends[row, list(boundaries[1:])] = True
    starts = ends[:, :-1].clone()  # [B, N_padded]: a document starts at token t
    starts[:, 0] = True
    tokens = torch.arange(padded)
    first = torch.where(starts, tokens, 0).cummax(dim=1).values  # [B, N_padded]: the first token of t's document
    # the last token of a document predicts nothing, nor does the filler
    ignored = ends[:, 1:] | (tokens >= real[:, None])  # [B, N_padded]
    device = input_ids.device
    next_tokens = F.pad(labels[:, 1:], (0, padded - length + 1), value=IGNORE_INDEX)  # [B, N_padded]
    next_tokens = next_tokens.masked_fill(ignored.to(device), IGNORE_INDEX)
    positions = (tokens - first).to(device)  # [B, N_padded]
    ids = F.pad(input_ids, (0, padded - length))
    cu_seq_lens_q = torch.tensor([0] + [row * padded + b for row, boundaries in enumerate(rows)
                                        for b in boundaries[1:]], dtype=torch.int32)
    return (*(shard_sequence(t, group, dim=1) for t in (ids, positions, next_tokens)), cu_seq_lens_q)


def _documents(input_ids: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
               padded: int) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Each row's document boundaries over the sequence padded to ``padded`` tokens (its documents, where the
    positions restart at 0, then one filler document of its padding and the tokens added), and ``[B]`` its number
    of real tokens."""
    batch, length = input_ids.shape
    real = torch.full((batch,), length)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be the full [batch, seq] = {list(input_ids.shape)} mask, not this "
                             f"rank's slice, got shape {tuple(attention_mask.shape)}")
        mask = attention_mask.cpu()
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"attention_mask must hold 1 (a real token) and 0 (padding), got the values "
                             f"{mask.unique().tolist()}")
        mask = mask.bool()
        late = (mask[:, 1:] & ~mask[:, :-1]).any(dim=1)  # [B]: a real token after padding
        if bool(late.any()):
            raise ValueError(f"attention_mask row {late.nonzero()[0].item()} is not right padding (a real token "
                             f"follows padding): shard_batch takes real tokens first, then padding "
                             f"(tokenizer.padding_side = 'right')")
        real = mask.sum(dim=1)
    restarts = torch.zeros(batch, length, dtype=torch.bool)  # [B, N]: a document other than the first starts here
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must be [batch, seq] = {list(input_ids.shape)} (or [1, {length}], shared "
                             f"by the rows), got shape {tuple(position_ids.shape)}")
        positions = position_ids.cpu().expand(batch, length)
        real_tokens = torch.arange(length) < real[:, None]
        continued = F.pad(positions[:, :-1] + 1, (1, 0), value=0)  # [B, N]: the position that continues a document
        wrong = (real_tokens & (positions != continued) & (positions != 0)).nonzero()
        if len(wrong):
            row, token = wrong[0].tolist()
            raise ValueError(f"position_ids[{row}, {token}] = {positions[row, token].item()}"
                             f"{f' after {positions[row, token - 1].item()}' if token else ''}: packed position_ids "
                             f"count 0, 1, 2... within each document and restart at 0 where the next one starts, as "
                             f"DataCollatorWithFlattening makes them")
        restarts = real_tokens & (positions == 0)
        restarts[:, 0] = False
    rows = []
    for row in range(batch):
        count = int(real[row])
        rows.append((0, *restarts[row].nonzero().flatten().tolist(), *([count] if count else []),
                     *([padded] if count < padded else [])))
    return rows, real


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
