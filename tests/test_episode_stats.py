"""EpisodeStats: each finished episode reported exactly once with its true return and length (pitfall 13).

The outputs are dense [M, E] tensors (members x envs) with an ``ended`` mask: no data-dependent shapes.
"""

import pytest
import torch

from envs.atari import AtariEnv
from envs.episode_stats import EpisodeStats


def finished(returns, lengths, ended):
    """The (member, env, return, length) of every episode the dense outputs report."""
    return [(m, e, returns[m, e].item(), lengths[m, e].item()) for m, e in ended.nonzero().tolist()]


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
        returns, lengths, ended = stats.update(torch.tensor([rewards]), torch.tensor([ends]), torch.tensor([valid]))
        assert returns.shape == lengths.shape == ended.shape == (1, 2)
        assert returns.dtype == torch.float64 and lengths.dtype == torch.int64 and ended.dtype == torch.bool
        assert not returns[~ended].any() and not lengths[~ended].any()  # zeros where nothing ended
        logged.append(finished(returns, lengths, ended))
    assert logged == [[], [(0, 0, 3.0, 2)], [], [(0, 0, 5.0, 1)], [(0, 1, 7.0, 5)]]


def test_members_are_independent_and_the_outputs_are_fresh_tensors():
    stats = EpisodeStats(num_envs=2, members=3)
    rewards = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    no = torch.zeros(3, 2, dtype=torch.bool)
    stats.update(rewards, no)
    ends = torch.tensor([[True, False], [False, False], [False, True]])
    returns, lengths, ended = stats.update(rewards, ends)
    assert torch.equal(ended, ends)
    assert torch.equal(returns, torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 12.0]], dtype=torch.float64))
    assert torch.equal(lengths, torch.tensor([[2, 0], [0, 0], [0, 2]]))
    kept = returns.clone(), lengths.clone()
    # Running sums restart where an episode ended and go on elsewhere; earlier outputs do not change.
    returns, lengths, ended = stats.update(rewards, torch.ones(3, 2, dtype=torch.bool))
    assert torch.equal(returns, torch.tensor([[1.0, 6.0], [9.0, 12.0], [15.0, 6.0]], dtype=torch.float64))
    assert torch.equal(lengths, torch.tensor([[1, 3], [3, 3], [3, 1]]))
    assert torch.equal(kept[0], torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 12.0]], dtype=torch.float64))
    assert torch.equal(kept[1], torch.tensor([[2, 0], [0, 0], [0, 2]]))


def test_invalid_steps_add_nothing_even_when_flagged_as_ends():
    stats = EpisodeStats(num_envs=1)
    returns, lengths, ended = stats.update(torch.tensor([[4.0]]), torch.tensor([[True]]), torch.tensor([[False]]))
    assert not ended.any() and returns.item() == 0 and lengths.item() == 0
    returns, lengths, ended = stats.update(torch.tensor([[1.0]]), torch.tensor([[True]]))  # valid=None: a real step
    assert ended.item() and returns.item() == 1.0 and lengths.item() == 1


def test_large_integer_scores_are_exact():
    stats = EpisodeStats(num_envs=1)
    for _ in range(1000):
        stats.update(torch.tensor([[20_001.0]]), torch.tensor([[False]]))
    returns, _, _ = stats.update(torch.tensor([[1.0]]), torch.tensor([[True]]))
    assert returns.item() == 20_001 * 1000 + 1  # past float32's 2**24 integer range


def test_state_dict_round_trip_continues_the_episodes_in_flight():
    stats = EpisodeStats(num_envs=2, members=2)
    stats.update(torch.tensor([[2.0, 3.0], [4.0, 5.0]]), torch.zeros(2, 2, dtype=torch.bool))
    restored = EpisodeStats(num_envs=2, members=2)
    restored.load_state_dict(stats.state_dict())
    returns, lengths, ended = restored.update(torch.ones(2, 2), torch.tensor([[True, False], [False, True]]))
    assert finished(returns, lengths, ended) == [(0, 0, 3.0, 2), (1, 1, 6.0, 2)]
    with pytest.raises(ValueError, match="num_envs"):
        EpisodeStats(num_envs=3, members=2).load_state_dict(stats.state_dict())
    with pytest.raises(ValueError, match="population"):
        EpisodeStats(num_envs=2, members=1).load_state_dict(stats.state_dict())
    with pytest.raises(ValueError, match="shape"):
        stats.update(torch.zeros(2), torch.zeros(2, dtype=torch.bool))  # no member dimension
    with pytest.raises(ValueError, match="members"):
        EpisodeStats(num_envs=2, members=0)


def run_and_log(env, steps, ends_key):
    """Log with EpisodeStats (one member) and, independently, with plain Python sums over the same stream."""
    stats = EpisodeStats(env.num_envs)
    env.reset()
    generator = torch.Generator().manual_seed(1)
    logged, expected = [], []
    running = [[0.0, 0] for _ in range(env.num_envs)]
    for step in range(steps):
        actions = torch.randint(0, env.num_actions, (env.num_envs,), generator=generator)
        _, reward, terminated, truncated, info = env.step(actions)
        ends = info["game_over"] if ends_key == "game_over" else terminated | truncated
        returns, lengths, ended = stats.update(reward[None], ends[None], valid=~info["reset_step"][None])
        logged += [(step, r, n) for _, _, r, n in finished(returns, lengths, ended)]
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
