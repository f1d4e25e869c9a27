"""Vector tap sums of the warp kernel (pipeline._simd) against scalar and exact sums."""

from __future__ import annotations

import math
import platform
import re

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tan_wcs
from pipeline import _kernels_warp as K
from pipeline._simd import lanes, make_tap_sums, tap_sums_2, tap_sums_6, tap_sums_8, tap_sums_10
from pipeline.model.geometry import Box
from pipeline.model.masks import MaskPlane
from pipeline.model.schema import make_dataset
from pipeline.warp import WarpConfig, plan_warp

NO_DATA = int(MaskPlane.NO_DATA)
EDGE = int(MaskPlane.EDGE)
BAD = int(MaskPlane.BAD)

TAPS = {2: tap_sums_2, 6: tap_sums_6, 8: tap_sums_8, 10: tap_sums_10}
UNIT = 2.0**-53


def _wrap(fn):
    """A compiled caller of the intrinsic ``fn`` (not cached, so that its assembly can be inspected)."""

    @numba.njit(nogil=True, error_model="numpy", fastmath={"contract"})
    def call(img, var, off, width, wx, wy, wy2, q):
        return fn(img.ravel(), var.ravel(), off, width, wx, wy, wy2, q)

    return call


CALLERS = {m: _wrap(fn) for m, fn in TAPS.items()}
CALLERS_RUNS = {m: _wrap(make_tap_sums(m, masked=False)) for m in TAPS}


@numba.njit(nogil=True, error_model="numpy", fastmath={"contract"})
def _scalar_sums(img, var, y0, x0, wx, wy, q, m):
    """The scalar order of the kernel's ``simd=False`` path: each row with the x weights, then the rows."""
    acc_i = 0.0
    acc_v = 0.0
    for b in range(m):
        ri = 0.0
        rv = 0.0
        for a in range(m):
            ri += wx[a, q] * np.float64(img[y0 + b, x0 + a])
            rv += (wx[a, q] * wx[a, q]) * np.float64(var[y0 + b, x0 + a])
        acc_i += wy[b, q] * ri
        acc_v += (wy[b, q] * wy[b, q]) * rv
    return acc_i, acc_v


def _weights(rng, m, rows, delta=False):
    """Column-major x and y weights (tap k of pixel q at [k, q]) and the squares of the y weights."""
    wx = np.zeros((m, rows))
    wy = np.zeros((m, rows))
    if delta:
        wx[rng.integers(0, m, rows), np.arange(rows)] = 1.0
        wy[rng.integers(0, m, rows), np.arange(rows)] = 1.0
    else:
        wx[:] = rng.normal(size=(m, rows))
        wy[:] = rng.normal(size=(m, rows))
    return wx, wy, wy * wy


def _exact(img, var, y0, x0, wx, wy, q, m):
    blk_i = img[y0 : y0 + m, x0 : x0 + m].astype(np.float64)
    blk_v = var[y0 : y0 + m, x0 : x0 + m].astype(np.float64)
    ti = np.outer(wy[:, q], wx[:, q]) * blk_i
    tv = np.outer(wy[:, q] ** 2, wx[:, q] ** 2) * blk_v
    return math.fsum(ti.ravel()), math.fsum(tv.ravel()), np.abs(ti).sum(), np.abs(tv).sum()


def _bound(m):
    """Rounding bound of the vector order relative to sum |w_b w_a d_ba|: a multiply-add chain of m rows,
    the product with the x weights (or their squares), a pairwise sum over lanes(m) lanes, and the
    squares of the weights."""
    return (m + 3 + int(math.log2(lanes(m)))) * UNIT


# ------------------------------------------------------------------------------------------
# the intrinsic


@pytest.mark.parametrize("m", [2, 6, 8, 10])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tap_sums_match_exact_sums_within_the_rounding_bound(rng, m, dtype):
    ny, nx = 31, 37
    img = rng.normal(100.0, 30.0, (ny, nx)).astype(dtype)
    var = rng.uniform(0.5, 2.0, (ny, nx)).astype(dtype)
    wx, wy, wy2 = _weights(rng, m, 64)
    worst_new = worst_old = 0.0
    # footprints everywhere, including the one ending on the array's last element
    for q, (y0, x0) in enumerate([(ny - m, nx - m), (0, 0)] + [tuple(rng.integers(0, (ny - m + 1, nx - m + 1)))
                                                               for _ in range(62)]):
        si, sv = CALLERS[m](img, var, y0 * nx + x0, nx, wx, wy, wy2, q)
        oi, ov = _scalar_sums(img, var, y0, x0, wx, wy, q, m)
        ei, ev, ai, av = _exact(img, var, y0, x0, wx, wy, q, m)
        worst_new = max(worst_new, abs(si - ei) / ai, abs(sv - ev) / av)
        worst_old = max(worst_old, abs(oi - ei) / ai, abs(ov - ev) / av)
        # the two summation orders differ by rounding only
        assert abs(si - oi) <= 2 * _bound(m) * ai
        assert abs(sv - ov) <= 2 * _bound(m) * av
    assert worst_new <= _bound(m)
    assert worst_old <= _bound(m)


@pytest.mark.parametrize("m", [2, 6, 8, 10])
def test_power_of_two_runs_give_the_masked_loads_bit_for_bit(rng, m):
    img = rng.normal(size=(20, 23)).astype(np.float32)
    var = rng.uniform(1, 2, (20, 23))
    wx, wy, wy2 = _weights(rng, m, 8)
    for q in range(8):
        y0, x0 = (20 - m, 23 - m) if q == 0 else tuple(rng.integers(0, (21 - m, 24 - m)))
        a = CALLERS[m](img, var, y0 * 23 + x0, 23, wx, wy, wy2, q)
        b = CALLERS_RUNS[m](img, var, y0 * 23 + x0, 23, wx, wy, wy2, q)
        assert a == b


@pytest.mark.parametrize("m", [2, 6, 8, 10])
def test_delta_weights_reproduce_the_pixel_exactly(rng, m):
    img = rng.normal(size=(24, 26)).astype(np.float32)
    var = rng.uniform(1, 2, (24, 26)).astype(np.float32)
    wx, wy, wy2 = _weights(rng, m, 16, delta=True)
    for q in range(16):
        y0, x0 = tuple(rng.integers(0, (25 - m, 27 - m)))
        a = int(np.argmax(wx[:, q]))
        b = int(np.argmax(wy[:, q]))
        si, sv = CALLERS[m](img, var, y0 * 26 + x0, 26, wx, wy, wy2, q)
        assert si == float(img[y0 + b, x0 + a])
        assert sv == float(var[y0 + b, x0 + a])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.sampled_from([2, 6, 8, 10]), width=st.integers(10, 40),
       scale=st.floats(1e-3, 1e6))
def test_tap_sums_property_exact_within_bound(seed, m, width, scale):
    rng = np.random.default_rng(seed)
    height = int(rng.integers(m, 20))
    img = (rng.normal(size=(height, width)) * scale).astype(np.float32)
    var = (rng.uniform(0, 1, (height, width)) * scale).astype(np.float32)
    wx, wy, wy2 = _weights(rng, m, 4)
    for q in range(4):
        y0, x0 = int(rng.integers(0, height - m + 1)), int(rng.integers(0, width - m + 1))
        si, sv = CALLERS[m](img, var, y0 * width + x0, width, wx, wy, wy2, q)
        ei, ev, ai, av = _exact(img, var, y0, x0, wx, wy, q, m)
        assert abs(si - ei) <= _bound(m) * ai
        assert abs(sv - ev) <= _bound(m) * av


def test_tap_sums_reject_arguments_of_the_wrong_type(rng):
    wx, wy, wy2 = _weights(rng, 6, 4)
    with pytest.raises(numba.core.errors.TypingError, match="tap_sums"):
        CALLERS[6](np.zeros((8, 8), np.int32), np.zeros((8, 8), np.float32), 0, 8, wx, wy, wy2, 0)
    with pytest.raises(numba.core.errors.TypingError, match="tap_sums"):
        CALLERS[6](np.zeros((8, 8)), np.zeros((8, 8)), 0, 8, wx, wy.astype(np.float32), wy2, 0)
    with pytest.raises(numba.core.errors.TypingError, match="tap_sums"):
        CALLERS[6](np.zeros((8, 8)), np.zeros((8, 8)), 0.0, 8, wx, wy, wy2, 0)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"),
                    reason="packed-double instruction names known for x86-64 and aarch64 only")
def test_compiled_tap_sums_use_packed_double_instructions(rng):
    img = rng.normal(size=(12, 12)).astype(np.float32)
    wx, wy, wy2 = _weights(rng, 6, 2)
    call = CALLERS[6]
    call(img, img, 0, 12, wx, wy, wy2, 0)
    asm = call.inspect_asm(call.signatures[0])
    if platform.machine().lower() in ("x86_64", "amd64"):
        packed = re.findall(r"\bv?(?:fmadd\d*pd|fmadd\d*pd|mulpd|addpd|cvtps2pd)\b", asm)
    else:
        packed = re.findall(r"\bf(?:mla|mul|add)\s+v\d+\.2d", asm)
    assert len(packed) >= 6


# ------------------------------------------------------------------------------------------
# the warp kernel with and without vector tap sums


def _blocks(rng, *, kernel="lanczos3", crpix=(43.37, 38.61), rotation=4.0, scale=0.21, dtype=np.float32,
            dirty=True, chunks=(23, 41), table=0):
    """Every destination block of a small warp, run through ``warp_block`` with simd on and off."""
    from pipeline import warp as W

    src_wcs = make_tan_wcs(crpix=(40.0, 40.0))
    dst_wcs = make_tan_wcs(crpix=crpix, rotation_deg=rotation, scale_arcsec=scale)
    img = rng.normal(100.0, 10.0, (80, 84)).astype(np.float32)
    var = rng.uniform(50.0, 150.0, img.shape).astype(np.float32)
    msk = rng.integers(0, 1 << 11, img.shape).astype(np.uint32) & ~np.uint32(NO_DATA)
    if dirty:
        msk[30, 30] |= NO_DATA
        img[50, 50] = np.nan
        var[20, 60] = np.inf
    ds = make_dataset(img, var, msk, wcs=src_wcs, attrs={"visit": 1, "detector": 2, "band": "r", "zero_point": 31.4})
    plan = plan_warp(ds, wcs=dst_wcs, box=Box(0, 0, 84, 80), chunks=chunks,
                     config=WarpConfig(kernel=kernel, kernel_table_size=table))
    out = []
    for (by, bx), win in plan.windows.items():
        dst = plan.block_box(by, bx)
        sl = win.slices(plan.src_box)
        (gx0, gy0, nodes_x, nodes_y, step, valid, order, bilinear, linear, mask_order, grow, nodata, scale_, tsize,
         products) = W._block_args(plan, dst, EDGE, NO_DATA, 1.7)
        tab = W._table(order, linear, tsize) if tsize and not bilinear else W._NO_TABLE
        res = []
        for simd in (True, False):
            o = (np.empty(dst.shape, np.float32), np.empty(dst.shape, np.float32), np.empty(dst.shape, np.uint32))
            K.warp_block(np.ascontiguousarray(img[sl], dtype), np.ascontiguousarray(var[sl], dtype),
                         np.ascontiguousarray(msk[sl]), win.x0, win.y0, valid, nodes_x, nodes_y, gx0, gy0, step,
                         dst.x0, dst.y0, *o, order, bilinear, linear, mask_order, grow, nodata, scale_, tab, products,
                         simd=simd)
            res.append(o)
        out.append((dst, *res))
    return out


@pytest.mark.parametrize(("kernel", "table"), [("lanczos3", 0), ("lanczos4", 0), ("lanczos5", 0), ("bilinear", 0),
                                               ("lanczos3", 1000)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_and_scalar_tap_sums_agree_to_float32_rounding(rng, kernel, table, dtype):
    good = differ = 0
    for _, (ni, nv, nm), (oi, ov, om) in _blocks(rng, kernel=kernel, table=table, dtype=dtype):
        # no-data pixels, masks and the bad-tap path are the same bit for bit
        np.testing.assert_array_equal(np.isnan(ni), np.isnan(oi))
        np.testing.assert_array_equal(nv[np.isinf(ov)], ov[np.isinf(ov)])
        np.testing.assert_array_equal(nm, om)
        g = np.isfinite(oi)
        good += int(g.sum())
        for a, b in ((ni[g], oi[g]), (nv[g], ov[g])):
            ulps = np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))
            assert ulps.max(initial=0) <= 1
            differ += int((ulps > 0).sum())
    assert good > 4000
    # float64 sums that differ by ~1e-15 relative cross a float32 rounding boundary rarely
    assert differ <= 0.01 * good


@pytest.mark.parametrize("kernel", ["lanczos3", "lanczos4", "lanczos5", "bilinear"])
def test_integer_shift_is_exact_with_vector_tap_sums(rng, kernel):
    # destination pixel (X, Y) = source pixel (X - 3, Y + 2): every weight is a delta
    n = 1 if kernel == "bilinear" else int(kernel[-1])
    rng2 = np.random.default_rng(7)
    blocks = _blocks(rng2, kernel=kernel, crpix=(43.0, 38.0), rotation=0.0, scale=0.2, dirty=False)
    rng2 = np.random.default_rng(7)
    img = rng2.normal(100.0, 10.0, (80, 84)).astype(np.float32)
    var = rng2.uniform(50.0, 150.0, img.shape).astype(np.float32)
    good = 0
    for dst, (ni, nv, nm), (oi, ov, om) in blocks:
        np.testing.assert_array_equal(ni, oi)
        np.testing.assert_array_equal(nv, ov)
        np.testing.assert_array_equal(nm, om)
        Y, X = np.mgrid[dst.y0 : dst.y1, dst.x0 : dst.x1]
        g = np.isfinite(ni)
        good += int(g.sum())
        # the source pixel is (X - 3, Y + 2), inside the source box shrunk by the kernel border
        assert np.all((X[g] - 3 >= n - 1) & (X[g] - 3 <= 84 - 1 - n) & (Y[g] + 2 >= n - 1) & (Y[g] + 2 <= 80 - 1 - n))
        # unit weights and area: the source pixel times the calibration, rounded once to float32
        np.testing.assert_array_equal(ni[g], (img[Y[g] + 2, X[g] - 3].astype(np.float64) * 1.7).astype(np.float32))
        np.testing.assert_array_equal(nv[g], (var[Y[g] + 2, X[g] - 3].astype(np.float64) * 1.7 * 1.7).astype(np.float32))
    # every destination pixel whose source pixel lies in the shrunk source box
    ys = range(max(0, n - 1 - 2), min(80, 80 - n - 2))
    xs = range(max(0, n - 1 + 3), min(84, 84 - n + 3))
    assert good == len(ys) * len(xs)


def test_vector_tap_sums_do_not_depend_on_the_chunking():
    def assemble(chunks):
        # blocks without a good pixel are not run (the warp fills them with no-data)
        out = np.full((3, 80, 84), np.nan)
        for dst, new, _ in _blocks(np.random.default_rng(5), chunks=chunks):
            for k in range(3):
                out[k][dst.slices(Box(0, 0, 84, 80))] = new[k]
        return out

    a = assemble((80, 84))
    b = assemble((23, 41))
    good = np.isfinite(a[0])
    np.testing.assert_array_equal(good, np.isfinite(b[0]))
    for k in range(3):
        np.testing.assert_array_equal(a[k][good], b[k][good])
    assert good.sum() > 4000


def test_warp_block_rejects_an_unknown_kernel():
    z = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="no warp kernel of order 2"):
        K.warp_block(z, z, z.astype(np.uint32), 0, 0, np.zeros(4, np.int64), np.zeros((2, 2)), np.zeros((2, 2)), 0, 0,
                     1, 0, 0, z.copy(), z.copy(), z.astype(np.uint32), 2, False, False, 1, np.uint32(0),
                     np.uint32(NO_DATA), 1.0, np.zeros((1, 1)), True, simd=True)
