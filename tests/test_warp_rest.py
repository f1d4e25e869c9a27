"""Tests of the bookkeeping around the warp's tap sums: per-thread WCS reuse, replan without a recount,
the warped-PSF transform checks, and the numba helpers that locate source positions and flag masks."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tan_wcs
from pipeline import warp as W
from pipeline.errors import SchemaError
from pipeline.model.geometry import Box
from pipeline.model.masks import MaskPlane
from pipeline.model.schema import psf_grid
from pipeline.model.wcs import wcs_header_string
from pipeline.testing import assert_lazy, graph_size
from pipeline.warp import plan_warp, replan, warp_exposure
from test_warp import _same_plan, exposure

EDGE = int(MaskPlane.EDGE)
NO_DATA = int(MaskPlane.NO_DATA)


# ------------------------------------------------------------------------------------------
# WCS objects reused per thread


def test_cached_wcs_is_per_thread_and_per_header():
    W.clear_caches()
    h1 = wcs_header_string(make_tan_wcs(crpix=(10.0, 10.0)))
    h2 = wcs_header_string(make_tan_wcs(crpix=(10.0, 10.0), rotation_deg=5.0))
    a = W._cached_wcs(h1)
    assert W._cached_wcs(h1) is a
    b = W._cached_wcs(h2)
    assert b is not a
    np.testing.assert_allclose(a.wcs.crpix, [11.0, 11.0], rtol=0, atol=0)
    other = {}
    t = threading.Thread(target=lambda: other.update(w=W._cached_wcs(h1)))
    t.start()
    t.join()
    assert other["w"] is not a  # another thread builds its own object
    np.testing.assert_array_equal(other["w"].wcs.pc, a.wcs.pc)
    # at most _WCS_PER_THREAD headers kept, least recently used dropped first
    headers = [wcs_header_string(make_tan_wcs(crpix=(float(k), 3.0))) for k in range(W._WCS_PER_THREAD)]
    for h in headers:
        W._cached_wcs(h)
    assert W._cached_wcs(h1) is not a and len(W._thread_state.wcs) == W._WCS_PER_THREAD


def test_clear_caches_drops_every_threads_objects_and_the_checks():
    h1 = wcs_header_string(make_tan_wcs(crpix=(12.0, 10.0)))
    a = W._cached_wcs(h1)
    other = {}

    def in_thread(key):
        other[key] = W._cached_wcs(h1)

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # one thread that outlives the clear
        pool.submit(in_thread, "before").result()
        assert W._canonical_header(h1) == wcs_header_string(h1) and W._canonical_header.cache_info().currsize >= 1
        W.clear_caches()
        assert W._canonical_header.cache_info().currsize == 0 and W._celestial_reason.cache_info().currsize == 0
        pool.submit(in_thread, "after").result()
        assert other["after"] is not other["before"]  # the worker thread rebuilt its object
        pool.submit(in_thread, "again").result()
        assert other["again"] is other["after"]
    b = W._cached_wcs(h1)
    assert b is not a
    np.testing.assert_array_equal(b.wcs.crpix, a.wcs.crpix)


def test_warp_with_warm_caches_equals_cold(rng):
    src = make_tan_wcs(crpix=(30.0, 25.0))
    dst = make_tan_wcs(crpix=(41.3, 37.7), rotation_deg=17.0, scale_arcsec=0.19)
    ds = exposure(rng.normal(100.0, 10.0, (50, 60)), wcs=src).chunk({"y": 37, "x": 41})
    W.clear_caches()
    cold = warp_exposure(ds, wcs=dst, box=Box(0, 0, 80, 70), chunks=(29, 31)).compute()
    warm = warp_exposure(ds, wcs=dst, box=Box(0, 0, 80, 70), chunks=(29, 31)).compute()
    for v in ("image", "variance", "mask"):
        np.testing.assert_array_equal(warm[v].values, cold[v].values)
    assert warm.wcs.attrs["fits_header"] == cold.wcs.attrs["fits_header"] == wcs_header_string(dst)


def test_cached_checks_still_see_a_changed_wcs(rng):
    """The memoised checks are keyed by the header text: another WCS is checked (and rejected) afresh."""
    src = make_tan_wcs(crpix=(30.0, 25.0))
    ds = exposure(rng.normal(100.0, 10.0, (50, 60)), wcs=src)
    plan = plan_warp(ds, wcs=src, box=Box(0, 0, 60, 50), chunks=32)
    moved = exposure(ds.image.values, wcs=make_tan_wcs(crpix=(31.0, 25.0)))
    with pytest.raises(SchemaError, match=r"the plan was made for an exposure with another WCS.*visit=7"):
        warp_exposure(moved, plan=plan)
    sing = make_tan_wcs(crpix=(30.0, 25.0))
    sing.wcs.cd = np.array([[1e-16, 0.0], [0.0, 1e-16]])
    bad = ds.copy()
    bad.coords["wcs"] = ds.coords["wcs"].copy()
    bad.coords["wcs"].attrs = {"fits_header": sing.to_header().tostring()}
    for _ in range(2):  # the second time from the memo, same message and ids
        with pytest.raises(SchemaError, match=r"singular pixel scale matrix.*visit=7"):
            plan_warp(bad, wcs=src, box=Box(0, 0, 10, 10))
        with pytest.raises(SchemaError, match=r"singular pixel scale matrix.*visit=7"):
            warp_exposure(bad, wcs=src, box=Box(0, 0, 10, 10))
    nowcs = ds.drop_vars("wcs")
    with pytest.raises(SchemaError, match=r"the 'wcs' coordinate \(FITS header string\) is missing.*visit=7"):
        plan_warp(nowcs, wcs=src, box=Box(0, 0, 10, 10))
    with pytest.raises(SchemaError, match=r"the 'wcs' coordinate \(FITS header string\) is missing.*visit=7"):
        warp_exposure(nowcs, plan=plan)
    flat = make_tan_wcs()
    flat.wcs.ctype = ["LINEAR", "LINEAR"]
    for _ in range(2):
        with pytest.raises(SchemaError, match=r"destination WCS is not a 2-D celestial WCS.*visit=7"):
            plan_warp(ds, wcs=flat.to_header().tostring(), box=Box(0, 0, 10, 10))


# ------------------------------------------------------------------------------------------
# replan: counts carried over when the chunk edges are the plan's


@pytest.mark.parametrize(("rotation", "chunks"), [(0.0, (16, 16)), (33.0, (29, 31)), (-12.0, (64, 20))])
def test_replan_carries_counts_over_exactly(rng, rotation, chunks):
    src_wcs = make_tan_wcs(crpix=(40.0, 40.0))
    dst_wcs = make_tan_wcs(crpix=(93.37, 81.61), rotation_deg=rotation, scale_arcsec=0.19)
    ds = exposure(rng.normal(100.0, 10.0, (80, 90)), wcs=src_wcs).chunk({"y": 37, "x": 41})
    big = plan_warp(ds, wcs=dst_wcs, box=Box(0, 0, 200, 180), chunks=chunks)
    assert big.chunk_size == chunks
    g = big.good_box
    cy, cx = chunks
    for window in (g, Box(g.x0 // cx * cx, g.y0 // cy * cy, min(200, -(-g.x1 // cx) * cx), min(180, -(-g.y1 // cy) * cy)),
                   Box(max(0, g.x0 - 7), max(0, g.y0 - 3), g.x1 + 5, g.y1)):
        carried = replan(big, box=window, chunks=chunks)
        recounted = replan(dataclasses.replace(big, chunk_size=None), box=window, chunks=chunks)
        fresh = plan_warp(ds, wcs=dst_wcs, box=window, chunks=chunks)
        _same_plan(carried, recounted)
        _same_plan(carried, fresh)
        assert carried.chunk_size == chunks and carried.n_good_pixels == big.n_good_pixels > 3000
        a = warp_exposure(ds, plan=carried)
        b = warp_exposure(ds, plan=fresh)
        assert_lazy(lambda: warp_exposure(ds, plan=carried))
        assert graph_size(a) <= graph_size(b)
        for v in ("image", "variance", "mask"):
            np.testing.assert_array_equal(a[v].values, b[v].values)
    # a box that cuts through the good pixels is recounted
    part = Box(g.x0 + 9, g.y0 + 4, g.x1 - 6, g.y1 - 2)
    _same_plan(replan(big, box=part, chunks=chunks), plan_warp(ds, wcs=dst_wcs, box=part, chunks=chunks))


# ------------------------------------------------------------------------------------------
# warped PSF: the transform checks over all nodes at once


def test_psf_kernel_size_and_transform_limit_over_all_nodes(rng):
    src = make_tan_wcs(crpix=(30.0, 30.0))
    yy, xx = np.mgrid[-7:8, -7:8].astype(float)
    psf = psf_grid(np.exp(-0.5 * (xx**2 + yy**2) / 1.5**2), x=30.0, y=30.0)
    ds = exposure(rng.normal(100.0, 10.0, (60, 60)), wcs=src, psf=psf)
    # a destination with pixels half the size: the 15x15 PSF box spans 30 destination pixels (+1 for the odd size)
    fine = make_tan_wcs(crpix=(60.0, 60.0), scale_arcsec=0.1)
    out = warp_exposure(ds, wcs=fine, box=Box(0, 0, 120, 120), chunks=60)
    assert out.psf.shape[2:] == (31, 31)
    np.testing.assert_allclose(out.psf.values.sum(axis=(2, 3)), 1.0, rtol=0, atol=1e-12)
    rotated = make_tan_wcs(crpix=(30.0, 30.0), rotation_deg=45.0)
    out = warp_exposure(ds, wcs=rotated, box=Box(0, 0, 60, 60), chunks=60)
    # corners of the 15x15 box rotated by 45 degrees: 7.5 * sqrt(2) = 10.61 from the centre, half size
    # ceil(10.61 - 0.5) = 11
    assert out.psf.shape[2:] == (23, 23)
    tiny = make_tan_wcs(crpix=(30.0 * 250, 30.0 * 250), scale_arcsec=0.2 / 250)
    with pytest.raises(SchemaError, match=r"unexpectedly large transform \(coefficient 250 > 200\) at destination "
                       r"\(7499\.5, 7499\.5\).*visit=7"):
        warp_exposure(ds, wcs=tiny, box=Box(7400, 7400, 7600, 7600))


# ------------------------------------------------------------------------------------------
# numba helpers of the block warp (positions, EDGE map)


def _lattice(rng, nky, nkx, step, nan_fraction):
    k, l = np.mgrid[0:nky, 0:nkx].astype(float)
    theta, s = rng.uniform(0, 2 * np.pi), rng.uniform(0.7, 1.3)
    X, Y = l * step, k * step
    nx_ = 30.0 + s * (np.cos(theta) * X - np.sin(theta) * Y) + 1e-4 * X * Y / step
    ny_ = 40.0 + s * (np.sin(theta) * X + np.cos(theta) * Y)
    # some nodes exactly on integers and within SNAP of them, so that snapping is exercised
    nx_[0, :] = np.round(nx_[0, :])
    ny_[:, 0] = np.round(ny_[:, 0]) + 3e-9
    if nan_fraction:
        off = rng.random(nx_.shape) < nan_fraction
        nx_[off] = np.nan
        ny_[off] = np.nan
    return np.ascontiguousarray(nx_), np.ascontiguousarray(ny_)


_row_positions_fma = None


def _compiled_row_positions():
    """_row_positions inlined into a function that allows fused multiply-adds, as in the warp kernel."""
    global _row_positions_fma
    if _row_positions_fma is None:
        import numba

        from pipeline._kernels_warp import _SUMS, _row_positions

        @numba.njit(**_SUMS)
        def run(gx0, gy0, step, nodes_x, nodes_y, X0, rows, los, his, n, out_x, out_y):
            tab_x = np.empty((3, n))
            tab_y = np.empty((3, n))
            tab_k = np.full(3, -1, np.int64)
            for t in range(rows.size):
                _row_positions(tab_x, tab_y, tab_k, gx0, gy0, step, nodes_x, nodes_y, X0, rows[t], los[t], his[t],
                               out_x[t], out_y[t])

        _row_positions_fma = run
    return _row_positions_fma


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), step=st.integers(1, 13), nan=st.sampled_from([0.0, 0.1]),
       order=st.sampled_from(["up", "random"]))
def test_row_positions_equal_row_span_bit_for_bit(seed, step, nan, order):
    from pipeline._kernels_warp import _row_span

    rng = np.random.default_rng(seed)
    nodes_x, nodes_y = _lattice(rng, 6, 7, step, nan)
    gx0, gy0 = int(rng.integers(-20, 20)), int(rng.integers(-20, 20))
    n = 7 * step + 10
    X0 = gx0 - 5 + int(rng.integers(0, 3))
    rows = np.arange(gy0 - 2, gy0 + 5 * step + 3)
    if order == "random":  # rows revisited out of order: the ring of node rows is refilled
        rows = rng.permutation(np.concatenate([rows, rows]))
    los = rng.integers(0, n // 2, rows.size)
    his = np.array([int(rng.integers(lo, n + 1)) for lo in los])
    out_x = np.full((rows.size, n), -7.0)
    out_y = np.full((rows.size, n), -7.0)
    _compiled_row_positions()(gx0, gy0, step, nodes_x, nodes_y, X0, rows, los, his, n, out_x, out_y)
    for t, Y in enumerate(rows):
        ref_x, ref_y = np.full(n, -7.0), np.full(n, -7.0)
        _row_span(gx0, gy0, step, nodes_x, nodes_y, X0, int(Y), ref_x, ref_y, int(los[t]), int(his[t]))
        np.testing.assert_array_equal(out_x[t].view(np.int64), ref_x.view(np.int64))
        np.testing.assert_array_equal(out_y[t].view(np.int64), ref_y.view(np.int64))


_grow_maps = None


def _compiled_grow_maps():
    global _grow_maps
    if _grow_maps is None:
        import numba

        from pipeline._kernels_warp import _SUMS, _grow_map, _grow_map_sparse

        _grow_maps = (numba.njit(**_SUMS)(lambda m, g, s: _grow_map(m, g, s)),
                      numba.njit(**_SUMS)(lambda m, g, s: _grow_map_sparse(m, g, s)))
    return _grow_maps


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), span=st.integers(2, 10), density=st.sampled_from([0.0, 0.002, 0.05, 0.6]),
       frame=st.booleans(), shape=st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_sparse_grow_map_equals_the_dense_map(seed, span, density, frame, shape):
    rng = np.random.default_rng(seed)
    msk = np.zeros(shape, np.uint32)
    msk[rng.random(shape) < density] |= EDGE
    msk[rng.random(shape) < 0.1] |= NO_DATA  # other bits are ignored
    if frame:
        msk[0, :] |= EDGE
        msk[:, -2:] |= EDGE
    dense, sparse = _compiled_grow_maps()
    ref = np.zeros(shape, np.uint8)
    for r in range(shape[0]):
        for c in range(shape[1]):
            ref[r, c] = ((msk[r : r + span, c : c + span] & EDGE) != 0).any()
    np.testing.assert_array_equal(dense(msk, np.uint32(EDGE), span), ref)
    np.testing.assert_array_equal(sparse(msk, np.uint32(EDGE), span), ref)


# ------------------------------------------------------------------------------------------
# source windows copied into per-thread buffers


def test_windows_reuse_one_buffer_per_thread_and_plane(rng):
    blocks = [[rng.normal(size=(30, 40)).astype(np.float32), rng.normal(size=(30, 25)).astype(np.float32)],
              [rng.normal(size=(11, 40)).astype(np.float32), rng.normal(size=(11, 25)).astype(np.float32)]]
    whole = np.block(blocks)
    a = W._window(blocks, ((3, 37), (5, 60)), np.float32, "image")
    np.testing.assert_array_equal(a, whole[3:37, 5:60])
    assert a.flags.c_contiguous
    b = W._window(blocks, ((0, 41), (0, 65)), np.float32, "image")  # larger: the buffer grows
    np.testing.assert_array_equal(b, whole)
    c = W._window(blocks, ((1, 9), (2, 30)), np.float32, "image")  # smaller: the same memory again
    np.testing.assert_array_equal(c, whole[1:9, 2:30])
    assert np.shares_memory(b, c)
    d = W._window(blocks, ((1, 9), (2, 30)), np.float64, "image")  # another dtype, another buffer
    assert d.dtype == np.float64 and not np.shares_memory(c, d)
    np.testing.assert_array_equal(d, whole[1:9, 2:30].astype(np.float64))
    assert not np.shares_memory(W._window(blocks, ((1, 9), (2, 30)), np.float32, "variance"), c)
    other = {}
    t = threading.Thread(target=lambda: other.update(w=W._window(blocks, ((1, 9), (2, 30)), np.float32, "image")))
    t.start()
    t.join()
    assert not np.shares_memory(other["w"], c)
    # one array: a contiguous crop of the right dtype is returned as it is, anything else copied
    assert np.shares_memory(W._window(whole, ((3, 9), (0, 65)), np.float32, "image"), whole)
    e = W._window(whole, ((3, 9), (4, 20)), np.float32, "image")
    assert not np.shares_memory(e, whole)
    np.testing.assert_array_equal(e, whole[3:9, 4:20])
    # above _SCRATCH_MAX elements a window gets its own array
    side = int(np.sqrt(W._SCRATCH_MAX)) + 1
    big = np.zeros((side, side + 3), np.float32)
    f = W._window([[big]], ((0, side), (0, side)), np.float32, "image")
    g = W._window([[big]], ((0, side), (0, side)), np.float32, "image")
    assert f.shape == (side, side) and not np.shares_memory(f, g)


def test_threaded_warp_with_reused_windows_equals_numpy(rng):
    src = make_tan_wcs(crpix=(30.0, 25.0))
    dst = make_tan_wcs(crpix=(41.3, 37.7), rotation_deg=23.0, scale_arcsec=0.21)
    img = rng.normal(100.0, 10.0, (70, 90)).astype(np.float32)
    msk = np.zeros(img.shape, np.uint32)
    msk[:, :2] = EDGE
    msk[40, 50] = NO_DATA
    ds = exposure(img, wcs=src, mask=msk)
    box = Box(-10, -5, 100, 90)
    ref = warp_exposure(ds, wcs=dst, box=box, chunks=(23, 29))
    lazy = warp_exposure(ds.chunk({"y": 37, "x": 41}), wcs=dst, box=box, chunks=(23, 29))
    import dask

    with dask.config.set(scheduler="threads", num_workers=4):
        got = lazy.compute()
    assert int(np.isfinite(ref.image.values).sum()) > 4000
    for v in ("image", "variance", "mask"):
        np.testing.assert_array_equal(got[v].values, ref[v].values)
