"""Shared fixtures: tiny offline VLM checkpoints, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vugen_adapters.tiny import build_tiny_vlm

# The tiny-LLaVA sampler stage and bundle fixtures of the pipeline and command tests.
pytest_plugins = ["tests.fixtures_bundle"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(family) -> Path`: a saved tiny VLM of that family, built on first use."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_vlm(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests run tiny models: a second intra-op thread adds only contention (10-30x slower measured on 2 loaded
    cores), and one thread makes timings and float results independent of the machine's load."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
