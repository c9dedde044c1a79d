"""A population of Atari envs: member k is the env its single run builds, stacked into ``[M, E, ...]`` tensors.

Spec populations.md §5 "Atari": M x num_envs emulators, member k seeded as its single
run (``AtariEnv(..., seed=seeds[k])`` or ``NonstationaryAtariEnv(..., seed=seeds[k])``),
observations ``[M, num_envs, 4, 84, 84]``.  The members are ordinary envs, built on the
CPU and stepped one after the other (ALE emulates env by env anyway, so this loop
over members is the accepted exception to the no-loop rule); the population stacks
their outputs and moves them to the training device in two copies per step (the
observations, and every per-env scalar packed together), as a single AtariEnv does.
Moving integers and float32 rewards between devices changes no value, so member k's
stream is bit-identical to its single run's on any device.

The interface is the image-MDP population's: ``reset(seeds=None)`` and
``step(actions [M, E])`` return ``[M, E]`` tensors (``info``: ``reset_step``,
``game_over``, ``lives``, ``learn_reward``; ``task_id`` and ``game``, the same for every
member because task switches are counted in steps, for a nonstationary population).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

PER_ENV_KEYS = ("reset_step", "game_over", "lives", "learn_reward")  # [E] tensors in a member's info


class AtariPopulation:
    """``M`` Atari envs (``AtariEnv`` or ``NonstationaryAtariEnv``), one per member, as one ``[M, E]`` env.

    ``envs[k]`` is member k's env, built by the caller exactly as member k's single run builds it
    (same arguments, ``seed=seeds[k]``), on the CPU; ``device`` is where the stacked tensors go.
    """

    def __init__(self, envs: Sequence, device: torch.device | str = "cpu"):
        envs = list(envs)
        if not envs:
            raise ValueError("an Atari population needs at least one member env")
        first = envs[0]
        different = [k for k, env in enumerate(envs)
                     if (env.num_envs, env.num_actions, tuple(env.obs_shape)) !=
                     (first.num_envs, first.num_actions, tuple(first.obs_shape))]
        if different:
            raise ValueError(f"members {different} differ from member 0 in num_envs, num_actions or obs_shape")
        self.envs = envs
        self.device = torch.device(device)
        self.seeds = [int(env.seed) for env in envs]
        self.members = len(envs)
        self.num_envs = first.num_envs
        self.obs_shape = tuple(first.obs_shape)

    # ---------------------------------------------------------------- properties
    @property
    def seed(self) -> int:
        """Member 0's seed (the run's seed for a population of one)."""
        return self.seeds[0]

    @property
    def num_actions(self) -> int:
        return self.envs[0].num_actions  # a game switch may change it: read it from the current task

    @property
    def task_id(self) -> int:
        """The task of every member (switches are counted in steps, the same for all)."""
        return int(getattr(self.envs[0], "task_id", 0))

    @property
    def current_game(self) -> str:
        return self.envs[0].current_game

    @property
    def game(self) -> str:
        return self.current_game

    @property
    def action_permutation(self) -> torch.Tensor | None:
        """[M, A] (nonstationary ``action_permutation`` shift): agent action i -> emulator action perm[k, i]."""
        return self._stacked("action_permutation")

    @property
    def pixel_permutation(self) -> torch.Tensor | None:
        """[M, 84*84] (nonstationary ``obs_permutation`` shift): output pixel j shows input pixel perm[k, j]."""
        return self._stacked("pixel_permutation")

    def _stacked(self, name: str) -> torch.Tensor | None:
        values = [getattr(env, name, None) for env in self.envs]
        if any(value is None for value in values):
            return None
        return torch.stack(values).to(self.device)

    def member(self, k: int):
        """Member ``k``'s env (an AtariEnv or NonstationaryAtariEnv on the CPU)."""
        return self.envs[k]

    def screen(self, e: int = 0, member: int = 0) -> np.ndarray | None:
        """Member ``member``'s env ``e`` raw RGB screen [210, 160, 3] (``AtariEnv.screen``; None out of reach)."""
        return self.envs[member].screen(e)

    def freeze(self, task_id: int) -> None:
        """Every member plays task ``task_id`` from the next ``reset`` on, with no more switches (evaluation)."""
        for env in self.envs:
            if hasattr(env, "freeze"):
                env.freeze(task_id)
            elif int(task_id) != 0:
                raise ValueError(f"a stationary Atari env has only task 0, asked to freeze at task {task_id}")

    # ----------------------------------------------------------------------- API
    def reset(self, seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, dict]:
        """New episodes in every member; ``seeds`` one per member (``env.reset(seed=seeds[k])``) or None.

        None: each member's default (an AtariEnv's first reset uses its constructor seed, a later one
        continues its emulators' streams; a NonstationaryAtariEnv uses its task's seed).
        """
        if seeds is not None:
            seeds = list(seeds)
            if len(seeds) != self.members or any(isinstance(s, bool) or not isinstance(s, int | np.integer)
                                                 for s in seeds):
                raise ValueError(f"reset needs one int seed per member ({self.members}), got {seeds}")
        results = [env.reset(seed=None if seeds is None else int(seeds[k])) for k, env in enumerate(self.envs)]
        obs = torch.stack([result[0] for result in results])
        infos = [result[1] for result in results]
        zeros = torch.zeros(self.members, self.num_envs, dtype=torch.float32)
        for info in infos:  # AtariEnv's reset info has no learning reward; NonstationaryAtariEnv's has zeros
            info.setdefault("learn_reward", zeros[0])
        return self._to_device(obs, infos)

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Step member after member with ``actions`` [M, E]; every output stacked to [M, E, ...] on ``device``."""
        host = torch.as_tensor(actions).detach().to("cpu", torch.int64)
        if host.shape != (self.members, self.num_envs):
            raise ValueError(f"actions must have shape ({self.members}, {self.num_envs}) (members, num_envs), "
                             f"got {tuple(host.shape)}")
        results = [env.step(host[k]) for k, env in enumerate(self.envs)]
        obs = torch.stack([result[0] for result in results])
        infos = []
        for reward, terminated, truncated, info in (result[1:] for result in results):
            infos.append({**info, "reward": reward, "terminated": terminated, "truncated": truncated})
        obs, info = self._to_device(obs, infos, extra=("reward", "terminated", "truncated"))
        return obs, info.pop("reward"), info.pop("terminated"), info.pop("truncated"), info

    def _to_device(self, obs: torch.Tensor, infos: list[dict], extra: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict]:
        """Stack the members' per-env tensors into [M, E] and move everything in two copies."""
        keys = (*extra, *PER_ENV_KEYS)
        rows = {key: torch.stack([info[key].cpu() for info in infos]) for key in keys}
        dtypes = {key: value.dtype for key, value in rows.items()}
        if self.device.type == "cpu":
            out = rows
        else:  # one small host-to-device copy of all per-env scalars (bool, int lives, float32 rewards: exact)
            packed = torch.stack([value.to(torch.float32) for value in rows.values()]).to(self.device)
            out = {key: packed[i].to(dtypes[key]) for i, key in enumerate(keys)}
        info = dict(out)
        first = infos[0]
        for key in ("task_id", "game"):
            if key in first:
                info[key] = first[key]
        return obs.to(self.device), info

    def close(self) -> None:
        for env in self.envs:
            env.close()

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Each member's schedule (NonstationaryAtariEnv); emulator states are not checkpointed."""
        return {"seeds": list(self.seeds),
                "members": [env.state_dict() if hasattr(env, "state_dict") else {} for env in self.envs]}

    def load_state_dict(self, state: dict) -> None:
        """Restore every member's schedule; the emulators restart (call ``reset``)."""
        if list(state["seeds"]) != self.seeds:
            raise ValueError(f"this Atari population was saved with seeds {list(state['seeds'])}, "
                             f"the env has seeds {self.seeds}")
        for env, member_state in zip(self.envs, state["members"], strict=True):
            if hasattr(env, "load_state_dict"):
                env.load_state_dict(member_state)

    def __repr__(self) -> str:
        return f"AtariPopulation(seeds={self.seeds}, {self.envs[0]!r})"
