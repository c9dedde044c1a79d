"""The image-classification MDP of Lyle et al. 2023 §3.2, natively vectorised in torch.

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

Everything lives on one device: the dataset is stored once (uint8), a step is a
handful of tensor ops for all ``num_envs`` copies together, with no Python loop
over envs and no host-device synchronisation (``task_id`` is a Python int kept
by counting steps). Randomness comes from one ``torch.Generator`` on the env's
device, so the same seed gives the same stream of states, images, labels and
switches (CPU and CUDA streams differ from each other).

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


class ImageMDPVectorEnv(gymnasium.vector.VectorEnv):
    """``num_envs`` independent copies of the image-classification MDP, stepped as tensor ops.

    Args:
        dataset: one of ``envs.datasets.DATASETS`` (ignored when ``images``/``labels`` are given).
        num_envs: number of copies.
        variant: one of ``VARIANTS``.
        shift: shifts applied at every switch, any combination of ``SHIFTS`` (``"none"`` or empty for none).
        shift_every: vector steps between switches (task id += 1 at each, also for ``"none"``,
            so a stationary control logs the same task windows).
        shift_frac: fraction of images relabelled by ``label_noise``, in (0, 1].
        reward_offset: per-task reward increment c (``reward_offset`` shift): ``r + c * task_id``.
        episode_length: steps between (logging-only) truncations.
        num_images: class-balanced subset size (fixed by ``seed``); None for the whole split.
        data_dir, split: where and which split to load (``envs.datasets.load_dataset``).
        device: where the dataset lives and the env steps.
        seed: seeds the dynamics generator; also fixes the subset and the ``random_label`` labels.
        obs_dtype: float32 (default; pixels / 255 in [0, 1]), float16/float64, or uint8 (raw pixels,
            for compact replay buffers; divide by 255 in the network).
        images, labels: inject a dataset directly (uint8 [N, C, H, W], integer [N] in 0..K-1 with
            every class present); K = max label + 1.

    ``step`` takes int64 actions ``[num_envs]`` on ``device`` and returns
    ``obs [E, C, H, W]``, ``reward`` float32 ``[E]``, ``terminated`` (always False),
    ``truncated`` bool ``[E]`` and ``info`` = ``{"task_id": int (task of the returned obs),
    "correct": bool [E] (a = s for the action just taken), "label": int64 [E] (latent state
    of the returned obs)}``; on truncation steps also ``final_obs`` (= obs) and ``_final_obs``.
    Actions are not range-checked (that would need a host sync); out-of-range ones are simply wrong.
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
        seed: int = 0,
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
        self.seed = int(seed)

        if images is None:
            images, labels = load_dataset(dataset, data_dir=data_dir, split=split)
            num_classes = SOURCES[dataset].num_classes
        else:
            images, labels, num_classes = self._check_injected(images, labels)
        # The data generator (CPU, so the subset and memorisation labels do not depend on the device)
        # is used only here: the dataset of this env is fixed by its constructor seed.
        data_generator = torch.Generator().manual_seed(self.seed)
        if num_images is not None:
            if not num_classes <= num_images <= labels.numel():
                raise ValueError(
                    f"num_images={num_images} must lie in [{num_classes}, {labels.numel()}] "
                    f"(at least one image per class, at most the dataset size)"
                )
            subset = class_balanced_subset(labels.cpu(), int(num_images), data_generator)
            images, labels = images[subset.to(images.device)], labels[subset.to(labels.device)]
        self.num_classes = num_classes
        self.num_images = labels.numel()
        self.obs_shape = tuple(images.shape[1:])
        if variant == "random_label":
            labels = _redraw_labels(labels.cpu(), num_classes, data_generator, which=None)

        self._images = images.to(self.device).contiguous()  # current images, pixel-permuted when active
        self._dataset_labels = labels.to(self.device, torch.long)  # labels at task 0
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self.seed)

        # Spaces (gymnasium.vector API); observations are torch tensors of these shapes and dtypes.
        high = 255 if self.obs_dtype == torch.uint8 else 1.0
        self.single_observation_space = spaces.Box(0, high, self.obs_shape, dtype=OBS_DTYPES[self.obs_dtype])
        self.single_action_space = spaces.Discrete(num_classes)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self._pixel_permutation: torch.Tensor | None = None  # None = identity
        self._frozen = False  # an evaluation copy (``evaluation_copy``) keeps its task: no switches, no restart
        self._restart_task()
        self._state = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self._needs_reset = True

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
        """Back to task 0: dataset labels, identity permutations, step counters at 0."""
        self.task_id = 0
        self._step_count = 0
        self._raw_labels = self._dataset_labels
        self._class_permutation = torch.arange(self.num_classes, device=self.device)
        self._set_pixel_permutation(None)
        self._rebuild_class_tables()

    def _rebuild_class_tables(self) -> None:
        """Per-class index tables for sampling an image of a class: argsort by current label + counts."""
        labels = self._class_permutation[self._raw_labels]
        self._labels = labels
        self._images_by_class = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=self.num_classes)
        self._class_start = torch.cumsum(counts, 0) - counts
        self._class_last = self._class_start + counts - 1
        self._class_count = counts.to(torch.float32)

    def _set_pixel_permutation(self, permutation: torch.Tensor | None) -> None:
        """Re-order the stored images' pixel positions; ``obs_flat[p] = original_flat[permutation[p]]``.

        Only the permuted copy is kept (the original is the inverse gather away), so a
        step costs nothing extra while a permutation is active.
        """
        if permutation is None and self._pixel_permutation is None:
            return
        n, c, h, w = self._images.shape
        # relative[p] = current position holding original pixel permutation[p]
        relative = torch.arange(h * w, device=self.device) if permutation is None else permutation
        if self._pixel_permutation is not None:
            relative = torch.argsort(self._pixel_permutation)[relative]
        flat = self._images.reshape(n * c, h * w)
        # gather with an expanded index is ~10x faster than index_select along the last dim on CPU.
        self._images = torch.gather(flat, 1, relative.expand(n * c, h * w)).reshape(n, c, h, w)
        self._pixel_permutation = permutation

    def _switch_task(self) -> None:
        """Apply every requested shift (spec §1 table); reproducible from the env's generator."""
        self.task_id += 1
        g = self._generator
        labels_changed = False
        if "label_permutation" in self.shift:
            self._class_permutation = torch.randperm(self.num_classes, generator=g, device=self.device)
            labels_changed = True
        if "random_labels" in self.shift:
            self._raw_labels = _redraw_labels(self._raw_labels, self.num_classes, g, which=None)
            labels_changed = True
        if "label_noise" in self.shift:
            num_noisy = max(1, round(self.shift_frac * self.num_images))
            noisy = torch.randperm(self.num_images, generator=g, device=self.device)[:num_noisy]
            self._raw_labels = _redraw_labels(self._raw_labels, self.num_classes, g, which=noisy)
            labels_changed = True
        if "pixel_permutation" in self.shift:
            height, width = self.obs_shape[1:]
            self._set_pixel_permutation(torch.randperm(height * width, generator=g, device=self.device))
        if labels_changed:
            self._rebuild_class_tables()

    # ------------------------------------------------------------------ observations
    def _observe(self, state: torch.Tensor) -> torch.Tensor:
        """One uniformly drawn image of each env's current class, as ``obs_dtype``."""
        uniform = torch.rand(self.num_envs, generator=self._generator, device=self.device)
        offset = (uniform * self._class_count[state]).long()
        # The minimum guards against u * n rounding up to n (the next class's first image).
        position = torch.minimum(self._class_start[state] + offset, self._class_last[state])
        images = self._images.index_select(0, self._images_by_class[position])
        if self.obs_dtype == torch.uint8:
            return images
        return images.to(self.obs_dtype).div_(255)

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Start task 0 (labels, permutations and counters restored); ``seed`` re-seeds the dynamics.

        The dataset itself (subset, ``random_label`` labels) stays the one fixed at construction.
        """
        if options:
            raise ValueError(
                f"reset options are not supported (got {sorted(options)}); the task never needs one"
            )
        if seed is not None:
            if not isinstance(seed, int | np.integer):
                raise ValueError(
                    f"seed must be an int (one generator drives all envs), got {type(seed).__name__}"
                )
            self._generator.manual_seed(int(seed))
        if self._frozen:
            self._step_count = 0
        else:
            self._restart_task()
        self._state = torch.randint(
            self.num_classes, (self.num_envs,), generator=self._generator, device=self.device
        )
        self._needs_reset = False
        return self._observe(self._state), {"task_id": self.task_id, "label": self._state}

    def step(
        self, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        actions = torch.as_tensor(actions, device=self.device)
        if (
            actions.shape != (self.num_envs,)
            or actions.dtype.is_floating_point
            or actions.dtype == torch.bool
        ):
            raise ValueError(
                f"actions must be an integer tensor of shape ({self.num_envs},), "
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

        random_state = torch.randint(
            self.num_classes, (self.num_envs,), generator=self._generator, device=self.device
        )
        if self.variant == "sparse":
            self._state = torch.where(correct, (state + 1) % self.num_classes, random_state)
        else:
            self._state = random_state

        self._step_count += 1
        if self._step_count % self.shift_every == 0 and not self._frozen:
            self._switch_task()  # the next observation already shows the new task
        obs = self._observe(self._state)

        is_truncation = self._step_count % self.episode_length == 0
        truncated = torch.full((self.num_envs,), is_truncation, dtype=torch.bool, device=self.device)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        info = {"task_id": self.task_id, "correct": correct, "label": self._state}
        if is_truncation:
            info["final_obs"], info["_final_obs"] = obs, truncated
        return obs, reward, terminated, truncated, info

    # ------------------------------------------------------------------ evaluation
    def evaluation_copy(self, num_envs: int) -> ImageMDPVectorEnv:
        """``num_envs`` copies of this env frozen at its current task, on a random stream of their own.

        The copy plays the task this env is in now (same images, labels, class and pixel
        permutations, reward offset) and never switches: its ``reset(seed=...)`` draws fresh
        latent states without going back to task 0.  It shares the dataset and the task's tables
        with this env instead of copying them (a switch here replaces those tensors, never edits
        them in place), so it costs no memory, and stepping it leaves this env untouched.
        """
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        twin = copy.copy(self)
        twin.num_envs = int(num_envs)
        twin.observation_space = batch_space(self.single_observation_space, twin.num_envs)
        twin.action_space = batch_space(self.single_action_space, twin.num_envs)
        twin._generator = torch.Generator(device=self.device)
        twin._frozen = True
        twin._needs_reset = True
        return twin

    # ------------------------------------------------------------------ analysis helpers
    def optimal_q(self, gamma: float) -> torch.Tensor:
        """Q*(s, a) [K, K] (float32, on ``device``) of the current task, reward offset included.

        easy / random_label: ``1[a = s] + γ/(1-γ) + b/(1-γ)`` with ``b = reward_offset * task_id``
        (spec §1, ``b`` treated as constant); sparse: exact Bellman fixed point (``optimal_q_values``).
        """
        reward_bias = self.reward_offset * self.task_id if self._offset_rewards else 0.0
        return optimal_q_values(self.num_classes, self.variant, gamma, reward_bias).to(
            self.device, torch.float32
        )

    @property
    def num_actions(self) -> int:
        return self.num_classes

    @property
    def image_labels(self) -> torch.Tensor:
        """Current label of every stored image [N] (defines which images each latent class shows)."""
        return self._labels

    @property
    def class_permutation(self) -> torch.Tensor:
        """Active class-label permutation [K]: current label = ``class_permutation[raw label]``."""
        return self._class_permutation

    @property
    def pixel_permutation(self) -> torch.Tensor | None:
        """Active pixel permutation [H*W] (``obs_flat[p] = original_flat[perm[p]]``), None for identity."""
        return self._pixel_permutation

    # ------------------------------------------------------------------ checkpointing
    def _config(self) -> dict:
        return {
            "num_envs": self.num_envs,
            "variant": self.variant,
            "shift": self.shift,
            "shift_every": self.shift_every,
            "shift_frac": self.shift_frac,
            "reward_offset": self.reward_offset,
            "episode_length": self.episode_length,
            "num_classes": self.num_classes,
            "num_images": self.num_images,
            "obs_shape": self.obs_shape,
        }

    def _data_fingerprint(self) -> tuple[int, int]:
        # Pixel sums are invariant under pixel permutations; the weighted label sum pins the task-0 labels.
        weights = torch.arange(1, self.num_images + 1, device=self.device)
        return int(self._images.sum(dtype=torch.long)), int((self._dataset_labels * weights).sum())

    def state_dict(self) -> dict:
        """Everything needed to resume the exact stream (the dataset itself is not included)."""
        cpu = torch.device("cpu")
        return {
            "config": self._config(),
            "data_fingerprint": self._data_fingerprint(),
            "generator_state": self._generator.get_state(),
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
        """Resume from ``state_dict()`` of an env built with the same arguments (same data and seed)."""
        mismatched = {
            key: (value, self._config()[key])
            for key, value in state_dict["config"].items()
            if self._config().get(key) != value
        }
        if mismatched:
            raise ValueError(
                f"state_dict is from a differently configured env: {{key: (saved, this env)}} = {mismatched}"
            )
        if tuple(state_dict["data_fingerprint"]) != self._data_fingerprint():
            raise ValueError(
                "state_dict is from an env built on different data (dataset, split, num_images, seed "
                "or random labels differ); build the env with the same arguments before loading"
            )
        self._generator.set_state(state_dict["generator_state"])
        self._state = state_dict["state"].to(self.device, copy=True)
        self._raw_labels = state_dict["raw_labels"].to(self.device, copy=True)
        self._class_permutation = state_dict["class_permutation"].to(self.device, copy=True)
        saved_permutation = state_dict["pixel_permutation"]
        self._set_pixel_permutation(
            None if saved_permutation is None else saved_permutation.to(self.device, copy=True)
        )
        self._step_count = int(state_dict["step_count"])
        self.task_id = int(state_dict["task_id"])
        self._needs_reset = bool(state_dict["needs_reset"])
        self._rebuild_class_tables()

    def __repr__(self) -> str:
        return (
            f"ImageMDPVectorEnv({self.dataset}, num_envs={self.num_envs}, variant={self.variant}, "
            f"shift={self.shift}, device={self.device})"
        )


def _redraw_labels(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator, which: torch.Tensor | None
) -> torch.Tensor:
    """Labels with the entries ``which`` (all when None) re-drawn uniformly, as a new tensor.

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
        if bool((torch.bincount(new_labels, minlength=num_classes) > 0).all()):  # one sync per switch
            return new_labels
    raise ValueError(
        f"{MAX_LABEL_REDRAWS} label draws in a row left a class without images: {labels.numel()} images are "
        f"too few for {num_classes} classes with random labels; use more images (num_images)"
    )


class ImageMDPEnv(gymnasium.Env):
    """Single-env view (``num_envs=1``) of ``ImageMDPVectorEnv`` for ``gym.make`` users.

    Same arguments and semantics (minus ``num_envs``); observations are numpy
    arrays ``[C, H, W]`` (float32 in [0, 1] by default, uint8 with
    ``obs_dtype="uint8"``), rewards Python floats, actions ints. Same seed, same
    stream as the vector env with ``num_envs=1``. Never terminates; truncates
    every ``episode_length`` steps without resetting anything (see module docstring).
    """

    metadata = {"render_modes": []}

    def __init__(self, dataset: str = "mnist", **kwargs):
        if "num_envs" in kwargs:
            raise ValueError("ImageMDPEnv is a single env; use ImageMDPVectorEnv for num_envs > 1")
        self.vector_env = ImageMDPVectorEnv(dataset, num_envs=1, **kwargs)
        self.observation_space = self.vector_env.single_observation_space
        self.action_space = self.vector_env.single_action_space

    @property
    def task_id(self) -> int:
        return self.vector_env.task_id

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        obs, info = self.vector_env.reset(seed=seed, options=options)
        return obs[0].cpu().numpy(), {"task_id": info["task_id"], "label": int(info["label"][0])}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an int in 0..{self.vector_env.num_classes - 1}, got {action!r}")
        actions = torch.full((1,), int(action), dtype=torch.long, device=self.vector_env.device)
        obs, reward, _, truncated, info = self.vector_env.step(actions)
        step_info = {
            "task_id": info["task_id"],
            "correct": bool(info["correct"][0]),
            "label": int(info["label"][0]),
        }
        return obs[0].cpu().numpy(), float(reward[0]), False, bool(truncated[0]), step_info

    def optimal_q(self, gamma: float) -> torch.Tensor:
        return self.vector_env.optimal_q(gamma)

    def state_dict(self) -> dict:
        return self.vector_env.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.vector_env.load_state_dict(state_dict)
