"""Play a run's saved network: the mean return of K greedy episodes, with a 95% bootstrap interval.

    python scripts/evaluate.py runs/<run> [--episodes K] [--epsilon e] [--capture-video] [--seed s]

Reads the run's ``config.json``, rebuilds its agent's ``QNetwork`` (agents/dqn.py or
agents/c51.py) from the run's own flags, loads ``model.pt`` (``--save-model``) or else the
``q_network`` of ``checkpoint.pt``, and plays the episodes with the run's env settings through
the evaluation the runs use (agents/harness/evaluation.py): whole games on Atari (with the
human-normalised score), ``--episode-length`` steps on the image MDP (with the greedy accuracy),
in the task the checkpoint's env was in (image MDP, nonstationary Atari; the first task without
a checkpoint).  Defaults are the run's ``--eval-episodes``, ``--eval-epsilon`` and seed: a run
that evaluated at its last step then gets exactly the numbers it logged there (on Atari, when
both or neither record videos: videos play on emulators that draw the no-op starts differently).

A population member's folder (``--num-seeds N``: config.json names its ``population``) is
evaluated as member k: its own ``model.pt`` (a one-member state dict), or else member k's
slice of the ``q_network`` in the population's checkpoint (the lead folder's); member k plays
its own task -- on the image MDP the population's env is rebuilt from the checkpoint and every
member plays member k's network in its own task, member k's result is reported; on
nonstationary Atari member k's env alone is restored.

A folder without model or checkpoint, a corrupt file, or weights of another network: one
``error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python scripts/evaluate.py` from a checkout

from agents import c51, dqn  # noqa: E402
from agents.harness import run_folder, video  # noqa: E402
from agents.harness.checkpoint import load_state_dict_file  # noqa: E402
from agents.harness.evaluation import Evaluator  # noqa: E402
from envs.atari_scores import human_normalized  # noqa: E402
from envs.factory import AgentEnv, env_family  # noqa: E402
from plasticity.injection import restore_injected_  # noqa: E402
from plasticity.losses import CATEGORICAL_LOSSES, CategoricalSupport, c51_atoms  # noqa: E402
from scripts.analysis.stats import stratified_bootstrap_ci  # noqa: E402

AGENTS = {"dqn": dqn, "c51": c51}
BOOTSTRAP_REPS = 10_000
BOOTSTRAP_SEED = 0


class EvaluateError(Exception):
    """Bad input: printed as one ``error:`` line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Population:
    """The population a member's run folder belongs to (its config.json's ``population``)."""

    seed: int
    num_seeds: int
    member: int
    lead: Path  # the folder holding the population's checkpoint (member 0's)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + j for j in range(self.num_seeds)]


def population_of(run_dir: Path, config: dict) -> Population | None:
    """The population of a member's folder, or None for a single run; a malformed entry is an EvaluateError."""
    population = config.get("population")
    if population is None:
        return None
    try:
        seed, num_seeds, member = (int(population[key]) for key in ("seed", "num_seeds", "member"))
        lead = str(population["lead"])
        if not 0 <= member < num_seeds:
            raise ValueError(f"member {member} of {num_seeds}")
    except (KeyError, TypeError, ValueError) as error:
        raise EvaluateError(f"{run_dir / run_folder.CONFIG_FILE} has a malformed population entry ({error})") \
            from None
    return Population(seed, num_seeds, member, run_dir.parent / lead)


def run_args(run_dir: Path):
    """(agent name, the agent's Args with the run's saved flags, the population of a member's folder or None)."""
    try:
        config = run_folder.read_config(run_dir)
    except (FileNotFoundError, ValueError) as error:
        raise EvaluateError(str(error)) from None
    agent = config.get("agent")
    if agent not in AGENTS:
        raise EvaluateError(f"{run_dir / run_folder.CONFIG_FILE} names agent {agent!r}; expected one of "
                            f"{', '.join(AGENTS)}")
    module = AGENTS[agent]
    names = {f.name for f in dataclasses.fields(module.Args)}
    try:
        args = module.Args(**{name: value for name, value in config.items() if name in names})
        env_family(args.env_id)
    except (TypeError, ValueError) as error:
        raise EvaluateError(f"{run_dir / run_folder.CONFIG_FILE} does not describe a run of this project "
                            f"({error})") from None
    return agent, args, population_of(run_dir, config)


def population_args(args, population: Population):
    """The flags of the whole population (its first seed, its size) from member k's flags."""
    whole = copy.copy(args)
    whole.seed, whole.num_seeds = population.seed, population.num_seeds
    return whole


def q_network(agent: str, args, obs_shape, num_actions: int, device: torch.device) -> torch.nn.Module:
    """The run's online network, as its agent builds it (untrained)."""
    if agent == "dqn":
        support = (CategoricalSupport(args.v_min, args.v_max, args.n_atoms, device=device,
                                      sigma_ratio=args.hl_gauss_sigma) if args.loss in CATEGORICAL_LOSSES else None)
        return dqn.QNetwork(obs_shape, num_actions, args, support).to(device)
    return c51.QNetwork(obs_shape, num_actions, args, c51_atoms(args.v_min, args.v_max, args.n_atoms,
                                                                device=device)).to(device)


def load_checkpoint_lazily(run_dir: Path) -> dict:
    """The run's checkpoint.pt (a member's: its population's, in the lead folder), memory-mapped (a stored
    replay buffer is not read), safely; corrupt: one clear error."""
    path = run_folder.checkpoint_path(run_folder.population_lead(run_dir))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for truncated/corrupt zip files
        raise EvaluateError(f"{path} is corrupt or not a checkpoint of this project ({type(error).__name__})") \
            from None


def member_weights(weights: dict, population: Population, path: Path) -> dict:
    """Member k's one-member state dict from the population's: every QNetwork tensor has the member dim first."""
    size = population.num_seeds
    foreign = [name for name, tensor in weights.items() if not torch.is_tensor(tensor) or tensor.dim() == 0
               or tensor.shape[0] != size]
    if foreign:
        raise EvaluateError(f"{path} does not hold the network of a population of {size} members "
                            f"({', '.join(foreign[:3])}{'...' if len(foreign) > 3 else ''} without a leading "
                            f"member dimension of {size})")
    k = population.member
    return {name: tensor[k:k + 1] for name, tensor in weights.items()}


def check_population_checkpoint(checkpoint: dict, population: Population, path: Path) -> None:
    """The checkpoint is this member's population's (same seeds); a note when the member had failed."""
    seeds = checkpoint.get("seeds")
    if seeds is not None and [int(seed) for seed in seeds] != population.seeds:
        raise EvaluateError(f"{path} is the checkpoint of a population with seeds {list(seeds)}, not of "
                            f"this member's population (seeds {population.seeds})")
    failed = checkpoint.get("failed")
    if failed is not None and bool(failed[population.member]):
        print(f"note: member {population.member} failed (its loss became NaN/inf); evaluating its weights in "
              "the checkpoint", file=sys.stderr)


def saved_weights(run_dir: Path, args, population: Population | None = None
                  ) -> tuple[dict, Path, int, dict | None]:
    """(state dict, its file, the env step it was saved at, the checkpoint if one was read).

    A population member's state dict is one-member: its own model.pt, or its slice of the population's
    checkpoint.
    """
    if run_folder.model_path(run_dir).exists():
        path = run_folder.model_path(run_dir)
        try:
            weights = load_state_dict_file(path)
        except ValueError as error:
            raise EvaluateError(str(error)) from None
        status = run_folder.read_status(run_dir)
        return weights, path, status.global_step if status is not None else args.total_timesteps, None
    path = run_folder.checkpoint_path(run_folder.population_lead(run_dir))
    if not run_folder.has_checkpoint(run_dir):
        where = "" if population is None else f" (nor does its population's lead folder {population.lead})"
        raise EvaluateError(f"{run_dir} holds neither {run_folder.MODEL_FILE} nor {run_folder.CHECKPOINT_FILE}"
                            f"{where}: train with --save-model, or let the run write a checkpoint")
    checkpoint = load_checkpoint_lazily(run_dir)
    weights = checkpoint.get("q_network") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict):
        raise EvaluateError(f"{path} holds no q_network state dict")
    if population is not None:
        check_population_checkpoint(checkpoint, population, path)
        weights = member_weights(weights, population, path)
    return weights, path, int(checkpoint.get("global_step", 0)), checkpoint


def load_into(network: torch.nn.Module, weights: dict, path: Path, agent: str) -> None:
    try:
        network.load_state_dict(weights, strict=True)
    except (RuntimeError, ValueError, TypeError) as error:
        detail = " ".join(str(error).split())
        raise EvaluateError(f"{path} does not hold this run's {agent} network "
                            f"({detail[:300]}{'...' if len(detail) > 300 else ''})") from None
    restore_injected_(network)  # --plasticity-injection-at: the injected heads the weights hold join the forward


def member_env_state(state: dict, population: Population) -> dict:
    """Member k's part of a nonstationary Atari population's env state (each member's schedule is its own)."""
    env_state = state["env"]
    k = population.member
    return {**state, "env": {"seeds": [list(env_state["seeds"])[k]], "members": [env_state["members"][k]]}}


def task_env(run_dir: Path, args, device: torch.device, checkpoint: dict | None,
             population: Population | None = None):
    """The run's env in the task its checkpoint was in (image MDP, nonstationary Atari), or None where tasks don't matter.

    A population member's: on the image MDP the whole population's env (member k at index k; the
    caller evaluates every member), on nonstationary Atari member k's env alone.
    """
    if env_family(args.env_id) == "atari" and not args.atari_shift:
        return None
    if checkpoint is None and run_folder.has_checkpoint(run_dir):
        checkpoint = load_checkpoint_lazily(run_dir)
    whole = (population is not None and env_family(args.env_id) == "image_mdp" and checkpoint is not None
             and "env" in checkpoint)
    try:
        env = (AgentEnv.make(population_args(args, population), device, seeds=population.seeds) if whole
               else AgentEnv.make(args, device))
    except (ValueError, FileNotFoundError) as error:
        raise EvaluateError(str(error)) from None
    if checkpoint is None or "env" not in checkpoint:
        print("note: no checkpoint with the env's state: evaluating in the first task", file=sys.stderr)
        return env.env
    try:
        state = checkpoint["env"]
        if population is not None and not whole:
            state = member_env_state(state, population)
        env.load_state_dict(state)
    except (KeyError, IndexError, ValueError, TypeError) as error:
        raise EvaluateError(f"{run_folder.checkpoint_path(run_folder.population_lead(run_dir))}: its env state "
                            f"does not fit this run's env ({error})") from None
    return env.env


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (runs/<run>)")
    parser.add_argument("--episodes", type=int, help="episodes to play (default: the run's --eval-episodes)")
    parser.add_argument("--epsilon", type=float, help="epsilon of the policy (default: the run's --eval-epsilon)")
    parser.add_argument("--capture-video", action="store_true",
                        help="record the first episode as <run>/videos/evaluate_<step>[_seed<s>].mp4")
    parser.add_argument("--seed", type=int, help="seed of the episodes (default: the run's own)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the network runs (auto: CUDA when present)")
    return parser.parse_args(argv)


def evaluate(options) -> list[str]:
    """The report's lines; raises EvaluateError on bad input."""
    run_dir = options.run_dir
    if not run_dir.is_dir():
        raise EvaluateError(f"{run_dir}: no such run folder")
    if options.episodes is not None and options.episodes < 1:
        raise EvaluateError(f"--episodes must be an integer >= 1; got {options.episodes}")
    if options.epsilon is not None and not 0.0 <= options.epsilon <= 1.0:
        raise EvaluateError(f"--epsilon must be a number in [0, 1]; got {options.epsilon}")
    if options.capture_video and not video.available():
        raise EvaluateError(video.MISSING)
    if options.device == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("--device cuda: no CUDA device is available here")
    agent, args, population = run_args(run_dir)
    device = torch.device("cuda" if options.device == "cuda" or (options.device == "auto"
                                                                 and torch.cuda.is_available()) else "cpu")
    args.cuda = device.type == "cuda"
    weights, source, global_step, checkpoint = saved_weights(run_dir, args, population)
    follow = task_env(run_dir, args, device, checkpoint, population)
    # On the image MDP a member plays in its population's env: every member plays (member k's network),
    # member k's episodes are the ones reported.
    members = int(getattr(follow, "members", 1)) if follow is not None else 1
    member = population.member if members > 1 else 0
    eval_args, seeds = args, None
    if members > 1:
        eval_args, seeds = population_args(args, population), population.seeds
        if options.seed is not None:
            seeds[member] = options.seed
    try:
        # Videos play on the single-threaded emulators (raw screens): so does a run that recorded videos.
        evaluator = Evaluator(eval_args, device, episodes=options.episodes, epsilon=options.epsilon,
                              screens=options.capture_video or args.capture_video, seeds=seeds)
    except (ValueError, FileNotFoundError) as error:
        raise EvaluateError(str(error)) from None
    num_actions = evaluator.env.num_actions if evaluator.env is not None else follow.num_actions
    obs_shape = evaluator.env.obs_shape if evaluator.env is not None else follow.obs_shape
    network = q_network(agent, args, tuple(obs_shape), num_actions, device)
    load_into(network, weights, source, agent)
    if members > 1:
        own = network.state_dict()
        network = q_network(agent, eval_args, tuple(obs_shape), num_actions, device)
        network.load_state_dict({name: tensor.expand(members, *tensor.shape[1:]) for name, tensor in own.items()})
        restore_injected_(network)
    name = f"evaluate_{global_step}" + ("" if options.seed is None else f"_seed{options.seed}")
    video_path = run_folder.video_path(run_dir, name) if options.capture_video else None
    with tempfile.TemporaryDirectory() as scratch:  # the other members' videos, if any, are not kept
        video_paths = None if video_path is None else [
            video_path if j == member else Path(scratch) / f"member{j}.mp4" for j in range(members)]
        result = evaluator.evaluate(network.q_values, global_step, follow=follow, video_paths=video_paths,
                                    seed=None if members > 1 else options.seed)[member]
    evaluator.close()

    mean, low, high = (float(value[0]) for value in stratified_bootstrap_ci(
        [result.returns[:, None]], "mean", reps=BOOTSTRAP_REPS, confidence=0.95, seed=BOOTSTRAP_SEED))
    lines = [f"{run_dir}: {agent} on {args.env_id}, {source.name} (step {global_step}), "
             f"{evaluator.episodes} episodes at epsilon {evaluator.epsilon:g}",
             f"mean return {mean:.2f} (95% bootstrap CI {low:.2f} to {high:.2f})"]
    if result.hns is not None:
        low_hns, high_hns = (human_normalized(value, result.game) for value in (low, high))
        lines.append(f"human-normalised {result.hns:.3f} (95% bootstrap CI {low_hns:.3f} to {high_hns:.3f})")
    if result.accuracy is not None:
        lines.append(f"greedy accuracy {result.accuracy:.3f}")
    if result.video is not None:
        lines.append(f"video: {result.video}")
    return lines


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    try:
        lines = evaluate(options)
    except EvaluateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
