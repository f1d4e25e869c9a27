"""Simulated skies: determinism, exactness of the truth, noise model, masks and artifacts."""

from __future__ import annotations

import math
import time

import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.special import erf

from conftest import make_tan_wcs
from pipeline import _kernels_sim as K
from pipeline.errors import SkystackError
from pipeline.model.masks import MaskPlane
from pipeline.model.schema import njy_per_unit, validate
from pipeline.model.wcs import get_wcs
from pipeline.sim import (
    GALAXY_DTYPE,
    SimConfig,
    _galaxy_matrices,
    _jacobian_arcsec,
    _to_sky,
    _to_tangent,
    simulate,
)

QUIET = dict(  # no transients, no defects
    n_trails=0, n_cosmic_rays=0, asteroid=False, variable_star=False, n_bad_columns=0, n_saturated_stars=0
)


def _moments(img, yy, xx):
    s = img.sum()
    cx, cy = (img * xx).sum() / s, (img * yy).sum() / s
    ixx = (img * (xx - cx) ** 2).sum() / s
    iyy = (img * (yy - cy) ** 2).sum() / s
    ixy = (img * (xx - cx) * (yy - cy)).sum() / s
    return s, cx, cy, ixx, iyy, ixy


def _centroid(image, x, y, half):
    ix, iy = int(round(x)), int(round(y))
    win = image[iy - half : iy + half + 1, ix - half : ix + half + 1].astype(np.float64)
    yy, xx = np.mgrid[iy - half : iy + half + 1, ix - half : ix + half + 1]
    s = win.sum()
    return (win * xx).sum() / s, (win * yy).sum() / s, s


@pytest.fixture(scope="module")
def small():
    return simulate(SimConfig.small(), seed=3)


@pytest.fixture(scope="module")
def bright_star():
    """One isolated, bright, unsaturated star (the 'saturating' slot with a high saturation level)."""
    cfg = SimConfig.small(
        **{**QUIET, "n_saturated_stars": 1}, n_stars=0, n_galaxies=0, n_visits=2,
        saturated_star_mag_range=(16.5, 16.5), saturation_adu=1e9, sip_amplitude_px=2.0,
    )
    return simulate(cfg, seed=11)


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_visits=0), "greater than or equal to 1"),
        (dict(shape=(8, 300)), r"both sizes in \[16, 8192\]"),
        (dict(rotation_deg=(10.0, -10.0)), r"rotation_deg=\(10.0, -10.0\) must satisfy"),
        (dict(seeing_fwhm_arcsec=(0.05, 1.0)), "seeing_fwhm_arcsec"),
        (dict(psf_stamp_size=24), "psf_stamp_size=24 must be odd"),
        (dict(pixel_scale_arcsec=0.0), "greater than 0.01"),
        (dict(banana=1), "Extra inputs are not permitted"),
        (dict(psf_model="airy"), "'gaussian' or 'moffat'"),
        (dict(sky_subtraction="some"), "'none', 'constant' or 'model'"),
        (dict(shape=(64, 64), edge_width=32), r"edge_width=32 leaves no interior on a \(64, 64\) detector"),
        (dict(shape=(64, 64), n_bad_columns=61), "n_bad_columns=61 exceeds the 60 interior columns"),
        (dict(shape=(64, 64), no_data_corner=65), r"no_data_corner=65 is larger than the \(64, 64\) detector"),
        (dict(cosmic_ray_adu=(10.0, 1.0)), "cosmic_ray_adu"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        SimConfig(**kwargs)


def test_config_frozen_described_and_small_preset():
    cfg = SimConfig.small(n_visits=2)
    assert cfg.n_visits == 2 and cfg.shape == (256, 256)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.n_visits = 3
    for name, info in SimConfig.model_fields.items():
        assert info.description, name


def test_simulate_argument_errors():
    with pytest.raises(SkystackError, match="config must be a SimConfig, got dict"):
        simulate({"n_visits": 1})
    with pytest.raises(SkystackError, match="seed must be a non-negative integer, got -1"):
        simulate(SimConfig.small(), seed=-1)
    with pytest.raises(SkystackError, match="seed must be a non-negative integer, got 1.5"):
        simulate(SimConfig.small(), seed=1.5)
    with pytest.raises(pydantic.ValidationError, match="n_visits"):
        simulate(SimConfig.small(), n_visits=-2)


def test_catalogue_distributions():
    cfg = SimConfig(n_visits=1, shape=(512, 512), n_stars=3000.0, n_galaxies=2000.0, star_count_slope=0.6)
    from pipeline.sim import _draw_catalogue

    stars, gals = _draw_catalogue(cfg, 7)
    assert stars.size > 5000 and gals.size > 3000
    normal = stars[~stars["saturating"]]
    # cumulative counts N(>f) ~ f**-0.6 between the limits: P(F > f) = (f^-s - fmax^-s) / (fmin^-s - fmax^-s)
    fmin, fmax = 10 ** (-0.4 * (np.array(cfg.star_mag_range)[::-1] - 31.4))
    for f in (3 * fmin, 30 * fmin, 300 * fmin):
        p = (f**-0.6 - fmax**-0.6) / (fmin**-0.6 - fmax**-0.6)
        frac = np.mean(normal["flux"] > f)
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / normal.size)
    np.testing.assert_allclose(normal["flux"], 10 ** (-0.4 * (normal["mag"] - 31.4)), rtol=1e-12)
    assert (stars["saturating"].sum() == cfg.n_saturated_stars)
    lo, hi = cfg.galaxy_r_e_arcsec
    assert gals["r_e"].min() >= lo and gals["r_e"].max() <= hi
    # log-uniform sizes: median at the geometric mean
    assert np.median(gals["r_e"]) == pytest.approx(math.sqrt(lo * hi), rel=0.05)
    assert np.mean(gals["sersic_n"] == 4.0) == pytest.approx(cfg.devaucouleurs_fraction, abs=0.03)
    # uniform on the sky: a disc around the field centre
    xi, eta = _to_tangent(cfg.ra, cfg.dec, stars["ra"], stars["dec"])
    r = np.hypot(xi, eta)
    assert np.mean(r < r.max() / math.sqrt(2)) == pytest.approx(0.5, abs=0.03)


# ---------------------------------------------------------------------------- determinism, schema


def test_determinism_and_seed_streams():
    cfg = SimConfig.small(n_visits=2)
    a, b = simulate(cfg, seed=5), simulate(cfg, seed=5)
    for ea, eb in zip(a.exposures, b.exposures):
        for name in ("image", "variance", "mask", "psf"):
            np.testing.assert_array_equal(ea[name].values, eb[name].values)
        assert ea.attrs == eb.attrs
    c = simulate(cfg, seed=6)
    assert not np.array_equal(a.exposures[0].image.values, c.exposures[0].image.values)
    assert not np.array_equal(a.truth.stars["ra"], c.truth.stars["ra"])
    # the catalogue and visit 0 do not depend on how many visits follow
    d = simulate(cfg, seed=5, n_visits=3, n_trails=0)
    e = simulate(cfg, seed=5, n_trails=0)
    np.testing.assert_array_equal(d.truth.stars, e.truth.stars)
    np.testing.assert_array_equal(d.truth.galaxies, e.truth.galaxies)
    assert d.truth.visits[0].wcs_header == e.truth.visits[0].wcs_header
    assert d.truth.visits[1].zero_point == e.truth.visits[1].zero_point


def test_exposures_follow_the_data_model(small):
    cfg = small.config
    assert len(small.exposures) == cfg.n_visits
    for i, ds in enumerate(small.exposures):
        validate(ds, kind="exposure")
        vt = small.truth.visits[i]
        assert ds.attrs["visit"] == cfg.first_visit + i == vt.visit
        assert ds.attrs["bunit"] == "adu" and ds.attrs["band"] == cfg.band and ds.attrs["detector"] == cfg.detector
        assert ds.attrs["exptime"] == cfg.exptime
        assert ds.attrs["mjd_obs"] == pytest.approx(cfg.mjd_start + i * cfg.visit_interval_hours / 24.0, abs=1e-9)
        assert abs(ds.attrs["zero_point"] - cfg.zero_point) <= cfg.zero_point_scatter
        assert ds.psf.shape == (3, 3, 25, 25)
        np.testing.assert_allclose(ds.psf.sum(("ky", "kx")).values, 1.0, rtol=1e-12)
        assert small.exposure(vt.visit) is ds
    # dithered and rotated: the pointings differ
    centres = [get_wcs(ds).pixel_to_world_values(127.5, 127.5) for ds in small.exposures]
    assert len({(round(float(r), 7), round(float(d), 7)) for r, d in centres}) == cfg.n_visits
    # chunking that does not divide the image changes nothing
    chunked = small.exposures[0].chunk({"y": 37, "x": 41})
    validate(chunked, kind="exposure")
    np.testing.assert_array_equal(chunked.image.values, small.exposures[0].image.values)


# ---------------------------------------------------------------------------- rendering exactness


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    ra0=st.floats(0.0, 359.9), dec0=st.floats(-80.0, 80.0), xi=st.floats(-3600.0, 3600.0), eta=st.floats(-3600.0, 3600.0)
)
def test_tangent_plane_round_trip(ra0, dec0, xi, eta):
    ra, dec = _to_sky(ra0, dec0, xi, eta)
    back = _to_tangent(ra0, dec0, ra, dec)
    np.testing.assert_allclose(back, (xi, eta), atol=1e-7)
    # the gnomonic projection of astropy agrees
    w = make_tan_wcs(ra=ra0, dec=dec0, scale_arcsec=1.0, crpix=(0.0, 0.0))
    x, y = w.all_world2pix([ra], [dec], 0)
    np.testing.assert_allclose([-x[0], y[0]], [xi, eta], atol=1e-6)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    dx=st.floats(-0.5, 0.5), dy=st.floats(-0.5, 0.5), sigma=st.floats(1.0, 4.0),
    flux=st.floats(1.0, 1e6), n=st.sampled_from([0.5, 1.0, 4.0]), r_e=st.floats(0.3, 4.0),
    q=st.floats(0.2, 1.0), theta=st.floats(0.0, math.pi), galaxy=st.booleans(),
)
def test_render_flux_and_centroid_exact(dx, dy, sigma, flux, n, r_e, q, theta, galaxy):
    # (sigma >= 1 px: the sampled centroid of a narrower pixel-integrated profile is itself biased by
    # ~exp(-2 pi^2 sigma^2), a property of sampling rather than of the renderer)
    shape = (121, 121)
    x, y = 60.0 + dx, 60.0 + dy
    kw = {}
    if galaxy:
        c, s = math.cos(theta), math.sin(theta)
        rot = np.array([[c, s], [-s, c]])
        kw = dict(sersic_n=[n], shape_matrix=(r_e * np.diag([1 / math.sqrt(q), math.sqrt(q)]) @ rot)[None], truncation=4.0)
    img = K.render_sources(shape, [x], [y], [flux], psf_kind="gaussian", psf_param=[sigma], **kw)
    yy, xx = np.mgrid[0:121, 0:121]
    s, cx, cy, *_ = _moments(img, yy, xx)
    # galaxies: the tabulated profile transform is linearly interpolated, which leaves a faint
    # error halo (~1e-7 of the flux) partly outside this image; the part of it wrapping around
    # the stamp moves the centroid by ~1e-5 px
    np.testing.assert_allclose(s, flux, rtol=1e-6 if galaxy else 1e-9)
    np.testing.assert_allclose([cx, cy], [x, y], atol=1e-4 if galaxy else 1e-6)


def test_gaussian_star_is_the_exact_pixel_integral():
    sigma, x, y = 1.1, 20.3, 19.8  # narrow: needs the alias terms
    img = K.render_sources((41, 41), [x], [y], [1.0], psf_kind="gaussian", psf_param=[sigma])
    edges = np.arange(42) - 0.5

    def band(c):
        return 0.5 * np.diff(erf((edges - c) / (sigma * math.sqrt(2.0))))

    np.testing.assert_allclose(img, np.outer(band(y), band(x)), atol=1e-7 * img.max())


def test_moffat_star_matches_brute_force_pixel_integration():
    beta, fwhm, x, y = 3.5, 3.0, 20.3, 19.8
    alpha = float(K.moffat_alpha(fwhm, beta))
    img = K.render_sources((41, 41), [x], [y], [1.0], psf_kind="moffat", psf_param=[alpha], beta=beta)
    os_ = 16
    yy, xx = np.mgrid[0 : 41 * os_, 0 : 41 * os_]
    xx = (xx + 0.5) / os_ - 0.5
    yy = (yy + 0.5) / os_ - 0.5
    prof = (beta - 1) / (math.pi * alpha**2) * (1 + ((xx - x) ** 2 + (yy - y) ** 2) / alpha**2) ** -beta
    brute = prof.reshape(41, os_, 41, os_).mean(axis=(1, 3))
    np.testing.assert_allclose(img, brute, atol=5e-4 * img.max())
    # half maximum of the continuous profile at fwhm / 2
    assert (1 + (fwhm / 2 / alpha) ** 2) ** -beta == pytest.approx(0.5, rel=1e-12)


def test_sersic_transforms_closed_forms():
    # n = 0.5 is a Gaussian exp(-ln2 r^2): transform exp(-2 pi^2 s^2 u^2) with s^2 = 1 / (2 ln 2)
    tab = K.sersic_ft_table(0.5, 5.0)
    u = tab.x[::37]
    np.testing.assert_allclose(tab(u), np.exp(-(math.pi**2) * u**2 / math.log(2.0)), atol=2e-6)
    # n = 1 (untruncated in practice at 20 r_e): (1 + (2 pi u / b)^2)^-3/2
    tab = K.sersic_ft_table(1.0, 20.0)
    u = tab.x[::37]
    np.testing.assert_allclose(tab(u), (1 + (2 * math.pi * u / K.sersic_b(1.0)) ** 2) ** -1.5, atol=2e-5)
    assert K.sersic_b(4.0) == pytest.approx(7.669, abs=1e-3)


def test_galaxy_second_moments_and_orientation():
    """An n=0.5 galaxy (Gaussian) of PA 30 deg east of north on a rotated WCS: moments in closed form."""
    w = make_tan_wcs(ra=150.0, dec=2.0, scale_arcsec=0.2, crpix=(50, 50), rotation_deg=25.0)
    g = np.zeros(1, GALAXY_DTYPE)
    g["ra"], g["dec"], g["r_e"], g["axis_ratio"], g["pa"], g["sersic_n"], g["flux"] = 150.0, 2.0, 0.8, 0.5, 30.0, 0.5, 1.0
    px, py = w.all_world2pix(g["ra"], g["dec"], 0)
    mats = _galaxy_matrices(g, _jacobian_arcsec(w, px, py, g["ra"], g["dec"]))
    sigma = 1.3
    img = K.render_sources((101, 101), px, py, [1.0], psf_kind="gaussian", psf_param=[sigma], sersic_n=[0.5],
                           shape_matrix=mats, truncation=5.0)
    yy, xx = np.mgrid[0:101, 0:101]
    _, _, _, ixx, iyy, ixy = _moments(img, yy, xx)
    # covariance on the sky (xi east, eta north), arcsec^2: major axis along (sin pa, cos pa)
    q, th = 0.5, math.radians(30.0)
    major = np.array([math.sin(th), math.cos(th)])
    minor = np.array([math.cos(th), -math.sin(th)])
    var = 0.8**2 / (2 * math.log(2.0))
    csky = var * (np.outer(major, major) / q + np.outer(minor, minor) * q)
    # pixel -> (xi, eta) Jacobian at the reference point of a TAN WCS: the CD matrix in arcsec
    s, c, sn = 0.2, math.cos(math.radians(25.0)), math.sin(math.radians(25.0))
    jac = s * np.array([[-c, sn], [sn, c]])
    jinv = np.linalg.inv(jac)
    cpix = jinv @ csky @ jinv.T + (sigma**2 + 1.0 / 12.0) * np.eye(2)
    np.testing.assert_allclose([ixx, iyy, ixy], [cpix[0, 0], cpix[1, 1], cpix[0, 1]], rtol=2e-3, atol=2e-3)


def test_static_sky_star_flux_and_psf_image_path(bright_star):
    truth = bright_star.truth
    star = truth.stars[0]
    w = make_tan_wcs(ra=float(star["ra"]), dec=float(star["dec"]), scale_arcsec=0.25, crpix=(40.3, 39.6), rotation_deg=40)
    sky = truth.static_sky(w, (80, 80), psf=1.6)
    np.testing.assert_allclose(sky.sum(), star["flux"], rtol=1e-3)
    yy, xx = np.mgrid[0:80, 0:80]
    _, cx, cy, ixx, iyy, _ = _moments(sky, yy, xx)
    np.testing.assert_allclose([cx, cy], [40.3, 39.6], atol=1e-6)
    np.testing.assert_allclose([ixx, iyy], 1.6**2 + 1 / 12, rtol=1e-6)
    # the same PSF given as an image; origin offsets shift the grid
    psf_img = K.psf_stamp(25, psf_kind="gaussian", psf_param=1.6)
    sky_img = truth.static_sky(w, (80, 80), psf=psf_img / psf_img.sum())
    np.testing.assert_allclose(sky_img, sky, atol=1e-5 * sky.max())
    shifted = truth.static_sky(w, (60, 60), x0=10, y0=20, psf=1.6)
    np.testing.assert_allclose(shifted, sky[20:80, 10:70], atol=1e-9 * sky.max())
    # default PSF: the mean seeing
    dflt = truth.static_sky(w, (80, 80))
    fwhm = np.mean([v.seeing_fwhm_arcsec for v in truth.visits]) / 0.25
    _, _, _, ixx, _, _ = _moments(dflt, yy, xx)
    np.testing.assert_allclose(ixx, (fwhm / K.FWHM_PER_SIGMA) ** 2 + 1 / 12, rtol=1e-3)


def test_static_sky_psf_image_path_with_galaxies(small):
    vt = small.truth.visits[0]
    sigma = 1.7
    by_sigma = small.truth.static_sky(vt.wcs_header, vt.shape, psf=sigma)
    stamp = K.psf_stamp(31, psf_kind="gaussian", psf_param=sigma)
    by_image = small.truth.static_sky(vt.wcs_header, vt.shape, psf=stamp)
    assert len(small.truth.galaxies) > 10
    np.testing.assert_allclose(by_image, by_sigma, atol=1e-5 * by_sigma.max())


def test_static_sky_is_the_exposure_model():
    """Without transients, a spatially constant PSF and exact sky subtraction, the expected image
    of a visit is the static sky rendered on its detector, converted with its zero point."""
    cfg = SimConfig.small(**{**QUIET, "n_saturated_stars": 1}, n_visits=2, psf_fwhm_gradient=0.0, sip_amplitude_px=1.5)
    sim = simulate(cfg, seed=2)
    for vt in sim.truth.visits:
        model = sim.truth.expected_image(vt.visit)
        sky = sim.truth.static_sky(vt.wcs_header, vt.shape, psf=vt.psf_fwhm_px / K.FWHM_PER_SIGMA)
        np.testing.assert_allclose(model, sky / vt.njy_per_adu, atol=1e-8 * model.max())
        assert model.max() > 1e4  # it contains real sources


def test_static_sky_errors(small):
    w = make_tan_wcs()
    with pytest.raises(SkystackError, match=r"odd sizes, got shape \(24, 25\)"):
        small.truth.static_sky(w, (10, 10), psf=np.ones((24, 25)))
    with pytest.raises(SkystackError, match="PSF sigma must be positive and finite, got -1.0"):
        small.truth.static_sky(w, (10, 10), psf=-1.0)
    with pytest.raises(SkystackError, match="finite with a positive sum"):
        small.truth.static_sky(w, (10, 10), psf=np.full((5, 5), np.nan))
    with pytest.raises(SkystackError, match=r"shape must be a pair \(ny, nx\), got 7"):
        small.truth.static_sky(w, 7)
    with pytest.raises(SkystackError, match=r"shape must be positive, got \(0, 5\)"):
        small.truth.static_sky(w, (0, 5))
    with pytest.raises(SkystackError, match="expected an astropy WCS, a FITS header or a header string, got int"):
        small.truth.static_sky(3, (10, 10))
    with pytest.raises(SkystackError, match=r"no visit 7 in this simulation \(visits \[1000, 1001, 1002, 1003\]\)"):
        small.truth.artifact_mask(7, w, (10, 10))
    with pytest.raises(SkystackError, match=r"unknown artifact kinds \['ufo'\]"):
        small.truth.artifact_mask(1000, w, (10, 10), kinds=("trail", "ufo"))
    with pytest.raises(SkystackError, match="PSF stamp size must be odd, got 24"):
        small.truth.visits[0].psf_image(10.0, 10.0, size=24)
    with pytest.raises(SkystackError, match="no asteroid"):
        simulate(SimConfig.small(asteroid=False, n_visits=1)).truth.asteroid_position(60400.0)


# ---------------------------------------------------------------------------- PSF


@pytest.mark.parametrize("seed", [0, 1])
def test_psf_grid_second_moments_match_fwhm(seed):
    cfg = SimConfig.small(n_visits=2, n_stars=0, n_galaxies=0, psf_fwhm_gradient=0.3)
    sim = simulate(cfg, seed=seed)
    for ds, vt in zip(sim.exposures, sim.truth.visits):
        assert cfg.seeing_fwhm_arcsec[0] <= vt.psf_fwhm_px * cfg.pixel_scale_arcsec <= cfg.seeing_fwhm_arcsec[1]
        assert math.hypot(*vt.psf_gradient) == pytest.approx(0.3)
        ny, nx = vt.shape
        yy, xx = np.mgrid[0:25, 0:25]
        for y in ds.psf_y.values:
            for x in ds.psf_x.values:
                stamp = ds.psf.sel(psf_y=y, psf_x=x).values
                _, cx, cy, ixx, iyy, ixy = _moments(stamp, yy, xx)
                assert abs(cx - 12) < 1e-9 and abs(cy - 12) < 1e-9 and abs(ixy) < 1e-9
                fwhm = K.FWHM_PER_SIGMA * math.sqrt(0.5 * (ixx + iyy) - 1.0 / 12.0)
                expect = vt.psf_fwhm_px * (
                    1 + vt.psf_gradient[0] * (x - (nx - 1) / 2) / nx + vt.psf_gradient[1] * (y - (ny - 1) / 2) / ny
                )
                assert fwhm == pytest.approx(expect, rel=0.02)
        # the FWHM varies across the grid by the configured gradient
        assert ds.psf.std(("psf_y", "psf_x")).max() > 0


def test_moffat_psf_grid_matches_profile():
    cfg = SimConfig.small(n_visits=1, n_stars=0, n_galaxies=0, psf_model="moffat", moffat_beta=3.0)
    sim = simulate(cfg, seed=4)
    vt, ds = sim.truth.visits[0], sim.exposures[0]
    x, y = float(ds.psf_x[2]), float(ds.psf_y[0])
    fwhm = float(vt.psf_fwhm(x, y))
    alpha = float(K.moffat_alpha(fwhm, 3.0))
    stamp = ds.psf.isel(psf_y=0, psf_x=2).values
    os_ = 16
    yy, xx = np.mgrid[0 : 25 * os_, 0 : 25 * os_]
    r2 = ((xx + 0.5) / os_ - 12.5) ** 2 + ((yy + 0.5) / os_ - 12.5) ** 2
    prof = (1 + r2 / alpha**2) ** -3.0
    brute = prof.reshape(25, os_, 25, os_).mean(axis=(1, 3))
    brute /= brute.sum()
    np.testing.assert_allclose(stamp, brute, atol=1e-3 * stamp.max())


# ---------------------------------------------------------------------------- positions and photometry


def test_bright_star_centroid_at_wcs_position(bright_star):
    star = bright_star.truth.stars[0]
    for ds, vt in zip(bright_star.exposures, bright_star.truth.visits):
        w = get_wcs(ds)
        assert w.sip is not None
        x, y = w.world_to_pixel_values(star["ra"], star["dec"])
        cx, cy, _ = _centroid(ds.image.values, float(x), float(y), 12)
        assert abs(cx - x) < 0.02 and abs(cy - y) < 0.02


def test_zero_point_converts_adu_to_truth_flux(bright_star):
    star = bright_star.truth.stars[0]
    fluxes, errs = [], []
    for ds in bright_star.exposures:
        x, y = get_wcs(ds).world_to_pixel_values(star["ra"], star["dec"])
        ix, iy = int(round(float(x))), int(round(float(y)))
        sl = (slice(iy - 20, iy + 21), slice(ix - 20, ix + 21))
        adu = ds.image.values[sl].astype(np.float64).sum()
        err = math.sqrt(ds.variance.values[sl].astype(np.float64).sum())
        scale = njy_per_unit(ds.attrs["zero_point"])
        assert abs(adu * scale - star["flux"]) < 5 * err * scale + 2e-4 * star["flux"]
        fluxes.append(adu)
        errs.append(err / adu)
    # different zero points: the ADU differ by the zero-point ratio
    zps = [ds.attrs["zero_point"] for ds in bright_star.exposures]
    assert abs(zps[0] - zps[1]) > 0.01
    assert fluxes[0] / fluxes[1] == pytest.approx(10 ** (0.4 * (zps[0] - zps[1])), rel=5 * math.hypot(*errs))


def test_galaxy_photometry_in_exposure():
    cfg = SimConfig.small(**QUIET, n_stars=0, n_galaxies=6, n_visits=1, galaxy_mag_range=(18.0, 18.0),
                          galaxy_r_e_arcsec=(0.3, 0.5), sky_subtraction="model", read_noise_adu=0.0)
    sim = simulate(cfg, seed=8)
    ds, vt = sim.exposures[0], sim.truth.visits[0]
    model = sim.truth.expected_image(vt.visit)
    scale = vt.njy_per_adu
    on = 0
    for g in sim.truth.galaxies:
        x, y = vt.wcs().all_world2pix([g["ra"]], [g["dec"]], 0)
        ix, iy = int(round(float(x[0]))), int(round(float(y[0])))
        if not (40 <= ix < 216 and 40 <= iy < 216):
            continue
        on += 1
        sl = (slice(iy - 40, iy + 41), slice(ix - 40, ix + 41))
        err = math.sqrt(ds.variance.values[sl].astype(np.float64).sum())
        assert abs(ds.image.values[sl].sum() - model[sl].sum()) < 5 * err
        assert model[sl].sum() * scale == pytest.approx(g["flux"], rel=0.01)  # neighbours may add a little
    assert on >= 1


# ---------------------------------------------------------------------------- noise and variance


@pytest.mark.parametrize("factor", [1.0, 2.5])
def test_noise_matches_variance_plane(factor):
    cfg = SimConfig.small(**QUIET, n_stars=0, n_galaxies=0, n_visits=1, shape=(512, 512), variance_factor=factor,
                          sky_subtraction="none", sky_poly_order=3)
    sim = simulate(cfg, seed=21)
    ds, vt = sim.exposures[0], sim.truth.visits[0]
    model = sim.truth.expected_image(vt.visit)
    ny, nx = vt.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    np.testing.assert_allclose(model, vt.sky(xx, yy), rtol=1e-12)
    expected_var = (model / vt.gain + vt.read_noise_adu**2) * factor
    np.testing.assert_allclose(ds.variance.values, expected_var, rtol=1e-6)
    good = ds.mask.values == 0
    chi2 = ((ds.image.values - model) ** 2 / ds.variance.values)[good]
    assert chi2.size > 2.5e5
    assert chi2.mean() * factor == pytest.approx(1.0, rel=0.03)
    if factor != 1.0:
        assert chi2.mean() == pytest.approx(1.0 / factor, rel=0.03)


def test_residuals_with_sources_match_variance(small):
    """All pixels outside masks and artifacts: (image - truth model) / sqrt(variance) is unit normal."""
    chi = []
    for ds, vt in zip(small.exposures, small.truth.visits):
        resid = ds.image.values - small.truth.expected_image(vt.visit)
        good = (ds.mask.values == 0) & ~vt.footprint(("cosmic_ray",))
        chi.append((resid / np.sqrt(ds.variance.values))[good])
    chi = np.concatenate(chi)
    assert chi.size > 2e5
    assert np.mean(chi**2) == pytest.approx(1.0, rel=0.03)
    assert abs(np.mean(chi)) < 0.01


def test_sky_models_and_subtraction():
    base = dict(**QUIET, n_stars=0, n_galaxies=0, n_visits=1, read_noise_adu=0.0, sky_gradient=0.2,
                sky_poly_order=2, sky_poly_amplitude=0.05)
    out = {}
    for mode in ("none", "constant", "model"):
        sim = simulate(SimConfig.small(**base, sky_subtraction=mode), seed=9)
        vt = sim.truth.visits[0]
        out[mode] = (sim.truth.expected_image(vt.visit), vt)
    yy, xx = np.mgrid[0:256, 0:256]
    model_none, vt = out["none"]
    sky = vt.sky(xx, yy)
    np.testing.assert_allclose(model_none, sky, rtol=1e-12)
    np.testing.assert_allclose(out["constant"][0], sky - vt.sky_coeffs[0, 0], atol=1e-9)
    np.testing.assert_allclose(out["model"][0], 0.0, atol=1e-9)
    np.testing.assert_allclose(vt.background(xx, yy), 0.0 if vt.sky_subtraction == "model" else sky, atol=1e-9)
    # the linear term changes the sky by sky_gradient * level across the detector
    grad = 2 * math.hypot(vt.sky_coeffs[1, 0], vt.sky_coeffs[0, 1])
    assert grad == pytest.approx(0.2 * vt.sky_coeffs[0, 0], rel=1e-12)
    assert np.count_nonzero(vt.sky_coeffs[1:, 1:]) + np.count_nonzero(vt.sky_coeffs[2:, 0]) > 0
    assert 0.8 * 800 <= vt.sky_coeffs[0, 0] <= 1.2 * 800


# ---------------------------------------------------------------------------- masks and artifacts


def test_mask_planes_as_a_calexp(small):
    cfg = small.config
    for ds, vt in zip(small.exposures, small.truth.visits):
        mask, image = ds.mask.values, ds.image.values
        e = cfg.edge_width
        edge = (mask & MaskPlane.EDGE) > 0
        assert edge[:e].all() and edge[-e:].all() and edge[:, :e].all() and edge[:, -e:].all()
        assert not edge[e:-e, e:-e].any()
        assert not ((mask & MaskPlane.NO_DATA) > 0).any() and np.isfinite(image).all()
        assert not ((mask & MaskPlane.CR) > 0).any()
        bad = (mask & MaskPlane.BAD) > 0
        assert bad.any(axis=0).sum() == cfg.n_bad_columns and bad[:, vt.bad_columns].all()
        col = vt.bad_columns[0]
        model = small.truth.expected_image(vt.visit)
        resid = (image[:, col] - model[:, col])[~((mask[:, col] & MaskPlane.SAT) > 0)]
        assert np.median(resid) == pytest.approx(cfg.bad_column_offset_adu, abs=20)
        sat = (mask & MaskPlane.SAT) > 0
        assert 5 < sat.sum() < 500
        raw = image + (vt.sky_coeffs[0, 0] if cfg.sky_subtraction == "constant" else 0)
        ny, nx = vt.shape
        yy, xx = np.nonzero(sat & ~bad)
        np.testing.assert_allclose(raw[yy, xx] + vt.subtracted(xx, yy), cfg.saturation_adu, rtol=1e-6)
        # saturated pixels sit on the saturating star
        star = small.truth.stars[small.truth.stars["saturating"]][0]
        sx, sy = vt.wcs().all_world2pix([star["ra"]], [star["dec"]], 0)
        assert np.hypot(xx - sx[0], yy - sy[0]).max() < 8


def test_no_data_corner_and_masked_cosmic_rays():
    sim = simulate(SimConfig.small(n_visits=1, no_data_corner=20, cosmic_rays_masked=True, n_cosmic_rays=10), seed=1)
    ds, vt = sim.exposures[0], sim.truth.visits[0]
    nd = (ds.mask.values & MaskPlane.NO_DATA) > 0
    assert nd.sum() == 400 and nd[-20:, -20:].all()
    assert np.isnan(ds.image.values[nd]).all() and np.isinf(ds.variance.values[nd]).all()
    cr = (ds.mask.values & MaskPlane.CR) > 0
    np.testing.assert_array_equal(cr, vt.footprint(("cosmic_ray",)))


def test_cosmic_rays_are_sharp_hits(small):
    lo = small.config.cosmic_ray_adu[0]
    n = 0
    for ds, vt in zip(small.exposures, small.truth.visits):
        model = small.truth.expected_image(vt.visit)
        crs = vt.cosmic_rays
        assert np.unique(crs["id"]).size == small.config.n_cosmic_rays
        resid = ds.image.values[crs["y"], crs["x"]] - model[crs["y"], crs["x"]]
        sat = (ds.mask.values[crs["y"], crs["x"]] & (MaskPlane.SAT | MaskPlane.BAD)) > 0
        sig = np.sqrt(ds.variance.values[crs["y"], crs["x"]])
        np.testing.assert_array_less(crs["adu"][~sat] - resid[~sat], 5 * sig[~sat])
        assert (resid[~sat] > lo - 5 * sig[~sat]).all()
        n += crs.size
        # hits are 1-4 connected pixels
        for j in np.unique(crs["id"]):
            pix = crs[crs["id"] == j]
            assert 1 <= pix.size <= 4
    assert n >= small.config.n_cosmic_rays * small.config.n_visits


def test_trail_is_bright_where_truth_says():
    cfg = SimConfig.small(n_trails=2, n_visits=3, trail_peak_adu=200.0)
    sim = simulate(cfg, seed=12)
    trails = [t for vt in sim.truth.visits for t in vt.trails]
    assert len(trails) == 2
    for vt, ds in zip(sim.truth.visits, sim.exposures):
        foot = vt.footprint(("trail",))
        if not vt.trails:
            assert not foot.any()
            continue
        ny, nx = vt.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        dist = np.min([t.distance(xx, yy) for t in vt.trails], axis=0)
        core = (dist < 0.25 * vt.trails[0].fwhm_px) & (ds.mask.values == 0)
        model_static = sim.truth.static_sky(vt.wcs_header, vt.shape, psf=vt.psf_fwhm_px / K.FWHM_PER_SIGMA)
        image = ds.image.values - model_static / vt.njy_per_adu
        # not masked, bright on the centre line, absent far from it
        assert not ((ds.mask.values[core] & MaskPlane.STREAK) > 0).any()
        assert np.median(image[core]) == pytest.approx(200.0 * math.exp(-0.5 * (0.125 * K.FWHM_PER_SIGMA) ** 2), rel=0.15)
        far = (dist > 4 * vt.trails[0].fwhm_px) & (ds.mask.values == 0)
        assert abs(np.median(image[far])) < 5
        np.testing.assert_array_equal(foot, dist <= cfg.footprint_fwhm * vt.trails[0].fwhm_px)
        # on the truth's own grid, artifact_mask equals the detector footprint
        np.testing.assert_array_equal(sim.truth.artifact_mask(vt.visit, vt.wcs_header, vt.shape, kinds=("trail",)), foot)


def test_artifact_mask_on_another_grid(small):
    """On a rotated coadd-like grid, the footprint maps back onto the detector footprint."""
    truth = small.truth
    vt = next(v for v in truth.visits if v.trails)
    det = vt.wcs()
    cra, cdec = det.all_pix2world([127.5], [127.5], 0)
    grid = make_tan_wcs(ra=float(cra[0]), dec=float(cdec[0]), scale_arcsec=0.2, crpix=(150.0, 150.0), rotation_deg=33.0)
    x0, y0 = -10, 5
    shape = (300, 320)
    kinds = ("trail", "cosmic_ray", "asteroid")
    mask = truth.artifact_mask(vt.visit, grid, shape, x0=x0, y0=y0, kinds=kinds)
    assert mask.any()
    yy, xx = np.nonzero(mask)
    xd, yd = det.all_world2pix(*grid.all_pix2world(xx + x0, yy + y0, 0), 0)
    inside = (xd > -0.5) & (xd < 255.5) & (yd > -0.5) & (yd < 255.5)
    assert inside.all()
    foot = vt.footprint(kinds)
    # every flagged grid pixel lies on (or within one pixel of) a flagged detector pixel
    near = ndimage.binary_dilation(foot, structure=np.ones((3, 3), bool))
    assert near[np.clip(np.round(yd).astype(int), 0, 255), np.clip(np.round(xd).astype(int), 0, 255)].all()
    # same pixel scale: the areas agree (the CR footprint is dilated by one pixel on other grids)
    tr_mask = truth.artifact_mask(vt.visit, grid, shape, x0=x0, y0=y0, kinds=("trail",))
    assert tr_mask.sum() == pytest.approx(vt.footprint(("trail",)).sum(), rel=0.05)
    # asteroid: a disc of footprint_fwhm * FWHM around its sky position
    a_mask = truth.artifact_mask(vt.visit, grid, shape, x0=x0, y0=y0, kinds=("asteroid",))
    rad = small.config.footprint_fwhm * vt.asteroid["fwhm_px"]
    assert a_mask.sum() == pytest.approx(math.pi * rad**2, rel=0.1)
    # the same through a Dataset of the frame, lazily backed: nothing is computed
    from pipeline.model.schema import empty_like_frame
    from pipeline.testing import raise_if_dask_computes

    frame = empty_like_frame(x0=x0, y0=y0, nx=shape[1], ny=shape[0], wcs=grid, kind="coadd", chunks=(37, 41))
    with raise_if_dask_computes():
        like = truth.artifact_mask_like(vt.visit, frame, kinds=kinds)
        sky_like = truth.static_sky_like(frame, psf=1.5)
    np.testing.assert_array_equal(like, mask)
    direct = truth.static_sky(grid, shape, x0=x0, y0=y0, psf=1.5)
    np.testing.assert_allclose(sky_like, direct, atol=1e-6 * direct.max())  # header text rounds the WCS
    # a grid that does not overlap the detector is empty
    far = make_tan_wcs(ra=float(cra[0]) + 1.0, dec=float(cdec[0]))
    assert not truth.artifact_mask(vt.visit, far, (50, 50)).any()


def test_asteroid_moves_linearly_and_lands_where_predicted():
    cfg = SimConfig.small(**{**QUIET, "asteroid": True}, n_stars=0, n_galaxies=0, n_visits=4, asteroid_mag=17.5)
    sim = simulate(cfg, seed=17)
    truth = sim.truth
    seen = []
    for ds, vt in zip(sim.exposures, truth.visits):
        ra, dec = truth.asteroid_position(ds.attrs["mjd_obs"])
        x, y = get_wcs(ds).world_to_pixel_values(ra, dec)
        assert (float(x), float(y)) == pytest.approx((vt.asteroid["x"], vt.asteroid["y"]), abs=1e-6)
        cx, cy, _ = _centroid(ds.image.values, float(x), float(y), 8)
        assert abs(cx - x) < 0.05 and abs(cy - y) < 0.05
        seen.append((float(ra), float(dec), ds.attrs["mjd_obs"]))
    # constant angular speed on the sky
    for (ra0, dec0, t0), (ra1, dec1, t1) in zip(seen[:-1], seen[1:]):
        sep = 3600 * math.hypot((ra1 - ra0) * math.cos(math.radians(dec0)), dec1 - dec0)
        assert sep == pytest.approx(cfg.asteroid_rate_arcsec_per_hour * (t1 - t0) * 24, rel=1e-3)
        assert sep > 3  # visibly in different places
    np.testing.assert_array_equal(truth.visits[0].footprint(("asteroid",)),
                                  truth.artifact_mask(truth.visits[0].visit, truth.visits[0].wcs_header, (256, 256),
                                                      kinds=("asteroid",)))


def test_variable_star_flux_per_visit():
    cfg = SimConfig.small(**{**QUIET, "variable_star": True}, n_stars=0, n_galaxies=0, n_visits=4,
                          variable_mag=18.0, variable_amplitude_mag=0.5)
    sim = simulate(cfg, seed=19)
    var = sim.truth.variable
    assert np.ptp(var["mag"]) > 0.05
    for i, (ds, vt) in enumerate(zip(sim.exposures, sim.truth.visits)):
        x, y = get_wcs(ds).world_to_pixel_values(var["ra"], var["dec"])
        ix, iy = int(round(float(x))), int(round(float(y)))
        sl = (slice(iy - 15, iy + 16), slice(ix - 15, ix + 16))
        err = math.sqrt(ds.variance.values[sl].astype(np.float64).sum())
        flux = ds.image.values[sl].astype(np.float64).sum() * vt.njy_per_adu
        assert abs(flux - var["flux"][i]) < 5 * err * vt.njy_per_adu + 1e-3 * var["flux"][i]
        assert vt.variable["flux"] == var["flux"][i]


# ---------------------------------------------------------------------------- speed


def test_default_configuration_speed():
    simulate(SimConfig.small(n_visits=1), seed=0)  # profile tables
    cpu, wall = time.process_time(), time.perf_counter()
    sim = simulate(seed=0)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = len(sim.truth.stars) + len(sim.truth.galaxies)
    print(f"\ndefault simulate: {len(sim.exposures)} x {sim.config.shape} with {n} sources in the field: "
          f"{cpu:.2f} s CPU, {wall:.2f} s wall")
    assert len(sim.exposures) == 6
