import math
import pickle

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import SchemaError
from pipeline.model.geometry import Box
from pipeline.model.schema import make_dataset
from pipeline.psf import (
    FWHM_PER_SIGMA,
    DoubleGaussianPsf,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MoffatPsf,
    PsfexPsf,
    adaptive_moments,
    model_psf,
    odd_size,
)


def test_gaussian_point_sampled_closed_form():
    psf = GaussianPsf(1.7, size=15)
    img = psf.image_at(3.0, 4.0)
    assert img.shape == (15, 15)
    np.testing.assert_allclose(img.sum(), 1.0, rtol=1e-14)
    # point sampling at integer offsets from the centre (7, 7)
    np.testing.assert_allclose(img[7, 9] / img[7, 7], math.exp(-4 / (2 * 1.7**2)), rtol=1e-12)
    np.testing.assert_allclose(img[10, 8] / img[7, 7], math.exp(-10 / (2 * 1.7**2)), rtol=1e-12)
    np.testing.assert_array_equal(img, img[::-1, ::-1])


@pytest.mark.parametrize("sigma", [1.2, 2.0, 3.0])
def test_gaussian_moments_and_fwhm(sigma):
    psf = GaussianPsf(sigma)
    ixx, iyy, ixy = psf.moments(0, 0)
    # point sampling biases the moments of narrow profiles slightly (7.7e-5 at sigma 1.2)
    np.testing.assert_allclose([ixx, iyy], sigma**2, rtol=2e-4)
    assert abs(ixy) < 1e-10
    np.testing.assert_allclose(psf.fwhm(0, 0), FWHM_PER_SIGMA * sigma, rtol=1e-4)


def test_adaptive_moments_elliptical_gaussian():
    cov = np.array([[4.0, 1.1], [1.1, 2.5]])
    inv = np.linalg.inv(cov)
    yy, xx = np.mgrid[-20:21, -20:21].astype(float)
    dx, dy = xx - 0.3, yy + 0.4
    img = np.exp(-0.5 * (inv[0, 0] * dx * dx + 2 * inv[0, 1] * dx * dy + inv[1, 1] * dy * dy))
    cx, cy, ixx, iyy, ixy = adaptive_moments(img)
    np.testing.assert_allclose([cx, cy], [0.3, -0.4], atol=1e-6)
    np.testing.assert_allclose([ixx, iyy, ixy], [4.0, 2.5, 1.1], rtol=1e-5)


def test_adaptive_moments_failure():
    with pytest.raises(ValueError, match="weighted flux is not positive"):
        adaptive_moments(-np.ones((11, 11)))
    with pytest.raises(ValueError, match="did not converge"):
        adaptive_moments(GaussianPsf(2.0).image_at(0, 0, size=21), sigma0=0.7, max_iter=2)
    delta = np.zeros((11, 11))
    delta[5, 5] = 1.0
    with pytest.raises(ValueError, match="not positive definite"):
        adaptive_moments(delta)


def test_model_psf_defaults_match_spec():
    psf = model_psf()
    np.testing.assert_allclose(psf.sigma1, 3.2699, atol=1e-4)
    np.testing.assert_allclose(psf.sigma2, 8.1747, atol=1e-4)
    assert psf.b == 0.1 and psf.size == 23
    # spec: adaptive-moment sigma of the 7.7-px model is about 3.70 px
    ixx, iyy, _ = psf.moments(0, 0)
    np.testing.assert_allclose(math.sqrt(ixx), 3.70, atol=0.01)
    np.testing.assert_allclose(ixx, iyy, rtol=1e-10)
    # the factory's default FWHM is 3 px with a 9x9 stamp
    small = DoubleGaussianPsf.from_fwhm()
    assert small.size == 9 and small.sigma2 == pytest.approx(2.5 * small.sigma1)
    assert model_psf(7.7, add_wing=False).b == 0.0
    assert model_psf(2.0, min_size=7).size == 7
    assert model_psf(7.7, max_size=15).size == 15
    with pytest.raises(SchemaError, match="FWHM must be positive"):
        model_psf(-1.0)


def test_double_gaussian_closed_form_and_single_limit():
    psf = DoubleGaussianPsf(1.5, 4.0, 0.2, size=21)
    img = psf.image_at(0, 0)
    u = 3.0
    expect = (math.exp(-u * u / 4.5) + 0.2 * math.exp(-u * u / 32.0)) / 1.2
    np.testing.assert_allclose(img[10, 13] / img[10, 10], expect, rtol=1e-12)
    np.testing.assert_allclose(DoubleGaussianPsf(1.5, size=21).image_at(5, 5), GaussianPsf(1.5, size=21).image_at(0, 0),
                               rtol=1e-14)
    with pytest.raises(SchemaError, match="sigma1 must be positive"):
        DoubleGaussianPsf(0.0)
    with pytest.raises(SchemaError, match="sigma2 > 0 when b > 0"):
        DoubleGaussianPsf(1.0, 0.0, 0.1)


def test_moffat_alpha_from_fwhm():
    psf = MoffatPsf(4.0, beta=2.5, size=25)
    # the profile falls to half its peak at r = FWHM/2 = 2 px
    np.testing.assert_allclose((1 + 4.0 / psf.alpha**2) ** -2.5, 0.5, rtol=1e-12)
    img = psf.image_at(0, 0)
    np.testing.assert_allclose(img[12, 14] / img[12, 12], 0.5, rtol=1e-12)
    assert psf.default_size(0, 0) == 25 and MoffatPsf(4.0).default_size(0, 0) == 17
    with pytest.raises(SchemaError, match="beta must exceed 1"):
        MoffatPsf(3.0, beta=1.0)
    with pytest.raises(SchemaError, match="FWHM must be positive"):
        MoffatPsf(0.0)


def test_gaussian_gradient_and_errors():
    psf = GaussianPsf(2.0, gradient=(0.01, -0.02), center=(100, 100))
    assert psf.sigma_at(150, 100) == pytest.approx(2.5)
    assert psf.sigma_at(100, 150) == pytest.approx(1.0)
    np.testing.assert_allclose(psf.fwhm(150, 100), FWHM_PER_SIGMA * 2.5, rtol=1e-6)
    with pytest.raises(SchemaError, match="must stay positive"):
        psf.image_at(100, 300)
    with pytest.raises(SchemaError, match="sigma must be positive"):
        GaussianPsf(-1.0)
    with pytest.raises(SchemaError, match="positive odd integer, got 4"):
        GaussianPsf(1.0, size=4)
    with pytest.raises(SchemaError, match="must be an integer"):
        GaussianPsf(1.0).image_at(0, 0, size=5.0)


def test_image_psf_recentre_and_errors(rng):
    raw = rng.uniform(0.1, 1.0, size=(7, 7))
    psf = ImagePsf(raw)
    big = psf.image_at(0, 0, size=11)
    np.testing.assert_allclose(big[2:9, 2:9], raw / raw.sum(), rtol=1e-14)
    assert big[0].sum() == 0 and big[:, -1].sum() == 0
    small = psf.image_at(0, 0, size=3)
    np.testing.assert_allclose(small, raw[2:5, 2:5] / raw[2:5, 2:5].sum(), rtol=1e-14)
    with pytest.raises(SchemaError, match="square 2-D image"):
        ImagePsf(np.ones((5, 7)))
    with pytest.raises(SchemaError, match="positive odd integer, got 6"):
        ImagePsf(np.ones((6, 6)))
    with pytest.raises(SchemaError, match="non-finite"):
        ImagePsf(np.full((5, 5), np.nan))
    with pytest.raises(SchemaError, match="non-positive or non-finite sum"):
        ImagePsf(np.zeros((5, 5)))


def test_grid_psf_bilinear(rng):
    a, b = GaussianPsf(1.5, size=15).image_at(0, 0), GaussianPsf(2.5, size=15).image_at(0, 0)
    imgs = np.stack([np.stack([a, b]), np.stack([b, a])])  # nodes at x in {0, 100}, y in {0, 50}
    grid = GridPsf(imgs, x=[0, 100], y=[0, 50])
    np.testing.assert_allclose(grid.image_at(0, 0), a, rtol=1e-14)
    np.testing.assert_allclose(grid.image_at(100, 0), b, rtol=1e-14)
    np.testing.assert_allclose(grid.image_at(25, 0), 0.75 * a + 0.25 * b, rtol=1e-13)
    np.testing.assert_allclose(grid.image_at(50, 25), 0.5 * a + 0.5 * b, rtol=1e-13)
    np.testing.assert_allclose(grid.image_at(-40, 80), b, rtol=1e-14)  # clamped to the nearest node
    with pytest.raises(SchemaError, match="do not match a 2x2 grid"):
        GridPsf(imgs[:1], x=[0, 100], y=[0, 50])
    with pytest.raises(SchemaError, match="square with an odd size"):
        GridPsf(np.ones((1, 1, 4, 4)), x=[0], y=[0])
    with pytest.raises(SchemaError, match="increase strictly"):
        GridPsf(imgs, x=[100, 0], y=[0, 50])
    with pytest.raises(SchemaError, match="non-finite"):
        GridPsf(np.full((1, 1, 3, 3), np.inf), x=[0], y=[0])


def test_to_grid_from_dataset_round_trip(tan_wcs):
    box = Box(10, 20, 110, 80)
    psf = GaussianPsf(1.5, gradient=(0.01, 0.005), center=(60, 50))
    var = psf.to_grid(box, (3, 2))
    np.testing.assert_array_equal(var["psf_x"].values, [10, 59.5, 109])
    np.testing.assert_array_equal(var["psf_y"].values, [20, 79])
    assert var.shape == (2, 3, 19, 19)  # the widest node (sigma 2.135) sets the stamp: odd(8 sigma + 1)
    ds = make_dataset(np.zeros((60, 100)), np.ones((60, 100)), np.zeros((60, 100)), wcs=tan_wcs, x0=10, y0=20,
                      psf=var, attrs={"visit": 7})
    grid = GridPsf.from_dataset(ds)
    np.testing.assert_allclose(grid.image_at(59.5, 79), psf.image_at(59.5, 79, size=19), rtol=1e-12)
    one = psf.to_grid(box, 1)
    np.testing.assert_array_equal(one["psf_x"].values, [59.5])
    with pytest.raises(SchemaError, match="no 'psf' variable"):
        GridPsf.from_dataset(ds.drop_vars(["psf", "psf_x", "psf_y"]))
    lazy = ds.copy()
    lazy["psf"] = lazy["psf"].chunk()
    with pytest.raises(SchemaError, match="'psf' variable is lazy.*visit=7"):
        GridPsf.from_dataset(lazy)
    with pytest.raises(SchemaError, match="expected"):
        GridPsf.from_dataset(ds.assign(psf=ds["psf"].transpose("psf_x", "psf_y", "ky", "kx")))
    with pytest.raises(SchemaError, match="empty box"):
        psf.to_grid(Box(0, 0, 0, 5))
    with pytest.raises(SchemaError, match="at least one node"):
        psf.to_grid(box, 0)


class _DuckPsfex:
    """A PSFEx-like model: polynomial in x of two pixel components."""

    def __init__(self):
        self.c0 = GaussianPsf(1.5, size=11).image_at(0, 0)
        self.c1 = GaussianPsf(2.5, size=11).image_at(0, 0) - self.c0

    def image_at(self, x, y, size=None):
        return self.c0 + (x / 1000.0) * self.c1


def test_psfex_wrapper():
    model = _DuckPsfex()
    psf = PsfexPsf(model)
    assert psf.default_size(0, 0) == 11
    np.testing.assert_allclose(psf.image_at(500, 0), model.image_at(500, 0), rtol=1e-12)
    assert psf.image_at(0, 0, size=15).shape == (15, 15)
    pickle.loads(pickle.dumps(psf))

    class Even:
        def image_at(self, x, y, size=None):
            return np.ones((4, 4))

    with pytest.raises(SchemaError, match="expected square and odd"):
        PsfexPsf(Even()).image_at(0, 0, size=5)


def test_psfex_file(tmp_path):
    from astropy.io import fits

    n = 25
    basis = GaussianPsf(1.8, size=n).image_at(0, 0)[None]  # degree 0: one component
    col = fits.Column(name="PSF_MASK", format=f"{basis.size}D", dim=f"({n}, {n}, 1)", array=basis[None])
    hdu = fits.BinTableHDU.from_columns([col], name="PSF_DATA")
    for key, value in dict(POLNAXIS=2, POLGRP1=1, POLNAME1="X_IMAGE", POLGRP2=1, POLNAME2="Y_IMAGE", POLNGRP=1,
                           POLDEG1=0, POLZERO1=1024.0, POLSCAL1=2048.0, POLZERO2=1024.0, POLSCAL2=2048.0,
                           PSF_FWHM=4.24, PSF_SAMP=1.0, PSFNAXIS=3, PSFAXIS1=n, PSFAXIS2=n, PSFAXIS3=1).items():
        hdu.header[key] = value
    path = tmp_path / "a.psf"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    psf = PsfexPsf.from_file(path)
    assert psf.default_size(0, 0) == 25
    np.testing.assert_allclose(psf.image_at(100.0, 300.0, size=21), GaussianPsf(1.8).image_at(0, 0, size=21),
                               atol=1e-7)
    np.testing.assert_allclose(psf.fwhm(500, 500), FWHM_PER_SIGMA * 1.8, rtol=1e-3)
    shifted = PsfexPsf.from_file(path, x0=100, y0=-50)
    assert (shifted.model.x0, shifted.model.y0) == (100, -50)


def test_models_pickle_and_odd_size():
    for psf in (GaussianPsf(2.0), model_psf(), MoffatPsf(3.0), ImagePsf(np.ones((3, 3)))):
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(psf)).image_at(1, 2), psf.image_at(1, 2))
    assert [odd_size(v) for v in (0.2, 3, 4, 4.5)] == [1, 3, 5, 5]


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.8, 4.0), size=st.integers(1, 12).map(lambda k: 2 * k + 1),
       x=st.floats(-500, 500), y=st.floats(-500, 500))
def test_property_images_are_normalised_and_centred(sigma, size, x, y):
    img = GaussianPsf(sigma).image_at(x, y, size=size)
    assert img.shape == (size, size)
    np.testing.assert_allclose(img.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(img, img.T, rtol=1e-12)
    assert img[size // 2, size // 2] == img.max()


@settings(max_examples=10, deadline=None)
@given(nx=st.integers(1, 4), ny=st.integers(1, 4), sigma=st.floats(1.0, 3.0))
def test_property_grid_round_trip_at_nodes(nx, ny, sigma):
    box = Box(-30, 5, 70, 65)
    psf = GaussianPsf(sigma, gradient=(0.004, -0.003), center=(20, 35))
    var = psf.to_grid(box, (nx, ny))
    grid = GridPsf(var.values, x=var["psf_x"].values, y=var["psf_y"].values)
    size = var.shape[-1]
    for xn in var["psf_x"].values:
        for yn in var["psf_y"].values:
            np.testing.assert_allclose(grid.image_at(xn, yn), psf.image_at(xn, yn, size=size), rtol=1e-12, atol=1e-15)


def test_lazy_psf_grid_in_dask_dataset_is_detected(tan_wcs):
    ds = make_dataset(da.zeros((20, 20), chunks=7), da.ones((20, 20), chunks=7), da.zeros((20, 20), chunks=7),
                      wcs=tan_wcs, psf=GaussianPsf(1.0).to_grid(Box(0, 0, 20, 20)))
    assert isinstance(GridPsf.from_dataset(ds), GridPsf)  # pixels lazy, psf in memory: fine
