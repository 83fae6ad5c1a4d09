"""The start-up check of the Triton kernels against the PyTorch reference."""
import torch

from capstriton.kernels.routing import dynamic as dynamic_kernels
from capstriton.training import triton_self_check


def test_triton_self_check_passes_and_catches_a_broken_kernel(monkeypatch):
    device = torch.device("cpu")  # kernels run under the interpreter in the suite
    small = {"in_caps": 16, "batch": 2}
    assert triton_self_check(device, **small) is None
    real = dynamic_kernels.transform_route_fwd

    def off_by_a_bit(u, W, iterations):
        v, s_all, V_all = real(u, W, iterations)
        return v * 1.01, s_all, V_all
    monkeypatch.setattr(dynamic_kernels, "transform_route_fwd", off_by_a_bit)  # where capstriton.routing calls it
    assert "v differs" in triton_self_check(device, **small)
