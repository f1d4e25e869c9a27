"""Binned background model: a statistic per cell, evaluated as an image by spline or Chebyshev.

The image is cut into ``nx x ny`` nearly equal cells (``statistics_and_masks.md`` section 4.1); each
cell gets a robust statistic and its standard error (section 4.2). The model is evaluated lazily on
any pixel grid either by separable interpolation of the cell values (Akima spline by default,
columns first, quadratic extrapolation from the end knots, section 4.3) or by a weighted
least-squares Chebyshev polynomial (section 4.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import dask.array as da
import numpy as np
import scipy.linalg
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import _kernels_background as K
from .errors import DataQualityError, SchemaError
from .model.masks import bitmask
from .model.schema import data_ids, mask_planes, validate, with_provenance
from .stats import Statistic, StatsConfig, grid_statistics, resolve_and_mask

__all__ = [
    "BackgroundConfig",
    "BackgroundModel",
    "cell_layout",
    "fixed_edge_layout",
    "cell_statistics",
    "fit_background",
    "subtract_background",
    "interp_style_code",
]

InterpStyleName = Literal["CONSTANT", "LINEAR", "NATURAL_SPLINE", "CUBIC_SPLINE", "AKIMA_SPLINE", "NONE"]
UndersampleStyle = Literal["THROW_EXCEPTION", "REDUCE_INTERP_ORDER", "INCREASE_NXNYSAMPLE"]
CellStatistic = Literal["MEAN", "MEDIAN", "MEANCLIP"]

_STYLE_CODES = {
    "CONSTANT": K.STYLE_CONSTANT,
    "LINEAR": K.STYLE_LINEAR,
    "NATURAL_SPLINE": K.STYLE_SPLINE,
    "CUBIC_SPLINE": K.STYLE_SPLINE,
    "AKIMA_SPLINE": K.STYLE_AKIMA,
}
_STYLE_NAMES = {K.STYLE_CONSTANT: "CONSTANT", K.STYLE_LINEAR: "LINEAR", K.STYLE_SPLINE: "CUBIC_SPLINE",
                K.STYLE_AKIMA: "AKIMA_SPLINE"}

#: rows of the cell table returned by :func:`cell_statistics` (VARIANCECLIP is NaN unless MEANCLIP)
CELL_VALUE, CELL_ERROR, CELL_NPOINT, CELL_STDEV, CELL_VARCLIP = 0, 1, 2, 3, 4
_N_CELL_ROWS = 5

#: pixels per side of the blocks the cell statistics are computed in when the input is not chunked
_DEFAULT_BLOCK = 1024


def interp_style_code(name: str) -> int:
    """Kernel code of an interpolation style name (``NONE`` has none and raises)."""
    if name not in _STYLE_CODES:
        raise ValueError(f"interpolation style {name!r} cannot be evaluated; choose one of {sorted(_STYLE_CODES)}")
    return _STYLE_CODES[name]


class BackgroundConfig(BaseModel):
    """Configuration of the binned background (the reference's SubtractBackgroundConfig)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bin_size: int = Field(128, ge=1, le=1 << 20, description="cell size in pixels along both axes")
    bin_size_x: int = Field(0, ge=0, le=1 << 20, description="cell width in pixels; 0 uses bin_size")
    bin_size_y: int = Field(0, ge=0, le=1 << 20, description="cell height in pixels; 0 uses bin_size")
    statistic: CellStatistic = Field("MEANCLIP", description="cell statistic: MEAN, MEDIAN or MEANCLIP")
    ignored_mask_planes: tuple[str, ...] = Field(
        ("BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA"),
        description="pixels with any of these mask planes are left out of the cell statistics",
    )
    undersample_style: UndersampleStyle = Field(
        "REDUCE_INTERP_ORDER", description="what to do when there are too few cells for the style or order"
    )
    algorithm: InterpStyleName = Field("AKIMA_SPLINE", description="interpolation style when use_approx is false")
    use_approx: bool = Field(True, description="evaluate a Chebyshev approximation instead of interpolating")
    approx_order_x: int = Field(6, ge=0, le=30, description="order of the Chebyshev approximation")
    approx_order_y: int = Field(-1, ge=-1, le=30, description="must equal approx_order_x; -1 means the same")
    weighting: bool = Field(True, description="weight the Chebyshev fit by 1/(standard error of each cell)")
    num_sigma_clip: float = Field(3.0, gt=0.0, le=100.0, description="clip half-width in sigma for MEANCLIP")
    num_iter: int = Field(3, ge=1, le=100, description="clipping passes for MEANCLIP, the first included")

    @model_validator(mode="after")
    def _check_orders(self):
        if self.approx_order_y not in (-1, self.approx_order_x):
            raise ValueError(
                f"approx_order_y ({self.approx_order_y}) must be -1 or equal approx_order_x ({self.approx_order_x})"
            )
        return self

    @property
    def bin_sizes(self) -> tuple[int, int]:
        """``(bin_x, bin_y)`` in pixels."""
        return (self.bin_size_x or self.bin_size, self.bin_size_y or self.bin_size)

    def stats_config(self, and_mask: int) -> StatsConfig:
        return StatsConfig(num_sigma_clip=self.num_sigma_clip, num_iter=self.num_iter, and_mask=and_mask)


def cell_layout(size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell edges (``n + 1`` integers) and centres (local pixels) of ``n`` cells over ``size`` pixels.

    ``end_i = min(floor(((i + 1) size + floor(n / 2)) / n), size)``; centre ``orig + width / 2 - 0.5``.
    """
    if n < 1 or n > size:
        raise ValueError(f"cannot cut {size} pixels into {n} cells")
    i = np.arange(n, dtype=np.int64)
    ends = np.minimum(((i + 1) * size + n // 2) // n, size)
    edges = np.concatenate([[0], ends])
    centres = edges[:-1] + (edges[1:] - edges[:-1]) / 2.0 - 0.5
    return edges, centres


def fixed_edge_layout(size: int, bin_size: int) -> np.ndarray:
    """Edges ``0, b, 2b, ...`` plus a final edge at ``size`` (the last cell may be narrower)."""
    edges = np.arange(0, size, bin_size, dtype=np.int64)
    return np.concatenate([edges, [size]])


def _group_edges(edges: np.ndarray, target: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Pixel chunks made of whole cells (about ``target`` pixels each) and cells per chunk."""
    sizes = np.diff(edges)
    per = max(1, int(round(target / max(float(sizes.mean()), 1.0))))
    pix, cells = [], []
    for start in range(0, sizes.size, per):
        part = sizes[start : start + per]
        pix.append(int(part.sum()))
        cells.append(int(part.size))
    return tuple(pix), tuple(cells)


_CELL_STAT_CODES = {"MEAN": K.CELL_STAT_MEAN, "MEDIAN": K.CELL_STAT_MEDIAN, "MEANCLIP": K.CELL_STAT_MEANCLIP}


def _fast_cells(stats_config: StatsConfig) -> bool:
    """Whether :func:`K.cell_table` computes what :func:`grid_statistics` would (unit weights,
    non-finite samples excluded, error of the mean from the scatter)."""
    return (
        stats_config.nan_safe
        and not stats_config.weighted
        and not stats_config.error_from_input_variance
        and not stats_config.error_mosaic_mode
    )


def _cell_block(image, mask, *, yedges, xedges, and_mask, statistic, stats_config, block_info=None):
    loc = block_info[0]["array-location"]
    (py0, py1), (px0, px1) = loc
    jy = np.flatnonzero((yedges[:-1] >= py0) & (yedges[:-1] < py1))
    ix = np.flatnonzero((xedges[:-1] >= px0) & (xedges[:-1] < px1))
    ye = np.append(yedges[jy], yedges[jy[-1] + 1]) - py0
    xe = np.append(xedges[ix], xedges[ix[-1] + 1]) - px0
    code = _CELL_STAT_CODES.get(Statistic(statistic).value)
    if code is not None and _fast_cells(stats_config):
        out = np.empty((_N_CELL_ROWS, jy.size, ix.size), dtype=np.float64)
        img = image if image.dtype in (np.float32, np.float64) else image.astype(np.float64)
        K.cell_table(
            img, mask.astype(np.uint32, copy=False), ye.astype(np.int64), xe.astype(np.int64),
            resolve_and_mask(stats_config.and_mask), code,
            float(stats_config.num_sigma_clip), int(stats_config.num_iter), out,
        )
        return out
    stat = Statistic(statistic)
    wanted = (stat, Statistic.NPOINT, Statistic.STDEV)
    if stat is Statistic.MEANCLIP:
        wanted += (Statistic.VARIANCECLIP,)
    values, errors = grid_statistics(
        image, mask=mask, yedges=ye, xedges=xe, statistics=wanted, config=stats_config, errors=True
    )
    out = np.empty((_N_CELL_ROWS, jy.size, ix.size), dtype=np.float64)
    out[CELL_VALUE] = values[stat]
    out[CELL_ERROR] = errors[stat]
    out[CELL_NPOINT] = values[Statistic.NPOINT]
    out[CELL_STDEV] = values[Statistic.STDEV]
    out[CELL_VARCLIP] = values[Statistic.VARIANCECLIP] if stat is Statistic.MEANCLIP else np.nan
    bad = out[CELL_NPOINT] == 0
    out[CELL_VALUE, bad] = np.nan
    out[CELL_ERROR, bad] = np.nan
    return out


def _as_dask(arr, chunks):
    if isinstance(arr, da.Array):
        return arr
    return da.from_array(arr, chunks=chunks)


def cell_statistics(
    image,
    mask,
    *,
    yedges: np.ndarray,
    xedges: np.ndarray,
    statistic: str,
    stats_config: StatsConfig,
) -> da.Array:
    """Lazy cell table ``(5, ny, nx)``: statistic, its standard error, NPOINT, STDEV, VARIANCECLIP.

    ``image`` and ``mask`` are 2-D numpy or dask arrays; cells are the products of the ``yedges`` and
    ``xedges`` intervals (local pixels). Dask arrays are rechunked so that every block holds whole
    cells (about the original chunk size); one task per block. Numpy arrays are reduced at once in
    one pass (the table is then a one-chunk dask array). Cells without a usable pixel get a NaN
    statistic and error.

    With unit weights, non-finite samples excluded and the default error (every ``stats_config``
    built by :class:`BackgroundConfig`) the cells are reduced by :func:`K.cell_table`: the good
    pixels of a cell are gathered once (rows without an excluded pixel as blocks), the quartiles
    come from an exact histogram selection and the moments and clip passes run over the gathered
    buffer with the arithmetic of :func:`pipeline.stats.grid_statistics`, whose numbers they
    equal. Other statistics configurations go through :func:`grid_statistics`.
    """
    and_mask = stats_config.and_mask
    if isinstance(image, np.ndarray) and isinstance(mask, np.ndarray):
        # in-memory input: one kernel pass over the whole image, no block copies or hashing
        whole = {"array-location": [(0, image.shape[0]), (0, image.shape[1])]}
        table = _cell_block(
            image, mask, yedges=np.asarray(yedges), xedges=np.asarray(xedges), and_mask=and_mask,
            statistic=statistic, stats_config=stats_config, block_info={0: whole},
        )
        return da.from_array(table, chunks=table.shape)
    ty = image.chunksize[0] if isinstance(image, da.Array) else _DEFAULT_BLOCK
    tx = image.chunksize[1] if isinstance(image, da.Array) else _DEFAULT_BLOCK
    ypix, ycells = _group_edges(yedges, ty)
    xpix, xcells = _group_edges(xedges, tx)
    img = _as_dask(image, (ypix, xpix)).rechunk((ypix, xpix))
    msk = _as_dask(mask, (ypix, xpix)).rechunk((ypix, xpix))
    return da.map_blocks(
        _cell_block,
        img,
        msk,
        yedges=np.asarray(yedges),
        xedges=np.asarray(xedges),
        and_mask=and_mask,
        statistic=statistic,
        stats_config=stats_config,
        new_axis=0,
        chunks=((_N_CELL_ROWS,), ycells, xcells),
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
    )


def _check_cells(cells, *, ids):
    if not np.any(cells[CELL_NPOINT] > 0):
        raise DataQualityError(
            "every pixel carries an ignored mask plane (or is not finite): no cell has data for the background",
            ids=ids,
        )
    return cells


def _spline_block(qy, qx, cells, *, xc, yc, style, reduce, ids):
    grid = np.ascontiguousarray(cells[CELL_VALUE])
    out = np.empty((np.size(qy), np.size(qx)), dtype=np.float32)
    status = K.eval_grid_into(
        np.asarray(xc, np.float64), np.asarray(yc, np.float64), grid, style, reduce,
        np.asarray(qy, np.float64), np.asarray(qx, np.float64), out,
    )
    if status:
        raise DataQualityError(
            f"a line of the background grid has {status} usable cells, fewer than the "
            f"{K.MIN_POINTS[style]} {_STYLE_NAMES[style]} needs (undersample_style THROW_EXCEPTION)",
            ids=ids,
        )
    return out


def _solve_chebyshev(cells, *, xc, yc, order, weighting, width, height, ids):
    z = cells[CELL_VALUE].ravel()
    err = cells[CELL_ERROR].ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        w = 1.0 / err if weighting else np.ones_like(z)
    xx, yy = np.meshgrid(xc, yc)
    use = np.isfinite(z) & np.isfinite(w)
    nterms = (order + 1) * (order + 2) // 2
    if not use.any():
        what = "finite value and finite weight 1/error" if weighting else "finite value"
        raise DataQualityError(f"no background cell has a {what}; cannot fit a Chebyshev approximation", ids=ids)
    if use.sum() < nterms:
        raise DataQualityError(
            f"only {int(use.sum())} usable background cells for a Chebyshev approximation of order {order} "
            f"({nterms} terms)",
            ids=ids,
        )
    a = K.chebyshev_design(xx.ravel()[use], yy.ravel()[use], order, width, height)
    wu = w[use]
    normal = a.T @ (a * wu[:, None])
    rhs = a.T @ (wu * z[use])
    lu, piv = scipy.linalg.lu_factor(normal, check_finite=True)
    return scipy.linalg.lu_solve((lu, piv), rhs)


def _cheb_block(qy, qx, coeffs, *, order, width, height):
    out = np.empty((np.size(qy), np.size(qx)), dtype=np.float32)
    K.chebyshev_eval_into(np.asarray(coeffs, np.float64), order, np.asarray(qx, np.float64),
                          np.asarray(qy, np.float64), width, height, out)
    return out


@dataclass(frozen=True)
class BackgroundModel:
    """A fitted binned background: lazy cell table plus everything needed to evaluate it.

    ``cells`` is a ``(5, ny, nx)`` dask array (statistic, standard error, NPOINT, STDEV and, for
    MEANCLIP, VARIANCECLIP per cell);
    cell edges and centres are local pixels of the fitted image, whose element ``[0, 0]`` sits at
    parent pixel ``(x0, y0)``. ``style`` is the interpolation style and ``order`` the Chebyshev
    order actually used (after the undersample rules).
    """

    cells: da.Array
    x_edges: np.ndarray
    y_edges: np.ndarray
    x_centres: np.ndarray
    y_centres: np.ndarray
    width: int
    height: int
    x0: int
    y0: int
    config: BackgroundConfig
    style: str
    order: int
    chunks: tuple | None = None
    ids: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` cells."""
        return (len(self.y_centres), len(self.x_centres))

    @property
    def statistic(self) -> da.Array:
        """Lazy ``(ny, nx)`` cell values."""
        return self.cells[CELL_VALUE]

    @property
    def error(self) -> da.Array:
        """Lazy ``(ny, nx)`` standard error of each cell value."""
        return self.cells[CELL_ERROR]

    @property
    def npoint(self) -> da.Array:
        """Lazy ``(ny, nx)`` number of pixels used per cell."""
        return self.cells[CELL_NPOINT]

    def to_dataset(self) -> xr.Dataset:
        """The cell grid as a small lazy Dataset (cell centres in parent pixels as coordinates)."""
        coords = {"cell_y": self.y_centres + self.y0, "cell_x": self.x_centres + self.x0}
        dims = ("cell_y", "cell_x")
        return xr.Dataset(
            {
                "statistic": (dims, self.cells[CELL_VALUE]),
                "error": (dims, self.cells[CELL_ERROR]),
                "npoint": (dims, self.cells[CELL_NPOINT]),
                "stdev": (dims, self.cells[CELL_STDEV]),
            },
            coords=coords,
        )

    def _checked_cells(self) -> da.Array:
        one = self.cells.rechunk(-1)
        return one.map_blocks(_check_cells, ids=self.ids, dtype=np.float64)

    def evaluate(self, like: xr.Dataset | xr.DataArray | None = None) -> xr.DataArray:
        """The model as a lazy float32 image on the pixel grid of ``like`` (default: the fitted grid).

        ``like`` only lends its ``x``/``y`` parent-pixel coordinates (and its chunks when it is
        dask-backed); it may be a sub-window or extend beyond the fitted image (extrapolation).
        The model image has the chunks of ``like`` (of the fitted image when ``like`` is None) if
        those are dask arrays, else it is one block: an in-memory image is evaluated in one pass
        and written once, without assembling blocks.
        """
        if like is None:
            xs = np.arange(self.x0, self.x0 + self.width)
            ys = np.arange(self.y0, self.y0 + self.height)
            chunks = self.chunks or (self.height, self.width)
        else:
            if "x" not in like.coords or "y" not in like.coords:
                raise SchemaError("evaluate(like=...) needs 'x' and 'y' pixel coordinates", ids=self.ids)
            xs = np.asarray(like.indexes["x"])
            ys = np.asarray(like.indexes["y"])
            ref = like["image"] if isinstance(like, xr.Dataset) and "image" in like else like
            data = ref.data if isinstance(ref, xr.DataArray) else None
            if isinstance(data, da.Array) and data.ndim == 2:
                chunks = data.chunks
            else:
                chunks = (max(len(ys), 1), max(len(xs), 1))
        qy = da.from_array((ys - self.y0).astype(np.float64), chunks=(chunks[0],))
        qx = da.from_array((xs - self.x0).astype(np.float64), chunks=(chunks[1],))
        cells = self._checked_cells()
        if self.config.use_approx:
            nterms = (self.order + 1) * (self.order + 2) // 2
            coeffs = da.blockwise(
                _solve_chebyshev, "c", cells, "sab", new_axes={"c": nterms}, concatenate=True,
                xc=self.x_centres, yc=self.y_centres, order=self.order, weighting=self.config.weighting,
                width=self.width, height=self.height, ids=self.ids, dtype=np.float64,
                meta=np.empty((0,), dtype=np.float64),
            )
            img = da.blockwise(
                _cheb_block, "yx", qy, "y", qx, "x", coeffs, "c", concatenate=True, align_arrays=False,
                order=self.order, width=self.width, height=self.height, dtype=np.float32,
                meta=np.empty((0, 0), dtype=np.float32),
            )
        else:
            code = interp_style_code(self.style)
            reduce = self.config.undersample_style == "REDUCE_INTERP_ORDER"
            img = da.blockwise(
                _spline_block, "yx", qy, "y", qx, "x", cells, "sab", concatenate=True, align_arrays=False,
                xc=self.x_centres, yc=self.y_centres, style=code, reduce=reduce, ids=self.ids,
                dtype=np.float32, meta=np.empty((0, 0), dtype=np.float32),
            )
        return xr.DataArray(img, dims=("y", "x"), coords={"y": ys, "x": xs}, name="background")


def _resolve_grid(width: int, height: int, config: BackgroundConfig, ids) -> tuple[int, int, str, int]:
    """Number of cells and the style/order actually used, after the undersample rules (eager)."""
    bx, by = config.bin_sizes
    nx, ny = math.ceil(width / bx), math.ceil(height / by)
    style, order = config.algorithm, -1
    if config.use_approx:
        order = config.approx_order_x
        if min(nx, ny) <= order:
            if config.undersample_style == "THROW_EXCEPTION":
                raise ValueError(
                    f"too few cells ({nx}x{ny}) to constrain a Chebyshev approximation of order {order}: "
                    f"min(nx, ny) must exceed the order (undersample_style THROW_EXCEPTION) [{_ids(ids)}]"
                )
            if config.undersample_style == "REDUCE_INTERP_ORDER":
                order = min(nx, ny) - 1
            else:  # INCREASE_NXNYSAMPLE
                side = min(width, height) // order
                if side < 1:
                    raise ValueError(
                        f"cannot increase the sampling of a {width}x{height} image to order {order} [{_ids(ids)}]"
                    )
                nx, ny = min(width // side + 1, width), min(height // side + 1, height)
        return nx, ny, style, order
    if style == "NONE":
        raise ValueError("algorithm NONE cannot be evaluated; set use_approx or choose an interpolation style")
    code = interp_style_code(style)
    if min(nx, ny) < K.MIN_POINTS[code]:
        if config.undersample_style == "THROW_EXCEPTION":
            raise ValueError(
                f"too few cells ({nx}x{ny}) for {style}, which needs {K.MIN_POINTS[code]} per axis "
                f"(undersample_style THROW_EXCEPTION) [{_ids(ids)}]"
            )
        if config.undersample_style == "INCREASE_NXNYSAMPLE":
            raise ValueError(
                f"undersample_style INCREASE_NXNYSAMPLE is not supported for interpolation ({nx}x{ny} cells "
                f"for {style})"
            )
        style = _STYLE_NAMES[K.max_style_for(min(nx, ny))]
    return nx, ny, style, order


def _ids(ids) -> str:
    from .errors import describe_ids

    return describe_ids(ids)


def fit_background(image_ds: xr.Dataset, *, config: BackgroundConfig = BackgroundConfig()) -> BackgroundModel:
    """Fit a binned background model to the image plane of ``image_ds`` (lazy).

    Cells: ``nx = ceil(W / bin_x)``, ``ny = ceil(H / bin_y)`` nearly equal cells; statistic
    ``config.statistic`` of the pixels without any ``ignored_mask_planes`` bit (non-finite pixels are
    always left out), with its standard error. The returned model holds the cell table as a small
    dask array: lazy for dask-backed input; for numpy-backed input it is computed here (one pass
    over the image in memory, as cheap as wrapping the image in a graph). A
    :class:`DataQualityError` is raised when the model is evaluated if no pixel at all is usable.

    Notes
    -----
    Reference: lsst/meas_algorithms ``SubtractBackgroundTask.fitBackground`` with lsst/afw
    ``BackgroundMI``, ``Interpolate`` and ``ApproximateChebyshev``. Config mapping:
    ``bin_size``/``bin_size_x``/``bin_size_y`` = binSize/binSizeX/binSizeY,
    ``statistic`` = statisticsProperty, ``ignored_mask_planes`` = ignoredPixelMask,
    ``undersample_style`` = undersampleStyle, ``algorithm`` = algorithm, ``use_approx`` =
    useApprox, ``approx_order_x``/``approx_order_y`` = approxOrderX/approxOrderY, ``weighting`` =
    weighting, ``num_sigma_clip``/``num_iter`` = the StatisticsControl clip settings.
    Differences: non-finite pixels are always excluded (the reference's isNanSafe is false by
    default); the superpixel filter (doFilterSuperPixels) is not implemented;
    INCREASE_NXNYSAMPLE is refused for interpolation as in the reference.
    """
    ids = data_ids(image_ds) if isinstance(image_ds, xr.Dataset) else {}
    validate(image_ds, check_wcs=False)
    if image_ds["image"].ndim != 2:
        raise SchemaError(f"fit_background needs one 2-D image, got dims {image_ds['image'].dims}", ids=ids)
    height, width = image_ds["image"].shape
    nx, ny, style, order = _resolve_grid(width, height, config, ids)
    xedges, xc = cell_layout(width, nx)
    yedges, yc = cell_layout(height, ny)
    and_mask = bitmask(config.ignored_mask_planes, mask_planes(image_ds), strict=False)
    img = image_ds["image"].data
    msk = image_ds["mask"].data
    cells = cell_statistics(
        img, msk, yedges=yedges, xedges=xedges, statistic=config.statistic,
        stats_config=config.stats_config(and_mask),
    )
    chunks = img.chunks if isinstance(img, da.Array) else None
    x0, y0 = int(image_ds.indexes["x"][0]), int(image_ds.indexes["y"][0])
    return BackgroundModel(
        cells=cells, x_edges=xedges, y_edges=yedges, x_centres=xc, y_centres=yc, width=width, height=height,
        x0=x0, y0=y0, config=config, style=style, order=order, chunks=chunks, ids=ids,
    )


def subtract_background(
    ds: xr.Dataset, *, config: BackgroundConfig = BackgroundConfig()
) -> tuple[xr.Dataset, BackgroundModel]:
    """Return ``(ds with the background model subtracted from its image, the model)``; lazy.

    Variance and mask are untouched; the input is not modified.

    Notes
    -----
    Reference: lsst/meas_algorithms ``SubtractBackgroundTask.run`` (fit, then subtract the model
    image). Config mapping as in :func:`fit_background`.
    """
    model = fit_background(ds, config=config)
    bg = model.evaluate(like=ds)
    out = ds.copy()
    out["image"] = (ds["image"] - bg.data).astype(np.float32)
    out["image"].attrs = dict(ds["image"].attrs)
    out = with_provenance(out, "subtract_background", config)
    return out, model
