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
  observations and one of the packed per-env scalars per step;
- ``env_stack="cleanrl"``: CleanRL's SB3 wrapper stack replayed step for step
  (``CleanRLVectorEnv``: FIRE after every reset, lost lives included), for
  ``--protocol cleanrl``.

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
import math
import re

import ale_py
import numpy as np
import torch
from ale_py import roms
from ale_py.vector_env import AtariVectorEnv
from gymnasium.spaces import Discrete

OBS_SHAPE = (4, 84, 84)
FRAME_SKIP = 4
NOOP_MAX = 30
ENV_STACKS = ("ale", "cleanrl")  # AtariVectorEnv's preprocessing (C++), CleanRL's wrapper stack (CleanRLVectorEnv)
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


@functools.cache
def _modes_and_difficulties(game: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ale = _new_ale(0.0)
    ale.loadROM(str(roms.get_rom_path(game)))
    return tuple(int(m) for m in ale.getAvailableModes()), tuple(int(d) for d in ale.getAvailableDifficulties())


def available_modes(game: str) -> tuple[int, ...]:
    """The ALE game modes of a ROM (``game`` in any spelling ``atari_game`` accepts)."""
    return _modes_and_difficulties(atari_game(game))[0]


def available_difficulties(game: str) -> tuple[int, ...]:
    """The ALE difficulties of a ROM (``game`` in any spelling ``atari_game`` accepts)."""
    return _modes_and_difficulties(atari_game(game))[1]


def check_mode_and_difficulty(game: str, mode: int | None, difficulty: int | None) -> None:
    """One clear error, listing the valid values, for a mode or difficulty the ROM does not have."""
    modes, difficulties = _modes_and_difficulties(atari_game(game))
    if mode is not None and mode not in modes:
        raise ValueError(f"{game} has no game mode {mode}; valid modes: {list(modes)}")
    if difficulty is not None and difficulty not in difficulties:
        raise ValueError(f"{game} has no difficulty {difficulty}; valid difficulties: {list(difficulties)}")


def _new_ale(repeat_action_probability: float) -> ale_py.ALEInterface:
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    ale = ale_py.ALEInterface()
    ale.setFloat("repeat_action_probability", repeat_action_probability)
    return ale


def _area_resize_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA weights for a non-integer downscale (``computeResizeAreaTab``).

    Returns source indices and float32 weights, [dst, taps], padded with weight 0.
    """
    scale = src / dst
    taps = []
    for d in range(dst):
        start, end = d * scale, d * scale + scale
        cell = min(scale, src - start)
        first, last = math.ceil(start), min(math.floor(end), src - 1)
        first = min(first, last)
        row = []
        if first - start > 1e-3:
            row.append((first - 1, (first - start) / cell))
        row += [(i, 1.0 / cell) for i in range(first, last)]
        if end - last > 1e-3:
            row.append((last, min(min(end - last, 1.0), cell) / cell))
        taps.append(row)
    width = max(len(row) for row in taps)
    index = np.zeros((dst, width), dtype=np.int64)
    weight = np.zeros((dst, width), dtype=np.float32)
    for d, row in enumerate(taps):
        for k, (i, w) in enumerate(row):
            index[d, k], weight[d, k] = i, np.float32(w)
    return index, weight


class _AreaResize:
    """cv2.resize(..., INTER_AREA) from 210x160 to 84x84, bit-exact for uint8 grayscale frames.

    Same taps, same float32 operation order as OpenCV's ``ResizeArea_Invoker``
    (horizontal sums per source row, then weighted rows, then round half to
    even), batched over frames; tested bit-exact against AtariVectorEnv.
    """

    def __init__(self, src_shape=(210, 160), dst_shape=(84, 84)):
        self.rows, self.row_weights = _area_resize_taps(src_shape[0], dst_shape[0])
        self.cols, self.col_weights = _area_resize_taps(src_shape[1], dst_shape[1])

    def __call__(self, frames: np.ndarray) -> np.ndarray:  # [N, 210, 160] uint8 -> [N, 84, 84] uint8
        pixels = frames.astype(np.float32)
        across = pixels[:, :, self.cols[:, 0]] * self.col_weights[:, 0]
        for k in range(1, self.cols.shape[1]):
            across = across + pixels[:, :, self.cols[:, k]] * self.col_weights[:, k]
        out = across[:, self.rows[:, 0], :] * self.row_weights[:, 0, None]
        for k in range(1, self.rows.shape[1]):
            out = out + across[:, self.rows[:, k], :] * self.row_weights[:, k, None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class ALEInterfaceVectorEnv:
    """AtariVectorEnv's preprocessing re-done over ``ale_py.ALEInterface``, for game modes and difficulties.

    AtariVectorEnv (ale-py 0.12) takes no mode or difficulty; ``ALEInterface``
    does (``setMode`` / ``setDifficulty``).  This class reproduces ale-py 0.12.1's
    C++ ``PreprocessedEnv`` step for step -- FIRE then up to ``noop_max - 1``
    no-ops at reset, frame skip 4 stopping at a game over or the frame cap,
    max-pool of the last two frames kept in place, INTER_AREA resize, a stack of
    4 padded with zeros, NEXT_STEP autoreset, truncation once ``max frames``
    emulator frames were played -- so that a mode switch changes the game and
    nothing else.  tests/test_nonstationary_atari.py checks it bit-exact against
    AtariVectorEnv (observations, rewards, flags, lives) on several games.  Only
    the no-op counts come from another RNG (numpy instead of std::mt19937), same
    distribution.  Same numpy interface as AtariVectorEnv (reset/step/close,
    ``single_action_space``); emulation runs in this thread, one env after the other.
    """

    def __init__(self, game: str, num_envs: int, *, mode: int | None = None, difficulty: int | None = None,
                 max_num_frames_per_episode: int = 108_000, repeat_action_probability: float = 0.0,
                 full_action_space: bool = False, noop_max: int = NOOP_MAX, fire_reset: bool = True):
        check_mode_and_difficulty(game, mode, difficulty)
        self.game, self.num_envs, self.mode, self.difficulty = game, num_envs, mode, difficulty
        self.max_frames, self.noop_max = max_num_frames_per_episode, noop_max
        self._rom = str(roms.get_rom_path(game))
        self._ales = [_new_ale(repeat_action_probability) for _ in range(num_envs)]
        for ale in self._ales:
            ale.setInt("random_seed", 0)  # replaced at the first seeded reset, as AtariVectorEnv does
            self._load(ale)
        actions = self._ales[0].getLegalActionSet() if full_action_space else self._ales[0].getMinimalActionSet()
        self._action_set = list(actions)
        self._fire_reset = fire_reset and ale_py.Action.FIRE in self._action_set  # AtariVectorEnv's use_fire_reset
        self.single_action_space = Discrete(len(self._action_set))
        self._noop_rngs = [np.random.default_rng(e) for e in range(num_envs)]
        self._raw = np.zeros((num_envs, 2, 210, 160), dtype=np.uint8)  # the last two frames of a step
        self._stacks = np.zeros((num_envs, *OBS_SHAPE), dtype=np.uint8)
        self._elapsed_frames = np.zeros(num_envs, dtype=np.int64)
        self._episode_over = np.ones(num_envs, dtype=bool)
        self._resize = _AreaResize()

    def _load(self, ale: ale_py.ALEInterface) -> None:
        ale.loadROM(self._rom)
        if self.mode is not None:
            ale.setMode(self.mode)
        if self.difficulty is not None:
            ale.setDifficulty(self.difficulty)

    def _reset_env(self, e: int) -> None:
        ale = self._ales[e]
        ale.reset_game()
        if self._fire_reset:
            ale.act(ale_py.Action.FIRE)
        noops = (int(self._noop_rngs[e].integers(self.noop_max)) if self.noop_max > 0 else 0) - self._fire_reset
        for _ in range(noops):
            ale.act(ale_py.Action.NOOP)
            if ale.game_over():
                ale.reset_game()
        ale.getScreenGrayscale(self._raw[e, 0])
        self._raw[e, 1] = 0
        self._stacks[e] = 0
        self._elapsed_frames[e] = 0

    def _push_frames(self) -> None:
        """Max-pool (in place, as the C++ does) and resize every env's frame, then push it on the stacks."""
        np.maximum(self._raw[:, 0], self._raw[:, 1], out=self._raw[:, 0])
        self._stacks[:, :-1] = self._stacks[:, 1:]
        self._stacks[:, -1] = self._resize(self._raw[:, 0])

    def _info(self) -> dict:
        return {"env_id": np.arange(self.num_envs, dtype=np.int32),
                "lives": np.array([ale.lives() for ale in self._ales], dtype=np.int32),
                "frame_number": np.array([ale.getFrameNumber() for ale in self._ales], dtype=np.int32),
                "episode_frame_number": np.array([ale.getEpisodeFrameNumber() for ale in self._ales], dtype=np.int32)}

    def reset(self, *, seed: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        for e, ale in enumerate(self._ales):
            if seed is not None:
                ale.setInt("random_seed", int(seed[e]))
                self._load(ale)
                self._noop_rngs[e] = np.random.default_rng(int(seed[e]))
            self._reset_env(e)
        self._push_frames()
        self._episode_over[:] = False
        return self._stacks.copy(), self._info()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        rewards = np.zeros(self.num_envs, dtype=np.int32)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        for e, ale in enumerate(self._ales):
            if self._episode_over[e]:  # NEXT_STEP autoreset: this step only resets
                self._reset_env(e)
                continue
            action = self._action_set[int(actions[e])]
            game_over = False
            for skip in range(FRAME_SKIP, 0, -1):
                rewards[e] += ale.act(action)
                game_over = ale.game_over()
                self._elapsed_frames[e] += 1
                if game_over or self._elapsed_frames[e] >= self.max_frames:
                    break
                if skip <= 2:
                    ale.getScreenGrayscale(self._raw[e, skip - 1])
            terminated[e] = game_over
            truncated[e] = self._elapsed_frames[e] >= self.max_frames and not game_over
        self._push_frames()
        self._episode_over = terminated | truncated
        return self._stacks.copy(), rewards, terminated, truncated, self._info()

    def screen_rgb(self, e: int) -> np.ndarray:
        """The raw RGB screen [210, 160, 3] of env ``e`` (the last emulated frame, before any preprocessing)."""
        return self._ales[e].getScreenRGB()

    def ale_settings(self) -> list[tuple[int, int]]:
        """(mode, difficulty) of each emulator, as ALE itself reports them (from its saved state)."""
        states = [ale.cloneState() for ale in self._ales]
        return [(int(state.getCurrentMode()), int(state.getDifficulty())) for state in states]

    def close(self) -> None:
        self._ales = []


def _grayscale(frames: np.ndarray) -> np.ndarray:
    """gymnasium's GrayscaleObservation (>= 1.0) on RGB frames [..., 3], bit-exact, truncated to uint8.

    gymnasium computes ``np.sum(frames * [0.2125, 0.7154, 0.0721], axis=-1)`` in float64, which
    adds the three products left to right; written out here, that is 3x faster than the reduction.
    """
    return ((frames[..., 0] * 0.2125 + frames[..., 1] * 0.7154) + frames[..., 2] * 0.0721).astype(np.uint8)


class CleanRLVectorEnv(ALEInterfaceVectorEnv):
    """CleanRL's Atari stack (``dqn_atari.py``'s ``make_env``) step for step, over ``ale_py.ALEInterface``.

    CleanRL wraps ``gym.make("<Game>NoFrameskip-v4")`` (one frame per step, no sticky
    actions, minimal action set, ALE's cap of 108,000 frames per episode) in
    Stable-Baselines3's ``NoopResetEnv(noop_max=30)``, ``MaxAndSkipEnv(skip=4)``,
    ``EpisodicLifeEnv``, ``FireResetEnv`` (games with FIRE) and ``ClipRewardEnv``,
    then gymnasium's ``ResizeObservation((84, 84))``, grayscale and a stack of 4.
    Each method below is one of those wrappers, for one env ``e``:

    - ``_frame``: the v4 env's step: one ``act``; terminated = game over, truncated =
      ALE's frame cap (``game_truncated``).
    - ``_noop_reset``: ``reset_game``, then 1..``noop_max`` NOOP frames drawn from the
      env's numpy generator (a game over among them resets again).
    - ``_skip``: 4 frames of one action, rewards summed, stopping at an end; the
      observation is the max of the RGB screens of frames 3 and 4 kept in a buffer that
      persists across steps (an early stop leaves the older screens in it, as SB3 does).
    - ``_life_step`` / ``_life_reset`` (``episodic_life``): a lost life (0 < lives <
      previous lives) is terminal; the reset after it is ONE no-op agent step (4 frames),
      a real reset only after a game over.
    - ``_reset`` (``fire_reset``, games with FIRE): that reset, then the agent steps FIRE
      (action 1) and action 2 (RIGHT in Breakout), resetting again if either ended the
      episode -- after EVERY reset, so also after each lost life.  ALE's own stack
      (AtariVectorEnv) presses FIRE once per game only.
    - pixels: the RGB observation resized with INTER_AREA (``_AreaResize``, bit-exact with
      cv2 per channel), then gymnasium's grayscale weights; the game score is returned
      raw (``AtariEnv`` gives sign(r) to learn from, as ``ClipRewardEnv``).

    Seeds as ``ale_py.env.AtariEnv.reset(seed=s)`` does: ``SeedSequence(s)`` gives the
    numpy seed of the no-op draws and the ALE seed.  With the same seed and actions the
    emulator plays exactly the frames the wrapper stack plays (tests/test_atari_protocol.py).
    Two differences by design, both the project's conventions: autoreset is NEXT_STEP
    (the reset after an episode's end runs in the following step, a reset step that is
    not a transition, instead of inside the step that ended it), and a new episode's
    stack is padded with zeros where gymnasium's frame stack repeats the first frame
    (the replay buffer rebuilds stacks with zeros before an episode start).
    ``reset()`` always starts a new game; single-threaded, one env after the other.
    """

    def __init__(self, game: str, num_envs: int, *, mode: int | None = None, difficulty: int | None = None,
                 max_num_frames_per_episode: int = 108_000, repeat_action_probability: float = 0.0,
                 full_action_space: bool = False, noop_max: int = NOOP_MAX, fire_reset: bool = True,
                 episodic_life: bool = True):
        super().__init__(game, num_envs, mode=mode, difficulty=difficulty,
                         max_num_frames_per_episode=max_num_frames_per_episode,
                         repeat_action_probability=repeat_action_probability,
                         full_action_space=full_action_space, noop_max=noop_max, fire_reset=fire_reset)
        for ale in self._ales:  # the v4 env's frame cap lives in ALE (truncation), read at ROM load
            ale.setInt("max_num_frames_per_episode", max_num_frames_per_episode)
            self._load(ale)
        if self._fire_reset and (self._action_set[1] != ale_py.Action.FIRE or len(self._action_set) < 3):
            raise ValueError(f"{game}: FireResetEnv needs FIRE as action 1 and at least 3 actions")
        self.episodic_life = bool(episodic_life)
        self._rgb = np.zeros((num_envs, 2, 210, 160, 3), dtype=np.uint8)  # MaxAndSkipEnv's _obs_buffer
        self._obs = np.zeros((num_envs, 210, 160, 3), dtype=np.uint8)  # each env's observation of this step
        self._lives = np.zeros(num_envs, dtype=np.int64)  # EpisodicLifeEnv.lives
        self._was_real_done = np.ones(num_envs, dtype=bool)  # EpisodicLifeEnv.was_real_done

    # ---- the wrappers, innermost first (env e) ----
    def _frame(self, e: int, action: int) -> tuple[int, bool, bool]:
        ale = self._ales[e]
        reward = ale.act(self._action_set[action])
        return reward, ale.game_over(with_truncation=False), ale.game_truncated()

    def _noop_reset(self, e: int, seed: int | None) -> np.ndarray:
        ale = self._ales[e]

        def reset_v4():
            if seed is not None:  # ale_py's AtariEnv.seed_game, then load_game
                np_seed, ale_seed = np.random.SeedSequence(seed).generate_state(n_words=2)
                self._noop_rngs[e] = np.random.default_rng(int(np_seed))
                ale.setInt("random_seed", np.int32(ale_seed))
                self._load(ale)
            ale.reset_game()

        reset_v4()
        noops = int(self._noop_rngs[e].integers(1, self.noop_max + 1)) if self.noop_max > 0 else 0
        for _ in range(noops):
            _, terminated, truncated = self._frame(e, 0)
            if terminated or truncated:
                reset_v4()
        return ale.getScreenRGB()

    def _skip(self, e: int, action: int) -> tuple[np.ndarray, float, bool, bool]:
        ale, total = self._ales[e], 0.0
        terminated = truncated = False
        for i in range(FRAME_SKIP):
            reward, terminated, truncated = self._frame(e, action)
            if i >= FRAME_SKIP - 2:
                ale.getScreenRGB(self._rgb[e, i - (FRAME_SKIP - 2)])
            total += float(reward)
            if terminated or truncated:
                break
        return self._rgb[e].max(axis=0), total, terminated, truncated

    def _life_step(self, e: int, action: int) -> tuple[np.ndarray, float, bool, bool, bool]:
        """(obs, reward, terminated, truncated, game over): EpisodicLifeEnv.step when ``episodic_life``."""
        obs, reward, terminated, truncated = self._skip(e, action)
        game_over = terminated or truncated
        if self.episodic_life:
            self._was_real_done[e] = game_over
            lives = self._ales[e].lives()
            if 0 < lives < self._lives[e]:
                terminated = True
            self._lives[e] = lives
        return obs, reward, terminated, truncated, game_over

    def _life_reset(self, e: int, seed: int | None) -> np.ndarray:
        if not self.episodic_life:
            return self._noop_reset(e, seed)
        if self._was_real_done[e]:
            obs = self._noop_reset(e, seed)
        else:  # a lost life: one no-op agent step, a real reset only if that ended the game
            obs, _, terminated, truncated = self._skip(e, 0)
            if terminated or truncated:
                obs = self._noop_reset(e, seed)
        self._lives[e] = self._ales[e].lives()
        return obs

    def _reset(self, e: int, seed: int | None = None) -> np.ndarray:
        """FireResetEnv.reset: the reset below it, then FIRE (action 1) and action 2; returns action 2's obs."""
        if not self._fire_reset:
            return self._life_reset(e, seed)
        self._life_reset(e, seed)
        for action in (1, 2):
            obs, _, terminated, truncated, _ = self._life_step(e, action)
            if terminated or truncated:
                self._life_reset(e, seed)
        return obs

    # ---- vector API ----
    def _push_frames(self) -> None:
        """Resize (INTER_AREA per channel) then grayscale every env's observation; push it on the stacks."""
        channels = np.ascontiguousarray(self._obs.transpose(0, 3, 1, 2)).reshape(-1, 210, 160)
        resized = self._resize(channels).reshape(self.num_envs, 3, *OBS_SHAPE[1:]).transpose(0, 2, 3, 1)
        self._stacks[:, :-1] = self._stacks[:, 1:]
        self._stacks[:, -1] = _grayscale(resized)

    def reset(self, *, seed: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        for e in range(self.num_envs):
            self._was_real_done[e] = True  # a new game, whatever the last step was
            self._obs[e] = self._reset(e, None if seed is None else int(seed[e]))
        self._stacks[:] = 0
        self._push_frames()
        self._episode_over[:] = False
        return self._stacks.copy(), self._info()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Like ALEInterfaceVectorEnv.step; ``terminated`` includes lost lives, ``info["game_over"]`` the game's end."""
        rewards = np.zeros(self.num_envs, dtype=np.int32)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        game_over = np.zeros(self.num_envs, dtype=bool)
        for e in range(self.num_envs):
            if self._episode_over[e]:  # NEXT_STEP autoreset: CleanRL's reset, after a game over or a lost life
                self._obs[e] = self._reset(e)
                self._stacks[e] = 0
                continue
            self._obs[e], reward, terminated[e], truncated[e], game_over[e] = self._life_step(e, int(actions[e]))
            rewards[e] = reward
        self._push_frames()
        self._episode_over = terminated | truncated
        return self._stacks.copy(), rewards, terminated, truncated, {**self._info(), "game_over": game_over}


# ---------------------------------------------------------------------------
# the torch-facing vector env
# ---------------------------------------------------------------------------
class AtariEnv:
    """Torch-facing wrapper over ``ale_py.vector_env.AtariVectorEnv`` (spec environments.md §2).

    ``mode`` / ``difficulty`` select an ALE game mode / difficulty (None: the ROM's
    default); AtariVectorEnv cannot, so those envs run on ``ALEInterfaceVectorEnv``,
    which reproduces its preprocessing exactly but emulates in one thread.  So do envs
    built with ``screens=True``, whose raw RGB screens ``screen(e)`` reads (videos).

    ``env_stack="cleanrl"`` runs ``CleanRLVectorEnv`` instead: CleanRL's wrapper stack
    (SB3's NoopReset/MaxAndSkip/EpisodicLife/FireReset) step for step, which presses
    FIRE after every reset including the one after each lost life (``episodic_life``);
    ALE's stack presses FIRE once per game (``fire_reset=False``: never).

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
                 device: torch.device | str = "cpu", num_threads: int = 0, noop_max: int = NOOP_MAX,
                 mode: int | None = None, difficulty: int | None = None, screens: bool = False,
                 fire_reset: bool = True, env_stack: str = "ale"):
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if not 0.0 <= float(sticky_actions) <= 1.0:
            raise ValueError(f"sticky_actions is a probability in [0, 1], got {sticky_actions}")
        if not isinstance(max_episode_frames, int) or max_episode_frames < 1:
            raise ValueError(f"max_episode_frames must be a positive int (108_000 = 30 min of play), "
                             f"got {max_episode_frames!r}")
        if noop_max < 0:
            raise ValueError(f"noop_max must be >= 0, got {noop_max}")
        if env_stack not in ENV_STACKS:
            raise ValueError(f"env_stack must be one of {', '.join(ENV_STACKS)}, got {env_stack!r}")
        self.game = atari_game(env_id)
        check_mode_and_difficulty(self.game, mode, difficulty)
        self.mode, self.difficulty = mode, difficulty
        self.env_id = env_id
        self.num_envs = num_envs
        self.seed = int(seed)
        self.sticky_actions = float(sticky_actions)
        self.full_action_space = bool(full_action_space)
        self.episodic_life = bool(episodic_life)
        self.max_episode_frames = max_episode_frames
        self.device = torch.device(device)
        self.obs_shape = OBS_SHAPE
        self.screens = bool(screens)
        self.fire_reset, self.env_stack = bool(fire_reset), env_stack
        self._vector_env = self._make_vector_env(num_threads=num_threads, noop_max=noop_max)
        self.num_actions = int(self._vector_env.single_action_space.n)
        # Host-side episode bookkeeping (E numbers per step; the emulator is on the host anyway).
        self._episode_over = np.zeros(num_envs, dtype=bool)  # the last step ended a game: next is a reset step
        self._lives = np.zeros(num_envs, dtype=np.int32)
        self._has_reset = False

    def _make_vector_env(self, num_threads: int, noop_max: int):
        if self.env_stack == "cleanrl":
            return CleanRLVectorEnv(
                self.game, self.num_envs, mode=self.mode, difficulty=self.difficulty,
                max_num_frames_per_episode=self.max_episode_frames, repeat_action_probability=self.sticky_actions,
                full_action_space=self.full_action_space, noop_max=noop_max, fire_reset=self.fire_reset,
                episodic_life=self.episodic_life)
        if self.mode is not None or self.difficulty is not None or self.screens:
            return ALEInterfaceVectorEnv(
                self.game, self.num_envs, mode=self.mode, difficulty=self.difficulty,
                max_num_frames_per_episode=self.max_episode_frames, repeat_action_probability=self.sticky_actions,
                full_action_space=self.full_action_space, noop_max=noop_max, fire_reset=self.fire_reset)
        return AtariVectorEnv(
            self.game, self.num_envs, num_threads=num_threads,
            max_num_frames_per_episode=self.max_episode_frames,
            repeat_action_probability=self.sticky_actions, full_action_space=self.full_action_space,
            autoreset_mode="NextStep", noop_max=noop_max, use_fire_reset=self.fire_reset,
            # Raw scores; life loss handled in step() (ALE's episodic_life restarts the game at each life).
            reward_clipping=False, episodic_life=False, life_loss_info=False,
        )

    # ------------------------------------------------------------------ API
    @property
    def vector_env(self) -> AtariVectorEnv | ALEInterfaceVectorEnv:
        """The numpy-level vector env underneath (AtariVectorEnv, or ALEInterfaceVectorEnv for modes)."""
        return self._vector_env

    def screen(self, e: int = 0) -> np.ndarray | None:
        """Env ``e``'s raw RGB screen [210, 160, 3] uint8 (for videos), None where the emulators are out of reach.

        ``screens=True`` (or a mode/difficulty) runs the games on ``ALEInterfaceVectorEnv``, whose ALE
        interfaces this reads; AtariVectorEnv's C++ threads expose only the preprocessed frames.
        """
        if not isinstance(self._vector_env, ALEInterfaceVectorEnv):
            return None
        return self._vector_env.screen_rgb(e)

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
        return self._finish_step(obs, reward, ale_terminated, ale_truncated, info["lives"], info.get("game_over"))

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

    def _finish_step(self, obs, reward, ale_terminated, ale_truncated, lives, game_over=None):
        reset_step = self._episode_over.copy()
        terminated = ale_terminated.copy()
        if game_over is None:  # AtariVectorEnv / ALEInterfaceVectorEnv: the flags are the game's
            game_over = ale_terminated | ale_truncated
            episode_over = game_over
            if self.episodic_life:
                # A lost life ends the learning episode; the game goes on (no reset step follows).
                terminated |= (lives < self._lives) & ~reset_step
        else:  # CleanRLVectorEnv: a lost life is terminal already, and a (FIRE) reset step follows it
            episode_over = ale_terminated | ale_truncated
        truncated = ale_truncated & ~terminated
        self._episode_over = episode_over.copy()  # the returned tensors may share game_over's memory
        self._lives = np.asarray(lives, dtype=np.int32)
        if self.device.type == "cpu":  # zero-copy views of the host arrays
            reward_t = torch.from_numpy(reward.astype(np.float32))
            flags = [torch.from_numpy(flag) for flag in (terminated, truncated, reset_step, game_over)]
            lives_t = torch.from_numpy(self._lives.copy())
        else:  # one small host-to-device copy of all per-env scalars instead of six
            packed = np.stack([reward, terminated, truncated, reset_step, game_over, lives]).astype(np.float32)
            packed = torch.from_numpy(packed).to(self.device)
            reward_t, flags, lives_t = packed[0], [row.bool() for row in packed[1:5]], packed[5].int()
        terminated_t, truncated_t, reset_step_t, game_over_t = flags
        info = {"reset_step": reset_step_t, "game_over": game_over_t, "lives": lives_t,
                "learn_reward": self.learning_reward(reward_t)}
        return self._to_device(obs), reward_t, terminated_t, truncated_t, info

    def _to_device(self, obs: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(obs).to(self.device)

    def __repr__(self) -> str:
        mode = "" if self.mode is None and self.difficulty is None else \
            f", mode={self.mode}, difficulty={self.difficulty}"
        return (f"AtariEnv({self.game!r}{mode}, num_envs={self.num_envs}, sticky_actions={self.sticky_actions}, "
                f"full_action_space={self.full_action_space}, episodic_life={self.episodic_life}, "
                f"max_episode_frames={self.max_episode_frames}, fire_reset={self.fire_reset}, "
                f"env_stack={self.env_stack!r}, device={self.device})")
