"""Parseval regularisation (Chung et al. 2024; spec methods-v2.md §7).

The penalty keeps every hidden layer's rows (scaled) orthonormal:

    loss += λ · Σ_l (w_ref / n_l)² · ‖M_G ⊙ (W̃_l W̃_lᵀ) − s·I‖²_F

over the hidden Linear/Conv2d layers l of ``layer_map`` (the output layer, biases, LayerNorm
and the diagonal layers below are excluded).  W̃_l is the weight as ``(n_out, fan_in)`` (conv
kernels flattened), n_l = n_out, M_G the block-diagonal mask of G equal blocks: with G > 1
only the G diagonal ``(n/G) x (n/G)`` Gram blocks are computed (G times cheaper), the
off-block entries being masked anyway.  Its gradient (G = 1) is 4λ(w_ref/n)²(WWᵀ − sI)W.

Generalisations of the official code (wechu/parseval_reg), marked [U] in the spec:
- the width factor uses each layer's own n_out (the official code one common width);
- when n_out/G > fan_in the Gram block has rank <= fan_in and the penalty cannot reach 0:
  its floor is s²·(n_out − G·fan_in) per layer (before the factors), warned once at
  construction;
- groups G > 1 (block-diagonal mask) and conv layers (flattened kernels).

Initialisation (``parseval_init_``): hidden layers orthogonal with gain √s (√2 for the default
s = 2, the official ``scale = 2  # sqrt(2)**2``), bias 0; the output layer orthogonal with gain
1 (a value head), bias 0.  Member k draws from its own stream, and the layers are marked
(``networks.ORTHOGONAL_GAIN``) so that ``networks.fresh_weights``/``reinit_`` -- CBP, ReDo,
S&P, layer resets -- redraw them orthogonally with the same gain (a whole layer: a fresh
orthogonal matrix, bias 0; single units: rows of a fresh orthogonal draw, see ``fresh_weights``).

Diagonal layers (``--parseval-diag``, the official ``DiagLinear``): ``DiagLayer`` y = x·c + d
after each hidden Linear/Conv2d (c = 1, d = 0: the identity at init); per unit of a linear
layer, per channel of a conv layer [U: the official layer is linear only].  The learnable
input scale (``--input-scale-learnable``, the official ``ScaleLayer``): ``InputScale``, one
scalar per member at the torso's input (after pixel scaling), 1 at init.  Both are invisible
to ``layer_map`` (it lists Linear/Conv/LN/activations only), so the other methods' hidden
blocks are unchanged; ``add_parseval_layers_`` puts them into a torso in place, keeping every
existing module's name (a diag layer takes the Identity norm slot of its block).

Populations (populations.md §5): the penalty is ``[M]`` per member (batched Gram matrices);
``penalty()`` returns the sum, so each member gets its own gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from plasticity.flags import NON_NEGATIVE, POSITIVE, POSITIVE_COUNT, ranged
from plasticity.intervention import MethodFlags, Parts, Setting
from plasticity.networks import ORTHOGONAL_GAIN, Torso, layer_map, orthogonal_draw, orthogonal_gain
from plasticity.population import (
    CONV_LAYERS,
    NORM_LAYERS,
    WEIGHT_LAYERS,
    bias_view,
    fan_in,
    members_of,
    out_units,
    weight_param,
    weight_view,
)
from plasticity.regularizers import PenaltyTerm
from plasticity.streams import MemberRandom

PARSEVAL_COEF = NON_NEGATIVE
PARSEVAL_SCALE = POSITIVE
PARSEVAL_WIDTH_REF = POSITIVE_COUNT
PARSEVAL_GROUPS = POSITIVE_COUNT

Random = MemberRandom | Sequence[torch.Generator] | torch.Generator | None


class _GramDeviation(torch.autograd.Function):
    """``rows [B, k, fan]`` -> ``[B]``: ‖rows rowsᵀ − sI‖²_F per batch entry, with the closed-form backward
    4·(rows rowsᵀ − sI)·rows (D is symmetric): one matmul backward instead of autograd's two
    (measured ~1.4x faster forward + backward on the 512 x 3136 layer, CPU)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, neg_eye: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] == 1:  # the 2-D kernels: faster than a one-entry batched matmul on CPU
            deviation = torch.addmm(neg_eye, rows[0], rows[0].T).unsqueeze(0)
        else:
            deviation = torch.baddbmm(neg_eye, rows, rows.mT)
        ctx.save_for_backward(rows, deviation)
        return deviation.square().sum((1, 2))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        rows, deviation = ctx.saved_tensors
        scaled = deviation * (4.0 * grad).view(-1, 1, 1)
        if rows.shape[0] == 1:
            return torch.mm(scaled[0], rows[0]).unsqueeze(0), None
        return torch.bmm(scaled, rows), None


class ParsevalPenalty:
    """λ·Σ_l (w_ref/n_l)²·‖M_G ⊙ (W̃W̃ᵀ) − s·I‖²_F over the hidden layers of ``model``, per member.

    ``per_member()`` is ``[M]``; calling the penalty returns their sum (0-dim).  ``floor`` is the
    smallest value the penalty can take per member (0 unless some n_out/G > fan_in).
    """

    def __init__(self, model: nn.Module, coef: float, scale: float = 2.0, width_ref: int = 64, groups: int = 1):
        PARSEVAL_COEF.check("parseval", coef)
        PARSEVAL_SCALE.check("parseval-scale", scale)
        PARSEVAL_WIDTH_REF.check("parseval-width-ref", width_ref)
        PARSEVAL_GROUPS.check("parseval-groups", groups)
        self.coef, self.scale, self.width_ref, self.groups = float(coef), float(scale), int(width_ref), int(groups)
        hidden = layer_map(model).hidden
        if not hidden:
            raise ValueError("--parseval: the model has no hidden Linear/Conv2d layer to regularise")
        self.layers = [h.layer for h in hidden]
        self.names = [h.name for h in hidden]
        self.params = [weight_param(layer) for layer in self.layers]
        self.members = members_of(model)
        self.factors: list[float] = []
        self.floor = 0.0
        short = []
        for name, layer in zip(self.names, self.layers):
            n, fan = out_units(layer), fan_in(layer)
            if n % self.groups:
                raise ValueError(f"--parseval-groups {self.groups} must divide every hidden layer's width; layer "
                                 f"{name} has {n} output units")
            factor = self.coef * (self.width_ref / n) ** 2
            self.factors.append(factor)
            block = n // self.groups
            if block > fan:
                self.floor += factor * self.scale ** 2 * self.groups * (block - fan)
                short.append(f"{name} ({block} rows per block > fan_in {fan})")
        if short:
            warnings.warn(f"--parseval: W W^T has rank <= fan_in in {', '.join(short)}, so the penalty cannot reach "
                          f"0: its minimum is {self.floor:.4g} per member (s^2 (n_out - G fan_in) per layer, "
                          "times its factors)", stacklevel=2)
        self._neg_eyes: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def _neg_eye(self, size: int, like: torch.Tensor) -> torch.Tensor:
        key = (size, like.device, like.dtype)
        eye = self._neg_eyes.get(key)
        if eye is None:
            eye = self._neg_eyes[key] = torch.eye(size, device=like.device, dtype=like.dtype).mul_(-self.scale)
        return eye

    def layer_values(self) -> list[torch.Tensor]:
        """Each hidden layer's term ``[M]`` (factors included), in ``names`` order."""
        values = []
        for layer, factor in zip(self.layers, self.factors):
            view = weight_view(layer)
            members, n = view.shape[:2]
            block = n // self.groups
            with torch.autocast(view.device.type, enabled=False):  # near the minimum bf16 would drown the deviation
                rows = view.reshape(members * self.groups, block, -1)  # a copy only for channels-last conv kernels
                blocks = _GramDeviation.apply(rows, self._neg_eye(block, rows))  # ‖W Wᵀ − sI‖² per block
                values.append(blocks.view(members, self.groups).sum(1) * factor)
        return values

    def per_member(self) -> torch.Tensor:
        return torch.stack(self.layer_values()).sum(0)

    def __call__(self) -> torch.Tensor:
        return self.per_member().sum()


# --- initialisation ---------------------------------------------------------------------------------------------


@torch.no_grad()
def orthogonal_init_(layer: nn.Module, gain: float, random: Random = None) -> None:
    """``layer``'s weight <- an orthogonal draw times ``gain`` (member k from its stream), bias 0, and mark it.

    ``random``: a ``MemberRandom``, one ``torch.Generator`` per member (``networks.init_generators``),
    or one generator / None (the global one).  Marked (``networks.ORTHOGONAL_GAIN``): later
    ``fresh_weights``/``reinit_`` redraw it orthogonally with this gain.
    """
    view = weight_view(layer)
    members, n = view.shape[:2]
    drawn = orthogonal_draw(members, n, fan_in(layer), float(gain), random, view.dtype)
    view.copy_(drawn.reshape(view.shape).to(view.device))  # copy_ keeps a channels-last kernel's layout
    bias = bias_view(layer)
    if bias is not None:
        bias.zero_()
    setattr(layer, ORTHOGONAL_GAIN, float(gain))


@torch.no_grad()
def parseval_init_(model: nn.Module, random: Random = None, scale: float = 2.0, output_gain: float = 1.0) -> None:
    """The official Parseval init (§7), in place: hidden layers orthogonal, gain √s, bias 0; output ``output_gain``.

    ``output_gain``: 1 for a value head (every agent here), 0.01 for a policy head.  Hidden and
    output layers as ``layer_map`` finds them, input to output, each layer drawing all members
    at once (member k from ``random``'s stream k / ``random[k]``: the single run's draws).  Call
    it right after building the network, before the target copy, the optimiser state and the
    interventions (which snapshot θ0 or initial norms).
    """
    PARSEVAL_SCALE.check("parseval-scale", scale)
    layers = layer_map(model)
    for hidden in layers.hidden:
        orthogonal_init_(hidden.layer, math.sqrt(scale), random)
    orthogonal_init_(layers.output, output_gain, random)


# --- diagonal layers and the input scale ------------------------------------------------------------------------


class DiagLayer(nn.Module):
    """M diagonal layers y = x·c + d (the official ``DiagLinear``); c = 1, d = 0 at init (the identity).

    ``scale`` (c) and ``shift`` (d) are ``[M, features]``: per unit of a linear layer, per channel
    of a conv layer (``conv=True``; x ``[.., C, H, W]``) [U].  Takes a one-member torso's
    ``[B, ...]`` or a population's ``[M, B, ...]``.  Not a weight layer: ``layer_map``, the
    penalties and the other methods do not see it.
    """

    member_module = True  # parameters [M, ...]: population.is_member_module, member_parameters

    def __init__(self, members: int, features: int, conv: bool = False, device=None, dtype=None):
        super().__init__()
        self.features, self.conv = int(features), bool(conv)
        self.scale = nn.Parameter(torch.ones(members, features, device=device, dtype=dtype))
        self.shift = nn.Parameter(torch.zeros(members, features, device=device, dtype=dtype))

    @property
    def members(self) -> int:
        return self.scale.shape[0]

    def _view(self, param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        trailing = 3 if self.conv else 1
        shape = (self.members, *([1] * (x.dim() - trailing - 1)), self.features, *([1] * (trailing - 1)))
        return param.view(shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self._view(self.shift, x), x, self._view(self.scale, x))

    def extra_repr(self) -> str:
        return f"members={self.members}, features={self.features}, conv={self.conv}"


class InputScale(nn.Module):
    """A learnable scalar input scale per member (the official ``ScaleLayer``), 1 at init: y = a·x."""

    member_module = True

    def __init__(self, members: int, init: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.full((members,), float(init), device=device, dtype=dtype))

    @property
    def members(self) -> int:
        return self.scale.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(self.members, *([1] * (x.dim() - 1))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"members={self.members}"


def add_parseval_layers_(torso: Torso, diag: bool = False, input_scale: bool = False) -> Torso:
    """Put the Parseval diagonal layers (``diag``) and the input scale (``input_scale``) into ``torso``, in place.

    A ``DiagLayer`` after every Linear/Conv2d of the torso (all of its weight layers are hidden):
    it takes the block's Identity norm slot, so every module keeps its name (``torso.0`` is
    still the first layer); the input scale is ``torso.input_scale``, run first.  Returns
    ``torso``.  Call it before the optimiser is built (new parameters).  A torso with LayerNorm
    cannot take diagonal layers (--parseval-diag + --layer-norm, §7).
    """
    if diag and any(isinstance(m, NORM_LAYERS) for m in torso.modules()):
        raise ValueError("--parseval-diag cannot be combined with --layer-norm: the official code treats them as "
                         "exclusive and LayerNorm already carries gamma/beta (methods-v2.md §7)")
    if any(isinstance(m, (DiagLayer, InputScale)) for m in torso.modules()):
        raise ValueError("add_parseval_layers_: the torso already has Parseval diagonal/scale layers")
    items = list(torso._modules.items())
    rebuilt: list[tuple[str, nn.Module]] = []
    if input_scale:
        first = weight_param(next(m for _, m in items if isinstance(m, WEIGHT_LAYERS)))
        rebuilt.append(("input_scale", InputScale(torso.members, device=first.device, dtype=first.dtype)))
    skip = set()
    for index, (name, module) in enumerate(items):
        if index in skip:
            continue
        rebuilt.append((name, module))
        if diag and isinstance(module, WEIGHT_LAYERS):
            weight = weight_param(module)
            layer = DiagLayer(torso.members, out_units(module), conv=isinstance(module, CONV_LAYERS),
                              device=weight.device, dtype=weight.dtype)
            if index + 1 < len(items) and type(items[index + 1][1]) is nn.Identity:
                rebuilt.append((items[index + 1][0], layer))  # the norm slot's name
                skip.add(index + 1)
            else:
                rebuilt.append((f"{name}_diag", layer))
    torso._modules.clear()
    for name, module in rebuilt:
        torso.add_module(name, module)
    return torso


def diag_layers(model: nn.Module) -> dict[str, DiagLayer]:
    """Weight-layer name -> the ``DiagLayer`` that follows it (e.g. for resetting a recycled unit's c, d)."""
    found: dict[str, DiagLayer] = {}
    last = None
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_LAYERS):
            last = name
        elif isinstance(module, DiagLayer) and last is not None:
            found[last] = module
    return found


# --- flags --------------------------------------------------------------------------------------------------------


@dataclass
class ParsevalFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"parseval": "parseval", "parseval_groups": "pgroups",
                                      "parseval_diag": "pdiag", "input_scale_learnable": "inscale"}

    parseval: float = ranged(0.0, PARSEVAL_COEF)
    """Parseval lambda: loss += lambda*sum_l (w_ref/n_l)^2*||M_G o WW^T - sI||_F^2 (hidden W), orthogonal init; 0 off"""
    parseval_scale: float = ranged(2.0, PARSEVAL_SCALE)
    """Parseval target s of W W^T; hidden layers get orthogonal init with gain sqrt(s) [U: official sqrt 2, s = 2]"""
    parseval_width_ref: int = ranged(64, PARSEVAL_WIDTH_REF)
    """Parseval width factor (w_ref/n_l)^2 with each layer's own n_out [U: official uses one common width]"""
    parseval_groups: int = ranged(1, PARSEVAL_GROUPS)
    """Parseval block-diagonal mask of G equal blocks (must divide every hidden width); 1 = full Gram matrix"""
    parseval_diag: bool = False
    """Parseval diagonal layers y = x*c + d after each hidden layer (per channel for conv [U]); not with --layer-norm"""
    input_scale_learnable: bool = False
    """Parseval learnable scalar input scale (init 1) at the torso's input, after pixel scaling [U: placement]"""

    def check(self, setting: Setting) -> None:
        if self.parseval == 0:
            given = [flag for flag, on in (
                ("--parseval-scale", self.parseval_scale != 2.0),
                ("--parseval-width-ref", self.parseval_width_ref != 64),
                ("--parseval-groups", self.parseval_groups != 1), ("--parseval-diag", self.parseval_diag),
                ("--input-scale-learnable", self.input_scale_learnable)) if on]
            if given:
                raise ValueError(f"{', '.join(given)} need(s) --parseval > 0 (Parseval regularisation is off)")
        if self.parseval_diag and setting.layer_norm:
            raise ValueError("--parseval-diag cannot be combined with --layer-norm: the official code treats them as "
                             "exclusive and LayerNorm already carries gamma/beta (methods-v2.md §7)")

    def build(self, parts: Parts) -> PenaltyTerm | None:
        if self.parseval <= 0:
            return None
        penalty = ParsevalPenalty(parts.model, self.parseval, self.parseval_scale, self.parseval_width_ref,
                                  self.parseval_groups)
        if any(orthogonal_gain(layer) is None for layer in penalty.layers):
            warnings.warn("--parseval: the hidden layers were not given the Parseval init (parseval.parseval_init_ / "
                          "apply_parseval_); the penalty is then not 0 at initialisation", stacklevel=2)
        return PenaltyTerm("parseval", penalty)


def apply_parseval_(model: nn.Module, flags: ParsevalFlags, random: Random = None) -> nn.Module:
    """What --parseval does to a freshly built network, in place (nothing when ``flags.parseval`` is 0).

    Diagonal layers / input scale into every ``Torso`` of ``model`` (``--parseval-diag``,
    ``--input-scale-learnable``), then the orthogonal init (``parseval_init_``, gain √s, value
    head gain 1) from ``random`` (the generators the network was built with).  Call right after
    building ``model``, before the target copy, the optimiser and the interventions.
    """
    if flags.parseval <= 0:
        return model
    if flags.parseval_diag or flags.input_scale_learnable:
        torsos = [m for m in model.modules() if isinstance(m, Torso)]
        if not torsos:
            raise ValueError("--parseval-diag / --input-scale-learnable need a Torso from plasticity.networks")
        for torso in torsos:
            add_parseval_layers_(torso, diag=flags.parseval_diag, input_scale=flags.input_scale_learnable)
    parseval_init_(model, random, scale=flags.parseval_scale)
    return model
