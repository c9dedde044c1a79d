"""Shared fixtures: real MNIST test images, the GPU marker, small thread counts."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: The 2,000-image MNIST test subset shipped with the repo (tests/data/mnist/README.md): what every
#: run uses, local or CI, so both test the same data. PLASTICITY_TEST_MNIST=<folder> points the
#: tests at another copy, e.g. the full 10k test split.
SHIPPED_MNIST_DIR = ROOT / "tests" / "data" / "mnist"
MNIST_DIR = Path(os.environ.get("PLASTICITY_TEST_MNIST") or SHIPPED_MNIST_DIR)

# Two cores on CI: keep torch from oversubscribing them when tests run agents in-process.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Folder with real MNIST test images (t10k-*-idx*-ubyte.gz): the shipped subset unless overridden.

    Never skips: a missing folder (a bad PLASTICITY_TEST_MNIST) is an error.
    """
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(
            f"no MNIST test files (t10k-images-idx3-ubyte.gz) in {MNIST_DIR}"
            + (" (from PLASTICITY_TEST_MNIST)" if MNIST_DIR != SHIPPED_MNIST_DIR else "")
        )
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
