"""Normalize-and-Project (Lyle et al. 2024, arXiv 2407.01800; spec methods-v2.md §6).

NaP is LayerNorm on every hidden pre-activation (``--layer-norm``) plus a projection of the
parameters back to their initial norms after the optimiser step.  The grouping is our
reading [U] (the paper's Algorithm was not read), chosen so that under ``--nap-output free``
every projection leaves the network's function unchanged (up to LN's ε) and changes only the
effective learning rate.  Layers are processed input to output:

- every hidden Linear/Conv2d l (each followed by a LayerNorm): v = [vec W_l; b_l] as one
  vector per member, v ← v·‖v⁰‖/‖v‖ (LN(c·z) = LN(z): exact; W alone would not be, b ≠ 0);
- every hidden LN k except the last: u = [γ_k; β_k] as one vector, u ← c·u with
  c = ‖u⁰‖/‖u‖ (‖u⁰‖ = √n at a fresh LN), and the next layer's bias multiplied by the same c
  *before* that layer is projected: ReLU/CReLU are positively homogeneous, so the next
  pre-activation scales by c and the next LN removes it.  Skipped for a block whose
  activation is not positively homogeneous (DFF: ``activation.homogeneous`` False); that
  block's pre-LN [W; b] is still projected;
- the last LN (feeding the output layer) and the output layer are left alone under ``free``;
  under ``project`` the output weight is projected alone, W_L ← W_L·‖W_L⁰‖/‖W_L‖ (this one
  changes the output scale: Q-values / logits then cannot outgrow a fixed-norm head).

Sequential processing is done in closed form, all at once: with s_t = ‖t‖² per tensor and
member, c_k from the LN groups first, then every group's norm is √(Σ_t p_t²·s_t), where p_t is
c_k for the bias that LN k compensates and 1 otherwise; each tensor is multiplied by
p_t·‖v⁰‖/‖v‖ in one ``_foreach_mul_``.  Per member (every norm reduces over all dims but the
member dim; no loop over members), no host sync.  The initial norms ``init_norms [groups, M]``
are recorded once, at construction (not after resets); they are the method's state.
Rescaling rewrite (rule R3): the optimiser state is left alone.

Cadence (``--nap-every``): 0 (default, the spec's "every gradient step") projects right after
every ``optimizer.step()`` (``after_update``).  N > 0 projects whenever a multiple of N env
steps is crossed (methods-v2.md §0: ``--*-every`` flags count env steps), as the last env-step
event (``end_env_step``), so CBP, ReDo and every reset of that step run before it (§6 Interplay).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from plasticity.flags import COUNT, ranged
from plasticity.intervention import Intervention, MethodFlags, Parts, SampleObs, Setting, crossed
from plasticity.networks import layer_map
from plasticity.population import NORM_LAYERS, is_member_module, members_of, weight_param

NAP_OUTPUTS = ("free", "project")


class NormalizeAndProject:
    """Project a LayerNorm network's parameter groups to their initial norms (see the module docstring).

    ``output``: ``"free"`` (the last LN and the output layer untouched: the function is
    preserved) or ``"project"`` (the output weight projected too).  ``bias_compensation=False``
    omits the next-bias rescaling of the LN-affine step; it exists only to show that the rule
    needs it (property 6.3) -- never use it for training.

    A population (member layers, M members) is projected per member: ``init_norms`` is
    ``[groups, M]``; an ordinary model is the population of one.  ``step()`` projects in place.
    """

    def __init__(self, model: nn.Module, output: str = "free", *, bias_compensation: bool = True):
        if output not in NAP_OUTPUTS:
            raise ValueError(f"unknown --nap-output {output!r}; choose one of {', '.join(NAP_OUTPUTS)}")
        layers = layer_map(model)
        members = members_of(model)
        for _, module in layers.ordered:
            if members > 1 and not is_member_module(module):
                raise ValueError(f"a population of {members} members has an ordinary {type(module).__name__}: its "
                                 "parameters would be shared by the members; use the member layers of "
                                 "plasticity.population")
        for hidden in layers.hidden:
            if not isinstance(hidden.norm, NORM_LAYERS):
                raise ValueError(f"NaP needs a LayerNorm after every hidden layer (projecting [W; b] preserves the "
                                 f"function only through a LN); {hidden.name} has none: add --layer-norm")
        self.members, self.output = members, output
        tensors: list[torch.Tensor] = []
        member_first: list[bool] = []
        group_of: list[int] = []  # per tensor: its group
        pre_of: list[int] = []  # per tensor: 0, or 1 + the group of the LN whose c it is multiplied by first
        kinds: list[str] = []  # per group: "layer" (pre-LN [W; b]), "affine" (LN [γ; β]), "output" (W_L)

        def add(group_tensors, member, kind, pre=0):
            group = len(kinds)
            kinds.append(kind)
            for position, tensor in enumerate(group_tensors):
                if tensor is None:
                    continue
                tensors.append(tensor)
                member_first.append(member)
                group_of.append(group)
                pre_of.append(pre if position == 1 else 0)  # only the bias (position 1) is compensated
            return group

        compensating: int | None = None  # group of the LN whose c the next layer's bias takes
        last = len(layers.hidden) - 1
        self.skipped_affine: list[str] = []  # hidden blocks whose LN-affine step is skipped (not homogeneous)
        for index, hidden in enumerate(layers.hidden):
            member = is_member_module(hidden.layer)
            pre = 0 if compensating is None or not bias_compensation else 1 + compensating
            add([weight_param(hidden.layer), hidden.layer.bias], member, "layer", pre)
            compensating = None
            norm = hidden.norm
            if index == last or norm.weight is None:  # the last LN stays free; a non-affine LN has nothing
                continue
            if not getattr(hidden.activation, "homogeneous", True):
                self.skipped_affine.append(hidden.name)
                continue
            compensating = add([norm.weight, norm.bias], is_member_module(norm), "affine")
        if output == "project":
            add([weight_param(layers.output)], is_member_module(layers.output), "output")
        device, dtype = tensors[0].device, tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        self.tensors, self.kinds = tensors, kinds
        self._norm_dims = [tuple(range(1 if m else 0, t.dim())) for t, m in zip(tensors, member_first)]
        self._group_of = torch.tensor(group_of, device=device, dtype=torch.long)
        self._pre_of = torch.tensor(pre_of, device=device, dtype=torch.long)
        self._layer_rows = torch.tensor([g for g, kind in enumerate(kinds) if kind == "layer"], device=device,
                                        dtype=torch.long)
        self._one = torch.ones(1, members, device=device, dtype=dtype)
        self._factors = torch.ones(len(tensors), members, device=device, dtype=dtype)
        self._factor_views = [row.view(members, *([1] * (t.dim() - 1))) if m else row.view(*([1] * t.dim()))
                              for row, t, m in zip(self._factors.unbind(), tensors, member_first)]
        with torch.no_grad():
            self.init_norms = self._group_sq(self._squared_norms()).sqrt()  # [groups, M], recorded once
        self._last_ratio = torch.ones(len(kinds), members, device=device, dtype=dtype)

    def _squared_norms(self) -> torch.Tensor:
        """‖t‖² of every tensor and member, ``[tensors, M]``: reduced over all but the member dim.

        A weight's norm is taken in two stages, over each output unit then across the units: CPU's
        float32 one-pass norm of a 512x3136 weight is off by ~2e-5 (relative), the two-stage one by
        ~5e-8 (measured), at the same cost; property 6.1 asks for 1e-6.
        """
        norms = []
        for t, dims in zip(self.tensors, self._norm_dims):
            if len(dims) > 1:
                t = torch.linalg.vector_norm(t, dim=dims[1:])
                dims = dims[:1]
            norms.append(torch.linalg.vector_norm(t, dim=dims).reshape(self.members))
        return torch.stack(norms).square()

    def _group_sq(self, sq: torch.Tensor) -> torch.Tensor:
        """Σ over each group's tensors, ``[groups, M]``."""
        out = torch.zeros(len(self.kinds), self.members, device=sq.device, dtype=sq.dtype)
        return out.index_add_(0, self._group_of, sq)

    def _ratio(self, group_sq: torch.Tensor) -> torch.Tensor:
        # An all-zero group stays as it is; a diverged member's NaN stays NaN.
        return torch.where(group_sq == 0, 1.0, self.init_norms / group_sq.sqrt())

    @torch.no_grad()
    def step(self) -> None:
        """Project every group to its initial norm, in place (all members at once, no host sync)."""
        sq = self._squared_norms()
        # c of every group as if alone; only the LN-affine groups' c are used, as the compensated biases' pre-factor.
        alone = self._ratio(self._group_sq(sq))
        pre = torch.cat([self._one, alone])[self._pre_of]  # [tensors, M]
        ratio = self._ratio(self._group_sq(sq * pre.square()))
        torch.mul(pre, ratio[self._group_of], out=self._factors)
        torch._foreach_mul_(self.tensors, self._factor_views)
        self._last_ratio = ratio

    def norm_ratio(self) -> torch.Tensor:
        """Mean over the pre-LN layer groups of ‖v‖/‖v⁰‖ just before the last projection, ``[M]`` (1: none).

        v as projected: a bias after an LN-affine step already carries that LN's factor c.  Lazy: the
        last step keeps its ratios; this reduction runs only when a logger asks (the diagnostics cadence).
        """
        return self._last_ratio[self._layer_rows].reciprocal().mean(0)

    def state_dict(self) -> dict:
        return {"init_norms": self.init_norms.clone()}

    def load_state_dict(self, state: dict) -> None:
        init_norms = state["init_norms"]
        if init_norms.shape != self.init_norms.shape:
            raise ValueError(f"NaP state has initial norms of shape {tuple(init_norms.shape)} ([groups, members]), "
                             f"this model {tuple(self.init_norms.shape)} (a checkpoint of another network?)")
        self.init_norms.copy_(init_norms)


class NaPEvents(Intervention):
    """NaP at its cadence: after every update (``every`` 0), or every ``every`` env steps as the last event."""

    name = "nap"

    def __init__(self, nap: NormalizeAndProject, every: int = 0):
        COUNT.check("nap-every", every)
        self.method, self.every = nap, int(every)

    def after_update(self, previous: int, update: int, sample_obs: SampleObs | None) -> None:
        if self.every == 0:
            self.method.step()

    def end_env_step(self, previous_t: int, t: int) -> None:
        if crossed(previous_t, t, self.every):
            self.method.step()

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"plasticity/nap_norm_ratio": self.method.norm_ratio()}

    def state_dict(self) -> dict:
        return self.method.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state)


@dataclass
class NaPFlags(MethodFlags):
    TAGS: ClassVar[dict[str, str]] = {"nap": "nap", "nap_every": "napevery", "nap_output": "napout"}

    nap: bool = False
    """Normalize-and-Project (needs --layer-norm): project the pre-LN [W; b] and the LN [gamma; beta] back to their initial norms, keeping the function ([U]: our grouping, spec methods-v2.md §6)"""
    nap_every: int = ranged(0, COUNT)
    """NaP cadence: 0 = after every gradient step; N > 0 = every N env steps (after that step's resets)"""
    nap_output: Literal["free", "project"] = "free"
    """NaP output layer: free (untouched, Q-values keep their scale) or project (its weight projected too) [U]"""

    def check(self, setting: Setting) -> None:
        if not self.nap:
            if self.nap_every != 0 or self.nap_output != "free":
                raise ValueError("--nap-every and --nap-output need --nap")
            return
        if self.nap_output not in NAP_OUTPUTS:
            raise ValueError(f"unknown --nap-output {self.nap_output!r}; choose one of {', '.join(NAP_OUTPUTS)}")
        if not setting.layer_norm:
            raise ValueError("--nap without --layer-norm: NaP is normalisation plus projection: add --layer-norm")
        if getattr(self, "swr", 0) > 0:
            raise ValueError("--nap and --swr both set the weight norms (NaP exactly): use one of them")
        if getattr(self, "weight_clip", 0) > 0:
            raise ValueError("--nap and --weight-clip both limit the weight norms (NaP fixes them exactly): use one "
                             "of them")

    def build(self, parts: Parts) -> NaPEvents | None:
        if not self.nap:
            return None
        decay = [flag for flag in ("l2", "weight_decay") if getattr(self, flag, 0) > 0]
        if decay:
            warnings.warn(f"--nap with {' and '.join('--' + f.replace('_', '-') for f in decay)}: on projected "
                          "tensors the decay then only changes the direction, the projection restores the norm",
                          stacklevel=2)
        nap = NormalizeAndProject(parts.model, self.nap_output)
        return NaPEvents(nap, self.nap_every)
