"""DeepSpeed ZeRO-2 and ZeRO-3 training a model that holds `RingMultiheadDilatedAttention`, its sequences split
over 2 gloo ranks, against one process training on whole sequences (``examples/deepspeed_zero.py``; the
"DeepSpeed ZeRO" page). Needs the ``deepspeed`` extra; CI's second leg installs it and sets
``RING_ATTENTION_REQUIRE_DEEPSPEED=1``, which turns the skip below into a failure."""

import importlib.util
import os

import pytest

INSTALL = "DS_BUILD_OPS=0 pip install -e '.[deepspeed]'"
if importlib.util.find_spec("deepspeed") is None:
    if os.environ.get("RING_ATTENTION_REQUIRE_DEEPSPEED"):
        raise ImportError(f"RING_ATTENTION_REQUIRE_DEEPSPEED is set and deepspeed is not installed: {INSTALL}")
    pytest.skip(f"needs the deepspeed extra: {INSTALL}", allow_module_level=True)

import deepspeed_workers as dw  # noqa: E402  (sets DS_ACCELERATOR=cpu for the ranks it spawns)

from lessons.launch import run_on_ranks  # noqa: E402

FLOAT32 = 1e-5
relative = dw.deepspeed_zero.relative


def first_updates(result):
    """This rank's first update of the parameters, and one process's."""
    history, expected = result["history"], result["one_process_history"]
    return history[1] - history[0], expected[1] - expected[0]


@pytest.fixture(scope="module")
def without_mesh():
    """The recipe under ZeRO-2 and ZeRO-3, then DeepSpeed's own sequence-parallel group (``mpu``)."""
    configurations = [(2, "ring-attention", True), (3, "ring-attention", True), (2, "deepspeed", True),
                      (3, "deepspeed", True), (3, "deepspeed", False)]
    return run_on_ranks(dw.train_configurations, 2, configurations, timeout=600)


@pytest.fixture(scope="module")
def with_mesh():
    """DeepSpeed's ``mesh_param`` (a process that once built one keeps it: a group of processes of its own)."""
    return run_on_ranks(dw.train_configurations, 2, [(2, "mesh", True), (3, "mesh", True), (3, "mesh", False)],
                        timeout=600)


def assert_reproduces_one_process(result, case):
    assert result["losses"] == pytest.approx(result["one_process_losses"], rel=FLOAT32), case
    for step, (params, expected) in enumerate(zip(result["history"], result["one_process_history"])):
        assert relative(params, expected) < FLOAT32, (case, step)
    update, expected = first_updates(result)
    assert relative(update, expected) < FLOAT32, case


def test_zero2_and_zero3_with_the_sequence_split_over_two_ranks_reproduce_one_process(without_mesh):
    for per_rank in without_mesh:
        for stage in (2, 3):
            result = per_rank[(stage, "ring-attention", True)]
            assert_reproduces_one_process(result, stage)
            assert result["losses"][-1] < result["losses"][0]  # it trained


def test_zero3_with_deepspeeds_sequence_group_applies_half_the_update_unless_reduce_scatter_is_off(without_mesh):
    for per_rank in without_mesh:
        assert_reproduces_one_process(per_rank[(2, "deepspeed", True)], "ZeRO-2")
        assert_reproduces_one_process(per_rank[(3, "deepspeed", False)], "ZeRO-3, reduce_scatter off")
        update, expected = first_updates(per_rank[(3, "deepspeed", True)])
        assert relative(update, expected / 2) < FLOAT32  # the trap documented on the DeepSpeed page


def test_mesh_param_under_zero2_never_adds_the_ranks_gradients(with_mesh):
    (update0, expected), (update1, _) = (first_updates(per_rank[(2, "mesh", True)]) for per_rank in with_mesh)
    assert relative(update0, update1) > 0.5  # the two ranks step apart: each keeps its own gradient (times 2)
    assert relative(update0 + update1, 2 * expected) < FLOAT32
    for per_rank in with_mesh:  # under ZeRO-3 it is the half update again, and reduce_scatter off avoids it
        update, expected = first_updates(per_rank[(3, "mesh", True)])
        assert relative(update, expected / 2) < FLOAT32
        assert_reproduces_one_process(per_rank[(3, "mesh", False)], "ZeRO-3 mesh, reduce_scatter off")
