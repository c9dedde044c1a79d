"""Random and human reference scores of the Atari games: human-normalised scores.

    normalised = (score - random) / (human - random)    (0: random play, 1: the human tester)

The table and its sources are in ``envs/data/atari_human_random.csv`` (Atari-57, Badia et al.
2020); the greedy evaluation logs ``charts/eval_hns`` with it, and
``scripts/analysis/atari_scores.py`` uses the same table for plots and tables.  Torch-free.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from pathlib import Path

REFERENCE_CSV = Path(__file__).resolve().parent / "data" / "atari_human_random.csv"


@dataclass(frozen=True)
class Reference:
    game: str
    random: float
    human: float


def game_key(name: str) -> str:
    """``MsPacman``, ``ms_pacman`` -> ``mspacman``: how games are looked up (lower case, letters and digits)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_reference(path: Path = REFERENCE_CSV) -> dict[str, Reference]:
    """Game key (by game name and ROM id) -> reference scores; '#' lines of the CSV are comments."""
    with open(path, newline="") as file:
        table = {}
        for row in csv.DictReader(line for line in file if not line.startswith("#")):
            reference = Reference(row["game"], float(row["random"]), float(row["human"]))
            table[game_key(row["game"])] = table[game_key(row["rom"])] = reference
    return table


@functools.cache
def reference_scores() -> dict[str, tuple[float, float]]:
    """(random, human) keyed by game name and ROM id (``game_key``)."""
    return {key: (ref.random, ref.human) for key, ref in load_reference().items()}


def human_normalized(score: float, game: str) -> float | None:
    """``(score - random) / (human - random)`` for ``game`` (ROM id or game name); None without a reference."""
    reference = reference_scores().get(game_key(game))
    if reference is None:
        return None
    random, human = reference
    return (float(score) - random) / (human - random)
