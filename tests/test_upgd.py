"""methods-v2.md §12 UPGD: the formula (12.5), the seeded noise (12.6), per-member η_max and noise in a population."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from plasticity.optimizers import OptimizerFlags, build_optimizer
from plasticity.population import MemberLinear
from plasticity.upgd import UPGD, member_keys, member_normal

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add overhead


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_12_5_without_noise_two_element_tensors_follow_the_formula():
    lr, wd, beta_u, beta1, beta2, eps = 0.1, 0.01, 0.9, 0.8, 0.95, 1e-5
    start = {"a": [0.5, -1.0], "b": [2.0, 0.3]}
    grads = [{"a": [0.4, 0.2], "b": [-0.3, 1.0]}, {"a": [-0.1, 0.5], "b": [0.2, -0.7]},
             {"a": [0.3, 0.3], "b": [1.5, 0.1]}]
    params = {name: nn.Parameter(torch.tensor(values, dtype=torch.float64)) for name, values in start.items()}
    optimizer = UPGD(list(params.values()), lr=lr, weight_decay=wd, beta_utility=beta_u, sigma=0.0,
                     betas=(beta1, beta2), eps=eps)
    theta = {name: list(values) for name, values in start.items()}
    utility = {name: [0.0, 0.0] for name in start}
    m = {name: [0.0, 0.0] for name in start}
    v = {name: [0.0, 0.0] for name in start}
    for k, grad in enumerate(grads, start=1):
        for name, p in params.items():
            p.grad = torch.tensor(grad[name], dtype=torch.float64)
        optimizer.step()
        for name in start:
            for i in range(2):
                g = grad[name][i]
                utility[name][i] = beta_u * utility[name][i] + (1 - beta_u) * (-g * theta[name][i])
                m[name][i] = beta1 * m[name][i] + (1 - beta1) * g
                v[name][i] = beta2 * v[name][i] + (1 - beta2) * g * g
        eta_max = max(u for values in utility.values() for u in values)  # not bias-corrected (the code's quirk)
        for name in start:
            for i in range(2):
                s = _sigmoid(utility[name][i] / (1 - beta_u ** k) / eta_max)
                m_hat, v_hat = m[name][i] / (1 - beta1 ** k), v[name][i] / (1 - beta2 ** k)
                theta[name][i] = (1 - lr * wd) * theta[name][i] - 2 * lr * m_hat * (1 - s) / (math.sqrt(v_hat) + eps)
        for name, p in params.items():
            torch.testing.assert_close(p.detach(), torch.tensor(theta[name], dtype=torch.float64), rtol=1e-12,
                                       atol=1e-14)
    assert optimizer.state[params["a"]]["step"] == 3


def _pair(sigma: float, seeds=(11,), members: int = 1, numel: int = 20_000):
    p = nn.Parameter(torch.linspace(-1, 1, numel).reshape(members, -1) if members > 1
                     else torch.linspace(-1, 1, numel))
    return p, UPGD([p], lr=0.01, sigma=sigma, members=members, seeds=list(seeds))


def _noise_of_step(sigma: float, seeds=(11,), steps: int = 1) -> list[torch.Tensor]:
    """ξ/σ of each step, read off the difference between a noisy and a noise-free run on the same gradients."""
    noisy, noisy_opt = _pair(sigma, seeds)
    clean, clean_opt = _pair(0.0, seeds)
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        clean.data.copy_(noisy.data)
        clean_opt.load_state_dict(noisy_opt.state_dict())  # same U, m, v, k: only ξ differs
        clean_opt.param_groups[0]["sigma"] = 0.0  # (a loaded state brings its group's hyperparameters)
        grad = torch.randn(noisy.shape, generator=generator)
        noisy.grad, clean.grad = grad.clone(), grad.clone()
        before = noisy.detach().clone()
        noisy_opt.step()
        clean_opt.step()
        state = clean_opt.state[clean]
        k = state["step"]
        scaled = torch.sigmoid(state["avg_utility"] / (1 - 0.999 ** k) / state["avg_utility"].max())
        keep = 1 - scaled
        assert (keep > 0.1).float().mean() > 0.3  # where s ≈ 1 (the ×1/(1−β_u) quirk at k = 1) ξ is masked out
        xi = (noisy.detach() - clean.detach()) / (-2 * 0.01 * sigma * keep)
        assert not torch.equal(noisy.detach(), before)
        out.append(torch.where(keep > 0.1, xi, torch.nan))
    return out


def test_12_6_the_noise_is_seeded_reproducible_and_standard_normal():
    first, second = _noise_of_step(0.05, steps=2)
    both = ~first.isnan() & ~second.isnan()
    sample = first[~first.isnan()]
    assert sample.numel() > 6000
    assert abs(sample.mean().item()) < 0.04 and abs(sample.std().item() - 1) < 0.04
    assert abs((sample.abs() < 1).float().mean().item() - 0.6827) < 0.02
    assert abs(torch.corrcoef(torch.stack([first[both], second[both]]))[0, 1].item()) < 0.05  # fresh each step
    again = _noise_of_step(0.05, steps=2)
    torch.testing.assert_close(again[0], first, rtol=1e-4, atol=1e-4, equal_nan=True)
    other = _noise_of_step(0.05, seeds=(12,))[0]
    common = ~first.isnan() & ~other.isnan()
    assert abs(torch.corrcoef(torch.stack([first[common], other[common]]))[0, 1].item()) < 0.05
    # bit-identical runs from the same seed
    runs = []
    for _ in range(2):
        p, optimizer = _pair(0.05)
        for step in range(3):
            p.grad = torch.full_like(p, 0.1 * (step + 1))
            optimizer.step()
        runs.append(p.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_member_noise_depends_only_on_the_members_own_seed():
    keys = member_keys([3, 4, 5], "cpu")
    population = member_normal(keys, counter=7, tensor_index=2, shape=(6, 5))
    for k, seed in enumerate([3, 4, 5]):
        alone = member_normal(member_keys([seed], "cpu"), counter=7, tensor_index=2, shape=(6, 5))
        assert torch.equal(population[k], alone[0])
    assert not torch.equal(population[0], population[1])
    assert not torch.equal(population, member_normal(keys, counter=8, tensor_index=2, shape=(6, 5)))
    assert not torch.equal(population, member_normal(keys, counter=7, tensor_index=3, shape=(6, 5)))
    big = member_normal(member_keys([1 << 40, 2], "cpu"), counter=(1 << 33) + 5, tensor_index=0, shape=(50_000,))
    assert torch.isfinite(big).all() and big.abs().max() < 6
    assert (big.mean(1).abs() < 0.02).all() and ((big.std(1) - 1).abs() < 0.02).all()
    lag1 = torch.corrcoef(torch.stack([big[0, :-1], big[0, 1:]]))[0, 1]
    assert abs(lag1.item()) < 0.02 and abs(torch.corrcoef(big)[0, 1].item()) < 0.02  # neighbours, members


def _run(model, optimizer, inputs):
    for x in inputs:
        optimizer.zero_grad()
        (model(x) - 1.0).square().sum().backward()
        optimizer.step()


def test_member_k_of_a_population_is_member_k_run_alone():
    flags = OptimizerFlags(optimizer="upgd", upgd_sigma=0.05, upgd_weight_decay=0.01)
    scale = [1.0, 20.0]  # member 1's utilities are far larger: a shared η_max would change member 0
    generators = [torch.Generator().manual_seed(k) for k in range(2)]
    both = nn.Sequential(MemberLinear(2, 4, 6, generators=generators), nn.ReLU(),
                         MemberLinear(2, 6, 2, generators=generators))
    data = torch.Generator().manual_seed(100)
    inputs = [torch.randn(2, 5, 4, generator=data) * torch.tensor(scale).view(-1, 1, 1) for _ in range(12)]
    initial = {name: p.detach().clone() for name, p in both.named_parameters()}
    optimizer = build_optimizer(both, flags, 0.01, seeds=[30, 31])
    assert optimizer.members == 2
    _run(both, optimizer, inputs)
    maxima = torch.stack([optimizer.state[p]["avg_utility"].flatten(1).amax(1) for p in both.parameters()]).amax(0)
    assert maxima[1] > 3 * maxima[0]
    for k in range(2):
        alone = nn.Sequential(MemberLinear(1, 4, 6), nn.ReLU(), MemberLinear(1, 6, 2))
        with torch.no_grad():
            for name, p in alone.named_parameters():
                p.copy_(initial[name][k:k + 1])
        single = build_optimizer(alone, flags, 0.01, seeds=[30 + k])
        _run(alone, single, [x[k:k + 1] for x in inputs])
        for (name, p), q in zip(both.named_parameters(), alone.parameters()):
            torch.testing.assert_close(p[k:k + 1], q, rtol=1e-5, atol=1e-6, msg=f"member {k}, {name}")
            assert not torch.equal(p[k:k + 1], initial[name][k:k + 1])


def test_an_ordinary_model_is_one_member():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    member = nn.Sequential(MemberLinear(1, 4, 3), nn.ReLU(), MemberLinear(1, 3, 2))
    with torch.no_grad():
        for p, q in zip(member.parameters(), plain.parameters()):
            p.copy_(q.unsqueeze(0))
    flags = OptimizerFlags(optimizer="upgd", upgd_sigma=0.05)
    a, b = build_optimizer(plain, flags, 0.01, seeds=[7]), build_optimizer(member, flags, 0.01, seeds=[7])
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(1))
    for batch in x:
        for model, optimizer, inputs in ((plain, a, batch), (member, b, batch.unsqueeze(0))):
            optimizer.zero_grad()
            model(inputs).square().sum().backward()
            optimizer.step()
    for p, q in zip(member.parameters(), plain.parameters()):
        torch.testing.assert_close(p[0], q, rtol=1e-5, atol=1e-6)


def test_a_population_needs_the_member_dim_and_one_seed_per_member():
    with pytest.raises(ValueError, match="no leading member dim"):
        UPGD([nn.Parameter(torch.zeros(3, 4))], members=2)
    with pytest.raises(ValueError, match="one per member"):
        UPGD([nn.Parameter(torch.zeros(2, 4))], members=2, seeds=[1])
    with pytest.raises(ValueError, match="noise_step|seeds"):
        source = UPGD([nn.Parameter(torch.zeros(2, 4))], members=2, seeds=[1, 2])
        UPGD([nn.Parameter(torch.zeros(2, 4))], members=2, seeds=[1, 3]).load_state_dict(source.state_dict())


@pytest.mark.gpu
def test_on_cuda_the_optimisers_and_resets_never_sync_and_the_noise_matches_the_cpu():
    from plasticity.optimizer_reset import reset_optimizer_state_

    keys = member_keys([3, 4], "cpu")
    cpu = member_normal(keys, 5, 1, (1000,))
    cuda = member_normal(keys.cuda(), 5, 1, (1000,))
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)
    for flags in (OptimizerFlags(optimizer="upgd", upgd_sigma=0.01), OptimizerFlags(adam_per_entry_step=True),
                  OptimizerFlags()):
        generators = [torch.Generator().manual_seed(k) for k in range(2)]
        model = nn.Sequential(MemberLinear(2, 4, 6, generators=generators), nn.ReLU(),
                              MemberLinear(2, 6, 2, generators=generators)).cuda()
        optimizer = build_optimizer(model, flags, 0.01, seeds=[1, 2])
        x = torch.randn(2, 5, 4, device="cuda")
        for _ in range(3):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                optimizer.step()
                reset_optimizer_state_(optimizer, "step")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert all(torch.isfinite(p).all() for p in model.parameters())
