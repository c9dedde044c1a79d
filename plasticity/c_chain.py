"""C-CHAIN: a churn penalty toward the previous update's network, with an automatic coefficient (methods-v2.md §10).

Per gradient step u the loss becomes ``L_TD(θ_u; B_train) + λ_u·L_churn`` with

    L_churn = mean over s in B_ref and a in A of (Q_θu(s, a) − sg[Q_θ(u−1)(s, a)])²

on a reference batch B_ref drawn from the replay buffer right after B_train (its own
draw), and θ_(u−1) the parameters of the previous update's forward pass.  θ_(u−1) is one
buffer of tensors (the reference) evaluated with ``torch.func.functional_call`` under
no_grad; it is refreshed with ``torch._foreach_copy_`` in the same hook, after the loss and
before ``optimizer.step()`` (§0 step 2.4) -- never a deep copy.  The first update has no
reference: L_churn = 0.

λ per member: λ0 (``--c-chain-coef``) for the first ``warmup`` updates; after every later
update (counting that one) ``λ ← β·mean(|L_TD|, last W) / (mean(L_churn, last W) + 1e-8)``
from two device ring buffers ``[W, M]`` with running float64 sums (no host sync, O(M) per
update).  As in the reference code (bluecontra/C-CHAIN ``double_dqn_c_chain.py``), the churn
window holds the updates that had a reference (every update but the first), the TD window
every update.

Categorical heads: ``q-mse`` applies the rule to the expected values (``model.q_values``);
``kl`` uses KL(p_θ(u−1) ‖ p_θu) per action of the logits ``model(obs)``, averaged [U].

A discrete reset by another method (``on_rewrite``) refreshes the reference with the new
parameters, so the next churn is 0 and does not pull the network back.  Each member has its
own λ and churn, and the penalty is the sum over members: every member gets its own gradient.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from plasticity.flags import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_COUNT, ranged
from plasticity.intervention import Intervention, MethodFlags, Parts, SampleObs, Setting
from plasticity.population import members_of

C_CHAIN_DISTANCES = ("q-mse", "kl")
_EPS = 1e-8
#: The flags that set C-CHAIN up (each needs --c-chain), and those of the automatic coefficient.
_SETTINGS = ("c_chain_target_rel_scale", "c_chain_coef", "c_chain_warmup", "c_chain_window", "c_chain_fixed",
             "c_chain_distance")
_AUTOMATIC = ("c_chain_target_rel_scale", "c_chain_warmup", "c_chain_window")


class _Outputs(nn.Module):
    """``model.q_values(x)`` (or ``model(x)``: ``kind="forward"``) as a forward, so ``functional_call`` can run it."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.q_values(x) if self.kind == "q_values" else self.model(x)


class ChurnPenalty:
    """The C-CHAIN term on ``model`` (any population model: outputs ``[M, B, A]`` Q-values or ``[M, B, A, bins]``
    logits); usable in any loop.

    Call ``penalty(td_loss, ref_obs)`` exactly once per gradient step, after the TD loss and before
    ``optimizer.step()``: it returns ``Σ_m λ_m·L_churn_m`` (0-dim, with gradient into the current parameters
    only), snapshots the parameters as the next update's reference and updates λ.
    """

    def __init__(self, model: nn.Module, coef: float = 50.0, target_rel_scale: float = 0.01, warmup: int = 10_000,
                 window: int = 50_000, fixed: bool = False, distance: str = "q-mse"):
        NON_NEGATIVE.check("c-chain-coef", coef)
        POSITIVE.check("c-chain-target-rel-scale", target_rel_scale)
        COUNT.check("c-chain-warmup", warmup)
        POSITIVE_COUNT.check("c-chain-window", window)
        if distance not in C_CHAIN_DISTANCES:
            raise ValueError(f"unknown --c-chain-distance {distance!r}; choose one of {', '.join(C_CHAIN_DISTANCES)}")
        self.model = model
        self.coef, self.target_rel_scale = float(coef), float(target_rel_scale)
        self.warmup, self.window, self.fixed, self.distance = int(warmup), int(window), bool(fixed), distance
        self.members = members_of(model)
        named = list(model.named_parameters())
        if not named:
            raise ValueError("C-CHAIN needs a model with parameters")
        self.params = [p for _, p in named]
        device = self.params[0].device
        # One reference buffer, in each parameter's own layout (clone keeps channels-last strides).
        self.reference = [p.detach().clone() for p in self.params]
        kind = "q_values" if distance == "q-mse" and callable(getattr(model, "q_values", None)) else "forward"
        self._outputs = _Outputs(model, kind)
        self._reference_dict = {f"model.{name}": ref for (name, _), ref in zip(named, self.reference)}
        members = self.members
        self.lam = torch.full((members,), self.coef, device=device)
        self.td_ring = torch.zeros(window, members, device=device)
        self.churn_ring = torch.zeros(window, members, device=device)
        self.td_sum = torch.zeros(members, dtype=torch.float64, device=device)
        self.churn_sum = torch.zeros(members, dtype=torch.float64, device=device)
        self.updates = 0  # penalties computed (= gradient steps); host-known
        self.td_count = 0  # values ever pushed into each ring (the position is count % window)
        self.churn_count = 0
        self.last_churn = torch.zeros(members, device=device)

    # ------------------------------------------------------------------ the term
    def churn(self, obs: torch.Tensor) -> torch.Tensor:
        """L_churn per member ``[M]`` on ``obs [M, B, ...]`` between the current parameters and the reference."""
        current = self._outputs(obs)
        with torch.no_grad():
            reference = torch.func.functional_call(self._outputs, self._reference_dict, (obs,))
        if self.distance == "kl":
            if current.dim() < 4:
                raise ValueError(f"--c-chain-distance kl needs logits [M, B, A, bins] from the model; got shape "
                                 f"{tuple(current.shape)}")
            log_p = F.log_softmax(current, dim=-1)
            log_ref = F.log_softmax(reference, dim=-1)
            per_action = (log_ref.exp() * (log_ref - log_p)).sum(-1)  # KL(p_ref || p_u): [M, B, A]
            return per_action.flatten(1).mean(1)
        return (current - reference).square().flatten(1).mean(1)

    def penalty(self, td_loss: torch.Tensor, ref_obs: torch.Tensor) -> torch.Tensor:
        """``Σ_m λ_m·L_churn_m`` for this update; then the reference snapshot and the λ update."""
        first = self.updates == 0
        if first:  # no reference yet: L_churn = 0 (host-known, no forward needed)
            churn = torch.zeros(self.members, device=self.lam.device)
            value = churn.sum()
        else:
            churn = self.churn(ref_obs)
            value = (self.lam * churn).sum()
        with torch.no_grad():
            torch._foreach_copy_(self.reference, self.params)
            self._push("td", td_loss.detach().abs().to(self.td_ring.dtype))
            if not first:
                self._push("churn", churn.detach())
        self.updates += 1
        self.last_churn = churn.detach()
        if not self.fixed and self.updates >= self.warmup and self.churn_count > 0:
            td_mean = self.td_sum / min(self.td_count, self.window)
            churn_mean = self.churn_sum / min(self.churn_count, self.window)
            # A new tensor (never in place): this update's graph saved the λ it multiplied by.
            self.lam = (self.target_rel_scale * td_mean / (churn_mean + _EPS)).to(self.lam.dtype)
        return value

    def _push(self, which: str, values: torch.Tensor) -> None:
        ring, total = (self.td_ring, self.td_sum) if which == "td" else (self.churn_ring, self.churn_sum)
        count = self.td_count if which == "td" else self.churn_count
        row = ring[count % self.window]
        total.sub_(row).add_(values)  # the evicted value (0 until the ring is full) out, the new one in
        row.copy_(values)
        if which == "td":
            self.td_count += 1
        else:
            self.churn_count += 1

    def refresh(self) -> None:
        """Make the current parameters the reference (after a reset): the next L_churn is 0."""
        with torch.no_grad():
            torch._foreach_copy_(self.reference, self.params)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"reference": [t.clone() for t in self.reference], "lam": self.lam.clone(),
                "td_ring": self.td_ring.clone(), "churn_ring": self.churn_ring.clone(),
                "td_sum": self.td_sum.clone(), "churn_sum": self.churn_sum.clone(),
                "updates": self.updates, "td_count": self.td_count, "churn_count": self.churn_count,
                "last_churn": self.last_churn.clone()}

    def load_state_dict(self, state: dict) -> None:
        reference = state["reference"]
        if len(reference) != len(self.reference) or any(a.shape != b.shape for a, b in zip(reference, self.reference)):
            raise ValueError("C-CHAIN state does not match this model's parameters (a checkpoint of another network?)")
        for name in ("td_ring", "churn_ring"):
            if tuple(state[name].shape) != tuple(getattr(self, name).shape):
                raise ValueError(f"C-CHAIN state has a {name} of shape {tuple(state[name].shape)} ([window, members]); "
                                 f"this run has {tuple(getattr(self, name).shape)}: resume with the same "
                                 "--c-chain-window and population size")
        with torch.no_grad():
            torch._foreach_copy_(self.reference, list(reference))
            for name in ("td_ring", "churn_ring", "td_sum", "churn_sum"):
                getattr(self, name).copy_(state[name])
        device = self.lam.device
        self.lam = state["lam"].to(device, self.lam.dtype).clone()
        self.last_churn = state["last_churn"].to(device, self.last_churn.dtype).clone()
        self.updates, self.td_count, self.churn_count = (int(state["updates"]), int(state["td_count"]),
                                                         int(state["churn_count"]))


class CChain(Intervention):
    """C-CHAIN as the loop's ``penalty`` hook: draws B_ref with ``sample_obs(batch_size)`` (after B_train)."""

    name = "c_chain"

    def __init__(self, term: ChurnPenalty, batch_size: int):
        self.term, self.batch_size = term, int(batch_size)

    def penalty(self, td_loss: torch.Tensor | None = None, sample_obs: SampleObs | None = None) -> torch.Tensor:
        if td_loss is None or sample_obs is None:
            raise ValueError("C-CHAIN's penalty needs this update's TD loss per member (td_loss=) and the replay "
                             "buffer's sampler (sample_obs=) for its reference batch")
        return self.term.penalty(td_loss, sample_obs(self.batch_size))

    def on_rewrite(self) -> None:
        self.term.refresh()

    def scalars(self) -> dict[str, torch.Tensor]:
        # Both are replaced (never written in place) each update: a logger holding them keeps its values.
        return {"plasticity/c_chain_coef": self.term.lam, "losses/c_chain_loss": self.term.last_churn}

    def state_dict(self) -> dict:
        return self.term.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.term.load_state_dict(state)


@dataclass
class CChainFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"c_chain": "cchain", "c_chain_coef": "cchaincoef",
                                      "c_chain_target_rel_scale": "cchainbeta", "c_chain_fixed": "cchainfixed",
                                      "c_chain_distance": "cchaindist"}

    c_chain: bool = False
    """C-CHAIN: add lambda * mean (Q_theta_u - sg Q_theta_(u-1))^2 on a second replay batch to the loss (churn reduction)"""
    c_chain_target_rel_scale: float = ranged(0.01, POSITIVE)
    """C-CHAIN: beta of the automatic coefficient lambda = beta * mean|L_TD| / mean L_churn over the window"""
    c_chain_coef: float = ranged(50.0, NON_NEGATIVE)
    """C-CHAIN: lambda0, the coefficient during the warmup (and always with --c-chain-fixed)"""
    c_chain_warmup: int = ranged(10_000, COUNT)
    """C-CHAIN: updates that use lambda0 before the automatic coefficient starts"""
    c_chain_window: int = ranged(50_000, POSITIVE_COUNT)
    """C-CHAIN: updates in the running means of |L_TD| and L_churn (device ring buffers)"""
    c_chain_fixed: bool = False
    """C-CHAIN: keep lambda = --c-chain-coef throughout (no automatic coefficient)"""
    c_chain_distance: Literal["q-mse", "kl"] = "q-mse"
    """C-CHAIN: q-mse on (expected) Q-values, or kl = KL(p_ref || p) per action (categorical heads only; [U])"""

    def _changed(self, names) -> list[str]:
        """The given C-CHAIN flags that differ from their defaults, spelled as on the command line."""
        defaults = {f.name: f.default for f in dataclasses.fields(CChainFlags)}
        return ["--" + name.replace("_", "-") for name in names if getattr(self, name) != defaults[name]]

    def check(self, setting: Setting) -> None:
        if self.c_chain_distance not in C_CHAIN_DISTANCES:
            raise ValueError(f"unknown --c-chain-distance {self.c_chain_distance!r}; choose one of "
                             f"{', '.join(C_CHAIN_DISTANCES)}")
        if not self.c_chain:
            changed = self._changed(_SETTINGS)
            if changed:
                raise ValueError(f"{', '.join(changed)} {'needs' if len(changed) == 1 else 'need'} --c-chain")
            return
        if self.c_chain_distance == "kl" and not setting.categorical:
            raise ValueError("--c-chain-distance kl needs a categorical head (C51, --loss hl_gauss or two_hot): a "
                             "regression head has no distribution; use the default q-mse")
        if self.c_chain_fixed:
            changed = self._changed(_AUTOMATIC)
            if changed:
                raise ValueError(f"{', '.join(changed)} set the automatic coefficient, which --c-chain-fixed turns "
                                 "off: drop them, or drop --c-chain-fixed")

    def build(self, parts: Parts) -> CChain | None:
        if not self.c_chain:
            return None
        term = ChurnPenalty(parts.model, self.c_chain_coef, self.c_chain_target_rel_scale, self.c_chain_warmup,
                            self.c_chain_window, self.c_chain_fixed, self.c_chain_distance)
        return CChain(term, parts.setting.batch_size)
