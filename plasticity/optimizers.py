"""Optimisers (methods-v2.md §1): ``--optimizer {adam,adamw,sgd,kron,upgd}``, decoupled weight decay, per-entry
Adam step counts (§2.3), the generic ``--lr-schedule {constant,linear}`` (§6) and UPGD (§12).

``build_optimizer(model, flags, lr)`` makes the optimiser the flags ask for:

- ``adam``: ``torch.optim.Adam`` with ``weight_decay = 0`` always, fused (one kernel a step) when
  every parameter is a floating tensor on the CPU or a CUDA device -- with the default flags it is
  exactly the ``torch.optim.Adam(model.parameters(), lr, eps, fused=True)`` the agents made before.
- ``adamw``: ``torch.optim.AdamW`` with two parameter groups: the weights of Linear/Conv layers
  (``weight_param`` of ``WEIGHT_LAYERS`` modules) decay by η·λd per step, everything else (biases,
  LayerNorm γ/β) has ``weight_decay = 0``.  The mask is by module, not by ``ndim >= 2``: with the
  member dim of a population every bias is 2-D.  ``weight_decay`` is always explicit (torch's
  AdamW default is 0.01).
- ``sgd``: ``torch.optim.SGD`` with dampening 0 (b ← μ·b + g, θ ← θ − η·b; Nesterov
  θ ← θ − η·(g + μ·b)), then the decoupled decay θ ← θ·(1 − η·λd) on the same mask
  (``DecoupledSGD``).
- ``--adam-per-entry-step`` (adam or adamw): ``AdamPerEntryStep``, Adam with one step count per
  element, zeroed with the moments by a partial reset (LoP's AdamGnT).
- ``upgd``: ``plasticity.upgd.UPGD`` (its own decay ``--upgd-weight-decay``, on every tensor).
- ``kron``: ``plasticity.kron.Kron`` (PSGD-Kron, §11.2), decay groups as for adamw.
- ``--trac``: the optimiser above wrapped in ``plasticity.trac.TRAC`` (§11.1).

``--l2`` (the loss term, coupled) and ``--weight-decay`` (the decoupled shrink) are named apart
(§1): torch's coupled ``Adam(weight_decay=...)`` is never used.

``build_lr_scheduler(optimizer, flags, total_updates)``: None for ``constant``; for ``linear`` a
``LambdaLR`` (checkpointed by its ``state_dict``) stepped once per gradient step.

Every optimiser here is elementwise (UPGD's one global maximum is taken per member), so one
optimiser over a population's stacked parameters is M independent optimisers (populations.md §1.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from plasticity.flags import NON_NEGATIVE, POSITIVE, Range, ranged
from plasticity.intervention import Intervention, MethodFlags, Parts, Setting
from plasticity.population import WEIGHT_LAYERS, is_member_module, members_of, weight_param
from plasticity.upgd import UPGD

OPTIMIZERS = ("adam", "adamw", "sgd", "kron", "upgd")
LR_SCHEDULES = ("constant", "linear")
BETA = Range(low=0.0, high=1.0, high_open=True)
MOMENTUM = Range(low=0.0, high=1.0, high_open=True)


# ---- parameter groups ----

def decay_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)``: the weights of Linear/Conv layers, and every other parameter, in ``model.parameters()``
    order (biases and LayerNorm γ/β are 2-D in a population, so this is by module, not by ``ndim``)."""
    weights = {id(weight_param(module)) for module in model.modules() if isinstance(module, WEIGHT_LAYERS)}
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if id(param) in weights else no_decay).append(param)
    return decay, no_decay


def _decay_groups(model: nn.Module, weight_decay: float, key: str = "weight_decay") -> list[dict]:
    decay, no_decay = decay_split(model)
    groups = [{"params": decay, key: weight_decay}, {"params": no_decay, key: 0.0}]
    return [group for group in groups if group["params"]]


def _fusable(params: Iterable[torch.Tensor]) -> bool:
    """Fused Adam/AdamW kernels exist for floating tensors on the CPU and CUDA."""
    params = list(params)
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


# ---- the optimisers written here ----

class AdamPerEntryStep(torch.optim.Optimizer):
    """Adam (or AdamW, with a group's ``weight_decay`` > 0) whose step count is a tensor per element (§2.3).

    m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², k ← k + 1 elementwise, and
    θ ← θ − η·(m/(1−β1^k)) / (√v/√(1−β2^k) + ε); AdamW's decay θ ← θ·(1 − η·λd) comes first.
    With no partial reset every k is the tensor's step count and this is torch's Adam.  A partial
    reset (``zero_optimizer_entries_``) zeroes k with m and v, so a fresh entry gets Adam's usual
    bias-corrected first step η·g/(|g| + ε), not ≈ η(1−β1)/√(1−β2) (LoP's ``AdamGnT``).
    State per tensor: ``exp_avg``, ``exp_avg_sq`` and ``step`` (float32, exact to 2²⁴ steps; past that
    β^k is 0 in float32 anyway).  Cost: one more parameter-sized tensor and ~6 foreach passes.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"AdamPerEntryStep: bad lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            torch._foreach_add_(steps, 1.0)
            if weight_decay != 0:
                torch._foreach_mul_(params, 1.0 - lr * weight_decay)
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
            correction1 = torch._foreach_pow(beta1, steps)  # β1^k, elementwise
            torch._foreach_neg_(correction1)
            torch._foreach_add_(correction1, 1.0)  # 1 − β1^k
            correction2 = torch._foreach_pow(beta2, steps)
            torch._foreach_neg_(correction2)
            torch._foreach_add_(correction2, 1.0)
            torch._foreach_sqrt_(correction2)  # √(1 − β2^k)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, correction2)
            torch._foreach_add_(denom, eps)
            numer = torch._foreach_div(exp_avgs, correction1)
            torch._foreach_div_(numer, denom)
            torch._foreach_add_(params, numer, alpha=-lr)
        return loss


class DecoupledSGD(torch.optim.SGD):
    """``torch.optim.SGD`` (dampening 0, no coupled decay), then θ ← θ·(1 − η·λd) for the groups whose
    ``decoupled_weight_decay`` λd > 0 (§1: the decay follows the step; same mask as adamw)."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 decoupled_weight_decay: float = 0.0):
        super().__init__(params, lr=lr, momentum=momentum, dampening=0.0, weight_decay=0.0, nesterov=nesterov)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", decoupled_weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            decay = group["decoupled_weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if decay != 0 and params:
                torch._foreach_mul_(params, 1.0 - group["lr"] * decay)
        return loss


# ---- the learning-rate schedule ----

class LinearDecay:
    """LR factor of update u+1 (``LambdaLR`` passes u = the number of gradient steps so far):
    1 + (end/start − 1)·min(u, total)/total, i.e. η falls linearly from ``start`` to ``end`` over
    ``total`` updates and then stays at ``end``.  A plain object, so ``LambdaLR.state_dict`` saves it."""

    def __init__(self, start: float, end: float, total: int):
        if total < 1:
            raise ValueError(f"--lr-schedule linear needs a positive number of updates; got {total}")
        self.ratio = end / start if start > 0 else 1.0
        self.total = int(total)

    def __call__(self, update: int) -> float:
        return 1.0 + (self.ratio - 1.0) * min(update, self.total) / self.total


def base_optimizer(optimizer):
    """The optimiser that holds the parameter groups and state: TRAC's ``base``, else ``optimizer`` itself."""
    while optimizer is not None and isinstance(getattr(optimizer, "base", None), torch.optim.Optimizer):
        optimizer = optimizer.base
    return optimizer


class LinearSchedule(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` with ``LinearDecay`` factors whose ``load_state_dict`` also puts the saved learning rates back
    into the optimiser's groups, so a resume is exact whichever of the two states is loaded first."""

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def build_lr_scheduler(optimizer, flags, total_updates: int) -> LinearSchedule | None:
    """None for ``--lr-schedule constant``; for ``linear`` a ``LambdaLR`` from each group's initial lr to
    ``--lr-end`` (0 when not given) over ``total_updates`` gradient steps.  Call its ``step()`` once after
    every ``optimizer.step()``; checkpoint its ``state_dict()`` (with TRAC it drives the base optimiser)."""
    schedule = getattr(flags, "lr_schedule", "constant")
    if schedule == "constant":
        return None
    if schedule != "linear":
        raise ValueError(f"unknown --lr-schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    end = getattr(flags, "lr_end", None)
    end = 0.0 if end is None else float(end)
    target = base_optimizer(optimizer)
    for group in target.param_groups:  # a loaded optimiser state carries the schedule's start as initial_lr
        group["lr"] = group.setdefault("initial_lr", group["lr"])
    return LinearSchedule(target, [LinearDecay(group["initial_lr"], end, total_updates)
                                   for group in target.param_groups])


# ---- construction ----

def build_optimizer(model: nn.Module, flags, lr: float, seeds: Sequence[int] | None = None):
    """The optimiser of ``flags`` (an ``OptimizerFlags``, or the agents' ``Args``) over ``model``'s parameters.

    ``seeds``: the members' run seeds, used by UPGD's noise (member k's stream; default 0 .. M−1).
    """
    name = getattr(flags, "optimizer", "adam")
    betas = tuple(getattr(flags, "adam_betas", (0.9, 0.999)))
    eps = getattr(flags, "adam_eps", 1e-8)
    weight_decay = getattr(flags, "weight_decay", 0.0)
    params = list(model.parameters())
    if name == "adam" and weight_decay != 0:
        raise ValueError("--optimizer adam with --weight-decay > 0: torch's Adam(weight_decay) is coupled L2; "
                         "use --optimizer adamw for decoupled decay, or --l2 for the loss term")
    if name in ("adam", "adamw") and getattr(flags, "adam_per_entry_step", False):
        groups = _decay_groups(model, weight_decay) if name == "adamw" else [{"params": params}]
        optimizer = AdamPerEntryStep(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    elif name == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                                     fused=True if _fusable(params) else None)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(_decay_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, fused=True if _fusable(params) else None)
    elif name == "sgd":
        optimizer = DecoupledSGD(_decay_groups(model, weight_decay, "decoupled_weight_decay"), lr=lr,
                                 momentum=getattr(flags, "sgd_momentum", 0.0),
                                 nesterov=getattr(flags, "sgd_nesterov", False))
    elif name == "upgd":
        members = members_of(model)
        optimizer = UPGD(params, lr=lr, weight_decay=getattr(flags, "upgd_weight_decay", 1e-3),
                         beta_utility=getattr(flags, "upgd_beta_utility", 0.999),
                         sigma=getattr(flags, "upgd_sigma", 1e-3), betas=betas,
                         eps=getattr(flags, "upgd_eps", 1e-5), members=members, seeds=seeds)
    elif name == "kron":
        from plasticity.kron import Kron  # written beside this module (§11.2)

        optimizer = Kron(_decay_groups(model, weight_decay), lr=lr, b1=getattr(flags, "kron_b1", 0.9),
                         weight_decay=weight_decay, precond_lr=getattr(flags, "kron_precond_lr", 0.1),
                         max_size_triangular=getattr(flags, "kron_max_size_triangular", 8192),
                         memory_save_mode=getattr(flags, "kron_memory_save_mode", None),
                         member_dim=any(is_member_module(module) for module in model.modules()),
                         seed=None if seeds is None else list(seeds))  # member k probes as its single run
    else:
        raise ValueError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if getattr(flags, "trac", False):
        if name not in ("adam", "adamw", "sgd"):
            raise ValueError(f"--trac with --optimizer {name}: TRAC wraps adam, adamw or sgd only")
        from plasticity.trac import TRAC  # §11.1

        optimizer = TRAC(optimizer, betas=flags.trac_betas, s_init=flags.trac_s_init, eps=flags.trac_eps)
    return optimizer


# ---- flags ----

def _default(flags, name: str):
    """The default of field ``name`` on the flags' own class (an agent's ``Args`` may override, e.g. C51's eps)."""
    for field in dataclasses.fields(type(flags)):
        if field.name == name:
            if field.default is not dataclasses.MISSING:
                return field.default
            return field.default_factory()  # type: ignore[misc]
    return None


def _given(flags, name: str) -> bool:
    """Whether field ``name`` differs from its default (a flag set to a value the chosen optimiser would ignore)."""
    if not hasattr(flags, name):
        return False
    value, default = getattr(flags, name), _default(flags, name)
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return tuple(value) != tuple(default)
    return value != default


UPGD_FIELDS = ("upgd_beta_utility", "upgd_sigma", "upgd_eps", "upgd_weight_decay")


@dataclass
class OptimizerFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"optimizer": "opt", "weight_decay": "wd", "sgd_momentum": "mom",
                                      "sgd_nesterov": "nesterov", "adam_per_entry_step": "entrystep",
                                      "lr_schedule": "lrsched", "lr_end": "lrend", "upgd_sigma": "upgdsigma"}

    optimizer: Literal["adam", "adamw", "sgd", "kron", "upgd"] = "adam"
    """the optimiser (methods-v2.md §1), all at --learning-rate: adam, adamw (decoupled --weight-decay), sgd, kron (PSGD-Kron), upgd"""
    adam_betas: tuple[float, float] = ranged((0.9, 0.999), BETA)
    """Adam's (beta1, beta2), also adamw's and UPGD's moments; "non-stationary Adam" is --adam-betas 0.99 0.99"""
    adam_eps: float = ranged(1e-8, POSITIVE)
    """Adam epsilon, added after the square root of v-hat (adam, adamw)"""
    sgd_momentum: float = ranged(0.0, MOMENTUM)
    """sgd: momentum mu (b <- mu*b + g, dampening 0); 0 is plain SGD"""
    sgd_nesterov: bool = False
    """sgd: Nesterov momentum, theta <- theta - lr*(g + mu*b) (needs --sgd-momentum > 0)"""
    weight_decay: float = ranged(0.0, NON_NEGATIVE)
    """decoupled decay theta <- theta*(1 - lr*wd) per step on Linear/Conv weights only (adamw, sgd, kron); --l2 is the loss term"""
    adam_per_entry_step: bool = False
    """adam/adamw: one Adam step count per element, zeroed with the moments by partial resets (CBP, ReDo, layer resets)"""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """learning-rate schedule per gradient step: constant, or linear from --learning-rate to --lr-end over the run"""
    lr_end: float | None = ranged(None, NON_NEGATIVE, optional=True)
    """--lr-schedule linear: the learning rate at the run's last update (None: 0)"""
    upgd_beta_utility: float = ranged(0.999, BETA)
    """upgd: decay beta_u of the utility U <- beta_u*U + (1-beta_u)*(-g*theta)"""
    upgd_sigma: float = ranged(1e-3, NON_NEGATIVE)
    """upgd: standard deviation of the perturbation noise (a per-member counter-based stream [U])"""
    upgd_eps: float = ranged(1e-5, POSITIVE)
    """upgd: epsilon of its Adam denominator"""
    upgd_weight_decay: float = ranged(1e-3, NON_NEGATIVE)
    """upgd: its decay theta <- (1 - lr*wd)*theta (not --weight-decay), on every tensor incl. biases and LayerNorm, as the official code"""

    def check(self, setting: Setting) -> None:
        name = self.optimizer
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown --lr-schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if len(tuple(self.adam_betas)) != 2:
            raise ValueError(f"--adam-betas takes two values (beta1 beta2); got {self.adam_betas!r}")
        if name == "adam" and self.weight_decay > 0:
            raise ValueError(f"--optimizer adam with --weight-decay {self.weight_decay:g}: Adam's weight_decay is "
                             "coupled L2; use --optimizer adamw for decoupled decay, or --l2 for the loss term")
        if name == "upgd" and self.weight_decay > 0:
            raise ValueError(f"--weight-decay {self.weight_decay:g} with --optimizer upgd: UPGD's decay is "
                             "--upgd-weight-decay")
        if self.adam_per_entry_step and name not in ("adam", "adamw"):
            raise ValueError(f"--adam-per-entry-step with --optimizer {name}: only adam and adamw have an Adam "
                             "step counter")
        if name != "sgd":
            for flag in ("sgd_momentum", "sgd_nesterov"):
                if _given(self, flag):
                    raise ValueError(f"--{flag.replace('_', '-')} with --optimizer {name}: it applies to "
                                     "--optimizer sgd only")
        elif self.sgd_nesterov and self.sgd_momentum == 0:
            raise ValueError("--sgd-nesterov needs --sgd-momentum > 0")
        if name not in ("adam", "adamw", "upgd") and _given(self, "adam_betas"):
            raise ValueError(f"--adam-betas with --optimizer {name}: it applies to adam, adamw and upgd only"
                             + (" (kron's is --kron-b1)" if name == "kron" else ""))
        if name not in ("adam", "adamw") and _given(self, "adam_eps"):
            raise ValueError(f"--adam-eps with --optimizer {name}: it applies to adam and adamw only"
                             + (" (upgd's is --upgd-eps)" if name == "upgd" else ""))
        if name != "upgd":
            for flag in UPGD_FIELDS:
                if _given(self, flag):
                    raise ValueError(f"--{flag.replace('_', '-')} with --optimizer {name}: it applies to "
                                     "--optimizer upgd only")
        if self.lr_end is not None and self.lr_schedule != "linear":
            raise ValueError("--lr-end needs --lr-schedule linear")
        if getattr(self, "trac", False) and name not in ("adam", "adamw", "sgd"):
            raise ValueError(f"--trac with --optimizer {name}: TRAC wraps adam, adamw or sgd only")

    def build(self, parts: Parts) -> LRSchedule | None:
        """The optimiser itself is built by ``build_optimizer(model, args, lr)``; this builds its ``--lr-schedule``."""
        if self.lr_schedule == "constant":
            return None
        scheduler = build_lr_scheduler(parts.optimizer, self, parts.setting.total_updates)
        return None if scheduler is None else LRSchedule(scheduler, members_of(parts.model))


class LRSchedule(Intervention):
    """``--lr-schedule linear`` as an intervention: one scheduler step per gradient step, right after
    ``optimizer.step()`` (so the loop needs no line of its own), its state in the checkpoint, and the
    learning rate logged as ``charts/learning_rate`` (CleanRL's tag)."""

    name = "lr_schedule"

    def __init__(self, scheduler: LinearSchedule, members: int):
        self.scheduler, self.members = scheduler, members

    def after_update(self, previous: int, update: int, sample_obs) -> None:
        for _ in range(update - previous):
            self.scheduler.step()

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"charts/learning_rate": torch.full((self.members,), self.scheduler.get_last_lr()[0])}

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
