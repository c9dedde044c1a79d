"""Short real runs of both agents: the logs they write, determinism, resume, NaN losses, bad input.

Image-MDP runs use the real MNIST test split (skipped without it); Atari runs use
a real ROM shipped inside ale-py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import c51, dqn
from agents.harness import experiment
from agents.harness.checkpoint import NonFiniteLossError
from agents.harness.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
AGENTS = {"dqn": dqn, "c51": c51}

# Everything a researcher can switch on, at once (cadences short enough to fire in a few hundred steps).
ALL_TOGGLES = dict(layer_norm=True, l2=1e-5, l2_init=1e-5, swr=0.01, swr_head=0.02, cbp=True, cbp_maturity=10,
                   cbp_replacement_rate=0.01, snp=1e-4, snp_every=20, redo_every=25, reset_head_every=40,
                   double_q=True, entk_every=200, hessian_every=200, probe_every=200)
DIAGNOSTIC_TAGS = {
    "effective_rank", "srank", "stable_rank", "dead_frac", "linearized_frac", "dormant_frac", "preact_mean_abs",
    "preact_std", "weight_norm", "weight_magnitude", "dist_from_init", "feature_norm", "grad_norm", "target_mean",
    "target_std", "target_offset_ratio", "feature_sv_max", "feature_cond", "feature_mean_dominance",
    "feature_mean_alignment", "q_mean", "q_std",
}
OPTIONAL_TAGS = {"entk_effective_rank", "entk_cond", "hessian_max_eig", "probe_fit_loss"}
COMMON_TAGS = {"charts/SPS", "charts/epsilon", "losses/td_loss", "losses/q_values", "charts/task_id"}


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def mdp_args(agent: str, tmp_path: Path, mnist_dir: Path, **overrides):
    fields = dict(env_id="ImageMDP/mnist", data_dir=str(mnist_dir), num_images=500, total_timesteps=400,
                  learning_starts=100, buffer_size=1000, batch_size=16, hidden_sizes=[32, 32], diag_every=100,
                  diag_batch=128, log_every=50, episode_length=50, shift=["label_permutation"], shift_every=200,
                  runs_dir=str(tmp_path), run_name="run", cuda=False, checkpoint_every=0, v_min=-1.0, v_max=11.0)
    fields.update(overrides)
    return AGENTS[agent].Args(**fields)


def run_agent(args) -> Path:
    AGENTS["c51" if isinstance(args, c51.Args) else "dqn"].main(args)
    return Path(args.runs_dir) / args.run_name


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_image_mdp_run_with_every_toggle_writes_all_tags(agent, tmp_path, mnist_dir):
    extra = {"loss": "hl_gauss"} if agent == "dqn" else {}
    run_dir = run_agent(mdp_args(agent, tmp_path, mnist_dir, **ALL_TOGGLES, **extra))
    scalars = read_scalars(run_dir)
    tags = set(scalars)
    assert COMMON_TAGS <= tags
    assert {"charts/episodic_return", "charts/episodic_length", "charts/accuracy",
            "charts/task_final_accuracy", "charts/task_return"} <= tags
    assert {f"plasticity/{name}" for name in DIAGNOSTIC_TAGS | OPTIONAL_TAGS} <= tags
    assert "plasticity/target_clip_frac" in tags  # categorical losses log the clipped fraction
    # Both heads here are categorical: SWR logs the factor it multiplies the logits by (spec methods-v2 §13).
    assert {"plasticity/swr_logit_scale", "plasticity/cbp_replacements", "plasticity/redo_resets",
            "plasticity/head_resets", "plasticity/snp_applications", "plasticity/l2_penalty"} <= tags
    # Per-layer metrics carry the layer name (hidden blocks of the MLP torso).
    assert any(tag.startswith("plasticity/dead_frac/torso.") for tag in tags)
    # Episodes of 50 steps over 400 steps: 8 episodes, each logged exactly once (pitfall 13).
    assert [step for step, _ in scalars["charts/episodic_return"]] == list(range(50, 401, 50))
    assert all(0 <= value <= 50 for _, value in scalars["charts/episodic_return"])
    # SPS over the last window, from the first window on (pitfall 12).
    assert scalars["charts/SPS"][0][0] == 50
    # The task switches at 200 and 400 each log the finished task's final accuracy.
    assert [step for step, _ in scalars["charts/task_final_accuracy"]] == [200, 400]
    assert all(math.isfinite(value) for series in scalars.values() for _, value in series)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["agent"] == agent and config["swr"] == 0.01 and config["cbp"] is True
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    # The checkpoint loads with the safe loader.
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 400 and "buffer" in state


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_atari_run_with_every_toggle_writes_all_tags(agent, tmp_path):
    # eNTK stays on: its vmap must cope with the channels-last Nature CNN (the Hessian and probe are slow here).
    toggles = {**ALL_TOGGLES, "hessian_every": 0, "probe_every": 0}
    args = AGENTS[agent].Args(env_id="ALE/Breakout-v5", total_timesteps=400, learning_starts=200, buffer_size=500,
                              batch_size=8, diag_every=200, diag_batch=32, log_every=100, start_e=1.0, end_e=1.0,
                              runs_dir=str(tmp_path), run_name="atari", cuda=False, checkpoint_every=0,
                              **toggles)
    scalars = read_scalars(run_agent(args))
    assert COMMON_TAGS <= set(scalars)
    assert {f"plasticity/{name}" for name in DIAGNOSTIC_TAGS | {"entk_effective_rank", "entk_cond"}} <= set(scalars)
    # Random play in Breakout loses 5 lives well within 400 agent steps: real game scores are logged.
    returns = scalars["charts/episodic_return"]
    assert returns and all(value >= 0 and value == int(value) for _, value in returns)
    assert any(tag.startswith("plasticity/dead_frac/torso.") for tag in scalars)


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_bf16_updates_run_every_toggle_in_bfloat16_deterministically(agent, tmp_path, mnist_dir, monkeypatch):
    entered = []
    real_precision = experiment.torso_precision

    def spy(dtype):
        entered.append(dtype)
        return real_precision(dtype)

    monkeypatch.setattr(experiment, "torso_precision", spy)
    toggles = {**ALL_TOGGLES, "entk_every": 0, "hessian_every": 0, "probe_every": 0,
               **({"loss": "two_hot"} if agent == "dqn" else {})}
    low = read_scalars(run_agent(mdp_args(agent, tmp_path / "a", mnist_dir, bf16=True, **toggles)))
    # 400 steps, learning after 100, an update every 4 steps: 75 updates, each in bfloat16.
    assert entered == [torch.bfloat16] * 75
    assert {f"plasticity/{name}" for name in DIAGNOSTIC_TAGS} <= set(low)
    assert {"plasticity/cbp_replacements", "plasticity/redo_resets", "plasticity/swr_logit_scale"} <= set(low)
    assert all(math.isfinite(value) for series in low.values() for _, value in series)
    again = read_scalars(run_agent(mdp_args(agent, tmp_path / "b", mnist_dir, bf16=True, **toggles)))
    assert comparable(again) == comparable(low)
    entered.clear()
    full = read_scalars(run_agent(mdp_args(agent, tmp_path / "c", mnist_dir, **toggles)))
    assert entered == [None] * 75
    assert comparable(full)["losses/td_loss"] != comparable(low)["losses/td_loss"]


def interrupt_at(step: int, monkeypatch) -> None:
    """Stop the first (not resumed) run at ``step`` exactly as Ctrl-C does: honoured at the end of the iteration."""
    original = experiment.Run.end_iteration

    def end_iteration(self, global_step, obs, *rest):
        if global_step == step and not self.args.resume:
            self.request_stop()
        return original(self, global_step, obs, *rest)

    monkeypatch.setattr(experiment.Run, "end_iteration", end_iteration)


def comparable(scalars: dict) -> dict:
    """Everything but wall-clock rates."""
    return {tag: series for tag, series in scalars.items() if tag != "charts/SPS"}


def test_same_seed_gives_identical_scalars(tmp_path, mnist_dir):
    first = read_scalars(run_agent(mdp_args("dqn", tmp_path / "a", mnist_dir, swr=0.01, cbp=True)))
    second = read_scalars(run_agent(mdp_args("dqn", tmp_path / "b", mnist_dir, swr=0.01, cbp=True)))
    assert comparable(first) == comparable(second)
    third = read_scalars(run_agent(mdp_args("dqn", tmp_path / "c", mnist_dir, swr=0.01, cbp=True, seed=2)))
    assert comparable(first)["losses/td_loss"] != comparable(third)["losses/td_loss"]


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_resume_equals_uninterrupted(agent, tmp_path, mnist_dir, monkeypatch):
    toggles = dict(cbp=True, swr=0.01, l2_init=1e-4, layer_norm=True, checkpoint_every=100)
    uninterrupted = read_scalars(run_agent(mdp_args(agent, tmp_path / "full", mnist_dir, **toggles)))

    interrupt_at(250, monkeypatch)
    run_dir = run_agent(mdp_args(agent, tmp_path / "cut", mnist_dir, **toggles))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["global_step"] == 250
    AGENTS[agent].main(AGENTS[agent].Args(resume=str(run_dir)))
    resumed = read_scalars(run_dir)
    assert comparable(resumed) == comparable(uninterrupted)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


def test_resume_after_crash_drops_the_steps_after_the_checkpoint(tmp_path, mnist_dir, monkeypatch):
    """A crash (no clean stop) loses the steps after the last checkpoint; the resumed run logs them once."""
    args = mdp_args("dqn", tmp_path, mnist_dir, checkpoint_every=200)
    reference = read_scalars(run_agent(mdp_args("dqn", tmp_path / "ref", mnist_dir, checkpoint_every=200)))
    original = experiment.Run.end_iteration

    def crash_at_300(self, global_step, obs, *rest):
        keep_going = original(self, global_step, obs, *rest)
        if global_step == 300 and not self.args.resume:
            self.tracker.writers[0].flush()
            raise RuntimeError("simulated crash")
        return keep_going

    monkeypatch.setattr(experiment.Run, "end_iteration", crash_at_300)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_agent(args)
    dqn.main(dqn.Args(resume=str(tmp_path / "run")))
    assert comparable(read_scalars(tmp_path / "run")) == comparable(reference)


def test_nan_loss_stops_with_a_clear_message_and_a_good_checkpoint(tmp_path, mnist_dir, monkeypatch):
    real_loss = dqn.regression_loss
    calls = {"n": 0}

    def poisoned(kind, q_taken, targets):
        calls["n"] += 1
        loss = real_loss(kind, q_taken, targets)
        return loss * float("nan") if calls["n"] > 40 else loss

    monkeypatch.setattr(dqn, "regression_loss", poisoned)
    args = mdp_args("dqn", tmp_path, mnist_dir, checkpoint_every=100, log_every=100)
    with pytest.raises(NonFiniteLossError, match="NaN/inf") as error:
        run_agent(args)
    assert "learning-rate" in str(error.value)
    run_dir = tmp_path / "run"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "NaN" in status["message"]
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    # 40 good updates = 160 steps after learning starts at 100: the last good checkpoint is at 200.
    assert state["global_step"] == 200
    assert all(torch.isfinite(p).all() for p in state["q_network"].values())


@pytest.mark.parametrize("agent, overrides, message", [
    ("c51", dict(v_min=5.0, v_max=5.0), "--v-min"),
    ("dqn", dict(loss="hl_gauss", n_atoms=1), "--n-atoms must be an integer >= 2"),
    ("dqn", dict(env_id="ALE/Breakout-v5", shift=["label_permutation"]), "--atari-shift"),
    ("dqn", dict(env_id="ImageMDP/mnist", atari_shift=["games"]), "--shift"),
    ("dqn", dict(env_id="ImageMDP/svhn"), "ImageMDP/mnist"),
    ("dqn", dict(env_id="ALE/Breakuot-v5"), "Breakout"),
    ("dqn", dict(buffer_size=8, batch_size=32), "--buffer-size"),
])
def test_invalid_flags_are_one_clear_error_before_any_work(agent, overrides, message, tmp_path):
    args = AGENTS[agent].Args(runs_dir=str(tmp_path), cuda=False, total_timesteps=100, **overrides)
    with pytest.raises(ConfigError, match=message.replace("-", r"\-").replace("+", r"\+")):
        AGENTS[agent].main(args)
    assert not list(tmp_path.iterdir())  # nothing written: no run folder, no event file


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a missing CUDA device")
def test_cuda_requested_without_a_device_is_a_clear_cli_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "agents" / "dqn.py"), "--cuda", "--runs-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --cuda was given but no CUDA device is available; run with --no-cuda or on a machine with a GPU"]


def test_bf16_on_a_gpu_without_bfloat16_is_one_clear_error(tmp_path, monkeypatch):
    # What a V100 or T4 reports; the check runs before anything touches the device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # Emulated bfloat16 (a V100 casting) counts as unsupported: it would be slower than float32.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    args = dqn.Args(runs_dir=str(tmp_path), cuda=True, bf16=True, total_timesteps=100)
    with pytest.raises(ConfigError, match=r"--bf16 needs a GPU with bfloat16 support"):
        dqn.main(args)
    assert not list(tmp_path.iterdir())


def test_unknown_env_id_on_the_cli_lists_the_valid_ones(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "agents" / "c51.py"), "--env-id", "ImageMDP/svhn",
                             "--no-cuda", "--runs-dir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ImageMDP/mnist" in lines[0] and "Traceback" not in result.stderr


def test_resume_of_a_folder_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"env_id": "ImageMDP/mnist"}))
    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        dqn.main(dqn.Args(resume=str(tmp_path)))


def test_two_game_sequence_writes_per_game_and_task_tags(tmp_path):
    args = c51.Args(env_id="ALE/Breakout-v5", atari_shift=["games"], games=["Pong"], switch_every=150,
                    total_timesteps=400, learning_starts=100, buffer_size=500, batch_size=8, diag_every=0,
                    log_every=100, start_e=1.0, end_e=1.0, runs_dir=str(tmp_path), run_name="two_games", cuda=False,
                    checkpoint_every=0)
    scalars = read_scalars(run_agent(args))
    # Episodes in flight end (truncated) at each switch: both games get returns under their own tag.
    assert {"charts/episodic_return/breakout", "charts/episodic_return/pong"} <= set(scalars)
    task_ids = {value for _, value in scalars["charts/task_id"]}
    assert task_ids == {0.0, 1.0, 2.0}
    assert "charts/task_return" in scalars
    # Pong scores are in [-21, 21] per game; Breakout's are >= 0.
    assert all(value >= 0 for _, value in scalars["charts/episodic_return/breakout"])


def test_atari_run_resumes_with_fresh_episodes(tmp_path, monkeypatch):
    interrupt_at(200, monkeypatch)
    args = dqn.Args(env_id="ALE/Breakout-v5", total_timesteps=300, learning_starts=100, buffer_size=500, batch_size=8,
                    diag_every=0, log_every=50, runs_dir=str(tmp_path), run_name="atari", cuda=False,
                    checkpoint_every=0)
    run_dir = run_agent(args)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    dqn.main(dqn.Args(resume=str(run_dir)))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["global_step"] == 300
    steps = [step for step, _ in read_scalars(run_dir)["losses/td_loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 300 and 250 in steps


def test_resume_of_a_corrupt_checkpoint_or_config_is_a_clear_error(tmp_path, mnist_dir):
    run_dir = run_agent(mdp_args("dqn", tmp_path, mnist_dir, total_timesteps=200))
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt"):
        dqn.main(dqn.Args(resume=str(run_dir)))
    (run_dir / "config.json").write_text("{ truncated")
    with pytest.raises(ConfigError, match="corrupt"):
        dqn.main(dqn.Args(resume=str(run_dir)))


def test_resume_with_the_other_agent_is_a_clear_error(tmp_path, mnist_dir):
    run_dir = run_agent(mdp_args("dqn", tmp_path, mnist_dir, total_timesteps=200))
    with pytest.raises(ConfigError, match="agents/dqn.py"):
        c51.main(c51.Args(resume=str(run_dir)))


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PLASTICITY_NO_DOWNLOAD", "1")
    args = dqn.Args(env_id="ImageMDP/fashion_mnist", data_dir=str(tmp_path / "empty"), runs_dir=str(tmp_path),
                    cuda=False, total_timesteps=100)
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte.gz|train-images-idx3-ubyte.gz"):
        dqn.main(args)


def test_exploration_is_independent_of_the_environment_stream(tmp_path, mnist_dir):
    """A uniformly random policy (epsilon = 1) scores about 1/K: its draws must not replay the env's labels."""
    args = mdp_args("dqn", tmp_path, mnist_dir, start_e=1.0, end_e=1.0, learning_starts=10_000, total_timesteps=1000,
                    episode_length=100, num_envs=4, shift=["none"], shift_every=1000, diag_every=0)
    returns = [value for _, value in read_scalars(run_agent(args))["charts/episodic_return"]]
    assert len(returns) == 8  # 4 envs x 250 steps each, episodes of 100
    assert 0.05 < sum(returns) / (100 * len(returns)) < 0.15  # K = 10 classes


def test_resume_of_a_categorical_dqn_run(tmp_path, mnist_dir, monkeypatch):
    toggles = dict(loss="hl_gauss", v_min=-1.0, v_max=11.0, checkpoint_every=100)
    uninterrupted = read_scalars(run_agent(mdp_args("dqn", tmp_path / "full", mnist_dir, **toggles)))
    interrupt_at(250, monkeypatch)
    run_dir = run_agent(mdp_args("dqn", tmp_path / "cut", mnist_dir, **toggles))
    dqn.main(dqn.Args(resume=str(run_dir)))  # the command line says nothing about the loss
    assert comparable(read_scalars(run_dir)) == comparable(uninterrupted)


def test_shift_every_counts_env_steps_with_several_envs(tmp_path, mnist_dir):
    args = mdp_args("dqn", tmp_path, mnist_dir, num_envs=4, shift_every=100, total_timesteps=400, log_every=100)
    scalars = read_scalars(run_agent(args))
    assert [step for step, _ in scalars["charts/task_final_accuracy"]] == [100, 200, 300, 400]


def test_the_last_task_is_closed_at_the_end_of_the_run(tmp_path, mnist_dir):
    scalars = read_scalars(run_agent(mdp_args("dqn", tmp_path, mnist_dir, shift_every=300, total_timesteps=400)))
    assert [step for step, _ in scalars["charts/task_final_accuracy"]] == [300, 400]


@pytest.mark.parametrize("overrides, message", [
    (dict(reward_offset=5.0), "--reward-offset only act through --atari-shift"),
    (dict(games=["Pong"]), "--games only act through --atari-shift"),
    (dict(snp=0.1), "act at task switches"),
    (dict(reset_head_every=-1), "act at task switches"),
    (dict(atari_shift=["games"], games=["Pong"]), "--switch-every N"),
    (dict(atari_shift=["games"], games=["Pong"], switch_every=101, num_envs=2), "multiple of --num-envs"),
])
def test_atari_flags_that_would_be_silently_ignored_are_errors(overrides, message, tmp_path):
    args = dqn.Args(env_id="ALE/Breakout-v5", runs_dir=str(tmp_path), cuda=False, total_timesteps=100, **overrides)
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        dqn.main(args)


def test_reusing_the_folder_of_a_run_that_never_checkpointed_is_an_error(tmp_path, mnist_dir, monkeypatch):
    def crash(self, *args, **kwargs):
        raise RuntimeError("crash before the first checkpoint")

    monkeypatch.setattr(experiment.Run, "checkpoint", crash)
    with pytest.raises(RuntimeError):
        run_agent(mdp_args("dqn", tmp_path, mnist_dir, total_timesteps=200))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="stopped before its first checkpoint"):
        run_agent(mdp_args("dqn", tmp_path, mnist_dir, total_timesteps=200))


@pytest.mark.gpu
def test_cuda_run_with_a_cpu_buffer_resumes(tmp_path, mnist_dir, monkeypatch):
    interrupt_at(250, monkeypatch)
    run_dir = run_agent(mdp_args("c51", tmp_path, mnist_dir, cuda=True, buffer_device="cpu", cbp=True, swr=0.01,
                                 checkpoint_every=100))
    c51.main(c51.Args(resume=str(run_dir)))
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


def test_bf16_on_a_cpu_without_native_bfloat16_says_it_will_be_slower(tmp_path, mnist_dir, monkeypatch, capsys):
    flags = tmp_path / "cpuinfo"
    flags.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert experiment.cpu_has_native_bf16(str(flags)) is False
    flags.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert experiment.cpu_has_native_bf16(str(flags)) is True
    assert experiment.cpu_has_native_bf16(str(tmp_path / "absent")) is None

    monkeypatch.setattr(experiment, "cpu_has_native_bf16", lambda: False)
    run_agent(mdp_args("dqn", tmp_path / "runs", mnist_dir, bf16=True, total_timesteps=120))
    assert "no native bfloat16" in capsys.readouterr().err


def test_a_crash_inside_the_loop_marks_the_run_failed_and_keeps_its_traceback(tmp_path, mnist_dir, monkeypatch):
    """No module-level "active run": the run's own ``with`` block writes the failed status."""
    def broken_record(self, global_step, step):
        if global_step == 120:
            raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(experiment.Run, "record", broken_record)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        run_agent(mdp_args("dqn", tmp_path, mnist_dir))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "a bug in the loop" in status["message"]
    assert not hasattr(experiment, "_active_run")
