"""The mask plane of the PSF-matching convolution: OR over the kernel footprint, in place on halo pieces."""

import math

import dask
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline._kernels_convolve import Halo, or_dilate, or_dilate_halo
from pipeline.model.masks import MaskPlane
from pipeline.psf import GaussianPsf
from pipeline.psf_match import KernelModel, convolve_kernel_model, model_psf_match
from pipeline.testing import assert_lazy, graph_size, raise_if_dask_computes
from tests.test_psf_match import _chunk, _exposure


def brute(ext, footprint):
    """The reference: OR of ``ext`` shifted by every non-zero tap, valid region."""
    k = footprint.shape[0]
    ny, nx = ext.shape[0] - k + 1, ext.shape[1] - k + 1
    out = np.zeros((max(ny, 0), max(nx, 0)), ext.dtype)
    for v, u in zip(*np.nonzero(footprint)):
        out |= ext[v:v + ny, u:u + nx]
    return out


def sparse_mask(rng, shape, dtype=np.uint32, density=0.02, bits=32):
    """Random bit fields (any of ``bits`` low bits) on a fraction ``density`` of the pixels."""
    info = np.iinfo(dtype)
    top = min(bits, info.bits)
    words = rng.integers(0, 2**top, size=shape, dtype=np.uint64, endpoint=False)
    keep = rng.uniform(size=shape) < density
    return (words * keep).astype(np.uint64).astype(dtype) if info.min == 0 else (words * keep).astype(dtype)


def footprints(rng, k):
    h = k // 2
    box = np.ones((k, k), bool)
    cross = np.zeros((k, k), bool)
    cross[h], cross[:, h] = True, True
    disk = np.hypot(*np.mgrid[-h:h + 1, -h:h + 1]) <= h
    corner = np.zeros((k, k), bool)  # an off-centre rectangle: the separable path with shifted taps
    corner[: h + 1, : max(1, h // 2)] = True
    wedge = np.tril(np.ones((k, k), bool))  # asymmetric support
    random = rng.uniform(size=(k, k)) < 0.4
    random[h, h] = True
    single = np.zeros((k, k), bool)
    single[0, k - 1] = True  # one tap at a corner: a pure shift
    return {"box": box, "cross": cross, "disk": disk, "corner": corner, "wedge": wedge, "random": random,
            "single": single}


def _halo_of(ext, ey, ex, missing=()):
    pieces = tuple(tuple(None if (i, j) in missing else ext[ey[i]:ey[i + 1], ex[j]:ex[j + 1]] for j in range(3))
                   for i in range(3))
    return Halo(pieces, tuple(ey), tuple(ex))


def _assembled(ext, ey, ex, missing, fill):
    out = ext.copy()
    for i, j in missing:
        out[ey[i]:ey[i + 1], ex[j]:ex[j + 1]] = fill
    return out


# ---------------------------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("k", [1, 3, 5, 9, 21])
def test_or_dilate_equals_brute_force_every_footprint(rng, k):
    fps = footprints(rng, k)
    for shape in [(k + 30, k + 41), (k, k), (k + 1, k + 2), (k + 3, 2 * k + 200)]:
        for density in (0.0, 0.002, 0.05, 1.0):
            ext = sparse_mask(rng, shape, density=density)
            for name, fp in fps.items():
                np.testing.assert_array_equal(or_dilate(ext, fp), brute(ext, fp), err_msg=f"{name} {shape}")


def test_or_dilate_sparse_structures_single_pixels_and_lines(rng):
    """Spans of non-zero columns: lone pixels anywhere, columns, rows, both ends of a row."""
    k = 7
    fps = footprints(rng, k)
    ny, nx = 40, 90
    cases = []
    for y, x in [(0, 0), (0, nx + k - 2), (ny + k - 2, 0), (20, 45), (3, 64), (3, 63), (30, 65)]:
        e = np.zeros((ny + k - 1, nx + k - 1), np.uint32)
        e[y, x] = 1 << 31
        cases.append(e)
    e = np.zeros((ny + k - 1, nx + k - 1), np.uint32)
    e[:, [0, 1, 70, nx + k - 2]] = [1, 2, 1 << 19, 1 << 30]  # bad columns and an edge, as in a detector mask
    cases.append(e)
    e = np.zeros_like(e)
    e[[2, 25], :] = 16
    e[10, 5:9] = 4
    cases.append(e)
    for ext in cases:
        for name, fp in fps.items():
            np.testing.assert_array_equal(or_dilate(ext, fp), brute(ext, fp), err_msg=name)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int32, np.int64])
def test_every_bit_of_every_dtype(rng, dtype):
    """Each bit travels alone, including the sign bit of signed types (1 << 31 in int32)."""
    bits = np.iinfo(dtype).bits
    k = 5
    fp = footprints(rng, k)
    for b in range(bits):
        ext = np.zeros((k + 11, k + 13), dtype)
        ys, xs = rng.integers(0, ext.shape[0], 3), rng.integers(0, ext.shape[1], 3)
        bit = np.array(1, dtype) << np.array(b, dtype)
        ext[ys, xs] = bit
        for name in ("box", "random"):
            got = or_dilate(ext, fp[name])
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, brute(ext, fp[name]), err_msg=f"bit {b} {name}")
            assert set(np.unique(got).tolist()) == {0, int(bit)}


def test_all_zero_all_ones_and_bool():
    for k in (1, 3, 21):
        fp = np.ones((k, k), bool)
        zero = np.zeros((k + 50, k + 37), np.uint32)
        np.testing.assert_array_equal(or_dilate(zero, fp), 0)
        ones = np.full((k + 50, k + 37), 0xFFFFFFFF, np.uint32)
        np.testing.assert_array_equal(or_dilate(ones, fp), 0xFFFFFFFF)
        b = np.zeros((k + 40, k + 40), bool)
        b[k // 2 + 20, k // 2 + 20] = True  # one pixel grows into a k x k square around its position
        got = or_dilate(b, fp)
        assert got.dtype == np.bool_
        want = np.zeros((41, 41), bool)
        want[20 - k // 2:21 + k // 2, 20 - k // 2:21 + k // 2] = True
        np.testing.assert_array_equal(got, want)
    # blocks smaller than the kernel: nothing valid
    assert or_dilate(np.ones((5, 30), np.uint32), np.ones((7, 7), bool)).shape == (0, 24)


def test_non_contiguous_input(rng):
    big = sparse_mask(rng, (90, 120), density=0.03)
    view = big[5:80:1, 7:100]  # rows not contiguous with each other
    fp = footprints(rng, 9)
    for name in ("box", "random"):
        np.testing.assert_array_equal(or_dilate(view, fp[name]), brute(np.ascontiguousarray(view), fp[name]))
    tview = big[:60, :50].T  # columns contiguous: a copy is made
    np.testing.assert_array_equal(or_dilate(tview, fp["box"]), brute(np.ascontiguousarray(tview), fp["box"]))


def test_footprint_validation():
    ext = np.zeros((20, 20), np.uint32)
    with pytest.raises(ValueError, match=r"square and odd, got shape \(4, 4\)"):
        or_dilate(ext, np.ones((4, 4), bool))
    with pytest.raises(ValueError, match=r"square and odd, got shape \(3, 5\)"):
        or_dilate(ext, np.ones((3, 5), bool))
    with pytest.raises(ValueError, match=r"square and odd, got shape \(3, 3, 1\)"):
        or_dilate(ext, np.ones((3, 3, 1), bool))
    halo = _halo_of(ext, (0, 2, 18, 20), (0, 2, 18, 20))
    with pytest.raises(ValueError, match=r"square and odd, got shape \(2, 2\)"):
        or_dilate_halo(halo, np.ones((2, 2), bool))
    # no taps at all: nothing is set
    np.testing.assert_array_equal(or_dilate(np.ones((9, 9), np.uint32), np.zeros((3, 3), bool)), 0)


# ---------------------------------------------------------------------------------------------- halo pieces


@pytest.mark.parametrize("crop", [0, 2])
def test_halo_pieces_equal_assembled_block(rng, crop):
    """Pieces read in place (missing ones as ``fill``, a deeper halo cropped) = OR of the assembled block."""
    k = 7
    h = k // 2
    d = h + crop
    ny, nx = 33, 47
    ext = sparse_mask(rng, (ny + 2 * d, nx + 2 * d), density=0.01)
    ey, ex = (0, d, d + ny, ny + 2 * d), (0, d, d + nx, nx + 2 * d)
    fps = footprints(rng, k)
    missing_sets = [(), ((0, 0), (0, 1), (0, 2)), ((0, 0), (1, 0), (2, 0), (2, 1), (2, 2)),
                    tuple((i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1))]
    for missing in missing_sets:
        for fill in (0, 1 << 8):
            full = _assembled(ext, ey, ex, missing, fill)
            cropped = full[crop:full.shape[0] - crop, crop:full.shape[1] - crop]
            halo = _halo_of(ext, ey, ex, missing)
            for name, fp in fps.items():
                got = or_dilate_halo(halo, fp, crop=crop, fill=fill)
                np.testing.assert_array_equal(got, brute(cropped, fp), err_msg=f"{name} {missing} {fill}")


def test_halo_pieces_views_and_dtype(rng):
    """Pieces that are strided views of a larger array, and int32 pieces read as uint32."""
    k = 21
    h = k // 2
    parent = sparse_mask(rng, (300, 310), dtype=np.int32, density=0.004)
    parent[:, 3] = np.int32(-2**31)  # bit 31 of a signed mask
    ext = parent[10:10 + 60 + 2 * h, 20:20 + 75 + 2 * h]
    ey, ex = (0, h, h + 60, 60 + 2 * h), (0, h, h + 75, 75 + 2 * h)
    halo = _halo_of(ext, ey, ex)
    got = or_dilate_halo(halo, np.ones((k, k), bool), dtype=np.uint32)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, brute(ext.astype(np.uint32), np.ones((k, k), bool)))


@settings(max_examples=40, deadline=None)
@given(h=st.integers(0, 6), ny=st.integers(1, 30), nx=st.integers(1, 30), cy=st.integers(0, 3),
       cx=st.integers(0, 3), density=st.sampled_from([0.0, 0.01, 0.1, 0.5]), kind=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_property_halo_or_equals_brute_force(h, ny, nx, cy, cx, density, kind, seed):
    """Any footprint, block shape, halo depth (``crop`` beyond the radius) and mask density."""
    rng = np.random.default_rng(seed)
    k = 2 * h + 1
    fp = [np.ones((k, k), bool), rng.uniform(size=(k, k)) < 0.5, np.eye(k, dtype=bool),
          np.pad(np.ones((1, k), bool), ((h, h), (0, 0)))][kind]
    d = h + max(cy, cx)
    crop = max(cy, cx)
    ext = sparse_mask(rng, (ny + 2 * d, nx + 2 * d), density=density)
    ey, ex = (0, d, d + ny, ny + 2 * d), (0, d, d + nx, nx + 2 * d)
    missing = tuple((i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1) and rng.uniform() < 0.3)
    full = _assembled(ext, ey, ex, missing, 0)
    want = brute(full[crop:full.shape[0] - crop, crop:full.shape[1] - crop], fp)
    np.testing.assert_array_equal(or_dilate_halo(_halo_of(ext, ey, ex, missing), fp, crop=crop), want)
    np.testing.assert_array_equal(or_dilate(full[crop:full.shape[0] - crop, crop:full.shape[1] - crop], fp), want)


# ---------------------------------------------------------------------------------------------- task


def _model(footprint, box):
    """A spatially constant kernel model whose only basis image has the given non-zero taps."""
    basis = np.where(footprint, 1.0, 0.0)[None] / footprint.sum()
    return KernelModel(basis, np.ones((1, 1)), box, 0)


def _mask_want(mask, footprint, no_data):
    k = footprint.shape[0]
    h = k // 2
    want = brute(np.pad(mask, h), footprint)
    want[:h], want[-h:], want[:, :h], want[:, -h:] = no_data, no_data, no_data, no_data
    return want


@pytest.mark.parametrize("chunks", [(37, 41), (64, 23), (3, 7)])
def test_task_mask_plane_numpy_dask_equal_and_lazy(tan_wcs, chunks):
    """convolve_kernel_model's mask: brute-force OR, NO_DATA border, same on every chunking, lazy."""
    rng = np.random.default_rng(11)
    shape = (150, 170)
    planes = [p for p in MaskPlane if p is not MaskPlane.NO_DATA]
    mask = np.zeros(shape, np.uint32)
    for p in planes:
        ys, xs = rng.integers(0, shape[0], 4), rng.integers(0, shape[1], 4)
        mask[ys, xs] |= np.uint32(p)
    mask[:, 60] |= np.uint32(MaskPlane.BAD)  # a bad column
    ds = _exposure(tan_wcs, GaussianPsf(1.8), shape=shape, mask=mask)
    box = (ds.x.values[0], ds.y.values[0], ds.x.values[-1] + 1, ds.y.values[-1] + 1)
    fps = footprints(rng, 9)
    no_data = np.uint32(MaskPlane.NO_DATA)
    for name in ("box", "disk", "wedge"):
        km = _model(fps[name], box)
        want = _mask_want(mask, fps[name], no_data)
        eager = convolve_kernel_model(ds, km)
        np.testing.assert_array_equal(eager["mask"].values, want, err_msg=name)
        dsk = _chunk(ds, chunks)
        with raise_if_dask_computes():
            lazy = convolve_kernel_model(dsk, km)
        np.testing.assert_array_equal(lazy["mask"].data.compute(scheduler="synchronous"), want, err_msg=name)
        assert_lazy(lambda: convolve_kernel_model(dsk, km))


def test_task_mask_graph_size(tan_wcs):
    """The mask plane: one task per block plus at most 8 neighbour strips, no concatenation."""
    ds = _exposure(tan_wcs, GaussianPsf(1.8), shape=(200, 220))
    out, _ = model_psf_match(_chunk(ds, (37, 41)), GaussianPsf(3.0))
    nchunks = math.ceil(200 / 37) * math.ceil(220 / 41)
    size = graph_size(out["mask"].data)
    assert size <= 10 * nchunks, size
    names = {k[0] if isinstance(k, tuple) else k for k in dict(out["mask"].data.__dask_graph__())}
    assert not any(n.startswith(("overlap-", "concatenate")) for n in names)
    with dask.config.set(scheduler="synchronous"):
        got = out["mask"].data.compute()
    eager, model = model_psf_match(ds, GaussianPsf(3.0))
    np.testing.assert_array_equal(got, eager["mask"].values)
    h = model.radius
    assert (got[:h] == np.uint32(MaskPlane.NO_DATA)).all() and (got[h:-h, h:-h] == 0).all()
