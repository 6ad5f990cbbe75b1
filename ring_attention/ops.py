"""The core as ``torch.library`` custom ops: ``torch.compile(..., fullgraph=True)`` with no graph break.

Dynamo cannot trace point-to-point messages, host-side plans or reads of ``cu_seqlens``'s values without breaking
the graph. So under ``torch.compile`` `ring_attention.ring_dilated_attention` calls three custom ops, each one
opaque piece of work with a fake (meta) implementation that gives its outputs' shapes, and registered autograd:

- ``ring_attention::attention``: every pair of one call, forward: this rank's output and its log-sum-exp;
- ``ring_attention::attention_backward``: the same call's dq, dk, dv (its autograd formula);
- ``ring_attention::all_to_all``: the all-to-all over heads of ``ulysses_size > 1``, whose backward is the
  inverse all-to-all.

The plan (pairs, offsets, shards, document pieces) is made inside the ops from their arguments — Python ints,
strings and the ``cu_seqlens`` tensor — and cached as in eager mode, never traced: the boundaries are a graph input,
so new documents change no graph. The process group travels by name. What the eager backward keeps from its forward
(the re-laid rows of a balanced pair, the gathered keys of documents) is recomputed here, since an op's backward can
only see tensors: the results are the same, a balanced pair's backward re-lays q, k, v once more.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ring_attention.kernels import lse_dtype
from ring_attention.pattern import as_row_viewable
from ring_attention.ulysses import _all_to_all, ulysses_groups

# the call's configuration as op arguments, in the order of `ring_attention.functional.CallConfig`
_CONFIG = ("segment_lengths", "dilation_rates", "causal", "head_mode", "comm", "backend", "scale", "load_balance",
           "ulysses_size", "num_heads", "num_kv_heads")


def group_name(group: dist.ProcessGroup | None) -> str:
    """How a custom op takes a process group: its registered name, ``""`` for none (one process)."""
    return "" if group is None else group.group_name


def group_by_name(name: str) -> dist.ProcessGroup | None:
    """The process group a custom op was given by `group_name`."""
    return dist.distributed_c10d._resolve_process_group(name) if name else None


def _config(args) -> object:
    from ring_attention.functional import CallConfig

    values = dict(zip(_CONFIG, args))
    values["segment_lengths"], values["dilation_rates"] = tuple(values["segment_lengths"]), tuple(
        values["dilation_rates"])
    return CallConfig(**values)


def _parts(q, k, cu_seqlens, config, group_name: str, check: bool):
    """The call's parts; with ``check``, first the ranks' agreement on their shards and documents."""
    from ring_attention.functional import call_parts, checked_documents

    group = group_by_name(group_name)
    size = 1 if group is None else group.size()
    seq_len = q.shape[1] * size // config.ulysses_size
    rows = checked_documents(cu_seqlens, seq_len, q.shape[0], q.device, q, k, group if check else None)
    return call_parts(q, rows, config, group)


@torch.library.custom_op("ring_attention::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
              segment_lengths: list[int], dilation_rates: list[int], causal: bool, head_mode: str, comm: str,
              backend: str, scale: float, load_balance: bool, ulysses_size: int, num_heads: int, num_kv_heads: int,
              group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair of one call on this rank's ``q``, ``k``, ``v`` (after the all-to-all): ``(out, lse)``."""
    from ring_attention.functional import _autocast_off

    config = _config((segment_lengths, dilation_rates, causal, head_mode, comm, backend, scale, load_balance,
                      ulysses_size, num_heads, num_kv_heads))
    parts = _parts(q, k, cu_seqlens, config, group_name, ulysses_size == 1)  # else the all-to-all's op checked
    q, k, v = (as_row_viewable(t) for t in (q, k, v))
    acc_dtype = lse_dtype(q.dtype)
    out = q.new_zeros(q.shape, dtype=acc_dtype)  # [B, L, H, D]
    lse = q.new_full(q.shape[:3], -math.inf, dtype=acc_dtype)  # [B, L, H]
    with _autocast_off(q.device.type):
        for part in parts:
            part.forward(q, k, v, out, lse)
    return out.to(q.dtype), lse


@attention.register_fake
def _(q, k, v, cu_seqlens, *args):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


@torch.library.custom_op("ring_attention::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, cu_seqlens: torch.Tensor | None, segment_lengths: list[int],
                       dilation_rates: list[int], causal: bool, head_mode: str, comm: str, backend: str, scale: float,
                       load_balance: bool, ulysses_size: int, num_heads: int, num_kv_heads: int,
                       group_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of `attention`, given its output and LSE."""
    from ring_attention.functional import _autocast_off

    config = _config((segment_lengths, dilation_rates, causal, head_mode, comm, backend, scale, load_balance,
                      ulysses_size, num_heads, num_kv_heads))
    parts = _parts(q, k, cu_seqlens, config, group_name, False)
    q, k, v, dout = (as_row_viewable(t) for t in (q, k, v, dout))
    grads = [torch.zeros(t.shape, dtype=lse_dtype(q.dtype), device=t.device) for t in (q, k, v)]
    with _autocast_off(q.device.type):
        for part in parts:
            part.backward(dout, q, k, v, out, lse, grads, None)
    return tuple(grad.to(t.dtype) for grad, t in zip(grads, (q, k, v)))


@attention_backward.register_fake
def _(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_context(ctx, inputs, output):
    q, k, v, cu_seqlens, *config = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens, *output)
    ctx.config = config


def _attention_grads(ctx, dout, dlse):
    q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, cu_seqlens, *ctx.config)
    return dq, dk, dv, None, *([None] * len(ctx.config))


attention.register_autograd(_attention_grads, setup_context=_attention_context)


@torch.library.custom_op("ring_attention::all_to_all", mutates_args=())
def all_to_all(tensors: list[torch.Tensor], cu_seqlens: torch.Tensor | None, group_name: str, ulysses_size: int,
               to_heads: bool, check: bool) -> list[torch.Tensor]:
    """`ring_attention.ulysses`'s all-to-all of each tensor, sequence shards to head shards (``to_heads``) or back;
    with ``check`` (q, k, v on their way in) it first checks that the ranks agree on their shards and documents."""
    group = group_by_name(group_name)
    sub = ulysses_groups(group, ulysses_size)[0]
    if check:
        from ring_attention.functional import checked_documents

        q, k = tensors[:2]
        checked_documents(cu_seqlens, q.shape[1] * group.size(), q.shape[0], q.device, q, k, group)
    return [_all_to_all(t, sub, to_heads) for t in tensors]


@all_to_all.register_fake
def _(tensors, cu_seqlens, group_name, ulysses_size, to_heads, check):
    u = ulysses_size
    return [t.new_empty((t.shape[0], t.shape[1] * u, t.shape[2] // u, *t.shape[3:])) if to_heads else
            t.new_empty((t.shape[0], t.shape[1] // u, t.shape[2] * u, *t.shape[3:])) for t in tensors]


def _all_to_all_context(ctx, inputs, output):
    ctx.group_name, ctx.ulysses_size, ctx.to_heads = inputs[2:5]


def _all_to_all_grads(ctx, grads):
    inverse = all_to_all(list(grads), None, ctx.group_name, ctx.ulysses_size, not ctx.to_heads, False)
    return inverse, None, None, None, None, None


all_to_all.register_autograd(_all_to_all_grads, setup_context=_all_to_all_context)


def _as_tensor(cu_seqlens, seq_len: int) -> torch.Tensor | None:
    """``cu_seqlens`` as one 1-D tensor: a list of ints as it is, one list per row in flash-attn's batch convention
    (the rows laid end to end)."""
    if cu_seqlens is None or isinstance(cu_seqlens, torch.Tensor):
        return cu_seqlens
    if all(isinstance(x, int) for x in cu_seqlens):
        return torch.tensor(list(cu_seqlens), dtype=torch.int64)
    rows = [torch.as_tensor(row, dtype=torch.int64) for row in cu_seqlens]
    return torch.cat([rows[0], *(row[1:] + b * seq_len for b, row in enumerate(rows) if b > 0)])


def compiled_attention(q, k, v, cu_seqlens, config, group) -> torch.Tensor:
    """`ring_dilated_attention` through the custom ops (under ``torch.compile``)."""
    group_key = group_name(group)
    size = 1 if group is None else group.size()
    cu_seqlens = _as_tensor(cu_seqlens, q.shape[1] * size)
    values = [getattr(config, name) for name in _CONFIG]
    values[0], values[1] = list(values[0]), list(values[1])
    if config.ulysses_size > 1:
        q, k, v = all_to_all([q, k, v], cu_seqlens, group_key, config.ulysses_size, True, True)
    out, _ = attention(q, k, v, cu_seqlens, *values, group_key)
    if config.ulysses_size > 1:
        (out,) = all_to_all([out], None, group_key, config.ulysses_size, False, False)
    return out
