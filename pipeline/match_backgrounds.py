"""MatchBackgrounds: bring the backgrounds of the warps of one patch onto a reference warp.

For every warp the difference ``reference - warp`` is binned, modelled by a spline through the
cells or a Chebyshev polynomial, and the model is added to the warp (``match_backgrounds.md``
part A, the legacy per-patch algorithm). The reference is chosen by a cost function of pixel
variance, mean level and coverage unless given. Everything is lazy: the reference choice is a
0-d dask reduction plus a small solve, each model a small per-visit solve evaluated per chunk.
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
    CELL_NPOINT,
    CELL_STDEV,
    CELL_VALUE,
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
    "plot_match_diagnostics",
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


class MatchBackgroundsConfig(BaseModel):
    """Configuration of :func:`match_backgrounds` (the reference's legacy MatchBackgroundsConfig)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["legacy"] = Field(
        "legacy", description="algorithm generation: 'legacy' = per-patch matching of the 2012-2024 task"
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
    """
    lst, stacked = _as_warp_list(warps)
    if not lst:
        raise ValueError("no exposures to match")
    for w in lst:
        validate(w, check_wcs=False)
        if w["image"].ndim != 2:
            raise SchemaError(f"each warp must be 2-D, got dims {w['image'].dims}", ids=data_ids(w))
    visits = [w.attrs.get("visit") for w in lst]
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


def plot_match_diagnostics(result: MatchResult, visit, path) -> None:
    """Write the seed's debug plot for ``visit`` to ``path`` (PNG): model with grid points, residuals.

    This computes the model image and the diagnostic grid of that visit (it is a reporting helper,
    meant to be called from notebooks or the CLI, not inside a graph).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    if visit not in result.visits:
        raise ValueError(f"visit {visit} is not among the matched visits {result.visits}")
    k = result.visits.index(visit)
    model_da = result.models[k]
    plan, model_img = dask.compute(result.plans[k], model_da.data)
    X, Y, Z, dZ, model = plan["X"], plan["Y"], plan["Z"], plan["dZ"], plan["model"]
    x0, y0 = int(model_da.x[0]), int(model_da.y[0])
    dy, dx = model_img.shape
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True, layout="constrained")
    extent = (x0 - 0.5, x0 + dx - 0.5, y0 + dy - 0.5, y0 - 0.5)
    if Z.size == 0 or model.size == 0:
        axes[0].imshow(model_img, extent=extent, cmap="Spectral")
        axes[0].set_title(f"visit {visit}: no grid ({STATUS_MESSAGES.get(plan['status'], '')})")
    else:
        resid = Z - model
        norm = mcolors.Normalize(vmin=float(np.nanmin(Z)), vmax=float(np.nanmax(Z)))
        maxdiff = float(np.nanmax(np.abs(resid))) or 1.0
        dnorm = mcolors.Normalize(vmin=-maxdiff, vmax=maxdiff)
        rms = float(np.sqrt(np.nanmean(resid**2)))
        size = 15.0 * np.mean(dZ) / dZ
        im = axes[0].imshow(model_img, extent=extent, norm=norm, cmap="Spectral")
        axes[0].scatter(X, Y, c=Z, s=size, edgecolor="none", norm=norm, marker="o", cmap="Spectral")
        sc = axes[1].scatter(X, Y, c=resid, edgecolor="none", norm=dnorm, marker="s", cmap="seismic")
        fig.colorbar(im, ax=axes[0], location="top")
        fig.colorbar(sc, ax=axes[1], location="top")
        axes[0].set_xlabel("model and grid")
        axes[1].set_xlabel(f"residuals. rms = {rms:0.3f}")
    axes[0].set_xlim(x0, x0 + dx)
    axes[0].set_ylim(y0 + dy, y0)
    fig.savefig(path, format="png")
    plt.close(fig)
