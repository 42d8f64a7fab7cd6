"""Datasets, loaders and partitioners: everything a run needs to hand each peer its data."""

from meshfl.data.datasets import DataError, Dataset, load_dataset
from meshfl.data.partition import PeerData, partition_indices, partition_stats, split_for_peers

__all__ = [
    "DataError",
    "Dataset",
    "PeerData",
    "load_dataset",
    "partition_indices",
    "partition_stats",
    "split_for_peers",
]
