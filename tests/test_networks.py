"""Torsos (pitfall 9, property 1.1 of methods.md), the layer map, the activation recorder and reinit_.

Torsos are built from member layers (plasticity/population.py): inputs and outputs carry a
leading member dimension ``[M, B, ...]``; a single run is the population with M = 1.
"""

import copy
import math

import pytest
import torch
from torch import nn

from plasticity.networks import (
    ActivationRecorder,
    build_torso,
    check_torso,
    fresh_weights,
    init_generators,
    layer_map,
    reinit_,
    unit_mask,
)
from plasticity.population import (
    MemberConv2d,
    MemberLayerNorm,
    MemberLinear,
    bias_view,
    weight_view,
)
from plasticity.streams import MemberRandom

TORSOS = {"nature_cnn": (4, 84, 84), "mlp": (1, 28, 28), "cnn": (3, 32, 32)}
WEIGHTS = (MemberLinear, MemberConv2d)

# Expected module sequence of every torso: LN (when on) sits between the weight layer and its ReLU.
SEQUENCES = {
    "nature_cnn": ["Conv2d", "LN", "ReLU", "Conv2d", "LN", "ReLU", "Conv2d", "LN", "ReLU", "Flatten",
                   "Linear", "LN", "ReLU"],
    "mlp": ["Flatten", "Linear", "LN", "ReLU", "Linear", "LN", "ReLU"],
    "cnn": ["Conv2d", "LN", "ReLU", "Conv2d", "LN", "ReLU", "Flatten", "Linear", "LN", "ReLU"],
}
KIND = {MemberConv2d: "Conv2d", MemberLinear: "Linear", MemberLayerNorm: "LN"}


class QNetwork(nn.Module):
    """The agents' Q-network shape: torso then a member head, registered in forward order."""

    def __init__(self, name: str, layer_norm: bool = False, n_actions: int = 3, members: int = 1, generators=None):
        super().__init__()
        self.torso = build_torso(name, TORSOS[name], layer_norm=layer_norm, members=members, generators=generators)
        self.head = MemberLinear(members, self.torso.out_features, n_actions, generators=generators)

    def forward(self, x):
        return self.head(self.torso(x))


@pytest.mark.parametrize("name", TORSOS)
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("members", [1, 3])
def test_torso_module_sequence_keeps_every_relu(name, layer_norm, members):
    """Pitfall 9: a LayerNorm variant must not drop the activation after the norm."""
    torso = build_torso(name, TORSOS[name], layer_norm=layer_norm, members=members)
    expected = [m if layer_norm or m != "LN" else "Identity" for m in SEQUENCES[name]]
    got = [KIND.get(type(m), type(m).__name__) for m in torso]
    assert got == expected
    modules = list(torso)
    for i, module in enumerate(modules):
        if isinstance(module, WEIGHTS):
            assert module.members == members
        if isinstance(module, MemberLayerNorm):
            assert isinstance(modules[i + 1], nn.ReLU), "every LayerNorm must be followed by a ReLU"
            assert module.members == members and module.weight.shape[0] == members
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
            assert module.weight.requires_grad and module.bias.requires_grad  # affine, as elementwise_affine
    assert not isinstance(modules[-1], (*WEIGHTS, MemberLayerNorm)), "no norm/linear after the last ReLU"
    out = torso(torch.rand(members, 2, *TORSOS[name]))
    assert out.shape == (members, 2, torso.out_features)
    assert (out >= 0).all()  # the last module is the ReLU


@pytest.mark.parametrize("members", [1, 2])
def test_conv_layer_norm_covers_channels_height_width(members):
    torso = build_torso("nature_cnn", (4, 84, 84), layer_norm=True, members=members)
    norms = [m for m in torso if isinstance(m, MemberLayerNorm)]
    assert [tuple(m.normalized_shape) for m in norms] == [(32, 20, 20), (64, 9, 9), (64, 7, 7), (512,)]
    assert [tuple(m.weight.shape) for m in norms] == [(members, 32, 20, 20), (members, 64, 9, 9),
                                                       (members, 64, 7, 7), (members, 512)]
    # Normalised over (C, H, W) jointly: per member and sample, the conv LN's output has mean 0 / var 1 over
    # all of C*H*W -- not per channel (which would be a GroupNorm/InstanceNorm).
    x = torch.randn(members, 3, 32, 20, 20) * torch.arange(1, 33).view(1, 1, 32, 1, 1)
    out = norms[0](x)
    flat = out.flatten(2)
    torch.testing.assert_close(flat.mean(2), torch.zeros(members, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(2, unbiased=False), torch.ones(members, 3), atol=1e-3, rtol=0)
    per_channel_var = out.flatten(3).var(3, unbiased=False)
    assert per_channel_var.std() > 0.1  # channels keep their relative scales


def test_nature_cnn_architecture():
    torso = build_torso("nature_cnn", (4, 84, 84))
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in torso if isinstance(m, MemberConv2d)]
    assert convs == [(4, 32, (8, 8), 4), (32, 64, (4, 4), 2), (64, 64, (3, 3), 1)]
    assert torso(torch.zeros(1, 2, 4, 84, 84)).shape == (1, 2, 512)
    assert torso[-3].in_features == 64 * 7 * 7
    assert [tuple(weight_view(m).shape) for m in torso if isinstance(m, WEIGHTS)] == [
        (1, 32, 4, 8, 8), (1, 64, 32, 4, 4), (1, 64, 64, 3, 3), (1, 512, 3136)]


@pytest.mark.parametrize("name", TORSOS)
@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e3])
@pytest.mark.parametrize("members", [1, 2])
def test_layer_norm_preactivations_are_standardised(name, scale, members):
    """Property 1.1: per sample, the normalised pre-activations have mean 0 and variance 1 before γ/β.

    Exactly: variance v/(v + eps) with v the variance of the raw pre-activation, which is 1 up to
    eps/v -- so ≈ 1 whatever the input scale once v ≫ eps.  Per member: γ/β are the member's own.
    """
    torch.manual_seed(0)
    model = QNetwork(name, layer_norm=True, members=members)
    norms = [m for m in model.modules() if isinstance(m, MemberLayerNorm)]
    assert norms
    with torch.no_grad():
        for norm in norms:  # non-trivial γ/β, undone below: the property is about the values before them
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    raw = {}
    handles = [m.register_forward_hook(lambda mod, inp, out: raw.__setitem__(mod, out.detach()))
               for m in model.modules() if isinstance(m, WEIGHTS)]
    x = torch.rand(members, 8, *TORSOS[name]) * scale
    with ActivationRecorder(model, preactivations=True) as recorder:
        model(x)
    for handle in handles:
        handle.remove()
    for hidden in layer_map(model).hidden:
        norm = hidden.norm
        pre = recorder.pre[hidden.name]
        assert pre.shape[:2] == (members, 8)
        standardised = ((pre - norm.bias.unsqueeze(1)) / norm.weight.unsqueeze(1)).flatten(2)
        raw_out = raw[hidden.layer]
        if members == 1:  # a one-member torso runs its layers on [B, ...]; the recorder adds the member dim
            raw_out = raw_out.unsqueeze(0)
        raw_variance = raw_out.flatten(2).var(2, unbiased=False)
        torch.testing.assert_close(standardised.mean(2), torch.zeros(members, 8), atol=1e-4, rtol=0)
        torch.testing.assert_close(standardised.var(2, unbiased=False), raw_variance / (raw_variance + norm.eps),
                                   atol=1e-4, rtol=1e-4)
        if scale >= 1.0:
            torch.testing.assert_close(standardised.var(2, unbiased=False), torch.ones(members, 8), atol=2e-3,
                                       rtol=0)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("members", [1, 2])
def test_layer_map_of_nature_cnn_q_network(layer_norm, members):
    model = QNetwork("nature_cnn", layer_norm=layer_norm, members=members)
    layers = layer_map(model)
    # The same names with and without LN, so per-layer curves of both variants line up.
    assert [h.name for h in layers.hidden] == ["torso.0", "torso.3", "torso.6", "torso.10"]
    assert layers.output is model.head and layers.output_name == "head"
    weight_layers = [m for m in model.modules() if isinstance(m, WEIGHTS)]
    assert len(weight_layers) == 5
    assert [h.layer for h in layers.hidden] == weight_layers[:-1]
    assert [h.next_layer for h in layers.hidden] == weight_layers[1:]
    assert [h.spatial for h in layers.hidden] == [1, 1, 49, 1]
    assert [h.num_units for h in layers.hidden] == [32, 64, 64, 512]
    for hidden in layers.hidden:
        assert (hidden.norm is not None) == layer_norm
        if layer_norm:
            assert isinstance(hidden.norm, MemberLayerNorm)
        assert isinstance(hidden.activation, nn.ReLU)
    expected_ordered = [m for m in model.modules() if isinstance(m, (*WEIGHTS, MemberLayerNorm))]
    assert [m for _, m in layers.ordered] == expected_ordered


def test_layer_map_of_an_ordinary_pytorch_model():
    """Methods work on any model: plain Linear/Conv2d/LayerNorm are found the same way."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm([8, 6, 6]), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 16), nn.ReLU(), nn.Linear(16, 2))
    layers = layer_map(model)
    assert [h.name for h in layers.hidden] == ["0", "4"]
    assert [h.layer for h in layers.hidden] == [model[0], model[4]]
    assert [h.next_layer for h in layers.hidden] == [model[4], model[6]]
    assert layers.hidden[0].norm is model[1] and layers.hidden[1].norm is None
    assert [h.spatial for h in layers.hidden] == [36, 1]
    assert [h.num_units for h in layers.hidden] == [8, 16]
    assert layers.output is model[6] and layers.output_name == "6"
    assert [m for _, m in layers.ordered] == [model[0], model[1], model[4], model[6]]


def test_layer_map_rejects_hidden_layer_without_activation():
    """Pitfall 9 guard: LN(16) with no ReLU after it is reported, not silently treated as hidden."""
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 2))
    with pytest.raises(ValueError, match="no ReLU"):
        layer_map(model)
    with pytest.raises(ValueError, match="output layer"):
        layer_map(nn.Sequential(nn.Linear(4, 16), nn.ReLU()))
    members = nn.Sequential(MemberLinear(2, 4, 16), MemberLayerNorm(2, 16), MemberLinear(2, 16, 2))
    with pytest.raises(ValueError, match="no ReLU"):
        layer_map(members)
    with pytest.raises(ValueError, match="output layer"):
        layer_map(nn.Sequential(MemberLinear(2, 4, 16), nn.ReLU()))


@pytest.mark.parametrize("members", [1, 2])
def test_activation_recorder_keeps_only_training_forwards_of_its_own_model(members):
    torch.manual_seed(0)
    model = QNetwork("mlp", members=members)
    target = copy.deepcopy(model)
    recorder = ActivationRecorder(model, only_with_grad=True)
    x, other = torch.rand(members, 4, 1, 28, 28), torch.rand(members, 4, 1, 28, 28)
    model(x)
    recorded = {k: v.clone() for k, v in recorder.post.items()}
    assert set(recorded) == {"torso.1", "torso.4"}
    with torch.no_grad():
        model(other)  # acting / target computation: ignored
    target(other)  # the deep-copied target has its own modules: ignored
    for name, value in recorder.post.items():
        assert torch.equal(value, recorded[name])
    # A one-member torso runs its layers on [B, ...] (Torso.forward takes the member dim off and back).
    inputs = x.squeeze(0) if members == 1 else x
    expected = torch.relu(model.torso[1](model.torso[0](inputs)))
    expected = expected.unsqueeze(0) if members == 1 else expected
    assert expected.shape == (members, 4, 256)  # member-first, as the recorder keeps it
    assert torch.equal(recorder.post["torso.1"], expected)
    recorder.remove()
    model(other)
    assert all(torch.equal(value, recorded[name]) for name, value in recorder.post.items())  # removed: no hooks


def test_activation_recorder_of_an_ordinary_model_is_member_first_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.rand(4, 5)
    with ActivationRecorder(model, preactivations=True) as recorder:
        model(x)
    pre = model[1](model[0](x))
    assert recorder.pre["0"].shape == (1, 4, 6) and torch.equal(recorder.pre["0"][0], pre)
    assert recorder.post["0"].shape == (1, 4, 6) and torch.equal(recorder.post["0"][0], torch.relu(pre))


@pytest.mark.parametrize("name, shape", [("nature_cnn", (4, 84, 84)), ("mlp", (1, 28, 28)), ("cnn", (3, 32, 32))])
def test_check_torso_accepts_what_the_torso_processes(name, shape):
    check_torso(name, shape)  # no error, and nothing allocated: built on the meta device


def test_check_torso_errors_say_why():
    with pytest.raises(ValueError, match=r"nature_cnn cannot process observations of shape \(1, 28, 28\)"):
        check_torso("nature_cnn", (1, 28, 28))  # three convolutions shrink 28x28 to nothing
    with pytest.raises(ValueError, match="needs image observations"):
        check_torso("nature_cnn", (784,))
    with pytest.raises(ValueError, match="needs image observations"):
        check_torso("cnn", (10,))
    with pytest.raises(ValueError, match="unknown network 'resnet'"):
        check_torso("resnet", (3, 32, 32))
    with pytest.raises(ValueError, match="unknown network"):
        build_torso("resnet", (3, 32, 32))


def test_reinit_rows_redraws_only_those_rows_in_place():
    torch.manual_seed(0)
    layer = nn.Linear(50, 8)
    weight, bias = layer.weight, layer.bias
    before_w, before_b = weight.detach().clone(), bias.detach().clone()
    rows = torch.tensor([1, 5])
    reinit_(layer, units=rows, random=torch.Generator().manual_seed(3))
    assert layer.weight is weight and layer.bias is bias  # same Parameters: the optimiser keeps them
    keep = torch.tensor([i not in (1, 5) for i in range(8)])
    assert torch.equal(layer.weight[keep], before_w[keep]) and torch.equal(layer.bias[keep], before_b[keep])
    assert not torch.equal(layer.weight[rows], before_w[rows])
    assert torch.equal(layer.bias[rows], torch.zeros(2))
    assert layer.weight[rows].abs().max() <= 1 / math.sqrt(50)
    # A 1-D bool mask names the same units as the index.
    again = nn.Linear(50, 8)
    with torch.no_grad():
        again.weight.copy_(before_w)
        again.bias.copy_(before_b)
    reinit_(again, units=keep.logical_not(), random=torch.Generator().manual_seed(3))
    assert torch.equal(again.weight, layer.weight) and torch.equal(again.bias, layer.bias)


def test_reinit_whole_layer_follows_pytorch_default_distribution_and_generator():
    layer = nn.Conv2d(3, 64, 3)
    reinit_(layer, random=torch.Generator().manual_seed(1))
    bound = 1 / math.sqrt(3 * 3 * 3)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert layer.weight.abs().max() > 0.95 * bound  # uniform on the full range, not a narrower one
    # Uniform(-b, b) has variance b²/3, as PyTorch's kaiming_uniform_(a=√5) default.
    assert abs(layer.weight.var().item() - bound**2 / 3) < 0.1 * bound**2 / 3
    again = nn.Conv2d(3, 64, 3)
    reinit_(again, random=torch.Generator().manual_seed(1))
    assert torch.equal(layer.weight, again.weight) and torch.equal(layer.bias, again.bias)
    assert not torch.equal(layer.bias, torch.zeros_like(layer.bias))  # the whole layer: a fresh bias, not zeros


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_reinit_whole_member_layer_draws_each_member_from_its_stream(kind):
    seeds = [4, 5, 6]

    def make(members):
        if kind == "linear":
            return MemberLinear(members, 30, 12)
        return MemberConv2d(members, 3, 12, 3)

    layer = make(3)
    parameters = [p for p in layer.parameters()]
    reinit_(layer, random=MemberRandom(seeds))
    assert list(layer.parameters()) == parameters  # in place
    bound = 1 / math.sqrt(weight_view(layer)[0, 0].numel())
    assert weight_view(layer).abs().max() <= bound and bias_view(layer).abs().max() <= bound
    assert weight_view(layer).abs().max() > 0.9 * bound
    for k, seed in enumerate(seeds):
        single = make(1)
        reinit_(single, random=MemberRandom([seed]))
        assert torch.equal(weight_view(layer)[k], weight_view(single)[0])
        assert torch.equal(bias_view(layer)[k], bias_view(single)[0])
    assert not torch.equal(weight_view(layer)[0], weight_view(layer)[1])


def test_reinit_member_mask_redraws_masked_rows_per_member():
    seeds = [10, 11, 12]
    layer = MemberLinear(3, 20, 6, generators=init_generators([0, 1, 2]))
    before_w, before_b = weight_view(layer).detach().clone(), bias_view(layer).detach().clone()
    mask = torch.tensor([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    reinit_(layer, units=mask, random=MemberRandom(seeds))
    after_w, after_b = weight_view(layer), bias_view(layer)
    assert torch.equal(after_w[~mask], before_w[~mask]) and torch.equal(after_b[~mask], before_b[~mask])
    assert (after_w[mask] != before_w[mask]).all()
    assert torch.equal(after_b[mask], torch.zeros(int(mask.sum())))
    for k, seed in enumerate(seeds):
        single = MemberLinear(1, 20, 6, generators=init_generators([k]))
        assert torch.equal(weight_view(single)[0], before_w[k])
        reinit_(single, units=mask[k], random=MemberRandom([seed]))  # 1-D mask of the one member
        assert torch.equal(weight_view(single)[0], after_w[k]) and torch.equal(bias_view(single)[0], after_b[k])
        fresh = fresh_weights(MemberLinear(1, 20, 6), MemberRandom([seed]))[0]
        assert torch.equal(after_w[k][mask[k]], fresh[mask[k]])  # the rows of the member's fresh draw


def test_unit_mask_accepts_masks_and_one_member_indices_only():
    mask = torch.tensor([[True, False, True]])
    assert torch.equal(unit_mask(mask, 1, 3, torch.device("cpu")), mask)
    assert torch.equal(unit_mask(torch.tensor([0, 2]), 1, 3, torch.device("cpu")), mask)
    with pytest.raises(ValueError, match="bool mask of shape"):
        unit_mask(torch.tensor([0, 2]), 2, 3, torch.device("cpu"))  # an index is ambiguous for a population
    with pytest.raises(ValueError, match="bool mask of shape"):
        unit_mask(torch.ones(2, 4, dtype=torch.bool), 2, 3, torch.device("cpu"))


@pytest.mark.parametrize("name, shape", [("nature_cnn", (4, 84, 84)), ("mlp", (1, 28, 28)), ("cnn", (3, 32, 32))])
@pytest.mark.parametrize("members", [1, 2])
def test_scale_pixels_is_x_over_255_in_the_torso_layout(name, shape, members):
    torso = build_torso(name, shape, members=members)
    # Channels-last only for a single conv network (the grouped convolution of a population is NCHW).
    assert torso.channels_last == (name != "mlp" and members == 1)
    pixels = torch.randint(0, 256, (members, 5, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scaled = torso.scale_pixels(pixels)
    assert scaled.dtype == torch.float32 and scaled.shape == pixels.shape
    assert torch.equal(scaled, pixels.float() / 255.0)  # bit for bit the same values
    layout = torch.channels_last if torso.channels_last else torch.contiguous_format
    assert scaled[0].is_contiguous(memory_format=layout)
    assert torch.equal(torso(scaled), torso(pixels.float() / 255.0))


@pytest.mark.parametrize("name", ["nature_cnn", "cnn"])
def test_channels_last_and_default_layout_compute_the_same_function(name):
    torch.manual_seed(0)
    torso = build_torso(name, TORSOS[name])
    assert torso.channels_last and all(m.channels_last for m in torso if isinstance(m, MemberConv2d))
    x = torch.rand(1, 3, *TORSOS[name])
    fast = torso(torso.scale_pixels(x * 255))
    default = copy.deepcopy(torso).use_default_layout_()
    assert not default.channels_last and not any(m.channels_last for m in default if isinstance(m, MemberConv2d))
    slow = default(default.scale_pixels(x * 255))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_scale_pixels_never_scales_the_callers_tensor():
    torso = build_torso("cnn", (3, 32, 32))
    images = torch.rand(1, 2, 3, 32, 32) * 255
    before = images.clone()
    torso.scale_pixels(images)
    assert torch.equal(images, before)


@pytest.mark.parametrize("name", TORSOS)
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("members", [1, 2])
def test_torso_precision_runs_only_the_torso_in_bfloat16(name, layer_norm, members):
    """--bf16: weight layers compute in bfloat16 inside the block; features, head and gradients stay float32."""
    from plasticity.networks import torso_precision

    torch.manual_seed(0)
    model = QNetwork(name, layer_norm=layer_norm, members=members)
    x = torch.rand(members, 8, *TORSOS[name])
    layer_dtypes = []
    handles = [m.register_forward_hook(lambda m, i, out: layer_dtypes.append(out.dtype))
               for m in model.torso if isinstance(m, WEIGHTS)]
    full = model(x)
    assert set(layer_dtypes) == {torch.float32}
    layer_dtypes.clear()
    with torso_precision(torch.bfloat16):
        features = model.torso(x)
        low = model.head(features)
    assert set(layer_dtypes) == {torch.bfloat16}
    assert features.dtype == low.dtype == torch.float32
    # Same function to bfloat16 accuracy (8 mantissa bits per layer), not the same numbers.
    assert not torch.equal(low, full)
    torch.testing.assert_close(low, full, rtol=0.05, atol=0.05 * full.abs().max().item())
    low.square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.dtype == torch.float32
               for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.torso.parameters())
    # Outside the block (acting, diagnostics) the torso is float32 again.
    layer_dtypes.clear()
    assert torch.equal(model(x), full) and set(layer_dtypes) == {torch.float32}
    for handle in handles:
        handle.remove()


def test_torso_precision_none_is_a_no_op():
    from plasticity.networks import torso_precision

    model = QNetwork("nature_cnn")
    x = torch.rand(1, 4, *TORSOS["nature_cnn"])
    outside = model(x)
    with torso_precision(None):
        inside = model(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)
