"""Plasticity diagnostics: every metric of spec diagnostics.md, computed on the model's device, per member.

A population (spec populations.md) is M networks in member layers (``plasticity.population``);
every metric here is computed for all members at once and comes back as a tensor ``[M]``,
member k's value at index k.  An ordinary model (``nn.Linear``/``nn.Conv2d``/``nn.LayerNorm``,
inputs ``[n, ...]``) is the population of one: its values are ``[1]`` tensors.

Usage in an agent or any other training loop::

    diagnostics = Diagnostics(q_network, support=atoms)          # after q_network.to(device)
    ...
    loss.backward()                                               # the sum of the members' losses
    diagnostics.record_grad_norm()                                # before clipping
    optimizer.step()
    if step % args.diag_every == 0:
        values = diagnostics.measure(obs, td_targets, clip_range=support.clip_range(loss))
        for k, scalars in enumerate(to_host(values)):             # the one host transfer of the event
            for tag, value in scalars.items():
                writers[k].add_scalar(tag, value, step)

Shapes: a member-layer model takes ``obs [M, n, ...]``, ``td_targets [M, n]`` and
``actions [M, n]`` (each member its own probe batch, as ``ReplayBuffer.sample`` returns
them); an ordinary model takes ``obs [n, ...]``, ``td_targets [n]``, ``actions [n]``.
``measure``, ``entk``, ``hessian_max_eig`` and ``probe_fit_loss`` return
``{tag: Tensor [M]}``, float64 on the model's device, no host transfer of values;
``to_host`` moves any number of such dicts (merged) to the host in one transfer.

A regression model or classifier is measured with ``Diagnostics(model).measure(obs)``
(its outputs stand for the Q-values in ``q_mean``/``q_std``); ``td_targets`` may be
any regression targets.

Cost rules (diagnostics.md): one probe forward in eval mode for all members, one
batched SVD of the features ``[M, n, d]``, per-layer statistics vectorised over
members and units, norms reduced over every dim but the member dim.  Nothing here
calls ``.item()`` per metric; the one host read inside ``measure`` is a single
boolean right after the SVD (did it silently return non-finite values for a member
with finite features?), which costs no extra wait on CUDA because the SVD itself
synchronises the device there (torch.linalg docs).  Nothing touches the training
state: the mode is restored, no ``.grad`` is written, the global RNG is not drawn
from, hooks are removed, and the costly probes (eNTK, plasticity probe) run on
copies of the network.

Diverged members: a member whose features (or activations, or weights) are NaN/inf
never raises; its affected values are NaN and the other members' values are exactly
what they would be without it (the SVD runs on a copy of Φ in which that member's
matrix is zeroed, and its spectral values are then set to NaN).

Conventions fixed here where the spec leaves a choice:

* Standard deviations and the feature covariance C are population (divide by
  n), so ‖μ‖² + tr(C) = mean_x ‖φ(x)‖².
* Conv layers: a unit is a channel.  Its activity is mean |h| over the batch
  and H×W (ReDo), so a dead channel is zero at every sample and position; the
  pre-activation statistics use the channel's H×W-averaged pre-activation; a
  channel is linearized only if its pre-activation is > 0 at every sample AND
  every position -- only then does the ReLU act as the identity on it (a
  positive spatial average would flag channels the ReLU still clips).
* ``weight_norm/<layer>`` is ‖W‖_F of each Linear/Conv2d weight (hidden and
  output); the total, ``weight_magnitude`` and ``dist_from_init`` run over all
  parameters (weights, biases, LayerNorm gains), each member over its own.
* ``feature_cond`` and ``entk_cond`` share one definition, σ_1 / σ_k with
  k = srank (for the eNTK, on the eigenvalues of K).  Quantities that are
  undefined for an all-zero feature matrix (every unit dead) are NaN:
  ``feature_cond`` and ``feature_mean_alignment``; the ranks are 0.
* Unit counts of a layer whose activations are non-finite for a member are NaN
  for that member (not "0 dead units").
* CReLU and DFF layers (methods-v2.md §8; unit i of n has outputs i and i + n).
  ``dormant_frac`` is ReDo's unit score on (E|h_i| + E|h_{i+n}|), over the n units
  (what ReDo resets).  CReLU: ``dead_frac`` and ``linearized_frac`` run over the 2n
  halves with the ReLU definitions, the pre-activation of half i + n being −z_i (so a
  half is linearized when z (or −z) is > 0 on every sample and position; its partner is
  then dead -- the converse fails only where z is exactly 0, and a pair with z ≡ 0 counts
  as two dead halves, not linearized ones) [U]; ``dead_pair_frac``: units whose both
  halves are 0 everywhere (z ≡ 0); ``sign_constant_frac``: units whose z is never > 0 at
  one sample/position and < 0 at another (≥ 0 everywhere or ≤ 0 everywhere: the pair acts
  linearly; includes the dead pairs) [U].  DFF: dead and linearized are undefined, not
  logged, and left out of the overall totals (each total divides by the units or halves of
  the layers it counts).  ``preact_*`` run over the n pre-activations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from plasticity.networks import (
    ACTIVATIONS,
    WEIGHT_LAYERS,
    ActivationRecorder,
    Torso,
    activation_name,
    layer_map,
    reinit_,
)
from plasticity.population import (
    NORM_LAYERS,
    MemberConv2d,
    is_member_module,
    member_parameters,
    members_of,
    out_units,
    weight_param,
)
from plasticity.rank import (
    condition_number,
    effective_rank,
    gram_singular_values,
    singular_values,
    srank,
    stable_rank,
)
from plasticity.streams import MemberRandom

__all__ = [
    "Diagnostics",
    "unit_stats",
    "to_host",
    "singular_values",
    "effective_rank",
    "srank",
    "stable_rank",
    "condition_number",
    "TAG_PREFIX",
]

TAG_PREFIX = "plasticity/"
SRANK_DELTA = 0.01
PROBE_SEED_OFFSET = 0x9E3779B9  # keeps the probe's random teacher away from the agents' small seeds
_TINY = torch.finfo(torch.float32).tiny
_NAN = float("nan")



def _member_dims(tensor: Tensor, member: bool) -> tuple[int, ...]:
    """The dims to reduce for one value per member: all but the leading one (an ordinary tensor: all)."""
    return tuple(range(1 if member else 0, tensor.dim()))


def _per_member_norm(tensor: Tensor, member: bool, members: int) -> Tensor:
    """‖t_m‖ of each member, ``[M]`` (an ordinary tensor: ``[1]``)."""
    return torch.linalg.vector_norm(tensor, dim=_member_dims(tensor, member)).reshape(members)


def _per_member_sum(tensor: Tensor, member: bool, members: int) -> Tensor:
    return tensor.sum(_member_dims(tensor, member)).reshape(members)


def _nan_where(ok: Tensor, value: Tensor) -> Tensor:
    return torch.where(ok, value, torch.full_like(value, _NAN))


def to_host(*results: dict[str, Tensor]) -> list[dict[str, float]]:
    """``{tag: Tensor [M]}`` dicts (merged, later ones win) -> one ``{tag: float}`` per member, in ONE transfer.

    All values must live on one device; this is the single host transfer of a diagnostic event.
    """
    merged: dict[str, Tensor] = {}
    for result in results:
        merged.update(result)
    if not merged:
        return []
    names = list(merged)
    rows = torch.stack([merged[name].detach().double().reshape(-1) for name in names]).tolist()  # the one transfer
    members = len(rows[0])
    return [{name: row[k] for name, row in zip(names, rows)} for k in range(members)]


# ---------------------------------------------------------------------------
# Pure functions on tensors (device tensors out, no host sync)
# ---------------------------------------------------------------------------

def unit_stats(pre: Tensor, post: Tensor, dormant_tau: float = 0.1, activation: str = "relu") -> dict[str, Tensor]:
    """Unit statistics of one hidden layer on a probe batch (diagnostics.md, "Units"; methods-v2.md §8).

    ``pre`` is the activation's input (after LayerNorm when present), ``post`` its
    output: ``[B, U]`` (dense) or ``[B, C, H, W]`` (conv, a unit is a channel) give
    0-dim values; with a leading member dim, ``[M, B, U]`` or ``[M, B, C, H, W]``,
    every value is ``[M]``.  Returns float32 tensors: ``dead``, ``linearized``,
    ``dormant`` (unit counts), ``num_units``, ``preact_mean_abs`` and ``preact_std``
    (means over units).  Counts rather than fractions, so the overall fraction across
    layers of different widths is total flagged / total units (pitfall 6).  A member
    whose activations are not all finite gets NaN for everything but ``num_units``.

    ``activation``: ``relu``, ``crelu`` or ``dff``.  For the last two ``post`` has 2U
    features (channels) and ``dormant`` uses the pair score (E|h_i| + E|h_{i+U}|).
    ``crelu``: ``dead`` and ``linearized`` count halves (out of ``num_halves`` = 2U),
    plus ``dead_pair`` and ``sign_constant`` (units).  ``dff``: no ``dead``/``linearized``.
    See the module docstring for the definitions.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unit_stats: unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    halves = 1 if activation == "relu" else 2
    if pre.dim() not in (2, 3, 4, 5):
        raise ValueError("unit_stats: expected [B, units] or [B, C, H, W] activations (or [M, B, units], "
                         f"[M, B, C, H, W] with a leading member dim); got {tuple(pre.shape)}")
    batched = pre.dim() in (3, 5)
    expected = list(pre.shape)
    expected[2 if batched else 1] *= halves
    if list(post.shape) != expected:
        detail = "" if halves == 1 else f" ({activation}: post has twice the units of pre)"
        raise ValueError(f"unit_stats: pre {tuple(pre.shape)} and post {tuple(post.shape)} shapes differ{detail}")
    if dormant_tau < 0:
        raise ValueError(f"unit_stats: dormant_tau must be >= 0; got {dormant_tau}")
    pre, post = pre.detach(), post.detach()
    if not batched:
        pre, post = pre.unsqueeze(0), post.unsqueeze(0)
    spatial = tuple(range(3, pre.dim()))  # () for dense layers
    batch_and_spatial = (1, *spatial)
    # ReDo activity mean_b |h_i| (and over H, W): zero exactly when the output is 0 everywhere.
    half_activity = post.abs().float().mean(batch_and_spatial)  # [M, halves·U]
    activity = half_activity.view(half_activity.shape[0], halves, -1).sum(1) if halves > 1 else half_activity
    members, units = activity.shape
    score = activity / activity.mean(1, keepdim=True).clamp_min(_TINY)  # an all-zero layer scores 0: all dormant
    dormant = score <= dormant_tau
    unit_pre = pre.float().mean(spatial) if spatial else pre.float()  # [M, B, U]
    finite = torch.isfinite(pre).flatten(1).all(1) & torch.isfinite(post).flatten(1).all(1)  # [M]
    counts: dict[str, Tensor] = {}
    if activation != "dff":
        low = pre.amin(batch_and_spatial)  # [M, U]
        linearized = low > 0
        if activation == "crelu":
            high = pre.amax(batch_and_spatial)
            linearized = torch.cat((linearized, high < 0), dim=1)  # half i + n has pre-activation −z
        counts["dead"] = (half_activity == 0).sum(1).float()
        counts["linearized"] = linearized.sum(1).float()
    counts["dormant"] = dormant.sum(1).float()
    if activation == "crelu":
        counts["dead_pair"] = (activity == 0).sum(1).float()
        counts["sign_constant"] = ((low >= 0) | (high <= 0)).sum(1).float()
    stats = {key: _nan_where(finite, value) for key, value in counts.items()}
    stats["num_units"] = activity.new_full((members,), units)
    if activation == "crelu":
        stats["num_halves"] = activity.new_full((members,), halves * units)
    stats["preact_mean_abs"] = _nan_where(finite, unit_pre.mean(1).abs().mean(1))
    stats["preact_std"] = _nan_where(finite, unit_pre.std(1, correction=0).mean(1))
    return stats if batched else {key: value.squeeze(0) for key, value in stats.items()}


def _spectral_metrics(features: Tensor, sv: Tensor, top_vector: Tensor) -> dict[str, Tensor]:
    """Rank metrics and the spectral target-mean metrics of Φ ``[M, n, d]`` from its σ ``[M, r]`` and v_1 ``[M, d]``."""
    mean_feature = features.mean(1)
    mean_sq = mean_feature.square().sum(1)
    projection = (mean_feature * top_vector).sum(1).square()
    return {
        "effective_rank": effective_rank(sv),
        "srank": srank(sv, SRANK_DELTA),
        "stable_rank": stable_rank(sv),
        "feature_sv_max": sv.amax(1),
        "feature_cond": condition_number(sv, SRANK_DELTA),
        # (μᵀv_1)² / ‖μ‖²; 0/0 = NaN when Φ = 0 (post-ReLU features have μ = 0 only then).
        "feature_mean_alignment": projection / mean_sq,
    }


def _gram_or_nan(features: Tensor) -> tuple[Tensor, Tensor]:
    try:
        return gram_singular_values(features, with_top_vector=True)
    except RuntimeError:
        members, n, d = features.shape
        return features.new_full((members, min(n, d)), _NAN), features.new_full((members, d), _NAN)


def _svd_with_top_vector(features: Tensor) -> tuple[Tensor, Tensor]:
    """σ (descending) ``[M, r]`` and v_1 ``[M, d]`` of Φ ``[M, n, d]`` (all finite; non-finite members are zeroed first).

    Float32 SVD, batched over members; the float64 Gram fallback when it raises, or when it
    silently returns non-finite values (seen on GPU for degenerate Φ) -- then only for the
    members it failed on.  The full SVD rather than ``svdvals`` because
    ``feature_mean_alignment`` needs v_1; same LAPACK/cuSOLVER family, same fallback.
    When even the fallback raises the values are NaN, not an exception.
    """
    try:
        _, sv, vh = torch.linalg.svd(features, full_matrices=False)
    except RuntimeError:
        return _gram_or_nan(features)
    top = vh[:, 0]
    ok = torch.isfinite(sv).all(1) & torch.isfinite(top).all(1)
    if not bool(ok.all()):  # measure's one host read; on CUDA the SVD has just synchronised the device anyway
        gram_sv, gram_top = _gram_or_nan(features)
        sv, top = torch.where(ok[:, None], sv, gram_sv), torch.where(ok[:, None], top, gram_top)
    return sv, top


class _MemberParams:
    """The named parameters of a model with, for each, whether it carries the leading member dim.

    In a population (M > 1) every parameter must belong to a member layer: an ordinary
    layer's parameters would be shared by the members, which a population never does.
    """

    def __init__(self, model: nn.Module, members: int, who: str):
        self.member: dict[str, bool] = {}
        for module_name, module in model.named_modules():
            for name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                member = is_member_module(module)
                if members > 1 and not member:
                    raise ValueError(f"{who}: a population of {members} members has parameter {full} outside the "
                                     "member layers (plasticity.population): it would be shared by the members")
                self.member[full] = member


# ---------------------------------------------------------------------------
# The diagnostics of one network, or of every member of a population
# ---------------------------------------------------------------------------

class Diagnostics:
    """All plasticity diagnostics of one Q-network or of a population of them (spec diagnostics.md).

    Args:
        model: the online Q-network; its modules registered in forward order
            (``networks.layer_map``).  Built from member layers (M members; inputs
            ``[M, n, ...]``), or from ordinary layers (one member; inputs ``[n, ...]``).
            Build this object after ``model.to(device)``: it keeps a frozen copy θ0 of
            the parameters for ``dist_from_init``.
        dormant_tau: ReDo threshold τ of ``dormant_frac``.
        support: atom/bin centres of a categorical head (C51, HL-Gauss, two-hot):
            the head outputs logits [..., A·N] or [..., A, N] and Q = Σ softmax·support.
            ``None`` for a regression head (Q is the output, [..., A]).
        n_actions: checked against the head's width when given.
    """

    def __init__(self, model: nn.Module, *, dormant_tau: float = 0.1, support: Tensor | None = None,
                 n_actions: int | None = None):
        if dormant_tau < 0:
            raise ValueError(f"Diagnostics: dormant_tau must be >= 0; got {dormant_tau}")
        self.model = model
        self.dormant_tau = dormant_tau
        self.layers = layer_map(model)
        self.members = members_of(model)
        #: member-layer models take and return ``[M, n, ...]``; ordinary ones ``[n, ...]``
        self.members_first = any(is_member_module(m) for m in model.modules())
        self._params = _MemberParams(model, self.members, "Diagnostics")
        head_width = out_units(self.layers.output)
        if support is not None:
            support = torch.as_tensor(support, dtype=torch.float32).to(self.device).flatten()
            if support.numel() < 2 or head_width % support.numel() != 0:
                raise ValueError(f"Diagnostics: the head has {head_width} outputs, not a multiple of the "
                                 f"{support.numel()} support atoms; pass the head's atom/bin centres as support")
        self.support = support
        self.n_actions = head_width // (support.numel() if support is not None else 1)
        if n_actions is not None and n_actions != self.n_actions:
            atoms = f" x {support.numel()} atoms" if support is not None else ""
            raise ValueError(f"Diagnostics: n_actions={n_actions} but the head has {head_width} outputs "
                             f"({self.n_actions} actions{atoms}); for a categorical head pass support=")
        self.initial_params = {name: p.detach().clone() for name, p in model.named_parameters()}
        self._grad_norm_sum: Tensor | None = None
        self._grad_norm_count = 0

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live now."""
        return weight_param(self.layers.output).device

    def _first(self, tensor: Tensor) -> Tensor:
        """A model output/input as member-first ``[M, n, ...]`` (an ordinary model's gets M = 1)."""
        return tensor if self.members_first else tensor.unsqueeze(0)

    def _is_member_param(self, name: str) -> bool:
        if name not in self._params.member:
            raise ValueError(f"Diagnostics: parameter {name} did not exist when Diagnostics was built; "
                             "build Diagnostics after the network is complete")
        return self._params.member[name]

    # ---- per update -------------------------------------------------------

    def record_grad_norm(self) -> None:
        """Accumulate each member's global L2 gradient norm ``[M]``, on device (no host sync).

        Call after ``loss.backward()`` and before any clipping; ``measure``
        logs the mean over the updates since the previous event.  One norm per
        parameter tensor (reduced over all dims but the member dim), no loop over members.
        """
        grads = [(name, p.grad.detach()) for name, p in self.model.named_parameters() if p.grad is not None]
        if self.members == 1:  # one member: a parameter's norm is its member's (one foreach kernel)
            norms = list(torch._foreach_norm([grad for _, grad in grads])) if grads else []
            norms = [norm.reshape(1) for norm in norms]
        else:
            norms = [_per_member_norm(grad, self._is_member_param(name), self.members) for name, grad in grads]
        if not norms:
            raise ValueError("record_grad_norm: no parameter has a gradient; call it after loss.backward() "
                             "and before optimizer.zero_grad()")
        norm = torch.linalg.vector_norm(torch.stack(norms).float(), dim=0)
        self._grad_norm_sum = norm if self._grad_norm_sum is None else self._grad_norm_sum + norm
        self._grad_norm_count += 1

    # ---- the diagnostic event ---------------------------------------------

    def measure(self, obs: Tensor, td_targets: Tensor | None = None, actions: Tensor | None = None,
                clip_range: tuple[float, float] | None = None) -> dict[str, Tensor]:
        """One diagnostic event on a probe batch: every tag of diagnostics.md except the rarer probes.

        Args:
            obs: probe observations on the model's device, ``[M, n, ...]`` for a member-layer
                model (member k's own batch at index k), ``[n, ...]`` for an ordinary one
                (n ≥ 2; default n = 1024).
            td_targets: TD targets of those transitions, ``[M, n]`` (ordinary model: ``[n]``);
                adds ``target_*``.
            actions: the transitions' actions, shaped like ``td_targets``; only checked for
                length here (``q_mean``/``q_std`` run over all actions) -- pass the same batch
                to ``entk``.
            clip_range: (low, high), the interval the categorical loss clamps its
                targets to; adds ``target_clip_frac``, the fraction strictly outside
                it (needs ``td_targets``).  Take it from the loss, not from the
                support's ends: ``CategoricalSupport.clip_range(loss)`` gives
                [v_min, v_max] for HL-Gauss and the outer bin centres
                [v_min + ς/2, v_max − ς/2] for two-hot; C51 clips to its end atoms,
                (v_min, v_max).

        Returns ``{tag: Tensor [M]}`` (float64, on the model's device; ``to_host`` moves
        them).  ``grad_norm`` appears when ``record_grad_norm`` ran since the previous
        event (the accumulator restarts here).
        """
        self._check_batch(obs, td_targets, actions, clip_range)
        scalars = self._probe(obs, td_targets, clip_range)
        if self._grad_norm_count:
            self._grad_norm_sum, self._grad_norm_count = None, 0
        return {name: value.detach().double().reshape(self.members) for name, value in scalars.items()}

    def _probe(self, obs: Tensor, td_targets: Tensor | None,
               clip_range: tuple[float, float] | None) -> dict[str, Tensor]:
        """The probe forward and every scalar of the event, as device tensors ``[M]``."""
        model = self.model
        captured: dict[str, Tensor] = {}

        def capture_features(module, inputs):
            captured["features"] = inputs[0].detach()

        was_training = model.training
        feature_hook = self.layers.output.register_forward_pre_hook(capture_features)
        recorder = ActivationRecorder(model, preactivations=True)
        try:
            model.eval()
            with torch.no_grad():
                output = self._first(model(obs))
                features = self._first(captured["features"]).flatten(2).float()  # Φ [M, n, d]
                scalars = self._feature_metrics(features)  # first: the SVD's check reads the host early
                scalars.update(self._unit_metrics(recorder))
                scalars.update(self._norm_metrics())
                q_values = self._q_values(output)
                scalars[TAG_PREFIX + "q_mean"] = q_values.mean((1, 2))
                scalars[TAG_PREFIX + "q_std"] = q_values.std((1, 2), correction=0)
                if td_targets is not None:
                    scalars.update(_target_metrics(td_targets.reshape(self.members, -1), clip_range))
        finally:
            feature_hook.remove()
            recorder.remove()
            model.train(was_training)
        return scalars

    def _unit_metrics(self, recorder: ActivationRecorder) -> dict[str, Tensor]:
        scalars: dict[str, Tensor] = {}
        counted = ("dead", "linearized", "dormant", "dead_pair", "sign_constant")
        totals: dict[str, list[Tensor]] = {key: [] for key in (*counted, "num_units", "mean_abs", "std")}
        denominators: dict[str, list[Tensor]] = {key: [] for key in counted}
        for hidden in recorder.layers:
            stats = unit_stats(recorder.pre[hidden.name], recorder.post[hidden.name], self.dormant_tau,
                               activation_name(hidden.activation))
            units = stats["num_units"]
            for key in counted:
                if key not in stats:  # DFF: no dead/linearized; only CReLU has pairs
                    continue
                denominator = stats.get("num_halves", units) if key in ("dead", "linearized") else units
                scalars[f"{TAG_PREFIX}{key}_frac/{hidden.name}"] = stats[key] / denominator
                totals[key].append(stats[key])
                denominators[key].append(denominator)
            scalars[f"{TAG_PREFIX}preact_mean_abs/{hidden.name}"] = stats["preact_mean_abs"]
            scalars[f"{TAG_PREFIX}preact_std/{hidden.name}"] = stats["preact_std"]
            totals["num_units"].append(units)
            totals["mean_abs"].append(stats["preact_mean_abs"] * units)
            totals["std"].append(stats["preact_std"] * units)
        if recorder.layers:
            # Overall = total flagged / total units (halves) of the layers that define it; means over all
            # units (pitfall 6: width-weighted).
            all_units = torch.stack(totals["num_units"]).sum(0)
            for key in counted:
                if totals[key]:
                    scalars[f"{TAG_PREFIX}{key}_frac"] = (torch.stack(totals[key]).sum(0)
                                                         / torch.stack(denominators[key]).sum(0))
            scalars[TAG_PREFIX + "preact_mean_abs"] = torch.stack(totals["mean_abs"]).sum(0) / all_units
            scalars[TAG_PREFIX + "preact_std"] = torch.stack(totals["std"]).sum(0) / all_units
        return scalars

    def _feature_metrics(self, features: Tensor) -> dict[str, Tensor]:
        """Rank, feature norm and the target-mean ill-conditioning metrics of Φ ``[M, n, d]``, each ``[M]``."""
        finite = torch.isfinite(features).flatten(1).all(1)  # [M]: a diverged member's Φ never reaches the SVD
        safe = torch.where(finite[:, None, None], features, torch.zeros((), device=features.device))
        sv, top_vector = _svd_with_top_vector(safe)
        scalars = {TAG_PREFIX + k: _nan_where(finite, v) for k, v in _spectral_metrics(safe, sv, top_vector).items()}
        mean_feature = features.mean(1)
        covariance_trace = (features - mean_feature.unsqueeze(1)).square().sum(2).mean(1)  # tr(C), population
        scalars[TAG_PREFIX + "feature_norm"] = torch.linalg.vector_norm(features, dim=2).mean(1)
        scalars[TAG_PREFIX + "feature_mean_dominance"] = mean_feature.square().sum(1) / covariance_trace
        return scalars

    def _norm_metrics(self) -> dict[str, Tensor]:
        members = self.members
        scalars: dict[str, Tensor] = {}
        for name, module in self.layers.ordered:
            if isinstance(module, WEIGHT_LAYERS):
                weight = weight_param(module).detach()
                scalars[f"{TAG_PREFIX}weight_norm/{name}"] = _per_member_norm(weight.float(), is_member_module(module),
                                                                            members)
        self._move_initial_params()
        squares, abs_sums, drifts, initials = [], [], [], []
        count = 0
        for name, p in self.model.named_parameters():
            member = self._is_member_param(name)
            p, p0 = p.detach().float(), self.initial_params[name].float()
            squares.append(_per_member_norm(p, member, members).square())
            abs_sums.append(_per_member_sum(p.abs(), member, members))
            drifts.append(_per_member_norm(p - p0, member, members).square())
            initials.append(_per_member_norm(p0, member, members).square())
            count += p.numel() // members if member else p.numel()
        scalars[TAG_PREFIX + "weight_norm"] = torch.stack(squares).sum(0).sqrt()
        scalars[TAG_PREFIX + "weight_magnitude"] = torch.stack(abs_sums).sum(0) / count
        scalars[TAG_PREFIX + "dist_from_init"] = torch.stack(drifts).sum(0).sqrt() / torch.stack(initials).sum(0).sqrt()
        if self._grad_norm_count:
            scalars[TAG_PREFIX + "grad_norm"] = self._grad_norm_sum / self._grad_norm_count
        return scalars

    def _move_initial_params(self) -> None:
        """θ0 follows the model if it was moved after construction (once, not per event)."""
        for name, p in self.model.named_parameters():
            self._is_member_param(name)  # raises for a parameter added after construction
            if self.initial_params[name].device != p.device:
                self.initial_params[name] = self.initial_params[name].to(p.device)

    def _q_values(self, output: Tensor) -> Tensor:
        """Q ``[M, n, A]`` from the member-first head output (categorical: expected value under softmax)."""
        members, batch = output.shape[:2]
        if self.support is None:
            if output.dim() != 3 or output.shape[2] != self.n_actions:
                shape = tuple(output.shape if self.members_first else output.shape[1:])
                expected = f"[M, n, {self.n_actions}]" if self.members_first else f"[n, {self.n_actions}]"
                raise ValueError(f"Diagnostics: the head output has shape {shape}, expected {expected}; "
                                 "for a categorical head pass support= (atom/bin centres)")
            return output
        support = self.support.to(output.device)
        logits = output.reshape(members, batch, self.n_actions, support.numel())
        return torch.softmax(logits.float(), dim=-1) @ support

    def _check_batch(self, obs: Tensor, td_targets: Tensor | None, actions: Tensor | None,
                     clip_range: tuple[float, float] | None) -> None:
        members = self.members
        if self.members_first:
            good = isinstance(obs, Tensor) and obs.dim() >= 3 and obs.shape[0] == members and obs.shape[1] >= 2
            expected = f"[M={members}, n, ...]"
        else:
            good = isinstance(obs, Tensor) and obs.dim() >= 2 and obs.shape[0] >= 2
            expected = "[n, ...]"
        if not good:
            shape = tuple(obs.shape) if isinstance(obs, Tensor) else type(obs).__name__
            raise ValueError(f"Diagnostics: obs must be a batch of at least 2 observations {expected} per member; "
                             f"got {shape}")
        if obs.device != self.device:
            raise ValueError(f"Diagnostics: obs is on {obs.device} but the model is on {self.device}; "
                             "move the probe batch to the model's device")
        n = obs.shape[1] if self.members_first else obs.shape[0]
        for name, tensor in (("td_targets", td_targets), ("actions", actions)):
            if tensor is None:
                continue
            if tensor.numel() != members * n or (self.members_first and tensor.shape[0] != members):
                raise ValueError(f"Diagnostics: {name} has {tensor.numel()} entries for {members * n} observations "
                                 f"(shape {tuple(tensor.shape)}; expected {'[M, n]' if self.members_first else '[n]'})")
        if clip_range is not None:
            if td_targets is None:
                raise ValueError("Diagnostics: clip_range needs td_targets (the fraction of targets outside it)")
            low, high = clip_range
            if not low < high:
                raise ValueError(f"Diagnostics: clip_range must be (v_min, v_max) with v_min < v_max; got {clip_range}")

    # ---- rarer probes (own cadence, off by default) ------------------------

    def _copy_for_func(self) -> nn.Module:
        """A deep copy in eval mode, in the default layout (vmap cannot make channels-last copies)."""
        network = copy.deepcopy(self.model).eval()
        for module in network.modules():
            if isinstance(module, Torso):
                module.use_default_layout_()
            elif isinstance(module, MemberConv2d):
                module.channels_last = False
        return network

    def entk_kernel(self, obs: Tensor, actions: Tensor, entk_batch: int = 64) -> Tensor:
        """Empirical NTK K = J Jᵀ ``[M, m, m]`` of each member on its first m = min(entk_batch, n) probe inputs.

        J = per-sample gradient of the taken-action Q-value (categorical: the
        expected value) w.r.t. all of the member's parameters, via ``torch.func``
        (vmap over grad of ``functional_call`` with ``member_parameters``: one member
        at a time, a rare probe) on a deep copy of the network in eval mode: the copy
        keeps other components' activation hooks inert (they check module identity),
        and the training network is not touched.  Memory: the per-sample gradients of
        one member, m × (parameters per member) floats.  An ordinary model: ``[1, m, m]``.
        """
        if entk_batch < 1:
            raise ValueError(f"entk: entk_batch must be >= 1; got {entk_batch}")
        self._check_batch(obs, None, actions, None)
        if actions is None or actions.dtype not in (torch.int64, torch.int32):
            raise ValueError("entk: actions must be an integer tensor of the probe transitions' actions")
        obs = self._first(obs)[:, :entk_batch]
        actions = actions.reshape(self.members, -1)[:, :entk_batch].long()
        network = self._copy_for_func()
        trainable = {name for name, p in network.named_parameters() if p.requires_grad}
        members_first = self.members_first
        kernels = []
        for k in range(self.members):  # a rare probe: one member at a time keeps J of one member in memory
            tensors = member_parameters(network, k)
            params = {name: t.detach() for name, t in tensors.items() if name in trainable}
            buffers = {name: t for name, t in tensors.items() if name not in trainable}

            def taken_q(params: dict[str, Tensor], single_obs: Tensor, action: Tensor,
                        buffers: dict[str, Tensor] = buffers) -> Tensor:
                inputs = single_obs.unsqueeze(0)
                inputs = inputs.unsqueeze(0) if members_first else inputs  # [1, 1, ...] / [1, ...]
                output = torch.func.functional_call(network, (params, buffers), (inputs,))
                return self._q_values(self._first(output))[0, 0].gather(0, action.reshape(1)).squeeze(0)

            per_sample = torch.func.vmap(torch.func.grad(taken_q), in_dims=(None, 0, 0))(params, obs[k], actions[k])
            kernel = obs.new_zeros((obs.shape[1], obs.shape[1]), dtype=torch.float32)
            for grads in per_sample.values():  # K = Σ over parameter tensors of J_p J_pᵀ: no concatenated J
                flat = grads.flatten(1).float()
                kernel = kernel + flat @ flat.T
            kernels.append(kernel)
        return torch.stack(kernels)

    def entk(self, obs: Tensor, actions: Tensor, entk_batch: int = 64) -> dict[str, Tensor]:
        """``entk_effective_rank`` and ``entk_cond`` of each member's K = J Jᵀ, ``{tag: Tensor [M]}``.

        The spectrum of K (eigenvalues = σ(J)², clamped at 0; one batched ``eigvalsh``)
        goes through the same ``effective_rank`` and ``condition_number`` as the features.
        A member whose K is not finite gets NaN.  Out-of-range actions raise ``ValueError``
        (one boolean read before the probe).
        """
        if not isinstance(actions, Tensor) or actions.dtype not in (torch.int64, torch.int32):
            raise ValueError("entk: actions must be an integer tensor of the probe transitions' actions")
        if not bool(((actions >= 0) & (actions < self.n_actions)).all()):
            raise ValueError(f"entk: actions must lie in [0, {self.n_actions}); got values outside it")
        kernel = self.entk_kernel(obs, actions, entk_batch).double()
        finite = torch.isfinite(kernel).flatten(1).all(1)
        safe = torch.where(finite[:, None, None], kernel, torch.zeros((), dtype=kernel.dtype, device=kernel.device))
        eigenvalues = torch.linalg.eigvalsh(safe).clamp_min(0).flip(-1)
        return {TAG_PREFIX + "entk_effective_rank": _nan_where(finite, effective_rank(eigenvalues)),
                TAG_PREFIX + "entk_cond": _nan_where(finite, condition_number(eigenvalues, SRANK_DELTA).double())}

    def hessian_max_eig(self, loss_fn: Callable[[], Tensor], iters: int = 20, seed: int = 0) -> dict[str, Tensor]:
        """Top eigenvalue of each member's loss Hessian w.r.t. its trainable parameters, ``{tag: Tensor [M]}``.

        ``loss_fn`` runs the forward on the probe batch (the model is in eval mode
        meanwhile) and returns the per-member losses ``[M]`` -- or their sum, a 0-dim
        tensor (what an ordinary model's loss is).  Members share no parameters, so the
        Hessian of the sum is block-diagonal with member k's Hessian in block k: one
        power iteration on Hessian-vector products of the sum (double backward through
        ``torch.autograd.grad``, no ``.grad`` written), with the iterate normalised per
        member, runs every member's own power iteration at once (``iters`` HVPs for all).
        Every member starts from the same unit random vector, drawn from a private
        generator seeded by ``seed`` (the global RNG is untouched) exactly as the
        single run draws it.  Returns the Rayleigh quotients of the final iterates:
        the eigenvalue of largest magnitude (the top one at and near minima).
        """
        if iters < 1:
            raise ValueError(f"hessian_max_eig: iters must be >= 1; got {iters}")
        members = self.members
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        flags = [self._is_member_param(name) for name, _ in named]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                loss = loss_fn()
                if (not isinstance(loss, Tensor) or not loss.requires_grad
                        or not (loss.dim() == 0 or loss.shape == (members,))):
                    raise ValueError(f"hessian_max_eig: loss_fn must return the per-member losses [{members}] (or "
                                     "their sum, a 0-dim tensor) computed from the model")
                grads = torch.autograd.grad(loss.sum(), params, create_graph=True, allow_unused=True,
                                            materialize_grads=True)
                pairs = [(g, p, member) for g, p, member in zip(grads, params, flags) if g.requires_grad]
                generator = torch.Generator(device=self.device).manual_seed(seed)
                vector = []
                for _, p, member in pairs:  # one draw per tensor, shared by the members: the single run's start
                    draw = torch.randn(p.shape[1:] if member else p.shape, generator=generator, device=p.device,
                                       dtype=p.dtype)
                    vector.append(draw.expand(p.shape).clone() if member else draw)
                member_flags = [member for _, _, member in pairs]
                vector = self._normalised(vector, member_flags)
                eigenvalue = loss.new_zeros(members)
                for _ in range(iters if pairs else 0):
                    hvp = torch.autograd.grad([g for g, _, _ in pairs], [p for _, p, _ in pairs], grad_outputs=vector,
                                              retain_graph=True, allow_unused=True, materialize_grads=True)
                    eigenvalue = torch.stack([_per_member_sum(h.detach() * v, member, members)
                                              for h, v, member in zip(hvp, vector, member_flags)]).sum(0)
                    vector = self._normalised([h.detach() for h in hvp], member_flags)
        finally:
            self.model.train(was_training)
        return {TAG_PREFIX + "hessian_max_eig": eigenvalue.detach().double()}

    def _normalised(self, vectors: list[Tensor], flags: list[bool]) -> list[Tensor]:
        """The list of tensors scaled to unit norm per member (each member's slice of all tensors together)."""
        members = self.members
        if not vectors:
            return vectors
        norm = torch.linalg.vector_norm(torch.stack([_per_member_norm(v, member, members)
                                                     for v, member in zip(vectors, flags)]), dim=0).clamp_min(_TINY)
        return [v / (norm.view(members, *([1] * (v.dim() - 1))) if member else norm.view(*([1] * v.dim())))
                for v, member in zip(vectors, flags)]

    def probe_fit_loss(self, obs: Tensor, steps: int = 100, lr: float = 1e-3, seed: int = 0) -> dict[str, Tensor]:
        """Plasticity probe (``probe_fit_loss``): how well a copy of each member fits fresh random targets.

        The targets are the outputs on the probe batch of a fresh random network of
        the same architecture (a deep copy re-initialised with ``networks.reinit_`` on
        every layer, LayerNorms to γ = 1, β = 0, from a private ``MemberRandom`` in which
        every member has the seed ``PROBE_SEED_OFFSET + seed``: the same task for every
        member and at every event, never the network's own initialisation, and the
        global RNG is untouched).  A second copy of the training network is trained by
        a fresh Adam for ``steps`` full-batch MSE steps, each member on its own batch
        (the loss is the sum of the members' MSEs, Adam is elementwise: the members
        train independently); the result is each member's MSE after the last step,
        ``{tag: Tensor [M]}`` (lower = more plastic).  The training network, its
        gradients, mode and optimiser are untouched.
        """
        if steps < 1 or lr <= 0:
            raise ValueError(f"probe_fit_loss: steps must be >= 1 and lr > 0; got steps={steps}, lr={lr}")
        self._check_batch(obs, None, None, None)
        members = self.members
        teacher = copy.deepcopy(self.model).eval()
        # Offset the seed: a stream seeded like the agent's would redraw θ0 exactly
        # (same initialiser, same draw order), and the "random" targets would be the network at init.
        random = MemberRandom([PROBE_SEED_OFFSET + seed] * members, self.device)
        with torch.no_grad():
            for module in teacher.modules():
                if isinstance(module, WEIGHT_LAYERS):
                    reinit_(module, random=random)
                elif isinstance(module, NORM_LAYERS) and module.weight is not None:
                    module.weight.fill_(1.0)
                    if module.bias is not None:
                        module.bias.zero_()
        learner = copy.deepcopy(self.model).train()
        learner.zero_grad(set_to_none=True)
        optimizer = torch.optim.Adam(learner.parameters(), lr=lr)

        def per_member_mse(outputs: Tensor, targets: Tensor) -> Tensor:
            return (self._first(outputs).flatten(2).float() - targets).square().mean((1, 2))

        with torch.no_grad():
            targets = self._first(teacher(obs)).flatten(2).float()
        with torch.enable_grad():
            for _ in range(steps):
                loss = per_member_mse(learner(obs), targets).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            final_loss = per_member_mse(learner(obs), targets)
        return {TAG_PREFIX + "probe_fit_loss": final_loss.double()}

    # ---- checkpointing ------------------------------------------------------

    def state_dict(self) -> dict:
        """θ0 and the grad-norm accumulator (``[M]``), for checkpoint/resume."""
        return {
            "initial_params": {name: p.clone() for name, p in self.initial_params.items()},
            "grad_norm_sum": None if self._grad_norm_sum is None else self._grad_norm_sum.clone(),
            "grad_norm_count": self._grad_norm_count,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"initial_params", "grad_norm_sum", "grad_norm_count"} - set(state)
        if missing:
            raise ValueError(f"Diagnostics.load_state_dict: missing keys {sorted(missing)}; "
                             "pass a dict made by Diagnostics.state_dict()")
        current = dict(self.model.named_parameters())
        saved = state["initial_params"]
        if set(saved) != set(current):
            raise ValueError("Diagnostics.load_state_dict: the saved θ0 has parameters "
                             f"{sorted(set(saved) ^ set(current))} that the model does not (or vice versa); "
                             "was the checkpoint made with the same network flags?")
        for name, p in current.items():
            if saved[name].shape != p.shape:
                raise ValueError(f"Diagnostics.load_state_dict: θ0[{name}] has shape {tuple(saved[name].shape)}, "
                                 f"the model {tuple(p.shape)}; was the checkpoint made with the same network flags?")
        grad_sum = state["grad_norm_sum"]
        if grad_sum is not None:
            if grad_sum.dim() == 0 and self.members == 1:
                grad_sum = grad_sum.reshape(1)  # a single run's checkpoint from before populations
            if grad_sum.shape != (self.members,):
                raise ValueError(f"Diagnostics.load_state_dict: the grad-norm sum has shape {tuple(grad_sum.shape)}, "
                                 f"this population [{self.members}]; was the checkpoint made with the same "
                                 "--num-seeds?")
        self.initial_params = {name: saved[name].detach().to(current[name].device).clone() for name in current}
        self._grad_norm_sum = None if grad_sum is None else grad_sum.detach().to(self.device).clone()
        self._grad_norm_count = int(state["grad_norm_count"])


def _target_metrics(td_targets: Tensor, clip_range: tuple[float, float] | None) -> dict[str, Tensor]:
    """Per member ``[M]``: ȳ, s_y, |ȳ| / (s_y + 1e-8) and the fraction of targets the loss clips.

    ``td_targets`` ``[M, n]``; clipped = strictly outside ``clip_range``.
    """
    targets = td_targets.detach().float()
    mean, std = targets.mean(1), targets.std(1, correction=0)
    scalars = {
        TAG_PREFIX + "target_mean": mean,
        TAG_PREFIX + "target_std": std,
        TAG_PREFIX + "target_offset_ratio": mean.abs() / (std + 1e-8),
    }
    if clip_range is not None:
        low, high = clip_range
        scalars[TAG_PREFIX + "target_clip_frac"] = ((targets < low) | (targets > high)).float().mean(1)
    return scalars
