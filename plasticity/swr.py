"""Soft Weight Rescaling (Oh et al. 2025; spec methods.md §4).

After every optimiser step each layer l, input to output, is pulled toward its
initial norm:

    c_l = (λ·‖W_l^0‖ + (1 − λ)·‖W_l‖) / ‖W_l‖,   W_l ← c_l·W_l,   b_l ← C_l·b_l

with C_l the running product of the c's since the last normalisation layer
(a LayerNorm's γ is a weight, its β a bias, and the product restarts at it).
By Theorem 1 a ReLU network without normalisation then computes exactly
Π_l c_l times its old output; with LayerNorm, Π_{l≥k} c_l for the final
normalisation layer k.  That factor is returned by ``step()`` (RL note of §4:
SWR rescales the online Q-values every step, the target network is not
rescaled, so log it beside the Q-values).

Cost (§4.4): one fused norm over all weights, a few tiny kernels for the
factors, and one in-place multiply per tensor; no host-device synchronisation.
"""

from __future__ import annotations

import torch
from torch import nn

from plasticity.networks import layer_map


def _check_coef(name: str, coef: float) -> None:
    if not 0.0 <= coef <= 1.0:
        raise ValueError(f"--{name} must lie in [0, 1] (λ of soft weight rescaling, 0 = off); got {coef}")


class SoftWeightRescaling:
    """SWR with coefficient ``coef`` on the torso and ``head_coef`` (default: ``coef``) on the output layer."""

    def __init__(self, model: nn.Module, coef: float, head_coef: float | None = None):
        _check_coef("swr", coef)
        head_coef = coef if head_coef is None else head_coef
        _check_coef("swr-head", head_coef)
        layers = layer_map(model)
        weights: list[torch.Tensor] = []
        coefs: list[float] = []
        biases: list[torch.Tensor] = []
        bias_layer: list[int] = []  # index into `weights` of the layer each bias belongs to
        segment_start: list[int] = []  # per weight: index of the first layer of its segment (restart point)
        start = 0
        for _, module in layers.ordered:
            if isinstance(module, nn.LayerNorm):
                start = len(weights)  # the running product restarts here (at c_k, or at 1 without affine γ)
                if module.weight is None:
                    continue
            weights.append(module.weight)
            coefs.append(head_coef if module is layers.output else coef)
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
