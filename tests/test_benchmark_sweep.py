"""scripts/sweeps/benchmark.py and scripts/sweeps/sweep.py: grid, names, commands, manifest, resume, failures, Ray.

The integration tests sweep the real agents (agents/dqn.py, agents/c51.py) on the
image-classification MDP with tiny budgets; they skip when the MNIST test split
is absent.  The small sweep runs once per session (tests/test_plot.py reuses
the same folder: re-running a completed sweep only skips).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from agents.harness.run_folder import CHECKPOINT_FILE, STATUS_FILE, folder_state
from scripts.analysis.tbreader import load_run
from scripts.sweeps import benchmark
from scripts.sweeps.sweep import (
    AUTO,
    load_sweep_file,
    make_sweep,
    pack,
    parse_variant,
    run_name,
    seeds_per_process_for,
)

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "scripts" / "sweeps" / "benchmark.py"
AGENT_DIR = ROOT / "agents"

#: A few hundred env steps of the image MDP: diagnostics, a task switch, checkpoints, episodes of 50 steps.
TINY_RUN = ("--num-images 500 --total-timesteps 400 --learning-starts 100 --buffer-size 1000 --batch-size 16 "
            "--diag-every 200 --diag-batch 64 --checkpoint-every 200 --log-every 100 --episode-length 50 "
            "--shift label_permutation --shift-every 200 --hidden-sizes 32 32")


def tiny_common(mnist_dir: Path) -> str:
    return f"--data-dir {mnist_dir} {TINY_RUN}"


def small_sweep_argv(sweep_dir: Path, mnist_dir: Path) -> list[str]:
    """dqn on the image MDP, two variants x two seeds (the grid tests/test_plot.py plots), one process per run
    (the tests of crashes and failures below watch each run's own process and log; populations: further down)."""
    return ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--variants", "base=", "ln=--layer-norm",
            "--seeds", "1", "2", "--workers", "2", "--seeds-per-process", "1", "--common", tiny_common(mnist_dir),
            "--sweep-dir", str(sweep_dir)]


def run_small_sweep(tmp_path_factory, mnist_dir: Path) -> Path:
    sweep_dir = tmp_path_factory.getbasetemp() / "small_sweep"
    code = benchmark.main(small_sweep_argv(sweep_dir, mnist_dir))
    assert code == 0, f"the small sweep failed; see the logs in {sweep_dir / 'logs'}"
    return sweep_dir


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory, mnist_dir) -> Path:
    return run_small_sweep(tmp_path_factory, mnist_dir)


def read_manifest(sweep_dir: Path) -> dict[str, dict]:
    return {run["name"]: run for run in json.loads((sweep_dir / "manifest.json").read_text())["runs"]}


def copy_sweep(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".sweep.lock"))
    return target


# ---- the grid, without running anything ----

def test_grid_is_the_product_in_seed_major_order_with_deterministic_names(tmp_path):
    sweep = make_sweep(["dqn", "c51"], ["ImageMDP/mnist", "ALE/Breakout-v5"],
                       {"base": "", "ln_l2": "--layer-norm --l2 1e-5"}, seeds=[3, 7],
                       common="--total-timesteps 1000", sweep_dir=tmp_path)
    runs = sweep.runs()
    assert len(runs) == 2 * 2 * 2 * 2
    assert len({run.name for run in runs}) == len(runs)
    assert [run.seed for run in runs[:8]] == [3] * 8  # every configuration once before the second seed
    first = runs[1]
    assert (first.agent, first.env_id, first.variant, first.seed) == ("dqn", "ImageMDP/mnist", "ln_l2", 3)
    assert first.name == "ImageMDP_mnist__dqn__ln_l2__3" == run_name("ImageMDP/mnist", "dqn", "ln_l2", 3)
    assert first.flags == ("--total-timesteps", "1000", "--layer-norm", "--l2", "1e-5")  # variant after common
    assert sweep.runs() == runs  # same definition, same names: a re-run finds its runs

    command = sweep.command(first, "/py", resume=False)
    assert command[:2] == ["/py", str(AGENT_DIR / "dqn.py")]
    flags = dict(zip(command[2:12:2], command[3:12:2]))
    assert flags == {"--env-id": "ImageMDP/mnist", "--seed": "3", "--exp-name": "ln_l2",
                     "--runs-dir": str(tmp_path / "runs"), "--run-name": first.name}
    assert command[12:] == list(first.flags)
    assert sweep.command(first, "/py", resume=True) == ["/py", str(AGENT_DIR / "dqn.py"), "--resume",
                                                        str(tmp_path / "runs" / first.name)]


def test_num_seeds_and_default_variant(tmp_path):
    sweep = make_sweep(["dqn"], ["ImageMDP/mnist"], None, num_seeds=3, sweep_dir=tmp_path)
    assert sweep.seeds == (1, 2, 3)
    assert list(sweep.variants) == ["default"]


@pytest.mark.parametrize("kwargs, message", [
    ({"variants": {"a": "--seed 3"}}, "sets --seed"),
    ({"common": "--run-name=x"}, "sets --run-name"),
    ({"common": "--exp_name x"}, "sets --exp-name"),
    ({"variants": {"a__b": ""}}, "not allowed"),
    ({"variants": {"a b": ""}}, "not allowed"),
    ({"seeds": [1, 1]}, "duplicate seeds"),
    ({"agents": ["ppo"]}, "unknown agent 'ppo'"),
    ({"agents": []}, "no agents"),
    ({"seeds": [1], "num_seeds": 2}, "either seeds or num_seeds"),
    ({"common": "--l2 '1e-5"}, "check the quotes"),
])
def test_bad_definitions_are_one_clear_error(tmp_path, kwargs, message):
    definition = {"agents": ["dqn"], "env_ids": ["ImageMDP/mnist"], "variants": None, "sweep_dir": tmp_path}
    definition.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make_sweep(**definition)


def test_parse_variant():
    assert parse_variant('ln_l2=--layer-norm --l2 1e-5') == ("ln_l2", "--layer-norm --l2 1e-5")
    assert parse_variant("base=") == ("base", "")
    with pytest.raises(ValueError, match="NAME=FLAGS"):
        parse_variant("--layer-norm")


def test_toml_and_yaml_sweep_files_match_the_command_line(tmp_path, capsys):
    toml = tmp_path / "sweep.toml"
    toml.write_text('agents = ["dqn"]\nenv_ids = ["ImageMDP/mnist"]\nseeds = [1, 2]\n'
                    'common = "--total-timesteps 400"\nsweep_dir = "out"\n'
                    '[variants]\nbase = ""\nln = "--layer-norm"\n')
    fields = load_sweep_file(toml)
    assert fields["sweep_dir"] == str(tmp_path / "out")  # relative to the file
    assert fields["variants"] == {"base": "", "ln": "--layer-norm"}

    yaml = pytest.importorskip("yaml", reason="PyYAML not installed; the YAML path is optional")
    yaml_file = tmp_path / "sweep.yaml"
    yaml_file.write_text(yaml.safe_dump({**fields, "sweep_dir": "out"}))
    assert load_sweep_file(yaml_file) == fields

    assert benchmark.main(["--sweep-file", str(toml), "--dry-run"]) == 0
    from_file = capsys.readouterr().out
    assert benchmark.main(["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--seeds", "1", "2", "--variants",
                           "base=", "ln=--layer-norm", "--common", "--total-timesteps 400",
                           "--sweep-dir", str(tmp_path / "out"), "--dry-run"]) == 0
    assert capsys.readouterr().out == from_file
    assert from_file.count("fresh ") == 4 and "--layer-norm" in from_file
    assert not (tmp_path / "out" / "manifest.json").exists()  # a dry run runs and writes nothing

    # Command-line flags override the file.
    assert benchmark.main(["--sweep-file", str(toml), "--seeds", "5", "--dry-run"]) == 0
    assert "__5" in capsys.readouterr().out


def test_sweep_file_errors(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "sweep.toml"
    bad.write_text('agents = ["dqn"]\nseedz = [1]\n')
    with pytest.raises(ValueError, match="unknown field"):
        load_sweep_file(bad)
    assert benchmark.main(["--sweep-file", str(bad)]) == 2
    assert "unknown field(s) seedz" in capsys.readouterr().err
    yaml_file = tmp_path / "sweep.yaml"
    yaml_file.write_text("agents: [dqn]\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(ValueError, match="pip install pyyaml"):
        load_sweep_file(yaml_file)
    with pytest.raises(FileNotFoundError):
        load_sweep_file(tmp_path / "missing.toml")


def test_run_state_of_run_folders(tmp_path):
    assert folder_state(tmp_path / "absent") == "new"
    run = tmp_path / "run"
    run.mkdir()
    (run / STATUS_FILE).write_text(json.dumps({"status": "running", "global_step": 0}))
    assert folder_state(run) == "new"  # started, no checkpoint: nothing to resume
    (run / CHECKPOINT_FILE).write_bytes(b"x")
    assert folder_state(run) == "resumable"
    (run / STATUS_FILE).write_text(json.dumps({"status": "interrupted", "global_step": 200}))
    assert folder_state(run) == "resumable"
    (run / STATUS_FILE).write_text("{truncated")
    assert folder_state(run) == "resumable"
    (run / STATUS_FILE).write_text(json.dumps({"status": "completed", "global_step": 400}))
    assert folder_state(run) == "completed"


def test_dry_run_shows_what_each_run_needs_and_takes_common_flags_verbatim(tmp_path, capsys):
    argv = ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--seeds", "1", "2", "3", "--common", "--layer-norm",
            "--sweep-dir", str(tmp_path), "--dry-run"]
    runs = tmp_path / "runs"
    (runs / "ImageMDP_mnist__dqn__default__1").mkdir(parents=True)
    (runs / "ImageMDP_mnist__dqn__default__1" / STATUS_FILE).write_text(json.dumps({"status": "completed"}))
    (runs / "ImageMDP_mnist__dqn__default__2").mkdir()
    (runs / "ImageMDP_mnist__dqn__default__2" / CHECKPOINT_FILE).write_bytes(b"x")
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    assert "skip   ImageMDP_mnist__dqn__default__1" in out
    assert "resume ImageMDP_mnist__dqn__default__2" in out and "--resume " + str(runs) in out
    assert "fresh  ImageMDP_mnist__dqn__default__3" in out
    assert out.count("--run-name ImageMDP_mnist__dqn__default__3 --layer-norm") == 1


def test_rerun_with_changed_flags_into_the_same_folder_is_refused(tmp_path, capsys):
    argv = ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--sweep-dir", str(tmp_path)]
    name = "ImageMDP_mnist__dqn__default__1"
    (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "manifest.json").write_text(json.dumps({"runs": [{"name": name, "flags": ["--l2", "1e-5"]}]}))
    assert benchmark.main([*argv, "--common", "--l2 1e-4"]) == 2
    err = capsys.readouterr().err
    assert "started with other flags" in err and name in err and "new --sweep-dir" in err


def test_one_sweep_per_folder(tmp_path, capsys):
    argv = ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--sweep-dir", str(tmp_path)]
    with open(tmp_path / ".sweep.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert benchmark.main(argv) == 2
    assert "another benchmark.py" in capsys.readouterr().err


def test_ray_backend_errors_are_clear(tmp_path, monkeypatch, capsys):
    argv = ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--sweep-dir", str(tmp_path), "--backend", "ray"]
    assert benchmark.main(argv) == 2
    assert "--backend ray needs --ray-address" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert benchmark.main(argv + ["--ray-address", "127.0.0.1:1"]) == 2
    assert "pip install 'plasticity-rl[ray]'" in capsys.readouterr().err


# ---- real runs ----

def test_small_sweep_completes_with_manifest_logs_and_variant_in_config(small_sweep):
    manifest = read_manifest(small_sweep)
    assert len(manifest) == 4
    for name, record in manifest.items():
        assert record["status"] in ("completed", "skipped"), record
        assert record["returncode"] == 0 and record["wall_time_s"] > 0
        run_dir = small_sweep / record["run_dir"]
        config = json.loads((run_dir / "config.json").read_text())
        assert config["exp_name"] == record["variant"] and config["seed"] == record["seed"]
        assert config["run_name"] == name and config["agent"] == "dqn"
        assert config["layer_norm"] == (record["variant"] == "ln")
        assert json.loads((run_dir / STATUS_FILE).read_text())["status"] == "completed"
        log = (small_sweep / record["log"]).read_text()
        assert "--exp-name " + record["variant"] in log and "=== exit code 0" in log


@pytest.fixture(scope="module")
def crashed_sweep_rerun(small_sweep, tmp_path_factory, mnist_dir) -> SimpleNamespace:
    """The small sweep after a crash, re-run with one more variant whose flag the agent rejects.

    One run never started (fresh), three completed (skip), and the two runs of the bad
    variant fail.  (Resuming an interrupted run: test_interrupted_sweep_resumes_mid_run.)
    """
    sweep_dir = copy_sweep(small_sweep, tmp_path_factory.mktemp("crashed") / "sweep")
    restarted = "ImageMDP_mnist__dqn__ln__1"
    untouched = ["ImageMDP_mnist__dqn__base__1", "ImageMDP_mnist__dqn__base__2", "ImageMDP_mnist__dqn__ln__2"]
    shutil.rmtree(sweep_dir / "runs" / restarted)  # never started
    (sweep_dir / "runs" / restarted).mkdir()  # ... or died before its first checkpoint
    (sweep_dir / "runs" / restarted / "events.out.tfevents.0.stale").write_bytes(b"")
    log_times = {name: (sweep_dir / "logs" / f"{name}.log").stat().st_mtime_ns for name in untouched}
    argv = small_sweep_argv(sweep_dir, mnist_dir)
    argv[argv.index("ln=--layer-norm") + 1:argv.index("ln=--layer-norm") + 1] = ["bad=--no-such-flag 1"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = benchmark.main(argv)
    return SimpleNamespace(sweep_dir=sweep_dir, code=code, out=out.getvalue(), err=err.getvalue(),
                           manifest=read_manifest(sweep_dir), restarted=restarted, untouched=untouched,
                           log_times=log_times)


def test_rerun_after_a_crash_runs_only_the_unfinished_runs(crashed_sweep_rerun):
    rerun = crashed_sweep_rerun
    manifest, sweep_dir = rerun.manifest, rerun.sweep_dir
    record = manifest[rerun.restarted]
    assert record["status"] == "completed" and record["action"] == "fresh"
    assert not (sweep_dir / "runs" / rerun.restarted / "events.out.tfevents.0.stale").exists()  # cleared first
    assert f"removed {sweep_dir / 'runs' / rerun.restarted}" in rerun.out
    for name in rerun.untouched:
        assert manifest[name]["status"] == "skipped"
        assert (sweep_dir / "logs" / f"{name}.log").stat().st_mtime_ns == rerun.log_times[name]  # never launched
    assert "1 completed (0 resumed), 3 skipped" in rerun.out


def test_failed_run_is_reported_with_its_log_and_does_not_stop_the_others(crashed_sweep_rerun):
    rerun = crashed_sweep_rerun
    assert rerun.code == 1
    for seed in (1, 2):
        bad = rerun.manifest[f"ImageMDP_mnist__dqn__bad__{seed}"]
        assert bad["status"] == "failed" and bad["returncode"] == 2
        log_path = rerun.sweep_dir / bad["log"]
        assert str(log_path) in rerun.err and str(log_path) in rerun.out
        assert "no-such-flag" in log_path.read_text()
    assert "2 failed" in rerun.out
    assert rerun.manifest[rerun.restarted]["status"] == "completed"  # ran alongside the failures


def _agent_pid(run_name: str) -> int | None:
    """The pid of the agent process training ``run_name`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if run_name.encode() in command and any(part.endswith(b"dqn.py") for part in command):
                return int(entry.name)
    return None


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    return {tag: dict(zip(series.steps.tolist(), series.values.tolist()))
            for tag, series in load_run(run_dir).scalars.items()}


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory, mnist_dir) -> SimpleNamespace:
    """Two runs of a sweep stopped mid-way: one by Ctrl-C (it checkpoints), one by SIGKILL (a node
    failure: only its last periodic checkpoint survives); then the same sweep command again."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs /proc to find the agent processes")
    sweep_dir = tmp_path_factory.mktemp("interrupted") / "sweep"
    argv = ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--variants", "base=", "--seeds", "1", "2",
            "--workers", "2", "--seeds-per-process", "1",  # two processes: one is stopped, the other killed
            "--common", tiny_common(mnist_dir).replace("--total-timesteps 400", "--total-timesteps 1200"),
            "--sweep-dir", str(sweep_dir)]
    stopped, killed = "ImageMDP_mnist__dqn__base__1", "ImageMDP_mnist__dqn__base__2"
    driver = subprocess.Popen([sys.executable, str(BENCHMARK), *argv], start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not all((sweep_dir / "runs" / name / CHECKPOINT_FILE).exists() for name in (stopped, killed)):
        if driver.poll() is not None or time.time() > deadline:
            pytest.fail(f"the runs never reached their first checkpoint:\n{driver.communicate()[0]}")
        time.sleep(0.05)
    killed_pid = _agent_pid(killed)
    if killed_pid is not None:
        os.kill(killed_pid, signal.SIGKILL)
    os.killpg(driver.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    first_output, _ = driver.communicate(timeout=120)
    statuses = {name: json.loads((sweep_dir / "runs" / name / STATUS_FILE).read_text()) for name in (stopped, killed)}
    if killed_pid is None or any(status["status"] == "completed" for status in statuses.values()):
        pytest.skip("a run finished before it could be stopped (machine too fast for these tiny runs)")
    before = {name: _scalars(sweep_dir / "runs" / name) for name in (stopped, killed)}
    first_manifest = read_manifest(sweep_dir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        second_code = benchmark.main(argv)
    return SimpleNamespace(sweep_dir=sweep_dir, stopped=stopped, killed=killed, first_code=driver.returncode,
                           first_output=first_output, statuses=statuses, first_manifest=first_manifest,
                           before=before, second_code=second_code, manifest=read_manifest(sweep_dir))


def test_interrupted_and_killed_runs_are_resumed_by_the_same_command(interrupted_sweep):
    sweep = interrupted_sweep
    assert sweep.first_code == 1, sweep.first_output  # the killed run counts as failed
    assert sweep.statuses[sweep.stopped]["status"] == "interrupted"
    assert 0 < sweep.statuses[sweep.stopped]["global_step"] < 1200
    assert sweep.first_manifest[sweep.stopped]["status"] == "pending"
    assert sweep.first_manifest[sweep.killed]["status"] == "failed"
    assert sweep.first_manifest[sweep.killed]["returncode"] == -signal.SIGKILL
    assert sweep.second_code == 0
    for name in (sweep.stopped, sweep.killed):
        record = sweep.manifest[name]
        assert record["status"] == "completed" and record["action"] == "resume"
        assert json.loads((sweep.sweep_dir / "runs" / name / STATUS_FILE).read_text())["status"] == "completed"
        assert len(list((sweep.sweep_dir / "runs" / name).glob("events.out.tfevents.*"))) >= 2


def _check_resumed_run(sweep, name: str, kept_up_to: int) -> None:
    """Every log_every cadence step logged exactly once, and what was logged up to the checkpoint kept."""
    after = _scalars(sweep.sweep_dir / "runs" / name)
    cadence = list(range(100, 1201, 100))
    for tag in ("charts/epsilon", "charts/task_id", "charts/SPS"):
        assert sorted(after[tag]) == cadence, tag
    for tag, values in sweep.before[name].items():
        if tag == "charts/SPS":
            continue
        kept = {step: value for step, value in values.items() if step <= kept_up_to}
        assert {step: after[tag].get(step) for step in kept} == kept, tag


def test_ctrl_c_resume_logs_every_step_once(interrupted_sweep):
    # Stopped by SIGINT, the agent checkpointed at the step it stopped at: everything before it is kept.
    stopped_at = interrupted_sweep.statuses[interrupted_sweep.stopped]["global_step"]
    _check_resumed_run(interrupted_sweep, interrupted_sweep.stopped, stopped_at)


def test_resume_after_a_hard_kill_keeps_the_values_logged_at_the_checkpoint_step(interrupted_sweep):
    # Killed after its step-200 checkpoint, which the agent writes after flushing the step-200 logs:
    # a resume must keep those (TensorBoard purge_step = checkpoint step + 1), or they are lost.
    _check_resumed_run(interrupted_sweep, interrupted_sweep.killed, 200)


# ---- populations: the seeds of one agent/env/variant packed into processes (spec populations.md §6) ----

def _fake_folder(runs_dir: Path, name: str, status: str | None, members: list[str] | None = None,
                 checkpoint: bool = False, message: str = "") -> Path:
    """A run folder as an agent leaves it; ``members``: the population it belongs to (its lead first)."""
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"run_name": name, "num_seeds": 1}
    if members:
        config["population"] = {"seed": int(members[0].rsplit("__", 1)[1]), "num_seeds": len(members),
                                "member": members.index(name), "lead": members[0], "members": members}
    (run_dir / "config.json").write_text(json.dumps(config))
    if status is not None:
        (run_dir / STATUS_FILE).write_text(json.dumps({"status": status, "global_step": 200, "time": 1.0,
                                                       "message": message}))
    if checkpoint:
        (run_dir / CHECKPOINT_FILE).write_bytes(b"x")
    return run_dir


def _processes(processes) -> list[tuple]:
    return [(p.action, p.runs[0].env_id.split("/")[0], p.runs[0].variant, [run.seed for run in p.runs])
            for p in processes]


def test_pack_chunks_consecutive_seeds_and_resumes_each_population_once(tmp_path):
    sweep = make_sweep(["dqn"], ["ImageMDP/mnist", "ALE/Breakout-v5"], {"base": "", "ln": "--layer-norm"},
                       seeds=[1, 2, 3, 4, 5, 7, 8, 9, 10], sweep_dir=tmp_path)
    base = [run_name("ImageMDP/mnist", "dqn", "base", seed) for seed in range(11)]
    _fake_folder(sweep.runs_dir, base[3], "completed")  # a completed run breaks a chunk; so does the gap at 6
    population = [base[9], base[10]]  # an interrupted population of seeds 9-10: its checkpoint is in the lead
    _fake_folder(sweep.runs_dir, base[9], "interrupted", population, checkpoint=True)
    _fake_folder(sweep.runs_dir, base[10], "interrupted", population)
    _fake_folder(sweep.runs_dir, base[4], "running")  # died before its first checkpoint: fresh
    planned = benchmark.plan(sweep, sweep.runs())
    assert dict((run.name, action) for run, action in planned)[base[10]] == "resume"

    processes = pack(sweep, planned, 2)
    assert _processes(processes) == [  # in grid order (seed-major) of their first run
        ("fresh", "ImageMDP", "base", [1, 2]), ("fresh", "ImageMDP", "ln", [1, 2]),
        ("fresh", "ALE", "base", [1, 2]), ("fresh", "ALE", "ln", [1, 2]),
        ("fresh", "ImageMDP", "ln", [3, 4]), ("fresh", "ALE", "base", [3, 4]), ("fresh", "ALE", "ln", [3, 4]),
        ("fresh", "ImageMDP", "base", [4, 5]), ("fresh", "ImageMDP", "ln", [5]), ("fresh", "ALE", "base", [5]),
        ("fresh", "ALE", "ln", [5]),
        ("fresh", "ImageMDP", "base", [7, 8]), ("fresh", "ImageMDP", "ln", [7, 8]), ("fresh", "ALE", "base", [7, 8]),
        ("fresh", "ALE", "ln", [7, 8]),
        ("resume", "ImageMDP", "base", [9, 10]), ("fresh", "ImageMDP", "ln", [9, 10]),
        ("fresh", "ALE", "base", [9, 10]), ("fresh", "ALE", "ln", [9, 10])]
    first, resumed = processes[0], processes[15]
    command = sweep.process_command(first, "/py")
    assert command[:2] == ["/py", str(AGENT_DIR / "dqn.py")]
    flags = dict(zip(command[2:14:2], command[3:14:2]))
    assert flags == {"--env-id": "ImageMDP/mnist", "--seed": "1", "--num-seeds": "2", "--exp-name": "base",
                     "--runs-dir": str(sweep.runs_dir), "--run-name": "ImageMDP_mnist__dqn__base__{seed}"}
    assert command[14:] == []  # the variant's flags follow (none for base)
    assert sweep.process_log_path(first) == sweep.logs_dir / f"{base[1]}.log"  # one log per process: the lead's
    assert sweep.process_command(resumed, "/py") == ["/py", str(AGENT_DIR / "dqn.py"), "--resume",
                                                     str(sweep.runs_dir / base[9])]
    assert sweep.process_log_path(resumed) == sweep.logs_dir / f"{base[9]}.log"
    one = [p for p in processes if p.runs[0].name == run_name("ImageMDP/mnist", "dqn", "ln", 5)][0]
    assert sweep.process_command(one, "/py") == sweep.command(one.runs[0], "/py", resume=False)  # a plain run

    # auto: populations of up to 16 on the image MDP, one process per Atari run; --track runs alone.
    auto = _processes(pack(sweep, planned, "auto"))
    assert [seeds for _, env, variant, seeds in auto if env == "ImageMDP" and variant == "ln"] == [
        [1, 2, 3, 4, 5], [7, 8, 9, 10]]
    assert all(len(seeds) == 1 for _, env, _, seeds in auto if env == "ALE")
    assert seeds_per_process_for("ImageMDP/cifar10", AUTO) == 16 and seeds_per_process_for("ALE/Pong-v5", AUTO) == 1
    tracked = make_sweep(["dqn"], ["ImageMDP/mnist"], None, seeds=[1, 2], common="--track", sweep_dir=tmp_path / "t")
    assert [len(p.runs) for p in pack(tracked, benchmark.plan(tracked, tracked.runs()), 8)] == [1, 1]

    # One process per run: exactly the commands of single runs, resuming each folder itself.
    for process in pack(sweep, planned, 1):
        assert len(process.runs) == 1 or process.action == "resume"  # the population resumes as a whole
        if process.action == "fresh":
            assert sweep.process_command(process, "/py") == sweep.command(process.runs[0], "/py", resume=False)


def test_a_member_outside_the_grid_and_a_failed_member_of_a_finished_population(tmp_path):
    sweep = make_sweep(["dqn"], ["ImageMDP/mnist"], None, seeds=[2, 4, 5], sweep_dir=tmp_path)
    names = [run_name("ImageMDP/mnist", "dqn", "default", seed) for seed in range(6)]
    _fake_folder(sweep.runs_dir, names[1], "interrupted", names[1:3], checkpoint=True)  # seed 1 not in this grid
    _fake_folder(sweep.runs_dir, names[2], "interrupted", names[1:3])
    _fake_folder(sweep.runs_dir, names[4], "completed", names[4:6], checkpoint=True)
    _fake_folder(sweep.runs_dir, names[5], "failed", names[4:6], message="the loss became NaN/inf before step 200")
    planned = benchmark.plan(sweep, sweep.runs())
    assert [action for _, action in planned] == ["resume", "skip", "ended"]
    processes = pack(sweep, planned, 16)
    assert len(processes) == 1 and processes[0].resume_dir == sweep.runs_dir / names[1]
    assert processes[0].describe() == "population of 2 (seed 2 of this grid)"


def test_process_threads_keep_the_budget_of_workers_times_threads_per_run():
    assert benchmark.process_threads(1, 2, 8, 1) == 2  # a single run: --threads-per-run, as without populations
    assert benchmark.process_threads(16, 1, 8, 1) == 8  # one population alone: the whole budget
    assert benchmark.process_threads(16, 1, 8, 3) == 2  # three share it
    assert benchmark.process_threads(3, 1, 8, 1) == 3  # at most one share per member
    assert benchmark.process_threads(16, 1, 8, 20) == 1  # more processes than workers: one share each


def test_dry_run_prints_each_process_and_the_runs_it_covers(tmp_path, capsys):
    argv = ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--seeds", "1", "2", "3", "--common", "--layer-norm",
            "--sweep-dir", str(tmp_path), "--seeds-per-process", "2", "--dry-run"]
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    name = "ImageMDP_mnist__dqn__default__"
    assert "2 process(es) to run, seeds per process 2" in out
    assert (f"  process 1: population of 2 (seeds 1-2), log logs/{name}1.log\n  fresh  {name}1\n  fresh  {name}2\n"
            f"         {sys.executable} {AGENT_DIR / 'dqn.py'} --env-id ImageMDP/mnist --seed 1 --num-seeds 2 "
            f"--exp-name default --runs-dir {tmp_path / 'runs'} --run-name '{name}{{seed}}' --layer-norm\n") in out
    assert f"  fresh  {name}3\n         " in out and out.count("--num-seeds") == 1  # seed 3 alone: a plain run
    assert not (tmp_path / "manifest.json").exists()
    # The default is auto: the three seeds of the image MDP in one process.
    assert benchmark.main(argv[:-3] + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "population of 3 (seeds 1-3)" in out and "seeds per process auto (16 for ImageMDP ids" in out


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_seeds_per_process_is_one_clear_error(tmp_path, capsys, value):
    argv = ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--sweep-dir", str(tmp_path)]
    assert benchmark.main([*argv, "--seeds-per-process", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --seeds-per-process") and "auto" in err
    assert not (tmp_path / "manifest.json").exists()


def test_seeds_per_process_in_a_sweep_file(tmp_path, capsys):
    toml = tmp_path / "sweep.toml"
    toml.write_text('agents = ["dqn"]\nenv_ids = ["ImageMDP/mnist"]\nnum_seeds = 4\nseeds_per_process = 3\n'
                    'sweep_dir = "out"\n')
    assert benchmark.main(["--sweep-file", str(toml), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "population of 3 (seeds 1-3)" in out and "2 process(es)" in out
    assert benchmark.main(["--sweep-file", str(toml), "--seeds-per-process", "1", "--dry-run"]) == 0  # flag wins
    assert "4 process(es)" in capsys.readouterr().out
    toml.write_text('agents = ["dqn"]\nenv_ids = ["ImageMDP/mnist"]\nseeds_per_process = 0\nsweep_dir = "out"\n')
    assert benchmark.main(["--sweep-file", str(toml)]) == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert benchmark.main(["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--common", "--num-seeds 4",
                           "--sweep-dir", str(tmp_path)]) == 2  # the sweep packs the seeds itself
    assert "sets --num-seeds" in capsys.readouterr().err


#: A stand-in for agents/dqn.py that does what a population does to its folders, without torch: member
#: folders named from --run-name's {seed}, the checkpoint in the lead's; the member with --nan-seed fails
#: (as a NaN loss), the others complete; every call is appended to $FAKE_AGENT_CALLS.
FAKE_AGENT = '''
import argparse, json, os, sys, time
from pathlib import Path
parser = argparse.ArgumentParser()
for flag in ("--env-id", "--exp-name", "--runs-dir", "--run-name", "--resume"):
    parser.add_argument(flag)
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--num-seeds", type=int, default=1)
parser.add_argument("--nan-seed", type=int, default=-1)
args, _ = parser.parse_known_args()
with open(os.environ["FAKE_AGENT_CALLS"], "a") as calls:
    calls.write(json.dumps({"argv": sys.argv[1:], "threads": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
if args.resume:
    sys.exit(3)  # not expected in these tests
seeds = [args.seed + k for k in range(args.num_seeds)]
names = [args.run_name.replace("{seed}", str(seed)) for seed in seeds]
for k, (seed, name) in enumerate(zip(seeds, names)):
    run_dir = Path(args.runs_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"run_name": name, "seed": seed, "num_seeds": 1, "exp_name": args.exp_name}
    if len(seeds) > 1:
        config["population"] = {"seed": seeds[0], "num_seeds": len(seeds), "member": k, "lead": names[0],
                                "members": names}
    (run_dir / "config.json").write_text(json.dumps(config))
(Path(args.runs_dir) / names[0] / "checkpoint.pt").write_bytes(b"x")
for seed, name in zip(seeds, names):
    failed = seed == args.nan_seed
    status = {"status": "failed" if failed else "completed", "global_step": 400, "total_timesteps": 400,
              "time": time.time(), "message": "the loss became NaN/inf before step 400" if failed else ""}
    (Path(args.runs_dir) / name / "status.json").write_text(json.dumps(status))
sys.exit(0 if args.nan_seed not in seeds or len(seeds) > 1 else 1)
'''


def test_each_member_gets_its_own_state_and_a_failed_member_of_a_finished_population_is_not_rerun(
        tmp_path, monkeypatch, capsys):
    agent_dir = tmp_path / "agents"
    agent_dir.mkdir()
    (agent_dir / "dqn.py").write_text(FAKE_AGENT)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_AGENT_CALLS", str(calls))
    sweep_dir = tmp_path / "sweep"
    argv = ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--variants", "nan=--nan-seed 2",
            "--seeds", "1", "2", "3", "--agent-dir", str(agent_dir), "--sweep-dir", str(sweep_dir),
            "--workers", "4", "--threads-per-run", "1", "--seeds-per-process", "3"]
    assert benchmark.main(argv) == 1  # one member failed
    out = capsys.readouterr().out
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(made) == 1 and "--num-seeds" in made[0]["argv"]  # one process for the three seeds
    assert made[0]["threads"] == "3"  # alone on 4 workers x 1 thread: one thread per member
    manifest = read_manifest(sweep_dir)
    name = "ImageMDP_mnist__dqn__nan__"
    assert [manifest[f"{name}{seed}"]["status"] for seed in (1, 2, 3)] == ["completed", "failed", "completed"]
    assert "NaN" in manifest[f"{name}2"]["note"] and manifest[f"{name}2"]["returncode"] == 0
    for seed in (1, 2, 3):
        record = manifest[f"{name}{seed}"]
        assert record["log"] == f"logs/{name}1.log"  # one log for the process, the lead's
        assert record["population"] == {"lead": f"{name}1", "runs": [f"{name}{s}" for s in (1, 2, 3)],
                                        "num_seeds": 3}
    assert f"[FAILED 2/3] {name}2: the loss became NaN/inf" in out
    assert "2 completed (0 resumed), 0 skipped (already completed), 1 failed" in out

    # Again: the completed members are skipped; the failed one's population ran to its end, so resuming it
    # could not change anything: it stays failed and nothing is started.
    assert benchmark.main(argv) == 1
    out = capsys.readouterr().out
    assert len(calls.read_text().splitlines()) == 1
    manifest = read_manifest(sweep_dir)
    assert [manifest[f"{name}{seed}"]["status"] for seed in (1, 3)] == ["skipped", "skipped"]
    assert manifest[f"{name}2"]["status"] == "failed" and "ran to its end" in manifest[f"{name}2"]["note"]
    assert all(record["log"] == f"logs/{name}1.log" for record in manifest.values())
    assert "0 completed (0 resumed), 2 skipped (already completed), 1 failed" in out
    # Deleting the failed member's folder runs it again, alone (its population is gone from its folder).
    shutil.rmtree(sweep_dir / "runs" / f"{name}2")
    assert benchmark.main(argv) == 1  # --nan-seed 2: it fails again, now as a single run
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(made) == 2 and "--num-seeds" not in made[1]["argv"] and f"{name}2" in made[1]["argv"]


POPULATION_SWEEP = "ImageMDP_mnist__dqn__base__"


def population_sweep_argv(sweep_dir: Path, mnist_dir: Path, seeds=("1", "2", "3"), total: int = 400) -> list[str]:
    return ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--variants", "base=", "--seeds", *seeds,
            "--workers", "2", "--seeds-per-process", "2", "--sweep-dir", str(sweep_dir),
            "--common", tiny_common(mnist_dir).replace("--total-timesteps 400", f"--total-timesteps {total}")]


def test_population_sweep_packs_seeds_into_processes_and_a_rerun_skips_them(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "sweep"
    argv = population_sweep_argv(sweep_dir, mnist_dir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = benchmark.main(argv)
    assert code == 0, out.getvalue()
    out = out.getvalue()
    names = [f"{POPULATION_SWEEP}{seed}" for seed in (1, 2, 3)]
    assert "3 runs, 3 to run (0 to resume) in 2 process(es)" in out
    assert out.count("[start]") == 2
    assert f"[start] population of 2 (seeds 1-2), one process (fresh): {names[0]}, {names[1]}" in out
    assert f"[start] {names[2]} (fresh)" in out
    assert sorted(path.name for path in (sweep_dir / "runs").iterdir()) == names  # the sweep's names
    assert sorted(path.name for path in (sweep_dir / "logs").iterdir()) == [f"{names[0]}.log", f"{names[2]}.log"]
    lead_log = (sweep_dir / "logs" / f"{names[0]}.log").read_text()
    assert lead_log.count("=== exit code 0") == 1 and "--num-seeds 2" in lead_log
    assert "--num-seeds" not in (sweep_dir / "logs" / f"{names[2]}.log").read_text()
    manifest = read_manifest(sweep_dir)
    for seed, name in zip((1, 2, 3), names):
        record = manifest[name]
        assert record["status"] == "completed" and record["action"] == "fresh" and record["returncode"] == 0
        run_dir = sweep_dir / record["run_dir"]
        config = json.loads((run_dir / "config.json").read_text())
        assert (config["seed"], config["num_seeds"], config["run_name"], config["exp_name"]) == (seed, 1, name, "base")
        assert json.loads((run_dir / STATUS_FILE).read_text())["status"] == "completed"
        assert load_run(run_dir).scalars["charts/epsilon"].steps.tolist() == [100, 200, 300, 400]
        if seed < 3:
            assert record["log"] == f"logs/{names[0]}.log"
            assert record["population"] == {"lead": names[0], "runs": names[:2], "num_seeds": 2}
            assert config["population"]["lead"] == names[0] and config["population"]["members"] == names[:2]
        else:
            assert record["log"] == f"logs/{names[2]}.log" and record["population"] is None
            assert "population" not in config
    assert [(sweep_dir / "runs" / name / CHECKPOINT_FILE).exists() for name in names] == [True, False, True]

    log_times = {path.name: path.stat().st_mtime_ns for path in (sweep_dir / "logs").iterdir()}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert benchmark.main(argv) == 0
    assert "[start]" not in out.getvalue() and "0 completed (0 resumed), 3 skipped" in out.getvalue()
    assert {path.name: path.stat().st_mtime_ns for path in (sweep_dir / "logs").iterdir()} == log_times
    manifest = read_manifest(sweep_dir)
    assert [manifest[name]["status"] for name in names] == ["skipped"] * 3
    assert [manifest[name]["log"] for name in names] == [f"logs/{names[0]}.log"] * 2 + [f"logs/{names[2]}.log"]


def test_interrupted_population_resumes_as_one_process(tmp_path, mnist_dir, capsys):
    sweep_dir = tmp_path / "sweep"
    argv = population_sweep_argv(sweep_dir, mnist_dir, seeds=("1", "2"), total=1200)
    names = [f"{POPULATION_SWEEP}{seed}" for seed in (1, 2)]
    driver = subprocess.Popen([sys.executable, str(BENCHMARK), *argv], start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (sweep_dir / "runs" / names[0] / CHECKPOINT_FILE).exists():  # the population's first checkpoint
        if driver.poll() is not None or time.time() > deadline:
            pytest.fail(f"the population never reached its first checkpoint:\n{driver.communicate()[0]}")
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: the agent checkpoints every member and stops
    first_output, _ = driver.communicate(timeout=120)
    statuses = [json.loads((sweep_dir / "runs" / name / STATUS_FILE).read_text()) for name in names]
    if any(status["status"] == "completed" for status in statuses):
        pytest.skip("the population finished before it could be stopped (machine too fast for this tiny run)")
    assert driver.returncode == 130, first_output
    assert [status["status"] for status in statuses] == ["interrupted"] * 2
    assert statuses[0]["global_step"] == statuses[1]["global_step"] < 1200
    assert [record["status"] for record in read_manifest(sweep_dir).values()] == ["pending"] * 2
    assert [folder_state(sweep_dir / "runs" / name) for name in names] == ["resumable"] * 2

    assert benchmark.main([*argv, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert (f"  process 1: population of 2 (seeds 1-2), log logs/{names[0]}.log\n  resume {names[0]}\n"
            f"  resume {names[1]}\n         {sys.executable} {AGENT_DIR / 'dqn.py'} --resume "
            f"{sweep_dir / 'runs' / names[0]}\n") in dry

    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("[start]") == 1 and "one process (resuming from its checkpoint)" in out
    assert "2 completed (2 resumed), 0 skipped" in out
    manifest = read_manifest(sweep_dir)
    for name in names:
        record = manifest[name]
        assert record["status"] == "completed" and record["action"] == "resume"
        assert record["command"][-2:] == ["--resume", str(sweep_dir / "runs" / names[0])]
        assert record["log"] == f"logs/{names[0]}.log"
        assert json.loads((sweep_dir / "runs" / name / STATUS_FILE).read_text())["status"] == "completed"
        steps = load_run(sweep_dir / "runs" / name).scalars["charts/epsilon"].steps.tolist()
        assert steps == list(range(100, 1201, 100))  # every logging step once across the two processes
    log = (sweep_dir / "logs" / f"{names[0]}.log").read_text()
    assert log.count("=== ") >= 4 and log.count("--resume") >= 1  # both processes, one log
    assert not (sweep_dir / "logs" / f"{names[1]}.log").exists()


# ---- Ray: a real head on 127.0.0.1, the same sweep submitted through --ray-address ----

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    pytest.importorskip("ray", reason="ray is not installed (pip install 'ray>=2.9'); the Ray backend is optional")
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip(f"the ray command is not next to {sys.executable}")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "w") as log:
        # --block: the head's processes live in this process group and stop with it (not `ray stop`,
        # which would stop every Ray instance on the machine).
        head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                 "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
                                 "--disable-usage-stats", "--temp-dir", temp_dir,
                                 "--object-store-memory", str(80 * 1024**2)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while "Ray runtime started" not in log_path.read_text():
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"the Ray head did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=2)
        except subprocess.TimeoutExpired:  # the head drains for up to 30 s; nothing to drain here
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever is still draining
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_backend_runs_the_sweep_on_a_cluster(ray_head, tmp_path, mnist_dir):
    sweep_dir = tmp_path / "ray_sweep"
    argv = ["--agents", "dqn", "c51", "--env-ids", "ImageMDP/mnist", "--seeds", "1",
            "--common", tiny_common(mnist_dir), "--sweep-dir", str(sweep_dir),
            "--backend", "ray", "--ray-address", ray_head, "--cpus-per-run", "1"]
    result = subprocess.run([sys.executable, str(BENCHMARK), *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = read_manifest(sweep_dir)
    assert sorted(manifest) == ["ImageMDP_mnist__c51__default__1", "ImageMDP_mnist__dqn__default__1"]
    for name, record in manifest.items():
        assert record["status"] == "completed" and record["returncode"] == 0 and record["host"]
        assert json.loads((sweep_dir / "runs" / name / STATUS_FILE).read_text())["status"] == "completed"
        assert "=== exit code 0" in (sweep_dir / record["log"]).read_text()
