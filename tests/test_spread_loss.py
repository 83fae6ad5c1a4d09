"""The spread loss of matrix capsules (Hinton et al. 2018, eq. 3; spec L1) and its margin
schedules (L2a, L2b)."""
import math

import pytest
import torch

import capstriton as ct


def test_spread_loss_values_by_hand():
    a = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.9], [0.4, 0.6, 0.5]])
    y = torch.tensor([0, 2, 0])
    m = 0.5
    # sample 0: gaps 0.9-0.5=0.4 -> (0.1)^2, 0.8 -> 0; sample 1: 0.7, 0.6 -> 0; sample 2: -0.2 -> 0.7^2, -0.1 -> 0.6^2
    want = (0.1 ** 2 + 0.0 + 0.0 + 0.7 ** 2 + 0.6 ** 2) / 3
    assert float(ct.spread_loss(a, y, m)) == pytest.approx(want, abs=1e-6)
    # the target's own term is left out (it would add m^2 per sample) and the margin can be a tensor
    assert float(ct.spread_loss(a, y, torch.tensor(m))) == pytest.approx(want, abs=1e-6)
    assert float(ct.spread_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), 0.9)) == 0.0
    assert float(ct.spread_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), 0.9)) == pytest.approx(1.9 ** 2)


def test_spread_loss_gradient_and_half_precision():
    a = torch.rand(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 4])
    loss = ct.spread_loss(a, y, 0.9)
    loss.backward()
    assert torch.isfinite(a.grad).all()
    # d/da_t is -2 sum_i gap_i / B, d/da_i = 2 gap_i / B
    gaps = torch.clamp(0.9 - (a.detach()[torch.arange(4), y].unsqueeze(1) - a.detach()), min=0)
    gaps[torch.arange(4), y] = 0
    assert torch.allclose(a.grad[torch.arange(4), y], -2 * gaps.sum(1) / 4, atol=1e-6)
    half = ct.spread_loss(a.detach().half(), y, 0.9)
    assert half.dtype == torch.float32 and float(half) == pytest.approx(float(loss.detach()), rel=1e-2)


def test_spread_loss_refuses_bad_input():
    a, y = torch.rand(3, 4), torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match=r"2 dimensions \(B, E\)"):
        ct.spread_loss(a[0], y, 0.2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ct.spread_loss(a[:, :1], torch.zeros(3, dtype=torch.long), 0.2)
    with pytest.raises(TypeError, match="integer class labels"):
        ct.spread_loss(a, y.float(), 0.2)
    with pytest.raises(TypeError, match="integer class labels"):
        ct.spread_loss(a, y > 0, 0.2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ct.spread_loss(a, [0, 1, 3], 0.2)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ct.spread_loss(a, y[:2], 0.2)
    with pytest.raises(ValueError, match=r"margin must be a number in \[0, 1\]"):
        ct.spread_loss(a, y, 1.5)
    with pytest.raises(ValueError, match="0-dim tensor"):
        ct.spread_loss(a, y, torch.tensor([0.2, 0.3]))
    with pytest.raises(TypeError, match="floating-point"):
        ct.spread_loss(a.long(), y, 0.2)
    with pytest.raises(RuntimeError, match=r"class labels must lie in \[0, 4\)"):
        ct.spread_loss(a, torch.tensor([0, 1, 4]), 0.2)
    with pytest.raises(RuntimeError, match=r"activations must lie in \[0, 1\]"):
        ct.spread_loss(a + 1.0, y, 0.2)


def test_margin_schedules():
    assert ct.spread_margin(0.0) == pytest.approx(0.2)
    assert ct.spread_margin(0.5) == pytest.approx(0.55)
    assert ct.spread_margin(1.0) == pytest.approx(0.9)
    assert ct.spread_margin(-1.0) == pytest.approx(0.2) and ct.spread_margin(7.0) == pytest.approx(0.9)
    assert ct.spread_margin(0.5, start=0.1, end=0.3) == pytest.approx(0.2)
    # the authors' code: 0.214 at step 0, 0.595 at 200k, saturating near 0.99 (never 0.9)
    assert ct.spread_margin_sigmoid(0) == pytest.approx(0.2 + 0.79 / (1 + math.exp(4)))
    assert ct.spread_margin_sigmoid(0) == pytest.approx(0.214, abs=1e-3)
    assert ct.spread_margin_sigmoid(200_000) == pytest.approx(0.595)
    assert ct.spread_margin_sigmoid(10**9) == pytest.approx(0.2 + 0.79 / (1 + math.exp(-10)))
    with pytest.raises(TypeError, match="progress must be a finite number"):
        ct.spread_margin(float("nan"))
    with pytest.raises(TypeError, match="step must be a finite number"):
        ct.spread_margin_sigmoid("10")
