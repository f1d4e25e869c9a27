"""Tests of pipeline.stats (masked robust statistics on numpy and dask)."""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from pipeline import _kernels_stats as K
from pipeline.errors import MaskPlaneError, SchemaError, SkystackWarning
from pipeline.model.masks import MaskPlane
from pipeline.stats import (
    IQR_TO_SIGMA,
    Statistic,
    StatsConfig,
    clipped_mean,
    clipped_stdev,
    compute_statistics,
    grid_statistics,
    iqr_sigma,
    median,
)
from pipeline.testing import graph_size, raise_if_dask_computes

ALL = list(Statistic)


def reference_clip(x, m=None, w=None, v=None, *, and_mask=0, nsig=3.0, niter=3, error_mode="default"):
    """Straightforward numpy version of spec section 1.8 (MEANCLIP, VARIANCECLIP, NCLIPPED, error)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.zeros(x.shape, np.uint32) if m is None else m
    w = np.ones(x.shape) if w is None else w
    v = np.zeros(x.shape) if v is None else v
    good = ((m & and_mask) == 0) & np.isfinite(x)
    xs, ws, vs = x[good], w[good], v[good]
    n = xs.size
    if n == 0:
        return np.nan, np.nan, 0, np.nan
    med = np.median(xs)
    q25, q75 = np.percentile(xs, [25, 75])
    iqr = q75 - q25
    mean = var = err = np.nan
    kept = 0
    for p in range(niter):
        centre = med if p == 0 else mean
        if p == 0 or n <= 1:
            width = nsig * IQR_TO_SIGMA * iqr
        else:
            width = np.nan if np.isnan(var) else nsig * math.sqrt(max(var, 0.0))
        if np.isnan(centre) or np.isnan(width):
            return np.nan, np.nan, n, np.nan
        # the documented rounding slack: a weighted mean of identical values may miss them by an ulp
        width += K.CLIP_SLACK * abs(centre)
        with np.errstate(invalid="ignore"):
            keep = np.abs(xs - centre) <= width
        kept = int(keep.sum())
        wk, xk, vk = ws[keep], xs[keep], vs[keep]
        s1, s2 = wk.sum(), (wk * wk).sum()
        mean = (wk * xk).sum() / s1 if kept else np.nan
        denom = s1 * s1 - s2
        var = (wk * (xk - mean) ** 2).sum() * s1 / denom if denom != 0 else np.nan
        if not kept:
            err = np.nan
        elif error_mode == "input":
            err = (wk * wk * vk).sum() / s1**2
        elif error_mode == "mosaic":
            err = (wk * vk).sum() / s1
        else:
            err = var * s2 / s1**2
    return mean, var, n - kept, err


def truncated_variance(a):
    """Variance of N(0, 1) truncated to [-a, a]."""
    return 1.0 - 2.0 * a * norm.pdf(a) / (2.0 * norm.cdf(a) - 1.0)


# ------------------------------------------------------------------------------ closed forms


def test_iqr_to_sigma_constant():
    np.testing.assert_allclose(IQR_TO_SIGMA, 1.0 / (2.0 * norm.ppf(0.75)), rtol=1e-14)


def test_plain_moments_match_numpy(rng):
    x = rng.normal(3.0, 2.0, size=5001)
    r = compute_statistics(x, statistics=ALL)
    np.testing.assert_allclose(r[Statistic.MEAN], x.mean(), rtol=1e-12)
    np.testing.assert_allclose(r[Statistic.VARIANCE], x.var(ddof=1), rtol=1e-12)
    np.testing.assert_allclose(r[Statistic.STDEV], x.std(ddof=1), rtol=1e-12)
    np.testing.assert_allclose(r[Statistic.SUM], x.sum(), rtol=1e-12)
    np.testing.assert_allclose(r[Statistic.MEANSQUARE], np.mean(x * x), rtol=1e-12)
    assert r[Statistic.MEDIAN] == np.median(x)
    q25, q75 = np.percentile(x, [25, 75])
    np.testing.assert_allclose(r[Statistic.IQRANGE], q75 - q25, rtol=1e-14)
    assert r[Statistic.MIN] == x.min() and r[Statistic.MAX] == x.max()
    assert r[Statistic.NPOINT] == x.size and r[Statistic.NMASKED] == 0
    assert r[Statistic.NPOINT].dtype == np.int64 and r[Statistic.ORMASK].dtype == np.uint32


def test_clipped_gaussian_matches_truncated_normal(rng):
    n = 400_000
    x = rng.standard_normal(n)
    # one IQR pass: truncation at 3 sigma; this is the reference's test constant 0.9733
    one = compute_statistics(x, statistics=ALL, config=StatsConfig(num_iter=1))
    np.testing.assert_allclose(truncated_variance(3.0), 0.9733, atol=5e-5)
    tol = 4 * math.sqrt(2.0 / n)
    np.testing.assert_allclose(one[Statistic.VARIANCECLIP], truncated_variance(3.0), atol=tol)
    # three passes: each later pass truncates at 3 * sqrt(previous clipped variance)
    v = truncated_variance(3.0)
    for _ in range(2):
        v = truncated_variance(3.0 * math.sqrt(v))
    three = compute_statistics(x, statistics=ALL)
    np.testing.assert_allclose(three[Statistic.VARIANCECLIP], v, atol=tol)
    np.testing.assert_allclose(three[Statistic.STDEVCLIP], math.sqrt(v), atol=tol)
    np.testing.assert_allclose(three[Statistic.MEANCLIP], 0.0, atol=4 / math.sqrt(n))
    expected_clipped = n * (2 * norm.sf(3.0 * math.sqrt(truncated_variance(3.0 * math.sqrt(truncated_variance(3.0))))))
    np.testing.assert_allclose(three[Statistic.NCLIPPED], expected_clipped, rtol=0.15)
    assert three[Statistic.NPOINT] == n  # NPOINT is the pre-clip count
    np.testing.assert_allclose(clipped_mean(x), three[Statistic.MEANCLIP], rtol=0, atol=0)
    np.testing.assert_allclose(clipped_stdev(x), three[Statistic.STDEVCLIP], rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [0.5, 3.0, 40.0])
def test_iqr_sigma_of_gaussian(rng, sigma):
    n = 200_000
    x = rng.normal(7.0, sigma, size=n)
    # sd of the IQR sigma estimate ~ 1.166 sigma / sqrt(n)
    np.testing.assert_allclose(iqr_sigma(x), sigma, rtol=6 * 1.17 / math.sqrt(n))
    np.testing.assert_allclose(median(x), 7.0, atol=6 * 1.26 * sigma / math.sqrt(n))


def test_all_masked():
    x = np.arange(10.0)
    m = np.full(10, int(MaskPlane.BAD), np.uint32)
    r = compute_statistics(x, mask=m, statistics=ALL, config=StatsConfig(and_mask=("BAD",)))
    assert r[Statistic.NPOINT] == 0 and r[Statistic.NMASKED] == 10 and r[Statistic.NCLIPPED] == 0
    for s in (Statistic.MEAN, Statistic.MEDIAN, Statistic.MEANCLIP, Statistic.STDEVCLIP, Statistic.MIN, Statistic.MAX):
        assert np.isnan(r[s]), s
    assert r[Statistic.SUM] == 0.0 and r[Statistic.ORMASK] == 0


def test_single_sample_and_n_le_1_rule():
    r = compute_statistics(np.array([4.25]), statistics=ALL)
    assert r[Statistic.MEANCLIP] == 4.25 and r[Statistic.NCLIPPED] == 0 and r[Statistic.MEDIAN] == 4.25
    assert np.isnan(r[Statistic.VARIANCECLIP]) and np.isnan(r[Statistic.VARIANCE])
    # one good sample among masked ones: the N <= 1 rule keeps it on every pass
    r = compute_statistics(
        np.array([1.0, 2.0, 3.0]), mask=np.array([1, 0, 1]), statistics=ALL, config=StatsConfig(and_mask=1, num_iter=5)
    )
    assert r[Statistic.MEANCLIP] == 2.0 and r[Statistic.NCLIPPED] == 0 and r[Statistic.NPOINT] == 1


def test_zero_iqr_keeps_the_median_value():
    x = np.array([5.0] * 8 + [1.0, 100.0])
    r = compute_statistics(x, statistics=ALL)
    assert r[Statistic.IQRANGE] == 0.0
    assert r[Statistic.MEANCLIP] == 5.0 and r[Statistic.VARIANCECLIP] == 0.0 and r[Statistic.NCLIPPED] == 2


def test_nan_width_or_centre_gives_nan():
    tiny = StatsConfig(num_sigma_clip=1e-9, num_iter=2)
    # pass 0 keeps only the sample equal to the median: its variance is NaN, so is pass 1's width
    r = compute_statistics(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), statistics=ALL, config=tiny)
    assert np.isnan(r[Statistic.MEANCLIP]) and np.isnan(r[Statistic.VARIANCECLIP]) and r[Statistic.NCLIPPED] == 5
    # with one pass the single survivor is the result
    one_pass = StatsConfig(num_sigma_clip=1e-9, num_iter=1)
    one = compute_statistics(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), statistics=ALL, config=one_pass)
    assert one[Statistic.MEANCLIP] == 3.0 and one[Statistic.NCLIPPED] == 4
    # pass 0 keeps nothing (the median 2 is no sample): NaN mean, NaN centre of pass 1
    r = compute_statistics(np.array([0.0, 1.0, 3.0, 7.0]), statistics=ALL, config=tiny)
    assert np.isnan(r[Statistic.MEANCLIP]) and r[Statistic.NCLIPPED] == 4
    # two equal survivors: variance 0, later passes keep exactly them
    r = compute_statistics(np.array([1.0, 2.0, 2.0, 3.0]), statistics=ALL, config=tiny)
    assert r[Statistic.MEANCLIP] == 2.0 and r[Statistic.VARIANCECLIP] == 0.0 and r[Statistic.NCLIPPED] == 2


def test_nan_and_inf_inputs():
    x = np.array([1.0, 2.0, np.nan, 3.0, np.inf, -np.inf, 4.0])
    safe = compute_statistics(x, statistics=ALL)
    assert safe[Statistic.NPOINT] == 4 and safe[Statistic.NMASKED] == 3
    assert safe[Statistic.MEAN] == 2.5 and safe[Statistic.MEDIAN] == 2.5 and safe[Statistic.MEANCLIP] == 2.5
    unsafe = compute_statistics(x, statistics=ALL, config=StatsConfig(nan_safe=False))
    assert unsafe[Statistic.NPOINT] == 7 and unsafe[Statistic.NMASKED] == 0
    assert np.isnan(unsafe[Statistic.MEAN])  # poisoned, as in the reference
    # the clip passes reject non-finite samples; the quartiles are over the finite ones
    assert unsafe[Statistic.MEANCLIP] == 2.5 and unsafe[Statistic.NCLIPPED] == 3
    assert unsafe[Statistic.MIN] == -np.inf and unsafe[Statistic.MAX] == np.inf


def test_weighted_moments_and_errors(rng):
    x = rng.normal(size=50)
    w = rng.uniform(0.5, 2.0, size=50)
    v = rng.uniform(0.1, 1.0, size=50)
    s1, s2 = w.sum(), (w * w).sum()
    mu = (w * x).sum() / s1
    var = (w * (x - mu) ** 2).sum() / s1 * s1**2 / (s1**2 - s2)
    cfg = StatsConfig(weighted=True)
    vals, errs = compute_statistics(x, weights=w, statistics=ALL, config=cfg, errors=True)
    np.testing.assert_allclose(vals[Statistic.MEAN], mu, rtol=1e-13)
    np.testing.assert_allclose(vals[Statistic.VARIANCE], var, rtol=1e-12)
    np.testing.assert_allclose(vals[Statistic.SUM], (w * x).sum(), rtol=1e-13)
    np.testing.assert_allclose(errs[Statistic.MEAN], math.sqrt(var * s2 / s1**2), rtol=1e-12)
    assert vals[Statistic.MEDIAN] == np.median(x)  # median stays unweighted
    np.testing.assert_allclose(errs[Statistic.MEDIAN], math.sqrt(math.pi / 2 * var / 50), rtol=1e-12)
    np.testing.assert_allclose(errs[Statistic.VARIANCE], math.sqrt(2 * 49 * var**2 / 50**2), rtol=1e-12)
    _, e_in = compute_statistics(
        x, weights=w, variance=v, statistics=[Statistic.MEAN], errors=True,
        config=StatsConfig(weighted=True, error_from_input_variance=True),
    )
    np.testing.assert_allclose(e_in[Statistic.MEAN] ** 2, (w * w * v).sum() / s1**2, rtol=1e-12)
    _, e_mo = compute_statistics(
        x, weights=w, variance=v, statistics=[Statistic.MEAN], errors=True,
        config=StatsConfig(weighted=True, error_mosaic_mode=True),
    )
    np.testing.assert_allclose(e_mo[Statistic.MEAN] ** 2, (w * v).sum() / s1, rtol=1e-12)
    mean, var_c, ncl, err = reference_clip(x, w=w, v=v, error_mode="input")
    vals, errs = compute_statistics(
        x, weights=w, variance=v, statistics=ALL, errors=True,
        config=StatsConfig(weighted=True, error_from_input_variance=True),
    )
    np.testing.assert_allclose(vals[Statistic.MEANCLIP], mean, rtol=1e-12)
    np.testing.assert_allclose(errs[Statistic.MEANCLIP] ** 2, err, rtol=1e-12)


def test_inverse_variance_weights_skip_nonpositive():
    x = np.array([1.0, 2.0, 3.0, 100.0])
    v = np.array([1.0, 0.5, 0.25, 0.0])
    r = compute_statistics(x, variance=v, statistics=ALL, config=StatsConfig(weighted=True))
    w = 1.0 / v[:3]
    np.testing.assert_allclose(r[Statistic.MEAN], (w * x[:3]).sum() / w.sum(), rtol=1e-14)
    assert r[Statistic.NPOINT] == 3 and r[Statistic.NMASKED] == 1 and r[Statistic.MAX] == 3.0


def test_ormask_and_propagation_thresholds():
    x = np.arange(10.0)
    sat, cr, bad = int(MaskPlane.SAT), int(MaskPlane.CR), int(MaskPlane.BAD)
    m = np.zeros(10, np.uint32)
    m[0] = sat | bad  # excluded
    m[1] = cr  # good: enters ORMASK
    cfg = StatsConfig(and_mask=("BAD",), mask_propagation_thresholds={"SAT": 0.09})
    r = compute_statistics(x, mask=m, statistics=[Statistic.ORMASK], config=cfg)
    # rejected SAT weight 1 over 1 + 9 = 0.1 > 0.09
    assert r[Statistic.ORMASK] == cr | sat
    cfg = StatsConfig(and_mask=("BAD",), mask_propagation_thresholds={"SAT": 0.1})
    assert compute_statistics(x, mask=m, statistics=[Statistic.ORMASK], config=cfg)[Statistic.ORMASK] == cr


# ------------------------------------------------------------------------------ reference oracle


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 80),
    niter=st.integers(1, 4),
    nsig=st.floats(0.5, 5.0),
    weighted=st.booleans(),
)
def test_meanclip_matches_numpy_reference(seed, n, niter, nsig, weighted):
    g = np.random.default_rng(seed)
    x = g.normal(size=n) * g.choice([1.0, 30.0], size=n, p=[0.85, 0.15])
    x[g.random(n) < 0.1] = np.nan
    x[g.random(n) < 0.05] = np.inf
    if g.random() < 0.3:
        x = np.round(x)  # ties
    m = (g.random(n) < 0.2).astype(np.uint32) * np.uint32(MaskPlane.BAD)
    w = g.uniform(0.2, 3.0, size=n) if weighted else None
    v = g.uniform(0.1, 2.0, size=n)
    cfg = StatsConfig(and_mask=int(MaskPlane.BAD), num_iter=niter, num_sigma_clip=nsig, weighted=weighted,
                      error_from_input_variance=True)
    vals, errs = compute_statistics(
        x, mask=m, weights=w, variance=v, statistics=ALL, config=cfg, errors=True
    )
    mean, var, ncl, err = reference_clip(
        x, m, w, v, and_mask=int(MaskPlane.BAD), nsig=nsig, niter=niter, error_mode="input"
    )
    np.testing.assert_allclose(vals[Statistic.MEANCLIP], mean, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(vals[Statistic.VARIANCECLIP], var, rtol=1e-8, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(errs[Statistic.MEANCLIP] ** 2, err, rtol=1e-9, atol=1e-15, equal_nan=True)
    assert vals[Statistic.NCLIPPED] == ncl


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 40))
def test_sample_order_does_not_matter(seed, k):
    g = np.random.default_rng(seed)
    x = np.round(g.normal(size=(6, k)), 1)
    w = g.uniform(0.1, 2.0, size=(6, k))
    m = (g.random((6, k)) < 0.2).astype(np.uint32)
    cfg = StatsConfig(and_mask=1, weighted=True, num_iter=2)
    a = compute_statistics(x, mask=m, weights=w, axis=1, statistics=ALL, config=cfg)
    p = g.permutation(k)
    b = compute_statistics(x[:, p], mask=m[:, p], weights=w[:, p], axis=1, statistics=ALL, config=cfg)
    for s in ALL:
        np.testing.assert_array_equal(a[s], b[s], err_msg=s.value)


# ------------------------------------------------------------------------------ dask paths


def _inputs(rng, shape):
    x = rng.normal(10.0, 2.0, size=shape).astype(np.float32)
    x[rng.random(shape) < 0.01] = 500.0
    x[rng.random(shape) < 0.01] = np.nan
    m = np.where(rng.random(shape) < 0.05, np.uint32(MaskPlane.BAD | MaskPlane.SAT), np.uint32(0))
    m |= np.where(rng.random(shape) < 0.05, np.uint32(MaskPlane.CR), np.uint32(0))
    v = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
    return x, m, v


CONFIGS = [
    StatsConfig(and_mask=("BAD",)),
    StatsConfig(and_mask=("BAD",), nan_safe=False, error_mosaic_mode=True),
    StatsConfig(and_mask=("BAD",), weighted=True, error_from_input_variance=True,
                mask_propagation_thresholds={"SAT": 0.03}),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_whole_image_dask_equals_numpy(rng, cfg):
    x, m, v = _inputs(rng, (157, 203))
    eager, eerr = compute_statistics(x, mask=m, variance=v, statistics=ALL, config=cfg, errors=True)
    for chunks in [(37, 41), (157, 203), (10, 200), (64, 17)]:
        lazy, lerr = compute_statistics(
            da.from_array(x, chunks=chunks), mask=da.from_array(m, chunks=(50, 50)), variance=v,
            statistics=ALL, config=cfg, errors=True,
        )
        lazy, lerr = dask.compute(lazy, lerr)
        for s in ALL:
            assert lazy[s].shape == () and lazy[s].dtype == eager[s].dtype
            exact = (Statistic.MEDIAN, Statistic.IQRANGE, Statistic.MIN, Statistic.MAX, Statistic.NPOINT,
                     Statistic.NMASKED, Statistic.NCLIPPED, Statistic.ORMASK)
            if s in exact:
                np.testing.assert_array_equal(lazy[s], eager[s], err_msg=f"{s} {chunks}")
            else:
                np.testing.assert_allclose(lazy[s], eager[s], rtol=1e-10, equal_nan=True, err_msg=f"{s} {chunks}")
                np.testing.assert_allclose(lerr[s], eerr[s], rtol=1e-9, equal_nan=True, err_msg=f"{s} {chunks}")
    assert eager[Statistic.ORMASK] & int(MaskPlane.CR)
    assert bool(eager[Statistic.ORMASK] & int(MaskPlane.SAT)) == bool(cfg.mask_propagation_thresholds)
    if not cfg.nan_safe:
        assert np.isnan(eager[Statistic.MEAN]) and np.isfinite(eager[Statistic.MEANCLIP])


@settings(max_examples=15, deadline=None)
@given(cy=st.integers(4, 60), cx=st.integers(4, 60), seed=st.integers(0, 1000))
def test_whole_image_quantiles_exact_for_any_chunking(cy, cx, seed):
    g = np.random.default_rng(seed)
    x = g.standard_t(3, size=(45, 52)) * 10.0 ** g.integers(-3, 4)
    x[g.random(x.shape) < 0.02] = np.nan
    r = compute_statistics(da.from_array(x, chunks=(cy, cx)), statistics=[Statistic.MEDIAN, Statistic.IQRANGE])
    good = x[np.isfinite(x)]
    q25, q50, q75 = np.percentile(good, [25, 50, 75])
    # numpy's "linear" percentile (np.median's mean of the middle pair can differ by one ulp)
    assert float(r[Statistic.MEDIAN].compute()) == q50
    np.testing.assert_allclose(float(r[Statistic.IQRANGE].compute()), q75 - q25, rtol=1e-15)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_axis_dask_equals_numpy(rng, axis):
    x, m, v = _inputs(rng, (23, 157, 61))
    x2 = x.reshape(23, 157, 61)
    w = rng.uniform(0.5, 1.5, size=x2.shape)
    cfg = StatsConfig(and_mask=("BAD",), weighted=True, num_iter=2)
    eager = compute_statistics(x2, mask=m, weights=w, axis=axis, statistics=ALL, config=cfg)
    lazy = compute_statistics(
        da.from_array(x2, chunks=(5, 37, 41)), mask=m, weights=da.from_array(w, chunks=(7, 40, 20)),
        axis=axis, statistics=ALL, config=cfg,
    )
    for s in ALL:
        got = lazy[s].compute()
        assert got.shape == eager[s].shape and got.dtype == eager[s].dtype
        np.testing.assert_array_equal(got, eager[s], err_msg=s.value)


def test_lazy_and_graph_size(rng):
    x = da.from_array(rng.normal(size=(300, 280)), chunks=(37, 41))
    nchunks = x.npartitions
    with raise_if_dask_computes():
        mean = compute_statistics(x, statistics=[Statistic.MEAN])[Statistic.MEAN]
        clip = compute_statistics(x, statistics=[Statistic.MEANCLIP, Statistic.MEDIAN])
        along = compute_statistics(x, axis=0, statistics=[Statistic.MEANCLIP])[Statistic.MEANCLIP]
    base = graph_size(x)
    assert graph_size(mean) - base <= nchunks + 20
    # 1 moments + 6 radix levels + 3 clip passes: one task per chunk each, plus tree sums of histograms
    assert graph_size(clip[Statistic.MEANCLIP]) - base <= 22 * nchunks + 100
    assert graph_size(along) - base <= 4 * nchunks


# ------------------------------------------------------------------------------ validation


def test_config_validation():
    with pytest.raises(ValueError, match="mutually exclusive"):
        StatsConfig(error_from_input_variance=True, error_mosaic_mode=True)
    with pytest.raises(ValueError, match="must lie in"):
        StatsConfig(mask_propagation_thresholds={"SAT": 1.5})
    with pytest.raises(ValueError, match="not a 32-bit mask"):
        StatsConfig(and_mask=2**33)
    with pytest.raises(ValueError, match="greater than 0"):
        StatsConfig(num_sigma_clip=0.0)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        StatsConfig(num_iter=0)
    with pytest.raises(ValueError, match="Extra inputs"):
        StatsConfig(sigma=3)


def test_input_validation():
    x = np.arange(12.0).reshape(3, 4)
    with pytest.raises(SchemaError, match="empty array"):
        compute_statistics(np.zeros((0, 3)))
    with pytest.raises(SchemaError, match="axis 2 is out of range"):
        compute_statistics(x, axis=2)
    with pytest.raises(SchemaError, match="axis must be an integer"):
        compute_statistics(x, axis=(0, 1))
    with pytest.raises(SchemaError, match="mask of shape"):
        compute_statistics(x, mask=np.zeros((2, 4), np.uint32))
    with pytest.raises(SchemaError, match="variance of shape"):
        compute_statistics(x, variance=np.zeros((4, 4)))
    with pytest.raises(SchemaError, match="mask must hold integers"):
        compute_statistics(x, mask=np.zeros((3, 4)))
    with pytest.raises(SchemaError, match="values must be real"):
        compute_statistics(x.astype(complex))
    with pytest.raises(SchemaError, match="need weights or a variance"):
        compute_statistics(x, config=StatsConfig(weighted=True))
    with pytest.raises(SchemaError, match="need a variance array"):
        compute_statistics(x, config=StatsConfig(error_from_input_variance=True))
    with pytest.raises(SchemaError, match="unknown statistic 'MODE'"):
        compute_statistics(x, statistics=["MODE"])
    with pytest.raises(SchemaError, match="no statistic requested"):
        compute_statistics(x, statistics=[])
    with pytest.raises(SchemaError, match="config must be a StatsConfig"):
        compute_statistics(x, config={"num_iter": 2})
    with pytest.raises(MaskPlaneError, match="unknown mask plane 'GLITCH'"):
        compute_statistics(x, config=StatsConfig(and_mask=("GLITCH",)))
    with pytest.warns(SkystackWarning, match="weights are ignored"):
        r = compute_statistics(x, weights=np.ones_like(x), statistics="MEAN")
    assert r[Statistic.MEAN] == 5.5


def test_dataarray_inputs(rng):
    import xarray as xr

    x = rng.normal(size=(6, 40))
    m = (rng.random((6, 40)) < 0.2).astype(np.uint32)
    cfg = StatsConfig(and_mask=1)
    plain = compute_statistics(x, mask=m, axis=1, statistics=ALL, config=cfg)
    wrapped = compute_statistics(xr.DataArray(x, dims=("a", "b")).chunk({"b": 7}), mask=xr.DataArray(m), axis=1,
                                 statistics=ALL, config=cfg)
    for s in ALL:
        np.testing.assert_array_equal(wrapped[s].compute(), plain[s], err_msg=s.value)


def test_plane_names_use_given_dictionary():
    x = np.array([1.0, 2.0, 30.0])
    m = np.array([0, 0, 1 << 25], np.uint32)
    r = compute_statistics(x, mask=m, statistics="MEAN", config=StatsConfig(and_mask=("GHOST",)), planes={"GHOST": 25})
    assert r[Statistic.MEAN] == 1.5


def test_inputs_not_modified(rng):
    x, m, v = _inputs(rng, (20, 30))
    copies = [a.copy() for a in (x, m, v)]
    compute_statistics(x, mask=m, variance=v, statistics=ALL, config=CONFIGS[1])
    for a, b in zip((x, m, v), copies):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ fast path


EXACT_STATS = (Statistic.MEDIAN, Statistic.IQRANGE, Statistic.MIN, Statistic.MAX, Statistic.NPOINT,
               Statistic.NMASKED, Statistic.NCLIPPED, Statistic.ORMASK)


def _hard_samples(g, shape, kind):
    """Samples that stress the quartile selection: ties, sorted runs, outliers, tiny or huge ranges."""
    n = int(np.prod(shape))
    if kind == "gauss":
        x = g.normal(1000.0, 10.0, n)
    elif kind == "integer":
        x = np.round(g.normal(50.0, 2.0, n))
    elif kind == "sorted":
        x = np.sort(g.standard_t(2, n))
    elif kind == "reversed":
        x = np.sort(g.normal(size=n))[::-1].copy()
    elif kind == "constant":
        x = np.full(n, 3.25)
    elif kind == "two_values":
        x = np.where(g.random(n) < 0.7, 1.0, 2.0)
    elif kind == "tiny_range":
        x = 1.0 + g.integers(0, 4, n) * np.spacing(np.float32(1.0)).astype(np.float64)
    else:  # huge range with outliers
        x = g.standard_t(1, n) * 10.0 ** g.integers(-20, 20, n)
    x = x.reshape(shape)
    x[g.random(shape) < 0.05] = 1e6
    x[g.random(shape) < 0.03] = np.nan
    return x


KINDS_OF_SAMPLES = ["gauss", "integer", "sorted", "reversed", "constant", "two_values", "tiny_range", "huge"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.sampled_from([65, 97, 700, 2048, 2049, 5000]),
    kind=st.sampled_from(KINDS_OF_SAMPLES),
    f32=st.booleans(),
    niter=st.integers(1, 4),
)
def test_fast_path_equals_general_path(seed, k, kind, f32, niter):
    """Unweighted rows of > 64 samples take the gather-and-select path; unit multiplicative weights
    take the sorted general path: same counts, quantiles and clip decisions, sums to rounding."""
    g = np.random.default_rng(seed)
    x = _hard_samples(g, (3, k), kind)
    if f32:
        x = x.astype(np.float32)
    m = np.where(g.random(x.shape) < 0.1, np.uint32(MaskPlane.BAD | MaskPlane.SAT), np.uint32(0))
    thresholds = {"SAT": 0.05}
    fast_cfg = StatsConfig(and_mask=("BAD",), num_iter=niter, mask_propagation_thresholds=thresholds)
    slow_cfg = StatsConfig(and_mask=("BAD",), num_iter=niter, mask_propagation_thresholds=thresholds, weighted=True)
    fast, ferr = compute_statistics(x, mask=m, axis=1, statistics=ALL, config=fast_cfg, errors=True)
    slow, serr = compute_statistics(x, mask=m, weights=np.ones(x.shape), axis=1, statistics=ALL, config=slow_cfg,
                                    errors=True)
    for s in ALL:
        if s in EXACT_STATS:
            np.testing.assert_array_equal(fast[s], slow[s], err_msg=s.value)
        else:
            # the two paths add in different orders: up to n eps (sum |x|) / |sum x| apart, which for 2049
            # samples of the 'huge' kind (student-t over 40 decades) reaches 1.1e-12 of the mean
            np.testing.assert_allclose(fast[s], slow[s], rtol=1e-11, atol=1e-300, equal_nan=True, err_msg=s.value)
            np.testing.assert_allclose(ferr[s], serr[s], rtol=1e-11, atol=1e-300, equal_nan=True, err_msg=s.value)


@pytest.mark.parametrize("kind", KINDS_OF_SAMPLES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 2047, 2048, 3001, 16384])
def test_quartile_kernels_equal_numpy_percentile(kind, n):
    """Both selection kernels give numpy's "linear" quartiles exactly, for any value distribution."""
    g = np.random.default_rng(n)
    x = _hard_samples(g, (n,), kind)
    x = x[np.isfinite(x)]
    if x.size == 0:
        x = np.array([2.5])
    for dtype in (np.float64, np.float32):
        xs = x.astype(dtype)
        want = np.percentile(xs.astype(np.float64), [25, 50, 75])
        got_select = K.quartiles_select(xs.copy(), xs.size)
        sample, hist, bins, slots, cand = K.make_hist_scratch(xs.size, xs.dtype)
        before = xs.copy()
        got_hist = K.quartiles_hist(xs, xs.size, sample, hist, bins, slots, cand)
        np.testing.assert_array_equal(xs, before)
        assert np.all(slots == -1)
        np.testing.assert_array_equal(got_select, want, err_msg=f"select {dtype}")
        np.testing.assert_array_equal(got_hist, want, err_msg=f"hist {dtype}")


def test_select_inplace_partitions(rng):
    x = rng.integers(0, 20, 1000).astype(np.float64)
    for k in (0, 1, 499, 500, 998, 999):
        a = x.copy()
        K.select_inplace(a, 0, a.size, k)
        assert a[k] == np.sort(x)[k]
        assert a[:k].max(initial=-np.inf) <= a[k] <= a[k + 1:].min(initial=np.inf)


def test_grid_statistics_equal_per_cell_statistics(rng):
    x, m, _ = _inputs(rng, (150, 133))
    ye, xe = np.array([0, 40, 81, 150]), np.array([3, 50, 64, 130])
    cfg = StatsConfig(and_mask=("BAD",), mask_propagation_thresholds={"SAT": 0.02})
    for cfg_i in (cfg, StatsConfig(and_mask=("BAD",), nan_safe=False)):
        got, gerr = grid_statistics(x, mask=m, yedges=ye, xedges=xe, statistics=ALL, config=cfg_i, errors=True)
        for i in range(3):
            for j in range(3):
                cell = (slice(ye[i], ye[i + 1]), slice(xe[j], xe[j + 1]))
                want, werr = compute_statistics(x[cell].ravel(), mask=m[cell].ravel(), statistics=ALL, config=cfg_i,
                                                errors=True)
                for s in ALL:
                    assert got[s].shape == (3, 3) and got[s].dtype == want[s].dtype
                    np.testing.assert_array_equal(got[s][i, j], want[s], err_msg=f"{s} {i} {j}")
                    np.testing.assert_array_equal(gerr[s][i, j], werr[s], err_msg=f"{s} {i} {j}")


def test_grid_statistics_validation():
    x = np.zeros((10, 12), np.float32)
    with pytest.raises(SchemaError, match="needs a 2-D array"):
        grid_statistics(x[0], yedges=[0, 1], xedges=[0, 5])
    with pytest.raises(SchemaError, match=r"yedges \[0, 11\] are not increasing edges inside 0..10"):
        grid_statistics(x, yedges=[0, 11], xedges=[0, 5])
    with pytest.raises(SchemaError, match=r"xedges \[5, 5\] are not increasing"):
        grid_statistics(x, yedges=[0, 10], xedges=[5, 5])
    with pytest.raises(SchemaError, match="config must be a StatsConfig"):
        grid_statistics(x, yedges=[0, 10], xedges=[0, 5], config={})
    with pytest.raises(SchemaError, match="need weights or a variance"):
        grid_statistics(x, yedges=[0, 10], xedges=[0, 5], config=StatsConfig(weighted=True))
    with pytest.raises(SchemaError, match="mask of shape"):
        grid_statistics(x, mask=np.zeros((3, 3), np.uint32), yedges=[0, 10], xedges=[0, 5])


@given(n=st.integers(1, 5000), ties=st.booleans(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_quartiles_hist_adaptive_sizes_match_numpy_percentile(n, ties, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0, n)
    if ties:
        a = np.round(a * 3.0)
    a = a.astype(np.float32)
    sample, hist, bins, slots, cand = K.make_hist_scratch(n, a.dtype)
    before = a.copy()
    res = K.quartiles_hist(a, n, sample, hist, bins, slots, cand)
    np.testing.assert_array_equal(a, before)
    assert (slots == -1).all()
    want = np.percentile(a.astype(np.float64), [25, 50, 75])
    np.testing.assert_allclose(res, want, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("n", [100, 127, 128, 1000, 4096, 16384])
@pytest.mark.parametrize("kind", ["constant", "sample_all_equal", "sample_misleading", "huge_range"])
def test_quartiles_exact_when_the_sample_misleads(rng, n, kind):
    """The bracket from the systematic sample only steers the speed: the quartiles stay exact."""
    a = rng.normal(0.0, 1.0, n)
    stride = np.zeros(n, bool)
    stride[(np.arange(256) * n) // 256] = True  # the positions the largest sample reads
    if kind == "constant":
        a[:] = 3.5
    elif kind == "sample_all_equal":
        a[stride] = 1000.0
    elif kind == "sample_misleading":
        a[stride] = 1000.0 + rng.normal(0.0, 1e-3, stride.sum())
    else:
        a[::7] = 3e38
        a[1::11] = -3e38
    a = a.astype(np.float32)
    res = K.quartiles_hist(a, n, *K.make_hist_scratch(n, a.dtype))
    np.testing.assert_allclose(res, np.percentile(a.astype(np.float64), [25, 50, 75]), rtol=1e-15, atol=0.0)
