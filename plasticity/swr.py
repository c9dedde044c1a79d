"""Soft Weight Rescaling (Oh et al. 2025; spec methods.md §4, amended by methods-v2.md §13).

After every optimiser step each layer l, input to output, is pulled toward its
initial norm:

    c_l = (λ_l·‖W_l^0‖ + (1 − λ_l)·‖W_l‖) / ‖W_l‖,   W_l ← c_l·W_l,   b_l ← C_l·b_l

with C_l the running product of the c's since the last normalisation layer
(a LayerNorm's γ is a weight, its β a bias, and the product restarts at it).
By Theorem 1 a ReLU network without normalisation then computes exactly
Π_l c_l times its old output; with LayerNorm, Π_{l≥k} c_l for the final
normalisation layer k.  That factor is returned by ``step()`` (RL note of §4:
SWR rescales the online Q-values every step, the target network is not
rescaled, so log it beside the Q-values).

Coefficients (§13): λ_l is the torso's λ (``coef``, ``--swr``) except on the
layers that set the output scale -- the final LayerNorm's (γ, β), when the
LayerNorm closest to the output has affine weights, and the output layer --
which use λ_h (``head_coef``, ``--swr-head``; default λ).  With LayerNorm and
λ_h = 0, c_k = c_L = 1 and the running product restarts at the LN, so the head
bias is scaled by 1 and the output is invariant (up to LN's ε): the LN absorbs
the torso's rescaling and SWR only bounds the pre-LN norms.  Without LayerNorm
the paper's rule applies with any λ_h: the output scales by Π_l c_l, c_L from λ_h.

Categorical heads (C51, HL-Gauss, two-hot; Q = Σ_i softmax(z)_i·c_i): scaling
the logits z by C is a change of softmax temperature, not a scaling of Q.  For
C < 1 (the usual case once norms exceed their initial values) every action's
distribution flattens, Q is pulled toward the centre of the support, and the
greedy action can flip (§13.3: atoms (−10, 0, 10), logits A = (0, −100, 1),
B = (−100, 0, −0.5): E_A = 4.62 > E_B = 3.78 at C = 1, but 0.50 < 4.87 at
C = 0.1).  Hence ``SWRFlags`` (the agents' flags) defaults λ_h = 0 for
categorical losses with ``--layer-norm`` (logits invariant), and requires an
explicit ``--swr-head`` for categorical losses without it (then the logits
scale by Π_l c_l, logged as ``plasticity/swr_logit_scale``).  Regression heads
keep λ_h = λ.  ``SoftWeightRescaling`` itself knows no loss: called directly it
defaults λ_h = λ, so give ``head_coef`` for a categorical head (0 with LayerNorm
keeps the logits).

Populations (populations.md §5): norms per member (each reduces over every dim but
the member dim), θ0 norms per member, one output scale per member; no loop over
members.

Cost (§4.4): one norm per weight tensor (all members at once), a few tiny kernels
for the factors, and one fused in-place multiply for all tensors (``_foreach_mul_``);
no host-device synchronisation.  One fused ``_foreach_norm`` cannot reduce per
member; measured on CPU it is no faster than a norm per tensor anyway (MLP
784-256-256-10: 38 vs 41 µs at M = 1, 600 vs 500 µs at M = 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from plasticity.flags import UNIT_INTERVAL, ranged
from plasticity.intervention import EveryUpdate, MethodFlags, Parts, Setting
from plasticity.networks import layer_map
from plasticity.population import (
    NORM_LAYERS,
    is_member_module,
    members_of,
    weight_param,
)

SWR_COEF = UNIT_INTERVAL  # λ of --swr and --swr-head



class SoftWeightRescaling:
    """SWR with ``coef`` (λ) on the torso and ``head_coef`` (λ_h, default λ) on the layers that set the output scale.

    Those are the output layer and, when the model has LayerNorm, every layer
    from the final one on: in the networks of ``plasticity.networks`` that is the
    final LayerNorm's γ and β and the output layer (methods-v2.md §13).

    A population (member layers, M members) is rescaled per member: every norm reduces
    over all dims but the member dim, ``init_norms`` is ``[L, M]`` (‖W_l^0‖ of each member)
    and ``step()`` returns the output scale of each member, ``[M]``.  An ordinary model is
    the population of one (``[L, 1]``, ``[1]``).
    """

    def __init__(self, model: nn.Module, coef: float, head_coef: float | None = None):
        SWR_COEF.check("swr", coef)
        head_coef = coef if head_coef is None else head_coef
        SWR_COEF.check("swr-head", head_coef)
        layers = layer_map(model)
        members = members_of(model)
        ordered = [module for _, module in layers.ordered]
        output_at = ordered.index(layers.output)
        norms_at = [i for i, module in enumerate(ordered[:output_at]) if isinstance(module, NORM_LAYERS)]
        # The layers that set the output scale take λ_h: from the final LN on (its γ, β and the output layer
        # in every network of plasticity.networks; a non-affine LN has no γ), or the output layer alone.
        head_from = norms_at[-1] if norms_at else output_at
        weights: list[torch.Tensor] = []
        coefs: list[float] = []
        biases: list[torch.Tensor] = []
        bias_layer: list[int] = []  # index into `weights` of the layer each bias belongs to
        segment_start: list[int] = []  # per weight: index of the first layer of its segment (restart point)
        member_first: list[bool] = []  # per tensor (weights, then biases): has a leading member dim
        bias_member: list[bool] = []
        start = 0
        for position, module in enumerate(ordered):
            member = is_member_module(module)
            if not member and members > 1:
                raise ValueError(f"a population of {members} members has an ordinary {type(module).__name__}: its "
                                 "parameters would be shared by the members; use the member layers of "
                                 "plasticity.population")
            if isinstance(module, NORM_LAYERS):
                start = len(weights)  # the running product restarts here (at c_k, or at 1 without affine γ)
                if module.weight is None:
                    continue
            weights.append(module.weight if isinstance(module, NORM_LAYERS) else weight_param(module))
            member_first.append(member)
            coefs.append(head_coef if position >= head_from else coef)
            segment_start.append(start)
            if module.bias is not None:
                biases.append(module.bias)
                bias_member.append(member)
                bias_layer.append(len(weights) - 1)
        device = weights[0].device
        dtype = weights[0].dtype
        for weight in weights[1:]:
            dtype = torch.promote_types(dtype, weight.dtype)  # float64 models keep float64 factors
        self.members = members
        self.coef, self.head_coef = float(coef), float(head_coef)
        self.weights, self.biases = weights, biases
        # Per weight: the dims to reduce for one norm per member (an ordinary tensor: all of them).
        self._norm_dims = [tuple(range(1 if m else 0, w.dim())) for w, m in zip(weights, member_first)]
        self.coefs = torch.tensor(coefs, device=device, dtype=dtype)
        self.init_norms = torch.empty(len(weights), members, device=device, dtype=dtype)
        with torch.no_grad():
            self.init_norms.copy_(self._norms())  # ‖W_l^0‖ per member, recorded once
        # running = [1, c_1, c_1c_2, ...] per member: C_l = running[l + 1] / running[start_l]; row 0 ends, row 1 starts.
        self._bias_bounds = torch.tensor([[i + 1 for i in bias_layer], [segment_start[i] for i in bias_layer]],
                                         device=device, dtype=torch.long)
        self._output_bounds = (len(weights), segment_start[-1])
        self._one = torch.ones(1, members, device=device, dtype=dtype)
        self._keep = (1.0 - self.coefs).unsqueeze(1)
        self._refresh_pull()
        # The factors of one step, [weights + biases, M], written in place; each tensor multiplies by a fixed
        # broadcasting view of its row ([M, 1, ...] for a member tensor), so step() builds no views.
        self._factors = torch.ones(len(weights) + len(biases), members, device=device, dtype=dtype)
        self._tensors = tensors = weights + biases
        flags = member_first + bias_member
        self._factor_views = [row.view(members, *([1] * (t.dim() - 1))) if member else row.view(*([1] * t.dim()))
                              for row, t, member in zip(self._factors.unbind(), tensors, flags)]
        self.last_scale = torch.ones(members, device=device, dtype=dtype)

    def _norms(self) -> torch.Tensor:
        """‖W_l‖ of every layer and member, ``[L, M]``: one norm per tensor, reduced over all dims but the member dim."""
        return torch.stack([torch.linalg.vector_norm(w, dim=d).reshape(self.members)
                            for w, d in zip(self.weights, self._norm_dims)])

    def _refresh_pull(self) -> None:
        self._pull = self.coefs.unsqueeze(1) * self.init_norms  # λ·‖W^0‖ per member

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Rescale all layers in place; returns each member's output scale Π_{l≥k} c_l, ``[M]`` on the device."""
        norms = self._norms()
        scale = torch.addcdiv(self._keep, self._pull, norms)  # (λ‖W^0‖ + (1−λ)‖W‖)/‖W‖ in one kernel
        # An all-zero tensor stays zero (leave its biases alone); a diverged member's NaN norm stays NaN.
        scale = torch.where(norms == 0, 1.0, scale)
        running = torch.cat([self._one, torch.cumprod(scale, 0)])  # [L + 1, M]
        bounds = running[self._bias_bounds]  # [2, biases, M]
        torch.cat([scale, bounds[0] / bounds[1]], out=self._factors)
        # One call for all tensors: weights by c_l, biases by C_l, each member by its own factors.
        torch._foreach_mul_(self._tensors, self._factor_views)
        end, start = self._output_bounds
        self.last_scale = running[end] / running[start]
        return self.last_scale

    def state_dict(self) -> dict:
        return {"init_norms": self.init_norms.clone()}

    def load_state_dict(self, state: dict) -> None:
        init_norms = state["init_norms"]
        if init_norms.dim() == 1 and self.members == 1:
            init_norms = init_norms.unsqueeze(1)  # a single run's checkpoint from before populations: [L]
        if init_norms.shape != self.init_norms.shape:
            raise ValueError(f"SWR state has layer norms of shape {tuple(init_norms.shape)} ([layers, members]), "
                             f"this model {tuple(self.init_norms.shape)} (a checkpoint of another network?)")
        self.init_norms.copy_(init_norms)
        self._refresh_pull()


# ---- SWR as an intervention, and its flags ----


@dataclass
class SWRFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"swr": "swr", "swr_head": "swrhead"}

    swr: float = ranged(0.0, SWR_COEF)
    """Soft Weight Rescaling coefficient lambda in (0, 1], applied after every update; 0 disables"""
    swr_head: float | None = ranged(None, SWR_COEF, optional=True)
    """SWR coefficient of the output-scale layers (final LayerNorm and head); default: --swr for regression heads, 0 (not rescaled) for categorical ones"""

    def check(self, setting: Setting) -> None:
        if self.swr_head is not None and self.swr == 0:
            raise ValueError("--swr-head needs --swr > 0")
        if self.swr > 0 and setting.categorical and not setting.layer_norm and self.swr_head is None:
            raise ValueError("--swr on a categorical head without --layer-norm rescales the logits, which changes "
                             "the softmax temperature (and can change greedy actions): add --layer-norm, or give "
                             "--swr-head explicitly (e.g. --swr-head 0 keeps the head's weights unscaled)")

    def build(self, parts: Parts) -> EveryUpdate | None:
        if self.swr == 0:
            return None
        categorical = parts.setting.categorical
        head_coef = self.swr_head if self.swr_head is not None else (0.0 if categorical else self.swr)
        tag = "plasticity/swr_logit_scale" if categorical else "plasticity/swr_scale"
        swr = SoftWeightRescaling(parts.model, self.swr, head_coef)
        # The factor the outputs were just multiplied by (per member, [M]): Q-values, or logits (a temperature)
        # when categorical.
        return EveryUpdate("swr", swr, lambda: {tag: swr.last_scale})
