"""rliable's metrics (Agarwal et al. 2021) in scripts/analysis/stats.py and plot.py's --profile,
--probability-of-improvement and --optimality-gap: the definitions on small score matrices computed by hand,
the stratified bootstrap's properties, and the command line end to end on synthetic run folders.

rliable itself is not a dependency (its ``arch`` dependency does not import with numpy 2 / pandas 3), so the
expected values below are worked out from its definitions (rliable.metrics, rliable.library):
mean/median over tasks of the per-task mean, IQM of the pooled scores, optimality gap γ − mean(min(x, γ)),
P(X > Y) = mean over tasks of U / (n_x n_y), and the run-score distribution mean(x > τ).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

# The event-file writer of tests/test_plot.py (torch's SummaryWriter).
from test_plot import _write

from scripts.analysis import plot, stats

# 3 runs × 2 tasks per method; dyadic values, so float32 event files hold them exactly and ties stay ties.
BASE = {"ImageMDP/fashion_mnist": [0.25, 0.5, 0.5], "ImageMDP/mnist": [0.875, 0.375, 1.0]}
NEW = {"ImageMDP/fashion_mnist": [0.5, 0.75, 0.625], "ImageMDP/mnist": [1.0, 0.625, 0.875]}
TAG = "charts/task_final_accuracy"


def _tasks(scores: dict) -> list[np.ndarray]:
    return [np.array(values) for _, values in sorted(scores.items())]


# ---- definitions, by hand ----

def test_aggregates_and_optimality_gap_by_hand():
    base, new = _tasks(BASE), _tasks(NEW)
    # mean of task means: (1.25/3 + 2.25/3) / 2
    assert stats.final_aggregate(base, "mean") == pytest.approx(7 / 12)
    assert stats.final_aggregate(new, "mean") == pytest.approx((1.875 / 3 + 2.5 / 3) / 2)
    # IQM of the 6 pooled scores: sorted 0.25 0.375 0.5 0.5 0.875 1, drop int(1.5) = 1 at each end
    assert stats.final_aggregate(base, "iqm") == pytest.approx((0.375 + 0.5 + 0.5 + 0.875) / 4)
    assert stats.final_aggregate(new, "iqm") == pytest.approx((0.625 + 0.625 + 0.75 + 0.875) / 4)
    # median of task means: with two tasks their mean; a third task (mean 1/12) makes it the middle one, 5/12
    assert stats.final_aggregate(base, "median") == pytest.approx(7 / 12)
    assert stats.final_aggregate([*base, np.array([0.0, 0.0, 0.25])], "median") == pytest.approx(1.25 / 3)
    # optimality gap, γ = 1: mean of max(1 − x, 0) = (0.75 + 0.5 + 0.5)/3 and (0.125 + 0.625 + 0)/3, averaged
    assert stats.optimality_gap(base) == pytest.approx((1.75 / 3 + 0.75 / 3) / 2)
    assert stats.optimality_gap(new) == pytest.approx((1.125 / 3 + 0.5 / 3) / 2)
    # γ = 0.75: scores above γ count as γ (1.0 and 0.875 contribute nothing)
    assert stats.optimality_gap(new, 0.75) == pytest.approx(((0.25 + 0 + 0.125) / 3 + (0 + 0.125 + 0) / 3) / 2)
    # rliable's form γ − mean(min(x, γ)) is the same number
    matrix = np.stack(base, axis=1)
    assert stats.optimality_gap(base) == pytest.approx(1.0 - np.mean(np.minimum(matrix, 1.0)))


def test_probability_of_improvement_counts_ties_as_half():
    base, new = _tasks(BASE), _tasks(NEW)
    # fashion_mnist: new 0.5 beats 0.25 and ties 0.5 twice (2), 0.75 and 0.625 beat all three (3 + 3): 8/9.
    # mnist: new 1.0 beats 0.875, 0.375 and ties 1.0 (2.5); 0.625 beats 0.375 (1); 0.875 ties 0.875, beats
    # 0.375 (1.5): 5/9.  Mean over the two tasks: 13/18.
    assert stats.probability_of_improvement(new, base) == pytest.approx(13 / 18)
    assert stats.probability_of_improvement(base, new) == pytest.approx(5 / 18)  # 1 − P(new > base)
    assert stats.probability_of_improvement(base, base) == pytest.approx(0.5)
    # Different run counts: x = [1] against y = [0, 1, 2] is (1 + ½ + 0) / 3.
    assert stats.probability_of_improvement([np.array([1.0])], [np.array([0.0, 1.0, 2.0])]) == pytest.approx(0.5)
    assert stats.probability_of_improvement([np.array([1.0])], [np.array([0.0, 1.0, 1.0])]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="task by task"):
        stats.probability_of_improvement(base, base[:1])


def test_performance_profile_is_the_fraction_of_runs_strictly_above_tau():
    base, new = _tasks(BASE), _tasks(NEW)
    taus = np.array([0.0, 0.25, 0.375, 0.5, 0.625, 1.0])
    # base, per task (fashion_mnist | mnist) runs > τ: 3|3, 2|3, 2|2, 0|2, 0|2, 0|0 out of 3
    assert stats.score_distribution(base, taus) == pytest.approx([1, 5 / 6, 2 / 3, 1 / 3, 1 / 3, 0])
    # new: 3|3, 3|3, 3|3, 2|3, 1|2, 0|0
    assert stats.score_distribution(new, taus) == pytest.approx([1, 1, 1, 5 / 6, 1 / 2, 0])
    # rliable's run_score_deviation on the (runs × tasks) matrix: np.mean(scores > τ)
    assert stats.score_distribution(base, taus) == pytest.approx([np.mean(np.stack(base, 1) > t) for t in taus])


def test_ragged_run_counts_weigh_every_task_equally():
    # rliable needs a (runs × tasks) matrix; with 3 runs on one task and 1 on another, every task weighs 1/2.
    tasks = [np.array([0.0, 0.0, 1.0]), np.array([1.0])]
    assert stats.score_distribution(tasks, np.array([0.5])) == pytest.approx([(1 / 3 + 1) / 2])
    assert stats.optimality_gap(tasks) == pytest.approx((2 / 3 + 0) / 2)
    assert stats.final_aggregate(tasks, "mean") == pytest.approx((1 / 3 + 1) / 2)
    assert stats.final_aggregate(tasks, "iqm") == pytest.approx(0.5)  # pooled 0 0 1 1, drop one at each end


def test_metrics_keep_leading_replicate_axes():
    base = _tasks(BASE)
    stacked = [np.stack([task, task[::-1]]) for task in base]  # two "replicates", the same multiset of runs
    assert stats.optimality_gap(stacked) == pytest.approx([float(stats.optimality_gap(base))] * 2)
    assert stats.score_distribution(stacked, np.array([0.5, 0.9])).shape == (2, 2)
    assert stats.probability_of_improvement(stacked, stacked) == pytest.approx([0.5, 0.5])
    assert stats.final_aggregate(stacked, "iqm") == pytest.approx([float(stats.final_aggregate(base, "iqm"))] * 2)


# ---- the stratified bootstrap ----

def _gap_statistic(tasks):
    return np.stack([stats.final_aggregate(tasks, "iqm"), stats.optimality_gap(tasks)], axis=-1)


def test_intervals_contain_the_point_and_a_seed_reproduces_them():
    base, new = _tasks(BASE), _tasks(NEW)
    taus = np.linspace(0, 1, 9)
    for point, lower, upper in (
            stats.stratified_bootstrap([base], _gap_statistic, reps=3000, seed=5),
            stats.stratified_bootstrap([new], lambda t: stats.score_distribution(t, taus), reps=3000, seed=5),
            stats.stratified_bootstrap([new, base], stats.probability_of_improvement, reps=3000, seed=5)):
        assert (lower <= point + 1e-12).all() and (point <= upper + 1e-12).all()
        assert (lower >= -1e-12).all() and (upper <= 1 + 1e-12).all()
    first = stats.improvement_bootstrap_ci(new, base, reps=500, seed=11)
    assert stats.improvement_bootstrap_ci(new, base, reps=500, seed=11) == first
    assert first[0] == pytest.approx(13 / 18) and first[1] < first[0] < first[2]
    other = [stats.improvement_bootstrap_ci(new, base, reps=500, seed=seed) for seed in (12, 13, 14)]
    assert any(result[1:] != first[1:] for result in other)  # the seed is what fixes them


def test_resampling_stays_within_each_task_and_keeps_its_run_count():
    tasks = [np.array([0.0, 1.0, 2.0]), np.array([10.0, 11.0])]

    def drawn_from_own_task(resampled):
        a, b = resampled
        return np.stack([np.isin(a, tasks[0]).all(-1), np.isin(b, tasks[1]).all(-1),
                         np.full(a.shape[:-1], a.shape[-1]), np.full(b.shape[:-1], b.shape[-1]), a.mean(-1)], -1)

    point, lower, upper = stats.stratified_bootstrap([tasks], drawn_from_own_task, reps=400, seed=0)
    assert lower[:4].tolist() == upper[:4].tolist() == [1, 1, 3, 2]
    assert lower[4] < point[4] == 1.0 < upper[4]  # the runs are resampled: the first task's mean varies
    # Constant within each task: a stratified bootstrap never changes any metric; pooling the runs would.
    x = [np.array([1.0, 1.0]), np.array([0.0, 0.0, 0.0])]
    y = [np.array([0.0, 0.0, 0.0]), np.array([1.0, 1.0])]
    assert stats.improvement_bootstrap_ci(x, y, reps=300) == (0.5, 0.5, 0.5)
    point, lower, upper = stats.stratified_bootstrap([x], lambda t: stats.score_distribution(t, np.array([0.5])),
                                                     reps=300)
    assert point.tolist() == lower.tolist() == upper.tolist() == [0.5]


def test_bootstrap_intervals_on_enumerable_cases():
    # base at τ = 0.5: fashion_mnist's runs are all <= 0.5 (0 always); mnist's fraction is K/3 with
    # K ~ Bin(3, 2/3): P(K = 0) = 1/27 and P(K = 3) = 8/27 both exceed 2.5%, so the 95% band is [0, ½].
    point, lower, upper = stats.stratified_bootstrap(
        [_tasks(BASE)], lambda t: stats.score_distribution(t, np.array([0.5])), reps=4000, seed=0)
    assert (point[0], lower[0], upper[0]) == pytest.approx((1 / 3, 0.0, 0.5))
    # P(x > y) with x = [1], y = [0, 2]: y's resample is {0, 0} (P = 1), {2, 2} (0) or mixed (½) with
    # probabilities ¼, ¼, ½: the 95% interval is [0, 1], the 40% one [½, ½].
    x, y = [np.array([1.0])], [np.array([0.0, 2.0])]
    assert stats.improvement_bootstrap_ci(x, y, reps=2000) == (0.5, 0.0, 1.0)
    assert stats.improvement_bootstrap_ci(x, y, reps=2000, confidence=0.4) == (0.5, 0.5, 0.5)


def test_bootstrap_refuses_empty_input():
    with pytest.raises(ValueError, match="at least one task with runs >= 1"):
        stats.stratified_bootstrap([[np.array([])]], stats.optimality_gap)
    with pytest.raises(ValueError, match="replicates"):
        stats.stratified_bootstrap([_tasks(BASE)], stats.optimality_gap, reps=0)


# ---- the command line, end to end ----

def _make_runs(root: Path, methods: dict[str, dict[str, list[float]]]) -> Path:
    """Run folders (config.json, status.json, event files) whose final-window score of TAG is the given one."""
    for variant, per_env in methods.items():
        for env_id, values in per_env.items():
            for seed, score in enumerate(values, start=1):
                run_dir = root / f"{env_id.replace('/', '_')}__dqn__{variant}__{seed}"
                # Early values differ: only the final 10% (steps >= 900) makes the score.
                _write(run_dir, [(TAG, step, 0.0) for step in (100, 500)] + [(TAG, step, score) for step in (900, 1000)])
                (run_dir / "config.json").write_text(json.dumps({
                    "agent": "dqn", "env_id": env_id, "exp_name": variant, "seed": seed, "run_name": run_dir.name}))
                (run_dir / "status.json").write_text(json.dumps(
                    {"status": "completed", "global_step": 1000, "total_timesteps": 1000}))
    return root


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return _make_runs(tmp_path_factory.mktemp("rliable_runs"), {"base": BASE, "new": NEW})


GROUPING = ["--group-by", "variant", "--allow-differing", "env_id", "--tags", TAG]


def test_cli_writes_hand_computed_metrics(runs_dir, tmp_path, capsys):
    fig, md, csv_path = tmp_path / "rl.png", tmp_path / "rl.md", tmp_path / "rl.csv"
    assert plot.main([str(runs_dir), *GROUPING, "--profile", "--tau-range", "0", "1", "--tau-points", "9",
                      "--probability-of-improvement", "base", "--optimality-gap", "--reps", "3000",
                      "--out", str(fig), "--md", str(md), "--csv", str(csv_path)]) == 0
    captured = capsys.readouterr()
    assert md.read_text() == captured.out  # stdout is the Markdown alone; "wrote ..." goes to stderr
    assert f"wrote {fig}" in captured.err and "note:" not in captured.err
    rows = list(csv.DictReader(open(csv_path)))
    by_key = {(row["metric"], row["group"], row["versus"], row["tau"]): row for row in rows}
    expected = {
        ("median", "base", "", ""): 7 / 12, ("mean", "base", "", ""): 7 / 12,
        ("iqm", "base", "", ""): 0.5625, ("optimality_gap", "base", "", ""): 5 / 12,
        ("mean", "new", "", ""): 35 / 48, ("iqm", "new", "", ""): 0.71875,
        ("optimality_gap", "new", "", ""): 13 / 48,
        ("probability_of_improvement", "new", "base", ""): 13 / 18,
        ("performance_profile", "base", "", "0.25"): 5 / 6, ("performance_profile", "base", "", "0.5"): 1 / 3,
        ("performance_profile", "base", "", "0.375"): 2 / 3, ("performance_profile", "base", "", "1.0"): 0.0,
        ("performance_profile", "new", "", "0.5"): 5 / 6, ("performance_profile", "new", "", "0.625"): 0.5,
        ("performance_profile", "new", "", "0.0"): 1.0,
    }
    for key, value in expected.items():
        row = by_key[key]
        assert float(row["value"]) == pytest.approx(value, abs=1e-12), key
        assert float(row["ci_low"]) <= float(row["value"]) + 1e-12 <= float(row["ci_high"]) + 2e-12, key
        assert row["tag"] == TAG and row["tasks"] == "2" and row["runs"] == "6", key
    assert len(rows) == 2 * 4 + 1 + 2 * 9  # 4 aggregates and 9 profile points per group, one pair
    assert by_key[("optimality_gap", "base", "", "")]["gamma"] == "1.0"
    assert by_key[("probability_of_improvement", "new", "base", "")]["versus_runs"] == "6"
    assert by_key[("performance_profile", "base", "", "0.5")]["ci_low"] == "0.0"  # see the enumerable case
    assert float(by_key[("performance_profile", "base", "", "0.5")]["ci_high"]) == 0.5
    # The Markdown shows the same numbers.
    pair = by_key[("probability_of_improvement", "new", "base", "")]
    assert (f"| new | base | {13 / 18:.4g} [{float(pair['ci_low']):.4g}, {float(pair['ci_high']):.4g}] |"
            in captured.out)
    assert "| base | 6 | 2 | 0.5833 [" in captured.out and "τ=0.5" in captured.out
    import matplotlib.image

    pixels = matplotlib.image.imread(fig)
    assert fig.stat().st_size > 20_000 and pixels[..., :3].std() > 0.05


def test_cli_iqm_interval_is_the_tables_and_all_pairs_default(runs_dir, tmp_path, capsys):
    """--optimality-gap's IQM draws the same resamples as --table --aggregate iqm (same seed and replicates)."""
    table_csv, metrics_csv = tmp_path / "table.csv", tmp_path / "metrics.csv"
    assert plot.main([str(runs_dir), *GROUPING, "--table", "--aggregate", "iqm", "--reps", "2000", "--seed", "3",
                      "--csv", str(table_csv)]) == 0
    assert plot.main([str(runs_dir), *GROUPING, "--optimality-gap", "--probability-of-improvement", "--reps",
                      "2000", "--seed", "3", "--out", str(tmp_path / "f.svg"), "--csv", str(metrics_csv)]) == 0
    capsys.readouterr()
    table = {row["variant"]: row for row in csv.DictReader(open(table_csv))}
    rows = list(csv.DictReader(open(metrics_csv)))
    for row in rows:
        if row["metric"] == "iqm":
            reference = table[row["group"]]
            assert (row["value"], row["ci_low"], row["ci_high"]) == (
                reference["value"], reference["ci_low"], reference["ci_high"])
    # Without a baseline, each pair once, X the earlier group: P(base > new) = 5/18.
    (pair,) = [row for row in rows if row["metric"] == "probability_of_improvement"]
    assert (pair["group"], pair["versus"]) == ("base", "new") and float(pair["value"]) == pytest.approx(5 / 18)
    assert (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")


def test_cli_compares_only_groups_with_the_same_tasks(runs_dir, tmp_path, capsys):
    csv_path = tmp_path / "p.csv"
    assert plot.main([str(runs_dir), "--group-by", "variant", "env_id", "--tags", TAG,
                      "--probability-of-improvement", "--reps", "500", "--out", str(tmp_path / "p.png"),
                      "--csv", str(csv_path)]) == 0
    err = capsys.readouterr().err
    rows = list(csv.DictReader(open(csv_path)))
    # Per env id: fashion_mnist 1 − 8/9, mnist 1 − 5/9 (X = base, the earlier group); cross-env pairs skipped.
    assert sorted(float(row["value"]) for row in rows) == pytest.approx([1 / 9, 4 / 9])
    assert all(row["tasks"] == "1" and "variant=base" in row["group"] for row in rows)
    assert "note: P(X > Y) compares groups with runs of the same env ids; skipped 4 pair(s)" in err


@pytest.mark.parametrize("argv, message", [
    (["--probability-of-improvement", "nope"], "--probability-of-improvement 'nope': no group has that label; "
                                               "the groups are 'base', 'new'"),
    (["--group-by", "agent", "--allow-differing", "env_id", "--tags", TAG, "--probability-of-improvement"],
     "all runs form one group ('dqn')"),
    (["--group-by", "env_id", "--tags", TAG, "--probability-of-improvement"],
     "no pair of groups has runs of the same tasks"),
    (["--profile", "--table"], "are separate outputs"),
    (["--md", "t.md"], "--md goes with --profile"),
    (["--tau-points", "5"], "--tau-points goes with --profile"),
    (["--gap-threshold", "2", "--profile"], "--gap-threshold goes with --optimality-gap"),
    (["--profile", "--tau-points", "1"], "--tau-points must be at least 2"),
    (["--profile", "--tau-range", "1", "0"], "needs LOW < HIGH"),
    (["--optimality-gap", "--out", "x.jpg"], "use .png, .svg or .pdf"),
])
def test_cli_errors_are_one_line(runs_dir, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # a wrongly successful call would write plot.png here
    full = [str(runs_dir), *(argv if "--group-by" in argv else [*GROUPING, *argv])]
    assert plot.main(full) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "plot.png").exists()


def test_cli_without_runs_is_a_clear_error(tmp_path, capsys):
    assert plot.main([str(tmp_path), "--profile", "--optimality-gap"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no TensorBoard event files" in err


def test_cli_metrics_of_human_normalised_atari_scores(tmp_path, capsys):
    """Breakout (random 1.7, human 30.5) and Pong (−20.7, 14.6): the metrics see (score − random) / (human − random)."""
    raw = {"base": {"ALE/Breakout-v5": [1.7, 16.1], "ALE/Pong-v5": [14.6, -3.05]},
           "new": {"ALE/Breakout-v5": [30.5, 30.5], "ALE/Pong-v5": [14.6, 49.9]}}
    # normalised: base Breakout 0, ½ and Pong 1, ½; new Breakout 1, 1 and Pong 1, 2
    root = tmp_path / "runs"
    for variant, per_game in raw.items():
        for env_id, values in per_game.items():
            for seed, score in enumerate(values, start=1):
                run_dir = root / f"{env_id.replace('/', '_')}__dqn__{variant}__{seed}"
                _write(run_dir, [("charts/episodic_return", step, score) for step in (500, 1000)])
                (run_dir / "config.json").write_text(json.dumps(
                    {"agent": "dqn", "env_id": env_id, "exp_name": variant, "seed": seed, "run_name": run_dir.name}))
                (run_dir / "status.json").write_text(json.dumps({"status": "completed"}))
    csv_path = tmp_path / "atari.csv"
    assert plot.main([str(root), "--group-by", "variant", "--human-normalized", "--optimality-gap",
                      "--probability-of-improvement", "base", "--profile", "--reps", "1000",
                      "--out", str(tmp_path / "atari.png"), "--csv", str(csv_path)]) == 0
    assert "(returns human-normalised)" in capsys.readouterr().out
    rows = {(row["metric"], row["group"]): row for row in csv.DictReader(open(csv_path)) if row["tau"] == ""}
    assert float(rows[("mean", "base")]["value"]) == pytest.approx((0.25 + 0.75) / 2, rel=1e-6)
    assert float(rows[("mean", "new")]["value"]) == pytest.approx((1.0 + 1.5) / 2, rel=1e-6)
    assert float(rows[("optimality_gap", "base")]["value"]) == pytest.approx((0.75 + 0.25) / 2, rel=1e-6)
    assert float(rows[("optimality_gap", "new")]["value"]) == pytest.approx(0.0, abs=1e-6)  # 2.0 counts as 1
    # Breakout: new beats both (1); Pong: 1 ties 1, beats ½; 2 beats both (3.5/4).
    assert float(rows[("probability_of_improvement", "new")]["value"]) == pytest.approx((1 + 0.875) / 2)
    assert rows[("mean", "new")]["human_normalized"] == "True" and rows[("mean", "new")]["tasks"] == "2"
    profile = [row for row in csv.DictReader(open(csv_path)) if row["metric"] == "performance_profile"]
    taus = sorted({float(row["tau"]) for row in profile})
    assert len(taus) == 101 and taus[0] == 0.0 and taus[-1] == pytest.approx(2.0, rel=1e-6)  # [0, max(1, 2.0)]
