"""PSF-matched warps: every visit's detectors warped onto a tract and matched to the model PSF.

One :class:`~graphs.execute.Unit` per (tract, visit), beside the direct warps of
:mod:`graphs.warps`: each detector touching the tract is warped (:func:`pipeline.warp.warp_exposure`,
which also warps its PSF grid, the reference's ``WarpedPsf``), PSF-matched to the pipeline's model
PSF (:func:`pipeline.psf_match.model_psf_match`, kernel solved per detector from its warped PSF),
the detectors combined as ``copyGoodPixels`` (last detector wins) and written by one region write
into ``tract_<T>/warps/psf_matched/visit_<V>``.

The kernel solve of each detector is a delayed task inside the written graph (the warped PSF is
read lazily), so building a unit computes nothing. NO_DATA spreads from detector edges by the
kernel footprint as in the reference, so a band of about ``kernel_size // 2`` pixels around every
detector edge is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr

from pipeline.errors import RepositoryError
from pipeline.io.repo import Repository, open_repo, visit_unit, warp_path
from pipeline.model.geometry import Box
from pipeline.model.masks import CANONICAL_PLANES, MaskPlane, mask_attrs, remap_mask
from pipeline.model.schema import NJY_ZERO_POINT, mask_planes
from pipeline.model.skymap import Tract
from pipeline.psf import PsfModel, model_psf
from pipeline.psf_match import ModelPsfMatchConfig, model_psf_match
from pipeline.warp import WarpConfig, plan_warp, warp_exposure

from .execute import RunReport, Unit, run_units
from .plan import visit_units
from .warps import copy_good_pixels, plan_footprint

__all__ = ["PSF_MATCHED_WARP_CONFIG", "psf_matched_warp", "psf_matched_warp_units", "run_psf_matched_warps"]

log = logging.getLogger(__name__)

#: the reference's MakePsfMatchedWarpConfig: ModelPsfMatch with alardSigGauss (1.0, 2.0, 4.5)
PSF_MATCHED_WARP_CONFIG = ModelPsfMatchConfig(alard_sig_gauss=(1.0, 2.0, 4.5))

NO_DATA = int(MaskPlane.NO_DATA)


def _drop_psf(ds: xr.Dataset) -> xr.Dataset:
    return ds.drop_vars([v for v in ("psf", "psf_y", "psf_x") if v in ds.variables])


def psf_matched_warp(
    exposures: Sequence[xr.Dataset],
    *,
    wcs,
    box: Box,
    chunks: int | tuple[int, int],
    model: PsfModel | None = None,
    config: ModelPsfMatchConfig = PSF_MATCHED_WARP_CONFIG,
    warp_config: WarpConfig = WarpConfig(),
) -> xr.Dataset:
    """The PSF-matched warp of one visit's detectors on ``box`` of the frame of ``wcs`` (lazy).

    Each exposure (with a ``psf`` variable) is warped, matched to ``model`` (default
    :func:`pipeline.psf.model_psf`, FWHM 7.7 px) and the results combined, later detectors
    winning where they have data. Exposures that do not reach ``box`` are skipped; with none
    left a :class:`~pipeline.errors.RepositoryError` is raised. The ``psf`` variable is dropped:
    the PSF of the product is ``model`` (``config.declared_psf`` is not used).
    """
    model = model_psf() if model is None else model
    cy, cx = (chunks, chunks) if isinstance(chunks, int) else chunks
    full_y = np.arange(box.y0, box.y1)
    full_x = np.arange(box.x0, box.x1)
    fill = {"image": np.float32(np.nan), "variance": np.float32(np.inf), "mask": np.uint32(NO_DATA)}
    matched = []
    for ds in exposures:
        plan = plan_warp(ds, wcs=wcs, box=box, chunks=chunks, config=warp_config)
        if plan.empty:
            continue
        # warp and match on the chunks this exposure covers (the reference's per-detector bbox)
        footprint = plan_footprint(plan).intersect(box)
        w = warp_exposure(ds, plan=plan_warp(ds, wcs=wcs, box=footprint, chunks=chunks, config=warp_config))
        m, _ = model_psf_match(w, model, config=config)
        planes = mask_planes(m)
        if planes != CANONICAL_PLANES:
            remapped = remap_mask(m["mask"].data, planes, CANONICAL_PLANES)
            m = m.assign(mask=(("y", "x"), remapped, {**m["mask"].attrs, **mask_attrs(CANONICAL_PLANES)}))
        m = _drop_psf(m)
        if footprint != box:
            attrs = {name: dict(m[name].attrs) for name in fill}
            m = m.reindex(y=full_y, x=full_x, fill_value=fill)
            for name in fill:
                m[name] = m[name].astype(fill[name].dtype)
                m[name].attrs = attrs[name]
        if any(dask.is_dask_collection(m[name].data) for name in fill):
            m = m.chunk({"y": cy, "x": cx})
        matched.append(m)
    if not matched:
        raise RepositoryError(f"no exposure reaches the box {box.to_list()}")
    out = copy_good_pixels(matched)
    out.attrs = {k: v for k, v in matched[-1].attrs.items() if k not in ("detector", "psf_match_residual_max")}
    return out


def psf_matched_warp_units(
    repo: Repository,
    *,
    tract: int | None = None,
    visits: Iterable[int] | None = None,
    overwrite: bool = False,
    model: PsfModel | None = None,
    config: ModelPsfMatchConfig = PSF_MATCHED_WARP_CONFIG,
    warp_config: WarpConfig = WarpConfig(),
) -> list[Unit]:
    """One unit per (tract, visit) that touches: the visit's PSF-matched warp on the tract.

    Arguments as :func:`graphs.warps.warp_units`; ``model`` is the target PSF (default
    :func:`pipeline.psf.model_psf`, the reference's 7.7-px double Gaussian) and ``config`` the
    matching configuration (default :data:`PSF_MATCHED_WARP_CONFIG`). Read a result with
    ``repo.open_warp(tract, visit, kind="psf_matched")``.
    """
    model = model_psf() if model is None else model
    return visit_units(repo, tract=tract, visits=visits, what="PSF-matched warp",
                       make=lambda t, visit, detectors: _unit(repo, t, visit, detectors, overwrite, model, config, warp_config))


def run_psf_matched_warps(
    repo: str | Repository,
    *,
    tract: int | None = None,
    visits: Iterable[int] | None = None,
    overwrite: bool = False,
    client=None,
    progress: bool = True,
    model: PsfModel | None = None,
    config: ModelPsfMatchConfig = PSF_MATCHED_WARP_CONFIG,
    warp_config: WarpConfig = WarpConfig(),
) -> RunReport:
    """The PSF-matched half of ``skystack warp --repo URL [--tract T] [--visit V]``: build and run the units.

    ``repo`` is a repository URL (opened read/write) or an open :class:`Repository`; ``client`` an
    optional ``distributed.Client``. Returns the :class:`~graphs.execute.RunReport`.
    """
    if not isinstance(repo, Repository):
        repo = open_repo(repo, mode="r+")
    units = psf_matched_warp_units(repo, tract=tract, visits=visits, overwrite=overwrite, model=model,
                                   config=config, warp_config=warp_config)
    return run_units(units, client=client, progress=progress)


def _unit(repo, tract: Tract, visit: int, detectors: list[int], overwrite: bool, model, config, warp_config) -> Unit:
    product = warp_path(tract.id, visit, "psf_matched")
    unit = visit_unit(visit)
    info: dict[str, Any] = {}

    def done() -> bool:
        return not overwrite and repo.is_complete(product, unit)

    def build():
        exposures = [repo.open_exposure(visit, d) for d in detectors]
        band = exposures[0].attrs.get("band")
        attrs = {"bunit": "nJy", "zero_point": NJY_ZERO_POINT, "warp_kernel": warp_config.kernel,
                 "model_psf": repr(model)}
        path = repo.create_warp(tract, visit, kind="psf_matched", band=band, attrs=attrs, overwrite=overwrite)
        cy, cx = zarr.open_array(repo.store, path=f"{path}/image", mode="r").chunks
        header = tract.wcs_header()
        plans = [plan_warp(ds, wcs=header, box=tract.bbox, chunks=(cy, cx), config=warp_config) for ds in exposures]
        used = [(ds, p) for ds, p in zip(exposures, plans) if not p.empty]
        info.clear()
        info.update(tract=int(tract.id), visit=int(visit), detectors=[int(d) for d in detectors],
                    model_psf=repr(model), config=config.model_dump(mode="json"),
                    warp_config=warp_config.model_dump(mode="json"))
        if not used:
            return []
        boxes = [plan_footprint(p) for _, p in used]
        union = Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes), max(b.x1 for b in boxes), max(b.y1 for b in boxes))
        window = repo.align_box(path, union)
        combined = psf_matched_warp([ds for ds, _ in used], wcs=header, box=window, chunks=(cy, cx), model=model,
                                    config=config, warp_config=warp_config)
        return [repo.region_write(combined, path, unit, overwrite=overwrite)]

    def finish() -> None:
        repo.mark_complete(product, unit, task="model_psf_match", **info)

    return Unit(key=f"psf_matched_warp tract={tract.id} visit={visit}", build=build, done=done, finish=finish)
