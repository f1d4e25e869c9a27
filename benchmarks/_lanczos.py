"""A tight Lanczos-3 resampling loop (image, variance, mask) as the machine's yardstick.

Affine destination -> source mapping, separable Lanczos-3 weights normalised by their sum,
variance with squared weights, mask OR over the 2x2 bilinear footprint; pixels whose taps leave
the source are NaN / +inf / 1. Two trigonometric calls per axis and pixel (angle addition for the
``sin(pi t / 3)`` factor, sign flips for ``sin(pi t)``): about the least work a Lanczos-3 warp can do.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_C = np.array([math.cos(k * math.pi / 3.0) for k in range(-2, 4)])
_S = np.array([math.sin(k * math.pi / 3.0) for k in range(-2, 4)])


@numba.njit(cache=True, fastmath=False)
def _weights(f, out, cs, ss):
    s1 = math.sin(math.pi * f)
    sa = math.sin(math.pi * f / 3.0)
    ca = math.cos(math.pi * f / 3.0)
    total = 0.0
    for m in range(6):
        k = m - 2
        t = f - k
        if abs(t) < 1e-12:
            w = 1.0
        else:
            sign = 1.0 if (k % 2 == 0) else -1.0
            w = 3.0 * (s1 * sign) * (sa * cs[m] - ca * ss[m]) / (math.pi * math.pi * t * t)
        out[m] = w
        total += w
    for m in range(6):
        out[m] /= total


@numba.njit(cache=True)
def lanczos3_warp(image, variance, mask, affine, out_shape, cs, ss):
    """Warp with ``x_src = a0 + a1 x + a2 y``, ``y_src = a3 + a4 x + a5 y``."""
    ny, nx = out_shape
    sy, sx = image.shape
    out_i = np.empty((ny, nx), np.float32)
    out_v = np.empty((ny, nx), np.float32)
    out_m = np.empty((ny, nx), np.uint32)
    wx = np.empty(6)
    wy = np.empty(6)
    for j in range(ny):
        for i in range(nx):
            xs = affine[0] + affine[1] * i + affine[2] * j
            ys = affine[3] + affine[4] * i + affine[5] * j
            ix = int(math.floor(xs))
            iy = int(math.floor(ys))
            if ix < 2 or iy < 2 or ix + 3 >= sx or iy + 3 >= sy:
                out_i[j, i] = np.nan
                out_v[j, i] = np.inf
                out_m[j, i] = 1
                continue
            _weights(xs - ix, wx, cs, ss)
            _weights(ys - iy, wy, cs, ss)
            acc = 0.0
            accv = 0.0
            for b in range(6):
                row = iy - 2 + b
                ai = 0.0
                av = 0.0
                for a in range(6):
                    col = ix - 2 + a
                    ai += wx[a] * image[row, col]
                    av += wx[a] * wx[a] * variance[row, col]
                acc += wy[b] * ai
                accv += wy[b] * wy[b] * av
            out_i[j, i] = acc
            out_v[j, i] = accv
            out_m[j, i] = mask[iy, ix] | mask[iy, ix + 1] | mask[iy + 1, ix] | mask[iy + 1, ix + 1]
    return out_i, out_v, out_m


def rotation_affine(shape: tuple[int, int], angle_deg: float, shift: tuple[float, float]) -> np.ndarray:
    """Rotation about the image centre plus a sub-pixel shift, destination -> source."""
    ny, nx = shape
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    a1, a2, a4, a5 = c, -s, s, c
    a0 = cx - a1 * cx - a2 * cy + shift[0]
    a3 = cy - a4 * cx - a5 * cy + shift[1]
    return np.array([a0, a1, a2, a3, a4, a5])


def run(image, variance, mask, affine):
    return lanczos3_warp(image, variance, mask, affine, image.shape, _C, _S)
