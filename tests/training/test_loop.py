"""The training loop on a toy problem: evaluations every N steps and at the end, early stopping
(keeping the best weights), the time budget, a session limit; and EarlyStopping itself."""
import pytest
import torch

from capstriton.training import DrawnBatches, EarlyStopping, Loop, make_step


def _toy(total_steps, **loop_args):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def draw(gen):
        x = torch.randn(8, 4, generator=gen)
        return x, x @ target

    def loss_fn(x, y):
        return torch.nn.functional.mse_loss(model(x), y), None

    rows = []

    def evaluate(stats):
        rows.append(stats)
        return {"step": stats["step"], "score": -float(model.weight.sub(target.T).square().sum())}

    loop = Loop(model, optimizer, make_step(loss_fn, optimizer), DrawnBatches(draw, steps_per_epoch=5),
                total_steps=total_steps, schedule=lambda step, elapsed: 0.1, evaluate=evaluate, progress=False,
                **loop_args)
    return loop, rows


def test_evaluations_every_n_steps_and_at_the_end():
    loop, stats = _toy(12, eval_every=4)
    run = loop.run()
    assert run["reason"] is None and run["steps"] == 12 and run["epochs_run"] == 3
    assert [r["step"] for r in loop.history] == [4, 8, 12]
    assert all(s["images"] == 32 for s in stats) and stats[0]["train_acc"] is None
    assert stats[-1]["train_loss"] < stats[0]["train_loss"]  # it learns


def test_evaluations_at_epoch_ends_and_a_session_limit():
    loop, _ = _toy(12, stop_at=7)
    run = loop.run()
    assert run["reason"] == "max_steps" and run["steps"] == 7 and run["last_epoch"] == 1
    assert [r["step"] for r in loop.history] == [5]


def test_early_stopping_keeps_the_best_weights():
    stopper = EarlyStopping(patience=2)
    loop, _ = _toy(100, eval_every=1, early_stopping=stopper, score="score")
    loop.schedule = lambda step, elapsed: 0.1 if step < 6 else 5.0  # diverges after step 6
    run = loop.run()
    assert run["reason"] == "evaluation" and stopper.best_step == 6 and run["steps"] == 8
    assert [r["best_score"] for r in loop.history][-1] == stopper.best
    stopper.restore(loop.model)
    torch.testing.assert_close(stopper.best_state["weight"], loop.model.weight.detach())


def test_time_budget_trains_one_step_then_evaluates():
    loop, _ = _toy(100, eval_every=50, time_budget=1e-9)
    run = loop.run()
    assert run["reason"] == "time" and run["steps"] == 1 and [r["step"] for r in loop.history] == [1]


def test_early_stopping():
    model = torch.nn.Linear(2, 1)
    stop = EarlyStopping(patience=2)
    scores = [0.5, 0.7, 0.6, 0.65]
    kept = None
    for step, score in enumerate(scores):
        with torch.no_grad():
            model.weight.fill_(step)
        if score == 0.7:
            kept = model.weight.clone()
        done = stop.update(model, score, step)
    assert done and stop.best == 0.7 and stop.best_step == 1 and "no validation gain" in stop.reason
    stop.restore(model)
    assert torch.equal(model.weight, kept)
    target = EarlyStopping(patience=10, target=0.8)
    assert not target.update(model, 0.79, 0) and target.update(model, 0.8, 1) and target.best_step == 1


def test_loop_needs_a_length():
    with pytest.raises(ValueError, match="epochs or total_steps"):
        Loop(torch.nn.Linear(1, 1), None, None, DrawnBatches(lambda gen: (torch.zeros(1),), 1),
             schedule=lambda step, elapsed: 0.1)
