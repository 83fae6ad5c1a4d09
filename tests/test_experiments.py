"""Model-side helpers of the experiments: MultiMNIST loss and top-2 metric, decoding of chosen
and perturbed capsules, the CNN baseline, rebuilding a CapsNet from a checkpoint, early stopping."""
import pytest
import torch

import capstriton as ct
from capstriton.baselines import ConvBaseline, conv_baseline_matching, count_parameters
from capstriton.decoding import decode_capsule, decode_perturbations, masked_capsules, perturbation_deltas
from capstriton.evaluation import capsnet_config, capsnet_from_checkpoint, confusion_matrix
from capstriton.experiments import EarlyStopping, paper_lr
from capstriton.multimnist import multi_hot, multimnist_loss, pair_errors, top2


@pytest.fixture(autouse=True)
def _cpu_default_device():
    """These tests build their data on the CPU, as the scripts do, even in the CUDA suite."""
    torch.set_default_device(None)


def _tiny(image_size=28, **kw):
    return ct.CapsNet(image_size=image_size, conv_channels=4, primary_caps=2, iterations=2, backend="torch", **kw)


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
    model = _tiny(36)
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
    expected = margin + 0.5 * (ct.reconstruction_loss(first, sources[:, 0]) + ct.reconstruction_loss(second, sources[:, 1]))
    torch.testing.assert_close(loss, expected)
    # targets equal to each digit's own-capsule reconstruction cost nothing; swapped, they do
    exact = torch.stack([first, second], 1).detach().view(3, 2, 36, 36)
    torch.testing.assert_close(multimnist_loss(model, x, exact, labels, 1.0)[0], margin)
    swapped = multimnist_loss(model, x, exact.flip(1), labels, 1.0)[0]
    assert float((swapped - margin).detach()) > 1e-3
    torch.testing.assert_close(multimnist_loss(model, x, sources, labels, 0.0)[0], margin)


def test_decoding_masks_and_perturbations():
    torch.manual_seed(1)
    model = _tiny()
    v = torch.randn(2, 10, 16)
    labels = torch.tensor([3, 8])
    masked = masked_capsules(v, labels).view(2, 10, 16)
    assert torch.equal(masked[0, 3], v[0, 3]) and masked[0].abs().sum() == v[0, 3].abs().sum()
    torch.testing.assert_close(decode_capsule(model, v, labels), model.decoder(masked.flatten(1)))
    deltas = perturbation_deltas(0.25, 0.05)
    assert len(deltas) == 11 and deltas[0] == -0.25 and deltas[-1] == 0.25
    torch.testing.assert_close(deltas[1:] - deltas[:-1], torch.full((10,), 0.05))
    grid = decode_perturbations(model, v[0], 3, deltas)
    assert grid.shape == (16, 11, 784)
    for d, j in ((0, 5), (7, 0), (15, 10)):  # row d, column j: dimension d of capsule 3 moved by deltas[j]
        moved = v[0].clone()
        moved[3, d] += deltas[j]
        torch.testing.assert_close(grid[d, j], decode_capsule(model, moved[None], torch.tensor([3]))[0])
    torch.testing.assert_close(grid[4, 5], decode_capsule(model, v[:1], torch.tensor([3]))[0])  # delta 0
    with pytest.raises(ValueError, match="no decoder"):
        decode_capsule(_tiny(decoder=False), v, labels)


def test_conv_baseline_matches_the_parameter_count():
    capsnet = ct.CapsNet(image_size=40, conv_channels=64, primary_caps=4)
    target = count_parameters(capsnet)
    cnn = conv_baseline_matching(target, 40, channels=(32, 64, 32))
    assert abs(count_parameters(cnn) - target) / target < 1e-3
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in cnn.modules())
    assert any(isinstance(m, torch.nn.Dropout) for m in cnn.modules())
    assert cnn(torch.rand(2, 1, 40, 40)).shape == (2, 10)
    with pytest.raises(ValueError, match="shape"):
        cnn(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="channels"):
        ConvBaseline(channels=(8, 8))


@pytest.mark.parametrize("image_size", [28, 36, 40])
def test_capsnet_rebuilt_from_checkpoint(image_size):
    torch.manual_seed(2)
    model = _tiny(image_size)
    state = {"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "epoch": 1,
             "args": {"model": {"iterations": 2, "detach": False}}}
    rebuilt, cfg = capsnet_from_checkpoint(state, backend="torch")
    assert cfg["image_size"] == image_size and cfg["conv_channels"] == 4 and cfg["primary_caps"] == 2
    assert cfg["iterations"] == 2 and cfg["decoder"]
    x = torch.rand(2, 1, image_size, image_size)
    for a, b in zip(model.eval()(x), rebuilt(x)):
        torch.testing.assert_close(a, b)
    no_decoder = _tiny(image_size, decoder=False).state_dict()
    assert capsnet_config(no_decoder)["image_size"] == image_size
    with pytest.raises(ValueError, match="not a CapsNet"):
        capsnet_config(ConvBaseline().state_dict())


def test_confusion_matrix_and_early_stopping():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
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
    assert paper_lr(1e-3, 0) == 1e-3 and paper_lr(1e-3, 2000) == pytest.approx(0.96e-3)
