"""Cost of the plasticity diagnostics relative to training (spec diagnostics.md, "Cost rules").

Times one default ``Diagnostics.measure`` event (Nature CNN, 4x84x84 uint8
observations, 1024 probe samples, TD targets) against one DQN training update
(batch 32, online forward + target forward + MSE on the taken action + backward
+ Adam step), and reports the event's cost amortised over the updates between
two events: ``diag_every / train_frequency`` (10,000 / 4 = 2,500 by default).
The budget is ≤ 3 %.  The per-update ``record_grad_norm`` call is timed too,
since it runs at every update rather than every event.  Training time here is
updates only (no env steps, no acting), so the percentages are upper bounds.
Rounds are interleaved (updates, one event, grad-norm calls) so that load from
other processes hits both sides alike; medians are reported.

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
import torch.nn.functional as F
import tyro
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python scripts/benchmarks/bench_diagnostics.py` from a checkout

from plasticity.diagnostics import Diagnostics  # noqa: E402
from plasticity.networks import build_torso  # noqa: E402


@dataclass
class Args:
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    probe_batch: int = 1024
    """probe observations per diagnostic event (the agents' --diag-batch)"""
    train_batch: int = 32
    """minibatch of one training update"""
    n_actions: int = 18
    """width of the Q head (18 = full Atari action set)"""
    n_atoms: int = 1
    """> 1 times a categorical head with that many atoms (C51: 51)"""
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


class QNetwork(nn.Module):
    """The agents' network: Nature CNN torso on uint8 pixels, linear head (A or A·N outputs)."""

    def __init__(self, n_actions: int, n_atoms: int, layer_norm: bool):
        super().__init__()
        self.torso = build_torso("nature_cnn", (4, 84, 84), layer_norm=layer_norm)
        self.head = nn.Linear(self.torso.out_features, n_actions * n_atoms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.torso(x.float() / 255.0))


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
    torch.manual_seed(args.seed)

    q_network = QNetwork(args.n_actions, args.n_atoms, args.layer_norm).to(device)
    target_network = QNetwork(args.n_actions, args.n_atoms, args.layer_norm).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=1e-4)
    support = torch.linspace(-10.0, 10.0, args.n_atoms, device=device) if args.n_atoms > 1 else None
    diagnostics = Diagnostics(q_network, support=support, n_actions=args.n_actions)

    def pixels(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, device=device)

    obs, next_obs = pixels(args.train_batch), pixels(args.train_batch)
    actions = torch.randint(0, args.n_actions, (args.train_batch,), device=device)
    rewards = torch.randn(args.train_batch, device=device)

    def q_values(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = network(x)
        if support is None:
            return out
        return torch.softmax(out.view(len(x), args.n_actions, args.n_atoms), -1) @ support

    def update(record: bool) -> None:
        with torch.no_grad():
            targets = rewards + 0.99 * q_values(target_network, next_obs).max(1).values
        taken = q_values(q_network, obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = F.mse_loss(taken, targets)
        optimizer.zero_grad()
        loss.backward()
        if record:
            diagnostics.record_grad_norm()
        optimizer.step()

    probe_obs = pixels(args.probe_batch)
    probe_targets = torch.randn(args.probe_batch, device=device) * 5
    probe_actions = torch.randint(0, args.n_actions, (args.probe_batch,), device=device)
    clip_range = (-10.0, 10.0) if support is not None else None

    measure = lambda: diagnostics.measure(probe_obs, probe_targets, probe_actions, clip_range=clip_range)  # noqa: E731
    for _ in range(3):  # warm-up: allocator, kernels, LAPACK workspaces
        update(True)
    measure()
    # Interleaved rounds, so that load from other processes hits both sides alike; medians reported.
    update_times, measure_times, record_times = [], [], []
    for _ in range(args.repeats):
        update_times.append(timed(lambda: update(False), device, args.updates, args.clock))
        measure_times.append(timed(measure, device, clock=args.clock))
        update(False)  # gradients in place for record_grad_norm
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

    if args.rare:
        rare_obs = probe_obs[: args.rare_batch]
        rare_targets = probe_targets[: args.rare_batch]
        rare_actions = probe_actions[: args.rare_batch]

        def hessian_loss() -> torch.Tensor:
            return F.mse_loss(q_values(q_network, rare_obs).gather(1, rare_actions.unsqueeze(1)).squeeze(1),
                              rare_targets)

        results["entk_ms"] = 1e3 * timed(lambda: diagnostics.entk(probe_obs, probe_actions), device, clock=args.clock)
        results["hessian_ms"] = 1e3 * timed(lambda: diagnostics.hessian_max_eig(hessian_loss), device,
                                            clock=args.clock)
        results["probe_fit_ms"] = 1e3 * timed(lambda: diagnostics.probe_fit_loss(rare_obs), device, clock=args.clock)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    head = f"categorical ({args.n_atoms} atoms)" if support is not None else "regression"
    print(f"Nature CNN 4x84x84, {args.n_actions} actions, {head} head, layer_norm={args.layer_norm}, on {name}, "
          f"{args.clock} clock")
    print(f"probe batch {args.probe_batch}, train batch {args.train_batch}, "
          f"{updates_per_event:.0f} updates per event (diag_every {args.diag_every} / train_frequency "
          f"{args.train_frequency})")
    print("| quantity | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.3f} |")
    return results


if __name__ == "__main__":
    main()
