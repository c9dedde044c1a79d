"""C51 (Bellemare et al. 2017) with every plasticity toggle, on Atari and the image-classification MDP.

CleanRL's c51_atari.py, read top to bottom: Args -> network -> main loop.  The
return distribution lives on ``--n-atoms`` atoms on [--v-min, --v-max]; the
target distribution is projected onto them (spec methods.md §10).  Environments,
the replay buffer, the interventions, the diagnostics and the run plumbing are
imported, one line each.

    python agents/c51.py --env-id ALE/Breakout-v5 --layer-norm
    python agents/c51.py --env-id ImageMDP/mnist --shift random_labels --v-min 0 --v-max 110
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from agents.harness import experiment
from agents.harness.config import CommonArgs
from plasticity.diagnostics import Diagnostics
from plasticity.flags import POSITIVE, POSITIVE_COUNT, ranged
from plasticity.injection import injection_heads
from plasticity.interventions import Interventions
from plasticity.losses import c51_atoms, c51_loss, c51_project
from plasticity.networks import build_torso, default_network
from plasticity.optimizers import build_optimizer
from plasticity.parseval import apply_parseval_
from plasticity.population import MemberLinear


@dataclass
class Args(CommonArgs):
    learning_rate: float = ranged(2.5e-4, POSITIVE)
    """the learning rate of the optimizer"""
    adam_eps: float = ranged(0.01 / 32, POSITIVE)
    """Adam epsilon (CleanRL / Dopamine C51: 0.01 / batch size)"""
    target_network_frequency: int = ranged(10_000, POSITIVE_COUNT)
    """env steps between hard updates of the target network"""


class QNetwork(nn.Module):
    """Torso -> linear head with logits over ``n_atoms`` return atoms per action."""

    def __init__(self, obs_shape, num_actions: int, args: Args, atoms: torch.Tensor, generators=None):
        super().__init__()
        network = default_network(obs_shape) if args.network == "auto" else args.network
        members = args.num_seeds  # one network per population member; member k drawn from generators[k]
        self.torso = build_torso(network, obs_shape, layer_norm=args.layer_norm, hidden_sizes=args.hidden_sizes,
                                 members=members, generators=generators, activation=args.activation,
                                 activation_width=args.activation_width)
        self.num_actions, self.n_atoms = num_actions, len(atoms)
        self.head = MemberLinear(members, self.torso.out_features, num_actions * self.n_atoms, generators=generators)
        apply_parseval_(self, args, generators)  # --parseval: orthogonal init (and --parseval-diag layers)
        # Plasticity injection (§5): the head copies θ'1, θ'2, allocated now (no draw) so they are in the
        # optimiser from the start; None when off.
        self.injection = injection_heads(self.torso, self.head, args)
        self.register_buffer("atoms", atoms, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [members, batch, actions, atoms]; observations are uint8 pixels [members, batch, ...]."""
        x_scaled = self.torso.scale_pixels(x)
        out = (self.head(self.torso(x_scaled)) if self.injection is None
               else self.injection(self.torso, self.head, x_scaled))  # §5: + h_θ'1 − h_θ'2 once injected
        return out.view(*x.shape[:2], self.num_actions, self.n_atoms)

    def q_values(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(self(x), dim=-1) * self.atoms).sum(dim=-1)


def taken_action(per_action: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``per_action [M, B, A, atoms]`` at ``actions [M, B]`` -> ``[M, B, atoms]``."""
    index = actions[:, :, None, None].expand(*actions.shape, 1, per_action.shape[-1])
    return per_action.gather(2, index).squeeze(2)


def next_distribution(q_network: QNetwork, target_network: QNetwork, batch, args: Args) -> torch.Tensor:
    """Target-network return distribution of the greedy next action (online-chosen with --double-q)."""
    next_pmfs = torch.softmax(target_network(batch.next_obs), dim=-1)  # [M, B, A, atoms]
    chooser = q_network.q_values(batch.next_obs) if args.double_q else (next_pmfs * target_network.atoms).sum(dim=-1)
    return taken_action(next_pmfs, chooser.argmax(dim=2))


def td_targets(q_network: QNetwork, target_network: QNetwork, batch, args: Args) -> torch.Tensor:
    """Scalar TD targets r + gamma * (1 - terminated) * E[Z'] (for the diagnostics)."""
    expected_next = (next_distribution(q_network, target_network, batch, args) * q_network.atoms).sum(dim=-1)
    return batch.rewards + args.gamma * expected_next * (1.0 - batch.terminated.float())


def td_loss(q_network: QNetwork, target_network: QNetwork, batch, args: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy to the projected target distribution, and the Q-values of the taken actions."""
    atoms = q_network.atoms
    with torch.no_grad():
        target_pmf = c51_project(next_distribution(q_network, target_network, batch, args), batch.rewards,
                                 batch.terminated.float(), args.gamma, atoms)
    logits = taken_action(q_network(batch.obs), batch.actions)
    return c51_loss(logits, target_pmf), (torch.softmax(logits, dim=-1) * atoms).sum(dim=-1)


def main(args: Args) -> None:
    experiment.resolve_args(args, agent="c51")  # --resume: the run's saved flags replace the command line's
    with experiment.start(args, agent="c51", categorical=True) as run:
        device, envs, rb = run.device, run.envs, run.buffer
        atoms = c51_atoms(args.v_min, args.v_max, args.n_atoms, device=device)
        q_network = QNetwork(envs.obs_shape, envs.num_actions, args, atoms, run.init_generators).to(device)
        # Adam is elementwise: one optimiser over the members' stacked weights is one Adam per member.
        # --optimizer (default: fused Adam); elementwise, so over the members' stacked weights it is one per member.
        optimizer = build_optimizer(q_network, args, args.learning_rate, seeds=run.seeds)
        target_network = QNetwork(envs.obs_shape, envs.num_actions, args, atoms).to(device)
        target_network.load_state_dict(q_network.state_dict())
        interventions = Interventions(q_network, optimizer, args, target_model=target_network, seed=run.seeds,
                                      setting=run.setting)
        diagnostics = Diagnostics(q_network, dormant_tau=args.dormant_tau, support=atoms, n_actions=envs.num_actions)

        actor = interventions.network_for("act", q_network)  # the online network (H&T: hare or tortoise)
        global_step, obs = run.begin(q_network=q_network, target_network=target_network, optimizer=optimizer,
                                     interventions=interventions, diagnostics=diagnostics)
        while global_step < args.total_timesteps:
            # ALGO LOGIC: put action logic here
            epsilon = experiment.linear_schedule(args.start_e, args.end_e,
                                                 args.exploration_fraction * args.total_timesteps, global_step)
            with torch.no_grad():
                q_values = actor.q_values(obs)
            actions = experiment.epsilon_greedy(q_values, epsilon, run.action_random)

            # TRY NOT TO MODIFY: execute the game, log episodes, store the transitions
            step = envs.step(actions, greedy_actions=q_values.argmax(dim=2))
            before, global_step = global_step, global_step + envs.num_envs
            run.record(global_step, step)
            rb.add(obs, actions, step.learn_reward, step.next_obs, step.terminated, step.truncated, valid=step.store)
            obs = step.obs

            # ALGO LOGIC: training
            for update in run.updates(before, global_step):
                batch = rb.sample(args.batch_size)
                with run.mixed_precision():  # --bf16: the torsos compute in bfloat16; head and loss stay float32
                    loss, q_taken = td_loss(q_network, target_network, batch, args)
                run.log_update(loss, q_taken)
                optimizer.zero_grad()
                # Each member's loss reaches only its own weights: the sum gives every member its own gradient.
                # L2, L2-Init, Parseval, C-CHAIN (its reference batch drawn after the TD batch)
                (loss.sum() + interventions.penalty(loss, sample_obs=rb.sample_obs)).backward()
                diagnostics.record_grad_norm()
                optimizer.step()
                interventions.after_step(update, sample_obs=rb.sample_obs)
            synced = run.target_sync_due(before, global_step)
            if synced:
                target_network.load_state_dict(q_network.state_dict())
            # Optimiser resets, layer/hare resets, injection, task-switch events (methods-v2.md §0, step 3)
            interventions.after_env_step(before, global_step, synced=synced,
                                         task_switched=step.task_id != step.previous_task_id, sample_obs=rb.sample_obs)
            run.diagnose(before, global_step, diagnostics,
                         td_targets=lambda batch: td_targets(q_network, target_network, batch, args),
                         td_loss=lambda batch: td_loss(q_network, target_network, batch, args)[0],
                         clip_range=(args.v_min, args.v_max))
            run.evaluate(global_step, interventions.network_for("eval", q_network).q_values)  # --eval-every: greedy episodes on envs of their own
            if not run.end_iteration(global_step, obs, epsilon, step, interventions):
                return
        run.finish(global_step, obs)


if __name__ == "__main__":
    experiment.cli(Args, main)
