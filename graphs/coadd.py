"""Coadds of every patch: the warps of a band that cover a patch, stacked and written per patch.

One :class:`~graphs.execute.Unit` per (tract, patch, band): it opens the direct warps of that
band lazily on the patch inner box, assembles them (:func:`pipeline.assemble.assemble_coadd`)
and writes the patch's inner box of ``tract_<T>/coadds/<band>/<name>``. Patches that no warp
covers make no unit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import xarray as xr

from pipeline.assemble import AssembleCoaddConfig, assemble_coadd
from pipeline.errors import RepositoryError
from pipeline.io.repo import Repository, patch_unit, visit_unit, warp_path
from pipeline.model.schema import NJY_ZERO_POINT
from pipeline.model.skymap import Patch, Tract

from .execute import Unit
from .plan import exposure_patches, exposures_by_visit, repo_tracts

__all__ = ["coadd_units", "warp_coverage"]

log = logging.getLogger(__name__)


def warp_coverage(repo: Repository, tract: Tract) -> dict[str, dict[int, set[int]]]:
    """``{band: {visit: {patch index, ...}}}`` for the complete direct warps on ``tract``.

    Coverage comes from the exposures' WCS footprints (metadata only, no pixel is read).
    """
    out: dict[str, dict[int, set[int]]] = {}
    for visit, detectors in exposures_by_visit(repo).items():
        if not repo.is_complete(warp_path(tract.id, visit, "direct"), visit_unit(visit)):
            continue
        band = repo.open_exposure(visit, detectors[0]).attrs.get("band")
        patches = {p.index for d in detectors for p in exposure_patches(repo, visit, d, tract)}
        out.setdefault(str(band), {})[visit] = patches
    return out


def _stack_of(repo: Repository, tract: Tract, patch: Patch, visits: list[int]) -> xr.Dataset:
    parts = [repo.open_warp(tract.id, v, window=patch.inner) for v in visits]
    stack = xr.concat(
        [p[["image", "variance", "mask"]] for p in parts], dim="visit", coords="minimal",
        compat="override", combine_attrs="override",
    )
    stack = stack.assign_coords(visit=("visit", visits))
    stack.attrs = {k: v for k, v in parts[0].attrs.items() if k != "visit"}
    stack.attrs.update(tract=tract.id, patch=patch.name)
    return stack


def coadd_units(
    repo: Repository,
    *,
    tract: int | None = None,
    band: str | None = None,
    patches: Iterable[int | str] | None = None,
    name: str = "deep",
    overwrite: bool = False,
    config: AssembleCoaddConfig = AssembleCoaddConfig(),
) -> list[Unit]:
    """One unit per (tract, patch, band) that some complete direct warp covers."""
    tracts = repo_tracts(repo, tract)
    units = []
    for t in tracts:
        wanted = None if patches is None else {t.patch(p).index for p in patches}
        coverage = warp_coverage(repo, t)
        if band is not None and band not in coverage:
            raise RepositoryError(
                f"no complete direct warps in band {band!r} on tract {t.id}; bands with warps: {sorted(coverage)}",
                ids={"tract": t.id, "band": band},
            )
        for b, visits in sorted(coverage.items()):
            if band is not None and b != band:
                continue
            product = repo.create_coadd(t, b, name, attrs={"bunit": "nJy", "zero_point": NJY_ZERO_POINT})
            for patch in t.patches():
                if wanted is not None and patch.index not in wanted:
                    continue
                used = sorted(v for v, covered in visits.items() if patch.index in covered)
                if not used:
                    continue
                units.append(_coadd_unit(repo, t, patch, b, used, product, overwrite, config))
    return units


def _coadd_unit(repo, tract: Tract, patch: Patch, band: str, visits: list[int], product: str, overwrite, config) -> Unit:
    unit = patch_unit(patch)

    def done() -> bool:
        return not overwrite and repo.is_complete(product, unit)

    def build():
        coadd = assemble_coadd(_stack_of(repo, tract, patch, visits), config=config)
        coadd = coadd.assign(n_image=coadd["n_image"].astype(np.int32))
        return [repo.region_write(coadd, product, unit, overwrite=overwrite)]

    def finish() -> None:
        repo.mark_complete(product, unit, task="assemble_coadd", visits=visits, config=config.model_dump(mode="json"))

    return Unit(key=f"coadd tract={tract.id} patch={patch.name} band={band}", build=build, done=done, finish=finish)
