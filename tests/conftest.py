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


@pytest.fixture(scope="session")
def small_sim():
    """Four simulated 256x256 exposures with every artifact switched on (shared, do not modify)."""
    from pipeline.sim import SimConfig, simulate

    return simulate(SimConfig.small(), seed=1)


@pytest.fixture(scope="session")
def small_tract(small_sim):
    """A tract centred on ``small_sim`` with 200-pixel patches and a 20-pixel border."""
    from pipeline.model.skymap import SkyMap
    from pipeline.model.wcs import get_wcs

    footprints = [(get_wcs(e), e.image.shape) for e in small_sim.exposures]
    return SkyMap.centred_on(footprints, patch_inner=(200, 200), patch_border=20).tracts[0]


@pytest.fixture(scope="session")
def two_visit_sim():
    """Two small simulated exposures (96x112), the input of the warp-graph tests."""
    from pipeline.sim import SimConfig, simulate

    return simulate(SimConfig.small(), seed=4, n_visits=2, shape=(96, 112))


def make_small_repo(tmp_path, exposures):
    """A repository in ``tmp_path`` holding ``exposures``, with 64-pixel patches on a tract fitted to them."""
    from graphs.ingest import ingest_datasets
    from pipeline.io.repo import open_repo

    repo = open_repo(tmp_path / "repo.zarr", create=True)
    ingest_datasets(repo, exposures, skymap_kwargs=dict(patch_inner=(64, 64), patch_border=8, margin_arcsec=4.0))
    return repo
