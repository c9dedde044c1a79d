"""Cost of the plasticity diagnostics relative to training (spec diagnostics.md, "Cost rules").

Times one default ``Diagnostics.measure`` event (Nature CNN, 4x84x84 uint8
observations, 1024 probe samples from the replay buffer, the agent's TD targets)
against one training update of the agent itself: ``bench_agents.AgentUpdate``
builds agents/dqn.py's (or, with ``--n-atoms`` > 1, agents/c51.py's) QNetwork,
target network, fused Adam and Interventions from the agent's ``Args`` as its
``main()`` does, and runs the loop's update (replay sample of 32, the agent's
``td_loss``, backward, Adam step).  The event's cost is amortised over the
updates between two events: ``diag_every / train_frequency`` (10,000 / 4 = 2,500
by default).  The budget is ≤ 3 %.  The per-update ``record_grad_norm`` call is
timed too, since it runs at every update rather than every event.  Training time
here is updates only (no env steps, no acting), so the percentages are upper
bounds.  Batches come from the agents' replay buffer holding real
ALE/Breakout-v5 frames (random play; the ROMs ship with ale-py).  Rounds are
interleaved (updates, one event, grad-norm calls) so that load from other
processes hits both sides alike; medians are reported.

    python scripts/benchmarks/bench_diagnostics.py                       # CPU, or CUDA when available
    python scripts/benchmarks/bench_diagnostics.py --device cpu --rare   # also eNTK, Hessian, plasticity probe
    python scripts/benchmarks/bench_diagnostics.py --device cpu --threads 1 --clock process   # on a busy shared CPU
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python scripts/benchmarks/bench_diagnostics.py` from a checkout

from agents import c51, dqn  # noqa: E402
from plasticity.diagnostics import Diagnostics  # noqa: E402
from scripts.benchmarks.bench_agents import agent_update, atari_replay  # noqa: E402

GAME = "ALE/Breakout-v5"
MINIMAL_ACTION_SET, FULL_ACTION_SET = 4, 18  # Breakout's minimal set; all Atari actions


@dataclass
class Args:
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    probe_batch: int = 1024
    """probe observations per diagnostic event (the agents' --diag-batch)"""
    train_batch: int = 32
    """minibatch of one training update"""
    n_actions: int = FULL_ACTION_SET
    """width of the Q head: 18 (full Atari action set) or 4 (Breakout's minimal set)"""
    n_atoms: int = 1
    """> 1 times the C51 agent (agents/c51.py) with that many atoms (its default: 51); 1: the DQN agent (MSE)"""
    layer_norm: bool = False
    """LayerNorm on every hidden pre-activation"""
    diag_every: int = 10_000
    """agent steps between two diagnostic events"""
    train_frequency: int = 4
    """agent steps per training update"""
    repeats: int = 5
    """interleaved rounds, each timing one diagnostic event and a block of updates (medians reported)"""
    updates: int = 20
    """training updates (and record_grad_norm calls) timed per round"""
    rare: bool = False
    """also time the rarer probes: eNTK (64 inputs), Hessian (20 HVPs), plasticity probe (100 steps)"""
    rare_batch: int = 256
    """probe batch of the Hessian and the plasticity probe when --rare"""
    threads: int = 0
    """torch CPU threads (0: leave torch's default)"""
    clock: str = "wall"
    """wall, or process (CPU time of this process: robust on a CPU shared with other jobs; CPU only)"""
    seed: int = 0


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def timed(fn: Callable[[], object], device: torch.device, calls: int = 1, clock: str = "wall") -> float:
    """Seconds per call of ``fn`` over ``calls`` calls (CUDA synchronised before and after)."""
    now = CLOCKS[clock]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = now()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (now() - start) / calls


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = tyro.cli(Args, args=argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
    if args.clock not in CLOCKS or (args.clock == "process" and device.type == "cuda"):
        raise ValueError(f"--clock must be wall or process (process only on CPU); got {args.clock!r} on {device}")
    if args.n_actions not in (MINIMAL_ACTION_SET, FULL_ACTION_SET):
        raise ValueError(f"--n-actions {args.n_actions}: {GAME} has {MINIMAL_ACTION_SET} actions (minimal set) or "
                         f"{FULL_ACTION_SET} (full set)")
    torch.manual_seed(args.seed)

    module = c51 if args.n_atoms > 1 else dqn
    capacity = args.probe_batch + 200  # at least a probe batch of distinct transitions
    agent_args = module.Args(env_id=GAME, cuda=device.type == "cuda", full_action_space=args.n_actions == FULL_ACTION_SET,
                             layer_norm=args.layer_norm, batch_size=args.train_batch,
                             train_frequency=args.train_frequency, diag_every=args.diag_every,
                             diag_batch=args.probe_batch, seed=args.seed, total_timesteps=10_000, learning_starts=0,
                             buffer_size=capacity, sticky_actions=0.0,
                             **({"n_atoms": args.n_atoms} if module is c51 else {}))
    env, buffer, _ = atari_replay(GAME, device, steps=capacity, capacity=capacity,
                                  full_action_space=agent_args.full_action_space, seed=args.seed)
    env.close()  # the buffer holds its frames; AgentUpdate reads only obs_shape and num_actions
    update = agent_update(module, agent_args, env, buffer)  # the agent's networks, Adam and td_loss
    q_network, target_network = update.q_network, update.target_network
    # Diagnostics and the event's inputs as the agent's main() and run.diagnose build them.
    support = q_network.atoms if module is c51 else None
    clip_range = (agent_args.v_min, agent_args.v_max) if module is c51 else None
    diagnostics = Diagnostics(q_network, dormant_tau=agent_args.dormant_tau, support=support,
                              n_actions=env.num_actions)
    probe = buffer.sample(agent_args.diag_batch)
    with torch.no_grad():
        probe_targets = module.td_targets(q_network, target_network, probe, agent_args)
    probe_obs, probe_actions = probe.obs, probe.actions

    measure = lambda: diagnostics.measure(probe_obs, probe_targets, probe_actions, clip_range=clip_range)  # noqa: E731
    for _ in range(3):  # warm-up: allocator, kernels, LAPACK workspaces
        update()
        diagnostics.record_grad_norm()
    measure()
    # Interleaved rounds, so that load from other processes hits both sides alike; medians reported.
    update_times, measure_times, record_times = [], [], []
    for _ in range(args.repeats):
        update_times.append(timed(update, device, args.updates, args.clock))
        measure_times.append(timed(measure, device, clock=args.clock))
        update()  # gradients in place for record_grad_norm
        record_times.append(timed(diagnostics.record_grad_norm, device, args.updates, args.clock))
    diagnostics.measure(probe_obs)  # restarts the grad-norm accumulator filled above
    update_s, measure_s = statistics.median(update_times), statistics.median(measure_times)
    record_s = statistics.median(record_times)
    updates_per_event = args.diag_every / args.train_frequency
    measure_cost = [100 * m / (updates_per_event * u) for m, u in zip(measure_times, update_times)]
    results = {
        "update_ms": 1e3 * update_s,
        "measure_ms": 1e3 * measure_s,
        "record_grad_norm_ms": 1e3 * record_s,
        "updates_per_event": updates_per_event,
        "measure_cost_pct": statistics.median(measure_cost),
        "grad_norm_cost_pct": 100 * record_s / update_s,
    }
    results["total_cost_pct"] = results["measure_cost_pct"] + results["grad_norm_cost_pct"]

    if args.rare:  # as run.diagnose calls them: a replay batch, the agent's td_loss for the Hessian
        rare = buffer.sample(args.rare_batch)

        def hessian_loss() -> torch.Tensor:
            return module.td_loss(q_network, target_network, rare, agent_args)[0]

        results["entk_ms"] = 1e3 * timed(lambda: diagnostics.entk(probe_obs, probe_actions), device, clock=args.clock)
        results["hessian_ms"] = 1e3 * timed(lambda: diagnostics.hessian_max_eig(hessian_loss), device,
                                            clock=args.clock)
        results["probe_fit_ms"] = 1e3 * timed(lambda: diagnostics.probe_fit_loss(rare.obs), device, clock=args.clock)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    head = f"C51 ({args.n_atoms} atoms)" if module is c51 else "DQN regression (MSE)"
    print(f"agents/{module.__name__.rsplit('.', 1)[-1]}.py update: Nature CNN 4x84x84, {args.n_actions} actions, "
          f"{head} head, layer_norm={args.layer_norm}, on {name}, {args.clock} clock")
    print(f"probe batch {args.probe_batch}, train batch {args.train_batch}, "
          f"{updates_per_event:.0f} updates per event (diag_every {args.diag_every} / train_frequency "
          f"{args.train_frequency})")
    print("| quantity | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.3f} |")
    return results


if __name__ == "__main__":
    main()
