"""Inner loops of spatially varying convolution (numpy, scipy.fft and numba only).

Convention (afw, reference ``statistics_and_masks.md`` §5): a correlation with the kernel image as
stored, ``out(x, y) = sum_{u,v} K(v, u) in(y + v - h, x + u - h)``, on an input extended by the
kernel radius ``h`` on every side (``ext`` has shape ``(ny + 2h, nx + 2h)`` for an ``ny x nx``
output).
"""

from __future__ import annotations

import functools
import math
import threading

import ducc0.fft as _ducc_fft
import numba
import numpy as np
import scipy.fft as sfft

#: libraries of the tile transforms; the last is the default (ducc0: the same pocketfft algorithms,
#: vectorised over several 1-D transforms, about 20 % faster per transform here)
FFT_BACKENDS = ("scipy", "ducc0")

__all__ = ["Halo", "NonFiniteHalo", "FFT_BACKENDS", "correlate_varying", "correlate_lowrank", "kernel_spectra", "or_dilate",
           "correlate_direct", "plan_tiles"]


class Halo:
    """A block with its neighbours' edge strips, not concatenated: the input of one output block.

    ``pieces[i][j]`` (3 x 3, row-major, ``None`` where the exposure ends) covers rows
    ``edges_y[i]:edges_y[i + 1]`` and columns ``edges_x[j]:edges_x[j + 1]`` of the block extended by
    its halo; ``pieces[1][1]`` is the block itself.
    """

    __slots__ = ("pieces", "edges_y", "edges_x", "_flat")

    def __init__(self, pieces, edges_y, edges_x):
        self.pieces = tuple(tuple(row) for row in pieces)
        self.edges_y = tuple(int(e) for e in edges_y)
        self.edges_x = tuple(int(e) for e in edges_x)
        self._flat = None

    def __repr__(self):
        return f"Halo(shape={self.shape}, edges_y={self.edges_y}, edges_x={self.edges_x})"

    @property
    def shape(self) -> tuple[int, int]:
        return self.edges_y[3], self.edges_x[3]

    def assemble(self, fill, dtype) -> np.ndarray:
        """The halo'd block as one array (``fill`` where a piece is missing)."""
        out = np.empty(self.shape, dtype=dtype)
        for i in range(3):
            for j in range(3):
                sl = (slice(self.edges_y[i], self.edges_y[i + 1]), slice(self.edges_x[j], self.edges_x[j + 1]))
                p = self.pieces[i][j]
                out[sl] = fill if p is None else p
        return out

    def flat(self):
        """The nine pieces as flat read-only views in the centre's dtype (no copy when their rows are
        contiguous), their row pitches, which are present, and the edges as arrays; made once."""
        if self._flat is None:
            dtype = np.dtype(self.pieces[1][1].dtype)
            views, pitch = zip(*(_flat(self.pieces[i][j], dtype) for i in range(3) for j in range(3)))
            present = np.array([self.pieces[i][j] is not None for i in range(3) for j in range(3)], np.bool_)
            self._flat = (tuple(views), np.array(pitch, np.int64), present, np.array(self.edges_y, np.int64),
                          np.array(self.edges_x, np.int64))
        return self._flat


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


# One float32 forward plus inverse real 2-D transform of an ``L x L`` array, in ns per element on one
# core (scipy.fft / pocketfft, median of 5, calls included): 5-smooth lengths only.
_FFT_NS = {
    16: 70.9, 18: 60.4, 20: 49.2, 24: 34.8, 25: 31.9, 27: 30.0, 30: 24.9, 32: 22.2, 36: 19.0, 40: 16.1, 45: 13.9,
    48: 12.6, 50: 12.3, 54: 10.8, 60: 9.2, 64: 8.4, 72: 7.9, 75: 7.9, 80: 7.0, 81: 7.3, 90: 6.7, 96: 6.2, 100: 6.2,
    108: 6.1, 120: 5.5, 125: 5.8, 128: 5.3, 135: 5.6, 144: 5.5, 150: 5.6, 160: 5.0, 162: 5.6, 180: 5.2, 192: 4.8,
    200: 5.0, 216: 5.3, 225: 5.2, 240: 5.1, 243: 5.6, 250: 5.7, 256: 5.0, 270: 5.5, 288: 5.4, 300: 5.5, 320: 5.6,
    324: 5.9, 360: 6.1, 375: 6.1, 384: 5.8, 400: 6.2, 405: 6.6, 432: 6.4, 450: 7.1, 480: 6.6, 486: 7.2, 500: 7.2,
    512: 6.7, 540: 7.0, 576: 7.1, 600: 7.8, 625: 8.4, 640: 8.1, 648: 8.8, 675: 8.7, 720: 8.3, 729: 9.1, 750: 8.1,
    768: 8.5, 800: 8.6, 810: 9.0, 864: 9.1, 900: 9.5, 960: 8.9, 972: 9.4, 1000: 9.2, 1024: 8.9, 1080: 9.6,
    1125: 11.1, 1152: 9.9, 1200: 9.9,
}
_FFT_LENGTHS = sorted(_FFT_NS)
_TILE_OVERHEAD_NS = 15_000.0  # per tile and transform: Python calls, spectrum product, buffer set-up


def _fft_length(need: int) -> tuple[int, float]:
    """Cheapest tabulated length ``>= need`` (per element cost in ns); beyond the table, 5-smooth at 10 ns."""
    best = None
    for m in _FFT_LENGTHS:
        if m >= need:
            cost = _FFT_NS[m] * m
            if best is None or cost < best[1] * best[0]:
                best = (m, _FFT_NS[m])
    return best if best is not None else (_smooth_length(need), 10.0)


@functools.lru_cache(maxsize=256)
def plan_tiles(ny: int, nx: int, h: int) -> tuple[int, int, int, int]:
    """FFT tiles of an ``ny x nx`` output for a kernel of radius ``h``: ``(ty, fy, tx, fx)``.

    Tiles of ``t`` output pixels (spread evenly) take transforms of length ``f >= t + 2h``; the
    tile counts per axis minimise the measured transform cost (``_FFT_NS``) plus a fixed cost per
    tile, over the whole block. With ``h = 10`` a 1000-px block gets 4 x 250 (length 270), a
    4000-px one 17 x 236 (length 256).
    """
    def options(n):
        out = []
        for count in range(1, n + 1):
            t = -(-n // count)
            if count > 1 and -(-n // (count - 1)) == t:
                continue
            f, c = _fft_length(t + 2 * h)
            out.append((count, t, f, c))
            if t + 2 * h <= 4 * h or t <= 8:
                break
        return out

    best = None
    for cy, ty, fy, ey in options(ny):
        for cx, tx, fx, ex in options(nx):
            cost = cy * cx * (fy * fx * 0.5 * (ey + ex) + _TILE_OVERHEAD_NS)
            if best is None or cost < best[0]:
                best = (cost, ty, fy, tx, fx)
    return best[1:]


def correlate_lowrank(
    ext: np.ndarray,
    basis: np.ndarray,
    row_weights: np.ndarray,
    col_terms: np.ndarray,
    norm_rows: np.ndarray,
    power: int,
    *,
    tile: int | None = None,
    dtype=np.float32,
    valid: tuple[int, int, int, int] | None = None,
    check: bool = False,
    rect: tuple[int, int, int, int] | None = None,
    out: np.ndarray | None = None,
    backend: str | None = None,
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
    transform per basis image, combined straight from the inverse transforms' outputs; the output
    is float32. Tiles: at most ``tile`` output pixels per side spread evenly, or (``None``) the
    cheapest measured plan (:func:`plan_tiles`). Input pixels outside ``valid`` (rows ``r0:r1``,
    columns ``c0:c1`` of ``ext``; default all) and, with ``check``, non-finite ones enter as the tile
    constant ``c``: outputs that do not reach them are unchanged, the others are the caller's to
    replace. ``rect`` (rows ``y0:y1``, columns ``x0:x1`` of the output; default all) limits the
    work to that part, written into ``out`` (a float32 array of the output's shape, default new zeros).
    ``backend``: the tile transforms' library, ``'scipy'`` or ``'ducc0'`` (the default), equal to
    rounding.

    Float32 through ducc0 combines four basis images and three axis terms per pass over rows
    padded to whole vectors (:func:`_combine_blocked`); other settings take the one-image-at-a-time
    :func:`_combine_lowrank`. The kernel images' spectra are kept for the next call with the same
    images and transform shape, and the work arrays per thread.
    """
    backend = FFT_BACKENDS[-1] if backend is None else backend
    if backend not in FFT_BACKENDS:
        raise ValueError(f"FFT backend {backend!r} is not available (have {', '.join(FFT_BACKENDS)})")
    n_r, k, k2 = basis.shape
    if k != k2 or k % 2 == 0:
        raise ValueError(f"kernels must be square and odd, got {k}x{k2}")
    h = k // 2
    ny, nx = ext.shape[0] - 2 * h, ext.shape[1] - 2 * h
    shape = (max(ny, 0), max(nx, 0))
    if out is not None and (out.shape != shape or out.dtype != np.float32):
        raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {out.shape}")
    ry0, ry1, rx0, rx1 = (0, ny, 0, nx) if rect is None else rect
    if not (0 <= ry0 <= ry1 <= shape[0] and 0 <= rx0 <= rx1 <= shape[1]):
        raise ValueError(f"rect {rect} is not inside the output ({ny}, {nx})")
    if out is None:
        # every output of the rect is written: zeros only where it leaves some out (no clearing pass
        # over a block the tiles then overwrite)
        whole = (ry0, ry1, rx0, rx1) == (0, shape[0], 0, shape[1])
        out = np.empty(shape, dtype=np.float32) if whole else np.zeros(shape, dtype=np.float32)
    if ry1 <= ry0 or rx1 <= rx0:
        return out
    if tile is None:
        ty, fy, tx, fx = plan_tiles(ry1 - ry0, rx1 - rx0, h)
    else:
        (ty, fy), (tx, fx) = _tiles(ry1 - ry0, tile, h), _tiles(rx1 - rx0, tile, h)
    spectra = _cached_spectra(basis, fy, fx, dtype)
    # per-thread work arrays, reused across calls (no fresh pages per block); the input buffer is
    # cleared, since what lies past a short edge window is read by the transform
    buf = _scratch("tile", (fy, fx), dtype)
    buf.fill(0)
    prod = _scratch("product", spectra.shape[1:], spectra.dtype)
    if row_weights.shape[0] != n_r + 1:
        raise ValueError(f"row_weights must have {n_r + 1} rows (one per basis image and the sum), "
                         f"got {row_weights.shape[0]}")
    col_terms = np.ascontiguousarray(col_terms, dtype=np.float64)
    norm_rows = np.ascontiguousarray(norm_rows, dtype=np.float64)
    dep_rows = np.ascontiguousarray(row_weights[:n_r], dtype=dtype)
    dep_cols = np.ascontiguousarray(col_terms, dtype=dtype)
    const_rows = np.ascontiguousarray(row_weights[n_r], dtype=np.float64)
    # axis terms the normaliser does not use (the variance pads N to the order of K²) are skipped
    used = np.flatnonzero(np.any(norm_rows != 0, axis=1))
    norm_rows = norm_rows[: used[-1] + 1 if used.size else 1]
    # the constant's weight is often the normaliser itself (the image: sum of K = N); then the
    # constant term is c / N**(power - 1) without evaluating a second field
    const_is_norm = bool(const_rows.shape[0] >= norm_rows.shape[0] and not np.any(const_rows[norm_rows.shape[0]:])
                         and np.allclose(const_rows[: norm_rows.shape[0]], norm_rows, rtol=1e-13, atol=0))
    r0, r1, c0, c1 = (0, ext.shape[0], 0, ext.shape[1]) if valid is None else valid
    halo = isinstance(ext, Halo)
    if halo and check:
        raise ValueError("a Halo input must be finite (assemble it to skip non-finite pixels)")
    ducc = backend == "ducc0"
    # float32 through ducc0: the inverse transforms land in rows padded to whole vectors, whose
    # combine runs no scalar remainder loops (the padding columns are computed and dropped)
    padded = ducc and np.dtype(dtype) == np.float32
    if ducc:
        spec_buf = _scratch("spectrum", spectra.shape[1:], spectra.dtype)
        width = fx + (-(-tx // _LANES) * _LANES - tx if padded else 0)
        stack_buf = _scratch("inverse", (n_r, fy, width), dtype)  # padding columns: zeros, never written
        stack = stack_buf[:, :, :fx]
    if padded:
        blk_rows, blk_cols, blk_const, blk_norm, blk_terms = _blocked_inputs(dep_rows, dep_cols, const_rows, norm_rows,
                                                                             col_terms, rx1)
    for y0 in range(ry0, ry1, ty):
        y1 = min(y0 + ty, ry1)
        for x0 in range(rx0, rx1, tx):
            x1 = min(x0 + tx, rx1)
            # what lies past a short edge window never reaches a valid output (no wrap-around)
            if halo:
                c = _load_halo(buf, ext, y0, y1 + 2 * h, x0, x1 + 2 * h)
            else:
                c = _load_centred(buf, ext, y0, y1 + 2 * h, x0, x1 + 2 * h, r0, r1, c0, c1, check)
            # one image at a time: a spectrum and its transform stay in cache (a batched call is slower)
            if ducc:
                spec = _ducc_fft.r2c(buf, axes=(0, 1), nthreads=1, out=spec_buf)
                for r in range(n_r):
                    np.multiply(spectra[r], spec, out=prod)
                    _ducc_fft.c2r(prod, axes=(0, 1), lastsize=fx, forward=False, inorm=2, nthreads=1,
                                  out=stack[r], allow_overwriting_input=True)
                convs = stack
            else:
                spec = sfft.rfft2(buf, workers=1)
                convs = []
                for r in range(n_r):
                    np.multiply(spectra[r], spec, out=prod)
                    convs.append(sfft.irfft2(prod, s=(fy, fx), workers=1, overwrite_x=True))
                convs = tuple(convs)
            if padded:
                _combine_blocked(out, stack_buf, n_r, c, blk_rows, blk_cols, blk_const, blk_norm, blk_terms, power,
                                 y0, y1, x0, x1, 2 * h, const_is_norm)
            else:
                _combine_lowrank(out, convs, c, dep_rows, dep_cols, const_rows, norm_rows, col_terms, power,
                                 y0, y1, x0, x1, 2 * h, const_is_norm)
    return out


def _blocked_inputs(dep_rows, dep_cols, const_rows, norm_rows, col_terms, x_end):
    """The weights of :func:`_combine_lowrank` padded for :func:`_combine_blocked`: zero columns past
    ``x_end`` (read by the padding lanes of tiles ending there), zero components up to a multiple of
    four and zero axis terms up to a multiple of three (zero weights add nothing to the sums)."""
    end, m_a, m_n = x_end + _LANES, -(-dep_cols.shape[0] // 3) * 3, -(-norm_rows.shape[0] // 3) * 3
    return (_pad_to(dep_rows, (-(-dep_rows.shape[0] // 4) * 4, m_a, dep_rows.shape[2])),
            _pad_to(dep_cols, (m_a, end)),
            _pad_to(const_rows, (m_a, const_rows.shape[1])),
            _pad_to(norm_rows, (m_n, norm_rows.shape[1])),
            _pad_to(col_terms, (max(m_a, m_n), end)))


_SCRATCH = threading.local()
_SCRATCH_SIZE = 8  # work arrays kept per thread (four per transform shape and component count)


def _scratch(name: str, shape: tuple, dtype) -> np.ndarray:
    """A work array of this thread, zeros when first made, reused by later calls with the same
    name, shape and dtype (its contents are then what the last call left)."""
    store = getattr(_SCRATCH, "arrays", None)
    if store is None:
        store = _SCRATCH.arrays = {}
    key = (name, tuple(shape), np.dtype(dtype).str)
    arr = store.pop(key, None)
    if arr is None:
        arr = np.zeros(shape, dtype=dtype)
    store[key] = arr  # most recent last
    while len(store) > _SCRATCH_SIZE:
        store.pop(next(iter(store)))
    return arr


def _pad_to(arr: np.ndarray, shape: tuple) -> np.ndarray:
    """``arr`` in the corner of a C-contiguous zero array of at least ``shape`` (and ``arr.shape``), same dtype."""
    out = np.zeros(tuple(max(a, b) for a, b in zip(shape, arr.shape)), dtype=arr.dtype)
    out[tuple(slice(0, n) for n in arr.shape)] = arr
    return out


_SPECTRA_CACHE: dict = {}
_SPECTRA_LOCK = threading.Lock()
_SPECTRA_CACHE_SIZE = 16  # kernel sets kept (a few per region and plane; each a few hundred kB)


def clear_caches() -> None:
    """Forget the kernel spectra kept between calls (results never depend on them); a benchmark
    clears them so that each timed call pays for its spectra as a single pass over an exposure does."""
    with _SPECTRA_LOCK:
        _SPECTRA_CACHE.clear()


def _cached_spectra(kernels: np.ndarray, fy: int, fx: int, dtype) -> np.ndarray:
    """:func:`kernel_spectra`, reused while the same kernel images (compared by value) come back with
    the same transform shape: every block of a region correlates with the same images."""
    kernels = np.ascontiguousarray(kernels)
    key = (kernels.shape, kernels.dtype.str, kernels.tobytes(), fy, fx, np.dtype(dtype).str)
    with _SPECTRA_LOCK:
        hit = _SPECTRA_CACHE.pop(key, None)
        if hit is not None:
            _SPECTRA_CACHE[key] = hit  # most recent last
            return hit
    hit = kernel_spectra(kernels, fy, fx, dtype)
    hit.flags.writeable = False
    with _SPECTRA_LOCK:
        _SPECTRA_CACHE[key] = hit
        while len(_SPECTRA_CACHE) > _SPECTRA_CACHE_SIZE:
            _SPECTRA_CACHE.pop(next(iter(_SPECTRA_CACHE)))
    return hit


def kernel_spectra(kernels: np.ndarray, fy: int, fx: int, dtype=np.float64) -> np.ndarray:
    """``rfft2`` of each kernel flipped (correlation) into the corner of an ``fy x fx`` array, in ``dtype``.

    Only the first ``k`` rows are non-zero: the transform along x runs on those rows alone, then the
    one along y (zero-padded to ``fy``), about half the work of transforming the padded stack.
    """
    n_r, k = kernels.shape[0], kernels.shape[1]
    rows = np.zeros((n_r, k, fx), dtype=dtype)
    rows[:, :, :k] = kernels[:, ::-1, ::-1]
    return sfft.fft(sfft.rfft(rows, axis=-1, workers=1), n=fy, axis=-2, workers=1)


class NonFiniteHalo(ValueError):
    """A :class:`Halo` read as tiles holds a NaN or an infinity (its caller takes the checking path)."""


def _load_halo(buf, halo, ya, yb, xa, xb):
    """:func:`_load_centred` on a :class:`Halo`: missing pieces enter as the constant ``c``.

    ``c`` is the mean of all the data in the window, summed on the buffer right after each piece is
    copied (one streaming read of each piece); the subtraction then runs on the buffer, still in
    cache. The sum doubles as the finiteness check: :class:`NonFiniteHalo` when the window holds a
    NaN or an infinity (the buffer is then left part-written). The pieces' flat layout is made once
    per Halo (:meth:`Halo.flat`) and the whole load is one compiled call.
    """
    views, pitch, present, ey, ex = halo.flat()
    narrowing = views[4].dtype.itemsize > buf.dtype.itemsize
    c = float(_load_tile(buf, views, pitch, present, ey, ex, ya, yb, xa, xb, narrowing))
    if not math.isfinite(c):
        raise NonFiniteHalo(f"the tile at rows {ya}:{yb}, columns {xa}:{xb} of the halo'd block is not finite")
    return c


# float sums may be reordered (vectorised) but NaN and inf keep their meaning: the sum is the check
_SUM_MATH = {"reassoc", "nsz", "contract"}


@numba.njit(cache=True, nogil=True, fastmath=_SUM_MATH)
def _load_tile(buf, views, pitch, present, ey, ex, ya, yb, xa, xb, narrowing):
    """Copy window ``[ya, yb) x [xa, xb)`` of the halo'd block laid out by ``ey``/``ex`` (piece ``k``
    row-major: ``views[k]``, rows ``pitch[k]`` apart, absent where not ``present[k]``) into the corner
    of ``buf`` minus ``c``, the buffer dtype's rounding of the mean of the data (0 without data);
    absent pieces read 0 after the subtraction. Returns ``c`` (NaN or inf when the data are not finite)."""
    total, count = 0.0, 0
    for i in range(3):
        ra, rb = max(ya, ey[i]), min(yb, ey[i + 1])
        if ra >= rb:
            continue
        for j in range(3):
            qa, qb = max(xa, ex[j]), min(xb, ex[j + 1])
            if qa >= qb:
                continue
            k = 3 * i + j
            if present[k]:
                total += _copy_sum(buf, ra - ya, qa - xa, views[k], pitch[k], ra - ey[i], rb - ey[i],
                                   qa - ex[j], qb - ex[j], narrowing)
                count += (rb - ra) * (qb - qa)
    c = buf.dtype.type(total / count) if count else buf.dtype.type(0.0)
    for i in range(3):
        ra, rb = max(ya, ey[i]), min(yb, ey[i + 1])
        for j in range(3):
            qa, qb = max(xa, ex[j]), min(xb, ex[j + 1])
            if ra < rb and qa < qb and not present[3 * i + j]:
                for r in range(ra - ya, rb - ya):
                    _fill(buf[r], qa - xa, qb - qa, c)
    n = numba.uint64(xb - xa)
    for r in range(yb - ya):
        row = buf[r]
        for q in range(n):
            row[q] = row[q] - c
    return c


@numba.njit(cache=True, nogil=True, fastmath=_SUM_MATH)
def _copy_sum(dst, d0, e0, src, pitch, ra, rb, ca, cb, narrowing):
    """``dst[d0 + i, e0 + j] = src[(ra + i) * pitch + ca + j]`` over the rectangle (``src`` flat, rows
    ``pitch`` apart); returns the float64 sum of the values, row by row.

    The copy runs first and the sum after it on the copied rows, in cache (a sum that waits on
    every cache line as it streams in from memory is about twice as slow as the plain copy); with
    ``narrowing`` (``dst`` rounds the values) the sum reads ``src`` again.
    """
    n = numba.uint64(cb - ca)
    e = numba.uint64(e0)
    for i in range(rb - ra):
        s0 = numba.uint64((ra + i) * pitch + ca)
        d = dst[d0 + i]
        for j in range(n):
            d[e + j] = src[s0 + j]
    total = 0.0
    for i in range(rb - ra):
        row = 0.0
        if narrowing:
            s0 = numba.uint64((ra + i) * pitch + ca)
            for j in range(n):
                row += src[s0 + j]
        else:
            d = dst[d0 + i]
            for j in range(n):
                row += d[e + j]
        total += row
    return total


@numba.njit(cache=True, nogil=True)
def _window_mean(arr, ra, rb, ca, cb, check):
    """Mean of ``arr[ra:rb, ca:cb]`` (with ``check``, of its finite values) on every fourth row (every
    row for short windows); 0 when empty."""
    step = 4 if rb - ra >= 64 else 1
    total = 0.0
    count = 0
    for i in range(ra, rb, step):
        src = arr[i]
        row = 0.0
        if check:
            for j in range(ca, cb):
                v = src[j]
                if math.isfinite(v):
                    row += v
                    count += 1
        else:
            for j in range(ca, cb):
                row += src[j]
            count += max(cb - ca, 0)
        total += row
    return total / count if count > 0 else 0.0


@numba.njit(cache=True, nogil=True)
def _load_centred(buf, ext, ya, yb, xa, xb, r0, r1, c0, c1, check):
    """Copy ``ext[ya:yb, xa:xb]`` minus ``c`` into the corner of ``buf``; returns ``c``.

    Only pixels inside ``[r0, r1) x [c0, c1)`` of ``ext`` (and, with ``check``, finite ones) are
    data; the others are written as ``c`` (zero after the subtraction). ``c`` is the mean of the
    data on every fourth row of the window (every row for short windows): any constant near the
    data serves, since it comes back exactly through the kernel sum.
    """
    ny, nx = yb - ya, xb - xa
    ia, ib = max(ya, r0), min(yb, r1)
    ja, jb = max(xa, c0), min(xb, c1)
    c = _window_mean(ext, ia, ib, ja, jb, check)
    lo, hi = max(ja - xa, 0), max(jb - xa, 0)
    for i in range(ny):
        dst = buf[i]
        if ya + i < r0 or ya + i >= r1 or hi <= lo:
            for j in range(nx):
                dst[j] = 0.0
            continue
        src = ext[ya + i]
        for j in range(lo):
            dst[j] = 0.0
        if check:
            for j in range(lo, hi):
                v = src[xa + j]
                dst[j] = v - c if math.isfinite(v) else 0.0
        else:
            for j in range(lo, hi):
                dst[j] = src[xa + j] - c
        for j in range(hi, nx):
            dst[j] = 0.0
    return c


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")  # no zero-divisor branch: loops vectorise
def _combine_lowrank(out, convs, c, dep_rows, dep_cols, const_rows, norm_rows, col_terms, power, y0, y1, x0, x1, off,
                     const_is_norm):
    """``out[y, x] = (sum_r W_r convs[r] + c W_R) / N**power`` over the tile (see ``correlate_lowrank``).

    The departures ``sum_r W_r convs[r]`` are summed in the transforms' precision (``dep_rows``,
    ``dep_cols`` of that dtype); the constant term ``c W_R`` and the normaliser ``N`` in float64
    (``norm_rows`` may use fewer axis terms than the others). With ``const_is_norm`` (``W_R = N``) the
    constant term is ``c / N**(power - 1)``. Division by a zero normaliser gives inf or NaN (numpy's
    rule), which keeps the loops free of a zero-divisor branch and lets them vectorise.
    """
    n_r = len(convs)
    n_a = col_terms.shape[0]
    n_n = norm_rows.shape[0]
    nx = x1 - x0
    w = np.zeros(nx, dtype=dep_cols.dtype)
    acc = np.zeros(nx, dtype=dep_cols.dtype)
    base = np.empty(nx)
    nrm = np.empty(nx)
    nrmt = np.empty(nx, dtype=dep_cols.dtype)
    for i in range(y0, y1):
        ci = off + i - y0
        for r in range(n_r):
            cr = convs[r][ci, off:off + nx]
            # two axis terms per pass over the row, the last odd one fused with the product
            if n_a == 1:
                ca = dep_rows[r, 0, i]
                cta = dep_cols[0, x0:x1]
                for j in range(nx):
                    w[j] = ca * cta[j]
            else:
                ca, cb = dep_rows[r, 0, i], dep_rows[r, 1, i]
                cta, ctb = dep_cols[0, x0:x1], dep_cols[1, x0:x1]
                for j in range(nx):
                    w[j] = ca * cta[j] + cb * ctb[j]
            for a in range(2, n_a - 1, 2):
                ca, cb = dep_rows[r, a, i], dep_rows[r, a + 1, i]
                cta, ctb = dep_cols[a, x0:x1], dep_cols[a + 1, x0:x1]
                for j in range(nx):
                    w[j] += ca * cta[j] + cb * ctb[j]
            if n_a > 2 and n_a % 2 == 1:
                ca = dep_rows[r, n_a - 1, i]
                cta = dep_cols[n_a - 1, x0:x1]
                if r == 0:
                    for j in range(nx):
                        acc[j] = (w[j] + ca * cta[j]) * cr[j]
                else:
                    for j in range(nx):
                        acc[j] += (w[j] + ca * cta[j]) * cr[j]
            elif r == 0:
                for j in range(nx):
                    acc[j] = w[j] * cr[j]
            else:
                for j in range(nx):
                    acc[j] += w[j] * cr[j]
        if n_r == 0:
            for j in range(nx):
                acc[j] = 0.0
        cn = norm_rows[0, i]
        cta64 = col_terms[0, x0:x1]
        for j in range(nx):
            nrm[j] = cn * cta64[j]
        for a in range(1, n_n):
            cn = norm_rows[a, i]
            cta64 = col_terms[a, x0:x1]
            for j in range(nx):
                nrm[j] += cn * cta64[j]
        o = out[i, x0:x1]
        if const_is_norm:
            # only the departures are divided, in their own precision; c is added after
            for j in range(nx):
                nrmt[j] = nrm[j]
            if power == 2:
                for j in range(nx):
                    o[j] = (acc[j] / nrmt[j] + c) / nrm[j]
            else:
                for j in range(nx):
                    o[j] = acc[j] / nrmt[j] + c
            continue
        cb = const_rows[0, i] * c
        cta64 = col_terms[0, x0:x1]
        for j in range(nx):
            base[j] = cb * cta64[j]
        for a in range(1, n_a):
            cb = const_rows[a, i] * c
            cta64 = col_terms[a, x0:x1]
            for j in range(nx):
                base[j] += cb * cta64[j]
        if power == 2:
            for j in range(nx):
                o[j] = (acc[j] + base[j]) / (nrm[j] * nrm[j])
        else:
            for j in range(nx):
                o[j] = (acc[j] + base[j]) / nrm[j]


_LANES = 64  # the fast combine works on rows padded to a multiple of this (no scalar remainder loops)


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _combine_blocked(out, convs, n_r, c, dep_rows, dep_cols, const_rows, norm_rows, col_terms, power, y0, y1, x0, x1,
                     off, const_is_norm):
    """:func:`_combine_lowrank` on padded rows, four components and three axis terms per pass.

    The weights of four components are built together, each column term read once for all four
    and the four transforms read once in the pass that ends the sum (fewer loads and stores per
    multiply-add than one component at a time). Padded inputs (zeros where padded): ``dep_rows``
    ``(4 m, 3 p, ny)`` float32, its first ``n_r`` components real; ``dep_cols`` ``(3 p, w)``
    float32; ``norm_rows`` ``(3 q, ny)`` and ``const_rows`` ``(3 p, ny)`` float64; ``col_terms``
    ``(max(3 p, 3 q), w)`` float64, where ``w >= x0 + np`` and ``np`` is ``x1 - x0`` rounded up to
    ``_LANES``; ``convs`` ``(n_r, fy, v)`` float32 with ``off + np <= v``. Every pass runs over
    ``np`` lanes (no scalar remainder loop); the lanes past ``x1 - x0`` are dropped.
    """
    n_a = dep_cols.shape[0]
    n_n = norm_rows.shape[0]
    n_chunks = dep_rows.shape[0] // 4
    n_groups = n_a // 3
    nx = numba.uint64(x1 - x0)
    npad = numba.uint64(-(-(x1 - x0) // _LANES) * _LANES)
    ux0 = numba.uint64(x0)
    uoff = numba.uint64(off)
    last = max(n_r - 1, 0)
    w = np.empty((4, npad), dtype=np.float32)
    acc = np.zeros(npad, dtype=np.float32)
    nrm = np.empty(npad)
    base = np.empty(npad)
    for i in range(y0, y1):
        ui = numba.uint64(i)
        ci = numba.uint64(off + i - y0)
        for q in range(n_chunks):
            uq = numba.uint64(4 * q)
            # padded components carry zero weights: any real transform serves as their input
            s0, s1 = numba.uint64(min(4 * q, last)), numba.uint64(min(4 * q + 1, last))
            s2, s3 = numba.uint64(min(4 * q + 2, last)), numba.uint64(min(4 * q + 3, last))
            for g in range(n_groups):
                ua = numba.uint64(3 * g)
                a00, a01, a02 = dep_rows[uq, ua, ui], dep_rows[uq, ua + 1, ui], dep_rows[uq, ua + 2, ui]
                a10, a11, a12 = dep_rows[uq + 1, ua, ui], dep_rows[uq + 1, ua + 1, ui], dep_rows[uq + 1, ua + 2, ui]
                a20, a21, a22 = dep_rows[uq + 2, ua, ui], dep_rows[uq + 2, ua + 1, ui], dep_rows[uq + 2, ua + 2, ui]
                a30, a31, a32 = dep_rows[uq + 3, ua, ui], dep_rows[uq + 3, ua + 1, ui], dep_rows[uq + 3, ua + 2, ui]
                first, final = g == 0, g == n_groups - 1
                if first and not final:
                    for j in range(npad):
                        xj = ux0 + j
                        t0, t1, t2 = dep_cols[ua, xj], dep_cols[ua + 1, xj], dep_cols[ua + 2, xj]
                        w[0, j] = a00 * t0 + a01 * t1 + a02 * t2
                        w[1, j] = a10 * t0 + a11 * t1 + a12 * t2
                        w[2, j] = a20 * t0 + a21 * t1 + a22 * t2
                        w[3, j] = a30 * t0 + a31 * t1 + a32 * t2
                elif not final:
                    for j in range(npad):
                        xj = ux0 + j
                        t0, t1, t2 = dep_cols[ua, xj], dep_cols[ua + 1, xj], dep_cols[ua + 2, xj]
                        w[0, j] += a00 * t0 + a01 * t1 + a02 * t2
                        w[1, j] += a10 * t0 + a11 * t1 + a12 * t2
                        w[2, j] += a20 * t0 + a21 * t1 + a22 * t2
                        w[3, j] += a30 * t0 + a31 * t1 + a32 * t2
                elif first:
                    for j in range(npad):
                        xj = ux0 + j
                        cj = uoff + j
                        t0, t1, t2 = dep_cols[ua, xj], dep_cols[ua + 1, xj], dep_cols[ua + 2, xj]
                        v = ((a00 * t0 + a01 * t1 + a02 * t2) * convs[s0, ci, cj]
                             + (a10 * t0 + a11 * t1 + a12 * t2) * convs[s1, ci, cj]
                             + (a20 * t0 + a21 * t1 + a22 * t2) * convs[s2, ci, cj]
                             + (a30 * t0 + a31 * t1 + a32 * t2) * convs[s3, ci, cj])
                        acc[j] = v if q == 0 else acc[j] + v
                else:
                    for j in range(npad):
                        xj = ux0 + j
                        cj = uoff + j
                        t0, t1, t2 = dep_cols[ua, xj], dep_cols[ua + 1, xj], dep_cols[ua + 2, xj]
                        v = ((w[0, j] + a00 * t0 + a01 * t1 + a02 * t2) * convs[s0, ci, cj]
                             + (w[1, j] + a10 * t0 + a11 * t1 + a12 * t2) * convs[s1, ci, cj]
                             + (w[2, j] + a20 * t0 + a21 * t1 + a22 * t2) * convs[s2, ci, cj]
                             + (w[3, j] + a30 * t0 + a31 * t1 + a32 * t2) * convs[s3, ci, cj])
                        acc[j] = v if q == 0 else acc[j] + v
        if const_is_norm:
            for g in range(n_n // 3):
                ub = numba.uint64(3 * g)
                m0, m1, m2 = norm_rows[ub, ui], norm_rows[ub + 1, ui], norm_rows[ub + 2, ui]
                if g == 0:
                    for j in range(npad):
                        xj = ux0 + j
                        nrm[j] = m0 * col_terms[ub, xj] + m1 * col_terms[ub + 1, xj] + m2 * col_terms[ub + 2, xj]
                else:
                    for j in range(npad):
                        xj = ux0 + j
                        nrm[j] += m0 * col_terms[ub, xj] + m1 * col_terms[ub + 1, xj] + m2 * col_terms[ub + 2, xj]
            if power == 2:
                for j in range(nx):
                    out[ui, ux0 + j] = (acc[j] / numba.float32(nrm[j]) + c) / nrm[j]
            else:
                for j in range(nx):
                    out[ui, ux0 + j] = acc[j] / numba.float32(nrm[j]) + c
            continue
        # the normaliser and the constant's weight share their column terms: one read for both
        for g in range(max(n_n, n_a) // 3):
            ub = numba.uint64(3 * g)
            with_n, with_b = 3 * g < n_n, 3 * g < n_a
            m0, m1, m2, q0, q1, q2 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
            if with_n:
                m0, m1, m2 = norm_rows[ub, ui], norm_rows[ub + 1, ui], norm_rows[ub + 2, ui]
            if with_b:
                q0, q1, q2 = const_rows[ub, ui] * c, const_rows[ub + 1, ui] * c, const_rows[ub + 2, ui] * c
            if g == 0:
                for j in range(npad):
                    xj = ux0 + j
                    t0, t1, t2 = col_terms[ub, xj], col_terms[ub + 1, xj], col_terms[ub + 2, xj]
                    nrm[j] = m0 * t0 + m1 * t1 + m2 * t2
                    base[j] = q0 * t0 + q1 * t1 + q2 * t2
            elif with_n and with_b:
                for j in range(npad):
                    xj = ux0 + j
                    t0, t1, t2 = col_terms[ub, xj], col_terms[ub + 1, xj], col_terms[ub + 2, xj]
                    nrm[j] += m0 * t0 + m1 * t1 + m2 * t2
                    base[j] += q0 * t0 + q1 * t1 + q2 * t2
            elif with_n:
                for j in range(npad):
                    xj = ux0 + j
                    nrm[j] += m0 * col_terms[ub, xj] + m1 * col_terms[ub + 1, xj] + m2 * col_terms[ub + 2, xj]
            else:
                for j in range(npad):
                    xj = ux0 + j
                    base[j] += q0 * col_terms[ub, xj] + q1 * col_terms[ub + 1, xj] + q2 * col_terms[ub + 2, xj]
        if power == 2:
            for j in range(nx):
                out[ui, ux0 + j] = (acc[j] + base[j]) / (nrm[j] * nrm[j])
        else:
            for j in range(nx):
                out[ui, ux0 + j] = (acc[j] + base[j]) / nrm[j]


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


_SCAN = 64  # elements per chunk when looking for the non-zero span of a row

# The row helpers below take flat arrays with start offsets and lengths instead of slices (a slice
# costs about 10 ns, many times per row) and index with unsigned integers, which numba does not
# wrap around, so the loops vectorise. Offsets and lengths are never negative.


@numba.njit(cache=True, nogil=True)
def _fill(dst, d0, n, value):
    if n > 0:
        d0 = numba.uint64(d0)
        for j in range(numba.uint64(n)):
            dst[d0 + j] = value


@numba.njit(cache=True, nogil=True)
def _put(dst, d0, src, s0, n):
    if n > 0:
        d0, s0 = numba.uint64(d0), numba.uint64(s0)
        for j in range(numba.uint64(n)):
            dst[d0 + j] = src[s0 + j]


@numba.njit(cache=True, nogil=True)
def _or_rows(dst, d0, a, a0, b, b0, n):
    if n > 0:
        d0, a0, b0 = numba.uint64(d0), numba.uint64(a0), numba.uint64(b0)
        for j in range(numba.uint64(n)):
            dst[d0 + j] = a[a0 + j] | b[b0 + j]


@numba.njit(cache=True, nogil=True)
def _any(src, s0, n):
    acc = src[0] ^ src[0]
    s0 = numba.uint64(s0)
    for q in range(numba.uint64(n)):
        acc |= src[s0 + q]
    return acc != 0


@numba.njit(cache=True, nogil=True)
def _span(src, s0, m):
    """First and end index (relative to ``s0``) of the chunks of ``src[s0:s0 + m]`` holding a
    non-zero value (``(0, 0)``: none). One streaming pass decides a zero row; only a non-zero row
    is looked at chunk by chunk."""
    if m <= 0 or not _any(src, s0, m):
        return 0, 0
    first, last = -1, 0
    for c in range(0, m, _SCAN):
        if _any(src, s0 + c, min(_SCAN, m - c)):
            if first < 0:
                first = c
            last = min(c + _SCAN, m)
    return first, last


@numba.njit(cache=True, nogil=True)
def _zero_gap(buf, a, b, lo, hi, f, e):
    """Zeros on the part of ``[a, b)`` inside ``[lo, hi)`` that the span ``[f, e)`` left unwritten."""
    a, b = max(a, lo), min(b, hi)
    if a >= b:
        return
    zero = buf[0] ^ buf[0]
    if e <= f:
        _fill(buf, a, b - a, zero)
        return
    if a < f:
        _fill(buf, a, f - a, zero)
    if e < b:
        _fill(buf, e, b - e, zero)


@numba.njit(cache=True, nogil=True)
def _fetch_row(center, strips, base, pitch, present, ey, ex, r, c0, n, buf, fill):
    """The non-zero span ``[lo, hi)`` of row ``r``, columns ``c0:c0 + n``, of the halo'd block laid
    out by ``ey``/``ex``, with ``buf[lo:hi]`` holding those values (``(0, 0)``: an all-zero row; the
    rest of ``buf`` is not written).

    Piece ``k`` (row-major over the nine) is ``center`` for ``k = 4``, else the part of ``strips``
    from ``base[k]`` on; rows ``pitch[k]`` apart. ``present[k]`` is False where piece ``k`` lies
    outside the exposure (read as ``fill``).
    """
    i = 0 if r < ey[1] else (1 if r < ey[2] else 2)
    rr = r - ey[i]
    lo, hi = n, 0
    f0, e0, f1, e1, f2, e2 = 0, 0, 0, 0, 0, 0
    for j in range(3):
        a = max(c0, ex[j]) - c0
        b = min(c0 + n, ex[j + 1]) - c0
        if a >= b:
            continue
        k = 3 * i + j
        f, e = 0, 0
        if present[k]:
            src = center if k == 4 else strips
            start = base[k] + rr * pitch[k] - ex[j] + c0 + a
            f, e = _span(src, start, b - a)
            if e > f:
                _put(buf, a + f, src, start + f, e - f)
                f, e = f + a, e + a
        elif fill != 0:
            _fill(buf, a, b - a, fill)
            f, e = a, b
        if e > f:
            lo, hi = min(lo, f), max(hi, e)
        if j == 0:
            f0, e0 = f, e
        elif j == 1:
            f1, e1 = f, e
        else:
            f2, e2 = f, e
    if lo >= hi:
        return 0, 0
    if (e0 > f0) + (e1 > f1) + (e2 > f2) > 1:  # zeros between the spans of different pieces
        _zero_gap(buf, max(c0, ex[0]) - c0, min(c0 + n, ex[1]) - c0, lo, hi, f0, e0)
        _zero_gap(buf, max(c0, ex[1]) - c0, min(c0 + n, ex[2]) - c0, lo, hi, f1, e1)
        _zero_gap(buf, max(c0, ex[2]) - c0, min(c0 + n, ex[3]) - c0, lo, hi, f2, e2)
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _or_pass(dst, d0, src, s0, n, d1, d2, d3):
    """``dst[d0 + j] = src[s0 + j] | src[s0 + j + d1] | src[s0 + j + d2] | src[s0 + j + d3]`` for ``j < n``."""
    d0, s0, d1, d2, d3 = numba.uint64(d0), numba.uint64(s0), numba.uint64(d1), numba.uint64(d2), numba.uint64(d3)
    for j in range(numba.uint64(n)):
        q = s0 + j
        dst[d0 + j] = src[q] | src[q + d1] | src[q + d2] | src[q + d3]


@numba.njit(cache=True, nogil=True)
def _or_pass2(dst, d0, src, s0, n, d1):
    """``dst[d0 + j] = src[s0 + j] | src[s0 + j + d1]`` for ``j < n``."""
    d0, s0, d1 = numba.uint64(d0), numba.uint64(s0), numba.uint64(d1)
    for j in range(numba.uint64(n)):
        dst[d0 + j] = src[s0 + j] | src[s0 + j + d1]


@numba.njit(cache=True, nogil=True)
def _run_or(buf, s0, w, n, dest, d0, t1, t2):
    """``dest[d0 + j] = buf[s0 + j] | ... | buf[s0 + j + w - 1]`` for ``j < n``.

    Each pass widens the runs up to four times (``W'[j] = W[j] | W[j + d] | W[j + 2d] | W[j + e]``,
    the last shift chosen so the runs end exactly at the target width, overlaps being harmless
    for an OR): ``ceil(log4(w))`` passes over the row, e.g. 3 for ``w = 21`` (4, 16, 21).
    """
    if n <= 0:
        return
    if w == 1:
        _put(dest, d0, buf, s0, n)
        return
    src, start = buf, s0
    d = 1
    level = 0
    while d < w:
        t = min(4 * d, w)
        m = n + w - t
        if t == w and t <= 2 * d:
            _or_pass2(dest, d0, src, start, n, t - d)
            return
        if t == w:
            _or_pass(dest, d0, src, start, n, min(d, t - d), min(2 * d, t - d), t - d)
            return
        dst = t1 if level % 2 == 0 else t2
        _or_pass(dst, 0, src, start, m, min(d, t - d), min(2 * d, t - d), t - d)
        src, start = dst, 0
        d = t
        level += 1


@numba.njit(cache=True, nogil=True)
def _merge(dst, d0, a, a0, alo, ahi, b, b0, blo, bhi, n, whole, dst_is_a):
    """Row ``dst[d0:d0 + n] = a | b`` (rows at ``a0``, ``b0``) where ``a`` is zero outside
    ``[alo, ahi)`` and ``b`` outside ``[blo, bhi)``; written on the hull of both spans (and zeros on
    the rest of the row when ``whole``).

    ``dst`` may be ``a`` (say so with ``dst_is_a``: its own span is then left as it is) or ``b``.
    Returns the hull (``(0, 0)`` when both are empty).
    """
    zero = dst[0] ^ dst[0]
    if ahi <= alo:
        alo, ahi = blo, blo
    if bhi <= blo:
        blo, bhi = alo, alo
    lo, hi = min(alo, blo), max(ahi, bhi)
    if hi <= lo:
        if whole:
            _fill(dst, d0, n, zero)
        return 0, 0
    if whole:
        _fill(dst, d0, lo, zero)
        _fill(dst, d0 + hi, n - hi, zero)
    if alo == blo and ahi == bhi:
        _or_rows(dst, d0 + lo, a, a0 + lo, b, b0 + lo, hi - lo)
        return lo, hi
    c0, c1, c2, c3 = min(alo, blo), max(alo, blo), min(ahi, bhi), max(ahi, bhi)
    c1, c2 = min(c1, c2), max(c1, c2)
    for c in range(3):
        x, y = (c0, c1) if c == 0 else ((c1, c2) if c == 1 else (c2, c3))
        if y <= x:
            continue
        in_a = alo <= x and x < ahi
        in_b = blo <= x and x < bhi
        if in_a and in_b:
            _or_rows(dst, d0 + x, a, a0 + x, b, b0 + x, y - x)
        elif in_a:
            if not dst_is_a:
                _put(dst, d0 + x, a, a0 + x, y - x)
        elif in_b:
            _put(dst, d0 + x, b, b0 + x, y - x)
        else:
            _fill(dst, d0 + x, y - x, zero)
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _row_or(center, strips, base, pitch, present, ey, ex, r, c0, kx, nx, buf, t1, t2, dest, d0, fill):
    """Row ``r`` ORed along x over runs of ``kx`` into ``dest[d0:d0 + nx]``, on the span of outputs
    it can reach; returns that span (``(0, 0)``, ``dest`` untouched, for a zero row)."""
    blo, bhi = _fetch_row(center, strips, base, pitch, present, ey, ex, r, c0, nx + kx - 1, buf, fill)
    if bhi <= blo:
        return 0, 0
    lo, hi = max(0, blo - kx + 1), min(nx, bhi)
    zero = fill ^ fill
    _fill(buf, lo, blo - lo, zero)
    _fill(buf, bhi, hi + kx - 1 - bhi, zero)
    _run_or(buf, lo, kx, hi - lo, dest, d0 + lo, t1, t2)
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _or_box(center, strips, base, pitch, present, ey, ex, off, ny, nx, v0, v1, u0, u1, fill, out):
    """OR over the rectangle ``[v0, v1) x [u0, u1)`` of kernel taps: ``out[i, j]`` is the OR of the
    halo'd block at rows ``off + i + v0 ... off + i + v1 - 1``, columns ``off + j + u0 ... off + j + u1 - 1``.

    Separable: every input row is ORed along x over runs of ``u1 - u0`` (:func:`_run_or`), then the
    rows along y with van Herk/Gil-Werman segments of ``v1 - v0`` rows (a suffix OR inside the
    segment, a running prefix OR in the next one: 3 ORs per pixel whatever the height). Only two
    segments of row results live at a time (in cache). Each row result carries the span of columns
    where it can be non-zero, and every pass works on spans only: the empty parts of a mask cost
    a read and a write. ``out`` (flat, ``ny * nx``) must hold zeros: only rows and spans that can
    be non-zero are written (zeros from ``np.zeros`` on fresh memory then cost no page writes).
    """
    ky, kx = v1 - v0, u1 - u0
    dt = center.dtype
    width = nx + kx - 1
    buf, t1, t2 = np.empty(width, dt), np.empty(width, dt), np.empty(width, dt)
    seg, nxt = np.empty(ky * nx, dt), np.empty(ky * nx, dt)
    seg_s, nxt_s = np.zeros((ky, 2), np.int64), np.zeros((ky, 2), np.int64)
    pre = np.empty(nx, dt)
    r0, c0 = off + v0, off + u0
    for a in range(ky):
        seg_s[a, 0], seg_s[a, 1] = _row_or(center, strips, base, pitch, present, ey, ex, r0 + a, c0, kx, nx, buf, t1, t2,
                                           seg, a * nx, fill)
    s0 = 0
    while True:
        for a in range(ky - 2, -1, -1):  # suffix ORs (empty spans: nothing to do)
            if seg_s[a + 1, 1] > seg_s[a + 1, 0]:
                seg_s[a, 0], seg_s[a, 1] = _merge(seg, a * nx, seg, a * nx, seg_s[a, 0], seg_s[a, 1],
                                                  seg, (a + 1) * nx, seg_s[a + 1, 0], seg_s[a + 1, 1], nx, False, True)
        _merge(out, s0 * nx, seg, 0, seg_s[0, 0], seg_s[0, 1], seg, 0, 0, 0, nx, False, False)
        cnt = min(ky, ny - s0)
        plo, phi = 0, 0
        for a in range(1, cnt):
            rlo, rhi = _row_or(center, strips, base, pitch, present, ey, ex, r0 + s0 + ky + a - 1, c0, kx, nx, buf, t1, t2,
                               nxt, (a - 1) * nx, fill)
            nxt_s[a - 1, 0], nxt_s[a - 1, 1] = rlo, rhi
            if rhi > rlo:  # running prefix OR
                plo, phi = _merge(pre, 0, pre, 0, plo, phi, nxt, (a - 1) * nx, rlo, rhi, nx, False, True)
            _merge(out, (s0 + a) * nx, seg, a * nx, seg_s[a, 0], seg_s[a, 1], pre, 0, plo, phi, nx, False, False)
        s0 += ky
        if s0 >= ny:
            return out.reshape((ny, nx))
        for a in range(cnt - 1, ky):
            nxt_s[a, 0], nxt_s[a, 1] = _row_or(center, strips, base, pitch, present, ey, ex, r0 + s0 + a, c0, kx, nx, buf, t1,
                                               t2, nxt, a * nx, fill)
        seg, nxt = nxt, seg
        seg_s, nxt_s = nxt_s, seg_s


@numba.njit(cache=True, nogil=True)
def _or_footprint(center, strips, base, pitch, present, ey, ex, off, ny, nx, k, run_v, run_u, run_w, fill):
    """OR over runs of taps ``(v, u .. u + w - 1)`` of a ``k x k`` footprint, each input row read once.

    Every non-zero input row gets its doubled runs (widths 1, 2, 4, ...) once; each run then ORs
    two of them into the output row it feeds (2 ORs per run and pixel); zero rows are skipped.
    """
    dt = center.dtype
    out = np.zeros(ny * nx, dtype=dt)
    width = nx + k - 1
    top = 1
    for n in range(run_w.size):
        while 2 * top <= run_w[n]:
            top *= 2
    nlev = 1
    while (1 << nlev) <= top:
        nlev += 1
    lev = np.empty(nlev * width, dt)
    zero = fill ^ fill
    for r in range(ny + k - 1):
        lo, hi = _fetch_row(center, strips, base, pitch, present, ey, ex, off + r, off, width, lev, fill)
        if hi <= lo:
            continue
        _fill(lev, 0, lo, zero)
        _fill(lev, hi, width - hi, zero)
        for q in range(1, nlev):
            d = 1 << (q - 1)
            _or_pass2(lev, q * width, lev, (q - 1) * width, width - 2 * d + 1, d)
        for n in range(run_v.size):
            i = r - run_v[n]
            if i < 0 or i >= ny:
                continue
            w, u = run_w[n], run_u[n]
            q = 0
            while (2 << q) <= w:
                q += 1
            _or_into(out, i * nx, lev, q * width + u, w - (1 << q), nx)
    return out.reshape((ny, nx))


@numba.njit(cache=True, nogil=True)
def _or_into(dst, d0, src, s0, sh, n):
    """``dst[d0 + j] |= src[s0 + j] | src[s0 + j + sh]`` for ``j < n``."""
    d0, s0, sh = numba.uint64(d0), numba.uint64(s0), numba.uint64(sh)
    for j in range(numba.uint64(n)):
        dst[d0 + j] |= src[s0 + j] | src[s0 + j + sh]


def _footprint_runs(footprint: np.ndarray):
    """The non-zero taps as horizontal runs ``(v, u, width)`` and, when they fill their bounding
    rectangle, that rectangle ``(v0, v1, u0, u1)`` (else None); worked out once per footprint."""
    fp = np.asarray(footprint) != 0
    return _runs_of(fp.shape, np.packbits(fp).tobytes())


@functools.lru_cache(maxsize=64)
def _runs_of(shape: tuple[int, int], bits: bytes):
    fp = np.unpackbits(np.frombuffer(bits, np.uint8), count=shape[0] * shape[1]).reshape(shape).astype(bool)
    rows, cols = np.nonzero(fp)
    rect = None
    if rows.size and fp[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all():
        rect = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
    padded = np.zeros((fp.shape[0], fp.shape[1] + 2), np.int8)
    padded[:, 1:-1] = fp
    step = np.diff(padded, axis=1)
    sv, su = np.nonzero(step == 1)
    _, eu = np.nonzero(step == -1)
    runs = (sv.astype(np.int64), su.astype(np.int64), (eu - su).astype(np.int64))
    for r in runs:  # shared by every caller
        r.flags.writeable = False
    return runs, rect


def _flat(piece: np.ndarray | None, dtype) -> tuple[np.ndarray, int]:
    """A 2-D piece as a read-only flat unit-stride view of its memory and its row pitch (no copy
    when its rows are contiguous); one zero for a missing or empty piece (never read)."""
    if piece is None or piece.size == 0:
        piece = np.zeros((1, 1), dtype)
    if piece.dtype != dtype:
        piece = piece.astype(dtype)
    item = piece.itemsize
    if piece.strides[1] != item or piece.strides[0] % item or piece.strides[0] < 0:
        piece = np.ascontiguousarray(piece)
    if piece.flags.c_contiguous:  # whole rows: a plain reshape (as_strided costs microseconds)
        flat = piece.reshape(-1)
        flat.flags.writeable = False
        return flat, piece.shape[1]
    pitch = piece.strides[0] // item if piece.shape[0] > 1 else piece.shape[1]
    span = (piece.shape[0] - 1) * pitch + piece.shape[1]
    return np.lib.stride_tricks.as_strided(piece, shape=(span,), strides=(item,), writeable=False), pitch


def _dilate(pieces, ey, ex, off, shape, footprint, fill, dtype):
    """OR-dilate the halo'd block given by its nine pieces (row-major, None where missing)."""
    k = footprint.shape[0]
    ny, nx = shape
    (run_v, run_u, run_w), rect = _footprint_runs(footprint)
    if ny <= 0 or nx <= 0 or run_v.size == 0:
        return np.zeros((max(ny, 0), max(nx, 0)), dtype=dtype)
    center, pitch4 = _flat(pieces[4], dtype)
    # the eight edge strips, small, copied into one buffer (each read as one contiguous run)
    strips = [np.ascontiguousarray(p, dtype) if p is not None and p.size else np.zeros((1, 1), dtype)
              for k, p in enumerate(pieces) if k != 4]
    sizes = np.array([s.size for s in strips])
    base = np.insert(np.concatenate([[0], np.cumsum(sizes)[:-1]]), 4, 0).astype(np.int64)
    pitch = np.array([s.shape[1] for s in strips[:4]] + [pitch4] + [s.shape[1] for s in strips[4:]], np.int64)
    flat_strips = np.concatenate([s.ravel() for s in strips])
    flat_strips.flags.writeable = False
    args = (center, flat_strips, base, pitch, np.array([p is not None for p in pieces], np.bool_),
            np.asarray(ey, np.int64), np.asarray(ex, np.int64), off, ny, nx)
    fill = dtype.type(fill)
    if rect is not None:
        return _or_box(*args, *rect, fill, np.zeros(ny * nx, dtype=dtype))
    return _or_footprint(*args, k, run_v, run_u, run_w, fill)


def _check_footprint(footprint: np.ndarray) -> int:
    k = footprint.shape[0]
    if footprint.ndim != 2 or footprint.shape[1] != k or k % 2 == 0:
        raise ValueError(f"the footprint must be square and odd, got shape {footprint.shape}")
    return k // 2


def or_dilate(ext: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Bitwise OR of ``ext`` over the non-zero taps of ``footprint`` (odd, square), valid region.

    ``out[i, j] = OR ext[i + v, j + u]`` over the taps ``(v, u)``; integer or boolean arrays. A
    footprint whose taps fill a rectangle (the full box, a bar, one pixel) takes the separable
    path (``ceil(log4(width)) + 3`` ORs per pixel); any other goes by horizontal runs.
    """
    h = _check_footprint(footprint)
    is_bool = ext.dtype == np.bool_
    arr = ext.view(np.uint8) if is_bool else ext
    ny, nx = arr.shape[0] - 2 * h, arr.shape[1] - 2 * h
    pieces = (None,) * 4 + (arr,) + (None,) * 4
    out = _dilate(pieces, (0, 0, arr.shape[0], arr.shape[0]), (0, 0, arr.shape[1], arr.shape[1]), 0, (ny, nx),
                  footprint, 0, arr.dtype)
    return out.view(np.bool_) if is_bool else out


def or_dilate_halo(halo: Halo, footprint: np.ndarray, *, crop: int = 0, fill=0, dtype=None) -> np.ndarray:
    """:func:`or_dilate` of a :class:`Halo` without assembling it (the pieces are read row by row).

    ``crop`` pixels are dropped on every side of the halo'd block first (a halo deeper than the
    footprint's radius); missing pieces read as ``fill``; the pieces are read as ``dtype``
    (default: the block's own).
    """
    h = _check_footprint(footprint)
    dt = np.dtype(halo.pieces[1][1].dtype if dtype is None else dtype)
    ey, ex = halo.edges_y, halo.edges_x
    ny, nx = ey[3] - 2 * (h + crop), ex[3] - 2 * (h + crop)
    pieces = tuple(halo.pieces[i][j] for i in range(3) for j in range(3))
    return _dilate(pieces, ey, ex, crop, (ny, nx), footprint, fill, dt)
