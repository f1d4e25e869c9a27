"""Inner loops of spatially varying convolution (numpy, scipy.fft and numba only).

Convention (afw, reference ``statistics_and_masks.md`` §5): a correlation with the kernel image as
stored, ``out(x, y) = sum_{u,v} K(v, u) in(y + v - h, x + u - h)``, on an input extended by the
kernel radius ``h`` on every side (``ext`` has shape ``(ny + 2h, nx + 2h)`` for an ``ny x nx``
output).
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.fft as sfft

__all__ = ["correlate_varying", "or_dilate", "correlate_direct"]


def correlate_varying(
    ext: np.ndarray, kernels: np.ndarray, wy: np.ndarray, wx: np.ndarray, *, tile: int = 256, rtol: float = 1e-10
) -> np.ndarray:
    """``sum_t wy[t, :, None] * wx[t, None, :] * (kernels[t] correlated with ext)`` on the valid region.

    ``ext`` must be finite (float64). When the kernels span at most half as many independent
    images (singular values above ``rtol`` times the largest), they are replaced by that span: a
    spatially constant kernel model then needs a single transform. The correlations then run as FFTs on overlapping tiles of at most
    ``tile x tile`` output pixels: one forward transform per tile shared by all components and one
    inverse transform per independent component, so the cost per pixel does not grow with the
    kernel size.
    """
    n_t, k, k2 = kernels.shape
    if k != k2 or k % 2 == 0:
        raise ValueError(f"kernels must be square and odd, got {k}x{k2}")
    h = k // 2
    ny, nx = ext.shape[0] - 2 * h, ext.shape[1] - 2 * h
    out = np.zeros((ny, nx), dtype=np.float64)
    if ny <= 0 or nx <= 0:
        return out
    u, sv, vt = np.linalg.svd(kernels.reshape(n_t, -1), full_matrices=False)
    keep = sv > rtol * sv[0] if sv[0] > 0 else np.zeros(sv.shape, bool)
    if not keep.any():
        return out
    if 2 * keep.sum() <= n_t:  # mixing costs n_t multiply-adds per component and pixel: only when it pays
        comps = vt[keep].reshape(-1, k, k)
        mix = np.ascontiguousarray(u[:, keep] * sv[keep])
    else:
        comps, mix = kernels, np.empty((0, 0))
    wy = np.ascontiguousarray(wy, dtype=np.float64)
    wx = np.ascontiguousarray(wx, dtype=np.float64)
    ty, tx = min(tile, ny), min(tile, nx)
    fy = sfft.next_fast_len(ty + 2 * h, real=True)
    fx = sfft.next_fast_len(tx + 2 * h, real=True)
    padded = np.zeros((comps.shape[0], fy, fx), dtype=np.float64)
    padded[:, :k, :k] = comps[:, ::-1, ::-1]
    kf = sfft.rfft2(padded, axes=(-2, -1))
    buf = np.zeros((fy, fx), dtype=np.float64)
    for y0 in range(0, ny, ty):
        y1 = min(y0 + ty, ny)
        for x0 in range(0, nx, tx):
            x1 = min(x0 + tx, nx)
            buf[...] = 0.0
            buf[: y1 - y0 + 2 * h, : x1 - x0 + 2 * h] = ext[y0 : y1 + 2 * h, x0 : x1 + 2 * h]
            spec = sfft.rfft2(buf)
            conv = sfft.irfft2(kf * spec[None], s=(fy, fx), axes=(-2, -1))
            _combine(out, conv, mix, wy, wx, y0, y1, x0, x1, 2 * h)
    return out


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
    ny, nx = ext.shape[0] - 2 * h, ext.shape[1] - 2 * h
    rows = np.zeros((ext.shape[0], nx), dtype=ext.dtype)
    for i in range(ext.shape[0]):
        for j in range(nx):
            acc = ext.dtype.type(0)
            for u in range(2 * h + 1):
                acc |= ext[i, j + u]
            rows[i, j] = acc
    out = np.zeros((ny, nx), dtype=ext.dtype)
    for i in range(ny):
        for v in range(2 * h + 1):
            for j in range(nx):
                out[i, j] |= rows[i + v, j]
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
