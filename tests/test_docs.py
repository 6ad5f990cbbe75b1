"""The README and the docs pages, run as a new user runs them.

Every ```python block of ``README.md`` and ``docs/*.md`` runs, in page order, in one fresh interpreter per page
(a reader who copies a page's blocks into one session); a block may use what an earlier block of its page defined.
A block that is not meant to run alone (a fragment of a larger script, or a script for ``torchrun``) is marked on
the line before its fence with an HTML comment, invisible on the site, that names the file holding the complete
code: ``<!-- docs-test: not run, a fragment of examples/some_script.py -->``; that file is run by a test of its own.
A block that includes a file (``--8<-- "path"`` or ``"path:section"``, pymdownx.snippets) shows that file and needs
no marker: the file must exist, with the named section, and a test runs it. The bash blocks are commands: the
scripts and modules they run must exist. The data x sequence recipe (``examples/data_sequence_parallel.py``,
included by docs/usage.md) runs here under ``torchrun`` on 4 gloo processes (2 data x 2 sequence ranks) and must
reproduce one process's training.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*docs-test: not run, (.*?)-->")
INCLUDE = re.compile(r'^--8<--\s+"([^":]+)(?::([\w-]+))?"$')
EXAMPLE = ROOT / "examples" / "data_sequence_parallel.py"


def code_blocks(page: Path) -> list[dict]:
    """Fenced blocks of ``page``: language, first line number, source (dedented) and the marker before them."""
    lines, blocks, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        indent, start = fence.group(1), i
        i += 1
        while not re.match(rf"^{indent}```\s*$", lines[i]):
            i += 1
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = NOT_RUN.search(previous)
        blocks.append(dict(language=fence.group(2), line=start + 1, marker=marker.group(1) if marker else None,
                           source=textwrap.dedent("\n".join(lines[start + 1:i]))))
        i += 1
    return blocks


def relative(page: Path) -> str:
    return str(page.relative_to(ROOT))


def runnable(page: Path) -> list[dict]:
    return [b for b in code_blocks(page) if b["language"] == "python" and b["marker"] is None
            and not INCLUDE.match(b["source"].strip().split("\n")[0])]


RUNNER = """
import json, sys
page, blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for line, source in blocks:
    exec(compile(source, f"{page}, the block at line {line}", "exec"), namespace)
"""


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=relative)
def test_the_python_blocks_of_a_page_run_as_written_on_a_cpu(page):
    blocks = [(b["line"], b["source"]) for b in runnable(page)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps([relative(page), blocks]), text=True,
                          capture_output=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, f"{relative(page)}: a block failed\n{done.stderr[-4000:]}"


def test_every_block_not_run_names_the_file_that_holds_it_and_every_include_exists():
    marked = 0
    for page in PAGES:
        for block in code_blocks(page):
            where = f"{relative(page)} line {block['line']}"
            if block["marker"] is not None:
                marked += 1
                named = re.findall(r"[\w./-]+\.py", block["marker"])
                assert named and all((ROOT / name).exists() for name in named), (
                    f"{where}: a block not run must name the existing file that holds it, got {block['marker']!r}")
            for line in block["source"].splitlines():
                include = INCLUDE.match(line.strip())
                if include:
                    path, section = include.groups()
                    assert (ROOT / path).exists(), f"{where}: includes {path}, which does not exist"
                    if section:
                        assert f"--8<-- [start:{section}]" in (ROOT / path).read_text(), (
                            f"{where}: {path} has no section {section!r}")
    assert marked <= 3, f"{marked} blocks are not run: the docs' code should run as written"


def test_the_commands_of_the_bash_blocks_name_files_and_modules_that_exist():
    for page in PAGES:
        for block in code_blocks(page):
            if block["language"] != "bash":
                continue
            for command in block["source"].splitlines():
                command = command.split("#")[0]
                for script in re.findall(r"(?:python|torchrun[^\n]*?)\s+((?:[\w-]+/)+[\w-]+\.py)", command):
                    assert (ROOT / script).exists(), f"{relative(page)} line {block['line']}: no {script}"
                for module in re.findall(r"python -m ([\w.]+)", command):
                    assert importlib.util.find_spec(module), f"{relative(page)} line {block['line']}: no {module}"


def run_example(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, str(EXAMPLE), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def test_the_data_times_sequence_example_on_2_x_2_processes_reproduces_one_process(tmp_path):
    common = ["--steps", "4", "--dtype", "float64"]
    distributed = run_example(*common, "--sp-size", "2", "--save", str(tmp_path / "mesh.pt"), processes=4)
    assert distributed.returncode == 0, distributed.stderr[-4000:]
    single = run_example(*common, "--save", str(tmp_path / "one.pt"))
    assert single.returncode == 0, single.stderr[-4000:]
    mesh, one = (torch.load(tmp_path / name) for name in ("mesh.pt", "one.pt"))
    assert mesh["losses"] == pytest.approx(one["losses"], rel=1e-10, abs=0)
    assert one["losses"][-1] < one["losses"][0] - 0.5  # it trains
    assert mesh["parameters"].keys() == one["parameters"].keys()
    for name, value in one["parameters"].items():
        error = ((mesh["parameters"][name] - value).abs().max() / value.abs().max()).item()
        assert error < 1e-10, name
    assert distributed.stdout.splitlines()[0].startswith("step 0: loss ")  # rank 0 prints, the others do not
    assert len(distributed.stdout.splitlines()) == 4


def test_the_example_names_the_fix_when_the_mesh_does_not_fit():
    spec = importlib.util.spec_from_file_location("data_sequence_parallel", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.mesh_shape(4, 2, batch=4) == (2, 2)
    assert example.mesh_shape(2, None, batch=1) == (1, 2)
    with pytest.raises(ValueError, match=r"^--sp-size 4 must divide the number of processes 2 \(the world size "
                                         r"torchrun starts\): use one of \[1, 2\], or start a multiple of 4"):
        example.mesh_shape(2, 4, batch=4)
    with pytest.raises(ValueError, match=r"^--batch 3 must be divisible by the 2 data-parallel ranks \(world size 4 "
                                         r"/ --sp-size 2\): use a multiple of 2$"):
        example.mesh_shape(4, 2, batch=3)
