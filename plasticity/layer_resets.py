"""Layer resets (spec methods-v2.md §4): primacy-bias resets (Nikishin et al. 2022) and BBF's shrink-and-perturb
resets (Schwarzer et al. 2023), and the head reset of methods.md §8 as their ``last:1`` case.

At a reset event every *reset* layer gets a fresh draw of its own initialiser (PyTorch's
default for Linear/Conv, LayerNorm γ = 1, β = 0); with ``--reset-shrink s --reset-perturb p``
every *other* layer becomes θ ← s·θ + p·θ_fresh with a fresh draw at every event.  Then the
target copies the new online values of those layers (``--reset-target copy``) or is left
alone (``keep``), and the optimiser state is cleared for every parameter (``--reset-optimizer-scope
all``, as BBF's and the primacy-bias code's ``optimizer.init``) or only for the touched ones
(``touched``, the head reset's scope).

Layers.  A "layer" is a Linear/Conv2d (member or ordinary) in forward order
(``layer_map(model).ordered``), named by its module name (``torso.0``, ``1``), and it carries
the LayerNorm(s) that follow it before the next Linear/Conv2d.  ``last:K`` is the K layers
nearest the output, ``all`` every layer, or a comma list of names.

Populations (populations.md §5): one schedule for all members; member k's fresh values come
from member k's stream of ``parts.random`` (a ``MemberRandom``), drawn per layer in forward
order, weight then bias (the draws ``networks.reinit_`` makes); the whole-tensor optimiser
clear applies to every member at the same event, as in each member's single run.  No loop over
members, no host sync (schedules are Python ints).

Rule R2: a parameter with ``requires_grad=False`` (a frozen injection head) is never rewritten.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from plasticity.flags import COUNT, UNIT_INTERVAL, ranged
from plasticity.intervention import MethodFlags, Parts, Setting
from plasticity.networks import fresh_weights, layer_map
from plasticity.population import NORM_LAYERS, WEIGHT_LAYERS, bias_view, weight_param, weight_view
from plasticity.resets import CountedEvent, Random, check_random, clear_optimizer_state_, fresh_bias

RESET_TARGETS = ("copy", "keep")
RESET_SCOPES = ("all", "touched")
_LAST = re.compile(r"last:(\d+)")


# ---- layers ----

@dataclass(eq=False)
class LayerGroup:
    """One Linear/Conv2d (``name``, ``layer``) and the LayerNorms that follow it before the next one (``norms``:
    (name, module) pairs)."""

    name: str
    layer: nn.Module
    norms: list[tuple[str, nn.Module]] = field(default_factory=list)

    def modules(self) -> list[tuple[str, nn.Module]]:
        return [(self.name, self.layer), *self.norms]

    def parameters(self) -> list[torch.Tensor]:
        params = [weight_param(self.layer), self.layer.bias]
        for _, norm in self.norms:
            params += [getattr(norm, "weight", None), getattr(norm, "bias", None)]
        return [p for p in params if p is not None]


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The model's Linear/Conv2d layers in forward order (``layer_map(model).ordered``), each with the LayerNorms
    after it.  A LayerNorm before the first Linear/Conv2d (an input norm) joins the first layer."""
    groups: list[LayerGroup] = []
    leading: list[tuple[str, nn.Module]] = []
    for name, module in layer_map(model).ordered:
        if isinstance(module, WEIGHT_LAYERS):
            groups.append(LayerGroup(name, module, leading))
            leading = []
        elif isinstance(module, NORM_LAYERS):
            (groups[-1].norms if groups else leading).append((name, module))
    return groups


def parse_reset_layers(spec: str) -> tuple[str, int | list[str]]:
    """``last:K`` -> ("last", K); ``all`` -> ("all", 0); ``a,b`` -> ("names", ["a", "b"]).  ValueError on bad syntax."""
    spec = spec.strip()
    if spec == "all":
        return "all", 0
    match = _LAST.fullmatch(spec)
    if match:
        k = int(match.group(1))
        if k < 1:
            raise ValueError(f"--reset-layers {spec}: K in last:K must be >= 1")
        return "last", k
    if spec.startswith("last"):
        raise ValueError(f"--reset-layers {spec!r}: write last:K with an integer K >= 1 (e.g. last:2)")
    names = [name.strip() for name in spec.split(",")]
    if not spec or any(not name for name in names) or any(" " in name for name in names):
        raise ValueError(f"--reset-layers {spec!r}: give last:K, all, or a comma list of layer names "
                         "(e.g. torso.0,torso.3)")
    if len(set(names)) != len(names):
        raise ValueError(f"--reset-layers {spec!r} names a layer twice")
    return "names", names


def select_layers(model: nn.Module, spec: str) -> list[bool]:
    """For each of ``layer_groups(model)``, whether ``spec`` resets it; ValueError naming the valid layers."""
    groups = layer_groups(model)
    valid = ", ".join(group.name for group in groups)
    kind, value = parse_reset_layers(spec)
    if kind == "all":
        return [True] * len(groups)
    if kind == "last":
        if value > len(groups):
            raise ValueError(f"--reset-layers last:{value}: this network has {len(groups)} layers ({valid})")
        return [i >= len(groups) - value for i in range(len(groups))]
    names = {group.name for group in groups}
    unknown = [name for name in value if name not in names]
    if unknown:
        norms = {norm_name: group.name for group in groups for norm_name, _ in group.norms}
        hint = "".join(f"; {name} is a LayerNorm, reset with its layer {norms[name]}" for name in unknown
                       if name in norms)
        raise ValueError(f"--reset-layers: no layer named {', '.join(unknown)} in this network; the layers are "
                         f"{valid}{hint}")
    return [group.name in value for group in groups]


# ---- the rewrite ----

def _trainable(param: torch.Tensor | None) -> bool:
    return param is not None and param.requires_grad


@torch.no_grad()
def redraw_group_(group: LayerGroup, random: Random, shrink: float | None = None,
                  perturb: float | None = None) -> None:
    """Fresh draw of the group (``shrink`` None), or θ ← shrink·θ + perturb·θ_fresh, in place.

    θ_fresh: the layer's own initialiser (weight, then bias: ``networks.reinit_``'s draws, member
    k from stream k of ``random``); LayerNorm γ_fresh = 1, β_fresh = 0.  Frozen tensors are skipped (R2).
    """
    layer = group.layer
    fresh = fresh_weights(layer, random)
    if _trainable(weight_param(layer)):
        view = weight_view(layer)
        if shrink is None:
            view.copy_(fresh)
        else:
            view.mul_(shrink).add_(fresh.mul_(perturb))
    if layer.bias is not None:
        fresh_b = fresh_bias(layer, random)
        if _trainable(layer.bias):
            bias = bias_view(layer)
            if shrink is None:
                bias.copy_(fresh_b)
            else:
                bias.mul_(shrink).add_(fresh_b.mul_(perturb))
    for _, norm in group.norms:
        gamma, beta = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if _trainable(gamma):
            if shrink is None:
                gamma.fill_(1.0)
            else:
                gamma.mul_(shrink).add_(perturb)
        if _trainable(beta):
            if shrink is None:
                beta.zero_()
            else:
                beta.mul_(shrink)


class LayerReset(CountedEvent):
    """§4 layer resets on ``parts``: re-draw the ``reset`` layers, S&P the others (when ``shrink``/``perturb``).

    Schedule: every ``every`` env steps (``after_env_step``) or every ``every_updates`` gradient
    steps (``after_update``), at ``offset + k·N`` (k ≥ 1); env-step events only when the event
    step is > ``learning_starts`` and ``event + N <= no_resets_after`` (when that is set); and at
    task switches when ``at_task_switch``.  ``reset()`` applies one event now.
    """

    def __init__(self, parts: Parts, spec: str, every: int = 0, every_updates: int = 0, offset: int = 0,
                 at_task_switch: bool = False, no_resets_after: int | None = None, shrink: float | None = None,
                 perturb: float | None = None, target: str = "copy", optimizer_scope: str = "all",
                 name: str = "layer_resets", tag: str = "plasticity/layer_resets"):
        super().__init__(parts.model)
        check_random(parts.model, parts.random)
        if (shrink is None) != (perturb is None):
            raise ValueError("--reset-shrink and --reset-perturb go together (S&P of the layers not reset)")
        if target not in RESET_TARGETS:
            raise ValueError(f"unknown --reset-target {target!r}; choose one of {', '.join(RESET_TARGETS)}")
        if optimizer_scope not in RESET_SCOPES:
            raise ValueError(f"unknown --reset-optimizer-scope {optimizer_scope!r}; choose one of "
                             f"{', '.join(RESET_SCOPES)}")
        self.name, self.tag = name, tag
        self.parts = parts
        self.every, self.every_updates, self.offset = int(every), int(every_updates), int(offset)
        self.at_task_switch = at_task_switch
        self.no_resets_after = int(no_resets_after) if no_resets_after else None
        self.learning_starts = parts.setting.learning_starts
        self.shrink, self.perturb = shrink, perturb
        self.groups = layer_groups(parts.model)
        self.reset_mask = select_layers(parts.model, spec)
        snp = shrink is not None
        if snp and all(self.reset_mask):
            raise ValueError(f"--reset-shrink/--reset-perturb with --reset-layers {spec}: every layer is reset, "
                             "none is left to shrink and perturb")
        touched = [g for g, reset in zip(self.groups, self.reset_mask) if reset or snp]
        self.touched_params = [p for g in touched for p in g.parameters()]
        self.all_params = list(parts.model.parameters())
        self.optimizer_params = self.all_params if optimizer_scope == "all" else self.touched_params
        self.target_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if target == "copy" and parts.target_model is not None:
            self.target_pairs = _target_pairs(parts.target_model, touched)

    # -- the event --

    @torch.no_grad()
    def reset(self) -> None:
        """One reset event now (whatever the schedule)."""
        random = self.parts.random
        for group, reset in zip(self.groups, self.reset_mask):
            if reset:
                redraw_group_(group, random)
            elif self.shrink is not None:
                redraw_group_(group, random, self.shrink, self.perturb)
        if self.target_pairs:
            targets, onlines = zip(*self.target_pairs)
            torch._foreach_copy_(list(targets), list(onlines))
        for param in self.optimizer_params:
            clear_optimizer_state_(self.parts.optimizer, param)
        self.events.add()
        self.rewrote = True

    # -- the schedule --

    def after_update(self, previous: int, update: int, sample_obs) -> None:
        if self.every_updates > 0 and due(previous, update, self.every_updates, self.offset):
            self.reset()

    def after_env_step(self, previous_t: int, t: int, synced: bool, sample_obs) -> None:
        if self.every > 0 and due(previous_t, t, self.every, self.offset, self.learning_starts, self.no_resets_after):
            self.reset()

    def on_task_switch(self) -> None:
        if self.at_task_switch:
            self.reset()


def due(previous: int, step: int, every: int, offset: int = 0, after: int = 0, until: int | None = None) -> bool:
    """True when an event ``e = offset + k·every`` (k ≥ 1) lies in ``(previous, step]`` with ``e > after`` and, when
    ``until`` is set, ``e + every <= until`` (a full interval remains).  Several events in one call count once."""
    if every <= 0:
        return False
    last = step if not until else min(step, until - every)
    k = (last - offset) // every
    return k >= 1 and offset + k * every > max(previous, after)


def _target_pairs(target: nn.Module, groups: Iterable[LayerGroup]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target parameter, online parameter) for every parameter of ``groups``, matched by module name."""
    modules = dict(target.named_modules())
    pairs = []
    for group in groups:
        for name, module in group.modules():
            other = modules.get(name)
            if other is None or type(other) is not type(module):
                raise ValueError(f"--reset-target copy: the target network has no layer {name} like the online one; "
                                 "pass the target copy of the same network")
            for attr in ("weight", "bias"):
                online, copy = getattr(module, attr, None), getattr(other, attr, None)
                if online is None:
                    continue
                if copy is None or copy.shape != online.shape:
                    raise ValueError(f"--reset-target copy: target {name}.{attr} does not match the online one "
                                     f"{tuple(online.shape)}; pass the target copy of the same network")
                pairs.append((copy, online))
    return pairs


# ---- flags ----

@dataclass
class LayerResetFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"reset_layers": "resetlayers", "reset_every": "resetevery",
                                      "reset_every_updates": "resetupd", "reset_at_task_switch": "resetswitch",
                                      "reset_shrink": "resetshrink", "reset_perturb": "resetperturb"}

    reset_layers: str = ""
    """layer resets (methods-v2 §4): last:K, all, or a comma list of layer names (e.g. torso.0,torso.3); empty: off"""
    reset_every: int = ranged(0, COUNT)
    """layer resets every this many env steps (after learning starts); 0: no periodic resets in env steps"""
    reset_every_updates: int = ranged(0, COUNT)
    """layer resets every this many gradient steps instead; 0: off"""
    reset_offset: int = ranged(0, COUNT)
    """layer resets happen at offset + k*N (k >= 1), in the unit of the period"""
    reset_at_task_switch: bool = False
    """layer resets also at every task switch"""
    no_resets_after: int | None = ranged(None, COUNT, optional=True)
    """env steps T_end: a periodic reset at t happens only if t + N <= T_end (BBF's no_resets_after); 0/None: never stop"""
    reset_shrink: float | None = ranged(None, UNIT_INTERVAL, optional=True)
    """shrink s of the layers NOT reset, theta <- s*theta + p*fresh (BBF: 0.5; give with --reset-perturb); default: untouched"""
    reset_perturb: float | None = ranged(None, UNIT_INTERVAL, optional=True)
    """perturb p of the layers NOT reset (BBF: 0.5; give with --reset-shrink)"""
    reset_target: Literal["copy", "keep"] = "copy"
    """copy: the target takes the reset and S&P-ed layers' new online values [U]; keep: target untouched until its sync"""
    reset_optimizer_scope: Literal["all", "touched"] = "all"
    """optimiser state cleared at a layer reset: all (every parameter, as BBF) or touched (reset and S&P-ed layers)"""

    def check(self, setting: Setting) -> None:
        on = bool(self.reset_layers.strip())
        schedule = self.reset_every > 0 or self.reset_every_updates > 0 or self.reset_at_task_switch
        given = [flag for flag, value in (
            ("--reset-every", self.reset_every > 0), ("--reset-every-updates", self.reset_every_updates > 0),
            ("--reset-offset", self.reset_offset > 0), ("--reset-at-task-switch", self.reset_at_task_switch),
            ("--no-resets-after", bool(self.no_resets_after)), ("--reset-shrink", self.reset_shrink is not None),
            ("--reset-perturb", self.reset_perturb is not None), ("--reset-target", self.reset_target != "copy"),
            ("--reset-optimizer-scope", self.reset_optimizer_scope != "all")) if value]
        if not on:
            if given:
                raise ValueError(f"{', '.join(given)} without --reset-layers: say which layers to reset "
                                 "(last:K, all, or layer names)")
            return
        kind, _ = parse_reset_layers(self.reset_layers)
        if getattr(self, "reset_head_every", 0):
            raise ValueError("--reset-head-every with --reset-layers: duplicate schedule (--reset-head-every N is "
                             "--reset-layers last:1 --reset-every-updates N --reset-optimizer-scope touched)")
        if self.reset_every > 0 and self.reset_every_updates > 0:
            raise ValueError("--reset-every and --reset-every-updates: duplicate schedule; give one period "
                             "(env steps or gradient steps)")
        if not schedule:
            raise ValueError(f"--reset-layers {self.reset_layers} without a schedule: give --reset-every N (env "
                             "steps), --reset-every-updates U (gradient steps) or --reset-at-task-switch")
        if self.reset_at_task_switch and not setting.task_switches:
            raise ValueError("--reset-at-task-switch: this run has no task switches (on Atari: no --atari-shift)")
        if self.reset_offset > 0 and not (self.reset_every > 0 or self.reset_every_updates > 0):
            raise ValueError("--reset-offset shifts a periodic schedule: give --reset-every or --reset-every-updates")
        if self.no_resets_after and self.reset_every == 0:
            raise ValueError("--no-resets-after counts env steps and ends the --reset-every schedule: give "
                             "--reset-every N (it does not apply to --reset-every-updates or task-switch resets)")
        if (self.reset_shrink is None) != (self.reset_perturb is None):
            raise ValueError("--reset-shrink and --reset-perturb go together: shrink alone only scales the weights "
                             "down, perturb alone only adds noise (BBF uses 0.5 and 0.5)")
        if self.reset_shrink is not None and kind == "all":
            raise ValueError("--reset-shrink/--reset-perturb with --reset-layers all: every layer is reset, none is "
                             "left to shrink and perturb")
        if self.reset_target not in RESET_TARGETS:
            raise ValueError(f"unknown --reset-target {self.reset_target!r}; choose one of {', '.join(RESET_TARGETS)}")
        if self.reset_optimizer_scope not in RESET_SCOPES:
            raise ValueError(f"unknown --reset-optimizer-scope {self.reset_optimizer_scope!r}; choose one of "
                             f"{', '.join(RESET_SCOPES)}")

    def build(self, parts: Parts) -> LayerReset | None:
        if not self.reset_layers.strip():
            return None
        return LayerReset(parts, self.reset_layers, every=self.reset_every, every_updates=self.reset_every_updates,
                          offset=self.reset_offset, at_task_switch=self.reset_at_task_switch,
                          no_resets_after=self.no_resets_after, shrink=self.reset_shrink, perturb=self.reset_perturb,
                          target=self.reset_target, optimizer_scope=self.reset_optimizer_scope)


def head_reset(parts: Parts, every_updates: int) -> LayerReset:
    """methods.md §8's ``--reset-head-every N`` (updates; −1: at task switches) as the §4 ``last:1`` case:
    ``--reset-layers last:1 --reset-every-updates N --reset-optimizer-scope touched``, target copy.
    Name ``reset_head``, scalar ``plasticity/head_resets`` (as before)."""
    at_switch = every_updates < 0
    return LayerReset(parts, "last:1", every_updates=0 if at_switch else every_updates, at_task_switch=at_switch,
                      target="copy", optimizer_scope="touched", name="reset_head", tag="plasticity/head_resets")
