"""The run-folder contract: what a run leaves in ``<runs_dir>/<run_name>/`` (spec agents.md "Outputs").

One module, torch-free, imported by the writer (the harness) and by every reader
(sweeps, plots, reproduce), so a change here reaches both sides at once:

- ``config.json``: every flag of the run, plus ``agent`` and ``run_name``;
- ``status.json``: ``{"status": running|completed|interrupted|failed, "global_step", "total_timesteps",
  "time", "message"?}``, rewritten atomically at every change of state;
- ``checkpoint.pt``: the last good state (``torch.load(weights_only=True)``); its presence makes a run
  resumable;
- TensorBoard event files ``events.out.tfevents.<second>.<host>.<pid>.<n>``;
- ``model.pt`` (``--save-model``): the final online network, a plain state dict of tensors;
- ``videos/`` (``--capture-video``): ``eval_<step>.mp4`` of the greedy evaluation episodes.

A run's name is ``<env>__<agent>__<label>__<seed>`` (sweeps: the label is the variant) and, for runs
named by the agents themselves, ``__<unix time>`` after it, as in CleanRL.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
CHECKPOINT_FILE = "checkpoint.pt"
EVENT_FILE_PREFIX = "events.out.tfevents."

RUNNING, COMPLETED, INTERRUPTED, FAILED = "running", "completed", "interrupted", "failed"
STATUSES = (RUNNING, COMPLETED, INTERRUPTED, FAILED)

#: What a folder holds, for sweeps deciding whether to skip, resume or start a run.
NEW, RESUMABLE = "new", "resumable"

NAME_SEPARATOR = "__"


def env_name(env_id: str) -> str:
    """The env id as a folder-name part: ``ALE/Breakout-v5`` -> ``ALE_Breakout-v5``."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", env_id)


def run_name(env_id: str, agent: str, label: str, seed: int, unix_time: int | None = None) -> str:
    """``<env>__<agent>__<label>__<seed>[__<unix time>]``, e.g. ``ImageMDP_mnist__dqn__ln-l2_1e-05__1__1733040000``."""
    parts = [env_name(env_id), agent, label, str(seed)]
    if unix_time is not None:
        parts.append(str(int(unix_time)))
    return NAME_SEPARATOR.join(parts)


# ---- JSON files ----

def write_json(path: Path, data: dict) -> None:
    """Write atomically: readers (and a crash) never see half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """A run folder's JSON file; a missing or corrupt one is one clear error (FileNotFoundError / ValueError)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is this a run folder written by agents/dqn.py or "
                                "agents/c51.py?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt ({error}); restore it or start a new run") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt (not a JSON object); restore it or start a new run")
    return data


def write_config(run_dir: Path, config: dict) -> None:
    write_json(Path(run_dir) / CONFIG_FILE, config)


def read_config(run_dir: Path, missing_ok: bool = False) -> dict | None:
    """``config.json`` of a run folder; None when absent and ``missing_ok``."""
    path = Path(run_dir) / CONFIG_FILE
    if missing_ok and not path.exists():
        return None
    return read_json(path)


# ---- status.json ----

@dataclass(frozen=True)
class Status:
    """The content of ``status.json``."""

    status: str
    global_step: int
    total_timesteps: int
    time: float
    message: str = ""

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def interrupted(self) -> bool:
        return self.status == INTERRUPTED

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def as_dict(self) -> dict:
        data = {"status": self.status, "global_step": self.global_step, "total_timesteps": self.total_timesteps,
                "time": self.time}
        if self.message:
            data["message"] = self.message
        return data


def write_status(run_dir: Path, status: str, global_step: int, total_timesteps: int, message: str = "") -> None:
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}; one of {', '.join(STATUSES)}")
    write_json(Path(run_dir) / STATUS_FILE,
               Status(status, int(global_step), int(total_timesteps), time.time(), message).as_dict())


def read_status(run_dir: Path) -> Status | None:
    """``status.json`` of a run folder, or None when absent or unreadable (a run killed while writing it)."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text())
        return Status(str(data["status"]), int(data.get("global_step", 0)), int(data.get("total_timesteps", 0)),
                      float(data.get("time", 0.0)), str(data.get("message", "")))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
            AttributeError):
        return None


# ---- checkpoint and event files ----

def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_FILE


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run (for a population member: its population, in the lead folder) has a checkpoint."""
    return checkpoint_path(population_lead(run_dir)).exists()


def population_lead(run_dir: Path) -> Path:
    """The folder holding the checkpoint of ``run_dir``'s population (its member 0); ``run_dir`` for a single run.

    A population (``--num-seeds N``) writes N run folders; member k's config.json names the
    population (``population: {seed, num_seeds, member, lead, members}``) and the lead folder
    holds the one checkpoint of all members.
    """
    run_dir = Path(run_dir)
    try:
        config = read_config(run_dir, missing_ok=True) or {}
    except ValueError:  # a corrupt config.json: whoever reads the run reports it
        return run_dir
    population = config.get("population")
    if isinstance(population, dict) and isinstance(population.get("lead"), str):
        return run_dir.parent / population["lead"]
    return run_dir


def is_event_file(path: Path | str) -> bool:
    return Path(path).name.startswith(EVENT_FILE_PREFIX)


def event_files(run_dir: Path) -> list[Path]:
    """The TensorBoard event files directly in ``run_dir`` (none when it does not exist)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return [path for path in run_dir.iterdir() if is_event_file(path) and path.is_file()]


def event_file_second(path: Path | str) -> int | None:
    """The creation second in an event file's name (``events.out.tfevents.<second>.<host>.<pid>.<n>``)."""
    parts = Path(path).name[len(EVENT_FILE_PREFIX):].split(".")
    return int(parts[0]) if parts and parts[0].isdigit() else None


def folder_state(run_dir: Path) -> str:
    """``completed`` (status.json says so), ``resumable`` (a checkpoint, not completed) or ``new``."""
    status = read_status(run_dir)
    if status is not None and status.completed:
        return COMPLETED
    if has_checkpoint(run_dir):
        return RESUMABLE
    return NEW


# ---- Weights & Biases (--track) ----

#: The W&B run id of a ``--track`` run (one line), so ``--resume`` continues the same W&B run.
WANDB_RUN_ID_FILE = "wandb_run_id"


# ---- saved model and videos (--save-model, --capture-video) ----

MODEL_FILE = "model.pt"
VIDEO_DIR = "videos"


def model_path(run_dir: Path) -> Path:
    """``<run_dir>/model.pt``: the final online network's state dict (``torch.load(weights_only=True)``)."""
    return Path(run_dir) / MODEL_FILE


def video_path(run_dir: Path, name: str) -> Path:
    """``<run_dir>/videos/<name>.mp4``, e.g. ``eval_<step>`` for the evaluation at env step ``<step>``."""
    return Path(run_dir) / VIDEO_DIR / f"{name}.mp4"
