import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import FitsFormatError
from pipeline.io.psfex import PsfexModel, psfex_terms
from pipeline.model.geometry import Box

SIGMA0 = 3.0  # Gaussian width of the constant term, in samples
DSIGMA = 0.4  # width change per unit of the rescaled x context variable
POL = dict(POLZERO1=1024.5, POLSCAL1=2048.0, POLZERO2=1000.5, POLSCAL2=1900.0)


def gauss(xs, ys, sigma):
    return np.exp(-(xs**2 + ys**2) / (2 * sigma**2))


def dgauss_dsigma(xs, ys, sigma):
    r2 = xs**2 + ys**2
    return gauss(xs, ys, sigma) * r2 / sigma**3


def sample_grid(n):
    k = np.arange(n, dtype=float) - n // 2
    return np.meshgrid(k, k, indexing="xy")


def width_basis(n):
    """Degree-1 basis: G(sigma0) + u * DSIGMA dG/dsigma + v * 0 (width linear in x)."""
    xs, ys = sample_grid(n)
    return np.stack([gauss(xs, ys, SIGMA0), DSIGMA * dgauss_dsigma(xs, ys, SIGMA0), np.zeros((n, n))])


def closed_form(sample_x, sample_y, u):
    return gauss(sample_x, sample_y, SIGMA0) + u * DSIGMA * dgauss_dsigma(sample_x, sample_y, SIGMA0)


def write_psf(path, basis, *, samp=1.0, degree=1, drop=(), extra=None, column="PSF_MASK", extname="PSF_DATA"):
    nb, ny, nx = basis.shape
    col = fits.Column(name=column, format=f"{basis.size}D", dim=f"({nx}, {ny}, {nb})", array=basis[None])
    hdu = fits.BinTableHDU.from_columns([col], name=extname)
    keys = dict(
        LOADED=100, ACCEPTED=90, CHI2=1.1, POLNAXIS=2, POLGRP1=1, POLNAME1="X_IMAGE", POLGRP2=1,
        POLNAME2="Y_IMAGE", POLNGRP=1, POLDEG1=degree, PSF_FWHM=2.355 * SIGMA0 * samp, PSF_SAMP=samp,
        PSFNAXIS=3, PSFAXIS1=nx, PSFAXIS2=ny, PSFAXIS3=nb, **POL,
    )
    keys.update(extra or {})
    for key, value in keys.items():
        if key not in drop:
            hdu.header[key] = value
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path, overwrite=True)
    return path


def u_of(x):
    """Rescaled PSFEx x context of 0-based pixel x (PSFEx positions are 1-based)."""
    return (x + 1.0 - POL["POLZERO1"]) / POL["POLSCAL1"]


def v_of(y):
    return (y + 1.0 - POL["POLZERO2"]) / POL["POLSCAL2"]


@pytest.mark.parametrize("samp", [1.0, 0.5])
@pytest.mark.parametrize("x, y", [(0.0, 0.0), (1023.5, 999.5), (2047.0, 30.0), (-300.0, 1500.0), (3000.0, 2000.0)])
def test_image_at_matches_closed_form(tmp_path, samp, x, y):
    n = 31
    model = PsfexModel.from_file(write_psf(tmp_path / "a.psf", width_basis(n), samp=samp))
    size = 15
    got = model.image_at(x, y, size=size)
    k = np.arange(size, dtype=float) - size // 2
    px, py = np.meshgrid(k, k, indexing="xy")
    # pixel offsets -> sample offsets: divide by PSF_SAMP; these land on samples for samp 1 and 0.5
    expected = closed_form(px / samp, py / samp, u_of(x))
    expected /= expected.sum()
    assert got.shape == (size, size)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-12)


def test_width_grows_linearly_in_x(tmp_path):
    model = PsfexModel.from_file(write_psf(tmp_path / "a.psf", width_basis(41)))
    k = np.arange(41, dtype=float) - 20
    px, py = np.meshgrid(k, k, indexing="xy")
    for x in (500.0, 1023.5, 1800.0):
        img = model.image_at(x, 1000.0, size=41)
        second_moment = (img * px**2).sum()
        # G + e dG/dsigma has sum 2 pi s^2 + 4 pi s e and x^2-moment 2 pi s^4 + 8 pi s^3 e, so
        # <x^2> = s^2 (s + 4e) / (s + 2e) (e = DSIGMA u; the width is s + e to first order)
        e = DSIGMA * u_of(x)
        expected = SIGMA0**2 * (SIGMA0 + 4 * e) / (SIGMA0 + 2 * e)
        np.testing.assert_allclose(second_moment, expected, rtol=1e-9)


@pytest.mark.parametrize("samp", [0.7, 1.3])
def test_resampled_off_grid_matches_closed_form(tmp_path, samp):
    n = 41
    model = PsfexModel.from_file(write_psf(tmp_path / "a.psf", width_basis(n), samp=samp))
    size = 21
    k = np.arange(size, dtype=float) - size // 2
    px, py = np.meshgrid(k, k, indexing="xy")
    x = 700.0
    expected = closed_form(px / samp, py / samp, u_of(x))
    expected /= expected.sum()
    spline = model.image_at(x, 10.0, size=size)
    lanczos = model.image_at(x, 10.0, size=size, kernel="lanczos3")
    peak = expected.max()
    # quintic spline: about 1e-6 of the peak for a 3-sample Gaussian; Lanczos-3 ripples at a few 1e-3
    np.testing.assert_allclose(spline, expected, rtol=0, atol=5e-6 * peak)
    np.testing.assert_allclose(lanczos, expected, rtol=0, atol=5e-3 * peak)
    assert np.abs(spline - expected).max() < np.abs(lanczos - expected).max()


def test_term_order_degree_two(tmp_path):
    n = 21
    xs, ys = sample_grid(n)
    shapes = [gauss(xs, ys, s) for s in (1.5, 2.0, 2.5, 3.0, 3.5, 4.0)]
    # 0.05 keeps the mixture positive at the tested positions
    basis = np.stack([shapes[0]] + [0.05 * s for s in shapes[1:]])
    model = PsfexModel.from_file(write_psf(tmp_path / "a.psf", basis, degree=2))
    for x, y in [(100.0, 1800.0), (1900.0, 200.0), (1023.5, 999.5)]:
        u, v = u_of(x), v_of(y)
        # PSFEx order for degree 2: 1, u, u^2, v, u v, v^2
        expected = shapes[0] + 0.05 * (u * shapes[1] + u * u * shapes[2] + v * shapes[3] + u * v * shapes[4]
                                       + v * v * shapes[5])
        got = model.image_at(x, y, size=n)
        np.testing.assert_allclose(got, expected / expected.sum(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(psfex_terms(2.0, 3.0, 2), [1, 2, 4, 3, 6, 9])
    np.testing.assert_allclose(psfex_terms(2.0, 3.0, 3), [1, 2, 4, 8, 3, 6, 12, 9, 18, 27])


def test_parent_origin_offsets_positions(tmp_path):
    path = write_psf(tmp_path / "a.psf", width_basis(25))
    plain = PsfexModel.from_file(path)
    shifted = PsfexModel.from_file(path, x0=100, y0=-40)
    np.testing.assert_allclose(shifted.image_at(600.0, 460.0), plain.image_at(500.0, 500.0), atol=1e-15)


def test_constant_model_polnaxis_zero(tmp_path):
    n = 15
    xs, ys = sample_grid(n)
    g = gauss(xs, ys, 2.0)
    col = fits.Column(name="PSF_MASK", format=f"{g.size}D", dim=f"({n}, {n}, 1)", array=g[None, None])
    hdu = fits.BinTableHDU.from_columns([col], name="PSF_DATA")
    for key, value in dict(POLNAXIS=0, PSF_SAMP=1.0, PSFNAXIS=3, PSFAXIS1=n, PSFAXIS2=n, PSFAXIS3=1).items():
        hdu.header[key] = value
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp_path / "c.psf")
    model = PsfexModel.from_file(tmp_path / "c.psf")
    np.testing.assert_allclose(model.image_at(5.0, 7000.0), g / g.sum(), atol=1e-15)
    assert model.default_size == n


def test_to_psf_grid_nodes_and_values(tmp_path):
    model = PsfexModel.from_file(write_psf(tmp_path / "a.psf", width_basis(25), samp=0.5))
    box = Box(100, 50, 400, 290)
    grid = model.to_psf_grid(box, n=(3, 3))
    assert grid.dims == ("psf_y", "psf_x", "ky", "kx")
    assert grid.shape == (3, 3, 13, 13)
    np.testing.assert_allclose(grid.psf_x.values, [149.5, 249.5, 349.5])
    np.testing.assert_allclose(grid.psf_y.values, [89.5, 169.5, 249.5])
    for iy, y in enumerate(grid.psf_y.values):
        for ix, x in enumerate(grid.psf_x.values):
            np.testing.assert_allclose(grid.values[iy, ix], model.image_at(x, y), atol=1e-15)
    np.testing.assert_allclose(grid.sum(dim=("ky", "kx")).values, 1.0, rtol=1e-12)
    one = model.to_psf_grid(box, n=(1, 1))
    np.testing.assert_allclose([one.psf_x.item(), one.psf_y.item()], [249.5, 169.5])
    wide = model.to_psf_grid(box, n=(2, 4), size=9)
    assert wide.shape == (2, 4, 9, 9)
    square = model.to_psf_grid(box, n=2)
    assert square.shape == (2, 2, 13, 13)


def test_default_size_is_odd_and_covers_model(tmp_path):
    for n, samp, expected in [(25, 1.0, 25), (25, 0.5, 13), (24, 1.0, 25), (35, 0.7, 25)]:
        model = PsfexModel.from_file(write_psf(tmp_path / f"{n}_{samp}.psf", width_basis(n), samp=samp))
        assert model.default_size == expected


@settings(max_examples=25, deadline=None)
@given(
    samp=st.floats(0.3, 1.6),
    size=st.sampled_from([5, 9, 15, 21]),
    x=st.floats(-500, 2500),
    kernel=st.sampled_from(["spline", "lanczos3"]),
)
def test_symmetric_model_gives_symmetric_normalised_image(tmp_path_factory, samp, size, x, kernel):
    n = 21
    xs, ys = sample_grid(n)
    basis = np.stack([gauss(xs, ys, 3.0), 0.1 * gauss(xs, ys, 2.0), np.zeros((n, n))])
    path = tmp_path_factory.mktemp("p") / "s.psf"
    model = PsfexModel.from_file(write_psf(path, basis, samp=samp))
    img = model.image_at(x, 100.0, size=size, kernel=kernel)
    np.testing.assert_allclose(img.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(img, img[::-1, :], atol=1e-12)
    np.testing.assert_allclose(img, img[:, ::-1], atol=1e-12)
    np.testing.assert_allclose(img, img.T, atol=1e-12)
    assert np.unravel_index(np.argmax(img), img.shape) == (size // 2, size // 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(extname="OTHER"), r"has 0 PSF_DATA extension\(s\); extension 0 was asked for"),
        (dict(column="PSF_OTHER"), r"PSF_DATA table has no PSF_MASK column \(columns: \['PSF_OTHER'\]\)"),
        (dict(drop=("PSF_SAMP",)), r"PSF_DATA header lacks keyword\(s\) \['PSF_SAMP'\]"),
        (dict(drop=("POLNAXIS", "PSFAXIS3")), r"lacks keyword\(s\) \['POLNAXIS', 'PSFAXIS3'\]"),
        (dict(drop=("POLZERO1",)), r"lacks keyword\(s\) \['POLZERO1'\]"),
        (dict(drop=("POLDEG1",)), r"lacks keyword\(s\) \['POLDEG1'\]"),
        (dict(extra={"PSFNAXIS": 2}), "PSFNAXIS is 2, expected 3"),
        (dict(extra={"PSFAXIS1": 23}), r"PSF_MASK has shape \(3, 25, 25\) but PSFAXIS3/2/1 say \(3, 25, 23\)"),
        (dict(extra={"PSF_SAMP": 0.0}), "PSF_SAMP is 0.0; it must be positive"),
        (dict(extra={"POLNAXIS": 3}), "POLNAXIS is 3; only 0 or 2"),
        (dict(extra={"POLNGRP": 2}), "only one polynomial group is supported"),
        (dict(extra={"POLNAME1": "MAG_AUTO"}), r"depends on \['MAG_AUTO', 'Y_IMAGE'\]"),
        (dict(extra={"POLDEG1": 2}), "PSF_MASK has 3 basis images but degree 2 needs 6"),
        (dict(extra={"POLDEG1": -1}), "POLDEG1 is -1"),
        (dict(extra={"POLSCAL2": 0.0}), "POLSCAL1/POLSCAL2 are .* must be non-zero"),
    ],
)
def test_bad_psfex_files(tmp_path, kwargs, message):
    path = write_psf(tmp_path / "bad.psf", width_basis(25), **kwargs)
    with pytest.raises(FitsFormatError, match=message) as info:
        PsfexModel.from_file(path)
    assert "file=bad.psf" in str(info.value)


def test_bad_psfex_contents(tmp_path):
    basis = width_basis(25)
    basis[0, 3, 4] = np.nan
    with pytest.raises(FitsFormatError, match="PSF_MASK contains non-finite values"):
        PsfexModel.from_file(write_psf(tmp_path / "nan.psf", basis))
    (tmp_path / "junk.psf").write_bytes(b"not a fits file" * 300)
    with pytest.raises(FitsFormatError, match=r"cannot read PSFEx file: .*\[file=junk.psf\]"):
        PsfexModel.from_file(tmp_path / "junk.psf")
    with pytest.raises(FileNotFoundError):
        PsfexModel.from_file(tmp_path / "missing.psf")
    model = PsfexModel.from_file(write_psf(tmp_path / "neg.psf", -width_basis(25)))
    with pytest.raises(FitsFormatError, match=r"realised at \(10.0, 20.0\) has non-positive sum"):
        model.image_at(10.0, 20.0)
    path = tmp_path / "sec.psf"
    write_psf(path, width_basis(25))
    with pytest.raises(FitsFormatError, match="extension 1 was asked for"):
        PsfexModel.from_file(path, index=1)
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((3, 3)), name="PSF_DATA")])
    hdul.writeto(tmp_path / "img.psf")
    with pytest.raises(FitsFormatError, match="PSF_DATA extension is not a binary table"):
        PsfexModel.from_file(tmp_path / "img.psf")
    col = fits.Column(name="PSF_MASK", format="1875D", dim="(25, 25, 3)", array=np.zeros((0, 3, 25, 25)))
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([col], name="PSF_DATA")]).writeto(
        tmp_path / "empty.psf"
    )
    with pytest.raises(FitsFormatError, match="PSF_DATA table has no rows"):
        PsfexModel.from_file(tmp_path / "empty.psf")


def test_bad_arguments(tmp_path):
    model = PsfexModel.from_file(write_psf(tmp_path / "a.psf", width_basis(25)))
    for size in (0, 4, -3, 2.0, True):
        with pytest.raises(ValueError, match="PSF stamp size must be a positive odd integer"):
            model.image_at(1.0, 1.0, size=size)
    with pytest.raises(ValueError, match=r"PSF position must be finite, got \(nan, 1.0\)"):
        model.image_at(float("nan"), 1.0)
    with pytest.raises(ValueError, match="unknown resampling kernel 'cubic'"):
        model.image_at(1.0, 1.0, kernel="cubic")
    with pytest.raises(ValueError, match=r"at least one node per axis, got n=\(0, 3\)"):
        model.to_psf_grid(Box(0, 0, 10, 10), n=(0, 3))
    with pytest.raises(ValueError, match="empty box"):
        model.to_psf_grid(Box(0, 0, 0, 10))
