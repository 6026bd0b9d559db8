"""The README's copy-paste blocks run as written (on the embedded world), so a newcomer's first hour works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks(marker: str) -> list[str]:
    text = README.read_text()
    return re.findall(rf"<!-- tested: {marker} -->\n```bash\n(.*?)```", text, flags=re.S)


def test_quick_start_names_setup_and_the_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)[0].strip().splitlines()
    assert commands == [
        "bash scripts/setup.sh && .venv/bin/promptkd demo",
        "bash scripts/setup.sh && .venv/bin/python -m pytest",
    ]


@pytest.mark.slow
def test_howto_blocks_run_as_written(tmp_path):
    """The three practitioner paths in order (distil on a folder, predict, export to ONNX + onnxruntime), in a fresh
    folder with the installed `promptkd` and `python` on PATH; `pip install` lines only check the extra is there."""
    blocks = readme_blocks("howto")
    assert len(blocks) == 3
    script = "\n".join(blocks)
    script = re.sub(r"^pip install .*$", 'python -c "import onnx, onnxruntime"', script, flags=re.M)
    bin_dir = Path(sys.executable).parent  # the environment's `promptkd` and `python`
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "runs/my-student/predictions.csv").is_file()
    assert "predicted: " in result.stdout


@pytest.mark.slow
def test_pretrain_block_runs_as_written(tmp_path):
    """Pre-training on the world's corpus through the engine, then the model it wrote, used by another command."""
    (block,) = readme_blocks("pretrain")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "runs/my-clip/open_clip_model.safetensors").is_file()
    assert "zero-shot clean/held_out" in result.stdout and "acc1" in result.stdout
