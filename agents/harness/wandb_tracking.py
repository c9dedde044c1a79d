"""Weights & Biases mirroring of a run (``--track``), as in CleanRL.

``wandb.init(sync_tensorboard=True)`` patches TensorBoard's event-file writer, so it
must run before the run's ``SummaryWriter`` exists; W&B then reads the scalars from
the event files the run writes anyway and gets the run's config.  The W&B run id is
kept in the run folder (``run_folder.WANDB_RUN_ID_FILE``), so ``--resume`` continues
the same W&B run (``resume="allow"``).

Nothing here imports wandb at module level: it is an optional extra
(``pip install -e ".[wandb]"``), imported only by runs with ``--track``.
"""

from __future__ import annotations

import secrets
import string
import sys
from pathlib import Path

from agents.harness.run_folder import WANDB_RUN_ID_FILE

ID_ALPHABET = string.ascii_lowercase + string.digits
MISSING = '--track needs Weights & Biases: pip install -e ".[wandb]"'


def available() -> bool:
    """Whether ``import wandb`` works here."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def run_id(run_dir: Path, resumed: bool) -> str:
    """The W&B id of this run folder: the saved one on resume, else a new one, saved before W&B starts."""
    path = Path(run_dir) / WANDB_RUN_ID_FILE
    if resumed and path.exists() and (saved := path.read_text().strip()):
        return saved
    if resumed:
        print(f"note: {path} not found; the resumed run starts a new W&B run", file=sys.stderr)
    new = "".join(secrets.choice(ID_ALPHABET) for _ in range(8))  # W&B's own id format
    path.write_text(new + "\n")
    return new


def start(run_dir: Path, config: dict, *, project: str, entity: str, name: str, resumed: bool):
    """``wandb.init`` as CleanRL calls it; call before the run's ``SummaryWriter`` is created."""
    import wandb

    from agents.harness.config import ConfigError

    try:
        return wandb.init(project=project, entity=entity or None, sync_tensorboard=True, config=config, name=name,
                          monitor_gym=False, save_code=True, id=run_id(run_dir, resumed), resume="allow")
    except wandb.errors.Error as error:
        raise ConfigError(f"--track: Weights & Biases did not start ({error}); log in with `wandb login`, or "
                          "set WANDB_MODE=offline and upload later with `wandb sync`") from None


def finish(run, exit_code: int = 0) -> None:
    """End the W&B run after the last event file is closed, and take back ``sync_tensorboard``'s patch."""
    import wandb

    run.finish(exit_code=exit_code)
    if wandb.patched["tensorboard"]:
        wandb.tensorboard.unpatch()
