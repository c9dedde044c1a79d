"""Greedy evaluation (--eval-every), saved models (--save-model), scripts/evaluate.py and videos.

Image-MDP runs use the MNIST test images of tests/conftest.py; Atari runs a real ROM
shipped inside ale-py, with epsilon 1 in the evaluations so that games end quickly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from agents import c51, dqn
from agents.harness import evaluation, experiment, run_folder, video
from agents.harness.evaluation import Evaluator
from envs.atari_scores import human_normalized, reference_scores
from envs.factory import make_env
from scripts import evaluate
from tests.test_agents import read_scalars

ROOT = Path(__file__).resolve().parents[1]
AGENTS = {"dqn": dqn, "c51": c51}
needs_video = pytest.mark.skipif(not video.available(), reason='PyAV missing: pip install -e ".[video]"')


def mdp_args(agent: str, runs_dir: Path, mnist_dir: Path, **overrides):
    fields = dict(env_id="ImageMDP/mnist", data_dir=str(mnist_dir), num_images=500, total_timesteps=300,
                  learning_starts=100, buffer_size=1000, batch_size=16, hidden_sizes=[32, 32], diag_every=100,
                  diag_batch=64, log_every=50, episode_length=50, shift=["label_permutation"], shift_every=150,
                  runs_dir=str(runs_dir), run_name="run", cuda=False, checkpoint_every=0, v_min=-1.0, v_max=11.0)
    fields.update(overrides)
    args = AGENTS[agent].Args(**fields)
    experiment.resolve_args(args, agent=agent)  # the flags a run trains with (main() does this too)
    return args


def atari_args(runs_dir: Path, **overrides):
    fields = dict(env_id="ALE/Breakout-v5", total_timesteps=200, learning_starts=180, buffer_size=500, batch_size=8,
                  diag_every=0, log_every=100, runs_dir=str(runs_dir), run_name="atari", cuda=False,
                  checkpoint_every=0, eval_every=200, eval_episodes=2, eval_epsilon=1.0)
    fields.update(overrides)
    args = dqn.Args(**fields)
    experiment.resolve_args(args, agent="dqn")  # the flags a run trains with (main() does this too)
    return args


def run(args) -> Path:
    AGENTS["c51" if isinstance(args, c51.Args) else "dqn"].main(args)
    return Path(args.runs_dir) / args.run_name


def number_after(prefix: str, line: str) -> float:
    assert line.startswith(prefix + " "), line
    return float(line[len(prefix) + 1:].split()[0])


def is_eval_tag(tag: str) -> bool:
    return tag.startswith("charts/eval_")


# ---- evaluation during training ----

def test_evaluation_leaves_training_untouched_and_logs_at_its_steps(tmp_path, mnist_dir):
    toggles = dict(cbp=True, cbp_maturity=10, redo_every=25)  # methods with activation hooks and their own RNG
    plain = read_scalars(run(mdp_args("dqn", tmp_path / "plain", mnist_dir, **toggles)))
    evaluated = read_scalars(run(mdp_args("dqn", tmp_path / "eval", mnist_dir, eval_every=100, eval_episodes=2,
                                          **toggles)))
    training = {tag: series for tag, series in evaluated.items() if not is_eval_tag(tag) and tag != "charts/SPS"}
    assert training == {tag: series for tag, series in plain.items() if tag != "charts/SPS"}
    assert {"charts/eval_return", "charts/eval_length", "charts/eval_accuracy"} <= set(evaluated)
    assert "charts/eval_hns" not in evaluated  # Atari only
    for tag in ("charts/eval_return", "charts/eval_accuracy", "charts/eval_length"):
        assert [step for step, _ in evaluated[tag]] == [100, 200, 300], tag
    assert all(0.0 <= value <= 1.0 for _, value in evaluated["charts/eval_accuracy"])
    assert all(value == 50 for _, value in evaluated["charts/eval_length"])  # --episode-length steps
    # The easy variant pays 1 per right answer: the return is the accuracy times the episode length.
    for (_, accuracy), (_, ret) in zip(evaluated["charts/eval_accuracy"], evaluated["charts/eval_return"]):
        assert ret == pytest.approx(accuracy * 50, abs=1e-4)


def test_a_resumed_run_logs_the_evaluations_of_an_uninterrupted_one(tmp_path, mnist_dir, monkeypatch):
    flags = dict(eval_every=100, eval_episodes=2, checkpoint_every=100, diag_every=0)
    uninterrupted = read_scalars(run(mdp_args("dqn", tmp_path / "full", mnist_dir, **flags)))
    original = experiment.Run.end_iteration

    def stop_at_150(self, global_step, obs, *rest):  # what Ctrl-C does, honoured at the end of the iteration
        if global_step == 150 and not self.args.resume:
            self.request_stop()
        return original(self, global_step, obs, *rest)

    monkeypatch.setattr(experiment.Run, "end_iteration", stop_at_150)
    run_dir = run(mdp_args("dqn", tmp_path / "cut", mnist_dir, **flags))
    dqn.main(dqn.Args(resume=str(run_dir)))
    resumed = read_scalars(run_dir)
    assert [step for step, _ in resumed["charts/eval_return"]] == [100, 200, 300]
    assert {tag: series for tag, series in resumed.items() if tag != "charts/SPS"} == \
        {tag: series for tag, series in uninterrupted.items() if tag != "charts/SPS"}


def test_a_population_logs_each_members_evaluations_as_its_single_run(tmp_path, mnist_dir):
    """Evaluation streams are per member: member k's charts/eval_* are those of the single run with seed s+k."""
    flags = dict(eval_every=100, eval_episodes=2, diag_every=0, cbp=True)
    run(mdp_args("dqn", tmp_path / "pop", mnist_dir, seed=3, num_seeds=2, **flags))
    for seed in (3, 4):
        member = read_scalars(tmp_path / "pop" / f"run-seed{seed}")
        single = read_scalars(run(mdp_args("dqn", tmp_path / f"single{seed}", mnist_dir, seed=seed, **flags)))
        for tag in ("charts/eval_return", "charts/eval_accuracy", "charts/eval_length"):
            assert [step for step, _ in member[tag]] == [100, 200, 300], (seed, tag)
            assert [step for step, _ in member[tag]] == [step for step, _ in single[tag]], (seed, tag)
            for (step, got), (_, want) in zip(member[tag], single[tag]):
                assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (seed, tag, step)
    returns = [read_scalars(tmp_path / "pop" / f"run-seed{seed}")["charts/eval_return"] for seed in (3, 4)]
    assert returns[0] != returns[1]  # the members evaluate on their own streams, not one shared stream


def test_image_mdp_evaluation_copy_plays_the_current_task_and_leaves_the_env_alone(mnist_dir):
    """A population of two: member k's copy plays member k's current task (its own images and permutations)."""
    args = mdp_args("dqn", Path("unused"), mnist_dir, shift=["label_permutation", "pixel_permutation"],
                    shift_every=5, num_envs=1)
    env = make_env(args, torch.device("cpu"), seeds=[1, 2])
    env.reset(seeds=[1, 2])
    for _ in range(5):
        env.step(torch.zeros(2, 1, dtype=torch.long))
    assert env.task_id == 1
    state = env.state_dict()
    copy = env.evaluation_copy(3)
    obs, info = copy.reset(seeds=[7, 8])
    for _ in range(12):  # past the env's switch period: the copy never switches
        obs, _reward, _terminated, _truncated, info = copy.step(info["label"])
        assert bool(_reward.eq(1).all())  # naming the latent class is right in the easy variant, in every member
    assert copy.task_id == 1 and copy.num_envs == 3 and obs.shape[:2] == (2, 3)
    assert copy.image_labels is env.image_labels and copy.pixel_permutation is env.pixel_permutation
    assert not torch.equal(env.pixel_permutation[0], env.pixel_permutation[1])  # each member its own task
    after = env.state_dict()
    assert after["step_count"] == 5 and torch.equal(after["state"], state["state"])
    assert all(torch.equal(a, b) for a, b in zip(after["rng"]["generators"], state["rng"]["generators"]))
    assert torch.equal(after["rng"]["pool"], state["rng"]["pool"])


def zero_q(num_actions: int):
    """q_values of a network that knows nothing: [M, E, ...] observations -> [M, E, actions] zeros."""
    return lambda obs: torch.zeros(*obs.shape[:2], num_actions)


def test_evaluator_splits_episodes_in_fixed_quotas(mnist_dir):
    args = mdp_args("dqn", Path("unused"), mnist_dir, eval_episodes=21, episode_length=7)
    evaluator = Evaluator(args, torch.device("cpu"))
    assert evaluator.num_envs == evaluation.MAX_ENVS and sorted(evaluator.quotas.tolist()) == [1] * 11 + [2] * 5
    env = make_env(args, torch.device("cpu"))
    env.reset(seeds=[args.seed])
    [result] = evaluator.evaluate(zero_q(10), 100, follow=env)
    assert len(result.returns) == 21 and set(result.lengths.tolist()) == {7}
    [again] = evaluator.evaluate(zero_q(10), 100, follow=env)
    [other] = evaluator.evaluate(zero_q(10), 200, follow=env)
    assert again.accuracy == result.accuracy and result.returns.tolist() == again.returns.tolist()
    assert other.returns.tolist() != result.returns.tolist() or other.accuracy != result.accuracy


def test_population_evaluator_gives_each_member_the_episodes_of_its_single_run(mnist_dir):
    """Member k of a population evaluation plays what the evaluation of the single run with seed s+k plays."""
    args = mdp_args("dqn", Path("unused"), mnist_dir, eval_episodes=5, episode_length=9, eval_epsilon=0.5)
    population = make_env(args, torch.device("cpu"), seeds=[3, 4])
    population.reset(seeds=[3, 4])
    results = Evaluator(args, torch.device("cpu"), seeds=[3, 4]).evaluate(zero_q(10), 100, follow=population)
    assert len(results) == 2
    for seed, result in zip([3, 4], results):
        single = make_env(args, torch.device("cpu"), seeds=[seed])
        single.reset(seeds=[seed])
        [alone] = Evaluator(args, torch.device("cpu"), seeds=[seed]).evaluate(zero_q(10), 100, follow=single)
        assert result.returns.tolist() == alone.returns.tolist() and result.accuracy == alone.accuracy
    assert results[0].returns.tolist() != results[1].returns.tolist() or results[0].accuracy != results[1].accuracy


def test_nonstationary_atari_is_evaluated_in_the_training_task_per_game():
    args = dqn.Args(env_id="ALE/Pong-v5", atari_shift=["games"], games=["Breakout"], switch_every=100,
                    eval_every=100, eval_episodes=1, eval_epsilon=1.0, cuda=False)
    experiment.resolve_args(args, agent="dqn")  # the flags a run would train with (protocol, family defaults)
    evaluator = Evaluator(args, torch.device("cpu"))
    [result] = evaluator.evaluate(zero_q(18), 100, follow=SimpleNamespace(task_id=1))
    evaluator.close()
    assert result.game == "breakout" and len(result.returns) == 1
    scalars = result.scalars()
    assert scalars["charts/eval_return/breakout"] == scalars["charts/eval_return"] == result.returns[0]
    assert scalars["charts/eval_hns/breakout"] == scalars["charts/eval_hns"] == pytest.approx(
        human_normalized(result.returns[0], "Breakout"))


def test_human_normalised_scores_come_from_the_reference_table():
    random, human = reference_scores()["breakout"]
    assert (random, human) == (1.7, 30.5)
    assert human_normalized(random, "breakout") == 0.0 and human_normalized(human, "Breakout") == 1.0
    assert human_normalized(5.0, "ms_pacman") == human_normalized(5.0, "MsPacman")
    assert human_normalized(5.0, "adventure") is None  # no reference: no charts/eval_hns


# ---- Atari: eval_hns, video, saved model, scripts/evaluate.py ----

@needs_video
def test_atari_run_logs_hns_records_a_video_and_saves_a_model_that_evaluate_replays(tmp_path):
    run_dir = run(atari_args(tmp_path, capture_video=True, save_model=True))
    scalars = read_scalars(run_dir)
    [(step, mean_return)] = scalars["charts/eval_return"]
    assert step == 200 and mean_return >= 0
    [(_, hns)] = scalars["charts/eval_hns"]
    assert hns == pytest.approx((mean_return - 1.7) / (30.5 - 1.7), abs=1e-5)
    frames = video.count_frames(run_folder.video_path(run_dir, "eval_200"))
    assert 0 < frames <= scalars["charts/eval_length"][0][1] * 2  # env 0's game, of the two

    weights = torch.load(run_folder.model_path(run_dir), weights_only=True)
    network = dqn.QNetwork((4, 84, 84), 4, dqn.Args(), None)
    assert set(weights) == set(network.state_dict()) and all(t.device.type == "cpu" for t in weights.values())

    # The run's own episodes (same seed, episodes, epsilon, emulators): the logged mean exactly.
    result = subprocess.run([sys.executable, "scripts/evaluate.py", str(run_dir)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("mean return ") and "(95% bootstrap CI " in lines[1]
    assert number_after("mean return", lines[1]) == pytest.approx(mean_return, abs=0.006)
    assert number_after("human-normalised", lines[2]) == pytest.approx(hns, abs=0.0006)


@pytest.mark.slow
def test_evaluate_plays_a_nonstationary_atari_members_task_with_its_seed(tmp_path, capsys):
    """Member 1 of a --atari-shift games population: its own schedule from the lead's checkpoint (Breakout at
    step 200), its own seed; epsilon 1, so the logged mean is replayed whatever the weights."""
    run(atari_args(tmp_path, env_id="ALE/Pong-v5", atari_shift=["games"], games=["Breakout"], switch_every=150,
                   num_seeds=2, run_name="shift"))
    lead, member = tmp_path / "shift-seed1", tmp_path / "shift-seed2"
    logged = read_scalars(member)
    [(step, mean_return)] = logged["charts/eval_return/breakout"]
    assert step == 200 and logged["charts/eval_return"] == [(200, mean_return)]
    assert read_scalars(lead)["charts/eval_length"] != logged["charts/eval_length"]  # member 0 played other games
    capsys.readouterr()
    assert evaluate.main([str(member), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("checkpoint.pt (step 200), 2 episodes at epsilon 1")
    assert number_after("mean return", lines[1]) == pytest.approx(mean_return, abs=0.006)
    assert number_after("human-normalised", lines[2]) == pytest.approx(logged["charts/eval_hns"][0][1], abs=0.0006)


@needs_video
def test_atari_video_has_one_frame_per_step_of_the_recorded_game(tmp_path):
    args = atari_args(tmp_path, capture_video=True)
    evaluator = Evaluator(args, torch.device("cpu"))
    path = tmp_path / "game.mp4"
    [result] = evaluator.evaluate(zero_q(4), 0, video_paths=[path])
    evaluator.close()
    assert result.video == path
    first_game = result.lengths[result.envs == 0][0]
    assert video.count_frames(path) == first_game
    import av

    with av.open(str(path)) as container:  # the raw RGB screen, not the 84x84 frames
        frame = next(container.decode(video=0))
    assert (frame.height, frame.width) == (210, 160)


@needs_video
def test_image_mdp_video_shows_each_observation_with_the_answer(tmp_path, mnist_dir):
    args = mdp_args("dqn", tmp_path, mnist_dir, episode_length=30, eval_episodes=2)
    env = make_env(args, torch.device("cpu"))
    env.reset(seeds=[0])
    path = tmp_path / "answers.mp4"
    [result] = Evaluator(args, torch.device("cpu")).evaluate(zero_q(10), 0, follow=env, video_paths=[path])
    assert video.count_frames(path) == 30 == result.lengths[0]
    frame = video.answer_frame(torch.zeros(1, 28, 28, dtype=torch.uint8).numpy(), 3, 3)
    assert frame.shape == (28 * 8 + 48, 28 * 8, 3) and frame[28 * 8:].any()  # the band holds the digits


# ---- scripts/evaluate.py on image-MDP runs of both agents, and its errors ----

@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_evaluate_replays_the_last_evaluation_of_an_image_mdp_run(agent, tmp_path, mnist_dir, capsys):
    run_dir = run(mdp_args(agent, tmp_path, mnist_dir, total_timesteps=200, eval_every=200, eval_episodes=3,
                           save_model=True, diag_every=0))
    scalars = read_scalars(run_dir)
    assert evaluate.main([str(run_dir), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("model.pt (step 200), 3 episodes at epsilon 0.001")
    assert "(95% bootstrap CI " in lines[1]
    assert number_after("mean return", lines[1]) == pytest.approx(scalars["charts/eval_return"][0][1], abs=0.006)
    assert number_after("greedy accuracy", lines[2]) == pytest.approx(scalars["charts/eval_accuracy"][0][1],
                                                                      abs=0.0006)
    # Without model.pt: the checkpoint's q_network, same numbers.
    run_folder.model_path(run_dir).unlink()
    assert evaluate.main([str(run_dir), "--device", "cpu", "--episodes", "5", "--epsilon", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint.pt (step 200), 5 episodes at epsilon 0.5" in out and "mean return" in out


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_evaluate_replays_a_population_members_last_evaluation(agent, tmp_path, mnist_dir, capsys):
    """A member's folder: its own model.pt, or its slice of the lead's checkpoint, in its own task."""
    run(mdp_args(agent, tmp_path, mnist_dir, total_timesteps=200, eval_every=200, eval_episodes=3, save_model=True,
                 diag_every=0, seed=5, num_seeds=2))
    lead, member = tmp_path / "run-seed5", tmp_path / "run-seed6"
    assert run_folder.checkpoint_path(lead).exists() and not run_folder.checkpoint_path(member).exists()
    logged = read_scalars(member)
    [(step, logged_return)] = logged["charts/eval_return"]
    [(_, logged_accuracy)] = logged["charts/eval_accuracy"]
    assert step == 200 and logged_return != read_scalars(lead)["charts/eval_return"][0][1]  # not member 0's
    capsys.readouterr()  # the run's progress lines

    def replay(*flags) -> list[str]:
        assert evaluate.main([str(member), "--device", "cpu", *flags]) == 0
        return capsys.readouterr().out.splitlines()

    for source in ("model.pt", "checkpoint.pt"):  # with --save-model; then the lead's checkpoint alone
        lines = replay()
        assert lines[0].endswith(f"{source} (step 200), 3 episodes at epsilon 0.001"), lines[0]
        assert number_after("mean return", lines[1]) == pytest.approx(logged_return, abs=0.006), source
        assert number_after("greedy accuracy", lines[2]) == pytest.approx(logged_accuracy, abs=0.0006), source
        run_folder.model_path(member).unlink(missing_ok=True)
    # Member 0's own folder replays member 0's evaluation, not member 1's.
    assert evaluate.main([str(lead), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert number_after("mean return", lines[1]) == pytest.approx(read_scalars(lead)["charts/eval_return"][0][1],
                                                                  abs=0.006)
    # Another seed plays other episodes of the same network.
    other = replay("--seed", "99", "--episodes", "5")
    assert "checkpoint.pt (step 200), 5 episodes" in other[0] and other[1].startswith("mean return ")


def test_evaluate_names_a_members_missing_or_foreign_population_checkpoint(tmp_path, mnist_dir, capsys):
    run(mdp_args("dqn", tmp_path, mnist_dir, total_timesteps=120, diag_every=0, num_seeds=2))
    member = tmp_path / "run-seed2"
    capsys.readouterr()
    checkpoint = run_folder.checkpoint_path(tmp_path / "run-seed1")
    state = torch.load(checkpoint, weights_only=True)
    state["q_network"] = {name: tensor[:1] for name, tensor in state["q_network"].items()}  # a one-member network
    torch.save(state, checkpoint)
    assert "population of 2 members" in _one_error_line([str(member)], capsys)
    checkpoint.unlink()
    line = _one_error_line([str(member)], capsys)
    assert "holds neither model.pt nor checkpoint.pt" in line and "run-seed1" in line


def _one_error_line(argv, capsys) -> str:
    assert evaluate.main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and not captured.out, lines
    return lines[0]


def test_evaluate_rejects_missing_corrupt_and_foreign_weights(tmp_path, mnist_dir, capsys):
    run_dir = run(mdp_args("dqn", tmp_path, mnist_dir, total_timesteps=120, save_model=True, diag_every=0))
    capsys.readouterr()  # the run's progress lines
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / run_folder.CONFIG_FILE, bare)
    assert "holds neither model.pt nor checkpoint.pt" in _one_error_line([str(bare)], capsys)
    assert "no such run folder" in _one_error_line([str(tmp_path / "nowhere")], capsys)
    assert "not found" in _one_error_line([str(tmp_path)], capsys)  # a folder without config.json

    model = run_folder.model_path(run_dir)
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 2])
    assert "is corrupt or not a saved model" in _one_error_line([str(run_dir)], capsys)
    torch.save({"head.weight": torch.zeros(3, 3)}, model)
    assert "does not hold this run's dqn network" in _one_error_line([str(run_dir)], capsys)
    weights = torch.load(run_folder.checkpoint_path(run_dir), weights_only=True)["q_network"]
    weights["head.weight"] = torch.zeros(1, 7, 3)  # same keys, another shape
    torch.save(weights, model)
    assert "size mismatch" in _one_error_line([str(run_dir)], capsys)
    torch.save({"not": "tensors"}, model)
    assert "expected a state dict of tensors" in _one_error_line([str(run_dir)], capsys)
    assert "--episodes must be" in _one_error_line([str(run_dir), "--episodes", "0"], capsys)

    # The real exit status, from the command line.
    result = subprocess.run([sys.executable, "scripts/evaluate.py", str(bare)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1


# ---- flags ----

def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        experiment.cli(dqn.Args, dqn.main, argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--capture-video"], "--capture-video only act through --eval-every"),
    (["--eval-episodes", "5"], "--eval-episodes only act through --eval-every"),
    (["--eval-epsilon", "0.05"], "--eval-epsilon only act through --eval-every"),
    (["--eval-every", "100", "--video-every", "2"], "--video-every only acts with --capture-video"),
])
def test_evaluation_flags_that_would_be_ignored_are_errors(flags, message, tmp_path, mnist_dir, capsys):
    argv = ["--env-id", "ImageMDP/mnist", "--data-dir", str(mnist_dir), "--no-cuda", "--runs-dir",
            str(tmp_path / "runs"), *flags]
    assert message in _cli_error(argv, capsys)
    assert not (tmp_path / "runs").exists()


def test_capture_video_without_pyav_names_the_extra(tmp_path, mnist_dir, capsys, monkeypatch):
    monkeypatch.setattr(video, "available", lambda: False)
    argv = ["--env-id", "ImageMDP/mnist", "--data-dir", str(mnist_dir), "--no-cuda", "--runs-dir",
            str(tmp_path / "runs"), "--eval-every", "100", "--capture-video"]
    assert 'pip install -e ".[video]"' in _cli_error(argv, capsys)
    monkeypatch.setattr(evaluate.video, "available", lambda: False)
    assert 'pip install -e ".[video]"' in _one_error_line([str(tmp_path), "--capture-video"], capsys)
