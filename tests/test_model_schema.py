import dask.array as da
import numpy as np
import pytest
import xarray as xr

from pipeline.errors import SchemaError
from pipeline.model import schema as s
from pipeline.model.wcs import get_wcs
from pipeline.testing import assert_lazy


def _ds(wcs, shape=(30, 40), **kw):
    rng = np.random.default_rng(1)
    return s.make_dataset(
        rng.normal(size=shape), np.ones(shape), np.zeros(shape, int), wcs=wcs, x0=5, y0=7,
        attrs={"visit": 1, "detector": 2, "zero_point": 27.0}, **kw,
    )


def test_make_dataset_types_and_coords(tan_wcs):
    ds = _ds(tan_wcs)
    assert ds.image.dtype == np.float32 and ds.variance.dtype == np.float32 and ds.mask.dtype == np.uint32
    assert ds.x.values[0] == 5 and ds.y.values[0] == 7
    w = get_wcs(ds)
    np.testing.assert_allclose(w.wcs.crval, tan_wcs.wcs.crval)
    assert get_wcs(ds) is not w  # fresh object per call


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.drop_vars("variance"), "variable 'variance' is missing"),
        (lambda d: d.assign(image=d.image.astype("f8")), "dtype float64, expected float32"),
        (lambda d: d.assign(mask=d.mask.transpose()), r"dims \('x', 'y'\)"),
        (lambda d: d.assign_attrs(schema_version=99), "schema_version 99 is not supported"),
        (lambda d: d.assign_attrs(kind="banana"), "attrs 'kind' is 'banana'"),
        (lambda d: d.drop_vars("wcs"), "'wcs' coordinate"),
        (lambda d: d.assign_coords(x=d.x * 2), "contiguous"),
        (lambda d: d.assign_coords(x=d.x.astype(float)), "integer pixel indices"),
    ],
)
def test_validate_branches(tan_wcs, mutate, message):
    with pytest.raises(SchemaError, match=message) as info:
        s.validate(mutate(_ds(tan_wcs)))
    if "kind" not in message:
        assert "visit=1" in str(info.value)


def test_non_celestial_wcs_rejected():
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["LINEAR", "LINEAR"]
    with pytest.raises(SchemaError, match="not a 2-D celestial WCS"):
        _ds(w)


def test_shape_mismatch(tan_wcs):
    with pytest.raises(SchemaError, match="must have one shape"):
        s.make_dataset(np.zeros((3, 4)), np.zeros((3, 5)), np.zeros((3, 4)), wcs=tan_wcs)


def test_calibrate_to_njy_closed_form_and_lazy(tan_wcs):
    ds = _ds(tan_wcs).chunk(7)
    out = assert_lazy(lambda: s.calibrate_to_njy(ds))
    scale = 10 ** ((31.4 - 27.0) / 2.5)
    np.testing.assert_allclose(out.image.values, ds.image.values * scale, rtol=1e-6)
    np.testing.assert_allclose(out.variance.values, scale**2, rtol=1e-6)
    assert out.attrs["bunit"] == "nJy" and ds.attrs.get("bunit") is None
    with pytest.raises(SchemaError, match="zero point"):
        s.calibrate_to_njy(ds.assign_attrs(zero_point=float("nan")))


def test_psf_grid_normalised_and_validated(tan_wcs):
    psf = s.psf_grid(np.ones((2, 3, 5, 5)), x=[0, 10, 20], y=[0, 30])
    np.testing.assert_allclose(psf.sum(("ky", "kx")).values, 1.0)
    ds = _ds(tan_wcs, psf=psf)
    assert ds.psf.dims == s.PSF_DIMS
    with pytest.raises(SchemaError, match="odd sizes"):
        s.psf_grid(np.ones((4, 4)), x=0, y=0)
    with pytest.raises(SchemaError, match="positive sum"):
        s.psf_grid(np.zeros((3, 3)), x=0, y=0)


def test_provenance_appends_without_mutating(tan_wcs):
    ds = _ds(tan_wcs)
    out = s.with_provenance(ds, "scale_variance", {"limit": 10.0})
    assert s.provenance(ds) == []
    (step,) = s.provenance(out)
    assert step["task"] == "scale_variance" and step["config"] == {"limit": 10.0}


def test_empty_frame_is_no_data(tan_wcs):
    ds = s.empty_like_frame(x0=0, y0=0, nx=10, ny=8, wcs=tan_wcs, kind="warp", chunks=4)
    assert isinstance(ds.image.data, da.Array)
    assert np.all(np.isnan(ds.image.values)) and np.all(ds.mask.values == 256)
    assert np.all(np.isinf(ds.variance.values))
    assert isinstance(ds, xr.Dataset)


def test_singular_wcs_rejected_relative_to_scale():
    from astropy.wcs import WCS

    from pipeline.model.wcs import check_celestial

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, 10.0]
    w.wcs.cd = np.array([[1e-5, 1e-5], [1e-5, 1e-5]])
    with pytest.raises(SchemaError, match="singular pixel scale matrix"):
        check_celestial(w)
    w.wcs.cd = np.array([[-1e-9, 0.0], [0.0, 1e-9]])  # tiny but regular pixels are fine
    check_celestial(w)
