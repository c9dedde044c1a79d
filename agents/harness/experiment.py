"""Everything around the algorithm that both agents share: set-up, resume, diagnostics events, checkpoints.

An agent file keeps the algorithm (network, targets, loss, update, schedules) and
calls into this module for the plumbing, one line each:

    experiment.resolve_args(args, agent="dqn")                  # --resume: the run's saved flags; defaults
    with experiment.start(args, agent="dqn", categorical=...) as run:  # validate, seed, folder, env, buffer
        global_step, obs = run.begin(q_network=..., optimizer=..., ...)  # fresh start or exact resume
        ...                                                     # the loop
        run.evaluate(global_step, q_network.q_values)           # --eval-every: greedy episodes (evaluation.py)
        run.end_iteration(global_step, obs)                     # logs, checkpoints, Ctrl-C

Leaving the ``with`` block through an unexpected exception marks the run failed in
its status.json (a bug keeps its traceback; bad input is one ``error:`` line).
"""

from __future__ import annotations

import ctypes
import dataclasses
import platform
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import tyro

from agents.harness import run_folder, wandb_tracking
from agents.harness.checkpoint import (
    NonFiniteLossError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_model,
    set_rng_state,
)
from agents.harness.config import (
    SEED_PLACEHOLDER,
    ConfigError,
    resolve_family_defaults,
    resolve_replay_ratio,
    run_tag,
    setting_of,
    validate,
)
from agents.harness.tracking import Tracker, args_to_dict
from envs.factory import AgentEnv, env_family
from envs.replay_buffer import make_replay_buffer, planned_replay_nbytes
from plasticity.intervention import crossed
from plasticity.networks import check_torso, default_network, init_generators, torso_precision
from plasticity.streams import MemberRandom, stream_seed

__all__ = ["stream_seed"]  # re-exported: the evaluation and the benchmarks seed their streams with it

BUFFER_CHECKPOINT_AUTO_LIMIT = 2 * 1024**3


def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


def updates_due(before: int, after: int, train_frequency: int, learning_starts: int, gradient_steps: int = 1) -> int:
    """Gradient updates to run for the env steps (before, after]: one training iteration of ``gradient_steps``
    updates at every multiple of ``train_frequency`` after learning starts (methods-v2.md §3)."""
    if after <= learning_starts:
        return 0
    return gradient_steps * (after // train_frequency - max(before, learning_starts) // train_frequency)


def updates_done(global_step: int, train_frequency: int, learning_starts: int, gradient_steps: int = 1) -> int:
    return updates_due(0, global_step, train_frequency, learning_starts, gradient_steps)


def cli(args_type: type, main: Callable, argv: list[str] | None = None) -> None:
    """Parse flags with tyro (``argv``: default the command line) and run ``main``.

    Bad flags or inputs: one ``error:`` line, exit status 2.  A NaN loss: its
    message, exit status 1.  Anything else (a bug) keeps its traceback; the run's
    ``with`` block has marked its status.json failed.
    """
    args = tyro.cli(args_type, args=argv)
    try:
        main(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def keep_freed_host_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc reuse freed host memory instead of handing it back to the OS at every free.

    Every CPU update allocates and frees tensors of a few MB (activations, a 6 MB
    gradient of the Nature CNN's FC layer).  With glibc's defaults those come from fresh
    ``mmap`` pages and are returned on free, so each update takes hundreds of page faults
    (~1 ms, 5-7% of a Nature-CNN update on a 2-core VM; the role jemalloc/tcmalloc play in
    PyTorch's CPU tuning guide).  Raising both thresholds keeps such blocks in the heap.
    Returns whether the setting applied (glibc on Linux only; elsewhere a no-op).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                            trim_threshold))
    except (OSError, AttributeError):
        return False


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); None where it cannot tell (not Linux)."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def epsilon_greedy(q_values: torch.Tensor, epsilon: float, random: MemberRandom) -> torch.Tensor:
    """Per member and env: a uniformly random action with probability epsilon, else the greedy one.

    ``q_values [M, E, actions]``; member k's draws come from its own stream of ``random``.
    """
    _members, num_envs, num_actions = q_values.shape
    explore_draw, action_draw = random.uniform(2, num_envs).to(q_values.device).unbind(1)  # one request
    return torch.where(explore_draw < epsilon, (action_draw * num_actions).long(), q_values.argmax(dim=2))


def _saved_config(run_dir: Path, agent: str) -> dict:
    try:
        config = run_folder.read_config(run_dir)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--resume {run_dir}: {error}") from None
    if config.get("agent", agent) != agent:
        raise ConfigError(f"--resume {run_dir}: that run was made by agents/{config['agent']}.py; "
                          f"resume it with that agent")
    if not run_folder.has_checkpoint(run_dir):
        raise ConfigError(f"--resume {run_dir}: no {run_folder.CHECKPOINT_FILE} there; the run stopped before its "
                          "first checkpoint, start it again without --resume")
    return config


def resolve_args(args, agent: str) -> None:
    """Make ``args`` (in place) the flags the run trains with, before anything is built.

    ``--resume DIR``: every flag comes from DIR's config.json (the command line's other
    flags are ignored), the run folder is DIR.  DIR may be any member's folder of a
    population: the whole population resumes, from its lead (member 0) folder.  Then the
    environment family's defaults fill the ``None`` fields and ``--exp-name`` defaults to the agent.
    """
    if args.resume:
        asked_seeds = args.num_seeds
        run_dir = run_folder.population_lead(Path(args.resume))
        config = _saved_config(run_dir, agent)
        population = config.get("population") or {}
        saved_seeds = int(population.get("num_seeds", 1))
        if asked_seeds != 1 and asked_seeds != saved_seeds:
            raise ConfigError(f"--resume {args.resume}: that run is a population of {saved_seeds} seed(s); resume "
                              f"it without --num-seeds (or with --num-seeds {saved_seeds})")
        print(f"resuming {run_dir} with its saved {run_folder.CONFIG_FILE} (other flags are ignored)",
              file=sys.stderr)
        for f in dataclasses.fields(args):
            if f.name in config:
                setattr(args, f.name, config[f.name])
        args.num_seeds = saved_seeds
        args.seed = int(population.get("seed", args.seed))
        args.resume, args.runs_dir, args.run_name = str(run_dir), str(run_dir.parent), run_dir.name
        if args.cuda and not torch.cuda.is_available():
            print("note: this run trained on CUDA and no CUDA device is available here; continuing on the CPU",
                  file=sys.stderr)
            args.cuda = False
    try:
        family = env_family(args.env_id)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    resolve_family_defaults(args, family == "atari")
    if not args.resume:
        resolve_replay_ratio(args)  # --replay-ratio: F and G (a resumed run's config holds them)
    if not args.exp_name:
        args.exp_name = agent


def _gib(nbytes: float) -> str:
    return f"{nbytes / 1024**3:.2f} GiB"


def available_host_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes (Linux), or None where it cannot tell."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def member_run_name(run_name: str, seed: int, members: int) -> str:
    """The folder of the member with ``seed`` under ``--run-name``: ``{seed}`` in it is replaced by the seed;
    without it, a population's members get ``<run-name>-seed<seed>`` (a single run: ``run_name`` itself)."""
    if SEED_PLACEHOLDER in run_name:
        return run_name.replace(SEED_PLACEHOLDER, str(seed))
    return run_name if members == 1 else f"{run_name}-seed{seed}"


class Run:
    """One population of training runs (``--num-seeds N``; a single run is N = 1).

    Member k has seed ``--seed`` + k and its own run folder (``run_dirs[k]``); the lead
    (member 0) folder holds the population's checkpoint.  Built from final args
    (``resolve_args`` has run): each step below may reject bad input, and the run folders
    are made only after all of them, so bad input leaves nothing on disk.
    """

    def __init__(self, args, agent: str, categorical: bool):
        self.args, self.agent, self.categorical = args, agent, categorical
        self.resumed = bool(args.resume)
        self.is_atari = env_family(args.env_id) == "atari"
        validate(args, is_atari=self.is_atari, categorical=categorical)
        self.setting = setting_of(args, is_atari=self.is_atari, categorical=categorical)  # for the methods
        self.seeds = [args.seed + k for k in range(args.num_seeds)]
        self.members = len(self.seeds)
        self.device = self._seed_and_pick_device()
        self.run_names, self.run_dirs = self._name_the_folders()
        self.run_name, self.run_dir = self.run_names[0], self.run_dirs[0]
        self.envs = self._make_env()
        self._check_torso()
        self._plan_memory()
        self.buffer = self._make_buffer()
        self.evaluator = self._make_evaluator()
        if not self.resumed:
            for k, run_dir in enumerate(self.run_dirs):
                run_dir.mkdir(parents=True, exist_ok=True)
                run_folder.write_config(run_dir, self._config(k))
        #: Each member's exploration stream; the networks' initial weights come from ``init_generators``.
        self.action_random = MemberRandom([stream_seed(seed, "actions") for seed in self.seeds], self.device)
        self.init_generators = init_generators(self.seeds)
        self.tracker: Tracker | None = None
        self.stateful: dict = {}
        self.failed = [False] * self.members
        self._stop_requested = False
        self._previous_handlers: dict = {}
        self._good_step = -1  # last step at which every live member's loss was known finite
        self._nonfinite = torch.zeros(self.members, dtype=torch.bool, device=self.device)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, error, traceback) -> bool:
        """An unexpected exception (a bug, a second Ctrl-C) marks a begun run failed; bad input and NaN did already."""
        if error is not None and self.tracker is not None and not isinstance(error, (ConfigError,
                                                                                     NonFiniteLossError)):
            self._restore_signal_handlers()
            self._write_statuses(run_folder.FAILED, -1, repr(error))
            self.tracker.close(exit_code=1)  # the events written so far stay readable; W&B shows the run failed
        return False

    # ---- set-up steps, in order ----
    def _seed_and_pick_device(self) -> torch.device:
        """Seeding (spec agents.md): python, numpy, torch; networks, env, buffer and actions get their own streams."""
        args = self.args
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        device = torch.device("cuda" if args.cuda else "cpu")
        keep_freed_host_memory()
        if args.bf16 and device.type == "cpu" and cpu_has_native_bf16() is False:
            print("note: this CPU has no native bfloat16 (avx512_bf16/amx_bf16): --bf16 is emulated and slower "
                  "than float32 here; drop it", file=sys.stderr)
        return device

    def _name_the_folders(self) -> tuple[list[str], list[Path]]:
        args = self.args
        if self.resumed:
            lead = Path(args.resume)
            config = run_folder.read_config(lead)
            names = (config.get("population") or {}).get("members") or [lead.name]
        else:
            now = int(time.time())
            names = [run_folder.run_name(args.env_id, self.agent, run_tag(args), seed, now) for seed in self.seeds]
            if args.run_name:
                names = [member_run_name(args.run_name, seed, self.members) for seed in self.seeds]
        run_dirs = [Path(args.runs_dir) / name for name in names]
        if not self.resumed:
            for run_dir in run_dirs:
                if run_folder.has_checkpoint(run_dir):
                    raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                                      "or choose another --run-name")
                if run_folder.event_files(run_dir):
                    raise ConfigError(f"{run_dir} holds the event files of a run that stopped before its first "
                                      "checkpoint; delete that folder or choose another --run-name")
        return names, run_dirs

    def _make_env(self) -> AgentEnv:
        try:
            return AgentEnv.make(self.args, self.device, seeds=self.seeds)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None

    def _check_torso(self) -> None:
        args, obs_shape = self.args, self.envs.obs_shape
        network = default_network(obs_shape) if args.network == "auto" else args.network
        try:
            check_torso(network, obs_shape, hidden_sizes=args.hidden_sizes, activation=args.activation,
                        activation_width=args.activation_width)
        except ValueError as error:
            advice = "choose another --network" if "--activation" not in str(error) else "change the widths"
            raise ConfigError(f"{error} ({args.env_id}); {advice}") from None

    def _plan_memory(self) -> None:
        """Spec populations.md §4.3: every member's replay buffer is sized before anything is allocated."""
        args = self.args
        per_member = planned_replay_nbytes(self.envs.obs_shape, args.buffer_size, args.num_envs)
        total = per_member * self.members
        device = self._buffer_device()
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            where, available = f"free memory of {device}", free
        else:
            where, available = "available host memory", available_host_memory()
        if available is not None and total > 0.9 * available:
            raise ConfigError(
                f"the replay buffers need {_gib(total)} ({self.members} member(s) x {_gib(per_member)} for "
                f"--buffer-size {args.buffer_size}) but the {where} is {_gib(available)}; lower --buffer-size or "
                f"--num-seeds (at most {max(int(0.9 * available // max(per_member, 1)), 0)} members of this size fit)")

    def _make_buffer(self):
        try:
            # Batches come back on the training device wherever the buffer lives.
            return make_replay_buffer(self.envs.obs_shape, self.args.buffer_size, self.args.num_envs,
                                      self._buffer_device(), seeds=[stream_seed(s, "replay") for s in self.seeds],
                                      sample_device=self.device)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def _make_evaluator(self):
        """The greedy evaluation's own envs (--eval-every), or None."""
        if not self.args.eval_every:
            return None
        from agents.harness.evaluation import Evaluator  # here: evaluation imports this module

        try:
            return Evaluator(self.args, self.device, seeds=self.seeds)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None

    def _config(self, member: int) -> dict:
        """Member ``member``'s config.json: the single run it equals (its own seed), and its population."""
        config = {**args_to_dict(self.args), "agent": self.agent, "run_name": self.run_names[member],
                  "seed": self.seeds[member], "num_seeds": 1}
        if self.members > 1:
            config["population"] = {"seed": self.seeds[0], "num_seeds": self.members, "member": member,
                                    "lead": self.run_names[0], "members": list(self.run_names)}
        return config

    def _buffer_device(self) -> torch.device:
        args = self.args
        if args.buffer_device != "auto":
            return torch.device(args.buffer_device)
        if self.device.type != "cuda":
            return self.device
        per_transition = planned_replay_nbytes(self.envs.obs_shape, 1, 1) * self.members
        free, _total = torch.cuda.mem_get_info(self.device)
        # Keep the buffer on the GPU only when it leaves most of the memory for training.
        return self.device if per_transition * args.buffer_size < 0.6 * free else torch.device("cpu")

    def _write_statuses(self, status: str, global_step: int, message: str = "") -> None:
        """The same status for every live member (a failed member keeps its own)."""
        for k, run_dir in enumerate(self.run_dirs):
            if not self.failed[k]:
                run_folder.write_status(run_dir, status, global_step, self.args.total_timesteps, message)

    # ---- start / resume ----
    def begin(self, **stateful) -> tuple[int, torch.Tensor]:
        """Register the objects a checkpoint holds; return (global_step, current obs [M, E, ...]), fresh or resumed."""
        self.stateful = stateful
        global_step = 0
        if self.resumed:
            try:
                # On the CPU: RNG states must stay CPU tensors; every load_state_dict moves the rest.
                state = load_checkpoint(self.run_dir, map_location="cpu")
            except (FileNotFoundError, ValueError) as error:
                raise ConfigError(str(error)) from None
            for name, obj in stateful.items():
                obj.load_state_dict(state[name])
            global_step = int(state["global_step"])
            restarted_obs = self.envs.load_state_dict(state["env"], resume_step=global_step)
            if "buffer" in state:
                self.buffer.load_state_dict(state["buffer"])
            else:
                print("note: the checkpoint holds no replay buffer; it refills from the resumed step", file=sys.stderr)
            self.action_random.load_state_dict(state["action_random"])
            set_rng_state(state["rng"])
            self.failed = list(state.get("failed", self.failed))
            obs = state["obs"].to(self.device) if restarted_obs is None else restarted_obs
            self.tracker = self._make_tracker(global_step)
            self.tracker.load_state_dict(state["tracker"])
            self._nonfinite = torch.tensor(self.failed, dtype=torch.bool, device=self.device)
            self._good_step = global_step
        else:
            obs = self.envs.reset(seeds=self.seeds)
            self.tracker = self._make_tracker(0)
        self._write_statuses(run_folder.RUNNING, global_step)
        self._install_signal_handlers()
        return global_step, obs

    def _make_tracker(self, start_step: int) -> Tracker:
        args = self.args
        configs = [self._config(k) for k in range(self.members)]
        # --track: W&B starts first, so its sync_tensorboard patch sees the Tracker's SummaryWriters.
        wandb_runs = [wandb_tracking.start(run_dir, config, project=args.wandb_project_name,
                                           entity=args.wandb_entity, name=config["run_name"], resumed=self.resumed)
                      for run_dir, config in zip(self.run_dirs, configs)] if args.track else None
        return Tracker(self.run_dirs, configs, args.total_timesteps, args.log_every, self.device,
                       start_step=start_step, num_envs=args.num_envs, accuracy_window=args.log_every,
                       wandb_runs=wandb_runs, active=[not failed for failed in self.failed])

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            if self._stop_requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            print("\nstopping after this step; a checkpoint will be written (Ctrl-C again to abort)", file=sys.stderr)
            self._stop_requested = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous_handlers[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not in the main thread (e.g. some test runners): no handler
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def request_stop(self) -> None:
        """Stop cleanly at the end of the current iteration (what SIGINT/SIGTERM do)."""
        self._stop_requested = True

    # ---- per-step bookkeeping ----
    def watch_loss(self, loss: torch.Tensor) -> None:
        """Remember (on device, no sync) which members' losses [M] were NaN/inf; checked at every log flush."""
        self._nonfinite |= ~torch.isfinite(loss.detach())

    def record(self, global_step: int, step) -> None:
        """Log what one env step produced (episodes, accuracy, task switches); ``step`` is an AgentEnv.Step."""
        tracker = self.tracker
        tracker.episodes(global_step, step.episode_returns, step.episode_lengths, step.episode_ended,
                         group=step.group)
        if step.greedy_correct is not None:
            tracker.task_accuracy(step.greedy_correct)
        if step.task_id != step.previous_task_id:
            tracker.task_switch(global_step, step.previous_task_id, step.task_id)

    def updates(self, before: int, global_step: int) -> range:
        """Indices (1-based) of the gradient updates due for the env steps (before, global_step]."""
        args = self.args
        schedule = (args.train_frequency, args.learning_starts, args.gradient_steps)
        return range(updates_done(before, *schedule) + 1, updates_done(global_step, *schedule) + 1)

    def target_sync_due(self, before: int, global_step: int) -> bool:
        """A hard target sync in the env steps (before, global_step]: every --target-network-frequency env steps
        after learning starts; never when the tortoise is the target (--hare-tortoise-target tortoise)."""
        args = self.args
        if args.hare_tortoise and args.hare_tortoise_target == "tortoise":
            return False
        return global_step > args.learning_starts and crossed(before, global_step, args.target_network_frequency)

    def log_update(self, loss: torch.Tensor, q_taken: torch.Tensor) -> None:
        """losses/td_loss and losses/q_values per member over the window, and the NaN watch (no host sync).

        ``loss [M]`` and ``q_taken [M, B]``.
        """
        self.watch_loss(loss)
        self.tracker.mean("losses/td_loss", loss)
        self.tracker.mean("losses/q_values", q_taken.mean(dim=1))

    def mixed_precision(self):
        """Context for an update's forward passes: the torsos compute in bfloat16 with --bf16, else a no-op."""
        return torso_precision(torch.bfloat16 if self.args.bf16 else None)

    def end_iteration(self, global_step: int, obs: torch.Tensor, epsilon: float | None = None, step=None,
                      interventions=None) -> bool:
        """Periodic charts, log flush, NaN check, checkpoint on cadence or on request. False: stop the loop."""
        args = self.args
        before = global_step - args.num_envs
        if crossed(before, global_step, args.log_every):
            if epsilon is not None:
                self.tracker.scalar("charts/epsilon", epsilon, global_step)
            if step is not None:
                self.tracker.scalar("charts/task_id", step.task_id, global_step)
            if interventions is not None:
                for tag, value in interventions.scalars().items():
                    self.tracker.scalar(tag, value, global_step)
        # A periodic checkpoint first writes every queued scalar, so a crash after it can only have
        # written steps beyond the checkpoint -- exactly what the resumed run purges and writes again.
        periodic = crossed(before, global_step, args.checkpoint_every)
        if self.tracker.maybe_flush(global_step, force=periodic):
            self._check_finite(global_step)
        if periodic:
            self.checkpoint(global_step, obs)
        if self._stop_requested:
            self.checkpoint(global_step, obs)
            self.tracker.close()
            self._close_envs()
            self._restore_signal_handlers()
            self._write_statuses(run_folder.INTERRUPTED, global_step)
            print(f"interrupted at step {global_step}; continue with --resume {self.run_dir}", file=sys.stderr)
            return False
        return True

    def _check_finite(self, global_step: int) -> None:
        """Members whose loss became NaN/inf fail (status, last good checkpoint) and are frozen; the others go on.

        One host transfer of an [M] bool.  When no member is left, the run stops (exit status 1).
        """
        nonfinite = self._nonfinite.tolist()
        newly = [k for k in range(self.members) if nonfinite[k] and not self.failed[k]]
        if newly:
            args = self.args
            last = (f"the last good checkpoint (step {self._good_step}) is {run_folder.checkpoint_path(self.run_dir)}"
                    if self._good_step >= 0 else "no checkpoint was written before it")
            message = (f"the loss became NaN/inf before step {global_step}; {last}. Try a lower --learning-rate, "
                       "a regularised network (--layer-norm, --l2) or check the rewards.")
            for k in newly:
                self.failed[k] = True
                self.tracker.close_member(k, exit_code=1)  # its event file ends here; W&B (--track) shows it failed
                run_folder.write_status(self.run_dirs[k], run_folder.FAILED, global_step, args.total_timesteps,
                                        message)
                if self.members > 1:
                    print(f"member {k} (seed {self.seeds[k]}) failed: {message} The other members go on.",
                          file=sys.stderr)
            if all(self.failed):
                self.tracker.close(exit_code=1)
                self._restore_signal_handlers()
                raise NonFiniteLossError(message)
        self._good_step = global_step

    def checkpoint(self, global_step: int, obs: torch.Tensor) -> None:
        """Write the population's checkpoint.pt in the lead folder -- after the NaN check, so it is a good state."""
        self._check_finite(global_step)
        args = self.args
        state = {name: obj.state_dict() for name, obj in self.stateful.items()}
        state.update(global_step=global_step, obs=obs, env=self.envs.state_dict(), rng=rng_state(),
                     action_random=self.action_random.state_dict(), tracker=self.tracker.state_dict(),
                     failed=list(self.failed), seeds=list(self.seeds))
        include_buffer = args.checkpoint_buffer == "always" or (
            args.checkpoint_buffer == "auto" and self.buffer.nbytes <= BUFFER_CHECKPOINT_AUTO_LIMIT)
        if include_buffer:
            state["buffer"] = self.buffer.state_dict()
        save_checkpoint(self.run_dir, state)
        self._good_step = global_step

    def finish(self, global_step: int, obs: torch.Tensor) -> None:
        self.tracker.close_task(global_step)
        if self.tracker.last_flush_step != global_step or self.tracker.has_pending():
            self.tracker.flush(global_step)
        self._check_finite(global_step)
        self.checkpoint(global_step, obs)
        if self.args.save_model:
            for k, run_dir in enumerate(self.run_dirs):
                if not self.failed[k]:
                    save_model(run_dir, self.stateful["q_network"], member=k)
        self.tracker.close()
        self._close_envs()
        self._restore_signal_handlers()
        self._write_statuses(run_folder.COMPLETED, global_step)

    def _close_envs(self) -> None:
        self.envs.close()
        if self.evaluator is not None:
            self.evaluator.close()

    # ---- greedy evaluation (--eval-every) ----
    def evaluate(self, global_step: int, q_values: Callable) -> None:
        """Greedy episodes on envs of their own when --eval-every is crossed; training's streams stay untouched.

        ``q_values(obs [M, E, ...])`` is the online network's Q-values; logged per member:
        charts/eval_return and the family's extras (agents/harness/evaluation.py), and with
        --capture-video videos/eval_<step>.mp4 in each member's folder.
        """
        args = self.args
        if self.evaluator is None or not crossed(global_step - args.num_envs, global_step, args.eval_every):
            return
        number = global_step // args.eval_every  # this is the run's number-th evaluation
        videos = ([run_folder.video_path(run_dir, f"eval_{global_step}") for run_dir in self.run_dirs]
                  if args.capture_video and number % args.video_every == 0 else None)
        results = self.evaluator.evaluate(q_values, global_step, follow=self.envs.env, video_paths=videos)
        scalars: dict[str, list[float]] = {}
        for k, result in enumerate(results):
            for tag, value in result.scalars().items():
                scalars.setdefault(tag, [float("nan")] * self.members)[k] = value
        self.tracker.log_dict(scalars, global_step)

    # ---- diagnostics (spec diagnostics.md "When and on what") ----
    def diagnose(self, before: int, global_step: int, diagnostics, td_targets: Callable, td_loss: Callable,
                 clip_range: tuple[float, float] | None = None) -> None:
        """Run the diagnostics whose cadence was crossed, on a probe batch per member from its replay buffer.

        ``td_targets(batch)`` and ``td_loss(batch)`` are the agent's own target and loss functions
        (per member: ``[M, B]`` and ``[M]``).  One host transfer for all members per event (the tracker's).
        """
        args = self.args
        due = {name: crossed(before, global_step, getattr(args, f"{name}_every"))
               for name in ("diag", "entk", "hessian", "probe")}
        if global_step <= args.learning_starts or not any(due.values()) or len(self.buffer) < 2:
            return
        batch = self.buffer.sample(min(args.diag_batch, len(self.buffer)))
        scalars: dict[str, torch.Tensor] = {}
        if due["diag"]:
            with torch.no_grad():
                targets = td_targets(batch)
            scalars.update(diagnostics.measure(batch.obs, targets, batch.actions, clip_range=clip_range))
        if due["entk"]:
            scalars.update(diagnostics.entk(batch.obs, batch.actions))
        if due["hessian"]:
            scalars.update(diagnostics.hessian_max_eig(lambda: td_loss(batch)))
        if due["probe"]:
            scalars.update(diagnostics.probe_fit_loss(batch.obs))
        self.tracker.log_dict(scalars, global_step)


def start(args, agent: str, categorical: bool = False) -> Run:
    """Validate the final flags, seed everything, create the run folders, the env and the replay buffers.

    ``categorical``: whether the value head is categorical, read from the final args
    (``resolve_args`` has run, so on ``--resume`` those are the run's saved flags).
    """
    return Run(args, agent, categorical)
