"""Replay buffers for vector envs, sampled uniformly on the device (spec agents.md "Replay buffer").

Two layouts behind one interface (``add`` / ``sample`` / ``sample_obs`` /
``state_dict``):

- ``ReplayBuffer`` stores ``obs`` and ``next_obs`` of every transition (any
  dtype); used for the image-classification MDP.
- ``FrameStackReplayBuffer`` stores each frame of a frame-stacked observation
  once and rebuilds the stacks at sample time, respecting episode starts
  (Dopamine's approach): about 7 KB per Atari transition instead of 28 KB (SB3
  ``optimize_memory_usage``) or 56 KB (SB3 default).

Both keep ``num_envs`` columns written by one global cursor: ``add`` writes one
row (one slot per env) with a few slice assignments, no loop over envs.  ``add``
takes ``valid`` (bool [E], default all True): rows with ``valid=False`` are not
transitions and are never sampled.  With NEXT_STEP autoreset (``AtariEnv``) pass
``valid=~info["reset_step"]`` and call ``add`` every step:

    next_obs, reward, terminated, truncated, info = envs.step(actions)
    rb.add(obs, actions, info["learn_reward"], next_obs, terminated, truncated, valid=~info["reset_step"])
    obs = next_obs

Sampling is exact and uniform over the sampleable slots, with no rejection loop
and no host sync: per-chunk counts of sampleable slots are kept up to date by
``add``; ``sample`` draws a rank, finds its chunk with one ``searchsorted`` over
the chunk counts and its slot with one ``cumsum`` + ``searchsorted`` inside the
chunk.  The generator is a seeded ``torch.Generator`` on the buffer's device and
is part of ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """A batch of transitions; ``obs``/``next_obs`` keep the stored dtype (uint8 for images)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(tensor.to(device, non_blocking=True) for tensor in self))


class _SampleableSlots:
    """Exact uniform sampling over the slots whose flag is set, without a loop or a host sync.

    Slots are grouped in chunks of ``chunk_size`` (about sqrt(num_slots)); ``counts``
    holds the number of set flags per chunk.  A draw costs O(num_chunks + n * chunk_size).
    """

    def __init__(self, num_slots: int, device: torch.device):
        self.chunk_size = max(32, 1 << math.ceil(math.log2(max(1.0, math.sqrt(num_slots)))))
        self.num_chunks = -(-num_slots // self.chunk_size)
        self.flags = torch.zeros(self.num_chunks * self.chunk_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(self.num_chunks, dtype=torch.int64, device=device)

    def set(self, slots: torch.Tensor, flags: torch.Tensor) -> None:
        """Set the flags of ``slots`` (distinct indices) and update the chunk counts."""
        old = self.flags[slots]
        self.flags[slots] = flags
        self.counts.index_add_(0, slots // self.chunk_size, flags.long() - old.long())

    def recount(self) -> None:
        self.counts.copy_(self.flags.view(self.num_chunks, self.chunk_size).sum(1))

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        cumulative = self.counts.cumsum(0)
        total = cumulative[-1]
        if self.flags.device.type == "cpu" and int(total) == 0:  # free on CPU; on CUDA the caller's host check
            raise ValueError("the replay buffer holds no sampleable transition yet; add more steps first")
        uniform = torch.rand(n, generator=generator, device=self.flags.device, dtype=torch.float64)
        rank = torch.minimum((uniform * total).long(), total - 1)  # 0-based rank among the set flags
        chunk = torch.searchsorted(cumulative, rank, right=True)
        rank_in_chunk = rank - (cumulative[chunk] - self.counts[chunk])
        running = self.flags.view(self.num_chunks, self.chunk_size)[chunk].cumsum(1)
        position = torch.searchsorted(running, (rank_in_chunk + 1).unsqueeze(1)).squeeze(1)
        return chunk * self.chunk_size + position

    def total(self) -> torch.Tensor:
        return self.counts.sum()


def _as_shape(obs_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(size) for size in obs_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"obs_shape must be a non-empty tuple of positive sizes, got {obs_shape!r}")
    return shape


class _RingBuffer:
    """What both layouts share: rows of ``num_envs`` slots, a cursor, the sampler, the RNG."""

    min_rows = 1

    def __init__(self, capacity: int, obs_shape: Sequence[int], num_envs: int, device: torch.device | str,
                 obs_dtype: torch.dtype, seed: int, sample_device: torch.device | str | None):
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        self.obs_shape = _as_shape(obs_shape)
        self.num_envs = num_envs
        self.num_rows = int(capacity) // num_envs
        if self.num_rows < self.min_rows:
            raise ValueError(f"capacity {capacity} is too small for {num_envs} envs: {type(self).__name__} needs "
                             f"at least {self.min_rows * num_envs} ({self.min_rows} rows of num_envs slots)")
        self.capacity = self.num_rows * num_envs
        self.device = torch.device(device)
        self.sample_device = self.device if sample_device is None else torch.device(sample_device)
        self.obs_dtype = obs_dtype
        rows_envs = (self.num_rows, num_envs)
        self.actions = torch.zeros(rows_envs, dtype=torch.int64, device=self.device)
        self.rewards = torch.zeros(rows_envs, dtype=torch.float32, device=self.device)
        self.terminated = torch.zeros(rows_envs, dtype=torch.bool, device=self.device)
        self.truncated = torch.zeros(rows_envs, dtype=torch.bool, device=self.device)
        self._sampleable = _SampleableSlots(self.capacity, self.device)
        self._env_index = torch.arange(num_envs, device=self.device)
        self.cursor = 0  # next row to write
        self.rows_written = 0  # rows written since creation (not wrapped)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

    # ------------------------------------------------------------ checks
    def _check_obs(self, name: str, obs: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(obs.shape) != (self.num_envs, *shape):
            raise ValueError(f"{name} must have shape {(self.num_envs, *shape)} ([num_envs, *obs_shape]), "
                             f"got {tuple(obs.shape)}")
        if obs.dtype != self.obs_dtype:
            raise ValueError(f"{name} has dtype {obs.dtype} but the buffer stores {self.obs_dtype}; convert it "
                             f"(a silent cast would e.g. turn images in [0, 1] into zeros)")

    def _check_per_env(self, **tensors: torch.Tensor | None) -> None:
        for name, tensor in tensors.items():
            if tensor is not None and tuple(tensor.shape) != (self.num_envs,):
                raise ValueError(f"{name} must have shape ({self.num_envs},) (one per env), got {tuple(tensor.shape)}")

    def _valid_flags(self, valid: torch.Tensor | None) -> torch.Tensor:
        if valid is None:
            return torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        return valid.to(self.device, torch.bool)

    def _write_scalars(self, row: int, actions, rewards, terminated, truncated) -> None:
        self.actions[row] = actions
        self.rewards[row] = rewards
        self.terminated[row] = terminated
        self.truncated[row] = truncated

    def _advance(self) -> int:
        row = self.cursor
        self.cursor = (row + 1) % self.num_rows
        self.rows_written += 1
        return row

    def _draw(self, n: int) -> torch.Tensor:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"batch size must be a positive int, got {n!r}")
        if self.rows_written < self.min_rows_to_sample:
            raise ValueError(f"the replay buffer holds no sampleable transition yet ({self.rows_written} rows "
                             f"added); add more steps before sampling")
        return self._sampleable.sample(n, self.generator)

    def _gather(self, storage: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``storage[row, env]`` for flat slots ``row * num_envs + env``: one index_select (a memcpy per
        slot; multi-dimensional advanced indexing is ~50x slower on CPU for image rows)."""
        return storage.flatten(0, 1).index_select(0, slots.flatten()).view(*slots.shape, *storage.shape[2:])

    # -------------------------------------------------------------- info
    def __len__(self) -> int:
        """Slots filled (num_envs per ``add``, capped at ``capacity``), including the few not sampleable."""
        return min(self.rows_written, self.num_rows) * self.num_envs

    def num_sampleable(self) -> int:
        """How many transitions ``sample`` can return right now (one host sync)."""
        return int(self._sampleable.total())

    @property
    def nbytes(self) -> int:
        """Bytes of device storage (all tensors the buffer holds)."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self._storage().values())

    @property
    def bytes_per_transition(self) -> float:
        return self.nbytes / self.capacity

    # ---------------------------------------------------------- state
    def _storage(self) -> dict[str, torch.Tensor]:
        return {"actions": self.actions, "rewards": self.rewards, "terminated": self.terminated,
                "truncated": self.truncated, "sampleable": self._sampleable.flags,
                "chunk_counts": self._sampleable.counts}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (``torch.load(weights_only=True)`` works); the storage itself, not a copy."""
        state = {name: tensor for name, tensor in self._storage().items() if name != "chunk_counts"}
        state["cursor"] = torch.tensor(self.cursor)
        state["rows_written"] = torch.tensor(self.rows_written)
        state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], env_reset: bool = True) -> None:
        """Restore a ``state_dict``.  ``env_reset``: the envs were reset since it was saved (a resumed
        run always resets them: emulator states are not checkpointed), see ``episode_break``."""
        storage = self._storage()
        for name, tensor in storage.items():
            if name == "chunk_counts":
                continue
            if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
                got = tuple(state[name].shape) if name in state else "missing"
                raise ValueError(f"replay-buffer state {name!r}: expected shape {tuple(tensor.shape)}, got {got}; "
                                 f"was it saved with another capacity, num_envs or obs_shape?")
        for name, tensor in storage.items():
            if name != "chunk_counts":
                tensor.copy_(state[name])
        self._sampleable.recount()  # derived from the flags
        self.cursor = int(state["cursor"])
        self.rows_written = int(state["rows_written"])
        self.generator.set_state(state["generator_state"])
        if env_reset:
            self.episode_break()

    def episode_break(self) -> None:
        """The envs were reset outside the NEXT_STEP stream; the generic layout stores next_obs, nothing to do."""


class ReplayBuffer(_RingBuffer):
    """Stores ``obs`` and ``next_obs`` of every transition (any dtype, any shape)."""

    min_rows_to_sample = 1

    def __init__(self, capacity: int, obs_shape: Sequence[int], num_envs: int, device: torch.device | str = "cpu",
                 obs_dtype: torch.dtype = torch.uint8, seed: int = 0, sample_device: torch.device | str | None = None):
        super().__init__(capacity, obs_shape, num_envs, device, obs_dtype, seed, sample_device)
        shape = (self.num_rows, num_envs, *self.obs_shape)
        self.obs = torch.zeros(shape, dtype=obs_dtype, device=self.device)
        self.next_obs = torch.zeros(shape, dtype=obs_dtype, device=self.device)

    def add(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor,
            terminated: torch.Tensor, truncated: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Store one step of every env (tensors ``[num_envs, ...]``); rows with ``valid`` False are never sampled."""
        self._check_obs("obs", obs, self.obs_shape)
        self._check_obs("next_obs", next_obs, self.obs_shape)
        self._check_per_env(actions=actions, rewards=rewards, terminated=terminated, truncated=truncated, valid=valid)
        row = self._advance()
        self.obs[row] = obs
        self.next_obs[row] = next_obs
        self._write_scalars(row, actions, rewards, terminated, truncated)
        self._sampleable.set(row * self.num_envs + self._env_index, self._valid_flags(valid))

    def sample(self, batch_size: int) -> Batch:
        slots = self._draw(batch_size)
        batch = Batch(*(self._gather(storage, slots) for storage in
                        (self.obs, self.actions, self.rewards, self.next_obs, self.terminated)))
        return batch if self.sample_device == self.device else batch.to(self.sample_device)

    def sample_obs(self, n: int) -> torch.Tensor:
        """``n`` observations of sampleable transitions (probe batches for diagnostics and ReDo)."""
        return self._gather(self.obs, self._draw(n)).to(self.sample_device)

    def _storage(self) -> dict[str, torch.Tensor]:
        return {"obs": self.obs, "next_obs": self.next_obs, **super()._storage()}


class FrameStackReplayBuffer(_RingBuffer):
    """Each frame of a stacked observation stored once; stacks rebuilt at sample time (Dopamine).

    ``obs_shape = (stack, *frame_shape)``, e.g. ``(4, 84, 84)``.  Row ``t`` holds,
    per env, the newest frame of the ``obs`` passed to the ``t``-th ``add`` with
    that step's action, reward and flags.  The transition stored at row ``t`` is
    (stack ending at ``t``) -> (stack ending at ``t + 1``): under NEXT_STEP
    autoreset the row after an episode's last transition is the reset step, whose
    ``obs`` is the true last observation, so ``next_obs`` of a terminated or
    truncated transition is the true last observation (pitfall 11), never the
    next episode's first frame.  A stack never reaches across an episode start:
    frames before the start are zeros, which is what AtariVectorEnv puts in the
    stack at reset, so sampled stacks equal the observations the env returned.

    The very first ``add`` also writes the older ``stack - 1`` frames of its
    ``obs`` into rows of their own, so that stack is rebuilt exactly even when the
    buffer starts mid-episode (e.g. a run resumed without its buffer).

    Not sampleable: rows added with ``valid=False`` (reset steps), the newest row
    (its next frame is not stored yet), and the oldest rows whose stack would need
    frames already overwritten (the ring-buffer seam).  Every observation passed
    to ``add`` must be the ``next_obs`` of the previous ``add`` (the usual
    ``obs = next_obs`` loop); ``next_obs`` itself is not stored.
    """

    min_rows_to_sample = 2  # the first add's row becomes sampleable once its next frame is stored

    def __init__(self, capacity: int, obs_shape: Sequence[int], num_envs: int, device: torch.device | str = "cpu",
                 obs_dtype: torch.dtype = torch.uint8, seed: int = 0, sample_device: torch.device | str | None = None):
        shape = _as_shape(obs_shape)
        if len(shape) < 2:
            raise ValueError(f"a frame stack needs obs_shape (stack, *frame_shape), got {shape}")
        self.stack = shape[0]
        self.frame_shape = shape[1:]
        self.min_rows = 2 * self.stack  # the rows one add refreshes must be distinct
        super().__init__(capacity, shape, num_envs, device, obs_dtype, seed, sample_device)
        rows_envs = (self.num_rows, num_envs)
        # One extra all-zero frame at the end: masked stack positions gather it, so rebuilding a stack is
        # one index_select (no masking pass over the pixels).
        self._frame_store = torch.zeros((self.capacity + 1, *self.frame_shape), dtype=obs_dtype, device=self.device)
        self._zero_frame = self.capacity
        self.frames = self._frame_store[:-1].view(*rows_envs, *self.frame_shape)
        self.is_transition = torch.zeros(rows_envs, dtype=torch.bool, device=self.device)
        self.episode_start = torch.zeros(rows_envs, dtype=torch.bool, device=self.device)
        self._previous_valid = torch.ones(num_envs, dtype=torch.bool, device=self.device)
        # Row offsets of a transition's stack and of its next stack: t - stack + 1 ... t + 1.
        self._window = torch.arange(-self.stack + 1, 2, device=self.device)
        # Constants of the sampleability refresh: rows after the first refreshed one, rows back from a row.
        self._offsets = torch.arange(min(self.num_rows, 2 * self.stack), device=self.device)  # count <= 2 * stack
        self._back = torch.arange(self.stack - 1, device=self.device)

    def add(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor,
            terminated: torch.Tensor, truncated: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Store one step of every env: the newest frame of ``obs`` plus action, reward and flags.

        ``next_obs`` is checked for shape only: its newest frame arrives with the next ``add``.
        """
        self._check_obs("obs", obs, self.obs_shape)
        self._check_obs("next_obs", next_obs, self.obs_shape)
        self._check_per_env(actions=actions, rewards=rewards, terminated=terminated, truncated=truncated, valid=valid)
        valid = self._valid_flags(valid)
        first_row = self.cursor
        if self.rows_written == 0:
            for older in range(self.stack - 1):  # the first stack's older frames, in rows of their own
                row = self._advance()
                self.frames[row] = obs[:, older]
                self._write_scalars(row, 0, 0.0, False, False)
                self.is_transition[row] = False
                self.episode_start[row] = False
            starts = torch.zeros_like(valid)
        else:
            starts = ~self._previous_valid  # the row after a reset step starts an episode
        row = self._advance()
        self.frames[row] = obs[:, -1]
        self._write_scalars(row, actions, rewards, terminated, truncated)
        self.is_transition[row] = valid
        self.episode_start[row] = starts
        self._previous_valid = valid
        written = (row - first_row) % self.num_rows + 1
        # The previous newest row now has its next frame; the oldest rows lost frames behind them.
        self._refresh_sampleable(first_row - 1, written + self.stack)

    def episode_break(self) -> None:
        """The envs were reset outside the NEXT_STEP stream (e.g. a resumed run): the next ``add`` starts
        new episodes, and the newest row, whose next frame will never come, stops being a transition."""
        if self.rows_written == 0:
            return
        newest = (self.cursor - 1) % self.num_rows
        self.is_transition[newest] = False
        self._previous_valid.zero_()
        self._refresh_sampleable(newest, 1)

    def _refresh_sampleable(self, first_row: int, count: int) -> None:
        rows = (first_row + self._offsets[:count]) % self.num_rows  # [count]
        filled = min(self.rows_written, self.num_rows)
        oldest = self.cursor if self.rows_written >= self.num_rows else 0
        age = (rows - oldest) % self.num_rows  # 0 = oldest row still stored; filled - 1 = the newest row
        # Frames the stack needs before row t: stack - 1, or b when an episode starts b rows back (b < stack - 1).
        needed = 0
        if self.stack > 1:
            starts = self.episode_start[(rows.unsqueeze(1) - self._back) % self.num_rows]  # [count, stack - 1, E]
            needed = torch.where(starts, self._back.view(1, -1, 1), self.stack - 1).amin(1)  # [count, E]
        age = age.unsqueeze(1)
        # Stored, not the newest row (its next frame is not stored yet), and every frame of its stack kept.
        sampleable = self.is_transition[rows] & (age < filled - 1) & (age >= needed)
        slots = rows.unsqueeze(1) * self.num_envs + self._env_index
        self._sampleable.set(slots.flatten(), sampleable.flatten())

    def _stacks(self, slots: torch.Tensor, with_next: bool) -> tuple[torch.Tensor, ...]:
        rows, envs = slots // self.num_envs, slots % self.num_envs
        window = self._window if with_next else self._window[:-1]
        window_slots = (rows.unsqueeze(1) + window) % self.num_rows * self.num_envs + envs.unsqueeze(1)
        starts = self._gather(self.episode_start, window_slots).long()  # [n, stack (+1)]
        out = []
        for shift in range(2 if with_next else 1):
            stack_slots = window_slots[:, shift:shift + self.stack]
            stack_starts = starts[:, shift:shift + self.stack]
            # Keep a frame when no episode starts after it within the stack; earlier ones read the zero frame.
            starts_after = stack_starts.flip(1).cumsum(1).flip(1) - stack_starts
            stack_slots = torch.where(starts_after == 0, stack_slots, self._zero_frame)
            frames = self._frame_store.index_select(0, stack_slots.flatten())
            out.append(frames.view(len(slots), self.stack, *self.frame_shape))
        return tuple(out)

    def sample(self, batch_size: int) -> Batch:
        slots = self._draw(batch_size)
        obs, next_obs = self._stacks(slots, with_next=True)
        batch = Batch(obs, self._gather(self.actions, slots), self._gather(self.rewards, slots), next_obs,
                      self._gather(self.terminated, slots))
        return batch if self.sample_device == self.device else batch.to(self.sample_device)

    def sample_obs(self, n: int) -> torch.Tensor:
        """``n`` stacked observations of sampleable transitions (probe batches)."""
        return self._stacks(self._draw(n), with_next=False)[0].to(self.sample_device)

    def _storage(self) -> dict[str, torch.Tensor]:
        return {"frames": self._frame_store, "is_transition": self.is_transition, "episode_start": self.episode_start,
                "previous_valid": self._previous_valid, **super()._storage()}


def is_frame_stack(obs_shape: Sequence[int], frame_shape: Sequence[int] = (84, 84)) -> bool:
    """True for stacked Atari-style observations ``(stack > 1, 84, 84)``."""
    shape = tuple(obs_shape)
    return len(shape) == 1 + len(frame_shape) and shape[1:] == tuple(frame_shape) and shape[0] > 1


def make_replay_buffer(obs_shape: Sequence[int], capacity: int, num_envs: int, device: torch.device | str = "cpu",
                       seed: int = 0, obs_dtype: torch.dtype = torch.uint8,
                       sample_device: torch.device | str | None = None,
                       frame_stack: bool | None = None) -> ReplayBuffer | FrameStackReplayBuffer:
    """The buffer for an observation shape: frame stack for ``(k, 84, 84)`` stacks, else the generic one."""
    use_frames = is_frame_stack(obs_shape) if frame_stack is None else frame_stack
    kind = FrameStackReplayBuffer if use_frames else ReplayBuffer
    return kind(capacity, obs_shape, num_envs, device=device, obs_dtype=obs_dtype, seed=seed,
                sample_device=sample_device)
