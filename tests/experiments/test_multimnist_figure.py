"""The MultiMNIST figure (the paper's Figure 5) draws what it says: each digit reconstructed from
its own capsule, the longest capsule's class in the "longest" row and in red, the second
longest's in the "second" row and in green, and for errors the true classes' capsules.  Tested
on what reaches the canvas (the image matplotlib is given), with a decoder whose output names
the capsule it was fed."""
import matplotlib.axes
import torch
from torch import nn

from capstriton.experiments.report import write_pair_figures

K, SIDE, PAD = 10, 6, 2  # classes, image side, the mosaic's padding (figures._tile)


class CapsuleNamingDecoder(nn.Module):
    """Fed the capsules masked to class k alone (D = 1, every capsule 1): an image of the
    constant value (k + 1) / (K + 1)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(K, SIDE * SIDE, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(((torch.arange(K) + 1.0) / (K + 1)).expand(SIDE * SIDE, K))

    def forward(self, masked):
        return self.linear(masked)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = CapsuleNamingDecoder()


def _value(k: int) -> float:
    return (k + 1) / (K + 1)


def _cell(mosaic: torch.Tensor, row: int, col: int) -> torch.Tensor:
    top, left = PAD + row * (SIDE + PAD), PAD + col * (SIDE + PAD)
    return mosaic[top:top + SIDE, left:left + SIDE]


def _part(labels, pred) -> dict:
    n = len(labels)
    return {"x": torch.full((n, SIDE, SIDE), 51.0), "labels": torch.tensor(labels), "pred": torch.tensor(pred),
            "capsules": torch.ones(n, K, 1), "pair": torch.arange(n)}


def test_the_pair_figure_decodes_each_digit_from_its_own_capsule(tmp_path, monkeypatch):
    drawn, imshow = [], matplotlib.axes.Axes.imshow

    def recording_imshow(self, image, *args, **kwargs):
        drawn.append(torch.as_tensor(image).clone())
        return imshow(self, image, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", recording_imshow)
    examples = _part([[3, 8], [1, 6], [0, 2]], [[8, 3], [6, 1], [2, 5]])  # pred: longest first
    errors = _part([[0, 2], [4, 9]], [[2, 5], [7, 4]])
    result = {"confusion": torch.zeros(K, K, dtype=torch.long), "examples": examples, "errors": errors}
    files = write_pair_figures(Model(), tmp_path, result, torch.device("cpu"))
    assert {"multimnist_reconstructions.png", "multimnist_errors.png"} <= set(files)
    assert all((tmp_path / f).stat().st_size > 0 for f in files)

    figures = [m for m in drawn if m.dim() == 3 and m.shape[-1] == 3 and m.shape[0] > 4 * SIDE]
    assert len(figures) == 2  # (the confusion matrix is drawn as a 2-D array)
    for mosaic, part in zip(figures, (examples, errors)):
        for j, ((first, second), (true_a, true_b)) in enumerate(zip(part["pred"].tolist(), part["labels"].tolist())):
            torch.testing.assert_close(_cell(mosaic, 0, j), torch.full((SIDE, SIDE, 3), 0.2))  # the input, grey
            rows = {1: (_value(first),) * 3, 2: (_value(second),) * 3, 3: (_value(first), _value(second), 0.0)}
            if part is errors:
                rows[4] = (_value(true_a), _value(true_b), 0.0)  # the true classes' capsules
            else:
                assert mosaic.shape[0] == PAD + 4 * (SIDE + PAD)  # no true-class row for the examples
            for row, rgb in rows.items():
                expected = torch.tensor(rgb, dtype=mosaic.dtype).expand(SIDE, SIDE, 3)
                torch.testing.assert_close(_cell(mosaic, row, j), expected, msg=f"row {row}, column {j}")
