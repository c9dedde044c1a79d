"""Short real runs of both agents with each methods-v2 method (spec methods-v2.md): the tags each writes, its
checkpointed state resuming exactly, and the configuration errors between methods (one `error:` line, exit 2).

MNIST runs use the real MNIST test split; the layer-reset, injection and hare-reset methods also run on a real
Atari ROM shipped inside ale-py.
"""

from __future__ import annotations

import math

import pytest

from tests.test_agents import AGENTS, mdp_args, read_scalars, run_agent


def finite_tags(run_dir, tags: set[str]) -> dict[str, list[tuple[int, float]]]:
    """The scalars of ``run_dir``; every tag of ``tags`` is there with finite values."""
    scalars = read_scalars(run_dir)
    missing = tags - set(scalars)
    assert not missing, f"missing tags {sorted(missing)}"
    for tag in tags:
        assert all(math.isfinite(value) for _, value in scalars[tag]), tag
    return scalars


@pytest.mark.parametrize("agent, extra", [("dqn", {}), ("dqn", {"loss": "hl_gauss", "c_chain_distance": "kl"}),
                                          ("c51", {})])
def test_c_chain_run_logs_its_coefficient_and_churn(agent, extra, tmp_path, mnist_dir):
    args = mdp_args(agent, tmp_path, mnist_dir, c_chain=True, c_chain_warmup=20, c_chain_window=50, **extra)
    scalars = finite_tags(run_agent(args), {"plasticity/c_chain_coef", "losses/c_chain_loss"})
    coefs = [value for _, value in scalars["plasticity/c_chain_coef"]]
    assert coefs[0] == 50.0 and coefs[-1] != 50.0  # lambda0 during the warm-up, automatic afterwards


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_layer_resets_run_on_mnist_counts_its_events(agent, tmp_path, mnist_dir):
    """BBF-style: the last two layers re-drawn, the others shrunk and perturbed, every 100 env steps after
    learning starts (t = 200, 300; the one due at 400 leaves no full interval before --no-resets-after 450)."""
    args = mdp_args(agent, tmp_path, mnist_dir, reset_layers="last:2", reset_every=100, no_resets_after=450,
                    reset_shrink=0.5, reset_perturb=0.5, gradient_steps=2)
    scalars = finite_tags(run_agent(args), {"plasticity/layer_resets"})
    assert scalars["plasticity/layer_resets"][-1][1] == 2


def atari_args(agent: str, tmp_path, **toggles):
    return AGENTS[agent].Args(env_id="ALE/Breakout-v5", total_timesteps=300, learning_starts=100, buffer_size=500,
                              batch_size=8, diag_every=0, log_every=100, runs_dir=str(tmp_path), run_name="atari",
                              cuda=False, checkpoint_every=0, **toggles)


def test_layer_resets_injection_and_hare_resets_run_on_a_real_atari_rom(tmp_path):
    """DQN: the head re-drawn at t = 200, 300 and a last:1 injection at 250 (the reset then skips the frozen head
    and re-draws nothing it may not); C51: hare resets at t = 200, 300."""
    flags = dict(reset_layers="last:2", reset_every=100, plasticity_injection_at=[250],
                 plasticity_injection_head="last:1")
    resets = finite_tags(run_agent(atari_args("dqn", tmp_path / "resets", **flags)),
                         {"plasticity/layer_resets", "plasticity/injections", "losses/td_loss"})
    assert resets["plasticity/layer_resets"][-1][1] == 2
    assert resets["plasticity/injections"][-1][1] == 1
    hare = finite_tags(run_agent(atari_args("c51", tmp_path / "hare", hare_tortoise=True,
                                            hare_tortoise_reset_every=100)), {"plasticity/hare_resets"})
    assert hare["plasticity/hare_resets"][-1][1] == 2


@pytest.mark.parametrize("roles", [dict(hare_tortoise_act="tortoise", hare_tortoise_eval="hare"),
                                   dict(hare_tortoise_target="tortoise", eval_every=200, eval_episodes=1)])
def test_hare_tortoise_run_on_mnist(roles, tmp_path, mnist_dir):
    args = mdp_args("dqn", tmp_path, mnist_dir, hare_tortoise=True, hare_tortoise_reset_every=150, **roles)
    scalars = finite_tags(run_agent(args), {"plasticity/hare_resets"})
    assert scalars["plasticity/hare_resets"][-1][1] == 2  # t = 150, 300 (learning starts at 100)
    if "eval_every" in roles:
        assert "charts/eval_accuracy" in scalars


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_nap_and_weight_clip_runs_log_their_scalars(agent, tmp_path, mnist_dir):
    nap = finite_tags(run_agent(mdp_args(agent, tmp_path / "nap", mnist_dir, layer_norm=True, nap=True)),
                      {"plasticity/nap_norm_ratio"})
    assert all(value == pytest.approx(1.0, abs=0.5) for _, value in nap["plasticity/nap_norm_ratio"])
    clip = finite_tags(run_agent(mdp_args(agent, tmp_path / "clip", mnist_dir, weight_clip=1.0)),
                       {"plasticity/weight_clip_frac"})
    assert all(0.0 <= value <= 1.0 for _, value in clip["plasticity/weight_clip_frac"])


@pytest.mark.parametrize("agent, extra", [("dqn", {}), ("c51", {"parseval_diag": True, "input_scale_learnable": True})])
def test_parseval_run_logs_its_penalty(agent, extra, tmp_path, mnist_dir):
    args = mdp_args(agent, tmp_path, mnist_dir, parseval=1e-3, **extra)
    scalars = finite_tags(run_agent(args), {"plasticity/parseval_penalty"})
    # Orthogonal init with gain sqrt(2): the penalty starts near 0 (the 32-wide layers fit in their fan-in).
    assert scalars["plasticity/parseval_penalty"][0][1] < 1e-2


OPTIMISERS = {
    "adamw": dict(optimizer="adamw", weight_decay=1e-2),
    "sgd": dict(optimizer="sgd", sgd_momentum=0.9, sgd_nesterov=True, learning_rate=1e-2, weight_decay=1e-3),
    "per-entry": dict(adam_per_entry_step=True, cbp=True, cbp_maturity=10, cbp_replacement_rate=0.01),
    "ns-adam": dict(adam_betas=(0.99, 0.99), lr_schedule="linear", lr_end=1e-5),
    "upgd": dict(optimizer="upgd", learning_rate=3e-4),
    "kron": dict(optimizer="kron"),
    "trac": dict(trac=True),
}


@pytest.mark.parametrize("name", OPTIMISERS)
def test_every_optimiser_trains_the_dqn_agent(name, tmp_path, mnist_dir):
    flags = OPTIMISERS[name]
    extra = {"charts/learning_rate"} if "lr_schedule" in flags else set()
    extra |= {"optim/trac_scale"} if name == "trac" else set()
    scalars = finite_tags(run_agent(mdp_args("dqn", tmp_path, mnist_dir, **flags)), {"losses/td_loss"} | extra)
    if "lr_schedule" in flags:
        rates = [value for _, value in scalars["charts/learning_rate"]]
        assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]
        assert rates[-1] == pytest.approx(1e-5, rel=1e-5)  # --lr-end at the run's last update


@pytest.mark.parametrize("agent", ["dqn", "c51"])
def test_optimiser_resets_after_every_target_sync(agent, tmp_path, mnist_dir):
    """--reset-optimizer target-update: one reset per sync after learning starts (t = 200, 300, 400 at T = 100)."""
    args = mdp_args(agent, tmp_path, mnist_dir, reset_optimizer="target-update", target_network_frequency=100)
    scalars = finite_tags(run_agent(args), {"optim/optimizer_resets"})
    assert scalars["optim/optimizer_resets"][-1][1] == 3


@pytest.mark.parametrize("agent, activation", [("dqn", "crelu"), ("c51", "dff")])
def test_paired_activations_run_with_redo_and_cbp(agent, activation, tmp_path, mnist_dir):
    args = mdp_args(agent, tmp_path, mnist_dir, activation=activation, redo_every=25, cbp=True, cbp_maturity=10,
                    cbp_replacement_rate=0.01, layer_norm=True)
    tags = {"plasticity/redo_resets", "plasticity/cbp_replacements", "plasticity/dormant_frac"}
    tags |= {"plasticity/dead_pair_frac", "plasticity/sign_constant_frac"} if activation == "crelu" else set()
    scalars = finite_tags(run_agent(args), tags)
    if activation == "dff":
        assert "plasticity/dead_frac" not in scalars  # undefined for sin/cos units


# Every row of methods-v2.md's "Configuration errors" table (and the knobs' own rules): one `error:` line
# naming the conflicting flags, exit status 2, before any work.
CONFIG_ERRORS = [
    ("dqn", "--optimizer adam --weight-decay 0.1", "adamw"),
    ("dqn", "--optimizer sgd --reset-optimizer every --reset-optimizer-every 100 --reset-optimizer-state v", "sgd"),
    ("dqn", "--optimizer kron --reset-optimizer every --reset-optimizer-every 100 --reset-optimizer-state m", "kron"),
    ("dqn", "--reset-optimizer target-update --hare-tortoise --hare-tortoise-target tortoise", "target-update"),
    ("dqn", "--replay-ratio 1 --gradient-steps 2", "--replay-ratio"),
    ("dqn", "--replay-ratio 1 --train-frequency 2", "--replay-ratio"),
    ("dqn", "--reset-layers last:1 --reset-every 100 --reset-every-updates 10", "--reset-every-updates"),
    ("dqn", "--reset-head-every 10 --reset-layers last:1 --reset-every 100", "--reset-head-every"),
    ("dqn", "--nap", "--layer-norm"),
    ("dqn", "--nap --layer-norm --swr 0.1", "--swr"),
    ("dqn", "--nap --layer-norm --weight-clip 3", "--weight-clip"),
    ("dqn", "--swr 0.1 --activation dff", "dff"),
    ("dqn", "--swr 0.1 --plasticity-injection-at 50", "injection"),
    ("c51", "--swr 0.1", "--swr-head"),
    ("dqn", "--parseval 1e-3 --parseval-diag --layer-norm", "--parseval-diag"),
    ("dqn", "--weight-clip 3 --parseval 1e-3", "--parseval"),
    ("dqn", "--swr 0.1 --parseval 1e-3 --parseval-diag", "--parseval-diag"),
    ("dqn", "--trac --swr 0.1", "--trac"),
    ("dqn", "--trac --cbp", "--trac"),
    ("dqn", "--trac --reset-layers last:1 --reset-every 100", "--trac"),
    ("dqn", "--trac --optimizer kron", "--trac"),
    ("dqn", "--trac --optimizer upgd", "--trac"),
    ("dqn", "--hare-tortoise --reset-layers last:1 --reset-every 100", "--hare-tortoise"),
    ("dqn", "--hare-tortoise --plasticity-injection-at 50", "--hare-tortoise"),
    ("dqn", "--hare-tortoise --hare-tortoise-target tortoise --target-network-frequency 500",
     "--target-network-frequency"),
    ("dqn", "--adam-per-entry-step --optimizer sgd", "--adam-per-entry-step"),
    ("dqn", "--sgd-momentum 0.9", "--sgd-momentum"),
    ("dqn", "--lr-end 1e-5", "--lr-end"),
    ("dqn", "--activation-width halve", "--activation-width"),
    ("dqn", "--c-chain-distance kl --c-chain", "kl"),
    ("dqn", "--hare-tortoise-ema 0.9", "--hare-tortoise"),
    ("dqn", "--reset-every 100", "--reset-layers"),
    ("dqn", "--reset-optimizer every", "--reset-optimizer-every"),
]


@pytest.mark.parametrize("agent, flags, named", CONFIG_ERRORS, ids=[flags for _, flags, _ in CONFIG_ERRORS])
def test_each_bad_combination_is_one_clear_error(agent, flags, named, tmp_path, mnist_dir, capsys):
    from tests.test_validation import _base_argv, _one_clear_error

    line = _one_clear_error(agent, [*_base_argv(tmp_path, mnist_dir), *flags.split()], capsys)
    assert named in line, line
    assert not (tmp_path / "runs").exists()


# Groups of methods that combine (the configuration errors forbid some pairs), each with state in the checkpoint.
STATEFUL_GROUPS = {
    "chain-hare-clip-schedule": dict(c_chain=True, c_chain_warmup=20, c_chain_window=40, hare_tortoise=True,
                                     hare_tortoise_reset_every=150, weight_clip=2.0, lr_schedule="linear",
                                     reset_optimizer="every", reset_optimizer_every=120, gradient_steps=2),
    "nap-parseval-per-entry": dict(layer_norm=True, nap=True, parseval=1e-3, adam_per_entry_step=True,
                                   reset_layers="last:2", reset_every=150, reset_shrink=0.8, reset_perturb=0.2),
    "upgd-crelu": dict(optimizer="upgd", activation="crelu", redo_every=25),
    "kron": dict(optimizer="kron", snp=1e-4, snp_every=10),
    "trac-chain-parseval": dict(trac=True, c_chain=True, c_chain_warmup=20, parseval=1e-3),
    "injection": dict(plasticity_injection_at=[220], snp=1e-4, snp_every=10, replay_ratio=0.5),
}


@pytest.mark.parametrize("group", STATEFUL_GROUPS)
def test_a_run_with_the_methods_resumes_exactly(group, tmp_path, mnist_dir, monkeypatch):
    """Interrupted at 250 (after a checkpoint at 200) and resumed: the same scalars as the uninterrupted run."""
    from tests.test_agents import comparable, interrupt_at

    toggles = dict(STATEFUL_GROUPS[group], checkpoint_every=100)
    uninterrupted = read_scalars(run_agent(mdp_args("dqn", tmp_path / "full", mnist_dir, **toggles)))
    interrupt_at(250, monkeypatch)
    run_dir = run_agent(mdp_args("dqn", tmp_path / "cut", mnist_dir, **toggles))
    AGENTS["dqn"].main(AGENTS["dqn"].Args(resume=str(run_dir)))
    assert comparable(read_scalars(run_dir)) == comparable(uninterrupted)


@pytest.mark.parametrize("group", ["chain-hare-clip-schedule", "nap-parseval-per-entry", "upgd-crelu", "injection", "kron"])
def test_population_member_logs_what_its_single_run_logs(group, tmp_path, mnist_dir):
    """populations.md §2.1 with the methods on: member k of --num-seeds 2 is the run with seed s+k."""
    from tests.test_population_agents import assert_scalars_close, member_dirs

    toggles = STATEFUL_GROUPS[group]
    run_agent(mdp_args("dqn", tmp_path / "pop", mnist_dir, seed=3, num_seeds=2, **toggles))
    for seed, member in zip([3, 4], member_dirs(tmp_path / "pop", "run", [3, 4])):
        single = run_agent(mdp_args("dqn", tmp_path / f"single{seed}", mnist_dir, seed=seed, **toggles))
        # C-CHAIN's coefficient divides by the churn, a mean of squared differences of nearly equal Q-values:
        # batched and single kernels' rounding (1e-7) reaches it amplified, so it gets 1e-3.
        assert_scalars_close(read_scalars(member), read_scalars(single), rtol=1e-3 if "c_chain" in toggles else 1e-4)


@pytest.mark.parametrize("agent, head", [("dqn", "last:2"), ("c51", "last:1")])
def test_injection_runs_on_mnist(agent, head, tmp_path, mnist_dir):
    flags = dict(plasticity_injection_at=[200], plasticity_injection_head=head)
    scalars = finite_tags(run_agent(mdp_args(agent, tmp_path, mnist_dir, **flags)), {"plasticity/injections"})
    assert [value for step, value in scalars["plasticity/injections"] if step < 200] == [0.0] * 3  # 50, 100, 150
    assert [value for step, value in scalars["plasticity/injections"] if step >= 200][0] == 1


# The README's recipes, at tiny size (periods scaled from 20k/100k to 100/400 env steps).
RECIPES = {
    "primacy-bias": dict(reset_layers="last:1", reset_every=100, no_resets_after=400),
    "bbf-resets": dict(replay_ratio=2.0, reset_layers="last:2", reset_shrink=0.5, reset_perturb=0.5, reset_every=100,
                       no_resets_after=400),
    "dohare-sgd": dict(cbp=True, optimizer="sgd", learning_rate=0.01),
    "dohare-adam": dict(cbp=True, adam_betas=(0.99, 0.99)),
    "lyle-2024": dict(layer_norm=True, l2=1e-5, loss="hl_gauss"),
    "nap": dict(layer_norm=True, nap=True, lr_schedule="linear"),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_readme_recipe_runs(recipe, tmp_path, mnist_dir):
    flags = RECIPES[recipe]
    scalars = finite_tags(run_agent(mdp_args("dqn", tmp_path, mnist_dir, **flags)), {"losses/td_loss"})
    if "reset_layers" in flags:  # t = 200, 300 (learning starts at 100; 400 + 100 > 400)
        assert scalars["plasticity/layer_resets"][-1][1] == 2
    if "cbp" in flags:
        assert "plasticity/cbp_replacements" in scalars
