"""Learning-rate schedules: the paper's exponential decay, and the budget schedule by steps or time."""
import pytest

from capstriton.training import learning_rate, paper_lr


def test_learning_rate_schedules():
    cfg = {"schedule": "exp", "lr": 1e-3, "lr_decay": 0.96, "decay_steps": 2000, "lr_final": 0.05,
           "time_budget": None}
    assert learning_rate(cfg, 0, 0.0, 100) == pytest.approx(1e-3)
    assert learning_rate(cfg, 4000, 0.0, 100) == pytest.approx(1e-3 * 0.96 ** 2)
    cfg.update(schedule="budget", time_budget=100.0)
    assert learning_rate(cfg, 0, 0.0, 1000) == pytest.approx(1e-3)
    assert learning_rate(cfg, 500, 10.0, 1000) == pytest.approx(1e-3 * 0.05 ** 0.5)  # by steps
    assert learning_rate(cfg, 100, 50.0, 1000) == pytest.approx(1e-3 * 0.05 ** 0.5)  # by time
    assert learning_rate(cfg, 100, 500.0, 1000) == pytest.approx(1e-3 * 0.05)  # never below lr_final
    assert paper_lr(1e-3, 0) == 1e-3 and paper_lr(1e-3, 2000) == pytest.approx(0.96e-3)
