"""The per-block work around the convolution's tile loop: tile loads from a Halo, the finiteness
check they carry, and the kernel arrays held once per graph."""

import math
import pickle

import dask
import numpy as np
import pytest
from dask.highlevelgraph import HighLevelGraph
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline._kernels_convolve import NonFiniteHalo, _copy_sum, _load_halo, or_dilate
from pipeline.model.geometry import Box
from pipeline.model.masks import bitmask
from pipeline.model.schema import mask_planes
from pipeline.psf import GaussianPsf, GridPsf
from pipeline.psf_match import (ModelPsfMatchConfig, _image_block, _kernel_arrays, _mask_block, _variance_block,
                                convolve_kernel_model, solve_kernel_model)
from pipeline.testing import assert_lazy, graph_size, raise_if_dask_computes
from tests.test_psf_match import _chunk, _exposure, _stars
from tests.test_psf_match_convolve import _halo_of
from tests.conftest import make_tan_wcs

REGION = ModelPsfMatchConfig(low_rank_region=64)


# ---------------------------------------------------------------------------------------------- copy-sum


@pytest.mark.parametrize("src_dt, dst_dt", [("f4", "f4"), ("f4", "f8"), ("f8", "f8"), ("f8", "f4")])
@pytest.mark.parametrize("shape, rect", [((37, 41), (3, 30, 5, 38)), ((13, 9), (0, 13, 0, 9)), ((5, 70), (4, 5, 1, 69))])
def test_copy_sum_matches_numpy(rng, src_dt, dst_dt, shape, rect):
    """The copy is exact (one rounding into the buffer's dtype), the sum is the float64 sum of the
    values (of the source's when the buffer rounds them) to summation-order rounding, on odd shapes
    and row pitches; what lies outside the destination rectangle is untouched."""
    src = (1e3 + 50.0 * rng.normal(size=shape)).astype(src_dt)
    ra, rb, ca, cb = rect
    dst = np.full((rb - ra + 4, cb - ca + 3), -3.0, dst_dt)
    narrowing = np.dtype(src_dt).itemsize > np.dtype(dst_dt).itemsize
    total = _copy_sum(dst, 2, 1, src.ravel(), shape[1], ra, rb, ca, cb, narrowing)
    window = src[ra:rb, ca:cb]
    np.testing.assert_array_equal(dst[2:2 + rb - ra, 1:1 + cb - ca], window.astype(dst_dt))
    keep = np.ones(dst.shape, bool)
    keep[2:2 + rb - ra, 1:1 + cb - ca] = False
    assert (dst[keep] == -3.0).all()
    want = math.fsum(window.astype(np.float64).ravel())
    np.testing.assert_allclose(total, want, rtol=1e-14 * window.size, atol=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_copy_sum_of_a_non_finite_window_is_not_finite(rng, bad):
    src = rng.normal(size=(21, 33)).astype(np.float32)
    src[7, 19] = bad
    dst = np.zeros((21, 33), np.float32)
    assert not math.isfinite(_copy_sum(dst, 0, 0, src.ravel(), 33, 0, 21, 0, 33, False))
    assert math.isfinite(_copy_sum(dst, 0, 0, src.ravel(), 33, 0, 7, 0, 33, False))  # the row above it


# ---------------------------------------------------------------------------------------------- halo loads


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), ny=st.integers(6, 40), nx=st.integers(6, 40), order=st.sampled_from("CF"),
       step=st.integers(1, 2), data=st.data())
def test_property_halo_load_of_any_layout(seed, ny, nx, order, step, data):
    """Pieces in any memory layout (Fortran order, strided rows: copied once into flat form) load
    as the assembled window minus its mean, exactly as contiguous pieces do."""
    rng = np.random.default_rng(seed)
    big = (300.0 + 40.0 * rng.normal(size=(ny * step, nx * step))).astype(np.float32)
    ext = np.asarray(big[::step, ::step], order=order)
    cy = sorted(data.draw(st.lists(st.integers(0, ny), min_size=2, max_size=2)))
    cx = sorted(data.draw(st.lists(st.integers(0, nx), min_size=2, max_size=2)))
    ya, yb = sorted(data.draw(st.lists(st.integers(0, ny), min_size=2, max_size=2, unique=True)))
    xa, xb = sorted(data.draw(st.lists(st.integers(0, nx), min_size=2, max_size=2, unique=True)))
    contiguous = _halo_of(np.ascontiguousarray(ext), cy, cx)
    odd = _halo_of(ext, cy, cx)
    a, b = np.zeros((yb - ya, xb - xa), np.float32), np.ones((yb - ya, xb - xa), np.float32)
    ca, cb = _load_halo(a, contiguous, ya, yb, xa, xb), _load_halo(b, odd, ya, yb, xa, xb)
    assert ca == cb
    np.testing.assert_array_equal(a, b)
    window = ext[ya:yb, xa:xb].astype(np.float64)
    np.testing.assert_allclose(ca, window.mean(), rtol=4 * np.finfo(np.float32).eps, atol=0)
    np.testing.assert_array_equal(a, (ext[ya:yb, xa:xb] - np.float32(ca)).astype(np.float32))


def test_halo_flat_views_are_made_once_without_copies(rng):
    ext = rng.normal(size=(30, 40)).astype(np.float32)
    halo = _halo_of(ext, (5, 25), (5, 35), missing={(0, 0)})
    views, pitch, present, ey, ex = halo.flat()
    assert halo.flat()[0] is views
    assert all(np.shares_memory(v, ext) for k, v in enumerate(views) if k != 0)
    assert list(pitch[1:]) == [40] * 8 and not present[0] and present[1:].all()
    assert list(ey) == [0, 5, 25, 30] and list(ex) == [0, 5, 35, 40]
    assert not any(v.flags.writeable for v in views)
    assert repr(halo) == "Halo(shape=(30, 40), edges_y=(0, 5, 25, 30), edges_x=(0, 5, 35, 40))"


@pytest.mark.parametrize("bad, where", [(np.nan, (2, 3)), (np.inf, (20, 20)), (-np.inf, (29, 39))])
def test_halo_load_raises_on_non_finite_tiles(rng, bad, where):
    """Every piece can hold the bad value (corner strip, centre, last pixel); tiles that miss it load."""
    ext = rng.normal(size=(30, 40)).astype(np.float32)
    ext[where] = bad
    halo = _halo_of(ext, (5, 25), (5, 35))
    buf = np.zeros((32, 42), np.float32)
    y, x = where
    with pytest.raises(NonFiniteHalo, match=rf"the tile at rows {max(y - 1, 0)}:{y + 1}, columns 0:40 of the "
                                            r"halo'd block is not finite"):
        _load_halo(buf, halo, max(y - 1, 0), y + 1, 0, 40)
    other = (0, 1) if y > 1 else (28, 30)
    assert math.isfinite(_load_halo(buf, halo, other[0], other[1], 0, 40))


# ---------------------------------------------------------------------------------------------- blocks


def _case(shape=(200, 230), stars=((40, 30), (150, 60), (200, 170))):
    sci = GaussianPsf(1.9, gradient=(0.004, -0.003), center=(110, 100))
    x0, y0 = 7, -5
    rng = np.random.default_rng(5)
    img = rng.normal(size=shape) * 5.0 + 300.0 + _stars(shape, sci, stars, 3e4, x0, y0)
    var = rng.uniform(0.5, 2.0, size=shape) + img / 100.0
    mask = np.zeros(shape, np.uint32)
    mask[50:53, 60:64] = 4
    ds = _exposure(make_tan_wcs(), sci, shape=shape, x0=x0, y0=y0, image=img, variance=var, mask=mask)
    km, _ = solve_kernel_model(GridPsf.from_dataset(ds), GaussianPsf(3.2), Box.of(ds))
    return ds, km


@pytest.mark.parametrize("chunks", [(37, 41), (100, 115)])
def test_non_finite_halo_falls_back_to_the_checking_path(chunks):
    """A NaN in a block's halo strip only (its own pixels finite) and an inf in another block: the
    blocks go the checking way, their NaN / inf footprints are the dilated bad pixels, and the
    result equals the in-memory path's (float32 tiles: within its stated rounding)."""
    ds, km = _case()
    ds = ds.copy(deep=True)
    ds["image"].values[chunks[0] - 1, 60] = np.nan  # last row of a block: the block below sees it in its halo
    ds["variance"].values[150, 20] = np.inf
    with raise_if_dask_computes():
        lazy = convolve_kernel_model(_chunk(ds, chunks), km)
    eager = convolve_kernel_model(ds, km)
    fp = _kernel_arrays(km)["footprint"]
    h = km.radius
    for name, bad in (("image", np.isnan), ("variance", np.isinf)):
        got, want = lazy[name].values, eager[name].values
        marked = np.zeros(got.shape, bool)
        marked[h:-h, h:-h] = or_dilate(bad(ds[name].values), fp)
        assert (bad(got) == marked)[h:-h, h:-h].all(), name
        ok = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), ok)
        np.testing.assert_allclose(got[ok], want[ok], rtol=2e-6, atol=1e-3)


@pytest.mark.parametrize("config", [ModelPsfMatchConfig(), REGION, ModelPsfMatchConfig(convolution="exact")],
                         ids=["low-rank", "regions", "exact"])
def test_graph_holds_the_kernel_arrays_once(config):
    """Image, variance and mask graphs share one key holding the kernel arrays; no block task carries
    them; the result is bit for bit the block functions called with the arrays themselves."""
    ds, km = _case()
    chunks = (100, 115)
    dsk = _chunk(ds, chunks)
    with raise_if_dask_computes():
        out = convolve_kernel_model(dsk, km, config=config)
    arrays = [out[v].data for v in ("image", "variance", "mask")]
    graph = dict(HighLevelGraph.merge(*[a.__dask_graph__() for a in arrays]))
    inputs = set().union(*[dict(dsk[v].data.__dask_graph__()) for v in ("image", "variance", "mask")])
    kern = _kernel_arrays(km, Box.of(ds), config)
    size = len(pickle.dumps(kern))
    assert size > 20_000
    big = [k for k, v in graph.items() if k not in inputs and len(pickle.dumps(v)) > size // 10]
    assert len(big) == 1 and big[0].startswith("psf-match-kernels-"), big
    nchunks = math.ceil(200 / chunks[0]) * math.ceil(230 / chunks[1])
    assert len(graph) - len(inputs) <= 3 * 9 * nchunks + 1
    for a in arrays:
        assert graph_size(a) <= 10 * nchunks + 1
    got = dask.compute(*arrays, scheduler="synchronous")
    geom = {"x0": 7, "y0": -5, "shape": (200, 230), "no_data": bitmask("NO_DATA", mask_planes(ds)),
            "depth": km.radius}
    d = km.radius
    for func, name, fill in ((_image_block, "image", 0.0), (_variance_block, "variance", 0.0), (_mask_block, "mask", 0)):
        full = np.pad(ds[name].values, d, constant_values=fill)
        for ya in range(0, 200, chunks[0]):
            for xa in range(0, 230, chunks[1]):
                yb, xb = min(ya + chunks[0], 200), min(xa + chunks[1], 230)
                ey, ex = (0, d, d + yb - ya, 2 * d + yb - ya), (0, d, d + xb - xa, 2 * d + xb - xa)
                sub = full[ya:yb + 2 * d, xa:xb + 2 * d]
                missing = {(i, j) for i in range(3) for j in range(3)
                           if (i == 0 and ya == 0) or (i == 2 and yb == 200) or (j == 0 and xa == 0)
                           or (j == 2 and xb == 230)}
                halo = _halo_of(sub, ey[1:3], ex[1:3], missing)
                want = func(halo, geom=geom, kern=kern, loc=((ya, yb), (xa, xb)))
                np.testing.assert_array_equal(got[("image", "variance", "mask").index(name)][ya:yb, xa:xb], want)
    assert_lazy(lambda: convolve_kernel_model(dsk, km, config=config))


def test_small_chunks_take_the_kernel_key_through_map_overlap():
    """Chunks thinner than the kernel radius go through map_overlap with the same single key."""
    ds, km = _case(shape=(60, 70), stars=((30, 20),))
    with raise_if_dask_computes():
        out = convolve_kernel_model(_chunk(ds, (7, 9)), km)
    graph = dict(out["image"].data.__dask_graph__())
    assert sum(1 for k in graph if isinstance(k, str) and k.startswith("psf-match-kernels-")) == 1
    eager = convolve_kernel_model(ds, km)
    for name in ("image", "variance", "mask"):
        np.testing.assert_allclose(out[name].values, eager[name].values, rtol=2e-6, atol=1e-3, equal_nan=True)
