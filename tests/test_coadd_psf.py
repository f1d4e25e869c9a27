"""Tests of pipeline.coadd_psf: weighted mean of warped PSFs per grid node."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tan_wcs
from pipeline.coadd_psf import CoaddPsfConfig, coadd_psf
from pipeline.errors import DataQualityError, SchemaError
from pipeline.model.geometry import Box
from pipeline.model.schema import PSF_DIMS, make_dataset, psf_grid
from pipeline.testing import assert_lazy, graph_size
from pipeline.warp import WarpConfig, warp_exposure


def gauss(sigma, size):
    h = size // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    g = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
    return g / g.sum()


def grid(images, xs=(10.0, 30.0), ys=(10.0, 30.0)):
    """A (2, 2) grid of PSFs; ``images`` is one image or a (2, 2) nested list."""
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 2:
        arr = np.broadcast_to(arr, (len(ys), len(xs)) + arr.shape).copy()
    return xr.DataArray(arr, dims=PSF_DIMS, coords={"psf_y": list(ys), "psf_x": list(xs)})


def second_moment(p):
    h = p.shape[-1] // 2
    xx = np.arange(-h, h + 1)
    return (p * xx[None, :] ** 2).sum(axis=(-2, -1))


def test_weighted_mean_closed_form():
    a, b = gauss(1.5, 15), gauss(2.5, 15)
    out = coadd_psf([grid(a), grid(b)], [1.0, 3.0])
    expect = (1.0 * a + 3.0 * b) / 4.0
    assert out.dims == PSF_DIMS
    np.testing.assert_allclose(out.values, np.broadcast_to(expect, out.shape), rtol=1e-13)
    np.testing.assert_allclose(out.values.sum(axis=(2, 3)), 1.0, rtol=1e-13)
    np.testing.assert_allclose(second_moment(out.values), (second_moment(a) + 3 * second_moment(b)) / 4, rtol=1e-12)
    assert out.psf_n_inputs.values.tolist() == [[2, 2], [2, 2]]


def test_only_inputs_covering_a_node_contribute():
    a, b = gauss(1.5, 15), gauss(2.5, 15)
    gb = grid(b)
    gb[0, 1] = np.nan  # input b does not cover node (0, 1)
    ga = grid(a)
    ga[1, 0] = np.nan
    gc = grid(a)
    gc[1, 1] = np.nan
    gd = grid(b)
    gd[1, 1] = np.nan
    out = coadd_psf([ga, gb, gc, gd], [2.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(out.values[0, 1], (3 * a + b) / 4, rtol=1e-13)  # a, c, d
    np.testing.assert_allclose(out.values[1, 0], (a + 2 * b) / 3, rtol=1e-13)  # b, c, d
    np.testing.assert_allclose(out.values[1, 1], (2 * a + b) / 3, rtol=1e-13)  # a, b
    np.testing.assert_allclose(out.values[0, 0], (3 * a + 2 * b) / 5, rtol=1e-13)
    assert out.psf_n_inputs.values.tolist() == [[4, 3], [3, 2]]


def test_kernel_sizes_are_padded_about_the_centre():
    a, b = gauss(1.0, 9), gauss(2.0, 17)
    out = coadd_psf([grid(a), grid(b)], [1.0, 1.0])
    assert out.sizes["ky"] == out.sizes["kx"] == 17
    pa = np.pad(a, 4)
    np.testing.assert_allclose(out.values[0, 0], (pa + b) / 2, rtol=1e-13)
    # the centre of the result is the centre of both inputs
    assert np.unravel_index(np.argmax(out.values[0, 0]), (17, 17)) == (8, 8)


def test_uncovered_nodes():
    a = grid(gauss(1.5, 11))
    a[0, 0] = np.nan
    out = coadd_psf([a], [1.0])
    assert np.all(np.isnan(out.values[0, 0])) and np.all(np.isfinite(out.values[1, 1]))
    assert out.psf_n_inputs.values[0, 0] == 0
    with pytest.raises(DataQualityError, match=r"no input images at PSF grid node \(0, 0\)"):
        coadd_psf([a], [1.0], config=CoaddPsfConfig(uncovered="raise"))
    lazy = coadd_psf([a.chunk()], [1.0], config=CoaddPsfConfig(uncovered="raise"))
    with pytest.raises(DataQualityError, match=r"no input images at PSF grid node \(0, 0\)"):
        lazy.psf_n_inputs.values


def test_numpy_and_dask_agree_lazily_with_bounded_graph():
    rng = np.random.default_rng(5)
    imgs = [grid(gauss(s, 13)) for s in rng.uniform(1.0, 3.0, 6)]
    imgs[2][1, 1] = np.nan
    weights = rng.uniform(0.5, 2.0, 6)
    eager = coadd_psf(imgs, weights)
    lazy = assert_lazy(
        lambda: coadd_psf(
            [p.chunk({"psf_y": 1, "psf_x": 1}) for p in imgs], xr.DataArray(da.from_array(weights), dims="w")
        )
    )
    assert isinstance(lazy.data, da.Array)
    raw = assert_lazy(lambda: coadd_psf([p.chunk() for p in imgs], da.from_array(weights)))
    np.testing.assert_allclose(raw.values, eager.values, rtol=1e-14, equal_nan=True)
    np.testing.assert_allclose(lazy.values, eager.values, rtol=1e-14, equal_nan=True)
    # graph: linear in inputs x grid chunks (here 6 inputs x 4 chunks), no quadratic blow-up
    size6 = graph_size(lazy.data)
    assert size6 <= 25 * 6 * 4
    twelve = coadd_psf([p.chunk({"psf_y": 1, "psf_x": 1}) for p in imgs * 2], np.concatenate([weights, weights]))
    assert graph_size(twelve.data) <= 2.2 * size6


@settings(max_examples=20, deadline=None)
@given(perm=st.permutations(list(range(5))))
def test_invariant_to_input_order(perm):
    rng = np.random.default_rng(11)
    sigmas = rng.uniform(1.0, 3.0, 5)
    weights = rng.uniform(0.5, 2.0, 5)
    psfs = [grid(gauss(s, 11)) for s in sigmas]
    psfs[1][0, 0] = np.nan
    ref = coadd_psf(psfs, weights)
    out = coadd_psf([psfs[i] for i in perm], weights[list(perm)])
    np.testing.assert_allclose(out.values, ref.values, rtol=1e-13, equal_nan=True)


def test_stack_with_leading_dimension_and_warped_inputs():
    """coadd_psf of the PSFs of two warps of one patch (different WCSs) onto one grid."""
    box = Box(0, 0, 60, 60)
    dst = make_tan_wcs(crpix=(30.0, 30.0))
    psfs = []
    for k, (crpix, rot, s) in enumerate((((30.0, 30.0), 0.0, 1.5), ((45.0, 30.0), 20.0, 2.2))):
        ds = make_dataset(
            np.zeros((60, 60)), np.ones((60, 60)), np.zeros((60, 60)), wcs=make_tan_wcs(crpix=crpix, rotation_deg=rot),
            psf=psf_grid(gauss(s, 15), x=30.0, y=30.0), attrs={"visit": k, "zero_point": 31.4},
        )
        psfs.append(warp_exposure(ds, wcs=dst, box=box, chunks=30, config=WarpConfig(psf_spacing=10)).psf)
    assert psfs[0].sizes["ky"] == 15 and psfs[1].sizes["ky"] == 21  # the rotated PSF box is larger
    out = coadd_psf(psfs, [1.0, 1.0])
    # one DataArray with a leading input dimension works too
    same = coadd_psf(xr.concat([psfs[1], psfs[1]], dim="visit"), [1.0, 2.0])
    np.testing.assert_allclose(same.values, psfs[1].values, rtol=1e-13, equal_nan=True)
    n = out.psf_n_inputs.values
    assert n.max() == 2 and n.min() == 1  # the second exposure is shifted by 15 px and rotated
    assert out.shape[:2] == (6, 6)
    both = np.argwhere(n == 2)[0]
    # a rotated circular Gaussian stays circular: the mean of two normalised Gaussians
    np.testing.assert_allclose(second_moment(out.values[tuple(both)]), (1.5**2 + 2.2**2) / 2, rtol=0.02)
    np.testing.assert_allclose(np.nansum(out.values, axis=(2, 3)), 1.0, rtol=1e-12)


def test_validation_errors():
    a = grid(gauss(1.5, 11))
    with pytest.raises(SchemaError, match="coadd_psf needs at least one input PSF"):
        coadd_psf([], [])
    with pytest.raises(SchemaError, match=r"input PSF 1 has dims \('y', 'x'\), expected \('psf_y', 'psf_x', 'ky', 'kx'\)"):
        coadd_psf([a, xr.DataArray(np.ones((3, 3)), dims=("y", "x"))], [1, 1])
    with pytest.raises(SchemaError, match=r"input PSF 1 has dims ndarray"):
        coadd_psf([a, np.ones((2, 2, 11, 11))], [1, 1])
    moved = grid(gauss(1.5, 11), xs=(10.0, 31.0))
    with pytest.raises(SchemaError, match=r"input PSF 1 is on another grid: psf_x \[10.0, 31.0\] differs from \[10.0, 30.0\]"):
        coadd_psf([a, moved], [1, 1])
    with pytest.raises(SchemaError, match=r"weights have shape \(3,\); expected one weight per input \(2\)"):
        coadd_psf([a, a], [1, 1, 1])
    with pytest.raises(SchemaError, match=r"weights have shape \(3,\); expected one weight per input \(2\)"):
        coadd_psf([a, a], xr.DataArray(np.ones(3), dims="v"))
    with pytest.raises(SchemaError, match=r"weights must be positive and finite, got -1.0"):
        coadd_psf([a, a], [1, -1])
    with pytest.raises(SchemaError, match=r"weights must be positive and finite, got nan"):
        coadd_psf([a, a], [1, np.nan])
    with pytest.raises(SchemaError, match=r"PSF stack has dims \('a', 'b'\)"):
        coadd_psf(xr.DataArray(np.ones((2, 2)), dims=("a", "b")), [1, 1])
    with pytest.raises(ValueError, match="uncovered"):
        CoaddPsfConfig(uncovered="drop")
