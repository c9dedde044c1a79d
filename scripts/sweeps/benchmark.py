"""Run a benchmark sweep: agents × env ids × variants × seeds, as local processes or Ray tasks.

The seeds of one (agent, env id, variant) are packed into population processes
(``python agents/<agent>.py --seed s --num-seeds N``, spec populations.md §6) of at
most ``--seeds-per-process`` consecutive seeds (default ``auto``: 16 for ImageMDP ids,
1 for Atari; raise it on a GPU); with 1 every run is its own process.  Each process's
output goes to ``<sweep-dir>/logs/<lead run>.log``; every run (population member) has
its own run folder in ``<sweep-dir>/runs/<run>``; ``<sweep-dir>/manifest.json`` records
the grid and every run's state as processes start and finish.  Re-running the same
command finishes the grid: completed runs are skipped, interrupted runs (and
populations, as one process) resume from their checkpoint, runs without a checkpoint
start again.  Usage (docs/scripts.md has more):

    python scripts/sweeps/benchmark.py --agents dqn c51 --env-ids ImageMDP/mnist \\
        --variants baseline= ln_l2="--layer-norm --l2 1e-5" --num-seeds 3 \\
        --common "--shift label_permutation --total-timesteps 100000" --sweep-dir sweeps/ln_l2
    python scripts/sweeps/benchmark.py --sweep-file sweep.toml --dry-run
    python scripts/sweeps/benchmark.py --sweep-file sweep.toml --backend ray --ray-address head-node:6379

Exit status: 0 when every run completed, 1 when any failed, 2 for a bad sweep
definition, 130 when interrupted (re-run to continue).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python scripts/sweeps/benchmark.py` from a checkout

from agents.harness.run_folder import (  # noqa: E402
    COMPLETED,
    FAILED,
    NEW,
    RESUMABLE,
    RUNNING,
    STATUS_FILE,
    folder_state,
    population_lead,
    read_status,
)
from scripts.sweeps.sweep import (  # noqa: E402
    AUTO,
    AUTO_SEEDS_PER_PROCESS_IMAGE_MDP,
    AUTO_SEEDS_PER_PROCESS_OTHER,
    ENDED,
    FRESH,
    LOGS_SUBDIR,
    PENDING,
    PROJECT_ROOT,
    RESUME,
    SKIP,
    SKIPPED,
    Manifest,
    Process,
    RunSpec,
    Sweep,
    changed_definitions,
    clear_partial_run,
    load_sweep_file,
    make_sweep,
    pack,
    parse_seeds_per_process,
    parse_variant,
    population_ended,
)

LOG_TAIL_LINES = 5


# ---- one run: a subprocess with its output in a log file (runs locally or inside a Ray task) ----

def run_logged(command: list[str], log_path: str, cwd: str, env_overrides: dict[str, str],
               on_start=None) -> dict:
    """Run ``command`` with stdout and stderr appended to ``log_path``; return its exit code and timings.

    Standard library only and self-contained, because Ray ships it by value to
    worker nodes.  If the caller is interrupted (a cancelled Ray task), the
    agent gets SIGTERM, which makes it write a checkpoint and stop.
    """
    import os
    import shlex
    import socket
    import subprocess
    import time

    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {**os.environ, **env_overrides}
    host = socket.gethostname()
    started = time.time()
    with open(log_path, "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {host}: {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=cwd, env=env)
        if on_start is not None:
            on_start(process)
        try:
            returncode = process.wait()
        except BaseException:
            process.terminate()
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise
        wall_time = time.time() - started
        log.write(f"=== exit code {returncode} after {wall_time:.1f} s\n")
    return {"returncode": returncode, "wall_time_s": wall_time, "started": started, "finished": time.time(),
            "host": host}


# ---- backends: submit runs, wait for any to finish ----

class LocalBackend:
    """At most ``workers`` runs at once, each a child process of this one."""

    def __init__(self, workers: int):
        self.max_in_flight = workers
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def _track(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.add(process)

    def _run(self, command, log_path, cwd, env) -> dict:
        result = run_logged(command, log_path, cwd, env, on_start=self._track)
        with self._lock:
            self._processes = {p for p in self._processes if p.poll() is None}
        return result

    def submit(self, command: list[str], log_path: Path, cwd: Path, env: dict[str, str]):
        return self._pool.submit(self._run, command, str(log_path), str(cwd), env)

    def wait(self, handles: list, timeout: float = 1.0) -> list:
        done, _ = concurrent.futures.wait(handles, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return list(done)

    def result(self, handle) -> dict:
        return handle.result()

    def cancel(self, handles: list) -> None:
        """SIGTERM to the running agents: each writes a checkpoint and exits (resumable)."""
        with self._lock:
            for process in self._processes:
                if process.poll() is None:
                    process.terminate()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class RayBackend:
    """Each run a Ray task (a subprocess on some worker node) on an existing cluster.

    The project checkout, its Python environment and the sweep folder must be at
    the same paths on every node (shared storage): the task runs the same
    command line there and writes the run folder and log in place.
    """

    def __init__(self, address: str, cpus_per_run: float, gpus_per_run: float, max_in_flight: int | None):
        if not address:
            raise ValueError("--backend ray needs --ray-address HOST:PORT of a running cluster "
                             "(started with `ray start --head`), or 'auto' on a cluster node")
        try:
            import ray
        except ImportError:
            raise ValueError("--backend ray needs Ray: pip install 'plasticity-rl[ray]' (or pip install 'ray>=2.9')") \
                from None
        import logging

        self._ray = ray
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ValueError(f"cannot connect to the Ray cluster at {address} ({error}); "
                             "check the address printed by `ray start --head`") from None
        fitting = [node for node in ray.nodes() if node.get("Alive")
                   and node["Resources"].get("CPU", 0) >= cpus_per_run
                   and node["Resources"].get("GPU", 0) >= gpus_per_run]
        if not fitting:
            ray.shutdown()
            raise ValueError(f"no node of the Ray cluster at {address} has {cpus_per_run} CPU and {gpus_per_run} GPU "
                             "free for one run; lower --cpus-per-run / --gpus-per-run or add nodes")
        if run_logged.__module__ != "__main__":  # ship the function itself; workers need not import scripts/
            ray.cloudpickle.register_pickle_by_value(sys.modules[run_logged.__module__])
        self._remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(run_logged)
        self.max_in_flight = max_in_flight or sys.maxsize  # the cluster's resources bound what runs at once

    def submit(self, command: list[str], log_path: Path, cwd: Path, env: dict[str, str]):
        return self._remote.remote(command, str(log_path), str(cwd), env)

    def wait(self, handles: list, timeout: float = 1.0) -> list:
        done, _ = self._ray.wait(handles, num_returns=1, timeout=timeout)
        return done

    def result(self, handle) -> dict:
        return self._ray.get(handle)

    def cancel(self, handles: list) -> None:
        """Interrupt the tasks: run_logged sends SIGTERM to its agent, which checkpoints and exits."""
        for handle in handles:
            self._ray.cancel(handle, force=False)

    def close(self) -> None:
        self._ray.shutdown()


# ---- the sweep loop ----

def plan(sweep: Sweep, runs: list[RunSpec]) -> list[tuple[RunSpec, str]]:
    """What each run needs: ``skip`` (completed), ``resume`` (checkpoint -- its own or its population's, in the
    lead folder -- not completed), ``fresh``, or ``ended`` (failed in a population that ran to its end)."""
    actions = {COMPLETED: SKIP, RESUMABLE: RESUME, NEW: FRESH}
    planned = []
    for run in runs:
        action = actions[folder_state(sweep.run_dir(run))]
        if action == RESUME and population_ended(sweep.run_dir(run)):
            action = ENDED
        planned.append((run, action))
    return planned


def process_threads(members: int, threads_per_run: int, workers: int, processes: int) -> int:
    """OMP/MKL threads of a local process training ``members`` runs (local backend).

    The sweep's CPU budget is ``workers x threads_per_run`` threads, whatever the packing: a
    single run gets ``threads_per_run`` (as without populations); a population gets one share per
    member while there are fewer processes than workers to fill the budget, at most
    ``members x threads_per_run`` (``workers // processes`` shares).
    """
    return threads_per_run * min(members, max(1, workers // max(processes, 1)))


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join("    | " + line for line in text[-lines:])


def _outcome(sweep: Sweep, run: RunSpec, result: dict | None, error: str | None) -> tuple[str, str]:
    """(manifest state, note) of a run whose process ended."""
    if error is not None:
        return FAILED, error
    status = read_status(sweep.run_dir(run))
    if result["returncode"] == 0 and status is not None and status.completed:
        return COMPLETED, ""
    if status is not None and status.interrupted:
        return PENDING, f"interrupted at step {status.global_step}; re-run the sweep to resume it"
    if status is not None and status.failed and status.message and status.time >= result["started"]:
        # written by this process: e.g. a population member whose loss went NaN while the others went on
        return FAILED, (f"exit code {result['returncode']}: " if result["returncode"] else "") + status.message
    if result["returncode"] == 0:
        return FAILED, f"the agent exited with status 0 but its {STATUS_FILE} does not say {COMPLETED}"
    return FAILED, f"exit code {result['returncode']}"


def _relative_log(process: Process) -> str:
    return str(Path(LOGS_SUBDIR) / f"{process.lead}.log")


def _population_field(process: Process) -> dict | None:
    """The manifest's ``population`` of a run trained in a process of several runs (None for a single run)."""
    if process.size == 1:
        return None
    return {"lead": process.lead, "runs": [run.name for run in process.runs], "num_seeds": process.size}


def execute(sweep: Sweep, planned: list[tuple[RunSpec, str]], backend, manifest: Manifest, python: str,
            env: dict[str, str], processes: list[Process] | None = None, threads=None) -> dict[str, int]:
    """Run every process of the plan, at most ``backend.max_in_flight`` at once; update the manifest per run.

    ``processes``: the plan packed into processes (default: one per run, ``pack(..., 1)``);
    ``threads(process)``: its OMP/MKL thread count (None: ``env`` as given).
    """
    counts = {"completed": 0, "resumed": 0, "failed": 0, "skipped": 0, "interrupted": 0}
    for run, action in planned:
        if action == SKIP:
            lead = population_lead(sweep.run_dir(run)).name  # the log of the process that trained it
            manifest.update(run.name, status=SKIPPED, log=str(Path(LOGS_SUBDIR) / f"{lead}.log"))
            counts["skipped"] += 1
        elif action == ENDED:
            lead = population_lead(sweep.run_dir(run)).name
            status = read_status(sweep.run_dir(run))
            note = (f"failed in its population, which ran to its end ({status.message if status else ''}); "
                    f"resuming cannot change it: delete {sweep.run_dir(run)} to run it again")
            manifest.update(run.name, status=FAILED, note=note, log=str(Path(LOGS_SUBDIR) / f"{lead}.log"))
            counts["failed"] += 1
            print(f"[FAILED] {run.name}: {note}", flush=True)
    if processes is None:
        processes = pack(sweep, planned, 1)
    queue = deque(processes)
    total = sum(len(process.runs) for process in processes)
    in_flight: dict = {}
    finished = 0
    interrupted = False
    while queue or in_flight:
        try:
            while queue and not interrupted and len(in_flight) < backend.max_in_flight:
                process = queue.popleft()
                if process.action == FRESH:
                    for run in process.runs:
                        if clear_partial_run(sweep.run_dir(run)):
                            print(f"note: removed {sweep.run_dir(run)} (no checkpoint to resume); starting it again")
                command = sweep.process_command(process, python)
                names = [run.name for run in process.runs]
                manifest.update_many(names, status=RUNNING, action=process.action, command=command,
                                     log=_relative_log(process), population=_population_field(process),
                                     returncode=None, wall_time_s=None, started=time.time(), finished=None, note="")
                process_env = dict(env)
                if threads is not None:
                    count = threads(process)
                    process_env.update(OMP_NUM_THREADS=str(count), MKL_NUM_THREADS=str(count))
                handle = backend.submit(command, sweep.process_log_path(process), PROJECT_ROOT, process_env)
                in_flight[handle] = process
                how = "resuming from its checkpoint" if process.action == RESUME else "fresh"
                if process.size == 1:
                    print(f"[start] {process.runs[0].name} ({how})", flush=True)
                else:
                    print(f"[start] {process.describe()}, one process ({how}): {', '.join(names)}", flush=True)
            for handle in backend.wait(list(in_flight)):
                process = in_flight.pop(handle)
                result, error = None, None
                try:
                    result = backend.result(handle)
                except Exception as exc:  # a task that never ran or died with its worker
                    error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                log = sweep.process_log_path(process)
                for run in process.runs:  # each member's state from its own status.json
                    state, note = _outcome(sweep, run, result, error)
                    fields = {"status": state, "note": note}
                    if result is not None:
                        fields.update(returncode=result["returncode"], wall_time_s=round(result["wall_time_s"], 3),
                                      started=result["started"], finished=result["finished"], host=result["host"])
                    manifest.update(run.name, **fields)
                    finished += 1
                    if state == COMPLETED:
                        counts["completed"] += 1
                        counts["resumed"] += process.action == RESUME
                        print(f"[done {finished}/{total}] {run.name} completed in {result['wall_time_s']:.1f} s"
                              + ("" if process.size == 1 else f" (in a {process.describe()}; log: {log})"),
                              flush=True)
                    elif state == PENDING:
                        counts["interrupted"] += 1
                        print(f"[stopped {finished}/{total}] {run.name}: {note} (log: {log})", flush=True)
                    else:
                        counts["failed"] += 1
                        print(f"[FAILED {finished}/{total}] {run.name}: {note}; log: {log}\n{_log_tail(log)}",
                              flush=True)
        except KeyboardInterrupt:
            if interrupted:  # second Ctrl-C: stop the agents now (each still checkpoints on SIGTERM)
                print("\nstopping the running agents", file=sys.stderr, flush=True)
                backend.cancel(list(in_flight))
                continue
            interrupted = True
            for process in queue:
                manifest.update_many([run.name for run in process.runs], status=PENDING)
            queue.clear()
            print(f"\ninterrupted: no new runs start; waiting for {len(in_flight)} running process(es) to checkpoint "
                  "and stop (Ctrl-C again to stop them now). Re-run the same command to continue.",
                  file=sys.stderr, flush=True)
            if not isinstance(backend, LocalBackend):
                backend.cancel(list(in_flight))  # Ray tasks do not see this terminal's Ctrl-C
    counts["aborted"] = int(interrupted)
    return counts


# ---- command line ----

def _merge_common_value(argv: list[str]) -> list[str]:
    """``--common "--layer-norm"`` -> ``--common=--layer-norm`` (argparse takes a lone value starting with -- for a flag)."""
    merged, i = [], 0
    while i < len(argv):
        if argv[i] == "--common" and i + 1 < len(argv):
            merged.append(f"--common={argv[i + 1]}")
            i += 2
        else:
            merged.append(argv[i])
            i += 1
    return merged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run agents x env ids x variants x seeds, resumably, locally or on a Ray cluster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sweep-file", help="TOML (or YAML, with PyYAML) file with the fields below; flags "
                        "given on the command line override it")
    parser.add_argument("--agents", nargs="+", help="agent files under --agent-dir, e.g. dqn c51")
    parser.add_argument("--env-ids", nargs="+", help="env ids, e.g. ImageMDP/mnist ALE/Breakout-v5")
    parser.add_argument("--variants", nargs="+", metavar="NAME=FLAGS",
                        help='named flag sets, e.g. baseline= ln_l2="--layer-norm --l2 1e-5" (default: one '
                        'variant "default" with no flags)')
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 1)")
    seeds.add_argument("--num-seeds", type=int, help="seeds 1..N")
    parser.add_argument("--common", help='agent flags for every run, e.g. "--total-timesteps 100000"')
    parser.add_argument("--sweep-dir", help="folder for runs/, logs/ and manifest.json (with Ray: a path every "
                        "node sees)")
    parser.add_argument("--seeds-per-process", metavar="K|auto",
                        help="pack up to K consecutive seeds of one agent/env/variant into one population process "
                        f"(--num-seeds); 1: a process per run. auto: {AUTO_SEEDS_PER_PROCESS_IMAGE_MDP} for ImageMDP "
                        f"ids, {AUTO_SEEDS_PER_PROCESS_OTHER} for Atari -- CPU values (this script cannot see the "
                        "device): on a GPU raise it, e.g. 128 for the image MDP, 8 for Atari (default: auto)")
    parser.add_argument("--workers", type=int, help="agent processes at once, a population counting once (default: "
                        "one per CPU core locally; with Ray: as many as the cluster's resources allow)")
    parser.add_argument("--threads-per-run", type=int, help="OMP/MKL threads per run: a single run's process gets "
                        "this many, a population's one share per member while fewer processes than --workers run, "
                        "keeping workers x threads-per-run in all (default: cores / workers locally; with Ray: "
                        "per process, else Ray's --cpus-per-run)")
    parser.add_argument("--backend", choices=("local", "ray"), help="where runs execute (default: local)")
    parser.add_argument("--ray-address", help="address of a running Ray cluster (HOST:PORT, or 'auto' on a node)")
    parser.add_argument("--cpus-per-run", type=float, help="Ray: CPUs each process (a population counting once) "
                        "requests (default: 1)")
    parser.add_argument("--gpus-per-run", type=float, help="Ray: GPUs each process (a population counting once) "
                        "requests (default: 0)")
    parser.add_argument("--python", help="interpreter for the runs (default: this one; the same path on Ray nodes)")
    parser.add_argument("--agent-dir", help="folder holding <agent>.py (default: this project's agents/)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid, what each run needs and the "
                        "processes (commands) that cover them; run nothing")
    return parser


def _settings(args: argparse.Namespace) -> dict:
    """File fields, overridden by the flags given on the command line."""
    settings = load_sweep_file(args.sweep_file) if args.sweep_file else {}
    for key, value in vars(args).items():
        if key not in ("sweep_file", "dry_run") and value is not None:
            settings[key] = value
    settings["seeds_per_process"] = parse_seeds_per_process(settings.get("seeds_per_process", AUTO))
    if isinstance(settings.get("variants"), list):
        variants = {}
        for text in settings["variants"]:
            name, flags = parse_variant(text)
            if name in variants:
                raise ValueError(f"variant {name!r} is given twice")
            variants[name] = flags
        settings["variants"] = variants
    if args.seeds is not None:
        settings.pop("num_seeds", None)
    if args.num_seeds is not None:
        settings.pop("seeds", None)
    return settings


def _seeds_per_process_text(setting) -> str:
    if setting == AUTO:
        return (f"auto ({AUTO_SEEDS_PER_PROCESS_IMAGE_MDP} for ImageMDP ids, {AUTO_SEEDS_PER_PROCESS_OTHER} for "
                "other ids)")
    return str(setting)


def _print_plan(sweep: Sweep, planned, python: str, backend: str, workers, processes: list[Process] | None = None,
                seeds_per_process=1) -> None:
    """The grid in order: each run's action under the process (command) that covers it."""
    if processes is None:
        processes = pack(sweep, planned, 1)
    print(f"sweep folder: {sweep.sweep_dir}")
    print(f"{len(planned)} runs = {len(sweep.agents)} agents x {len(sweep.env_ids)} env ids x "
          f"{len(sweep.variants)} variants x {len(sweep.seeds)} seeds; backend {backend}, workers {workers}")
    print(f"{len(processes)} process(es) to run, seeds per process {_seeds_per_process_text(seeds_per_process)}")
    first_of = {process.runs[0].name: process for process in processes}
    in_process = {run.name for process in processes for run in process.runs}
    number = {id(process): index for index, process in enumerate(processes, 1)}
    for run, action in planned:
        if run.name in first_of:
            process = first_of[run.name]
            command = sweep.process_command(process, python)
            if process.size == 1:
                print(f"  {action:6s} {run.name}\n         {shlex.join(command)}")
                continue
            print(f"  process {number[id(process)]}: {process.describe()}, log "
                  f"{sweep.process_log_path(process).relative_to(sweep.sweep_dir)}")
            for member in process.runs:
                print(f"  {process.action:6s} {member.name}")
            print(f"         {shlex.join(command)}")
        elif run.name not in in_process:
            print(f"  {action:6s} {run.name}" + ("  (failed in its population, which ran to its end; not re-run)"
                                                  if action == ENDED else ""))


def _acquire_lock(sweep_dir: Path):
    """One benchmark.py per sweep folder: two would start the same runs twice."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    handle = open(sweep_dir / ".sweep.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise ValueError(f"another benchmark.py (pid {owner}) is running on {sweep_dir}; wait for it or use "
                         "another --sweep-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_merge_common_value(sys.argv[1:] if argv is None else list(argv)))
    try:
        settings = _settings(args)
        sweep = make_sweep(settings.get("agents"), settings.get("env_ids"), settings.get("variants"),
                           seeds=settings.get("seeds"), num_seeds=settings.get("num_seeds"),
                           common=settings.get("common", ""), sweep_dir=settings.get("sweep_dir"),
                           agent_dir=settings.get("agent_dir"))
        backend_name = settings.get("backend", "local")
        if backend_name not in ("local", "ray"):
            raise ValueError(f"backend must be local or ray, got {backend_name!r}")
        workers = settings.get("workers")
        if workers is not None and int(workers) < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        cores = os.cpu_count() or 1
        if backend_name == "local":
            workers = int(workers or cores)
        python = settings.get("python") or sys.executable
        runs = sweep.runs()
        planned = plan(sweep, runs)
        seeds_per_process = settings["seeds_per_process"]
        processes = pack(sweep, planned, seeds_per_process)
        if args.dry_run:
            _print_plan(sweep, planned, python, backend_name, workers or "as the cluster allows", processes,
                        seeds_per_process)
            return 0
        lock = _acquire_lock(sweep.sweep_dir)
        previous = Manifest.read(sweep.manifest_path)
        changed = changed_definitions(previous, runs, sweep)
        if changed:
            raise ValueError(f"{len(changed)} run(s) in {sweep.runs_dir} were started with other flags than this "
                             f"sweep gives them (e.g. {changed[0]}); use a new --sweep-dir, or delete those run "
                             "folders to redo them")
        threads = settings.get("threads_per_run")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"--threads-per-run must be at least 1, got {threads}")
        if backend_name == "local":
            backend = LocalBackend(workers)
            threads = threads or max(1, cores // workers)
        else:
            backend = RayBackend(settings.get("ray_address"), float(settings.get("cpus_per_run", 1)),
                                 float(settings.get("gpus_per_run", 0)), workers)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # Unbuffered output so logs are live; a thread budget per process so parallel runs do not oversubscribe cores.
    env = {"PYTHONUNBUFFERED": "1"}
    thread_count = None
    if threads and backend_name == "local":
        def thread_count(process: Process) -> int:
            return process_threads(process.size, int(threads), workers, len(processes))
    elif threads:  # Ray: per process, as --cpus-per-run
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    manifest = Manifest(sweep, runs)
    manifest.adopt_previous(previous)
    manifest.write()
    to_run = sum(len(process.runs) for process in processes)
    print(f"sweep {sweep.sweep_dir}: {len(runs)} runs, {to_run} to run "
          f"({sum(a == RESUME for _, a in planned)} to resume) in {len(processes)} process(es), "
          f"backend {backend_name}", flush=True)
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill <pid> acts as Ctrl-C
    try:
        counts = execute(sweep, planned, backend, manifest, python, env, processes, thread_count)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        backend.close()
        lock.close()
    print(f"sweep finished: {counts['completed']} completed ({counts['resumed']} resumed), "
          f"{counts['skipped']} skipped (already completed), {counts['failed']} failed"
          + (f", {counts['interrupted']} interrupted" if counts["interrupted"] else "")
          + f"; manifest: {sweep.manifest_path}")
    if counts["failed"]:
        print("failed runs (logs):", file=sys.stderr)
        for record in manifest.records.values():
            if record["status"] == FAILED:
                print(f"  {record['name']}: {record.get('note', '')}; {sweep.sweep_dir / record['log']}",
                      file=sys.stderr)
        return 1
    return 130 if counts["interrupted"] or counts["aborted"] else 0


if __name__ == "__main__":
    sys.exit(main())
