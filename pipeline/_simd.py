"""Vector helpers for numba kernels, written as LLVM vector IR (no xarray, no dask here).

numba leaves short fixed-length loops (the 6 taps of a Lanczos-3 row) unrolled but scalar. The
intrinsics below emit ``<N x double>`` operations through llvmlite's IR builder instead; LLVM lowers
them to whatever vector unit the target has (AVX-512, AVX2, SSE2, NEON), so the code stays portable.
Multiplies and adds carry the ``contract`` flag: fused where the target has FMA, separate otherwise
(results differ between the two by rounding only).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_F64 = ir.DoubleType()
_I32 = ir.IntType(32)
_CONTRACT = ("contract",)


def lanes(m: int) -> int:
    """Vector length used for ``m`` taps: the smallest power of two ``>= m``."""
    v = 1
    while v < m:
        v *= 2
    return v


def _pieces(m: int) -> list[tuple[int, int]]:
    """``m`` split into power-of-two runs ``(offset, length)``, longest first (6 -> 4 + 2, 10 -> 8 + 2)."""
    out = []
    off = 0
    rest = m
    while rest:
        s = 1 << (rest.bit_length() - 1)
        out.append((off, s))
        off += s
        rest -= s
    return out


def _mask(values) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(values)), [ir.Constant(_I32, v) for v in values])


def _splat(builder, x, v):
    vec = builder.insert_element(ir.Constant(ir.VectorType(x.type, v), ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, vec, _mask([0] * v))


def _load_row(builder, ptr, elt, m, v, masked):
    """``m`` consecutive elements at ``ptr`` as a ``<v x elt>`` vector, lanes ``m ..`` zero.

    No byte past the ``m``-th element is read: ``masked``: one ``llvm.masked.load`` (a single masked
    instruction on AVX-512 and AVX2, lane by lane elsewhere); otherwise power-of-two runs combined
    by shuffles.
    """
    align = 4 if isinstance(elt, ir.FloatType) else 8
    vty = ir.VectorType(elt, v)
    if masked and m < v:
        suffix = "f32" if isinstance(elt, ir.FloatType) else "f64"
        mty = ir.VectorType(ir.IntType(1), v)
        fnty = ir.FunctionType(vty, [vty.as_pointer(), _I32, mty, vty])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.load.v{v}{suffix}.p0")
        mask = ir.Constant(mty, [ir.Constant(ir.IntType(1), int(i < m)) for i in range(v)])
        return builder.call(fn, [builder.bitcast(ptr, vty.as_pointer()), ir.Constant(_I32, align), mask,
                                 ir.Constant(vty, None)])
    acc = ir.Constant(vty, None)
    for off, s in _pieces(m):
        p = builder.gep(ptr, [ir.Constant(ir.IntType(64), off)]) if off else ptr
        if s == 1:
            x = builder.load(p, align=align)
            acc = builder.insert_element(acc, x, ir.Constant(_I32, off))
            continue
        pty = ir.VectorType(elt, s)
        piece = builder.load(builder.bitcast(p, pty.as_pointer()), align=align)
        if s == v:
            return piece
        # widen the run to v lanes (the rest from a zero vector), then take its lanes into acc
        wide = builder.shuffle_vector(piece, ir.Constant(pty, None),
                                      _mask([i - off if off <= i < off + s else s for i in range(v)]))
        acc = builder.shuffle_vector(acc, wide, _mask([v + i if off <= i < off + s else i for i in range(v)]))
    return acc


def _hsum(builder, vec, v):
    """Sum of the lanes of ``vec``: halves added pairwise (a fixed, target-independent order)."""
    while v > 1:
        h = v // 2
        lo = builder.shuffle_vector(vec, vec, _mask(list(range(h))))
        hi = builder.shuffle_vector(vec, vec, _mask(list(range(h, v))))
        vec = builder.fadd(lo, hi)
        v = h
    return builder.extract_element(vec, ir.Constant(_I32, 0))


def make_tap_sums(m: int, masked: bool = True):
    """An intrinsic ``tap_sums(img, var, offset, width, wx, wy, wy2, q) -> (sum_i, sum_v)`` for an ``m x m`` footprint.

    ``img``, ``var``: 1-D C-contiguous float32 or float64 arrays (a row-major image of row length
    ``width``, flattened); the footprint's first tap is element ``offset``. ``wx``, ``wy``, ``wy2``: 2-D
    C-contiguous float64 arrays holding the x weight, the y weight and its square of tap ``k`` of
    pixel ``q`` at ``[k, q]`` (column-major weights of a strip of pixels, as the warp kernel computes
    them in vectorised loops). Nothing is checked: the caller guarantees the shapes and that the
    footprint lies inside ``img`` and ``var``. ``masked``: rows are read by masked vector loads (else
    by power-of-two runs; neither reads past the footprint).

    Returns ``sum_ab wy[b] wx[a] img[b, a]`` and ``sum_ab wy2[b] wx[a]^2 var[b, a]`` in float64: per
    column, the rows are summed in ``lanes(m)``-long vectors (one multiply-add per row, the x weights'
    padding lanes zero), then the products with the x weights (or their squares) are summed over the
    lanes, halves added pairwise. Relative to ``sum |w_b w_a d_ba|`` the rounding error is at most
    ``(m + 3 + log2 lanes(m)) 2^-53``.
    """
    v = lanes(m)

    @intrinsic
    def tap_sums(typingctx, img, var, offset, width, wx, wy, wy2, q):
        for a in (img, var):
            if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                    and a.dtype in (types.float32, types.float64)):
                return None
        for a in (wx, wy, wy2):
            if not (isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" and a.dtype == types.float64):
                return None
        for a in (offset, width, q):
            if not isinstance(a, types.Integer):
                return None
        sig = types.UniTuple(types.float64, 2)(img, var, offset, width, wx, wy, wy2, q)

        def codegen(context, builder, signature, args):
            ta, tv, to, tw, twx, twy, twy2, tq = signature.args
            a_img, a_var, a_off, a_w, a_wx, a_wy, a_wy2, a_q = args
            i64 = ir.IntType(64)
            pi = context.make_array(ta)(context, builder, a_img).data
            pv = context.make_array(tv)(context, builder, a_var).data
            ax = context.make_array(twx)(context, builder, a_wx)
            ay = context.make_array(twy)(context, builder, a_wy)
            ay2 = context.make_array(twy2)(context, builder, a_wy2)
            off = context.cast(builder, a_off, to, types.int64)
            w = context.cast(builder, a_w, tw, types.int64)
            q64 = context.cast(builder, a_q, tq, types.int64)
            vty = ir.VectorType(_F64, v)
            # the x weights of pixel q (column q of wx) gathered into one vector, zero-padded
            sx = builder.extract_value(ax.shape, 1)
            pwx_q = cgutils.gep(builder, ax.data, q64)
            wxv = ir.Constant(vty, None)
            for a in range(m):
                xa = builder.load(cgutils.gep(builder, pwx_q, builder.mul(sx, ir.Constant(i64, a))), align=8)
                wxv = builder.insert_element(wxv, xa, ir.Constant(_I32, a))
            wx2 = builder.fmul(wxv, wxv)
            sy = builder.extract_value(ay.shape, 1)
            sy2 = builder.extract_value(ay2.shape, 1)
            pwy_q = cgutils.gep(builder, ay.data, q64)
            pwy2_q = cgutils.gep(builder, ay2.data, q64)
            acc_i = ir.Constant(vty, None)
            acc_v = ir.Constant(vty, None)
            elt_i = context.get_data_type(ta.dtype)
            elt_v = context.get_data_type(tv.dtype)
            for b in range(m):
                o = builder.add(off, builder.mul(w, ir.Constant(i64, b))) if b else off
                ri = _load_row(builder, cgutils.gep(builder, pi, o), elt_i, m, v, masked)
                rv = _load_row(builder, cgutils.gep(builder, pv, o), elt_v, m, v, masked)
                if elt_i != _F64:
                    ri = builder.fpext(ri, vty)
                if elt_v != _F64:
                    rv = builder.fpext(rv, vty)
                wyb = builder.load(cgutils.gep(builder, pwy_q, builder.mul(sy, ir.Constant(i64, b))), align=8)
                wy2b = builder.load(cgutils.gep(builder, pwy2_q, builder.mul(sy2, ir.Constant(i64, b))), align=8)
                acc_i = builder.fadd(acc_i, builder.fmul(_splat(builder, wyb, v), ri, flags=_CONTRACT), flags=_CONTRACT)
                acc_v = builder.fadd(acc_v, builder.fmul(_splat(builder, wy2b, v), rv, flags=_CONTRACT), flags=_CONTRACT)
            si = _hsum(builder, builder.fmul(acc_i, wxv), v)
            sv = _hsum(builder, builder.fmul(acc_v, wx2), v)
            return context.make_tuple(builder, signature.return_type, [si, sv])

        return sig, codegen

    return tap_sums


tap_sums_2 = make_tap_sums(2)
tap_sums_6 = make_tap_sums(6)
tap_sums_8 = make_tap_sums(8)
tap_sums_10 = make_tap_sums(10)
