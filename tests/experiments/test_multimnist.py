"""MultiMNIST: the loss with both labels present and each digit's own capsule, the top-2 metric, the
pair confusion, the confidence intervals and the streamed evaluation of the test protocol."""
import pytest
import torch

import capstriton as ct
from capstriton import data as D
from capstriton.experiments.multimnist import (
    bootstrap_interval,
    evaluate_pairs,
    multi_hot,
    multimnist_loss,
    pair_confusion,
    pair_errors,
    top2,
    wilson_interval,
)
from tests.data.digits import random_digits
from tests.experiments.tiny import tiny_capsnet


def test_top2_and_pair_error_on_hand_made_cases():
    lengths = torch.tensor([[0.90, 0.10, 0.80, 0.00, 0.20],
                            [0.10, 0.30, 0.20, 0.95, 0.05],
                            [0.50, 0.60, 0.70, 0.00, 0.00]])
    assert top2(lengths).tolist() == [[0, 2], [3, 1], [2, 1]]
    true = torch.tensor([[2, 0],    # same pair, other order: right
                         [3, 2],    # one of two wrong: wrong
                         [0, 4]])   # both wrong: wrong
    assert pair_errors(top2(lengths), true).tolist() == [False, True, True]
    assert float(pair_errors(top2(lengths), true).float().mean()) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        pair_errors(torch.zeros(3, 3, dtype=torch.long), true)


def test_multimnist_loss_uses_both_labels_and_each_digits_own_capsule():
    torch.manual_seed(0)
    model = tiny_capsnet(36)
    with torch.no_grad():
        model.digit.weight.mul_(100.0)  # long, distinct capsules ...
        model.decoder[0].weight.mul_(100.0)  # ... and distinct reconstructions
    x = torch.rand(3, 1, 36, 36)
    sources = torch.rand(3, 2, 36, 36)
    labels = torch.tensor([[1, 7], [0, 9], [4, 2]])
    loss, lengths = multimnist_loss(model, x, sources, labels, recon_weight=0.5)
    _, _, v = model(x, labels[:, 0])
    T = multi_hot(labels, 10)
    assert T.sum(1).tolist() == [2.0, 2.0, 2.0] and T[0, 1] == 1 and T[0, 7] == 1
    margin = ct.margin_loss(lengths, T)
    # the second digit's reconstruction from its own capsule, masked by hand
    mask = torch.zeros(3, 10, 1)
    mask[torch.arange(3), labels[:, 1]] = 1
    second = model.decoder((v * mask).flatten(1))
    first = model(x, labels[:, 0])[1]
    expected = margin + 0.5 * (ct.reconstruction_loss(first, sources[:, 0])
                               + ct.reconstruction_loss(second, sources[:, 1]))
    torch.testing.assert_close(loss, expected)
    # targets equal to each digit's own-capsule reconstruction cost nothing; swapped, they do
    exact = torch.stack([first, second], 1).detach().view(3, 2, 36, 36)
    torch.testing.assert_close(multimnist_loss(model, x, exact, labels, 1.0)[0], margin)
    swapped = multimnist_loss(model, x, exact.flip(1), labels, 1.0)[0]
    assert float((swapped - margin).detach()) > 1e-3
    torch.testing.assert_close(multimnist_loss(model, x, sources, labels, 0.0)[0], margin)


def test_pair_confusion_on_hand_made_cases():
    pred = torch.tensor([[1, 2], [3, 1], [5, 6], [0, 9]])
    true = torch.tensor([[2, 1],    # right, other order: 1->1, 2->2
                         [1, 4],    # 4 missed, 3 took its place: 1->1, 4->3
                         [7, 8],    # both missed: 7->5, 8->6
                         [9, 0]])   # right: 0->0, 9->9
    cm = pair_confusion(pred, true, 10)
    expected = torch.zeros(10, 10, dtype=torch.long)
    for t, p in ((1, 1), (2, 2), (1, 1), (4, 3), (7, 5), (8, 6), (0, 0), (9, 9)):
        expected[t, p] += 1
    assert torch.equal(cm, expected) and int(cm.sum()) == 8
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        pair_confusion(pred[:, :1], true[:, :1], 10)


def test_confidence_intervals():
    lo, hi = wilson_interval(0, 10)  # Wilson's interval for 0 of 10: [0, 0.2775]
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    lo, hi = wilson_interval(52, 1000)
    assert lo == pytest.approx(0.03987, abs=1e-5) and hi == pytest.approx(0.06756, abs=1e-5)
    same = bootstrap_interval(torch.full((50,), 2), torch.full((50,), 4))  # every digit 50%: no spread
    assert same == pytest.approx((0.5, 0.5))
    # errors concentrated on a few base digits: wider than the binomial interval of as many pairs
    wrong = torch.zeros(200, dtype=torch.long)
    wrong[:20] = 10
    count = torch.full((200,), 10)
    b_lo, b_hi = bootstrap_interval(wrong, count, draws=2000, seed=1)
    w_lo, w_hi = wilson_interval(200, 2000)
    assert b_lo < 0.1 < b_hi and b_hi - b_lo > 1.5 * (w_hi - w_lo)


def test_evaluate_pairs_streams_the_protocol():
    torch.manual_seed(0)
    model = tiny_capsnet(36).eval()
    images, labels = random_digits(30)
    chunks = D.multimnist_pairs(images, labels, pairs_per_digit=3, seed=2, digits=20, chunk=16)
    result = evaluate_pairs(model, chunks, torch.device("cpu"), 20, batch_size=7, keep=5)
    parts = list(D.multimnist_pairs(images, labels, pairs_per_digit=3, seed=2, digits=20, chunk=16))
    x, true = torch.cat([p["x"] for p in parts]), torch.cat([p["labels"] for p in parts])
    lengths, _, _ = model(x.unsqueeze(1).float() / 255)
    wrong = pair_errors(top2(lengths), true)
    assert result["pairs"] == 60 and result["wrong"] == int(wrong.sum()) and result["error"] == wrong.float().mean()
    assert torch.equal(result["count_per_digit"], torch.full((20,), 3))
    assert torch.equal(result["wrong_per_digit"], torch.bincount(torch.arange(60) % 20, weights=wrong.double()).long())
    assert torch.equal(result["confusion"], pair_confusion(top2(lengths), true, 10))
    assert len(result["examples"]["labels"]) == 5 and torch.equal(result["examples"]["x"], x[:5])
    assert len(result["errors"]["labels"]) == min(5, int(wrong.sum()))
    assert result["errors"]["pair"].tolist() == wrong.nonzero().squeeze(1)[:5].tolist()
