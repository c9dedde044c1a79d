"""Atari (ALE) as a torch-facing vector environment (spec environments.md §2).

The emulator work happens in ``ale_py.vector_env.AtariVectorEnv`` (C++ threads,
the standard preprocessing: 84x84 grayscale, frame skip 4 with a max over the
last two frames, a stack of 4, up to 30 no-ops and FIRE at reset).  This module
adds what the agents need on top of it:

- ids in every common spelling (``ALE/Breakout-v5``, ``BreakoutNoFrameskip-v4``,
  ``Breakout``, ``breakout``) mapped to the ROM name, with one clear error for an
  unknown id;
- the raw game score (``reward_clipping=False``, so real scores can be logged as
  CleanRL does) and, in ``info["learn_reward"]``, the clipped reward sign(r) the
  agent learns from;
- seeds that reach every sub-environment (pitfall 10): per-env seeds are drawn
  from ``numpy.random.SeedSequence(seed)``, so runs with seeds s and s+1 share no
  sub-environment stream (AtariVectorEnv alone seeds env i with s+i);
- episodic life done here, not in ALE: ale-py 0.12's own ``episodic_life``
  restarts the whole game at every lost life, so the env runs with it off and a
  lost life is reported as ``terminated`` while the game goes on (DeepMind's
  EpisodicLifeEnv semantics; only the final game over resets the emulator);
- torch tensors on the training device, with one host-to-device copy of the
  observations and one of the packed per-env scalars per step.

Autoreset is gymnasium's NEXT_STEP mode (AtariVectorEnv's default): the step
after an episode ended (terminated or truncated) returns the next episode's first
observation with reward 0, whatever the action.  That step is not a transition:
``info["reset_step"]`` flags it and the agent passes ``valid=~info["reset_step"]``
to the replay buffer and to ``EpisodeStats``.  In exchange the observation returned
at the end of an episode *is* the true last observation (no ``final_obs`` lookup),
and the replay buffer gets one slot per env per step, which is what lets
``FrameStackReplayBuffer`` store every frame exactly once.
"""

from __future__ import annotations

import difflib
import functools
import re

import ale_py
import numpy as np
import torch
from ale_py import roms
from ale_py.vector_env import AtariVectorEnv

OBS_SHAPE = (4, 84, 84)
FRAME_SKIP = 4
NOOP_MAX = 30
# Matches ALE/<Game>-v5, <Game>NoFrameskip-v4, <Game>Deterministic-v4, <Game>-v0, <Game>, <game_name>.
_ID_PATTERN = re.compile(
    r"^(?:ALE/)?(?P<name>[A-Za-z0-9_]+?)(?P<ram>-ram)?(?:NoFrameskip|Deterministic)?(?:-v\d+)?$"
)


# ---------------------------------------------------------------------------
# ids
# ---------------------------------------------------------------------------
@functools.cache
def _games_by_key() -> dict[str, str]:
    """ROM name keyed by its spelling without case and underscores ("mspacman" -> "ms_pacman")."""
    return {game.replace("_", ""): game for game in roms.get_all_rom_ids()}


def valid_games() -> list[str]:
    """Every ROM name ale-py ships, e.g. ``["adventure", "air_raid", ...]``."""
    return sorted(roms.get_all_rom_ids())


def _env_id_of(game: str) -> str:
    return "ALE/" + game.title().replace("_", "") + "-v5"


def atari_game(env_id: str) -> str:
    """The ale-py ROM name of an Atari id in any common spelling.

    ``"ALE/Breakout-v5"``, ``"BreakoutNoFrameskip-v4"``, ``"Breakout"`` and
    ``"breakout"`` all give ``"breakout"``; ``"MsPacman"`` gives ``"ms_pacman"``.
    An unknown id raises one ValueError that names the closest valid id and lists
    all of them.
    """
    if not isinstance(env_id, str):
        raise ValueError(f"an Atari id must be a string such as 'ALE/Breakout-v5', got {env_id!r}")
    match = _ID_PATTERN.match(env_id.strip())
    if match and match["ram"]:
        raise ValueError(f"{env_id!r} asks for RAM observations; this project uses pixel stacks, "
                         f"use {_env_id_of(atari_game(match['name']))!r}")
    key = match["name"].replace("_", "").lower() if match else ""
    game = _games_by_key().get(key)
    if game is not None:
        return game
    valid_ids = [_env_id_of(game) for game in valid_games()]
    close = difflib.get_close_matches(key or env_id.lower(), list(_games_by_key()), n=1, cutoff=0.6)
    hint = f" Did you mean {_env_id_of(_games_by_key()[close[0]])!r}?" if close else ""
    raise ValueError(f"unknown Atari id {env_id!r}.{hint} Valid ids ({len(valid_ids)} ROMs shipped with "
                     f"ale-py {ale_py.__version__}): {', '.join(valid_ids)}")


def is_atari_id(env_id: str) -> bool:
    """True when ``env_id`` names an Atari game ale-py ships (any spelling ``atari_game`` accepts)."""
    try:
        atari_game(env_id)
    except ValueError:
        return False
    return True


def env_seeds(seed: int, num_envs: int) -> np.ndarray:
    """One seed per sub-environment, drawn from SeedSequence(seed): disjoint across run seeds."""
    state = np.random.SeedSequence(int(seed)).generate_state(num_envs, dtype=np.uint32)
    return (state & 0x7FFFFFFF).astype(np.int64)  # ALE takes non-negative int32 seeds


# ---------------------------------------------------------------------------
# the torch-facing vector env
# ---------------------------------------------------------------------------
class AtariEnv:
    """Torch-facing wrapper over ``ale_py.vector_env.AtariVectorEnv`` (spec environments.md §2).

    Protocol defaults follow Machado et al. 2018: sticky actions with probability
    0.25 (CleanRL's Atari scripts use 0: pass ``sticky_actions=0``), the minimal
    action set, no episodic life, episodes capped at 108,000 emulator frames
    (30 minutes of play; a truncation, not a termination).

    ``step`` returns ``(obs, reward, terminated, truncated, info)``:
    obs uint8 ``[E, 4, 84, 84]``; reward float32 ``[E]``, the RAW game score change
    (log it); terminated / truncated bool ``[E]``; and ``info`` with bool ``[E]``
    tensors ``reset_step`` (NEXT_STEP autoreset step: not a transition),
    ``game_over`` (the game really ended: differs from ``terminated`` when
    ``episodic_life`` makes a lost life terminal; use it to log scores), int
    ``lives`` and float ``learn_reward`` = sign(reward), the clipped reward to learn
    from.  All tensors live on ``device``.
    """

    def __init__(self, env_id: str, num_envs: int = 1, seed: int = 0, sticky_actions: float = 0.25,
                 full_action_space: bool = False, episodic_life: bool = False, max_episode_frames: int = 108_000,
                 device: torch.device | str = "cpu", num_threads: int = 0, noop_max: int = NOOP_MAX):
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if not 0.0 <= float(sticky_actions) <= 1.0:
            raise ValueError(f"sticky_actions is a probability in [0, 1], got {sticky_actions}")
        if not isinstance(max_episode_frames, int) or max_episode_frames < 1:
            raise ValueError(f"max_episode_frames must be a positive int (108_000 = 30 min of play), "
                             f"got {max_episode_frames!r}")
        if noop_max < 0:
            raise ValueError(f"noop_max must be >= 0, got {noop_max}")
        self.game = atari_game(env_id)
        self.env_id = env_id
        self.num_envs = num_envs
        self.seed = int(seed)
        self.sticky_actions = float(sticky_actions)
        self.full_action_space = bool(full_action_space)
        self.episodic_life = bool(episodic_life)
        self.max_episode_frames = max_episode_frames
        self.device = torch.device(device)
        self.obs_shape = OBS_SHAPE
        self._vector_env = self._make_vector_env(num_threads=num_threads, noop_max=noop_max)
        self.num_actions = int(self._vector_env.single_action_space.n)
        # Host-side episode bookkeeping (E numbers per step; the emulator is on the host anyway).
        self._episode_over = np.zeros(num_envs, dtype=bool)  # the last step ended a game: next is a reset step
        self._lives = np.zeros(num_envs, dtype=np.int32)
        self._has_reset = False

    def _make_vector_env(self, num_threads: int, noop_max: int):
        return AtariVectorEnv(
            self.game, self.num_envs, num_threads=num_threads,
            max_num_frames_per_episode=self.max_episode_frames,
            repeat_action_probability=self.sticky_actions, full_action_space=self.full_action_space,
            autoreset_mode="NextStep", noop_max=noop_max,
            # Raw scores; life loss handled in step() (ALE's episodic_life restarts the game at each life).
            reward_clipping=False, episodic_life=False, life_loss_info=False,
        )

    # ------------------------------------------------------------------ API
    @property
    def task_id(self) -> int:
        """Always 0: a stationary game (NonstationaryAtariEnv counts tasks)."""
        return 0

    @property
    def current_game(self) -> str:
        return self.game

    def learning_reward(self, reward: torch.Tensor) -> torch.Tensor:
        """The reward the agent learns from: sign(r), DQN's clipping (Mnih et al. 2015)."""
        return torch.sign(reward)

    def reset(self, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """Start a new episode in every sub-environment.

        The first reset uses the constructor's ``seed`` when none is given; a later
        ``reset()`` without a seed continues the emulators' random streams.
        """
        if seed is None and not self._has_reset:
            seed = self.seed
        obs, info = self._vector_env.reset(seed=None if seed is None else env_seeds(seed, self.num_envs))
        self._has_reset = True
        self._episode_over[:] = False
        self._lives[:] = info["lives"]
        zeros = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return self._to_device(obs), {
            "reset_step": zeros, "game_over": zeros.clone(),
            "lives": torch.as_tensor(info["lives"], device=self.device),
        }

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        if not self._has_reset:
            raise RuntimeError("call reset() before step()")
        host_actions = self._host_actions(actions)
        obs, reward, ale_terminated, ale_truncated, info = self._vector_env.step(host_actions)
        return self._finish_step(obs, reward, ale_terminated, ale_truncated, info["lives"])

    def close(self) -> None:
        self._vector_env.close()

    # -------------------------------------------------------------- helpers
    def _host_actions(self, actions) -> np.ndarray:
        host = torch.as_tensor(actions).detach().to("cpu", torch.int64).numpy()
        if host.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},) (one per env), got {tuple(host.shape)}")
        if host.size and (host.min() < 0 or host.max() >= self.num_actions):
            raise ValueError(f"actions must lie in [0, {self.num_actions}) for {self.game} "
                             f"({'full' if self.full_action_space else 'minimal'} action set), got {host.tolist()}")
        return host

    def _finish_step(self, obs, reward, ale_terminated, ale_truncated, lives):
        reset_step = self._episode_over.copy()
        game_over = ale_terminated | ale_truncated
        terminated = ale_terminated.copy()
        if self.episodic_life:
            # A lost life ends the learning episode; the game goes on (no reset step follows).
            terminated |= (lives < self._lives) & ~reset_step
        truncated = ale_truncated & ~terminated
        self._episode_over = game_over
        self._lives = np.asarray(lives, dtype=np.int32)
        # Pack the per-env scalars: one small host-to-device copy instead of five.
        packed = np.stack([reward, terminated, truncated, reset_step, game_over, lives]).astype(np.float32)
        packed = torch.from_numpy(packed).to(self.device)
        reward_t = packed[0]
        info = {
            "reset_step": packed[3].bool(), "game_over": packed[4].bool(), "lives": packed[5].int(),
            "learn_reward": self.learning_reward(reward_t),
        }
        return self._to_device(obs), reward_t, packed[1].bool(), packed[2].bool(), info

    def _to_device(self, obs: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(obs).to(self.device)

    def __repr__(self) -> str:
        return (f"AtariEnv({self.game!r}, num_envs={self.num_envs}, sticky_actions={self.sticky_actions}, "
                f"full_action_space={self.full_action_space}, episodic_life={self.episodic_life}, "
                f"max_episode_frames={self.max_episode_frames}, device={self.device})")
