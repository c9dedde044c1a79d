"""Weight clipping (Elsayed, Lan, Lyle & Mahmood 2024, arXiv 2407.01704; spec methods-v2.md §12).

As the last rewrite after every optimiser step, every weight and bias of every Linear/Conv2d
layer is clamped to the range of its layer's uniform initialiser scaled by κ:

    θ ← clamp(θ, −κ·s_l, κ·s_l),   s_l = 1/√fan_in(l)

(PyTorch's default init draws both the weight and the bias of a layer from U(−s_l, s_l)).
LayerNorm parameters are never clipped; the output layer is clipped unless
``last_layer=False`` (``--no-weight-clip-last-layer``).

Biases are found through their module (``layer.bias``), never by parameter order: the
reference ``InitBounds`` (mohmdelsayed/weight-clipping@0d3db49) treats every 1-D tensor as the
bias of the preceding weight, so a LayerNorm γ (initialised at 1) would be clamped to
±κ/√fan_in of the layer before it.

Populations: the bounds depend only on shapes, so they are the same for every member and one
pair of ``_foreach_clamp_min_``/``_foreach_clamp_max_`` calls clips all tensors of all members.
Clipping leaves the optimiser state alone (rule R3); a tensor with ``requires_grad=False`` (a
frozen injection head) is never clipped (R2).  The fraction of entries at the bound is computed
only when ``clipped_fraction()`` is called, at the diagnostics cadence: no per-step host sync
(the reference code calls ``.item()`` at every step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from plasticity.flags import NON_NEGATIVE, POSITIVE, ranged
from plasticity.intervention import EveryUpdate, MethodFlags, Parts, Setting
from plasticity.networks import layer_map
from plasticity.population import WEIGHT_LAYERS, fan_in, is_member_module, members_of, weight_param


class WeightClipping:
    """Clamp the weights and biases of ``model``'s Linear/Conv2d layers to ±κ/√fan_in after each step.

    ``kappa`` > 0; ``last_layer``: also clip the output layer (the model's last Linear/Conv2d,
    as ``plasticity.networks.layer_map`` finds it).  ``bounds`` holds κ·s_l per clipped tensor.
    """

    def __init__(self, model: nn.Module, kappa: float, last_layer: bool = True):
        POSITIVE.check("weight-clip", kappa)
        members = members_of(model)
        output = layer_map(model).output
        tensors: list[torch.Tensor] = []
        bounds: list[float] = []
        member_first: list[bool] = []
        for module in model.modules():
            if not isinstance(module, WEIGHT_LAYERS) or (module is output and not last_layer):
                continue
            member = is_member_module(module)
            if members > 1 and not member:
                raise ValueError(f"a population of {members} members has an ordinary {type(module).__name__}: its "
                                 "parameters would be shared by the members; use the member layers of "
                                 "plasticity.population")
            fan = fan_in(module)
            if fan == 0:
                continue
            for tensor in (weight_param(module), module.bias):
                if tensor is not None:
                    tensors.append(tensor)
                    bounds.append(float(kappa) / math.sqrt(fan))
                    member_first.append(member)
        if not tensors:
            raise ValueError("weight clipping: the model has no Linear/Conv2d layer to clip")
        self.kappa, self.last_layer, self.members = float(kappa), last_layer, members
        self.tensors, self.bounds = tensors, bounds
        self._negative = [-b for b in bounds]
        self._sum_dims = [tuple(range(1 if m else 0, t.dim())) for t, m in zip(tensors, member_first)]
        self._active = (tensors, self._negative, bounds)
        self._frozen: tuple[bool, ...] | None = None

    def _trainable(self) -> tuple[list[torch.Tensor], list[float], list[float]]:
        """The tensors that still require gradients (R2), with their bounds; rebuilt only when that changes."""
        frozen = tuple(not t.requires_grad for t in self.tensors)
        if frozen != self._frozen:
            self._frozen = frozen
            keep = [i for i, f in enumerate(frozen) if not f]
            self._active = ([self.tensors[i] for i in keep], [self._negative[i] for i in keep],
                            [self.bounds[i] for i in keep])
        return self._active

    @torch.no_grad()
    def step(self) -> None:
        """Clip in place: every member at once, no host sync."""
        tensors, low, high = self._trainable()
        if tensors:
            torch._foreach_clamp_min_(tensors, low)
            torch._foreach_clamp_max_(tensors, high)

    @torch.no_grad()
    def clipped_fraction(self) -> torch.Tensor:
        """Fraction of the clipped tensors' entries lying at (or beyond) their bound, per member ``[M]``.

        Right after ``step()`` an entry at the bound is one the clamp caught (the bound is a float of the
        tensor's dtype after the clamp, and the comparison runs in that dtype).
        """
        counts = torch.stack([(t.abs() >= b).sum(dim=d).reshape(self.members)
                              for t, b, d in zip(self.tensors, self.bounds, self._sum_dims)]).sum(0)
        total = sum(t.numel() for t in self.tensors) // self.members
        return counts.to(self.tensors[0].dtype) / total

    def state_dict(self) -> dict:
        return {}  # the bounds are derived from shapes

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class WeightClipFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"weight_clip": "wclip", "weight_clip_last_layer": "wcliplast"}

    weight_clip: float = ranged(0.0, NON_NEGATIVE)
    """weight clipping kappa: after every update clamp each Linear/Conv weight and bias to +-kappa/sqrt(fan_in), kappa times its init bound; 0 disables. No default: the paper's kappa for DQN is unverified [U] (the official PPO run uses 3)"""
    weight_clip_last_layer: bool = True
    """weight clipping also clips the output layer (--no-weight-clip-last-layer leaves it unclipped)"""

    def check(self, setting: Setting) -> None:
        if not self.weight_clip_last_layer and self.weight_clip == 0:
            raise ValueError("--no-weight-clip-last-layer needs --weight-clip kappa > 0")

    def build(self, parts: Parts) -> EveryUpdate | None:
        if self.weight_clip == 0:
            return None
        clip = WeightClipping(parts.model, self.weight_clip, self.weight_clip_last_layer)
        return EveryUpdate("weight_clip", clip, lambda: {"plasticity/weight_clip_frac": clip.clipped_fraction()})
