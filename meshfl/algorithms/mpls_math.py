"""Pure maths of MPLS (Xu et al., "MPLS: Stacking Diverse Layers Into One Model for Decentralized Federated Learning",
Euro-Par 2025, LNCS 15900 pp. 190-204), kept apart from the algorithm module so that every equation can be unit tested
without a network, a clock or a training loop.

Why a separate module: the MPLS peer (and its baselines APPG, NetMax, Rand-MPLS, MPLS-Peer, MPLS-Layer) decides *what to
pull from whom* with a handful of closed-form formulas and one greedy list-scheduling algorithm (Algorithm 1). Those are
deterministic functions of measured link speeds, label histograms and per-layer scores; testing them in isolation pins the
paper's semantics (and the choices made where the paper is silent) before any asynchronous machinery runs them.

Notation (worker i, its S peers s, a model of L layers of sizes M_l):

* Eq. 1 `stack_layers`: w_i(l) <- (sum_s y_s(l) w_s(l) + w_i(l)) / (sum_s y_s(l) + 1).
* Eq. 2 `label_divergence`: DD_s = sum_c |p_i^c - p_s^c|.
* Eq. 3-4 `peer_probabilities`: p_s = (tau1 B_s / sum B + tau2 DD_s / sum DD) / (sum over s' of the same), tau1 + tau2 = 1.
* Eq. 5 `layer_scores`: g_s(l) = ||w_s^t(l) - w_s^t'(l)||^2. Eq. 6 `layer_probabilities`: q_s(l) = g_s(l) / sum_s' g_s'(l).
* Eq. 7-9 and Algorithm 1 `schedule`: list scheduling of layers onto peers minimising max_s sum_l y_s(l) M_l / B_s.

Choices where the paper is silent (each also documented on the function that makes it):

* Ties in Algorithm 1: the peer with the least sum(s), then the higher current rank(s), then the lower peer index; a
  peer's layers in descending E(s, l), then the larger mu1(s, l) (longest first, as in LPT list scheduling), then the
  lower layer index.
* Eligibility (Sect. 4, "Problem Transformation"): mu1(s, l) = inf where mu2(s, l) < theta(l) (so mu2 == theta is
  eligible, as in the algorithm's text; Sect. 3's "p q > theta" is strict), compared with a relative tolerance of 1e-9
  so that equal probabilities (theta is their mean) are never excluded by rounding. A peer with B_s = 0 is unreachable:
  mu1 = inf.
* A layer left unassigned by phase 1 (every peer's E for it <= 1/sqrt(S), e.g. always when S = 1) is taken from the
  peer with the least finite mu1 for it, *before* MAX is computed; a layer no peer can supply stays unassigned.
* Degenerate normalisations (all B, all DD or all g of a layer zero) fall back to uniform shares; a peer with no
  score yet (NaN in g) gets the uniform share 1/S of that layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "REL_TOL",
    "Schedule",
    "appg_mix",
    "cost_matrix",
    "fastest_assignment",
    "label_divergence",
    "label_divergences",
    "layer_probabilities",
    "layer_scores",
    "netmax_mix",
    "netmax_pick",
    "peer_probabilities",
    "pulled_layers",
    "random_layers",
    "schedule",
    "schedule_layer_only",
    "schedule_peer_only",
    "stack_layers",
    "uniform_layer_probabilities",
    "uniform_peer_probabilities",
]

REL_TOL = 1e-9
"""Relative tolerance of the eligibility test mu2(s, l) < theta(l) and of tau1 + tau2 == 1 (absolute there)."""


# ----------------------------------------------------------------------------------------------------------- validation


def _vector(name: str, value: Any, *, size: int | None = None, nonnegative: bool = True, allow_nan: bool = False) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if size is not None and arr.shape[0] != size:
        raise ValueError(f"{name}: expected length {size}, got {arr.shape[0]}")
    _check_values(name, arr, nonnegative=nonnegative, allow_nan=allow_nan)
    return arr


def _matrix(name: str, value: Any, *, shape: tuple[int, int] | None = None, allow_nan: bool = False) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    _check_values(name, arr, nonnegative=True, allow_nan=allow_nan)
    return arr


def _check_values(name: str, arr: np.ndarray, *, nonnegative: bool, allow_nan: bool) -> None:
    bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name}: values must be finite")
    if nonnegative and (arr < 0).any():
        raise ValueError(f"{name}: values must be non-negative")


def _share(x: np.ndarray) -> np.ndarray:
    """x / sum(x), or uniform when the sum is 0 (the degenerate case of Eq. 3 and Eq. 6)."""
    total = x.sum()
    if total > 0:
        return x / total
    return np.full(x.shape, 1.0 / x.size)


# ------------------------------------------------------------------------------------------------- peer selection (2-4)


def label_divergence(own: Any, peer: Any) -> float:
    """Eq. 2: the data divergence DD_s = sum_c |p_i^c - p_s^c| between two label distributions.

    Parameters
    ----------
    own, peer : array of shape (C,)
        Label proportions (or counts: each is normalised to sum 1 first; an all-zero histogram is uniform).

    Returns
    -------
    float
        The L1 distance of the two distributions, in [0, 2].
    """
    p_own = _vector("own", own)
    p_peer = _vector("peer", peer, size=p_own.shape[0])
    return float(np.abs(_share(p_own) - _share(p_peer)).sum())


def label_divergences(own: Any, peers: Any) -> np.ndarray:
    """Eq. 2 for all peers at once: row s of `peers` (shape (S, C)) is peer s's label distribution; returns DD of shape (S,)."""
    p_own = _vector("own", own)
    rows = _matrix("peers", peers)
    if rows.shape[1] != p_own.shape[0]:
        raise ValueError(f"peers: expected {p_own.shape[0]} classes per row, got {rows.shape[1]}")
    totals = rows.sum(axis=1, keepdims=True)
    shares = np.where(totals > 0, rows / np.where(totals > 0, totals, 1.0), 1.0 / rows.shape[1])
    return np.abs(shares - _share(p_own)[None, :]).sum(axis=1)


def peer_probabilities(bandwidth: Any, divergence: Any, tau1: float, tau2: float) -> np.ndarray:
    """Eq. 3-4: the probability p_s of pulling layers from peer s.

    Bbar_s = B_s / sum B and DDbar_s = DD_s / sum DD (Eq. 3); p_s = (tau1 Bbar_s + tau2 DDbar_s) / sum_s' (same) (Eq. 4).

    Parameters
    ----------
    bandwidth : array of shape (S,)
        Measured link speeds B_s (peer s -> this worker), >= 0. All zero: uniform Bbar.
    divergence : array of shape (S,)
        DD_s of Eq. 2, >= 0. All zero (identical label distributions): uniform DDbar.
    tau1, tau2 : float
        Weights in [0, 1] with tau1 + tau2 == 1 (within 1e-9).

    Returns
    -------
    numpy.ndarray of shape (S,)
        Non-negative, sums to 1. Since Bbar and DDbar each sum to 1, the denominator of Eq. 4 is tau1 + tau2 = 1.
    """
    b = _vector("bandwidth", bandwidth)
    if b.size == 0:
        raise ValueError("bandwidth: needs at least one peer")
    dd = _vector("divergence", divergence, size=b.size)
    for name, tau in (("tau1", tau1), ("tau2", tau2)):
        if not (math.isfinite(tau) and 0.0 <= tau <= 1.0):
            raise ValueError(f"{name}: must lie in [0, 1], got {tau}")
    if abs(tau1 + tau2 - 1.0) > REL_TOL:
        raise ValueError(f"tau1 + tau2 must equal 1, got {tau1} + {tau2} = {tau1 + tau2}")
    mix = tau1 * _share(b) + tau2 * _share(dd)
    return mix / mix.sum()


def uniform_peer_probabilities(num_peers: int) -> np.ndarray:
    """p_s = 1/S: MPLS-Layer (layer selection only) schedules with this in place of Eq. 4."""
    if num_peers < 1:
        raise ValueError(f"num_peers: must be >= 1, got {num_peers}")
    return np.full(num_peers, 1.0 / num_peers)


# ------------------------------------------------------------------------------------------------ layer selection (5-6)


def _to_numpy(name: str, layer: Any) -> np.ndarray:
    if isinstance(layer, torch.Tensor):
        return layer.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)
    try:
        return np.asarray(layer, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not a numeric array or tensor") from exc


def _shape(layer: Any) -> tuple[int, ...]:
    return tuple(layer.shape) if isinstance(layer, torch.Tensor) else tuple(np.shape(layer))


def layer_scores(previous: Sequence[Any], current: Sequence[Any]) -> np.ndarray:
    """Eq. 5: g(l) = ||w^t(l) - w^t'(l)||^2 of one peer between its two latest aggregations (epochs t' < t).

    Parameters
    ----------
    previous, current : sequence of L layers
        Each layer a torch tensor or a numpy array (any shape; the same shape in both). The peer computes this on its
        own models and sends only the L scalars.

    Returns
    -------
    numpy.ndarray of shape (L,), float64
    """
    if len(previous) != len(current):
        raise ValueError(f"current: expected {len(previous)} layers (as previous), got {len(current)}")
    out = np.empty(len(previous), dtype=np.float64)
    for li, (before, after) in enumerate(zip(previous, current, strict=True)):
        a, b = _to_numpy(f"previous[{li}]", before), _to_numpy(f"current[{li}]", after)
        if _shape(before) != _shape(after):
            raise ValueError(f"current[{li}]: shape {_shape(after)} differs from previous {_shape(before)}")
        diff = b - a
        out[li] = float(np.dot(diff, diff))
    if not np.isfinite(out).all():
        raise ValueError("current: layer scores must be finite")
    return out


def layer_probabilities(g: Any) -> np.ndarray:
    """Eq. 6: q_s(l) = g_s(l) / sum_s' g_s'(l), per layer (column) over the S peers.

    Parameters
    ----------
    g : array of shape (S, L)
        Row s holds peer s's Eq. 5 scores, >= 0. NaN marks a score not known yet (a peer that has not aggregated twice).

    Returns
    -------
    numpy.ndarray of shape (S, L)
        Each column sums to 1. A peer with a NaN score gets the uniform share 1/S of that layer; the peers with scores
        share the rest, 1 - (#NaN)/S, in proportion to g (uniformly if their g are all 0). A column of zeros, or of NaN
        only, is uniform.
    """
    scores = _matrix("g", g, allow_nan=True)
    num_peers = scores.shape[0]
    if num_peers == 0:
        raise ValueError("g: needs at least one peer (row)")
    missing = np.isnan(scores)
    known = np.where(missing, 0.0, scores)
    q = np.empty_like(scores)
    for li in range(scores.shape[1]):
        have = ~missing[:, li]
        rest = have.sum() / num_peers
        q[:, li] = 1.0 / num_peers
        if have.any():
            q[have, li] = rest * _share(known[have, li])
    return q


def uniform_layer_probabilities(num_peers: int, num_layers: int) -> np.ndarray:
    """q_s(l) = 1/S: MPLS-Peer (peer selection only) schedules with this in place of Eq. 6."""
    if num_peers < 1 or num_layers < 0:
        raise ValueError(f"num_peers, num_layers: need >= 1 and >= 0, got {num_peers}, {num_layers}")
    return np.full((num_peers, num_layers), 1.0 / num_peers)


# ------------------------------------------------------------------------------------------- aggregation strategy (7-9)


def cost_matrix(layer_sizes: Any, bandwidth: Any, p: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
    """The initialised and transformed mu1 of Algorithm 1 (Sect. 4), and the eligibility mask.

    mu1(s, l) = M_l / B_s; mu2(s, l) = p_s q_s(l); theta(l) = (1/S) sum_s mu2(s, l) (over all S peers, reachable or not);
    mu1(s, l) = inf where mu2(s, l) < theta(l) (relative tolerance `REL_TOL`, so equal mu2 are all eligible) or where
    B_s = 0 (an unreachable peer).

    Returns
    -------
    (mu1, eligible) : numpy.ndarray of shape (S, L) (float64 with inf) and the boolean mask where mu1 is finite.
    """
    sizes = _vector("layer_sizes", layer_sizes)
    b = _vector("bandwidth", bandwidth)
    if b.size == 0:
        raise ValueError("bandwidth: needs at least one peer")
    prob = _vector("p", p, size=b.size)
    lprob = _matrix("q", q, shape=(b.size, sizes.size))
    mu2 = prob[:, None] * lprob
    theta = mu2.mean(axis=0)
    eligible = ~(mu2 < theta[None, :] * (1.0 - REL_TOL)) & (b > 0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1 = np.where(eligible, sizes[None, :] / np.where(b > 0, b, 1.0)[:, None], np.inf)
    return mu1, eligible


def _efficiency(mu1: np.ndarray) -> np.ndarray:
    """Eq. 9: E(s, l) = phi(l) / mu1(s, l), phi(l) = min_s mu1(s, l); 0 where mu1 is infinite, 1 for a free (size 0) layer."""
    finite = np.isfinite(mu1)
    phi = np.where(finite, mu1, np.inf).min(axis=0, initial=np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(mu1 > 0, phi[None, :] / np.where(mu1 > 0, mu1, 1.0), 1.0)
    return np.where(finite, ratio, 0.0)


def fastest_assignment(mu1: Any) -> np.ndarray:
    """The naive plan: each layer from its fastest eligible peer alone (least mu1, ties: lower peer index); -1 if none."""
    cost = np.asarray(mu1, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"mu1: expected a 2-D array, got shape {cost.shape}")
    out = np.full(cost.shape[1], -1, dtype=np.int64)
    finite = np.isfinite(cost)
    if cost.shape[0]:
        best = np.argmin(np.where(finite, cost, np.inf), axis=0)
        out = np.where(finite.any(axis=0), best, -1)
    return out


def _times(mu1: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.where(y, mu1, 0.0).sum(axis=1)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr = np.array(arr, copy=True)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class Schedule:
    """The aggregation strategy of one iteration (output of `schedule`). Arrays are read-only copies.

    Attributes
    ----------
    y : bool array (S, L)
        y_s(l) of Eq. 1: pull layer l from peer s (phase 1, fallback and extra layers).
    assignment : int array (L,)
        pi(l) after phase 1 and the fallback (one peer per layer), -1 for a layer no peer can supply.
    fallback : bool array (L,)
        Layers that phase 1 left unassigned and the fallback gave to their fastest eligible peer.
    assigned_time : float array (S,)
        sum(s) after phase 1 and the fallback; MAX = its maximum.
    time : float array (S,)
        sum(s) = lambda_s of Eq. 7 for the final y.
    delay : float
        lambda = max_s time(s) (0 when nothing is pulled).
    mu1, efficiency : float arrays (S, L)
        The transformed mu1 (inf = not eligible) and E of Eq. 9.
    threshold : float
        1/sqrt(S), the efficiency bound of line 9.
    guarded : bool
        True when `guard` replaced the list-scheduling assignment by the fastest-peer plan.
    """

    y: np.ndarray
    assignment: np.ndarray
    fallback: np.ndarray
    assigned_time: np.ndarray
    time: np.ndarray
    delay: float
    mu1: np.ndarray = field(repr=False)
    efficiency: np.ndarray = field(repr=False)
    threshold: float
    guarded: bool = False

    @property
    def num_peers(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.y.shape[1])

    def layers_from(self, peer: int) -> tuple[int, ...]:
        """The layers pulled from `peer`, ascending."""
        if not 0 <= peer < self.num_peers:
            raise ValueError(f"peer: expected 0 <= peer < {self.num_peers}, got {peer}")
        return tuple(int(li) for li in np.flatnonzero(self.y[peer]))

    def peers_for(self, layer: int) -> tuple[int, ...]:
        """The peers layer `layer` is pulled from, ascending (empty if none can supply it)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        return tuple(int(s) for s in np.flatnonzero(self.y[:, layer]))

    def unassigned(self) -> tuple[int, ...]:
        """Layers pulled from nobody (no peer has a finite mu1 for them)."""
        return tuple(int(li) for li in np.flatnonzero(~self.y.any(axis=0)))


def schedule(layer_sizes: Any, bandwidth: Any, p: Any, q: Any, *, extra: bool = True, guard: bool = False) -> Schedule:
    """Algorithm 1: which layers to pull from which peers this iteration (list scheduling, Eq. 7-9).

    1. Initialisation and transformation (`cost_matrix`): mu1(s, l) = M_l / B_s, inf where p_s q_s(l) < theta(l) or
       B_s = 0. E(s, l) = min_s' mu1(s', l) / mu1(s, l) (0 where mu1 = inf); rank(s) = sum_l E(s, l).
    2. Phase 1 (lines 6-14): while layers are unassigned and peers available, take the available peer with the least
       sum(s) (ties: higher current rank(s), then lower index); take its unassigned layer with the highest E(s, l) (ties:
       larger mu1(s, l), then lower layer index); if E <= 1/sqrt(S) the peer leaves the available set, else the layer is
       assigned to it: sum(s) += mu1(s, l), rank(s) -= E(s, l).
    3. Fallback (not in the paper, which loops "while Q1 != {}" although Q2 may run empty): a layer still unassigned is
       pulled from the peer with the least finite mu1 for it (ties: lower index), so every layer that some peer can
       supply is assigned. This always happens with S = 1 (the only E is 1 = 1/sqrt(1)). It runs before MAX.
    4. Extra layers (lines 15-22, if `extra`): MAX = max_s sum(s); each peer s in index order scans its layers in the
       order of step 2 and also supplies each layer not yet pulled from it with finite mu1(s, l) while
       sum(s) + mu1(s, l) <= MAX. A layer may then come from several peers; the delay is unchanged.

    Parameters
    ----------
    layer_sizes : array (L,)
        M_l (bytes, parameters, any unit consistent with `bandwidth`), >= 0.
    bandwidth : array (S,)
        B_s, the measured link speed peer s -> this worker, >= 0; 0 = unreachable.
    p : array (S,)
        Peer probabilities (Eq. 4), >= 0.
    q : array (S, L)
        Layer probabilities (Eq. 6), >= 0.
    extra : bool
        Run step 4 (MPLS does; False gives the one-peer-per-layer assignment of phase 1 + fallback).
    guard : bool
        If the assignment of steps 2-3 is slower than the naive plan (each layer from its fastest eligible peer,
        `fastest_assignment`), use the naive plan instead (before step 4). Off by default (the paper has no such
        step); with it, ``delay <= naive delay`` always holds. Without it, phase 1 can be slower: a peer with the least
        sum may take a layer at efficiency just above 1/sqrt(S) that its fastest peer would have finished sooner.

    Returns
    -------
    Schedule

    Notes
    -----
    Provable without `guard`: every assigned layer has mu1(s, l) < sqrt(S) phi(l) (or is its fastest peer's), so
    ``delay <= sqrt(S) * sum_l phi(l)`` over the assignable layers; the extra phase never raises the delay.
    """
    mu1, _eligible = cost_matrix(layer_sizes, bandwidth, p, q)
    num_peers, num_layers = mu1.shape
    eff = _efficiency(mu1)
    threshold = 1.0 / math.sqrt(num_peers)

    # Each peer's list: descending E, then longest first, then lower layer index (np.lexsort: last key is primary).
    layer_idx = np.arange(num_layers)
    orders = [np.lexsort((layer_idx, -np.where(np.isfinite(mu1[s]), mu1[s], 0.0), -eff[s])) for s in range(num_peers)]

    assignment = np.full(num_layers, -1, dtype=np.int64)
    sums = np.zeros(num_peers)
    rank = eff.sum(axis=1)
    available = np.ones(num_peers, dtype=bool)
    cursor = np.zeros(num_peers, dtype=np.int64)
    remaining = num_layers
    while remaining and available.any():
        cands = np.flatnonzero(available)
        peer = int(min(cands, key=lambda s: (sums[s], -rank[s], s)))
        order = orders[peer]
        while assignment[order[cursor[peer]]] != -1:
            cursor[peer] += 1
        layer = int(order[cursor[peer]])
        if eff[peer, layer] <= threshold:
            available[peer] = False
            continue
        assignment[layer] = peer
        sums[peer] += mu1[peer, layer]
        rank[peer] -= eff[peer, layer]
        remaining -= 1

    fastest = fastest_assignment(mu1)
    fallback = (assignment == -1) & (fastest >= 0)
    for layer in np.flatnonzero(fallback):
        assignment[layer] = fastest[layer]
        sums[fastest[layer]] += mu1[fastest[layer], layer]

    guarded = False
    if guard:
        naive_times = _times(mu1, _onehot(fastest, num_peers))
        if naive_times.max(initial=0.0) < sums.max(initial=0.0):
            assignment, sums, guarded = fastest.copy(), naive_times, True
            fallback = np.zeros(num_layers, dtype=bool)

    y = _onehot(assignment, num_peers)
    assigned_time = sums.copy()
    if extra and num_peers and num_layers:
        ceiling = float(sums.max())
        for s in range(num_peers):
            for layer in orders[s]:
                cost = mu1[s, layer]
                if not y[s, layer] and np.isfinite(cost) and sums[s] + cost <= ceiling:
                    y[s, layer] = True
                    sums[s] += cost
    delay = float(sums.max(initial=0.0))
    return Schedule(
        y=_frozen(y),
        assignment=_frozen(assignment),
        fallback=_frozen(fallback),
        assigned_time=_frozen(assigned_time),
        time=_frozen(sums),
        delay=delay,
        mu1=_frozen(mu1),
        efficiency=_frozen(eff),
        threshold=threshold,
        guarded=guarded,
    )


def _onehot(assignment: np.ndarray, num_peers: int) -> np.ndarray:
    y = np.zeros((num_peers, assignment.size), dtype=bool)
    ok = assignment >= 0
    y[assignment[ok], np.flatnonzero(ok)] = True
    return y


def schedule_peer_only(layer_sizes: Any, bandwidth: Any, p: Any, **kwargs: bool) -> Schedule:
    """MPLS-Peer: peer selection only, i.e. `schedule` with uniform q (so theta excludes the peers with p_s < mean p)."""
    b = _vector("bandwidth", bandwidth)
    sizes = _vector("layer_sizes", layer_sizes)
    return schedule(sizes, b, p, uniform_layer_probabilities(max(b.size, 1), sizes.size), **kwargs)


def schedule_layer_only(layer_sizes: Any, bandwidth: Any, q: Any, **kwargs: bool) -> Schedule:
    """MPLS-Layer: layer selection only, i.e. `schedule` with uniform p (theta(l) then filters on q alone)."""
    b = _vector("bandwidth", bandwidth)
    return schedule(layer_sizes, b, uniform_peer_probabilities(max(b.size, 1)), q, **kwargs)


# ------------------------------------------------------------------------------------------------------ averaging (1)


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not a numeric array or tensor") from exc


def stack_layers(own: Sequence[Any], pulled: Mapping[int, Sequence[Any]]) -> list[torch.Tensor]:
    """Eq. 1: w_i(l) <- (sum_s y_s(l) w_s(l) + w_i(l)) / (sum_s y_s(l) + 1), layer by layer.

    Parameters
    ----------
    own : sequence of L tensors (or arrays)
        This worker's model after local training, one tensor per layer.
    pulled : mapping layer index -> sequence of tensors
        The copies of layer l pulled from peers (those s with y_s(l) = 1); a missing or empty entry means none.

    Returns
    -------
    list of L new tensors
        Same shapes and dtype as `own` (float tensors; float32 for arrays), summed in float64 (the order of the
        peers does not change the result beyond the final rounding). Inputs are not modified; with nothing pulled the
        result equals `own`.
    """
    layers = [_as_tensor(f"own[{li}]", w) for li, w in enumerate(own)]
    for li in pulled:
        if not (isinstance(li, int | np.integer) and 0 <= li < len(layers)):
            raise ValueError(f"pulled: layer index {li!r} out of range 0..{len(layers) - 1}")
    out: list[torch.Tensor] = []
    for li, mine in enumerate(layers):
        dtype = mine.dtype if mine.is_floating_point() else torch.float32
        total = mine.to(torch.float64).clone()
        copies = pulled.get(li, ())
        for j, w in enumerate(copies):
            other = _as_tensor(f"pulled[{li}][{j}]", w)
            if other.shape != mine.shape:
                raise ValueError(f"pulled[{li}][{j}]: shape {tuple(other.shape)} differs from own[{li}] {tuple(mine.shape)}")
            total += other.to(device=mine.device, dtype=torch.float64)
        out.append((total / (len(copies) + 1)).to(dtype))
    return out


def pulled_layers(y: Any, peer_layers: Sequence[Mapping[int, Any] | Sequence[Any]]) -> dict[int, list[Any]]:
    """The `pulled` argument of `stack_layers` from a schedule's y (S, L) and the layers received from each peer.

    `peer_layers[s]` maps (or indexes) layer l -> peer s's copy; every (s, l) with y_s(l) must be present. Peers are
    listed in ascending index per layer.
    """
    mask = np.asarray(y, dtype=bool)
    if mask.ndim != 2 or mask.shape[0] != len(peer_layers):
        raise ValueError(f"y: expected shape ({len(peer_layers)}, L), got {mask.shape}")
    out: dict[int, list[Any]] = {}
    for li in range(mask.shape[1]):
        for s in np.flatnonzero(mask[:, li]):
            try:
                out.setdefault(li, []).append(peer_layers[int(s)][li])
            except (KeyError, IndexError) as exc:
                raise ValueError(f"peer_layers: peer {int(s)} did not supply layer {li}") from exc
    return out


# ------------------------------------------------------------------------------------------------------- baselines


def appg_mix(own: Sequence[Any], peers: Sequence[Sequence[Any]]) -> list[torch.Tensor]:
    """APPG (Zhang & You 2019): w_i <- (sum_j w_j + w_i) / (1 + deg), whole models from all connected peers.

    `own` is a list of L layers; `peers` a list of deg such lists. Eq. 1 with y = 1 everywhere.
    """
    for j, model in enumerate(peers):
        if len(model) != len(own):
            raise ValueError(f"peers[{j}]: expected {len(own)} layers, got {len(model)}")
    return stack_layers(own, {li: [model[li] for model in peers] for li in range(len(own))})


def netmax_mix(own: Sequence[Any], peer: Sequence[Any]) -> list[torch.Tensor]:
    """NetMax (Zhou et al., ICDE 2021) averaging: w_i <- (w_i + w_j) / 2 with the one chosen peer j's whole model."""
    return appg_mix(own, [peer])


def netmax_pick(bandwidth: Any, rng: np.random.Generator, *, greedy: bool = False) -> int:
    """NetMax's peer choice: one peer, with probability proportional to its link speed B_s.

    NetMax (ICDE 2021) samples peers with link-speed-dependent probabilities (the original derives them from an
    optimisation over measured speeds; proportional-to-speed is the simple form used here). The MPLS paper describes
    it as pulling "from the peers with the highest bandwidth": `greedy=True` returns argmax B (ties: lower index).
    Unreachable peers (B_s = 0) are never picked; with no reachable peer this raises ValueError.
    """
    b = _vector("bandwidth", bandwidth)
    if b.size == 0 or b.sum() <= 0:
        raise ValueError("bandwidth: no reachable peer (all link speeds are 0)")
    if greedy:
        return int(np.argmax(b))
    return int(rng.choice(b.size, p=b / b.sum()))


def random_layers(num_peers: int, num_layers: int, rng: np.random.Generator, reachable: Any = None) -> np.ndarray:
    """Rand-MPLS: each layer from one peer drawn uniformly (among `reachable`, a bool mask (S,), default all).

    Returns y of shape (S, L), bool, exactly one True per column.
    """
    if num_peers < 1 or num_layers < 0:
        raise ValueError(f"num_peers, num_layers: need >= 1 and >= 0, got {num_peers}, {num_layers}")
    ok = np.ones(num_peers, dtype=bool) if reachable is None else np.asarray(reachable, dtype=bool)
    if ok.shape != (num_peers,):
        raise ValueError(f"reachable: expected shape ({num_peers},), got {ok.shape}")
    if not ok.any():
        raise ValueError("reachable: no reachable peer")
    choices = np.flatnonzero(ok)[rng.integers(0, int(ok.sum()), size=num_layers)]
    y = np.zeros((num_peers, num_layers), dtype=bool)
    y[choices, np.arange(num_layers)] = True
    return y
