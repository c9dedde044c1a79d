"""CReLU and Deep Fourier Features (methods-v2.md §8): width modes, properties 8.1-8.4, and the paired units of
ReDo and CBP (a unit i has the outputs i and i + n)."""

import copy

import pytest
import torch
from torch import nn

from plasticity.cbp import ContinualBackprop
from plasticity.diagnostics import Diagnostics, unit_stats
from plasticity.networks import (
    DFF,
    ActivationRecorder,
    CReLU,
    build_torso,
    check_torso,
    init_generators,
    is_homogeneous,
    layer_map,
)
from plasticity.population import MemberConv2d, MemberLayerNorm, MemberLinear, as_weight_view, weight_view
from plasticity.resets import ReDo, dormant_scores, next_layer_columns, outgoing_mask, reinitialize_units_
from plasticity.streams import MemberRandom

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(torso):
    return [(type(m), tuple(weight_view(m).shape[1:])) for m in torso if isinstance(m, (MemberLinear, MemberConv2d))]


# ---- 8.1: layer shapes follow the width mode ------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["crelu", "dff"])
def test_nature_cnn_shapes_follow_the_width_mode(activation):
    with torch.device("meta"):
        double = build_torso("nature_cnn", (4, 84, 84), layer_norm=True, activation=activation)
        halve = build_torso("nature_cnn", (4, 84, 84), layer_norm=True, activation=activation,
                            activation_width="halve")
    assert _weights(double) == [(MemberConv2d, (32, 4, 8, 8)), (MemberConv2d, (64, 64, 4, 4)),
                                (MemberConv2d, (64, 128, 3, 3)), (MemberLinear, (512, 6272))]
    assert double.out_features == 1024
    assert _weights(halve) == [(MemberConv2d, (16, 4, 8, 8)), (MemberConv2d, (32, 32, 4, 4)),
                               (MemberConv2d, (32, 64, 3, 3)), (MemberLinear, (256, 3136))]
    assert halve.out_features == 512
    # LN on the n pre-activations, then the activation: Linear/Conv -> LN -> act, module slots as with ReLU.
    norms = [m.normalized_shape for m in double if isinstance(m, MemberLayerNorm)]
    assert norms == [(32, 20, 20), (64, 9, 9), (64, 7, 7), (512,)]
    kind = CReLU if activation == "crelu" else DFF
    assert [type(double[i]) for i in (2, 5, 8, 12)] == [kind] * 4
    assert [double[i].dim for i in (2, 5, 8, 12)] == [-3, -3, -3, -1]
    assert [type(double[i]) for i in (1, 4, 7, 11)] == [MemberLayerNorm] * 4


@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize("width", ["double", "halve"])
def test_mlp_and_small_cnn_shapes_and_forward(width, members):
    mlp = build_torso("mlp", (5,), hidden_sizes=(8, 6), activation="crelu", activation_width=width, members=members)
    cnn = build_torso("cnn", (1, 8, 8), activation="dff", activation_width=width, members=members)
    if width == "double":
        assert [shape for _, shape in _weights(mlp)] == [(8, 5), (6, 16)] and mlp.out_features == 12
        assert [shape for _, shape in _weights(cnn)] == [(32, 1, 3, 3), (64, 64, 3, 3), (256, 64 * 2 * 2 * 2)]
        assert cnn.out_features == 512
    else:
        assert [shape for _, shape in _weights(mlp)] == [(4, 5), (3, 8)] and mlp.out_features == 6
        assert [shape for _, shape in _weights(cnn)] == [(16, 1, 3, 3), (32, 32, 3, 3), (128, 64 * 2 * 2)]
        assert cnn.out_features == 256
    assert mlp(torch.randn(members, 3, 5)).shape == (members, 3, mlp.out_features)
    assert cnn(torch.randn(members, 3, 1, 8, 8)).shape == (members, 3, cnn.out_features)


def test_bad_activation_arguments_raise():
    with pytest.raises(ValueError, match="even"):
        build_torso("mlp", (5,), hidden_sizes=(8, 7), activation="crelu", activation_width="halve")
    with pytest.raises(ValueError, match="--activation"):
        build_torso("mlp", (5,), activation="tanh")
    with pytest.raises(ValueError, match="--activation-width"):
        build_torso("mlp", (5,), activation="crelu", activation_width="quarter")
    with pytest.raises(ValueError, match="even"):
        check_torso("mlp", (5,), hidden_sizes=(3,), activation="dff", activation_width="halve")
    with pytest.raises(ValueError, match="dim"):
        CReLU(dim=1)


def test_relu_default_is_unchanged_by_the_width_flag():
    """ReLU ignores --activation-width: the same modules and the same init draws as the default."""
    default = build_torso("cnn", (1, 8, 8), layer_norm=True, members=2, generators=init_generators([1, 2]))
    explicit = build_torso("cnn", (1, 8, 8), layer_norm=True, members=2, generators=init_generators([1, 2]),
                           activation="relu", activation_width="halve")
    assert repr(default) == repr(explicit)
    assert all(type(default[i]) is nn.ReLU for i in (2, 5, 9))
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))


@pytest.mark.parametrize("activation", ["crelu", "dff"])
def test_a_population_member_computes_its_single_network(activation):
    """The concat axis counted from the end: one member runs on [B, C, H, W] (channels-last), several on
    [M, B, C, H, W]; member 1 of a population equals the one-member torso of its seed."""
    population = build_torso("cnn", (2, 8, 8), layer_norm=True, activation=activation, members=2,
                             generators=init_generators([3, 4]))
    single = build_torso("cnn", (2, 8, 8), layer_norm=True, activation=activation, generators=init_generators([4]))
    x = torch.randn(2, 5, 2, 8, 8)
    torch.testing.assert_close(population(x)[1], single(x[1:])[0], atol=1e-5, rtol=1e-5)


def test_layer_map_and_recorder_see_paired_outputs():
    torso = build_torso("nature_cnn", (4, 84, 84), activation="crelu")
    model = nn.Sequential(torso, MemberLinear(1, torso.out_features, 3))
    hidden = layer_map(model).hidden
    assert [h.num_units for h in hidden] == [32, 64, 64, 512]
    assert [h.num_outputs for h in hidden] == [64, 128, 128, 1024]
    assert [h.spatial for h in hidden] == [1, 1, 49, 1]
    assert [h.next_layer for h in hidden][-1] is model[1]
    small = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), CReLU(), nn.Linear(8, 2))
    with ActivationRecorder(small, preactivations=True) as recorder:
        small(torch.randn(6, 3))
    pre, post = recorder.pre["0"], recorder.post["0"]
    assert pre.shape == (1, 6, 4) and post.shape == (1, 6, 8)
    assert torch.equal(post, torch.cat((pre.relu(), (-pre).relu()), dim=-1))


# ---- 8.2 and 8.3: the activations -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, dim", [((2, 7, 5), -1), ((7, 5), -1), ((2, 3, 5, 4, 4), -3), ((3, 5, 4, 4), -3)])
def test_crelu_has_exactly_one_non_zero_half_unless_z_is_zero(shape, dim):
    z = torch.randn(*shape)
    z[z.abs() < 0.3] = 0.0  # some exact zeros
    out = CReLU(dim=dim)(z)
    positive, negative = out.chunk(2, dim=dim)
    assert positive.shape == z.shape
    assert torch.equal((positive != 0) ^ (negative != 0), z != 0)  # exactly one non-zero half where z != 0
    assert torch.equal((positive == 0) & (negative == 0), z == 0)
    assert torch.equal(positive - negative, z) and bool((out >= 0).all())
    sin, cos = DFF(dim=dim)(z).chunk(2, dim=dim)
    assert torch.equal(sin, torch.sin(z)) and torch.equal(cos, torch.cos(z))


def test_crelu_is_homogeneous_and_dff_is_not():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=generator)
    c = torch.rand(64, 1, generator=generator) * 5 + 0.1
    crelu, dff = CReLU(), DFF()
    torch.testing.assert_close(crelu(c * z), c * crelu(z))
    assert not torch.allclose(dff(c * z), c * dff(z), atol=1e-2)
    assert CReLU.homogeneous and not DFF.homogeneous
    assert is_homogeneous(nn.ReLU()) and is_homogeneous(crelu) and not is_homogeneous(dff)


# ---- 8.4: diagnostics on constructed activations ----------------------------------------------------------------

def _constructed_model():
    """Layer "0" (CReLU, 5 units) with z known exactly on the batch of ``_constructed_obs``:
    unit 0: z = 1; unit 1: z = −1; unit 2: z ≡ 0; unit 3: z = ±1 (changes sign); unit 4: z ∈ {0, 2}."""
    model = nn.Sequential(nn.Linear(2, 5), CReLU(), nn.Linear(10, 3), DFF(), nn.Linear(6, 4), nn.ReLU(),
                          nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]))
        model[0].bias.zero_()
    return model


def _constructed_obs(n=16):
    signs = torch.tensor([1.0, -1.0]).repeat(n // 2)  # exactly balanced: mean x_0 = 0
    return torch.stack((signs, torch.ones(n)), dim=1)


def test_crelu_unit_stats_follow_the_definitions():
    z = _constructed_model()[0](_constructed_obs())
    stats = unit_stats(z, CReLU()(z), dormant_tau=0.1, activation="crelu")
    # Halves 0-4 = ReLU(z), 5-9 = ReLU(−z).  Dead: 1, 2 (z ≤ 0 everywhere) and 5, 7, 9 (−z ≤ 0: units 0, 2, 4).
    assert stats["dead"].item() == 5 and stats["num_halves"].item() == 10 and stats["num_units"].item() == 5
    assert stats["linearized"].item() == 2  # half 0 (z = 1 > 0) and half 6 (−z = 1 > 0); unit 4 has z = 0 too
    assert stats["dead_pair"].item() == 1  # unit 2
    assert stats["sign_constant"].item() == 4  # every unit but 3
    # Pair activity E|z|: 1, 1, 0, 1, 1 -> scores 1.25 ×4 and 0: one dormant unit (a per-half score would say 5).
    assert stats["dormant"].item() == 1


def test_crelu_conv_unit_stats_use_every_position():
    pre = torch.ones(4, 3, 2, 2)
    pre[:, 2] = 0.0  # a dead pair
    pre[1, 1, 0, 1] = -1.0  # channel 1 is positive except at one sample and position
    stats = unit_stats(pre, CReLU(dim=-3)(pre), activation="crelu")
    assert stats["linearized"].item() == 1 and stats["sign_constant"].item() == 2
    assert stats["dead"].item() == 3 and stats["dead_pair"].item() == 1  # halves 2 and 5 (channel 2), 3 (−channel 0)
    with pytest.raises(ValueError, match="twice"):
        unit_stats(pre, pre.relu(), activation="crelu")


def test_diagnostics_tags_and_totals_with_crelu_and_dff_layers():
    model = _constructed_model()
    obs = _constructed_obs()
    values = Diagnostics(model).measure(obs)
    tag = "plasticity/"
    assert values[tag + "dead_frac/0"].item() == pytest.approx(0.5)
    assert values[tag + "linearized_frac/0"].item() == pytest.approx(0.2)
    assert values[tag + "dead_pair_frac/0"].item() == pytest.approx(0.2)
    assert values[tag + "sign_constant_frac/0"].item() == pytest.approx(0.8)
    assert values[tag + "dormant_frac/0"].item() == pytest.approx(0.2)
    # DFF: no dead/linearized, dormant on the pair score E|sin z| + E|cos z|.
    assert {tag + "dead_frac/2", tag + "linearized_frac/2", tag + "dead_pair_frac/2"}.isdisjoint(values)
    with ActivationRecorder(model, preactivations=True) as recorder:
        model(obs)
    dff_dormant = (dormant_scores(recorder.post["2"], 2) <= 0.1).sum().item()
    assert values[tag + "dormant_frac/2"].item() == pytest.approx(dff_dormant / 3)
    relu = unit_stats(recorder.pre["4"][0], recorder.post["4"][0])
    assert values[tag + "dead_frac/4"].item() == pytest.approx(relu["dead"].item() / 4)
    # Totals: dead/linearized over the halves and units of the layers that define them (DFF left out).
    torch.testing.assert_close(values[tag + "dead_frac"].item(), (5 + relu["dead"].item()) / (10 + 4))
    torch.testing.assert_close(values[tag + "linearized_frac"].item(), (2 + relu["linearized"].item()) / (10 + 4))
    torch.testing.assert_close(values[tag + "dormant_frac"].item(), (1 + dff_dormant + relu["dormant"].item()) / 12)
    assert values[tag + "dead_pair_frac"].item() == pytest.approx(0.2) and values[tag + "sign_constant_frac"].item() == pytest.approx(0.8)
    only_dff = nn.Sequential(nn.Linear(2, 4), DFF(), nn.Linear(8, 2))
    values = Diagnostics(only_dff).measure(obs)
    assert tag + "dead_frac" not in values and tag + "linearized_frac" not in values and tag + "dormant_frac" in values


# ---- ReDo and CBP on paired units ------------------------------------------------------------------------------

def test_dormant_scores_sum_the_two_halves():
    h = torch.tensor([[[0.0, 1.0, 3.0, 0.0], [0.0, 3.0, 1.0, 0.0]]])  # [1, B=2, 2n=4]: n = 2
    # unit 0: E|h_0| + E|h_2| = 0 + 2; unit 1: 2 + 0 -> both score 1 (per half: 0, 2, 2, 0)
    torch.testing.assert_close(dormant_scores(h, 2), torch.ones(1, 2))
    conv = torch.zeros(1, 2, 4, 2, 2)  # C = 2, channels c and c + 2
    conv[:, :, 3] = 2.0
    torch.testing.assert_close(dormant_scores(conv, 2), torch.tensor([[0.0, 2.0]]))


def test_next_layer_columns_cover_both_halves():
    conv_linear = nn.Sequential(nn.Conv2d(2, 3, 3), CReLU(dim=-3), nn.Flatten(), nn.Linear(54, 4), nn.ReLU(),
                                nn.Linear(4, 2))
    hidden = layer_map(conv_linear).hidden[0]
    assert hidden.spatial == 9
    columns = next_layer_columns(hidden, torch.tensor([1]))
    assert columns.nonzero()[:, 1].tolist() == [*range(9, 18), *range(36, 45)]
    cnn = build_torso("cnn", (1, 8, 8), activation="crelu")
    conv_conv = layer_map(nn.Sequential(cnn, MemberLinear(1, cnn.out_features, 2))).hidden[0]
    mask = torch.zeros(1, 32, dtype=torch.bool)
    mask[0, 3] = True
    assert next_layer_columns(conv_conv, mask).nonzero()[:, 1].tolist() == [3, 35]
    assert outgoing_mask(conv_conv, mask).shape == (1, 1, 64, 1, 1)


def _adam_with_state(model, x):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x).square().sum().backward()
    optimizer.step()
    return optimizer


def test_redo_resets_a_dead_pair_and_keeps_a_one_sided_unit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), CReLU(), nn.Linear(8, 5), CReLU(), nn.Linear(10, 2))
    x = torch.randn(32, 3)
    optimizer = _adam_with_state(model, x)
    with torch.no_grad():
        model[0].weight[1:3] = 0.0
        model[0].bias[1], model[0].bias[2] = 0.0, 1.0  # unit 1: z ≡ 0 (both halves dead); unit 2: z ≡ 1
    before = copy.deepcopy(model)
    count = ReDo(model, optimizer, tau=0.0).reset(x)
    assert count.tolist() == [1]
    w0, w1 = model[0].weight, model[2].weight
    assert not torch.equal(w0[1], before[0].weight[1]) and model[0].bias[1].item() == 0.0
    keep_rows = [0, 2, 3]
    assert torch.equal(w0[keep_rows], before[0].weight[keep_rows])
    assert torch.equal(model[0].bias[keep_rows], before[0].bias[keep_rows])
    assert bool((w1[:, [1, 5]] == 0).all())  # both halves' outgoing columns
    keep_columns = [0, 2, 3, 4, 6, 7]
    assert torch.equal(w1[:, keep_columns], before[2].weight[:, keep_columns])
    assert torch.equal(model[2].bias, before[2].bias) and torch.equal(model[4].weight, before[4].weight)
    for key in ("exp_avg", "exp_avg_sq"):
        state1, state0 = optimizer.state[model[2].weight][key], optimizer.state[model[0].weight][key]
        assert bool((state1[:, [1, 5]] == 0).all()) and bool((state1[:, keep_columns] != 0).all())
        assert bool((state0[1] == 0).all()) and bool(optimizer.state[model[0].bias][key][1] == 0)


def _crelu_population(members, seeds):
    generators = init_generators(seeds)
    torso = build_torso("mlp", (5,), hidden_sizes=(6, 4), activation="crelu", members=members, generators=generators)
    return nn.Sequential(torso, MemberLinear(members, torso.out_features, 3, generators=generators))


def test_redo_on_a_two_member_crelu_population_matches_each_single_run():
    population = _crelu_population(2, [1, 2])
    x = torch.randn(2, 16, 5, generator=torch.Generator().manual_seed(3))
    dead = {0: 2, 1: 4}  # member k's dead-pair unit of the first layer
    first = population[0][1]
    with torch.no_grad():
        for k, unit in dead.items():
            first.weight[k, unit] = 0.0
            first.bias[k, unit] = 0.0
    singles = []
    for k in range(2):
        single = _crelu_population(1, [0])
        with torch.no_grad():
            for p, q in zip(single.parameters(), population.parameters()):
                p.copy_(q[k:k + 1])
        singles.append(single)
    optimizer = _adam_with_state(population, x)
    single_optimizers = [_adam_with_state(single, x[k:k + 1]) for k, single in enumerate(singles)]
    redo = ReDo(population, optimizer, tau=0.0, random=MemberRandom([7, 8]))
    masks = redo.dormant_masks(x)
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[0, 2] = expected[1, 4] = True
    assert torch.equal(masks["0.1"], expected) and not bool(masks["0.4"].any())
    before = weight_view(population[0][4]).clone()
    assert redo.reset(x).tolist() == [1, 1]
    after = weight_view(population[0][4])
    assert bool((after[0][:, [2, 8]] == 0).all()) and bool((after[1][:, [4, 10]] == 0).all())
    assert torch.equal(after[0][:, [4, 10]], before[0][:, [4, 10]]) and torch.equal(after[1][:, [2, 8]],
                                                                                       before[1][:, [2, 8]])
    for k, (single, single_optimizer) in enumerate(zip(singles, single_optimizers)):
        assert ReDo(single, single_optimizer, tau=0.0, random=MemberRandom([7 + k])).reset(x[k:k + 1]).tolist() == [1]
        for p, q in zip(single.parameters(), population.parameters()):
            torch.testing.assert_close(p[0], q[k], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(single_optimizer.state[p]["exp_avg"][0], optimizer.state[q]["exp_avg"][k],
                                       atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("activation", ["crelu", "dff"])
def test_cbp_utility_sums_both_halves(activation):
    act = CReLU() if activation == "crelu" else DFF()
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(8, 2))
    cbp = ContinualBackprop(model, None, replacement_rate=0.0, maturity=100, decay=0.9)
    with ActivationRecorder(model) as recorder:
        model(torch.randn(16, 3))
    h = recorder.post["0"][0]  # [B, 8]
    cbp.step()
    per_half = h.abs().mean(0) * model[2].weight.abs().sum(0)
    torch.testing.assert_close(cbp.stats[0].utility[0], 0.1 * (per_half[:4] + per_half[4:]))
    torch.testing.assert_close(cbp.stats[0].mean[0], 0.1 * h.mean(0))  # f per output (signed for DFF)


@pytest.mark.parametrize("conv", [False, True])
def test_cbp_replacement_touches_both_halves_and_corrects_the_bias_with_both(conv):
    torch.manual_seed(1)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 4, 3), CReLU(dim=-3), nn.Flatten(), nn.Linear(8 * 9, 3))
        x, spatial = torch.randn(16, 2, 5, 5), 9
    else:
        model = nn.Sequential(nn.Linear(3, 4), CReLU(), nn.Linear(8, 3))
        x, spatial = torch.randn(16, 3), 1
    optimizer = _adam_with_state(model, x)
    # maturity 0: all four units eligible after the first step; rate 1/4: exactly one replacement.
    cbp = ContinualBackprop(model, optimizer, replacement_rate=0.25, maturity=0, decay=0.9)
    with ActivationRecorder(model) as recorder:
        model(x)
    h = recorder.post["0"][0]
    before = copy.deepcopy(model)
    cbp.step()
    units = cbp.last_replaced["0"][0]
    assert units.sum().item() == 1
    unit = int(units.nonzero()[0, 0])
    mean_h = h.mean(dim=(0, 2, 3)) if conv else h.mean(0)  # f̂ after one step = this batch's mean
    w_next = before[-1].weight
    utility = (mean_h * w_next.abs().view(3, 8, spatial).sum((0, 2)))  # per half
    assert unit == int((utility[:4] + utility[4:]).argmin())
    columns = [*range(unit * spatial, (unit + 1) * spatial), *range((unit + 4) * spatial, (unit + 5) * spatial)]
    correction = w_next[:, columns] @ torch.cat((mean_h[unit].repeat(spatial), mean_h[unit + 4].repeat(spatial)))
    torch.testing.assert_close(model[-1].bias, before[-1].bias + correction)
    others = [c for c in range(8 * spatial) if c not in columns]
    assert bool((model[-1].weight[:, columns] == 0).all())
    assert torch.equal(model[-1].weight[:, others], w_next[:, others])
    rows = [r for r in range(4) if r != unit]
    assert not torch.equal(model[0].weight[unit], before[0].weight[unit]) and model[0].bias[unit].item() == 0.0
    assert torch.equal(model[0].weight[rows], before[0].weight[rows])
    moments = as_weight_view(model[-1], optimizer.state[model[-1].weight]["exp_avg"])[0]
    assert bool((moments[:, columns] == 0).all()) and bool((moments[:, others] != 0).all())
    stats = cbp.stats[0]
    assert stats.mean.shape == (1, 8) and stats.mean[0, unit].item() == 0 and stats.mean[0, unit + 4].item() == 0
    reinitialize_units_(layer_map(model).hidden[0], torch.tensor([unit]), optimizer)  # 1-D index still works
