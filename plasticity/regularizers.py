"""L2 and L2-Init penalties as explicit loss terms (spec methods.md §2, §3).

Both cover the weights and biases of every Linear/Conv2d layer and exclude
normalisation layers (LayerNorm γ/β).  Each is a callable returning a 0-dim
tensor that the agent adds to its loss, so the gradient is exactly λ·W (L2)
or λ·(θ − θ0) (L2-Init) on top of the loss gradient, before Adam's scaling --
the "explicit loss term" reading of §2, not decoupled AdamW decay.
"""

from __future__ import annotations

import torch
from torch import nn

from plasticity.networks import WEIGHT_LAYERS


def regularized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of every Linear/Conv2d of ``model``, in registration order (no norm layers)."""
    params = [p for module in model.modules() if isinstance(module, WEIGHT_LAYERS)
              for p in (module.weight, module.bias) if p is not None]
    if not params:
        raise ValueError("the model has no Linear/Conv2d layer to regularise")
    return params


def _check_coef(name: str, coef: float) -> None:
    if not coef >= 0:
        raise ValueError(f"--{name} must be >= 0 (0 turns it off); got {coef}")


class L2Penalty:
    """(λ/2)·Σ‖W‖² over the weights and biases of the linear/conv layers (§2)."""

    def __init__(self, model: nn.Module, coef: float):
        _check_coef("l2", coef)
        self.coef = float(coef)
        self.params = regularized_parameters(model)

    def __call__(self) -> torch.Tensor:
        squared_norms = torch.stack(torch._foreach_norm(self.params)).square()
        return 0.5 * self.coef * squared_norms.sum()


class L2InitPenalty:
    """(λ/2)·Σ‖θ − θ0‖² over the same parameters as L2 (§3); the squared form, never λ·‖θ − θ0‖.

    θ0 is a frozen copy of the parameters taken at construction, on their device.
    """

    def __init__(self, model: nn.Module, coef: float):
        _check_coef("l2-init", coef)
        self.coef = float(coef)
        self.params = regularized_parameters(model)
        self.initial = [p.detach().clone() for p in self.params]

    def __call__(self) -> torch.Tensor:
        differences = torch._foreach_sub(self.params, self.initial)
        # torch's norm backward is 0 at a zero tensor, so the gradient at θ = θ0 (where training starts) is 0.
        return 0.5 * self.coef * torch.stack(torch._foreach_norm(differences)).square().sum()

    def state_dict(self) -> dict:
        return {"initial": [t.clone() for t in self.initial]}

    def load_state_dict(self, state: dict) -> None:
        initial = state["initial"]
        if len(initial) != len(self.initial) or any(a.shape != b.shape for a, b in zip(initial, self.initial)):
            raise ValueError("L2-Init state does not match this model's layers (a checkpoint of another network?)")
        for target, saved in zip(self.initial, initial):
            target.copy_(saved)
