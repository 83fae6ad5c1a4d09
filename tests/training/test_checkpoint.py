"""Checkpoints are written atomically and read back weights-only."""
from pathlib import Path

import pytest
import torch

from capstriton.training import load_checkpoint, save_checkpoint


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "ck.pt", model=model, epoch=1, args={"a": 1, "p": Path("x")})
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and state["args"] == {"a": 1, "p": "x"}
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach().cpu())
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
