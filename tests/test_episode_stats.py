"""EpisodeStats: each finished episode logged exactly once with its true return and length (pitfall 13)."""

import pytest
import torch

from envs.atari import AtariEnv
from envs.episode_stats import EpisodeStats


def test_returns_and_lengths_on_a_hand_made_stream():
    stats = EpisodeStats(num_envs=2)
    # env 0: rewards 1, 2, end | reset step (reward 0, not valid) | 5, end
    # env 1: rewards 10, 0, 0, 0 (still running), then -3 and end
    steps = [
        ([1.0, 10.0], [False, False], [True, True]),
        ([2.0, 0.0], [True, False], [True, True]),
        ([0.0, 0.0], [False, False], [False, True]),
        ([5.0, 0.0], [True, False], [True, True]),
        ([0.0, -3.0], [False, True], [False, True]),
    ]
    logged = []
    for rewards, ends, valid in steps:
        returns, lengths = stats.update(torch.tensor(rewards), torch.tensor(ends), torch.tensor(valid))
        assert returns.shape == lengths.shape and returns.dim() == 1
        logged.append((returns.tolist(), lengths.tolist()))
    assert logged == [([], []), ([3.0], [2]), ([], []), ([5.0], [1]), ([7.0], [5])]


def test_invalid_steps_add_nothing_even_when_flagged_as_ends():
    stats = EpisodeStats(num_envs=1)
    returns, _ = stats.update(torch.tensor([4.0]), torch.tensor([True]), torch.tensor([False]))
    assert returns.numel() == 0
    returns, lengths = stats.update(torch.tensor([1.0]), torch.tensor([True]))  # valid=None: a real step
    assert returns.tolist() == [1.0] and lengths.tolist() == [1]


def test_large_integer_scores_are_exact():
    stats = EpisodeStats(num_envs=1)
    for _ in range(1000):
        stats.update(torch.tensor([20_001.0]), torch.tensor([False]))
    returns, _ = stats.update(torch.tensor([1.0]), torch.tensor([True]))
    assert returns.item() == 20_001 * 1000 + 1  # past float32's 2**24 integer range


def test_state_dict_round_trip_continues_the_episodes_in_flight():
    stats = EpisodeStats(num_envs=2)
    stats.update(torch.tensor([2.0, 3.0]), torch.tensor([False, False]))
    restored = EpisodeStats(num_envs=2)
    restored.load_state_dict(stats.state_dict())
    returns, lengths = restored.update(torch.tensor([1.0, 1.0]), torch.tensor([True, False]))
    assert returns.tolist() == [3.0] and lengths.tolist() == [2]
    with pytest.raises(ValueError, match="num_envs"):
        EpisodeStats(num_envs=3).load_state_dict(stats.state_dict())
    with pytest.raises(ValueError, match="shape"):
        stats.update(torch.zeros(3), torch.zeros(3, dtype=torch.bool))


def run_and_log(env, steps, ends_key):
    """Log with EpisodeStats and, independently, with plain Python sums over the same stream."""
    stats = EpisodeStats(env.num_envs)
    env.reset()
    generator = torch.Generator().manual_seed(1)
    logged, expected = [], []
    running = [[0.0, 0] for _ in range(env.num_envs)]
    for step in range(steps):
        actions = torch.randint(0, env.num_actions, (env.num_envs,), generator=generator)
        _, reward, terminated, truncated, info = env.step(actions)
        ends = info["game_over"] if ends_key == "game_over" else terminated | truncated
        returns, lengths = stats.update(reward, ends, valid=~info["reset_step"])
        logged += [(step, r, n) for r, n in zip(returns.tolist(), lengths.tolist())]
        for e in range(env.num_envs):
            if info["reset_step"][e]:
                continue
            running[e][0] += reward[e].item()
            running[e][1] += 1
            if ends[e]:
                expected.append((step, running[e][0], running[e][1]))
                running[e] = [0.0, 0]
    env.close()
    return sorted(logged), sorted(expected)


def test_atari_episodes_logged_once_with_the_right_value_under_next_step_autoreset():
    # Truncations every 30 steps and real game overs (Asterix ends fast under random play).
    env = AtariEnv("ALE/Asterix-v5", num_envs=2, seed=0, max_episode_frames=120, sticky_actions=0.0)
    logged, expected = run_and_log(env, 200, ends_key="ends")
    assert logged == expected and len(logged) >= 10
    assert all(length == 30 for _, _, length in logged if length > 29)  # no reset step counted
    assert any(score > 0 for _, score, _ in logged)


def test_episodic_life_logs_whole_games_with_game_over():
    env = AtariEnv("ALE/Breakout-v5", num_envs=1, seed=2, episodic_life=True, sticky_actions=0.0)
    logged, expected = run_and_log(env, 400, ends_key="game_over")
    assert logged == expected and len(logged) >= 1
    assert all(length > 100 for _, _, length in logged)  # five lives, not one
