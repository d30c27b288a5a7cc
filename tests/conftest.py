"""Shared fixtures: tiny random models built on the fly (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import pytest
import torch

from proxytune.testing import save_tiny_model

torch.set_num_threads(1)  # tiny models: threads only add contention on 2 cores


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny models sharing one tokenizer: base, expert, anti-expert; plus a base whose
    head is 16 rows wider than its tokenizer (padding rows)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "base": save_tiny_model(root / "base", seed=0),
        "expert": save_tiny_model(root / "expert", seed=1),
        "anti": save_tiny_model(root / "anti", seed=2),
        "padded": save_tiny_model(root / "padded", seed=3, head_padding=16),
    }


@pytest.fixture(scope="session")
def bnb_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, expert and anti-expert whose linear layers fill bitsandbytes' 4-bit CPU blocks
    (hidden 64: every layer's outputs a multiple of 32 and inputs of 64), which it repacks on
    AVX-512 CPUs; the ``tiny_dirs`` models (hidden 32) do not."""
    root = tmp_path_factory.mktemp("tiny-bnb")
    return {
        name: save_tiny_model(root / name, seed=seed, hidden=64)
        for seed, name in enumerate(("base", "expert", "anti"))
    }


def _tiny_tuner(tiny_dirs: dict[str, Path], expert_prompt: str):
    from proxytune.testing import cpu_tuner

    return cpu_tuner(tiny_dirs["base"], tiny_dirs["expert"], tiny_dirs["anti"], expert_prompt)


@pytest.fixture(scope="session")
def tuner(tiny_dirs: dict[str, Path]):
    """base + one pair, alpha 1, CPU float32, the expert on its chat template (the paper's
    formats: base and anti-expert raw; given explicitly, the defaults are ``auto``)."""
    return _tiny_tuner(tiny_dirs, "chat")


@pytest.fixture(scope="session")
def raw_tuner(tiny_dirs: dict[str, Path]):
    """The same models with every one on the raw prompt format (they all read the same ids)."""
    return _tiny_tuner(tiny_dirs, "raw")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
