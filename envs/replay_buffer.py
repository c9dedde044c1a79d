"""Replay buffers for populations of runs on vector envs, sampled uniformly on the device (spec agents.md
"Replay buffer", populations.md).

A population is M independent runs in one process (populations.md); a single run is the
population of one.  Every tensor has a leading member dimension: ``add`` takes
``[M, num_envs, ...]``, ``sample`` returns ``[M, batch_size, ...]``.  Member k holds only
its own transitions and samples them with its own random stream (``MemberRandom``, seeded
``seeds[k]``), so it returns exactly what a one-member buffer with ``seeds=[seeds[k]]``
fed member k's data returns.  No operation loops over members.

Two layouts behind one interface (``add`` / ``sample`` / ``sample_obs`` /
``state_dict``):

- ``ReplayBuffer`` stores ``obs`` and ``next_obs`` of every transition (any
  dtype); used for the image-classification MDP.
- ``FrameStackReplayBuffer`` stores each frame of a frame-stacked observation
  once and rebuilds the stacks at sample time, respecting episode starts
  (Dopamine's approach): about 7 KB per Atari transition instead of 28 KB (SB3
  ``optimize_memory_usage``) or 56 KB (SB3 default).

Storage is ``[M, rows, num_envs, ...]`` (contiguous), written by one global cursor
(every member takes the same env steps): ``add`` writes one row of every member with a
few slice assignments.  Sampling flattens member, row and env into one index
(``member * capacity + row * num_envs + env``), so every field of a batch is one
``index_select`` for all members.  ``add`` takes ``valid`` (bool [M, E], default all
True): slots with ``valid=False`` are not transitions and are never sampled; the flags may
differ between members.  With NEXT_STEP autoreset (``AtariEnv``) pass
``valid=~info["reset_step"]`` and call ``add`` every step:

    next_obs, reward, terminated, truncated, info = envs.step(actions)
    rb.add(obs, actions, info["learn_reward"], next_obs, terminated, truncated, valid=~info["reset_step"])
    obs = next_obs

Sampling is exact and uniform over each member's sampleable slots, with no rejection
loop and no host sync: per-member, per-chunk counts of sampleable slots are kept up to
date by ``add``; ``sample`` draws a rank per member, finds its chunk with one batched
``searchsorted`` over the [M, chunks] cumulative counts and its slot with one ``cumsum``
+ ``searchsorted`` inside the chunk.  The random streams are part of ``state_dict``.

Memory is planned before allocating: ``planned_replay_nbytes`` (or the classmethod
``planned_nbytes``) returns exactly the ``nbytes`` the buffer will have (all members; linear
in the number of members).  ``state_dict`` holds the whole population; ``member_state_dict(k)``
is exactly the ``state_dict`` of member k's single run, and ``load_member_state_dicts`` rebuilds
a population from such states (per-member checkpoints, populations.md 3.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from plasticity.streams import MemberRandom

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


class Batch(NamedTuple):
    """A batch of transitions, every field ``[M, batch_size, ...]``; ``obs``/``next_obs`` keep the stored
    dtype (uint8 for images)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(tensor.to(device, non_blocking=True) for tensor in self))


def _chunking(num_slots: int, batch_size: int = 32) -> tuple[int, int]:
    """(chunk_size, num_chunks) of the sampler over ``num_slots`` slots per member.

    A draw of ``batch_size`` costs about num_chunks + batch_size * chunk_size per member: smallest at
    chunk_size ~ sqrt(num_slots / batch_size), a power of two (64 for 100k slots, 256 for 1M).
    """
    chunk_size = max(16, 1 << round(math.log2(max(1.0, math.sqrt(num_slots / batch_size)))))
    return chunk_size, -(-num_slots // chunk_size)


class _SampleableSlots:
    """Exact uniform sampling, per member, over the slots whose flag is set, without a loop or a host sync.

    ``flags`` is [M, num_chunks * chunk_size]; slots are grouped in chunks of
    ``chunk_size`` (see ``_chunking``); ``counts`` [M, num_chunks] holds the number
    of set flags per member and chunk.  A draw costs O(M * (num_chunks + n * chunk_size)).
    Member k's numbers depend only on its flags and its stream: the chunking changes no draw.
    """

    def __init__(self, flags: torch.Tensor, counts: torch.Tensor, chunk_size: int):
        self.flags, self.counts, self.chunk_size = flags, counts, chunk_size
        self.members, self.num_chunks = counts.shape
        # Row of member k's chunk c in flags.view(M * num_chunks, chunk_size): k * num_chunks + c.
        self._chunk_offset = (torch.arange(self.members, device=flags.device) * self.num_chunks).unsqueeze(1)

    def set(self, slots: torch.Tensor, flags: torch.Tensor) -> None:
        """Set the flags [M, K] of ``slots`` [K] (distinct indices, the same for every member)."""
        old = self.flags.index_select(1, slots)
        self.flags.index_copy_(1, slots, flags)
        self.counts.index_add_(1, slots // self.chunk_size, flags.long() - old.long())

    def recount(self) -> None:
        self.counts.copy_(self.flags.view(self.members, self.num_chunks, self.chunk_size).sum(2))

    def sample(self, n: int, random: MemberRandom) -> torch.Tensor:
        """[M, n] slots (within each member) drawn uniformly among each member's set flags."""
        cumulative = self.counts.cumsum(1)  # [M, C]
        total = cumulative[:, -1]  # [M]
        if self.flags.device.type == "cpu":  # free on CPU; on CUDA the caller's host check
            if int(total.min()) == 0:
                empty = (total == 0).nonzero().flatten().tolist()
                raise ValueError(f"the replay buffer holds no sampleable transition yet for member(s) {empty}; "
                                 f"add more steps first")
        total = total.unsqueeze(1)  # [M, 1]
        rank = torch.minimum((random.uniform(n) * total).long(), total - 1)  # [M, n] 0-based rank
        chunk = torch.searchsorted(cumulative, rank, right=True)  # [M, n]
        rank_in_chunk = rank - (cumulative - self.counts).gather(1, chunk)
        rows = self.flags.view(-1, self.chunk_size).index_select(0, (chunk + self._chunk_offset).flatten())
        running = rows.view(self.members, n, self.chunk_size).cumsum(2)
        position = torch.searchsorted(running, (rank_in_chunk + 1).unsqueeze(2)).squeeze(2)
        return chunk * self.chunk_size + position

    def total(self) -> torch.Tensor:
        return self.counts.sum(1)


def _as_shape(obs_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(size) for size in obs_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"obs_shape must be a non-empty tuple of positive sizes, got {obs_shape!r}")
    return shape


def _as_seeds(seeds: Sequence[int]) -> list[int]:
    listed = None if isinstance(seeds, (int, str, bytes)) or not hasattr(seeds, "__iter__") else list(seeds)
    if not listed:
        raise ValueError(f"seeds must be a non-empty sequence of ints, one per member (e.g. [seed] for a single "
                         f"run), got {seeds!r}")
    return [int(seed) for seed in listed]


class _RingBuffer:
    """What both layouts share: rows of ``num_envs`` slots per member, a cursor, the sampler, the streams."""

    min_rows_to_sample = 1

    # ------------------------------------------------------------ layout
    @classmethod
    def _min_rows(cls, obs_shape: tuple[int, ...]) -> int:
        return 1

    @classmethod
    def _rows(cls, capacity: int, obs_shape: tuple[int, ...], num_envs: int) -> int:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        num_rows, min_rows = int(capacity) // num_envs, cls._min_rows(obs_shape)
        if num_rows < min_rows:
            raise ValueError(f"capacity {capacity} is too small for {num_envs} envs: {cls.__name__} needs "
                             f"at least {min_rows * num_envs} ({min_rows} rows of num_envs slots)")
        return num_rows

    @classmethod
    def _layout(cls, obs_shape: tuple[int, ...], num_rows: int, num_envs: int, members: int,
                obs_dtype: torch.dtype) -> Layout:
        """Every tensor the buffer allocates: name -> (shape, dtype)."""
        grid = (members, num_rows, num_envs)
        chunk_size, num_chunks = _chunking(num_rows * num_envs)
        return {"actions": (grid, torch.int64), "rewards": (grid, torch.float32),
                "terminated": (grid, torch.bool), "truncated": (grid, torch.bool),
                "sampleable": ((members, num_chunks * chunk_size), torch.bool),
                "chunk_counts": ((members, num_chunks), torch.int64)}

    @classmethod
    def planned_nbytes(cls, obs_shape: Sequence[int], capacity: int, num_envs: int, members: int = 1,
                       obs_dtype: torch.dtype = torch.uint8) -> int:
        """The ``nbytes`` a buffer of ``members`` members will have, computed without allocating it."""
        if not isinstance(members, int) or members < 1:
            raise ValueError(f"members must be a positive int, got {members!r}")
        shape = _as_shape(obs_shape)
        layout = cls._layout(shape, cls._rows(capacity, shape, num_envs), num_envs, members, obs_dtype)
        return sum(math.prod(size) * torch.empty((), dtype=dtype).element_size() for size, dtype in layout.values())

    # -------------------------------------------------------------- init
    def __init__(self, capacity: int, obs_shape: Sequence[int], num_envs: int, device: torch.device | str,
                 obs_dtype: torch.dtype, seeds: Sequence[int], sample_device: torch.device | str | None):
        self.seeds = _as_seeds(seeds)
        self.members = len(self.seeds)
        self.obs_shape = _as_shape(obs_shape)
        self.num_envs = num_envs
        self.num_rows = self._rows(capacity, self.obs_shape, num_envs)
        self.capacity = self.num_rows * num_envs  # slots per member
        self.device = torch.device(device)
        self.sample_device = self.device if sample_device is None else torch.device(sample_device)
        self.obs_dtype = obs_dtype
        self._tensors = {name: torch.zeros(shape, dtype=dtype, device=self.device) for name, (shape, dtype) in
                         self._layout(self.obs_shape, self.num_rows, num_envs, self.members, obs_dtype).items()}
        self.actions = self._tensors["actions"]  # [M, rows, E]
        self.rewards = self._tensors["rewards"]
        self.terminated = self._tensors["terminated"]
        self.truncated = self._tensors["truncated"]
        # Row-major views [rows, M, E, ...] of the [M, rows, E, ...] storage: add writes row t of every member
        # with one select per tensor.
        self._by_row = {name: tensor.transpose(0, 1) for name, tensor in self._tensors.items()
                        if tuple(tensor.shape[:3]) == (self.members, self.num_rows, num_envs)}
        self._sampleable = _SampleableSlots(self._tensors["sampleable"], self._tensors["chunk_counts"],
                                            _chunking(self.capacity)[0])
        self._env_index = torch.arange(num_envs, device=self.device)
        members = torch.arange(self.members, device=self.device).unsqueeze(1)  # [M, 1]
        self._slot_offset = members * self.capacity  # member k's first slot in storage.flatten(0, 2)
        self.cursor = 0  # next row to write
        self.rows_written = 0  # rows written since creation (not wrapped)
        self.random = MemberRandom(self.seeds, self.device)

    # ------------------------------------------------------------ checks
    def _check_obs(self, name: str, obs: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(obs.shape) != (self.members, self.num_envs, *shape):
            raise ValueError(f"{name} must have shape {(self.members, self.num_envs, *shape)} ([members, num_envs, "
                             f"*obs_shape]), got {tuple(obs.shape)}")
        if obs.dtype != self.obs_dtype:
            raise ValueError(f"{name} has dtype {obs.dtype} but the buffer stores {self.obs_dtype}; convert it "
                             f"(a silent cast would e.g. turn images in [0, 1] into zeros)")

    def _check_per_env(self, **tensors: torch.Tensor | None) -> None:
        expected = (self.members, self.num_envs)
        for name, tensor in tensors.items():
            if tensor is not None and tuple(tensor.shape) != expected:
                raise ValueError(f"{name} must have shape {expected} ([members, num_envs]), got {tuple(tensor.shape)}")

    def _valid_flags(self, valid: torch.Tensor | None) -> torch.Tensor:
        if valid is None:
            return torch.ones(self.members, self.num_envs, dtype=torch.bool, device=self.device)
        return valid.to(self.device, torch.bool)

    def _write_scalars(self, row: int, actions, rewards, terminated, truncated) -> None:
        by_row = self._by_row
        by_row["actions"][row] = actions
        by_row["rewards"][row] = rewards
        by_row["terminated"][row] = terminated
        by_row["truncated"][row] = truncated

    def _advance(self) -> int:
        row = self.cursor
        self.cursor = (row + 1) % self.num_rows
        self.rows_written += 1
        return row

    def _draw(self, n: int) -> torch.Tensor:
        """[M, n] slots within each member."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"batch size must be a positive int, got {n!r}")
        if self.rows_written < self.min_rows_to_sample:
            raise ValueError(f"the replay buffer holds no sampleable transition yet ({self.rows_written} rows "
                             f"added); add more steps before sampling")
        return self._sampleable.sample(n, self.random)

    def _index(self, slots: torch.Tensor) -> torch.Tensor:
        """Slots [M, n] within each member (``row * num_envs + env``) -> [M, n] indices into
        ``storage.flatten(0, 2)``: ``member * capacity + slot``."""
        return slots + self._slot_offset

    def _gather(self, storage: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``storage[member, row, env]`` for ``_index`` indices [M, n]: one index_select for all members
        (a memcpy per slot; advanced indexing is ~50x slower on CPU for image rows)."""
        return storage.flatten(0, 2).index_select(0, index.flatten()).view(*index.shape, *storage.shape[3:])

    # -------------------------------------------------------------- info
    def __len__(self) -> int:
        """Slots filled per member (num_envs per ``add``, capped at ``capacity``; the same for every member),
        including the few not sampleable."""
        return min(self.rows_written, self.num_rows) * self.num_envs

    def sampleable_counts(self) -> torch.Tensor:
        """[M] int64 on the buffer's device: how many transitions ``sample`` can return per member (no sync)."""
        return self._sampleable.total()

    def num_sampleable(self) -> int:
        """The fewest transitions ``sample`` can return among the members (one host sync); for M = 1, the
        member's count.  ``sampleable_counts`` gives every member's."""
        return int(self._sampleable.total().min())

    @property
    def nbytes(self) -> int:
        """Bytes of device storage of all members (every tensor the buffer allocates; equal to
        ``planned_nbytes``).  The random streams' pools (about 32 KB per member) are not counted."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self._tensors.values())

    @property
    def bytes_per_transition(self) -> float:
        """Bytes per member per stored transition."""
        return self.nbytes / (self.members * self.capacity)

    # ---------------------------------------------------------- state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in self._tensors.items() if name != "chunk_counts"}

    def state_dict(self) -> dict:
        """Tensors, ints and lists only (``torch.load(weights_only=True)`` works); every storage tensor has
        the member dim first and is the storage itself, not a copy."""
        state: dict = dict(self._state_tensors())
        state["cursor"] = torch.tensor(self.cursor)
        state["rows_written"] = torch.tensor(self.rows_written)
        state["random"] = self.random.state_dict()
        return state

    def member_state_dict(self, member: int) -> dict:
        """Member ``member``'s state, exactly the ``state_dict`` of the one-member buffer (``seeds=[seeds[k]]``)
        that run alone: a single run's checkpoint (spec populations.md 3.1).  Copies member k's storage."""
        if not 0 <= member < self.members:
            raise ValueError(f"member {member} out of range for a population of {self.members}")
        state: dict = {name: tensor[member:member + 1].clone() for name, tensor in self._state_tensors().items()}
        state["cursor"] = torch.tensor(self.cursor)
        state["rows_written"] = torch.tensor(self.rows_written)
        state["random"] = self.random.member(member).state_dict()
        return state

    def _check_state(self, state: dict, members: int | None = None) -> None:
        for name, tensor in self._state_tensors().items():
            shape = tuple(tensor.shape) if members is None else (members, *tensor.shape[1:])
            if name not in state or tuple(state[name].shape) != shape:
                got = tuple(state[name].shape) if name in state else "missing"
                raise ValueError(f"replay-buffer state {name!r}: expected shape {shape}, got {got}; was it saved "
                                 f"with another capacity, num_envs, obs_shape or number of members?")

    def load_state_dict(self, state: dict, env_reset: bool = True) -> None:
        """Restore a ``state_dict`` (same members, same seeds).  ``env_reset``: the envs were reset since it was
        saved (a resumed run always resets them: emulator states are not checkpointed), see ``episode_break``."""
        self._check_state(state)
        for name, tensor in self._state_tensors().items():
            tensor.copy_(state[name])
        self._finish_load(int(state["cursor"]), int(state["rows_written"]), state["random"], env_reset)

    def load_member_state_dicts(self, states: Sequence[dict], env_reset: bool = True) -> None:
        """Restore the population from one ``member_state_dict`` (or one-member ``state_dict``) per member, in
        member order; they must share cursor and row count (saved at the same step)."""
        if len(states) != self.members:
            raise ValueError(f"{len(states)} member states for a population of {self.members}")
        for state in states:
            self._check_state(state, members=1)
        positions = {(int(state["cursor"]), int(state["rows_written"])) for state in states}
        if len(positions) != 1:
            raise ValueError(f"member states were saved at different steps (cursor, rows written: {positions})")
        pools = [state["random"]["pool"] for state in states]
        if len({tuple(pool.shape) for pool in pools}) != 1:
            raise ValueError("member random streams are at different positions; were they saved at the same step?")
        for name, tensor in self._state_tensors().items():
            for member, state in enumerate(states):
                tensor[member].copy_(state[name][0])
        random = {"seeds": [seed for state in states for seed in state["random"]["seeds"]],
                  "generators": [g for state in states for g in state["random"]["generators"]],
                  "pool": torch.cat(pools)}
        cursor, rows_written = positions.pop()
        self._finish_load(cursor, rows_written, random, env_reset)

    def _finish_load(self, cursor: int, rows_written: int, random: dict, env_reset: bool) -> None:
        self._sampleable.recount()  # derived from the flags
        self.cursor, self.rows_written = cursor, rows_written
        self.random.load_state_dict(random)
        if env_reset:
            self.episode_break()

    def episode_break(self) -> None:
        """The envs were reset outside the NEXT_STEP stream; the generic layout stores next_obs, nothing to do."""


class ReplayBuffer(_RingBuffer):
    """Stores ``obs`` and ``next_obs`` of every transition (any dtype, any shape), ``[M, rows, E, *obs_shape]``."""

    min_rows_to_sample = 1

    @classmethod
    def _layout(cls, obs_shape, num_rows, num_envs, members, obs_dtype) -> Layout:
        shape = (members, num_rows, num_envs, *obs_shape)
        return {"obs": (shape, obs_dtype), "next_obs": (shape, obs_dtype),
                **super()._layout(obs_shape, num_rows, num_envs, members, obs_dtype)}

    def __init__(self, capacity: int, obs_shape: Sequence[int], num_envs: int, device: torch.device | str = "cpu",
                 obs_dtype: torch.dtype = torch.uint8, seeds: Sequence[int] = (0,),
                 sample_device: torch.device | str | None = None):
        super().__init__(capacity, obs_shape, num_envs, device, obs_dtype, seeds, sample_device)
        self.obs = self._tensors["obs"]
        self.next_obs = self._tensors["next_obs"]

    def add(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor,
            terminated: torch.Tensor, truncated: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Store one step of every member's envs (tensors ``[M, num_envs, ...]``); slots with ``valid`` False
        are never sampled."""
        self._check_obs("obs", obs, self.obs_shape)
        self._check_obs("next_obs", next_obs, self.obs_shape)
        self._check_per_env(actions=actions, rewards=rewards, terminated=terminated, truncated=truncated, valid=valid)
        row = self._advance()
        self._by_row["obs"][row] = obs
        self._by_row["next_obs"][row] = next_obs
        self._write_scalars(row, actions, rewards, terminated, truncated)
        self._sampleable.set(row * self.num_envs + self._env_index, self._valid_flags(valid))

    def sample(self, batch_size: int) -> Batch:
        """``batch_size`` transitions per member, every field ``[M, batch_size, ...]`` on ``sample_device``."""
        index = self._index(self._draw(batch_size))
        batch = Batch(*(self._gather(storage, index) for storage in
                        (self.obs, self.actions, self.rewards, self.next_obs, self.terminated)))
        return batch if self.sample_device == self.device else batch.to(self.sample_device)

    def sample_obs(self, n: int) -> torch.Tensor:
        """``[M, n, *obs_shape]`` observations of sampleable transitions (probe batches for diagnostics, ReDo)."""
        return self._gather(self.obs, self._index(self._draw(n))).to(self.sample_device)


class FrameStackReplayBuffer(_RingBuffer):
    """Each frame of a stacked observation stored once; stacks rebuilt at sample time (Dopamine).

    ``obs_shape = (stack, *frame_shape)``, e.g. ``(4, 84, 84)``.  Row ``t`` holds,
    per member and env, the newest frame of the ``obs`` passed to the ``t``-th ``add``
    with that step's action, reward and flags.  The transition stored at row ``t`` is
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

    Not sampleable: slots added with ``valid=False`` (reset steps), the newest row
    (its next frame is not stored yet), and the oldest rows whose stack would need
    frames already overwritten (the ring-buffer seam).  Every observation passed
    to ``add`` must be the ``next_obs`` of the previous ``add`` (the usual
    ``obs = next_obs`` loop); ``next_obs`` itself is not stored.  Episode starts are
    per member and env.
    """

    min_rows_to_sample = 2  # the first add's row becomes sampleable once its next frame is stored

    @classmethod
    def _frame_shape(cls, obs_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(obs_shape) < 2:
            raise ValueError(f"a frame stack needs obs_shape (stack, *frame_shape), got {obs_shape}")
        return obs_shape[1:]

    @classmethod
    def _min_rows(cls, obs_shape: tuple[int, ...]) -> int:
        cls._frame_shape(obs_shape)
        return 2 * obs_shape[0]  # the rows one add refreshes must be distinct

    @classmethod
    def _layout(cls, obs_shape, num_rows, num_envs, members, obs_dtype) -> Layout:
        grid = (members, num_rows, num_envs)
        # One extra all-zero frame per member: masked stack positions gather it, so rebuilding a stack is
        # one index_select (no masking pass over the pixels).
        frames = (members, num_rows * num_envs + 1, *cls._frame_shape(obs_shape))
        return {"frames": (frames, obs_dtype), "is_transition": (grid, torch.bool),
                "episode_start": (grid, torch.bool), "previous_valid": ((members, num_envs), torch.bool),
                **super()._layout(obs_shape, num_rows, num_envs, members, obs_dtype)}

    def __init__(self, capacity: int, obs_shape: Sequence[int], num_envs: int, device: torch.device | str = "cpu",
                 obs_dtype: torch.dtype = torch.uint8, seeds: Sequence[int] = (0,),
                 sample_device: torch.device | str | None = None):
        super().__init__(capacity, obs_shape, num_envs, device, obs_dtype, seeds, sample_device)
        self.stack = self.obs_shape[0]
        self.frame_shape = self.obs_shape[1:]
        self._frame_store = self._tensors["frames"]  # [M, capacity + 1, *frame_shape]
        self._zero_frame = self.capacity  # within each member
        self.frames = self._frame_store[:, :-1].view(self.members, self.num_rows, num_envs, *self.frame_shape)
        self._by_row["frames"] = self.frames.transpose(0, 1)
        self.is_transition = self._tensors["is_transition"]
        self.episode_start = self._tensors["episode_start"]
        self._previous_valid = self._tensors["previous_valid"]
        self._previous_valid.fill_(True)
        self._frame_offset = self._slot_offset // self.capacity * (self.capacity + 1)  # [M, 1]
        # Row offsets of a transition's stack and of its next stack: t - stack + 1 ... t + 1.
        self._window = torch.arange(-self.stack + 1, 2, device=self.device)
        # Constants of the sampleability refresh: rows after the first refreshed one, rows back from a row.
        self._offsets = torch.arange(min(self.num_rows, 2 * self.stack), device=self.device)  # count <= 2 * stack
        self._back = torch.arange(self.stack - 1, device=self.device)

    def add(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor,
            terminated: torch.Tensor, truncated: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Store one step of every member's envs (``[M, num_envs, ...]``): the newest frame of ``obs`` plus
        action, reward and flags.  ``next_obs`` is checked for shape only: its newest frame arrives with the
        next ``add``."""
        self._check_obs("obs", obs, self.obs_shape)
        self._check_obs("next_obs", next_obs, self.obs_shape)
        self._check_per_env(actions=actions, rewards=rewards, terminated=terminated, truncated=truncated, valid=valid)
        valid = self._valid_flags(valid)
        first_row = self.cursor
        if self.rows_written == 0:
            for older in range(self.stack - 1):  # the first stack's older frames, in rows of their own
                row = self._advance()
                self._by_row["frames"][row] = obs[:, :, older]
                self._write_scalars(row, 0, 0.0, False, False)
                self._by_row["is_transition"][row] = False
                self._by_row["episode_start"][row] = False
            starts = torch.zeros_like(valid)
        else:
            starts = ~self._previous_valid  # the row after a reset step starts an episode
        row = self._advance()
        by_row = self._by_row
        by_row["frames"][row] = obs[:, :, -1]
        self._write_scalars(row, actions, rewards, terminated, truncated)
        by_row["is_transition"][row] = valid
        by_row["episode_start"][row] = starts
        self._previous_valid.copy_(valid)
        written = (row - first_row) % self.num_rows + 1
        # The previous newest row now has its next frame; the oldest rows lost frames behind them.
        self._refresh_sampleable(first_row - 1, written + self.stack)

    def episode_break(self) -> None:
        """The envs were reset outside the NEXT_STEP stream (e.g. a resumed run): the next ``add`` starts
        new episodes, and the newest row, whose next frame will never come, stops being a transition."""
        if self.rows_written == 0:
            return
        newest = (self.cursor - 1) % self.num_rows
        self.is_transition[:, newest] = False
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
            back_rows = ((rows.unsqueeze(1) - self._back) % self.num_rows).flatten()
            starts = self.episode_start.index_select(1, back_rows).view(self.members, count, -1, self.num_envs)
            needed = torch.where(starts, self._back.view(1, 1, -1, 1), self.stack - 1).amin(2)  # [M, count, E]
        age = age.view(1, -1, 1)
        # Stored, not the newest row (its next frame is not stored yet), and every frame of its stack kept.
        sampleable = self.is_transition.index_select(1, rows) & (age < filled - 1) & (age >= needed)  # [M, count, E]
        slots = rows.unsqueeze(1) * self.num_envs + self._env_index
        self._sampleable.set(slots.flatten(), sampleable.flatten(1))

    def _stacks(self, slots: torch.Tensor, with_next: bool) -> tuple[torch.Tensor, ...]:
        """The stacks (and next stacks) of slots [M, n]: each ``[M, n, stack, *frame_shape]``."""
        members, n = slots.shape
        rows, envs = slots // self.num_envs, slots % self.num_envs
        window = self._window if with_next else self._window[:-1]
        window_slots = ((rows.unsqueeze(2) + window) % self.num_rows * self.num_envs
                        + envs.unsqueeze(2))  # [M, n, stack (+1)]
        starts = self._gather(self.episode_start, self._index(window_slots.view(members, -1)))
        starts = starts.view(window_slots.shape).long()
        out = []
        for shift in range(2 if with_next else 1):
            stack_slots = window_slots[..., shift:shift + self.stack]
            stack_starts = starts[..., shift:shift + self.stack]
            # Keep a frame when no episode starts after it within the stack; earlier ones read the zero frame.
            starts_after = stack_starts.flip(2).cumsum(2).flip(2) - stack_starts
            stack_slots = torch.where(starts_after == 0, stack_slots, self._zero_frame)
            index = (stack_slots.view(members, -1) + self._frame_offset).flatten()
            frames = self._frame_store.flatten(0, 1).index_select(0, index)
            out.append(frames.view(members, n, self.stack, *self.frame_shape))
        return tuple(out)

    def sample(self, batch_size: int) -> Batch:
        """``batch_size`` transitions per member, every field ``[M, batch_size, ...]`` on ``sample_device``."""
        slots = self._draw(batch_size)
        obs, next_obs = self._stacks(slots, with_next=True)
        index = self._index(slots)
        batch = Batch(obs, self._gather(self.actions, index), self._gather(self.rewards, index), next_obs,
                      self._gather(self.terminated, index))
        return batch if self.sample_device == self.device else batch.to(self.sample_device)

    def sample_obs(self, n: int) -> torch.Tensor:
        """``[M, n, stack, *frame_shape]`` stacked observations of sampleable transitions (probe batches)."""
        return self._stacks(self._draw(n), with_next=False)[0].to(self.sample_device)


def is_frame_stack(obs_shape: Sequence[int], frame_shape: Sequence[int] = (84, 84)) -> bool:
    """True for stacked Atari-style observations ``(stack > 1, 84, 84)``."""
    shape = tuple(obs_shape)
    return len(shape) == 1 + len(frame_shape) and shape[1:] == tuple(frame_shape) and shape[0] > 1


def replay_buffer_kind(obs_shape: Sequence[int], frame_stack: bool | None = None) -> type[_RingBuffer]:
    """The layout ``make_replay_buffer`` picks: frame stack for ``(k, 84, 84)`` stacks, else the generic one."""
    use_frames = is_frame_stack(obs_shape) if frame_stack is None else frame_stack
    return FrameStackReplayBuffer if use_frames else ReplayBuffer


def planned_replay_nbytes(obs_shape: Sequence[int], capacity: int, num_envs: int, members: int = 1,
                          obs_dtype: torch.dtype = torch.uint8, frame_stack: bool | None = None) -> int:
    """Exactly the ``nbytes`` of ``make_replay_buffer(obs_shape, capacity, num_envs, seeds=<members seeds>)``,
    all members together, without allocating (per member: divide by ``members``)."""
    return replay_buffer_kind(obs_shape, frame_stack).planned_nbytes(obs_shape, capacity, num_envs, members,
                                                                     obs_dtype)


def make_replay_buffer(obs_shape: Sequence[int], capacity: int, num_envs: int, device: torch.device | str = "cpu",
                       seeds: Sequence[int] = (0,), obs_dtype: torch.dtype = torch.uint8,
                       sample_device: torch.device | str | None = None,
                       frame_stack: bool | None = None) -> ReplayBuffer | FrameStackReplayBuffer:
    """The buffer for an observation shape, one member per seed (``seeds``: each member's replay-stream seed,
    e.g. ``[stream_seed(s + k, "replay") for k in range(M)]``)."""
    kind = replay_buffer_kind(obs_shape, frame_stack)
    return kind(capacity, obs_shape, num_envs, device=device, obs_dtype=obs_dtype, seeds=seeds,
                sample_device=sample_device)
