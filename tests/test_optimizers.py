"""methods-v2.md §1 (optimisers, decoupled decay), the LR schedule, and the optimiser flags' configuration errors."""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from plasticity.flags import check_ranges, declared_ranges
from plasticity.intervention import Setting
from plasticity.networks import build_torso
from plasticity.optimizers import (
    AdamPerEntryStep,
    DecoupledSGD,
    OptimizerFlags,
    build_lr_scheduler,
    build_optimizer,
    decay_split,
)
from plasticity.population import WEIGHT_LAYERS, weight_param
from plasticity.regularizers import L2Penalty, regularized_parameters

SETTING = Setting()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add overhead


def _model(members: int = 1, seed: int = 0, layer_norm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return build_torso("mlp", (6,), layer_norm=layer_norm, hidden_sizes=(8, 5), members=members)


def _inputs(members: int, steps: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(members, 7, 6, generator=generator) for _ in range(steps)]


def _task_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 0.3).square().sum()


def _train(model, optimizer, inputs, penalty=None):
    for x in inputs:
        optimizer.zero_grad()
        loss = _task_loss(model, x)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        optimizer.step()


def _weights(model: nn.Module) -> set[int]:
    return {id(weight_param(m)) for m in model.modules() if isinstance(m, WEIGHT_LAYERS)}


# ---- construction ----

def test_default_flags_build_the_agents_fused_adam_bit_for_bit():
    a, b = _model(), _model()
    ours = build_optimizer(a, OptimizerFlags(), 1e-3)
    theirs = torch.optim.Adam(b.parameters(), lr=1e-3, fused=True)
    assert type(ours) is torch.optim.Adam and ours.defaults["fused"] and ours.defaults["weight_decay"] == 0
    assert len(ours.param_groups) == 1 and ours.param_groups[0]["params"] == list(a.parameters())
    inputs = _inputs(1, 5)
    _train(a, ours, inputs)
    _train(b, theirs, inputs)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_adamw_groups_decay_only_linear_weights_even_with_2d_biases():
    model = _model(members=3)
    optimizer = build_optimizer(model, OptimizerFlags(optimizer="adamw", weight_decay=0.1), 1e-3)
    assert type(optimizer) is torch.optim.AdamW
    decay, no_decay = optimizer.param_groups
    assert {id(p) for p in decay["params"]} == _weights(model) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 6  # 2 biases, LN γ/β x 2
    assert all(p.dim() == 2 for p in no_decay["params"])  # member dim: ndim is no test for "a weight"
    assert [id(p) for p in decay["params"] + no_decay["params"]] != [] and \
        {id(p) for p in model.parameters()} == {id(p) for g in optimizer.param_groups for p in g["params"]}
    sgd = build_optimizer(model, OptimizerFlags(optimizer="sgd", weight_decay=0.1), 1e-3)
    assert type(sgd) is DecoupledSGD and [g["decoupled_weight_decay"] for g in sgd.param_groups] == [0.1, 0.0]
    assert all(g["weight_decay"] == 0 and g["dampening"] == 0 for g in sgd.param_groups)


def test_decay_split_follows_modules_in_parameter_order():
    model = _model(members=2)
    decay, no_decay = decay_split(model)
    order = [id(p) for p in model.parameters()]
    assert [id(p) for p in decay] == [i for i in order if i in _weights(model)]
    assert [id(p) for p in no_decay] == [i for i in order if i not in _weights(model)]


# ---- properties 1.1 - 1.4 ----

def test_1_1_l2_with_adam_equals_torch_adam_coupled_weight_decay():
    lam, lr = 0.05, 1e-2
    a, b = _model(), _model()
    ours = build_optimizer(a, OptimizerFlags(), lr)
    regularized = {id(p) for p in regularized_parameters(b)}
    groups = [{"params": [p for p in b.parameters() if id(p) in regularized], "weight_decay": lam},
              {"params": [p for p in b.parameters() if id(p) not in regularized], "weight_decay": 0.0}]
    theirs = torch.optim.Adam(groups, lr=lr)
    inputs = _inputs(1, 10)
    _train(a, ours, inputs, penalty=L2Penalty(a, lam))
    _train(b, theirs, inputs)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(a.parameters()), next(_model().parameters()))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_1_2_decoupled_decay_with_zero_task_gradient_shrinks_weights_exactly(name):
    lam, lr = 0.1, 0.01
    model = _model(members=2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model, OptimizerFlags(optimizer=name, weight_decay=lam), lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    weights = _weights(model)
    for p, p0 in zip(model.parameters(), before):
        if id(p) in weights:
            assert torch.equal(p, p0 * (1 - lr * lam))  # exactly
            assert not torch.equal(p, p0)
        else:
            assert torch.equal(p, p0)  # biases and LayerNorm γ/β: unchanged


def test_1_2_adam_with_l2_moves_by_the_normalised_coupled_gradient():
    lam, lr = 0.1, 0.01
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model, OptimizerFlags(), lr)
    optimizer.zero_grad()
    L2Penalty(model, lam)().backward()  # task gradient ≡ 0
    optimizer.step()
    regularized = {id(p) for p in regularized_parameters(model)}
    eps = optimizer.defaults["eps"]
    for p, p0 in zip(model.parameters(), before):
        if id(p) in regularized:
            g = lam * p0
            torch.testing.assert_close(p - p0, -lr * g / (g.abs() + eps), rtol=1e-4, atol=1e-9)
            big = p0.abs() > 1e-3
            torch.testing.assert_close((p - p0)[big], -lr * p0.sign()[big], rtol=1e-3, atol=0.0)
        else:
            assert torch.equal(p, p0)


def test_1_3_first_update_after_a_long_silence_is_the_beta_mismatch_factor():
    lr = 1e-3
    a = nn.Parameter(torch.ones(4))
    b = nn.Parameter(torch.ones(4))
    optimizer = torch.optim.Adam([{"params": [a], "betas": (0.9, 0.999)}, {"params": [b], "betas": (0.99, 0.99)}],
                                 lr=lr, fused=True)  # what build_optimizer makes for adam
    a.grad, b.grad = torch.zeros(4), torch.zeros(4)
    for _ in range(1000):  # zero gradients leave m = v = 0 exactly; only the step count moves
        optimizer.step()
    for p in (a, b):
        state = optimizer.state[p]
        assert torch.equal(state["exp_avg"], torch.zeros(4)) and torch.equal(state["exp_avg_sq"], torch.zeros(4))
        assert torch.equal(p.detach(), torch.ones(4))
        state["step"].fill_(100_000)  # the state 10^5 such steps leave (the other 99,000 take 20 s here)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0])
    a.grad, b.grad = g.clone(), g.clone()
    a0, b0 = a.detach().clone(), b.detach().clone()
    optimizer.step()
    for p, p0, (beta1, beta2), expected in ((a, a0, (0.9, 0.999), 3.162), (b, b0, (0.99, 0.99), 0.100)):
        step = (p - p0).abs() / lr
        torch.testing.assert_close(step, torch.full_like(step, (1 - beta1) / math.sqrt(1 - beta2)), rtol=1e-3,
                                   atol=0.0)
        assert abs(step.mean().item() - expected) < 1e-3 * expected


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_1_4_sgd_is_torchs_formula_and_plain_sgd_without_momentum(momentum, nesterov):
    lr = 0.05
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = build_optimizer(nn.ParameterList([p]), OptimizerFlags(optimizer="sgd", sgd_momentum=momentum,
                                                                      sgd_nesterov=nesterov), lr)
    theta, buffer = p.detach().clone(), torch.zeros(3)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        g = torch.randn(3, generator=generator)
        p.grad = g.clone()
        optimizer.step()
        buffer = momentum * buffer + g
        theta = theta - lr * ((g + momentum * buffer) if nesterov else buffer)
        if momentum == 0:
            assert torch.allclose(buffer, g)  # plain SGD: θ ← θ − η·g
        torch.testing.assert_close(p.detach(), theta, rtol=1e-6, atol=1e-7)


def test_sgd_decoupled_decay_follows_the_step():
    lr, lam, mu = 0.1, 0.5, 0.9
    model = nn.Linear(2, 1, bias=False)
    optimizer = build_optimizer(model, OptimizerFlags(optimizer="sgd", sgd_momentum=mu, weight_decay=lam), lr)
    theta0 = model.weight.detach().clone()
    g = torch.tensor([[1.0, -1.0]])
    model.weight.grad = g.clone()
    optimizer.step()
    torch.testing.assert_close(model.weight.detach(), (theta0 - lr * g) * (1 - lr * lam))


# ---- per-entry step Adam ----

@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_per_entry_step_adam_equals_torch_adam_without_partial_resets(name):
    a, b = _model(members=2), _model(members=2)
    flags = OptimizerFlags(optimizer=name, adam_per_entry_step=True, adam_betas=(0.8, 0.99), adam_eps=1e-6,
                           weight_decay=0.1 if name == "adamw" else 0.0)
    ours = build_optimizer(a, flags, 1e-2)
    assert type(ours) is AdamPerEntryStep
    theirs = build_optimizer(b, OptimizerFlags(optimizer=name, adam_betas=(0.8, 0.99), adam_eps=1e-6,
                                               weight_decay=0.1 if name == "adamw" else 0.0), 1e-2)
    inputs = _inputs(2, 10)
    _train(a, ours, inputs)
    _train(b, theirs, inputs)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert torch.equal(ours.state[p]["step"], torch.full_like(p, 10.0))


# ---- checkpoints ----

def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("flags", [OptimizerFlags(adam_per_entry_step=True),
                                   OptimizerFlags(optimizer="adamw", adam_per_entry_step=True, weight_decay=0.1),
                                   OptimizerFlags(optimizer="sgd", sgd_momentum=0.9, weight_decay=0.1),
                                   OptimizerFlags(optimizer="upgd"),
                                   OptimizerFlags(lr_schedule="linear", lr_end=1e-4)],
                         ids=["per-entry-adam", "per-entry-adamw", "sgd", "upgd", "linear-schedule"])
def test_checkpoint_round_trip_gives_the_identical_next_step(flags):
    model = _model(members=2)
    optimizer = build_optimizer(model, flags, 1e-2, seeds=[5, 6])
    scheduler = build_lr_scheduler(optimizer, flags, total_updates=20)
    inputs = _inputs(2, 6)
    for x in inputs[:5]:
        optimizer.zero_grad()
        _task_loss(model, x).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    saved = _roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None})
    resumed = _model(members=2, seed=9)
    resumed.load_state_dict(saved["model"])
    optimizer2 = build_optimizer(resumed, flags, 1e-2, seeds=[5, 6])
    optimizer2.load_state_dict(saved["optimizer"])
    scheduler2 = build_lr_scheduler(optimizer2, flags, total_updates=20)
    if scheduler2 is not None:
        scheduler2.load_state_dict(saved["scheduler"])
        assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for m, opt, sched in ((model, optimizer, scheduler), (resumed, optimizer2, scheduler2)):
        opt.zero_grad()
        _task_loss(m, inputs[5]).backward()
        opt.step()
        if sched is not None:
            sched.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    if scheduler is not None:
        assert scheduler.get_last_lr() == scheduler2.get_last_lr()


# ---- LR schedule ----

def test_linear_schedule_goes_from_the_learning_rate_to_lr_end_and_stays():
    model = _model()
    flags = OptimizerFlags(lr_schedule="linear", lr_end=1e-4)
    optimizer = build_optimizer(model, flags, 1e-3)
    assert build_lr_scheduler(optimizer, OptimizerFlags(), 10) is None
    scheduler = build_lr_scheduler(optimizer, flags, total_updates=10)
    seen = []
    for _ in range(13):
        seen.append(optimizer.param_groups[0]["lr"])
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        scheduler.step()
    expected = [1e-3 + (1e-4 - 1e-3) * min(u, 10) / 10 for u in range(13)]
    assert seen == pytest.approx(expected, rel=1e-12)
    default_end = build_lr_scheduler(build_optimizer(model, OptimizerFlags(lr_schedule="linear"), 1e-3),
                                     OptimizerFlags(lr_schedule="linear"), 4)
    for _ in range(4):
        default_end.optimizer.step()
        default_end.step()
    assert default_end.get_last_lr() == [0.0]


# ---- flags ----

def test_every_numeric_field_has_a_declared_range_and_a_docstring():
    ranged = declared_ranges(OptimizerFlags)
    for name in ("adam_betas", "adam_eps", "sgd_momentum", "weight_decay", "lr_end", "upgd_beta_utility",
                 "upgd_sigma", "upgd_eps", "upgd_weight_decay"):
        assert name in ranged
    with pytest.raises(ValueError, match="--adam-betas"):
        check_ranges(OptimizerFlags(adam_betas=(0.9, 1.0)))
    with pytest.raises(ValueError, match="--lr-end"):
        check_ranges(OptimizerFlags(lr_schedule="linear", lr_end=-1.0))
    check_ranges(OptimizerFlags())
    assert OptimizerFlags().build(None) is None


@dataclass
class C51LikeArgs(OptimizerFlags):
    adam_eps: float = 0.01 / 32  # an agent overriding the default


@pytest.mark.parametrize("flags, message", [
    (OptimizerFlags(weight_decay=0.1), "--optimizer adam with --weight-decay 0.1.*adamw.*--l2"),
    (OptimizerFlags(optimizer="sgd", adam_per_entry_step=True), "--adam-per-entry-step with --optimizer sgd"),
    (OptimizerFlags(optimizer="upgd", adam_per_entry_step=True), "--adam-per-entry-step with --optimizer upgd"),
    (OptimizerFlags(optimizer="kron", adam_per_entry_step=True), "--adam-per-entry-step with --optimizer kron"),
    (OptimizerFlags(sgd_momentum=0.9), "--sgd-momentum with --optimizer adam"),
    (OptimizerFlags(optimizer="adamw", sgd_nesterov=True), "--sgd-nesterov with --optimizer adamw"),
    (OptimizerFlags(optimizer="sgd", sgd_nesterov=True), "--sgd-nesterov needs --sgd-momentum"),
    (OptimizerFlags(optimizer="sgd", adam_betas=(0.99, 0.99)), "--adam-betas with --optimizer sgd"),
    (OptimizerFlags(optimizer="kron", adam_betas=(0.99, 0.99)), "--kron-b1"),
    (OptimizerFlags(optimizer="sgd", adam_eps=1e-4), "--adam-eps with --optimizer sgd"),
    (OptimizerFlags(optimizer="upgd", adam_eps=1e-4), "--upgd-eps"),
    (OptimizerFlags(optimizer="upgd", weight_decay=0.1), "--upgd-weight-decay"),
    (OptimizerFlags(upgd_sigma=0.1), "--upgd-sigma with --optimizer adam"),
    (OptimizerFlags(optimizer="adamw", upgd_beta_utility=0.9), "--upgd-beta-utility with --optimizer adamw"),
    (OptimizerFlags(upgd_eps=1e-3), "--upgd-eps with --optimizer adam"),
    (OptimizerFlags(upgd_weight_decay=0.0), "--upgd-weight-decay with --optimizer adam"),
    (OptimizerFlags(lr_end=1e-5), "--lr-end needs --lr-schedule linear"),
    (OptimizerFlags(optimizer="rmsprop"), "unknown --optimizer"),
    (OptimizerFlags(lr_schedule="cosine"), "unknown --lr-schedule"),
    (C51LikeArgs(optimizer="sgd", adam_eps=1e-8), "--adam-eps with --optimizer sgd"),
])
def test_configuration_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        flags.check(SETTING)


@pytest.mark.parametrize("flags", [
    OptimizerFlags(), OptimizerFlags(optimizer="adamw", weight_decay=0.1, adam_betas=(0.99, 0.99)),
    OptimizerFlags(optimizer="sgd", sgd_momentum=0.9, sgd_nesterov=True, weight_decay=0.1),
    OptimizerFlags(optimizer="upgd", adam_betas=(0.9, 0.99), upgd_sigma=0.0),
    OptimizerFlags(optimizer="kron", weight_decay=0.1), OptimizerFlags(adam_per_entry_step=True),
    OptimizerFlags(lr_schedule="linear"), OptimizerFlags(lr_schedule="linear", lr_end=1e-5),
    C51LikeArgs(optimizer="sgd"),  # an agent's own eps default is not "given"
])
def test_valid_combinations_pass(flags):
    flags.check(SETTING)


def test_trac_with_kron_or_upgd_is_an_error():
    @dataclass
    class WithTrac(OptimizerFlags):
        trac: bool = False

    WithTrac(trac=True, optimizer="sgd").check(SETTING)
    for name in ("kron", "upgd"):
        with pytest.raises(ValueError, match=f"--trac with --optimizer {name}"):
            WithTrac(trac=True, optimizer=name).check(SETTING)


def test_build_optimizer_refuses_coupled_adam_decay_even_unchecked():
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(_model(), OptimizerFlags(weight_decay=0.1), 1e-3)


def test_kron_is_built_with_decay_groups_when_available():
    pytest.importorskip("plasticity.kron")
    model = _model(members=2)
    optimizer = build_optimizer(model, OptimizerFlags(optimizer="kron", weight_decay=0.1), 1e-3)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    x = _inputs(2, 1)[0]
    before = copy.deepcopy(model.state_dict())
    optimizer.zero_grad()
    _task_loss(model, x).backward()
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
