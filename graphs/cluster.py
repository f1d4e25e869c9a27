"""Dask clusters for skystack runs: start a local one, or connect to a running scheduler.

Only the command line and notebooks call these; nothing in ``pipeline`` creates a client. A client
created here becomes dask's default scheduler, so ``dask.compute`` (and ``graphs.execute``) run on it.

``address`` may be a scheduler address (``tcp://10.0.0.5:8786``, ``10.0.0.5:8786``) or the path of
a scheduler file written by ``dask scheduler --scheduler-file FILE`` (convenient on batch systems
where the scheduler's host is only known once the job runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask.system
from distributed import Client

from pipeline.errors import SkystackError

__all__ = ["start_local_cluster", "connect", "cluster", "default_n_workers"]


def default_n_workers() -> int:
    """Cores available to this process (CPU affinity and cgroup quotas respected)."""
    return max(1, int(dask.system.CPU_COUNT))


def start_local_cluster(
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int | float | None = "auto",
    *,
    dashboard: bool = False,
) -> Client:
    """A client of a new local cluster of worker processes, listening on 127.0.0.1 only.

    ``n_workers`` defaults to the number of cores; ``memory_limit`` is per worker (``"auto"``
    divides the machine's memory between the workers). The scheduler's HTTP endpoints listen on a
    free port of 127.0.0.1; the dashboard is served there only if ``dashboard`` is true (it needs
    ``bokeh``). Closing the client shuts the cluster down.
    """
    if n_workers is None:
        n_workers = default_n_workers()
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    if isinstance(threads_per_worker, bool) or not isinstance(threads_per_worker, int) or threads_per_worker < 1:
        raise ValueError(f"threads_per_worker must be a positive integer, got {threads_per_worker!r}")
    return Client(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        processes=True,
        host="127.0.0.1",
        # The scheduler always serves HTTP (health and metrics); keep it on a free local port.
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": dashboard},
    )


def connect(address: str, *, timeout: float = 10.0) -> Client:
    """A client of the running scheduler at ``address`` (an address or a scheduler-file path).

    Raises :class:`~pipeline.errors.SkystackError` naming the address when the scheduler cannot
    be reached within ``timeout`` seconds. Closing the client leaves the scheduler running.
    """
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"scheduler address must be a non-empty string, got {address!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    address = address.strip()
    looks_like_file = "://" not in address and (address.endswith(".json") or os.sep in address)
    if looks_like_file and not os.path.isfile(address):
        raise SkystackError(f"scheduler file {address!r} does not exist (has the scheduler started?)")
    try:
        if os.path.isfile(address):
            return Client(scheduler_file=address, timeout=timeout)
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise SkystackError(
            f"cannot reach the dask scheduler at {address!r} within {timeout:g} s: {exc}"
        ) from exc


@contextmanager
def cluster(address: str | None = None, **local_kwargs) -> Iterator[Client]:
    """Yield a client: of the scheduler at ``address`` if given, else of a new local cluster.

    ``local_kwargs`` go to :func:`start_local_cluster` and are refused together with an address.
    On exit the client is closed; a local cluster started here is shut down with it, a remote
    scheduler and its workers keep running.
    """
    if address is not None and local_kwargs:
        raise ValueError(
            f"local cluster options {sorted(local_kwargs)} cannot be combined with a scheduler address {address!r}"
        )
    client = connect(address) if address is not None else start_local_cluster(**local_kwargs)
    try:
        yield client
    finally:
        client.close()
