"""Datasets, client partitions and their plots (no network, no files except those handed in)."""

from .datasets import DATASET_INFO, DATASET_NAMES, NATURAL_DATASETS, OFFLINE_DATASETS, Dataset, load_dataset
from .errors import DataError
from .partition import Partition, PartitionArgs, make_partition
from .plot import plot_label_distribution

__all__ = [
    "DATASET_INFO",
    "DATASET_NAMES",
    "NATURAL_DATASETS",
    "OFFLINE_DATASETS",
    "DataError",
    "Dataset",
    "Partition",
    "PartitionArgs",
    "load_dataset",
    "make_partition",
    "plot_label_distribution",
]
