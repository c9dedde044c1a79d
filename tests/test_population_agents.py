"""Populations (--num-seeds N) of both agents: member k is the single run with seed s+k (spec populations.md).

Short real runs on the shipped MNIST subset and a real ALE ROM; every member's run folder is
read back from its TensorBoard files.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agents import c51, dqn
from agents.harness import experiment, run_folder
from agents.harness.config import ConfigError
from tests.test_agents import ALL_TOGGLES, comparable, interrupt_at, mdp_args, read_scalars, run_agent

ROOT = Path(__file__).resolve().parents[1]
AGENTS = {"dqn": dqn, "c51": c51}


def member_dirs(runs_dir: Path, name: str, seeds) -> list[Path]:
    return [runs_dir / f"{name}-seed{seed}" for seed in seeds]


def assert_scalars_close(got: dict, want: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    got, want = comparable(got), comparable(want)
    assert set(got) == set(want)
    for tag in want:
        assert [step for step, _ in got[tag]] == [step for step, _ in want[tag]], tag
        for (step, a), (_, b) in zip(got[tag], want[tag]):
            assert math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b)), \
                f"{tag} at step {step}: {a} != {b}"


def population_args(agent: str, runs_dir: Path, mnist_dir: Path, seed: int, num_seeds: int, **overrides):
    return mdp_args(agent, runs_dir, mnist_dir, seed=seed, num_seeds=num_seeds, **overrides)


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_member_k_logs_what_the_single_run_with_seed_s_plus_k_logs(agent, tmp_path, mnist_dir):
    """Spec §2.1 with every toggle on: 300 updates, all scalars at rtol 1e-4 (diagnostics included)."""
    toggles = dict(ALL_TOGGLES, **({"loss": "hl_gauss"} if agent == "dqn" else {}))
    seeds = [3, 4, 5, 6]
    run_agent(population_args(agent, tmp_path / "pop", mnist_dir, 3, 4, **toggles))
    members = member_dirs(tmp_path / "pop", "run", seeds)
    for k, (seed, member) in enumerate(zip(seeds, members)):
        single = run_agent(mdp_args(agent, tmp_path / f"single{seed}", mnist_dir, seed=seed, **toggles))
        assert_scalars_close(read_scalars(member), read_scalars(single))
        config = json.loads((member / "config.json").read_text())
        assert config["seed"] == seed and config["num_seeds"] == 1
        assert config["population"] == {"seed": 3, "num_seeds": 4, "member": k, "lead": members[0].name,
                                        "members": [m.name for m in members]}
        assert json.loads((member / "status.json").read_text())["status"] == "completed"


def test_changing_one_members_seed_changes_nothing_in_another(tmp_path, mnist_dir):
    """Seed 4 is member 1 of the population from 3 and member 0 of the one from 4: the same run both times."""
    run_agent(population_args("dqn", tmp_path / "a", mnist_dir, 3, 2, cbp=True, swr=0.01))
    run_agent(population_args("dqn", tmp_path / "b", mnist_dir, 4, 2, cbp=True, swr=0.01))
    in_a = read_scalars(tmp_path / "a" / "run-seed4")
    in_b = read_scalars(tmp_path / "b" / "run-seed4")
    assert_scalars_close(in_a, in_b)
    other = read_scalars(tmp_path / "a" / "run-seed3")
    assert comparable(other)["losses/td_loss"] != comparable(in_a)["losses/td_loss"]


def test_a_nan_in_one_member_fails_it_alone(tmp_path, mnist_dir, monkeypatch):
    """Spec §4.1: member 1's loss turns NaN; it fails with its message, members 0 and 2 equal their single runs."""
    real_loss = dqn.regression_loss
    calls = {"n": 0}

    def poisoned(kind, q_taken, targets):
        loss = real_loss(kind, q_taken, targets)
        if q_taken.shape[0] == 3:  # only the population's update, not the single runs
            calls["n"] += 1
            if calls["n"] > 40:
                # A constant factor: member 1's loss and gradients turn NaN, the others' stay exact.
                loss = loss * torch.tensor([1.0, float("nan"), 1.0])
        return loss

    monkeypatch.setattr(dqn, "regression_loss", poisoned)
    run_agent(population_args("dqn", tmp_path / "pop", mnist_dir, 7, 3, checkpoint_every=100, log_every=100,
                              layer_norm=True, cbp=True))
    members = member_dirs(tmp_path / "pop", "run", [7, 8, 9])
    failed = json.loads((members[1] / "status.json").read_text())
    assert failed["status"] == "failed" and "NaN" in failed["message"] and "checkpoint" in failed["message"]
    for seed, member in ((7, members[0]), (9, members[2])):
        assert json.loads((member / "status.json").read_text())["status"] == "completed"
        single = run_agent(mdp_args("dqn", tmp_path / f"single{seed}", mnist_dir, seed=seed, checkpoint_every=100,
                                    log_every=100, layer_norm=True, cbp=True))
        assert_scalars_close(read_scalars(member), read_scalars(single))
    # The failed member's event file ends before the NaN window.
    last_loss_step = read_scalars(members[1])["losses/td_loss"][-1][0]
    assert last_loss_step < 400
    state = torch.load(members[0] / "checkpoint.pt", weights_only=True)
    assert state["failed"] == [False, True, False]


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_an_interrupted_population_resumes_exactly(agent, tmp_path, mnist_dir, monkeypatch):
    toggles = dict(cbp=True, swr=0.01, l2_init=1e-4, layer_norm=True, checkpoint_every=100)
    run_agent(population_args(agent, tmp_path / "full", mnist_dir, 1, 3, **toggles))
    interrupt_at(250, monkeypatch)
    run_agent(population_args(agent, tmp_path / "cut", mnist_dir, 1, 3, **toggles))
    cut = member_dirs(tmp_path / "cut", "run", [1, 2, 3])
    assert all(json.loads((m / "status.json").read_text())["status"] == "interrupted" for m in cut)
    assert not run_folder.checkpoint_path(cut[2]).exists() and run_folder.has_checkpoint(cut[2])
    AGENTS[agent].main(AGENTS[agent].Args(resume=str(cut[2])))  # any member's folder resumes the population
    for full, resumed in zip(member_dirs(tmp_path / "full", "run", [1, 2, 3]), cut):
        assert comparable(read_scalars(resumed)) == comparable(read_scalars(full))
        assert json.loads((resumed / "status.json").read_text())["status"] == "completed"


def test_a_population_killed_with_sigkill_resumes_to_the_uninterrupted_scalars(tmp_path, mnist_dir):
    """Spec §4.2: kill -9 at an arbitrary moment after a checkpoint, then --resume."""
    common = ["--env-id", "ImageMDP/mnist", "--data-dir", str(mnist_dir), "--num-images", "500",
              "--total-timesteps", "3000", "--learning-starts", "100", "--buffer-size", "4000", "--batch-size", "16",
              "--hidden-sizes", "32", "32", "--diag-every", "500", "--log-every", "100", "--episode-length", "50",
              "--shift", "label_permutation", "--shift-every", "1000", "--checkpoint-every", "500", "--no-cuda",
              "--num-seeds", "2", "--seed", "5", "--run-name", "run", "--cbp", "--layer-norm"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agent = [sys.executable, str(ROOT / "agents" / "dqn.py")]
    subprocess.run([*agent, *common, "--runs-dir", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    process = subprocess.Popen([*agent, *common, "--runs-dir", str(tmp_path / "cut")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lead = tmp_path / "cut" / "run-seed5"
    deadline = time.time() + 120
    while not run_folder.checkpoint_path(lead).exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    subprocess.run([*agent, "--resume", str(lead)], check=True, env=env, capture_output=True)
    for seed in (5, 6):
        full = read_scalars(tmp_path / "full" / f"run-seed{seed}")
        resumed = read_scalars(tmp_path / "cut" / f"run-seed{seed}")
        assert comparable(resumed) == comparable(full)


def test_a_two_member_atari_population_writes_two_correct_run_folders(tmp_path):
    args = dqn.Args(env_id="ALE/Breakout-v5", total_timesteps=200, learning_starts=100, buffer_size=500,
                    batch_size=8, diag_every=100, log_every=50, runs_dir=str(tmp_path), run_name="atari",
                    cuda=False, checkpoint_every=0, num_seeds=2, seed=11)
    dqn.main(args)
    for seed in (11, 12):
        run_dir = tmp_path / f"atari-seed{seed}"
        assert json.loads((run_dir / "config.json").read_text())["seed"] == seed
        assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
        scalars = read_scalars(run_dir)
        assert {"losses/td_loss", "charts/SPS", "plasticity/effective_rank"} <= set(scalars)
        assert scalars["losses/td_loss"][-1][0] == 200
    single = dqn.Args(env_id="ALE/Breakout-v5", total_timesteps=200, learning_starts=100, buffer_size=500,
                      batch_size=8, diag_every=100, log_every=50, runs_dir=str(tmp_path / "single"),
                      run_name="atari", cuda=False, checkpoint_every=0, seed=12)
    dqn.main(single)
    assert_scalars_close(read_scalars(tmp_path / "atari-seed12"), read_scalars(tmp_path / "single" / "atari"))


def test_zero_seeds_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--num-seeds must be an integer >= 1"):
        dqn.main(dqn.Args(runs_dir=str(tmp_path), cuda=False, num_seeds=0, env_id="ImageMDP/mnist"))
    assert not list(tmp_path.iterdir())


def test_a_population_whose_buffers_do_not_fit_is_one_clear_error(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setattr(experiment, "available_host_memory", lambda: 50 * 1024**2)
    args = population_args("dqn", tmp_path, mnist_dir, 1, 8, buffer_size=10_000)
    with pytest.raises(ConfigError, match=r"replay buffers need .* GiB \(8 member\(s\) x .* GiB") as error:
        run_agent(args)
    assert "--num-seeds" in str(error.value) and "--buffer-size" in str(error.value)
    assert not list(tmp_path.iterdir())


def test_resume_with_another_number_of_seeds_is_one_clear_error(tmp_path, mnist_dir):
    run_agent(population_args("dqn", tmp_path, mnist_dir, 1, 2, checkpoint_every=200))
    lead = tmp_path / "run-seed1"
    with pytest.raises(ConfigError, match=r"population of 2 seed\(s\).*without --num-seeds"):
        dqn.main(dqn.Args(resume=str(lead), num_seeds=3))


def test_a_bf16_population_trains_every_member(tmp_path, mnist_dir):
    """--bf16 goes through the batched members' matmuls too: every member learns and logs its own losses."""
    run_agent(population_args("dqn", tmp_path, mnist_dir, 1, 2, bf16=True, layer_norm=True))
    losses = [read_scalars(run_dir)["losses/td_loss"] for run_dir in member_dirs(tmp_path, "run", [1, 2])]
    assert all(math.isfinite(value) for series in losses for _, value in series)
    assert [step for step, _ in losses[0]] == [step for step, _ in losses[1]]
    assert [value for _, value in losses[0]] != [value for _, value in losses[1]]
