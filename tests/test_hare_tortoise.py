"""Hare & Tortoise (methods-v2.md §9): properties 9.1-9.4, the schedule, the roles, the flag rules, populations."""

import copy
from dataclasses import dataclass

import pytest
import torch

from plasticity.hare_tortoise import HareTortoise, HareTortoiseFlags
from plasticity.intervention import Parts, Setting
from plasticity.layer_resets import LayerResetFlags
from plasticity.streams import MemberRandom
from tests.test_layer_resets import QNet

pytestmark = pytest.mark.usefixtures("one_thread")

OBS = (5,)
ENVS = 4  # env steps per update in Run.train (train frequency 4, one env)


class Run:
    """A float64 population, its target, Adam, and H&T from flags; a TD-style loss that bootstraps from the target."""

    def __init__(self, seeds=(11,), data_seeds=(201,), setting=None, polyak=None, **flags):
        setting = Setting() if setting is None else setting
        self.model = QNet(list(seeds)).double()
        self.target = copy.deepcopy(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.data = [torch.Generator().manual_seed(s) for s in data_seeds]
        self.flags = HareTortoiseFlags(hare_tortoise=True, **flags)
        self.flags.check(setting)
        self.parts = Parts(self.model, self.optimizer, self.target, MemberRandom([1] * len(seeds)), setting)
        self.method = self.flags.build(self.parts) if polyak is None else None
        self.polyak = polyak  # instead of H&T: a Polyak target with this tau after every update
        self.update, self.t = 0, 0

    def train(self, updates):
        for _ in range(updates):
            self.update += 1
            x = torch.stack([torch.randn(8, *OBS, generator=g) for g in self.data]).double()
            x2 = torch.stack([torch.randn(8, *OBS, generator=g) for g in self.data]).double()
            with torch.no_grad():
                y = 1.0 + 0.9 * self.target(x2).max(dim=2).values
            loss = (self.model(x).max(dim=2).values - y).pow(2).mean(dim=1).sum()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            if self.method is not None:
                self.method.after_update(self.update - 1, self.update, None)
                previous, self.t = self.t, self.t + ENVS
                self.method.after_env_step(previous, self.t, False, None)
                self.method.rewrote = False
            else:
                with torch.no_grad():
                    for p, q in zip(self.target.parameters(), self.model.parameters()):
                        p.mul_(1 - self.polyak).add_(q * self.polyak)
        return self


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_9_1_ema_toward_a_constant_hare():
    rho, k = 0.9, 20
    run = Run(hare_tortoise_ema=rho).train(2)
    with torch.no_grad():  # θ_T⁰ != θ_H
        for p in run.method.tortoise.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    start, hare = _params(run.method.tortoise), _params(run.model)
    for u in range(k):
        run.method.after_update(u, u + 1, None)
    assert _equal(_params(run.model), hare)
    for now, t0, h in zip(_params(run.method.tortoise), start, hare):
        torch.testing.assert_close(now, h + rho ** k * (t0 - h), rtol=0, atol=1e-6)
        assert not torch.allclose(now, h, atol=1e-3)


def test_the_tortoise_starts_as_a_copy_of_the_hare():
    run = Run()
    assert _equal(_params(run.method.tortoise), _params(run.model))
    assert run.method.tortoise is not run.model and run.method.tortoise is not run.target


@pytest.mark.parametrize("reset_optimizer", [True, False])
def test_9_2_hare_reset(reset_optimizer):
    run = Run(hare_tortoise_ema=0.5, hare_tortoise_reset_every=0,
              hare_tortoise_reset_optimizer=reset_optimizer).train(4)
    tortoise, hare = _params(run.method.tortoise), _params(run.model)
    assert not _equal(tortoise, hare)
    params = list(run.model.parameters())
    moments = [{k: v.clone() for k, v in run.optimizer.state[p].items()} for p in params]
    run.method.reset_hare()
    assert run.method.rewrote
    assert _equal(_params(run.model), tortoise) and _equal(_params(run.method.tortoise), tortoise)
    assert [id(p) for p in run.model.parameters()] == [id(p) for p in params]  # in place (R1)
    for p, before in zip(params, moments):
        state = run.optimizer.state[p]
        if reset_optimizer:
            assert all((v == 0).all() for v in state.values())  # m, v and k
        else:
            assert all(torch.equal(v, before[k]) for k, v in state.items())
    assert run.method.scalars()["plasticity/hare_resets"].tolist() == [1]


@pytest.mark.parametrize("target", ["network", "tortoise"])
def test_9_3_the_tortoise_gets_no_gradient_and_is_not_in_the_optimiser(target):
    run = Run(hare_tortoise_target=target).train(3)
    tortoise = run.method.tortoise
    in_optimizer = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    for p in tortoise.parameters():
        assert not p.requires_grad and p.grad is None and id(p) not in in_optimizer
    assert (tortoise is run.target) == (target == "tortoise")
    assert all(p.grad is not None for p in run.model.parameters())


def test_9_4_tortoise_target_mode_is_a_polyak_target_with_tau_1_minus_rho_every_update():
    rho = 0.8
    ours = Run(hare_tortoise_ema=rho, hare_tortoise_target="tortoise", hare_tortoise_reset_every=0).train(12)
    polyak = Run(polyak=1 - rho).train(12)
    assert ours.method.tortoise is ours.target
    for a, b in zip(_params(ours.target), _params(polyak.target)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(_params(ours.model), _params(polyak.model)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert not _equal(_params(ours.target), _params(ours.model))


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("envs", [1, 4, 3])
def test_hare_resets_every_n_env_steps_after_learning_starts(envs):
    run = Run(hare_tortoise_reset_every=1000, setting=Setting(learning_starts=2000))
    fired, previous = [], 0
    for t in range(envs, 6001, envs):
        run.method.after_env_step(previous, t, False, None)
        if run.method.rewrote:
            fired.append(t)
            run.method.rewrote = False
        previous = t
    assert fired == [-(-e // envs) * envs for e in (3000, 4000, 5000, 6000)]


def test_hare_reset_at_task_switches_only_when_asked():
    run = Run(hare_tortoise_reset_every=0)
    run.method.on_task_switch()
    assert not run.method.rewrote
    run = Run(hare_tortoise_reset_every=0, hare_tortoise_reset_at_task_switch=True)
    run.method.on_task_switch()
    assert run.method.rewrote and run.method.events.count.tolist() == [1]


def test_roles():
    run = Run()
    method = run.method
    assert method.model_for("act") is run.model and method.model_for("eval") is method.tortoise
    assert method.model_for("act", run.model.q_values) == run.model.q_values
    tortoise_q = method.model_for("eval", run.model.q_values)
    assert tortoise_q.__self__ is method.tortoise and tortoise_q.__name__ == "q_values"
    swapped = Run(hare_tortoise_act="tortoise", hare_tortoise_eval="hare").method
    assert swapped.model_for("act") is swapped.tortoise and swapped.model_for("eval") is swapped.model
    with pytest.raises(ValueError, match="role"):
        method.model_for("target")


def test_state_dict_round_trip_restores_the_tortoise(tmp_path):
    run = Run(hare_tortoise_reset_every=8).train(5)
    torch.save(run.method.state_dict(), tmp_path / "ht.pt")
    other = Run(seeds=(5,))
    other.method.load_state_dict(torch.load(tmp_path / "ht.pt", weights_only=True))
    assert _equal(_params(other.method.tortoise), _params(run.method.tortoise))
    assert other.method.events.count.tolist() == run.method.events.count.tolist() == [2]
    target_mode = Run(hare_tortoise_target="tortoise").method
    assert set(target_mode.state_dict()) == {"events"}  # the target network is checkpointed by the loop


# ---------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, setting, message", [
    (dict(hare_tortoise_ema=0.99), Setting(), "--hare-tortoise-ema without --hare-tortoise"),
    (dict(hare_tortoise_target="tortoise"), Setting(), "--hare-tortoise-target without --hare-tortoise"),
    (dict(hare_tortoise_reset_optimizer=False), Setting(), "--no-hare-tortoise-reset-optimizer without"),
    (dict(hare_tortoise=True, hare_tortoise_reset_at_task_switch=True), Setting(task_switches=False),
     "no task switches"),
    (dict(hare_tortoise=True, hare_tortoise_act="both"), Setting(), "--hare-tortoise-act"),
])
def test_configuration_errors(flags, setting, message):
    with pytest.raises(ValueError, match=message):
        HareTortoiseFlags(**flags).check(setting)


def test_hare_tortoise_with_layer_resets_is_an_error():
    @dataclass
    class Both(HareTortoiseFlags, LayerResetFlags):
        pass

    with pytest.raises(ValueError, match="--hare-tortoise with --reset-layers"):
        HareTortoiseFlags.check(Both(hare_tortoise=True, reset_layers="last:1", reset_every=10), Setting())
    HareTortoiseFlags.check(Both(hare_tortoise=True), Setting())
    assert HareTortoiseFlags().build(Run().parts) is None


# ---------------------------------------------------------------------------------------------- populations


def test_member_k_of_a_2_member_population_is_the_same_member_alone():
    flags = dict(hare_tortoise_ema=0.7, hare_tortoise_reset_every=12)
    population = Run(seeds=(11, 12), data_seeds=(201, 202), **flags).train(10)
    assert population.method.events.count.tolist() == [3, 3]
    for k in range(2):
        single = Run(seeds=(11 + k,), data_seeds=(201 + k,), **flags).train(10)
        pairs = [(population.model, single.model), (population.method.tortoise, single.method.tortoise),
                 (population.target, single.target)]
        for ours, theirs in pairs:
            for a, b in zip(ours.parameters(), theirs.parameters()):
                torch.testing.assert_close(a.detach()[k], b.detach()[0], rtol=1e-10, atol=1e-12)
        for a, b in zip(population.model.parameters(), single.model.parameters()):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(population.optimizer.state[a][key][k], single.optimizer.state[b][key][0],
                                           rtol=1e-10, atol=1e-12)


def test_is_an_intervention():
    assert isinstance(Run().method, HareTortoise)
