"""Diagnostics on real networks, each metric against its definition in spec diagnostics.md.

Also the cost rules (one host transfer per event, training state untouched)
and the target-mean validation of diagnostics.md.  The networks are one-member
populations of the agents' member layers (inputs ``[1, n, ...]``, values ``[1]``);
populations of several members and ordinary nn models are pinned against these in
tests/test_population_methods_norms.py.
"""

import collections
import copy
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plasticity.diagnostics import (
    TAG_PREFIX,
    Diagnostics,
    effective_rank,
    singular_values,
    srank,
    stable_rank,
    to_host,
)
from plasticity.losses import CategoricalSupport
from plasticity.networks import build_torso
from plasticity.population import MemberLinear, weight_param

N_ACTIONS = 3


class QNetwork(nn.Module):
    """The agents' Q-network shape: member torso, then a member linear head (categorical: A·N logits).

    ``[M, n, ...] -> [M, n, A·N]`` (or ``[M, n, A, N]`` with ``reshape``); here M = 1.
    """

    def __init__(self, torso: nn.Module, n_actions: int = N_ACTIONS, n_atoms: int = 1, reshape: bool = False):
        super().__init__()
        self.torso = torso
        self.head = MemberLinear(1, torso.out_features, n_actions * n_atoms)
        self.n_actions, self.n_atoms, self.reshape = n_actions, n_atoms, reshape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.torso(x))
        return out.view(*x.shape[:2], self.n_actions, self.n_atoms) if self.reshape else out


def mlp_network(seed: int = 0, hidden_sizes=(16, 8), layer_norm: bool = False, **kwargs) -> QNetwork:
    torch.manual_seed(seed)
    return QNetwork(build_torso("mlp", (6,), layer_norm=layer_norm, hidden_sizes=hidden_sizes), **kwargs)


def probe_obs(n: int = 64, dim: int = 6, seed: int = 1) -> torch.Tensor:
    """One member's probe batch, ``[1, n, dim]``."""
    return torch.randn(1, n, dim, generator=torch.Generator().manual_seed(seed))


def tag(name: str) -> str:
    return TAG_PREFIX + name


def measured(diagnostics: Diagnostics, *args, **kwargs) -> dict[str, float]:
    """``measure`` and the one host transfer: the only member's ``{tag: float}``."""
    result = diagnostics.measure(*args, **kwargs)
    assert all(value.shape == (1,) and value.dtype == torch.float64 for value in result.values())
    return to_host(result)[0]


def first(result: dict[str, torch.Tensor], name: str) -> float:
    """The only member's value of one tag of a probe's result."""
    value = result[tag(name)]
    assert value.shape == (1,)
    return value[0].item()


SYNC_METHODS = ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextmanager
def count_host_transfers(monkeypatch):
    """Counts every Python-level way a tensor value reaches the host (each one a sync on CUDA)."""
    counts: collections.Counter = collections.Counter()
    with monkeypatch.context() as patch:
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        yield counts


# ---------------------------------------------------------------------------
# The cost rules
# ---------------------------------------------------------------------------

def test_measure_moves_all_scalars_to_host_exactly_once(monkeypatch):
    model = mlp_network(layer_norm=True)
    diagnostics = Diagnostics(model)
    obs = probe_obs()
    model(obs).square().mean().backward()
    diagnostics.record_grad_norm()
    model.zero_grad()
    with count_host_transfers(monkeypatch) as counts:
        result = diagnostics.measure(obs, td_targets=torch.randn(1, 64), actions=torch.zeros(1, 64, dtype=torch.long),
                                     clip_range=(-1.0, 1.0))
    assert len(result) > 30
    # No value leaves the device; one boolean read right after the SVD (which synchronises on CUDA anyway).
    assert dict(counts) == {"__bool__": 1}
    with count_host_transfers(monkeypatch) as counts:
        host = to_host(result)
    assert dict(counts) == {"tolist": 1}  # every value of every member in one transfer
    assert len(host) == 1 and set(host[0]) == set(result)


def test_transfer_counter_catches_per_metric_syncs(monkeypatch):
    """The counter above must fail a measure that syncs each metric on its own."""
    values = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)]
    with count_host_transfers(monkeypatch) as counts:
        _ = [v.item() for v in values]
        _ = float(values[0]), bool(values[1] > 0)
        _ = torch.stack(values).tolist()
    assert counts == {"item": 3, "__float__": 1, "__bool__": 1, "tolist": 1}


def test_measure_leaves_training_state_untouched():
    model = mlp_network(layer_norm=True)
    diagnostics = Diagnostics(model)
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    targets = torch.randn(1, 64)
    rng_before = torch.get_rng_state()
    model.train()
    diagnostics.measure(probe_obs(), td_targets=targets)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, params_before[name])
    assert torch.equal(torch.get_rng_state(), rng_before)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, "measure must remove its hooks"
    model.eval()
    diagnostics.measure(probe_obs())
    assert not model.training, "a model measured in eval mode stays in eval mode"


def test_measure_runs_the_probe_in_eval_mode():
    model = mlp_network()
    model.torso.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    modes: list[bool] = []
    Diagnostics(model).measure(probe_obs())
    assert modes == [False]


def test_measure_keeps_existing_gradients():
    model = mlp_network()
    model(probe_obs()).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    Diagnostics(model).measure(probe_obs())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


# ---------------------------------------------------------------------------
# Tags and metrics against their definitions
# ---------------------------------------------------------------------------

def test_measure_returns_every_tag_of_the_spec():
    model = mlp_network()
    diagnostics = Diagnostics(model)
    obs = probe_obs()
    model(obs).sum().backward()
    diagnostics.record_grad_norm()
    result = measured(diagnostics, obs, td_targets=torch.randn(1, 64), clip_range=(-1.0, 1.0))
    per_layer = {f"{metric}/{layer}" for metric in ("dead_frac", "linearized_frac", "dormant_frac",
                                                    "preact_mean_abs", "preact_std") for layer in ("torso.1", "torso.4")}
    expected = per_layer | {
        "effective_rank", "srank", "stable_rank", "dead_frac", "linearized_frac", "dormant_frac",
        "preact_mean_abs", "preact_std", "weight_norm", "weight_norm/torso.1", "weight_norm/torso.4",
        "weight_norm/head", "weight_magnitude", "dist_from_init", "feature_norm", "grad_norm", "target_mean",
        "target_std", "target_offset_ratio", "feature_sv_max", "feature_cond", "feature_mean_dominance",
        "feature_mean_alignment", "q_mean", "q_std", "target_clip_frac",
    }
    assert set(result) == {tag(name) for name in expected}
    assert all(isinstance(value, float) for value in result.values())
    without_targets = measured(Diagnostics(model), obs)
    assert not any("target" in key or "grad_norm" in key for key in without_targets)


def test_norm_metrics_match_direct_computation():
    model = mlp_network(layer_norm=True)
    diagnostics = Diagnostics(model)
    initial = [p.detach().clone() for p in model.parameters()]
    assert measured(diagnostics, probe_obs())[tag("dist_from_init")] == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    result = measured(diagnostics, probe_obs())
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params]).double()
    flat0 = torch.cat([p.flatten() for p in initial]).double()
    assert result[tag("weight_norm")] == pytest.approx(flat.norm().item(), rel=1e-5)
    assert result[tag("weight_magnitude")] == pytest.approx(flat.abs().mean().item(), rel=1e-5)
    assert result[tag("dist_from_init")] == pytest.approx(((flat - flat0).norm() / flat0.norm()).item(), rel=1e-5)
    for name, layer in (("torso.1", model.torso[1]), ("torso.4", model.torso[4]), ("head", model.head)):
        assert result[tag(f"weight_norm/{name}")] == pytest.approx(weight_param(layer).norm().item(), rel=1e-5)


def test_feature_metrics_match_direct_computation():
    model = mlp_network(hidden_sizes=(32, 24))
    obs = probe_obs(128)
    result = measured(Diagnostics(model), obs)
    with torch.no_grad():
        features = model.torso(obs)[0].double()  # the head's input: Φ
    sv = singular_values(features)
    mean = features.mean(0)
    centred_trace = torch.cov(features.T, correction=0).trace()
    _, _, vh = torch.linalg.svd(features, full_matrices=False)
    expected = {
        "effective_rank": effective_rank(sv).item(),
        "srank": srank(sv).item(),
        "stable_rank": stable_rank(sv).item(),
        "feature_sv_max": sv[0].item(),
        "feature_cond": (sv[0] / sv[int(srank(sv).item()) - 1]).item(),
        "feature_norm": features.norm(dim=1).mean().item(),
        "feature_mean_dominance": (mean.square().sum() / centred_trace).item(),
        "feature_mean_alignment": ((mean @ vh[0]) ** 2 / mean.square().sum()).item(),
    }
    for name, value in expected.items():
        assert result[tag(name)] == pytest.approx(value, rel=1e-4), name


def test_overall_unit_fractions_are_total_flagged_over_total_units():
    """Pitfall 6: layers of 2 and 8 units; one dead unit is 1/10 overall, not the mean of 1/2 and 0/8."""
    model = mlp_network(hidden_sizes=(2, 8))
    with torch.no_grad():
        first_layer, second_layer = model.torso[1], model.torso[4]
        weight_param(first_layer).zero_()
        first_layer.bias.copy_(torch.tensor([[-1.0, 1.0]]))  # unit 0 dead, unit 1 linearized
        weight_param(second_layer).zero_()
        second_layer.bias.fill_(1.0)                        # all 8 linearized, equally active
    result = measured(Diagnostics(model), probe_obs())
    assert result[tag("dead_frac/torso.1")] == 0.5
    assert result[tag("dead_frac/torso.4")] == 0.0
    assert result[tag("dead_frac")] == pytest.approx(0.1)
    assert result[tag("dormant_frac")] == pytest.approx(0.1)
    assert result[tag("linearized_frac/torso.1")] == 0.5
    assert result[tag("linearized_frac")] == pytest.approx(0.9)
    # Pre-activation means over all units, width-weighted: layer 1 |z| = [1, 1], layer 2 |z| = 1.
    assert result[tag("preact_mean_abs")] == pytest.approx(1.0)
    assert result[tag("preact_std")] == pytest.approx(0.0, abs=1e-7)


def test_conv_layers_use_channels_as_units():
    torch.manual_seed(0)
    model = QNetwork(build_torso("cnn", (1, 8, 8)))
    with torch.no_grad():
        model.torso[0].bias[0, :3] = -100.0  # three channels dead at every sample and position
        model.torso[0].bias[0, 3:] = 100.0   # the other 29 positive everywhere: linearized
    result = measured(Diagnostics(model), torch.rand(1, 16, 1, 8, 8))
    assert result[tag("dead_frac/torso.0")] == pytest.approx(3 / 32)
    assert result[tag("linearized_frac/torso.0")] == pytest.approx(29 / 32)
    assert result[tag("dormant_frac/torso.0")] == pytest.approx(3 / 32)


def test_grad_norm_is_the_mean_pre_clipping_norm_since_the_last_event():
    model = mlp_network()
    diagnostics = Diagnostics(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    for step in range(3):
        loss = (model(probe_obs(seed=step)) - 5.0).square().mean()
        optimizer.zero_grad()
        loss.backward()
        diagnostics.record_grad_norm()
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3).item())  # pre-clip norm
        optimizer.step()
    result = measured(diagnostics, probe_obs())
    assert result[tag("grad_norm")] == pytest.approx(sum(norms) / 3, rel=1e-5)
    assert tag("grad_norm") not in diagnostics.measure(probe_obs()), "the average restarts at each event"
    optimizer.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="after loss.backward"):
        diagnostics.record_grad_norm()


def test_q_stats_of_a_regression_head():
    model = mlp_network()
    obs = probe_obs()
    result = measured(Diagnostics(model, n_actions=N_ACTIONS), obs)
    with torch.no_grad():
        q = model(obs)
    assert result[tag("q_mean")] == pytest.approx(q.mean().item(), rel=1e-5)
    assert result[tag("q_std")] == pytest.approx(q.std(correction=0).item(), rel=1e-5)


@pytest.mark.parametrize("reshape", [False, True])
def test_q_stats_of_a_categorical_head_use_the_expected_value(reshape):
    support = torch.linspace(-10.0, 10.0, 51)
    model = mlp_network(n_atoms=51, reshape=reshape)
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # peaked distributions, so the expected value is far from the mean atom
    obs = probe_obs()
    result = measured(Diagnostics(model, support=support, n_actions=N_ACTIONS), obs)
    with torch.no_grad():
        probs = torch.softmax(model(obs).view(64, N_ACTIONS, 51), dim=-1)
    q = (probs * support).sum(-1)
    assert result[tag("q_mean")] == pytest.approx(q.mean().item(), rel=1e-4, abs=1e-6)
    assert result[tag("q_std")] == pytest.approx(q.std(correction=0).item(), rel=1e-4)
    assert q.std() > 0.5


def test_target_stats_and_clip_fraction():
    targets = torch.tensor([-11.0, -10.0, 0.0, 10.0, 10.5, 3.0])
    result = measured(Diagnostics(mlp_network()), probe_obs(6), td_targets=targets.reshape(1, 6),
                      clip_range=(-10.0, 10.0))
    assert result[tag("target_mean")] == pytest.approx(targets.mean().item())
    assert result[tag("target_std")] == pytest.approx(targets.std(correction=0).item())
    assert result[tag("target_offset_ratio")] == pytest.approx(
        abs(targets.mean().item()) / (targets.std(correction=0).item() + 1e-8))
    assert result[tag("target_clip_frac")] == pytest.approx(2 / 6)  # the support's ends are inside it


def test_target_clip_frac_reports_what_two_hot_clips():
    """Two-hot clips to the outer bin centres, not to [v_min, v_max]: 109.9 on [0, 110] with 51 bins is clipped."""
    support = CategoricalSupport(0.0, 110.0, 51)
    last = support.centers[-1].item()  # 108.92
    targets = torch.tensor([109.9, 50.0, last, support.centers[0].item(), 1.0, 0.5])
    diagnostics = Diagnostics(mlp_network())

    def clip_frac(loss):
        result = measured(diagnostics, probe_obs(6), td_targets=targets.reshape(1, 6),
                          clip_range=support.clip_range(loss))
        return result[tag("target_clip_frac")]

    assert clip_frac("two_hot") == pytest.approx(3 / 6)  # 109.9, 1.0 and 0.5 lie outside [1.08, 108.92]
    assert clip_frac("hl_gauss") == 0.0  # all inside the edges [0, 110]
    assert clip_frac("two_hot") == pytest.approx(support.clip_fraction(targets, "two_hot").item())


def test_target_mean_makes_features_ill_conditioned():
    """diagnostics.md validation: the same MLP fit to y = c + ε(x) for c = 0 and c = 100."""

    def pretrain(offset: float) -> dict[str, float]:
        model = mlp_network(seed=0, hidden_sizes=(64, 64), n_actions=1)
        data = torch.Generator().manual_seed(1)
        direction = torch.randn(6, generator=data)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(200):
            x = torch.randn(1, 64, 6, generator=data)
            loss = (model(x)[..., 0] - (offset + torch.sin(x @ direction))).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        x = torch.randn(1, 256, 6, generator=data)
        return measured(Diagnostics(model), x, td_targets=offset + torch.sin(x @ direction))

    centred, offset = pretrain(0.0), pretrain(100.0)
    assert offset[tag("target_offset_ratio")] > 50 * centred[tag("target_offset_ratio")]
    assert offset[tag("feature_sv_max")] > 5 * centred[tag("feature_sv_max")]
    assert offset[tag("feature_cond")] > 2 * centred[tag("feature_cond")]
    assert offset[tag("feature_mean_alignment")] > centred[tag("feature_mean_alignment")]
    assert 1 - offset[tag("feature_mean_alignment")] < 0.1 * (1 - centred[tag("feature_mean_alignment")])


# ---------------------------------------------------------------------------
# SVD failure inside measure (pitfall 7)
# ---------------------------------------------------------------------------

SPECTRAL_TAGS = ("effective_rank", "srank", "stable_rank", "feature_sv_max", "feature_cond", "feature_mean_alignment")


def test_measure_falls_back_when_the_svd_raises(monkeypatch):
    model = mlp_network(hidden_sizes=(32, 24))
    obs = probe_obs(128)
    reference = measured(Diagnostics(model), obs)

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (forced by the test)")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    with count_host_transfers(monkeypatch) as counts:
        result = Diagnostics(model).measure(obs)
    assert counts == {}, "the raise path needs no host read"
    result = to_host(result)[0]
    for name in SPECTRAL_TAGS:
        assert result[tag(name)] == pytest.approx(reference[tag(name)], rel=1e-3), name


def test_measure_falls_back_when_the_svd_silently_returns_nan(monkeypatch):
    model = mlp_network(hidden_sizes=(32, 24))
    obs = probe_obs(128)
    reference = measured(Diagnostics(model), obs)
    real_svd = torch.linalg.svd

    def nan_svd(matrix, full_matrices=True):
        u, s, vh = real_svd(matrix, full_matrices=full_matrices)
        return u, torch.full_like(s, float("nan")), vh

    monkeypatch.setattr(torch.linalg, "svd", nan_svd)
    with count_host_transfers(monkeypatch) as counts:
        result = Diagnostics(model).measure(obs)
    assert counts == {"__bool__": 1}, "the same one boolean read as every event; no extra transfer"
    result = to_host(result)[0]
    for name in SPECTRAL_TAGS:
        assert result[tag(name)] == pytest.approx(reference[tag(name)], rel=1e-3), name


def test_diverged_network_logs_nan_instead_of_raising():
    model = mlp_network()
    with torch.no_grad():
        model.torso[4].weight[0, 0, 0] = float("nan")
    result = measured(Diagnostics(model), probe_obs())
    for name in SPECTRAL_TAGS:
        assert math.isnan(result[tag(name)]), name


# ---------------------------------------------------------------------------
# Checkpointing and input validation
# ---------------------------------------------------------------------------

def test_state_dict_round_trip_restores_initial_params_and_grad_norms():
    model = mlp_network()
    diagnostics = Diagnostics(model)
    model(probe_obs()).square().mean().backward()
    diagnostics.record_grad_norm()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    state = copy.deepcopy(diagnostics.state_dict())
    assert state["grad_norm_sum"].shape == (1,)  # one accumulator per member
    expected = measured(diagnostics, probe_obs())
    resumed = Diagnostics(model)  # built on the trained network: θ0 would be wrong without the state
    assert measured(resumed, probe_obs())[tag("dist_from_init")] == 0.0
    resumed.load_state_dict(state)
    result = measured(resumed, probe_obs())
    assert result[tag("dist_from_init")] == pytest.approx(expected[tag("dist_from_init")])
    assert result[tag("grad_norm")] == pytest.approx(expected[tag("grad_norm")])
    with pytest.raises(ValueError, match="same network flags"):
        Diagnostics(mlp_network(hidden_sizes=(16, 9))).load_state_dict(state)


def test_bad_inputs_get_one_clear_error():
    model = mlp_network()
    diagnostics = Diagnostics(model)
    with pytest.raises(ValueError, match="at least 2 observations"):
        diagnostics.measure(probe_obs(1))
    with pytest.raises(ValueError, match="at least 2 observations"):
        diagnostics.measure(torch.zeros(2, 64, 6))  # two members' batches for a one-member model
    with pytest.raises(ValueError, match="td_targets has 5 entries for 64"):
        diagnostics.measure(probe_obs(), td_targets=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="clip_range needs td_targets"):
        diagnostics.measure(probe_obs(), clip_range=(-1.0, 1.0))
    with pytest.raises(ValueError, match="v_min < v_max"):
        diagnostics.measure(probe_obs(), td_targets=torch.zeros(1, 64), clip_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="pass support="):
        Diagnostics(mlp_network(n_atoms=51), n_actions=N_ACTIONS)
    with pytest.raises(ValueError, match="pass support="):
        Diagnostics(mlp_network(n_atoms=51, reshape=True)).measure(probe_obs())
    with pytest.raises(ValueError, match="not a multiple"):
        Diagnostics(mlp_network(n_atoms=51), support=torch.linspace(-1, 1, 50))


# ---------------------------------------------------------------------------
# Rarer probes: eNTK, Hessian, plasticity probe
# ---------------------------------------------------------------------------

def explicit_ntk(model: nn.Module, obs: torch.Tensor, actions: torch.Tensor, support=None) -> torch.Tensor:
    """K = J Jᵀ of the one member (obs [1, m, ...], actions [1, m]), J row by row from autograd.grad of Q."""
    params = [p for p in model.parameters()]
    rows = []
    for x, a in zip(obs[0], actions.reshape(-1)):
        out = model(x[None, None]).reshape(1, N_ACTIONS, -1)
        q = out[0, :, 0] if support is None else (torch.softmax(out[0], -1) * support).sum(-1)
        grads = torch.autograd.grad(q[a], params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    jacobian = torch.stack(rows).double()
    return jacobian @ jacobian.T


@pytest.mark.parametrize("categorical", [False, True])
def test_entk_equals_explicit_jacobian_product(categorical):
    support = torch.linspace(-5.0, 5.0, 11) if categorical else None
    model = mlp_network(hidden_sizes=(8, 8), layer_norm=True, n_atoms=11 if categorical else 1)
    obs = probe_obs(12)
    actions = torch.randint(0, N_ACTIONS, (1, 12), generator=torch.Generator().manual_seed(2))
    diagnostics = Diagnostics(model, support=support)
    kernel = diagnostics.entk_kernel(obs, actions)
    expected = explicit_ntk(model, obs, actions, support)
    assert kernel.shape == (1, 12, 12)  # one kernel per member
    torch.testing.assert_close(kernel[0].double(), expected, rtol=1e-4, atol=1e-6)
    assert diagnostics.entk_kernel(obs, actions, entk_batch=5).shape == (1, 5, 5)
    result = diagnostics.entk(obs, actions)
    eigenvalues = torch.linalg.eigvalsh(expected).clamp_min(0).flip(0)
    assert first(result, "entk_effective_rank") == pytest.approx(effective_rank(eigenvalues).item(), rel=1e-4)
    kth = eigenvalues[int(srank(eigenvalues).item()) - 1]
    assert first(result, "entk_cond") == pytest.approx((eigenvalues[0] / kth).item(), rel=1e-3)
    assert model.training and all(p.grad is None for p in model.parameters())


class PixelQNetwork(QNetwork):
    """The agents' Atari network: uint8 frame stacks, scaled by the torso, channels-last convs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.torso(self.torso.scale_pixels(x)))


def test_entk_of_the_channels_last_atari_network_equals_explicit_jacobian_product():
    # vmap cannot copy a batched tensor into channels-last, which the Atari torso asks for.
    torch.manual_seed(0)
    model = PixelQNetwork(build_torso("nature_cnn", (4, 84, 84)))
    assert model.torso.channels_last
    obs = torch.randint(0, 256, (1, 3, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    actions = torch.tensor([[0, 2, 1]])
    kernel = Diagnostics(model).entk_kernel(obs, actions)
    torch.testing.assert_close(kernel[0].double(), explicit_ntk(model, obs, actions), rtol=1e-4, atol=1e-6)
    # Only the diagnostic's copy changed layout: training keeps channels-last.
    assert model.torso.channels_last and model.torso[0].channels_last


def test_entk_rejects_out_of_range_actions():
    diagnostics = Diagnostics(mlp_network())
    with pytest.raises(ValueError, match=r"actions must lie in \[0, 3\)"):
        diagnostics.entk(probe_obs(8), torch.tensor([[0, 1, 2, 3, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="integer tensor"):
        diagnostics.entk(probe_obs(8), torch.zeros(1, 8))


def test_hessian_max_eig_of_a_quadratic_loss():
    """Least squares through a linear model: H = [X 1]ᵀ[X 1] / n exactly."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(200, 5, generator=generator, dtype=torch.float64) * torch.tensor([4.0, 1, 1, 1, 1], dtype=torch.float64)
    y = torch.randn(200, generator=generator, dtype=torch.float64)
    model = nn.Linear(5, 1).double()
    design = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    top = torch.linalg.eigvalsh(design.T @ design / 200).max().item()
    diagnostics = Diagnostics(model)

    def loss_fn():
        return 0.5 * (model(x).squeeze(1) - y).square().mean()

    assert first(diagnostics.hessian_max_eig(loss_fn), "hessian_max_eig") == pytest.approx(top, rel=1e-6)
    assert all(p.grad is None for p in model.parameters()), "HVPs must not write .grad"
    assert model.training


def test_hessian_max_eig_of_a_small_network_matches_the_full_hessian():
    model = mlp_network(hidden_sizes=(4,), n_actions=1)
    obs, targets = probe_obs(32), torch.randn(1, 32, 1, generator=torch.Generator().manual_seed(4))
    params = dict(model.named_parameters())

    def loss_of(flat):
        split, offset = {}, 0
        for name, p in params.items():
            split[name] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return F.mse_loss(torch.func.functional_call(model, split, (obs,)), targets)

    flat = torch.cat([p.detach().flatten() for p in params.values()])
    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat).double())
    largest = eigenvalues[eigenvalues.abs().argmax()].item()
    result = Diagnostics(model).hessian_max_eig(lambda: F.mse_loss(model(obs), targets), iters=300)
    assert first(result, "hessian_max_eig") == pytest.approx(largest, rel=1e-3)


def test_probe_fit_loss_leaves_the_training_network_untouched():
    model = mlp_network(layer_norm=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(probe_obs()).square().mean().backward()
    optimizer.step()
    model(probe_obs(seed=2)).square().mean().backward()  # gradients pending, as mid-update
    model.eval()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    diagnostics = Diagnostics(model)
    result = diagnostics.probe_fit_loss(probe_obs(), steps=20)
    assert first(result, "probe_fit_loss") > 0
    assert not model.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng)
    after = optimizer.state_dict()
    assert after["param_groups"] == optimizer_state["param_groups"]
    for key, state in optimizer_state["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][key][name], value)
    assert optimizer.param_groups[0]["params"] == list(model.parameters())


def test_probe_fit_loss_fits_random_targets_deterministically():
    model = mlp_network(seed=0, hidden_sizes=(32, 32))  # global seed 0, probe seed 0: targets must still differ
    diagnostics = Diagnostics(model)
    obs = probe_obs(64)
    untrained = first(diagnostics.probe_fit_loss(obs, steps=1, lr=1e-12), "probe_fit_loss")
    short = first(diagnostics.probe_fit_loss(obs, steps=5), "probe_fit_loss")
    long = first(diagnostics.probe_fit_loss(obs, steps=100), "probe_fit_loss")
    assert untrained > 1e-3, "the random targets must not be the network's own initialisation"
    assert long < short < untrained
    assert first(diagnostics.probe_fit_loss(obs, steps=5), "probe_fit_loss") == short


# ---------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_measure_matches_cpu_with_one_transfer(monkeypatch):
    model = mlp_network(hidden_sizes=(64, 32), n_atoms=11)
    support = torch.linspace(-5.0, 5.0, 11)
    obs, targets = probe_obs(256), torch.randn(1, 256) * 6
    model(obs).square().mean().backward()
    cpu_diagnostics = Diagnostics(model, support=support)
    cpu_diagnostics.record_grad_norm()
    expected = measured(cpu_diagnostics, obs, targets, clip_range=(-5.0, 5.0))
    model.zero_grad(set_to_none=True)
    cuda_model = copy.deepcopy(model).cuda()
    cuda_model(obs.cuda()).square().mean().backward()
    diagnostics = Diagnostics(cuda_model, support=support)
    diagnostics.record_grad_norm()
    with count_host_transfers(monkeypatch) as counts:
        result = to_host(diagnostics.measure(obs.cuda(), targets.cuda(), clip_range=(-5.0, 5.0)))[0]
    assert counts == {"__bool__": 1, "tolist": 1}
    assert set(result) == set(expected)
    # srank may move by one where a prefix sum sits on 1 − δ within float32 rounding; σ_1/σ_k then moves too.
    assert result[tag("srank")] == pytest.approx(expected[tag("srank")], abs=1)
    same_srank = result[tag("srank")] == expected[tag("srank")]
    for name, value in expected.items():
        if name != tag("srank") and (same_srank or name != tag("feature_cond")):
            assert result[name] == pytest.approx(value, rel=2e-3, abs=1e-5), name
    assert cuda_model.training and all(p.grad is not None for p in cuda_model.parameters())


@pytest.mark.gpu
def test_cuda_probes_match_cpu():
    model = mlp_network(hidden_sizes=(16, 16))
    obs, actions = probe_obs(32), torch.randint(0, N_ACTIONS, (1, 32))
    targets = torch.randn(1, 32, N_ACTIONS)
    cpu, cuda_model = Diagnostics(model), copy.deepcopy(model).cuda()
    cuda = Diagnostics(cuda_model)
    cuda_entk, cpu_entk = cuda.entk(obs.cuda(), actions.cuda()), cpu.entk(obs, actions)
    assert first(cuda_entk, "entk_effective_rank") == pytest.approx(first(cpu_entk, "entk_effective_rank"), rel=1e-3)
    assert first(cuda_entk, "entk_cond") >= 1.0
    expected = first(cpu.hessian_max_eig(lambda: F.mse_loss(model(obs), targets), iters=200), "hessian_max_eig")
    result = cuda.hessian_max_eig(lambda: F.mse_loss(cuda_model(obs.cuda()), targets.cuda()), iters=200)
    assert first(result, "hessian_max_eig") == pytest.approx(expected, rel=1e-2)  # different random starts
    assert first(cuda.probe_fit_loss(obs.cuda(), steps=10), "probe_fit_loss") > 0


def test_benchmark_script_runs_end_to_end():
    """The cost benchmark (a script, not a timed test) still runs; its figures are in docs/."""
    from scripts.benchmarks.bench_diagnostics import main

    results = main(["--device", "cpu", "--probe-batch", "16", "--repeats", "1", "--updates", "1", "--n-actions", "4",
                    "--n-atoms", "5"])
    assert results["updates_per_event"] == 2500
    assert results["measure_ms"] > 0 and results["update_ms"] > 0
    assert results["total_cost_pct"] == pytest.approx(results["measure_cost_pct"] + results["grad_norm_cost_pct"])
