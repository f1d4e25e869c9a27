"""What a repository holds, as the plan builders need it: tracts, visits, which patches they touch.

Everything here reads metadata only (sky map, exposure WCSs and shapes); no pixel is computed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from pipeline.errors import RepositoryError
from pipeline.io.repo import Repository
from pipeline.model.skymap import Patch, SkyMap, Tract
from pipeline.model.wcs import get_wcs

log = logging.getLogger(__name__)

__all__ = ["repo_tracts", "exposures_by_visit", "exposure_patches", "detectors_on_tract", "visit_units"]


def repo_tracts(repo: Repository, tract: int | None = None) -> list[Tract]:
    """The tracts of the repository's sky map (only ``tract`` if given)."""
    if repo.skymap_json is None:
        raise RepositoryError(f"the repository {repo.url} has no sky map; ingest exposures first", ids={"file": repo.url})
    skymap = SkyMap.from_json(repo.skymap_json)
    return [skymap.tract(tract)] if tract is not None else [skymap.tract(t) for t in skymap.tract_ids]


def exposures_by_visit(repo: Repository, visits: Iterable[int] | None = None) -> dict[int, list[int]]:
    """``{visit: [detector, ...]}`` of the complete exposures (of ``visits`` if given, each required)."""
    wanted = None if visits is None else sorted({int(v) for v in visits})
    by_visit: dict[int, list[int]] = {}
    for r in repo.list_exposures():
        if r["complete"] and (wanted is None or r["visit"] in wanted):
            by_visit.setdefault(r["visit"], []).append(r["detector"])
    if wanted is not None:
        missing = [v for v in wanted if v not in by_visit]
        if missing:
            raise RepositoryError(f"no exposures of visit(s) {missing} in {repo.url}", ids={"visit": missing[0]})
    return {v: sorted(d) for v, d in sorted(by_visit.items())}


def exposure_patches(repo: Repository, visit: int, detector: int, tract: Tract) -> list[Patch]:
    """The patches of ``tract`` that the exposure's footprint touches."""
    ds = repo.open_exposure(visit, detector)
    shape = (ds.sizes["y"], ds.sizes["x"])
    x0, y0 = int(ds.indexes["x"][0]), int(ds.indexes["y"][0])
    return tract.patches_overlapping(get_wcs(ds), shape, x0=x0, y0=y0)


def detectors_on_tract(repo: Repository, tract: Tract, by_visit: dict[int, list[int]]) -> dict[int, list[int]]:
    """``{visit: [detector, ...]}`` restricted to the detectors that touch ``tract`` (visits with none dropped)."""
    out = {}
    for visit, detectors in by_visit.items():
        touching = [d for d in detectors if exposure_patches(repo, visit, d, tract)]
        if touching:
            out[visit] = touching
    return out


def visit_units(repo: Repository, *, tract: int | None, visits: Iterable[int] | None, what: str,
                make: Callable[[Tract, int, list[int]], object]) -> list:
    """``make(tract, visit, detectors)`` for every (tract, visit) whose detectors touch the tract.

    Visits that touch no tract make nothing (logged, naming ``what`` would have been made).
    """
    by_visit = exposures_by_visit(repo, visits)
    units = []
    for t in repo_tracts(repo, tract):
        on_tract = detectors_on_tract(repo, t, by_visit)
        for visit in by_visit:
            if visit not in on_tract:
                log.info("visit %s does not touch tract %s: no %s", visit, t.id, what)
                continue
            units.append(make(t, visit, on_tract[visit]))
    return units
