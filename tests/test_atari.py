"""AtariEnv against real ROMs (ale-py ships them): ids, seeding (pitfall 10), NEXT_STEP reset steps, episodic life."""

import pytest
import torch

from envs.atari import AtariEnv, atari_game, env_seeds, is_atari_id, valid_games


def random_actions(env, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, env.num_actions, (steps, env.num_envs), generator=generator)


def rollout(env, steps, seed=None, action_seed=0):
    """Every step's outputs, stacked along a leading time axis."""
    obs, _ = env.reset(seed=seed)
    out = {"obs": [obs], "reward": [], "terminated": [], "truncated": [], "reset_step": [], "game_over": [],
           "lives": []}
    for actions in random_actions(env, steps, action_seed):
        obs, reward, terminated, truncated, info = env.step(actions)
        for name, value in (("obs", obs), ("reward", reward), ("terminated", terminated), ("truncated", truncated),
                            ("reset_step", info["reset_step"]), ("game_over", info["game_over"]),
                            ("lives", info["lives"])):
            out[name].append(value)
    return {name: torch.stack(values) for name, values in out.items()}


# --------------------------------------------------------------------- ids
@pytest.mark.parametrize("env_id, game", [
    ("ALE/Breakout-v5", "breakout"), ("BreakoutNoFrameskip-v4", "breakout"), ("Breakout", "breakout"),
    ("breakout", "breakout"), ("BreakoutDeterministic-v4", "breakout"), ("Pong-v0", "pong"),
    ("ALE/MsPacman-v5", "ms_pacman"), ("MsPacmanNoFrameskip-v4", "ms_pacman"), ("ms_pacman", "ms_pacman"),
    ("ALE/MontezumaRevenge-v5", "montezuma_revenge"), ("ALE/TicTacToe3D-v5", "tic_tac_toe_3d"),
    ("ALE/Pitfall2-v5", "pitfall2"), ("Pitfall-v4", "pitfall"),
])
def test_atari_game_accepts_every_common_spelling(env_id, game):
    assert atari_game(env_id) == game
    assert is_atari_id(env_id)


def test_unknown_id_is_one_error_with_suggestion_and_the_valid_list():
    with pytest.raises(ValueError) as error:
        atari_game("ALE/Breakot-v5")
    message = str(error.value)
    assert "Did you mean 'ALE/Breakout-v5'" in message
    assert "ALE/Pong-v5" in message and "ALE/SpaceInvaders-v5" in message  # the list of valid ids
    assert not is_atari_id("ALE/Breakot-v5") and not is_atari_id("ImageMDP/mnist")
    with pytest.raises(ValueError, match="RAM observations"):
        atari_game("ALE/Breakout-ram-v5")
    with pytest.raises(ValueError, match="unknown Atari id"):
        AtariEnv("NotAGame-v5")


def test_every_shipped_rom_round_trips_through_its_env_id():
    for game in valid_games():
        assert atari_game("ALE/" + game.title().replace("_", "") + "-v5") == game
        assert atari_game(game) == game


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="sticky_actions"):
        AtariEnv("Pong", sticky_actions=1.5)
    with pytest.raises(ValueError, match="num_envs"):
        AtariEnv("Pong", num_envs=0)
    env = AtariEnv("Pong", num_envs=2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(2, dtype=torch.long))
    env.reset()
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        env.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        env.step(torch.tensor([0, 6]))
    env.close()


# ------------------------------------------------------------------ basics
def test_reset_and_step_shapes_dtypes_and_action_spaces():
    env = AtariEnv("ALE/Breakout-v5", num_envs=3, seed=1)
    assert env.num_actions == 4 and env.obs_shape == (4, 84, 84) and env.game == "breakout"
    obs, info = env.reset()
    assert obs.shape == (3, 4, 84, 84) and obs.dtype == torch.uint8
    # AtariVectorEnv's reset stack: zeros, then the first frame (FrameStackReplayBuffer relies on it).
    assert (obs[:, :3] == 0).all() and (obs[:, 3] > 0).any()
    assert not info["reset_step"].any() and (info["lives"] == 5).all()
    obs, reward, terminated, truncated, info = env.step(torch.ones(3, dtype=torch.long))
    assert reward.dtype == torch.float32 and reward.shape == (3,)
    assert terminated.dtype == torch.bool and truncated.dtype == torch.bool
    assert set(info) >= {"reset_step", "game_over", "lives", "learn_reward"}
    env.close()
    full = AtariEnv("ALE/Breakout-v5", full_action_space=True)
    assert full.num_actions == 18
    full.close()


def test_raw_scores_and_sign_clipped_learning_reward():
    env = AtariEnv("ALE/Asterix-v5", num_envs=2, seed=0, sticky_actions=0.0)
    env.reset()
    rewards, learn = [], []
    for actions in random_actions(env, 150):
        _, reward, _, _, info = env.step(actions)
        rewards.append(reward)
        learn.append(info["learn_reward"])
    rewards, learn = torch.stack(rewards), torch.stack(learn)
    assert rewards.max() >= 50  # Asterix scores 50 per item: the raw score, not clipped
    torch.testing.assert_close(learn, torch.sign(rewards))
    env.close()


# ----------------------------------------------------------- pitfall 10
def test_seed_reaches_every_env_and_same_seed_repeats():
    def stream(seed):
        env = AtariEnv("ALE/Breakout-v5", num_envs=2, seed=seed, sticky_actions=0.25)
        out = rollout(env, 60)
        env.close()
        return out["obs"]

    first, again, other = stream(3), stream(3), stream(4)
    assert torch.equal(first, again)  # one seed twice: the same stream
    assert not torch.equal(first[:, 0], other[:, 0]) and not torch.equal(first[:, 1], other[:, 1])
    assert not torch.equal(first[:, 0], first[:, 1])  # the envs of one run differ
    # AtariVectorEnv alone seeds env i with seed + i, so seed 3's env 1 would be seed 4's env 0.
    assert not torch.equal(first[:, 1], other[:, 0])
    assert len(set(env_seeds(3, 8).tolist()) | set(env_seeds(4, 8).tolist())) == 16


def test_reset_seed_argument_overrides_and_none_continues():
    env = AtariEnv("ALE/Breakout-v5", num_envs=1, seed=0)
    seeded = rollout(env, 30, seed=7)["obs"]
    reseeded = rollout(env, 30, seed=7)["obs"]
    continued = rollout(env, 30, seed=None)["obs"]
    assert torch.equal(seeded, reseeded)
    assert not torch.equal(seeded, continued)
    env.close()


# ----------------------------------------------------- NEXT_STEP autoreset
def test_truncation_then_reset_step_with_true_last_obs():
    frames = 40  # 10 agent steps of 4 frames
    env = AtariEnv("ALE/Breakout-v5", num_envs=2, seed=0, max_episode_frames=frames)
    out = rollout(env, 33)
    truncated_steps = out["truncated"][:, 0].nonzero().squeeze(1).tolist()
    assert truncated_steps == [9, 20, 31]  # 10 steps, then a reset step, then 10 steps ...
    assert not out["terminated"].any()
    for t in truncated_steps:
        after = t + 1
        assert out["reset_step"][after].all() and not out["reset_step"][t].any()
        assert (out["reward"][after] == 0).all()
        assert not out["truncated"][after].any() and not out["game_over"][after].any()
        assert out["game_over"][t].all()
        # obs index t + 1 is the observation returned by step t: the true last one, continuing the stack.
        assert torch.equal(out["obs"][t + 1][:, :3], out["obs"][t][:, 1:])
        # The reset step's obs starts a new episode: zeros and one frame.
        assert (out["obs"][after + 1][:, :3] == 0).all()
    assert out["reset_step"].sum() == 2 * len(truncated_steps)
    env.close()


def test_termination_is_a_game_over_followed_by_a_reset_step():
    env = AtariEnv("ALE/Asterix-v5", num_envs=2, seed=0, sticky_actions=0.0)
    out = rollout(env, 400)
    ends = out["terminated"] | out["truncated"]
    assert out["terminated"].any()
    torch.testing.assert_close(out["game_over"], ends)
    assert torch.equal(out["reset_step"][1:], ends[:-1])  # exactly the steps after an end
    for t, e in out["terminated"].nonzero().tolist():
        assert out["lives"][t, e] == 0
        assert torch.equal(out["obs"][t + 1][e, :3], out["obs"][t][e, 1:])  # true last obs
    env.close()


def test_episodic_life_terminates_on_lost_lives_and_only_game_over_resets():
    kwargs = dict(num_envs=2, seed=5, sticky_actions=0.25)
    plain = rollout(AtariEnv("ALE/Breakout-v5", **kwargs), 500)
    life = rollout(AtariEnv("ALE/Breakout-v5", episodic_life=True, **kwargs), 500)
    # The flag changes the flags only: the emulator plays the same game.
    assert torch.equal(plain["obs"], life["obs"]) and torch.equal(plain["lives"], life["lives"])
    torch.testing.assert_close(plain["game_over"], life["game_over"])
    torch.testing.assert_close(plain["reset_step"], life["reset_step"])
    lost = torch.zeros_like(life["lives"], dtype=torch.bool)
    lost[1:] = (life["lives"][1:] < life["lives"][:-1]) & ~life["reset_step"][1:]
    assert lost.sum() >= 4
    torch.testing.assert_close(life["terminated"], lost | plain["terminated"])
    # Lives lost before the last one: terminal for learning, no game over, no reset step after.
    mid_game = lost & (life["lives"] > 0)
    assert mid_game.any()
    assert not life["game_over"][mid_game].any()
    assert not life["reset_step"][1:][mid_game[:-1]].any()
    assert not (life["terminated"] & life["truncated"]).any()
