"""Checkpoints are written atomically, keep the previous one beside them, carry checksums
that catch a flipped byte anywhere, and are read back weights-only."""
import io
import os
import re
import stat
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from capstriton.training import (
    CheckpointError,
    load_checkpoint,
    previous_checkpoint,
    rng_state,
    save_checkpoint,
    write_checkpoint,
)
from capstriton.training.checkpoint import UncheckedCheckpointWarning


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


# -- checksums -------------------------------------------------------------------------------

def _trained_checkpoint(path: Path) -> tuple[bytes, dict]:
    """A small checkpoint with model, optimizer moments and random states; its bytes and what
    plain torch.load reads from it."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(path, model=model, optimizer=optimizer, epoch=1, step=3, rng=rng_state(), history=[{"a": 0.5}])
    return path.read_bytes(), torch.load(path, weights_only=True)


def _tensor_records(data: bytes) -> dict[str, tuple[int, int]]:
    """zip record name -> (first byte, end) of its data, for the tensors' records."""
    records = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            if "/data/" in info.filename:
                start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28],
                                                                 "little") \
                    + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
                records[info.filename] = (start, start + info.file_size)
    return records


def _changed_tensors(loaded: dict, original: dict, prefix: str = "") -> list[str]:
    """Names (as the checkpoint names them) of the tensors whose values differ."""
    out = []
    for key, value in original.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            if not torch.equal(loaded[key], value):
                out.append(name)
        elif isinstance(value, dict):
            out += _changed_tensors(loaded[key], value, name)
    return out


def test_plain_torch_load_reads_a_checkpoint_and_the_checksums_stay_internal(tmp_path):
    good, plain = _trained_checkpoint(tmp_path / "ck.pt")
    assert good[-82:].startswith(b"capstriton-sha256:")  # the zip comment
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sealed checkpoint loads without a warning
        state = load_checkpoint(tmp_path / "ck.pt")
    assert "checksums" not in state and "checksums" in plain
    assert set(state) == set(plain) - {"checksums"} and state["step"] == 3
    torch.testing.assert_close(state["model"], plain["model"], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corruption_anywhere_raises_checkpoint_error(tmp_path):
    """A byte flipped in the header, in each tensor's data, in the pickled structure, anywhere in
    the zip's end record or its checksum comment: CheckpointError naming the file every time
    (plain torch.load reads many of these files without complaint)."""
    path = tmp_path / "ck.pt"
    good, original = _trained_checkpoint(path)
    records = _tensor_records(good)
    assert len(records) >= 9  # model (2), moments (4), steps (2), the random state
    # every byte of the first and last 128, the first and last 8 of every tensor, a sample of the rest
    offsets = set(range(128)) | set(range(len(good) - 128, len(good))) | set(range(0, len(good), 29))
    in_tensors = set()
    for start, end in records.values():
        in_tensors |= set(range(start, min(end, start + 8))) | set(range(max(start, end - 8), end))
        in_tensors |= set(range(start, end, 61))
    silent = 0
    for offset in sorted(offsets | in_tensors):
        damaged = bytearray(good)
        damaged[offset] ^= 0x5A
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            load_checkpoint(path)
        if offset in in_tensors:
            silent += isinstance(torch.load(path, weights_only=True), dict)
    assert silent == len(in_tensors)  # plain torch.load reads every one of those without complaint


def test_corrupted_tensor_data_is_named(tmp_path):
    """16 bytes flipped inside each tensor's data: the error names that tensor."""
    path = tmp_path / "ck.pt"
    good, original = _trained_checkpoint(path)
    named = set()
    for start, end in _tensor_records(good).values():
        damaged = bytearray(good)
        for i in range(start, min(end, start + 16)):
            damaged[i] ^= 0xFF
        path.write_bytes(bytes(damaged))
        changed = _changed_tensors(torch.load(path, weights_only=True), original)
        assert len(changed) == 1
        with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(path))} is corrupted: tensor "
                                                  rf"{re.escape(changed[0])} differs from its checksum"):
            load_checkpoint(path)
        named.add(changed[0])
    assert {"model.weight", "model.bias", "optimizer.state.0.exp_avg", "rng.torch"} <= named


def test_a_checkpoint_without_checksums_loads_with_a_one_line_warning(tmp_path):
    path = tmp_path / "old.pt"
    model = torch.nn.Linear(3, 2)
    torch.save({"model": model.state_dict(), "optimizer": None, "epoch": 2, "args": {}}, path)  # as before checksums
    with pytest.warns(UncheckedCheckpointWarning, match=f"checkpoint {re.escape(str(path))} carries no checksum") as w:
        state = load_checkpoint(path)
    assert state["epoch"] == 2 and len(w) == 1 and "\n" not in str(w[0].message)
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach())
    # but a checkpoint that records checksums and lost its seal is corrupted, not old
    good, _ = _trained_checkpoint(path)
    path.write_bytes(good[:-82] + b"x" * 82)
    with pytest.raises(CheckpointError, match="the checksum at its end is damaged"):
        load_checkpoint(path)


def test_write_checkpoint_seals_a_modified_state(tmp_path):
    path = tmp_path / "ck.pt"
    _trained_checkpoint(path)
    state = load_checkpoint(path)
    state["epoch"] = 7
    write_checkpoint(path, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(path)["epoch"] == 7


def test_the_previous_checkpoint_is_kept_beside_the_latest(tmp_path):
    path, previous = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    assert previous_checkpoint(path) == previous
    model = torch.nn.Linear(3, 2)
    save_checkpoint(path, model=model, epoch=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    save_checkpoint(path, model=model, epoch=2)
    save_checkpoint(path, model=model, epoch=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert load_checkpoint(path)["epoch"] == 3 and load_checkpoint(previous)["epoch"] == 2
    save_checkpoint(path, model=model, epoch=4, keep_previous=False)
    assert load_checkpoint(path)["epoch"] == 4 and load_checkpoint(previous)["epoch"] == 2


def test_the_rotation_is_atomic(tmp_path, monkeypatch):
    """At every rename, both names hold a complete checkpoint (the previous one is a hard link
    first), and a failed write rotates nothing."""
    path, previous = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    model = torch.nn.Linear(3, 2)
    save_checkpoint(path, model=model, epoch=1)
    save_checkpoint(path, model=model, epoch=2)
    seen, replace = [], os.replace

    def checked_replace(src, dst):
        seen.append((load_checkpoint(path)["epoch"], load_checkpoint(previous)["epoch"]))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", checked_replace)
    save_checkpoint(path, model=model, epoch=3)
    monkeypatch.undo()
    assert seen == [(2, 1), (2, 2)] and load_checkpoint(previous)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]

    def broken_save(obj, f, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, epoch=4)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 3 and load_checkpoint(previous)["epoch"] == 2


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    events, replace, fsync = [], os.replace, os.fsync

    def logged_replace(src, dst):
        events.append(("replace", Path(dst).name))
        replace(src, dst)

    def logged_fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        fsync(fd)

    monkeypatch.setattr(os, "replace", logged_replace)
    monkeypatch.setattr(os, "fsync", logged_fsync)
    save_checkpoint(tmp_path / "checkpoint.pt", model=torch.nn.Linear(3, 2), epoch=1)
    save_checkpoint(tmp_path / "checkpoint.pt", model=torch.nn.Linear(3, 2), epoch=2)
    assert events == [("fsync", "file"), ("replace", "checkpoint.pt"), ("fsync", "folder")] * 1 + [
        ("fsync", "file"), ("replace", "checkpoint.prev.pt"), ("replace", "checkpoint.pt"), ("fsync", "folder")]
