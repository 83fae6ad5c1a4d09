"""Input checks shared by the public functions: every message says what was expected
and what was given."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, ndim: int | None = None, shape_hint: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{shape_hint}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{shape_hint}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def check_iterations(iterations) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"iterations must be an int >= 1, got {type(iterations).__name__} {iterations!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")


def check_same_device_dtype(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        t = tensors[name]
        if t.device != first.device:
            raise ValueError(f"{names[0]} and {name} must be on the same device, got {first.device} and {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{names[0]} and {name} must have the same dtype, got {first.dtype} and {t.dtype}")


def check_transform_shapes(u: torch.Tensor, W: torch.Tensor) -> None:
    check_tensor("u", u, 3, " (B, I, Din)")
    check_tensor("W", W, 4, " (I, J, Dout, Din)")
    check_same_device_dtype(u=u, W=W)
    if u.shape[1] != W.shape[0] or u.shape[2] != W.shape[3]:
        raise ValueError(
            "u (B, I, Din) and W (I, J, Dout, Din) disagree: expected u.shape[1] == W.shape[0] and "
            f"u.shape[2] == W.shape[3], got u {tuple(u.shape)} and W {tuple(W.shape)}"
        )


def check_unit_interval(name: str, t: torch.Tensor) -> None:
    """Values in [0, 1] (EM routing's activations), without a host synchronisation: a CPU tensor
    raises ValueError at once; on a GPU a failed check is a device-side assertion (as PyTorch's
    own range checks, e.g. binary_cross_entropy's), raised at the next synchronisation.  Skipped
    while torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    values = t.detach()
    if values.device.type == "cpu":
        lo, hi = torch.aminmax(values)
        if not (lo >= 0 and hi <= 1):
            raise ValueError(f"{name} must lie in [0, 1], got values in [{float(lo):.4g}, {float(hi):.4g}]")
        return
    inside = ((values >= 0) & (values <= 1)).all()
    torch._assert_async(inside, f"{name} must lie in [0, 1]")


def check_pose(name: str, pose, ndim: int, hint: str) -> None:
    """A floating tensor of ``ndim`` dimensions ending in 4x4 matrices (matrix capsules' poses)."""
    check_tensor(name, pose, ndim, hint)
    if tuple(pose.shape[-2:]) != (4, 4):
        raise ValueError(f"{name} must hold 4x4 matrices, the 4x4 pose of each capsule{hint}, got shape "
                         f"{tuple(pose.shape)} (last two dimensions {tuple(pose.shape[-2:])}, expected (4, 4))")


def check_matrix_transform(pose, W) -> None:
    """pose (B, I, 4, 4) and W (I, J, 4, 4) on one device, in one dtype."""
    check_pose("pose", pose, 4, " (B, I, 4, 4)")
    check_pose("W", W, 4, " (I, J, 4, 4)")
    check_same_device_dtype(pose=pose, W=W)
    if pose.shape[1] != W.shape[0]:
        raise ValueError(f"pose (B, I, 4, 4) and W (I, J, 4, 4) disagree on I: got pose {tuple(pose.shape)} "
                         f"and W {tuple(W.shape)}")


def check_class_caps(pose, W) -> None:
    """pose (B, H, W, A, 4, 4) and W (A, J, 4, 4) on one device, in one dtype."""
    check_pose("pose", pose, 6, " (B, H, W, A, 4, 4)")
    check_pose("W", W, 4, " (A, J, 4, 4)")
    check_same_device_dtype(pose=pose, W=W)
    if pose.shape[3] != W.shape[0]:
        raise ValueError(f"pose (B, H, W, A, 4, 4) and W (A, J, 4, 4) disagree on A, the child types A: got pose "
                         f"{tuple(pose.shape)} (A={pose.shape[3]}) and W {tuple(W.shape)} (A={W.shape[0]})")
