"""The image-classification MDP (spec environments.md §1), checked against its definition.

Real MNIST (``mnist_dir``) where the data matters; small injected datasets of
unique random images where exact bookkeeping (which image was shown, under which
labels and pixel permutation) is needed.  Every env here is a population of one member
(``seeds=[s]``): tensors carry a leading member dimension of 1.  Populations of several
members are tested in tests/test_population_envs.py.
"""

from __future__ import annotations

import io
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from envs.datasets import load_dataset
from envs.image_mdp import SHIFTS, VARIANTS, ImageMDPEnv, ImageMDPVectorEnv, optimal_q_values

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_dataset("mnist", data_dir=mnist_dir, download=False)


def tiny_dataset(num_classes: int = 4, per_class: int = 5, channels: int = 1, side: int = 3, seed: int = 0):
    """Unique random uint8 images, labels 0..K-1 (per_class each, interleaved)."""
    generator = torch.Generator().manual_seed(seed)
    num = num_classes * per_class
    images = torch.randint(0, 256, (num, channels, side, side), generator=generator, dtype=torch.uint8)
    assert images.reshape(num, -1).unique(dim=0).shape[0] == num
    return images, torch.arange(num) % num_classes


def shown_image(
    obs: torch.Tensor, images: torch.Tensor, pixel_permutation: torch.Tensor | None
) -> torch.Tensor:
    """Index of the dataset image each uint8 observation [E, C, H, W] of one member shows, undoing its
    pixel permutation [H*W]."""
    num_envs, channels = obs.shape[:2]
    flat = obs.reshape(num_envs, channels, -1)
    if pixel_permutation is not None:  # obs_flat[p] = original_flat[perm[p]]
        flat = flat[..., torch.argsort(pixel_permutation)]
    match = (flat.reshape(num_envs, 1, -1) == images.reshape(1, images.shape[0], -1)).all(-1)
    assert torch.equal(match.sum(1), torch.ones(num_envs, dtype=torch.long)), (
        "an observation is not a dataset image"
    )
    return match.float().argmax(1)


def make_tiny(**kwargs) -> tuple[ImageMDPVectorEnv, torch.Tensor, torch.Tensor]:
    data_kwargs = {k: kwargs.pop(k) for k in ("num_classes", "per_class", "channels", "side") if k in kwargs}
    data_kwargs["seed"] = kwargs.pop("data_seed", 0)
    images, labels = tiny_dataset(**data_kwargs)
    kwargs.setdefault("obs_dtype", torch.uint8)
    return ImageMDPVectorEnv(images=images, labels=labels, **kwargs), images, labels


def rollout(env, steps: int, policy: str = "oracle", generator: torch.Generator | None = None):
    """Run ``steps`` vector steps; returns a list of (action, obs, reward, truncated, info)."""
    obs, info = env.reset()
    generator = generator or torch.Generator().manual_seed(123)
    records = []
    for _ in range(steps):
        if policy == "oracle":
            action = info["label"]
        else:
            action = torch.randint(env.num_classes, (env.members, env.num_envs), generator=generator)
        obs, reward, terminated, truncated, info = env.step(action)
        assert not terminated.any()
        records.append((action, obs, reward, truncated, info))
    return records


# ---------------------------------------------------------------------------
# Rewards, observations and dynamics (easy / random_label / sparse)
# ---------------------------------------------------------------------------
def test_oracle_scores_one_every_step_on_real_mnist_through_every_label_shift(mnist):
    env = ImageMDPVectorEnv(
        images=mnist[0],
        labels=mnist[1],
        num_envs=64,
        shift=("label_permutation", "label_noise", "pixel_permutation"),
        shift_every=50,
        shift_frac=0.3,
    )
    records = rollout(env, 200)
    assert all(bool((reward == 1).all()) for _, _, reward, _, _ in records)
    assert env.task_id == 4


def test_uniform_policy_scores_one_over_k(mnist):
    env = ImageMDPVectorEnv(images=mnist[0], labels=mnist[1], num_envs=256, obs_dtype=torch.uint8)
    rewards = torch.stack([reward for _, _, reward, _, _ in rollout(env, 200, policy="uniform")])
    assert abs(rewards.mean().item() - 0.1) < 0.006  # 51,200 draws: SE 0.0013


def test_observations_are_dataset_images_of_the_current_class(mnist):
    images, labels = mnist
    env = ImageMDPVectorEnv(images=images, labels=labels, num_envs=32)
    labels_by_image = {}
    for image, label in zip(images.reshape(len(images), -1).numpy(), labels.tolist()):
        labels_by_image.setdefault(image.tobytes(), set()).add(label)
    obs, info = env.reset()
    for _ in range(20):
        assert obs.dtype == torch.float32 and obs.shape == (1, 32, 1, 28, 28)
        assert info["label"].shape == (1, 32) and info["label"].dtype == torch.int64
        pixels = torch.round(obs * 255).to(torch.uint8)
        assert torch.equal(pixels.float() / 255, obs)  # exactly uint8 / 255
        for image, label in zip(pixels.reshape(32, -1).numpy(), info["label"][0].tolist()):
            assert label in labels_by_image[image.tobytes()]
        obs, _, _, _, info = env.step(info["label"])


def test_images_are_drawn_uniformly_within_a_class():
    env, images, labels = make_tiny(num_envs=1000, per_class=5)
    counts = torch.zeros(len(images))
    obs, info = env.reset()
    for _ in range(40):
        shown = shown_image(obs[0], images, None)
        assert torch.equal(labels[shown], info["label"][0])
        counts += torch.bincount(shown, minlength=len(images))
        obs, _, _, _, info = env.step(info["label"])
    # 40,000 draws over 20 images: each ~2,000 (SE ~43).
    assert (counts - counts.mean()).abs().max() < 250


def test_easy_next_state_is_uniform_whatever_the_action(mnist):
    env = ImageMDPVectorEnv(images=mnist[0], labels=mnist[1], num_envs=512, obs_dtype=torch.uint8)
    counts = torch.zeros(10, 10)  # [action, next state]
    for action, _, _, _, info in rollout(env, 60, policy="uniform"):
        counts.index_put_((action[0], info["label"][0]), torch.ones(512), accumulate=True)
    frequencies = counts / counts.sum(1, keepdim=True)
    assert (frequencies - 0.1).abs().max() < 0.03  # ~3,000 draws per row


def test_random_label_variant_memorises_fixed_random_labels(mnist):
    images, labels = mnist
    env = ImageMDPVectorEnv(images=images, labels=labels, variant="random_label", num_envs=16, seeds=[3])
    assert env.image_labels.shape == (1, len(labels))
    changed = (env.image_labels[0] != labels).float().mean().item()
    assert abs(changed - 0.9) < 0.02
    fixed = env.image_labels.clone()
    assert all(bool((r == 1).all()) for _, _, r, _, _ in rollout(env, 30))
    env.reset(seeds=[99])  # the memorisation labels belong to the env, not to the episode
    assert torch.equal(env.image_labels, fixed)
    other = ImageMDPVectorEnv(images=images, labels=labels, variant="random_label", num_envs=16, seeds=[4])
    assert not torch.equal(other.image_labels, fixed)


def test_sparse_chain_moves_only_on_correct_answers_and_pays_only_at_the_end():
    env, _, _ = make_tiny(num_envs=512, variant="sparse", num_classes=5)
    k = env.num_classes
    obs, info = env.reset()
    state = info["label"]
    wrong_next, stays, num_wrong = torch.zeros(k), 0, 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        # Half the envs answer correctly, half at random.
        guess = torch.randint(k, (1, 512), generator=generator)
        action = torch.where(torch.rand(1, 512, generator=generator) < 0.5, state, guess)
        obs, reward, _, _, info = env.step(action)
        correct = action == state
        assert torch.equal(info["correct"], correct)
        assert torch.equal(reward, (correct & (state == k - 1)).float())
        assert torch.equal(info["label"][correct], (state[correct] + 1) % k)
        wrong_next += torch.bincount(info["label"][~correct], minlength=k)
        stays += (info["label"][~correct] == state[~correct]).sum()
        num_wrong += (~correct).sum()
        state = info["label"]
    # A wrong answer jumps uniformly, wherever it was: it stays put only by chance (1/K).
    assert (wrong_next / wrong_next.sum() - 1 / k).abs().max() < 0.02
    assert abs(stays / num_wrong - 1 / k) < 0.02

    # The oracle climbs the chain and is paid exactly once every K steps, never interrupted.
    env, _, _ = make_tiny(num_envs=3, variant="sparse", num_classes=5, episode_length=7)
    records = rollout(env, 40)
    rewards = torch.stack([r for _, _, r, _, _ in records])
    positions = torch.stack([a for a, _, _, _, _ in records])
    assert torch.equal(positions[1:], (positions[:-1] + 1) % k)  # across truncations too
    assert torch.equal(rewards, (positions == k - 1).float())


def test_copies_are_independent_and_the_single_env_is_the_vector_env_with_one_copy(mnist):
    env = ImageMDPVectorEnv(images=mnist[0], labels=mnist[1], num_envs=2, obs_dtype=torch.uint8)
    same = torch.stack(
        [info["label"][0, 0] == info["label"][0, 1] for _, _, _, _, info in rollout(env, 2000, "uniform")]
    )
    assert abs(same.float().mean().item() - 0.1) < 0.025

    kwargs = dict(
        images=mnist[0], labels=mnist[1], shift=("label_permutation", "pixel_permutation"), shift_every=7
    )
    single = ImageMDPEnv(seed=5, **kwargs)
    vector = ImageMDPVectorEnv(num_envs=1, seeds=[5], **kwargs)
    obs, info = single.reset()
    vector_obs, vector_info = vector.reset()
    assert np.array_equal(obs, vector_obs[0, 0].numpy()) and info["label"] == int(vector_info["label"][0, 0])
    actions = np.random.default_rng(0).integers(0, 10, size=30)
    for action in actions:
        obs, reward, terminated, truncated, info = single.step(int(action))
        vector_obs, vector_reward, _, vector_truncated, vector_info = vector.step(torch.tensor([[action]]))
        assert isinstance(obs, np.ndarray) and obs.dtype == np.float32 and isinstance(reward, float)
        assert np.array_equal(obs, vector_obs[0, 0].numpy()) and reward == float(vector_reward[0, 0])
        assert info == {
            "task_id": vector_info["task_id"],
            "correct": bool(vector_info["correct"][0, 0]),
            "label": int(vector_info["label"][0, 0]),
        }
        assert terminated is False and truncated == bool(vector_truncated[0, 0])
    assert single.task_id == vector.task_id == 4


# ---------------------------------------------------------------------------
# Shifts: each changes exactly what it names
# ---------------------------------------------------------------------------
def switch_once(shift, **kwargs):
    """Step a tiny env up to just before and just after its first switch; return both snapshots."""
    env, images, labels = make_tiny(shift=shift, shift_every=5, num_envs=64, **kwargs)
    records = rollout(env, 4)
    before = env.state_dict()
    obs, reward, _, _, info = env.step(records[-1][4]["label"])  # oracle action, 5th step: the switch
    return env, images, labels, before, env.state_dict(), (obs, reward, info)


@pytest.mark.parametrize("shift", ["none", "reward_offset"])
def test_shifts_that_leave_images_and_labels_alone(shift):
    env, _, _, before, after, (_, reward, info) = switch_once(
        shift, reward_offset=0.5 if shift == "reward_offset" else 0.0
    )
    assert info["task_id"] == env.task_id == 1
    for key in ("raw_labels", "class_permutation"):
        assert torch.equal(before[key], after[key])
    assert before["pixel_permutation"] is None and after["pixel_permutation"] is None
    assert torch.equal(reward, torch.ones(1, 64))  # the switching step's reward belongs to task 0
    next_reward = env.step(info["label"])[1]
    assert torch.equal(next_reward, torch.full((1, 64), 1.5 if shift == "reward_offset" else 1.0))


def test_label_permutation_permutes_class_labels_only():
    env, images, labels, before, after, (obs, _, info) = switch_once("label_permutation")
    assert after["class_permutation"].shape == (1, 4)
    permutation = after["class_permutation"][0]
    assert torch.equal(before["class_permutation"], torch.arange(4)[None])
    assert torch.equal(torch.sort(permutation).values, torch.arange(4)) and not torch.equal(
        permutation, torch.arange(4)
    )
    assert torch.equal(before["raw_labels"], after["raw_labels"]) and after["pixel_permutation"] is None
    assert torch.equal(env.image_labels[0], permutation[labels])
    shown = shown_image(obs[0], images, None)  # already drawn under the new labels
    assert torch.equal(permutation[labels[shown]], info["label"][0])


def test_random_labels_redraws_every_label_only():
    env, _, labels, before, after, _ = switch_once("random_labels", per_class=100)
    changed = (before["raw_labels"] != after["raw_labels"]).float().mean().item()
    assert abs(changed - 0.75) < 0.08  # a fresh uniform draw keeps 1/K of the labels by chance
    assert torch.equal(after["class_permutation"], torch.arange(4)[None]) and after["pixel_permutation"] is None
    assert torch.equal(env.image_labels, after["raw_labels"])


def test_label_noise_relabels_about_shift_frac_of_the_images():
    env, _, _, before, after, _ = switch_once("label_noise", per_class=1000, shift_frac=0.2)
    changed = (before["raw_labels"] != after["raw_labels"]).sum().item()
    # Exactly 800 of 4,000 images are redrawn; a redraw keeps the old label with probability 1/4.
    assert changed <= 800 and abs(changed - 600) < 60
    assert torch.equal(after["class_permutation"], torch.arange(4)[None]) and after["pixel_permutation"] is None
    # Noise accumulates: later switches redraw fresh subsets, not the same one.
    for _ in range(5):
        env.step(torch.zeros(1, 64, dtype=torch.long))
    total_changed = (env.image_labels != before["raw_labels"]).sum().item()
    assert total_changed > changed + 300


def test_pixel_permutation_is_a_bijection_shared_by_all_channels():
    env, images, labels, before, after, (obs, _, info) = switch_once("pixel_permutation", channels=3, side=4)
    assert after["pixel_permutation"].shape == (1, 16)
    permutation = after["pixel_permutation"][0]
    assert before["pixel_permutation"] is None
    assert torch.equal(torch.sort(permutation).values, torch.arange(16)) and not torch.equal(
        permutation, torch.arange(16)
    )
    assert torch.equal(before["raw_labels"], after["raw_labels"])
    assert torch.equal(before["class_permutation"], after["class_permutation"])
    shown = shown_image(obs[0], images, permutation)
    expected = images[shown].reshape(64, 3, 16)[..., permutation].reshape(64, 3, 4, 4)
    assert torch.equal(obs[0], expected) and torch.equal(labels[shown], info["label"][0])
    # The next switch draws a fresh permutation of the *original* pixels (not a composition artefact).
    for _ in range(5):
        obs, _, _, _, info = env.step(info["label"])
    second = env.pixel_permutation[0]
    assert not torch.equal(second, permutation)
    shown = shown_image(obs[0], images, second)
    assert torch.equal(obs[0], images[shown].reshape(64, 3, 16)[..., second].reshape(64, 3, 4, 4))


def test_combined_shifts_and_reward_offset_grow_with_the_task_id():
    env, images, _ = make_tiny(
        shift=("reward_offset", "pixel_permutation", "label_permutation", "label_noise"),
        shift_every=3,
        reward_offset=0.25,
        num_envs=8,
        per_class=50,
    )
    obs, info = env.reset()
    for step in range(1, 13):
        obs, reward, _, _, info = env.step(info["label"])
        task_of_action = (step - 1) // 3
        assert torch.equal(reward, torch.full((1, 8), 1.0 + 0.25 * task_of_action))
        assert info["task_id"] == step // 3
        permutation = None if env.pixel_permutation is None else env.pixel_permutation[0]
        shown = shown_image(obs[0], images, permutation)
        assert torch.equal(env.image_labels[0][shown], info["label"][0])


def test_old_mapping_oracle_drops_to_chance_after_label_permutation(mnist):
    images, labels = mnist
    env = ImageMDPVectorEnv(
        images=images,
        labels=labels,
        num_envs=32,
        shift="label_permutation",
        shift_every=10,
        obs_dtype=torch.uint8,
    )
    # Recognise each shown image by an exact integer hash of its pixels (a lookup table over the dataset).
    weights = torch.randint(0, 2**31, (28 * 28,), generator=torch.Generator().manual_seed(0))
    dataset_hashes, order = torch.sort((images.reshape(len(images), -1).long() * weights).sum(1))
    obs, info = env.reset()
    accuracy_per_task, fixed_fraction_per_task = [], []
    for _ in range(30):  # one iteration = the 10 actions of one task
        permutation = env.class_permutation[0]
        fixed_fraction_per_task.append((permutation == torch.arange(10)).float().mean().item())
        hits = 0.0
        for _ in range(10):
            position = torch.searchsorted(dataset_hashes, (obs.reshape(32, -1).long() * weights).sum(1))
            old_oracle = labels[order[position]]  # the label each shown image had at task 0
            obs, reward, _, _, info = env.step(old_oracle[None])
            hits += reward.mean().item()
        accuracy_per_task.append(hits / 10)
    # Before the first switch the old mapping is the mapping: (almost) perfect (MNIST has a few duplicates).
    assert accuracy_per_task[0] > 0.99
    # Afterwards the old oracle is right only where the permutation fixes the class: ~1/K on average.
    assert abs(np.mean(accuracy_per_task[1:]) - 0.1) < 0.04
    assert np.allclose(accuracy_per_task[1:], fixed_fraction_per_task[1:], atol=0.06)


# ---------------------------------------------------------------------------
# Reproducibility, truncation, checkpointing
# ---------------------------------------------------------------------------
ALL_SHIFTS = ("label_permutation", "random_labels", "label_noise", "pixel_permutation", "reward_offset")


def stream(env, steps=25, reset_seeds=None):
    obs, info = env.reset(seeds=reset_seeds)
    out = [obs.clone()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        obs, reward, _, _, info = env.step(
            torch.randint(env.num_classes, (env.members, env.num_envs), generator=generator)
        )
        out += [obs.clone(), reward.clone(), info["label"].clone(), env.image_labels.clone()]
    return out


def same_stream(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_same_stream_other_seed_other_stream(variant):
    kwargs = dict(
        variant=variant, shift=ALL_SHIFTS, shift_every=4, reward_offset=0.1, num_envs=6, per_class=8
    )
    first = stream(make_tiny(seeds=[1], **kwargs)[0])
    assert same_stream(first, stream(make_tiny(seeds=[1], **kwargs)[0]))
    assert not same_stream(first, stream(make_tiny(seeds=[2], **kwargs)[0]))
    # reset(seeds) restarts the same stream (the dataset is fixed by the constructor seeds).
    env = make_tiny(seeds=[1], **kwargs)[0]
    stream(env)
    assert same_stream(first, stream(env, reset_seeds=[1]))
    # reset() without seeds continues the streams: task 0 again, other draws.
    assert not same_stream(first, stream(env))


def test_truncation_every_episode_length_without_any_reset(mnist):
    env = ImageMDPVectorEnv(images=mnist[0], labels=mnist[1], num_envs=4, episode_length=10)
    obs, info = env.reset()
    for step in range(1, 36):
        obs, reward, terminated, truncated, info = env.step(info["label"])
        assert not terminated.any()
        assert torch.equal(truncated, torch.full((1, 4), step % 10 == 0))
        assert ("final_obs" in info) == (step % 10 == 0)
        if step % 10 == 0:
            assert info["final_obs"] is obs
        assert torch.equal(
            reward, torch.ones(1, 4)
        )  # the latent state behind obs carries over: oracle stays right
    assert env.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP


def test_state_dict_round_trip_resumes_the_identical_stream(tmp_path):
    kwargs = dict(
        shift=ALL_SHIFTS,
        shift_every=5,
        reward_offset=0.5,
        num_envs=8,
        per_class=20,
        variant="sparse",
        episode_length=6,
        channels=3,
    )
    original, _, _ = make_tiny(seeds=[3], **kwargs)
    stream(original, steps=12)  # mid-task, pixels permuted, labels shifted
    buffer = io.BytesIO()
    torch.save(
        original.state_dict(), buffer
    )  # checkpoints use weights_only=True: only plain tensors/containers
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    actions = torch.randint(5, (20, 1, 8), generator=torch.Generator().manual_seed(9))

    def continue_stream(env):
        out = []
        for action in actions:
            obs, reward, _, truncated, info = env.step(action)
            out += [
                obs.clone(),
                reward.clone(),
                truncated.clone(),
                info["label"].clone(),
                env.image_labels.clone(),
            ]
        return out

    expected = continue_stream(original)
    resumed, _, _ = make_tiny(seeds=[3], **kwargs)
    resumed.load_state_dict(saved)
    assert same_stream(expected, continue_stream(resumed)) and resumed.task_id == original.task_id
    # Loading into an env built on other data, or configured differently, is refused.
    with pytest.raises(ValueError, match="different data"):
        make_tiny(seeds=[3], data_seed=1, **kwargs)[0].load_state_dict(saved)
    with pytest.raises(ValueError, match="num_images"):
        make_tiny(seeds=[3], **{**kwargs, "per_class": 21})[0].load_state_dict(saved)
    with pytest.raises(ValueError, match="shift_every"):
        make_tiny(seeds=[3], **{**kwargs, "shift_every": 6})[0].load_state_dict(saved)
    with pytest.raises(ValueError, match="seeds"):
        make_tiny(seeds=[4], **kwargs)[0].load_state_dict(saved)


# ---------------------------------------------------------------------------
# Q*
# ---------------------------------------------------------------------------
def value_iteration(num_classes: int, gamma: float, sweeps: int = 3000) -> torch.Tensor:
    """Independent reference for the sparse variant: plain value iteration on the spec's dynamics (numpy)."""
    k = num_classes
    pays = np.zeros(k)
    pays[k - 1] = 1.0
    q = np.zeros((k, k))
    for _ in range(sweeps):
        v = q.max(1)
        q = np.full((k, k), gamma * v.mean())  # wrong answer: uniform jump
        np.fill_diagonal(q, pays + gamma * np.roll(v, -1))  # right answer: s -> s + 1, paid at K - 1
    return torch.from_numpy(q)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.99])
def test_optimal_q_easy_matches_the_closed_form(gamma):
    env, _, _ = make_tiny(shift="reward_offset", reward_offset=2.0, shift_every=3)
    expected = torch.eye(4) + gamma / (1 - gamma)
    assert torch.allclose(env.optimal_q(gamma), expected, atol=1e-5)
    rollout(env, 7)  # now in task 2: every reward is shifted by 2 * 2
    assert torch.allclose(env.optimal_q(gamma), expected + 4.0 / (1 - gamma), atol=1e-4)
    if gamma == 0.99:
        assert abs(env.optimal_q(gamma).mean().item() - (99 + 1 / 4 + 400)) < 1e-2  # target mean set by γ


@pytest.mark.parametrize("gamma", [0.3, 0.9, 0.99])
def test_optimal_q_sparse_solves_the_bellman_optimality_equation(gamma):
    q = optimal_q_values(6, "sparse", gamma)
    assert torch.allclose(q, value_iteration(6, gamma), atol=1e-9, rtol=0)
    k, v = 6, q.max(1).values
    for s in range(k):  # Bellman residual, written out from the spec
        for a in range(k):
            target = float(s == a == k - 1) + gamma * (v[(s + 1) % k] if a == s else v.mean())
            assert abs(q[s, a].item() - target) < 1e-9


def test_optimal_q_sparse_matches_monte_carlo_returns():
    gamma, k, num_envs = 0.8, 4, 4096
    env, _, _ = make_tiny(variant="sparse", num_classes=k, num_envs=num_envs, seeds=[11])
    q_star = env.optimal_q(gamma).double()
    greedy = q_star.argmax(1)
    obs, info = env.reset()
    first_state = info["label"]
    first_action = torch.randint(k, (1, num_envs), generator=torch.Generator().manual_seed(1))
    returns = torch.zeros(1, num_envs, dtype=torch.float64)
    action, discount = first_action, 1.0
    for _ in range(90):  # 0.8^90 ~ 2e-9: the tail is negligible
        obs, reward, _, _, info = env.step(action)
        returns += discount * reward.double()
        discount *= gamma
        action = greedy[info["label"]]
    for s in range(k):
        for a in range(k):
            group = returns[(first_state == s) & (first_action == a)]
            standard_error = group.std().item() / group.numel() ** 0.5
            assert abs(group.mean().item() - q_star[s, a].item()) < 4 * standard_error + 1e-3


def test_optimal_q_rejects_bad_gamma():
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\)"):
        optimal_q_values(4, "easy", 1.0)


# ---------------------------------------------------------------------------
# Construction, errors, registration, placement
# ---------------------------------------------------------------------------
def test_dataset_by_name_with_a_class_balanced_subset(mnist_dir):
    env = ImageMDPVectorEnv("mnist", data_dir=mnist_dir, num_images=50, num_envs=4, seeds=[2])
    assert env.num_images == 50 and env.num_classes == env.num_actions == 10 and env.obs_shape == (1, 28, 28)
    assert env.members == 1 and env.seeds == [2] and env.seed == 2
    assert torch.bincount(env.image_labels[0]).tolist() == [5] * 10
    assert env.image_indices.shape == (1, 50) and env.images.shape == (50, 1, 28, 28)  # only the subset is stored
    full_images, full_labels = load_dataset("mnist", data_dir=mnist_dir, download=False)
    assert torch.equal(full_labels[env.image_indices[0]], env.image_labels[0])
    assert env.single_action_space == gym.spaces.Discrete(10)
    assert env.observation_space.shape == (1, 4, 1, 28, 28) and env.observation_space.dtype == np.float32
    assert env.action_space.shape == (1, 4)
    obs, _ = env.reset()
    assert env.single_observation_space.contains(obs[0, 0].numpy())
    uint8_env = ImageMDPVectorEnv(
        "mnist", data_dir=mnist_dir, num_images=50, num_envs=4, seeds=[2], obs_dtype="uint8"
    )
    uint8_obs, _ = uint8_env.reset()
    assert uint8_obs.dtype == torch.uint8 and torch.equal(uint8_obs.float() / 255, obs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dataset="svhn"), "valid datasets: mnist, fashion_mnist, cifar10"),
        (dict(variant="hard"), "valid variants: easy, random_label, sparse"),
        (dict(shift=("label_swap",)), "valid shifts: " + ", ".join(SHIFTS)),
        (dict(shift=("none", "label_noise")), "cannot be combined"),
        (dict(shift=("label_noise", "label_noise")), "twice"),
        (dict(shift="label_noise", shift_frac=0.0), r"shift_frac must lie in \(0, 1\]"),
        (dict(shift_frac=1.5), r"shift_frac must lie in \(0, 1\]"),
        (dict(shift="reward_offset"), "non-zero per-task increment"),
        (dict(reward_offset=1.0), "needs the 'reward_offset' shift"),
        (dict(num_images=3), r"num_images=3 must lie in \[4, 20\]"),
        (dict(num_images=21), r"num_images=21 must lie in \[4, 20\]"),
        (dict(num_envs=0), "num_envs must be >= 1"),
        (dict(shift_every=0), "shift_every must be >= 1"),
        (dict(episode_length=0), "episode_length must be >= 1"),
        (dict(obs_dtype=torch.int32), "obs_dtype"),
        (dict(seeds=[]), "non-empty"),
        (dict(seeds=3), "sequence of ints"),
        (dict(seeds="12"), "sequence of ints"),
        (dict(seeds=[1, -1]), r"seeds must be ints in \[0, 2\*\*63\)"),
        (dict(seeds=[1.0]), "seeds must be ints"),
        (dict(seeds=[True]), "seeds must be ints"),
    ],
)
def test_bad_arguments_are_one_clear_error(kwargs, message):
    images, labels = tiny_dataset()
    if kwargs.get("dataset"):
        images = labels = None
    with pytest.raises(ValueError, match=message):
        ImageMDPVectorEnv(images=images, labels=labels, **kwargs)


def test_bad_data_and_bad_calls_are_clear_errors():
    images, labels = tiny_dataset()
    with pytest.raises(ValueError, match="uint8 tensor"):
        ImageMDPVectorEnv(images=images.float(), labels=labels)
    with pytest.raises(ValueError, match=r"classes \[2\] have no image"):
        ImageMDPVectorEnv(images=images, labels=torch.where(labels == 2, 3, labels))
    with pytest.raises(ValueError, match="both images and labels"):
        ImageMDPVectorEnv(images=images)
    # Random labels for 12 images in 12 classes leave some class empty on nearly every draw (12!/12^12).
    few_images, few_labels = tiny_dataset(num_classes=12, per_class=1)
    with pytest.raises(ValueError, match="too few"):
        ImageMDPVectorEnv(images=few_images, labels=few_labels, variant="random_label")
    env = ImageMDPVectorEnv(images=images, labels=labels, num_envs=3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(1, 3, dtype=torch.long))
    env.reset()
    with pytest.raises(ValueError, match=r"shape \(1, 3\) \(members, num_envs\)"):
        env.step(torch.zeros(3, dtype=torch.long))  # no member dimension
    with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
        env.step(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        env.step(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="2 seeds for 1 members"):
        env.reset(seeds=[1, 2])


def test_gym_make_registration_and_env_checker(mnist_dir):
    from gymnasium.utils.env_checker import check_env

    env = gym.make("plasticity/ImageMDP-v0", dataset="mnist", data_dir=mnist_dir, num_images=100)
    obs, info = env.reset(seed=0)
    assert obs.shape == (1, 28, 28) and obs.dtype == np.float32 and env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = env.step(info["label"])
    assert reward == 1.0 and terminated is False and info["correct"] is True
    check_env(env.unwrapped, skip_render_check=True)
    with pytest.raises(ValueError, match="action must be an int"):
        env.unwrapped.step(10)


def test_importing_envs_loads_no_data_and_no_torch():
    code = "import sys, envs; assert 'torch' not in sys.modules and 'envs.image_mdp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert envs.IMAGE_MDP_ID in gym.registry


@pytest.mark.gpu
def test_cuda_placement_and_resume():
    env, images, labels = make_tiny(
        device="cuda", num_envs=16, shift=ALL_SHIFTS, shift_every=3, reward_offset=0.5
    )
    obs, info = env.reset()
    assert obs.device.type == "cuda" and info["label"].device.type == "cuda"
    for _ in range(7):
        obs, reward, terminated, truncated, info = env.step(info["label"])
    for tensor in (obs, reward, terminated, truncated, info["label"], info["correct"], env.image_labels):
        assert tensor.device.type == "cuda"
    assert bool((reward == 1 + 0.5 * 2).all())
    shown = shown_image(obs[0].cpu(), images, env.pixel_permutation[0].cpu())
    assert torch.equal(env.image_labels[0].cpu()[shown], info["label"][0].cpu())
    saved = env.state_dict()
    expected = [env.step(info["label"])[0].cpu() for _ in range(5)]
    resumed, _, _ = make_tiny(device="cuda", num_envs=16, shift=ALL_SHIFTS, shift_every=3, reward_offset=0.5)
    resumed.load_state_dict(saved)
    assert all(torch.equal(resumed.step(info["label"])[0].cpu(), e) for e in expected)
    assert env.optimal_q(0.9).device.type == "cuda"
