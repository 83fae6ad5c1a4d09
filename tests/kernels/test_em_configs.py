"""Every autotune config of the EM routing kernels against the float64 reference (the suite otherwise
runs only the first config of each list), forward and every gradient, at tiny odd shapes.

Fully connected / class capsules (kernels/routing/em.py): the configs differ in num_warps, and the
batch block follows (BLOCK_B = samples per warp * num_warps, a heuristic), so in the interpreter
each config runs a different batch tiling (B = 5 against blocks of 4, 8 and 16 samples; a
simulated 8-SM grid splits the children into several chunks and the gradient's batch into
several groups).  Convolutional (kernels/routing/em_conv.py): the configs differ in num_warps
only (same tiles and grids), which the interpreter ignores; these runs check that each config
launches through the autotuner and writes every output (outputs start as NaN in the suite)."""
import pytest
import torch

import capstriton as ct
from capstriton.kernels.routing import em as em_kernels
from capstriton.kernels.routing import em_conv as em_conv_kernels
from tests.helpers.tolerances import FORWARD, GRADIENT, assert_close
from tests.routing.test_em import _compare
from tests.routing.test_em_conv import _grads_of, _inputs


def _ids(configs):
    return [f"w{c.num_warps}" for c in configs]


def _class_caps(coordinate_addition: bool):
    g = torch.Generator().manual_seed(5)
    B, GH, GW, A, J = 5, 3, 2, 3, 5
    pose = torch.randn(B, GH, GW, A, 4, 4, generator=g, dtype=torch.float64)
    a = torch.rand(B, GH, GW, A, generator=g, dtype=torch.float64)
    W = torch.randn(A, J, 4, 4, generator=g, dtype=torch.float64) * 0.5
    bu, ba = torch.randn(J, generator=g, dtype=torch.float64), torch.randn(J, generator=g, dtype=torch.float64)

    def fused(pose, a, W, bu, ba):
        return ct.class_caps_route(pose, a, W, bu, ba, coordinate_addition, backend="triton")

    def reference(pose, a, W, bu, ba):
        return ct.class_caps_route(pose, a, W, bu, ba, coordinate_addition, backend="torch")
    _compare(fused, reference, (pose, a, W, bu, ba), torch.float32, f"class coord={coordinate_addition}")


@pytest.fixture(autouse=True)
def small_gpu(monkeypatch):
    monkeypatch.setenv("CAPSTRITON_SM_COUNT", "8")


@pytest.mark.parametrize("config", em_kernels.PASS_CONFIGS, ids=_ids(em_kernels.PASS_CONFIGS))
def test_every_em_pass_config(config, monkeypatch):
    monkeypatch.setattr(em_kernels.em_pass_kernel, "configs", [config])
    _class_caps(coordinate_addition=True)


@pytest.mark.parametrize("config", em_kernels.GRAD_CONFIGS, ids=_ids(em_kernels.GRAD_CONFIGS))
def test_every_em_grad_config(config, monkeypatch):
    monkeypatch.setattr(em_kernels.em_grad_kernel, "configs", [config])
    _class_caps(coordinate_addition=False)


def _conv_case():
    """ConvCaps1-like K = 3, stride 2, with an uncovered row and column, A = 2, C = 3, B = 1, T = 2."""
    B, H, A, C, K, stride = 1, 6, 2, 3, 3, 2
    pose, act, W, bu, ba = _inputs(B, H, A, C, K, dtype=torch.float32)
    OH = (H - K) // stride + 1
    g = torch.Generator().manual_seed(3)
    grads = (torch.randn(B, OH, OH, C, 16, generator=g), torch.randn(B, OH, OH, C, generator=g))

    def run(backend):
        return lambda p, a, w, u, v: ct.conv_caps_route(p, a, w, u, v, stride, backend=backend, iterations=2)
    got = _grads_of(run("triton"), [x.clone().requires_grad_() for x in (pose, act, W, bu, ba)], grads)
    want = _grads_of(run("torch"), [x.detach().double().requires_grad_() for x in (pose, act, W, bu, ba)],
                     [x.double() for x in grads])
    names = ("poses", "activations", "grad_pose", "grad_activations", "grad_W", "grad_beta_u", "grad_beta_a")
    for name, x, y in zip(names, got, want):
        assert_close(x, y, (FORWARD if name in ("poses", "activations") else GRADIENT)[torch.float32], name)


CONV_KERNELS = [("child", em_conv_kernels.em_conv_child_kernel, em_conv_kernels.CHILD_CONFIGS),
                ("parent", em_conv_kernels.em_conv_parent_kernel, em_conv_kernels.PARENT_CONFIGS),
                ("weight_grad", em_conv_kernels.em_conv_weight_grad_kernel, em_conv_kernels.WEIGHT_GRAD_CONFIGS)]


@pytest.mark.slow  # the interpreter ignores num_warps: the conv configs differ only in it
@pytest.mark.parametrize("index", range(1, max(len(cs) for _, _, cs in CONV_KERNELS)))
def test_every_em_conv_config(index, monkeypatch):
    """The defaults (first configs) run in tests/routing/test_em_conv.py; here the others, every kernel's
    config ``index`` (its last where it has fewer) in one run: the interpreter ignores num_warps, so
    one forward + backward per index covers every kernel's config."""
    for _, kernel, configs in CONV_KERNELS:
        monkeypatch.setattr(kernel, "configs", [configs[min(index, len(configs) - 1)]])
    _conv_case()


def test_default_configs_come_first():
    """The hand-picked launch configs stay first: what runs before tuning and under
    CAPSTRITON_SINGLE_CONFIG=1."""
    assert em_kernels.PASS_CONFIGS[0].num_warps == em_kernels.PASS_WARPS
    assert em_kernels.GRAD_CONFIGS[0].num_warps == em_kernels.GRAD_WARPS
    for _, _, configs in CONV_KERNELS:
        assert configs[0].num_warps == em_conv_kernels.NUM_WARPS
    for kernel in (em_kernels.em_pass_kernel, em_kernels.em_grad_kernel, *(k for _, k, _ in CONV_KERNELS)):
        assert len(kernel.configs) == 1  # the suite (interpreter) runs the default alone


def test_pruning_keeps_the_default_first():
    dims = dict(BJ=8, BDH=2, BDL=8)
    kept = em_kernels.prune_em_pass_configs(em_kernels.PASS_CONFIGS, {}, B_BUCKET=1, **dims)
    assert kept == em_kernels.PASS_CONFIGS[:1]
    kept = em_kernels.prune_em_pass_configs(em_kernels.PASS_CONFIGS, {}, B_BUCKET=512, **dims)
    assert kept == em_kernels.PASS_CONFIGS
    assert em_conv_kernels.prune_conv_configs(em_conv_kernels.CHILD_CONFIGS, {}, BA=1, BC=1) == \
        em_conv_kernels.CHILD_CONFIGS[:1]
    assert em_conv_kernels.prune_conv_configs(em_conv_kernels.CHILD_CONFIGS, {}, BA=1, BC=32) == \
        em_conv_kernels.CHILD_CONFIGS
    child = em_conv_kernels.CHILD_CONFIGS
    prune_child = em_conv_kernels.prune_child_configs
    assert prune_child(child, {}, BA=2, BC=16, MODE=em_conv_kernels.MODE_RDR, VOTES=False) == child
    assert prune_child(child, {}, BA=1, BC=32, MODE=em_conv_kernels.MODE_GRAD, VOTES=False) == child[:1]
