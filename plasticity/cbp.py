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

CReLU and DFF (methods-v2.md §8): a unit is a pre-activation index i with two
outputs, i and i + n (conv: channels c and c + C).  f and the per-output terms are
kept per output ``[M, 2n]``; the utility of unit i sums both halves' terms
(contribution: mean_b |h_bi|·Σ_k |W^next_{k,i}| + the same for i + n; adaptable: the
same with |h − f̂|, divided by unit i's one mean_j |W^in_{i,j}|); a replacement redraws
row i, zeroes the outgoing columns of both halves, and its bias correction adds
W^next_{:,i}·f̂_i + W^next_{:,i+n}·f̂_{i+n}.  DFF outputs can be negative, so mean_b |h|
is computed separately from mean_b h there.

Layers are processed input to output, so a replaced unit of the next layer
gets fresh incoming weights from all its inputs, including the columns just
zeroed for this layer's replaced units (its own outgoing weights are 0, so the
output is unaffected).

The bias correction keeps the output unchanged exactly when the replaced units'
activation equals f̂ (for all inputs when they were dead).  After a conv layer it
treats f̂ as the activation at every position, so for a conv -> conv junction
with zero padding it is exact only away from the borders.

Populations (spec populations.md §5).  On a model of member layers (M networks,
activations ``[M, B, units...]``) every statistic is ``[M, units]``: utilities, mean
activations and ages per member, and each member replaces its own lowest-utility
eligible units.  Selection is by masks, not by a loop: per member, the eligible
units are ranked by û (a stable sort, ties to the lower index) and those of rank
< n are replaced; the bias correction, the redraw (member k from its own stream of
a ``MemberRandom``) and the zeroing of weights and Adam moments are masked tensor
ops over all members at once.  An ordinary PyTorch model is a population of one.

Host-device synchronisation: none.  |E| and n are computed on the host from
deterministic age bookkeeping (all units of a layer age together; a unit
replaced at step s is ineligible while t − s ≤ m, and cannot be replaced again
in that window), so the device-side ``age > m`` mask is only used to pick R.
That bookkeeping is the same for every member of a population: all start at age
0 and each replaces n units per step, so every member has the same |E| (hence
one accumulator r and one n for all members); which units they are differs.  The
mask is still ANDed with each member's own ``age > m``, so a member never
replaces an immature unit even if its ages were to differ.
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
from plasticity.population import as_weight_view, bias_view, weight_param, weight_view
from plasticity.resets import Random, check_random, check_unit_norm, reinitialize_units_

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
    """Running statistics ``[M, units]`` of one hidden layer's units (device tensors) and its replacement
    bookkeeping (host, the same for every member).

    Ages are derived, not stored: all units of a layer age together, so a unit's
    age is ``steps − birth`` with ``birth`` the step of its last replacement (0 at
    the start) -- no per-step increment kernel.
    """

    def __init__(self, members: int, num_units: int, device: torch.device, dtype: torch.dtype, halves: int = 1):
        self.utility = torch.zeros(members, num_units, device=device, dtype=dtype)
        self.mean = torch.zeros(members, halves * num_units, device=device, dtype=dtype)  # per output (f)
        self.birth = torch.zeros(members, num_units, dtype=torch.long, device=device)
        self.positions = torch.arange(num_units, device=device).expand(members, num_units)  # for the ranks
        self.accumulator = 0.0  # fractional replacements carried to the next step (host; every member's)
        self.recent: deque[tuple[int, int]] = deque()  # (step, count) of replacements in the last m steps (host)


class ContinualBackprop:
    """Generate-and-test on every hidden layer of ``model`` (found by ``layer_map``).

    Call ``step()`` right after ``optimizer.step()``; it reads the activations of
    the last forward pass run with gradients enabled (the training forward),
    recorded by an ``ActivationRecorder`` -- forwards under ``torch.no_grad()``
    (acting, targets, probes) are ignored.  Build it once the model is on its
    device (its statistics live there), like the optimiser.

    ``random``: the streams of the fresh weights -- a ``MemberRandom`` with one stream per
    member (a population; member k draws from stream k), or a ``torch.Generator``/None
    for an ordinary model.  ``last_replaced[name]``: bool mask ``[M, units]`` of the
    units replaced in that layer at the last step (layers without replacements absent).
    ``replacements``: ``[M]`` device tensor, units replaced so far per member;
    ``total_replacements``: the same count on the host (per member).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, replacement_rate: float = 1e-4,
                 maturity: int = 100, decay: float = 0.99, utility: str = "contribution", random: Random = None):
        check_cbp_args(replacement_rate, maturity, decay, utility)
        check_random(model, random)
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
        first = weight_view(self.layers[0].layer)
        device, self.members = first.device, first.shape[0]
        # float32 statistics (bf16 activations under autocast accumulate in float32); float64 for a float64 model.
        self.dtype = torch.promote_types(first.dtype, torch.float32)
        self.random = random
        self.stats = [_UnitStatistics(self.members, hidden.num_units, device, self.dtype, hidden.halves)
                      for hidden in self.layers]
        # Layers whose outputs can be negative (DFF): mean_b |h| is not mean_b h there.
        self._signed = [not getattr(hidden.activation, "nonnegative", True) for hidden in self.layers]
        # |W^next| is written into a persistent buffer: a fresh multi-MB temporary every step costs page
        # faults on CPU (the Nature CNN's 3136x512 layer: 6.4 MB), more than the arithmetic.
        self._abs_buffers = [torch.empty_like(weight_param(hidden.next_layer), requires_grad=False)
                             for hidden in self.layers]
        self.steps = 0
        self.total_replacements = 0  # host count, per member
        self.replacements = torch.zeros(self.members, dtype=torch.long, device=device)  # per member, for logging
        self.last_replaced: dict[str, torch.Tensor] = {}

    def ages(self, index: int) -> torch.Tensor:
        """a_i ``[M, units]`` of hidden layer ``index`` (steps since the unit was created or last replaced)."""
        return self.steps - self.stats[index].birth

    def _bias_correction(self, index: int) -> torch.Tensor:
        return 1.0 - torch.pow(self.decay, self.ages(index))

    def _output_bias_correction(self, index: int) -> torch.Tensor:
        """``_bias_correction`` per output ``[M, halves·n]`` (both halves of a unit share its age)."""
        correction = self._bias_correction(index)
        halves = self.layers[index].halves
        return correction.repeat(1, halves) if halves > 1 else correction

    def _per_unit(self, index: int, per_output: torch.Tensor) -> torch.Tensor:
        """``[M, halves·n]`` -> ``[M, n]``: the two halves of each unit summed (identity for ReLU)."""
        halves = self.layers[index].halves
        return per_output.view(per_output.shape[0], halves, -1).sum(1) if halves > 1 else per_output

    # ------------------------------------------------------------------ per-step statistics
    def _outgoing_magnitude(self, index: int) -> torch.Tensor:
        """Σ_k |W^next_{k,i}| per member and output ``[M, outputs]`` (outputs = units, or 2·units with
        CReLU/DFF); after conv -> linear summed over the output channel's H·W columns too."""
        hidden = self.layers[index]
        next_layer = hidden.next_layer
        magnitude = as_weight_view(next_layer, torch.abs(weight_param(next_layer), out=self._abs_buffers[index]))
        if magnitude.ndim == 5:  # conv next layer [M, out, units, kh, kw]
            return magnitude.sum(dim=(1, 3, 4))
        # Sum over rows, then over each unit's spatial columns: ~3x faster on CPU than one strided reduction.
        per_column = magnitude.sum(1)  # [M, units * spatial]
        if hidden.spatial > 1:
            return per_column.view(self.members, hidden.num_outputs, hidden.spatial).sum(2)
        return per_column

    def _eligible_count(self, stats: _UnitStatistics, num_units: int) -> int:
        """|{i : a_i > m}| of every member from host bookkeeping, equal to ``(ages > m).sum(1)`` without a sync."""
        if self.steps <= self.maturity:
            return 0  # units never replaced have age == steps
        while stats.recent and stats.recent[0][0] < self.steps - self.maturity:
            stats.recent.popleft()
        return num_units - sum(count for _, count in stats.recent)

    @torch.no_grad()
    def step(self) -> None:
        """One generate-and-test step on every hidden layer (§5 steps 1-8), for every member at once."""
        missing = [hidden.name for hidden in self.layers if hidden.name not in self.recorder.post]
        if missing:
            raise ValueError(f"continual backprop has no activations for {', '.join(missing)}: call step() once "
                             "after each optimiser step, after a training forward pass with gradients enabled")
        self.steps += 1  # step 1: every age grows by one (ages = steps − birth)
        self.last_replaced = {}
        keep = 1.0 - self.decay
        activations = [self.recorder.post[hidden.name] for hidden in self.layers]  # [M, B, units...]
        self.recorder.post.clear()  # a second step() without a new training forward is an error, not a repeat
        # The recorder holds ReLU/CReLU outputs (≥ 0), so mean_b |h_bi| = mean_b h_bi: one reduction per layer
        # (over batch and H, W for a conv channel) feeds both f and the contribution utility.  DFF: a second.
        batch_means = [h.mean(dim=(1, 3, 4) if h.ndim == 5 else 1, dtype=self.dtype) for h in activations]
        outgoing = [self._outgoing_magnitude(index) for index in range(len(self.layers))]
        torch._foreach_lerp_([s.mean for s in self.stats], batch_means, keep)  # step 2
        if self.utility == "contribution":  # step 3
            abs_means = [h.abs().mean(dim=(1, 3, 4) if h.ndim == 5 else 1, dtype=self.dtype) if signed else mean
                         for h, mean, signed in zip(activations, batch_means, self._signed)]
            instant = [self._per_unit(i, y) for i, y in enumerate(torch._foreach_mul(abs_means, outgoing))]
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
            units, listed = self._select(index, count)  # step 7
            self._replace(hidden, stats, units, listed, stats.mean / self._output_bias_correction(index))  # step 8
            stats.recent.append((self.steps, count))
            self.total_replacements += count
            self.replacements += units.sum(1)
            self.last_replaced[hidden.name] = units

    def _select(self, index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool mask ``[M, units]``: per member, the ``count`` eligible units with the lowest û (§5 step 7);
        and the ``[M, count]`` indices of the lowest ranks (for drawing only ``count`` fresh rows).

        Ranks from a stable sort (ties go to the lower index); the mask is rank < count AND eligible.
        """
        stats = self.stats[index]
        ages = self.ages(index)
        eligible = ages > self.maturity
        score = torch.where(eligible, stats.utility / (1.0 - torch.pow(self.decay, ages)), math.inf)
        order = torch.sort(score, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, stats.positions)
        return (rank < count) & eligible, order[:, :count]

    def _adaptable_utility(self, index: int, activations: torch.Tensor, outgoing: torch.Tensor) -> torch.Tensor:
        """mean_b |h_bi − f̂_i| · Σ_k |W^next_{k,i}| / mean_j |W^in_{i,j}| (f̂ after this step's update); with
        CReLU/DFF the two halves' terms summed, each divided by the unit's one incoming mean."""
        unit_activations = activations.mean(dim=(3, 4)) if activations.ndim == 5 else activations  # [M, B, outputs]
        mean_hat = self.stats[index].mean / self._output_bias_correction(index)
        incoming = weight_view(self.layers[index].layer).flatten(2).abs().mean(2)  # [M, n]
        incoming = incoming.clamp_min(torch.finfo(incoming.dtype).tiny)  # an all-zero row: no division by 0
        halves = self.layers[index].halves
        if halves > 1:
            incoming = incoming.repeat(1, halves)
        return self._per_unit(index, (unit_activations - mean_hat.unsqueeze(1)).abs().mean(1) * outgoing / incoming)

    def _replace(self, hidden: HiddenLayer, stats: _UnitStatistics, units: torch.Tensor, listed: torch.Tensor,
                 mean_hat: torch.Tensor) -> None:
        """§5 step 8, in the spec's order: bias correction with f̂ first, then reset the units and their stats.

        ``units``: bool mask ``[M, n]`` (``listed``: its ``[M, count]`` indices); the correction sums over every
        unit with f̂ masked to the replaced ones, so each member corrects for its own units.  ``mean_hat`` is
        per output ``[M, halves·n]``: with CReLU/DFF both halves i and i + n carry their own f̂.
        """
        next_layer = hidden.next_layer
        weight = weight_view(next_layer).flatten(2)  # [M, out, inputs]: an output owns consecutive inputs
        outputs = units.repeat(1, hidden.halves) if hidden.halves > 1 else units  # [M, halves·n]
        # f̂ of the replaced outputs (0 elsewhere) on each of the output's inputs: its H·W columns after conv ->
        # linear, or its kh·kw kernel taps when the next layer is a conv (a constant input channel).
        carried = torch.where(outputs, mean_hat, 0.0).to(weight.dtype)
        carried = carried.repeat_interleave(weight.shape[2] // hidden.num_outputs, dim=1)
        bias_view(next_layer).add_(torch.bmm(weight, carried.unsqueeze(2)).squeeze(2))
        reinitialize_units_(hidden, units, self.optimizer, self.random, index=listed)
        stats.utility.masked_fill_(units, 0.0)
        stats.mean.masked_fill_(outputs, 0.0)
        stats.birth.masked_fill_(units, self.steps)  # age 0 now

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "total_replacements": self.total_replacements,
            "replacements": self.replacements.clone(),
            "layers": [{"utility": s.utility.clone(), "mean": s.mean.clone(), "birth": s.birth.clone(),
                        "accumulator": s.accumulator, "recent": [list(event) for event in s.recent]}
                       for s in self.stats],
        }

    def load_state_dict(self, state: dict) -> None:
        layers = state["layers"]
        if len(layers) != len(self.stats) or any(saved["birth"].shape != s.birth.shape or saved["mean"].shape != s.mean.shape
                                                 for saved, s in zip(layers, self.stats)):
            raise ValueError("CBP state does not match this model's hidden layers and members (a checkpoint of "
                             "another network?)")
        self.steps = int(state["steps"])
        self.total_replacements = int(state["total_replacements"])
        if "replacements" in state:
            self.replacements.copy_(state["replacements"])
        else:
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
                                self.cbp_decay, self.cbp_utility, parts.random)
        # Counted in place: a copy, so a logger holding it sees this step's value; [M], one count per member.
        return EveryUpdate("cbp", cbp, lambda: {"plasticity/cbp_replacements": cbp.replacements.clone()})
