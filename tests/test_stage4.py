"""Stage 4 specifics: no score matrix is ever allocated; overlap does not change the result."""

import torch
import workers
from helpers import rel_err

from lessons.harness import Problem, gather_ranks
from lessons.launch import run_on_ranks

# N=1024 on 2 ranks (L=512), D=8: a local pair (512, 1) and a spanning pair (1024, 2) whose blocks are
# 256 x 256 per head; a score matrix would be 64 to 512 times larger than the shard's 512 x 8 per head.
PROBLEM = Problem(seq_len=1024, segment_lengths=(512, 1024), dilation_rates=(1, 2), batch=1, heads=2, head_dim=8,
                  causal=True, dtype=torch.float32)


def test_no_score_matrix_is_allocated():
    shard_numel = PROBLEM.batch * (PROBLEM.seq_len // 2) * PROBLEM.heads * PROBLEM.head_dim
    flash = run_on_ranks(workers.largest_tensor_created, 2, "lessons.stage4_flash", PROBLEM)
    explicit = run_on_ranks(workers.largest_tensor_created, 2, "lessons.stage3_collective", PROBLEM)
    # stage 4's largest tensors are shard-sized: the output accumulator, dq, dk, dv; everything stays O(L)
    assert max(flash) == shard_numel, flash
    # the check has teeth: stage 3's explicit scores for the local pair are [1, 2, 512, 512]
    assert min(explicit) >= 2 * 512 * 512


def test_overlap_on_and_off_give_the_same_rows():
    results = run_on_ranks(workers.stage4_overlap_on_and_off, 4, PROBLEM)
    for name in ("out", "dq", "dk", "dv"):
        on = gather_ranks([r[0] for r in results], name)
        off = gather_ranks([r[1] for r in results], name)
        assert rel_err(on, off) < 1e-6
