"""scripts/analysis/plot.py and its modules: stats against their definitions, the event reader against TensorBoard's,
grouping checks, Atari normalisation, and figures/tables of a real sweep checked against the event files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from tb_reference import accumulate

# The session's small sweep (dqn, variants base/ln, seeds 1-2), shared with tests/test_benchmark_sweep.py.
from test_benchmark_sweep import run_small_sweep

from agents.harness.run_folder import COMPLETED, Status
from scripts.analysis import atari_scores, plot, stats
from scripts.analysis.groups import group_runs
from scripts.analysis.tbreader import RunData, Series, find_run_dirs, load_run, load_runs, read_scalars


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory, mnist_dir) -> Path:
    return run_small_sweep(tmp_path_factory, mnist_dir)



# ---- stats ----

def test_iqm_is_the_25_percent_trimmed_mean():
    assert stats.iqm(np.array([1.0, 2.0, 3.0, 100.0])) == 2.5  # drops int(0.25 * 4) = 1 at each end
    assert stats.iqm(np.array([5.0, 1.0, 3.0])) == 3.0  # int(0.75) = 0: the plain mean
    scores = np.array([9.0, -4.0, 0.0, 7.0, 1.0, 2.0, 50.0, 3.0])
    assert stats.iqm(scores) == pytest.approx(np.mean(np.sort(scores)[2:6]))
    columns = np.stack([scores, -scores], axis=1)
    assert stats.iqm(columns, axis=0) == pytest.approx([np.mean(np.sort(scores)[2:6]), -np.mean(np.sort(scores)[2:6])])


def test_mean_aggregate_is_the_mean_of_task_means():
    tasks = [np.array([[0.0], [2.0], [4.0]]), np.array([[10.0]])]
    assert stats.aggregate(tasks, "mean") == pytest.approx([(2.0 + 10.0) / 2])
    assert stats.aggregate(tasks, "iqm") == pytest.approx([np.mean([2.0, 4.0])])  # pooled [0, 2, 4, 10]
    three = [*tasks, np.array([[5.0], [7.0]])]  # task means 2, 10, 6: rliable's median is their median
    assert stats.aggregate(three, "median") == pytest.approx([6.0])
    with pytest.raises(ValueError, match="unknown aggregate"):
        stats.aggregate(tasks, "mode")


def test_bootstrap_ci_on_enumerable_cases():
    # One task, runs [0, 1, 2]: replicate means range over {0, 1/3, ..., 2}; each extreme has probability
    # 1/27 > 2.5%, so the 95% interval is exactly [0, 2].
    point, low, high = stats.stratified_bootstrap_ci([np.array([[0.0], [1.0], [2.0]])], "mean", reps=4000, seed=1)
    assert (point[0], low[0], high[0]) == (1.0, 0.0, 2.0)
    # Two runs: replicates are a, (a+b)/2, b with probabilities 1/4, 1/2, 1/4.
    _, low, high = stats.stratified_bootstrap_ci([np.array([[3.0], [5.0]])], "iqm", reps=2000, seed=0)
    assert (low[0], high[0]) == (3.0, 5.0)
    _, low, high = stats.stratified_bootstrap_ci([np.array([[3.0], [5.0]])], "mean", reps=2000, confidence=0.4)
    assert (low[0], high[0]) == (4.0, 4.0)  # the 30th and 70th percentiles both fall in the middle half
    # A single run: no sampling variability.
    point, low, high = stats.stratified_bootstrap_ci([np.array([[7.0, 8.0]])], "mean", reps=50)
    assert point.tolist() == low.tolist() == high.tolist() == [7.0, 8.0]


def test_bootstrap_is_stratified_by_task():
    # Constant within each task: resampling inside tasks never changes the aggregate; resampling the
    # pooled runs (unstratified) would, e.g. all six draws from the first task.
    tasks = [np.zeros((3, 4)), np.full((3, 4), 10.0)]
    for method in ("mean", "iqm"):
        point, low, high = stats.stratified_bootstrap_ci(tasks, method, reps=500, seed=3)
        assert point.tolist() == low.tolist() == high.tolist() == [5.0] * 4


def test_bootstrap_is_seeded_and_chunking_does_not_change_it(monkeypatch):
    rng = np.random.default_rng(0)
    tasks = [rng.normal(size=(5, 30)), rng.normal(size=(3, 30))]
    first = stats.stratified_bootstrap_ci(tasks, "iqm", reps=300, seed=7)
    again = stats.stratified_bootstrap_ci(tasks, "iqm", reps=300, seed=7)
    assert all((a == b).all() for a, b in zip(first, again))
    assert (first[1] <= first[0]).all() and (first[0] <= first[2]).all()
    assert (first[2] - first[1] > 0).all()


def test_bootstrap_input_errors():
    with pytest.raises(ValueError, match="runs >= 1"):
        stats.stratified_bootstrap_ci([np.zeros((0, 3))], "mean")
    with pytest.raises(ValueError, match="confidence"):
        stats.stratified_bootstrap_ci([np.zeros((2, 3))], "mean", confidence=1.5)


def test_trailing_mean_matches_its_definition():
    values = np.array([1.0, 5.0, 2.0, 8.0, 3.0])
    expected = [np.mean(values[max(0, i - 2):i + 1]) for i in range(len(values))]
    assert stats.trailing_mean(values, 3) == pytest.approx(expected)
    assert stats.trailing_mean(values, 1).tolist() == values.tolist()
    with pytest.raises(ValueError):
        stats.trailing_mean(values, 0)


def test_step_grid_stays_inside_every_run_and_interpolates_exactly():
    a, b = np.array([0, 10, 20, 30]), np.array([5, 15, 25, 35])
    assert stats.step_grid([a, b], 100).tolist() == [5, 10, 15, 20, 25, 30]  # the union in the common range
    grid = stats.step_grid([np.arange(0, 1000), np.arange(3, 900)], 50)
    assert len(grid) == 50 and grid[0] == 3 and grid[-1] == 899
    assert stats.interpolate(a, 2.0 * a + 1.0, grid[grid <= 30]) == pytest.approx(2.0 * grid[grid <= 30] + 1.0)
    with pytest.raises(ValueError, match="do not overlap"):
        stats.step_grid([np.array([0, 1]), np.array([5, 6])], 10)


def test_final_window_mean_and_change_steps():
    steps = np.array([100, 200, 300, 400, 500, 600, 700, 800, 900, 1000])
    values = np.arange(10, dtype=np.float64)
    assert stats.final_window_mean(steps, values, 1000, 0.1) == 8.5  # steps >= 900: both ends included
    assert stats.final_window_mean(steps, values, 1000, 0.25) == pytest.approx(np.mean([7.0, 8.0, 9.0]))
    assert stats.final_window_mean(steps[:3], values[:3], 1000, 0.1) == 2.0  # nothing in the window: last value
    assert stats.change_steps(np.array([0, 100, 200, 300, 400]), np.array([0, 0, 1, 1, 2.0])).tolist() == [200, 400]


# ---- reading event files ----

def _write(run_dir: Path, points, purge_step=None, text=False):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    if text:
        writer.add_text("hyperparameters", "|param|value|")
    for tag, step, value in points:
        writer.add_scalar(tag, value, step)
    writer.close()


def test_reader_merges_resumed_event_files_like_tensorboard(tmp_path):
    run = tmp_path / "run"
    _write(run, [("a", s, float(s)) for s in range(6)] + [("b", 5, 1.0)], text=True)
    time.sleep(0.01)
    _write(run, [("a", s, -float(s)) for s in range(3, 8)], purge_step=3)  # resumed from step 3
    scalars, tags, last_step = read_scalars(run)
    assert tags == ("a", "b") and last_step == 7
    assert scalars["a"].steps.tolist() == list(range(8))
    assert scalars["a"].values.tolist() == [0.0, 1.0, 2.0, -3.0, -4.0, -5.0, -6.0, -7.0]
    assert "b" not in scalars  # logged at step 5 by the interrupted run: purged
    reference = accumulate(run)
    assert reference["a"][0].tolist() == scalars["a"].steps.tolist()
    assert reference["a"][1].tolist() == scalars["a"].values.tolist()


def test_reader_orders_files_by_write_time_not_name_and_last_write_wins(tmp_path):
    run = tmp_path / "run"
    _write(run, [("a", 1, 1.0), ("a", 2, 2.0), ("a", 2, 2.5)])
    time.sleep(0.01)
    _write(run, [("a", 2, 9.0), ("a", 3, 3.0)])
    first, second = sorted(run.glob("events.out.tfevents.*"), key=os.path.getmtime)
    first.rename(run / "events.out.tfevents.9999999999.host.1.0")  # sorts last by name
    scalars, _, _ = read_scalars(run)
    assert scalars["a"].steps.tolist() == [1, 2, 3]
    assert scalars["a"].values.tolist() == [1.0, 9.0, 3.0]


def test_reader_reads_tensor_scalars_whose_metadata_only_the_first_value_carries(tmp_path):
    """TF2 writers store scalars as rank-0 tensors and write the plugin metadata once per tag."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from tensorboard.util import tensor_util

    def value(tag, content, plugin=None):
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=plugin)) if plugin else None
        return Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(content), metadata=metadata)

    writer = EventFileWriter(str(tmp_path))
    writer.add_event(Event(step=1, wall_time=1.0, summary=Summary(value=[value("loss", 0.5, "scalars"),
                                                                         value("note", "hi", "text")])))
    writer.add_event(Event(step=2, wall_time=2.0, summary=Summary(value=[value("loss", 0.25), value("note", "x")])))
    writer.close()
    scalars, tags, last_step = read_scalars(tmp_path)
    assert tags == ("loss",) and last_step == 2
    assert scalars["loss"].steps.tolist() == [1, 2] and scalars["loss"].values.tolist() == [0.5, 0.25]


def test_find_run_dirs_and_its_errors(tmp_path):
    _write(tmp_path / "sweep" / "runs" / "r1", [("a", 1, 1.0)])
    _write(tmp_path / "sweep" / "runs" / "r2", [("a", 1, 1.0)])
    (tmp_path / "sweep" / "logs").mkdir()
    assert [p.name for p in find_run_dirs([tmp_path / "sweep"])] == ["r1", "r2"]
    assert len(find_run_dirs([tmp_path / "sweep", tmp_path / "sweep" / "runs" / "r1"])) == 2  # no duplicates
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        find_run_dirs([tmp_path / "sweep" / "logs"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_run_dirs([tmp_path / "missing"])


# ---- grouping ----

def _run(name, **config) -> RunData:
    base = {"agent": "dqn", "env_id": "ImageMDP/mnist", "exp_name": "base", "seed": 1, "total_timesteps": 400,
            "layer_norm": False, "run_name": name, "runs_dir": "runs"}
    return RunData(path=Path(name), config={**base, **config}, status=Status(COMPLETED, 2, 2, 0.0),
                   scalars={"x": Series(np.array([1, 2]), np.array([1.0, 2.0]))}, tags=("x",), last_step=2)


def test_grouping_by_variant_and_labels():
    runs = [_run("a", seed=1), _run("b", seed=2), _run("c", exp_name="ln", layer_norm=True)]
    groups = group_runs(runs, ["agent", "variant"])
    assert [g.label for g in groups] == ["base", "ln"]  # agent is the same everywhere: not in the label
    assert [[r.name for r in g.runs] for g in groups] == [["a", "b"], ["c"]]
    assert group_runs(runs, ["agent", "variant", "env_id"])[0].values == {
        "agent": "dqn", "variant": "base", "env_id": "ImageMDP/mnist"}


def test_grouping_refuses_mixed_configurations_and_names_the_fields():
    runs = [_run("a"), _run("b", exp_name="ln", layer_norm=True, seed=2), _run("c", total_timesteps=800, seed=3)]
    with pytest.raises(ValueError, match=r"differ in layer_norm, total_timesteps .*layer_norm: false in a, true in b"):
        group_runs(runs, ["agent"])
    groups = group_runs(runs, ["agent"], allow_differing=["layer_norm", "total_timesteps"])
    assert len(groups) == 1 and len(groups[0].runs) == 3
    with pytest.raises(ValueError, match="no 'lr' in config.json"):
        group_runs(runs, ["lr"])


def test_population_members_group_with_single_runs_of_the_same_variant():
    """A member's config.json names its population; which process trained a seed is not a difference."""
    population = {"seed": 1, "num_seeds": 2, "member": 0, "lead": "a", "members": ["a", "b"]}
    runs = [_run("a", seed=1, num_seeds=1, population=population),
            _run("b", seed=2, num_seeds=1, population={**population, "member": 1}),
            _run("c", seed=3, num_seeds=1)]
    groups = group_runs(runs, ["variant"])
    assert [[r.name for r in g.runs] for g in groups] == [["a", "b", "c"]]


# ---- Atari reference scores ----

def test_reference_table_and_normalisation():
    reference = atari_scores.load_reference()
    assert len({entry.game for entry in reference.values()}) == 57
    assert all(entry.human != entry.random for entry in reference.values())
    header = atari_scores.REFERENCE_CSV.read_text()
    assert "Badia et al. 2020" in header and "Mnih et al. 2015" in header
    assert atari_scores.game_of_env("ALE/Breakout-v5") == "Breakout"
    assert atari_scores.game_of_env("MontezumaRevengeNoFrameskip-v4") == "MontezumaRevenge"
    breakout = reference["breakout"]
    normalized = atari_scores.human_normalize(np.array([breakout.random, breakout.human]), "Breakout", reference)
    assert normalized.tolist() == [0.0, 1.0]
    assert atari_scores.human_normalize(np.array([0.0]), "montezuma_revenge", reference)[0] == 0.0
    with pytest.raises(ValueError, match="Atari env ids"):
        atari_scores.game_of_env("ImageMDP/mnist")
    with pytest.raises(ValueError, match="no random/human reference score for 'Adventure'"):
        atari_scores.human_normalize(np.array([1.0]), "Adventure", reference)
    with pytest.raises(ValueError, match="per-game tags"):
        atari_scores.game_for("charts/episodic_return", {"env_id": "ALE/Pong-v5", "atari_shift": ["games"]})
    assert atari_scores.game_for("charts/episodic_return/Pong", {"env_id": "ALE/Breakout-v5"}) == "Pong"


def test_human_normalized_table_aggregates_games_stratified(tmp_path):
    """Runs of two games in one group: returns normalised per game, the mean is the mean of game means."""
    raw = {("Breakout", 1): 30.5, ("Breakout", 2): 16.1, ("Breakout", 3): 1.7, ("Pong", 1): 14.6}
    for (game, seed), score in raw.items():
        run_dir = tmp_path / f"ALE_{game}-v5__dqn__base__{seed}"
        _write(run_dir, [("charts/episodic_return", step, score) for step in (500, 1000)])
        (run_dir / "config.json").write_text(json.dumps({
            "env_id": f"ALE/{game}-v5", "agent": "dqn", "exp_name": "base", "seed": seed, "run_name": run_dir.name}))
    csv_path = tmp_path / "t.csv"
    assert plot.main([str(tmp_path), "--group-by", "variant", "--human-normalized", "--table",
                      "--csv", str(csv_path)]) == 0
    (row,) = csv.DictReader(open(csv_path))
    breakout = [(30.5 - 1.7) / (30.5 - 1.7), (16.1 - 1.7) / (30.5 - 1.7), 0.0]
    pong = (14.6 + 20.7) / (14.6 + 20.7)
    assert float(row["value"]) == pytest.approx((np.mean(breakout) + pong) / 2, rel=1e-6)
    # Stratified: Pong's single run is always drawn, Breakout's three are resampled among themselves.
    assert float(row["ci_low"]) == pytest.approx((0.0 + pong) / 2, rel=1e-6)
    assert float(row["ci_high"]) == pytest.approx((1.0 + pong) / 2, rel=1e-6)
    assert row["human_normalized"] == "True" and row["runs"] == "4"
    # Without normalisation, different games in one group are refused.
    assert plot.main([str(tmp_path), "--group-by", "variant", "--table"]) == 2


# ---- figures and tables of a real sweep ----

def _args(*argv) -> Namespace:
    return plot.build_parser().parse_args(["unused", *argv])


def test_figure_of_a_sweep(sweep_dir, tmp_path, capsys):
    out = tmp_path / "fig.png"
    tags = ["charts/episodic_return", "plasticity/effective_rank", "plasticity/dead_frac/*", "charts/accuracy"]
    assert plot.main([str(sweep_dir), "--group-by", "variant", "--tags", *tags, "--out", str(out),
                      "--formats", "png", "svg"]) == 0
    assert "2 groups, 4 runs" in capsys.readouterr().out
    import matplotlib.image

    pixels = matplotlib.image.imread(out)
    assert out.stat().st_size > 20_000 and pixels.shape[0] > 500 and pixels[..., :3].std() > 0.05
    assert (tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")


def test_figure_curves_equal_the_event_files_and_mark_task_switches(sweep_dir):
    runs = load_runs([sweep_dir])
    groups = group_runs(runs, ["variant"])
    args = _args("--tags", "charts/episodic_return", "plasticity/effective_rank")
    for tag in args.tags:
        for group in groups:
            # Seeds log at the same steps here, so the grid is those steps and the mean is exact.
            reference = [accumulate(run.path)[tag] for run in group.runs]
            curve = plot.group_curve(group, tag, "mean", 200, 1, 200, 0.95, 0)
            assert curve.steps.tolist() == reference[0][0].tolist() == reference[1][0].tolist()
            assert curve.point == pytest.approx(np.mean([values for _, values in reference], axis=0))
            assert (curve.lower <= curve.point + 1e-12).all() and (curve.point <= curve.upper + 1e-12).all()

    switches = plot.task_switch_steps(runs)
    task_ids = [accumulate(run.path)["charts/task_id"] for run in runs]
    expected = sorted({int(s) for steps, ids in task_ids for s in steps[1:][np.diff(ids) != 0]})
    assert switches.tolist() == expected and expected  # label_permutation every 200 steps: a switch happened
    fig = plot.build_figure(groups, args.tags, args)
    for ax in fig.axes[:2]:
        vertical = sorted({line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1
                           and line.get_linestyle() == ":"})
        assert vertical == expected
        assert sorted(line.get_label().split(" (n=")[0] for line in ax.lines if line.get_linestyle() == "-") == [
            "base", "ln"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_table_equals_an_independent_computation_from_the_event_files(sweep_dir, tmp_path, capsys):
    tags = ["charts/episodic_return", "plasticity/effective_rank"]
    md, csv_path = tmp_path / "table.md", tmp_path / "table.csv"
    assert plot.main([str(sweep_dir), "--group-by", "variant", "--tags", *tags, "--table", "--out", str(md),
                      "--csv", str(csv_path)]) == 0
    printed = capsys.readouterr().out
    assert md.read_text() == printed
    rows = {(row["variant"], row["tag"]): row for row in csv.DictReader(open(csv_path))}
    assert len(rows) == 4
    for run_dirs_variant in ("base", "ln"):
        run_dirs = sorted((sweep_dir / "runs").glob(f"*__{run_dirs_variant}__*"))
        assert len(run_dirs) == 2
        for tag in tags:
            per_run = []
            for run_dir in run_dirs:
                scalars = accumulate(run_dir)
                last = max(steps.max() for steps, _ in scalars.values())
                steps, values = scalars[tag]
                per_run.append(values[steps >= 0.9 * last].mean())
            row = rows[(run_dirs_variant, tag)]
            assert float(row["value"]) == pytest.approx(np.mean(per_run), rel=1e-12)
            # Two runs: the bootstrap replicates are a, (a+b)/2, b, so the 95% interval is [min, max].
            assert float(row["ci_low"]) == pytest.approx(min(per_run), rel=1e-12)
            assert float(row["ci_high"]) == pytest.approx(max(per_run), rel=1e-12)
            assert int(row["runs"]) == 2
            assert f"{np.mean(per_run):.4g} [{min(per_run):.4g}, {max(per_run):.4g}]" in printed


def test_iqm_table_and_incomplete_runs_note(sweep_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir / "runs", copy)
    status = next(copy.glob("*__ln__1")) / "status.json"
    status.write_text(json.dumps({"status": "interrupted", "global_step": 200, "total_timesteps": 400}))
    assert plot.main([str(copy), "--group-by", "variant", "--aggregate", "iqm", "--table"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("IQM over runs") and "| base | 2 |" in captured.out
    assert "1 of 4 runs have not completed (interrupted)" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["--tags", "charts/nope"], "no run has a tag matching 'charts/nope'; available tags: charts/SPS"),
    (["--group-by", "agent"], "differ in layer_norm"),
    (["--group-by", "learning_rates"], "no 'learning_rates' in config.json"),
    (["--out", "fig.jpg"], "use .png, .svg or .pdf"),
    (["--human-normalized"], "applies to Atari env ids"),
    (["--final-frac", "0", "--table"], "--final-frac must be in (0, 1]"),
])
def test_errors_are_one_line_with_what_to_do(sweep_dir, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # a wrongly successful call would write plot.png here
    assert plot.main([str(sweep_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_allow_differing_puts_variants_in_one_group(sweep_dir, tmp_path):
    assert plot.main([str(sweep_dir), "--group-by", "agent", "--allow-differing", "layer_norm",
                      "--tags", "charts/accuracy", "--out", str(tmp_path / "one.pdf")]) == 0
    assert (tmp_path / "one.pdf").read_bytes().startswith(b"%PDF")


def test_load_run_reads_config_and_status(sweep_dir):
    run = load_run(next((sweep_dir / "runs").glob("*__base__1")))
    assert run.completed and run.config["exp_name"] == "base" and run.last_step == 400
