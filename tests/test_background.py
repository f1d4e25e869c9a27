"""Binned background model: grid layout, interpolants, closed-form backgrounds, laziness, errors."""

from __future__ import annotations

import dask
import numpy as np
import pydantic
import pytest
import scipy.interpolate
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import _kernels_background as K
from pipeline.background import (
    BackgroundConfig,
    cell_layout,
    fit_background,
    fixed_edge_layout,
    subtract_background,
)
from pipeline.errors import DataQualityError, SchemaError
from pipeline.model.masks import MaskPlane
from pipeline.model.schema import make_dataset
from pipeline.testing import assert_lazy, assert_numpy_dask_equal, graph_size, raise_if_dask_computes
from tests.conftest import make_tan_wcs

AKIMA = BackgroundConfig(bin_size=32, use_approx=False)


def _ds(image, mask=None, *, x0=0, y0=0, attrs=None):
    image = np.asarray(image, dtype=np.float32)
    mask = np.zeros(image.shape, np.uint32) if mask is None else mask
    return make_dataset(image, np.ones_like(image), mask, wcs=make_tan_wcs(), x0=x0, y0=y0,
                        attrs=attrs or {"visit": 7, "detector": 3})


def _quadratic(h, w, x0=0, y0=0):
    y, x = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float64)
    xl, yl = x - x0, y - y0
    a, b, c = 2e-4, -1.5e-4, 3e-4
    q = 20.0 + 0.03 * xl - 0.02 * yl + a * xl * xl + b * xl * yl + c * yl * yl
    return q, (a, b, c)


# ------------------------------------------------------------------ grid layout


def test_cell_layout_awkward_sizes():
    edges, centres = cell_layout(10, 3)
    np.testing.assert_array_equal(edges, [0, 3, 7, 10])
    np.testing.assert_allclose(centres, [1.0, 4.5, 8.0])
    edges, _ = cell_layout(1001, 8)
    np.testing.assert_array_equal(np.diff(edges), [125, 125, 125, 126, 125, 125, 125, 125])
    edges, centres = cell_layout(1000, 8)
    np.testing.assert_array_equal(np.diff(edges), [125] * 8)
    np.testing.assert_allclose(centres, 62.0 + 125 * np.arange(8))
    np.testing.assert_array_equal(fixed_edge_layout(600, 256), [0, 256, 512, 600])


@given(size=st.integers(1, 5000), data=st.data())
@settings(max_examples=200, deadline=None)
def test_cell_layout_partitions(size, data):
    n = data.draw(st.integers(1, size))
    edges, centres = cell_layout(size, n)
    assert edges[0] == 0 and edges[-1] == size and len(edges) == n + 1
    sizes = np.diff(edges)
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    i = np.arange(n)
    np.testing.assert_array_equal(edges[1:], np.minimum(((i + 1) * size + n // 2) // n, size))
    np.testing.assert_allclose(centres, edges[:-1] + sizes / 2 - 0.5)


def test_grid_counts_follow_bin_size():
    model = fit_background(_ds(np.zeros((100, 300))), config=BackgroundConfig(bin_size=128, use_approx=False))
    assert model.shape == (1, 3)
    model = fit_background(_ds(np.zeros((100, 300))), config=BackgroundConfig(bin_size_x=64, bin_size_y=30,
                                                                              use_approx=False))
    assert model.shape == (4, 5)
    np.testing.assert_array_equal(model.y_edges, [0, 25, 50, 75, 100])


# ------------------------------------------------------------------ 1-D interpolants


def test_akima_matches_reference_end_rules(rng):
    # scipy's Akima1DInterpolator uses the same extrapolated end slopes as the reference's (GSL) Akima
    x = np.sort(rng.uniform(0, 100, 9))
    y = rng.normal(size=9)
    b, c, d = K.interp_coeffs(x, y, K.STYLE_AKIMA)
    q = np.linspace(x[0], x[-1], 301)
    out = np.empty_like(q)
    K.interp_eval(x, y, b, c, d, K.STYLE_AKIMA, q, out)
    ref = scipy.interpolate.Akima1DInterpolator(x, y)
    np.testing.assert_allclose(out, ref(q), rtol=1e-10, atol=1e-12)


def test_natural_spline_matches_scipy(rng):
    x = np.sort(rng.uniform(0, 50, 6))
    y = rng.normal(size=6)
    b, c, d = K.interp_coeffs(x, y, K.STYLE_SPLINE)
    q = np.linspace(x[0], x[-1], 101)
    out = np.empty_like(q)
    K.interp_eval(x, y, b, c, d, K.STYLE_SPLINE, q, out)
    np.testing.assert_allclose(out, scipy.interpolate.CubicSpline(x, y, bc_type="natural")(q), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("style", [K.STYLE_LINEAR, K.STYLE_SPLINE, K.STYLE_AKIMA])
def test_quadratic_extrapolation_from_end_knots(rng, style):
    x = np.arange(7, dtype=np.float64) * 10.0 + 5.0
    y = rng.normal(size=7)
    b, c, d = K.interp_coeffs(x, y, style)
    q = np.array([-7.0, 0.0, 80.0, 93.5])
    out = np.empty_like(q)
    K.interp_eval(x, y, b, c, d, style, q, out)
    # derivatives at the end knots from the end segments
    h = x[-1] - x[-2]
    d1_hi = b[-1] + 2 * c[-1] * h + 3 * d[-1] * h * h
    d2_hi = 2 * c[-1] + 6 * d[-1] * h
    expect_lo = y[0] + (q[:2] - x[0]) * b[0] + 0.5 * (q[:2] - x[0]) ** 2 * 2 * c[0]
    expect_hi = y[-1] + (q[2:] - x[-1]) * d1_hi + 0.5 * (q[2:] - x[-1]) ** 2 * d2_hi
    np.testing.assert_allclose(out, np.concatenate([expect_lo, expect_hi]), rtol=1e-12)
    if style == K.STYLE_AKIMA:  # cross-check with scipy's derivatives of the same interpolant
        ref = scipy.interpolate.Akima1DInterpolator(x, y)
        dt = q[3] - x[-1]
        np.testing.assert_allclose(out[3], y[-1] + dt * ref(x[-1], 1) + 0.5 * dt * dt * ref(x[-1], 2), rtol=1e-10)
    if style == K.STYLE_SPLINE:  # natural ends: zero curvature, so linear extrapolation
        np.testing.assert_allclose(2 * c[0], 0.0, atol=1e-14)
        np.testing.assert_allclose(d2_hi, 0.0, atol=1e-12)


def test_constant_style_steps():
    x = np.array([0.0, 10.0, 20.0])
    y = np.array([1.0, 3.0, 7.0])
    b, c, d = K.interp_coeffs(x, y, K.STYLE_CONSTANT)
    q = np.array([-5.0, 4.9, 5.0, 14.9, 15.0, 20.0, 20.5, 30.0])
    out = np.empty_like(q)
    K.interp_eval(x, y, b, c, d, K.STYLE_CONSTANT, q, out)
    np.testing.assert_allclose(out, [1.0, 1.0, 2.0, 2.0, 5.0, 5.0, 7.0, 7.0])


# ------------------------------------------------------------------ closed-form backgrounds


@pytest.mark.parametrize("config", [
    BackgroundConfig(bin_size=32, use_approx=False),
    BackgroundConfig(bin_size=32, use_approx=False, algorithm="NATURAL_SPLINE"),
    BackgroundConfig(bin_size=32, use_approx=True, approx_order_x=2),
    BackgroundConfig(bin_size=32, use_approx=True, weighting=False),
])
def test_constant_and_plane_recovered_exactly(config):
    h, w = 160, 224
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    for truth in (np.full((h, w), 12.5), 40.0 + 0.05 * x - 0.03 * y):
        model = fit_background(_ds(truth), config=config)
        # the weighted fit needs finite errors: a noise-free image has error 0 in every cell
        if config.use_approx and config.weighting:
            noisy = truth + np.random.default_rng(3).normal(0, 1e-3, truth.shape)
            model = fit_background(_ds(noisy), config=config)
            np.testing.assert_allclose(model.evaluate().values, truth, atol=2e-3)
        else:
            np.testing.assert_allclose(model.evaluate().values, truth, rtol=0, atol=2e-4)


@pytest.mark.parametrize("use_approx", [False, True])
def test_quadratic_recovered_in_closed_form(use_approx):
    # equal 32-pixel cells: the mean of a quadratic over a cell is its value at the centre plus
    # a (s**2 - 1) / 12 + c (s**2 - 1) / 12; Akima (uniform knots) and an order-2 Chebyshev both
    # reproduce quadratics exactly, including the quadratic extrapolation to the image edge
    h, w = 192, 256
    q, (a, b, c) = _quadratic(h, w)
    offset = (a + c) * (32**2 - 1) / 12.0
    cfg = BackgroundConfig(bin_size=32, use_approx=use_approx, approx_order_x=2, weighting=False,
                           statistic="MEAN")
    model = fit_background(_ds(q), config=cfg)
    np.testing.assert_allclose(model.evaluate().values, q + offset, rtol=0, atol=2e-4)


def test_noisy_quadratic_within_cell_noise(rng):
    h, w = 256, 256
    q, (a, b, c) = _quadratic(h, w)
    sigma = 2.0
    img = q + rng.normal(0, sigma, q.shape)
    for cfg in (BackgroundConfig(bin_size=32, use_approx=False), BackgroundConfig(bin_size=32, approx_order_x=4)):
        est = fit_background(_ds(img), config=cfg).evaluate().values
        cell_sigma = sigma / 32.0
        err = est - (q + (a + c) * (32**2 - 1) / 12.0)
        assert np.sqrt(np.mean(err**2)) < 2.0 * cell_sigma


def test_sources_are_clipped_and_masked_pixels_ignored(rng):
    h, w = 128, 128
    img = 5.0 + rng.normal(0, 1.0, (h, w))
    mask = np.zeros((h, w), np.uint32)
    img[40:48, 40:48] += 1e4
    mask[40:48, 40:48] = MaskPlane.DETECTED
    img[100, 100] = 1e6  # an unmasked hot pixel: removed by the clipping of MEANCLIP
    bg = fit_background(_ds(img, mask), config=AKIMA).evaluate().values
    assert np.abs(bg - 5.0).max() < 0.25


def test_nan_cells_are_dropped():
    h, w = 160, 224
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    truth = 40.0 + 0.05 * x - 0.03 * y
    mask = np.zeros((h, w), np.uint32)
    mask[64:96, 96:128] = MaskPlane.BAD  # one whole cell
    img = truth.copy()
    img[0:32, 0:32] = np.nan  # another whole cell, non-finite
    model = fit_background(_ds(img, mask), config=AKIMA)
    cells = model.statistic.compute()
    assert np.isnan(cells[2, 3]) and np.isnan(cells[0, 0]) and np.isfinite(cells).sum() == cells.size - 2
    np.testing.assert_array_equal(model.npoint.compute()[2, 3], 0)
    np.testing.assert_allclose(model.evaluate().values, truth, atol=2e-4)


def test_evaluate_on_subwindow_and_offset_origin():
    h, w = 160, 224
    q, _ = _quadratic(h, w, x0=1000, y0=-50)
    ds = _ds(q, x0=1000, y0=-50)
    model = fit_background(ds, config=AKIMA)
    full = model.evaluate()
    assert int(full.x[0]) == 1000 and int(full.y[0]) == -50
    sub = ds.isel(y=slice(17, 90), x=slice(33, 150)).chunk({"y": 20, "x": 50})
    part = model.evaluate(like=sub)
    np.testing.assert_array_equal(part.values, full.isel(y=slice(17, 90), x=slice(33, 150)).values)
    np.testing.assert_array_equal(part.x.values, sub.x.values)


# ------------------------------------------------------------------ undersampling and errors


def test_spline_undersample_rules():
    img = _ds(np.ones((96, 96)))
    with pytest.raises(ValueError, match=r"too few cells \(3x3\) for AKIMA_SPLINE, which needs 5"):
        fit_background(img, config=BackgroundConfig(bin_size=32, use_approx=False,
                                                    undersample_style="THROW_EXCEPTION"))
    with pytest.raises(ValueError, match="INCREASE_NXNYSAMPLE is not supported for interpolation"):
        fit_background(img, config=BackgroundConfig(bin_size=32, use_approx=False,
                                                    undersample_style="INCREASE_NXNYSAMPLE"))
    for bins, style in ((32, "CUBIC_SPLINE"), (48, "LINEAR"), (96, "CONSTANT"), (24, "CUBIC_SPLINE"),
                        (19, "AKIMA_SPLINE")):
        model = fit_background(img, config=BackgroundConfig(bin_size=bins, use_approx=False))
        assert model.style == style
        np.testing.assert_allclose(model.evaluate().values, 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="algorithm NONE cannot be evaluated"):
        fit_background(img, config=BackgroundConfig(use_approx=False, algorithm="NONE"))


def test_chebyshev_undersample_rules():
    img = _ds(np.ones((256, 256)))
    with pytest.raises(ValueError, match=r"too few cells \(4x4\) to constrain a Chebyshev approximation of order 6"):
        fit_background(img, config=BackgroundConfig(bin_size=64, undersample_style="THROW_EXCEPTION"))
    model = fit_background(img, config=BackgroundConfig(bin_size=64))
    assert model.order == 3 and model.shape == (4, 4)
    model = fit_background(img, config=BackgroundConfig(bin_size=64, undersample_style="INCREASE_NXNYSAMPLE"))
    # new square bin floor(256 / 6) = 42 pixels, nx = ny = 256 // 42 + 1 = 7
    assert model.order == 6 and model.shape == (7, 7)
    with pytest.raises(pydantic.ValidationError, match="approx_order_y"):
        BackgroundConfig(approx_order_x=4, approx_order_y=3)
    with pytest.raises(pydantic.ValidationError):
        BackgroundConfig(bin_size=0)


def test_value_dependent_failures_raise_at_compute_time():
    mask = np.full((128, 128), MaskPlane.NO_DATA, np.uint32)
    model = fit_background(_ds(np.ones((128, 128)), mask), config=AKIMA)
    bg = model.evaluate()
    with pytest.raises(DataQualityError, match=r"every pixel carries an ignored mask plane.*visit=7 detector=3"):
        bg.compute()
    # a column left with 4 usable cells cannot carry an Akima spline under THROW_EXCEPTION
    mask = np.zeros((160, 160), np.uint32)
    mask[0:32, 0:32] = MaskPlane.BAD
    cfg = BackgroundConfig(bin_size=32, use_approx=False, undersample_style="THROW_EXCEPTION")
    with pytest.raises(DataQualityError, match="has 4 usable cells, fewer than the 5 AKIMA_SPLINE needs"):
        fit_background(_ds(np.ones((160, 160)), mask), config=cfg).evaluate().compute()
    # ... and the same grid is fine when the order may be reduced
    out = fit_background(_ds(np.ones((160, 160)), mask), config=AKIMA).evaluate().values
    np.testing.assert_allclose(out, 1.0, atol=1e-6)
    # Chebyshev with fewer usable cells than terms
    mask = np.zeros((128, 128), np.uint32)
    mask[:, 32:] = MaskPlane.BAD
    cfg = BackgroundConfig(bin_size=32, approx_order_x=3, weighting=False)
    with pytest.raises(DataQualityError, match=r"only 4 usable background cells .* order 3 \(10 terms\)"):
        fit_background(_ds(np.ones((128, 128)), mask), config=cfg).evaluate().compute()
    cfg = BackgroundConfig(bin_size=32, approx_order_x=1)
    with pytest.raises(DataQualityError, match="no background cell has a finite value and finite weight"):
        fit_background(_ds(np.ones((128, 128))), config=cfg).evaluate().compute()  # zero errors


def test_schema_errors():
    ds = _ds(np.ones((64, 64)))
    stack = ds.expand_dims(visit=[1, 2])
    with pytest.raises(SchemaError, match="fit_background needs one 2-D image"):
        fit_background(stack, config=AKIMA)
    model = fit_background(ds, config=AKIMA)
    with pytest.raises(SchemaError, match=r"needs 'x' and 'y' pixel coordinates"):
        model.evaluate(like=ds["image"].drop_vars(["x", "y"]))
    with pytest.raises(SchemaError, match="variable 'mask' is missing"):
        fit_background(ds.drop_vars("mask"), config=AKIMA)


# ------------------------------------------------------------------ dask behaviour


@pytest.mark.parametrize("config", [AKIMA, BackgroundConfig(bin_size=40, approx_order_x=3)])
def test_numpy_dask_equal(rng, config):
    q, _ = _quadratic(300, 260)
    ds = _ds(q + rng.normal(0, 1, q.shape))

    def run(d):
        return subtract_background(d, config=config)[0]

    assert_numpy_dask_equal(run, ds, {"y": 37, "x": 41}, rtol=1e-6, atol=1e-5)
    a = fit_background(ds, config=config).cells.compute()
    b = fit_background(ds.chunk({"y": 37, "x": 41}), config=config).cells.compute()
    np.testing.assert_array_equal(a, b)


def test_lazy_and_input_untouched(rng):
    img = rng.normal(10, 1, (200, 180)).astype(np.float32)
    ds = _ds(img).chunk({"y": 37, "x": 41})
    before = ds.copy(deep=True).compute()
    out, model = assert_lazy(lambda: subtract_background(ds, config=AKIMA))
    with raise_if_dask_computes():
        model.evaluate(like=ds)
        model.to_dataset()
    assert dask.is_dask_collection(model.cells)
    np.testing.assert_array_equal(ds["image"].values, before["image"].values)
    np.testing.assert_allclose(out["image"].values, img - model.evaluate().values, rtol=1e-6)
    assert "subtract_background" in out.attrs["provenance"]


def test_graph_size_bounded(rng):
    sizes = []
    for factor in (1, 2):
        img = rng.normal(10, 1, (296 * factor, 328 * factor)).astype(np.float32)
        ds = _ds(img).chunk({"y": 37, "x": 41})  # 8 x 8 (16 x 16) input chunks
        out, model = subtract_background(ds, config=AKIMA)
        n_in = 64 * factor**2
        n_cells = model.shape[0] * model.shape[1]  # one cell per block at this chunk size
        # input chunks, rechunk pieces, cell blocks, one evaluation task per output chunk
        assert graph_size(model.cells) < 8 * (n_in + n_cells)
        sizes.append(graph_size(out["image"].data))
        assert sizes[-1] < 12 * (n_in + n_cells)
    assert sizes[1] < 4.5 * sizes[0]  # linear in the number of chunks


@given(cy=st.integers(7, 96), cx=st.integers(7, 80), bins=st.integers(9, 40), stat=st.sampled_from(
    ["MEAN", "MEDIAN", "MEANCLIP"]))
@settings(max_examples=15, deadline=None)
def test_cells_independent_of_chunking(cy, cx, bins, stat):
    rng = np.random.default_rng(cy * 1000 + cx)
    img = rng.normal(3.0, 1.0, (96, 80))
    img[rng.uniform(size=img.shape) < 0.01] = 50.0
    mask = np.where(rng.uniform(size=img.shape) < 0.05, np.uint32(MaskPlane.BAD), np.uint32(0))
    ds = _ds(img, mask)
    cfg = BackgroundConfig(bin_size=bins, statistic=stat, use_approx=False)
    whole = fit_background(ds, config=cfg)
    parts = fit_background(ds.chunk({"y": cy, "x": cx}), config=cfg)
    np.testing.assert_array_equal(whole.cells.compute(), parts.cells.compute())
    np.testing.assert_array_equal(whole.evaluate().values, parts.evaluate(like=ds.chunk({"y": cy, "x": cx})).values)


@pytest.mark.parametrize("style", [K.STYLE_CONSTANT, K.STYLE_LINEAR, K.STYLE_SPLINE, K.STYLE_AKIMA])
@pytest.mark.parametrize("holes", [False, True])
def test_grid_evaluation_equals_line_by_line(rng, style, holes):
    """The shared column placement gives exactly the line-by-line interpolation (columns first)."""
    xc = np.sort(rng.uniform(0, 500, 9))
    yc = np.sort(rng.uniform(0, 400, 7))
    grid = rng.normal(10.0, 1.0, (7, 9))
    if holes:
        grid[rng.random(grid.shape) < 0.15] = np.nan
        grid[:, 4] = np.nan
    qy = np.arange(-40.0, 450.0, 3.3)
    qx = np.arange(540.0, -60.0, -2.9)
    cols = np.empty((qy.size, xc.size))
    for i in range(xc.size):
        assert K.interp_line(yc, grid[:, i].copy(), style, True, qy, cols[:, i]) == 0
    want = np.empty((qy.size, qx.size))
    for r in range(qy.size):
        assert K.interp_line(xc, cols[r].copy(), style, True, qx, want[r]) == 0
    got, status = K.eval_grid(xc, yc, grid, style, True, qy, qx)
    assert status == 0
    np.testing.assert_array_equal(got, want)
    out32 = np.empty(want.shape, np.float32)
    assert K.eval_grid_into(xc, yc, grid, style, True, qy, qx, out32) == 0
    np.testing.assert_array_equal(out32, want.astype(np.float32))


# ------------------------------------------------------------------ per-cell statistics kernel


def _reference_cells(image, mask, yedges, xedges, statistic, and_mask, num_sigma=3.0, num_iter=3):
    """The cell table from pipeline.stats.grid_statistics (the statistics module's path)."""
    from pipeline.stats import Statistic, StatsConfig, grid_statistics

    cfg = StatsConfig(num_sigma_clip=num_sigma, num_iter=num_iter, and_mask=and_mask)
    stat = Statistic(statistic)
    wanted = (stat, Statistic.NPOINT, Statistic.STDEV, Statistic.VARIANCECLIP)
    vals, errs = grid_statistics(image, mask=mask, yedges=yedges, xedges=xedges, statistics=wanted, config=cfg,
                                 errors=True)
    out = np.stack([vals[stat], errs[stat], vals[Statistic.NPOINT].astype(np.float64), vals[Statistic.STDEV],
                    vals[Statistic.VARIANCECLIP] if stat is Statistic.MEANCLIP else np.full(vals[stat].shape, np.nan)])
    empty = out[2] == 0
    out[0, empty] = np.nan
    out[1, empty] = np.nan
    return out


_CODES = {"MEAN": K.CELL_STAT_MEAN, "MEDIAN": K.CELL_STAT_MEDIAN, "MEANCLIP": K.CELL_STAT_MEANCLIP}


def _awkward_image(rng, h, w, dtype):
    """Sky with sources, masked and non-finite pixels, a constant cell, an empty cell, a tied cell."""
    img = rng.normal(1000.0, 12.0, (h, w))
    src = rng.uniform(size=img.shape) < 0.02
    img[src] += rng.uniform(100.0, 5000.0, size=src.sum())
    img[rng.uniform(size=img.shape) < 0.003] = np.nan
    img[rng.uniform(size=img.shape) < 0.002] = np.inf
    mask = np.where(rng.uniform(size=img.shape) < 0.03, np.uint32(MaskPlane.BAD), np.uint32(0))
    mask |= np.where(rng.uniform(size=img.shape) < 0.03, np.uint32(MaskPlane.SAT), np.uint32(0))
    img[:60, :70] = 7.25  # constant cell(s)
    mask[60:120, :70] = np.uint32(MaskPlane.NO_DATA)  # empty cell(s)
    img[:60, 70:140] = np.round(rng.normal(0.0, 2.0, (60, 70)))  # many ties
    return img.astype(dtype), mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("statistic", ["MEAN", "MEDIAN", "MEANCLIP"])
@pytest.mark.parametrize("num_iter", [1, 3])
def test_cell_table_equals_grid_statistics(rng, dtype, statistic, num_iter):
    """The background's cell kernel gives the statistics module's numbers bit for bit."""
    img, mask = _awkward_image(rng, 300, 437, dtype)
    img[120:] += rng.uniform(-1e-3, 1e-3, (180, 437)).astype(dtype)  # values whose float64 sums round
    and_mask = int(MaskPlane.BAD | MaskPlane.NO_DATA)
    for yedges, xedges in [(cell_layout(300, 5)[0], cell_layout(437, 6)[0]),  # 60 x 73: sorted quartiles
                           (np.array([0, 60, 120, 300]), np.array([0, 70, 140, 437]))]:  # histogram if > 2048
        want = _reference_cells(img, mask, yedges, xedges, statistic, and_mask, num_iter=num_iter)
        got = np.empty_like(want)
        K.cell_table(img, mask, yedges, xedges, and_mask, _CODES[statistic], 3.0, num_iter, got)
        np.testing.assert_array_equal(got, want)
    assert np.isnan(got[0, 1, 0]) and np.isnan(got[1, 1, 0]) and got[2, 1, 0] == 0  # the empty cell
    assert got[2, 0, 0] > 2048 and got[0, 0, 0] == 7.25 and got[3, 0, 0] == 0.0  # the constant cell
    if statistic == "MEANCLIP":
        assert np.all(np.isfinite(got[4, 2]))


def test_fit_background_cells_equal_statistics_module(rng):
    """fit_background's cell table (numpy and 37 x 41 dask chunks) equals grid_statistics."""
    img, mask = _awkward_image(rng, 256, 300, np.float32)
    ds = _ds(img, mask)
    and_mask = int(MaskPlane.BAD | MaskPlane.EDGE | MaskPlane.DETECTED | MaskPlane.DETECTED_NEGATIVE
                   | MaskPlane.NO_DATA)
    whole = fit_background(ds, config=BackgroundConfig(bin_size=64))
    parts = fit_background(ds.chunk({"y": 37, "x": 41}), config=BackgroundConfig(bin_size=64))
    want = _reference_cells(img, mask, whole.y_edges, whole.x_edges, "MEANCLIP", and_mask)
    np.testing.assert_array_equal(whole.cells.compute(), want)
    np.testing.assert_array_equal(parts.cells.compute(), want)


# ------------------------------------------------------------------ Chebyshev evaluation kernel


@pytest.mark.parametrize("order", [0, 1, 3, 6])
def test_chebyshev_eval_into_matches_matrix_product(rng, order):
    nterms = (order + 1) * (order + 2) // 2
    coeffs = rng.normal(0.0, 1.0, nterms)
    coeffs[0] = 1000.0
    qx = np.arange(-20.0, 517.0, 1.0)
    qy = np.arange(410.0, -15.0, -1.0)
    want = K.chebyshev_eval(coeffs, order, qx, qy, 500, 400)
    got64 = np.empty(want.shape)
    K.chebyshev_eval_into(coeffs, order, qx, qy, 500, 400, got64)
    np.testing.assert_allclose(got64, want, rtol=0.0, atol=1e-11)
    got32 = np.empty(want.shape, np.float32)
    K.chebyshev_eval_into(coeffs, order, qx, qy, 500, 400, got32)
    # one float32 rounding of a float64 value equal to the reference up to 1e-11
    np.testing.assert_allclose(got32, want, rtol=2.0**-24, atol=1e-11)


def test_in_memory_model_is_one_block(rng):
    img = rng.normal(10, 1, (200, 180)).astype(np.float32)
    model = fit_background(_ds(img), config=BackgroundConfig(bin_size=32))
    with raise_if_dask_computes():
        bg = model.evaluate()
        like = model.evaluate(like=_ds(img))
    assert bg.data.numblocks == (1, 1) and like.data.numblocks == (1, 1)
    chunked = fit_background(_ds(img).chunk({"y": 37, "x": 41}), config=BackgroundConfig(bin_size=32))
    assert chunked.evaluate().data.chunks == _ds(img).chunk({"y": 37, "x": 41})["image"].data.chunks
    np.testing.assert_allclose(bg.values, chunked.evaluate().values, rtol=1e-6, atol=1e-5)


def test_cell_table_thread_safe(rng):
    """The kernel releases the GIL and keeps its scratch per call: concurrent calls agree."""
    from concurrent.futures import ThreadPoolExecutor

    img, mask = _awkward_image(rng, 240, 260, np.float32)
    yedges, xedges = cell_layout(240, 4)[0], cell_layout(260, 3)[0]

    def one(_):
        out = np.empty((5, 4, 3))
        K.cell_table(img, mask, yedges, xedges, int(MaskPlane.BAD), K.CELL_STAT_MEANCLIP, 3.0, 3, out)
        return out

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, range(8)))
    want = _reference_cells(img, mask, yedges, xedges, "MEANCLIP", int(MaskPlane.BAD))
    for got in results:
        np.testing.assert_array_equal(got, want)
