"""Partitioners, per-peer local splits and partition statistics."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from meshfl.config import DataConfig
from meshfl.data import DataError, Dataset, load_dataset, partition_indices, partition_stats, split_for_peers

MNIST_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
PARTITIONS = ["iid", "dirichlet", "shards", "quantity"]


@pytest.fixture(scope="module")
def mnist_labels() -> np.ndarray:
    """MNIST-sized labels with MNIST's class counts, in shuffled order (no file needed)."""
    labels = np.repeat(np.arange(10), MNIST_COUNTS)
    return np.random.default_rng(123).permutation(labels)


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    train, _ = load_dataset(DataConfig(dataset="digits"), seed=0)
    return train.y.numpy()


def _check_valid(parts: list[np.ndarray], n: int, num_peers: int) -> np.ndarray:
    """Disjoint, in range, sorted, non-empty; returns all indices used."""
    assert len(parts) == num_peers
    for part in parts:
        assert part.dtype == np.int64 and len(part) >= 1
        assert np.all(np.diff(part) > 0)  # sorted and no duplicates within a peer
    used = np.concatenate(parts)
    assert len(np.unique(used)) == len(used)  # no index given to two peers
    assert used.min() >= 0 and used.max() < n
    return used


def _mean_max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def _partition(labels: np.ndarray, peers: int, seed: int = 0, **fields) -> list[np.ndarray]:
    return partition_indices(labels, peers, DataConfig(**fields), np.random.default_rng(seed))


# ---------------------------------------------------------------- iid


@pytest.mark.parametrize("peers", [1, 7, 100, 1000])
def test_iid_uses_everything_evenly(mnist_labels: np.ndarray, peers: int) -> None:
    parts = _partition(mnist_labels, peers, partition="iid")
    used = _check_valid(parts, len(mnist_labels), peers)
    sizes = [len(p) for p in parts]
    assert len(used) == len(mnist_labels) and max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------- dirichlet


def test_dirichlet_skew_follows_alpha(mnist_labels: np.ndarray) -> None:
    iid = _mean_max_class_fraction(mnist_labels, _partition(mnist_labels, 20, partition="iid"))
    skewed_parts = _partition(mnist_labels, 20, partition="dirichlet", dirichlet_alpha=0.1)
    flat_parts = _partition(mnist_labels, 20, partition="dirichlet", dirichlet_alpha=1000.0)
    for parts in (skewed_parts, flat_parts):
        assert len(_check_valid(parts, len(mnist_labels), 20)) == len(mnist_labels)
    skewed = _mean_max_class_fraction(mnist_labels, skewed_parts)
    flat = _mean_max_class_fraction(mnist_labels, flat_parts)
    assert iid < 0.13 and skewed > 0.5 and skewed > iid + 0.3
    assert abs(flat - iid) < 0.02


@pytest.mark.parametrize(("n", "peers", "alpha"), [(60000, 1000, 0.05), (50, 50, 0.01), (200, 150, 0.1)])
def test_dirichlet_every_peer_gets_a_sample(n: int, peers: int, alpha: float) -> None:
    labels = np.arange(n) % 10
    parts = _partition(labels, peers, partition="dirichlet", dirichlet_alpha=alpha)
    assert len(_check_valid(parts, n, peers)) == n


def test_more_peers_than_samples_is_a_data_error() -> None:
    with pytest.raises(DataError, match="^peers: 11 peers but only 10 training samples"):
        _partition(np.arange(10) % 2, 11, partition="dirichlet")


# ---------------------------------------------------------------- shards


@pytest.mark.parametrize("peers", [1, 3, 10, 37, 100, 1000])
@pytest.mark.parametrize("per_peer", [1, 2, 3])
def test_shards_limit_classes_per_peer_mnist(mnist_labels: np.ndarray, peers: int, per_peer: int) -> None:
    parts = _partition(mnist_labels, peers, partition="shards", classes_per_peer=per_peer)
    used = _check_valid(parts, len(mnist_labels), peers)
    assert max(len(np.unique(mnist_labels[p])) for p in parts) <= per_peer
    if peers * per_peer >= 10:  # enough shards to cover every class: nothing is dropped
        assert len(used) == len(mnist_labels)
        sizes = [len(p) for p in parts]
        assert max(sizes) <= 1.5 * min(sizes)  # shards are about equal in size


@pytest.mark.parametrize(("peers", "per_peer"), [(5, 2), (10, 2), (50, 1), (100, 3), (400, 2)])
def test_shards_limit_classes_per_peer_digits(digits_labels: np.ndarray, peers: int, per_peer: int) -> None:
    parts = _partition(digits_labels, peers, partition="shards", classes_per_peer=per_peer)
    assert len(_check_valid(parts, len(digits_labels), peers)) == len(digits_labels)
    assert max(len(np.unique(digits_labels[p])) for p in parts) <= per_peer


def test_shards_too_many_is_a_data_error() -> None:
    with pytest.raises(DataError, match="data.classes_per_peer"):
        _partition(np.arange(10) % 2, 6, partition="shards", classes_per_peer=2)


# ---------------------------------------------------------------- quantity


def test_quantity_sizes_within_bounds(mnist_labels: np.ndarray) -> None:
    parts = _partition(mnist_labels, 200, partition="quantity", min_samples=20, max_samples=250)
    _check_valid(parts, len(mnist_labels), 200)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 20 and sizes.max() <= 250
    assert sizes.std() > 30  # sizes really vary
    assert _mean_max_class_fraction(mnist_labels, parts) < 0.35  # samples are drawn IID


def test_quantity_exceeding_dataset_names_max_samples() -> None:
    with pytest.raises(DataError, match=r"^data\.max_samples: .*N=100") as info:
        _partition(np.arange(100) % 10, 5, partition="quantity", min_samples=30, max_samples=40)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- determinism, speed


@pytest.mark.parametrize("partition", PARTITIONS)
def test_partitions_are_deterministic(mnist_labels: np.ndarray, partition: str) -> None:
    fields = {"partition": partition, "min_samples": 10, "max_samples": 100}
    a = _partition(mnist_labels, 50, seed=7, **fields)
    b = _partition(mnist_labels, 50, seed=7, **fields)
    c = _partition(mnist_labels, 50, seed=8, **fields)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def test_partitioning_60k_for_1000_peers_is_fast(mnist_labels: np.ndarray) -> None:
    start = time.perf_counter()
    for partition in PARTITIONS:
        _partition(mnist_labels, 1000, partition=partition, dirichlet_alpha=0.1, min_samples=10, max_samples=50)
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------- split_for_peers, partition_stats


def _indexed_dataset(labels: np.ndarray) -> Dataset:
    """x holds each sample's own index, so peers' data can be traced back to the source rows."""
    return Dataset(torch.arange(len(labels), dtype=torch.float32)[:, None], torch.from_numpy(labels), 10, "idx")


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_split_for_peers_covers_dataset_once(mnist_labels: np.ndarray, partition: str) -> None:
    train = _indexed_dataset(mnist_labels[:5000])
    peers = split_for_peers(train, 25, DataConfig(partition=partition, local_test_fraction=0.2), seed=1)
    rows = torch.cat([torch.cat([p.train.x, p.test.x]) for p in peers])[:, 0].long().numpy()
    assert sorted(rows.tolist()) == list(range(5000))
    for peer in peers:
        n = len(peer.train) + len(peer.test)
        assert len(peer.train) >= 1 and abs(len(peer.test) - 0.2 * n) <= 1
        assert torch.equal(peer.train.y, train.y[peer.train.x[:, 0].long()])
    stats = partition_stats(peers, 10)
    assert sum(s["train_samples"] + s["test_samples"] for s in stats) == len(train)
    assert np.sum([s["train_label_counts"] for s in stats], axis=0).tolist() == np.bincount(
        np.concatenate([p.train.y.numpy() for p in peers]), minlength=10).tolist()
    total = np.sum([np.add(s["train_label_counts"], s["test_label_counts"]) for s in stats], axis=0)
    assert total.tolist() == np.bincount(mnist_labels[:5000], minlength=10).tolist()
    assert [s["peer"] for s in stats] == list(range(25))


def test_split_for_peers_small_peers_keep_a_train_sample() -> None:
    train = _indexed_dataset(np.arange(30) % 10)
    peers = split_for_peers(train, 15, DataConfig(partition="iid", local_test_fraction=0.9), seed=0)
    assert all(len(p.train) == 1 and len(p.test) == 1 for p in peers)
    no_test = split_for_peers(train, 15, DataConfig(partition="iid", local_test_fraction=0.0), seed=0)
    assert all(len(p.train) == 2 and len(p.test) == 0 for p in no_test)


def test_split_for_peers_is_deterministic_per_seed(mnist_labels: np.ndarray) -> None:
    train = _indexed_dataset(mnist_labels[:2000])
    config = DataConfig(partition="dirichlet", dirichlet_alpha=0.3)
    a, b, c = (split_for_peers(train, 10, config, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(p.train.x, q.train.x) and torch.equal(p.test.x, q.test.x) for p, q in zip(a, b))
    assert not all(p.train.x.shape == q.train.x.shape and torch.equal(p.train.x, q.train.x) for p, q in zip(a, c))


def test_train_samples_takes_a_seeded_subset_before_partitioning() -> None:
    train, _ = load_dataset(DataConfig(), 0)
    config = DataConfig(train_samples=500, partition="dirichlet")
    peers = split_for_peers(train, 5, config, seed=3)
    assert sum(len(p.train) + len(p.test) for p in peers) == 500
    again = split_for_peers(train, 5, config, seed=3)
    assert all(torch.equal(a.train.y, b.train.y) for a, b in zip(peers, again, strict=True))
    whole = split_for_peers(train, 5, DataConfig(train_samples=10**6), seed=3)  # more than there is: all of it
    assert sum(len(p.train) + len(p.test) for p in whole) == len(train)


# ---------------------------------------------------------------- dominant (non-IID level chi)


def _dominant_histograms(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=10) for p in parts])


@pytest.mark.parametrize(("peers", "chi"), [(30, 0.8), (10, 0.5), (7, 0.95), (100, 0.1), (30, 1.0), (30, 0.0)])
def test_dominant_gives_each_peer_chi_of_one_label_and_the_rest_evenly(mnist_labels: np.ndarray, peers: int, chi: float) -> None:
    parts = _partition(mnist_labels, peers, seed=3, partition="dominant", dominant_fraction=chi)
    _check_valid(parts, len(mnist_labels), peers)  # disjoint: no sample given to two peers
    size = len(parts[0])
    assert all(len(p) == size for p in parts) and size >= 1
    hist = _dominant_histograms(mnist_labels, parts)
    main = int(np.floor(chi * size + 0.5))
    dominant = [int(np.argmax(h)) if chi > 0.5 else None for h in hist]
    for peer, h in enumerate(hist):
        label = dominant[peer] if dominant[peer] is not None else int(np.flatnonzero(h == main)[0])
        assert h[label] == main  # chi of its samples, to the nearest sample
        others = np.delete(h, label)
        share = (size - main) / 9
        assert others.sum() == size - main and np.all(np.abs(others - share) < 1)  # floor or ceil of the even share
    assert abs(hist.max(axis=1) / size - max(chi, (1 - chi) / 9)).max() <= 1 / size + 1e-12
    if chi > 0.5:  # peers take the labels in turn: every label is dominant for peers // 10 or one more peers
        counts = np.bincount(dominant, minlength=10)
        assert counts.max() - counts.min() <= 1


def test_dominant_sizes_are_as_large_as_the_classes_allow(mnist_labels: np.ndarray) -> None:
    """30 peers, 10 labels, chi 0.8: each label is dominant for 3 peers, so each class must hold about
    3 x 0.8 m + 27 x 0.2 m / 9 = 3 m; the smallest class (5421) bounds m, one more sample would not fit."""
    parts = _partition(mnist_labels, 30, partition="dominant", dominant_fraction=0.8)
    size = len(parts[0])
    assert 5421 // 3 - 5 <= size <= 5421 // 3
    demand = _dominant_histograms(mnist_labels, parts).sum(axis=0)
    assert np.all(demand <= MNIST_COUNTS) and np.any(np.array(MNIST_COUNTS) - demand < 3)


def test_dominant_labels_and_samples_come_from_the_seed(mnist_labels: np.ndarray) -> None:
    def run(seed: int) -> list[np.ndarray]:
        return _partition(mnist_labels, 20, seed=seed, partition="dominant", dominant_fraction=0.9)

    a, b, c = run(1), run(1), run(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    labels_a = [int(np.argmax(h)) for h in _dominant_histograms(mnist_labels, a)]
    assert sorted(labels_a[:10]) == list(range(10)) and labels_a[10:] == labels_a[:10]  # peers cycle over the labels


def test_dominant_through_split_for_peers_on_digits(digits_labels: np.ndarray) -> None:
    train = _indexed_dataset(digits_labels)
    peers = split_for_peers(train, 10, DataConfig(partition="dominant", dominant_fraction=0.6, local_test_fraction=0.0), seed=0)
    stats = partition_stats(peers, 10)
    rows = torch.cat([p.train.x for p in peers])[:, 0].long().numpy()
    assert len(np.unique(rows)) == len(rows)
    sizes = {s["train_samples"] for s in stats}
    assert len(sizes) == 1
    size = sizes.pop()
    assert sorted(max(s["train_label_counts"]) for s in stats) == [round(0.6 * size)] * 10


def test_dominant_refuses_data_it_cannot_satisfy_naming_the_field() -> None:
    with pytest.raises(DataError, match="data.dominant_fraction: the training set has one label only"):
        _partition(np.zeros(50, dtype=np.int64), 5, partition="dominant", dominant_fraction=0.5)
    assert [len(p) for p in _partition(np.zeros(50, dtype=np.int64), 5, partition="dominant", dominant_fraction=1.0)] == [10] * 5
    labels = np.array([0] * 30 + [1])  # 4 peers, 2 of them dominant in label 1, which has one sample
    with pytest.raises(DataError, match=r"data.dominant_fraction: 4 peers cannot each get a sample") as info:
        _partition(labels, 4, partition="dominant", dominant_fraction=0.9)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="dominant_fraction"):
        DataConfig(partition="dominant", dominant_fraction=1.5)
