"""PSGD-Kron (methods-v2.md §11.2): momentum preconditioned by a learned Kronecker-factored matrix.

The rule of PyPI ``kron-torch`` 0.3.3 (``evanatyourservice/kron_torch@884427c:kron_torch/kron.py``),
written again for member-first parameters:

- m ← b1·m + (1 − b1)·g, debiased m̂ = m/(1 − b1^k) (k: the tensor's step count);
- every time a counter reaches 1/p(n), p(n) = clamp(exp(−0.001(n − 500)), 0.03, 1) (n: steps so
  far), the factors Q_i are updated from m̂ and a normal probe V (one step of Li's PSGD fit);
  on about 1% of those updates (``random.Random(42)``) the factors are first balanced to a
  common inf-norm;
- the update P·m̂ with P = ⊗_i Q_iᵀQ_i is clipped to RMS ≤ 1.1, then θ ← θ − lr·(P·m̂ + wd·θ).

A tensor of more than two dims is first merged to a matrix (the package's rule); a dim larger
than ``max_size_triangular`` (or of size 1, or of a 1-D tensor, or picked by
``memory_save_mode``) gets a diagonal factor, the others a triangular one.

Differences from the package, all on purpose:

- populations: with member-first parameters ``[M, ...]`` every member has its own factors;
  dim 0 is a batch dim of the einsums and solves (no loop over members);
- decoupled weight decay applies to every tensor of a group with ``weight_decay`` > 0; the
  package tests ``p.dim() >= 2``, which cannot tell a member-first bias ``[M, out]`` from a
  weight, so the caller puts biases and LayerNorm parameters in a group without decay;
- the probe V comes from the optimiser's own ``torch.Generator`` (seeded with ``seed``, by
  default ``torch.initial_seed()``), not from the global one (other code's draws stay as they
  were); the same seed reproduces the package run seeded with ``torch.manual_seed(seed)``;
- the schedule counters are host ints (the package compares tensors in ``if``: no device
  sync here) and go into ``state_dict()`` with both random states (the package loses them);
- the momentum is stored in the parameter's shape, so the partial resets that zero state
  entries by the parameter's shape (``resets.zero_optimizer_entries_``) reach it;
  ``reset_state_()`` clears all state (Q rebuilt at the next step), ``drop_state(p)`` one tensor's.
- nothing is printed, and the einsums run eagerly (no ``torch.compile``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from plasticity.flags import POSITIVE, POSITIVE_COUNT, Range, ranged
from plasticity.intervention import MethodFlags, Parts, Setting

MEMORY_SAVE_MODES = ("none", "smart_one_diag", "one_diag", "all_diag")
MOMENTUM = Range(low=0.0, high=1.0, high_open=True)
_LETTERS = string.ascii_lowercase + string.ascii_uppercase
_BATCH = _LETTERS[-1]  # "Z": never one of the 3 × 13 letters of the tensor dims


def update_probability(n: int, max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001,
                       flat_start: int = 500) -> float:
    """p(n) = clamp(max_prob·exp(−decay·(n − flat_start)), min_prob, max_prob) (the package's default schedule)."""
    return min(max(max_prob * math.exp(-decay * (n - flat_start)), min_prob), max_prob)


def merged_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The package's merge of a > 2-D tensor into a matrix: [prod(:-1), last] or [first, prod(1:)]."""
    if len(shape) <= 2:
        return tuple(shape)
    shape1 = (math.prod(shape[:-1]), shape[-1])
    shape2 = (shape[0], math.prod(shape[1:]))
    return shape1 if shape1[1] - shape1[0] <= shape2[1] - shape2[0] else shape2  # np.diff: signed, as there


def diagonal_dims(shape: tuple[int, ...], max_size: int, min_ndim_triangular: int, memory_save_mode) -> list[bool]:
    """Which dims of a (merged) tensor get a diagonal factor (the others: triangular), as the package decides."""
    mode = None if memory_save_mode in (None, "none") else memory_save_mode
    if mode is None:
        diag = [False] * len(shape)
    elif mode == "smart_one_diag":
        diag = [False] * len(shape)
        ordered = sorted(shape)
        if len(shape) > 1 and ordered[-1] > ordered[-2]:
            diag[np.argsort(shape)[::-1][0]] = True
    elif mode == "one_diag":
        diag = [False] * len(shape)
        diag[np.argsort(shape)[::-1][0]] = True
    elif mode == "all_diag":
        diag = [True] * len(shape)
    else:
        raise ValueError(f"unknown memory_save_mode {memory_save_mode!r}; choose one of {', '.join(MEMORY_SAVE_MODES)}")
    return [d or size == 1 or size > max_size or len(shape) < min_ndim_triangular for size, d in zip(shape, diag)]


@dataclass(frozen=True)
class _Exprs:
    """Batched einsum subscripts (dim 0 = member) for one tensor shape and factor layout."""

    A: str  # A = Q·G along every dim
    G: tuple[str, ...]  # per factor: the statistics of A (or conjB) contracted over the other dims
    P: str  # P·G = ⊗ QᵀQ · G


def _exprs(diag: tuple[bool, ...]) -> _Exprs:
    n = len(diag)
    if n > 13:
        raise ValueError(f"Kron handles tensors of at most 13 dims; got {n}")
    z = _BATCH
    a, b, c = _LETTERS[:n], _LETTERS[13:13 + n], _LETTERS[26:26 + n]
    q_a = [z + (a[i] if diag[i] else a[i] + b[i]) for i in range(n)]
    g_a = z + "".join(a[i] if diag[i] else b[i] for i in range(n))
    expr_a = ",".join(q_a) + "," + g_a + "->" + z + a
    expr_g = []
    for i in range(n):
        piece1 = z + "".join(b[i] if j == i else a[j] for j in range(n))
        if diag[i]:
            expr_g.append(f"{piece1},{piece1}->{z}{b[i]}")
        else:
            piece2 = z + "".join(c[i] if j == i else a[j] for j in range(n))
            expr_g.append(f"{piece1},{piece2}->{z}{b[i]}{c[i]}")
    q1 = [z + (b[i] if diag[i] else a[i] + b[i]) for i in range(n)]
    q2 = [z + (b[i] if diag[i] else a[i] + c[i]) for i in range(n)]
    g_p = z + "".join(b[i] if diag[i] else c[i] for i in range(n))
    expr_p = ",".join(q1 + q2) + "," + g_p + "->" + z + b
    return _Exprs(expr_a, tuple(expr_g), expr_p)


def _einsum_chain(expr: str, *operands: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(expr, *operands)`` for factors applied to one tensor (the last operand), contracted
    one factor at a time from the tensor outward.

    Without ``opt_einsum`` torch contracts left to right, which here first forms the outer product of
    the factors (a 32x784 weight: 32·32·784·784 entries, ~37 s a step on a CPU); this order only ever
    holds tensors of the parameter's size.  Indices are kept while a later operand or the output needs them.
    """
    inputs, output = expr.split("->")
    subs = inputs.split(",")
    result, result_subs = operands[-1], subs[-1]
    for k in range(len(operands) - 2, -1, -1):
        needed = set(output).union(*subs[:k])
        keep = "".join(dict.fromkeys(ch for ch in subs[k] + result_subs if ch in needed))
        result = torch.einsum(f"{subs[k]},{result_subs}->{keep}", operands[k], result)
        result_subs = keep
    return torch.einsum(f"{result_subs}->{output}", result) if result_subs != output else result


def _per_member(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """An ``[M]`` tensor as ``[M, 1, ...]`` against a tensor of ``ndim`` dims."""
    return x.view(x.shape[0], *([1] * (ndim - 1)))


def _inf_norm(x: torch.Tensor) -> torch.Tensor:
    """max |x| per member ``[M]``."""
    return x.abs().flatten(1).amax(1)


def _lower_bound(a: torch.Tensor, max_abs: torch.Tensor) -> torch.Tensor:
    """The package's cheap lower bound of the spectral norm of each member's matrix ``a [M, d, d]`` (``[M]``)."""
    a = a / _per_member(max_abs, 3)
    column = torch.einsum("zij,zij->zj", a, a).argmax(1)  # [M]
    x = a.gather(2, column.view(-1, 1, 1).expand(a.shape[0], a.shape[1], 1)).squeeze(2)  # [M, d]
    x = torch.einsum("zi,zij->zj", x, a)
    x = x / x.norm(dim=1, keepdim=True)
    x = torch.einsum("zj,zkj->zk", x, a)
    return x.norm(dim=1) * max_abs


def _apply_inverse_factors(v: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """conjB: V with every dim i multiplied on the right by Q_i⁻¹ (diagonal: divided), in the order i = 0, 1, ..."""
    out = v
    for i, q in enumerate(factors):
        dim = i + 1
        moved = out.movedim(dim, -1)
        if q.dim() < 3:  # diagonal [M, d]
            moved = moved / q.view(q.shape[0], *([1] * (moved.dim() - 2)), q.shape[1])
        else:
            flat = moved.reshape(moved.shape[0], -1, moved.shape[-1])
            # in float32 whatever the factors' dtype, as the package does
            moved = torch.linalg.solve_triangular(q.float(), flat.float(), upper=True, left=False).to(
                moved.dtype).reshape(moved.shape)
        out = moved.movedim(-1, dim)
    return out


def _balance(factors: list[torch.Tensor]) -> None:
    """Rescale each member's factors to the geometric mean of their inf-norms (their product is unchanged)."""
    norms = torch.stack([_inf_norm(q) for q in factors], dim=1)  # [M, n]
    scale = norms.log().mean(1, keepdim=True).exp() / norms
    for k, q in enumerate(factors):
        q.mul_(_per_member(scale[:, k], q.dim()))


def _probe(shape: torch.Size, generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """The probe V ``[M, ...]``: from one generator, or member k's rows from generator k (what its single run draws)."""
    if len(generators) == 1:
        return torch.randn(shape, generator=generators[0], device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"Kron has {len(generators)} member seeds for a tensor of {shape[0]} members")
    return torch.stack([torch.randn(shape[1:], generator=generator, device=device, dtype=dtype)
                        for generator in generators])  # M draws at a preconditioner update (p <= 1 of the steps)


def _update_factors(factors: list[torch.Tensor], exprs: _Exprs, g: torch.Tensor, precond_lr: float, tiny: float,
                    generators: list[torch.Generator]) -> None:
    """One PSGD step of every factor from the pair (V, G + tiny·V); perturbs ``g`` in place, as the package does."""
    v = _probe(g.shape, generators, g.device, g.dtype)
    # sqrt(float32 eps) as a host float (the package's device scalar, without a host-to-device copy per step)
    g += math.sqrt(torch.finfo(torch.float32).eps) * _per_member(g.abs().flatten(1).mean(1), g.dim()) * v
    conj_b = _apply_inverse_factors(v, factors)
    a = _einsum_chain(exprs.A, *factors, g)
    for q, expr in zip(factors, exprs.G):
        term1 = torch.einsum(expr, a, a)
        term2 = torch.einsum(expr, conj_b, conj_b)
        term1, term2 = term1 - term2, term1 + term2
        term1 *= precond_lr
        norm = _inf_norm(term2)
        if q.dim() < 3:
            term1 *= q / _per_member(norm.clamp(min=tiny), 2)
        else:
            term1 = torch.triu(term1)
            bound = torch.where(norm > 0, _lower_bound(term2, norm), norm).clamp(min=tiny)
            term1 = torch.bmm(term1 / _per_member(bound, 3), q)
        q.sub_(term1)


def _member_first(params: list[torch.Tensor]) -> bool:
    """Whether ``params`` look like a population's (every tensor ``[M, ...]`` with one M): biases are 2-D there."""
    return bool(params) and all(p.dim() >= 2 for p in params) and len({p.shape[0] for p in params}) == 1


class Kron(torch.optim.Optimizer):
    """PSGD-Kron over ``params_or_groups`` (see the module docstring for the rule and the differences).

    ``member_dim``: whether the parameters are member-first ``[M, ...]`` (independent factors per
    member); None infers it (every parameter ≥ 2-D with one common dim-0 size, as in
    ``plasticity.networks`` models) -- pass it for an ordinary model whose parameters look like that.
    ``seed``: the probe generator's seed (default ``torch.initial_seed()``), or one seed per member
    (a population's run seeds): member k then draws its probes from its own generator, so it makes
    exactly the draws of the single run with seed k.
    """

    def __init__(self, params_or_groups, lr: float = 3e-4, b1: float = 0.9, weight_decay: float = 0.0,
                 precond_lr: float = 0.1, max_size_triangular: int = 8192, memory_save_mode: str | None = None,
                 min_ndim_triangular: int = 2, momentum_into_precond_update: bool = True,
                 precond_init_scale: float = 1.0, precond_dtype: torch.dtype | None = None, *, member_dim: bool | None = None,
                 seed: int | Sequence[int] | None = None):
        if memory_save_mode not in (None, *MEMORY_SAVE_MODES):
            raise ValueError(f"unknown memory_save_mode {memory_save_mode!r}; choose one of "
                             f"{', '.join(MEMORY_SAVE_MODES)}")
        MOMENTUM.check("kron-b1", b1)
        defaults = dict(lr=lr, b1=b1, weight_decay=weight_decay, precond_lr=precond_lr,
                        max_size_triangular=max_size_triangular, min_ndim_triangular=min_ndim_triangular,
                        memory_save_mode=None if memory_save_mode == "none" else memory_save_mode,
                        momentum_into_precond_update=momentum_into_precond_update,
                        precond_init_scale=precond_init_scale, precond_dtype=precond_dtype or torch.float32)
        super().__init__(params_or_groups, defaults)
        params = [p for group in self.param_groups for p in group["params"]]
        self.member_dim = _member_first(params) if member_dim is None else bool(member_dim)
        seeds = [torch.initial_seed()] if seed is None else [seed] if isinstance(seed, int) else list(seed)
        self.seeds = [int(s) for s in seeds]
        self._prob_step = 0
        self._update_counter = 0
        self.rng = random.Random(42)
        self._generators: list[torch.Generator] | None = None
        self._exprs: dict[tuple[bool, ...], _Exprs] = {}

    # -- shapes --
    def _batched_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        """``p`` as [M, *merged member shape] (an ordinary tensor is one member; a scalar member a [1])."""
        members, shape = (p.shape[0], tuple(p.shape[1:])) if self.member_dim else (1, tuple(p.shape))
        return (members, *(merged_shape(shape) or (1,)))

    @property
    def seed(self) -> int | list[int]:
        return self.seeds[0] if len(self.seeds) == 1 else list(self.seeds)

    def _generators_for(self, device: torch.device) -> list[torch.Generator]:
        if self._generators is None:
            self._generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        return self._generators

    def _init_factors(self, shape: tuple[int, ...], group: dict, device: torch.device) -> list[torch.Tensor]:
        members, dims = shape[0], shape[1:]
        diag = diagonal_dims(dims, group["max_size_triangular"], group["min_ndim_triangular"],
                             group["memory_save_mode"])
        scale = group["precond_init_scale"] ** (1 / len(dims))
        factors = []
        for size, d in zip(dims, diag):
            dtype = group["precond_dtype"]
            one = torch.ones(size, device=device, dtype=dtype) if d else torch.eye(size, device=device, dtype=dtype)
            factors.append((scale * one).expand(members, *one.shape).clone())
        return factors

    def _exprs_for(self, factors: list[torch.Tensor]) -> _Exprs:
        key = tuple(q.dim() < 3 for q in factors)
        if key not in self._exprs:
            self._exprs[key] = _exprs(key)
        return self._exprs[key]

    # -- the step --
    def _schedule(self) -> tuple[bool, bool]:
        """This step's (update the factors, balance them first); advances the counters and the balance rng.

        On the host: the package's float32 comparison ``counter >= 1/p(n)`` gives the same decisions
        (1/p(n) never comes within 1e-5 of an integer), without its tensor-in-``if``.
        """
        probability = update_probability(self._prob_step)
        self._update_counter += 1
        do_update = self._update_counter >= 1 / probability
        if do_update:
            self._update_counter = 0
        self._prob_step += 1
        balance = self.rng.random() < 0.01 and do_update  # drawn every step, as in the package
        return do_update, balance

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        do_update, balance = self._schedule()
        for group in self.param_groups:
            beta = group["b1"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                shape = self._batched_shape(p)
                if len(state) == 0:
                    state["step"] = 0
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["Q"] = self._init_factors(shape, group, p.device)
                state["step"] += 1
                momentum = state["momentum_buffer"]
                momentum.mul_(beta).add_(p.grad, alpha=1 - beta)
                dtype = group["precond_dtype"]
                debiased = (momentum / (1 - beta ** state["step"])).reshape(shape).to(dtype)
                factors = state["Q"]
                exprs = self._exprs_for(factors)
                if len(shape) > 2 and balance:
                    _balance(factors)
                if do_update:
                    source = debiased if group["momentum_into_precond_update"] else \
                        p.grad.reshape(shape).to(dtype)
                    _update_factors(factors, exprs, source, group["precond_lr"], torch.finfo(dtype).tiny,
                                    self._generators_for(p.device))
                update = _einsum_chain(exprs.P, *factors, *factors, debiased)
                rms = update.square().flatten(1).mean(1).sqrt().add(1e-12)
                update.mul_(_per_member(torch.clamp(1.1 / rms, max=1.0), update.dim()))
                update = update.view(p.shape)
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update.to(dtype=p.dtype), alpha=-group["lr"])
        return loss

    # -- resets --
    def reset_state_(self) -> None:
        """Clear every tensor's state (Q is rebuilt at the next step) and restart the update schedule (§2, [U])."""
        self.state.clear()
        self._prob_step = 0
        self._update_counter = 0

    def drop_state(self, param: torch.Tensor) -> None:
        """Forget ``param``'s state (momentum, step, Q): a whole-tensor reset; it starts afresh at its next step."""
        self.state.pop(param, None)

    # -- checkpoints --
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["kron"] = {"prob_step": self._prob_step, "update_counter": self._update_counter,
                         "rng": self.rng.getstate(), "seed": self.seed,
                         "generator": None if self._generators is None else [g.get_state() for g in self._generators]}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kron", None)
        super().load_state_dict(state_dict)
        if extra is None:  # a plain torch state dict (e.g. the package's): the schedule restarts
            return
        self._prob_step = int(extra["prob_step"])
        self._update_counter = int(extra["update_counter"])
        version, internal, gauss = extra["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        saved = extra["seed"]
        self.seeds = [int(saved)] if isinstance(saved, int) else [int(s) for s in saved]
        self._generators = None
        if extra["generator"] is not None:
            states = extra["generator"] if isinstance(extra["generator"], list) else [extra["generator"]]
            params = [p for group in self.param_groups for p in group["params"]]
            generators = self._generators_for(params[0].device if params else torch.device("cpu"))
            for generator, generator_state in zip(generators, states, strict=True):
                generator.set_state(generator_state)


# --- flags ---------------------------------------------------------------------------------------------------------

_SETTINGS = ("kron_b1", "kron_precond_lr", "kron_max_size_triangular", "kron_memory_save_mode")


@dataclass
class KronFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {}

    kron_b1: float = ranged(0.9, MOMENTUM)
    """Kron (--optimizer kron): b1 of the momentum m <- b1 m + (1 - b1) g"""
    kron_precond_lr: float = ranged(0.1, POSITIVE)
    """Kron: the step size of the preconditioner fit"""
    kron_max_size_triangular: int = ranged(8192, POSITIVE_COUNT)
    """Kron: dims larger than this get a diagonal factor instead of a triangular one"""
    kron_memory_save_mode: Literal["none", "smart_one_diag", "one_diag", "all_diag"] = "none"
    """Kron: which dims get diagonal factors: none (all triangular), smart_one_diag (the largest, when larger than the
    next), one_diag (the largest), all_diag"""

    def check(self, setting: Setting) -> None:
        if self.kron_memory_save_mode not in MEMORY_SAVE_MODES:
            raise ValueError(f"unknown --kron-memory-save-mode {self.kron_memory_save_mode!r}; choose one of "
                             f"{', '.join(MEMORY_SAVE_MODES)}")
        if getattr(self, "optimizer", "adam") != "kron":
            defaults = {f.name: f.default for f in dataclasses.fields(KronFlags) if f.name in _SETTINGS}
            changed = ["--" + name.replace("_", "-") for name in _SETTINGS if getattr(self, name) != defaults[name]]
            if changed:
                raise ValueError(f"{', '.join(changed)} {'needs' if len(changed) == 1 else 'need'} --optimizer kron")

    def build(self, parts: Parts) -> None:
        return None  # the optimiser itself (plasticity.optimizers.build_optimizer); nothing runs between steps
