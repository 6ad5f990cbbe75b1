"""Train a small causal language model under data x sequence parallelism: the recipe of "Use it in your model".

    torchrun --nproc-per-node 4 examples/data_sequence_parallel.py --sp-size 2    # 2 data x 2 sequence ranks
    torchrun --nproc-per-node 8 examples/data_sequence_parallel.py --sp-size 4    # on 8 GPUs: NCCL, one per rank
    python examples/data_sequence_parallel.py                                     # one process, the same training

The processes form a ``(dp, sp)`` mesh: ``--sp-size`` ranks share each sequence (``RingMultiheadDilatedAttention``
gets the mesh's ``"sp"`` dimension), and the batch is split over the ``dp = world size / sp`` data ranks. Rank
``(d, s)`` holds data shard ``d`` of every batch and the contiguous slice ``s`` of each of its sequences. Its loss
covers its own tokens, normalised by all the tokens of its data shard; ``DistributedDataParallel`` over all ranks
averages the gradients over ``dp x sp`` ranks, so the loss is multiplied by ``sp``: the weight gradients are then
summed over the sequence ranks and averaged over the data ranks, which is the gradient of the whole batch's mean
loss. Every rank prints nothing but rank 0, which prints the loss of the whole batch at every step; with the same
``--seed`` the losses (and, with ``--save``, the parameters) are those of one process training on the whole batch.
The data are generated (nothing is downloaded): sequences that count up from a random start, which a model learns
in a few steps. The device is a GPU per process when CUDA is available (NCCL), else the CPU (gloo).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from ring_attention import RingMultiheadDilatedAttention, shard_sequence

SEGMENTS, RATES = [64, 256], [1, 4]  # on 2 sequence ranks of 128 tokens, (64, 1) is local and (256, 4) spans both
VOCAB = 64


class Block(nn.Module):
    """A pre-norm transformer block whose attention is ring dilated attention over ``process_group``."""

    def __init__(self, embed_dim: int, heads: int, process_group, dtype: torch.dtype):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, dtype=dtype)
        self.attention = RingMultiheadDilatedAttention(
            embed_dim, heads, batch_first=True, dtype=dtype, segment_lengths=SEGMENTS, dilation_rates=RATES,
            causal=True, process_group=process_group,
        )
        self.norm2 = nn.LayerNorm(embed_dim, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim, dtype=dtype), nn.GELU(),
                                 nn.Linear(4 * embed_dim, embed_dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a linear head. ``positions`` are the global positions of
    this rank's tokens."""

    def __init__(self, seq_len: int, process_group=None, *, embed_dim: int = 32, heads: int = 4, layers: int = 2,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.token = nn.Embedding(VOCAB, embed_dim, dtype=dtype)
        self.position = nn.Embedding(seq_len, embed_dim, dtype=dtype)
        self.blocks = nn.ModuleList(Block(embed_dim, heads, process_group, dtype) for _ in range(layers))
        self.head = nn.Linear(embed_dim, VOCAB, dtype=dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def mesh_shape(world_size: int, sp_size: int | None, batch: int) -> tuple[int, int]:
    """``(dp, sp)`` for ``world_size`` processes; ``sp_size=None`` puts every process on one sequence."""
    sp = world_size if sp_size is None else sp_size
    if sp < 1 or world_size % sp:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(f"--sp-size {sp} must divide the number of processes {world_size} (the world size "
                         f"torchrun starts): use one of {divisors}, or start a multiple of {sp} processes")
    dp = world_size // sp
    if batch % dp:
        raise ValueError(f"--batch {batch} must be divisible by the {dp} data-parallel ranks "
                         f"(world size {world_size} / --sp-size {sp}): use a multiple of {dp}")
    return dp, sp


def counting_batches(steps: int, batch: int, seq_len: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same (inputs, next-token targets) ``[batch, seq_len]`` on every rank: counting from random starts."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, VOCAB, (batch, 1), generator=gen)
        tokens = (starts + torch.arange(seq_len + 1)) % VOCAB  # [batch, seq_len + 1]
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sp-size", type=int, default=None,
                        help="ranks that share one sequence (default: all of them, one data-parallel rank)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step, over all data-parallel ranks")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--save", help="write the final parameters and the losses here (rank 0)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dp_size, sp_size = mesh_shape(world_size, args.sp_size, args.batch)

    # --8<-- [start:mesh]
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
              else torch.device("cpu"))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        mesh = init_device_mesh(device.type, (dp_size, sp_size), mesh_dim_names=("dp", "sp"))
        sp_group, dp_rank = mesh["sp"], mesh["dp"].get_local_rank()
    else:
        sp_group, dp_rank = None, 0  # one process: no sequence parallelism, the whole batch
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = TinyLM(args.seq_len, sp_group, dtype=dtype).to(device)  # every attention layer gets mesh["sp"]
    if world_size > 1:
        model = DistributedDataParallel(model)  # over all dp x sp ranks: it averages the gradients
    # --8<-- [end:mesh]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    local_batch = args.batch // dp_size
    positions = torch.arange(args.seq_len).expand(args.batch, args.seq_len)  # global positions, [batch, seq_len]
    losses = []
    for inputs, targets in counting_batches(args.steps, args.batch, args.seq_len, args.seed):
        # --8<-- [start:step]
        mine = slice(dp_rank * local_batch, (dp_rank + 1) * local_batch)  # this data rank's sequences
        inputs, targets, pos = (shard_sequence(t[mine], sp_group, dim=1).to(device)
                                for t in (inputs, targets, positions))  # and this sequence rank's slice of them
        logits = model(inputs, pos)
        token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        loss = token_loss / (local_batch * args.seq_len) * sp_size  # x sp against DDP's average over dp x sp
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # --8<-- [end:step]
        batch_loss = token_loss.detach() / (args.batch * args.seq_len)  # summed over all ranks: the batch's mean
        if world_size > 1:
            dist.all_reduce(batch_loss)
        losses.append(batch_loss.item())
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"step {len(losses) - 1}: loss {losses[-1]:.6f}")
    if args.save and int(os.environ.get("RANK", 0)) == 0:
        trained = model.module if world_size > 1 else model
        torch.save(dict(losses=losses, parameters={n: p.detach().cpu() for n, p in trained.named_parameters()}),
                   args.save)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
