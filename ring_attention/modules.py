"""``nn.Module`` front ends of the functional core."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ring_attention.comm import GroupLike, resolve_group
from ring_attention.functional import ring_dilated_attention
from ring_attention.padding import key_padding_documents
from ring_attention.validation import CuSeqlens


def is_causal_mask(mask: torch.Tensor, length: int) -> bool:
    """Whether ``mask`` is the ``[length, length]`` causal mask, boolean (``True``: masked) or additive (``-inf``)."""
    if mask.shape != (length, length):
        return False
    future = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return torch.equal(mask, future)
    return torch.equal(torch.isneginf(mask), future) and not mask.masked_fill(future, 0).any()


class RingDilatedAttention(nn.Module):
    """`ring_dilated_attention` as a module: ``forward(q, k, v)`` on ``[B, L, H, D]`` shards.

    Args:
        segment_lengths: segment length of each pair.
        dilation_rates: dilation rate of each pair.
        causal: each query attends only to keys at or before it.
        head_mode: ``"all"`` or ``"groups"``.
        process_group: the sequence-parallel group (``ProcessGroup`` or 1-D ``DeviceMesh``), ``None`` for none.
        comm: ``"ring"`` or ``"allgather"``.
        backend: kernel backend, ``"auto"`` by default.
        load_balance: balance the causal work of pairs whose segments span ranks (see `ring_dilated_attention`).
        ulysses_size: all-to-all over heads in sub-groups of this many ranks first (see `ring_dilated_attention`).
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        causal: bool = False,
        head_mode: str = "all",
        process_group: GroupLike = None,
        comm: str = "ring",
        backend: str = "auto",
        load_balance: bool = True,
        ulysses_size: int = 1,
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = list(segment_lengths), list(dilation_rates)
        self.causal, self.head_mode, self.process_group = causal, head_mode, process_group
        self.comm, self.backend, self.load_balance, self.ulysses_size = comm, backend, load_balance, ulysses_size

    def __deepcopy__(self, memo: dict) -> RingDilatedAttention:
        # a process group is a handle to communicators, not data: copies of a layer (``nn.TransformerEncoder``
        # clones its layer) share it, as they share the ranks
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        copied.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()})
        return copied

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool | None = None,
                cu_seqlens: CuSeqlens | None = None) -> torch.Tensor:
        """`ring_dilated_attention` of ``[B, L, H, D]`` shards; ``causal`` overrides the module's for this call and
        ``cu_seqlens`` gives the documents (boundaries over the global sequence)."""
        return ring_dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, causal=self.causal if causal is None else causal,
            head_mode=self.head_mode, group=self.process_group, comm=self.comm, backend=self.backend,
            load_balance=self.load_balance, ulysses_size=self.ulysses_size, cu_seqlens=cu_seqlens,
        )

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, causal={self.causal}, "
                f"head_mode={self.head_mode!r}, comm={self.comm!r}, backend={self.backend!r}, "
                f"load_balance={self.load_balance}, ulysses_size={self.ulysses_size}")


class RingMultiheadDilatedAttention(nn.Module):
    """A drop-in for ``nn.MultiheadAttention`` computing dilated attention on a sharded sequence.

    The positional arguments, parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``, or
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when the projections differ) and so the
    ``state_dict`` are those of ``nn.MultiheadAttention``: a trained one loads with ``load_state_dict``.
    With one pair ``(N, 1)`` and no process group the output equals ``nn.MultiheadAttention``'s.

    When ``process_group`` is given, ``query``/``key``/``value`` are this rank's contiguous slice of the
    sequence and the output is this rank's slice.

    Args:
        embed_dim: model width.
        num_heads: query heads; ``embed_dim`` must be divisible by it.
        dropout: only 0 is supported.
        bias: add biases to the input and output projections.
        add_bias_kv: not supported (it appends a key, which has no place in a segment).
        add_zero_attn: not supported, for the same reason.
        kdim: width of ``key`` (default ``embed_dim``).
        vdim: width of ``value`` (default ``embed_dim``).
        batch_first: inputs are ``[batch, seq, embed]`` instead of ``[seq, batch, embed]``.
        device: where the parameters are made.
        dtype: dtype of the parameters.
        segment_lengths: segment length of each (segment, dilation) pair.
        dilation_rates: dilation rate of each pair.
        num_kv_heads: heads of the key/value projections (grouped-query attention), default ``num_heads``.
        causal: each token attends only to tokens at or before it.
        head_mode: ``"all"`` or ``"groups"``.
        sub_layer_norm: a LayerNorm before the output projection (LongNet's MAGNETO sub-LN).
        process_group: the sequence-parallel group (``ProcessGroup`` or 1-D ``DeviceMesh``), ``None`` for none.
        comm: ``"ring"`` or ``"allgather"``.
        backend: kernel backend, ``"auto"`` by default.
        load_balance: balance the causal work of pairs whose segments span ranks (see `ring_dilated_attention`).
        ulysses_size: all-to-all over heads in sub-groups of this many ranks first (see `ring_dilated_attention`);
            it must divide ``num_heads`` and ``num_kv_heads``.
    """

    # PyTorch's Transformer layers read this attribute of their ``self_attn``: when it is True they may skip
    # ``self_attn.forward`` in evaluation (a fused kernel computing *dense* attention from ``in_proj_weight``).
    # False keeps every mode on this module's forward, so a layer computes dilated attention in training and
    # in evaluation alike. (Whether the projections are packed is ``_packed_in_proj``.)
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        num_kv_heads: int | None = None,
        causal: bool = False,
        head_mode: str = "all",
        sub_layer_norm: bool = False,
        process_group: GroupLike = None,
        comm: str = "ring",
        backend: str = "auto",
        load_balance: bool = True,
        ulysses_size: int = 1,
    ) -> None:
        super().__init__()
        if dropout != 0.0:
            raise NotImplementedError(
                f"dropout={dropout} is not supported: attention probabilities are never materialised; "
                f"apply dropout to the module's output instead"
            )
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError(
                "add_bias_kv and add_zero_attn are not supported: an extra key has no segment or position; "
                "use bias=True for projection biases"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.batch_first, self.dropout = batch_first, dropout
        kv_dim = num_kv_heads * self.head_dim
        self._packed_in_proj = self.kdim == embed_dim and self.vdim == embed_dim and kv_dim == embed_dim
        if self._packed_in_proj:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.inner_norm = nn.LayerNorm(embed_dim, **factory) if sub_layer_norm else None
        self.attention = RingDilatedAttention(
            segment_lengths, dilation_rates, causal=causal, head_mode=head_mode, process_group=process_group,
            comm=comm, backend=backend, load_balance=load_balance, ulysses_size=ulysses_size,
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def _project(self, query, key, value):
        kv_dim = self.num_kv_heads * self.head_dim
        if self._packed_in_proj:
            w_q, w_k, w_v = self.in_proj_weight.split([self.embed_dim, kv_dim, kv_dim])
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split([self.embed_dim, kv_dim, kv_dim])
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        cu_seqlens: CuSeqlens | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Attention of ``query`` over ``key``/``value`` (this rank's slice of one sequence).

        Returns ``(output, None)``: attention weights are never materialised (``nn.MultiheadAttention`` returns
        them by default; here ``need_weights=True`` raises). ``is_causal=True`` makes this call causal (as does
        ``causal=True`` at construction). ``attn_mask`` may only be the causal mask of this call's length
        (``nn.Transformer.generate_square_subsequent_mask``, float or boolean), which also makes the call causal;
        any other mask raises ``NotImplementedError``. ``key_padding_mask`` (``[batch, seq]``, ``True`` or
        ``-inf`` at padding; this rank's slice under a process group) is honoured when each row's padding is at
        the end of the whole sequence: the padding becomes a filler
        document of that row, which no real token sees, and the output rows at padding are 0 (where
        ``nn.MultiheadAttention`` returns the padded queries' attention to the real keys, which is normally
        ignored); other masks raise ``ValueError``. ``cu_seqlens`` gives packed documents (see
        `ring_dilated_attention`). ``average_attn_weights`` only matters with weights, and is accepted for
        signature compatibility.
        """
        if need_weights:
            raise NotImplementedError(
                "need_weights=True is not supported: dilated ring attention never materialises the attention "
                "weights; call with need_weights=False"
            )
        if attn_mask is not None:
            if not is_causal_mask(attn_mask, query.shape[1 if self.batch_first else 0]):
                raise NotImplementedError(
                    "attn_mask is not supported except for the causal mask: the dilation pattern is the mask; use "
                    "causal=True (or is_causal=True) for causal attention"
                )
            is_causal = True
        if query.dim() != 3:
            raise ValueError(f"query must be 3-D ([seq, batch, embed] or batch_first), got shape {tuple(query.shape)}")
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        padding = None
        if key_padding_mask is not None:  # this rank's [batch, seq] slice; the documents span every rank's
            padding, documents = key_padding_documents(key_padding_mask, query.shape[:2], cu_seqlens,
                                                       resolve_group(self.attention.process_group))
            cu_seqlens = list(documents)
        q, k, v = self._project(query, key, value)
        batch, length = q.shape[:2]
        q = q.reshape(batch, length, self.num_heads, self.head_dim)  # [B, L, H, D]
        k = k.reshape(batch, k.shape[1], self.num_kv_heads, self.head_dim)  # [B, L, H_kv, D]
        v = v.reshape(batch, v.shape[1], self.num_kv_heads, self.head_dim)
        out = self.attention(q, k, v, causal=self.attention.causal or is_causal, cu_seqlens=cu_seqlens)
        out = out.reshape(batch, length, -1)
        if self.inner_norm is not None:
            out = self.inner_norm(out)
        out = self.out_proj(out)
        if padding is not None:
            out = out.masked_fill(padding.unsqueeze(-1), 0)
        return (out if self.batch_first else out.transpose(0, 1)), None
