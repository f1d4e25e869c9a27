"""Ingest FITS exposures into a repository, and set the repository's sky map."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr

from pipeline.errors import RepositoryError
from pipeline.io.fits import read_fits
from pipeline.io.repo import Repository
from pipeline.model.skymap import SkyMap
from pipeline.model.wcs import get_wcs

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """What an ingest did: written and skipped (visit, detector, file) triples."""

    written: list[tuple[int, int, str]] = field(default_factory=list)
    skipped: list[tuple[int, int, str]] = field(default_factory=list)
    skymap_created: bool = False


def footprint(ds: xr.Dataset) -> tuple:
    """``(wcs, (ny, nx), (x0, y0))`` of an exposure, as the sky map builders take it."""
    return (get_wcs(ds), (ds.sizes["y"], ds.sizes["x"]), (int(ds.x[0]), int(ds.y[0])))


def read_all(paths: Sequence[str | os.PathLike], *, psf_files: Mapping[str, str] | None = None) -> list[xr.Dataset]:
    """Read and check every file before anything is written (a bad file stops the whole ingest)."""
    datasets, seen = [], {}
    for path in paths:
        ds = read_fits(path, psf_file=(psf_files or {}).get(os.fspath(path)))
        key = (ds.attrs.get("visit"), ds.attrs.get("detector"))
        if None in key:
            raise RepositoryError(
                "the exposure has no VISIT/DETECTOR in its header; cannot place it in a repository",
                ids={"file": Path(path).name},
            )
        if key in seen:
            raise RepositoryError(
                f"visit={key[0]} detector={key[1]} appears twice: in {seen[key]} and {Path(path).name}",
                ids={"file": Path(path).name},
            )
        seen[key] = Path(path).name
        datasets.append(ds)
    return datasets


def ingest_datasets(
    repo: Repository,
    exposures: Iterable[xr.Dataset],
    *,
    overwrite: bool = False,
    skymap: SkyMap | None = None,
    skymap_kwargs: Mapping | None = None,
    on_item: Callable[[str], None] | None = None,
) -> IngestReport:
    """Write exposures into ``repo``; an exposure already there is skipped unless ``overwrite``.

    The repository's sky map is set when it has none: ``skymap`` if given, else one tract
    centred on the ingested exposures (``skymap_kwargs`` go to :meth:`SkyMap.centred_on`).
    """
    exposures = list(exposures)
    report = IngestReport()
    if repo.skymap_json is None:
        if skymap is None:
            skymap = SkyMap.centred_on([footprint(ds) for ds in exposures], **dict(skymap_kwargs or {}))
        repo.set_skymap(skymap)
        report.skymap_created = True
    elif skymap is not None and skymap.to_json() != repo.skymap_json:
        raise RepositoryError("the repository already has a different sky map", ids={"file": repo.url})
    for ds in exposures:
        visit, detector = int(ds.attrs["visit"]), int(ds.attrs["detector"])
        source = str(ds.attrs.get("source", ""))
        if repo.has_exposure(visit, detector) and not overwrite:
            report.skipped.append((visit, detector, source))
            message = f"skipped visit={visit} detector={detector} ({source}): already in the repository"
        else:
            repo.write_exposure(ds, overwrite=overwrite)
            report.written.append((visit, detector, source))
            message = f"ingested visit={visit} detector={detector} ({source})"
        log.info(message)
        if on_item is not None:
            on_item(message)
    return report


def ingest_files(
    repo: Repository,
    paths: Sequence[str | os.PathLike],
    *,
    overwrite: bool = False,
    psf_files: Mapping[str, str] | None = None,
    skymap: SkyMap | None = None,
    skymap_kwargs: Mapping | None = None,
    on_item: Callable[[str], None] | None = None,
) -> IngestReport:
    """Read every FITS file first (any bad file raises before the repository changes), then write."""
    datasets = read_all(paths, psf_files=psf_files)
    return ingest_datasets(
        repo, datasets, overwrite=overwrite, skymap=skymap, skymap_kwargs=skymap_kwargs, on_item=on_item
    )
