"""TRAC (methods-v2.md §11.1): a learned scale on the base optimiser's displacement from the start.

TRAC wraps a base optimiser (Adam, AdamW or SGD).  Every step it runs the base step,
adds the base's update u_t = θ' − θ_t to the normalised displacement Δ, and sets

    θ_{t+1} = θ_ref + max(S, 0)·Δ_{t+1},      S = Σ_j s_j,

where θ_ref is the parameter values before the first step and each s_j is an
erfi-shaped function of two running sums of h = Σ_p ⟨Δ_t, g_t⟩ (a "betting" scale per
discount β_j).  The maths is the package's
(``ComputationalRobotics/TRAC@320a100:package/src/trac_optimizer/trac.py``, PyPI
``trac-optimizer`` 0.0.2):

1. keep g_t and θ_t;  2. base step → θ';  3. at the first call θ_ref ← θ_t;
4. Δ_t = (θ_t − θ_ref)/(S_t + ε);  5. u_t = θ' − θ_t;  6. h = Σ_p ⟨Δ_t, g_t⟩;
7. Δ_{t+1} = Δ_t + u_t;  8. v_j ← β_j² v_j + h²,  σ_j ← β_j σ_j − h  (v = 0, σ = 1e-8 at start);
9. s_j = s_init/erfi(1/√2) · erfi(σ_j/(√2 √v_j + ε));  10. θ_{t+1} = θ_ref + max(S, 0)·Δ_{t+1}.

What differs from the package is only how it is computed: foreach ops under
``no_grad``, no host synchronisation (the package raises on a NaN product per
parameter, takes a Python ``max`` on a tensor and writes an ``.item()`` log line per
step).  A non-finite h or s sets a per-member device flag (``nonfinite()``) that the
loop reads at its logging cadence, and ``scale()`` gives S per member for
``optim/trac_scale``.  erfi is the package's: Weideman's (1994) 128-term series for the
Faddeeva function, with the package's coefficients, evaluated here in float64.

Populations: the parameters are member-first (dim 0 = member), every member has its own
h, v, σ and s (``[M, n_betas]``), so member k of a population follows its single run.
An ordinary model is one member.  ``optimizer.state`` / ``param_groups`` are the base's,
so code that reads or resets the moments (``resets.clear_optimizer_state_``) sees the
base's state; TRAC's own state (θ_ref, s, v, σ, the iteration count) travels in
``state_dict()`` with the base's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from plasticity.flags import POSITIVE, Range, ranged
from plasticity.intervention import Intervention, MethodFlags, Parts, Setting

DEFAULT_BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)
TRAC_BASES = ("adam", "adamw", "sgd")
BETA = Range(low=0.0, high=1.0, high_open=True)


# --- erfi: Weideman's series for the Faddeeva function w(z), as the package builds it -------------------------

_WEIDEMAN_TERMS = 128


class _Weideman:
    """The package's constants of Weideman's (1994) series for w(z), built the same way, in float32.

    The package samples f on the 2M − 1 points k = −M+1..M−1 (without the leading zero of
    Weideman's own listing) and divides the FFT by 2M; we keep that, so erfi is the package's
    (about 1% from the true erfi, which the scale s_init/erfi(1/√2)·erfi(·) mostly cancels).
    """

    def __init__(self, n: int = _WEIDEMAN_TERMS):
        m = 2 * n
        self.i = torch.complex(torch.tensor(0.0), torch.tensor(1.0))
        k = torch.linspace(-m + 1, m - 1, 2 * m - 1)
        self.length = torch.sqrt(n / torch.sqrt(torch.tensor(2.0)))
        t = self.length * torch.tan(k * torch.pi / m / 2)
        f = torch.exp(-t ** 2) * (self.length ** 2 + t ** 2)
        a = torch.fft.fft(torch.fft.fftshift(f)).real / (2 * m)
        self.a = torch.flipud(a[1:n + 1])  # highest power first
        self.inv_sqrt_pi = 1 / torch.sqrt(torch.tensor(torch.pi))
        # float64 copies for the batched evaluation (off the CPU)
        self.a64 = self.a.double()
        self.length64 = float(self.length)
        self.exponents = torch.arange(n - 1, -1, -1, dtype=torch.float64)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def erfi_horner(self, x: torch.Tensor) -> torch.Tensor:
        """erfi(x) exactly as the package computes it on a float32 tensor: complex64, Horner's rule, erf(ix)/i."""
        iz = torch.complex(torch.zeros_like(x), x)
        sign_r, sign_i = torch.sign(iz.real), torch.sign(iz.imag)
        z = torch.complex(torch.abs(iz.real), torch.abs(iz.imag))
        u = z * self.i  # w is evaluated at i·z
        denominator = self.length - self.i * u
        big_z = (self.length + self.i * u) / denominator
        p = 0
        for index in range(len(self.a) - 1):
            p = (p + self.a[index]) * big_z
        p = p + self.a[-1]
        w = 2 * p / denominator ** 2 + self.inv_sqrt_pi / denominator
        out = -torch.exp(torch.log(w) - z ** 2) + 1
        return torch.complex(out.real * sign_r, out.imag * sign_i).imag

    def erfi_batched(self, x: torch.Tensor) -> torch.Tensor:
        """The same series without Horner's 127 dependent steps (kernel launches on a GPU), in float64.

        For real t, |Z| = 1 with Z = (L + it)/(L − it), so Z^k = exp(ikφ), φ = 2·atan(t/L);
        erfi(x) = sign(x)·exp(x²)·(−Im w(−|x|)).
        """
        if x.device not in self._on:
            self._on[x.device] = (self.a64.to(x.device), self.exponents.to(x.device))
        a, exponents = self._on[x.device]
        xd = x.to(torch.float64)
        t = -xd.abs()
        angles = (2.0 * torch.atan(t / self.length64)).unsqueeze(-1) * exponents
        p = torch.complex((a * torch.cos(angles)).sum(-1), (a * torch.sin(angles)).sum(-1))
        denominator = torch.complex(torch.full_like(t, self.length64), -t)  # L − i t
        w = 2.0 * p / denominator ** 2 + (1.0 / math.sqrt(math.pi)) / denominator
        return (torch.sign(xd) * torch.exp(xd ** 2) * -w.imag).to(x.dtype)


_SERIES = _Weideman()


def erfi(x: torch.Tensor, exact: bool | None = None) -> torch.Tensor:
    """The imaginary error function erfi(x) = −i·erf(ix) of a real tensor, elementwise, in ``x``'s dtype.

    ``exact`` (default: on the CPU) evaluates the package's series in the package's own float32
    operations, so CPU runs reproduce the package bit for bit (TRAC's scale is an exponential of
    a ratio of running sums: the trajectories amplify rounding differences).  Elsewhere the same
    series is evaluated in one batched float64 pass (relative difference to the package ~1e-6,
    ~1e-5 near |x| = 9 where the package's float32 loses digits).  No host sync either way.
    """
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if exact is None:
        exact = x.device.type == "cpu"
    if exact:
        return _SERIES.erfi_horner(x.float()).to(x.dtype)
    return _SERIES.erfi_batched(x)


# --- the optimiser -------------------------------------------------------------------------------------------------


def _member_first(params: list[torch.Tensor]) -> bool:
    """Whether ``params`` look like a population's (every tensor ``[M, ...]`` with one M): biases are 2-D there."""
    return bool(params) and all(p.dim() >= 2 for p in params) and len({p.shape[0] for p in params}) == 1


class TRAC(torch.optim.Optimizer):
    """TRAC around ``base_optimizer`` (an already built Adam/AdamW/SGD over the model's parameters).

    ``step()`` runs the base step and TRAC's rescaling; ``state``, ``param_groups``,
    ``defaults``, ``zero_grad`` and ``add_param_group`` are the base's.  ``member_dim``: whether
    the parameters are member-first ``[M, ...]`` (one scale per member); None infers it (every
    parameter ≥ 2-D with one common dim-0 size, as in ``plasticity.networks`` models) -- pass it
    for an ordinary model whose parameters happen to look like that.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, betas=DEFAULT_BETAS, s_init: float = 1e-8,
                 eps: float = 1e-8, *, member_dim: bool | None = None):
        # No Optimizer.__init__: the parameter groups and the state are the base's, not copies.
        betas = tuple(float(b) for b in betas)
        if not betas:
            raise ValueError("TRAC needs at least one beta")
        BETA.check("trac-betas", list(betas))
        POSITIVE.check("trac-s-init", s_init)
        POSITIVE.check("trac-eps", eps)
        self.base = base_optimizer
        self.betas, self.s_init, self.eps = betas, float(s_init), float(eps)
        params = self._params()
        self.member_dim = _member_first(params) if member_dim is None else bool(member_dim)
        self.members = params[0].shape[0] if self.member_dim else 1
        device = params[0].device if params else torch.device("cpu")
        dtype = torch.float32  # the package's: TRAC's scalars are float32 whatever the parameters' dtype
        shape = (self.members, len(betas))
        self._betas = torch.tensor(betas, dtype=dtype, device=device)  # float32 like the package
        self._betas_sq = self._betas ** 2
        self.s = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.sigma = torch.full(shape, 1e-8, dtype=dtype, device=device)
        self._nonfinite = torch.zeros(self.members, dtype=torch.bool, device=device)
        self.theta_ref: dict[torch.Tensor, torch.Tensor] = {}
        self.iterations = 0
        # s_init/erfi(1/√2), computed the package's way (float32 operands)
        half = torch.tensor(1.0, dtype=dtype, device=device) / torch.sqrt(torch.tensor(2.0, dtype=dtype,
                                                                                       device=device))
        self._f_term = torch.tensor(self.s_init, dtype=dtype, device=device) / erfi(half)
        self._sqrt2 = torch.sqrt(torch.tensor(2.0, dtype=dtype, device=device))

    # -- what other code sees: the base optimiser --
    @property
    def param_groups(self):
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    @property
    def defaults(self):
        return self.base.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.base.add_param_group(param_group)

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"TRAC(betas={self.betas}, s_init={self.s_init}, eps={self.eps}, members={self.members}, " \
               f"base={self.base!r})"

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.base.param_groups for p in group["params"]]

    def _member_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        """The shape a per-member ``[M]`` tensor takes to broadcast against ``p``."""
        return (self.members, *([1] * (p.dim() - 1))) if self.member_dim else ()

    def _flat(self, p: torch.Tensor) -> torch.Tensor:
        return p.reshape(p.shape[0], -1) if self.member_dim else p.reshape(1, -1)

    # -- the step --
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            everything = self._params()
            if not self.theta_ref:  # 3: the pre-step values of every parameter at the first call
                self.theta_ref = {p: p.detach().clone() for p in everything}
            params = [p for p in everything if p.grad is not None]
            for p in params:  # a parameter added after the first step starts from where it is now
                if p not in self.theta_ref:
                    self.theta_ref[p] = p.detach().clone()
            refs = [self.theta_ref[p] for p in params]
            shapes = [self._member_shape(p) for p in params]
            total = self.s.sum(-1)  # S_t [M]
            denominator = total + self.eps
            delta = []
            if params:  # 4: Δ_t
                delta = torch._foreach_sub(params, refs)
                torch._foreach_div_(delta, [denominator.view(s) for s in shapes])
            h = torch.zeros(self.members, dtype=params[0].dtype if params else self.s.dtype, device=self.s.device)
            for d, p in zip(delta, params):  # 6: h = Σ_p <Δ_t, g_t>, per member
                if self.member_dim:  # a batched dot whose rows do not depend on M: a member computes its single run
                    h += torch.bmm(self._flat(d).unsqueeze(1), self._flat(p.grad).unsqueeze(2)).view(-1)
                else:  # the package's dot, so an ordinary model reproduces it to the bit
                    h += torch.dot(d.reshape(-1), p.grad.reshape(-1))
            previous = [p.detach().clone() for p in params]  # 1: θ_t
        self.base.step()  # 2: θ'
        with torch.no_grad():
            if params:
                torch._foreach_sub_(previous, params)  # θ_t − θ' = −u_t (5)
                torch._foreach_sub_(delta, previous)  # 7: Δ_{t+1} = Δ_t + u_t
            h = h.unsqueeze(-1)  # the package's roundings: h² in h's dtype, then each rounded to the state's
            self.v.mul_(self._betas_sq).add_(h.square().to(self.v.dtype))  # 8
            self.sigma.mul_(self._betas).sub_(h.to(self.sigma.dtype))
            s = self._f_term * erfi(self.sigma / (self._sqrt2 * self.v.sqrt() + self.eps))  # 9
            self.s.copy_(s)
            self._nonfinite |= ~torch.isfinite(h.squeeze(-1)) | ~torch.isfinite(s).all(-1)
            scale = self.s.sum(-1).clamp(min=0.0)  # max(S, 0) per member (NaN stays NaN, as in the package)
            if params:  # 10: θ_{t+1} = θ_ref + max(S, 0)·Δ_{t+1}
                torch._foreach_mul_(delta, [scale.view(s) for s in shapes])
                torch._foreach_add_(delta, refs)
                torch._foreach_copy_(params, delta)
            self.iterations += 1
        return loss

    # -- for the logger --
    def scale(self) -> torch.Tensor:
        """S = Σ_j s_j per member ``[M]`` (a copy; ``optim/trac_scale``)."""
        return self.s.sum(-1).clone()

    def nonfinite(self) -> torch.Tensor:
        """``[M]`` bool: a NaN/inf h or s has occurred in that member (the package raises at once; read it rarely)."""
        return self._nonfinite.clone()

    # -- checkpoints --
    def state_dict(self) -> dict:
        params = self._params()
        refs = [self.theta_ref[p].clone() if p in self.theta_ref else None for p in params] if self.theta_ref else None
        return {"base": self.base.state_dict(),
                "trac": {"theta_ref": refs, "s": self.s.clone(), "v": self.v.clone(), "sigma": self.sigma.clone(),
                         "nonfinite": self._nonfinite.clone(), "iterations": self.iterations,
                         "betas": list(self.betas), "s_init": self.s_init, "eps": self.eps,
                         "members": self.members}}

    def load_state_dict(self, state_dict: dict) -> None:
        trac = state_dict["trac"]
        if list(trac["betas"]) != list(self.betas) or trac["members"] != self.members:
            raise ValueError(f"TRAC state with betas {trac['betas']} and {trac['members']} members cannot be loaded "
                             f"into TRAC with betas {list(self.betas)} and {self.members} members")
        self.base.load_state_dict(state_dict["base"])
        with torch.no_grad():
            for mine, saved in ((self.s, trac["s"]), (self.v, trac["v"]), (self.sigma, trac["sigma"]),
                                (self._nonfinite, trac["nonfinite"])):
                mine.copy_(saved)
            params = self._params()
            if trac["theta_ref"] is None:
                self.theta_ref = {}
            else:
                if len(trac["theta_ref"]) != len(params):
                    raise ValueError(f"TRAC state holds {len(trac['theta_ref'])} reference tensors for "
                                     f"{len(params)} parameters")
                self.theta_ref = {p: ref.to(device=p.device, dtype=p.dtype, copy=True)
                                  for p, ref in zip(params, trac["theta_ref"]) if ref is not None}
        self.iterations = int(trac["iterations"])


# --- flags ---------------------------------------------------------------------------------------------------------


class TRACMonitor(Intervention):
    """What the loop logs of TRAC: ``optim/trac_scale`` (S per member) and ``optim/trac_nonfinite`` (0/1)."""

    name = "trac"

    def __init__(self, optimizer: TRAC):
        self.optimizer = optimizer

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"optim/trac_scale": self.optimizer.scale(),
                "optim/trac_nonfinite": self.optimizer.nonfinite().float()}


_SETTINGS = ("trac_betas", "trac_s_init", "trac_eps")


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@dataclass
class TRACFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"trac": "trac"}

    trac: bool = False
    """TRAC: wrap the optimiser (adam, adamw or sgd) in TRAC, theta = theta_ref + max(S, 0) * displacement (§11.1)"""
    trac_betas: list[float] = ranged(None, BETA, default_factory=lambda: list(DEFAULT_BETAS))
    """TRAC: the discounts beta_j of its scale estimates, one s_j each (S = sum_j s_j)"""
    trac_s_init: float = ranged(1e-8, POSITIVE)
    """TRAC: s_init, the initial scale (S after the first step is about 1e-7 at the default betas)"""
    trac_eps: float = ranged(1e-8, POSITIVE)
    """TRAC: epsilon in Delta = (theta - theta_ref)/(S + eps) and in erfi(sigma/(sqrt(2 v) + eps))"""

    def check(self, setting: Setting) -> None:
        if not self.trac:
            defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                        for f in dataclasses.fields(TRACFlags) if f.name in _SETTINGS}
            changed = ["--" + name.replace("_", "-") for name in _SETTINGS
                       if _as_list(getattr(self, name)) != _as_list(defaults[name])]
            if changed:
                raise ValueError(f"{', '.join(changed)} {'needs' if len(changed) == 1 else 'need'} --trac")
            return
        if not self.trac_betas:
            raise ValueError("--trac-betas needs at least one value")
        optimizer = getattr(self, "optimizer", "adam")
        if optimizer not in TRAC_BASES:
            raise ValueError(f"--trac wraps --optimizer adam, adamw or sgd only; got --optimizer {optimizer}")

    def build(self, parts: Parts) -> TRACMonitor | None:
        if not self.trac:
            return None
        if not isinstance(parts.optimizer, TRAC):
            raise ValueError("--trac is on but the optimiser is not a TRAC (build_optimizer must wrap the base)")
        return TRACMonitor(parts.optimizer)
