"""Read run folders written by the agents: config.json, status.json and every TensorBoard scalar.

Spec agents.md "Outputs of one run".  Event files are read with TensorBoard's
own loader (``event_file_loader.RawEventFileLoader`` and its ``Event`` protobuf); a run resumed from a
checkpoint has several event files, merged the way TensorBoard shows them:
files in the order they were written, a ``SessionLog.START`` event (written by
``SummaryWriter(purge_step=...)`` on resume) drops every earlier value at or
after its step, and among values logged at the same step the last one written
wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agents.harness.run_folder import (
    EVENT_FILE_PREFIX,
    Status,
    event_files,
    is_event_file,
    read_config,
    read_status,
)


@dataclass(frozen=True)
class Series:
    """One scalar tag of one run: strictly increasing steps and their values."""

    steps: np.ndarray  # int64
    values: np.ndarray  # float64


@dataclass
class RunData:
    path: Path
    config: dict
    status: Status | None  # None when status.json is absent or unreadable
    scalars: dict[str, Series] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    """every scalar tag in the run's event files (``scalars`` may hold only the requested ones)"""
    last_step: int = 0
    """the furthest step any scalar was logged at (the run's progress), over all tags"""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def completed(self) -> bool:
        return self.status is not None and self.status.completed


def find_run_dirs(paths) -> list[Path]:
    """Every folder under ``paths`` (run folders, sweep folders, a runs/ folder) that holds event files."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; pass run folders or sweep folders")
        if path.is_file():
            raise ValueError(f"{path} is a file; pass the run folder that holds it (or a sweep folder)")
        for folder, _subfolders, files in os.walk(path):
            if any(is_event_file(name) for name in files):
                found.add(Path(folder))
    if not found:
        raise FileNotFoundError(f"no TensorBoard event files ({EVENT_FILE_PREFIX}*) under "
                                f"{', '.join(map(str, paths))}; "
                                "pass run folders (runs/<run>) or a sweep folder (its runs are found below it)")
    return sorted(found)


def _ordered_event_files(run_dir: Path) -> list[Path]:
    """Event files in the order they were written: by the wall time of their first event, then by name."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat.proto.event_pb2 import Event

    def first_wall_time(path: Path) -> float:
        for record in event_file_loader.RawEventFileLoader(str(path)).Load():
            return Event.FromString(record).wall_time
        return float("inf")  # an empty file sorts last and contributes nothing

    return sorted(event_files(run_dir), key=lambda path: (first_wall_time(path), path.name))


def _scalar_value(value, plugin_of: dict[str, str]) -> float | None:
    """The float of a scalar summary value, or None for other summaries (text, images, histograms).

    Writers store scalars as ``simple_value`` (torch.utils.tensorboard, TF1) or as a rank-0
    tensor with the ``scalars`` plugin (TF2), whose metadata only the first value of a tag carries.
    """
    from tensorboard.util import tensor_util

    if value.HasField("metadata") and value.metadata.plugin_data.plugin_name:
        plugin_of[value.tag] = value.metadata.plugin_data.plugin_name
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor" and plugin_of.get(value.tag) == "scalars":
        return float(tensor_util.make_ndarray(value.tensor))
    return None


def read_scalars(run_dir: Path, wanted=None) -> tuple[dict[str, Series], tuple[str, ...], int]:
    """The scalars of ``run_dir`` whose tag passes ``wanted(tag)`` (all when None), every scalar tag seen,
    and the last step of any scalar (after purges).

    Records are read with TensorBoard's ``RawEventFileLoader`` and decoded with its
    ``Event`` protobuf class; values are taken as written (no per-value migration to
    tensors, which would make reading a 10M-step run several times slower).
    """
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    by_tag: dict[str, dict[int, float]] = {}
    seen: set[str] = set()
    last_step = 0
    for path in _ordered_event_files(run_dir):
        plugin_of: dict[str, str] = {}
        for record in event_file_loader.RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                # A resumed run: what the interrupted run logged from here on is superseded.
                for values in by_tag.values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
                last_step = min(last_step, event.step)
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                scalar = _scalar_value(value, plugin_of)
                if scalar is None:
                    continue
                seen.add(value.tag)
                last_step = max(last_step, event.step)
                if wanted is None or wanted(value.tag):
                    by_tag.setdefault(value.tag, {})[event.step] = scalar
    scalars = {}
    for tag, values in by_tag.items():
        if not values:
            continue
        steps = np.fromiter(values.keys(), dtype=np.int64, count=len(values))
        order = np.argsort(steps, kind="stable")
        scalars[tag] = Series(steps[order], np.fromiter(values.values(), dtype=np.float64, count=len(values))[order])
    return scalars, tuple(sorted(seen)), last_step


def load_run(run_dir: Path, wanted=None) -> RunData:
    run_dir = Path(run_dir)
    scalars, tags, last_step = read_scalars(run_dir, wanted)
    # A corrupt config.json is an error (ValueError naming it); an unreadable status.json: not completed.
    return RunData(path=run_dir, config=read_config(run_dir, missing_ok=True) or {},
                   status=read_status(run_dir), scalars=scalars, tags=tags, last_step=last_step)


def load_runs(paths, wanted=None) -> list[RunData]:
    """Every run under ``paths`` (see ``find_run_dirs``), with the scalars whose tag passes ``wanted``."""
    return [load_run(run_dir, wanted) for run_dir in find_run_dirs(paths)]
