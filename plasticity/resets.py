"""Resets: Shrink & Perturb (spec methods.md §6), ReDo (§7), head reset (§8), and the unit re-initialisation
that ReDo and Continual Backprop (§5) share.

Every reset writes into the existing Parameters in place, so the optimiser
keeps training them (pitfall 1), and zeroes the optimiser state (Adam's
``exp_avg``/``exp_avg_sq``, SGD's momentum) of the entries it resets, so the
fresh values are not pushed by the old values' momentum (pitfall 2).

Populations (spec populations.md §5).  Every function works on a model of member
layers (``plasticity.population``: M networks, parameter index k = member k) and on
an ordinary ``nn.Linear``/``nn.Conv2d``/``nn.LayerNorm`` model (a population of one),
through the member views ``weight_view``/``bias_view``/``as_weight_view``.  Units to
reset are bool masks ``[M, units]`` (member k resets its own units); fresh values
come from ``random``: a ``MemberRandom`` draws member k's values from member k's
stream only, so member k does exactly what its single run does; a
``torch.Generator`` (or None, the global one) serves an ordinary model.  Optimiser
state is keyed on ``weight_param(layer)`` and viewed member-first with
``as_weight_view``, so the state of one member's reset entries is zeroed and no
other member's.  No function loops over members.

Adam's bias correction: torch's Adam keeps one step count per tensor.  When a
whole tensor is reset (head reset) its step count is zeroed too, so the fresh
tensor gets Adam's usual bias-corrected start.  (In a population the step count
is shared by the members; a whole-tensor reset happens on the same schedule for
every member (populations.md §1.4), so each member sees what its single run sees.)
When only some rows/columns are reset (CBP, ReDo) the step count is shared with
the rest of the tensor and stays; the reset entries then restart from zero
moments with a correction factor ≈ 1, so their first updates are up to
(1 − β1)/√(1 − β2) ≈ 3.2 times the learning rate (Adam defaults) instead of
≈ 1 times, settling as the moments fill in (≈ 1/(1 − β2) steps).  With
``--adam-per-entry-step`` (``optimizers.AdamPerEntryStep``, as Dohare et al.'s AdamGnT)
the step count is per entry, a state tensor of the parameter's shape, so it is zeroed
with the moments here and a reset row restarts at η (methods-v2.md §2.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from plasticity.flags import COUNT, NON_NEGATIVE, POSITIVE_COUNT, UNIT_INTERVAL, Range, ranged
from plasticity.intervention import Counter, Intervention, MethodFlags, Parts, Setting, crossed
from plasticity.networks import (
    ActivationRecorder,
    HiddenLayer,
    fresh_weights,
    hidden_layers,
    layer_map,
    orthogonal_gain,
    reinit_,
    unit_mask,
)
from plasticity.population import (
    MEMBER_WEIGHT_LAYERS,
    NORM_LAYERS,
    WEIGHT_LAYERS,
    MemberLayerNorm,
    as_weight_view,
    bias_view,
    fan_in,
    is_member_module,
    members_of,
    weight_param,
    weight_view,
)
from plasticity.streams import MemberRandom

Random = MemberRandom | torch.Generator | None


def has_member_layers(model: nn.Module) -> bool:
    """True when ``model`` is built from member layers (its forward takes ``[M, B, ...]``)."""
    return any(isinstance(m, (*MEMBER_WEIGHT_LAYERS, MemberLayerNorm)) for m in model.modules())


def check_random(model: nn.Module, random: Random) -> None:
    """A ``MemberRandom`` must have one stream per member of ``model``."""
    if isinstance(random, MemberRandom) and random.members != members_of(model):
        raise ValueError(f"{random.members} random streams for a model of {members_of(model)} members: "
                         "one stream per member")



def _affine(norm: nn.Module | None) -> bool:
    return norm is not None and getattr(norm, "weight", None) is not None


def member_view(layer: nn.Module, param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like ``param``, a parameter of ``layer``) member-first, as a view.

    The weight (``weight_param(layer)``): ``[M, out, fan_in...]`` (``as_weight_view``); a
    bias or a LayerNorm's γ/β: ``[M, ...]``.  For optimiser state keyed on ``param``.
    """
    if param is weight_param(layer):
        return as_weight_view(layer, tensor)
    return tensor if is_member_module(layer) else tensor.unsqueeze(0)


def check_unit_norm(hidden: HiddenLayer) -> None:
    """A per-unit reset needs a norm whose first dimension is the unit (LN over [n] or over [C, H, W])."""
    norm = hidden.norm
    if _affine(norm) and tuple(norm.normalized_shape)[0] != hidden.num_units:
        raise ValueError(f"layer {hidden.name}: its LayerNorm{tuple(norm.normalized_shape)} does not start with "
                         f"the {hidden.num_units} units of the layer, so units cannot be reset one by one")


def next_layer_columns(hidden: HiddenLayer, units: torch.Tensor) -> torch.Tensor:
    """Bool mask ``[M, inputs]`` of the input columns (linear) or input channels (conv) of ``hidden.next_layer``
    fed by ``units`` (a bool mask ``[M, num_units]``; an ordinary layer also takes a 1-D index).

    After a conv -> Flatten -> linear junction, channel c owns the ``spatial``
    consecutive columns c·S .. c·S + S − 1 (§5, conv -> linear).  With CReLU/DFF
    (methods-v2.md §8) unit i of n feeds both halves, outputs i and i + n (conv: channels
    c and c + C, each with its S columns after a Flatten).
    """
    view = weight_view(hidden.layer)
    mask = unit_mask(units, view.shape[0], view.shape[1], view.device)
    if hidden.halves > 1:
        mask = mask.repeat(1, hidden.halves)  # [M, 2n]: unit i -> outputs i and i + n
    return mask.repeat_interleave(hidden.spatial, dim=1) if hidden.spatial > 1 else mask


def outgoing_mask(hidden: HiddenLayer, units: torch.Tensor) -> torch.Tensor:
    """``units``' outgoing weights as a bool mask broadcasting against ``weight_view(hidden.next_layer)``."""
    columns = next_layer_columns(hidden, units)  # [M, inputs]
    extra = weight_view(hidden.next_layer).dim() - 3  # kernel dims of a conv next layer
    return columns.view(columns.shape[0], 1, columns.shape[1], *([1] * extra))


def _row_mask(mask: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """A ``[M, n]`` unit mask broadcasting against a member-first ``view`` ``[M, n, ...]``."""
    return mask.view(*mask.shape, *([1] * (view.dim() - 2)))


def zero_optimizer_entries_(optimizer: torch.optim.Optimizer | None, layer: nn.Module, param: torch.Tensor,
                            mask: torch.Tensor) -> None:
    """Zero the per-entry optimiser state of ``param``, a parameter of ``layer``, where ``mask`` is True;
    ``mask`` broadcasts against the member view of ``param`` (``member_view``), so each member's entries
    are chosen by its own row of the mask and no other member's state is touched.

    Per-entry state is every state tensor shaped like ``param``: Adam's/AdamW's m and v, SGD's
    momentum, the per-entry step count of ``AdamPerEntryStep`` (so a fresh entry restarts at k = 0,
    methods-v2.md §2.3), UPGD's utility and moments.  Scalar step counts (torch's Adam, UPGD) are
    shared with the rest of the tensor and stay.  TRAC: the wrapped optimiser's state (θ_ref stays).
    Kron: only its momentum (``entry_state_keys``, default ``momentum_buffer``), viewed in the
    parameter's shape when stored with merged dims; Q is kept (§11.2).
    """
    while isinstance(getattr(optimizer, "base", None), torch.optim.Optimizer):  # TRAC: its base holds the state
        optimizer = optimizer.base
    if optimizer is None:
        return
    state = optimizer.state.get(param, {})
    kron = hasattr(optimizer, "reset_state_")  # Kron-like: Q cannot be zeroed
    keys = getattr(optimizer, "entry_state_keys", ("momentum_buffer",)) if kron else state.keys()
    for key in keys:
        value = state.get(key)
        if not torch.is_tensor(value) or value.dim() == 0 or value.numel() != param.numel():
            continue
        if value.shape != param.shape:
            value = value.view(param.shape)  # merged dims: a view, so the zeros land in the state
        member_view(layer, param, value).masked_fill_(mask, 0.0)


def clear_optimizer_state_(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> None:
    """Zero all optimiser state of ``param``, its step count included (a whole-tensor reset).

    In a population this clears every member's state of ``param``: whole-tensor resets (head
    reset, S&P with optimiser) run on one schedule for all members, so each member's state is
    cleared exactly when its single run clears it.  Zeroed in place (tensor and host step counts:
    torch's Adam/AdamW/SGD, ``AdamPerEntryStep``, UPGD); TRAC: the wrapped optimiser's state; Kron:
    the tensor's state is dropped, so its preconditioner is rebuilt at the next step (§11.2).
    """
    while isinstance(getattr(optimizer, "base", None), torch.optim.Optimizer):  # TRAC: its base holds the state
        optimizer = optimizer.base
    if optimizer is None:
        return
    if hasattr(optimizer, "reset_state_"):  # Kron-like: Q cannot be zeroed
        optimizer.state.pop(param, None)
        return
    state = optimizer.state.get(param, {})
    for key, value in state.items():
        if torch.is_tensor(value):
            value.zero_()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            state[key] = type(value)(0)


def _redraw_rows_(layer: nn.Module, mask: torch.Tensor, index: torch.Tensor, random: Random) -> None:
    """Fresh incoming weights (bias 0) for the units ``index [M, c]`` (distinct per member) where ``mask``
    is set: only c rows per member are drawn (member k from its stream), not the whole layer."""
    view = weight_view(layer)
    members, count = index.shape
    shape = (count, *view.shape[2:])
    fresh = fresh_weights(layer, random, rows=count)  # the layer's own initialiser (orthogonal under --parseval)
    rows = index.view(members, count, *([1] * (view.dim() - 2))).expand(members, *shape)
    listed = mask.gather(1, index)  # an index entry outside the mask keeps its row
    view.scatter_(1, rows, torch.where(_row_mask(listed, fresh), fresh, view.gather(1, rows)))
    bias = bias_view(layer)
    if bias is not None:
        bias.masked_fill_(_row_mask(mask, bias), 0.0)


@torch.no_grad()
def reinitialize_units_(hidden: HiddenLayer, units: torch.Tensor, optimizer: torch.optim.Optimizer | None,
                        random: Random = None, index: torch.Tensor | None = None) -> None:
    """Make ``units`` of a hidden layer fresh (§5 step 8 and §7), in place.

    ``units``: a bool mask ``[M, num_units]`` (member k's row: its units to reset); an ordinary
    one-member layer also takes a 1-D index.  Incoming weights redrawn from the layer's own
    initialiser (member k from its stream of ``random``), incoming bias 0, outgoing weights 0
    (so the network's output does not jump; with CReLU/DFF the columns of both halves i and
    i + n, ``next_layer_columns``), a LayerNorm on those units back to γ = 1, β = 0,
    and the optimiser state of every touched row/column zeroed, per member.  LayerNorm
    normalises across units, so its statistics -- and thereby the other units' normalised
    values -- still change.  No host sync.

    Fresh weights: without ``index`` the whole layer is drawn and the masked rows taken
    (``networks.reinit_``; ReDo, whose number of units per member is not known on the host).
    ``index [M, c]`` lists each member's units of the mask (c the same for every member,
    distinct per member; entries outside the mask are ignored): then only c rows per member
    are drawn -- CBP, which knows c on the host; on a 3136 -> 512 layer the whole-layer draw
    costs ~10x the rest of a replacement.
    """
    layer, next_layer = hidden.layer, hidden.next_layer
    view = weight_view(layer)
    mask = unit_mask(units, view.shape[0], view.shape[1], view.device)
    if index is None:
        reinit_(layer, units=mask, random=random)
    else:
        _redraw_rows_(layer, mask, index.to(view.device), random)
    zero_optimizer_entries_(optimizer, layer, weight_param(layer), _row_mask(mask, view))
    if layer.bias is not None:
        zero_optimizer_entries_(optimizer, layer, layer.bias, mask)
    norm = hidden.norm
    if _affine(norm):
        gamma = as_weight_view(norm, norm.weight)  # [M, n] or [M, C, H, W]
        rows = _row_mask(mask, gamma)
        gamma.masked_fill_(rows, 1.0)
        zero_optimizer_entries_(optimizer, norm, norm.weight, rows)
        if norm.bias is not None:
            member_view(norm, norm.bias, norm.bias).masked_fill_(rows, 0.0)
            zero_optimizer_entries_(optimizer, norm, norm.bias, rows)
    outgoing = outgoing_mask(hidden, mask)
    weight_view(next_layer).masked_fill_(outgoing, 0.0)
    zero_optimizer_entries_(optimizer, next_layer, weight_param(next_layer), outgoing)


def default_init_bound(layer: nn.Module) -> float:
    """Bound of PyTorch's default uniform initialiser for Linear/Conv2d, 1/√fan_in (as ``reinit_``)."""
    fan = fan_in(layer)
    return 1.0 / math.sqrt(fan) if fan > 0 else 0.0


def fresh_bias(layer: nn.Module, random: Random = None) -> torch.Tensor:
    """A fresh draw of ``layer``'s bias from PyTorch's default initialiser, ``[M, out]`` (member k: stream k)."""
    bias = bias_view(layer)
    if orthogonal_gain(layer) is not None:  # an orthogonal init (--parseval) starts its biases at 0
        return torch.zeros_like(bias)
    bound = default_init_bound(layer)
    if isinstance(random, MemberRandom):
        return random.symmetric(bound, *bias.shape[1:], dtype=bias.dtype).to(bias.device)
    return torch.empty_like(bias).uniform_(-bound, bound, generator=random)


SNP_ALPHA = UNIT_INTERVAL
REDO_TAU = NON_NEGATIVE
AT_TASK_SWITCHES = -1
HEAD_RESET_PERIOD = Range(low=0, integer=True, special=((AT_TASK_SWITCHES, "at every task switch"),))
REDO_BATCH_SIZE = 256  # replay states per ReDo probe (default)


@torch.no_grad()
def shrink_and_perturb_(model: nn.Module, alpha: float, random: Random = None,
                        optimizer: torch.optim.Optimizer | None = None) -> None:
    """θ ← (1 − α)·θ + α·θ_fresh with θ_fresh a NEW draw from the initialiser at every call (§6, pitfall 4).

    Linear/Conv2d weights and biases get a fresh draw of PyTorch's default
    initialiser (the draw ``reinit_`` makes: weight, then bias, per layer, so
    α = 1 equals a full ``reinit_``); LayerNorm γ/β move toward their fresh
    values 1 and 0.  It is not an interpolation toward θ0 (that is L2-Init-like).
    In a population member k's θ_fresh is drawn from member k's stream of ``random``
    (a ``MemberRandom``), so it is its single run's draw.
    ``optimizer``: when given, the optimiser state of every parameter is
    cleared as for a head reset -- meant for a large α at a task switch; leave
    it out for a small α every few steps.
    """
    SNP_ALPHA.check("snp", alpha)
    check_random(model, random)
    for module in model.modules():
        if any(not p.requires_grad for p in module.parameters(recurse=False)):
            continue  # frozen (an injected head, methods-v2.md R2): never rewritten
        if isinstance(module, WEIGHT_LAYERS):
            weight_view(module).lerp_(fresh_weights(module, random), alpha)
            if module.bias is not None:
                bias_view(module).lerp_(fresh_bias(module, random), alpha)
        elif isinstance(module, NORM_LAYERS) and _affine(module):
            module.weight.mul_(1.0 - alpha).add_(alpha)
            if module.bias is not None:
                module.bias.mul_(1.0 - alpha)
    if optimizer is not None:
        for param in model.parameters():
            clear_optimizer_state_(optimizer, param)


def dormant_scores(activations: torch.Tensor, halves: int = 1) -> torch.Tensor:
    """ReDo score s_i = E_batch|h_i| / ((1/n)·Σ_k E_batch|h_k|) of each unit, per member (§7).

    ``activations``: member-first ``[M, B, n]`` or ``[M, B, C, H, W]`` (conv: a unit is a channel,
    averaged over H, W too), as ``ActivationRecorder`` stores them.  Returns ``[M, n]``; each
    member is normalised by its own layer mean.  A member whose units are all exactly 0 scores
    0 everywhere (all dormant) instead of 0/0.

    ``halves = 2`` (CReLU/DFF, methods-v2.md §8; ``HiddenLayer.halves``): the activations are
    ``[M, B, 2n, ...]`` and unit i's activity is E|h_i| + E|h_{i+n}|, normalised as above.
    """
    reduce_dims = (1, 3, 4) if activations.ndim == 5 else (1,)
    mean_abs = activations.abs().mean(dim=reduce_dims)
    if halves > 1:
        mean_abs = mean_abs.view(mean_abs.shape[0], halves, -1).sum(1)
    layer_mean = mean_abs.mean(dim=1, keepdim=True)
    return torch.where(layer_mean > 0, mean_abs / layer_mean, torch.zeros_like(mean_abs))


class ReDo:
    """Recycle dormant neurons (Sokar et al. 2023; §7): units with score ≤ τ get fresh incoming weights,
    zero bias, zero outgoing weights and zeroed optimiser state.  τ = 0 recycles exactly dead units only.

    ``reset(obs)`` runs one probe forward (eval mode, no grad) on replay states and resets, per
    member, that member's dormant units (masks ``[M, n]``, no loop over members, no host sync).
    ``obs`` is what the model's forward takes: ``[M, B, *obs_shape]`` (member k's probe states
    at index k, as ``ReplayBuffer.sample_obs`` returns them) for a model of member layers,
    ``[B, *obs_shape]`` for an ordinary PyTorch model (a population of one) -- ReDo passes it to
    the model unchanged.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, tau: float,
                 random: Random = None):
        REDO_TAU.check("redo-tau", tau)
        check_random(model, random)
        self.model, self.optimizer, self.tau, self.random = model, optimizer, float(tau), random
        self.members = members_of(model)
        self.member_model = has_member_layers(model)
        self.layers = hidden_layers(model)
        for hidden in self.layers:
            check_unit_norm(hidden)

    @torch.no_grad()
    def dormant_masks(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bool masks ``[M, n]`` of the τ-dormant units of each hidden layer on the probe batch ``obs``."""
        if self.member_model and obs.shape[0] != self.members:
            raise ValueError(f"ReDo probe batch of shape {tuple(obs.shape)} for a model of {self.members} members: "
                             "give [members, batch, *obs_shape] (what sample_obs returns)")
        was_training = self.model.training
        self.model.eval()
        try:
            with ActivationRecorder(self.model) as recorder:
                self.model(obs)
        finally:
            self.model.train(was_training)
        return {hidden.name: dormant_scores(recorder.post[hidden.name], hidden.halves) <= self.tau for hidden in self.layers}

    @torch.no_grad()
    def reset(self, obs: torch.Tensor) -> torch.Tensor:
        """Recycle the dormant units on the probe batch ``obs``; returns how many per member (``[M]`` device
        tensor, no host sync)."""
        masks = self.dormant_masks(obs)
        for hidden in self.layers:
            reinitialize_units_(hidden, masks[hidden.name], self.optimizer, self.random)
        return torch.stack([mask.sum(dim=1) for mask in masks.values()]).sum(dim=0)


@torch.no_grad()
def reset_head_(model: nn.Module, optimizer: torch.optim.Optimizer | None, target_model: nn.Module | None = None,
                random: Random = None) -> None:
    """Re-initialise the output layer in place, clear its optimiser state, copy it into the target's head (§8).

    In a population every member's head is redrawn, member k from its own stream of ``random``.
    """
    check_random(model, random)
    head = layer_map(model).output
    reinit_(head, random=random)
    for param in (weight_param(head), head.bias):
        if param is not None:
            clear_optimizer_state_(optimizer, param)
    if target_model is not None:
        target_head = layer_map(target_model).output
        if type(target_head) is not type(head) or weight_param(target_head).shape != weight_param(head).shape:
            raise ValueError(f"target head {tuple(weight_view(target_head).shape)} does not match the online head "
                             f"{tuple(weight_view(head).shape)}; pass the target copy of the same network")
        weight_param(target_head).copy_(weight_param(head))
        if head.bias is not None:
            target_head.bias.copy_(head.bias)


# ---- the resets as interventions, and their flags ----

class CountedEvent(Intervention):
    """A method that fires now and then; counts its events on the device and logs the count under ``tag``."""

    tag = ""

    def __init__(self, model: nn.Module):
        self.events = Counter(next(model.parameters()).device, members_of(model))  # one count per member

    def scalars(self) -> dict[str, torch.Tensor]:
        return {self.tag: self.events.value()}

    def state_dict(self) -> dict:
        return {"events": self.events.value()}

    def load_state_dict(self, state: dict) -> None:
        self.events.count.copy_(state["events"])


class ShrinkAndPerturb(CountedEvent):
    """S&P every ``every`` updates, or at task switches when ``every`` is 0; optimiser state is kept (§6)."""

    name, tag = "snp", "plasticity/snp_applications"

    def __init__(self, model: nn.Module, alpha: float, every: int, random: Random):
        super().__init__(model)
        check_random(model, random)
        self.model, self.alpha, self.every, self.random = model, alpha, every, random

    def _apply(self) -> None:
        shrink_and_perturb_(self.model, self.alpha, self.random)
        self.events.add()
        self.rewrote = True  # a discrete rewrite (C-CHAIN refreshes its reference)

    def after_update(self, previous, update, sample_obs) -> None:
        if crossed(previous, update, self.every):
            self._apply()

    def on_task_switch(self) -> None:
        if self.every == 0:
            self._apply()


class PeriodicReDo(CountedEvent):
    """ReDo every ``every`` updates on ``batch_size`` replay observations from ``sample_obs``; counts units reset
    per member.  ``sample_obs(n)`` returns what the model's forward takes (``ReDo``): ``[M, n, *obs_shape]``
    for a model of member layers, ``[n, *obs_shape]`` for an ordinary model."""

    name, tag = "redo", "plasticity/redo_resets"

    def __init__(self, redo: ReDo, every: int, batch_size: int = REDO_BATCH_SIZE):
        super().__init__(redo.model)
        self.redo, self.every, self.batch_size = redo, every, batch_size

    def after_update(self, previous, update, sample_obs) -> None:
        if not crossed(previous, update, self.every):
            return
        if sample_obs is None:
            raise ValueError("ReDo is on (--redo-every > 0): pass sample_obs, a function returning a batch of "
                             "replay observations, to after_step")
        self.events.add(self.redo.reset(sample_obs(self.batch_size)))
        self.rewrote = True  # (how many units were reset is known on the device only)


@dataclass
class SnPFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"snp": "snp"}

    snp: float = ranged(0.0, SNP_ALPHA)
    """Shrink & Perturb: theta <- (1-a)*theta + a*fresh_init; 0 disables"""
    snp_every: int = ranged(0, COUNT)
    """S&P cadence in updates (0: at task switches)"""

    def check(self, setting: Setting) -> None:
        if self.snp_every > 0 and self.snp == 0:
            raise ValueError("--snp-every needs --snp α > 0 (the shrink & perturb coefficient)")
        if self.snp > 0 and self.snp_every == 0 and not setting.task_switches:
            raise ValueError(f"--snp {self.snp:g} with --snp-every 0: S&P events act at task switches, and this run "
                             "has none (on Atari: no --atari-shift); give a period in updates with --snp-every N")

    def build(self, parts: Parts) -> ShrinkAndPerturb | None:
        return ShrinkAndPerturb(parts.model, self.snp, self.snp_every, parts.random) if self.snp > 0 else None


@dataclass
class ReDoFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"redo_every": "redo"}

    redo_tau: float = ranged(0.1, REDO_TAU)
    """ReDo dormancy threshold tau (0 means exactly dead units)"""
    redo_every: int = ranged(0, COUNT)
    """ReDo: reset dormant units every this many updates; 0 disables"""
    redo_batch_size: int = ranged(REDO_BATCH_SIZE, POSITIVE_COUNT)
    """ReDo: replay states its dormancy scores are computed on"""

    def build(self, parts: Parts) -> PeriodicReDo | None:
        # The default tau (0.1) alone does nothing: ReDo is on only with a period.
        if self.redo_every == 0:
            return None
        return PeriodicReDo(ReDo(parts.model, parts.optimizer, self.redo_tau, parts.random), self.redo_every,
                            self.redo_batch_size)


@dataclass
class HeadResetFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"reset_head_every": "headreset"}

    reset_head_every: int = ranged(0, HEAD_RESET_PERIOD)
    """re-initialise the output head (and its target copy) every this many updates; -1: at task switches; 0: off (= --reset-layers last:1 --reset-every-updates N --reset-optimizer-scope touched)"""

    def check(self, setting: Setting) -> None:
        if self.reset_head_every == AT_TASK_SWITCHES and not setting.task_switches:
            raise ValueError("--reset-head-every -1: head resets act at task switches, and this run has none (on "
                             "Atari: no --atari-shift); give a period in updates instead")

    def build(self, parts: Parts) -> Intervention | None:
        # The §4 layer reset with last:1, every N updates (or at task switches), optimiser scope touched, target
        # copy (methods-v2.md §4): name reset_head, scalar plasticity/head_resets, state {"events"} as before.
        if self.reset_head_every == 0:
            return None
        from plasticity.layer_resets import head_reset  # layer_resets builds on this module

        return head_reset(parts, self.reset_head_every)
