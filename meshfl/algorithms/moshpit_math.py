"""Pure maths of Moshpit all-reduce (Ryabinin et al., NeurIPS 2021) and MAR-FL (Mulitze et al., 2025): group keys,
grouping schemes, a whole-network averaging simulator and the butterfly all-reduce inside one group.

Why a separate module: the coming ``moshpit`` algorithm only has to *wire* these functions to the DHT and the
network. Every peer computes its group key alone, from (seed, N, round, its index, its rank in its last group), so the
key schemes must be deterministic pure functions; testing them, and measuring how well they mix, without a network
pins the semantics before any asynchronous machinery runs them.

Grouping schemes (a scheme maps a peer's previous key, index, rank and round to its next key; peers that share a key
in a round form a group and average):

* ``moshpit`` (:class:`PerfectGrid`): the paper's and MAR-FL's scheme for N = M^d. The initial key is the top d-1
  base-M digits of the index; after each round the key drops its oldest coordinate and appends the peer's rank in its
  group (``C[1:] + [c]``). Exact global mean after d rounds, every group of size M.
* ``marfl_imperfect`` (:class:`MarflImperfect`): MAR-FL's published scheme for other N (``bucket = i // M``,
  ``new_bucket = (bucket + alpha*c) mod ceil(N/M)``). Kept to compare honestly: it barely mixes for some N (for 100
  peers, M=4, key dimension 3, alpha stays 1 and the max error on values 0..99 is still 25.5 after 8 rounds).
* ``random_cells`` (:class:`RandomCells`): the Moshpit reference simulator: N peers on random distinct cells of an
  M^d grid, d = ceil(log_M N), round r averages along axis r mod d. Sparse grids leave many singletons.
* ``balanced_grid`` (:class:`BalancedGrid`, the default): a mixed-radix grid of d = ceil(log_M N) sides, each side at
  most M, whose product P >= N is the least possible (ties: the most even sides), so P == N whenever N factors into
  d sides <= M (16, 64, 100 with M=5, 125, 200 with M=8, 256, 1000 with M=8 ...) and the result is then exact after
  d rounds. The P - N empty cells are spread so no two share a line; round r averages along axis r mod d. Peers are
  placed on the occupied cells by a permutation drawn from (seed, cycle), cycle = r // d, so every further cycle of d
  rounds mixes afresh, like random groups.
* ``random_groups`` (:class:`RandomGroups`): each round a permutation drawn from (seed, round) cut into ceil(N/M)
  near-equal groups (Moshpit's random-group theorem: the spread shrinks by ~1/M per round). Never exact.

Why ``balanced_grid`` is the default (``benchmarks/moshpit_mixing.py``, values 0..N-1, mean over 5 seeds): it is exact
after d rounds for every N that factors into d sides <= M (every perfect power, and e.g. 100 or 200 with M=5 or 8, 1000
with M=5 or 8), where ``random_groups`` is never exact. Where it has holes it is as good as or better than the others
after d rounds and keeps mixing: N=100, M=4 (108 cells): 3.2 after d=4 rounds, 0.17 after 2d (``random_groups`` 3.2 and
0.18, ``random_cells`` 30.9 and 18.8, ``marfl_imperfect`` 32.4 and 25.5); N=125, M=4: 2.0 / 0.05 (``random_groups``
4.6 / 0.31); N=1000, M=4: 11.5 / 0.13 (25.8 / 0.91). Its worst case is many holes: N=200, M=4 (256 cells) gives 10.1
/ 0.77 against ``random_groups``' 8.4 / 0.41. Its groups are smaller than M when sides are (mean 3.0 for N=100, M=4),
which also means less traffic per round; a side of 2 with a hole gives a rare singleton (1.9 % for N=125, M=4). Under
failures its keys do not depend on ranks, so a failure only shrinks the groups that held the failed peer: 10 % dropouts
on 64 peers, M=4: max error 3.0 after d=3 rounds and 0.45 after 5 (``moshpit``'s rank keys: 5.2 and 0.79).

Weights: with ``weights`` (e.g. sample counts) a group computes ``sum w x / sum w`` and each member then carries the
group's mean weight ``sum w / |G|``, so ``sum_i w_i x_i`` and ``sum_i w_i`` are conserved and the fixed point is the
global weighted mean (exact after d rounds on a full grid, as for the unweighted mean).

Failures (:func:`simulate_averaging`): a peer failing in round r was matched in round r (its rank counts, as in
MAR-FL, where the group is formed before the crash) but contributes nothing; the group averages its survivors. The
failed peer keeps its value and is in no later group. A dropped peer (MAR-FL's dropout at aggregation time) is never
matched at all.

Butterfly all-reduce inside a group (hivemind, reference B.3): the flat vector is split into M near-equal contiguous
parts (``meshfl.core.params.chunk_bounds``); member j reduces part j (``sum w x / sum w``), then sends it back to all.
A member sends 2(M-1)/M S and receives 2(M-1)/M S (S bytes of the vector), against (M-1) S received by MAR-FL's
all-gather of full models. A failed sender is dropped from every part it had not delivered; a failed reducer's part is
either kept locally by the others (hivemind, delta 0) or reassigned to the next live member (:func:`plan_reduction`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from meshfl.core.params import chunk_bounds

__all__ = [
    "DEFAULT_SCHEME",
    "SCHEMES",
    "BalancedGrid",
    "ButterflyTraffic",
    "GroupScheme",
    "Key",
    "MarflImperfect",
    "PerfectGrid",
    "RandomCells",
    "RandomGroups",
    "allgather_bytes",
    "assemble",
    "butterfly_average",
    "butterfly_bytes",
    "grid_sides",
    "groups",
    "initial_key",
    "make_scheme",
    "marfl_alpha_schedule",
    "max_error",
    "next_key",
    "part_bounds",
    "plan_reduction",
    "reduce_part",
    "rounds_needed",
    "schedule_groups",
    "simulate_averaging",
    "split_parts",
]

Key = tuple[int, ...]


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# ------------------------------------------------------------------------------------------------ grid and group keys


def rounds_needed(n: int, m: int) -> int:
    """Least d >= 1 with m^d >= n (integer arithmetic): the rounds of a grid of side m holding n peers."""
    _check_int("n", n, 1)
    _check_int("m", m, 2)
    d, cells = 1, m
    while cells < n:
        d, cells = d + 1, cells * m
    return d


def _digits(index: int, sides: Sequence[int]) -> list[int]:
    """Mixed-radix digits of `index`, most significant first (sides[0] is the most significant radix)."""
    out = []
    for side in reversed(sides):
        out.append(index % side)
        index //= side
    return out[::-1]


def initial_key(index: int, m: int, d: int) -> Key:
    """Initial group key of peer `index` on a perfect grid of side `m` and dimension `d` (N = m^d peers).

    The key is the top d-1 base-m digits of the index (MAR-FL's ``get_initial_index``), so the m peers that differ only in
    the last digit share it. With d = 1 the key is empty: everyone is in one group.

    Raises
    ------
    ValueError
        If `m` < 2, `d` < 1 or `index` is outside 0..m^d - 1.
    """
    _check_int("m", m, 2)
    _check_int("d", d, 1)
    _check_int("index", index, 0)
    if index >= m**d:
        raise ValueError(f"index {index} outside 0..{m**d - 1} (m={m}, d={d})")
    return tuple(_digits(index, [m] * d)[:-1])


def next_key(key: Sequence[int], rank: int) -> Key:
    """Moshpit's key update ``C[1:] + [c]``: drop the oldest coordinate, append the rank `rank` in the last group.

    Raises
    ------
    ValueError
        If `rank` is negative.
    """
    _check_int("rank", rank, 0)
    return (*tuple(key)[1:], int(rank)) if len(key) else ()


def groups(keys: Sequence[Key | None]) -> list[list[int]]:
    """Group peers (positions in `keys`) that share a key; a ``None`` key is a peer that takes no part.

    Returns
    -------
    list of list of int
        Members of each group in ascending index order; groups ordered by their smallest member.
    """
    by_key: dict[Key, list[int]] = {}
    for index, key in enumerate(keys):
        if key is not None:
            by_key.setdefault(tuple(key), []).append(index)
    return sorted(by_key.values(), key=lambda members: members[0])


# ------------------------------------------------------------------------------------------------ schemes


class GroupScheme(Protocol):
    """How every peer computes its group key alone: from its index at the start, then from its last key, index, rank
    (position in its sorted last group) and the round that just ended. Peers sharing a key in a round form a group."""

    name: str
    n: int
    exact_rounds: int | None  # rounds after which the mean is exact without failures (None: never guaranteed)

    def initial_key(self, index: int) -> Key: ...

    def next_key(self, key: Key, index: int, rank: int, round: int) -> Key: ...


@dataclass(frozen=True)
class PerfectGrid:
    """The Moshpit / MAR-FL scheme for n = m^d peers: rank-based sliding-window keys (see :func:`initial_key`)."""

    m: int
    d: int
    name: str = field(default="moshpit", init=False)

    def __post_init__(self) -> None:
        _check_int("m", self.m, 2)
        _check_int("d", self.d, 1)

    @property
    def n(self) -> int:
        return self.m**self.d

    @property
    def exact_rounds(self) -> int:
        return self.d

    def initial_key(self, index: int) -> Key:
        return initial_key(index, self.m, self.d)

    def next_key(self, key: Key, index: int, rank: int, round: int) -> Key:
        return next_key(key, rank)


def marfl_alpha_schedule(n: int, m: int, d: int, phase: int = 0) -> list[int]:
    """MAR-FL's alpha schedule for a non-perfect grid: [1, 5] for (n, m, d) = (125, 4, 3), [1, 5, 11] for (125, 3, 4),
    otherwise one entry, the first odd number >= 2 phase + 1 coprime with G = ceil(n / m) (a schedule of length 1,
    so the phase never advances and alpha stays the same: the scheme's weakness)."""
    if (m, d, n) == (4, 3, 125):
        return [1, 5]
    if (m, d, n) == (3, 4, 125):
        return [1, 5, 11]
    g = -(-n // m)
    alpha = 2 * phase + 1
    while math.gcd(alpha, g) != 1:
        alpha += 2
    return [alpha]


@dataclass(frozen=True)
class MarflImperfect:
    """MAR-FL's published scheme for n != m^d, reproduced to compare (not recommended).

    Key = (bucket, phase); initial bucket = index // m; after a round with rank c:
    bucket <- (bucket + alpha c) mod ceil(n/m), alpha = schedule[phase], phase <- (phase + 1) mod len(schedule).
    """

    n: int
    m: int
    d: int
    name: str = field(default="marfl_imperfect", init=False)
    exact_rounds: None = field(default=None, init=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("m", self.m, 2)
        _check_int("d", self.d, 1)

    def initial_key(self, index: int) -> Key:
        _check_index(index, self.n)
        return (index // self.m, 0)

    def next_key(self, key: Key, index: int, rank: int, round: int) -> Key:
        bucket, phase = key
        schedule = marfl_alpha_schedule(self.n, self.m, self.d, phase)
        alpha = schedule[phase % len(schedule)]
        return ((bucket + alpha * rank) % -(-self.n // self.m), (phase + 1) % len(schedule))


def _check_index(index: int, n: int) -> None:
    _check_int("index", index, 0)
    if index >= n:
        raise ValueError(f"index {index} outside 0..{n - 1}")


def _line_key(cycle: int, coords: Sequence[int], axis: int) -> Key:
    return (cycle, axis, *coords[:axis], *coords[axis + 1:])


@dataclass(frozen=True)
class RandomCells:
    """The Moshpit reference simulator: peers on random distinct cells (drawn from `seed`) of an m^d grid,
    d = ceil(log_m n); round r groups the peers that share every coordinate but axis r mod d."""

    n: int
    m: int
    seed: int = 0
    name: str = field(default="random_cells", init=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("m", self.m, 2)
        cells = np.random.default_rng([self.seed, 0]).choice(self.m ** self.d, size=self.n, replace=False)
        object.__setattr__(self, "_coords", [_digits(int(c), [self.m] * self.d) for c in cells])

    @property
    def d(self) -> int:
        return rounds_needed(self.n, self.m)

    @property
    def exact_rounds(self) -> int | None:
        return self.d if self.m**self.d == self.n else None

    def key_at(self, index: int, round: int) -> Key:
        _check_index(index, self.n)
        return _line_key(0, self._coords[index], round % self.d)  # type: ignore[attr-defined]

    def initial_key(self, index: int) -> Key:
        return self.key_at(index, 0)

    def next_key(self, key: Key, index: int, rank: int, round: int) -> Key:
        return self.key_at(index, round + 1)


def grid_sides(n: int, m: int, d: int | None = None) -> tuple[int, ...]:
    """Sides (each in 2..m, descending) of a d-dimensional grid with the least product P >= n, ties broken by the
    largest smallest side (fewest singleton risks), then lexicographically largest. d defaults to ceil(log_m n).

    Raises
    ------
    ValueError
        If `n` < 1, `m` < 2, or `d` is too small to hold n peers with sides <= m.
    """
    _check_int("n", n, 1)
    _check_int("m", m, 2)
    d = rounds_needed(n, m) if d is None else d
    _check_int("d", d, 1)
    if m**d < n:
        raise ValueError(f"d={d} sides of at most m={m} cannot hold n={n} peers")
    best: tuple[int, int, tuple[int, ...]] | None = None

    def walk(prefix: tuple[int, ...], top: int, product: int) -> None:
        nonlocal best
        if len(prefix) == d:
            if product >= n:
                rank = (product, -prefix[-1], tuple(-s for s in prefix))
                if best is None or rank < best:
                    best = rank
            return
        for side in range(top, 1, -1):
            if product * side * top ** (d - len(prefix) - 1) < n:
                break  # descending sides: no completion reaches n
            walk((*prefix, side), side, product * side)

    walk((), m, 1)
    assert best is not None
    return tuple(-s for s in best[2])


def _spread_holes(sides: Sequence[int], holes: int, rng: np.random.Generator) -> set[int]:
    """Choose `holes` empty cells, greedily in a random order, so that no two share a line along any axis (differ in
    at least two coordinates) where possible."""
    cells = int(np.prod(sides))
    order = rng.permutation(cells)
    chosen: list[int] = []
    coords: list[list[int]] = []
    for strict in (True, False):
        for cell in order:
            if len(chosen) == holes:
                return set(chosen)
            cell = int(cell)
            if cell in chosen:
                continue
            c = _digits(cell, sides)
            if strict and any(sum(a != b for a, b in zip(c, other, strict=True)) < 2 for other in coords):
                continue
            chosen.append(cell)
            coords.append(c)
    return set(chosen)


@dataclass(frozen=True)
class BalancedGrid:
    """Mixed-radix grid of :func:`grid_sides` (product P >= n, each side <= m) with the P - n holes spread apart;
    round r averages along axis r mod d. Peers are placed on the occupied cells by a permutation drawn from
    (seed, cycle), cycle = r // d, and the holes are re-drawn per cycle too. Exact after d rounds when P == n."""

    n: int
    m: int
    seed: int = 0
    name: str = field(default="balanced_grid", init=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("m", self.m, 2)
        object.__setattr__(self, "sides", grid_sides(self.n, self.m))
        object.__setattr__(self, "_cycles", {})

    @property
    def d(self) -> int:
        return len(self.sides)  # type: ignore[attr-defined]

    @property
    def exact_rounds(self) -> int | None:
        return self.d if int(np.prod(self.sides)) == self.n else None  # type: ignore[attr-defined]

    def placement(self, cycle: int) -> list[list[int]]:
        """Cell coordinates of every peer in cycle `cycle` (cached; a pure function of seed, n, m and cycle)."""
        cache: dict[int, list[list[int]]] = self._cycles  # type: ignore[attr-defined]
        if cycle not in cache:
            sides = self.sides  # type: ignore[attr-defined]
            rng = np.random.default_rng([self.seed, cycle])
            holes = _spread_holes(sides, int(np.prod(sides)) - self.n, rng)
            occupied = [c for c in range(int(np.prod(sides))) if c not in holes]
            perm = rng.permutation(self.n)
            coords: list[list[int]] = [[] for _ in range(self.n)]
            for slot, peer in enumerate(perm):
                coords[int(peer)] = _digits(occupied[slot], sides)
            cache[cycle] = coords
        return cache[cycle]

    def key_at(self, index: int, round: int) -> Key:
        _check_index(index, self.n)
        cycle, axis = divmod(round, self.d)
        return _line_key(cycle, self.placement(cycle)[index], axis)

    def initial_key(self, index: int) -> Key:
        return self.key_at(index, 0)

    def next_key(self, key: Key, index: int, rank: int, round: int) -> Key:
        return self.key_at(index, round + 1)


@dataclass(frozen=True)
class RandomGroups:
    """Each round, a permutation drawn from (seed, round) cut into ceil(n/m) near-equal groups (sizes differ by at
    most one, so none is a singleton when n >= 2)."""

    n: int
    m: int
    seed: int = 0
    name: str = field(default="random_groups", init=False)
    exact_rounds: None = field(default=None, init=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("m", self.m, 2)

    def key_at(self, index: int, round: int) -> Key:
        _check_index(index, self.n)
        position = int(np.argsort(np.random.default_rng([self.seed, round]).permutation(self.n))[index])
        return (round, position % -(-self.n // self.m))

    def initial_key(self, index: int) -> Key:
        return self.key_at(index, 0)

    def next_key(self, key: Key, index: int, rank: int, round: int) -> Key:
        return self.key_at(index, round + 1)


SCHEMES = ("moshpit", "marfl_imperfect", "random_cells", "balanced_grid", "random_groups")
DEFAULT_SCHEME = "balanced_grid"


def make_scheme(name: str, n: int, m: int, seed: int = 0, d: int | None = None) -> GroupScheme:
    """Build scheme `name` (one of :data:`SCHEMES`) for n peers and group size m; `d` is the key dimension of
    ``moshpit`` and ``marfl_imperfect`` (default ceil(log_m n)).

    Raises
    ------
    ValueError
        On an unknown `name`, or ``moshpit`` with n != m^d.
    """
    d = rounds_needed(n, m) if d is None else d
    if name == "moshpit":
        if m**d != n:
            raise ValueError(f"scheme 'moshpit' needs n == m**d, got n={n}, m={m}, d={d}")
        return PerfectGrid(m, d)
    if name == "marfl_imperfect":
        return MarflImperfect(n, m, d)
    if name == "random_cells":
        return RandomCells(n, m, seed)
    if name == "balanced_grid":
        return BalancedGrid(n, m, seed)
    if name == "random_groups":
        return RandomGroups(n, m, seed)
    raise ValueError(f"name must be one of {', '.join(SCHEMES)}, got {name!r}")


# ------------------------------------------------------------------------------------------------ whole-network simulation


def _check_failures(n: int, failures: Mapping[int, int] | None, dropped: Iterable[int]) -> tuple[dict[int, int], set[int]]:
    fails = dict(failures or {})
    for peer, round in fails.items():
        if not 0 <= peer < n:
            raise ValueError(f"failures: peer {peer} outside 0..{n - 1}")
        _check_int("failures round", round, 0)
    gone = set(dropped)
    if any(not 0 <= p < n for p in gone):
        raise ValueError(f"dropped: peers must be in 0..{n - 1}")
    return fails, gone


def schedule_groups(scheme: GroupScheme, rounds: int, *, failures: Mapping[int, int] | None = None,
                    dropped: Iterable[int] = ()) -> list[list[list[int]]]:
    """Groups matched in each of `rounds` rounds (they do not depend on the values).

    Parameters
    ----------
    failures
        peer -> round in which it fails: matched in that round (its rank counts) but in no later round.
    dropped
        Peers that never take part (not matched in any round).
    """
    _check_int("rounds", rounds, 0)
    n = scheme.n
    fails, gone = _check_failures(n, failures, dropped)
    keys: list[Key | None] = [None if i in gone else scheme.initial_key(i) for i in range(n)]
    out = []
    for r in range(rounds):
        round_groups = groups(keys)
        out.append(round_groups)
        for members in round_groups:
            for rank, peer in enumerate(members):
                if fails.get(peer, rounds) <= r:
                    keys[peer] = None
                else:
                    keys[peer] = scheme.next_key(keys[peer], peer, rank, r)  # type: ignore[arg-type]
    return out


def simulate_averaging(values: np.ndarray, scheme: GroupScheme, rounds: int, *, weights: np.ndarray | None = None,
                       failures: Mapping[int, int] | None = None, dropped: Iterable[int] = ()) -> np.ndarray:
    """Apply `rounds` rounds of group averaging of `scheme` to every peer's vector (rows of `values`).

    Each group replaces its contributing members' values by their (weighted) mean; see the module docstring for
    weights (conserved), failures (a member failing in round r contributes nothing from round r on and keeps its
    value) and dropped peers.

    Parameters
    ----------
    values
        Array [N, P] (or [N]); N must equal ``scheme.n``.
    weights
        Non-negative per-peer weights [N] (e.g. samples); default all ones (the unweighted mean).

    Returns
    -------
    numpy.ndarray
        float64 array of the same shape as `values`.
    """
    x = np.array(values, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[0] != scheme.n:
        raise ValueError(f"values must have shape [N] or [N, P] with N = {scheme.n}, got {x.shape}")
    w = np.ones(scheme.n) if weights is None else np.array(weights, dtype=np.float64)
    if w.shape != (scheme.n,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be {scheme.n} finite non-negative numbers")
    fails = dict(failures or {})
    for r, round_groups in enumerate(schedule_groups(scheme, rounds, failures=fails, dropped=dropped)):
        for members in round_groups:
            live = [p for p in members if fails.get(p, rounds) > r]
            total = w[live].sum()
            if len(live) < 2 or total <= 0:
                continue
            x[live] = np.tensordot(w[live], x[live], axes=1) / total
            w[live] = total / len(live)
    return x


def max_error(result: np.ndarray, values: np.ndarray, peers: Iterable[int] | None = None) -> float:
    """Largest absolute deviation, over `peers` (default all), of `result` from the mean of `values` over `peers`."""
    idx = np.arange(len(values)) if peers is None else np.array(sorted(peers), dtype=int)
    target = np.asarray(values, dtype=np.float64)[idx].mean(axis=0)
    return float(np.max(np.abs(np.asarray(result, dtype=np.float64)[idx] - target)))


# ------------------------------------------------------------------------------------------------ butterfly all-reduce


def part_bounds(numel: int, m: int) -> list[tuple[int, int]]:
    """`(start, stop)` of the m near-equal contiguous parts of a flat vector of `numel` entries (``chunk_bounds``)."""
    _check_int("numel", numel, 0)
    _check_int("m", m, 1)
    return [chunk_bounds(numel, j, m) for j in range(m)]


def split_parts(vector: torch.Tensor, m: int) -> list[torch.Tensor]:
    """Split a flat vector into the m parts of :func:`part_bounds` (views, no copy)."""
    if vector.ndim != 1:
        raise ValueError(f"vector must be 1-D, got shape {tuple(vector.shape)}")
    return [vector[a:b] for a, b in part_bounds(vector.numel(), m)]


def reduce_part(parts: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean ``sum_j w_j x_j / sum_j w_j`` of one part as sent by the members (a reducer's job).

    Accumulates in float64 and returns the parts' dtype, so a float32 result is the correctly rounded weighted mean up
    to about one unit in the last place (relative error <= ~1.2e-7 of the largest |x|).

    Raises
    ------
    ValueError
        If `parts` is empty or of different shapes, or `weights` has another length, a negative entry or sum 0.
    """
    if len(parts) == 0:
        raise ValueError("parts must not be empty")
    if any(p.shape != parts[0].shape for p in parts):
        raise ValueError("parts must all have the same shape")
    w = [1.0] * len(parts) if weights is None else [float(v) for v in weights]
    if len(w) != len(parts) or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise ValueError("weights must be one finite non-negative number per part, with a positive sum")
    acc = torch.zeros(parts[0].shape, dtype=torch.float64)
    for wj, p in zip(w, parts, strict=True):
        acc += wj * p.to(torch.float64)
    return (acc / sum(w)).to(parts[0].dtype)


def assemble(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate reduced parts back into the flat vector (all-gather's result)."""
    if len(parts) == 0:
        raise ValueError("parts must not be empty")
    return torch.cat(list(parts))


def plan_reduction(members: Sequence[int], failed_reducers: Iterable[int] = ()) -> dict[int, int]:
    """Which member reduces each part: part j -> members[j], and a failed reducer's part goes to the next live member
    after it (cyclically) among those with the least load so far (so two failures do not pile onto one member).

    Deterministic: every member computes the same plan from the same (ordered) group and set of failed reducers.

    Raises
    ------
    ValueError
        If `members` is empty or has duplicates, a failed reducer is not a member, or every member failed.
    """
    members = list(members)
    if not members or len(set(members)) != len(members):
        raise ValueError("members must be a non-empty list of distinct peers")
    failed = set(failed_reducers)
    if not failed <= set(members):
        raise ValueError(f"failed_reducers {sorted(failed - set(members))} are not members")
    live = [j for j, p in enumerate(members) if p not in failed]
    if not live:
        raise ValueError("every reducer failed: no member can reduce")
    plan = {j: members[j] for j in live}
    load = {j: 1 for j in live}
    m = len(members)
    for j in range(m):
        if members[j] in failed:
            order = [(j + k) % m for k in range(1, m) if (j + k) % m in load]
            target = min(order, key=lambda i: load[i])  # min keeps the first (nearest) among equally loaded
            plan[j] = members[target]
            load[target] += 1
    return dict(sorted(plan.items()))


def butterfly_average(vectors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                      failed_senders: Mapping[int, Iterable[int]] | None = None,
                      failed_reducers: Iterable[int] = (), reassign: bool = True) -> list[torch.Tensor | None]:
    """Butterfly all-reduce of one group's flat vectors (member j = position j, reducer of part j) with failures.

    Parameters
    ----------
    vectors
        One flat vector per member, all the same length.
    weights
        Per-member weights (default equal).
    failed_senders
        member -> parts it delivered before failing; it is dropped from every other part's reduction, and gets no
        result (None).
    failed_reducers
        Members whose reduced part never comes back (a crashed member is usually both a failed sender and reducer).
    reassign
        True: a failed reducer's part is reduced by :func:`plan_reduction`'s substitute from the live members' parts
        (the failed member's own contribution to it is lost with it). False (hivemind): every member keeps its own
        values for that part (delta 0).

    Returns
    -------
    list
        The averaged vector of each live member (None for a failed sender).
    """
    m = len(vectors)
    if m == 0:
        raise ValueError("vectors must not be empty")
    if any(v.ndim != 1 or v.numel() != vectors[0].numel() for v in vectors):
        raise ValueError("vectors must be flat and of equal length")
    w = [1.0] * m if weights is None else list(weights)
    if len(w) != m:
        raise ValueError(f"weights must have {m} entries, got {len(w)}")
    senders = {j: set(parts) for j, parts in (failed_senders or {}).items()}
    reducers = set(failed_reducers)
    if any(not 0 <= j < m for j in [*senders, *reducers]):
        raise ValueError(f"failed members must be in 0..{m - 1}")
    split = [split_parts(v, m) for v in vectors]
    reduced: list[torch.Tensor | None] = []
    for j in range(m):
        if j not in reducers:  # its own reducer: every sender that delivered part j
            contributors = [k for k in range(m) if k not in senders or j in senders[k]]
        elif reassign:  # a substitute collects part j again from the members still sending
            contributors = [k for k in range(m) if k not in senders]
        else:  # hivemind: nobody reduces it, every member keeps its own values
            contributors = []
        total = sum(w[k] for k in contributors)
        reduced.append(reduce_part([split[k][j] for k in contributors], [w[k] for k in contributors]) if total > 0 else None)
    out: list[torch.Tensor | None] = []
    for k in range(m):
        if k in senders:
            out.append(None)
            continue
        out.append(assemble([reduced[j] if reduced[j] is not None else split[k][j] for j in range(m)]))
    return out


@dataclass(frozen=True)
class ButterflyTraffic:
    """Bytes one member sends and receives in a butterfly all-reduce, per phase."""

    reduce_scatter_sent: int
    reduce_scatter_received: int
    all_gather_sent: int
    all_gather_received: int

    @property
    def sent(self) -> int:
        return self.reduce_scatter_sent + self.all_gather_sent

    @property
    def received(self) -> int:
        return self.reduce_scatter_received + self.all_gather_received


def butterfly_bytes(numel: int, m: int, member: int = 0, itemsize: int = 4) -> ButterflyTraffic:
    """Exact traffic of member `member` of a group of m over a vector of `numel` entries of `itemsize` bytes.

    Reduce-scatter: it sends every part but its own (S - s_j) and receives its part from the m-1 others ((m-1) s_j);
    all-gather: it sends its reduced part to the m-1 others ((m-1) s_j) and receives the rest (S - s_j). With equal
    parts each direction totals 2 (m-1)/m S, against (m-1) S received by MAR-FL's all-gather of full models.
    """
    _check_int("itemsize", itemsize, 1)
    bounds = part_bounds(numel, m)
    if not 0 <= member < m:
        raise ValueError(f"member {member} outside 0..{m - 1}")
    own = (bounds[member][1] - bounds[member][0]) * itemsize
    total = numel * itemsize
    return ButterflyTraffic(total - own, (m - 1) * own, (m - 1) * own, total - own)


def allgather_bytes(size_bytes: int, m: int) -> int:
    """Bytes one member receives when a group of m exchanges full vectors of `size_bytes` (MAR-FL): (m-1) S."""
    _check_int("size_bytes", size_bytes, 0)
    _check_int("m", m, 1)
    return (m - 1) * size_bytes
