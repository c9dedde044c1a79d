"""A benchmark sweep as data: its definition, the grid of runs, their names, commands, state and manifest.

``scripts/sweeps/benchmark.py`` executes what this module describes.  A sweep is the
product agents × env ids × variants × seeds; every run gets a deterministic
name ``<env>__<agent>__<variant>__<seed>`` (the env id with ``/`` → ``_``, as the
agents name their own runs), so re-running the same sweep finds its earlier
runs: completed ones are skipped, interrupted ones (a ``checkpoint.pt`` without
a ``completed`` status) are resumed (spec agents.md "Outputs of one run").

The variant name reaches the run's ``config.json`` as ``exp_name`` (the agents'
``--exp-name``), so ``scripts/analysis/plot.py --group-by variant`` works on any run
folder without the manifest.

Processes (spec populations.md §6): the runs still to do of one (agent, env id, variant)
are packed into population processes (``--num-seeds N``) of at most ``seeds_per_process``
consecutive seeds each (``pack``).  Member k of a population writes the run folder a
single run of seed s+k would, so the grid, the names and the manifest stay per run; only
the commands and logs are per process (one log per process, the lead's: its first member).
An interrupted population resumes as one process, ``--resume <lead folder>``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from agents.harness import run_folder
from agents.harness.run_folder import COMPLETED, FAILED, NEW, RUNNING

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_AGENT_DIR = PROJECT_ROOT / "agents"

MANIFEST_FILE = "manifest.json"
RUNS_SUBDIR = "runs"
LOGS_SUBDIR = "logs"

#: Manifest states of one run; those a run folder also has are the run-folder contract's.
PENDING, SKIPPED = "pending", "skipped"
RUN_STATES = (PENDING, RUNNING, COMPLETED, FAILED, SKIPPED)

#: Flags the sweep sets itself; a variant or the common flags must not set them.
SWEEP_OWNED_FLAGS = ("--env-id", "--seed", "--num-seeds", "--exp-name", "--runs-dir", "--run-name", "--resume")

#: Fields a sweep file may hold (the command-line flags of benchmark.py, with underscores).
SWEEP_FILE_FIELDS = ("agents", "env_ids", "variants", "seeds", "num_seeds", "common", "sweep_dir", "workers",
                     "backend", "ray_address", "cpus_per_run", "gpus_per_run", "threads_per_run", "python",
                     "agent_dir", "seeds_per_process")

#: ``seeds_per_process = "auto"``: seeds per population process by env family.  The sweep layer is
#: torch-free and cannot see the device, so these are CPU values: on a CPU a small MLP's update is
#: mostly interpreter overhead, which a population shares (ImageMDP ids: 16); an Atari run's time
#: is in its emulators and Nature CNN, where a CPU population gains nothing (1).  On a GPU raise
#: it: e.g. ``--seeds-per-process 128`` for the image MDP, 8 for Atari.
AUTO = "auto"
IMAGE_MDP_PREFIX = "ImageMDP/"
AUTO_SEEDS_PER_PROCESS_IMAGE_MDP = 16
AUTO_SEEDS_PER_PROCESS_OTHER = 1
#: The ``--run-name`` placeholder the agents replace with each member's seed.
SEED_PLACEHOLDER = "{seed}"

_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*(_[A-Za-z0-9.+-]+)*$")


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: which agent, env, variant and seed, and the agent flags that define it."""

    agent: str
    env_id: str
    variant: str
    seed: int
    flags: tuple[str, ...]
    """agent flags of a fresh start, without the interpreter, script and run-location flags"""

    @property
    def name(self) -> str:
        return run_name(self.env_id, self.agent, self.variant, self.seed)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep definition; ``runs()`` is its grid."""

    agents: tuple[str, ...]
    env_ids: tuple[str, ...]
    variants: dict[str, str]
    """variant name -> agent flags (a shell-quoted string; "" is the agent's defaults)"""
    seeds: tuple[int, ...]
    sweep_dir: Path
    common: str = ""
    """agent flags shared by every run (e.g. "--total-timesteps 100000"); a variant's flags come after them"""
    agent_dir: Path = field(default=DEFAULT_AGENT_DIR)

    @property
    def runs_dir(self) -> Path:
        return self.sweep_dir / RUNS_SUBDIR

    @property
    def logs_dir(self) -> Path:
        return self.sweep_dir / LOGS_SUBDIR

    @property
    def manifest_path(self) -> Path:
        return self.sweep_dir / MANIFEST_FILE

    def run_dir(self, run: RunSpec) -> Path:
        return self.runs_dir / run.name

    def log_path(self, run: RunSpec) -> Path:
        return self.logs_dir / f"{run.name}.log"

    def agent_script(self, agent: str) -> Path:
        return self.agent_dir / f"{agent}.py"

    def runs(self) -> list[RunSpec]:
        """The grid, seed-major: the first runs to finish already cover every agent/env/variant once."""
        common = shlex.split(self.common)
        return [
            RunSpec(agent, env_id, variant, seed, (*common, *shlex.split(self.variants[variant])))
            for seed in self.seeds
            for env_id in self.env_ids
            for agent in self.agents
            for variant in self.variants
        ]

    def command(self, run: RunSpec, python: str, resume: bool) -> list[str]:
        """The agent command line: a fresh start, or ``--resume <run dir>`` (the agent reloads its config.json)."""
        script = str(self.agent_script(run.agent))
        if resume:
            return [python, script, "--resume", str(self.run_dir(run))]
        return [python, script, "--env-id", run.env_id, "--seed", str(run.seed), "--exp-name", run.variant,
                "--runs-dir", str(self.runs_dir), "--run-name", run.name, *run.flags]

    def process_command(self, process: Process, python: str) -> list[str]:
        """The command of one process: a single run's ``command`` for a one-run fresh start, a population
        (``--seed s --num-seeds N --run-name <name with {seed}>``) for more, ``--resume <lead folder>`` to resume
        (a population resumes as a whole from any member's folder; the agent takes the lead's)."""
        first = process.runs[0]
        script = str(self.agent_script(first.agent))
        if process.action == RESUME:
            return [python, script, "--resume", str(process.resume_dir)]
        if len(process.runs) == 1:
            return self.command(first, python, resume=False)
        return [python, script, "--env-id", first.env_id, "--seed", str(first.seed),
                "--num-seeds", str(len(process.runs)), "--exp-name", first.variant, "--runs-dir", str(self.runs_dir),
                "--run-name", run_name(first.env_id, first.agent, first.variant, SEED_PLACEHOLDER), *first.flags]

    def process_log_path(self, process: Process) -> Path:
        """One log per process: the lead's (``logs/<lead run>.log``; a single run's own log)."""
        return self.logs_dir / f"{process.lead}.log"

    def describe(self) -> dict:
        """The definition as JSON-able data (stored in the manifest)."""
        return {"agents": list(self.agents), "env_ids": list(self.env_ids), "variants": dict(self.variants),
                "seeds": list(self.seeds), "common": self.common, "agent_dir": str(self.agent_dir)}


FRESH, RESUME, SKIP = "fresh", "resume", "skip"
ENDED = "ended"
"""a failed member of a population that ran to its end: resuming changes nothing (the checkpoint marks it failed)"""


@dataclass(frozen=True)
class Process:
    """One agent process of a sweep: a fresh start of consecutive seeds, or the resume of a population."""

    action: str
    """``fresh`` or ``resume``"""
    runs: tuple[RunSpec, ...]
    """the grid's runs it trains, in seed order (a resumed population may train members outside the grid too)"""
    resume_dir: Path | None = None
    """the lead folder to ``--resume`` (resume only)"""
    members: int = 0
    """how many runs the process trains (0: ``len(runs)``); a resumed population's size from its config"""

    @property
    def lead(self) -> str:
        """The name of its lead run (member 0, whose folder holds the checkpoint and whose log is the process's)."""
        return self.resume_dir.name if self.resume_dir is not None else self.runs[0].name

    @property
    def size(self) -> int:
        return self.members or len(self.runs)

    def describe(self) -> str:
        seeds = [run.seed for run in self.runs]
        if self.size == 1:
            return "1 run"
        span = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
        return f"population of {self.size} ({span}{'' if self.size == len(seeds) else ' of this grid'})"


def parse_seeds_per_process(value) -> int | str:
    """``auto`` or a whole number >= 1 (from the command line, a string; from a sweep file, either)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        number = int(value)
        if isinstance(value, bool) or number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"--seeds-per-process (seeds_per_process) must be a whole number >= 1 or {AUTO!r}, "
                         f"got {value!r}") from None
    if number < 1:
        raise ValueError(f"--seeds-per-process (seeds_per_process) must be at least 1 (1: one process per run, "
                         f"as without populations) or {AUTO!r}, got {number}")
    return number


def seeds_per_process_for(env_id: str, setting: int | str) -> int:
    """The largest population of ``env_id``'s runs: the setting, or by family for ``auto`` (see AUTO)."""
    if setting != AUTO:
        return int(setting)
    return AUTO_SEEDS_PER_PROCESS_IMAGE_MDP if env_id.startswith(IMAGE_MDP_PREFIX) else AUTO_SEEDS_PER_PROCESS_OTHER


def _tracks(flags: tuple[str, ...]) -> bool:
    """Whether the flags turn on ``--track`` (W&B), which the agents allow for single-seed runs only."""
    tracked = False
    for token in flags:
        flag, _, value = token.partition("=")
        if flag == "--track":
            tracked = value.lower() not in ("false", "0", "no") if value else True
        elif flag == "--no-track":
            tracked = False
    return tracked


def pack(sweep: Sweep, planned: list[tuple[RunSpec, str]], seeds_per_process: int | str) -> list[Process]:
    """The processes that do the planned runs (``(run, fresh|resume|skip|ended)``), in grid order of their first run.

    - ``resume``: one process per population, ``--resume <lead folder>`` (the population named in the run's
      config.json; a single run is its own lead), whatever ``seeds_per_process`` is now;
    - ``fresh``: per (agent, env id, variant), chunks of at most ``seeds_per_process_for(env_id, ...)``
      consecutive seeds; a seed gap, or a run that is not fresh (completed, resumable), breaks a chunk.
      Runs with ``--track`` start alone (the agents track single-seed runs only).

    ``seeds_per_process = 1`` gives one process per run, each with the command ``Sweep.command`` gives.
    """
    order = {run.name: index for index, (run, _action) in enumerate(planned)}
    processes: list[Process] = []
    by_lead: dict[Path, list[RunSpec]] = {}
    fresh: dict[tuple[str, str, str], list[RunSpec]] = {}
    for run, action in planned:
        if action == RESUME:
            by_lead.setdefault(run_folder.population_lead(sweep.run_dir(run)), []).append(run)
        elif action == FRESH:
            fresh.setdefault((run.agent, run.env_id, run.variant), []).append(run)
    for lead, runs in by_lead.items():
        runs.sort(key=lambda run: run.seed)
        processes.append(Process(RESUME, tuple(runs), resume_dir=lead, members=_population_size(lead)))
    for (_agent, env_id, _variant), runs in fresh.items():
        runs.sort(key=lambda run: run.seed)
        limit = 1 if _tracks(runs[0].flags) else seeds_per_process_for(env_id, seeds_per_process)
        chunk: list[RunSpec] = []
        for run in runs:
            if chunk and (len(chunk) == limit or run.seed != chunk[-1].seed + 1):
                processes.append(Process(FRESH, tuple(chunk)))
                chunk = []
            chunk.append(run)
        processes.append(Process(FRESH, tuple(chunk)))
    return sorted(processes, key=lambda process: min(order[run.name] for run in process.runs))


def _population_size(lead: Path) -> int:
    try:
        population = (run_folder.read_config(lead, missing_ok=True) or {}).get("population") or {}
        return int(population.get("num_seeds", 1))
    except (ValueError, TypeError, AttributeError):
        return 1


def population_ended(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a member of a population (of more than one seed) that ran to its end.

    Every member takes the same env steps, so one completed member means the population's last
    checkpoint is its final one; a member that is not completed there failed (NaN/inf) and stays
    failed on resume.  (A single failed run is resumed from its last good checkpoint, as before.)
    """
    try:
        population = (run_folder.read_config(run_dir, missing_ok=True) or {}).get("population")
    except ValueError:
        return False
    if not isinstance(population, dict) or int(population.get("num_seeds", 1) or 1) < 2:
        return False
    members = population.get("members") or []
    return any((status := run_folder.read_status(Path(run_dir).parent / str(name))) is not None and status.completed
               for name in members)


def run_name(env_id: str, agent: str, variant: str, seed: int | str) -> str:
    """``<env>__<agent>__<variant>__<seed>``, e.g. ``ImageMDP_mnist__dqn__ln_l2__1`` (no timestamp: re-runs find it).

    ``seed`` may be ``SEED_PLACEHOLDER``: the ``--run-name`` of a population, whose members substitute their seeds.
    """
    return run_folder.run_name(env_id, agent, variant, seed)


def parse_variant(text: str) -> tuple[str, str]:
    """``name=flags`` (``baseline=`` or ``ln_l2=--layer-norm --l2 1e-5``) -> (name, flags)."""
    name, sep, flags = text.partition("=")
    if not sep:
        raise ValueError(f"variant {text!r} has no '=': write NAME=FLAGS, e.g. baseline= or ln_l2=\"--layer-norm\"")
    return name.strip(), flags.strip()


def _check_flags(flags: str, where: str) -> None:
    try:
        tokens = shlex.split(flags)
    except ValueError as error:
        raise ValueError(f"{where}: cannot split {flags!r} into flags ({error}); check the quotes") from None
    for token in tokens:
        flag = token.split("=", 1)[0].replace("_", "-")
        if flag in SWEEP_OWNED_FLAGS:
            raise ValueError(f"{where} sets {flag}, which the sweep sets for every run (env ids, seeds, variant "
                             f"names and run folders come from the sweep); remove it")


def make_sweep(agents, env_ids, variants: dict[str, str] | None, seeds=None, num_seeds: int | None = None,
               common: str = "", sweep_dir: str | Path | None = None, agent_dir: str | Path | None = None) -> Sweep:
    """Validate a sweep definition (one clear error per problem) and return it."""
    agents = tuple(agents or ())
    env_ids = tuple(env_ids or ())
    if not agents:
        raise ValueError("no agents: pass --agents dqn c51 (or `agents = [...]` in the sweep file)")
    if not env_ids:
        raise ValueError("no env ids: pass --env-ids ImageMDP/mnist ... (or `env_ids = [...]` in the sweep file)")
    if sweep_dir is None:
        raise ValueError("no sweep folder: pass --sweep-dir DIR (runs, logs and manifest.json go there)")
    if seeds is not None and num_seeds is not None:
        raise ValueError("give either seeds or num_seeds, not both")
    if num_seeds is not None:
        if int(num_seeds) < 1:
            raise ValueError(f"num_seeds must be at least 1, got {num_seeds}")
        seeds = range(1, int(num_seeds) + 1)  # CleanRL's default seed is 1
    seeds = tuple(int(seed) for seed in (seeds if seeds is not None else (1,)))
    variants = dict(variants) if variants else {"default": ""}
    for kind, values in (("agents", agents), ("env ids", env_ids), ("seeds", seeds)):
        duplicates = sorted({str(v) for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"duplicate {kind} in the sweep: {', '.join(duplicates)}")
    for name, flags in variants.items():
        if not _VARIANT_NAME.match(name):
            raise ValueError(f"variant name {name!r} is not allowed: use letters, digits and . + - _ "
                             "(no leading _ and no '__', which separates the parts of a run name)")
        if not isinstance(flags, str):
            raise ValueError(f"variant {name!r}: its flags must be one string, e.g. \"--layer-norm --l2 1e-5\"")
        _check_flags(flags, f"variant {name!r}")
    _check_flags(common, "the common flags")
    agent_dir = Path(agent_dir) if agent_dir else DEFAULT_AGENT_DIR
    for agent in agents:
        if not (agent_dir / f"{agent}.py").is_file():
            known = sorted(p.stem for p in agent_dir.glob("*.py") if not p.name.startswith("_"))
            raise ValueError(f"unknown agent {agent!r}: no {agent_dir / (agent + '.py')}; agents there: "
                             f"{', '.join(known) or 'none'}")
    return Sweep(agents=agents, env_ids=env_ids, variants=variants, seeds=seeds,
                 sweep_dir=Path(sweep_dir).absolute(), common=common, agent_dir=agent_dir.absolute())


def load_sweep_file(path: str | Path) -> dict:
    """Read a TOML (tomllib) or YAML (PyYAML, if installed) sweep file into a dict of benchmark.py fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: invalid TOML ({error})") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path} is YAML but PyYAML is not installed: `pip install pyyaml`, "
                             "or write the sweep as TOML") from None
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML ({error})") from None
    else:
        raise ValueError(f"sweep file {path}: unknown format {suffix!r}; use .toml (or .yaml with PyYAML)")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of fields ({', '.join(SWEEP_FILE_FIELDS)})")
    unknown = sorted(set(data) - set(SWEEP_FILE_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(SWEEP_FILE_FIELDS)}")
    if "variants" in data and not isinstance(data["variants"], dict):
        raise ValueError(f"{path}: `variants` must be a table of name = \"flags\"")
    for key in ("sweep_dir", "agent_dir"):  # relative paths in a file are relative to the file
        if key in data:
            data[key] = str((path.parent / data[key]).absolute())
    return data


# ---- the state of one run folder, as the agents leave it (agents/harness/run_folder.py) ----

def clear_partial_run(run_dir: Path) -> bool:
    """Remove a run folder that holds no checkpoint (nothing to resume), so a fresh start does not mix event files."""
    if run_dir.exists() and run_folder.folder_state(run_dir) == NEW:
        shutil.rmtree(run_dir)
        return True
    return False


# ---- the manifest ----

class Manifest:
    """``<sweep-dir>/manifest.json``: the grid and each run's state, rewritten atomically at every change."""

    def __init__(self, sweep: Sweep, runs: list[RunSpec]):
        self.sweep = sweep
        self.path = sweep.manifest_path
        self.created = time.time()
        self.records: dict[str, dict] = {
            run.name: {"name": run.name, "agent": run.agent, "env_id": run.env_id, "variant": run.variant,
                       "seed": run.seed, "flags": list(run.flags),
                       "run_dir": str(Path(RUNS_SUBDIR) / run.name),
                       "log": str(Path(LOGS_SUBDIR) / f"{run.name}.log"),
                       "status": PENDING, "action": None, "returncode": None, "wall_time_s": None,
                       "started": None, "finished": None, "population": None}
            for run in runs
        }

    @staticmethod
    def read(path: Path) -> dict | None:
        try:
            return json.loads(Path(path).read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is corrupt ({error}); delete it (it is rebuilt from the run folders)") from None

    def adopt_previous(self, previous: dict | None) -> None:
        """Keep what an earlier invocation recorded about runs that are still in the grid (times, return codes)."""
        if not previous:
            return
        self.created = previous.get("created", self.created)
        for old in previous.get("runs", []):
            record = self.records.get(old.get("name"))
            if record is None:
                continue
            for key in ("action", "returncode", "wall_time_s", "started", "finished", "population"):
                record[key] = old.get(key)
            record["previous_status"] = old.get("status")

    def update(self, name: str, **fields) -> None:
        self.update_many([name], **fields)

    def update_many(self, names, **fields) -> None:
        """The same fields for several runs (a population's members), written once."""
        unknown_state = fields.get("status") not in (None, *RUN_STATES)
        if unknown_state:
            raise ValueError(f"unknown run state {fields['status']!r}; one of {RUN_STATES}")
        for name in names:
            self.records[name].update(fields)
        self.write()

    def write(self) -> None:
        data = {"version": 1, "created": self.created, "updated": time.time(), "sweep": self.sweep.describe(),
                "runs": list(self.records.values())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)  # readers never see half a file


def changed_definitions(previous: dict | None, runs: list[RunSpec], sweep: Sweep) -> list[str]:
    """Runs that already have a folder but were started with other flags than this grid gives them.

    Skipping or resuming those would silently mix two configurations under one name.
    """
    if not previous:
        return []
    old_flags = {old.get("name"): old.get("flags") for old in previous.get("runs", [])}
    return [run.name for run in runs
            if run.name in old_flags and old_flags[run.name] != list(run.flags)
            and sweep.run_dir(run).exists()]
