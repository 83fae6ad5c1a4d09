"""Comparing the CNN with CapsNet at the same validation accuracy: the evaluation kept is the one
closest to the target, not the first one reaching it."""
import torch

from capstriton.experiments.comparison import ClosestToTarget
from capstriton.training import EarlyStopping


def _feed(rule, scores):
    model = torch.nn.Linear(1, 1)
    for step, score in enumerate(scores, start=1):
        with torch.no_grad():
            model.weight.fill_(step)  # the weights of each evaluation are told apart by their value
        if rule.update(model, score, step * 10):
            break
    rule.restore(model)
    return step, float(model.weight.detach())


def test_keeps_the_evaluation_closest_to_the_target():
    scores = [0.50, 0.80, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99]
    rule = ClosestToTarget(0.93, after=3)
    last, weight = _feed(rule, scores)
    assert rule.best == 0.925 and rule.best_step == 30 and weight == 3.0  # 0.925 is closer than 0.95
    assert rule.reached_step == 40 and last == 7  # three evaluations after reaching it
    assert rule.gap == 0.925 - 0.93 and "step 40" in rule.reason
    first = EarlyStopping(target=0.93)  # the former rule: the first evaluation reaching the target
    _feed(first, scores)
    assert first.best == 0.95  # overshoots by 2 points where 0.5 points was available


def test_a_later_evaluation_may_come_closer_and_below_the_target_it_keeps_the_best():
    rule = ClosestToTarget(0.93, after=3)
    _feed(rule, [0.90, 0.96, 0.935, 0.97, 0.98])
    assert rule.best == 0.935 and rule.best_step == 30
    stuck = ClosestToTarget(0.99, patience=2)
    last, _ = _feed(stuck, [0.5, 0.7, 0.6, 0.65, 0.9])
    assert last == 4 and stuck.best == 0.7 and "no approach" in stuck.reason
