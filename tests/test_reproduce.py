"""scripts/sweeps/reproduce.py and its helpers in scripts/analysis/stats.py: the per-task trend against its definition,
the expectation verdicts, bad input, and a smoke run of every study whose summary is checked against
the event files read independently with TensorBoard's EventAccumulator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tb_reference import accumulate

from scripts.analysis import stats
from scripts.analysis.groups import Group
from scripts.analysis.tbreader import RunData, Series
from scripts.sweeps import reproduce

# ---- stats: the per-task trend ----


def test_task_slopes_is_the_least_squares_slope():
    assert stats.task_slopes(3.0 + 0.5 * np.arange(6)) == pytest.approx(0.5, abs=1e-12)
    assert stats.task_slopes(np.full(5, 0.7)) == 0.0
    assert stats.task_slopes([1.0, 0.0]) == -1.0  # two tasks: the difference
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4, 9))
    expected = [np.polyfit(np.arange(9), row, 1)[0] for row in rows]
    np.testing.assert_allclose(stats.task_slopes(rows), expected, rtol=1e-10)  # one slope per row
    # Invariant to adding a constant, linear in the values.
    np.testing.assert_allclose(stats.task_slopes(2 * rows + 5), 2 * stats.task_slopes(rows), rtol=1e-10)
    for bad in ([0.5], [], 3.0):
        with pytest.raises(ValueError, match="at least 2 tasks"):
            stats.task_slopes(bad)


def test_mean_slope_ci_bootstraps_the_runs_slopes():
    # Three runs with slopes 0, 1, 2 (different task counts are fine): the mean is 1, and every
    # extreme replicate (all three draws the same run) has probability 1/27 > 2.5%: the CI is [0, 2].
    runs = [np.zeros(4), np.arange(3.0), 2.0 * np.arange(5)]
    assert stats.mean_slope_ci(runs, reps=4000, seed=1) == (1.0, 0.0, 2.0)
    point, low, high = stats.mean_slope_ci([np.arange(4.0), np.arange(4.0) + 3], reps=500)
    assert point == low == high == 1.0  # identical slopes: no sampling variability
    with pytest.raises(ValueError, match="at least one run"):
        stats.mean_slope_ci([])


# ---- the summary's metrics and verdicts ----


def fake_run(tags: dict[str, tuple[list[int], list[float]]], last_step: int) -> RunData:
    scalars = {tag: Series(np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64))
               for tag, (steps, values) in tags.items()}
    return RunData(path=Path("run"), config={}, status=None, scalars=scalars, tags=tuple(scalars), last_step=last_step)


def test_run_metrics_follow_their_definitions():
    run = fake_run({reproduce.TASK_ACCURACY: ([100, 200, 300, 400], [1.0, 0.2, 0.4, 0.6]),
                    reproduce.ACCURACY: ([50, 100, 400], [0.1, 0.2, 0.6]),
                    "plasticity/weight_norm": ([100, 200, 300, 400], [1.0, 2.0, 3.0, 5.0])}, last_step=400)
    assert reproduce.run_metric(run, "slope", 1, 0.1) == pytest.approx(0.2)  # tasks 1..3: 0.2, 0.4, 0.6
    assert reproduce.run_metric(run, "slope", 0, 0.1) == pytest.approx(np.polyfit(range(4), [1, .2, .4, .6], 1)[0])
    assert reproduce.run_metric(run, "mean_task_accuracy", 1, 0.1) == pytest.approx(0.4)
    assert reproduce.run_metric(run, "last_task_accuracy", 1, 0.1) == 0.6
    assert reproduce.run_metric(run, "accuracy_auc", 1, 0.1) == pytest.approx(0.3)  # all of charts/accuracy
    # thirds of tasks 1..3 (one task each); of tasks 0..3: [1, .2], [.4], [.6]
    assert [reproduce.run_metric(run, m, 1, 0.1) for m in reproduce.THIRDS] == pytest.approx([0.2, 0.4, 0.6])
    assert [reproduce.run_metric(run, m, 0, 0.1) for m in reproduce.THIRDS] == pytest.approx([0.6, 0.4, 0.6])
    assert reproduce.run_metric(run, "plasticity/weight_norm", 1, 0.25) == 4.0  # steps >= 0.75 * 400: 3, 5
    # growth: final window (steps >= 300 with frac 0.25) mean 4.0 over the window ending at mid-run
    # (steps in [100, 200]) mean 1.5, minus 1.
    assert reproduce.run_metric(run, "growth:plasticity/weight_norm", 1, 0.25) == pytest.approx(4.0 / 1.5 - 1)
    with pytest.raises(ValueError, match="needs 3"):
        reproduce.run_metric(run, "late_task_accuracy", 2, 0.1)
    no_switch = fake_run({reproduce.ACCURACY: ([100], [0.5])}, last_step=100)
    with pytest.raises(ValueError, match="no charts/task_final_accuracy"):
        reproduce.run_metric(no_switch, "slope", 0, 0.1)


def test_a_diagnostic_undefined_in_some_runs_is_averaged_over_the_others_and_counted():
    def run(cond: float) -> RunData:
        return fake_run({reproduce.TASK_ACCURACY: ([100, 200, 300, 400], [1.0, 0.2, 0.4, 0.6]),
                         reproduce.ACCURACY: ([400], [0.5]), "plasticity/feature_cond": ([400], [cond])},
                        last_step=400)
    study = reproduce.STUDIES["label-shuffle"]
    group = Group(values={"variant": "baseline"}, runs=[run(2.0), run(float("nan")), run(4.0)])
    undefined: dict[str, int] = {}
    metrics = reproduce.arm_metrics(group, ["plasticity/feature_cond", "mean_task_accuracy"], study, 0.1, 200, 0.95,
                                    0, undefined)
    assert metrics["plasticity/feature_cond"][0] == pytest.approx(3.0)  # the two runs where it is defined
    assert undefined == {"plasticity/feature_cond": 1}
    all_nan = Group(values={"variant": "baseline"}, runs=[run(float("nan"))])
    assert np.isnan(reproduce.arm_metrics(all_nan, ["plasticity/feature_cond"], study, 0.1, 200, 0.95, 0)[
        "plasticity/feature_cond"]).all()


def test_expectation_verdicts():
    arms = {"a": {"metrics": {"m": [2.0, 1.5, 2.5]}}, "b": {"metrics": {"m": [1.0, 0.5, 1.2]}},
            "c": {"metrics": {"m": [1.8, 0.0, 3.0]}}, "n": {"metrics": {"m": [float("nan")] * 3}}}
    verdict = reproduce.evaluate(reproduce.Expectation("x", "m", "a", "b"), arms)
    assert (verdict["holds"], verdict["separated"]) == (True, True)
    verdict = reproduce.evaluate(reproduce.Expectation("x", "m", "b", "a"), arms)
    assert (verdict["holds"], verdict["separated"]) == (False, True)  # the opposite, significantly
    verdict = reproduce.evaluate(reproduce.Expectation("x", "m", "c", "a"), arms)
    assert (verdict["holds"], verdict["separated"]) == (False, False)
    # "not worse": holds unless the whole interval lies below the other arm's point estimate.
    assert reproduce.evaluate(reproduce.Expectation("x", "m", "c", "a", "not_less"), arms)["holds"] is True
    assert reproduce.evaluate(reproduce.Expectation("x", "m", "b", "a", "not_less"), arms)["holds"] is False
    assert reproduce.evaluate(reproduce.Expectation("x", "m", "n", "a"), arms)["holds"] is None


def test_ordering_text_marks_which_neighbours_separate():
    arms = {"a": {"metrics": {"m": [0.5, 0.45, 0.55]}}, "b": {"metrics": {"m": [0.3, 0.2, 0.4]}},
            "c": {"metrics": {"m": [0.29, 0.1, 0.35]}}, "d": {"metrics": {"m": [0.1, 0.05, 0.2]}}}
    # a's interval lies above b's (0.45 > 0.4); b's and c's overlap; c's and d's touch (0.1 < 0.2): overlap.
    assert reproduce.ordering_text(["a", "b", "c", "d"], arms, "m") == "a 0.5 > b 0.3 ≈ c 0.29 ≈ d 0.1"
    assert reproduce.ordering_text(["a"], arms, "m") == "a 0.5"


def test_every_study_is_declared_consistently():
    for study in reproduce.STUDIES.values():
        assert len(study.arms) >= 2 and study.expectations
        for expectation in study.expectations:
            assert {expectation.higher, expectation.lower} <= set(study.arms), expectation
        for size in (study.size, reproduce.SMOKE_SIZE):
            flags = study.common_flags(size)
            steps = int(flags.split("--total-timesteps ")[1].split()[0])
            shift_every = int(flags.split("--shift-every ")[1].split()[0])
            assert steps == size.num_tasks * shift_every and shift_every % reproduce.NUM_ENVS == 0  # whole tasks
            assert size.num_tasks - study.first_task >= 3  # a trend over at least 3 tasks


# ---- the command line ----


def test_bad_input_gives_one_clear_error(tmp_path, capsys):
    assert reproduce.main(["no-such-study"]) == 2
    assert "unknown study 'no-such-study'; one of: label-shuffle, target-mean, cbp, swr" in capsys.readouterr().err
    assert reproduce.main(["cbp", "--smoke", "--data-dir", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert reproduce.main(["cbp", "--analyze-only", "--sweep-dir", str(tmp_path)]) == 2
    assert "no runs in" in capsys.readouterr().err
    assert reproduce.main(["cbp", "--num-seeds", "0"]) == 2
    assert "--num-seeds must be at least 1" in capsys.readouterr().err
    assert reproduce.main(["cbp", "--smoke", "--seeds-per-process", "0", "--sweep-dir", str(tmp_path)]) == 2
    assert "--seeds-per-process (seeds_per_process) must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "manifest.json").exists()


def test_the_sweep_passes_seeds_per_process_to_benchmark(tmp_path):
    study, seeds = reproduce.STUDIES["cbp"], [1, 2, 3]
    argv = reproduce.sweep_argv(study, reproduce.SMOKE_SIZE, seeds, tmp_path, 2, "", seeds_per_process="1")
    assert argv[-2:] == ["--seeds-per-process", "1"]
    assert "--seeds-per-process" not in reproduce.sweep_argv(study, reproduce.SMOKE_SIZE, seeds, tmp_path, 2, "")


# ---- a smoke run of every study, checked against the event files ----



@pytest.mark.parametrize("name", list(reproduce.STUDIES))
def test_smoke_study_writes_figures_and_a_summary_from_the_event_files(name, tmp_path, mnist_dir):
    study = reproduce.STUDIES[name]
    sweep_dir, out_dir = tmp_path / "sweep", tmp_path / "out"
    code = reproduce.main([name, "--smoke", "--workers", "2", "--data-dir", str(mnist_dir), "--sweep-dir",
                           str(sweep_dir), "--out-dir", str(out_dir), "--reps", "2000", "--curve-reps", "100"])
    assert code == 0, f"see the logs in {sweep_dir / 'logs'}"
    assert (sweep_dir / "manifest.json").exists()  # it ran through scripts/sweeps/benchmark.py
    for figure in ("accuracy.png", "diagnostics.png"):
        data = (out_dir / figure).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < 300_000
    summary = json.loads((out_dir / "summary.json").read_text())
    page = (out_dir / "summary.md").read_text()
    assert list(summary["arms"]) == list(study.arms)
    assert "![accuracy](accuracy.png)" in page and "![diagnostics](diagnostics.png)" in page
    for arm in study.arms:
        assert f"| {arm} |" in page
        assert summary["arms"][arm]["runs"] == 2 and summary["arms"][arm]["tasks"] == [4]
    assert summary["settings"]["timing"]["runs_executed"] == 2 * len(study.arms)
    # benchmark.py's default packing: each arm's two seeds trained as one population process.
    assert summary["settings"]["timing"]["processes"] == len(study.arms)
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert all(record["population"]["num_seeds"] == 2 for record in manifest["runs"])
    assert len(summary["expectations"]) >= len(study.expectations)

    # Recompute two numbers of one arm independently: the slope (np.polyfit) and a diagnostic's final window.
    arm = list(study.arms)[-1]
    tag = "plasticity/dead_frac"
    slopes, finals = [], []
    for seed in (1, 2):
        scalars = accumulate(sweep_dir / "runs" / f"ImageMDP_mnist__dqn__{arm}__{seed}")
        task_accuracy = scalars[reproduce.TASK_ACCURACY][1][study.first_task:]
        slopes.append(np.polyfit(np.arange(len(task_accuracy)), task_accuracy, 1)[0])
        last_step = max(steps.max() for steps, _ in scalars.values())
        steps, values = scalars[tag]
        finals.append(values[steps >= 0.9 * last_step].mean())
    metrics = summary["arms"][arm]["metrics"]
    assert metrics["slope"][0] == pytest.approx(np.mean(slopes), abs=1e-9)
    assert min(slopes) - 1e-9 <= metrics["slope"][1] <= metrics["slope"][2] <= max(slopes) + 1e-9
    assert metrics[tag][0] == pytest.approx(np.mean(finals), abs=1e-9)
