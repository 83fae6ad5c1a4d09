"""Fully connected EM routing (capstriton.routing.em, kernels/routing/em.py): the fused triton kernels
against the float64 reference (capstriton.routing.em_reference), forward and every gradient (pose / u
/ votes, activations, W, beta_u, beta_a), for matrix votes M @ W, vector votes W u, votes read from
memory and class capsules (W shared by positions, coordinate addition).  Kernel outputs start as
NaN in the test suite (tests/conftest.py), so an unwritten element fails.  Tiny shapes: the
kernels run in Triton's interpreter."""
import math

import pytest
import torch
import torch.nn.functional as F
import triton.runtime.autotuner
import triton.runtime.interpreter
import triton.runtime.jit

import capstriton as ct
from capstriton.reference import caps_transform_ref
from capstriton.routing import em as em_module
from capstriton.routing.em_reference import (
    class_caps_votes_ref,
    em_routing_ref,
    lambda_schedule,
    matrix_transform_ref,
)
from tests.helpers.tolerances import FORWARD, GRADIENT, assert_close


def _upstream(poses, acts, seed=1):
    g = torch.Generator().manual_seed(seed)
    gp = torch.randn(poses.shape, generator=g, dtype=torch.float64)
    ga = torch.randn(acts.shape, generator=g, dtype=torch.float64)
    return gp.to(poses.device), ga.to(acts.device)


def _loss(poses, acts, gp, ga):
    return (poses.double() * gp).sum() + (acts.double() * ga).sum()


def _compare(fused, reference, inputs, dtype, what):
    """fused(*inputs in dtype) against reference(*inputs in float64): outputs and every input gradient."""
    low = [x.detach().to(dtype).requires_grad_() for x in inputs]
    high = [x.detach().to(dtype).double().requires_grad_() for x in inputs]  # the same rounded values
    out, ref = fused(*low), reference(*high)
    for k, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == dtype, f"{what}: output {k} dtype {o.dtype}"
        assert_close(o, r, FORWARD[dtype], f"{what} output {k}")
    gp, ga = _upstream(*ref[:2])
    grads = torch.autograd.grad(_loss(*out[:2], gp, ga), low)
    refs = torch.autograd.grad(_loss(*ref[:2], gp, ga), high)
    for k, (g, r) in enumerate(zip(grads, refs)):
        assert g.dtype == dtype
        assert_close(g, r, GRADIENT[dtype], f"{what} gradient {k}")


def _matrix_inputs(B, I, J, seed=0):
    g = torch.Generator().manual_seed(seed)
    pose = torch.randn(B, I, 4, 4, generator=g, dtype=torch.float64)
    W = torch.randn(I, J, 4, 4, generator=g, dtype=torch.float64) * 0.25
    a = torch.rand(B, I, generator=g, dtype=torch.float64)
    beta_u = torch.randn(J, generator=g, dtype=torch.float64)
    beta_a = torch.randn(J, generator=g, dtype=torch.float64)
    return pose, W, a, beta_u, beta_a


def _fc_route(backend, **options):
    def call(pose, W, a, bu, ba):
        return ct.transform_route(pose, W, routing="em", activations=a, beta_u=bu, beta_a=ba, backend=backend,
                                  **options)
    return call


def _fc_ref(**options):
    def call(pose, W, a, bu, ba):
        return em_routing_ref(matrix_transform_ref(pose, W), a, bu, ba, **options)
    return call


# ---------------------------------------------------------------------------------------------- matrix FC
@pytest.mark.parametrize("B,I,J,iterations,min_var", [(1, 1, 1, 3, 5e-4), (3, 5, 5, 3, 0.01), (1, 5, 10, 2, 5e-4),
                                                      (3, 33, 10, 1, 5e-4), (1, 5, 33, 3, 0.05)])
def test_matrix_fc_matches_the_reference(B, I, J, iterations, min_var):
    """(With about one child per parent every variance sits at the floor v_min, and with v_min = 5e-4
    the E-step's (V - mu)^2 / (2 var) amplifies fp32 rounding (of the one-pass shifted sums, and of
    the float32 reference alike) to about 1e-5; a larger floor keeps those cases well conditioned.)"""
    options = dict(iterations=iterations, min_var=min_var)
    _compare(_fc_route("triton", **options), _fc_ref(**options), _matrix_inputs(B, I, J), torch.float32,
             f"B={B} I={I} J={J} T={iterations}")


def test_matrix_fc_fp16():
    _compare(_fc_route("triton"), _fc_ref(), _matrix_inputs(3, 5, 5), torch.float16, "fp16")


def test_ibm_normalisation_and_sequence_temperature():
    options = dict(iterations=3, inverse_temperature=[0.0005, 0.002, 0.001], cost_normalization="ibm")
    _compare(_fc_route("triton", **options), _fc_ref(**options), _matrix_inputs(2, 5, 5, seed=3), torch.float32,
             "ibm")
    # "ibm" is the "none" routing with lambda -> s lambda and beta_a -> beta_a / s (spec section 3)
    pose, W, a, bu, ba = _matrix_inputs(2, 5, 3)
    s = 100 * 3 / 5
    votes = matrix_transform_ref(pose, W)
    ibm = em_routing_ref(votes, a, bu, ba, 2, [0.01, 0.02], cost_normalization="ibm")
    none = em_routing_ref(votes, a, bu, ba / s, 2, [0.01 * s, 0.02 * s])
    for x, y in zip(ibm, none):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------------------------------------- vector / votes
def test_vector_votes_through_transform_route():
    g = torch.Generator().manual_seed(5)
    B, I, J, D, Din = 3, 5, 10, 6, 3
    u = torch.randn(B, I, Din, generator=g, dtype=torch.float64)
    W = torch.randn(I, J, D, Din, generator=g, dtype=torch.float64)
    a = torch.rand(B, I, generator=g, dtype=torch.float64)
    bu, ba = torch.randn(J, generator=g, dtype=torch.float64), torch.randn(J, generator=g, dtype=torch.float64)

    def ref(u, W, a, bu, ba):
        return em_routing_ref(caps_transform_ref(u, W), a, bu, ba)
    _compare(_fc_route("triton"), ref, (u, W, a, bu, ba), torch.float32, "vector")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_em_routing_on_votes(dtype):
    g = torch.Generator().manual_seed(7)
    B, I, J = 3, 5, 5
    votes = torch.randn(B, I, J, 16, generator=g, dtype=torch.float64)
    a = torch.rand(B, I, generator=g, dtype=torch.float64)
    bu, ba = torch.randn(J, generator=g, dtype=torch.float64), torch.randn(J, generator=g, dtype=torch.float64)
    _compare(lambda *x: ct.em_routing(*x, iterations=2, backend="triton"),
             lambda *x: em_routing_ref(*x, iterations=2), (votes, a, bu, ba), dtype, f"votes {dtype}")


# ---------------------------------------------------------------------------------------------- class capsules
@pytest.mark.parametrize("coordinate_addition", [True, False])
def test_class_caps_route_equals_the_unfused_composition(coordinate_addition):
    g = torch.Generator().manual_seed(11)
    B, GH, GW, A, J = 2, 3, 2, 3, 5
    pose = torch.randn(B, GH, GW, A, 4, 4, generator=g, dtype=torch.float64)
    a = torch.rand(B, GH, GW, A, generator=g, dtype=torch.float64)
    W = torch.randn(A, J, 4, 4, generator=g, dtype=torch.float64) * 0.5
    bu, ba = torch.randn(J, generator=g, dtype=torch.float64), torch.randn(J, generator=g, dtype=torch.float64)

    def fused(pose, a, W, bu, ba):
        return ct.class_caps_route(pose, a, W, bu, ba, coordinate_addition, backend="triton")

    def unfused(pose, a, W, bu, ba):
        return ct.em_routing(class_caps_votes_ref(pose, W, coordinate_addition), a.reshape(B, -1), bu, ba,
                             backend="torch")
    _compare(fused, unfused, (pose, a, W, bu, ba), torch.float32, f"class coord={coordinate_addition}")
    torch_path = ct.class_caps_route(pose, a, W, bu, ba, coordinate_addition, backend="torch")
    for x, y in zip(torch_path, unfused(pose, a, W, bu, ba)):
        torch.testing.assert_close(x, y)


def test_grids_of_a_larger_gpu(monkeypatch):
    """Several child chunks per pass, several batch groups and position chunks in the gradient pass
    (a simulated 8-SM grid): partials summed in order, every output written."""
    monkeypatch.setenv("CAPSTRITON_SM_COUNT", "8")
    plan = em_module.K.plan(9, 12, 5, 16, 12, 32)
    assert plan.n_chunks > 1 and plan.n_groups > 1
    _compare(_fc_route("triton", iterations=2, min_var=0.01), _fc_ref(iterations=2, min_var=0.01),
             _matrix_inputs(9, 12, 5), torch.float32, "8 SMs")
    g = torch.Generator().manual_seed(4)
    B, GH, GW, A, J = 5, 2, 3, 2, 3
    assert em_module.K.plan(B, GH * GW * A, J, 16, A, 32).pos_chunks > 1
    pose = torch.randn(B, GH, GW, A, 4, 4, generator=g, dtype=torch.float64)
    a = torch.rand(B, GH, GW, A, generator=g, dtype=torch.float64)
    W = torch.randn(A, J, 4, 4, generator=g, dtype=torch.float64) * 0.25
    bu, ba = torch.randn(J, generator=g, dtype=torch.float64), torch.randn(J, generator=g, dtype=torch.float64)
    _compare(lambda *x: ct.class_caps_route(*x, iterations=2, min_var=0.01, backend="triton"),
             lambda p, a, W, bu, ba: em_routing_ref(class_caps_votes_ref(p, W), a.reshape(B, -1), bu, ba, 2,
                                                    min_var=0.01),
             (pose, a, W, bu, ba), torch.float32, "class 8 SMs")


# ---------------------------------------------------------------------------------------------- assignments
@pytest.mark.parametrize("iterations", [1, 3])
def test_return_assignments(iterations):
    pose, W, a, bu, ba = _matrix_inputs(2, 5, 5)
    votes = matrix_transform_ref(pose, W)
    ref = em_routing_ref(votes, a, bu, ba, iterations, return_assignments=True)
    out = ct.em_routing(votes.float(), a.float(), bu.float(), ba.float(), iterations, backend="triton",
                        return_assignments=True)
    assert len(out) == 3 and out[2].shape == (2, 5, 5) and not out[2].requires_grad
    assert_close(out[2], ref[2], FORWARD[torch.float32], "R")
    B, A, J = 2, 2, 3
    cpose = torch.randn(B, 2, 2, A, 4, 4)
    ca, cW, cb = torch.rand(B, 2, 2, A), torch.randn(A, J, 4, 4), torch.randn(J)
    fused = ct.class_caps_route(cpose, ca, cW, cb, cb, iterations=iterations, backend="triton", return_assignments=True)
    unfused = em_routing_ref(class_caps_votes_ref(cpose.double(), cW.double()), ca.double().reshape(B, -1),
                             cb.double(), cb.double(), iterations, return_assignments=True)
    assert_close(fused[2], unfused[2], FORWARD[torch.float32], "class R")
    torch_R = ct.em_routing(votes, a, bu, ba, iterations, backend="torch", return_assignments=True)[2]
    torch.testing.assert_close(torch_R, ref[2])


def test_reference_assignments_are_a_p_over_sum_a_p():
    """(E11): softmax of logsigmoid(logit) + ln p equals a_j p_j / sum_k a_k p_k."""
    pose, W, a, bu, ba = _matrix_inputs(2, 6, 4)
    votes = matrix_transform_ref(pose, W)
    R = em_routing_ref(votes, a, bu, ba, 2, 0.3, return_assignments=True)[2]
    lam = lambda_schedule(2, 0.3)[0]
    r = a[:, :, None] / 4
    m = r.sum(1)
    mu = (r[..., None] * votes).sum(1) / (m + 1e-8)[..., None]
    var = (r[..., None] * (votes - mu[:, None]).square()).sum(1) / (m + 1e-8)[..., None] + 5e-4
    act = torch.sigmoid(lam * (ba - (bu[:, None] + 0.5 * torch.log(var)).sum(-1) * m))
    p = torch.exp(-((votes - mu[:, None]).square() / (2 * var[:, None])).sum(-1)) / torch.sqrt(
        (2 * math.pi * var[:, None]).prod(-1))
    expected = act[:, None] * p / (act[:, None] * p).sum(-1, keepdim=True)
    torch.testing.assert_close(R, expected)
    assert torch.allclose(em_routing_ref(votes, a, bu, ba, 1, 0.3)[1], act)


# ---------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("zero_activations", [False, True])
def test_single_child_and_zero_activations_stay_finite(zero_activations):
    pose, W, a, bu, ba = _matrix_inputs(2, 1 if not zero_activations else 4, 3)
    if zero_activations:
        a = torch.zeros_like(a)
    inputs = [x.float().requires_grad_() for x in (pose, W, a, bu, ba)]
    poses, acts = _fc_route("triton")(*inputs)
    assert torch.isfinite(poses).all() and torch.isfinite(acts).all()
    (poses.sum() + acts.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)
    ref = _fc_ref()(*[x.double() for x in (pose, W, a, bu, ba)])
    assert_close(poses, ref[0], FORWARD[torch.float32], "poses")
    assert_close(acts, ref[1], FORWARD[torch.float32], "acts")


def test_reference_gradcheck_float64():
    pose, W, a, bu, ba = (x.requires_grad_() for x in _matrix_inputs(1, 3, 2))
    a = (a * 0.8 + 0.1).detach().requires_grad_()

    def f(pose, W, a, bu, ba):
        return em_routing_ref(matrix_transform_ref(pose, W), a, bu, ba, 2, 0.5)
    assert torch.autograd.gradcheck(f, (pose, W, a, bu, ba), fast_mode=True)


# ---------------------------------------------------------------------------------------------- torch.library
def test_opcheck():
    pose, W, a, bu, ba = (x.float() for x in _matrix_inputs(2, 3, 2))
    args = (pose.reshape(2, 3, 16).requires_grad_(), W.reshape(3, 2, 16).requires_grad_(), a.requires_grad_(),
            bu.requires_grad_(), ba.requires_grad_(), [0.01, 0.02], 1.0, 1e-8, 5e-4, True, False, 1, 1)
    torch.library.opcheck(em_module._op, args, test_utils=("test_schema", "test_autograd_registration",
                                                           "test_faketensor"))
    outs = em_module._op(*[x.detach() if isinstance(x, torch.Tensor) else x for x in args])
    bwd = (*[x.detach() for x in args[:4]], *args[5:], *outs[2:], torch.randn(2, 2, 16), torch.randn(2, 2), True, True,
           True)
    torch.library.opcheck(em_module._backward_op, bwd, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(em_module._assignments_op, (args[0].detach(), args[1].detach(), outs[2][0], outs[3][0],
                                                      outs[4][0], True, False, 1, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    pose, W, a, bu, ba = (x.float() for x in _matrix_inputs(2, 3, 2))
    votes = matrix_transform_ref(pose, W)

    def f(votes, a, bu, ba):
        return ct.em_routing(votes, a, bu, ba, iterations=2, backend="triton")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for x, y in zip(compiled(votes, a, bu, ba), f(votes, a, bu, ba)):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------------------------------------- backends
@pytest.fixture
def forbid_launches(monkeypatch):
    def forbid(cls):
        def run(self, *args, **kwargs):
            raise AssertionError("a triton kernel was launched on the torch backend")
        monkeypatch.setattr(cls, "run", run)
    for cls in (triton.runtime.interpreter.InterpretedFunction, triton.runtime.jit.JITFunction,
                triton.runtime.autotuner.Autotuner):
        forbid(cls)


def test_the_torch_backend_launches_no_kernel(forbid_launches):
    pose, W, a, bu, ba = (x.float().requires_grad_() for x in _matrix_inputs(2, 3, 2))
    poses, acts = _fc_route("torch")(pose, W, a, bu, ba)
    (poses.sum() + acts.sum()).backward()
    votes = matrix_transform_ref(pose, W).detach().requires_grad_()
    out = ct.em_routing(votes, a, bu, ba, backend="torch", return_assignments=True)
    out[0].sum().backward()
    cpose = torch.randn(1, 2, 1, 2, 4, 4, requires_grad=True)
    out = ct.class_caps_route(cpose, torch.rand(1, 2, 1, 2), torch.randn(2, 2, 4, 4), bu, ba, backend="torch")
    out[1].sum().backward()


def test_registry_entry_and_layer():
    routing = ct.get_routing("em")
    assert routing.outputs == ("activations",) and set(routing.inputs) == {"activations"}
    assert routing.options["iterations"] == 3 and routing.options["cost_normalization"] == "none"
    layer = ct.DigitCaps(4, 3, 2, 5, routing="em", backend="triton")
    assert layer.beta_u.shape == (2,) and layer.beta_a.shape == (2,)
    u = torch.randn(2, 4, 3)
    a = torch.rand(2, 4)
    v, acts = layer(u, activations=a)
    assert v.shape == (2, 2, 5) and acts.shape == (2, 2)
    (v.sum() + acts.sum()).backward()
    assert layer.beta_u.grad is not None and layer.beta_a.grad is not None and layer.weight.grad is not None
    ref = ct.transform_route(u, layer.weight.detach(), routing="em", activations=a, backend="torch")
    assert_close(v, ref[0], FORWARD[torch.float32], "layer v")
    c = ct.transform_route(u, layer.weight.detach(), routing="em", activations=a, backend="triton",
                           return_coupling=True)[-1]
    assert c.shape == (2, 4, 2)
    torch.testing.assert_close(c.sum(-1), torch.ones(2, 4, dtype=c.dtype))


# ---------------------------------------------------------------------------------------------- validation
def test_bad_input_is_named():
    pose, W, a, bu, ba = (x.float() for x in _matrix_inputs(2, 3, 2))
    votes = matrix_transform_ref(pose, W)
    with pytest.raises(ValueError, match=r"activations must lie in \[0, 1\]"):
        ct.em_routing(votes, a + 1.5, bu, ba)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        ct.em_routing(votes, a, bu, ba, iterations=0)
    with pytest.raises(ValueError, match="cost_normalization must be one of"):
        ct.em_routing(votes, a, bu, ba, cost_normalization="paper")
    with pytest.raises(ValueError, match="one value per iteration"):
        ct.em_routing(votes, a, bu, ba, iterations=3, inverse_temperature=[0.1, 0.2])
    with pytest.raises(ValueError, match="backend must be one of"):
        ct.em_routing(votes, a, bu, ba, backend="cuda")
    with pytest.raises(ValueError, match=r"beta_u must have shape \(J,\) = \(2,\)"):
        ct.em_routing(votes, a, torch.zeros(3), ba)
    with pytest.raises(ValueError, match=r"activations must have shape \(B, I\) = \(2, 3\)"):
        ct.em_routing(votes, a[:, :2], bu, ba)
    with pytest.raises(TypeError, match="same dtype"):
        ct.em_routing(votes, a.double(), bu, ba)
    with pytest.raises(ValueError, match=r"4x4 matrices.*expected \(4, 4\)"):
        ct.class_caps_route(torch.randn(1, 2, 2, 3, 3, 3), torch.rand(1, 2, 2, 3), torch.randn(3, 2, 4, 4), bu, ba)
    with pytest.raises(ValueError, match="disagree on A"):
        ct.class_caps_route(torch.randn(1, 2, 2, 3, 4, 4), torch.rand(1, 2, 2, 3), torch.randn(2, 2, 4, 4), bu, ba)
    with pytest.raises(ValueError, match="disagree on I"):
        ct.transform_route(pose, W[:2], routing="em", activations=a, beta_u=bu, beta_a=ba)
    with pytest.raises(ValueError, match=r"4x4 matrices"):
        ct.transform_route(pose, torch.randn(3, 2, 4, 3), routing="em", activations=a)


def test_interpreter_fp16_e_step_state_is_fp32():
    """The E-step state is formed in fp32 whatever the input dtype (logsigmoid of an fp32 logit)."""
    var = torch.rand(2, 3, 16) + 0.1
    logit = torch.randn(2, 3)
    hiv, cq = em_module.K._e_state(var, logit)
    torch.testing.assert_close(cq, F.logsigmoid(logit) - 0.5 * torch.log(var).sum(-1))
    assert hiv.dtype == torch.float32
