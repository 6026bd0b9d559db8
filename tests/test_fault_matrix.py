"""A slice of scripts/fault_matrix.py (the whole matrix is in README's reliability section): kill -9 at random
steps and resume with the same command gives the uninterrupted run's tensors; damaged files are refused or
recomputed, never used."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fault_matrix.py"


@pytest.fixture(scope="module")
def matrix():
    spec = importlib.util.spec_from_file_location("fault_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_matrix"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(matrix, tmp_path_factory) -> Path:
    return matrix.make_world(tmp_path_factory.mktemp("faults") / "world")["root"]


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["folder:2:1:cold", "shards:0:2:warm"])
def test_killed_and_resumed_runs_end_with_the_uninterrupted_tensors(matrix, world, tmp_path, cell):
    result = matrix.run_cell(world, tmp_path, matrix.Cell.parse(cell), kills=2, rng=random.Random(3), step_sleep=0.08)
    assert result.wrong == 0, result.error or result.max_difference
    assert result.survived >= 1 and result.survived == len(result.kill_points)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cache_chunk", "cache_other_images", "resume_file", "student_checkpoint"])
def test_damaged_files_are_refused_or_recomputed_never_used(matrix, world, name):
    result = matrix.corruption(world, world.parent / "corruptions", name)  # one reference run serves all four
    assert result.verdict in ("detected", "recomputed"), f"{result.verdict}: {result.detail}"
