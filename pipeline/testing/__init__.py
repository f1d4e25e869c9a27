"""Test helpers shared by skystack's own tests and by anyone testing code built on it."""

from .assertions import assert_datasets_equal, assert_lazy, assert_numpy_dask_equal, graph_size
from .laziness import CountingScheduler, raise_if_dask_computes

__all__ = [
    "CountingScheduler",
    "raise_if_dask_computes",
    "assert_lazy",
    "assert_numpy_dask_equal",
    "assert_datasets_equal",
    "graph_size",
]
