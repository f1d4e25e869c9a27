"""numba inner loops of the Lanczos/bilinear warp (no xarray, no dask here).

Conventions shared by every function:

* The destination -> source pixel mapping is known exactly on a lattice of nodes spaced ``step``
  destination pixels apart; node ``[k, l]`` sits at destination pixel ``(gx0 + l*step, gy0 + k*step)``
  and holds the source position ``(nodes_x[k, l], nodes_y[k, l])``. Between nodes the position is
  interpolated bilinearly; outside the lattice it is undefined (the pixel is a pad pixel).
* Positions closer than ``SNAP`` pixels to an integer are snapped to it, so that integer shifts are
  reproduced bit for bit (the rounding noise of the WCS round trip would otherwise leak neighbours
  in through taps of weight ~1e-12).
* A kernel of "order" ``n`` has taps at integer offsets ``-(n-1) .. n`` from ``floor(position)``;
  Lanczos-n uses order ``n``, bilinear order 1. Taps are not pre-normalised.
* A destination pixel is good when its ``floor`` position lies inside the source box shrunk by the
  image-kernel border (``n-1`` on the low side, ``n`` on the high side).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._simd import tap_sums_2, tap_sums_6, tap_sums_8, tap_sums_10

SNAP = 1e-8

_NOGIL = dict(nogil=True, cache=True)


@numba.njit(**_NOGIL)
def _lerp(a, b, rem, f):
    if rem == 0:
        return a
    return (1.0 - f) * a + f * b


@numba.njit(**_NOGIL)
def _snap(x):
    r = math.floor(x + 0.5)
    if abs(x - r) < SNAP:
        return r
    return x


@numba.njit(**_NOGIL)
def _at(nodes, ly, ly1, ry, fy, lx, lx1, rx, fx):
    return _lerp(_lerp(nodes[ly, lx], nodes[ly, lx1], rx, fx), _lerp(nodes[ly1, lx], nodes[ly1, lx1], rx, fx), ry, fy)


@numba.njit(**_NOGIL)
def _interp(gx0, gy0, step, nodes_x, nodes_y, X, Y):
    """Bilinearly interpolated source position of destination pixel (X, Y); NaN off the lattice.

    Integer arithmetic locates the lattice cell, so a sub-lattice (a slice of the nodes) gives
    bit-identical positions to the full lattice; :func:`_row` computes the same numbers.
    """
    nky, nkx = nodes_x.shape
    dx = X - gx0
    dy = Y - gy0
    if dx < 0 or dy < 0:
        return np.nan, np.nan
    lx = dx // step
    ly = dy // step
    rx = dx - lx * step
    ry = dy - ly * step
    if lx > nkx - 1 or ly > nky - 1 or (lx == nkx - 1 and rx > 0) or (ly == nky - 1 and ry > 0):
        return np.nan, np.nan
    lx1 = lx + 1 if rx > 0 else lx
    ly1 = ly + 1 if ry > 0 else ly
    fx = rx / step
    fy = ry / step
    x = _at(nodes_x, ly, ly1, ry, fy, lx, lx1, rx, fx)
    y = _at(nodes_y, ly, ly1, ry, fy, lx, lx1, rx, fx)
    return _snap(x), _snap(y)


@numba.njit(**_NOGIL)
def _row(gx0, gy0, step, nodes_x, nodes_y, X0, Y, out_x, out_y):
    """Positions of destination pixels ``X0 .. X0 + len(out_x) - 1`` of row ``Y`` (as :func:`_interp`)."""
    nky, nkx = nodes_x.shape
    n = out_x.size
    dy = Y - gy0
    ok_row = dy >= 0
    ly = 0
    ry = 0
    if ok_row:
        ly = dy // step
        ry = dy - ly * step
        if ly > nky - 1 or (ly == nky - 1 and ry > 0):
            ok_row = False
    if not ok_row:
        for c in range(n):
            out_x[c] = np.nan
            out_y[c] = np.nan
        return
    ly1 = ly + 1 if ry > 0 else ly
    fy = ry / step
    dx = X0 - gx0
    lx = 0
    rx = 0
    if dx >= 0:
        lx = dx // step
        rx = dx - lx * step
    for c in range(n):
        if dx < 0 or lx > nkx - 1 or (lx == nkx - 1 and rx > 0):
            out_x[c] = np.nan
            out_y[c] = np.nan
        else:
            lx1 = lx + 1 if rx > 0 else lx
            fx = rx / step
            out_x[c] = _snap(_at(nodes_x, ly, ly1, ry, fy, lx, lx1, rx, fx))
            out_y[c] = _snap(_at(nodes_y, ly, ly1, ry, fy, lx, lx1, rx, fx))
        dx += 1
        if dx == 0:
            lx = 0
            rx = 0
        elif dx > 0:
            rx += 1
            if rx == step:
                rx = 0
                lx += 1


@numba.njit(**_NOGIL)
def interp_positions(gx0, gy0, step, nodes_x, nodes_y, X, Y, out_x, out_y):
    """Source positions of destination pixels ``(X[k], Y[k])`` (NaN off the lattice)."""
    for k in range(X.size):
        out_x[k], out_y[k] = _interp(gx0, gy0, step, nodes_x, nodes_y, X[k], Y[k])


@numba.njit(**_NOGIL)
def trig_tables(order):
    """``-(-1)^j cos(pi j / n)`` and ``-(-1)^j sin(pi j / n)`` for the taps ``j = -(n-1) .. n`` of Lanczos-n."""
    cb = np.empty(2 * order)
    sb = np.empty(2 * order)
    for k in range(2 * order):
        j = k - (order - 1)
        sign = -1.0 if j % 2 == 0 else 1.0
        b = math.pi * j / order
        cb[k] = sign * math.cos(b)
        sb[k] = sign * math.sin(b)
    return cb, sb


@numba.njit(**_NOGIL)
def kernel_weights(f, order, bilinear, linear, cb, sb, out):
    """Fill ``out[:2*order]`` with the 1-D weights for fractional offset ``f`` in [0, 1); return their sum.

    Lanczos-n: ``L(j - f)`` for ``j = -(n-1) .. n`` with ``L(t) = sinc(pi t) sinc(pi t / n)``, evaluated
    exactly (no tabulation; ``cb``/``sb`` from :func:`trig_tables`); at ``f == 0`` the weights are
    the exact delta. Bilinear: ``(1-f, f)``.

    ``linear``: move ``m1 = sum w (j-f)`` of weight from the tap at offset 1 to the tap at offset 0.
    The sum is unchanged and the first moment becomes zero, so linear functions (and the centroids
    of smooth sources) are reproduced exactly; plain Lanczos-3 shifts them by up to 0.02 px. The
    correction vanishes at ``f = 0``, ``1/2`` and ``f -> 1`` and is continuous in between.
    """
    if bilinear:
        out[0] = 1.0 - f
        out[1] = f
        return 1.0
    n = order
    if f == 0.0:
        for k in range(2 * n):
            out[k] = 0.0
        out[n - 1] = 1.0
        return 1.0
    # sin(pi (j - f)) = -(-1)^j sin(pi f) (the sign is folded into the tables);
    # sin(pi (j - f) / n) by angle addition from sin/cos(-pi f / n) and the tables
    c0 = n * math.sin(math.pi * f) / (math.pi * math.pi)
    a = -math.pi * f / n
    sa = math.sin(a)
    ca = math.cos(a)
    total = 0.0
    for k in range(2 * n):
        t = k - (n - 1) - f
        w = c0 * (sa * cb[k] + ca * sb[k]) / (t * t)
        out[k] = w
        total += w
    if linear:
        m1 = 0.0
        for k in range(2 * n):
            m1 += out[k] * (k - (n - 1) - f)
        out[n - 1] += m1
        out[n] -= m1
    return total


@numba.njit(**_NOGIL)
def kernel_table(order, linear, size):
    """Lanczos-n weights tabulated at ``f = k / size``, ``k = 0 .. size`` (row ``size``: ``f -> 1``)."""
    n = order
    cb, sb = trig_tables(n)
    table = np.zeros((size + 1, 2 * n))
    for k in range(size):
        kernel_weights(k / size, n, False, linear, cb, sb, table[k])
    table[size, n] = 1.0
    return table


@numba.njit(**_NOGIL)
def table_weights(f, table, out):
    """Weights at ``f`` linearly interpolated in ``table`` (exact delta at ``f == 0``); returns their sum."""
    size = table.shape[0] - 1
    m = table.shape[1]
    total = 0.0
    if f == 0.0:
        for a in range(m):
            out[a] = table[0, a]
            total += out[a]
        return total
    u = f * size
    k = min(int(u), size - 1)
    r = u - k
    for a in range(m):
        w = table[k, a] + r * (table[k + 1, a] - table[k, a])
        out[a] = w
        total += w
    return total


@numba.njit(**_NOGIL)
def cell_states(nodes_x, nodes_y, valid):
    """Classify the lattice cells: ``0`` no good pixel, ``1`` only good pixels, ``2`` undecided.

    Cell ``[k, l]`` holds the destination pixels between node rows ``k, k+1`` and node columns
    ``l, l+1`` (the last row and column of cells are clipped to the lattice). Every position
    interpolated in a cell lies within the bounds of its four nodes up to rounding; with the bounds
    widened by :data:`_CELL_MARGIN`, a cell whose ``floor`` range lies outside ``valid`` on either
    axis holds no good pixel and one whose range lies inside on both axes only good pixels. Cells
    with a non-finite node are undecided. Also returns those widened ``floor`` bounds
    ``(x_lo, x_hi, y_lo, y_hi)`` of every cell with finite nodes.
    """
    nky, nkx = nodes_x.shape
    ix_lo, iy_lo, ix_hi, iy_hi = valid
    out = np.empty((nky, nkx), np.uint8)
    bounds = np.zeros((nky, nkx, 4))
    for k in range(nky):
        k1 = min(k + 1, nky - 1)
        for l in range(nkx):
            l1 = min(l + 1, nkx - 1)
            x00 = nodes_x[k, l]
            x01 = nodes_x[k, l1]
            x10 = nodes_x[k1, l]
            x11 = nodes_x[k1, l1]
            y00 = nodes_y[k, l]
            y01 = nodes_y[k, l1]
            y10 = nodes_y[k1, l]
            y11 = nodes_y[k1, l1]
            if not (math.isfinite(x00) and math.isfinite(x01) and math.isfinite(x10) and math.isfinite(x11)
                    and math.isfinite(y00) and math.isfinite(y01) and math.isfinite(y10) and math.isfinite(y11)):
                out[k, l] = 2
                continue
            xa = math.floor(min(min(x00, x01), min(x10, x11)) - _CELL_MARGIN)
            xb = math.floor(max(max(x00, x01), max(x10, x11)) + _CELL_MARGIN)
            ya = math.floor(min(min(y00, y01), min(y10, y11)) - _CELL_MARGIN)
            yb = math.floor(max(max(y00, y01), max(y10, y11)) + _CELL_MARGIN)
            bounds[k, l, 0] = xa
            bounds[k, l, 1] = xb
            bounds[k, l, 2] = ya
            bounds[k, l, 3] = yb
            if xb < ix_lo or xa > ix_hi or yb < iy_lo or ya > iy_hi:
                out[k, l] = 0
            elif xa >= ix_lo and xb <= ix_hi and ya >= iy_lo and yb <= iy_hi:
                out[k, l] = 1
            else:
                out[k, l] = 2
    return out, bounds


@numba.njit(inline="always", **_NOGIL)
def _cell_position(nodes_x, nodes_y, ly, ly1, ry, fy, gy, lx, rx, step):
    """Position of the pixel ``rx`` columns right of node column ``lx`` in a row ``ry`` rows below node
    row ``ly``: the arithmetic of :func:`_row_span` for one pixel (bit-identical, no fused multiply-add)."""
    if rx == 0:
        return (_snap(_lerp(nodes_x[ly, lx], nodes_x[ly1, lx], ry, fy)),
                _snap(_lerp(nodes_y[ly, lx], nodes_y[ly1, lx], ry, fy)))
    fx = rx / step
    gxx = 1.0 - fx
    tx = gxx * nodes_x[ly, lx] + fx * nodes_x[ly, lx + 1]
    ty = gxx * nodes_y[ly, lx] + fx * nodes_y[ly, lx + 1]
    if ry > 0:
        tx = gy * tx + fy * (gxx * nodes_x[ly1, lx] + fx * nodes_x[ly1, lx + 1])
        ty = gy * ty + fy * (gxx * nodes_y[ly1, lx] + fx * nodes_y[ly1, lx + 1])
    rtx = math.floor(tx + 0.5)
    rty = math.floor(ty + 0.5)
    return (rtx if abs(tx - rtx) < SNAP else tx), (rty if abs(ty - rty) < SNAP else ty)


@numba.njit(**_NOGIL)
def count_blocks(
    nodes_x, nodes_y, gx0, gy0, step, y_edges, x_edges, valid, out_count, out_range, out_dst
):
    """Per destination block: number of good pixels and the range of their source ``floor`` positions.

    ``valid = (ix_lo, iy_lo, ix_hi, iy_hi)`` inclusive limits of good ``floor`` positions. A good
    pixel also needs its left and lower neighbours on the lattice (for the relative area).
    ``out_range[by, bx] = (imin, jmin, imax, jmax)``; ``out_dst = (Xmin, Ymin, Xmax, Ymax)`` of all
    good destination pixels. Blocks are given by their edges in destination pixels.

    A row is walked lattice cell by lattice cell (:func:`cell_states`): a cell without good pixels
    is skipped; one holding only good pixels: its pixels of the row are counted at once, and
    since the position is linear along a row within a cell (and snapping and ``floor`` are monotone)
    the ``floor`` range of the segment is that of its two end pixels, whose positions :func:`_row_span`
    gives bit for bit. The pixels of the other cells are decided one by one. The rows between two
    node rows share their cells, so the cells are classified once per such band: whole cells are
    counted for all its rows at once, and only the cells that may widen the floor range and the
    undecided ones are visited row by row. The result equals a pixel-by-pixel count.
    """
    nky, nkx = nodes_x.shape
    lat_x1 = gx0 + (nkx - 1) * step
    lat_y1 = gy0 + (nky - 1) * step
    ix_lo, iy_lo, ix_hi, iy_hi = valid
    big = 1 << 60
    out_dst[0] = big
    out_dst[1] = big
    out_dst[2] = -big
    out_dst[3] = -big
    bufx = np.empty(max(1, lat_x1 - gx0 + 1))
    bufy = np.empty(max(1, lat_x1 - gx0 + 1))
    states, bounds = cell_states(nodes_x, nodes_y, valid)
    # cells of the current band (rows between two node rows) that are looked at row by row:
    # kind 0 = pixel by pixel, kind 1 = whole segment whose floor range may widen the block's range
    row_cells = np.empty(nkx, np.int64)
    row_kind = np.empty(nkx, np.uint8)
    for by in range(y_edges.size - 1):
        Y0 = max(y_edges[by], gy0 + 1)
        Y1 = min(y_edges[by + 1], lat_y1 + 1)
        for bx in range(x_edges.size - 1):
            X0 = max(x_edges[bx], gx0 + 1)
            X1 = min(x_edges[bx + 1], lat_x1 + 1)
            cnt = 0
            imin = big
            jmin = big
            imax = -big
            jmax = -big
            w = X1 - X0
            l_first = (X0 - gx0) // step
            l_last = min(nkx - 1, (X1 - 1 - gx0) // step)
            Y = Y0 if w > 0 else Y1
            while Y < Y1:
                ly = (Y - gy0) // step
                Yb1 = min(Y1, gy0 + (ly + 1) * step)
                # the cells are the same for every row of the band: those holding only good pixels are
                # counted for all its rows at once
                band_cnt = 0
                bcmin = w
                bcmax = -1
                n_row = 0
                for l in range(l_first, l_last + 1):
                    c = max(0, gx0 + l * step - X0)
                    e = min(w, gx0 + (l + 1) * step - X0) if l < nkx - 1 else min(w, gx0 + l * step + 1 - X0)
                    if c >= e:
                        continue
                    state = states[ly, l]
                    if state == 0:
                        continue
                    if state == 1 and e - c > 2:
                        band_cnt += e - c
                        bcmin = min(bcmin, c)
                        bcmax = max(bcmax, e - 1)
                        # the exact floor range of the segment can only widen the block's range found so
                        # far when the cell's bounds reach beyond it
                        if (bounds[ly, l, 0] >= imin and bounds[ly, l, 1] <= imax and bounds[ly, l, 2] >= jmin
                                and bounds[ly, l, 3] <= jmax):
                            continue
                        row_kind[n_row] = 1
                    else:
                        row_kind[n_row] = 0
                    row_cells[n_row] = l
                    n_row += 1
                for Yr in range(Y, Yb1):
                    dy = Yr - gy0
                    ry = dy - ly * step
                    ly1 = ly + 1 if ry > 0 else ly
                    fy = ry / step
                    gy = 1.0 - fy
                    row_cnt = band_cnt
                    fimin = np.inf
                    fimax = -np.inf
                    fjmin = np.inf
                    fjmax = -np.inf
                    cmin = bcmin
                    cmax = bcmax
                    for t in range(n_row):
                        l = row_cells[t]
                        c = max(0, gx0 + l * step - X0)
                        e = min(w, gx0 + (l + 1) * step - X0) if l < nkx - 1 else min(w, gx0 + l * step + 1 - X0)
                        if row_kind[t] == 1:
                            if (bounds[ly, l, 0] >= min(imin, fimin) and bounds[ly, l, 1] <= max(imax, fimax)
                                    and bounds[ly, l, 2] >= min(jmin, fjmin) and bounds[ly, l, 3] <= max(jmax, fjmax)):
                                continue
                            # position is linear along the row within the cell: the segment's floor range is
                            # that of its two end pixels
                            rx0 = X0 + c - gx0 - l * step
                            xa, ya = _cell_position(nodes_x, nodes_y, ly, ly1, ry, fy, gy, l, rx0, step)
                            xb, yb = _cell_position(nodes_x, nodes_y, ly, ly1, ry, fy, gy, l, rx0 + e - 1 - c, step)
                            fimin = min(fimin, math.floor(min(xa, xb)))
                            fimax = max(fimax, math.floor(max(xa, xb)))
                            fjmin = min(fjmin, math.floor(min(ya, yb)))
                            fjmax = max(fjmax, math.floor(max(ya, yb)))
                            continue
                        _row_span(gx0, gy0, step, nodes_x, nodes_y, X0, Yr, bufx, bufy, c, e)
                        # branch-free reductions over the segment (a NaN position fails every comparison)
                        for k in range(c, e):
                            fi = math.floor(bufx[k])
                            fj = math.floor(bufy[k])
                            ok = (fi >= ix_lo) & (fi <= ix_hi) & (fj >= iy_lo) & (fj <= iy_hi)
                            row_cnt += ok
                            fimin = min(fimin, fi if ok else np.inf)
                            fimax = max(fimax, fi if ok else -np.inf)
                            fjmin = min(fjmin, fj if ok else np.inf)
                            fjmax = max(fjmax, fj if ok else -np.inf)
                            cmin = min(cmin, k if ok else w)
                            cmax = max(cmax, k if ok else -1)
                    if row_cnt == 0:
                        continue
                    cnt += row_cnt
                    if fimin <= fimax:
                        imin = min(imin, int(fimin))
                        imax = max(imax, int(fimax))
                    if fjmin <= fjmax:
                        jmin = min(jmin, int(fjmin))
                        jmax = max(jmax, int(fjmax))
                    out_dst[0] = min(out_dst[0], X0 + cmin)
                    out_dst[1] = min(out_dst[1], Yr)
                    out_dst[2] = max(out_dst[2], X0 + cmax)
                    out_dst[3] = max(out_dst[3], Yr)
                Y = Yb1
            out_count[by, bx] = cnt
            out_range[by, bx, 0] = imin
            out_range[by, bx, 1] = jmin
            out_range[by, bx, 2] = imax
            out_range[by, bx, 3] = jmax


# ------------------------------------------------------------------------------------------
# the block warp

#: fused multiply-add allowed in the weight and tap sums (not in the position code, whose
#: floor decisions must agree with :func:`count_blocks`)
_SUMS = dict(nogil=True, error_model="numpy", fastmath={"contract"})


@numba.njit(inline="always", **_SUMS)
def _sincos(x):
    """``(sin x, cos x)`` for ``|x| <= pi/3``: Taylor polynomials to degree 19 and 20.

    The first omitted terms are below 1e-19, so both agree with the libm functions to a few units
    in the last place; unlike libm calls the polynomials cost a handful of multiply-adds.
    """
    z = x * x
    s = -1.0 / 121645100408832000.0
    s = s * z + 1.0 / 355687428096000.0
    s = s * z - 1.0 / 1307674368000.0
    s = s * z + 1.0 / 6227020800.0
    s = s * z - 1.0 / 39916800.0
    s = s * z + 1.0 / 362880.0
    s = s * z - 1.0 / 5040.0
    s = s * z + 1.0 / 120.0
    s = s * z - 1.0 / 6.0
    s = x + x * z * s
    c = 1.0 / 2432902008176640000.0
    c = c * z - 1.0 / 6402373705728000.0
    c = c * z + 1.0 / 20922789888000.0
    c = c * z - 1.0 / 87178291200.0
    c = c * z + 1.0 / 479001600.0
    c = c * z - 1.0 / 3628800.0
    c = c * z + 1.0 / 40320.0
    c = c * z - 1.0 / 720.0
    c = c * z + 1.0 / 24.0
    c = 1.0 - 0.5 * z + z * z * c
    return s, c


@numba.njit(inline="always", **_SUMS)
def _row_weights(fs, n, bilinear, linear, cb, sb, table, weights, sums):
    """1-D weights of the fractional offsets ``fs`` of a row of pixels: ``weights[c, :2n]``, their sum ``sums[c]``.

    Bilinear: ``(1 - f, f)``. Tabulated Lanczos (``table`` with more than one row): :func:`table_weights`.
    Exact Lanczos: proportional to :func:`kernel_weights`, ``L(j - f) = c0 sin(pi (j - f) / n) / (j - f)^2``
    with ``c0 = n sin(pi f) / pi^2`` common to all taps and left out (the warp only uses ratios of
    weights: it divides by their sum, and the first-moment correction is linear in them), and
    ``sin``/``cos`` of ``pi f / n`` by polynomial: no libm call. ``f == 0``: the exact delta.
    """
    m = 2 * n
    if bilinear:
        for c in range(fs.size):
            weights[c, 0] = 1.0 - fs[c]
            weights[c, 1] = fs[c]
            sums[c] = 1.0
        return
    if table.shape[0] > 1:
        for c in range(fs.size):
            sums[c] = table_weights(fs[c], table, weights[c])
        return
    for c in range(fs.size):
        f = fs[c]
        if f == 0.0:
            for k in range(m):
                weights[c, k] = 0.0
            weights[c, n - 1] = 1.0
            sums[c] = 1.0
            continue
        sa, ca = _sincos(-math.pi * f / n)
        total = 0.0
        for k in range(m):
            t = k - (n - 1) - f
            w = (sa * cb[k] + ca * sb[k]) / (t * t)
            weights[c, k] = w
            total += w
        if linear:
            m1 = 0.0
            for k in range(m):
                m1 += weights[c, k] * (k - (n - 1) - f)
            weights[c, n - 1] += m1
            weights[c, n] -= m1
        sums[c] = total


@numba.njit(inline="always", **_SUMS)
def _span_or(flags, span):
    """``out[k] = OR of flags[k : k + span]`` (clipped at the end)."""
    size = flags.size
    out = np.zeros(size, flags.dtype)
    for k in range(size):
        acc = flags[k]
        for t in range(k + 1, min(k + span, size)):
            acc |= flags[t]
        out[k] = acc
    return out


@numba.njit(inline="always", **_SUMS)
def _window_flags(img, var, msk, nodata, grow_full, span):
    """Per-window lookup tables of where bad pixels and ``grow_full`` bits are.

    Returns ``(bad, has_bad, row_bad, col_bad, has_grow)``: ``bad[r, c]`` is 1 for a bad pixel (image
    or variance not finite, or ``nodata`` set); ``row_bad[r]`` is non-zero when any of rows
    ``r .. r+span-1`` holds a bad pixel (columns likewise); ``has_grow`` says whether any pixel carries
    a ``grow_full`` bit. A kernel footprint whose first row ``r`` and first column ``c`` have
    ``row_bad[r] == 0`` or ``col_bad[c] == 0`` holds no bad pixel. A window without bad pixels
    gets a 1x1 ``bad`` (never read): rows are scanned with branch-free reductions first, and only the
    rows holding a bad pixel are scanned again to mark them.
    """
    ny, nx = img.shape
    rb = np.zeros(ny, np.uint8)
    cb = np.zeros(nx, np.uint8)
    has_bad = False
    has_grow = False
    inf = np.inf
    for r in range(ny):
        row_g = np.uint32(0)
        row_b = np.uint32(0)
        # zero-based row views: no index can be negative, so the reductions are vectorised
        ir = img[r]
        vr = var[r]
        mr = msk[r]
        for c in range(nx):
            m = mr[c]
            row_g |= m & grow_full
            # NaN and infinities both fail abs(v) < inf
            row_b |= (m & nodata) | np.uint32(not (abs(ir[c]) < inf)) | np.uint32(not (abs(vr[c]) < inf))
        if row_g != 0:
            has_grow = True
        if row_b != 0:
            rb[r] = 1
            has_bad = True
    if has_bad:
        bad = np.zeros((ny, nx), np.uint8)
        for r in range(ny):
            if rb[r] == 0:
                continue
            for c in range(nx):
                if (msk[r, c] & nodata) != 0 or not math.isfinite(img[r, c]) or not math.isfinite(var[r, c]):
                    bad[r, c] = 1
                    cb[c] = 1
    else:
        bad = np.zeros((1, 1), np.uint8)
    return bad, has_bad, _span_or(rb, span), _span_or(cb, span), has_grow


@numba.njit(**_NOGIL)
def _row_span(gx0, gy0, step, nodes_x, nodes_y, X0, Y, out_x, out_y, lo, hi):
    """:func:`_row` restricted to ``out[lo:hi]`` (pixels ``X0 + lo .. X0 + hi - 1``), lattice cell by cell.

    Same arithmetic as :func:`_interp` (interpolation along x first, then along y; the exact node value
    where the remainder is zero) and no fused multiply-add, so the positions are bit-identical to
    :func:`_row` and :func:`count_blocks`; the cell bookkeeping is done once per cell, not per pixel.
    """
    nky, nkx = nodes_x.shape
    dy = Y - gy0
    ok_row = dy >= 0
    ly = 0
    ry = 0
    if ok_row:
        ly = dy // step
        ry = dy - ly * step
        if ly > nky - 1 or (ly == nky - 1 and ry > 0):
            ok_row = False
    if not ok_row:
        for c in range(lo, hi):
            out_x[c] = np.nan
            out_y[c] = np.nan
        return
    ly1 = ly + 1 if ry > 0 else ly
    fy = ry / step
    gy = 1.0 - fy
    c = lo
    while c < hi:
        dx = X0 + c - gx0
        if dx < 0:
            out_x[c] = np.nan
            out_y[c] = np.nan
            c += 1
            continue
        lx = dx // step
        rx = dx - lx * step
        if lx > nkx - 1 or (lx == nkx - 1 and rx > 0):
            out_x[c] = np.nan
            out_y[c] = np.nan
            c += 1
            continue
        if rx == 0:
            # on a lattice column: the node values (interpolated along y only)
            out_x[c] = _snap(_lerp(nodes_x[ly, lx], nodes_x[ly1, lx], ry, fy))
            out_y[c] = _snap(_lerp(nodes_y[ly, lx], nodes_y[ly1, lx], ry, fy))
            c += 1
            continue
        # the rest of the cell: rx .. step-1 share the four nodes
        e = min(hi, c + step - rx)
        ax0 = nodes_x[ly, lx]
        bx0 = nodes_x[ly, lx + 1]
        ax1 = nodes_x[ly1, lx]
        bx1 = nodes_x[ly1, lx + 1]
        ay0 = nodes_y[ly, lx]
        by0 = nodes_y[ly, lx + 1]
        ay1 = nodes_y[ly1, lx]
        by1 = nodes_y[ly1, lx + 1]
        for k in range(e - c):
            fx = (rx + k) / step
            gxx = 1.0 - fx
            tx = gxx * ax0 + fx * bx0
            ty = gxx * ay0 + fx * by0
            if ry > 0:
                tx = gy * tx + fy * (gxx * ax1 + fx * bx1)
                ty = gy * ty + fy * (gxx * ay1 + fx * by1)
            rtx = math.floor(tx + 0.5)
            rty = math.floor(ty + 0.5)
            out_x[c + k] = rtx if abs(tx - rtx) < SNAP else tx
            out_y[c + k] = rty if abs(ty - rty) < SNAP else ty
        c = e


# Compiled at import, before any caller: compiled first as the callee of a kernel that allows fused
# multiply-adds (the warp kernel), the cached positions differed from count_blocks' in the last bit.
_row_span.compile("void(int64, int64, int64, float64[:, ::1], float64[:, ::1], int64, int64, float64[::1], float64[::1], "
                  "int64, int64)")


@numba.njit(**_NOGIL)
def _node_row_x(gx0, step, nodes_x, nodes_y, k, X0, out_x, out_y):
    """Node row ``k`` interpolated along x at pixels ``X0 .. X0 + len(out_x) - 1`` (NaN off the lattice).

    ``out[c] = (1 - fx) node[k, l] + fx node[k, l+1]`` with ``fx = rx/step``, or the node value itself
    where ``rx == 0``: the first half of the arithmetic of :func:`_row_span`, shared by the ``step``
    destination rows between two node rows (no fused multiply-add, as :func:`_row_span`).
    """
    nkx = nodes_x.shape[1]
    for c in range(out_x.size):
        dx = X0 + c - gx0
        if dx < 0:
            out_x[c] = np.nan
            out_y[c] = np.nan
            continue
        lx = dx // step
        rx = dx - lx * step
        if lx > nkx - 1 or (lx == nkx - 1 and rx > 0):
            out_x[c] = np.nan
            out_y[c] = np.nan
        elif rx == 0:
            out_x[c] = nodes_x[k, lx]
            out_y[c] = nodes_y[k, lx]
        else:
            fx = rx / step
            gxx = 1.0 - fx
            out_x[c] = gxx * nodes_x[k, lx] + fx * nodes_x[k, lx + 1]
            out_y[c] = gxx * nodes_y[k, lx] + fx * nodes_y[k, lx + 1]


@numba.njit(**_NOGIL)
def _row_from_node_rows(t0x, t0y, t1x, t1y, ry, fy, lo, hi, out_x, out_y):
    """Positions ``out[lo:hi]`` of a destination row ``ry`` rows below node row ``t0`` (``t1`` the next
    node row, both from :func:`_node_row_x`): the second half of :func:`_row_span`, snapped; bit-identical
    to it. A contiguous loop without branches on the data, so it is vectorised."""
    if ry == 0:
        for c in range(lo, hi):
            tx = t0x[c]
            ty = t0y[c]
            rtx = math.floor(tx + 0.5)
            rty = math.floor(ty + 0.5)
            out_x[c] = rtx if abs(tx - rtx) < SNAP else tx
            out_y[c] = rty if abs(ty - rty) < SNAP else ty
        return
    gy = 1.0 - fy
    for c in range(lo, hi):
        tx = gy * t0x[c] + fy * t1x[c]
        ty = gy * t0y[c] + fy * t1y[c]
        rtx = math.floor(tx + 0.5)
        rty = math.floor(ty + 0.5)
        out_x[c] = rtx if abs(tx - rtx) < SNAP else tx
        out_y[c] = rty if abs(ty - rty) < SNAP else ty


# compiled at import, like _row_span, so that no caller's fused multiply-adds reach them
_node_row_x.compile("void(int64, int64, float64[:, ::1], float64[:, ::1], int64, int64, float64[::1], float64[::1])")
_row_from_node_rows.compile("void(float64[::1], float64[::1], float64[::1], float64[::1], int64, float64, int64, int64, "
                            "float64[::1], float64[::1])")


@numba.njit(inline="always", **_NOGIL)
def _node_row_slot(tab_x, tab_y, tab_k, gx0, step, nodes_x, nodes_y, k, X0):
    """Slot of the ring ``tab_*`` (three node rows, by ``k % 3``) holding node row ``k``, filled if needed."""
    slot = k % 3
    if tab_k[slot] != k:
        _node_row_x(gx0, step, nodes_x, nodes_y, k, X0, tab_x[slot], tab_y[slot])
        tab_k[slot] = k
    return slot


@numba.njit(inline="always", **_NOGIL)
def _row_positions(tab_x, tab_y, tab_k, gx0, gy0, step, nodes_x, nodes_y, X0, Y, lo, hi, out_x, out_y):
    """:func:`_row_span` ``(gx0, gy0, step, nodes_x, nodes_y, X0, Y, out_x, out_y, lo, hi)`` from node rows
    interpolated along x once per block (:func:`_node_row_x`, kept in a ring of three), bit for bit."""
    nky = nodes_x.shape[0]
    dy = Y - gy0
    if dy < 0:
        out_x[lo:hi] = np.nan
        out_y[lo:hi] = np.nan
        return
    ly = dy // step
    ry = dy - ly * step
    if ly > nky - 1 or (ly == nky - 1 and ry > 0):
        out_x[lo:hi] = np.nan
        out_y[lo:hi] = np.nan
        return
    s0 = _node_row_slot(tab_x, tab_y, tab_k, gx0, step, nodes_x, nodes_y, ly, X0)
    s1 = s0
    if ry > 0:
        s1 = _node_row_slot(tab_x, tab_y, tab_k, gx0, step, nodes_x, nodes_y, ly + 1, X0)
    _row_from_node_rows(tab_x[s0], tab_y[s0], tab_x[s1], tab_y[s1], ry, ry / step, lo, hi, out_x, out_y)


#: pixels per strip of a row whose weights are computed together (their weights fit in L1)
_STRIP = 128

#: margin (source pixels) added to the node bounds of a lattice cell: covers the rounding of the
#: bilinear interpolation and the snapping of positions to integers
_CELL_MARGIN = 1e-6


@numba.njit(inline="always", **_NOGIL)
def _cell_columns(l, nkx, gx0, step, X0, nx):
    """Columns ``[a, b)`` of a destination row (pixels ``X0 .. X0 + nx - 1``) that lattice cell ``l``
    covers: pixels ``gx0 + l*step .. gx0 + (l+1)*step - 1``, the last cell only its node column."""
    a = max(0, gx0 + l * step - X0)
    b = min(nx, gx0 + (l + 1) * step - X0)
    if l == nkx - 1:
        b = min(nx, gx0 + l * step + 1 - X0)
    return a, b


@numba.njit(**_NOGIL)
def _state_candidates(states, gx0, gy0, step, X0, Y, nx):
    """Columns ``[lo, hi)`` of destination row ``Y`` (pixels ``X0 .. X0 + nx - 1``) spanned by the lattice
    cells that may hold good pixels (class 1 or 2 of :func:`cell_states`); ``(0, 0)`` when none does."""
    nky, nkx = states.shape
    dy = Y - gy0
    if dy < 0:
        return 0, 0
    ly = dy // step
    if ly > nky - 1 or (ly == nky - 1 and dy - ly * step > 0):
        return 0, 0
    l_first = max(0, (X0 - gx0) // step)
    l_last = min(nkx - 1, (X0 + nx - 1 - gx0) // step)
    lo = nx
    hi = 0
    for l in range(l_first, l_last + 1):
        if states[ly, l] == 0:
            continue
        a, b = _cell_columns(l, nkx, gx0, step, X0, nx)
        if a < b:
            lo = min(lo, a)
            hi = max(hi, b)
    if hi <= lo:
        return 0, 0
    return lo, hi


@numba.njit(inline="always", **_SUMS)
def _strip_weights_columns(fs, lo, hi, n, bilinear, linear, cb, sb, table, tmp, sa, ca, tot, wt, sums):
    """:func:`_row_weights` for ``fs[lo:hi]`` (same arithmetic, pixel by pixel), stored column-major.

    Tap ``k`` of pixel ``lo + c`` goes to ``wt[k, c]`` (``wt`` has at least ``hi - lo`` columns), the sum
    to ``sums[lo + c]``. Exact Lanczos weights are computed in loops over the pixels that each touch a
    few contiguous views starting at index 0 (so that no index can be negative and the loops are
    vectorised), with the sine, cosine and sum in the scratch rows ``sa``, ``ca``, ``tot``. ``tmp``
    (``2n``) serves the table.
    """
    m = 2 * n
    L = hi - lo
    if bilinear or table.shape[0] > 1:
        for c in range(L):
            f = fs[lo + c]
            if bilinear:
                wt[0, c] = 1.0 - f
                wt[1, c] = f
                sums[lo + c] = 1.0
            else:
                sums[lo + c] = table_weights(f, table, tmp)
                for k in range(m):
                    wt[k, c] = tmp[k]
        return
    f = fs[lo:hi]
    sa = sa[:L]
    ca = ca[:L]
    tot = tot[:L]
    for c in range(L):
        s_, c_ = _sincos(-math.pi * f[c] / n)
        sa[c] = s_
        ca[c] = c_
    for k in range(m):
        wk = wt[k, :L]
        cbk = cb[k]
        sbk = sb[k]
        for c in range(L):
            t = k - (n - 1) - f[c]
            wk[c] = (sa[c] * cbk + ca[c] * sbk) / (t * t)
    for c in range(L):
        tot[c] = 0.0
    for k in range(m):
        wk = wt[k, :L]
        for c in range(L):
            tot[c] += wk[c]
    if linear:
        m1 = sa  # the sine is no longer needed
        for c in range(L):
            m1[c] = 0.0
        for k in range(m):
            wk = wt[k, :L]
            for c in range(L):
                m1[c] += wk[c] * (k - (n - 1) - f[c])
        w0 = wt[n - 1, :L]
        w1 = wt[n, :L]
        for c in range(L):
            w0[c] += m1[c]
            w1[c] -= m1[c]
    for k in range(m):
        wk = wt[k, :L]
        d = 1.0 if k == n - 1 else 0.0
        for c in range(L):
            wk[c] = d if f[c] == 0.0 else wk[c]
    s_out = sums[lo:hi]
    for c in range(L):
        s_out[c] = 1.0 if f[c] == 0.0 else tot[c]


def _products_source(n):
    """Source of the straight-line per-pixel body of :func:`_strip_weights_products` for Lanczos-``n``.

    One loop over the pixels that reads only ``f`` (the tables are loaded into scalars first, the sine
    and cosine computed in the loop), so that the few runtime alias checks it needs allow it to be
    vectorised.
    """
    m = 2 * n
    ks = range(m)
    lines = [f"def _weights_products_{n}(f, L, cb, sb, linear, wt, sums):"]
    lines += [f"    cb{k} = cb[{k}]" for k in ks]
    lines += [f"    sb{k} = sb[{k}]" for k in ks]
    lines += [f"    o{k} = wt[{k}]" for k in ks]
    lines.append(f"    ang = -math.pi / {n}")
    lines.append("    for c in range(L):")
    lines.append("        fc = f[c]")
    lines.append("        sac, cac = _sincos(fc * ang)")
    lines += [f"        t{k} = {k - (n - 1)}.0 - fc" for k in ks]
    # prefix products p{k} = t0 ... t{k-1} and suffix products q{k} = t{k+1} ... t{m-1}
    lines.append("        p1 = t0")
    lines += [f"        p{k} = p{k - 1} * t{k - 1}" for k in range(2, m)]
    lines.append(f"        q{m - 2} = t{m - 1}")
    lines += [f"        q{k} = q{k + 1} * t{k + 1}" for k in range(m - 3, -1, -1)]
    for k in ks:
        e = f"q{k}" if k == 0 else (f"p{k}" if k == m - 1 else f"(p{k} * q{k})")
        lines.append(f"        e{k} = {e}")
        lines.append(f"        w{k} = (sac * cb{k} + cac * sb{k}) * (e{k} * e{k})")
    lines.append("        tot = " + " + ".join(f"w{k}" for k in ks))
    lines.append("        m1 = " + " + ".join(f"w{k} * t{k}" for k in ks) + " if linear else 0.0")
    lines.append(f"        w{n - 1} += m1")
    lines.append(f"        w{n} -= m1")
    lines.append("        z = fc == 0.0")
    for k in ks:
        d = "1.0" if k == n - 1 else "0.0"
        lines.append(f"        o{k}[c] = {d} if z else w{k}")
    lines.append("        sums[c] = 1.0 if z else tot")
    return "\n".join(lines) + "\n"


def _compile_products(n):
    ns: dict = {"math": math, "_sincos": _sincos}
    exec(compile(_products_source(n), f"<lanczos{n} weights>", "exec"), ns)
    return numba.njit(inline="always", **_SUMS)(ns[f"_weights_products_{n}"])


_weights_products_3 = _compile_products(3)
_weights_products_4 = _compile_products(4)
_weights_products_5 = _compile_products(5)


@numba.njit(inline="always", **_SUMS)
def _strip_weights_products(fs, lo, hi, n, linear, cb, sb, wt, sums):
    """Exact Lanczos-n weights of ``fs[lo:hi]`` without a division, stored as :func:`_strip_weights_columns`.

    With ``t_k = k - (n-1) - f`` the taps are ``L(t_k) = c0 sin(pi t_k / n) / t_k^2``; multiplying
    every tap of a pixel by the same positive factor ``c0^-1 prod_i t_i^2`` gives
    ``N_k e_k^2`` with ``N_k = sin(pi t_k / n)`` (angle addition from the tables) and
    ``e_k = prod_{i != k} t_i`` (prefix times suffix products), so the division by ``t_k^2`` of every
    tap goes away. The warp only uses ratios of the weights of one pixel (it divides by their sum,
    and the first-moment correction is linear in them), so the result is the same up to rounding:
    each weight carries at most about ``2n`` roundings more, a relative error below ``2e-15``
    (``tests/test_warp.py`` checks the normalised taps against :func:`kernel_weights`).
    ``f == 0``: the exact delta.
    """
    L = hi - lo
    f = fs[lo:hi]
    if n == 3:
        _weights_products_3(f, L, cb, sb, linear, wt, sums[lo:hi])
    elif n == 4:
        _weights_products_4(f, L, cb, sb, linear, wt, sums[lo:hi])
    else:
        _weights_products_5(f, L, cb, sb, linear, wt, sums[lo:hi])


@numba.njit(inline="always", **_SUMS)
def _grow_map(msk, grow_full, span):
    """``out[r, c] = 1`` where ``msk[r : r+span, c : c+span]`` holds a ``grow_full`` bit (clipped at the end).

    Running ORs over contiguous rows (along columns, then along rows), so that a kernel footprint
    whose first tap is ``(r, c)`` is known to hold no ``grow_full`` bit from one lookup. Every loop
    runs over zero-based row views with offsets fixed per loop (the last ``span - 1`` columns apart),
    so that they are vectorised.
    """
    ny, nx = msk.shape
    flags = np.empty((ny, nx), np.uint8)
    for r in range(ny):
        mr = msk[r]
        fr = flags[r]
        for c in range(nx):
            fr[c] = np.uint8((mr[c] & grow_full) != 0)
    out = np.empty((ny, nx), np.uint8)
    v = np.empty(nx, np.uint8)
    head = max(0, nx - span + 1)
    for r in range(ny):
        fr = flags[r]
        for c in range(nx):
            v[c] = fr[c]
        for t in range(1, span):
            if r + t < ny:
                ft = flags[r + t]
                for c in range(nx):
                    v[c] |= ft[c]
        orow = out[r]
        for c in range(head):
            orow[c] = v[c]
        for t in range(1, span):
            vt = v[t:]
            for c in range(head):
                orow[c] |= vt[c]
        for c in range(head, nx):
            acc = v[c]
            for t in range(1, span):
                acc |= v[min(c + t, nx - 1)]
            orow[c] = acc
    return out


@numba.njit(inline="always", **_SUMS)
def _grow_map_sparse(msk, grow_full, span):
    """:func:`_grow_map` from the runs of ``grow_full`` pixels along the rows, for masks where they are few.

    Each run ``c0 .. c1`` of row ``r`` marks ``out[r-span+1 .. r, c0-span+1 .. c1]`` (clipped at 0): the
    footprints that contain it. That costs ``span * (run length + span - 1)`` per run instead of about
    ``2 span + 1`` passes over the window, so it is used when ``runs * span^2 <= ny * nx`` (the usual
    EDGE frame of an exposure: a few runs per row); otherwise the dense map is built. Equal to
    :func:`_grow_map` element for element.
    """
    ny, nx = msk.shape
    runs = 0
    for r in range(ny):
        mr = msk[r]
        prev = np.uint8(0)
        for c in range(nx):
            g = np.uint8((mr[c] & grow_full) != 0)
            runs += g & (prev ^ np.uint8(1))
            prev = g
    if runs * span * span > ny * nx:
        return _grow_map(msk, grow_full, span)
    out = np.zeros((ny, nx), np.uint8)
    for r in range(ny):
        mr = msk[r]
        c = 0
        while c < nx:
            if (mr[c] & grow_full) == 0:
                c += 1
                continue
            c0 = c
            while c < nx and (mr[c] & grow_full) != 0:
                c += 1
            a = max(0, c0 - span + 1)
            for rr in range(max(0, r - span + 1), r + 1):
                orow = out[rr]
                for t in range(a, c):
                    orow[t] = 1
    return out


@numba.njit(inline="always", **_SUMS)
def _warp_block(
    src_img, src_var, src_msk, win_x0, win_y0, valid, nodes_x, nodes_y, gx0, gy0, step, dst_x0, dst_y0,
    out_img, out_var, out_msk, n, bilinear, linear, mask_order, grow_full, nodata, scale, table, products, simd,
):
    """Body of :func:`warp_block`, inlined into one compiled function per kernel (``n`` a constant).

    Row by row: the columns that may hold good pixels (:func:`_state_candidates`, from the cell
    classes of the lattice) are the only ones whose positions and weights are computed, the rest are filled with
    no-data at once; weights are computed for the whole row in vectorised loops (column-major, with
    their squares for the variance); a footprint without bad pixels is summed separably straight
    from the (float32 or float64) source rows, with float64 accumulators.
    """
    ny, nx = out_img.shape
    m = 2 * n
    cb, sb = trig_tables(n)
    ix_lo = valid[0]
    iy_lo = valid[1]
    ix_hi = valid[2]
    iy_hi = valid[3]
    nan = np.float32(np.nan)
    inf = np.float32(np.inf)
    bad, has_bad, row_bad, col_bad, has_grow = _window_flags(
        src_img, src_var, src_msk, nodata, grow_full, m
    )
    gmap = _grow_map_sparse(src_msk, grow_full, m) if has_grow else np.zeros((1, 1), np.uint8)
    states, _ = cell_states(nodes_x, nodes_y, valid)
    flat_i = src_img.ravel()
    flat_v = src_var.ravel()
    flat_m = src_msk.ravel()
    width = src_img.shape[1]
    uwidth = np.uint64(width)
    # positions of the current row Y and of row Y-1, for X in [dst_x0-1, dst_x0+nx): index c+1 is column c
    cur_x = np.empty(nx + 1)
    cur_y = np.empty(nx + 1)
    prv_x = np.empty(nx + 1)
    prv_y = np.empty(nx + 1)
    prv_lo = 0
    prv_hi = 0
    prv_row = dst_y0 - 2
    # node rows interpolated along x for the same columns, the last three used (see _row_positions)
    tab_x = np.empty((3, nx + 1))
    tab_y = np.empty((3, nx + 1))
    tab_k = np.full(3, -1, np.int64)
    good = np.zeros(nx, np.bool_)
    ii = np.zeros(nx, np.int64)
    jj = np.zeros(nx, np.int64)
    fxs = np.zeros(nx)
    fys = np.zeros(nx)
    areas = np.zeros(nx)
    # weights of a strip, column-major: tap k of strip pixel q at [k, q]
    wx = np.empty((m, _STRIP))
    wy = np.empty((m, _STRIP))
    wx2 = np.empty((m, _STRIP))
    wy2 = np.empty((m, _STRIP))
    sxs = np.empty(nx)
    sys_ = np.empty(nx)
    tmp = np.empty(m)
    sa = np.empty(_STRIP)
    ca = np.empty(_STRIP)
    tot = np.empty(_STRIP)
    for r in range(ny):
        Y = dst_y0 + r
        lo, hi = _state_candidates(states, gx0, gy0, step, dst_x0, Y, nx)
        for c in range(0, lo):
            out_img[r, c] = nan
            out_var[r, c] = inf
            out_msk[r, c] = nodata
        for c in range(hi, nx):
            out_img[r, c] = nan
            out_var[r, c] = inf
            out_msk[r, c] = nodata
        if hi <= lo:
            continue
        # positions of columns lo-1 .. hi-1 in this row and in the row below (reused when already known)
        _row_positions(tab_x, tab_y, tab_k, gx0, gy0, step, nodes_x, nodes_y, dst_x0 - 1, Y, lo, hi + 1, cur_x, cur_y)
        if not (prv_row == Y - 1 and prv_lo <= lo and prv_hi >= hi + 1):
            _row_positions(tab_x, tab_y, tab_k, gx0, gy0, step, nodes_x, nodes_y, dst_x0 - 1, Y - 1, lo, hi + 1, prv_x,
                           prv_y)
        # branch-free over zero-based views (a NaN or infinite position fails every comparison)
        L = hi - lo
        cx = cur_x[lo : hi + 1]
        cy = cur_y[lo : hi + 1]
        px = prv_x[lo : hi + 1]
        py = prv_y[lo : hi + 1]
        gv = good[lo:hi]
        iv = ii[lo:hi]
        jv = jj[lo:hi]
        fxv = fxs[lo:hi]
        fyv = fys[lo:hi]
        av = areas[lo:hi]
        n_good = 0
        for q in range(L):
            x = cx[q + 1]
            y = cy[q + 1]
            area = abs((x - cx[q]) * (y - py[q + 1]) - (y - cy[q]) * (x - px[q + 1]))
            fi = math.floor(x)
            fj = math.floor(y)
            ok = (area < np.inf) & (fi >= ix_lo) & (fi <= ix_hi) & (fj >= iy_lo) & (fj <= iy_hi)
            i = int(fi if ok else 0.0)
            j = int(fj if ok else 0.0)
            gv[q] = ok
            n_good += ok
            iv[q] = i
            jv[q] = j
            fxv[q] = x - i if ok else 0.0
            fyv[q] = y - j if ok else 0.0
            av[q] = area
        # this row becomes the row below of the next one
        cur_x, prv_x = prv_x, cur_x
        cur_y, prv_y = prv_y, cur_y
        prv_lo = lo
        prv_hi = hi + 1
        prv_row = Y
        if n_good == 0:
            for c in range(lo, hi):
                out_img[r, c] = nan
                out_var[r, c] = inf
                out_msk[r, c] = nodata
            continue
        # strips of the row: the weights of a strip stay in L1 while its pixels are summed
        for s0 in range(lo, hi, _STRIP):
            s1 = min(hi, s0 + _STRIP)
            if products and not bilinear and table.shape[0] <= 1:
                _strip_weights_products(fxs, s0, s1, n, linear, cb, sb, wx, sxs)
                _strip_weights_products(fys, s0, s1, n, linear, cb, sb, wy, sys_)
            else:
                _strip_weights_columns(fxs, s0, s1, n, bilinear, linear, cb, sb, table, tmp, sa, ca, tot, wx, sxs)
                _strip_weights_columns(fys, s0, s1, n, bilinear, linear, cb, sb, table, tmp, sa, ca, tot, wy, sys_)
            # the squares of the y weights and, for the scalar tap sums, of the x weights (the vector
            # tap sums square the x weights in their vector)
            for k in range(m):
                for c in range(s1 - s0):
                    wy2[k, c] = wy[k, c] * wy[k, c]
            if not simd:
                for k in range(m):
                    for c in range(s1 - s0):
                        wx2[k, c] = wx[k, c] * wx[k, c]
            # zero-based views of the strip: no index can be negative, so none is checked
            gq = good[s0:s1]
            iq = ii[s0:s1]
            jq = jj[s0:s1]
            fxq = fxs[s0:s1]
            fyq = fys[s0:s1]
            aq = areas[s0:s1]
            sxq = sxs[s0:s1]
            syq = sys_[s0:s1]
            oiq = out_img[r, s0:s1]
            ovq = out_var[r, s0:s1]
            omq = out_msk[r, s0:s1]
            for q in range(s1 - s0):
                if not gq[q]:
                    oiq[q] = nan
                    ovq[q] = inf
                    omq[q] = nodata
                    continue
                i = iq[q]
                j = jq[q]
                fx = fxq[q]
                fy = fyq[q]
                base_x = i - (n - 1) - win_x0
                base_y = j - (n - 1) - win_y0
                any_bad = False
                if has_bad and row_bad[base_y] != 0 and col_bad[base_x] != 0:
                    for b in range(m):
                        for a in range(m):
                            if bad[base_y + b, base_x + a] != 0:
                                any_bad = True
                core_bad = False
                acc_i = 0.0
                acc_v = 0.0
                if not any_bad and simd:
                    # separable sums in vectors: the footprint rows with the y weights, then the columns
                    # with the x weights (pipeline._simd)
                    o = base_y * width + base_x
                    if m == 6:
                        acc_i, acc_v = tap_sums_6(flat_i, flat_v, o, width, wx, wy, wy2, q)
                    elif m == 8:
                        acc_i, acc_v = tap_sums_8(flat_i, flat_v, o, width, wx, wy, wy2, q)
                    elif m == 10:
                        acc_i, acc_v = tap_sums_10(flat_i, flat_v, o, width, wx, wy, wy2, q)
                    else:
                        acc_i, acc_v = tap_sums_2(flat_i, flat_v, o, width, wx, wy, wy2, q)
                    s_good = sxq[q] * syq[q]
                elif not any_bad:
                    # separable sums: each footprint row with the x weights, then the rows with the y weights
                    o = np.uint64(base_y) * uwidth + np.uint64(base_x)
                    for b in range(m):
                        ri = 0.0
                        rv = 0.0
                        for a in range(m):
                            ri += wx[a, q] * np.float64(flat_i[o + np.uint64(a)])
                            rv += wx2[a, q] * np.float64(flat_v[o + np.uint64(a)])
                        acc_i += wy[b, q] * ri
                        acc_v += wy2[b, q] * rv
                        o += uwidth
                    s_good = sxq[q] * syq[q]
                else:
                    s_good = 0.0
                    for b in range(m):
                        wyb = wy[b, q]
                        yy = base_y + b
                        oy = b - (n - 1)
                        in_core_y = (oy == 0) or (oy == 1 and fy != 0.0)
                        for a in range(m):
                            xx = base_x + a
                            if bad[yy, xx] != 0:
                                ox = a - (n - 1)
                                if in_core_y and ((ox == 0) or (ox == 1 and fx != 0.0)):
                                    core_bad = True
                                continue
                            w = wx[a, q] * wyb
                            acc_i += w * np.float64(src_img[yy, xx])
                            acc_v += w * w * np.float64(src_var[yy, xx])
                            s_good += w
                m_img = np.uint32(0)
                if has_grow and gmap[base_y, base_x] != 0:
                    for b in range(m):
                        if wy[b, q] == 0.0:
                            continue
                        for a in range(m):
                            if wx[a, q] != 0.0:
                                m_img |= src_msk[base_y + b, base_x + a]
                # mask footprint of the mask kernel (order mask_order, taps with non-zero weight)
                mo = (j - win_y0) * width + (i - win_x0)
                if mask_order == 1:
                    # branch-free: the right and upper taps (inside the window for every good pixel)
                    # count only where their bilinear weight is non-zero
                    keep_x = np.uint32(0xFFFFFFFF) if fx != 0.0 else np.uint32(0)
                    keep_y = np.uint32(0xFFFFFFFF) if fy != 0.0 else np.uint32(0)
                    m_msk = (flat_m[mo] | (flat_m[mo + 1] & keep_x)) | (
                        (flat_m[mo + width] | (flat_m[mo + width + 1] & keep_x)) & keep_y)
                else:
                    m_msk = np.uint32(0)
                    for oy in range(-(mask_order - 1), mask_order + 1):
                        if oy != 0 and fy == 0.0:
                            continue
                        for ox in range(-(mask_order - 1), mask_order + 1):
                            if ox != 0 and fx == 0.0:
                                continue
                            m_msk |= flat_m[mo + oy * width + ox]
                mout = (m_img & grow_full) | m_msk
                if core_bad or not (s_good > 0.0):
                    oiq[q] = nan
                    ovq[q] = inf
                    omq[q] = mout | nodata
                    continue
                k = aq[q] / s_good
                oiq[q] = k * acc_i * scale
                ovq[q] = k * k * acc_v * scale * scale
                omq[q] = mout


_BLOCK = dict(cache=True, **_SUMS)


@numba.njit(**_BLOCK)
def _warp_block_bilinear(si, sv, sm, wx0, wy0, valid, nx_, ny_, gx0, gy0, step, dx0, dy0, oi, ov, om, linear, mask_order,
                         grow, nodata, scale, table, products, simd):
    _warp_block(si, sv, sm, wx0, wy0, valid, nx_, ny_, gx0, gy0, step, dx0, dy0, oi, ov, om, 1, True, linear,
                mask_order, grow, nodata, scale, table, products, simd)


@numba.njit(**_BLOCK)
def _warp_block_lanczos3(si, sv, sm, wx0, wy0, valid, nx_, ny_, gx0, gy0, step, dx0, dy0, oi, ov, om, linear, mask_order,
                         grow, nodata, scale, table, products, simd):
    _warp_block(si, sv, sm, wx0, wy0, valid, nx_, ny_, gx0, gy0, step, dx0, dy0, oi, ov, om, 3, False, linear,
                mask_order, grow, nodata, scale, table, products, simd)


@numba.njit(**_BLOCK)
def _warp_block_lanczos4(si, sv, sm, wx0, wy0, valid, nx_, ny_, gx0, gy0, step, dx0, dy0, oi, ov, om, linear, mask_order,
                         grow, nodata, scale, table, products, simd):
    _warp_block(si, sv, sm, wx0, wy0, valid, nx_, ny_, gx0, gy0, step, dx0, dy0, oi, ov, om, 4, False, linear,
                mask_order, grow, nodata, scale, table, products, simd)


@numba.njit(**_BLOCK)
def _warp_block_lanczos5(si, sv, sm, wx0, wy0, valid, nx_, ny_, gx0, gy0, step, dx0, dy0, oi, ov, om, linear, mask_order,
                         grow, nodata, scale, table, products, simd):
    _warp_block(si, sv, sm, wx0, wy0, valid, nx_, ny_, gx0, gy0, step, dx0, dy0, oi, ov, om, 5, False, linear,
                mask_order, grow, nodata, scale, table, products, simd)


_BLOCK_KERNELS = {(1, True): _warp_block_bilinear, (3, False): _warp_block_lanczos3, (4, False): _warp_block_lanczos4,
                  (5, False): _warp_block_lanczos5}


def warp_block(
    src_img,
    src_var,
    src_msk,
    win_x0,
    win_y0,
    valid,
    nodes_x,
    nodes_y,
    gx0,
    gy0,
    step,
    dst_x0,
    dst_y0,
    out_img,
    out_var,
    out_msk,
    order,
    bilinear,
    linear,
    mask_order,
    grow_full,
    nodata,
    scale,
    table,
    products=True,
    simd=True,
):
    """Warp one destination block (spec warping.md section 1.3, with the bad-tap rule below).

    ``src_*`` is the source window whose element [0, 0] is source pixel ``(win_x0, win_y0)``; it must
    hold every tap of every good pixel (image and variance C-contiguous float32 or float64, each
    tap converted to float64 exactly; mask uint32).
    ``valid`` as in :func:`count_blocks`. ``scale`` multiplies the image (its square the variance):
    the photometric calibration. ``table`` (from :func:`kernel_table`, or an empty array for exact
    evaluation) tabulates the Lanczos weights. ``products``: exact Lanczos weights evaluated without
    divisions (:func:`_strip_weights_products`, equal to the quotient form up to rounding); False: the
    quotient form of :func:`_strip_weights_columns`. ``simd``: a footprint without bad taps is summed
    in vectors (:mod:`pipeline._simd`: over its rows with the y weights, then over the columns with
    the x weights); False: in scalars (over each row with the x weights, then over the rows). The two
    orders agree up to rounding (``tests/test_warp_simd.py`` bounds the difference).

    Bad taps: a source pixel whose image or variance is not finite, or whose mask has ``nodata``, is
    bad. If a bad pixel has non-zero *bilinear* weight the output pixel is no-data (NaN, +inf,
    ``nodata`` OR-ed into its mask); otherwise bad taps are dropped and the kernel is renormalised
    by the sum of the remaining weights. Mask bits are OR-ed from every tap, bad or not.

    Image, variance and mask are resampled in one pass, by a function compiled for each kernel
    order (fixed-length tap loops). The arithmetic of a pixel depends only on its own footprint
    (separable sums when no tap is bad, tap-by-tap sums otherwise), never on the rest of the window,
    so the result does not depend on the chunking.
    """
    kernel = _BLOCK_KERNELS.get((int(order), bool(bilinear)))
    if kernel is None:
        raise ValueError(f"no warp kernel of order {order} (bilinear={bilinear})")
    kernel(src_img, src_var, src_msk, win_x0, win_y0, valid, nodes_x, nodes_y, gx0, gy0, step, dst_x0, dst_y0,
           out_img, out_var, out_msk, linear, mask_order, grow_full, nodata, scale, table, bool(products), bool(simd))


@numba.njit(**_NOGIL)
def correlation_sums(nodes_x, nodes_y, gx0, gy0, step, X0, Y0, nx, ny, valid, order, bilinear, linear, qx0, qy0, cmap, hits):
    """Ingredients of the variance correlation factor on a destination window.

    For every good destination pixel p of the window, with weights ``w_pq`` and relative area
    ``A_p``, adds ``A_p w_pq / s_p`` to ``cmap[q]`` (source pixel q; ``cmap[0, 0]`` is source pixel
    ``(qx0, qy0)``), counts the contributions in ``hits`` and returns ``(n_good, sum A_p, sum A_p^2 g_p)`` with ``g_p = sum_q w_pq^2 / s_p^2``.
    """
    n = order
    wx = np.empty(2 * n)
    wy = np.empty(2 * n)
    cb, sb = trig_tables(n)
    ix_lo, iy_lo, ix_hi, iy_hi = valid
    cnt = 0
    sum_a = 0.0
    sum_a2g = 0.0
    for r in range(ny):
        Y = Y0 + r
        for c in range(nx):
            X = X0 + c
            x, y = _interp(gx0, gy0, step, nodes_x, nodes_y, X, Y)
            xl, yl = _interp(gx0, gy0, step, nodes_x, nodes_y, X - 1, Y)
            xb, yb = _interp(gx0, gy0, step, nodes_x, nodes_y, X, Y - 1)
            if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(xl) and math.isfinite(xb)):
                continue
            if X - 1 < gx0 or Y - 1 < gy0:
                continue
            fi = math.floor(x)
            fj = math.floor(y)
            if fi < ix_lo or fi > ix_hi or fj < iy_lo or fj > iy_hi:
                continue
            i = int(fi)
            j = int(fj)
            sx = kernel_weights(x - i, n, bilinear, linear, cb, sb, wx)
            sy = kernel_weights(y - j, n, bilinear, linear, cb, sb, wy)
            area = abs((x - xl) * (y - yb) - (y - yl) * (x - xb))
            s = sx * sy
            g = 0.0
            for b in range(2 * n):
                for a in range(2 * n):
                    w = wx[a] * wy[b]
                    g += w * w
                    cmap[j - (n - 1) + b - qy0, i - (n - 1) + a - qx0] += area * w / s
                    hits[j - (n - 1) + b - qy0, i - (n - 1) + a - qx0] += 1
            g /= s * s
            cnt += 1
            sum_a += area
            sum_a2g += area * area * g
    return cnt, sum_a, sum_a2g


@numba.njit(**_NOGIL)
def warp_psf_image(src, m00, m01, m10, m11, half_y, half_x, linear, out):
    """Resample a centred PSF image through the affine map ``src_offset = M @ dst_offset``.

    Lanczos-3 taps (exact), zero padding outside ``src``, per-pixel rule ``(A/s) sum w I`` with
    ``A = |det M|``; the caller renormalises. ``out`` has shape ``(2*half_y+1, 2*half_x+1)``.
    """
    n = 3
    wx = np.empty(2 * n)
    wy = np.empty(2 * n)
    cb, sb = trig_tables(n)
    sny, snx = src.shape
    cy = (sny - 1) // 2
    cx = (snx - 1) // 2
    area = abs(m00 * m11 - m01 * m10)
    for r in range(2 * half_y + 1):
        v = r - half_y
        for c in range(2 * half_x + 1):
            u = c - half_x
            x = cx + m00 * u + m01 * v
            y = cy + m10 * u + m11 * v
            rx = math.floor(x + 0.5)
            if abs(x - rx) < SNAP:
                x = rx
            ry = math.floor(y + 0.5)
            if abs(y - ry) < SNAP:
                y = ry
            i = int(math.floor(x))
            j = int(math.floor(y))
            sx = kernel_weights(x - i, n, False, linear, cb, sb, wx)
            sy = kernel_weights(y - j, n, False, linear, cb, sb, wy)
            acc = 0.0
            for b in range(2 * n):
                yy = j - (n - 1) + b
                if yy < 0 or yy >= sny:
                    continue
                for a in range(2 * n):
                    xx = i - (n - 1) + a
                    if xx < 0 or xx >= snx:
                        continue
                    acc += wx[a] * wy[b] * src[yy, xx]
            out[r, c] = area * acc / (sx * sy)
