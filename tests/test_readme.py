"""README's code, run as a user would copy it.

The ``>>>`` blocks are doctests (pytest collects README.md). Every other ``python`` block is a
whole script: each runs here in a fresh interpreter (so that blocks asking JAX for 8 CPU
devices can), and must finish without error.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
SCRIPTS = [block for block in BLOCKS if not block.lstrip().startswith(">>>")]


def test_readme_has_script_blocks():
    assert len(SCRIPTS) >= 4


@pytest.mark.parametrize("index", range(len(SCRIPTS)))
def test_readme_script_block_runs(index, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPTS[index]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"README block {index} failed:\n{SCRIPTS[index]}\n{result.stderr}"
    )
