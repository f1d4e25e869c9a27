"""MatchBackgrounds: bring the backgrounds of warps onto those of a reference visit.

Mode ``legacy`` (default, ``match_backgrounds.md`` part A): for every warp of one patch the
difference ``reference - warp`` is binned, modelled by a spline through the cells or a Chebyshev
polynomial, and the model is added to the warp; the reference is chosen by a cost function of
pixel variance, mean level and coverage unless given. Mode ``tract`` (part C): the differences of
all patches of a visit are accumulated into one superpixel model over the tract, so each visit's
correction is continuous across patch boundaries; the reference visit is chosen by a plane-fit
chi2, variance and coverage cost. Everything is lazy: reference choices are small solves on 0-d
or superpixel-sized dask results, each model a small per-visit solve evaluated per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import _kernels_background as K
from .background import (
    _N_CELL_ROWS as _N_ROWS,
)
from .background import (
    CELL_ERROR,
    CELL_NPOINT,
    CELL_STDEV,
    CELL_VALUE,
    CELL_VARCLIP,
    BackgroundConfig,
    InterpStyleName,
    _resolve_grid,
    _solve_chebyshev,
    cell_layout,
    cell_statistics,
    fixed_edge_layout,
    interp_style_code,
)
from .errors import SchemaError
from .model.geometry import Box
from .model.masks import bitmask, check_same_planes
from .model.schema import data_ids, mask_planes, validate, with_provenance
from .stats import Statistic, StatsConfig, compute_statistics

__all__ = [
    "MatchBackgroundsConfig",
    "MatchResult",
    "match_backgrounds",
    "select_reference",
    "STATUS_MESSAGES",
]

# status codes of one visit's fit
OK, REFERENCE, NO_OVERLAP, UNDERSAMPLED, FIT_FAILED = 0, 1, 2, 3, 4
STATUS_MESSAGES = {
    OK: "",
    REFERENCE: "",
    NO_OVERLAP: "No overlap with reference. Nothing to match",
    UNDERSAMPLED: "Image does not cover enough of ref image for order and binsize",
    FIT_FAILED: "Background/Approximation failed to interp image",
}


class TractBackgroundConfig(BaseModel):
    """Parameters of the tract-wide mode (the reference's TractBackgroundConfig and reference choice)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bin: int = Field(128, ge=2, le=1 << 16, description="superpixel size in tract pixels (xBin = yBin)")
    window: Literal[1, 2] = Field(
        1,
        description="superpixel statistics window in superpixels: 2 = the reference's overlapping 2x2 windows "
        "(smooth, and biased where the tract edge clips them), 1 = the superpixel itself",
    )
    min_frac: float = Field(0.1, ge=0.0, le=1.0, description="superpixels with fewer than min_frac*bin**2 pixels are bad")
    mask_planes: tuple[str, ...] = Field(
        ("BAD", "SAT", "EDGE", "NO_DATA"), description="pixels with any of these planes are left out of superpixels"
    )
    interpolation: InterpStyleName = Field("AKIMA_SPLINE", description="style filling bad superpixels and of the warp model")
    binning: int = Field(64, ge=1, le=1 << 16, description="bin size in warp pixels of the per-warp model grid")
    reference_resampling: bool = Field(
        False,
        description="resample the superpixel model as the reference does: at each bin's first pixel, "
        "(binning i + x0)/bin - 1/2 (half a bin off), bilinearly with edge renormalisation (flat beyond the "
        "outer superpixel centres); default: at the bin centres, with linear extrapolation at the edges",
    )
    num_sigma_clip: float = Field(3.0, gt=0.0, le=100.0, description="clip half-width of the superpixel MEANCLIP")
    num_iter: int = Field(3, ge=1, le=100, description="clip passes of the superpixel MEANCLIP")
    best_ref_weight_chi2: float = Field(0.3, ge=0.0, le=1e6, description="cost weight of the plane-fit chi2")
    best_ref_weight_variance: float = Field(0.3, ge=0.0, le=1e6, description="cost weight of the mean superpixel variance")
    best_ref_weight_global_coverage: float = Field(0.4, ge=0.0, le=1e6, description="cost weight of the coverage")

    @model_validator(mode="after")
    def _check(self):
        if self.interpolation == "NONE":
            raise ValueError("tract interpolation NONE cannot fill superpixels; choose a style")
        return self


class MatchBackgroundsConfig(BaseModel):
    """Configuration of :func:`match_backgrounds` (the reference's MatchBackgroundsConfig)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["legacy", "tract"] = Field(
        "legacy",
        description="'legacy': per-patch matching of the 2012-2024 task; 'tract': the 2025 tract-wide "
        "superpixel variant (parameters in 'tract')",
    )
    tract: TractBackgroundConfig = Field(
        default_factory=TractBackgroundConfig, description="parameters of mode 'tract' (ignored in 'legacy')"
    )
    ref_visit: int | None = Field(None, description="visit of the reference warp; chosen by the cost function if None")
    use_polynomial: bool = Field(False, description="model the difference by a Chebyshev polynomial instead of a spline")
    order: int = Field(8, ge=0, le=30, description="Chebyshev order (x and y) when use_polynomial")
    bad_mask_planes: tuple[str, ...] = Field(
        ("NO_DATA", "DETECTED", "DETECTED_NEGATIVE", "SAT", "BAD", "INTRP", "CR"),
        description="pixels with any of these planes are excluded from every statistic",
    )
    grid_statistic: Literal["MEAN", "MEDIAN", "MEANCLIP"] = Field("MEAN", description="statistic of each grid cell")
    undersample_style: Literal["THROW_EXCEPTION", "REDUCE_INTERP_ORDER"] = Field(
        "REDUCE_INTERP_ORDER", description="too few cells for the style or order: raise, or lower the style/order"
    )
    bin_size: int = Field(256, ge=1, le=1 << 20, description="grid cell size in pixels")
    interp_style: InterpStyleName = Field("AKIMA_SPLINE", description="spline style when not use_polynomial")
    num_sigma_clip: float = Field(3.0, gt=0.0, le=100.0, description="clip half-width in sigma (MEANCLIP only)")
    num_iter: int = Field(2, ge=1, le=100, description="clipping passes (MEANCLIP only)")
    best_ref_weight_coverage: float = Field(0.4, ge=0.0, le=1e6, description="cost weight of the coverage term")
    best_ref_weight_variance: float = Field(0.4, ge=0.0, le=1e6, description="cost weight of the pixel-variance term")
    best_ref_weight_level: float = Field(0.2, ge=0.0, le=1e6, description="cost weight of the mean-level term")
    approx_weighting: bool = Field(True, description="weight the Chebyshev fit by 1/(standard error of each cell)")
    grid_stdev_epsilon: float = Field(
        1e-8, gt=0.0, le=1e6, description="floor of a cell's stdev; weighting is off if every cell is below it"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.interp_style == "NONE" and not self.use_polynomial:
            raise ValueError("interp_style NONE cannot model the difference; choose a style or use_polynomial")
        return self

    def stats_config(self, and_mask: int) -> StatsConfig:
        return StatsConfig(
            num_sigma_clip=self.num_sigma_clip, num_iter=self.num_iter, and_mask=and_mask, nan_safe=True
        )

    def background_config(self) -> BackgroundConfig:
        return BackgroundConfig(
            bin_size=self.bin_size,
            statistic=self.grid_statistic,
            ignored_mask_planes=self.bad_mask_planes,
            undersample_style=self.undersample_style,
            algorithm=self.interp_style,
            use_approx=self.use_polynomial,
            approx_order_x=self.order,
            weighting=self.approx_weighting,
            num_sigma_clip=self.num_sigma_clip,
            num_iter=self.num_iter,
        )


@dataclass
class MatchResult:
    """What :func:`match_backgrounds` returns; everything lazy.

    ``warps``: the background-matched warps (a list, or one stacked Dataset when a stack was given).
    ``diagnostics``: a Dataset over dim ``warp`` with coordinate ``visit`` and the variables
    ``fitRMS``, ``matchedMSE``, ``diffImVar`` (float64, NaN where the reference has None),
    ``isReference`` (bool), ``status`` (0 ok, 1 reference, 2 no overlap, 3 undersampled, 4 fit
    failed) and ``failure`` (message, "" when none). Compute it with ``diagnostics.compute()``
    (``.to_dataframe()`` afterwards gives a pandas table). ``reference_index``: 0-d int dask array,
    the position of the chosen reference. ``models``: the lazy model image added to each warp.
    """

    warps: list[xr.Dataset] | xr.Dataset
    diagnostics: xr.Dataset
    reference_index: da.Array
    models: list[xr.DataArray]
    visits: list
    plans: list = field(default_factory=list, repr=False)


def _as_warp_list(warps) -> tuple[list[xr.Dataset], bool]:
    if isinstance(warps, xr.Dataset):
        if "visit" not in warps["image"].dims:
            raise SchemaError("a stacked warp Dataset needs a 'visit' dimension", ids=data_ids(warps))
        n = warps.sizes["visit"]
        out = []
        for i in range(n):
            w = warps.isel(visit=i)
            w.attrs = dict(warps.attrs)
            if "visit" in warps.coords:
                w = w.drop_vars("visit")
                w.attrs["visit"] = _json_scalar(warps.indexes["visit"][i])
            out.append(w)
        return out, True
    try:
        lst = list(warps)
    except TypeError:
        raise SchemaError(f"warps must be a list of Datasets or a stacked Dataset, got {type(warps).__name__}") from None
    for w in lst:
        if not isinstance(w, xr.Dataset):
            raise SchemaError(f"every warp must be an xarray.Dataset, got {type(w).__name__}")
    return lst, False


def _json_scalar(v):
    return v.item() if hasattr(v, "item") else v


def _dask2d(arr, chunks):
    if isinstance(arr, da.Array):
        return arr.rechunk(chunks)
    return da.from_array(arr, chunks=chunks)


def _select_block(metrics, *, wv, wl, wc):
    var, lvl, npt = metrics[:, 0], metrics[:, 1], metrics[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        cost = wv * var / np.nanmax(var) + wl * lvl / np.nanmax(lvl) + wc * np.nanmin(npt) / npt
    cost = np.where(np.isfinite(cost), cost, np.nan)
    if np.all(np.isnan(cost)):
        return np.array(0, dtype=np.int64)
    return np.array(np.nanargmin(cost), dtype=np.int64)


def select_reference(warps, *, config: MatchBackgroundsConfig = MatchBackgroundsConfig()) -> tuple[da.Array, da.Array]:
    """Lazy ``(index of the reference warp, cost per warp)`` by the legacy cost function.

    For each warp over its good pixels (no ``bad_mask_planes`` bit, finite): ``var`` = unbiased
    variance of the image values, ``lvl`` = their mean, ``n`` = their number. Cost
    ``w_v var/max(var) + w_l lvl/max(lvl) + w_c min(n)/n`` (NaN-aware); the reference minimises it.

    Notes
    -----
    Reference: lsst/pipe_tasks ``MatchBackgroundsTask.selectRefExposure`` (legacy). Config
    mapping: ``best_ref_weight_variance``/``_level``/``_coverage`` = bestRefWeightVariance/Level/
    Coverage, ``bad_mask_planes`` = badMaskPlanes.
    """
    lst, _ = _as_warp_list(warps)
    if not lst:
        raise ValueError("no exposures to match")
    metrics = []
    for w in lst:
        and_mask = bitmask(config.bad_mask_planes, mask_planes(w), strict=False)
        img = w["image"].data
        msk = w["mask"].data
        if not isinstance(img, da.Array):
            img = da.from_array(img, chunks=(1024, 1024))
            msk = da.from_array(msk, chunks=(1024, 1024))
        s = compute_statistics(
            img, mask=msk, axis=None, statistics=(Statistic.VARIANCE, Statistic.MEAN, Statistic.NPOINT),
            config=config.stats_config(and_mask),
        )
        metrics.append(
            da.stack([s[Statistic.VARIANCE], s[Statistic.MEAN], s[Statistic.NPOINT].astype(np.float64)])
        )
    table = da.stack(metrics).rechunk(-1)
    wv, wl, wc = config.best_ref_weight_variance, config.best_ref_weight_level, config.best_ref_weight_coverage
    with np.errstate(invalid="ignore", divide="ignore"):
        var, lvl, npt = table[:, 0], table[:, 1], table[:, 2]
        cost = wv * var / da.nanmax(var) + wl * lvl / da.nanmax(lvl) + wc * da.nanmin(npt) / npt
    index = da.blockwise(
        _select_block, "", table, "kc", concatenate=True, wv=wv, wl=wl, wc=wc, dtype=np.int64,
        meta=np.empty((), dtype=np.int64),
    )
    return index, cost


def _is_ref_block(index, *, row):
    return np.array(bool(row[int(index)]))


def _pick_block(stack, index):
    return stack[int(index)]


def _pick(arrays: list[da.Array], index) -> da.Array:
    """The array at lazy position ``index`` (each output block reads that block of every input)."""
    if isinstance(index, (int, np.integer)):
        return arrays[int(index)]
    stack = da.stack(arrays)
    return da.blockwise(
        _pick_block, "yx", stack, "kyx", index, "", concatenate=True, dtype=stack.dtype,
        meta=np.empty((0, 0), dtype=stack.dtype),
    )


def _plan_visit(cells, gcells, is_ref, *, mode, xc, yc, gx, gy, width, height, style, reduce, order, weighting,
                eps, x0, y0):
    """Solve one visit's model from its cell tables (small numpy work inside one task)."""
    nterms = (order + 1) * (order + 2) // 2 if mode == "poly" else 0
    plan = {"status": OK, "order": order, "weighting": weighting, "grid": None, "coeffs": None,
            "X": np.empty(0), "Y": np.empty(0), "Z": np.empty(0), "dZ": np.empty(0), "model": np.empty(0),
            "fitRMS": np.nan, "detail": ""}
    if bool(is_ref):
        plan["status"] = REFERENCE
        plan["fitRMS"] = 0.0
        return plan
    gvalid = gcells[CELL_NPOINT] >= 2
    jj, ii = np.nonzero(gvalid)
    gxc = 0.5 * (gx[:-1] + gx[1:])
    gyc = 0.5 * (gy[:-1] + gy[1:])
    X, Y = gxc[ii], gyc[jj]
    Z = gcells[CELL_VALUE][jj, ii]
    dZ = np.maximum(gcells[CELL_STDEV][jj, ii], eps) / np.sqrt(gcells[CELL_NPOINT][jj, ii])
    plan.update(X=X + x0, Y=Y + y0, Z=Z, dZ=dZ)
    if Z.size == 0 or not np.any(np.isfinite(cells[CELL_VALUE])):
        plan["status"] = NO_OVERLAP
        return plan
    try:
        if mode == "poly":
            m = min(np.unique(X).size, np.unique(Y).size)
            use_order = order
            if m <= order:
                if not reduce:
                    plan["status"] = UNDERSAMPLED
                    return plan
                use_order = m - 1
            use_weight = weighting and bool(np.any(dZ > eps))
            coeffs = _solve_chebyshev(cells, xc=xc, yc=yc, order=use_order, weighting=use_weight, width=width,
                                      height=height, ids={})
            full = np.zeros(nterms)
            full[: coeffs.size] = coeffs  # the triangular set of a lower order is a prefix
            plan.update(order=use_order, weighting=use_weight, coeffs=full)
            model = K.chebyshev_eval(full, order, np.floor(X), np.floor(Y), width, height)
            model = np.diagonal(model).astype(np.float32)
        else:
            grid = np.ascontiguousarray(cells[CELL_VALUE])
            img, status = K.eval_grid(xc, yc, grid, style, reduce, np.floor(Y), np.floor(X))
            if status:
                raise ValueError(f"a grid line has only {status} usable cells")
            plan["grid"] = grid
            model = np.diagonal(img).astype(np.float32)
    except Exception as exc:  # reported per visit, as the reference does
        plan["status"] = FIT_FAILED
        plan["detail"] = str(exc)
        return plan
    resid = Z - model
    ok = ~np.isnan(resid)
    plan["model"] = model
    plan["fitRMS"] = float(np.sqrt(np.mean(resid[ok] ** 2))) if ok.any() else np.nan
    return plan


def _model_block(qy, qx, payload, *, mode, xc, yc, style, reduce, order, width, height, ny, nx):
    status = int(payload[0])
    if status != OK:
        return np.zeros((qy.size, qx.size), dtype=np.float32)
    body = payload[1:]
    if mode == "poly":
        nterms = (order + 1) * (order + 2) // 2
        return K.chebyshev_eval(body[:nterms], order, np.asarray(qx, np.float64), np.asarray(qy, np.float64),
                                width, height).astype(np.float32)
    grid = np.ascontiguousarray(body[: ny * nx].reshape(ny, nx))
    out, _ = K.eval_grid(xc, yc, grid, style, reduce, np.asarray(qy, np.float64), np.asarray(qx, np.float64))
    return out.astype(np.float32)


def _payload(plan, length):
    out = np.zeros(length + 1)
    out[0] = plan["status"]
    if plan["status"] == OK:
        body = plan["coeffs"] if plan["coeffs"] is not None else plan["grid"].ravel()
        out[1 : 1 + body.size] = body
    return out


def _plan_field(plan, key, dtype):
    if key == "failure":
        msg = STATUS_MESSAGES[plan["status"]]
        value = f"{msg}: {plan['detail']}" if plan["detail"] else msg
    else:
        value = plan[key]
    return np.array(value, dtype=dtype)


def _diag(plan, key, dtype):
    return da.from_delayed(dask.delayed(_plan_field, pure=True)(plan, key, dtype), shape=(), dtype=dtype)


def match_backgrounds(
    warps: list[xr.Dataset] | xr.Dataset, *, config: MatchBackgroundsConfig = MatchBackgroundsConfig()
) -> MatchResult:
    """Match the background of every warp to a reference warp (lazy).

    ``warps`` are warps of one patch on one pixel grid: a list of Datasets, or a Dataset with a
    ``visit`` dimension. The reference is ``config.ref_visit`` or the warp of least cost (see
    :func:`select_reference`); every warp of that visit counts as reference and is returned
    unchanged. For the other warps: ``D = ref - warp`` (image difference, variances added, masks
    OR-ed) is binned on ``ceil(W/bin_size) x ceil(H/bin_size)`` cells, modelled by the spline
    ``interp_style`` or, with ``use_polynomial``, by a Chebyshev polynomial of ``order`` (lowered to
    fit the valid cells of the fixed-edge diagnostic grid under REDUCE_INTERP_ORDER), and the model
    is added to the warp's image. Failures (no overlap, too few cells for the order, a failed fit)
    leave that warp unchanged and are reported in ``diagnostics``.

    Raises at once: no warps; warps on different pixel grids or with different mask planes; a
    ``ref_visit`` that is not among the warps; with ``use_polynomial`` a bin size larger than the
    shorter side or an order above the number of bins minus one; too few cells for the style under
    THROW_EXCEPTION.

    Notes
    -----
    Reference: lsst/pipe_tasks ``MatchBackgroundsTask`` (legacy generation: ``run``,
    ``selectRefExposure``, ``matchBackgrounds``, ``_gridImage``). Config mapping: ``ref_visit`` =
    refExpDataRef, ``use_polynomial`` = usePolynomial, ``order`` = order, ``bad_mask_planes`` =
    badMaskPlanes, ``grid_statistic`` = gridStatistic, ``undersample_style`` = undersampleStyle,
    ``bin_size`` = binSize, ``interp_style`` = interpStyle, ``num_sigma_clip``/``num_iter`` =
    numSigmaClip/numIter, ``best_ref_weight_*`` = bestRefWeight*, ``approx_weighting`` =
    approxWeighting, ``grid_stdev_epsilon`` = gridStdevEpsilon.
    Differences: inputs are never modified; INCREASE_NXNYSAMPLE is not offered (the reference
    passes a bin size as a cell count there); a grid without any valid cell is a "no overlap"
    failure in spline mode too (the reference would add a NaN model); image scalers are not taken:
    calibrate the warps first.

    Mode ``tract`` (reference: lsst/pipe_tasks ``MatchBackgroundsTask`` 2025 with
    ``tractBackground.py`` and ``ChooseReferenceVisitTask``): ``warps`` is a list holding the warps
    of several patches and visits in tract pixel coordinates (``patch`` attr, else the box, keys the
    patch). Mapping of ``config.tract``: ``bin`` = xBin/yBin, ``min_frac`` = minFrac,
    ``mask_planes`` = mask, ``interpolation`` = interpolation, ``binning`` = binning,
    ``num_sigma_clip``/``num_iter`` = the clip settings, ``best_ref_weight_chi2``/``_variance``/
    ``_global_coverage`` = bestRefWeightChi2/Variance/GlobalCoverage; ``ref_visit`` = refWarpVisit.
    The superpixel grid is anchored at tract pixel 0 and spans the union of the warps' boxes.
    Differences (the reference behaviour is available by flags): superpixel statistics over the
    superpixel itself (``window=1``; the reference's 2x2 windows, ``window=2``, are biased where
    the tract edge clips them); the per-warp grid samples the model at bin centres with linear
    extrapolation at the edges (``reference_resampling=True``: bin start pixels and flat
    edge-renormalised bilinear weights); doSmooth is not implemented; the chi2 sum skips
    superpixels without a positive finite variance.
    """
    lst, stacked = _as_warp_list(warps)
    if not lst:
        raise ValueError("no exposures to match")
    for w in lst:
        validate(w, check_wcs=False)
        if w["image"].ndim != 2:
            raise SchemaError(f"each warp must be 2-D, got dims {w['image'].dims}", ids=data_ids(w))
    visits = [w.attrs.get("visit") for w in lst]
    if config.mode == "tract":
        if stacked:
            raise SchemaError("mode 'tract' takes a list of warps (several patches per visit), not a stack")
        return _match_tract(lst, visits, config)
    box0 = Box.of(lst[0])
    for w, v in zip(lst[1:], visits[1:]):
        box = Box.of(w)
        if box != box0:
            raise SchemaError(
                f"Exposures are different dimensions: visit {v} covers {box.to_list()} "
                f"({box.width}, {box.height}) but visit {visits[0]} covers {box0.to_list()} "
                f"({box0.width}, {box0.height})",
                ids=data_ids(w),
            )
    planes = check_same_planes(*[mask_planes(w) for w in lst], what=[f"visit {v}" for v in visits])
    height, width = box0.height, box0.width
    if config.use_polynomial:
        short = min(width, height)
        if short < config.bin_size:
            raise ValueError(f"{config.bin_size} = config.bin_size > shorter dimension = {short}")
        npoints = -(-short // config.bin_size)
        if config.order > npoints - 1:
            raise ValueError(f"{config.order} = config.order > npoints - 1 = {npoints - 1}")
    bcfg = config.background_config()
    nx, ny, style_name, order = _resolve_grid(width, height, bcfg, data_ids(lst[0]))
    mode = "poly" if config.use_polynomial else "spline"
    order = config.order if mode == "poly" else -1
    style = interp_style_code(style_name) if mode == "spline" else K.STYLE_AKIMA
    reduce = config.undersample_style == "REDUCE_INTERP_ORDER"
    xedges, xc = cell_layout(width, nx)
    yedges, yc = cell_layout(height, ny)
    gx = fixed_edge_layout(width, config.bin_size).astype(np.float64)
    gy = fixed_edge_layout(height, config.bin_size).astype(np.float64)
    and_mask = bitmask(config.bad_mask_planes, planes, strict=False)
    scfg = config.stats_config(and_mask)
    same_grids = np.array_equal(xedges, gx) and np.array_equal(yedges, gy)

    if config.ref_visit is not None:
        if config.ref_visit not in visits:
            raise ValueError(f"ref_visit {config.ref_visit} is not among the visits {visits}")
        ref_index = visits.index(config.ref_visit)
        ref_idx_arr = da.from_array(np.array(ref_index, dtype=np.int64))
        is_ref = [da.from_array(np.array(v == config.ref_visit)) for v in visits]
        pick = ref_index
    else:
        ref_idx_arr, _ = select_reference(lst, config=config)
        same = np.array([[vi == vj and vi is not None for vj in visits] for vi in visits])
        same = same | np.eye(len(visits), dtype=bool)
        is_ref = [
            da.blockwise(_is_ref_block, "", ref_idx_arr, "", row=same[:, k], dtype=bool,
                         meta=np.empty((), dtype=bool))
            for k in range(len(lst))
        ]
        pick = ref_idx_arr

    chunks = lst[0]["image"].data.chunks if isinstance(lst[0]["image"].data, da.Array) else (1024, 1024)
    images = [_dask2d(w["image"].data, chunks) for w in lst]
    variances = [_dask2d(w["variance"].data, chunks) for w in lst]
    masks = [_dask2d(w["mask"].data, chunks) for w in lst]
    ref_image = _pick(images, pick)
    ref_variance = _pick(variances, pick)
    ref_mask = _pick(masks, pick)

    nterms = (config.order + 1) * (config.order + 2) // 2
    length = nterms if mode == "poly" else ny * nx
    qy = da.from_array(np.arange(height, dtype=np.float64), chunks=(chunks[0],))
    qx = da.from_array(np.arange(width, dtype=np.float64), chunks=(chunks[1],))
    x0, y0 = box0.x0, box0.y0

    out_warps, models, plans, rows = [], [], [], []
    for k, w in enumerate(lst):
        d_image = (ref_image.astype(np.float64) - images[k]).astype(np.float32)
        d_var = (ref_variance + variances[k]).astype(np.float32)
        d_mask = ref_mask | masks[k]
        cells = cell_statistics(d_image, d_mask, yedges=yedges, xedges=xedges, statistic=config.grid_statistic,
                                stats_config=scfg)
        if same_grids:  # the bin size divides the image: both grids are the same cells
            gcells = cells
        else:
            gcells = cell_statistics(d_image, d_mask, yedges=gy.astype(np.int64), xedges=gx.astype(np.int64),
                                     statistic=config.grid_statistic, stats_config=scfg)
        plan = dask.delayed(_plan_visit, pure=True)(
            cells, gcells, is_ref[k], mode=mode, xc=xc, yc=yc, gx=gx, gy=gy, width=width, height=height,
            style=style, reduce=reduce, order=order, weighting=config.approx_weighting,
            eps=config.grid_stdev_epsilon, x0=x0, y0=y0,
        )
        payload = da.from_delayed(dask.delayed(_payload, pure=True)(plan, length), shape=(length + 1,),
                                  dtype=np.float64)
        model = da.blockwise(
            _model_block, "yx", qy, "y", qx, "x", payload, "p", concatenate=True, align_arrays=False, mode=mode, xc=xc, yc=yc,
            style=style, reduce=reduce, order=order, width=width, height=height, ny=ny, nx=nx,
            dtype=np.float32, meta=np.empty((0, 0), dtype=np.float32),
        )
        matched = w.copy()
        matched["image"] = (w["image"].dims, (images[k] + model).astype(np.float32), dict(w["image"].attrs))
        out_warps.append(with_provenance(matched, "match_backgrounds", config))
        models.append(xr.DataArray(model, dims=("y", "x"), coords={"y": w["y"], "x": w["x"]}, name="background"))
        plans.append(plan)

        status = _diag(plan, "status", np.int64)
        diff_var = compute_statistics(d_var, mask=d_mask, axis=None, statistics=(Statistic.MEANCLIP,),
                                      config=scfg)[Statistic.MEANCLIP]
        resid = d_image.astype(np.float64) - model
        mse = compute_statistics(resid, mask=d_mask, axis=None, statistics=(Statistic.MEANSQUARE,),
                                 config=scfg)[Statistic.MEANSQUARE]
        ok = status == OK
        rows.append(
            {
                "fitRMS": _diag(plan, "fitRMS", np.float64),
                "matchedMSE": da.where(ok, mse, np.nan),
                "diffImVar": da.where(ok, diff_var, np.nan),
                "isReference": is_ref[k].astype(bool),
                "status": status,
                "failure": _diag(plan, "failure", object),
            }
        )
    diag = xr.Dataset(
        {key: ("warp", da.stack([r[key] for r in rows])) for key in rows[0]},
        coords={"warp": np.arange(len(lst)), "visit": ("warp", np.array(visits, dtype=object))},
    )
    if stacked:
        result_warps = xr.concat(out_warps, dim="visit")
        if "visit" in warps.coords:
            result_warps = result_warps.assign_coords(visit=warps["visit"])
        result_warps.attrs = dict(out_warps[0].attrs)
        if "visit" not in warps.attrs:
            result_warps.attrs.pop("visit", None)
    else:
        result_warps = out_warps
    return MatchResult(warps=result_warps, diagnostics=diag, reference_index=ref_idx_arr, models=models,
                       visits=visits, plans=plans)


# ---------------------------------------------------------------------------------------------
# mode "tract": superpixel models over the whole tract (match_backgrounds.md part C)


def _window_families(lo: int, hi: int, b: int, width: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """Disjoint tilings of the superpixel windows over the tract pixels ``[lo, hi)``.

    ``width`` 2 (the reference): the window of superpixel ``u`` is ``[b u - b/2, b u + 3b/2)``, two
    superpixels wide and centred on superpixel ``u``'s far edge; windows of one parity tile the
    line, so there are two families. ``width`` 1: the superpixel itself, one family. Returns
    ``(local edges, superpixel index per cell)`` per family.
    """
    half = b // 2 if width == 2 else 0
    out = []
    for parity in range(width):
        us, edges = [], [lo]
        u = (lo + half) // b - 1
        while b * u - half < hi:
            if u % width == parity:
                w0, w1 = max(b * u - half, lo), min(b * u + b + half, hi)
                if w1 > w0:
                    us.append(u)
                    edges.append(w1)
            u += 1
        out.append((np.array(edges, dtype=np.int64) - lo, np.array(us, dtype=np.int64)))
    return out


def _accumulate(tables, indices, *, shape, u0, v0):
    """Superpixel accumulators ``(S, N, Q)`` = (sum of mean n, sum of n, sum of var n)."""
    acc = np.zeros((3,) + shape)
    for tab, (vs, us) in zip(tables, indices):
        mean, n, var = tab[CELL_VALUE], tab[CELL_NPOINT], tab[CELL_VARCLIP]
        ok = np.isfinite(mean) & np.isfinite(n) & (n > 0) & np.isfinite(var)
        jj, ii = np.nonzero(ok)
        rows, cols = vs[jj] - v0, us[ii] - u0
        inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        jj, ii, rows, cols = jj[inside], ii[inside], rows[inside], cols[inside]
        np.add.at(acc[0], (rows, cols), mean[jj, ii] * n[jj, ii])
        np.add.at(acc[1], (rows, cols), n[jj, ii])
        np.add.at(acc[2], (rows, cols), var[jj, ii] * n[jj, ii])
    return acc


def _fill_lines(img, style):
    out = img.copy()
    knots = np.arange(img.shape[1], dtype=np.float64)
    line = np.empty(img.shape[1])
    for r in range(img.shape[0]):
        row = img[r]
        bad = ~np.isfinite(row)
        if bad.any() and not bad.all():
            K.interp_line(knots, row.copy(), style, True, knots, line)
            out[r, bad] = line[bad]
    return out


def _tract_model(acc, *, bin_size, min_frac, style):
    """Binned superpixel image, filled along rows then columns; ``None`` if no superpixel is good."""
    s_, n_, q_ = acc
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = s_ / n_
        qn = q_ / n_
    good = n_ >= min_frac * bin_size * bin_size
    raw = np.where(good, raw, np.nan)
    if not good.any():
        return None
    filled = _fill_lines(raw, style)
    filled = _fill_lines(filled.T, style).T
    return {"raw": raw, "filled": filled, "qn": np.where(good, qn, np.nan), "n": n_, "good": good}


def _choose_visit(accs, *, bin_size, min_frac, style, weights):
    """Index of the reference visit: plane-fit chi2, mean superpixel variance and coverage."""
    chi2, var, cov = [], [], []
    for acc in accs:
        model = _tract_model(acc, bin_size=bin_size, min_frac=min_frac, style=style)
        if model is None:
            chi2.append(np.nan), var.append(np.nan), cov.append(np.nan)
            continue
        b, qn = model["filled"], model["qn"]
        ny, nx = b.shape
        cells = np.full((_N_ROWS, ny, nx), np.nan)
        cells[CELL_VALUE], cells[CELL_ERROR] = b, qn
        try:
            coeffs = _solve_chebyshev(cells, xc=np.arange(nx, dtype=float), yc=np.arange(ny, dtype=float), order=1,
                                      weighting=True, width=nx, height=ny, ids={})
            xx, yy = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float))
            plane = (K.chebyshev_design(xx.ravel(), yy.ravel(), 1, nx, ny) @ coeffs).reshape(ny, nx)
        except Exception:
            plane = np.full_like(b, np.nan)
        resid = b - plane
        good = np.isfinite(resid) & np.isfinite(qn) & (qn > 0)
        ngood = int(good.sum())
        chi2.append(float(np.sum(resid[good] ** 2 / qn[good]) / (ngood - 6)) if ngood > 6 else np.nan)
        var.append(float(np.mean(qn[good])) if ngood else np.nan)
        cov.append(float(np.isfinite(resid).sum()))
    chi2, var, cov = map(np.array, (chi2, var, cov))
    wc, wv, wg = weights
    with np.errstate(invalid="ignore", divide="ignore"):
        cost = wc * chi2 / np.nanmax(chi2) + wv * var / np.nanmax(var) + wg * np.nanmin(cov) / cov
    cost = np.where(np.isfinite(cost), cost, np.nan)
    return np.array(0 if np.all(np.isnan(cost)) else int(np.nanargmin(cost)), dtype=np.int64)


def _visit_plan(acc, is_ref, *, bin_size, min_frac, style):
    if bool(is_ref):
        return {"status": REFERENCE}
    model = _tract_model(acc, bin_size=bin_size, min_frac=min_frac, style=style)
    if model is None:
        return {"status": NO_OVERLAP}
    model["status"] = OK
    return model


def _bilinear(img, sy, sx):
    """Bilinear samples of ``img`` at fractional indices, weights renormalised over the image."""
    ny, nx = img.shape
    out = np.zeros((sy.size, sx.size))
    norm = np.zeros((sy.size, sx.size))
    y0 = np.floor(sy).astype(int)
    x0 = np.floor(sx).astype(int)
    fy, fx = sy - y0, sx - x0
    for dy in (0, 1):
        wy = fy if dy else 1.0 - fy
        yi = y0 + dy
        iny = (yi >= 0) & (yi < ny)
        for dx in (0, 1):
            wx = fx if dx else 1.0 - fx
            xi = x0 + dx
            inx = (xi >= 0) & (xi < nx)
            w = np.outer(wy * iny, wx * inx)
            vals = img[np.clip(yi, 0, ny - 1)][:, np.clip(xi, 0, nx - 1)]
            vals = np.where(np.isfinite(vals), vals, 0.0)
            w = np.where(np.isfinite(img[np.clip(yi, 0, ny - 1)][:, np.clip(xi, 0, nx - 1)]), w, 0.0)
            out += w * vals
            norm += w
    with np.errstate(invalid="ignore", divide="ignore"):
        res = out / norm
    return np.where(norm > 1e-12, res, np.nan)


def _axis_weights(s, n):
    if n == 1:
        return np.zeros(s.size, dtype=int), np.zeros(s.size)
    i0 = np.clip(np.floor(s).astype(int), 0, n - 2)
    return i0, s - i0


def _bilinear_extrapolating(img, sy, sx):
    """Bilinear samples of a finite image; linear extrapolation beyond the outer sample centres."""
    ny, nx = img.shape
    iy, fy = _axis_weights(sy, ny)
    ix, fx = _axis_weights(sx, nx)
    iy1, ix1 = np.minimum(iy + 1, ny - 1), np.minimum(ix + 1, nx - 1)
    fy, fx = fy[:, None], fx[None, :]
    return ((1 - fy) * ((1 - fx) * img[iy][:, ix] + fx * img[iy][:, ix1])
            + fy * ((1 - fx) * img[iy1][:, ix] + fx * img[iy1][:, ix1]))


def _warp_plan(vplan, *, box, u0, v0, bin_size, binning, xc, yc, style, literal):
    """Per-warp model grid: the visit's superpixel model resampled on ``binning``-pixel bins."""
    wplan = {"status": vplan["status"], "grid": None, "X": np.empty(0), "Y": np.empty(0), "Z": np.empty(0),
             "dZ": np.empty(0), "model": np.empty(0), "fitRMS": 0.0 if vplan["status"] == REFERENCE else np.nan,
             "detail": ""}
    if vplan["status"] != OK:
        return wplan
    nbx, nby = xc.size, yc.size
    if literal:  # the reference's mapping: the start pixel of each bin
        sx = (binning * np.arange(nbx) + box[0]) / bin_size - 0.5 - u0
        sy = (binning * np.arange(nby) + box[1]) / bin_size - 0.5 - v0
    else:  # the centre of each bin in superpixel coordinates (superpixel u centred on b u + (b - 1) / 2)
        sx = (xc + box[0] - (bin_size - 1) / 2.0) / bin_size - u0
        sy = (yc + box[1] - (bin_size - 1) / 2.0) / bin_size - v0
    grid = _bilinear(vplan["filled"], sy, sx) if literal else _bilinear_extrapolating(vplan["filled"], sy, sx)
    if not np.isfinite(grid).any():
        wplan["status"] = NO_OVERLAP
        return wplan
    grid = np.where(np.isfinite(grid), grid, np.nanmean(grid))
    wplan["grid"] = grid
    # diagnostics on the good superpixels whose centres fall inside this warp
    raw = vplan["raw"]
    jj, ii = np.nonzero(np.isfinite(raw))
    px = (ii + u0) * bin_size + (bin_size - 1) / 2.0 - box[0]
    py = (jj + v0) * bin_size + (bin_size - 1) / 2.0 - box[1]
    inside = (px >= 0) & (px < box[2] - box[0]) & (py >= 0) & (py < box[3] - box[1])
    if inside.any():
        img, _ = K.eval_grid(xc, yc, np.ascontiguousarray(grid), style, True, np.floor(py[inside]),
                             np.floor(px[inside]))
        model = np.diagonal(img).astype(np.float32)
        z = raw[jj[inside], ii[inside]]
        qn, n = vplan["qn"][jj[inside], ii[inside]], vplan["n"][jj[inside], ii[inside]]
        wplan.update(X=px[inside] + box[0], Y=py[inside] + box[1], Z=z, dZ=np.sqrt(qn / n), model=model,
                     fitRMS=float(np.sqrt(np.mean((z - model) ** 2))))
    return wplan


def _tract_payload(wplan, length):
    out = np.zeros(length + 1)
    out[0] = wplan["status"]
    if wplan["status"] == OK:
        out[1:] = wplan["grid"].ravel()
    return out


def _first_of_visit(index, *, first):
    return np.array(first[int(index)], dtype=np.int64)


def _match_tract(lst, visits, config: MatchBackgroundsConfig) -> MatchResult:
    tc = config.tract
    b = tc.bin
    planes = check_same_planes(*[mask_planes(w) for w in lst], what=[f"visit {v}" for v in visits])
    and_mask = bitmask(tc.mask_planes, planes, strict=False)
    scfg = StatsConfig(num_sigma_clip=tc.num_sigma_clip, num_iter=tc.num_iter, and_mask=and_mask, nan_safe=True)
    style = interp_style_code(tc.interpolation)
    boxes = [Box.of(w) for w in lst]
    patches = [w.attrs.get("patch", tuple(bx.to_list())) for w, bx in zip(lst, boxes)]
    patch_box: dict = {}
    seen = set()
    for w, v, p, bx in zip(lst, visits, patches, boxes):
        if patch_box.setdefault(p, bx) != bx:
            raise SchemaError(f"warps of patch {p} cover different boxes: {bx.to_list()} and "
                              f"{patch_box[p].to_list()}", ids=data_ids(w))
        if (v, p) in seen:
            raise SchemaError(f"visit {v} has two warps of patch {p}", ids=data_ids(w))
        seen.add((v, p))
    vlist = list(dict.fromkeys(visits))
    u0 = min(bx.x0 for bx in boxes) // b
    v0 = min(bx.y0 for bx in boxes) // b
    u1 = -(-max(bx.x1 for bx in boxes) // b)
    v1 = -(-max(bx.y1 for bx in boxes) // b)
    shape = (v1 - v0, u1 - u0)
    model_kw = {"bin_size": b, "min_frac": tc.min_frac, "style": style}

    def chunks_of(w):
        data = w["image"].data
        return data.chunks if isinstance(data, da.Array) else (1024, 1024)

    images = [_dask2d(w["image"].data, chunks_of(w)) for w in lst]
    variances = [_dask2d(w["variance"].data, chunks_of(w)) for w in lst]
    masks = [_dask2d(w["mask"].data, chunks_of(w)) for w in lst]

    def tables_for(image, mask, bx):
        tabs, idx = [], []
        for yedges, vs in _window_families(bx.y0, bx.y1, b, tc.window):
            for xedges, us in _window_families(bx.x0, bx.x1, b, tc.window):
                tabs.append(cell_statistics(image, mask, yedges=yedges, xedges=xedges, statistic="MEANCLIP",
                                            stats_config=scfg))
                idx.append((vs, us))
        return tabs, idx

    def visit_acc(arrays_masks):
        tabs, idx = [], []
        for image, mask, bx in arrays_masks:
            t, i = tables_for(image, mask, bx)
            tabs += t
            idx += i
        return dask.delayed(_accumulate, pure=True)(tabs, idx, shape=shape, u0=u0, v0=v0)

    members = {v: [k for k, vk in enumerate(visits) if vk == v] for v in vlist}
    first = np.array([members[v][0] for v in vlist], dtype=np.int64)
    if config.ref_visit is not None:
        if config.ref_visit not in vlist:
            raise ValueError(f"ref_visit {config.ref_visit} is not among the visits {vlist}")
        ref_vi = vlist.index(config.ref_visit)
        ref_idx = da.from_array(np.array(ref_vi, dtype=np.int64))
        pick = ref_vi
    else:
        accs = [visit_acc([(images[k], masks[k], boxes[k]) for k in members[v]]) for v in vlist]
        weights = (tc.best_ref_weight_chi2, tc.best_ref_weight_variance, tc.best_ref_weight_global_coverage)
        chosen = dask.delayed(_choose_visit, pure=True)(accs, weights=weights, **model_kw)
        ref_idx = da.from_delayed(chosen, shape=(), dtype=np.int64)
        pick = ref_idx

    # reference image per patch (NaN where the reference visit lacks the patch)
    ref_images, ref_vars = {}, {}
    for p, bx in patch_box.items():
        cand_i, cand_v = [], []
        for v in vlist:
            k = next((k for k in members[v] if patches[k] == p), None)
            if k is None:
                cand_i.append(da.full(bx.shape, np.nan, dtype=np.float32, chunks=images[0].chunksize))
                cand_v.append(da.full(bx.shape, np.nan, dtype=np.float32, chunks=images[0].chunksize))
            else:
                cand_i.append(images[k])
                cand_v.append(variances[k])
        ch = next(images[k].chunks for k in range(len(lst)) if patches[k] == p)
        ref_images[p] = _pick([c.rechunk(ch) for c in cand_i], pick)
        ref_vars[p] = _pick([c.rechunk(ch) for c in cand_v], pick)

    deltas = [(ref_images[patches[k]].astype(np.float64) - images[k]).astype(np.float32) for k in range(len(lst))]
    vplans = {}
    for vi, v in enumerate(vlist):
        acc = visit_acc([(deltas[k], masks[k], boxes[k]) for k in members[v]])
        is_ref = (ref_idx == vi)
        vplans[v] = dask.delayed(_visit_plan, pure=True)(acc, is_ref, **model_kw)

    out_warps, models, wplans, rows = [], [], [], []
    for k, w in enumerate(lst):
        bx = boxes[k]
        nbx, nby = -(-bx.width // tc.binning), -(-bx.height // tc.binning)
        _, xc = cell_layout(bx.width, nbx)
        _, yc = cell_layout(bx.height, nby)
        wplan = dask.delayed(_warp_plan, pure=True)(
            vplans[visits[k]], box=(bx.x0, bx.y0, bx.x1, bx.y1), u0=u0, v0=v0, bin_size=b, binning=tc.binning,
            xc=xc, yc=yc, style=style, literal=tc.reference_resampling,
        )
        length = nbx * nby
        payload = da.from_delayed(dask.delayed(_tract_payload, pure=True)(wplan, length), shape=(length + 1,),
                                  dtype=np.float64)
        ch = images[k].chunks
        qy = da.from_array(np.arange(bx.height, dtype=np.float64), chunks=(ch[0],))
        qx = da.from_array(np.arange(bx.width, dtype=np.float64), chunks=(ch[1],))
        model = da.blockwise(
            _model_block, "yx", qy, "y", qx, "x", payload, "p", concatenate=True, align_arrays=False, mode="spline",
            xc=xc, yc=yc, style=style, reduce=True, order=-1, width=bx.width, height=bx.height, ny=nby, nx=nbx,
            dtype=np.float32, meta=np.empty((0, 0), dtype=np.float32),
        )
        matched = w.copy()
        matched["image"] = (w["image"].dims, (images[k] + model).astype(np.float32), dict(w["image"].attrs))
        out_warps.append(with_provenance(matched, "match_backgrounds", config))
        models.append(xr.DataArray(model, dims=("y", "x"), coords={"y": w["y"], "x": w["x"]}, name="background"))
        wplans.append(wplan)
        status = _diag(wplan, "status", np.int64)
        d_var = (ref_vars[patches[k]] + variances[k]).astype(np.float32)
        diff_var = compute_statistics(d_var, mask=masks[k], axis=None, statistics=(Statistic.MEANCLIP,),
                                      config=scfg)[Statistic.MEANCLIP]
        mse = compute_statistics(deltas[k].astype(np.float64) - model, mask=masks[k], axis=None,
                                 statistics=(Statistic.MEANSQUARE,), config=scfg)[Statistic.MEANSQUARE]
        ok = status == OK
        rows.append({
            "fitRMS": _diag(wplan, "fitRMS", np.float64),
            "matchedMSE": da.where(ok, mse, np.nan),
            "diffImVar": da.where(ok, diff_var, np.nan),
            "isReference": status == REFERENCE,
            "status": status,
            "failure": _diag(wplan, "failure", object),
        })
    diag = xr.Dataset(
        {key: ("warp", da.stack([r[key] for r in rows])) for key in rows[0]},
        coords={"warp": np.arange(len(lst)), "visit": ("warp", np.array(visits, dtype=object)),
                "patch": ("warp", np.array([str(p) for p in patches], dtype=object))},
    )
    ref_warp = da.blockwise(_first_of_visit, "", ref_idx, "", first=first, dtype=np.int64,
                            meta=np.empty((), dtype=np.int64))
    return MatchResult(warps=out_warps, diagnostics=diag, reference_index=ref_warp, models=models, visits=visits,
                       plans=wplans)

