"""Mixed precision through the training step, and steps replayed from one CUDA graph."""
import pytest
import torch

from capstriton.training import make_optimizer, make_train_step, set_lr


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter meets the overflow's infs
def test_amp_fp16_step_feeds_the_capsule_kernels_half_precision():
    """--amp fp16 on the CPU (the kernels under the interpreter): the capsule layers receive fp16
    inputs, the loss is scaled, and the gradients are finite and close to the fp32 ones."""
    import capstriton as ct
    from capstriton import training

    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 1, 28, 28, generator=g), torch.tensor([1, 7, 3])
    grads, seen = {}, []
    for amp, backend in (("fp16", "triton"), ("off", "torch")):
        torch.manual_seed(0)
        model = ct.CapsNet(conv_channels=8, primary_caps=2, backend=backend)
        model.digit.register_forward_pre_hook(lambda m, args: seen.append((amp, args[0].dtype)))
        scaler = training.grad_scaler(device, amp)
        captured = {}
        model.digit.weight.register_hook(lambda gr: captured.update(raw=gr.detach().clone()))
        step = make_train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), scaler, 0.0005, amp)
        for _ in range(4):  # lr 0: the same step again while the scaler backs off from an overflow
            scale = scaler.get_scale() if amp == "fp16" else 1.0
            loss, correct = step(x, y, 1.0)
            if amp == "off" or scaler.get_scale() == scale:
                break
        assert torch.isfinite(loss) and 0 <= int(correct) <= 3
        grads[amp] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        if amp == "fp16":
            assert scaler.get_scale() == scale < 65536.0, "no finite step, or no back-off from an overflow"
            raw = captured["raw"].float()  # the scaled gradient that reached W
            torch.testing.assert_close(raw / scale, model.digit.weight.grad.float())
    assert set(seen) == {("fp16", torch.float16), ("off", torch.float32)}
    for name, ref in grads["off"].items():
        got = grads["fp16"][name]
        assert torch.isfinite(got).all(), name
        err = float((got.float() - ref).abs().max() / ref.abs().max())
        assert err < 0.05, f"{name}: fp16 gradient differs from fp32 by {err:.3f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (CAPSTRITON_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cuda_graph_step_matches_the_eager_step(amp):
    """Steps replayed from one CUDA graph (forward, losses, backward, fused Adam) follow the
    same trajectory as the same steps run eagerly."""
    import capstriton as ct
    from capstriton import training

    device = torch.device("cuda")
    cfg = {"cuda_graphs": True, "lr": 1e-3}
    g = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.rand(16, 1, 28, 28, device=device, generator=g),
                torch.randint(0, 10, (16,), device=device, generator=g)) for _ in range(6)]
    batches.append((batches[0][0][:5], batches[0][1][:5]))  # another shape: runs eagerly
    results = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = ct.CapsNet(conv_channels=32, primary_caps=4).to(device)
        optimizer = make_optimizer(model, cfg, device)
        step = make_train_step(model, optimizer, training.grad_scaler(device, amp), 0.0005, amp,
                                     graphs=graphs)
        runner = training.CudaGraphStep(lambda a, b: step(a, b, 1.0), warmup=2) if graphs else \
            (lambda a, b: step(a, b, 1.0))
        losses = []
        for i, (x, y) in enumerate(batches):
            set_lr(optimizer, 1e-3 * 0.9 ** i)
            loss, _ = runner(x, y)
            losses.append(loss.clone())
        if graphs:
            assert runner.graph is not None
        results.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (graph_losses, graph_params) = results
    tol = {"off": 1e-4, "bf16": 2e-2}[amp]
    torch.testing.assert_close(graph_losses, eager_losses, rtol=tol, atol=tol)
    for a, b in zip(graph_params, eager_params):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)

