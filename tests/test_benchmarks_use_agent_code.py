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
    from envs.atari_population import AtariPopulation
    from envs.replay_buffer import make_replay_buffer

    calls = []
    real = c51.td_loss
    monkeypatch.setattr(c51, "td_loss", lambda *a: calls.append(a) or real(*a))
    env = AtariPopulation([AtariEnv("ALE/Breakout-v5", num_envs=1, seed=0, device="cpu", sticky_actions=0.0)])
    try:
        obs, _ = env.reset(seeds=[0])
        buffer = make_replay_buffer(env.obs_shape, 64, 1, "cpu", seeds=[0])
        actions = torch.zeros(1, 1, dtype=torch.long)  # [members, num_envs]
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


# --- every benchmark (but CleanRL's reference loop) times the agents' code, never a hand-written copy ---

BENCHMARKS = BENCH_AGENTS.parent
#: bench_reference.py is CleanRL's own loop on purpose: the reference the agents are compared with.
AGENT_CODE_BENCHMARKS = sorted(path for path in BENCHMARKS.glob("*.py") if path.name != "bench_reference.py")
#: Loss pieces a benchmark would only touch to rebuild an agent's update itself.
LOSS_PIECES = {"regression_loss", "c51_loss", "c51_project", "categorical_cross_entropy", "mse_loss", "MSELoss",
               "huber_loss", "smooth_l1_loss", "HuberLoss", "SmoothL1Loss"}


def hand_written_update_code(source: str, filename: str) -> list[str]:
    """What in ``source`` rebuilds an agent's update instead of calling it (empty: nothing)."""
    tree = ast.parse(source, filename)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "gamma":
            found.append(f"line {node.lineno}: reads .gamma (a hand-written TD target?)")
        elif isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Compare)) and "terminated" in _names(node):
            found.append(f"line {node.lineno}: computes with `terminated` (a hand-written TD target?)")
        elif isinstance(node, ast.ClassDef) and node.name == "QNetwork":
            found.append(f"line {node.lineno}: defines its own QNetwork; build the agent's (agents.dqn/c51.QNetwork)")
    names = _names(tree) | {alias.asname or alias.name.rsplit(".", 1)[-1]
                            for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                            for alias in node.names}
    found += [f"uses the loss piece {name}; call the agent's td_loss" for name in sorted(LOSS_PIECES & names)]
    # .backward() only in bench_agents.optimizer_step, the copy of the agents' update lines.
    allowed = set()
    if filename == BENCH_AGENTS.name:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "optimizer_step":
                allowed |= {id(sub) for sub in ast.walk(node)}
    found += [f"line {node.lineno}: calls .backward() outside bench_agents.optimizer_step" for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward"
              and id(node) not in allowed]
    return found


def test_the_check_covers_the_benchmarks():
    names = {path.name for path in AGENT_CODE_BENCHMARKS}
    assert {"bench_agents.py", "bench_diagnostics.py", "bench_plasticity.py", "bench_atari.py"} <= names
    assert "bench_reference.py" not in names


@pytest.mark.parametrize("path", AGENT_CODE_BENCHMARKS, ids=lambda path: path.name)
def test_benchmark_has_no_hand_written_update(path):
    found = hand_written_update_code(path.read_text(), path.name)
    assert not found, f"{path.name} rebuilds the agents' update: " + "; ".join(found)


HAND_WRITTEN = '''
import torch.nn.functional as F
from plasticity.losses import c51_project

class QNetwork(torch.nn.Module):
    pass

def update(batch, args):
    with torch.no_grad():
        targets = batch.rewards + args.gamma * next_q * (1 - batch.terminated.float())
    loss = F.mse_loss(taken, targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
'''


def test_the_check_catches_a_hand_written_update():
    """The forms the old bench_diagnostics / bench_plasticity updates had (their own QNetwork, MSE, backward)."""
    found = "\n".join(hand_written_update_code(HAND_WRITTEN, "bench_example.py"))
    for expected in (".gamma", "`terminated`", "own QNetwork", "mse_loss", "c51_project", ".backward()"):
        assert expected in found, (expected, found)
    # bench_agents.optimizer_step is where the agents' `(loss + penalty).backward()` line is kept, and only there.
    assert not hand_written_update_code(BENCH_AGENTS.read_text(), BENCH_AGENTS.name)
    moved = BENCH_AGENTS.read_text().replace("def optimizer_step(", "def some_other_step(")
    assert any(".backward()" in line for line in hand_written_update_code(moved, BENCH_AGENTS.name))


def test_bench_plasticity_times_the_agents_update_with_the_agents_methods(monkeypatch, one_thread):
    """Plain update: dqn's td_loss with no method on; SWR and CBP: the Interventions of dqn.Args(--swr, --cbp)."""
    from scripts.benchmarks import bench_plasticity

    real, calls = dqn.td_loss, []
    monkeypatch.setattr(dqn, "td_loss", lambda q, target, batch, args: calls.append((q, target, args))
                        or real(q, target, batch, args))
    built = []
    real_update = bench_plasticity.agent_update
    monkeypatch.setattr(bench_plasticity, "agent_update", lambda *a: built.append(real_update(*a)) or built[-1])
    results = bench_plasticity.bench_device(torch.device("cpu"), layer_norm=False, warmup=0, repeats=2)
    plain, methods = built
    assert plain.interventions.enabled == () and methods.interventions.enabled == ("cbp", "swr")
    assert type(plain.q_network) is dqn.QNetwork and isinstance(methods.args, dqn.Args)
    assert methods.args.swr == bench_plasticity.SWR and methods.args.cbp and methods.args.cbp_maturity == 0
    assert plain.q_network.head.out_features == 18  # the full action set, as the docs' figures
    # Two rounds (plain + with methods) and two replacing steps, all through dqn.td_loss.
    assert [q for q, _, _ in calls] == [plain.q_network, methods.q_network] * 2 + [methods.q_network] * 2
    assert results["cbp_replacements"] >= len(methods.interventions.methods["cbp"].method.stats) * 2
    assert results["update"] > 0 and results["with_methods"] > 0


def test_bench_diagnostics_times_the_agents_update(monkeypatch, one_thread):
    """--n-atoms > 1 times c51's own update (td_loss, networks), and 1 the DQN agent's."""
    from scripts.benchmarks import bench_diagnostics

    for module, atoms in ((c51, "5"), (dqn, "1")):
        real, calls = module.td_loss, []
        monkeypatch.setattr(module, "td_loss", lambda *a, real=real, calls=calls: calls.append(a) or real(*a))
        results = bench_diagnostics.main(["--device", "cpu", "--probe-batch", "16", "--repeats", "1", "--updates",
                                          "2", "--n-actions", "4", "--n-atoms", atoms])
        assert len(calls) == 3 + 2 + 1  # warm-up, one timed block of --updates, the update before record_grad_norm
        q_network, target_network, batch, args = calls[0]
        assert type(q_network) is module.QNetwork and type(target_network) is module.QNetwork
        assert isinstance(args, module.Args) and batch.actions.shape == (1, args.batch_size) == (1, 32)  # one member
        assert q_network.head.out_features == 4 * (int(atoms) if module is c51 else 1)
        assert results["update_ms"] > 0


# --- the population benchmark (bench.py population): the real agent's runs, and floors from the agent's update ---

def _tiny_population_flags(mnist_dir) -> list[str]:
    return ["--seeds", "1", "2", "--steps", "200", "--learning-starts", "100", "--log-every", "100",
            "--diag-every", "100", "--hidden-sizes", "16", "16", "--floor-repeats", "2", "--threads", "1",
            "--data-dir", str(mnist_dir)]


def test_population_floor_times_the_agents_stacked_update(monkeypatch, one_thread, mnist_dir):
    """The floor's update is dqn's own (QNetwork, td_loss on a [N, 32, ...] replay batch, the variant's methods),
    built from the very flags the measured run gets."""
    from scripts.benchmarks import bench_population

    real, calls = dqn.td_loss, []
    monkeypatch.setattr(dqn, "td_loss", lambda q, target, batch, args: calls.append((q, target, batch, args))
                        or real(q, target, batch, args))
    built = []
    real_update = bench_population.agent_update
    monkeypatch.setattr(bench_population, "agent_update", lambda *a: built.append(real_update(*a)) or built[-1])
    opts = bench_population.parse_args(_tiny_population_flags(mnist_dir))
    flags = bench_population.agent_flags(opts, "methods", 2, opts.seed, 400)
    assert flags[flags.index("--num-seeds") + 1] == "2" and {"--layer-norm", "--cbp", "--swr"} <= set(flags)
    floor = bench_population.compute_floor(bench_population.parse_agent_args(flags), repeats=2, fill_steps=40)
    assert len(calls) == 3 + 2  # three warm-up updates, then the timed ones
    (update,) = built
    q_network, target_network, batch, args = calls[0]
    assert type(q_network) is dqn.QNetwork and type(target_network) is dqn.QNetwork and q_network is update.q_network
    assert isinstance(args, dqn.Args) and args.num_seeds == 2 and args.layer_norm and args.cbp and args.swr == 1e-3
    assert batch.obs.shape[:2] == (2, args.batch_size) == (2, 32)  # one stacked batch for both members
    assert update.interventions.enabled == ("cbp", "swr")
    assert floor["members"] == 2 and floor["train_frequency"] == args.train_frequency
    assert floor["floor_ms_per_step"] == pytest.approx(floor["update_ms"] / args.train_frequency + floor["act_ms"]
                                                       + floor["env_step_ms"] + floor["buffer_add_ms"])
    assert floor["floor_sps"] == pytest.approx(2e3 / floor["floor_ms_per_step"])


def test_population_benchmark_runs_end_to_end(tmp_path, one_thread, mnist_dir):
    """Tiny settings: real agents/dqn.py runs (N = 1, 2, two parallel single runs), floors, table, JSON, plot.

    One variant (methods: --layer-norm --swr 1e-3 --cbp) keeps it short; by default both are measured.
    """
    import json

    from scripts.benchmarks import bench_population

    assert bench_population.parse_args([]).variants == ["plain", "methods"]
    out, figure = tmp_path / "population.json", tmp_path / "population.png"
    bench_population.main([*_tiny_population_flags(mnist_dir), "--variants", "methods", "--json", str(out),
                           "--plot", str(figure)])
    results = json.loads(out.read_text())
    assert figure.stat().st_size > 0
    assert results["config"]["seeds"] == [1, 2] and results["config"]["env_id"] == "ImageMDP/mnist"
    assert set(results["variants"]) == {"methods"}
    for variant, entry in results["variants"].items():
        assert entry["flags"] == bench_population.VARIANTS[variant]
        for n in ("1", "2"):
            row = entry["population"][n]
            (run,) = row["runs"]
            assert run["command"][run["command"].index("--num-seeds") + 1] == n
            assert run["measured_steps"] == 200 and run["diag_events"] == 2  # steps 300 and 400
            assert row["sps"] > 0 and row["sps"] == pytest.approx(int(n) * row["per_member_sps"])
            floor = row["floor"]
            assert floor["members"] == int(n) and floor["update_ms"] > 0 and floor["step_ms"] > 0
            assert row["floor_ratio"] == pytest.approx(row["sps"] / floor["floor_sps"])
        assert entry["single"]["same_as_population_n1"] and entry["single"]["sps"] == entry["population"]["1"]["sps"]
        (pair,) = entry["parallel"]["runs"]
        assert len(pair["runs_sps"]) == 2 and entry["parallel"]["sps"] == pytest.approx(sum(pair["runs_sps"]))
        assert [command[command.index("--seed") + 1] for command in pair["commands"]] == ["1", "2"]


def test_bench_methods_times_each_method_as_the_agent_builds_it(monkeypatch, one_thread, mnist_dir):
    """bench methods on the MNIST MLP: each row's update is an AgentUpdate of dqn.Args with that method's flags
    (so Interventions/build_optimizer build exactly the run's method), the injection is made before timing."""
    from scripts.benchmarks import bench_methods

    built = []
    real_update = bench_methods.agent_update
    monkeypatch.setattr(bench_methods, "agent_update", lambda *a: built.append(real_update(*a)) or built[-1])
    results = bench_methods.bench_network("mlp", torch.device("cpu"), str(mnist_dir), warmup=0, repeats=1,
                                          only=["c-chain", "injection last:1", "optimiser reset"])
    assert set(results) == {"c-chain", "injection last:1, injected", "optimiser reset (all)"}
    enabled = [update.interventions.enabled for update in built]
    assert () in enabled and ("c_chain",) in enabled and ("reset_optimizer",) in enabled
    injected = next(u for u in built if "plasticity_injection" in u.interventions.enabled)
    assert injected.interventions.methods["plasticity_injection"].scalars()["plasticity/injections"].tolist() == [1]
    assert all(row["plain_ms"] > 0 for row in results.values())
