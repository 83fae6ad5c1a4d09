import pytest
import torch


@pytest.fixture(autouse=True)
def _cpu_default_device():
    """These tests build their data on the CPU, as the scripts do, even in the CUDA suite."""
    torch.set_default_device(None)
