"""Run folders, TensorBoard logging and progress display shared by both agents (spec agents.md "Outputs").

What a run folder holds is the contract of ``agents/harness/run_folder.py``; this
module writes its TensorBoard event files.

Scalars produced in the hot loop stay on the training device: they are queued
and moved to the host in one transfer every ``log_every`` env steps, so logging
adds no per-step host-device synchronisation.  ``charts/SPS`` is the rate over
the last window, logged from the first window on (pitfall 12).

A fresh run also writes a "Custom Scalars" layout (``dashboard_layout``): TensorBoard's
Custom Scalars tab opens on returns and losses, then the plasticity diagnostics with
every layer of a metric on one chart.  With ``--track`` the run is mirrored to
Weights & Biases (``agents/harness/wandb_tracking.py``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from agents.harness import wandb_tracking
from agents.harness.run_folder import EVENT_FILE_PREFIX, event_file_second
from envs.factory import is_image_mdp_id


def args_to_dict(args) -> dict:
    return dataclasses.asdict(args)


def markdown_table(config: dict) -> str:
    rows = "\n".join(f"|{key}|{value}|" for key, value in sorted(config.items()))
    return "|param|value|\n|-|-|\n" + rows


# ---- TensorBoard "Custom Scalars" dashboard ----

#: Charts of tags a run may not log although its config enables them (a game without human reference scores).
OPTIONAL_TAGS = ("charts/eval_hns",)

#: The plasticity methods' own scalars (``Interventions.scalars``): the flag that turns a method on -> its chart.
METHOD_CHARTS = {
    "l2": ("L2 penalty", "plasticity/l2_penalty"),
    "l2_init": ("L2-Init penalty", "plasticity/l2_init_penalty"),
    "cbp": ("CBP replacements", "plasticity/cbp_replacements"),
    "swr": ("SWR scale", "plasticity/swr_(logit_)?scale"),
    "snp": ("Shrink & Perturb applications", "plasticity/snp_applications"),
    "redo_every": ("ReDo resets", "plasticity/redo_resets"),
    "reset_head_every": ("head resets", "plasticity/head_resets"),
}

#: Diagnostics (plasticity/diagnostics.py) by group; the unit metrics and weight_norm have per-layer tags too.
UNIT_METRICS = ("dead_frac", "linearized_frac", "dormant_frac", "preact_mean_abs", "preact_std")
NORM_METRICS = ("weight_norm", "weight_magnitude", "dist_from_init", "feature_norm", "grad_norm")
RANK_METRICS = ("effective_rank", "srank", "stable_rank")
TARGET_MEAN_METRICS = ("target_mean", "target_std", "target_offset_ratio", "feature_sv_max", "feature_cond",
                       "feature_mean_dominance", "feature_mean_alignment", "q_mean", "q_std")


def _exactly(*tags: str) -> list:
    """A multiline chart of these tags (regexes, matched from the start of the tag to its end)."""
    return ["Multiline", [f"{tag}$" for tag in tags]]


def _with_layers(metric: str) -> list:
    """The overall ``plasticity/<metric>`` and every per-layer ``plasticity/<metric>/<layer>`` on one chart."""
    return ["Multiline", [f"plasticity/{metric}$", f"plasticity/{metric}/.*"]]


def dashboard_layout(config: dict) -> dict:
    """The Custom Scalars layout of a run with ``config`` (its config.json): {category: {chart: [kind, tags]}}.

    Only charts of tags this run logs: the diagnostics when their cadence fires after
    ``learning_starts``, accuracy on the image MDP, the methods that are on.  An empty
    config (a bare Tracker) gets the charts every run has plus the default diagnostics.
    """
    total, learning_starts = config.get("total_timesteps"), config.get("learning_starts")

    def fires(flag: str, default: int = 0, after: int | None = learning_starts) -> bool:
        """Some multiple of the cadence ``flag`` lies in (after, total]."""
        every = config.get(flag, default)
        if not every or total is None or after is None:
            return bool(every)
        return total // every * every > after

    image_mdp = is_image_mdp_id(str(config.get("env_id", "")))
    categorical = config.get("agent") == "c51" or config.get("loss") in ("hl_gauss", "two_hot")
    evaluates = fires("eval_every", after=0)  # --eval-every: greedy evaluations (agents/harness/evaluation.py)

    def evaluation(*tags: str) -> tuple[str, ...]:
        return tags if evaluates else ()

    returns = {"episodic return": _exactly("charts/episodic_return", *evaluation("charts/eval_return"))}
    if "games" in config.get("atari_shift", []):
        returns["episodic return per game"] = ["Multiline", [
            f"{tag}/.*" for tag in ("charts/episodic_return", *evaluation("charts/eval_return"))]]
    returns["TD loss"] = _exactly("losses/td_loss")
    returns["Q-values"] = _exactly("losses/q_values")
    if image_mdp:
        returns["greedy accuracy"] = _exactly("charts/accuracy", "charts/task_final_accuracy",
                                              *evaluation("charts/eval_accuracy"))
    elif evaluates:
        returns["evaluation human-normalised score"] = ["Multiline", ["charts/eval_hns(/.*)?$"]]
    layout = {"returns and losses": returns}
    if fires("diag_every", 10_000):
        layout["plasticity: units (all layers)"] = {metric: _with_layers(metric) for metric in UNIT_METRICS}
        layout["plasticity: norms"] = {metric: (_with_layers(metric) if metric == "weight_norm"
                                                else _exactly(f"plasticity/{metric}")) for metric in NORM_METRICS}
        layout["plasticity: ranks"] = {metric: _exactly(f"plasticity/{metric}") for metric in RANK_METRICS}
        target_mean = {metric: _exactly(f"plasticity/{metric}") for metric in TARGET_MEAN_METRICS}
        if categorical:
            target_mean["target_clip_frac"] = _exactly("plasticity/target_clip_frac")
        layout["plasticity: target-mean"] = target_mean
    probes = {}
    if fires("entk_every"):
        probes["entk_effective_rank"] = _exactly("plasticity/entk_effective_rank")
        probes["entk_cond"] = _exactly("plasticity/entk_cond")
    if fires("hessian_every"):
        probes["hessian_max_eig"] = _exactly("plasticity/hessian_max_eig")
    if fires("probe_every"):
        probes["probe_fit_loss"] = _exactly("plasticity/probe_fit_loss")
    if probes:
        layout["plasticity: probes"] = probes
    methods = {title: _exactly(tag) for flag, (title, tag) in METHOD_CHARTS.items() if config.get(flag)}
    if methods:
        layout["plasticity: methods"] = methods
    layout["run"] = {"SPS": _exactly("charts/SPS"), "epsilon": _exactly("charts/epsilon"),
                     "episodic length": _exactly("charts/episodic_length", *evaluation("charts/eval_length")),
                     "task id": _exactly("charts/task_id"), "task return": _exactly("charts/task_return")}
    return layout


def wait_for_a_later_event_file_name(run_dir: Path, max_wait: float = 2.0) -> None:
    """Make the next event file in ``run_dir`` sort after the ones already there.

    TensorBoard reads a folder's event files in name order, and the resumed run's
    ``purge_step`` only drops the events of files read before it.  The name is
    ``<second>.<host>.<pid>.<n>`` with pid and n unpadded: two files created in the
    same second sort by those as text (``...11158.10`` before ``...11158.9``), so a
    resume within a second of the interrupted run's start would be shown before it,
    its purge void and the dropped steps back.  Waiting for the next second (at most
    once per resume) makes the timestamp decide.
    """
    seconds = [second for path in Path(run_dir).glob(EVENT_FILE_PREFIX + "*")
               if (second := event_file_second(path)) is not None]
    if not seconds:
        return
    delay = max(seconds) + 1 - time.time()
    if delay > max_wait:
        print(f"warning: an event file in {run_dir} is dated {delay:.0f} s in the future (clock skew?); TensorBoard "
              "may show the resumed run's file before it and keep the steps after the checkpoint. Fix the clock "
              "or move that file away before resuming.", file=sys.stderr)
    elif delay > 0:
        time.sleep(delay)


class Tracker:
    """TensorBoard writer + windowed scalars + episode/task statistics + progress line.

    Hot-loop calls (``mean``, ``episodes``, ``task_accuracy``) only queue device
    tensors; ``maybe_flush(step)`` writes them every ``log_every`` env steps with
    one host transfer.  ``purge_step`` (on resume) tells TensorBoard to drop the
    events an interrupted run wrote after its last checkpoint, so the resumed run
    has no duplicated steps.
    """

    def __init__(self, run_dir: Path, config: dict, total_timesteps: int, log_every: int, device: torch.device,
                 start_step: int = 0, num_envs: int = 1, accuracy_window: int = 1000, wandb_run=None):
        self.run_dir = Path(run_dir)
        self.wandb_run = wandb_run  # started before the SummaryWriter below: sync_tensorboard patches it
        self.total_timesteps = total_timesteps
        self.log_every = log_every
        self.device = device
        resumed = start_step > 0
        if resumed:
            wait_for_a_later_event_file_name(self.run_dir)
        # On resume, TensorBoard drops what the interrupted run wrote after its checkpoint (steps > start_step).
        self.writer = SummaryWriter(str(self.run_dir), purge_step=start_step + 1 if resumed else None)
        if not resumed:
            self.writer.add_text("hyperparameters", markdown_table(config))
            self.writer.add_custom_scalars(dashboard_layout(config))
        self._means: dict[str, list[torch.Tensor]] = {}
        self._scalars: list[tuple[str, int, torch.Tensor]] = []
        self._episodes: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []
        self.recent_return: float | None = None
        self.last_flush_step = start_step
        self._window_start_time = time.perf_counter()
        self._window_start_step = start_step
        self._start_time = time.perf_counter()
        self._start_step = start_step
        self._last_plain_line = 0.0
        self._last_plain_step: int | None = None
        self._tty = sys.stderr.isatty()
        # Greedy accuracy over the last `accuracy_window` env steps of the current task (image MDP).
        slots = max(1, -(-accuracy_window // num_envs))
        self._accuracy_ring = torch.zeros(slots, device=device)
        self._accuracy_filled = 0
        self._task_return_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._task_episode_count = 0

    # ---- hot-loop calls: queue device tensors, no host sync ----
    def mean(self, tag: str, value: torch.Tensor) -> None:
        """Average ``value`` over the current logging window (e.g. losses/td_loss)."""
        self._means.setdefault(tag, []).append(value.detach().reshape(()).float())

    def scalar(self, tag: str, value: torch.Tensor | float, step: int) -> None:
        value = value.detach().reshape(()).float() if torch.is_tensor(value) else torch.tensor(float(value))
        self._scalars.append((tag, step, value))

    def episodes(self, step: int, returns: torch.Tensor, lengths: torch.Tensor, group: str = "") -> None:
        """Queue the episodes that ended at ``step`` (1-D tensors of their returns and lengths).

        ``group`` (e.g. the current Atari game) adds ``charts/episodic_return/<group>``.
        """
        if returns.numel() == 0:
            return
        self._episodes.append((step, group, returns.detach().float(), lengths.detach().float()))
        self._task_return_sum += returns.sum()
        self._task_episode_count += returns.numel()

    def task_accuracy(self, correct_fraction: torch.Tensor) -> None:
        """Record this step's greedy accuracy (image MDP) for charts/accuracy and task_final_accuracy."""
        self.mean("charts/accuracy", correct_fraction)
        self._accuracy_ring[self._accuracy_filled % len(self._accuracy_ring)] = correct_fraction.float()
        self._accuracy_filled += 1

    def task_switch(self, step: int, finished_task: int, new_task: int) -> None:
        """Close ``finished_task``: its final accuracy and mean episodic return, logged at ``step``."""
        self.close_task(step)
        self._scalars.append(("charts/task_id", step, torch.tensor(float(new_task))))

    def close_task(self, step: int) -> None:
        """Log the current task's final accuracy and mean episodic return (if it had any steps) at ``step``."""
        if self._accuracy_filled:
            filled = min(self._accuracy_filled, len(self._accuracy_ring))
            self._scalars.append(("charts/task_final_accuracy", step, self._accuracy_ring[:filled].mean()))
        if self._task_episode_count:
            self._scalars.append(("charts/task_return", step, self._task_return_sum / self._task_episode_count))
        self._accuracy_filled = 0
        self._task_return_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._task_episode_count = 0

    # ---- flushing ----
    def has_pending(self) -> bool:
        return bool(self._means or self._scalars or self._episodes)

    def maybe_flush(self, step: int, force: bool = False) -> bool:
        if not force and step - self.last_flush_step < self.log_every:
            return False
        self.flush(step)
        return True

    def flush(self, step: int) -> None:
        now = time.perf_counter()
        elapsed = now - self._window_start_time
        if step > self._window_start_step and elapsed > 0:
            self.writer.add_scalar("charts/SPS", (step - self._window_start_step) / elapsed, step)
        self._window_start_time, self._window_start_step = now, step
        mean_tags = list(self._means)
        values = [torch.stack(self._means[tag]).mean().to(self.device) for tag in mean_tags]
        values += [value.to(self.device) for _, _, value in self._scalars]
        host = torch.stack(values).tolist() if values else []  # the one transfer of the window
        for tag, value in zip(mean_tags, host):
            self.writer.add_scalar(tag, value, step)
        # One value per (tag, step): a task switch on a logging step must not write task_id twice.
        latest = {(tag, scalar_step): value for (tag, scalar_step, _), value in zip(self._scalars, host[len(mean_tags):])}
        for (tag, scalar_step), value in latest.items():
            self.writer.add_scalar(tag, value, scalar_step)
        self._means.clear()
        self._scalars.clear()
        self._flush_episodes()
        self.last_flush_step = step
        self._progress(step)

    def _flush_episodes(self) -> None:
        if not self._episodes:
            return
        returns = torch.cat([e[2] for e in self._episodes]).tolist()
        lengths = torch.cat([e[3] for e in self._episodes]).tolist()
        index = 0
        for step, group, episode_returns, _ in self._episodes:
            for _ in range(len(episode_returns)):
                self.writer.add_scalar("charts/episodic_return", returns[index], step)
                self.writer.add_scalar("charts/episodic_length", lengths[index], step)
                if group:
                    self.writer.add_scalar(f"charts/episodic_return/{group}", returns[index], step)
                self.recent_return = returns[index]
                index += 1
        self._episodes.clear()

    def log_dict(self, scalars: dict[str, float], step: int) -> None:
        """Write host floats (e.g. one diagnostics event) at ``step``."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def _progress(self, step: int) -> None:
        rate = (step - self._start_step) / max(time.perf_counter() - self._start_time, 1e-9)
        eta = (self.total_timesteps - step) / rate if rate > 0 else float("inf")
        recent = "n/a" if self.recent_return is None else f"{self.recent_return:.2f}"
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        line = (f"step {step}/{self.total_timesteps} ({100 * step / self.total_timesteps:.1f}%) | "
                f"SPS {rate:.0f} | return {recent} | ETA {eta_text}")
        if self._tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step != self._last_plain_step and (time.perf_counter() - self._last_plain_line >= 30
                                                 or step >= self.total_timesteps):
            # A run's last step is flushed twice (last window, then finish): one line for it.
            print(line, file=sys.stderr, flush=True)
            self._last_plain_line = time.perf_counter()
            self._last_plain_step = step

    def state_dict(self) -> dict:
        """Everything queued but not yet written, so a resumed run logs exactly what an uninterrupted one would."""
        return {
            "means": {tag: torch.stack(values) for tag, values in self._means.items()},
            "scalars": [(tag, step, value) for tag, step, value in self._scalars],
            "episodes": list(self._episodes),
            "accuracy_ring": self._accuracy_ring, "accuracy_filled": self._accuracy_filled,
            "task_return_sum": self._task_return_sum, "task_episode_count": self._task_episode_count,
            "last_flush_step": self.last_flush_step,
            "recent_return": self.recent_return,
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.device
        self._means = {tag: list(values.to(device).unbind()) for tag, values in state["means"].items()}
        self._scalars = [(tag, step, value.to(device)) for tag, step, value in state["scalars"]]
        self._episodes = [(step, group, returns.to(device), lengths.to(device))
                          for step, group, returns, lengths in state["episodes"]]
        self._accuracy_ring = state["accuracy_ring"].to(device)
        self._accuracy_filled = state["accuracy_filled"]
        self._task_return_sum = state["task_return_sum"].to(device)
        self._task_episode_count = state["task_episode_count"]
        self.last_flush_step = state["last_flush_step"]
        self.recent_return = state["recent_return"]

    def close(self, exit_code: int = 0) -> None:
        """Close the event file, then end the W&B run (``exit_code`` != 0: W&B shows it failed)."""
        if self._tty:
            print(file=sys.stderr)
        self.writer.flush()
        self.writer.close()
        if self.wandb_run is not None:  # after the writer: W&B reads the event file's last events
            wandb_tracking.finish(self.wandb_run, exit_code)
            self.wandb_run = None
