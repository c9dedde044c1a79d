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

Cost (§4.4): one fused norm over all weights, a few tiny kernels for the
factors, and one in-place multiply per tensor; no host-device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from plasticity.flags import UNIT_INTERVAL, ranged
from plasticity.intervention import EveryUpdate, MethodFlags, Parts, Setting
from plasticity.networks import layer_map

SWR_COEF = UNIT_INTERVAL  # λ of --swr and --swr-head


class SoftWeightRescaling:
    """SWR with ``coef`` (λ) on the torso and ``head_coef`` (λ_h, default λ) on the layers that set the output scale.

    Those are the output layer and, when the model has LayerNorm, every layer
    from the final one on: in the networks of ``plasticity.networks`` that is the
    final LayerNorm's γ and β and the output layer (methods-v2.md §13).
    """

    def __init__(self, model: nn.Module, coef: float, head_coef: float | None = None):
        SWR_COEF.check("swr", coef)
        head_coef = coef if head_coef is None else head_coef
        SWR_COEF.check("swr-head", head_coef)
        layers = layer_map(model)
        ordered = [module for _, module in layers.ordered]
        output_at = ordered.index(layers.output)
        norms_at = [i for i, module in enumerate(ordered[:output_at]) if isinstance(module, nn.LayerNorm)]
        # The layers that set the output scale take λ_h: from the final LN on (its γ, β and the output layer
        # in every network of plasticity.networks; a non-affine LN has no γ), or the output layer alone.
        head_from = norms_at[-1] if norms_at else output_at
        weights: list[torch.Tensor] = []
        coefs: list[float] = []
        biases: list[torch.Tensor] = []
        bias_layer: list[int] = []  # index into `weights` of the layer each bias belongs to
        segment_start: list[int] = []  # per weight: index of the first layer of its segment (restart point)
        start = 0
        for position, module in enumerate(ordered):
            if isinstance(module, nn.LayerNorm):
                start = len(weights)  # the running product restarts here (at c_k, or at 1 without affine γ)
                if module.weight is None:
                    continue
            weights.append(module.weight)
            coefs.append(head_coef if position >= head_from else coef)
            segment_start.append(start)
            if module.bias is not None:
                biases.append(module.bias)
                bias_layer.append(len(weights) - 1)
        device = weights[0].device
        self.coef, self.head_coef = float(coef), float(head_coef)
        self.weights, self.biases = weights, biases
        self.coefs = torch.tensor(coefs, device=device)
        self.init_norms = torch.empty(len(weights), device=device)
        with torch.no_grad():
            self.init_norms.copy_(torch.stack(torch._foreach_norm(weights)))  # ‖W_l^0‖, recorded once
        # running = [1, c_1, c_1c_2, ...]: C_l = running[l + 1] / running[start_l]; row 0 ends, row 1 starts.
        self._bias_bounds = torch.tensor([[i + 1 for i in bias_layer], [segment_start[i] for i in bias_layer]],
                                         device=device, dtype=torch.long)
        self._output_bounds = (len(weights), segment_start[-1])
        self._one = torch.ones(1, device=device)
        self._keep = 1.0 - self.coefs
        self._pull = self.coefs * self.init_norms  # λ·‖W^0‖, refreshed by load_state_dict
        self.last_scale = torch.ones((), device=device)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Rescale all layers in place; returns the output scale Π_{l≥k} c_l as a 0-dim device tensor."""
        norms = torch.stack(torch._foreach_norm(self.weights))
        scale = torch.addcdiv(self._keep, self._pull, norms)  # (λ‖W^0‖ + (1−λ)‖W‖)/‖W‖ in one kernel
        scale = torch.where(norms > 0, scale, 1.0)  # an all-zero tensor stays zero; leave its biases alone
        running = torch.cat([self._one, torch.cumprod(scale, 0)])
        bounds = running[self._bias_bounds]
        bias_scale = bounds[0] / bounds[1]
        # One call for all tensors: weights by c_l, biases by C_l.
        torch._foreach_mul_(self.weights + self.biases, [*scale.unbind(), *bias_scale.unbind()])
        end, start = self._output_bounds
        self.last_scale = running[end] / running[start]
        return self.last_scale

    def state_dict(self) -> dict:
        return {"init_norms": self.init_norms.clone()}

    def load_state_dict(self, state: dict) -> None:
        init_norms = state["init_norms"]
        if init_norms.shape != self.init_norms.shape:
            raise ValueError(f"SWR state has {init_norms.shape[0]} layer norms, this model {self.init_norms.shape[0]}"
                             " (a checkpoint of another network?)")
        self.init_norms.copy_(init_norms)
        self._pull = self.coefs * self.init_norms


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
        # The factor the outputs were just multiplied by: Q-values, or logits (a temperature) when categorical.
        return EveryUpdate("swr", swr, lambda: {tag: swr.last_scale})
