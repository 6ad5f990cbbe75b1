"""Functions run on spawned ranks by the production tests (importable: the ranks import them by name)."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

import ring_attention
from ring_attention import RingMultiheadDilatedAttention, gather_sequence, shard_sequence

SEGMENTS, RATES = [8, 32], [1, 2]  # N = 32: on 2 sequence ranks, (8, 1) is local and (32, 2) spans both


class TwoLayerModel(nn.Module):
    """Two dilated attention layers with a residual MLP between them, as in a small transformer."""

    def __init__(self, process_group=None, embed_dim=16, heads=4):
        super().__init__()
        options = dict(batch_first=True, dtype=torch.float64, segment_lengths=SEGMENTS, dilation_rates=RATES,
                       causal=True, process_group=process_group)
        self.attn1 = RingMultiheadDilatedAttention(embed_dim, heads, **options)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 32, dtype=torch.float64), nn.GELU(),
                                 nn.Linear(32, embed_dim, dtype=torch.float64))
        self.attn2 = RingMultiheadDilatedAttention(embed_dim, heads, num_kv_heads=2, sub_layer_norm=True, **options)

    def forward(self, x):
        x = x + self.attn1(x, x, x)[0]
        x = x + self.mlp(x)
        return x + self.attn2(x, x, x)[0]


def training_data(batch=4, seq_len=32, embed_dim=16):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, seq_len, embed_dim, generator=gen, dtype=torch.float64)
    return x, torch.randn(batch, seq_len, embed_dim, generator=gen, dtype=torch.float64)


def make_model(process_group=None):
    torch.manual_seed(0)
    return TwoLayerModel(process_group)


def train_single_process(steps=3):
    """Reference: one process, the full batch and the full sequence, mean squared error."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = training_data()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def train_data_and_sequence_parallel(rank, world_size, steps=3):
    """The documented recipe on a (dp=2) x (sp=2) mesh: DDP over all ranks, loss scaled by the sp size."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    sp, dp_rank = mesh["sp"], mesh["dp"].get_local_rank()
    model = DistributedDataParallel(make_model(process_group=sp))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = training_data()
    batch_slice = slice(2 * dp_rank, 2 * dp_rank + 2)  # this data-parallel rank's half of the batch
    x_local, y_local = (shard_sequence(t[batch_slice], sp, dim=1) for t in (x, y))
    full_tokens_per_rank_batch = y_local.shape[0] * y.shape[1] * y.shape[2]  # elements of its full sequences
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        # this rank's share of its data shard's mean; DDP averages over all dp x sp ranks, so scale by sp
        loss = ((model(x_local) - y_local) ** 2).sum() / full_tokens_per_rank_batch * sp.size()
        loss.backward()
        optimizer.step()
        global_loss = loss.detach() / sp.size()
        dist.all_reduce(global_loss)
        losses.append((global_loss / mesh["dp"].size()).item())
    return losses, {name: p.detach().clone() for name, p in model.module.named_parameters()}


def checkpointed_and_plain_gradients(rank, world_size):
    torch.manual_seed(0)
    layer = RingMultiheadDilatedAttention(16, 4, batch_first=True, dtype=torch.float64, segment_lengths=SEGMENTS,
                                          dilation_rates=RATES, causal=True, process_group=dist.group.WORLD)
    x_full, _ = training_data()
    results = []
    for use_checkpoint in (False, True):
        layer.zero_grad()
        x = shard_sequence(x_full, dist.group.WORLD, dim=1).clone().requires_grad_(True)
        if use_checkpoint:
            out = torch.utils.checkpoint.checkpoint(lambda t: layer(t, t, t)[0], x, use_reentrant=False)
        else:
            out = layer(x, x, x)[0]
        out.square().sum().backward()
        results.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    return results


def transformer_encoder(rank, world_size, x):
    """``nn.TransformerEncoder`` (which deep-copies its layer) with dilated self-attention on a sequence group:
    this rank's rows in training and in evaluation."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True, dtype=torch.float64)
    group = dist.group.WORLD if world_size > 1 else None
    layer.self_attn = RingMultiheadDilatedAttention(16, 4, batch_first=True, dtype=torch.float64,
                                                    segment_lengths=SEGMENTS, dilation_rates=RATES, causal=True,
                                                    process_group=group)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    mine = shard_sequence(x, group, dim=1)
    training = encoder(mine)
    encoder.eval()
    with torch.inference_mode():
        evaluation = encoder(mine)
    return training.detach(), evaluation


def bad_sequence_groups(rank, world_size):
    """Each rank's error for shards the group cannot split, and for ranks whose shards disagree."""
    cases = {
        "documents": torch.zeros(1, 16, 2, 4),  # the ranks were given different cu_seqlens
        "shapes": torch.zeros(1, 16 if rank == 0 else 8, 2, 4),
        "dtypes": torch.zeros(1, 16, 2, 4, dtype=torch.float32 if rank == 0 else torch.float64),
        "ulysses_size 3": torch.zeros(1, 16, 2, 4),
        "ulysses_size 2, 3 heads": torch.zeros(1, 16, 3, 4),
    }
    errors = {}
    for case, q in cases.items():
        ulysses_size = int(case.split()[1].strip(",")) if case.startswith("ulysses") else 1
        documents = [0, 5 + rank, 32] if case == "documents" else None
        try:
            ring_attention.ring_dilated_attention(q, q, q, [8], [1], group=dist.group.WORLD, ulysses_size=ulysses_size,
                                                  cu_seqlens=documents)
        except ValueError as error:
            errors[case] = str(error)
    return errors


def gather_round_trip(rank, world_size):
    """Shard and gather back; also returns the error for a sequence the group cannot split evenly."""
    x = torch.arange(24.0).reshape(1, 24, 1).requires_grad_(True)
    mine = shard_sequence(x, dist.group.WORLD, dim=1)
    full = gather_sequence(mine, dist.group.WORLD, dim=1)
    (full * torch.arange(24.0).reshape(1, 24, 1)).sum().backward()
    try:
        shard_sequence(torch.zeros(2, 5, 3), dist.group.WORLD, dim=1)
    except ValueError as error:
        return full.detach(), x.grad, str(error)
    return full.detach(), x.grad, None


VARIANTS = {"ring": dict(comm="ring"), "allgather": dict(comm="allgather"),
            "hybrid": dict(comm="ring", ulysses_size=2), "all-to-all": dict(comm="allgather", ulysses_size=4)}


def gqa_and_bf16(rank, world_size, cases):
    """Each case: (q, k, v, grad_out, options); returns this rank's output and gradients per case and variant
    (`VARIANTS`: both communication modes, alone and with all-to-all over heads)."""
    results = []
    for q, k, v, grad_out, options in cases:
        per_variant = {}
        for name, variant in VARIANTS.items():
            q_, k_, v_ = (shard_sequence(t, dist.group.WORLD, dim=1).clone().requires_grad_(True) for t in (q, k, v))
            out = ring_attention.ring_dilated_attention(q_, k_, v_, group=dist.group.WORLD, **variant, **options)
            grads = torch.autograd.grad(out, (q_, k_, v_), shard_sequence(grad_out, dist.group.WORLD, dim=1))
            per_variant[name] = [out.detach(), *grads]
        results.append(per_variant)
    return results


def input_layouts(rank, world_size, q, k, v, grad_out, layouts):
    """This rank's output and gradients (with respect to the views) for shards handed over in each layout."""
    from test_production import in_layout

    results = {}
    for layout in layouts:
        views = [in_layout(shard_sequence(t, dist.group.WORLD, dim=1), layout)[1] for t in (q, k, v)]
        out = ring_attention.ring_dilated_attention(*views, [32, 256], [1, 4], causal=True, group=dist.group.WORLD)
        results[layout] = [out.detach(), *torch.autograd.grad(out, views, shard_sequence(grad_out, dist.group.WORLD))]
    return results


def all_to_all_in_a_mesh(rank, world_size):
    """A (dp = 2) x (sp = 4) mesh, all-to-all over pairs of sequence ranks (sub-groups and inter-groups made inside
    each sequence group): float64 and bf16 rows of this rank."""
    mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp", "sp"))
    gen = torch.Generator().manual_seed(5 + mesh["dp"].get_local_rank())
    q, k, v = (torch.randn(1, 64, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    shards = [shard_sequence(t, mesh["sp"], dim=1) for t in (q, k, v)]
    rows = {}
    for dtype in (torch.float64, torch.bfloat16):
        rows[str(dtype)] = ring_attention.ring_dilated_attention(
            *(t.to(dtype) for t in shards), [16, 64], [1, 2], causal=True, group=mesh["sp"], ulysses_size=2)
    return q, k, v, rows


def mesh_sequence_group(rank, world_size):
    """The functional core called with a 1-D DeviceMesh (the sp dimension of a 2-D mesh)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    gen = torch.Generator().manual_seed(3 + mesh["dp"].get_local_rank())  # each dp rank its own batch
    q, k, v = (torch.randn(1, 32, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    shards = [shard_sequence(t, mesh["sp"], dim=1) for t in (q, k, v)]
    out = ring_attention.ring_dilated_attention(*shards, SEGMENTS, RATES, causal=True, group=mesh["sp"])
    try:  # the whole 2-D mesh is not a sequence group
        ring_attention.ring_dilated_attention(*shards, SEGMENTS, RATES, group=mesh)
    except ValueError as error:
        return q, k, v, out, str(error)
    return q, k, v, out, None


def padded_module(rank, world_size, x, real):
    """`RingMultiheadDilatedAttention` with a trailing key padding mask, this rank's slice of it: its output rows
    and the gradient of its input."""
    torch.manual_seed(0)
    group = dist.group.WORLD if world_size > 1 else None
    mha = RingMultiheadDilatedAttention(16, 4, batch_first=True, dtype=torch.float64, segment_lengths=[8, 32],
                                        dilation_rates=[1, 4], causal=True, process_group=group)
    padding = torch.arange(x.shape[1]).unsqueeze(0) >= torch.tensor(real).unsqueeze(1)  # [B, N]
    mine, mask = (shard_sequence(t, group, dim=1) for t in (x, padding))
    mine = mine.detach().clone().requires_grad_(True)
    out, _ = mha(mine, mine, mine, key_padding_mask=mask, cu_seqlens=[0, 9, x.shape[1]])
    (grad,) = torch.autograd.grad(out, mine, torch.ones_like(out))
    return out.detach(), grad


def one_rank_with_bad_documents(rank, world_size):
    """Each rank's error when only rank 1's cu_seqlens are bad, and when only rank 1's key padding mask is."""
    q = torch.zeros(1, 16, 2, 4)
    errors = {}
    try:
        ring_attention.ring_dilated_attention(q, q, q, [8], [1], group=dist.group.WORLD,
                                              cu_seqlens=[0, 5, 32] if rank == 0 else [0, 33])
    except ValueError as error:
        errors["cu_seqlens"] = str(error)
    mha = RingMultiheadDilatedAttention(8, 2, batch_first=True, segment_lengths=[8], dilation_rates=[1],
                                        process_group=dist.group.WORLD)
    x = torch.zeros(1, 16, 8)
    mask = torch.zeros(1, 16) if rank == 0 else torch.full((1, 16), 0.5)
    try:
        mha(x, x, x, key_padding_mask=mask)
    except ValueError as error:
        errors["key_padding_mask"] = str(error)
    return errors
