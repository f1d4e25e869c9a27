"""A counting dask scheduler: fails when code computes more often than allowed."""

from __future__ import annotations

import contextlib

import dask


class CountingScheduler:
    """A dask scheduler (synchronous) that counts how often it is asked to compute.

    Raises ``RuntimeError`` on the call that exceeds ``max_computes``.
    """

    def __init__(self, max_computes: int = 0):
        self.max_computes = max_computes
        self.total_computes = 0

    def __call__(self, dsk, keys, **kwargs):
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(
                f"too many dask computations: {self.total_computes} > allowed {self.max_computes}"
            )
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0):
    """Context manager: any dask compute beyond ``max_computes`` inside it raises ``RuntimeError``."""
    scheduler = CountingScheduler(max_computes)
    with dask.config.set(scheduler=scheduler):
        yield scheduler
