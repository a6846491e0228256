"""Datasets: Fashion-MNIST loading and the long-tail subsampling profile."""

from longtail.data.datasets import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    DataError,
    class_groups,
    from_model_range,
    group_of,
    load_fashion_mnist,
    longtail_counts,
    longtail_indices,
    read_idx,
    to_model_range,
)

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "DataError",
    "class_groups",
    "from_model_range",
    "group_of",
    "load_fashion_mnist",
    "longtail_counts",
    "longtail_indices",
    "read_idx",
    "to_model_range",
]
