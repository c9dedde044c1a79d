"""Member random streams (plasticity/streams.py): member k draws exactly what its single run draws.

Spec populations.md 1.2 (every random stream is the member's own, seeded as its single run
seeds it), 2.2 (env streams bit-identical) and 2.3 (independence), 4.2 (resume continues).
"""

import io

import pytest
import torch

from plasticity.streams import DEFAULT_BLOCK, MemberRandom, stream_seed

SEEDS = [3, 17, 4242]


def _requests(rng: MemberRandom, member: int | None = None) -> list[torch.Tensor]:
    """A fixed sequence of requests of mixed kinds and sizes, some larger than a block (16) and DEFAULT_BLOCK.

    ``member``: the population member this (one-member) ``rng`` stands for, to pick its per-member ``high``.
    """
    highs = torch.tensor([2, 5, 11])
    high = highs if member is None else highs[member:member + 1]
    return [
        rng.uniform(5),
        rng.integers(10, 7),
        rng.uniform(40),  # more than a block of 16
        rng.permutations(9),
        rng.symmetric(0.3, 2, 3),
        rng.uniform(16),
        rng.integers(high, 4),
        rng.uniform(),
        rng.integers(1000, 3, 5),
        rng.uniform(DEFAULT_BLOCK + 3),  # more than the default block too
        rng.symmetric(1.0, 1, dtype=torch.float64),
        rng.uniform(3, 0),
    ]


@pytest.mark.parametrize("block", [16, DEFAULT_BLOCK])
def test_member_k_draws_what_the_single_run_with_seed_k_draws(block):
    population = _requests(MemberRandom(SEEDS, block=block))
    for k, seed in enumerate(SEEDS):
        single = _requests(MemberRandom([seed], block=block), member=k)
        for together, alone in zip(population, single, strict=True):
            assert together.shape == (3, *alone.shape[1:]) and alone.shape[0] == 1
            assert together.dtype == alone.dtype
            assert torch.equal(together[k], alone[0])
    assert not torch.equal(population[0][0], population[0][1])  # different seeds, different numbers


def test_draws_depend_on_the_seed_and_the_request_sizes_only():
    """The block is only a cache: what a member draws is the same whatever the block size."""
    small, large = MemberRandom(SEEDS, block=4), MemberRandom(SEEDS, block=1000)
    for size in (3, 1, 7, 20, 2, 9):
        assert torch.equal(small.uniform(size), large.uniform(size))
    seeded = MemberRandom([SEEDS[0], 99, SEEDS[2]], block=4)  # spec 2.3: one member's seed changes only it
    again = MemberRandom(SEEDS, block=4)
    for size in (3, 1, 7, 20):
        a, b = seeded.uniform(size), again.uniform(size)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and not torch.equal(a[1], b[1])


def test_the_pool_serves_each_generator_stream_in_order():
    """Nothing skipped or repeated across refills: member k's uniforms are ``torch.rand`` of its seed, in order.

    (On a CPU generator consecutive ``torch.rand`` calls concatenate to one long call.)
    """
    rng = MemberRandom(SEEDS, block=16)
    sizes = (5, 16, 3, 40, 1, 17, 0, 12)
    drawn = torch.cat([rng.uniform(size) for size in sizes], dim=1)
    for k, seed in enumerate(SEEDS):
        stream = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert torch.equal(drawn[k], stream)


def test_uniform_is_float64_in_unit_interval():
    u = MemberRandom(SEEDS).uniform(4, 5000)
    assert u.shape == (3, 4, 5000) and u.dtype == torch.float64
    assert (u >= 0).all() and (u < 1).all()
    torch.testing.assert_close(u.mean(dim=(1, 2)), torch.full((3,), 0.5, dtype=torch.float64), atol=0.01, rtol=0)
    torch.testing.assert_close(u.var(dim=(1, 2)), torch.full((3,), 1 / 12, dtype=torch.float64), atol=0.005, rtol=0)


def test_integers_are_in_range_and_hit_every_value():
    rng = MemberRandom(SEEDS, block=64)
    values = rng.integers(7, 7000)
    assert values.shape == (3, 7000) and values.dtype == torch.int64
    assert values.min() >= 0 and values.max() < 7
    for member in values:
        counts = torch.bincount(member, minlength=7)
        assert counts.shape == (7,) and (counts > 800).all() and (counts < 1200).all()  # 1000 expected each
    # A per-member high: member k draws in [0, high[k]).
    high = torch.tensor([1, 2, 5])
    per_member = rng.integers(high, 2000)
    assert (per_member[0] == 0).all()
    assert set(per_member[1].tolist()) == {0, 1} and set(per_member[2].tolist()) == set(range(5))
    # A high per member and element (e.g. each member's own buffer size per sample).
    grid = torch.tensor([[1, 3], [2, 4], [5, 6]])
    drawn = rng.integers(grid, 2, 500)
    assert drawn.shape == (3, 2, 500) and (drawn < grid.unsqueeze(-1)).all() and (drawn >= 0).all()
    assert all(set(drawn[k, j].tolist()) == set(range(int(grid[k, j]))) for k in range(3) for j in range(2))


def test_symmetric_draws_in_the_bound_and_dtype():
    rng = MemberRandom(SEEDS)
    values = rng.symmetric(0.25, 3000)
    assert values.dtype == torch.float32 and values.shape == (3, 3000)
    assert (values.abs() <= 0.25).all() and values.abs().max() > 0.24 and values.min() < 0 < values.max()
    bounds = torch.tensor([[0.1], [1.0], [10.0]])  # a bound per member (e.g. 1/sqrt(fan_in) per layer)
    scaled = rng.symmetric(bounds, 1000, dtype=torch.float64)
    assert scaled.dtype == torch.float64
    assert all(scaled[k].abs().max() <= bounds[k] and scaled[k].abs().max() > 0.9 * bounds[k] for k in range(3))


def test_permutations_are_permutations():
    rng = MemberRandom(SEEDS, block=32)
    firsts = []
    for n in (1, 2, 10, 50):
        perms = rng.permutations(n)
        assert perms.shape == (3, n) and perms.dtype == torch.int64
        assert torch.equal(perms.sort(dim=1).values, torch.arange(n).expand(3, n))
    for _ in range(200):
        firsts.append(rng.permutations(6)[:, 0])
    firsts = torch.stack(firsts)
    assert all(set(firsts[:, k].tolist()) == set(range(6)) for k in range(3))  # any element can come first
    many = rng.permutations(20)
    assert not torch.equal(many[0], many[1])


@pytest.mark.parametrize("through_bytes", [False, True])
def test_state_dict_round_trip_continues_the_stream_exactly(through_bytes):
    rng = MemberRandom(SEEDS, block=16)
    rng.uniform(5)
    rng.integers(3, 20)  # mid-block: the saved state must carry the unused rest of the pool
    state = rng.state_dict()
    if through_bytes:  # as a checkpoint does
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
    expected = _requests(rng)
    restored = MemberRandom(SEEDS, block=16)
    restored.uniform(7)  # whatever it drew before, loading replaces it
    restored.load_state_dict(state)
    for a, b in zip(_requests(restored), expected, strict=True):
        assert torch.equal(a, b)


def test_a_saved_state_is_not_changed_by_later_draws():
    """The state is a snapshot: in-place edits of drawn values (or of a stream loaded from it) never reach it."""
    rng = MemberRandom(SEEDS, block=16)
    rng.uniform(3)
    state = rng.state_dict()
    drawn = rng.uniform(6)
    expected = drawn.clone()
    drawn.mul_(0.0)  # a caller scaling its draws in place
    first = MemberRandom(SEEDS, block=16)
    first.load_state_dict(state)
    assert torch.equal(first.uniform(6), expected)
    first_draws = first.uniform(4)
    second = MemberRandom(SEEDS, block=16)
    second.load_state_dict(state)
    second.uniform(6).fill_(-1.0)
    first_draws.fill_(-1.0)
    third = MemberRandom(SEEDS, block=16)
    third.load_state_dict(state)
    assert torch.equal(third.uniform(6), expected)


def test_loading_the_streams_of_other_seeds_is_an_error():
    state = MemberRandom(SEEDS).state_dict()
    with pytest.raises(ValueError, match="cannot be loaded"):
        MemberRandom([3, 17, 4243]).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot be loaded"):
        MemberRandom(SEEDS[:2]).load_state_dict(state)
    with pytest.raises(ValueError, match="at least one seed"):
        MemberRandom([])


def test_member_copy_continues_that_members_stream():
    rng = MemberRandom(SEEDS, block=16)
    rng.uniform(11)  # mid-block
    single = rng.member(2)
    assert single.members == 1 and single.seeds == [SEEDS[2]]
    alone = _requests(single, member=2)
    together = _requests(rng)
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a[2], b[0])
    # A copy: drawing from it did not advance the population, and vice versa.
    fresh = MemberRandom(SEEDS, block=16)
    fresh.uniform(11)
    copy = fresh.member(0)
    fresh.uniform(30)
    reference = MemberRandom([SEEDS[0]], block=16)
    reference.uniform(11)
    assert torch.equal(copy.uniform(30), reference.uniform(30))


def test_stream_seed_differs_by_purpose_and_seed():
    seeds = {stream_seed(seed, purpose) for seed in (0, 1, 2, 12345) for purpose in ("actions", "replay", "env")}
    assert len(seeds) == 12
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)
    assert stream_seed(7, "replay") == stream_seed(7, "replay")  # deterministic: a rerun draws the same
    assert stream_seed(7, "replay") != 7
    assert stream_seed(1, "ab") != stream_seed(1, "ba")
    # Streams of different purposes draw different numbers, even from the same run seed.
    actions = MemberRandom([stream_seed(5, "actions")]).uniform(8)
    replay = MemberRandom([stream_seed(5, "replay")]).uniform(8)
    assert not torch.equal(actions, replay)
