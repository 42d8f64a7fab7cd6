"""Tests of DP-FedAvg with adaptive clipping and its accounting (meshfl.algorithms.moshpit_dp). Seeded, fast."""

from __future__ import annotations

import math

import pytest
import torch

from meshfl.algorithms import moshpit_dp as dp


def test_noise_multiplier_delta() -> None:
    # m = 40: sigma_b = 2, z_delta = (1 - 1/16)^-1/2
    assert dp.noise_multiplier_delta(1.0, 40) == pytest.approx((1 - 1 / 16) ** -0.5)
    with pytest.raises(ValueError, match="noise_multiplier.*participants"):
        dp.noise_multiplier_delta(1.0, 10)  # 2 sigma_b = 1: no z_delta (MAR-FL would silently change z)
    with pytest.raises(ValueError, match="participants"):
        dp.noise_multiplier_delta(1.0, 0)


def test_clipping_bounds_the_norm() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        delta = torch.randn(50, generator=g) * scale
        clipped, unclipped = dp.clip_delta(delta, 1.0)
        norm = float(torch.linalg.vector_norm(clipped))
        assert norm <= 1.0 * (1 + 1e-6)
        assert unclipped == (float(torch.linalg.vector_norm(delta)) <= 1.0)
        if unclipped:
            assert torch.equal(clipped, delta)
        else:
            assert norm == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="clip_norm"):
        dp.clip_delta(torch.ones(2), 0.0)


def test_noise_std_of_the_average_is_z_delta_c_over_m() -> None:
    """m participants each add N(0, (z_delta C / sqrt m)^2): the mean of their zero deltas has std z_delta C / m."""
    m, z, c, dim = 40, 1.0, 0.5, 4000
    g = torch.Generator().manual_seed(1)
    shares = [dp.privatize_delta(torch.zeros(dim, dtype=torch.float64), c, z, m, g)[0] for _ in range(m)]
    mean = torch.stack(shares).mean(dim=0)
    expected = dp.noise_multiplier_delta(z, m) * c / m
    assert float(mean.std()) == pytest.approx(expected, rel=0.05)  # 4000 samples: std of the estimate ~1.1 %


def test_smoothing_and_dp_params() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    s = dp.smooth(None, a)
    assert torch.equal(s, a)
    s = dp.smooth(s, b)
    assert torch.allclose(s, torch.tensor([1.4, 2.3]))
    assert torch.allclose(dp.dp_params(torch.zeros(2), s), torch.tensor([0.14, 0.23]))


def test_clip_norm_moves_to_the_target_quantile() -> None:
    """Delta norms ~ |N(0, 1)| * 2: the median norm is 2 * 0.6745 = 1.349; starting from C = 0.1 or 20, the
    adaptive clip norm approaches it (gamma = 0.5: half the deltas unclipped)."""
    g = torch.Generator().manual_seed(2)
    median = 2 * 0.6744897501960817
    for start in (0.1, 20.0):
        c = start
        history = []
        for _ in range(300):
            norms = torch.randn(100, generator=g).abs() * 2
            bits = [bool(n <= c) for n in norms]
            c = dp.update_clip_norm(c, dp.unclipped_fraction_estimate(bits, g))
            history.append(c)
        assert abs(math.log(sum(history[-100:]) / 100 / median)) < 0.15
    assert dp.update_clip_norm(1.0, 1.0) == pytest.approx(math.exp(-0.1))  # all unclipped: shrink
    assert dp.update_clip_norm(1.0, 0.0) == pytest.approx(math.exp(0.1))


def test_unclipped_fraction_estimate_noise() -> None:
    g = torch.Generator().manual_seed(3)
    estimates = torch.tensor([dp.unclipped_fraction_estimate([True] * 20 + [False] * 20, g) for _ in range(2000)])
    assert float(estimates.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(estimates.std()) == pytest.approx(1 / 20, rel=0.1)  # sigma_b / m = 1/20 whatever m


def test_epsilon_known_value_and_monotone() -> None:
    # dp-accounting's own test (rdp_privacy_accountant_test.test_compute_epsilon_delta_gaussian): q = 1,
    # z = 4.530877117 gives exactly (1, 1e-6)-DP in RDP for one step.
    assert dp.epsilon(4.530877117, 1.0, 1, 1e-6) == pytest.approx(1.0, abs=1e-3)
    # PLD is tight for the plain Gaussian: compare with the analytic Gaussian mechanism delta(eps).
    z = 4.530877117
    eps = dp.epsilon(z, 1.0, 1, 1e-6, accountant="pld")
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    analytic_delta = phi(-eps * z + 1 / (2 * z)) - math.exp(eps) * phi(-eps * z - 1 / (2 * z))
    assert analytic_delta == pytest.approx(1e-6, rel=0.05) and eps < 1.0
    delta = dp.default_delta(64)
    assert delta == pytest.approx(64**-1.1)
    steps = [dp.epsilon(1.0, 0.25, s, delta) for s in (1, 10, 100)]
    assert steps[0] < steps[1] < steps[2]
    noises = [dp.epsilon(z, 0.25, 50, delta) for z in (0.8, 1.0, 2.0)]
    assert noises[0] > noises[1] > noises[2]
    rdp, pld = dp.epsilon(1.0, 0.25, 20, delta), dp.epsilon(1.0, 0.25, 20, delta, accountant="pld")
    assert pld <= rdp * 1.01 and pld > 0.6 * rdp  # RDP is an upper bound, PLD tighter but close
    assert dp.epsilon(1.0, 0.25, 0, delta) == 0.0
    with pytest.raises(ValueError, match="sampling_rate"):
        dp.epsilon(1.0, 0.0, 10, delta)
    with pytest.raises(ValueError, match="accountant"):
        dp.epsilon(1.0, 0.5, 10, delta, accountant="moments")
