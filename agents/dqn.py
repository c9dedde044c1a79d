"""DQN (Mnih et al. 2015) with every plasticity toggle, on Atari and the image-classification MDP.

CleanRL's dqn_atari.py, read top to bottom: Args -> network -> loss -> main loop.
The value loss is a regression (MSE/Huber) or categorical (HL-Gauss/two-hot,
Farebrother et al. 2024) on Q(s, a).  Environments, the replay buffer, the
interventions (spec methods.md), the diagnostics (spec diagnostics.md) and the
run plumbing are imported, one line each.

    python agents/dqn.py --env-id ALE/Breakout-v5 --layer-norm --l2 1e-5
    python agents/dqn.py --env-id ImageMDP/mnist --shift label_permutation --loss hl_gauss --v-min 0 --v-max 110
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from agents.harness import experiment
from agents.harness.config import CommonArgs
from plasticity.diagnostics import Diagnostics
from plasticity.flags import POSITIVE, POSITIVE_COUNT, ranged
from plasticity.injection import injection_heads
from plasticity.interventions import Interventions
from plasticity.losses import (
    CATEGORICAL_LOSSES,
    CategoricalSupport,
    categorical_cross_entropy,
    regression_loss,
)
from plasticity.networks import build_torso, default_network
from plasticity.optimizers import build_optimizer
from plasticity.parseval import apply_parseval_
from plasticity.population import MemberLinear


@dataclass
class Args(CommonArgs):
    learning_rate: float = ranged(1e-4, POSITIVE)
    """the learning rate of the optimizer"""
    target_network_frequency: int = ranged(1000, POSITIVE_COUNT)
    """env steps between hard updates of the target network"""
    loss: Literal["mse", "huber", "hl_gauss", "two_hot"] = "mse"
    """value loss: regression (mse, huber) or categorical over --n-atoms bins on [--v-min, --v-max]"""
    hl_gauss_sigma: float = ranged(0.75, POSITIVE)
    """HL-Gauss: Gaussian width as a multiple of the bin width"""


class QNetwork(nn.Module):
    """Torso -> linear head; Q-values directly (regression) or as logits over value bins (categorical).

    One network per population member (``--num-seeds``): inputs ``[M, B, ...]``, outputs ``[M, B, A]``
    (categorical ``[M, B, A, bins]``); member k's weights are drawn from ``generators[k]``.
    """

    def __init__(self, obs_shape, num_actions: int, args: Args, support: CategoricalSupport | None,
                 generators=None):
        super().__init__()
        network = default_network(obs_shape) if args.network == "auto" else args.network
        members = args.num_seeds
        self.torso = build_torso(network, obs_shape, layer_norm=args.layer_norm, hidden_sizes=args.hidden_sizes,
                                 members=members, generators=generators, activation=args.activation,
                                 activation_width=args.activation_width)
        self.num_actions = num_actions
        self.num_bins = support.n_bins if support is not None else 1
        self.head = MemberLinear(members, self.torso.out_features, num_actions * self.num_bins, generators=generators)
        apply_parseval_(self, args, generators)  # --parseval: orthogonal init (and --parseval-diag layers)
        # Plasticity injection (§5): the head copies θ'1, θ'2, allocated now (no draw) so they are in the
        # optimiser from the start; None when off.
        self.injection = injection_heads(self.torso, self.head, args)
        self.support = support

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_scaled = self.torso.scale_pixels(x)  # observations are uint8 pixels
        out = (self.head(self.torso(x_scaled)) if self.injection is None
               else self.injection(self.torso, self.head, x_scaled))  # §5: + h_θ'1 − h_θ'2 once injected
        return out if self.support is None else out.view(*x.shape[:2], self.num_actions, self.num_bins)

    def q_values(self, x: torch.Tensor) -> torch.Tensor:
        out = self(x)
        return out if self.support is None else self.support.expectation(out)


def td_targets(q_network: QNetwork, target_network: QNetwork, batch, args: Args) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * Q_target(s', a'), a' greedy under the target (or online: double-Q)."""
    next_q = target_network.q_values(batch.next_obs)  # [M, B, A]
    chooser = q_network.q_values(batch.next_obs) if args.double_q else next_q
    next_value = next_q.gather(2, chooser.argmax(dim=2, keepdim=True)).squeeze(2)
    return batch.rewards + args.gamma * next_value * (1.0 - batch.terminated.float())


def td_loss(q_network: QNetwork, target_network: QNetwork, batch, args: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """The value loss per member [M] on Q(s, a), and the Q-values of the taken actions [M, B]."""
    with torch.no_grad():
        targets = td_targets(q_network, target_network, batch, args)
    out = q_network(batch.obs)
    index = batch.actions.view(*batch.actions.shape, 1, *([1] * (out.dim() - 3)))
    taken = out.gather(2, index.expand(*batch.actions.shape, 1, *out.shape[3:])).squeeze(2)
    support = q_network.support
    if support is None:
        return regression_loss(args.loss, taken, targets), taken
    target_probs = support.hl_gauss(targets) if args.loss == "hl_gauss" else support.two_hot(targets)
    return categorical_cross_entropy(taken, target_probs), support.expectation(taken)


def main(args: Args) -> None:
    experiment.resolve_args(args, agent="dqn")  # --resume: the run's saved flags replace the command line's
    categorical = args.loss in CATEGORICAL_LOSSES
    with experiment.start(args, agent="dqn", categorical=categorical) as run:
        device, envs, rb = run.device, run.envs, run.buffer
        support = (CategoricalSupport(args.v_min, args.v_max, args.n_atoms, device=device,
                                      sigma_ratio=args.hl_gauss_sigma) if categorical else None)
        q_network = QNetwork(envs.obs_shape, envs.num_actions, args, support, run.init_generators).to(device)
        # --optimizer (default: fused Adam); elementwise, so over the members' stacked weights it is one per member.
        optimizer = build_optimizer(q_network, args, args.learning_rate, seeds=run.seeds)
        target_network = QNetwork(envs.obs_shape, envs.num_actions, args, support).to(device)
        target_network.load_state_dict(q_network.state_dict())
        interventions = Interventions(q_network, optimizer, args, target_model=target_network, seed=run.seeds,
                                      setting=run.setting)
        diagnostics = Diagnostics(q_network, dormant_tau=args.dormant_tau,
                                  support=support.centers if categorical else None, n_actions=envs.num_actions)

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
                         clip_range=support.clip_range(args.loss) if categorical else None)
            run.evaluate(global_step, interventions.network_for("eval", q_network).q_values)  # --eval-every: greedy episodes on envs of their own
            if not run.end_iteration(global_step, obs, epsilon, step, interventions):
                return
        run.finish(global_step, obs)


if __name__ == "__main__":
    experiment.cli(Args, main)
