"""The README cannot rot: its marked command blocks run, and its two set-up commands exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_S

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MARKED = re.findall(r"<!-- readme-test:[^>]*-->\s*```bash\n(.*?)```", README, flags=re.S)


def test_readme_has_the_two_setup_commands_and_make_targets():
    setup = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    assert "torch==2.13.0" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_marks_the_runnable_blocks():
    """Checked apart from the parametrised test below: over an empty list that test would pass unrun."""
    commands = [line for block in MARKED for line in block.strip().splitlines()]
    assert commands == ["qlora-lite memory --model llama-2-7b --seq_len 2048 --rank 16 --gpu RTX4090"]


@pytest.mark.parametrize("block", MARKED)
def test_marked_readme_blocks_run(block):
    for line in block.strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "qlora-lite"
        out = subprocess.run([sys.executable, "-m", "qlora_lite.cli", *argv[1:]], capture_output=True, text=True,
                             timeout=HANG_S, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip()


def test_public_api_imports():
    import qlora_lite

    for name in qlora_lite.__all__:
        assert getattr(qlora_lite, name) is not None
