"""No host synchronisation in a CapsNet training step (forward, margin + reconstruction loss,
backward) on either backend.

Syncs are counted two ways:
* a TorchDispatchMode sees every aten op the Python code calls (and device-to-host copies),
  but a torch.library custom op is one opaque call to it: what the op's launcher does inside is
  invisible;
* the profiler's CPU events see every aten op, also those called inside the custom ops'
  implementations (the Triton launchers), and on CUDA the runtime's synchronize calls.
Both must count zero.  The CPU implementation of ``aten::_assert_async`` reads its flag with
an internal ``item`` (on CUDA it is a kernel and never syncs), so events below it are not
counted.  Negative controls show that both counters catch an ``int(tensor)`` in the step and
that only the profiler catches one inside a custom op.
"""
from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import capstriton as ct

# aten ops that wait for the device (read a value on the host or size an output by data)
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select",
                      "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount",
                      "allclose"})
CUDA_SYNC_CALLS = frozenset({"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize",
                             "cudaMemcpy"})
EXEMPT_PARENT = "aten::_assert_async"
TINY = dict(image_size=20, conv_channels=8, primary_caps=2, num_classes=3, digit_dim=4)  # 8 primary capsules


class _DispatchSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        if name in SYNC_OPS:
            self.found[name] += 1
        elif name in ("_to_copy", "copy_") and _device_to_host(args, out):
            self.found[f"{name} device->host"] += 1
        return out


def _device_to_host(args, out) -> bool:
    src = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else args[0]
    return (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.device.type != "cpu"
            and out.device.type == "cpu")


def _is_sync_event(name: str) -> bool:
    return name in CUDA_SYNC_CALLS or (name.startswith("aten::") and name[len("aten::"):] in SYNC_OPS)


def _profiler_syncs(prof) -> Counter:
    """Outermost sync events (``item`` calls ``_local_scalar_dense``: one sync, counted once),
    except those below ``aten::_assert_async``."""
    found = Counter()
    for event in prof.events():
        if not _is_sync_event(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name != EXEMPT_PARENT and not _is_sync_event(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            found[event.name] += 1
    return found


def count_syncs(fn) -> tuple[Counter, Counter]:
    """(syncs seen by the dispatch mode, syncs seen by the profiler) during fn()."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    mode = _DispatchSyncs()
    with profile(activities=activities) as prof, mode:
        fn()
    return mode.found, _profiler_syncs(prof)


def _training_step(backend: str, extra=None):
    torch.manual_seed(0)
    model = ct.CapsNet(backend=backend, **TINY)
    x = torch.rand(3, 1, TINY["image_size"], TINY["image_size"])
    y = torch.tensor([2, 0, 1])

    def step():
        lengths, recon, _ = model(x, y)
        loss = ct.margin_loss(lengths, y) + 0.0005 * ct.reconstruction_loss(recon, x)
        loss.backward()
        if extra is not None:
            extra(lengths)

    step()  # warm-up: compilation, autotuning, allocator growth stay out of the count
    return step


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_step_has_no_host_syncs(backend):
    dispatch, profiled = count_syncs(_training_step(backend))
    assert not dispatch, f"host syncs in a {backend} training step (dispatch): {dict(dispatch)}"
    assert not profiled, f"host syncs in a {backend} training step (profiler): {dict(profiled)}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_efficient_capsnet_training_step_has_no_host_syncs(backend):
    torch.manual_seed(0)
    model = ct.EfficientCapsNet(backend=backend)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([2, 7])

    def step():
        lengths, recon, _ = model(x, y)
        (ct.margin_loss(lengths, y) + 0.0005 * ct.reconstruction_loss(recon, x)).backward()

    step()  # warm-up
    dispatch, profiled = count_syncs(step)
    assert not dispatch and not profiled, (dict(dispatch), dict(profiled))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inference_forward_has_no_host_syncs(backend):
    model = ct.CapsNet(backend=backend, **TINY)
    x = torch.rand(2, 1, TINY["image_size"], TINY["image_size"])
    with torch.no_grad():
        model(x)
        dispatch, profiled = count_syncs(lambda: model(x))  # the decoder picks the longest capsule
    assert not dispatch and not profiled, (dict(dispatch), dict(profiled))


def test_counter_catches_int_of_a_tensor():
    dispatch, profiled = count_syncs(_training_step("torch", extra=lambda lengths: int(lengths.argmax())))
    assert dispatch["_local_scalar_dense"] == 1, dict(dispatch)
    assert profiled["aten::item"] == 1, dict(profiled)


@torch.library.custom_op("capstriton_test::leaky_sum", mutates_args=())
def _leaky_sum(x: torch.Tensor) -> torch.Tensor:
    return x * float(x.sum())  # a launcher that reads a value on the host


@_leaky_sum.register_fake
def _(x):
    return torch.empty_like(x)


def test_profiler_sees_a_sync_inside_a_custom_op():
    x = torch.randn(4)
    dispatch, profiled = count_syncs(lambda: _leaky_sum(x))
    assert not dispatch, "the dispatch mode is not expected to see inside a custom op"
    assert profiled["aten::item"] == 1, dict(profiled)


def test_bad_label_still_raises_without_a_sync():
    # CPU tensors: there the device-side assert fires at once (on CUDA it would poison the context)
    lengths = torch.rand(2, 3, device="cpu")
    with pytest.raises(RuntimeError, match=r"class labels must lie in \[0, 3\)"):
        ct.margin_loss(lengths, torch.tensor([0, 3], device="cpu"))
    labels = torch.tensor([0, 2], device="cpu")
    dispatch, profiled = count_syncs(lambda: ct.margin_loss(lengths, labels))
    assert not dispatch and not profiled, (dict(dispatch), dict(profiled))
