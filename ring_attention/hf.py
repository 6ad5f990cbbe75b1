"""Hugging Face ``transformers`` models with ring dilated attention, trained sequence-parallel (extra ``hf``).

Three lines in a training script (see the "Hugging Face models" page)::

    apply_ring_dilated_attention(model, [2048, 8192], [1, 4], process_group=sp)
    input_ids, position_ids, labels = shard_batch(batch["input_ids"], batch["labels"], process_group=sp)
    loss = sequence_parallel_loss(model(input_ids=input_ids, position_ids=position_ids).logits, labels,
                                  process_group=sp)

`apply_ring_dilated_attention` registers an attention function with ``transformers``' own attention interface
(``AttentionInterface.register``, and a mask function that makes no mask with ``AttentionMaskInterface``) under a
name that belongs to that model, and switches the model to it: every
layer that calls the interface (Llama, Mistral, Qwen2 and the other families written that way) then computes
ring dilated attention on this rank's slice of the sequence, with grouped-query heads sent as kv heads only.
What the operator cannot honour raises ``NotImplementedError``: a padding mask, a sliding window, soft-capping,
attention dropout, or a key/value cache (generation).

`shard_batch` gives each rank its contiguous slice of the tokens, their global positions (for rotary
embeddings) and labels shifted *before* sharding, so the last token of a slice predicts the first of the next.
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
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function
except ImportError as error:  # the package imports without the extra; this module needs it
    raise ImportError("ring_attention.hf needs transformers: pip install 'ring-attention[hf]'") from error

IGNORE_INDEX = -100
_NAMES = itertools.count()


_PADDING = ("a padding attention_mask is not supported by ring dilated attention: fill every sequence to the full "
            "length (give filler positions the label -100) and pass attention_mask=None")


def _no_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
             attention_mask=None, **kwargs):
    """``transformers``' mask-creation signature: the causal (or bidirectional) pattern needs no mask here, the
    operator applies it; a padding mask, packed sequences, a sliding window or an overlay are refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise NotImplementedError(_PADDING)
    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise NotImplementedError(
            "transformers asked for a mask beyond the causal one (a sliding window, packed sequences with restarting "
            "position_ids, or an overlay) and ring dilated attention applies its own pattern: set "
            "config.sliding_window = None, give each sequence its own batch row, and remove mask overlays")
    return None


def _attention_function(segment_lengths, dilation_rates, process_group, comm, load_balance, ulysses_size, backend):
    def ring_dilated_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                       sliding_window=None, softcap=None, **kwargs):
        """``transformers``' attention-function signature: ``[B, H, L, D]`` in, ``([B, L, H, D], None)`` out."""
        if attention_mask is not None:  # `_no_mask` makes none; only one handed over ready-made gets here
            raise NotImplementedError(f"an attention_mask of shape {tuple(attention_mask.shape)} is not supported: "
                                      f"ring dilated attention applies its own pattern; pass attention_mask=None")
        if sliding_window is not None:
            raise NotImplementedError(
                f"sliding_window={sliding_window} is not supported: the dilation pattern replaces it; set "
                f"config.sliding_window = None (and use_sliding_window = False) before applying")
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
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        out = ring_dilated_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), segment_lengths, dilation_rates,
            causal=causal, group=process_group, comm=comm, backend=backend, scale=scaling,
            load_balance=load_balance, ulysses_size=ulysses_size,
        )
        return out, None  # [B, L, H, D]: no attention weights are ever materialised

    return ring_dilated_attention_forward


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

    The settings belong to this model: each call registers its own function, so two models in one process may
    use different pairs or process groups. ``process_group`` is the sequence-parallel group (``None``: one process
    holds the whole sequence); its ranks must then be given `shard_batch`'s slices. Query heads use their kv
    head's dilation offset (grouped-query attention: only the kv heads' selected rows travel).
    """
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    name = f"ring_dilated_attention_{next(_NAMES)}"
    AttentionInterface.register(name, _attention_function(list(segment_lengths), list(dilation_rates),
                                                          process_group, comm, load_balance, ulysses_size, backend))
    AttentionMaskInterface.register(name, _no_mask)
    model.set_attn_implementation(name)
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


def sum_gradients(model: torch.nn.Module, process_group: GroupLike) -> None:
    """Add up every parameter's gradient over the sequence group, in place (after ``backward``).

    With DDP over all data x sequence ranks, scale the loss by the sequence group's size instead (DDP averages).
    With FSDP sharding over the data ranks only, call this after ``backward``: each sequence rank holds the same
    shards of the parameters, and its gradient covers its own tokens.
    """
    group = resolve_group(process_group)
    if group_rank_and_size(group)[1] == 1:
        return
    for parameter in model.parameters():
        if parameter.grad is not None:
            grad = parameter.grad
            dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=group)
