"""Execution: the only module of skystack that computes.

A plan is a list of :class:`Unit` s (a visit's warps, a patch's coadd, a difference image). For each
unit :func:`run_units` asks whether it is already done (its completion marker exists), builds the
lazy writes of those that are not, computes them in batches (on a ``distributed.Client`` when one
is given, else on the local threaded scheduler), writes the marker of each unit whose writes all
succeeded, and reports per unit. A failure in one unit never stops the others, and a failed unit
leaves no marker, so its partial data stay invisible and a re-run redoes it.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import dask

from pipeline.errors import SkystackError

__all__ = ["Unit", "UnitResult", "RunReport", "RunError", "run_units"]


@dataclass(frozen=True)
class Unit:
    """One unit of work.

    ``key`` names it for people (``"coadd tract=0 patch=1,2 band=r"``); ``build()`` returns the
    lazy writes (dask collections, usually ``Delayed``) and is only called when ``done()`` is
    false; ``finish()`` writes the completion marker once every write has succeeded.
    """

    key: str
    build: Callable[[], Sequence[Any]]
    done: Callable[[], bool]
    finish: Callable[[], None]


@dataclass(frozen=True)
class UnitResult:
    """What happened to one unit: ``status`` is ``done``, ``skipped`` or ``failed``."""

    key: str
    status: str
    seconds: float
    error: str | None = None
    attempts: int = 0


@dataclass
class RunReport:
    """Outcome of :func:`run_units`, one :class:`UnitResult` per unit in input order."""

    results: list[UnitResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def done(self) -> list[str]:
        return [r.key for r in self.results if r.status == "done"]

    @property
    def skipped(self) -> list[str]:
        return [r.key for r in self.results if r.status == "skipped"]

    @property
    def failed(self) -> list[str]:
        return [r.key for r in self.results if r.status == "failed"]

    @property
    def errors(self) -> dict[str, str]:
        return {r.key: r.error or "" for r in self.results if r.status == "failed"}

    @property
    def timings(self) -> dict[str, float]:
        return {r.key: r.seconds for r in self.results}

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        text = (
            f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed "
            f"in {self.seconds:.1f} s"
        )
        for key, err in self.errors.items():
            text += f"\n  FAILED {key}: {err}"
        return text

    def raise_for_failures(self) -> None:
        """Raise :class:`RunError` listing the failed units (no-op when all succeeded)."""
        if self.failed:
            raise RunError(self)

    def to_dict(self) -> dict:
        return {
            "seconds": self.seconds,
            "results": [
                {"key": r.key, "status": r.status, "seconds": r.seconds, "error": r.error, "attempts": r.attempts}
                for r in self.results
            ],
        }


class RunError(SkystackError):
    """Some units of a run failed; ``report`` holds the whole :class:`RunReport`."""

    def __init__(self, report: RunReport):
        self.report = report
        lines = [f"{len(report.failed)} of {len(report.results)} units failed:"]
        lines += [f"  {key}: {err}" for key, err in report.errors.items()]
        super().__init__("\n".join(lines))


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _as_list(built) -> list:
    if built is None:
        return []
    if isinstance(built, (list, tuple)):
        return list(built)
    return [built]


class _Progress:
    def __init__(self, total: int, enabled: bool, stream: TextIO | None):
        self.total = total
        self.enabled = enabled
        self.stream = stream
        self.count = 0

    def __call__(self, result: UnitResult) -> None:
        self.count += 1
        if not self.enabled:
            return
        stream = self.stream or sys.stderr
        line = f"[{self.count}/{self.total}] {result.status:7s} {result.key} ({result.seconds:.1f} s)"
        if result.error:
            line += f": {result.error.splitlines()[0]}"
        print(line, file=stream, flush=True)


def run_units(
    units: Iterable[Unit],
    *,
    client=None,
    retries: int = 1,
    progress: bool = True,
    batch_size: int = 8,
    raise_on_error: bool = False,
    stream: TextIO | None = None,
    threads: int | None = None,
) -> RunReport:
    """Run every unit that is not done yet and return a :class:`RunReport`.

    Units are taken ``batch_size`` at a time: each is checked (``done()``), built, and its writes
    computed concurrently with the rest of its batch, on ``client`` (a ``distributed.Client``, with
    ``retries`` per task) or on the local threaded scheduler (one shared pool of threads; a failed
    unit is recomputed on its own up to ``retries`` more times). ``finish()`` runs for each unit
    whose writes all succeeded. Failures are recorded per unit with the exception text; with
    ``raise_on_error`` a :class:`RunError` listing them is raised after the whole run.
    ``progress`` prints one line per unit to ``stream`` (default stderr). ``threads`` sizes the
    local pool; by default dask's ``num_workers`` setting, else the number of cores.
    """
    units = list(units)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if retries < 0:
        raise ValueError(f"retries must be non-negative, got {retries}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    keys = [u.key for u in units]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"unit keys must be unique; repeated: {dupes}")
    start = time.perf_counter()
    report_progress = _Progress(len(units), progress, stream)
    results: dict[str, UnitResult] = {}

    for first in range(0, len(units), batch_size):
        batch = units[first : first + batch_size]
        built: list[tuple[Unit, list, float]] = []
        for unit in batch:
            t0 = time.perf_counter()
            try:
                if unit.done():
                    res = UnitResult(unit.key, "skipped", time.perf_counter() - t0)
                    results[unit.key] = res
                    report_progress(res)
                    continue
                writes = _as_list(unit.build())
            except Exception as exc:
                res = UnitResult(unit.key, "failed", time.perf_counter() - t0, _describe(exc), 0)
                results[unit.key] = res
                report_progress(res)
                continue
            built.append((unit, writes, t0))
        if not built:
            continue
        if client is not None:
            outcomes = _compute_distributed(client, built, retries)
        else:
            outcomes = _compute_local(built, retries, threads)
        for unit, _, t0 in built:
            error, attempts, t_end = outcomes[unit.key]
            if error is None:
                t_finish = time.perf_counter()
                try:
                    unit.finish()
                except Exception as exc:
                    error = "finish: " + _describe(exc)
                t_end += time.perf_counter() - t_finish
            status = "done" if error is None else "failed"
            res = UnitResult(unit.key, status, t_end - t0, error, attempts)
            results[unit.key] = res
            report_progress(res)

    report = RunReport([results[u.key] for u in units], time.perf_counter() - start)
    if raise_on_error:
        report.raise_for_failures()
    return report


def _compute_local(built, retries: int, threads: int | None) -> dict[str, tuple[str | None, int, float]]:
    """Compute a batch on one shared thread pool, each unit in its own scheduler call.

    Every unit has its own ``dask.compute`` (so a failure is attributed to its unit and retried
    alone) while all of them share one pool of worker threads.
    """
    out: dict[str, tuple[str | None, int, float]] = {}
    workers = threads or dask.config.get("num_workers", None) or os.cpu_count() or 1
    with ThreadPoolExecutor(workers, thread_name_prefix="skystack-compute") as pool:

        def run(writes) -> tuple[str | None, int, float]:
            error = None
            attempts = 0
            for attempts in range(1, retries + 2):
                try:
                    if writes:
                        dask.compute(*writes, scheduler="threads", pool=pool)
                    error = None
                    break
                except Exception as exc:
                    error = _describe(exc)
            return error, attempts, time.perf_counter()

        with ThreadPoolExecutor(len(built), thread_name_prefix="skystack-unit") as drivers:
            futures = {unit.key: drivers.submit(run, writes) for unit, writes, _ in built}
            for key, future in futures.items():
                out[key] = future.result()
    return out


def _compute_distributed(client, built, retries: int) -> dict[str, tuple[str | None, int, float]]:
    """Compute a batch on a distributed client; each unit's futures are judged on their own."""
    from distributed import as_completed

    futures_of: dict[str, list] = {}
    owner: dict[Any, str] = {}
    out: dict[str, tuple[str | None, int, float]] = {}
    for unit, writes, _ in built:
        if not writes:
            out[unit.key] = (None, 1, time.perf_counter())
            continue
        try:
            futures = client.compute(writes, retries=retries)
        except Exception as exc:
            out[unit.key] = (_describe(exc), 1, time.perf_counter())
            continue
        futures = futures if isinstance(futures, list) else [futures]
        futures_of[unit.key] = futures
        for f in futures:
            owner[f] = unit.key
    pending = {key: len(fs) for key, fs in futures_of.items()}
    errors: dict[str, str] = {}
    for future in as_completed([f for fs in futures_of.values() for f in fs]):
        key = owner[future]
        if future.status == "error" and key not in errors:
            exc = future.exception()
            errors[key] = _describe(exc) if exc is not None else "failed on the cluster"
        elif future.status == "cancelled" and key not in errors:
            errors[key] = "cancelled on the cluster"
        pending[key] -= 1
        if pending[key] == 0:
            out[key] = (errors.get(key), retries + 1 if key in errors else 1, time.perf_counter())
    for fs in futures_of.values():
        for f in fs:
            f.release()
    return out

