"""DP-FedAvg with adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS
2021) as MAR-FL runs it over Moshpit groups, as pure functions, plus the privacy accounting with a real accountant.

Why pure functions: the ``moshpit`` algorithm applies them per participant (clip, noise, smoothing) and once per
aggregation (clip-norm update); keeping them free of networking lets the noise scale and the accounting be tested.

Per aggregation with m participants (noise multiplier z, clip norm C):

* delta = theta - theta_last_global; b = 1[||delta|| <= C]; delta~ = delta min(1, C / ||delta||).
* delta^ = delta~ + N(0, (z_delta C / sqrt(m))^2 I): each participant adds its share, so the *mean* over m participants
  carries noise of std z_delta C / m, the central-DP noise of a sum with sensitivity C and multiplier z_delta.
* s = 0.9 s + delta^ (s = delta^ at the first aggregation); theta_dp = theta_last + eta_s s, eta_s = 0.1.
* b~ = mean(b) + N(0, sigma_b^2) / m with sigma_b = m / 20, clamped to [0, 1] (post-processing, as MAR-FL);
  C <- C exp(-eta_C (b~ - gamma)), eta_C = 0.2, gamma = 0.5.
* z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the delta noise and the count noise together are one Gaussian mechanism of
  multiplier z (Andrew et al., Thm. 1), which needs z < 2 sigma_b. MAR-FL silently lowers z when that fails; here it
  is a ValueError naming the fields.

Accounting: the `dp-accounting` package (Google), a Poisson-subsampled Gaussian mechanism with sampling rate
q = m / N and multiplier z, one event per aggregation, composed ``steps`` times; RDP accountant by default (PLD on
request, tighter). MAR-FL's own "approximated"/"sweeped" formula is a small-q approximation and is not used.
Default delta = N^-1.1 (as MAR-FL).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

__all__ = [
    "BETA",
    "ETA_C",
    "ETA_S",
    "GAMMA",
    "clip_delta",
    "count_noise_std",
    "default_delta",
    "dp_params",
    "epsilon",
    "noise_multiplier_delta",
    "privatize_delta",
    "smooth",
    "unclipped_fraction_estimate",
    "update_clip_norm",
]

BETA = 0.9  # smoothing of the noisy deltas ("server momentum")
ETA_S = 0.1  # step size applied to the smoothed delta
ETA_C = 0.2  # geometric learning rate of the clip norm
GAMMA = 0.5  # target unclipped fraction


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _participants(m: int) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"participants must be an integer >= 1, got {m!r}")
    return m


def count_noise_std(participants: int) -> float:
    """sigma_b = m / 20: the std of the noise added to the *sum* of the unclipped bits."""
    return _participants(participants) / 20.0


def noise_multiplier_delta(noise_multiplier: float, participants: int) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), sigma_b = m / 20.

    Raises
    ------
    ValueError
        If noise_multiplier >= 2 sigma_b = m / 10 (then no z_delta exists; MAR-FL would silently lower z).
    """
    z = _positive("noise_multiplier", noise_multiplier)
    sigma_b = count_noise_std(participants)
    if z >= 2 * sigma_b:
        raise ValueError(f"noise_multiplier ({z}) must be < 2 sigma_b = participants / 10 = {2 * sigma_b} "
                         f"(participants={participants}): raise participants or lower noise_multiplier")
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


def clip_delta(delta: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, bool]:
    """Scale `delta` to L2 norm at most `clip_norm`; also return b = (||delta|| <= clip_norm)."""
    c = _positive("clip_norm", clip_norm)
    norm = float(torch.linalg.vector_norm(delta.to(torch.float64)))
    if norm <= c:
        return delta.clone(), True
    return delta * (c / norm), False


def privatize_delta(delta: torch.Tensor, clip_norm: float, noise_multiplier: float, participants: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, bool]:
    """One participant's share: clip `delta` to `clip_norm` and add N(0, (z_delta C / sqrt(m))^2) per entry.

    Returns
    -------
    (noisy delta, b)
        b is the unclipped bit of the raw delta.
    """
    z_delta = noise_multiplier_delta(noise_multiplier, participants)
    clipped, unclipped = clip_delta(delta, clip_norm)
    std = z_delta * float(clip_norm) / math.sqrt(participants)
    noise = torch.randn(clipped.shape, generator=generator, dtype=clipped.dtype, device=clipped.device) * std
    return clipped + noise, unclipped


def smooth(previous: torch.Tensor | None, noisy_delta: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """s <- beta s + delta^ (s = delta^ when there is no previous s)."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    return noisy_delta.clone() if previous is None else beta * previous + noisy_delta


def dp_params(theta_last: torch.Tensor, smoothed: torch.Tensor, eta_s: float = ETA_S) -> torch.Tensor:
    """theta_dp = theta_last_global + eta_s s."""
    return theta_last + _positive("eta_s", eta_s) * smoothed


def unclipped_fraction_estimate(bits: Sequence[bool | float], generator: torch.Generator) -> float:
    """b~ = mean(b) + N(0, sigma_b^2) / m with sigma_b = m / 20 (so the added std is 1/20), clamped to [0, 1]."""
    m = _participants(len(bits))
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_noise_std(m) / m
    return min(1.0, max(0.0, sum(float(b) for b in bits) / m + noise))


def update_clip_norm(clip_norm: float, unclipped_fraction: float, eta_c: float = ETA_C, gamma: float = GAMMA) -> float:
    """C <- C exp(-eta_C (b~ - gamma)): grows when fewer than gamma of the deltas were unclipped, shrinks otherwise."""
    c = _positive("clip_norm", clip_norm)
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    return c * math.exp(-_positive("eta_c", eta_c) * (float(unclipped_fraction) - gamma))


def default_delta(peers: int) -> float:
    """delta = N^-1.1 (MAR-FL's default)."""
    if isinstance(peers, bool) or not isinstance(peers, int) or peers < 2:
        raise ValueError(f"peers must be an integer >= 2, got {peers!r}")
    return peers**-1.1


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of `steps` compositions of a Poisson-subsampled Gaussian mechanism (rate q = m / N, multiplier z).

    Parameters
    ----------
    accountant
        ``"rdp"`` (dp_accounting.rdp.RdpAccountant, default orders) or ``"pld"`` (PLDAccountant, tighter).

    Raises
    ------
    ValueError
        On a non-positive noise_multiplier, a sampling_rate outside (0, 1], negative steps, delta outside (0, 1) or an
        unknown accountant.
    """
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    z = _positive("noise_multiplier", noise_multiplier)
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant == "rdp":
        acc = rdp_privacy_accountant.RdpAccountant()
    elif accountant == "pld":
        acc = pld_privacy_accountant.PLDAccountant()
    else:
        raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
    if steps == 0:
        return 0.0
    absl = logging.getLogger("absl")  # the RDP accountant warns for every low order it cannot evaluate (harmless: it skips it)
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(dp_event.PoissonSampledDpEvent(float(sampling_rate), dp_event.GaussianDpEvent(z)), steps)
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)
