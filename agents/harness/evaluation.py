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
from plasticity.streams import MemberRandom

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
    """Plays evaluation episodes for one population's settings (``args``: the run's final flags).

    ``seeds``: the members' seeds (default ``--seed`` ... ``--seed + --num-seeds - 1``); every
    member plays its own episodes on its own envs, all members in one batched ``q_values`` call.
    """

    def __init__(self, args, device: torch.device, episodes: int | None = None, epsilon: float | None = None,
                 screens: bool | None = None, seeds: list[int] | None = None):
        self.args, self.device = args, torch.device(device)
        self.family = env_family(args.env_id)
        self.seeds = list(seeds) if seeds is not None else [args.seed + k for k in range(args.num_seeds)]
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
            self.env = make_env(eval_args, self.device, seeds=self.seeds,
                                screens=bool(args.capture_video if screens is None else screens))

    def evaluate(self, q_values: Callable[[torch.Tensor], torch.Tensor], global_step: int, follow=None,
                 video_paths: list[Path] | None = None, seed: int | None = None) -> list[EvalResult]:
        """Play the episodes with ``q_values(obs [M, E, ...]) -> [M, E, actions]``; one result per member.

        Member k's episodes are seeded from (its seed, ``global_step``) alone, so scripts/evaluate.py
        replays a run's last evaluation.  ``follow``: the env whose current task is played -- the
        training env (``AgentEnv.env``); the image MDP needs it, a nonstationary Atari run reads its
        task from it (task 0 without it).  ``video_paths``: record each member's first episode there
        (mp4).  ``seed`` replaces the first member's seed (the others follow: seed + k).
        """
        seeds = self.seeds if seed is None else [seed + k for k in range(len(self.seeds))]
        member_seeds = [stream_seed(s, f"eval@{int(global_step)}") for s in seeds]
        if self.family == "image_mdp":
            if follow is None:
                raise ValueError("an image-MDP evaluation plays the task of an env: pass follow=<the env>")
            env = follow.evaluation_copy(self.num_envs)
        else:
            env = self.env
            if hasattr(env, "freeze"):
                env.freeze(getattr(follow, "task_id", 0))
        obs, info = env.reset(seeds=[stream_seed(s, "env") for s in member_seeds])
        random = MemberRandom([stream_seed(s, "actions") for s in member_seeds], self.device)
        recorders = ([_Recorder(path, self.family, k) for k, path in enumerate(video_paths)]
                     if video_paths is not None else [])
        try:
            results = self._play(env, obs, info.get("label"), q_values, random, recorders)
        finally:
            videos = [recorder.close() for recorder in recorders]
        for k, video_file in enumerate(videos):
            results[k].video = video_file
        return results

    def _play(self, env, obs, labels, q_values, random, recorders) -> list[EvalResult]:
        image_mdp = self.family == "image_mdp"
        members, num_envs, quotas = len(self.seeds), self.num_envs, self.quotas[None, :]
        done = np.zeros((members, num_envs), dtype=np.int64)
        running_return = np.zeros((members, num_envs), dtype=np.float64)
        running_length = np.zeros((members, num_envs), dtype=np.int64)
        episodes: list[list[tuple[float, int, int]]] = [[] for _ in range(members)]
        correct = torch.zeros(members, dtype=torch.int64, device=self.device)
        answers = np.zeros(members, dtype=np.int64)
        while (done < quotas).any():
            active = done < quotas
            with torch.no_grad():
                q = q_values(obs)
            actions = epsilon_greedy(q, self.epsilon, random)
            if image_mdp:
                counted = torch.from_numpy(active).to(self.device)
                correct += ((q.argmax(dim=2) == labels) & counted).sum(dim=1)
                answers += active.sum(axis=1)
            for recorder in recorders:
                if done[recorder.member, 0] == 0:
                    recorder.add(env, obs, actions, labels)
            obs, reward, _terminated, truncated, info = env.step(actions)
            if image_mdp:
                labels = info["label"]
                ends, real = truncated.cpu().numpy(), np.ones((members, num_envs), dtype=bool)
            else:  # whole games; the NEXT_STEP reset step after one belongs to no episode
                ends, real = info["game_over"].cpu().numpy(), ~info["reset_step"].cpu().numpy()
            counts = real & active
            running_return += np.where(counts, reward.cpu().numpy().astype(np.float64), 0.0)
            running_length += counts
            for k, e in zip(*np.nonzero(ends & counts)):
                episodes[k].append((running_return[k, e], running_length[k, e], e))
                running_return[k, e], running_length[k, e] = 0.0, 0
                done[k, e] += 1
        game = None if image_mdp else str(getattr(env, "current_game", ""))
        results = []
        for k in range(members):
            returns, lengths, envs = (np.asarray(column) for column in zip(*episodes[k]))
            results.append(EvalResult(returns, lengths, envs,
                                      accuracy=float(correct[k]) / answers[k] if image_mdp else None, game=game,
                                      per_game="games" in (self.args.atari_shift or [])))
        return results

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


class _Recorder:
    """The first episode of one member's env 0, one frame per decision, straight into an mp4."""

    def __init__(self, path: Path, family: str, member: int = 0):
        self.family, self.member = family, member
        self.writer = video.VideoWriter(path, video.IMAGE_MDP_FPS if family == "image_mdp" else video.ATARI_FPS)

    def add(self, env, obs: torch.Tensor, actions: torch.Tensor, labels: torch.Tensor | None) -> None:
        k = self.member
        if self.family == "image_mdp":
            if self.writer.frames < IMAGE_MDP_VIDEO_STEPS:
                self.writer.add(video.answer_frame(obs[k, 0].cpu().numpy(), int(actions[k, 0]), int(labels[k, 0])))
            return
        screen = env.screen(0, member=k) if hasattr(env, "screen") else None
        self.writer.add(screen if screen is not None else obs[k, 0, -1].cpu().numpy())

    def close(self) -> Path | None:
        return self.writer.close()
