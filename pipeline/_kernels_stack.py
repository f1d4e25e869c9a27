"""Numba inner loop of the per-pixel stacker (no xarray, no dask).

:func:`stack_planes` gives the same numbers, bit for bit, as ``_kernels_stats.stack_pixels`` (the
definition: every sum runs over the planes in their given order with the same float64
expressions), with less work per sample:

* the planes come as a sequence of 2-D arrays (one per visit), so a chunk of a stack is never
  copied into one 3-D block; the work runs in bands of rows (about ``BAND_PIXELS`` pixels, at
  most ``TILE_WIDTH`` columns wide), so each plane is looked up once per band and sweep and the
  scratch of a band stays in cache whatever the chunk width;
* one gathering sweep per row: the and-mask/finite/variance selection, counts and mask ORs, and
  the sort keys (excluded samples sort last as +inf); nothing else is stored per sample, the
  moment passes read the input rows again (the selection costs a few vector operations);
* weights ``1/v`` are formed where they are used, without Python's zero-division check;
* quartiles from whole rows where every plane survives (the common case), per pixel otherwise;
* the mask-propagation weights are summed only for pixels where some input carries a
  propagated bit;
* MEANCLIP: the clip range of a pass is a run of the sorted samples, so a pass whose run equals
  that of the pass before gives the same kept set, hence the same mean, count and
  input-variance (or mosaic) error; the last pass is formed only for the pixels where the run
  changed (with the default error, which depends on the scatter about the new centre, it is
  formed everywhere).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._kernels_stats import (
    ERROR_DEFAULT,
    ERROR_INPUT_VARIANCE,
    ERROR_MOSAIC,
    STACK_MEAN,
    STACK_MEANCLIP,
    STACK_MEDIAN,
    WEIGHT_INVERSE_VARIANCE,
    WEIGHT_MULTIPLICATIVE,
    _column_quantile,
    clip_width,
)

__all__ = ["stack_planes"]

_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}

#: pixels per band of rows, and the widest column tile (the per-band scratch stays within a
#: core's L2 cache whatever the chunk width)
BAND_PIXELS = 4096
TILE_WIDTH = 1024


@njit(**_OPTS)
def _row_quantile_full(Y, n, f, out):
    """:func:`_column_quantile` of every column of ``Y`` holding ``n`` sorted samples (one n)."""
    nx = Y.shape[1]
    if n <= 0:
        for j in range(nx):
            out[j] = np.nan
        return
    if n == 1:
        for j in range(nx):
            out[j] = np.float64(Y[0, j])
        return
    t = f * (n - 1)
    q = math.floor(t)
    if q >= n - 1:
        for j in range(nx):
            out[j] = np.float64(Y[n - 1, j])
        return
    g = t - q
    ya = Y[q]
    yb = Y[q + 1]
    if g >= 0.5:
        h = 1.0 - g
        for j in range(nx):
            a = np.float64(ya[j])
            b = np.float64(yb[j])
            out[j] = b - (b - a) * h
    else:
        for j in range(nx):
            a = np.float64(ya[j])
            b = np.float64(yb[j])
            out[j] = a + (b - a) * g


@njit(inline="always", error_model="numpy")
def _select(xv, vv, mv, andm, iv):
    """(x, v, m, unmasked, good) of one sample: and-mask, finite value, positive variance if ``iv``."""
    x = np.float64(xv)
    v = np.float64(vv)
    m = np.uint32(mv)
    unmasked = (m & andm) == 0
    good = unmasked & ((v > 0.0) | (not iv)) & math.isfinite(x)
    return x, v, m, unmasked, good


@njit(inline="always", error_model="numpy")
def _terms(xv, vv, mv, c, wd, andm, iv, wconst, ev, shifted):
    """Terms of one sample in the pass sums (zero unless selected and ``|x - c| <= wd``)."""
    x, v, _, _, good = _select(xv, vv, mv, andm, iv)
    d = x - c
    keep = good & (abs(d) <= wd)
    w = (1.0 / v) if iv else wconst
    t1 = w if keep else 0.0
    t2 = w * w if keep else 0.0
    t3 = w * x if keep else 0.0
    t4 = (w * d * d if keep else 0.0) if shifted else 0.0
    if ev:
        t5 = w * w * v if keep else 0.0
    else:
        t5 = w * v if keep else 0.0
    return t1, t2, t3, t4, t5, np.int64(keep)


@njit(**_OPTS)
def _pass_band(
    images, variances, masks, weights, i0, j0, nr, nx, andm, weight_mode, error_mode, centre, width, shifted, acc, cnt
):
    """Sums over the planes of rows ``i0:i0+nr`` of the selected samples with ``|x - centre| <= width``.

    Pixel ``(i0 + r, j0 + j)`` is entry ``r * nx + j`` of ``centre``, ``width``, ``cnt`` and of the
    ``acc`` rows: S1, S2, sum w x, sum w (x - centre)^2 (when ``shifted``), and the error sum
    sum w^2 v (input-variance error) or sum w v (other modes). Planes are taken four at a time
    with the sums held in registers, added in plane order.
    """
    npx = nr * nx
    for r in range(5):
        for p in range(npx):
            acc[r, p] = 0.0
    for p in range(npx):
        cnt[p] = 0
    s1 = acc[0]
    s2 = acc[1]
    a1 = acc[2]
    q1 = acc[3]
    e = acc[4]
    iv = weight_mode == WEIGHT_INVERSE_VARIANCE
    ev = error_mode == ERROR_INPUT_VARIANCE
    mult = weight_mode == WEIGHT_MULTIPLICATIVE
    nk = len(images)
    k = 0
    while k + 4 <= nk:
        im0, im1, im2, im3 = images[k], images[k + 1], images[k + 2], images[k + 3]
        va0, va1, va2, va3 = variances[k], variances[k + 1], variances[k + 2], variances[k + 3]
        ma0, ma1, ma2, ma3 = masks[k], masks[k + 1], masks[k + 2], masks[k + 3]
        w0 = np.float64(weights[k]) if mult else 1.0
        w1 = np.float64(weights[k + 1]) if mult else 1.0
        w2 = np.float64(weights[k + 2]) if mult else 1.0
        w3 = np.float64(weights[k + 3]) if mult else 1.0
        for r in range(nr):
            i = i0 + r
            base = r * nx
            im0r = im0[i, j0:j0 + nx]
            im1r = im1[i, j0:j0 + nx]
            im2r = im2[i, j0:j0 + nx]
            im3r = im3[i, j0:j0 + nx]
            va0r = va0[i, j0:j0 + nx]
            va1r = va1[i, j0:j0 + nx]
            va2r = va2[i, j0:j0 + nx]
            va3r = va3[i, j0:j0 + nx]
            ma0r = ma0[i, j0:j0 + nx]
            ma1r = ma1[i, j0:j0 + nx]
            ma2r = ma2[i, j0:j0 + nx]
            ma3r = ma3[i, j0:j0 + nx]
            for j in range(nx):
                p = base + j
                c = centre[p]
                wd = width[p]
                A = s1[p]
                B = s2[p]
                C = a1[p]
                D = q1[p]
                E = e[p]
                N = cnt[p]
                t = _terms(im0r[j], va0r[j], ma0r[j], c, wd, andm, iv, w0, ev, shifted)
                A += t[0]
                B += t[1]
                C += t[2]
                D += t[3]
                E += t[4]
                N += t[5]
                t = _terms(im1r[j], va1r[j], ma1r[j], c, wd, andm, iv, w1, ev, shifted)
                A += t[0]
                B += t[1]
                C += t[2]
                D += t[3]
                E += t[4]
                N += t[5]
                t = _terms(im2r[j], va2r[j], ma2r[j], c, wd, andm, iv, w2, ev, shifted)
                A += t[0]
                B += t[1]
                C += t[2]
                D += t[3]
                E += t[4]
                N += t[5]
                t = _terms(im3r[j], va3r[j], ma3r[j], c, wd, andm, iv, w3, ev, shifted)
                A += t[0]
                B += t[1]
                C += t[2]
                D += t[3]
                E += t[4]
                N += t[5]
                s1[p] = A
                s2[p] = B
                a1[p] = C
                q1[p] = D
                e[p] = E
                cnt[p] = N
        k += 4
    while k < nk:
        im0 = images[k]
        va0 = variances[k]
        ma0 = masks[k]
        w0 = np.float64(weights[k]) if mult else 1.0
        for r in range(nr):
            i = i0 + r
            base = r * nx
            im0r = im0[i, j0:j0 + nx]
            va0r = va0[i, j0:j0 + nx]
            ma0r = ma0[i, j0:j0 + nx]
            for j in range(nx):
                p = base + j
                t = _terms(im0r[j], va0r[j], ma0r[j], centre[p], width[p], andm, iv, w0, ev, shifted)
                s1[p] += t[0]
                s2[p] += t[1]
                a1[p] += t[2]
                q1[p] += t[3]
                e[p] += t[4]
                cnt[p] += t[5]
        k += 1


@njit(**_OPTS)
def _gather_band(images, variances, masks, i0, j0, nr, nx, andm, iv, Y, any_mask, orm, counts):
    """The gathering sweep of rows ``i0:i0+nr``, columns ``j0:j0+nx``: mask OR of every input, mask OR of the selected
    ones, counts (selected << 32 | without an and-mask bit) and the sort keys ``Y[r, k]`` (the
    value, +inf where not selected)."""
    npx = nr * nx
    for p in range(npx):
        counts[p] = 0
        orm[p] = 0
        any_mask[p] = 0
    nk = len(images)
    inf = np.inf
    shift = np.int64(32)
    zero = np.uint32(0)
    k = 0
    while k < nk:
        im0 = images[k]
        va0 = variances[k]
        ma0 = masks[k]
        for r in range(nr):
            i = i0 + r
            base = r * nx
            y0 = Y[r, k]
            im0r = im0[i, j0:j0 + nx]
            va0r = va0[i, j0:j0 + nx]
            ma0r = ma0[i, j0:j0 + nx]
            for j in range(nx):
                p = base + j
                x0, _, m0, u0, g0 = _select(im0r[j], va0r[j], ma0r[j], andm, iv)
                any_mask[p] |= m0
                orm[p] |= m0 if g0 else zero
                counts[p] += np.int64(u0) + (np.int64(g0) << shift)
                y0[j] = x0 if g0 else inf
        k += 1


@njit(**_OPTS)
def _plain_m2(images, variances, masks, weights, i0, j0, nr, nx, andm, weight_mode, centre, width, mean, out):
    """Second sweep of the two-pass moments: ``sum w (x - mean)^2`` over the kept samples."""
    npx = nr * nx
    for p in range(npx):
        out[p] = 0.0
    iv = weight_mode == WEIGHT_INVERSE_VARIANCE
    for k in range(len(images)):
        img = images[k]
        var = variances[k]
        msk = masks[k]
        wconst = np.float64(weights[k]) if weight_mode == WEIGHT_MULTIPLICATIVE else 1.0
        for r in range(nr):
            i = i0 + r
            base = r * nx
            imgr = img[i, j0:j0 + nx]
            varr = var[i, j0:j0 + nx]
            mskr = msk[i, j0:j0 + nx]
            for j in range(nx):
                p = base + j
                x = np.float64(imgr[j])
                v = np.float64(varr[j])
                m = np.uint32(mskr[j])
                good = ((m & andm) == 0) & ((v > 0.0) | (not iv)) & math.isfinite(x)
                keep = good & (abs(x - centre[p]) <= width[p])
                w = (1.0 / v) if iv else wconst
                d = x - mean[p]
                out[p] += w * d * d if keep else 0.0


@njit(**_OPTS)
def _rows_of(idx, npix, nx, rows):
    """Band row of each listed pixel (``idx`` ascending), without integer division."""
    r = 0
    for t in range(npix):
        while idx[t] >= (r + 1) * nx:
            r += 1
        rows[t] = r


@njit(**_OPTS)
def _shifted_result(s1, s2, a1, q1, e, c, centre, error_mode):
    """(mean, var, errvar) of ``_row_moments_shifted`` from its sums (``e`` as in :func:`_pass_band`)."""
    if c == 0 or s1 == 0.0:
        return np.nan, np.nan, np.nan
    mean = a1 / s1
    off = mean - centre
    m2 = max(q1 - s1 * off * off, 0.0)
    denom = s1 * s1 - s2
    var = m2 * s1 / denom if denom != 0.0 else np.nan
    if error_mode == ERROR_INPUT_VARIANCE:
        errvar = e / (s1 * s1)
    elif error_mode == ERROR_MOSAIC:
        errvar = e / s1
    else:
        errvar = var * s2 / (s1 * s1)
    return mean, var, errvar


@njit(**_OPTS)
def _pixels_pass(
    images, variances, masks, weights, i0, j0, nx, idx, rows, npix, andm, weight_mode, error_mode, centre, width, acc, cnt,
    xc, vc, mc, cc, wc,
):
    """Shifted clip-pass sums of the band pixels ``idx[:npix]`` (entries ``r * nx + j``) into
    ``acc[:, t]``, ``cnt[t]`` (as :func:`_pass_band`, planes in order). The samples of the listed
    pixels are first copied into the compact ``(K, npix)`` buffers ``xc``, ``vc``, ``mc`` (their
    centres and widths into ``cc``, ``wc``), so the sums run as one dense vector sweep."""
    ev = error_mode == ERROR_INPUT_VARIANCE
    iv = weight_mode == WEIGHT_INVERSE_VARIANCE
    nk = len(images)
    for t in range(npix):
        p = idx[t]
        cc[t] = centre[p]
        wc[t] = width[p]
    for k in range(nk):
        img = images[k]
        var = variances[k]
        msk = masks[k]
        xk = xc[k]
        vk = vc[k]
        mk = mc[k]
        for t in range(npix):
            i = i0 + rows[t]
            j = idx[t] - rows[t] * nx
            xk[t] = img[i, j0 + j]
            vk[t] = var[i, j0 + j]
            mk[t] = msk[i, j0 + j]
    for r in range(5):
        for t in range(npix):
            acc[r, t] = 0.0
    for t in range(npix):
        cnt[t] = 0
    for k in range(nk):
        wconst = np.float64(weights[k]) if weight_mode == WEIGHT_MULTIPLICATIVE else 1.0
        xk = xc[k]
        vk = vc[k]
        mk = mc[k]
        for t in range(npix):
            tt = _terms(xk[t], vk[t], mk[t], cc[t], wc[t], andm, iv, wconst, ev, True)
            acc[0, t] += tt[0]
            acc[1, t] += tt[1]
            acc[2, t] += tt[2]
            acc[3, t] += tt[3]
            acc[4, t] += tt[4]
            cnt[t] += tt[5]


@njit(**_OPTS)
def _propagated_bits(
    images, variances, masks, weights, i0, j0, nx, idx, rows, npix, andm, weight_mode, prop_bits, prop_thr, orm, tot
):
    """OR into ``orm[p]`` (``p`` in ``idx[:npix]``, entries ``r * nx + j`` of the band) the bits
    whose excluded-input weight fraction exceeds the threshold; ``tot`` is scratch (2 rows)."""
    iv = weight_mode == WEIGHT_INVERSE_VARIANCE
    for b in range(prop_bits.shape[0]):
        bit = prop_bits[b]
        for t in range(npix):
            tot[0, t] = 0.0
            tot[1, t] = 0.0
        for k in range(len(images)):
            img = images[k]
            var = variances[k]
            msk = masks[k]
            for t in range(npix):
                p = idx[t]
                i = i0 + rows[t]
                j = p - rows[t] * nx
                x = np.float64(img[i, j0 + j])
                v = np.float64(var[i, j0 + j])
                m = np.uint32(msk[i, j0 + j])
                if iv:
                    wvalid = v > 0.0
                    wk = 1.0 / v if wvalid else 0.0
                elif weight_mode == WEIGHT_MULTIPLICATIVE:
                    wvalid = True
                    wk = np.float64(weights[k])
                else:
                    wvalid = True
                    wk = 1.0
                good = ((m & andm) == 0) and wvalid and math.isfinite(x)
                if good:
                    tot[0, t] += wk
                elif (m & bit) != 0:
                    tot[1, t] += wk
        for t in range(npix):
            total = tot[0, t] + tot[1, t]
            if total != 0.0 and tot[1, t] / total > prop_thr[b]:
                orm[idx[t]] |= bit


@njit(**_OPTS)
def stack_planes(
    images, variances, masks, weights, and_mask, weight_mode, error_mode, statistic, num_sigma, num_iter,
    prop_bits, prop_thr, no_data, clipped, map_from, map_to, pairs, out_image, out_variance, out_mask, out_n,
):
    """Per-pixel stack of K planes given as sequences of 2-D arrays (one per visit).

    Arguments and outputs are those of ``_kernels_stats.stack_pixels`` (whose results this
    reproduces exactly), except that ``images``, ``variances`` and ``masks`` are sequences
    (typed lists or 3-D arrays) of K ``(ny, nx)`` planes.
    """
    nk = len(images)
    ny, width_all = out_image.shape
    tile = min(width_all, TILE_WIDTH)
    size = 1
    while size < nk:
        size *= 2
    band = max(1, min(ny, BAND_PIXELS // max(tile, 1)))
    nb = band * tile
    Y = np.empty((band, size, tile), dtype=images[0].dtype)
    counts = np.empty(nb, dtype=np.int64)
    n = np.empty(nb, dtype=np.int64)
    orm = np.empty(nb, dtype=np.uint32)
    any_mask = np.empty(nb, dtype=np.uint32)
    centre = np.empty(nb, dtype=np.float64)
    width = np.empty(nb, dtype=np.float64)
    prev_centre = np.empty(nb, dtype=np.float64)
    prev_width = np.empty(nb, dtype=np.float64)
    iqr = np.empty(nb, dtype=np.float64)
    q25 = np.empty(tile, dtype=np.float64)
    mean = np.empty(nb, dtype=np.float64)
    var = np.empty(nb, dtype=np.float64)
    errvar = np.empty(nb, dtype=np.float64)
    m2 = np.empty(nb, dtype=np.float64)
    acc = np.empty((5, nb), dtype=np.float64)
    cnt = np.empty(nb, dtype=np.int64)
    pcnt = np.empty(nb, dtype=np.int64)
    idx = np.empty(nb, dtype=np.int64)
    rows = np.empty(nb, dtype=np.int64)
    moved = np.empty(nb, dtype=np.bool_)
    xc = np.empty((nk, nb), dtype=images[0].dtype)
    vc = np.empty((nk, nb), dtype=variances[0].dtype)
    mc = np.empty((nk, nb), dtype=masks[0].dtype)
    cc = np.empty(nb, dtype=np.float64)
    wc = np.empty(nb, dtype=np.float64)
    andm = np.uint32(and_mask)
    iv = weight_mode == WEIGHT_INVERSE_VARIANCE
    nprop = prop_bits.shape[0]
    prop_any = np.uint32(0)
    for b in range(nprop):
        prop_any |= prop_bits[b]
    nmap = map_from.shape[0]
    need_sort = statistic != STACK_MEAN
    inf = np.inf
    shift = np.int64(32)
    low = np.int64(0xFFFFFFFF)
    for j0 in range(0, width_all, tile):
        nx = min(tile, width_all - j0)
        if nx != Y.shape[2]:
            Y = np.empty((band, size, nx), dtype=images[0].dtype)
        for i0 in range(0, ny, band):
            nr = min(band, ny - i0)
            npx = nr * nx
            _gather_band(images, variances, masks, i0, j0, nr, nx, andm, iv, Y, any_mask, orm, counts)
            for p in range(npx):
                n[p] = counts[p] >> shift
            if need_sort:
                for r in range(nr):
                    Yr = Y[r]
                    for k in range(nk, size):
                        for j in range(nx):
                            Yr[k, j] = inf
                    for c in range(pairs.shape[0]):
                        yp = Yr[pairs[c, 0]]
                        yq = Yr[pairs[c, 1]]
                        for j in range(nx):
                            lo = yp[j]
                            hi = yq[j]
                            yp[j] = min(lo, hi)
                            yq[j] = max(lo, hi)
            if nprop > 0:
                npix = 0
                for p in range(npx):
                    if (any_mask[p] & prop_any) != 0:
                        idx[npix] = p
                        npix += 1
                _rows_of(idx, npix, nx, rows)
                if npix > 0:
                    _propagated_bits(
                        images, variances, masks, weights, i0, j0, nx, idx, rows, npix, andm, weight_mode, prop_bits, prop_thr,
                        orm, acc,
                    )
            if statistic == STACK_MEANCLIP:
                # pass 0 about the median with the IQR width
                for r in range(nr):
                    Yr = Y[r]
                    base = r * nx
                    cr = centre[base:base + nx]
                    ir = iqr[base:base + nx]
                    _row_quantile_full(Yr, nk, 0.5, cr)
                    _row_quantile_full(Yr, nk, 0.75, ir)
                    _row_quantile_full(Yr, nk, 0.25, q25)
                    for j in range(nx):
                        ir[j] -= q25[j]
                    for j in range(nx):
                        nj = n[base + j]
                        if nj != nk:
                            cr[j] = _column_quantile(Yr, j, nj, 0.5)
                            ir[j] = _column_quantile(Yr, j, nj, 0.75) - _column_quantile(Yr, j, nj, 0.25)
                for p in range(npx):
                    var[p] = np.nan
                for it in range(num_iter):
                    last = it == num_iter - 1
                    if it > 0:
                        for p in range(npx):
                            prev_centre[p] = centre[p]
                            prev_width[p] = width[p]
                            centre[p] = mean[p]
                    for p in range(npx):
                        width[p] = clip_width(it, n[p], iqr[p], var[p], num_sigma, centre[p])
                    if last and it > 0 and error_mode != ERROR_DEFAULT:
                        # only the pixels whose kept set changed need this pass
                        for p in range(npx):
                            moved[p] = False
                        for r in range(nr):
                            base = r * nx
                            for k in range(nk):
                                yk = Y[r, k]
                                for j in range(nx):
                                    p = base + j
                                    y = np.float64(yk[j])
                                    kp = abs(y - prev_centre[p]) <= prev_width[p]
                                    kc = abs(y - centre[p]) <= width[p]
                                    moved[p] |= kp != kc
                        npix = 0
                        for p in range(npx):
                            if moved[p]:
                                idx[npix] = p
                                npix += 1
                        _rows_of(idx, npix, nx, rows)
                        if npix > 0:
                            _pixels_pass(
                                images, variances, masks, weights, i0, j0, nx, idx, rows, npix, andm, weight_mode, error_mode,
                                centre, width, acc, pcnt, xc, vc, mc, cc, wc,
                            )
                            for t in range(npix):
                                p = idx[t]
                                mean[p], var[p], errvar[p] = _shifted_result(
                                    acc[0, t], acc[1, t], acc[2, t], acc[3, t], acc[4, t], pcnt[t], centre[p], error_mode
                                )
                                cnt[p] = pcnt[t]
                        continue
                    _pass_band(
                        images, variances, masks, weights, i0, j0, nr, nx, andm, weight_mode, error_mode, centre, width, True,
                        acc, cnt,
                    )
                    for p in range(npx):
                        mean[p], var[p], errvar[p] = _shifted_result(
                            acc[0, p], acc[1, p], acc[2, p], acc[3, p], acc[4, p], cnt[p], centre[p], error_mode
                        )
                for r in range(nr):
                    i = i0 + r
                    base = r * nx
                    for j in range(nx):
                        p = base + j
                        out_image[i, j0 + j] = mean[p]
                        out_variance[i, j0 + j] = errvar[p]
                        if n[p] - cnt[p] > 0:
                            orm[p] |= np.uint32(clipped)
            else:
                # plain two-pass moments over all selected samples
                for p in range(npx):
                    centre[p] = 0.0
                    width[p] = np.inf
                _pass_band(
                    images, variances, masks, weights, i0, j0, nr, nx, andm, weight_mode, error_mode, centre, width, False,
                    acc, cnt,
                )
                for p in range(npx):
                    mean[p] = acc[2, p] / acc[0, p] if (cnt[p] > 0 and acc[0, p] != 0.0) else np.nan
                need_var = statistic == STACK_MEDIAN or error_mode == ERROR_DEFAULT
                if need_var:
                    _plain_m2(images, variances, masks, weights, i0, j0, nr, nx, andm, weight_mode, centre, width, mean, m2)
                for p in range(npx):
                    s1 = acc[0, p]
                    if cnt[p] == 0 or s1 == 0.0:
                        var[p] = np.nan
                        errvar[p] = np.nan
                        continue
                    denom = s1 * s1 - acc[1, p]
                    var[p] = m2[p] * s1 / denom if (need_var and denom != 0.0) else np.nan
                    if error_mode == ERROR_INPUT_VARIANCE:
                        errvar[p] = acc[4, p] / (s1 * s1)
                    elif error_mode == ERROR_MOSAIC:
                        errvar[p] = acc[4, p] / s1
                    else:
                        errvar[p] = var[p] * acc[1, p] / (s1 * s1)
                for r in range(nr):
                    i = i0 + r
                    base = r * nx
                    for j in range(nx):
                        p = base + j
                        if statistic == STACK_MEDIAN:
                            nj = n[p]
                            out_image[i, j0 + j] = _column_quantile(Y[r], j, nj, 0.5)
                            out_variance[i, j0 + j] = 0.5 * math.pi * var[p] / nj if nj > 0 else np.nan
                        else:
                            out_image[i, j0 + j] = mean[p]
                            out_variance[i, j0 + j] = errvar[p]
            for r in range(nr):
                i = i0 + r
                base = r * nx
                for j in range(nx):
                    p = base + j
                    nj = n[p]
                    m_out = orm[p]
                    if nj == 0:
                        m_out = np.uint32(no_data)
                        out_image[i, j0 + j] = np.nan
                        out_variance[i, j0 + j] = np.nan
                    if nk - nj > 0:
                        for q in range(nmap):
                            if (any_mask[p] & map_from[q]) != 0:
                                m_out |= map_to[q]
                    out_mask[i, j0 + j] = m_out
                    out_n[i, j0 + j] = counts[p] & low
