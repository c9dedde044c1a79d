"""Parseval regularisation against methods-v2.md §7 (properties 7.1-7.4), groups, populations, init, diag layers."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from plasticity.flags import check_ranges, declared_ranges, flag_name
from plasticity.intervention import Parts, Setting
from plasticity.networks import (
    ORTHOGONAL_GAIN,
    ActivationRecorder,
    build_torso,
    fresh_weights,
    init_generators,
    layer_map,
    orthogonal_gain,
    reinit_,
)
from plasticity.parseval import (
    DiagLayer,
    InputScale,
    ParsevalFlags,
    ParsevalPenalty,
    add_parseval_layers_,
    apply_parseval_,
    diag_layers,
    orthogonal_init_,
    parseval_init_,
)
from plasticity.population import MemberLinear, weight_view
from plasticity.resets import ReDo
from plasticity.streams import MemberRandom
from plasticity.swr import SoftWeightRescaling

pytestmark = pytest.mark.usefixtures("one_thread")


class QNet(nn.Module):
    """Torso -> member linear head, as the agents' QNetwork (module names torso.*, head)."""

    def __init__(self, network="mlp", obs_shape=(20,), members=1, seeds=None, layer_norm=False, hidden=(16, 8),
                 actions=3):
        super().__init__()
        generators = init_generators(seeds) if seeds is not None else None
        self.torso = build_torso(network, obs_shape, layer_norm=layer_norm, hidden_sizes=hidden, members=members,
                                 generators=generators)
        self.head = MemberLinear(members, self.torso.out_features, actions, generators=generators)
        self.generators = generators

    def forward(self, x):
        return self.head(self.torso(x))


def _gram_error(layer, scale):
    w = weight_view(layer).flatten(2)
    return (w @ w.mT - scale * torch.eye(w.shape[1])).abs().amax()


def _explicit_penalty(w, coef, scale, width_ref, groups):
    """λ (w_ref/n)² ‖M_G ⊙ (W Wᵀ) − sI‖²_F with the full mask written out (one member, w [n, fan])."""
    n = w.shape[0]
    mask = torch.block_diag(*[torch.ones(n // groups, n // groups)] * groups)
    return coef * (width_ref / n) ** 2 * (mask * (w @ w.T) - scale * torch.eye(n)).square().sum()


# --- 7.1 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("network,obs_shape", [("mlp", (20,)), ("cnn", (4, 12, 12))])
@pytest.mark.parametrize("scale", [2.0, 1.0])
def test_7_1_zero_at_orthogonal_init(network, obs_shape, scale):
    model = QNet(network, obs_shape, members=2, seeds=[3, 4], hidden=(16, 8))
    before = ParsevalPenalty(model, coef=1.0, scale=scale).per_member()
    assert (before > 1.0).all()  # PyTorch's default init is far from s·I
    parseval_init_(model, model.generators, scale=scale)
    penalty = ParsevalPenalty(model, coef=1.0, scale=scale)
    assert penalty.floor == 0.0
    values = penalty.per_member()
    assert values.shape == (2,)
    assert (values.abs() < 1e-6).all(), values
    for hidden in layer_map(model).hidden:  # rows orthogonal with gain √s, bias 0
        assert _gram_error(hidden.layer, scale) < 1e-5
        assert hidden.layer.bias.abs().max() == 0
        assert getattr(hidden.layer, ORTHOGONAL_GAIN) == pytest.approx(math.sqrt(scale))
    head = model.head
    assert _gram_error(head, 1.0) < 1e-5 and head.bias.abs().max() == 0  # value head: gain 1
    assert orthogonal_gain(head) == 1.0


def test_7_1_known_diagonal_weight():
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 2))
    diagonal = torch.tensor([1.0, 2.0, 0.5, -3.0])
    with torch.no_grad():
        layer.weight.copy_(torch.diag(diagonal))
        model[2].weight.fill_(7.0)  # the output layer is not penalised
    coef, scale = 1e-3, 2.0
    expected = coef * (64 / 4) ** 2 * (diagonal.square() - scale).square().sum()  # 1e-3*256*(1+4+3.0625+49)
    value = ParsevalPenalty(model, coef, scale)()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert value.item() == pytest.approx(1e-3 * 256 * 57.0625, rel=1e-6)
    # width_ref and the layer's own n_out in the factor
    assert ParsevalPenalty(model, coef, scale, width_ref=8)().item() == pytest.approx(expected.item() / 64, rel=1e-6)


def test_floor_when_rows_exceed_fan_in():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    orthogonal_init_(model[0], math.sqrt(2.0), torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="cannot reach 0"):
        penalty = ParsevalPenalty(model, coef=1.0, scale=2.0)
    # WWᵀ has eigenvalues s (fan_in times) and 0: the minimum s²(n − fan_in), times (64/8)².
    assert penalty.floor == pytest.approx(64 * 4 * 5)
    assert penalty().item() == pytest.approx(penalty.floor, rel=1e-5)


# --- 7.2 / 7.3 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv", "member"])
def test_7_2_gradient_matches_closed_form(kind):
    torch.manual_seed(0)
    if kind == "conv":
        layer = nn.Conv2d(3, 5, 3)
        model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 2))
    elif kind == "member":
        layer = MemberLinear(1, 7, 6)
        model = nn.Sequential(layer, nn.ReLU(), MemberLinear(1, 6, 2))
    else:
        layer = nn.Linear(7, 6)
        model = nn.Sequential(layer, nn.ReLU(), nn.Linear(6, 2))
    coef, scale = 0.3, 2.0
    ParsevalPenalty(model, coef, scale)().backward()
    w = weight_view(layer).detach()[0].flatten(1)
    n = w.shape[0]
    expected = 4 * coef * (64 / n) ** 2 * (w @ w.T - scale * torch.eye(n)) @ w
    grad = weight_view(layer).grad if kind == "member" else layer.weight.grad
    torch.testing.assert_close(grad.reshape(n, -1), expected, rtol=1e-5, atol=1e-5)


def test_7_3_only_hidden_weights_get_a_gradient():
    for layer_norm in (False, True):
        model = QNet("cnn", (4, 12, 12), members=2, seeds=[1, 2], layer_norm=layer_norm)
        if not layer_norm:
            add_parseval_layers_(model.torso, diag=True, input_scale=True)
        ParsevalPenalty(model, coef=1.0)().backward()
        hidden = {id(h.layer.weight) for h in layer_map(model).hidden}
        assert len(hidden) == 3
        for name, param in model.named_parameters():
            if id(param) in hidden:
                assert param.grad is not None and param.grad.abs().sum() > 0, name
            else:  # biases, LN, output layer, diagonal layers, input scale
                assert param.grad is None or param.grad.abs().sum() == 0, name


# --- groups, populations -------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_groups_match_explicit_mask(groups):
    torch.manual_seed(1)
    layer = nn.Conv2d(2, 8, 2)  # n_out 8, fan_in 8: conv kernels flattened
    model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    coef, scale, ref = 0.01, 1.5, 32
    value = ParsevalPenalty(model, coef, scale, ref, groups)()
    w = layer.weight.detach().flatten(1).requires_grad_()
    expected = _explicit_penalty(w, coef, scale, ref, groups)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    expected.backward()
    torch.testing.assert_close(layer.weight.grad.flatten(1), w.grad, rtol=1e-5, atol=1e-6)
    if groups > 1:  # the mask matters
        assert value.item() < ParsevalPenalty(model, coef, scale, ref, 1)().item()


def test_groups_must_divide_widths():
    model = QNet(hidden=(16, 6))
    with pytest.raises(ValueError, match="parseval-groups 4 must divide.*torso.4 has 6"):
        ParsevalPenalty(model, 1e-3, groups=4)


def test_population_members_are_independent():
    population = QNet(members=2, seeds=[5, 6])
    single = QNet(members=1, seeds=[6])
    penalty = ParsevalPenalty(population, coef=0.1, groups=2)
    values = penalty.per_member()
    assert values.shape == (2,) and values[0] != values[1]
    assert values[1].item() == pytest.approx(ParsevalPenalty(single, coef=0.1, groups=2)().item(), rel=1e-6)
    penalty().backward()
    grads = [p.grad.clone() for p in penalty.params]
    with torch.no_grad():  # change member 1 only: member 0's values and gradients stay
        for p in penalty.params:
            p[1].mul_(3.0)
    for p in penalty.params:
        p.grad = None
    changed = penalty.per_member()
    assert changed[0].item() == pytest.approx(values[0].item(), rel=1e-6) and changed[1] != values[1]
    changed.sum().backward()
    for p, g in zip(penalty.params, grads):
        torch.testing.assert_close(p.grad[0], g[0])
        assert not torch.allclose(p.grad[1], g[1])


# --- initialisation and redraws ------------------------------------------------------------------------------


def test_init_member_k_is_its_single_run_and_torch_orthogonal():
    population = QNet("cnn", (2, 12, 12), members=2, seeds=[7, 8])
    single = QNet("cnn", (2, 12, 12), members=1, seeds=[8])
    parseval_init_(population, population.generators)
    parseval_init_(single, single.generators)
    for (name, a), (_, b) in zip(population.named_parameters(), single.named_parameters()):
        torch.testing.assert_close(a[1:2], b, rtol=0, atol=1e-6, msg=name)
    # one generator: the draw of torch.nn.init.orthogonal_
    layer, reference = nn.Linear(9, 5), torch.empty(5, 9)
    orthogonal_init_(layer, 1.3, [torch.Generator().manual_seed(11)])
    nn.init.orthogonal_(reference, 1.3, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(layer.weight.detach(), reference, rtol=0, atol=1e-6)


def test_member_random_normal_per_member():
    population, single = MemberRandom([3, 4]), MemberRandom([4])
    population.uniform(5)
    single.uniform(5)
    a, b = population.normal(6, 2), single.normal(6, 2)
    assert a.shape == (2, 6, 2)
    torch.testing.assert_close(a[1:], b, rtol=0, atol=0)
    torch.testing.assert_close(population.uniform(3)[1:], single.uniform(3), rtol=0, atol=0)  # pools in step


def test_marked_layers_redraw_orthogonally():
    model = QNet(members=2, seeds=[1, 2], hidden=(16, 8))
    parseval_init_(model, model.generators)
    random = MemberRandom([10, 11])
    hidden = layer_map(model).hidden[0].layer
    old = hidden.weight.detach().clone()
    with torch.no_grad():
        hidden.bias.fill_(0.5)
    reinit_(hidden, random=random)  # whole layer (layer resets, head reset, S&P's fresh draw)
    assert _gram_error(hidden, 2.0) < 1e-5 and hidden.bias.abs().max() == 0
    assert not torch.allclose(hidden.weight, old)
    reinit_(model.head, random=random)
    assert _gram_error(model.head, 1.0) < 1e-5
    # units (ReDo): rows of a fresh orthogonal draw, bias 0, other rows kept
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5]] = True
    mask[1, 3] = True
    before = hidden.weight.detach().clone()
    reinit_(hidden, units=mask, random=random)
    changed = (hidden.weight != before).any(-1)
    assert torch.equal(changed, mask)
    assert torch.allclose(hidden.weight.norm(dim=-1), torch.full((2, 16), math.sqrt(2.0)), atol=1e-5)
    # rows=c (CBP's redraw of c units): orthonormal rows times the gain
    rows = fresh_weights(hidden, random, rows=3)
    assert rows.shape == (2, 3, 20)
    torch.testing.assert_close(rows @ rows.mT, 2.0 * torch.eye(3).expand(2, 3, 3), rtol=0, atol=1e-5)
    # n_out > fan_in: rows of a full draw (norm sqrt(s*fan_in/n_out) on average, not sqrt(s))
    wide = nn.Linear(2, 8)
    orthogonal_init_(wide, 1.0, torch.Generator().manual_seed(0))
    full = fresh_weights(wide, torch.Generator().manual_seed(0), rows=8)
    torch.testing.assert_close(full[0].T @ full[0], torch.eye(2), rtol=0, atol=1e-5)


def test_unmarked_redraws_unchanged():
    layer = MemberLinear(2, 6, 4)
    assert orthogonal_gain(layer) is None
    a = fresh_weights(layer, MemberRandom([1, 2]), rows=3)
    bound = 1 / math.sqrt(6)
    b = MemberRandom([1, 2]).symmetric(bound, 3, 6)  # what resets._redraw_rows_ draws today
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    whole = fresh_weights(layer, MemberRandom([1, 2]))
    torch.testing.assert_close(whole, MemberRandom([1, 2]).symmetric(bound, 4, 6), rtol=0, atol=0)


# --- 7.4: diagonal layers, input scale -----------------------------------------------------------------------


@pytest.mark.parametrize("network,obs_shape", [("mlp", (6,)), ("cnn", (2, 12, 12))])
@pytest.mark.parametrize("members", [1, 2])
def test_7_4_diag_layers_are_identity_and_invisible(network, obs_shape, members):
    model = QNet(network, obs_shape, members=members, seeds=list(range(members)))
    x = torch.randn(members, 5, *obs_shape)
    reference = model(x).detach()
    before = layer_map(model)
    names = [name for name, _ in model.named_modules()]
    add_parseval_layers_(model.torso, diag=True, input_scale=True)
    after = layer_map(model)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)  # identity at init
    assert all(name in dict(model.named_modules()) for name in names if name)  # no module renamed
    assert isinstance(model.torso[0], InputScale)
    diags = [m for m in model.modules() if isinstance(m, DiagLayer)]
    assert len(diags) == len(before.hidden) == len(diag_layers(model))
    # layer_map (CBP, ReDo, SWR, ...) sees the same hidden blocks
    assert [(h.name, h.layer, h.norm, h.activation, h.next_layer, h.spatial) for h in after.hidden] == \
           [(h.name, h.layer, h.norm, h.activation, h.next_layer, h.spatial) for h in before.hidden]
    assert after.output is before.output and [n for n, _ in after.ordered] == [n for n, _ in before.ordered]
    for name, diag in diag_layers(model).items():
        layer = dict(model.named_modules())[name]
        assert diag.scale.shape == (members, weight_view(layer).shape[1])
    # the diag layers act: per unit/channel, per member
    with torch.no_grad():
        diags[0].scale[-1].mul_(2.0)
        diags[0].shift[-1].add_(0.1)
    out = model(x)
    torch.testing.assert_close(out[:-1], reference[:-1], rtol=0, atol=0)
    assert not torch.allclose(out[-1], reference[-1])
    # methods still run on the model with diag layers
    with ActivationRecorder(model) as recorder:
        model(x)
    assert set(recorder.post) == {h.name for h in before.hidden}
    ReDo(model, None, tau=0.1, random=MemberRandom(list(range(members)))).reset(x)
    SoftWeightRescaling(model, 0.1).step()
    model(x).sum().backward()
    assert diags[0].scale.grad is not None and model.torso.input_scale.scale.grad is not None


def test_diag_layer_rejects_layer_norm():
    model = QNet(layer_norm=True)
    with pytest.raises(ValueError, match="--parseval-diag cannot be combined with --layer-norm"):
        add_parseval_layers_(model.torso, diag=True)
    add_parseval_layers_(model.torso, input_scale=True)  # the input scale alone is fine


def test_input_scale_learnable():
    model = QNet(members=2, seeds=[0, 1])
    add_parseval_layers_(model.torso, input_scale=True)
    x = torch.randn(2, 4, 20)
    reference = model(x).detach()
    with torch.no_grad():
        model.torso.input_scale.scale.copy_(torch.tensor([1.0, 0.0]))
    out = model(x)
    torch.testing.assert_close(out[0], reference[0])
    torch.testing.assert_close(out[1], model(torch.zeros(2, 4, 20))[1])  # member 1 sees a zero input
    assert not torch.allclose(out[1], reference[1])


# --- flags ---------------------------------------------------------------------------------------------------


def test_flags_check_and_build():
    ParsevalFlags().check(Setting())
    for extra in ({"parseval_scale": 1.0}, {"parseval_width_ref": 32}, {"parseval_groups": 2},
                  {"parseval_diag": True}, {"input_scale_learnable": True}):
        with pytest.raises(ValueError, match=f"--{flag_name(next(iter(extra)))}.*need.*--parseval > 0"):
            ParsevalFlags(**extra).check(Setting())
        ParsevalFlags(parseval=1e-3, **extra).check(Setting())
    with pytest.raises(ValueError, match="--parseval-diag cannot be combined with --layer-norm"):
        ParsevalFlags(parseval=1e-3, parseval_diag=True).check(Setting(layer_norm=True))
    for name, (value_range, _) in declared_ranges(ParsevalFlags).items():
        for bad in value_range.invalid_examples():
            with pytest.raises(ValueError, match=f"--{flag_name(name)}"):
                check_ranges(ParsevalFlags(**{name: bad}))

    model = QNet(members=2, seeds=[0, 1])
    parts = Parts(model, None, None, MemberRandom([0, 1]), Setting())
    assert ParsevalFlags().build(parts) is None
    flags = ParsevalFlags(parseval=1e-3, parseval_diag=True, input_scale_learnable=True)
    with pytest.warns(UserWarning, match="not given the Parseval init"):
        ParsevalFlags.build(flags, parts)
    apply_parseval_(model, flags, model.generators)
    assert any(isinstance(m, DiagLayer) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        term = ParsevalFlags.build(flags, parts)
    loss = term.penalty()
    assert loss.dim() == 0 and abs(loss.item()) < 1e-6
    scalars = term.scalars()
    assert set(scalars) == {"plasticity/parseval_penalty"} and scalars["plasticity/parseval_penalty"].shape == (2,)
    # marks survive a deep copy (the target network, made after the init)
    assert orthogonal_gain(copy.deepcopy(model).head) == 1.0


def test_penalty_has_no_host_sync():
    from torch.profiler import ProfilerActivity, profile

    model = QNet("cnn", (4, 12, 12), members=2, seeds=[0, 1])
    penalty = ParsevalPenalty(model, 1e-3, groups=2)
    penalty().backward()  # warm-up (the -sI constants are made once)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        penalty().backward()
    ops = {event.key for event in prof.key_averages()}
    assert not ops & {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}


def test_gram_backward_gradcheck():
    from plasticity.parseval import _GramDeviation

    eye = -1.7 * torch.eye(4, dtype=torch.float64)
    for batch in (1, 3):
        rows = torch.randn(batch, 4, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda r: _GramDeviation.apply(r, eye), (rows,))
