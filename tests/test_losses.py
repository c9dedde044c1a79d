"""Value losses against their definitions (methods.md §9, property 9.1; §10, property 10.1)."""

import math

import pytest
import torch
import torch.nn.functional as F

from plasticity.losses import (
    CATEGORICAL_LOSSES,
    REGRESSION_LOSSES,
    CategoricalSupport,
    c51_atoms,
    c51_loss,
    c51_project,
    categorical_cross_entropy,
    regression_loss,
)


def test_loss_names():
    assert REGRESSION_LOSSES == ("mse", "huber") and CATEGORICAL_LOSSES == ("hl_gauss", "two_hot")


def test_regression_losses_on_known_values():
    q = torch.tensor([0.0, 0.0, 0.0])
    y = torch.tensor([0.5, 3.0, -2.0])
    assert regression_loss("mse", q, y).item() == pytest.approx((0.25 + 9.0 + 4.0) / 3)
    # Huber δ = 1: ½d² for |d| ≤ 1, |d| − ½ beyond.
    assert regression_loss("huber", q, y).item() == pytest.approx((0.125 + 2.5 + 1.5) / 3)


def test_regression_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown regression loss"):
        regression_loss("l1", torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="must match"):
        regression_loss("mse", torch.zeros(3, 4), torch.zeros(3))  # whole head output instead of Q(s, a)


def test_support_geometry():
    support = CategoricalSupport(0.0, 10.0, 10)
    torch.testing.assert_close(support.edges, torch.arange(11.0))
    torch.testing.assert_close(support.centers, torch.arange(10.0) + 0.5)
    assert support.bin_width == 1.0 and support.sigma == pytest.approx(0.75)
    assert CategoricalSupport(0.0, 10.0, 10, sigma_ratio=0.5).sigma == pytest.approx(0.5)


def test_hl_gauss_matches_definition():
    support = CategoricalSupport(-5.0, 5.0, 20)
    y = 1.3
    phi = [0.5 * (1 + math.erf((e - y) / (support.sigma * math.sqrt(2)))) for e in support.edges.tolist()]
    expected = torch.tensor([b - a for a, b in zip(phi[:-1], phi[1:])])
    expected = expected / expected.sum()
    torch.testing.assert_close(support.hl_gauss(torch.tensor([y]))[0], expected, atol=1e-6, rtol=1e-5)


def test_property_9_1_targets_sum_to_one_and_keep_the_value():
    support = CategoricalSupport(-10.0, 110.0, 51)
    y = torch.linspace(5.0, 95.0, 301)  # well inside the support
    for probs in (support.hl_gauss(y), support.two_hot(y)):
        assert probs.shape == (301, 51)
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(1), torch.ones(301), atol=1e-6, rtol=0)
    hl_mean = support.hl_gauss(y) @ support.centers
    torch.testing.assert_close(hl_mean, y, atol=1e-3 * support.bin_width, rtol=0)
    two_hot_mean = support.two_hot(y) @ support.centers
    torch.testing.assert_close(two_hot_mean, y, atol=1e-4, rtol=0)  # exact up to float32 rounding


def test_two_hot_uses_the_two_bracketing_bins():
    support = CategoricalSupport(0.0, 10.0, 10)
    probs = support.two_hot(torch.tensor([3.75, 4.5, 0.2, 12.0, -3.0]))
    torch.testing.assert_close(probs[0, 3:5], torch.tensor([0.75, 0.25]))  # centres 3.5, 4.5
    assert probs[0].count_nonzero() == 2
    assert probs[1, 4] == 1.0 and probs[1].count_nonzero() == 1  # exactly on a centre
    assert probs[2, 0] == 1.0  # below the first centre: clipped to it
    assert probs[3, 9] == 1.0 and probs[4, 0] == 1.0  # outside the support: clipped


def test_hl_gauss_clips_targets_to_the_support():
    support = CategoricalSupport(0.0, 10.0, 10)
    torch.testing.assert_close(support.hl_gauss(torch.tensor([50.0])), support.hl_gauss(torch.tensor([10.0])))
    assert support.hl_gauss(torch.tensor([50.0]))[0].argmax() == 9


def test_expectation_and_clip_fraction():
    support = CategoricalSupport(0.0, 10.0, 10)
    peaked = torch.full((2, 3, 10), -1e4)
    peaked[..., 7] = 0.0
    torch.testing.assert_close(support.expectation(peaked), torch.full((2, 3), 7.5))
    torch.testing.assert_close(support.expectation(torch.zeros(4, 10)), torch.full((4,), 5.0))
    y = torch.tensor([-1.0, 0.0, 5.0, 10.0, 10.5])
    assert support.clip_fraction(y, "hl_gauss").item() == pytest.approx(0.4)  # the edges 0 and 10 are kept
    assert support.clip_fraction(y, "two_hot").item() == pytest.approx(0.8)  # only 5.0 is inside [0.5, 9.5]
    with pytest.raises(ValueError, match="bins in the last dimension"):
        support.expectation(torch.zeros(4, 11))


def test_clip_range_is_what_each_loss_clamps_to():
    """Two-hot clips to the outer centres, HL-Gauss to the edges: y = 109.9 on [0, 110] is clipped by two-hot only."""
    support = CategoricalSupport(0.0, 110.0, 51)
    first, last = support.clip_range("two_hot")
    assert (first, last) == (support.centers[0].item(), support.centers[-1].item())
    assert last == pytest.approx(110 - 110 / 102)  # half a bin inside v_max
    assert support.clip_range("hl_gauss") == (0.0, 110.0)
    y = torch.tensor([109.9])
    assert support.clip_fraction(y, "two_hot").item() == 1.0 and support.clip_fraction(y, "hl_gauss").item() == 0.0
    assert (support.two_hot(y) @ support.centers).item() == pytest.approx(last)  # the loss does move it
    on_centres = support.centers[[0, 25, -1]]
    assert support.clip_fraction(on_centres, "two_hot").item() == 0.0  # exactly on the outer centres: kept
    torch.testing.assert_close(support.two_hot(on_centres) @ support.centers, on_centres)
    with pytest.raises(ValueError, match="unknown categorical loss"):
        support.clip_range("c51")


def test_two_hot_clip_fraction_counts_exactly_the_targets_two_hot_moves():
    support = CategoricalSupport(-10.0, 110.0, 51)
    y = torch.cat([torch.linspace(-15.0, 115.0, 2001), support.centers[[0, -1]],
                   support.centers[[0, -1]].nextafter(torch.tensor([-math.inf, math.inf]))])
    low, high = support.clip_range("two_hot")
    outside = (y < low) | (y > high)
    torch.testing.assert_close(support.two_hot(y), support.two_hot(y.clamp(low, high)), rtol=0, atol=0)
    kept = ((support.two_hot(y[~outside]) @ support.centers) - y[~outside]).abs()
    assert kept.max() < 1e-4  # inside the range two-hot represents y (float32 rounding)
    assert outside.any() and support.clip_fraction(y, "two_hot").item() == pytest.approx(outside.float().mean().item())
    assert outside[-2:].all() and not outside[-4:-2].any()  # one float past an outer centre is clipped, on it is not


@pytest.mark.parametrize("args, match", [((1.0, 1.0, 10), "v_min < v_max"), ((2.0, 1.0, 10), "v_min < v_max"),
                                         ((0.0, 1.0, 1), "at least 2"), ((0.0, math.inf, 10), "finite")])
def test_support_validation(args, match):
    with pytest.raises(ValueError, match=match):
        CategoricalSupport(*args)
    with pytest.raises(ValueError, match=match):
        c51_atoms(*args)
    with pytest.raises(ValueError, match="sigma_ratio"):
        CategoricalSupport(0.0, 1.0, 10, sigma_ratio=0.0)


def test_categorical_cross_entropy_is_cross_entropy_with_soft_targets():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)
    target = torch.softmax(torch.randn(5, 7), -1)
    loss = categorical_cross_entropy(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    manual = -(target * torch.log(torch.softmax(logits, -1))).sum(1).mean()
    torch.testing.assert_close(loss, manual)
    # Minimised at softmax(logits) = target: the gradient vanishes there.
    at_target = target.log().clone().requires_grad_(True)
    categorical_cross_entropy(at_target, target).backward()
    torch.testing.assert_close(at_target.grad, torch.zeros(5, 7), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="must match"):
        categorical_cross_entropy(logits, target[:, :6])


def test_c51_atoms():
    atoms = c51_atoms(-10.0, 10.0, 51, "cpu")
    assert atoms.shape == (51,)
    torch.testing.assert_close(atoms, -10.0 + 0.4 * torch.arange(51.0))


def _reference_projection(next_probs, rewards, dones, gamma, atoms):
    """Bellemare et al. 2017, Algorithm 1, one atom at a time in float64."""
    v_min, v_max, n = atoms[0].item(), atoms[-1].item(), atoms.shape[0]
    delta = (v_max - v_min) / (n - 1)
    out = torch.zeros(next_probs.shape, dtype=torch.float64)
    for i in range(next_probs.shape[0]):
        for j in range(n):
            tz = min(max(rewards[i].item() + gamma * (1 - dones[i].item()) * atoms[j].item(), v_min), v_max)
            b = (tz - v_min) / delta
            lower, upper = math.floor(b), math.ceil(b)
            p = next_probs[i, j].item()
            if lower == upper:
                out[i, lower] += p
            else:
                out[i, lower] += p * (upper - b)
                out[i, upper] += p * (b - lower)
    return out


def test_c51_projection_matches_reference():
    torch.manual_seed(0)
    atoms = c51_atoms(-10.0, 10.0, 11)
    next_probs = torch.softmax(torch.randn(6, 11), -1)
    rewards = torch.tensor([0.3, -1.7, 2.0, 9.5, -10.0, 0.0])
    dones = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    projected = c51_project(next_probs, rewards, dones, 0.9, atoms)
    torch.testing.assert_close(projected.double(), _reference_projection(next_probs, rewards, dones, 0.9, atoms),
                               atol=1e-6, rtol=0)


def test_c51_projection_property_10_1():
    torch.manual_seed(1)
    atoms = c51_atoms(-10.0, 10.0, 51)
    next_probs = torch.softmax(torch.randn(64, 51), -1)
    rewards = torch.rand(64) * 2 - 1
    dones = (torch.rand(64) < 0.3).float()
    gamma = 0.5  # r + γz stays inside [−10, 10]: no atom is clipped
    projected = c51_project(next_probs, rewards, dones, gamma, atoms)
    torch.testing.assert_close(projected.sum(1), torch.ones(64), atol=1e-5, rtol=0)
    expected_mean = (rewards + gamma * (1 - dones) * (next_probs @ atoms)).clamp(-10, 10)
    torch.testing.assert_close(projected @ atoms, expected_mean, atol=1e-4, rtol=0)
    # With clipping, the mean is that of the atom-wise clipped r + γz.
    rewards = torch.rand(64) * 10 + 5
    projected = c51_project(next_probs, rewards, dones, 0.99, atoms)
    torch.testing.assert_close(projected.sum(1), torch.ones(64), atol=1e-5, rtol=0)
    clipped = (rewards[:, None] + 0.99 * (1 - dones)[:, None] * atoms).clamp(-10, 10)
    torch.testing.assert_close(projected @ atoms, (next_probs * clipped).sum(1), atol=1e-4, rtol=0)


def test_c51_projection_of_exact_atoms_keeps_all_mass():
    """l == u: Tz on an atom must keep its whole mass (the case a naive (u − b, b − l) split loses)."""
    atoms = c51_atoms(-10.0, 10.0, 51)
    next_probs = torch.softmax(torch.randn(3, 51), -1)
    projected = c51_project(next_probs, torch.zeros(3), torch.zeros(3), 1.0, atoms)
    torch.testing.assert_close(projected, next_probs, atol=1e-6, rtol=0)
    terminal = c51_project(next_probs, torch.tensor([2.0, -10.0, 30.0]), torch.ones(3), 0.99, atoms)
    assert terminal[0, 30] == pytest.approx(1.0) and terminal[1, 0] == pytest.approx(1.0)
    assert terminal[2, 50] == pytest.approx(1.0)


def test_c51_project_rejects_bad_shapes():
    """next_probs [..., B, N] with N the atoms; rewards and dones exactly its leading dims [..., B]."""
    atoms = c51_atoms(-10.0, 10.0, 51)
    with pytest.raises(ValueError, match="next_probs"):
        c51_project(torch.zeros(4, 6, 50), torch.zeros(4, 6), torch.zeros(4, 6), 0.99, atoms)  # 50 atoms, not 51
    with pytest.raises(ValueError, match="next_probs"):
        c51_project(torch.zeros(51), torch.zeros(()), torch.zeros(()), 0.99, atoms)  # no batch dim
    with pytest.raises(ValueError, match="rewards and dones"):
        c51_project(torch.zeros(4, 51), torch.zeros(4, 1), torch.zeros(4), 0.99, atoms)
    with pytest.raises(ValueError, match="rewards and dones"):
        c51_project(torch.zeros(4, 6, 51), torch.zeros(4), torch.zeros(4), 0.99, atoms)  # [M] for [M, B]
    with pytest.raises(ValueError, match="rewards and dones"):
        c51_project(torch.zeros(4, 6, 51), torch.zeros(4, 6), torch.zeros(6), 0.99, atoms)


def test_population_losses_reduce_over_the_batch_only():
    """[M, B, ...] inputs: member k's loss and projection are those of its own [B, ...] slice."""
    torch.manual_seed(3)
    members, batch = 3, 16
    q, y = torch.randn(members, batch), torch.randn(members, batch) * 3
    for kind in REGRESSION_LOSSES:
        losses = regression_loss(kind, q, y)
        assert losses.shape == (members,)
        torch.testing.assert_close(losses, torch.stack([regression_loss(kind, q[k], y[k]) for k in range(members)]))
    logits, target = torch.randn(members, batch, 51), torch.softmax(torch.randn(members, batch, 51), -1)
    cross = categorical_cross_entropy(logits, target)
    assert cross.shape == (members,) and c51_loss(logits, target).shape == (members,)
    torch.testing.assert_close(cross, torch.stack([categorical_cross_entropy(logits[k], target[k])
                                                   for k in range(members)]))
    atoms = c51_atoms(-10.0, 10.0, 51)
    rewards, dones = torch.randn(members, batch) * 5, (torch.rand(members, batch) < 0.3).float()
    projected = c51_project(target, rewards, dones, 0.99, atoms)
    assert projected.shape == (members, batch, 51)
    for k in range(members):
        torch.testing.assert_close(projected[k], c51_project(target[k], rewards[k], dones[k], 0.99, atoms))


def test_c51_loss_is_negative_log_likelihood_and_keeps_gradients():
    torch.manual_seed(0)
    logits = torch.randn(4, 51)
    target = torch.softmax(torch.randn(4, 51), -1)
    expected = -(target * torch.log(torch.softmax(logits, -1))).sum(1).mean()
    torch.testing.assert_close(c51_loss(logits, target), expected)
    # Target mass on an atom with p ≈ e^-200: finite loss, and a gradient that moves toward it.
    logits = torch.zeros(1, 51)
    logits[0, 0] = 200.0
    logits.requires_grad_(True)
    target = torch.zeros(1, 51)
    target[0, 40] = 1.0
    loss = c51_loss(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[0, 40] < -0.99


@pytest.mark.gpu
def test_losses_on_cuda_match_cpu():
    torch.manual_seed(0)
    y = torch.linspace(-5, 105, 100)
    cpu, cuda = CategoricalSupport(-10, 110, 51), CategoricalSupport(-10, 110, 51, device="cuda")
    torch.testing.assert_close(cuda.hl_gauss(y.cuda()).cpu(), cpu.hl_gauss(y), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cuda.two_hot(y.cuda()).cpu(), cpu.two_hot(y), atol=1e-6, rtol=1e-5)
    assert cuda.clip_fraction(y.cuda(), "two_hot").device.type == "cuda"
    assert cuda.clip_range("two_hot") == cpu.clip_range("two_hot")
    assert torch.equal(cuda.centers.cpu(), cpu.centers)
    atoms = c51_atoms(-10, 10, 51)
    probs, rewards, dones = torch.softmax(torch.randn(32, 51), -1), torch.randn(32), (torch.rand(32) < 0.2).float()
    projected = c51_project(probs.cuda(), rewards.cuda(), dones.cuda(), 0.99, atoms.cuda())
    torch.testing.assert_close(projected.cpu(), c51_project(probs, rewards, dones, 0.99, atoms), atol=1e-6, rtol=0)
    logits = torch.randn(32, 51)
    torch.testing.assert_close(c51_loss(logits.cuda(), projected).cpu(), c51_loss(logits, projected.cpu()))
    torch.testing.assert_close(regression_loss("huber", logits.cuda()[:, 0], rewards.cuda()).cpu(),
                               regression_loss("huber", logits[:, 0], rewards))
