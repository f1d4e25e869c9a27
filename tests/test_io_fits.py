import os
import warnings

import dask.array as da
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tan_wcs
from pipeline.errors import DataQualityError, FitsFormatError, SchemaError
from pipeline.io.fits import read_fits, write_fits
from pipeline.model.masks import CANONICAL_PLANES, MaskPlane, add_planes, decode_pixel
from pipeline.model.schema import make_dataset, mask_planes, psf_grid
from pipeline.model.wcs import get_wcs
from pipeline.testing import assert_datasets_equal, raise_if_dask_computes

from test_io_psfex import closed_form, u_of, width_basis, write_psf


def sip_wcs(crpix=(20.0, 15.0), rotation_deg=25.0, ra=150.0, dec=2.0) -> WCS:
    w = make_tan_wcs(ra=ra, dec=dec, crpix=crpix, rotation_deg=rotation_deg)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[0, 2], a[1, 1], a[3, 0] = 2e-5, -1e-5, 4e-6, 3e-8
    b[0, 2], b[1, 1], b[2, 1] = 1.5e-5, -3e-6, 2e-8
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w


def corner_sky(ds):
    """Sky positions (deg) of every pixel corner of ``ds``."""
    xs = np.arange(ds.x.values[0] - 0.5, ds.x.values[-1] + 1.0)
    ys = np.arange(ds.y.values[0] - 0.5, ds.y.values[-1] + 1.0)
    gx, gy = np.meshgrid(xs, ys)
    return np.array(get_wcs(ds).pixel_to_world_values(gx, gy))


def assert_same_sky(a, b, tol_deg=1e-9):
    ra_a, dec_a = corner_sky(a)
    ra_b, dec_b = corner_sky(b)
    dra = (ra_a - ra_b + 180.0) % 360.0 - 180.0
    assert np.max(np.abs(dra * np.cos(np.radians(dec_a)))) < tol_deg
    assert np.max(np.abs(dec_a - dec_b)) < tol_deg


def make_exposure(rng, shape=(40, 52), *, x0=0, y0=0, wcs=None, planes=None, kind="exposure", attrs=None, psf=None):
    planes = dict(CANONICAL_PLANES) if planes is None else planes
    bits = np.array(sorted(planes.values()), dtype=np.uint64)
    pick = rng.integers(0, 2, size=shape + (len(bits),)).astype(np.uint64)
    mask = (pick << bits).sum(axis=-1).astype(np.uint32)
    base = {"visit": 1228, "detector": 42, "band": "r", "mjd_obs": 60310.25, "exptime": 30.0, "zero_point": 27.13}
    base.update(attrs or {})
    return make_dataset(
        rng.normal(100.0, 5.0, size=shape), rng.uniform(1.0, 3.0, size=shape), mask,
        wcs=sip_wcs() if wcs is None else wcs, kind=kind, x0=x0, y0=y0, planes=planes, psf=psf, attrs=base,
    )


def gaussian_stamp(n=9, sigma=1.7):
    k = np.arange(n) - n // 2
    return np.exp(-(k[None, :] ** 2 + k[:, None] ** 2) / (2 * sigma**2))


def no_warnings_read(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_fits(path, **kw)


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x0, y0", [(0, 0), (1234, -56)])
@pytest.mark.parametrize("sip", [True, False])
def test_exposure_round_trip(tmp_path, rng, x0, y0, sip):
    wcs = sip_wcs(crpix=(x0 + 20.0, y0 + 15.0)) if sip else make_tan_wcs(crpix=(x0 + 3.0, y0 + 70.0), rotation_deg=-40)
    planes = add_planes(CANONICAL_PLANES, ["FOO", "BAR"])
    psf = psf_grid(gaussian_stamp(), x=x0 + 25.5, y=y0 + 19.5)
    long_note = "kept & 'quoted' / \"json\" " * 40  # needs CONTINUE cards
    ds = make_exposure(rng, x0=x0, y0=y0, wcs=wcs, planes=planes, psf=psf,
                       attrs={"provenance": '[{"task": "isr"}]', "note": long_note, "nested": {"a": [1, 2.5]}})
    path = write_fits(ds, tmp_path / "calexp.fits")
    assert path == str(tmp_path / "calexp.fits")
    assert os.listdir(tmp_path) == ["calexp.fits"]
    back = no_warnings_read(path)
    assert_datasets_equal(ds, back)  # pixels exactly, coordinates, plane dictionary
    assert mask_planes(back) == planes
    assert back.attrs["zero_point"] == ds.attrs["zero_point"]
    for key in ("visit", "detector", "band", "mjd_obs", "exptime", "provenance", "note", "nested"):
        assert back.attrs[key] == ds.attrs[key]
    assert back.attrs["kind"] == "exposure" and back.attrs["bunit"] == "adu"
    assert back.attrs["source"] == "calexp.fits"
    assert back.attrs["n_nonfinite"] == 0 and back.attrs["n_bad_variance"] == 0
    assert (get_wcs(back).sip is not None) == sip
    assert_same_sky(ds, back)
    np.testing.assert_allclose(back.psf.values, ds.psf.values, rtol=1e-14)  # re-normalised on read
    np.testing.assert_array_equal(back.psf_x.values, [x0 + 25.5])
    # the FITS file itself: array-frame WCS plus the parent-origin keywords, LSST layout
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
        h = hdul["IMAGE"].header
        assert (h["LTV1"], h["LTV2"], h["CRVAL1A"], h["CRVAL2A"]) == (-x0, -y0, x0, y0)
        file_wcs = WCS(h)
        np.testing.assert_allclose(
            file_wcs.pixel_to_world_values(3.0, 4.0), get_wcs(ds).pixel_to_world_values(x0 + 3.0, y0 + 4.0),
            rtol=0, atol=1e-12,
        )
        assert hdul["MASK"].header["MP_FOO"] == planes["FOO"]
        assert hdul["MASK"].header["MP_DETECTED_NEGATIVE"] == 6
        np.testing.assert_allclose(2.5 * np.log10(hdul[0].header["FLUXMAG0"]), 27.13, rtol=1e-14)


def test_coadd_round_trip_with_nimage_and_psf_grid(tmp_path, rng):
    shape = (60, 70)
    stamps = np.stack([np.stack([gaussian_stamp(11, 1.5 + 0.1 * (i + 3 * j)) for i in range(3)]) for j in range(3)])
    grid = psf_grid(stamps, x=[1010.0, 1034.5, 1059.0], y=[2010.0, 2029.5, 2049.0])
    ds = make_exposure(rng, shape, x0=1000, y0=2000, kind="coadd", psf=grid,
                       attrs={"visit": None, "detector": None, "tract": 9813, "patch": 42, "band": "i",
                              "bunit": "nJy", "zero_point": 31.4})
    ds = ds.assign(n_image=(("y", "x"), rng.integers(0, 12, size=shape).astype(np.int32)))
    write_fits(ds, tmp_path / "coadd.fits")
    back = read_fits(tmp_path / "coadd.fits")
    assert back.attrs["kind"] == "coadd"
    assert (back.attrs["tract"], back.attrs["patch"], back.attrs["band"]) == (9813, 42, "i")
    assert back.attrs["bunit"] == "nJy" and back.attrs["zero_point"] == 31.4
    assert "visit" not in back.attrs
    assert_datasets_equal(ds, back)
    np.testing.assert_array_equal(back.n_image.values, ds.n_image.values)
    assert back.n_image.dtype == np.int32
    # one node: the grid node nearest the exposure centre (1034.5, 2029.5)
    assert back.psf.shape == (1, 1, 11, 11)
    np.testing.assert_allclose(back.psf.values[0, 0], grid.values[1, 1], rtol=1e-15)
    np.testing.assert_allclose([back.psf_x.item(), back.psf_y.item()], [1034.5, 2029.5])
    assert_same_sky(ds, back)
    with fits.open(tmp_path / "coadd.fits") as hdul:
        assert hdul["NIMAGE"].data.dtype.kind == "i" and hdul["NIMAGE"].data.dtype.itemsize == 4
        assert hdul[0].header["PATCH"] == 42 and hdul["IMAGE"].header["BUNIT"] == "nJy"


def test_string_patch_and_nonfinite_zero_point(tmp_path, rng):
    ds = make_exposure(rng, (8, 9), kind="warp", attrs={"tract": 0, "patch": "3,4", "zero_point": float("nan")})
    write_fits(ds, tmp_path / "w.fits")
    with fits.open(tmp_path / "w.fits") as hdul:
        assert "FLUXMAG0" not in hdul[0].header and "MAGZERO" not in hdul[0].header
    with pytest.raises(FitsFormatError, match="no photometric zero point"):
        read_fits(tmp_path / "w.fits")


@pytest.mark.parametrize("chunks", [{"y": 37, "x": 41}, {"y": 13, "x": 90}])
def test_dask_backed_write_equals_numpy_write_and_computes_once(tmp_path, rng, chunks):
    ds = make_exposure(rng, (90, 100), x0=-20, y0=7)
    ds = ds.assign(n_image=(("y", "x"), rng.integers(0, 5, size=(90, 100)).astype(np.int32)))
    lazy = ds.chunk(chunks)
    write_fits(ds, tmp_path / "eager.fits")
    with raise_if_dask_computes(1) as counter:
        write_fits(lazy, tmp_path / "lazy.fits")
    assert counter.total_computes == 1
    assert isinstance(lazy.image.data, da.Array)  # input untouched
    assert_datasets_equal(read_fits(tmp_path / "eager.fits"), read_fits(tmp_path / "lazy.fits"))
    with fits.open(tmp_path / "eager.fits") as a, fits.open(tmp_path / "lazy.fits") as b:
        for name in ("IMAGE", "MASK", "VARIANCE", "NIMAGE"):
            np.testing.assert_array_equal(a[name].data, b[name].data)
            assert a[name].header == b[name].header


def test_write_is_atomic_and_respects_overwrite(tmp_path, rng):
    ds = make_exposure(rng, (20, 30))
    target = tmp_path / "x.fits"
    write_fits(ds, target)
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="x.fits exists; pass overwrite=True"):
        write_fits(ds, target)

    def fail(block):
        raise DataQualityError("pixel source failed", ids={"visit": 1228})

    broken = ds.chunk({"y": 7, "x": 11})
    broken["image"] = broken.image.copy(data=broken.image.data.map_blocks(fail, dtype=np.float32))
    with pytest.raises(DataQualityError, match="pixel source failed"):
        write_fits(broken, target, overwrite=True)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.fits"]
    ds2 = ds.assign(image=ds.image + np.float32(1))
    write_fits(ds2, target, overwrite=True)
    np.testing.assert_array_equal(read_fits(target).image.values, ds2.image.values)
    assert os.listdir(tmp_path) == ["x.fits"]


def test_write_rejects_stacks_and_invalid_datasets(tmp_path, rng):
    ds = make_exposure(rng, (10, 12))
    stack = ds.expand_dims(visit=[1, 2])
    with pytest.raises(SchemaError, match=r"stack of 2 visits \(select one with .isel\(visit=i\)\)"):
        write_fits(stack, tmp_path / "s.fits")
    with pytest.raises(SchemaError, match="variable 'variance' is missing"):
        write_fits(ds.drop_vars("variance"), tmp_path / "s.fits")
    assert not (tmp_path / "s.fits").exists()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    x0=st.integers(-5000, 5000),
    y0=st.integers(-5000, 5000),
    ny=st.integers(1, 17),
    nx=st.integers(1, 17),
    rotation=st.floats(-180, 180),
    dec=st.floats(-85, 85),
    sip=st.booleans(),
    names=st.lists(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=12), max_size=6, unique=True),
    seed=st.integers(0, 2**31),
)
def test_round_trip_property(tmp_path_factory, x0, y0, ny, nx, rotation, dec, sip, names, seed):
    rng = np.random.default_rng(seed)
    # an arbitrary plane dictionary: random names on random distinct bits (bit 31 included)
    canon = rng.choice(list(CANONICAL_PLANES), size=rng.integers(1, 8), replace=False).tolist()
    all_names = list(dict.fromkeys(canon + names))
    bits = rng.choice(32, size=len(all_names), replace=False)
    planes = {n: int(b) for n, b in zip(all_names, bits)}
    wcs = sip_wcs(crpix=(x0 + 4.0, y0 - 3.0), rotation_deg=rotation, ra=359.99, dec=dec) if sip else make_tan_wcs(
        ra=0.001, dec=dec, crpix=(x0 + 4.0, y0 - 3.0), rotation_deg=rotation
    )
    ds = make_exposure(rng, (ny, nx), x0=x0, y0=y0, wcs=wcs, planes=planes, attrs={"zero_point": 20 + 15 * rng.random()})
    path = tmp_path_factory.mktemp("rt") / "p.fits"
    write_fits(ds, path)
    back = read_fits(path)
    assert_datasets_equal(ds, back, variables=["image", "variance"])
    assert back.attrs["zero_point"] == ds.attrs["zero_point"]
    assert_same_sky(ds, back)
    got = mask_planes(back)
    m_in, m_out = ds.mask.values, back.mask.values
    for name, bit in planes.items():  # same planes by name
        np.testing.assert_array_equal((m_in >> bit) & 1, (m_out >> got[name]) & 1, err_msg=name)
    others = sum(1 << b for n, b in got.items() if n not in planes)
    assert not np.any(m_out & np.uint32(others))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=120),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True), _JSON, max_size=5))
def test_attrs_round_trip_property(tmp_path_factory, rng, extra):
    reserved = {"kind", "schema_version", "visit", "detector", "tract", "patch", "band", "mjd_obs", "exptime",
                "zero_point", "bunit", "source", "n_nonfinite", "n_bad_variance"}
    extra = {k: v for k, v in extra.items() if k not in reserved}
    ds = make_exposure(rng, (4, 5), attrs=extra)
    path = tmp_path_factory.mktemp("attrs") / "a.fits"
    write_fits(ds, path)
    back = read_fits(path)
    assert {k: back.attrs[k] for k in extra} == extra


# ------------------------------------------------------------------------------------------------
# a file in the LSST layout written by plain astropy
# ------------------------------------------------------------------------------------------------

FILE_PLANES = {"SAT": 0, "BAD": 1, "FOO": 2, "CR": 3, "NO_DATA": 4, "EDGE": 5, "DETECTED": 6,
               "DETECTED_NEGATIVE": 7, "INTRP": 8, "SUSPECT": 9, "HIGH": 31}
FLUXMAG0 = 6.3e10
X0, Y0 = 512, 1024


def lsst_hdul(rng, shape=(30, 44), *, x0=X0, y0=Y0):
    """An LSST-layout calexp as plain astropy writes it: big-endian data, MP_ bits in the file's order."""
    ny, nx = shape
    file_wcs = sip_wcs(crpix=(17.0, 9.0), rotation_deg=70.0)  # array frame
    primary = fits.PrimaryHDU()
    ph = primary.header
    ph["VISIT"], ph["DETECTOR"], ph["FILTER"] = 903342, 10, "r"
    ph["MJD-OBS"], ph["EXPTIME"], ph["FLUXMAG0"] = 59000.125, 15.0, FLUXMAG0
    wh = file_wcs.to_header(relax=True)
    wh["LTV1"], wh["LTV2"] = -x0, -y0
    wh["CRVAL1A"], wh["CRVAL2A"], wh["CRPIX1A"], wh["CRPIX2A"] = x0, y0, 1.0, 1.0
    wh["CTYPE1A"], wh["CTYPE2A"], wh["WCSNAMEA"] = "LINEAR", "LINEAR", "PARENT"
    image = rng.normal(50.0, 3.0, size=shape).astype(">f4")
    variance = rng.uniform(2.0, 4.0, size=shape).astype(">f4")
    bits = np.array(list(FILE_PLANES.values()), dtype=np.uint64)
    pick = (rng.random(size=shape + (len(bits),)) < 0.2).astype(np.uint64)
    mask = ((pick << bits).sum(axis=-1).astype(np.uint64) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    mh = wh.copy()
    for name, bit in FILE_PLANES.items():
        key = f"MP_{name}"
        mh.set(key if len(key) <= 8 else f"HIERARCH {key}", bit)
    hdul = fits.HDUList([
        primary,
        fits.ImageHDU(image, header=wh.copy(), name="IMAGE"),
        fits.ImageHDU(mask.astype(">i4"), header=mh, name="MASK"),
        fits.ImageHDU(variance, header=wh.copy(), name="VARIANCE"),
        fits.ImageHDU(gaussian_stamp(9, 1.3).astype(">f8"), name="PSF"),
    ])
    return hdul, file_wcs


def test_hand_written_lsst_file_ingests(tmp_path, rng):
    hdul, file_wcs = lsst_hdul(rng)
    hdul.writeto(tmp_path / "calexp-903342-010.fits")
    assert hdul["IMAGE"].data.dtype.byteorder == ">"
    ds = no_warnings_read(tmp_path / "calexp-903342-010.fits")
    ny, nx = hdul["IMAGE"].data.shape
    # pixels: native float32, identical values
    assert ds.image.dtype == np.float32 and ds.image.dtype.isnative
    np.testing.assert_array_equal(ds.image.values, hdul["IMAGE"].data.astype(np.float32))
    np.testing.assert_array_equal(ds.variance.values, hdul["VARIANCE"].data.astype(np.float32))
    # parent frame
    np.testing.assert_array_equal(ds.x.values, np.arange(X0, X0 + nx))
    np.testing.assert_array_equal(ds.y.values, np.arange(Y0, Y0 + ny))
    jj, ii = np.mgrid[0:ny, 0:nx]
    np.testing.assert_allclose(
        np.array(get_wcs(ds).pixel_to_world_values(ii + X0, jj + Y0)),
        np.array(file_wcs.pixel_to_world_values(ii, jj)), rtol=0, atol=1e-11,
    )
    assert get_wcs(ds).sip is not None
    # mask planes mapped by name; FOO and HIGH kept on free bits
    planes = mask_planes(ds)
    for name in CANONICAL_PLANES:
        assert planes[name] == CANONICAL_PLANES[name]
    assert planes["FOO"] >= len(CANONICAL_PLANES) and planes["HIGH"] >= len(CANONICAL_PLANES)
    raw = hdul["MASK"].data.astype(np.int64) & 0xFFFFFFFF
    for name, bit in FILE_PLANES.items():
        np.testing.assert_array_equal((raw >> bit) & 1, (ds.mask.values >> planes[name]) & 1, err_msg=name)
    assert np.any((raw >> 31) & 1)
    value = int(ds.mask.values[0, 0])
    assert sorted(decode_pixel(value, planes)) == sorted(n for n, b in FILE_PLANES.items() if raw[0, 0] >> b & 1)
    # ids and calibration
    assert ds.attrs["kind"] == "exposure"
    assert (ds.attrs["visit"], ds.attrs["detector"], ds.attrs["band"]) == (903342, 10, "r")
    assert (ds.attrs["mjd_obs"], ds.attrs["exptime"]) == (59000.125, 15.0)
    np.testing.assert_allclose(ds.attrs["zero_point"], 2.5 * np.log10(FLUXMAG0), rtol=1e-15)
    assert ds.attrs["bunit"] == "adu" and ds.attrs["source"] == "calexp-903342-010.fits"
    # PSF HDU: one node at the exposure centre, normalised
    stamp = gaussian_stamp(9, 1.3)
    assert ds.psf.shape == (1, 1, 9, 9)
    np.testing.assert_allclose(ds.psf.values[0, 0], stamp / stamp.sum(), rtol=1e-14)
    np.testing.assert_allclose([ds.psf_x.item(), ds.psf_y.item()], [X0 + (nx - 1) / 2, Y0 + (ny - 1) / 2])
    # and it writes back out and in again unchanged
    write_fits(ds, tmp_path / "again.fits")
    again = read_fits(tmp_path / "again.fits")
    assert_datasets_equal(ds, again)
    assert_same_sky(ds, again)
    assert again.attrs["zero_point"] == ds.attrs["zero_point"]


def test_psfex_file_beside_the_exposure(tmp_path, rng):
    hdul, _ = lsst_hdul(rng, shape=(40, 60))
    hdul.writeto(tmp_path / "calexp.fits")
    psf_path = write_psf(tmp_path / "calexp.psf", width_basis(25), samp=0.5)
    ds = read_fits(tmp_path / "calexp.fits", psf_file=psf_path)
    assert ds.psf.shape == (3, 3, 13, 13)
    np.testing.assert_allclose(ds.psf_x.values, X0 - 0.5 + np.array([10.0, 30.0, 50.0]))
    np.testing.assert_allclose(ds.psf_y.values, Y0 - 0.5 + np.array([20.0, 60.0, 100.0]) / 3)
    k = np.arange(13, dtype=float) - 6
    px, py = np.meshgrid(k, k, indexing="xy")
    for ix, x in enumerate(ds.psf_x.values):
        # PSFEx positions are 1-based on the FITS array: array x = parent x - X0
        expected = closed_form(px / 0.5, py / 0.5, u_of(x - X0))
        np.testing.assert_allclose(ds.psf.values[1, ix], expected / expected.sum(), rtol=0, atol=1e-6)
    grid = read_fits(tmp_path / "calexp.fits", psf_file=psf_path, psf_nodes=(1, 2))
    assert grid.psf.shape == (1, 2, 13, 13)
    # the PSFEx file wins over the PSF HDU
    assert "PSF" in [h.name for h in hdul]


def test_tile_compressed_calexp(tmp_path, rng):
    hdul, _ = lsst_hdul(rng, shape=(64, 80))
    plain = fits.HDUList([hdul[0]] + [
        fits.CompImageHDU(hdul[name].data.astype(hdul[name].data.dtype.newbyteorder("=")), header=hdul[name].header,
                          name=name, compression_type="GZIP_2", quantize_level=0)
        for name in ("IMAGE", "MASK", "VARIANCE")
    ])
    path = _write(tmp_path, plain, "compressed.fits")
    ds = read_fits(path)
    np.testing.assert_array_equal(ds.image.values, hdul["IMAGE"].data)
    np.testing.assert_array_equal(ds.variance.values, hdul["VARIANCE"].data)
    assert (int(ds.x[0]), int(ds.y[0])) == (X0, Y0) and "FOO" in mask_planes(ds)
    cut = tmp_path / "compressed_cut.fits"
    data = path.read_bytes()
    with fits.open(path) as opened:
        mask_starts = opened.fileinfo(2)["datLoc"]
    cut.write_bytes(data[: mask_starts + 10])
    with pytest.raises(FitsFormatError, match=r"truncated FITS file: HDU 2 \(MASK\)"):
        read_fits(cut)
    with fits.open(path) as opened:
        start, span = opened.fileinfo(1)["datLoc"], opened.fileinfo(1)["datSpan"]
    corrupt = bytearray(data)
    corrupt[start + span // 2 : start + span // 2 + 500] = b"\xff" * 500
    (tmp_path / "corrupt.fits").write_bytes(bytes(corrupt))
    with pytest.raises(FitsFormatError, match=r"truncated or unreadable IMAGE HDU: .*\[file=corrupt.fits"):
        read_fits(tmp_path / "corrupt.fits")


# ------------------------------------------------------------------------------------------------
# bad pixels: masked or flagged, never an error, never a warning
# ------------------------------------------------------------------------------------------------


def test_nonfinite_pixels_are_masked_and_bad_variance_flagged(tmp_path, rng):
    hdul, _ = lsst_hdul(rng)
    img, var, raw = hdul["IMAGE"].data, hdul["VARIANCE"].data, hdul["MASK"].data
    bad_pix = np.zeros(img.shape, bool)
    bad_pix[3, 4] = bad_pix[5, 6] = bad_pix[7, 8] = True
    bad_var = np.zeros(img.shape, bool)
    bad_var[1, 1] = bad_var[2, 2] = bad_var[9, 9] = True
    raw[bad_pix | bad_var] = 0  # unmasked in the file
    img[3, 4], img[5, 6], img[7, 8] = np.nan, np.inf, -np.inf
    var[1, 1], var[2, 2], var[9, 9], var[3, 4] = 0.0, -1.0, np.inf, np.nan
    # a standard no-data pixel (NaN, NO_DATA, +inf) is already masked: left as it is
    img[20, 30], var[20, 30], raw[20, 30] = np.nan, np.inf, 1 << FILE_PLANES["NO_DATA"]
    hdul.writeto(tmp_path / "bad.fits")
    ds = no_warnings_read(tmp_path / "bad.fits")
    mask = ds.mask.values
    expected = np.zeros(img.shape, np.uint32)
    expected[bad_pix] = MaskPlane.NO_DATA | MaskPlane.UNMASKEDNAN
    expected[bad_var] = MaskPlane.BAD_VARIANCE
    expected[20, 30] = MaskPlane.NO_DATA
    sel = bad_pix | bad_var
    sel[20, 30] = True
    np.testing.assert_array_equal(mask[sel], expected[sel])
    assert not np.any(mask[~sel] & np.uint32(MaskPlane.UNMASKEDNAN | MaskPlane.BAD_VARIANCE))
    assert np.isnan(ds.image.values[3, 4]) and np.isposinf(ds.image.values[5, 6])
    assert ds.variance.values[2, 2] == -1.0  # flagged, not altered
    assert ds.attrs["n_nonfinite"] == 4
    assert ds.attrs["n_bad_variance"] == 3


def test_standard_no_data_pixels_round_trip_exactly(tmp_path, rng):
    ds = make_exposure(rng, (20, 25), x0=3, y0=4)
    image, variance, mask = ds.image.values.copy(), ds.variance.values.copy(), ds.mask.values.copy()
    image[:, :6], variance[:, :6], mask[:, :6] = np.nan, np.inf, MaskPlane.NO_DATA
    ds = ds.assign(image=ds.image.copy(data=image), variance=ds.variance.copy(data=variance),
                   mask=ds.mask.copy(data=mask))
    write_fits(ds, tmp_path / "edge.fits")
    back = read_fits(tmp_path / "edge.fits")
    assert_datasets_equal(ds, back)
    assert back.attrs["n_nonfinite"] == 120 and back.attrs["n_bad_variance"] == 0


# ------------------------------------------------------------------------------------------------
# bad input: clear errors naming the file and what is wrong
# ------------------------------------------------------------------------------------------------


def _write(tmp_path, hdul, name="bad.fits"):
    path = tmp_path / name
    hdul.writeto(path, output_verify="silentfix")
    return path


_WCS_PREFIXES = ("CTYPE", "CRVAL", "CRPIX", "CDELT", "CUNIT", "CD1_", "CD2_", "PC", "A_", "B_", "AP_", "BP_")
_WCS_KEYS = ("LONPOLE", "LATPOLE", "RADESYS", "EQUINOX", "WCSNAMEA", "MJDREF", "WCSAXES", "DATEREF", "MJDREFI", "MJDREFF")


def _drop_wcs(h):
    for key in list(h.keys()):
        if key.startswith(_WCS_PREFIXES) or key in _WCS_KEYS:
            del h[key]


def _set(hdu, **kw):
    for key, value in kw.items():
        hdu.header[key] = value


BAD_CASES = {
    "missing MASK": (lambda h: h.pop(2), r"missing HDU\(s\) MASK \(HDUs present: \['PRIMARY', 'IMAGE', 'VARIANCE', 'PSF'\]\)"),
    "missing two": (lambda h: [h.pop(3), h.pop(1)], r"missing HDU\(s\) IMAGE, VARIANCE"),
    "shape mismatch": (
        lambda h: h.__setitem__(3, fits.ImageHDU(np.ones((30, 45), ">f4"), header=h[3].header, name="VARIANCE")),
        r"image planes have different shapes: IMAGE \(30, 44\), MASK \(30, 44\), VARIANCE \(30, 45\)",
    ),
    "no WCS": (lambda h: _drop_wcs(h["IMAGE"].header), r"IMAGE HDU has no WCS \(no CTYPE1/CTYPE2 keywords\)"),
    "non-celestial WCS": (
        lambda h: _set(h["IMAGE"], CTYPE1="LINEAR", CTYPE2="LINEAR"), "IMAGE HDU WCS is not a 2-D celestial WCS"
    ),
    "no zero point": (
        lambda h: h[0].header.remove("FLUXMAG0"),
        "no photometric zero point: none of the keywords MAGZERO, FLUXMAG0 is in the primary or IMAGE header",
    ),
    "infinite MAGZERO": (lambda h: _set(h[0], MAGZERO="inf"), r"MAGZERO = 'inf' is not finite"),
    "unknown projection": (
        lambda h: _set(h["IMAGE"], CTYPE1="RA---XYZ", CTYPE2="DEC--XYZ"), r"IMAGE HDU WCS cannot be parsed: Unrecognized projection code \(XYZ in CTYPE1\)\. \[file"
    ),
    "bad FLUXMAG0": (lambda h: _set(h[0], FLUXMAG0=-5.0), r"FLUXMAG0 = -5.0 must be positive"),
    "text MAGZERO": (lambda h: _set(h[0], MAGZERO="high"), r"MAGZERO = 'high' is not a number"),
    "even PSF": (
        lambda h: h.__setitem__(4, fits.ImageHDU(np.ones((8, 9)), name="PSF")), "PSF HDU must have odd sizes, got 8x9"
    ),
    "negative PSF": (
        lambda h: h.__setitem__(4, fits.ImageHDU(-np.ones((9, 9)), name="PSF")), "PSF HDU must have a positive sum"
    ),
    "NaN PSF": (
        lambda h: h.__setitem__(4, fits.ImageHDU(np.full((9, 9), np.nan), name="PSF")),
        "PSF HDU contains non-finite values",
    ),
    "3-D IMAGE": (
        lambda h: h.__setitem__(1, fits.ImageHDU(np.ones((2, 30, 44), ">f4"), header=h[1].header, name="IMAGE")),
        r"IMAGE HDU must hold a 2-D image, found data of shape \(2, 30, 44\)",
    ),
    "empty IMAGE": (
        lambda h: h.__setitem__(1, fits.ImageHDU(None, header=h[1].header, name="IMAGE")),
        "IMAGE HDU holds no data; a 2-D image is expected",
    ),
    "float MASK": (
        lambda h: h.__setitem__(2, fits.ImageHDU(np.ones((30, 44), ">f4"), header=h[2].header, name="MASK")),
        "MASK HDU holds float32 data; an integer bit field is expected",
    ),
    "duplicate MP bit": (lambda h: _set(h["MASK"], MP_OTHER=3), "MASK keywords MP_CR and MP_OTHER both claim bit 3"),
    "bad MP value": (lambda h: _set(h["MASK"], MP_OTHER=40), r"MASK keyword MP_OTHER = 40 is not a bit index in 0..31"),
    "too many planes": (
        lambda h: [h["MASK"].header.set(f"HIERARCH MP_EXTRA{b}", b) for b in range(10, 31)],
        "MASK HDU: no free mask bit left for plane 'EXTRA",
    ),
    "origins disagree": (lambda h: _set(h["IMAGE"], LTV1=-511.0), r"parent origins disagree"),
    "fractional origin": (
        lambda h: _set(h["IMAGE"], LTV1=-511.5, CRVAL1A=511.5), r"parent origin \(511.5, 1024.0\) is not an integer"
    ),
    "binned LTM": (lambda h: _set(h["IMAGE"], LTM1_1=0.5), "LTM1_1 = 0.5; only unbinned"),
    "scaled A WCS": (lambda h: _set(h["IMAGE"], CDELT1A=2.0), "parent-frame WCS 'A' has scale 2.0 on axis 1"),
    "bad kind": (lambda h: _set(h[0], SKYKIND="banana"), "SKYKIND 'banana' is not one of"),
    "bad VISIT": (lambda h: _set(h[0], VISIT="v12"), r"VISIT = 'v12' is not an integer"),
    "bad EXPTIME": (lambda h: _set(h[0], EXPTIME="long"), r"EXPTIME = 'long' is not a number"),
    "bad SKYATTRS": (lambda h: _set(h[0], SKYATTRS="{not json"), "SKYATTRS is not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_files(tmp_path, rng, case):
    mutate, message = BAD_CASES[case]
    hdul, _ = lsst_hdul(rng)
    mutate(hdul)
    path = _write(tmp_path, hdul)
    with pytest.raises(FitsFormatError, match=message) as info:
        read_fits(path)
    assert "file=bad.fits" in str(info.value)


def test_bad_psf_file_beside(tmp_path, rng):
    hdul, _ = lsst_hdul(rng)
    path = _write(tmp_path, hdul, "ok.fits")
    bad = write_psf(tmp_path / "ok.psf", width_basis(25), drop=("PSF_SAMP",))
    with pytest.raises(FitsFormatError, match=r"lacks keyword\(s\) \['PSF_SAMP'\] \[file=ok.psf\]"):
        read_fits(path, psf_file=bad)


def test_unknown_planes_kept_and_no_mp_keywords_means_canonical(tmp_path, rng):
    hdul, _ = lsst_hdul(rng)
    for key in [k for k in hdul["MASK"].header if k.startswith("MP_")]:
        del hdul["MASK"].header[key]
    hdul["MASK"].header["MP_BAD"] = 0  # only BAD is named; bits 1.. set in the data are unnamed
    ds = read_fits(_write(tmp_path, hdul))
    planes = mask_planes(ds)
    raw = hdul["MASK"].data.astype(np.int64) & 0xFFFFFFFF
    for bit in (1, 2, 31):
        name = f"UNNAMED_BIT{bit}"
        np.testing.assert_array_equal((raw >> bit) & 1, (ds.mask.values >> planes[name]) & 1)
    del hdul["MASK"].header["MP_BAD"]
    hdul[0].header["MAGZERO"] = 28.5
    ds = read_fits(_write(tmp_path, hdul, "canon.fits"))
    assert ds.attrs["zero_point"] == 28.5
    planes = mask_planes(ds)
    np.testing.assert_array_equal((raw >> 8) & 1, (ds.mask.values >> planes["NO_DATA"]) & 1)
    assert "UNNAMED_BIT31" in planes and "UNNAMED_BIT8" not in planes


def test_origin_from_either_keyword_set_alone(tmp_path, rng):
    for drop in (("LTV1", "LTV2"), ("CRVAL1A", "CRVAL2A", "CRPIX1A", "CRPIX2A", "CTYPE1A", "CTYPE2A", "WCSNAMEA")):
        hdul, _ = lsst_hdul(rng, x0=-7, y0=300)
        for key in drop:
            del hdul["IMAGE"].header[key]
        ds = read_fits(_write(tmp_path, hdul, f"{drop[0]}.fits"))
        assert (int(ds.x[0]), int(ds.y[0])) == (-7, 300)
    hdul, file_wcs = lsst_hdul(rng)
    for key in ("LTV1", "LTV2", "CRVAL1A", "CRVAL2A"):
        del hdul["IMAGE"].header[key]
    ds = read_fits(_write(tmp_path, hdul, "none.fits"))
    assert (int(ds.x[0]), int(ds.y[0])) == (0, 0)
    np.testing.assert_allclose(get_wcs(ds).wcs.crpix, file_wcs.wcs.crpix)
    # an alternate celestial 'A' WCS says nothing about the parent origin
    hdul["IMAGE"].header.update(CTYPE1A="RA---TAN", CTYPE2A="DEC--TAN", CRVAL1A=150.0, CRVAL2A=2.0)
    ds = read_fits(_write(tmp_path, hdul, "celestial_a.fits"))
    assert (int(ds.x[0]), int(ds.y[0])) == (0, 0)


def test_nJy_image_without_zero_point_keywords(tmp_path, rng):
    hdul, _ = lsst_hdul(rng)
    del hdul[0].header["FLUXMAG0"]
    hdul["IMAGE"].header["BUNIT"] = "nJy"
    ds = read_fits(_write(tmp_path, hdul))
    assert ds.attrs["bunit"] == "nJy" and ds.attrs["zero_point"] == 31.4


def test_truncated_and_unreadable_files(tmp_path, rng):
    hdul, _ = lsst_hdul(rng)
    full = _write(tmp_path, hdul, "full.fits").read_bytes()
    cut_data = tmp_path / "cut_data.fits"
    cut_data.write_bytes(full[: len(full) - 6000])
    with pytest.raises(FitsFormatError, match=r"truncated .*\[file=cut_data.fits\]"):
        read_fits(cut_data)
    with fits.open(tmp_path / "full.fits") as opened:
        image_starts = opened.fileinfo(1)["datLoc"]
    cut_image = tmp_path / "cut_image.fits"
    cut_image.write_bytes(full[: image_starts + 100])
    with pytest.raises(FitsFormatError, match=r"truncated FITS file: HDU 1 \(IMAGE\) needs \d+ bytes but the file has"):
        read_fits(cut_image)
    cut_header = tmp_path / "cut_header.fits"
    cut_header.write_bytes(full[: 2880 + 1000])
    with pytest.raises(FitsFormatError, match=r"truncated or unreadable FITS file: .*\[file=cut_header.fits\]"):
        read_fits(cut_header)
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"this is not FITS" * 400)
    with pytest.raises(FitsFormatError, match=r"unreadable FITS file: .*\[file=junk.fits\]"):
        read_fits(junk)
    with pytest.raises(FileNotFoundError):
        read_fits(tmp_path / "absent.fits")
