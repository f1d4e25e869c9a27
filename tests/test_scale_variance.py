"""ScaleVariance: recovered factors on white and correlated noise, the limit rule, laziness."""

from __future__ import annotations

import dask
import numpy as np
import pydantic
import pytest
import scipy.ndimage

from pipeline.background import BackgroundConfig
from pipeline.errors import DataQualityError, SchemaError
from pipeline.model.masks import MaskPlane
from pipeline.model.schema import make_dataset
from pipeline.scale_variance import (
    REFERENCE_IQR_CONSTANT,
    ScaleVarianceConfig,
    compute_scale_factors,
    scale_variance,
)
from pipeline.stats import IQR_TO_SIGMA
from pipeline.testing import assert_lazy, graph_size, raise_if_dask_computes
from tests.conftest import make_tan_wcs

IDS = {"visit": 1234, "detector": 42}


def _exposure(image, variance, mask=None):
    mask = np.zeros(image.shape, np.uint32) if mask is None else mask
    return make_dataset(image.astype(np.float32), variance.astype(np.float32), mask, wcs=make_tan_wcs(),
                        attrs=IDS)


def _sky(h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return 500.0 + 0.04 * x - 0.025 * y + 2e-5 * x * y


@pytest.mark.parametrize("f", [0.5, 1.0, 2.0, 4.0])
def test_white_noise_factor_recovered(f):
    # true sigma 2; the variance plane under-states the variance by f, so the factor is f
    h = w = 1000
    rng = np.random.default_rng(int(f * 100))
    image = _sky(h, w) + rng.normal(0.0, 2.0, (h, w))
    exp = _exposure(image, np.full((h, w), 4.0 / f))
    pixel, img = dask.compute(*compute_scale_factors(exp))
    np.testing.assert_allclose(pixel, f, rtol=0.01)
    np.testing.assert_allclose(img, f, rtol=0.01)
    # uniform variance: both estimators agree exactly (reference test expectation)
    np.testing.assert_allclose(pixel, img, rtol=1e-9)
    ref_pixel = compute_scale_factors(exp, config=ScaleVarianceConfig(use_reference_constant=True)).pixel_factor
    np.testing.assert_allclose(ref_pixel.compute() / pixel, (REFERENCE_IQR_CONSTANT / IQR_TO_SIGMA) ** 2, rtol=1e-12)


def test_correlated_noise_factors():
    # White noise of variance s2 smoothed by a normalised kernel k has marginal variance
    # s2 * sum(k**2). (i) Variance plane left at s2: factor = sum(k**2) (here 0.375**2 = 0.140625).
    # (ii) Variance propagated as if independent, s2 * sum(k**2): factor = 1; correlations do not
    # change the marginal variance the estimator measures. The background removal takes out the
    # variance of the cell means, s2 sum(k)**2 / N per cell of N pixels: -(1/sum(k**2)) / N, i.e.
    # -0.04 % with 128-pixel cells, which the tolerance covers.
    h = w = 1000
    rng = np.random.default_rng(7)
    k1 = np.array([0.25, 0.5, 0.25])
    kernel = np.outer(k1, k1)
    sum_k2 = float((kernel**2).sum())
    assert sum_k2 == pytest.approx(0.140625)
    noise = scipy.ndimage.convolve(rng.normal(0.0, 3.0, (h, w)), kernel, mode="wrap")
    image = _sky(h, w) + noise
    cfg = ScaleVarianceConfig(background=BackgroundConfig(bin_size=128, use_approx=False,
                                                          ignored_mask_planes=ScaleVarianceConfig().mask_planes))
    for plane, expected in ((9.0, sum_k2), (9.0 * sum_k2, 1.0)):
        pixel, img = dask.compute(*compute_scale_factors(_exposure(image, np.full((h, w), plane)), config=cfg))
        np.testing.assert_allclose(pixel, expected, rtol=0.012)
        np.testing.assert_allclose(img, expected, rtol=0.012)
        # default 32-pixel cells: the predicted bias -1 / (sum(k**2) 1024) = -0.69 % is visible
        pixel = compute_scale_factors(_exposure(image, np.full((h, w), plane))).pixel_factor.compute()
        np.testing.assert_allclose(pixel, expected * (1.0 - 1.0 / (sum_k2 * 32 * 32)), rtol=0.004)
    # the reference's own test: two-tap correlation with unit marginal variance gives 1
    r1 = 0.4
    base = rng.normal(size=(h, w + 1))
    corr = (base[:, 1:] + r1 * base[:, :-1]) / np.sqrt(1 + r1 * r1)
    pixel = compute_scale_factors(_exposure(_sky(h, w) + corr, np.ones((h, w)))).pixel_factor.compute()
    np.testing.assert_allclose(pixel, 1.0, rtol=0.02)


def test_scale_variance_applies_factor_and_keeps_input(rng):
    h, w = 300, 260
    image = _sky(h, w) + rng.normal(0.0, 1.5, (h, w))
    mask = np.zeros((h, w), np.uint32)
    mask[10:20, 10:20] = MaskPlane.DETECTED
    image[10:20, 10:20] += 1000.0
    variance = np.full((h, w), 0.5)
    variance[0, :5] = 0.0  # excluded from the estimate, still multiplied
    variance[1, :5] = np.nan
    exp = _exposure(image, variance, mask)
    before = exp.copy(deep=True)
    out = scale_variance(exp)
    pixel = compute_scale_factors(exp).pixel_factor.compute()
    np.testing.assert_allclose(out["variance_scale"].values, pixel, rtol=0)
    np.testing.assert_allclose(pixel, 1.5**2 / 0.5, rtol=0.03)
    np.testing.assert_array_equal(out["image"].values, exp["image"].values)  # background restored exactly
    np.testing.assert_array_equal(out["mask"].values, exp["mask"].values)
    np.testing.assert_allclose(out["variance"].values, (exp["variance"].values * np.float32(pixel)), rtol=1e-6)
    assert np.isnan(out["variance"].values[1, 0]) and out["variance"].values[0, 0] == 0.0
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(exp[name].values, before[name].values)
    assert "variance_scale" not in exp
    assert "scale_variance" in out.attrs["provenance"] and out.attrs["visit"] == 1234


def test_image_based_fallback_and_limit_error(rng):
    h, w = 256, 256
    image = _sky(h, w) + rng.normal(0.0, 1.0, (h, w))
    # 40 % of the pixels claim a tiny variance: the pixel-based factor is inflated (~4), the median
    # variance (1) is still right, so with limit 2 the image-based factor (~1) is used
    variance = np.ones((h, w))
    variance[rng.uniform(size=(h, w)) < 0.4] = 1e-6
    exp = _exposure(image, variance)
    pixel, img = dask.compute(*compute_scale_factors(exp))
    assert pixel > 2.0
    np.testing.assert_allclose(img, 1.0, rtol=0.03)
    out = scale_variance(exp, config=ScaleVarianceConfig(limit=2.0))
    np.testing.assert_allclose(out["variance_scale"].values, img, rtol=0)
    # both above the limit: the error names the data and both factors
    exp_bad = _exposure(image, np.full((h, w), 1e-4))
    out = scale_variance(exp_bad)  # building is fine
    with pytest.raises(DataQualityError, match=r"exceeds the configured limit 10: pixel-based \d{4}\.?\d*, "
                                               r"image-based \d{4}.*\[visit=1234 detector=42\]"):
        out["variance"].compute()
    out = scale_variance(exp_bad, config=ScaleVarianceConfig(limit=1e5))
    np.testing.assert_allclose(out["variance_scale"].values, 1e4, rtol=0.03)


def test_fewer_than_two_good_pixels_gives_one(rng):
    h, w = 64, 64
    image = rng.normal(0.0, 5.0, (h, w))
    variance = np.zeros((h, w))
    variance[3, 3] = 1.0  # a single good pixel
    pixel, img = dask.compute(*compute_scale_factors(_exposure(image, variance)))
    assert pixel == 1.0 and img == 1.0
    out = scale_variance(_exposure(image, variance))
    np.testing.assert_array_equal(out["variance"].values, variance.astype(np.float32))
    # every pixel carries an ignored plane: the background fit fails when computed
    mask = np.full((h, w), MaskPlane.SAT, np.uint32)
    with pytest.raises(DataQualityError, match="every pixel carries an ignored mask plane"):
        compute_scale_factors(_exposure(image, np.ones((h, w)), mask)).pixel_factor.compute()


def test_numpy_dask_equal_lazy_and_graph_size(rng):
    h, w = 296, 328
    exp = _exposure(_sky(h, w) + rng.normal(0.0, 1.0, (h, w)), np.full((h, w), 0.8))
    eager = scale_variance(exp)
    chunked = exp.chunk({"y": 100, "x": 130})  # 3 x 3 chunks that do not divide the image
    lazy = assert_lazy(lambda: scale_variance(chunked))
    with raise_if_dask_computes():
        factors = compute_scale_factors(chunked)
    assert all(dask.is_dask_collection(f) and f.ndim == 0 for f in factors)
    np.testing.assert_array_equal(lazy["variance_scale"].values, eager["variance_scale"].values)
    np.testing.assert_array_equal(lazy["variance"].values, eager["variance"].values)
    # graph grows linearly with the number of chunks (the exact quantiles take a fixed number of
    # tree-reduction passes over the chunks)
    small = graph_size(scale_variance(exp.chunk({"y": 37, "x": 41}))["variance"].data)  # 64 chunks
    assert small < 100 * 64
    big = _exposure(np.tile(exp["image"].values, (2, 2)), np.full((2 * h, 2 * w), 0.8)).chunk({"y": 37, "x": 41})
    assert graph_size(scale_variance(big)["variance"].data) < 4.5 * small


def test_validation():
    with pytest.raises(SchemaError, match="expected an xarray.Dataset exposure, got ndarray"):
        scale_variance(np.zeros((4, 4)))
    exp = _exposure(np.zeros((64, 64)), np.ones((64, 64)))
    with pytest.raises(SchemaError, match=r"ScaleVariance needs one 2-D image.*visit=1234"):
        compute_scale_factors(exp.expand_dims(visit=[1, 2]))
    with pytest.raises(pydantic.ValidationError, match="limit"):
        ScaleVarianceConfig(limit=0.0)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        ScaleVarianceConfig(maskPlanes=("BAD",))
    cfg = ScaleVarianceConfig()
    assert cfg.background.bin_size == 32 and not cfg.background.use_approx
    assert cfg.background.ignored_mask_planes == cfg.mask_planes
    assert cfg.iqr_to_sigma == IQR_TO_SIGMA
