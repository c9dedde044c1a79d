"""Torsos (pitfall 9, property 1.1 of methods.md), the layer map, the activation recorder and reinit_."""

import copy
import math

import pytest
import torch
from torch import nn

from plasticity.networks import ActivationRecorder, build_torso, layer_map, reinit_

TORSOS = {"nature_cnn": (4, 84, 84), "mlp": (1, 28, 28), "cnn": (3, 32, 32)}

# Expected module sequence of every torso: LN (when on) sits between the weight layer and its ReLU.
SEQUENCES = {
    "nature_cnn": ["Conv2d", "LN", "ReLU", "Conv2d", "LN", "ReLU", "Conv2d", "LN", "ReLU", "Flatten",
                   "Linear", "LN", "ReLU"],
    "mlp": ["Flatten", "Linear", "LN", "ReLU", "Linear", "LN", "ReLU"],
    "cnn": ["Conv2d", "LN", "ReLU", "Conv2d", "LN", "ReLU", "Flatten", "Linear", "LN", "ReLU"],
}


class QNetwork(nn.Module):
    """The agents' Q-network shape: torso then head, registered in forward order."""

    def __init__(self, name: str, layer_norm: bool = False, n_actions: int = 3):
        super().__init__()
        self.torso = build_torso(name, TORSOS[name], layer_norm=layer_norm)
        self.head = nn.Linear(self.torso.out_features, n_actions)

    def forward(self, x):
        return self.head(self.torso(x))


@pytest.mark.parametrize("name", TORSOS)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_torso_module_sequence_keeps_every_relu(name, layer_norm):
    """Pitfall 9: a LayerNorm variant must not drop the activation after the norm."""
    torso = build_torso(name, TORSOS[name], layer_norm=layer_norm)
    expected = [m if layer_norm or m != "LN" else "Identity" for m in SEQUENCES[name]]
    got = ["LN" if isinstance(m, nn.LayerNorm) else type(m).__name__ for m in torso]
    assert got == expected
    modules = list(torso)
    for i, module in enumerate(modules):
        if isinstance(module, nn.LayerNorm):
            assert isinstance(modules[i + 1], nn.ReLU), "every LayerNorm must be followed by a ReLU"
            assert module.elementwise_affine
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    assert not isinstance(modules[-1], (nn.Linear, nn.Conv2d, nn.LayerNorm)), "no norm/linear after the last ReLU"


def test_conv_layer_norm_covers_channels_height_width():
    torso = build_torso("nature_cnn", (4, 84, 84), layer_norm=True)
    shapes = [tuple(m.normalized_shape) for m in torso if isinstance(m, nn.LayerNorm)]
    assert shapes == [(32, 20, 20), (64, 9, 9), (64, 7, 7), (512,)]


def test_nature_cnn_architecture():
    torso = build_torso("nature_cnn", (4, 84, 84))
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in torso if isinstance(m, nn.Conv2d)]
    assert convs == [(4, 32, (8, 8), (4, 4)), (32, 64, (4, 4), (2, 2)), (64, 64, (3, 3), (1, 1))]
    assert torso(torch.zeros(2, 4, 84, 84)).shape == (2, 512)
    assert torso[-3].in_features == 64 * 7 * 7


@pytest.mark.parametrize("name", TORSOS)
@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e3])
def test_layer_norm_preactivations_are_standardised(name, scale):
    """Property 1.1: per sample, the normalised pre-activations have mean 0 and variance 1 before γ/β.

    Exactly: variance v/(v + eps) with v the variance of the raw pre-activation, which is 1 up to
    eps/v -- so ≈ 1 whatever the input scale once v ≫ eps.
    """
    torch.manual_seed(0)
    model = QNetwork(name, layer_norm=True)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    with torch.no_grad():
        for norm in norms:  # non-trivial γ/β, undone below: the property is about the values before them
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    raw = {}
    handles = [m.register_forward_hook(lambda mod, inp, out: raw.__setitem__(mod, out.detach()))
               for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    x = torch.rand(8, *TORSOS[name]) * scale
    with ActivationRecorder(model, preactivations=True) as recorder:
        model(x)
    for handle in handles:
        handle.remove()
    for hidden in layer_map(model).hidden:
        norm = hidden.norm
        standardised = ((recorder.pre[hidden.name] - norm.bias) / norm.weight).flatten(1)
        raw_variance = raw[hidden.layer].flatten(1).var(1, unbiased=False)
        torch.testing.assert_close(standardised.mean(1), torch.zeros(8), atol=1e-4, rtol=0)
        torch.testing.assert_close(standardised.var(1, unbiased=False), raw_variance / (raw_variance + norm.eps),
                                   atol=1e-4, rtol=1e-4)
        if scale >= 1.0:
            torch.testing.assert_close(standardised.var(1, unbiased=False), torch.ones(8), atol=2e-3, rtol=0)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_layer_map_of_nature_cnn_q_network(layer_norm):
    model = QNetwork("nature_cnn", layer_norm=layer_norm)
    layers = layer_map(model)
    # The same names with and without LN, so per-layer curves of both variants line up.
    assert [h.name for h in layers.hidden] == ["torso.0", "torso.3", "torso.6", "torso.10"]
    assert layers.output is model.head and layers.output_name == "head"
    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert [h.layer for h in layers.hidden] == weight_layers[:-1]
    assert [h.next_layer for h in layers.hidden] == weight_layers[1:]
    assert [h.spatial for h in layers.hidden] == [1, 1, 49, 1]
    assert [h.num_units for h in layers.hidden] == [32, 64, 64, 512]
    for hidden in layers.hidden:
        assert (hidden.norm is not None) == layer_norm
        assert isinstance(hidden.activation, nn.ReLU)
    expected_ordered = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm))]
    assert [m for _, m in layers.ordered] == expected_ordered


def test_layer_map_rejects_hidden_layer_without_activation():
    """Pitfall 9 guard: LN(16) with no ReLU after it is reported, not silently treated as hidden."""
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 2))
    with pytest.raises(ValueError, match="no ReLU"):
        layer_map(model)
    with pytest.raises(ValueError, match="output layer"):
        layer_map(nn.Sequential(nn.Linear(4, 16), nn.ReLU()))


def test_activation_recorder_keeps_only_training_forwards_of_its_own_model():
    torch.manual_seed(0)
    model = QNetwork("mlp")
    target = copy.deepcopy(model)
    recorder = ActivationRecorder(model, only_with_grad=True)
    x, other = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    model(x)
    recorded = {k: v.clone() for k, v in recorder.post.items()}
    with torch.no_grad():
        model(other)  # acting / target computation: ignored
    target(other)  # the deep-copied target has its own modules: ignored
    for name, value in recorder.post.items():
        assert torch.equal(value, recorded[name])
    expected = torch.relu(model.torso[1](model.torso[0](x)))
    assert torch.equal(recorder.post["torso.1"], expected)
    recorder.remove()


def test_reinit_rows_redraws_only_those_rows_in_place():
    torch.manual_seed(0)
    layer = nn.Linear(50, 8)
    weight, bias = layer.weight, layer.bias
    before_w, before_b = weight.detach().clone(), bias.detach().clone()
    rows = torch.tensor([1, 5])
    reinit_(layer, rows=rows, generator=torch.Generator().manual_seed(3))
    assert layer.weight is weight and layer.bias is bias  # same Parameters: the optimiser keeps them
    keep = torch.tensor([i not in (1, 5) for i in range(8)])
    assert torch.equal(layer.weight[keep], before_w[keep]) and torch.equal(layer.bias[keep], before_b[keep])
    assert not torch.equal(layer.weight[rows], before_w[rows])
    assert torch.equal(layer.bias[rows], torch.zeros(2))
    assert layer.weight[rows].abs().max() <= 1 / math.sqrt(50)


def test_reinit_whole_layer_follows_pytorch_default_distribution_and_generator():
    layer = nn.Conv2d(3, 64, 3)
    reinit_(layer, generator=torch.Generator().manual_seed(1))
    bound = 1 / math.sqrt(3 * 3 * 3)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert layer.weight.abs().max() > 0.95 * bound  # uniform on the full range, not a narrower one
    # Uniform(-b, b) has variance b²/3, as PyTorch's kaiming_uniform_(a=√5) default.
    assert abs(layer.weight.var().item() - bound**2 / 3) < 0.1 * bound**2 / 3
    again = nn.Conv2d(3, 64, 3)
    reinit_(again, generator=torch.Generator().manual_seed(1))
    assert torch.equal(layer.weight, again.weight) and torch.equal(layer.bias, again.bias)


@pytest.mark.parametrize("name, shape", [("nature_cnn", (4, 84, 84)), ("mlp", (1, 28, 28)), ("cnn", (3, 32, 32))])
def test_scale_pixels_is_x_over_255_in_the_torso_layout(name, shape):
    torso = build_torso(name, shape)
    pixels = torch.randint(0, 256, (5, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scaled = torso.scale_pixels(pixels)
    assert scaled.dtype == torch.float32
    assert torch.equal(scaled, pixels.float() / 255.0)  # bit for bit the same values
    layout = torch.channels_last if torso.channels_last else torch.contiguous_format
    assert scaled.is_contiguous(memory_format=layout)
    assert torch.equal(torso(scaled), torso(pixels.float() / 255.0))


def test_scale_pixels_never_scales_the_callers_tensor():
    torso = build_torso("cnn", (3, 32, 32))
    images = torch.rand(2, 3, 32, 32) * 255
    before = images.clone()
    torso.scale_pixels(images)
    assert torch.equal(images, before)


@pytest.mark.parametrize("name", TORSOS)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_torso_precision_runs_only_the_torso_in_bfloat16(name, layer_norm):
    """--bf16: weight layers compute in bfloat16 inside the block; features, head and gradients stay float32."""
    from plasticity.networks import torso_precision

    torch.manual_seed(0)
    model = QNetwork(name, layer_norm=layer_norm)
    x = torch.rand(8, *TORSOS[name])
    layer_dtypes = []
    handles = [m.register_forward_hook(lambda m, i, out: layer_dtypes.append(out.dtype))
               for m in model.torso if isinstance(m, (nn.Linear, nn.Conv2d))]
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
    x = torch.rand(4, *TORSOS["nature_cnn"])
    outside = model(x)
    with torso_precision(None):
        inside = model(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)
