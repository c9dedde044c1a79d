"""Optimiser-state resets (methods-v2.md §2): ``--reset-optimizer {off,target-update,task-switch,every}``.

``reset_optimizer_state_(optimizer, which)`` zeroes, in place (``torch._foreach_zero_``), the state
``which`` names; the ``Parameter`` objects, the parameter groups and the LR schedule stay:

    which   Adam / AdamW / per-entry Adam   SGD              UPGD           Kron                 TRAC
    all     m = v = 0, k = 0                momentum = 0     U, m, v, k     reset_state_()       the base only
    m       m                               momentum = 0     m              error                the base only
    v       v                               error            v              error                the base only
    step    k                               error            k              error                the base only

``all`` is Asadi et al.'s reset (NeurIPS 2023: after every target sync), ``step`` is Adam-Rel
(Ellis et al.: the timestep back to 0, m and v kept); ``m`` and ``v`` are ablations.  Torch's Adam
keeps k as a tensor (on the parameter's device when fused or capturable); it is zeroed like the
moments.  A zeroed SGD momentum buffer gives b = g at the next step, exactly what a fresh one does
(dampening 0).  Kron's Q factors cannot be zeroed (the preconditioner would be singular): its own
``reset_state_()`` drops the per-tensor state so Q is rebuilt, and resets its schedule counters
(§2 table) [U].  TRAC: only the wrapped optimiser's state; θ_ref and TRAC's scalars stay [U].

``OptimizerReset`` is the ``Intervention``: ``target-update`` fires in ``after_env_step`` when the
target was just synced (event 3.2, right after the sync and before the next gradient step),
``task-switch`` in ``on_task_switch`` (3.7), ``every`` in ``end_env_step`` (3.8) when a multiple
of N env steps is crossed after learning starts.  It counts its resets per member on the device
(``optim/optimizer_resets``); every member resets on the same schedule (populations.md §1.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from plasticity.flags import COUNT, ranged
from plasticity.intervention import Counter, Intervention, MethodFlags, Parts, Setting, crossed
from plasticity.optimizers import AdamPerEntryStep, base_optimizer
from plasticity.population import members_of
from plasticity.upgd import UPGD

TRIGGERS = ("off", "target-update", "task-switch", "every")
STATES = ("all", "m", "v", "step")

_ADAM_KEYS = {"all": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"), "m": ("exp_avg",),
              "v": ("exp_avg_sq", "max_exp_avg_sq"), "step": ("step",)}
_SGD_KEYS = {"all": ("momentum_buffer",), "m": ("momentum_buffer",)}
_UPGD_KEYS = {"all": ("avg_utility", "first_moment", "sec_moment", "step"), "m": ("first_moment",),
              "v": ("sec_moment",), "step": ("step",)}


def _state_keys(optimizer: torch.optim.Optimizer, which: str) -> tuple[str, ...] | None:
    """The state entries ``which`` names for this optimiser; None: every entry (``all`` of an unknown one)."""
    if isinstance(optimizer, UPGD):
        table, kind = _UPGD_KEYS, "upgd"
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, AdamPerEntryStep)):
        table, kind = _ADAM_KEYS, "adam"
    elif isinstance(optimizer, torch.optim.SGD):
        table, kind = _SGD_KEYS, "sgd"
    else:
        if which != "all":
            raise ValueError(f"--reset-optimizer-state {which} is not defined for {type(optimizer).__name__}; "
                             "only a full reset (all) is")
        return None
    if which not in table:
        raise ValueError(f"--reset-optimizer-state {which} with --optimizer {kind}: it has no such state "
                         f"(choose one of {', '.join(table)})")
    return table[which]


@torch.no_grad()
def reset_optimizer_state_(optimizer: torch.optim.Optimizer | None, which: str = "all") -> None:
    """Zero the optimiser state ``which`` (all, m, v, step) of every tensor in place, no host sync (§2)."""
    if which not in STATES:
        raise ValueError(f"unknown --reset-optimizer-state {which!r}; choose one of {', '.join(STATES)}")
    optimizer = base_optimizer(optimizer)
    if optimizer is None:
        return
    if hasattr(optimizer, "reset_state_"):  # Kron: drop per-tensor state, Q is rebuilt at the next step
        if which != "all":
            raise ValueError(f"--reset-optimizer-state {which} with --optimizer kron: only a full state clear "
                             "(all) is defined")
        optimizer.reset_state_()
        return
    keys = _state_keys(optimizer, which)
    tensors: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for state in optimizer.state.values():
        for key in (state.keys() if keys is None else keys):
            value = state.get(key)
            if torch.is_tensor(value):
                tensors.setdefault((value.device, value.dtype), []).append(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                state[key] = type(value)(0)  # UPGD's host step count
    for group in tensors.values():
        torch._foreach_zero_(group)


class OptimizerReset(Intervention):
    """Reset the optimiser state ``which`` on ``trigger``; counts the resets (``optim/optimizer_resets``)."""

    name = "reset_optimizer"
    tag = "optim/optimizer_resets"

    def __init__(self, optimizer: torch.optim.Optimizer, trigger: str, which: str = "all", every: int = 0,
                 learning_starts: int = 0, device: torch.device | str = "cpu", members: int = 1):
        if trigger not in TRIGGERS[1:]:
            raise ValueError(f"unknown --reset-optimizer {trigger!r}; choose one of {', '.join(TRIGGERS)}")
        if which not in STATES:
            raise ValueError(f"unknown --reset-optimizer-state {which!r}; choose one of {', '.join(STATES)}")
        if trigger == "every" and every <= 0:
            raise ValueError("--reset-optimizer every needs --reset-optimizer-every N > 0 (env steps)")
        self.optimizer, self.trigger, self.which = optimizer, trigger, which
        self.every, self.learning_starts = int(every), int(learning_starts)
        self.resets = Counter(torch.device(device), members)

    def reset(self) -> None:
        reset_optimizer_state_(self.optimizer, self.which)
        self.resets.add()

    def after_env_step(self, previous_t, t, synced, sample_obs) -> None:
        # Syncs happen only after learning starts in the agents; the guard keeps "none before learning starts".
        if self.trigger == "target-update" and synced and t > self.learning_starts:
            self.reset()

    def on_task_switch(self) -> None:
        if self.trigger == "task-switch":
            self.reset()

    def end_env_step(self, previous_t, t) -> None:
        if self.trigger == "every" and t > self.learning_starts and crossed(previous_t, t, self.every):
            self.reset()

    def scalars(self) -> dict[str, torch.Tensor]:
        return {self.tag: self.resets.value()}

    def state_dict(self) -> dict:
        return {"resets": self.resets.value()}

    def load_state_dict(self, state: dict) -> None:
        self.resets.count.copy_(state["resets"])


@dataclass
class ResetOptimizerFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"reset_optimizer": "resetopt", "reset_optimizer_every": "resetoptevery",
                                      "reset_optimizer_state": "resetoptstate"}

    reset_optimizer: Literal["off", "target-update", "task-switch", "every"] = "off"
    """reset the optimiser state: after every target sync, at task switches, or every --reset-optimizer-every env steps"""
    reset_optimizer_every: int = ranged(0, COUNT)
    """--reset-optimizer every: the period in env steps (fires after learning starts)"""
    reset_optimizer_state: Literal["all", "m", "v", "step"] = "all"
    """what --reset-optimizer zeroes: all (m, v and step count), m, v, or step (Adam-Rel: the step count only)"""

    def check(self, setting: Setting) -> None:
        trigger, which = self.reset_optimizer, self.reset_optimizer_state
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown --reset-optimizer {trigger!r}; choose one of {', '.join(TRIGGERS)}")
        if which not in STATES:
            raise ValueError(f"unknown --reset-optimizer-state {which!r}; choose one of {', '.join(STATES)}")
        if self.reset_optimizer_every > 0 and trigger != "every":
            raise ValueError(f"--reset-optimizer-every {self.reset_optimizer_every} needs --reset-optimizer every")
        if trigger == "every" and self.reset_optimizer_every == 0:
            raise ValueError("--reset-optimizer every needs --reset-optimizer-every N > 0 (env steps)")
        if trigger == "off" and which != "all":
            raise ValueError(f"--reset-optimizer-state {which} needs --reset-optimizer (target-update, "
                             "task-switch or every)")
        if trigger == "task-switch" and not setting.task_switches:
            raise ValueError("--reset-optimizer task-switch: this run has no task switches (on Atari: no "
                             "--atari-shift); use target-update or every")
        optimizer = getattr(self, "optimizer", "adam")
        if trigger != "off" and optimizer == "sgd" and which in ("v", "step"):
            raise ValueError(f"--reset-optimizer-state {which} with --optimizer sgd: SGD has no such state "
                             "(all or m zero its momentum)")
        if trigger != "off" and optimizer == "kron" and which != "all":
            raise ValueError(f"--reset-optimizer-state {which} with --optimizer kron: only a full state clear "
                             "(all) is defined")
        if trigger == "target-update" and getattr(self, "hare_tortoise_target", None) == "tortoise":
            raise ValueError("--reset-optimizer target-update with --hare-tortoise-target tortoise: the tortoise "
                             "target has no discrete syncs")

    def build(self, parts: Parts) -> OptimizerReset | None:
        if self.reset_optimizer == "off":
            return None
        if parts.optimizer is None:
            raise ValueError(f"--reset-optimizer {self.reset_optimizer} needs the optimiser (Parts.optimizer)")
        device = next(parts.model.parameters()).device
        return OptimizerReset(parts.optimizer, self.reset_optimizer, self.reset_optimizer_state,
                              self.reset_optimizer_every, parts.setting.learning_starts, device,
                              members_of(parts.model))
