"""Throughput of the image-classification MDP (envs/image_mdp.py): env steps per second.

env steps/s = num_envs x vector steps / s, with MNIST observations, for float32
and uint8 observations, on the CPU and (when available) CUDA. Actions come from
a pre-drawn bank on the env's device, so only the env is timed.

    python scripts/benchmarks/bench_env.py                       # CPU (+ CUDA if present), 1 / 64 / 1024 envs
    python scripts/benchmarks/bench_env.py --threads 2 --seconds 5 --num-envs 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python scripts/benchmarks/bench_env.py` from a checkout

from envs.image_mdp import ImageMDPVectorEnv  # noqa: E402

SHARED_MNIST = ROOT.parent / "shared" / "datasets" / "mnist"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_image_mdp(
    device: str,
    num_envs_list=(1, 64, 1024),
    seconds: float = 2.0,
    *,
    obs_dtypes=("float32", "uint8"),
    data_dir: str | os.PathLike | None = None,
    shift=("none",),
    warmup_steps: int = 50,
    repeats: int = 5,
) -> list[dict]:
    """Time ``ImageMDPVectorEnv.step`` for each (num_envs, obs_dtype); one dict per measurement.

    ``seconds`` are split into ``repeats`` windows; ``env_steps_per_s`` is the best
    window (least disturbed by other processes, as ``timeit`` reports), and
    ``median_env_steps_per_s`` the median one.
    """
    if data_dir is None and SHARED_MNIST.exists():
        data_dir = SHARED_MNIST
    results = []
    for num_envs in num_envs_list:
        for obs_dtype in obs_dtypes:
            env = ImageMDPVectorEnv(
                "mnist", num_envs=num_envs, data_dir=data_dir, device=device, obs_dtype=obs_dtype, shift=shift
            )
            # A single run: one member, actions [members=1, num_envs].
            actions = torch.randint(env.num_classes, (64, 1, num_envs), device=env.device)
            env.reset(seeds=[0])
            for step in range(warmup_steps):
                env.step(actions[step % 64])
            rates = [_vector_steps_per_s(env, actions, seconds / repeats) for _ in range(repeats)]
            rates.sort()
            results.append(
                {
                    "device": str(env.device),
                    "num_envs": num_envs,
                    "obs_dtype": obs_dtype,
                    "shift": "+".join(env.shift),
                    "vector_steps_per_s": rates[-1],
                    "env_steps_per_s": num_envs * rates[-1],
                    "median_env_steps_per_s": num_envs * rates[len(rates) // 2],
                }
            )
    return results


def _vector_steps_per_s(env: ImageMDPVectorEnv, actions: torch.Tensor, seconds: float) -> float:
    _synchronize(env.device)
    vector_steps, start = 0, time.perf_counter()
    while True:
        for _ in range(64):  # check the clock every 64 steps; the env never syncs on its own
            env.step(actions[vector_steps % 64])
            vector_steps += 1
        if time.perf_counter() - start >= seconds:
            break
    _synchronize(env.device)
    return vector_steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--num-envs", nargs="+", type=int, default=[1, 64, 1024])
    parser.add_argument("--obs-dtypes", nargs="+", default=["float32", "uint8"])
    parser.add_argument("--shift", nargs="+", default=["none"], help="image-MDP shifts active while timing")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="timed seconds per measurement (5 windows)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for these small ops on a shared box)",
    )
    parser.add_argument("--data-dir", default=None, help=f"MNIST folder (default {SHARED_MNIST} if present)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    header = (
        f"{'device':<8}{'num_envs':>9}{'obs':>9}  {'vector steps/s':>15}{'env steps/s':>15}{'(median)':>15}"
    )
    print(
        f"image MDP (MNIST, shift={'+'.join(args.shift)}), torch {torch.__version__}, {args.threads} CPU thread(s)"
    )
    print(header)
    for device in devices:
        for row in bench_image_mdp(
            device,
            args.num_envs,
            args.seconds,
            obs_dtypes=args.obs_dtypes,
            data_dir=args.data_dir,
            shift=args.shift,
        ):
            print(
                f"{row['device']:<8}{row['num_envs']:>9}{row['obs_dtype']:>9}  "
                f"{row['vector_steps_per_s']:>15,.0f}{row['env_steps_per_s']:>15,.0f}"
                f"{row['median_env_steps_per_s']:>15,.0f}"
            )


if __name__ == "__main__":
    main()
