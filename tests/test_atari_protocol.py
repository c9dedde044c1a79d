"""Atari protocol presets (--protocol) and CleanRL's env stack, step for step against CleanRL's own wrappers."""

from __future__ import annotations

import json

import ale_py
import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro
from ale_py.vector_env import AtariVectorEnv
from stable_baselines3.common.atari_wrappers import (
    ClipRewardEnv,
    EpisodicLifeEnv,
    FireResetEnv,
    MaxAndSkipEnv,
    NoopResetEnv,
)

from agents import dqn
from agents.harness import experiment
from agents.harness.config import ATARI_100K_GAMES, ATARI_DEFAULTS, PROTOCOLS, SameAs, run_tag
from envs.atari import ALEInterfaceVectorEnv, AtariEnv, env_seeds, is_atari_id

gym.register_envs(ale_py)


# ------------------------------------------------------------------ the CleanRL stack
def cleanrl_reference(**kwargs) -> gym.Env:
    """CleanRL dqn_atari.py's make_env: SB3's Atari wrappers and gymnasium's resize / grayscale / frame stack."""
    env = gym.make("BreakoutNoFrameskip-v4", **kwargs)
    env = NoopResetEnv(env, noop_max=30)
    env = MaxAndSkipEnv(env, skip=4)
    env = EpisodicLifeEnv(env)
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireResetEnv(env)
    env = ClipRewardEnv(env)
    env = gym.wrappers.ResizeObservation(env, (84, 84))
    env = gym.wrappers.GrayscaleObservation(env)
    return gym.wrappers.FrameStackObservation(env, 4)


@pytest.mark.parametrize("seed, sticky, max_frames, steps", [(3, 0.0, 108_000, 400), (5, 0.25, 700, 300)])
def test_cleanrl_stack_matches_cleanrl_wrappers_step_for_step(seed, sticky, max_frames, steps):
    """Same seed, same actions: the same emulator frames, rewards, terminals, truncations, lives and pixels.

    Reference: CleanRL's wrappers (SB3 NoopResetEnv(30), MaxAndSkipEnv(4), EpisodicLifeEnv, FireResetEnv,
    ClipRewardEnv) on ``gym.make("BreakoutNoFrameskip-v4")``, then gymnasium's ResizeObservation
    (cv2 INTER_AREA on the RGB frame), GrayscaleObservation and FrameStackObservation(4), reset by hand
    whenever an episode ends (a lost life included) -- which is what our NEXT_STEP reset step does.
    Exact, with no tolerance: the ALE RAM and episode frame counter after every step (so the no-op
    counts, FIRE after every lost life and the early stops of frame skip all agree), the clipped
    reward, terminated, truncated, lives, and every 84x84 frame bit for bit.  The one difference, by
    design: at an episode start our stack is padded with zeros where FrameStackObservation repeats the
    first frame (the replay buffer rebuilds stacks that way); checked below frame by frame.

    What the pixels do NOT match: gymnasium 0.29's GrayScaleObservation (cv2 RGB2GRAY, CleanRL's pin)
    and ALE's own grayscale both weigh RGB 0.299/0.587/0.114; gymnasium >= 1.0 uses 0.2125/0.7154/0.0721
    (truncated), up to 12 grey levels apart (mean 1.1) on Breakout frames.  We follow gymnasium >= 1.0,
    the version this project depends on and the one scripts/benchmarks/bench_reference.py runs.
    """
    env_seed = int(env_seeds(seed, 1)[0])  # the seed AtariEnv gives its env 0
    reference = cleanrl_reference(repeat_action_probability=sticky, max_num_frames_per_episode=max_frames)
    ours = AtariEnv("BreakoutNoFrameskip-v4", num_envs=1, seed=seed, sticky_actions=sticky, episodic_life=True,
                    max_episode_frames=max_frames, env_stack="cleanrl")
    ref_obs, _ = reference.reset(seed=env_seed)
    obs, _ = ours.reset()
    ours_ale, ref_ale = ours.vector_env._ales[0], reference.unwrapped.ale
    actions = np.random.default_rng(seed).integers(0, ours.num_actions, steps)
    ended, age = False, 0  # age: steps since this episode's first observation
    counts = {"lost_life": 0, "game_over": 0, "truncated": 0}
    for t in range(-1, steps):
        if t >= 0:
            if ended:  # the reference resets by hand; our step is the NEXT_STEP reset step (action ignored)
                ref_obs, _ = reference.reset()
                ref_reward, ref_terminated, ref_truncated, age = 0.0, False, False, 0
            else:
                ref_obs, ref_reward, ref_terminated, ref_truncated, _ = reference.step(int(actions[t]))
                age += 1
            obs, reward, terminated, truncated, info = ours.step(torch.tensor([actions[t]]))
            assert info["reset_step"].item() == ended
            assert info["learn_reward"].item() == ref_reward and torch.sign(reward).item() == ref_reward
            assert terminated.item() == ref_terminated, t
            assert truncated.item() == (ref_truncated and not ref_terminated), t
            assert info["lives"].item() == ref_ale.lives()
            ended = ref_terminated or ref_truncated
            counts["lost_life"] += ref_terminated and not info["game_over"].item()
            counts["game_over"] += info["game_over"].item()
            counts["truncated"] += ref_truncated
        assert np.array_equal(ours_ale.getRAM(), ref_ale.getRAM()), t
        assert ours_ale.getEpisodeFrameNumber() == ref_ale.getEpisodeFrameNumber(), t
        ref_stack, stack = np.asarray(ref_obs), obs[0].numpy()
        for k in range(4):  # k = 3 is the newest frame
            if 3 - k <= age:
                assert np.array_equal(stack[k], ref_stack[k]), (t, k)
            else:  # before this episode's start: zeros here, the first frame repeated there
                assert not stack[k].any() and np.array_equal(ref_stack[k], ref_stack[3 - age]), (t, k)
    reference.close()
    ours.close()
    assert counts["lost_life"] >= 3  # lost lives, each followed by the no-op step + FIRE + RIGHT reset
    assert counts["game_over"] + counts["truncated"] >= 1, counts


def test_only_the_cleanrl_stack_presses_fire_after_a_lost_life():
    """With episodic life, ALE's stack waits for the agent to FIRE after a lost life; CleanRL's FireResetEnv
    (above EpisodicLifeEnv) relaunches the ball after every one."""
    noop = torch.zeros(1, dtype=torch.long)
    played = {}
    for stack in ("ale", "cleanrl"):
        env = AtariEnv("BreakoutNoFrameskip-v4", num_envs=1, seed=0, sticky_actions=0.0, episodic_life=True,
                       env_stack=stack)
        env.reset()
        ends = [env.step(noop) for _ in range(300)]
        played[stack] = (sum(int(step[2]) for step in ends), sum(int(step[4]["game_over"]) for step in ends))
        env.close()
    assert played["ale"] == (1, 0)  # the first ball is lost, then nothing happens: no FIRE
    lost, games = played["cleanrl"]
    assert lost >= 5 and games >= 1  # FIRE after every lost life: the whole game plays out


def test_fire_reset_off_reaches_both_ale_backends_identically():
    """--no-fire-reset: AtariVectorEnv(use_fire_reset=False) and its ALEInterface re-implementation agree."""
    kwargs = dict(noop_max=1, repeat_action_probability=0.0)
    ours = ALEInterfaceVectorEnv("breakout", 2, fire_reset=False, **kwargs)
    theirs = AtariVectorEnv("breakout", 2, reward_clipping=False, use_fire_reset=False, **kwargs)
    seeds = env_seeds(1, 2)
    (obs_ours, info_ours), (obs_theirs, info_theirs) = ours.reset(seed=seeds), theirs.reset(seed=seeds)
    assert np.array_equal(obs_ours, obs_theirs)
    assert info_ours["episode_frame_number"].tolist() == info_theirs["episode_frame_number"].tolist() == [0, 0]
    for actions in np.random.default_rng(0).integers(0, 4, (60, 2)):
        for a, b in zip(ours.step(actions)[:4], theirs.step(actions)[:4]):
            assert np.array_equal(a, b)
    theirs.close()
    # And through AtariEnv: the C++ path (no mode) and the mode path play the same FIRE-less game.
    streams = []
    for mode in (None, 0):
        env = AtariEnv("Breakout", num_envs=1, seed=2, sticky_actions=0.0, fire_reset=False, noop_max=1, mode=mode)
        first, _ = env.reset()
        streams.append(torch.stack([first] + [env.step(torch.tensor([a]))[0] for a in [0, 2, 3, 1, 0, 0]]))
        env.close()
    assert torch.equal(*streams)


# ------------------------------------------------------------------ presets
def resolved(*argv: str) -> dqn.Args:
    args = tyro.cli(dqn.Args, args=["--no-cuda", *argv])
    experiment.resolve_args(args, agent="dqn")
    return args


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_presets_resolve_as_documented(protocol):
    args = resolved("--protocol", protocol)
    expected = {**ATARI_DEFAULTS, "total_timesteps": 10_000_000, **PROTOCOLS[protocol]}
    for name, value in expected.items():
        want = getattr(args, value.field) if isinstance(value, SameAs) else value
        assert getattr(args, name) == want, name
    if protocol == "none":  # today's defaults, unchanged
        assert (args.env_stack, args.sticky_actions, args.full_action_space, args.episodic_life, args.fire_reset,
                args.noop_max, args.max_episode_frames) == ("ale", 0.25, False, False, True, 30, 108_000)
        assert run_tag(args) == "base"
    else:
        assert f"proto_{protocol}" in run_tag(args)
    if protocol == "atari100k":  # 100 evaluation episodes, once, at the end
        assert (args.total_timesteps, args.eval_episodes, args.eval_every) == (100_000, 100, 100_000)


def test_an_explicit_flag_wins_over_the_preset_even_when_it_equals_a_default():
    args = resolved("--protocol", "cleanrl", "--sticky-actions", "0.25", "--no-episodic-life", "--env-stack", "ale",
                    "--total-timesteps", "5000", "--noop-max", "30")
    assert (args.sticky_actions, args.episodic_life, args.env_stack, args.total_timesteps) == (0.25, False, "ale",
                                                                                              5000)
    assert args.noop_max == 30 and args.fire_reset is True and args.full_action_space is False  # the rest: preset
    machado = resolved("--protocol", "machado", "--no-full-action-space", "--fire-reset", "--max-episode-frames",
                       "18000")
    assert (machado.full_action_space, machado.fire_reset, machado.max_episode_frames) == (False, True, 18_000)
    assert machado.sticky_actions == 0.25 and machado.noop_max == 0 and machado.episodic_life is False
    short = resolved("--protocol", "atari100k", "--total-timesteps", "2000", "--eval-episodes", "5")
    assert (short.total_timesteps, short.eval_episodes, short.eval_every) == (2000, 5, 2000)  # still at the end
    # Evaluation flags too: an explicit value equal to the no-protocol default still beats the preset.
    no_eval = resolved("--protocol", "atari100k", "--eval-every", "0", "--eval-episodes", "10")
    assert (no_eval.eval_every, no_eval.eval_episodes) == (0, 10)


def test_atari_100k_lists_its_26_games():
    assert len(ATARI_100K_GAMES) == len(set(ATARI_100K_GAMES)) == 26
    assert all(is_atari_id(game) for game in ATARI_100K_GAMES)


def test_a_cleanrl_run_writes_the_resolved_protocol_to_config_json(tmp_path):
    argv = ["--protocol", "cleanrl", "--env-id", "BreakoutNoFrameskip-v4", "--total-timesteps", "120",
            "--learning-starts", "60", "--buffer-size", "120", "--batch-size", "8", "--diag-every", "0",
            "--log-every", "60", "--checkpoint-every", "0", "--no-cuda", "--noop-max", "5",
            "--runs-dir", str(tmp_path), "--run-name", "cleanrl"]
    experiment.cli(dqn.Args, dqn.main, argv)
    config = json.loads((tmp_path / "cleanrl" / "config.json").read_text())
    assert config["protocol"] == "cleanrl"
    assert {name: config[name] for name in ("env_stack", "sticky_actions", "full_action_space", "episodic_life",
                                            "fire_reset", "max_episode_frames")} == {
        "env_stack": "cleanrl", "sticky_actions": 0.0, "full_action_space": False, "episodic_life": True,
        "fire_reset": True, "max_episode_frames": 108_000}
    assert config["total_timesteps"] == 120 and config["noop_max"] == 5  # given on the command line
    assert json.loads((tmp_path / "cleanrl" / "status.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------ bad input
def _one_error_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        experiment.cli(dqn.Args, dqn.main, ["--no-cuda", *argv])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_an_unknown_preset_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiment.cli(dqn.Args, dqn.main, ["--protocol", "dopamine", "--runs-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice 'dopamine'" in err and "--protocol" in err
    assert all(name in err for name in PROTOCOLS) and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_protocol_on_the_image_mdp_is_one_error(tmp_path, capsys):
    line = _one_error_line(["--protocol", "atari100k", "--env-id", "ImageMDP/mnist",
                            "--runs-dir", str(tmp_path / "runs")], capsys)
    assert "--protocol atari100k is an Atari protocol" in line and "ImageMDP/mnist" in line
    assert not (tmp_path / "runs").exists()


def test_the_cleanrl_stack_with_an_atari_shift_is_one_error(tmp_path, capsys):
    line = _one_error_line(["--protocol", "cleanrl", "--atari-shift", "obs_invert", "--switch-every", "100",
                            "--runs-dir", str(tmp_path / "runs")], capsys)
    assert "--env-stack cleanrl (set by --protocol cleanrl) is not available with --atari-shift" in line
    assert not (tmp_path / "runs").exists()
