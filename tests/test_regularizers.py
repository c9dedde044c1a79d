"""L2 (methods.md §2) and L2-Init (§3) penalties against their definitions."""

import pytest
import torch
from torch import nn

from plasticity.regularizers import L2InitPenalty, L2Penalty, regularized_parameters


def _model(layer_norm: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm([4, 6, 6]) if layer_norm else nn.Identity(), nn.ReLU(),
                         nn.Flatten(), nn.Linear(144, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))


def test_regularized_parameters_are_linear_and_conv_weights_and_biases_only():
    model = _model()
    expected = [model[0].weight, model[0].bias, model[4].weight, model[4].bias, model[7].weight, model[7].bias]
    params = regularized_parameters(model)
    assert len(params) == len(expected) and all(p is e for p, e in zip(params, expected))
    with pytest.raises(ValueError, match="no Linear/Conv2d"):
        regularized_parameters(nn.Sequential(nn.LayerNorm(3)))


def test_l2_penalty_value_and_gradient():
    model = _model()
    with torch.no_grad():  # large γ/β: they must not count
        model[1].weight.fill_(10.0)
        model[5].bias.fill_(-7.0)
    penalty = L2Penalty(model, 1e-2)
    value = penalty()
    expected = 0.5 * 1e-2 * sum((p.detach() ** 2).sum() for p in regularized_parameters(model))
    torch.testing.assert_close(value, expected)
    value.backward()
    for p in regularized_parameters(model):
        torch.testing.assert_close(p.grad, 1e-2 * p.detach())  # d/dW (λ/2)‖W‖² = λW
    assert model[1].weight.grad is None and model[5].bias.grad is None


def test_l2_init_penalty_value_gradient_and_frozen_init():
    model = _model()
    penalty = L2InitPenalty(model, 0.1)
    initial = [p.detach().clone() for p in regularized_parameters(model)]
    zero = penalty()
    assert zero.item() == 0.0
    zero.backward()  # at θ = θ0 the gradient is exactly 0, not NaN
    for p in regularized_parameters(model):
        assert torch.equal(p.grad, torch.zeros_like(p))
        p.grad = None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    value = penalty()
    displacement = [p.detach() - p0 for p, p0 in zip(regularized_parameters(model), initial)]
    torch.testing.assert_close(value, 0.5 * 0.1 * sum((d ** 2).sum() for d in displacement))
    value.backward()
    for p, d in zip(regularized_parameters(model), displacement):
        torch.testing.assert_close(p.grad, 0.1 * d)
    # θ0 is a frozen copy (own storage, no grad, same device), untouched by training.
    for saved, original, p in zip(penalty.initial, initial, regularized_parameters(model)):
        assert torch.equal(saved, original) and not saved.requires_grad
        assert saved.data_ptr() != p.data_ptr() and saved.device == p.device


def test_l2_init_is_the_squared_form():
    """Doubling the displacement quadruples the penalty; the unsquared λ‖θ − θ0‖ would only double it."""
    model = _model()
    penalty = L2InitPenalty(model, 1.0)
    params = regularized_parameters(model)
    direction = [torch.randn_like(p) for p in params]
    with torch.no_grad():
        torch._foreach_add_(params, direction)
    once = penalty().item()
    with torch.no_grad():
        torch._foreach_add_(params, direction)
    assert penalty().item() == pytest.approx(4 * once, rel=1e-5)


def test_l2_init_state_roundtrip(tmp_path):
    model = _model()
    penalty = L2InitPenalty(model, 0.1)
    torch.save(penalty.state_dict(), tmp_path / "l2init.pt")
    other_model = _model()
    with torch.no_grad():
        for p in other_model.parameters():
            p.zero_()
    other = L2InitPenalty(other_model, 0.1)  # θ0 = 0 until the checkpoint is loaded
    other.load_state_dict(torch.load(tmp_path / "l2init.pt", weights_only=True))
    for a, b in zip(other.initial, penalty.initial):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not match"):
        L2InitPenalty(nn.Sequential(nn.Linear(3, 2)), 0.1).load_state_dict(penalty.state_dict())


@pytest.mark.parametrize("cls, flag", [(L2Penalty, "--l2"), (L2InitPenalty, "--l2-init")])
def test_negative_coefficient_is_rejected(cls, flag):
    with pytest.raises(ValueError, match=flag):
        cls(_model(), -1e-4)


@pytest.mark.parametrize("cls", [L2Penalty, L2InitPenalty])
def test_an_ordinary_model_is_a_population_of_one(cls):
    """Per member values are [1]; the penalty itself is their 0-dim sum, logged per member by PenaltyTerm."""
    from plasticity.regularizers import PenaltyTerm

    model = _model()
    penalty = cls(model, 0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    per_member = penalty.per_member()
    assert per_member.shape == (1,)
    assert penalty().dim() == 0 and torch.equal(penalty(), per_member.sum())
    term = PenaltyTerm("l2", penalty)
    assert term.scalars()["plasticity/l2_penalty"].shape == (1,)
    value = term.penalty()
    assert value.dim() == 0
    torch.testing.assert_close(term.scalars()["plasticity/l2_penalty"], per_member.detach())
