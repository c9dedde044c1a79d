"""Hare & Tortoise (Lee et al., ICML 2024, arXiv 2406.02596; spec methods-v2.md §9).

The hare θ_H is the trained online network.  The tortoise θ_T is a no-grad copy (not in the
optimiser) that follows it slowly: after every gradient step, after the other post-step
rewrites (CBP, SWR/NaP, weight clipping),

    θ_T ← ρ·θ_T + (1 − ρ)·θ_H            (``torch._foreach_lerp_``)

and every N env steps (after learning starts; and at task switches when asked) the hare is
reset to the tortoise in place, θ_H ← θ_T, then the whole optimiser state is cleared when
``--hare-tortoise-reset-optimizer`` is on (§2 ``all``).

Target modes: ``network`` leaves the target to the loop's periodic copy of the hare;
``tortoise`` makes the tortoise *be* ``parts.target_model`` -- a Polyak target with
τ = 1 − ρ applied every gradient step (the loop then skips its hard syncs).

The EMA rate, the reset period, which network acts and is evaluated, the target mode and
the optimiser reset are our reading [U]: the official code was not read.

Populations: the EMA and the reset are elementwise over stacked parameters, so member k
does exactly what its single run does; the schedule is the same for every member.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from plasticity.flags import COUNT, UNIT_INTERVAL, ranged
from plasticity.intervention import Counter, Intervention, MethodFlags, Parts, SampleObs, Setting
from plasticity.population import members_of
from plasticity.resets import clear_optimizer_state_

ROLES = ("hare", "tortoise")
TARGET_MODES = ("network", "tortoise")
DEFAULT_EMA = 0.999
DEFAULT_RESET_EVERY = 20_000


def _crossed_after(previous: int, t: int, every: int, after: int) -> bool:
    """A multiple e of ``every`` in ``(previous, t]`` with ``e > after``."""
    if every <= 0:
        return False
    event = (t // every) * every
    return event > 0 and event > max(previous, after)


class HareTortoise(Intervention):
    """The method on ``parts``: EMA after every update, hare reset every ``reset_every`` env steps.

    ``tortoise``: the tortoise module (``parts.target_model`` in ``tortoise`` target mode, else a
    deep copy of the online model with ``requires_grad=False``).  ``model_for(role)`` gives the
    network that acts (``"act"``) or is evaluated (``"eval"``).
    """

    name, tag = "hare_tortoise", "plasticity/hare_resets"

    def __init__(self, parts: Parts, ema: float = DEFAULT_EMA, reset_every: int = DEFAULT_RESET_EVERY,
                 reset_at_task_switch: bool = False, act: str = "hare", target: str = "network",
                 evaluate: str = "tortoise", reset_optimizer: bool = True):
        UNIT_INTERVAL.check("hare-tortoise-ema", ema)
        for flag, value, choices in (("act", act, ROLES), ("target", target, TARGET_MODES),
                                     ("eval", evaluate, ROLES)):
            if value not in choices:
                raise ValueError(f"unknown --hare-tortoise-{flag} {value!r}; choose one of {', '.join(choices)}")
        model = parts.model
        self.model, self.optimizer = model, parts.optimizer
        self.ema, self.reset_every, self.reset_at_task_switch = float(ema), int(reset_every), reset_at_task_switch
        self.act, self.target, self.evaluate, self.reset_optimizer = act, target, evaluate, reset_optimizer
        self.learning_starts = parts.setting.learning_starts
        self.is_target = target == "tortoise"
        if self.is_target:
            if parts.target_model is None:
                raise ValueError("--hare-tortoise-target tortoise needs the target network (parts.target_model)")
            tortoise = parts.target_model
        else:
            tortoise = copy.deepcopy(model)
        tortoise.requires_grad_(False)
        for param in tortoise.parameters():
            param.grad = None  # a deep copy carries the hare's last gradient
        self.tortoise: nn.Module = tortoise
        self.hare_params = list(model.parameters())
        self.tortoise_params = list(tortoise.parameters())
        shapes = [p.shape for p in self.hare_params]
        if [p.shape for p in self.tortoise_params] != shapes:
            raise ValueError("the tortoise (target network) does not have the online network's parameters; pass the "
                             "target copy of the same network")
        if self.optimizer is not None:
            in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            if any(id(p) in in_optimizer for p in self.tortoise_params):
                raise ValueError("the tortoise's parameters are in the optimiser: it must be a copy the optimiser "
                                 "does not train")
        # R2: a frozen hare tensor is never rewritten by a hare reset.
        pairs = [(h, t) for h, t in zip(self.hare_params, self.tortoise_params) if h.requires_grad]
        self._reset_hare = [h for h, _ in pairs]
        self._reset_from = [t for _, t in pairs]
        with torch.no_grad():  # θ_T starts as a copy of θ_H
            torch._foreach_copy_(self.tortoise_params, self.hare_params)
        self.events = Counter(self.hare_params[0].device, members_of(model))

    # -- the rule --

    @torch.no_grad()
    def update_tortoise(self) -> None:
        """θ_T ← ρ·θ_T + (1 − ρ)·θ_H."""
        torch._foreach_lerp_(self.tortoise_params, self.hare_params, 1.0 - self.ema)

    @torch.no_grad()
    def reset_hare(self) -> None:
        """θ_H ← θ_T in place; the whole optimiser state cleared when ``reset_optimizer``."""
        torch._foreach_copy_(self._reset_hare, self._reset_from)
        if self.reset_optimizer:
            for param in self.hare_params:
                clear_optimizer_state_(self.optimizer, param)
        self.events.add()
        self.rewrote = True

    def model_for(self, role: str, online=None):
        """The network for ``role`` ("act" or "eval"): ``online`` (default: the hare) or the tortoise.

        ``online`` may be the hare module or a bound method of it (``q_network.q_values``): the
        tortoise's method of the same name is returned then.
        """
        if role not in ("act", "eval"):
            raise ValueError(f"model_for(role): role is 'act' or 'eval', not {role!r}")
        online = self.model if online is None else online
        choice = self.act if role == "act" else self.evaluate
        if choice == "hare":
            return online
        owner = getattr(online, "__self__", None)
        if owner is not None and owner is self.model:
            return getattr(self.tortoise, online.__name__)
        if online is not self.model:
            raise ValueError("model_for: online must be the hare (the online model) or a bound method of it")
        return self.tortoise

    # -- hooks --

    def after_update(self, previous: int, update: int, sample_obs: SampleObs | None) -> None:
        self.update_tortoise()

    def after_env_step(self, previous_t: int, t: int, synced: bool, sample_obs: SampleObs | None) -> None:
        if _crossed_after(previous_t, t, self.reset_every, self.learning_starts):
            self.reset_hare()

    def on_task_switch(self) -> None:
        if self.reset_at_task_switch:
            self.reset_hare()

    def scalars(self) -> dict[str, torch.Tensor]:
        return {self.tag: self.events.value()}

    def state_dict(self) -> dict:
        state = {"events": self.events.value()}
        if not self.is_target:  # in tortoise target mode the loop checkpoints the target network
            state["tortoise"] = [p.detach().clone() for p in self.tortoise_params]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.events.count.copy_(state["events"])
        if not self.is_target:
            if "tortoise" not in state or len(state["tortoise"]) != len(self.tortoise_params):
                raise ValueError("the checkpoint's Hare & Tortoise state has no tortoise of this network")
            with torch.no_grad():
                torch._foreach_copy_(self.tortoise_params, list(state["tortoise"]))


@dataclass
class HareTortoiseFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"hare_tortoise": "ht", "hare_tortoise_ema": "htema",
                                      "hare_tortoise_reset_every": "htreset", "hare_tortoise_target": "httarget"}

    hare_tortoise: bool = False
    """Hare & Tortoise (methods-v2 §9): an EMA tortoise of the online hare; the hare is reset to it periodically"""
    hare_tortoise_ema: float = ranged(DEFAULT_EMA, UNIT_INTERVAL)
    """H&T: tortoise EMA rate rho, theta_T <- rho*theta_T + (1-rho)*theta_H after every update (default ours [U])"""
    hare_tortoise_reset_every: int = ranged(DEFAULT_RESET_EVERY, COUNT)
    """H&T: reset the hare to the tortoise every this many env steps after learning starts; 0: never (default ours [U])"""
    hare_tortoise_reset_at_task_switch: bool = False
    """H&T: also reset the hare to the tortoise at every task switch"""
    hare_tortoise_act: Literal["hare", "tortoise"] = "hare"
    """H&T: the network that acts in the environment (default ours [U])"""
    hare_tortoise_target: Literal["network", "tortoise"] = "network"
    """H&T: network: the usual periodic target copy of the hare; tortoise: the tortoise is the target (Polyak, tau = 1-rho every update) [U]"""
    hare_tortoise_eval: Literal["hare", "tortoise"] = "tortoise"
    """H&T: the network evaluated (--eval-every episodes) (default ours [U])"""
    hare_tortoise_reset_optimizer: bool = True
    """H&T: clear the whole optimiser state at a hare reset (default ours [U])"""

    def check(self, setting: Setting) -> None:
        for flag, value, choices in (("act", self.hare_tortoise_act, ROLES),
                                     ("target", self.hare_tortoise_target, TARGET_MODES),
                                     ("eval", self.hare_tortoise_eval, ROLES)):
            if value not in choices:
                raise ValueError(f"unknown --hare-tortoise-{flag} {value!r}; choose one of {', '.join(choices)}")
        if not self.hare_tortoise:
            given = [flag for flag, value in (
                ("--hare-tortoise-ema", self.hare_tortoise_ema != DEFAULT_EMA),
                ("--hare-tortoise-reset-every", self.hare_tortoise_reset_every != DEFAULT_RESET_EVERY),
                ("--hare-tortoise-reset-at-task-switch", self.hare_tortoise_reset_at_task_switch),
                ("--hare-tortoise-act", self.hare_tortoise_act != "hare"),
                ("--hare-tortoise-target", self.hare_tortoise_target != "network"),
                ("--hare-tortoise-eval", self.hare_tortoise_eval != "tortoise"),
                ("--no-hare-tortoise-reset-optimizer", not self.hare_tortoise_reset_optimizer)) if value]
            if given:
                raise ValueError(f"{', '.join(given)} without --hare-tortoise")
            return
        if str(getattr(self, "reset_layers", "") or "").strip():
            raise ValueError("--hare-tortoise with --reset-layers: a hare reset would restore the pre-reset layers "
                             "from the tortoise")
        if self.hare_tortoise_reset_at_task_switch and not setting.task_switches:
            raise ValueError("--hare-tortoise-reset-at-task-switch: this run has no task switches (on Atari: no "
                             "--atari-shift)")

    def build(self, parts: Parts) -> HareTortoise | None:
        if not self.hare_tortoise:
            return None
        return HareTortoise(parts, self.hare_tortoise_ema, self.hare_tortoise_reset_every,
                            self.hare_tortoise_reset_at_task_switch, self.hare_tortoise_act, self.hare_tortoise_target,
                            self.hare_tortoise_eval, self.hare_tortoise_reset_optimizer)
