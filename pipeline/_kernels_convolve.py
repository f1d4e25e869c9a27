"""Inner loops of spatially varying convolution (numpy, scipy.fft and numba only).

Convention (afw, reference ``statistics_and_masks.md`` §5): a correlation with the kernel image as
stored, ``out(x, y) = sum_{u,v} K(v, u) in(y + v - h, x + u - h)``, on an input extended by the
kernel radius ``h`` on every side (``ext`` has shape ``(ny + 2h, nx + 2h)`` for an ``ny x nx``
output).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import scipy.fft as sfft

__all__ = ["correlate_varying", "correlate_lowrank", "or_dilate", "correlate_direct"]


def _smooth_length(n: int) -> int:
    """Smallest ``m >= n`` of the form ``2^a 3^b 5^c`` (lengths with larger factors transform slower)."""
    m = max(int(n), 1)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _tiles(n: int, tile: int, h: int) -> tuple[int, int]:
    """Tile length (at most ``tile``, spread evenly over ``n``) and its 5-smooth padded FFT length."""
    count = -(-n // max(min(tile, n), 1))
    t = -(-n // count)
    return t, _smooth_length(t + 2 * h)


def correlate_varying(
    ext: np.ndarray,
    kernels: np.ndarray,
    wy: np.ndarray,
    wx: np.ndarray,
    *,
    tile: int = 220,
    rtol: float = 1e-10,
    single_ratio: float = 0.0,
) -> np.ndarray:
    """``sum_t wy[t, :, None] * wx[t, None, :] * (kernels[t] correlated with ext)`` on the valid region.

    ``ext`` must be finite (any float dtype; the transforms run in float64). The correlations run as FFTs on overlapping tiles of at most
    ``tile x tile`` output pixels (sizes spread evenly and padded to fast FFT lengths), one forward
    transform per tile shared by all components and one inverse transform per component, so the
    cost per pixel does not grow with the kernel size. Two reductions keep it cheap and exact:

    - when the kernels span at most half as many independent images (singular values above
      ``rtol`` times the largest), they are replaced by that span: a spatially constant kernel
      model then needs a single transform;
    - otherwise, when the kernels are one dominant image ``D`` plus small departures
      (``K_t = alpha_t D + R_t`` with ``||R|| <= single_ratio * ||K||``, Frobenius norms over all
      components), ``D`` is correlated in float64 and the departures ``R_t`` in float32, whose
      rounding (about ``1e-7`` of their share, itself at most ``single_ratio`` of the total for
      ``|w| <= 1``) stays below the float32 rounding of the output. ``single_ratio=0`` keeps
      everything in float64.
    """
    n_t, k, k2 = kernels.shape
    if k != k2 or k % 2 == 0:
        raise ValueError(f"kernels must be square and odd, got {k}x{k2}")
    h = k // 2
    ny, nx = ext.shape[0] - 2 * h, ext.shape[1] - 2 * h
    out = np.zeros((ny, nx), dtype=np.float64)
    if ny <= 0 or nx <= 0:
        return out
    flat = kernels.reshape(n_t, -1).astype(np.float64)
    u, sv, vt = np.linalg.svd(flat, full_matrices=False)
    keep = sv > rtol * sv[0] if sv[0] > 0 else np.zeros(sv.shape, bool)
    if not keep.any():
        return out
    wy = np.ascontiguousarray(wy, dtype=np.float64)
    wx = np.ascontiguousarray(wx, dtype=np.float64)
    empty = np.empty((0, 0))
    parts = []  # (kernel images, mixing matrix or empty, FFT dtype)
    residual = math.sqrt(float((sv[1:] ** 2).sum()))
    total = math.sqrt(float((sv**2).sum()))
    if 2 * keep.sum() <= n_t:  # mixing costs n_t multiply-adds per component and pixel: only when it pays
        parts.append((vt[keep].reshape(-1, k, k), np.ascontiguousarray(u[:, keep] * sv[keep]), np.float64))
    elif residual <= single_ratio * total:
        alpha = u[:, 0] * sv[0]
        dominant = vt[0]
        parts.append((dominant.reshape(1, k, k), np.ascontiguousarray(alpha[:, None]), np.float64))
        parts.append(((flat - alpha[:, None] * dominant[None, :]).reshape(n_t, k, k), empty, np.float32))
    else:
        parts.append((flat.reshape(n_t, k, k), empty, np.float64))
    ty, fy = _tiles(ny, tile, h)
    tx, fx = _tiles(nx, tile, h)
    spectra = []
    for comps, mix, dtype in parts:
        padded = np.zeros((comps.shape[0], fy, fx), dtype=dtype)
        padded[:, :k, :k] = comps[:, ::-1, ::-1]
        spectra.append(sfft.rfft2(padded, axes=(-2, -1), workers=1))
    dtypes = {p[2] for p in parts}
    bufs = {dt: np.zeros((fy, fx), dtype=dt) for dt in dtypes}
    prods = [np.empty(kf.shape[1:], dtype=kf.dtype) for kf in spectra]
    convs = [np.empty((p[0].shape[0], fy, fx), dtype=p[2]) for p in parts]
    for y0 in range(0, ny, ty):
        y1 = min(y0 + ty, ny)
        for x0 in range(0, nx, tx):
            x1 = min(x0 + tx, nx)
            window = ext[y0 : y1 + 2 * h, x0 : x1 + 2 * h]
            tile_spec = {}
            for dt, buf in bufs.items():
                # what lies past a short edge window never reaches a valid output (no wrap-around)
                buf[: window.shape[0], : window.shape[1]] = window
                tile_spec[dt] = sfft.rfft2(buf, workers=1)
            for (comps, mix, dtype), kf, prod, conv in zip(parts, spectra, prods, convs):
                spec = tile_spec[dtype]
                if mix.size:
                    for r in range(comps.shape[0]):
                        np.multiply(kf[r], spec, out=prod)
                        conv[r] = sfft.irfft2(prod, s=(fy, fx), workers=1, overwrite_x=True)
                    _combine(out, conv, mix, wy, wx, y0, y1, x0, x1, 2 * h)
                else:
                    for r in range(comps.shape[0]):
                        np.multiply(kf[r], spec, out=prod)
                        one = sfft.irfft2(prod, s=(fy, fx), workers=1, overwrite_x=True)
                        _accumulate(out, one, wy[r], wx[r], y0, y1, x0, x1, 2 * h)
    return out


@numba.njit(cache=True, nogil=True)
def _accumulate(out, conv, wy, wx, y0, y1, x0, x1, off):
    """``out[y, x] += wy[y] wx[x] conv[off + y - y0, off + x - x0]`` over the tile."""
    for i in range(y0, y1):
        ci = off + i - y0
        w = wy[i]
        for j in range(x0, x1):
            out[i, j] += w * wx[j] * conv[ci, off + j - x0]


@numba.njit(cache=True, nogil=True)
def _combine(out, conv, mix, wy, wx, y0, y1, x0, x1, off):
    """``out[y, x] += sum_r conv[r] * g_r(y, x)`` with ``g_r = sum_t mix[t, r] wy[t, y] wx[t, x]``
    (``mix`` empty: ``g_r = wy[r, y] wx[r, x]``)."""
    n_r = conv.shape[0]
    n_t = wy.shape[0]
    mixed = mix.shape[0] > 0
    b = np.empty((n_t, n_r))
    for i in range(y0, y1):
        ci = off + i - y0
        if mixed:
            for t in range(n_t):
                for r in range(n_r):
                    b[t, r] = mix[t, r] * wy[t, i]
        for j in range(x0, x1):
            cj = off + j - x0
            acc = 0.0
            for r in range(n_r):
                if mixed:
                    g = 0.0
                    for t in range(n_t):
                        g += b[t, r] * wx[t, j]
                else:
                    g = wy[r, i] * wx[r, j]
                acc += g * conv[r, ci, cj]
            out[i, j] += acc


def correlate_lowrank(
    ext: np.ndarray,
    basis: np.ndarray,
    row_weights: np.ndarray,
    col_terms: np.ndarray,
    norm_rows: np.ndarray,
    power: int,
    *,
    tile: int = 256,
    dtype=np.float32,
) -> np.ndarray:
    """Spatially varying correlation through a few fixed kernel images, in float32 transforms.

    ``out = (sum_r W_r (basis[r] correlated with (ext - c)) + c W_R) / N**power`` on the valid
    region, where ``c`` is the mean of each FFT tile's input window, the weights are separable
    polynomials ``W_r(y, x) = sum_a row_weights[r, a, y] col_terms[a, x]`` (``R + 1`` of them: one
    per basis image and a last one, the exact kernel sum, that carries the constant ``c``) and
    ``N(y, x) = sum_a norm_rows[a, y] col_terms[a, x]``.

    The transforms run in ``dtype`` (float32: single precision, about twice as fast as float64).
    Subtracting ``c`` before them keeps their rounding relative to the departures from the tile
    mean rather than to the sky level; ``c`` itself goes through the exact kernel sum, so a
    constant input comes back to float32 rounding. One forward transform per tile and one inverse
    transform per basis image; the output is float32.
    """
    n_r, k, k2 = basis.shape
    if k != k2 or k % 2 == 0:
        raise ValueError(f"kernels must be square and odd, got {k}x{k2}")
    h = k // 2
    ny, nx = ext.shape[0] - 2 * h, ext.shape[1] - 2 * h
    out = np.zeros((max(ny, 0), max(nx, 0)), dtype=np.float32)
    if ny <= 0 or nx <= 0:
        return out
    ty, fy = _tiles(ny, tile, h)
    tx, fx = _tiles(nx, tile, h)
    padded = np.zeros((n_r, fy, fx), dtype=dtype)
    padded[:, :k, :k] = basis[:, ::-1, ::-1]
    spectra = sfft.rfft2(padded, axes=(-2, -1), workers=1)
    buf = np.zeros((fy, fx), dtype=dtype)
    prod = np.empty(spectra.shape[1:], dtype=spectra.dtype)
    conv = np.empty((n_r, fy, fx), dtype=dtype)
    row_weights = np.ascontiguousarray(row_weights, dtype=np.float64)
    col_terms = np.ascontiguousarray(col_terms, dtype=np.float64)
    norm_rows = np.ascontiguousarray(norm_rows, dtype=np.float64)
    for y0 in range(0, ny, ty):
        y1 = min(y0 + ty, ny)
        for x0 in range(0, nx, tx):
            x1 = min(x0 + tx, nx)
            window = ext[y0 : y1 + 2 * h, x0 : x1 + 2 * h]
            c = _window_mean(window)
            # what lies past a short edge window never reaches a valid output (no wrap-around)
            _shifted_copy(buf, window, c)
            spec = sfft.rfft2(buf, workers=1)
            for r in range(n_r):
                np.multiply(spectra[r], spec, out=prod)
                conv[r] = sfft.irfft2(prod, s=(fy, fx), workers=1, overwrite_x=True)
            _combine_lowrank(out, conv, c, row_weights, col_terms, norm_rows, power, y0, y1, x0, x1, 2 * h)
    return out


@numba.njit(cache=True, nogil=True)
def _window_mean(window):
    acc = 0.0
    for i in range(window.shape[0]):
        for j in range(window.shape[1]):
            acc += window[i, j]
    return acc / (window.shape[0] * window.shape[1])


@numba.njit(cache=True, nogil=True)
def _shifted_copy(buf, window, c):
    for i in range(window.shape[0]):
        for j in range(window.shape[1]):
            buf[i, j] = window[i, j] - c


@numba.njit(cache=True, nogil=True, fastmath=True)
def _combine_lowrank(out, conv, c, row_weights, col_terms, norm_rows, power, y0, y1, x0, x1, off):
    """``out[y, x] = (sum_r W_r conv[r] + c W_R) / N**power`` over the tile (see ``correlate_lowrank``)."""
    n_r = conv.shape[0]
    n_a = col_terms.shape[0]
    nx = x1 - x0
    w = np.empty(nx)
    acc = np.empty(nx)
    for i in range(y0, y1):
        ci = off + i - y0
        for r in range(n_r + 1):
            w[:] = 0.0
            for a in range(n_a):
                ca = row_weights[r, a, i]
                cta = col_terms[a, x0:x1]
                for j in range(nx):
                    w[j] += ca * cta[j]
            if r == n_r:
                for j in range(nx):
                    acc[j] += c * w[j]
            else:
                cr = conv[r, ci, off:off + nx]
                if r == 0:
                    for j in range(nx):
                        acc[j] = w[j] * cr[j]
                else:
                    for j in range(nx):
                        acc[j] += w[j] * cr[j]
        w[:] = 0.0
        for a in range(n_a):
            ca = norm_rows[a, i]
            cta = col_terms[a, x0:x1]
            for j in range(nx):
                w[j] += ca * cta[j]
        o = out[i, x0:x1]
        if power == 2:
            for j in range(nx):
                o[j] = acc[j] / (w[j] * w[j])
        else:
            for j in range(nx):
                o[j] = acc[j] / w[j]


def correlate_direct(ext: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Plain direct correlation of ``ext`` with one kernel on the valid region (a test oracle)."""
    k = kernel.shape[0]
    h = k // 2
    ny, nx = ext.shape[0] - 2 * h, ext.shape[1] - 2 * h
    out = np.zeros((ny, nx), dtype=np.float64)
    for v in range(k):
        for u in range(k):
            out += kernel[v, u] * ext[v : v + ny, u : u + nx]
    return out


@numba.njit(cache=True, nogil=True)
def _or_box(ext, h):
    """Separable OR over a full ``(2h+1)²`` box: along x per row, then along y (both contiguous in x)."""
    ny, nx = ext.shape[0] - 2 * h, ext.shape[1] - 2 * h
    rows = np.empty((ext.shape[0], nx), dtype=ext.dtype)
    for i in range(ext.shape[0]):
        acc = rows[i]
        src = ext[i]
        acc[:] = src[:nx]
        for u in range(1, 2 * h + 1):
            part = src[u:u + nx]
            for j in range(nx):
                acc[j] |= part[j]
    out = np.empty((ny, nx), dtype=ext.dtype)
    for i in range(ny):
        acc = out[i]
        acc[:] = rows[i]
        for v in range(1, 2 * h + 1):
            part = rows[i + v]
            for j in range(nx):
                acc[j] |= part[j]
    return out


@numba.njit(cache=True, nogil=True)
def _or_footprint(ext, offsets_v, offsets_u, h):
    ny, nx = ext.shape[0] - 2 * h, ext.shape[1] - 2 * h
    out = np.zeros((ny, nx), dtype=ext.dtype)
    for n in range(offsets_v.size):
        v, u = offsets_v[n], offsets_u[n]
        for i in range(ny):
            for j in range(nx):
                out[i, j] |= ext[i + v, j + u]
    return out


def or_dilate(ext: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Bitwise OR of ``ext`` over the non-zero taps of ``footprint`` (odd, square), valid region.

    Integer or boolean arrays; a full footprint takes a separable path.
    """
    k = footprint.shape[0]
    h = k // 2
    is_bool = ext.dtype == np.bool_
    arr = ext.view(np.uint8) if is_bool else ext
    arr = np.ascontiguousarray(arr)
    if np.all(footprint):
        out = _or_box(arr, h)
    else:
        vv, uu = np.nonzero(footprint)
        out = _or_footprint(arr, vv.astype(np.int64), uu.astype(np.int64), h)
    return out.view(np.bool_) if is_bool else out
