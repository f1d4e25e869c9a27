"""Warping exposures onto a destination pixel grid (a tract, a patch): lazy Lanczos resampling.

Two steps, as xESMF does for regridding: :func:`plan_warp` evaluates the destination -> source
pixel mapping from the two WCSs (metadata only, no pixel is read) and decides which destination
chunks the exposure touches and which source window each of them needs; :func:`warp_exposure`
applies a plan to the image, variance, mask and PSF of the exposure. The dask graph is driven by
output blocks: a covered destination chunk depends only on the source chunks under its window, an
uncovered one is a no-data fill task with no dependency at all.

Departures from the reference (each documented where it happens): NaN/NO_DATA source pixels do not
poison neighbours outside their bilinear footprint; Lanczos taps are corrected to zero first moment
(``reproduce_linear``, off = reference numerics); every warp records the
``variance_correlation_factor`` its kernel implies; the interpolation lattice is anchored in the
destination frame, so a pixel's value does not depend on the box or chunking it is computed in.
"""

from __future__ import annotations

import functools
import math
import operator
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.wcs import WCS
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from . import _kernels_warp as _k
from .errors import DataQualityError, MaskPlaneError, SchemaError
from .model.geometry import Box
from .model.masks import bitmask
from .model.schema import (
    NJY_ZERO_POINT,
    PSF_DIMS,
    data_ids,
    make_dataset,
    mask_planes,
    njy_per_unit,
    validate,
    with_provenance,
)
from .model.wcs import check_celestial, has_wcs, wcs_header_string

__all__ = [
    "WarpConfig",
    "WarpPlan",
    "plan_warp",
    "replan",
    "warp_exposure",
    "warp_psf",
    "kernel_order",
    "MAX_TRANSFORM_COEFFICIENT",
]

#: WarpedPsf refuses affine transforms with a coefficient above this (the reference's limit)
MAX_TRANSFORM_COEFFICIENT = 200.0

_ORDERS = {"bilinear": 1, "lanczos3": 3, "lanczos4": 4, "lanczos5": 5}


class WarpConfig(BaseModel):
    """Configuration of :func:`warp_exposure` (the reference's ``WarperConfig``, cacheSize 0)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kernel: Literal["lanczos3", "lanczos4", "lanczos5", "bilinear"] = Field(
        "lanczos3", description="resampling kernel of image and variance (warpingKernelName)"
    )
    mask_kernel: Literal["bilinear", "same"] = Field(
        "bilinear",
        description="footprint over which mask bits other than grow_full_mask spread "
        "(maskWarpingKernelName; 'same' = the image kernel)",
    )
    reproduce_linear: bool = Field(
        True,
        description="correct the Lanczos taps to zero first moment so linear gradients and source centroids are "
        "reproduced exactly (False = the reference's plain Lanczos, which shifts centroids by up to 0.02 px)",
    )
    kernel_table_size: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="sub-pixel phases at which the Lanczos weights are tabulated and linearly interpolated "
        "(the reference's cacheSize); 0 = exact evaluation at every pixel, as MakeDirectWarpTask",
    )
    lanczos_products: bool = Field(
        True,
        description="evaluate the exact Lanczos weights of each pixel scaled by the product of its squared tap "
        "offsets, which needs no division (equal normalised weights to 2e-15 relative, about half the cost); "
        "False = the quotient form sin(pi t/n)/t^2",
    )
    interp_length: int = Field(
        10, ge=1, le=1000, description="destination pixels between exact evaluations of the mapping (interpLength)"
    )
    grow_full_mask: tuple[str, ...] = Field(
        ("EDGE",), max_length=32, description="mask planes spread by the full image-kernel footprint (growFullMask)"
    )
    psf_spacing: int = Field(
        200, ge=4, le=1_000_000, description="approximate spacing, in destination pixels, of the warped PSF grid"
    )
    correlation_window: int = Field(
        64,
        ge=8,
        le=1024,
        description="side of the destination window on which the variance correlation factor is computed",
    )


def kernel_order(name: str) -> int:
    """Kernel order ``n``: taps at offsets ``-(n-1) .. n`` (bilinear: 1)."""
    return _ORDERS[name]


@dataclass(frozen=True, eq=False)
class WarpPlan:
    """Everything a warp needs besides pixels: computed once per (exposure, destination frame).

    ``nodes_x``/``nodes_y`` hold the exact source position of the destination lattice nodes
    ``(lattice_x0 + l*step, lattice_y0 + k*step)``; ``windows`` maps the ``(by, bx)`` index of each
    covered destination chunk to the source window (a :class:`Box` in the source parent frame)
    that its pixels read. ``n_good_pixels`` counts destination pixels whose kernel lies inside the
    source bbox (before NaN/NO_DATA source pixels are considered); ``good_box`` is the bounding box
    of those pixels (None for an empty plan); ``chunk_size`` the ``(y, x)`` chunk size the chunk edges
    are multiples of.
    """

    src_box: Box
    dst_box: Box
    src_wcs: str
    dst_wcs: str
    config: WarpConfig
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    lattice_x0: int
    lattice_y0: int
    step: int
    nodes_x: np.ndarray = field(repr=False)
    nodes_y: np.ndarray = field(repr=False)
    windows: Mapping[tuple[int, int], Box] = field(repr=False)
    block_counts: Mapping[tuple[int, int], int] = field(repr=False)
    n_good_pixels: int = 0
    variance_correlation_factor: float = 1.0
    ids: Mapping[str, Any] = field(default_factory=dict)
    good_box: Box | None = None
    chunk_size: tuple[int, int] | None = None

    @property
    def empty(self) -> bool:
        """True when the exposure touches no destination pixel."""
        return not self.windows

    @property
    def numblocks(self) -> tuple[int, int]:
        return (len(self.chunks[0]), len(self.chunks[1]))

    @property
    def covered_blocks(self) -> list[tuple[int, int]]:
        return sorted(self.windows)

    @property
    def valid(self) -> tuple[int, int, int, int]:
        """Inclusive limits ``(ix_lo, iy_lo, ix_hi, iy_hi)`` of good source ``floor`` positions."""
        return _valid_range(self.src_box, kernel_order(self.config.kernel))

    def block_box(self, by: int, bx: int) -> Box:
        """The destination box of chunk ``(by, bx)``."""
        ye = np.cumsum((self.dst_box.y0,) + self.chunks[0])
        xe = np.cumsum((self.dst_box.x0,) + self.chunks[1])
        return Box(int(xe[bx]), int(ye[by]), int(xe[bx + 1]), int(ye[by + 1]))

    def sub_lattice(self, box: Box) -> tuple[int, int, np.ndarray, np.ndarray]:
        """``(x0, y0, nodes_x, nodes_y)`` of the lattice nodes needed by destination ``box``."""
        lx0, lx1 = _node_range(box.x0 - 1, box.x1 - 1, self.lattice_x0, self.step, self.nodes_x.shape[1])
        ly0, ly1 = _node_range(box.y0 - 1, box.y1 - 1, self.lattice_y0, self.step, self.nodes_x.shape[0])
        sl = (slice(ly0, ly1 + 1), slice(lx0, lx1 + 1))
        return (
            self.lattice_x0 + lx0 * self.step,
            self.lattice_y0 + ly0 * self.step,
            np.ascontiguousarray(self.nodes_x[sl]),
            np.ascontiguousarray(self.nodes_y[sl]),
        )

    def source_positions(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Interpolated source positions of integer destination pixels ``(x, y)`` (NaN off the plan)."""
        xs = np.ascontiguousarray(np.broadcast_to(np.asarray(x, dtype=np.int64), np.broadcast(x, y).shape)).ravel()
        ys = np.ascontiguousarray(np.broadcast_to(np.asarray(y, dtype=np.int64), np.broadcast(x, y).shape)).ravel()
        ox = np.full(xs.size, np.nan)
        oy = np.full(xs.size, np.nan)
        if self.nodes_x.size:
            _k.interp_positions(self.lattice_x0, self.lattice_y0, self.step, self.nodes_x, self.nodes_y, xs, ys, ox, oy)
        shape = np.broadcast(x, y).shape
        return ox.reshape(shape), oy.reshape(shape)


def _node_range(lo: int, hi: int, origin: int, step: int, n: int) -> tuple[int, int]:
    """Inclusive lattice index range whose nodes bracket destination pixels ``lo .. hi``."""
    a = max(0, (lo - origin) // step)
    b = min(n - 1, -((origin - hi) // step))
    if b <= a:
        if b < n - 1:
            b = a + 1
        else:
            a = max(0, b - 1)
    return a, b


def _valid_range(src: Box, n: int) -> tuple[int, int, int, int]:
    return (src.x0 + n - 1, src.y0 + n - 1, src.x1 - 1 - n, src.y1 - 1 - n)


def _normalise_chunks(chunks, ids) -> tuple[int, int]:
    if isinstance(chunks, (int, np.integer)):
        chunks = (int(chunks), int(chunks))
    try:
        cy, cx = (int(c) for c in chunks)
    except (TypeError, ValueError):
        raise SchemaError(f"chunks must be an int or a (y, x) pair of ints, got {chunks!r}", ids=ids) from None
    if cy < 1 or cx < 1:
        raise SchemaError(f"chunk sizes must be positive, got {(cy, cx)}", ids=ids)
    return cy, cx


def _edges(lo: int, hi: int, size: int) -> np.ndarray:
    """Chunk edges of ``[lo, hi)`` at multiples of ``size`` in the parent frame."""
    inner = np.arange((lo // size + 1) * size, hi, size, dtype=np.int64)
    return np.concatenate([[lo], inner, [hi]]).astype(np.int64)


def _has_distortion(w: WCS) -> bool:
    return any(d is not None for d in (w.sip, w.cpdis1, w.cpdis2, w.det2im1, w.det2im2))


def _map_pixels(from_wcs: WCS, to_wcs: WCS, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Exact pixel -> sky -> pixel transform (0-based parent pixels); NaN where it fails."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ra, dec = from_wcs.all_pix2world(x, y, 0)
        if _has_distortion(to_wcs):
            ox, oy = to_wcs.all_world2pix(ra, dec, 0, quiet=True)
        else:
            ox, oy = to_wcs.wcs_world2pix(ra, dec, 0)
    ox = np.asarray(ox, dtype=np.float64)
    oy = np.asarray(oy, dtype=np.float64)
    bad = ~(np.isfinite(ox) & np.isfinite(oy))
    ox[bad] = np.nan
    oy[bad] = np.nan
    return ox, oy


def _dst_wcs(wcs, ids) -> tuple[WCS, str]:
    try:
        header = _canonical_header(wcs) if isinstance(wcs, str) else wcs_header_string(wcs)
    except Exception as exc:  # astropy raises many kinds on malformed headers
        raise SchemaError(f"destination WCS cannot be read: {' '.join(str(exc).split())}", ids=ids) from None
    reason = _celestial_reason(header, "destination WCS")
    if reason is not None:
        raise SchemaError(reason, ids=ids)
    return _cached_wcs(header), header


def _wcs_from_string(header: str) -> WCS:
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(fits.Header.fromstring(header), relax=True)


#: WCS objects kept per thread (astropy WCS objects must not be shared between threads)
_WCS_PER_THREAD = 8
_thread_state = threading.local()
_CACHE_EPOCH = [0]  # raised by clear_caches: every thread's WCS objects are dropped at its next use


def _cached_wcs(header: str) -> WCS:
    """This thread's WCS of a header string, built on its first use in the thread.

    Parsing a header and building a WCS costs about a millisecond; a warp needs the same two WCSs
    many times (plan, replan, the check of the plan, the PSF, the result's coordinate), and the
    destination WCS is the same for every exposure warped onto a tract. The objects are only read
    (pixel <-> sky transforms, header output); each thread holds its own, the last
    ``_WCS_PER_THREAD`` headers it used.
    """
    cache = getattr(_thread_state, "wcs", None)
    if cache is None or _thread_state.epoch != _CACHE_EPOCH[0]:
        cache = _thread_state.wcs = OrderedDict()
        _thread_state.epoch = _CACHE_EPOCH[0]
    w = cache.get(header)
    if w is None:
        w = cache[header] = _wcs_from_string(header)
        while len(cache) > _WCS_PER_THREAD:
            cache.popitem(last=False)
    else:
        cache.move_to_end(header)
    return w


@functools.lru_cache(maxsize=64)
def _canonical_header(header: str) -> str:
    """:func:`wcs_header_string` of a header string (a pure function of the string, so memoised)."""
    return wcs_header_string(header)


@functools.lru_cache(maxsize=64)
def _celestial_reason(header: str, what: str) -> str | None:
    """Why the WCS of ``header`` fails :func:`check_celestial` (None when it passes), memoised per header."""
    try:
        check_celestial(_wcs_from_string(header), what=what)
    except SchemaError as exc:
        return exc.reason
    return None


def clear_caches() -> None:
    """Forget what warps keep between calls: every thread's WCS objects and the memoised header checks.

    Results never depend on these caches; a benchmark clears them so that each timed call pays for
    its WCS set-up as the first warp of a visit does.
    """
    _CACHE_EPOCH[0] += 1
    _canonical_header.cache_clear()
    _celestial_reason.cache_clear()


def _validated_header(exposure: xr.Dataset, ids) -> str:
    """:func:`validate` the exposure, its WCS checked once per header string; its stored header string."""
    validate(exposure, check_wcs=False)
    if not has_wcs(exposure):
        raise SchemaError("the 'wcs' coordinate (FITS header string) is missing", ids=ids)
    raw = exposure.coords["wcs"].attrs["fits_header"]
    reason = _celestial_reason(raw, "WCS")
    if reason is not None:
        raise SchemaError(reason, ids=ids)
    if exposure["image"].ndim != 2:
        raise SchemaError(f"warp_exposure takes one exposure, got dims {exposure['image'].dims}", ids=ids)
    return raw


def _source_wcs(exposure: xr.Dataset, ids) -> tuple[WCS, str]:
    """The exposure's WCS and canonical header string (after :func:`_validated_header`)."""
    raw = _validated_header(exposure, ids)
    # positions are mapped with the WCS of the stored header itself (its canonical form rounds the values)
    return _cached_wcs(raw), _canonical_header(raw)


def _footprint(src_wcs: WCS, dst_wcs: WCS, src: Box) -> tuple[float, float, float, float] | None:
    """Destination bbox ``(xmin, ymin, xmax, ymax)`` of the source bbox outline (None if off-sky)."""
    xa, xb = src.x0 - 0.5, src.x1 - 0.5
    ya, yb = src.y0 - 0.5, src.y1 - 0.5
    nx = int(min(2000, max(9, math.ceil(src.width / 16) + 1)))
    ny = int(min(2000, max(9, math.ceil(src.height / 16) + 1)))
    tx = np.linspace(xa, xb, nx)
    ty = np.linspace(ya, yb, ny)
    px = np.concatenate([tx, tx, np.full(ny, xa), np.full(ny, xb)])
    py = np.concatenate([np.full(nx, ya), np.full(nx, yb), ty, ty])
    dx, dy = _map_pixels(src_wcs, dst_wcs, px, py)
    ok = np.isfinite(dx) & np.isfinite(dy)
    if not ok.any():
        return None
    return float(dx[ok].min()), float(dy[ok].min()), float(dx[ok].max()), float(dy[ok].max())


def plan_warp(
    exposure: xr.Dataset,
    *,
    wcs,
    box: Box,
    chunks: int | tuple[int, int] = (1000, 1000),
    config: WarpConfig = WarpConfig(),
) -> WarpPlan:
    """Plan the warp of ``exposure`` onto ``box`` of the pixel frame of ``wcs`` (eager, metadata only).

    The destination -> source pixel mapping (destination WCS to sky to exposure WCS) is evaluated
    exactly on a lattice of destination pixels ``-1 + k*interp_length`` (rows likewise) restricted
    to the exposure's footprint, and interpolated bilinearly in between (the reference's
    ``interpLength``; the reference starts its lattice at ``box.x0 - 1``, we anchor it in the
    destination frame so that the warp of a pixel does not depend on the box it is part of). Destination chunks have edges at multiples of ``chunks`` in the
    destination parent frame (so they align with a store chunked the same way), clipped to
    ``box``. For every chunk holding at least one good pixel the plan records the source window
    its kernel taps read.

    Raises :class:`SchemaError` (with the exposure's ids) for a malformed exposure, a
    non-celestial or singular WCS, an empty box or bad chunk sizes. An exposure that does not
    overlap ``box`` gives an empty plan, not an error.

    Notes
    -----
    LSST: the position bookkeeping of ``lsst.afw.math.warpImage`` (``interpLength`` ->
    ``interp_length``; the returned number of good pixels -> ``n_good_pixels``), done once per
    exposure and destination instead of once per image plane.
    """
    ids = data_ids(exposure)
    src_wcs, src_header = _source_wcs(exposure, ids)
    dst_wcs, dst_header = _dst_wcs(wcs, ids)
    if not isinstance(box, Box) or box.empty:
        raise SchemaError(f"destination box must be a non-empty Box, got {box!r}", ids=ids)
    cy, cx = _normalise_chunks(chunks, ids)
    y_edges = _edges(box.y0, box.y1, cy)
    x_edges = _edges(box.x0, box.x1, cx)
    chunk_tuple = (tuple(int(v) for v in np.diff(y_edges)), tuple(int(v) for v in np.diff(x_edges)))
    src = Box.of(exposure)
    n = kernel_order(config.kernel)
    bilinear = config.kernel == "bilinear"
    valid = _valid_range(src, n)
    step = config.interp_length
    # lattice anchored in the destination parent frame (nodes at -1 + k*step), not at the box:
    # a warp onto a sub-box equals the same pixels of a warp onto a larger box, bit for bit
    gx, gy = (box.x0 // step) * step - 1, (box.y0 // step) * step - 1
    kx_total = -(-(box.x1 - 1 - gx) // step) + 1
    ky_total = -(-(box.y1 - 1 - gy) // step) + 1

    def empty_plan():
        return WarpPlan(
            src_box=src, dst_box=box, src_wcs=src_header, dst_wcs=dst_header, config=config, chunks=chunk_tuple,
            lattice_x0=gx, lattice_y0=gy, step=step, nodes_x=np.zeros((0, 0)), nodes_y=np.zeros((0, 0)),
            windows={}, block_counts={}, n_good_pixels=0, variance_correlation_factor=1.0, ids=ids,
            chunk_size=(cy, cx),
        )

    if valid[0] > valid[2] or valid[1] > valid[3]:
        return empty_plan()  # source smaller than the kernel: all pad
    fp = _footprint(src_wcs, dst_wcs, src)
    if fp is None:
        return empty_plan()
    margin = step + 2
    lo_x, lo_y = math.floor(fp[0]) - margin, math.floor(fp[1]) - margin
    hi_x, hi_y = math.ceil(fp[2]) + margin, math.ceil(fp[3]) + margin
    if hi_x < box.x0 or hi_y < box.y0 or lo_x >= box.x1 or lo_y >= box.y1:
        return empty_plan()
    kx0, kx1 = _node_range(max(lo_x, gx), min(hi_x, box.x1 - 1), gx, step, kx_total)
    ky0, ky1 = _node_range(max(lo_y, gy), min(hi_y, box.y1 - 1), gy, step, ky_total)
    lx0, ly0 = gx + kx0 * step, gy + ky0 * step
    node_x = lx0 + step * np.arange(kx1 - kx0 + 1, dtype=np.float64)
    node_y = ly0 + step * np.arange(ky1 - ky0 + 1, dtype=np.float64)
    mx, my = np.meshgrid(node_x, node_y)
    nodes_x, nodes_y = _map_pixels(dst_wcs, src_wcs, mx, my)
    nodes_x = np.ascontiguousarray(nodes_x)
    nodes_y = np.ascontiguousarray(nodes_y)

    windows, block_counts, n_good, dst_range = _count(nodes_x, nodes_y, lx0, ly0, step, y_edges, x_edges, valid, n,
                                                      src)
    if n_good == 0:
        return empty_plan()
    factor = _correlation_factor(nodes_x, nodes_y, lx0, ly0, step, dst_range, valid, n, bilinear,
                                 config.reproduce_linear, config.correlation_window)
    good_box = Box(int(dst_range[0]), int(dst_range[1]), int(dst_range[2]) + 1, int(dst_range[3]) + 1)
    return WarpPlan(
        src_box=src, dst_box=box, src_wcs=src_header, dst_wcs=dst_header, config=config, chunks=chunk_tuple,
        lattice_x0=lx0, lattice_y0=ly0, step=step, nodes_x=nodes_x, nodes_y=nodes_y, windows=windows,
        block_counts=block_counts, n_good_pixels=n_good, variance_correlation_factor=factor, ids=ids,
        good_box=good_box, chunk_size=(cy, cx),
    )


def replan(plan: WarpPlan, *, box: Box, chunks: int | tuple[int, int] = (1000, 1000)) -> WarpPlan:
    """The plan of the same exposure onto another ``box`` (and chunking) of the same destination frame.

    Reuses what :func:`plan_warp` evaluated from the WCSs (the lattice of exact source positions,
    the variance correlation factor); only the destination chunks and their source windows are
    recounted. ``box`` must lie inside the plan's box (the lattice covers nothing else); the result
    equals ``plan_warp(exposure, wcs=..., box=box, chunks=chunks, config=plan.config)`` whenever
    ``box`` holds every good pixel of ``plan`` (its ``good_box``), e.g. a chunk-aligned window around
    it. When the chunk size is the plan's and ``box`` holds its ``good_box`` (the usual cut of a plan
    to its footprint), the chunk counts and windows are the plan's, renumbered, without a recount.
    Raises :class:`SchemaError` for a box outside the plan's or bad chunk sizes.
    """
    ids = plan.ids
    if not isinstance(box, Box) or box.empty or box.intersect(plan.dst_box) != box:
        raise SchemaError(f"replan needs a non-empty box inside the plan's box {plan.dst_box}, got {box!r}", ids=ids)
    cy, cx = _normalise_chunks(chunks, ids)
    y_edges = _edges(box.y0, box.y1, cy)
    x_edges = _edges(box.x0, box.x1, cx)
    chunk_tuple = (tuple(int(v) for v in np.diff(y_edges)), tuple(int(v) for v in np.diff(x_edges)))
    base = dict(src_box=plan.src_box, dst_box=box, src_wcs=plan.src_wcs, dst_wcs=plan.dst_wcs, config=plan.config,
                chunks=chunk_tuple, lattice_x0=plan.lattice_x0, lattice_y0=plan.lattice_y0, step=plan.step, ids=ids,
                chunk_size=(cy, cx))
    if plan.empty or plan.good_box is None or plan.good_box.intersect(box).empty:
        return WarpPlan(**base, nodes_x=np.zeros((0, 0)), nodes_y=np.zeros((0, 0)), windows={}, block_counts={},
                        n_good_pixels=0, variance_correlation_factor=1.0)
    if plan.chunk_size == (cy, cx) and plan.good_box.intersect(box) == plan.good_box:
        # same chunk edges and every good pixel inside the box: each new chunk is an old chunk cut by the
        # box and holds all of its good pixels, so counts and windows carry over (only renumbered)
        oy = int(np.searchsorted(_edges(plan.dst_box.y0, plan.dst_box.y1, cy), box.y0, side="right") - 1)
        ox = int(np.searchsorted(_edges(plan.dst_box.x0, plan.dst_box.x1, cx), box.x0, side="right") - 1)
        return WarpPlan(**base, nodes_x=plan.nodes_x, nodes_y=plan.nodes_y,
                        windows={(by - oy, bx - ox): w for (by, bx), w in plan.windows.items()},
                        block_counts={(by - oy, bx - ox): c for (by, bx), c in plan.block_counts.items()},
                        n_good_pixels=plan.n_good_pixels, variance_correlation_factor=plan.variance_correlation_factor,
                        good_box=plan.good_box)
    n = kernel_order(plan.config.kernel)
    windows, block_counts, n_good, dst_range = _count(plan.nodes_x, plan.nodes_y, plan.lattice_x0, plan.lattice_y0,
                                                      plan.step, y_edges, x_edges, plan.valid, n, plan.src_box)
    good_box = Box(int(dst_range[0]), int(dst_range[1]), int(dst_range[2]) + 1, int(dst_range[3]) + 1)
    if good_box == plan.good_box:
        factor = plan.variance_correlation_factor
    else:
        factor = _correlation_factor(plan.nodes_x, plan.nodes_y, plan.lattice_x0, plan.lattice_y0, plan.step, dst_range,
                                     plan.valid, n, plan.config.kernel == "bilinear", plan.config.reproduce_linear,
                                     plan.config.correlation_window)
    return WarpPlan(**base, nodes_x=plan.nodes_x, nodes_y=plan.nodes_y, windows=windows, block_counts=block_counts,
                    n_good_pixels=n_good, variance_correlation_factor=factor, good_box=good_box)


def _count(nodes_x, nodes_y, lx0, ly0, step, y_edges, x_edges, valid, n, src):
    """Good pixels per destination chunk and the source window each reads (see :func:`plan_warp`)."""
    nby, nbx = len(y_edges) - 1, len(x_edges) - 1
    counts = np.zeros((nby, nbx), dtype=np.int64)
    ranges = np.zeros((nby, nbx, 4), dtype=np.int64)
    dst_range = np.zeros(4, dtype=np.int64)
    _k.count_blocks(nodes_x, nodes_y, lx0, ly0, step, y_edges, x_edges, np.array(valid, dtype=np.int64),
                    counts, ranges, dst_range)
    windows: dict[tuple[int, int], Box] = {}
    block_counts: dict[tuple[int, int], int] = {}
    for by, bx in zip(*np.nonzero(counts)):
        imin, jmin, imax, jmax = (int(v) for v in ranges[by, bx])
        windows[(int(by), int(bx))] = Box(imin - (n - 1), jmin - (n - 1), imax + n + 1, jmax + n + 1).intersect(src)
        block_counts[(int(by), int(bx))] = int(counts[by, bx])
    return windows, block_counts, int(counts.sum()), dst_range


def _correlation_factor(nodes_x, nodes_y, lx0, ly0, step, dst_range, valid, n, bilinear, linear, window) -> float:
    """Variance correlation factor of the warp (see :func:`warp_exposure`), on a central window."""
    xmin, ymin, xmax, ymax = (int(v) for v in dst_range)
    X0 = max(xmin, (xmin + xmax) // 2 - window // 2)
    Y0 = max(ymin, (ymin + ymax) // 2 - window // 2)
    X1 = min(xmax + 1, X0 + window)
    Y1 = min(ymax + 1, Y0 + window)
    xs = np.arange(X0 - 1, X1 + 1)
    ys = np.arange(Y0 - 1, Y1 + 1)
    bx = np.concatenate([xs, xs, np.full(ys.size, X0 - 1), np.full(ys.size, X1)])
    byy = np.concatenate([np.full(xs.size, Y0 - 1), np.full(xs.size, Y1), ys, ys])
    # the window's source extent: positions of its pixels and of a one-pixel frame around it
    gx_, gy_ = np.meshgrid(np.arange(X0, X1), np.arange(Y0, Y1))
    allx = np.concatenate([bx, gx_.ravel()]).astype(np.int64)
    ally = np.concatenate([byy, gy_.ravel()]).astype(np.int64)
    px = np.full(allx.size, np.nan)
    py = np.full(allx.size, np.nan)
    _k.interp_positions(lx0, ly0, step, nodes_x, nodes_y, allx, ally, px, py)
    ok = np.isfinite(px) & np.isfinite(py)
    if not ok.any():
        return 1.0
    qx0 = int(math.floor(px[ok].min())) - n - 1
    qy0 = int(math.floor(py[ok].min())) - n - 1
    qx1 = int(math.floor(px[ok].max())) + n + 2
    qy1 = int(math.floor(py[ok].max())) + n + 2
    cmap = np.zeros((qy1 - qy0, qx1 - qx0))
    hits = np.zeros((qy1 - qy0, qx1 - qx0), dtype=np.int64)
    cnt, sum_a, sum_a2g = _k.correlation_sums(
        nodes_x, nodes_y, lx0, ly0, step, X0, Y0, X1 - X0, Y1 - Y0, np.array(valid, dtype=np.int64), n, bilinear,
        linear, qx0, qy0, cmap, hits,
    )
    if cnt == 0 or sum_a2g <= 0:
        return 1.0
    base = sum_a / sum_a2g
    size = 2 * (2 * n + 1) + 1
    interior = ndimage.binary_erosion(hits > 0, structure=np.ones((size, size), bool), border_value=0)
    if interior.sum() < 16:
        return float(base)
    c = cmap[interior]
    return float(base * np.mean(c * c) / np.mean(c))


# --------------------------------------------------------------------------------------------
# pixels


#: largest window (elements) copied into a reused per-thread buffer; larger ones get their own array
_SCRATCH_MAX = 1 << 21


def _scratch(slot: str, shape: tuple[int, int], dtype) -> np.ndarray:
    """A C-contiguous ``shape`` array of this thread's buffer ``slot`` (a fresh array above ``_SCRATCH_MAX``).

    The source windows of a block live only while the block is warped, and a thread warps one block
    at a time, so each thread reuses one buffer per plane: copying into memory already touched costs
    a quarter of copying into a new allocation (whose pages the system must first provide).
    """
    n = shape[0] * shape[1]
    if n > _SCRATCH_MAX:
        return np.empty(shape, dtype)
    bufs = getattr(_thread_state, "scratch", None)
    if bufs is None:
        bufs = _thread_state.scratch = {}
    key = (slot, np.dtype(dtype).str)
    buf = bufs.get(key)
    if buf is None or buf.size < n:
        buf = bufs[key] = np.empty(min(_SCRATCH_MAX, n + n // 8), dtype)
    return buf[:n].reshape(shape)


def _window(blocks, crop, dtype, slot: str | None = None) -> np.ndarray:
    """``crop`` of the 2-D grid of ``blocks`` (or of one array) as a C-contiguous ``dtype`` array, in at most
    one copy (into this thread's buffer ``slot`` when given: valid until the thread's next window of that slot)."""
    (y0, y1), (x0, x1) = crop
    if not isinstance(blocks, list):
        view = blocks[y0:y1, x0:x1]
        if view.flags.c_contiguous and view.dtype == dtype:
            return view
        out = np.empty(view.shape, dtype) if slot is None else _scratch(slot, view.shape, dtype)
        out[...] = view
        return out
    shape = (y1 - y0, x1 - x0)
    out = np.empty(shape, dtype) if slot is None else _scratch(slot, shape, dtype)
    top = 0
    for row in blocks:
        h = row[0].shape[0]
        a, b = max(y0, top), min(y1, top + h)
        left = 0
        for blk in row:
            w = blk.shape[1]
            c, d = max(x0, left), min(x1, left + w)
            if a < b and c < d:
                out[a - y0 : b - y0, c - x0 : d - x0] = blk[a - top : b - top, c - left : d - left]
            left += w
        top += h
    return out


def _load_dtype(blocks) -> type:
    """float32 windows stay float32 (the kernel converts each tap exactly), anything else becomes float64."""
    first = blocks
    while isinstance(first, list):
        first = first[0]
    return np.float32 if first.dtype == np.float32 else np.float64


def _run_block(img, var, msk, *, plan_args, dst: Box, win_origin, crop):
    """Warp one destination block from a grid of source blocks (numpy in, numpy out)."""
    img = _window(img, crop, _load_dtype(img), "image")
    var = _window(var, crop, _load_dtype(var), "variance")
    msk = _window(msk, crop, np.uint32, "mask")
    out_img = np.empty(dst.shape, np.float32)
    out_var = np.empty(dst.shape, np.float32)
    out_msk = np.empty(dst.shape, np.uint32)
    (gx0, gy0, nodes_x, nodes_y, step, valid, order, bilinear, linear, mask_order, grow, nodata, scale, table_size,
     products) = plan_args
    table = _table(order, linear, table_size) if table_size and not bilinear else _NO_TABLE
    _k.warp_block(
        img, var, msk, win_origin[0], win_origin[1], valid, nodes_x, nodes_y, gx0, gy0,
        step, dst.x0, dst.y0, out_img, out_var, out_msk, order, bilinear, linear, mask_order, grow, nodata, scale,
        table, products,
    )
    return out_img, out_var, out_msk


_NO_TABLE = np.zeros((1, 1))


@functools.lru_cache(maxsize=16)
def _table(order: int, linear: bool, size: int) -> np.ndarray:
    table = _k.kernel_table(order, linear, size)
    return table


def _fill(shape, value, dtype):
    """A read-only no-data block: one element broadcast to ``shape`` (no memory per pixel).

    Concatenation and store writes copy it like any block; whoever wants to write into a block
    must copy it first (dask blocks are never to be modified in place).
    """
    return np.broadcast_to(np.array(value, dtype=dtype), shape)


def _block_args(plan: WarpPlan, dst: Box, grow: int, nodata: int, scale: float):
    n = kernel_order(plan.config.kernel)
    gx0, gy0, nx_, ny_ = plan.sub_lattice(dst)
    mask_order = n if plan.config.mask_kernel == "same" else 1
    return (gx0, gy0, nx_, ny_, plan.step, np.array(plan.valid, dtype=np.int64), n,
            plan.config.kernel == "bilinear", plan.config.reproduce_linear, mask_order, np.uint32(grow), np.uint32(nodata),
            float(scale), plan.config.kernel_table_size, plan.config.lanczos_products)


def _source_keys(arr: da.Array, win: Box, src: Box):
    """Keys of the blocks of ``arr`` under ``win`` and the crop of the stitched blocks."""
    yb = np.cumsum((0,) + arr.chunks[0])
    xb = np.cumsum((0,) + arr.chunks[1])
    ylo, yhi = win.y0 - src.y0, win.y1 - src.y0
    xlo, xhi = win.x0 - src.x0, win.x1 - src.x0
    iy0 = int(np.searchsorted(yb, ylo, side="right") - 1)
    iy1 = int(np.searchsorted(yb, yhi, side="left"))
    ix0 = int(np.searchsorted(xb, xlo, side="right") - 1)
    ix1 = int(np.searchsorted(xb, xhi, side="left"))
    keys = [[(arr.name, a, b) for b in range(ix0, ix1)] for a in range(iy0, iy1)]
    crop = ((int(ylo - yb[iy0]), int(yhi - yb[iy0])), (int(xlo - xb[ix0]), int(xhi - xb[ix0])))
    return keys, crop


def _warp_dask(exposure, plan: WarpPlan, grow, nodata, scale):
    src = plan.src_box
    arrays = []
    base = exposure["image"].data
    for name in ("image", "variance", "mask"):
        a = exposure[name].data
        if not isinstance(a, da.Array):
            chunks = base.chunks if isinstance(base, da.Array) else a.shape
            a = da.from_array(a, chunks=chunks)
        arrays.append(a)
    img, var, msk = arrays
    if var.chunks != img.chunks:
        var = var.rechunk(img.chunks)
    if msk.chunks != img.chunks:
        msk = msk.rechunk(img.chunks)
    token = tokenize(img.name, var.name, msk.name, plan.src_box, plan.dst_box, plan.src_wcs, plan.dst_wcs,
                     plan.chunks, plan.config.model_dump_json(), grow, nodata, scale)
    raw = f"warp-blocks-{token}"
    names = {"image": f"warp-image-{token}", "variance": f"warp-variance-{token}", "mask": f"warp-mask-{token}"}
    fills = {"image": (np.nan, np.float32), "variance": (np.inf, np.float32), "mask": (nodata, np.uint32)}
    raw_dsk: dict = {}
    out_dsk: dict = {name: {} for name in names}
    nby, nbx = plan.numblocks
    for by in range(nby):
        for bx in range(nbx):
            dst = plan.block_box(by, bx)
            win = plan.windows.get((by, bx))
            if win is None:
                for name, key in names.items():
                    value, dtype = fills[name]
                    out_dsk[name][(key, by, bx)] = (functools.partial(_fill, dst.shape, value, dtype),)
                continue
            ki, crop = _source_keys(img, win, src)
            kv, _ = _source_keys(var, win, src)
            km, _ = _source_keys(msk, win, src)
            fn = functools.partial(_run_block, plan_args=_block_args(plan, dst, grow, nodata, scale), dst=dst,
                                   win_origin=(win.x0, win.y0), crop=crop)
            raw_dsk[(raw, by, bx)] = (fn, ki, kv, km)
            for i, (name, key) in enumerate(names.items()):
                out_dsk[name][(key, by, bx)] = (operator.getitem, (raw, by, bx), i)
    if raw_dsk:
        raw_graph = HighLevelGraph.from_collections(raw, raw_dsk, dependencies=[img, var, msk])
        layers, deps = dict(raw_graph.layers), dict(raw_graph.dependencies)
    else:
        layers, deps = {}, {}
    out = {}
    for name, key in names.items():
        graph = HighLevelGraph({**layers, key: out_dsk[name]}, {**deps, key: {raw} if raw_dsk else set()})
        out[name] = da.Array(graph, key, chunks=plan.chunks, dtype=fills[name][1])
    return out["image"], out["variance"], out["mask"]


def _warp_numpy(exposure, plan: WarpPlan, grow, nodata, scale):
    img = np.full(plan.dst_box.shape, np.nan, np.float32)
    var = np.full(plan.dst_box.shape, np.inf, np.float32)
    msk = np.full(plan.dst_box.shape, nodata, np.uint32)
    src = plan.src_box
    si, sv, sm = (exposure[v].data for v in ("image", "variance", "mask"))
    for (by, bx), win in plan.windows.items():
        dst = plan.block_box(by, bx)
        sl = win.slices(src)
        oi, ov, om = _run_block(si[sl], sv[sl], sm[sl], plan_args=_block_args(plan, dst, grow, nodata, scale),
                                dst=dst, win_origin=(win.x0, win.y0), crop=((0, win.height), (0, win.width)))
        out_sl = dst.slices(plan.dst_box)
        img[out_sl], var[out_sl], msk[out_sl] = oi, ov, om
    return img, var, msk


def _calibration(exposure: xr.Dataset, ids) -> float:
    """Multiplier from image units to nJy (1 when the exposure is already in nJy)."""
    if exposure.attrs.get("bunit") == "nJy":
        return 1.0
    zp = exposure.attrs.get("zero_point")
    try:
        ok = zp is not None and math.isfinite(float(zp))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SchemaError(f"no finite photometric zero point (zero_point={zp!r})", ids=ids)
    return njy_per_unit(float(zp))


def _check_plan(exposure: xr.Dataset, plan: WarpPlan, ids) -> None:
    if not isinstance(plan, WarpPlan):
        raise SchemaError(f"plan must be a WarpPlan, got {type(plan).__name__}", ids=ids)
    src = Box.of(exposure)
    if src != plan.src_box:
        raise SchemaError(f"the plan was made for an exposure with bbox {plan.src_box}, not {src}", ids=ids)
    if has_wcs(exposure) and _canonical_header(exposure.coords["wcs"].attrs["fits_header"]) != plan.src_wcs:
        raise SchemaError("the plan was made for an exposure with another WCS", ids=ids)


def warp_exposure(
    exposure: xr.Dataset,
    *,
    wcs=None,
    box: Box | None = None,
    chunks: int | tuple[int, int] | None = None,
    plan: WarpPlan | None = None,
    config: WarpConfig | None = None,
) -> xr.Dataset:
    """Resample an exposure onto ``box`` of the pixel frame of ``wcs``, calibrated to nJy.

    Give either ``wcs``/``box``/``chunks`` (default chunks 1000x1000, edges at multiples of the chunk
    size in the destination frame) or a ``plan`` from :func:`plan_warp` (reuse it for several
    products of the same exposure geometry). The result is a ``kind="warp"`` Dataset in the
    destination parent frame, dask-backed when the exposure is (numpy otherwise). Each covered
    destination chunk depends only on the source chunks under its window; uncovered chunks are
    no-data fill tasks ``(NaN, NO_DATA, +inf)`` with no dependency on the exposure.

    Per destination pixel (spec warping.md section 1.3): source position ``(x, y)`` from the plan,
    ``i = floor(x)``; a pixel whose ``i`` (or ``j``) lies outside the source bbox shrunk by the
    kernel border (``n-1`` low, ``n`` high) is a pad pixel. Otherwise with separable weights ``w``
    (Lanczos-n exact, or bilinear), their sum ``s``, and the relative area ``A = |det J|`` from the
    pixel's left and lower neighbours: ``I = c (A/s) sum w I_src``, ``V = c^2 (A/s)^2 sum w^2 V_src``
    (``c`` = nJy per image unit of the exposure's zero point), mask = (OR over taps of non-zero image
    weight & ``grow_full_mask``) | (OR over the mask-kernel footprint, by default the bilinear
    2x2 taps of non-zero weight).

    Bad source pixels (departure from the reference, which lets a NaN poison every output pixel
    whose kernel touches it): a tap is bad when its image or variance is not finite or its mask
    has NO_DATA. If a bad tap lies in the bilinear footprint of the output pixel, the output pixel
    is no-data (NaN, +inf, NO_DATA added to its mask bits), so NO_DATA spreads exactly by the
    bilinear footprint; otherwise bad taps are left out and ``s`` becomes the sum of the remaining
    weights. A pixel whose taps all sit at exact integer positions (``f == 0``) uses the exact delta
    weights, so integer shifts reproduce the input bit for bit.

    Centroids (departure from the reference, switched off by ``reproduce_linear=False``): plain
    Lanczos-n taps normalised by their sum have a non-zero first moment ``m1(f)`` (up to 0.020 px
    for Lanczos-3, 0.011 px for Lanczos-5), which moves every smooth source by ``-m1`` of its
    sub-pixel phase. By default ``m1`` of weight is moved from the tap at offset 1 to the tap at
    offset 0 (sum unchanged, same footprint), so linear gradients and centroids are reproduced.

    attrs: the exposure's ids, ``bunit = "nJy"``, ``zero_point = 31.4``, ``n_good_pixels``
    (destination pixels inside the source's valid area; 0 = the exposure does not overlap, the
    warp is all no-data), ``warp_kernel``, ``source_bbox`` and ``variance_correlation_factor``.

    ``variance_correlation_factor`` R (an improvement over the reference, whose variance ignores
    the covariance resampling creates): for a source of uniform independent noise, R is the ratio
    of the variance of the sum of the warped image over a large area to the sum of the recorded
    per-pixel variances over that area, ``R = Var(sum_p I_p) / sum_p V_p``; equivalently the sum of
    the autocovariance of the warped noise over all lags divided by the mean recorded variance.
    With ``c_q = sum_p A_p w_pq / s_p`` (the total weight of source pixel q) and
    ``g_p = sum_q w_pq^2 / s_p^2``: ``R = (<c^2>/<c>) <A> / <A^2 g>``, averages taken over the
    destination pixels (A, g) and the interior source pixels (c) of a central window of
    ``correlation_window`` pixels. For a pure translation by fractional ``(fx, fy)``,
    ``R = s(fx)^2 s(fy)^2 / (sum w(fx)^2 sum w(fy)^2)``, e.g. 1.62 for a half-pixel Lanczos-3 shift;
    multiply the variance of an aperture or PSF-weighted sum (much larger than the kernel) by R.

    Notes
    -----
    LSST: ``lsst.afw.math.warpExposure`` as called by ``MakeDirectWarpTask`` (per detector: calibrate
    to nJy, warp); the PSF follows ``WarpedPsf`` (see :func:`warp_psf`). Config mapping:
    ``warpingKernelName`` -> ``kernel``; ``maskWarpingKernelName`` -> ``mask_kernel`` ("" = "same");
    ``interpLength`` -> ``interp_length``; ``growFullMask`` -> ``grow_full_mask``; ``cacheSize`` ->
    ``kernel_table_size`` (default 0: exact evaluation, as MakeDirectWarpTask; a table of 10 000
    phases, linearly interpolated, agrees with it to ~1e-9 relative, below float32 rounding, and is
    about twice as fast). ``lanczos_products`` (default True) evaluates the exact weights without
    divisions; ``False`` keeps the quotient form (outputs agree to float32 rounding: the float64 sums
    differ by ~1e-15 of the footprint's scale). Reference numerics: ``reproduce_linear=False``. Combining the detectors of a visit (``copyGoodPixels``) and
    the ``border`` of the destination bbox belong to the caller.
    """
    ids = data_ids(exposure)
    if plan is None:
        if wcs is None or box is None:
            raise SchemaError("warp_exposure needs a destination wcs and box, or a plan", ids=ids)
        config = WarpConfig() if config is None else config
        scale = _calibration(exposure, ids)
        plan = plan_warp(exposure, wcs=wcs, box=box, chunks=(1000, 1000) if chunks is None else chunks, config=config)
    else:
        if wcs is not None or box is not None or chunks is not None:
            raise SchemaError("give either a plan or wcs/box/chunks, not both", ids=ids)
        if config is not None and config != plan.config:
            raise SchemaError("config differs from the config the plan was made with", ids=ids)
        _check_plan(exposure, plan, ids)
        _validated_header(exposure, ids)
        scale = _calibration(exposure, ids)
    config = plan.config
    planes = mask_planes(exposure)
    try:
        nodata = bitmask("NO_DATA", planes)
        grow = bitmask(config.grow_full_mask, planes)
    except MaskPlaneError as exc:
        raise MaskPlaneError(exc.reason, ids=ids) from None
    lazy = any(dask.is_dask_collection(exposure[v].data) for v in ("image", "variance", "mask"))
    if lazy:
        img, var, msk = _warp_dask(exposure, plan, grow, nodata, scale)
    else:
        img, var, msk = _warp_numpy(exposure, plan, grow, nodata, scale)
    psf = warp_psf(exposure, plan=plan) if "psf" in exposure.variables else None
    attrs = {k: v for k, v in exposure.attrs.items() if k not in ("schema_version", "kind")}
    attrs.update(
        bunit="nJy",
        zero_point=NJY_ZERO_POINT,
        n_good_pixels=int(plan.n_good_pixels),
        variance_correlation_factor=float(plan.variance_correlation_factor),
        warp_kernel=config.kernel,
        source_bbox=plan.src_box.to_list(),
    )
    ds = make_dataset(
        img, var, msk, wcs=_cached_wcs(plan.dst_wcs), kind="warp", x0=plan.dst_box.x0, y0=plan.dst_box.y0, planes=planes,
        psf=psf, attrs=attrs,
    )
    return with_provenance(ds, "warp_exposure", config)


# --------------------------------------------------------------------------------------------
# PSF


def _psf_nodes(box: Box, spacing: int) -> tuple[np.ndarray, np.ndarray]:
    """Destination PSF grid: centres of ``ceil(size/spacing)`` equal cells per axis of ``box``."""
    nx = max(1, math.ceil(box.width / spacing))
    ny = max(1, math.ceil(box.height / spacing))
    xs = box.x0 - 0.5 + (np.arange(nx) + 0.5) * box.width / nx
    ys = box.y0 - 0.5 + (np.arange(ny) + 0.5) * box.height / ny
    return xs, ys


def _check_source_psf(psf: xr.DataArray, src: Box, ids) -> tuple[np.ndarray, np.ndarray]:
    if psf.dims != PSF_DIMS:
        raise SchemaError(f"variable 'psf' has dims {psf.dims}, expected {PSF_DIMS}", ids=ids)
    px = np.asarray(psf.coords["psf_x"].values, dtype=np.float64)
    py = np.asarray(psf.coords["psf_y"].values, dtype=np.float64)
    for name, v, lo, hi in (("psf_x", px, src.x0, src.x1), ("psf_y", py, src.y0, src.y1)):
        if v.size > 1 and not np.all(np.diff(v) > 0):
            raise SchemaError(f"PSF grid coordinate {name} must increase, got {v.tolist()}", ids=ids)
        outside = v[~((v >= lo - 0.5) & (v <= hi - 0.5))] if v.size else v
        if outside.size or not np.all(np.isfinite(v)):
            raise SchemaError(
                f"PSF grid node {name}={float(outside[0]) if outside.size else v.tolist()!r} lies outside the exposure "
                f"bbox [{lo}, {hi})",
                ids=ids,
            )
    return px, py


def warp_psf(exposure: xr.Dataset, *, plan: WarpPlan) -> xr.DataArray:
    """The exposure's PSF grid warped onto the plan's destination frame (``WarpedPsf``).

    The destination PSF grid has nodes at the centres of ``ceil(size / psf_spacing)`` equal cells per
    axis of the destination box. At each node the destination -> source transform is linearised
    exactly (central differences of the WCS mapping, half a pixel each side); the source PSF at the
    node's source position (bilinear between the exposure's PSF grid nodes, clamped at the grid's
    edge) is resampled through the affine map with Lanczos-3 taps, zero outside the source PSF image,
    and renormalised to sum 1. Nodes whose source position is outside the exposure's valid area
    are NaN (the exposure does not cover them). The kernel size is that of the transformed source
    PSF box (odd, the same at all nodes).

    Raises :class:`SchemaError` (with the exposure's ids) when the PSF grid does not match the
    exposure (nodes outside its bbox, non-increasing coordinates) or when a transform coefficient
    exceeds 200 ("unexpectedly large transform"). A warped PSF summing to 0 raises
    :class:`DataQualityError` when computed.

    Notes
    -----
    LSST: ``lsst.meas.algorithms.WarpedPsf`` evaluated at the grid nodes (``computeKernelImage``
    with the CoaddPsf warping control: Lanczos-3, cacheSize 0); ``WarpedPsfTransformTooBigError``
    -> :class:`SchemaError`. ``psf_spacing`` sets the grid; ``reproduce_linear`` applies as for the
    image so that the PSF matches the warped sources.
    """
    ids = data_ids(exposure)
    psf = exposure["psf"]
    src = plan.src_box
    gpx, gpy = _check_source_psf(psf, src, ids)
    ky, kx = psf.shape[2:]
    src_wcs = _cached_wcs(plan.src_wcs)
    dst_wcs = _cached_wcs(plan.dst_wcs)
    xs, ys = _psf_nodes(plan.dst_box, plan.config.psf_spacing)
    X, Y = np.meshgrid(xs, ys)
    h = 0.5
    # the nodes and their four neighbours half a pixel away, in one call of the (per point) transform
    ax, ay = _map_pixels(dst_wcs, src_wcs, np.stack([X, X + h, X - h, X, X]), np.stack([Y, Y, Y, Y + h, Y - h]))
    (sx, xr_, xl_, xu_, xd_), (sy, yr_, yl_, yu_, yd_) = ax, ay
    m = np.stack([(xr_ - xl_) / (2 * h), (xu_ - xd_) / (2 * h), (yr_ - yl_) / (2 * h), (yu_ - yd_) / (2 * h)], -1)
    ix_lo, iy_lo, ix_hi, iy_hi = plan.valid
    with np.errstate(invalid="ignore"):
        covered = (
            np.isfinite(sx) & np.isfinite(sy) & np.all(np.isfinite(m), axis=-1)
            & (np.floor(sx) >= ix_lo) & (np.floor(sx) <= ix_hi) & (np.floor(sy) >= iy_lo) & (np.floor(sy) <= iy_hi)
        )
    half_y, half_x = (ky - 1) // 2, (kx - 1) // 2
    out_hy, out_hx = 0, 0
    kk, ll = np.nonzero(covered)
    if kk.size:
        mats = m[kk, ll].reshape(-1, 2, 2)
        det = np.linalg.det(mats)
        inv = np.full_like(mats, np.inf)
        regular = det != 0
        inv[regular] = np.linalg.inv(mats[regular])
        big = np.maximum(np.abs(mats).max(axis=(1, 2)), np.abs(inv).max(axis=(1, 2)))
        too_big = ~(big <= MAX_TRANSFORM_COEFFICIENT)
        if too_big.any():
            p = int(np.argmax(too_big))
            raise SchemaError(
                f"unexpectedly large transform (coefficient {big[p]:.3g} > {MAX_TRANSFORM_COEFFICIENT:g}) at "
                f"destination ({xs[ll[p]]:.1f}, {ys[kk[p]]:.1f})",
                ids=ids,
            )
        # the corners of the source PSF box mapped to the destination: the warped kernel's half sizes
        cx_ = np.array([-1.0, -1.0, 1.0, 1.0]) * (half_x + 0.5)
        cy_ = np.array([-1.0, 1.0, -1.0, 1.0]) * (half_y + 0.5)
        dx = inv[:, 0, 0, None] * cx_ + inv[:, 0, 1, None] * cy_
        dy = inv[:, 1, 0, None] * cx_ + inv[:, 1, 1, None] * cy_
        out_hx = max(0, int(math.ceil(np.abs(dx).max() - 0.5 - 1e-6)))
        out_hy = max(0, int(math.ceil(np.abs(dy).max() - 0.5 - 1e-6)))
    if not covered.any():
        out_hy, out_hx = half_y, half_x
    args = (gpx, gpy, sx, sy, m, covered, out_hy, out_hx, plan.config.reproduce_linear, ids)
    shape = (ys.size, xs.size, 2 * out_hy + 1, 2 * out_hx + 1)
    if isinstance(psf.data, da.Array):
        token = tokenize(psf.data.name, plan.src_wcs, plan.dst_wcs, plan.dst_box, plan.config.psf_spacing)
        delayed = dask.delayed(_warp_psf_grid, pure=True)(psf.data, *args, dask_key_name=f"warp-psf-{token}")
        data = da.from_delayed(delayed, shape=shape, dtype=np.float64, name=f"warp-psf-array-{token}")
    else:
        data = _warp_psf_grid(np.asarray(psf.data), *args)
    return xr.DataArray(data, dims=PSF_DIMS, coords={"psf_y": ys, "psf_x": xs})


def _interp_weights(grid: np.ndarray, value: float) -> list[tuple[int, float]]:
    if grid.size == 1 or value <= grid[0]:
        return [(0, 1.0)]
    if value >= grid[-1]:
        return [(grid.size - 1, 1.0)]
    i = int(np.searchsorted(grid, value, side="right") - 1)
    f = (value - grid[i]) / (grid[i + 1] - grid[i])
    return [(i, 1.0 - f), (i + 1, f)]


def _warp_psf_grid(src_psf, gpx, gpy, sx, sy, m, covered, out_hy, out_hx, linear, ids):
    src_psf = np.asarray(src_psf, dtype=np.float64)
    ny, nx = covered.shape
    out = np.full((ny, nx, 2 * out_hy + 1, 2 * out_hx + 1), np.nan)
    tmp = np.empty((2 * out_hy + 1, 2 * out_hx + 1))
    for k, l in zip(*np.nonzero(covered)):
        img = np.zeros(src_psf.shape[2:])
        for iy, wy in _interp_weights(gpy, sy[k, l]):
            for ix, wx in _interp_weights(gpx, sx[k, l]):
                img += wy * wx * src_psf[iy, ix]
        m00, m01, m10, m11 = m[k, l]
        _k.warp_psf_image(np.ascontiguousarray(img), m00, m01, m10, m11, out_hy, out_hx, linear, tmp)
        total = tmp.sum()
        if not (np.isfinite(total) and total > 0):
            raise DataQualityError(f"warped PSF at node ({k}, {l}) sums to {total!r}; cannot normalise", ids=ids)
        out[k, l] = tmp / total
    return out
