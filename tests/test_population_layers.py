"""Member layers (plasticity/population.py): M networks computed as one, each equal to its own single network.

Spec populations.md 1.2/1.3/2.3: member k is the network a single run with seed s+k builds, and the
members never mix.  Small layers, CPU float32.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from plasticity.networks import build_torso, fresh_weights, init_generators, reinit_
from plasticity.population import (
    MemberConv2d,
    MemberLayerNorm,
    MemberLinear,
    as_weight_view,
    bias_view,
    fan_in,
    member_parameters,
    members_of,
    out_units,
    weight_param,
    weight_view,
)
from plasticity.streams import MemberRandom

TORSOS = {"nature_cnn": (4, 84, 84), "mlp": (1, 28, 28), "cnn": (3, 32, 32)}


def _seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _randomise_(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial parameters (LN's γ/β start at 1/0, which would hide a mixed-up member)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5 + 0.1)


# ----------------------------------------------------------------------------- each member is its own layer

def _check_members_equal_reference(layer, references, x):
    """Forward and gradients (input, weight, bias) of member k equal those of ``references[k]`` on ``x[k]``."""
    x = x.clone().requires_grad_(True)
    out = layer(x)
    assert out.shape[0] == len(references)
    cotangent = _seeded(*out.shape, seed=99)
    (out * cotangent).sum().backward()
    for k, reference in enumerate(references):
        xk = x[k].detach().clone().requires_grad_(True)
        expected = reference(xk)
        torch.testing.assert_close(out[k], expected)
        (expected * cotangent[k]).sum().backward()
        torch.testing.assert_close(x.grad[k], xk.grad)
        torch.testing.assert_close(as_weight_view(layer, weight_param(layer).grad)[k], reference.weight.grad)
        torch.testing.assert_close(layer.bias.grad[k], reference.bias.grad)


def test_member_linear_equals_nn_linear_per_member():
    layer = MemberLinear(3, 7, 5)
    _randomise_(layer)
    references = []
    for k in range(3):
        reference = nn.Linear(7, 5)
        with torch.no_grad():
            reference.weight.copy_(layer.weight[k])
            reference.bias.copy_(layer.bias[k])
        references.append(reference)
    _check_members_equal_reference(layer, references, _seeded(3, 4, 7))


def test_member_linear_without_bias():
    layer = MemberLinear(2, 6, 3, bias=False)
    assert layer.bias is None and bias_view(layer) is None
    x = _seeded(2, 4, 6)
    out = layer(x)
    for k in range(2):
        torch.testing.assert_close(out[k], x[k] @ layer.weight[k].T)
    single = MemberLinear(1, 6, 3, bias=False)
    with torch.no_grad():
        single.weight.copy_(layer.weight[1:])
    torch.testing.assert_close(single(x[1:]), out[1:])


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1)])
def test_member_conv2d_equals_nn_conv2d_per_member(stride, padding):
    layer = MemberConv2d(3, 2, 4, 3, stride=stride, padding=padding)
    _randomise_(layer)
    references = []
    for k in range(3):
        reference = nn.Conv2d(2, 4, 3, stride=stride, padding=padding)
        with torch.no_grad():
            reference.weight.copy_(layer.weight[k])
            reference.bias.copy_(layer.bias[k])
        references.append(reference)
    _check_members_equal_reference(layer, references, _seeded(3, 2, 2, 7, 7))


@pytest.mark.parametrize("shape", [(6,), (3, 4, 4)])
def test_member_layer_norm_equals_nn_layer_norm_per_member(shape):
    layer = MemberLayerNorm(3, shape)
    _randomise_(layer)
    references = []
    for k in range(3):
        reference = nn.LayerNorm(shape)
        with torch.no_grad():
            reference.weight.copy_(layer.weight[k])
            reference.bias.copy_(layer.bias[k])
        references.append(reference)
    _check_members_equal_reference(layer, references, _seeded(3, 5, *shape) * 3 + 1)


# ----------------------------------------------------------------------------- the one-member fast path

def _one_member_copy(layer, k):
    """A one-member layer holding member k of ``layer``."""
    if isinstance(layer, MemberLinear):
        single = MemberLinear(1, layer.in_features, layer.out_features)
    elif isinstance(layer, MemberConv2d):
        single = MemberConv2d(1, layer.in_channels, layer.out_channels, layer.kernel_size[0], layer.stride,
                              layer.padding)
    else:
        single = MemberLayerNorm(1, layer.normalized_shape, layer.eps)
    with torch.no_grad():
        for mine, theirs in zip(single.parameters(), layer.parameters(), strict=True):
            mine.copy_(theirs[k:k + 1])
    return single


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_channels_last", "layer_norm"])
def test_one_member_fast_path_equals_the_batched_path(kind):
    layer = {"linear": lambda: MemberLinear(2, 9, 4), "conv": lambda: MemberConv2d(2, 3, 5, 3, 2, 1),
             "conv_channels_last": lambda: MemberConv2d(2, 3, 5, 3, 2, 1),
             "layer_norm": lambda: MemberLayerNorm(2, (3, 4))}[kind]()
    _randomise_(layer)
    shape = {"linear": (9,), "layer_norm": (3, 4)}.get(kind, (3, 8, 8))
    x = _seeded(2, 5, *shape, seed=1).requires_grad_(True)
    batched = layer(x)
    cotangent = _seeded(*batched.shape, seed=2)
    (batched * cotangent).sum().backward()
    for k in range(2):
        single = _one_member_copy(layer, k)
        if kind == "conv_channels_last":
            single.channels_last = True
        xk = x[k:k + 1].detach().clone().requires_grad_(True)
        out = single(xk)
        assert out.shape == batched[k:k + 1].shape
        torch.testing.assert_close(out, batched[k:k + 1], rtol=1e-5, atol=1e-6)
        (out * cotangent[k:k + 1]).sum().backward()
        torch.testing.assert_close(xk.grad, x.grad[k:k + 1], rtol=1e-5, atol=1e-6)
        for mine, theirs in zip(single.parameters(), layer.parameters(), strict=True):
            torch.testing.assert_close(mine.grad, theirs.grad[k:k + 1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- initialisation

@pytest.mark.parametrize("name", TORSOS)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_member_k_of_a_population_is_the_single_network_of_seed_k(name, layer_norm):
    """Spec 1.2: member k's initial weights are the one-member network's built with generator seed s+k."""
    seeds = [5, 6, 7]
    generators = init_generators(seeds)
    population = nn.Sequential(build_torso(name, TORSOS[name], layer_norm, members=3, generators=generators),
                               MemberLinear(3, 512 if name == "nature_cnn" else 256, 4, generators=generators))
    names = [n for n, _ in population.named_parameters()]
    for k, seed in enumerate(seeds):
        generator = init_generators([seed])
        single = nn.Sequential(build_torso(name, TORSOS[name], layer_norm, members=1, generators=generator),
                               MemberLinear(1, 512 if name == "nature_cnn" else 256, 4, generators=generator))
        assert [n for n, _ in single.named_parameters()] == names
        for (n, theirs), mine in zip(population.named_parameters(), single.parameters(), strict=True):
            assert mine.shape == (1, *theirs.shape[1:])
            assert torch.equal(theirs[k], mine[0]), f"{n} of member {k}"
    head = population[1].weight
    assert not torch.equal(head[0], head[1]) and not torch.equal(head[1], head[2])  # members differ


def test_generators_are_optional_and_checked():
    torch.manual_seed(0)
    a = MemberLinear(2, 4, 3)
    torch.manual_seed(0)
    b = MemberLinear(2, 4, 3)
    assert torch.equal(a.weight, b.weight)  # None: the global generator, as nn.Linear
    with pytest.raises(ValueError, match="one generator per member"):
        MemberLinear(3, 4, 3, generators=init_generators([1, 2]))
    with pytest.raises(ValueError, match="one generator per member"):
        MemberConv2d(1, 4, 3, 3, generators=init_generators([1, 2]))
    with pytest.raises(ValueError, match="at least one member"):
        MemberLayerNorm(0, 4)


@pytest.mark.parametrize("in_features, out_features", [(7, 5), (784, 64)])
def test_member_linear_init_is_nn_linear_default_init(in_features, out_features):
    """PyTorch's default (kaiming_uniform_(a=√5): U(±1/√fan_in)), the same numbers for the same seed."""
    torch.manual_seed(11)
    reference = nn.Linear(in_features, out_features)
    layer = MemberLinear(1, in_features, out_features, generators=init_generators([11]))
    assert torch.equal(layer.weight[0], reference.weight) and torch.equal(layer.bias[0], reference.bias)
    assert torch.equal(weight_view(layer)[0], reference.weight)
    bound = 1 / math.sqrt(in_features)
    weight = weight_view(layer)
    assert weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    if weight.numel() > 10_000:
        assert weight.abs().max() > 0.99 * bound  # the full range
        assert abs(weight.var().item() - bound**2 / 3) < 0.05 * bound**2 / 3  # U(-b, b): variance b²/3
        assert abs(weight.mean().item()) < 0.05 * bound


def test_member_conv2d_init_is_nn_conv2d_default_init():
    torch.manual_seed(12)
    reference = nn.Conv2d(3, 16, 5, stride=2, padding=1)
    layer = MemberConv2d(1, 3, 16, 5, stride=2, padding=1, generators=init_generators([12]))
    assert torch.equal(layer.weight[0], reference.weight) and torch.equal(layer.bias[0], reference.bias)
    x = _seeded(1, 2, 3, 11, 11)
    torch.testing.assert_close(layer(x)[0], reference(x[0]))
    assert fan_in(layer) == 3 * 5 * 5 and out_units(layer) == 16


def test_fresh_weights_follow_the_default_init_of_each_member_stream():
    layer = MemberConv2d(2, 4, 64, 3)
    fresh = fresh_weights(layer, MemberRandom([1, 2]))
    assert fresh.shape == weight_view(layer).shape == (2, 64, 4, 3, 3)
    bound = 1 / math.sqrt(4 * 9)
    assert fresh.abs().max() <= bound and fresh.abs().max() > 0.99 * bound
    assert abs(fresh.var().item() - bound**2 / 3) < 0.05 * bound**2 / 3
    assert torch.equal(fresh[1], fresh_weights(MemberConv2d(1, 4, 64, 3), MemberRandom([2]))[0])
    plain = fresh_weights(nn.Linear(10, 3), torch.Generator().manual_seed(0))
    assert plain.shape == (1, 3, 10) and plain.abs().max() <= 1 / math.sqrt(10)


# ----------------------------------------------------------------------------- member views

@pytest.mark.parametrize("make, weight_shape, bias_shape", [
    (lambda: nn.Linear(4, 3), (1, 3, 4), (1, 3)),
    (lambda: nn.Conv2d(2, 3, 5), (1, 3, 2, 5, 5), (1, 3)),
    (lambda: nn.LayerNorm([3, 2]), (1, 3, 2), (1, 3, 2)),
    (lambda: MemberLinear(2, 4, 3), (2, 3, 4), (2, 3)),
    (lambda: MemberConv2d(2, 2, 3, 5), (2, 3, 2, 5, 5), (2, 3)),
    (lambda: MemberLayerNorm(2, [3, 2]), (2, 3, 2), (2, 3, 2)),
])
def test_member_views_are_views_of_the_parameters(make, weight_shape, bias_shape):
    layer = make()
    view, bias = weight_view(layer), bias_view(layer)
    assert tuple(view.shape) == weight_shape and tuple(bias.shape) == bias_shape
    parameter = weight_param(layer)
    assert parameter is layer.weight
    assert members_of(layer) == weight_shape[0]
    with torch.no_grad():
        view[-1, 1].fill_(7.0)  # member M-1, output unit 1
        bias[-1, 1].fill_(-3.0)
    assert torch.equal(weight_view(layer)[-1, 1], torch.full(weight_shape[2:], 7.0))
    assert (parameter == 7.0).sum() == math.prod(weight_shape[2:])  # exactly that unit's fan-in, in place
    assert (layer.bias == -3.0).sum() == math.prod(bias_shape[2:])
    # The same view of any tensor shaped like the weight parameter (its gradient, Adam's moments).
    like = torch.arange(parameter.numel(), dtype=torch.float32).view(parameter.shape)
    as_view = as_weight_view(layer, like)
    assert tuple(as_view.shape) == weight_shape and as_view.data_ptr() == like.data_ptr()
    as_view[0, 0].zero_()
    assert (like == 0).sum() == math.prod(weight_shape[2:])


def test_member_linear_view_rows_are_output_units():
    """weight_view(layer)[k, o] is the fan-in of member k's output unit o (the stored kernel is [M, in, out])."""
    layer = MemberLinear(2, 4, 3)
    x = torch.zeros(2, 1, 4)
    x[1, 0, 2] = 1.0  # member 1, input 2
    out = layer(x)
    torch.testing.assert_close(out[1, 0] - layer.bias[1], weight_view(layer)[1, :, 2])
    out[1, 0, 0].backward()  # output unit 0 of member 1
    grad = as_weight_view(layer, layer.weight.grad)
    expected = torch.zeros(2, 3, 4)
    expected[1, 0, 2] = 1.0
    assert torch.equal(grad, expected)


# ----------------------------------------------------------------------------- member_parameters

@pytest.mark.parametrize("name, layer_norm", [("mlp", True), ("cnn", True), ("cnn", False)])
def test_member_parameters_and_functional_call_reproduce_member_k_alone(name, layer_norm):
    seeds = [3, 4, 5]
    generators = init_generators(seeds)
    torso = build_torso(name, TORSOS[name], layer_norm, hidden_sizes=(16, 8), members=3, generators=generators)
    model = nn.Sequential(torso, MemberLinear(3, torso.out_features, 2, generators=generators))
    _randomise_(model)
    x = torch.rand(3, 4, *TORSOS[name])
    out = model(x)
    for k in range(3):
        own = member_parameters(model, k)
        assert set(own) == set(dict(model.named_parameters()))
        for parameter_name, parameter in model.named_parameters():
            assert own[parameter_name].shape == (1, *parameter.shape[1:])
            assert own[parameter_name].data_ptr() == parameter[k].data_ptr()  # a view, no copy
        alone = functional_call(model, own, (x[k:k + 1],))
        torch.testing.assert_close(alone, out[k:k + 1], rtol=1e-5, atol=1e-6)
        # ... and gradients through it reach only member k's slice.
        model.zero_grad()
        functional_call(model, own, (x[k:k + 1],)).sum().backward()
        for parameter in model.parameters():
            others = [j for j in range(3) if j != k]
            assert torch.equal(parameter.grad[others], torch.zeros_like(parameter.grad[others]))
            assert parameter.grad[k].abs().sum() > 0


def test_member_parameters_of_an_ordinary_model_are_its_own():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    own = member_parameters(model, 0)
    assert set(own) == {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert all(own[n] is p for n, p in model.named_parameters())
    assert members_of(model) == 1


# ----------------------------------------------------------------------------- members never mix

@pytest.mark.parametrize("name, layer_norm", [("mlp", False), ("mlp", True), ("cnn", True), ("nature_cnn", True)])
def test_members_never_mix(name, layer_norm):
    """Spec 1.3/2.3/4.1: member 0's weights and inputs -- even NaN -- leave the other members' outputs bit-identical."""
    torch.manual_seed(0)
    torso = build_torso(name, TORSOS[name], layer_norm, hidden_sizes=(32, 16), members=3)
    _randomise_(torso)
    x = torch.rand(3, 2, *TORSOS[name])
    out = torso(x)
    assert torch.isfinite(out).all()

    changed = x.clone()
    changed[0] = torch.rand_like(changed[0]) * 10
    assert torch.equal(torso(changed)[1:], out[1:])
    changed[0] = float("nan")
    poisoned = torso(changed)
    assert torch.isnan(poisoned[0]).any() and torch.equal(poisoned[1:], out[1:])

    with torch.no_grad():
        for parameter in torso.parameters():
            parameter[0].mul_(-3.0).add_(1.0)
    moved = torso(x)
    assert not torch.equal(moved[0], out[0]) and torch.equal(moved[1:], out[1:])
    with torch.no_grad():
        for parameter in torso.parameters():
            parameter[0].fill_(float("inf"))
    assert torch.equal(torso(x)[1:], out[1:])


def test_gradients_of_one_members_loss_reach_only_that_member():
    """Summing the members' losses gives each member its own gradient (spec 1.3)."""
    torch.manual_seed(0)
    model = nn.Sequential(build_torso("cnn", (3, 16, 16), True, members=3), MemberLinear(3, 256, 2))
    _randomise_(model)
    x = torch.rand(3, 4, 3, 16, 16)
    out = model(x)
    losses = out.square().mean(dim=(1, 2))  # [M]
    grads_sum = torch.autograd.grad(losses.sum(), list(model.parameters()))
    grads_one = torch.autograd.grad(model(x)[1].square().mean(), list(model.parameters()))
    for total, one in zip(grads_sum, grads_one, strict=True):
        assert torch.equal(one[0], torch.zeros_like(one[0])) and torch.equal(one[2], torch.zeros_like(one[2]))
        torch.testing.assert_close(total[1], one[1])


# ----------------------------------------------------------------------------- reinit_ of a conv population

def test_reinit_conv_mask_is_per_member_and_equals_the_single_member_result():
    seeds = [21, 22]
    layer = MemberConv2d(2, 3, 5, 3, generators=init_generators([0, 1]))
    before_w, before_b = weight_view(layer).detach().clone(), layer.bias.detach().clone()
    mask = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    reinit_(layer, units=mask, random=MemberRandom(seeds))
    assert torch.equal(layer.weight[~mask], before_w[~mask]) and torch.equal(layer.bias[~mask], before_b[~mask])
    assert (layer.weight[mask] != before_w[mask]).all()
    assert torch.equal(layer.bias[mask], torch.zeros(3))
    assert layer.weight[mask].abs().max() <= 1 / math.sqrt(27)
    for k, seed in enumerate(seeds):
        single = MemberConv2d(1, 3, 5, 3, generators=init_generators([k]))
        reinit_(single, units=mask[k:k + 1], random=MemberRandom([seed]))
        assert torch.equal(single.weight[0], layer.weight[k]) and torch.equal(single.bias[0], layer.bias[k])


def test_member_layers_are_usable_with_functional_ops():
    """Sanity: the batched LN is F.layer_norm then the member's own γ/β (no statistics across members)."""
    layer = MemberLayerNorm(2, 4)
    _randomise_(layer)
    x = _seeded(2, 3, 4)
    expected = torch.stack([F.layer_norm(x[k], (4,), layer.weight[k], layer.bias[k]) for k in range(2)])
    torch.testing.assert_close(layer(x), expected)
