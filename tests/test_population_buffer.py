"""Replay buffers of populations (spec populations.md 1.2, 2.3): member k is the single run with seed s + k.

A 3-member buffer fed per-member data returns, for member k, exactly the batches (same indices, same
contents) that a one-member buffer with ``seeds=[seeds[k]]`` fed member k's data returns -- with valid
flags and episode boundaries that differ between members, across ring wrap-around, interleaved with adds
as in training -- and one member's seed or data changes nothing for the others.
"""

import pytest
import torch
from test_replay_buffer import FrameIdEnv

from envs.replay_buffer import FrameStackReplayBuffer, ReplayBuffer

ENVS, ROWS = 3, 12  # 12 rows: the ring wraps several times in the runs below
SEEDS = [11, 22, 33]


def member_data(member, steps, generic):
    """One member's add() arguments, step by step: its own episodes (end probability and seed per member)."""
    env = FrameIdEnv(ENVS, end_prob=(0.15, 0.3, 0.5)[member % 3], seed=100 + member)
    generator = torch.Generator().manual_seed(200 + member)
    offset = 1_000_000 * member  # frame ids unique across members (0 stays the padding frame)

    def own(stacks):
        return torch.where(stacks != 0, stacks + offset, 0)

    obs = own(env.reset())
    data = []
    for _ in range(steps):
        next_obs, terminated, truncated, reset_step = env.step()
        next_obs, valid = own(next_obs), ~reset_step
        if generic:  # the generic layout takes any mask: drop some more slots, differently per member
            valid &= torch.rand(ENVS, generator=generator) < 0.75
        actions = torch.randint(0, 6, (ENVS,), generator=generator)
        rewards = torch.randn(ENVS, generator=generator)
        data.append((obs, actions, rewards, next_obs, terminated, truncated, valid))
        obs = next_obs
    return data


def make(kind, seeds):
    cls = ReplayBuffer if kind == "generic" else FrameStackReplayBuffer
    return cls(ROWS * ENVS, (4, 2, 2), ENVS, obs_dtype=torch.int32, seeds=seeds)


def population_step(data, step):
    """The population's add() arguments: every member's tensors stacked on a leading member dim."""
    return tuple(torch.stack([member[step][field] for member in data]) for field in range(7))


def add(buffer, args):
    *rest, valid = args
    buffer.add(*rest, valid=valid)


def assert_member_equal(population_batch, member, single_batch):
    for name, pop, one in zip(population_batch._fields, population_batch, single_batch):
        assert pop.shape[0] == len(SEEDS) and one.shape[0] == 1
        assert torch.equal(pop[member], one[0]), f"member {member}: {name} differs from its single run"


def run_side_by_side(kind, steps, population, singles, data, start=0):
    """Feed the same steps to the population and to each member's single run; compare every draw."""
    for step in range(start, start + steps):
        add(population, population_step(data, step))
        for member, single in enumerate(singles):
            add(single, population_step([data[member]], step))
        if step >= 2 and step % 2 == 0:
            batch = population.sample(7 + step % 5)  # varying sizes: the streams must stay in step
            for member, single in enumerate(singles):
                assert_member_equal(batch, member, single.sample(7 + step % 5))
        if step >= 2 and step % 5 == 0:
            probe = population.sample_obs(4)
            for member, single in enumerate(singles):
                assert torch.equal(probe[member], single.sample_obs(4)[0])


@pytest.mark.parametrize("kind", ["frames", "generic"])
def test_member_k_is_the_single_run_with_seed_k(kind):
    steps = 5 * ROWS + 4
    data = [member_data(member, steps + 2, kind == "generic") for member in range(len(SEEDS))]
    population = make(kind, SEEDS)
    singles = [make(kind, [seed]) for seed in SEEDS]
    run_side_by_side(kind, steps, population, singles, data)
    counts = population.sampleable_counts().tolist()
    assert counts == [single.num_sampleable() for single in singles]
    assert len(set(counts)) > 1  # the members' valid flags differ: per-member sampling was exercised
    assert population.num_sampleable() == min(counts)
    assert len(population) == len(singles[0]) == ROWS * ENVS
    big = population.sample(5000)  # a draw larger than the random pools' block, each member its own slots
    for member, single in enumerate(singles):
        assert_member_equal(big, member, single.sample(5000))
    assert population.nbytes == sum(single.nbytes for single in singles)
    assert population.bytes_per_transition == singles[0].bytes_per_transition


@pytest.mark.parametrize("kind", ["frames", "generic"])
def test_one_members_seed_and_data_change_nothing_for_the_others(kind):
    steps = 3 * ROWS
    data = [member_data(member, steps, kind == "generic") for member in range(3)]
    other = [member_data(7, steps, kind == "generic"), *data[1:]]  # member 0: other episodes, other seed
    a, b = make(kind, SEEDS), make(kind, [99, *SEEDS[1:]])
    for step in range(steps):
        add(a, population_step(data, step))
        add(b, population_step(other, step))
        if step >= 2:
            batch_a, batch_b = a.sample(16), b.sample(16)
            for tensor_a, tensor_b in zip(batch_a, batch_b):
                assert torch.equal(tensor_a[1:], tensor_b[1:])
    assert not torch.equal(a.sample(64).obs[0], b.sample(64).obs[0])


@pytest.mark.parametrize("kind", ["frames", "generic"])
def test_population_state_dict_round_trip_and_per_member_states(kind, tmp_path):
    steps = 2 * ROWS + 5
    data = [member_data(member, steps + 10, kind == "generic") for member in range(3)]
    population = make(kind, SEEDS)
    singles = [make(kind, [seed]) for seed in SEEDS]
    run_side_by_side(kind, steps, population, singles, data)

    # Whole population through torch.load(weights_only=True): continues exactly like the original.
    torch.save(population.state_dict(), tmp_path / "population.pt")
    restored = make(kind, SEEDS)
    restored.load_state_dict(torch.load(tmp_path / "population.pt", weights_only=True), env_reset=False)
    for buffer in (population, restored):
        add(buffer, population_step(data, steps))
    assert all(torch.equal(x, y) for x, y in zip(population.sample(16), restored.sample(16)))

    # A member's state is its single run's state; a population rebuilds from its members' states.
    for single in singles:
        add(single, population_step([data[singles.index(single)]], steps))
        single.sample(16)
    for member, single in enumerate(singles):
        member_state, single_state = population.member_state_dict(member), single.state_dict()
        assert member_state.keys() == single_state.keys()
        for name in member_state:
            if name != "random":
                assert torch.equal(member_state[name], single_state[name]), name
        mine, theirs = member_state["random"], single_state["random"]
        assert mine["seeds"] == theirs["seeds"] and torch.equal(mine["pool"], theirs["pool"])
        assert all(torch.equal(x, y) for x, y in zip(mine["generators"], theirs["generators"]))
    torch.save([single.state_dict() for single in singles], tmp_path / "members.pt")
    rebuilt = make(kind, SEEDS)
    rebuilt.load_member_state_dicts(torch.load(tmp_path / "members.pt", weights_only=True), env_reset=False)
    lone = make(kind, [SEEDS[2]])
    lone.load_state_dict(population.member_state_dict(2), env_reset=False)
    run_side_by_side(kind, 6, rebuilt, [*singles[:2], lone], data, start=steps + 1)

    with pytest.raises(ValueError, match="members"):
        make(kind, SEEDS[:2]).load_state_dict(population.state_dict())
    with pytest.raises(ValueError, match="seeds"):
        make(kind, [1, 2, 3]).load_state_dict(population.state_dict())


def test_a_member_with_nothing_sampleable_is_named():
    buffer = ReplayBuffer(20, (2,), 2, obs_dtype=torch.float32, seeds=SEEDS)
    obs = torch.zeros(3, 2, 2)
    flags = torch.zeros(3, 2, dtype=torch.bool)
    valid = torch.tensor([[True, True], [False, False], [True, False]])
    buffer.add(obs, torch.zeros(3, 2), torch.zeros(3, 2), obs, flags, flags, valid=valid)
    assert buffer.sampleable_counts().tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"member\(s\) \[1\]"):
        buffer.sample(4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["frames", "generic"])
def test_members_on_cuda_are_their_single_runs_on_cuda(kind):
    cls = ReplayBuffer if kind == "generic" else FrameStackReplayBuffer
    steps = 3 * ROWS
    data = [member_data(member, steps, kind == "generic") for member in range(3)]
    population = cls(ROWS * ENVS, (4, 2, 2), ENVS, device="cuda", obs_dtype=torch.int32, seeds=SEEDS,
                     sample_device="cpu")
    singles = [cls(ROWS * ENVS, (4, 2, 2), ENVS, device="cuda", obs_dtype=torch.int32, seeds=[seed],
                   sample_device="cpu") for seed in SEEDS]
    run_side_by_side(kind, steps, population, singles, data)
