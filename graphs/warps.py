"""Direct warps of every visit onto the tracts it touches, written to the repository.

One :class:`~graphs.execute.Unit` per (tract, visit): the exposures of the visit's detectors that
touch the tract are warped (:func:`pipeline.warp.warp_exposure`) onto the chunk-aligned tract box
that holds their footprints, combined as the reference's ``copyGoodPixels`` (a later detector's
good pixels overwrite an earlier one's, in detector order), and written by one region write into
``tract_<T>/warps/direct/visit_<V>``. The product's attrs carry ``n_good_pixels`` (summed over
detectors) and ``variance_correlation_factor`` (their good-pixel-weighted mean); the completion
marker records both per detector.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import xarray as xr
import zarr

from pipeline.errors import RepositoryError
from pipeline.io.repo import Repository, open_repo, visit_unit, warp_path
from pipeline.model.geometry import Box
from pipeline.model.masks import CANONICAL_PLANES, MaskPlane, mask_attrs, remap_mask
from pipeline.model.schema import NJY_ZERO_POINT, mask_planes
from pipeline.model.skymap import Tract
from pipeline.warp import WarpConfig, WarpPlan, plan_warp, replan, warp_exposure

from .execute import RunReport, Unit, run_units
from .plan import visit_units

__all__ = ["warp_units", "run_warps", "copy_good_pixels", "plan_footprint"]

log = logging.getLogger(__name__)

_NO_DATA = np.uint32(MaskPlane.NO_DATA)


def plan_footprint(plan: WarpPlan) -> Box:
    """The smallest box holding every destination chunk the plan covers (empty if none)."""
    boxes = [plan.block_box(by, bx) for by, bx in plan.covered_blocks]
    if not boxes:
        return Box(plan.dst_box.x0, plan.dst_box.y0, plan.dst_box.x0, plan.dst_box.y0)
    return Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes), max(b.x1 for b in boxes), max(b.y1 for b in boxes))


def copy_good_pixels(warps: Iterable[xr.Dataset]) -> xr.Dataset:
    """Combine warps of one frame: each later warp's good (not NO_DATA) pixels replace earlier ones.

    Notes
    -----
    LSST: ``lsst.coadd.utils.copyGoodPixels`` as used by ``MakeDirectWarpTask`` (no averaging in
    detector overlaps; the last detector wins). Lazy when the warps are.
    """
    warps = list(warps)
    out = warps[0]
    for new in warps[1:]:
        good = (new["mask"] & _NO_DATA) == 0
        combined = out.copy()
        for name in ("image", "variance", "mask"):
            combined[name] = out[name].where(~good, new[name])
            combined[name].attrs = dict(out[name].attrs)
        out = combined
    return out


def warp_units(
    repo: Repository,
    *,
    tract: int | None = None,
    visits: Iterable[int] | None = None,
    kind: str = "direct",
    overwrite: bool = False,
    config: WarpConfig = WarpConfig(),
) -> list[Unit]:
    """One unit per (tract, visit) that touches: the visit's direct warp on the tract.

    ``tract`` restricts to one tract of the repository's sky map, ``visits`` to some visits (each
    must have exposures). Visits that touch no tract make no unit (logged). ``overwrite`` redoes
    units already complete. Run the units with :func:`graphs.execute.run_units`; read a result with
    ``repo.open_warp(tract, visit, window=patch.outer)`` (nJy, tract WCS, NO_DATA where no detector
    of the visit covers).
    """
    if kind != "direct":
        raise RepositoryError(
            f"warp kind {kind!r} is not built by warp_units; only 'direct' (PSF-matched warps come from PSF matching)"
        )
    return visit_units(repo, tract=tract, visits=visits, what="warp",
                       make=lambda t, visit, detectors: _warp_unit(repo, t, visit, detectors, overwrite, config))


def run_warps(
    repo: str | Repository,
    *,
    tract: int | None = None,
    visits: Iterable[int] | None = None,
    overwrite: bool = False,
    client=None,
    progress: bool = True,
    config: WarpConfig = WarpConfig(),
) -> RunReport:
    """``skystack warp --repo URL [--tract T] [--visit V]``: build and run the warp units.

    ``repo`` is a repository URL (opened read/write) or an open :class:`Repository`; ``client`` an
    optional ``distributed.Client``. Returns the :class:`~graphs.execute.RunReport`.
    """
    if not isinstance(repo, Repository):
        repo = open_repo(repo, mode="r+")
    units = warp_units(repo, tract=tract, visits=visits, overwrite=overwrite, config=config)
    return run_units(units, client=client, progress=progress)


def _warp_unit(
    repo: Repository, tract: Tract, visit: int, detectors: list[int], overwrite: bool, config: WarpConfig
) -> Unit:
    product = warp_path(tract.id, visit, "direct")
    unit = visit_unit(visit)
    info: dict[str, Any] = {}

    def done() -> bool:
        return not overwrite and repo.is_complete(product, unit)

    def build():
        exposures = [repo.open_exposure(visit, d) for d in detectors]
        band = exposures[0].attrs.get("band")
        header = tract.wcs_header()
        # one plan per detector on the whole tract (one chunk: the numbers do not depend on the
        # chunking) gives the attrs of the product and the box the detectors cover
        plans = [plan_warp(ds, wcs=header, box=tract.bbox, chunks=max(tract.bbox.shape), config=config)
                 for ds in exposures]
        n_good = sum(p.n_good_pixels for p in plans)
        factor = sum(p.n_good_pixels * p.variance_correlation_factor for p in plans) / n_good if n_good else 1.0
        attrs = {
            "bunit": "nJy",
            "zero_point": NJY_ZERO_POINT,
            "warp_kernel": config.kernel,
            "n_good_pixels": int(n_good),
            "variance_correlation_factor": float(factor),
        }
        path = repo.create_warp(tract, visit, kind="direct", band=band, attrs=attrs, overwrite=overwrite)
        cy, cx = zarr.open_array(repo.store, path=f"{path}/image", mode="r").chunks
        info.clear()
        info.update(
            tract=int(tract.id),
            visit=int(visit),
            detectors=[
                {
                    "detector": int(d),
                    "n_good_pixels": int(p.n_good_pixels),
                    "variance_correlation_factor": float(p.variance_correlation_factor),
                }
                for d, p in zip(detectors, plans)
            ],
            config=config.model_dump(mode="json"),
        )
        used = [(ds, p) for ds, p in zip(exposures, plans) if not p.empty]
        if not used:
            return []
        boxes = [p.good_box for _, p in used]
        union = Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes), max(b.x1 for b in boxes), max(b.y1 for b in boxes))
        window = repo.align_box(path, union)
        warps = []
        for ds, p in used:
            # the tract plan's lattice serves the window (no second evaluation of the WCSs); the PSF
            # is not part of a direct warp product, so it is not warped
            ds = ds.drop_vars([v for v in ("psf", "psf_y", "psf_x") if v in ds.variables])
            w = warp_exposure(ds, plan=replan(p, box=window, chunks=(cy, cx)))
            planes = mask_planes(w)
            if planes != CANONICAL_PLANES:
                remapped = remap_mask(w["mask"].data, planes, CANONICAL_PLANES)
                w = w.assign(mask=(("y", "x"), remapped, {**w["mask"].attrs, **mask_attrs(CANONICAL_PLANES)}))
            warps.append(w)
        combined = copy_good_pixels(warps)
        return [repo.region_write(combined, path, unit, overwrite=overwrite)]

    def finish() -> None:
        repo.mark_complete(product, unit, task="warp_exposure", **info)

    return Unit(key=f"warp tract={tract.id} visit={visit}", build=build, done=done, finish=finish)
