"""Nonstationary Atari on real ROMs: each shift against its definition, switches as truncations, seeding, resume."""

import numpy as np
import pytest
import torch
from ale_py.vector_env import AtariVectorEnv

from envs.atari import ALEInterfaceVectorEnv, AtariEnv, env_seeds
from envs.atari_population import AtariPopulation
from envs.episode_stats import EpisodeStats
from envs.nonstationary_atari import NonstationaryAtariEnv, task_seed
from envs.replay_buffer import FrameStackReplayBuffer


def actions_for(num_actions, steps, num_envs, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_actions, (steps, num_envs), generator=generator)


def play(env, actions):
    """Reset, then step through ``actions``; every output stacked on a time axis (obs includes the reset)."""
    obs, _ = env.reset()
    out = {"obs": [obs], "reward": [], "terminated": [], "truncated": [], "reset_step": [], "learn": [], "task": [],
           "game": []}
    for step_actions in actions:
        obs, reward, terminated, truncated, info = env.step(step_actions)
        for name, value in (("obs", obs), ("reward", reward), ("terminated", terminated), ("truncated", truncated),
                            ("reset_step", info["reset_step"]), ("learn", info["learn_reward"])):
            out[name].append(value)
        out["task"].append(info.get("task_id", 0))
        out["game"].append(info.get("game", ""))
    return {name: torch.stack(v) if name not in ("task", "game") else v for name, v in out.items()}


def reference(game, seed, actions, **kwargs):
    """The plain AtariEnv stream from a seeded reset (what one task of the wrapper must equal)."""
    env = AtariEnv(game, num_envs=actions.shape[1], seed=seed, sticky_actions=0.0, **kwargs)
    out = play(env, actions)
    env.close()
    return out


# ------------------------------------------------------ the mode-capable backend
@pytest.mark.parametrize("game, max_frames, steps, seed", [("asterix", 108_000, 240, 4), ("space_invaders", 240, 140, 11)])
def test_mode_backend_reproduces_atari_vector_env_bit_exactly(game, max_frames, steps, seed):
    """Same frames, rewards, flags, lives and frame counters: game overs (Asterix) and truncations.

    noop_max=1 makes both reset without no-ops (only those counts come from different RNGs).
    """
    kwargs = dict(noop_max=1, repeat_action_probability=0.25, max_num_frames_per_episode=max_frames)
    ours = ALEInterfaceVectorEnv(game, 2, **kwargs)
    theirs = AtariVectorEnv(game, 2, reward_clipping=False, **kwargs)
    seeds = env_seeds(seed, 2)
    obs_ours, info_ours = ours.reset(seed=seeds)
    obs_theirs, info_theirs = theirs.reset(seed=seeds)
    assert np.array_equal(obs_ours, obs_theirs)
    ends = 0
    for actions in actions_for(ours.single_action_space.n, steps, 2).numpy():
        step_ours, step_theirs = ours.step(actions), theirs.step(actions)
        for a, b in zip(step_ours[:4], step_theirs[:4]):
            assert np.array_equal(a, b)
        for key in ("lives", "episode_frame_number", "frame_number"):
            assert np.array_equal(step_ours[4][key], step_theirs[4][key]), key
        ends += int((step_ours[2] | step_ours[3]).sum())
    assert ends >= 2
    theirs.close()


def test_modes_and_difficulties_reach_ale_and_change_the_game():
    base = reference("Freeway", 0, actions_for(3, 12, 1), mode=0)
    mode = AtariEnv("Freeway", num_envs=1, seed=0, sticky_actions=0.0, mode=3)
    assert mode.vector_env.ale_settings() == [(3, 0)]
    changed = play(mode, actions_for(3, 12, 1))
    assert mode.vector_env.ale_settings() == [(3, 0)]  # still after resets and play
    assert not torch.equal(changed["obs"], base["obs"])
    hard = AtariEnv("Breakout", num_envs=1, seed=0, difficulty=1)
    assert hard.vector_env.ale_settings() == [(0, 1)]
    with pytest.raises(ValueError, match=r"valid modes: \[0, 1, 2, 3, 4, 5, 6, 7\]"):
        AtariEnv("Freeway", mode=9)
    with pytest.raises(ValueError, match=r"valid difficulties: \[0, 1\]"):
        AtariEnv("Breakout", difficulty=3)


# ------------------------------------------------------------------ switches
def test_games_shift_switches_rom_keeps_18_actions_and_truncates_open_episodes():
    switch = 150
    env = NonstationaryAtariEnv("ALE/Asterix-v5", num_envs=2, seed=0, shifts=["games"], switch_every=switch,
                                games=["Breakout"], sticky_actions=0.0)
    assert env.num_actions == 18 and env.games == ["asterix", "breakout"]
    first_env = env.env
    out = play(env, actions_for(18, 2 * switch + 2, 2))
    at_switch, after = switch - 1, switch
    # Every episode in flight at the switch step is truncated (an env may have just ended or reset).
    in_flight = ~(out["reset_step"][at_switch] | out["terminated"][at_switch])
    assert in_flight.any() and torch.equal(out["truncated"][at_switch], in_flight)
    assert out["reset_step"][after].all() and (out["reward"][after] == 0).all()
    assert out["task"][at_switch] == 0 and out["task"][after] == 1
    assert out["game"][at_switch] == "asterix" and out["game"][after] == "breakout"
    assert env.env is not first_env and env.num_actions == 18 and out["obs"].shape[2:] == (4, 84, 84)
    # The ROM changed: Breakout's first observation, exactly, and Breakout's rewards (1, 4, 7), not Asterix's 50s.
    breakout = reference("Breakout", task_seed(0, 1, "env"), actions_for(18, 1, 2), full_action_space=True)
    assert torch.equal(out["obs"][after + 1], breakout["obs"][0])
    asterix_rewards = set(out["reward"][:switch].flatten().tolist())
    breakout_rewards = set(out["reward"][switch:2 * switch].flatten().tolist())
    assert 50.0 in asterix_rewards and breakout_rewards <= {0.0, 1.0, 4.0, 7.0}
    assert out["truncated"][2 * switch - 1].any() and out["task"][2 * switch] == 2  # back to Asterix
    assert env.current_game == "asterix"
    env.close()


def test_modes_shift_changes_the_mode_and_nothing_else():
    switch = 6
    env = NonstationaryAtariEnv("Freeway", num_envs=1, seed=3, shifts=["modes"], switch_every=switch, modes=[0, 3],
                                sticky_actions=0.0)
    actions = actions_for(env.num_actions, 2 * switch, 1)
    out = play(env, actions)
    assert env.task_id == 1 and env.env.vector_env.ale_settings() == [(3, 0)]
    # Task 1 is exactly the mode-3 game from its seeded reset, with the same preprocessing path.
    task_1 = reference("Freeway", task_seed(3, 1, "env"), actions[switch + 1:], mode=3)
    assert torch.equal(out["obs"][switch + 1:], task_1["obs"])
    task_0 = reference("Freeway", 3, actions[:switch], mode=0)
    assert torch.equal(out["obs"][:switch + 1], task_0["obs"])
    env.close()


def test_action_permutation_is_a_bijection_that_remaps_emulator_actions():
    switch = 8
    env = NonstationaryAtariEnv("Breakout", num_envs=2, seed=1, shifts=["action_permutation"], switch_every=switch,
                                full_action_space=True, sticky_actions=0.0)
    assert env.action_permutation is None  # task 0: the unmodified game
    actions = actions_for(18, 2 * switch, 2)
    out = play(env, actions)
    perm = env.action_permutation
    assert torch.equal(perm.sort().values, torch.arange(18)) and not torch.equal(perm, torch.arange(18))
    # Agent action i in task 1 plays emulator action perm[i]: the same game as the plain env fed perm[actions].
    task_actions = actions[switch + 1:]
    plain = reference("Breakout", task_seed(1, 1, "env"), perm[task_actions], full_action_space=True)
    assert torch.equal(out["obs"][switch + 1:], plain["obs"])
    same = reference("Breakout", task_seed(1, 1, "env"), task_actions, full_action_space=True)
    assert not torch.equal(plain["obs"], same["obs"])  # the permutation changed the play
    env.close()


def test_inverted_frames_are_255_minus_frame_and_padding_stays_zero():
    switch = 5
    env = NonstationaryAtariEnv("Pong", num_envs=1, seed=2, shifts=["obs_invert"], switch_every=switch,
                                sticky_actions=0.0)
    actions = actions_for(env.num_actions, 3 * switch, 1)
    out = play(env, actions)
    task_1 = reference("Pong", task_seed(2, 1, "env"), actions[switch + 1:2 * switch])
    inverted = out["obs"][switch + 1:2 * switch + 1]
    real = task_1["obs"]
    young = (real.flatten(3).amax(3) == 0)  # the zero frames padding a new episode's stack
    assert young[0, 0].tolist() == [True, True, True, False]
    assert torch.equal(inverted[~young], 255 - real[~young]) and (inverted[young] == 0).all()
    task_2 = reference("Pong", task_seed(2, 2, "env"), actions[2 * switch + 1:])
    assert torch.equal(out["obs"][2 * switch + 1:], task_2["obs"])  # even tasks: not inverted
    env.close()


def test_pixel_permutation_is_fixed_within_a_task_and_a_bijection():
    switch = 6
    env = NonstationaryAtariEnv("Breakout", num_envs=1, seed=4, shifts=["obs_permutation"], switch_every=switch,
                                sticky_actions=0.0)
    actions = actions_for(env.num_actions, 2 * switch + 3, 1)
    out = play(env, actions)
    perm = env.pixel_permutation
    assert env.task_id == 2 and torch.equal(perm.sort().values, torch.arange(84 * 84))
    task_2 = reference("Breakout", task_seed(4, 2, "env"), actions[2 * switch + 1:])
    permuted = out["obs"][2 * switch + 1:]
    # One permutation for every frame of every step of the task: a pure relabelling of pixel positions.
    assert torch.equal(permuted, task_2["obs"].flatten(3)[..., perm].view(permuted.shape))
    assert torch.equal(permuted.flatten(3).sort(-1).values, task_2["obs"].flatten(3).sort(-1).values)
    env_1 = NonstationaryAtariEnv("Breakout", seed=4, shifts=["obs_permutation"], switch_every=switch)
    env_1._start_task(1, build_only=True)
    assert not torch.equal(env_1.pixel_permutation, perm)  # a fresh permutation per task
    env.close()


def test_learning_reward_is_clipped_then_scaled_and_offset_per_task():
    switch = 60
    env = NonstationaryAtariEnv("Asterix", num_envs=2, seed=0, shifts=["reward_scale", "reward_offset"],
                                switch_every=switch, reward_scale=2.0, reward_offset=0.5, sticky_actions=0.0)
    out = play(env, actions_for(env.num_actions, 3 * switch, 2))
    assert out["reward"].max() == 50  # the raw score stays raw for logging
    tasks = torch.tensor(out["task"], dtype=torch.float32).unsqueeze(1)
    expected = torch.sign(out["reward"]) * 2.0 ** tasks + 0.5 * tasks
    real = ~out["reset_step"]
    torch.testing.assert_close(out["learn"][real], expected.expand_as(real)[real])
    assert set(out["task"]) == {0, 1, 2}
    assert (out["learn"][(tasks == 2).expand_as(real) & real & (out["reward"] > 0)] == 5.0).all()
    env.close()


# --------------------------------------------------------- seeding and resume
def schedule_stream(seed):
    env = NonstationaryAtariEnv("Breakout", num_envs=1, seed=seed, switch_every=4,
                                shifts=["action_permutation", "obs_permutation"], sticky_actions=0.25)
    out = play(env, actions_for(env.num_actions, 13, 1))
    perms = (env.action_permutation.clone(), env.pixel_permutation.clone())
    env.close()
    return out["obs"], perms


def test_same_seed_same_schedule_different_seed_different():
    obs, perms = schedule_stream(5)
    obs_again, perms_again = schedule_stream(5)
    obs_other, perms_other = schedule_stream(6)
    assert torch.equal(obs, obs_again) and all(torch.equal(a, b) for a, b in zip(perms, perms_again))
    assert not torch.equal(obs, obs_other)
    assert not torch.equal(perms[1], perms_other[1])


def test_state_dict_resumes_the_schedule_exactly():
    def make():
        return NonstationaryAtariEnv("Pong", num_envs=1, seed=9, switch_every=5, sticky_actions=0.0,
                                     shifts=["games", "action_permutation"], games=["Breakout"])

    original = make()
    play(original, actions_for(18, 12, 1))  # tasks 0, 1, 2
    resumed = make()
    resumed.load_state_dict(original.state_dict())
    assert resumed.task_id == original.task_id == 2 and resumed.current_game == "pong"
    assert torch.equal(resumed.action_permutation, original.action_permutation)
    later = actions_for(18, 7, 1, seed=1)
    a, b = play(original, later), play(resumed, later)  # both reset the current task, then switch together
    assert torch.equal(a["obs"], b["obs"]) and a["task"] == b["task"] and a["task"][-1] == 3
    with pytest.raises(ValueError, match="seed"):
        NonstationaryAtariEnv("Pong", seed=1, switch_every=5, shifts=["games"], games=["Breakout"]).load_state_dict(
            original.state_dict())


# ----------------------------------------------------------------- integration
def test_frame_stack_buffer_and_episode_stats_across_switches():
    """Sampled stacks equal the wrapper's observations across game switches with inverted and permuted frames,
    and every episode (including the ones truncated by a switch) is logged once, under its game.

    A population of two members (seeds 0 and 1, as two single runs build them): the buffer and the
    episode statistics take ``[M, E, ...]`` tensors and each member samples only its own transitions."""
    switch, members, num_envs = 30, 2, 2
    env = AtariPopulation([NonstationaryAtariEnv("Breakout", num_envs=num_envs, seed=seed, switch_every=switch,
                                                 sticky_actions=0.0, shifts=["games", "obs_invert", "obs_permutation"],
                                                 games=["Pong"], max_episode_frames=100) for seed in range(members)])
    buffer = FrameStackReplayBuffer(2 * 200, (4, 84, 84), num_envs, seeds=list(range(members)))
    stats = EpisodeStats(num_envs, members=members)
    obs, _ = env.reset()
    assert obs.shape == (members, num_envs, 4, 84, 84)
    recorded, logged = {}, []
    member_offset = 10**6  # transition ids: member * offset + step * num_envs + env
    for step, actions in enumerate(actions_for(18, 3 * switch + 5, members * num_envs)):
        next_obs, reward, terminated, truncated, info = env.step(actions.view(members, num_envs))
        ids = (torch.arange(members)[:, None] * member_offset + step * num_envs + torch.arange(num_envs)[None])
        real = ~info["reset_step"]
        buffer.add(obs, ids, info["learn_reward"], next_obs, terminated, truncated, valid=real)
        returns, lengths, ended = stats.update(reward, info["game_over"], valid=real)
        assert returns.shape == lengths.shape == ended.shape == (members, num_envs)
        assert not lengths[~ended].any() and not returns[~ended].any()  # dense: 0 where nothing ended
        logged += [(k, info["game"], int(lengths[k, e])) for k, e in ended.nonzero().tolist()]
        for k in range(members):
            for e in range(num_envs):
                if real[k, e]:
                    recorded[int(ids[k, e])] = (obs[k, e].clone(), next_obs[k, e].clone())
        obs = next_obs
    batch = buffer.sample(500)
    assert batch.obs.shape == (members, 500, 4, 84, 84)
    for k in range(members):
        for i, transition_id in enumerate(batch.actions[k].tolist()):
            assert transition_id // member_offset == k  # a member samples only its own transitions
            real_obs, real_next = recorded[transition_id]
            assert torch.equal(batch.obs[k, i], real_obs) and torch.equal(batch.next_obs[k, i], real_next)
    for k in range(members):
        # 25-step episodes (the frame cap), then the 4- and 3-step remainders the switches truncate.
        assert {game for member, game, _ in logged if member == k} == {"breakout", "pong"}
        assert sorted({n for member, _, n in logged if member == k}) == [3, 4, 25]
    env.close()


def test_bad_settings_are_one_clear_error_each():
    with pytest.raises(ValueError, match="valid shifts"):
        NonstationaryAtariEnv("Pong", shifts=["gamez"], switch_every=5)
    with pytest.raises(ValueError, match="switch_every"):
        NonstationaryAtariEnv("Pong", shifts=["games"], games=["Breakout"])
    with pytest.raises(ValueError, match="valid modes for pong"):
        NonstationaryAtariEnv("Breakout", shifts=["games", "modes"], games=["Pong"], modes=[0, 4], switch_every=5)
    with pytest.raises(ValueError, match="add it to shifts"):
        NonstationaryAtariEnv("Pong", shifts=["games"], games=["Breakout"], switch_every=5, reward_scale=2.0)
    with pytest.raises(ValueError, match="at least one game besides"):
        NonstationaryAtariEnv("Pong", shifts=["games"], switch_every=5, games=["ALE/Pong-v5"])
    with pytest.raises(ValueError, match="unknown Atari id"):
        NonstationaryAtariEnv("Pong", shifts=["games"], switch_every=5, games=["Pongg"])
