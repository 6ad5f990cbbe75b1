"""Every distributed stage on real gloo processes, against the stage before it and the float64 truth.

The ranks are started once per world size and run the whole grid for every stage (a process start
costs seconds here). Stage 2 is compared with stage 1 (simulated ring), stage k with stage k - 1; the
balanced production core (stage 6) with the unbalanced one (stage 5) of the same communication mode; the
all-to-all over heads (stage 7) with the ring alone (``ulysses_size=1``). Grouped-query problems run through the
production stages only (the lessons keep one kv head per head); stage 7 runs on 8 heads, which it can cut.
"""

import random

import pytest
import torch
from helpers import rel_err
from workers import run_batteries

import reference
from lessons.harness import ALL_TO_ALL_STAGES, DISTRIBUTED_STAGES, Problem, gather_ranks
from lessons.launch import run_on_ranks
from lessons.stage1_simulated_ring import simulated_ring_dilated_attention
from ring_attention import ring_dilated_attention

CONFIGS = {
    "mixed": ((32, 64, 128, 256), (1, 2, 4, 8)),  # at P=8: one local pair, three spanning 2, 4, 8 ranks
    "local": ((8, 32), (1, 2)),  # all local up to P=8
    "spanning": ((256, 128), (1, 4)),  # all spanning from P=2
}
PROBLEMS = [
    Problem(segment_lengths=s, dilation_rates=r, causal=causal, head_mode=mode, dtype=dtype, seed=i)
    for i, ((s, r), causal, mode, dtype) in enumerate(
        (c, causal, mode, dtype)
        for c in CONFIGS.values()
        for causal in (False, True)
        for mode in ("all", "groups")  # 5 heads over 4 pairs / 2 pairs: uneven groups
        for dtype in (torch.float64, torch.float32)
    )
]
# 6 query heads on 3 kv heads; in groups mode a kv head's query heads are split between pairs
GQA_PROBLEMS = [
    Problem(segment_lengths=s, dilation_rates=r, causal=True, head_mode=mode, dtype=dtype, heads=6, kv_heads=3,
            seed=100 + i)
    for i, ((s, r), mode, dtype) in enumerate(
        (c, mode, dtype) for c in (CONFIGS["mixed"], CONFIGS["spanning"]) for mode in ("all", "groups")
        for dtype in (torch.float64, torch.float32)
    )
]
# 8 heads (and 8 or 4 kv heads): the all-to-all cuts them over 2 ranks, or over all of them (8 kv heads)
ALL_TO_ALL_PROBLEMS = [
    Problem(segment_lengths=s, dilation_rates=r, causal=causal, head_mode=mode, dtype=dtype, heads=8, seed=200 + i)
    for i, ((s, r), causal, mode, dtype) in enumerate(
        (c, causal, mode, dtype) for c in CONFIGS.values() for causal in (False, True) for mode in ("all", "groups")
        for dtype in (torch.float64, torch.float32)
    )
]
HYBRID_GQA_PROBLEMS = [Problem(segment_lengths=CONFIGS["mixed"][0], dilation_rates=CONFIGS["mixed"][1], causal=True,
                               head_mode=mode, dtype=dtype, heads=8, kv_heads=4, seed=300 + i)
                       for i, (mode, dtype) in enumerate((m, d) for m in ("all", "groups")
                                                         for d in (torch.float64, torch.float32))]
# packed documents (fixed seeds): starting anywhere, on a shard boundary at every P (128 for P = 2, 4, 8), of length
# 1 and shorter than a rate; rates that divide no segment; production stages only (the lessons tile the sequence)
DOCUMENT_LAYOUTS = [(0, 1, 37, 128, 131, 200, 256), (0, 70, 77, 160, 256), (0, 256),
                    (0, *sorted(random.Random(7).sample(range(1, 256), 9)), 256)]
DOCUMENT_PROBLEMS = [
    Problem(segment_lengths=s, dilation_rates=r, causal=causal, dtype=dtype, heads=8, kv_heads=4, cu_seqlens=layout,
            seed=400 + i)
    for i, (layout, (s, r), causal, dtype) in enumerate(
        (layout, pairs, causal, dtype) for layout, pairs in zip(DOCUMENT_LAYOUTS, (
            ((24, 40, 96), (1, 3, 5)), ((32, 64, 128, 256), (1, 2, 4, 8)), ((48, 256), (1, 6)), ((16, 64), (1, 4))))
        for causal in (False, True) for dtype in (torch.float64, torch.float32)
    )
]
DOCUMENT_STAGES = [target for name, target in DISTRIBUTED_STAGES.items() if name.startswith(("stage 5", "stage 6"))] + [
    ALL_TO_ALL_STAGES["stage 7: hybrid (U=2), ring"]]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
STAGES = list(DISTRIBUTED_STAGES.values())
PRODUCTION = [i for i, name in enumerate(DISTRIBUTED_STAGES) if name.startswith(("stage 5", "stage 6"))]
NAMES = list(DISTRIBUTED_STAGES)
# each stage's "stage before": stage 2 is checked against stage 1 (simulated ring, computed here); both
# communication modes of stage 5 against stage 4; each balanced stage 6 against stage 5 with the same mode
BEFORE = {i: i - 1 for i in range(len(STAGES))} | {
    i: NAMES.index("stage 4: flash") for i, name in enumerate(NAMES) if name.startswith("stage 5")
} | {i: NAMES.index(name.replace("stage 6: balanced", "stage 5: production")) for i, name in enumerate(NAMES)
     if name.startswith("stage 6")}
ROWS = ("out", "dq", "dk", "dv")


def stage1_rows(problem: Problem, world_size: int) -> dict:
    q, k, v, grad_out = problem.inputs()
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = simulated_ring_dilated_attention(
        q, k, v, list(problem.segment_lengths), list(problem.dilation_rates), world_size=world_size,
        **problem.options(),
    )
    return dict(zip(ROWS, (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))))


def reference_rows(problem: Problem) -> dict:
    q, k, v, grad_out = problem.inputs()
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = reference.dilated_attention(
        q, k, v, list(problem.segment_lengths), list(problem.dilation_rates), **problem.options()
    )
    return dict(zip(ROWS, (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))))


@pytest.fixture(scope="module", params=[2, 4, 8], ids=lambda p: f"P={p}")
def results(request):
    """``(world_size, rows, gqa_rows)``: ``rows[problem][stage][name]`` is the full tensor gathered from all ranks
    (``gqa_rows`` indexes the production stages in `PRODUCTION` order)."""
    world_size = request.param
    balanced_ring = DISTRIBUTED_STAGES["stage 6: balanced, ring"]
    per_rank = run_on_ranks(run_batteries, world_size, [
        (PROBLEMS, STAGES), (GQA_PROBLEMS, [STAGES[i] for i in PRODUCTION]),
        (ALL_TO_ALL_PROBLEMS, [balanced_ring, *ALL_TO_ALL_STAGES.values()]),
        (HYBRID_GQA_PROBLEMS, [balanced_ring, ALL_TO_ALL_STAGES["stage 7: hybrid (U=2), ring"]]),
        (DOCUMENT_PROBLEMS, DOCUMENT_STAGES),
    ])

    def gathered(battery: int, problems: list, stages: int) -> list:
        return [[{n: gather_ranks([r[battery][i][s] for r in per_rank], n) for n in ROWS} for s in range(stages)]
                for i in range(len(problems))]

    return (world_size, gathered(0, PROBLEMS, len(STAGES)), gathered(1, GQA_PROBLEMS, len(PRODUCTION)),
            gathered(2, ALL_TO_ALL_PROBLEMS, 3), gathered(3, HYBRID_GQA_PROBLEMS, 2),
            gathered(4, DOCUMENT_PROBLEMS, len(DOCUMENT_STAGES)))


def assert_close(actual: dict, expected: dict, tol: float, what: str) -> None:
    for name in ROWS:
        err = rel_err(actual[name], expected[name])
        assert err < tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("stage", range(len(STAGES)), ids=NAMES)
def test_stage_matches_the_stage_before(results, stage):
    world_size, rows, gqa_rows, *_ = results
    for i, problem in enumerate(PROBLEMS):
        before = stage1_rows(problem, world_size) if stage == 0 else rows[i][BEFORE[stage]]
        assert_close(rows[i][stage], before, TOLERANCE[problem.dtype], f"{problem}")
    if NAMES[stage].startswith("stage 6"):
        for i, problem in enumerate(GQA_PROBLEMS):
            assert_close(gqa_rows[i][PRODUCTION.index(stage)], gqa_rows[i][PRODUCTION.index(BEFORE[stage])],
                         TOLERANCE[problem.dtype], f"{problem}")


@pytest.mark.parametrize("stage", range(len(STAGES)), ids=NAMES)
def test_stage_matches_reference_in_float64(results, stage):
    _, rows, gqa_rows, *_ = results
    for i, problem in enumerate(PROBLEMS):
        if problem.dtype == torch.float64:
            assert_close(rows[i][stage], reference_rows(problem), 1e-10, f"{problem}")
    if stage in PRODUCTION:
        for i, problem in enumerate(GQA_PROBLEMS):
            if problem.dtype == torch.float64:
                assert_close(gqa_rows[i][PRODUCTION.index(stage)], reference_rows(problem), 1e-10, f"{problem}")


@pytest.mark.parametrize("stage", [1, 2], ids=list(ALL_TO_ALL_STAGES))
def test_all_to_all_matches_the_ring_alone_and_the_reference(results, stage):
    _, _, _, rows, gqa_rows, _ = results
    for i, problem in enumerate(ALL_TO_ALL_PROBLEMS):  # against ulysses_size=1 (the balanced ring), same inputs
        assert_close(rows[i][stage], rows[i][0], TOLERANCE[problem.dtype], f"{problem}")
        if problem.dtype == torch.float64:
            assert_close(rows[i][stage], reference_rows(problem), 1e-10, f"{problem}")
    if stage == 1:  # grouped-query heads: 8 on 4 kv heads, cut over pairs of ranks
        for i, problem in enumerate(HYBRID_GQA_PROBLEMS):
            assert_close(gqa_rows[i][1], gqa_rows[i][0], TOLERANCE[problem.dtype], f"{problem}")
            if problem.dtype == torch.float64:
                assert_close(gqa_rows[i][1], reference_rows(problem), 1e-10, f"{problem}")


def one_process_rows(problem: Problem) -> dict:
    q, k, v, grad_out = problem.inputs()
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = ring_dilated_attention(q, k, v, list(problem.segment_lengths), list(problem.dilation_rates),
                                 **problem.options())
    return dict(zip(ROWS, (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))))


@pytest.mark.parametrize("stage", range(len(DOCUMENT_STAGES)), ids=[s.split(":")[1] for s in DOCUMENT_STAGES])
def test_packed_documents_match_one_process_and_the_reference(results, stage):
    # every family (ring, all-gather, balanced or not, the hybrid) against the one-process core, and in float64
    # against the reference
    rows = results[5]
    for i, problem in enumerate(DOCUMENT_PROBLEMS):
        assert_close(rows[i][stage], one_process_rows(problem), TOLERANCE[problem.dtype], f"{problem}")
        if problem.dtype == torch.float64:
            assert_close(rows[i][stage], reference_rows(problem), 1e-10, f"{problem}")
