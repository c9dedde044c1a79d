"""Reproduce the papers' effects at small scale (spec results.md, checks 1-4): a sweep, its figures, its summary.

    python scripts/reproduce.py label-shuffle            # sweep into runs/reproduce/label-shuffle,
                                                         # figures + summary into docs/results/label-shuffle/
    python scripts/reproduce.py cbp --smoke --workers 2  # 2 seeds, a few hundred steps (what CI runs)
    python scripts/reproduce.py swr --analyze-only       # figures and summary again from the finished sweep
    python scripts/reproduce.py cbp --seeds-per-process 128  # on a GPU: an arm's seeds in one process
    python scripts/reproduce.py leaderboard              # every method in one table (scripts/sweeps/leaderboard.py)

Version 2 of the studies (issue 17): 10 seeds per arm (``DEFAULT_SEEDS``), 3x version 1's tasks, a
128-128 MLP; version 1's pages are in docs/results/v1/.

The seeds of each arm train as one population process (benchmark.py's ``--seeds-per-process``, default
``auto``: up to 16 on the image MDP); ``--seeds-per-process 1`` runs one process per seed.

Each study is a row of ``STUDIES``: its arms (sweep variants), its flags and size, the reasons for
them, and the paper's expected direction as comparisons between arms.  Everything else is reused:
the sweep runs through ``scripts/sweeps/benchmark.py`` (resumable: re-running the same command continues
an interrupted study), the figures are ``scripts/analysis/plot.py``'s, the numbers come from the event files
(``scripts/analysis/tbreader.py``) with percentile-bootstrap CIs over seeds (``scripts/analysis/stats.py``).

Numbers of the summary (``summary.json``, ``summary.md``), per arm:

- ``slope``: mean over seeds of each run's least-squares slope of ``charts/task_final_accuracy``
  against the task index (``stats.task_slopes``), from the study's ``first_task`` on;
- ``mean_task_accuracy`` / ``last_task_accuracy``: each run's mean / last per-task final accuracy;
- ``accuracy_auc``: each run's mean of ``charts/accuracy`` over the whole run (how fast it relearns);
- ``early_task_accuracy`` / ``middle_task_accuracy`` / ``late_task_accuracy``: each run's mean per-task
  final accuracy over the first / middle / last third of its tasks (``numpy.array_split`` of the tasks
  from ``first_task`` on: does an advantage last, or fade?);
- each diagnostic tag: each run's mean over the final window (last ``--final-frac`` of its steps);
- ``growth:<tag>``: final-window mean / mean over the window ending at mid-run, minus 1 (does it
  still grow late in the run, or has it plateaued?).

Every value is the mean over seeds with a 95% percentile-bootstrap interval over seeds.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import shlex
import sys
import time
from argparse import Namespace
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python scripts/sweeps/reproduce.py` from a checkout

from agents.harness.run_folder import COMPLETED  # noqa: E402
from scripts.analysis import plot, stats  # noqa: E402
from scripts.analysis.groups import Group, group_runs  # noqa: E402
from scripts.analysis.tbreader import RunData, load_runs  # noqa: E402
from scripts.sweeps import benchmark  # noqa: E402
from scripts.sweeps.sweep import MANIFEST_FILE, PROJECT_ROOT, Manifest, parse_seeds_per_process  # noqa: E402

ENV_ID = "ImageMDP/mnist"
AGENT = "dqn"
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "datasets" / "mnist"
TASK_ACCURACY = "charts/task_final_accuracy"
ACCURACY = "charts/accuracy"
TIMING_FILE = "reproduce_timing.json"
#: Seeds per arm of a full study (version 2, issue 17).
DEFAULT_SEEDS = 10
#: Diagnostics every study reports (spec results.md / the issue): final-window value per arm.
DIAGNOSTICS = ("plasticity/dead_frac", "plasticity/linearized_frac", "plasticity/weight_norm",
               "plasticity/effective_rank", "plasticity/feature_sv_max", "plasticity/feature_cond")
#: Number of parallel envs of every run: one gradient update per vector step at --train-frequency 4.
NUM_ENVS = 4
#: Agent flags shared by every study (reasons in COMMON_REASONS).
COMMON_FLAGS = f"--num-envs {NUM_ENVS} --learning-rate 1e-3 --start-e 0.1 --end-e 0.1 --hidden-sizes 128 128"
COMMON_REASONS = (
    "DQN with an MLP torso of 128-128 ReLU units, Adam, batch 32, one update per 4 env steps (CleanRL). "
    "Version 1 of the studies used the default 256-256; version 2 halves the update cost on this 2-core "
    "CPU so that 10 seeds x 3x the tasks fit about an hour per study (the papers' MLPs span 100-2000 "
    "units per layer).",
    "`--learning-rate 1e-3` (Adam's usual rate for MNIST MLPs, as in the papers' supervised set-ups) instead "
    "of CleanRL's Atari 1e-4, so each task is learnt within the few thousand updates a CPU run affords.",
    "`--start-e 0.1 --end-e 0.1`: constant ε, so every task, the first included, is learnt under the same "
    "exploration; the agent sees only the reward of the action it takes, and after a switch the new "
    "labels are found by exploring.",
    f"`--num-envs {NUM_ENVS}`: 4 env steps per loop iteration (one update each), ~1.5x the env steps per "
    "second of one env; `--shift-every` counts env steps (a multiple of `--num-envs`).",
    "`--buffer-size` half a task: the second half of every task learns from that task's labels only.",
    "Accuracy is the greedy policy's (ε does not lower it); a task's final accuracy is the mean over the "
    "last `--log-every` env steps of the task (charts/task_final_accuracy).",
)


@dataclass(frozen=True)
class Size:
    """How long a study runs: tasks of ``task_steps`` env steps on ``num_images`` MNIST test images."""

    num_tasks: int
    task_steps: int
    num_images: int
    learning_starts: int
    log_every: int
    diag_per_task: int = 2

    def flags(self, shift: str) -> str:
        if self.task_steps % NUM_ENVS or self.task_steps % self.diag_per_task:
            raise ValueError(f"task_steps {self.task_steps} must be a multiple of --num-envs {NUM_ENVS} and of "
                             f"diag_per_task {self.diag_per_task}")
        return (f"--shift {shift} --shift-every {self.task_steps} "
                f"--total-timesteps {self.num_tasks * self.task_steps} --num-images {self.num_images} "
                f"--buffer-size {self.task_steps // 2} --learning-starts {self.learning_starts} "
                f"--log-every {self.log_every} --diag-every {self.task_steps // self.diag_per_task}")


#: The CI smoke size of every study: 4 tasks of 160 env steps on 100 images (a few seconds per run).
SMOKE_SIZE = Size(num_tasks=4, task_steps=160, num_images=100, learning_starts=64, log_every=40)
#: Extra flags of smoke runs: a small network and probe batch so a run is start-up time only.
SMOKE_FLAGS = "--hidden-sizes 32 32 --diag-batch 64 --checkpoint-every 0"


@dataclass(frozen=True)
class Expectation:
    """The paper's direction as one comparison: ``metric`` of arm ``higher`` above that of arm ``lower``.

    ``kind="greater"`` holds when the point estimates are ordered; ``kind="not_less"`` ("not worse")
    holds unless ``higher``'s whole interval lies below ``lower``'s point estimate.
    """

    claim: str
    metric: str
    higher: str
    lower: str
    kind: str = "greater"


@dataclass(frozen=True)
class Study:
    name: str
    check: str
    question: str
    shift: str
    arms: dict[str, str]
    flags: str
    size: Size
    reasons: tuple[str, ...]
    expectations: tuple[Expectation, ...]
    diagnostics: tuple[str, ...] = DIAGNOSTICS
    first_task: int = 0
    """first task index of the per-task trend (random_labels: task 0 has MNIST's true labels, another task)"""
    log_scale: tuple[str, ...] = ("plasticity/feature_sv_max", "plasticity/feature_cond")
    resized: str = ""
    """why and how the study was resized after a first full run ("" when it was not)"""

    def common_flags(self, size: Size) -> str:
        return f"{COMMON_FLAGS} {size.flags(self.shift)} {self.flags}".strip()


LABEL_SHUFFLE = Study(
    name="label-shuffle",
    check="results.md 1 -- Lyle et al. 2024, Figs. 2, 4, 5",
    question="Does label reshuffling kill plasticity, and do LayerNorm + L2 keep it?",
    shift="random_labels",
    arms={"baseline": "", "ln": "--layer-norm", "l2": "--l2 1e-5", "ln_l2": "--layer-norm --l2 1e-5"},
    flags="--gamma 0",
    size=Size(num_tasks=30, task_steps=14_000, num_images=1000, learning_starts=1000, log_every=1000),
    reasons=(
        "Version 2 (issue 17): 30 tasks (3x version 1's 10), 10 seeds; a one-seed-pair pilot of the 128-128 "
        "baseline (3 tasks of 14k env steps) memorised 45-51% of the 1000 random labels of each reshuffled task.",
        "`--shift random_labels` (every image gets a fresh uniformly random label at each switch): a "
        "memorisation task, the harder of the two shuffles; with `label_permutation` a new task is one "
        "relabelling of features that stay useful, which a short run relearns without effort.",
        "1000 images, 14k env steps (3.5k updates) per task: version 1's one-seed pilot of the 256-256 baseline "
        "(3 tasks of 15k steps) memorised about 55% of the labels by the end of a task -- room to fall and to rise.",
        "`--gamma 0`: the MDP is then the supervised problem of the paper (a contextual bandit) and the "
        "large-target-mean effect, studied separately in target-mean, stays out.",
        "The trend starts at task 1: task 0 carries MNIST's true labels, which an MLP learns by "
        "generalisation (~100% accuracy), not by memorisation.",
        "`--l2 1e-5` is the paper's value (and the README's).",
    ),
    expectations=(
        Expectation("without interventions the per-task final accuracy falls; with LN + L2 it stays flat",
                    "slope", "ln_l2", "baseline"),
        Expectation("LN + L2 keeps per-task accuracy above the baseline's", "mean_task_accuracy", "ln_l2", "baseline"),
        Expectation("dead units grow without interventions", "plasticity/dead_frac", "baseline", "ln_l2"),
        Expectation("linearized units grow without interventions", "plasticity/linearized_frac", "baseline",
                    "ln_l2"),
    ),
    first_task=1,
)

TARGET_MEAN = Study(
    name="target-mean",
    check="results.md 2 -- Lyle et al. 2024, App. E",
    question="Do large target means (γ = 0.99, Q* ≈ 100) hurt regression, and does a categorical loss fix it?",
    shift="label_permutation",
    arms={"mse_g0": "--gamma 0", "mse_g0.99": "--gamma 0.99",
          "hlg_g0": "--gamma 0 --loss hl_gauss --v-min -10 --v-max 110 --n-atoms 121",
          "hlg_g0.99": "--gamma 0.99 --loss hl_gauss --v-min -10 --v-max 110 --n-atoms 121"},
    flags="--target-network-frequency 200",
    size=Size(num_tasks=30, task_steps=12_000, num_images=2000, learning_starts=1000, log_every=1000),
    reasons=(
        "`--shift label_permutation`: at γ = 0.99 the action gap is 1 on top of Q* ≈ 100, so a "
        "memorisation task would leave nothing learnable in our budget for either loss; a permutation of "
        "the classes keeps every task learnable, and what differs is how fast it is relearnt after a switch. "
        "A one-seed γ = 0 pilot relearnt each permutation to ~99% within a 15k-step task.",
        "2000 images, 12k env steps per task, 30 tasks (version 2, issue 17: 3x version 1's 10, 10 seeds; "
        "360k env steps, 90k updates, 1800 target syncs). In version 1 (120k env steps) the TD targets "
        "(`plasticity/target_mean`) reached only ~55-70 of Q* ~ 100; the page reports how far they get now.",
        "`--target-network-frequency 200` env steps: bootstrapping towards Q* ≈ 100 takes ~1/(1-γ) target "
        "updates; at CleanRL's 1000 that alone would take ~100k steps, half the run.",
        "HL-Gauss on [-10, 110] (covers Q* ∈ [99, 100] at γ = 0.99 and [0, 1] at γ = 0 with margin for "
        "the Gaussian's tails), 121 bins: bin width 1.0, one bin per unit of the action gap; σ = 0.75 bins.",
    ),
    expectations=(
        Expectation("the regression agent at γ = 0.99 relearns more slowly after each switch", "accuracy_auc",
                    "mse_g0", "mse_g0.99"),
        Expectation("... and ends its tasks less accurate", "mean_task_accuracy", "mse_g0", "mse_g0.99"),
        Expectation("feature σ_1 much larger at γ = 0.99 (regression)", "plasticity/feature_sv_max",
                    "mse_g0.99", "mse_g0"),
        Expectation("feature condition number much larger at γ = 0.99 (regression)", "plasticity/feature_cond",
                    "mse_g0.99", "mse_g0"),
        # The paper: HL-Gauss removes most of the gap. Checked here is the direction only; how much of the gap
        # it closes, and for how long, is in the page's thirds table.
        Expectation("HL-Gauss relearns faster at γ = 0.99 (the paper: it removes most of the gap)", "accuracy_auc",
                    "hlg_g0.99", "mse_g0.99"),
        Expectation("HL-Gauss keeps σ_1 small at γ = 0.99", "plasticity/feature_sv_max", "mse_g0.99", "hlg_g0.99"),
    ),
    diagnostics=(*DIAGNOSTICS, "plasticity/target_mean"),  # do the TD targets reach Q* ~ 100?
)

#: Dohare et al. 2024's optimisers for the CBP study (README recipe): plain SGD, and Adam with β1 = β2.
SGD = "--optimizer sgd --learning-rate 0.1"
ADAM_B99 = "--adam-betas 0.99 0.99"

CBP = Study(
    name="cbp",
    check="results.md 3 -- Dohare et al. 2024, Ext. Data Figs. 3-4",
    question="Does continual backprop keep units alive and accuracy up over many permuted-MNIST tasks?",
    shift="pixel_permutation",
    arms={"baseline": "", "cbp": "--cbp", "l2": "--l2 1e-4",
          "sgd": SGD, "sgd_cbp": f"{SGD} --cbp", "adam_b99": ADAM_B99, "adam_b99_cbp": f"{ADAM_B99} --cbp"},
    flags="--gamma 0",
    size=Size(num_tasks=36, task_steps=6_000, num_images=2000, learning_starts=1000, log_every=1000),
    reasons=(
        "`--shift pixel_permutation` (permuted MNIST, the paper's task), 36 tasks of 6k env steps on 2000 "
        "images (version 2, issue 17: 3x version 1's 12 tasks, 10 seeds; tasks shortened from 10k so that 7 "
        "arms fit about an hour): a one-seed-pair pilot of the Adam baseline (3 tasks) ended every task at "
        "0.94-0.97 (an MLP sees every permutation as the same problem, so the tasks are equally hard).",
        f"Dohare et al.'s setting beside the Adam arms: plain SGD (`{SGD}`) and Adam with β1 = β2 = 0.99 "
        f"(`{ADAM_B99}`), each with and without CBP. The SGD rate is from pilots of the SGD baseline only "
        "(2 seeds, 3 tasks): 0.01 ended tasks at 0.35-0.53, 0.03 at 0.52-0.88, 0.1 at 0.78-0.95 (chosen: the only rate that learns a task within "
        "its steps, as Adam's 1e-3 does).",
        "`--gamma 0`: supervised-like, as in the paper.",
        "`--cbp` with the defaults (replacement rate 1e-4, maturity 100, decay 0.99, contribution "
        "utility): the paper's values for MNIST.",
        "`--l2 1e-4`: ten times the LN + L2 value, so the penalty visibly bounds the weights within a "
        "30k-update run (the paper's L2 arm also flattens the weight magnitude).",
    ),
    expectations=(
        Expectation("without CBP per-task accuracy declines; with CBP it holds", "slope", "cbp", "baseline"),
        Expectation("dead units grow without CBP, stay near 0 with it", "plasticity/dead_frac", "baseline", "cbp"),
        Expectation("weight magnitude grows without CBP", "plasticity/weight_magnitude", "baseline", "cbp"),
        Expectation("effective rank falls without CBP", "plasticity/effective_rank", "cbp", "baseline"),
        Expectation("L2 alone flattens the weight magnitude", "plasticity/weight_magnitude", "baseline", "l2"),
        Expectation("... but does not stop dead units (more than CBP)", "plasticity/dead_frac", "l2", "cbp"),
        Expectation("with SGD (the paper's setting) dead units grow without CBP", "plasticity/dead_frac", "sgd",
                    "sgd_cbp"),
        Expectation("with SGD, per-task accuracy holds better with CBP", "slope", "sgd_cbp", "sgd"),
        Expectation("with SGD, effective rank stays higher with CBP", "plasticity/effective_rank", "sgd_cbp", "sgd"),
        Expectation("with β1 = β2 Adam, dead units grow without CBP", "plasticity/dead_frac", "adam_b99",
                    "adam_b99_cbp"),
        Expectation("with β1 = β2 Adam, per-task accuracy holds better with CBP", "slope", "adam_b99_cbp",
                    "adam_b99"),
    ),
    diagnostics=(*DIAGNOSTICS, "plasticity/weight_magnitude"),
)

SWR = Study(
    name="swr",
    check="results.md 4 -- Oh et al. 2025, Thms 1-3",
    question="Does Soft Weight Rescaling bound the weight norms on a long nonstationary run, without hurting "
             "accuracy?",
    shift="random_labels",
    arms={"baseline": "", "swr": "--swr 1e-3"},
    flags="--gamma 0",
    size=Size(num_tasks=36, task_steps=15_000, num_images=1000, learning_starts=1000, log_every=1000),
    reasons=(
        "The label-shuffle MDP (`random_labels`, 1000 images, 15k env steps per task, γ = 0), whose "
        "weights keep growing (the pilot's total norm went 18 -> 35 in three tasks), run with longer "
        "tasks (15k env steps) and more of them: 36 tasks (540k env steps; version 2, issue 17: 3x version 1's "
        "12, 10 seeds).",
        "`--swr 1e-3` (the spec's example value): each update pulls every layer's norm 0.1% of the way "
        "back to its initial norm, a time constant of ~1000 updates, shorter than a task (3.75k updates), "
        "so a plateau can show within the run.",
        "The trend starts at task 1 (task 0 has MNIST's true labels).",
    ),
    expectations=(
        Expectation("SWR bounds the total weight norm", "plasticity/weight_norm", "baseline", "swr"),
        Expectation("... every layer's", "plasticity/weight_norm/*", "baseline", "swr"),
        Expectation("with SWR the norm plateaus while the baseline's keeps growing",
                    "growth:plasticity/weight_norm", "baseline", "swr"),
        Expectation("per-task accuracy is not worse with SWR", "mean_task_accuracy", "swr", "baseline", "not_less"),
        Expectation("the per-task trend is not worse with SWR", "slope", "swr", "baseline", "not_less"),
    ),
    diagnostics=(*DIAGNOSTICS, "plasticity/weight_norm/*"),
    first_task=1,
)

STUDIES: dict[str, Study] = {study.name: study for study in (LABEL_SHUFFLE, TARGET_MEAN, CBP, SWR)}


# ---- running a study: one sweep through scripts/sweeps/benchmark.py ----

def sweep_argv(study: Study, size: Size, seeds: list[int], sweep_dir: Path, workers: int, data_dir: str,
               extra_flags: str = "", seeds_per_process: str | None = None) -> list[str]:
    """benchmark.py's arguments; ``seeds_per_process`` None leaves its default (auto: an arm's seeds in one
    population process on the image MDP)."""
    common = study.common_flags(size) + (f" --data-dir {shlex.quote(data_dir)}" if data_dir else "")
    common += f" {extra_flags}" if extra_flags else ""
    argv = ["--agents", AGENT, "--env-ids", ENV_ID,
            "--variants", *(f"{arm}={flags}" for arm, flags in study.arms.items()),
            "--seeds", *map(str, seeds), "--common", common, "--sweep-dir", str(sweep_dir), "--workers", str(workers)]
    if seeds_per_process is not None:
        argv += ["--seeds-per-process", str(seeds_per_process)]
    return argv


def run_sweep(argv: list[str], sweep_dir: Path) -> dict:
    """Run (or finish) the sweep; the wall time of every invocation that ran something accumulates in
    ``<sweep_dir>/reproduce_timing.json``."""
    started = time.time()
    code = benchmark.main(argv)
    wall = time.time() - started
    if code != 0:
        raise RuntimeError(f"the sweep did not complete (benchmark.py exit status {code}); see the logs in "
                           f"{sweep_dir / 'logs'}, then re-run the same command to finish it")
    records = (Manifest.read(sweep_dir / MANIFEST_FILE) or {}).get("runs", [])
    executed = [r for r in records if r.get("status") == COMPLETED]
    timing_path = sweep_dir / TIMING_FILE
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {
        "wall_s": 0.0, "runs_executed": 0, "invocations": 0}
    if executed:
        timing["wall_s"] += wall
        timing["runs_executed"] += len(executed)
        timing["invocations"] += 1
    # A population's members share one process: its wall time counts once.
    process_walls = {(r.get("population") or {}).get("lead") or r.get("name"): r.get("wall_time_s") or 0.0
                     for r in records}
    timing.update(runs_total=len(records), workers=int(argv[argv.index("--workers") + 1]),
                  run_wall_s_sum=sum(process_walls.values()), processes=len(process_walls),
                  seeds_per_process=(argv[argv.index("--seeds-per-process") + 1]
                                     if "--seeds-per-process" in argv else "auto"))
    timing_path.write_text(json.dumps(timing, indent=2))
    return timing


# ---- the summary's numbers, from the event files ----

def _interval(values: np.ndarray, reps: int, confidence: float, seed: int) -> list[float]:
    point, lower, upper = stats.stratified_bootstrap_ci([np.asarray(values, dtype=np.float64)[:, None]], "mean",
                                                        reps, confidence, seed)
    return [float(point[0]), float(lower[0]), float(upper[0])]


def _task_values(run: RunData, first_task: int) -> np.ndarray:
    if TASK_ACCURACY not in run.scalars:
        raise ValueError(f"run {run.name} logged no {TASK_ACCURACY} (no task switch yet); run longer than one task")
    return run.scalars[TASK_ACCURACY].values[first_task:]


def growth(run: RunData, tag: str, final_frac: float) -> float:
    """Final-window mean of ``tag`` over its mean in the window of the same width ending at mid-run, minus 1."""
    series = run.scalars[tag]
    final = stats.final_window_mean(series.steps, series.values, run.last_step, final_frac)
    middle = run.last_step / 2
    in_mid = (series.steps >= middle - final_frac * run.last_step) & (series.steps <= middle)
    mid = float(series.values[in_mid].mean()) if in_mid.any() else float(np.interp(middle, series.steps,
                                                                                 series.values))
    return final / mid - 1.0


def run_metric(run: RunData, metric: str, first_task: int, final_frac: float) -> float:
    """One run's value of a summary metric (see the module docstring)."""
    if metric == "slope":
        return float(stats.task_slopes(_task_values(run, first_task)))
    if metric == "mean_task_accuracy":
        return float(_task_values(run, first_task).mean())
    if metric == "last_task_accuracy":
        return float(_task_values(run, first_task)[-1])
    if metric in THIRDS:
        tasks = _task_values(run, first_task)
        if len(tasks) < 3:
            raise ValueError(f"run {run.name} has {len(tasks)} task(s) from task {first_task} on; {metric} needs 3")
        return float(np.array_split(tasks, 3)[THIRDS.index(metric)].mean())
    if metric == "accuracy_auc":
        series = run.scalars[ACCURACY]
        return stats.final_window_mean(series.steps, series.values, run.last_step, 1.0)
    if metric.startswith("growth:"):
        return growth(run, metric.removeprefix("growth:"), final_frac)
    series = run.scalars[metric]
    return stats.final_window_mean(series.steps, series.values, run.last_step, final_frac)


THIRDS = ("early_task_accuracy", "middle_task_accuracy", "late_task_accuracy")
ACCURACY_METRICS = ("slope", "mean_task_accuracy", "last_task_accuracy", "accuracy_auc", *THIRDS)


def expand_metric(metric: str, tags: list[str]) -> list[str]:
    """A metric with a glob (``plasticity/weight_norm/*``) -> the matching tags, else itself."""
    prefix = "growth:" if metric.startswith("growth:") else ""
    pattern = metric.removeprefix(prefix)
    if not any(c in pattern for c in "*?["):
        return [metric]
    return [prefix + tag for tag in tags if fnmatch.fnmatchcase(tag, pattern)]


def arm_metrics(group: Group, metrics: list[str], study: Study, final_frac: float, reps: int, confidence: float,
                seed: int, undefined: dict[str, int] | None = None) -> dict[str, list[float]]:
    """[mean over seeds, CI low, CI high] of every metric for one arm (runs lacking a tag are left out).

    A diagnostic that is NaN by definition in some runs (``feature_cond`` when every unit is dead) is
    averaged over the runs where it is defined; ``undefined`` (if given) receives how many runs were not.
    """
    result = {}
    for metric in metrics:
        tag = metric.removeprefix("growth:")
        runs = [run for run in group.runs if metric in ACCURACY_METRICS or tag in run.scalars]
        if metric in THIRDS:  # a run with fewer than 3 tasks has no thirds
            runs = [run for run in runs if len(_task_values(run, study.first_task)) >= 3]
        if metric == "slope":
            task_values = [_task_values(run, study.first_task) for run in runs]
            result[metric] = list(stats.mean_slope_ci(task_values, reps, confidence, seed))
        elif runs:
            values = np.array([run_metric(run, metric, study.first_task, final_frac) for run in runs])
            defined = ~np.isnan(values)
            if metric not in ACCURACY_METRICS and not defined.all():
                if undefined is not None:
                    undefined[metric] = int((~defined).sum())
                values = values[defined]
            result[metric] = _interval(values, reps, confidence, seed) if len(values) else [math.nan] * 3
    return result


def evaluate(expectation: Expectation, arms: dict[str, dict]) -> dict:
    """The observed values of the two arms and whether the paper's direction holds."""
    higher = arms[expectation.higher]["metrics"].get(expectation.metric)
    lower = arms[expectation.lower]["metrics"].get(expectation.metric)
    result = {"claim": expectation.claim, "metric": expectation.metric, "higher": expectation.higher,
              "lower": expectation.lower, "kind": expectation.kind, "observed": [higher, lower]}
    if higher is None or lower is None or any(math.isnan(v) for v in (higher[0], lower[0])):
        return {**result, "holds": None, "separated": None}
    if expectation.kind == "greater":
        holds = higher[0] > lower[0]
    elif expectation.kind == "not_less":
        holds = higher[2] >= lower[0]
    else:
        raise ValueError(f"unknown expectation kind {expectation.kind!r}; greater or not_less")
    separated = higher[1] > lower[2] if holds else lower[1] > higher[2]  # the two intervals do not overlap
    return {**result, "holds": bool(holds), "separated": bool(separated)}


def summarize(study: Study, runs: list[RunData], final_frac: float, reps: int, confidence: float,
              seed: int) -> dict:
    """Every number of the summary, per arm, and the paper's expectations evaluated on them."""
    groups = ordered_groups(study, runs)
    tags = sorted({tag for run in runs for tag in run.scalars})
    diagnostics = [metric for pattern in study.diagnostics for metric in expand_metric(pattern, tags)]
    expectation_metrics = [metric for e in study.expectations for metric in expand_metric(e.metric, tags)]
    metrics = list(dict.fromkeys([*ACCURACY_METRICS, *diagnostics, *expectation_metrics]))
    arms = {}
    for group in groups:
        arm = group.values["variant"]
        undefined: dict[str, int] = {}
        arms[arm] = {"runs": len(group.runs), "seeds": sorted(run.config.get("seed") for run in group.runs),
                     "tasks": sorted({len(_task_values(run, 0)) for run in group.runs}),
                     "completed": sum(run.completed for run in group.runs),
                     "metrics": arm_metrics(group, metrics, study, final_frac, reps, confidence, seed, undefined),
                     "undefined_runs": undefined}
    expectations = []
    for expectation in study.expectations:
        for metric in expand_metric(expectation.metric, tags):
            if expectation.higher in arms and expectation.lower in arms:
                expectations.append(evaluate(replace(expectation, metric=metric), arms))
    orderings = {metric: sorted(arms, key=lambda arm: -arms[arm]["metrics"][metric][0])
                 for metric in ("slope", "mean_task_accuracy", "accuracy_auc")}
    return {"study": study.name, "check": study.check, "diagnostics": diagnostics, "final_frac": final_frac,
            "confidence": confidence, "reps": reps, "arms": arms, "orderings": orderings,
            "expectations": expectations}


def ordered_groups(study: Study, runs: list[RunData]) -> list[Group]:
    groups = group_runs(runs, ["variant"])  # the population a member trained in is bookkeeping (groups.py)
    unknown = [g.values["variant"] for g in groups if g.values["variant"] not in study.arms]
    if unknown:
        raise ValueError(f"runs of arms {', '.join(unknown)} are not arms of study {study.name} "
                         f"({', '.join(study.arms)}); point --sweep-dir at this study's sweep")
    return sorted(groups, key=lambda group: list(study.arms).index(group.values["variant"]))


# ---- figures and the Markdown page ----

def write_figures(study: Study, runs: list[RunData], out_dir: Path, reps: int, dpi: int) -> list[Path]:
    """accuracy.png (per-task final accuracy, accuracy) and diagnostics.png, with scripts/analysis/plot.py's figure code."""
    groups = ordered_groups(study, runs)
    options = Namespace(aggregate="mean", num_points=200, smooth=1, reps=reps, confidence=0.95, seed=0,
                        human_normalized=False)
    figures = {"accuracy.png": [TASK_ACCURACY, ACCURACY],
               "diagnostics.png": plot.expand_tags(list(study.diagnostics), runs)}
    paths = []
    for name, tags in figures.items():
        fig = plot.build_figure(groups, tags, options)
        for ax in fig.axes:
            if ax.get_title() in study.log_scale:
                ax.set_yscale("log")  # orders of magnitude apart (target means)
        fig.suptitle(f"{study.name}: mean over seeds, 95% bootstrap CI; dotted lines: task switches", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 0.97))
        path = out_dir / name
        plot.save_figure(fig, [path], dpi)
        paths.append(path)
    return paths


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def interval_text(triple: list[float] | None) -> str:
    """A table cell: "mean [low, high]", or n/a (the leaderboard's tables use it too)."""
    return "n/a" if triple is None else f"{_fmt(triple[0])} [{_fmt(triple[1])}, {_fmt(triple[2])}]"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def ordering_text(order: list[str], arms: dict, metric: str) -> str:
    """``a 0.5 > b 0.3 ≈ c 0.29``: each arm after the one above it, ``>`` where their 95% CIs do not overlap."""
    text = ""
    for above, arm in zip([None, *order], order):
        if above is not None:
            separated = arms[arm]["metrics"][metric][2] < arms[above]["metrics"][metric][1]
            text += " > " if separated else " ≈ "
        text += f"{arm} {_fmt(arms[arm]['metrics'][metric][0])}"
    return text


def markdown(study: Study, summary: dict, settings: dict) -> str:
    arms = summary["arms"]
    timing = settings.get("timing")
    lines = [f"# {study.name}: {study.question}", "",
             f"Paper check: {study.check} (see `../shared/spec/results.md`)."
             + (" **Smoke run** (CI size): the numbers mean nothing." if settings["smoke"] else ""), "",
             f"Command: `{settings['command']}`", ""]
    if timing:
        packing = (f" in {timing['processes']} processes (seeds per process: {timing['seeds_per_process']})"
                   if "processes" in timing else "")
        lines += [f"Measured wall time of the sweep: {_minutes(timing['wall_s'])}, {timing['runs_executed']} runs"
                  f"{packing} ({timing['workers']} processes at a time); the processes' own wall "
                  f"times sum to {_minutes(timing['run_wall_s_sum'])}.", ""]
    lines += ["## Set-up (chosen before the runs)", "",
              f"Every arm: `{settings['common']}`, seeds {', '.join(map(str, settings['seeds']))}.", "",
              "| arm | flags |", "|---|---|"]
    lines += [f"| {arm} | `{flags or '(defaults)'}` |" for arm, flags in study.arms.items()]
    lines += ["", "Why:", ""] + [f"- {reason}" for reason in (*study.reasons, *COMMON_REASONS)]
    if study.resized:
        lines += ["", f"**Resized:** {study.resized}"]
    first = f"tasks {study.first_task}.." if study.first_task else "all tasks"
    lines += ["", "## Per-task final accuracy", "", "![accuracy](accuracy.png)", "",
              f"Mean over seeds [95% bootstrap CI over seeds]; per run, over {first} "
              "(`charts/task_final_accuracy`); slope = least-squares change per task; AUC = mean "
              "`charts/accuracy` over the run.", "",
              "| arm | runs | tasks (all) | slope per task | mean task accuracy | last task accuracy | accuracy AUC |",
              "|---|---|---|---|---|---|---|"]
    for arm, data in arms.items():
        m = data["metrics"]
        lines.append(f"| {arm} | {data['runs']} | {'/'.join(map(str, data['tasks']))} | {interval_text(m.get('slope'))} | "
                     f"{interval_text(m.get('mean_task_accuracy'))} | {interval_text(m.get('last_task_accuracy'))} | "
                     f"{interval_text(m.get('accuracy_auc'))} |")
    for metric, order in summary["orderings"].items():
        lines.append(f"\nOrdering by {metric.replace('_', ' ')} (high to low; `>`: the two CIs separate, `≈`: "
                     f"they overlap): {ordering_text(order, arms, metric)}.")
    lines += ["", f"Mean per-task final accuracy by thirds of the tasks ({first}; does an advantage last?):", "",
              "| arm | first third | middle third | last third |", "|---|---|---|---|"]
    lines += [f"| {arm} | " + " | ".join(interval_text(data["metrics"].get(metric)) for metric in THIRDS) + " |"
              for arm, data in arms.items()]
    diagnostics = summary["diagnostics"]
    lines += ["", "## Diagnostics", "", "![diagnostics](diagnostics.png)", "",
              f"Mean over seeds of each run's mean over its last {summary['final_frac']:.0%} of steps "
              "[95% bootstrap CI over seeds].", "",
              "| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    extra = [e["metric"] for e in summary["expectations"] if e["metric"].startswith("growth:")]
    shown = list(dict.fromkeys([*diagnostics, *extra]))

    def diagnostic_cell(arm: str, metric: str) -> str:
        missing = arms[arm].get("undefined_runs", {}).get(metric, 0)
        runs = arms[arm]["runs"]
        return interval_text(arms[arm]["metrics"].get(metric)) + (f" ({runs - missing}/{runs} runs)" if missing else "")

    lines += [f"| {metric} | " + " | ".join(diagnostic_cell(arm, metric) for arm in arms) + " |" for metric in shown]
    if any(arms[arm].get("undefined_runs", {}).get(metric) for arm in arms for metric in shown):
        lines += ["", "(k/n runs): the metric is undefined (NaN) in the other runs' final window, and the value is "
                  "over the k runs where it is defined: `feature_cond` and `feature_mean_alignment` are undefined "
                  "when every unit of the feature layer is dead (plasticity/diagnostics.py)."]
    lines += ["", "## The paper's direction", "",
              "| paper | metric | expected | observed | holds? |", "|---|---|---|---|---|"]
    for e in summary["expectations"]:
        relation = ">" if e["kind"] == "greater" else "not below"
        observed = f"{e['higher']} {interval_text(e['observed'][0])} vs {e['lower']} {interval_text(e['observed'][1])}"
        if e["holds"] is None:
            verdict = "n/a"
        else:
            verdict = ("yes" if e["holds"] else "**no**") + (" (CIs separate)" if e["separated"] else
                                                             " (CIs overlap)")
        lines.append(f"| {e['claim']} | {e['metric']} | {e['higher']} {relation} {e['lower']} | {observed} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"


def analyze(study: Study, sweep_dir: Path, out_dir: Path, settings: dict, final_frac: float, reps: int,
            curve_reps: int, dpi: int) -> dict:
    """Figures, summary.json and summary.md of a (finished) sweep."""
    patterns = [TASK_ACCURACY, ACCURACY, plot.TASK_ID_TAG, *study.diagnostics,
                *(e.metric.removeprefix("growth:") for e in study.expectations)]
    runs = load_runs([sweep_dir / "runs"], wanted=lambda tag: any(fnmatch.fnmatchcase(tag, p) for p in patterns))
    summary = summarize(study, runs, final_frac, reps, 0.95, 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = write_figures(study, runs, out_dir, curve_reps, dpi)
    summary.update(settings=settings, figures=[path.name for path in figures])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.md").write_text(markdown(study, summary, settings))
    return summary


# ---- command line ----

def _data_dir(given: str | None) -> str:
    """The MNIST folder the agents get ("": the agents' own default)."""
    if given:
        if not Path(given).is_dir():
            raise FileNotFoundError(f"--data-dir {given} is not a folder; point it at the folder holding MNIST's "
                                    "t10k-*-idx*-ubyte.gz files")
        return str(Path(given).absolute())
    return str(DEFAULT_DATA_DIR) if DEFAULT_DATA_DIR.is_dir() else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reproduce one paper effect at small scale: sweep, figures, summary.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("study", help=f"one of: {', '.join(STUDIES)}, leaderboard (every method, "
                        "scripts/sweeps/leaderboard.py)")
    parser.add_argument("--smoke", action="store_true", help="CI size: 2 seeds, 4 tasks of 160 env steps, 100 "
                        "images, a 32-32 MLP (checks the machinery, not the effect)")
    parser.add_argument("--num-seeds", type=int, help=f"seeds 1..N per arm (default: {DEFAULT_SEEDS}, smoke 2)")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="leaderboard only: these methods (and the "
                        "baseline) instead of all of them")
    parser.add_argument("--workers", type=int, default=2, help="agent processes at once (benchmark.py --workers)")
    parser.add_argument("--seeds-per-process", metavar="K|auto", help="benchmark.py --seeds-per-process: up to K "
                        "seeds of an arm in one population process (default: benchmark.py's auto, 16 on the image "
                        "MDP, so each arm's seeds train together; 1: a process per run; on a GPU raise it)")
    parser.add_argument("--data-dir", help=f"MNIST folder (default: {DEFAULT_DATA_DIR} if present, else the "
                        "agents' default: $PLASTICITY_DATA or the cache)")
    parser.add_argument("--sweep-dir", help="where the runs go (default: runs/reproduce/<study>, smoke: "
                        "runs/reproduce-smoke/<study>)")
    parser.add_argument("--out-dir", help="figures and summary (default: docs/results/<study>, smoke: "
                        "<sweep-dir>/results)")
    parser.add_argument("--analyze-only", action="store_true", help="no runs: figures and summary from the sweep")
    parser.add_argument("--final-frac", type=float, default=0.1, help="final window of the diagnostics")
    parser.add_argument("--reps", type=int, default=10_000, help="bootstrap replicates of the summary's CIs")
    parser.add_argument("--curve-reps", type=int, default=2000, help="bootstrap replicates per figure point")
    parser.add_argument("--dpi", type=int, default=80, help="figure resolution (keeps the PNGs small)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if args.study not in (*STUDIES, "leaderboard"):
            raise ValueError(f"unknown study {args.study!r}; one of: {', '.join(STUDIES)}, leaderboard")
        if args.methods and args.study != "leaderboard":
            raise ValueError("--methods chooses the leaderboard's methods; a study's arms are fixed")
        if args.num_seeds is not None and args.num_seeds < 1:
            raise ValueError(f"--num-seeds must be at least 1, got {args.num_seeds}")
        if args.seeds_per_process is not None:
            parse_seeds_per_process(args.seeds_per_process)
        if not 0.0 < args.final_frac <= 0.5:
            raise ValueError(f"--final-frac must be in (0, 0.5] (growth compares it with mid-run), got {args.final_frac}")
        seeds = list(range(1, (args.num_seeds or (2 if args.smoke else DEFAULT_SEEDS)) + 1))
        data_dir = _data_dir(args.data_dir)
        if args.study == "leaderboard":
            from scripts.sweeps import leaderboard  # it builds on this module
            return leaderboard.main(args, argv, seeds, data_dir)
        study = STUDIES[args.study]
        size, extra = (SMOKE_SIZE, SMOKE_FLAGS) if args.smoke else (study.size, "")
        default_sweep = PROJECT_ROOT / "runs" / ("reproduce-smoke" if args.smoke else "reproduce") / study.name
        sweep_dir = Path(args.sweep_dir).absolute() if args.sweep_dir else default_sweep
        out_dir = Path(args.out_dir) if args.out_dir else (
            sweep_dir / "results" if args.smoke else PROJECT_ROOT / "docs" / "results" / study.name)
        run_argv = [arg for arg in argv if arg != "--analyze-only"]  # the command that runs the study
        settings = {"command": shlex.join(["python", "scripts/reproduce.py", *run_argv]), "smoke": args.smoke,
                    "common": f"{study.common_flags(size)} {extra}".strip(), "seeds": seeds}
        if args.analyze_only:
            if not (sweep_dir / "runs").is_dir():
                raise FileNotFoundError(f"no runs in {sweep_dir}; run `python scripts/sweeps/reproduce.py {study.name}` "
                                        "first (without --analyze-only)")
        else:
            run_sweep(sweep_argv(study, size, seeds, sweep_dir, args.workers, data_dir, extra,
                                 args.seeds_per_process), sweep_dir)
        timing_path = sweep_dir / TIMING_FILE
        if timing_path.exists():
            settings["timing"] = json.loads(timing_path.read_text())
        started = time.time()
        summary = analyze(study, sweep_dir, out_dir, settings, args.final_frac, args.reps, args.curve_reps, args.dpi)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir}/summary.md, summary.json, {', '.join(summary['figures'])} "
          f"(analysis {time.time() - started:.1f} s)")
    for expectation in summary["expectations"]:
        verdict = {True: "holds", False: "does NOT hold", None: "n/a"}[expectation["holds"]]
        print(f"  {expectation['claim']} [{expectation['metric']}]: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
