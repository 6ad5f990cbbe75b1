"""Two nodes on one machine: two ``torchrun`` launchers meet through a c10d rendezvous on the loopback, 2 gloo
ranks each, and train with a sequence group spanning both nodes and with sequence groups inside each node (data
parallel across): both reproduce one process (``tests/multinode_workers.py``; "Use it in your model", several
machines)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import production_workers as pw
import pytest
import torch
from helpers import rel_err, stop_launcher

WORKERS = Path(__file__).resolve().parent / "multinode_workers.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(output_dir: Path, timeout: float = 240) -> None:
    """Start one launcher per node, as each machine would; fail with both launchers' output if either fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-nodes",
               "--local-addr", "127.0.0.1", str(WORKERS), str(output_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            stop_launcher(node)
    codes = [node.returncode for node in nodes]
    assert codes == [0, 0], f"launchers exited with {codes}:\n" + "\n".join(outputs)


def test_two_nodes_of_two_ranks_train_as_one_process(tmp_path):
    launch_two_nodes(tmp_path)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    expected_losses, expected_params = pw.train_single_process()
    nodes = [r["where"]["node"] for r in per_rank]
    assert sorted(nodes) == [0, 0, 1, 1] and nodes[0] == nodes[1]  # consecutive ranks share a node
    spanning, inside = (per_rank[0]["layouts"][name] for name in (
        "sequence group across the nodes", "sequence groups inside the nodes"))
    assert {nodes[r] for r in spanning["sequence_group"]} == {0, 1}
    for r in range(4):
        assert {nodes[m] for m in per_rank[r]["layouts"]["sequence groups inside the nodes"]["sequence_group"]} == {
            nodes[r]}
    for r, result in enumerate(per_rank):
        for name, layout in result["layouts"].items():
            assert layout["losses"] == pytest.approx(expected_losses, rel=1e-10, abs=0), (r, name)
            for param, value in layout["params"].items():
                assert rel_err(value, expected_params[param]) < 1e-10, (r, name, param)
    assert inside["sequence_group"] == [0, 1]
