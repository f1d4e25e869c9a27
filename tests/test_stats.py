"""Tests of pipeline.stats (robust masked statistics)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stats import IQR_TO_SIGMA, Statistic, StatsConfig, compute_statistics


def test_plain_moments_match_numpy(rng):
    x = rng.normal(3.0, 2.0, size=5001)
    r = compute_statistics(x, statistics=list(Statistic))
    np.testing.assert_allclose(r[Statistic.MEAN], x.mean(), rtol=1e-12)
    np.testing.assert_allclose(r[Statistic.VARIANCE], x.var(ddof=1), rtol=1e-12)
    np.testing.assert_allclose(r[Statistic.MEDIAN], np.median(x), rtol=1e-14)
    q25, q75 = np.percentile(x, [25, 75])
    np.testing.assert_allclose(r[Statistic.IQRANGE], q75 - q25, rtol=1e-12)
    assert r[Statistic.NPOINT] == x.size
    assert r[Statistic.NMASKED] == 0


def test_iqr_to_sigma_constant():
    from scipy.stats import norm

    np.testing.assert_allclose(IQR_TO_SIGMA, 1.0 / (2.0 * norm.ppf(0.75)), rtol=1e-14)


def test_config_error_modes_exclusive():
    with pytest.raises(ValueError, match="mutually exclusive"):
        StatsConfig(error_from_input_variance=True, error_mosaic_mode=True)
