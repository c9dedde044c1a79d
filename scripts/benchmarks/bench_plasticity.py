"""Per-update cost of Soft Weight Rescaling and Continual Backprop on the Nature CNN.

Measures, on a 4x84x84 Nature CNN Q-network (18 actions), batch 32, Adam:
- a plain update: forward, MSE loss on the taken actions, backward, Adam step;
- ``SoftWeightRescaling.step()`` (target: ≤ 3% of an update, spec methods.md §4.4);
- ``ContinualBackprop.step()`` (target: ≤ 15%) at ρ = 1e-4 with every unit eligible: the
  typical step (median), the amortised cost including the rare replacements (mean), and
  a step that replaces one unit in every layer.
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
from torch import nn

from plasticity.cbp import ContinualBackprop
from plasticity.networks import nature_cnn
from plasticity.swr import SoftWeightRescaling

BATCH, N_ACTIONS, OBS_SHAPE = 32, 18, (4, 84, 84)


class QNetwork(nn.Module):
    def __init__(self, layer_norm: bool):
        super().__init__()
        self.torso = nature_cnn(*OBS_SHAPE, layer_norm=layer_norm)
        self.head = nn.Linear(self.torso.out_features, N_ACTIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.torso(x))


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
    """Interleaved timings (update, SWR step, CBP step in every round), so load drift on a shared
    machine hits all three alike."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    model = QNetwork(layer_norm).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    obs = torch.rand(BATCH, *OBS_SHAPE, device=device)
    actions = torch.randint(N_ACTIONS, (BATCH,), device=device)
    targets = torch.randn(BATCH, device=device)
    swr = SoftWeightRescaling(model, 1e-3)
    # m = 0: every unit is eligible, so replacements happen at the full rate ρ·n from the first step.
    cbp = ContinualBackprop(model, optimizer, replacement_rate=1e-4, maturity=0,
                            generator=torch.Generator(device=device).manual_seed(0))

    def update() -> None:
        q_taken = model(obs).gather(1, actions[:, None]).squeeze(1)
        loss = nn.functional.mse_loss(q_taken, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: dict[str, list[float]] = {"update": [], "swr": [], "cbp": []}
    for i in range(warmup + repeats):
        round_times = {"update": _timed(update, cuda), "swr": _timed(swr.step, cuda), "cbp": _timed(cbp.step, cuda)}
        if i >= warmup:
            for key, value in round_times.items():
                times[key].append(value)

    replacing = []
    for i in range(warmup + min(repeats, 50)):
        update()
        for stats in cbp.stats:
            stats.accumulator = 0.999999  # the next step replaces one unit in every layer
        elapsed = _timed(cbp.step, cuda)
        if i >= warmup:
            replacing.append(elapsed)
    cbp.remove()
    return {"update": statistics.median(times["update"]), "swr": statistics.median(times["swr"]),
            "cbp_typical": statistics.median(times["cbp"]), "cbp_amortised": statistics.fmean(times["cbp"]),
            "cbp_replacing": statistics.median(replacing), "cbp_replacements": cbp.total_replacements}


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
    print(f"Nature CNN {OBS_SHAPE}, batch {BATCH}, Adam, layer_norm={args.layer_norm}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        results = bench_device(device, args.layer_norm, args.warmup, args.repeats)
        update = results["update"]
        clock = "wall time" if device.type == "cuda" else "process CPU time"
        print(f"\n[{label}] plain update: {update * 1e3:.3f} ms (median {clock})")
        for key, text, target in (("swr", "SWR step (median)", 3.0),
                                  ("cbp_typical", "CBP step, typical (median)", 15.0),
                                  ("cbp_amortised", "CBP step at ρ=1e-4, amortised (mean)", 15.0),
                                  ("cbp_replacing", "CBP step replacing in every layer (median)", None)):
            share = 100 * results[key] / update
            verdict = "" if target is None else (f"  target ≤ {target:.0f}%: " + ("ok" if share <= target else "MISSED"))
            print(f"  {text:<44} {results[key] * 1e3:8.3f} ms  {share:6.2f}% of an update{verdict}")


if __name__ == "__main__":
    main()
