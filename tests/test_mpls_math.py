"""Unit and property tests of the MPLS maths (meshfl.algorithms.mpls_math): Eq. 1-9 and Algorithm 1 of Xu et al.,
Euro-Par 2025, plus the baselines' pure choices. Fast: no training, no network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from meshfl.algorithms import mpls_math as mm

CASES = 200


# ------------------------------------------------------------------------------------------------ worked example (Fig. 4)

# Peers of worker #3, in index order: workers #1, #2, #4, #5 (S = 4, so the efficiency bound is 1/sqrt(4) = 0.5).
# Layers P1..P4 of sizes M (Mbit); link speeds B (Mbit/s). tau1 = 1, tau2 = 0 (peer probability = link-speed share).
FIG4_SIZES = [4.0, 3.0, 3.0, 1.0]


def _fig4_inputs(bandwidth: list[float], g: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    p = mm.peer_probabilities(bandwidth, [0.0, 0.0, 0.0, 0.0], tau1=1.0, tau2=0.0)
    return p, mm.layer_probabilities(g)


def test_worked_example_fig4_iteration_k() -> None:
    """Paper, Sect. 3.2 "Model Collection and Averaging" (p. 195) and Fig. 4: 5 workers, a DNN of 4 layers P1..P4;
    at local iteration k worker #3 pulls {P1, P4} from #1, {P2} from #2 and {P3} from #4.

    The paper gives this assignment only, no layer sizes, link speeds or scores (and no numeric example of
    Algorithm 1 anywhere), so the numbers here are ours, chosen so that Algorithm 1 produces exactly Fig. 4:
    B = (4, 3, 3, 4) for #1, #2, #4, #5; worker #5 is a straggler whose model did not change (g = 0, so q_5 = 0 and
    mu2 < theta: it is filtered out). Trace (E = 1 for #1, 0.75 for #2 and #4, 0 for #5; rank 4, 3, 3, 0):
    #1 takes P1 (4/4 = 1); #2 (sum 0, rank 3, lower index than #4) takes P2 (3/3 = 1); #4 takes P3 (1); #5's best
    E is 0 <= 0.5: it leaves. Sums tie at 1: #1 has the higher rank (3 > 2.25) and takes P4 (+1/4). MAX = 1.25 and no
    peer can add a layer within it (#2 or #4 + P4 = 1 + 1/3 > 1.25). Delay 1.25 (each layer from #1 alone: 11/4).
    """
    p, q = _fig4_inputs([4.0, 3.0, 3.0, 4.0], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    sched = mm.schedule(FIG4_SIZES, [4.0, 3.0, 3.0, 4.0], p, q)
    assert sched.layers_from(0) == (0, 3)  # #1: P1, P4
    assert sched.layers_from(1) == (1,)  # #2: P2
    assert sched.layers_from(2) == (2,)  # #4: P3
    assert sched.layers_from(3) == ()  # #5: nothing
    assert sched.assignment.tolist() == [0, 1, 2, 0]
    assert not sched.fallback.any()
    np.testing.assert_allclose(sched.time, [1.25, 1.0, 1.0, 0.0])
    assert sched.delay == pytest.approx(1.25)
    assert not np.isfinite(sched.mu1[3]).any()  # #5 filtered by theta, not by bandwidth
    assert mm.schedule(FIG4_SIZES, [4.0, 3.0, 3.0, 4.0], p, q, extra=False).y.tolist() == sched.y.tolist()


def test_worked_example_fig4_iteration_k_plus_1() -> None:
    """Paper, Sect. 3.2 and Fig. 4 (p. 195), iteration k + 1: the link #3-#4 is broken and worker #3 pulls {P2} from #1
    and {P1, P3, P4} from #2 ("aggregating the same layer from different peers across epochs").

    Our numbers: B = (2, 3, 0, 4) (#4 unreachable: B = 0; #1 slowed down); g_1 = (0, 1, 1, 0) (#1's P1 and P4 did not
    change), g_2 = g_4 = 1, g_5 = 0. So P1 and P4 are eligible only from #2, P2 and P3 from #1 and #2. E(#1, P2/P3) =
    2/3, every E of #2 is 1; rank(#1) = 4/3, rank(#2) = 4. Trace: #2 (highest rank) takes P1 (4/3); #1 takes P2 (3/2);
    #4 and #5 (all E = 0) leave; #2 (4/3 < 3/2) takes P3 (+1, 7/3); #1's next layer P4 has E = 0: it leaves; #2 takes
    P4 (+1/3, 8/3). MAX = 8/3; #1 cannot add P3 (3/2 + 3/2 = 3 > 8/3). Delay 8/3.
    """
    bandwidth = [2.0, 3.0, 0.0, 4.0]
    p, q = _fig4_inputs(bandwidth, [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    sched = mm.schedule(FIG4_SIZES, bandwidth, p, q)
    assert sched.layers_from(0) == (1,)  # #1: P2
    assert sched.layers_from(1) == (0, 2, 3)  # #2: P1, P3, P4
    assert sched.layers_from(2) == sched.layers_from(3) == ()
    assert sched.peers_for(0) == (1,)
    np.testing.assert_allclose(sched.time, [1.5, 8 / 3, 0.0, 0.0])
    assert sched.delay == pytest.approx(8 / 3)


def test_worked_example_fig4_averaging() -> None:
    """Eq. 1 on Fig. 4, iteration k: each layer averaged with the one copy pulled (weight 1/2 each)."""
    own = [torch.full((2,), 1.0) for _ in range(4)]
    peers = [[torch.full((2,), 10.0 * (s + 1) + li) for li in range(4)] for s in range(4)]
    y = np.zeros((4, 4), dtype=bool)
    y[0, [0, 3]] = y[1, 1] = y[2, 2] = True
    out = mm.stack_layers(own, mm.pulled_layers(y, peers))
    assert [float(t[0]) for t in out] == [(1 + 10) / 2, (1 + 21) / 2, (1 + 32) / 2, (1 + 13) / 2]


# ------------------------------------------------------------------------------------------------------- Eq. 2-4


def test_label_divergence_by_hand() -> None:
    assert mm.label_divergence([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]) == pytest.approx(1.0)
    assert mm.label_divergence([1, 0], [1, 0]) == 0.0
    assert mm.label_divergence([30, 10], [1, 1]) == pytest.approx(0.5)  # counts are normalised: |.75-.5| + |.25-.5|
    rows = [[0.0, 1.0], [0.5, 0.5], [0.0, 0.0]]
    np.testing.assert_allclose(mm.label_divergences([1.0, 0.0], rows), [mm.label_divergence([1.0, 0.0], r) for r in rows])


def test_peer_probabilities_by_hand() -> None:
    # Bbar = (.25, .75), DDbar = (.5, .5); p = .5 Bbar + .5 DDbar = (.375, .625)
    np.testing.assert_allclose(mm.peer_probabilities([1.0, 3.0], [0.5, 0.5], 0.5, 0.5), [0.375, 0.625])
    np.testing.assert_allclose(mm.peer_probabilities([1.0, 3.0], [0.2, 0.6], 0.0, 1.0), [0.25, 0.75])
    # Bbar = (.25, .25, .5), all-zero DD is uniform: DDbar = 1/3 each
    np.testing.assert_allclose(
        mm.peer_probabilities([2.0, 2.0, 4.0], [0.0, 0.0, 0.0], 0.3, 0.7),
        [0.3 * 0.25 + 0.7 / 3, 0.3 * 0.25 + 0.7 / 3, 0.3 * 0.5 + 0.7 / 3],
    )
    # all-zero divergence and all-zero bandwidth are uniform
    np.testing.assert_allclose(mm.peer_probabilities([0.0, 0.0], [0.0, 0.0], 0.5, 0.5), [0.5, 0.5])


def test_peer_probabilities_random_sum_to_one() -> None:
    for seed in range(CASES):
        rng = np.random.default_rng(seed)
        size = int(rng.integers(1, 9))
        tau1 = float(rng.uniform())
        p = mm.peer_probabilities(rng.uniform(0, 5, size), rng.uniform(0, 2, size), tau1, 1.0 - tau1)
        assert p.sum() == pytest.approx(1.0) and (p >= 0).all()


# ------------------------------------------------------------------------------------------------------- Eq. 5-6


def test_layer_scores_numpy_and_torch() -> None:
    prev = [np.zeros((1, 2)), np.ones(3)]
    cur = [np.array([[3.0, 4.0]]), np.ones(3)]
    np.testing.assert_allclose(mm.layer_scores(prev, cur), [25.0, 0.0])
    tprev = [torch.zeros(1, 2), torch.ones(3, dtype=torch.float32)]
    tcur = [torch.tensor([[3.0, 4.0]]), torch.ones(3)]
    np.testing.assert_allclose(mm.layer_scores(tprev, tcur), [25.0, 0.0])
    assert mm.layer_scores(tprev, tcur).dtype == np.float64


def test_layer_probabilities_by_hand() -> None:
    np.testing.assert_allclose(mm.layer_probabilities([[1.0, 0.0], [3.0, 0.0]]), [[0.25, 0.5], [0.75, 0.5]])
    # peer 0 has no score yet: uniform 1/3; peers 1, 2 share 2/3 as 1 : 3
    np.testing.assert_allclose(mm.layer_probabilities([[np.nan], [1.0], [3.0]])[:, 0], [1 / 3, 2 / 3 / 4, 2 / 3 * 3 / 4])
    np.testing.assert_allclose(mm.layer_probabilities([[np.nan], [np.nan]]), [[0.5], [0.5]])
    np.testing.assert_allclose(mm.layer_probabilities([[np.nan], [0.0], [0.0]])[:, 0], [1 / 3, 1 / 3, 1 / 3])


def test_layer_probabilities_columns_sum_to_one() -> None:
    for seed in range(CASES):
        rng = np.random.default_rng(seed)
        g = rng.uniform(0, 1, (int(rng.integers(1, 6)), int(rng.integers(1, 6))))
        g[rng.uniform(size=g.shape) < 0.2] = np.nan
        g[rng.uniform(size=g.shape) < 0.2] = 0.0
        q = mm.layer_probabilities(g)
        np.testing.assert_allclose(q.sum(axis=0), 1.0)
        assert (q >= 0).all()


# ----------------------------------------------------------------------------------------------- schedule, by hand


def test_eligibility_theta_filters() -> None:
    # mu2 column for layer 0: p q = (.5*.8, .25*.1, .25*.1) = (.4, .025, .025); theta = .15: only peer 0.
    mu1, eligible = mm.cost_matrix([2.0], [1.0, 4.0, 4.0], [0.5, 0.25, 0.25], [[0.8], [0.1], [0.1]])
    assert eligible[:, 0].tolist() == [True, False, False]
    assert mu1[0, 0] == 2.0 and math.isinf(mu1[1, 0])
    # uniform p and q: every mu2 equals theta and every peer stays eligible despite rounding (S = 3)
    _, eligible = mm.cost_matrix([1.0] * 5, [1.0] * 3, mm.uniform_peer_probabilities(3), mm.uniform_layer_probabilities(3, 5))
    assert eligible.all()


def test_efficiency_threshold_drops_slow_peer() -> None:
    """S = 2, bound 1/sqrt(2) ~ 0.707: a peer at 0.7 of the fastest speed is never used in phase 1."""
    sched = mm.schedule([1.0, 1.0, 1.0], [1.0, 0.7], [0.5, 0.5], mm.uniform_layer_probabilities(2, 3), extra=False)
    assert sched.assignment.tolist() == [0, 0, 0]
    assert sched.delay == pytest.approx(3.0)
    fast = mm.schedule([1.0, 1.0, 1.0], [1.0, 0.8], [0.5, 0.5], mm.uniform_layer_probabilities(2, 3), extra=False)
    assert fast.assignment.tolist() == [0, 1, 0]  # 0.8 > 0.707: the second peer takes a layer while its sum is least
    assert fast.delay == pytest.approx(2.0)


def test_extra_layers_fill_up_to_max() -> None:
    """Sizes (4, 1, 1, 1), B = (1, 2), S = 2: E(#0) = 0.5 <= 1/sqrt(2), so phase 1 gives every layer to #1 (sum 7/2).
    Extra phase: MAX = 3.5; #0 (sum 0) scans longest first: P1 costs 4 > 3.5, then P2, P3, P4 (1 each) fit (sum 3)."""
    sched = mm.schedule([4.0, 1.0, 1.0, 1.0], [1.0, 2.0], [0.5, 0.5], mm.uniform_layer_probabilities(2, 4))
    assert sched.assignment.tolist() == [1, 1, 1, 1]
    assert sched.delay == pytest.approx(3.5)
    assert sched.layers_from(0) == (1, 2, 3)
    np.testing.assert_allclose(sched.time, [3.0, 3.5])
    assert sched.peers_for(1) == (0, 1)
    assert (
        mm.schedule([4.0, 1.0, 1.0, 1.0], [1.0, 2.0], [0.5, 0.5], mm.uniform_layer_probabilities(2, 4), extra=False).y[0].sum()
        == 0
    )


def test_single_peer_fallback() -> None:
    """S = 1: E = 1 = 1/sqrt(1) drops the only peer at once; the fallback pulls every layer from it."""
    sched = mm.schedule([1.0, 2.0], [2.0], [1.0], [[1.0, 1.0]])
    assert sched.assignment.tolist() == [0, 0]
    assert sched.fallback.tolist() == [True, True]
    assert sched.delay == pytest.approx(1.5)


def test_unreachable_peers_and_unassignable_layer() -> None:
    sched = mm.schedule([1.0, 1.0], [0.0, 0.0], [0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]])
    assert sched.unassigned() == (0, 1)
    assert sched.delay == 0.0 and sched.assignment.tolist() == [-1, -1]
    assert sched.peers_for(0) == ()
    one = mm.schedule([1.0, 1.0], [0.0, 5.0, 0.0], [1 / 3] * 3, mm.uniform_layer_probabilities(3, 2))
    assert one.layers_from(1) == (0, 1) and one.layers_from(0) == one.layers_from(2) == ()


def test_naive_bound_counterexample_and_guard() -> None:
    """Algorithm 1 can be slower than pulling each layer from its fastest peer: two unit layers, L1 eligible from
    peers A (B=1) and C (B=0.6), L2 from B (B=1) and C. C's rank (0.6 + 0.6) beats A's and B's (1), so with all sums 0
    C goes first and takes L1 at E = 0.6 > 1/sqrt(3): delay 1/0.6 against 1 for the fastest-peer plan. `guard`
    falls back to that plan."""
    args = ([1.0, 1.0], [1.0, 1.0, 0.6], mm.uniform_peer_probabilities(3), [[0.5, 0.0], [0.0, 0.5], [0.5, 0.5]])
    plain = mm.schedule(*args, extra=False)
    assert plain.assignment.tolist() == [2, 1]
    assert plain.delay == pytest.approx(1 / 0.6)
    guarded = mm.schedule(*args, guard=True)
    assert guarded.guarded and guarded.assignment.tolist() == [0, 1]
    assert guarded.delay == pytest.approx(1.0)


def test_variants_reuse_schedule() -> None:
    sizes, bandwidth = [2.0, 1.0, 1.0], [1.0, 2.0, 3.0]
    p = mm.peer_probabilities(bandwidth, [0.1, 0.1, 0.1], 0.5, 0.5)
    q = mm.layer_probabilities([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    peer_only = mm.schedule_peer_only(sizes, bandwidth, p)
    assert peer_only.y.tolist() == mm.schedule(sizes, bandwidth, p, mm.uniform_layer_probabilities(3, 3)).y.tolist()
    layer_only = mm.schedule_layer_only(sizes, bandwidth, q, extra=False)
    assert layer_only.y.tolist() == mm.schedule(sizes, bandwidth, mm.uniform_peer_probabilities(3), q, extra=False).y.tolist()


def test_schedule_is_read_only() -> None:
    sched = mm.schedule([1.0], [1.0, 1.0], [0.5, 0.5], [[0.5], [0.5]])
    with pytest.raises(ValueError):
        sched.y[0, 0] = False
    with pytest.raises(ValueError, match="peer"):
        sched.layers_from(2)
    with pytest.raises(ValueError, match="layer"):
        sched.peers_for(-1)


# ----------------------------------------------------------------------------------------------- schedule, properties


def _random_instance(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    peers, layers = int(rng.integers(1, 8)), int(rng.integers(1, 10))
    sizes = rng.integers(0, 20, layers).astype(float) if rng.uniform() < 0.5 else rng.uniform(0.01, 50, layers)
    bandwidth = rng.uniform(0.1, 10, peers)
    bandwidth[rng.uniform(size=peers) < 0.2] = 0.0
    if rng.uniform() < 0.3:
        bandwidth = rng.integers(0, 3, peers).astype(float)  # many ties
    p = mm.peer_probabilities(bandwidth, rng.uniform(0, 1, peers), 0.5, 0.5)
    g = rng.uniform(0, 1, (peers, layers))
    g[rng.uniform(size=g.shape) < 0.15] = np.nan
    q = mm.layer_probabilities(g)
    if rng.uniform() < 0.25:
        p = mm.uniform_peer_probabilities(peers)
    if rng.uniform() < 0.25:
        q = mm.uniform_layer_probabilities(peers, layers)
    return sizes, bandwidth, p, q


def _naive_delay(mu1: np.ndarray) -> float:
    best = mm.fastest_assignment(mu1)
    times = np.zeros(mu1.shape[0])
    for layer, peer in enumerate(best):
        if peer >= 0:
            times[peer] += mu1[peer, layer]
    return float(times.max())


def test_every_suppliable_layer_is_assigned() -> None:
    for seed in range(CASES):
        sched = mm.schedule(*_random_instance(seed))
        finite = np.isfinite(sched.mu1)
        assert (sched.y.any(axis=0) == finite.any(axis=0)).all(), seed
        assert not (sched.y & ~finite).any(), seed  # never pulls a layer at infinite cost
        assert ((sched.assignment >= 0) == finite.any(axis=0)).all(), seed


def test_extra_phase_never_raises_delay() -> None:
    for seed in range(CASES):
        inst = _random_instance(seed)
        with_extra, without = mm.schedule(*inst), mm.schedule(*inst, extra=False)
        assert with_extra.delay == without.delay, seed
        assert (with_extra.y >= without.y).all(), seed
        assert (with_extra.assignment == without.assignment).all(), seed
        np.testing.assert_allclose(with_extra.time, np.where(with_extra.y, with_extra.mu1, 0.0).sum(axis=1))
        assert with_extra.time.max(initial=0.0) == with_extra.delay


def test_delay_bounds() -> None:
    """With `guard`, delay <= the fastest-peer plan's delay (the issue's claim). Without it (the paper's algorithm)
    that can fail (see test_naive_bound_counterexample_and_guard); what always holds is that every phase-1 layer has
    E > 1/sqrt(S), i.e. mu1 < sqrt(S) phi(l), hence delay <= sqrt(S) * sum_l phi(l)."""
    for seed in range(CASES):
        inst = _random_instance(seed)
        plain, guarded = mm.schedule(*inst), mm.schedule(*inst, guard=True)
        naive = _naive_delay(plain.mu1)
        assert guarded.delay <= naive + 1e-12, seed
        assert guarded.delay <= plain.delay + 1e-12, seed
        finite = np.isfinite(plain.mu1)
        phi = np.where(finite, plain.mu1, np.inf).min(axis=0)
        bound = math.sqrt(plain.num_peers) * phi[finite.any(axis=0)].sum()
        assert plain.delay <= bound + 1e-9, seed
        picked = (plain.assignment >= 0) & ~plain.fallback
        eff = plain.efficiency[plain.assignment[picked], np.flatnonzero(picked)]
        assert (eff > plain.threshold).all(), seed


def test_schedule_is_deterministic_and_order_free_of_state() -> None:
    for seed in range(0, CASES, 10):
        inst = _random_instance(seed)
        a, b = mm.schedule(*inst), mm.schedule(*inst)
        assert a.y.tolist() == b.y.tolist() and a.delay == b.delay


# ------------------------------------------------------------------------------------------------------------ Eq. 1


def test_stack_layers_nothing_pulled_returns_own() -> None:
    own = [torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), torch.arange(4, dtype=torch.float32)]
    out = mm.stack_layers(own, {})
    assert all(torch.equal(a, b) for a, b in zip(out, own, strict=True))
    assert mm.stack_layers(own, {0: [], 1: []})[1].dtype == torch.float32
    out[1][0] = 99.0
    assert own[1][0] == 0.0  # a new tensor, not a view of own


def test_stack_layers_by_hand() -> None:
    own = [torch.tensor([0.0, 0.0]), torch.tensor([1.0])]
    out = mm.stack_layers(own, {0: [torch.tensor([2.0, 4.0]), np.array([4.0, 8.0])]})
    assert out[0].tolist() == [2.0, 4.0] and out[1].tolist() == [1.0]
    assert out[0].dtype == torch.float32
    double = mm.stack_layers([torch.zeros(1, dtype=torch.float64)], {0: [torch.ones(1)]})
    assert double[0].dtype == torch.float64 and double[0].item() == 0.5


def test_appg_and_netmax_mix() -> None:
    own = [torch.tensor([0.0]), torch.tensor([3.0])]
    peers = [[torch.tensor([3.0]), torch.tensor([0.0])], [torch.tensor([6.0]), torch.tensor([0.0])]]
    assert [t.item() for t in mm.appg_mix(own, peers)] == [3.0, 1.0]
    assert [t.item() for t in mm.netmax_mix(own, peers[0])] == [1.5, 1.5]


# ------------------------------------------------------------------------------------------------------- baselines


def test_netmax_pick_proportional_to_speed() -> None:
    rng = np.random.default_rng(0)
    picks = np.bincount([mm.netmax_pick([1.0, 0.0, 3.0], rng) for _ in range(4000)], minlength=3)
    assert picks[1] == 0
    assert abs(picks[2] / picks.sum() - 0.75) < 0.03
    assert mm.netmax_pick([1.0, 5.0, 5.0], rng, greedy=True) == 1
    with pytest.raises(ValueError, match="bandwidth"):
        mm.netmax_pick([0.0, 0.0], rng)


def test_random_layers_one_peer_per_layer() -> None:
    for seed in range(CASES):
        rng = np.random.default_rng(seed)
        peers, layers = int(rng.integers(1, 6)), int(rng.integers(0, 8))
        reachable = rng.uniform(size=peers) < 0.7
        reachable[int(rng.integers(peers))] = True
        y = mm.random_layers(peers, layers, rng, reachable)
        assert y.shape == (peers, layers)
        assert (y.sum(axis=0) == 1).all() and not y[~reachable].any()


# ------------------------------------------------------------------------------------------------------ bad input


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="tau1 \\+ tau2 must equal 1"):
        mm.peer_probabilities([1.0, 2.0], [0.1, 0.2], 0.5, 0.6)
    with pytest.raises(ValueError, match="tau1"):
        mm.peer_probabilities([1.0, 2.0], [0.1, 0.2], -0.5, 1.5)
    with pytest.raises(ValueError, match="bandwidth: values must be non-negative"):
        mm.peer_probabilities([-1.0, 2.0], [0.1, 0.2], 0.5, 0.5)
    with pytest.raises(ValueError, match="divergence: expected length 2"):
        mm.peer_probabilities([1.0, 2.0], [0.1], 0.5, 0.5)
    with pytest.raises(ValueError, match="bandwidth: values must be non-negative"):
        mm.schedule([1.0], [-1.0], [1.0], [[1.0]])
    with pytest.raises(ValueError, match="bandwidth: values must be finite"):
        mm.schedule([1.0], [np.inf], [1.0], [[1.0]])
    with pytest.raises(ValueError, match=r"q: expected shape \(2, 1\)"):
        mm.schedule([1.0], [1.0, 1.0], [0.5, 0.5], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="p: expected length 2"):
        mm.schedule([1.0], [1.0, 1.0], [1.0], [[1.0], [1.0]])
    with pytest.raises(ValueError, match="layer_sizes: expected a 1-D array"):
        mm.schedule([[1.0]], [1.0], [1.0], [[1.0]])
    with pytest.raises(ValueError, match="peer: expected length 2"):
        mm.label_divergence([0.5, 0.5], [1.0])
    with pytest.raises(ValueError, match="g: values must be non-negative"):
        mm.layer_probabilities([[-1.0]])
    with pytest.raises(ValueError, match="g: expected a 2-D array"):
        mm.layer_probabilities([1.0, 2.0])
    with pytest.raises(ValueError, match="current: expected 1 layers"):
        mm.layer_scores([np.zeros(2)], [])
    with pytest.raises(ValueError, match=r"current\[0\]: shape"):
        mm.layer_scores([np.zeros(2)], [np.zeros(3)])
    with pytest.raises(ValueError, match=r"pulled\[0\]\[0\]: shape"):
        mm.stack_layers([torch.zeros(2)], {0: [torch.zeros(3)]})
    with pytest.raises(ValueError, match="pulled: layer index 5"):
        mm.stack_layers([torch.zeros(2)], {5: [torch.zeros(2)]})
    with pytest.raises(ValueError, match="peers\\[0\\]: expected 2 layers"):
        mm.appg_mix([torch.zeros(1), torch.zeros(1)], [[torch.zeros(1)]])
    with pytest.raises(ValueError, match="reachable: no reachable peer"):
        mm.random_layers(2, 3, np.random.default_rng(0), [False, False])
    with pytest.raises(ValueError, match="peer_layers: peer 0 did not supply layer 1"):
        mm.pulled_layers([[False, True]], [{0: torch.zeros(1)}])
