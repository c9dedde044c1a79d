"""Per-update cost of Soft Weight Rescaling and Continual Backprop on the DQN agent's Nature CNN.

The update is the DQN agent's own (agents/dqn.py through ``bench_agents.AgentUpdate``: its
QNetwork on 4x84x84 frames with the full 18-action set, target network, fused Adam, ``td_loss``
(MSE to r + γ(1 − terminated) max Q_target), batch 32 from its replay buffer of real
ALE/Breakout-v5 frames).  The methods are switched on through the agent's ``Args``
(``--swr 1e-3 --cbp --cbp-maturity 0``), so ``Interventions`` builds exactly what the agent runs.
Measures:
- a plain update: the agent's update with no method on;
- the same update with ``--swr --cbp`` on: its update lines (CBP's activation hooks recording),
  then each method's after-update hook in ``Interventions``' order (CBP, then SWR), timed apart:
- ``SoftWeightRescaling.step()`` (target: ≤ 3% of an update, spec methods.md §4.4);
- ``ContinualBackprop.step()`` (target: ≤ 15%) at ρ = 1e-4 with every unit eligible: the
  typical step (median), the amortised cost including the rare replacements (mean), and
  a step that replaces one unit in every layer;
- the whole update with both methods (update lines + both steps) against the plain one.
Each timing is the median (or mean, where said) over ``--repeats`` rounds after
``--warmup`` rounds: on CUDA wall time, synchronising around every call; on CPU the
process's CPU time, so that other jobs on a shared machine do not distort it
(single-threaded by default, where CPU time equals the work of the call).

    python -m scripts.benchmarks.bench_plasticity                 # CPU, and CUDA when available
    python -m scripts.benchmarks.bench_plasticity --devices cpu --layer-norm
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from agents import dqn
from scripts.benchmarks.bench_agents import agent_update, atari_replay

GAME, BATCH = "ALE/Breakout-v5", 32
SWR, CBP_RATE = 1e-3, 1e-4
def _timed(fn: Callable[[], object], cuda: bool) -> float:
    """CUDA: wall time with synchronisation. CPU: the process's CPU time, which other processes'
    load on a shared machine does not inflate (it sums over torch's threads)."""
    if cuda:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def bench_device(device: torch.device, layer_norm: bool, warmup: int, repeats: int) -> dict[str, float]:
    """Interleaved timings (plain update, update with the methods, CBP step, SWR step in every round),
    so load drift on a shared machine hits them all alike."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    flags = dict(env_id=GAME, cuda=cuda, full_action_space=True, sticky_actions=0.0, layer_norm=layer_norm,
                 batch_size=BATCH, total_timesteps=10_000, learning_starts=0, buffer_size=1000, seed=0)
    env, buffer, _ = atari_replay(GAME, device, full_action_space=True)
    env.close()  # the buffer holds its frames; AgentUpdate reads only obs_shape and num_actions
    plain = agent_update(dqn, dqn.Args(**flags), env, buffer)
    # m = 0: every unit is eligible, so replacements happen at the full rate ρ·n from the first step.
    methods = agent_update(dqn, dqn.Args(**flags, swr=SWR, cbp=True, cbp_replacement_rate=CBP_RATE, cbp_maturity=0),
                           env, buffer)
    hooks = methods.interventions.methods  # what interventions.after_step runs, in its order: cbp, swr
    assert list(hooks) == ["cbp", "swr"], hooks
    cbp = hooks["cbp"].method  # the ContinualBackprop the agent's Interventions built

    def after(name: str) -> Callable[[], None]:
        return lambda: hooks[name].after_update(methods.updates - 1, methods.updates, buffer.sample_obs)

    times: dict[str, list[float]] = {"update": [], "learn": [], "cbp": [], "swr": []}
    for i in range(warmup + repeats):
        round_times = {"update": _timed(plain, cuda), "learn": _timed(methods.learn, cuda),
                       "cbp": _timed(after("cbp"), cuda), "swr": _timed(after("swr"), cuda)}
        if i >= warmup:
            for key, value in round_times.items():
                times[key].append(value)

    replacing = []
    for i in range(warmup + min(repeats, 50)):
        methods.learn()
        for stats in cbp.stats:
            stats.accumulator = 0.999999  # the next step replaces one unit in every layer
        elapsed = _timed(after("cbp"), cuda)
        if i >= warmup:
            replacing.append(elapsed)
    with_methods = [learn + c + w for learn, c, w in zip(times["learn"], times["cbp"], times["swr"])]
    return {"update": statistics.median(times["update"]), "swr": statistics.median(times["swr"]),
            "cbp_typical": statistics.median(times["cbp"]), "cbp_amortised": statistics.fmean(times["cbp"]),
            "cbp_replacing": statistics.median(replacing), "cbp_replacements": cbp.total_replacements,
            "with_methods": statistics.median(with_methods)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU time sums over them)")
    parser.add_argument("--layer-norm", action="store_true", help="Nature CNN with LayerNorm")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"agents/dqn.py update: Nature CNN (4, 84, 84), 18 actions, batch {BATCH}, fused Adam, MSE TD loss, "
          f"layer_norm={args.layer_norm}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        results = bench_device(device, args.layer_norm, args.warmup, args.repeats)
        update = results["update"]
        clock = "wall time" if device.type == "cuda" else "process CPU time"
        print(f"\n[{label}] plain update (the agent's, no method on): {update * 1e3:.3f} ms (median {clock})")
        for key, text, target in (("swr", "SWR step (median)", 3.0),
                                  ("cbp_typical", "CBP step, typical (median)", 15.0),
                                  ("cbp_amortised", "CBP step at ρ=1e-4, amortised (mean)", 15.0),
                                  ("cbp_replacing", "CBP step replacing in every layer (median)", None)):
            share = 100 * results[key] / update
            verdict = "" if target is None else (f"  target ≤ {target:.0f}%: " + ("ok" if share <= target else "MISSED"))
            print(f"  {text:<44} {results[key] * 1e3:8.3f} ms  {share:6.2f}% of an update{verdict}")
        print(f"  {'update with --swr --cbp (median)':<44} {results['with_methods'] * 1e3:8.3f} ms  "
              f"{100 * (results['with_methods'] / update - 1):+6.2f}% over a plain update")


if __name__ == "__main__":
    main()
