"""Run folders, TensorBoard logging and progress display shared by both agents (spec agents.md "Outputs").

What a run folder holds is the contract of ``agents/harness/run_folder.py``; this
module writes its TensorBoard event files.  A ``Tracker`` logs a population of M
runs (spec populations.md; a single run is M = 1): member k writes its own run
folder's event files, as its single run would.

Scalars produced in the hot loop stay on the training device, with a leading member
dim [M]: they are queued and moved to the host in one transfer for the whole
population every ``log_every`` env steps, so logging adds no per-step host-device
synchronisation; the loop over members happens then, writing their event files.
``charts/SPS`` is the rate over the last window, logged from the first window on
(pitfall 12).

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
    "lr_schedule": ("learning rate", "charts/learning_rate"),
    "trac": ("TRAC scale", "optim/trac_scale"),
    "parseval": ("Parseval penalty", "plasticity/parseval_penalty"),
    "c_chain": ("C-CHAIN coefficient and churn loss", ("plasticity/c_chain_coef", "losses/c_chain_loss")),
    "nap": ("NaP norm ratio", "plasticity/nap_norm_ratio"),
    "weight_clip": ("weight-clip fraction", "plasticity/weight_clip_frac"),
    "reset_optimizer": ("optimiser resets", "optim/optimizer_resets"),
    "hare_tortoise": ("hare resets", "plasticity/hare_resets"),
    "reset_layers": ("layer resets", "plasticity/layer_resets"),
    "plasticity_injection_at": ("injections", "plasticity/injections"),
    "plasticity_injection_at_task_switch": ("injections", "plasticity/injections"),
}

#: Values of a method's flag that leave it off (``--reset-optimizer off``, ``--lr-schedule constant``, 0, ...).
OFF_VALUES = (None, False, 0, "", "off", "constant", [])

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
    methods = {title: _exactly(*((tag,) if isinstance(tag, str) else tag))
               for flag, (title, tag) in METHOD_CHARTS.items() if config.get(flag) not in OFF_VALUES}
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


def _member_rows(value: torch.Tensor, num_members: int, device: torch.device) -> torch.Tensor:
    """A copy of ``value`` as [M, n]: the episodes of one env step, one row per member.

    A copy: the env may go on to change its tensors in place (its running returns).
    """
    return value.detach().reshape(num_members, -1).to(device, copy=True)


class Tracker:
    """The TensorBoard logging of a population of M runs (M = 1: a single run): one event file per member.

    Member k writes ``run_dirs[k]`` exactly as a single run would (its own hyperparameters
    text and dashboard, ``purge_step`` on resume).  Hot-loop calls (``mean``, ``scalar``,
    ``episodes``, ``task_accuracy``, ``task_switch``, ``close_task``) take device tensors with a
    leading member dim [M] and only queue them: no host sync.  ``maybe_flush(step)`` writes
    them every ``log_every`` env steps with one host transfer for the whole population, then
    loops over the members' writers.  A member that failed is ``freeze``-d: it is written no
    more, the others go on.
    """

    def __init__(self, run_dirs: list[Path], configs: list[dict], total_timesteps: int, log_every: int,
                 device: torch.device, start_step: int = 0, num_envs: int = 1, accuracy_window: int = 1000,
                 wandb_runs: list | None = None, active: list[bool] | None = None):
        self.run_dirs = [Path(run_dir) for run_dir in run_dirs]
        self.num_members = num_members = len(self.run_dirs)
        if num_members == 0:
            raise ValueError("a population has at least one member (one run dir)")
        if len(configs) != num_members:
            raise ValueError(f"{num_members} run dirs but {len(configs)} configs")
        # Started before the SummaryWriters below: W&B's sync_tensorboard patches them.
        self.wandb_runs = [None] * num_members if wandb_runs is None else list(wandb_runs)
        if len(self.wandb_runs) != num_members:
            raise ValueError(f"{num_members} run dirs but {len(self.wandb_runs)} W&B runs")
        self.active = [True] * num_members if active is None else [bool(on) for on in active]
        if len(self.active) != num_members:
            raise ValueError(f"{num_members} run dirs but {len(self.active)} active flags")
        self.total_timesteps = total_timesteps
        self.log_every = log_every
        self.device = torch.device(device)
        resumed = start_step > 0
        self.writers: list[SummaryWriter | None] = []
        for run_dir, config, on in zip(self.run_dirs, configs, self.active):
            if not on:  # a member that failed before this (resumed) process: its folder stays as it is
                self.writers.append(None)
                continue
            if resumed:
                wait_for_a_later_event_file_name(run_dir)
            # On resume, TensorBoard drops what the interrupted run wrote after its checkpoint (steps > start_step).
            writer = SummaryWriter(str(run_dir), purge_step=start_step + 1 if resumed else None)
            if not resumed:
                writer.add_text("hyperparameters", markdown_table(config))
                writer.add_custom_scalars(dashboard_layout(config))
            self.writers.append(writer)
        self._exit_codes: list[int | None] = [None] * num_members  # set when a member's writer is closed
        # Queued, all on the device, each with the member dim: means [M] per tag; scalars (tag, step,
        # value [M] float64, valid [M] bool or None); episodes (step, group, returns [M, E], lengths [M, E],
        # ended [M, E]).  The first `_episodes_folded` episode entries are in the task's return sums.
        self._means: dict[str, list[torch.Tensor]] = {}
        self._scalars: list[tuple[str, int, torch.Tensor, torch.Tensor | None]] = []
        self._episodes: list[tuple[int, str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._episodes_folded = 0
        self.recent_returns: list[float | None] = [None] * num_members
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
        self._accuracy_ring = torch.zeros(slots, num_members, device=self.device)
        self._accuracy_filled = 0
        self._task_return_sum = torch.zeros(num_members, dtype=torch.float64, device=self.device)
        self._task_episode_count = torch.zeros(num_members, dtype=torch.int64, device=self.device)

    # ---- hot-loop calls: queue device tensors [M], no host sync ----
    def _members(self, value: torch.Tensor, dtype: torch.dtype, copy: bool = False) -> torch.Tensor:
        return value.detach().reshape(self.num_members).to(self.device, dtype, copy=copy)

    def mean(self, tag: str, value: torch.Tensor) -> None:
        """Average ``value`` [M] over the current logging window (e.g. losses/td_loss)."""
        self._means.setdefault(tag, []).append(self._members(value, torch.float32))

    def scalar(self, tag: str, value: torch.Tensor | float, step: int) -> None:
        """Log ``value`` at ``step``: a tensor [M], or a python number that is every member's."""
        self._queue_scalar(tag, step, value)

    def _queue_scalar(self, tag: str, step: int, value: torch.Tensor | float,
                      valid: torch.Tensor | None = None) -> None:
        if torch.is_tensor(value):  # a copy: a method's counter may change in place before the flush
            value = self._members(value, torch.float64, copy=True)
        else:  # a fill, not a copy from pageable host memory (which would sync on CUDA)
            value = torch.full((self.num_members,), float(value), dtype=torch.float64, device=self.device)
        self._scalars.append((tag, step, value, valid))

    def episodes(self, step: int, returns: torch.Tensor, lengths: torch.Tensor, ended: torch.Tensor,
                 group: str = "") -> None:
        """Queue the episodes that ended at ``step``: dense [M, E] returns and lengths, ``ended`` [M, E] bool.

        Entries where ``ended`` is False are ignored.  ``group`` (e.g. the current Atari game)
        adds ``charts/episodic_return/<group>``.
        """
        if returns.numel() == 0 or (ended.device.type == "cpu" and not bool(ended.any())):
            return  # most steps end no episode; on the CPU asking costs no device sync
        rows, device = self.num_members, self.device
        self._episodes.append((step, group, _member_rows(returns, rows, device), _member_rows(lengths, rows, device),
                               _member_rows(ended, rows, device).bool()))

    def task_accuracy(self, correct_fraction: torch.Tensor) -> None:
        """Record this step's greedy accuracy [M] (image MDP) for charts/accuracy and task_final_accuracy."""
        self.mean("charts/accuracy", correct_fraction)
        self._accuracy_ring[self._accuracy_filled % len(self._accuracy_ring)] = self._members(
            correct_fraction, torch.float32)
        self._accuracy_filled += 1

    def task_switch(self, step: int, finished_task: int, new_task: int | torch.Tensor) -> None:
        """Close ``finished_task``: its final accuracy and mean episodic return, logged at ``step``."""
        self.close_task(step)
        self._queue_scalar("charts/task_id", step, new_task)

    def close_task(self, step: int) -> None:
        """Log the current task's final accuracy and mean episodic return at ``step``, per member.

        The accuracy if the task had steps with one; the return for each member that finished
        an episode in it (members may differ in how many they finished).
        """
        if self._accuracy_filled:
            filled = min(self._accuracy_filled, len(self._accuracy_ring))
            self._queue_scalar("charts/task_final_accuracy", step, self._accuracy_ring[:filled].mean(0))
        self._fold_episodes()
        count = self._task_episode_count
        self._queue_scalar("charts/task_return", step, self._task_return_sum / count.clamp(min=1), valid=count > 0)
        self._accuracy_filled = 0
        self._task_return_sum = torch.zeros_like(self._task_return_sum)
        self._task_episode_count = torch.zeros_like(self._task_episode_count)

    def _fold_episodes(self) -> None:
        """Add the queued episodes not yet counted to the task's return sums (a few ops, not one per step)."""
        new = self._episodes[self._episodes_folded:]
        if not new:
            return
        ended = torch.cat([entry[4] for entry in new], dim=1)
        returns = torch.cat([entry[2] for entry in new], dim=1).to(torch.float64)
        self._task_return_sum = self._task_return_sum + torch.where(ended, returns, 0.0).sum(1)
        self._task_episode_count = self._task_episode_count + ended.sum(1)
        self._episodes_folded = len(self._episodes)

    # ---- failed members ----
    def freeze(self, member: int) -> None:
        """Write member ``member`` no more (it failed): its event file ends at the last window written."""
        self.active[member] = False
        if self.writers[member] is not None:
            self.writers[member].flush()

    def close_member(self, member: int, exit_code: int = 0) -> None:
        """Freeze ``member`` and close its event file; its W&B run ends with ``exit_code`` in ``close``.

        (W&B's ``sync_tensorboard`` patch is process-wide and finishing a run takes it back,
        so the members' W&B runs all end in ``close``, after every event file is closed.)
        """
        self.freeze(member)
        self._close_writer(member, exit_code)

    def _close_writer(self, member: int, exit_code: int) -> None:
        writer = self.writers[member]
        if writer is not None:
            writer.flush()
            writer.close()
            self.writers[member] = None
        if self._exit_codes[member] is None:
            self._exit_codes[member] = exit_code

    # ---- flushing ----
    def has_pending(self) -> bool:
        return bool(self._means or self._scalars or self._episodes)

    def maybe_flush(self, step: int, force: bool = False) -> bool:
        if not force and step - self.last_flush_step < self.log_every:
            return False
        self.flush(step)
        return True

    def flush(self, step: int) -> None:
        """Write everything queued: one host transfer for the population, then each active member's writer."""
        now = time.perf_counter()
        elapsed = now - self._window_start_time
        # Each member's env steps per second (what its single run would log); the same for every member.
        sps = (step - self._window_start_step) / elapsed if step > self._window_start_step and elapsed > 0 else None
        self._window_start_time, self._window_start_step = now, step
        self._fold_episodes()
        mean_tags = list(self._means)
        rows = [torch.stack(self._means[tag]).mean(0).to(torch.float64) for tag in mean_tags]
        rows += [value for _, _, value, _ in self._scalars]
        masked = [index for index, (_, _, _, valid) in enumerate(self._scalars) if valid is not None]
        rows += [self._scalars[index][3].to(torch.float64) for index in masked]
        blocks = [torch.stack(rows)] if rows else []
        widths = [entry[2].shape[1] for entry in self._episodes]
        if self._episodes:
            for field in (2, 3, 4):  # returns, lengths, ended: [sum E, M]
                blocks.append(torch.cat([entry[field] for entry in self._episodes], dim=1).to(torch.float64).T)
        host = torch.cat(blocks).tolist() if blocks else []  # the one transfer of the window
        host_means, host = host[:len(mean_tags)], host[len(mean_tags):]
        host_scalars, host = host[:len(self._scalars)], host[len(self._scalars):]
        host_valid, host = dict(zip(masked, host[:len(masked)])), host[len(masked):]
        total = sum(widths)
        returns, lengths, ended = host[:total], host[total:2 * total], host[2 * total:]
        for member, writer in enumerate(self.writers):
            if writer is None or not self.active[member]:
                continue
            if sps is not None:
                writer.add_scalar("charts/SPS", sps, step)
            for tag, values in zip(mean_tags, host_means):
                writer.add_scalar(tag, values[member], step)
            # One value per (tag, step): a task switch on a logging step must not write task_id twice.
            latest = {}
            for index, ((tag, scalar_step, _, _), values) in enumerate(zip(self._scalars, host_scalars)):
                if index not in host_valid or host_valid[index][member]:
                    latest[(tag, scalar_step)] = values[member]
            for (tag, scalar_step), value in latest.items():
                writer.add_scalar(tag, value, scalar_step)
            column = 0
            for (episode_step, group, *_), width in zip(self._episodes, widths):
                for index in range(column, column + width):
                    if ended[index][member]:
                        value = returns[index][member]
                        writer.add_scalar("charts/episodic_return", value, episode_step)
                        writer.add_scalar("charts/episodic_length", lengths[index][member], episode_step)
                        if group:
                            writer.add_scalar(f"charts/episodic_return/{group}", value, episode_step)
                        self.recent_returns[member] = value
                column += width
        self._means.clear()
        self._scalars.clear()
        self._episodes.clear()
        self._episodes_folded = 0
        self.last_flush_step = step
        self._progress(step)

    def log_dict(self, scalars: dict[str, torch.Tensor | list[float] | float], step: int) -> None:
        """Write one event (e.g. diagnostics) at ``step``: per tag a tensor [M], a list of M floats or one float.

        The tensors move to the host in one transfer (one per device they are on).
        """
        values: dict[str, list[float]] = {}
        on_device: dict[torch.device, list[str]] = {}
        for tag, value in scalars.items():
            if torch.is_tensor(value):
                on_device.setdefault(value.device, []).append(tag)
            elif isinstance(value, (list, tuple)):
                if len(value) != self.num_members:
                    raise ValueError(f"{tag}: {len(value)} values for {self.num_members} members")
                values[tag] = [float(v) for v in value]
            else:  # one number: every member's
                values[tag] = [float(value)] * self.num_members
        for tags in on_device.values():
            stacked = torch.stack([scalars[tag].detach().reshape(self.num_members).to(torch.float64) for tag in tags])
            values.update(zip(tags, stacked.tolist()))
        for member, writer in enumerate(self.writers):
            if writer is None or not self.active[member]:
                continue
            for tag in scalars:  # in the caller's order
                writer.add_scalar(tag, values[tag][member], step)

    def _progress(self, step: int) -> None:
        rate = (step - self._start_step) / max(time.perf_counter() - self._start_time, 1e-9)
        eta = (self.total_timesteps - step) / rate if rate > 0 else float("inf")
        recent = [value for value, on in zip(self.recent_returns, self.active) if on and value is not None]
        recent_text = "n/a" if not recent else f"{sum(recent) / len(recent):.2f}"
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        members = self.num_members
        if members == 1:
            sps_text, return_text = f"SPS {rate:.0f}", f"return {recent_text}"
        else:  # the population: its aggregate rate, and the mean recent return of the active members
            sps_text = f"SPS {members * rate:.0f} ({members} x {rate:.0f})"
            return_text = f"return {recent_text} (mean of {len(recent)})"
        line = (f"step {step}/{self.total_timesteps} ({100 * step / self.total_timesteps:.1f}%) | "
                f"{sps_text} | {return_text} | ETA {eta_text}")
        if failed := self.active.count(False):
            line += f" | {failed}/{members} failed"
        if self._tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step != self._last_plain_step and (time.perf_counter() - self._last_plain_line >= 30
                                                 or step >= self.total_timesteps):
            # A run's last step is flushed twice (last window, then finish): one line for it.
            print(line, file=sys.stderr, flush=True)
            self._last_plain_line = time.perf_counter()
            self._last_plain_step = step

    def state_dict(self) -> dict:
        """Everything queued but not yet written, so a resumed population logs exactly what an uninterrupted one would."""
        return {
            "num_members": self.num_members,
            "means": {tag: torch.stack(values) for tag, values in self._means.items()},  # [n, M]
            "scalars": [(tag, step, value, valid) for tag, step, value, valid in self._scalars],
            "episodes": list(self._episodes),
            "episodes_folded": self._episodes_folded,
            "accuracy_ring": self._accuracy_ring, "accuracy_filled": self._accuracy_filled,
            "task_return_sum": self._task_return_sum, "task_episode_count": self._task_episode_count,
            "last_flush_step": self.last_flush_step,
            "recent_returns": list(self.recent_returns),
            "active": list(self.active),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``; members inactive in it are frozen (and their event files closed)."""
        if state["num_members"] != self.num_members:
            raise ValueError(f"the tracker state is of {state['num_members']} members, this population has "
                             f"{self.num_members}")
        device = self.device

        def here(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.to(device)

        self._means = {tag: list(values.to(device).unbind()) for tag, values in state["means"].items()}
        self._scalars = [(tag, step, here(value), here(valid)) for tag, step, value, valid in state["scalars"]]
        self._episodes = [(step, group, here(returns), here(lengths), here(ended))
                          for step, group, returns, lengths, ended in state["episodes"]]
        self._episodes_folded = state["episodes_folded"]
        self._accuracy_ring = state["accuracy_ring"].to(device)
        self._accuracy_filled = state["accuracy_filled"]
        self._task_return_sum = state["task_return_sum"].to(device)
        self._task_episode_count = state["task_episode_count"].to(device)
        self.last_flush_step = state["last_flush_step"]
        self.recent_returns = list(state["recent_returns"])
        for member, on in enumerate(state["active"]):
            if not on and self.active[member]:
                self.close_member(member, exit_code=1)

    def close(self, exit_code: int | list[int] = 0) -> None:
        """Close every open event file, then end the W&B runs (an exit code != 0: W&B shows that run failed).

        ``exit_code``: one for all members, or one per member; a member closed before keeps its own.
        """
        if self._tty:
            print(file=sys.stderr)
        codes = [exit_code] * self.num_members if isinstance(exit_code, int) else list(exit_code)
        if len(codes) != self.num_members:
            raise ValueError(f"{len(codes)} exit codes for {self.num_members} members")
        for member in range(self.num_members):
            self._close_writer(member, codes[member])
        for member, run in enumerate(self.wandb_runs):  # after the writers: W&B reads the event files' last events
            if run is not None:
                wandb_tracking.finish(run, self._exit_codes[member])
                self.wandb_runs[member] = None
