"""One table of every method (``python scripts/reproduce.py leaderboard``): each intervention of the spec's
methods.md and methods-v2.md, and the pairs the papers recommend, at its paper default, on two nonstationary
MNIST problems -- label reshuffling and permuted MNIST -- with the same agent, seeds and budget.

    python scripts/reproduce.py leaderboard                  # both sweeps, then docs/results/leaderboard/
    python scripts/reproduce.py leaderboard --analyze-only   # table and figures again from the finished sweeps
    python scripts/reproduce.py leaderboard --smoke          # CI size (tests/test_leaderboard.py)

Each problem is one sweep (``scripts/sweeps/benchmark.py``, resumable) in ``<sweep-dir>/<problem>``, one
population process per method (its seeds).  Reported per method and problem (``summary.json``/``summary.md``):

- ``last_half_accuracy``: each run's mean per-task final accuracy (``charts/task_final_accuracy``) over the
  last half of its tasks (counted from the problem's ``first_task``), the table's score;
- ``slope``: each run's least-squares slope of the per-task final accuracy against the task index;
- ``plasticity/dead_frac``, ``plasticity/effective_rank``, ``plasticity/weight_norm``: each run's mean over the
  final window (last ``--final-frac`` of its steps);

each as the mean over seeds with a 95% bootstrap CI over seeds.  Across the two problems: the IQM of the
baseline-normalised score (a run's ``last_half_accuracy`` over the baseline's mean on its problem, so both
problems weigh alike; stratified bootstrap over the runs of each problem), the performance profile of the same
normalised scores, and P(method > baseline) (rliable's probability of improvement, per problem then averaged,
with an independent stratified bootstrap), plus the matrix of P(row > column) between all methods.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.analysis import stats
from scripts.analysis.tbreader import RunData, load_runs
from scripts.sweeps import reproduce
from scripts.sweeps.reproduce import Size, Study

NAME = "leaderboard"
SCORE = "last_half_accuracy"
BASELINE = "baseline"
DIAGNOSTICS = ("plasticity/dead_frac", "plasticity/effective_rank", "plasticity/weight_norm")
#: The agent of every run: the studies' DQN (reproduce.COMMON_FLAGS: a 128-128 MLP, Adam 1e-3, ε = 0.1) at γ = 0.
FLAGS = "--gamma 0"
#: HL-Gauss at γ = 0: rewards are 0 or 1, so Q ∈ [0, 1]; [-1, 2] leaves room for the Gaussian's tails,
#: 31 bins of width 0.1, σ = 0.75 bins (the default ratio of Farebrother et al. 2024).
HL_GAUSS = "--loss hl_gauss --v-min -1 --v-max 2 --n-atoms 31"
#: Written in a method's flags for the env step at half the run (where a once-only method acts).
HALF = "{half}"


@dataclass(frozen=True)
class Method:
    flags: str
    source: str
    """the spec section and the paper, and where a value is ours, why"""


METHODS: dict[str, Method] = {
    BASELINE: Method("", "DQN, Adam 1e-3 (the studies' agent)"),
    # ---- methods.md ----
    "ln": Method("--layer-norm", "methods.md 1; Lyle et al. 2024"),
    "l2": Method("--l2 1e-5", "methods.md 2; Lyle et al. 2024's value"),
    "ln_l2": Method("--layer-norm --l2 1e-5", "methods.md 1+2; Lyle et al. 2024's recommended pair"),
    "hl_gauss": Method(HL_GAUSS, "methods.md 5; Farebrother et al. 2024 (σ = 0.75 bins)"),
    "ln_l2_hlg": Method(f"--layer-norm --l2 1e-5 {HL_GAUSS}", "Lyle et al. 2024's full recipe (LN + L2 + "
                        "categorical loss)"),
    "l2_init": Method("--l2-init 1e-2", "methods.md 3; Kumar et al. 2023 (their permuted-MNIST value [U])"),
    "swr": Method("--swr 1e-3", "methods.md 4; Oh et al. 2025 (the spec's example value)"),
    "cbp": Method("--cbp", "methods.md 6; Dohare et al. 2024's defaults (ρ = 1e-4, maturity 100)"),
    "cbp_entry": Method("--cbp --adam-per-entry-step", "methods-v2 2.3; CBP with LoP's AdamGnT (per-entry step)"),
    "snp": Method("--snp 0.5", "methods.md 9; Ash & Adams 2020, at task switches (α in the spec's 0.2-0.8 "
                  "for switches; 0.5 ours)"),
    "redo": Method("--redo-every 1000", "methods.md 7; Sokar et al. 2023 (τ = 0.1, every 1000 updates [U])"),
    "head_reset": Method("--reset-head-every -1", "methods.md 8; Nikishin et al. 2022, the head at task switches"),
    # ---- methods-v2.md ----
    "adamw": Method("--optimizer adamw --weight-decay 1e-2", "v2 1; Loshchilov & Hutter (torch's AdamW default "
                    "decay, set explicitly)"),
    "sgd": Method(reproduce.SGD, "v2 1; Dohare et al.'s optimiser (rate from the cbp "
                  "study's SGD baseline pilots)"),
    "adam_b99": Method(reproduce.ADAM_B99, "v2 1; Dohare et al. 2024's non-stationary Adam (β1 = β2)"),
    "reset_opt": Method("--reset-optimizer target-update", "v2 2; Asadi et al. 2023 (at every target sync, "
                        "1000 env steps)"),
    "reset_last2": Method("--reset-layers last:2 --reset-at-task-switch", "v2 4; Nikishin et al. 2022 / BBF's "
                          "fc + head re-drawn, here at task switches"),
    "injection": Method(f"--plasticity-injection-at {HALF}", "v2 5; Nikishin et al. 2023, once at half the run "
                        "(head last:2)"),
    "nap": Method("--layer-norm --nap", "v2 6; Lyle et al. 2024 (with LN, constant rate)"),
    "parseval": Method("--parseval 1e-3", "v2 7; Chung et al. 2024 (λ = 1e-3, orthogonal init)"),
    "crelu": Method("--activation crelu", "v2 8; Abbas et al. 2023 (width doubled)"),
    "dff": Method("--activation dff", "v2 8; Lewandowski et al. 2024 (width doubled)"),
    "hare_tortoise": Method("--hare-tortoise", "v2 9; Lee et al. 2024 (EMA 0.999, hare reset every 20k "
                            "env steps [U])"),
    "c_chain": Method("--c-chain", "v2 10; C-CHAIN's defaults (β = 0.01, λ automatic)"),
    "trac": Method("--trac", "v2 11.1; Muppidi et al. 2024, TRAC around Adam"),
    "weight_clip": Method("--weight-clip 2", "v2 12; Elsayed et al. 2024 (κ = 2 [U]: no paper value for DQN)"),
    "upgd": Method("--optimizer upgd", "v2 12; Elsayed & Mahmood 2024's defaults (σ 1e-3, decay 1e-3, β_u 0.999)"),
}

#: Methods of the spec left out of the table, and why (the page lists them).
LEFT_OUT = {
    "kron (v2 11.2)": "PSGD-Kron takes ~30x the baseline's CPU time per MLP update (docs/benchmarks.md: 53 ms vs "
                      "1.7 ms); 20 runs would take hours on this 2-core CPU. A GPU method at these sizes.",
    "replay ratio, LR schedule (v2 3, 1)": "training knobs that change the budget (gradient steps) or the rate at "
                                          "the end, not interventions comparable at one fixed budget.",
    "double DQN": "a target rule, not a plasticity method; at γ = 0 it is the baseline.",
}


def problem(name: str, check: str, shift: str, num_images: int, reason: str, first_task: int = 0) -> Study:
    """One problem of the table: every method an arm, 10 tasks of 3k env steps (750 updates) each."""
    return Study(name=name, check=check, question=f"{shift} every 3k env steps on {num_images} MNIST images",
                 shift=shift, arms={m: method.flags for m, method in METHODS.items()}, flags=FLAGS,
                 size=Size(num_tasks=10, task_steps=3000, num_images=num_images, learning_starts=500, log_every=500),
                 reasons=(reason,), expectations=(), diagnostics=DIAGNOSTICS, first_task=first_task)


LABEL_RESHUFFLE = problem(
    "label-reshuffle", "leaderboard problem 1 -- label reshuffling (Lyle et al. 2024)", "random_labels", 300,
    "`random_labels` every 3k env steps on 300 images, 10 tasks: a one-seed-pair pilot of the baseline (4 tasks) "
    "memorised ~40% of the labels of every reshuffled task: room to fall and to rise. Trend and score from "
    "task 1 (task 0 has MNIST's true labels).", first_task=1)
PERMUTED_MNIST = problem(
    "permuted-mnist", "leaderboard problem 2 -- permuted MNIST (Dohare et al. 2024)", "pixel_permutation", 1000,
    "`pixel_permutation` every 3k env steps on 1000 images, 10 tasks: the baseline pilot ended each of 4 tasks at "
    "~0.93, so what separates methods is how fast and how well each permutation is relearnt.")

PROBLEMS = (LABEL_RESHUFFLE, PERMUTED_MNIST)


def method_flags(flags: str, size: Size) -> str:
    """``flags`` with ``{half}`` -> the env step at half the run (a multiple of --num-envs)."""
    half = size.num_tasks * size.task_steps // 2
    return flags.replace(HALF, str(half - half % reproduce.NUM_ENVS))


def problem_with(problem: Study, methods: list[str], size: Size) -> Study:
    """``problem`` restricted to ``methods``, with the size-dependent flags filled in."""
    arms = {name: method_flags(METHODS[name].flags, size) for name in methods}
    return Study(**{**problem.__dict__, "arms": arms})


# ---- numbers ----

def run_scores(run: RunData, first_task: int, final_frac: float) -> dict[str, float]:
    """One run's table values (see the module docstring)."""
    tasks = reproduce._task_values(run, first_task)
    if len(tasks) < 2:
        raise ValueError(f"run {run.name} logged {len(tasks)} task(s) from task {first_task}; the slope needs 2")
    values = {SCORE: float(tasks[len(tasks) // 2:].mean()), "slope": float(stats.task_slopes(tasks))}
    for tag in DIAGNOSTICS:
        if tag in run.scalars:
            series = run.scalars[tag]
            values[tag] = stats.final_window_mean(series.steps, series.values, run.last_step, final_frac)
    return values


def scores_by_method(problem: Study, runs: list[RunData], final_frac: float) -> dict[str, list[dict[str, float]]]:
    groups = reproduce.ordered_groups(problem, runs)
    return {group.values["variant"]: [run_scores(run, problem.first_task, final_frac) for run in group.runs]
            for group in groups}


def _ci(values, reps: int, seed: int) -> list[float]:
    return reproduce._interval(np.asarray(values, dtype=np.float64), reps, 0.95, seed)


def summarize(per_problem: dict[str, dict[str, list[dict[str, float]]]], reps: int, seed: int = 0) -> dict:
    """Per method: each problem's metrics [mean, CI], the aggregate IQM, P(> baseline); the P(X > Y) matrix."""
    problems = list(per_problem)
    methods = [m for m in METHODS if all(m in per_problem[p] for p in problems)]
    missing = sorted({m for p in problems for m in per_problem[p]} - set(methods))
    if BASELINE not in methods:
        raise ValueError(f"the baseline has no runs on every problem ({', '.join(problems)}); the table normalises "
                         "by it and compares with it")
    scores = {m: [np.array([run[SCORE] for run in per_problem[p][m]]) for p in problems] for m in methods}
    baseline_means = [float(s.mean()) for s in scores[BASELINE]]
    if any(not mean > 0 for mean in baseline_means):
        raise ValueError(f"the baseline's mean score is {baseline_means}; normalising by it needs a positive mean")
    normalised = {m: [s / b for s, b in zip(scores[m], baseline_means)] for m in methods}
    taus = np.linspace(0.0, max(2.0, max(float(np.max(t)) for s in normalised.values() for t in s)), 101)
    table = {}
    for m in methods:
        entry = {"flags": METHODS[m].flags, "source": METHODS[m].source, "problems": {}}
        for p in problems:
            runs = per_problem[p][m]
            metrics = {key: _ci([run[key] for run in runs if key in run], reps, seed)
                       for key in (SCORE, "slope", *DIAGNOSTICS) if any(key in run for run in runs)}
            entry["problems"][p] = {"runs": len(runs), "metrics": metrics}
        point, low, high = stats.stratified_bootstrap_ci([s[:, None] for s in normalised[m]], "iqm", reps, 0.95, seed)
        entry["iqm"] = [float(point[0]), float(low[0]), float(high[0])]
        entry["profile"] = stats.score_distribution(normalised[m], taus).tolist()
        entry["p_improvement"] = (list(stats.improvement_bootstrap_ci(scores[m], scores[BASELINE], reps, 0.95, seed))
                                  if m != BASELINE else [0.5, 0.5, 0.5])
        table[m] = entry
    matrix = [[float(stats.probability_of_improvement(scores[x], scores[y])) for y in methods] for x in methods]
    ranking = sorted(methods, key=lambda m: -table[m]["iqm"][0])
    return {"problems": problems, "methods": table, "ranking": ranking, "baseline_means": baseline_means,
            "taus": taus.tolist(), "poi_matrix": {"methods": methods, "p_row_over_column": matrix},
            "incomplete_methods": missing, "reps": reps}


# ---- figures and page ----

def write_figures(summary: dict, out_dir: Path, dpi: int) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranking, table = summary["ranking"], summary["methods"]
    fig, (bars, profile) = plt.subplots(1, 2, figsize=(13, 0.28 * len(ranking) + 1.6))
    y = np.arange(len(ranking))[::-1]
    iqm = np.array([table[m]["iqm"] for m in ranking])
    colors = ["black" if m == BASELINE else "tab:blue" for m in ranking]
    bars.errorbar(iqm[:, 0], y, xerr=[iqm[:, 0] - iqm[:, 1], iqm[:, 2] - iqm[:, 0]], fmt="none", ecolor=colors)
    bars.scatter(iqm[:, 0], y, c=colors, zorder=3)
    bars.axvline(1.0, color="grey", linestyle=":")
    bars.set_yticks(y, ranking)
    bars.set_xlabel("IQM of score / baseline mean (both problems), 95% CI")
    taus = np.array(summary["taus"])
    top = set(ranking[:5]) | {ranking[-1], BASELINE}
    for m in ranking:
        style = dict(linewidth=2, label=m) if m in top else dict(linewidth=0.6, color="lightgrey")
        if m == BASELINE:
            style.update(color="black")
        profile.plot(taus, table[m]["profile"], **style)
    profile.set_xlabel("τ (score / baseline mean)")
    profile.set_ylabel("fraction of runs with score > τ")
    profile.set_title("performance profiles (grey: the other methods)", fontsize=9)
    profile.legend(fontsize=7)
    fig.suptitle("Every method on label reshuffling + permuted MNIST: last-half per-task accuracy", fontsize=10)
    fig.tight_layout()
    paths = [out_dir / "leaderboard.png"]
    fig.savefig(paths[0], dpi=dpi)
    plt.close(fig)

    methods = summary["poi_matrix"]["methods"]
    order = [methods.index(m) for m in ranking]
    matrix = np.array(summary["poi_matrix"]["p_row_over_column"])[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(0.32 * len(ranking) + 2, 0.32 * len(ranking) + 1.5))
    image = ax.imshow(matrix, cmap="RdBu", vmin=0, vmax=1)
    ax.set_xticks(range(len(ranking)), ranking, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ranking)), ranking, fontsize=7)
    ax.set_title("P(row > column), last-half accuracy, mean over the two problems", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.6)
    fig.tight_layout()
    paths.append(out_dir / "poi_matrix.png")
    fig.savefig(paths[1], dpi=dpi)
    plt.close(fig)
    return paths


def markdown(summary: dict, settings: dict) -> str:
    problems, table = summary["problems"], summary["methods"]
    lines = [f"# {NAME}: every method on {' and '.join(problems)}", ""]
    if settings["smoke"]:
        lines += ["**Smoke run** (CI size): the numbers mean nothing.", ""]
    lines += [f"Command: `{settings['command']}`", ""]
    for name, timing in settings.get("timing", {}).items():
        lines.append(f"- {name}: sweep wall time {reproduce._minutes(timing['wall_s'])}, {timing['runs_executed']} "
                     f"runs in {timing.get('processes', '?')} processes ({timing['workers']} at a time)")
    lines += ["", "## Set-up (chosen before the runs)", ""]
    for p in problems:
        lines.append(f"- **{p}**: `{settings['common'][p]}`, seeds {', '.join(map(str, settings['seeds']))}.")
    lines += ["", "Every method at its paper default, nothing tuned: the flags and where each value comes from.", "",
              "| method | flags | source |", "|---|---|---|"]
    flags = settings.get("flags", {})
    lines += [f"| {m} | `{flags.get(m, table[m]['flags']) or '(defaults)'}` | {table[m]['source']} |"
              for m in summary["ranking"]]
    lines += ["", "Left out: " + " ".join(f"**{k}**: {v}" for k, v in LEFT_OUT.items())]
    if summary["incomplete_methods"]:
        lines += ["", f"Not on every problem (left out of the table): {', '.join(summary['incomplete_methods'])}."]
    lines += ["", "## The table", "", "![leaderboard](leaderboard.png)", "",
              "Score: mean per-task final accuracy over the last half of the tasks; slope: per-task final accuracy "
              "per task; mean over seeds [95% bootstrap CI]. IQM: of the baseline-normalised scores of both "
              f"problems (baseline means: {', '.join(f'{p} {b:.3f}' for p, b in zip(problems, summary['baseline_means']))}). "
              "P(> baseline): probability of improvement of the score, per problem, averaged. Sorted by IQM.", "",
              "| rank | method | IQM (× baseline) | P(> baseline) | "
              + " | ".join(f"{p} score | {p} slope" for p in problems) + " |",
              "|---|---|---|---|" + "---|---|" * len(problems)]
    for rank, m in enumerate(summary["ranking"], 1):
        row = [reproduce.interval_text(table[m]["problems"][p]["metrics"].get(key)) for p in problems for key in (SCORE, "slope")]
        lines.append(f"| {rank} | {m} | {reproduce.interval_text(table[m]['iqm'])} | {reproduce.interval_text(table[m]['p_improvement'])} | "
                     + " | ".join(row) + " |")
    lines += ["", "## Diagnostics at the end", "",
              "Each run's mean over its final window, mean over seeds [95% CI].", "",
              "| method | " + " | ".join(f"{p} {tag.split('/')[-1]}" for p in problems for tag in DIAGNOSTICS) + " |",
              "|---|" + "---|" * (len(problems) * len(DIAGNOSTICS))]
    for m in summary["ranking"]:
        row = [reproduce.interval_text(table[m]["problems"][p]["metrics"].get(tag)) for p in problems for tag in DIAGNOSTICS]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "## P(row > column)", "", "![probability of improvement](poi_matrix.png)", ""]
    return "\n".join(lines) + "\n"


def analyze(sweep_root: Path, out_dir: Path, settings: dict, final_frac: float, reps: int, dpi: int) -> dict:
    wanted = {reproduce.TASK_ACCURACY, *DIAGNOSTICS}
    per_problem = {}
    for problem in PROBLEMS:
        folder = sweep_root / problem.name / "runs"
        if not folder.is_dir():
            raise FileNotFoundError(f"no runs in {folder}; run `python scripts/reproduce.py {NAME}` first")
        runs = load_runs([folder], wanted=lambda tag: tag in wanted)
        per_problem[problem.name] = scores_by_method(problem, runs, final_frac)
    summary = summarize(per_problem, reps)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary.update(settings=settings, figures=[path.name for path in write_figures(summary, out_dir, dpi)])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.md").write_text(markdown(summary, settings))
    return summary


def main(args, argv: list[str], seeds: list[int], data_dir: str) -> int:
    """``reproduce.py leaderboard``: both sweeps (unless --analyze-only), then the table and figures."""
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; the table's methods: {', '.join(METHODS)}")
    if BASELINE not in methods:
        raise ValueError(f"--methods must include {BASELINE!r}: the table normalises by it and compares with it")
    smoke = args.smoke
    default_root = reproduce.PROJECT_ROOT / "runs" / ("reproduce-smoke" if smoke else "reproduce") / NAME
    sweep_root = Path(args.sweep_dir).absolute() if args.sweep_dir else default_root
    out_dir = Path(args.out_dir) if args.out_dir else (
        sweep_root / "results" if smoke else reproduce.PROJECT_ROOT / "docs" / "results" / NAME)
    run_argv = [arg for arg in argv if arg != "--analyze-only"]
    settings = {"command": shlex.join(["python", "scripts/reproduce.py", *run_argv]), "smoke": smoke,
                "seeds": seeds, "common": {}, "timing": {}}
    for problem in PROBLEMS:
        size, extra = (reproduce.SMOKE_SIZE, reproduce.SMOKE_FLAGS) if smoke else (problem.size, "")
        study = problem_with(problem, methods, size)
        settings["common"][problem.name] = f"{study.common_flags(size)} {extra}".strip()
        settings["flags"] = study.arms  # the same run length on both problems: the same {half}
        sweep_dir = sweep_root / problem.name
        if not args.analyze_only:
            reproduce.run_sweep(reproduce.sweep_argv(study, size, seeds, sweep_dir, args.workers, data_dir, extra,
                                                     args.seeds_per_process), sweep_dir)
        timing_path = sweep_dir / reproduce.TIMING_FILE
        if timing_path.exists():
            settings["timing"][problem.name] = json.loads(timing_path.read_text())
    started = time.time()
    summary = analyze(sweep_root, out_dir, settings, args.final_frac, args.reps, args.dpi)
    print(f"wrote {out_dir}/summary.md, summary.json, {', '.join(summary['figures'])} "
          f"(analysis {time.time() - started:.1f} s)")
    for rank, m in enumerate(summary["ranking"], 1):
        iqm = summary["methods"][m]["iqm"]
        print(f"  {rank:2d}. {m:14s} IQM {iqm[0]:.3f} [{iqm[1]:.3f}, {iqm[2]:.3f}]")
    return 0
