"""Functions run on spawned ranks by the DeepSpeed tests: the example's training, several configurations in one
group of processes (DeepSpeed keeps its sequence-parallel groups per process, so the tests start one group for
the configurations without a mesh and one for those with)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: gloo, no GPU looked for
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import deepspeed_zero  # noqa: E402  (the example is the code under test)


def train_configurations(rank, world_size, configurations):
    """``{(stage, sequence_group, reduce_scatter): deepspeed_zero.train(...)}`` for each configuration."""
    return {c: deepspeed_zero.train(rank, world_size, *c) for c in configurations}
