"""The PSF of a stack of warps: weighted mean of the warped input PSFs, per PSF grid node."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import dask.array as da
import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field

from .errors import DataQualityError, SchemaError
from .model.schema import PSF_DIMS

__all__ = ["CoaddPsfConfig", "coadd_psf"]


class CoaddPsfConfig(BaseModel):
    """Configuration of :func:`coadd_psf`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uncovered: Literal["nan", "raise"] = Field(
        "nan",
        description="grid nodes no input covers: NaN images ('nan') or a DataQualityError when computed "
        "('raise', the reference's InvalidPsfError)",
    )
    atol_position: float = Field(
        1e-6, ge=0.0, le=1.0, description="tolerance (pixels) when checking that the inputs share one PSF grid"
    )


def _as_stack(psfs, atol: float) -> xr.DataArray:
    if isinstance(psfs, xr.DataArray):
        if psfs.dims == PSF_DIMS:
            return psfs.expand_dims("visit")
        if psfs.dims[1:] != PSF_DIMS or psfs.ndim != 5:
            raise SchemaError(f"PSF stack has dims {psfs.dims}, expected (<input>, {', '.join(PSF_DIMS)})")
        return psfs
    psfs = list(psfs)
    if not psfs:
        raise SchemaError("coadd_psf needs at least one input PSF")
    for i, p in enumerate(psfs):
        if not isinstance(p, xr.DataArray) or p.dims != PSF_DIMS:
            dims = getattr(p, "dims", type(p).__name__)
            raise SchemaError(f"input PSF {i} has dims {dims}, expected {PSF_DIMS}")
    ky = max(p.sizes["ky"] for p in psfs)
    kx = max(p.sizes["kx"] for p in psfs)
    first = psfs[0]
    padded = []
    for i, p in enumerate(psfs):
        for axis in ("psf_y", "psf_x"):
            a = np.asarray(first.coords[axis].values, dtype=np.float64)
            b = np.asarray(p.coords[axis].values, dtype=np.float64)
            if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=atol):
                raise SchemaError(
                    f"input PSF {i} is on another grid: {axis} {b.tolist()} differs from {a.tolist()}"
                )
        dy = (ky - p.sizes["ky"]) // 2
        dx = (kx - p.sizes["kx"]) // 2
        q = p.pad(ky=(dy, dy), kx=(dx, dx), constant_values=0.0) if dy or dx else p
        padded.append(q.assign_coords(psf_y=first.psf_y.values, psf_x=first.psf_x.values))
    return xr.concat(padded, dim="visit", coords="minimal", compat="override", join="override")


def _check_covered(n_inputs: np.ndarray) -> np.ndarray:
    if np.any(n_inputs == 0):
        k, l = (int(v[0]) for v in np.nonzero(n_inputs == 0))
        raise DataQualityError(f"no input images at PSF grid node ({k}, {l})")
    return n_inputs


def coadd_psf(
    psfs: Sequence[xr.DataArray] | xr.DataArray,
    weights: Sequence[float] | np.ndarray | xr.DataArray,
    *,
    config: CoaddPsfConfig = CoaddPsfConfig(),
) -> xr.DataArray:
    """Weighted mean of warped input PSFs on their common PSF grid (spec warping.md section 4).

    ``psfs`` are the ``psf`` variables of the warps of one destination frame (dims
    ``(psf_y, psf_x, ky, kx)``, one grid; NaN images at nodes an input does not cover, as
    :func:`pipeline.warp.warp_psf` writes them), or one DataArray with a leading input dimension.
    Kernel sizes may differ (odd); smaller images are zero-padded about their centre. At each node
    only the inputs that cover it contribute: ``psi = sum_c w_c psi_c / sum_c w_c``; each input is
    normalised, so the result sums to 1. The result carries coordinate ``psf_n_inputs`` (inputs
    covering each node). Lazy when the inputs are.

    Notes
    -----
    LSST: ``lsst.meas.algorithms.CoaddPsf`` (``computeKernelImage`` at each grid node). The
    record weights are ``weights`` (``1/meanVar`` of each visit for a coadd, 1 per detector in one
    warp); the valid polygons are the finite nodes of each input. ``warpingKernelName`` and
    ``cacheSize`` of ``CoaddPsfConfig`` belong to :class:`pipeline.warp.WarpConfig` (lanczos3,
    exact). Nodes no input covers are NaN (``uncovered="nan"``) or raise ``InvalidPsfError``'s
    equivalent :class:`DataQualityError` (``uncovered="raise"``).
    """
    stack = _as_stack(psfs, config.atol_position)
    lead = stack.dims[0]
    n = stack.sizes[lead]
    if isinstance(weights, da.Array):
        weights = xr.DataArray(weights, dims=(lead,))
    if isinstance(weights, xr.DataArray):
        if weights.ndim != 1 or weights.size != n:
            raise SchemaError(f"weights have shape {weights.shape}; expected one weight per input ({n})")
        w = xr.DataArray(weights.data, dims=(lead,))
    else:
        arr = np.asarray(weights, dtype=np.float64)
        if arr.shape != (n,):
            raise SchemaError(f"weights have shape {arr.shape}; expected one weight per input ({n})")
        bad = [float(v) for v in arr if not (math.isfinite(v) and v > 0)]
        if bad:
            raise SchemaError(f"weights must be positive and finite, got {bad[0]!r}")
        w = xr.DataArray(arr, dims=(lead,))
    if lead in stack.coords:
        w = w.assign_coords({lead: stack.coords[lead].values})
    covered = np.isfinite(stack).all(("ky", "kx"))
    filled = stack.where(covered, 0.0)
    num = (filled * w).sum(lead)
    den = (covered * w).sum(lead)
    n_inputs = covered.sum(lead).astype(np.int64)
    if config.uncovered == "raise":
        if isinstance(n_inputs.data, da.Array):
            n_inputs = n_inputs.copy(data=n_inputs.data.map_blocks(_check_covered, dtype=np.int64))
        else:
            _check_covered(np.asarray(n_inputs.data))
    out = (num / den).where(den > 0)
    out = out.transpose(*PSF_DIMS)
    out = out.assign_coords(psf_n_inputs=n_inputs)
    out.name = "psf"
    return out
