"""Aggregates over runs and their confidence intervals, and the alignment of logged curves.

Point estimates and intervals follow rliable (Agarwal et al. 2021, "Deep RL at
the Edge of the Statistical Precipice"), re-implemented here in numpy because
rliable's dependency ``arch`` does not import with the project's numpy 2 /
pandas 3 stack:

- ``mean``: the mean over tasks of the per-task mean over runs
  (``rliable.metrics.aggregate_mean``).
- ``median``: the median over tasks of the per-task mean over runs
  (``aggregate_median``; with a single task it is that task's mean).
- ``iqm``: the interquartile mean of all run scores pooled over tasks, i.e.
  ``scipy.stats.trim_mean(scores, 0.25, axis=None)``: sort the n scores, drop
  ``int(0.25 n)`` from each end, average the rest (``aggregate_iqm``).
- ``optimality_gap``: mean over tasks of the per-task mean of max(γ − x, 0)
  (``aggregate_optimality_gap``, γ − mean(min(x, γ)); γ = 1 for normalised scores).
- ``score_distribution`` (the performance profile): for each threshold τ, the
  fraction of runs with score > τ, F(τ) = mean over tasks of the fraction of the
  task's runs above τ (``rliable.library.run_score_deviation``, the default
  ``use_score_distribution=True`` of ``create_performance_profile``).
- ``probability_of_improvement``: P(X > Y), the mean over tasks of the
  Mann-Whitney statistic U / (n_x n_y) = P(X_m > Y_n) + ½ P(X_m = Y_n) over all
  pairs of X's and Y's runs of the task (``metrics.probability_of_improvement``).

With the same number of runs on every task the pooled and the task-weighted
means coincide, so these equal rliable's functions on a (runs × tasks) matrix;
with ragged run counts every task weighs the same (rliable needs a matrix).

- Confidence interval: stratified bootstrap, percentile method
  (``rliable.library.get_interval_estimates``): each replicate resamples, with
  replacement, the runs of every task separately (a task = one env), keeping
  each task's run count; the interval is the (α/2, 1 − α/2) percentiles of the
  replicate aggregates.  For P(X > Y) the runs of X and of Y are resampled
  independently, each within its tasks (rliable's ``StratifiedIndependentBootstrap``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

AGGREGATES = ("mean", "median", "iqm")
#: Elements of one bootstrap chunk (replicates × runs × grid points): bounds memory on long curves.
BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def iqm(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean along ``axis``: the mean of the sorted scores without ``int(0.25 n)`` at each end."""
    scores = np.sort(np.asarray(scores, dtype=np.float64), axis=axis)
    n = scores.shape[axis]
    cut = int(0.25 * n)
    return np.take(scores, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def aggregate(tasks: list[np.ndarray], method: str) -> np.ndarray:
    """Aggregate per-task score arrays ``tasks[t]`` of shape (..., runs_t, points) over runs and tasks.

    Leading dimensions (bootstrap replicates) are kept: the result has shape (..., points).
    """
    if method == "mean":
        return np.mean([task.mean(axis=-2) for task in tasks], axis=0)
    if method == "median":
        return np.median(np.stack([task.mean(axis=-2) for task in tasks]), axis=0)
    if method == "iqm":
        return iqm(np.concatenate(tasks, axis=-2), axis=-2)
    raise ValueError(f"unknown aggregate {method!r}; one of {', '.join(AGGREGATES)}")


def stratified_bootstrap(samples: Sequence[Sequence[np.ndarray]], statistic: Callable[..., np.ndarray],
                         reps: int = 2000, confidence: float = 0.95, seed: int = 0,
                         replicate_elements: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point estimate, lower, upper) of ``statistic(*samples)``: percentile intervals of a stratified bootstrap.

    ``samples`` are independent score sets (one group; or X and Y for P(X > Y)), each a list
    of per-task arrays whose first axis is the task's runs.  Every replicate resamples, with
    replacement, the runs of each task of each set separately (keeping the run counts), and
    ``statistic`` gets the resampled sets with one leading replicate axis: a task array
    (runs, ...) becomes (replicates, runs, ...).  ``replicate_elements`` is the size of one
    replicate's work (default: the elements of all the task arrays); replicates are drawn in
    chunks of about ``BOOTSTRAP_CHUNK_ELEMENTS`` elements to bound memory.  A fixed ``seed``
    reproduces the intervals (for the same inputs and chunk size).
    """
    samples = [[np.asarray(task, dtype=np.float64) for task in tasks] for tasks in samples]
    if not samples or any(not tasks or any(task.ndim == 0 or len(task) == 0 for task in tasks) for tasks in samples):
        raise ValueError("the stratified bootstrap needs, per score set, at least one task with runs >= 1")
    if reps < 1:
        raise ValueError(f"the number of bootstrap replicates must be at least 1, got {reps}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    point = np.asarray(statistic(*samples), dtype=np.float64)
    work = replicate_elements or sum(task.size for tasks in samples for task in tasks)
    rng = np.random.default_rng(seed)
    replicates = np.empty((reps, *point.shape))
    chunk = max(1, BOOTSTRAP_CHUNK_ELEMENTS // max(1, work))
    for start in range(0, reps, chunk):
        count = min(chunk, reps - start)
        # Stratified: every task's runs are resampled among themselves, every set on its own.
        resampled = [[task[rng.integers(0, len(task), size=(count, len(task)))] for task in tasks]
                     for tasks in samples]
        replicates[start:start + count] = statistic(*resampled)
    alpha = 1.0 - confidence
    lower, upper = np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return point, lower, upper


def stratified_bootstrap_ci(tasks: list[np.ndarray], method: str, reps: int = 2000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point estimate, lower, upper) of ``aggregate(tasks, method)``, each of shape (points,).

    ``tasks[t]`` is an array (runs_t, points): the scores of task t's runs at each point
    (a curve's grid steps, or one final score).  A task with a single run contributes
    no sampling variability, so with one run everywhere the interval collapses to the point.
    """
    tasks = [np.asarray(task, dtype=np.float64) for task in tasks]
    if not tasks or any(task.ndim != 2 or len(task) == 0 for task in tasks):
        raise ValueError("stratified_bootstrap_ci needs, per task, an array of shape (runs >= 1, points)")
    if method not in AGGREGATES:
        raise ValueError(f"unknown aggregate {method!r}; one of {', '.join(AGGREGATES)}")
    return stratified_bootstrap([tasks], lambda resampled: aggregate(resampled, method), reps, confidence, seed)


# ---- metrics of final scores (rliable's set); tasks[t] is (..., runs_t): leading axes are replicates ----

def final_aggregate(tasks: list[np.ndarray], method: str) -> np.ndarray:
    """``aggregate`` of one score per run: ``tasks[t]`` (..., runs_t) -> (...)."""
    return aggregate([np.asarray(task, dtype=np.float64)[..., None] for task in tasks], method)[..., 0]


def optimality_gap(tasks: list[np.ndarray], gamma: float = 1.0) -> np.ndarray:
    """Mean over tasks of the per-task mean over runs of max(γ − score, 0): how far below γ, scores above γ count as γ."""
    return np.mean([np.maximum(gamma - np.asarray(task, dtype=np.float64), 0.0).mean(axis=-1) for task in tasks],
                   axis=0)


def score_distribution(tasks: list[np.ndarray], taus: np.ndarray) -> np.ndarray:
    """Run-score distribution (performance profile): F(τ) = mean over tasks of the fraction of runs with score > τ.

    ``tasks[t]`` (..., runs_t) -> (..., len(taus)).
    """
    taus = np.asarray(taus, dtype=np.float64)
    return np.mean([(np.asarray(task, dtype=np.float64)[..., None] > taus).mean(axis=-2) for task in tasks], axis=0)


def probability_of_improvement(x_tasks: list[np.ndarray], y_tasks: list[np.ndarray]) -> np.ndarray:
    """P(X > Y): mean over tasks of P(X_m > Y_n) + ½ P(X_m = Y_n) over all pairs of X's runs m and Y's runs n.

    ``x_tasks[t]`` (..., runs_x_t) and ``y_tasks[t]`` (..., runs_y_t) hold the same task t; the
    per-task value is the Mann-Whitney U statistic of X over Y divided by runs_x_t × runs_y_t.
    P(Y > X) = 1 − P(X > Y), and X = Y gives ½.
    """
    if len(x_tasks) != len(y_tasks) or not x_tasks:
        raise ValueError(f"P(X > Y) compares X and Y task by task: got {len(x_tasks)} and {len(y_tasks)} tasks")
    per_task = []
    for x, y in zip(x_tasks, y_tasks):
        x = np.asarray(x, dtype=np.float64)[..., :, None]
        y = np.asarray(y, dtype=np.float64)[..., None, :]
        per_task.append((x > y).mean(axis=(-2, -1)) + 0.5 * (x == y).mean(axis=(-2, -1)))
    return np.mean(per_task, axis=0)


def improvement_bootstrap_ci(x_tasks: list[np.ndarray], y_tasks: list[np.ndarray], reps: int = 2000,
                             confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(P(X > Y), lower, upper): X's and Y's runs resampled independently, each within its tasks."""
    pairs = sum(len(x) * len(y) for x, y in zip(x_tasks, y_tasks))
    point, lower, upper = stratified_bootstrap([x_tasks, y_tasks], probability_of_improvement, reps, confidence,
                                               seed, replicate_elements=pairs)
    return float(point), float(lower), float(upper)


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` logged before it (fewer at the start); window 1 is the identity."""
    if window < 1:
        raise ValueError(f"the smoothing window must be at least 1 logged point, got {window}")
    values = np.asarray(values, dtype=np.float64)
    if window == 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def step_grid(step_arrays: list[np.ndarray], num_points: int) -> np.ndarray:
    """Steps at which to compare curves: inside every curve's range (no extrapolation).

    The union of the logged steps in the common range when it has at most
    ``num_points`` steps (runs logged at the same steps are then compared exactly),
    otherwise ``num_points`` evenly spaced steps over the common range.
    """
    if num_points < 2:
        raise ValueError(f"a curve needs at least 2 grid points, got {num_points}")
    start = max(float(steps[0]) for steps in step_arrays)
    end = min(float(steps[-1]) for steps in step_arrays)
    if start > end:
        raise ValueError("the runs' logged step ranges do not overlap")
    union = np.unique(np.concatenate(step_arrays)).astype(np.float64)
    union = union[(union >= start) & (union <= end)]
    if len(union) <= num_points:
        return union
    return np.linspace(start, end, num_points)


def interpolate(steps: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of one run's curve at ``grid`` (which must lie inside the run's range)."""
    return np.interp(grid, np.asarray(steps, dtype=np.float64), values)


def final_window_mean(steps: np.ndarray, values: np.ndarray, last_step: int, final_frac: float) -> float:
    """Mean of the values logged in the last ``final_frac`` of the run, steps >= (1 - final_frac) * last_step.

    ``last_step`` is the run's progress (its last logged step over all tags).  When no
    value of this tag falls in the window (a rarely logged tag), its last value is used.
    """
    if not 0.0 < final_frac <= 1.0:
        raise ValueError(f"--final-frac must be in (0, 1], got {final_frac}")
    in_window = steps >= (1.0 - final_frac) * last_step
    return float(values[in_window].mean()) if in_window.any() else float(values[-1])


def change_steps(steps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Steps at which a piecewise-constant series (e.g. charts/task_id) takes a new value."""
    return steps[1:][np.diff(values) != 0]


def task_slopes(task_values: np.ndarray) -> np.ndarray:
    """Least-squares slope of per-task values against the task index 0..n-1, along the last axis.

    ``task_values`` is (..., tasks), e.g. one row per run of its ``charts/task_final_accuracy``
    in task order; the result has the leading shape (a float for one run).  The slope is
    Σ (k − k̄)(y_k − ȳ) / Σ (k − k̄)², the OLS fit of y = a + b·k (what ``np.polyfit(k, y, 1)[0]`` gives).
    """
    values = np.asarray(task_values, dtype=np.float64)
    if values.ndim == 0 or values.shape[-1] < 2:
        raise ValueError(f"a per-task trend needs at least 2 tasks, got shape {values.shape}; run more tasks "
                         "(--total-timesteps of several --shift-every periods)")
    index = np.arange(values.shape[-1], dtype=np.float64)
    centred = index - index.mean()
    return (values - values.mean(axis=-1, keepdims=True)) @ centred / (centred @ centred)


def mean_slope_ci(runs_task_values: list[np.ndarray], reps: int = 10_000, confidence: float = 0.95,
                  seed: int = 0) -> tuple[float, float, float]:
    """(mean over runs of each run's per-task slope, CI low, CI high): percentile bootstrap over runs (seeds).

    Each run's slope is ``task_slopes`` of its own tasks (runs may have completed different
    numbers of tasks); the interval resamples the runs with replacement (one stratum).
    """
    if not runs_task_values:
        raise ValueError("mean_slope_ci needs at least one run's per-task values")
    slopes = np.array([float(task_slopes(values)) for values in runs_task_values])
    point, lower, upper = stratified_bootstrap_ci([slopes[:, None]], "mean", reps, confidence, seed)
    return float(point[0]), float(lower[0]), float(upper[0])
