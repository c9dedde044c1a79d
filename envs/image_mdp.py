"""The image-classification MDP of Lyle et al. 2023 §3.2, natively vectorised in torch, for a population.

Spec: environments.md §1. A labelled image dataset becomes a continuing MDP:

- state: a latent class ``s`` in ``0..K-1``; observation: an image drawn
  uniformly from the images whose *current* label is ``s``;
- actions: the K classes;
- variants: ``easy`` (reward ``1[a = s]``, next state uniform whatever the
  action), ``random_label`` (as easy, but every image carries a fixed uniformly
  random label drawn at construction: memorisation), ``sparse`` (reward 1 only
  for ``s = a = K-1``; a correct answer moves ``s -> (s+1) mod K``, a wrong one
  to a uniformly random state);
- nonstationarity: every ``shift_every`` vector steps the task id grows by one
  and each requested shift is applied (spec table, combinable):
  ``label_permutation`` (fresh permutation of the class labels),
  ``random_labels`` (every image's label re-drawn), ``label_noise`` (a fraction
  ``shift_frac`` of the images get a re-drawn label), ``pixel_permutation``
  (fresh bijection of pixel positions, the same for every channel),
  ``reward_offset`` (rewards ``r + reward_offset * task_id``).

Populations (spec populations.md): one env holds ``M = len(seeds)`` members, the
envs of M independent runs, each with ``num_envs`` copies; every tensor carries a
leading member dimension (observations ``[M, num_envs, C, H, W]``).  Member k is
exactly the env a one-member population with ``seeds=[seeds[k]]`` is: its subset
of images and ``random_label`` labels (drawn from ``seeds[k]``), its per-step
draws (a ``plasticity.streams.MemberRandom`` stream per member, seeded with
``stream_seed(seeds[k], "env")``: one slice serves all members, no loop over
members per step) and its task draws (permutations, relabellings: a CPU generator
per member, seeded with ``stream_seed(seeds[k], "task")``, looped over at the
rare switches) depend on ``seeds[k]`` alone.  Task switches happen at the same
step for all members (the clock counts steps), so ``task_id`` is one Python int.
The images are stored once for all members (the union of their subsets); each
member keeps index tables ``[M, ...]`` into them, so memory does not grow with M
for a shared dataset.

Everything lives on one device: a step is a handful of tensor ops for all
members and envs together, with no Python loop and no host-device
synchronisation.  The per-step streams of CPU and CUDA differ (torch's
generators do); the task draws do not (they are drawn on the CPU).

Autoreset semantics (the task is continuing): nothing is ever terminated and
nothing is ever reset after ``reset()``. Every ``episode_length`` steps all
envs report ``truncated=True`` for logging only; the latent state carries over
and the observation returned with ``truncated=True`` is the true next
observation, which is also the first observation of the next "episode". Store
``(obs_t, a_t, r_t, obs_{t+1})`` as usual and bootstrap across the boundary:
it is exact. (This is gymnasium's SAME_STEP mode with the reset observation
equal to the final one; ``info["final_obs"]`` is that same tensor.)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from envs.datasets import DATASETS, SOURCES, class_balanced_subset, load_dataset
from plasticity.streams import MemberRandom, stream_seed

VARIANTS = ("easy", "random_label", "sparse")
SHIFTS = ("none", "label_permutation", "random_labels", "label_noise", "pixel_permutation", "reward_offset")
OBS_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.uint8: np.uint8,
}
MAX_LABEL_REDRAWS = 100  # label redraws leaving a class without images are rejected (tiny datasets only)


def _as_obs_dtype(obs_dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(obs_dtype, str):
        obs_dtype = getattr(torch, obs_dtype, obs_dtype)
    if obs_dtype not in OBS_DTYPES:
        valid = ", ".join(str(d).removeprefix("torch.") for d in OBS_DTYPES)
        raise ValueError(f"obs_dtype {obs_dtype!r} not supported; valid: {valid}")
    return obs_dtype


def optimal_q_values(num_classes: int, variant: str, gamma: float, reward_bias: float = 0.0) -> torch.Tensor:
    """Q*(s, a) [K, K] (float64, CPU) of a stationary task whose every reward is shifted by ``reward_bias``.

    easy / random_label: ``1[a = s] + γ/(1-γ)`` (spec §1) plus ``reward_bias/(1-γ)``.
    sparse: the exact fixed point of the Bellman optimality equation,
    ``Q(s,a) = R(s,a) + γ Σ_s' P(s'|s,a) max_a' Q(s',a')``, found by policy
    iteration with exact (linear-solve) policy evaluation -- a finite number of
    steps, no tolerance; always answering correctly is *not* optimal for small γ,
    where a wrong answer's random jump can be the faster way to ``K-1``.
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must lie in [0, 1) for a continuing task, got {gamma}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    k = num_classes
    bias_value = reward_bias / (1.0 - gamma)
    if variant != "sparse":
        return torch.eye(k, dtype=torch.float64) + gamma / (1.0 - gamma) + bias_value

    rewards = torch.zeros(k, k, dtype=torch.float64)
    rewards[k - 1, k - 1] = 1.0
    transitions = torch.full((k, k, k), 1.0 / k, dtype=torch.float64)  # [s, a, s']
    states = torch.arange(k)
    transitions[states, states] = 0.0
    transitions[states, states, (states + 1) % k] = 1.0
    policy = states.clone()  # start from "always answer correctly"
    for _ in range(1000):  # each iteration strictly improves the policy; a handful suffice in practice
        p_policy = transitions[states, policy]  # [s, s']
        values = torch.linalg.solve(
            torch.eye(k, dtype=torch.float64) - gamma * p_policy, rewards[states, policy]
        )
        q = rewards + gamma * transitions @ values
        best = q.argmax(dim=1)
        # Switch only on a strict improvement, so ties cannot make the iteration cycle.
        improves = q[states, best] > q[states, policy] + 1e-12
        if not improves.any():
            return q + bias_value
        policy = torch.where(improves, best, policy)
    raise RuntimeError(f"policy iteration for the sparse MDP (K={k}, gamma={gamma}) did not converge")


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The members' seeds as a list of ints; one clear error for anything else (a bare int, a bool, < 0)."""
    if isinstance(seeds, str | bytes) or not isinstance(seeds, Sequence | np.ndarray | torch.Tensor):
        raise ValueError(f"seeds must be a non-empty sequence of ints (one per member), got {seeds!r}")
    seeds = list(seeds.tolist() if isinstance(seeds, np.ndarray | torch.Tensor) else seeds)
    if not seeds:
        raise ValueError("seeds must be a non-empty sequence of ints (one per member), got an empty one")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= s < 2**63]
    if bad:
        raise ValueError(f"seeds must be ints in [0, 2**63), got {bad} in {seeds}")
    return [int(s) for s in seeds]


class ImageMDPVectorEnv(gymnasium.vector.VectorEnv):
    """A population of ``M = len(seeds)`` members, each ``num_envs`` copies of the image-classification MDP.

    Args:
        dataset: one of ``envs.datasets.DATASETS`` (ignored when ``images``/``labels`` are given).
        num_envs: number of copies per member.
        variant: one of ``VARIANTS``.
        shift: shifts applied at every switch, any combination of ``SHIFTS`` (``"none"`` or empty for none).
        shift_every: vector steps between switches (task id += 1 at each, also for ``"none"``,
            so a stationary control logs the same task windows); the same steps for every member.
        shift_frac: fraction of images relabelled by ``label_noise``, in (0, 1].
        reward_offset: per-task reward increment c (``reward_offset`` shift): ``r + c * task_id``.
        episode_length: steps between (logging-only) truncations.
        num_images: class-balanced subset size (each member's subset fixed by its seed); None for the
            whole split.
        data_dir, split: where and which split to load (``envs.datasets.load_dataset``).
        device: where the dataset lives and the env steps.
        seeds: one seed per member (non-negative ints).  ``seeds[k]`` fixes member k's subset and
            ``random_label`` labels (a CPU generator seeded with it) and seeds its dynamics and task
            streams (``stream_seed(seeds[k], "env")`` / ``"task"``).
        obs_dtype: float32 (default; pixels / 255 in [0, 1]), float16/float64, or uint8 (raw pixels,
            for compact replay buffers; divide by 255 in the network).
        images, labels: inject a dataset directly (uint8 [N, C, H, W], integer [N] in 0..K-1 with
            every class present); K = max label + 1.

    ``step`` takes int64 actions ``[M, num_envs]`` on ``device`` and returns
    ``obs [M, E, C, H, W]``, ``reward`` float32 ``[M, E]``, ``terminated`` (always False),
    ``truncated`` bool ``[M, E]`` and ``info`` = ``{"task_id": int (task of the returned obs, the
    same for all members), "correct": bool [M, E] (a = s for the action just taken), "label": int64
    [M, E] (latent state of the returned obs)}``; on truncation steps also ``final_obs`` (= obs) and
    ``_final_obs``.  Actions are not range-checked (that would need a host sync); out-of-range ones
    are simply wrong.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        dataset: str = "mnist",
        num_envs: int = 1,
        variant: str = "easy",
        shift: Sequence[str] | str = ("none",),
        shift_every: int = 10_000,
        shift_frac: float = 0.1,
        reward_offset: float = 0.0,
        episode_length: int = 1000,
        num_images: int | None = None,
        data_dir: str | os.PathLike | None = None,
        split: str = "auto",
        device: str | torch.device = "cpu",
        seeds: Sequence[int] = (0,),
        obs_dtype: torch.dtype | str = torch.float32,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        shift = (shift,) if isinstance(shift, str) else tuple(shift) or ("none",)
        self._validate_args(
            dataset,
            num_envs,
            variant,
            shift,
            shift_every,
            shift_frac,
            reward_offset,
            episode_length,
            images,
            labels,
        )
        self.seeds = check_seeds(seeds)
        self.members = len(self.seeds)
        self.dataset = dataset if images is None else "custom"
        self.num_envs = int(num_envs)
        self.variant = variant
        # A fixed application order keeps switches reproducible whatever order the user listed them in.
        self.shift = tuple(s for s in SHIFTS if s in shift)
        self.shift_every = int(shift_every)
        self.shift_frac = float(shift_frac)
        self.reward_offset = float(reward_offset)
        self._offset_rewards = "reward_offset" in self.shift
        self.episode_length = int(episode_length)
        self.device = torch.device(device)
        self.obs_dtype = _as_obs_dtype(obs_dtype)

        if images is None:
            images, labels = load_dataset(dataset, data_dir=data_dir, split=split)
            num_classes = SOURCES[dataset].num_classes
        else:
            images, labels, num_classes = self._check_injected(images, labels)
        labels = labels.cpu().long()
        if num_images is not None and not num_classes <= num_images <= labels.numel():
            raise ValueError(
                f"num_images={num_images} must lie in [{num_classes}, {labels.numel()}] "
                f"(at least one image per class, at most the dataset size)"
            )
        # Each member's data generator (CPU, so the subset and memorisation labels do not depend on the
        # device) is used only here: a member's dataset is fixed by its seed.  A loop over members, once.
        member_indices, member_labels = [], []
        for seed in self.seeds:
            data_generator = torch.Generator().manual_seed(seed)
            if num_images is None:
                indices = torch.arange(labels.numel())
            else:
                indices = class_balanced_subset(labels, int(num_images), data_generator).cpu()
            subset_labels = labels[indices]
            if variant == "random_label":
                subset_labels = _redraw_labels(subset_labels, num_classes, data_generator, which=None)
            member_indices.append(indices)
            member_labels.append(subset_labels)
        dataset_indices = torch.stack(member_indices)  # [M, n], sorted rows: indices into the loaded dataset
        if num_images is None:
            stored, rows = torch.arange(labels.numel()), dataset_indices
        else:  # store the union of the members' subsets once; rows index into it
            stored, inverse = torch.unique(dataset_indices, return_inverse=True)
            rows = inverse.reshape(dataset_indices.shape)
        self.num_classes = num_classes
        self.num_images = dataset_indices.shape[1]
        self.obs_shape = tuple(images.shape[1:])

        self._images = (images if num_images is None else images[stored.to(images.device)]).to(
            self.device
        ).contiguous()  # [N_stored, C, H, W] uint8, shared by all members (and evaluation copies)
        self._dataset_indices = dataset_indices.to(self.device)  # [M, n] into the loaded dataset
        self._rows = rows.to(self.device)  # [M, n] member k's image j is self._images[rows[k, j]]
        self._dataset_labels = torch.stack(member_labels).to(self.device)  # [M, n] labels at task 0
        self._reseed(self.seeds)

        # Spaces (gymnasium.vector API); observations are torch tensors of these shapes and dtypes.
        high = 255 if self.obs_dtype == torch.uint8 else 1.0
        self.single_observation_space = spaces.Box(0, high, self.obs_shape, dtype=OBS_DTYPES[self.obs_dtype])
        self.single_action_space = spaces.Discrete(num_classes)
        self._batch_spaces()

        self._pixel_permutation: torch.Tensor | None = None  # None = identity for every member
        self._pixel_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (permutation, its expanded index)
        self._frozen = False  # an evaluation copy (``evaluation_copy``) keeps its task: no switches, no restart
        self._restart_task()
        self._state = torch.zeros(self.members, self.num_envs, dtype=torch.long, device=self.device)
        self._needs_reset = True

    def _batch_spaces(self) -> None:
        """[M, E, ...] spaces: the batch of E copies, batched again over the M members."""
        self.observation_space = batch_space(batch_space(self.single_observation_space, self.num_envs), self.members)
        self.action_space = batch_space(batch_space(self.single_action_space, self.num_envs), self.members)

    def _reseed(self, seeds: Sequence[int]) -> None:
        """Seed every member's dynamics stream (per step) and task stream (per switch) from ``seeds``."""
        self._stream_seeds = list(seeds)
        self._rng = MemberRandom([stream_seed(s, "env") for s in seeds], self.device)
        self._task_generators = [torch.Generator().manual_seed(stream_seed(s, "task")) for s in seeds]

    @property
    def seed(self) -> int:
        """Member 0's seed (the run's seed for a population of one)."""
        return self.seeds[0]

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate_args(
        dataset,
        num_envs,
        variant,
        shift,
        shift_every,
        shift_frac,
        reward_offset,
        episode_length,
        images,
        labels,
    ):
        if (images is None) != (labels is None):
            raise ValueError("pass both images and labels to inject a dataset, or neither")
        if images is None and dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
        unknown = [s for s in shift if s not in SHIFTS]
        if unknown or not shift:
            raise ValueError(f"unknown shift(s) {unknown or list(shift)}; valid shifts: {', '.join(SHIFTS)}")
        if len(set(shift)) != len(shift):
            raise ValueError(f"shift lists a shift twice: {list(shift)}")
        if "none" in shift and len(shift) > 1:
            raise ValueError(f"shift 'none' cannot be combined with other shifts: {list(shift)}")
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if int(shift_every) < 1:
            raise ValueError(f"shift_every must be >= 1 vector step, got {shift_every}")
        if not 0.0 <= float(shift_frac) <= 1.0 or ("label_noise" in shift and float(shift_frac) == 0.0):
            raise ValueError(
                f"shift_frac must lie in (0, 1] (the fraction label_noise relabels), got {shift_frac}"
            )
        if ("reward_offset" in shift) != (float(reward_offset) != 0.0):
            raise ValueError(
                f"reward_offset={reward_offset} with shift={list(shift)}: the 'reward_offset' shift needs a "
                "non-zero per-task increment reward_offset=c, and a non-zero c needs the 'reward_offset' shift"
            )
        if not np.isfinite(float(reward_offset)):
            raise ValueError(f"reward_offset must be finite, got {reward_offset}")
        if int(episode_length) < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")

    @staticmethod
    def _check_injected(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                "images must be a uint8 tensor [N, C, H, W], got "
                f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}"
            )
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.ndim != 1:
            raise ValueError(
                f"labels must be an integer tensor [N], got {getattr(labels, 'dtype', type(labels))}"
            )
        if labels.numel() != images.shape[0] or labels.numel() == 0:
            raise ValueError(f"{labels.numel()} labels for {images.shape[0]} images")
        labels = labels.long()
        if int(labels.min()) < 0:
            raise ValueError("labels must be >= 0")
        num_classes = int(labels.max()) + 1
        missing = (torch.bincount(labels.cpu(), minlength=num_classes) == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"classes {missing} have no image; labels must cover 0..{num_classes - 1}")
        return images, labels, num_classes

    # ------------------------------------------------------------------ task state
    def _restart_task(self) -> None:
        """Back to task 0: dataset labels, identity permutations, step counters at 0 (every member)."""
        self.task_id = 0
        self._step_count = 0
        self._raw_labels = self._dataset_labels
        self._class_permutation = (
            torch.arange(self.num_classes, device=self.device).expand(self.members, -1).contiguous()
        )
        self._pixel_permutation = None
        self._rebuild_class_tables()

    def _rebuild_class_tables(self) -> None:
        """Per-member tables for sampling an image of a class: argsort by current label + counts, [M, ...].

        ``_images_by_class[k]`` lists member k's stored-image rows sorted by current label;
        ``_class_start[k, s]`` is the position of class s's first one in the flattened ``[M * n]``
        table (so one ``take`` serves every member) and ``_class_count[k, s]`` their number.
        """
        labels = self._class_permutation.gather(1, self._raw_labels)  # [M, n]
        self._labels = labels
        self._images_by_class = self._rows.gather(1, torch.argsort(labels, dim=1, stable=True))  # [M, n]
        counts = torch.zeros(self.members, self.num_classes, dtype=torch.long, device=self.device)
        counts.scatter_add_(1, labels, torch.ones_like(labels))
        member_start = torch.arange(self.members, device=self.device)[:, None] * self.num_images
        self._class_start = torch.cumsum(counts, 1) - counts + member_start  # [M, K], flat positions
        self._class_count = counts.to(torch.float64)
        self._member_classes = torch.arange(self.members, device=self.device)[:, None] * self.num_classes  # [M, 1]

    def _switch_task(self) -> None:
        """Apply every requested shift (spec §1 table), each member drawing from its own task stream.

        A loop over members: switches are rare, and a relabelling that leaves a class empty is
        redrawn (a member's number of draws depends on its own data only).  The draws are made on
        the CPU and the new tables replace the old tensors (never edited in place: evaluation copies
        share them).
        """
        self.task_id += 1
        generators = self._task_generators
        labels_changed = False
        if "label_permutation" in self.shift:
            self._class_permutation = torch.stack(
                [torch.randperm(self.num_classes, generator=g) for g in generators]
            ).to(self.device)
            labels_changed = True
        if "random_labels" in self.shift:
            raw = self._raw_labels.cpu()
            self._raw_labels = torch.stack(
                [_redraw_labels(raw[k], self.num_classes, g, which=None) for k, g in enumerate(generators)]
            ).to(self.device)
            labels_changed = True
        if "label_noise" in self.shift:
            num_noisy = max(1, round(self.shift_frac * self.num_images))
            raw = self._raw_labels.cpu()
            noisy_rows = []
            for k, g in enumerate(generators):
                noisy = torch.randperm(self.num_images, generator=g)[:num_noisy]
                noisy_rows.append(_redraw_labels(raw[k], self.num_classes, g, which=noisy))
            self._raw_labels = torch.stack(noisy_rows).to(self.device)
            labels_changed = True
        if "pixel_permutation" in self.shift:
            height, width = self.obs_shape[1:]
            self._pixel_permutation = torch.stack(
                [torch.randperm(height * width, generator=g) for g in generators]
            ).to(self.device)
        if labels_changed:
            self._rebuild_class_tables()

    # ------------------------------------------------------------------ observations
    def _observe(self, state: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """One uniformly drawn image of each env's current class [M, E, C, H, W], as ``obs_dtype``.

        ``uniform`` [M, E] float64 in [0, 1): a double u < 1 is at most 1 - 2**-53, and then
        ``floor(u * n) <= n - 1`` for every count n < 2**52 (the product rounds below n), so the
        offset never reaches the next class's first image.
        """
        members, num_envs = state.shape
        classes = state + self._member_classes  # [M, E]: positions in the flattened [M * K] tables
        offset = (uniform * torch.take(self._class_count, classes)).long()
        position = torch.take(self._class_start, classes) + offset
        images = self._images.index_select(0, torch.take(self._images_by_class, position).reshape(-1))
        if self._pixel_permutation is not None:
            # obs_flat[p] = original_flat[perm[p]], per member; gather with an expanded index is ~10x
            # faster than index_select along the last dim on CPU.
            flat = images.reshape(members, num_envs * self.obs_shape[0], -1)
            images = torch.gather(flat, 2, self._pixel_index(flat.shape))
        images = images.reshape(members, num_envs, *self.obs_shape)
        if self.obs_dtype == torch.uint8:
            return images
        return images.to(self.obs_dtype).div_(255)

    def _pixel_index(self, shape: torch.Size) -> torch.Tensor:
        """The pixel permutations expanded to ``shape`` [M, E*C, H*W] for ``gather``, built once per switch.

        (Expanding costs more than the gather itself for small observations.)
        """
        cached = self._pixel_cache
        if cached is None or cached[0] is not self._pixel_permutation or cached[1].shape != shape:
            cached = self._pixel_cache = (self._pixel_permutation, self._pixel_permutation[:, None, :].expand(shape))
        return cached[1]

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seeds: Sequence[int] | None = None, options: dict | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Start task 0 (labels, permutations and counters restored); ``seeds`` re-seed the dynamics.

        ``seeds``: one per member (member k's dynamics and task streams restart from
        ``stream_seed(seeds[k], ...)``, as at construction with ``seeds[k]``), or None to continue the
        streams.  The dataset itself (subsets, ``random_label`` labels) stays the one fixed at
        construction.  An evaluation copy keeps its task.
        """
        if options:
            raise ValueError(
                f"reset options are not supported (got {sorted(options)}); the task never needs one"
            )
        if seeds is not None:
            seeds = check_seeds(seeds)
            if len(seeds) != self.members:
                raise ValueError(f"reset got {len(seeds)} seeds for {self.members} members: {seeds}")
            self._reseed(seeds)
        if self._frozen:
            self._step_count = 0
        else:
            self._restart_task()
        # One request per step for both draws (next state, image): [M, 2, E].
        state_draw, image_draw = self._rng.uniform(2, self.num_envs).unbind(1)
        self._state = (state_draw * self.num_classes).long()
        self._needs_reset = False
        return self._observe(self._state, image_draw), {"task_id": self.task_id, "label": self._state}

    def step(
        self, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        actions = torch.as_tensor(actions, device=self.device)
        shape = (self.members, self.num_envs)
        if actions.shape != shape or actions.dtype.is_floating_point or actions.dtype == torch.bool:
            raise ValueError(
                f"actions must be an integer tensor of shape {shape} (members, num_envs), "
                f"got {actions.dtype} {tuple(actions.shape)}"
            )
        state = self._state
        correct = actions == state
        if self.variant == "sparse":
            reward = (correct & (state == self.num_classes - 1)).to(torch.float32)
        else:
            reward = correct.to(torch.float32)
        if self._offset_rewards and self.task_id != 0:
            reward += self.reward_offset * self.task_id  # the task the action was taken in

        # One request per step for both draws, [M, 2, E]: the next state's, then the image's.
        state_draw, image_draw = self._rng.uniform(2, self.num_envs).unbind(1)
        random_state = (state_draw * self.num_classes).long()
        if self.variant == "sparse":
            self._state = torch.where(correct, (state + 1) % self.num_classes, random_state)
        else:
            self._state = random_state

        self._step_count += 1
        if self._step_count % self.shift_every == 0 and not self._frozen:
            self._switch_task()  # the next observation already shows the new task
        obs = self._observe(self._state, image_draw)

        is_truncation = self._step_count % self.episode_length == 0
        truncated = torch.full(shape, is_truncation, dtype=torch.bool, device=self.device)
        terminated = torch.zeros(shape, dtype=torch.bool, device=self.device)
        info = {"task_id": self.task_id, "correct": correct, "label": self._state}
        if is_truncation:
            info["final_obs"], info["_final_obs"] = obs, truncated
        return obs, reward, terminated, truncated, info

    # ------------------------------------------------------------------ evaluation
    def evaluation_copy(self, num_envs: int) -> ImageMDPVectorEnv:
        """``num_envs`` copies per member of this env, frozen at its current task, on random streams of their own.

        Member k of the copy plays member k's current task (same images, labels, class and pixel
        permutations, reward offset) and never switches: ``reset(seeds=...)`` (one seed per member)
        seeds it and draws fresh latent states without going back to task 0.  It shares the dataset
        and the task's tables with this env instead of copying them (a switch here replaces those
        tensors, never edits them in place), so it costs no memory, and stepping it leaves this env
        untouched.
        """
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        twin = copy.copy(self)
        twin.num_envs = int(num_envs)
        twin._batch_spaces()
        twin._reseed([stream_seed(s, "evaluation") for s in self.seeds])  # its own streams until reset(seeds=...)
        twin._frozen = True
        twin._needs_reset = True
        return twin

    # ------------------------------------------------------------------ analysis helpers
    def optimal_q(self, gamma: float) -> torch.Tensor:
        """Q*(s, a) [K, K] (float32, on ``device``) of the current task, reward offset included.

        The same for every member: Q* is over latent classes, which the permutations and relabellings
        leave alone.  easy / random_label: ``1[a = s] + γ/(1-γ) + b/(1-γ)`` with
        ``b = reward_offset * task_id`` (spec §1, ``b`` treated as constant); sparse: exact Bellman
        fixed point (``optimal_q_values``).
        """
        reward_bias = self.reward_offset * self.task_id if self._offset_rewards else 0.0
        return optimal_q_values(self.num_classes, self.variant, gamma, reward_bias).to(
            self.device, torch.float32
        )

    @property
    def num_actions(self) -> int:
        return self.num_classes

    @property
    def images(self) -> torch.Tensor:
        """The stored images [N_stored, C, H, W] uint8 (unpermuted), shared by all members."""
        return self._images

    @property
    def image_indices(self) -> torch.Tensor:
        """[M, n]: member k's image j is image ``image_indices[k, j]`` of the loaded (or injected) dataset.

        Rows are sorted; without ``num_images`` every row is ``0..N-1``.
        """
        return self._dataset_indices

    @property
    def image_labels(self) -> torch.Tensor:
        """Current label of every image of each member [M, n] (aligned with ``image_indices``)."""
        return self._labels

    @property
    def class_permutation(self) -> torch.Tensor:
        """Active class-label permutation per member [M, K]: current label = ``class_permutation[k, raw]``."""
        return self._class_permutation

    @property
    def pixel_permutation(self) -> torch.Tensor | None:
        """Active pixel permutation per member [M, H*W] (``obs_flat[p] = original_flat[perm[k, p]]``).

        None while every member shows the original pixels (task 0, or no ``pixel_permutation`` shift).
        """
        return self._pixel_permutation

    # ------------------------------------------------------------------ checkpointing
    def _config(self) -> dict:
        return {
            "seeds": list(self.seeds),
            "num_envs": self.num_envs,
            "variant": self.variant,
            "shift": list(self.shift),
            "shift_every": self.shift_every,
            "shift_frac": self.shift_frac,
            "reward_offset": self.reward_offset,
            "episode_length": self.episode_length,
            "num_classes": self.num_classes,
            "num_images": self.num_images,
            "obs_shape": list(self.obs_shape),
        }

    def _data_fingerprint(self) -> dict:
        # The stored pixels' sum and, per member, weighted sums of the subset indices and task-0 labels.
        weights = torch.arange(1, self.num_images + 1, device=self.device)
        return {
            "pixels": int(self._images.sum(dtype=torch.long)),
            "indices": (self._dataset_indices * weights).sum(1).tolist(),
            "labels": (self._dataset_labels * weights).sum(1).tolist(),
        }

    def state_dict(self) -> dict:
        """Everything needed to resume the exact streams of every member (the dataset itself is not included).

        Plain tensors, ints and lists only (loadable with ``torch.load(weights_only=True)``).
        """
        cpu = torch.device("cpu")
        return {
            "config": self._config(),
            "data_fingerprint": self._data_fingerprint(),
            "stream_seeds": list(self._stream_seeds),
            "rng": self._rng.state_dict(),
            "task_generators": [g.get_state() for g in self._task_generators],
            "state": self._state.to(cpu, copy=True),
            "raw_labels": self._raw_labels.to(cpu, copy=True),
            "class_permutation": self._class_permutation.to(cpu, copy=True),
            "pixel_permutation": None
            if self._pixel_permutation is None
            else self._pixel_permutation.to(cpu, copy=True),
            "step_count": self._step_count,
            "task_id": self.task_id,
            "needs_reset": self._needs_reset,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from ``state_dict()`` of an env built with the same arguments (same data and seeds)."""
        if "stream_seeds" not in state_dict or "seeds" not in state_dict.get("config", {}):
            raise ValueError("state_dict is not from a population ImageMDPVectorEnv (saved by an older version?); "
                             "it cannot be resumed")
        config = self._config()
        mismatched = {
            key: (value, config[key])
            for key, value in state_dict["config"].items()
            if key not in config or _plain(config[key]) != _plain(value)
        }
        if mismatched:
            raise ValueError(
                f"state_dict is from a differently configured env: {{key: (saved, this env)}} = {mismatched}"
            )
        if _plain(state_dict["data_fingerprint"]) != _plain(self._data_fingerprint()):
            raise ValueError(
                "state_dict is from an env built on different data (dataset, split, num_images, seeds "
                "or random labels differ); build the env with the same arguments before loading"
            )
        self._reseed(state_dict["stream_seeds"])
        self._rng.load_state_dict(state_dict["rng"])
        for generator, generator_state in zip(self._task_generators, state_dict["task_generators"], strict=True):
            generator.set_state(generator_state)
        self._state = state_dict["state"].to(self.device, copy=True)
        self._raw_labels = state_dict["raw_labels"].to(self.device, copy=True)
        self._class_permutation = state_dict["class_permutation"].to(self.device, copy=True)
        saved_permutation = state_dict["pixel_permutation"]
        self._pixel_permutation = None if saved_permutation is None else saved_permutation.to(self.device, copy=True)
        self._step_count = int(state_dict["step_count"])
        self.task_id = int(state_dict["task_id"])
        self._needs_reset = bool(state_dict["needs_reset"])
        self._rebuild_class_tables()

    def __repr__(self) -> str:
        return (
            f"ImageMDPVectorEnv({self.dataset}, members={self.members}, num_envs={self.num_envs}, "
            f"variant={self.variant}, shift={self.shift}, device={self.device})"
        )


def _plain(value):
    """Tuples as lists, recursively: a config compares equal before and after a torch.save round trip."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _redraw_labels(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator, which: torch.Tensor | None
) -> torch.Tensor:
    """Labels [n] with the entries ``which`` (all when None) re-drawn uniformly, as a new tensor.

    A draw that leaves some class without any image is rejected and redrawn (a
    state must be able to show an image): the result is uniform conditioned on
    every class staying non-empty, which only matters for tiny datasets.
    """
    device = generator.device
    labels = labels.to(device)
    for _ in range(MAX_LABEL_REDRAWS):
        size = labels.numel() if which is None else which.numel()
        draws = torch.randint(num_classes, (size,), generator=generator, device=device)
        if which is None:
            new_labels = draws
        else:
            new_labels = labels.clone()
            new_labels[which] = draws
        if bool((torch.bincount(new_labels, minlength=num_classes) > 0).all()):  # a host check per switch
            return new_labels
    raise ValueError(
        f"{MAX_LABEL_REDRAWS} label draws in a row left a class without images: {labels.numel()} images are "
        f"too few for {num_classes} classes with random labels; use more images (num_images)"
    )


class ImageMDPEnv(gymnasium.Env):
    """Single-env view (one member, ``num_envs=1``) of ``ImageMDPVectorEnv`` for ``gym.make`` users.

    Same arguments and semantics (minus ``num_envs``; ``seed`` instead of ``seeds``);
    observations are numpy arrays ``[C, H, W]`` (float32 in [0, 1] by default, uint8 with
    ``obs_dtype="uint8"``), rewards Python floats, actions ints. Same seed, same
    stream as the vector env with ``seeds=[seed], num_envs=1``. Never terminates; truncates
    every ``episode_length`` steps without resetting anything (see module docstring).
    """

    metadata = {"render_modes": []}

    def __init__(self, dataset: str = "mnist", seed: int = 0, **kwargs):
        if "num_envs" in kwargs or "seeds" in kwargs:
            raise ValueError(
                "ImageMDPEnv is a single env of one member (seed=...); use ImageMDPVectorEnv for "
                "num_envs > 1 or a population (seeds=[...])"
            )
        self.vector_env = ImageMDPVectorEnv(dataset, num_envs=1, seeds=[seed], **kwargs)
        self.observation_space = self.vector_env.single_observation_space
        self.action_space = self.vector_env.single_action_space

    @property
    def task_id(self) -> int:
        return self.vector_env.task_id

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        obs, info = self.vector_env.reset(seeds=None if seed is None else [seed], options=options)
        return obs[0, 0].cpu().numpy(), {"task_id": info["task_id"], "label": int(info["label"][0, 0])}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an int in 0..{self.vector_env.num_classes - 1}, got {action!r}")
        actions = torch.full((1, 1), int(action), dtype=torch.long, device=self.vector_env.device)
        obs, reward, _, truncated, info = self.vector_env.step(actions)
        step_info = {
            "task_id": info["task_id"],
            "correct": bool(info["correct"][0, 0]),
            "label": int(info["label"][0, 0]),
        }
        return obs[0, 0].cpu().numpy(), float(reward[0, 0]), False, bool(truncated[0, 0]), step_info

    def optimal_q(self, gamma: float) -> torch.Tensor:
        return self.vector_env.optimal_q(gamma)

    def state_dict(self) -> dict:
        return self.vector_env.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.vector_env.load_state_dict(state_dict)
