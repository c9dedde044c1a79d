"""Soft Weight Rescaling against methods.md §4 (properties 4.1-4.4) and methods-v2.md §13 (13.1-13.3).

On ordinary models (nn.Linear/nn.Conv2d/nn.LayerNorm: a population of one, so scales are [1]
and ``init_norms`` [layers, 1]); member-layer populations are pinned against these in
tests/test_population_methods_norms.py.
"""

import math

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from plasticity.losses import CategoricalSupport
from plasticity.networks import layer_map
from plasticity.swr import SoftWeightRescaling

SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _norm(shape, layer_norm):
    return nn.LayerNorm(shape) if layer_norm else nn.Identity()


def _plain_mlp(out, layer_norm=False):
    """networks.mlp((6,), (16, 16)) in ordinary layers: Flatten, [Linear, LN/Identity, ReLU] x 2, then the head."""
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 16), _norm(16, layer_norm), nn.ReLU(),
                         nn.Linear(16, 16), _norm(16, layer_norm), nn.ReLU(), nn.Linear(16, out))


def _mlp(layer_norm=False, seed=0):
    torch.manual_seed(seed)
    return _plain_mlp(3, layer_norm)


def _cnn(layer_norm=False, seed=0):
    """networks.small_cnn((2, 12, 12), channels=(4, 8), hidden_size=16) in ordinary layers, and a head."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), _norm([4, 6, 6], layer_norm), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1), _norm([8, 3, 3], layer_norm), nn.ReLU(),
                         nn.Flatten(), nn.Linear(72, 16), _norm(16, layer_norm), nn.ReLU(), nn.Linear(16, 5))


def _perturb_(model, seed=1):
    """Move every weight away from its initial norm (factors 0.5-3) so that c_l ≠ 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5 + 2.5 * torch.rand((), generator=generator))
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def _head_from(model):
    """Index in ``layer_map(model).ordered`` of the first layer that takes λ_h: the final LN, else the output layer."""
    ordered = [m for _, m in layer_map(model).ordered]
    norms = [i for i, m in enumerate(ordered) if isinstance(m, nn.LayerNorm)]
    return norms[-1] if norms else len(ordered) - 1


def _reference_step(model, init_norms, coef, head_coef):
    """§4 with §13's coefficients, read literally, in float64: returns ({param: expected value}, output scale)."""
    layers = layer_map(model)
    expected, running, head_from = {}, 1.0, _head_from(model)
    for index, ((_, module), norm0) in enumerate(zip(layers.ordered, init_norms)):
        lam = head_coef if index >= head_from else coef  # §13: the final LN's (γ, β) and the output layer
        norm = module.weight.detach().double().norm()
        c = (lam * norm0 + (1 - lam) * norm) / norm
        running = c if isinstance(module, nn.LayerNorm) else running * c  # restart at a normalisation layer
        expected[module.weight] = c * module.weight.detach().double()
        expected[module.bias] = running * module.bias.detach().double()
    return expected, running


@pytest.mark.parametrize("build", [_mlp, _cnn])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("coef, head_coef", [(0.3, None), (0.3, 0.05), (1.0, 0.0)])
def test_step_matches_definition(build, layer_norm, coef, head_coef):
    model = build(layer_norm)
    init_norms = [m.weight.detach().double().norm() for _, m in layer_map(model).ordered]
    swr = SoftWeightRescaling(model, coef, head_coef)
    _perturb_(model)
    expected, scale = _reference_step(model, init_norms, coef, coef if head_coef is None else head_coef)
    returned = swr.step()
    for param, value in expected.items():
        torch.testing.assert_close(param.detach().double(), value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(returned.double(), scale.reshape(1), rtol=1e-5, atol=0)
    assert returned is swr.last_scale and returned.shape == (1,)  # one scale per member


@pytest.mark.parametrize("build", [_mlp, _cnn])
def test_property_4_1_outputs_scale_by_product_of_factors(build):
    """Theorem 1: without normalisation one step multiplies every output by exactly Π c_l; argmax unchanged."""
    model = build(False)
    swr = SoftWeightRescaling(model, 0.3)
    _perturb_(model)
    x = torch.randn(32, *((6,) if build is _mlp else (2, 12, 12)))
    norms = torch.stack([m.weight.detach().norm() for _, m in layer_map(model).ordered])
    factors = (0.3 * swr.init_norms[:, 0] + 0.7 * norms) / norms
    before = model(x).detach()
    scale = swr.step()
    after = model(x).detach()
    torch.testing.assert_close(scale, factors.prod().reshape(1), rtol=1e-6, atol=0)
    assert abs(scale.item() - 1) > 0.05  # the test is not vacuous
    torch.testing.assert_close(after, scale * before, rtol=1e-5, atol=1e-6)
    assert torch.equal(after.argmax(1), before.argmax(1))


@pytest.mark.parametrize("build", [_mlp, _cnn])
def test_property_4_1_with_layer_norm_outputs_scale_from_the_final_norm_layer(build):
    model = build(True)
    swr = SoftWeightRescaling(model, 0.3, head_coef=0.2)
    _perturb_(model)
    x = torch.randn(32, *((6,) if build is _mlp else (2, 12, 12)))
    ordered = [m for _, m in layer_map(model).ordered]
    final_norm = max(i for i, m in enumerate(ordered) if isinstance(m, nn.LayerNorm))
    norms = torch.stack([m.weight.detach().norm() for m in ordered])
    coefs = torch.tensor([0.3] * final_norm + [0.2] * (len(ordered) - final_norm))  # §13: λ_h from the final LN on
    factors = (coefs * swr.init_norms[:, 0] + (1 - coefs) * norms) / norms
    before = model(x).detach()
    scale = swr.step()
    torch.testing.assert_close(scale, factors[final_norm:].prod().reshape(1), rtol=1e-6, atol=0)
    assert abs(factors[:final_norm].prod().item() - 1) > 0.05  # layers before k are rescaled but do not count
    torch.testing.assert_close(model(x).detach(), scale * before, rtol=1e-4, atol=1e-5)  # LN eps: not exact


def _nonstationary_run(swr_coef, steps=800, switch_every=50):
    """A new regression task every `switch_every` steps (fresh inputs, targets of scale 10), Adam lr 1e-2."""
    model = _mlp(seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    swr = SoftWeightRescaling(model, swr_coef) if swr_coef else None
    generator = torch.Generator().manual_seed(0)
    weights = [m.weight for _, m in layer_map(model).ordered]
    history = []
    for t in range(steps):
        if t % switch_every == 0:
            x, y = torch.randn(64, 6, generator=generator), 10 * torch.randn(64, 3, generator=generator)
        loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if swr is not None:
            swr.step()
        if (t + 1) % 100 == 0:
            history.append(torch.stack([w.detach().norm() for w in weights]))
    return torch.stack(history)  # [checkpoints every 100 steps, layers]


def test_property_4_2_norms_plateau_with_swr_and_grow_without():
    """Theorem 2: over the second half of the run the SWR norms stay flat; the baseline's still grow."""
    baseline = _nonstationary_run(0.0)
    rescaled = _nonstationary_run(1e-2)
    middle = 3  # after 400 of 800 steps
    baseline_growth = baseline[-1] / baseline[middle]
    assert (baseline_growth[:2] > 1.1).all(), f"baseline hidden norms should keep growing: {baseline_growth}"
    assert (baseline[1:] > baseline[:-1])[:, :2].all(), f"baseline hidden norms grow monotonically: {baseline}"
    assert (rescaled[middle + 1:] <= 1.05 * rescaled[middle]).all(), f"SWR norms should plateau: {rescaled}"
    assert (rescaled[-1] < baseline[-1]).all()


def test_property_4_3_norm_ratios_move_toward_their_initial_values():
    model = _mlp(layer_norm=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    swr = SoftWeightRescaling(model, 0.05)
    init_norms = swr.init_norms[:, 0]  # [layers, members=1]
    r0 = init_norms[:, None] / init_norms[None, :]
    weights = swr.weights
    x, y = torch.randn(64, 6), 5 * torch.randn(64, 3)
    for _ in range(30):
        optimizer.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        optimizer.step()
        norms = torch.stack([w.detach().norm() for w in weights])
        gap_before = (norms[:, None] / norms[None, :] - r0).abs()
        swr.step()
        norms = torch.stack([w.detach().norm() for w in weights])
        gap_after = (norms[:, None] / norms[None, :] - r0).abs()
        assert (gap_after <= gap_before + 1e-6).all()
    assert gap_before.max() > 0.1  # training did move the ratios


def test_property_4_4_one_norm_per_tensor_one_fused_scale_and_no_host_sync():
    model = _cnn(layer_norm=True)
    swr = SoftWeightRescaling(model, 0.1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        swr.step()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert not SYNC_OPS & counts.keys(), f"host-device sync in SWR: {SYNC_OPS & counts.keys()}"
    assert counts["aten::linalg_vector_norm"] == len(swr.weights)  # one per weight, all members at once
    assert counts["aten::_foreach_mul_"] == 1  # weights and biases in one call


def test_zero_weight_layer_stays_finite():
    model = _mlp()
    swr = SoftWeightRescaling(model, 0.5)
    with torch.no_grad():
        model[-1].weight.zero_()
    swr.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model[-1].weight, torch.zeros_like(model[-1].weight))


def test_state_dict_roundtrip_and_mismatch(tmp_path):
    model = _mlp()
    swr = SoftWeightRescaling(model, 0.1)
    torch.save(swr.state_dict(), tmp_path / "swr.pt")
    _perturb_(model)
    restored = SoftWeightRescaling(model, 0.1)  # would record the perturbed norms as ‖W^0‖
    restored.load_state_dict(torch.load(tmp_path / "swr.pt", weights_only=True))
    assert torch.equal(restored.init_norms, swr.init_norms)
    norms = torch.stack([w.detach().norm() for w in restored.weights])
    expected = ((0.1 * swr.init_norms[:, 0] + 0.9 * norms) / norms).prod()  # toward the checkpoint's ‖W^0‖
    torch.testing.assert_close(restored.step(), expected.reshape(1), rtol=1e-6, atol=0)
    assert abs(expected.item() - 1) > 1e-2
    with pytest.raises(ValueError, match="layer norms"):
        SoftWeightRescaling(_cnn(), 0.1).load_state_dict(swr.state_dict())


@pytest.mark.parametrize("coef, head_coef, flag", [(-0.1, None, "--swr "), (1.5, None, "--swr "),
                                                   (0.1, 2.0, "--swr-head")])
def test_invalid_coefficients(coef, head_coef, flag):
    with pytest.raises(ValueError, match=flag):
        SoftWeightRescaling(_mlp(), coef, head_coef)


def test_rescaled_tensors_are_weights_and_norm_gains_in_forward_order():
    """The layers SWR rescales are exactly the Linear/Conv2d weights and LN γ, in forward order."""
    model = _cnn(layer_norm=True)
    swr = SoftWeightRescaling(model, 0.1)
    expected = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm))]
    assert len(swr.weights) == len(expected) and all(a is b for a, b in zip(swr.weights, expected))


@pytest.mark.gpu
def test_swr_on_cuda_matches_cpu_without_sync():
    model = _cnn(layer_norm=True)
    cuda_model = _cnn(layer_norm=True).cuda()
    swr, cuda_swr = SoftWeightRescaling(model, 0.3), SoftWeightRescaling(cuda_model, 0.3)
    _perturb_(model)
    cuda_model.load_state_dict(model.state_dict())  # in place: the same Parameters, now perturbed
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_scale = cuda_swr.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scale = swr.step()
    torch.testing.assert_close(cuda_scale.cpu(), scale, rtol=1e-5, atol=0)
    assert abs(scale.item() - 1) > 0.05
    for p, q in zip(model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)


# ---- methods-v2.md §13: categorical heads ------------------------------------------------------------------------

N_ATOMS = 7


def _logit_model(layer_norm, seed=0):
    """An MLP torso and a linear head producing logits over N_ATOMS bins for 3 actions."""
    torch.manual_seed(seed)
    return _plain_mlp(3 * N_ATOMS, layer_norm)


def _grow_(model, factor=3.0):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)


def _factors_by_hand(model, init_norms, coef, head_coef):
    """c_l = (λ_l‖W^0‖ + (1 − λ_l)‖W‖)/‖W‖ in float64, λ_l = λ_h from the final LN (else the output layer) on."""
    head_from = _head_from(model)
    factors = []
    for index, (_, module) in enumerate(layer_map(model).ordered):
        lam = head_coef if index >= head_from else coef
        norm = module.weight.detach().double().norm()
        factors.append((lam * init_norms[index] + (1 - lam) * norm) / norm)
    return torch.stack(factors), head_from


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_property_13_1_zero_head_coef_leaves_the_final_norm_and_head_untouched(dtype):
    """With LN and λ_h = 0: c_k = c_L = 1 exactly, so the final LN's (γ, β) and the head are bit-identical."""
    model = _logit_model(layer_norm=True).to(dtype)
    swr = SoftWeightRescaling(model, 0.5, head_coef=0.0)
    _grow_(model)
    head_params = [p.detach().clone() for p in (*model[-3].parameters(), *model[-1].parameters())]  # final LN, head
    first = model[1].weight.detach().clone()
    scale = swr.step()
    assert scale.item() == 1.0  # exactly: the running product restarts at the final LN and c_k = c_L = 1
    assert all(torch.equal(p, q) for p, q in zip((*model[-3].parameters(), *model[-1].parameters()), head_params))
    torch.testing.assert_close(model[1].weight.detach(), first * 2 / 3)  # the torso is still pulled back (c = 2/3)


@pytest.mark.parametrize("coef, eps, atol", [
    (0.5, 0.0, 1e-12),  # without LN's ε the logits are exactly invariant
    (0.01, 1e-5, 1e-6),  # a per-step λ: 1e-6 (measured ≤ 3e-8 over 20 seeds)
    (0.5, 1e-5, 1e-5),  # one big step (c = 2/3 per layer): the ε of the shrunk pre-LN variance shows (≤ 4e-6)
])
def test_property_13_1_layer_norm_and_zero_head_coef_leave_the_distributions_unchanged(coef, eps, atol):
    """§13.1 in float64 (float32 rounding of logits ~10 alone is ~1e-6): the LN absorbs the torso's rescaling."""
    model = _logit_model(layer_norm=True).double()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps
    swr = SoftWeightRescaling(model, coef, head_coef=0.0)
    _grow_(model)
    x = 5 * torch.randn(64, 6, dtype=torch.float64)
    support = CategoricalSupport(-10.0, 10.0, N_ATOMS)
    logits = model(x).detach().view(64, 3, N_ATOMS)
    before, q_before = torch.softmax(logits, dim=-1), support.expectation(logits.float())
    assert swr.step().item() == 1.0
    logits = model(x).detach().view(64, 3, N_ATOMS)
    torch.testing.assert_close(torch.softmax(logits, dim=-1), before, rtol=0, atol=atol)
    torch.testing.assert_close(support.expectation(logits.float()), q_before, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_property_13_2_explicit_head_coef_scales_the_logits_by_the_product_from_the_final_norm(layer_norm):
    model = _logit_model(layer_norm)
    init_norms = [m.weight.detach().double().norm() for _, m in layer_map(model).ordered]
    swr = SoftWeightRescaling(model, 0.5, head_coef=0.3)
    _grow_(model)
    _perturb_(model)
    x = torch.randn(64, 6)
    factors, head_from = _factors_by_hand(model, init_norms, 0.5, 0.3)
    expected_scale = factors[head_from:].prod() if layer_norm else factors.prod()
    before = model(x).detach().double()
    scale = swr.step()
    after = model(x).detach().double()
    torch.testing.assert_close(scale.double(), expected_scale.reshape(1), rtol=1e-6, atol=0)
    assert abs(expected_scale.item() - 1) > 0.05  # not vacuous
    tolerance = dict(rtol=1e-4, atol=1e-5) if layer_norm else dict(rtol=1e-5, atol=1e-6)  # LN's ε: not exact
    torch.testing.assert_close(after, expected_scale * before, **tolerance)


def test_final_layer_norm_gain_and_bias_take_the_head_coefficient():
    model = _logit_model(layer_norm=True)
    ordered = [m for _, m in layer_map(model).ordered]  # Linear, LN, Linear, LN, Linear
    first_norm, final_norm, head = ordered[1], ordered[3], ordered[4]
    init = {m: m.weight.detach().double().norm() for m in ordered}
    swr = SoftWeightRescaling(model, 0.5, head_coef=0.2)
    _perturb_(model)
    old = {m: (m.weight.detach().double().clone(), m.bias.detach().double().clone()) for m in ordered}

    def factor(module, lam):
        norm = old[module][0].norm()
        return (lam * init[module] + (1 - lam) * norm) / norm

    swr.step()
    c_first, c_k, c_head = factor(first_norm, 0.5), factor(final_norm, 0.2), factor(head, 0.2)
    assert abs(factor(final_norm, 0.5) / c_k - 1) > 0.05  # the torso λ would give a different γ, β
    for module, c, bias_scale in ((first_norm, c_first, c_first),  # an earlier LN keeps the torso λ
                                  (final_norm, c_k, c_k),  # the product restarts at c_k: β by c_k
                                  (head, c_head, c_k * c_head)):
        torch.testing.assert_close(module.weight.detach().double(), c * old[module][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(module.bias.detach().double(), bias_scale * old[module][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("final", ["non_affine_norm", "hidden_layer_after_norm"])
def test_zero_head_coef_makes_every_layer_after_the_final_norm_invariant(final):
    """λ_h covers every layer from the final LN on, also when it has no γ or a hidden layer follows it."""
    torch.manual_seed(0)
    if final == "non_affine_norm":
        model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(),
                              nn.Linear(16, 16), nn.LayerNorm(16, elementwise_affine=False), nn.ReLU(),
                              nn.Linear(16, 3 * N_ATOMS))
    else:
        model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(),
                              nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3 * N_ATOMS))
    swr = SoftWeightRescaling(model, 0.5, head_coef=0.0)
    _grow_(model)
    x = 5 * torch.randn(64, 6)
    before = model(x).detach()
    assert swr.step().item() == 1.0
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-5)


def test_property_13_3_temperature_flips_the_greedy_action():
    """Why categorical losses default to λ_h = 0: logits scaled by C < 1 flatten the distributions."""
    atoms = torch.tensor([-10.0, 0.0, 10.0], dtype=torch.float64)
    logits = torch.tensor([[0.0, -100.0, 1.0], [-100.0, 0.0, -0.5]], dtype=torch.float64)  # actions A, B

    def expectations(scale):
        return torch.softmax(scale * logits, dim=-1) @ atoms

    e_a, e_b = expectations(1.0).tolist()
    assert e_a == pytest.approx(4.62, abs=5e-3) and e_b == pytest.approx(3.78, abs=5e-3) and e_a > e_b
    # Closed form (the atom at −100 carries ~e^−100): E_A = 10·tanh(1/2), E_B = 10·σ(−1/2).
    assert e_a == pytest.approx(10 * math.tanh(0.5), abs=1e-9)
    assert e_b == pytest.approx(10 / (1 + math.exp(0.5)), abs=1e-9)
    e_a, e_b = expectations(0.1).tolist()
    assert e_a == pytest.approx(0.50, abs=5e-3) and e_b == pytest.approx(4.87, abs=5e-3) and e_a < e_b
