"""Replay buffers: exact stored transitions, valid masks, uniform sampling, the frame-stack layout (pitfall 11).

Single runs: populations of one member (leading member dim 1); tests/test_population_buffer.py pins the members.
"""

import pytest
import torch

from envs.atari import AtariEnv
from envs.replay_buffer import (
    Batch,
    FrameStackReplayBuffer,
    ReplayBuffer,
    make_replay_buffer,
    planned_replay_nbytes,
)


class FrameIdEnv:
    """A NEXT_STEP-autoreset vector env whose frames are unique ids (AtariVectorEnv's stack convention).

    Each frame is a 2x2 block filled with a fresh int32 id, so a stack names exactly which frames it holds.
    Episodes end (terminated or truncated, half each) with probability ``end_prob`` per step.
    """

    def __init__(self, num_envs, end_prob, seed, stack=4):
        self.num_envs, self.end_prob, self.stack = num_envs, end_prob, stack
        self.generator = torch.Generator().manual_seed(seed)
        self.next_id = 1
        self.over = torch.zeros(num_envs, dtype=torch.bool)
        self.stacks = torch.zeros(num_envs, stack, 2, 2, dtype=torch.int32)

    def frames(self, n):
        ids = torch.arange(self.next_id, self.next_id + n, dtype=torch.int32)
        self.next_id += n
        return ids.view(n, 1, 1).expand(n, 2, 2)

    def reset(self):
        self.stacks.zero_()
        self.stacks[:, -1] = self.frames(self.num_envs)
        self.over.zero_()
        return self.stacks.clone()

    def step(self):
        reset_step = self.over.clone()
        self.stacks[reset_step] = 0  # a new episode: zeros, then its first frame
        self.stacks = torch.cat([self.stacks[:, 1:], self.frames(self.num_envs).unsqueeze(1)], 1)
        end = (torch.rand(self.num_envs, generator=self.generator) < self.end_prob) & ~reset_step
        terminated = end & (torch.rand(self.num_envs, generator=self.generator) < 0.5)
        self.over = end
        return self.stacks.clone(), terminated, end & ~terminated, reset_step


def ids(stack):
    """The frame ids of one stacked observation, e.g. (0, 0, 17, 20)."""
    return tuple(stack[:, 0, 0].tolist())


def first(batch: Batch) -> Batch:
    """The only member's batch of a one-member buffer."""
    assert all(tensor.shape[0] == 1 for tensor in batch)
    return Batch(*(tensor[0] for tensor in batch))


def fill(buffer, env, steps, warmup=0):
    """Run the usual agent loop; return every real transition by obs ids, with its add index."""
    obs = env.reset()
    for _ in range(warmup):  # start adding mid-episode
        obs, *_ = env.step()
    generator = torch.Generator().manual_seed(123)
    transitions = {}
    for index in range(steps):
        next_obs, terminated, truncated, reset_step = env.step()
        actions = torch.randint(0, 6, (env.num_envs,), generator=generator)
        rewards = torch.randn(env.num_envs, generator=generator)
        buffer.add(obs[None], actions[None], rewards[None], next_obs[None], terminated[None], truncated[None],
                   valid=~reset_step[None])
        for e in range(env.num_envs):
            if not reset_step[e]:
                transitions[ids(obs[e])] = dict(
                    index=index, action=actions[e].item(), reward=rewards[e].item(), next_obs=ids(next_obs[e]),
                    terminated=terminated[e].item(), truncated=truncated[e].item())
        obs = next_obs
    return transitions


def check_batch_against(batch: Batch, transitions):
    """Every sampled transition is a real one: obs, action, reward, next obs and flag all match."""
    sampled = set()
    for i in range(len(batch.actions)):
        key = ids(batch.obs[i])
        assert key in transitions, f"sampled obs {key} was never a transition's obs"
        real = transitions[key]
        assert batch.actions[i].item() == real["action"] and batch.rewards[i].item() == pytest.approx(real["reward"])
        assert ids(batch.next_obs[i]) == real["next_obs"], f"next_obs of {key}"
        assert batch.terminated[i].item() == real["terminated"]
        sampled.add(key)
    return sampled


# ------------------------------------------------------------ frame stack
@pytest.mark.parametrize("num_rows, end_prob, seed", [(8, 0.3, 0), (9, 0.5, 1), (13, 0.1, 2), (64, 0.2, 3)])
def test_frame_stack_returns_exactly_the_stored_transitions_across_the_seam(num_rows, end_prob, seed):
    envs = 3
    env = FrameIdEnv(envs, end_prob, seed)
    buffer = FrameStackReplayBuffer(num_rows * envs, (4, 2, 2), envs, obs_dtype=torch.int32, seeds=[seed])
    steps = 5 * num_rows + 3  # several wraps of the ring
    transitions = fill(buffer, env, steps, warmup=2)
    batch = first(buffer.sample(4000))
    sampled = check_batch_against(batch, transitions)
    # Coverage: every real transition whose frames are all still stored (age >= 3) and whose next frame
    # is stored (not the newest) is sampled; older ones (overwritten) never are.
    newest = steps - 1
    must = {key for key, t in transitions.items() if newest - (num_rows - 4) <= t["index"] < newest}
    allowed = {key for key, t in transitions.items() if newest - num_rows < t["index"] < newest}
    assert must <= sampled <= allowed
    assert buffer.num_sampleable() == len(sampled)
    ends = [transitions[key] for key in sampled if transitions[key]["terminated"] or transitions[key]["truncated"]]
    assert ends  # pitfall 11 exercised: their next_obs was checked to be the true last observation
    for end in ends:
        assert end["next_obs"][-1] != 0 and end["next_obs"][:3] != (0, 0, 0)


def test_first_add_mid_episode_rebuilds_its_full_stack():
    env = FrameIdEnv(2, end_prob=0.0, seed=0)
    buffer = FrameStackReplayBuffer(20, (4, 2, 2), 2, obs_dtype=torch.int32)
    transitions = fill(buffer, env, steps=3, warmup=5)
    first_key = min(transitions, key=lambda key: transitions[key]["index"])
    assert 0 not in first_key  # four real frames
    assert first_key in check_batch_against(first(buffer.sample(200)), transitions)


def test_reset_rows_and_the_newest_row_are_never_sampled():
    env = FrameIdEnv(2, end_prob=0.5, seed=4)
    buffer = FrameStackReplayBuffer(200, (4, 2, 2), 2, obs_dtype=torch.int32)
    transitions = fill(buffer, env, steps=40)
    sampled = check_batch_against(first(buffer.sample(5000)), transitions)  # reset rows have no entry: never sampled
    newest = {key for key, t in transitions.items() if t["index"] == 39}
    assert newest and not (newest & sampled)
    assert sampled == {key for key, t in transitions.items() if t["index"] < 39}


def test_sampling_is_uniform_over_sampleable_slots():
    env = FrameIdEnv(4, end_prob=0.2, seed=5)
    buffer = FrameStackReplayBuffer(4 * 40, (4, 2, 2), 4, obs_dtype=torch.int32, seeds=[0])
    fill(buffer, env, steps=100)
    n_slots = buffer.num_sampleable()
    draws = 400 * n_slots
    counts = {}
    probe = buffer.sample_obs(draws)
    assert probe.shape == (1, draws, 4, 2, 2)
    for obs in probe[0]:
        counts[ids(obs)] = counts.get(ids(obs), 0) + 1
    assert len(counts) == n_slots
    expected, sigma = 400, 400 ** 0.5
    assert max(abs(c - expected) for c in counts.values()) < 5 * sigma
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < n_slots + 5 * (2 * n_slots) ** 0.5


def test_frame_stack_on_a_real_atari_run_returns_the_env_observations():
    """Truncations (tiny episode cap, each followed by a reset step) and terminations (lost lives), wrapping the ring."""
    env = AtariEnv("ALE/Breakout-v5", num_envs=2, seed=0, max_episode_frames=160, sticky_actions=0.0,
                   episodic_life=True)
    num_rows = 48
    buffer = FrameStackReplayBuffer(num_rows * 2, (4, 84, 84), 2, seeds=[0])
    obs, _ = env.reset()
    generator = torch.Generator().manual_seed(0)
    recorded = {}
    steps = 150
    for step in range(steps):
        actions = torch.randint(0, env.num_actions, (2,), generator=generator)
        next_obs, reward, terminated, truncated, info = env.step(actions)
        transition_ids = step * 2 + torch.arange(2)  # stored in place of the action, to look transitions up
        buffer.add(obs[None], transition_ids[None], info["learn_reward"][None], next_obs[None], terminated[None],
                   truncated[None], valid=~info["reset_step"][None])
        for e in range(2):
            if not info["reset_step"][e]:
                recorded[step * 2 + e] = (obs[e].clone(), next_obs[e].clone(), terminated[e].item(),
                                          truncated[e].item())
        obs = next_obs
    batch = first(buffer.sample(600))
    kinds = set()
    for i, transition_id in enumerate(batch.actions.tolist()):
        real_obs, real_next, real_terminated, real_truncated = recorded[transition_id]
        assert steps - transition_id // 2 <= num_rows  # only rows still stored
        assert torch.equal(batch.obs[i], real_obs) and torch.equal(batch.next_obs[i], real_next)
        assert batch.terminated[i].item() == real_terminated
        if real_terminated or real_truncated:  # pitfall 11: the true last obs, not the next episode's first
            assert torch.equal(batch.next_obs[i][:3], batch.obs[i][1:])
            kinds.add("terminated" if real_terminated else "truncated")
    assert kinds == {"terminated", "truncated"}
    env.close()


def test_bytes_per_transition_fits_a_million_in_7_5_gb():
    frames = FrameStackReplayBuffer(10_000, (4, 84, 84), 8)
    assert 84 * 84 <= frames.bytes_per_transition < 7_100  # one frame + action, reward, flags
    assert frames.bytes_per_transition * 1_000_000 <= 7.5e9
    generic = ReplayBuffer(1_000, (4, 84, 84), 8)
    assert generic.bytes_per_transition > 2 * 4 * 84 * 84  # obs and next_obs: what the frame layout avoids


@pytest.mark.parametrize("shape, capacity, envs, dtype", [((4, 84, 84), 1000, 8, torch.uint8),
                                                          ((1, 28, 28), 1000, 1, torch.uint8),
                                                          ((4, 2, 2), 90, 3, torch.int32),
                                                          ((5,), 31, 3, torch.float32)])
def test_planned_nbytes_is_the_allocated_size(shape, capacity, envs, dtype):
    for members in (1, 3):
        buffer = make_replay_buffer(shape, capacity, envs, seeds=list(range(members)), obs_dtype=dtype)
        assert planned_replay_nbytes(shape, capacity, envs, members, obs_dtype=dtype) == buffer.nbytes
        assert type(buffer).planned_nbytes(shape, capacity, envs, members, dtype) == buffer.nbytes
        assert buffer.bytes_per_transition == buffer.nbytes / (members * buffer.capacity)
    with pytest.raises(ValueError, match="too small"):
        planned_replay_nbytes((4, 84, 84), 10, 2)


# ---------------------------------------------------------------- generic
def test_generic_buffer_masks_invalid_rows_and_overwrites_the_oldest():
    envs, num_rows = 3, 10
    buffer = ReplayBuffer(num_rows * envs, (5,), envs, obs_dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    stored = {}
    for index in range(25):
        obs = torch.randn(envs, 5, generator=generator)
        next_obs = torch.randn(envs, 5, generator=generator)
        valid = torch.rand(envs, generator=generator) < 0.7
        actions = torch.arange(envs) + 10 * index
        buffer.add(obs[None], actions[None], actions.float()[None], next_obs[None], (actions % 2 == 0)[None],
                   torch.zeros(1, envs, dtype=torch.bool), valid=valid[None])
        for e in range(envs):
            stored[actions[e].item()] = (obs[e], next_obs[e], bool(valid[e]), index)
    batch = first(buffer.sample(3000))
    sampled = set(batch.actions.tolist())
    for i, action in enumerate(batch.actions.tolist()):
        obs, next_obs, valid, index = stored[action]
        assert valid and index >= 25 - num_rows
        assert torch.equal(batch.obs[i], obs) and torch.equal(batch.next_obs[i], next_obs)
        assert batch.rewards[i].item() == action and batch.terminated[i].item() == (action % 2 == 0)
    assert sampled == {a for a, (_, _, valid, index) in stored.items() if valid and index >= 25 - num_rows}
    assert len(buffer) == num_rows * envs


def test_generic_sampling_is_uniform():
    buffer = ReplayBuffer(60, (1,), 6, obs_dtype=torch.float32, seeds=[3])
    for row in range(10):
        actions = torch.arange(6) + 6 * row
        flags = torch.zeros(1, 6, dtype=torch.bool)
        buffer.add(torch.zeros(1, 6, 1), actions[None], torch.zeros(1, 6), torch.zeros(1, 6, 1), flags, flags)
    counts = torch.bincount(first(buffer.sample(60_000)).actions, minlength=60)
    assert (counts - 1000).abs().max() < 5 * 1000 ** 0.5


# ------------------------------------------------------------------ state
@pytest.mark.parametrize("kind", ["frames", "generic"])
def test_state_dict_round_trip_through_torch_load_weights_only(kind, tmp_path):
    def make():
        if kind == "frames":
            return FrameStackReplayBuffer(60, (4, 2, 2), 3, obs_dtype=torch.int32, seeds=[7])
        return ReplayBuffer(60, (4, 2, 2), 3, obs_dtype=torch.int32, seeds=[7])

    env = FrameIdEnv(3, end_prob=0.3, seed=0)
    original = make()
    fill(original, env, steps=33)
    torch.save(original.state_dict(), tmp_path / "buffer.pt")
    restored = make()
    restored.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=True), env_reset=False)
    for _ in range(3):
        a, b = original.sample(16), restored.sample(16)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Both continue identically: same cursor, same episode bookkeeping.
    for buffer in (original, restored):
        obs = torch.full((1, 3, 4, 2, 2), 999, dtype=torch.int32)
        flags = torch.zeros(1, 3, dtype=torch.bool)
        buffer.add(obs, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), obs, flags, flags)
    assert original.num_sampleable() == restored.num_sampleable()
    assert all(torch.equal(x, y) for x, y in zip(original.sample(16), restored.sample(16)))
    kind_other = FrameStackReplayBuffer if kind == "frames" else ReplayBuffer
    with pytest.raises(ValueError, match="capacity"):
        kind_other(90, (4, 2, 2), 3, obs_dtype=torch.int32, seeds=[7]).load_state_dict(original.state_dict())
    with pytest.raises(ValueError, match="seeds"):  # another run's random stream
        kind_other(60, (4, 2, 2), 3, obs_dtype=torch.int32, seeds=[8]).load_state_dict(original.state_dict())


# ------------------------------------------------------------ construction
def test_make_replay_buffer_picks_the_layout_from_the_obs_shape():
    assert isinstance(make_replay_buffer((4, 84, 84), 1000, 2, "cpu", seeds=[0]), FrameStackReplayBuffer)
    for shape in [(1, 28, 28), (3, 32, 32), (784,)]:
        buffer = make_replay_buffer(shape, 1000, 2, "cpu", seeds=[0])
        assert type(buffer) is ReplayBuffer and buffer.obs_shape == shape


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="capacity"):
        FrameStackReplayBuffer(10, (4, 84, 84), 2)
    buffer = FrameStackReplayBuffer(100, (4, 2, 2), 2)
    with pytest.raises(ValueError, match="no sampleable"):
        buffer.sample(4)
    stack = torch.zeros(1, 2, 4, 2, 2, dtype=torch.uint8)
    flags = torch.zeros(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="dtype"):
        buffer.add(stack.float(), torch.zeros(1, 2), torch.zeros(1, 2), stack.float(), flags, flags)
    with pytest.raises(ValueError, match="members, num_envs"):
        buffer.add(stack[:, :1], torch.zeros(1, 1), torch.zeros(1, 1), stack[:, :1], flags[:, :1], flags[:, :1])
    with pytest.raises(ValueError, match="members, num_envs"):  # a single run's tensors without the member dim
        buffer.add(stack[0], torch.zeros(2), torch.zeros(2), stack[0], flags[0], flags[0])
    with pytest.raises(ValueError, match=r"shape \(1, 2\)"):
        buffer.add(stack, torch.zeros(1, 3), torch.zeros(1, 2), stack, flags, flags)
    with pytest.raises(ValueError, match="seeds"):
        ReplayBuffer(100, (4,), 2, seeds=5)


@pytest.mark.gpu
def test_frame_stack_on_cuda_matches_the_cpu_semantics():
    env = FrameIdEnv(3, end_prob=0.3, seed=0)
    buffer = FrameStackReplayBuffer(3 * 16, (4, 2, 2), 3, device="cuda", obs_dtype=torch.int32)
    transitions = fill(buffer, env, steps=50)
    batch = buffer.sample(2000)
    assert batch.obs.is_cuda
    check_batch_against(first(batch.to("cpu")), transitions)


def test_a_resumed_frame_stack_buffer_starts_new_episodes_after_the_env_reset():
    env = FrameIdEnv(2, end_prob=0.0, seed=0)
    original = FrameStackReplayBuffer(40, (4, 2, 2), 2, obs_dtype=torch.int32)
    transitions = fill(original, env, steps=10)
    restored = FrameStackReplayBuffer(40, (4, 2, 2), 2, obs_dtype=torch.int32)
    restored.load_state_dict(original.state_dict())  # env_reset=True: the resumed run resets its envs
    assert restored.num_sampleable() == original.num_sampleable()  # the newest row was not sampleable anyway
    obs = env.reset()  # the resumed run's fresh episodes
    for _ in range(3):
        next_obs, terminated, truncated, reset_step = env.step()
        restored.add(obs[None], torch.zeros(1, 2), torch.zeros(1, 2), next_obs[None], terminated[None],
                     truncated[None], valid=~reset_step[None])
        for e in range(2):
            transitions[ids(obs[e])] = dict(index=99, action=0, reward=0.0, next_obs=ids(next_obs[e]),
                                            terminated=False, truncated=False)
        obs = next_obs
    # The pre-resume newest transition never takes the new episode's first frame as its next obs,
    # and the new stacks start with zeros instead of reaching into the old episode.
    sampled = check_batch_against(first(restored.sample(3000)), transitions)
    assert sum(1 for key in sampled if transitions[key]["index"] == 99) == 4
    assert not any(transitions[key]["index"] == 9 for key in sampled)
