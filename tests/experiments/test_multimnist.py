"""MultiMNIST: the loss with both labels present and each digit's own capsule, the top-2 metric."""
import pytest
import torch

import capstriton as ct
from capstriton.experiments.multimnist import multi_hot, multimnist_loss, pair_errors, top2
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
