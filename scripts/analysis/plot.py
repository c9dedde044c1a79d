"""Plot and tabulate TensorBoard scalars of many runs: per-group aggregate curves with bootstrap CIs.

Runs are found under the given folders (run folders or sweep folders), grouped
by their config.json fields (``--group-by``; ``variant`` is the sweep's
``exp_name``), aligned on a common step grid, aggregated per group (mean or
IQM) with 95% stratified-bootstrap confidence intervals (scripts/analysis/stats.py), one
panel per tag, task switches (changes of ``charts/task_id``) marked.  With
``--table``: the aggregate of each run's final window (last ``--final-frac`` of
its steps), as Markdown (stdout, ``--out``) and CSV (``--csv``).  With ``--profile``,
``--probability-of-improvement [BASELINE]`` and ``--optimality-gap``: rliable's
metrics of those final-window scores (performance profiles, P(X > Y) between groups,
median/IQM/mean and optimality gap), each with stratified-bootstrap CIs, as a figure
(``--out``) and tables (Markdown on stdout and ``--md``, CSV ``--csv``).

    python scripts/analysis/plot.py sweeps/ln_l2 --group-by variant \\
        --tags charts/episodic_return plasticity/effective_rank 'plasticity/dead_frac/*' --out fig.png
    python scripts/analysis/plot.py sweeps/ln_l2 --group-by variant --tags charts/task_final_accuracy \\
        --table --csv final.csv
    python scripts/analysis/plot.py sweeps/atari --group-by variant --human-normalized --aggregate iqm --table
    python scripts/analysis/plot.py sweeps/ln_l2 --group-by variant --tags charts/task_final_accuracy \
        --profile --probability-of-improvement baseline --optimality-gap --out rliable.png --csv rliable.csv
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python scripts/analysis/plot.py` from a checkout

from agents.harness.run_folder import CONFIG_FILE, STATUS_FILE  # noqa: E402
from scripts.analysis import atari_scores, stats  # noqa: E402
from scripts.analysis.groups import Group, group_runs  # noqa: E402
from scripts.analysis.tbreader import RunData, load_runs  # noqa: E402

TASK_ID_TAG = "charts/task_id"
FIGURE_FORMATS = ("png", "svg", "pdf")
PANEL_COLUMNS = 3
CURVE_REPS = 2000  # per grid point; rliable's examples use 2000 for curves (and its profiles' default)
TABLE_REPS = 50_000  # rliable's default for aggregate intervals
AGGREGATE_NAMES = {"mean": "mean", "median": "median", "iqm": "IQM", "optimality_gap": "optimality gap"}
#: The aggregates of --optimality-gap, in rliable's order (its plot_interval_estimates panels).
GAP_METRICS = ("median", "iqm", "mean", "optimality_gap")
PROFILE = "performance_profile"
IMPROVEMENT = "probability_of_improvement"
TAU_POINTS = 101
MARKDOWN_TAUS = 11  # profile columns in the Markdown table (the CSV has every tau)


@dataclass
class Curve:
    steps: np.ndarray
    point: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    num_runs: int


@dataclass
class FinalScore:
    point: float
    lower: float
    upper: float
    num_runs: int


# ---- which tags, which values ----

def expand_tags(patterns: list[str], runs: list[RunData]) -> list[str]:
    """Exact tags or glob patterns (``plasticity/dead_frac/*``) -> tags some run has, in the order given."""
    available = sorted({tag for run in runs for tag in run.tags})
    tags: list[str] = []
    for pattern in patterns:
        matches = fnmatch.filter(available, pattern) if any(c in pattern for c in "*?[") else (
            [pattern] if pattern in available else [])
        if not matches:
            raise ValueError(f"no run has a tag matching {pattern!r}; available tags: {', '.join(available)}")
        tags.extend(tag for tag in matches if tag not in tags)
    return tags


def _run_values(run: RunData, tag: str, human_normalized: bool, reference) -> tuple[np.ndarray, np.ndarray]:
    series = run.scalars[tag]
    values = series.values
    if human_normalized and atari_scores.is_normalizable(tag):
        values = atari_scores.human_normalize(values, atari_scores.game_for(tag, run.config), reference)
    return series.steps, values


def _strata_with_tag(group: Group, tag: str) -> list[list[RunData]]:
    return [with_tag for runs in group.strata().values() if (with_tag := [r for r in runs if tag in r.scalars])]


def group_curve(group: Group, tag: str, method: str, num_points: int, smooth: int, reps: int, confidence: float,
                seed: int, human_normalized: bool = False, reference=None) -> Curve | None:
    """The group's aggregate curve of ``tag`` on a common step grid (None when no run of the group has the tag)."""
    strata = _strata_with_tag(group, tag)
    if not strata:
        return None
    per_run = [[_run_values(run, tag, human_normalized, reference) for run in runs] for runs in strata]
    try:
        grid = stats.step_grid([steps for runs in per_run for steps, _ in runs], num_points)
    except ValueError:
        raise ValueError(f"group {group.label!r}: the runs' steps of {tag} do not overlap (one run ends before "
                         "another starts); plot them in separate groups or drop the short runs") from None
    matrices = [np.stack([stats.interpolate(steps, stats.trailing_mean(values, smooth), grid)
                          for steps, values in runs]) for runs in per_run]
    point, lower, upper = stats.stratified_bootstrap_ci(matrices, method, reps, confidence, seed)
    return Curve(grid, point, lower, upper, sum(len(runs) for runs in strata))


def group_task_scores(group: Group, tag: str, final_frac: float, human_normalized: bool = False,
                      reference=None) -> dict[str, np.ndarray] | None:
    """Task (env id) -> each of its runs' mean of ``tag`` over the run's final window (None without the tag)."""
    scores = {}
    for task, runs in group.strata().items():
        with_tag = [run for run in runs if tag in run.scalars]
        if with_tag:
            scores[task] = np.array([stats.final_window_mean(*_run_values(run, tag, human_normalized, reference),
                                                             run.last_step, final_frac) for run in with_tag])
    return scores or None


def group_final_score(group: Group, tag: str, method: str, final_frac: float, reps: int, confidence: float,
                      seed: int, human_normalized: bool = False, reference=None) -> FinalScore | None:
    """Aggregate over the group's runs of each run's mean over its final window (None without the tag)."""
    scores = group_task_scores(group, tag, final_frac, human_normalized, reference)
    if scores is None:
        return None
    point, lower, upper = stats.stratified_bootstrap_ci([task[:, None] for task in scores.values()], method, reps,
                                                        confidence, seed)
    return FinalScore(float(point[0]), float(lower[0]), float(upper[0]), sum(map(len, scores.values())))


def task_switch_steps(runs: list[RunData]) -> np.ndarray:
    """Steps where charts/task_id changes, over all runs (the union: runs may switch at different steps)."""
    changes = [stats.change_steps(run.scalars[TASK_ID_TAG].steps, run.scalars[TASK_ID_TAG].values)
               for run in runs if TASK_ID_TAG in run.scalars]
    return np.unique(np.concatenate(changes)) if changes else np.array([], dtype=np.int64)


# ---- output ----

def figure_paths(out: str, formats: list[str] | None) -> list[Path]:
    out = Path(out)
    if formats:
        unknown = [fmt for fmt in formats if fmt not in FIGURE_FORMATS]
        if unknown:
            raise ValueError(f"unknown figure format(s) {', '.join(unknown)}; use {', '.join(FIGURE_FORMATS)}")
        return [out.with_suffix("." + fmt) for fmt in formats]
    if out.suffix.lstrip(".").lower() not in FIGURE_FORMATS:
        raise ValueError(f"--out {out}: the extension sets the format; use .png, .svg or .pdf (or --formats)")
    return [out]


def build_figure(groups: list[Group], tags: list[str], args, reference=None):
    """One panel per tag: each group's aggregate curve with its CI band, task switches as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(tags), PANEL_COLUMNS)
    rows = math.ceil(len(tags) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    switches = task_switch_steps([run for group in groups for run in group.runs])
    method = AGGREGATE_NAMES[args.aggregate]
    handles = {}
    for index, tag in enumerate(tags):
        ax = axes[index // columns][index % columns]
        for step in switches:
            ax.axvline(step, color="0.55", linewidth=0.7, linestyle=":", zorder=0)
        for number, group in enumerate(groups):
            curve = group_curve(group, tag, args.aggregate, args.num_points, args.smooth, args.reps or CURVE_REPS,
                                args.confidence, args.seed, args.human_normalized, reference)
            if curve is None:
                continue
            color = colors[number % len(colors)]
            marker = "o" if len(curve.steps) == 1 else None
            (line,) = ax.plot(curve.steps, curve.point, color=color, linewidth=1.6, marker=marker,
                              label=f"{group.label} (n={curve.num_runs})")
            ax.fill_between(curve.steps, curve.lower, curve.upper, color=color, alpha=0.2, linewidth=0)
            handles.setdefault(group.label, line)
        normalized = args.human_normalized and atari_scores.is_normalizable(tag)
        ax.set_title(tag + (" (human-normalised)" if normalized else ""), fontsize=10)
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"{method} ({args.confidence:.0%} CI)")
        ax.grid(alpha=0.3)
    for index in range(len(tags), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 4), frameon=False)
    legend_rows = math.ceil(len(handles) / 4)
    fig.tight_layout(rect=(0, 0.06 * legend_rows / rows, 1, 1))
    return fig


def save_figure(fig, paths: list[Path], dpi: int) -> None:
    import matplotlib.pyplot as plt

    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    plt.close(fig)


def final_table(groups: list[Group], tags: list[str], args, reference) -> list[dict]:
    rows = []
    for group in groups:
        for tag in tags:
            score = group_final_score(group, tag, args.aggregate, args.final_frac, args.reps or TABLE_REPS,
                                      args.confidence, args.seed, args.human_normalized, reference)
            if score is None:
                continue
            rows.append({**{key: value for key, value in group.values.items()}, "group": group.label, "tag": tag,
                         "aggregate": args.aggregate, "value": score.point, "ci_low": score.lower,
                         "ci_high": score.upper, "runs": score.num_runs, "final_frac": args.final_frac,
                         "human_normalized": bool(args.human_normalized and atari_scores.is_normalizable(tag))})
    return rows


def markdown_table(rows: list[dict], groups: list[Group], tags: list[str], args) -> str:
    """Groups as rows, tags as columns, cells ``value [low, high]``."""
    keys = list(groups[0].values)
    method = AGGREGATE_NAMES[args.aggregate]
    lines = [f"{method[0].upper() + method[1:]} over runs of each run's mean over its last {args.final_frac:.0%} of steps; "
             f"[{args.confidence:.0%} stratified-bootstrap CI, {args.reps or TABLE_REPS} replicates]"
             + (" ; returns human-normalised" if args.human_normalized else ""), ""]
    header = [*(keys or ["group"]), "runs", *tags]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    cells = {(row["group"], row["tag"]): row for row in rows}
    for group in groups:
        present = [cells[(group.label, tag)] for tag in tags if (group.label, tag) in cells]
        num_runs = max((row["runs"] for row in present), default=0)
        values = [str(group.values[key]) for key in keys] or [group.label]
        row_cells = []
        for tag in tags:
            row = cells.get((group.label, tag))
            if row is None:
                row_cells.append("n/a")
                continue
            text = f"{row['value']:.4g} [{row['ci_low']:.4g}, {row['ci_high']:.4g}]"
            row_cells.append(text + (f" (n={row['runs']})" if row["runs"] != num_runs else ""))
        lines.append("| " + " | ".join([*values, str(num_runs), *row_cells]) + " |")
    return "\n".join(lines) + "\n"


def emit_table(text: str, rows, markdown_path: str | None, csv_path: str | None) -> None:
    """Print a markdown table to stdout, and write it (and its rows as CSV) where asked."""
    print(text, end="")
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(text)
    if csv_path:
        write_csv(rows, Path(csv_path))


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# ---- rliable's metrics of final scores: performance profiles, P(X > Y), optimality gap ----

def metrics_requested(args) -> bool:
    return bool(args.profile or args.probability_of_improvement is not None or args.optimality_gap)


def final_scores(groups: list[Group], tags: list[str], args, reference) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """tag -> group label -> task (env id) -> the final-window score of each of its runs (groups with the tag)."""
    result = {}
    for tag in tags:
        result[tag] = {}
        for group in groups:
            scores = group_task_scores(group, tag, args.final_frac, args.human_normalized, reference)
            if scores is not None:
                result[tag][group.label] = scores
    return result


def _metric_row(args, tag: str, metric: str, group: str, value: float, lower: float, upper: float, runs: int,
                tasks: int, reps: int, **extra) -> dict:
    """One CSV row; every row has the same columns, in this order (blank where they do not apply)."""
    return {"metric": metric, "tag": tag, "group": group, "versus": extra.get("versus", ""),
            "tau": extra.get("tau", ""), "gamma": extra.get("gamma", ""), "value": value, "ci_low": lower,
            "ci_high": upper, "runs": runs, "versus_runs": extra.get("versus_runs", ""), "tasks": tasks,
            "reps": reps, "confidence": args.confidence, "final_frac": args.final_frac,
            "human_normalized": bool(args.human_normalized and atari_scores.is_normalizable(tag))}


def aggregate_rows(scores, tags: list[str], args) -> list[dict]:
    """Median, IQM, mean and optimality gap (γ = ``--gap-threshold``) of each group's final scores, one bootstrap."""
    reps = args.reps or TABLE_REPS
    gamma = args.gap_threshold

    def statistic(tasks):
        return np.stack([*(stats.final_aggregate(tasks, method) for method in GAP_METRICS[:3]),
                         stats.optimality_gap(tasks, gamma)], axis=-1)

    rows = []
    for tag in tags:
        for label, tasks in scores[tag].items():
            point, lower, upper = stats.stratified_bootstrap([list(tasks.values())], statistic, reps,
                                                             args.confidence, args.seed)
            for index, metric in enumerate(GAP_METRICS):
                rows.append(_metric_row(args, tag, metric, label, float(point[index]), float(lower[index]),
                                        float(upper[index]), sum(map(len, tasks.values())), len(tasks), reps,
                                        **({"gamma": gamma} if metric == "optimality_gap" else {})))
    return rows


def improvement_pairs(groups: list[Group], baseline: str) -> list[tuple[str, str]]:
    """(X, Y) pairs: every group against ``baseline``, or (empty baseline) each pair of groups once, X the earlier."""
    labels = [group.label for group in groups]
    if len(labels) < 2:
        raise ValueError(f"--probability-of-improvement compares groups, and all runs form one group ({labels[0]!r}); "
                         "choose --group-by fields that differ between the methods, e.g. --group-by variant")
    if baseline:
        if baseline not in labels:
            raise ValueError(f"--probability-of-improvement {baseline!r}: no group has that label; the groups are "
                             f"{', '.join(repr(label) for label in labels)} (or give no baseline for every pair)")
        return [(label, baseline) for label in labels if label != baseline]
    return [(x, y) for index, x in enumerate(labels) for y in labels[index + 1:]]


def improvement_rows(scores, tags: list[str], pairs: list[tuple[str, str]], args) -> list[dict]:
    """P(X > Y) of each pair and tag whose groups have runs of the same tasks (the others noted on stderr)."""
    reps = args.reps or TABLE_REPS
    rows, skipped = [], []
    for tag in tags:
        for x, y in pairs:
            x_tasks, y_tasks = scores[tag].get(x), scores[tag].get(y)
            if x_tasks is None or y_tasks is None:
                skipped.append(f"{x} vs {y} on {tag} ({x if x_tasks is None else y} has no run with it)")
                continue
            if set(x_tasks) != set(y_tasks):
                skipped.append(f"{x} vs {y} on {tag} (tasks {', '.join(sorted(x_tasks))} vs "
                               f"{', '.join(sorted(y_tasks))})")
                continue
            order = sorted(x_tasks)
            point, lower, upper = stats.improvement_bootstrap_ci([x_tasks[t] for t in order], [y_tasks[t] for t in order],
                                                                 reps, args.confidence, args.seed)
            rows.append(_metric_row(args, tag, IMPROVEMENT, x, point, lower, upper,
                                    sum(map(len, x_tasks.values())), len(order), reps, versus=y,
                                    versus_runs=sum(map(len, y_tasks.values()))))
    if not rows:
        raise ValueError("--probability-of-improvement: no pair of groups has runs of the same tasks (env ids) "
                         f"with the tag(s): {'; '.join(skipped)}. P(X > Y) compares runs task by task: group "
                         "without env_id (e.g. --group-by variant) so that each group spans the same env ids")
    if skipped:
        shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        print(f"note: P(X > Y) compares groups with runs of the same env ids; skipped {len(skipped)} pair(s): "
              f"{shown}", file=sys.stderr)
    return rows


def tau_grid(tag_scores: dict[str, dict[str, np.ndarray]], args) -> np.ndarray:
    """``--tau-points`` thresholds over ``--tau-range``, by default [min(0, lowest score), max(1, highest score)]."""
    if args.tau_range is not None:
        low, high = args.tau_range
    else:
        values = np.concatenate([task for tasks in tag_scores.values() for task in tasks.values()])
        low, high = min(0.0, float(np.nanmin(values))), max(1.0, float(np.nanmax(values)))
    return np.linspace(low, high, args.tau_points)


def profile_rows(scores, tags: list[str], args) -> list[dict]:
    """Each group's run-score distribution (fraction of runs with score > τ) on one τ grid per tag, with CI bands."""
    reps = args.reps or CURVE_REPS
    rows = []
    for tag in tags:
        taus = tau_grid(scores[tag], args)
        for label, tasks in scores[tag].items():
            arrays = list(tasks.values())
            num_runs = sum(map(len, arrays))
            point, lower, upper = stats.stratified_bootstrap(
                [arrays], lambda resampled, taus=taus: stats.score_distribution(resampled, taus), reps, args.confidence,
                args.seed, replicate_elements=num_runs * len(taus))
            rows.extend(_metric_row(args, tag, PROFILE, label, float(point[i]), float(lower[i]), float(upper[i]),
                                    num_runs, len(arrays), reps, tau=float(tau)) for i, tau in enumerate(taus))
    return rows


def _interval(row: dict) -> str:
    return f"{row['value']:.4g} [{row['ci_low']:.4g}, {row['ci_high']:.4g}]"


def metrics_markdown(rows: list[dict], tags: list[str], args) -> str:
    """One table per metric (and tag): cells ``value [low, high]``."""
    reps = sorted({row["reps"] for row in rows})
    lines = [f"Scores: each run's mean over its last {args.final_frac:.0%} of steps"
             + (" (returns human-normalised)" if args.human_normalized else "")
             + f"; [{args.confidence:.0%} stratified-bootstrap CI (runs resampled within each env id), "
             f"{' / '.join(map(str, reps))} replicates]", ""]
    if args.optimality_gap:
        for tag in tags:
            cells = {(row["group"], row["metric"]): row for row in rows
                     if row["tag"] == tag and row["metric"] in GAP_METRICS}
            labels = list(dict.fromkeys(group for group, _ in cells))
            lines += [f"Aggregates of {tag} (optimality gap: mean of max({args.gap_threshold:g} − score, 0))", "",
                      "| group | runs | tasks | " + " | ".join(AGGREGATE_NAMES[m] for m in GAP_METRICS) + " |",
                      "|" + "---|" * (3 + len(GAP_METRICS))]
            for label in labels:
                first = cells[(label, GAP_METRICS[0])]
                lines.append(f"| {label} | {first['runs']} | {first['tasks']} | "
                             + " | ".join(_interval(cells[(label, m)]) for m in GAP_METRICS) + " |")
            lines.append("")
    improvement = [row for row in rows if row["metric"] == IMPROVEMENT]
    if improvement:
        pairs = list(dict.fromkeys((row["group"], row["versus"]) for row in improvement))
        cells = {(row["group"], row["versus"], row["tag"]): row for row in improvement}
        shown = [tag for tag in tags if any(row["tag"] == tag for row in improvement)]
        lines += ["Probability of improvement P(X > Y) = P(X's run beats Y's) + ½ P(tie), averaged over env ids "
                  "(P(Y > X) = 1 − P(X > Y))", "", "| X | Y | " + " | ".join(shown) + " |",
                  "|" + "---|" * (2 + len(shown))]
        for x, y in pairs:
            lines.append(f"| {x} | {y} | " + " | ".join(
                _interval(cells[(x, y, tag)]) if (x, y, tag) in cells else "n/a" for tag in shown) + " |")
        lines.append("")
    if args.profile:
        for tag in tags:
            profile = [row for row in rows if row["metric"] == PROFILE and row["tag"] == tag]
            taus = list(dict.fromkeys(row["tau"] for row in profile))
            chosen = [taus[i] for i in sorted(set(np.linspace(0, len(taus) - 1, min(len(taus), MARKDOWN_TAUS))
                                                  .round().astype(int).tolist()))]
            cells = {(row["group"], row["tau"]): row for row in profile}
            labels = list(dict.fromkeys(row["group"] for row in profile))
            note = f"; {len(chosen)} of the {len(taus)} τ, all in --csv" if len(chosen) < len(taus) else ""
            lines += [f"Performance profile of {tag}: fraction of runs with score > τ{note}", "",
                      "| group | runs | " + " | ".join(f"τ={tau:.4g}" for tau in chosen) + " |",
                      "|" + "---|" * (2 + len(chosen))]
            for label in labels:
                lines.append(f"| {label} | {cells[(label, taus[0])]['runs']} | "
                             + " | ".join(_interval(cells[(label, tau)]) for tau in chosen) + " |")
            lines.append("")
    return "\n".join(lines)


def build_metrics_figure(rows: list[dict], groups: list[Group], tags: list[str], args):
    """One row of panels per tag: the performance profile, P(X > Y) intervals, median/IQM/mean/optimality gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([PROFILE] if args.profile else []) + (
        [IMPROVEMENT] if args.probability_of_improvement is not None else []) + (
        list(GAP_METRICS) if args.optimality_gap else [])
    labels = [group.label for group in groups]
    pairs = list(dict.fromkeys((row["group"], row["versus"]) for row in rows if row["metric"] == IMPROVEMENT))
    height = max(3.2, 0.28 * max(len(labels), 2 * len(pairs)) + 1.8)
    # The interval panels' tick labels (about 0.07 inch a character at 8 pt) need room of their own.
    label_inches = 0.07 * max([len(label) for label in labels] + [len(part) + 2 for pair in pairs for part in pair])
    widths = [5.0 if panel == PROFILE else 3.0 for panel in panels]
    labelled = (IMPROVEMENT in panels) + (GAP_METRICS[0] in panels)
    fig = plt.figure(figsize=(sum(widths) + labelled * label_inches, height * len(tags)), layout="constrained")
    subfigures = fig.subfigures(len(tags), 1, squeeze=False)[:, 0]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {label: palette[index % len(palette)] for index, label in enumerate(labels)}
    what = "score" + (" (human-normalised)" if args.human_normalized else "")
    interval = f"({args.confidence:.0%} CI)"
    for subfigure, tag in zip(subfigures, tags):
        normalized = args.human_normalized and atari_scores.is_normalizable(tag)
        subfigure.suptitle(f"{tag}: each run's mean over its last {args.final_frac:.0%} of steps"
                           + (", human-normalised" if normalized else ""), fontsize=10)
        axes = subfigure.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
        for ax, panel in zip(axes, panels):
            selected = [row for row in rows if row["tag"] == tag and row["metric"] == panel]
            ax.grid(alpha=0.3)
            if panel == PROFILE:
                for label in labels:
                    profile = [row for row in selected if row["group"] == label]
                    if not profile:
                        continue
                    taus = [row["tau"] for row in profile]
                    ax.plot(taus, [row["value"] for row in profile], color=colors[label], linewidth=1.6,
                            label=f"{label} (n={profile[0]['runs']})")
                    ax.fill_between(taus, [row["ci_low"] for row in profile], [row["ci_high"] for row in profile],
                                    color=colors[label], alpha=0.2, linewidth=0)
                ax.set_title("performance profile", fontsize=9)
                ax.set_xlabel(f"τ ({what})", fontsize=8)
                ax.set_ylabel(f"fraction of runs with score > τ {interval}", fontsize=8)
                ax.set_ylim(-0.02, 1.02)
                ax.legend(fontsize=7, loc="lower left", frameon=False)
                continue
            if panel == IMPROVEMENT:
                entries = [(f"{row['group']}\n> {row['versus']}", row, colors[row["group"]]) for row in selected]
                ax.axvline(0.5, color="0.4", linestyle="--", linewidth=0.9)
                ax.set_xlim(-0.02, 1.02)
                ax.set_title("probability of improvement", fontsize=9)
                ax.set_xlabel(f"P(X > Y) {interval}", fontsize=8)
            else:
                entries = [(row["group"], row, colors[row["group"]]) for row in selected]
                gap = panel == "optimality_gap"
                ax.set_title(AGGREGATE_NAMES[panel] + (f" (γ = {args.gap_threshold:g})" if gap else ""), fontsize=9)
                ax.set_xlabel(f"{what} {interval}", fontsize=8)
            for position, (_, row, color) in enumerate(reversed(entries)):
                ax.barh(position, row["ci_high"] - row["ci_low"], left=row["ci_low"], height=0.6, color=color,
                        alpha=0.75)
                ax.vlines(row["value"], position - 0.3, position + 0.3, color="black", linewidth=1.5)
            ax.set_yticks(range(len(entries)), [name for name, _, _ in reversed(entries)], fontsize=8)
            ax.set_ylim(-0.7, max(len(entries), 1) - 0.3)
            if panel in GAP_METRICS[1:]:
                ax.tick_params(labelleft=False)  # the same groups as the median panel beside it
            ax.tick_params(axis="x", labelsize=8)
    return fig


def write_metrics(groups: list[Group], tags: list[str], args, reference) -> None:
    """The requested metrics: Markdown on stdout (and ``--md``), CSV (``--csv``), the figure (``--out``)."""
    baseline = args.probability_of_improvement
    pairs = improvement_pairs(groups, baseline) if baseline is not None else []
    scores = final_scores(groups, tags, args, reference)
    rows = []
    if args.optimality_gap:
        rows += aggregate_rows(scores, tags, args)
    if baseline is not None:
        rows += improvement_rows(scores, tags, pairs, args)
    if args.profile:
        rows += profile_rows(scores, tags, args)
    emit_table(text=metrics_markdown(rows, tags, args), rows=rows, markdown_path=args.md, csv_path=args.csv)
    paths = figure_paths(args.out or "plot.png", args.formats)
    save_figure(build_metrics_figure(rows, groups, tags, args), paths, args.dpi)
    print(f"wrote {', '.join(map(str, paths))} ({len(groups)} groups, {sum(len(g.runs) for g in groups)} runs)",
          file=sys.stderr)


# ---- command line ----

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Aggregate curves (mean/IQM with stratified-bootstrap CIs) or final-score tables from runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run folders, sweep folders, or folders holding either")
    parser.add_argument("--tags", nargs="+", default=["charts/episodic_return"],
                        help="scalar tags, or glob patterns such as 'plasticity/dead_frac/*'; one panel each")
    parser.add_argument("--group-by", nargs="*", default=["agent", "env_id", "variant"],
                        help=f"{CONFIG_FILE} fields that define a group (variant = the sweep's exp_name)")
    parser.add_argument("--allow-differing", nargs="+", default=[], metavar="FIELD",
                        help="config fields allowed to differ inside a group")
    parser.add_argument("--aggregate", choices=stats.AGGREGATES, default="mean", help="aggregate over runs")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    parser.add_argument("--reps", type=int, help=f"bootstrap replicates (default: {CURVE_REPS} per curve point, "
                        f"{TABLE_REPS} for --table)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--num-points", type=int, default=200, help="most grid points per curve")
    parser.add_argument("--smooth", type=int, default=1, help="trailing mean over this many logged points "
                        "before alignment (1: none)")
    parser.add_argument("--human-normalized", action="store_true",
                        help="Atari returns as (score - random) / (human - random), envs/data/atari_human_random.csv; "
                        "runs of different games may then share a group (the bootstrap is stratified by game)")
    parser.add_argument("--out", help="figure file (.png/.svg/.pdf; default plot.png), or with --table a Markdown file")
    parser.add_argument("--formats", nargs="+", help="write the figure in these formats (png svg pdf) next to --out")
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--table", action="store_true", help="final-window table instead of a figure")
    parser.add_argument("--final-frac", type=float, default=0.1, help="--table: the final window, as a fraction "
                        "of each run's steps")
    parser.add_argument("--csv", help="--table: also write the table as CSV (one row per group and tag); with the "
                        "metrics below, their long-form table (one row per metric, tag, group and tau)")
    metrics = parser.add_argument_group(
        "rliable's metrics of the final-window scores (Agarwal et al. 2021): a figure (--out) and tables (Markdown on "
        "stdout and --md, CSV --csv); combinable; bootstrap stratified by env id")
    metrics.add_argument("--profile", action="store_true",
                         help="performance profiles: per group, the fraction of runs with score > tau, with CI bands")
    metrics.add_argument("--tau-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                         help="--profile: the thresholds' range (default: [min(0, lowest score), max(1, highest)])")
    metrics.add_argument("--tau-points", type=int, default=TAU_POINTS, help="--profile: number of thresholds")
    metrics.add_argument("--probability-of-improvement", nargs="?", const="", metavar="BASELINE",
                         help="P(X > Y) (+ half the ties, averaged over env ids) of every group X against the group "
                         "labelled BASELINE, or without BASELINE of each pair of groups")
    metrics.add_argument("--optimality-gap", action="store_true",
                         help="median, IQM, mean and optimality gap (mean of max(gamma - score, 0)) per group")
    metrics.add_argument("--gap-threshold", type=float, default=1.0, metavar="GAMMA",
                         help="--optimality-gap: gamma, the score counted as optimal (1 for normalised scores)")
    metrics.add_argument("--md", help="write the metrics' Markdown tables to this file too (with --table, --out "
                         "is the Markdown file)")
    return parser


def _check_args(args) -> None:
    if args.num_points < 2:
        raise ValueError(f"--num-points must be at least 2, got {args.num_points}")
    if args.smooth < 1:
        raise ValueError(f"--smooth must be at least 1 (no smoothing), got {args.smooth}")
    if args.reps is not None and args.reps < 1:
        raise ValueError(f"--reps must be at least 1, got {args.reps}")
    if not 0.0 < args.confidence < 1.0:
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
    if not 0.0 < args.final_frac <= 1.0:
        raise ValueError(f"--final-frac must be in (0, 1], got {args.final_frac}")
    metrics = metrics_requested(args)
    names = "--profile, --probability-of-improvement or --optimality-gap"
    if metrics and args.table:
        raise ValueError(f"--table (the final-window table) and {names} (a figure and its tables) are separate "
                         "outputs; run them as two commands")
    for flag, used, needs, given in (("--tau-range", args.tau_range is not None, "--profile", args.profile),
                                     ("--tau-points", args.tau_points != TAU_POINTS, "--profile", args.profile),
                                     ("--gap-threshold", args.gap_threshold != 1.0, "--optimality-gap",
                                      args.optimality_gap),
                                     ("--md", args.md is not None, names, metrics)):
        if used and not given:
            raise ValueError(f"{flag} goes with {needs}")
    if args.tau_points < 2:
        raise ValueError(f"--tau-points must be at least 2, got {args.tau_points}")
    if args.tau_range is not None and not args.tau_range[0] < args.tau_range[1]:
        raise ValueError(f"--tau-range LOW HIGH needs LOW < HIGH, got {args.tau_range[0]:g} {args.tau_range[1]:g}")
    if not args.table:
        figure_paths(args.out or "plot.png", args.formats)
        if args.csv and not metrics:
            raise ValueError(f"--csv goes with --table or {names}")


def _note_incomplete(runs: list[RunData]) -> None:
    incomplete = [run for run in runs if not run.completed]
    if incomplete:
        states = sorted({run.status.status if run.status is not None else f"no {STATUS_FILE}"
                         for run in incomplete})
        names = ", ".join(run.name for run in incomplete[:3]) + (" ..." if len(incomplete) > 3 else "")
        print(f"note: {len(incomplete)} of {len(runs)} runs have not completed ({', '.join(states)}): {names}",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        patterns = [*args.tags, TASK_ID_TAG]
        runs = load_runs(args.paths, wanted=lambda tag: any(fnmatch.fnmatchcase(tag, p) for p in patterns))
        tags = expand_tags(args.tags, runs)
        reference = None
        allow = list(args.allow_differing)
        if args.human_normalized:
            if not any(atari_scores.is_normalizable(tag) for tag in tags):
                raise ValueError("--human-normalized applies to return tags (charts/episodic_return, "
                                 "charts/episodic_return/<Game>, charts/task_return); none was requested")
            reference = atari_scores.load_reference()
            allow.append("env_id")  # normalised scores of different games are comparable
        groups = group_runs(runs, args.group_by, allow)
        _note_incomplete(runs)
        if metrics_requested(args):
            write_metrics(groups, tags, args, reference)
        elif args.table:
            rows = final_table(groups, tags, args, reference)
            emit_table(text=markdown_table(rows, groups, tags, args), rows=rows, markdown_path=args.out,
                       csv_path=args.csv)
        else:
            paths = figure_paths(args.out or "plot.png", args.formats)
            save_figure(build_figure(groups, tags, args, reference), paths, args.dpi)
            print(f"wrote {', '.join(map(str, paths))} ({len(groups)} groups, {len(runs)} runs, {len(tags)} panels)")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
