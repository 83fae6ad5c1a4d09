"""Matrix capsules: the votes functions (capstriton.matrix_caps), the layers' plain-PyTorch EM
routes against the float64 reference, and the layers (capstriton.matrix_layers).  Tiny shapes."""
import pytest
import torch

import capstriton as ct
from capstriton.routing import em_reference as ref
from capstriton.routing.em_torch import class_caps_route_torch as _class_em_torch
from capstriton.routing.em_torch import conv_caps_route_torch as _conv_em_torch

F64 = torch.float64


def _close(a, b, tol=1e-12):
    err = float((a.detach() - b.detach()).abs().max())
    assert a.shape == b.shape and err <= tol, err


# ---------------------------------------------------------------------------------- votes


def test_matrix_transform_is_pose_times_w_row_major():
    pose = torch.randn(2, 3, 4, 4, dtype=F64)
    W = torch.randn(3, 5, 4, 4, dtype=F64)
    votes = ct.matrix_transform(pose, W)
    assert votes.shape == (2, 3, 5, 16)
    for b, i, j in ((0, 0, 0), (1, 2, 4), (0, 1, 3)):
        _close(votes[b, i, j], (pose[b, i] @ W[i, j]).reshape(16))
    # element h = 4 r + c holds V[r, c]: a hand-made case
    M = torch.eye(4, dtype=F64).unsqueeze(0).unsqueeze(0)
    Wm = torch.arange(16, dtype=F64).view(1, 1, 4, 4)
    assert ct.matrix_transform(M, Wm).flatten().tolist() == list(range(16))


@pytest.mark.parametrize("H, K, stride", [(5, 3, 2), (4, 3, 1), (6, 2, 3), (3, 1, 1), (3, 3, 1)])
def test_conv_caps_votes_follow_the_windows(H, K, stride):
    A, C = 2, 3
    pose = torch.randn(2, H, H + 1, A, 4, 4, dtype=F64)
    W = torch.randn(K, K, A, C, 4, 4, dtype=F64)
    votes = ct.conv_caps_votes(pose, W, stride)
    OH, OW = (H - K) // stride + 1, (H + 1 - K) // stride + 1
    assert votes.shape == (2, OH, OW, K, K, A, C, 16)
    for b, oh, ow, kh, kw, a, c in ((0, 0, 0, 0, 0, 0, 0), (1, OH - 1, OW - 1, K - 1, K - 1, A - 1, C - 1),
                                    (1, 0, OW - 1, K // 2, 0, 1, 2)):
        expect = pose[b, oh * stride + kh, ow * stride + kw, a] @ W[kh, kw, a, c]
        _close(votes[b, oh, ow, kh, kw, a, c], expect.reshape(16))


def test_class_caps_votes_share_w_over_positions_and_add_coordinates():
    B, H, Wd, A, J = 2, 3, 2, 2, 4
    pose = torch.randn(B, H, Wd, A, 4, 4, dtype=F64)
    W = torch.randn(A, J, 4, 4, dtype=F64)
    plain = ct.class_caps_votes(pose, W, coordinate_addition=False)
    assert plain.shape == (B, H * Wd * A, J, 16)
    expect = torch.einsum("bhwark,ajkc->bhwajrc", pose, W).reshape(B, H * Wd * A, J, 16)
    _close(plain, expect)
    added = ct.class_caps_votes(pose, W)
    diff = (added - plain).view(B, H, Wd, A, J, 16)
    for h in range(H):
        for w in range(Wd):
            _close(diff[:, h, w, :, :, 3], torch.full((B, A, J), (h + 0.5) / H, dtype=F64))
            _close(diff[:, h, w, :, :, 7], torch.full((B, A, J), (w + 0.5) / Wd, dtype=F64))
    others = [k for k in range(16) if k not in (3, 7)]
    assert float(diff[..., others].abs().max()) == 0.0


def test_votes_refuse_bad_input_naming_expected_and_given():
    pose, W = torch.randn(2, 3, 4, 4), torch.randn(3, 5, 4, 4)
    with pytest.raises(ValueError, match=r"4x4 pose.*\(4, 4\)"):
        ct.matrix_transform(torch.randn(2, 3, 4, 3), W)
    with pytest.raises(ValueError, match="disagree on I"):
        ct.matrix_transform(pose, torch.randn(4, 5, 4, 4))
    with pytest.raises(TypeError, match="same dtype"):
        ct.matrix_transform(pose, W.double())
    with pytest.raises(TypeError, match="torch.Tensor"):
        ct.matrix_transform(pose.tolist(), W)
    grid, Wc = torch.randn(1, 5, 5, 2, 4, 4), torch.randn(3, 3, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        ct.conv_caps_votes(grid, Wc, 0)
    with pytest.raises(TypeError, match="stride must be an int"):
        ct.conv_caps_votes(grid, Wc, 1.5)
    with pytest.raises(ValueError, match="larger than the capsule grid"):
        ct.conv_caps_votes(grid[:, :2], Wc, 1)
    with pytest.raises(ValueError, match="child types A"):
        ct.conv_caps_votes(grid, torch.randn(3, 3, 3, 4, 4, 4), 1)
    with pytest.raises(ValueError, match="square kernel"):
        ct.conv_caps_votes(grid, torch.randn(3, 2, 2, 4, 4, 4), 1)
    with pytest.raises(ValueError, match="child types A"):
        ct.class_caps_votes(grid, torch.randn(3, 5, 4, 4))
    with pytest.raises(TypeError, match="coordinate_addition must be a bool"):
        ct.class_caps_votes(grid, torch.randn(2, 5, 4, 4), coordinate_addition=1)
    with pytest.raises(ValueError, match="6 dimensions"):
        ct.class_caps_votes(grid[0], torch.randn(2, 5, 4, 4))


# ---------------------------------------------------------------------------------- the layers' torch routes


@pytest.mark.parametrize("H, K, stride, options", [
    (7, 3, 2, {"inverse_temperature": 0.02}),
    (6, 3, 1, {"cost_normalization": "ibm"}),
    (5, 2, 3, {"iterations": 2, "inverse_temperature": [1.0, 3.0]}),
    (4, 1, 1, {"iterations": 1}),
])
def test_conv_route_matches_the_reference_values_and_gradients(H, K, stride, options):
    A, C = 2, 3
    pose = torch.randn(2, H, H, A, 4, 4, dtype=F64, requires_grad=True)
    acts = torch.rand(2, H, H, A, dtype=F64, requires_grad=True)
    W = (0.5 * torch.randn(K, K, A, C, 4, 4, dtype=F64)).requires_grad_()
    beta_u = torch.randn(C, dtype=F64, requires_grad=True)
    beta_a = torch.randn(C, dtype=F64, requires_grad=True)
    inputs = (pose, acts, W, beta_u, beta_a)
    opts = {"iterations": 3, "inverse_temperature": 0.01, "eps": 1e-8, "min_var": 5e-4, "cost_normalization": "none",
            **options}
    want = ref.conv_em_routing_ref(ref.conv_caps_votes_ref(pose, W, stride), acts, beta_u, beta_a, stride, **opts)
    got = _conv_em_torch(pose, acts, W, beta_u, beta_a, stride, **opts)
    tol = 1e-9 if K == 1 else 1e-11  # (the expanded quadratic form loses a few digits to cancellation)
    for g, w in zip(got, want):
        _close(g, w, tol)
    grads_want = torch.autograd.grad(want[0].sin().sum() + want[1].cos().sum(), inputs)
    grads_got = torch.autograd.grad(got[0].sin().sum() + got[1].cos().sum(), inputs)
    for g, w in zip(grads_got, grads_want):
        _close(g, w, 1e-9)


@pytest.mark.parametrize("options", [{}, {"cost_normalization": "ibm", "inverse_temperature": 0.05},
                                     {"coordinate_addition": False, "iterations": 1}])
def test_class_route_matches_the_reference_values_and_gradients(options):
    options = dict(options)
    coords = options.pop("coordinate_addition", True)
    pose = torch.randn(2, 3, 2, 3, 4, 4, dtype=F64, requires_grad=True)
    acts = torch.rand(2, 3, 2, 3, dtype=F64, requires_grad=True)
    W = (0.5 * torch.randn(3, 5, 4, 4, dtype=F64)).requires_grad_()
    beta_u = torch.randn(5, dtype=F64, requires_grad=True)
    beta_a = torch.randn(5, dtype=F64, requires_grad=True)
    inputs = (pose, acts, W, beta_u, beta_a)
    opts = {"iterations": 3, "inverse_temperature": 0.005, "eps": 1e-8, "min_var": 5e-4, "cost_normalization": "none",
            **options}
    votes = ref.class_caps_votes_ref(pose, W, coords)
    want = ref.em_routing_ref(votes, acts.reshape(2, -1), beta_u, beta_a, **opts)
    got = _class_em_torch(pose, acts, W, beta_u, beta_a, coords, **opts)
    for g, w in zip(got, want):
        _close(g, w, 1e-11)
    grads_want = torch.autograd.grad(want[0].sin().sum() + want[1].cos().sum(), inputs)
    grads_got = torch.autograd.grad(got[0].sin().sum() + got[1].cos().sum(), inputs)
    for g, w in zip(grads_got, grads_want):
        _close(g, w, 1e-9)


def test_routes_stay_finite_with_zero_activations_and_a_single_child():
    pose = torch.randn(1, 3, 3, 1, 4, 4, dtype=F64)
    acts = torch.zeros(1, 3, 3, 1, dtype=F64)
    W = torch.randn(1, 1, 1, 2, 4, 4, dtype=F64)  # K = 1: every parent has one child
    beta = torch.zeros(2, dtype=F64)
    for a in (acts, torch.ones_like(acts)):
        poses, out = _conv_em_torch(pose, a, W, beta, beta, 1)
        assert torch.isfinite(poses).all() and torch.isfinite(out).all()
        assert ((out >= 0) & (out <= 1)).all()


# ---------------------------------------------------------------------------------- layers


def test_primary_matrix_caps_shapes_parameters_and_errors():
    layer = ct.PrimaryMatrixCaps(6, 3)
    pose, acts = layer(torch.randn(2, 6, 5, 4))
    assert pose.shape == (2, 5, 4, 3, 4, 4) and acts.shape == (2, 5, 4, 3)
    assert ((acts > 0) & (acts < 1)).all()
    assert sum(p.numel() for p in layer.parameters()) == (6 + 1) * 17 * 3
    x = torch.randn(1, 6, 2, 2)
    # pose[b, h, w, t] are the conv channels t*16 ... t*16 + 15, row-major
    _close(layer(x)[0][0, 1, 0, 2].reshape(16).double(), layer.pose(x)[0, 32:48, 1, 0].double(), 1e-6)
    with pytest.raises(ValueError, match=r"expects x \(B, 6, H, W\), got shape \(2, 5, 4, 4\)"):
        layer(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="types must be a positive int"):
        ct.PrimaryMatrixCaps(6, 0)
    assert "types=3" in repr(layer)


def test_conv_caps_layer_shapes_parameters_defaults_and_errors():
    layer = ct.ConvCaps(2, 3, kernel_size=3, stride=2, backend="torch")
    assert layer.weight.shape == (3, 3, 2, 3, 4, 4) and layer.beta_u.shape == layer.beta_a.shape == (3,)
    assert sum(p.numel() for p in layer.parameters()) == 9 * 2 * 3 * 16 + 2 * 3
    assert layer.inverse_temperature == 0.02 and ct.ConvCaps(2, 3, cost_normalization="ibm").inverse_temperature == 0.01
    pose, acts = torch.randn(2, 7, 6, 2, 4, 4), torch.rand(2, 7, 6, 2)
    out_pose, out_acts = layer(pose, acts)
    assert out_pose.shape == (2, 3, 2, 3, 4, 4) and out_acts.shape == (2, 3, 2, 3)
    assert layer.output_size(7, 6) == (3, 2)
    with torch.no_grad():  # the layer is its route
        want = _conv_em_torch(pose, acts, layer.weight, layer.beta_u, layer.beta_a, 2, 3, 0.02)
    _close(out_pose.reshape(2, 3, 2, 3, 16).detach(), want[0], 1e-6)
    with pytest.raises(ValueError, match=r"expects pose \(B, H, W, 2, 4, 4\)"):
        layer(torch.randn(2, 7, 6, 3, 4, 4), torch.rand(2, 7, 6, 3))
    with pytest.raises(ValueError, match="activations of shape"):
        layer(pose, acts[:, :6])
    with pytest.raises(ValueError, match="at least 3 x 3"):
        layer(pose[:, :2], acts[:, :2])
    with pytest.raises(ValueError, match="cost_normalization must be one of"):
        ct.ConvCaps(2, 3, cost_normalization="paper")
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        ct.ConvCaps(2, 3, iterations=0)
    with pytest.raises(ValueError, match="inverse_temperature"):
        ct.ConvCaps(2, 3, iterations=2, inverse_temperature=[0.1])
    with pytest.raises(ValueError, match="backend must be one of"):
        ct.ConvCaps(2, 3, backend="cuda")
    assert "stride=2" in repr(layer) and "inverse_temperature=0.02" in repr(layer)


def test_class_caps_layer_shapes_defaults_backend_switch_and_gradients():
    layer = ct.ClassCaps(2, 4, backend="torch")
    assert layer.weight.shape == (2, 4, 4, 4) and layer.inverse_temperature == 0.005
    assert sum(p.numel() for p in layer.parameters()) == 2 * 4 * 16 + 8
    pose = torch.randn(3, 2, 2, 2, 4, 4, requires_grad=True)
    acts = torch.rand(3, 2, 2, 2)
    out_pose, out_acts = layer(pose, acts)
    assert out_pose.shape == (3, 4, 4, 4) and out_acts.shape == (3, 4)
    (out_acts.sum() + out_pose.square().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert pose.grad is not None
    ct.set_backend(layer, "auto")
    assert layer.backend == "auto"
    layer.double().set_backend("torch")
    out64 = layer(pose.detach().double(), acts.double())[1]
    _close(out64.float(), out_acts.detach(), 1e-5)
    with pytest.raises(TypeError, match="coordinate_addition must be a bool"):
        ct.ClassCaps(2, 4, coordinate_addition="yes")


def test_layers_on_the_triton_backend_match_the_torch_backend():
    """ConvCaps -> ClassCaps through the fused routes (capstriton.conv_caps_route /
    class_caps_route; the interpreter on the CPU) against the layers' plain-PyTorch routes,
    values and gradients."""
    conv = ct.ConvCaps(1, 2, 2, stride=1, iterations=2)
    cls = ct.ClassCaps(2, 3, iterations=2)
    pose = torch.randn(1, 3, 3, 1, 4, 4, requires_grad=True)
    acts = torch.rand(1, 3, 3, 1)
    params = [pose, conv.weight, cls.weight, conv.beta_u, conv.beta_a, cls.beta_u, cls.beta_a]
    results = {}
    for backend in ("torch", "triton"):
        ct.set_backend(conv, backend)
        ct.set_backend(cls, backend)
        p, a = cls(*conv(pose, acts))
        grads = torch.autograd.grad(a.sum() + p.square().sum(), params)
        results[backend] = (p, a, *grads)
    for got, want in zip(results["triton"], results["torch"]):
        scale = float(want.detach().abs().max().clamp_min(1e-6))
        _close(got / scale, want / scale, 1e-3)
