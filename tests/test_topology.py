"""Overlay graphs: shapes, connectivity, BFS, determinism and error messages."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfl.config import TopologyConfig
from meshfl.core.topology import (
    Topology,
    TopologyError,
    from_edges,
    full,
    grid,
    grid_shape,
    line,
    make_topology,
    random_graph,
    ring,
    small_world,
    star,
)

KINDS = ["full", "ring", "line", "star", "grid", "random", "small_world"]


def _degrees(t: Topology) -> list[int]:
    return [t.degree(p) for p in range(t.num_peers)]


# --- shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 7, 10])
def test_full_has_all_pairs(n: int) -> None:
    t = full(n)
    assert len(t.edges()) == n * (n - 1) // 2
    assert _degrees(t) == [n - 1] * n


@pytest.mark.parametrize("n", [3, 4, 9])
def test_ring_degree_two(n: int) -> None:
    t = ring(n)
    assert _degrees(t) == [2] * n
    assert len(t.edges()) == n
    assert (0, n - 1) in t.edges()


def test_ring_of_two_is_one_edge() -> None:
    assert ring(2).edges() == [(0, 1)]


def test_line_ends_have_degree_one() -> None:
    t = line(6)
    assert _degrees(t) == [1, 2, 2, 2, 2, 1]
    assert t.edges() == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_star_centre_is_peer_zero() -> None:
    t = star(7)
    assert t.degree(0) == 6
    assert _degrees(t)[1:] == [1] * 6
    assert t.neighbours[0] == (1, 2, 3, 4, 5, 6)


def test_grid_3x3_corner_edge_centre() -> None:
    t = grid(9)
    assert _degrees(t) == [2, 3, 2, 3, 4, 3, 2, 3, 2]
    assert len(t.edges()) == 12
    assert t.neighbours[4] == (1, 3, 5, 7)


def test_grid_partial_last_row_hangs_off_row_above() -> None:
    assert grid_shape(10) == (3, 4)
    t = grid(10)  # rows: 0-3, 4-7, 8-9
    assert t.neighbours[8] == (4, 9)
    assert t.neighbours[9] == (5, 8)
    assert t.neighbours[7] == (3, 6)


@pytest.mark.parametrize("n", range(1, 40))
def test_grid_connected_for_every_n(n: int) -> None:
    assert grid(n).is_connected()


def test_edges_sorted_with_i_less_than_j() -> None:
    edges = random_graph(20, 0.3, seed=3).edges()
    assert edges == sorted(edges)
    assert all(i < j for i, j in edges)


def test_neighbours_sorted_and_symmetric() -> None:
    t = small_world(30, 4, 0.5, seed=2)
    for i, row in enumerate(t.neighbours):
        assert list(row) == sorted(set(row))
        assert i not in row
        assert all(i in t.neighbours[j] for j in row)


@pytest.mark.parametrize("kind", KINDS)
def test_single_peer_is_valid(kind: str) -> None:
    config = TopologyConfig(kind=kind, small_world_neighbours=2)
    if kind == "small_world":
        with pytest.raises(TopologyError, match="small_world_neighbours"):
            make_topology(config, 1, seed=0)
        return
    t = make_topology(config, 1, seed=0)
    assert t.num_peers == 1
    assert t.edges() == []
    assert t.hop_distances(0) == [0]


@pytest.mark.parametrize("builder", [full, ring, line, star, grid])
def test_zero_peers_rejected(builder) -> None:
    with pytest.raises(TopologyError, match="at least 1 peer"):
        builder(0)


# --- connectivity ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 5, 8, 13, 32])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_kind_connected(kind: str, n: int, seed: int) -> None:
    if kind == "small_world" and n <= 2:
        pytest.skip("small_world needs an even k < n, impossible for n <= 2")
    config = TopologyConfig(kind=kind, edge_probability=0.05, small_world_neighbours=2 if n <= 4 else 4)
    t = make_topology(config, n, seed)
    assert t.num_peers == n
    assert t.kind == kind
    assert t.is_connected()
    assert min(t.hop_distances(0)) == 0


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), p=st.floats(0.001, 1.0), seed=st.integers(-(2**40), 2**40))
def test_random_graph_always_connected(n: int, p: float, seed: int) -> None:
    t = random_graph(n, p, seed)
    assert t.is_connected()
    assert all(d >= 0 for d in t.hop_distances(n - 1))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 60), half_k=st.integers(1, 5), beta=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
def test_small_world_always_connected_and_keeps_edge_count(n: int, half_k: int, beta: float, seed: int) -> None:
    k = 2 * half_k
    if k >= n:
        k = 2
    t = small_world(n, k, beta, seed)
    assert t.is_connected()
    # Rewiring moves edges; repair can only add. The lattice has n*k/2 edges (fewer if it wraps onto itself).
    assert len(t.edges()) >= min(n * k // 2, n * (n - 1) // 2)


def test_sparse_random_is_repaired_deterministically() -> None:
    # p so small that 100 redraws cannot all be connected: the repair chains components.
    t = random_graph(50, 0.001, seed=5)
    assert t.is_connected()
    assert t == random_graph(50, 0.001, seed=5)


def test_small_world_beta_zero_is_ring_lattice() -> None:
    t = small_world(10, 4, 0.0, seed=0)
    assert _degrees(t) == [4] * 10
    assert t.neighbours[0] == (1, 2, 8, 9)


# --- BFS ---------------------------------------------------------------------------------


def test_hop_distances_ring() -> None:
    assert ring(8).hop_distances(0) == [0, 1, 2, 3, 4, 3, 2, 1]
    assert ring(7).hop_distances(3) == [3, 2, 1, 0, 1, 2, 3]


def test_hop_distances_line() -> None:
    assert line(5).hop_distances(0) == [0, 1, 2, 3, 4]
    assert line(5).hop_distances(2) == [2, 1, 0, 1, 2]


def test_hop_distances_grid_is_manhattan() -> None:
    t = grid(12)  # 3 x 4
    assert grid_shape(12) == (3, 4)
    expected = [r + c for r in range(3) for c in range(4)]
    assert t.hop_distances(0) == expected


def test_hop_distances_star_and_full() -> None:
    assert star(5).hop_distances(3) == [1, 2, 2, 0, 2]
    assert full(4).hop_distances(2) == [1, 1, 0, 1]


def test_hop_distances_out_of_range_peer() -> None:
    with pytest.raises(TopologyError, match="peer 9 is out of range"):
        ring(4).hop_distances(9)


def test_farthest_peers_on_ring() -> None:
    t = ring(8)
    assert t.farthest_peers(0, 3) == [4, 3, 5]
    assert t.farthest_peers(2, 1) == [6]
    assert t.farthest_peers(0, 0) == []
    assert t.farthest_peers(0, 100) == [4, 3, 5, 2, 6, 1, 7]


def test_farthest_peers_excludes_source_and_breaks_ties_by_id() -> None:
    assert full(5).farthest_peers(2, 4) == [0, 1, 3, 4]
    assert ring(1).farthest_peers(0, 3) == []


def test_farthest_peers_negative_count() -> None:
    with pytest.raises(TopologyError, match="count"):
        ring(4).farthest_peers(0, -1)


def test_bfs_matches_networkx() -> None:
    nx = pytest.importorskip("networkx")
    t = small_world(40, 4, 0.3, seed=11)
    g = nx.Graph()
    g.add_nodes_from(range(40))
    g.add_edges_from(t.edges())
    for source in (0, 17, 39):
        lengths = nx.single_source_shortest_path_length(g, source)
        assert t.hop_distances(source) == [lengths[p] for p in range(40)]


# --- determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "small_world"])
def test_same_seed_same_graph(kind: str) -> None:
    config = TopologyConfig(kind=kind, edge_probability=0.2, rewire_probability=0.3)
    assert make_topology(config, 30, seed=42) == make_topology(config, 30, seed=42)


@pytest.mark.parametrize("kind", ["random", "small_world"])
def test_different_seeds_differ(kind: str) -> None:
    config = TopologyConfig(kind=kind, edge_probability=0.2, rewire_probability=0.3)
    graphs = {make_topology(config, 30, seed=s).edges().__repr__() for s in range(5)}
    assert len(graphs) == 5


def test_negative_seed_is_accepted() -> None:
    assert random_graph(10, 0.3, seed=-1) == random_graph(10, 0.3, seed=-1)


def test_topology_is_hashable_and_normalised() -> None:
    a = Topology("custom", ((2, 1), (0,), (0,)))
    assert a.neighbours == ((1, 2), (0,), (0,))
    assert hash(a) == hash(Topology("custom", ((1, 2), (0,), (0,))))


# --- validation --------------------------------------------------------------------------


def test_from_edges_merges_duplicates() -> None:
    t = from_edges(3, [(0, 1), (1, 0), (1, 2)])
    assert t.kind == "custom"
    assert t.edges() == [(0, 1), (1, 2)]


def test_disconnected_custom_names_unreachable_peers() -> None:
    edges = [(0, 1), (1, 2), (2, 3), (3, 4), (5, 6)]
    with pytest.raises(TopologyError) as info:
        from_edges(7, edges)
    assert str(info.value) == "topology 'custom' is disconnected: peers [5, 6] cannot reach peer 0"


def test_disconnected_message_truncates_long_lists() -> None:
    with pytest.raises(TopologyError) as info:
        from_edges(40, [(0, 1)], kind="mine")
    message = str(info.value)
    assert message.startswith("topology 'mine' is disconnected: peers [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ...] (38 in all)")
    assert "\n" not in message


def test_from_edges_rejects_bad_ids_and_self_loops() -> None:
    with pytest.raises(TopologyError, match=r"edge \(0, 5\) names a peer outside 0..2"):
        from_edges(3, [(0, 5)])
    with pytest.raises(TopologyError, match="self loop"):
        from_edges(3, [(1, 1)])


def test_topology_rejects_asymmetric_neighbours() -> None:
    with pytest.raises(TopologyError, match="not symmetric: peer 0 lists 1 but peer 1 does not list 0"):
        Topology("custom", ((1,), ()))


def test_topology_rejects_self_loop_out_of_range_and_duplicates() -> None:
    with pytest.raises(TopologyError, match="self loop"):
        Topology("custom", ((0,),))
    with pytest.raises(TopologyError, match="outside"):
        Topology("custom", ((3,), (0,)))
    with pytest.raises(TopologyError, match="twice"):
        Topology("custom", ((1, 1), (0,)))
    with pytest.raises(TopologyError, match="at least 1 peer"):
        Topology("custom", ())


@pytest.mark.parametrize("k, n", [(3, 10), (10, 10), (12, 10), (0, 10)])
def test_small_world_bad_k(k: int, n: int) -> None:
    with pytest.raises(TopologyError, match=r"topology\.small_world_neighbours"):
        small_world(n, k, 0.1, seed=0)


def test_small_world_bad_k_via_config_names_field() -> None:
    config = TopologyConfig(kind="small_world", small_world_neighbours=4)
    with pytest.raises(TopologyError, match=r"topology\.small_world_neighbours .*peers \(4\)"):
        make_topology(config, 4, seed=0)


@pytest.mark.parametrize(("n", "degree"), [(10, 3), (64, 8), (2000, 8)])
def test_random_regular_gives_every_peer_degree_neighbours(n, degree):
    from meshfl.core.topology import random_regular

    graph = random_regular(n, degree, seed=3)
    assert all(len(row) == degree and i not in row for i, row in enumerate(graph.neighbours))
    assert graph.neighbours == random_regular(n, degree, seed=3).neighbours  # a pure function of the seed
    assert graph.neighbours != random_regular(n, degree, seed=4).neighbours


def test_random_regular_refuses_impossible_degrees():
    from meshfl.core.topology import random_regular

    with pytest.raises(TopologyError, match="topology.degree"):
        random_regular(9, 3, seed=0)  # 27 stubs cannot pair up
    with pytest.raises(TopologyError, match="topology.degree"):
        random_regular(5, 5, seed=0)
