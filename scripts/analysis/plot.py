"""Plot and tabulate TensorBoard scalars of many runs: per-group aggregate curves with bootstrap CIs.

Runs are found under the given folders (run folders or sweep folders), grouped
by their config.json fields (``--group-by``; ``variant`` is the sweep's
``exp_name``), aligned on a common step grid, aggregated per group (mean or
IQM) with 95% stratified-bootstrap confidence intervals (scripts/analysis/stats.py), one
panel per tag, task switches (changes of ``charts/task_id``) marked.  With
``--table``: the aggregate of each run's final window (last ``--final-frac`` of
its steps), as Markdown (stdout, ``--out``) and CSV (``--csv``).

    python scripts/analysis/plot.py sweeps/ln_l2 --group-by variant \\
        --tags charts/episodic_return plasticity/effective_rank 'plasticity/dead_frac/*' --out fig.png
    python scripts/analysis/plot.py sweeps/ln_l2 --group-by variant --tags charts/task_final_accuracy \\
        --table --csv final.csv
    python scripts/analysis/plot.py sweeps/atari --group-by variant --human-normalized --aggregate iqm --table
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
CURVE_REPS = 2000  # per grid point; rliable's examples use 2000 for curves
TABLE_REPS = 50_000  # rliable's default for aggregate intervals


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


def group_final_score(group: Group, tag: str, method: str, final_frac: float, reps: int, confidence: float,
                      seed: int, human_normalized: bool = False, reference=None) -> FinalScore | None:
    """Aggregate over the group's runs of each run's mean over its final window (None without the tag)."""
    strata = _strata_with_tag(group, tag)
    if not strata:
        return None
    scores = [np.array([[stats.final_window_mean(*_run_values(run, tag, human_normalized, reference),
                                                 run.last_step, final_frac)] for run in runs]) for runs in strata]
    point, lower, upper = stats.stratified_bootstrap_ci(scores, method, reps, confidence, seed)
    return FinalScore(float(point[0]), float(lower[0]), float(upper[0]), sum(len(runs) for runs in strata))


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
    method = "IQM" if args.aggregate == "iqm" else "mean"
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
    method = "IQM" if args.aggregate == "iqm" else "mean"
    lines = [f"{method} over runs of each run's mean over its last {args.final_frac:.0%} of steps; "
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


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


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
                        help="Atari returns as (score - random) / (human - random), scripts/analysis/data/atari_human_random.csv; "
                        "runs of different games may then share a group (the bootstrap is stratified by game)")
    parser.add_argument("--out", help="figure file (.png/.svg/.pdf; default plot.png), or with --table a Markdown file")
    parser.add_argument("--formats", nargs="+", help="write the figure in these formats (png svg pdf) next to --out")
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--table", action="store_true", help="final-window table instead of a figure")
    parser.add_argument("--final-frac", type=float, default=0.1, help="--table: the final window, as a fraction "
                        "of each run's steps")
    parser.add_argument("--csv", help="--table: also write the table as CSV (one row per group and tag)")
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
    if not args.table:
        figure_paths(args.out or "plot.png", args.formats)
        if args.csv:
            raise ValueError("--csv goes with --table")


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
        if args.table:
            rows = final_table(groups, tags, args, reference)
            text = markdown_table(rows, groups, tags, args)
            print(text, end="")
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(text)
            if args.csv:
                write_csv(rows, Path(args.csv))
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
