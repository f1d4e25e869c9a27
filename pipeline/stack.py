"""Per-pixel stacking of aligned warps over the ``visit`` dimension.

One numba pass per chunk reduces every pixel's column of visits with MEAN, MEANCLIP or MEDIAN
(``statistics_and_masks.md`` section 3): and-mask selection, per-visit weights (or per-pixel
inverse variances), variance of the result from the input variances, the stacked mask (OR of the
surviving inputs, threshold-propagated bits, CLIPPED, the REJECTED/SENSOR_EDGE/CLIPPED mask map,
NO_DATA where nothing survives) and the count of unmasked inputs ``n_image``.

The work is a single ``blockwise`` over the (y, x) chunks that contracts the visit axis without
concatenating it: each task hands the visit blocks of its chunk, as they are, to the kernel
(``_kernels_stack.stack_planes``, a sequence of 2-D planes), so memory is bounded by one chunk
column per image, no 3-D copy is made, and the task count grows with the number of chunks only.
Planes that are not C-contiguous are copied once (chunks of in-memory images are contiguous when
they span full rows: chunk them in row bands).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import _kernels_stack as KS
from . import _kernels_stats as K
from .errors import MaskPlaneError, SchemaError, SkystackWarning
from .model.masks import add_planes, bitmask, check_same_planes, mask_attrs, planes_from_attrs
from .model.schema import data_ids, validate, with_provenance
from .model.wcs import WCS_COORD
from .stats import check_propagation_thresholds, propagation_table

__all__ = ["StackConfig", "stack", "online_mean", "stack_mask_map"]

_STATISTICS = {"MEAN": K.STACK_MEAN, "MEANCLIP": K.STACK_MEANCLIP, "MEDIAN": K.STACK_MEDIAN}
_PLANES_ADDED = ("CLIPPED", "REJECTED", "SENSOR_EDGE")


class StackConfig(BaseModel):
    """Configuration of :func:`stack` (the stacking part of the reference's AssembleCoaddConfig)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    statistic: Literal["MEAN", "MEANCLIP", "MEDIAN"] = Field(
        "MEANCLIP", description="per-pixel statistic over the visits"
    )
    num_sigma_clip: float = Field(3.0, gt=0.0, le=1e6, description="MEANCLIP half-width in sigma")
    num_iter: int = Field(2, ge=1, le=100, description="MEANCLIP passes, the first (IQR-based) one included")
    bad_mask_planes: tuple[str, ...] = Field(
        ("NO_DATA", "BAD", "SAT", "EDGE"),
        description="and-mask: inputs with any of these planes are excluded (unknown names are skipped)",
    )
    weighted: bool = Field(
        True, description="use the per-visit weights, or per-pixel 1/variance when no weights are given"
    )
    calc_error_from_input_variance: bool = Field(
        True, description="result variance sum(w^2 v)/sum(w)^2 over the used inputs (else from the scatter)"
    )
    mask_propagation_thresholds: dict[str, float] = Field(
        default_factory=lambda: {"SAT": 0.1},
        description="plane -> weight fraction of excluded inputs with that plane above which it is set",
    )
    no_good_pixels_mask: str = Field("NO_DATA", description="plane that replaces the mask where no input survives")

    @field_validator("mask_propagation_thresholds")
    @classmethod
    def _check_thresholds(cls, value):
        return check_propagation_thresholds(value)

    def __hash__(self):
        return hash(self.model_dump_json())


def stack_mask_map(and_mask: int, planes: Mapping[str, int]) -> list[tuple[int, int]]:
    """The default mask map of the coadd: (from bits, to bits) pairs.

    Bad bits other than NO_DATA/EDGE/CLIPPED -> REJECTED; EDGE -> SENSOR_EDGE; CLIPPED -> CLIPPED.
    """
    b = lambda name: bitmask(name, planes)  # noqa: E731
    rejected_from = and_mask & ~(b("NO_DATA") | b("EDGE") | b("CLIPPED"))
    return [(rejected_from, b("REJECTED")), (b("EDGE"), b("SENSOR_EDGE")), (b("CLIPPED"), b("CLIPPED"))]


class _StackPlan:
    def __init__(self, config: StackConfig, planes: Mapping[str, int], has_weights: bool):
        self.statistic = _STATISTICS[config.statistic]
        self.and_mask = bitmask(list(config.bad_mask_planes), planes, strict=False)
        self.prop_bits, self.prop_thr = propagation_table(
            {k: v for k, v in config.mask_propagation_thresholds.items() if k in planes}, planes
        )
        if not config.weighted:
            self.weight_mode = K.WEIGHT_NONE
        elif has_weights:
            self.weight_mode = K.WEIGHT_MULTIPLICATIVE
        else:
            self.weight_mode = K.WEIGHT_INVERSE_VARIANCE
        self.error_mode = K.ERROR_INPUT_VARIANCE if config.calc_error_from_input_variance else K.ERROR_DEFAULT
        self.num_sigma = float(config.num_sigma_clip)
        self.num_iter = int(config.num_iter)
        self.no_data = bitmask(config.no_good_pixels_mask, planes)
        self.clipped = bitmask("CLIPPED", planes)
        pairs = stack_mask_map(self.and_mask, planes)
        self.map_from = np.array([p[0] for p in pairs], dtype=np.uint32)
        self.map_to = np.array([p[1] for p in pairs], dtype=np.uint32)

    def __dask_tokenize__(self):
        return (
            "skystack-stack-plan",
            self.statistic,
            self.and_mask,
            self.prop_bits.tolist(),
            self.prop_thr.tolist(),
            self.weight_mode,
            self.error_mode,
            self.num_sigma,
            self.num_iter,
            self.no_data,
            self.clipped,
            self.map_from.tolist(),
            self.map_to.tolist(),
        )

    def run(self, image, variance, mask, weights):
        """Stack numpy blocks ``(K, ny, nx)``; returns (image, variance, mask, n_image)."""
        return self.run_planes(list(image), list(variance), list(mask), weights)

    def run_planes(self, images, variances, masks, weights):
        """Stack K ``(ny, nx)`` planes given as lists; returns (image, variance, mask, n_image)."""
        packed = self.run_packed(images, variances, masks, weights)
        return packed[0].view(np.float32), packed[1].view(np.float32), packed[2], packed[3].astype(np.uint16)

    def run_packed(self, images, variances, masks, weights):
        """The four outputs written straight into the planes of one ``(4, ny, nx)`` uint32 array
        (image and variance as float32 bits, mask, n_image)."""
        ny, nx = images[0].shape
        packed = np.empty((4, ny, nx), dtype=np.uint32)
        KS.stack_planes(
            _typed_planes(images),
            _typed_planes(variances),
            _typed_planes([m.astype(np.uint32, copy=False) for m in masks]),
            np.asarray(weights, dtype=np.float64),
            self.and_mask,
            self.weight_mode,
            self.error_mode,
            self.statistic,
            self.num_sigma,
            self.num_iter,
            self.prop_bits,
            self.prop_thr,
            self.no_data,
            self.clipped,
            self.map_from,
            self.map_to,
            _pairs(len(images)),
            packed[0].view(np.float32),
            packed[1].view(np.float32),
            packed[2],
            packed[3],
        )
        return packed

    def packed(self, image, variance, mask, weights):
        """Block function for dask: the four outputs packed (exactly) into one float64 array."""
        outs = self.run(image, variance, mask, weights)
        packed = np.empty((4,) + outs[0].shape, dtype=np.float64)
        for i, o in enumerate(outs):
            packed[i] = o
        return packed

    def packed_blocks(self, images, variances, masks, weights):
        """Block function for dask: lists of ``(k, ny, nx)`` blocks along ``visit`` in, the four
        outputs bit-packed into one ``(4, ny, nx)`` uint32 array out (see :func:`_unpack_bits`)."""
        return self.run_packed(
            _planes_of(images), _planes_of(variances), _planes_of(masks), np.concatenate(list(weights))
        )


def _planes_of(blocks):
    """The 2-D planes of a list of ``(k, ny, nx)`` blocks, in order, without copying."""
    return [plane for block in blocks for plane in block]


@functools.lru_cache(maxsize=8)
def _plane_list_type(dtype: np.dtype):
    from numba import from_dtype, types

    return types.Array(from_dtype(dtype), 2, "C")


def _typed_planes(planes):
    """A numba typed list of C-contiguous 2-D arrays of one dtype (planes already in that form,
    e.g. whole zarr chunks or full-width row bands of in-memory images, are not copied)."""
    from numba.typed import List

    dtype = np.dtype(np.result_type(*planes))
    out = List.empty_list(_plane_list_type(dtype))
    for p in planes:
        out.append(np.ascontiguousarray(p, dtype=dtype))
    return out


class _OnlinePlan:
    def __init__(self, config: StackConfig, planes: Mapping[str, int]):
        self.and_mask = bitmask(list(config.bad_mask_planes), planes, strict=False)
        # as in the reference, only bad bits are tracked for threshold propagation
        thresholds = {
            k: v
            for k, v in config.mask_propagation_thresholds.items()
            if k in planes and bitmask(k, planes) & self.and_mask
        }
        self.prop_bits, self.prop_thr = propagation_table(thresholds, planes)
        self.weighted = bool(config.weighted)
        self.from_input_variance = bool(config.calc_error_from_input_variance)
        self.no_data = bitmask(config.no_good_pixels_mask, planes)
        pairs = stack_mask_map(self.and_mask, planes)
        self.map_from = np.array([p[0] for p in pairs], dtype=np.uint32)
        self.map_to = np.array([p[1] for p in pairs], dtype=np.uint32)

    def __dask_tokenize__(self):
        return (
            "skystack-online-mean-plan",
            self.and_mask,
            self.prop_bits.tolist(),
            self.prop_thr.tolist(),
            self.weighted,
            self.from_input_variance,
            self.no_data,
            self.map_from.tolist(),
            self.map_to.tolist(),
        )

    def run(self, image, variance, mask, weights):
        _, ny, nx = image.shape
        outs = (
            np.empty((ny, nx), dtype=np.float32),
            np.empty((ny, nx), dtype=np.float32),
            np.empty((ny, nx), dtype=np.uint32),
            np.empty((ny, nx), dtype=np.uint16),
        )
        w = np.asarray(weights, dtype=np.float64) if self.weighted else np.ones(image.shape[0])
        K.online_mean_pixels(
            image, variance, mask.astype(np.uint32, copy=False), w, self.and_mask, self.prop_bits, self.prop_thr,
            self.map_from, self.map_to, self.no_data, self.from_input_variance, *outs,
        )
        return outs

    packed = _StackPlan.packed


@functools.lru_cache(maxsize=16)
def _pairs(nk: int) -> np.ndarray:
    return K.network_pairs(nk)


def _combine_inputs(warps) -> xr.Dataset:
    """A stack Dataset from a stack Dataset or a sequence of warp Datasets (planes must agree)."""
    if isinstance(warps, xr.Dataset):
        return warps
    if not isinstance(warps, Sequence) or not warps or not all(isinstance(w, xr.Dataset) for w in warps):
        raise SchemaError("warps must be a stack Dataset (dims visit, y, x) or a non-empty sequence of warp Datasets")
    planes = [planes_from_attrs(w["mask"].attrs) if "mask" in w else {} for w in warps]
    labels = [f"warp visit={w.attrs.get('visit', i)}" for i, w in enumerate(warps)]
    check_same_planes(*planes, what=labels)
    first = warps[0]
    for w, label in zip(warps[1:], labels[1:]):
        for axis in ("y", "x"):
            if not first.indexes[axis].equals(w.indexes[axis]):
                raise SchemaError(f"{label} does not cover the pixel grid of {labels[0]} along {axis}", ids=data_ids(w))
    visits = [w.attrs.get("visit", i) for i, w in enumerate(warps)]
    parts = []
    for w in warps:
        w = w[["image", "variance", "mask"]]
        parts.append(w.drop_vars([c for c in w.coords if c not in ("y", "x", WCS_COORD)]))
    out = xr.concat(parts, dim="visit", coords="minimal", compat="override", combine_attrs="override")
    out = out.assign_coords(visit=("visit", visits))
    out.attrs = {k: v for k, v in first.attrs.items() if k != "visit"}
    return out


def stack(
    warps: xr.Dataset | Sequence[xr.Dataset],
    *,
    weights: xr.DataArray | None = None,
    config: StackConfig = StackConfig(),
) -> xr.Dataset:
    """Stack aligned warps pixel by pixel over ``visit`` into a coadd-kind Dataset.

    ``warps`` is a stack Dataset (``image``/``variance``/``mask`` with dims ``(visit, y, x)``,
    chunked in y/x) or a sequence of warp Datasets on one pixel grid. ``weights`` is a DataArray
    over ``visit`` (matched by the ``visit`` coordinate when both have one). Returns ``image``,
    ``variance``, ``mask`` and ``n_image`` (uint16, inputs without an and-mask bit) on the grid
    of the input, with its attrs, WCS coordinate and mask planes (plus CLIPPED, REJECTED,
    SENSOR_EDGE). Lazy on dask input, eager on numpy input; independent of the chunking and of
    the order of the visits (exactly: samples are summed in a fixed order).

    Notes
    -----
    Reference: lsst/afw ``math::statisticsStack`` as called by AssembleCoaddTask's
    ``assembleSubregion`` (lsst/drp_tasks), with the mask map of ``setRejectedMaskMapping``.
    Config mapping: ``statistic`` = statistic, ``num_sigma_clip`` = sigmaClip, ``num_iter`` =
    clipIter, ``bad_mask_planes`` = badMaskPlanes (the and-mask), ``calc_error_from_input_variance``
    = calcErrorFromInputVariance, ``mask_propagation_thresholds`` = maskPropagationThresholds,
    ``weighted`` = StatisticsControl weighted (true in the coadd), ``no_good_pixels_mask`` =
    noGoodPixelsMask; the clipped bit is CLIPPED. ``n_image`` is the coadd's nImage.
    Supplied weights with ``weighted=False`` are ignored with a :class:`SkystackWarning`, as in
    the reference. The MEDIAN variance is ``pi/2 * VARIANCE / NPOINT`` (section 1.5), so it is
    NaN where a single input survives.
    """
    ds, planes, wdata = _prepare(warps, weights, config)
    plan = _StackPlan(config, planes, wdata is not None)
    return _run(plan, ds, planes, wdata, config, "stack")


def online_mean(
    warps: xr.Dataset | Sequence[xr.Dataset],
    *,
    weights: xr.DataArray | None = None,
    config: StackConfig = StackConfig(statistic="MEAN"),
) -> xr.Dataset:
    """Weighted mean of the warps by accumulation, the reference's online alternative to MEAN.

    Same inputs and output as :func:`stack` (``config.statistic`` must be MEAN). Per pixel and
    visit in order: inputs without an and-mask bit and with a finite image value add ``w``,
    ``w*I`` and ``w^2*V`` (or ``w^2`` and ``w*I^2`` when the error comes from the scatter); their
    masks are ORed. Weights are per visit (unit weights when none are given or ``weighted`` is
    false: there are no per-pixel inverse-variance weights here). Bad bits with a propagation
    threshold accumulate the weight of the inputs that carry them; the mask map applies where a
    mapped bad bit was seen on any input; NO_DATA is ORed (not replacing) where the summed
    weight is not positive, and image and variance are NaN there.

    Notes
    -----
    Reference: lsst/meas_algorithms ``AccumulatorMeanStack``, used by AssembleCoaddTask when
    ``doOnlineForMean`` is set and the statistic is MEAN; config mapping as in :func:`stack`.
    Difference: the reference tests the finiteness of the *mask* array instead of the image, so
    an unmasked NaN image value poisons its mean; here such an input is skipped, as the per-pixel
    stacker does. ``n_image`` counts inputs without an and-mask bit, as for :func:`stack`.
    """
    if isinstance(config, StackConfig) and config.statistic != "MEAN":
        raise SchemaError(f"online_mean computes a MEAN; config.statistic is {config.statistic!r}")
    ds, planes, wdata = _prepare(warps, weights, config)
    plan = _OnlinePlan(config, planes)
    return _run(plan, ds, planes, wdata, config, "online_mean")


def _prepare(warps, weights, config):
    """Validated stack Dataset in canonical visit order, output planes, per-visit weights (or None)."""
    if not isinstance(config, StackConfig):
        raise SchemaError(f"config must be a StackConfig, got {type(config).__name__}")
    ds = _combine_inputs(warps)
    ids = data_ids(ds)
    validate(ds)
    for name in ("image", "variance", "mask"):
        if ds[name].dims != ("visit", "y", "x"):
            raise SchemaError(
                f"variable {name!r} has dims {ds[name].dims}; stacking needs ('visit', 'y', 'x')", ids=ids
            )
    nvisit = ds.sizes["visit"]
    if nvisit == 0:
        raise SchemaError("there is nothing to stack: the visit dimension is empty", ids=ids)
    planes_in = planes_from_attrs(ds["mask"].attrs)
    planes = add_planes(planes_in, _PLANES_ADDED)
    if config.no_good_pixels_mask not in planes:
        raise MaskPlaneError(f"no_good_pixels_mask plane {config.no_good_pixels_mask!r} is unknown", ids=ids)

    if weights is not None and not config.weighted:
        warnings.warn(
            "weights were given but config.weighted is False: the weights are ignored", SkystackWarning, stacklevel=3
        )
        weights = None
    wdata = _weights_vector(weights, ds, ids)
    if "visit" in ds.indexes:
        # a canonical visit order makes the sums, hence the result, independent of the input order
        order = np.argsort(ds.indexes["visit"].values, kind="stable")
        if not np.array_equal(order, np.arange(nvisit)):
            ds = ds.isel(visit=order)
            if wdata is not None:
                wdata = wdata[order]
    return ds, planes, wdata


def _run(plan, ds, planes, wdata, config, task):
    """Apply ``plan`` to every (y, x) chunk with the visit axis whole; build the coadd Dataset."""
    nvisit = ds.sizes["visit"]
    if wdata is None:
        wdata = np.ones(nvisit, dtype=np.float64)
    image, variance, mask = (ds[n].data for n in ("image", "variance", "mask"))
    lazy = any(hasattr(a, "dask") for a in (image, variance, mask)) or hasattr(wdata, "dask")
    if lazy:
        import dask.array as da

        arrs = [da.asarray(a) for a in (image, variance, mask)]
        w = da.asarray(wdata).astype(np.float64)
        if isinstance(plan, _StackPlan):
            # visit contracted without concatenation: each task gets the lists of its visit
            # blocks as they are (no copy into one 3-D block) and returns 4 bit-packed planes
            packed = da.blockwise(
                plan.packed_blocks,
                "pyx",
                arrs[0],
                "vyx",
                arrs[1],
                "vyx",
                arrs[2],
                "vyx",
                w,
                "v",
                new_axes={"p": 4},
                concatenate=False,
                dtype=np.uint32,
                meta=np.empty((0, 0, 0), dtype=np.uint32),
            )
            # the packed axis is one chunk: contracted without concatenation (no copy of the block)
            outs = tuple(
                da.blockwise(
                    _unpack_bits, "yx", packed, "pyx", concatenate=False, index=i, out_dtype=dt, dtype=dt,
                    meta=np.empty((0, 0), dt),
                )
                for i, dt in enumerate((np.float32, np.float32, np.uint32, np.uint16))
            )
        else:
            chunks = ((nvisit,),) + arrs[0].chunks[1:]
            arrs = [a.rechunk(chunks) for a in arrs]
            w = w.rechunk(-1)
            # the visit axis is one chunk, so it can index the output too: each block function then
            # sees its input blocks as they are and returns 4 output planes
            packed = da.blockwise(
                plan.packed,
                "vyx",
                arrs[0],
                "vyx",
                arrs[1],
                "vyx",
                arrs[2],
                "vyx",
                w,
                "v",
                adjust_chunks={"v": 4},
                dtype=np.float64,
                meta=np.empty((0, 0, 0), dtype=np.float64),
            )
            outs = tuple(
                packed.map_blocks(_unpack, index=i, out_dtype=dt, drop_axis=0, dtype=dt, meta=np.empty((0, 0), dt))
                for i, dt in enumerate((np.float32, np.float32, np.uint32, np.uint16))
            )
    else:
        outs = plan.run(np.asarray(image), np.asarray(variance), np.asarray(mask), np.asarray(wdata))

    grid = {"grid_mapping": WCS_COORD}
    coords = {"y": ds["y"], "x": ds["x"]}
    if WCS_COORD in ds.coords:
        coords[WCS_COORD] = ds.coords[WCS_COORD]
    out = xr.Dataset(
        {
            "image": (("y", "x"), outs[0], dict(grid)),
            "variance": (("y", "x"), outs[1], dict(grid)),
            "mask": (("y", "x"), outs[2], {**grid, **mask_attrs(planes)}),
            "n_image": (("y", "x"), outs[3], {"long_name": "number of inputs without an and-mask bit"}),
        },
        coords=coords,
    )
    out.attrs = {k: v for k, v in ds.attrs.items() if k not in ("visit", "detector", "provenance")}
    if "provenance" in ds.attrs:
        out.attrs["provenance"] = ds.attrs["provenance"]
    out.attrs["kind"] = "coadd"
    return with_provenance(out, task, config)




def _unpack(block, *, index, out_dtype):
    return block[index].astype(out_dtype)


def _unpack_bits(blocks, *, index, out_dtype):
    """Plane ``index`` of the (single) block of :meth:`_StackPlan.packed_blocks` as ``out_dtype``
    (a view when the item sizes agree)."""
    (block,) = blocks
    plane = block[index]
    if np.dtype(out_dtype).itemsize == plane.dtype.itemsize:
        return plane.view(out_dtype)
    return plane.astype(out_dtype)


def _weights_vector(weights, ds: xr.Dataset, ids):
    """The per-visit weights as a 1-D (numpy or dask) array in the order of ``ds.visit``."""
    if "visit" in ds.indexes and not ds.indexes["visit"].is_unique:
        dup = ds.indexes["visit"][ds.indexes["visit"].duplicated()].tolist()
        raise SchemaError(f"visits {dup} appear more than once in the stack", ids=ids)
    if weights is None:
        return None
    if not isinstance(weights, xr.DataArray):
        raise SchemaError(f"weights must be an xarray.DataArray over 'visit', got {type(weights).__name__}", ids=ids)
    if weights.dims != ("visit",):
        raise SchemaError(f"weights have dims {weights.dims}; expected ('visit',)", ids=ids)
    if "visit" in weights.indexes and "visit" in ds.indexes:
        missing = [v for v in ds.indexes["visit"] if v not in weights.indexes["visit"]]
        if missing:
            raise SchemaError(f"no weight for visits {missing}", ids=ids)
        weights = weights.sel(visit=ds.indexes["visit"])
    elif weights.sizes["visit"] != ds.sizes["visit"]:
        raise SchemaError(f"{weights.sizes['visit']} weights for {ds.sizes['visit']} visits", ids=ids)
    if not np.issubdtype(weights.dtype, np.number):
        raise SchemaError(f"weights must be numbers, got dtype {weights.dtype}", ids=ids)
    return weights.data
