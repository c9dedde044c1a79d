"""Tracker's event files on resume: TensorBoard must read the resumed file after the interrupted one.

TensorBoard orders a folder's event files by name; the resumed writer's ``purge_step``
drops only what was read before it.  Names created in the same second sort by pid and
a per-process counter as text, so ``...<pid>.10`` came before ``...<pid>.9`` and a quick
resume showed the interrupted run's steps after the checkpoint again.

The Custom Scalars dashboard: a fresh run's event file holds the layout, and every chart of
it has data.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from agents import c51, dqn
from agents.harness.tracking import (
    METHOD_CHARTS,
    OPTIONAL_TAGS,
    Tracker,
    dashboard_layout,
    event_file_second,
)
from plasticity.interventions import METHODS


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
    tracker = Tracker([run_dir], [{}], total_timesteps=1000, log_every=50, device=torch.device("cpu"),
                      start_step=checkpoint_step)
    for step in steps:
        tracker.writers[0].add_scalar("charts/x", -float(step), step)
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
    tracker = Tracker([tmp_path / "run"], [{}], total_timesteps=100, log_every=50, device=torch.device("cpu"))
    tracker._tty = False
    for step in (50, 100, 100):
        tracker.flush(step)
    tracker.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["50/100", "100/100"], lines


# ---- the Custom Scalars dashboard ----

#: Every method on, and the optional diagnostics, with cadences that fire in 400 steps (as tests/test_agents.py).
ALL_TOGGLES = dict(layer_norm=True, l2=1e-5, l2_init=1e-5, swr=0.01, swr_head=0.02, cbp=True, cbp_maturity=10,
                   cbp_replacement_rate=0.01, snp=1e-4, snp_every=20, redo_every=25, reset_head_every=40,
                   entk_every=200, hessian_every=200, probe_every=200)


def custom_scalars_layouts(run_dir: Path) -> list[layout_pb2.Layout]:
    """The layouts in a run folder's event files (TensorBoard's custom_scalars plugin data)."""
    layouts = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            layouts += [layout_pb2.Layout.FromString(value.tensor.string_val[0]) for value in event.summary.value
                        if value.metadata.plugin_data.plugin_name == "custom_scalars"]
    return layouts


def scalar_tags(run_dir: Path) -> set[str]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_a_run_writes_a_dashboard_whose_every_chart_has_data(tmp_path, mnist_dir):
    args = dqn.Args(env_id="ImageMDP/mnist", data_dir=str(mnist_dir), num_images=500, total_timesteps=400,
                    learning_starts=100, buffer_size=1000, batch_size=16, hidden_sizes=[32, 32], diag_every=100,
                    diag_batch=128, log_every=50, episode_length=50, shift=["label_permutation"], shift_every=200,
                    runs_dir=str(tmp_path), run_name="run", cuda=False, checkpoint_every=0, loss="hl_gauss",
                    v_min=-1.0, v_max=11.0, **ALL_TOGGLES)
    dqn.main(args)
    run_dir = tmp_path / "run"
    (layout,) = custom_scalars_layouts(run_dir)
    categories = [category.title for category in layout.category]
    assert categories == ["returns and losses", "plasticity: units (all layers)", "plasticity: norms",
                          "plasticity: ranks", "plasticity: target-mean", "plasticity: probes", "plasticity: methods",
                          "run"]
    first_row = [chart.title for chart in layout.category[0].chart]
    assert first_row == ["episodic return", "TD loss", "Q-values", "greedy accuracy"]
    tags = scalar_tags(run_dir)
    shown = set()
    for category in layout.category:
        for chart in category.chart:
            for regex in chart.multiline.tag:  # TensorBoard matches a chart's regexes with re.match
                matched = {tag for tag in tags if re.match(regex, tag)}
                assert matched or regex.startswith(OPTIONAL_TAGS), f"{category.title} / {chart.title}: {regex} is empty"
                shown |= matched
    assert tags - shown == set(), "tags the run logs that no chart shows"
    # One chart per metric, every layer on it: the overall value and each hidden layer.
    (dead,) = [chart for chart in layout.category[1].chart if chart.title == "dead_frac"]
    on_chart = {tag for tag in tags for regex in dead.multiline.tag if re.match(regex, tag)}
    assert on_chart == {"plasticity/dead_frac"} | {tag for tag in tags if tag.startswith("plasticity/dead_frac/")}
    assert len(on_chart) >= 3


def test_a_resumed_tracker_does_not_write_the_layout_again(tmp_path):
    run_dir = tmp_path / "run"
    Tracker([run_dir], [{}], total_timesteps=100, log_every=50, device=torch.device("cpu")).close()
    Tracker([run_dir], [{}], total_timesteps=100, log_every=50, device=torch.device("cpu"), start_step=50).close()
    assert len(custom_scalars_layouts(run_dir)) == 1


def test_the_dashboard_leaves_out_charts_a_run_does_not_fill():
    atari = {"env_id": "ALE/Pong-v5", "agent": "c51", "total_timesteps": 10_000, "learning_starts": 1_000,
             "diag_every": 0, "atari_shift": ["games"], "eval_every": 5_000}
    layout = dashboard_layout(atari)
    assert list(layout) == ["returns and losses", "run"]  # no diagnostics, no methods on
    returns = layout["returns and losses"]
    assert "greedy accuracy" not in returns  # image MDP only
    assert returns["episodic return"] == ["Multiline", ["charts/episodic_return$", "charts/eval_return$"]]
    assert returns["episodic return per game"] == ["Multiline", ["charts/episodic_return/.*", "charts/eval_return/.*"]]
    # Diagnostics that only fire at or before learning_starts log nothing: no charts for them.
    late = {**atari, "learning_starts": 9_500}
    assert "plasticity: units (all layers)" not in dashboard_layout({**late, "diag_every": 3_000})  # 9k <= 9.5k
    assert "plasticity: units (all layers)" in dashboard_layout({**late, "diag_every": 2_000})  # 10k
    assert "plasticity: units (all layers)" not in dashboard_layout({**late, "diag_every": 20_000})
    # Without an evaluation its tags are not on the dashboard.
    plain = dashboard_layout({**atari, "eval_every": 0})
    assert plain["returns and losses"]["episodic return"] == ["Multiline", ["charts/episodic_return$"]]
    assert "target_clip_frac" in dashboard_layout({**atari, "diag_every": 2_000})["plasticity: target-mean"]
    mse = dashboard_layout({**atari, "agent": "dqn", "loss": "mse", "diag_every": 2_000})
    assert "target_clip_frac" not in mse["plasticity: target-mean"]


def test_every_plasticity_method_has_a_chart():
    """A new method in plasticity.interventions.METHODS that logs a scalar needs its chart in tracking.METHOD_CHARTS
    (keyed by the flag that turns it on); Kron (an optimiser) logs nothing of its own."""
    without_scalars = {"KronFlags"}
    for method in METHODS:
        fields = {f.name for f in dataclasses.fields(method)}
        has_chart = bool(fields & set(METHOD_CHARTS))
        assert has_chart != (method.__name__ in without_scalars), method.__name__
    all_fields = {f.name for method in METHODS for f in dataclasses.fields(method)}
    assert set(METHOD_CHARTS) <= all_fields


def test_the_methods_chart_follows_the_flags_that_turn_methods_on():
    charts = dashboard_layout({"reset_optimizer": "target-update", "lr_schedule": "linear", "c_chain": True,
                               "plasticity_injection_at": [100]})["plasticity: methods"]
    assert set(charts) == {"optimiser resets", "learning rate", "C-CHAIN coefficient and churn loss", "injections"}
    assert charts["C-CHAIN coefficient and churn loss"][1] == ["plasticity/c_chain_coef$", "losses/c_chain_loss$"]
    assert "plasticity: methods" not in dashboard_layout({"reset_optimizer": "off", "lr_schedule": "constant",
                                                          "plasticity_injection_at": []})


def test_c51_categorical_swr_scale_is_on_the_methods_chart():
    (regex,) = dashboard_layout({"swr": 0.01})["plasticity: methods"]["SWR scale"][1]
    assert re.match(regex, "plasticity/swr_logit_scale") and re.match(regex, "plasticity/swr_scale")
    assert c51.Args().swr == 0.0  # off by default: no methods category
    assert "plasticity: methods" not in dashboard_layout({"swr": c51.Args().swr})
