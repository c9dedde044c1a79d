"""Every plasticity method behind one object, for the agents or any PyTorch loop (spec methods.md, methods-v2.md).

The loop stays a few visible lines:

    optimizer = build_optimizer(q_network, args, args.learning_rate)   # --optimizer, --trac (plasticity.optimizers)
    interventions = Interventions(q_network, optimizer, args, target_model=target_network, seed=args.seed)
    # or, flags as keywords: Interventions(model, optimizer, swr=1e-3, cbp=True, redo_every=100)
    for each gradient step:
        loss = td_loss + interventions.penalty(td_loss_per_member, sample_obs)  # L2, L2-Init, Parseval, C-CHAIN
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        interventions.after_step(update, sample_obs)   # CBP, SWR/NaP, clipping, tortoise EMA, LR schedule, S&P, ReDo
    after each env step (and the target sync):
        interventions.after_env_step(previous_t, t, synced=..., task_switched=..., sample_obs=...)
        # optimiser resets, layer/hare resets, injection, the "at task switches" events

``METHODS`` lists each method's flags class once; that is the only registration a
new method needs (its module holds the flags, their ranges and rules, and the
construction).  Its order is the order of events of methods-v2.md §0: penalties
(L2, L2-Init, Parseval, C-CHAIN); after an update CBP first (its bias correction is
exact for the network whose forward it recorded), then SWR or NaP (which then scale
that network), weight clipping, the tortoise's EMA, then the update-counted resets
(S&P, ReDo, head reset); after an env step the optimiser reset on a target sync,
layer and hare resets, injection, then the task-switch events and the optimiser
reset "every N".  ``check_combinations`` holds the rules between two methods.

Schedules: ``after_step(update)`` takes the update count, ``after_env_step(previous_t, t)``
the env steps; a method with period N fires whenever a multiple of N is reached since
the previous call.  All methods draw from per-member streams seeded from the run seed
(never the seed itself, pitfall 4).  A method that rewrites parameters in a discrete
event sets ``rewrote``; every method then hears ``on_rewrite()`` (C-CHAIN's reference refresh).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from plasticity.c_chain import CChainFlags
from plasticity.cbp import CBPFlags
from plasticity.flags import check_ranges
from plasticity.hare_tortoise import HareTortoiseFlags
from plasticity.injection import PlasticityInjectionFlags
from plasticity.intervention import Intervention, MethodFlags, Parts, SampleObs, Setting
from plasticity.kron import KronFlags
from plasticity.layer_resets import LayerResetFlags
from plasticity.nap import NaPFlags
from plasticity.optimizer_reset import ResetOptimizerFlags
from plasticity.optimizers import OptimizerFlags
from plasticity.parseval import ParsevalFlags
from plasticity.population import members_of
from plasticity.regularizers import L2Flags, L2InitFlags
from plasticity.resets import HeadResetFlags, ReDoFlags, SnPFlags
from plasticity.streams import MemberRandom
from plasticity.swr import SWRFlags
from plasticity.trac import TRACFlags
from plasticity.weight_clip import WeightClipFlags

#: Every method's flags, in the order of events (see the module docstring).
METHODS: tuple[type[MethodFlags], ...] = (OptimizerFlags, TRACFlags, KronFlags, L2Flags, L2InitFlags, ParsevalFlags,
                                          CChainFlags, CBPFlags, SWRFlags, NaPFlags, WeightClipFlags,
                                          ResetOptimizerFlags, HareTortoiseFlags, LayerResetFlags, SnPFlags,
                                          ReDoFlags, HeadResetFlags, PlasticityInjectionFlags)


DEFAULT_SETTING = Setting()


@dataclass
class InterventionFlags(*reversed(METHODS)):
    """The flags of every method in ``METHODS`` (the agents' ``Args`` inherit them: ``--swr``, ``--cbp``, ...)."""


def _on(flags, name: str, off=0) -> bool:
    value = getattr(flags, name, off)
    return bool(value) and value != off


def rewrites_on(flags) -> list[str]:
    """The flags of every enabled method that rewrites parameters outside ``optimizer.step()`` (§0 R1-R3)."""
    rewrites = [("--swr", "swr"), ("--nap", "nap"), ("--weight-clip", "weight_clip"), ("--cbp", "cbp"),
                ("--redo-every", "redo_every"), ("--snp", "snp"), ("--reset-layers", "reset_layers"),
                ("--reset-head-every", "reset_head_every"), ("--hare-tortoise", "hare_tortoise")]
    named = [flag for flag, name in rewrites if _on(flags, name, "" if name == "reset_layers" else 0)]
    if injection_on(flags):
        named.append("--plasticity-injection-at")
    return named


def injection_on(flags) -> bool:
    return bool(getattr(flags, "plasticity_injection_at", None)) or _on(flags, "plasticity_injection_at_task_switch")


def check_combinations(flags, setting: Setting = DEFAULT_SETTING) -> None:
    """The configuration errors between methods (methods-v2.md, "Configuration errors"); ValueError on the first.

    A method's rules about its own flags live in its flags class; these involve two methods.
    """
    swr = _on(flags, "swr")
    if swr and getattr(flags, "activation", "relu") == "dff":
        raise ValueError("--swr with --activation dff: SWR's output-scaling theorem needs a positively homogeneous "
                         "activation (relu, crelu); DFF's sin/cos is not")
    if swr and injection_on(flags):
        raise ValueError("--swr with plasticity injection: SWR's theorem needs every layer rescaled, and the frozen "
                         "injected heads are not; drop one of them")
    if injection_on(flags):
        # [U] R2 (frozen tensors are never rewritten) against methods whose rewrite would reach them: after an
        # injection the last hidden block (last:2) or the head is frozen, so a unit replacement would have to
        # zero outgoing weights in a frozen tensor, and a head reset would re-draw a frozen head.
        clashing = [flag for flag, name in (("--cbp", "cbp"), ("--redo-every", "redo_every"),
                                            ("--reset-head-every", "reset_head_every")) if _on(flags, name)]
        if clashing:
            raise ValueError(f"plasticity injection with {' '.join(clashing)}: after the injection the original "
                             "head is frozen, and these methods would rewrite it (or zero its input columns), which "
                             "no frozen tensor may undergo; drop one of them")
    if swr and _on(flags, "parseval") and (_on(flags, "parseval_diag") or _on(flags, "input_scale_learnable")):
        raise ValueError("--swr with --parseval-diag/--input-scale-learnable: SWR's bias rule does not rescale the "
                         "diagonal layers' shift or the input scale, so its output scaling would no longer be exact; "
                         "drop one of them")
    if _on(flags, "weight_clip") and _on(flags, "parseval"):
        raise ValueError("--weight-clip with --parseval: clipping bounds come from a uniform initialiser, and "
                         "--parseval switches to an orthogonal one (no bound s_l)")
    if _on(flags, "trac"):
        rewrites = rewrites_on(flags)
        if rewrites:
            raise ValueError(f"--trac with {' '.join(rewrites)}: TRAC rescales the displacement from its reference "
                             "point, so a rewrite outside optimizer.step() would be rescaled too; TRAC combines "
                             "with penalties (--l2, --l2-init, --parseval, --c-chain) only")
    if _on(flags, "hare_tortoise"):
        if injection_on(flags):
            raise ValueError("--hare-tortoise with plasticity injection: a hare reset would restore the pre-injection "
                             "heads from the tortoise")
        if getattr(flags, "hare_tortoise_target", "network") == "tortoise" and \
                getattr(flags, "reset_optimizer", "off") == "target-update":
            raise ValueError("--reset-optimizer target-update with --hare-tortoise-target tortoise: the tortoise "
                             "target has no discrete syncs to reset at; use --reset-optimizer every")


def check_intervention_flags(flags: InterventionFlags, setting: Setting = DEFAULT_SETTING) -> None:
    """Ranges (from their declarations), then each method's own combination rules, then the rules between
    methods; ValueError on the first."""
    check_ranges(flags)
    for method in METHODS:
        method.check(flags, setting)
    check_combinations(flags, setting)


# Agents build their network right after torch.manual_seed(seed). A generator seeded with the same
# value would redraw exactly θ0, turning the first S&P into an interpolation toward θ0 (pitfall 4), so
# the interventions' generator is seeded with `seed` mixed with this constant (the golden-ratio 64-bit word).
_SEED_MIX = 0x9E3779B97F4A7C15


def generator_seed(seed: int) -> int:
    """Seed of the interventions' own generator for a run seeded with ``seed`` (never ``seed`` itself)."""
    return (seed ^ _SEED_MIX) & (2**63 - 1)


class Interventions:
    """The enabled methods of ``flags`` on ``model``; defaults turn everything off.

    ``flags`` is any ``InterventionFlags`` (the agents pass their ``Args``); or give the
    flags as keywords (``Interventions(model, optimizer, swr=0.01, cbp=True)``).
    ``penalty()`` is the L2 (§2) and L2-Init (§3) term added to the loss explicitly (not
    decoupled AdamW decay): its gradient then goes through Adam like the loss gradient.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 flags: InterventionFlags | None = None, *, target_model: nn.Module | None = None,
                 seed: int | Sequence[int] = 0, setting: Setting = DEFAULT_SETTING, **flag_values):
        if flags is None:
            flags = InterventionFlags(**flag_values)
        elif flag_values:
            raise TypeError("give the flags either as an InterventionFlags object or as keywords, not both")
        check_intervention_flags(flags, setting)
        self.model, self.optimizer, self.target_model = model, optimizer, target_model
        device = next(model.parameters()).device
        seeds = [seed] if isinstance(seed, int) else list(seed)
        if len(seeds) != members_of(model):
            raise ValueError(f"one seed per member: got {len(seeds)} seeds for a model of {members_of(model)} members")
        self.random = MemberRandom([generator_seed(s) for s in seeds], device)
        parts = Parts(model, optimizer, target_model, self.random, setting)
        built = (method.build(flags, parts) for method in METHODS)
        self.methods: dict[str, Intervention] = {method.name: method for method in built if method is not None}
        self._penalties = [method for method in self.methods.values()
                           if type(method).penalty is not Intervention.penalty]
        self._last_step: int | None = None
        self._zero = torch.zeros((), device=device)

    def network_for(self, role: str, online: nn.Module) -> nn.Module:
        """The network that acts (``role="act"``) or is evaluated (``"eval"``): ``online``, unless a method
        keeps another one for it (Hare & Tortoise: ``--hare-tortoise-act/-eval tortoise``)."""
        for method in self.methods.values():
            model_for = getattr(method, "model_for", None)
            if model_for is not None:
                return model_for(role, online)
        return online

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(self.methods)

    @property
    def active(self) -> bool:
        return bool(self.methods)

    def penalty(self, td_loss: torch.Tensor | None = None, sample_obs: SampleObs | None = None) -> torch.Tensor:
        """The sum of the enabled penalties as a 0-dim tensor with gradient; 0 when none is on.

        ``td_loss [M]``: the update's TD loss per member (C-CHAIN's automatic coefficient);
        ``sample_obs(n)``: replay observations (C-CHAIN's reference batch, drawn after the TD batch).
        """
        total = self._zero
        td_loss = td_loss.detach() if td_loss is not None else None
        for method in self._penalties:
            total = total + method.penalty(td_loss, sample_obs)
        return total

    def _after_rewrites(self) -> None:
        """Tell every method when one of them rewrote parameters in a discrete event (C-CHAIN's refresh)."""
        if any(method.rewrote for method in self.methods.values()):
            for method in self.methods.values():
                method.rewrote = False
            for method in self.methods.values():
                method.on_rewrite()

    def after_step(self, step: int, sample_obs: SampleObs | None = None) -> None:
        """Call right after ``optimizer.step()`` with the update count; ``sample_obs(n)`` feeds ReDo."""
        previous = step - 1 if self._last_step is None else self._last_step
        self._last_step = step
        for method in self.methods.values():
            method.after_update(previous, step, sample_obs)
        self._after_rewrites()

    def after_env_step(self, previous_t: int, t: int, *, synced: bool = False, task_switched: bool = False,
                       sample_obs: SampleObs | None = None) -> None:
        """The env-step events after the target sync (methods-v2.md §0 step 3), in their fixed order.

        ``(previous_t, t]``: the env steps just taken; ``synced``: the target network was just synced;
        ``task_switched``: the environment switched tasks in this step.
        """
        for method in self.methods.values():
            method.after_env_step(previous_t, t, synced, sample_obs)
        self._after_rewrites()
        if task_switched:
            self.on_task_switch()
        for method in self.methods.values():
            method.end_env_step(previous_t, t)
        self._after_rewrites()

    def on_task_switch(self) -> None:
        for method in self.methods.values():
            method.on_task_switch()
        self._after_rewrites()

    def scalars(self) -> dict[str, torch.Tensor]:
        """0-dim device tensors of the enabled methods, for TensorBoard (no host sync here)."""
        return {tag: value for method in self.methods.values() for tag, value in method.scalars().items()}

    def state_dict(self) -> dict:
        """Tensors and Python scalars only, so ``torch.load(weights_only=True)`` reads it back."""
        return {"last_step": self._last_step, "random": self.random.state_dict(),
                "methods": {name: method.state_dict() for name, method in self.methods.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = set(state["methods"])
        if saved != set(self.methods):
            raise ValueError(f"checkpoint has the methods {sorted(saved) or 'none'} on, this run "
                             f"{sorted(self.methods) or 'none'}: resume with the same plasticity flags")
        for name, method in self.methods.items():
            method.load_state_dict(state["methods"][name])
        self._last_step = state["last_step"]
        self.random.load_state_dict(state["random"])
