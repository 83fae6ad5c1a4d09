"""Test-suite set-up.  Runs the Triton kernels on the CPU through Triton's interpreter:
TRITON_INTERPRET must be set BEFORE triton is imported, so it is set here, first."""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ["CAPSTRITON_POISON_OUTPUTS"] = "1"  # kernel outputs start as NaN (kernels/_common.py)
os.environ["CAPSTRITON_SINGLE_CONFIG"] = "1"   # autotuners keep one config

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
