"""Numba inner loops of the robust statistics (no xarray, no dask).

Every routine works on a 2-D ``(n_sets, n_samples)`` layout: one statistic set per row, so that a
whole chunk of a stack (one row per output pixel, one sample per visit) is reduced in one call.

The per-row algorithm is that of ``statistics_and_masks.md`` section 1:

* selection: ``(m & and_mask) == 0`` and, when ``nan_safe``, a finite value; with inverse-variance
  weights samples whose variance is not positive are dropped altogether;
* weights: none, multiplicative, or ``1 / v``;
* plain moments with the debiased weighted variance, ORMASK, NPOINT, NMASKED;
* quantiles with numpy's "linear" definition over the finite selected samples;
* clipped passes (first around the median with ``num_sigma * IQR_TO_SIGMA * iqr``, then around the
  previous clipped mean with ``num_sigma * sqrt(var)``; every pass reselects from the full good
  set, inclusive bounds, NaN centre or width gives NaN);
* error of the mean-like statistics (default, from the input variance, mosaic mode);
* mask-bit propagation from the excluded samples by weight fraction.

The selected samples of each row are ordered by ``(value, weight, variance, mask)`` before any sum
is formed (for rows of up to ``EXACT_ORDER_MAX`` samples), so results do not depend on the order of
the samples at all, not even in the last bit.

Longer unweighted NaN-safe rows with the default error (the background cells, whole images) take a
fast path (:func:`reduce_rows_unit`, :func:`reduce_cells`): the selected samples are gathered once
into a buffer of their own dtype, the quartiles come from in-place selection (no sort), and each
moment is one branch-free pass over the buffer. It gives the same counts, quantiles, clip decisions
and masks; its sums run in buffer order, so they may differ from sorted-order sums in the last bits.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

IQR_TO_SIGMA = 0.741301109252802


#: relative slack of the clip bounds: a mean of identical values may differ from them by a few
#: ulps (w*x/w != x), which would clip every sample when the width is 0 (a single sample, or
#: IQR = 0); 16 float64 ulps of the centre keep those samples, as the reference intends
CLIP_SLACK = 16.0 * 2.220446049250313e-16


@njit(cache=True, nogil=True)
def clip_width(p, n, iqr, var, num_sigma, centre):
    """Half-width of clip pass ``p`` (spec 1.8) plus the rounding slack; NaN when undefined."""
    if p == 0 or n <= 1:
        width = num_sigma * IQR_TO_SIGMA * iqr
    elif math.isnan(var):
        return np.nan
    else:
        width = num_sigma * math.sqrt(max(var, 0.0))
    return width + CLIP_SLACK * abs(centre)

#: rows with at most this many selected samples are put in a total order before summation
EXACT_ORDER_MAX = 64

# columns of the float64 result table
C_NPOINT = 0
C_NMASKED = 1
C_MEAN = 2
C_VARIANCE = 3
C_MEAN_ERRVAR = 4
C_SUM = 5
C_MIN = 6
C_MAX = 7
C_MEDIAN = 8
C_Q25 = 9
C_Q75 = 10
C_MEANCLIP = 11
C_VARCLIP = 12
C_MEANCLIP_ERRVAR = 13
C_NCLIPPED = 14
C_NKEPT = 15
C_SUMW = 16
N_COLUMNS = 17

WEIGHT_NONE = 0
WEIGHT_MULTIPLICATIVE = 1
WEIGHT_INVERSE_VARIANCE = 2

ERROR_DEFAULT = 0
ERROR_INPUT_VARIANCE = 1
ERROR_MOSAIC = 2


def _batcher_pairs(n):
    """Comparators of Batcher's odd-even merge sorting network for ``n`` (a power of two) keys."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


#: largest sample count sorted by a network (all selected samples finite)
NETWORK_MAX = 32
_NET_SIZES = (2, 4, 8, 16, 32)
_NETWORKS = [np.array(_batcher_pairs(n), dtype=np.int64).reshape(-1, 2) for n in _NET_SIZES]
_NET_PAIRS = np.concatenate(_NETWORKS)
_NET_START = np.cumsum([0] + [len(a) for a in _NETWORKS])[:-1].astype(np.int64)
_NET_STOP = np.cumsum([len(a) for a in _NETWORKS]).astype(np.int64)


@njit(cache=True, nogil=True)
def _less(xa, wa, va, ma, xb, wb, vb, mb):
    """Total order on samples: value first (NaN last), then weight, variance, mask."""
    if xa != xb:
        if math.isnan(xa):
            return False
        if math.isnan(xb):
            return True
        return xa < xb
    if wa != wb:
        if math.isnan(wa):
            return False
        if math.isnan(wb):
            return True
        return wa < wb
    if va != vb:
        if math.isnan(va):
            return False
        if math.isnan(vb):
            return True
        return va < vb
    return ma < mb


@njit(cache=True, nogil=True)
def _tie_less(ia, ib, ws, vs, ms):
    """Order of two samples with equal values: by weight, then variance, then mask."""
    if ws[ia] != ws[ib]:
        return ws[ia] < ws[ib]
    if vs[ia] != vs[ib]:
        return vs[ia] < vs[ib]
    return ms[ia] < ms[ib]


@njit(cache=True, nogil=True)
def _network_sort(xs, ws, vs, ms, n, keys, idx_unused, tw, tv, tm):
    """Sort ``n <= NETWORK_MAX`` float32-exact finite samples by value, ties by (w, v, m).

    Each value is packed with its buffer position into a uint64 key (order bits of the float32
    value above, position below) and the keys go through a padded sorting network of branch-free
    min/max; runs of equal values are then put in (weight, variance, mask) order.
    """
    size = 2
    net = 0
    while size < n:
        size *= 2
        net += 1
    f32 = tm.view(np.float32)
    for i in range(n):
        f32[i] = xs[i]
    for i in range(n):
        b = np.uint64(tm[i])
        if b >> np.uint64(31):
            b = (~b) & np.uint64(0xFFFFFFFF)
        else:
            b = b | np.uint64(0x80000000)
        keys[i] = (b << np.uint64(32)) | np.uint64(i)
    for i in range(n, size):
        keys[i] = np.uint64(0xFFFFFFFFFFFFFFFF)
    for c in range(_NET_START[net], _NET_STOP[net]):
        i = _NET_PAIRS[c, 0]
        j = _NET_PAIRS[c, 1]
        a = keys[i]
        b = keys[j]
        keys[i] = min(a, b)
        keys[j] = max(a, b)
    low = np.uint64(0xFFFFFFFF)
    for i in range(n):
        k = np.int64(keys[i] & low)
        tw[i] = xs[k]
    for i in range(n):
        xs[i] = tw[i]
    for i in range(n):
        k = np.int64(keys[i] & low)
        tw[i] = ws[k]
        tv[i] = vs[k]
        tm[i] = ms[k]
    for i in range(n):
        ws[i] = tw[i]
        vs[i] = tv[i]
        ms[i] = tm[i]
    # equal values: order by the rest of the sample so the result is independent of input order
    i = 0
    while i < n - 1:
        if xs[i] != xs[i + 1]:
            i += 1
            continue
        e = i + 1
        while e < n and xs[e] == xs[i]:
            e += 1
        for a in range(i + 1, e):
            w, v, m = ws[a], vs[a], ms[a]
            b = a - 1
            while b >= i and (w < ws[b] or (w == ws[b] and (v < vs[b] or (v == vs[b] and m < ms[b])))):
                ws[b + 1] = ws[b]
                vs[b + 1] = vs[b]
                ms[b + 1] = ms[b]
                b -= 1
            ws[b + 1] = w
            vs[b + 1] = v
            ms[b + 1] = m
        i = e


@njit(cache=True, nogil=True)
def _order_samples(xs, ws, vs, ms, n, network_ok, keys, scratch_i, scratch_f, scratch_m):
    """Sort the first ``n`` entries of the four buffers together by value (ties by the rest)."""
    if network_ok and n <= NETWORK_MAX:
        _network_sort(xs, ws, vs, ms, n, keys, scratch_i, scratch_f[0], scratch_f[1], scratch_m)
        return
    if n <= EXACT_ORDER_MAX:
        for i in range(1, n):
            x, w, v, m = xs[i], ws[i], vs[i], ms[i]
            j = i - 1
            while j >= 0 and _less(x, w, v, m, xs[j], ws[j], vs[j], ms[j]):
                xs[j + 1] = xs[j]
                ws[j + 1] = ws[j]
                vs[j + 1] = vs[j]
                ms[j + 1] = ms[j]
                j -= 1
            xs[j + 1] = x
            ws[j + 1] = w
            vs[j + 1] = v
            ms[j + 1] = m
        return
    order = np.argsort(xs[:n], kind="mergesort")
    tx = xs[:n][order]
    tw = ws[:n][order]
    tv = vs[:n][order]
    tm = ms[:n][order]
    xs[:n] = tx
    ws[:n] = tw
    vs[:n] = tv
    ms[:n] = tm


@njit(cache=True, nogil=True)
def make_scratch(k):
    """Scratch buffers for :func:`reduce_one` with up to ``k`` samples."""
    size = max(k, NETWORK_MAX)
    return (
        np.empty(size, dtype=np.float64),
        np.empty(size, dtype=np.float64),
        np.empty(size, dtype=np.float64),
        np.empty(size, dtype=np.uint32),
        np.empty(size, dtype=np.int64),
        np.empty((2, size), dtype=np.float64),
        np.empty(size, dtype=np.uint32),
        np.empty(size, dtype=np.uint64),
    )


@njit(cache=True, nogil=True)
def _moments(xs, ws, vs, a, b, error_mode):
    """Weighted moments of the samples ``a:b`` of the buffers.

    Returns ``(count, S1, S2, mean, variance, error variance of the mean, weighted sum)``.
    """
    s1 = 0.0
    s2 = 0.0
    swx = 0.0
    swv = 0.0
    sw2v = 0.0
    for i in range(a, b):
        w = ws[i]
        s1 += w
        s2 += w * w
        swx += w * xs[i]
        swv += w * vs[i]
        sw2v += w * w * vs[i]
    cnt = b - a
    mean = swx / s1 if s1 != 0.0 else np.nan
    m2 = 0.0
    for i in range(a, b):
        d = xs[i] - mean
        m2 += ws[i] * d * d
    denom = s1 * s1 - s2
    var = m2 * s1 / denom if denom != 0.0 else np.nan
    if cnt <= 0:
        mean = np.nan
        var = np.nan
    if error_mode == ERROR_INPUT_VARIANCE:
        errvar = sw2v / (s1 * s1) if s1 != 0.0 else np.nan
    elif error_mode == ERROR_MOSAIC:
        errvar = swv / s1 if s1 != 0.0 else np.nan
    else:
        errvar = var * s2 / (s1 * s1) if s1 != 0.0 else np.nan
    return cnt, s1, s2, mean, var, errvar, swx


@njit(cache=True, nogil=True)
def quantile_sorted(s, lo, hi, f):
    """numpy "linear" quantile ``f`` of the sorted finite values ``s[lo:hi]`` (NaN when empty)."""
    n = hi - lo
    if n <= 0:
        return np.nan
    if n == 1:
        return s[lo]
    t = f * (n - 1)
    j = int(math.floor(t))
    if j >= n - 1:
        return s[hi - 1]
    g = t - j
    a = s[lo + j]
    b = s[lo + j + 1]
    # numpy's lerp: exact at both ends, monotone in g
    d = b - a
    if g >= 0.5:
        return b - d * (1.0 - g)
    return a + d * g


@njit(cache=True, nogil=True)
def reduce_one(
    x, m, v, w, and_mask, nan_safe, weight_mode, error_mode, num_sigma, num_iter, do_quantiles, do_clip,
    prop_bits, prop_thr, scratch, rejected, out,
):
    """Reduce one sample set (1-D ``x``, ``m``, ``v``, ``w``) into ``out[C_*]``; returns ORMASK.

    ``scratch`` comes from :func:`make_scratch` (for at least len(x) samples), ``rejected`` holds
    one float per propagated bit.
    """
    xs, ws, vs, ms, s_idx, s_f, s_m, s_keys = scratch
    network_ok = True
    k = x.shape[0]
    nprop = prop_bits.shape[0]
    andm = np.uint32(and_mask)
    for b in range(nprop):
        rejected[b] = 0.0
    n = 0
    orm = np.uint32(0)
    for i in range(k):
        xi = np.float64(x[i])
        mi = np.uint32(m[i])
        vi = np.float64(v[i])
        if weight_mode == WEIGHT_INVERSE_VARIANCE:
            if not (vi > 0.0):
                continue
            wi = 1.0 / vi
        elif weight_mode == WEIGHT_MULTIPLICATIVE:
            wi = np.float64(w[i])
        else:
            wi = 1.0
        if (mi & andm) != 0 or (nan_safe and not math.isfinite(xi)):
            for b in range(nprop):
                if (mi & prop_bits[b]) != 0:
                    rejected[b] += wi
            continue
        if not math.isfinite(xi) or np.float64(np.float32(xi)) != xi:
            network_ok = False
        xs[n] = xi
        ws[n] = wi
        vs[n] = vi
        ms[n] = mi
        orm |= mi
        n += 1
    _order_samples(xs, ws, vs, ms, n, network_ok, s_keys, s_idx, s_f, s_m)

    cnt, s1, s2, mean, var, errvar, swx = _moments(xs, ws, vs, 0, n, error_mode)
    for b in range(nprop):
        total = s1 + rejected[b]
        if total != 0.0 and rejected[b] / total > prop_thr[b]:
            orm |= prop_bits[b]
    out[C_NPOINT] = n
    out[C_NMASKED] = k - n
    out[C_MEAN] = mean
    out[C_VARIANCE] = var
    out[C_MEAN_ERRVAR] = errvar
    out[C_SUM] = swx
    out[C_SUMW] = s1
    # sorted: min is the first entry, max the last one that is not NaN (NaN compares false)
    top = n - 1
    while top >= 0 and math.isnan(xs[top]):
        top -= 1
    out[C_MIN] = xs[0] if top >= 0 else np.nan
    out[C_MAX] = xs[top] if top >= 0 else np.nan
    out[C_MEDIAN] = np.nan
    out[C_Q25] = np.nan
    out[C_Q75] = np.nan
    out[C_MEANCLIP] = np.nan
    out[C_VARCLIP] = np.nan
    out[C_MEANCLIP_ERRVAR] = np.nan
    out[C_NCLIPPED] = 0
    out[C_NKEPT] = n
    if not (do_quantiles or do_clip):
        return orm
    # finite selected samples form the contiguous run [lo, hi) of the sorted buffer
    lo = 0
    while lo < n and not math.isfinite(xs[lo]) and xs[lo] < 0:
        lo += 1
    hi = lo
    while hi < n and math.isfinite(xs[hi]):
        hi += 1
    med = quantile_sorted(xs, lo, hi, 0.5)
    q25 = quantile_sorted(xs, lo, hi, 0.25)
    q75 = quantile_sorted(xs, lo, hi, 0.75)
    out[C_MEDIAN] = med
    out[C_Q25] = q25
    out[C_Q75] = q75
    if not do_clip:
        return orm
    iqr = q75 - q25
    cmean = np.nan
    cvar = np.nan
    cerr = np.nan
    kept = 0
    for p in range(num_iter):
        centre = med if p == 0 else cmean
        width = clip_width(p, n, iqr, cvar, num_sigma, centre)
        if math.isnan(centre) or math.isnan(width):
            out[C_NCLIPPED] = n
            out[C_NKEPT] = 0
            return orm
        # sorted values: the kept samples |x - centre| <= width are a contiguous run of [lo, hi)
        a = lo
        while a < hi and not (abs(xs[a] - centre) <= width):
            a += 1
        b = hi
        while b > a and not (abs(xs[b - 1] - centre) <= width):
            b -= 1
        kept, _s1, _s2, cmean, cvar, cerr, _swx = _moments(xs, ws, vs, a, b, error_mode)
    out[C_MEANCLIP] = cmean
    out[C_VARCLIP] = cvar
    out[C_MEANCLIP_ERRVAR] = cerr
    out[C_NCLIPPED] = n - kept
    out[C_NKEPT] = kept
    return orm


@njit(cache=True, nogil=True)
def reduce_rows(
    x, m, v, w, and_mask, nan_safe, weight_mode, error_mode, num_sigma, num_iter, do_quantiles, do_clip,
    prop_bits, prop_thr, out, ormask,
):
    """Reduce every row of ``x`` (shape ``(n_sets, n_samples)``) into ``out[row, C_*]``.

    ``m`` (uint32), ``v`` and ``w`` have the shape of ``x`` (broadcast views are fine). ``out`` is a
    float64 ``(n_sets, N_COLUMNS)`` table, ``ormask`` a uint32 ``(n_sets,)`` vector. ``prop_bits``
    (uint32) and ``prop_thr`` (float64) list the bits with a propagation threshold.
    """
    n_sets, k = x.shape
    scratch = make_scratch(k)
    rejected = np.zeros(prop_bits.shape[0], dtype=np.float64)
    for r in range(n_sets):
        ormask[r] = reduce_one(
            x[r], m[r], v[r], w[r], and_mask, nan_safe, weight_mode, error_mode, num_sigma, num_iter,
            do_quantiles, do_clip, prop_bits, prop_thr, scratch, rejected, out[r],
        )


# ---------------------------------------------------------------------------------------------
# fast path: unweighted, NaN-safe rows with the error of the mean from the scatter
#
# The selected samples are gathered once into a contiguous buffer (in their own dtype); the
# quartiles come from in-place selection instead of a sort, and every moment is a pass over the
# buffer. Counts, quantiles, clip decisions and masks are those of the general path; sums are
# formed in a fixed order given by the samples' positions, so they may differ from the sorted-
# order sums of the general path in the last bits.

#: rows longer than this (unweighted, NaN-safe, default error) take the fast path
FAST_MIN_SAMPLES = EXACT_ORDER_MAX


@njit(cache=True, nogil=True)
def _insertion_sort(a, lo, hi):
    for i in range(lo + 1, hi):
        x = a[i]
        j = i - 1
        while j >= lo and x < a[j]:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = x


@njit(cache=True, nogil=True)
def select_inplace(a, lo, hi, k):
    """Reorder the finite values ``a[lo:hi]`` so that ``a[k]`` holds the one of rank ``k - lo``.

    Afterwards ``a[lo:k] <= a[k] <= a[k+1:hi]``. Hoare partitions around a median of three; a
    range that does not shrink fast enough is finished by insertion sort or a full sort.
    """
    left = lo
    right = hi - 1
    budget = 8
    n = hi - lo
    while n > 1:
        budget += 2
        n >>= 1
    while right > left:
        if right - left < 16:
            _insertion_sort(a, left, right + 1)
            return
        if budget == 0:
            a[left : right + 1].sort()
            return
        budget -= 1
        mid = (left + right) >> 1
        if a[mid] < a[left]:
            a[mid], a[left] = a[left], a[mid]
        if a[right] < a[left]:
            a[right], a[left] = a[left], a[right]
        if a[right] < a[mid]:
            a[right], a[mid] = a[mid], a[right]
        pivot = a[mid]
        i = left
        j = right
        while i <= j:
            while a[i] < pivot:
                i += 1
            while pivot < a[j]:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            right = j
        elif k >= i:
            left = i
        else:
            return


@njit(cache=True, nogil=True)
def _min_of(a, lo, hi):
    v = a[lo]
    for i in range(lo + 1, hi):
        v = min(v, a[i])
    return v


@njit(cache=True, nogil=True)
def _lerp(a, b, g):
    d = b - a
    if g >= 0.5:
        return b - d * (1.0 - g)
    return a + d * g


@njit(cache=True, nogil=True)
def _quantile_at(a, n, f, lo, hi, end):
    """numpy "linear" quantile ``f`` of ``a[:n]`` by selection inside ``a[lo:hi]``.

    ``a`` must already be partitioned so that the two ranks needed lie in ``[lo, hi)`` and the
    upper one is the smallest value of ``a[j + 1:end]`` once rank ``j`` is in place.
    Returns ``(quantile, j)``.
    """
    t = f * (n - 1)
    j = int(math.floor(t))
    g = t - j
    select_inplace(a, lo, hi, j)
    lower = np.float64(a[j])
    if g == 0.0:
        # what the sorted path's lerp gives for a zero fraction: lower + (upper - lower) * 0
        return lower + 0.0, j
    return _lerp(lower, np.float64(_min_of(a, j + 1, end)), g), j


@njit(cache=True, nogil=True)
def quartiles_select(a, n):
    """``(q25, median, q75)`` (numpy "linear") of the finite values ``a[:n]``, reordering ``a``."""
    if n <= 0:
        return np.nan, np.nan, np.nan
    if n == 1:
        x = np.float64(a[0])
        return x, x, x
    med, jm = _quantile_at(a, n, 0.5, 0, n, n)
    # ranks >= jm now lie in [jm, n) and ranks < jm in [0, jm); the upper quartile goes first so
    # that the smallest jm values stay in [0, jm) for the lower one
    q75, _ = _quantile_at(a, n, 0.75, jm, n, n)
    j25 = int(math.floor(0.25 * (n - 1)))
    if j25 + 1 < jm:
        q25, _ = _quantile_at(a, n, 0.25, 0, jm, jm)
    else:
        q25, _ = _quantile_at(a, n, 0.25, 0, jm + 1, n)
    return q25, med, q75


#: longest systematic sample, most bins and sample-rank margin (per 256 sampled values) of
#: :func:`quartiles_hist`
HIST_SAMPLE = 256
HIST_BINS = 2048
HIST_MARGIN = 28
#: sets smaller than this are reduced by :func:`quartiles_select` instead
HIST_MIN_SAMPLES = 128


@njit(cache=True, nogil=True)
def make_hist_scratch(size, dtype):
    """Scratch buffers ``(sample, hist, bins, slots, cand)`` of :func:`quartiles_hist` for up to
    ``size`` values of ``dtype``."""
    slots = np.full(HIST_BINS + 2, -1, dtype=np.int64)
    hist = np.zeros(HIST_BINS + 2, dtype=np.int64)
    m = max(size, 1)
    return (np.empty(HIST_SAMPLE, dtype=np.float64), hist, np.empty(m, dtype=np.uint16), slots,
            np.empty(m, dtype=dtype))


@njit(cache=True, nogil=True)
def _all_equal(a):
    for i in range(1, a.shape[0]):
        if a[i] != a[0]:
            return False
    return True


@njit(cache=True, nogil=True)
def _copy_select(a, n, cand):
    for i in range(n):
        cand[i] = a[i]
    return quartiles_select(cand, n)


@njit(cache=True, nogil=True)
def quartiles_hist(a, n, sample, hist, bins, slots, cand):
    """``(q25, median, q75)`` (numpy "linear") of the finite values ``a[:n]`` by histogram selection.

    Two order statistics of a systematic sample of about ``n / 16`` values (64 to ``len(sample)``)
    bracket the quartiles; one pass puts every value in one of about ``n / 8`` equal bins over the
    bracket (64 to ``len(hist) - 2``; plus one bin below and one above), remembers its bin in
    ``bins`` and counts the bins; a second pass copies the values of the few bins holding the six
    wanted ranks into ``cand``, where they are sorted. The bin index is monotone in the value, so
    the ranks are exact. Sets of fewer than ``HIST_MIN_SAMPLES`` values, and brackets too narrow or
    too wide for a finite bin scale, are reduced by selection in a copy instead.
    Scratch (see :func:`make_hist_scratch`): ``sample`` float64; ``hist`` and ``slots`` int64 of
    equal length <= 65537, ``slots`` all -1 on entry and left so; ``bins`` uint16 and ``cand``
    (``a``'s dtype) of length >= n. ``a`` is not modified.
    """
    if n < HIST_MIN_SAMPLES:
        return _copy_select(a, n, cand)
    s = min(max(n // 16, 64), sample.shape[0])
    for i in range(s):
        sample[i] = np.float64(a[(i * n) // s])
    margin = (s * HIST_MARGIN) // 256
    klo = s // 4 - margin
    khi = (3 * s) // 4 + margin
    select_inplace(sample, 0, s, khi)
    hi = sample[khi]
    select_inplace(sample, 0, khi, klo)
    lo = sample[klo]
    nb = min(max(n // 8, 64), hist.shape[0] - 2)
    scale = nb / (hi - lo) if hi > lo else np.inf
    if not math.isfinite(scale) or not math.isfinite(lo * scale):
        return _copy_select(a, n, cand)
    top = np.float64(nb)
    for i in range(n):
        t = (np.float64(a[i]) - lo) * scale
        t = min(max(t, -1.0), top)
        bins[i] = np.uint16(np.int64(t + 1.0))
    for b in range(nb + 2):
        hist[b] = 0
    for i in range(n):
        hist[bins[i]] += 1
    # cumulative counts: hist[b] = number of values in bins <= b
    for b in range(1, nb + 2):
        hist[b] += hist[b - 1]
    ranks = np.empty(6, dtype=np.int64)
    fr = np.empty(3, dtype=np.float64)
    for q in range(3):
        t = (0.25 * (q + 1)) * (n - 1)
        j = int(math.floor(t))
        fr[q] = t - j
        ranks[2 * q] = j
        ranks[2 * q + 1] = min(j + 1, n - 1)
    cum = hist[: nb + 2]
    rbin = np.empty(6, dtype=np.int64)
    sbin = np.empty(6, dtype=np.int64)
    nslot = 0
    for r in range(6):
        b = np.searchsorted(cum, ranks[r], side="right")
        rbin[r] = b
        if slots[b] < 0:
            slots[b] = nslot
            sbin[nslot] = b
            nslot += 1
    start = np.empty(nslot + 1, dtype=np.int64)
    fill = np.empty(nslot, dtype=np.int64)
    start[0] = 0
    for k in range(nslot):
        b = sbin[k]
        start[k + 1] = start[k] + hist[b] - (hist[b - 1] if b > 0 else 0)
        fill[k] = start[k]
    for i in range(n):
        k = slots[bins[i]]
        if k >= 0:
            cand[fill[k]] = a[i]
            fill[k] += 1
    for k in range(nslot):
        seg = cand[start[k] : start[k + 1]]
        if seg.shape[0] > 1:
            if seg.shape[0] <= 16:
                _insertion_sort(seg, 0, seg.shape[0])
            elif not _all_equal(seg):
                seg.sort()
    res = np.empty(3, dtype=np.float64)
    for q in range(3):
        vals = np.empty(2, dtype=np.float64)
        for u in range(2):
            b = rbin[2 * q + u]
            before = hist[b - 1] if b > 0 else 0
            vals[u] = np.float64(cand[start[slots[b]] + ranks[2 * q + u] - before])
        if fr[q] == 0.0:
            res[q] = vals[0] + 0.0
        else:
            res[q] = _lerp(vals[0], vals[1], fr[q])
    for k in range(nslot):
        slots[sbin[k]] = -1
    return res[0], res[1], res[2]


# Sums over a gathered buffer may be reassociated so that they run as SIMD lanes: their order is
# then fixed by the buffer order and the vector width of the machine's code.


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _kept_sum(a, n, centre, width):
    """Count and sum of ``a[:n]`` with ``|a - centre| <= width``."""
    cnt = 0
    s = 0.0
    for i in range(n):
        x = np.float64(a[i])
        keep = abs(x - centre) <= width
        s += x if keep else 0.0
        cnt += np.int64(keep)
    return cnt, s


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _kept_m2(a, n, centre, width, mean):
    """Sum of ``(a - mean)**2`` over ``a[:n]`` with ``|a - centre| <= width``."""
    s = 0.0
    for i in range(n):
        x = np.float64(a[i])
        d = x - mean
        s += d * d if abs(x - centre) <= width else 0.0
    return s


@njit(cache=True, nogil=True)
def _unit_moments(a, n, centre, width):
    """``(count, mean, variance, error variance of the mean, sum)`` of the kept unit-weight samples,
    with the formulas of :func:`_moments` for ``w = 1``."""
    cnt, swx = _kept_sum(a, n, centre, width)
    s1 = np.float64(cnt)
    mean = swx / s1 if s1 != 0.0 else np.nan
    m2 = _kept_m2(a, n, centre, width, mean) if cnt > 0 else 0.0
    denom = s1 * s1 - s1
    var = m2 * s1 / denom if denom != 0.0 else np.nan
    if cnt <= 0:
        mean = np.nan
        var = np.nan
    errvar = var * s1 / (s1 * s1) if s1 != 0.0 else np.nan
    return cnt, mean, var, errvar, swx


@njit(cache=True, nogil=True)
def reduce_gathered(
    a, n, total, orm, lo, hi, rejected, num_sigma, num_iter, do_quantiles, do_clip, prop_bits, prop_thr, hs, out
):
    """The statistics of :func:`reduce_one` for ``n`` gathered unit-weight finite samples ``a[:n]``.

    ``total`` counts every sample of the set, ``orm`` is the OR of the selected samples' masks,
    ``lo``/``hi`` their minimum and maximum,
    ``rejected[b]`` the number of excluded samples with ``prop_bits[b]``; ``hs`` comes from
    :func:`make_hist_scratch`. Returns ORMASK.
    """
    cnt, mean, var, errvar, swx = _unit_moments(a, n, 0.0, np.inf)
    s1 = np.float64(n)
    for b in range(prop_bits.shape[0]):
        tot = s1 + rejected[b]
        if tot != 0.0 and rejected[b] / tot > prop_thr[b]:
            orm |= prop_bits[b]
    out[C_NPOINT] = n
    out[C_NMASKED] = total - n
    out[C_MEAN] = mean
    out[C_VARIANCE] = var
    out[C_MEAN_ERRVAR] = errvar
    out[C_SUM] = swx
    out[C_SUMW] = s1
    out[C_MIN] = lo if n > 0 else np.nan
    out[C_MAX] = hi if n > 0 else np.nan
    out[C_MEDIAN] = np.nan
    out[C_Q25] = np.nan
    out[C_Q75] = np.nan
    out[C_MEANCLIP] = np.nan
    out[C_VARCLIP] = np.nan
    out[C_MEANCLIP_ERRVAR] = np.nan
    out[C_NCLIPPED] = 0
    out[C_NKEPT] = n
    if not (do_quantiles or do_clip):
        return orm
    sample, hist, bins, slots, cand = hs
    q25, med, q75 = quartiles_hist(a, n, sample, hist, bins, slots, cand)
    out[C_MEDIAN] = med
    out[C_Q25] = q25
    out[C_Q75] = q75
    if not do_clip:
        return orm
    iqr = q75 - q25
    cmean = np.nan
    cvar = np.nan
    cerr = np.nan
    kept = 0
    for p in range(num_iter):
        centre = med if p == 0 else cmean
        width = clip_width(p, n, iqr, cvar, num_sigma, centre)
        if math.isnan(centre) or math.isnan(width):
            out[C_NCLIPPED] = n
            out[C_NKEPT] = 0
            return orm
        kept, cmean, cvar, cerr, _swx = _unit_moments(a, n, centre, width)
    out[C_MEANCLIP] = cmean
    out[C_VARCLIP] = cvar
    out[C_MEANCLIP_ERRVAR] = cerr
    out[C_NCLIPPED] = n - kept
    out[C_NKEPT] = kept
    return orm


@njit(cache=True, nogil=True)
def _gather_row(x, m, and_mask, prop_bits, buf, rejected):
    """Selected finite samples of the 1-D ``x`` into ``buf``; returns ``(n, ormask, min, max)``."""
    andm = np.uint32(and_mask)
    nprop = prop_bits.shape[0]
    for b in range(nprop):
        rejected[b] = 0.0
    n = 0
    orm = np.uint32(0)
    lo = np.inf
    hi = -np.inf
    for i in range(x.shape[0]):
        xi = x[i]
        mi = np.uint32(m[i])
        good = ((mi & andm) == 0) & math.isfinite(xi)
        buf[n] = xi
        n += np.int64(good)
        orm |= mi if good else np.uint32(0)
        xf = np.float64(xi)
        lo = xf if (good & (xf < lo)) else lo
        hi = xf if (good & (xf > hi)) else hi
        if nprop and not good:
            for b in range(nprop):
                if (mi & prop_bits[b]) != 0:
                    rejected[b] += 1.0
    return n, orm, lo, hi


@njit(cache=True, nogil=True)
def reduce_cells(
    image, mask, yedges, xedges, and_mask, num_sigma, num_iter, do_quantiles, do_clip, prop_bits, prop_thr,
    out, ormask,
):
    """Unit-weight NaN-safe statistics of every cell of a 2-D block.

    Cell ``(i, j)`` covers rows ``yedges[i]:yedges[i+1]`` and columns ``xedges[j]:xedges[j+1]`` of
    ``image``/``mask``; its results go to row ``i * (len(xedges) - 1) + j`` of ``out``
    (``N_COLUMNS`` wide) and ``ormask``. Equivalent to :func:`reduce_rows` (fast path) on the
    cells' pixels in row-major order.
    """
    ncy = yedges.shape[0] - 1
    ncx = xedges.shape[0] - 1
    size = 1
    for i in range(ncy):
        for j in range(ncx):
            size = max(size, (yedges[i + 1] - yedges[i]) * (xedges[j + 1] - xedges[j]))
    buf = np.empty(size, dtype=image.dtype)
    hs = make_hist_scratch(size, image.dtype)
    andm = np.uint32(and_mask)
    nprop = prop_bits.shape[0]
    rejected = np.zeros(nprop, dtype=np.float64)
    for i in range(ncy):
        for j in range(ncx):
            for b in range(nprop):
                rejected[b] = 0.0
            n = 0
            orm = np.uint32(0)
            lo = np.inf
            hi = -np.inf
            for r in range(yedges[i], yedges[i + 1]):
                for c in range(xedges[j], xedges[j + 1]):
                    xi = image[r, c]
                    mi = np.uint32(mask[r, c])
                    good = ((mi & andm) == 0) & math.isfinite(xi)
                    buf[n] = xi
                    n += np.int64(good)
                    orm |= mi if good else np.uint32(0)
                    xf = np.float64(xi)
                    lo = xf if (good & (xf < lo)) else lo
                    hi = xf if (good & (xf > hi)) else hi
                    if nprop and not good:
                        for b in range(nprop):
                            if (mi & prop_bits[b]) != 0:
                                rejected[b] += 1.0
            total = (yedges[i + 1] - yedges[i]) * (xedges[j + 1] - xedges[j])
            row = i * ncx + j
            ormask[row] = reduce_gathered(
                buf, n, total, orm, lo, hi, rejected, num_sigma, num_iter, do_quantiles, do_clip, prop_bits, prop_thr, hs,
                out[row],
            )


@njit(cache=True, nogil=True)
def reduce_rows_unit(x, m, and_mask, num_sigma, num_iter, do_quantiles, do_clip, prop_bits, prop_thr, out, ormask):
    """Fast path of :func:`reduce_rows` for unit weights, NaN-safe selection and the default error.

    ``x`` is a float32 or float64 ``(n_sets, n_samples)`` array, ``m`` uint32 of the same shape.
    """
    n_sets, k = x.shape
    buf = np.empty(k, dtype=x.dtype)
    hs = make_hist_scratch(k, x.dtype)
    rejected = np.zeros(prop_bits.shape[0], dtype=np.float64)
    for r in range(n_sets):
        n, orm, lo, hi = _gather_row(x[r], m[r], and_mask, prop_bits, buf, rejected)
        ormask[r] = reduce_gathered(
            buf, n, k, orm, lo, hi, rejected, num_sigma, num_iter, do_quantiles, do_clip, prop_bits, prop_thr, hs, out[r]
        )


STACK_MEAN = 0
STACK_MEANCLIP = 1
STACK_MEDIAN = 2


def network_pairs(n):
    """Comparator pairs (int64, shape (m, 2)) of a sorting network for ``n`` keys (padded to 2^p)."""
    size = 1
    while size < n:
        size *= 2
    return np.array(_batcher_pairs(size), dtype=np.int64).reshape(-1, 2)


@njit(cache=True, nogil=True)
def _row_moments(X, W, V, G, nk, nx, centre, width, error_mode, mean, var, errvar, cnt, s1, s2, a1, a2, a3):
    """Per-pixel weighted moments over planes with ``G`` set and ``|X - centre| <= width``."""
    for j in range(nx):
        s1[j] = 0.0
        s2[j] = 0.0
        a1[j] = 0.0
        a2[j] = 0.0
        a3[j] = 0.0
        cnt[j] = 0
    for k in range(nk):
        for j in range(nx):
            keep = G[k, j] & (abs(X[k, j] - centre[j]) <= width[j])
            w = W[k, j] if keep else 0.0
            x = X[k, j]
            v = V[k, j] if keep else 0.0
            s1[j] += w
            s2[j] += w * w
            a1[j] += w * x
            a2[j] += w * w * v
            a3[j] += w * v
            cnt[j] += np.int64(keep)
    for j in range(nx):
        mean[j] = a1[j] / s1[j] if (cnt[j] > 0 and s1[j] != 0.0) else np.nan
        a1[j] = 0.0
    for k in range(nk):
        for j in range(nx):
            keep = G[k, j] & (abs(X[k, j] - centre[j]) <= width[j])
            d = X[k, j] - mean[j]
            a1[j] += W[k, j] * d * d if keep else 0.0
    for j in range(nx):
        if cnt[j] == 0 or s1[j] == 0.0:
            var[j] = np.nan
            errvar[j] = np.nan
            continue
        denom = s1[j] * s1[j] - s2[j]
        var[j] = a1[j] * s1[j] / denom if denom != 0.0 else np.nan
        if error_mode == ERROR_INPUT_VARIANCE:
            errvar[j] = a2[j] / (s1[j] * s1[j])
        elif error_mode == ERROR_MOSAIC:
            errvar[j] = a3[j] / s1[j]
        else:
            errvar[j] = var[j] * s2[j] / (s1[j] * s1[j])


@njit(cache=True, nogil=True)
def _row_moments_shifted(X, W, V, G, nk, nx, centre, width, error_mode, mean, var, errvar, cnt, s1, s2, a1, a2, a3, q1):
    """:func:`_row_moments` in one pass over the planes, for clip passes.

    The second moment is accumulated about the clip centre ``c`` and moved to the mean:
    ``sum w (x - mean)^2 = sum w (x - c)^2 - S1 (mean - c)^2``; kept samples lie within the clip
    width of ``c``, so the shift costs no precision worth noting.
    """
    for j in range(nx):
        s1[j] = 0.0
        s2[j] = 0.0
        a1[j] = 0.0
        a2[j] = 0.0
        a3[j] = 0.0
        q1[j] = 0.0
        cnt[j] = 0
    for k in range(nk):
        for j in range(nx):
            d = X[k, j] - centre[j]
            keep = G[k, j] & (abs(d) <= width[j])
            w = W[k, j] if keep else 0.0
            v = V[k, j] if keep else 0.0
            s1[j] += w
            s2[j] += w * w
            a1[j] += w * X[k, j]
            q1[j] += w * d * d if keep else 0.0
            a2[j] += w * w * v
            a3[j] += w * v
            cnt[j] += np.int64(keep)
    for j in range(nx):
        if cnt[j] == 0 or s1[j] == 0.0:
            mean[j] = np.nan
            var[j] = np.nan
            errvar[j] = np.nan
            continue
        mean[j] = a1[j] / s1[j]
        off = mean[j] - centre[j]
        m2 = max(q1[j] - s1[j] * off * off, 0.0)
        denom = s1[j] * s1[j] - s2[j]
        var[j] = m2 * s1[j] / denom if denom != 0.0 else np.nan
        if error_mode == ERROR_INPUT_VARIANCE:
            errvar[j] = a2[j] / (s1[j] * s1[j])
        elif error_mode == ERROR_MOSAIC:
            errvar[j] = a3[j] / s1[j]
        else:
            errvar[j] = var[j] * s2[j] / (s1[j] * s1[j])


@njit(cache=True, nogil=True)
def _column_quantile(Y, j, n, f):
    """numpy "linear" quantile of the sorted column ``Y[:n, j]``."""
    if n <= 0:
        return np.nan
    if n == 1:
        return np.float64(Y[0, j])
    t = f * (n - 1)
    q = int(math.floor(t))
    if q >= n - 1:
        return np.float64(Y[n - 1, j])
    g = t - q
    a = np.float64(Y[q, j])
    b = np.float64(Y[q + 1, j])
    d = b - a
    if g >= 0.5:
        return b - d * (1.0 - g)
    return a + d * g


@njit(cache=True, nogil=True)
def stack_pixels(
    image, variance, mask, weights, and_mask, weight_mode, error_mode, statistic, num_sigma, num_iter,
    prop_bits, prop_thr, no_data, clipped, map_from, map_to, pairs, out_image, out_variance, out_mask, out_n,
):
    """Per-pixel stack of ``(K, ny, nx)`` planes (section 3 of the statistics spec).

    ``weights`` has one entry per plane (used when ``weight_mode`` is multiplicative); ``pairs``
    is the sorting network of :func:`network_pairs` for K keys. Writes the statistic, the square
    of its error, the stacked mask (ORMASK with threshold-propagated bits, NO_DATA replacing it
    where nothing survives, ``clipped`` where a sample was clipped, the mask map where any sample
    was masked) and the count of planes without an and-mask bit.

    The work runs row by row with the pixels of a row as the inner (vectorisable) loop: sums run
    over the planes in their given order; the median and quartiles come from a sorting network
    applied to whole rows at once (excluded samples sort last as +inf).
    """
    nk, ny, nx = image.shape
    size = 1
    while size < nk:
        size *= 2
    X = np.empty((nk, nx), dtype=np.float64)
    W = np.empty((nk, nx), dtype=np.float64)
    V = np.empty((nk, nx), dtype=np.float64)
    G = np.empty((nk, nx), dtype=np.bool_)
    WR = np.empty(nx, dtype=np.float64)
    # the order statistics need only the input precision (float32 images sort twice as fast)
    Y = np.empty((size, nx), dtype=image.dtype)
    n = np.empty(nx, dtype=np.int64)
    n_unmasked = np.empty(nx, dtype=np.int64)
    orm = np.empty(nx, dtype=np.uint32)
    any_mask = np.empty(nx, dtype=np.uint32)
    nprop = prop_bits.shape[0]
    rejected = np.empty((max(nprop, 1), nx), dtype=np.float64)
    centre = np.empty(nx, dtype=np.float64)
    width = np.empty(nx, dtype=np.float64)
    iqr = np.empty(nx, dtype=np.float64)
    mean = np.empty(nx, dtype=np.float64)
    var = np.empty(nx, dtype=np.float64)
    errvar = np.empty(nx, dtype=np.float64)
    cnt = np.empty(nx, dtype=np.int64)
    s1 = np.empty(nx, dtype=np.float64)
    s2 = np.empty(nx, dtype=np.float64)
    a1 = np.empty(nx, dtype=np.float64)
    a2 = np.empty(nx, dtype=np.float64)
    a3 = np.empty(nx, dtype=np.float64)
    q1 = np.empty(nx, dtype=np.float64)
    andm = np.uint32(and_mask)
    nmap = map_from.shape[0]
    need_sort = statistic != STACK_MEAN
    for i in range(ny):
        for j in range(nx):
            n[j] = 0
            n_unmasked[j] = 0
            orm[j] = 0
            any_mask[j] = 0
            centre[j] = 0.0
            width[j] = np.inf
            s1[j] = 0.0
        for b in range(nprop):
            for j in range(nx):
                rejected[b, j] = 0.0
        for k in range(nk):
            wconst = np.float64(weights[k]) if weight_mode == WEIGHT_MULTIPLICATIVE else 1.0
            for j in range(nx):
                mk = np.uint32(mask[k, i, j])
                xk = np.float64(image[k, i, j])
                vk = np.float64(variance[k, i, j])
                any_mask[j] |= mk
                unmasked = (mk & andm) == 0
                n_unmasked[j] += np.int64(unmasked)
                if weight_mode == WEIGHT_INVERSE_VARIANCE:
                    wvalid = vk > 0.0
                    wk = 1.0 / vk if wvalid else 0.0
                else:
                    wvalid = True
                    wk = wconst
                good = unmasked & wvalid & math.isfinite(xk)
                G[k, j] = good
                WR[j] = wk
                X[k, j] = xk if good else 0.0
                W[k, j] = wk if good else 0.0
                V[k, j] = vk if good else 0.0
                Y[k, j] = xk if good else np.inf
                n[j] += np.int64(good)
                orm[j] |= mk if good else np.uint32(0)
                s1[j] += wk if good else 0.0
            for b in range(nprop):
                bit = prop_bits[b]
                for j in range(nx):
                    hit = (not G[k, j]) & ((np.uint32(mask[k, i, j]) & bit) != 0)
                    rejected[b, j] += WR[j] if hit else 0.0
        if need_sort:
            for k in range(nk, size):
                for j in range(nx):
                    Y[k, j] = np.inf
            for c in range(pairs.shape[0]):
                p = pairs[c, 0]
                q = pairs[c, 1]
                for j in range(nx):
                    lo = Y[p, j]
                    hi = Y[q, j]
                    Y[p, j] = min(lo, hi)
                    Y[q, j] = max(lo, hi)
        for j in range(nx):
            total_w = s1[j]
            for b in range(nprop):
                tot = total_w + rejected[b, j]
                if tot != 0.0 and rejected[b, j] / tot > prop_thr[b]:
                    orm[j] |= prop_bits[b]
        if statistic != STACK_MEANCLIP:
            # plain pass over all good samples: the mean, or the variance for the median error
            _row_moments(X, W, V, G, nk, nx, centre, width, error_mode, mean, var, errvar, cnt, s1, s2, a1, a2, a3)
        if statistic == STACK_MEDIAN:
            for j in range(nx):
                nj = n[j]
                out_image[i, j] = _column_quantile(Y, j, nj, 0.5)
                out_variance[i, j] = 0.5 * math.pi * var[j] / nj if nj > 0 else np.nan
        elif statistic == STACK_MEAN:
            for j in range(nx):
                out_image[i, j] = mean[j]
                out_variance[i, j] = errvar[j]
        else:
            for j in range(nx):
                nj = n[j]
                centre[j] = _column_quantile(Y, j, nj, 0.5)
                iqr[j] = _column_quantile(Y, j, nj, 0.75) - _column_quantile(Y, j, nj, 0.25)
            for it in range(num_iter):
                for j in range(nx):
                    if it > 0:
                        centre[j] = mean[j]
                    width[j] = clip_width(it, n[j], iqr[j], var[j], num_sigma, centre[j])
                _row_moments_shifted(
                    X, W, V, G, nk, nx, centre, width, error_mode, mean, var, errvar, cnt, s1, s2, a1, a2, a3, q1
                )
            for j in range(nx):
                out_image[i, j] = mean[j]
                out_variance[i, j] = errvar[j]
                if n[j] - cnt[j] > 0:
                    orm[j] |= np.uint32(clipped)
        for j in range(nx):
            m_out = orm[j]
            if n[j] == 0:
                m_out = np.uint32(no_data)
                out_image[i, j] = np.nan
                out_variance[i, j] = np.nan
            if nk - n[j] > 0:
                for p in range(nmap):
                    if (any_mask[j] & map_from[p]) != 0:
                        m_out |= map_to[p]
            out_mask[i, j] = m_out
            out_n[i, j] = n_unmasked[j]



@njit(cache=True, nogil=True)
def online_mean_pixels(
    image, variance, mask, weights, and_mask, prop_bits, prop_thr, map_from, map_to, no_data, from_input_variance,
    out_image, out_variance, out_mask, out_n,
):
    """Accumulated weighted mean of ``(K, ny, nx)`` planes (the reference's online mean stack).

    Inputs without an and-mask bit and with a finite image value are accumulated, planes in
    order; propagated bits count the weight of every input carrying them; the mask map applies
    where a mapped and-mask bit was seen; ``no_data`` is ORed where the summed weight is <= 0.
    """
    nk, ny, nx = image.shape
    nprop = prop_bits.shape[0]
    rejected = np.zeros(max(nprop, 1), dtype=np.float64)
    andm = np.uint32(and_mask)
    for i in range(ny):
        for j in range(nx):
            sw = 0.0
            swx = 0.0
            sw2v = 0.0
            sw2 = 0.0
            swx2 = 0.0
            orm = np.uint32(0)
            seen = np.uint32(0)
            n_unmasked = 0
            for b in range(nprop):
                rejected[b] = 0.0
            for k in range(nk):
                mk = np.uint32(mask[k, i, j])
                xk = np.float64(image[k, i, j])
                wk = np.float64(weights[k])
                if (mk & andm) == 0:
                    n_unmasked += 1
                    if math.isfinite(xk):
                        sw += wk
                        swx += wk * xk
                        sw2v += wk * wk * np.float64(variance[k, i, j])
                        sw2 += wk * wk
                        swx2 += wk * xk * xk
                        orm |= mk
                for b in range(nprop):
                    if (mk & prop_bits[b]) != 0:
                        rejected[b] += wk
                seen |= mk & andm
            mean = swx / sw if sw != 0.0 else np.nan
            if from_input_variance:
                errvar = sw2v / (sw * sw) if sw != 0.0 else np.nan
            else:
                denom = sw * sw - sw2
                if sw != 0.0 and denom != 0.0:
                    var = (swx2 / sw - mean * mean) * (sw * sw) / denom
                    errvar = var * sw2 / (sw * sw)
                else:
                    errvar = np.nan
            for b in range(nprop):
                total = sw + rejected[b]
                if total != 0.0 and rejected[b] / total > prop_thr[b]:
                    orm |= prop_bits[b]
            for p in range(map_from.shape[0]):
                if (seen & map_from[p]) != 0:
                    orm |= map_to[p]
            if not (sw > 0.0):
                orm |= np.uint32(no_data)
                mean = np.nan
                errvar = np.nan
            out_image[i, j] = mean
            out_variance[i, j] = errvar
            out_mask[i, j] = orm
            out_n[i, j] = n_unmasked


# ---------------------------------------------------------------------------------------------
# whole-array reductions in mergeable pieces (one call per chunk)

#: layout of a partial-moments vector (followed by one rejected weight per propagated bit)
P_N = 0
P_TOTAL = 1
P_S1 = 2
P_S2 = 3
P_MEAN = 4
P_M2 = 5
P_SW2V = 6
P_SWV = 7
P_SWX = 8
P_MIN = 9
P_MAX = 10
P_ORMASK = 11
P_FIXED = 12

#: digit widths of the radix selection, most significant first (they add up to 64 bits); small
#: digits keep every chunk's histogram small (at most 6 x 2048 counts)
RADIX_WIDTHS = (12, 11, 11, 10, 10, 10)
RADIX_LEVELS = len(RADIX_WIDTHS)


def radix_digit(level):
    """``(shift, bins, high)`` of a radix level: digit = (key >> shift) & (bins - 1); the digits
    above it are ``key >> high`` (``high`` = 64 at level 0, where there are none)."""
    above = sum(RADIX_WIDTHS[:level])
    width = RADIX_WIDTHS[level]
    return 64 - above - width, 1 << width, 64 - above


@njit(cache=True, nogil=True)
def _weight(vi, wi, weight_mode):
    if weight_mode == WEIGHT_INVERSE_VARIANCE:
        return 1.0 / vi
    if weight_mode == WEIGHT_MULTIPLICATIVE:
        return wi
    return 1.0


@njit(cache=True, nogil=True)
def partial_moments(x, m, v, w, and_mask, nan_safe, weight_mode, clip, centre, width, prop_bits, out):
    """Mergeable moments of the selected samples of 1-D ``x`` (clipped to ``|x-centre|<=width``).

    ``out`` has ``P_FIXED + len(prop_bits)`` entries; the mean and M2 are about the chunk's own
    weighted mean, to be merged with the parallel-variance formula.
    """
    andm = np.uint32(and_mask)
    n = 0
    s1 = 0.0
    s2 = 0.0
    swx = 0.0
    swv = 0.0
    sw2v = 0.0
    lo = np.inf
    hi = -np.inf
    orm = np.uint32(0)
    nprop = prop_bits.shape[0]
    for b in range(nprop):
        out[P_FIXED + b] = 0.0
    total = x.shape[0]
    for i in range(total):
        xi = np.float64(x[i])
        mi = np.uint32(m[i])
        vi = np.float64(v[i])
        if weight_mode == WEIGHT_INVERSE_VARIANCE and not (vi > 0.0):
            continue
        wi = _weight(vi, np.float64(w[i]), weight_mode)
        if (mi & andm) != 0 or (nan_safe and not math.isfinite(xi)):
            if not clip:
                for b in range(nprop):
                    if (mi & prop_bits[b]) != 0:
                        out[P_FIXED + b] += wi
            continue
        if clip and not (abs(xi - centre) <= width):
            continue
        n += 1
        s1 += wi
        s2 += wi * wi
        swx += wi * xi
        swv += wi * vi
        sw2v += wi * wi * vi
        orm |= mi
        if xi < lo:
            lo = xi
        if xi > hi:
            hi = xi
    mean = swx / s1 if s1 != 0.0 else 0.0
    m2 = 0.0
    if n > 0:
        for i in range(total):
            xi = np.float64(x[i])
            mi = np.uint32(m[i])
            vi = np.float64(v[i])
            if weight_mode == WEIGHT_INVERSE_VARIANCE and not (vi > 0.0):
                continue
            if (mi & andm) != 0 or (nan_safe and not math.isfinite(xi)):
                continue
            if clip and not (abs(xi - centre) <= width):
                continue
            d = xi - mean
            m2 += _weight(vi, np.float64(w[i]), weight_mode) * d * d
    out[P_N] = n
    out[P_TOTAL] = total
    out[P_S1] = s1
    out[P_S2] = s2
    out[P_MEAN] = mean
    out[P_M2] = m2
    out[P_SW2V] = sw2v
    out[P_SWV] = swv
    out[P_SWX] = swx
    out[P_MIN] = lo
    out[P_MAX] = hi
    out[P_ORMASK] = orm


_SIGN = np.uint64(1) << np.uint64(63)
_EXPONENT = np.uint64(0x7FF0000000000000)


def order_keys(values):
    """uint64 keys whose unsigned order is the numeric order of the (non-NaN) float64 ``values``."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    return np.where(bits >> np.uint64(63) != 0, ~bits, bits | _SIGN)


def key_values(keys):
    """Inverse of :func:`order_keys`."""
    keys = np.asarray(keys, dtype=np.uint64)
    bits = np.where(keys >> np.uint64(63) != 0, keys & ~_SIGN, ~keys)
    return np.ascontiguousarray(bits).view(np.float64)


@njit(cache=True, nogil=True)
def radix_histogram(bits, m, use_mask, and_mask, v, use_variance, level, shift, high, prefixes, out):
    """Histogram of the ``level``-th digit (see :func:`radix_digit`) of the order keys (see
    :func:`order_keys`) of the float64 values whose bit patterns are ``bits`` (uint64, 1-D).

    Counted: finite values whose mask ``m`` has no bit of ``and_mask`` (when ``use_mask``) and whose
    variance ``v`` is positive (when ``use_variance``). Row ``r`` of ``out`` (shape ``(R, bins)``)
    counts only keys whose higher digits equal those of ``prefixes[r]`` (at level 0 every row counts
    every key). The keys are made on the fly: one pass, no temporary arrays.
    """
    nr = out.shape[0]
    nbins = out.shape[1]
    digit_mask = np.uint64(nbins - 1)
    shift = np.uint64(shift)
    high = np.uint64(high if level > 0 else 0)
    andm = np.uint32(and_mask)
    tops = np.empty(nr, dtype=np.uint64)
    for r in range(nr):
        tops[r] = prefixes[r] >> high if level > 0 else np.uint64(0)
    tmin = tops.min()
    tmax = tops.max()
    for i in range(bits.shape[0]):
        b = bits[i]
        if (b & _EXPONENT) == _EXPONENT:  # NaN or infinite
            continue
        key = ~b if (b & _SIGN) != 0 else (b | _SIGN)
        top = key >> high if level > 0 else np.uint64(0)
        if top < tmin or top > tmax:  # outside every wanted prefix: most keys past level 0
            continue
        if use_mask and (np.uint32(m[i]) & andm) != 0:
            continue
        if use_variance and not (v[i] > 0.0):
            continue
        digit = (key >> shift) & digit_mask
        if level == 0:
            out[0, digit] += 1
        else:
            for r in range(nr):
                if tops[r] == top:
                    out[r, digit] += 1
