"""C-CHAIN (methods-v2.md §10): churn value, automatic λ, reference batch, gradient, resets, state, populations."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from envs.replay_buffer import ReplayBuffer
from plasticity.c_chain import CChain, CChainFlags, ChurnPenalty
from plasticity.flags import check_ranges, declared_ranges, flag_name
from plasticity.intervention import Parts, Setting
from plasticity.networks import build_torso
from plasticity.population import MemberLinear
from plasticity.streams import MemberRandom

OBS, ACTIONS, BATCH = 4, 3, 6


class TinyQ(nn.Module):
    """MLP torso -> member head: Q-values [M, B, A], or logits [M, B, A, bins] with ``q_values`` the expectation."""

    def __init__(self, seeds=(0,), bins=None):
        super().__init__()
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        members = len(seeds)
        self.torso = build_torso("mlp", (OBS,), hidden_sizes=(8,), members=members, generators=generators)
        self.bins = bins
        self.head = MemberLinear(members, self.torso.out_features, ACTIONS * (bins or 1), generators=generators)
        if bins:
            self.register_buffer("support", torch.linspace(-2.0, 2.0, bins))

    def forward(self, x):
        out = self.head(self.torso(x))
        return out if self.bins is None else out.view(*x.shape[:2], ACTIONS, self.bins)

    def q_values(self, x):
        out = self(x)
        return out if self.bins is None else (torch.softmax(out, -1) * self.support).sum(-1)


def perturb(model, generator, scale=0.1):
    """A stand-in for an optimiser step: every parameter moves by Gaussian noise, in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def observations(members=1, seed=0):
    return torch.randn(members, BATCH, OBS, generator=torch.Generator().manual_seed(seed))


def churn_between(model, reference, obs, kl=False):
    """The definition, with a deep copy as θ_(u−1): mean over (B, A) per member."""
    with torch.no_grad():
        if kl:
            log_p, log_ref = F.log_softmax(model(obs), -1), F.log_softmax(reference(obs), -1)
            return F.kl_div(log_p, log_ref, reduction="none", log_target=True).sum(-1).mean((1, 2))
        return (model.q_values(obs) - reference.q_values(obs)).square().mean((1, 2))


TD = torch.tensor([0.7])


# ---------------------------------------------------------------- 10.1
def test_churn_is_zero_without_change_and_known_on_a_constructed_pair():
    model, obs = TinyQ(), observations()
    term = ChurnPenalty(model, coef=2.0, warmup=10**6)
    first = term.penalty(TD, obs)  # no reference yet
    assert first.item() == 0.0 and torch.equal(term.last_churn, torch.zeros(1))
    assert term.penalty(TD, obs).item() == 0.0  # θ_u == θ_(u−1)
    assert torch.equal(term.last_churn, torch.zeros(1))
    delta = torch.tensor([0.1, -0.2, 0.3])
    with torch.no_grad():  # Q_θu(s, ·) = Q_θ(u−1)(s, ·) − δ for every state
        model.head.bias.sub_(delta)
    value = term.penalty(TD, obs)
    expected = delta.square().mean()  # (0.01 + 0.04 + 0.09) / 3
    torch.testing.assert_close(term.last_churn, expected.reshape(1))
    torch.testing.assert_close(value, 2.0 * expected)
    # Any pair: against a copy of the previous update's network.
    before = copy.deepcopy(model)
    perturb(model, torch.Generator().manual_seed(1))
    value = term.penalty(TD, obs)
    expected = churn_between(model, before, obs)
    assert expected.item() > 1e-4
    torch.testing.assert_close(term.last_churn, expected)
    torch.testing.assert_close(value, 2.0 * expected.sum())


def test_first_update_is_zero_even_when_the_network_changed_since_construction():
    model, obs = TinyQ(), observations()
    term = ChurnPenalty(model)
    perturb(model, torch.Generator().manual_seed(2))
    assert term.penalty(TD, obs).item() == 0.0


# ---------------------------------------------------------------- 10.2
def run_updates(term, model, updates, seed=0, members=1):
    """``updates`` penalties with perturbations in between; per update (td, λ used, churn, value, λ after)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(updates):
        td = torch.randn(members, generator=generator) * 2.0  # signed on purpose: the window holds |L_TD|
        used = term.lam.clone()
        value = term.penalty(td, observations(members, seed=int(torch.randint(10**6, (1,), generator=generator))))
        rows.append((td, used, term.last_churn.clone(), value.detach(), term.lam.clone()))
        perturb(model, generator)
    return rows


@pytest.mark.parametrize("warmup", [0, 3, 7])
def test_lambda_follows_the_formula_from_the_windows(warmup):
    beta, coef, window, members = 0.5, 7.0, 4, 2
    model = TinyQ(seeds=(0, 1))
    term = ChurnPenalty(model, coef=coef, target_rel_scale=beta, warmup=warmup, window=window)
    rows = run_updates(term, model, 14, members=members)
    lam = [coef] * members  # the straightforward host computation
    tds, churns = [], []
    for u, (td, used, churn, value, after) in enumerate(rows, start=1):
        torch.testing.assert_close(used, torch.tensor(lam, dtype=torch.float32), rtol=1e-6, atol=0)
        torch.testing.assert_close(value, (used * churn).sum())
        tds.append(td.abs().tolist())
        if u > 1:  # the first update has no reference: no churn in the window
            churns.append(churn.tolist())
            assert churn.min().item() > 0
        if u >= warmup and churns:
            lam = [beta * (sum(t[m] for t in tds[-window:]) / len(tds[-window:]))
                   / (sum(c[m] for c in churns[-window:]) / len(churns[-window:]) + 1e-8) for m in range(members)]
        torch.testing.assert_close(after, torch.tensor(lam, dtype=torch.float32), rtol=1e-6, atol=0)
        if u < max(warmup, 2):
            assert torch.equal(after, torch.full((members,), coef))
    assert len(tds) > window and len(churns) > window  # the windows wrapped
    assert not torch.allclose(rows[-1][4], torch.full((members,), coef))


def test_fixed_coefficient_stays_lambda0():
    model = TinyQ()
    term = ChurnPenalty(model, coef=3.0, warmup=0, window=2, fixed=True)
    for _, used, churn, value, after in run_updates(term, model, 6):
        assert torch.equal(used, torch.tensor([3.0])) and torch.equal(after, torch.tensor([3.0]))
        torch.testing.assert_close(value, 3.0 * churn.sum())


# ---------------------------------------------------------------- 10.3
def filled_buffer(seeds):
    buffer = ReplayBuffer(64, (OBS,), 2, obs_dtype=torch.float32, seeds=seeds)
    members = len(seeds)
    for step in range(10):  # every stored observation is unique: member * 1000 + step * 10 + env
        ids = torch.tensor([[m * 1000 + step * 10 + e for e in range(2)] for m in range(members)], dtype=torch.float32)
        obs = ids[..., None].expand(members, 2, OBS).contiguous()
        zeros = torch.zeros(members, 2)
        buffer.add(obs, zeros.long(), zeros, obs, zeros.bool(), zeros.bool())
    return buffer


def test_reference_batch_is_a_separate_draw_after_the_training_batch():
    seeds = [5, 6]
    buffer, twin = filled_buffer(seeds), filled_buffer(seeds)
    model = TinyQ(seeds=(0, 1))
    method = CChain(ChurnPenalty(model, coef=1.0), batch_size=BATCH)
    drawn = []

    def sample_obs(n):
        drawn.append(buffer.sample_obs(n))
        return drawn[-1]

    values = []
    for update in range(2):
        train = buffer.sample(BATCH)  # B_train first, then the loop calls the penalty
        td = torch.ones(2)
        values.append(method.penalty(td_loss=td, sample_obs=sample_obs))
        if update == 0:
            before = copy.deepcopy(model)
            perturb(model, torch.Generator().manual_seed(3))
        twin_train, twin_ref = twin.sample(BATCH), twin.sample_obs(BATCH)
        assert torch.equal(twin_train.obs, train.obs)
        assert drawn[-1].shape == (2, BATCH, OBS)
        assert torch.equal(drawn[-1], twin_ref)  # the buffer's next draw after B_train
        assert not torch.equal(drawn[-1], train.obs)  # not the training batch
        assert (drawn[-1][1] >= 1000).all() and (drawn[-1][0] < 1000).all()  # member k's states at index k
    torch.testing.assert_close(method.term.last_churn, churn_between(model, before, drawn[1]))
    torch.testing.assert_close(values[1], churn_between(model, before, drawn[1]).sum())


# ---------------------------------------------------------------- 10.4
def test_gradient_flows_only_into_the_current_parameters_and_snapshot_precedes_the_step():
    model, obs = TinyQ(), observations()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    term = ChurnPenalty(model, coef=4.0, warmup=10**6)
    term.penalty(TD, obs)
    previous = copy.deepcopy(model)
    perturb(model, torch.Generator().manual_seed(4))
    optimizer.zero_grad()
    term.penalty(TD, obs).backward()
    with torch.no_grad():
        q_ref = previous.q_values(obs)
    expected = torch.autograd.grad(4.0 * (model.q_values(obs) - q_ref).square().mean(), list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    assert all(not t.requires_grad and t.grad is None for t in term.reference)
    assert all(p.grad is None for p in previous.parameters())
    # The reference now holds θ_u (the parameters of this forward), taken before optimizer.step().
    current = copy.deepcopy(model)
    optimizer.step()
    for ref, p in zip(term.reference, current.parameters()):
        assert torch.equal(ref, p)
    term.penalty(TD, obs)
    torch.testing.assert_close(term.last_churn, churn_between(model, current, obs))


def test_after_a_rewrite_the_next_churn_is_zero():
    model, obs = TinyQ(), observations()
    method = CChain(ChurnPenalty(model, coef=5.0), batch_size=BATCH)
    sample = lambda n: obs  # noqa: E731
    method.penalty(TD, sample)
    perturb(model, torch.Generator().manual_seed(5), scale=1.0)  # e.g. a layer reset by another method
    method.on_rewrite()
    model.zero_grad()
    value = method.penalty(TD, sample)
    value.backward()
    assert value.item() == 0.0 and torch.equal(method.term.last_churn, torch.zeros(1))
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    perturb(model, torch.Generator().manual_seed(6))
    assert method.penalty(TD, sample).item() > 0  # not stuck at 0


# ---------------------------------------------------------------- state and populations
def test_state_round_trip_continues_identically():
    model = TinyQ(seeds=(0, 1))
    term = ChurnPenalty(model, coef=2.0, target_rel_scale=0.3, warmup=3, window=4)
    run_updates(term, model, 5, seed=7, members=2)
    buffer = io.BytesIO()
    torch.save(term.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    twin_model = copy.deepcopy(model)
    twin = ChurnPenalty(twin_model, coef=2.0, target_rel_scale=0.3, warmup=3, window=4)
    twin.load_state_dict(state)
    for a, b in zip(run_updates(term, model, 6, seed=8, members=2), run_updates(twin, twin_model, 6, seed=8,
                                                                             members=2)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="c-chain-window"):
        ChurnPenalty(TinyQ(seeds=(0, 1)), window=5).load_state_dict(state)
    with pytest.raises(ValueError, match="does not match"):
        ChurnPenalty(TinyQ(seeds=(0, 1), bins=3), window=4).load_state_dict(state)


def test_population_member_equals_the_member_alone():
    seeds = (11, 12)
    population = TinyQ(seeds=seeds)
    singles = [TinyQ(seeds=(s,)) for s in seeds]
    for k, single in enumerate(singles):
        for p, q in zip(population.parameters(), single.parameters()):
            assert torch.equal(p[k], q[0])
    config = dict(coef=2.0, target_rel_scale=0.1, warmup=2, window=3)
    terms = [ChurnPenalty(population, **config)] + [ChurnPenalty(single, **config) for single in singles]
    generator = torch.Generator().manual_seed(9)
    for update in range(6):
        obs, td = observations(2, seed=update), torch.rand(2, generator=generator)
        population.zero_grad()
        value = terms[0].penalty(td, obs)
        if update > 0:  # the first update's 0 has no graph
            value.backward()
        for k, single in enumerate(singles):
            single.zero_grad()
            value = terms[k + 1].penalty(td[k:k + 1], obs[k:k + 1])
            if update > 0:
                value.backward()
            torch.testing.assert_close(terms[0].last_churn[k:k + 1], terms[k + 1].last_churn)
            torch.testing.assert_close(terms[0].lam[k:k + 1], terms[k + 1].lam)
            for p, q in zip(population.parameters(), single.parameters()):
                if update > 0:
                    torch.testing.assert_close(p.grad[k], q.grad[0])
        with torch.no_grad():  # the same step for member k in both
            for k, single in enumerate(singles):
                for p, q in zip(population.parameters(), single.parameters()):
                    noise = torch.randn(q.shape, generator=generator) * 0.1
                    p[k].add_(noise[0])
                    q.add_(noise)
    assert terms[0].last_churn.min().item() > 0 and not torch.equal(terms[0].lam, torch.full((2,), 2.0))


# ---------------------------------------------------------------- categorical heads
def test_categorical_q_mse_uses_expected_values_and_kl_the_distributions():
    obs = observations(2)
    for distance in ("q-mse", "kl"):
        model = TinyQ(seeds=(0, 1), bins=5)
        term = ChurnPenalty(model, coef=1.0, distance=distance)
        term.penalty(torch.ones(2), obs)
        assert term.penalty(torch.ones(2), obs).item() == 0.0  # unchanged
        before = copy.deepcopy(model)
        perturb(model, torch.Generator().manual_seed(10))
        value = term.penalty(torch.ones(2), obs)
        expected = churn_between(model, before, obs, kl=distance == "kl")
        assert expected.min().item() > 1e-5
        torch.testing.assert_close(term.last_churn, expected)
        torch.testing.assert_close(value, expected.sum())
    # The two distances differ on the same pair (q-mse is not the KL).
    assert not torch.allclose(churn_between(model, before, obs), churn_between(model, before, obs, kl=True))


def test_model_without_q_values_uses_its_outputs_and_kl_needs_logits():
    torch.manual_seed(0)
    model = nn.Sequential(MemberLinear(1, OBS, ACTIONS))
    obs = observations()
    term = ChurnPenalty(model, coef=1.0)
    term.penalty(TD, obs)
    before = copy.deepcopy(model)
    perturb(model, torch.Generator().manual_seed(12))
    term.penalty(TD, obs)
    with torch.no_grad():
        torch.testing.assert_close(term.last_churn, (model(obs) - before(obs)).square().mean((1, 2)))
    kl = ChurnPenalty(TinyQ(), distance="kl")
    kl.penalty(TD, obs)
    with pytest.raises(ValueError, match="logits"):
        kl.penalty(TD, obs)


# ---------------------------------------------------------------- flags and the hook
def test_flags_rules_and_build():
    CChainFlags().check(Setting())
    CChainFlags(c_chain=True).check(Setting())
    with pytest.raises(ValueError, match=r"--c-chain-coef, --c-chain-distance need --c-chain"):
        CChainFlags(c_chain_coef=1.0, c_chain_distance="kl").check(Setting(categorical=True))
    with pytest.raises(ValueError, match=r"--c-chain-fixed needs --c-chain"):
        CChainFlags(c_chain_fixed=True).check(Setting())
    with pytest.raises(ValueError, match="categorical"):
        CChainFlags(c_chain=True, c_chain_distance="kl").check(Setting(categorical=False))
    CChainFlags(c_chain=True, c_chain_distance="kl").check(Setting(categorical=True))
    with pytest.raises(ValueError, match="--c-chain-warmup.*--c-chain-fixed"):
        CChainFlags(c_chain=True, c_chain_fixed=True, c_chain_warmup=5).check(Setting())
    CChainFlags(c_chain=True, c_chain_fixed=True, c_chain_coef=3.0).check(Setting())
    with pytest.raises(ValueError, match="unknown --c-chain-distance"):
        CChainFlags(c_chain=True, c_chain_distance="l1").check(Setting())
    ranges = declared_ranges(CChainFlags)
    assert set(ranges) == {"c_chain_target_rel_scale", "c_chain_coef", "c_chain_warmup", "c_chain_window"}
    for name, (value_range, _) in ranges.items():
        for bad in value_range.invalid_examples():
            with pytest.raises(ValueError, match=f"--{flag_name(name)}"):
                check_ranges(CChainFlags(**{name: bad}))

    model = TinyQ()
    parts = Parts(model, None, None, MemberRandom([0]), Setting(batch_size=BATCH))
    assert CChainFlags().build(parts) is None
    method = CChainFlags(c_chain=True, c_chain_coef=3.0, c_chain_window=7).build(parts)
    assert isinstance(method, CChain) and method.name == "c_chain" and method.batch_size == BATCH
    assert method.term.window == 7 and torch.equal(method.term.lam, torch.tensor([3.0]))
    asked = []
    method.penalty(TD, lambda n: asked.append(n) or observations())
    assert asked == [BATCH]
    assert set(method.scalars()) == {"plasticity/c_chain_coef", "losses/c_chain_loss"}
    assert all(v.shape == (1,) for v in method.scalars().values())
    with pytest.raises(ValueError, match="sample_obs"):
        method.penalty(TD, None)


@pytest.mark.parametrize("distance", ["q-mse", "kl"])
def test_updates_make_no_host_sync(distance):
    """On the meta device any .item()/bool()/.tolist() raises: the per-update path (both windows, λ) has none."""
    model = TinyQ(seeds=(0, 1), bins=5).to("meta")
    method = CChain(ChurnPenalty(model, warmup=1, window=2, distance=distance), batch_size=3)
    for _ in range(4):
        value = method.penalty(torch.ones(2, device="meta"), lambda n: torch.ones(2, n, OBS, device="meta"))
        if value.requires_grad:
            value.backward()
        method.on_rewrite()
    assert method.term.updates == 4 and method.term.lam.device.type == "meta"
    assert all(v.device.type == "meta" for v in method.scalars().values())
