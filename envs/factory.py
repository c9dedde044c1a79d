"""One entry point from an agent's ``--env-id`` and env flags to a population environment.

A run is a population of ``M`` members (spec populations.md; a single run is ``M = 1``),
member k the env of seed ``seeds[k]``.  Both environment families present the same
torch-facing interface with a leading member dimension: ``reset(seeds) -> (obs, info)``
and ``step(actions [M, E]) -> (obs, reward, terminated, truncated, info)`` with uint8
observations ``[M, E, *obs_shape]`` and ``[M, E]`` tensors on the training device, plus
``members``, ``seeds``, ``num_envs`` (per member), ``num_actions``, ``obs_shape`` (one
env's) and ``task_id`` (the same for every member).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import NamedTuple

import torch

IMAGE_MDP_PREFIX = "ImageMDP/"
IMAGE_MDP_DATASETS = ("mnist", "fashion_mnist", "cifar10")
IMAGE_MDP_IDS = tuple(IMAGE_MDP_PREFIX + name for name in IMAGE_MDP_DATASETS)


def is_image_mdp_id(env_id: str) -> bool:
    return env_id.startswith(IMAGE_MDP_PREFIX)


def env_family(env_id: str) -> str:
    """``"image_mdp"`` or ``"atari"``; an unknown id is one ValueError that lists the valid ones."""
    if is_image_mdp_id(env_id):
        if env_id not in IMAGE_MDP_IDS:
            raise ValueError(f"unknown image-MDP id {env_id!r}; valid ids: {', '.join(IMAGE_MDP_IDS)}")
        return "image_mdp"
    from envs.atari import atari_game

    try:
        atari_game(env_id)
    except ValueError as error:
        close = difflib.get_close_matches(env_id, IMAGE_MDP_IDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{error}; image-MDP ids: {', '.join(IMAGE_MDP_IDS)}{hint}") from None
    return "atari"


def population_seeds(args) -> list[int]:
    """The members' seeds of the run ``args`` describe: ``--seed s`` and ``--num-seeds N`` give s, ..., s+N-1."""
    return [int(args.seed) + k for k in range(int(getattr(args, "num_seeds", 1) or 1))]


def make_env(args, device: torch.device, seeds: Sequence[int] | None = None, screens: bool = False):
    """Build the population env an agent's Args describe, on ``device`` (uint8 observations).

    ``seeds``: one per member (default ``population_seeds(args)``); member k is the env the single
    run with ``--seed seeds[k]`` builds.  Observations come out ``[M, num_envs, *obs_shape]``.
    ``screens``: Atari envs keep their raw RGB screens reachable (``env.screen(e, member)``, for videos).
    """
    seeds = population_seeds(args) if seeds is None else [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("a population needs at least one seed")
    if env_family(args.env_id) == "image_mdp":
        from envs.image_mdp import ImageMDPVectorEnv

        return ImageMDPVectorEnv(
            dataset=args.env_id[len(IMAGE_MDP_PREFIX):], num_envs=args.num_envs, variant=args.variant,
            # The env counts vector steps; the flag counts env steps (validated to be a multiple).
            shift=args.shift, shift_every=args.shift_every // args.num_envs, shift_frac=args.shift_frac,
            reward_offset=args.reward_offset, episode_length=args.episode_length,
            num_images=args.num_images or None, data_dir=args.data_dir or None, device=device,
            seeds=seeds, obs_dtype=torch.uint8,
        )
    from envs.atari_population import AtariPopulation

    # The members emulate on the host; the population moves their stacked outputs to ``device``.
    return AtariPopulation([_atari_member(args, seed, screens) for seed in seeds], device)


def _atari_member(args, seed: int, screens: bool):
    """Member ``seed``'s Atari env: exactly the env the single run with ``--seed seed`` plays (on the CPU)."""
    cpu = torch.device("cpu")
    if args.atari_shift:
        from envs.nonstationary_atari import NonstationaryAtariEnv

        # NonstationaryAtariEnv builds every task's AtariEnv with ALE's stack, FIRE and 30 no-ops.
        unsupported = [flag for flag, used in (("--env-stack cleanrl", args.env_stack != "ale"),
                                               ("--no-fire-reset", not args.fire_reset),
                                               (f"--noop-max {args.noop_max}", args.noop_max != 30)) if used]
        if unsupported:
            protocol = f" (set by --protocol {args.protocol})" if args.protocol != "none" else ""
            raise ValueError(f"{', '.join(unsupported)}{protocol} is not available with --atari-shift; give "
                             "--env-stack ale --fire-reset --noop-max 30, or drop --atari-shift")
        return NonstationaryAtariEnv(
            args.env_id, num_envs=args.num_envs, seed=seed, shifts=args.atari_shift,
            switch_every=args.switch_every // args.num_envs, games=args.games, modes=args.modes,
            difficulties=args.difficulties, reward_offset=args.reward_offset, reward_scale=args.reward_scale,
            sticky_actions=args.sticky_actions, episodic_life=args.episodic_life, device=cpu, screens=screens,
            full_action_space=args.full_action_space, max_episode_frames=args.max_episode_frames,
        )
    from envs.atari import AtariEnv

    return AtariEnv(args.env_id, num_envs=args.num_envs, seed=seed, sticky_actions=args.sticky_actions,
                    full_action_space=args.full_action_space, episodic_life=args.episodic_life, device=cpu,
                    screens=screens, max_episode_frames=args.max_episode_frames, noop_max=args.noop_max,
                    fire_reset=args.fire_reset, env_stack=args.env_stack)


class Step(NamedTuple):
    """What one population step gives the agent loop: every tensor [M, num_envs] on the training device."""

    obs: torch.Tensor  # [M, E, *obs_shape] observation to act on next
    next_obs: torch.Tensor  # true next observation of this transition (differs from obs at NEXT_STEP resets)
    learn_reward: torch.Tensor  # reward the agent learns from (Atari: clipped, then shifted/scaled)
    terminated: torch.Tensor  # bool
    truncated: torch.Tensor  # bool
    store: torch.Tensor | None  # bool: which transitions are real (None: all); Atari reset steps are not
    episode_returns: torch.Tensor  # float64: raw return of the episode (whole game on Atari) that ended, else 0
    episode_lengths: torch.Tensor  # int64: its length, else 0
    episode_ended: torch.Tensor  # bool: an episode ended at this step (dense: no data-dependent shapes)
    greedy_correct: torch.Tensor | None  # image MDP: [M] float, fraction of each member's greedy actions right
    task_id: int  # the same for every member
    previous_task_id: int
    group: str  # e.g. the current game, for per-game return tags ("" when not applicable)


class AgentEnv:
    """The two environment families behind one population step interface for the agents.

    Keeps the per-env episode statistics (returns of raw rewards, so Atari scores
    are real game scores) and the image-MDP greedy accuracy, with tensor ops only.
    ``members`` (M), ``seeds``, ``num_envs`` (per member), ``num_actions``, ``obs_shape``
    (one env's observation, without the member and env dims).
    """

    def __init__(self, env, family: str, device: torch.device, per_game_returns: bool = False):
        from envs.episode_stats import EpisodeStats

        self.env, self.family, self.device = env, family, device
        self.members, self.seeds = env.members, list(env.seeds)
        self.num_envs, self.num_actions, self.obs_shape = env.num_envs, env.num_actions, tuple(env.obs_shape)
        self.episodes = EpisodeStats(self.num_envs, device, members=self.members)
        self.per_game_returns = per_game_returns
        self._labels: torch.Tensor | None = None

    @classmethod
    def make(cls, args, device: torch.device, seeds: Sequence[int] | None = None) -> AgentEnv:
        """The population env of ``args`` with members ``seeds`` (default ``population_seeds(args)``)."""
        family = env_family(args.env_id)
        return cls(make_env(args, device, seeds=seeds), family, device,
                   per_game_returns="games" in args.atari_shift)

    @property
    def task_id(self) -> int:
        return int(getattr(self.env, "task_id", 0))

    def reset(self, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """New episodes in every member (``seeds``: one per member, None: continue); obs [M, E, *obs_shape]."""
        obs, info = self.env.reset(seeds=seeds)
        self._labels = info.get("label")
        self.episodes.reset()
        return obs

    def step(self, actions: torch.Tensor, greedy_actions: torch.Tensor | None = None) -> Step:
        """One step of every member with ``actions`` [M, E]; ``greedy_actions`` [M, E] for the image-MDP accuracy."""
        previous_task = self.task_id
        obs, reward, terminated, truncated, info = self.env.step(actions)
        if self.family == "image_mdp":
            correct = None
            if greedy_actions is not None and self._labels is not None:
                if greedy_actions.shape != self._labels.shape:
                    raise ValueError(f"greedy_actions must have shape {tuple(self._labels.shape)} "
                                     f"(members, num_envs), got {tuple(greedy_actions.shape)}")
                correct = (greedy_actions == self._labels).float().mean(dim=1)
            self._labels = info["label"]
            returns, lengths, ended = self.episodes.update(reward, truncated | terminated)
            return Step(obs, obs, reward, terminated, truncated, None, returns, lengths, ended, correct,
                        self.task_id, previous_task, "")
        real = ~info["reset_step"]
        returns, lengths, ended = self.episodes.update(reward, info["game_over"], valid=real)
        group = info.get("game", "") if self.per_game_returns else ""
        return Step(obs, obs, info["learn_reward"], terminated, truncated, real, returns, lengths, ended, None,
                    self.task_id, previous_task, group)

    def state_dict(self) -> dict:
        state = {"episodes": self.episodes.state_dict(), "labels": self._labels}
        if hasattr(self.env, "state_dict"):
            state["env"] = self.env.state_dict()
        return state

    def load_state_dict(self, state: dict, resume_step: int = 0) -> torch.Tensor | None:
        """Restore a checkpoint; returns a fresh observation [M, E, ...] when the env had to restart.

        The image MDP resumes exactly (its whole state is tensors).  Atari emulator
        states are not checkpointed: each member's games restart, seeded from its seed
        plus the resume step (so a resumed run does not replay its first episodes), and
        the episodes that were in flight are dropped from the statistics.
        """
        self._labels = state["labels"]
        if self._labels is not None:
            self._labels = self._labels.to(self.device)
        if "env" in state:
            self.env.load_state_dict(state["env"])
        if self.family == "image_mdp":
            self.episodes.load_state_dict(state["episodes"])
            return None
        obs, _info = self.env.reset(seeds=[seed + resume_step for seed in self.seeds])
        self.episodes.reset()
        return obs

    def close(self) -> None:
        if hasattr(self.env, "close"):
            self.env.close()
