"""Shared fixtures: tiny random-weight CLIPs (built in well under a second) and a deterministic torch."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# Under pytest-xdist each worker gets one thread: two workers then fill the two cores without oversubscribing them.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_backbone():
    from promptkd.backbones import load_backbone

    torch.manual_seed(0)
    return load_backbone("pkd-tiny").freeze()


@pytest.fixture(scope="session")
def wide_backbone():
    from promptkd.backbones import load_backbone

    torch.manual_seed(1)
    return load_backbone("pkd-tiny-wide").freeze()


@pytest.fixture(scope="session")
def customtext_backbone():
    from promptkd.backbones import load_backbone

    torch.manual_seed(2)
    return load_backbone("pkd-tiny-customtext").freeze()
