"""Shrink & Perturb (methods.md §6), ReDo (§7), head reset (§8) and pitfalls 1, 2 and 4."""

import copy
import math

import pytest
import torch
from torch import nn

from plasticity.networks import layer_map, reinit_
from plasticity.resets import ReDo, dormant_scores, reset_head_, shrink_and_perturb_

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(layer_norm=False, seed=0, widths=(16, 12)):
    """An ordinary PyTorch MLP (a population of one) laid out as ``networks.mlp`` (hidden layers 1, 4, ...)."""
    torch.manual_seed(seed)
    modules, width = [nn.Flatten()], 5
    for size in widths:
        modules += [nn.Linear(width, size), nn.LayerNorm(size) if layer_norm else nn.Identity(), nn.ReLU()]
        width = size
    return nn.Sequential(*modules, nn.Linear(width, 3))


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.LayerNorm([4, 6, 6]), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 6), nn.ReLU(), nn.Linear(6, 3))


def _trained(model, steps=3, seed=0):
    """An Adam optimiser with non-zero moments for every parameter."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _update(model, optimizer, generator)
    return optimizer


def _inputs(model, batch=32, generator=None):
    shape = (2, 8, 8) if isinstance(model[0], nn.Conv2d) else (5,)
    return torch.randn(batch, *shape, generator=generator)


def _update(model, optimizer, generator=None):
    loss = (model(_inputs(model, generator=generator)) - 1.0).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _assert_still_optimised(model, optimizer, params_before):
    """Pitfall 1: the same Parameter objects, all in the optimiser's param groups."""
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters()}


# ---------------------------------------------------------------------------------------------- S&P


def test_snp_interpolates_toward_a_fresh_initialiser_draw():
    model = _cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # far from any initialisation
    before = [p.detach().clone() for p in model.parameters()]
    shrink_and_perturb_(model, 0.3, torch.Generator().manual_seed(7))
    # θ_fresh: the layer's default initialiser, drawn in the same order (weight, then bias, per layer).
    fresh_model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    for module in fresh_model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            reinit_(module, random=generator)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for p, old, fresh in zip(model.parameters(), before, fresh_model.parameters()):
        torch.testing.assert_close(p.detach(), 0.7 * old + 0.3 * fresh.detach(), rtol=1e-6, atol=1e-6)


def test_snp_with_alpha_one_is_a_fresh_initialisation_and_zero_changes_nothing():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    shrink_and_perturb_(model, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    shrink_and_perturb_(model, 1.0, torch.Generator().manual_seed(0))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.in_features)
            assert module.weight.abs().max() <= bound and module.bias.abs().max() <= bound


def test_pitfall_4_each_application_draws_new_noise():
    """Two applications from the same θ use different fresh samples -- not an interpolation toward θ0."""
    model = _mlp()
    theta0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    theta = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(123)  # not the seed θ0 was drawn with (that would give θ_fresh = θ0)
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    shrink_and_perturb_(first, 0.5, generator)
    shrink_and_perturb_(second, 0.5, generator)
    for a, b in zip(first.parameters(), second.parameters()):
        assert not torch.equal(a, b)
    for p, t, t0 in zip(first.parameters(), theta, theta0):
        assert not torch.allclose(p.detach(), 0.5 * t + 0.5 * t0)


def test_snp_keeps_parameters_in_the_optimiser_and_clears_state_when_asked():
    model = _mlp(layer_norm=True)
    optimizer = _trained(model)
    params = list(model.parameters())
    shrink_and_perturb_(model, 0.2, torch.Generator().manual_seed(0))
    assert all(optimizer.state[p]["exp_avg"].abs().sum() > 0 for p in model.parameters())  # kept by default
    shrink_and_perturb_(model, 0.5, torch.Generator().manual_seed(1), optimizer=optimizer)
    for p in model.parameters():
        state = optimizer.state[p]
        assert state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0
        assert state["step"].item() == 0
    _assert_still_optimised(model, optimizer, params)
    before = [p.detach().clone() for p in model.parameters()]
    _update(model, optimizer)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="--snp"):
        shrink_and_perturb_(model, 1.5)


# --------------------------------------------------------------------------------------------- ReDo


def test_dormant_scores_follow_the_definition():
    """Member-first activations [M, B, units...]; each member normalised by its own layer mean."""
    h = torch.tensor([[0.0, 1.0, 2.0, 5.0], [0.0, 3.0, 0.0, 3.0]])  # E|h| = 0, 2, 1, 4; layer mean 1.75
    torch.testing.assert_close(dormant_scores(h[None]), torch.tensor([[0.0, 2.0, 1.0, 4.0]]) / 1.75)
    conv = torch.zeros(1, 2, 3, 2, 2)
    conv[0, :, 1] = 1.0
    conv[0, 0, 2, 0, 0] = 4.0  # channel 2: mean over batch and H, W = 0.5
    torch.testing.assert_close(dormant_scores(conv), torch.tensor([[0.0, 1.0, 0.5]]) / 0.5)
    torch.testing.assert_close(dormant_scores(torch.zeros(1, 4, 3)), torch.zeros(1, 3))  # all dead: all dormant
    # Two members: member 1 = 10 x member 0 (same scores), member 2 all dead (all 0), no mixing.
    members = torch.stack([h, 10 * h, torch.zeros_like(h)])
    expected = torch.tensor([[0.0, 2.0, 1.0, 4.0], [0.0, 2.0, 1.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    expected[:2] /= 1.75
    torch.testing.assert_close(dormant_scores(members), expected)


def _model_with_dormant_units():
    """Layer `1` (16 units): units 0, 3 dead; unit 5 almost silent (score ≪ 0.1); the rest normal."""
    model = _mlp()
    with torch.no_grad():
        model[1].weight[[0, 3]] = 0.0
        model[1].bias[[0, 3]] = -1.0
        model[1].weight[5] *= 1e-3
        model[1].bias[5] = 0.0
    return model


@pytest.mark.parametrize("tau, expected", [(0.0, [0, 3]), (0.1, [0, 3, 5])])
def test_redo_finds_tau_dormant_units(tau, expected):
    model = _model_with_dormant_units()
    redo = ReDo(model, None, tau)
    masks = redo.dormant_masks(torch.randn(256, 5, generator=torch.Generator().manual_seed(0)))
    assert masks["1"].shape == (1, 16) and masks["1"][0].nonzero().squeeze(1).tolist() == expected


def test_redo_reset_reinitialises_dormant_units_and_zeroes_their_moments():
    model = _model_with_dormant_units()
    optimizer = _trained(model)
    with torch.no_grad():  # training may have nudged the silent unit; keep it silent for the test
        model[1].weight[5] = 1e-4
    params = list(model.parameters())
    before = {p: p.detach().clone() for p in model.parameters()}
    moments = {p: optimizer.state[p]["exp_avg"].clone() for p in model.parameters()}
    model.train()
    redo = ReDo(model, optimizer, 0.1, torch.Generator().manual_seed(0))
    probe = torch.randn(256, 5, generator=torch.Generator().manual_seed(1))
    masks = redo.dormant_masks(probe)
    assert masks["1"][0].nonzero().squeeze(1).tolist() == [0, 3, 5]
    count = redo.reset(probe)
    assert model.training  # probe ran in eval mode, train mode restored
    dormant = torch.tensor([0, 3, 5])
    first, second = model[1], model[4]
    assert count.shape == (1,) and count.item() == sum(int(m.sum()) for m in masks.values())
    # Rows of `second` that are dormant units themselves got fresh incoming weights after the columns were zeroed.
    second_kept = ~masks["4"][0]
    alive = torch.ones(16, dtype=torch.bool)
    alive[dormant] = False
    assert not torch.equal(first.weight[dormant], before[first.weight][dormant])
    assert first.weight[dormant].abs().max() <= 1 / math.sqrt(5)
    assert (first.bias[dormant] == 0).all() and (second.weight[second_kept][:, dormant] == 0).all()
    for p in (first.weight, first.bias):  # untouched units keep values and moments
        assert torch.equal(p[alive], before[p][alive]) and torch.equal(optimizer.state[p]["exp_avg"][alive],
                                                                       moments[p][alive])
    for p, index in ((first.weight, dormant), (first.bias, dormant)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert (optimizer.state[p][key][index] == 0).all()
    for key in ("exp_avg", "exp_avg_sq"):
        assert (optimizer.state[second.weight][key][:, dormant] == 0).all()
        assert (optimizer.state[second.weight][key][~second_kept] == 0).all()
    _assert_still_optimised(model, optimizer, params)
    _update(model, optimizer)
    assert (second.weight[:, dormant] != 0).any()  # the outgoing weights of the fresh units learn


def test_redo_resets_layer_norm_affine_of_dormant_units():
    model = _mlp(layer_norm=True)
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 2.0)
        model[2].bias[[1, 4]] = -50.0  # units 1, 4 dead after LN
        model[2].bias[[0, 2]] = 0.3
    count = ReDo(model, None, 0.0).reset(torch.randn(64, 5))
    assert count.item() >= 2
    assert (model[2].weight[[1, 4]] == 1).all() and (model[2].bias[[1, 4]] == 0).all()
    assert (model[2].bias[[0, 2]] == 0.3).all()


def test_redo_validation():
    with pytest.raises(ValueError, match="--redo-tau"):
        ReDo(_mlp(), None, -0.1)


# --------------------------------------------------------------------------------------- head reset


def test_head_reset_in_place_with_cleared_state_and_target_copy():
    model = _mlp()
    target = copy.deepcopy(model)
    optimizer = _trained(model)
    params = list(model.parameters())
    head = layer_map(model).output
    old_head = head.weight.detach().clone()
    torso_before = [p.detach().clone() for p in model[:-1].parameters()]
    target_torso = [p.detach().clone() for p in target[:-1].parameters()]
    reset_head_(model, optimizer, target, torch.Generator().manual_seed(0))
    assert not torch.equal(head.weight, old_head)
    assert head.weight.abs().max() <= 1 / math.sqrt(12)
    for p in (head.weight, head.bias):
        state = optimizer.state[p]
        assert (state["exp_avg"] == 0).all() and (state["exp_avg_sq"] == 0).all() and state["step"].item() == 0
    assert optimizer.state[model[1].weight]["exp_avg"].abs().sum() > 0  # the torso's state is kept
    assert torch.equal(target[-1].weight, head.weight) and torch.equal(target[-1].bias, head.bias)
    assert all(torch.equal(p, b) for p, b in zip(model[:-1].parameters(), torso_before))
    assert all(torch.equal(p, b) for p, b in zip(target[:-1].parameters(), target_torso))
    _assert_still_optimised(model, optimizer, params)
    fresh = head.weight.detach().clone()
    _update(model, optimizer)
    assert not torch.equal(head.weight, fresh)
    # Adam restarted from step 0: the first update of each head entry has magnitude ≈ lr (bias-corrected).
    torch.testing.assert_close((head.weight - fresh).abs().max(), torch.tensor(1e-2), rtol=1e-3, atol=0)


def test_head_reset_rejects_a_mismatched_target():
    with pytest.raises(ValueError, match="target head"):
        reset_head_(_mlp(), None, _mlp(widths=(16, 8)))
