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

import torch
from torch import nn

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
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--snp (shrink & perturb α) must lie in [0, 1]; got {alpha}")
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
        if not tau >= 0:
            raise ValueError(f"--redo-tau must be >= 0 (0.1 recommended; 0 = exactly dead units); got {tau}")
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
