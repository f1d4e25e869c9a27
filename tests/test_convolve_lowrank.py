"""The low-rank convolution's tile loop: blocked combine, reused kernel spectra and work arrays."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline._kernels_convolve as kc
from pipeline._kernels_convolve import (_LANES, _blocked_inputs, _cached_spectra, _combine_blocked,
                                        _combine_lowrank, _pad_to, _scratch, correlate_direct, correlate_lowrank,
                                        kernel_spectra)
from tests.test_psf_match_convolve import _combine_reference, _halo_of

EPS32 = float(np.finfo(np.float32).eps)


def _weights(rng, n_r, n_a, n_n, ny, nx, const_is_norm):
    """Random combine weights of the shapes ``correlate_lowrank`` hands over (float32 departures)."""
    dep_rows = rng.normal(size=(n_r, n_a, ny)).astype(np.float32)
    col_terms = np.vstack([np.ones(nx), rng.uniform(-1, 1, size=(n_a - 1, nx))])
    norm_rows = np.vstack([np.full(ny, 3.0), 0.2 * rng.normal(size=(n_n - 1, ny))])
    const_rows = np.zeros((n_a, ny))
    const_rows[:n_n] = norm_rows if const_is_norm else rng.normal(size=(n_n, ny))
    return dep_rows, col_terms.astype(np.float32), const_rows, norm_rows, col_terms


def _blocked(out, convs, c, dep_rows, dep_cols, const_rows, norm_rows, col_terms, power, y0, y1, x0, x1, off,
             const_is_norm, pad_value=0.0):
    """:func:`_combine_blocked` on inputs padded as ``correlate_lowrank`` pads them; the transform
    rows' padding columns hold ``pad_value``."""
    n_r, fy, fx = convs.shape
    extra = -(-(x1 - x0) // _LANES) * _LANES - (x1 - x0)
    stack = np.full((n_r, fy, fx + extra), pad_value, np.float32)
    stack[:, :, :fx] = convs
    padded = _blocked_inputs(dep_rows, dep_cols, const_rows, norm_rows, col_terms, out.shape[1])
    _combine_blocked(out, stack, n_r, c, *padded, power, y0, y1, x0, x1, off, const_is_norm)


# ---------------------------------------------------------------------------------------------- combine


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**16), n_r=st.integers(0, 9), n_a=st.integers(1, 10), n_n=st.integers(1, 10),
       power=st.sampled_from([1, 2]), const_is_norm=st.booleans(), data=st.data())
def test_property_blocked_combine_within_float32_rounding(seed, n_r, n_a, n_n, power, const_is_norm, data):
    """Every component count (whole and partial groups of four), every axis-term count (whole and
    partial groups of three), both powers, the constant as the normaliser or not, tiles anywhere in
    the block (its edges included, widths off the lane multiple): float32 rounding of the float64
    result, and of the one-component-at-a-time combine; nothing outside the tile is written."""
    rng = np.random.default_rng(seed)
    ny, nx, off = 37, 150, data.draw(st.integers(0, 4))
    n_n = min(n_n, n_a)
    y0 = data.draw(st.integers(0, ny - 1))
    y1 = data.draw(st.integers(y0 + 1, ny))
    x0 = data.draw(st.integers(0, nx - 1))
    x1 = data.draw(st.integers(x0 + 1, nx))
    fy, fx = y1 - y0 + 2 * off + 1, x1 - x0 + 2 * off
    convs = rng.normal(size=(n_r, fy, fx)).astype(np.float32)
    weights = _weights(rng, n_r, n_a, n_n, ny, nx, const_is_norm)
    c = float(np.float32(rng.normal(scale=50.0)))
    args = (c, *weights, power, y0, y1, x0, x1, off, const_is_norm)
    got = np.full((ny, nx), -5.0, np.float32)
    _blocked(got, convs, *args)
    old = np.full((ny, nx), -5.0, np.float32)
    _combine_lowrank(old, convs, *args)
    want, scale = _combine_reference(convs, *args)
    err = np.abs(got[y0:y1, x0:x1] - want)
    assert (err <= 2 * EPS32 * scale).all(), float((err / scale).max())
    assert (np.abs(got - old)[y0:y1, x0:x1] <= 4 * EPS32 * scale).all()
    rest = np.ones((ny, nx), bool)
    rest[y0:y1, x0:x1] = False
    assert (got[rest] == -5.0).all()


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("const_is_norm", [True, False])
def test_blocked_combine_ignores_padding_lanes(rng, power, const_is_norm):
    """The lanes past the tile read padding columns: whatever they hold, the outputs are the same."""
    ny, nx, off, n_r, n_a, n_n = 20, 100, 3, 5, 4, 2
    y0, y1, x0, x1 = 2, 19, 1, 100  # 99 columns: the last pass runs 29 lanes past the tile
    convs = rng.normal(size=(n_r, y1 - y0 + 2 * off, x1 - x0 + 2 * off)).astype(np.float32)
    args = (7.0, *_weights(rng, n_r, n_a, n_n, ny, nx, const_is_norm), power, y0, y1, x0, x1, off, const_is_norm)
    zero = np.zeros((ny, nx), np.float32)
    _blocked(zero, convs, *args)
    big = np.zeros((ny, nx), np.float32)
    _blocked(big, convs, *args, pad_value=3e38)
    np.testing.assert_array_equal(zero, big)
    want, scale = _combine_reference(convs, *args)
    assert (np.abs(zero[y0:y1, x0:x1] - want) <= 2 * EPS32 * scale).all()


def test_blocked_inputs_pad_with_zeros(rng):
    dep_rows, dep_cols, const_rows, norm_rows, col_terms = _weights(rng, 5, 4, 2, 10, 30, False)
    rows, cols, const, norm, terms = _blocked_inputs(dep_rows, dep_cols, const_rows, norm_rows, col_terms, 30)
    assert rows.shape == (8, 6, 10) and cols.shape == (6, 30 + _LANES) and const.shape == (6, 10)
    assert norm.shape == (3, 10) and terms.shape == (6, 30 + _LANES)
    for padded, orig in ((rows, dep_rows), (cols, dep_cols), (const, const_rows), (norm, norm_rows),
                         (terms, col_terms)):
        assert padded.dtype == orig.dtype and padded.flags.c_contiguous
        inner = tuple(slice(0, n) for n in orig.shape)
        np.testing.assert_array_equal(padded[inner], orig)
        rest = padded.copy()
        rest[inner] = 0
        assert not rest.any()  # zeros elsewhere
    # a rect ending before the arrays do keeps every column
    assert _pad_to(np.ones((2, 50)), (3, 40)).shape == (3, 50)


# ---------------------------------------------------------------------------------------------- full call


def _case(rng, n_r, n_a, ny, nx, k=9, level=500.0):
    h = k // 2
    ext = level + rng.normal(size=(ny + 2 * h, nx + 2 * h))
    basis = rng.normal(size=(n_r, k, k))
    rows = rng.normal(size=(n_r + 1, n_a, ny))
    rows[n_r] = np.tensordot(basis.sum(axis=(1, 2)), rows[:n_r], axes=1)  # the constant goes through the sum
    col = np.vstack([np.ones(nx), np.linspace(-1, 1, nx) ** np.arange(1, n_a)[:, None]])
    norm = np.zeros((n_a, ny))
    norm[0] = 2.0
    want = sum(np.einsum("ay,ax->yx", rows[r], col) * correlate_direct(ext, basis[r]) for r in range(n_r)) / 2.0
    return ext, basis, rows, col, norm, want


@pytest.mark.parametrize("n_r, n_a", [(1, 1), (3, 2), (5, 4), (8, 3)])
@pytest.mark.parametrize("power", [1, 2])
def test_blocked_path_against_direct_and_generic(rng, n_r, n_a, power):
    """The default path (ducc0, float32: blocked combine) against direct correlation and the generic
    combine (scipy backend), with tiles ending at the block's edges and inside ``rect``s."""
    ext, basis, rows, col, norm, want = _case(rng, n_r, n_a, 70, 131)
    want = want / 2.0 ** (power - 1)
    tol = 2e-6 * np.abs(want).max()
    for tile in (None, 23, 64):
        got = correlate_lowrank(ext, basis, rows, col, norm, power, tile=tile, dtype=np.float32)
        generic = correlate_lowrank(ext, basis, rows, col, norm, power, tile=tile, dtype=np.float32, backend="scipy")
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        np.testing.assert_allclose(got, generic, rtol=0, atol=tol)
    out = np.full(want.shape, -3.0, np.float32)
    for rect in ((0, 33, 0, 70), (0, 33, 70, 131), (33, 70, 0, 131)):
        correlate_lowrank(ext, basis, rows, col, norm, power, tile=29, dtype=np.float32, rect=rect, out=out)
    np.testing.assert_allclose(out, want, rtol=0, atol=tol)


def test_blocked_path_on_halo_with_missing_pieces(rng):
    ext, basis, rows, col, norm, want = _case(rng, 5, 3, 60, 90)
    h = basis.shape[1] // 2
    halo = _halo_of(ext, (h, ext.shape[0] - h), (h, ext.shape[1] - h), missing={(2, 0), (2, 1), (2, 2)})
    got = correlate_lowrank(halo, basis, rows, col, norm, 1, tile=25, dtype=np.float32,
                            valid=(0, ext.shape[0] - h, 0, ext.shape[1]))
    keep = np.s_[: want.shape[0] - h]  # outputs that do not reach the missing bottom strip
    np.testing.assert_allclose(got[keep], want[keep], rtol=0, atol=2e-6 * np.abs(want).max())


def test_reused_work_arrays_carry_nothing_between_calls(rng):
    """A call that left non-finite values in this thread's work arrays does not change the next one."""
    ext, basis, rows, col, norm, _ = _case(rng, 3, 2, 40, 50)
    fresh = correlate_lowrank(ext, basis, rows, col, norm, 1, tile=16, dtype=np.float32)
    bad = ext.copy()
    bad[:, -9:] = np.inf  # a caller breaking the finite-input contract: its own output is garbage
    correlate_lowrank(bad, basis, rows, col, norm, 1, tile=16, dtype=np.float32)
    np.testing.assert_array_equal(correlate_lowrank(ext, basis, rows, col, norm, 1, tile=16, dtype=np.float32), fresh)


# ---------------------------------------------------------------------------------------------- caches


def test_cached_spectra_equal_fresh_and_reused(rng, monkeypatch):
    monkeypatch.setattr(kc, "_SPECTRA_CACHE", {})
    kernels = rng.normal(size=(3, 9, 9))
    first = _cached_spectra(kernels, 40, 48, np.float32)
    np.testing.assert_array_equal(first, kernel_spectra(kernels, 40, 48, np.float32))
    assert not first.flags.writeable
    assert _cached_spectra(kernels.copy(), 40, 48, np.float32) is first  # equal values: the same spectra
    assert _cached_spectra(kernels, 40, 50, np.float32) is not first  # another transform shape
    other = kernels.copy()
    other[1, 4, 4] += 1e-12
    assert _cached_spectra(other, 40, 48, np.float32) is not first  # other images
    for n in range(kc._SPECTRA_CACHE_SIZE + 3):
        _cached_spectra(rng.normal(size=(1, 3, 3)), 8, 8, np.float64)
    assert len(kc._SPECTRA_CACHE) == kc._SPECTRA_CACHE_SIZE


def test_clear_caches_forgets_the_spectra(rng, monkeypatch):
    monkeypatch.setattr(kc, "_SPECTRA_CACHE", {})
    kernels = rng.normal(size=(2, 5, 5))
    first = _cached_spectra(kernels, 16, 20, np.float32)
    kc.clear_caches()
    assert len(kc._SPECTRA_CACHE) == 0
    again = _cached_spectra(kernels, 16, 20, np.float32)
    assert again is not first
    np.testing.assert_array_equal(again, first)


def test_scratch_per_name_shape_and_thread(monkeypatch):
    monkeypatch.setattr(kc, "_SCRATCH", threading.local())
    a = _scratch("tile", (4, 5), np.float32)
    assert a.shape == (4, 5) and a.dtype == np.float32 and not a.any()
    a[:] = 1.0
    assert _scratch("tile", (4, 5), np.float32) is a  # the same work array, contents kept
    assert _scratch("tile", (4, 6), np.float32) is not a
    assert _scratch("tile", (4, 5), np.float64) is not a
    assert _scratch("product", (4, 5), np.float32) is not a
    seen = []
    t = threading.Thread(target=lambda: seen.append(_scratch("tile", (4, 5), np.float32)))
    t.start()
    t.join()
    assert seen[0] is not a and not seen[0].any()  # each thread has its own
    for n in range(kc._SCRATCH_SIZE + 2):
        _scratch("many", (n + 1,), np.float32)
    assert len(kc._SCRATCH.arrays) == kc._SCRATCH_SIZE


def test_new_output_zero_outside_a_partial_rect(rng):
    """Without ``out``: a rect covering the output writes every pixel; a partial one leaves zeros."""
    ext, basis, rows, col, norm, want = _case(rng, 3, 2, 40, 50)
    whole = correlate_lowrank(ext, basis, rows, col, norm, 1, tile=16, dtype=np.float32, rect=(0, 40, 0, 50))
    np.testing.assert_allclose(whole, want, rtol=0, atol=2e-6 * np.abs(want).max())
    for _ in range(3):  # freed and re-allocated blocks: garbage would show outside the rect
        part = correlate_lowrank(ext, basis, rows, col, norm, 1, tile=16, dtype=np.float32, rect=(5, 30, 7, 41))
        inside = np.zeros(want.shape, bool)
        inside[5:30, 7:41] = True
        assert (part[~inside] == 0).all()
        np.testing.assert_allclose(part[inside], want[inside], rtol=0, atol=2e-6 * np.abs(want).max())
