"""Progress lines without a terminal; the TensorBoard flag without tensorboard installed."""
import pytest


def test_progress_without_a_terminal_prints_a_line_every_n_steps(capsys):
    import io

    from capstriton.training import Progress
    reads = []
    progress = Progress(7, "epoch 1/2", log_every=3, stream=io.StringIO())  # not a terminal
    for done in range(1, 8):
        progress.update(done, lambda: reads.append(done) or {"loss": 0.5})
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["3/7", "6/7", "7/7"]
    assert reads == [3, 6, 7] and "\r" not in "".join(lines) and "loss 0.5" in lines[0]


def test_tensorboard_flag_says_how_to_install_it(monkeypatch):
    import sys

    from capstriton.training import tensorboard_writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        tensorboard_writer("runs/tb")
