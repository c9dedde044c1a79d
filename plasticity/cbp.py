"""Continual Backprop: generate-and-test on hidden units (Dohare et al. 2024; spec methods.md §5).

After each optimiser step, per hidden layer, from the activations h of that
step's training forward (a conv unit is a channel, averaged over H, W):

1. ages a_i += 1;
2. f_i ← η f_i + (1 − η)·mean_b h_bi, bias-corrected f̂_i = f_i / (1 − η^{a_i});
3. instantaneous utility y_i: ``contribution`` = mean_b |h_bi| · Σ_k |W^next_{k,i}|, or
   ``adaptable`` = mean_b |h_bi − f̂_i| · Σ_k |W^next_{k,i}| / mean_j |W^in_{i,j}|;
4. u_i ← η u_i + (1 − η) y_i, ranked by û_i = u_i / (1 − η^{a_i});
5. eligible E = {i : a_i > m};
6. r ← r + ρ·|E| (when E ≠ ∅), n = ⌊r⌋, r ← r − n;
7. R = the n eligible units with the lowest û;
8. next-layer bias += W^next_{:,R}·f̂_R (f̂ read BEFORE it is reset -- the
   reference code zeroes it first, a no-op, pitfall 3), then the units are
   made fresh by ``resets.reinitialize_units_`` (incoming weights redrawn, bias 0,
   outgoing weights 0, LayerNorm γ = 1, β = 0 -- LN normalises across units, so
   its statistics still change -- and their optimiser moments zeroed; see
   ``plasticity/resets.py`` for Adam's bias correction), and u = f = a = 0.

Layers are processed input to output, so a replaced unit of the next layer
gets fresh incoming weights from all its inputs, including the columns just
zeroed for this layer's replaced units (its own outgoing weights are 0, so the
output is unaffected).

The bias correction keeps the output unchanged exactly when the replaced units'
activation equals f̂ (for all inputs when they were dead).  After a conv layer it
treats f̂ as the activation at every position, so for a conv -> conv junction
with zero padding it is exact only away from the borders.

Host-device synchronisation: none.  |E| and n are computed on the host from
deterministic age bookkeeping (all units of a layer age together; a unit
replaced at step s is ineligible while t − s ≤ m, and cannot be replaced again
in that window), so the device-side ``age > m`` mask is only used to pick R.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from plasticity.flags import COUNT, UNIT_INTERVAL, Range, ranged
from plasticity.intervention import EveryUpdate, MethodFlags, Parts, Setting
from plasticity.networks import ActivationRecorder, HiddenLayer
from plasticity.resets import check_unit_norm, next_layer_columns, reinitialize_units_

CBP_UTILITIES = ("contribution", "adaptable")


REPLACEMENT_RATE = UNIT_INTERVAL
MATURITY = COUNT
DECAY = Range(low=0.0, high=1.0, high_open=True)


def check_cbp_args(replacement_rate: float, maturity: int, decay: float, utility: str) -> None:
    REPLACEMENT_RATE.check("cbp-replacement-rate", replacement_rate)
    MATURITY.check("cbp-maturity", maturity)
    DECAY.check("cbp-decay", decay)
    if utility not in CBP_UTILITIES:
        raise ValueError(f"unknown --cbp-utility {utility!r}; choose one of {', '.join(CBP_UTILITIES)}")


class _UnitStatistics:
    """Running statistics of one hidden layer's units (device tensors) and its replacement bookkeeping.

    Ages are derived, not stored: all units of a layer age together, so a unit's
    age is ``steps − birth`` with ``birth`` the step of its last replacement (0 at
    the start) -- no per-step increment kernel.
    """

    def __init__(self, num_units: int, device: torch.device):
        self.utility = torch.zeros(num_units, device=device)
        self.mean = torch.zeros(num_units, device=device)
        self.birth = torch.zeros(num_units, dtype=torch.long, device=device)
        self.accumulator = 0.0  # fractional replacements carried to the next step (host)
        self.recent: deque[tuple[int, int]] = deque()  # (step, count) of replacements in the last m steps (host)


class ContinualBackprop:
    """Generate-and-test on every hidden layer of ``model`` (found by ``layer_map``).

    Call ``step()`` right after ``optimizer.step()``; it reads the activations of
    the last forward pass run with gradients enabled (the training forward),
    recorded by an ``ActivationRecorder`` -- forwards under ``torch.no_grad()``
    (acting, targets, probes) are ignored.  Build it once the model is on its
    device (its statistics live there), like the optimiser.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, replacement_rate: float = 1e-4,
                 maturity: int = 100, decay: float = 0.99, utility: str = "contribution",
                 generator: torch.Generator | None = None):
        check_cbp_args(replacement_rate, maturity, decay, utility)
        self.optimizer = optimizer
        self.replacement_rate, self.maturity, self.decay, self.utility = (
            float(replacement_rate), int(maturity), float(decay), utility)
        self.recorder = ActivationRecorder(model, only_with_grad=True)
        self.layers: list[HiddenLayer] = self.recorder.layers
        if not self.layers:
            raise ValueError("continual backprop needs a network with at least one hidden layer")
        for hidden in self.layers:
            check_unit_norm(hidden)
            if hidden.next_layer.bias is None:
                raise ValueError(f"continual backprop needs a bias in {hidden.name}'s next layer for its "
                                 "bias correction (§5 step 8)")
        device = self.layers[0].layer.weight.device
        self.generator = generator
        self.stats = [_UnitStatistics(hidden.num_units, device) for hidden in self.layers]
        # |W^next| is written into a persistent buffer: a fresh multi-MB temporary every step costs page
        # faults on CPU (the Nature CNN's 3136x512 layer: 6.4 MB), more than the arithmetic.
        self._abs_buffers = [torch.empty_like(hidden.next_layer.weight, requires_grad=False) for hidden in self.layers]
        self.steps = 0
        self.total_replacements = 0  # host count
        self.replacements = torch.zeros((), dtype=torch.long, device=device)  # same count, for logging
        self.last_replaced: dict[str, torch.Tensor] = {}

    def ages(self, index: int) -> torch.Tensor:
        """a_i of the units of hidden layer ``index`` (steps since the unit was created or last replaced)."""
        return self.steps - self.stats[index].birth

    def _bias_correction(self, index: int) -> torch.Tensor:
        return 1.0 - torch.pow(self.decay, self.ages(index))

    # ------------------------------------------------------------------ per-step statistics
    def _outgoing_magnitude(self, index: int) -> torch.Tensor:
        """Σ_k |W^next_{k,i}| per unit; after conv -> linear summed over the unit's H·W columns too."""
        hidden = self.layers[index]
        magnitude = torch.abs(hidden.next_layer.weight, out=self._abs_buffers[index])
        if magnitude.ndim == 4:
            return magnitude.sum(dim=(0, 2, 3))
        # Sum over rows, then over each unit's spatial columns: ~3x faster on CPU than one strided reduction.
        per_column = magnitude.sum(0)
        return per_column.view(hidden.num_units, hidden.spatial).sum(1) if hidden.spatial > 1 else per_column

    def _eligible_count(self, stats: _UnitStatistics, num_units: int) -> int:
        """|{i : a_i > m}| from host bookkeeping, equal to ``(ages > m).sum()`` without a sync."""
        if self.steps <= self.maturity:
            return 0  # units never replaced have age == steps
        while stats.recent and stats.recent[0][0] < self.steps - self.maturity:
            stats.recent.popleft()
        return num_units - sum(count for _, count in stats.recent)

    @torch.no_grad()
    def step(self) -> None:
        """One generate-and-test step on every hidden layer (§5 steps 1-8)."""
        missing = [hidden.name for hidden in self.layers if hidden.name not in self.recorder.post]
        if missing:
            raise ValueError(f"continual backprop has no activations for {', '.join(missing)}: call step() once "
                             "after each optimiser step, after a training forward pass with gradients enabled")
        self.steps += 1  # step 1: every age grows by one (ages = steps − birth)
        self.last_replaced = {}
        keep = 1.0 - self.decay
        activations = [self.recorder.post[hidden.name] for hidden in self.layers]
        self.recorder.post.clear()  # a second step() without a new training forward is an error, not a repeat
        # The recorder holds ReLU outputs (≥ 0), so mean_b |h_bi| = mean_b h_bi: one reduction per layer
        # (over batch and H, W for a conv channel) feeds both f and the contribution utility.
        batch_means = [h.mean(dim=(0, 2, 3) if h.ndim == 4 else 0, dtype=torch.float32) for h in activations]
        outgoing = [self._outgoing_magnitude(index) for index in range(len(self.layers))]
        torch._foreach_lerp_([s.mean for s in self.stats], batch_means, keep)  # step 2
        if self.utility == "contribution":  # step 3
            instant = torch._foreach_mul(batch_means, outgoing)
        else:
            instant = [self._adaptable_utility(i, h, out) for i, (h, out) in enumerate(zip(activations, outgoing))]
        torch._foreach_lerp_([s.utility for s in self.stats], instant, keep)  # step 4

        for index, (hidden, stats) in enumerate(zip(self.layers, self.stats)):
            eligible = self._eligible_count(stats, hidden.num_units)  # step 5
            if eligible == 0:
                continue
            stats.accumulator += self.replacement_rate * eligible  # step 6
            count = math.floor(stats.accumulator)
            stats.accumulator -= count
            if count == 0:
                continue
            bias_correction = self._bias_correction(index)  # step 7
            score = torch.where(self.ages(index) > self.maturity, stats.utility / bias_correction, math.inf)
            units = torch.topk(score, count, largest=False).indices
            self._replace(hidden, stats, units, stats.mean / bias_correction)  # step 8
            stats.recent.append((self.steps, count))
            self.total_replacements += count
            self.replacements += count
            self.last_replaced[hidden.name] = units

    def _adaptable_utility(self, index: int, activations: torch.Tensor, outgoing: torch.Tensor) -> torch.Tensor:
        """mean_b |h_bi − f̂_i| · Σ_k |W^next_{k,i}| / mean_j |W^in_{i,j}| (f̂ after this step's update)."""
        unit_activations = activations.mean(dim=(2, 3)) if activations.ndim == 4 else activations  # [B, n]
        mean_hat = self.stats[index].mean / self._bias_correction(index)
        incoming = self.layers[index].layer.weight.flatten(1).abs().mean(1)
        incoming = incoming.clamp_min(torch.finfo(incoming.dtype).tiny)  # an all-zero row: no division by 0
        return (unit_activations - mean_hat).abs().mean(0) * outgoing / incoming

    def _replace(self, hidden: HiddenLayer, stats: _UnitStatistics, units: torch.Tensor,
                 mean_hat: torch.Tensor) -> None:
        """§5 step 8, in the spec's order: bias correction with f̂ first, then reset the units and their stats."""
        next_layer = hidden.next_layer
        if next_layer.weight.ndim == 4:
            outgoing = next_layer.weight[:, units].sum(dim=(2, 3))  # a constant input channel through the kernel
            next_layer.bias.add_(outgoing @ mean_hat[units])
        else:
            # Each unit feeds `spatial` consecutive columns, all carrying f̂ of that unit.
            outgoing = next_layer.weight[:, next_layer_columns(hidden, units)]
            next_layer.bias.add_(outgoing.view(outgoing.shape[0], -1, hidden.spatial).sum(2) @ mean_hat[units])
        reinitialize_units_(hidden, units, self.optimizer, self.generator)
        stats.utility.index_fill_(0, units, 0.0)
        stats.mean.index_fill_(0, units, 0.0)
        stats.birth.index_fill_(0, units, self.steps)  # age 0 now

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "total_replacements": self.total_replacements,
            "layers": [{"utility": s.utility.clone(), "mean": s.mean.clone(), "birth": s.birth.clone(),
                        "accumulator": s.accumulator, "recent": [list(event) for event in s.recent]}
                       for s in self.stats],
        }

    def load_state_dict(self, state: dict) -> None:
        layers = state["layers"]
        if len(layers) != len(self.stats) or any(saved["birth"].shape != s.birth.shape
                                                 for saved, s in zip(layers, self.stats)):
            raise ValueError("CBP state does not match this model's hidden layers (a checkpoint of another network?)")
        self.steps = int(state["steps"])
        self.total_replacements = int(state["total_replacements"])
        self.replacements.fill_(self.total_replacements)
        for saved, stats in zip(layers, self.stats):
            stats.utility.copy_(saved["utility"])
            stats.mean.copy_(saved["mean"])
            stats.birth.copy_(saved["birth"])
            stats.accumulator = float(saved["accumulator"])
            stats.recent = deque((int(step), int(count)) for step, count in saved["recent"])

    def remove(self) -> None:
        """Detach the activation hooks from the model."""
        self.recorder.remove()


@dataclass
class CBPFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"cbp": "cbp"}

    cbp: bool = False
    """Continual Backprop: replace low-utility mature hidden units after every update"""
    cbp_replacement_rate: float = ranged(1e-4, REPLACEMENT_RATE)
    """CBP: fraction of eligible units replaced per update (fractional counts accumulate)"""
    cbp_maturity: int = ranged(100, MATURITY)
    """CBP: updates a unit must age before it can be replaced"""
    cbp_decay: float = ranged(0.99, DECAY)
    """CBP: decay rate of the running utility and mean activation"""
    cbp_utility: Literal["contribution", "adaptable"] = "contribution"
    """CBP utility measure"""

    def check(self, setting: Setting) -> None:
        if self.cbp_utility not in CBP_UTILITIES:
            raise ValueError(f"unknown --cbp-utility {self.cbp_utility!r}; choose one of {', '.join(CBP_UTILITIES)}")

    def build(self, parts: Parts) -> EveryUpdate | None:
        if not self.cbp:
            return None
        cbp = ContinualBackprop(parts.model, parts.optimizer, self.cbp_replacement_rate, int(self.cbp_maturity),
                                self.cbp_decay, self.cbp_utility, parts.generator)
        # Counted in place: a copy, so a logger holding it sees this step's value.
        return EveryUpdate("cbp", cbp, lambda: {"plasticity/cbp_replacements": cbp.replacements.clone()})
