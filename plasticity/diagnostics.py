"""Plasticity diagnostics: every metric of spec diagnostics.md, computed on the model's device.

Usage in an agent or any other training loop (tags are returned ready for ``writer.add_scalar``)::

    diagnostics = Diagnostics(q_network, support=atoms)          # after q_network.to(device)
    ...
    loss.backward()
    diagnostics.record_grad_norm()                                # before clipping
    optimizer.step()
    if step % args.diag_every == 0:
        for tag, value in diagnostics.measure(obs, td_targets, clip_range=support.clip_range(loss)).items():
            writer.add_scalar(tag, value, step)

A regression model or classifier is measured with ``Diagnostics(model).measure(obs)``
(its outputs stand for the Q-values in ``q_mean``/``q_std``); ``td_targets`` may be
any regression targets.

Cost rules (diagnostics.md): one probe forward in eval mode, one SVD of the
features, per-layer statistics vectorised over units, and every scalar of an
event gathered into one tensor that crosses to the host once (``.tolist()``).
Nothing here calls ``.item()`` per metric, and nothing touches the training
state: the mode is restored, no ``.grad`` is written, the global RNG is not
drawn from, hooks are removed, and the costly probes (eNTK, plasticity probe)
run on copies of the network.

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
  parameters (weights, biases, LayerNorm gains).
* ``feature_cond`` and ``entk_cond`` share one definition, σ_1 / σ_k with
  k = srank (for the eNTK, on the eigenvalues of K).  Quantities that are
  undefined for an all-zero feature matrix (every unit dead) are NaN:
  ``feature_cond`` and ``feature_mean_alignment``; the ranks are 0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plasticity.networks import WEIGHT_LAYERS, ActivationRecorder, Torso, layer_map, reinit_
from plasticity.rank import (
    condition_number,
    effective_rank,
    gram_singular_values,
    singular_values,
    srank,
    stable_rank,
)

__all__ = [
    "Diagnostics",
    "unit_stats",
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


# ---------------------------------------------------------------------------
# Pure functions on tensors (0-dim device tensors out, no host sync)
# ---------------------------------------------------------------------------

def unit_stats(pre: Tensor, post: Tensor, dormant_tau: float = 0.1) -> dict[str, Tensor]:
    """Unit statistics of one hidden layer on a probe batch (diagnostics.md, "Units").

    ``pre`` is the ReLU input (after LayerNorm when present), ``post`` its
    output, both [B, U] (dense) or [B, C, H, W] (conv, a unit is a channel).
    Returns 0-dim float32 tensors: ``dead``, ``linearized``, ``dormant`` (unit
    counts), ``num_units``, ``preact_mean_abs`` and ``preact_std`` (means over
    units).  Counts rather than fractions, so the overall fraction across
    layers of different widths is total flagged / total units (pitfall 6).
    """
    if pre.shape != post.shape:
        raise ValueError(f"unit_stats: pre {tuple(pre.shape)} and post {tuple(post.shape)} shapes differ")
    if pre.dim() not in (2, 4):
        raise ValueError(f"unit_stats: expected [B, units] or [B, C, H, W] activations; got {tuple(pre.shape)}")
    if dormant_tau < 0:
        raise ValueError(f"unit_stats: dormant_tau must be >= 0; got {dormant_tau}")
    spatial = tuple(range(2, pre.dim()))  # () for dense layers
    batch_and_spatial = (0, *spatial)
    # ReDo activity mean_b |h_i| (and over H, W): zero exactly when the unit outputs 0 everywhere.
    activity = post.detach().abs().float().mean(batch_and_spatial)
    dead = activity == 0
    linearized = pre.detach().amin(batch_and_spatial) > 0
    score = activity / activity.mean().clamp_min(_TINY)  # an all-zero layer scores 0: all dormant
    dormant = score <= dormant_tau
    unit_pre = pre.detach().float().mean(spatial) if spatial else pre.detach().float()  # [B, U]
    return {
        "dead": dead.sum().float(),
        "linearized": linearized.sum().float(),
        "dormant": dormant.sum().float(),
        "num_units": activity.new_full((), activity.numel()),
        "preact_mean_abs": unit_pre.mean(0).abs().mean(),
        "preact_std": unit_pre.std(0, correction=0).mean(),
    }


def _spectral_metrics(features: Tensor, sv: Tensor, top_vector: Tensor) -> dict[str, Tensor]:
    """Rank metrics and the spectral target-mean metrics of Φ from its σ and v_1."""
    mean_feature = features.mean(0)
    mean_sq = mean_feature.square().sum()
    projection = (mean_feature @ top_vector).square()
    return {
        "effective_rank": effective_rank(sv),
        "srank": srank(sv, SRANK_DELTA),
        "stable_rank": stable_rank(sv),
        "feature_sv_max": sv.max(),
        "feature_cond": condition_number(sv, SRANK_DELTA),
        # (μᵀv_1)² / ‖μ‖²; 0/0 = NaN when Φ = 0 (post-ReLU features have μ = 0 only then).
        "feature_mean_alignment": projection / mean_sq,
    }


def _svd_with_top_vector(features: Tensor) -> tuple[Tensor, Tensor]:
    """σ (descending) and v_1 of Φ: float32 SVD, float64 Gram fallback when it raises (pitfall 7).

    The full SVD rather than ``svdvals`` because ``feature_mean_alignment``
    needs v_1; same LAPACK/cuSOLVER family, same fallback.  When even the
    fallback raises (non-finite features) the values are NaN, not an exception:
    a diverged network should log NaN, not stop the run.
    """
    try:
        _, sv, vh = torch.linalg.svd(features, full_matrices=False)
        return sv, vh[0]
    except RuntimeError:
        pass
    try:
        sv, top = gram_singular_values(features, with_top_vector=True)
        return sv, top
    except RuntimeError:
        nan = float("nan")
        return features.new_full((min(features.shape),), nan), features.new_full((features.shape[1],), nan)


def _grad_norm(parameters: list[nn.Parameter]) -> Tensor | None:
    """Global L2 norm of the gradients, on device; fused (foreach) kernels where torch has them."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return None
    if hasattr(nn.utils, "get_total_norm"):  # torch >= 2.6
        return nn.utils.get_total_norm(grads, error_if_nonfinite=False).float()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).float() for g in grads]))


# ---------------------------------------------------------------------------
# The diagnostics of one network
# ---------------------------------------------------------------------------

class Diagnostics:
    """All plasticity diagnostics of one Q-network (spec diagnostics.md).

    Args:
        model: the online Q-network; its modules registered in forward order
            (``networks.layer_map``).  Build this object after ``model.to(device)``:
            it keeps a frozen copy θ0 of the parameters for ``dist_from_init``.
        dormant_tau: ReDo threshold τ of ``dormant_frac``.
        support: atom/bin centres of a categorical head (C51, HL-Gauss, two-hot):
            the head outputs logits [B, A·N] or [B, A, N] and Q = Σ softmax·support.
            ``None`` for a regression head (Q is the output, [B, A]).
        n_actions: checked against the head's width when given.
    """

    def __init__(self, model: nn.Module, *, dormant_tau: float = 0.1, support: Tensor | None = None,
                 n_actions: int | None = None):
        if dormant_tau < 0:
            raise ValueError(f"Diagnostics: dormant_tau must be >= 0; got {dormant_tau}")
        self.model = model
        self.dormant_tau = dormant_tau
        self.layers = layer_map(model)
        head_width = self.layers.output.weight.shape[0]
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
        return self.layers.output.weight.device

    # ---- per update -------------------------------------------------------

    def record_grad_norm(self) -> None:
        """Accumulate the global L2 norm of the current gradients, on device (no host sync).

        Call after ``loss.backward()`` and before any clipping; ``measure``
        logs the mean over the updates since the previous event.
        """
        norm = _grad_norm(list(self.model.parameters()))
        if norm is None:
            raise ValueError("record_grad_norm: no parameter has a gradient; call it after loss.backward() "
                             "and before optimizer.zero_grad()")
        self._grad_norm_sum = norm if self._grad_norm_sum is None else self._grad_norm_sum + norm
        self._grad_norm_count += 1

    # ---- the diagnostic event ---------------------------------------------

    def measure(self, obs: Tensor, td_targets: Tensor | None = None, actions: Tensor | None = None,
                clip_range: tuple[float, float] | None = None) -> dict[str, float]:
        """One diagnostic event on a probe batch: every tag of diagnostics.md except the rarer probes.

        Args:
            obs: probe observations [n, ...] on the model's device (n ≥ 2; default n = 1024).
            td_targets: TD targets of those transitions [n]; adds ``target_*``.
            actions: the transitions' actions [n]; only checked for length here
                (``q_mean``/``q_std`` run over all actions) -- pass the same batch to ``entk``.
            clip_range: (low, high), the interval the categorical loss clamps its
                targets to; adds ``target_clip_frac``, the fraction strictly outside
                it (needs ``td_targets``).  Take it from the loss, not from the
                support's ends: ``CategoricalSupport.clip_range(loss)`` gives
                [v_min, v_max] for HL-Gauss and the outer bin centres
                [v_min + ς/2, v_max − ς/2] for two-hot; C51 clips to its end atoms,
                (v_min, v_max).

        Returns ``{tag: float}``.  ``grad_norm`` appears when ``record_grad_norm``
        ran since the previous event (the accumulator restarts here).
        """
        self._check_batch(obs, td_targets, actions, clip_range)
        scalars, features = self._probe(obs, td_targets, clip_range)
        names = list(scalars)
        values = torch.stack([v.detach().double().reshape(()) for v in scalars.values()]).tolist()  # the one transfer
        result = dict(zip(names, values))
        spectral_ok, features_ok = result.pop("_spectral_finite"), result.pop("_features_finite")
        if features_ok and not spectral_ok:
            # The SVD returned non-finite values without raising (seen on GPU for degenerate Φ):
            # redo the spectral metrics with the float64 Gram fallback -- a second transfer, only here.
            sv, top = gram_singular_values(features, with_top_vector=True)
            spectral = _spectral_metrics(features, sv, top)
            result.update(zip((TAG_PREFIX + k for k in spectral),
                              torch.stack([v.double() for v in spectral.values()]).tolist()))
        if self._grad_norm_count:
            self._grad_norm_sum, self._grad_norm_count = None, 0
        return result

    def _probe(self, obs: Tensor, td_targets: Tensor | None,
               clip_range: tuple[float, float] | None) -> tuple[dict[str, Tensor], Tensor]:
        """The probe forward and every scalar of the event, as device tensors (no sync)."""
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
                output = model(obs)
                features = captured["features"].flatten(1).float()
                scalars = self._unit_metrics(recorder)
                scalars.update(self._feature_metrics(features))
                scalars.update(self._norm_metrics())
                q_values = self._q_values(output)
                scalars[TAG_PREFIX + "q_mean"] = q_values.mean()
                scalars[TAG_PREFIX + "q_std"] = q_values.std(correction=0)
                if td_targets is not None:
                    scalars.update(_target_metrics(td_targets, clip_range))
        finally:
            feature_hook.remove()
            recorder.remove()
            model.train(was_training)
        return scalars, features

    def _unit_metrics(self, recorder: ActivationRecorder) -> dict[str, Tensor]:
        scalars: dict[str, Tensor] = {}
        totals: dict[str, list[Tensor]] = {key: [] for key in
                                           ("dead", "linearized", "dormant", "num_units", "mean_abs", "std")}
        for hidden in recorder.layers:
            stats = unit_stats(recorder.pre[hidden.name], recorder.post[hidden.name], self.dormant_tau)
            units = stats["num_units"]
            for key in ("dead", "linearized", "dormant"):
                scalars[f"{TAG_PREFIX}{key}_frac/{hidden.name}"] = stats[key] / units
                totals[key].append(stats[key])
            scalars[f"{TAG_PREFIX}preact_mean_abs/{hidden.name}"] = stats["preact_mean_abs"]
            scalars[f"{TAG_PREFIX}preact_std/{hidden.name}"] = stats["preact_std"]
            totals["num_units"].append(units)
            totals["mean_abs"].append(stats["preact_mean_abs"] * units)
            totals["std"].append(stats["preact_std"] * units)
        if recorder.layers:
            # Overall = total flagged / total units; means over all units (pitfall 6: width-weighted).
            all_units = torch.stack(totals["num_units"]).sum()
            for key in ("dead", "linearized", "dormant"):
                scalars[f"{TAG_PREFIX}{key}_frac"] = torch.stack(totals[key]).sum() / all_units
            scalars[TAG_PREFIX + "preact_mean_abs"] = torch.stack(totals["mean_abs"]).sum() / all_units
            scalars[TAG_PREFIX + "preact_std"] = torch.stack(totals["std"]).sum() / all_units
        return scalars

    def _feature_metrics(self, features: Tensor) -> dict[str, Tensor]:
        """Rank, feature norm and the target-mean ill-conditioning metrics of Φ [n, d]."""
        sv, top_vector = _svd_with_top_vector(features)
        scalars = {TAG_PREFIX + k: v for k, v in _spectral_metrics(features, sv, top_vector).items()}
        mean_feature = features.mean(0)
        covariance_trace = (features - mean_feature).square().sum(1).mean()  # tr(C), population
        scalars[TAG_PREFIX + "feature_norm"] = torch.linalg.vector_norm(features, dim=1).mean()
        scalars[TAG_PREFIX + "feature_mean_dominance"] = mean_feature.square().sum() / covariance_trace
        scalars["_spectral_finite"] = torch.isfinite(sv).all() & torch.isfinite(top_vector).all()
        scalars["_features_finite"] = torch.isfinite(features).all()
        return scalars

    def _norm_metrics(self) -> dict[str, Tensor]:
        scalars: dict[str, Tensor] = {}
        for name, module in self.layers.ordered:
            if isinstance(module, WEIGHT_LAYERS):
                scalars[f"{TAG_PREFIX}weight_norm/{name}"] = torch.linalg.vector_norm(module.weight.detach())
        named = [(name, p.detach()) for name, p in self.model.named_parameters()]
        self._move_initial_params()
        squares = torch.stack([p.float().square().sum() for _, p in named])
        abs_sum = torch.stack([p.float().abs().sum() for _, p in named]).sum()
        drift = torch.stack([(p.float() - self.initial_params[name].float()).square().sum() for name, p in named])
        initial = torch.stack([self.initial_params[name].float().square().sum() for name, _ in named])
        scalars[TAG_PREFIX + "weight_norm"] = squares.sum().sqrt()
        scalars[TAG_PREFIX + "weight_magnitude"] = abs_sum / sum(p.numel() for _, p in named)
        scalars[TAG_PREFIX + "dist_from_init"] = drift.sum().sqrt() / initial.sum().sqrt()
        if self._grad_norm_count:
            scalars[TAG_PREFIX + "grad_norm"] = self._grad_norm_sum / self._grad_norm_count
        return scalars

    def _move_initial_params(self) -> None:
        """θ0 follows the model if it was moved after construction (once, not per event)."""
        for name, p in self.model.named_parameters():
            if name not in self.initial_params:
                raise ValueError(f"Diagnostics: parameter {name} did not exist when Diagnostics was built; "
                                 "build Diagnostics after the network is complete")
            if self.initial_params[name].device != p.device:
                self.initial_params[name] = self.initial_params[name].to(p.device)

    def _q_values(self, output: Tensor) -> Tensor:
        """Q [B, A] from the head's output (categorical: expected value under softmax over the support)."""
        batch = output.shape[0]
        if self.support is None:
            if output.dim() != 2 or output.shape[1] != self.n_actions:
                raise ValueError(f"Diagnostics: the head output has shape {tuple(output.shape)}, expected "
                                 f"[B, {self.n_actions}]; for a categorical head pass support= (atom/bin centres)")
            return output
        support = self.support.to(output.device)
        logits = output.reshape(batch, self.n_actions, support.numel())
        return torch.softmax(logits.float(), dim=-1) @ support

    def _check_batch(self, obs: Tensor, td_targets: Tensor | None, actions: Tensor | None,
                     clip_range: tuple[float, float] | None) -> None:
        if not isinstance(obs, Tensor) or obs.dim() < 2 or obs.shape[0] < 2:
            shape = tuple(obs.shape) if isinstance(obs, Tensor) else type(obs).__name__
            raise ValueError(f"Diagnostics: obs must be a batch of at least 2 observations [n, ...]; got {shape}")
        if obs.device != self.device:
            raise ValueError(f"Diagnostics: obs is on {obs.device} but the model is on {self.device}; "
                             "move the probe batch to the model's device")
        for name, tensor in (("td_targets", td_targets), ("actions", actions)):
            if tensor is not None and tensor.numel() != obs.shape[0]:
                raise ValueError(f"Diagnostics: {name} has {tensor.numel()} entries for {obs.shape[0]} observations")
        if clip_range is not None:
            if td_targets is None:
                raise ValueError("Diagnostics: clip_range needs td_targets (the fraction of targets outside it)")
            low, high = clip_range
            if not low < high:
                raise ValueError(f"Diagnostics: clip_range must be (v_min, v_max) with v_min < v_max; got {clip_range}")

    # ---- rarer probes (own cadence, off by default) ------------------------

    def entk_kernel(self, obs: Tensor, actions: Tensor, entk_batch: int = 64) -> Tensor:
        """Empirical NTK K = J Jᵀ [m, m] on the first m = min(entk_batch, n) probe inputs.

        J = per-sample gradient of the taken-action Q-value (categorical: the
        expected value) w.r.t. all parameters, via ``torch.func`` (vmap over
        grad of ``functional_call``) on a deep copy of the network in eval mode:
        the copy keeps other components' activation hooks inert (they check
        module identity), and the training network is not touched.  Memory:
        the per-sample gradients, m × (number of parameters) floats.
        """
        if entk_batch < 1:
            raise ValueError(f"entk: entk_batch must be >= 1; got {entk_batch}")
        self._check_batch(obs, None, actions, None)
        if actions is None or actions.dtype not in (torch.int64, torch.int32):
            raise ValueError("entk: actions must be an integer tensor [n] of the probe transitions' actions")
        obs, actions = obs[:entk_batch], actions.reshape(-1)[:entk_batch].long()
        network = copy.deepcopy(self.model).eval()
        for module in network.modules():
            if isinstance(module, Torso):  # vmap cannot copy into channels-last (Atari torsos)
                module.use_default_layout_()
        params = {name: p.detach() for name, p in network.named_parameters() if p.requires_grad}
        buffers = dict(network.named_buffers())

        def taken_q(params: dict[str, Tensor], single_obs: Tensor, action: Tensor) -> Tensor:
            output = torch.func.functional_call(network, (params, buffers), (single_obs.unsqueeze(0),))
            return self._q_values(output)[0].gather(0, action.reshape(1)).squeeze(0)

        per_sample = torch.func.vmap(torch.func.grad(taken_q), in_dims=(None, 0, 0))(params, obs, actions)
        kernel = obs.new_zeros((obs.shape[0], obs.shape[0]), dtype=torch.float32)
        for grads in per_sample.values():  # K = Σ over parameter tensors of J_p J_pᵀ: no concatenated J
            flat = grads.flatten(1).float()
            kernel = kernel + flat @ flat.T
        return kernel

    def entk(self, obs: Tensor, actions: Tensor, entk_batch: int = 64) -> dict[str, float]:
        """``entk_effective_rank`` and ``entk_cond`` of K = J Jᵀ (diagnostics.md, optional metrics).

        The spectrum of K (eigenvalues = σ(J)², clamped at 0) goes through the
        same ``effective_rank`` and ``condition_number`` as the features.
        Out-of-range actions raise ``ValueError`` after the single transfer.
        """
        if not isinstance(actions, Tensor) or actions.dtype not in (torch.int64, torch.int32):
            raise ValueError("entk: actions must be an integer tensor [n] of the probe transitions' actions")
        actions = actions.reshape(-1)
        valid = ((actions >= 0) & (actions < self.n_actions)).all()  # checked after the one transfer
        kernel = self.entk_kernel(obs, actions.clamp(0, self.n_actions - 1), entk_batch)
        eigenvalues = torch.linalg.eigvalsh(kernel.double()).clamp_min(0).flip(0)
        rank, cond = effective_rank(eigenvalues), condition_number(eigenvalues, SRANK_DELTA)
        rank, cond, ok = torch.stack([rank.double(), cond.double(), valid.double()]).tolist()
        if not ok:
            raise ValueError(f"entk: actions must lie in [0, {self.n_actions}); got values outside it")
        return {TAG_PREFIX + "entk_effective_rank": rank, TAG_PREFIX + "entk_cond": cond}

    def hessian_max_eig(self, loss_fn: Callable[[], Tensor], iters: int = 20, seed: int = 0) -> dict[str, float]:
        """Top eigenvalue of the loss Hessian w.r.t. all trainable parameters (``hessian_max_eig``).

        Power iteration on Hessian-vector products (double backward through
        ``torch.autograd.grad``, so no ``.grad`` is written), from a unit random
        start drawn from a private generator (the global RNG is untouched).
        Returns the Rayleigh quotient of the final iterate: the eigenvalue of
        largest magnitude (the top one at and near minima).  ``loss_fn`` must
        run the forward on the probe batch and return a scalar loss; the model
        is in eval mode while it runs.
        """
        if iters < 1:
            raise ValueError(f"hessian_max_eig: iters must be >= 1; got {iters}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                loss = loss_fn()
                if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise ValueError("hessian_max_eig: loss_fn must return a scalar loss computed from the model")
                grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True,
                                            materialize_grads=True)
                pairs = [(g, p) for g, p in zip(grads, params) if g.requires_grad]
                generator = torch.Generator(device=self.device).manual_seed(seed)
                vector = [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
                          for _, p in pairs]
                vector = _normalised(vector)
                eigenvalue = loss.new_zeros(())
                for _ in range(iters if pairs else 0):
                    hvp = torch.autograd.grad([g for g, _ in pairs], [p for _, p in pairs], grad_outputs=vector,
                                              retain_graph=True, allow_unused=True, materialize_grads=True)
                    eigenvalue = sum((h * v).sum() for h, v in zip(hvp, vector))
                    vector = _normalised([h.detach() for h in hvp])
        finally:
            self.model.train(was_training)
        return {TAG_PREFIX + "hessian_max_eig": float(eigenvalue.detach().double().tolist())}

    def probe_fit_loss(self, obs: Tensor, steps: int = 100, lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
        """Plasticity probe (``probe_fit_loss``): how well a copy of the network fits fresh random targets.

        The targets are the outputs on the probe batch of a fresh random
        network of the same architecture (a deep copy re-initialised with
        ``networks.reinit_`` on every layer, from a private generator seeded by
        ``PROBE_SEED_OFFSET + seed``, so the probe is the same task at every
        event, never the network's own initialisation, and the global RNG is
        untouched).  A second copy of the training network is trained by
        a fresh Adam for ``steps`` full-batch MSE steps; the result is its MSE
        after the last step (lower = more plastic).  The training network, its
        gradients, mode and optimiser are untouched.
        """
        if steps < 1 or lr <= 0:
            raise ValueError(f"probe_fit_loss: steps must be >= 1 and lr > 0; got steps={steps}, lr={lr}")
        self._check_batch(obs, None, None, None)
        teacher = copy.deepcopy(self.model).eval()
        # Offset the seed: a generator seeded like the agent's global RNG would redraw θ0 exactly
        # (same initialiser, same draw order), and the "random" targets would be the network at init.
        generator = torch.Generator(device=self.device).manual_seed(PROBE_SEED_OFFSET + seed)
        for module in teacher.modules():
            if isinstance(module, WEIGHT_LAYERS):
                reinit_(module, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        learner = copy.deepcopy(self.model).train()
        learner.zero_grad(set_to_none=True)
        optimizer = torch.optim.Adam(learner.parameters(), lr=lr)
        with torch.no_grad():
            targets = teacher(obs).flatten(1).float()
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.mse_loss(learner(obs).flatten(1).float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            final_loss = F.mse_loss(learner(obs).flatten(1).float(), targets)
        return {TAG_PREFIX + "probe_fit_loss": float(final_loss.double().tolist())}

    # ---- checkpointing ------------------------------------------------------

    def state_dict(self) -> dict:
        """θ0 and the grad-norm accumulator, for checkpoint/resume."""
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
        self.initial_params = {name: saved[name].detach().to(current[name].device).clone() for name in current}
        grad_sum = state["grad_norm_sum"]
        self._grad_norm_sum = None if grad_sum is None else grad_sum.detach().to(self.device).clone()
        self._grad_norm_count = int(state["grad_norm_count"])


def _normalised(vectors: list[Tensor]) -> list[Tensor]:
    norm = torch.sqrt(sum(v.square().sum() for v in vectors)).clamp_min(_TINY)
    return [v / norm for v in vectors]


def _target_metrics(td_targets: Tensor, clip_range: tuple[float, float] | None) -> dict[str, Tensor]:
    """ȳ, s_y, |ȳ| / (s_y + 1e-8) and the fraction of targets the loss clips (strictly outside ``clip_range``)."""
    targets = td_targets.detach().flatten().float()
    mean, std = targets.mean(), targets.std(correction=0)
    scalars = {
        TAG_PREFIX + "target_mean": mean,
        TAG_PREFIX + "target_std": std,
        TAG_PREFIX + "target_offset_ratio": mean.abs() / (std + 1e-8),
    }
    if clip_range is not None:
        low, high = clip_range
        scalars[TAG_PREFIX + "target_clip_frac"] = ((targets < low) | (targets > high)).float().mean()
    return scalars
