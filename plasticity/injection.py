"""Plasticity injection (Nikishin et al. 2023; spec methods-v2.md §5).

    Q(x) = h_θ(φ(x)) + h_θ'1(φ(x)) − h_θ'2(φ(x))

Before injection Q = h_θ(φ(x)).  At an injection, in place (rule R1): θ'1 ← a fresh draw of
the head's own initialiser (member k from its stream of ``parts.random``, ``networks.reinit_``;
LayerNorm γ = 1, β = 0), θ'2 ← a copy of θ'1, and θ, θ'2 get ``requires_grad=False``; φ and
θ'1 keep training.  h_θ'1 − h_θ'2 is then exactly 0 (the same tensors through the same
operations), so Q is bitwise unchanged (5.1).

The head (``--plasticity-injection-head``):

- ``last:1``: the output layer; φ is the whole torso.
- ``last:2`` (default): the torso's last hidden block (Linear -> LN/Identity -> activation) and
  the output layer (timoklein's ``Linear(3136,512)-ReLU-Linear(512,A)`` on the Nature CNN);
  φ is the torso without that block.

Gradients into φ (``--plasticity-injection-frozen-grad``): ``through`` (default) lets them flow
through all three heads, so at the injection step they add up to the pre-injection gradient
(5.4); ``detach`` stop-gradients the output of h_θ'2 (Plasticine's ``self.new_b(x).detach()``).

Allocation (``InjectionHeads``).  The copies θ'1, θ'2 are made when the Q-network is built
(``copy.deepcopy`` of the head's modules, then zeroed: no initial draw, so every other initial
weight is bit-identical to a run without injection), so they are in the optimiser from the
start.  Until their injection they have ``requires_grad=False`` and are not in the forward:
their grad stays None, so the optimiser skips them (no moments, no decay) and no penalty
(L2, C-CHAIN) reaches them; at their injection θ'1 gets ``requires_grad=True`` and has no
optimiser state (asserted).  The number of trainable parameters is unchanged (5.2).

Several injections [U] (``--plasticity-injection-at T1 T2 ...``, or at every task switch): the
architecture is fixed at construction, so the network holds one pair (θ'1, θ'2) per planned
injection (``planned_injections``); injection k freezes everything trained so far in the head
(θ and the earlier θ'1s) and injects pair k.  Q = h_θ + Σ_k (h_θ'1_k − h_θ'2_k); each new
difference is exactly 0, so 5.1 holds at every injection.  With ``detach`` every θ'2_k is
stop-gradiented.  Memory and forward cost grow by one pair per planned injection.

Layer maps and the other methods (R2).  The copies are invisible to ``networks.layer_map``
(``InjectionHeads.layer_map_hidden``): every method and diagnostic keeps seeing the original
network, the frozen original head θ included, so hidden-layer names, SWR's layer list, CBP's
and ReDo's hidden layers and per-layer curves are those of a run without injection.  Frozen
tensors are never rewritten (R2): a method that rewrites parameters must skip tensors with
``requires_grad=False`` (``frozen``).  Which combinations are errors is listed in the report
to the lead (CBP/ReDo replace units whose outgoing weights are the frozen θ).

The target network holds its own pre-allocated copies: at an injection they receive θ'1 and
θ'2 and the same tensors are frozen there; its output is unchanged (its two new heads are
equal).  Later target syncs (``load_state_dict``) copy everything.

State: the number of injections done (which pairs are in the forward, which tensors are
frozen) and their env steps; the weights are in the model's ``state_dict`` (fixed architecture).
Whoever loads a model's weights without the intervention (``scripts/evaluate.py``) restores the
count with ``restore_injected_`` (it reads the weights once: a frozen θ'2 is never zero).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from plasticity.flags import POSITIVE_COUNT, ranged
from plasticity.intervention import Counter, Intervention, MethodFlags, Parts, SampleObs, Setting
from plasticity.networks import reinit_, torso_autocast, torso_dtype
from plasticity.population import NORM_LAYERS, WEIGHT_LAYERS, members_of

INJECTION_HEADS = ("last:1", "last:2")
FROZEN_GRADS = ("through", "detach")
#: the attribute ``networks.layer_map`` reads: a module carrying it True is left out, with all it holds
LAYER_MAP_HIDDEN = "layer_map_hidden"


def frozen(param: torch.Tensor | None) -> bool:
    """True for a tensor no rewrite may touch (R2): a frozen injection head."""
    return param is not None and not param.requires_grad


def planned_injections(args) -> int:
    """How many injections ``args`` asks for: the listed steps, plus one per task switch before
    ``total_timesteps`` with ``--plasticity-injection-at-task-switch`` (an upper bound: the image MDP
    switches every ``--shift-every`` env steps, shifted Atari every ``--switch-every``)."""
    count = len(getattr(args, "plasticity_injection_at", None) or [])
    if getattr(args, "plasticity_injection_at_task_switch", False):
        total = int(getattr(args, "total_timesteps", 0) or 0)
        if str(getattr(args, "env_id", "")).startswith("ImageMDP/"):
            every = int(getattr(args, "shift_every", 0) or 0)
        else:
            every = int(getattr(args, "switch_every", 0) or 0) if getattr(args, "atari_shift", None) else 0
        count += total // every if every > 0 else 0
    return count


class InjectionHeads(nn.Module):
    """The pre-allocated head copies of one Q-network: ``pairs[k] = (θ'1_k, θ'2_k)``, each an
    ``nn.Sequential`` of copies of the head's modules (``last:2``: the torso's last block, then
    the output layer; ``last:1``: the output layer).

    ``forward(torso, head, x)`` computes the Q-network's output from scaled inputs ``x [M, B, ...]``
    with the ``injected`` pairs in use (0: ``head(torso(x))``, exactly the network without
    injection).  ``torso``/``head`` are passed in, not held, so they are registered (and saved) once.
    """

    layer_map_hidden = True

    def __init__(self, torso: nn.Sequential, head: nn.Module, which: str = "last:2", pairs: int = 1,
                 frozen_grad: str = "through"):
        super().__init__()
        if which not in INJECTION_HEADS:
            raise ValueError(f"unknown --plasticity-injection-head {which!r}; choose one of "
                             f"{', '.join(INJECTION_HEADS)}")
        if frozen_grad not in FROZEN_GRADS:
            raise ValueError(f"unknown --plasticity-injection-frozen-grad {frozen_grad!r}; choose one of "
                             f"{', '.join(FROZEN_GRADS)}")
        if pairs < 1:
            raise ValueError(f"InjectionHeads needs at least one pair of heads; got pairs={pairs}")
        modules = list(torso)
        if which == "last:2":
            weights = [i for i, module in enumerate(modules) if isinstance(module, WEIGHT_LAYERS)]
            if not weights or len(modules) - weights[-1] != 3:
                raise ValueError("--plasticity-injection-head last:2 needs a torso ending with a block "
                                 "Linear/Conv -> LayerNorm/Identity -> activation")
            self.start = weights[-1]
        else:
            self.start = len(modules)
        template = [*modules[self.start:], head]
        self.pairs = nn.ModuleList(nn.ModuleList(self._copy(template) for _ in range(2)) for _ in range(pairs))
        with torch.no_grad():
            for param in self.parameters():
                param.zero_()
                param.requires_grad_(False)
        self.which, self.detach = which, frozen_grad == "detach"
        self.injected = 0  # pairs in the forward (a Python int: no host sync in forward)

    @staticmethod
    def _copy(modules: list[nn.Module]) -> nn.Sequential:
        copies = []
        for module in modules:
            duplicate = copy.deepcopy(module)  # no draw: the generators are not consumed
            duplicate.__dict__.pop("_one_member_views", None)  # the original's cached views (population.py)
            copies.append(duplicate)
        return nn.Sequential(*copies)

    def original(self, torso: nn.Sequential, head: nn.Module) -> list[nn.Module]:
        """The modules of θ: the torso's last block (``last:2``) and the output layer."""
        return [*list(torso)[self.start:], head]

    def forward(self, torso: nn.Sequential, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        active = self.injected
        if active == 0:
            return head(torso(x))
        # φ and the blocks run as Torso.forward runs its layers: on [B, ...] for one member (the member
        # dim comes back at the features), under the torso's autocast (--bf16), features cast to float32.
        modules = list(torso)
        one = torso.members == 1
        h = x.squeeze(0) if one else x
        dtype = torso_dtype()
        heads = [(self.original(torso, head), False)]
        for a, b in list(self.pairs)[:active]:
            heads += [(list(a), False), (list(b), self.detach)]
        with torso_autocast(h.device.type):
            for module in modules[:self.start]:
                h = module(h)
            features = []
            for head_modules, _ in heads:
                f = h
                for module in head_modules[:-1]:
                    f = module(f)
                f = f.float() if dtype is not None else f
                features.append(f.unsqueeze(0) if one else f)
        outputs = [head_modules[-1](f) for (head_modules, _), f in zip(heads, features)]
        out = outputs[0]
        for k in range(active):
            a_out, b_out = outputs[1 + 2 * k], outputs[2 + 2 * k]
            out = out + (a_out - (b_out.detach() if heads[2 + 2 * k][1] else b_out))  # h_a − h_b first: exact 0
        return out

    def set_injected_(self, torso: nn.Sequential, head: nn.Module, count: int) -> None:
        """Use the first ``count`` pairs, and set which tensors train: after ``count`` ≥ 1 injections only the
        last θ'1 of the head trains (θ, earlier θ'1s and every θ'2 are frozen); ``count`` = 0: θ trains."""
        if not 0 <= count <= len(self.pairs):
            raise ValueError(f"{count} injections, but the network holds {len(self.pairs)} pairs of heads "
                             "(one per planned injection: --plasticity-injection-at / -at-task-switch)")
        self.injected = count
        for module in self.original(torso, head):
            for param in module.parameters():
                param.requires_grad_(count == 0)
        for k, (a, b) in enumerate(self.pairs):
            for param in a.parameters():
                param.requires_grad_(k == count - 1)
            for param in b.parameters():
                param.requires_grad_(False)


def injection_heads(torso: nn.Sequential, head: nn.Module, args) -> InjectionHeads | None:
    """The Q-networks' hook: the head copies ``args`` asks for (None when injection is off)."""
    pairs = planned_injections(args)
    if pairs == 0:
        return None
    return InjectionHeads(torso, head, getattr(args, "plasticity_injection_head", "last:2"), pairs,
                          getattr(args, "plasticity_injection_frozen_grad", "through"))


def heads_of(model: nn.Module) -> InjectionHeads | None:
    """The ``InjectionHeads`` of a Q-network (``model.injection``), or None."""
    heads = getattr(model, "injection", None)
    return heads if isinstance(heads, InjectionHeads) else None


def _parts_of(model: nn.Module) -> tuple[InjectionHeads, nn.Sequential, nn.Module]:
    heads = heads_of(model)
    if heads is None:
        raise ValueError("plasticity injection needs a Q-network built with the injection flags (its "
                         "`injection` holds the pre-allocated heads: plasticity.injection.injection_heads)")
    return heads, model.torso, model.head


def set_injected_(model: nn.Module, count: int) -> None:
    """``count`` injections in ``model``'s forward, and the matching ``requires_grad`` flags (no weight changes)."""
    heads, torso, head = _parts_of(model)
    heads.set_injected_(torso, head, count)


@torch.no_grad()
def restore_injected_(model: nn.Module) -> int:
    """After loading weights without the intervention's state (evaluation): the injections they hold.

    A θ'2 is zero until its injection and frozen (never rewritten) after it, so the count is the number
    of pairs with a non-zero θ'2.  Reads the weights (one host sync): for loading, not for a training loop.
    """
    heads = heads_of(model)
    if heads is None:
        return 0
    count = 0
    for _, b in heads.pairs:
        if not any(bool(p.ne(0).any()) for p in b.parameters()):
            break
        count += 1
    set_injected_(model, count)
    return count


@torch.no_grad()
def inject_(model: nn.Module, optimizer: torch.optim.Optimizer | None, random=None,
            target_model: nn.Module | None = None) -> None:
    """One injection in place (§5): the next pair θ'1 ← fresh draw, θ'2 ← θ'1; freeze θ (and earlier θ'1s) and θ'2.

    ``random``: a ``MemberRandom`` (member k draws from its stream), or a ``torch.Generator``/None for a
    one-member network.  The target's own pair receives the same values and the same tensors are frozen
    there.  No optimiser state is reset; θ'1 must have none (it never had a gradient).
    """
    heads, _, _ = _parts_of(model)
    k = heads.injected
    if k >= len(heads.pairs):
        raise RuntimeError(f"injection {k + 1}: the network holds {len(heads.pairs)} pairs of heads (one per "
                           "planned injection)")
    fresh, copy_ = heads.pairs[k]
    fresh_params = list(fresh.parameters())
    if optimizer is not None:
        stateful = [p for p in fresh_params if optimizer.state.get(p)]
        if stateful:
            raise RuntimeError(f"plasticity injection: θ'1 of pair {k} already has optimiser state (for "
                               f"{len(stateful)} tensors); it must never have had a gradient")
    for module in fresh:
        if isinstance(module, WEIGHT_LAYERS):
            reinit_(module, random=random)
        elif isinstance(module, NORM_LAYERS):
            if module.weight is not None:
                module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
    copy_params = list(copy_.parameters())
    torch._foreach_copy_(copy_params, fresh_params)
    trained = [p for p in model.parameters() if p.requires_grad]
    set_injected_(model, k + 1)
    for param in trained:
        if not param.requires_grad:
            param.grad = None  # just frozen: no stale gradient reaches the optimiser (zero_grad(set_to_none=False))
    if target_model is not None:
        target_heads, _, _ = _parts_of(target_model)
        if target_heads.injected != k or len(target_heads.pairs) != len(heads.pairs):
            raise ValueError("the target network's injection heads do not match the online network's")
        target_fresh, target_copy = target_heads.pairs[k]
        torch._foreach_copy_([*target_fresh.parameters(), *target_copy.parameters()], fresh_params + copy_params)
        set_injected_(target_model, k + 1)


class PlasticityInjection(Intervention):
    """Injects at the listed env steps (``previous_t < T <= t``) and/or at every task switch; counts injections."""

    name, tag = "plasticity_injection", "plasticity/injections"

    def __init__(self, parts: Parts, steps: list[int], at_task_switch: bool):
        heads, _, _ = _parts_of(parts.model)
        planned = len(steps) + (1 if at_task_switch else 0)
        if len(heads.pairs) < planned:
            raise ValueError(f"the Q-network holds {len(heads.pairs)} pairs of injection heads, {planned} or more "
                             "injections are planned: build it with the same injection flags")
        if parts.target_model is not None:
            _parts_of(parts.target_model)
        self.parts, self.steps, self.at_task_switch = parts, sorted(steps), at_task_switch
        self.heads = heads
        self.events = Counter(next(parts.model.parameters()).device, members_of(parts.model))
        self.done: list[int] = []  # the env step of every injection
        self._t = 0

    def _inject(self, t: int) -> None:
        parts = self.parts
        inject_(parts.model, parts.optimizer, parts.random, parts.target_model)
        self.done.append(int(t))
        self.events.add()
        self.rewrote = True

    def after_env_step(self, previous_t: int, t: int, synced: bool, sample_obs: SampleObs | None) -> None:
        self._t = t
        for step in self.steps:
            if previous_t < step <= t:
                self._inject(t)

    def on_task_switch(self) -> None:
        if self.at_task_switch:
            self._inject(self._t)

    def scalars(self) -> dict[str, torch.Tensor]:
        return {self.tag: self.events.value()}

    def state_dict(self) -> dict:
        return {"injected": self.heads.injected, "steps": list(self.done), "t": self._t,
                "events": self.events.value()}

    def load_state_dict(self, state: dict) -> None:
        count = int(state["injected"])
        set_injected_(self.parts.model, count)
        if self.parts.target_model is not None:
            set_injected_(self.parts.target_model, count)
        self.done = [int(t) for t in state["steps"]]
        self._t = int(state["t"])
        self.events.count.copy_(state["events"])


@dataclass
class PlasticityInjectionFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"plasticity_injection_at": "inject",
                                      "plasticity_injection_at_task_switch": "injectsw",
                                      "plasticity_injection_head": "injhead",
                                      "plasticity_injection_frozen_grad": "injgrad"}

    plasticity_injection_at: list[int] = ranged(None, POSITIVE_COUNT, default_factory=list)
    """plasticity injection at these env steps (increasing; each when crossed); none: off"""
    plasticity_injection_at_task_switch: bool = False
    """plasticity injection at every task switch (the network holds one pair of heads per switch) [U]"""
    plasticity_injection_head: Literal["last:1", "last:2"] = "last:2"
    """plasticity injection: the head is the output layer (last:1) or the last hidden block + output (last:2) [U]"""
    plasticity_injection_frozen_grad: Literal["through", "detach"] = "through"
    """plasticity injection: gradients reach the encoder through the frozen heads, or the second head's output is detached"""

    def check(self, setting: Setting) -> None:
        steps = list(self.plasticity_injection_at)
        on = bool(steps) or self.plasticity_injection_at_task_switch
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"--plasticity-injection-at {' '.join(map(str, steps))}: give the env steps in "
                             "increasing order, each once")
        if self.plasticity_injection_at_task_switch and not setting.task_switches:
            raise ValueError("--plasticity-injection-at-task-switch: this run has no task switches (on Atari: no "
                             "--atari-shift); give env steps with --plasticity-injection-at T1 T2 ...")
        if self.plasticity_injection_head not in INJECTION_HEADS:
            raise ValueError(f"unknown --plasticity-injection-head {self.plasticity_injection_head!r}; choose one of "
                             f"{', '.join(INJECTION_HEADS)}")
        if self.plasticity_injection_frozen_grad not in FROZEN_GRADS:
            raise ValueError(f"unknown --plasticity-injection-frozen-grad {self.plasticity_injection_frozen_grad!r}; "
                             f"choose one of {', '.join(FROZEN_GRADS)}")
        if not on and (self.plasticity_injection_head != "last:2" or self.plasticity_injection_frozen_grad != "through"):
            raise ValueError("--plasticity-injection-head / --plasticity-injection-frozen-grad need an injection: "
                             "--plasticity-injection-at T1 ... or --plasticity-injection-at-task-switch")

    def build(self, parts: Parts) -> PlasticityInjection | None:
        steps = list(self.plasticity_injection_at)
        if not steps and not self.plasticity_injection_at_task_switch:
            return None
        return PlasticityInjection(parts, steps, self.plasticity_injection_at_task_switch)
