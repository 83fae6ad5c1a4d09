"""Test-suite set-up.  Runs the Triton kernels on the CPU through Triton's interpreter:
TRITON_INTERPRET must be set BEFORE triton is imported, so it is set here, first."""
import os

# CAPSTRITON_TEST_DEVICE=cuda runs the suite on a GPU with compiled kernels instead.
DEVICE = os.environ.get("CAPSTRITON_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["CAPSTRITON_POISON_OUTPUTS"] = "1"  # kernel outputs start as NaN (kernels/_common.py)
os.environ["CAPSTRITON_SINGLE_CONFIG"] = "1"   # autotuners keep one config

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The official MNIST files under <repo>/data, provisioned once (and reused by later runs).
    A machine that cannot provision them fails these tests rather than skipping them."""
    from capstriton import data

    data.prepare_mnist(REPO_DATA, log=lambda s: None)
    return REPO_DATA


@pytest.fixture(autouse=True)
def _seed_and_device():
    torch.manual_seed(0)
    if DEVICE != "cpu":
        torch.set_default_device(DEVICE)  # tensors made by the tests live where the kernels run
    yield
    if DEVICE != "cpu":
        torch.set_default_device(None)


@pytest.fixture
def cpu_default_device():
    """Script tests build their data on the CPU, as the scripts do, even in the CUDA suite."""
    torch.set_default_device(None)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
