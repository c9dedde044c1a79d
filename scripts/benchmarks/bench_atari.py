"""Throughput of the Atari layer: raw AtariVectorEnv vs AtariEnv vs NonstationaryAtariEnv, and the replay buffer.

Env steps per second (one step = one action in every env, counted per env) for
- ``AtariVectorEnv``: ale-py's C++ vector env with numpy actions (the ceiling);
- ``AtariEnv``: the same through our torch wrapper (flags, raw scores, tensors);
- ``NonstationaryAtariEnv``: between switches, once with only the games shift
  (nothing per step) and once with every per-step transform on (action
  permutation, inverted and permuted frames, reward offset and scale);
- ``ALEInterfaceVectorEnv``: the mode/difficulty path (single-threaded Python).
Rounds are interleaved so that load from other processes hits every variant
alike; medians are reported.  On a busy shared CPU ``--clock process`` counts
the CPU time of this process (the emulator threads included) instead of wall
time.  Because emulation dominates a step, the wrappers' own cost is also
timed in isolation: each wrapper over a stub emulator that returns fixed arrays
(microseconds per step, to set against the raw step time).  Then
``FrameStackReplayBuffer.add`` (one row of num_envs transitions) and
``sample(32)`` on a buffer filled to capacity, and bytes per stored transition
of both buffer layouts.

    python scripts/benchmarks/bench_atari.py                                  # 1 and 8 envs, CPU
    python scripts/benchmarks/bench_atari.py --threads 1 --clock process      # on a busy shared CPU
    python scripts/benchmarks/bench_atari.py --num-envs 8 --capacity 1000000 --device cuda
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro
from ale_py.vector_env import AtariVectorEnv

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python scripts/benchmarks/bench_atari.py` from a checkout

from envs.atari import ALEInterfaceVectorEnv, AtariEnv, atari_game  # noqa: E402
from envs.nonstationary_atari import NonstationaryAtariEnv  # noqa: E402
from envs.replay_buffer import FrameStackReplayBuffer, ReplayBuffer  # noqa: E402


@dataclass
class Args:
    env_id: str = "ALE/Breakout-v5"
    """the game to step"""
    num_envs: list[int] = field(default_factory=lambda: [1, 8])
    """vector sizes to time"""
    steps: int = 300
    """env steps per variant per round"""
    rounds: int = 3
    """interleaved rounds (medians reported)"""
    device: str = "cpu"
    """where observations and the replay buffer live (cpu or cuda)"""
    capacity: int = 100_000
    """replay-buffer capacity (transitions) for the add/sample timing; 1M needs ~7.1 GB"""
    batch_size: int = 32
    """replay-buffer sample size"""
    threads: int = 0
    """torch CPU threads (0: leave torch's default)"""
    clock: str = "wall"
    """wall (perf_counter) or process (CPU time of this process, emulator threads included)"""


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def time_steps(step: Callable[[], object], steps: int, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    start = now()
    for _ in range(steps):
        step()
    return now() - start


class StubVectorEnv:
    """Stands in for AtariVectorEnv: returns fixed arrays, so a wrapper's own cost can be timed."""

    def __init__(self, inner):
        self.single_action_space = inner.single_action_space
        self.num_envs = inner.num_envs
        obs, info = inner.reset(seed=0)
        self._reset = (obs, info)
        self._step = (obs, np.zeros(self.num_envs, np.int32), np.zeros(self.num_envs, bool),
                      np.zeros(self.num_envs, bool), info)

    def reset(self, seed=None):
        return self._reset

    def step(self, actions):
        return self._step

    def close(self):
        pass


def env_variants(args: Args, num_envs: int) -> dict[str, tuple[Callable[[], object], Callable[[], None]]]:
    """name -> (one step, close), each env already reset."""
    game = atari_game(args.env_id)
    generator = np.random.default_rng(0)
    variants = {}

    raw = AtariVectorEnv(game, num_envs, reward_clipping=False, repeat_action_probability=0.25)
    raw.reset(seed=0)
    raw_actions = generator.integers(0, raw.single_action_space.n, size=(1024, num_envs))
    raw_counter = iter(range(10**12))
    variants["AtariVectorEnv (numpy)"] = (lambda: raw.step(raw_actions[next(raw_counter) % 1024]), raw.close)

    def torch_variant(env):
        env.reset()
        actions = torch.randint(0, env.num_actions, (1024, num_envs), device=args.device)
        counter = iter(range(10**12))
        return lambda: env.step(actions[next(counter) % 1024]), env.close

    variants["AtariEnv"] = torch_variant(AtariEnv(args.env_id, num_envs=num_envs, device=args.device))
    far = 10**9  # no switch during the benchmark: the steady state between switches
    variants["Nonstationary (games)"] = torch_variant(NonstationaryAtariEnv(
        args.env_id, num_envs=num_envs, device=args.device, shifts=["games"], games=["Pong"], switch_every=far))
    transforms = NonstationaryAtariEnv(
        args.env_id, num_envs=num_envs, device=args.device, switch_every=far, reward_offset=1.0, reward_scale=2.0,
        shifts=["action_permutation", "obs_invert", "obs_permutation", "reward_offset", "reward_scale"])
    transforms.load_state_dict({**transforms.state_dict(), "task_id": torch.tensor(1)})  # task 1: all transforms on
    variants["Nonstationary (all transforms)"] = torch_variant(transforms)
    modes = ALEInterfaceVectorEnv(game, num_envs, mode=0, repeat_action_probability=0.25)
    modes.reset(seed=np.arange(num_envs))
    mode_counter = iter(range(10**12))
    mode_actions = generator.integers(0, modes.single_action_space.n, size=(1024, num_envs))
    variants["ALEInterfaceVectorEnv (modes)"] = (lambda: modes.step(mode_actions[next(mode_counter) % 1024]),
                                                 modes.close)
    return variants


def bench_envs(args: Args) -> None:
    print(f"{args.env_id}: env steps/s (per env summed over envs), median of {args.rounds} interleaved rounds "
          f"of {args.steps} steps, {args.clock} clock")
    for num_envs in args.num_envs:
        variants = env_variants(args, num_envs)
        seconds = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (step, _) in variants.items():
                seconds[name].append(time_steps(step, args.steps, args.clock))
        baseline = args.steps * num_envs / statistics.median(seconds["AtariVectorEnv (numpy)"])
        for name, (_, close) in variants.items():
            rate = args.steps * num_envs / statistics.median(seconds[name])
            print(f"  num_envs={num_envs:<2d} {name:32s} {rate:9.0f} steps/s  ({rate / baseline:5.1%} of raw)")
            close()


def bench_wrapper_overhead(args: Args) -> None:
    """Microseconds per step each wrapper adds on top of the emulator (stubbed out)."""
    print("wrapper cost per step over a stub emulator (us), median of rounds:")
    for num_envs in args.num_envs:
        def stubbed(env):
            inner = env.env if isinstance(env, NonstationaryAtariEnv) else env
            stub = StubVectorEnv(inner.vector_env)
            inner.vector_env.close()
            inner._vector_env = stub  # benchmark-only surgery: time the wrapper, not the emulator
            env.reset()
            actions = torch.zeros(env.num_envs, dtype=torch.long, device=args.device)
            return lambda: env.step(actions)

        variants = {"AtariEnv": stubbed(AtariEnv(args.env_id, num_envs=num_envs, device=args.device))}
        far = 10**9
        variants["+ Nonstationary (games)"] = stubbed(NonstationaryAtariEnv(
            args.env_id, num_envs=num_envs, device=args.device, shifts=["games"], games=["Pong"], switch_every=far))
        transforms = NonstationaryAtariEnv(
            args.env_id, num_envs=num_envs, device=args.device, switch_every=far, reward_offset=1.0, reward_scale=2.0,
            shifts=["action_permutation", "obs_invert", "obs_permutation", "reward_offset", "reward_scale"])
        transforms.load_state_dict({**transforms.state_dict(), "task_id": torch.tensor(1)})
        variants["+ Nonstationary (all transforms)"] = stubbed(transforms)
        for name, step in variants.items():
            per_step = statistics.median(time_steps(step, 500, args.clock) / 500 for _ in range(args.rounds))
            print(f"  num_envs={num_envs:<2d} {name:34s} {per_step * 1e6:8.1f} us")


def bench_buffer(args: Args) -> None:
    num_envs = max(args.num_envs)
    # One member (a single run): every tensor [members=1, num_envs, ...].
    buffer = FrameStackReplayBuffer(args.capacity, (4, 84, 84), num_envs, device=args.device, seeds=[0])
    obs = torch.randint(0, 256, (1, num_envs, 4, 84, 84), dtype=torch.uint8, device=args.device)
    actions = torch.zeros(1, num_envs, dtype=torch.long, device=args.device)
    rewards = torch.zeros(1, num_envs, device=args.device)
    flags = torch.zeros(1, num_envs, dtype=torch.bool, device=args.device)
    valid = torch.rand(1, num_envs, device=args.device) > 0.01  # a reset step now and then

    def add():
        buffer.add(obs, actions, rewards, obs, flags, flags, valid=valid)

    def sample():
        buffer.sample(args.batch_size)

    def synced(fn):
        def run():
            fn()
            if buffer.device.type == "cuda":
                torch.cuda.synchronize()
        return run

    for _ in range(buffer.num_rows + 1):  # fill to capacity (the ring has wrapped)
        add()
    add_us = statistics.median(time_steps(synced(add), 200) / 200 for _ in range(args.rounds)) * 1e6
    sample_us = statistics.median(time_steps(synced(sample), 100) / 100 for _ in range(args.rounds)) * 1e6
    generic = ReplayBuffer(10_000, (4, 84, 84), num_envs, device="cpu")
    print(f"FrameStackReplayBuffer, capacity {buffer.capacity:,}, {num_envs} envs, {args.device}:")
    print(f"  add (one row of {num_envs} transitions): {add_us:8.1f} us")
    print(f"  sample({args.batch_size}):                    {sample_us:8.1f} us")
    print(f"  bytes per transition: {buffer.bytes_per_transition:8.1f}  "
          f"(1M transitions: {buffer.bytes_per_transition * 1e6 / 1e9:.2f} GB); "
          f"ReplayBuffer (obs + next_obs): {generic.bytes_per_transition:8.1f}")


def main(args: Args | None = None) -> None:
    args = tyro.cli(Args) if args is None else args
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_envs(args)
    bench_wrapper_overhead(args)
    bench_buffer(args)


if __name__ == "__main__":
    main()
