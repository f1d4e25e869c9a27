"""Masked robust statistics on numpy and (lazily) dask arrays.

The statistics of ``statistics_and_masks.md`` section 1 (the reference's "afw statistics"):
sample selection by an and-mask and finiteness, multiplicative or inverse-variance weights, plain
moments, numpy-"linear" quantiles, the clipped MEANCLIP/STDEVCLIP/VARIANCECLIP passes, the errors
of the mean-like statistics, ORMASK and mask-bit propagation from excluded samples.

Along an axis the reduction is chunk-wise (the axis is put in one chunk). Over a whole chunked
array (``axis=None``) every result is exact and independent of the chunking: moments combine
per-chunk partial sums, and quantiles are found by an exact radix selection on the bit patterns of
the values (a fixed number of histogram passes, each a tree reduction over chunks), so the median
of a chunked image equals numpy's median of the whole image.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import _kernels_stats as K
from .errors import SchemaError, SkystackWarning
from .model.masks import CANONICAL_PLANES, bitmask

__all__ = [
    "IQR_TO_SIGMA",
    "Statistic",
    "StatsConfig",
    "compute_statistics",
    "grid_statistics",
    "clipped_mean",
    "clipped_stdev",
    "median",
    "iqr_sigma",
    "resolve_and_mask",
    "propagation_table",
]

#: sigma of a Gaussian per unit interquartile range, 1 / (2 * Phi^-1(0.75))
IQR_TO_SIGMA = K.IQR_TO_SIGMA


class Statistic(str, enum.Enum):
    """The quantities the statistics can return (the reference's ``Property`` flags)."""

    NPOINT = "NPOINT"
    MEAN = "MEAN"
    STDEV = "STDEV"
    VARIANCE = "VARIANCE"
    MEDIAN = "MEDIAN"
    IQRANGE = "IQRANGE"
    MEANCLIP = "MEANCLIP"
    STDEVCLIP = "STDEVCLIP"
    VARIANCECLIP = "VARIANCECLIP"
    MIN = "MIN"
    MAX = "MAX"
    SUM = "SUM"
    MEANSQUARE = "MEANSQUARE"
    ORMASK = "ORMASK"
    NCLIPPED = "NCLIPPED"
    NMASKED = "NMASKED"


_QUANTILE_STATS = {Statistic.MEDIAN, Statistic.IQRANGE}
_CLIP_STATS = {Statistic.MEANCLIP, Statistic.STDEVCLIP, Statistic.VARIANCECLIP, Statistic.NCLIPPED}
_COUNT_STATS = {Statistic.NPOINT, Statistic.NMASKED, Statistic.NCLIPPED}


def check_propagation_thresholds(value: dict[str, float]) -> dict[str, float]:
    """Validate a plane -> weight-fraction table of mask propagation thresholds (each in [0, 1])."""
    for name, thr in value.items():
        if not (0.0 <= thr <= 1.0):
            raise ValueError(f"mask propagation threshold of {name!r} is {thr}; it must lie in [0, 1]")
    return value


class StatsConfig(BaseModel):
    """Control parameters of the statistics (the reference's ``StatisticsControl``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_sigma_clip: float = Field(3.0, gt=0.0, le=1e6, description="clip half-width in units of sigma")
    num_iter: int = Field(3, ge=1, le=100, description="number of clipping passes, the first one included")
    and_mask: int | tuple[str, ...] = Field(
        0, description="samples with any of these mask bits (an integer or plane names) are excluded"
    )
    nan_safe: bool = Field(True, description="exclude non-finite samples")
    weighted: bool = Field(
        False, description="use weights: the given weights, else inverse-variance weights 1/variance"
    )
    error_from_input_variance: bool = Field(
        False, description="error of the mean from the input variances: sum(w^2 v) / sum(w)^2"
    )
    error_mosaic_mode: bool = Field(
        False, description="error of the mean as the weighted mean of the input variances: sum(w v) / sum(w)"
    )
    mask_propagation_thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="plane name -> weight fraction of excluded samples above which the bit enters ORMASK",
    )

    @field_validator("and_mask")
    @classmethod
    def _check_and_mask(cls, value):
        if isinstance(value, int) and not 0 <= value < 2**32:
            raise ValueError(f"and_mask {value} is not a 32-bit mask")
        return value

    @field_validator("mask_propagation_thresholds")
    @classmethod
    def _check_thresholds(cls, value):
        return check_propagation_thresholds(value)

    @model_validator(mode="after")
    def _check_error_modes(self):
        if self.error_from_input_variance and self.error_mosaic_mode:
            raise ValueError("error_from_input_variance and error_mosaic_mode are mutually exclusive")
        return self

    def __hash__(self):  # frozen models with a dict field are otherwise unhashable
        return hash(self.model_dump_json())


def resolve_and_mask(and_mask: int | Iterable[str], planes: Mapping[str, int] | None = None) -> int:
    """The and-mask as an integer (plane names are looked up in ``planes``, canonical by default)."""
    if isinstance(and_mask, int):
        return int(and_mask)
    return bitmask(list(and_mask), CANONICAL_PLANES if planes is None else planes)


def propagation_table(
    thresholds: Mapping[str, float], planes: Mapping[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(bits, thresholds)`` arrays for the kernels from a plane-name -> fraction mapping."""
    planes = CANONICAL_PLANES if planes is None else planes
    names = sorted(thresholds, key=lambda n: bitmask(n, planes))
    bits = np.array([bitmask(n, planes) for n in names], dtype=np.uint32)
    thr = np.array([float(thresholds[n]) for n in names], dtype=np.float64)
    return bits, thr


def _as_stats(statistics) -> tuple[Statistic, ...]:
    if isinstance(statistics, (str, Statistic)):
        statistics = (statistics,)
    out = []
    for s in statistics:
        try:
            out.append(Statistic(s))
        except ValueError:
            raise SchemaError(
                f"unknown statistic {s!r}; choose from {', '.join(x.value for x in Statistic)}"
            ) from None
    if not out:
        raise SchemaError("no statistic requested")
    return tuple(dict.fromkeys(out))


def _is_dask(a) -> bool:
    return a is not None and hasattr(a, "__dask_graph__") and a.__dask_graph__() is not None


class _Plan:
    """Validated, array-independent description of one statistics request."""

    def __init__(self, config, planes, stats, has_weights, has_variance):
        self.stats = stats
        self.and_mask = resolve_and_mask(config.and_mask, planes)
        self.prop_bits, self.prop_thr = propagation_table(config.mask_propagation_thresholds, planes)
        self.nan_safe = bool(config.nan_safe)
        if config.weighted:
            self.weight_mode = K.WEIGHT_MULTIPLICATIVE if has_weights else K.WEIGHT_INVERSE_VARIANCE
        else:
            self.weight_mode = K.WEIGHT_NONE
        if config.error_from_input_variance:
            self.error_mode = K.ERROR_INPUT_VARIANCE
        elif config.error_mosaic_mode:
            self.error_mode = K.ERROR_MOSAIC
        else:
            self.error_mode = K.ERROR_DEFAULT
        self.num_sigma = float(config.num_sigma_clip)
        self.num_iter = int(config.num_iter)
        wanted = set(stats)
        self.do_clip = bool(wanted & _CLIP_STATS)
        self.do_quantiles = bool(wanted & _QUANTILE_STATS) or self.do_clip
        #: unit weights, NaN-safe, error from the scatter: the kernels' gather-and-select fast path
        self.unit = self.weight_mode == K.WEIGHT_NONE and self.error_mode == K.ERROR_DEFAULT and self.nan_safe

    def __dask_tokenize__(self):
        return (
            "skystack-stats-plan",
            tuple(s.value for s in self.stats),
            self.and_mask,
            self.prop_bits.tolist(),
            self.prop_thr.tolist(),
            self.nan_safe,
            self.weight_mode,
            self.error_mode,
            self.num_sigma,
            self.num_iter,
            self.do_clip,
            self.do_quantiles,
        )

    def run(self, x, m, v, w):
        """Kernel call on 2-D ``(n_sets, n_samples)`` arrays; returns the float64 result table."""
        n = x.shape[0]
        out = np.full((n, K.N_COLUMNS + 1), np.nan, dtype=np.float64)
        ormask = np.zeros(n, dtype=np.uint32)
        table = out[:, : K.N_COLUMNS]
        if self.unit and x.shape[1] > K.FAST_MIN_SAMPLES:
            if x.dtype not in (np.float32, np.float64):
                x = x.astype(np.float64)
            K.reduce_rows_unit(
                x, m, self.and_mask, self.num_sigma, self.num_iter, self.do_quantiles, self.do_clip,
                self.prop_bits, self.prop_thr, table, ormask,
            )
            out[:, K.N_COLUMNS] = ormask
            return out
        K.reduce_rows(
            x,
            m,
            v,
            w,
            self.and_mask,
            self.nan_safe,
            self.weight_mode,
            self.error_mode,
            self.num_sigma,
            self.num_iter,
            self.do_quantiles,
            self.do_clip,
            self.prop_bits,
            self.prop_thr,
            table,
            ormask,
        )
        out[:, K.N_COLUMNS] = ormask
        return out


C_ORMASK = K.N_COLUMNS


def _finish(table, stats, errors: bool, xp):
    """Turn the result table (last axis = columns) into the requested statistics (and errors)."""
    col = lambda c: table[..., c]  # noqa: E731
    n = col(K.C_NPOINT)
    var = col(K.C_VARIANCE)
    mean = col(K.C_MEAN)
    kept = col(K.C_NKEPT)
    varclip = col(K.C_VARCLIP)
    values: dict[Statistic, Any] = {}
    errs: dict[Statistic, Any] = {}

    def div(a, b):
        ok = b != 0
        return xp.where(ok, a / xp.where(ok, b, 1.0), np.nan)

    def sqrt(a):
        return xp.sqrt(xp.where(a >= 0, a, np.nan))

    def var_err(s2, cnt):
        return sqrt(div(2.0 * (cnt - 1.0) * s2 * s2, cnt * cnt))

    for s in stats:
        if s is Statistic.NPOINT:
            values[s] = n.astype(np.int64)
            errs[s] = xp.zeros_like(n)
        elif s is Statistic.NMASKED:
            values[s] = col(K.C_NMASKED).astype(np.int64)
            errs[s] = xp.zeros_like(n)
        elif s is Statistic.NCLIPPED:
            values[s] = col(K.C_NCLIPPED).astype(np.int64)
            errs[s] = xp.zeros_like(n)
        elif s is Statistic.ORMASK:
            values[s] = col(C_ORMASK).astype(np.uint32)
            errs[s] = xp.zeros_like(n)
        elif s is Statistic.MEAN:
            values[s] = mean
            errs[s] = sqrt(col(K.C_MEAN_ERRVAR))
        elif s is Statistic.VARIANCE:
            values[s] = var
            errs[s] = var_err(var, n)
        elif s is Statistic.STDEV:
            values[s] = sqrt(var)
            errs[s] = 0.5 * div(var_err(var, n), sqrt(var))
        elif s is Statistic.MEDIAN:
            values[s] = col(K.C_MEDIAN)
            errs[s] = sqrt(div(0.5 * math.pi * var, n))
        elif s is Statistic.IQRANGE:
            values[s] = col(K.C_Q75) - col(K.C_Q25)
            errs[s] = xp.full_like(n, np.nan)
        elif s is Statistic.MEANCLIP:
            values[s] = col(K.C_MEANCLIP)
            errs[s] = sqrt(col(K.C_MEANCLIP_ERRVAR))
        elif s is Statistic.VARIANCECLIP:
            values[s] = varclip
            errs[s] = var_err(varclip, kept)
        elif s is Statistic.STDEVCLIP:
            values[s] = sqrt(varclip)
            errs[s] = 0.5 * div(var_err(varclip, kept), sqrt(varclip))
        elif s is Statistic.MIN:
            values[s] = col(K.C_MIN)
            errs[s] = xp.zeros_like(n)
        elif s is Statistic.MAX:
            values[s] = col(K.C_MAX)
            errs[s] = xp.zeros_like(n)
        elif s is Statistic.SUM:
            values[s] = col(K.C_SUM)
            errs[s] = xp.zeros_like(n)
        elif s is Statistic.MEANSQUARE:
            ms = div(n - 1.0, n) * var + mean * mean
            values[s] = ms
            errs[s] = sqrt(2.0 * div(ms, n) ** 2)
    return values, errs


def _check_inputs(values, mask, variance, weights, plan_cfg: StatsConfig, axis):
    shape = tuple(values.shape)
    ndim = len(shape)
    if any(s == 0 for s in shape):
        raise SchemaError(f"cannot compute statistics of an empty array (shape {shape})")
    if axis is not None:
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise SchemaError(f"axis must be an integer or None, got {axis!r}")
        if not -ndim <= axis < ndim:
            raise SchemaError(f"axis {axis} is out of range for an array of {ndim} dimensions")
    for name, arr in (("mask", mask), ("variance", variance), ("weights", weights)):
        if arr is None:
            continue
        try:
            np.broadcast_shapes(tuple(arr.shape), shape)
        except ValueError:
            raise SchemaError(f"{name} of shape {tuple(arr.shape)} does not broadcast to values {shape}") from None
        if np.broadcast_shapes(tuple(arr.shape), shape) != shape:
            raise SchemaError(f"{name} of shape {tuple(arr.shape)} does not broadcast to values {shape}")
    if mask is not None and not np.issubdtype(mask.dtype, np.integer):
        raise SchemaError(f"mask must hold integers (bit planes), got dtype {mask.dtype}")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise SchemaError(f"values must be real numbers, got dtype {values.dtype}")
    if plan_cfg.weighted and weights is None and variance is None:
        raise SchemaError("weighted statistics need weights or a variance (for inverse-variance weights)")
    if (plan_cfg.error_from_input_variance or plan_cfg.error_mosaic_mode) and variance is None:
        raise SchemaError("errors from the input variance (or mosaic mode) need a variance array")


def compute_statistics(
    values,
    *,
    mask=None,
    variance=None,
    weights=None,
    axis: int | None = None,
    statistics: Iterable[Statistic | str] | Statistic | str = (Statistic.MEAN,),
    config: StatsConfig = StatsConfig(),
    planes: Mapping[str, int] | None = None,
    errors: bool = False,
):
    """Masked, weighted, robust statistics of ``values`` over ``axis`` (all samples when None).

    ``mask`` (integer bit field), ``variance`` and ``weights`` broadcast against ``values``. Plane
    names in ``config`` are looked up in ``planes`` (the canonical planes by default). Works on
    numpy arrays (eager) and dask arrays (lazy); returns ``{Statistic: array}`` with the reduced
    shape (0-d for ``axis=None``), and with ``errors=True`` a pair ``(values, errors)`` of such
    dicts, the errors being standard deviations of each statistic (section 1.5).

    Counts (NPOINT, NMASKED, NCLIPPED) are int64, ORMASK uint32, everything else float64.

    Notes
    -----
    Reference: lsst/afw ``math::makeStatistics`` with a ``StatisticsControl``. Config mapping:
    ``num_sigma_clip`` = numSigmaClip, ``num_iter`` = numIter, ``and_mask`` = andMask,
    ``nan_safe`` = isNanSafe, ``weighted`` = weighted, ``error_from_input_variance`` =
    calcErrorFromInputVariance, ``error_mosaic_mode`` = calcErrorMosaicMode,
    ``mask_propagation_thresholds`` = maskPropagationThresholds (by plane name). Explicit
    ``weights`` are multiplicative; with ``weighted`` and no weights, ``1/variance`` (samples with
    variance <= 0 are skipped). Supplied weights with ``weighted=False`` are ignored with a
    :class:`SkystackWarning`, as the reference does.

    Differences: with ``nan_safe=False`` non-finite samples count in NPOINT and poison the plain
    moments as in the reference, but the median and quartiles are taken over the finite samples
    only (the reference sorts NaNs into its quartiles). The sums are formed in float64 in a fixed
    order of the samples, so results do not depend on the sample order; the exception is sets of
    more than 64 samples without weights, with ``nan_safe`` and the default error, whose sums run
    in sample order (vectorised): there the sample order can change the last bits of the moments
    and clipped statistics, never the counts, quantiles or masks.
    """
    stats = _as_stats(statistics)
    # DataArrays are reduced through their (numpy or dask) data; dimensions are positional
    values, mask, variance, weights = (
        a.data if isinstance(a, xr.DataArray) else a for a in (values, mask, variance, weights)
    )
    if not isinstance(config, StatsConfig):
        raise SchemaError(f"config must be a StatsConfig, got {type(config).__name__}")
    if weights is not None and not config.weighted:
        warnings.warn(
            "weights were given but config.weighted is False: the weights are ignored",
            SkystackWarning,
            stacklevel=2,
        )
        weights = None
    _check_inputs(values, mask, variance, weights, config, axis)
    plan = _Plan(config, planes, stats, weights is not None, variance is not None)
    lazy = any(_is_dask(a) for a in (values, mask, variance, weights))
    if lazy:
        import dask.array as da

        if axis is None:
            table = _whole_table(values, mask, variance, weights, plan)
        else:
            table = _axis_table(values, mask, variance, weights, plan, axis)

        vals, errs = _finish(table, stats, errors, da)
    else:
        table = _numpy_table(values, mask, variance, weights, plan, axis)
        vals, errs = _finish(table, stats, errors, np)
        vals = {k: np.asarray(v) for k, v in vals.items()}
        errs = {k: np.asarray(v) for k, v in errs.items()}
    return (vals, errs) if errors else vals


def grid_statistics(
    values: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    yedges,
    xedges,
    statistics: Iterable[Statistic | str] | Statistic | str = (Statistic.MEAN,),
    config: StatsConfig = StatsConfig(),
    planes: Mapping[str, int] | None = None,
    errors: bool = False,
):
    """Statistics of every cell of a grid laid over a 2-D numpy array (eager; a block function).

    Cell ``(i, j)`` holds ``values[yedges[i]:yedges[i+1], xedges[j]:xedges[j+1]]``; the edges are
    increasing integers inside the array. Returns what :func:`compute_statistics` returns for each
    cell's pixels (row-major), as arrays of shape ``(len(yedges) - 1, len(xedges) - 1)``. With unit
    weights, NaN-safe selection and the default error, all cells are reduced in one kernel call
    that reads the array in place (no copy per cell).
    """
    stats = _as_stats(statistics)
    if not isinstance(config, StatsConfig):
        raise SchemaError(f"config must be a StatsConfig, got {type(config).__name__}")
    x = np.asarray(values)
    if x.ndim != 2:
        raise SchemaError(f"grid_statistics needs a 2-D array, got shape {x.shape}")
    ye = np.asarray(yedges, dtype=np.int64)
    xe = np.asarray(xedges, dtype=np.int64)
    for name, e, size in (("yedges", ye, x.shape[0]), ("xedges", xe, x.shape[1])):
        if e.ndim != 1 or e.size < 2 or np.any(np.diff(e) <= 0) or e[0] < 0 or e[-1] > size:
            raise SchemaError(f"{name} {e.tolist()} are not increasing edges inside 0..{size}")
    _check_inputs(x, mask, None, None, config, None)
    m = np.zeros(x.shape, np.uint32) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    plan = _Plan(config, planes, stats, False, False)
    ncy, ncx = ye.size - 1, xe.size - 1
    if plan.unit:
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        table = np.full((ncy * ncx, K.N_COLUMNS + 1), np.nan, dtype=np.float64)
        ormask = np.zeros(ncy * ncx, dtype=np.uint32)
        K.reduce_cells(
            x, m.astype(np.uint32, copy=False), ye, xe, plan.and_mask, plan.num_sigma, plan.num_iter,
            plan.do_quantiles, plan.do_clip, plan.prop_bits, plan.prop_thr, table[:, : K.N_COLUMNS], ormask,
        )
        table[:, K.N_COLUMNS] = ormask
    else:
        rows = []
        for i in range(ncy):
            for j in range(ncx):
                xc = x[ye[i] : ye[i + 1], xe[j] : xe[j + 1]].reshape(1, -1)
                mc = m[ye[i] : ye[i + 1], xe[j] : xe[j + 1]].astype(np.uint32).reshape(1, -1)
                rows.append(plan.run(xc, mc, np.zeros(xc.shape), np.ones(xc.shape)))
        table = np.concatenate(rows)
    vals, errs = _finish(table.reshape(ncy, ncx, -1), stats, errors, np)
    return (vals, errs) if errors else vals


def _layout(values, mask, variance, weights, axis):
    """Broadcast the inputs and move ``axis`` last; returns 2-D (n_sets, k) views and the out shape."""
    x = np.asarray(values)
    shape = x.shape
    m = np.zeros((), np.uint32) if mask is None else np.asarray(mask)
    v = np.zeros((), np.float64) if variance is None else np.asarray(variance)
    w = np.ones((), np.float64) if weights is None else np.asarray(weights)
    m, v, w = (np.broadcast_to(a, shape) for a in (m, v, w))
    if axis is None:
        out_shape = ()
        arrs = [a.reshape(1, -1) for a in (x, m, v, w)]
    else:
        arrs = [np.moveaxis(a, axis, -1) for a in (x, m, v, w)]
        out_shape = arrs[0].shape[:-1]
        k = arrs[0].shape[-1]
        arrs = [a.reshape(-1, k) for a in arrs]
    return arrs, out_shape


def _numpy_table(values, mask, variance, weights, plan, axis):
    (x, m, v, w), out_shape = _layout(values, mask, variance, weights, axis)
    if m.dtype != np.uint32:
        m = m.astype(np.uint32)
    table = plan.run(x, m, v, w)
    return table.reshape(out_shape + (table.shape[-1],))


def clipped_mean(values, *, mask=None, variance=None, weights=None, axis=None, config: StatsConfig = StatsConfig()):
    """MEANCLIP of ``values`` (see :func:`compute_statistics`)."""
    return compute_statistics(
        values, mask=mask, variance=variance, weights=weights, axis=axis, statistics=Statistic.MEANCLIP, config=config
    )[Statistic.MEANCLIP]


def clipped_stdev(values, *, mask=None, variance=None, weights=None, axis=None, config: StatsConfig = StatsConfig()):
    """STDEVCLIP of ``values`` (see :func:`compute_statistics`)."""
    return compute_statistics(
        values, mask=mask, variance=variance, weights=weights, axis=axis, statistics=Statistic.STDEVCLIP, config=config
    )[Statistic.STDEVCLIP]


def median(values, *, mask=None, axis=None, config: StatsConfig = StatsConfig()):
    """MEDIAN (numpy "linear") of the selected samples of ``values``."""
    return compute_statistics(values, mask=mask, axis=axis, statistics=(Statistic.MEDIAN,), config=config)[
        Statistic.MEDIAN
    ]


def iqr_sigma(values, *, mask=None, axis=None, config: StatsConfig = StatsConfig()):
    """Gaussian-equivalent sigma from the interquartile range: ``IQR_TO_SIGMA * IQRANGE``."""
    return IQR_TO_SIGMA * compute_statistics(
        values, mask=mask, axis=axis, statistics=(Statistic.IQRANGE,), config=config
    )[Statistic.IQRANGE]


# ---------------------------------------------------------------------------------------------
# dask paths


def _dask_inputs(values, mask, variance, weights):
    """Dask versions of the given inputs, in the chunks of ``values``; missing ones stay None."""
    import dask.array as da

    x = da.asarray(values)
    out = [x]
    for a in (mask, variance, weights):
        if a is None:
            out.append(None)
            continue
        a = da.asarray(a)
        if a.shape != x.shape:
            a = da.broadcast_to(a, x.shape)
        out.append(a.rechunk(x.chunks))
    return out


_DEFAULTS = ((np.uint32, 0), (np.float64, 0.0), (np.float64, 1.0))


def _present(arrays):
    """The non-None arrays and a tuple saying which of (mask, variance, weights) they are."""
    return [arrays[0]] + [a for a in arrays[1:] if a is not None], tuple(a is not None for a in arrays[1:])


def _unpack(blocks, present):
    """``(x, m, v, w)`` blocks from the present ones, defaults broadcast to the shape of ``x``."""
    x = blocks[0]
    rest = iter(blocks[1 : 1 + sum(present)])
    out = [x]
    for flag, (dtype, fill) in zip(present, _DEFAULTS):
        out.append(next(rest) if flag else np.broadcast_to(np.array(fill, dtype=dtype), x.shape))
    return out, blocks[1 + sum(present) :]


def _axis_block(*blocks, plan, present):
    (x, m, v, w), _ = _unpack(blocks, present)
    k = x.shape[-1]
    lead = x.shape[:-1]
    two = [a.reshape(-1, k) for a in (x, m.astype(np.uint32, copy=False), v, w)]
    table = plan.run(*two)
    return table.reshape(lead + (table.shape[-1],))


def _axis_table(values, mask, variance, weights, plan, axis):
    """Chunk-wise reduction along ``axis`` (put in one chunk); the table's last axis = columns."""
    import dask.array as da

    arrs, present = _present(_dask_inputs(values, mask, variance, weights))
    arrs = [da.moveaxis(a, axis, -1) for a in arrs]
    chunks = arrs[0].chunks[:-1] + ((arrs[0].shape[-1],),)
    arrs = [a.rechunk(chunks) for a in arrs]
    ncol = K.N_COLUMNS + 1
    return da.map_blocks(
        _axis_block,
        *arrs,
        plan=plan,
        present=present,
        dtype=np.float64,
        chunks=arrs[0].chunks[:-1] + ((ncol,),),
        meta=np.empty((0,) * arrs[0].ndim, dtype=np.float64),
    )


# whole-array (axis=None) lazy reduction: exact and independent of the chunking

_QUANTILE_FRACTIONS = (0.25, 0.5, 0.75)
_N_RANKS = 2 * len(_QUANTILE_FRACTIONS)
# uint64 radix state: [n_finite, rank x6, prefix x6, residual x6]
_R_N = 0
_R_RANK = 1
_R_PREFIX = _R_RANK + _N_RANKS
_R_RESID = _R_PREFIX + _N_RANKS
_R_SIZE = _R_RESID + _N_RANKS
# float64 clip state: [N, median, iqr, mean, var, errvar, kept, failed]
_CS_SIZE = 8


def _small(fn, n_out, *arrays, dtype=np.float64, **kwargs):
    """Apply ``fn`` to small single-chunk dask arrays, giving a 1-D array of ``n_out`` values."""
    import dask.array as da

    args = []
    for i, a in enumerate(arrays):
        a = a.rechunk(-1)
        args += [a, tuple(f"a{i}d{d}" for d in range(a.ndim))]
    return da.blockwise(
        fn,
        ("out",),
        *args,
        new_axes={"out": n_out},
        dtype=dtype,
        concatenate=True,
        meta=np.empty((0,), dtype=dtype),
        **kwargs,
    )


def _per_block(fn, arrays, tail_shape, *, dtype, extra=(), **kwargs):
    """One call of ``fn`` per chunk of ``arrays[0]``: result ``(1,)*ndim + tail_shape`` per chunk."""
    import dask.array as da

    ndim = arrays[0].ndim
    inds = tuple(f"d{d}" for d in range(ndim))
    tail = tuple(f"t{d}" for d in range(len(tail_shape)))
    args = []
    for a in arrays:
        args += [a, inds]
    for i, e in enumerate(extra):
        e = e.rechunk(-1)
        args += [e, tuple(f"e{i}d{d}" for d in range(e.ndim))]
    return da.blockwise(
        fn,
        inds + tail,
        *args,
        new_axes=dict(zip(tail, tail_shape)),
        adjust_chunks={i: 1 for i in inds},
        dtype=dtype,
        concatenate=True,
        meta=np.empty((0,) * (ndim + len(tail_shape)), dtype=dtype),
        **kwargs,
    )


def _clip_bounds(state, p, plan):
    """Centre and half-width of clip pass ``p`` from the clip state (NaN when the clip failed)."""
    n, med, iqr, mean, var, _errvar, _kept, failed = (float(s) for s in state[:_CS_SIZE])
    if failed:
        return np.nan, np.nan
    centre = med if p == 0 else mean
    return centre, K.clip_width(p, n, iqr, var, plan.num_sigma, centre)


def _flat(a):
    """1-D view of ``a``; a broadcast default (all strides 0) stays a stride-0 view, not a copy."""
    if a.ndim and not any(a.strides):
        return np.lib.stride_tricks.as_strided(a, shape=(a.size,), strides=(0,), writeable=False)
    return np.ravel(a)


def _block_moments(*blocks, plan, clip_pass, present):
    (x, m, v, w), extra = _unpack(blocks, present)
    ndim = x.ndim
    flat = [_flat(a) for a in (x, m, v, w)]
    out = np.zeros(K.P_FIXED + plan.prop_bits.size, dtype=np.float64)
    centre = width = 0.0
    if clip_pass is not None:
        centre, width = _clip_bounds(extra[0], clip_pass, plan)
        if math.isnan(centre) or math.isnan(width):
            return out.reshape((1,) * ndim + out.shape)
    K.partial_moments(
        flat[0],
        flat[1].astype(np.uint32, copy=False),
        flat[2],
        flat[3],
        plan.and_mask,
        plan.nan_safe,
        plan.weight_mode,
        clip_pass is not None,
        centre,
        width,
        plan.prop_bits,
        out,
    )
    return out.reshape((1,) * ndim + out.shape)


def _merge_moments(parts, plan):
    """Combine partial-moment vectors (one row per chunk) with the parallel-variance formula."""
    parts = parts.reshape(-1, parts.shape[-1])
    n = parts[:, K.P_N].sum()
    s1 = parts[:, K.P_S1].sum()
    s2 = parts[:, K.P_S2].sum()
    used = parts[parts[:, K.P_N] > 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (used[:, K.P_S1] * used[:, K.P_MEAN]).sum() / s1 if s1 != 0 else np.nan
        m2 = (used[:, K.P_M2] + used[:, K.P_S1] * (used[:, K.P_MEAN] - mean) ** 2).sum()
        denom = s1 * s1 - s2
        var = m2 * s1 / denom if denom != 0 else np.nan
        if n == 0:
            mean = var = np.nan
        if plan.error_mode == K.ERROR_INPUT_VARIANCE:
            errvar = parts[:, K.P_SW2V].sum() / (s1 * s1) if s1 != 0 else np.nan
        elif plan.error_mode == K.ERROR_MOSAIC:
            errvar = parts[:, K.P_SWV].sum() / s1 if s1 != 0 else np.nan
        else:
            errvar = var * s2 / (s1 * s1) if s1 != 0 else np.nan
    orm = 0
    for value in used[:, K.P_ORMASK]:
        orm |= int(value)
    for b, (bit, thr) in enumerate(zip(plan.prop_bits, plan.prop_thr)):
        rej = parts[:, K.P_FIXED + b].sum()
        if s1 + rej != 0 and rej / (s1 + rej) > thr:
            orm |= int(bit)
    lo = used[:, K.P_MIN].min() if len(used) else np.nan
    hi = used[:, K.P_MAX].max() if len(used) else np.nan
    return n, parts[:, K.P_TOTAL].sum(), mean, var, errvar, parts[:, K.P_SWX].sum(), lo, hi, orm, s1


def _moments_vector(parts, *, plan):
    n, total, mean, var, errvar, swx, lo, hi, orm, s1 = _merge_moments(parts, plan)
    return np.array([n, total, mean, var, errvar, swx, lo, hi, orm, s1], dtype=np.float64)


_MV = {"n": 0, "total": 1, "mean": 2, "var": 3, "errvar": 4, "sum": 5, "min": 6, "max": 7, "ormask": 8, "s1": 9}


def _block_histogram(*blocks, plan, level, present):
    (x, m, v, _w), extra = _unpack(blocks, present)
    ndim = x.ndim
    bits = np.ascontiguousarray(x, dtype=np.float64).reshape(-1).view(np.uint64)
    rows = 1 if level == 0 else _N_RANKS
    shift, bins, high = K.radix_digit(level)
    out = np.zeros((rows, bins), dtype=np.int64)
    use_mask = present[0]
    use_variance = plan.weight_mode == K.WEIGHT_INVERSE_VARIANCE
    if use_variance and not present[1]:  # the default variance (0) excludes every sample
        return out.reshape((1,) * ndim + out.shape)
    m = np.ascontiguousarray(m).reshape(-1) if use_mask else np.zeros(1, np.uint32)
    v = np.ascontiguousarray(v).reshape(-1) if use_variance else np.ones(1, np.float64)
    prefixes = extra[0][_R_PREFIX : _R_PREFIX + _N_RANKS] if level else np.zeros(1, np.uint64)
    K.radix_histogram(bits, m, use_mask, plan.and_mask, v, use_variance, level, shift, high,
                      np.ascontiguousarray(prefixes, dtype=np.uint64), out)
    return out.reshape((1,) * ndim + out.shape)


def _radix_select(hist, *extra, level):
    """Advance the radix state by one digit per rank."""
    shift = np.uint64(K.radix_digit(level)[0])
    if level == 0:
        state = np.zeros(_R_SIZE, dtype=np.uint64)
        n = int(hist[0].sum())
        state[_R_N] = n
        for i, f in enumerate(_QUANTILE_FRACTIONS):
            t = f * (n - 1) if n else 0.0
            j = int(math.floor(t))
            state[_R_RANK + 2 * i] = j
            state[_R_RANK + 2 * i + 1] = min(j + 1, max(n - 1, 0))
        state[_R_RESID : _R_RESID + _N_RANKS] = state[_R_RANK : _R_RANK + _N_RANKS]
        rows = np.repeat(hist[:1], _N_RANKS, axis=0)
    else:
        state = extra[0].astype(np.uint64).copy()
        rows = hist
    if state[_R_N] == 0:
        return state
    for r in range(_N_RANKS):
        cum = np.cumsum(rows[r])
        resid = int(state[_R_RESID + r])
        digit = int(np.searchsorted(cum, resid, side="right"))
        before = int(cum[digit - 1]) if digit > 0 else 0
        state[_R_RESID + r] = resid - before
        state[_R_PREFIX + r] = state[_R_PREFIX + r] | (np.uint64(digit) << shift)
    return state


def _quantile_vector(state):
    """(median, q25, q75) from the final radix state, with numpy's linear interpolation."""
    n = int(state[_R_N])
    if n == 0:
        return np.full(3, np.nan)
    values = K.key_values(state[_R_PREFIX : _R_PREFIX + _N_RANKS])
    out = []
    for i, f in enumerate(_QUANTILE_FRACTIONS):
        a, b = float(values[2 * i]), float(values[2 * i + 1])
        t = f * (n - 1)
        g = t - math.floor(t)
        if n == 1 or g == 0.0:
            out.append(a)
        else:
            out.append(b - (b - a) * (1.0 - g) if g >= 0.5 else a + (b - a) * g)
    q25, med, q75 = out
    return np.array([med, q25, q75], dtype=np.float64)


def _clip_init(moments, quant):
    return np.array(
        [moments[_MV["n"]], quant[0], quant[2] - quant[1], np.nan, np.nan, np.nan, 0.0, 0.0], dtype=np.float64
    )


def _clip_step(parts, state, *, plan, clip_pass):
    state = np.array(state, dtype=np.float64)
    centre, width = _clip_bounds(state, clip_pass, plan)
    if math.isnan(centre) or math.isnan(width):
        state[3:] = [np.nan, np.nan, np.nan, 0.0, 1.0]
        return state
    n, _total, mean, var, errvar, *_ = _merge_moments(parts, plan)
    state[3:] = [mean, var, errvar, n, 0.0]
    return state


def _assemble(moments, quant, clip):
    t = np.full(K.N_COLUMNS + 1, np.nan, dtype=np.float64)
    n = moments[_MV["n"]]
    t[K.C_NPOINT] = n
    t[K.C_NMASKED] = moments[_MV["total"]] - n
    t[K.C_MEAN] = moments[_MV["mean"]]
    t[K.C_VARIANCE] = moments[_MV["var"]]
    t[K.C_MEAN_ERRVAR] = moments[_MV["errvar"]]
    t[K.C_SUM] = moments[_MV["sum"]]
    t[K.C_SUMW] = moments[_MV["s1"]]
    t[K.C_MIN] = moments[_MV["min"]]
    t[K.C_MAX] = moments[_MV["max"]]
    t[C_ORMASK] = moments[_MV["ormask"]]
    t[K.C_MEDIAN], t[K.C_Q25], t[K.C_Q75] = quant[:3]
    if clip.size and clip[7] == 0.0:
        t[K.C_MEANCLIP], t[K.C_VARCLIP], t[K.C_MEANCLIP_ERRVAR] = clip[3:6]
        t[K.C_NKEPT] = clip[6]
        t[K.C_NCLIPPED] = n - clip[6]
    elif clip.size:
        t[K.C_NKEPT] = 0.0
        t[K.C_NCLIPPED] = n
    return t


def _whole_table(values, mask, variance, weights, plan):
    """Lazy result table (1-D, one entry per column) over every sample of a dask array."""
    import dask.array as da

    arrs, present = _present(_dask_inputs(values, mask, variance, weights))
    x = arrs[0]
    nprop = plan.prop_bits.size
    parts = _per_block(
        _block_moments, arrs, (K.P_FIXED + nprop,), dtype=np.float64, plan=plan, clip_pass=None, present=present
    )
    moments = _small(_moments_vector, len(_MV), parts, plan=plan)
    if plan.do_quantiles:
        axes = tuple(range(x.ndim))
        state = None
        for level in range(K.RADIX_LEVELS):
            rows = 1 if level == 0 else _N_RANKS
            extra = () if state is None else (state,)
            hist = _per_block(
                _block_histogram,
                arrs,
                (rows, K.radix_digit(level)[1]),
                dtype=np.int64,
                extra=extra,
                plan=plan,
                level=level,
                present=present,
            ).sum(axis=axes)
            state = _small(_radix_select, _R_SIZE, hist, *extra, dtype=np.uint64, level=level)
        quant = _small(_quantile_vector, 3, state)
    else:
        quant = da.full((3,), np.nan, dtype=np.float64)
    if plan.do_clip:
        cstate = _small(_clip_init, _CS_SIZE, moments, quant)
        for p in range(plan.num_iter):
            parts_p = _per_block(
                _block_moments,
                arrs,
                (K.P_FIXED + nprop,),
                dtype=np.float64,
                extra=(cstate,),
                plan=plan,
                clip_pass=p,
                present=present,
            )
            cstate = _small(_clip_step, _CS_SIZE, parts_p, cstate, plan=plan, clip_pass=p)
    else:
        cstate = da.zeros((0,), dtype=np.float64)
    return _small(_assemble, K.N_COLUMNS + 1, moments, quant, cstate)
