"""Overlay graphs between peers: who may send a message to whom.

A Topology is an immutable, validated, undirected, connected graph over peer ids
0..n-1. Generators build a boolean adjacency matrix with numpy and hand it to one
constructor, so every graph goes through the same checks. Random generators draw from
a numpy Generator derived from the run seed; nothing ever depends on set or dict
iteration order, so a graph is a pure function of (kind, n, parameters, seed).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # core must not import the experiment layer at run time
    from meshfl.config import TopologyConfig

# Mixed into the run seed so the topology stream does not mirror other users of the seed.
_TOPOLOGY_STREAM = 0x7090
_MAX_REDRAWS = 100
_MAX_NAMED_PEERS = 10


class TopologyError(ValueError):
    """A topology that cannot be built or is invalid; the message is one line naming the kind and why."""


@dataclass(frozen=True)
class Topology:
    """Undirected, connected graph; neighbours[i] is the sorted tuple of peers adjacent to i."""

    kind: str
    neighbours: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        # Normalise (sorted tuples of plain ints) so equal graphs compare and hash equal.
        normalised = tuple(tuple(sorted(int(j) for j in row)) for row in self.neighbours)
        object.__setattr__(self, "neighbours", normalised)
        _validate(self.kind, normalised)
        unreachable = [p for p, d in enumerate(self.hop_distances(0)) if d < 0]
        if unreachable:
            raise TopologyError(
                f"topology {self.kind!r} is disconnected: peers {_name_peers(unreachable)} cannot reach peer 0")

    @property
    def num_peers(self) -> int:
        return len(self.neighbours)

    def degree(self, peer: int) -> int:
        return len(self.neighbours[self._check_peer(peer)])

    def edges(self) -> list[tuple[int, int]]:
        """Each undirected edge once as (i, j) with i < j, in sorted order."""
        return [(i, j) for i, row in enumerate(self.neighbours) for j in row if i < j]

    def hop_distances(self, source: int) -> list[int]:
        """BFS hop count from `source` to every peer; -1 where unreachable."""
        dist = [-1] * self.num_peers
        dist[self._check_peer(source)] = 0
        queue = deque([source])
        while queue:
            u = queue.popleft()
            for v in self.neighbours[u]:
                if dist[v] < 0:
                    dist[v] = dist[u] + 1
                    queue.append(v)
        return dist

    def farthest_peers(self, source: int, count: int) -> list[int]:
        """Up to `count` other peers, farthest first (ties by id): spreads checkpoint replicas."""
        if count < 0:
            raise TopologyError(f"topology {self.kind!r}: farthest_peers count must be >= 0 (got {count})")
        dist = self.hop_distances(source)
        others = [p for p in range(self.num_peers) if p != source]
        others.sort(key=lambda p: (-dist[p], p))
        return others[:count]

    def is_connected(self) -> bool:
        return all(d >= 0 for d in self.hop_distances(0))

    def _check_peer(self, peer: int) -> int:
        if not 0 <= peer < self.num_peers:
            raise TopologyError(f"topology {self.kind!r}: peer {peer} is out of range (0..{self.num_peers - 1})")
        return peer


def _name_peers(peers: list[int]) -> str:
    """Peer list for an error message, truncated so the message stays one readable line."""
    if len(peers) <= _MAX_NAMED_PEERS:
        return str(peers)
    shown = ", ".join(map(str, peers[:_MAX_NAMED_PEERS]))
    return f"[{shown}, ...] ({len(peers)} in all)"


def _validate(kind: str, neighbours: tuple[tuple[int, ...], ...]) -> None:
    """Ids in range, no self loops or duplicates, and every edge listed from both ends."""
    n = len(neighbours)
    if n < 1:
        raise TopologyError(f"topology {kind!r} needs at least 1 peer (got {n})")
    for i, row in enumerate(neighbours):
        for j in row:
            if not 0 <= j < n:
                raise TopologyError(f"topology {kind!r}: peer {i} lists neighbour {j}, outside 0..{n - 1}")
            if j == i:
                raise TopologyError(f"topology {kind!r}: peer {i} has a self loop")
        if len(set(row)) != len(row):
            raise TopologyError(f"topology {kind!r}: peer {i} lists a neighbour twice")
    adjacent = [frozenset(row) for row in neighbours]  # membership only, never iterated
    for i, row in enumerate(neighbours):
        for j in row:
            if i not in adjacent[j]:
                raise TopologyError(f"topology {kind!r} is not symmetric: peer {i} lists {j} but peer {j} does not list {i}")


def _check_n(kind: str, n: int) -> None:
    if n < 1:
        raise TopologyError(f"topology {kind!r} needs at least 1 peer (got {n})")


def _from_matrix(kind: str, adj: np.ndarray) -> Topology:
    """Build from a boolean adjacency matrix (symmetrised, diagonal ignored)."""
    adj = np.asarray(adj, dtype=bool)
    adj = adj | adj.T
    np.fill_diagonal(adj, False)
    return Topology(kind, tuple(tuple(np.flatnonzero(row).tolist()) for row in adj))


def _rng(seed: int) -> np.random.Generator:
    """Generator for topology draws; any int seed works (numpy rejects negative seeds)."""
    return np.random.default_rng([seed % 2**64, _TOPOLOGY_STREAM])


def _components(adj: np.ndarray) -> list[list[int]]:
    """Connected components, each sorted, ordered by their smallest id."""
    n = adj.shape[0]
    seen = np.zeros(n, dtype=bool)
    comps: list[list[int]] = []
    for start in range(n):
        if seen[start]:
            continue
        seen[start] = True
        comp, queue = [start], deque([start])
        while queue:
            u = queue.popleft()
            for v in np.flatnonzero(adj[u] & ~seen).tolist():
                seen[v] = True
                comp.append(v)
                queue.append(v)
        comps.append(sorted(comp))
    return comps


def _repair(adj: np.ndarray) -> np.ndarray:
    """Chain components together: smallest id of each to the smallest id of the next."""
    adj = adj.copy()
    heads = [comp[0] for comp in _components(adj)]
    for a, b in pairwise(heads):
        adj[a, b] = adj[b, a] = True
    return adj


def _is_connected(adj: np.ndarray) -> bool:
    return len(_components(adj)) == 1


# Sparse twins of the above, for the random generators: neighbour sets instead of a peers x peers matrix
# (10,000 peers would need 100 MB per matrix and peers^2 work per component search). Same graphs.

def _components_of(rows: list[set[int]]) -> list[list[int]]:
    """Connected components, each sorted, ordered by their smallest id."""
    seen = [False] * len(rows)
    comps: list[list[int]] = []
    for start in range(len(rows)):
        if seen[start]:
            continue
        seen[start] = True
        comp, queue = [start], deque([start])
        while queue:
            for v in rows[queue.popleft()]:
                if not seen[v]:
                    seen[v] = True
                    comp.append(v)
                    queue.append(v)
        comps.append(sorted(comp))
    return comps


def _repair_rows(rows: list[set[int]]) -> None:
    """Chain components together (in place): smallest id of each to the smallest id of the next."""
    heads = [comp[0] for comp in _components_of(rows)]
    for a, b in pairwise(heads):
        rows[a].add(b)
        rows[b].add(a)


def _from_rows(kind: str, rows: list[set[int]]) -> Topology:
    return Topology(kind, tuple(tuple(sorted(row)) for row in rows))


_DRAW_CHUNK = 1 << 22
"""Uniforms drawn at once while sampling G(n, p): the same stream as one peers x peers draw, in bounded memory."""


def _draw_gnp(n: int, p: float, rng: np.random.Generator) -> list[set[int]]:
    """Edges (i, j), i < j, where the (i, j) entry of an n x n uniform draw (row-major) is < p."""
    rows: list[set[int]] = [set() for _ in range(n)]
    chunk = max(1, _DRAW_CHUNK // max(n, 1))
    for first in range(0, n, chunk):
        block = rng.random((min(chunk, n - first), n)) < p
        us, vs = np.nonzero(block)
        us += first
        keep = vs > us
        for u, v in zip(us[keep].tolist(), vs[keep].tolist(), strict=True):
            rows[u].add(v)
            rows[v].add(u)
    return rows


# --- deterministic generators -------------------------------------------------------------


def full(n: int) -> Topology:
    _check_n("full", n)
    return _from_matrix("full", np.ones((n, n), dtype=bool))


def ring(n: int) -> Topology:
    _check_n("ring", n)
    adj = np.zeros((n, n), dtype=bool)
    if n > 1:
        idx = np.arange(n)
        adj[idx, (idx + 1) % n] = True
    return _from_matrix("ring", adj)


def line(n: int) -> Topology:
    _check_n("line", n)
    adj = np.zeros((n, n), dtype=bool)
    idx = np.arange(n - 1)
    adj[idx, idx + 1] = True
    return _from_matrix("line", adj)


def star(n: int) -> Topology:
    """Peer 0 is the centre."""
    _check_n("star", n)
    adj = np.zeros((n, n), dtype=bool)
    adj[0, 1:] = True
    return _from_matrix("star", adj)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) with rows = floor(sqrt(n)); the last row may be partial."""
    rows = max(1, int(np.floor(np.sqrt(n))))
    return rows, -(-n // rows)


def grid(n: int) -> Topology:
    """Peers filled row by row, 4-neighbourhood; a partial last row hangs off the row above."""
    _check_n("grid", n)
    _, cols = grid_shape(n)
    idx = np.arange(n)
    adj = np.zeros((n, n), dtype=bool)
    right = idx[(idx % cols != cols - 1) & (idx + 1 < n)]
    adj[right, right + 1] = True
    down = idx[idx + cols < n]
    adj[down, down + cols] = True
    return _from_matrix("grid", adj)


def from_edges(n: int, edges: Iterable[tuple[int, int]], kind: str = "custom") -> Topology:
    """Graph from an undirected edge list; duplicates (either direction) are merged."""
    _check_n(kind, n)
    adj = np.zeros((n, n), dtype=bool)
    for a, b in edges:
        a, b = int(a), int(b)
        if not (0 <= a < n and 0 <= b < n):
            raise TopologyError(f"topology {kind!r}: edge ({a}, {b}) names a peer outside 0..{n - 1}")
        if a == b:
            raise TopologyError(f"topology {kind!r}: edge ({a}, {b}) is a self loop")
        adj[a, b] = True
    return _from_matrix(kind, adj)


# --- random generators ---------------------------------------------------------------------


def random_graph(n: int, p: float, seed: int) -> Topology:
    """Erdos-Renyi G(n, p); redrawn while disconnected, then components are chained together."""
    _check_n("random", n)
    if not 0 < p <= 1:
        raise TopologyError(f"topology 'random': topology.edge_probability must be in (0, 1] (got {p})")
    rng = _rng(seed)
    for _ in range(_MAX_REDRAWS):
        rows = _draw_gnp(n, p, rng)
        if len(_components_of(rows)) == 1:
            break
    else:
        _repair_rows(rows)
    return _from_rows("random", rows)


def small_world(n: int, k: int, beta: float, seed: int) -> Topology:
    """Watts-Strogatz: ring lattice of k nearest neighbours, each edge rewired with prob beta."""
    _check_n("small_world", n)
    if k < 2 or k % 2 or k >= n:
        raise TopologyError(
            f"topology 'small_world': topology.small_world_neighbours must be even, >= 2 and < peers ({n}) (got {k})")
    if not 0 <= beta <= 1:
        raise TopologyError(f"topology 'small_world': topology.rewire_probability must be in [0, 1] (got {beta})")
    rng = _rng(seed)
    rows: list[set[int]] = [set() for _ in range(n)]
    for j in range(1, k // 2 + 1):
        for u in range(n):
            rows[u].add((u + j) % n)
            rows[(u + j) % n].add(u)
    for j in range(1, k // 2 + 1):  # same order as networkx: by lattice distance, then by peer
        for u in range(n):
            v = (u + j) % n
            if rng.random() < beta:
                _rewire(rows, u, v, rng)
    if len(_components_of(rows)) != 1:
        _repair_rows(rows)
    return _from_rows("small_world", rows)


def _rewire(rows: list[set[int]], u: int, v: int, rng: np.random.Generator) -> None:
    """Move edge (u, v) to (u, w) for a uniformly drawn w that is neither u nor a neighbour.

    w is the index-th smallest such peer: counted past u and its neighbours, without listing the free peers."""
    taken = sorted(rows[u] | {u})
    free = len(rows) - len(taken)
    if free == 0:
        return
    w = int(rng.integers(free))
    for t in taken:  # the w-th free peer: skip every taken id at or below it
        if t > w:
            break
        w += 1
    rows[u].discard(v)
    rows[v].discard(u)
    rows[u].add(w)
    rows[w].add(u)


# --- config entry point --------------------------------------------------------------------


def random_regular(n: int, degree: int, seed: int) -> Topology:
    """A random `degree`-regular graph (Steger-Wormald pairing, as networkx's random_regular_graph):
    stubs are paired at random, pairs that would repeat an edge or make a loop are paired again
    among themselves; redrawn while disconnected. O(n * degree) per draw."""
    _check_n("regular", n)
    if not 0 < degree < n or (n * degree) % 2:
        raise TopologyError(f"topology 'regular': topology.degree must be in 1..peers-1 ({n - 1}) with peers x degree even "
                            f"(got degree {degree} for {n} peers)")
    rng = _rng(seed)
    rows: list[set[int]] | None = None
    for _ in range(_MAX_REDRAWS * 10):
        rows = _pair_stubs(n, degree, rng)
        if rows is not None and len(_components_of(rows)) == 1:
            break
    if rows is None:
        raise TopologyError(f"topology 'regular': no {degree}-regular graph on {n} peers found; try another degree")
    if len(_components_of(rows)) > 1:
        _repair_rows(rows)
    return _from_rows("regular", rows)


def _pair_stubs(n: int, degree: int, rng: np.random.Generator) -> list[set[int]] | None:
    rows: list[set[int]] = [set() for _ in range(n)]
    stubs = np.repeat(np.arange(n), degree)
    while stubs.size:
        rng.shuffle(stubs)
        again: list[int] = []
        for a, b in stubs.reshape(-1, 2).tolist():
            if a != b and b not in rows[a]:
                rows[a].add(b)
                rows[b].add(a)
            else:
                again += (a, b)
        if again and not any(u != v and v not in rows[u] for u in set(again) for v in set(again)):
            return None  # the stubs left can only make loops or repeats: start over
        stubs = np.asarray(again, dtype=np.int64)
    return rows


def make_topology(config: TopologyConfig, num_peers: int, seed: int) -> Topology:
    """The overlay graph a run uses: a pure function of (config, num_peers, seed)."""
    kind = config.kind
    if kind == "random":
        return random_graph(num_peers, config.edge_probability, seed)
    if kind == "regular":
        return random_regular(num_peers, config.degree, seed)
    if kind == "small_world":
        return small_world(num_peers, config.small_world_neighbours, config.rewire_probability, seed)
    builders = {"full": full, "ring": ring, "line": line, "star": star, "grid": grid}
    if kind not in builders:
        raise TopologyError(f"topology {kind!r} is not known; choose one of {sorted([*builders, 'random', 'regular', 'small_world'])}")
    return builders[kind](num_peers)
