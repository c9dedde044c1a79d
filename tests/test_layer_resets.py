"""Layer resets (methods-v2.md §4): properties 4.1-4.4, the flag rules, the head reset as last:1, populations."""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from plasticity.intervention import Parts, Setting
from plasticity.layer_resets import LayerReset, LayerResetFlags, due, layer_groups, parse_reset_layers
from plasticity.networks import build_torso, fresh_weights, init_generators
from plasticity.population import MemberLinear, weight_view
from plasticity.resets import HeadResetFlags, fresh_bias, reset_head_
from plasticity.streams import MemberRandom

pytestmark = pytest.mark.usefixtures("one_thread")

OBS = (5,)


class QNet(nn.Module):
    """torso + head, registered in forward order (as the agents' Q-networks): layers torso.1, torso.4, head."""

    def __init__(self, seeds, layer_norm=True):
        super().__init__()
        generators = init_generators(seeds)
        self.torso = build_torso("mlp", OBS, layer_norm=layer_norm, hidden_sizes=(16, 12), members=len(seeds),
                                 generators=generators)
        self.head = MemberLinear(len(seeds), self.torso.out_features, 3, generators=generators)

    def forward(self, x):
        return self.head(self.torso(x))

    def q_values(self, x):
        return self.forward(x)


class Run:
    """A population (float64: the batched kernels of 2 members round like the plain one), its target, Adam,
    the methods' streams and one §4 method (built from flags, checked first)."""

    def __init__(self, flags, seeds=(11,), random_seeds=(101,), data_seeds=(201,), setting=None,
                 layer_norm=True, build=True):
        self.model = QNet(list(seeds), layer_norm).double()
        self.target = copy.deepcopy(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.random = MemberRandom(list(random_seeds))
        self.twin = MemberRandom(list(random_seeds))  # draws what the method draws, in the same order
        self.data = [torch.Generator().manual_seed(s) for s in data_seeds]
        self.flags = flags
        setting = Setting() if setting is None else setting
        flags.check(setting)
        self.parts = Parts(self.model, self.optimizer, self.target, self.random, setting)
        self.method = flags.build(self.parts) if build else None
        self.update = 0

    def train(self, updates, call_method=True):
        for _ in range(updates):
            self.update += 1
            x = torch.stack([torch.randn(8, *OBS, generator=g) for g in self.data]).double()
            loss = (self.model(x) - 1.0).pow(2).mean(dim=(1, 2)).sum()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            if call_method:
                self.method.after_update(self.update - 1, self.update, None)
        return self

    def params(self, model=None):
        return {n: p.detach().clone() for n, p in (model or self.model).named_parameters()}

    def member(self, k):
        state = {}
        for prefix, model in (("online", self.model), ("target", self.target)):
            for name, p in model.named_parameters():
                state[f"{prefix}.{name}"] = p.detach()[k]
        for name, p in self.model.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{name}.{key}"] = self.optimizer.state[p][key][k]
        state["events"] = self.method.scalars()[self.method.tag][k]
        return state


def _group_names(group):
    return [f"{name}.{attr}" for name, _ in group.modules() for attr in ("weight", "bias")]


RESET = ["torso.4.weight", "torso.4.bias", "torso.5.weight", "torso.5.bias", "head.weight", "head.bias"]  # last:2
KEPT = ["torso.1.weight", "torso.1.bias", "torso.2.weight", "torso.2.bias"]


def test_layers_carry_their_layer_norm_and_specs_resolve():
    model = QNet([1])
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["torso.1", "torso.4", "head"]
    assert [[n for n, _ in g.norms] for g in groups] == [["torso.2"], ["torso.5"], []]
    assert [_group_names(g) for g in groups][1:] == [RESET[:4], RESET[4:]]
    assert parse_reset_layers("last:2") == ("last", 2)
    assert parse_reset_layers("all") == ("all", 0)
    assert parse_reset_layers("torso.1, head") == ("names", ["torso.1", "head"])
    for spec, reset in (("last:1", {"head"}), ("last:2", {"torso.4", "head"}), ("all", {"torso.1", "torso.4", "head"}),
                        ("torso.1,head", {"torso.1", "head"})):
        method = Run(LayerResetFlags(reset_layers=spec, reset_every_updates=1)).method
        assert {g.name for g, r in zip(method.groups, method.reset_mask) if r} == reset


# ---------------------------------------------------------------------------------------------- 4.1


def test_4_1_parameters_kept_in_the_optimiser_and_the_reset_layers_train():
    run = Run(LayerResetFlags(reset_layers="last:2", reset_every_updates=1000)).train(3)
    params = list(run.model.parameters())
    before = run.params()
    run.method.reset()
    assert [id(p) for p in run.model.parameters()] == [id(p) for p in params]
    assert [id(p) for p in run.optimizer.param_groups[0]["params"]] == [id(p) for p in params]
    after = run.params()
    for name in RESET:
        if name == "torso.5.bias":
            assert (after[name] == 0).all()
        elif name == "torso.5.weight":
            assert (after[name] == 1).all()
        else:
            assert not torch.equal(after[name], before[name])
    run.train(1)
    trained = run.params()
    for name in RESET:
        assert not torch.equal(trained[name], after[name]), name


# ---------------------------------------------------------------------------------------------- 4.2


def test_4_2_two_resets_from_the_same_theta_differ():
    run = Run(LayerResetFlags(reset_layers="last:2", reset_every_updates=1000, reset_shrink=0.5,
                              reset_perturb=0.5)).train(2)
    theta = run.params()
    run.method.reset()
    first = run.params()
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            p.copy_(theta[name])
    run.method.reset()
    second = run.params()
    for name in ("torso.4.weight", "torso.4.bias", "head.weight", "head.bias", "torso.1.weight", "torso.1.bias"):
        assert not torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("members", [1, 2])
def test_4_2_reset_layers_get_fresh_draws_and_the_others_exactly_s_theta_plus_p_fresh(members):
    s, p = 0.3, 0.6
    run = Run(LayerResetFlags(reset_layers="last:2", reset_every_updates=1000, reset_shrink=s, reset_perturb=p),
              seeds=range(11, 11 + members), random_seeds=range(101, 101 + members),
              data_seeds=range(201, 201 + members)).train(3)
    theta = run.params()
    run.method.reset()
    after = run.params()
    model = run.model
    # The draws in forward order: torso.1 (S&P), torso.4 (reset), head (reset); weight then bias each.
    expected = {}
    for prefix, layer in (("torso.1", model.torso[1]), ("torso.4", model.torso[4]), ("head", model.head)):
        w, b = fresh_weights(layer, run.twin), fresh_bias(layer, run.twin)
        expected[f"{prefix}.weight"], expected[f"{prefix}.bias"] = w.view_as(weight_view(layer)), b
    for name in ("torso.4.weight", "torso.4.bias", "head.weight", "head.bias"):
        assert torch.equal(after[name], expected[name]), name
    assert torch.equal(after["torso.1.weight"], theta["torso.1.weight"] * s + expected["torso.1.weight"] * p)
    assert torch.equal(after["torso.1.bias"], theta["torso.1.bias"] * s + expected["torso.1.bias"] * p)
    assert torch.equal(after["torso.2.weight"], theta["torso.2.weight"] * s + p)  # LN γ_fresh = 1
    assert torch.equal(after["torso.2.bias"], theta["torso.2.bias"] * s)  # LN β_fresh = 0
    assert (after["torso.5.weight"] == 1).all() and (after["torso.5.bias"] == 0).all()
    assert not torch.equal(theta["torso.1.weight"], after["torso.1.weight"])


def test_without_shrink_and_perturb_the_other_layers_are_untouched():
    run = Run(LayerResetFlags(reset_layers="last:2", reset_every_updates=1000)).train(2)
    theta = run.params()
    run.method.reset()
    after = run.params()
    for name in KEPT:
        assert torch.equal(after[name], theta[name])
    for name in ("torso.4.weight", "head.weight"):
        assert not torch.equal(after[name], theta[name])


# ---------------------------------------------------------------------------------------------- 4.3


@pytest.mark.parametrize("snp", [False, True])
def test_4_3_copy_puts_the_new_online_values_of_the_touched_layers_into_the_target(snp):
    extra = dict(reset_shrink=0.5, reset_perturb=0.5) if snp else {}
    run = Run(LayerResetFlags(reset_layers="last:1", reset_every_updates=1000, **extra)).train(3)
    target_before = run.params(run.target)
    run.method.reset()
    online, target = run.params(), run.params(run.target)
    touched = {"head.weight", "head.bias"} | (set(KEPT) | {"torso.4.weight", "torso.4.bias", "torso.5.weight",
                                                            "torso.5.bias"} if snp else set())
    for name in online:
        if name in touched:
            assert torch.equal(target[name], online[name]), name
        else:
            assert torch.equal(target[name], target_before[name]), name
            assert not torch.equal(target[name], online[name]), name  # the online one trained: the sync is pending


def test_4_3_keep_leaves_the_whole_target_unchanged():
    run = Run(LayerResetFlags(reset_layers="last:2", reset_every_updates=1000, reset_shrink=0.5, reset_perturb=0.5,
                              reset_target="keep")).train(3)
    before = run.params(run.target)
    run.method.reset()
    after = run.params(run.target)
    assert all(torch.equal(after[name], before[name]) for name in before)


# ---------------------------------------------------------------------------------------------- optimiser


@pytest.mark.parametrize("scope", ["all", "touched"])
def test_optimiser_scope(scope):
    run = Run(LayerResetFlags(reset_layers="last:1", reset_every_updates=1000, reset_optimizer_scope=scope)).train(3)
    named = dict(run.model.named_parameters())
    before = {n: {k: v.clone() for k, v in run.optimizer.state[p].items()} for n, p in named.items()}
    run.method.reset()
    for name, p in named.items():
        state = run.optimizer.state[p]
        if scope == "all" or name.startswith("head."):
            assert all((v == 0).all() for v in state.values()), name  # moments and step k
        else:
            assert all(torch.equal(v, before[name][k]) for k, v in state.items()), name
    if scope == "all":
        # Adam restarts at k = 1 everywhere: the first update is -lr * g / (|g| + eps) (property 2.1), ~lr.
        torso = run.params()["torso.1.weight"]
        run.train(1, call_method=False)
        torch.testing.assert_close((run.params()["torso.1.weight"] - torso).abs(),
                                   torch.full_like(torso, 1e-2), rtol=1e-3, atol=0)


def test_frozen_parameters_are_never_rewritten():
    run = Run(LayerResetFlags(reset_layers="last:1", reset_every_updates=1000, reset_shrink=0.5,
                              reset_perturb=0.5), build=False).train(2, call_method=False)
    run.model.head.weight.requires_grad_(False)
    method = run.flags.build(run.parts)
    before = run.params()
    method.reset()
    after = run.params()
    assert torch.equal(after["head.weight"], before["head.weight"])
    assert not torch.equal(after["head.bias"], before["head.bias"])


# ---------------------------------------------------------------------------------------------- 4.4 schedule


def _events(method, stop, envs=1, tasks=()):
    """Steps t (env-step clock, vector steps of ``envs``) at which ``method`` fired, up to ``stop``."""
    fired, previous = [], 0
    for t in range(envs, stop + 1, envs):
        method.after_env_step(previous, t, False, None)
        if t in tasks:
            method.on_task_switch()
        if method.rewrote:
            fired.append(t)
            method.rewrote = False
        previous = t
    return fired


@pytest.mark.parametrize("envs", [1, 4])
def test_4_4_schedule_20k_until_100k(envs):
    run = Run(LayerResetFlags(reset_layers="last:1", reset_every=20_000, no_resets_after=100_000))
    assert _events(run.method, 120_000, envs) == [20_000, 40_000, 60_000, 80_000]
    assert run.method.events.count.tolist() == [4]


@pytest.mark.parametrize("envs", [1, 3, 4])
def test_4_4_schedule_with_learning_starts_and_vector_steps(envs):
    setting = Setting(learning_starts=20_000)  # the event at 20k is not > learning_starts
    run = Run(LayerResetFlags(reset_layers="last:1", reset_every=20_000, no_resets_after=100_000), setting=setting)
    fired = _events(run.method, 120_000, envs)
    # a vector step of 3 envs crosses 40k at 40,002: the event of the crossed multiple fires in that step
    assert fired == [-(-e // envs) * envs for e in (40_000, 60_000, 80_000)]
    offset = Run(LayerResetFlags(reset_layers="last:1", reset_every=20_000, reset_offset=5_000,
                                 no_resets_after=100_000), setting=Setting(learning_starts=30_000))
    assert _events(offset.method, 120_000) == [45_000, 65_000]  # 85k + 20k > 100k; 25k <= learning starts
    endless = Run(LayerResetFlags(reset_layers="last:1", reset_every=20_000))
    assert _events(endless.method, 120_000, envs) == [-(-e // envs) * envs for e in range(20_000, 120_001, 20_000)]


def test_4_4_reset_at_task_switch_resets_at_the_switch_steps_only():
    run = Run(LayerResetFlags(reset_layers="last:2", reset_at_task_switch=True))
    assert _events(run.method, 50_000, tasks={7_000, 31_000}) == [7_000, 31_000]


def test_update_schedule_counts_gradient_steps():
    run = Run(LayerResetFlags(reset_layers="last:1", reset_every_updates=3, reset_offset=1))
    fired = []
    for u in range(1, 15):
        run.method.after_update(u - 1, u, None)
        if run.method.rewrote:
            fired.append(u)
            run.method.rewrote = False
        run.method.after_env_step(u - 1, u, False, None)  # the env-step schedule is off
        assert not run.method.rewrote
    assert fired == [4, 7, 10, 13]


def test_due():
    assert [t for t in range(1, 101) if due(t - 1, t, 20, until=100)] == [20, 40, 60, 80]
    assert due(0, 10, 3)  # events 3, 6 and 9 in one call: it fires (once)
    assert not due(0, 10, 3, until=5)  # 3 + 3 > 5: no full interval remains
    assert due(0, 10, 3, until=6)
    assert due(5, 10, 3, until=9) and not due(6, 10, 3, until=9)  # 6 is the last event allowed
    assert not due(0, 10, 3, after=9) and due(0, 10, 3, after=8)  # the event must be > learning starts
    assert not due(0, 10, 0)


# ---------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, setting, message", [
    (dict(reset_every=100), Setting(), "without --reset-layers"),
    (dict(reset_shrink=0.5, reset_perturb=0.5), Setting(), "without --reset-layers"),
    (dict(reset_target="keep"), Setting(), "--reset-target without --reset-layers"),
    (dict(reset_layers="last:1"), Setting(), "without a schedule"),
    (dict(reset_layers="last:1", reset_every=10, reset_every_updates=10), Setting(), "duplicate schedule"),
    (dict(reset_layers="last:1", reset_at_task_switch=True), Setting(task_switches=False), "no task switches"),
    (dict(reset_layers="last:1", reset_every=10, reset_shrink=0.5), Setting(), "go together"),
    (dict(reset_layers="last:1", reset_every=10, reset_perturb=0.5), Setting(), "go together"),
    (dict(reset_layers="all", reset_every=10, reset_shrink=0.5, reset_perturb=0.5), Setting(), "none is left"),
    (dict(reset_layers="last:0", reset_every=10), Setting(), "must be >= 1"),
    (dict(reset_layers="last:x", reset_every=10), Setting(), "last:K"),
    (dict(reset_layers="torso.1,,head", reset_every=10), Setting(), "comma list"),
    (dict(reset_layers="head,head", reset_every=10), Setting(), "twice"),
    (dict(reset_layers="last:1", reset_every_updates=10, no_resets_after=100), Setting(), "--no-resets-after"),
    (dict(reset_layers="last:1", reset_at_task_switch=True, reset_offset=3), Setting(), "--reset-offset"),
    (dict(reset_layers="last:1", reset_every=10, reset_target="both"), Setting(), "--reset-target"),
    (dict(reset_layers="last:1", reset_every=10, reset_optimizer_scope="some"), Setting(), "--reset-optimizer-scope"),
])
def test_configuration_errors(flags, setting, message):
    with pytest.raises(ValueError, match=message):
        LayerResetFlags(**flags).check(setting)


def test_head_reset_every_with_reset_layers_is_an_error():
    @dataclass
    class Both(HeadResetFlags, LayerResetFlags):  # what the agents' Args are: every method's flags
        pass

    def check(flags):  # as the registry does: each method's check on the full flags
        for method in (HeadResetFlags, LayerResetFlags):
            method.check(flags, Setting())

    with pytest.raises(ValueError, match="--reset-head-every with --reset-layers"):
        check(Both(reset_head_every=5, reset_layers="last:1", reset_every=10))
    check(Both(reset_head_every=5))
    check(Both(reset_layers="last:1", reset_every=10))


@pytest.mark.parametrize("spec, message", [
    ("torso.3,head", r"no layer named torso.3 .*the layers are torso.1, torso.4, head"),
    ("torso.2", "torso.2 is a LayerNorm, reset with its layer torso.1"),
    ("last:4", r"last:4: this network has 3 layers \(torso.1, torso.4, head\)"),
    ("torso.1,torso.4,head", "none is left"),
])
def test_build_checks_the_layers_against_the_model(spec, message):
    flags = LayerResetFlags(reset_layers=spec, reset_every=10, reset_shrink=0.5, reset_perturb=0.5)
    run = Run(flags, build=False)
    with pytest.raises(ValueError, match=message):
        flags.build(run.parts)


def test_off_builds_nothing():
    assert LayerResetFlags().build(Run(LayerResetFlags(), build=False).parts) is None


# ---------------------------------------------------------------------------------------------- head reset


def test_head_reset_every_is_the_last_1_case_with_unchanged_behaviour():
    """--reset-head-every 3 = --reset-layers last:1 --reset-every-updates 3 --reset-optimizer-scope touched:
    the same draws, target copy and optimiser clear as methods.md §8's reset_head_."""
    head = Run(HeadResetFlags(reset_head_every=3)).train(2)
    assert isinstance(head.method, LayerReset)
    assert head.method.name == "reset_head" and head.method.tag == "plasticity/head_resets"
    alias = Run(LayerResetFlags(reset_layers="last:1", reset_every_updates=3, reset_optimizer_scope="touched")).train(2)
    reference = Run(HeadResetFlags(reset_head_every=3)).train(2, call_method=False)
    head.train(1)  # update 3: the reset
    alias.train(1)
    reference.train(1, call_method=False)
    reset_head_(reference.model, reference.optimizer, reference.target, reference.random)
    for run in (head, alias):
        for name, value in reference.params().items():
            assert torch.equal(run.params()[name], value), name
        for name, value in reference.params(reference.target).items():
            assert torch.equal(run.params(run.target)[name], value), name
        for p, q in zip(run.model.parameters(), reference.model.parameters()):
            for key, value in reference.optimizer.state[q].items():
                assert torch.equal(run.optimizer.state[p][key], value)
    assert head.method.scalars().keys() == {"plasticity/head_resets"}
    assert head.method.scalars()["plasticity/head_resets"].tolist() == [1]
    assert set(head.method.state_dict()) == {"events"}


def test_head_reset_at_task_switches():
    run = Run(HeadResetFlags(reset_head_every=-1)).train(5)
    assert run.method.events.count.tolist() == [0]
    before = run.params()["head.weight"]
    run.method.on_task_switch()
    assert run.method.events.count.tolist() == [1] and not torch.equal(run.params()["head.weight"], before)


# ---------------------------------------------------------------------------------------------- populations


def _population_flags():
    return LayerResetFlags(reset_layers="last:2", reset_every_updates=3, reset_shrink=0.4, reset_perturb=0.5)


def test_member_k_of_a_2_member_population_is_the_same_member_alone():
    population = Run(_population_flags(), seeds=(11, 12), random_seeds=(101, 102), data_seeds=(201, 202)).train(8)
    assert population.method.events.count.tolist() == [2, 2]
    for k in range(2):
        single = Run(_population_flags(), seeds=(11 + k,), random_seeds=(101 + k,), data_seeds=(201 + k,)).train(8)
        ours, theirs = population.member(k), single.member(0)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12, msg=key)


def test_changing_member_0_changes_nothing_in_member_1():
    base = Run(_population_flags(), seeds=(11, 12), random_seeds=(101, 102), data_seeds=(201, 202)).train(8)
    changed = Run(_population_flags(), seeds=(7, 12), random_seeds=(77, 102), data_seeds=(777, 202)).train(8)
    assert not torch.equal(changed.member(0)["online.head.weight"], base.member(0)["online.head.weight"])
    for key, value in base.member(1).items():
        assert torch.equal(changed.member(1)[key], value), key


def test_a_reset_does_not_sync():
    run = Run(_population_flags(), seeds=(11, 12), random_seeds=(101, 102), data_seeds=(201, 202)).train(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.method.reset()
    ops = {e.key for e in prof.key_averages()}
    assert not {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"} & ops


def test_state_dict_round_trip():
    run = Run(_population_flags()).train(7)
    state = run.method.state_dict()
    other = Run(_population_flags())
    other.method.load_state_dict(state)
    assert other.method.events.count.tolist() == [2]


def test_conv_layers_with_layer_norm_over_channels_and_space():
    """A small CNN (conv LN over [C, H, W]): reset all layers of a 2-member population = each member alone."""
    def build(seeds, random_seeds):
        generators = init_generators(seeds)
        torso = build_torso("cnn", (2, 8, 8), layer_norm=True, members=len(seeds), generators=generators)
        model = nn.Sequential(torso, MemberLinear(len(seeds), torso.out_features, 3, generators=generators))
        target = copy.deepcopy(model)
        parts = Parts(model, None, target, MemberRandom(random_seeds), Setting())
        method = LayerResetFlags(reset_layers="all", reset_at_task_switch=True).build(parts)
        return model, target, method

    model, target, method = build([11, 12], [101, 102])
    before = {id(p): p.detach().clone() for p in model.parameters()}
    assert [g.name for g in method.groups] == ["0.0", "0.3", "0.7", "1"]
    method.on_task_switch()
    for group in method.groups:
        for _, norm in group.norms:
            assert (norm.weight == 1).all() and (norm.bias == 0).all()
        assert not torch.equal(group.layer.weight, before[id(group.layer.weight)])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), target.parameters()))
    for k in range(2):
        single, _, single_method = build([11 + k], [101 + k])
        single_method.on_task_switch()
        for p, q in zip(model.parameters(), single.parameters()):
            assert torch.equal(p.detach()[k].contiguous(), q.detach()[0].contiguous())
