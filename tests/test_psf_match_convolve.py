"""The low-rank convolution's speed paths: tile plans, halo blocks read in place, float32 by default."""

import functools
import math

import dask
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydantic import ValidationError

from pipeline._kernels_convolve import (FFT_BACKENDS, Halo, _combine_lowrank, _load_halo, _smooth_length,
                                        correlate_direct, correlate_lowrank, kernel_spectra, plan_tiles)
from pipeline.model.geometry import Box
from pipeline.psf import GaussianPsf, GridPsf
from pipeline.psf_match import (ModelPsfMatchConfig, _kernel_arrays, _regions, _sample_counts, convolve_kernel_model,
                                model_psf_match, solve_kernel_model)
from pipeline.testing import assert_lazy, graph_size, raise_if_dask_computes
from tests.conftest import make_tan_wcs
from tests.test_psf_match import (F32, _chunk, _exposure, _kernel_l1, _lowrank_atol, _lowrank_kernels_at,
                                  _stars)

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


# ---------------------------------------------------------------------------------------------- regions


REGION = ModelPsfMatchConfig(low_rank_region=64)
EXACT = ModelPsfMatchConfig(convolution="exact")


@functools.lru_cache(maxsize=1)
def _region_case():
    """A strongly varying match (sigma 1.0 .. 2.8 over 200 x 230 px, spatial order 4) with stars on a sky."""
    sci = GaussianPsf(1.9, gradient=(0.005, -0.004), center=(110, 100))
    shape, x0, y0 = (200, 230), 7, -5
    rng = np.random.default_rng(21)
    stars = [(40, 30), (150, 60), (200, 170), (90, 120), (60, 165)]
    img = rng.normal(size=shape) * 5.0 + 300.0 + _stars(shape, sci, stars, 3e4, x0, y0)
    var = rng.uniform(0.5, 2.0, size=shape) + img / 100.0
    ds = _exposure(make_tan_wcs(), sci, shape=shape, x0=x0, y0=y0, image=img, variance=var)
    km, _ = solve_kernel_model(GridPsf.from_dataset(ds), GaussianPsf(3.2), Box.of(ds))
    return ds, km


def test_region_grid_is_anchored_and_covers_the_block():
    ebox = Box(7, -5, 237, 195)
    kern = {"exposure_box": ebox, "region": 64}
    got = _regions(Box(40, 50, 120, 58), kern)
    assert [(k, r) for k, r, _ in got] == [((0, 0), Box(7, -5, 71, 59)), ((0, 1), Box(71, -5, 135, 59))]
    assert [p for _, _, p in got] == [Box(40, 50, 71, 58), Box(71, 50, 120, 58)]
    got = _regions(Box(40, 50, 120, 60), kern)  # row 59 starts the next row of regions
    assert [r for _, r, _ in got] == [Box(7, -5, 71, 59), Box(71, -5, 135, 59), Box(7, 59, 71, 123),
                                      Box(71, 59, 135, 123)]
    assert sum(p.width * p.height for _, _, p in got) == 80 * 10
    # tail regions end with the exposure; one region (the exposure) when it is no larger than a region
    assert _regions(Box(230, 190, 237, 195), kern) == [((3, 3), Box(199, 187, 237, 195), Box(230, 190, 237, 195))]
    assert _regions(Box(40, 50, 120, 60), {"exposure_box": ebox, "region": 0}) == [(None, ebox, Box(40, 50, 120, 60))]
    assert _regions(Box(40, 50, 120, 60), {"exposure_box": ebox, "region": 240}) == [(None, ebox, Box(40, 50, 120, 60))]
    # samples at most the exposure-wide spacing apart
    assert _sample_counts(Box(0, 0, 1000, 500), ((4000 - 1) / 64, (4000 - 1) / 64)) == (17, 9)
    assert _sample_counts(Box(0, 0, 4000, 2), ((4000 - 1) / 64, 1.0)) == (65, 2)


def test_region_kernels_within_tolerance_at_every_pixel_and_keep_sums():
    """Per region: the applied kernel (and K²) within the tolerance of the exact one at every pixel, exact sums,
    and fewer images than the exposure-wide choice where the kernel varies less."""
    ds, km = _region_case()
    box = Box.of(ds)
    kern = _kernel_arrays(km, box, REGION)
    ranks = {"image": [], "variance": []}
    for key, region, _ in _regions(box, kern):
        ys, xs = np.mgrid[region.y0:region.y1:3, region.x0:region.x1:3]  # every third pixel of every region
        xs, ys = xs.ravel().astype(float), ys.ravel().astype(float)
        exact = np.array([km.kernel_image(x, y) for x, y in zip(xs, ys)])
        img, var = kern["regions"][key]["image"], kern["regions"][key]["variance"]
        assert img["error"] <= REGION.max_kernel_error / 2 and var["error"] <= REGION.max_variance_kernel_error / 2
        got = _lowrank_kernels_at(km, kern, img, xs, ys)
        assert np.abs(got - exact).sum(axis=(1, 2)).max() <= REGION.max_kernel_error
        np.testing.assert_allclose(got.sum(axis=(1, 2)), 1.0, rtol=0, atol=1e-12)
        got2 = _lowrank_kernels_at(km, kern, var, xs, ys, square=True)
        sq = (exact**2).sum(axis=(1, 2))
        assert (np.abs(got2 - exact**2).sum(axis=(1, 2)) / sq).max() <= REGION.max_variance_kernel_error
        np.testing.assert_allclose(got2.sum(axis=(1, 2)), sq, rtol=1e-12)
        ranks["image"].append(img["basis"].shape[0])
        ranks["variance"].append(var["basis"].shape[0])
    # measured: exposure-wide 8 / 7 images, per 64-px region 5..7 / 4..6
    whole = _kernel_arrays(km, box, REGION.model_copy(update={"low_rank_region": 0}))
    assert "regions" not in whole and whole["image"]["basis"].shape[0] == 8 and whole["variance"]["basis"].shape[0] == 7
    assert "image" not in kern and len(kern["regions"]) == 16
    assert max(ranks["image"]) <= 8 and np.mean(ranks["image"]) < 7
    assert max(ranks["variance"]) <= 7 and np.mean(ranks["variance"]) < 6


def test_region_constant_kernel_has_rank_one_everywhere(tan_wcs):
    ds = _exposure(tan_wcs, GaussianPsf(1.6), shape=(150, 170))
    km, _ = solve_kernel_model(GridPsf.from_dataset(ds), GaussianPsf(2.5), Box.of(ds),
                               config=ModelPsfMatchConfig(spatial_kernel_order=0))
    kern = _kernel_arrays(km, Box.of(ds), REGION)
    assert len(kern["regions"]) == 9
    for parts in kern["regions"].values():
        for part in parts.values():
            assert part["basis"].shape[0] == 1 and part["error"] < 1e-12


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_regions_within_bound_of_exact_and_chunk_invariant(precision):
    """|regions - exact| <= (tol + F32 L1(K)) x max|I - tile mean| at every pixel, in memory and on chunks that
    do not divide the image or the regions; chunked = in memory to the transforms' rounding (the images
    serving a pixel depend on its region only)."""
    ds, km = _region_case()
    cfg = REGION.model_copy(update={"fft_precision": precision})
    exact = convolve_kernel_model(ds, km, config=EXACT)
    eager = convolve_kernel_model(ds, km, config=cfg)
    whole = convolve_kernel_model(ds, km, config=cfg.model_copy(update={"low_rank_region": 0}))
    h = km.radius
    for name in ("image", "variance"):
        a = eager[name].values[h:-h, h:-h].astype(float)
        b = exact[name].values[h:-h, h:-h].astype(float)
        bound = _lowrank_atol(km, ds, name, cfg) + 2e-7 * np.abs(b)
        assert np.all(np.abs(a - b) <= bound), (name, float((np.abs(a - b) / bound).max()))
        # the regions change the result (the truncation differs from the exposure-wide one)
        assert np.abs(a - whole[name].values[h:-h, h:-h]).max() > 1e-3 * np.abs(b).max() * 1e-3
    for chunks in [(37, 41), (64, 64), (100, 230), (7, 9)]:  # (7, 9): below the kernel radius, map_overlap
        dsk = _chunk(ds, chunks)
        with raise_if_dask_computes():
            lazy = convolve_kernel_model(dsk, km, config=cfg)
        got = lazy.compute()
        for name in ("image", "variance"):
            a, b = got[name].values, eager[name].values
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            ok = np.isfinite(b)
            if precision == "float64":
                np.testing.assert_allclose(a[ok], b[ok], rtol=2.4e-7, atol=0)
            else:
                atol = 2 * F32 * _kernel_l1(km, ds, name == "variance") * float(np.ptp(ds[name].values))
                np.testing.assert_allclose(a[ok], b[ok], rtol=2.4e-7, atol=atol)
        np.testing.assert_array_equal(got["mask"].values, eager["mask"].values)
        assert_lazy(lambda: convolve_kernel_model(dsk, km, config=cfg))


def test_region_graph_size_unchanged():
    """Regions are chosen inside the block tasks: the graph is the one of the exposure-wide choice."""
    ds, km = _region_case()
    for chunks in [(100, 115), (37, 41)]:
        nchunks = math.ceil(200 / chunks[0]) * math.ceil(230 / chunks[1])
        a = convolve_kernel_model(_chunk(ds, chunks), km, config=REGION)
        b = convolve_kernel_model(_chunk(ds, chunks), km, config=REGION.model_copy(update={"low_rank_region": 0}))
        for name in ("image", "variance", "mask"):
            assert graph_size(a[name].data) == graph_size(b[name].data) <= 10 * nchunks


@pytest.mark.parametrize("update, message", [
    ({"low_rank_region": 10}, "low_rank_region must be 0 .whole exposure. or at least 64 px, got 10"),
    ({"low_rank_region": -1}, "greater than or equal to 0"),
    ({"low_rank_region": 2_000_000}, "less than or equal to 1000000"),
])
def test_region_config_validation(update, message):
    with pytest.raises(ValidationError, match=message):
        ModelPsfMatchConfig(**update)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lowrank_rect_fills_only_its_part(rng, dtype):
    """``rect`` computes that part of the output (its own tiles), equal to the full call there; ``out`` is filled."""
    ext, basis, rows, col, norm, want = _lowrank_case(rng)
    full = correlate_lowrank(ext, basis, rows, col, norm, 1, dtype=dtype)
    out = np.full(want.shape, -7.0, np.float32)
    got = correlate_lowrank(ext, basis, rows, col, norm, 1, dtype=dtype, rect=(10, 47, 5, 60), out=out)
    assert got is out
    tol = (1e-12 if dtype == np.float64 else 1e-6) * np.abs(want).max() + 1.2e-7 * np.abs(want).max()
    np.testing.assert_allclose(got[10:47, 5:60], full[10:47, 5:60], rtol=0, atol=tol)
    inside = np.zeros(want.shape, bool)
    inside[10:47, 5:60] = True
    assert np.all(got[~inside] == -7.0)
    # two rects tile the output: the full result
    out = np.zeros(want.shape, np.float32)
    correlate_lowrank(ext, basis, rows, col, norm, 1, dtype=dtype, rect=(0, 30, 0, want.shape[1]), out=out)
    correlate_lowrank(ext, basis, rows, col, norm, 1, dtype=dtype, rect=(30, want.shape[0], 0, want.shape[1]), out=out)
    np.testing.assert_allclose(out, want, rtol=0, atol=tol)
    with pytest.raises(ValueError, match=r"rect \(0, 80, 0, 10\) is not inside the output \(70, 83\)"):
        correlate_lowrank(ext, basis, rows, col, norm, 1, rect=(0, 80, 0, 10))
    with pytest.raises(ValueError, match=r"out must be float32 of shape \(70, 83\), got float64"):
        correlate_lowrank(ext, basis, rows, col, norm, 1, out=np.zeros(want.shape))


def test_kernel_spectra_equal_padded_transform(rng):
    kernels = rng.normal(size=(3, 9, 9))
    for fy, fx, dtype in ((64, 50, np.float64), (45, 72, np.float32)):
        padded = np.zeros((3, fy, fx))
        padded[:, :9, :9] = kernels[:, ::-1, ::-1]
        want = np.fft.rfft2(padded)
        got = kernel_spectra(kernels, fy, fx, dtype)
        assert got.shape == want.shape and got.dtype == (np.complex128 if dtype == np.float64 else np.complex64)
        np.testing.assert_allclose(got, want, rtol=0, atol=(1e-12 if dtype == np.float64 else 1e-5) * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fft_backends_agree(rng, dtype):
    """Every available tile-transform library gives the same correlation (to the transforms' rounding)."""
    ext, basis, rows, col, norm, want = _lowrank_case(rng)
    tol = (1e-12 if dtype == np.float64 else 1e-6) * np.abs(want).max() + 1.2e-7 * np.abs(want).max()
    for backend in FFT_BACKENDS:
        for tile in (None, 16):
            got = correlate_lowrank(ext, basis, rows, col, norm, 2, tile=tile, dtype=dtype, backend=backend)
            np.testing.assert_allclose(got, want / 2.0, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="FFT backend 'fftw' is not available"):
        correlate_lowrank(ext, basis, rows, col, norm, 1, backend="fftw")


def test_task_with_each_fft_backend_within_bound(monkeypatch):
    """The task's default (ducc0) and scipy agree within twice the float32 rounding bound."""
    import pipeline._kernels_convolve as kc

    ds, km = _region_case()
    got = {}
    for backend in ("scipy", "ducc0"):
        monkeypatch.setattr(kc, "FFT_BACKENDS", (backend,))
        got[backend] = convolve_kernel_model(ds, km, config=REGION)
    for name in ("image", "variance"):
        a, b = got["scipy"][name].values, got["ducc0"][name].values
        ok = np.isfinite(a)
        np.testing.assert_array_equal(ok, np.isfinite(b))
        atol = 2 * F32 * _kernel_l1(km, ds, name == "variance") * float(np.ptp(ds[name].values))
        np.testing.assert_allclose(a[ok], b[ok], rtol=2.4e-7, atol=atol)
        assert np.abs(a[ok] - b[ok]).max() > 0  # two libraries really ran


@functools.lru_cache(maxsize=1)
def _region_eager():
    ds, km = _region_case()
    return convolve_kernel_model(ds, km, config=REGION)


@settings(max_examples=8, deadline=None)
@given(cy=st.integers(6, 200), cx=st.integers(6, 230))  # below the radius (10): map_overlap blocks
def test_property_region_results_do_not_depend_on_chunks(cy, cx):
    ds, km = _region_case()
    eager = _region_eager()
    got = convolve_kernel_model(_chunk(ds, (cy, cx)), km, config=REGION).compute()
    for name in ("image", "variance"):
        atol = 2 * F32 * _kernel_l1(km, ds, name == "variance") * float(np.ptp(ds[name].values))
        np.testing.assert_allclose(got[name].values, eager[name].values, rtol=2.4e-7, atol=atol, equal_nan=True)
    np.testing.assert_array_equal(got["mask"].values, eager["mask"].values)


# ---------------------------------------------------------------------------------------------- tile load


def _load_case(seed, ny, nx, cuts_y, cuts_x, missing, dtype):
    rng = np.random.default_rng(seed)
    ext = (300.0 + 40.0 * rng.normal(size=(ny, nx))).astype(dtype)
    halo = _halo_of(ext, cuts_y, cuts_x, missing)
    return ext, halo


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), ny=st.integers(6, 40), nx=st.integers(6, 40), dtype=st.sampled_from(["f4", "f8"]),
       data=st.data())
def test_property_halo_load_is_window_minus_its_mean(seed, ny, nx, dtype, data):
    """The tile buffer holds the window minus ``c`` (one rounding), missing pieces read 0, and ``c`` is
    the buffer dtype's rounding of the mean of the window's data; what lies past the window is untouched."""
    dt = np.dtype(dtype)
    cy = sorted(data.draw(st.lists(st.integers(0, ny), min_size=2, max_size=2)))
    cx = sorted(data.draw(st.lists(st.integers(0, nx), min_size=2, max_size=2)))
    missing = set(data.draw(st.lists(st.sampled_from([(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)]),
                                     max_size=4)))
    ya, yb = sorted(data.draw(st.lists(st.integers(0, ny), min_size=2, max_size=2, unique=True)))
    xa, xb = sorted(data.draw(st.lists(st.integers(0, nx), min_size=2, max_size=2, unique=True)))
    ext, halo = _load_case(seed, ny, nx, cy, cx, missing, dt)
    present = halo.assemble(np.nan, dt)[ya:yb, xa:xb]
    is_data = np.isfinite(present)
    buf = np.full((yb - ya + 3, xb - xa + 2), -7.0, dtype=dt)
    c = _load_halo(buf, halo, ya, yb, xa, xb)
    want_c = float(present[is_data].astype(np.float64).mean()) if is_data.any() else 0.0
    assert c == float(dt.type(c))  # exactly representable: the subtraction is the only rounding
    np.testing.assert_allclose(c, want_c, rtol=4 * np.finfo(dt).eps, atol=0)
    win = buf[: yb - ya, : xb - xa]
    np.testing.assert_array_equal(win[is_data], (present[is_data] - dt.type(c)).astype(dt))
    np.testing.assert_array_equal(win[~is_data], 0)
    assert (buf[yb - ya:] == -7.0).all() and (buf[:, xb - xa:] == -7.0).all()


def test_halo_load_constant_input_comes_back_exactly():
    """A constant input: ``c`` is the constant, the tile is all zeros, and the image (``W_R = N``) and
    variance outputs are the constant and constant / N to float32 rounding on every tile (block edges
    with missing pieces included)."""
    rng = np.random.default_rng(3)
    n_r, k, ny, nx = 3, 9, 70, 83
    h = k // 2
    ext = np.full((ny + 2 * h, nx + 2 * h), 812.25, np.float32)
    halo = _halo_of(ext, (h, ny + h), (h, nx + h), missing={(0, 0), (0, 1), (1, 0)})
    buf = np.full((40, 40), 5.0, np.float32)
    assert _load_halo(buf, halo, 0, 30, 0, 35) == 812.25
    assert not buf[:30, :35].any()
    basis = rng.normal(size=(n_r, k, k))
    col = np.array([np.ones(nx), np.linspace(-1, 1, nx)])
    norm = np.array([np.full(ny, 2.0), 0.3 * np.linspace(-1, 1, ny)])
    rows = rng.normal(size=(n_r + 1, 2, ny))
    rows[n_r] = norm
    nfield = np.einsum("ay,ax->yx", norm, col)
    valid = (h, ext.shape[0], h, ext.shape[1])
    for power, want in ((1, np.full((ny, nx), 812.25)), (2, 812.25 / nfield)):
        got = correlate_lowrank(halo, basis, rows, col, norm, power, tile=30, valid=valid)
        np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)


@pytest.mark.parametrize("power", [1, 2])
def test_halo_path_within_float32_bound_of_float64_at_block_edges(rng, power):
    """The Halo path (float32 tiles, the window mean of all pieces as ``c``) against the float64
    direct correlation, tiles crossing the piece boundaries and missing pieces on two sides."""
    ext, basis, rows, col, norm, want = _lowrank_case(rng)
    if power == 2:
        want = want / 2.0
    h = basis.shape[1] // 2
    ny, nx = want.shape
    bottom = {(2, 0), (2, 1), (2, 2)}
    halo = _halo_of(ext, (h + 17, ext.shape[0] - h - 9), (h + 5, ext.shape[1] - h - 21), missing=bottom)
    valid = (0, ext.shape[0] - h - 9, 0, ext.shape[1])
    got = correlate_lowrank(halo, basis, rows, col, norm, power, tile=23, valid=valid, dtype=np.float32)
    reach = ny - h - 9  # outputs whose window stays above the missing bottom row of pieces
    tol = 1e-6 * np.abs(want).max() + 1.2e-7 * np.abs(want).max()
    np.testing.assert_allclose(got[:reach], want[:reach], rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------- combine


def _combine_reference(convs, c, dep_rows, dep_cols, const_rows, norm_rows, col_terms, power, y0, y1, x0, x1, off,
                       const_is_norm):
    """The combine in float64 from the same inputs, and the float32 error scale of each output."""
    conv = np.asarray(convs, np.float64)[:, off:off + y1 - y0, off:off + x1 - x0]
    w = np.einsum("ray,ax->ryx", dep_rows[:, :, y0:y1].astype(np.float64), dep_cols[:, x0:x1].astype(np.float64))
    acc = (w * conv).sum(axis=0)
    scale = (np.einsum("ray,ax->ryx", np.abs(dep_rows[:, :, y0:y1]).astype(np.float64),
                       np.abs(dep_cols[:, x0:x1]).astype(np.float64)) * np.abs(conv)).sum(axis=0)
    nrm = norm_rows[:, y0:y1].T @ col_terms[: norm_rows.shape[0], x0:x1]
    if const_is_norm:
        want = (acc / nrm + c) / nrm ** (power - 1)
    else:
        want = (acc + c * (const_rows[:, y0:y1].T @ col_terms[:, x0:x1])) / nrm**power
    n_terms = dep_rows.shape[0] + dep_rows.shape[1] + 2
    return want, n_terms * scale / np.abs(nrm) ** power + np.abs(want)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n_r=st.integers(0, 4), n_a=st.integers(1, 9), n_n=st.integers(1, 9),
       power=st.sampled_from([1, 2]), const_is_norm=st.booleans(), as_tuple=st.booleans(), data=st.data())
def test_property_combine_within_float32_rounding_of_float64(seed, n_r, n_a, n_n, power, const_is_norm, as_tuple,
                                                              data):
    """Every count of components and axis terms (odd and even: the passes take two terms at a time and
    fuse the last odd one with the product), both powers, the constant as the normaliser or not, tiles
    anywhere in the block (its edges included): float32 rounding of the float64 result."""
    rng = np.random.default_rng(seed)
    ny, nx, off = 37, 45, data.draw(st.integers(0, 4))
    n_n = min(n_n, n_a)
    y0 = data.draw(st.integers(0, ny - 1))
    y1 = data.draw(st.integers(y0 + 1, ny))
    x0 = data.draw(st.integers(0, nx - 1))
    x1 = data.draw(st.integers(x0 + 1, nx))
    fy, fx = y1 - y0 + 2 * off + 1, x1 - x0 + 2 * off + 3
    convs = rng.normal(size=(n_r, fy, fx)).astype(np.float32)
    dep_rows = rng.normal(size=(n_r, n_a, ny)).astype(np.float32)
    col_terms = np.vstack([np.ones(nx), rng.uniform(-1, 1, size=(n_a - 1, nx))])
    dep_cols = col_terms.astype(np.float32)
    norm_rows = np.vstack([np.full(ny, 3.0), 0.2 * rng.normal(size=(n_n - 1, ny))])
    const_rows = np.zeros((n_a, ny))
    const_rows[:n_n] = norm_rows if const_is_norm else rng.normal(size=(n_n, ny))
    c = float(np.float32(rng.normal(scale=50.0)))
    out = np.full((ny, nx), -5.0, np.float32)
    conv_arg = tuple(convs) if as_tuple and n_r else convs  # the scipy backend hands a tuple
    _combine_lowrank(out, conv_arg, c, dep_rows, dep_cols, const_rows, norm_rows, col_terms, power, y0, y1, x0, x1,
                     off, const_is_norm)
    want, scale = _combine_reference(convs, c, dep_rows, dep_cols, const_rows, norm_rows, col_terms, power, y0, y1,
                                     x0, x1, off, const_is_norm)
    err = np.abs(out[y0:y1, x0:x1] - want)
    assert (err <= 2 * np.finfo(np.float32).eps * scale).all(), float((err / scale).max())
    rest = np.ones((ny, nx), bool)
    rest[y0:y1, x0:x1] = False
    assert (out[rest] == -5.0).all()
