"""The agents benchmark times the agents' own update (their module's QNetwork, Adam and td_loss), not a copy."""

import ast
from pathlib import Path

import pytest
import torch

pytest.importorskip("ale_py", reason="the compute floor steps a real Atari env")

from agents import c51, dqn  # noqa: E402
from scripts.benchmarks import bench_agents  # noqa: E402

BENCH_AGENTS = Path(bench_agents.__file__)


@pytest.mark.parametrize("module", [dqn, c51], ids=["dqn", "c51"])
def test_compute_floor_times_the_agents_own_td_loss(module, monkeypatch, one_thread):
    real, calls = module.td_loss, []

    def spy(q_network, target_network, batch, args):
        calls.append((q_network, target_network, args))
        return real(q_network, target_network, batch, args)

    monkeypatch.setattr(module, "td_loss", spy)
    name = module.__name__.rsplit(".", 1)[-1]
    times = bench_agents.compute_floor(name, torch.device("cpu"), repeats=2)
    assert len(calls) == 1 + 2  # one warm-up update, then the timed repeats
    q_network, target_network, args = calls[0]
    assert type(q_network) is module.QNetwork and type(target_network) is module.QNetwork
    assert q_network is not target_network and isinstance(args, module.Args)
    assert times["update_ms"] > 0 and times["floor_sps"] > 0


def test_agent_update_steps_the_agents_network_and_optimiser(monkeypatch, one_thread):
    """The update callable changes the online weights through the agent's loss (the loop's zero_grad/backward/step)."""
    from envs.atari import AtariEnv
    from envs.replay_buffer import make_replay_buffer

    calls = []
    real = c51.td_loss
    monkeypatch.setattr(c51, "td_loss", lambda *a: calls.append(a) or real(*a))
    env = AtariEnv("ALE/Breakout-v5", num_envs=1, seed=0, device="cpu", sticky_actions=0.0)
    try:
        obs, _ = env.reset(seed=0)
        buffer = make_replay_buffer(env.obs_shape, 64, 1, "cpu", seed=0)
        actions = torch.zeros(1, dtype=torch.long)
        for _ in range(40):
            next_obs, _, terminated, truncated, info = env.step(actions)
            buffer.add(obs, actions, info["learn_reward"], next_obs, terminated, truncated, valid=~info["reset_step"])
            obs = next_obs
        args = c51.Args(env_id="ALE/Breakout-v5", cuda=False, batch_size=8)
        update = bench_agents.agent_update(c51, args, env, buffer)
        assert update.optimizer.param_groups[0]["eps"] == args.adam_eps  # Adam as c51.main builds it
        before = [p.detach().clone() for p in update.q_network.parameters()]
        target_before = {k: v.clone() for k, v in update.target_network.state_dict().items()}
        update()
        assert len(calls) == 1
        assert any(not torch.equal(b, p) for b, p in zip(before, update.q_network.parameters(), strict=True))
        assert all(torch.equal(target_before[k], v) for k, v in update.target_network.state_dict().items())
    finally:
        env.close()


def _names(node: ast.AST) -> set[str]:
    """Every identifier and attribute name under ``node``."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            found.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            found.add(sub.attr)
    return found


def test_bench_agents_has_no_hand_written_target():
    tree = ast.parse(BENCH_AGENTS.read_text())
    gamma = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "gamma"]
    assert not gamma, f"bench_agents.py reads args.gamma (a hand-written TD target?) on lines {gamma}"
    arithmetic = [node.lineno for node in ast.walk(tree)
                  if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Compare)) and "terminated" in _names(node)]
    assert not arithmetic, f"bench_agents.py computes with `terminated` on lines {arithmetic}"
    loss_helpers = {"c51_project", "c51_loss", "regression_loss", "categorical_cross_entropy", "td_targets",
                    "next_distribution"}
    used = loss_helpers & _names(tree)
    assert not used, f"bench_agents.py uses the loss pieces {sorted(used)} itself; call the agent's td_loss"
