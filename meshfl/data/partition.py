"""Split a training set among peers (iid, Dirichlet label skew, pathological shards, quantity skew, dominant label).

All partitioners are vectorised over samples (60k labels x 1000 peers takes milliseconds),
deterministic given the Generator, use every index at most once and return sorted arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshfl.config import DataConfig
from meshfl.data.datasets import DataError, Dataset

DIRICHLET_REDRAWS = 10


@dataclass(frozen=True)
class PeerData:
    """One peer's share of the training set.

    Attributes
    ----------
    train : Dataset
        The peer's local training split.
    test : Dataset
        The peer's local test split.
    """

    train: Dataset
    test: Dataset  # the peer's local test split


def partition_indices(labels: np.ndarray, num_peers: int, config: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Partition sample indices among peers, following `config.partition`.

    Parameters
    ----------
    labels : numpy.ndarray
        The training labels.
    num_peers : int
        Peers to split among.
    config : DataConfig
        `partition` (iid, dirichlet, shards, quantity, dominant) and its options.
    rng : numpy.random.Generator
        Where every draw comes from.

    Returns
    -------
    list[numpy.ndarray]
        One sorted int64 index array per peer.

    Raises
    ------
    DataError
        If there are fewer than one peer or more peers than samples, the partitioner is unknown,
        or its options do not fit the data.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if num_peers < 1:
        raise DataError(f"peers: must be >= 1 (got {num_peers})")
    if num_peers > n:
        raise DataError(f"peers: {num_peers} peers but only {n} training samples; lower peers or use more data")
    if config.partition == "iid":
        return _iid(n, num_peers, rng)
    if config.partition == "dirichlet":
        return _dirichlet(labels, num_peers, config.dirichlet_alpha, rng)
    if config.partition == "shards":
        return _shards(labels, num_peers, config.classes_per_peer, rng)
    if config.partition == "quantity":
        return _quantity(n, num_peers, config.min_samples, config.max_samples, rng)
    if config.partition == "dominant":
        return _dominant(labels, num_peers, config.dominant_fraction, rng)
    raise DataError(f"data.partition: unknown partitioner {config.partition!r}")


def split_for_peers(train: Dataset, num_peers: int, config: DataConfig, seed: int) -> list[PeerData]:
    """Partition `train` among peers, then split each peer's share into local train and test.

    Parameters
    ----------
    train : Dataset
        The training set; with `data.train_samples` a random subset of that size is used.
    num_peers : int
        Peers to split among.
    config : DataConfig
        The partition and `local_test_fraction`.
    seed : int
        The run seed; subset, partition and local splits draw from generators derived from it.

    Returns
    -------
    list[PeerData]
        One per peer.

    Raises
    ------
    DataError
        As `partition_indices`.
    """
    if config.train_samples is not None and config.train_samples < len(train):
        keep = np.random.default_rng([seed, 3]).choice(len(train), size=config.train_samples, replace=False)
        train = train.subset(np.sort(keep))
    parts = partition_indices(train.y.numpy(), num_peers, config, np.random.default_rng([seed, 1]))
    peers: list[PeerData] = []
    for peer, indices in enumerate(parts):
        local_train, local_test = _local_split(indices, config.local_test_fraction, np.random.default_rng([seed, 2, peer]))
        peers.append(PeerData(train=train.subset(local_train), test=train.subset(local_test)))
    return peers


def partition_stats(peers: list[PeerData], num_classes: int) -> list[dict]:
    """Summarise each peer's sizes and label histograms, for logs and for checking a partition's skew.

    Returns
    -------
    list[dict]
        Per peer: `peer`, `train_samples`, `test_samples`, `train_label_counts`, `test_label_counts`.
    """
    return [
        {
            "peer": i,
            "train_samples": len(p.train),
            "test_samples": len(p.test),
            "train_label_counts": np.bincount(p.train.y.numpy(), minlength=num_classes).tolist(),
            "test_label_counts": np.bincount(p.test.y.numpy(), minlength=num_classes).tolist(),
        }
        for i, p in enumerate(peers)
    ]


def _local_split(indices: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """With fraction > 0, a peer with >= 2 samples gets >= 1 test and keeps >= 1 train sample."""
    n = len(indices)
    n_test = int(np.floor(fraction * n + 0.5))
    if fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    elif fraction > 0:
        n_test = 0
    shuffled = rng.permutation(indices)
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])


# ---------------------------------------------------------------- partitioners


def _iid(n: int, num_peers: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(n), num_peers)]


def _quantity(n: int, num_peers: int, low: int, high: int, rng: np.random.Generator) -> list[np.ndarray]:
    sizes = rng.integers(low, high, size=num_peers, endpoint=True)
    total = int(sizes.sum())
    if total > n:
        raise DataError(f"data.max_samples: {num_peers} peers drew {total} samples in [{low}, {high}] but the "
                        f"training set has N={n}; lower data.max_samples/data.min_samples or peers")
    chosen = rng.permutation(n)[:total]
    return [np.sort(part) for part in np.split(chosen, np.cumsum(sizes)[:-1])]


def _dirichlet(labels: np.ndarray, num_peers: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Hsu et al. 2019: each class is split over peers with proportions ~ Dir(alpha)."""
    order, class_sizes = _shuffle_by_class(labels, rng)
    counts = _dirichlet_counts(class_sizes, num_peers, alpha, rng)
    for _ in range(DIRICHLET_REDRAWS):
        if counts.sum(axis=0).min() > 0:
            break
        counts = _dirichlet_counts(class_sizes, num_peers, alpha, rng)
    owner = np.repeat(np.tile(np.arange(num_peers), len(class_sizes)), counts.ravel())
    _fill_empty_peers(owner, num_peers, rng)
    return _group(order, owner, num_peers)


def _dirichlet_counts(class_sizes: np.ndarray, num_peers: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """[classes, peers] sample counts; each row sums to its class size."""
    proportions = rng.dirichlet(np.full(num_peers, alpha), size=len(class_sizes))
    bad = ~np.isfinite(proportions).all(axis=1)
    if bad.any():  # tiny alpha can underflow to NaN: the limit is all mass on one peer
        rows = np.flatnonzero(bad)  # one-hot rows, without a peers x peers identity matrix
        proportions[rows] = 0.0
        proportions[rows, rng.integers(num_peers, size=rows.size)] = 1.0
    bounds = np.floor(np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
    bounds = np.minimum(bounds, class_sizes[:, None])  # cumsum may overshoot 1.0 by rounding
    bounds[:, -1] = class_sizes
    return np.diff(bounds, axis=1, prepend=0)


def _fill_empty_peers(owner: np.ndarray, num_peers: int, rng: np.random.Generator) -> None:
    """Give each empty peer one random sample of the currently largest peer (loop over peers only)."""
    sizes = np.bincount(owner, minlength=num_peers)
    for peer in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        victim = rng.choice(np.flatnonzero(owner == donor))
        owner[victim] = peer
        sizes[donor] -= 1
        sizes[peer] += 1


def _shards(labels: np.ndarray, num_peers: int, per_peer: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al. 2017: label-sorted shards, `per_peer` random shards per peer.

    Shards are cut inside classes (never across a class boundary), so a peer holds at most
    `per_peer` distinct classes. With fewer shards than classes, whole classes form the
    shards and the classes left over are not used.
    """
    num_shards = num_peers * per_peer
    if num_shards > len(labels):
        raise DataError(f"data.classes_per_peer: {num_peers} peers x {per_peer} shards exceed the {len(labels)} "
                        "training samples; lower data.classes_per_peer or peers")
    order, class_sizes = _shuffle_by_class(labels, rng)
    shards_per_class = _apportion(num_shards, class_sizes, rng)
    shard_offset = np.cumsum(shards_per_class) - shards_per_class
    starts = np.cumsum(class_sizes) - class_sizes
    rank = np.arange(len(order)) - np.repeat(starts, class_sizes)
    per_class, size = np.repeat(shards_per_class, class_sizes), np.repeat(class_sizes, class_sizes)
    shard = np.repeat(shard_offset, class_sizes) + rank * per_class // size  # never crosses a class
    used = np.repeat(shards_per_class > 0, class_sizes)
    shard_owner = np.empty(num_shards, dtype=np.int64)
    shard_owner[rng.permutation(num_shards)] = np.arange(num_shards) // per_peer
    return _group(order[used], shard_owner[shard[used]], num_peers)


def _apportion(total: int, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shards per class by largest remainder: ~proportional to class size, 1..size each, summing to total."""
    k = len(sizes)
    if total < k:  # not enough shards for every class: pick `total` random classes, one shard each
        counts = np.zeros(k, dtype=np.int64)
        counts[rng.choice(k, size=total, replace=False)] = 1
        return counts
    target = total * sizes / sizes.sum()
    counts = np.clip(np.floor(target).astype(np.int64), 1, sizes)
    while (gap := total - int(counts.sum())) != 0:
        if gap > 0:  # classes furthest below their target (and with samples to spare) get one more
            priority = np.where(counts < sizes, target - counts, -np.inf)
        else:  # classes furthest above their target (keeping >= 1 shard) give one back
            priority = np.where(counts > 1, counts - target, -np.inf)
        pick = np.argsort(-priority, kind="stable")[: abs(gap)]
        pick = pick[np.isfinite(priority[pick])]
        counts[pick] += int(np.sign(gap))
    return counts


def _dominant(labels: np.ndarray, num_peers: int, chi: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Non-IID level chi: a fraction chi of each peer's samples share its dominant label, the rest spread evenly.

    The labels present are put in an order drawn from `rng`; peer p's dominant label is the
    (p mod K)-th of that order. Every peer gets the same number m of samples, the largest the
    class sizes allow: round(chi m) of its dominant label and the other m - round(chi m) spread over
    the K - 1 other labels, floor or ceil of their even share each (which labels get the ceil
    rotates with the dominant label and with p // K, so the demand on the classes stays level).

    Raises
    ------
    DataError
        If not even one sample per peer can be given this way (naming data.dominant_fraction).
    """
    order, class_sizes = _shuffle_by_class(labels, rng)
    k = len(class_sizes)
    if k == 1 and chi < 1:
        raise DataError(f"data.dominant_fraction: the training set has one label only, so no peer can hold {1 - chi:.0%} "
                        "of other labels; use data.dominant_fraction=1 or data with more labels")
    dominant = rng.permutation(k)[np.arange(num_peers) % k]
    low, high = 0, len(labels) // num_peers  # the largest feasible size lies in [low, high]; 0 always is
    while low < high:
        mid = (low + high + 1) // 2
        if (_dominant_counts(mid, chi, dominant, k).sum(axis=1) <= class_sizes).all():
            low = mid
        else:
            high = mid - 1
    if low == 0:
        raise DataError(f"data.dominant_fraction: {num_peers} peers cannot each get a sample with {chi:g} of them of one "
                        f"label: the training set's {k} labels have only {class_sizes.min()}..{class_sizes.max()} samples; "
                        "lower peers or change data.dominant_fraction")
    counts = _dominant_counts(low, chi, dominant, k)
    demand = counts.sum(axis=1)
    rank = np.arange(len(order)) - np.repeat(np.cumsum(class_sizes) - class_sizes, class_sizes)
    used = rank < np.repeat(demand, class_sizes)  # the first `demand` samples of each (shuffled) class
    owner = np.repeat(np.tile(np.arange(num_peers), k), counts.ravel())
    return _group(order[used], owner, num_peers)


def _dominant_counts(size: int, chi: float, dominant: np.ndarray, k: int) -> np.ndarray:
    """[classes, peers] counts when every peer holds `size` samples, round(chi size) of its dominant class.

    Every count is non-decreasing in `size`, so the largest feasible size can be bisected.
    """
    peers = len(dominant)
    main = int(np.floor(chi * size + 0.5))
    counts = np.zeros((k, peers), dtype=np.int64)
    if k > 1:
        rest = size - main
        relative = (np.arange(k)[:, None] - dominant[None, :]) % k  # 1..k-1 for the other labels, 0 for the dominant one
        position = (relative - 1 - np.arange(peers)[None, :] // k) % (k - 1)  # where the extra samples start rotates
        counts = rest // (k - 1) + (position < rest % (k - 1)).astype(np.int64)
    else:
        main = size
    counts[dominant, np.arange(peers)] = main
    return counts


# ---------------------------------------------------------------- helpers


def _shuffle_by_class(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices grouped by class (ascending), random within a class; and the class sizes."""
    order = np.lexsort((rng.random(len(labels)), labels))
    _, class_sizes = np.unique(labels, return_counts=True)
    return order, class_sizes.astype(np.int64)


def _group(indices: np.ndarray, owner: np.ndarray, num_peers: int) -> list[np.ndarray]:
    """Split `indices` by `owner` into num_peers sorted int64 arrays."""
    order = np.lexsort((indices, owner))
    sizes = np.bincount(owner, minlength=num_peers)
    return [part.astype(np.int64) for part in np.split(indices[order], np.cumsum(sizes)[:-1])]
