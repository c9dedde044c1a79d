"""Tracker's event files on resume: TensorBoard must read the resumed file after the interrupted one.

TensorBoard orders a folder's event files by name; the resumed writer's ``purge_step``
drops only what was read before it.  Names created in the same second sort by pid and
a per-process counter as text, so ``...<pid>.10`` came before ``...<pid>.9`` and a quick
resume showed the interrupted run's steps after the checkpoint again.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from agents.harness.tracking import Tracker, event_file_second


def interrupted_run(run_dir: Path, tmp_path: Path, second: int, last_step: int = 300) -> Path:
    """An event file with ``charts/x`` at steps 1..last_step, named as this process's 9th writer of ``second``."""
    scratch = tmp_path / "scratch"
    writer = SummaryWriter(str(scratch))
    for step in range(1, last_step + 1):
        writer.add_scalar("charts/x", float(step), step)
    writer.close()
    (written,) = scratch.glob("events.out.tfevents.*")
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{second:010d}.{socket.gethostname()}.{os.getpid()}.9"
    return written.rename(run_dir / name)


def resume_and_log(run_dir: Path, checkpoint_step: int, steps) -> None:
    tracker = Tracker(run_dir, {}, total_timesteps=1000, log_every=50, device=torch.device("cpu"),
                      start_step=checkpoint_step)
    for step in steps:
        tracker.writer.add_scalar("charts/x", -float(step), step)
    tracker.close()


def tensorboard_series(run_dir: Path) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars("charts/x")]


def test_event_file_second_reads_the_name():
    assert event_file_second(Path("events.out.tfevents.1795271647.vm.11158.10")) == 1795271647
    assert event_file_second(Path("events.out.tfevents.notanumber.vm.1.2")) is None


def test_a_quick_resume_is_read_after_the_interrupted_file_and_purges_its_later_steps(tmp_path):
    run_dir = tmp_path / "run"
    # Dated one second ahead: without the wait the resumed file is created in an earlier-or-same
    # second with a counter that sorts before "9", and TensorBoard would read it first.
    interrupted_run(run_dir, tmp_path, second=int(time.time()) + 1)
    resume_and_log(run_dir, checkpoint_step=200, steps=range(201, 251))
    names = sorted(path.name for path in run_dir.glob("events.out.tfevents.*"))
    assert names[0].endswith(".9"), names  # the interrupted run's file is read first
    expected = [(step, float(step)) for step in range(1, 201)] + [(step, -float(step)) for step in range(201, 251)]
    assert tensorboard_series(run_dir) == expected


def test_an_event_file_dated_far_in_the_future_warns_instead_of_waiting(tmp_path, capsys):
    run_dir = tmp_path / "run"
    interrupted_run(run_dir, tmp_path, second=int(time.time()) + 3600, last_step=10)
    started = time.monotonic()
    resume_and_log(run_dir, checkpoint_step=5, steps=[6])
    assert time.monotonic() - started < 1.5
    error = capsys.readouterr().err
    assert "in the future" in error and "move that file away" in error


def test_plain_progress_prints_the_last_step_once(tmp_path, capsys):
    """Off a terminal the last step gets one line, though the run flushes it twice (window, finish)."""
    tracker = Tracker(tmp_path / "run", {}, total_timesteps=100, log_every=50, device=torch.device("cpu"))
    tracker._tty = False
    for step in (50, 100, 100):
        tracker.flush(step)
    tracker.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["50/100", "100/100"], lines
