"""Nonstationary Atari: the game, its rules or its interface change every ``switch_every`` steps.

Spec environments.md §2 "Nonstationary Atari".  One vector-level wrapper with
AtariEnv's interface; ``shifts`` picks what changes at each switch (task id += 1),
any combination of:

| shift                | task k                                                                 |
|----------------------|------------------------------------------------------------------------|
| ``games``            | game k of the cycle (``env_id`` first, then ``games``); 18 actions     |
| ``modes``            | ALE game mode ``modes[k % len(modes)]``                                |
| ``difficulties``     | ALE difficulty ``difficulties[k % len(difficulties)]``                 |
| ``action_permutation`` | action index i triggers emulator action perm_k[i] (fresh for k >= 1) |
| ``obs_invert``       | frames inverted (255 - x) in odd tasks                                 |
| ``obs_permutation``  | a fixed random permutation of the 84x84 pixels (fresh for k >= 1)      |
| ``reward_offset``    | learning reward sign(r) * scale_k + k * reward_offset                  |
| ``reward_scale``     | learning reward sign(r) * reward_scale**k + offset_k                   |

Task 0 is the unmodified game, so the first task is the standard benchmark.
Everything about task k is derived from ``(seed, k)`` (SeedSequence), so the
schedule is reproducible from the seed and a resumed run rebuilds it from
``task_id`` alone (``state_dict``).

At a switch every episode in flight ends as a TRUNCATION (never a termination:
the agent keeps bootstrapping), and the next step is a NEXT_STEP reset step
(``info["reset_step"]`` all True, reward 0) whose observation is the new task's
first one: the same stream shape AtariEnv produces at an episode's end, so the
agent loop, EpisodeStats and FrameStackReplayBuffer need nothing special.
``task_id`` and ``current_game`` describe the observation just returned; per-game
returns go to ``info["game"]`` (the game the finished episodes were played in).

Rewards: ``step`` returns the RAW score change (log it); ``info["learn_reward"]``
is the reward to learn from, clipped first (sign, as DQN) then scaled and offset.

Between switches the wrapper adds a few tensor ops to AtariEnv's step (none
when only game/mode/difficulty shifts are on).  Game switches rebuild the
vector env (the old one is closed); mode and difficulty shifts run every task on
``ALEInterfaceVectorEnv``, the mode-capable re-implementation of AtariVectorEnv's
preprocessing (bit-exact, but single-threaded: see docs/benchmarks_atari.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from envs.atari import AtariEnv, atari_game, available_difficulties, available_modes

SHIFTS = ("games", "modes", "difficulties", "action_permutation", "obs_invert", "obs_permutation",
          "reward_offset", "reward_scale")


def task_seed(seed: int, task_id: int, purpose: str) -> int:
    """A seed for one purpose of one task, independent across tasks and purposes."""
    key = [int(seed), int(task_id), sum(ord(c) << (8 * i) for i, c in enumerate(purpose[:7]))]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


@dataclass(frozen=True)
class Task:
    """What task ``task_id`` is: derived from (seed, task_id) and the shift settings."""

    task_id: int
    game: str
    mode: int | None
    difficulty: int | None
    permute_actions: bool
    invert: bool
    permute_pixels: bool
    reward_scale: float
    reward_offset: float
    env_seed: int


class NonstationaryAtariEnv:
    """AtariEnv whose task changes every ``switch_every`` agent steps (``step`` calls); see the module doc."""

    def __init__(self, env_id: str, num_envs: int = 1, seed: int = 0, shifts: Sequence[str] = (),
                 switch_every: int = 0, games: Sequence[str] | None = None, modes: Sequence[int] | None = None,
                 difficulties: Sequence[int] | None = None, reward_offset: float = 0.0, reward_scale: float = 1.0,
                 sticky_actions: float = 0.25, full_action_space: bool = False, episodic_life: bool = False,
                 max_episode_frames: int = 108_000, device: torch.device | str = "cpu", num_threads: int = 0,
                 screens: bool = False):
        self.shifts = self._check_shifts(shifts, switch_every)
        self.switch_every = int(switch_every)
        self.seed = int(seed)
        self.games = self._game_cycle(env_id, list(games or []))
        self.modes = self._check_settings("modes", list(modes or []), available_modes)
        self.difficulties = self._check_settings("difficulties", list(difficulties or []), available_difficulties)
        self._check_rewards(float(reward_offset), float(reward_scale))
        self.reward_offset, self.reward_scale = float(reward_offset), float(reward_scale)
        self.num_envs = num_envs
        self.device = torch.device(device)
        self._env_kwargs = dict(
            num_envs=num_envs, sticky_actions=sticky_actions, episodic_life=episodic_life,
            full_action_space=full_action_space or "games" in self.shifts, max_episode_frames=max_episode_frames,
            device=self.device, num_threads=num_threads, screens=screens)
        self._steps = 0  # step() calls so far: the switch clock
        self._switch_pending = False  # the last step was a switch step: the next one starts the next task
        self._env: AtariEnv | None = None
        self._start_task(0, build_only=True)

    # ------------------------------------------------------------ settings
    @staticmethod
    def _check_shifts(shifts: Sequence[str], switch_every: int) -> tuple[str, ...]:
        shifts = tuple(dict.fromkeys(shifts))
        unknown = [shift for shift in shifts if shift not in SHIFTS]
        if unknown:
            raise ValueError(f"unknown Atari shift(s) {unknown}; valid shifts: {', '.join(SHIFTS)}")
        if shifts and (not isinstance(switch_every, int) or switch_every < 1):
            raise ValueError(f"shifts {list(shifts)} need switch_every >= 1 (agent steps between task switches), "
                             f"got {switch_every!r}")
        return shifts

    def _game_cycle(self, env_id: str, games: list[str]) -> list[str]:
        first = atari_game(env_id)
        if "games" not in self.shifts:
            if games:
                raise ValueError(f"games {games} are only used by the 'games' shift; add it to shifts or drop games")
            return [first]
        cycle = [first] + [game for game in map(atari_game, games) if game != first]
        if len(cycle) < 2:
            raise ValueError(f"the 'games' shift needs at least one game besides {first}; pass games, "
                             f"e.g. games=['Pong', 'Breakout']")
        return cycle

    def _check_settings(self, shift: str, values: list[int], available) -> list[int]:
        if shift not in self.shifts:
            if values:
                raise ValueError(f"{shift} {values} are only used by the '{shift}' shift; add it to shifts")
            return []
        if len(set(values)) < 2:
            raise ValueError(f"the '{shift}' shift cycles through a list of at least two different {shift}, "
                             f"got {values}")
        for game in self.games:
            valid = available(game)
            wrong = [value for value in values if value not in valid]
            if wrong:
                raise ValueError(f"{game} has no {shift} {wrong}; valid {shift} for {game}: {list(valid)}")
        return values

    def _check_rewards(self, offset: float, scale: float) -> None:
        if "reward_offset" in self.shifts and offset == 0.0:
            raise ValueError("the 'reward_offset' shift needs reward_offset != 0 (added per task: k * offset)")
        if "reward_offset" not in self.shifts and offset != 0.0:
            raise ValueError(f"reward_offset={offset} only acts with the 'reward_offset' shift; add it to shifts")
        if "reward_scale" in self.shifts and (scale <= 0.0 or scale == 1.0):
            raise ValueError(f"the 'reward_scale' shift needs reward_scale > 0 and != 1 (task k multiplies by "
                             f"scale**k), got {scale}")
        if "reward_scale" not in self.shifts and scale != 1.0:
            raise ValueError(f"reward_scale={scale} only acts with the 'reward_scale' shift; add it to shifts")

    def task(self, task_id: int) -> Task:
        """The settings of task ``task_id`` (any k >= 0; the schedule is a pure function of seed and k)."""
        def cycled(values):
            return values[task_id % len(values)] if values else None

        return Task(
            task_id=task_id, game=self.games[task_id % len(self.games)], mode=cycled(self.modes),
            difficulty=cycled(self.difficulties),
            permute_actions="action_permutation" in self.shifts and task_id > 0,
            invert="obs_invert" in self.shifts and task_id % 2 == 1,
            permute_pixels="obs_permutation" in self.shifts and task_id > 0,
            reward_scale=self.reward_scale ** task_id, reward_offset=self.reward_offset * task_id,
            env_seed=self.seed if task_id == 0 else task_seed(self.seed, task_id, "env"))

    # ---------------------------------------------------------------- tasks
    def _start_task(self, task_id: int, build_only: bool = False):
        task = self.task(task_id)
        previous = getattr(self, "current_task", None)
        same_emulator = previous is not None and (previous.game, previous.mode, previous.difficulty) == (
            task.game, task.mode, task.difficulty)
        if not same_emulator:
            if self._env is not None:
                self._env.close()
            self._env = AtariEnv(task.game, seed=task.env_seed, mode=task.mode, difficulty=task.difficulty,
                                 **self._env_kwargs)
        self.current_task = task
        self.num_actions = self._env.num_actions
        self.obs_shape = self._env.obs_shape
        self._action_map = self._permutation(task, "actions", self.num_actions) if task.permute_actions else None
        pixels = self.obs_shape[1] * self.obs_shape[2]
        self._pixel_map = self._permutation(task, "pixels", pixels) if task.permute_pixels else None
        if build_only:
            return None
        obs, info = self._env.reset(seed=task.env_seed)
        return obs, info

    def _permutation(self, task: Task, purpose: str, size: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(task_seed(self.seed, task.task_id, purpose))
        return torch.randperm(size, generator=generator).to(self.device)

    def freeze(self, task_id: int) -> None:
        """Play task ``task_id`` from the next ``reset()`` on, with no more switches (an evaluation copy)."""
        self.switch_every = 0
        self._switch_pending = False
        self._start_task(int(task_id), build_only=True)

    def screen(self, e: int = 0):
        """Env ``e``'s raw RGB screen of the current game (``AtariEnv.screen``), untouched by the obs shifts."""
        return self._env.screen(e)

    @property
    def env(self) -> AtariEnv:
        """The AtariEnv playing the current task."""
        return self._env

    @property
    def task_id(self) -> int:
        return self.current_task.task_id

    @property
    def current_game(self) -> str:
        return self.current_task.game

    @property
    def action_permutation(self) -> torch.Tensor | None:
        """perm with: agent action i -> emulator action perm[i] in this task (None: identity)."""
        return self._action_map

    @property
    def pixel_permutation(self) -> torch.Tensor | None:
        """perm with: output pixel j shows input pixel perm[j] of each 84x84 frame (None: identity)."""
        return self._pixel_map

    # ------------------------------------------------------------------ API
    def learning_reward(self, reward: torch.Tensor) -> torch.Tensor:
        """sign(r) * scale_k + offset_k: clipped first, then the task's scale and offset."""
        task = self.current_task
        learn = torch.sign(reward)
        if task.reward_scale != 1.0:
            learn = learn * task.reward_scale
        if task.reward_offset != 0.0:
            learn = learn + task.reward_offset
        return learn

    def reset(self, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """New episodes in the current task (the schedule is not reset); ``seed`` None: the task's seed."""
        obs, info = self._env.reset(seed=self.current_task.env_seed if seed is None else seed)
        self._frames_in_episode = torch.ones(self.num_envs, dtype=torch.int64, device=self.device)
        zeros = torch.zeros(self.num_envs, device=self.device)
        return self._transform_obs(obs), self._annotate(info, zeros, learn=zeros)

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        if not hasattr(self, "_frames_in_episode"):
            raise RuntimeError("call reset() before step()")
        self._steps += 1
        if self._switch_pending:  # the reset step into the next task
            self._switch_pending = False
            obs, info = self._start_task(self.task_id + 1)
            self._frames_in_episode.fill_(1)
            no = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
            info["reset_step"] = ~no
            reward = torch.zeros(self.num_envs, device=self.device)
            return self._transform_obs(obs), reward, no, no.clone(), self._annotate(info, reward, learn=reward)
        if self._action_map is not None:
            actions = self._action_map[torch.as_tensor(actions, device=self.device)]
        obs, reward, terminated, truncated, info = self._env.step(actions)
        if "obs_invert" in self.shifts:  # which stack slots hold real frames (not the reset padding)
            self._frames_in_episode = torch.where(info["reset_step"], 1, (self._frames_in_episode + 1).clamp_(max=4))
        if self.switch_every and self._steps % self.switch_every == 0:
            # Episodes in flight end as truncations; the next step resets into the next task.
            in_flight = ~(info["reset_step"] | terminated | truncated)
            truncated = truncated | in_flight
            info["game_over"] = info["game_over"] | in_flight
            self._switch_pending = True
        return self._transform_obs(obs), reward, terminated, truncated, self._annotate(info, reward)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()

    # -------------------------------------------------------------- helpers
    def _annotate(self, info: dict, reward: torch.Tensor, learn: torch.Tensor | None = None) -> dict:
        if learn is not None:
            info["learn_reward"] = learn
        elif self.current_task.reward_scale != 1.0 or self.current_task.reward_offset != 0.0:
            info["learn_reward"] = self.learning_reward(reward)  # else AtariEnv's sign(r) is already there
        info["task_id"] = self.task_id
        info["game"] = self.current_game
        return info

    def _transform_obs(self, obs: torch.Tensor) -> torch.Tensor:
        if self._pixel_map is not None:
            # gather with a broadcast index: ~10x faster on CPU than index_select along the last dim.
            rows = obs.reshape(-1, self._pixel_map.numel())
            obs = rows.gather(1, self._pixel_map.expand_as(rows)).view(obs.shape)
        if self.current_task.invert:
            # Invert real frames only: the zero frames padding a young episode's stack stay zeros (the
            # convention FrameStackReplayBuffer rebuilds stacks with).
            stack = obs.shape[1]
            real = torch.arange(stack, device=self.device) >= (stack - self._frames_in_episode).unsqueeze(1)
            obs = obs ^ (real.to(torch.uint8) * 255).view(*real.shape, 1, 1)  # x ^ 255 = 255 - x for uint8
        return obs

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The switch clock and the task: everything else is derived from (seed, task_id)."""
        return {"seed": torch.tensor(self.seed), "task_id": torch.tensor(self.task_id),
                "steps": torch.tensor(self._steps), "switch_pending": torch.tensor(self._switch_pending)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule; the emulators restart (call ``reset()``): their states are not checkpointed."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"this schedule was saved with seed {int(state['seed'])}, the env has seed {self.seed}: "
                             f"the tasks would differ")
        self._steps = int(state["steps"])
        self._switch_pending = bool(state["switch_pending"])
        self._start_task(int(state["task_id"]), build_only=True)

    def __repr__(self) -> str:
        return (f"NonstationaryAtariEnv(shifts={list(self.shifts)}, switch_every={self.switch_every}, "
                f"games={self.games}, task_id={self.task_id})")
