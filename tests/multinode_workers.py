"""The script the two-node test runs under two ``torchrun`` launchers (one per "node", 2 ranks each, gloo):

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT \
        tests/multinode_workers.py OUTPUT_DIR

Two layouts of the 4 ranks, each training `production_workers`' two-layer model for 3 steps with the documented
recipe (DDP over every rank, each rank's loss times the sequence group's size): one sequence group of all 4 ranks,
spanning both nodes; and a sequence group inside each node, data parallel across the nodes. Each rank saves its
losses, parameters and where it ran to ``OUTPUT_DIR/rank{R}.pt``; the test compares them with one process.
"""

import os
import sys

import production_workers as pw
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from ring_attention import shard_sequence

LAYOUTS = {"sequence group across the nodes": (1, 4), "sequence groups inside the nodes": (2, 2)}  # (dp, sp)


def train(data_parallel: int, sequence_parallel: int, steps: int = 3) -> dict:
    """The recipe on a (dp, sp) mesh of consecutive ranks: rank r is in sequence group r // sp."""
    mesh = init_device_mesh("cpu", (data_parallel, sequence_parallel), mesh_dim_names=("dp", "sp"))
    sp, data_rank = mesh["sp"], mesh["dp"].get_local_rank()
    model = DistributedDataParallel(pw.make_model(process_group=sp))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x_full, y_full = pw.training_data()  # [4, 32, 16] each: the one-process batch
    rows = x_full.shape[0] // data_parallel
    x, y = (shard_sequence(t[data_rank * rows: (data_rank + 1) * rows], sp, dim=1) for t in (x_full, y_full))
    elements = y_full[:rows].numel()  # of this data rank's whole sequences
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).sum() / elements * sp.size()  # DDP averages over dp x sp: sum over sp
        loss.backward()
        optimizer.step()
        whole = loss.detach() / sp.size()
        dist.all_reduce(whole)
        losses.append(whole.item() / data_parallel)
    members = dist.get_process_group_ranks(sp.get_group())
    return dict(losses=losses, sequence_group=members,
                params={name: p.detach().clone() for name, p in model.module.named_parameters()})


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    where = dict(rank=rank, node=int(os.environ["GROUP_RANK"]), local_rank=int(os.environ["LOCAL_RANK"]))
    layouts = {name: train(*shape) for name, shape in LAYOUTS.items()}
    torch.save(dict(where=where, layouts=layouts), os.path.join(output_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
