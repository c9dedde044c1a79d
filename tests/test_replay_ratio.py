"""Replay ratio (methods-v2.md §3): --gradient-steps G per training iteration every --train-frequency F env steps,
or --replay-ratio rho = G/(F*num_envs); its schedule, its mapping, its errors, and short real runs.

Counting convention: the agents' ``t`` is the env-step count *after* a vector step (1..T), so an iteration
runs at every multiple of F in (learning_starts, T] -- with T = 20, L = 5, F = 4 that is t = 8, 12, 16, 20.  The
spec's property 3.1 counts CleanRL's 0-based ``global_step`` (0..T-1: t = 8, 12, 16); both place iterations at
the same multiples of F, ours includes the final step's.
"""

from __future__ import annotations

import pytest
import torch

from agents.harness import experiment
from agents.harness.checkpoint import load_checkpoint
from agents.harness.config import ConfigError, replay_settings, run_tag
from tests.test_agents import mdp_args, read_scalars, run_agent


def iteration_steps(total: int, learning_starts: int, train_frequency: int, num_envs: int = 1) -> list[int]:
    """The env steps t at which a training iteration runs, by the harness's own schedule (vector steps)."""
    steps = []
    for t in range(num_envs, total + 1, num_envs):
        if experiment.updates_due(t - num_envs, t, train_frequency, learning_starts) > 0:
            steps.append(t)
    return steps


def test_property_3_1_iterations_and_gradient_steps():
    assert iteration_steps(20, 5, 4) == [8, 12, 16, 20]
    assert experiment.updates_done(20, 4, 5, gradient_steps=2) == 8  # G = 2 per iteration
    assert experiment.updates_done(19, 4, 5, gradient_steps=2) == 6  # CleanRL's 0..19: iterations at 8, 12, 16
    # Vector steps: 4 envs cross one multiple of F = 4 per step; a period never double-counts.
    assert experiment.updates_due(8, 12, 4, 5, gradient_steps=3) == 3
    assert experiment.updates_due(0, 4, 4, 5, gradient_steps=3) == 0  # before learning starts


@pytest.mark.parametrize("rho, num_envs, expected", [
    (1.0, 1, (1, 1)), (2.0, 1, (1, 2)), (0.25, 1, (4, 1)), (0.5, 1, (2, 1)), (0.125, 8, (1, 1)), (0.5, 8, (1, 4)),
    (1 / 3, 1, (3, 1)),
])
def test_property_3_3_replay_ratio_maps_to_train_frequency_and_gradient_steps(rho, num_envs, expected):
    frequency, steps = replay_settings(rho, num_envs)
    assert (frequency, steps) == expected
    assert steps / (frequency * num_envs) == pytest.approx(rho)  # rho = G/(F*N_env)


def test_bbf_replay_ratio_is_rho_times_batch_size():
    # BBF.gin: replay_ratio = 64 samples per transition at batch 32 -> 2 gradient steps per env step.
    bbf_replay_ratio, batch = 64, 32
    rho = bbf_replay_ratio / batch
    assert replay_settings(rho, 1) == (1, 2)
    assert max(1, bbf_replay_ratio * 1 // batch) == 2  # BBF's set_replay_settings: updates per step


@pytest.mark.parametrize("rho, num_envs", [(1.5, 1), (0.4, 1), (0.3, 2)])
def test_a_replay_ratio_without_an_integer_schedule_is_an_error(rho, num_envs):
    with pytest.raises(ConfigError, match="--replay-ratio"):
        replay_settings(rho, num_envs)


@pytest.mark.parametrize("flag", [("gradient_steps", 2), ("train_frequency", 2)])
def test_replay_ratio_with_train_frequency_or_gradient_steps_is_one_error(flag, tmp_path, mnist_dir):
    name, value = flag
    args = mdp_args("dqn", tmp_path, mnist_dir, replay_ratio=1.0, **{name: value})
    with pytest.raises(ConfigError, match=f"--replay-ratio and --{name.replace('_', '-')}"):
        run_agent(args)
    assert not (tmp_path / "run").exists()


def _optimizer_steps(run_dir) -> int:
    state = load_checkpoint(run_dir, map_location="cpu")["optimizer"]["state"]
    steps = {int(torch.as_tensor(entry["step"]).reshape(-1)[0]) for entry in state.values()}
    assert len(steps) == 1
    return steps.pop()


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_property_3_4_gradient_steps_run_per_update_hooks_g_times(agent, tmp_path, mnist_dir):
    """A real run with G = 3: 3 optimiser steps per iteration, each on its own batch; per-update hooks (S&P
    every update here) run once per gradient step; the target sync keeps counting env steps."""
    args = mdp_args(agent, tmp_path, mnist_dir, gradient_steps=3, snp=1e-6, snp_every=1, total_timesteps=300,
                    learning_starts=100, train_frequency=4)
    run_dir = run_agent(args)
    expected = 3 * (300 // 4 - 100 // 4)
    assert _optimizer_steps(run_dir) == expected
    scalars = read_scalars(run_dir)
    assert scalars["plasticity/snp_applications"][-1][1] == expected
    assert "gs_3" in run_tag(args).split("-")  # the run tag (default run names, SPS tables) names G


def test_replay_ratio_run_trains_at_rho(tmp_path, mnist_dir):
    """--replay-ratio 0.5: one gradient step every 2 env steps (F = 2, G = 1), saved in the config."""
    args = mdp_args("dqn", tmp_path, mnist_dir, replay_ratio=0.5, total_timesteps=300, learning_starts=100)
    run_dir = run_agent(args)
    assert (args.train_frequency, args.gradient_steps) == (2, 1)
    assert _optimizer_steps(run_dir) == 300 // 2 - 100 // 2


def test_batches_of_one_iteration_are_independent_draws(tmp_path, mnist_dir):
    """Property 3.2: the G batches of one iteration are G consecutive draws of the buffer's seeded RNG."""
    from envs.replay_buffer import make_replay_buffer

    def filled():
        buffer = make_replay_buffer((3,), 64, 1, torch.device("cpu"), seeds=[7])
        for i in range(64):
            value = torch.full((1, 1, 3), i, dtype=torch.uint8)
            buffer.add(value, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), value,
                       torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool))
        return buffer

    first, second = filled().sample(8), None
    buffer = filled()
    draws = [buffer.sample(8) for _ in range(2)]
    assert torch.equal(draws[0].obs, first.obs)  # seeded: the first draw is reproducible
    second = draws[1]
    assert not torch.equal(draws[0].obs, second.obs)  # the second gradient step gets a different batch
