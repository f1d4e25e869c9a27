"""Inner loops of the binned background model: per-cell statistics, 1-D interpolants, 2-D evaluation.

Pure numpy/numba; imports neither xarray nor dask.

Every interpolant is stored as piecewise cubics ``y_i + b_i t + c_i t**2 + d_i t**3`` with
``t = x - x_i`` on ``[x_i, x_{i+1}]``. Outside the knots the value is extrapolated quadratically
from the end knot with the interpolant's own first and second derivative there.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._kernels_stats import _unit_moments, clip_width, make_hist_scratch, quartiles_hist

__all__ = [
    "STYLE_CONSTANT",
    "STYLE_LINEAR",
    "STYLE_SPLINE",
    "STYLE_AKIMA",
    "MIN_POINTS",
    "max_style_for",
    "interp_coeffs",
    "interp_eval",
    "interp_line",
    "eval_grid",
    "eval_grid_into",
    "chebyshev_terms",
    "chebyshev_design",
    "chebyshev_eval",
    "chebyshev_eval_into",
    "CELL_STAT_MEAN",
    "CELL_STAT_MEDIAN",
    "CELL_STAT_MEANCLIP",
    "cell_table",
]

STYLE_CONSTANT = 0
STYLE_LINEAR = 1
STYLE_SPLINE = 2  # natural cubic spline
STYLE_AKIMA = 3

#: minimum number of knots per style code
MIN_POINTS = (1, 2, 3, 5)


@numba.njit(cache=True)
def max_style_for(n):
    """Largest style code usable with ``n`` knots (-1 when ``n`` is 0)."""
    if n <= 0:
        return -1
    if n == 1:
        return STYLE_CONSTANT
    if n == 2:
        return STYLE_LINEAR
    if n <= 4:
        return STYLE_SPLINE
    return STYLE_AKIMA


@numba.njit(cache=True)
def _akima(x, y, b, c, d):
    n = x.size
    m = np.empty(n + 3)  # m[k + 2] holds the slope of interval k, k = -2 .. n
    for i in range(n - 1):
        m[i + 2] = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
    m[0] = 3.0 * m[2] - 2.0 * m[3]
    m[1] = 2.0 * m[2] - m[3]
    m[n + 1] = 2.0 * m[n] - m[n - 1]
    m[n + 2] = 3.0 * m[n] - 2.0 * m[n - 1]
    for i in range(n - 1):
        k = i + 2
        ne = abs(m[k + 1] - m[k]) + abs(m[k - 1] - m[k - 2])
        if ne == 0.0:
            b[i] = m[k]
            c[i] = 0.0
            d[i] = 0.0
            continue
        h = x[i + 1] - x[i]
        ne_next = abs(m[k + 2] - m[k + 1]) + abs(m[k] - m[k - 1])
        alpha = abs(m[k - 1] - m[k - 2]) / ne
        if ne_next == 0.0:
            t_next = m[k]
        else:
            alpha_next = abs(m[k] - m[k - 1]) / ne_next
            t_next = (1.0 - alpha_next) * m[k] + alpha_next * m[k + 1]
        b[i] = (1.0 - alpha) * m[k - 1] + alpha * m[k]
        c[i] = (3.0 * m[k] - 2.0 * b[i] - t_next) / h
        d[i] = (b[i] + t_next - 2.0 * m[k]) / (h * h)


@numba.njit(cache=True)
def _natural_spline(x, y, b, c, d):
    n = x.size
    # second-derivative halves s[i] (= c_i), natural ends s[0] = s[n-1] = 0
    s = np.zeros(n)
    nsys = n - 2
    if nsys > 0:
        diag = np.empty(nsys)
        off = np.empty(nsys)
        rhs = np.empty(nsys)
        for i in range(nsys):
            h0 = x[i + 1] - x[i]
            h1 = x[i + 2] - x[i + 1]
            diag[i] = 2.0 * (h0 + h1)
            off[i] = h1
            rhs[i] = 3.0 * ((y[i + 2] - y[i + 1]) / h1 - (y[i + 1] - y[i]) / h0)
        # Thomas algorithm on the symmetric tridiagonal system
        for i in range(1, nsys):
            w = off[i - 1] / diag[i - 1]
            diag[i] -= w * off[i - 1]
            rhs[i] -= w * rhs[i - 1]
        s[nsys] = rhs[nsys - 1] / diag[nsys - 1]
        for i in range(nsys - 2, -1, -1):
            s[i + 1] = (rhs[i] - off[i] * s[i + 2]) / diag[i]
    for i in range(n - 1):
        h = x[i + 1] - x[i]
        c[i] = s[i]
        b[i] = (y[i + 1] - y[i]) / h - h * (s[i + 1] + 2.0 * s[i]) / 3.0
        d[i] = (s[i + 1] - s[i]) / (3.0 * h)


@numba.njit(cache=True)
def interp_coeffs(x, y, style):
    """Piecewise-cubic coefficients ``(b, c, d)`` (length ``n - 1``, at least 1) of a 1-D interpolant."""
    n = x.size
    k = max(n - 1, 1)
    b = np.zeros(k)
    c = np.zeros(k)
    d = np.zeros(k)
    if n < 2 or style == STYLE_CONSTANT:
        return b, c, d
    if style == STYLE_LINEAR:
        for i in range(n - 1):
            b[i] = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
    elif style == STYLE_SPLINE:
        _natural_spline(x, y, b, c, d)
    else:
        _akima(x, y, b, c, d)
    return b, c, d


@numba.njit(cache=True)
def _eval_constant(x, y, q):
    # steps at the mid-points between knots; step values are averages of neighbouring knots,
    # the outermost steps take the end knot values
    n = x.size
    if n == 1 or q < x[0]:
        return y[0]
    if q >= x[n - 1] + 0.5:
        return y[n - 1]
    j = 0
    # find the largest break point <= q among x[0], mid(x[i-1], x[i]) (i = 1..n-1), x[n-1] + 0.5
    for i in range(1, n):
        if q >= 0.5 * (x[i - 1] + x[i]):
            j = i
        else:
            break
    if j == 0:
        return y[0]
    return 0.5 * (y[j - 1] + y[j])


@numba.njit(cache=True)
def interp_eval(x, y, b, c, d, style, q, out):
    """Evaluate the interpolant at the points ``q`` into ``out`` (quadratic extrapolation outside)."""
    n = x.size
    for k in range(q.size):
        t = q[k]
        if style == STYLE_CONSTANT:
            out[k] = _eval_constant(x, y, t)
            continue
        if t < x[0]:
            dt = t - x[0]
            out[k] = y[0] + dt * b[0] + dt * dt * c[0]  # 0.5 * dt**2 * (2 c_0)
            continue
        if t > x[n - 1]:
            h = x[n - 1] - x[n - 2]
            i = n - 2
            d1 = b[i] + 2.0 * c[i] * h + 3.0 * d[i] * h * h
            d2 = 2.0 * c[i] + 6.0 * d[i] * h
            dt = t - x[n - 1]
            out[k] = y[n - 1] + dt * d1 + 0.5 * dt * dt * d2
            continue
        i = np.searchsorted(x, t, side="right") - 1
        if i > n - 2:
            i = n - 2
        dt = t - x[i]
        out[k] = y[i] + dt * (b[i] + dt * (c[i] + dt * d[i]))


@numba.njit(cache=True)
def interp_line(knots, values, style, reduce, q, out):
    """Interpolate one line through its finite values; returns 0 on success, the count on failure."""
    m = 0
    for i in range(values.size):
        if np.isfinite(values[i]):
            m += 1
    if m == 0:
        out[:] = np.nan
        return 0
    xk = np.empty(m)
    vk = np.empty(m)
    j = 0
    for i in range(values.size):
        if np.isfinite(values[i]):
            xk[j] = knots[i]
            vk[j] = values[i]
            j += 1
    s = style
    if m < MIN_POINTS[s]:
        if not reduce:
            return m
        s = max_style_for(m)
    b, c, d = interp_coeffs(xk, vk, s)
    interp_eval(xk, vk, b, c, d, s, q, out)
    return 0


@numba.njit(cache=True)
def _locate(x, q, case, idx, dt):
    """Where each query point falls for :func:`interp_eval`: case 0 left of the knots, 1 right of
    them, 2 inside interval ``idx``; ``dt`` is the offset from the knot the polynomial starts at."""
    n = x.size
    for k in range(q.size):
        t = q[k]
        if t < x[0]:
            case[k] = 0
            idx[k] = 0
            dt[k] = t - x[0]
        elif t > x[n - 1]:
            case[k] = 1
            idx[k] = n - 2
            dt[k] = t - x[n - 1]
        else:
            i = np.searchsorted(x, t, side="right") - 1
            if i > n - 2:
                i = n - 2
            case[k] = 2
            idx[k] = i
            dt[k] = t - x[i]


@numba.njit(cache=True)
def _eval_located(x, y, b, c, d, case, idx, dt, out):
    """:func:`interp_eval` (non-constant styles) at points already placed by :func:`_locate`."""
    n = x.size
    h = x[n - 1] - x[n - 2]
    i = n - 2
    d1 = b[i] + 2.0 * c[i] * h + 3.0 * d[i] * h * h
    d2 = 2.0 * c[i] + 6.0 * d[i] * h
    for k in range(case.size):
        t = dt[k]
        if case[k] == 2:
            j = idx[k]
            out[k] = y[j] + t * (b[j] + t * (c[j] + t * d[j]))
        elif case[k] == 0:
            out[k] = y[0] + t * b[0] + t * t * c[0]
        else:
            out[k] = y[n - 1] + t * d1 + 0.5 * t * t * d2


@numba.njit(cache=True)
def eval_grid_into(xc, yc, grid, style, reduce, qy, qx, out):
    """:func:`eval_grid` writing into ``out`` (shape ``(len(qy), len(qx))``, any float dtype).

    Returns the status of :func:`eval_grid`. Rows whose column-interpolated values are all finite
    share one placement of the query columns among the knots (same arithmetic as
    :func:`interp_line`, without a search per pixel).
    """
    ny, nx = grid.shape
    h = qy.size
    w = qx.size
    cols = np.empty((h, nx))
    col = np.empty(h)
    for i in range(nx):
        status = interp_line(yc, grid[:, i].copy(), style, reduce, qy, col)
        if status:
            return status
        cols[:, i] = col
    row = np.empty(w)
    shared = style != STYLE_CONSTANT and nx >= MIN_POINTS[style] and nx >= 2
    case = np.empty(w, dtype=np.int8)
    idx = np.empty(w, dtype=np.int64)
    dt = np.empty(w)
    if shared:
        _locate(xc, qx, case, idx, dt)
    for r in range(h):
        line = cols[r]
        finite = True
        for i in range(nx):
            if not np.isfinite(line[i]):
                finite = False
                break
        if shared and finite:
            yv = line.copy()
            b, c, d = interp_coeffs(xc, yv, style)
            _eval_located(xc, yv, b, c, d, case, idx, dt, row)
        else:
            status = interp_line(xc, line.copy(), style, reduce, qx, row)
            if status:
                return status
        for k in range(w):
            out[r, k] = row[k]
    return 0


@numba.njit(cache=True)
def eval_grid(xc, yc, grid, style, reduce, qy, qx):
    """Separable evaluation of a cell grid (columns first) at rows ``qy`` and columns ``qx``.

    Returns ``(image, status)``; ``status`` is 0, or the number of usable knots of the first
    line that had too few for ``style`` when ``reduce`` is false.
    """
    out = np.empty((qy.size, qx.size))
    status = eval_grid_into(xc, yc, grid, style, reduce, qy, qx, out)
    if status:
        return np.empty((0, 0), dtype=np.float64), status
    return out, 0


def chebyshev_terms(order: int) -> list[tuple[int, int]]:
    """``(power of x, power of y)`` of the triangular Chebyshev set: by total degree, then x power down."""
    return [(n - j, j) for n in range(order + 1) for j in range(n + 1)]


def _cheb_1d(u: np.ndarray, order: int) -> np.ndarray:
    t = np.empty((order + 1,) + u.shape)
    t[0] = 1.0
    if order >= 1:
        t[1] = u
    for k in range(2, order + 1):
        t[k] = 2.0 * u * t[k - 1] - t[k - 2]
    return t


def _scaled(v: np.ndarray, size: int) -> np.ndarray:
    # box -0.5 .. size - 0.5 mapped onto [-1, 1]
    lo, hi = -0.5, size - 0.5
    return 2.0 * (np.asarray(v, dtype=np.float64) - 0.5 * (lo + hi)) / (hi - lo)


def chebyshev_design(x: np.ndarray, y: np.ndarray, order: int, width: int, height: int) -> np.ndarray:
    """Design matrix ``(npoints, nterms)`` of the triangular Chebyshev set at points ``(x, y)``."""
    tx = _cheb_1d(_scaled(x, width), order)
    ty = _cheb_1d(_scaled(y, height), order)
    return np.stack([tx[a] * ty[b] for a, b in chebyshev_terms(order)], axis=-1)


def chebyshev_eval(coeffs: np.ndarray, order: int, qx: np.ndarray, qy: np.ndarray, width: int, height: int) -> np.ndarray:
    """The polynomial on the outer grid ``qy x qx`` (rows, columns)."""
    tx = _cheb_1d(_scaled(qx, width), order)
    ty = _cheb_1d(_scaled(qy, height), order)
    cm = np.zeros((order + 1, order + 1))
    for coef, (a, b) in zip(coeffs, chebyshev_terms(order)):
        cm[b, a] = coef
    return ty.T @ cm @ tx


@numba.njit(cache=True, nogil=True)
def _scaled_one(v, size):
    # the arithmetic of _scaled for one point
    lo = -0.5
    hi = np.float64(size) - 0.5
    return 2.0 * (np.float64(v) - 0.5 * (lo + hi)) / (hi - lo)


@numba.njit(cache=True, nogil=True)
def _cheb_rows(u, order):
    """``T_0 .. T_order`` at the points ``u`` (already scaled to [-1, 1]), shape ``(order + 1, len(u))``."""
    t = np.empty((order + 1, u.size))
    for k in range(u.size):
        t[0, k] = 1.0
        if order >= 1:
            t[1, k] = u[k]
        for a in range(2, order + 1):
            t[a, k] = 2.0 * u[k] * t[a - 1, k] - t[a - 2, k]
    return t


@numba.njit(cache=True, nogil=True)
def chebyshev_eval_into(coeffs, order, qx, qy, width, height, out):
    """:func:`chebyshev_eval` written into ``out`` (shape ``(len(qy), len(qx))``, float32 or float64).

    Separable: per output row the ``order + 1`` coefficients of the x polynomial are formed from
    the y terms, then the row is summed over the x terms in a float64 line buffer and written once.
    Equal to :func:`chebyshev_eval` up to the order of the float64 sums (a few ulps before the
    cast to ``out``'s dtype).
    """
    m = order + 1
    cm = np.zeros((m, m))  # cm[b, a]: coefficient of T_a(x) T_b(y)
    k = 0
    for n in range(order + 1):
        for j in range(n + 1):
            cm[j, n - j] = coeffs[k]
            k += 1
    ux = np.empty(qx.size)
    for i in range(qx.size):
        ux[i] = _scaled_one(qx[i], width)
    uy = np.empty(qy.size)
    for i in range(qy.size):
        uy[i] = _scaled_one(qy[i], height)
    tx = _cheb_rows(ux, order)
    ty = _cheb_rows(uy, order)
    w = qx.size
    line = np.empty(w)
    ra = np.empty(m)
    for r in range(qy.size):
        for a in range(m):
            s = 0.0
            for b in range(m - a):
                s += cm[b, a] * ty[b, r]
            ra[a] = s
        r0 = ra[0]
        for i in range(w):
            line[i] = r0 * tx[0, i]
        for a in range(1, m):
            ca = ra[a]
            for i in range(w):
                line[i] += ca * tx[a, i]
        for i in range(w):
            out[r, i] = line[i]


# ------------------------------------------------------------------------------------------------
# per-cell statistics (statistics_and_masks.md sections 1.2, 1.4, 1.5, 1.7, 1.8 for unit weights)

CELL_STAT_MEAN = 0
CELL_STAT_MEDIAN = 1
CELL_STAT_MEANCLIP = 2

@numba.njit(cache=True, nogil=True)
def _sqrt_or_nan(v):
    return math.sqrt(v) if v >= 0.0 else np.nan


@numba.njit(cache=True, nogil=True)
def _one_cell(a, n, stat, num_sigma, num_iter, sample, hist, bins, slots, cand, q, out, i, j):
    """Cell row ``(value, error, npoint, stdev, varclip)`` of the ``n`` gathered samples ``a[:n]``."""
    _cnt, mean, var, errvar, _s = _unit_moments(a, n, 0.0, np.inf)
    value = np.nan
    error = np.nan
    varclip = np.nan
    if n > 0:
        if stat == CELL_STAT_MEAN:
            value = mean
            error = _sqrt_or_nan(errvar)
        else:
            q[0], q[1], q[2] = quartiles_hist(a, n, sample, hist, bins, slots, cand)
            if stat == CELL_STAT_MEDIAN:
                value = q[1]
                error = _sqrt_or_nan(0.5 * math.pi * var / np.float64(n))
            else:
                iqr = q[2] - q[0]
                cmean = np.nan
                cvar = np.nan
                cerr = np.nan
                ok = True
                for p in range(num_iter):
                    centre = q[1] if p == 0 else cmean
                    width = clip_width(p, n, iqr, cvar, num_sigma, centre)
                    if math.isnan(centre) or math.isnan(width):
                        ok = False
                        break
                    _k, cmean, cvar, cerr, _s = _unit_moments(a, n, centre, width)
                if ok:
                    value = cmean
                    error = _sqrt_or_nan(cerr)
                    varclip = cvar
    out[0, i, j] = value
    out[1, i, j] = error
    out[2, i, j] = n
    out[3, i, j] = _sqrt_or_nan(var)
    out[4, i, j] = varclip


@numba.njit(cache=True, nogil=True)
def _gather(image, mask, r0, r1, c0, c1, andm, buf):
    """Copy the good pixels of ``image[r0:r1, c0:c1]`` (row-major) into ``buf``; returns their count.

    A row without an excluded pixel is found by a vectorised scan and copied as a block.
    """
    n = 0
    w = c1 - c0
    for r in range(r0, r1):
        xr = image[r, c0:c1]
        mr = mask[r, c0:c1]
        bad = np.uint32(0)
        finite = True
        for c in range(w):
            bad |= np.uint32(mr[c]) & andm
            finite &= (xr[c] - xr[c]) == 0.0
        if bad == 0 and finite:
            for c in range(w):
                buf[n + c] = xr[c]
            n += w
        else:
            for c in range(w):
                x = xr[c]
                good = ((np.uint32(mr[c]) & andm) == 0) & math.isfinite(x)
                buf[n] = x
                n += np.int64(good)
    return n


@numba.njit(cache=True, nogil=True)
def cell_table(image, mask, yedges, xedges, and_mask, stat, num_sigma, num_iter, out):
    """Fill ``out`` (float64, ``(5, len(yedges) - 1, len(xedges) - 1)``) with the cell table.

    Cell ``(i, j)`` holds ``image[yedges[i]:yedges[i+1], xedges[j]:xedges[j+1]]``; its samples
    are the finite pixels whose ``mask`` has no bit of ``and_mask``. Rows of ``out``: the
    statistic ``stat`` (a ``CELL_STAT_*`` code) and its standard error, NPOINT, STDEV and the
    clipped variance (NaN unless MEANCLIP). A cell without samples gets NaN statistic and error.
    The good pixels of one cell are gathered into a compact buffer once; the moments, quartiles
    and clip passes then run over that buffer.
    """
    ncy = yedges.shape[0] - 1
    ncx = xedges.shape[0] - 1
    size = 1
    for i in range(ncy):
        for j in range(ncx):
            size = max(size, (yedges[i + 1] - yedges[i]) * (xedges[j + 1] - xedges[j]))
    buf = np.empty(size, dtype=image.dtype)
    sample, hist, bins, slots, cand = make_hist_scratch(size, image.dtype)
    q = np.empty(3)
    andm = np.uint32(and_mask)
    for i in range(ncy):
        for j in range(ncx):
            n = _gather(image, mask, yedges[i], yedges[i + 1], xedges[j], xedges[j + 1], andm, buf)
            _one_cell(buf, n, stat, num_sigma, num_iter, sample, hist, bins, slots, cand, q, out, i, j)
