"""L2 and L2-Init penalties as explicit loss terms (spec methods.md §2, §3).

Both cover the weights and biases of every Linear/Conv2d layer and exclude
normalisation layers (LayerNorm γ/β).  Each is a callable returning a 0-dim
tensor that the agent adds to its loss, so the gradient is exactly λ·W (L2)
or λ·(θ − θ0) (L2-Init) on top of the loss gradient, before Adam's scaling --
the "explicit loss term" reading of §2, not decoupled AdamW decay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from plasticity.flags import NON_NEGATIVE, ranged
from plasticity.intervention import Intervention, MethodFlags, Parts
from plasticity.networks import WEIGHT_LAYERS


def regularized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of every Linear/Conv2d of ``model``, in registration order (no norm layers)."""
    params = [p for module in model.modules() if isinstance(module, WEIGHT_LAYERS)
              for p in (module.weight, module.bias) if p is not None]
    if not params:
        raise ValueError("the model has no Linear/Conv2d layer to regularise")
    return params


class L2Penalty:
    """(λ/2)·Σ‖W‖² over the weights and biases of the linear/conv layers (§2)."""

    def __init__(self, model: nn.Module, coef: float):
        NON_NEGATIVE.check("l2", coef)
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
        NON_NEGATIVE.check("l2-init", coef)
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


class PenaltyTerm(Intervention):
    """A penalty as an intervention: added to the loss, its last value logged under ``plasticity/<name>_penalty``."""

    def __init__(self, name: str, penalty: L2Penalty | L2InitPenalty):
        self.name, self.term = name, penalty
        self.tag = f"plasticity/{name}_penalty"
        self._last = torch.zeros((), device=penalty.params[0].device)

    def penalty(self) -> torch.Tensor:
        value = self.term()
        self._last = value.detach()
        return value

    def scalars(self) -> dict[str, torch.Tensor]:
        return {self.tag: self._last}

    def state_dict(self) -> dict:
        return self.term.state_dict() if isinstance(self.term, L2InitPenalty) else {}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.term, L2InitPenalty):
            self.term.load_state_dict(state)


@dataclass
class L2Flags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"l2": "l2"}

    l2: float = ranged(0.0, NON_NEGATIVE)
    """L2 penalty (lambda/2)*sum ||W||^2 added to the loss (norm layers excluded); 0 disables"""

    def build(self, parts: Parts) -> PenaltyTerm | None:
        return PenaltyTerm("l2", L2Penalty(parts.model, self.l2)) if self.l2 > 0 else None


@dataclass
class L2InitFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"l2_init": "l2init"}

    l2_init: float = ranged(0.0, NON_NEGATIVE)
    """L2-Init penalty (lambda/2)*sum ||theta - theta0||^2 added to the loss; 0 disables"""

    def build(self, parts: Parts) -> PenaltyTerm | None:
        return PenaltyTerm("l2_init", L2InitPenalty(parts.model, self.l2_init)) if self.l2_init > 0 else None
