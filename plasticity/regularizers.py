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
from plasticity.population import MEMBER_WEIGHT_LAYERS, members_of, weight_param


def regularized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of every Linear/Conv2d of ``model`` (member layers too), in registration order.

    No norm layers.  A member layer's weight is its ``weight_param`` (its ``weight``).
    """
    params = [p for module in model.modules() if isinstance(module, WEIGHT_LAYERS)
              for p in (weight_param(module), module.bias) if p is not None]
    if not params:
        raise ValueError("the model has no Linear/Conv2d layer to regularise")
    return params


def _member_layout(model: nn.Module) -> tuple[int, list[tuple[int, ...] | None]]:
    """M, and per regularised parameter the dims to sum for one value per member (None: sum all, M = 1)."""
    members = members_of(model)
    dims: list[tuple[int, ...] | None] = []
    for module in model.modules():
        if not isinstance(module, WEIGHT_LAYERS):
            continue
        member = isinstance(module, MEMBER_WEIGHT_LAYERS)
        if not member and members > 1:
            raise ValueError(f"a population of {members} members has an ordinary {type(module).__name__}: its "
                             "parameters would be shared by the members; use the member layers of "
                             "plasticity.population")
        for p in (weight_param(module), module.bias):
            if p is not None:
                dims.append(tuple(range(1, p.dim())) if member else None)
    return members, dims


def _squared_norms(tensors: list[torch.Tensor], dims: list[tuple[int, ...] | None]) -> torch.Tensor:
    """Σ over the tensors of each member's ‖t_m‖²: ``[M]``, with gradient 2·t.

    A norm per tensor then squared: one read of each tensor forward and one fused op
    backward (a sum of squares would write a full-size square; ~2x slower at 16 members).
    torch's norm backward is 0 at a zero tensor, so the gradient at t = 0 is exactly 0.
    """
    norms = [torch.linalg.vector_norm(t, dim=d) if d is not None else torch.linalg.vector_norm(t).reshape(1)
             for t, d in zip(tensors, dims)]
    return torch.stack(norms).square().sum(0)


class L2Penalty:
    """(λ/2)·Σ‖W‖² over the weights and biases of the linear/conv layers (§2), per member of a population.

    ``per_member()`` is ``[M]`` (one penalty per member, reduced over every dim but the
    member dim); calling the penalty returns their sum, a 0-dim tensor: the members share
    no parameters, so the sum gives each member exactly its own gradient λ·W.
    """

    def __init__(self, model: nn.Module, coef: float):
        NON_NEGATIVE.check("l2", coef)
        self.coef = float(coef)
        self.params = regularized_parameters(model)
        self.members, self._dims = _member_layout(model)

    def per_member(self) -> torch.Tensor:
        return 0.5 * self.coef * _squared_norms(self.params, self._dims)

    def __call__(self) -> torch.Tensor:
        return self.per_member().sum()


class L2InitPenalty:
    """(λ/2)·Σ‖θ − θ0‖² over the same parameters as L2 (§3); the squared form, never λ·‖θ − θ0‖.

    θ0 is a frozen copy of the parameters taken at construction, on their device (each
    member its own θ0).  ``per_member()`` is ``[M]``; calling the penalty returns their sum.
    """

    def __init__(self, model: nn.Module, coef: float):
        NON_NEGATIVE.check("l2-init", coef)
        self.coef = float(coef)
        self.params = regularized_parameters(model)
        self.members, self._dims = _member_layout(model)
        self.initial = [p.detach().clone() for p in self.params]

    def per_member(self) -> torch.Tensor:
        differences = torch._foreach_sub(self.params, self.initial)
        # The squared sum's gradient 2(θ − θ0) is exactly 0 at θ = θ0 (where training starts).
        return 0.5 * self.coef * _squared_norms(differences, self._dims)

    def __call__(self) -> torch.Tensor:
        return self.per_member().sum()

    def state_dict(self) -> dict:
        return {"initial": [t.clone() for t in self.initial]}

    def load_state_dict(self, state: dict) -> None:
        initial = state["initial"]
        if len(initial) != len(self.initial) or any(a.shape != b.shape for a, b in zip(initial, self.initial)):
            raise ValueError("L2-Init state does not match this model's layers (a checkpoint of another network?)")
        for target, saved in zip(self.initial, initial):
            target.copy_(saved)


class PenaltyTerm(Intervention):
    """A penalty as an intervention: added to the loss, its last value logged under ``plasticity/<name>_penalty``.

    ``penalty()`` is the 0-dim sum over members (each member gets its own gradient);
    ``scalars()`` holds each member's last penalty, ``[M]``.
    """

    def __init__(self, name: str, penalty: L2Penalty | L2InitPenalty):
        self.name, self.term = name, penalty
        self.tag = f"plasticity/{name}_penalty"
        self._last = torch.zeros(penalty.members, device=penalty.params[0].device)

    def penalty(self, td_loss=None, sample_obs=None) -> torch.Tensor:
        values = self.term.per_member()
        self._last = values.detach()
        return values.sum()

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
