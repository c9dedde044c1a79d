"""Human-normalised Atari scores: (score − random) / (human − random), per game.

The reference scores and their source are in ``envs/data/atari_human_random.csv``, read by
``envs/atari_scores.py`` (torch-free), which the greedy evaluation uses for ``charts/eval_hns``.
Only game scores can be normalised: ``charts/episodic_return`` of a single-game
run, the per-game ``charts/episodic_return/<Game>`` of a run that cycles games,
and ``charts/task_return`` when the tasks do not change the game.
"""

from __future__ import annotations

import re

import numpy as np

from envs.atari_scores import REFERENCE_CSV, Reference, game_key, load_reference

RETURN_TAG = "charts/episodic_return"
TASK_RETURN_TAG = "charts/task_return"

# The table itself comes from envs/atari_scores.py; plot.py and the tests reach it through this module.
__all__ = ["REFERENCE_CSV", "Reference", "load_reference", "game_of_env", "is_normalizable", "game_for",
           "human_normalize"]

_ENV_ID = re.compile(r"^(?:ALE/)?([A-Za-z0-9]+?)(?:NoFrameskip|Deterministic)?-v\d+$")


def game_of_env(env_id: str) -> str:
    """``ALE/Breakout-v5`` or ``BreakoutNoFrameskip-v4`` -> ``Breakout``."""
    match = _ENV_ID.match(env_id)
    if match is None:
        raise ValueError(f"--human-normalized applies to Atari env ids (ALE/<Game>-v5 or <Game>NoFrameskip-v4), "
                         f"not {env_id!r}")
    return match.group(1)


def is_normalizable(tag: str) -> bool:
    return tag in (RETURN_TAG, TASK_RETURN_TAG) or tag.startswith(RETURN_TAG + "/")


def game_for(tag: str, config: dict) -> str:
    """The game whose scores ``tag`` holds in a run with this config."""
    if tag.startswith(RETURN_TAG + "/"):
        return tag[len(RETURN_TAG) + 1:]
    game = game_of_env(str(config.get("env_id", "")))
    if "games" in (config.get("atari_shift") or []):
        raise ValueError(f"{tag} mixes the scores of several games in a run that cycles games "
                         f"({', '.join(config.get('games') or [])}); plot the per-game tags "
                         f"{RETURN_TAG}/<Game> instead")
    return game


def human_normalize(values: np.ndarray, game: str, reference: dict[str, Reference]) -> np.ndarray:
    entry = reference.get(game_key(game))
    if entry is None:
        known = sorted({ref.game for ref in reference.values()})
        raise ValueError(f"no random/human reference score for {game!r} in {REFERENCE_CSV.name}; "
                         f"games with one: {', '.join(known)}")
    return (np.asarray(values, dtype=np.float64) - entry.random) / (entry.human - entry.random)
