"""scripts/sweeps/leaderboard.py (`python scripts/reproduce.py leaderboard`): every method is in the table, the
table's numbers follow their definitions, bad input, and a smoke run of every method on both problems whose
numbers are checked against the event files read independently with TensorBoard's EventAccumulator."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tb_reference import accumulate
from test_reproduce import fake_run

from plasticity.interventions import METHODS as INTERVENTION_FLAGS
from scripts.analysis import stats
from scripts.sweeps import leaderboard, reproduce

ROOT = Path(__file__).resolve().parents[1]


def own_fields(flags_class) -> list[str]:
    """The fields a flags class declares itself (not those of the classes it inherits)."""
    return [f.name for f in dataclasses.fields(flags_class) if f.name in flags_class.__dict__.get("__annotations__", {})]


def check_every_method_is_in_the_table(configs: dict[str, dict]) -> None:
    """``configs``: each method's run config (config.json). Every method flags class of the agents is turned on
    by some method of the table, or left out with a reason."""
    baseline = configs[leaderboard.BASELINE]
    changed = {name: {key for key in baseline if config.get(key) != baseline[key] and key not in IGNORED}
               for name, config in configs.items()}
    covered = set().union(*changed.values())
    for flags_class in INTERVENTION_FLAGS:
        fields = set(own_fields(flags_class))
        assert fields, flags_class
        if flags_class.__name__ == "KronFlags":
            assert not fields & covered and any(key.startswith("kron") for key in leaderboard.LEFT_OUT)
            continue
        assert fields & covered, f"no method of the leaderboard turns on {flags_class.__name__} ({sorted(fields)})"
    # The methods outside plasticity/interventions: LayerNorm, the loss, the activations, the optimisers.
    assert {"layer_norm", "loss", "activation", "optimizer", "adam_betas", "adam_per_entry_step",
            "weight_decay"} <= covered
    assert {"sgd", "adamw", "upgd"} <= {config["optimizer"] for config in configs.values()}
    assert configs["ln_l2_hlg"]["loss"] == "hl_gauss" and configs["ln_l2_hlg"]["layer_norm"]


#: Config keys that differ between runs of the same flags.
IGNORED = {"variant", "seed", "run_name", "exp_name", "population"}


def test_every_method_has_its_own_flags():
    assert leaderboard.METHODS[leaderboard.BASELINE].flags == ""
    assert leaderboard.METHODS["ln_l2"].flags == "--layer-norm --l2 1e-5"  # the recommended pairs
    assert len({m.flags for m in leaderboard.METHODS.values()}) == len(leaderboard.METHODS)


def test_once_only_methods_act_at_half_the_run():
    size = leaderboard.LABEL_RESHUFFLE.size
    flags = leaderboard.method_flags(leaderboard.METHODS["injection"].flags, size)
    assert flags == f"--plasticity-injection-at {size.num_tasks * size.task_steps // 2}"
    problem = leaderboard.problem_with(leaderboard.PERMUTED_MNIST, ["baseline", "injection"], reproduce.SMOKE_SIZE)
    assert problem.arms == {"baseline": "", "injection": "--plasticity-injection-at 320"}  # 4 tasks x 160 steps


def test_run_scores_follow_their_definitions():
    run = fake_run({reproduce.TASK_ACCURACY: ([100, 200, 300, 400, 500, 600], [1.0, 0.2, 0.4, 0.6, 0.5, 0.3]),
                    "plasticity/dead_frac": ([300, 600], [0.1, 0.3])}, last_step=600)
    values = leaderboard.run_scores(run, first_task=1, final_frac=0.1)
    # Tasks 1..5 (0.2 .. 0.3): the last half is tasks 3..5 (5 // 2 = 2 tasks dropped).
    assert values[leaderboard.SCORE] == pytest.approx((0.6 + 0.5 + 0.3) / 3)
    assert values["slope"] == pytest.approx(np.polyfit(range(5), [0.2, 0.4, 0.6, 0.5, 0.3], 1)[0])
    assert values["plasticity/dead_frac"] == 0.3 and "plasticity/weight_norm" not in values
    with pytest.raises(ValueError, match="the slope needs 2"):
        leaderboard.run_scores(run, first_task=5, final_frac=0.1)


def _runs(scores):
    return [{leaderboard.SCORE: s, "slope": 0.0} for s in scores]


def test_summary_normalises_by_the_baseline_and_compares_with_it():
    rng = np.random.default_rng(0)
    base = {"p": rng.uniform(0.4, 0.6, 10), "q": rng.uniform(0.8, 0.9, 10)}
    per_problem = {p: {"baseline": _runs(base[p]), "ln": _runs(2 * base[p]), "l2": _runs(base[p][::-1])}
                   for p in base}
    summary = leaderboard.summarize(per_problem, reps=500)
    table = summary["methods"]
    assert summary["baseline_means"] == pytest.approx([base["p"].mean(), base["q"].mean()])
    normalised = np.concatenate([base[p] / base[p].mean() for p in base])
    assert table["baseline"]["iqm"][0] == pytest.approx(stats.iqm(normalised))
    assert table["ln"]["iqm"][0] == pytest.approx(2 * stats.iqm(normalised))  # every run doubled
    assert table["ln"]["p_improvement"] == [1.0, 1.0, 1.0]  # every ln run beats every baseline run
    assert table["l2"]["p_improvement"][0] == pytest.approx(0.5)  # the same scores: a tie
    assert summary["ranking"][0] == "ln"
    matrix = np.array(summary["poi_matrix"]["p_row_over_column"])
    np.testing.assert_allclose(matrix + matrix.T, 1.0)  # P(X > Y) + P(Y > X) = 1, 1/2 on the diagonal
    # The performance profile: fraction of runs above τ, 1 at τ = 0, 0 beyond the largest score.
    profile = np.array(table["ln"]["profile"])
    assert profile[0] == 1.0 and profile[-1] == 0.0 and np.all(np.diff(profile) <= 0)
    problem = table["ln"]["problems"]["p"]["metrics"][leaderboard.SCORE]
    assert problem[0] == pytest.approx(2 * base["p"].mean()) and problem[1] <= problem[0] <= problem[2]
    # A method missing on one problem is named and left out; the baseline must be everywhere.
    per_problem["q"].pop("l2")
    assert leaderboard.summarize(per_problem, reps=50)["incomplete_methods"] == ["l2"]
    per_problem["q"].pop("baseline")
    with pytest.raises(ValueError, match="the baseline has no runs on every problem"):
        leaderboard.summarize(per_problem, reps=50)


def test_bad_input_gives_one_clear_error(tmp_path, capsys):
    assert reproduce.main(["leaderboard", "--smoke", "--methods", "ln", "nope", "--sweep-dir", str(tmp_path)]) == 2
    assert "unknown method(s) nope; the table's methods: baseline, ln," in capsys.readouterr().err
    assert reproduce.main(["leaderboard", "--smoke", "--methods", "ln", "--sweep-dir", str(tmp_path)]) == 2
    assert "--methods must include 'baseline'" in capsys.readouterr().err
    assert reproduce.main(["cbp", "--methods", "ln"]) == 2
    assert "--methods chooses the leaderboard's methods" in capsys.readouterr().err
    assert reproduce.main(["leaderboard", "--analyze-only", "--sweep-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no runs in" in err and "run `python scripts/reproduce.py leaderboard` first" in err
    assert not any(tmp_path.iterdir())  # nothing was run or written


def test_smoke_leaderboard_runs_every_method_and_reads_its_numbers_from_the_event_files(tmp_path, mnist_dir):
    sweep_dir, out_dir = tmp_path / "sweep", tmp_path / "out"
    argv = ["leaderboard", "--smoke", "--workers", "2", "--data-dir", str(mnist_dir), "--sweep-dir", str(sweep_dir),
            "--out-dir", str(out_dir), "--reps", "500"]
    # The documented entry point, as a user runs it.
    result = subprocess.run([sys.executable, "scripts/reproduce.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    page = (out_dir / "summary.md").read_text()
    assert set(summary["methods"]) == set(leaderboard.METHODS) and not summary["incomplete_methods"]
    assert summary["problems"] == [p.name for p in leaderboard.PROBLEMS]
    for figure in ("leaderboard.png", "poi_matrix.png"):
        data = (out_dir / figure).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < 400_000
    for rank, method in enumerate(summary["ranking"], 1):
        assert f"| {rank} | {method} |" in page
    configs = {method: json.loads((sweep_dir / "permuted-mnist" / "runs" / f"ImageMDP_mnist__dqn__{method}__1" /
                                   "config.json").read_text()) for method in leaderboard.METHODS}
    check_every_method_is_in_the_table(configs)
    for problem in leaderboard.PROBLEMS:
        manifest = json.loads((sweep_dir / problem.name / "manifest.json").read_text())
        assert len(manifest["runs"]) == 2 * len(leaderboard.METHODS)
        assert all(record["population"]["num_seeds"] == 2 for record in manifest["runs"])  # a population per method

    # One method's score and diagnostic recomputed from the event files of each problem.
    method, tag = "cbp", "plasticity/effective_rank"
    for problem in leaderboard.PROBLEMS:
        scores, finals = [], []
        for seed in (1, 2):
            scalars = accumulate(sweep_dir / problem.name / "runs" / f"ImageMDP_mnist__dqn__{method}__{seed}")
            tasks = scalars[reproduce.TASK_ACCURACY][1][problem.first_task:]
            scores.append(tasks[len(tasks) // 2:].mean())
            last_step = max(steps.max() for steps, _ in scalars.values())
            steps, values = scalars[tag]
            finals.append(values[steps >= 0.9 * last_step].mean())
        metrics = summary["methods"][method]["problems"][problem.name]["metrics"]
        assert metrics[leaderboard.SCORE][0] == pytest.approx(np.mean(scores), abs=1e-9)
        assert metrics[tag][0] == pytest.approx(np.mean(finals), abs=1e-9)

    # Re-running the command finishes nothing new: every run is skipped, the table is rebuilt.
    again = subprocess.run([sys.executable, "scripts/reproduce.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("0 skipped") == 0, again.stdout[-2000:]
    assert f"{2 * len(leaderboard.METHODS)} skipped (already completed)" in again.stdout
