"""Random and human reference scores of the Atari games: human-normalised scores.

    normalised = (score - random) / (human - random)    (0: random play, 1: the human tester)

The table and its sources are in ``envs/data/atari_human_random.csv`` (Atari-57, Badia et al.
2020); the greedy evaluation logs ``charts/eval_hns`` with it, and
``scripts/analysis/atari_scores.py`` reads the same file for plots and tables.  Torch-free.
"""

from __future__ import annotations

import csv
import functools
import re
from pathlib import Path

REFERENCE_CSV = Path(__file__).resolve().parent / "data" / "atari_human_random.csv"


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.cache
def reference_scores() -> dict[str, tuple[float, float]]:
    """(random, human) keyed by game name and ROM id (lower case, letters and digits only)."""
    with open(REFERENCE_CSV, newline="") as file:
        table = {}
        for row in csv.DictReader(line for line in file if not line.startswith("#")):
            table[_key(row["game"])] = table[_key(row["rom"])] = (float(row["random"]), float(row["human"]))
    return table


def human_normalized(score: float, game: str) -> float | None:
    """``(score - random) / (human - random)`` for ``game`` (ROM id or game name); None without a reference."""
    reference = reference_scores().get(_key(game))
    if reference is None:
        return None
    random, human = reference
    return (float(score) - random) / (human - random)
