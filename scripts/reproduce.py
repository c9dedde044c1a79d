"""The papers' studies and the table of every method: ``python scripts/reproduce.py <study>|leaderboard``.

The entry point of ``scripts/sweeps/reproduce.py`` (the studies) and ``scripts/sweeps/leaderboard.py`` (the
table); ``--help`` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python scripts/reproduce.py` from a checkout

from scripts.sweeps.reproduce import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
