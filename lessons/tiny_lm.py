"""A tiny character-level language model, to show `RingMultiheadDilatedAttention` replacing
``nn.MultiheadAttention`` and training with its sequence split over processes (lesson 5).

`train` runs on one process (``group=None``) or as a spawned rank of a sequence-parallel group; it uses
the recipe of the docs ("Use it in your model"): every rank's loss covers its own tokens, normalised by
the tokens of the whole sequence, and the weight gradients are summed over the sequence ranks
(``DistributedDataParallel`` averages over ranks, so the loss is multiplied by their number).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ring_attention import RingMultiheadDilatedAttention, shard_sequence

TEXT = (
    "ring attention passes keys and values around a ring of devices so that each device holds only its own "
    "slice of a long sequence. dilated attention keeps every r-th position of each segment, so a segment of "
    "length w costs w / r keys per query. together they train on sequences no single device could hold. "
)


def encode(text: str = TEXT) -> tuple[torch.Tensor, int]:
    """Characters to ids; returns the ids and the vocabulary size."""
    vocab = sorted(set(text))
    return torch.tensor([vocab.index(c) for c in text]), len(vocab)


class Block(nn.Module):
    def __init__(self, attention: nn.Module, embed_dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.GELU(), nn.Linear(4 * embed_dim, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if isinstance(self.attention, nn.MultiheadAttention):
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            attended = self.attention(h, h, h, need_weights=False, attn_mask=mask, is_causal=True)[0]
        else:
            attended = self.attention(h, h, h)[0]
        x = x + attended
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Embeddings, ``layers`` pre-norm blocks, a linear head. ``positions`` are this rank's token positions."""

    def __init__(self, vocab: int, seq_len: int, *, dilated: bool = True, group=None, embed_dim: int = 32,
                 heads: int = 4, layers: int = 2):
        super().__init__()
        self.token, self.position = nn.Embedding(vocab, embed_dim), nn.Embedding(seq_len, embed_dim)

        def attention() -> nn.Module:
            if not dilated:
                return nn.MultiheadAttention(embed_dim, heads, batch_first=True)
            return RingMultiheadDilatedAttention(
                embed_dim, heads, batch_first=True, segment_lengths=[16, seq_len], dilation_rates=[1, 4],
                causal=True, process_group=group,
            )

        self.blocks = nn.ModuleList(Block(attention(), embed_dim) for _ in range(layers))
        self.head = nn.Linear(embed_dim, vocab)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def batches(steps: int, batch: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same (inputs, next-character targets) on every rank: windows of the text at seeded offsets."""
    ids, _ = encode()
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
        window = torch.stack([ids[s: s + seq_len + 1] for s in starts.tolist()])
        out.append((window[:, :-1], window[:, 1:]))
    return out


def train(rank: int = 0, world_size: int = 1, steps: int = 20, dilated: bool = True, seq_len: int = 64,
          batch: int = 4) -> list[float]:
    """Train from a fixed initialisation; returns the loss of every step (of the whole sequence)."""
    group = dist.group.WORLD if world_size > 1 else None
    torch.manual_seed(0)
    model = TinyLM(encode()[1], seq_len, dilated=dilated, group=group)
    if group is not None:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    positions = shard_sequence(torch.arange(seq_len).expand(batch, seq_len), group, dim=1)
    losses = []
    for inputs, targets in batches(steps, batch, seq_len):
        inputs, targets = shard_sequence(inputs, group, dim=1), shard_sequence(targets, group, dim=1)
        logits = model(inputs, positions)
        # this rank's tokens, normalised by all tokens of the batch; x world_size against DDP's average
        token_loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        loss = token_loss / (batch * seq_len) * world_size
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total = token_loss.detach() / (batch * seq_len)
        if group is not None:
            dist.all_reduce(total, group=group)
        losses.append(total.item())
    return losses
