"""Training throughput of the agents, and what bounds it (issue: agents performance).

For DQN and C51 on Atari with CleanRL's hyperparameters (num_envs 1, train frequency 4,
batch 32, Nature CNN) it runs the real agent and reads ``charts/SPS`` once learning has
started, with and without SWR + CBP + default diagnostics; it also measures, in the
same process, the compute floor

    floor = update time / train_frequency + action selection + env step   (seconds per env step)

and reports the SPS as a fraction of 1/floor.  Then the bytes per stored Atari transition
and the image-MDP training SPS.

    python scripts/benchmarks/bench.py agents                       # CPU; --device cuda on a GPU machine
    python scripts/benchmarks/bench.py agents --steps 12000 --agents dqn
    python scripts/benchmarks/bench.py agents --bf16                # also each agent with --bf16, with and without methods
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import c51, dqn
from envs.atari import AtariEnv
from envs.replay_buffer import make_replay_buffer
from plasticity.losses import c51_atoms, c51_loss, c51_project, regression_loss

AGENTS = {"dqn": dqn, "c51": c51}
SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "mnist"
METHODS = dict(swr=0.01, cbp=True)  # + the default diagnostics cadence (diag_every 10k, 1024 probes)


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compute_floor(agent: str, device: torch.device, game: str = "ALE/Breakout-v5", repeats: int = 30) -> dict:
    """Update, action-selection and env-step times of the agent's own network, buffer and env."""
    module = AGENTS[agent]
    args = module.Args(env_id=game, cuda=device.type == "cuda", total_timesteps=10_000, learning_starts=0,
                       buffer_size=1000)
    env = AtariEnv(game, num_envs=1, seed=0, device=device, sticky_actions=0.0)
    obs, _ = env.reset(seed=0)
    buffer = make_replay_buffer(env.obs_shape, 1000, 1, device, seed=0)
    actions = torch.zeros(1, dtype=torch.long, device=device)
    for _ in range(300):  # real frames in the buffer
        next_obs, reward, terminated, truncated, info = env.step(actions)
        buffer.add(obs, actions, info["learn_reward"], next_obs, terminated, truncated, valid=~info["reset_step"])
        obs = next_obs
    if agent == "dqn":
        network = module.QNetwork(env.obs_shape, env.num_actions, args, None).to(device)
        optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate, fused=True)
    else:
        atoms = c51_atoms(args.v_min, args.v_max, args.n_atoms, device=device)
        network = module.QNetwork(env.obs_shape, env.num_actions, args, atoms).to(device)
        optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    target = type(network)(env.obs_shape, env.num_actions, args, *((None,) if agent == "dqn" else (atoms,))).to(device)

    def update() -> None:
        # The agents' update: sample, target forward, online forward, loss, backward, Adam.
        batch = buffer.sample(args.batch_size)
        index = torch.arange(args.batch_size, device=device)
        with torch.no_grad():
            if agent == "dqn":
                targets = batch.rewards + args.gamma * target.q_values(batch.next_obs).max(1).values
            else:
                next_pmfs = torch.softmax(target(batch.next_obs), dim=2)
                next_pmf = next_pmfs[index, (next_pmfs * atoms).sum(2).argmax(1)]
                targets = c51_project(next_pmf, batch.rewards, batch.terminated.float(), args.gamma, atoms)
        out = network(batch.obs)[index, batch.actions]
        loss = regression_loss("mse", out, targets) if agent == "dqn" else c51_loss(out, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def act() -> None:
        with torch.no_grad():
            network.q_values(obs).argmax(1)

    def env_step() -> None:
        env.step(actions)

    for fn in (update, act, env_step):
        fn()
    times = {"update_ms": _median_time(update, repeats, device) * 1e3,
             "act_ms": _median_time(act, repeats * 3, device) * 1e3,
             "env_step_ms": _median_time(env_step, repeats * 3, device) * 1e3}
    env.close()
    times["floor_ms_per_step"] = times["update_ms"] / args.train_frequency + times["act_ms"] + times["env_step_ms"]
    times["floor_sps"] = 1e3 / times["floor_ms_per_step"]
    return times


def measured_sps(agent: str, device: torch.device, steps: int, learning_starts: int, env_id: str = "ALE/Breakout-v5",
                 **flags) -> float:
    """Mean charts/SPS of a real run over the windows after learning starts."""
    with tempfile.TemporaryDirectory() as runs_dir:
        args = AGENTS[agent].Args(env_id=env_id, total_timesteps=steps, learning_starts=learning_starts,
                                  buffer_size=max(steps, 1000), log_every=1000, checkpoint_every=0,
                                  runs_dir=runs_dir, run_name="bench", cuda=device.type == "cuda",
                                  sticky_actions=0.0, **flags)
        AGENTS[agent].main(args)
        events = EventAccumulator(str(Path(runs_dir) / "bench"), size_guidance={"scalars": 0})
        events.Reload()
        rates = [e.value for e in events.Scalars("charts/SPS") if e.step > learning_starts + 1000]
    return statistics.mean(rates)


def bytes_per_atari_transition(capacity: int = 100_000) -> float:
    buffer = make_replay_buffer((4, 84, 84), capacity, 1, "cpu", seed=0)
    return buffer.nbytes / capacity


def _with_methods(sps: float, sps_with_methods: float) -> str:
    return f"with SWR+CBP+diagnostics {sps_with_methods:.0f} ({100 * (sps / sps_with_methods - 1):.1f}% slower)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--agents", nargs="+", default=["dqn", "c51"], choices=list(AGENTS))
    parser.add_argument("--steps", type=int, default=14_000, help="env steps per measured Atari run")
    parser.add_argument("--learning-starts", type=int, default=2_000)
    parser.add_argument("--mnist", default=str(SHARED_MNIST), help="MNIST folder for the image-MDP figure")
    parser.add_argument("--bf16", action="store_true", help="also measure each agent with --bf16")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for agent in args.agents:
        floor = compute_floor(agent, device)
        base = measured_sps(agent, device, args.steps, args.learning_starts)
        with_methods = measured_sps(agent, device, args.steps, args.learning_starts, **METHODS)
        print(f"{agent}: update {floor['update_ms']:.1f} ms, act {floor['act_ms']:.2f} ms, env step "
              f"{floor['env_step_ms']:.2f} ms -> floor {floor['floor_sps']:.0f} SPS")
        print(f"{agent}: training SPS {base:.0f} ({100 * base / floor['floor_sps']:.0f}% of floor); "
              f"{_with_methods(base, with_methods)}")
        if args.bf16:
            low = measured_sps(agent, device, args.steps, args.learning_starts, bf16=True)
            low_methods = measured_sps(agent, device, args.steps, args.learning_starts, bf16=True, **METHODS)
            print(f"{agent}: training SPS with --bf16 {low:.0f} ({low / base:.2f}x float32); "
                  f"{_with_methods(low, low_methods)}")
    print(f"Atari replay: {bytes_per_atari_transition():.0f} bytes per stored transition "
          f"({bytes_per_atari_transition() * 1e6 / 1e9:.2f} GB for 1M)")
    if Path(args.mnist, "t10k-images-idx3-ubyte.gz").exists():
        for num_envs in (1, 16):
            sps = measured_sps("dqn", device, 20_000, 2_000, env_id="ImageMDP/mnist", data_dir=args.mnist,
                               num_envs=num_envs, shift=["label_permutation"], diag_every=10_000)
            print(f"image MDP (mnist, MLP 256x256, dqn, num_envs {num_envs}): training SPS {sps:.0f}")


if __name__ == "__main__":
    main()
