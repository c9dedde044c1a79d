"""Singular values of a feature matrix and the rank metrics built on them (spec diagnostics.md, "Rank").

One name, one formula (pitfall 5: public toolkits call three different
quantities "stable rank", and some return an off-by-one srank):

* ``effective_rank`` -- Roy & Vetterli 2007: exp(entropy of p_k = σ_k / Σσ).
* ``srank``          -- Kumar et al. 2021: min{k : Σ_{j≤k} σ_j / Σ_j σ_j ≥ 1 − δ}.
* ``stable_rank``    -- classical ‖Φ‖_F² / ‖Φ‖_2² = Σσ² / σ_1².

All functions take the singular values along the last dimension (any order, any
float dtype, on any device) with any leading batch dimensions -- ``[r]`` gives
a 0-dim result, ``[M, r]`` (a population's members) gives ``[M]`` -- and return
float64 tensors on the same device without a host sync, so a diagnostic event
can gather every scalar and move them to the host once.  A zero matrix has
rank 0 under all three; non-finite σ give NaN (per batch entry: one diverged
member does not touch the others).

``singular_values`` implements the cost rule of the spec: ``svdvals`` in
float32, and when it fails -- LAPACK/cuSOLVER non-convergence, which happens on
exactly the ill-conditioned features the diagnostics exist to detect (pitfall
7), or silently non-finite output -- the eigenvalues of the Gram matrix in
float64, σ = sqrt(clamp(λ, 0)).  Matrices are ``[..., n, d]``: leading dims are
batch dims (one SVD call for all members).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "singular_values",
    "gram_singular_values",
    "effective_rank",
    "srank",
    "stable_rank",
    "condition_number",
]

_TINY64 = torch.finfo(torch.float64).tiny


def _as_matrix(features: Tensor) -> Tensor:
    """[..., n, d] floating matrices (leading dims are batch dims), computed in at least float32."""
    if not isinstance(features, Tensor) or features.dim() < 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a tensor of shape [n_samples, n_features] (or [batch, n_samples, "
                         f"n_features]); got {shape}")
    return features if features.dtype == torch.float64 else features.float()


def gram_singular_values(features: Tensor, with_top_vector: bool = False) -> tuple[Tensor, Tensor | None]:
    """Singular values of Φ from the eigenvalues of its Gram matrix in float64 (the fallback of pitfall 7).

    ``features``: ``[..., n, d]``.  Uses the smaller Gram matrix (ΦᵀΦ when n ≥ d,
    else ΦΦᵀ) so exactly min(n, d) values come back per matrix (``[..., r]``),
    sorted descending, in Φ's compute dtype.  With ``with_top_vector`` also
    returns v_1, the top right singular vector of Φ (unit norm, ``[..., d]``).
    """
    matrix = _as_matrix(features)
    n, d = matrix.shape[-2:]
    dtype = matrix.dtype
    wide = n < d
    matrix64 = matrix.double()
    gram = matrix64 @ matrix64.mT if wide else matrix64.mT @ matrix64
    if with_top_vector:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    else:
        eigenvalues, eigenvectors = torch.linalg.eigvalsh(gram), None
    sv = eigenvalues.clamp_min(0).sqrt().flip(-1)
    if not with_top_vector:
        return sv.to(dtype), None
    top = eigenvectors[..., -1]
    if wide:  # top eigenvector of ΦΦᵀ is u_1; v_1 = Φᵀ u_1 / σ_1
        top = (matrix64.mT @ top.unsqueeze(-1)).squeeze(-1)
        top = top / torch.linalg.vector_norm(top, dim=-1, keepdim=True).clamp_min(_TINY64)
    return sv.to(dtype), top.to(dtype)


def singular_values(features: Tensor, check_finite: bool = True) -> Tensor:
    """σ_1 ≥ … ≥ σ_r of Φ (not centred), r = min(n, d): ``svdvals`` in float32 with the float64 Gram fallback.

    ``features``: ``[n, d]`` -> ``[r]``, or ``[..., n, d]`` -> ``[..., r]`` (one batched call).
    The fallback runs when ``svdvals`` raises (``torch.linalg.LinAlgError`` is a
    ``RuntimeError``) and, with ``check_finite``, when its output is not finite
    although Φ is.  That finiteness test costs one host sync; pass
    ``check_finite=False`` to skip it (``Diagnostics.measure`` does not call this
    function: it runs its own SVD with per-member masks).  Non-finite features
    raise ``ValueError`` when ``check_finite`` (svdvals can silently drop NaN).
    """
    matrix = _as_matrix(features)
    try:
        sv = torch.linalg.svdvals(matrix)
    except RuntimeError:
        if check_finite and not bool(torch.isfinite(matrix).all()):
            raise ValueError(_NON_FINITE_MESSAGE) from None
        return gram_singular_values(matrix)[0]
    if check_finite and not bool(torch.isfinite(sv).all() & torch.isfinite(matrix).all()):
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError(_NON_FINITE_MESSAGE)
        return gram_singular_values(matrix)[0]
    return sv


_NON_FINITE_MESSAGE = ("singular_values: the features contain NaN or inf (the network has diverged); "
                       "singular values are undefined -- check the learning rate and the TD targets")


def _total(sv: Tensor) -> tuple[Tensor, Tensor]:
    values = sv.double()
    return values, values.sum(-1)


def effective_rank(sv: Tensor) -> Tensor:
    """Roy & Vetterli: exp(−Σ_{p_k>0} p_k ln p_k), p_k = σ_k / Σσ.  In [1, r]; 0 for a zero matrix."""
    values, total = _total(sv)
    p = values / total.clamp_min(_TINY64).unsqueeze(-1)
    entropy = -torch.xlogy(p, p).sum(-1)  # xlogy(0, 0) = 0: zero singular values do not count
    return _undefined_to_nan(total, torch.where(total > 0, entropy.exp(), torch.zeros_like(total)))


def srank(sv: Tensor, delta: float = 0.01) -> Tensor:
    """Kumar et al.: min{k : Σ_{j≤k} σ_j / Σ_j σ_j ≥ 1 − δ} over unsquared σ sorted descending.

    1-based (a rank-1 matrix has srank 1); an integer held in a float64 tensor
    so that non-finite σ give NaN, like the other metrics; 0 for a zero matrix.
    The cumulative fractions are compared in float64, so sums that land
    exactly on 1 − δ count (identity 100×100 with δ = 0.01 → 99).
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"srank: delta must be in [0, 1); got {delta}")
    values, total = _total(sv)
    values = values.sort(dim=-1, descending=True).values
    fraction = values.cumsum(-1) / total.unsqueeze(-1)
    # Number of prefixes still below the threshold, plus one for the prefix that reaches it.
    k = ((fraction < 1.0 - delta).sum(-1) + 1).clamp_max(values.shape[-1]).double()  # clamp: rounding at δ = 0
    return _undefined_to_nan(total, torch.where(total > 0, k, torch.zeros_like(k)))


def stable_rank(sv: Tensor) -> Tensor:
    """Σσ² / σ_1² = ‖Φ‖_F² / ‖Φ‖_2² (classical stable rank).  0 for a zero matrix."""
    values, total = _total(sv)
    top = values.abs().amax(-1)
    ratio = values.square().sum(-1) / top.square().clamp_min(_TINY64)
    return _undefined_to_nan(total, torch.where(top > 0, ratio, torch.zeros_like(ratio)))


def condition_number(sv: Tensor, delta: float = 0.01) -> Tensor:
    """σ_1 / σ_k with k = srank(σ, δ): the smallest singular value that still counts (``feature_cond``).

    NaN for a zero matrix (no singular value counts).  Index by a device tensor,
    so no host sync.
    """
    values, _ = _total(sv)
    values = values.sort(dim=-1, descending=True).values
    k = srank(values, delta)
    index = (k.nan_to_num(0.0) - 1).clamp_min(0).long().unsqueeze(-1)
    kth = values.gather(-1, index).squeeze(-1)
    ratio = values[..., 0] / kth
    return torch.where(k > 0, ratio, torch.full_like(ratio, float("nan")))


def _undefined_to_nan(total: Tensor, value: Tensor) -> Tensor:
    """NaN when the singular values are not finite (a diverged network), instead of a plausible number."""
    return torch.where(torch.isfinite(total), value, torch.full_like(value, float("nan")))
