"""methods-v2.md §2: optimiser-state resets (properties 2.1-2.4), their schedule, and their configuration errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from plasticity.intervention import Parts, Setting
from plasticity.optimizer_reset import OptimizerReset, ResetOptimizerFlags, reset_optimizer_state_
from plasticity.optimizers import OptimizerFlags, build_lr_scheduler, build_optimizer
from plasticity.population import MemberLinear
from plasticity.resets import clear_optimizer_state_, zero_optimizer_entries_
from plasticity.streams import MemberRandom
from plasticity.upgd import UPGD

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add overhead

LR = 1e-2


def _param(seed: int = 0, shape=(3, 4)) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def _history(optimizer, params, steps: int = 20, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def _adam_like(kind: str, params):
    model = nn.ParameterList(params)
    flags = {"adam": OptimizerFlags(), "adamw": OptimizerFlags(optimizer="adamw"),
             "entry": OptimizerFlags(adam_per_entry_step=True)}[kind]
    return build_optimizer(model, flags, LR)


# ---- 2.1, 2.2 and the ablations ----

@pytest.mark.parametrize("kind", ["adam", "adamw", "entry"])
def test_2_1_after_all_the_next_update_is_the_first_adam_step(kind):
    p = _param()
    optimizer = _adam_like(kind, [p])
    _history(optimizer, [p])
    reset_optimizer_state_(optimizer, "all")
    g = torch.tensor([[1.0, -2.0, 1e-3, 0.5]] * 3)
    p.grad = g.clone()
    before = p.detach().clone()
    optimizer.step()
    eps = optimizer.defaults["eps"]
    # float32 positions near 1: compare where θ lands (an ulp ~1e-7) -- 1e-5 of the update
    torch.testing.assert_close(p.detach(), before - LR * g / (g.abs() + eps), rtol=0.0, atol=2.5e-7)
    assert (p.detach() - before).abs().max() > 0.9 * LR


@pytest.mark.parametrize("kind", ["adam", "adamw", "entry"])
def test_2_2_after_step_the_moments_are_kept_and_rebiased_at_k_1(kind):
    p = _param()
    optimizer = _adam_like(kind, [p])
    _history(optimizer, [p])
    state = optimizer.state[p]
    m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    reset_optimizer_state_(optimizer, "step")
    assert torch.equal(state["exp_avg"], m) and torch.equal(state["exp_avg_sq"], v)
    assert torch.count_nonzero(state["step"]) == 0
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    p.grad = g.clone()
    before = p.detach().clone()
    optimizer.step()
    (beta1, beta2), eps = optimizer.defaults["betas"], optimizer.defaults["eps"]
    m1, v1 = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
    expected = -LR * (m1 / (1 - beta1)) / ((v1 / (1 - beta2)).sqrt() + eps)
    torch.testing.assert_close(p.detach(), before + expected, rtol=0.0, atol=2.5e-7)


@pytest.mark.parametrize("which, zeroed", [("m", {"exp_avg"}), ("v", {"exp_avg_sq"}),
                                           ("all", {"exp_avg", "exp_avg_sq", "step"})])
@pytest.mark.parametrize("kind", ["adam", "entry"])
def test_each_choice_zeroes_exactly_its_state_in_place(which, zeroed, kind):
    params = [_param(0), _param(1, (5,))]
    optimizer = _adam_like(kind, params)
    _history(optimizer, params)
    groups = optimizer.param_groups
    group_ids = [[id(p) for p in g["params"]] for g in groups]
    snapshot = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    tensors = {id(p): {k: v for k, v in optimizer.state[p].items()} for p in params}
    reset_optimizer_state_(optimizer, which)
    for p in params:
        for key, value in optimizer.state[p].items():
            assert value is tensors[id(p)][key]  # in place
            if key in zeroed:
                assert torch.count_nonzero(value) == 0, key
            else:
                assert torch.equal(value, snapshot[id(p)][key]), key
    assert optimizer.param_groups is groups and [[id(p) for p in g["params"]] for g in groups] == group_ids
    assert all(g["lr"] == LR for g in groups)


def test_reset_leaves_the_lr_schedule_alone():
    p = _param()
    flags = OptimizerFlags(lr_schedule="linear", lr_end=0.0)
    optimizer = build_optimizer(nn.ParameterList([p]), flags, LR)
    scheduler = build_lr_scheduler(optimizer, flags, 10)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    lr = optimizer.param_groups[0]["lr"]
    reset_optimizer_state_(optimizer, "all")
    assert optimizer.param_groups[0]["lr"] == lr and scheduler.last_epoch == 3


def test_sgd_all_and_m_zero_the_momentum_and_v_or_step_are_errors():
    p = _param()
    optimizer = build_optimizer(nn.ParameterList([p]), OptimizerFlags(optimizer="sgd", sgd_momentum=0.9), LR)
    _history(optimizer, [p])
    buffer = optimizer.state[p]["momentum_buffer"]
    for which in ("v", "step"):
        with pytest.raises(ValueError, match=f"--reset-optimizer-state {which} with --optimizer sgd"):
            reset_optimizer_state_(optimizer, which)
    for which in ("all", "m"):
        buffer.fill_(1.0)
        reset_optimizer_state_(optimizer, which)
        assert optimizer.state[p]["momentum_buffer"] is buffer and torch.count_nonzero(buffer) == 0
    g = torch.randn(3, 4)
    p.grad, before = g.clone(), p.detach().clone()
    optimizer.step()  # a zeroed buffer is a fresh one: b = g
    torch.testing.assert_close(p.detach(), before - LR * g)


@pytest.mark.parametrize("which, zeroed", [("all", {"avg_utility", "first_moment", "sec_moment", "step"}),
                                           ("m", {"first_moment"}), ("v", {"sec_moment"}), ("step", {"step"})])
def test_upgd_resets(which, zeroed):
    p = _param()
    optimizer = UPGD([p], lr=LR)
    _history(optimizer, [p], steps=5)
    snapshot = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
    reset_optimizer_state_(optimizer, which)
    for key, value in optimizer.state[p].items():
        if key == "step":
            assert value == (0 if "step" in zeroed else 5)
        elif key in zeroed:
            assert torch.count_nonzero(value) == 0
        else:
            assert torch.equal(value, snapshot[key])


def test_a_wrapper_resets_its_base_only_and_kron_resets_through_its_own_method():
    p = _param()
    base = _adam_like("adam", [p])
    _history(base, [p])

    class Wrapper:  # TRAC-like: its own state (θ_ref) stays
        def __init__(self, base):
            self.base, self.state = base, {p: {"theta_ref": torch.ones(3, 4)}}

    wrapper = Wrapper(base)
    reset_optimizer_state_(wrapper, "v")
    assert torch.count_nonzero(base.state[p]["exp_avg_sq"]) == 0 and torch.count_nonzero(base.state[p]["exp_avg"])
    assert torch.equal(wrapper.state[p]["theta_ref"], torch.ones(3, 4))

    class KronLike(torch.optim.SGD):
        calls = 0

        def reset_state_(self):
            self.calls += 1

    kron = KronLike([p], lr=LR)
    reset_optimizer_state_(kron, "all")
    assert kron.calls == 1
    with pytest.raises(ValueError, match="kron: only a full state clear"):
        reset_optimizer_state_(kron, "m")


# ---- partial resets (§2.3, 2.4) ----

@pytest.mark.parametrize("per_entry, expected", [(False, 0.1 / math.sqrt(0.001)), (True, 1.0)])
def test_2_4_a_zeroed_row_at_shared_k_1e4_moves_by_3_162_lr_or_lr_per_entry(per_entry, expected):
    layer = nn.Linear(3, 4)
    optimizer = build_optimizer(layer, OptimizerFlags(adam_per_entry_step=per_entry), LR)
    params = [layer.weight, layer.bias]
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer.step()
    for state in optimizer.state.values():
        state["step"].fill_(10_000)  # the shared k = 10^4 of a long run (its moments are some history)
    row = torch.zeros(1, 4, 1, dtype=torch.bool)
    row[0, 1] = True
    kept = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}
    zero_optimizer_entries_(optimizer, layer, layer.weight, row)
    state = optimizer.state[layer.weight]
    assert torch.count_nonzero(state["exp_avg"][1]) == 0 and torch.count_nonzero(state["exp_avg_sq"][1]) == 0
    others = [0, 2, 3]
    assert torch.equal(state["exp_avg"][others], kept["exp_avg"][others])
    if per_entry:
        assert torch.count_nonzero(state["step"][1]) == 0 and torch.equal(state["step"][others],
                                                                           kept["step"][others])
    else:
        assert float(state["step"]) == 10_000  # one k per tensor: it stays
    g = torch.tensor([0.7, -1.3, 2.0])
    layer.weight.grad = torch.zeros(4, 3)
    layer.weight.grad[1] = g
    layer.bias.grad = None
    before = layer.weight.detach().clone()
    optimizer.step()
    update = (layer.weight.detach() - before)[1]
    torch.testing.assert_close(update.abs() / LR, torch.full((3,), expected), rtol=1e-3, atol=0.0)
    assert torch.equal(torch.sign(update), -torch.sign(g))


def test_zero_entries_touch_only_the_masked_member_of_a_population():
    layer = MemberLinear(2, 3, 4, generators=[torch.Generator().manual_seed(k) for k in range(2)])
    optimizer = build_optimizer(layer, OptimizerFlags(adam_per_entry_step=True), LR)
    _history(optimizer, [layer.weight, layer.bias], steps=3)
    mask = torch.zeros(2, 4, 1, dtype=torch.bool)
    mask[1, 2] = True  # member 1, unit 2
    kept = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}
    zero_optimizer_entries_(optimizer, layer, layer.weight, mask)
    for key, value in optimizer.state[layer.weight].items():
        assert torch.count_nonzero(value[1, 2]) == 0
        assert torch.equal(value[0], kept[key][0]) and torch.equal(value[1, [0, 1, 3]], kept[key][1, [0, 1, 3]])


def test_clear_state_handles_every_optimiser():
    p = _param()
    for optimizer in (_adam_like("adam", [p]), _adam_like("entry", [p]), UPGD([p], lr=LR),
                      build_optimizer(nn.ParameterList([p]), OptimizerFlags(optimizer="sgd", sgd_momentum=0.9), LR)):
        _history(optimizer, [p], steps=3)
        clear_optimizer_state_(optimizer, p)
        for value in optimizer.state[p].values():
            assert (value == 0) if not torch.is_tensor(value) else torch.count_nonzero(value) == 0

    class KronLike(torch.optim.Adam):
        def reset_state_(self):
            pass

    kron = KronLike([p], lr=LR)
    _history(kron, [p], steps=1)
    clear_optimizer_state_(kron, p)
    assert p not in kron.state  # dropped: the preconditioner is rebuilt


# ---- the intervention and its schedule (2.3) ----

def _parts(optimizer, model, learning_starts=80_000, task_switches=True) -> Parts:
    return Parts(model, optimizer, None, MemberRandom([0]), Setting(learning_starts=learning_starts,
                                                                      task_switches=task_switches))


def test_2_3_target_update_resets_follow_the_cleanrl_dqn_syncs():
    learning_starts, period, frequency = 80_000, 1000, 4
    model = nn.Linear(2, 1)
    optimizer = build_optimizer(model, OptimizerFlags(), LR)
    reset = ResetOptimizerFlags(reset_optimizer="target-update").build(_parts(optimizer, model))
    events, updates, resets = [], 0, []
    original = reset.reset

    def recording_reset():
        resets.append((t, updates))
        assert events and events[-1] == ("sync", t)  # right after the sync of this env step
        original()

    reset.reset = recording_reset
    for t in range(1, 85_001):
        if t > learning_starts and t % frequency == 0:
            updates += 1
        synced = t > learning_starts and t % period == 0  # CleanRL: syncs only once learning has started
        if synced:
            events.append(("sync", t))
        reset.after_env_step(t - 1, t, synced, None)
        reset.end_env_step(t - 1, t)
    assert [t for t, _ in resets] == [81_000, 82_000, 83_000, 84_000, 85_000]
    assert [b - a for (_, a), (_, b) in zip(resets, resets[1:])] == [250] * 4
    assert int(reset.scalars()["optim/optimizer_resets"]) == 5
    # a loop that synced before learning starts still gets no reset there
    early = ResetOptimizerFlags(reset_optimizer="target-update").build(_parts(optimizer, model))
    early.after_env_step(999, 1000, True, None)
    assert int(early.scalars()["optim/optimizer_resets"]) == 0


def test_every_trigger_counts_env_steps_after_learning_starts_and_task_switch_trigger():
    model = nn.Linear(2, 1)
    optimizer = build_optimizer(model, OptimizerFlags(), LR)
    every = ResetOptimizerFlags(reset_optimizer="every", reset_optimizer_every=500).build(
        _parts(optimizer, model, learning_starts=1000))
    fired = []
    for t in range(4, 3001, 4):  # 4 envs per vector step
        before = int(every.scalars()["optim/optimizer_resets"])
        every.after_env_step(t - 4, t, True, None)
        every.on_task_switch()
        every.end_env_step(t - 4, t)
        if int(every.scalars()["optim/optimizer_resets"]) > before:
            fired.append(t)
    assert fired == [1500, 2000, 2500, 3000]
    switch = ResetOptimizerFlags(reset_optimizer="task-switch").build(_parts(optimizer, model))
    switch.after_env_step(0, 100_000, True, None)
    switch.end_env_step(0, 100_000)
    assert int(switch.scalars()["optim/optimizer_resets"]) == 0
    switch.on_task_switch()
    assert int(switch.scalars()["optim/optimizer_resets"]) == 1
    restored = ResetOptimizerFlags(reset_optimizer="task-switch").build(_parts(optimizer, model))
    restored.load_state_dict(switch.state_dict())
    assert int(restored.scalars()["optim/optimizer_resets"]) == 1


def test_the_intervention_resets_the_state_it_is_given():
    p = _param()
    optimizer = _adam_like("adam", [p])
    _history(optimizer, [p])
    m = optimizer.state[p]["exp_avg"].clone()
    reset = OptimizerReset(optimizer, "task-switch", "v")
    reset.on_task_switch()
    assert torch.equal(optimizer.state[p]["exp_avg"], m) and torch.count_nonzero(optimizer.state[p]["exp_avg_sq"]) == 0
    assert ResetOptimizerFlags().build(_parts(optimizer, nn.Linear(1, 1))) is None


# ---- configuration errors ----

@dataclass
class Args(ResetOptimizerFlags, OptimizerFlags):
    hare_tortoise_target: str = "online"


@pytest.mark.parametrize("flags, setting, message", [
    (Args(reset_optimizer_every=100), Setting(), "--reset-optimizer-every 100 needs --reset-optimizer every"),
    (Args(reset_optimizer="target-update", reset_optimizer_every=100), Setting(), "needs --reset-optimizer every"),
    (Args(reset_optimizer="every"), Setting(), "--reset-optimizer every needs --reset-optimizer-every"),
    (Args(reset_optimizer_state="v"), Setting(), "--reset-optimizer-state v needs --reset-optimizer"),
    (Args(reset_optimizer="task-switch"), Setting(task_switches=False), "this run has no task switches"),
    (Args(reset_optimizer="target-update", optimizer="sgd", reset_optimizer_state="v"), Setting(),
     "--reset-optimizer-state v with --optimizer sgd"),
    (Args(reset_optimizer="target-update", optimizer="sgd", reset_optimizer_state="step"), Setting(),
     "--reset-optimizer-state step with --optimizer sgd"),
    (Args(reset_optimizer="target-update", optimizer="kron", reset_optimizer_state="m"), Setting(),
     "--reset-optimizer-state m with --optimizer kron"),
    (Args(reset_optimizer="target-update", hare_tortoise_target="tortoise"), Setting(),
     "--hare-tortoise-target tortoise"),
    (Args(reset_optimizer="sometimes"), Setting(), "unknown --reset-optimizer"),
    (Args(reset_optimizer="every", reset_optimizer_every=5, reset_optimizer_state="mv"), Setting(),
     "unknown --reset-optimizer-state"),
])
def test_configuration_errors(flags, setting, message):
    with pytest.raises(ValueError, match=message):
        ResetOptimizerFlags.check(flags, setting)


@pytest.mark.parametrize("flags", [
    Args(), Args(reset_optimizer="target-update", reset_optimizer_state="step"),
    Args(reset_optimizer="every", reset_optimizer_every=1000, optimizer="sgd", reset_optimizer_state="m"),
    Args(reset_optimizer="task-switch", optimizer="upgd", reset_optimizer_state="v"),
    Args(reset_optimizer="target-update", optimizer="kron"),
])
def test_valid_combinations_pass(flags):
    ResetOptimizerFlags.check(flags, Setting())
