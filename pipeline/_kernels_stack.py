"""Numba inner loop of the per-pixel stacker (no xarray, no dask).

:func:`stack_planes` gives the same numbers, bit for bit, as ``_kernels_stats.stack_pixels`` (the
definition: every sum runs over the planes in their given order with the same float64
expressions), with less work per sample:

* the planes come as a sequence of 2-D arrays (one per visit), so a chunk of a stack is never
  copied into one 3-D block;
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

_OPTS = dict(cache=True, nogil=True, error_model="numpy")


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
    q = int(math.floor(t))
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


@njit(**_OPTS)
def _pass_rows(
    images, variances, masks, weights, i, nx, andm, weight_mode, error_mode, centre, width, shifted, acc, cnt
):
    """Sums over the planes of row ``i`` of the selected samples with ``|x - centre| <= width``.

    ``acc`` rows: S1, S2, sum w x, sum w (x - centre)^2 (when ``shifted``), and the error sum:
    sum w^2 v (input-variance error) or sum w v (other modes).
    """
    for r in range(5):
        for j in range(nx):
            acc[r, j] = 0.0
    for j in range(nx):
        cnt[j] = 0
    s1 = acc[0]
    s2 = acc[1]
    a1 = acc[2]
    q1 = acc[3]
    e = acc[4]
    iv = weight_mode == WEIGHT_INVERSE_VARIANCE
    ev = error_mode == ERROR_INPUT_VARIANCE
    for k in range(len(images)):
        img = images[k]
        var = variances[k]
        msk = masks[k]
        wconst = np.float64(weights[k]) if weight_mode == WEIGHT_MULTIPLICATIVE else 1.0
        for j in range(nx):
            x = np.float64(img[i, j])
            v = np.float64(var[i, j])
            m = np.uint32(msk[i, j])
            good = ((m & andm) == 0) & ((v > 0.0) | (not iv)) & math.isfinite(x)
            d = x - centre[j]
            keep = good & (abs(d) <= width[j])
            w = (1.0 / v) if iv else wconst
            s1[j] += w if keep else 0.0
            s2[j] += w * w if keep else 0.0
            a1[j] += w * x if keep else 0.0
            if shifted:
                q1[j] += w * d * d if keep else 0.0
            if ev:
                e[j] += w * w * v if keep else 0.0
            else:
                e[j] += w * v if keep else 0.0
            cnt[j] += np.int64(keep)


@njit(**_OPTS)
def _plain_m2(images, variances, masks, i, nx, andm, weight_mode, weights, centre, width, mean, out):
    """Second pass of the two-pass moments: ``sum w (x - mean)^2`` over the kept samples."""
    for j in range(nx):
        out[j] = 0.0
    iv = weight_mode == WEIGHT_INVERSE_VARIANCE
    for k in range(len(images)):
        img = images[k]
        var = variances[k]
        msk = masks[k]
        wconst = np.float64(weights[k]) if weight_mode == WEIGHT_MULTIPLICATIVE else 1.0
        for j in range(nx):
            x = np.float64(img[i, j])
            v = np.float64(var[i, j])
            m = np.uint32(msk[i, j])
            good = ((m & andm) == 0) & ((v > 0.0) | (not iv)) & math.isfinite(x)
            keep = good & (abs(x - centre[j]) <= width[j])
            w = (1.0 / v) if iv else wconst
            d = x - mean[j]
            out[j] += w * d * d if keep else 0.0


@njit(**_OPTS)
def _shifted_result(s1, s2, a1, q1, e, c, centre, error_mode):
    """(mean, var, errvar) of ``_row_moments_shifted`` from its sums (``e`` as in :func:`_pass_rows`)."""
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
    images, variances, masks, weights, i, idx, npix, andm, weight_mode, error_mode, centre, width, acc, cnt
):
    """Shifted clip-pass sums of the pixels ``idx[:npix]`` of row ``i`` into ``acc[:, t]``,
    ``cnt[t]`` (as :func:`_pass_rows`, planes in order; centre and width indexed by pixel)."""
    ev = error_mode == ERROR_INPUT_VARIANCE
    for r in range(5):
        for t in range(npix):
            acc[r, t] = 0.0
    for t in range(npix):
        cnt[t] = 0
    iv = weight_mode == WEIGHT_INVERSE_VARIANCE
    for k in range(len(images)):
        img = images[k]
        var = variances[k]
        msk = masks[k]
        if iv:
            wconst = 1.0
        elif weight_mode == WEIGHT_MULTIPLICATIVE:
            wconst = np.float64(weights[k])
        else:
            wconst = 1.0
        for t in range(npix):
            j = idx[t]
            x = np.float64(img[i, j])
            v = np.float64(var[i, j])
            m = np.uint32(msk[i, j])
            if (m & andm) != 0 or (iv and not (v > 0.0)) or not math.isfinite(x):
                continue
            d = x - centre[j]
            if not (abs(d) <= width[j]):
                continue
            w = 1.0 / v if iv else wconst
            acc[0, t] += w
            acc[1, t] += w * w
            acc[2, t] += w * x
            acc[3, t] += w * d * d
            acc[4, t] += w * w * v if ev else w * v
            cnt[t] += 1


@njit(**_OPTS)
def _propagated_bits(images, variances, masks, weights, i, idx, npix, andm, weight_mode, prop_bits, prop_thr, orm, tot):
    """OR into ``orm[j]`` (``j`` in ``idx[:npix]``) the bits whose excluded-input weight fraction
    exceeds the threshold; ``tot`` is scratch (two rows of at least ``npix``)."""
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
                j = idx[t]
                x = np.float64(img[i, j])
                v = np.float64(var[i, j])
                m = np.uint32(msk[i, j])
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
    ny, nx = out_image.shape
    size = 1
    while size < nk:
        size *= 2
    Y = np.empty((size, nx), dtype=images[0].dtype)
    counts = np.empty(nx, dtype=np.int64)
    n = np.empty(nx, dtype=np.int64)
    orm = np.empty(nx, dtype=np.uint32)
    any_mask = np.empty(nx, dtype=np.uint32)
    centre = np.empty(nx, dtype=np.float64)
    width = np.empty(nx, dtype=np.float64)
    prev_centre = np.empty(nx, dtype=np.float64)
    prev_width = np.empty(nx, dtype=np.float64)
    iqr = np.empty(nx, dtype=np.float64)
    q25 = np.empty(nx, dtype=np.float64)
    mean = np.empty(nx, dtype=np.float64)
    var = np.empty(nx, dtype=np.float64)
    errvar = np.empty(nx, dtype=np.float64)
    m2 = np.empty(nx, dtype=np.float64)
    acc = np.empty((5, nx), dtype=np.float64)
    cnt = np.empty(nx, dtype=np.int64)
    pcnt = np.empty(nx, dtype=np.int64)
    idx = np.empty(nx, dtype=np.int64)
    moved = np.empty(nx, dtype=np.bool_)
    andm = np.uint32(and_mask)
    iv = weight_mode == WEIGHT_INVERSE_VARIANCE
    nprop = prop_bits.shape[0]
    prop_any = np.uint32(0)
    for b in range(nprop):
        prop_any |= prop_bits[b]
    nmap = map_from.shape[0]
    need_sort = statistic != STACK_MEAN
    inf = images[0].dtype.type(np.inf)
    shift = np.int64(32)
    low = np.int64(0xFFFFFFFF)
    for i in range(ny):
        for j in range(nx):
            counts[j] = 0
            orm[j] = 0
            any_mask[j] = 0
        # gathering sweep: selection, counts (good << 32 | unmasked), mask ORs, sort keys
        for k in range(nk):
            img = images[k]
            vr = variances[k]
            msk = masks[k]
            yk = Y[k]
            for j in range(nx):
                m = np.uint32(msk[i, j])
                xv = img[i, j]
                x = np.float64(xv)
                v = np.float64(vr[i, j])
                unmasked = (m & andm) == 0
                good = unmasked & ((v > 0.0) | (not iv)) & math.isfinite(x)
                any_mask[j] |= m
                orm[j] |= m if good else np.uint32(0)
                counts[j] += np.int64(unmasked) + (np.int64(good) << shift)
                yk[j] = xv if good else inf
        for j in range(nx):
            n[j] = counts[j] >> shift
        full = True
        for j in range(nx):
            full &= n[j] == nk
        if need_sort:
            for k in range(nk, size):
                for j in range(nx):
                    Y[k, j] = inf
            for c in range(pairs.shape[0]):
                yp = Y[pairs[c, 0]]
                yq = Y[pairs[c, 1]]
                for j in range(nx):
                    lo = yp[j]
                    hi = yq[j]
                    yp[j] = min(lo, hi)
                    yq[j] = max(lo, hi)
        if nprop > 0:
            npix = 0
            for j in range(nx):
                if (any_mask[j] & prop_any) != 0:
                    idx[npix] = j
                    npix += 1
            if npix > 0:
                _propagated_bits(
                    images, variances, masks, weights, i, idx, npix, andm, weight_mode, prop_bits, prop_thr, orm, acc
                )
        if statistic == STACK_MEANCLIP:
            # pass 0 about the median with the IQR width
            _row_quantile_full(Y, nk, 0.5, centre)
            _row_quantile_full(Y, nk, 0.75, iqr)
            _row_quantile_full(Y, nk, 0.25, q25)
            for j in range(nx):
                iqr[j] -= q25[j]
            if not full:
                for j in range(nx):
                    nj = n[j]
                    if nj != nk:
                        centre[j] = _column_quantile(Y, j, nj, 0.5)
                        iqr[j] = _column_quantile(Y, j, nj, 0.75) - _column_quantile(Y, j, nj, 0.25)
            for j in range(nx):
                var[j] = np.nan
            for it in range(num_iter):
                last = it == num_iter - 1
                if it > 0:
                    for j in range(nx):
                        prev_centre[j] = centre[j]
                        prev_width[j] = width[j]
                        centre[j] = mean[j]
                for j in range(nx):
                    width[j] = clip_width(it, n[j], iqr[j], var[j], num_sigma, centre[j])
                if last and it > 0 and error_mode != ERROR_DEFAULT:
                    # only the pixels whose kept set changed need this pass
                    for j in range(nx):
                        moved[j] = False
                    for k in range(nk):
                        yk = Y[k]
                        for j in range(nx):
                            y = np.float64(yk[j])
                            kp = abs(y - prev_centre[j]) <= prev_width[j]
                            kc = abs(y - centre[j]) <= width[j]
                            moved[j] |= kp != kc
                    npix = 0
                    for j in range(nx):
                        if moved[j]:
                            idx[npix] = j
                            npix += 1
                    if npix > 0:
                        _pixels_pass(
                            images, variances, masks, weights, i, idx, npix, andm, weight_mode, error_mode, centre,
                            width, acc, pcnt,
                        )
                        for t in range(npix):
                            j = idx[t]
                            mean[j], var[j], errvar[j] = _shifted_result(
                                acc[0, t], acc[1, t], acc[2, t], acc[3, t], acc[4, t], pcnt[t], centre[j],
                                error_mode,
                            )
                            cnt[j] = pcnt[t]
                    continue
                _pass_rows(
                    images, variances, masks, weights, i, nx, andm, weight_mode, error_mode, centre, width, True, acc, cnt
                )
                for j in range(nx):
                    mean[j], var[j], errvar[j] = _shifted_result(
                        acc[0, j], acc[1, j], acc[2, j], acc[3, j], acc[4, j], cnt[j], centre[j],
                        error_mode,
                    )
            for j in range(nx):
                out_image[i, j] = mean[j]
                out_variance[i, j] = errvar[j]
                if n[j] - cnt[j] > 0:
                    orm[j] |= np.uint32(clipped)
        else:
            # plain two-pass moments over all selected samples
            for j in range(nx):
                centre[j] = 0.0
                width[j] = np.inf
            _pass_rows(
                images, variances, masks, weights, i, nx, andm, weight_mode, error_mode, centre, width, False, acc, cnt
            )
            for j in range(nx):
                mean[j] = acc[2, j] / acc[0, j] if (cnt[j] > 0 and acc[0, j] != 0.0) else np.nan
            need_var = statistic == STACK_MEDIAN or error_mode == ERROR_DEFAULT
            if need_var:
                _plain_m2(images, variances, masks, i, nx, andm, weight_mode, weights, centre, width, mean, m2)
            for j in range(nx):
                s1 = acc[0, j]
                if cnt[j] == 0 or s1 == 0.0:
                    var[j] = np.nan
                    errvar[j] = np.nan
                    continue
                denom = s1 * s1 - acc[1, j]
                var[j] = m2[j] * s1 / denom if (need_var and denom != 0.0) else np.nan
                if error_mode == ERROR_INPUT_VARIANCE:
                    errvar[j] = acc[4, j] / (s1 * s1)
                elif error_mode == ERROR_MOSAIC:
                    errvar[j] = acc[4, j] / s1
                else:
                    errvar[j] = var[j] * acc[1, j] / (s1 * s1)
            if statistic == STACK_MEDIAN:
                for j in range(nx):
                    nj = n[j]
                    out_image[i, j] = _column_quantile(Y, j, nj, 0.5)
                    out_variance[i, j] = 0.5 * math.pi * var[j] / nj if nj > 0 else np.nan
            else:
                for j in range(nx):
                    out_image[i, j] = mean[j]
                    out_variance[i, j] = errvar[j]
        for j in range(nx):
            nj = n[j]
            m_out = orm[j]
            if nj == 0:
                m_out = np.uint32(no_data)
                out_image[i, j] = np.nan
                out_variance[i, j] = np.nan
            if nk - nj > 0:
                for p in range(nmap):
                    if (any_mask[j] & map_from[p]) != 0:
                        m_out |= map_to[p]
            out_mask[i, j] = m_out
            out_n[i, j] = counts[j] & low
