"""Tests of pipeline.stack (per-pixel stacking of warps over visits)."""

from __future__ import annotations

import math

import dask
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tan_wcs
from pipeline.errors import MaskPlaneError, SchemaError, SkystackWarning
from pipeline.model.masks import CANONICAL_PLANES, MaskPlane, add_planes, planes_from_attrs
from pipeline.model.schema import make_dataset
from pipeline.stack import StackConfig, online_mean, stack, stack_mask_map
from pipeline.stats import IQR_TO_SIGMA, Statistic, StatsConfig, compute_statistics
from pipeline.testing import assert_lazy, graph_size, raise_if_dask_computes

NO_DATA, BAD, SAT, EDGE, CR = (int(MaskPlane[n]) for n in ("NO_DATA", "BAD", "SAT", "EDGE", "CR"))
CLIPPED, REJECTED, SENSOR_EDGE = (int(MaskPlane[n]) for n in ("CLIPPED", "REJECTED", "SENSOR_EDGE"))
WCS = make_tan_wcs()


def make_stack(images, variances=None, masks=None, *, visits=None, chunks=None, x0=100, y0=200):
    """A stack Dataset (dims visit, y, x) from per-visit arrays."""
    images = np.asarray(images, dtype=np.float32)
    nk = images.shape[0]
    variances = np.ones_like(images) if variances is None else np.broadcast_to(variances, images.shape)
    masks = np.zeros(images.shape, np.uint32) if masks is None else np.broadcast_to(masks, images.shape)
    visits = list(range(1000, 1000 + nk)) if visits is None else [int(v) for v in visits]
    warps = [
        make_dataset(images[k], variances[k], masks[k], wcs=WCS, kind="warp", x0=x0, y0=y0,
                     attrs={"visit": visits[k], "tract": 9, "patch": 4, "band": "i"})
        for k in range(nk)
    ]
    ds = xr.concat(warps, dim="visit", coords="minimal", compat="override", combine_attrs="drop_conflicts")
    ds = ds.assign_coords(visit=("visit", visits))
    if chunks is not None:
        ds = ds.chunk({"visit": -1, "y": chunks[0], "x": chunks[1]})
    return ds


def weights_da(values, visits):
    return xr.DataArray(np.asarray(values, dtype=np.float64), dims=("visit",), coords={"visit": list(visits)})


def random_stack(rng, nk=9, shape=(61, 83), chunks=None, nan_frac=0.02):
    img = rng.normal(50.0, 3.0, size=(nk,) + shape)
    img[rng.random(img.shape) < 0.03] += 400.0  # outliers
    img[rng.random(img.shape) < nan_frac] = np.nan
    var = rng.uniform(4.0, 16.0, size=img.shape)
    bits = np.array([0, 0, 0, 0, 0, 0, BAD, SAT, EDGE, CR, NO_DATA, CLIPPED], np.uint32)
    mask = bits[rng.integers(0, bits.size, size=img.shape)]
    visits = rng.permutation(np.arange(500, 500 + nk))
    return make_stack(img, var, mask, visits=visits, chunks=chunks), visits


# ------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("statistic", ["MEAN", "MEANCLIP", "MEDIAN"])
def test_constant_stack(statistic):
    nk = 5
    w = np.array([1.0, 2.0, 0.5, 4.0, 1.5])
    v = np.array([2.0, 1.0, 3.0, 0.25, 1.0])[:, None, None] * np.ones((nk, 20, 30))
    ds = make_stack(np.full((nk, 20, 30), 7.25), v)
    out = stack(ds, weights=weights_da(w, ds.visit.values), config=StackConfig(statistic=statistic))
    assert np.all(out.image.values == np.float32(7.25))
    assert np.all(out.mask.values == 0) and np.all(out.n_image.values == nk)
    if statistic == "MEDIAN":
        assert np.all(out.variance.values == 0.0)  # pi/2 * sample variance (0) / N
    else:
        expected = (w**2 * v[:, 0, 0]).sum() / w.sum() ** 2
        np.testing.assert_allclose(out.variance.values, expected, rtol=1e-6)
    assert out.image.dtype == np.float32 and out.variance.dtype == np.float32
    assert out.mask.dtype == np.uint32 and out.n_image.dtype == np.uint16


def test_weighted_mean_closed_form(rng):
    nk = 6
    img = rng.normal(size=(nk, 10, 12))
    var = rng.uniform(0.5, 2.0, size=img.shape)
    w = rng.uniform(0.2, 3.0, size=nk)
    ds = make_stack(img, var)
    out = stack(ds, weights=weights_da(w, ds.visit.values), config=StackConfig(statistic="MEAN"))
    img32, var32 = img.astype(np.float32).astype(np.float64), var.astype(np.float32).astype(np.float64)
    wk = w[:, None, None]
    np.testing.assert_allclose(out.image.values, (wk * img32).sum(0) / w.sum(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.variance.values, (wk**2 * var32).sum(0) / w.sum() ** 2, rtol=1e-6)
    # unweighted, error from the scatter: sigma^2 / N
    out = stack(ds, config=StackConfig(statistic="MEAN", weighted=False, calc_error_from_input_variance=False))
    np.testing.assert_allclose(out.image.values, img32.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.variance.values, img32.var(0, ddof=1) / nk, rtol=1e-5)
    # weighted without weights: per-pixel inverse variance
    out = stack(ds, config=StackConfig(statistic="MEAN"))
    iv = 1.0 / var32
    np.testing.assert_allclose(out.image.values, (iv * img32).sum(0) / iv.sum(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.variance.values, 1.0 / iv.sum(0), rtol=1e-6)


def test_meanclip_removes_outlier_and_flags_clipped():
    nk = 8
    base = np.array([10.0, 10.5, 9.5, 10.2, 9.8, 10.1, 9.9, 10.0])
    img = np.broadcast_to(base[:, None, None], (nk, 4, 5)).copy()
    img[3, 2, 2] = 1000.0
    w = np.arange(1.0, nk + 1.0)
    var = np.full(img.shape, 0.5)
    ds = make_stack(img, var)
    out = stack(ds, weights=weights_da(w, ds.visit.values))
    keep = np.ones(nk, bool)
    keep[3] = False
    good_mean = (w[keep] * base[keep]).sum() / w[keep].sum()
    np.testing.assert_allclose(out.image.values[2, 2], good_mean, rtol=1e-6)
    np.testing.assert_allclose(out.variance.values[2, 2], (w[keep] ** 2 * 0.5).sum() / w[keep].sum() ** 2, rtol=1e-6)
    assert out.mask.values[2, 2] == CLIPPED
    others = np.ones((4, 5), bool)
    others[2, 2] = False
    np.testing.assert_allclose(out.image.values[others], (w * base).sum() / w.sum(), rtol=1e-6)
    assert np.all(out.mask.values[others] == 0)
    assert np.all(out.n_image.values == nk)  # clipping does not change n_image


def test_meanclip_passes_follow_the_reference(rng):
    """Pass 0 around the median with 3*0.7413*IQR, pass 1 around the weighted mean with 3 sigma."""
    nk = 11
    img = rng.normal(0.0, 1.0, size=(nk, 30, 30))
    img[rng.random(img.shape) < 0.15] *= 6.0
    w = rng.uniform(0.5, 2.0, size=nk)
    var = rng.uniform(0.5, 1.5, size=img.shape)
    ds = make_stack(img, var)
    out = stack(ds, weights=weights_da(w, ds.visit.values))
    x = img.astype(np.float32).astype(np.float64)
    v = var.astype(np.float32).astype(np.float64)
    wk = np.broadcast_to(w[:, None, None], x.shape)
    med = np.median(x, axis=0)
    q25, q75 = np.percentile(x, [25, 75], axis=0)
    keep0 = np.abs(x - med) <= 3.0 * IQR_TO_SIGMA * (q75 - q25)
    s1 = (wk * keep0).sum(0)
    s2 = (wk**2 * keep0).sum(0)
    mu0 = (wk * x * keep0).sum(0) / s1
    var0 = (wk * (x - mu0) ** 2 * keep0).sum(0) * s1 / (s1**2 - s2)
    keep1 = np.abs(x - mu0) <= 3.0 * np.sqrt(var0)
    s1 = (wk * keep1).sum(0)
    mu1 = (wk * x * keep1).sum(0) / s1
    np.testing.assert_allclose(out.image.values, mu1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.variance.values, (wk**2 * v * keep1).sum(0) / s1**2, rtol=1e-5)
    np.testing.assert_array_equal(out.mask.values == CLIPPED, keep1.sum(0) < nk)
    assert (keep1.sum(0) < nk).any()


def test_median_statistic(rng):
    img = rng.normal(size=(7, 9, 11))
    ds = make_stack(img)
    out = stack(ds, config=StackConfig(statistic="MEDIAN", weighted=False))
    x = img.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(out.image.values, np.median(x, axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.variance.values, math.pi / 2 * x.var(0, ddof=1) / 7, rtol=1e-5)


def test_many_visits_use_a_larger_network(rng):
    nk = 37  # sorting network padded to 64 keys
    img = rng.normal(size=(nk, 6, 7))
    mask = np.where(rng.random(img.shape) < 0.3, np.uint32(BAD), np.uint32(0))
    out = stack(make_stack(img, 1.0, mask), config=StackConfig(statistic="MEDIAN", weighted=False))
    x = np.where(mask == 0, img.astype(np.float32).astype(np.float64), np.nan)
    np.testing.assert_allclose(out.image.values, np.nanmedian(x, axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out.n_image.values, (mask == 0).sum(0))


def test_all_masked_gives_no_data():
    img = np.ones((4, 3, 3))
    mask = np.zeros((4, 3, 3), np.uint32)
    mask[:, 0, 0] = NO_DATA
    mask[:, 1, 1] = EDGE
    mask[:2, 2, 2] = BAD
    mask[2:, 2, 2] = NO_DATA
    img[:, 0, 1] = np.nan  # no bad bit, but no finite value either
    for statistic in ("MEAN", "MEANCLIP", "MEDIAN"):
        out = stack(make_stack(img, 1.0, mask), config=StackConfig(statistic=statistic))
        assert out.mask.values[0, 0] == NO_DATA  # replaced; NO_DATA maps to nothing
        assert out.mask.values[1, 1] == NO_DATA | SENSOR_EDGE
        assert out.mask.values[2, 2] == NO_DATA | REJECTED
        assert out.mask.values[0, 1] == NO_DATA  # nothing masked, so no mask map
        for y, x in [(0, 0), (1, 1), (2, 2), (0, 1)]:
            assert np.isnan(out.image.values[y, x]) and np.isnan(out.variance.values[y, x])
        assert out.n_image.values[0, 0] == 0 and out.n_image.values[1, 1] == 0
        assert out.n_image.values[0, 1] == 4  # NaN pixels without a bad bit are counted, as in the reference
        assert out.image.values[1, 0] == 1.0 and out.mask.values[1, 0] == 0


@pytest.mark.parametrize("fraction, expect_sat", [(0.0999, False), (0.1001, True)])
def test_sat_propagation_threshold(fraction, expect_sat):
    # visit 0 is SAT (excluded by the and-mask); its weight share of the total is `fraction`
    w_sat = fraction / (1.0 - fraction) * 3.0
    w = np.array([w_sat, 1.0, 1.0, 1.0])
    mask = np.zeros((4, 2, 2), np.uint32)
    mask[0] = SAT
    ds = make_stack(np.full((4, 2, 2), 3.0), 1.0, mask)
    out = stack(ds, weights=weights_da(w, ds.visit.values), config=StackConfig(statistic="MEAN"))
    expected = (SAT if expect_sat else 0) | REJECTED  # SAT is a bad plane other than EDGE/NO_DATA
    assert np.all(out.mask.values == expected)
    assert np.all(out.image.values == 3.0) and np.all(out.n_image.values == 3)


def test_mask_map_and_ormask():
    img = np.ones((3, 1, 5))
    mask = np.zeros((3, 1, 5), np.uint32)
    mask[0, 0, 0] = BAD  # -> REJECTED
    mask[0, 0, 1] = EDGE  # -> SENSOR_EDGE
    mask[0, 0, 2] = CLIPPED  # not in the and-mask: ORed as a good input's bit
    mask[1, 0, 2] = BAD
    mask[0, 0, 3] = CR  # good input: ORMASK only
    mask[0, 0, 4] = NO_DATA  # maps to nothing
    out = stack(make_stack(img, 1.0, mask), config=StackConfig(statistic="MEAN"))
    np.testing.assert_array_equal(out.mask.values[0], [REJECTED, SENSOR_EDGE, CLIPPED | REJECTED, CR, 0])
    np.testing.assert_array_equal(out.n_image.values[0], [2, 2, 2, 3, 2])
    planes = planes_from_attrs(out.mask.attrs)
    assert {"CLIPPED", "REJECTED", "SENSOR_EDGE"} <= set(planes)
    pairs = stack_mask_map(BAD | SAT | EDGE | NO_DATA, CANONICAL_PLANES)
    assert pairs == [(BAD | SAT, REJECTED), (EDGE, SENSOR_EDGE), (CLIPPED, CLIPPED)]


def test_planes_added_when_missing():
    planes = {n: b for n, b in CANONICAL_PLANES.items() if n not in ("CLIPPED", "REJECTED", "SENSOR_EDGE")}
    planes["GHOST"] = 12  # the canonical REJECTED bit is taken by another plane
    warps = [
        make_dataset(np.ones((3, 3)), np.ones((3, 3)), np.zeros((3, 3)), wcs=WCS, kind="warp", planes=planes,
                     attrs={"visit": v})
        for v in (1, 2)
    ]
    m = warps[0]["mask"].values.copy()
    m[0, 0] = BAD
    warps[0]["mask"] = warps[0]["mask"].copy(data=m)
    out = stack(warps, config=StackConfig(statistic="MEAN"))
    out_planes = planes_from_attrs(out.mask.attrs)
    assert out_planes == add_planes(planes, ["CLIPPED", "REJECTED", "SENSOR_EDGE"])
    assert out_planes["GHOST"] == 12 and out_planes["REJECTED"] != 12
    assert out.mask.values[0, 0] == 1 << out_planes["REJECTED"]


def test_matches_compute_statistics_per_pixel(rng):
    ds, visits = random_stack(rng, nk=10, shape=(12, 14))
    ds = ds.sortby("visit")
    w = rng.uniform(0.5, 2.0, size=10)
    out = stack(ds, weights=weights_da(w, ds.visit.values))
    cfg = StatsConfig(and_mask=BAD | SAT | EDGE | NO_DATA, weighted=True, num_iter=2, error_from_input_variance=True,
                      mask_propagation_thresholds={"SAT": 0.1})
    vals, errs = compute_statistics(
        ds.image.values, mask=ds["mask"].values, variance=ds.variance.values, weights=w[:, None, None], axis=0,
        statistics=[Statistic.MEANCLIP, Statistic.ORMASK, Statistic.NPOINT, Statistic.NCLIPPED], config=cfg,
        errors=True,
    )
    np.testing.assert_allclose(out.image.values, vals[Statistic.MEANCLIP], rtol=2e-6, atol=1e-5)
    np.testing.assert_allclose(out.variance.values, errs[Statistic.MEANCLIP] ** 2, rtol=2e-6)
    expected = vals[Statistic.ORMASK] | np.where(vals[Statistic.NCLIPPED] > 0, CLIPPED, 0).astype(np.uint32)
    any_mask = np.bitwise_or.reduce(ds["mask"].values, axis=0)
    nmasked = 10 - vals[Statistic.NPOINT]
    for frm, to in stack_mask_map(BAD | SAT | EDGE | NO_DATA, CANONICAL_PLANES):
        expected |= np.where((nmasked > 0) & ((any_mask & frm) != 0), to, 0).astype(np.uint32)
    expected = np.where(vals[Statistic.NPOINT] == 0, NO_DATA, expected)
    np.testing.assert_array_equal(out.mask.values, expected)


# ------------------------------------------------------------------------------ invariances


@pytest.mark.parametrize("statistic", ["MEAN", "MEANCLIP", "MEDIAN"])
def test_dask_equals_numpy_on_uneven_chunks(rng, statistic):
    ds, visits = random_stack(rng, nk=9, shape=(97, 123))
    w = weights_da(rng.uniform(0.5, 2.0, size=9), visits)
    cfg = StackConfig(statistic=statistic)
    eager = stack(ds, weights=w, config=cfg)
    for chunks in [(37, 41), (97, 5), (13, 123)]:
        lazy = stack(ds.chunk({"y": chunks[0], "x": chunks[1]}), weights=w.chunk(), config=cfg)
        assert lazy.image.chunks == (ds.chunk({"y": chunks[0]}).chunks["y"], ds.chunk({"x": chunks[1]}).chunks["x"])
        got = lazy.compute()
        for name in ("image", "variance", "mask", "n_image"):
            np.testing.assert_array_equal(got[name].values, eager[name].values, err_msg=f"{name} {chunks}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), statistic=st.sampled_from(["MEAN", "MEANCLIP", "MEDIAN"]), nk=st.integers(1, 12))
def test_order_of_visits_does_not_matter(seed, statistic, nk):
    g = np.random.default_rng(seed)
    ds, visits = random_stack(g, nk=nk, shape=(9, 10))
    w = weights_da(g.uniform(0.1, 3.0, size=nk), visits)
    cfg = StackConfig(statistic=statistic)
    a = stack(ds, weights=w, config=cfg)
    perm = g.permutation(nk)
    b = stack(ds.isel(visit=perm), weights=w.isel(visit=g.permutation(nk)), config=cfg)
    for name in ("image", "variance", "mask", "n_image"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_sequence_input_equals_dataset_input(rng):
    ds, visits = random_stack(rng, nk=4, shape=(8, 9))
    warps = [ds.isel(visit=k).drop_vars("visit").assign_attrs(visit=int(v)) for k, v in enumerate(visits)]
    a = stack(ds)
    b = stack(warps)
    for name in ("image", "variance", "mask", "n_image"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_output_dataset_and_inputs_untouched(rng):
    ds, _ = random_stack(rng, nk=3, shape=(6, 7))
    before = ds.copy(deep=True)
    out = stack(ds)
    xr.testing.assert_identical(ds, before)
    assert out.attrs["kind"] == "coadd" and out.attrs["tract"] == 9 and "visit" not in out.attrs
    assert "stack" in out.attrs["provenance"]
    assert "wcs" in out.coords and out.image.attrs["grid_mapping"] == "wcs"
    np.testing.assert_array_equal(out.x.values, np.arange(100, 107))
    np.testing.assert_array_equal(out.y.values, np.arange(200, 206))
    assert set(out.data_vars) == {"image", "variance", "mask", "n_image"}


# ------------------------------------------------------------------------------ laziness, graph


def test_lazy_and_graph_size(rng):
    sizes = {}
    for nk in (4, 16):
        ds, visits = random_stack(rng, nk=nk, shape=(150, 170), chunks=(37, 41))
        ds = ds.sortby("visit")
        w = weights_da(np.ones(nk), visits).chunk()
        out = assert_lazy(lambda: stack(ds, weights=w))
        nchunks = out.image.data.npartitions
        base = len(ds.__dask_graph__())
        sizes[nk] = len(out.__dask_graph__()) - base
        # one stacking task per chunk, then one unpacking task per output and chunk
        assert sizes[nk] <= 5 * nchunks + 5, (nk, sizes[nk], nchunks)
        assert graph_size(out.image) - base <= 2 * nchunks + 5
        with raise_if_dask_computes(1):
            dask.compute(*[out[n].data for n in out.data_vars])
    # the stacking part of the graph does not grow with the number of visits
    assert sizes[16] == sizes[4]


# ------------------------------------------------------------------------------ validation


def test_validation_errors(rng):
    ds, visits = random_stack(rng, nk=3, shape=(5, 6))
    with pytest.raises(SchemaError, match="config must be a StackConfig"):
        stack(ds, config=StatsConfig())
    with pytest.raises(SchemaError, match=r"has dims \('y', 'x'\); stacking needs"):
        stack(ds.isel(visit=0))
    with pytest.raises(SchemaError, match="the visit dimension is empty"):
        stack(ds.isel(visit=slice(0, 0)))
    with pytest.raises(SchemaError, match="appear more than once"):
        stack(ds.assign_coords(visit=[1, 1, 2]))
    with pytest.raises(SchemaError, match="weights must be an xarray.DataArray"):
        stack(ds, weights=np.ones(3))
    with pytest.raises(SchemaError, match=r"weights have dims \('band',\)"):
        stack(ds, weights=xr.DataArray(np.ones(3), dims=("band",)))
    with pytest.raises(SchemaError, match="no weight for visits"):
        stack(ds, weights=weights_da(np.ones(3), [1, 2, 3]))
    with pytest.raises(SchemaError, match="2 weights for 3 visits"):
        stack(ds, weights=xr.DataArray(np.ones(2), dims=("visit",)))
    with pytest.raises(SchemaError, match="weights must be numbers"):
        stack(ds, weights=xr.DataArray(np.array(["a", "b", "c"]), dims=("visit",)))
    with pytest.raises(MaskPlaneError, match="no_good_pixels_mask plane 'VOID' is unknown"):
        stack(ds, config=StackConfig(no_good_pixels_mask="VOID"))
    with pytest.raises(SchemaError, match="non-empty sequence of warp Datasets"):
        stack([])
    with pytest.raises(ValueError, match="must lie in"):
        StackConfig(mask_propagation_thresholds={"SAT": -0.1})
    with pytest.raises(ValueError, match="Input should be 'MEAN', 'MEANCLIP' or 'MEDIAN'"):
        StackConfig(statistic="MAX")
    with pytest.warns(SkystackWarning, match="weights are ignored"):
        stack(ds, weights=weights_da(np.ones(3), visits), config=StackConfig(weighted=False))
    with pytest.raises(SchemaError, match="variable 'mask' has dtype"):
        stack(ds.assign(mask=ds["mask"].astype(np.int64)))


def test_sequence_validation():
    a = make_dataset(np.ones((3, 3)), np.ones((3, 3)), np.zeros((3, 3)), wcs=WCS, kind="warp", attrs={"visit": 1})
    planes = dict(CANONICAL_PLANES)
    planes["GHOST"] = 25
    b = make_dataset(np.ones((3, 3)), np.ones((3, 3)), np.zeros((3, 3)), wcs=WCS, kind="warp", planes=planes,
                     attrs={"visit": 2})
    with pytest.raises(MaskPlaneError, match="mask planes of warp visit=2 differ from those of warp visit=1"):
        stack([a, b])
    c = make_dataset(np.ones((3, 3)), np.ones((3, 3)), np.zeros((3, 3)), wcs=WCS, kind="warp", x0=1,
                     attrs={"visit": 3})
    with pytest.raises(SchemaError, match="does not cover the pixel grid of warp visit=1 along x"):
        stack([a, c])


# ------------------------------------------------------------------------------ online mean


def test_online_mean_equals_stacker_mean(rng):
    ds, visits = random_stack(rng, nk=8, shape=(40, 50), nan_frac=0.0)
    w = weights_da(rng.uniform(0.5, 2.0, size=8), visits)
    cfg = StackConfig(statistic="MEAN")
    a = stack(ds, weights=w, config=cfg)
    b = online_mean(ds, weights=w, config=cfg)
    for name in ("image", "variance", "mask", "n_image"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    # error from the scatter: one-pass accumulation vs two-pass moments (the reference's rtol)
    cfg = StackConfig(statistic="MEAN", calc_error_from_input_variance=False)
    a = stack(ds, weights=w, config=cfg)
    b = online_mean(ds, weights=w, config=cfg)
    np.testing.assert_allclose(b.variance.values, a.variance.values, rtol=1e-6)
    assert b.attrs["kind"] == "coadd" and "online_mean" in b.attrs["provenance"]


def test_online_mean_skips_unmasked_nan_images():
    img = np.array([1.0, np.nan, 3.0])[:, None, None] * np.ones((3, 2, 2))
    mask = np.zeros((3, 2, 2), np.uint32)
    mask[:, 1, 1] = NO_DATA
    out = online_mean(make_stack(img, 1.0, mask), config=StackConfig(statistic="MEAN", weighted=False))
    # the reference would return NaN here (it tests the mask array for finiteness)
    np.testing.assert_array_equal(out.image.values[0], [2.0, 2.0])
    assert out.n_image.values[0, 0] == 3  # NaN inputs without a bad bit are counted
    assert np.isnan(out.image.values[1, 1]) and out.mask.values[1, 1] == NO_DATA and out.n_image.values[1, 1] == 0


def test_online_mean_masks_or_no_data_and_map_seen_bits():
    img = np.ones((2, 1, 3))
    mask = np.zeros((2, 1, 3), np.uint32)
    mask[:, 0, 0] = BAD | CR  # all rejected: NO_DATA is ORed, REJECTED from the map
    mask[0, 0, 1] = SAT  # weight 1/2 > 0.1: SAT propagates
    mask[0, 0, 2] = CLIPPED  # not a bad bit: ORMASK only, nothing mapped
    out = online_mean(make_stack(img, 1.0, mask), config=StackConfig(statistic="MEAN", weighted=False))
    np.testing.assert_array_equal(out.mask.values[0], [NO_DATA | REJECTED, SAT | REJECTED, CLIPPED])
    assert np.isnan(out.image.values[0, 0]) and out.image.values[0, 1] == 1.0


def test_online_mean_lazy_and_chunks(rng):
    ds, visits = random_stack(rng, nk=5, shape=(47, 53))
    w = weights_da(rng.uniform(0.5, 2.0, size=5), visits)
    cfg = StackConfig(statistic="MEAN")
    eager = online_mean(ds, weights=w, config=cfg)
    lazy = assert_lazy(lambda: online_mean(ds.chunk({"y": 37, "x": 41}), weights=w, config=cfg))
    for name in ("image", "variance", "mask", "n_image"):
        np.testing.assert_array_equal(lazy[name].values, eager[name].values, err_msg=name)
    with pytest.raises(SchemaError, match="online_mean computes a MEAN; config.statistic is 'MEANCLIP'"):
        online_mean(ds, config=StackConfig())


def test_single_surviving_input_is_kept_despite_weighted_mean_rounding():
    # (w * x) / w != x in floating point for these values: the clip must not drop the only sample
    wcs = make_tan_wcs()
    x, v = np.float32(22.25046), np.float32(283.20157)
    a = make_dataset(np.full((1, 2), np.nan), np.full((1, 2), np.inf), np.full((1, 2), 256), wcs=wcs, kind="warp",
                     attrs={"visit": 1})
    b = make_dataset(np.array([[x, 5.0]]), np.array([[v, 2.0]]), np.zeros((1, 2), int), wcs=wcs, kind="warp",
                     attrs={"visit": 2})
    for statistic in ("MEANCLIP", "MEAN"):
        out = stack([a, b], config=StackConfig(statistic=statistic))
        np.testing.assert_array_equal(out["image"].values, [[x, 5.0]])
        np.testing.assert_array_equal(out["mask"].values & np.uint32(MaskPlane.CLIPPED), 0)
        np.testing.assert_array_equal(out["n_image"].values, 1)


def test_identical_values_with_weights_are_not_clipped():
    values = np.full(7, 22.25046, dtype=np.float32).astype(np.float64)
    weights = 1.0 / np.array([283.2, 290.1, 301.7, 277.7, 299.9, 288.8, 281.3])
    res = compute_statistics(values, weights=weights, statistics=("MEANCLIP", "NCLIPPED"),
                             config=StatsConfig(weighted=True))
    assert res[Statistic.NCLIPPED] == 0
    assert res[Statistic.MEANCLIP] == pytest.approx(values[0], rel=1e-14)


# ------------------------------------------------------------------------------ kernel exactness


def _reference_and_fast(rng, nk, shape, statistic, weight_mode, error_mode, num_iter, props):
    """Outputs of the definition loop (``stack_pixels``) and of ``stack_planes`` on one input."""
    from pipeline import _kernels_stack as KS
    from pipeline import _kernels_stats as K
    from pipeline.stack import _pairs, _typed_planes

    img = rng.normal(10.0, 2.0, size=(nk,) + shape).astype(np.float32)
    img[rng.random(img.shape) < 0.05] += 300.0
    img[rng.random(img.shape) < 0.02] = np.nan
    img[rng.random(img.shape) < 0.01] = np.inf
    # ties: a few columns of repeated values
    img[:, 0, :] = np.round(img[:, 0, :])
    var = rng.uniform(0.5, 4.0, size=img.shape).astype(np.float32)
    var[rng.random(img.shape) < 0.02] = 0.0
    var[rng.random(img.shape) < 0.01] = -1.0
    bits = np.array([0, 0, 0, 0, 0, 0, 0, 0, BAD, SAT, EDGE, CR, NO_DATA], np.uint32)
    mask = bits[rng.integers(0, bits.size, size=img.shape)]
    weights = rng.uniform(0.0, 3.0, size=nk)
    weights[0] = 0.0
    and_mask = NO_DATA | BAD | SAT | EDGE
    prop_bits = np.array([SAT, CR][:props], np.uint32)
    prop_thr = np.array([0.1, 0.3][:props])
    map_from = np.array([BAD | SAT, EDGE], np.uint32)
    map_to = np.array([REJECTED, SENSOR_EDGE], np.uint32)
    args = (weights, and_mask, weight_mode, error_mode, statistic, 3.0, num_iter, prop_bits, prop_thr,
            NO_DATA, CLIPPED, map_from, map_to, _pairs(nk))

    def outs():
        return [np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.uint32),
                np.empty(shape, np.uint16)]

    ref, fast = outs(), outs()
    fast[3] = np.empty(shape, np.uint32)  # the count plane of the packed output
    K.stack_pixels(img, var, mask, *args, *ref)
    KS.stack_planes(_typed_planes(list(img)), _typed_planes(list(var)), _typed_planes(list(mask)), *args, *fast)
    return ref, fast


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    nk=st.sampled_from([1, 2, 3, 5, 8, 16, 17]),
    statistic=st.sampled_from([0, 1, 2]),
    weight_mode=st.sampled_from([0, 1, 2]),
    error_mode=st.sampled_from([0, 1, 2]),
    num_iter=st.integers(1, 4),
    props=st.integers(0, 2),
)
def test_fast_kernel_reproduces_the_definition_bit_for_bit(seed, nk, statistic, weight_mode, error_mode, num_iter, props):
    # every statistic, weighting, error mode and pass count; NaN/inf values, non-positive
    # variances, zero weights, ties, masked planes, propagated bits: identical bits everywhere
    ref, fast = _reference_and_fast(
        np.random.default_rng(seed), nk, (7, 29), statistic, weight_mode, error_mode, num_iter, props
    )
    for name, a, b in zip(("image", "variance", "mask", "n_image"), ref, fast):
        np.testing.assert_array_equal(a.view(np.uint32) if a.dtype == np.float32 else a,
                                      b.view(np.uint32) if b.dtype == np.float32 else b, err_msg=name)


def test_fast_kernel_last_pass_reuse_covers_moved_and_unmoved_pixels():
    # MEANCLIP, input-variance error, 2 passes on Gaussian samples with outliers: most pixels
    # keep their pass-0 set in pass 1 (same mean as one pass), some do not; both kinds must
    # match the definition
    ref, fast = _reference_and_fast(np.random.default_rng(7), 16, (40, 50), 1, 2, 1, 2, 1)
    one, _ = _reference_and_fast(np.random.default_rng(7), 16, (40, 50), 1, 2, 1, 1, 1)
    for a, b in zip(ref, fast):
        np.testing.assert_array_equal(a.view(np.uint32) if a.dtype == np.float32 else a,
                                      b.view(np.uint32) if b.dtype == np.float32 else b)
    finite = np.isfinite(ref[0])
    moved = finite & (ref[0] != one[0])
    assert 0.005 < moved.mean() < 0.5 and (finite & ~moved).mean() > 0.5


def test_dask_visit_chunks_and_sequence_of_lazy_warps_equal_numpy(rng):
    # the visit axis may come in several chunks (no concatenation into one block is needed) and
    # row bands of in-memory frames are used as they are: results equal the eager ones bit for bit
    ds, visits = random_stack(rng, nk=9, shape=(53, 67))
    w = weights_da(rng.uniform(0.5, 2.0, size=9), visits)
    eager = stack(ds, weights=w)
    lazy = stack(ds.chunk({"visit": 2, "y": 17, "x": -1}), weights=w.chunk({"visit": 4}))
    warps = [ds.isel(visit=k).drop_vars("visit").assign_attrs(visit=int(v)).chunk({"y": 16, "x": -1})
             for k, v in enumerate(visits)]
    seq = stack(warps, weights=w)
    for got in (lazy, seq):
        assert hasattr(got.image.data, "dask")
        got = got.compute()
        for name in ("image", "variance", "mask", "n_image"):
            np.testing.assert_array_equal(got[name].values, eager[name].values, err_msg=name)


@pytest.mark.parametrize("statistic", [0, 1, 2])
def test_fast_kernel_on_rows_wider_than_a_column_tile(statistic):
    # rows of 2100 pixels: two whole column tiles and a narrower last one, several row bands
    from pipeline import _kernels_stack as KS

    assert KS.TILE_WIDTH < 2100 < 3 * KS.TILE_WIDTH
    ref, fast = _reference_and_fast(np.random.default_rng(11), 16, (6, 2100), statistic, 2, 1, 2, 1)
    for a, b in zip(ref, fast):
        np.testing.assert_array_equal(a.view(np.uint32) if a.dtype == np.float32 else a,
                                      b.view(np.uint32) if b.dtype == np.float32 else b)
