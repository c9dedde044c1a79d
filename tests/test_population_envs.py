"""Populations of envs (spec populations.md §2.2-2.3): member k's env stream is bit-identical to the single
run's with seed s+k, changing one member's seed changes no other member, and resumes are exact."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from envs.atari import AtariEnv
from envs.atari_population import AtariPopulation
from envs.datasets import load_dataset
from envs.factory import AgentEnv, make_env, population_seeds
from envs.image_mdp import ImageMDPVectorEnv
from envs.nonstationary_atari import NonstationaryAtariEnv


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_dataset("mnist", data_dir=mnist_dir, download=False)


def tiny_dataset(num_classes=6, per_class=2, side=4, seed=0):
    """Few images per class: random relabellings leave a class empty often, so members redraw unequally."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_classes * per_class, 1, side, side), generator=generator, dtype=torch.uint8)
    return images, torch.arange(num_classes * per_class) % num_classes


def member_actions(seeds, num_envs, num_classes, steps):
    """[steps, M, E] random actions, member k's drawn from its own seed: the same whatever the population."""
    return torch.stack([torch.randint(num_classes, (steps, num_envs), generator=torch.Generator().manual_seed(s))
                        for s in seeds], dim=1)


def record(env, actions, reset_seeds=None):
    """Every per-member output of a rollout, as a list (over steps) of dicts of [M, ...] tensors."""
    obs, info = env.reset(seeds=reset_seeds)
    out = [{"obs": obs, "label": info["label"], "task": torch.full((env.members,), info["task_id"])}]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        step = {"obs": obs, "reward": reward, "terminated": terminated, "truncated": truncated,
                "label": info["label"], "correct": info["correct"],
                "task": torch.full((env.members,), info["task_id"]),
                "class_permutation": env.class_permutation, "image_labels": env.image_labels,
                "image_indices": env.image_indices}
        if env.pixel_permutation is not None:
            step["pixel_permutation"] = env.pixel_permutation
        out.append({key: value.clone() for key, value in step.items()})
    return out


def member(stream, k):
    return [{key: value[k] for key, value in step.items()} for step in stream]


def assert_same(a, b):
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), t
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (t, key)


MNIST_CASES = {
    "label_and_pixel_permutation": dict(shift=("label_permutation", "pixel_permutation")),
    "random_label_pixel_permutation_noise": dict(variant="random_label", shift=("pixel_permutation", "label_noise"),
                                                 shift_frac=0.3),
    "sparse_reward_offset": dict(variant="sparse", shift=("label_permutation", "reward_offset"), reward_offset=0.5),
}


@pytest.mark.parametrize("case", list(MNIST_CASES))
def test_member_k_is_the_single_run_with_seed_s_plus_k(mnist, case):
    seeds, steps = [5, 6, 7], 300
    kwargs = dict(images=mnist[0], labels=mnist[1], num_envs=4, num_images=200, shift_every=40, episode_length=70,
                  obs_dtype="uint8", **MNIST_CASES[case])
    actions = member_actions(seeds, 4, 10, steps)
    population = ImageMDPVectorEnv(seeds=seeds, **kwargs)
    together = record(population, actions)
    assert together[0]["obs"].shape == (3, 4, 1, 28, 28) and together[-1]["reward"].shape == (3, 4)
    assert population.task_id == steps // 40
    # The subsets are drawn per member and stored once (their union), not once per member.
    assert population.images.shape[0] == torch.unique(population.image_indices).numel() < 3 * 200
    for k, seed in enumerate(seeds):
        single = ImageMDPVectorEnv(seeds=[seed], **kwargs)
        assert_same(member(together, k), member(record(single, actions[:, k:k + 1]), 0))
    # The members really differ: own subsets, own permutations, own images.
    last = together[-1]
    for key in ("class_permutation", "pixel_permutation"):
        if key in last and key.split("_")[0] in "".join(kwargs["shift"]):
            assert not torch.equal(last[key][0], last[key][1]), key
    assert not torch.equal(last["image_indices"][0], last["image_indices"][1])
    assert not torch.equal(last["image_labels"][0], last["image_labels"][1])
    assert not torch.equal(last["obs"][0], last["obs"][1])


def test_unequal_label_redraws_keep_the_members_apart():
    # 12 images in 6 classes: about half of all random relabellings leave a class empty and are redrawn, so
    # the members draw different amounts at a switch; none may shift another's stream.
    images, labels = tiny_dataset()
    seeds, steps = [0, 1, 2, 3], 60
    kwargs = dict(images=images, labels=labels, num_envs=3, shift=("random_labels", "pixel_permutation"),
                  shift_every=4, obs_dtype="uint8")
    actions = member_actions(seeds, 3, 6, steps)
    together = record(ImageMDPVectorEnv(seeds=seeds, **kwargs), actions)
    for k, seed in enumerate(seeds):
        assert_same(member(together, k), member(record(ImageMDPVectorEnv(seeds=[seed], **kwargs),
                                                       actions[:, k:k + 1]), 0))
    for step in together[1:]:  # every class keeps an image in every member
        counts = torch.stack([torch.bincount(row, minlength=6) for row in step["image_labels"]])
        assert (counts > 0).all()


def test_changing_one_members_seed_changes_no_other_member(mnist):
    kwargs = dict(images=mnist[0], labels=mnist[1], num_envs=2, num_images=100, shift_every=25,
                  shift=("label_permutation", "pixel_permutation"), obs_dtype="uint8")
    actions = member_actions([0, 1, 2], 2, 10, 120)
    a = record(ImageMDPVectorEnv(seeds=[10, 11, 12], **kwargs), actions)
    b = record(ImageMDPVectorEnv(seeds=[99, 11, 12], **kwargs), actions)
    for k in (1, 2):
        assert_same(member(a, k), member(b, k))
    assert not torch.equal(a[-1]["obs"][0], b[-1]["obs"][0])
    assert not torch.equal(a[-1]["class_permutation"][0], b[-1]["class_permutation"][0])
    # reset(seeds=...) re-seeds per member as well: a new seed for member 0 only leaves the others alone.
    env = ImageMDPVectorEnv(seeds=[10, 11, 12], **kwargs)
    record(env, actions[:30])
    c = record(env, actions, reset_seeds=[7, 11, 12])
    for k in (1, 2):
        assert_same(member(a, k), member(c, k))
    assert not torch.equal(a[-1]["obs"][0], c[-1]["obs"][0])


def test_population_state_dict_round_trip_resumes_exactly(mnist):
    kwargs = dict(images=mnist[0], labels=mnist[1], num_envs=3, num_images=150, shift_every=20, variant="sparse",
                  shift=("label_permutation", "label_noise", "pixel_permutation", "reward_offset"),
                  reward_offset=0.25, episode_length=15, obs_dtype="uint8")
    seeds = [3, 4, 5]
    actions = member_actions(seeds, 3, 10, 150)
    original = ImageMDPVectorEnv(seeds=seeds, **kwargs)
    record(original, actions[:70])  # mid-task, after three switches
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    def go_on(env):
        out = []
        for action in actions[70:]:
            obs, reward, _, truncated, info = env.step(action)
            out.append({"obs": obs.clone(), "reward": reward.clone(), "truncated": truncated.clone(),
                        "label": info["label"].clone(), "task": torch.tensor(info["task_id"]),
                        "pixel_permutation": env.pixel_permutation.clone(), "image_labels": env.image_labels.clone()})
        return out

    expected = go_on(original)
    resumed = ImageMDPVectorEnv(seeds=seeds, **kwargs)
    resumed.load_state_dict(saved)
    assert_same(expected, go_on(resumed))
    with pytest.raises(ValueError, match="seeds"):
        ImageMDPVectorEnv(seeds=[3, 4, 6], **kwargs).load_state_dict(saved)
    with pytest.raises(ValueError, match="seeds"):
        ImageMDPVectorEnv(seeds=[3, 4], **kwargs).load_state_dict(saved)


def test_evaluation_copy_plays_each_members_current_task_on_its_own_streams(mnist):
    images, labels = mnist
    kwargs = dict(images=images, labels=labels, num_envs=2, num_images=100, shift_every=10, obs_dtype="uint8",
                  shift=("label_permutation", "pixel_permutation"))
    seeds = [1, 2]
    actions = member_actions(seeds, 2, 10, 40)
    env = ImageMDPVectorEnv(seeds=seeds, **kwargs)
    twin = ImageMDPVectorEnv(seeds=seeds, **kwargs)
    record(env, actions[:25])
    record(twin, actions[:25])
    copy = env.evaluation_copy(5)
    assert copy.members == 2 and copy.num_envs == 5 and copy.task_id == env.task_id == 2
    assert copy.image_labels is env.image_labels and copy.pixel_permutation is env.pixel_permutation
    obs, info = copy.reset(seeds=[100, 200])
    assert obs.shape == (2, 5, 1, 28, 28)
    # Undo member k's pixel permutation: each observation is an image of member k's subset with its current label.
    flat_images = images.reshape(len(images), -1)
    for _ in range(12):  # past a switch period: an evaluation copy never switches
        for k in range(2):
            shown = obs[k].reshape(5, -1)[:, torch.argsort(env.pixel_permutation[k])]
            match = (shown[:, None] == flat_images[env.image_indices[k]][None]).all(-1)
            assert (match.sum(1) >= 1).all()
            assert (env.image_labels[k][match.float().argmax(1)] == info["label"][k]).all()
        obs, reward, _, _, info = copy.step(info["label"])
        assert (reward == 1).all() and info["task_id"] == 2
    # The training env's streams were not touched.
    assert_same(record(env, actions[25:], reset_seeds=None)[1:], record(twin, actions[25:], reset_seeds=None)[1:])
    with pytest.raises(ValueError, match="1 seeds for 2 members"):
        copy.reset(seeds=[1])


# ------------------------------------------------------------------- factory
def mdp_args(mnist_dir, **overrides):
    args = dict(env_id="ImageMDP/mnist", num_envs=2, variant="easy", shift=["label_permutation"], shift_every=20,
                shift_frac=0.1, reward_offset=0.0, episode_length=5, num_images=100, data_dir=str(mnist_dir),
                seed=4, num_seeds=3, atari_shift=[])
    return SimpleNamespace(**{**args, **overrides})


def test_agent_env_steps_a_population_with_dense_member_fields(mnist_dir):
    args = mdp_args(mnist_dir)
    assert population_seeds(args) == [4, 5, 6] and population_seeds(mdp_args(mnist_dir, num_seeds=1)) == [4]
    env = AgentEnv.make(args, torch.device("cpu"), seeds=[4, 5, 6])
    assert (env.members, env.num_envs, env.num_actions, env.obs_shape) == (3, 2, 10, (1, 28, 28))
    assert env.seeds == [4, 5, 6] and env.env.seeds == [4, 5, 6]
    obs = env.reset(seeds=[4, 5, 6])
    assert obs.shape == (3, 2, 1, 28, 28) and obs.dtype == torch.uint8
    labels = env._labels
    for t in range(1, 16):
        # Member 0 always right, member 1 right in one env, member 2 always wrong.
        greedy = torch.stack([labels[0], torch.stack([labels[1, 0], (labels[1, 1] + 1) % 10]), (labels[2] + 1) % 10])
        step = env.step(greedy, greedy_actions=greedy)
        for field in ("learn_reward", "terminated", "truncated", "episode_returns", "episode_lengths",
                      "episode_ended"):
            assert getattr(step, field).shape == (3, 2), field
        assert step.store is None and step.group == "" and step.obs.shape == (3, 2, 1, 28, 28)
        assert torch.equal(step.greedy_correct, torch.tensor([1.0, 0.5, 0.0]))
        assert step.task_id == t // 10 and step.previous_task_id == (t - 1) // 10  # 20 env steps = 10 vector steps
        assert torch.equal(step.episode_ended, torch.full((3, 2), t % 5 == 0))
        if t % 5 == 0:  # an episode is 5 steps: returns 5, 1 or 5 and 0 per member
            assert torch.equal(step.episode_returns,
                               torch.tensor([[5.0, 5.0], [5.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
            assert torch.equal(step.episode_lengths, torch.full((3, 2), 5))
        else:
            assert not step.episode_returns.any() and not step.episode_lengths.any()
        labels = env._labels
    # Exact resume of the whole population, episodes in flight included.
    saved = env.state_dict()
    greedy = torch.zeros(3, 2, dtype=torch.long)
    expected = [env.step(greedy) for _ in range(7)]
    resumed = AgentEnv.make(args, torch.device("cpu"), seeds=[4, 5, 6])
    assert resumed.load_state_dict(saved, resume_step=30) is None
    for a, b in zip(expected, (resumed.step(greedy) for _ in range(7))):
        for x, y in zip(a, b):
            assert x == y if not isinstance(x, torch.Tensor) else torch.equal(x, y)
    # make_env without seeds builds the members of --seed and --num-seeds.
    assert make_env(args, torch.device("cpu")).seeds == [4, 5, 6]


# --------------------------------------------------------------------- Atari
def atari_args(**overrides):
    args = dict(env_id="ALE/Breakout-v5", num_envs=2, seed=3, num_seeds=2, sticky_actions=0.25,
                full_action_space=False, episodic_life=False, max_episode_frames=60, noop_max=30, fire_reset=True,
                env_stack="ale", atari_shift=[], switch_every=0, games=[], modes=[], difficulties=[],
                reward_offset=0.0, reward_scale=1.0, protocol="none")
    return SimpleNamespace(**{**args, **overrides})


def atari_stream(env, actions, seeds_of_reset):
    obs, info = env.reset(seeds_of_reset)
    out = [{"obs": obs, "reset_step": info["reset_step"], "lives": info["lives"]}]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        out.append({"obs": obs, "reward": reward, "terminated": terminated, "truncated": truncated,
                    **{key: info[key] for key in ("reset_step", "game_over", "lives", "learn_reward")}})
    return out


def single_stream(env, actions, seed):
    """A single env's stream, with the member dimension added."""
    obs, info = env.reset(seed=seed)
    out = [{"obs": obs[None], "reset_step": info["reset_step"][None], "lives": info["lives"][None]}]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action[0])
        out.append({"obs": obs[None], "reward": reward[None], "terminated": terminated[None],
                    "truncated": truncated[None],
                    **{key: info[key][None] for key in ("reset_step", "game_over", "lives", "learn_reward")}})
    return out


def test_atari_population_members_equal_their_single_runs():
    args = atari_args()
    population = make_env(args, torch.device("cpu"), seeds=[3, 4])
    assert isinstance(population, AtariPopulation)
    assert (population.members, population.num_envs, population.num_actions) == (2, 2, 4)
    actions = member_actions([3, 4], 2, 4, 40)
    together = atari_stream(population, actions, None)  # the first reset: each member's constructor seed
    assert together[0]["obs"].shape == (2, 2, 4, 84, 84) and together[1]["reward"].shape == (2, 2)
    assert any(step["reset_step"].any() for step in together[1:])  # 15-step episodes: reset steps happen
    singles = [AtariEnv("ALE/Breakout-v5", num_envs=2, seed=seed, max_episode_frames=60, sticky_actions=0.25)
               for seed in (3, 4)]
    for k, single in enumerate(singles):
        assert_same(member(together, k), member(single_stream(single, actions[:, k:k + 1], None), 0))
    assert not torch.equal(together[-1]["obs"][0], together[-1]["obs"][1])
    # AgentEnv resumes Atari by restarting member k's games from seed_k + resume_step.
    env = AgentEnv(population, "atari", torch.device("cpu"))
    obs = env.load_state_dict(env.state_dict(), resume_step=100)
    for k, (seed, single) in enumerate(zip((3, 4), singles)):
        assert torch.equal(obs[k], single.reset(seed=seed + 100)[0])
        single.close()
    step = env.step(actions[0])
    assert step.store.shape == (2, 2) and step.store.all() and step.episode_ended.shape == (2, 2)
    with pytest.raises(ValueError, match=r"shape \(2, 2\) \(members, num_envs\)"):
        population.step(actions[0, 0])
    env.close()


def test_nonstationary_atari_population_members_equal_their_single_runs():
    args = atari_args(atari_shift=["obs_permutation", "reward_scale"], switch_every=20, reward_scale=2.0,
                      max_episode_frames=108_000, sticky_actions=0.0)
    population = make_env(args, torch.device("cpu"), seeds=[3, 4])
    actions = member_actions([3, 4], 2, 4, 25)
    together = atari_stream(population, actions, [30, 40])
    assert population.task_id == 2 and population.pixel_permutation.shape == (2, 84 * 84)
    assert not torch.equal(population.pixel_permutation[0], population.pixel_permutation[1])
    singles = [NonstationaryAtariEnv("ALE/Breakout-v5", num_envs=2, seed=seed, shifts=args.atari_shift,
                                     switch_every=10, reward_scale=2.0, sticky_actions=0.0) for seed in (3, 4)]
    for k, single in enumerate(singles):
        assert_same(member(together, k), member(single_stream(single, actions[:, k:k + 1], 10 * (k + 3)), 0))
        assert torch.equal(single.pixel_permutation, population.pixel_permutation[k])
    state = population.state_dict()
    resumed = make_env(args, torch.device("cpu"), seeds=[3, 4])
    assert resumed.task_id == 0
    resumed.load_state_dict(state)
    assert resumed.task_id == 2 and torch.equal(resumed.pixel_permutation, population.pixel_permutation)
    with pytest.raises(ValueError, match="seeds"):
        AtariPopulation(singles[::-1]).load_state_dict(state)  # members in another order
    for env in (population, resumed, *singles):
        env.close()


# ----------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_members_equal_their_single_runs_and_atari_moves_exactly(mnist):
    kwargs = dict(images=mnist[0], labels=mnist[1], num_envs=4, num_images=200, shift_every=30, device="cuda",
                  shift=("label_permutation", "pixel_permutation", "label_noise"), obs_dtype="uint8")
    seeds = [5, 6, 7]
    actions = member_actions(seeds, 4, 10, 100).cuda()
    population = ImageMDPVectorEnv(seeds=seeds, **kwargs)
    together = record(population, actions)
    assert together[-1]["obs"].device.type == "cuda" and population.pixel_permutation.device.type == "cuda"
    for k, seed in enumerate(seeds):
        assert_same(member(together, k), member(record(ImageMDPVectorEnv(seeds=[seed], **kwargs),
                                                       actions[:, k:k + 1]), 0))
    # Task draws are made on the CPU: the same permutations on either device.
    cpu = ImageMDPVectorEnv(seeds=seeds, **{**kwargs, "device": "cpu"})
    record(cpu, actions.cpu())
    assert torch.equal(cpu.pixel_permutation, population.pixel_permutation.cpu())
    # Atari: the stacked outputs reach the GPU unchanged.
    args = atari_args()
    atari_actions = member_actions([3, 4], 2, 4, 30)
    on_gpu = atari_stream(make_env(args, torch.device("cuda"), seeds=[3, 4]), atari_actions.cuda(), None)
    on_cpu = atari_stream(make_env(args, torch.device("cpu"), seeds=[3, 4]), atari_actions, None)
    assert on_gpu[-1]["obs"].device.type == "cuda"
    assert_same([{k: v.cpu() for k, v in step.items()} for step in on_gpu], on_cpu)
