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
    load_sweep_file,
    make_sweep,
    parse_variant,
    run_name,
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
    """dqn on the image MDP, two variants x two seeds (the grid tests/test_plot.py plots)."""
    return ["--agents", "dqn", "--env-ids", "ImageMDP/mnist", "--variants", "base=", "ln=--layer-norm",
            "--seeds", "1", "2", "--workers", "2", "--common", tiny_common(mnist_dir), "--sweep-dir", str(sweep_dir)]


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
            "--workers", "2", "--common", tiny_common(mnist_dir).replace("--total-timesteps 400",
                                                                         "--total-timesteps 1200"),
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
