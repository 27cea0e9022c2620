"""Test-wide settings. Triton reads TRITON_INTERPRET when it is first imported, so the kernels
run on CPU tensors only if this is set before anything imports detkit."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Small tensors on a shared 2-core machine: extra intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
