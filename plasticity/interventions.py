"""One object that applies every enabled plasticity intervention (spec methods.md §2-§8).

The agent's loop stays a few visible lines:

    interventions = interventions_from_args(args, q_network, optimizer, target_model=target_network)
    loss = td_loss + interventions.penalty()                   # L2, L2-Init
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    interventions.after_step(global_step, sample_obs)          # CBP, SWR, S&P, ReDo, head reset
    if task_switched: interventions.on_task_switch()           # S&P / head reset "at task switches"

Schedules: ``step`` is the agent's global step.  A method with period N fires
whenever a multiple of N is reached since the previous ``after_step`` call, so
periods work when updates happen only every ``train_frequency`` steps.
- S&P: ``snp`` = α; ``snp_every`` = N > 0 applies it every N steps, 0 at task switches.
- ReDo: ``redo_every`` = N > 0 turns it on (τ = ``redo_tau``; τ = 0 recycles exactly dead units; τ alone
  does nothing, so a default τ = 0.1 in the flags is fine); needs ``sample_obs(batch_size)`` returning
  replay observations the model accepts.
- Head reset: ``reset_head_every`` = N > 0 every N steps, −1 at task switches, 0 off.
Order inside ``after_step``: CBP first (its bias correction is exact for the
network whose forward it recorded), then SWR (which then scales that network
by exactly Π c), then the periodic resets.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from plasticity.cbp import ContinualBackprop, check_cbp_args
from plasticity.regularizers import L2InitPenalty, L2Penalty
from plasticity.resets import ReDo, reset_head_, shrink_and_perturb_
from plasticity.swr import SoftWeightRescaling

AT_TASK_SWITCHES = -1
# Agents build their network right after torch.manual_seed(seed). A generator seeded with the same
# value would redraw exactly θ0, turning the first S&P into an interpolation toward θ0 (pitfall 4), so
# the interventions' generator is seeded with `seed` mixed with this constant (the golden-ratio 64-bit word).
_SEED_MIX = 0x9E3779B97F4A7C15


def generator_seed(seed: int) -> int:
    """Seed of the interventions' own generator for a run seeded with ``seed`` (never ``seed`` itself)."""
    return (seed ^ _SEED_MIX) & (2**63 - 1)


def _check_period(flag: str, value: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{flag} must be an integer >= {minimum}; got {value!r}")


def _crossed(previous: int, step: int, every: int) -> bool:
    """True when a multiple of ``every`` lies in (previous, step]."""
    return step // every > previous // every


class Interventions:
    """Every plasticity toggle of the agents; defaults turn everything off.

    ``penalty()`` is the L2 (§2) and L2-Init (§3) term (λ/2)Σ‖W‖² + (λ/2)Σ‖θ − θ0‖²
    added to the loss explicitly (not decoupled AdamW decay): its gradient λW /
    λ(θ − θ0) then goes through Adam like the loss gradient, as in Lyle et al.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, target_model: nn.Module | None = None,
                 l2: float = 0.0, l2_init: float = 0.0, swr: float = 0.0, swr_head: float | None = None,
                 cbp: bool = False, cbp_replacement_rate: float = 1e-4, cbp_maturity: int = 100,
                 cbp_decay: float = 0.99, cbp_utility: str = "contribution",
                 snp: float = 0.0, snp_every: int = 0, redo_tau: float = 0.0, redo_every: int = 0,
                 redo_batch_size: int = 256, reset_head_every: int = 0, seed: int = 0):
        check_cbp_args(cbp_replacement_rate, cbp_maturity, cbp_decay, cbp_utility)
        _check_period("snp-every", snp_every)
        _check_period("redo-every", redo_every)
        _check_period("redo-batch-size", redo_batch_size, minimum=1)
        _check_period("reset-head-every", reset_head_every, minimum=AT_TASK_SWITCHES)
        for flag, coef in (("l2", l2), ("l2-init", l2_init)):
            if not coef >= 0:
                raise ValueError(f"--{flag} must be >= 0 (0 turns it off); got {coef}")
        for flag, coef in (("swr", swr), ("swr-head", swr_head)):
            if coef is not None and not 0.0 <= coef <= 1.0:
                raise ValueError(f"--{flag} must lie in [0, 1] (λ of soft weight rescaling, 0 = off); got {coef}")
        if not 0.0 <= snp <= 1.0:
            raise ValueError(f"--snp (shrink & perturb α) must lie in [0, 1]; got {snp}")
        if snp_every > 0 and snp == 0:
            raise ValueError("--snp-every needs --snp α > 0 (the shrink & perturb coefficient)")
        if not redo_tau >= 0:
            raise ValueError(f"--redo-tau must be >= 0 (0.1 recommended); got {redo_tau}")

        self.model, self.optimizer, self.target_model = model, optimizer, target_model
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(generator_seed(seed))
        self.snp, self.snp_every = float(snp), snp_every
        self.redo_every, self.redo_batch_size = redo_every, redo_batch_size
        self.reset_head_every = reset_head_every

        self.l2 = L2Penalty(model, l2) if l2 > 0 else None
        self.l2_init = L2InitPenalty(model, l2_init) if l2_init > 0 else None
        swr_on = swr > 0 or (swr_head is not None and swr_head > 0)
        self.swr = SoftWeightRescaling(model, swr, swr_head) if swr_on else None
        self.cbp = (ContinualBackprop(model, optimizer, cbp_replacement_rate, int(cbp_maturity), cbp_decay,
                                      cbp_utility, self.generator) if cbp else None)
        self.redo = ReDo(model, optimizer, redo_tau, self.generator) if redo_every > 0 else None

        self.enabled: tuple[str, ...] = tuple(name for name, on in (
            ("l2", self.l2), ("l2_init", self.l2_init), ("swr", self.swr), ("cbp", self.cbp),
            ("snp", self.snp > 0), ("redo", self.redo), ("reset_head", reset_head_every != 0)) if on)
        self._last_step: int | None = None
        self._zero = torch.zeros((), device=device)
        self._l2_value = self._zero
        self._l2_init_value = self._zero
        self.redo_resets = torch.zeros((), dtype=torch.long, device=device)
        self.snp_applications = torch.zeros((), dtype=torch.long, device=device)
        self.head_resets = torch.zeros((), dtype=torch.long, device=device)

    @property
    def active(self) -> bool:
        return bool(self.enabled)

    def penalty(self) -> torch.Tensor:
        """(λ/2)Σ‖W‖² + (λ/2)Σ‖θ − θ0‖² (§2, §3) as a 0-dim tensor with gradient; 0 when both are off."""
        total = self._zero
        if self.l2 is not None:
            value = self.l2()
            self._l2_value = value.detach()
            total = total + value
        if self.l2_init is not None:
            value = self.l2_init()
            self._l2_init_value = value.detach()
            total = total + value
        return total

    def after_step(self, step: int, sample_obs: Callable[[int], torch.Tensor] | None = None) -> None:
        """Call right after ``optimizer.step()``: CBP and SWR every step, then the periodic resets."""
        previous = step - 1 if self._last_step is None else self._last_step
        self._last_step = step
        if self.cbp is not None:
            self.cbp.step()
        if self.swr is not None:
            self.swr.step()
        if self.snp_every > 0 and _crossed(previous, step, self.snp_every):
            self._shrink_and_perturb()
        if self.redo is not None and _crossed(previous, step, self.redo_every):
            if sample_obs is None:
                raise ValueError("ReDo is on (--redo-every > 0): pass sample_obs, a function returning a batch of "
                                 "replay observations, to after_step")
            self.redo_resets += self.redo.reset(sample_obs(self.redo_batch_size))
        if self.reset_head_every > 0 and _crossed(previous, step, self.reset_head_every):
            self._reset_head()

    def on_task_switch(self) -> None:
        """Methods scheduled at task switches: S&P when ``snp_every == 0``, head reset when ``reset_head_every == -1``."""
        if self.snp > 0 and self.snp_every == 0:
            self._shrink_and_perturb()
        if self.reset_head_every == AT_TASK_SWITCHES:
            self._reset_head()

    def _shrink_and_perturb(self) -> None:
        # Optimiser state is kept: S&P (§6) changes the parameters only.
        shrink_and_perturb_(self.model, self.snp, self.generator)
        self.snp_applications += 1

    def _reset_head(self) -> None:
        reset_head_(self.model, self.optimizer, self.target_model, self.generator)
        self.head_resets += 1

    def scalars(self) -> dict[str, torch.Tensor]:
        """0-dim device tensors of the enabled methods, for TensorBoard (no host sync here)."""
        scalars = {}
        if self.l2 is not None:
            scalars["plasticity/l2_penalty"] = self._l2_value
        if self.l2_init is not None:
            scalars["plasticity/l2_init_penalty"] = self._l2_init_value
        if self.swr is not None:
            scalars["plasticity/swr_scale"] = self.swr.last_scale
        # Counters are updated in place: hand out copies so a logger holding them sees this step's value.
        if self.cbp is not None:
            scalars["plasticity/cbp_replacements"] = self.cbp.replacements.clone()
        if self.redo is not None:
            scalars["plasticity/redo_resets"] = self.redo_resets.clone()
        if self.snp > 0:
            scalars["plasticity/snp_applications"] = self.snp_applications.clone()
        if self.reset_head_every != 0:
            scalars["plasticity/head_resets"] = self.head_resets.clone()
        return scalars

    def state_dict(self) -> dict:
        """Tensors and Python scalars only, so ``torch.load(weights_only=True)`` reads it back."""
        return {
            "last_step": self._last_step,
            "generator": self.generator.get_state(),
            "l2_init": self.l2_init.state_dict() if self.l2_init is not None else None,
            "swr": self.swr.state_dict() if self.swr is not None else None,
            "cbp": self.cbp.state_dict() if self.cbp is not None else None,
            "counters": {"redo_resets": self.redo_resets.clone(), "snp_applications": self.snp_applications.clone(),
                         "head_resets": self.head_resets.clone()},
        }

    def load_state_dict(self, state: dict) -> None:
        for name, method in (("l2_init", self.l2_init), ("swr", self.swr), ("cbp", self.cbp)):
            if (state[name] is None) != (method is None):
                raise ValueError(f"checkpoint has {name} {'off' if state[name] is None else 'on'} but this run has "
                                 f"it {'off' if method is None else 'on'}: resume with the same plasticity flags")
            if method is not None:
                method.load_state_dict(state[name])
        self._last_step = state["last_step"]
        self.generator.set_state(state["generator"])
        for name, counter in state["counters"].items():
            getattr(self, name).copy_(counter)


def interventions_from_args(args, model: nn.Module, optimizer: torch.optim.Optimizer,
                            target_model: nn.Module | None = None) -> Interventions:
    """Build ``Interventions`` from an ``Args`` dataclass: fields named like its keyword arguments
    (``l2``, ``swr``, ``cbp_maturity``, ``seed``, ...) are used, missing ones keep the defaults."""
    keywords = [name for name, parameter in inspect.signature(Interventions.__init__).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "target_model"]
    kwargs = {name: getattr(args, name) for name in keywords if hasattr(args, name)}
    if kwargs.get("redo_every", 0) == 0:
        kwargs.pop("redo_tau", None)  # the agents' default tau (0.1) only matters once ReDo is on
    return Interventions(model, optimizer, target_model=target_model, **kwargs)
