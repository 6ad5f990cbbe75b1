"""Ring dilated attention: exact LongNet attention on sequences split across processes.

Public API:

- `ring_dilated_attention`: the functional core on this rank's ``[B, L, H, D]`` shard.
- `RingDilatedAttention`: the functional core as a module.
- `RingMultiheadDilatedAttention`: a drop-in for ``nn.MultiheadAttention``.
- `shard_sequence`, `gather_sequence`: from a full batch to this rank's slice and back.
- `kernels`: the fused block kernels (``block_attention``, ``block_attention_backward``).
"""

from ring_attention import kernels
from ring_attention.comm import gather_sequence, shard_sequence
from ring_attention.functional import ring_dilated_attention
from ring_attention.modules import RingDilatedAttention, RingMultiheadDilatedAttention

__all__ = [
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "gather_sequence",
    "kernels",
    "ring_dilated_attention",
    "shard_sequence",
]
