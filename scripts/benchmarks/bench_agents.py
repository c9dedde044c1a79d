"""Training throughput of the agents, and what bounds it (issue: agents performance).

For DQN and C51 on Atari with CleanRL's hyperparameters (num_envs 1, train frequency 4,
batch 32, Nature CNN) it runs the real agent and reads ``charts/SPS`` once learning has
started, with and without SWR + CBP + default diagnostics; it also measures, in the
same process, the compute floor

    floor = update time / train_frequency + action selection + env step   (seconds per env step)

and reports the SPS as a fraction of 1/floor.  The timed update is the agent's own: its
module's QNetwork, Adam and ``td_loss``, built as its ``main()`` builds them (``AgentUpdate``).
Then the bytes per stored Atari transition and the image-MDP training SPS.

    python scripts/benchmarks/bench.py agents                       # CPU; --device cuda on a GPU machine
    python scripts/benchmarks/bench.py agents --steps 12000 --agents dqn
    python scripts/benchmarks/bench.py agents --bf16                # also each agent with --bf16, with and without methods
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import c51, dqn
from agents.harness.config import setting_of
from envs.atari import AtariEnv
from envs.atari_population import AtariPopulation
from envs.factory import env_family
from envs.replay_buffer import make_replay_buffer
from plasticity.interventions import Interventions
from plasticity.losses import CATEGORICAL_LOSSES, CategoricalSupport, c51_atoms
from plasticity.networks import init_generators, torso_precision
from plasticity.optimizers import build_optimizer
from plasticity.streams import MemberRandom, stream_seed

AGENTS = {"dqn": dqn, "c51": c51}
SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "mnist"
METHODS = dict(swr=0.01, cbp=True)  # + the default diagnostics cadence (diag_every 10k, 1024 probes)


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, interventions: Interventions,
                   sample_obs=None) -> None:
    """The update lines of the main loop of agents/dqn.py and agents/c51.py; keep them in step with it.

    The floor leaves out the loop's bookkeeping around them (``run.log_update`` and
    ``diagnostics.record_grad_norm()``, one grad-norm reduction per update): that overhead is part
    of what the measured SPS, as a fraction of the floor, shows.
    """
    optimizer.zero_grad()
    # Each member's loss [M] reaches only its own weights: the sum gives every member its own gradient.
    (loss.sum() + interventions.penalty(loss, sample_obs=sample_obs)).backward()
    optimizer.step()


class AgentUpdate:
    """One training update of an agent, with the agent module's own QNetwork, optimiser and ``td_loss``.

    The networks, Adam and ``Interventions`` are built as the agent's ``main()`` builds them, from
    its ``args`` (so ``--swr`` / ``--cbp`` / ... in ``args`` switch on exactly the agent's methods),
    for the population ``args.num_seeds`` describes (members ``args.seed + k``; one member by
    default): the stacked update of all members, as the loop runs it.  ``buffer`` must hold as
    many members.  Calling the object runs the loop's update: ``learn()`` (sample a batch
    ``[M, B, ...]``, ``module.td_loss`` under ``--bf16``'s torso precision, ``optimizer_step``), then
    ``interventions.after_step``, a no-op when no method is on.  ``td_loss`` is looked up on the
    module at every call (the tests spy on it).
    """

    def __init__(self, module, args, env, buffer):
        device = torch.device("cuda" if args.cuda else "cpu")
        torch.backends.cudnn.deterministic = args.torch_deterministic  # as the run harness sets it
        # The QNetwork's last argument, as in each agent's main().
        if module is c51:
            head = c51_atoms(args.v_min, args.v_max, args.n_atoms, device=device)
        else:
            head = (CategoricalSupport(args.v_min, args.v_max, args.n_atoms, device=device,
                                       sigma_ratio=args.hl_gauss_sigma) if args.loss in CATEGORICAL_LOSSES else None)
        self.module, self.args, self.buffer = module, args, buffer
        self.seeds = [args.seed + k for k in range(args.num_seeds)]  # the population's members, as run.seeds
        if buffer.members != len(self.seeds):
            raise ValueError(f"the buffer holds {buffer.members} member(s); --num-seeds {args.num_seeds} needs as many")
        self.q_network = module.QNetwork(env.obs_shape, env.num_actions, args, head,
                                         init_generators(self.seeds)).to(device)
        self.optimizer = build_optimizer(self.q_network, args, args.learning_rate, seeds=self.seeds)
        self.target_network = module.QNetwork(env.obs_shape, env.num_actions, args, head).to(device)
        self.target_network.load_state_dict(self.q_network.state_dict())
        # The args' methods (none by default: penalty() is 0), with the facts a run gives them (its env family).
        categorical = module is c51 or args.loss in CATEGORICAL_LOSSES
        setting = setting_of(args, is_atari=env_family(args.env_id) == "atari", categorical=categorical)
        self.interventions = Interventions(self.q_network, self.optimizer, args, target_model=self.target_network,
                                           seed=self.seeds, setting=setting)
        self.updates = 0  # the loop's 1-based update index, passed to interventions.after_step

    def learn(self) -> None:
        """The update's lines up to ``optimizer.step()``: sample, the agent's ``td_loss``, ``optimizer_step``."""
        self.updates += 1
        batch = self.buffer.sample(self.args.batch_size)
        with torso_precision(torch.bfloat16 if self.args.bf16 else None):  # the loop's run.mixed_precision()
            loss, _ = self.module.td_loss(self.q_network, self.target_network, batch, self.args)
        optimizer_step(self.optimizer, loss, self.interventions, self.buffer.sample_obs)

    def __call__(self) -> None:
        self.learn()
        self.interventions.after_step(self.updates, sample_obs=self.buffer.sample_obs)


def agent_update(module, args, env, buffer) -> AgentUpdate:
    """The agent's update as a callable (see ``AgentUpdate``)."""
    return AgentUpdate(module, args, env, buffer)


def atari_replay(game: str, device: torch.device | str, steps: int = 300, capacity: int = 1000,
                 full_action_space: bool = False, seed: int = 0, members: int = 1):
    """A population of ``members`` ``AtariEnv`` s as the agents make them with ``--sticky-actions 0`` (CleanRL),
    seeds ``seed + k``, and the agents' replay buffer holding ``steps`` real transitions of uniformly random
    play per member.  Returns (env, buffer, last obs ``[M, 1, 4, 84, 84]``); ``env`` is an ``AtariPopulation``."""
    seeds = [seed + k for k in range(members)]
    env = AtariPopulation([AtariEnv(game, num_envs=1, seed=s, device="cpu", sticky_actions=0.0,
                                    full_action_space=full_action_space) for s in seeds], device)
    obs, _ = env.reset(seeds=seeds)
    buffer = make_replay_buffer(env.obs_shape, capacity, 1, device, seeds=[stream_seed(s, "replay") for s in seeds])
    random = MemberRandom(seeds)
    for _ in range(steps):
        actions = random.integers(env.num_actions, 1).to(device)
        next_obs, reward, terminated, truncated, info = env.step(actions)
        buffer.add(obs, actions, info["learn_reward"], next_obs, terminated, truncated, valid=~info["reset_step"])
        obs = next_obs
    return env, buffer, obs


def compute_floor(agent: str, device: torch.device, game: str = "ALE/Breakout-v5", repeats: int = 30,
                  **flags) -> dict:
    """Update, action-selection and env-step times of the agent's own network, loss, buffer and env.

    ``flags`` go to the agent's ``Args`` (e.g. ``bf16=True``).
    """
    module = AGENTS[agent]
    args = module.Args(env_id=game, cuda=device.type == "cuda", total_timesteps=10_000, learning_starts=0,
                       buffer_size=1000, **flags)
    env, buffer, obs = atari_replay(game, device)  # real frames in the buffer
    actions = torch.zeros(1, 1, dtype=torch.long, device=device)  # [members, num_envs]
    update = agent_update(module, args, env, buffer)

    def act() -> None:
        with torch.no_grad():
            update.q_network.q_values(obs).argmax(2)

    def env_step() -> None:
        env.step(actions)

    for fn in (update, act, env_step):
        fn()
    times = {"update_ms": _median_time(update, repeats, device) * 1e3,
             "act_ms": _median_time(act, repeats * 3, device) * 1e3,
             "env_step_ms": _median_time(env_step, repeats * 3, device) * 1e3}
    env.close()
    times["floor_ms_per_step"] = times["update_ms"] / args.train_frequency + times["act_ms"] + times["env_step_ms"]
    times["floor_sps"] = 1e3 / times["floor_ms_per_step"]
    return times


def measured_sps(agent: str, device: torch.device, steps: int, learning_starts: int, env_id: str = "ALE/Breakout-v5",
                 **flags) -> float:
    """Mean charts/SPS of a real run over the windows after learning starts."""
    with tempfile.TemporaryDirectory() as runs_dir:
        args = AGENTS[agent].Args(env_id=env_id, total_timesteps=steps, learning_starts=learning_starts,
                                  buffer_size=max(steps, 1000), log_every=1000, checkpoint_every=0,
                                  runs_dir=runs_dir, run_name="bench", cuda=device.type == "cuda",
                                  sticky_actions=0.0, **flags)
        AGENTS[agent].main(args)
        events = EventAccumulator(str(Path(runs_dir) / "bench"), size_guidance={"scalars": 0})
        events.Reload()
        rates = [e.value for e in events.Scalars("charts/SPS") if e.step > learning_starts + 1000]
    return statistics.mean(rates)


def bytes_per_atari_transition(capacity: int = 100_000) -> float:
    buffer = make_replay_buffer((4, 84, 84), capacity, 1, "cpu", seeds=[0])
    return buffer.nbytes / capacity


def _with_methods(sps: float, sps_with_methods: float) -> str:
    return f"with SWR+CBP+diagnostics {sps_with_methods:.0f} ({100 * (sps / sps_with_methods - 1):.1f}% slower)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--agents", nargs="+", default=["dqn", "c51"], choices=list(AGENTS))
    parser.add_argument("--steps", type=int, default=14_000, help="env steps per measured Atari run")
    parser.add_argument("--learning-starts", type=int, default=2_000)
    parser.add_argument("--mnist", default=str(SHARED_MNIST), help="MNIST folder for the image-MDP figure")
    parser.add_argument("--bf16", action="store_true", help="also measure each agent with --bf16")
    parser.add_argument("--mdp-steps", type=int, default=20_000,
                        help="env steps per image-MDP run (learning from step 2000; > 3000)")
    args = parser.parse_args(argv)
    if args.mdp_steps <= 3_000:
        parser.error(f"--mdp-steps {args.mdp_steps}: the image-MDP runs read SPS after step 3000; give more")
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for agent in args.agents:
        floor = compute_floor(agent, device)
        base = measured_sps(agent, device, args.steps, args.learning_starts)
        with_methods = measured_sps(agent, device, args.steps, args.learning_starts, **METHODS)
        print(f"{agent}: update {floor['update_ms']:.1f} ms, act {floor['act_ms']:.2f} ms, env step "
              f"{floor['env_step_ms']:.2f} ms -> floor {floor['floor_sps']:.0f} SPS")
        print(f"{agent}: training SPS {base:.0f} ({100 * base / floor['floor_sps']:.0f}% of floor); "
              f"{_with_methods(base, with_methods)}")
        if args.bf16:
            low = measured_sps(agent, device, args.steps, args.learning_starts, bf16=True)
            low_methods = measured_sps(agent, device, args.steps, args.learning_starts, bf16=True, **METHODS)
            print(f"{agent}: training SPS with --bf16 {low:.0f} ({low / base:.2f}x float32); "
                  f"{_with_methods(low, low_methods)}")
    print(f"Atari replay: {bytes_per_atari_transition():.0f} bytes per stored transition "
          f"({bytes_per_atari_transition() * 1e6 / 1e9:.2f} GB for 1M)")
    if Path(args.mnist, "t10k-images-idx3-ubyte.gz").exists():
        for num_envs in (1, 16):
            sps = measured_sps("dqn", device, args.mdp_steps, 2_000, env_id="ImageMDP/mnist", data_dir=args.mnist,
                               num_envs=num_envs, shift=["label_permutation"], diag_every=10_000)
            print(f"image MDP (mnist, MLP 256x256, dqn, num_envs {num_envs}): training SPS {sps:.0f}")


if __name__ == "__main__":
    main()
