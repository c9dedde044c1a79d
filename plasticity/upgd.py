"""UPGD, the adaptive utility-based perturbed gradient descent of Elsayed & Mahmood (methods-v2.md §12).

Per tensor at its step k (the code of ``mohmdelsayed/upgd@b75e90a:core/run/rl/adaupgd.py``):

    U ← β_u·U + (1 − β_u)·(−g ⊙ θ)                    utility (not bias-corrected in the maximum)
    m ← β1·m + (1 − β1)·g,  v ← β2·v + (1 − β2)·g²    Adam moments, m̂ = m/(1 − β1^k), v̂ = v/(1 − β2^k)
    η_max = max of U over all tensors                    (per member here, see below)
    s = sigmoid((U/(1 − β_u^k)) / η_max)
    θ ← (1 − lr·wd)·θ − 2·lr·[m̂·(1 − s)/(√v̂ + ε) + ξ·(1 − s)],   ξ ~ N(0, σ²)

The quirks of the code are kept (spec §12): the maximum is not bias-corrected (×1/(1 − β_u) at
k = 1), there is no guard for η_max ≤ 0, the step has a factor 2, and the decay reaches every
tensor (biases and LayerNorm γ/β too, as the code's ``p.data.mul_`` in its one group does).

Populations (populations.md §1.3).  Everything is elementwise except η_max, so with
``members = M > 1`` every parameter must carry the member dim first and η_max is per member:
each tensor is reduced over its dims ≥ 1 (``[M]``), then the maximum is taken across tensors.
With ``members = 1`` (an ordinary ``nn`` model, or a population of one) each tensor is one
member's.  The noise ξ is per member too: a counter-based generator (Wellons' 32-bit integer
hash "lowbias32" of a Weyl sequence over the elements, keyed by member seed, noise step and
tensor index, then Box-Muller on two 24-bit uniforms) [U: torch's ``randn_like`` in the code].  It needs no loop
over members and no per-member ``torch.Generator``: member k's ξ depends only on its seed, so
member k of a population draws exactly what its single run (seed s + k) draws, and the state is
the seeds and one step counter (``state_dict()["upgd"]``).  Its tails are cut at ≈ 5.9σ (the
smallest uniform is 2⁻²⁵).

No host-device synchronisation: η_max stays on the device, the step counts are host ints.
Cost: three state tensors per parameter; per step a few elementwise passes, one ``amax`` per
tensor, and ~20 int32/float32 elementwise ops per element for the noise (skipped when σ = 0;
on a loaded 2-core CPU 0.36 s for 1.7M elements, about 18 ``mul_`` passes -- negligible on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from plasticity.streams import stream_seed

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B - (1 << 32)  # lowbias32's multipliers as int32 (wrapping products)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 on int64 tensors holding values in [0, 2³²) (products wrap; the low 32 bits are exact)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _hash32_int32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor (two's complement: products wrap, shifts masked to be logical)."""
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    x.mul_(_MUL1)
    x.bitwise_xor_((x >> 15) & 0x1FFFF)
    x.mul_(_MUL2)
    return x.bitwise_xor_((x >> 16) & 0xFFFF)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2³²) as the int32 with the same bits."""
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32)


def _uniform_(bits: torch.Tensor) -> torch.Tensor:
    """24 hashed bits as a float32 uniform in (0, 1): (k + 1/2)/2²⁴."""
    return ((bits >> 8) & 0xFFFFFF).to(torch.float32).add_(0.5).mul_(2.0 ** -24)


def member_normal(keys: torch.Tensor, counter: int, tensor_index: int, shape: Sequence[int],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[M, *shape]`` standard normals: member k's depend only on ``keys[k]`` (int64, < 2³²), ``counter`` and
    ``tensor_index`` -- a counter-based stream (no generator state, no loop over members).

    Element i of member k: two uniforms lowbias32(b_j + i·φ) (φ the 32-bit golden ratio, b_1, b_2
    hashed from key, counter and tensor index), then Box-Muller.
    """
    count = math.prod(shape)
    mix = (counter & _MASK32) ^ (((counter >> 32) * _GOLDEN32) & _MASK32)
    base = _hash32(_hash32(keys ^ mix) ^ ((tensor_index * _GOLDEN32 + 0x632BE5AB) & _MASK32))  # [M]
    bases = _as_int32(torch.stack([_hash32(base ^ 0x5BD1E995), _hash32(base ^ 0x27D4EB2F)]))  # [2, M]
    weyl = torch.arange(count, device=keys.device, dtype=torch.int32).mul_(_GOLDEN32 - (1 << 32))
    first = _uniform_(_hash32_int32_(weyl + bases[0].unsqueeze(1)))  # [M, count]
    second = _uniform_(_hash32_int32_(weyl + bases[1].unsqueeze(1)))
    normal = first.log_().mul_(-2.0).sqrt_().mul_(second.mul_(2.0 * math.pi).cos_())
    return normal.to(dtype).reshape(keys.shape[0], *shape)


def member_keys(seeds: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """``[M]`` int64 noise keys (< 2³²) from the members' run seeds."""
    keys = []
    for seed in seeds:
        mixed = stream_seed(seed, "upgd-noise")
        keys.append((mixed ^ (mixed >> 32)) & _MASK32)
    return torch.tensor(keys, dtype=torch.int64, device=device)


class UPGD(torch.optim.Optimizer):
    """Adaptive UPGD (spec §12) over ``params``; ``members``: M of a population (every parameter ``[M, ...]``).

    ``seeds``: the members' run seeds (member k's noise stream; default ``0 .. M−1``).  ``betas``
    and ``eps`` are the Adam moments' (the code's β1 = 0.9, β2 = 0.999, ε = 1e-5).  State per
    tensor: ``avg_utility`` (U), ``first_moment`` (m), ``sec_moment`` (v) and ``step`` (k, an int);
    plus the noise counter in ``state_dict()["upgd"]``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-5, weight_decay: float = 1e-3, beta_utility: float = 0.999,
                 sigma: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-5,
                 members: int = 1, seeds: Sequence[int] | None = None):
        if lr < 0 or weight_decay < 0 or sigma < 0 or eps <= 0:
            raise ValueError(f"UPGD needs lr, weight_decay, sigma >= 0 and eps > 0; got lr={lr}, "
                             f"weight_decay={weight_decay}, sigma={sigma}, eps={eps}")
        if not (0 <= beta_utility < 1 and all(0 <= beta < 1 for beta in betas)):
            raise ValueError(f"UPGD betas must lie in [0, 1); got beta_utility={beta_utility}, betas={betas}")
        defaults = dict(lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma,
                        betas=tuple(betas), eps=eps)
        super().__init__(params, defaults)
        self.members = int(members)
        seeds = list(range(self.members)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != self.members:
            raise ValueError(f"UPGD: {len(seeds)} seeds for {self.members} members (one per member)")
        self.seeds = seeds
        self.noise_step = 0
        params_list = [p for group in self.param_groups for p in group["params"]]
        if self.members > 1:
            for p in params_list:
                if p.dim() == 0 or p.shape[0] != self.members:
                    raise ValueError(f"UPGD over a population of {self.members} members: a parameter of shape "
                                     f"{tuple(p.shape)} has no leading member dim")
        device = params_list[0].device if params_list else torch.device("cpu")
        self._keys = member_keys(self.seeds, device)

    def _member_first(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(self.members, -1)

    def _per_member(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values [M]`` broadcasting against ``like`` (member dim first, or one member)."""
        if self.members > 1:
            return values.view(self.members, *([1] * (like.dim() - 1)))
        return values.reshape([1] * like.dim())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.noise_step += 1
        stepped: list[tuple[dict, int, torch.Tensor]] = []
        index = -1
        for group in self.param_groups:
            beta_u = group["beta_utility"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["avg_utility"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["first_moment"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["sec_moment"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                utility = state["avg_utility"]
                utility.mul_(beta_u).addcmul_(grad, p, value=-(1.0 - beta_u))
                state["first_moment"].lerp_(grad, 1.0 - beta1)
                state["sec_moment"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                stepped.append((group, index, p))
        if not stepped:
            return loss
        # η_max per member: each tensor's maximum over its dims >= 1, then the maximum across tensors.
        maxima = torch.stack([self._member_first(self.state[p]["avg_utility"]).amax(dim=1) for _, _, p in stepped])
        eta_max = maxima.amax(dim=0)  # [M]
        for group, index, p in stepped:
            state = self.state[p]
            beta1, beta2 = group["betas"]
            k = state["step"]
            lr, sigma = group["lr"], group["sigma"]
            scaled = torch.sigmoid(state["avg_utility"] / (1.0 - group["beta_utility"] ** k)
                                   / self._per_member(eta_max, p))
            keep = 1.0 - scaled
            exp_avg = state["first_moment"] / (1.0 - beta1 ** k)
            exp_avg_sq = state["sec_moment"] / (1.0 - beta2 ** k)
            update = (exp_avg * keep) / (exp_avg_sq.sqrt() + group["eps"])
            if sigma != 0:
                noise = member_normal(self._keys, self.noise_step, index, p.shape[1:] if self.members > 1
                                      else (p.numel(),), p.dtype).reshape(p.shape)
                update.addcmul_(noise, keep, value=sigma)
            if group["weight_decay"] != 0:
                p.mul_(1.0 - lr * group["weight_decay"])
            p.add_(update, alpha=-2.0 * lr)
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["upgd"] = {"seeds": list(self.seeds), "noise_step": self.noise_step}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("upgd", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            if list(extra["seeds"]) != self.seeds:
                raise ValueError(f"UPGD state of seeds {extra['seeds']} cannot be loaded for seeds {self.seeds}")
            self.noise_step = int(extra["noise_step"])
