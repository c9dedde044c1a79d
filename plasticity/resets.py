"""Resets: Shrink & Perturb (spec methods.md §6), ReDo (§7), head reset (§8), and the unit re-initialisation
that ReDo and Continual Backprop (§5) share.

Every reset writes into the existing Parameters in place, so the optimiser
keeps training them (pitfall 1), and zeroes the optimiser state (Adam's
``exp_avg``/``exp_avg_sq``, SGD's momentum) of the entries it resets, so the
fresh values are not pushed by the old values' momentum (pitfall 2).

Adam's bias correction: torch's Adam keeps one step count per tensor.  When a
whole tensor is reset (head reset) its step count is zeroed too, so the fresh
tensor gets Adam's usual bias-corrected start.  When only some rows/columns are
reset (CBP, ReDo) the step count is shared with the rest of the tensor and
stays; the reset entries then restart from zero moments with a correction
factor ≈ 1, so their first updates are up to (1 − β1)/√(1 − β2) ≈ 3.2 times
the learning rate (Adam defaults) instead of ≈ 1 times, settling as the
moments fill in (≈ 1/(1 − β2) steps).  Emulating per-entry step counts (as
Dohare et al.'s AdamGnT does) would need a custom optimiser.
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
    WEIGHT_LAYERS,
    ActivationRecorder,
    HiddenLayer,
    hidden_layers,
    layer_map,
    reinit_,
)


def check_unit_norm(hidden: HiddenLayer) -> None:
    """A per-unit reset needs a norm whose first dimension is the unit (LN over [n] or over [C, H, W])."""
    norm = hidden.norm
    if norm is not None and norm.elementwise_affine and norm.normalized_shape[0] != hidden.num_units:
        raise ValueError(f"layer {hidden.name}: its LayerNorm{tuple(norm.normalized_shape)} does not start with "
                         f"the {hidden.num_units} units of the layer, so units cannot be reset one by one")


def next_layer_columns(hidden: HiddenLayer, units: torch.Tensor) -> torch.Tensor:
    """Input columns (linear) or input channels (conv) of ``hidden.next_layer`` fed by ``units``.

    After a conv -> Flatten -> linear junction, channel c owns the ``spatial``
    consecutive columns c·S .. c·S + S − 1 (§5, conv -> linear).
    """
    if hidden.spatial == 1:
        return units
    offsets = torch.arange(hidden.spatial, device=units.device)
    return (units.unsqueeze(1) * hidden.spatial + offsets).flatten()


def zero_optimizer_entries_(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, dim: int,
                            index: torch.Tensor) -> None:
    """Zero the per-entry optimiser state (moments, momentum) of ``param`` along ``dim`` at ``index``."""
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.index_fill_(dim, index, 0.0)


def clear_optimizer_state_(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> None:
    """Zero all optimiser state of ``param``, its step count included (a whole-tensor reset)."""
    if optimizer is None:
        return
    state = optimizer.state.get(param, {})
    for key, value in state.items():
        if torch.is_tensor(value):
            value.zero_()
        elif isinstance(value, (int, float)):
            state[key] = type(value)(0)


@torch.no_grad()
def reinitialize_units_(hidden: HiddenLayer, units: torch.Tensor, optimizer: torch.optim.Optimizer | None,
                        generator: torch.Generator | None = None) -> None:
    """Make ``units`` of a hidden layer fresh (§5 step 8 and §7), in place.

    Incoming weights redrawn from the layer's own initialiser, incoming bias 0,
    outgoing weights 0 (so the network's output does not jump), a LayerNorm on
    those units back to γ = 1, β = 0, and the optimiser state of every touched
    row/column zeroed.  LayerNorm normalises across units, so its statistics --
    and thereby the other units' normalised values -- still change.
    """
    layer, next_layer = hidden.layer, hidden.next_layer
    reinit_(layer, rows=units, generator=generator)
    zero_optimizer_entries_(optimizer, layer.weight, 0, units)
    if layer.bias is not None:
        zero_optimizer_entries_(optimizer, layer.bias, 0, units)
    norm = hidden.norm
    if norm is not None and norm.elementwise_affine:
        norm.weight.index_fill_(0, units, 1.0)
        zero_optimizer_entries_(optimizer, norm.weight, 0, units)
        if norm.bias is not None:
            norm.bias.index_fill_(0, units, 0.0)
            zero_optimizer_entries_(optimizer, norm.bias, 0, units)
    columns = next_layer_columns(hidden, units)
    next_layer.weight.index_fill_(1, columns, 0.0)
    zero_optimizer_entries_(optimizer, next_layer.weight, 1, columns)


def default_init_bound(layer: nn.Linear | nn.Conv2d) -> float:
    """Bound of PyTorch's default uniform initialiser for Linear/Conv2d, 1/√fan_in (as ``reinit_``)."""
    fan_in = layer.weight[0].numel()
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


SNP_ALPHA = UNIT_INTERVAL
REDO_TAU = NON_NEGATIVE
AT_TASK_SWITCHES = -1
HEAD_RESET_PERIOD = Range(low=0, integer=True, special=((AT_TASK_SWITCHES, "at every task switch"),))
REDO_BATCH_SIZE = 256  # replay states per ReDo probe (default)


@torch.no_grad()
def shrink_and_perturb_(model: nn.Module, alpha: float, generator: torch.Generator | None = None,
                        optimizer: torch.optim.Optimizer | None = None) -> None:
    """θ ← (1 − α)·θ + α·θ_fresh with θ_fresh a NEW draw from the initialiser at every call (§6, pitfall 4).

    Linear/Conv2d weights and biases get a fresh draw of PyTorch's default
    initialiser (the draw ``reinit_`` makes: weight, then bias, per layer, so
    α = 1 equals a full ``reinit_``); LayerNorm γ/β move toward their fresh
    values 1 and 0.  It is not an interpolation toward θ0 (that is L2-Init-like).
    ``optimizer``: when given, the optimiser state of every parameter is
    cleared as for a head reset -- meant for a large α at a task switch; leave
    it out for a small α every few steps.
    """
    SNP_ALPHA.check("snp", alpha)
    for module in model.modules():
        if isinstance(module, WEIGHT_LAYERS):
            bound = default_init_bound(module)
            fresh = torch.empty_like(module.weight).uniform_(-bound, bound, generator=generator)
            module.weight.lerp_(fresh, alpha)
            if module.bias is not None:
                fresh_bias = torch.empty_like(module.bias).uniform_(-bound, bound, generator=generator)
                module.bias.lerp_(fresh_bias, alpha)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            module.weight.mul_(1.0 - alpha).add_(alpha)
            if module.bias is not None:
                module.bias.mul_(1.0 - alpha)
    if optimizer is not None:
        for param in model.parameters():
            clear_optimizer_state_(optimizer, param)


def dormant_scores(activations: torch.Tensor) -> torch.Tensor:
    """ReDo score s_i = E_batch|h_i| / ((1/n)·Σ_k E_batch|h_k|) of each unit (§7); conv: a unit is a channel.

    A layer whose units are all exactly 0 scores 0 everywhere (all dormant) instead of 0/0.
    """
    reduce_dims = (0, 2, 3) if activations.ndim == 4 else (0,)
    mean_abs = activations.abs().mean(dim=reduce_dims)
    layer_mean = mean_abs.mean()
    return torch.where(layer_mean > 0, mean_abs / layer_mean, torch.zeros_like(mean_abs))


class ReDo:
    """Recycle dormant neurons (Sokar et al. 2023; §7): units with score ≤ τ get fresh incoming weights,
    zero bias, zero outgoing weights and zeroed optimiser state.  τ = 0 recycles exactly dead units only.

    ``reset(obs)`` runs one probe forward (eval mode, no grad) on replay states;
    it costs one host sync per call (the dormant units' indices), which is fine
    at ReDo's cadence (every ``redo_every`` steps).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, tau: float,
                 generator: torch.Generator | None = None):
        REDO_TAU.check("redo-tau", tau)
        self.model, self.optimizer, self.tau, self.generator = model, optimizer, float(tau), generator
        self.layers = hidden_layers(model)
        for hidden in self.layers:
            check_unit_norm(hidden)

    @torch.no_grad()
    def dormant_masks(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boolean mask of the τ-dormant units of each hidden layer on the probe batch ``obs``."""
        was_training = self.model.training
        self.model.eval()
        try:
            with ActivationRecorder(self.model) as recorder:
                self.model(obs)
        finally:
            self.model.train(was_training)
        return {hidden.name: dormant_scores(recorder.post[hidden.name]) <= self.tau for hidden in self.layers}

    @torch.no_grad()
    def reset(self, obs: torch.Tensor) -> torch.Tensor:
        """Recycle the dormant units on the probe batch ``obs``; returns how many (0-dim device tensor)."""
        masks = self.dormant_masks(obs)
        for hidden in self.layers:
            units = masks[hidden.name].nonzero().squeeze(1)
            reinitialize_units_(hidden, units, self.optimizer, self.generator)
        return torch.stack([mask.sum() for mask in masks.values()]).sum()


@torch.no_grad()
def reset_head_(model: nn.Module, optimizer: torch.optim.Optimizer | None, target_model: nn.Module | None = None,
                generator: torch.Generator | None = None) -> None:
    """Re-initialise the output layer in place, clear its optimiser state, copy it into the target's head (§8)."""
    head = layer_map(model).output
    reinit_(head, generator=generator)
    for param in (head.weight, head.bias):
        if param is not None:
            clear_optimizer_state_(optimizer, param)
    if target_model is not None:
        target_head = layer_map(target_model).output
        if target_head.weight.shape != head.weight.shape:
            raise ValueError(f"target head {tuple(target_head.weight.shape)} does not match the online head "
                             f"{tuple(head.weight.shape)}; pass the target copy of the same network")
        target_head.weight.copy_(head.weight)
        if head.bias is not None:
            target_head.bias.copy_(head.bias)


# ---- the resets as interventions, and their flags ----

class CountedEvent(Intervention):
    """A method that fires now and then; counts its events on the device and logs the count under ``tag``."""

    tag = ""

    def __init__(self, model: nn.Module):
        self.events = Counter(next(model.parameters()).device)

    def scalars(self) -> dict[str, torch.Tensor]:
        return {self.tag: self.events.value()}

    def state_dict(self) -> dict:
        return {"events": self.events.value()}

    def load_state_dict(self, state: dict) -> None:
        self.events.count.copy_(state["events"])


class ShrinkAndPerturb(CountedEvent):
    """S&P every ``every`` updates, or at task switches when ``every`` is 0; optimiser state is kept (§6)."""

    name, tag = "snp", "plasticity/snp_applications"

    def __init__(self, model: nn.Module, alpha: float, every: int, generator: torch.Generator):
        super().__init__(model)
        self.model, self.alpha, self.every, self.generator = model, alpha, every, generator

    def _apply(self) -> None:
        shrink_and_perturb_(self.model, self.alpha, self.generator)
        self.events.add()

    def after_update(self, previous, update, sample_obs) -> None:
        if crossed(previous, update, self.every):
            self._apply()

    def on_task_switch(self) -> None:
        if self.every == 0:
            self._apply()


class PeriodicReDo(CountedEvent):
    """ReDo every ``every`` updates on ``batch_size`` replay observations from ``sample_obs``; counts units reset."""

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


class HeadReset(CountedEvent):
    """Head reset (and its target copy) every ``every`` updates, or at task switches when ``every`` is −1 (§8)."""

    name, tag = "reset_head", "plasticity/head_resets"

    def __init__(self, parts: Parts, every: int):
        super().__init__(parts.model)
        self.parts, self.every = parts, every

    def _apply(self) -> None:
        parts = self.parts
        reset_head_(parts.model, parts.optimizer, parts.target_model, parts.generator)
        self.events.add()

    def after_update(self, previous, update, sample_obs) -> None:
        if crossed(previous, update, self.every):
            self._apply()

    def on_task_switch(self) -> None:
        if self.every == AT_TASK_SWITCHES:
            self._apply()


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
        return ShrinkAndPerturb(parts.model, self.snp, self.snp_every, parts.generator) if self.snp > 0 else None


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
        return PeriodicReDo(ReDo(parts.model, parts.optimizer, self.redo_tau, parts.generator), self.redo_every,
                            self.redo_batch_size)


@dataclass
class HeadResetFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"reset_head_every": "headreset"}

    reset_head_every: int = ranged(0, HEAD_RESET_PERIOD)
    """re-initialise the output head (and its target copy) every this many updates; -1: at task switches; 0: off"""

    def check(self, setting: Setting) -> None:
        if self.reset_head_every == AT_TASK_SWITCHES and not setting.task_switches:
            raise ValueError("--reset-head-every -1: head resets act at task switches, and this run has none (on "
                             "Atari: no --atari-shift); give a period in updates instead")

    def build(self, parts: Parts) -> HeadReset | None:
        return HeadReset(parts, self.reset_head_every) if self.reset_head_every != 0 else None
