"""Per-update cost of every methods-v2 method (spec methods-v2.md) on the agents' own update.

Two networks: DQN's Nature CNN on real ALE/Breakout-v5 frames (4x84x84, 18 actions) and DQN's MNIST
MLP (784-256-256-10 on the image MDP).  The update is the agent's (``bench_agents.AgentUpdate``: its
QNetwork, ``build_optimizer``, ``Interventions``, ``td_loss``, penalty, backward, optimiser step, the
after-update hooks), with the method switched on through the agent's ``Args`` -- exactly what a run
with that flag executes per gradient step.  Each method is timed against the plain update of the same
network (``--layer-norm`` for NaP, which needs it), in interleaved rounds, so load drift hits both alike.
Discrete events (layer reset, optimiser reset, hare reset) are timed per event.

Timings: the median over ``--repeats`` rounds after ``--warmup``; on CUDA wall time with
synchronisation, on CPU the process's CPU time (single-threaded by default).

    python scripts/benchmarks/bench.py methods                       # both networks, CPU (and CUDA)
    python scripts/benchmarks/bench.py methods --networks mlp --repeats 50
    python scripts/benchmarks/bench.py methods --only kron trac --json methods.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections.abc import Callable

import torch

from agents import dqn
from envs.factory import AgentEnv
from envs.replay_buffer import make_replay_buffer
from plasticity.optimizer_reset import reset_optimizer_state_
from plasticity.streams import MemberRandom, stream_seed
from scripts.benchmarks.bench_agents import agent_update, atari_replay
from scripts.benchmarks.bench_plasticity import _timed

GAME, BATCH = "ALE/Breakout-v5", 32

#: name -> (flags of the plain update it is compared with, flags of the method)
PER_UPDATE: dict[str, tuple[dict, dict]] = {
    "adamw (decoupled decay 1e-2)": ({}, dict(optimizer="adamw", weight_decay=1e-2)),
    "sgd (momentum 0.9)": ({}, dict(optimizer="sgd", sgd_momentum=0.9)),
    "adam, per-entry step": ({}, dict(adam_per_entry_step=True)),
    "adam, betas 0.99 0.99": ({}, dict(adam_betas=(0.99, 0.99))),
    "lr schedule linear": ({}, dict(lr_schedule="linear")),
    "kron": ({}, dict(optimizer="kron")),
    "upgd": ({}, dict(optimizer="upgd")),
    "trac": ({}, dict(trac=True)),
    "parseval 1e-3": ({}, dict(parseval=1e-3)),
    "parseval 1e-3, 4 groups": ({}, dict(parseval=1e-3, parseval_groups=4)),
    "c-chain": ({}, dict(c_chain=True)),
    "nap (vs layer-norm update)": (dict(layer_norm=True), dict(layer_norm=True, nap=True)),
    "weight clip 3": ({}, dict(weight_clip=3.0)),
    "hare & tortoise (EMA)": ({}, dict(hare_tortoise=True)),
    "crelu (double)": ({}, dict(activation="crelu")),
    "dff (double)": ({}, dict(activation="dff")),
    "injection last:2, injected": ({}, dict(plasticity_injection_at=[1_000_000])),
    "injection last:1, injected": ({}, dict(plasticity_injection_at=[1_000_000],
                                            plasticity_injection_head="last:1")),
}

#: name -> (method flags, the event as a function of the AgentUpdate)
EVENTS: dict[str, tuple[dict, Callable]] = {
    "layer reset last:2 + S&P 0.5/0.5": (dict(reset_layers="last:2", reset_every=1000, reset_shrink=0.5,
                                              reset_perturb=0.5),
                                         lambda update: update.interventions.methods["layer_resets"].reset()),
    "optimiser reset (all)": (dict(reset_optimizer="every", reset_optimizer_every=1000),
                              lambda update: reset_optimizer_state_(update.optimizer, "all")),
    "hare reset": (dict(hare_tortoise=True),
                   lambda update: update.interventions.methods["hare_tortoise"].reset_hare()),
}


def network_flags(network: str, device: torch.device, data_dir: str) -> dict:
    common = dict(cuda=device.type == "cuda", batch_size=BATCH, total_timesteps=10_000, learning_starts=0,
                  buffer_size=1000, seed=0)
    if network == "nature_cnn":
        return dict(env_id=GAME, full_action_space=True, sticky_actions=0.0, **common)
    return dict(env_id="ImageMDP/mnist", data_dir=data_dir, **common)


def replay(network: str, device: torch.device, flags: dict):
    """(env, buffer) holding real transitions of random play: Breakout frames, or MNIST image-MDP steps."""
    if network == "nature_cnn":
        env, buffer, _ = atari_replay(GAME, device, full_action_space=True)
        env.close()  # the buffer holds its frames; AgentUpdate reads only obs_shape and num_actions
        return env, buffer
    args = dqn.Args(**flags)
    env = AgentEnv.make(args, device, seeds=[0])
    buffer = make_replay_buffer(env.obs_shape, 1000, 1, device, seeds=[stream_seed(0, "replay")])
    random = MemberRandom([1], device)
    obs = env.reset(seeds=[0])
    for _ in range(500):
        actions = random.integers(env.num_actions, 1)
        step = env.step(actions)
        buffer.add(obs, actions, step.learn_reward, step.next_obs, step.terminated, step.truncated, valid=step.store)
        obs = step.obs
    env.close()
    return env, buffer


def _inject(update) -> None:
    """Inject now (what the run does at --plasticity-injection-at), so the timed update has all three heads."""
    method = update.interventions.methods.get("plasticity_injection")
    if method is not None:  # the env step that crosses --plasticity-injection-at 1,000,000
        method.after_env_step(999_999, 1_000_000, False, None)


def bench_network(network: str, device: torch.device, data_dir: str, warmup: int, repeats: int,
                  only: list[str] | None) -> dict:
    cuda = device.type == "cuda"
    base = network_flags(network, device, data_dir)
    env, buffer = replay(network, device, base)
    plains: dict[str, Callable] = {}
    results: dict[str, dict] = {}
    for name, (plain_flags, flags) in PER_UPDATE.items():
        if only and not any(word in name for word in only):
            continue
        key = json.dumps(plain_flags, sort_keys=True)
        if key not in plains:
            torch.manual_seed(0)
            plains[key] = agent_update(dqn, dqn.Args(**base, **plain_flags), env, buffer)
        plain = plains[key]
        torch.manual_seed(0)
        method = agent_update(dqn, dqn.Args(**base, **flags), env, buffer)
        _inject(method)
        times = {"plain": [], "method": []}
        for i in range(warmup + repeats):
            round_times = (_timed(plain, cuda), _timed(method, cuda))
            if i >= warmup:
                times["plain"].append(round_times[0])
                times["method"].append(round_times[1])
        plain_ms, method_ms = (1e3 * statistics.median(times[k]) for k in ("plain", "method"))
        results[name] = {"plain_ms": plain_ms, "method_ms": method_ms, "overhead": method_ms / plain_ms - 1}
        print_row(name, results[name])
    for name, (flags, event) in EVENTS.items():
        if only and not any(word in name for word in only):
            continue
        torch.manual_seed(0)
        update = agent_update(dqn, dqn.Args(**base, **flags), env, buffer)
        update()
        fire = functools.partial(event, update)
        samples = [_timed(fire, cuda) for _ in range(warmup + max(repeats // 5, 5))][warmup:]
        plain_ms = statistics.median(_timed(update, cuda) for _ in range(max(repeats // 5, 5)))
        results[name] = {"event_ms": 1e3 * statistics.median(samples), "plain_ms": 1e3 * plain_ms}
        print_row(name, results[name])
    return results


def print_row(name: str, row: dict) -> None:
    if "method_ms" in row:
        print(f"  {name:<34} {row['method_ms']:9.3f} ms vs {row['plain_ms']:8.3f} ms  {100 * row['overhead']:+7.1f}%",
              flush=True)
    else:
        print(f"  {name:<34} {row['event_ms']:9.3f} ms per event ({row['event_ms'] / row['plain_ms']:.2f} updates)",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--networks", nargs="+", default=["nature_cnn", "mlp"], choices=["nature_cnn", "mlp"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU time sums over them)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--only", nargs="+", default=None, help="methods whose name contains one of these words")
    parser.add_argument("--data-dir", default="", help="MNIST folder (default: $PLASTICITY_DATA or the cache)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"agents/dqn.py update, batch {BATCH}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    everything = {}
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for network in args.networks:
            print(f"\n[{label}] {network}: per-update cost over the plain update of the same network", flush=True)
            results = bench_network(network, device, args.data_dir, args.warmup, args.repeats, args.only)
            everything[f"{label}/{network}"] = results
    if args.json:
        with open(args.json, "w") as file:
            json.dump(everything, file, indent=2)


if __name__ == "__main__":
    main()
