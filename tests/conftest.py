"""Fixtures shared by the whole suite."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS


def make_tan_wcs(ra=150.0, dec=2.0, scale_arcsec=0.2, crpix=(100.0, 100.0), rotation_deg=0.0) -> WCS:
    """A simple TAN WCS (0-based crpix given, stored 1-based)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [crpix[0] + 1.0, crpix[1] + 1.0]
    s = scale_arcsec / 3600.0
    c, sn = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    w.wcs.cd = np.array([[-s * c, s * sn], [s * sn, s * c]])
    return w


@pytest.fixture
def tan_wcs():
    return make_tan_wcs()


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
