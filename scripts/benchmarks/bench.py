"""The project's benchmarks, one sub-command each (figures go to docs/benchmarks.md).

    python scripts/benchmarks/bench.py env            # image-MDP env steps/s at 1, 64, 1024 envs
    python scripts/benchmarks/bench.py atari          # AtariVectorEnv vs wrappers, replay buffer add/sample, bytes/transition
    python scripts/benchmarks/bench.py plasticity     # SWR and CBP cost per update (Nature CNN)
    python scripts/benchmarks/bench.py methods        # every methods-v2 method: cost per update (Nature CNN, MNIST MLP)
    python scripts/benchmarks/bench.py diagnostics    # one diagnostics event vs training time
    python scripts/benchmarks/bench.py agents         # DQN/C51 training SPS vs compute floor, image-MDP training SPS
    python scripts/benchmarks/bench.py reference      # DQN/C51 SPS vs a CleanRL-style loop, alternating runs (bench extra)
    python scripts/benchmarks/bench.py population     # --num-seeds N aggregate SPS vs single and parallel runs, floors

Arguments after the sub-command go to that benchmark (`python scripts/benchmarks/bench.py env --help`).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file from a source checkout

BENCHMARKS = {name: f"scripts.benchmarks.bench_{name}" for name in ("env", "atari", "plasticity", "methods", "diagnostics", "agents", "reference",
                                                                      "population")}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(__doc__)
        sys.exit(0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2)
    name = sys.argv[1]
    sys.argv = [f"scripts/benchmarks/bench.py {name}", *sys.argv[2:]]
    importlib.import_module(BENCHMARKS[name]).main()


if __name__ == "__main__":
    main()
