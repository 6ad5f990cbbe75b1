"""Train a model holding ring dilated attention under DeepSpeed ZeRO-2 or ZeRO-3, with each sequence split over
ranks, and check every update against one process training on whole sequences.

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/deepspeed_zero.py --stage 3       # CPU, gloo
    torchrun --nproc-per-node 8 examples/deepspeed_zero.py --stage 3 --sequence-parallel-size 4  # GPUs, NCCL

The recipe (``--sequence-group ring-attention``, the default): DeepSpeed sees plain data parallelism over every
rank, the attention layers get the sequence-parallel group, and each rank's loss — its share of the mean over
whole sequences — is multiplied by the sequence group's size, because ZeRO averages gradients over all the
ranks it reduces over while the shares must be summed over the sequence ranks. The two other layouts hand
the sequence group to DeepSpeed itself (``deepspeed``: its ``parallel_state_sp`` as ``mpu``; ``mesh``:
``mesh_param``) with the shares unscaled, as DeepSpeed then sums over its sequence ranks; they are here to
measure the two configurations that silently give wrong updates (see the "DeepSpeed ZeRO" page).

Every rank also trains the same model on the whole batch in one process (the model is small) and prints the
largest relative difference of the parameters after each step, and of the first update.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from ring_attention import RingMultiheadDilatedAttention, shard_sequence

SEGMENTS, RATES = [8, 32], [1, 2]  # N = 32: on 2 sequence ranks (8, 1) is local and (32, 2) spans both
EMBED, HEADS, SEQ_LEN, LR = 16, 4, 32, 0.1


class Model(nn.Module):
    """Two dilated attention layers with a residual MLP between them."""

    def __init__(self, process_group=None):
        super().__init__()
        options = dict(batch_first=True, segment_lengths=SEGMENTS, dilation_rates=RATES, causal=True,
                       process_group=process_group)
        self.attn1 = RingMultiheadDilatedAttention(EMBED, HEADS, **options)
        self.mlp = nn.Sequential(nn.Linear(EMBED, 32), nn.GELU(), nn.Linear(32, EMBED))
        self.attn2 = RingMultiheadDilatedAttention(EMBED, HEADS, num_kv_heads=2, **options)

    def forward(self, x):
        x = x + self.attn1(x, x, x)[0]
        x = x + self.mlp(x)
        return x + self.attn2(x, x, x)[0]


def initial_model(process_group=None) -> Model:
    torch.manual_seed(0)  # the same initial weights on every rank and in the one-process run
    return Model(process_group)


def training_data(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(batch, SEQ_LEN, EMBED, generator=generator)  # [B, N, E]
    return x, torch.randn(batch, SEQ_LEN, EMBED, generator=generator)


def flat(parameters: dict) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for _, p in sorted(parameters.items())])


def one_process(steps: int, batch: int) -> tuple[list[float], list[torch.Tensor]]:
    """Losses, and parameters (flattened) at the start and after each step, of plain SGD on whole sequences."""
    model = initial_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = training_data(batch)
    losses, history = [], [flat(dict(model.named_parameters()))]
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        history.append(flat(dict(model.named_parameters())))
    return losses, history


def full_parameters(engine, stage: int) -> torch.Tensor:
    """This rank's view of all parameters, flattened (ZeRO-3 holds a partition: gather it for the look)."""
    import deepspeed

    parameters = dict(engine.module.named_parameters())
    if stage < 3:
        return flat(parameters)
    with deepspeed.zero.GatheredParameters(list(parameters.values())):
        return flat(parameters)


def train(rank: int, world_size: int, stage: int, sequence_group: str = "ring-attention", reduce_scatter: bool = True,
          sequence_parallel_size: int | None = None, steps: int = 3) -> dict:
    """Train ``steps`` SGD steps under ZeRO ``stage`` on the process group this process has joined; return the
    losses of whole sequences, the flattened parameters at the start and after each step (this rank's view), and
    the same two of one process."""
    import deepspeed
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    sp = sequence_parallel_size or world_size
    if world_size % sp or steps < 1:
        raise ValueError(f"sequence_parallel_size={sp} must divide the world size {world_size}, and steps={steps} "
                         f"must be at least 1")
    dp = world_size // sp
    os.environ.setdefault("LOCAL_RANK", str(rank))  # DeepSpeed asks for it; torchrun sets it
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the group this process has joined
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "reduce_scatter": reduce_scatter},
              "zero_allow_untested_optimizer": True}  # a client torch optimizer: plain SGD keeps updates exact
    extra = {}
    mesh = init_device_mesh(deepspeed.get_accelerator().device_name(), (dp, sp), mesh_dim_names=("dp", "sp"))
    group, loss_factor = mesh["sp"], 1  # DeepSpeed's own layouts sum over their sequence ranks: shares unscaled
    if sequence_group == "ring-attention":
        loss_factor = sp  # ZeRO averages over all dp x sp ranks, and the shares must be summed over sp
    elif sequence_group == "deepspeed":
        if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None:  # once per process
            parallel_state_sp.initialize_sequence_parallel(sp)
        group, extra["mpu"] = parallel_state_sp.get_sequence_parallel_group(), parallel_state_sp
    elif sequence_group == "mesh":
        extra["mesh_param"] = (dp, sp)  # DeepSpeed builds its mesh of the same ranks
    else:
        raise ValueError(f"sequence_group must be 'ring-attention', 'deepspeed' or 'mesh', got {sequence_group!r}")

    model = initial_model(group)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=config, **extra)

    x, y = training_data(2 * dp)
    data_rank = dist.get_rank() // sp
    x, y = (shard_sequence(t[2 * data_rank: 2 * data_rank + 2], group, dim=1).to(engine.device) for t in (x, y))
    tokens = 2 * SEQ_LEN * EMBED  # elements of this data rank's whole sequences
    losses, history = [], [full_parameters(engine, stage)]
    for _ in range(steps):
        share = ((engine(x) - y) ** 2).sum() / tokens  # summed over the sequence ranks: the data rank's mean
        engine.backward(share * loss_factor)
        engine.step()
        whole = share.detach().clone()
        dist.all_reduce(whole)
        losses.append(whole.item() / dp)
        history.append(full_parameters(engine, stage))
    one_process_losses, one_process_history = one_process(steps, 2 * dp)
    return dict(losses=losses, history=history, one_process_losses=one_process_losses,
                one_process_history=one_process_history)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference relative to the largest entry of ``expected``."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def size_along(update: torch.Tensor, expected: torch.Tensor) -> float:
    """How much of ``expected`` the update applies: 1 for the right update, 0.5 for half of it."""
    return (torch.dot(update, expected) / expected.square().sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(2, 3), default=3, help="ZeRO stage")
    parser.add_argument("--sequence-group", choices=("ring-attention", "deepspeed", "mesh"), default="ring-attention",
                        help="who holds the sequence group (only the default gives correct updates everywhere)")
    parser.add_argument("--no-reduce-scatter", action="store_true", help='set "reduce_scatter": false')
    parser.add_argument("--sequence-parallel-size", type=int, help="ranks per sequence (default: all)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    result = train(dist.get_rank(), dist.get_world_size(), args.stage, args.sequence_group,
                   not args.no_reduce_scatter, args.sequence_parallel_size, args.steps)
    history, reference = result["history"], result["one_process_history"]
    update, expected = history[1] - history[0], reference[1] - reference[0]
    after = [f"{relative(h, r):.1e}" for h, r in zip(history[1:], reference[1:])]
    summaries = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, f"first update: relative error {relative(update, expected):.1e}, "
                                      f"{size_along(update, expected):.3f} of one process's; parameters after each "
                                      f"step: relative error {', '.join(after)}")
    if dist.get_rank() == 0:
        print(f"ZeRO-{args.stage}, sequence group: {args.sequence_group}, reduce_scatter: "
              f"{not args.no_reduce_scatter}; losses {', '.join(f'{x:.5f}' for x in result['losses'])}")
        for rank, summary in enumerate(summaries):
            print(f"  rank {rank}: {summary}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
