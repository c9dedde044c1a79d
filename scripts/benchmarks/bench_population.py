"""Population throughput: N seeds in one process against single runs (spec populations.md).

On ``ImageMDP/mnist`` (agents/dqn.py, default MLP 256x256, default diagnostics, one env per
member) it measures, in one script run, alternating between the configurations (every
repeat runs each configuration once, in an order rotated from one repeat to the next, so
load drift on a shared machine hits them all alike):

(a) ``population``: aggregate env steps/s of the real agent with ``--num-seeds N``, for every
    N in ``--seeds``;
(b) ``single``: one single-seed run.  ``--num-seeds 1`` *is* the single run (spec 1.1: one
    code path), so when 1 is in ``--seeds`` this is that measurement, else it runs on its own;
(c) ``parallel``: two single-seed runs at once (seeds s and s+1), two processes with one
    thread each (``OMP_NUM_THREADS=1``, so torch's intra-op threads are 1): their summed SPS
    over the time both were measuring;
(d) ``floor``: the population's compute floor, measured alone in this process with the
    agent's own code -- the stacked update of the N members (``bench_agents.AgentUpdate``:
    agents/dqn.py's QNetwork, fused Adam, Interventions, a real replay batch ``[N, 32, ...]``,
    ``dqn.td_loss``, backward, Adam step; timed in a loop), and the per-step cost of the loop's
    other lines (acting: Q-values + ``experiment.epsilon_greedy``; the env step, ``AgentEnv.step``;
    ``buffer.add``), each timed alone:

        floor seconds per step = update / train_frequency + act + env step + buffer add
        floor SPS (aggregate)   = N * num_envs / floor seconds per step

    printed beside the measured SPS as the ratio measured / floor;
(e) every one of these again with ``--layer-norm --swr 1e-3 --cbp`` (variant ``methods``).

How SPS is measured: the real agent as a subprocess (``python agents/dqn.py ... --num-seeds N
--total-timesteps T --learning-starts L``), reading ``charts/SPS`` (one window every
``--log-every`` env steps) from member 0's event file -- every member logs the same per-member
rate, the aggregate is N times it.  Only the windows that start at least one window after
learning starts count (process start-up, data loading, buffer allocation and the first
updates' warm-up are left out), and SPS = their steps / their seconds.  By default the measured
span is ``--steps 10000`` env steps per member = the default ``--diag-every``, so every
measurement holds exactly one default diagnostics event, as training does (the JSON records
``diag_events`` per run).  The floor leaves the diagnostics and the loop's bookkeeping out:
that overhead is what the ratio shows.

``--env atari`` runs the same on ``ALE/Breakout-v5`` (Nature CNN, agents' Atari defaults but
``--learning-starts``), with N = 1, 2 by default: ``--num-seeds 2`` aggregate against two single
runs in parallel.

    python scripts/benchmarks/bench.py population                          # MNIST, N = 1 .. 32, both variants
    python scripts/benchmarks/bench.py population --seeds 1 4 16 --repeats 3 --json pop.json --plot pop.png
    python scripts/benchmarks/bench.py population --seconds 20             # ~20 s measured per run
    python scripts/benchmarks/bench.py population --env atari --variants plain
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python scripts/benchmarks/bench_population.py` from a checkout

import torch  # noqa: E402
import tyro  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from agents import dqn  # noqa: E402
from agents.harness import experiment  # noqa: E402
from envs.factory import AgentEnv, population_seeds  # noqa: E402
from envs.replay_buffer import make_replay_buffer  # noqa: E402
from plasticity.streams import MemberRandom, stream_seed  # noqa: E402
from scripts.benchmarks.bench_agents import _median_time, agent_update  # noqa: E402

SHARED_MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
SHIPPED_MNIST = ROOT / "tests" / "data" / "mnist"
ENVS = {"mnist": ("ImageMDP/mnist", [1, 2, 4, 8, 16, 32]), "atari": ("ALE/Breakout-v5", [1, 2])}
#: The agent flags of each variant (on top of the agent's defaults).
VARIANTS = {"plain": [], "methods": ["--layer-norm", "--swr", "1e-3", "--cbp"]}
AGENT = ROOT / "agents" / "dqn.py"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", choices=list(ENVS), default="mnist",
                        help="mnist: ImageMDP/mnist (MLP); atari: ALE/Breakout-v5 (Nature CNN)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="population sizes N (default: 1 2 4 8 16 32 on mnist, 1 2 on atari)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="plain: the agent's defaults; methods: --layer-norm --swr 1e-3 --cbp")
    parser.add_argument("--steps", type=int, default=10_000,
                        help="measured env steps per member per run (a multiple of --log-every; default = the "
                             "default --diag-every, so one diagnostics event falls in every measurement)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="instead of --steps: about this many measured seconds per run (steps from the "
                             "previous repeat's SPS, or in the first from the floor, an upper bound of the SPS)")
    parser.add_argument("--learning-starts", type=int, default=1_000, help="the agent's --learning-starts")
    parser.add_argument("--log-every", type=int, default=1_000, help="the agent's --log-every: one SPS window")
    parser.add_argument("--diag-every", type=int, default=None, help="the agent's --diag-every (default: its own)")
    parser.add_argument("--buffer-size", type=int, default=None,
                        help="the agent's --buffer-size (default: the run's total steps, so it never wraps; the "
                             "agent's own 100k would be N x 157 MB on MNIST)")
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=None,
                        help="the agent's --hidden-sizes (default: its own, 256 256)")
    parser.add_argument("--threads", type=int, default=_cores(),
                        help="threads of the population runs, the single run and the floor (default: all cores)")
    parser.add_argument("--parallel-threads", type=int, default=1, help="threads of each of the two parallel runs")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds (medians reported)")
    parser.add_argument("--floor-repeats", type=int, default=50, help="timed calls per floor component")
    parser.add_argument("--seed", type=int, default=1, help="seed s of every run (members s .. s+N-1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data-dir", default=None,
                        help=f"MNIST folder (default {SHARED_MNIST} if present, else the shipped test subset)")
    parser.add_argument("--no-parallel", action="store_true", help="skip (c), the two parallel runs")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--plot", default=None, help="plot aggregate SPS vs N here (matplotlib)")
    args = parser.parse_args(argv)
    env_id, default_seeds = ENVS[args.env]
    args.env_id = env_id
    args.seeds = sorted(set(args.seeds or default_seeds))
    if args.data_dir is None and args.env == "mnist":
        args.data_dir = str(SHARED_MNIST if (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists() else SHIPPED_MNIST)
    if min(args.seeds) < 1:
        parser.error(f"--seeds must be positive, got {args.seeds}")
    if args.steps < args.log_every or args.steps % args.log_every:
        parser.error(f"--steps {args.steps} must be a positive multiple of --log-every {args.log_every}")
    if args.repeats < 1 or args.floor_repeats < 1 or args.threads < 1 or args.parallel_threads < 1:
        parser.error("--repeats, --floor-repeats, --threads and --parallel-threads must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    return args


# ---------------------------------------------------------------- the agent's flags, one source for runs and floor
class Span(NamedTuple):
    """The steps of one run: measured windows from ``start`` (> learning starts + one window) to ``total``."""

    start: int
    total: int

    @property
    def steps(self) -> int:
        return self.total - self.start


def span_of(opts, steps: int) -> Span:
    """Measure from the first window boundary at least one window after learning starts, for ``steps`` steps."""
    settle = opts.learning_starts + opts.log_every
    start = -(-settle // opts.log_every) * opts.log_every
    steps = max(opts.log_every, -(-steps // opts.log_every) * opts.log_every)
    return Span(start, start + steps)


def agent_flags(opts, variant: str, members: int, seed: int, total: int, run_name: str = "bench",
                runs_dir: str = "runs") -> list[str]:
    """The command-line flags of agents/dqn.py for one run (the floor parses the same list)."""
    flags = ["--env-id", opts.env_id, "--seed", str(seed), "--num-seeds", str(members), "--num-envs", "1",
             "--total-timesteps", str(total), "--learning-starts", str(opts.learning_starts),
             "--buffer-size", str(opts.buffer_size or max(total, 1_000)), "--log-every", str(opts.log_every),
             "--checkpoint-every", "0", "--checkpoint-buffer", "never", "--runs-dir", runs_dir,
             "--run-name", run_name, "--cuda" if opts.device == "cuda" else "--no-cuda"]
    if opts.data_dir and opts.env == "mnist":
        flags += ["--data-dir", str(opts.data_dir)]
    if opts.hidden_sizes:
        flags += ["--hidden-sizes", *map(str, opts.hidden_sizes)]
    if opts.diag_every is not None:
        flags += ["--diag-every", str(opts.diag_every)]
    return flags + VARIANTS[variant]


def parse_agent_args(flags: list[str]) -> dqn.Args:
    """``dqn.Args`` exactly as ``python agents/dqn.py FLAGS`` resolves them (tyro, then the family defaults)."""
    args = tyro.cli(dqn.Args, args=flags)
    experiment.resolve_args(args, agent="dqn")
    return args


# ---------------------------------------------------------------------------------------------- the floor
def compute_floor(agent_args: dqn.Args, repeats: int = 50, fill_steps: int | None = None) -> dict:
    """The population's compute floor, each part measured alone, with the agent's own code.

    The env (``AgentEnv.make``), replay buffer and exploration stream are built as ``experiment.start``
    builds them for ``agent_args`` (members ``seed .. seed+N-1``); the update is ``bench_agents.AgentUpdate``
    (dqn's QNetwork, fused Adam, Interventions, ``dqn.td_loss`` on a real ``[N, B, ...]`` replay batch, backward,
    Adam step, the methods' after-update hooks).  ``fill_steps`` (default learning starts, at least a batch)
    loop steps fill the buffer first.  Returns milliseconds per call of each part and the floor.
    """
    device = torch.device("cuda" if agent_args.cuda else "cpu")
    seeds = population_seeds(agent_args)
    members, num_envs = len(seeds), agent_args.num_envs
    env = AgentEnv.make(agent_args, device, seeds=seeds)
    try:
        buffer = make_replay_buffer(env.obs_shape, agent_args.buffer_size, num_envs, device,
                                    seeds=[stream_seed(s, "replay") for s in seeds], sample_device=device)
        action_random = MemberRandom([stream_seed(s, "actions") for s in seeds], device)
        update = agent_update(dqn, agent_args, env, buffer)
        q_network = update.q_network
        state = {"obs": env.reset(seeds=seeds)}
        epsilon = 0.5  # epsilon_greedy draws and computes both branches whatever epsilon is

        def act():
            with torch.no_grad():
                q_values = q_network.q_values(state["obs"])
            state["q"] = q_values
            state["actions"] = experiment.epsilon_greedy(q_values, epsilon, action_random)

        def env_step():
            state["step"] = env.step(state["actions"], greedy_actions=state["q"].argmax(dim=2))

        def buffer_add():
            step = state["step"]
            buffer.add(state["obs"], state["actions"], step.learn_reward, step.next_obs, step.terminated,
                       step.truncated, valid=step.store)
            state["obs"] = step.obs

        parts = {"act_ms": act, "env_step_ms": env_step, "buffer_add_ms": buffer_add}
        fill = max(agent_args.batch_size, agent_args.learning_starts if fill_steps is None else fill_steps)
        for _ in range(fill):  # real transitions of the agent's own (untrained) policy
            for part in parts.values():
                part()
        for _ in range(3):  # warm-up: allocator, kernels
            update()
        times = {"update_ms": _median_time(update, repeats, device) * 1e3}
        samples = {name: [] for name in parts}
        for _ in range(repeats * 3):  # the three parts in loop order, each timed alone
            for name, part in parts.items():
                samples[name].append(_median_time(part, 1, device) * 1e3)
        times.update({name: statistics.median(values) for name, values in samples.items()})
    finally:
        env.close()
    step_ms = times["act_ms"] + times["env_step_ms"] + times["buffer_add_ms"]
    floor_ms = times["update_ms"] / agent_args.train_frequency + step_ms
    return {**times, "members": members, "num_envs": num_envs, "train_frequency": agent_args.train_frequency,
            "step_ms": step_ms, "floor_ms_per_step": floor_ms, "floor_sps": 1e3 * members * num_envs / floor_ms,
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- the runs
class Window(NamedTuple):
    """One charts/SPS window: env steps per member (start, end], and its wall-clock interval."""

    start: int
    end: int
    wall_start: float
    wall_end: float

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def seconds(self) -> float:
        return self.wall_end - self.wall_start


def read_windows(run_dir: Path) -> list[Window]:
    """Every charts/SPS window of a run folder, from its event file."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    windows, previous = [], 0
    for event in sorted(events.Scalars("charts/SPS"), key=lambda e: e.step):
        seconds = (event.step - previous) / event.value
        windows.append(Window(previous, event.step, event.wall_time - seconds, event.wall_time))
        previous = event.step
    return windows


def rate(windows: list[Window]) -> float:
    """Env steps per member per second over ``windows`` (their steps over their seconds)."""
    return sum(w.steps for w in windows) / sum(w.seconds for w in windows)


def diag_events(opts, span: Span) -> int:
    """Diagnostics events inside the measured span (every --diag-every env steps, learning has started)."""
    every = dqn.Args().diag_every if opts.diag_every is None else opts.diag_every
    return 0 if not every else span.total // every - span.start // every


class Launched(NamedTuple):
    process: subprocess.Popen
    run_dir: Path  # member 0's folder
    log: Path
    command: list[str]


def launch(opts, variant: str, members: int, seed: int, span: Span, threads: int, runs_dir: Path,
           name: str) -> Launched:
    flags = agent_flags(opts, variant, members, seed, span.total, run_name=name, runs_dir=str(runs_dir))
    command = [sys.executable, str(AGENT), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = runs_dir / f"{name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    member0 = name if members == 1 else f"{name}-seed{seed}"
    return Launched(process, runs_dir / member0, log, command)


def finish(launched: Launched, span: Span) -> list[Window]:
    """Wait for a run; its measured windows (those from ``span.start`` on)."""
    code = launched.process.wait()
    if code != 0:
        tail = launched.log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(launched.command)} exited with {code}:\n{tail}")
    windows = [w for w in read_windows(launched.run_dir) if w.start >= span.start]
    if not windows:
        raise RuntimeError(f"{launched.run_dir}: no charts/SPS window from step {span.start} on")
    return windows


def measure_run(opts, variant: str, members: int, span: Span, threads: int, runs_dir: Path, name: str) -> dict:
    """One run's aggregate SPS over its measured windows."""
    launched = launch(opts, variant, members, opts.seed, span, threads, runs_dir, name)
    windows = finish(launched, span)
    per_member = rate(windows)
    return {"sps": members * per_member, "per_member_sps": per_member, "measured_steps": span.steps,
            "measured_seconds": sum(w.seconds for w in windows), "total_timesteps": span.total,
            "threads": threads, "command": launched.command[1:]}


def measure_parallel(opts, variant: str, span: Span, runs_dir: Path, name: str) -> dict:
    """Two single-seed runs (seeds s, s+1) at once, ``--parallel-threads`` each: their summed SPS while both ran."""
    launched = [launch(opts, variant, 1, opts.seed + k, span, opts.parallel_threads, runs_dir, f"{name}-{k}")
                for k in range(2)]
    runs = [finish(one, span) for one in launched]
    common_start = max(windows[0].wall_start for windows in runs)
    common_end = min(windows[-1].wall_end for windows in runs)
    slack = 0.05  # s: a window's ends are taken at its flush and its event write, a few ms apart
    both = [[w for w in windows if w.wall_start >= common_start - slack and w.wall_end <= common_end + slack]
            for windows in runs]
    overlap = all(both)
    used = both if overlap else runs  # no window inside the common interval: all measured windows, flagged
    rates = [rate(windows) for windows in used]
    return {"sps": sum(rates), "runs_sps": rates, "overlap": overlap,
            "overlap_fraction": sum(w.steps for windows in used for w in windows) / (2 * span.steps),
            "measured_steps": span.steps, "total_timesteps": span.total, "threads_each": opts.parallel_threads,
            "commands": [one.command[1:] for one in launched]}


# ---------------------------------------------------------------------------------------------- the schedule
def configurations(opts) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """(kind, variant, N): floors first (an estimate for --seconds), then the runs; both rotated per repeat."""
    floors = [("floor", v, n) for v in opts.variants for n in sorted(set(opts.seeds) | {1})]
    runs = [("population", v, n) for v in opts.variants for n in opts.seeds]
    runs += [("single", v, 1) for v in opts.variants if 1 not in opts.seeds]
    runs += [] if opts.no_parallel else [("parallel", v, 1) for v in opts.variants]
    return floors, runs


def _rotated(items: list, by: int) -> list:
    by %= max(len(items), 1)
    return items[by:] + items[:by]


def run_benchmark(opts) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)  # the floors run with the population's threads
    try:
        return _run_benchmark(opts)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(opts) -> dict:
    floors, runs = configurations(opts)
    raw: dict = {v: {"floor": {}, "population": {}, "single": [], "parallel": []} for v in opts.variants}
    base_span = span_of(opts, opts.steps)
    estimate: dict = {}  # (kind, variant, N) -> per-member SPS, for --seconds
    with tempfile.TemporaryDirectory(prefix="bench_population_") as tmp:
        for repeat in range(opts.repeats):
            for _kind, variant, n in _rotated(floors, repeat):
                flags = agent_flags(opts, variant, n, opts.seed, base_span.total, runs_dir=tmp)
                floor = compute_floor(parse_agent_args(flags), repeats=opts.floor_repeats)
                raw[variant]["floor"].setdefault(n, []).append(floor)
                print(f"  [{repeat + 1}/{opts.repeats}] floor {variant:<7} N={n:<3} update {floor['update_ms']:.2f} ms, "
                      f"step {floor['step_ms']:.2f} ms -> {floor['floor_sps']:.0f} SPS", flush=True)
            for kind, variant, n in _rotated(runs, repeat):
                span = base_span
                if opts.seconds is not None:
                    per_member = estimate.get((kind, variant, n), raw[variant]["floor"][n][-1]["floor_sps"] / n)
                    span = span_of(opts, math.ceil(opts.seconds * per_member))
                name = f"r{repeat}-{kind}-{variant}-n{n}"
                if kind == "parallel":
                    result = measure_parallel(opts, variant, span, Path(tmp), name)
                    raw[variant]["parallel"].append(result)
                    estimate[(kind, variant, n)] = min(result["runs_sps"])
                else:
                    result = measure_run(opts, variant, n, span, opts.threads, Path(tmp), name)
                    (raw[variant]["single"] if kind == "single" else raw[variant]["population"].setdefault(n, [])
                     ).append(result)
                    estimate[(kind, variant, n)] = result["per_member_sps"]
                result["diag_events"] = diag_events(opts, span)
                print(f"  [{repeat + 1}/{opts.repeats}] {kind:<10} {variant:<7} N={n:<3} {result['sps']:8.0f} SPS "
                      f"({span.steps} steps per member measured)", flush=True)
    return summarise(opts, raw)


def _median(results: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in results)


def summarise(opts, raw: dict) -> dict:
    """Medians over the repeats, the floors' ratios; every raw number kept."""
    out = {"config": {"env": opts.env, "env_id": opts.env_id, "agent": "dqn", "seeds": opts.seeds,
                      "variants": {v: VARIANTS[v] for v in opts.variants}, "steps": opts.steps,
                      "seconds": opts.seconds, "learning_starts": opts.learning_starts, "log_every": opts.log_every,
                      "diag_every": opts.diag_every, "hidden_sizes": opts.hidden_sizes, "threads": opts.threads,
                      "parallel_threads": opts.parallel_threads, "repeats": opts.repeats, "seed": opts.seed,
                      "device": opts.device, "data_dir": opts.data_dir, "cores": _cores(),
                      "torch": torch.__version__, "python": platform.python_version(),
                      "machine": platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")},
           "variants": {}}
    for variant, parts in raw.items():
        floors = {n: {key: runs[0][key] if isinstance(runs[0][key], int) else statistics.median(f[key] for f in runs)
                      for key in runs[0]} for n, runs in parts["floor"].items()}  # counts stay ints
        population = {}
        for n, runs in parts["population"].items():
            sps = _median(runs, "sps")
            population[str(n)] = {"sps": sps, "per_member_sps": _median(runs, "per_member_sps"),
                                  "floor": floors[n], "floor_ratio": sps / floors[n]["floor_sps"], "runs": runs}
        single_runs = parts["single"] or parts["population"].get(1, [])
        single = {"sps": _median(single_runs, "sps"), "floor": floors[1],
                  "floor_ratio": _median(single_runs, "sps") / floors[1]["floor_sps"],
                  "same_as_population_n1": not parts["single"], "runs": single_runs}
        entry = {"flags": VARIANTS[variant], "population": population, "single": single,
                 "floors": {str(n): f for n, f in floors.items()}}
        if parts["parallel"]:
            entry["parallel"] = {"sps": _median(parts["parallel"], "sps"), "runs": parts["parallel"],
                                 "threads_each": opts.parallel_threads}
        out["variants"][variant] = entry
    return out


def print_table(results: dict) -> None:
    config = results["config"]
    print(f"\n{config['env_id']}, agents/dqn.py, one env per member, {config['threads']} thread(s) "
          f"(parallel runs: {config['parallel_threads']} each), median of {config['repeats']} repeat(s); "
          f"floor = update / train_frequency + act + env step + buffer add, each measured alone")
    print("| variant | run | aggregate SPS | per member | x single | floor SPS | measured / floor | update ms | "
          "step ms |\n|---|---|---|---|---|---|---|---|---|")
    notes = []
    for variant, entry in results["variants"].items():
        single = entry["single"]["sps"]
        rows = [(f"--num-seeds {n}", row) for n, row in entry["population"].items()]
        if not entry["single"]["same_as_population_n1"]:
            rows.append(("single run", entry["single"]))
        for label, row in rows:
            members = row["floor"]["members"]
            floor = row["floor"]
            print(f"| {variant} | {label} | {row['sps']:.0f} | {row['sps'] / members:.0f} | {row['sps'] / single:.2f} "
                  f"| {floor['floor_sps']:.0f} | {row['floor_ratio']:.2f} | {floor['update_ms']:.2f} | "
                  f"{floor['step_ms']:.2f} |")
        if "parallel" in entry:
            parallel = entry["parallel"]
            print(f"| {variant} | 2 single runs in parallel, {parallel['threads_each']} thread each (summed) | "
                  f"{parallel['sps']:.0f} | {parallel['sps'] / 2:.0f} | {parallel['sps'] / single:.2f} | | | | |")
            if not all(run["overlap"] for run in parallel["runs"]):
                notes.append(f"{variant}: in some parallel pair no window lay inside the time both ran; those "
                             "pairs use all their measured windows (give more --steps)")
    print(*notes, sep="\n")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for index, (variant, entry) in enumerate(results["variants"].items()):
        color = f"C{index}"
        sizes = sorted(int(n) for n in entry["population"])
        ax.plot(sizes, [entry["population"][str(n)]["sps"] for n in sizes], "o-", color=color,
                label=f"{variant}: population (--num-seeds N)")
        ax.plot(sizes, [entry["population"][str(n)]["floor"]["floor_sps"] for n in sizes], ":", color=color,
                label=f"{variant}: compute floor")
        ax.axhline(entry["single"]["sps"], color=color, linestyle="--", linewidth=1, label=f"{variant}: single run")
        if "parallel" in entry:
            ax.axhline(entry["parallel"]["sps"], color=color, linestyle="-.", linewidth=1,
                       label=f"{variant}: 2 single runs in parallel (summed)")
    ax.set_xscale("log", base=2)
    sizes = sorted({int(n) for entry in results["variants"].values() for n in entry["population"]})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("members N")
    ax.set_ylabel("aggregate env steps / s")
    config = results["config"]
    ax.set_title(f"{config['env_id']} DQN, {config['threads']} thread(s)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    print(f"population benchmark: {opts.env_id}, N in {opts.seeds}, variants {opts.variants}, {opts.threads} "
          f"thread(s), {opts.repeats} repeat(s), torch {torch.__version__}", flush=True)
    results = run_benchmark(opts)
    print_table(results)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {opts.json}")
    if opts.plot:
        plot(results, opts.plot)
        print(f"wrote {opts.plot}")
    return results


if __name__ == "__main__":
    main()
