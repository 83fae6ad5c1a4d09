"""Training checkpoints: written atomically, sealed with a checksum and read back with
``torch.load(weights_only=True)``; the random states a run depends on, for exact resume.

A checkpoint is the zip archive ``torch.save`` writes, with two additions that leave it
readable by plain ``torch.load``: a CRC32 of every tensor's bytes, recorded in the payload
under ``"checksums"``, and a SHA-256 of the whole file in the zip's comment (its last bytes).
``load_checkpoint`` verifies the SHA-256 and names the damaged tensor through the CRC32s, so a
flipped byte anywhere (headers, tensor data, pickled structure, the end) raises
``CheckpointError``.  ``save_checkpoint`` keeps the checkpoint it replaces as
``previous_checkpoint(path)`` (``--resume`` falls back to it)."""
from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

from ..files import atomic_write

__all__ = ["save_checkpoint", "write_checkpoint", "load_checkpoint", "previous_checkpoint", "CheckpointError",
           "UncheckedCheckpointWarning", "rng_state", "restore_rng_state", "load_optimizer_state"]


class CheckpointError(ValueError):
    """A file that is not a readable capstriton checkpoint (truncated, foreign, corrupted)."""


class UncheckedCheckpointWarning(UserWarning):
    """A checkpoint written before checksums were recorded: its corruption cannot be detected."""


_PLAIN = (str, int, float, bool, type(None))
_CHECKSUMS = "checksums"
_SEAL = b"capstriton-sha256:"  # + 64 hex digits: the zip comment of a sealed checkpoint
_SEAL_LEN = len(_SEAL) + 64
_END = b"PK\x05\x06"  # the zip's end-of-central-directory record: 22 bytes, then the comment
_END_LEN = 22


def _plain(value: Any) -> Any:
    """Keep only what the weights-only unpickler accepts (primitives, lists, dicts, tensors)."""
    if isinstance(value, _PLAIN) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """Where ``save_checkpoint(path)`` keeps the checkpoint it replaced: checkpoint.pt ->
    checkpoint.prev.pt (same folder)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _tensors(obj: Any, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in nested dicts and lists, named by its keys."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{name}.{key}" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{name}[{i}]")


def _crc(t: torch.Tensor) -> int:
    """CRC32 of the tensor's values as bytes (any dtype, layout and device)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0


class _SealingWriter:
    """The file object ``torch.save`` writes to: passes its bytes to ``f`` and into a SHA-256,
    holding back the zip's end record until ``seal`` sets its comment length and appends the
    digest as the comment."""

    def __init__(self, f):
        self.f, self.sha, self.tail = f, hashlib.sha256(), b""

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        n = len(data)
        if n >= _END_LEN:
            self._out(self.tail)
            self._out(data[:n - _END_LEN])
            self.tail = bytes(data[n - _END_LEN:])
        else:
            joined = self.tail + bytes(data)
            self._out(joined[:-_END_LEN])
            self.tail = joined[-_END_LEN:]
        return n

    def _out(self, data) -> None:
        if len(data):
            self.sha.update(data)
            self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def seal(self) -> None:
        if len(self.tail) != _END_LEN or self.tail[:4] != _END or self.tail[-2:] != b"\0\0":
            raise RuntimeError("torch.save did not end its archive with a comment-free end record")
        self._out(self.tail[:-2] + struct.pack("<H", _SEAL_LEN))
        self.f.write(_SEAL + self.sha.hexdigest().encode())


def write_checkpoint(path: str | os.PathLike, state: dict, keep_previous: bool = True) -> Path:
    """Write the dict ``state`` (what ``load_checkpoint`` returns) atomically with its
    checksums; with ``keep_previous`` the file it replaces becomes ``previous_checkpoint(path)``."""
    state = {k: v for k, v in state.items() if k != _CHECKSUMS}
    state[_CHECKSUMS] = {"crc32": [[name, _crc(t)] for name, t in _tensors(state)]}

    def write(f) -> None:
        sealed = _SealingWriter(f)
        torch.save(state, sealed)
        sealed.seal()

    return atomic_write(path, write, previous=previous_checkpoint(path) if keep_previous else None)


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, epoch: int, args: dict | None = None, keep_previous: bool = True,
                    **extra: Any) -> Path:
    """Save state_dicts + epoch + args to ``path`` via a temporary file and os.replace, so an
    interrupted save never leaves a truncated checkpoint; checksums as ``write_checkpoint``.
    With ``keep_previous``, the checkpoint it replaces stays beside it as
    ``previous_checkpoint(path)``."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "args": _plain(args or {}),
        **{k: _plain(v) for k, v in extra.items()},
    }
    return write_checkpoint(path, state, keep_previous=keep_previous)


def _seal_of(data: bytes) -> tuple[int, bytes] | None:
    """(length of the sealed part, recorded hex digest) when ``data`` ends with a seal."""
    end = len(data) - _SEAL_LEN - _END_LEN
    if end < 0 or data[end:end + 4] != _END or data[len(data) - _SEAL_LEN:][:len(_SEAL)] != _SEAL:
        return None
    return len(data) - _SEAL_LEN, data[len(data) - 64:]


def _damaged_tensors(state: Any) -> list[str]:
    """The tensors of a loaded payload whose CRC32 differs from the one recorded at saving."""
    recorded = state.get(_CHECKSUMS, {}).get("crc32", []) if isinstance(state, dict) else []
    found = dict(_tensors({k: v for k, v in state.items() if k != _CHECKSUMS})) if isinstance(state, dict) else {}
    return [name for name, crc in recorded if name not in found or _crc(found[name]) != crc]


def _unpickle(data: bytes, map_location: Any) -> Any:
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The checkpoint dict, loaded with weights_only=True (no arbitrary code from the file),
    after verifying its checksum.

    FileNotFoundError when ``path`` does not exist; CheckpointError (a ValueError) naming the
    file (and, where it can, the tensor) when it is truncated, corrupted or not a capstriton
    checkpoint.  A checkpoint written before checksums were recorded loads with an
    ``UncheckedCheckpointWarning``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    seal = _seal_of(data)
    if seal is not None and hashlib.sha256(memoryview(data)[:seal[0]]).hexdigest().encode() != seal[1]:
        try:
            damaged = _damaged_tensors(_unpickle(data, "cpu"))
        except Exception:  # noqa: BLE001 - the damage broke the archive or its structure
            damaged = []
        where = (f"tensor {damaged[0]} differs from its checksum" if damaged else
                 "its bytes differ from the checksum recorded when it was saved (the damage lies outside the "
                 "tensor data: the archive's headers, its structure or the checksum itself)")
        raise CheckpointError(f"checkpoint {path} is corrupted: {where}")
    try:
        state = _unpickle(data, map_location)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; name the file instead
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path} ({len(data)} bytes): it is truncated, "
                              f"corrupted or not a torch checkpoint [{type(e).__name__}: {reason[:200]}]") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not a capstriton training checkpoint "
                              "(expected a dict with keys 'model' and 'epoch')")
    if seal is None:
        if _CHECKSUMS in state:  # written with checksums, but its end (the seal) is damaged
            raise CheckpointError(f"checkpoint {path} is corrupted: the checksum at its end is damaged")
        warnings.warn(f"checkpoint {path} carries no checksum (written before checkpoints recorded one): "
                      "corruption in it cannot be detected", UncheckedCheckpointWarning, stacklevel=2)
    state.pop(_CHECKSUMS, None)
    return state


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random state of this process: torch's CPU generator, the current CUDA device's
    generator (when CUDA is initialized) and the named ``generators``."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, gen in (generators or {}).items():
        state[f"gen.{name}"] = gen.get_state()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Undo ``rng_state``: afterwards every generator draws what it drew when the state was taken."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    for name, gen in (generators or {}).items():
        key = f"gen.{name}"
        if key not in state:
            raise ValueError(f"the saved random state has no generator {name!r} (it has {sorted(state)})")
        gen.set_state(state[key].cpu())


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load ``saved`` but keep this run's implementation flags (fused/capturable/foreach) and
    learning-rate type, which may differ from the run that saved it."""
    saved = {**saved, "param_groups": [dict(g) for g in saved["param_groups"]]}
    for mine, theirs in zip(optimizer.param_groups, saved["param_groups"]):
        for key in ("fused", "capturable", "foreach", "differentiable"):
            if key in mine:
                theirs[key] = mine[key]
        lr = theirs["lr"]
        theirs["lr"] = mine["lr"].clone().fill_(float(lr)) if isinstance(mine["lr"], torch.Tensor) else float(lr)
    optimizer.load_state_dict(saved)
