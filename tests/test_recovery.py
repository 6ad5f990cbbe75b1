"""Recovery from a lost rank: ``examples/hf_llama_sequence_parallel.py`` under ``torchrun --max-restarts 1`` on 2
gloo ranks, one of which is killed (SIGKILL) mid-run; the launcher restarts the group, which resumes from the
last distributed checkpoint, and every loss printed equals the loss of the same step in a run that was never
interrupted: no step is lost or applied twice, and the data stream resumes where it was."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import stop_launcher

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_llama_sequence_parallel.py"
STEPS, EVERY, FAIL_AT = 7, 3, 5  # checkpoints after steps 3 and 6; rank 1 dies at step 5, so 3 and 4 run twice


def launch(max_restarts: int, loss_log: Path, *options: str) -> subprocess.Popen:
    """Start the example on 2 ranks under torchrun, each step's loss appended to ``loss_log``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(max_restarts), str(EXAMPLE), "--steps", str(STEPS), "--batch", "2",
               "--loss-log", str(loss_log), *options]
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # see the example's docstring
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(launcher: subprocess.Popen, loss_log: Path, timeout: float = 300) -> tuple[list[tuple[int, float]], str]:
    """Wait for a launch to succeed; return the (step, loss) lines of its log in order, and its output."""
    output = launcher.communicate(timeout=timeout)[0]
    assert launcher.returncode == 0, output
    lines = (line.split() for line in loss_log.read_text().splitlines())
    return [(int(step), float(loss)) for step, loss in lines], output


def test_a_killed_rank_restarts_the_group_which_resumes_without_losing_or_repeating_a_step(tmp_path):
    checkpoints, logs = tmp_path / "checkpoints", [tmp_path / "uninterrupted.log", tmp_path / "interrupted.log"]
    launchers = [launch(0, logs[0]), launch(1, logs[1], "--checkpoint-dir", str(checkpoints), "--checkpoint-every",
                                             str(EVERY), "--fail-at-step", str(FAIL_AT))]  # side by side: less time
    try:
        (uninterrupted, _), (interrupted, output) = (finish(*run) for run in zip(launchers, logs))
    finally:  # a failed or stuck launch takes its ranks with it
        for launcher in launchers:
            stop_launcher(launcher)
    assert [step for step, _ in uninterrupted] == list(range(STEPS))
    assert "failed (exitcode: -9) local_rank: 1" in output  # the launcher saw rank 1 die of SIGKILL
    assert "resumed from" in output and f"step-{EVERY:06d}: step {EVERY}" in output
    # steps 0-4 on the first attempt; then, from the checkpoint of step 3, steps 3-6 on the second
    assert [step for step, _ in interrupted] == list(range(FAIL_AT)) + list(range(EVERY, STEPS))
    loss = dict(uninterrupted)
    for step, value in interrupted:
        assert value == loss[step], (step, value, loss[step])  # every digit: the same trajectory
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000003", "step-000006"]
    assert (checkpoints / "latest").read_text() == "step-000006"
