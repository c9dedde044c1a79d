"""SWR, L2, L2-Init and every diagnostic on populations (spec populations.md §1, §2.3, §5).

Member k of a 3-member population (``build_torso(..., members=3)`` and a ``MemberLinear``
head) must give exactly what the 1-member model built from seed ``seeds[k]`` gives on
member k's inputs (rtol 1e-5: a batched matmul may round differently from a plain one);
a diverged (NaN) member gets NaN values for itself only.  An ordinary nn model with the
same weights as a 1-member population gives the same values too (the views path).
"""

import copy
import math

import pytest
import torch
from torch import nn

from plasticity.diagnostics import TAG_PREFIX, Diagnostics, to_host
from plasticity.intervention import Parts, Setting
from plasticity.networks import build_torso, init_generators
from plasticity.population import MEMBER_WEIGHT_LAYERS, MemberLinear, weight_param
from plasticity.regularizers import L2Flags, L2InitFlags, L2InitPenalty, L2Penalty
from plasticity.streams import MemberRandom
from plasticity.swr import SoftWeightRescaling, SWRFlags

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = [11, 12, 13]
OBS_SHAPES = {"mlp": (6,), "cnn": (1, 8, 8)}
N_ACTIONS = 3
CLOSE = dict(rtol=1e-5, atol=1e-6)


def population(seeds, net="mlp", layer_norm=False, n_outputs=N_ACTIONS) -> nn.Sequential:
    """The agents' network for ``len(seeds)`` members: member k initialised from seed ``seeds[k]``."""
    generators = init_generators(seeds)
    torso = build_torso(net, OBS_SHAPES[net], layer_norm=layer_norm, hidden_sizes=(16, 8), members=len(seeds),
                        generators=generators)
    return nn.Sequential(torso, MemberLinear(len(seeds), torso.out_features, n_outputs, generators=generators))


def models(net="mlp", layer_norm=False, n_outputs=N_ACTIONS):
    """(population of SEEDS, [the 1-member model of each seed])."""
    return (population(SEEDS, net, layer_norm, n_outputs),
            [population([seed], net, layer_norm, n_outputs) for seed in SEEDS])


def inputs(net="mlp", n=24, seed=0):
    """Each member's own probe batch, [M, n, ...], with TD targets and actions [M, n]."""
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randn(len(SEEDS), n, *OBS_SHAPES[net], generator=generator)
    targets = 3.0 + torch.randn(len(SEEDS), n, generator=generator)
    actions = torch.randint(0, N_ACTIONS, (len(SEEDS), n), generator=generator)
    return obs, targets, actions


def perturb_singles_(singles, seed=5):
    """Move every weight of every single model away from its init (factors 0.5-3, plus noise)."""
    for k, single in enumerate(singles):
        generator = torch.Generator().manual_seed(seed + k)
        with torch.no_grad():
            for p in single.parameters():
                p.mul_(0.5 + 2.5 * torch.rand((), generator=generator))
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def load_members_(pop, singles):
    """Member k of ``pop`` := the parameters of ``singles[k]`` (same architecture, same names)."""
    with torch.no_grad():
        for name, p in pop.named_parameters():
            for k, single in enumerate(singles):
                p[k].copy_(dict(single.named_parameters())[name][0])


def poison_(model, member):
    """Member ``member`` diverges: one NaN in its first layer's weight makes all its activations NaN."""
    first = next(m for m in model.modules() if isinstance(m, MEMBER_WEIGHT_LAYERS))
    with torch.no_grad():
        weight_param(first)[member].view(-1)[0] = float("nan")


def assert_member_values(pop_values, single_values, skip=(), **tolerance):
    """dict[tag, Tensor [M]] of the population against the singles' dict[tag, Tensor [1]]."""
    tolerance = tolerance or CLOSE
    for k, single in enumerate(single_values):
        if k in skip:
            continue
        assert set(single) == set(pop_values)
        for name, value in single.items():
            assert value.shape == (1,) and pop_values[name].shape == (len(SEEDS),), name
            torch.testing.assert_close(pop_values[name][k], value[0], **tolerance, msg=lambda m, n=name: f"{n}: {m}")


def test_members_are_the_single_networks():
    pop, singles = models()
    for name, p in pop.named_parameters():
        for k, single in enumerate(singles):
            assert torch.equal(p[k:k + 1], dict(single.named_parameters())[name]), name
    obs, _, _ = inputs()
    out = pop(obs)
    for k, single in enumerate(singles):
        torch.testing.assert_close(out[k:k + 1], single(obs[k:k + 1]), **CLOSE)


# ---------------------------------------------------------------------------
# SWR
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("coef, head_coef", [(0.3, None), (0.3, 0.1)])
def test_swr_member_k_is_the_single_run(net, layer_norm, coef, head_coef):
    pop, singles = models(net, layer_norm)
    swr = SoftWeightRescaling(pop, coef, head_coef)
    single_swrs = [SoftWeightRescaling(single, coef, head_coef) for single in singles]
    assert swr.init_norms.shape == (len(swr.weights), len(SEEDS))  # θ0 norms per member
    for k, single in enumerate(single_swrs):
        torch.testing.assert_close(swr.init_norms[:, k], single.init_norms[:, 0], rtol=1e-6, atol=0)
    perturb_singles_(singles)
    load_members_(pop, singles)
    scale = swr.step()
    assert scale.shape == (len(SEEDS),) and scale is swr.last_scale
    for k, (single, single_swr) in enumerate(zip(singles, single_swrs)):
        single_scale = single_swr.step()
        torch.testing.assert_close(scale[k], single_scale[0], rtol=1e-5, atol=0)
        assert abs(single_scale.item() - 1) > 1e-3  # not vacuous
        for name, p in pop.named_parameters():
            torch.testing.assert_close(p[k:k + 1], dict(single.named_parameters())[name], **CLOSE)


def test_swr_scalars_and_state_are_per_member(tmp_path):
    pop, singles = models(layer_norm=True)
    parts = Parts(pop, None, None, MemberRandom(SEEDS), Setting(layer_norm=True))
    method = SWRFlags(swr=0.2).build(parts)
    perturb_singles_(singles)
    load_members_(pop, singles)
    method.after_update(0, 1, None)
    (tag, value), = method.scalars().items()
    assert tag == "plasticity/swr_scale" and value.shape == (len(SEEDS),)
    categorical = SWRFlags(swr=0.2).build(Parts(pop, None, None, MemberRandom(SEEDS),
                                                 Setting(categorical=True, layer_norm=True)))
    categorical.after_update(1, 2, None)
    logit_scale = categorical.scalars()["plasticity/swr_logit_scale"]
    assert logit_scale.shape == (len(SEEDS),)
    torch.testing.assert_close(logit_scale, torch.ones(len(SEEDS)))  # λ_h = 0 with LN: logits invariant
    torch.save(method.state_dict(), tmp_path / "swr.pt")
    restored = SoftWeightRescaling(pop, 0.2)  # would record the current norms as θ0
    restored.load_state_dict(torch.load(tmp_path / "swr.pt", weights_only=True))
    assert torch.equal(restored.init_norms, method.method.init_norms)
    with pytest.raises(ValueError, match="layer norms"):
        SoftWeightRescaling(singles[0], 0.2).load_state_dict(method.state_dict())  # [L, 3] into [L, 1]


def test_swr_on_a_diverged_member_leaves_the_others_alone():
    pop, singles = models()
    swr = SoftWeightRescaling(pop, 0.3)
    single_swrs = [SoftWeightRescaling(single, 0.3) for single in singles]
    perturb_singles_(singles)
    load_members_(pop, singles)
    poison_(pop, 1)
    scale = swr.step()
    assert math.isnan(scale[1].item())
    for k in (0, 2):
        torch.testing.assert_close(scale[k], single_swrs[k].step()[0], rtol=1e-5, atol=0)
        for name, p in pop.named_parameters():
            torch.testing.assert_close(p[k:k + 1], dict(singles[k].named_parameters())[name], **CLOSE)


def test_swr_step_is_one_norm_per_tensor_without_a_loop_over_members():
    from torch.profiler import ProfilerActivity, profile

    swr = SoftWeightRescaling(population(list(range(8)), "cnn", layer_norm=True), 0.1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        swr.step()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts["aten::linalg_vector_norm"] == len(swr.weights)  # not len(weights) x 8
    assert counts["aten::_foreach_mul_"] == 1
    assert not {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"} & counts.keys()


# ---------------------------------------------------------------------------
# L2 and L2-Init
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("penalty_class", [L2Penalty, L2InitPenalty])
def test_penalties_per_member_and_their_sum_gives_each_member_its_own_gradient(net, penalty_class):
    pop, singles = models(net, layer_norm=True)
    penalty = penalty_class(pop, 1e-2)
    single_penalties = [penalty_class(single, 1e-2) for single in singles]
    perturb_singles_(singles)
    load_members_(pop, singles)
    per_member = penalty.per_member()
    assert per_member.shape == (len(SEEDS),)
    total = penalty()
    assert total.dim() == 0
    torch.testing.assert_close(total, per_member.sum())
    total.backward()
    for k, (single, single_penalty) in enumerate(zip(singles, single_penalties)):
        value = single_penalty()
        torch.testing.assert_close(per_member[k], value, rtol=1e-5, atol=0)
        assert value > 0
        value.backward()
        for name, p in pop.named_parameters():
            single_p = dict(single.named_parameters())[name]
            if single_p.grad is None:  # LayerNorm γ/β: not regularised
                assert p.grad is None, name
                continue
            torch.testing.assert_close(p.grad[k:k + 1], single_p.grad, **CLOSE)


@pytest.mark.parametrize("flags, tag", [(L2Flags(l2=1e-3), "plasticity/l2_penalty"),
                                        (L2InitFlags(l2_init=1e-3), "plasticity/l2_init_penalty")])
def test_penalty_term_logs_one_value_per_member(flags, tag):
    pop, singles = models()
    term = flags.build(Parts(pop, None, None, MemberRandom(SEEDS), Setting()))
    assert term.scalars()[tag].shape == (len(SEEDS),)
    perturb_singles_(singles)
    load_members_(pop, singles)
    value = term.penalty()
    assert value.dim() == 0
    logged = term.scalars()[tag]
    assert logged.shape == (len(SEEDS),) and not logged.requires_grad
    torch.testing.assert_close(logged.sum(), value.detach())


def test_penalties_of_a_diverged_member_leave_the_others_alone():
    pop, singles = models()
    penalty = L2InitPenalty(pop, 0.1)
    single_penalties = [L2InitPenalty(single, 0.1) for single in singles]
    perturb_singles_(singles)
    load_members_(pop, singles)
    poison_(pop, 1)
    per_member = penalty.per_member()
    per_member.sum().backward()
    assert math.isnan(per_member[1].item())
    for k in (0, 2):
        value = single_penalties[k]()
        value.backward()
        torch.testing.assert_close(per_member[k], value, rtol=1e-5, atol=0)
        for name, p in pop.named_parameters():
            single_p = dict(singles[k].named_parameters())[name]
            if single_p.grad is not None:
                torch.testing.assert_close(p.grad[k:k + 1], single_p.grad, **CLOSE)


def test_an_ordinary_layer_in_a_population_is_refused():
    torso = build_torso("mlp", (6,), hidden_sizes=(8,), members=2, generators=init_generators([0, 1]))
    shared_head = nn.Sequential(torso, nn.Linear(8, 3))
    for build in (lambda m: L2Penalty(m, 0.1), lambda m: SoftWeightRescaling(m, 0.1), Diagnostics):
        with pytest.raises(ValueError, match="shared by the members"):
            build(shared_head)


# ---------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------

def _trained_grads(model, obs, targets):
    """A per-member TD-like loss, summed over members; backward writes every member's own gradient."""
    out = model(obs)
    q = out.gather(2, torch.zeros(*out.shape[:2], 1, dtype=torch.long)).squeeze(2)
    (q - targets).square().mean(1).sum().backward()


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_measure_member_k_is_the_single_run(net, layer_norm):
    pop, singles = models(net, layer_norm)
    obs, targets, actions = inputs(net)
    diagnostics = Diagnostics(pop)
    single_diagnostics = [Diagnostics(single) for single in singles]
    perturb_singles_(singles)
    load_members_(pop, singles)
    _trained_grads(pop, obs, targets)
    diagnostics.record_grad_norm()
    single_values = []
    for k, (single, single_diag) in enumerate(zip(singles, single_diagnostics)):
        _trained_grads(single, obs[k:k + 1], targets[k:k + 1])
        single_diag.record_grad_norm()
        single_values.append(single_diag.measure(obs[k:k + 1], targets[k:k + 1], actions[k:k + 1],
                                                 clip_range=(2.0, 4.0)))
    values = diagnostics.measure(obs, targets, actions, clip_range=(2.0, 4.0))
    assert TAG_PREFIX + "grad_norm" in values and TAG_PREFIX + "dist_from_init" in values
    assert all(v.dtype == torch.float64 for v in values.values())
    assert_member_values(values, single_values)
    assert values[TAG_PREFIX + "dist_from_init"].min() > 0.1  # not vacuous: members moved, differently
    assert values[TAG_PREFIX + "weight_norm"].unique().numel() == len(SEEDS)


def test_measure_of_a_categorical_population():
    support = torch.linspace(-5.0, 5.0, 7)
    pop, singles = models(n_outputs=N_ACTIONS * 7)
    obs, targets, actions = inputs()
    values = Diagnostics(pop, support=support).measure(obs, targets, actions, clip_range=(-4.0, 4.0))
    single_values = [Diagnostics(single, support=support).measure(obs[k:k + 1], targets[k:k + 1])
                     for k, single in enumerate(singles)]
    single_values = [{**v, TAG_PREFIX + "target_clip_frac": values[TAG_PREFIX + "target_clip_frac"][k:k + 1]}
                     for k, v in enumerate(single_values)]
    assert_member_values(values, single_values)


def test_to_host_moves_every_member_of_every_probe_in_one_transfer(monkeypatch):
    pop, _ = models()
    obs, targets, actions = inputs()
    diagnostics = Diagnostics(pop)
    values = diagnostics.measure(obs, targets)
    rare = diagnostics.probe_fit_loss(obs, steps=2)
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or original(self))
    host = to_host(values, rare)
    assert calls == [1]
    assert len(host) == len(SEEDS)
    for k, member in enumerate(host):
        assert set(member) == set(values) | set(rare)
        assert member[TAG_PREFIX + "q_mean"] == values[TAG_PREFIX + "q_mean"][k].item()


def test_measure_of_a_diverged_member_is_nan_for_it_alone():
    pop, singles = models(layer_norm=True)
    obs, targets, actions = inputs()
    poison_(pop, 1)
    _trained_grads(pop, obs, targets)
    diagnostics = Diagnostics(pop)
    diagnostics.record_grad_norm()
    values = diagnostics.measure(obs, targets, actions, clip_range=(2.0, 4.0))  # must not raise
    single_values = []
    for k, single in enumerate(singles):
        single_diag = Diagnostics(single)
        _trained_grads(single, obs[k:k + 1], targets[k:k + 1])
        single_diag.record_grad_norm()
        single_values.append(single_diag.measure(obs[k:k + 1], targets[k:k + 1], clip_range=(2.0, 4.0)))
    assert_member_values(values, single_values, skip=(1,))
    finite = {"target_mean", "target_std", "target_offset_ratio", "target_clip_frac", "weight_norm/0.4",
              "weight_norm/1"}  # inputs, and the layers that hold no NaN
    for name, value in values.items():
        short = name.removeprefix(TAG_PREFIX)
        assert math.isnan(value[1].item()) != (short in finite), name


def test_entk_member_k_is_the_single_run():
    pop, singles = models(layer_norm=True)
    obs, _, actions = inputs(n=10)
    diagnostics = Diagnostics(pop)
    kernel = diagnostics.entk_kernel(obs, actions)
    assert kernel.shape == (len(SEEDS), 10, 10)
    values = diagnostics.entk(obs, actions)
    single_values = []
    for k, single in enumerate(singles):
        single_diag = Diagnostics(single)
        torch.testing.assert_close(kernel[k:k + 1], single_diag.entk_kernel(obs[k:k + 1], actions[k:k + 1]),
                                   rtol=1e-5, atol=1e-6)
        single_values.append(single_diag.entk(obs[k:k + 1], actions[k:k + 1]))
    assert_member_values(values, single_values, rtol=1e-4, atol=0)  # eigenvalues of K: σ(J)² in float32
    poison_(pop, 1)
    poisoned = diagnostics.entk(obs, actions)
    assert all(math.isnan(v[1].item()) for v in poisoned.values())
    assert_member_values(poisoned, single_values, skip=(1,), rtol=1e-4, atol=0)


@pytest.mark.parametrize("summed", [False, True])
def test_hessian_max_eig_member_k_is_the_single_run(summed):
    pop, singles = models(layer_norm=True)
    obs, targets, _ = inputs()

    def loss_of(model, x, y):
        losses = (model(x)[..., 0] - y).square().mean(1)  # [M]: each member's loss
        return losses.sum() if summed else losses

    values = Diagnostics(pop).hessian_max_eig(lambda: loss_of(pop, obs, targets))
    assert values[TAG_PREFIX + "hessian_max_eig"].shape == (len(SEEDS),)
    single_values = [Diagnostics(single).hessian_max_eig(lambda s=single, k=k: loss_of(s, obs[k:k + 1],
                                                                                       targets[k:k + 1]))
                     for k, single in enumerate(singles)]
    assert_member_values(values, single_values)
    poison_(pop, 1)
    poisoned = Diagnostics(pop).hessian_max_eig(lambda: loss_of(pop, obs, targets))
    assert math.isnan(poisoned[TAG_PREFIX + "hessian_max_eig"][1].item())
    assert_member_values(poisoned, single_values, skip=(1,))


def test_hessian_max_eig_rejects_a_loss_per_sample():
    pop, _ = models()
    obs, targets, _ = inputs()
    with pytest.raises(ValueError, match=r"per-member losses \[3\]"):
        Diagnostics(pop).hessian_max_eig(lambda: (pop(obs)[..., 0] - targets).square())


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_probe_fit_loss_member_k_is_the_single_run(net):
    pop, singles = models(net, layer_norm=True)
    obs, _, _ = inputs(net)
    perturb_singles_(singles)
    load_members_(pop, singles)
    params = [p.detach().clone() for p in pop.parameters()]
    values = Diagnostics(pop).probe_fit_loss(obs, steps=10)
    assert all(torch.equal(p, q) for p, q in zip(pop.parameters(), params))  # the training network untouched
    single_values = [Diagnostics(single).probe_fit_loss(obs[k:k + 1], steps=10) for k, single in enumerate(singles)]
    assert_member_values(values, single_values)
    poison_(pop, 1)
    poisoned = Diagnostics(pop).probe_fit_loss(obs, steps=10)
    assert math.isnan(poisoned[TAG_PREFIX + "probe_fit_loss"][1].item())
    assert_member_values(poisoned, single_values, skip=(1,))


def test_state_dict_round_trip_per_member():
    pop, _ = models()
    obs, targets, _ = inputs()
    diagnostics = Diagnostics(pop)
    _trained_grads(pop, obs, targets)
    diagnostics.record_grad_norm()
    state = copy.deepcopy(diagnostics.state_dict())
    assert state["grad_norm_sum"].shape == (len(SEEDS),)
    with torch.no_grad():
        for p in pop.parameters():
            p.mul_(1.5)
    expected = diagnostics.measure(obs)
    resumed = Diagnostics(pop)
    resumed.load_state_dict(state)
    result = resumed.measure(obs)
    for name in ("dist_from_init", "grad_norm"):
        torch.testing.assert_close(result[TAG_PREFIX + name], expected[TAG_PREFIX + name])
    single = Diagnostics(population([SEEDS[0]]))
    with pytest.raises(ValueError, match="same network flags|--num-seeds"):
        single.load_state_dict(state)


def test_population_inputs_are_checked():
    pop, _ = models()
    obs, targets, actions = inputs()
    diagnostics = Diagnostics(pop)
    with pytest.raises(ValueError, match="at least 2 observations"):
        diagnostics.measure(obs[0])  # one member's batch without the member dim
    with pytest.raises(ValueError, match="td_targets has"):
        diagnostics.measure(obs, targets[:, :5])


# ---------------------------------------------------------------------------
# An ordinary nn model is the population of one
# ---------------------------------------------------------------------------

def plain_copy(member_model: nn.Sequential, layer_norm: bool) -> nn.Sequential:
    """The same network as a 1-member mlp population in ordinary layers, with the same module names."""
    torso, head = member_model
    layers = [nn.Flatten()]
    for index in (1, 4):
        source = torso[index]
        linear = nn.Linear(source.in_features, source.out_features)
        with torch.no_grad():
            linear.weight.copy_(source.weight[0])
            linear.bias.copy_(source.bias[0])
        norm = nn.LayerNorm(source.out_features) if layer_norm else nn.Identity()
        if layer_norm:
            with torch.no_grad():
                norm.weight.copy_(torso[index + 1].weight[0])
                norm.bias.copy_(torso[index + 1].bias[0])
        layers += [linear, norm, nn.ReLU()]
    out = nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        out.weight.copy_(head.weight[0])
        out.bias.copy_(head.bias[0])
    return nn.Sequential(nn.Sequential(*layers), out)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_an_ordinary_model_gives_what_its_one_member_population_gives(layer_norm):
    member = population([SEEDS[0]], layer_norm=layer_norm)
    perturb_singles_([member])
    plain = plain_copy(member, layer_norm)
    obs, targets, actions = inputs()
    obs, targets, actions = obs[:1], targets[:1], actions[:1]
    torch.testing.assert_close(plain(obs[0]), member(obs)[0], **CLOSE)
    member_values = Diagnostics(member).measure(obs, targets, actions, clip_range=(2.0, 4.0))
    plain_values = Diagnostics(plain).measure(obs[0], targets[0], actions[0], clip_range=(2.0, 4.0))
    member_values.update(Diagnostics(member).entk(obs, actions))
    plain_values.update(Diagnostics(plain).entk(obs[0], actions[0]))
    member_values.update(Diagnostics(member).probe_fit_loss(obs, steps=5))
    plain_values.update(Diagnostics(plain).probe_fit_loss(obs[0], steps=5))
    assert set(member_values) == set(plain_values)
    for name, value in plain_values.items():
        assert value.shape == (1,), name
        torch.testing.assert_close(value, member_values[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # SWR and the penalties: the same factors and values through the views.
    swr_member, swr_plain = SoftWeightRescaling(member, 0.3), SoftWeightRescaling(plain, 0.3)
    torch.testing.assert_close(swr_member.init_norms, swr_plain.init_norms)
    for penalty_class in (L2Penalty, L2InitPenalty):
        torch.testing.assert_close(penalty_class(member, 0.1).per_member(), penalty_class(plain, 0.1).per_member())
    with torch.no_grad():
        for module in (member, plain):
            for p in module.parameters():
                p.mul_(2.0)
    torch.testing.assert_close(swr_member.step(), swr_plain.step(), rtol=1e-5, atol=0)
    torch.testing.assert_close(plain(obs[0]), member(obs)[0], **CLOSE)
