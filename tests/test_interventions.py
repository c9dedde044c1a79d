"""The Interventions facade: flags, schedules, order, logging scalars, checkpoints.

The model is a population (plasticity/population.py): a member torso and a ``MemberLinear``
head, inputs ``[M, B, ...]``, every logged scalar ``[M]`` (one value per member).  Most tests
use one member (a single run); some use two, each with its own seed, to check per-member values.
"""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from plasticity.interventions import InterventionFlags, Interventions, generator_seed
from plasticity.networks import build_torso
from plasticity.population import MemberLinear, bias_view, weight_param, weight_view

pytestmark = pytest.mark.usefixtures("one_thread")


class QNetwork(nn.Module):
    def __init__(self, layer_norm=False, seed=0, members=1):
        super().__init__()
        torch.manual_seed(seed)
        self.members = members
        self.torso = build_torso("mlp", (6,), layer_norm=layer_norm, hidden_sizes=(16, 16), members=members)
        self.head = MemberLinear(members, self.torso.out_features, 3)

    def forward(self, x):
        return self.head(self.torso(x))


def _seeds(seed, members):
    return seed if members == 1 else [seed + k for k in range(members)]


def _setup(layer_norm=False, members=1, **kwargs):
    model = QNetwork(layer_norm, members=members)
    target = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    kwargs["seed"] = _seeds(kwargs.get("seed", 0), members)
    return model, target, optimizer, Interventions(model, optimizer, target_model=target, **kwargs)


def _obs(generator, batch, members):
    return torch.randn(members, batch, 6, generator=generator)


def _update(model, optimizer, interventions, generator):
    # Summing the members' losses gives each member its own gradient.
    loss = (model(_obs(generator, 8, model.members)) - 1).pow(2).mean(dim=(1, 2)).sum() + interventions.penalty()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _sample_obs(generator, members):
    return lambda batch: _obs(generator, batch, members)


def _linear_params(model):
    """Weights and biases of the member linear layers, in registration order (no norm layers)."""
    return [p for m in model.modules() if isinstance(m, MemberLinear) for p in (m.weight, m.bias)]


def test_defaults_do_nothing():
    model, _, optimizer, interventions = _setup()
    assert not interventions.active and interventions.enabled == ()
    penalty = interventions.penalty()
    assert penalty.shape == () and penalty.item() == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        interventions.after_step(step)
    interventions.on_task_switch()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert interventions.scalars() == {}
    _update(model, optimizer, interventions, generator)  # no activations requested, nothing recorded


@pytest.mark.parametrize("members", [1, 2])
def test_enabled_names_and_scalars_are_device_tensors(members):
    model, _, _, interventions = _setup(members=members, l2=1e-4, l2_init=1e-3, swr=0.1, cbp=True, snp=0.5,
                                        redo_every=10, reset_head_every=-1)
    assert interventions.active
    assert interventions.enabled == ("l2", "l2_init", "cbp", "swr", "snp", "redo", "reset_head")
    scalars = interventions.scalars()
    assert set(scalars) == {"plasticity/l2_penalty", "plasticity/l2_init_penalty", "plasticity/swr_scale",
                            "plasticity/cbp_replacements", "plasticity/redo_resets",
                            "plasticity/snp_applications", "plasticity/head_resets"}
    assert all(torch.is_tensor(v) and v.shape == (members,) and v.device == model.head.weight.device
               for v in scalars.values())


@pytest.mark.parametrize("members", [1, 2])
def test_penalty_is_l2_plus_l2_init_and_is_logged(members):
    model, _, _, interventions = _setup(layer_norm=True, members=members, l2=1e-2, l2_init=1e-1)
    params = _linear_params(model)
    initial = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * (1 + torch.arange(members).view(-1, *[1] * (p.dim() - 1))))  # members move differently
    # Per member: the sums over that member's slice of every parameter only.
    l2 = 0.5 * 1e-2 * sum((p.detach() ** 2).flatten(1).sum(1) for p in params)
    l2_init = 0.5 * 1e-1 * sum(((p.detach() - p0) ** 2).flatten(1).sum(1) for p, p0 in zip(params, initial))
    assert l2.shape == (members,)
    penalty = interventions.penalty()
    assert penalty.shape == ()  # the sum over members: each member gets its own gradient
    torch.testing.assert_close(penalty, (l2 + l2_init).sum())
    assert penalty.requires_grad
    scalars = interventions.scalars()
    torch.testing.assert_close(scalars["plasticity/l2_penalty"], l2)
    torch.testing.assert_close(scalars["plasticity/l2_init_penalty"], l2_init)
    assert not scalars["plasticity/l2_penalty"].requires_grad
    if members > 1:
        assert not torch.allclose(l2[0], l2[1])


@dataclass
class Args(InterventionFlags):
    """An agent's Args: every method's flags inherited, some defaults changed, other fields beside them."""

    seed: int = 3
    learning_rate: float = 1e-4  # not an intervention: ignored
    l2: float = 1e-5
    swr: float = 0.01
    cbp: bool = True
    cbp_maturity: int = 1000
    cbp_utility: str = "adaptable"
    snp: float = 0.3
    reset_head_every: int = -1


def test_redo_threshold_alone_leaves_redo_off():
    """The agents' flags default to --redo-tau 0.1 with --redo-every 0: that is ReDo off, not an error."""
    _, _, _, interventions = _setup(redo_tau=0.1, redo_every=0)
    assert "redo" not in interventions.methods and not interventions.active


def test_flags_object_builds_the_methods_it_enables_with_its_values():
    model = QNetwork()
    optimizer = torch.optim.Adam(model.parameters())
    target = copy.deepcopy(model)
    args = Args()
    interventions = Interventions(model, optimizer, args, target_model=target, seed=args.seed)
    assert interventions.enabled == ("l2", "cbp", "swr", "snp", "reset_head")  # the order of events
    methods = interventions.methods
    assert methods["l2"].term.coef == 1e-5
    assert methods["swr"].method.coef == 0.01 and methods["swr"].method.head_coef == 0.01
    assert methods["cbp"].method.maturity == 1000 and methods["cbp"].method.utility == "adaptable"
    assert methods["cbp"].method.replacement_rate == 1e-4 and methods["cbp"].method.decay == 0.99  # defaults
    assert methods["snp"].every == 0 and interventions.target_model is target
    [generator] = interventions.random.generators  # one member, one stream
    assert interventions.random.seeds == [generator_seed(3)]
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(generator_seed(3)).get_state())
    with pytest.raises(TypeError, match="not both"):
        Interventions(model, optimizer, args, l2=1.0)
    with pytest.raises(TypeError):
        Interventions(model, optimizer, learning_rate=1e-3)  # not a method's flag
    # A population: one seed per member, each member's stream seeded from its own seed.
    population = QNetwork(members=2)
    optimizer = torch.optim.Adam(population.parameters())
    interventions = Interventions(population, optimizer, args, target_model=copy.deepcopy(population), seed=[3, 4])
    assert interventions.random.seeds == [generator_seed(3), generator_seed(4)]
    with pytest.raises(ValueError, match="one seed per member"):
        Interventions(population, optimizer, args, seed=3)


def test_generator_is_not_the_stream_that_drew_the_initial_weights():
    """Network built after torch.manual_seed(seed), Interventions(seed=seed): the first S&P must not
    interpolate toward θ0 (it would if the fresh draw reused the initialisation stream)."""
    assert generator_seed(0) != 0 and generator_seed(1) != generator_seed(0) and generator_seed(7) == generator_seed(7)
    model, _, _, interventions = _setup(snp=0.5, seed=0)  # QNetwork() was built after torch.manual_seed(0)
    before = [p.detach().clone() for p in model.parameters()]
    interventions.on_task_switch()
    for p, b in zip(model.parameters(), before):
        assert not torch.allclose(p, b)


def test_periodic_methods_fire_when_a_multiple_is_crossed():
    """Updates every 4 steps, S&P every 10: fires at 12 (10 crossed), 20, 32, 40."""
    model, target, optimizer, interventions = _setup(snp=0.1, snp_every=10, reset_head_every=8)
    generator = torch.Generator().manual_seed(0)
    fired_snp, fired_head = [], []
    for step in range(4, 44, 4):
        _update(model, optimizer, interventions, generator)
        snp_before = interventions.methods["snp"].events.count.item()
        head_before = interventions.methods["reset_head"].events.count.item()
        interventions.after_step(step)
        if interventions.methods["snp"].events.count.item() > snp_before:
            fired_snp.append(step)
        if interventions.methods["reset_head"].events.count.item() > head_before:
            fired_head.append(step)
            assert torch.equal(target.head.weight, model.head.weight)
    assert fired_snp == [12, 20, 32, 40]
    assert fired_head == [8, 16, 24, 32, 40]
    assert interventions.scalars()["plasticity/snp_applications"].tolist() == [4]


@pytest.mark.parametrize("members", [1, 2])
def test_task_switch_methods(members):
    model, target, optimizer, interventions = _setup(members=members, snp=0.5, reset_head_every=-1)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 20):
        interventions.after_step(step)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing between switches
    interventions.on_task_switch()
    # Every member of every parameter moved (each member its own fresh draw).
    assert all(not torch.equal(p[k], b[k]) for p, b in zip(model.parameters(), before) for k in range(members))
    assert torch.equal(target.head.weight, model.head.weight) and torch.equal(target.head.bias, model.head.bias)
    assert interventions.methods["snp"].events.count.tolist() == [1] * members
    assert interventions.methods["reset_head"].events.count.tolist() == [1] * members


@pytest.mark.parametrize("members", [1, 2])
def test_redo_runs_on_sampled_replay_states(members):
    model, _, optimizer, interventions = _setup(members=members, redo_every=5, redo_tau=0.1, redo_batch_size=64)
    dead = [list(range(4 * k, 4 * k + 4)) for k in range(members)]  # 4 dead units per member, other units
    with torch.no_grad():
        for k, units in enumerate(dead):
            weight_view(model.torso[1])[k, units] = 0.0
            bias_view(model.torso[1])[k, units] = -1.0
    requested = []

    def sample_obs(batch):
        requested.append(batch)
        return torch.randn(members, batch, 6)

    for step in range(1, 11):
        interventions.after_step(step, sample_obs)
    assert requested == [64, 64]
    resets = interventions.scalars()["plasticity/redo_resets"]
    assert resets.shape == (members,) and (resets >= 4).all()
    for k, units in enumerate(dead):
        assert (weight_view(model.torso[1])[k, units] != 0).all()
    with pytest.raises(ValueError, match="sample_obs"):
        interventions.after_step(15)


@pytest.mark.parametrize("members", [1, 2])
def test_cbp_runs_before_swr_so_swr_scales_the_corrected_network_exactly(members):
    """Dead units replaced by CBP change nothing; SWR then scales the outputs by exactly Π c, per member.

    CBP replaces 2 units per layer and member: dead ones in both hidden layers (2 and 7, or a
    unit the init left dead), so the replacement is exact whichever member's draw it is."""
    model, _, _, interventions = _setup(members=members, cbp=True, cbp_replacement_rate=2 / 16, cbp_maturity=0,
                                        swr=0.3)
    with torch.no_grad():
        for layer in (model.torso[1], model.torso[4]):  # units 2 and 7 dead in both hidden layers, every member
            weight_view(layer)[:, [2, 7]] = 0.0
            bias_view(layer)[:, [2, 7]] = -1.0
        for p in model.parameters():
            p.mul_(2.0)
    x = torch.randn(members, 32, 6)
    model(torch.randn(members, 64, 6))  # the training forward CBP reads (64 rows: no live unit silent)
    with torch.no_grad():
        before = model(x)
    interventions.after_step(1)
    replaced = interventions.methods["cbp"].method.last_replaced["torso.1"]
    assert replaced.shape == (members, 16)
    assert [row.nonzero().squeeze(1).tolist() for row in replaced] == [[2, 7]] * members
    scale = interventions.scalars()["plasticity/swr_scale"]
    assert scale.shape == (members,) and (abs(scale - 1) > 0.05).all()
    with torch.no_grad():
        torch.testing.assert_close(model(x), scale.view(members, 1, 1) * before, rtol=1e-5, atol=1e-6)


ALL_ON = dict(l2_init=1e-2, swr=0.05, cbp=True, cbp_replacement_rate=0.05, cbp_maturity=3, snp=0.01,
              snp_every=4, redo_every=6, redo_tau=0.1, redo_batch_size=16, reset_head_every=9, seed=5)


def _run(model, target, optimizer, interventions, steps, generator):
    for step in steps:
        _update(model, optimizer, interventions, generator)
        interventions.after_step(step, _sample_obs(generator, model.members))


@pytest.mark.parametrize("members", [1, 2])
def test_checkpoint_resume_continues_identically(tmp_path, members):
    """state_dict is weights_only-loadable and a resumed run matches the uninterrupted one bit for bit."""
    model, target, optimizer, interventions = _setup(layer_norm=True, members=members, **ALL_ON)
    generator = torch.Generator().manual_seed(0)
    _run(model, target, optimizer, interventions, range(1, 13), generator)
    torch.save({"model": model.state_dict(), "target": target.state_dict(), "optimizer": optimizer.state_dict(),
                "interventions": interventions.state_dict(), "data": generator.get_state()}, tmp_path / "ckpt.pt")
    _run(model, target, optimizer, interventions, range(13, 25), generator)

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = QNetwork(layer_norm=True, seed=1, members=members)
    resumed_target = QNetwork(layer_norm=True, seed=2, members=members)
    resumed.load_state_dict(checkpoint["model"])
    resumed_target.load_state_dict(checkpoint["target"])
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-3)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    flags = dict(ALL_ON, seed=_seeds(ALL_ON["seed"], members))
    resumed_interventions = Interventions(resumed, resumed_optimizer, target_model=resumed_target, **flags)
    resumed_interventions.load_state_dict(checkpoint["interventions"])
    generator = torch.Generator().set_state(checkpoint["data"])
    _run(resumed, resumed_target, resumed_optimizer, resumed_interventions, range(13, 25), generator)

    assert interventions.methods["cbp"].method.total_replacements > 0
    assert interventions.methods["reset_head"].events.count.tolist() == [2] * members
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(target.parameters(), resumed_target.parameters()):
        assert torch.equal(a, b)
    for key, value in interventions.scalars().items():
        assert value.shape == (members,) and torch.equal(value, resumed_interventions.scalars()[key]), key


def test_load_state_dict_with_other_flags_is_an_error():
    _, _, _, with_cbp = _setup(cbp=True)
    _, _, _, without = _setup()
    with pytest.raises(ValueError, match="same plasticity flags"):
        without.load_state_dict(with_cbp.state_dict())


@pytest.mark.parametrize("members", [1, 2])
def test_every_reset_keeps_parameters_in_the_optimiser(members):
    """Pitfall 1 through the facade, all methods on."""
    model, target, optimizer, interventions = _setup(layer_norm=True, members=members, **ALL_ON)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(0)
    _run(model, target, optimizer, interventions, range(1, 19), generator)
    interventions.on_task_switch()
    assert all(a is b for a, b in zip(model.parameters(), params))
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters()}
    assert all(weight_param(m) is m.weight for m in model.modules() if isinstance(m, MemberLinear))


@pytest.mark.parametrize("kwargs, match", [
    (dict(l2=-1e-4), "--l2 "), (dict(l2_init=-1.0), "--l2-init"), (dict(swr=1.5), "--swr "),
    (dict(swr_head=-0.1), "--swr-head"), (dict(cbp_utility="magnitude"), "--cbp-utility"),
    (dict(cbp_replacement_rate=-1.0), "--cbp-replacement-rate"), (dict(cbp_maturity=-5), "--cbp-maturity"),
    (dict(cbp_decay=1.0), "--cbp-decay"), (dict(snp=2.0), "--snp "), (dict(snp_every=-1), "--snp-every"),
    (dict(snp_every=10), "--snp-every needs --snp"), (dict(redo_tau=-0.1), "--redo-tau"),
(dict(redo_every=-3), "--redo-every"),
    (dict(redo_batch_size=0), "--redo-batch-size"), (dict(cbp_decay=float('nan')), "--cbp-decay"), (dict(reset_head_every=-2), "--reset-head-every")])
def test_invalid_flags_give_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _setup(**kwargs)


@pytest.mark.gpu
def test_all_methods_on_cuda():
    members = 2
    model = QNetwork(layer_norm=True, members=members).cuda()
    target = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    interventions = Interventions(model, optimizer, target_model=target,
                                  **dict(ALL_ON, seed=_seeds(ALL_ON["seed"], members)))
    for step in range(1, 25):
        loss = model(torch.randn(members, 8, 6, device="cuda")).pow(2).mean(dim=(1, 2)).sum() + interventions.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        interventions.after_step(step, lambda batch: torch.randn(members, batch, 6, device="cuda"))
    interventions.on_task_switch()
    scalars = interventions.scalars()
    assert all(v.device.type == "cuda" and v.shape == (members,) for v in scalars.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert interventions.methods["cbp"].method.total_replacements > 0
