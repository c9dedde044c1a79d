"""Shared fixtures: the real MNIST test split, the GPU marker, small thread counts."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("PLASTICITY_TEST_MNIST", ROOT.parent / "shared" / "datasets" / "mnist"))

# Two cores on CI: keep torch from oversubscribing them when tests run agents in-process.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Folder with the real MNIST test split (t10k-*-idx*-ubyte.gz); skips when absent."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST test split not found at {MNIST_DIR} (set PLASTICITY_TEST_MNIST to its folder)")
    return MNIST_DIR


@pytest.fixture
def one_thread():
    """Tiny networks: torch threads only add overhead on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
