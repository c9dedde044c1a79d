"""Everything around the algorithm that both agents share: set-up, resume, diagnostics events, checkpoints.

An agent file keeps the algorithm (network, targets, loss, update, schedules) and
calls into this module for the plumbing, one line each:

    run = experiment.start(args, agent="dqn", categorical=...)   # validate, seed, run folder, env, buffer
    global_step, obs = run.begin(q_network=..., optimizer=..., ...)  # fresh start or exact resume
    ...                                                          # the loop
    run.end_iteration(global_step, obs)                          # logs, checkpoints, Ctrl-C
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

from agents.harness.checkpoint import (
    CHECKPOINT_FILE,
    NonFiniteLossError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from agents.harness.config import ConfigError, resolve_family_defaults, run_tag, validate_common
from agents.harness.tracking import (
    CONFIG_FILE,
    EVENT_FILE_PREFIX,
    Tracker,
    args_to_dict,
    read_json,
    write_json,
    write_status,
)
from envs.factory import AgentEnv, env_family
from envs.replay_buffer import is_frame_stack, make_replay_buffer
from plasticity.networks import torso_precision

BUFFER_CHECKPOINT_AUTO_LIMIT = 2 * 1024**3


def stream_seed(seed: int, purpose: str) -> int:
    """A seed for one random stream of a run (actions, replay sampling), independent of the others.

    The env is seeded with ``seed`` itself; generators on the same device seeded alike would
    draw the same numbers -- e.g. exploratory actions equal to the env's next labels.
    """
    key = [int(seed), *purpose.encode()]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] & (2**63 - 1))


def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


def crossed(before: int, after: int, every: int) -> bool:
    """True when a multiple of ``every`` lies in (before, after] (cadences in env steps with num_envs > 1)."""
    return every > 0 and after // every > before // every


def updates_due(before: int, after: int, train_frequency: int, learning_starts: int) -> int:
    """Gradient updates to run for the env steps (before, after]: one per ``train_frequency`` after learning starts."""
    if after <= learning_starts:
        return 0
    return after // train_frequency - max(before, learning_starts) // train_frequency


def updates_done(global_step: int, train_frequency: int, learning_starts: int) -> int:
    return updates_due(0, global_step, train_frequency, learning_starts)


_active_run: Run | None = None


def cli(args_type: type, main: Callable) -> None:
    """Parse flags with tyro and run ``main``.

    Bad flags or inputs: one ``error:`` line, exit status 2.  A NaN loss: its
    message, exit status 1.  Anything else (a bug) keeps its traceback, and the
    run folder's status.json says the run failed.
    """
    args = tyro.cli(args_type)
    try:
        main(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except BaseException as error:
        if _active_run is not None and _active_run.tracker is not None:
            write_status(_active_run.run_dir, "failed", -1, _active_run.args.total_timesteps, repr(error))
        raise


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


def epsilon_greedy(q_values: torch.Tensor, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """Per-env: a uniformly random action with probability epsilon, else the greedy one (tensor ops only)."""
    num_envs, num_actions = q_values.shape
    device = q_values.device
    random_actions = torch.randint(num_actions, (num_envs,), device=device, generator=generator)
    explore = torch.rand(num_envs, device=device, generator=generator) < epsilon
    return torch.where(explore, random_actions, q_values.argmax(dim=1))


def _load_resumed_args(args, agent: str):
    run_dir = Path(args.resume)
    try:
        config = read_json(run_dir / CONFIG_FILE)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--resume {run_dir}: {error}") from None
    if config.get("agent", agent) != agent:
        raise ConfigError(f"--resume {run_dir}: that run was made by agents/{config['agent']}.py; "
                          f"resume it with that agent")
    known = {f.name for f in dataclasses.fields(type(args))}
    resumed = type(args)(**{k: v for k, v in config.items() if k in known})
    resumed.resume = str(run_dir)
    if resumed.cuda and not torch.cuda.is_available():
        print("note: this run trained on CUDA and no CUDA device is available here; continuing on the CPU",
              file=sys.stderr)
        resumed.cuda = False
    if not (run_dir / CHECKPOINT_FILE).exists():
        raise ConfigError(f"--resume {run_dir}: no {CHECKPOINT_FILE} there; the run stopped before its first "
                          "checkpoint, start it again without --resume")
    return resumed, config


class Run:
    """One training run: its folder, device, env, replay buffer, tracker and checkpoints."""

    def __init__(self, args, agent: str, categorical: Callable[[object], bool]):
        global _active_run
        _active_run = self
        self.agent = agent
        self.tracker: Tracker | None = None
        resumed_config = None
        if args.resume:
            args, resumed_config = _load_resumed_args(args, agent)
            print(f"resuming {args.resume} with its saved {CONFIG_FILE} (other flags are ignored)", file=sys.stderr)
        try:
            family = env_family(args.env_id)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.is_atari = family == "atari"
        resolve_family_defaults(args, self.is_atari)
        self.categorical = categorical(args)
        validate_common(args, is_atari=self.is_atari, categorical=self.categorical)
        if not args.exp_name:
            args.exp_name = agent
        self.args = args

        # Seeding (spec agents.md): python, numpy, torch; the env and buffer get their own generators.
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        self.device = torch.device("cuda" if args.cuda else "cpu")
        keep_freed_host_memory()
        if args.bf16 and self.device.type == "cpu" and cpu_has_native_bf16() is False:
            print("note: this CPU has no native bfloat16 (avx512_bf16/amx_bf16): --bf16 is emulated and slower "
                  "than float32 here; drop it", file=sys.stderr)

        if resumed_config is not None:
            self.run_dir = Path(args.resume)
            self.run_name = resumed_config.get("run_name", self.run_dir.name)
        else:
            env_name = args.env_id.replace("/", "_")
            self.run_name = args.run_name or f"{env_name}__{agent}__{run_tag(args)}__{args.seed}__{int(time.time())}"
            self.run_dir = Path(args.runs_dir) / self.run_name
            if (self.run_dir / CHECKPOINT_FILE).exists():
                raise ConfigError(f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir} "
                                  "or choose another --run-name")
            if any(self.run_dir.glob(EVENT_FILE_PREFIX + "*")):
                raise ConfigError(f"{self.run_dir} holds the event files of a run that stopped before its first "
                                  "checkpoint; delete that folder or choose another --run-name")
        try:
            self.envs = AgentEnv.make(args, self.device)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None
        try:
            # Batches come back on the training device wherever the buffer lives.
            self.buffer = make_replay_buffer(self.envs.obs_shape, args.buffer_size, args.num_envs,
                                             self._buffer_device(), seed=stream_seed(args.seed, "replay"),
                                             sample_device=self.device)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        # The run folder is made only once the env and buffer exist: bad input leaves nothing behind.
        if resumed_config is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / CONFIG_FILE, {**args_to_dict(args), "agent": agent, "run_name": self.run_name})

        self.action_generator = torch.Generator(device=self.device)
        self.action_generator.manual_seed(stream_seed(args.seed, "actions"))
        self.stateful: dict = {}
        self._stop_requested = False
        self._previous_handlers: dict = {}
        self._good_step = -1  # last step at which the loss was known finite
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    def _buffer_device(self) -> torch.device:
        args = self.args
        if args.buffer_device != "auto":
            return torch.device(args.buffer_device)
        if self.device.type != "cuda":
            return self.device
        obs_shape = self.envs.obs_shape
        # Frame stacks store each frame once; other observations are stored as obs and next_obs.
        frames = int(np.prod(obs_shape[1:])) if is_frame_stack(obs_shape) else 2 * int(np.prod(obs_shape))
        per_transition = frames + 16
        free, _total = torch.cuda.mem_get_info(self.device)
        # Keep the buffer on the GPU only when it leaves most of the memory for training.
        return self.device if per_transition * args.buffer_size < 0.6 * free else torch.device("cpu")

    # ---- start / resume ----
    def begin(self, **stateful) -> tuple[int, torch.Tensor]:
        """Register the objects a checkpoint holds; return (global_step, current obs), fresh or resumed."""
        self.stateful = stateful
        args = self.args
        global_step = 0
        if args.resume:
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
            self.action_generator.set_state(state["action_generator"])
            set_rng_state(state["rng"])
            obs = state["obs"].to(self.device) if restarted_obs is None else restarted_obs
            self.tracker = self._make_tracker(global_step)
            self.tracker.load_state_dict(state["tracker"])
            self._good_step = global_step
        else:
            obs = self.envs.reset(seed=args.seed)
            self.tracker = self._make_tracker(0)
        write_status(self.run_dir, "running", global_step, args.total_timesteps)
        self._install_signal_handlers()
        return global_step, obs

    def _make_tracker(self, start_step: int) -> Tracker:
        args = self.args
        config = {**args_to_dict(args), "agent": self.agent, "run_name": self.run_name}
        return Tracker(self.run_dir, config, args.total_timesteps, args.log_every, self.device,
                       start_step=start_step, num_envs=args.num_envs, accuracy_window=args.log_every)

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
        """Remember (on device, no sync) whether a loss was NaN/inf; checked at every log flush."""
        self._nonfinite |= ~torch.isfinite(loss.detach())

    def record(self, global_step: int, step) -> None:
        """Log what one env step produced (episodes, accuracy, task switches); ``step`` is an AgentEnv.Step."""
        tracker = self.tracker
        tracker.episodes(global_step, step.episode_returns, step.episode_lengths, group=step.group)
        if step.greedy_correct is not None:
            tracker.task_accuracy(step.greedy_correct)
        if step.task_id != step.previous_task_id:
            tracker.task_switch(global_step, step.previous_task_id, step.task_id)

    def updates(self, before: int, global_step: int) -> range:
        """Indices (1-based) of the gradient updates due for the env steps (before, global_step]."""
        args = self.args
        return range(updates_done(before, args.train_frequency, args.learning_starts) + 1,
                     updates_done(global_step, args.train_frequency, args.learning_starts) + 1)

    def log_update(self, loss: torch.Tensor, q_taken: torch.Tensor) -> None:
        """losses/td_loss and losses/q_values over the window, and the NaN watch (no host sync)."""
        self.watch_loss(loss)
        self.tracker.mean("losses/td_loss", loss)
        self.tracker.mean("losses/q_values", q_taken.mean())

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
            self.envs.close()
            self._restore_signal_handlers()
            write_status(self.run_dir, "interrupted", global_step, args.total_timesteps)
            print(f"interrupted at step {global_step}; continue with --resume {self.run_dir}", file=sys.stderr)
            return False
        return True

    def _check_finite(self, global_step: int) -> None:
        if bool(self._nonfinite):
            args = self.args
            self.tracker.close()
            self._restore_signal_handlers()
            last = (f"the last good checkpoint (step {self._good_step}) is {self.run_dir / CHECKPOINT_FILE}"
                    if self._good_step >= 0 else "no checkpoint was written before it")
            message = (f"the loss became NaN/inf before step {global_step}; {last}. Try a lower --learning-rate, "
                       "a regularised network (--layer-norm, --l2) or check the rewards.")
            write_status(self.run_dir, "failed", global_step, args.total_timesteps, message)
            raise NonFiniteLossError(message)
        self._good_step = global_step

    def checkpoint(self, global_step: int, obs: torch.Tensor) -> None:
        """Write checkpoint.pt -- only when the loss is known finite, so it is always a good state."""
        self._check_finite(global_step)
        args = self.args
        state = {name: obj.state_dict() for name, obj in self.stateful.items()}
        state.update(global_step=global_step, obs=obs, env=self.envs.state_dict(), rng=rng_state(),
                     action_generator=self.action_generator.get_state(), tracker=self.tracker.state_dict())
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
        self.tracker.close()
        self.envs.close()
        self._restore_signal_handlers()
        write_status(self.run_dir, "completed", global_step, self.args.total_timesteps)

    # ---- diagnostics (spec diagnostics.md "When and on what") ----
    def diagnose(self, before: int, global_step: int, diagnostics, td_targets: Callable, td_loss: Callable,
                 clip_range: tuple[float, float] | None = None) -> None:
        """Run the diagnostics whose cadence was crossed, on a probe batch from the replay buffer.

        ``td_targets(batch)`` and ``td_loss(batch)`` are the agent's own target and loss functions.
        """
        args = self.args
        due = {name: crossed(before, global_step, getattr(args, f"{name}_every"))
               for name in ("diag", "entk", "hessian", "probe")}
        if global_step <= args.learning_starts or not any(due.values()) or len(self.buffer) < 2:
            return
        batch = self.buffer.sample(min(args.diag_batch, len(self.buffer)))
        scalars: dict[str, float] = {}
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


def start(args, agent: str, categorical: Callable[[object], bool] = lambda args: False) -> Run:
    """Validate the flags, seed everything, create the run folder, the env and the replay buffer.

    ``categorical(args)`` says whether the value head is categorical, decided on the final
    args: on ``--resume`` those are the run's saved config, not the command line.
    """
    return Run(args, agent, categorical)
