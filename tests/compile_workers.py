"""Run on spawned ranks by tests/test_compile.py: the core compiled with ``fullgraph=True`` against eager."""

import torch
import torch.distributed as dist

from ring_attention import ring_dilated_attention

PAIRS = ([32, 128], [1, 4])


def compiled_against_eager(rank, world_size, configs):
    """For each configuration (``ring_dilated_attention`` keywords plus ``heads``: (query, kv) heads): the largest
    difference between eager and two compiled steps (forward and every gradient), and how many frames compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    results = []
    for config in configs:
        config = dict(config)
        heads, kv_heads = config.pop("heads")
        gen = torch.Generator().manual_seed(1)
        length = 128 // world_size
        q, k, v, grad_out = (torch.randn(2, 128, h, 8, generator=gen, dtype=torch.float64)[:, rank * length:
                                                                                            (rank + 1) * length]
                             for h in (heads, kv_heads, kv_heads, heads))

        def step(fn, inputs=(q, k, v), grad_out=grad_out, config=config):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            out = fn(*leaves, *PAIRS, group=dist.group.WORLD, **config)
            return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]

        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(ring_dilated_attention, fullgraph=True, backend=counter)
        eager = step(ring_dilated_attention)
        differences = [max((a - b).abs().max().item() for a, b in zip(eager, step(compiled))) for _ in range(2)]
        results.append(dict(difference=max(differences), frames=counter.frame_count))
    return results
