"""Greedy evaluation episodes: Dopamine's evaluation phase (Machado et al. 2018), in one place.

Both agents' loops call it through ``run.evaluate(global_step, q_network.q_values)`` every
``--eval-every`` env steps, and ``scripts/evaluate.py`` calls it on a saved model.  An
evaluation plays ``--eval-episodes`` episodes with an epsilon-greedy policy
(``--eval-epsilon``, 0.001 by default) under ``torch.no_grad()``, on environments of its own:

- Atari: its own emulators, built once with the run's env settings and reset with seeds of the
  evaluation's own stream; an episode is a whole game (game over, not a lost life; capped at the
  env's maximum episode frames).  A nonstationary run is evaluated in the task the training env
  is in (``NonstationaryAtariEnv.freeze``), per game under ``charts/eval_return/<game>`` when it
  cycles games.  ``charts/eval_hns`` is the mean return human-normalised with
  ``envs/atari_scores.py`` (games with a random/human reference).
- image MDP: ``ImageMDPVectorEnv.evaluation_copy``, a copy frozen at the training env's current
  task (same images, labels, permutations) on its own random stream; an episode is
  ``--episode-length`` steps.  ``charts/eval_accuracy`` is the fraction of greedy answers that
  named the label, over all those steps.

The training env, the replay buffer, the exploration generator and the global RNGs are never
touched (tests/test_evaluation.py: a run with evaluations logs the same training scalars as one
without).  The ``K`` episodes are split over up to ``MAX_ENVS`` parallel envs in fixed quotas
decided beforehand, so short episodes are not favoured.  Each evaluation is seeded from
``(seed, step)`` alone, so a resumed run evaluates exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agents.harness import video
from agents.harness.experiment import epsilon_greedy, stream_seed
from envs.atari_scores import human_normalized
from envs.factory import env_family, make_env

MAX_ENVS = 16
#: Image-MDP videos show the first this many decisions of the first episode.
IMAGE_MDP_VIDEO_STEPS = 100


@dataclass
class EvalResult:
    """What one evaluation measured."""

    returns: np.ndarray  # raw return of each episode (Atari: the game score)
    lengths: np.ndarray  # agent steps of each episode
    envs: np.ndarray  # which evaluation env played each episode (the video shows env 0's first)
    accuracy: float | None  # image MDP: fraction of greedy answers naming the label
    game: str | None  # Atari: the game played (a nonstationary run's current game)
    per_game: bool  # the run cycles games: also log the per-game tags
    video: Path | None = None

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def hns(self) -> float | None:
        """Human-normalised mean return; None off Atari or for a game without reference scores."""
        return None if self.game is None else human_normalized(self.mean_return, self.game)

    def scalars(self) -> dict[str, float]:
        scalars = {"charts/eval_return": self.mean_return, "charts/eval_length": float(np.mean(self.lengths))}
        if self.per_game:
            scalars[f"charts/eval_return/{self.game}"] = self.mean_return
        if self.hns is not None:
            scalars["charts/eval_hns"] = self.hns
            if self.per_game:
                scalars[f"charts/eval_hns/{self.game}"] = self.hns
        if self.accuracy is not None:
            scalars["charts/eval_accuracy"] = self.accuracy
        return scalars


class Evaluator:
    """Plays evaluation episodes for one run's settings (``args``: the run's final flags)."""

    def __init__(self, args, device: torch.device, episodes: int | None = None, epsilon: float | None = None,
                 screens: bool | None = None):
        self.args, self.device = args, torch.device(device)
        self.family = env_family(args.env_id)
        self.episodes = int(args.eval_episodes if episodes is None else episodes)
        self.epsilon = float(args.eval_epsilon if epsilon is None else epsilon)
        self.num_envs = min(self.episodes, MAX_ENVS)
        # Env i plays quotas[i] episodes, fixed in advance: waiting for the first K episodes to end
        # would favour the short ones.
        self.quotas = self.episodes // self.num_envs + (np.arange(self.num_envs) < self.episodes % self.num_envs)
        self.env = None
        if self.family == "atari":
            eval_args = copy.copy(args)
            eval_args.num_envs = self.num_envs
            # Any valid switch period: the evaluation env is frozen at one task (freeze) before it plays.
            eval_args.switch_every = args.switch_every * self.num_envs
            self.env = make_env(eval_args, self.device, screens=bool(args.capture_video if screens is None
                                                                     else screens))

    def evaluate(self, q_values: Callable[[torch.Tensor], torch.Tensor], global_step: int, follow=None,
                 video_path: Path | None = None, seed: int | None = None) -> EvalResult:
        """Play the episodes with ``q_values(obs) -> [E, actions]``, seeded from (``seed``, ``global_step``).

        ``follow``: the env whose current task is played -- the training env (``AgentEnv.env``); the
        image MDP needs it, a nonstationary Atari run reads its task from it (task 0 without it).
        ``video_path``: record the first episode there (mp4).  ``seed`` (default: the run's) and
        ``global_step`` alone fix the episodes, so scripts/evaluate.py replays the run's last evaluation.
        """
        seed = stream_seed(self.args.seed if seed is None else seed, f"eval@{int(global_step)}")
        if self.family == "image_mdp":
            if follow is None:
                raise ValueError("an image-MDP evaluation plays the task of an env: pass follow=<the env>")
            env = follow.evaluation_copy(self.num_envs)
        else:
            env = self.env
            if hasattr(env, "freeze"):
                env.freeze(getattr(follow, "task_id", 0))
        obs, info = env.reset(seed=stream_seed(seed, "env"))
        generator = torch.Generator(device=self.device)
        generator.manual_seed(stream_seed(seed, "actions"))
        recorder = _Recorder(video_path, self.family) if video_path is not None else None
        try:
            result = self._play(env, obs, info.get("label"), q_values, generator, recorder)
        finally:
            result_video = recorder.close() if recorder is not None else None
        result.video = result_video
        return result

    def _play(self, env, obs, labels, q_values, generator, recorder) -> EvalResult:
        image_mdp = self.family == "image_mdp"
        num_envs, quotas = self.num_envs, self.quotas
        done = np.zeros(num_envs, dtype=np.int64)
        running_return = np.zeros(num_envs, dtype=np.float64)
        running_length = np.zeros(num_envs, dtype=np.int64)
        returns, lengths, envs = [], [], []
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        answers = 0
        while (done < quotas).any():
            active = done < quotas
            with torch.no_grad():
                q = q_values(obs)
            actions = epsilon_greedy(q, self.epsilon, generator)
            if image_mdp:
                counted = torch.from_numpy(active).to(self.device)
                correct += ((q.argmax(dim=1) == labels) & counted).sum()
                answers += int(active.sum())
            if recorder is not None and done[0] == 0:
                recorder.add(env, obs, actions, labels)
            obs, reward, _terminated, truncated, info = env.step(actions)
            if image_mdp:
                labels = info["label"]
                ends, real = truncated.cpu().numpy(), np.ones(num_envs, dtype=bool)
            else:  # whole games; the NEXT_STEP reset step after one belongs to no episode
                ends, real = info["game_over"].cpu().numpy(), ~info["reset_step"].cpu().numpy()
            counts = real & active
            running_return += np.where(counts, reward.cpu().numpy().astype(np.float64), 0.0)
            running_length += counts
            for e in np.flatnonzero(ends & counts):
                returns.append(running_return[e])
                lengths.append(running_length[e])
                envs.append(e)
                running_return[e], running_length[e] = 0.0, 0
                done[e] += 1
        game = None if image_mdp else str(getattr(env, "current_game", ""))
        return EvalResult(np.asarray(returns), np.asarray(lengths), np.asarray(envs),
                          accuracy=float(correct) / answers if image_mdp else None, game=game,
                          per_game="games" in (self.args.atari_shift or []))

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


class _Recorder:
    """The first episode of env 0, one frame per decision, straight into an mp4."""

    def __init__(self, path: Path, family: str):
        self.family = family
        self.writer = video.VideoWriter(path, video.IMAGE_MDP_FPS if family == "image_mdp" else video.ATARI_FPS)

    def add(self, env, obs: torch.Tensor, actions: torch.Tensor, labels: torch.Tensor | None) -> None:
        if self.family == "image_mdp":
            if self.writer.frames < IMAGE_MDP_VIDEO_STEPS:
                self.writer.add(video.answer_frame(obs[0].cpu().numpy(), int(actions[0]), int(labels[0])))
            return
        screen = env.screen(0) if hasattr(env, "screen") else None
        self.writer.add(screen if screen is not None else obs[0, -1].cpu().numpy())

    def close(self) -> Path | None:
        return self.writer.close()
