"""Pure diagnostic functions against their definitions (diagnostics.md "Rank" and "Units"; pitfalls 5, 6, 7)."""

import math

import pytest
import torch

from plasticity.diagnostics import (
    condition_number,
    effective_rank,
    singular_values,
    srank,
    stable_rank,
    unit_stats,
)
from plasticity.rank import gram_singular_values


def ranks(matrix: torch.Tensor) -> tuple[float, float, float]:
    sv = singular_values(matrix)
    return effective_rank(sv).item(), srank(sv).item(), stable_rank(sv).item()


# ---------------------------------------------------------------------------
# Rank metrics on known matrices (pitfall 5)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5, 64])
def test_identity_has_all_ranks_n(n):
    erank, s_rank, st_rank = ranks(torch.eye(n))
    assert erank == pytest.approx(n, rel=1e-9)
    assert s_rank == n
    assert st_rank == pytest.approx(n, rel=1e-6)


def test_rank_one_matrix_has_all_ranks_one():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.outer(torch.randn(40, generator=generator), torch.randn(12, generator=generator))
    erank, s_rank, st_rank = ranks(matrix)
    assert erank == pytest.approx(1.0, abs=1e-4)  # float32 SVD leaves σ_2.. at ~1e-7 σ_1
    assert s_rank == 1
    assert st_rank == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("ones", [1, 3, 7])
def test_partial_identity_counts_the_ones(ones):
    matrix = torch.diag(torch.tensor([1.0] * ones + [0.0] * (10 - ones)))
    erank, s_rank, st_rank = ranks(matrix)
    assert erank == pytest.approx(ones, rel=1e-9)
    assert s_rank == ones
    assert st_rank == pytest.approx(ones, rel=1e-9)


@pytest.mark.parametrize(("values", "delta", "expected"), [
    ([1.0] * 100, 0.01, 99),        # 99/100 = 1 − δ exactly: the 99th prefix already reaches it
    ([1.0] * 99, 0.01, 99),         # 98/99 < 0.99
    ([1.0] * 4, 0.01, 4),
    ([1.0] * 4, 0.25, 3),           # 3/4 = 1 − δ exactly
    ([99.0, 1.0], 0.01, 1),         # σ_1 alone is exactly 99 %
    ([98.9, 1.1], 0.01, 2),
    ([5.0], 0.01, 1),               # a 0-based implementation returns 0 here
    ([1.0, 2.0, 3.0, 94.0], 0.05, 2),  # unsorted input: 94 + 3 = 97 % ≥ 95 %
    ([1.0] * 10, 0.0, 10),
])
def test_srank_edge_cases_exactly(values, delta, expected):
    assert srank(torch.tensor(values), delta).item() == expected


def test_srank_rejects_bad_delta():
    with pytest.raises(ValueError, match="delta"):
        srank(torch.ones(3), delta=1.0)


def test_effective_rank_matches_entropy_formula():
    sv = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])
    p = [v / 8.0 for v in (4.0, 2.0, 1.0, 1.0)]
    expected = math.exp(-sum(pk * math.log(pk) for pk in p))
    assert effective_rank(sv).item() == pytest.approx(expected, rel=1e-12)


def test_stable_rank_is_frobenius_over_spectral_norm():
    matrix = torch.randn(30, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = (torch.linalg.matrix_norm(matrix, "fro") / torch.linalg.matrix_norm(matrix, 2)) ** 2
    assert stable_rank(singular_values(matrix)).item() == pytest.approx(expected.item(), rel=1e-10)


def test_condition_number_uses_the_srank_th_singular_value():
    sv = torch.tensor([100.0, 10.0, 5.0, 1e-6])  # srank(δ=0.01) = 3: σ_4 does not count
    assert srank(sv).item() == 3
    assert condition_number(sv).item() == pytest.approx(20.0)


def test_zero_matrix_has_rank_zero_and_undefined_condition():
    sv = singular_values(torch.zeros(6, 4))
    assert (effective_rank(sv).item(), srank(sv).item(), stable_rank(sv).item()) == (0.0, 0.0, 0.0)
    assert math.isnan(condition_number(sv).item())


def test_non_finite_singular_values_give_nan_not_a_plausible_rank():
    sv = torch.tensor([2.0, float("nan"), 1.0])
    for metric in (effective_rank, srank, stable_rank, condition_number):
        assert math.isnan(metric(sv).item()), metric.__name__


def test_rank_metrics_stay_on_device_as_zero_dim_tensors():
    sv = torch.tensor([3.0, 2.0, 1.0])
    for metric in (effective_rank, srank, stable_rank, condition_number):
        value = metric(sv)
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.device == sv.device


# ---------------------------------------------------------------------------
# Singular values and the float64 Gram fallback (pitfall 7)
# ---------------------------------------------------------------------------

def ill_conditioned(n: int, d: int, smallest: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    left, _ = torch.linalg.qr(torch.randn(n, min(n, d), generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(d, min(n, d), generator=generator, dtype=torch.float64))
    sv = torch.logspace(0, math.log10(smallest), min(n, d), dtype=torch.float64)
    return (left * sv) @ right.T, sv


@pytest.mark.parametrize(("n", "d"), [(64, 16), (16, 64)])
def test_singular_values_match_svdvals(n, d):
    matrix = torch.randn(n, d, generator=torch.Generator().manual_seed(3))
    sv = singular_values(matrix)
    assert sv.dtype == torch.float32 and sv.shape == (min(n, d),)
    torch.testing.assert_close(sv, torch.linalg.svdvals(matrix))


@pytest.mark.parametrize(("n", "d"), [(64, 16), (16, 64)])
def test_forced_fallback_gives_the_same_singular_values(monkeypatch, n, d):
    matrix64, true_sv = ill_conditioned(n, d)
    matrix = matrix64.float()
    reference = torch.linalg.svdvals(matrix)
    calls = []

    def failing_svdvals(*args, **kwargs):
        calls.append(1)
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (forced by the test)")

    monkeypatch.setattr(torch.linalg, "svdvals", failing_svdvals)
    sv = singular_values(matrix)
    assert calls, "the fallback test must actually route through a failing svdvals"
    assert sv.shape == reference.shape and sv.dtype == torch.float32
    assert torch.all(sv[:-1] >= sv[1:]), "fallback must sort descending"
    torch.testing.assert_close(sv, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sv.double(), true_sv, rtol=1e-3, atol=1e-6)


def test_fallback_runs_when_svdvals_silently_returns_non_finite(monkeypatch):
    matrix = torch.randn(20, 5, generator=torch.Generator().manual_seed(4))
    reference = torch.linalg.svdvals(matrix)
    monkeypatch.setattr(torch.linalg, "svdvals", lambda m: torch.full((min(m.shape),), float("nan")))
    torch.testing.assert_close(singular_values(matrix), reference, rtol=1e-4, atol=1e-5)


def test_gram_fallback_top_vector_is_the_top_right_singular_vector():
    for n, d in ((50, 8), (8, 50)):
        matrix = torch.randn(n, d, generator=torch.Generator().manual_seed(5))
        _, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        _, top = gram_singular_values(matrix, with_top_vector=True)
        assert abs(torch.dot(top.double(), vh[0]).item()) == pytest.approx(1.0, abs=1e-6)


def test_singular_values_rejects_non_finite_features_and_vectors():
    with pytest.raises(ValueError, match="NaN or inf"):
        singular_values(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\[n_samples, n_features\]"):
        singular_values(torch.ones(5))


# ---------------------------------------------------------------------------
# Unit statistics (dead, linearized, dormant, pre-activation shift)
# ---------------------------------------------------------------------------

def test_unit_stats_on_hand_built_dense_activations():
    pre = torch.tensor([
        # unit: 0 dead, 1 linearized, 2 mixed, 3 dormant (tiny but alive), 4 mixed
        [-1.0, 2.0, 1.0, 0.01, 3.0],
        [-2.0, 1.0, -1.0, -1.0, -3.0],
        [-3.0, 3.0, 2.0, -1.0, 3.0],
        [-4.0, 2.0, -2.0, -1.0, 1.0],
    ])
    post = pre.relu()
    stats = unit_stats(pre, post, dormant_tau=0.1)
    # activity mean_b|h|: [0, 2, 0.75, 0.0025, 1.75]; mean 0.9005 -> scores ≤ 0.1 for units 0 and 3
    assert stats["dead"].item() == 1
    assert stats["linearized"].item() == 1
    assert stats["dormant"].item() == 2
    assert stats["num_units"].item() == 5
    assert stats["preact_mean_abs"].item() == pytest.approx(pre.mean(0).abs().mean().item())
    expected_std = torch.tensor([pre[:, i].tolist() for i in range(5)]).std(1, correction=0).mean()
    assert stats["preact_std"].item() == pytest.approx(expected_std.item())


def test_dormant_threshold_is_inclusive():
    post = torch.tensor([[0.25, 1.75, 1.0, 1.0]]).repeat(3, 1)  # mean activity 1: scores 0.25, 1.75, 1, 1
    assert unit_stats(post, post, dormant_tau=0.25)["dormant"].item() == 1
    assert unit_stats(post, post, dormant_tau=0.2499)["dormant"].item() == 0


def test_unit_stats_conv_channels():
    pre = torch.ones(2, 4, 3, 3)
    pre[:, 0] = -1.0                 # channel 0: dead everywhere
    pre[1, 1, 2, 2] = -5.0           # channel 1: positive on average, clipped at one position
    pre[:, 2] = -1.0
    pre[0, 2, 0, 0] = 1.0            # channel 2: active at one sample and position only: alive
    stats = unit_stats(pre, pre.relu())
    assert stats["num_units"].item() == 4
    assert stats["dead"].item() == 1
    # Only channel 3 is > 0 at every sample and position; channel 1's spatial mean stays > 0 but the
    # ReLU clips it at one position, so it does not act as the identity.
    assert stats["linearized"].item() == 1
    channel_pre = pre.mean((2, 3))
    assert stats["preact_mean_abs"].item() == pytest.approx(channel_pre.mean(0).abs().mean().item())
    assert stats["preact_std"].item() == pytest.approx(channel_pre.std(0, correction=0).mean().item())


def test_unit_stats_all_zero_layer_is_all_dead_and_dormant():
    zeros = torch.zeros(8, 6)
    stats = unit_stats(zeros - 1.0, zeros)
    assert stats["dead"].item() == 6 and stats["dormant"].item() == 6 and stats["linearized"].item() == 0


def test_unit_stats_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        unit_stats(torch.zeros(4, 3), torch.zeros(4, 2))


# ---------------------------------------------------------------------------
# A leading batch dim (the members of a population): one call, each entry its own value
# ---------------------------------------------------------------------------

def test_rank_metrics_batch_over_leading_dims():
    generator = torch.Generator().manual_seed(6)
    matrices = torch.stack([torch.eye(5), torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])),
                            torch.randn(5, 5, generator=generator), torch.zeros(5, 5)])
    sv = singular_values(matrices)
    assert sv.shape == (4, 5)
    for metric in (effective_rank, srank, stable_rank, condition_number):
        batched = metric(sv)
        assert batched.shape == (4,) and batched.dtype == torch.float64, metric.__name__
        singles = torch.stack([metric(singular_values(m)) for m in matrices])
        torch.testing.assert_close(batched, singles, equal_nan=True, msg=metric.__name__)
    assert srank(sv)[:2].tolist() == [5.0, 2.0] and srank(sv)[3].item() == 0.0
    nested = sv.reshape(2, 2, 5)
    assert effective_rank(nested).shape == (2, 2)


def test_a_non_finite_batch_entry_is_nan_for_itself_only():
    sv = torch.tensor([[3.0, 2.0, 1.0], [float("nan"), 1.0, 0.5], [1.0, 1.0, 1.0]])
    for metric in (effective_rank, srank, stable_rank, condition_number):
        values = metric(sv)
        assert math.isnan(values[1].item()), metric.__name__
        assert torch.equal(values[[0, 2]], torch.stack([metric(sv[0]), metric(sv[2])])), metric.__name__


def test_gram_fallback_batches_over_leading_dims():
    generator = torch.Generator().manual_seed(7)
    for n, d in ((30, 6), (6, 30)):
        matrices = torch.randn(3, n, d, generator=generator)
        sv, top = gram_singular_values(matrices, with_top_vector=True)
        assert sv.shape == (3, min(n, d)) and top.shape == (3, d)
        for k in range(3):
            single_sv, single_top = gram_singular_values(matrices[k], with_top_vector=True)
            torch.testing.assert_close(sv[k], single_sv)
            assert abs(torch.dot(top[k], single_top).item()) == pytest.approx(1.0, abs=1e-5)


def test_unit_stats_batch_over_members():
    generator = torch.Generator().manual_seed(8)
    for shape in ((3, 10, 5), (3, 4, 6, 2, 2)):
        pre = torch.randn(*shape, generator=generator)
        pre[0, :, 0] = -1.0 - pre[0, :, 0].abs()  # member 0: unit 0 dead
        pre[2] = pre[2].abs() + 0.1                   # member 2: every unit linearized
        stats = unit_stats(pre, pre.relu(), dormant_tau=0.2)
        for key, value in stats.items():
            assert value.shape == (3,), key
            singles = torch.stack([unit_stats(pre[k], pre[k].relu(), dormant_tau=0.2)[key] for k in range(3)])
            torch.testing.assert_close(value, singles, msg=key)
        assert stats["dead"][0] >= 1 and stats["linearized"][2] == shape[2]


def test_unit_stats_of_a_non_finite_member_are_nan_for_it_only():
    pre = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(9))
    pre[1, 0, 0] = float("nan")
    stats = unit_stats(pre, pre.relu())
    for key, value in stats.items():
        assert math.isnan(value[1].item()) != (key == "num_units"), key
        torch.testing.assert_close(value[[0, 2]], torch.stack([unit_stats(pre[k], pre[k].relu())[key]
                                                               for k in (0, 2)]), msg=key)
