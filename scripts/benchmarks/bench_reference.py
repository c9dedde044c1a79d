"""Speed-up over a CleanRL-style loop, measured on the same machine in alternating runs.

The issue's target is relative: 1.4x CleanRL's ``dqn_atari.py`` / ``c51_atari.py``
(CleanRL is not a pip package, and this VM's speed drifts by +-10% from minute to
minute, so absolute SPS taken at different times do not compare).  This script runs a
reference loop built the way CleanRL builds those scripts -- gymnasium ``SyncVectorEnv``
over ``BreakoutNoFrameskip-v4`` with Stable-Baselines3's Atari wrappers (noop reset,
max-and-skip 4, episodic life, fire reset, reward clipping) and gymnasium's resize /
grayscale / frame-stack wrappers, SB3's ``ReplayBuffer(optimize_memory_usage=True)``,
PyTorch's default Adam, ``x / 255`` in the forward, the forward skipped when the action
is random -- and our agent, alternately, with the same hyperparameters (num_envs 1,
train frequency 4, batch 32, Nature CNN).  Each run reports its SPS from learning start
+ 1000 to the end (``measured_sps``'s windows); the script prints the medians and their ratio.

Needs the ``bench`` extra (``pip install -e ".[bench]"``: stable-baselines3, opencv).

    python scripts/benchmarks/bench.py reference                    # DQN and C51, 3 alternating pairs each
    python scripts/benchmarks/bench.py reference --agents dqn --pairs 5
    python scripts/benchmarks/bench.py reference --bf16             # also our agent with --bf16 in each round
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
from torch import nn

from scripts.benchmarks.bench_agents import measured_sps

CLEANRL = {  # CleanRL's defaults for the two scripts
    "dqn": dict(learning_rate=1e-4, target_network_frequency=1000),
    "c51": dict(learning_rate=2.5e-4, target_network_frequency=10_000, n_atoms=51, v_min=-10.0, v_max=10.0),
}


def make_env(env_id: str, seed: int):
    import gymnasium as gym
    from stable_baselines3.common.atari_wrappers import (
        ClipRewardEnv,
        EpisodicLifeEnv,
        FireResetEnv,
        MaxAndSkipEnv,
        NoopResetEnv,
    )

    def thunk():
        env = gym.make(env_id)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env = NoopResetEnv(env, noop_max=30)
        env = MaxAndSkipEnv(env, skip=4)
        env = EpisodicLifeEnv(env)
        if "FIRE" in env.unwrapped.get_action_meanings():
            env = FireResetEnv(env)
        env = ClipRewardEnv(env)
        env = gym.wrappers.ResizeObservation(env, (84, 84))
        env = gym.wrappers.GrayscaleObservation(env)
        env = gym.wrappers.FrameStackObservation(env, 4)
        env.action_space.seed(seed)
        return env

    return thunk


def nature_cnn(outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
        nn.Linear(512, outputs))


def reference_sps(agent: str, steps: int, learning_starts: int, seed: int = 1,
                  env_id: str = "BreakoutNoFrameskip-v4", settle: int = 1000) -> float:
    """SPS of the CleanRL-style loop over its steps from ``learning_starts + settle`` to ``steps``."""
    if steps <= learning_starts + settle + 1:
        raise ValueError(f"steps ({steps}) must exceed learning_starts + settle ({learning_starts + settle}) + 1")
    import ale_py
    import gymnasium as gym
    from stable_baselines3.common.buffers import ReplayBuffer

    gym.register_envs(ale_py)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    hp = CLEANRL[agent]
    envs = gym.vector.SyncVectorEnv([make_env(env_id, seed)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    n = int(envs.single_action_space.n)
    atoms = torch.linspace(hp.get("v_min", 0.0), hp.get("v_max", 0.0), hp.get("n_atoms", 1))
    outputs = n * len(atoms) if agent == "c51" else n
    q_network, target_network = nature_cnn(outputs), nature_cnn(outputs)
    target_network.load_state_dict(q_network.state_dict())
    adam_eps = 0.01 / 32 if agent == "c51" else 1e-8
    optimizer = torch.optim.Adam(q_network.parameters(), lr=hp["learning_rate"], eps=adam_eps)
    rb = ReplayBuffer(steps, envs.single_observation_space, envs.single_action_space, "cpu",
                      optimize_memory_usage=True, handle_timeout_termination=False)

    def values(network, x):  # Q-values [B, n] (c51: also the pmfs [B, n, atoms])
        out = network(x / 255.0)
        if agent == "dqn":
            return out, None
        pmfs = torch.softmax(out.view(len(x), n, len(atoms)), dim=2)
        return (pmfs * atoms).sum(2), pmfs

    obs, _ = envs.reset(seed=seed)
    start = None
    for global_step in range(steps):
        epsilon = max(1.0 + (0.01 - 1.0) * global_step / (0.1 * steps), 0.01)
        if random.random() < epsilon:
            actions = np.array([envs.single_action_space.sample()])
        else:
            q_values, _ = values(q_network, torch.Tensor(obs))
            actions = torch.argmax(q_values, dim=1).cpu().numpy()
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        real_next_obs = next_obs.copy()
        for idx, truncated in enumerate(truncations):
            if truncated:
                real_next_obs[idx] = infos["final_obs"][idx]
        rb.add(obs, real_next_obs, actions, rewards, terminations, infos)
        obs = next_obs

        if global_step == learning_starts + settle:  # settle 1000: the steps measured_sps reads for our agent
            start = time.perf_counter()
        if global_step > learning_starts and global_step % 4 == 0:
            data = rb.sample(32)
            with torch.no_grad():
                if agent == "dqn":
                    target_max = values(target_network, data.next_observations)[0].max(dim=1).values
                    target = data.rewards.flatten() + 0.99 * target_max * (1 - data.dones.flatten())
                else:
                    next_q, next_pmfs = values(target_network, data.next_observations)
                    next_pmf = next_pmfs[torch.arange(32), next_q.argmax(1)]
                    target_z = (data.rewards + 0.99 * atoms * (1 - data.dones)).clamp(atoms[0], atoms[-1])
                    b = (target_z - atoms[0]) / (atoms[1] - atoms[0])
                    lower, upper = b.floor().clamp(0, len(atoms) - 1), b.ceil().clamp(0, len(atoms) - 1)
                    target = torch.zeros_like(next_pmf)
                    target.scatter_add_(1, lower.long(), next_pmf * (upper + (lower == upper).float() - b))
                    target.scatter_add_(1, upper.long(), next_pmf * (b - lower))
            if agent == "dqn":
                old_val = values(q_network, data.observations)[0].gather(1, data.actions).squeeze()
                loss = nn.functional.mse_loss(target, old_val)
            else:
                old_pmfs = values(q_network, data.observations)[1][torch.arange(32), data.actions.flatten()]
                loss = (-(target * old_pmfs.clamp(1e-5, 1 - 1e-5).log()).sum(-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if global_step % hp["target_network_frequency"] == 0:
                target_network.load_state_dict(q_network.state_dict())
    envs.close()
    return (steps - 1 - learning_starts - settle) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", nargs="+", default=["dqn", "c51"], choices=list(CLEANRL))
    parser.add_argument("--pairs", type=int, default=3, help="alternating (reference, ours) runs per agent")
    parser.add_argument("--steps", type=int, default=6_000, help="env steps per run")
    parser.add_argument("--learning-starts", type=int, default=1_000)
    parser.add_argument("--bf16", action="store_true", help="also run our agent with --bf16 in every round")
    args = parser.parse_args(argv)
    try:
        import cv2  # noqa: F401  (gymnasium's ResizeObservation)
        import stable_baselines3  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"error: the reference loop needs the bench extra ({error.name} is missing): "
                         f"pip install -e \".[bench]\"") from None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.pairs} alternating pairs of "
          f"{args.steps} env steps, learning from step {args.learning_starts}")
    for agent in args.agents:
        reference, ours, ours_bf16 = [], [], []
        for _ in range(args.pairs):
            reference.append(reference_sps(agent, args.steps, args.learning_starts))
            ours.append(measured_sps(agent, torch.device("cpu"), args.steps, args.learning_starts, **CLEANRL[agent]))
            line = f"{agent}: reference {reference[-1]:.0f} SPS, ours {ours[-1]:.0f} SPS"
            if args.bf16:
                ours_bf16.append(measured_sps(agent, torch.device("cpu"), args.steps, args.learning_starts,
                                              bf16=True, **CLEANRL[agent]))
                line += f", ours --bf16 {ours_bf16[-1]:.0f} SPS"
            print(line)
        ref, our = statistics.median(reference), statistics.median(ours)
        summary = f"{agent}: median reference {ref:.0f} SPS, ours {our:.0f} SPS -> {our / ref:.2f}x"
        if args.bf16:
            low = statistics.median(ours_bf16)
            summary += f"; ours --bf16 {low:.0f} SPS -> {low / ref:.2f}x"
        print(summary)


if __name__ == "__main__":
    main()
