"""Value losses: regression, HL-Gauss, two-hot (spec methods.md §9) and C51 (§10), for any value head.

Shapes: regression heads output ``[B, A]`` and the loss sees the taken-action
values ``q_taken [B]``; categorical heads output ``[B, A * N]``, reshaped by the
caller to ``[B, A, N]``, and the losses here see the taken-action logits
``[B, N]``.  Everything is vectorised and stays on the input's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REGRESSION_LOSSES = ("mse", "huber")
CATEGORICAL_LOSSES = ("hl_gauss", "two_hot")
HUBER_DELTA = 1.0


def _check_support(v_min: float, v_max: float, n: int, what: str) -> None:
    if not (math.isfinite(v_min) and math.isfinite(v_max)) or v_min >= v_max:
        raise ValueError(f"the value support needs finite v_min < v_max; got v_min={v_min}, v_max={v_max} "
                         "(set --v-min/--v-max so that they bracket the returns)")
    if n < 2:
        raise ValueError(f"the value support needs at least 2 {what}; got {n} (set --n-atoms >= 2)")


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; "
                         "they must match (pass the taken-action values/logits, not the whole head output)")


def regression_loss(kind: str, q_taken: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mse`` or ``huber`` (δ = 1) loss between Q(s, a) and the TD targets (§9), averaged over the batch.

    The batch is the last dim: ``[M, B] -> [M]`` (one loss per population member), ``[B] -> []``.
    """
    _check_same_shape("q_taken", q_taken, "targets", targets)
    if kind == "mse":
        return F.mse_loss(q_taken, targets, reduction="none").mean(-1)
    if kind == "huber":
        return F.huber_loss(q_taken, targets, delta=HUBER_DELTA, reduction="none").mean(-1)
    raise ValueError(f"unknown regression loss {kind!r}; choose one of {', '.join(REGRESSION_LOSSES)} "
                     f"(categorical losses {', '.join(CATEGORICAL_LOSSES)} go through CategoricalSupport)")


class CategoricalSupport:
    """N bins on [v_min, v_max] for the HL-Gauss and two-hot losses (§9).

    Edges e_0..e_N are evenly spaced with width ς, centres c_i = (e_i + e_{i+1}) / 2,
    and the HL-Gauss smoothing is σ = ``sigma_ratio`` · ς (0.75 by default,
    Farebrother et al. 2024).  Each loss clips its targets to the range it can
    place (``clip_range(loss)``): HL-Gauss to the edges [v_min, v_max], two-hot
    to the outer centres [c_0, c_{N-1}], half a bin inside.  Pass that range to
    the diagnostics (``clip_range=support.clip_range(loss)``) so that
    ``plasticity/target_clip_frac`` counts what the loss actually clips.
    """

    def __init__(self, v_min: float, v_max: float, n_bins: int, device: torch.device | str = "cpu",
                 sigma_ratio: float = 0.75):
        _check_support(v_min, v_max, n_bins, "bins")
        if not sigma_ratio > 0:
            raise ValueError(f"sigma_ratio must be > 0 (σ = sigma_ratio · bin width); got {sigma_ratio}")
        self.v_min, self.v_max, self.n_bins = float(v_min), float(v_max), int(n_bins)
        edges = torch.linspace(self.v_min, self.v_max, self.n_bins + 1)  # on the CPU: the same bins on every device
        centers = (edges[:-1] + edges[1:]) / 2
        # The outer centres as stored (float32): two-hot clamps to exactly these, so a target on c_{N-1} is kept.
        self._clip_ranges = {"hl_gauss": (self.v_min, self.v_max),
                             "two_hot": (centers[0].item(), centers[-1].item())}
        self.edges, self.centers = edges.to(device), centers.to(device)
        self.bin_width = (self.v_max - self.v_min) / self.n_bins
        self.sigma = sigma_ratio * self.bin_width

    def to(self, device: torch.device | str) -> CategoricalSupport:
        self.edges, self.centers = self.edges.to(device), self.centers.to(device)
        return self

    def hl_gauss(self, y: torch.Tensor) -> torch.Tensor:
        """p_i ∝ Φ((e_{i+1} − y)/σ) − Φ((e_i − y)/σ) for y clipped to the support; ``[B] -> [B, N]``."""
        y = y.clamp(self.v_min, self.v_max).unsqueeze(-1)
        cdf = torch.special.ndtr((self.edges - y) / self.sigma)
        probs = cdf[..., 1:] - cdf[..., :-1]
        # The Gaussian mass outside [v_min, v_max] is dropped and the rest renormalised.
        return probs / probs.sum(-1, keepdim=True)

    def two_hot(self, y: torch.Tensor) -> torch.Tensor:
        """All mass on the two bins whose centres bracket y, linear in distance: Σ p_i c_i = y; ``[B] -> [B, N]``.

        Only values between the first and last centre can be represented
        exactly, so y is clipped to [c_0, c_{N-1}] (half a bin inside the support;
        ``clip_range("two_hot")``).
        """
        first_center, last_center = self._clip_ranges["two_hot"]
        y = y.clamp(first_center, last_center)
        position = (y - first_center) / self.bin_width
        lower = position.floor().clamp(0, self.n_bins - 2)
        upper_weight = (position - lower).clamp(0.0, 1.0)
        lower = lower.long().unsqueeze(-1)
        probs = torch.zeros(*y.shape, self.n_bins, dtype=self.centers.dtype, device=y.device)
        probs.scatter_add_(-1, lower, (1.0 - upper_weight).unsqueeze(-1))
        probs.scatter_add_(-1, lower + 1, upper_weight.unsqueeze(-1))
        return probs

    def expectation(self, logits: torch.Tensor) -> torch.Tensor:
        """Q = Σ softmax(logits)_i · c_i over the last dimension."""
        if logits.shape[-1] != self.n_bins:
            raise ValueError(f"logits have {logits.shape[-1]} bins in the last dimension, the support has "
                             f"{self.n_bins}; reshape the head output to [B, A, {self.n_bins}]")
        return torch.softmax(logits, dim=-1) @ self.centers

    def clip_range(self, loss: str) -> tuple[float, float]:
        """The interval ``loss`` clamps its targets to; targets strictly outside it are clipped.

        ``hl_gauss``: [v_min, v_max], the outer bin edges (inside it, the Gaussian's
        mass beyond the edges is dropped and the rest renormalised -- not counted
        as clipping, though it pulls the represented mean inward within ~σ of an edge).
        ``two_hot``: [c_0, c_{N-1}] = [v_min + ς/2, v_max − ς/2], the outer centres as
        stored in ``centers``, so a target exactly on c_{N-1} is not clipped.
        (C51 clips each atom r + γz_j to [z_0, z_{N-1}] = [v_min, v_max]; see ``c51_project``.)
        """
        if loss not in self._clip_ranges:
            raise ValueError(f"clip_range: unknown categorical loss {loss!r}; choose one of "
                             f"{', '.join(CATEGORICAL_LOSSES)} (C51 clips to [v_min, v_max])")
        return self._clip_ranges[loss]

    def clip_fraction(self, y: torch.Tensor, loss: str) -> torch.Tensor:
        """Fraction of targets ``loss`` clips, i.e. outside ``clip_range(loss)``; a 0-dim tensor, no sync."""
        low, high = self.clip_range(loss)
        return ((y < low) | (y > high)).float().mean()


def categorical_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """−Σ_i p_i log softmax(logits)_i, averaged over the batch (HL-Gauss, two-hot and C51 share it).

    ``[..., B, N] -> [...]``: a population's ``[M, B, N]`` gives one loss per member.
    """
    _check_same_shape("logits", logits, "target_probs", target_probs)
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean(-1)


def c51_atoms(v_min: float, v_max: float, n_atoms: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """z_j = v_min + j·Δz, j = 0..N−1 (§10)."""
    _check_support(v_min, v_max, n_atoms, "atoms")
    return torch.linspace(v_min, v_max, n_atoms, device=device)


def c51_project(next_probs: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor, gamma: float,
                atoms: torch.Tensor) -> torch.Tensor:
    """Project the distribution of r + γ(1−done)Z' onto the atoms (§10); ``[..., B, N] -> [..., B, N]``.

    Tz_j = clamp(r + γ(1−done) z_j, v_min, v_max), b = (Tz − v_min)/Δz; the mass of
    atom j goes to ⌊b⌋ with weight ⌈b⌉ − b and to ⌈b⌉ with weight b − ⌊b⌋; when
    b is an integer (⌊b⌋ = ⌈b⌉) all of it goes to that atom.

    The clip range is [z_0, z_{N-1}] = [v_min, v_max] (the atoms include both
    ends), so C51's ``target_clip_frac`` uses ``clip_range=(v_min, v_max)``.  On
    the scalar target r + γ(1−done)E[Z'] it counts the targets whose mean the
    projection must move; it is a lower bound on the transitions with some
    atom clipped (r + γz_j can leave the support while the mean stays inside).
    """
    n_atoms = atoms.shape[0]
    if next_probs.ndim < 2 or next_probs.shape[-1] != n_atoms:
        raise ValueError(f"next_probs must be [..., B, {n_atoms}] (the target distribution of the greedy next "
                         f"action); got {tuple(next_probs.shape)}")
    if rewards.shape != next_probs.shape[:-1] or dones.shape != next_probs.shape[:-1]:
        raise ValueError(f"rewards and dones must be {list(next_probs.shape[:-1])}; got {tuple(rewards.shape)} "
                         f"and {tuple(dones.shape)}")
    v_min, v_max = atoms[0], atoms[-1]
    delta_z = (v_max - v_min) / (n_atoms - 1)
    not_done = 1.0 - dones.to(next_probs.dtype)
    target_z = (rewards.to(next_probs.dtype).unsqueeze(-1)
                + gamma * not_done.unsqueeze(-1) * atoms).clamp(v_min, v_max)
    position = ((target_z - v_min) / delta_z).clamp(0, n_atoms - 1)
    lower, upper = position.floor(), position.ceil()
    # (lower == upper) adds 1 to the lower weight so an atom hit exactly keeps all its mass.
    lower_mass = next_probs * (upper + (lower == upper).to(next_probs.dtype) - position)
    upper_mass = next_probs * (position - lower)
    projected = torch.zeros_like(next_probs)
    projected.scatter_add_(-1, lower.long(), lower_mass)
    projected.scatter_add_(-1, upper.long(), upper_mass)
    return projected


def c51_loss(logits_taken: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """C51 loss −Σ_j m_j log p_j with p = softmax(logits), averaged over the batch (§10).

    log p comes from ``log_softmax``, which is finite for finite logits -- the
    purpose of the spec's "clamp p away from 0".  A hard clamp of p (CleanRL's
    ``clamp(1e-5)``) would also cut the gradient of every atom below the floor,
    which stalls learning exactly when the targets move onto atoms the network
    had ruled out, so it is not used.
    """
    return categorical_cross_entropy(logits_taken, target_probs)
