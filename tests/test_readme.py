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


def user_shell(tmp_path: Path) -> dict[str, str]:
    """A fresh folder laid out like the repository after the quick start (``.venv`` there), and a PATH without the
    environment: the README's own activation line must be what puts ``promptkd`` on the PATH."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    bin_dir = str(Path(sys.executable).parent)
    path = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and entry != bin_dir]
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PATH": os.pathsep.join(path)}


def as_user_runs(block: str) -> str:
    """The README's activation block, then ``block``, as a user pastes them into a new shell."""
    (activate,) = readme_blocks("activate")
    return activate + block


def test_activation_puts_promptkd_on_the_path(tmp_path):
    """Pasted as written after the quick start, ``promptkd`` is found (it lives in ``.venv/bin``)."""
    env = user_shell(tmp_path)
    assert subprocess.run(["bash", "-c", "command -v promptkd"], cwd=tmp_path, env=env).returncode != 0
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", as_user_runs("promptkd --help >/dev/null && command -v promptkd")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent.resolve() == Path(sys.executable).parent.resolve()


@pytest.mark.slow
def test_howto_blocks_run_as_written(tmp_path):
    """The three practitioner paths in order (distil on a folder, predict, export to ONNX + onnxruntime), in a fresh
    folder with the installed `promptkd` and `python` on PATH; `pip install` lines only check the extra is there."""
    blocks = readme_blocks("howto")
    assert len(blocks) == 3
    script = "\n".join(blocks)
    script = re.sub(r"^pip install .*$", 'python -c "import onnx, onnxruntime"', script, flags=re.M)
    env = user_shell(tmp_path)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", as_user_runs(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "runs/my-student/predictions.csv").is_file()
    assert "predicted: " in result.stdout


@pytest.mark.slow
def test_pretrain_block_runs_as_written(tmp_path):
    """Pre-training on the world's corpus through the engine, then the model it wrote, used by another command."""
    (block,) = readme_blocks("pretrain")
    env = user_shell(tmp_path)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", as_user_runs(block)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "runs/my-clip/open_clip_model.safetensors").is_file()
    assert "zero-shot clean/held_out" in result.stdout and "acc1" in result.stdout
