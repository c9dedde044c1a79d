"""The population Tracker (spec populations.md): M members logged together, each into its own run folder.

Member k's event files hold what a one-member Tracker fed member k's slices writes; a frozen
(failed) member gets no events after it was frozen while the others go on; a state_dict round
trip (a checkpoint, a kill, a resume) gives what an uninterrupted population writes; and a
window costs one host transfer for the whole population, the hot-loop calls none.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.harness import tracking
from agents.harness.tracking import Tracker

CPU = torch.device("cpu")
MEMBERS, ENVS, TOTAL, LOG_EVERY = 3, 2, 120, 20
SWITCHES = (43, 80, 91)  # task switches: 80 is also a logging step (task_id queued twice at one step)
DIAGNOSTICS_STEP = 50


@dataclass
class Stream:
    """Per-step hot-loop inputs of a population, [M, ...]; members finish episodes at different rates."""

    loss: torch.Tensor  # [steps, M]
    returns: torch.Tensor  # [steps, M, E] float64, as envs/episode_stats.py keeps them
    lengths: torch.Tensor  # [steps, M, E] int64
    ended: torch.Tensor  # [steps, M, E] bool
    accuracy: torch.Tensor  # [steps, M]


def make_stream(members: int = MEMBERS, seed: int = 0) -> Stream:
    generator = torch.Generator().manual_seed(seed)
    steps = TOTAL + 1
    rate = torch.linspace(0.05, 0.6, members).reshape(1, members, 1)
    return Stream(loss=torch.rand(steps, members, generator=generator),
                  returns=torch.randn(steps, members, ENVS, generator=generator, dtype=torch.float64) * 10,
                  lengths=torch.randint(1, 50, (steps, members, ENVS), generator=generator),
                  ended=torch.rand(steps, members, ENVS, generator=generator) < rate,
                  accuracy=torch.rand(steps, members, generator=generator))


def make_tracker(run_dirs: list[Path], start_step: int = 0, **kwargs) -> Tracker:
    configs = [{"seed": 10 + int(run_dir.name[-1]), "total_timesteps": TOTAL} for run_dir in run_dirs]
    return Tracker(run_dirs, configs, total_timesteps=TOTAL, log_every=LOG_EVERY, device=CPU,
                   start_step=start_step, num_envs=ENVS, accuracy_window=10, **kwargs)


def task_at(step: int) -> int:
    return sum(step >= switch for switch in SWITCHES)


def feed(tracker: Tracker, stream: Stream, members: slice, steps, after_flush=None) -> None:
    """What the training loop logs at each of ``steps``, for the members ``members`` of ``stream``."""
    for step in steps:
        tracker.mean("losses/td_loss", stream.loss[step, members])
        tracker.mean("losses/q_values", stream.loss[step, members] * -3)
        tracker.episodes(step, stream.returns[step, members], stream.lengths[step, members],
                         stream.ended[step, members], group="game" if step > 60 else "")
        tracker.task_accuracy(stream.accuracy[step, members])
        if step in SWITCHES:
            tracker.task_switch(step, task_at(step) - 1, task_at(step))
        if step % LOG_EVERY == 0:
            tracker.scalar("charts/epsilon", 1 - step / TOTAL, step)  # a python float: every member's
            tracker.scalar("charts/task_id", task_at(step), step)
            tracker.scalar("plasticity/l2_penalty", stream.loss[step, members] * 2, step)
        if step == DIAGNOSTICS_STEP:
            tracker.log_dict({"plasticity/dead_frac": stream.accuracy[step, members],
                              "plasticity/srank": [float(v) for v in stream.loss[step, members] * 7],
                              "plasticity/constant": 4.0}, step)
        if tracker.maybe_flush(step) and after_flush is not None:
            after_flush(step)


def finish(tracker: Tracker, step: int = TOTAL) -> None:
    """What Run.finish does with the tracker."""
    tracker.close_task(step)
    if tracker.last_flush_step != step or tracker.has_pending():
        tracker.flush(step)
    tracker.close()


def scalars(run_dir: Path, skip=("charts/SPS",)) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard shows for ``run_dir`` (purged steps dropped, as TensorBoard does)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"] if tag not in skip}


def population_dirs(root: Path, name: str = "member") -> list[Path]:
    return [root / f"{name}{k}" for k in range(MEMBERS)]


def run_population(root: Path, stream: Stream, **kwargs) -> list[Path]:
    run_dirs = population_dirs(root)
    tracker = make_tracker(run_dirs, **kwargs)
    feed(tracker, stream, slice(None), range(1, TOTAL + 1))
    finish(tracker)
    return run_dirs


def test_each_member_writes_what_its_single_run_writes(tmp_path):
    stream = make_stream()
    run_dirs = run_population(tmp_path / "population", stream)
    for k, run_dir in enumerate(run_dirs):
        single_dir = tmp_path / "single" / f"member{k}"
        single = make_tracker([single_dir])
        feed(single, stream, slice(k, k + 1), range(1, TOTAL + 1))
        finish(single)
        expected, got = scalars(single_dir), scalars(run_dir)
        assert set(got) == set(expected)
        for tag in expected:
            assert [step for step, _ in got[tag]] == [step for step, _ in expected[tag]], tag
            assert [value for _, value in got[tag]] == pytest.approx([value for _, value in expected[tag]],
                                                                     rel=1e-6), tag
    # The members differ (their own data), and every tag a run logs is there.
    first, second = scalars(run_dirs[0]), scalars(run_dirs[1])
    assert first["losses/td_loss"] != second["losses/td_loss"]
    assert len(first["charts/episodic_return"]) != len(second["charts/episodic_return"])
    assert {"charts/episodic_return/game", "charts/task_return", "charts/task_final_accuracy", "charts/accuracy",
            "charts/task_id", "plasticity/dead_frac", "plasticity/srank", "plasticity/constant"} <= set(first)
    # One episodic_return event per finished episode, at its step; task_id once per step.
    ended = stream.ended[1:, 0]
    assert len(first["charts/episodic_return"]) == int(ended.sum())
    task_ids = [step for step, _ in first["charts/task_id"]]
    assert len(task_ids) == len(set(task_ids))
    # charts/SPS: each member logs the population's env steps per second, the same value.
    sps = [scalars(run_dir, skip=())["charts/SPS"] for run_dir in run_dirs]
    assert [step for step, _ in sps[0]] == list(range(LOG_EVERY, TOTAL + 1, LOG_EVERY))
    assert sps[0] == sps[1] == sps[2]


def test_task_return_is_per_member_and_only_for_members_that_finished_episodes(tmp_path):
    run_dirs = population_dirs(tmp_path)
    tracker = make_tracker(run_dirs)
    ended = torch.tensor([[True, True], [False, True], [False, False]])
    returns = torch.tensor([[1.0, 3.0], [5.0, 7.0], [9.0, 9.0]], dtype=torch.float64)
    tracker.episodes(5, returns, torch.ones(3, 2, dtype=torch.int64), ended)
    tracker.episodes(6, returns * 10, torch.ones(3, 2, dtype=torch.int64), ended & torch.tensor([True, False]))
    tracker.task_switch(7, 0, 1)
    finish(tracker, 20)
    task_returns = [scalars(run_dir).get("charts/task_return") for run_dir in run_dirs]
    assert task_returns == [[(7, pytest.approx((1 + 3 + 10) / 3))], [(7, 7.0)], None]
    assert [len(scalars(run_dir).get("charts/episodic_return", [])) for run_dir in run_dirs] == [3, 1, 0]


def test_a_frozen_member_gets_no_more_events_and_the_others_go_on(tmp_path, monkeypatch):
    stream = make_stream()
    reference = [scalars(run_dir) for run_dir in run_population(tmp_path / "reference", stream)]
    finished = []
    monkeypatch.setattr(tracking.wandb_tracking, "finish", lambda run, code: finished.append((run, code)))
    run_dirs = population_dirs(tmp_path / "population")
    tracker = make_tracker(run_dirs, wandb_runs=["run0", "run1", "run2"])

    def fail_member_one(step):
        if step == 40:
            tracker.close_member(1, exit_code=1)

    feed(tracker, stream, slice(None), range(1, TOTAL + 1), after_flush=fail_member_one)
    finish(tracker)
    assert tracker.active == [True, False, True]
    frozen = scalars(run_dirs[1], skip=())
    assert max(step for series in frozen.values() for step, _ in series) == 40
    # What it wrote before is what the unfailed population wrote up to then; the others are unchanged.
    assert {tag: series for tag, series in scalars(run_dirs[1]).items()} == {
        tag: kept for tag, series in reference[1].items() if (kept := [(s, v) for s, v in series if s <= 40])}
    assert scalars(run_dirs[0]) == reference[0] and scalars(run_dirs[2]) == reference[2]
    # One W&B run per member, ended after every event file was closed, the failed one with its code.
    assert finished == [("run0", 0), ("run1", 1), ("run2", 0)]


def test_freeze_drops_the_pending_window_of_that_member(tmp_path):
    run_dirs = population_dirs(tmp_path)
    tracker = make_tracker(run_dirs)
    tracker.mean("losses/td_loss", torch.tensor([1.0, 2.0, 3.0]))
    tracker.flush(20)
    tracker.mean("losses/td_loss", torch.tensor([4.0, float("nan"), 6.0]))
    tracker.freeze(1)
    tracker.flush(40)
    tracker.close()
    losses = [scalars(run_dir)["losses/td_loss"] for run_dir in run_dirs]
    assert losses == [[(20, 1.0), (40, 4.0)], [(20, 2.0)], [(20, 3.0), (40, 6.0)]]


def checkpoint_round_trip(state: dict) -> dict:
    """What checkpoint.pt does to the state: torch.save, then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("checkpoint_step, killed_at", [(47, 47), (60, 80)],
                         ids=["mid-window-and-mid-task", "at-a-flush-then-one-more-window"])
def test_a_resumed_population_writes_what_an_uninterrupted_one_writes(tmp_path, checkpoint_step, killed_at):
    stream = make_stream()
    reference = [scalars(run_dir) for run_dir in run_population(tmp_path / "reference", stream)]
    run_dirs = population_dirs(tmp_path / "population")
    interrupted = make_tracker(run_dirs)
    feed(interrupted, stream, slice(None), range(1, checkpoint_step + 1))
    state = checkpoint_round_trip(interrupted.state_dict())
    # The interrupted process runs on past its checkpoint, then is killed: its later steps are purged.
    feed(interrupted, stream, slice(None), range(checkpoint_step + 1, killed_at + 1))
    interrupted.close()
    resumed = make_tracker(run_dirs, start_step=checkpoint_step)
    resumed.load_state_dict(state)
    feed(resumed, stream, slice(None), range(checkpoint_step + 1, TOTAL + 1))
    finish(resumed)
    assert [scalars(run_dir) for run_dir in run_dirs] == reference


class TransferCounter:
    """Counts the Tensor methods that move data to the host (on CUDA each is a sync)."""

    METHODS = ("tolist", "item", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def method(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)
        return method

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


def test_one_host_transfer_per_window_and_none_in_the_hot_loop(tmp_path, monkeypatch):
    stream = make_stream()
    tracker = make_tracker(population_dirs(tmp_path))
    counter = TransferCounter(monkeypatch)
    for window_end in (LOG_EVERY, 2 * LOG_EVERY, 3 * LOG_EVERY):
        flushed = False
        for step in range(window_end - LOG_EVERY + 1, window_end + 1):
            tracker.mean("losses/td_loss", stream.loss[step])
            tracker.episodes(step, stream.returns[step], stream.lengths[step], stream.ended[step])
            # On the CPU, episodes() asks whether any episode ended (a host read that syncs nothing);
            # on CUDA it never asks (test_no_device_sync_in_the_hot_loop_on_cuda).
            assert counter.take() in ([], ["__bool__"])
            tracker.task_accuracy(stream.accuracy[step])
            if step in SWITCHES:
                tracker.task_switch(step, 0, 1)
            tracker.scalar("charts/epsilon", 0.5, step)
            tracker.scalar("plasticity/l2_penalty", stream.loss[step], step)
            assert counter.take() == [], f"a hot-loop call moved data to the host at step {step}"
            flushed = tracker.maybe_flush(step)
        assert flushed
        assert counter.take() == ["tolist"], "a window must cost exactly one host transfer"
    tracker.log_dict({"plasticity/a": stream.loss[1], "plasticity/b": stream.accuracy[1], "plasticity/c": 1.0}, 61)
    assert counter.take() == ["tolist"], "a diagnostics event must cost one host transfer"
    tracker.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hot_loop_calls_do_not_sync_the_gpu(tmp_path):
    device = torch.device("cuda")
    members = 4
    tracker = Tracker([tmp_path / f"m{k}" for k in range(members)], [{}] * members, total_timesteps=100,
                      log_every=50, device=device, num_envs=8)
    loss = torch.rand(members, device=device)
    returns = torch.randn(members, 8, device=device, dtype=torch.float64)
    lengths = torch.randint(1, 9, (members, 8), device=device)
    ended = torch.rand(members, 8, device=device) < 0.3
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 50):
            tracker.mean("losses/td_loss", loss)
            tracker.episodes(step, returns, lengths, ended)
            tracker.task_accuracy(loss)
            tracker.scalar("charts/epsilon", 0.1, step)
            tracker.scalar("charts/x", loss, step)
            if step == 25:
                tracker.task_switch(step, 0, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tracker.flush(50)
    tracker.close()
    assert [len(scalars(tmp_path / f"m{k}")["losses/td_loss"]) for k in range(members)] == [1] * members


def test_the_progress_line_shows_the_population(tmp_path, capsys):
    tracker = make_tracker(population_dirs(tmp_path))
    tracker._tty = False
    tracker.episodes(10, torch.tensor([[2.0], [4.0], [9.0]]), torch.ones(3, 1), torch.tensor([[True], [True], [True]]))
    tracker.freeze(2)
    tracker.flush(TOTAL)
    tracker.close()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert line.split()[1] == f"{TOTAL}/{TOTAL}"
    assert "(3 x " in line and "return 3.00 (mean of 2)" in line and "1/3 failed" in line, line


def test_an_inactive_member_gets_no_writer_and_its_folder_stays_as_it_was(tmp_path):
    run_dirs = population_dirs(tmp_path)
    make_tracker(run_dirs[1:2]).close()  # member 1 wrote its event file, then failed
    before = sorted(path.name for path in run_dirs[1].iterdir())
    tracker = make_tracker(run_dirs, start_step=20, active=[True, False, True])
    tracker.mean("losses/td_loss", torch.ones(3))
    tracker.flush(40)
    tracker.close()
    assert sorted(path.name for path in run_dirs[1].iterdir()) == before
    assert scalars(run_dirs[0])["losses/td_loss"] == [(40, 1.0)]


def test_queued_episodes_survive_the_env_changing_its_tensors_in_place(tmp_path):
    """The env's running returns are zeroed in place after an episode ends: the queue holds copies."""
    tracker = make_tracker(population_dirs(tmp_path))
    returns = torch.full((3, 1), 5.0, dtype=torch.float64)
    lengths = torch.full((3, 1), 7)
    ended = torch.ones(3, 1, dtype=torch.bool)
    tracker.episodes(3, returns, lengths, ended)
    returns.zero_(), lengths.zero_(), ended.zero_()
    tracker.flush(20)
    tracker.close()
    assert scalars(tmp_path / "member2")["charts/episodic_return"] == [(3, 5.0)]
    assert scalars(tmp_path / "member2")["charts/episodic_length"] == [(3, 7.0)]
