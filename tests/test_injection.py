"""Plasticity injection (methods-v2.md §5): properties 5.1-5.4 on both agents' Q-networks, M = 1 and 2."""

import copy

import pytest
import torch

import agents.c51 as c51
import agents.dqn as dqn
from plasticity.injection import (
    PlasticityInjectionFlags,
    heads_of,
    inject_,
    planned_injections,
    restore_injected_,
)
from plasticity.intervention import Parts, Setting
from plasticity.networks import init_generators, layer_map, torso_precision
from plasticity.streams import MemberRandom

pytestmark = pytest.mark.usefixtures("one_thread")

OBS = (1, 28, 28)
ACTIONS = 3


def _args(agent, members=1, head="last:2", grad="through", steps=(10,), layer_norm=False, **extra):
    module = dqn if agent == "dqn" else c51
    args = module.Args(env_id="ImageMDP/mnist", hidden_sizes=[16, 16], num_seeds=members, layer_norm=layer_norm)
    args.plasticity_injection_at = list(steps)
    args.plasticity_injection_at_task_switch = False
    args.plasticity_injection_head = head
    args.plasticity_injection_frozen_grad = grad
    for name, value in extra.items():
        setattr(args, name, value)
    return args


def _network(agent, args, seeds=None):
    generators = None if seeds is None else init_generators(seeds)
    if agent == "dqn":
        return dqn.QNetwork(OBS, ACTIONS, args, None, generators)
    return c51.QNetwork(OBS, ACTIONS, args, torch.linspace(-1.0, 1.0, 5), generators)


def _obs(members, batch=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (members, batch, *OBS), generator=generator, dtype=torch.uint8)


def _loss(out):
    """A fixed, non-trivial scalar of the outputs (a regression of every output on fixed targets)."""
    generator = torch.Generator().manual_seed(7)
    return (out - torch.randn(out.shape, generator=generator)).pow(2).sum()


def _setup(agent, members=1, seed=0, **kwargs):
    args = _args(agent, members, **kwargs)
    seeds = [seed + k for k in range(members)]
    torch.manual_seed(seed)
    q = _network(agent, args, seeds)
    target = _network(agent, args)
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-2)
    random = MemberRandom([1000 + s for s in seeds])
    return args, q, target, optimizer, random


def _train(q, optimizer, steps=2, seed=3):
    for i in range(steps):
        optimizer.zero_grad()
        _loss(q(_obs(q.torso.members, seed=seed + i))).backward()
        optimizer.step()


def _theta(q):
    """θ: the original head's tensors (last:2: the torso's last block and the output layer)."""
    heads = heads_of(q)
    return [p for m in heads.original(q.torso, q.head) for p in m.parameters()]


def _phi(q):
    heads = heads_of(q)
    return [p for m in list(q.torso)[:heads.start] for p in m.parameters()]


def _pair(q, k=0):
    a, b = heads_of(q).pairs[k]
    return list(a.parameters()), list(b.parameters())


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _same(xs, ys):
    return all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))


CASES = [(agent, members, head) for agent in ("dqn", "c51") for members in (1, 2) for head in ("last:1", "last:2")]


@pytest.mark.parametrize("agent", ["dqn", "c51"])
@pytest.mark.parametrize("members", [1, 2])
def test_allocation_draws_nothing(agent, members):
    """Every other initial weight is bit-identical to a run without injection; the copies are zero and frozen."""
    seeds = list(range(members))
    torch.manual_seed(0)
    plain = _network(agent, _args(agent, members, steps=()), seeds)
    state_plain = torch.random.get_rng_state()
    torch.manual_seed(0)
    injected = _network(agent, _args(agent, members), seeds)
    assert torch.equal(torch.random.get_rng_state(), state_plain)
    assert heads_of(plain) is None
    own = injected.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(own[name], tensor), name
    copies = [p for p in heads_of(injected).parameters()]
    assert copies and all(not p.requires_grad and not p.any() for p in copies)
    # The copies are invisible to the layer map: methods and diagnostics see the plain network.
    assert [n for n, _ in layer_map(injected).ordered] == [n for n, _ in layer_map(plain).ordered]
    assert layer_map(injected).output is injected.head


@pytest.mark.parametrize("agent,members,head", CASES)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_5_1_q_bitwise_unchanged(agent, members, head, layer_norm):
    args, q, target, optimizer, random = _setup(agent, members, head=head, layer_norm=layer_norm, steps=(10, 20))
    _train(q, optimizer)
    target.load_state_dict(q.state_dict())
    obs = _obs(members)
    with torch.no_grad():
        before, target_before = q(obs), target(obs)
    inject_(q, optimizer, random, target)
    a, b = _pair(q)
    assert not _same(a, [torch.zeros_like(p) for p in a])  # a fresh draw, not zeros
    assert _same(a, b)
    with torch.no_grad():
        assert torch.equal(q(obs), before)
        assert torch.equal(target(obs), target_before)
    assert _same(_pair(target)[0], a) and _same(_pair(target)[1], b)
    # A second injection (its own pair) leaves Q bitwise unchanged too.
    _train(q, optimizer)
    with torch.no_grad():
        before = q(obs)
    inject_(q, optimizer, random, target)
    with torch.no_grad():
        assert torch.equal(q(obs), before)


@pytest.mark.parametrize("agent,members,head", CASES)
def test_5_2_trainable_count_and_one_update(agent, members, head):
    args, q, target, optimizer, random = _setup(agent, members, head=head)
    _train(q, optimizer)

    def trainable():
        return sum(p.numel() for p in q.parameters() if p.requires_grad)

    count = trainable()
    inject_(q, optimizer, random, target)
    assert trainable() == count
    theta, phi = _theta(q), _phi(q)
    a, b = _pair(q)
    assert all(not p.requires_grad for p in theta + b) and all(p.requires_grad for p in a + phi)
    # The target freezes the same tensors.
    assert [p.requires_grad for p in target.parameters()] == [p.requires_grad for p in q.parameters()]
    frozen_before, a_before, phi_before = _snapshot(theta + b), _snapshot(a), _snapshot(phi)
    _train(q, optimizer, steps=1, seed=11)
    assert _same(theta + b, frozen_before)
    assert all(not torch.equal(x, y) for x, y in zip(a, a_before))
    assert all(not torch.equal(x, y) for x, y in zip(phi, phi_before))


@pytest.mark.parametrize("agent,members,head", CASES)
def test_5_3_optimizer_holds_every_trainable_tensor(agent, members, head):
    args, q, target, optimizer, random = _setup(agent, members, head=head)
    _train(q, optimizer)
    a, b = _pair(q)
    assert all(not optimizer.state.get(p) for p in a + b)  # unused before injection: no state
    inject_(q, optimizer, random, target)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in q.parameters() if p.requires_grad)
    assert all(not optimizer.state.get(p) for p in a)
    _train(q, optimizer, steps=1)
    assert all(optimizer.state.get(p) for p in a) and all(not optimizer.state.get(p) for p in b)


def test_5_3_injection_asserts_empty_state():
    args, q, target, optimizer, random = _setup("dqn")
    a, _ = _pair(q)
    optimizer.state[a[0]]["step"] = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="optimiser state"):
        inject_(q, optimizer, random, target)


def _manual(q, x, detach):
    """Q = h_θ + h_a − h_b with the paths in ``detach`` ("theta", "a", "b") stop-gradiented (M = 1 or more)."""
    heads = heads_of(q)
    modules = list(q.torso)
    one = q.torso.members == 1
    h = q.torso.scale_pixels(x)
    h = h.squeeze(0) if one else h
    for module in modules[:heads.start]:
        h = module(h)
    a, b = heads.pairs[0]
    outputs = {}
    for name, path in (("theta", heads.original(q.torso, q.head)), ("a", list(a)), ("b", list(b))):
        f = h
        for module in path[:-1]:
            f = module(f)
        out = path[-1](f.unsqueeze(0) if one else f)
        outputs[name] = out.detach() if name in detach else out
    return outputs["theta"] + (outputs["a"] - outputs["b"])


@pytest.mark.parametrize("agent,members,head", CASES)
def test_5_4_encoder_gradients(agent, members, head):
    obs = _obs(members, seed=5)
    grads = {}
    for grad in ("through", "detach"):
        args, q, target, optimizer, random = _setup(agent, members, head=head, grad=grad)
        _train(q, optimizer)
        phi = _phi(q)
        before = torch.autograd.grad(_loss(q(obs)), phi)
        inject_(q, optimizer, random, target)
        grads[grad] = torch.autograd.grad(_loss(q(obs)), phi)
        grads["pre"] = before
        # The θ'1 path alone (θ and θ'2 stop-gradiented): what detach adds to the pre-injection gradient.
        grads["a_path"] = torch.autograd.grad(_loss(_manual(q, obs, {"theta", "b"})), phi)
    for through, pre in zip(grads["through"], grads["pre"]):
        torch.testing.assert_close(through, pre, rtol=1e-5, atol=1e-6)
    for detach, pre, a_path in zip(grads["detach"], grads["pre"], grads["a_path"]):
        assert (detach - pre).abs().max() > 1e-4
        torch.testing.assert_close(detach - pre, a_path, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("agent,members", [("dqn", 1), ("c51", 2)])
def test_bf16_unchanged_and_trains(agent, members):
    args, q, target, optimizer, random = _setup(agent, members, head="last:2")
    obs = _obs(members)
    with torch.no_grad(), torso_precision(torch.bfloat16):
        before = q(obs)
    inject_(q, optimizer, random, target)
    with torso_precision(torch.bfloat16):
        with torch.no_grad():
            assert torch.equal(q(obs), before)
        out = q(obs)
        assert out.dtype == torch.float32
        _loss(out).backward()
    a, b = _pair(q)
    assert all(p.grad is not None for p in a + _phi(q)) and all(p.grad is None for p in b + _theta(q))


def _intervention(q, target, optimizer, random, **flags):
    values = dict(plasticity_injection_at=[], plasticity_injection_at_task_switch=False,
                  plasticity_injection_head="last:2", plasticity_injection_frozen_grad="through") | flags
    flags = PlasticityInjectionFlags(**values)
    setting = Setting(task_switches=True)
    flags.check(setting)
    return flags.build(Parts(q, optimizer, target, random, setting))


def test_intervention_schedule_state_and_resume():
    args, q, target, optimizer, random = _setup("dqn", 2, steps=(8, 16))
    method = _intervention(q, target, optimizer, random, plasticity_injection_at=[8, 16])
    method.after_env_step(0, 4, False, None)
    assert heads_of(q).injected == 0 and not method.rewrote
    method.after_env_step(4, 8, False, None)  # 8 crossed: (4, 8]
    assert heads_of(q).injected == 1 and heads_of(target).injected == 1 and method.rewrote
    assert torch.equal(method.scalars()["plasticity/injections"], torch.tensor([1, 1]))
    method.after_env_step(8, 12, False, None)
    assert heads_of(q).injected == 1
    _train(q, optimizer, steps=1)
    method.after_env_step(12, 16, False, None)
    assert heads_of(q).injected == 2 and method.state_dict()["steps"] == [8, 16]
    # Resume: fresh networks loaded from the state dicts, then the intervention's state.
    _, q2, target2, optimizer2, random2 = _setup("dqn", 2, seed=5, steps=(8, 16))
    q2.load_state_dict(q.state_dict())
    target2.load_state_dict(target.state_dict())
    resumed = _intervention(q2, target2, optimizer2, random2, plasticity_injection_at=[8, 16])
    resumed.load_state_dict(method.state_dict())
    obs = _obs(2)
    with torch.no_grad():
        assert torch.equal(q2(obs), q(obs)) and torch.equal(target2(obs), target(obs))
    assert [p.requires_grad for p in q2.parameters()] == [p.requires_grad for p in q.parameters()]
    assert torch.equal(resumed.scalars()["plasticity/injections"], torch.tensor([2, 2]))
    # Loading weights alone (evaluation) restores the count from them.
    _, q3, *_ = _setup("dqn", 2, seed=6, steps=(8, 16))
    q3.load_state_dict(q.state_dict())
    assert restore_injected_(q3) == 2
    with torch.no_grad():
        assert torch.equal(q3(obs), q(obs))


def test_at_task_switch_and_planned_pairs():
    args = _args("dqn", steps=(), plasticity_injection_at_task_switch=True, total_timesteps=100_000,
                 shift_every=20_000)
    assert planned_injections(args) == 5
    assert planned_injections(_args("dqn", steps=(5, 9))) == 2
    assert planned_injections(_args("dqn", steps=())) == 0
    torch.manual_seed(0)
    q, target = _network("dqn", args), _network("dqn", args)
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters())
    method = _intervention(q, target, optimizer, MemberRandom([3]), plasticity_injection_at_task_switch=True)
    method.after_env_step(0, 20_000, False, None)
    method.on_task_switch()
    assert heads_of(q).injected == 1 and method.state_dict()["steps"] == [20_000]


SWITCHING = Setting(task_switches=True)


def test_flag_errors():
    def check(setting=SWITCHING, **flags):
        values = dict(plasticity_injection_at=[], plasticity_injection_at_task_switch=False,
                      plasticity_injection_head="last:2", plasticity_injection_frozen_grad="through") | flags
        PlasticityInjectionFlags(**values).check(setting)

    check(plasticity_injection_at=[10, 20])
    with pytest.raises(ValueError, match="increasing"):
        check(plasticity_injection_at=[20, 10])
    with pytest.raises(ValueError, match="increasing"):
        check(plasticity_injection_at=[10, 10])
    with pytest.raises(ValueError, match="no task switches"):
        check(Setting(task_switches=False), plasticity_injection_at_task_switch=True)
    with pytest.raises(ValueError, match="need an injection"):
        check(plasticity_injection_head="last:1")
    with pytest.raises(ValueError, match="need an injection"):
        check(plasticity_injection_frozen_grad="detach")
    assert PlasticityInjectionFlags().build(None) is None  # off by default


def test_build_needs_preallocated_heads():
    args = _args("dqn", steps=())
    torch.manual_seed(0)
    q = _network("dqn", args)
    with pytest.raises(ValueError, match="pre-allocated heads"):
        _intervention(q, copy.deepcopy(q), None, MemberRandom([0]), plasticity_injection_at=[5])
