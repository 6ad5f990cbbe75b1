"""Functions run on spawned ranks by the tests (importable: the ranks import them by name)."""

import importlib
import time

import torch
import torch.distributed as dist

import lessons.stage2_true_ring as stage2
from lessons.harness import Problem, run_battery, run_stage, shard


def raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one gives up")
    dist.barrier()  # the other ranks wait for rank 1 here, forever unless the launcher stops them
    return rank


def sleep_forever(rank, world_size):
    time.sleep(3600)


def shard_shapes_disagree(rank, world_size, module):
    problem = Problem(seq_len=64, segment_lengths=(16, 64), dilation_rates=(1, 2))
    q, k, v, _ = problem.inputs()
    length = 16 if rank == 1 else 32  # rank 1 got the wrong slice
    return __import__(module, fromlist=["x"]).ring_dilated_attention(q[:, :length], k[:, :length], v[:, :length],
                                                                     [16, 64], [1, 2])


def record_exchanged_shapes(rank, world_size, problem: Problem):
    """Run stage 2 forward and backward and return the shape of every tensor sent to another rank."""
    sent = []
    original = stage2.exchange

    def recording_exchange(tensors, send_to, recv_from, group):
        sent.extend(tuple(t.shape) for t in tensors)
        return original(tensors, send_to, recv_from, group)

    stage2.exchange = recording_exchange
    try:
        run_stage(rank, world_size, "lessons.stage2_true_ring", problem)
    finally:
        stage2.exchange = original
    return sent


def all_reduce_sum(rank, world_size):
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    return x


def stage3_groups_are_cached(rank, world_size):
    """Call stage 3 twice; return how many process groups each call created and the cached groups."""
    import lessons.stage3_collective as stage3

    created = []
    original = dist.new_group

    def counting_new_group(*args, **kwargs):
        created.append(args[0] if args else kwargs.get("ranks"))
        return original(*args, **kwargs)

    dist.new_group = counting_new_group
    problem = Problem(segment_lengths=(32, 128, 256), dilation_rates=(1, 4, 8))
    counts = []
    try:
        for _ in range(2):
            before = len(created)
            run_stage(rank, world_size, "lessons.stage3_collective", problem)
            counts.append(len(created) - before)
    finally:
        dist.new_group = original
    return counts, sorted(stage3.SEGMENT_GROUPS)


def stage3_in_a_subgroup(rank, world_size):
    import lessons.stage3_collective as stage3

    half = dist.new_group([0, 1])
    if rank < 2:
        q = torch.zeros(1, 8, 2, 4)
        stage3.ring_dilated_attention(q, q, q, [16], [1], group=half)
    return rank


def largest_tensor_created(rank, world_size, module, problem: Problem):
    """The most elements of any tensor an operator returns while ``module`` runs forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return result

    attention = importlib.import_module(module).ring_dilated_attention
    q, k, v, grad_out = (shard(t, rank, world_size).clone() for t in problem.inputs())
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    with LargestOutput():
        out = attention(q, k, v, list(problem.segment_lengths), list(problem.dilation_rates), **problem.options())
        torch.autograd.grad(out, (q, k, v), grad_out)
    return LargestOutput.largest


def stage4_overlap_on_and_off(rank, world_size, problem: Problem):
    stage = "lessons.stage4_flash"
    return [run_stage(rank, world_size, stage, problem, {"overlap": overlap}) for overlap in (True, False)]


def run_batteries(rank, world_size, batteries):
    """``run_battery`` for each (problems, modules) pair, in one process start."""
    return [run_battery(rank, world_size, problems, modules) for problems, modules in batteries]


def balance_checks(rank, world_size, q, k, v):
    """The zigzag re-layout of 24 rows per rank, forth and back; and a causal pair whose rows do not halve."""
    import ring_attention
    from ring_attention.balance import relayout

    rows = torch.arange(24 * rank, 24 * rank + 24).float().reshape(1, 24)  # this rank's rows, numbered
    zigzag = relayout([rows], list(range(world_size)), rank, dist.group.WORLD, to_zigzag=True)[0]
    back = relayout([zigzag], list(range(world_size)), rank, dist.group.WORLD, to_zigzag=False)[0]
    shards = [t.chunk(world_size, dim=1)[rank] for t in (q, k, v)]
    odd = ring_attention.ring_dilated_attention(*shards, [24, 96], [1, 8], causal=True, group=dist.group.WORLD)
    return {"zigzag": zigzag.flatten(), "round trip": back.flatten(), "odd rows": odd}


def counted_bytes(rank, world_size, cases):
    """Bytes this rank receives in the forward and in forward + backward of each case (``ring_dilated_attention``
    keywords plus ``seq_len``, ``pairs``, ``heads``, ``kv_heads``, ``dtype``), counted on the real messages."""
    import ring_attention
    from lessons.harness import counting_received_bytes

    results = []
    for case in cases:
        case = dict(case)
        seq_len, (segments, rates), dtype = case.pop("seq_len"), case.pop("pairs"), case.pop("dtype")
        heads, kv_heads = case.pop("heads"), case.pop("kv_heads")
        gen = torch.Generator().manual_seed(rank)
        shard = seq_len // world_size
        q, k, v = (torch.randn(2, shard, h, 8, generator=gen).to(dtype).requires_grad_(True)
                   for h in (heads, kv_heads, kv_heads))
        with counting_received_bytes() as received:
            out = ring_attention.ring_dilated_attention(q, k, v, segments, rates, group=dist.group.WORLD, **case)
            forward = received["bytes"]
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results.append((forward, received["bytes"]))
    return results
