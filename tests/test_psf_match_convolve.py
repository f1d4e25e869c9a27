"""The low-rank convolution's speed paths: tile plans, halo blocks read in place, float32 by default."""

import functools
import math

import dask
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline._kernels_convolve import Halo, _smooth_length, correlate_direct, correlate_lowrank, plan_tiles
from pipeline.model.geometry import Box
from pipeline.psf import GaussianPsf, GridPsf
from pipeline.psf_match import ModelPsfMatchConfig, convolve_kernel_model, model_psf_match, solve_kernel_model
from pipeline.testing import assert_lazy, graph_size, raise_if_dask_computes
from tests.conftest import make_tan_wcs
from tests.test_psf_match import F32, _chunk, _exposure, _kernel_l1

F64 = ModelPsfMatchConfig(fft_precision="float64")


def _lowrank_case(rng, n_r=3, k=9, ny=70, nx=83, level=500.0):
    h = k // 2
    ext = level + rng.normal(size=(ny + 2 * h, nx + 2 * h))
    basis = rng.normal(size=(n_r, k, k))
    rows = rng.normal(size=(n_r + 1, 2, ny))
    rows[n_r] = np.tensordot(basis.sum(axis=(1, 2)), rows[:n_r], axes=1)  # the constant goes through the sum
    col = np.array([np.ones(nx), np.linspace(-1, 1, nx)])
    norm = np.array([np.full(ny, 2.0), np.zeros(ny)])
    want = sum(np.einsum("ay,ax->yx", rows[r], col) * correlate_direct(ext, basis[r]) for r in range(n_r)) / 2.0
    return ext, basis, rows, col, norm, want


def _halo_of(ext, cut_y, cut_x, missing=()):
    """``ext`` cut into a Halo whose centre spans rows ``cut_y`` and columns ``cut_x`` of ``ext``."""
    ey = (0, cut_y[0], cut_y[1], ext.shape[0])
    ex = (0, cut_x[0], cut_x[1], ext.shape[1])
    pieces = tuple(tuple(None if (i, j) in missing else ext[ey[i]:ey[i + 1], ex[j]:ex[j + 1]] for j in range(3))
                   for i in range(3))
    return Halo(pieces, ey, ex)


# ---------------------------------------------------------------------------------------------- tile plan


@settings(max_examples=60, deadline=None)
@given(ny=st.integers(1, 3000), nx=st.integers(1, 3000), h=st.integers(1, 50))
def test_property_tile_plan_covers_and_fits(ny, nx, h):
    ty, fy, tx, fx = plan_tiles(ny, nx, h)
    for n, t, f in ((ny, ty, fy), (nx, tx, fx)):
        count = math.ceil(n / t)
        assert 1 <= t <= n and count * t >= n and (count - 1) * t < n  # tiles spread evenly, none empty
        assert f >= t + 2 * h and _smooth_length(f) == f  # no wrap-around into valid outputs, fast length


def test_tile_plan_prefers_measured_cheap_lengths():
    # 1000-px benchmark blocks, radius 10: 4 x 250 on 270-long transforms
    assert plan_tiles(1000, 1000, 10) == (250, 270, 250, 270)
    # a long axis takes 256-long transforms (236 outputs each), the cheapest per output pixel measured
    assert plan_tiles(4000, 4000, 10) == (236, 256, 236, 256)
    # small blocks: one tile each
    assert plan_tiles(37, 41, 10) == (37, 64, 41, 64)


# ---------------------------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("tile", [None, 16])
def test_lowrank_valid_region_and_skipped_pixels(rng, dtype, tile):
    """Pixels outside ``valid`` or non-finite (``check``) never reach the outputs that do not see them."""
    ext, basis, rows, col, norm, want = _lowrank_case(rng)
    h = basis.shape[1] // 2
    tol = (1e-12 if dtype == np.float64 else 1e-6) * np.abs(want).max()
    got = correlate_lowrank(ext, basis, rows, col, norm, 1, tile=tile, dtype=dtype)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol + 1.2e-7 * np.abs(want).max())
    bad = ext.copy()
    bad[:6] = 1e9  # outside valid: rows 0..5
    bad[:, -3:] = -1e9
    got = correlate_lowrank(bad, basis, rows, col, norm, 1, tile=tile, dtype=dtype,
                            valid=(6, bad.shape[0], 0, bad.shape[1] - 3))
    keep = np.s_[6:, : want.shape[1] - 3]
    np.testing.assert_allclose(got[keep], want[keep], rtol=0, atol=tol + 1.2e-7 * np.abs(want).max())
    bad = ext.copy()
    bad[30, 40], bad[50, 20] = np.nan, -np.inf
    got = correlate_lowrank(bad, basis, rows, col, norm, 1, tile=tile, dtype=dtype, check=True)
    far = np.ones(want.shape, bool)
    far[30 - 2 * h:31, 40 - 2 * h:41] = False
    far[50 - 2 * h:51, 20 - 2 * h:21] = False
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[far], want[far], rtol=0, atol=tol + 1.2e-7 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_halo_input_equals_assembled_block(rng, dtype):
    """A Halo read piece by piece gives the halo'd array's result (up to the transforms' rounding)."""
    ext, basis, rows, col, norm, want = _lowrank_case(rng)
    h = basis.shape[1] // 2
    halo = _halo_of(ext, (h, ext.shape[0] - h), (h, ext.shape[1] - h))
    assert halo.shape == ext.shape
    np.testing.assert_array_equal(halo.assemble(0.0, ext.dtype), ext)
    tol = (1e-12 if dtype == np.float64 else 1e-6) * np.abs(want).max()
    for tile in (None, 16, 30):
        got = correlate_lowrank(halo, basis, rows, col, norm, 1, tile=tile, dtype=dtype)
        np.testing.assert_allclose(got, want, rtol=0, atol=tol + 1.2e-7 * np.abs(want).max())
    # missing pieces (the exposure ends there) enter like pixels outside ``valid``: the outputs that
    # do not reach them (rows >= h) are those of the full input
    halo = _halo_of(ext, (h, ext.shape[0] - h), (h, ext.shape[1] - h), missing={(0, 0), (0, 1), (0, 2)})
    got = correlate_lowrank(halo, basis, rows, col, norm, 1, dtype=dtype, valid=(h, ext.shape[0], 0, ext.shape[1]))
    np.testing.assert_allclose(got[h:], want[h:], rtol=0, atol=tol + 1.2e-7 * np.abs(want).max())
    with pytest.raises(ValueError, match="must be finite"):
        correlate_lowrank(halo, basis, rows, col, norm, 1, check=True)
    with pytest.raises(ValueError, match="must have 4 rows"):
        correlate_lowrank(ext, basis, rows[:3], col, norm, 1)


# ---------------------------------------------------------------------------------------------- task


def _star_field(tan_wcs, shape=(160, 190), seed=5):
    """Sky 1e3 with noise and a few bright stars (peaks up to 5e4): a large dynamic range per tile."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = 1e3 + rng.normal(scale=5.0, size=shape)
    for y, x, f in ((40, 50, 5e5), (120, 150, 2e5), (80, 20, 1e5)):
        image += f / (2 * np.pi * 1.8**2) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.8**2))
    variance = image / 4.0
    sci = GaussianPsf(1.8, gradient=(0.002, 0.001), center=(90, 80))
    return _exposure(tan_wcs, sci, shape=shape, image=image, variance=variance)


@functools.lru_cache(maxsize=1)
def _star_case():
    """The star field and its kernel model matching it to a sigma-3 Gaussian (solved once)."""
    ds = _star_field(make_tan_wcs())
    km, _ = solve_kernel_model(GridPsf.from_dataset(ds), GaussianPsf(3.0), Box.of(ds))
    return ds, km


def test_float32_default_within_stated_bound_of_float64():
    """Default float32 transforms: |f32 - f64| <= F32 x L1(K) x max|input - tile mean| (+ output rounding)."""
    assert ModelPsfMatchConfig().fft_precision == "float32"
    ds, km = _star_case()
    f32 = convolve_kernel_model(ds, km)
    f64 = convolve_kernel_model(ds, km, config=F64)
    for name in ("image", "variance"):
        a, b = f32[name].values, f64[name].values
        ok = np.isfinite(b)
        np.testing.assert_array_equal(np.isfinite(a), ok)
        spread = float(np.ptp(ds[name].values))
        bound = F32 * _kernel_l1(km, ds, name == "variance") * spread + 1.2e-7 * np.abs(b[ok])
        diff = np.abs(a[ok] - b[ok])
        assert np.all(diff <= bound), (name, float((diff / bound).max()))
        # and the bound is not idle: float32 rounding is there, at a small fraction of it
        assert diff.max() > 0
    np.testing.assert_array_equal(f32["mask"].values, f64["mask"].values)


@pytest.mark.parametrize("chunks", [(37, 41), (64, 190), (7, 9)])
def test_halo_blocks_numpy_dask_equal_and_lazy(chunks):
    """Chunked (halo blocks, or map_overlap when chunks are below the kernel radius) = in-memory."""
    ds, km = _star_case()
    ds = ds.copy(deep=True)
    ds["image"].values[100, 60] = np.nan  # non-finite blocks take the assembling path
    ds["variance"].values[30, 170] = np.inf
    for cfg in (F64, ModelPsfMatchConfig()):
        eager = convolve_kernel_model(ds, km, config=cfg)
        dsk = _chunk(ds, chunks)
        with raise_if_dask_computes():
            lazy = convolve_kernel_model(dsk, km, config=cfg)
        got = lazy.compute()
        for name in ("image", "variance"):
            a, b = got[name].values, eager[name].values
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            np.testing.assert_array_equal(np.isinf(a), np.isinf(b))
            ok = np.isfinite(b)
            if cfg.fft_precision == "float64":  # float64 transforms round below the float32 output
                np.testing.assert_allclose(a[ok], b[ok], rtol=1.2e-7, atol=0)
            else:  # each side within the stated float32 bound of the float64 result
                spread = float(np.ptp(ds[name].values[np.isfinite(ds[name].values)]))
                atol = 2 * F32 * _kernel_l1(km, ds, name == "variance") * spread
                np.testing.assert_allclose(a[ok], b[ok], rtol=2.4e-7, atol=atol)
        np.testing.assert_array_equal(got["mask"].values, eager["mask"].values)
        assert_lazy(lambda: convolve_kernel_model(dsk, km, config=cfg))


def test_halo_graph_size_and_lazy_kernel(tan_wcs):
    """Halo blocks: at most 8 strips + 1 task per block and plane, no concatenation tasks."""
    ds = _exposure(tan_wcs, GaussianPsf(1.8), shape=(200, 220))
    km, _ = solve_kernel_model(GridPsf.from_dataset(ds), GaussianPsf(3.0), Box.of(ds))
    for chunks in [(100, 110), (50, 55), (37, 41)]:
        nchunks = math.ceil(200 / chunks[0]) * math.ceil(220 / chunks[1])
        out = convolve_kernel_model(_chunk(ds, chunks), km)
        for name in ("image", "variance", "mask"):
            size = graph_size(out[name].data)
            assert size <= 10 * nchunks, (name, chunks, size)
            names = {k[0] if isinstance(k, tuple) else k for k in dict(out[name].data.__dask_graph__())}
            assert not any(n.startswith(("overlap-", "concatenate")) for n in names)
    # a lazy PSF grid: the solve is one delayed task that every block depends on
    dsk = _chunk(ds, (50, 55))
    dsk["psf"] = ds["psf"].chunk()
    with raise_if_dask_computes():
        lazy, _ = model_psf_match(dsk, GaussianPsf(3.0))
    eager, _ = model_psf_match(ds, GaussianPsf(3.0))
    got = dask.compute(lazy["image"].data, lazy["variance"].data, lazy["mask"].data)
    for a, name in zip(got, ("image", "variance", "mask")):
        np.testing.assert_allclose(a, eager[name].values, rtol=1e-5, atol=1e-6, equal_nan=True)
