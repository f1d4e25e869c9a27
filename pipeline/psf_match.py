"""Match an exposure's PSF to a model PSF: kernel bases, the kernel solve and lazy convolution.

The kernel is fitted on PSF *images* only (no pixels): both PSFs are realised at the centre of
every spatial cell, a kernel is fitted per cell by linear least squares, and a Chebyshev model of
the basis coefficients over the exposure is fitted to all cells together. The exposure is then
correlated with the spatially varying kernel through its linear-combination structure: with
spatial terms ``f_t(x, y)`` and component kernels ``K_t = sum_j a_jt B_j``,
``K(x, y) (x) I = sum_t f_t(x, y) (K_t (x) I)``, so the spatial weights are exact at every pixel
and no kernel image is interpolated between grid points. ``convolution='exact'`` correlates every
component (and every regrouped term of ``K²`` for the variance) in float64; the default
``'low-rank'`` correlates only the few kernel images that span the family within a stated L1
tolerance, checked on a dense grid of positions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask._task_spec import Task, TaskRef
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy import fft as sfft

from ._kernels_convolve import Halo, correlate_direct, correlate_lowrank, correlate_varying, or_dilate
from ._kernels_convolve import NonFiniteHalo, or_dilate_halo
from .errors import PsfMatchError, SchemaError
from .model.geometry import Box
from .model.masks import bitmask
from .model.schema import PSF_DIMS, data_ids, mask_planes, validate, with_provenance
from .psf import FWHM_PER_SIGMA, GridPsf, PsfModel

__all__ = [
    "PsfMatchError",
    "ModelPsfMatchConfig",
    "KernelModel",
    "MatchedPsf",
    "alard_lupton_basis",
    "alard_lupton_sigmas",
    "delta_function_basis",
    "regularization_matrix",
    "difference_operator",
    "spatial_terms",
    "solve_kernel_model",
    "convolve_kernel_model",
    "model_psf_match",
]

_FLOAT32_EPS = 1.19209290e-07


class ModelPsfMatchConfig(BaseModel):
    """Configuration of :func:`model_psf_match` (reference ``ModelPsfMatchConfig`` + ``PsfMatchConfigAL/DF``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kernel_basis: Literal["alard-lupton", "delta-function"] = Field(
        "alard-lupton", description="kernel basis set (kernelBasisSet)")
    kernel_size: int = Field(21, ge=3, le=101, description="odd kernel width in pixels (kernelSize)")
    scale_by_fwhm: bool = Field(
        False, description="derive Gaussian widths and kernel size from the PSF FWHMs (scaleByFwhm)")
    kernel_size_fwhm_scaling: float = Field(
        6.0, gt=0, le=50, description="kernel size = this x the widest basis sigma when scale_by_fwhm")
    kernel_size_min: int = Field(21, ge=3, le=101, description="smallest kernel size when scale_by_fwhm")
    kernel_size_max: int = Field(35, ge=3, le=101, description="largest kernel size when scale_by_fwhm")
    alard_n_gauss: int = Field(3, ge=1, le=10, description="number of Gaussians of the AL basis (alardNGauss)")
    alard_deg_gauss: tuple[int, ...] = Field(
        (4, 2, 2), description="polynomial degree per Gaussian, each 0..10 (alardDegGauss)")
    alard_sig_gauss: tuple[float, ...] = Field(
        (0.7, 1.5, 3.0), description="sigma in pixels per Gaussian, each in (0, 50] (alardSigGauss)")
    alard_gauss_beta: float = Field(2.0, gt=1, le=10, description="ratio of successive sigmas when scale_by_fwhm")
    alard_min_sig: float = Field(0.7, gt=0, le=20, description="smallest sigma when convolving (alardMinSig)")
    alard_min_sig_deconv: float = Field(
        0.4, gt=0, le=20, description="smallest sigma when deconvolving (alardMinSigDeconv)")
    spatial_model_type: Literal["chebyshev1", "polynomial"] = Field(
        "chebyshev1", description="spatial functions of the kernel coefficients (spatialModelType); "
        "'polynomial' uses monomials of the same [-1, 1]-scaled coordinates")
    spatial_kernel_order: int = Field(2, ge=0, le=6, description="order of the spatial model (spatialKernelOrder)")
    size_cell_x: int = Field(128, ge=32, le=8192, description="spatial cell width in pixels (sizeCellX)")
    size_cell_y: int = Field(128, ge=32, le=8192, description="spatial cell height in pixels (sizeCellY)")
    max_cells_per_axis: int = Field(
        12, ge=1, le=256, description="most cells per axis in the default layout (at least order+1 are used)")
    grow_cell_grid: bool = Field(
        False, description="reference cell layout: cells over the exposure grown by one cell per side (centres "
        "outside the exposure, PSFs extrapolated); default: at least order+1 cells per axis inside the exposure")
    do_auto_pad_psf: bool = Field(True, description="pad PSF stamps to auto_pad_psf_to x kernel_size (doAutoPadPsf)")
    auto_pad_psf_to: float = Field(1.4, ge=1.0, le=2.0, description="minimum stamp size / kernel size (autoPadPsfTo)")
    pad_psf_by: int = Field(0, ge=0, le=200, description="even number of pixels to pad stamps when not auto-padding")
    check_condition_number: bool = Field(
        False, description="raise when a normal matrix's eigenvalue ratio exceeds the limits below (numerically "
        "singular fits always raise)")
    max_condition_number: float | None = Field(
        None, gt=1, le=1e30,
        description="largest eigenvalue ratio of a per-cell normal matrix; None = 5e7 (AL) or 5e6 (delta)")
    max_spatial_condition_number: float = Field(
        1e10, gt=1, le=1e30, description="largest eigenvalue ratio of the spatial normal matrix")
    use_regularization: bool = Field(True, description="regularise the delta-function basis (useRegularization)")
    regularization_type: Literal["centralDifference", "forwardDifference"] = Field(
        "centralDifference", description="difference operator of the regularisation")
    central_regularization_stencil: Literal[5, 9] = Field(9, description="Laplacian stencil size, 5 or 9 points")
    forward_regularization_orders: tuple[int, ...] = Field(
        (1, 2), description="forward-difference orders, each 1..3")
    regularization_border_penalty: float = Field(3.0, ge=0, le=1e6, description="penalty of border pixels")
    lambda_value: float = Field(0.2, ge=0, le=1e12, description="absolute regularisation strength (lambdaValue)")
    flux_conservation: Literal["rescale", "reference"] = Field(
        "rescale",
        description="'rescale': divide the kernel by its fitted sum; 'reference': overwrite the constant "
        "coefficient by 1 as the reference does (adds the flux deficit as a narrow core)")
    declared_psf: Literal["achieved", "target"] = Field(
        "achieved",
        description="PSF declared on the output: 'achieved' = science PSF (x) fitted kernel on a grid of nodes; "
        "'target' = the reference model, as the reference does")
    convolution: Literal["low-rank", "exact"] = Field(
        "low-rank",
        description="'exact': float64 transforms of every spatial term of K (and of K² for the variance); "
        "'low-rank': float32 transforms of the few kernel images that span K (and K²) within "
        "max_kernel_error (max_variance_kernel_error), spatial weights still exact at every pixel")
    fft_precision: Literal["float64", "float32"] = Field(
        "float32",
        description="low-rank: precision of the transforms. float32 (default) is about 1.7x faster; its "
        "rounding, <= 1e-6 x L1(K) x the largest |pixel - tile mean| in the FFT tile, depends on the chunking. "
        "float64 rounds below the float32 output: results equal across chunkings to output rounding")
    max_kernel_error: float = Field(
        1e-3, gt=0, le=0.1,
        description="low-rank: largest L1 norm of (approximate - exact) kernel relative to the kernel sum, "
        "at every pixel (image error <= this x the largest |pixel - tile mean| under the kernel)")
    max_variance_kernel_error: float = Field(
        2e-2, gt=0, le=0.1,
        description="low-rank: largest L1 norm of the error of K² relative to sum(K²) at every pixel "
        "(relative variance error <= this x max/min variance under the kernel)")
    low_rank_region: int = Field(
        1000, ge=0, le=1_000_000,
        description="low-rank: side in pixels of the square regions (a fixed grid from the exposure's first "
        "pixel) over whose own pixels the kernel images are chosen; smaller regions see less of the "
        "kernel's variation and need fewer images, at a fixed cost per region. Results do not depend on the "
        "chunking; chunks that are multiples of it cost least. 0: one set for the whole exposure")

    @field_validator("low_rank_region")
    @classmethod
    def _check_region(cls, v: int) -> int:
        if 0 < v < 64:
            raise ValueError(f"low_rank_region must be 0 (whole exposure) or at least 64 px, got {v}")
        return v

    solve_tolerance: float = Field(
        5e-4, ge=0, le=0.1,
        description="truncated-SVD solve (per cell and spatial fit): use the fewest singular directions of the "
        "design whose achieved PSF departs from the target by at most this x the target peak anywhere on the "
        "stamp, or by at most solve_residual_factor x the full-rank departure when that is larger; directions "
        "the fit does not need get no coefficient and add no noise gain sum(K²). 0 = invert every singular "
        "value, as the reference does")
    solve_residual_factor: float = Field(
        1.3, ge=1, le=100,
        description="truncated-SVD solve: largest allowed ratio of the truncated to the full-rank largest PSF "
        "residual, for targets the basis cannot reach within solve_tolerance")
    spatial_fit: Literal["uniform", "reference"] = Field(
        "uniform",
        description="truncated solve only: 'uniform' raises the spatial order from spatial_kernel_order up to "
        "max_spatial_kernel_order as the PSFs need, weights the cells by cell_weight_power of the residual the "
        "basis reaches there alone and judges the truncation on a grid of up to 17 x 17 positions, so that the "
        "match is about as good everywhere; 'reference': spatial_kernel_order, equal weights, up to 9 x 9 "
        "positions (solve_tolerance=0 always solves as the reference does)")
    cell_weight_power: float = Field(
        3.0, ge=0, le=6, description="spatial_fit='uniform': cells weigh (their single-cell full-rank residual, at "
        "least solve_tolerance) to this power in the spatial fit; 0 = equal weights, larger evens the residual "
        "over the exposure at the expense of the easiest cells")
    max_spatial_kernel_order: int = Field(
        4, ge=0, le=6, description="spatial_fit='uniform': highest spatial order the PSFs may ask for; at most "
        "spatial_kernel_order keeps that order fixed")
    spatial_order_factor: float = Field(
        1.2, ge=1, le=100, description="spatial_fit='uniform': the spatial order grows (up to "
        "max_spatial_kernel_order) until the full-rank spatial fit's largest residual over the judging grid is "
        "at most this x the largest single-cell full-rank residual (or solve_tolerance)")
    max_width_ratio: float = Field(
        1.0, gt=0, le=10,
        description="raise when the science FWHM exceeds this x the target FWHM at a cell (deconvolution)")

    @model_validator(mode="after")
    def _check(self):
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.kernel_size_min > self.kernel_size_max:
            raise ValueError(f"kernel_size_min {self.kernel_size_min} exceeds kernel_size_max {self.kernel_size_max}")
        if len(self.alard_deg_gauss) != self.alard_n_gauss or len(self.alard_sig_gauss) != self.alard_n_gauss:
            raise ValueError(
                f"alard_deg_gauss {self.alard_deg_gauss} and alard_sig_gauss {self.alard_sig_gauss} need "
                f"alard_n_gauss={self.alard_n_gauss} entries")
        if any(not 0 <= d <= 10 for d in self.alard_deg_gauss):
            raise ValueError(f"alard_deg_gauss entries must be in 0..10, got {self.alard_deg_gauss}")
        if any(not 0 < s <= 50 for s in self.alard_sig_gauss):
            raise ValueError(f"alard_sig_gauss entries must be in (0, 50], got {self.alard_sig_gauss}")
        if self.pad_psf_by % 2:
            raise ValueError(f"pad_psf_by must be even, got {self.pad_psf_by}")
        if any(o not in (1, 2, 3) for o in self.forward_regularization_orders):
            raise ValueError(f"forward_regularization_orders must be in 1..3, got {self.forward_regularization_orders}")
        if self.flux_conservation == "reference" and self.kernel_basis != "alard-lupton":
            raise ValueError("flux_conservation='reference' needs the alard-lupton basis (constant first term)")
        return self

    @property
    def condition_limit(self) -> float:
        if self.max_condition_number is not None:
            return self.max_condition_number
        return 5.0e7 if self.kernel_basis == "alard-lupton" else 5.0e6


# ----------------------------------------------------------------------------------------------
# bases


def _monomials(degree: int):
    for n in range(degree + 1):
        for a in range(n, -1, -1):
            yield a, n - a


def alard_lupton_basis(kernel_size: int, sigmas, degrees) -> np.ndarray:
    """The Alard-Lupton basis, shape ``(J, k, k)``, renormalised as the reference does.

    Per Gaussian (point-sampled, sum 1) and per monomial ``x^a y^b`` of total degree <= d
    (``x = u/h``, ``y = v/h``; order ``1, x, y, x², xy, y², ...``) one image ``G x^a y^b``. Then the
    first image keeps sum 1, every other one with a non-negligible sum becomes ``B/sum(B) - B_0``,
    and all but the first are scaled to unit L2 norm. Hence the kernel sum is the first coefficient.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise PsfMatchError(f"kernel size must be a positive odd integer, got {kernel_size}")
    if len(sigmas) != len(degrees):
        raise PsfMatchError(f"{len(sigmas)} sigmas but {len(degrees)} degrees")
    h = kernel_size // 2
    u = np.arange(-h, h + 1, dtype=np.float64)
    xs, ys = (u / h)[None, :], (u / h)[:, None]
    raw = []
    for sigma, degree in zip(sigmas, degrees):
        g = np.exp(-(u[None, :] ** 2 + u[:, None] ** 2) / (2.0 * sigma * sigma))
        g /= g.sum()
        for a, b in _monomials(int(degree)):
            raw.append(g * xs**a * ys**b)
    basis = np.array(raw)
    basis[0] /= basis[0].sum()
    for i in range(1, len(basis)):
        s = basis[i].sum()
        if abs(s) > _FLOAT32_EPS:
            basis[i] = basis[i] / s - basis[0]
        norm = math.sqrt((basis[i] ** 2).sum())
        if not norm > 0:
            raise PsfMatchError(
                f"basis function {i} vanishes after renormalisation (repeated Gaussian sigmas {tuple(sigmas)}?)")
        basis[i] /= norm
    return basis


def alard_lupton_sigmas(config: ModelPsfMatchConfig, fwhm_science: float | None, fwhm_target: float | None):
    """Gaussian sigmas and kernel size of the AL basis (reference ``generateAlardLuptonBasisList``)."""
    sigmas = tuple(config.alard_sig_gauss)
    if not config.scale_by_fwhm or fwhm_science is None or fwhm_target is None:
        return sigmas, config.kernel_size
    s_sci, s_ref = fwhm_science / FWHM_PER_SIGMA, fwhm_target / FWHM_PER_SIGMA
    if s_sci == s_ref:
        return sigmas, config.kernel_size
    if s_ref > s_sci:
        a, b, min_sig = s_ref, s_sci, config.alard_min_sig
    else:
        a, b, min_sig = s_sci, s_ref, config.alard_min_sig_deconv
    s_k = max(math.sqrt(a * a - b * b), min_sig)
    first = max(min_sig, s_k / config.alard_gauss_beta) if config.alard_n_gauss > 1 else s_k
    sigmas = tuple(first * config.alard_gauss_beta**i for i in range(config.alard_n_gauss))
    size = int(config.kernel_size_fwhm_scaling * sigmas[-1])
    size += 1 - size % 2
    size = min(max(size, config.kernel_size_min), config.kernel_size_max)
    size += 1 - size % 2
    return sigmas, size


def delta_function_basis(kernel_size: int) -> np.ndarray:
    """``k²`` single-pixel kernels ordered row-major (row = y), shape ``(k², k, k)``."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise PsfMatchError(f"kernel size must be a positive odd integer, got {kernel_size}")
    n = kernel_size * kernel_size
    return np.eye(n).reshape(n, kernel_size, kernel_size)


_FORWARD = {1: (-1.0, 1.0), 2: (-1.0, 2.0, -1.0), 3: (-1.0, 3.0, -3.0, 1.0)}


def difference_operator(
    kernel_size: int,
    *,
    kind: str = "centralDifference",
    stencil: int = 9,
    orders=(1, 2),
    border_penalty: float = 3.0,
) -> np.ndarray:
    """The difference operator ``B`` of the delta-function regularisation (rows x ``k²``).

    Central difference: the 5- or 9-point Laplacian on interior pixels, ``border_penalty`` on the
    diagonal of border pixels. Forward difference: x and y forward differences of each order
    stacked, the order tapering near the far edge and ``border_penalty`` at the edge itself.
    """
    k = kernel_size
    n = k * k
    idx = np.arange(n).reshape(k, k)
    if kind == "centralDifference":
        if stencil == 5:
            taps = {(0, 0): -4.0, (-1, 0): 1.0, (1, 0): 1.0, (0, -1): 1.0, (0, 1): 1.0}
        elif stencil == 9:
            taps = {(dy, dx): w / 6.0 for (dy, dx), w in {
                (0, 0): -20.0, (-1, 0): 4.0, (1, 0): 4.0, (0, -1): 4.0, (0, 1): 4.0,
                (-1, -1): 1.0, (-1, 1): 1.0, (1, -1): 1.0, (1, 1): 1.0}.items()}
        else:
            raise PsfMatchError(f"central regularisation stencil must be 5 or 9, got {stencil}")
        b = np.zeros((n, n))
        for i in range(k):
            for j in range(k):
                row = idx[i, j]
                if 0 < i < k - 1 and 0 < j < k - 1:
                    for (dy, dx), w in taps.items():
                        b[row, idx[i + dy, j + dx]] += w
                else:
                    b[row, row] = border_penalty
        return b
    if kind == "forwardDifference":
        blocks = []
        for order in orders:
            if order not in _FORWARD:
                raise PsfMatchError(f"forward regularisation order must be 1..3, got {order}")
            for axis in (0, 1):
                b = np.zeros((n, n))
                for i in range(k):
                    for j in range(k):
                        row = idx[i, j]
                        pos = j if axis == 1 else i
                        o = min(order, k - 1 - pos)
                        if o == 0:
                            b[row, row] = border_penalty
                            continue
                        for m, w in enumerate(_FORWARD[o]):
                            col = idx[i, j + m] if axis == 1 else idx[i + m, j]
                            b[row, col] += w
                blocks.append(b)
        return np.vstack(blocks)
    raise PsfMatchError(f"unknown regularisation type {kind!r}")


def regularization_matrix(kernel_size: int, **kwargs) -> np.ndarray:
    """``H = BᵀB`` (``k² x k²``) of :func:`difference_operator`; normal equations become ``(M + λH) a = b``."""
    b = difference_operator(kernel_size, **kwargs)
    return b.T @ b


# ----------------------------------------------------------------------------------------------
# spatial model


def _spatial_pairs(order: int) -> list[tuple[int, int]]:
    return list(_monomials(order))


def _scaled(v, lo: float, hi: float):
    return (2.0 * np.asarray(v, dtype=np.float64) - (lo + hi)) / (hi - lo)


def _axis_terms(v, order: int, kind: str) -> np.ndarray:
    """``(order + 1, ...)`` values of T_0..T_order (or 1, v, v², ...) at scaled coordinates ``v``."""
    v = np.asarray(v, dtype=np.float64)
    out = np.empty((order + 1,) + v.shape)
    out[0] = 1.0
    if order >= 1:
        out[1] = v
    for n in range(2, order + 1):
        out[n] = 2.0 * v * out[n - 1] - out[n - 2] if kind == "chebyshev1" else v * out[n - 1]
    return out


def spatial_terms(x, y, box: tuple[float, float, float, float], order: int, kind: str = "chebyshev1") -> np.ndarray:
    """Spatial functions ``f_t(x, y)``, shape ``(T, ...)``, ordered ``1, x, y, x², xy, y², ...``.

    ``box = (xmin, ymin, xmax, ymax)`` is the continuous box mapped to ``[-1, 1]``.
    """
    tx = _axis_terms(_scaled(x, box[0], box[2]), order, kind)
    ty = _axis_terms(_scaled(y, box[1], box[3]), order, kind)
    return np.array([tx[a] * ty[b] for a, b in _spatial_pairs(order)])


# ----------------------------------------------------------------------------------------------
# kernel model


@dataclass(frozen=True)
class KernelModel:
    """A spatially varying kernel ``K(x, y) = sum_j c_j(x, y) B_j`` with ``c_j = sum_t a_jt f_t(x, y)``.

    ``kernel_image`` returns the kernel as applied: divided by its sum at that position (the
    reference convolves with normalisation on). ``report`` holds the per-cell diagnostics of the
    fit (achieved PSF, residual against the target, FWHMs, kernel sums); it is not needed to
    apply the kernel and is left out of dask graphs.
    """

    basis: np.ndarray
    coefficients: np.ndarray
    box: tuple[float, float, float, float]
    order: int
    spatial_model_type: str = "chebyshev1"
    kernel_sum_fit: float = 1.0
    flux_conservation: str = "rescale"
    report: xr.Dataset | None = field(default=None, repr=False, compare=False)

    def __reduce__(self):
        # the report is a diagnostic for people; it does not travel with the model
        return (KernelModel, (self.basis, self.coefficients, self.box, self.order, self.spatial_model_type,
                              self.kernel_sum_fit, self.flux_conservation))

    @property
    def kernel_size(self) -> int:
        return int(self.basis.shape[1])

    @property
    def radius(self) -> int:
        return self.kernel_size // 2

    def spatial_terms(self, x, y) -> np.ndarray:
        return spatial_terms(x, y, self.box, self.order, self.spatial_model_type)

    def component_kernels(self) -> np.ndarray:
        """``K_t = sum_j a_jt B_j``, shape ``(T, k, k)`` (un-normalised)."""
        return np.tensordot(self.coefficients.T, self.basis, axes=1)

    def raw_kernel(self, x: float, y: float) -> np.ndarray:
        f = self.spatial_terms(x, y)
        return np.tensordot(f, self.component_kernels(), axes=1)

    def kernel_sum(self, x: float, y: float) -> float:
        """Sum of the kernel as fitted (before normalisation) at ``(x, y)``."""
        return float(self.raw_kernel(x, y).sum())

    def kernel_image(self, x: float, y: float) -> np.ndarray:
        """The kernel applied at parent pixel ``(x, y)``: sums to 1."""
        k = self.raw_kernel(x, y)
        return k / k.sum()

    def achieved_psf(self, science_psf: PsfModel, x: float, y: float, *, size: int | None = None) -> np.ndarray:
        """The science PSF at ``(x, y)`` correlated with the applied kernel (same stamp ``size``)."""
        size = science_psf.default_size(x, y) if size is None else size
        s = science_psf.image_at(x, y, size=size)
        h = self.radius
        return correlate_direct(np.pad(s, h), self.kernel_image(x, y))

    def noise_correlation(self, x: float, y: float) -> np.ndarray:
        """Correlation coefficients of matched white noise at lags ``(dy, dx)``, shape ``(2k-1, 2k-1)``."""
        k = self.kernel_image(x, y)
        h = k.shape[0] - 1
        acf = correlate_direct(np.pad(k, h), k)
        return acf / acf[h, h]

    def noise_correlation_factor(self, x: float, y: float) -> float:
        """Variance of a large sum of matched white noise / the sum of its pixel variances: ``1/sum(K²)``.

        (``(sum K)² / sum K²`` with ``sum K = 1``; the variance plane ``K² (x) V`` is the marginal
        per-pixel variance and ignores this correlation.)
        """
        k = self.kernel_image(x, y)
        return float(1.0 / (k * k).sum())


class MatchedPsf(PsfModel):
    """The PSF of a matched exposure: a science PSF correlated with a kernel model's applied kernel."""

    def __init__(self, science_psf: PsfModel, kernel_model: KernelModel, size: int):
        self.science_psf, self.kernel_model, self.size = science_psf, kernel_model, int(size)

    def __repr__(self):
        return f"MatchedPsf({self.science_psf!r}, size={self.size})"

    def default_size(self, x, y):
        return self.size

    def sigma_guess(self, x, y):
        return self.science_psf.sigma_guess(x, y)

    def _render(self, x, y, size):
        return self.kernel_model.achieved_psf(self.science_psf, x, y, size=size)


# ----------------------------------------------------------------------------------------------
# solve


def _check_cond(cond: float, n: int, limit: float | None, what: str, ids) -> None:
    if not cond < 1.0 / (n * np.finfo(float).eps) ** 2:
        raise PsfMatchError(
            f"{what}: the fit is numerically singular (eigenvalue ratio {cond:.3g}); there are fewer independent "
            "constraints than basis functions: use fewer basis functions, a smaller kernel, larger PSF "
            "stamps or regularisation", ids=ids)
    if limit is not None and not cond <= limit:
        raise PsfMatchError(
            f"{what}: normal matrix is ill-conditioned (eigenvalue ratio {cond:.3g} > {limit:.3g}); "
            "use fewer or wider basis functions, a smaller kernel, or larger PSF stamps", ids=ids)


def _cond_of(sv: np.ndarray, n: int) -> float:
    """Eigenvalue ratio of the normal matrix from the design's singular values."""
    if sv.size < n or not sv[-1] > 0:
        return math.inf
    return float((sv[0] / sv[-1]) ** 2)


def _stamp_designs(stamps: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Achieved-PSF columns of every stamp: ``out[n, :, j]`` = zero-padded stamp ``n`` correlated with ``B_j``.

    Shape ``(N, S², J)`` (whole stamp, row-major). Its central ``(S - 2h)²`` pixels are the
    reference's valid-region design. One batch of transforms for all stamps and basis images.
    """
    n, s, _ = stamps.shape
    h = basis.shape[1] // 2
    size = sfft.next_fast_len(s + h, real=True)  # wrapped sums land on the zero padding only
    fs = sfft.rfft2(stamps, s=(size, size))
    fb = np.conj(sfft.rfft2(basis, s=(size, size)))
    idx = (np.arange(s) - h) % size  # c[d] = sum_i s[i + d] B[i], output pixel y reads d = y - h
    out = np.empty((n, s * s, basis.shape[0]))
    for i in range(0, n, 16):
        c = sfft.irfft2(fs[i:i + 16, None] * fb[None], s=(size, size))[:, :, idx[:, None], idx[None, :]]
        out[i:i + 16] = c.reshape(c.shape[0], c.shape[1], s * s).transpose(0, 2, 1)
    return out


def _rank_candidates(d: np.ndarray, r: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncated-SVD solutions of ``d a = r`` at every rank, batched over leading axes.

    ``d`` ``(..., m, J)``, ``r`` ``(..., m)``; the first ``first`` (0 or 1) columns are always
    kept and projected out of the others, which are truncated. Returns ``sols`` ``(..., J, K)``
    (column ``k``: ``k + 1`` singular directions of the rest, built as cumulative sums of rank-one
    terms) and the singular values ``(..., K)``.
    """
    rest, rr = d[..., first:], r
    if first:
        d0 = d[..., :1]
        q = d0 / np.linalg.norm(d0, axis=-2, keepdims=True)
        rest = rest - q @ (q.swapaxes(-1, -2) @ rest)
        rr = r - (q @ (q.swapaxes(-1, -2) @ r[..., None]))[..., 0]
    u, sv, vt = np.linalg.svd(rest, full_matrices=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.einsum("...mk,...m->...k", u, rr) / sv
    sols = np.zeros(d.shape[:-2] + (d.shape[-1], sv.shape[-1]))
    sols[..., first:, :] = np.cumsum(vt.swapaxes(-1, -2) * coef[..., None, :], axis=-1)
    if first:
        left = r[..., None] - d[..., first:] @ sols[..., first:, :]
        sols[..., 0, :] = np.einsum("...m,...mk->...k", d0[..., 0], left) / (d0[..., 0] ** 2).sum(axis=-1)[..., None]
    return sols, sv


def _candidate_residuals(full: np.ndarray, target: np.ndarray, peak: np.ndarray, sols: np.ndarray,
                         bsum: np.ndarray | None) -> np.ndarray:
    """Largest ``|achieved - target| / peak`` over the whole stamp per position and candidate.

    ``full`` ``(P, S², J)`` whole-stamp designs, ``target`` ``(P, S²)``, ``peak`` ``(P,)``,
    ``sols`` ``(P, J, K)``; ``bsum``: basis sums, to judge each kernel rescaled to unit sum as
    it will be applied (None: as fitted). Returns ``(P, K)``.
    """
    if bsum is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            sols = sols / np.einsum("j,pjk->pk", bsum, sols)[:, None, :]
    out = np.empty((full.shape[0], sols.shape[-1]))
    for i in range(0, full.shape[0], 8):
        diff = full[i:i + 8] @ sols[i:i + 8] - target[i:i + 8, :, None]
        out[i:i + 8] = np.abs(diff).max(axis=1) / peak[i:i + 8, None]
    return np.where(np.isfinite(out), out, np.inf)


def _scan_ranks(worst, n: int, tol: float, factor: float, step: int = 8) -> int:
    """Smallest rank whose largest residual ``worst(ranks)`` is <= max(tol, factor x the full-rank one).

    ``worst`` maps an array of ranks to their largest residuals. Ranks are scanned every ``step``
    and then one by one below the first accepted one, so that a few dozen of a few hundred
    candidates are evaluated.
    """
    if n <= 2 * step:
        return _truncation_rank(worst(np.arange(1, n + 1)), tol, factor)
    coarse = np.unique(np.append(np.arange(step, n + 1, step), n))
    w = worst(coarse)
    limit = max(tol, factor * w[-1])
    hit = int(np.nonzero(w <= limit)[0][0])  # the full rank itself is always accepted
    lo = int(coarse[hit - 1]) + 1 if hit else 1
    fine = np.arange(lo, int(coarse[hit]))
    if fine.size:
        wf = worst(fine)
        ok = np.nonzero(wf <= limit)[0]
        if ok.size:
            return int(fine[ok[0]])
    return int(coarse[hit])


def _truncation_rank(worst: np.ndarray, tol: float, factor: float) -> int:
    """Smallest rank whose largest PSF residual ``worst[rank - 1]`` is <= max(tol, factor x the full-rank one)."""
    worst = np.where(np.isfinite(worst), worst, np.inf)
    ok = np.nonzero(worst <= max(tol, factor * worst[-1]))[0]
    return int(ok[0]) + 1 if ok.size else worst.size


def _solve_normal(m: np.ndarray, b: np.ndarray, *, limit: float | None, what: str, ids) -> tuple[np.ndarray, float]:
    """``m a = b`` for a symmetric positive (semi-)definite ``m`` by eigen-decomposition."""
    w, q = np.linalg.eigh(m)
    cond = math.inf if w[0] <= 0 else float(w[-1] / w[0])
    if not w[0] > w[-1] * m.shape[0] * np.finfo(float).eps:
        raise PsfMatchError(
            f"{what}: the fit is numerically singular (eigenvalue ratio {cond:.3g}); use fewer basis functions, "
            "a smaller kernel, larger PSF stamps or stronger regularisation", ids=ids)
    if limit is not None and not cond <= limit:
        raise PsfMatchError(
            f"{what}: normal matrix is ill-conditioned (eigenvalue ratio {cond:.3g} > {limit:.3g}); "
            "use fewer or wider basis functions, a smaller kernel, or larger PSF stamps", ids=ids)
    a = q @ ((q.T @ b) / w)
    if not np.all(np.isfinite(a)):
        raise PsfMatchError(f"{what}: unable to determine the kernel solution (non-finite coefficients)", ids=ids)
    return a, cond


def _cells(box: Box, cx: int, cy: int, *, grow: bool, min_cells: int, max_cells: int = 256) -> tuple[Box, np.ndarray, np.ndarray]:
    """Cell centres and the box of the spatial model.

    ``grow``: the reference layout, cells of ``cx x cy`` over the box grown by one cell per side
    (centres may lie outside the exposure). Otherwise ``size // cell + 1`` nodes per axis, at least
    ``min_cells`` and at most ``max_cells``, span the exposure from its first to its last pixel.
    """
    if grow:
        outer = Box(box.x0 - cx, box.y0 - cy, box.x1 + cx, box.y1 + cy)
        ncx, ncy = outer.width // cx, outer.height // cy  # >= 2: the box is grown by one cell per side
        xs = outer.x0 + cx * np.arange(ncx) + cx // 2
        ys = outer.y0 + cy * np.arange(ncy) + cy // 2
    else:
        outer = box
        top = max(max_cells, min_cells)
        ncx = min(max(box.width // cx + 1, min_cells), top)
        ncy = min(max(box.height // cy + 1, min_cells), top)
        xs = np.linspace(box.x0, box.x1 - 1, ncx)
        ys = np.linspace(box.y0, box.y1 - 1, ncy)
    gx, gy = np.meshgrid(xs, ys)
    return outer, gx.ravel().astype(np.float64), gy.ravel().astype(np.float64)


def _check_kernel_sums(sums: np.ndarray, ids) -> np.ndarray:
    if not np.all(np.isfinite(sums)) or np.any(sums <= 0):
        raise PsfMatchError(
            f"the fitted kernel sum is not positive and finite at every cell (min {np.nanmin(sums):.3g}); "
            "cannot normalise the kernel", ids=ids)
    return sums


def _stamp_size(native: int, ksize: int, config: ModelPsfMatchConfig, ids) -> int:
    """PSF stamp size of the fit (reference ``_buildCellSet`` steps 5-6), checked against the kernel."""
    if config.do_auto_pad_psf:
        size = native + max(0, _next_odd(ksize * config.auto_pad_psf_to) - native)
    else:
        size = native + config.pad_psf_by
    max_kernel = size - 1
    if max_kernel % 2 == 0:
        max_kernel -= 1
    if ksize > max_kernel:
        raise PsfMatchError(
            f"kernel size {ksize} is larger than PSF stamps of {size} px allow (at most {max_kernel}); "
            "use a smaller kernel, enable do_auto_pad_psf or raise pad_psf_by", ids=ids)
    return size


def _next_odd(v: float) -> int:
    c = int(math.ceil(v))
    return c if c % 2 else c + 1


def _spatial_basis(cxs, cys, cbox, order: int, kind: str, n_b: int, first: int, whiten: bool):
    """Spatial terms at the cells ``(n_cells, T)``, the triangular factor that undoes their
    orthonormalisation (identity when not whitened), the free ``(j, t)`` entries and whether whitened.

    When truncating, the terms are made orthonormal over the cells (``phi = Q R``, coefficients
    ``c = R a``), so that the singular directions are those of the kernel basis and not of the cell
    layout. With a constant first basis function (``first``), only its constant term is free.
    """
    phi = spatial_terms(cxs, cys, cbox, order, kind).T
    n_t = phi.shape[1]
    free = np.ones((n_b, n_t), dtype=bool)
    if first:
        free[0, 1:] = False
    phi_r = np.eye(n_t)
    whiten = whiten and phi.shape[0] >= n_t
    if whiten:
        phi, phi_r = np.linalg.qr(phi)
    return phi, phi_r, free.ravel(), whiten


def _layout(box: Box, order: int, config: ModelPsfMatchConfig):
    return _cells(box, config.size_cell_x, config.size_cell_y, grow=config.grow_cell_grid,
                  min_cells=order + 1, max_cells=config.max_cells_per_axis)


def _grid(box: Box, nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    gx, gy = np.meshgrid(np.linspace(box.x0, box.x1 - 1, nx), np.linspace(box.y0, box.y1 - 1, ny))
    return gx.ravel().astype(np.float64), gy.ravel().astype(np.float64)


def _realise(psf: PsfModel, xs, ys, size: int) -> np.ndarray:
    return np.array([psf.image_at(x, y, size=size) for x, y in zip(xs, ys)])


def solve_kernel_model(
    science_psf: PsfModel,
    reference_psf: PsfModel,
    box: Box,
    *,
    config: ModelPsfMatchConfig = ModelPsfMatchConfig(),
    ids=None,
) -> tuple[KernelModel, int]:
    """Fit the spatially varying kernel that turns ``science_psf`` into ``reference_psf`` over ``box``.

    Runs on PSF images only (cheap, eager). Returns the kernel model (with its ``report``) and the
    PSF stamp size used, which is also the size of the declared output PSF. The solve is described
    in the Notes of :func:`model_psf_match`.
    """
    ids = dict(ids or {})
    regularised = config.kernel_basis == "delta-function" and config.use_regularization
    truncate = not regularised and config.solve_tolerance > 0
    uniform = truncate and config.spatial_fit == "uniform"
    order = config.spatial_kernel_order
    kind = config.spatial_model_type
    orders = [order]
    if uniform and not config.grow_cell_grid:
        # candidate orders up to max_spatial_kernel_order, cells laid out for the highest
        orders = list(range(order, max(order, config.max_spatial_kernel_order) + 1))
    grown, cxs, cys = _layout(box, orders[-1], config)
    centre = ((box.x0 + box.x1 - 1) / 2.0, (box.y0 + box.y1 - 1) / 2.0)

    try:
        psf_size = max(int(science_psf.default_size(x, y)) for x, y in zip(cxs, cys))
        fwhm_sci = np.array([science_psf.fwhm(x, y) for x, y in zip(cxs, cys)])
        fwhm_ref = np.array([reference_psf.fwhm(x, y) for x, y in zip(cxs, cys)])
    except (ValueError, SchemaError) as exc:
        raise PsfMatchError(f"cannot evaluate the PSF shape at the cell centres: {exc}", ids=ids) from None
    worst = int(np.argmax(fwhm_sci / fwhm_ref))
    if fwhm_sci[worst] > config.max_width_ratio * fwhm_ref[worst]:
        raise PsfMatchError(
            f"science PSF FWHM {fwhm_sci[worst]:.3f} px exceeds {config.max_width_ratio} x the target FWHM "
            f"{fwhm_ref[worst]:.3f} px at ({cxs[worst]:.0f}, {cys[worst]:.0f}): matching would be a "
            "deconvolution; choose a wider target PSF", ids=ids)

    if config.kernel_basis == "alard-lupton":
        sigmas, ksize = alard_lupton_sigmas(config, float(np.mean(fwhm_sci)), float(np.mean(fwhm_ref)))
        basis = alard_lupton_basis(ksize, sigmas, config.alard_deg_gauss)
    else:
        sigmas, ksize = (), config.kernel_size
        basis = delta_function_basis(ksize)
    h = ksize // 2

    psf_size = _stamp_size(psf_size, ksize, config, ids)

    reg = None
    if regularised:
        reg = config.lambda_value * regularization_matrix(
            ksize, kind=config.regularization_type, stencil=config.central_regularization_stencil,
            orders=config.forward_regularization_orders, border_penalty=config.regularization_border_penalty)

    n_b = basis.shape[0]
    limit = config.condition_limit if config.check_condition_number else None
    cbox = (grown.x0 - 0.5, grown.y0 - 0.5, grown.x1 - 0.5, grown.y1 - 0.5)
    n_c = cxs.size
    bsum = basis.sum(axis=(1, 2))
    norm = bsum if config.flux_conservation == "rescale" else None
    first = 1 if config.kernel_basis == "alard-lupton" else 0
    tol, factor = config.solve_tolerance, config.solve_residual_factor

    # every PSF stamp of the solve (cells, then the positions where the spatial fit is judged) is
    # realised once, and its whole-stamp design built in one batch of transforms
    px = py = np.zeros(0)
    if truncate:
        n_x, n_y = len(np.unique(cxs)), len(np.unique(cys))
        cap = 17 if uniform else 9
        px, py = _grid(box, min(2 * n_x + 1, cap), min(2 * n_y + 1, cap))
    xs_all, ys_all = np.concatenate([cxs, px]), np.concatenate([cys, py])
    sci = _realise(science_psf, xs_all, ys_all, psf_size)
    ref = _realise(reference_psf, xs_all, ys_all, psf_size)
    full = _stamp_designs(sci, basis)
    tgt = ref.reshape(len(ref), -1)
    peak = tgt.max(axis=1)
    rows = np.zeros((psf_size, psf_size), dtype=bool)  # the fit: pixels where the kernel lies wholly on the stamp
    rows[h:psf_size - h, h:psf_size - h] = True
    rows = rows.ravel()
    fit_d, fit_r = full[:n_c][:, rows], tgt[:n_c][:, rows]

    # per-cell fits
    if reg is None:
        conds = [_cond_of(sv, n_b) for sv in np.linalg.svd(fit_d, compute_uv=False)]
        for c, x, y in zip(conds, cxs, cys):
            _check_cond(c, n_b, limit, f"cell at ({x:.0f}, {y:.0f})", ids)
        sols, _ = _rank_candidates(fit_d, fit_r, first if truncate else 0)
        if truncate:
            cand = _candidate_residuals(full[:n_c], tgt[:n_c], peak[:n_c], sols, norm)
            kept = [_truncation_rank(c, tol, factor) for c in cand]
            singles = np.array([s[:, k - 1] for s, k in zip(sols, kept)])
            ranks = [k + first for k in kept]
            capacity = cand[:, -1]
        else:
            singles = sols[:, :, -1]
            ranks = [n_b] * n_c
        for a, x, y in zip(singles, cxs, cys):
            if not np.all(np.isfinite(a)):
                raise PsfMatchError(f"cell at ({x:.0f}, {y:.0f}): unable to determine the kernel solution "
                                    "(non-finite coefficients)", ids=ids)
    else:
        conds, singles = [], []
        for c, r, x, y in zip(fit_d, fit_r, cxs, cys):
            a, cond = _solve_normal(c.T @ c + reg, c.T @ r, limit=limit, what=f"cell at ({x:.0f}, {y:.0f})", ids=ids)
            conds.append(cond)
            singles.append(a)
        singles = np.array(singles)
        ranks = [n_b] * n_c
    single_sums = singles @ bsum

    slimit = config.max_spatial_condition_number if config.check_condition_number else None
    if reg is None:
        # stacked design: row block n holds C_n[:, j] f_t(p_n) in column (j, t), reduced to C_n = Q_n R_n
        # (same solutions, singular values and residual differences)
        q_c, r_c = np.linalg.qr(fit_d)
        z_c = np.einsum("nmk,nm->nk", q_c, fit_r)
        weight = np.ones(n_c)
        if uniform:
            # cells weighted by a power of the residual the basis reaches there alone: the spatial model spends
            # its freedom where the match is hardest and the residual comes out about even over the exposure
            weight = np.maximum(np.where(np.isfinite(capacity), capacity, 0.0), tol) ** config.cell_weight_power
            weight = weight / weight.mean()
        sw = np.sqrt(weight)
        d_pts, t_pts, k_pts = full[n_c:], tgt[n_c:], peak[n_c:]
        if len(orders) > 1:
            single_worst = max(float(np.where(np.isfinite(capacity), capacity, 0.0).max()), tol)
        for order in orders:
            phi, phi_r, sel, whiten = _spatial_basis(cxs, cys, cbox, order, kind, n_b, first, truncate)
            n_t = phi.shape[1]
            big = (sw[:, None, None, None] * r_c[:, :, :, None] * phi[:, None, None, :]).reshape(
                n_c * r_c.shape[1], n_b * n_t)[:, sel]
            rhs = (sw[:, None] * z_c).ravel()
            q_b, big = np.linalg.qr(big)  # same least-squares problem, one row per unknown
            rhs = q_b.T @ rhs
            if truncate:
                p_pts = spatial_terms(px, py, cbox, order, kind).T
                if whiten:
                    p_pts = np.linalg.solve(phi_r.T, p_pts.T).T  # terms of the orthonormalised basis there

                def grid_worst(sols, p_pts=p_pts, sel=sel, n_t=n_t):
                    # candidate solutions (free (j, t) entries) -> largest residual over the grid
                    coef = np.zeros((n_b * n_t, sols.shape[1]))
                    coef[sel] = sols
                    a_pts = np.einsum("jtk,pt->pjk", coef.reshape(n_b, n_t, -1), p_pts)
                    return _candidate_residuals(d_pts, t_pts, k_pts, a_pts, norm).max(axis=0)

            if order != orders[-1]:
                # the spatial model follows the kernel when, at full rank, it matches about as well over the
                # grid as the single-cell fits do at the cells; otherwise the next order
                u, s, vt = np.linalg.svd(big, full_matrices=False)
                with np.errstate(divide="ignore", invalid="ignore"):
                    full_rank = vt.T @ ((u.T @ rhs) / s)
                if (np.all(np.isfinite(full_rank)) and
                        grid_worst(full_rank[:, None])[0] <= config.spatial_order_factor * single_worst):
                    break
        spatial_cond = _cond_of(np.linalg.svd(big, compute_uv=False), big.shape[1])
        _check_cond(spatial_cond, big.shape[1], slimit, "spatial kernel fit", ids)
        cands, _ = _rank_candidates(big, rhs, first if truncate else 0)
        if truncate:
            kept = _scan_ranks(lambda ranks: grid_worst(cands[:, ranks - 1]), cands.shape[1], tol, factor)
            sol = cands[:, kept - 1]
            spatial_rank = kept + first
        else:
            sol = cands[:, -1]
            spatial_rank = int(sel.sum())
        if not np.all(np.isfinite(sol)):
            raise PsfMatchError("spatial kernel fit: unable to determine the kernel solution (non-finite "
                                "coefficients)", ids=ids)
    else:
        phi, phi_r, sel, whiten = _spatial_basis(cxs, cys, cbox, order, kind, n_b, first, False)
        n_t = phi.shape[1]
        big_a = np.zeros((n_b * n_t, n_b * n_t))
        big_y = np.zeros(n_b * n_t)
        for c, r, p in zip(fit_d, fit_r, phi):
            big_a += np.kron(c.T @ c + reg, np.outer(p, p))
            big_y += np.kron(c.T @ r, p)
        sol, spatial_cond = _solve_normal(
            big_a[np.ix_(sel, sel)], big_y[sel], limit=slimit, what="spatial kernel fit", ids=ids)
        spatial_rank = int(sel.sum())
    coeffs = np.zeros(n_b * n_t)
    coeffs[sel] = sol
    coeffs = coeffs.reshape(n_b, n_t)
    if whiten:
        coeffs = np.linalg.solve(phi_r, coeffs.T).T  # upper triangular: the constant term stays alone in row 0

    kernel_sum_fit = float(np.tensordot(spatial_terms(*centre, cbox, order, kind), coeffs.T @ bsum, axes=1))
    if config.flux_conservation == "reference":
        coeffs[0, 0] = 1.0 / bsum[0]
    for arr in (basis, coeffs):
        arr.flags.writeable = False
    model = KernelModel(
        basis=basis, coefficients=coeffs, box=cbox, order=order,
        spatial_model_type=kind, kernel_sum_fit=kernel_sum_fit, flux_conservation=config.flux_conservation)
    sums = _check_kernel_sums(np.array([model.kernel_sum(x, y) for x, y in zip(cxs, cys)]), ids)

    report = _report(model, cxs, cys, box, sci[:n_c], ref[:n_c], fwhm_sci, fwhm_ref, single_sums, sums)
    report["solve_rank_single"] = ("cell", np.array(ranks))
    report.attrs.update(
        kernel_size=int(ksize), basis_sigmas=[float(s) for s in sigmas], psf_size=int(psf_size),
        max_condition_number=float(max(conds)), spatial_condition_number=float(spatial_cond),
        solve_tolerance=float(tol), solve_residual_factor=float(factor), spatial_solve_rank=int(spatial_rank),
        spatial_solve_unknowns=int(sel.sum()), spatial_kernel_order=int(order),
        spatial_fit="uniform" if uniform else "reference",
        kernel_sum_fit=kernel_sum_fit, flux_conservation=config.flux_conservation,
        centre_x=centre[0], centre_y=centre[1])
    return KernelModel(
        basis=basis, coefficients=coeffs, box=cbox, order=order,
        spatial_model_type=kind, kernel_sum_fit=kernel_sum_fit, flux_conservation=config.flux_conservation,
        report=report), psf_size


def _report(model, cxs, cys, box, sci, ref, fwhm_sci, fwhm_ref, single_sums, sums) -> xr.Dataset:
    achieved, res_max, res_rms, fwhm_ach, k2, l1 = [], [], [], [], [], []
    h = model.radius
    for x, y, s, r in zip(cxs, cys, sci, ref):
        k = model.kernel_image(x, y)
        k2.append(float((k * k).sum()))
        l1.append(float(np.abs(k).sum()))
        a = correlate_direct(np.pad(s, h), k)
        achieved.append(a)
        d = a - r
        res_max.append(np.abs(d).max() / r.max())
        res_rms.append(math.sqrt((d * d).mean()) / r.max())
        fwhm_ach.append(GridPsf(a, x=[x], y=[y]).fwhm(x, y))
    inside = np.asarray(box.contains(cxs, cys))
    return xr.Dataset(
        {
            "achieved_psf": (("cell", "ky", "kx"), np.array(achieved)),
            "residual_max": ("cell", np.array(res_max)),
            "residual_rms": ("cell", np.array(res_rms)),
            "science_fwhm": ("cell", fwhm_sci),
            "target_fwhm": ("cell", fwhm_ref),
            "achieved_fwhm": ("cell", np.array(fwhm_ach)),
            "kernel_sum_single": ("cell", np.array(single_sums)),
            "kernel_sum": ("cell", sums),
            "kernel_sum_sq": ("cell", np.array(k2), {
                "description": "sum of the squared applied kernel: factor on the variance of white input noise"}),
            "kernel_l1": ("cell", np.array(l1), {"description": "sum of |applied kernel|"}),
        },
        coords={"cell_x": ("cell", cxs), "cell_y": ("cell", cys), "in_exposure": ("cell", inside)},
        attrs={"description": "per-cell diagnostics of the PSF-matching fit; residuals are relative to the target peak"},
    )


# ----------------------------------------------------------------------------------------------
# convolution


def _weights(loc, geom, kern, pairs=None):
    """Per-term row and column weights ``(wy, wx)`` of the block at ``loc`` (model terms by default)."""
    (ya, yb), (xa, xb) = loc
    xs = np.arange(geom["x0"] + xa, geom["x0"] + xb, dtype=np.float64)
    ys = np.arange(geom["y0"] + ya, geom["y0"] + yb, dtype=np.float64)
    box, order, kind = kern["box"], kern["order"], kern["kind"]
    if pairs is None:
        pairs = _spatial_pairs(order)
    top = max(max(a, b) for a, b in pairs)
    tx = _axis_terms(_scaled(xs, box[0], box[2]), top, kind)
    ty = _axis_terms(_scaled(ys, box[1], box[3]), top, kind)
    wx = np.array([tx[a] for a, _ in pairs])
    wy = np.array([ty[b] for _, b in pairs])
    return wy, wx


def _axis_product(a: int, c: int, kind: str) -> list[tuple[int, float]]:
    """``g_a g_c`` as a combination of single axis functions: ``T_a T_c = (T_{a+c} + T_{|a-c|}) / 2``."""
    if kind == "chebyshev1":
        return [(a + c, 0.5), (abs(a - c), 0.5)]
    return [(a + c, 1.0)]


def _squared_model(comps: np.ndarray, order: int, kind: str):
    """``K(x, y)² = sum_m g_m(x, y) Q_m`` exactly, with ``g_m`` single spatial terms ``(a, b)``.

    The ``T(T+1)/2`` products ``K_t K_s`` carry weights ``f_t f_s``, polynomials of twice the order;
    regrouped over the spatial terms of that degree they need one correlation per term instead of
    one per product.
    """
    pairs = _spatial_pairs(order)
    acc: dict[tuple[int, int], np.ndarray] = {}
    for t, (at, bt) in enumerate(pairs):
        for s in range(t, len(pairs)):
            a_s, b_s = pairs[s]
            prod = comps[t] * comps[s] * (1.0 if s == t else 2.0)
            for ax, cx in _axis_product(at, a_s, kind):
                for by, cy in _axis_product(bt, b_s, kind):
                    key = (ax, by)
                    acc[key] = acc.get(key, 0.0) + (cx * cy) * prod
    terms = sorted(acc, key=lambda ab: (ab[0] + ab[1], -ab[0]))
    return terms, np.array([acc[ab] for ab in terms])


def _prepare(ext, geom, kern, block_info, loc=None, fill=0.0):
    """Block location in the exposure and the input cropped to the kernel radius (a Halo assembled)."""
    depth, h = geom["depth"], kern["h"]
    if isinstance(ext, Halo):
        ext = ext.assemble(fill, ext.pieces[1][1].dtype)
    if loc is not None:
        pass
    elif block_info is not None:
        loc = block_info[None]["array-location"]
    else:
        loc = [(0, ext.shape[0] - 2 * depth), (0, ext.shape[1] - 2 * depth)]
    d = depth - h
    if d:
        ext = ext[d:ext.shape[0] - d, d:ext.shape[1] - d]
    return loc, ext


def _set_border(out, loc, shape, h, value):
    """Write ``value`` on the pixels of the block within ``h`` of the exposure's edge (slices only)."""
    (ya, yb), (xa, xb) = loc
    ny, nx = shape
    out[: max(0, min(h - ya, yb - ya))] = value
    out[max(0, ny - h - ya):] = value
    out[:, : max(0, min(h - xa, xb - xa))] = value
    out[:, max(0, nx - h - xa):] = value
    return out


def _finite_input(ext, zero=True):
    """The block as float32/float64, and the NaN and inf masks (None when all finite).

    With ``zero`` the non-finite pixels are set to 0 (a copy); the low-rank kernel skips them itself.
    """
    if ext.dtype not in (np.float32, np.float64):
        ext = ext.astype(np.float64)
    # one pass, no temporary: a float64 sum of float32 values is finite unless a value is not
    if math.isfinite(np.add.reduce(ext, axis=None, dtype=np.float64)) and (
            ext.dtype == np.float32 or np.isfinite(ext).all()):
        return ext, None, None
    nan, inf = np.isnan(ext), np.isinf(ext)
    if not zero:
        return ext, nan, inf
    return np.where(nan | inf, 0.0, ext).astype(ext.dtype), nan, inf


def _lowrank_rows(loc, geom, kern, part):
    """Row weights, column terms and normaliser rows of a low-rank part on the block at ``loc``."""
    (ya, yb), (xa, xb) = loc
    xs = np.arange(geom["x0"] + xa, geom["x0"] + xb, dtype=np.float64)
    ys = np.arange(geom["y0"] + ya, geom["y0"] + yb, dtype=np.float64)
    box, kind, top = kern["box"], kern["kind"], part["coef"].shape[1] - 1
    tx = _axis_terms(_scaled(xs, box[0], box[2]), top, kind)
    ty = _axis_terms(_scaled(ys, box[1], box[3]), top, kind)
    rows = np.einsum("rab,bi->rai", part["coef"], ty)
    return rows, tx, part["norm"] @ ty


def _valid_rect(loc, geom, h, shape) -> tuple[int, int, int, int]:
    """Rows ``r0:r1`` and columns ``c0:c1`` of a block's halo'd input that lie inside the exposure."""
    (ya, yb), (xa, xb) = loc
    ny, nx = geom["shape"]
    return max(0, h - ya), shape[0] - max(0, yb + h - ny), max(0, h - xa), shape[1] - max(0, xb + h - nx)


def _halo_direct(ext, geom, kern) -> bool:
    """A Halo the low-rank path reads as it is: float pieces, halo of the kernel radius. Whether it
    is finite is found out by the tile loads themselves (:class:`NonFiniteHalo`), which read every
    piece anyway."""
    if not isinstance(ext, Halo) or kern["mode"] != "low-rank" or kern["h"] != geom["depth"]:
        return False
    return all(p is None or p.dtype in (np.float32, np.float64) for row in ext.pieces for p in row)


def _regions(box: Box, kern: dict):
    """The low-rank regions that meet ``box``: ``(key, region, part of box inside it)`` triples.

    Regions are squares of ``kern["region"]`` pixels on a grid anchored at the exposure's first
    pixel, keyed by their grid row and column; one region (the exposure, key ``None``) when the
    size is 0 or covers the exposure. Which images serve a pixel does not depend on the chunking.
    """
    ebox, size = kern["exposure_box"], kern["region"]
    if not size or (size >= ebox.width and size >= ebox.height):
        return [(None, ebox, box)]
    out = []
    for ry in range((box.y0 - ebox.y0) // size, (box.y1 - 1 - ebox.y0) // size + 1):
        for rx in range((box.x0 - ebox.x0) // size, (box.x1 - 1 - ebox.x0) // size + 1):
            region = Box(ebox.x0 + rx * size, ebox.y0 + ry * size,
                         min(ebox.x0 + (rx + 1) * size, ebox.x1), min(ebox.y0 + (ry + 1) * size, ebox.y1))
            out.append(((ry, rx), region, region.intersect(box)))
    return out


def _lowrank_plane(ext, loc, geom, kern, plane: str, check: bool = False):
    """The low-rank correlation of one block of ``plane`` (image: kernel, variance: squared kernel).

    Each low-rank region the block meets is correlated with its own images (chosen once per kernel
    model, see :func:`_kernel_arrays`), on FFT tiles of that part of the block.
    """
    (ya, yb), (xa, xb) = loc
    block = Box(geom["x0"] + xa, geom["y0"] + ya, geom["x0"] + xb, geom["y0"] + yb)
    power = 1 if plane == "image" else 2
    valid = _valid_rect(loc, geom, kern["h"], ext.shape)
    # the region parts cover the block: every pixel is written, no zeros needed first
    out = np.empty((yb - ya, xb - xa), dtype=np.float32)
    for key, _, part_box in _regions(block, kern):
        part = kern[plane] if key is None else kern["regions"][key][plane]
        rect = (part_box.y0 - block.y0, part_box.y1 - block.y0, part_box.x0 - block.x0, part_box.x1 - block.x0)
        out = correlate_lowrank(ext, part["basis"], *_lowrank_rows(loc, geom, kern, part), power, tile=kern["tile"],
                                dtype=kern["fft_dtype"], valid=valid, check=check, rect=rect, out=out)
    return out


def _image_block(ext, *, geom, kern, block_info=None, loc=None):
    if _halo_direct(ext, geom, kern):
        try:
            out = _lowrank_plane(ext, loc, geom, kern, "image")
        except NonFiniteHalo:  # NaN or inf somewhere: the path below marks their footprints
            pass
        else:
            return _set_border(out, loc, geom["shape"], kern["h"], np.nan)
    loc, ext = _prepare(ext, geom, kern, block_info, loc)
    ext, nan, inf = _finite_input(ext, zero=kern["mode"] == "exact")
    if kern["mode"] == "exact":
        wy, wx = _weights(loc, geom, kern)
        out = correlate_varying(ext, kern["comps"], wy, wx)
        out /= (kern["sums"][:, None] * wy).T @ wx
        out = out.astype(np.float32)
    else:
        out = _lowrank_plane(ext, loc, geom, kern, "image", check=nan is not None)
    if nan is not None:
        out[or_dilate(nan | inf, kern["footprint"])] = np.nan
    return _set_border(out, loc, geom["shape"], kern["h"], np.nan)


def _variance_block(ext, *, geom, kern, block_info=None, loc=None):
    if _halo_direct(ext, geom, kern):
        try:
            out = _lowrank_plane(ext, loc, geom, kern, "variance")
        except NonFiniteHalo:
            pass
        else:
            return _set_border(out, loc, geom["shape"], kern["h"], np.inf)
    loc, ext = _prepare(ext, geom, kern, block_info, loc)
    ext, nan, inf = _finite_input(ext, zero=kern["mode"] == "exact")
    if kern["mode"] == "exact":
        wy, wx = _weights(loc, geom, kern)
        qy, qx = _weights(loc, geom, kern, kern["square_terms"])
        out = correlate_varying(ext, kern["square_kernels"], qy, qx)
        norm = (kern["sums"][:, None] * wy).T @ wx
        norm *= norm
        out /= norm
        out = out.astype(np.float32)
    else:
        out = _lowrank_plane(ext, loc, geom, kern, "variance", check=nan is not None)
    if nan is not None:
        if inf.any():
            out[or_dilate(inf, kern["footprint"])] = np.inf
        if nan.any():
            out[or_dilate(nan, kern["footprint"])] = np.nan
    return _set_border(out, loc, geom["shape"], kern["h"], np.inf)


def _mask_block(ext, *, geom, kern, block_info=None, loc=None):
    if isinstance(ext, Halo) and loc is not None:
        # the pieces are read row by row where they are: no assembled copy of the halo'd block
        out = or_dilate_halo(ext, kern["footprint"], crop=geom["depth"] - kern["h"], fill=0, dtype=np.uint32)
    else:
        loc, ext = _prepare(ext, geom, kern, block_info, loc, fill=0)
        out = or_dilate(ext.astype(np.uint32, copy=False), kern["footprint"])
    return _set_border(out, loc, geom["shape"], kern["h"], np.uint32(geom["no_data"]))


_ERROR_SAMPLES = 65  # sample positions per axis where the exposure-wide low-rank kernel error is evaluated
_LOWRANK_TILE = None  # FFT tiles of the low-rank path: the cheapest measured plan per block (plan_tiles)


def _low_rank(kernels: np.ndarray, g: np.ndarray, scale: np.ndarray, tol: float, sampled: np.ndarray | None = None):
    """Fewest kernel images spanning ``sum_m g_m K_m`` within ``tol`` (L1, relative to ``scale``).

    ``kernels`` ``(M, k, k)``; ``g`` ``(n_pos, M)`` the spatial functions at sample positions;
    ``scale`` ``(n_pos,)`` positive; ``sampled`` ``(n_pos, k * k)``, if given, the family
    ``g @ kernels`` itself (computed otherwise). The images are the leading right singular vectors
    of the kernel family sampled at the positions (each divided by its scale); each ``K_m`` is
    projected on them and its lost sum put back on the first image, so every approximate kernel
    keeps the exact sum (the result then does not depend on the constant taken out of each tile).
    The rank is the smallest whose largest sampled L1 error is at most ``tol / 2`` (the half keeps
    the bound between samples). Returns the images ``(R, k, k)``, the mixing matrix ``(M, R)``
    (``K_m ~ sum_r mix[m, r] V_r``) and the largest sampled relative error.
    """
    m, k = kernels.shape[0], kernels.shape[1]
    flat = kernels.reshape(m, -1)
    family = g @ flat if sampled is None else sampled
    # the family (g / scale) @ flat has the right singular vectors of c = r @ flat, (g / scale) = q r;
    # they come from the small Gram matrix c c^T (M x M) rather than an SVD of c (M x k²): the
    # directions the tolerances need lie far above its rounding, and the error below is measured
    # on the images as they are
    c = np.linalg.qr(g / scale[:, None], mode="r") @ flat
    lam, u = np.linalg.eigh(c @ c.T)
    order = np.argsort(lam)[::-1]
    lam, u = lam[order], u[:, order]
    keep = lam > max(lam[0], 0.0) * 1e-24
    if not keep.any():
        keep[0] = True
    sv = np.sqrt(np.maximum(lam[keep], 0.0))
    vt = (u[:, keep].T @ c) / np.where(sv > 0, sv, 1.0)[:, None]
    sums = flat.sum(axis=1)
    # L1 >= L2 >= the orthogonal projection's L2 error: ranks whose projection already misses the
    # tolerance at some sample are skipped without forming their images' error
    coef = g @ (flat @ vt.T)
    tail = np.maximum((family * family).sum(axis=1)[:, None] - np.cumsum(coef * coef, axis=1), 0.0)
    lower = (np.sqrt(tail) / scale[:, None]).max(axis=0)
    start = int(np.argmax(lower <= tol / 2)) + 1 if np.any(lower <= tol / 2) else vt.shape[0]
    best = None
    for rank in range(min(start, vt.shape[0]), min(m, vt.shape[0]) + 1):
        v = vt[:rank]
        mix = flat @ v.T
        first = v[0].sum()
        if abs(first) > 1e-6 * np.abs(v[0]).sum():
            mix[:, 0] += (sums - mix @ v.sum(axis=1)) / first
        # the sampled approximate family is (g @ mix) @ v: rank x k² per position, not M x k²
        err = float((np.abs(family - (g @ mix) @ v).sum(axis=1) / scale).max())
        best = (v, mix, err)
        if err <= tol / 2 or not sv[rank - 1] > 0:
            break
    v, mix, err = best
    return v.reshape(-1, k, k), mix, err


def _axis_coefficients(weights: np.ndarray, terms, n_axis: int) -> np.ndarray:
    """``C[w, a, b]``: the per-term weights ``(M, W)`` placed on axis functions ``(a, b)`` of each term."""
    out = np.zeros((weights.shape[1], n_axis, n_axis))
    for i, (a, b) in enumerate(terms):
        out[:, a, b] += weights[i]
    return out


def _sample_counts(box: Box, spacing: tuple[float, float]) -> tuple[int, int]:
    """Sample positions per axis over ``box`` spaced at most ``spacing`` apart (ends included)."""
    return tuple(n if n <= 2 else min(n, math.ceil((n - 1) / s - 1e-9) + 1)
                 for n, s in ((box.width, spacing[0]), (box.height, spacing[1])))


def _low_rank_part(plane: str, kern: dict, box: Box, counts: tuple[int, int]) -> dict:
    """The low-rank images and weights of ``plane`` over the output pixels of ``box``.

    ``kern`` holds the component kernels (``comps``, ``sums``), the squared model (``square_terms``,
    ``square_kernels``), the spatial model (``box``, ``order``, ``kind``) and the tolerances. The
    kernel family is sampled on ``counts`` positions per axis; the squared family is the square of
    the sampled kernels (``K² = sum_q g_q Q_q`` exactly).
    """
    order, kind, cbox = kern["order"], kern["kind"], kern["box"]
    comps, sums = kern["comps"], kern["sums"]
    xs = np.linspace(box.x0, box.x1 - 1, counts[0])
    ys = np.linspace(box.y0, box.y1 - 1, counts[1])
    top = 2 * order if plane == "variance" else order
    tx = _axis_terms(_scaled(xs, cbox[0], cbox[2]), top, kind)
    ty = _axis_terms(_scaled(ys, cbox[1], cbox[3]), top, kind)

    def at_samples(terms):
        a, b = np.array([t[0] for t in terms]), np.array([t[1] for t in terms])
        return (ty[b][:, :, None] * tx[a][:, None, :]).reshape(len(terms), -1).T

    pairs = _spatial_pairs(order)
    f = at_samples(pairs)
    family = f @ comps.reshape(comps.shape[0], -1)
    if plane == "image":
        basis, mix, err = _low_rank(comps, f, np.abs(f @ sums), kern["tol"], sampled=family)
        return {"basis": basis, "error": err,
                "coef": _axis_coefficients(np.column_stack([mix, sums]), pairs, order + 1),
                "norm": _axis_coefficients(sums[:, None], pairs, order + 1)[0]}
    terms, squares = kern["square_terms"], kern["square_kernels"]
    q = at_samples(terms)
    qsums = squares.sum(axis=(1, 2))
    basis, mix, err = _low_rank(squares, q, np.abs(q @ qsums), kern["variance_tol"], sampled=family * family)
    return {"basis": basis, "error": err,
            "coef": _axis_coefficients(np.column_stack([mix, qsums]), terms, 2 * order + 1),
            "norm": _axis_coefficients(sums[:, None], pairs, 2 * order + 1)[0]}


def _low_rank_arrays(comps, sums, square_terms, square_kernels, kernel_model, box: Box, config) -> dict:
    """The exposure-wide low-rank parts (``image``, ``variance``) over ``box``, 65 samples per axis."""
    kern = {"comps": comps, "sums": sums, "square_terms": square_terms, "square_kernels": square_kernels,
            "order": kernel_model.order, "kind": kernel_model.spatial_model_type, "box": kernel_model.box,
            "tol": config.max_kernel_error, "variance_tol": config.max_variance_kernel_error}
    counts = (min(_ERROR_SAMPLES, box.width), min(_ERROR_SAMPLES, box.height))
    return {plane: _low_rank_part(plane, kern, box, counts) for plane in ("image", "variance")}


def _kernel_arrays(kernel_model: KernelModel, box: Box | None = None, config: ModelPsfMatchConfig | None = None) -> dict:
    """What the convolution blocks need from a kernel model (small arrays, no report)."""
    config = ModelPsfMatchConfig(convolution="exact") if config is None else config
    comps = kernel_model.component_kernels()
    sums = comps.sum(axis=(1, 2))
    used = np.any(kernel_model.coefficients != 0, axis=1)
    square_terms, square_kernels = _squared_model(comps, kernel_model.order, kernel_model.spatial_model_type)
    out = {
        "h": kernel_model.radius, "mode": config.convolution, "tile": _LOWRANK_TILE,
        "fft_dtype": np.dtype(config.fft_precision),
        "footprint": np.any(kernel_model.basis[used] != 0, axis=0),
        "box": kernel_model.box, "order": kernel_model.order, "kind": kernel_model.spatial_model_type,
        "comps": comps, "sums": sums, "square_terms": square_terms, "square_kernels": square_kernels,
    }
    if config.convolution == "low-rank":
        # regions are sampled at least as densely as the exposure (the margin argument carries over)
        out.update(region=config.low_rank_region, exposure_box=box, tol=config.max_kernel_error,
                   variance_tol=config.max_variance_kernel_error,
                   spacing=tuple(max(n - 1, 1) / max(min(_ERROR_SAMPLES, n) - 1, 1) for n in (box.width, box.height)))
        regions = _regions(box, out)
        if regions[0][0] is None:
            out.update(_low_rank_arrays(comps, sums, square_terms, square_kernels, kernel_model, box, config))
        else:  # chosen once here, not in every block task that needs them
            out["regions"] = {key: {plane: _low_rank_part(plane, out, region, _sample_counts(region, out["spacing"]))
                                    for plane in ("image", "variance")} for key, region, _ in regions}
    return out


def _strip(block, sy, sx):
    return block[sy, sx]


def _edge(d: int, depth: int) -> slice:
    return slice(-depth, None) if d < 0 else (slice(0, depth) if d > 0 else slice(None))


def _on_halo(loc, kern, *pieces, func, depth, geom):
    """``func`` on the Halo of the block at ``loc`` from its nine pieces (row-major, None where the
    exposure ends)."""
    (ya, yb), (xa, xb) = loc
    ny, nx = yb - ya, xb - xa
    halo = Halo((pieces[0:3], pieces[3:6], pieces[6:9]), (0, depth, depth + ny, 2 * depth + ny),
                (0, depth, depth + nx, 2 * depth + nx))
    return func(halo, geom=geom, kern=kern, loc=loc)


def _halo_blocks(arr, func, geom, kern, dtype):
    """``func`` on every block of ``arr`` with its neighbours' edge strips of ``depth`` pixels, as a Halo.

    The graph of ``map_overlap`` without its concatenation: one slicing task per neighbour strip and
    one task per block, which reads the strips where they are (the low-rank path copies its FFT
    tiles straight from them; the other paths assemble the halo'd block themselves). The tasks are
    built as dask task-spec nodes (what the schedulers run), so no per-compute conversion of
    tuple tasks is needed; the kernel arrays are one key all block tasks refer to.
    """
    depth = geom["depth"]
    kern = _kernel_node(kern)
    token = dask.base.tokenize(arr, func.__name__, geom, kern)
    strip, name = f"psf-match-halo-{token}", f"psf-match{func.__name__}-{token}"
    call = functools.partial(_on_halo, func=func, depth=depth, geom=geom)
    kref = TaskRef(kern.key)
    nby, nbx = arr.numblocks
    ys = np.concatenate([[0], np.cumsum(arr.chunks[0])]).tolist()
    xs = np.concatenate([[0], np.cumsum(arr.chunks[1])]).tolist()
    dsk = {}
    for i in range(nby):
        for j in range(nbx):
            pieces = []
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    ii, jj = i + di, j + dj
                    if not (0 <= ii < nby and 0 <= jj < nbx):
                        pieces.append(None)
                    elif di == 0 and dj == 0:
                        pieces.append(TaskRef((arr.name, i, j)))
                    else:
                        key = (strip, i, j, di + 1, dj + 1)
                        dsk[key] = Task(key, _strip, TaskRef((arr.name, ii, jj)), _edge(di, depth), _edge(dj, depth))
                        pieces.append(TaskRef(key))
            loc = ((ys[i], ys[i + 1]), (xs[j], xs[j + 1]))
            dsk[(name, i, j)] = Task((name, i, j), call, loc, kref, *pieces)
    graph = da.core.HighLevelGraph.from_collections(name, dsk, dependencies=[arr, kern])
    return da.Array(graph, name, arr.chunks, dtype=dtype, meta=np.empty((0, 0), dtype=dtype))


def _kernel_node(kern):
    """The kernel arrays as one key of the graph (a delayed literal named by their token) that every
    block task depends on: a scheduler ships them once per worker, not inside every task, and the
    image, variance and mask graphs share the key. A delayed ``kern`` (lazy PSF) is its own key."""
    if dask.is_dask_collection(kern):
        return kern
    return dask.delayed(kern, name=f"psf-match-kernels-{dask.base.tokenize(kern)}", traverse=False)


def _apply(arr, func, geom, kern, dtype, fill):
    depth = geom["depth"]
    if dask.is_dask_collection(arr) and arr.ndim == 2 and min(min(c) for c in arr.chunks) >= depth:
        return _halo_blocks(arr, func, geom, kern, dtype)
    if dask.is_dask_collection(arr):
        return da.map_overlap(
            func, arr, depth={0: depth, 1: depth}, boundary={0: fill, 1: fill}, trim=False,
            dtype=dtype, meta=np.empty((0, 0), dtype=dtype), geom=geom, kern=_kernel_node(kern))
    ext = np.pad(np.asarray(arr), depth, mode="constant", constant_values=fill)
    return func(ext, geom=geom, kern=kern)


def _check_exposure(exposure: xr.Dataset, ids) -> dict[str, int]:
    if exposure["image"].ndim != 2:
        raise SchemaError(f"PSF matching needs a single exposure (dims {exposure['image'].dims})", ids=ids)
    planes = mask_planes(exposure)
    if "NO_DATA" not in planes:
        raise SchemaError("the mask has no NO_DATA plane", ids=ids)
    return planes


def _convolve(exposure: xr.Dataset, kern, depth: int, planes) -> xr.Dataset:
    box = Box.of(exposure)
    geom = {"x0": box.x0, "y0": box.y0, "shape": box.shape, "no_data": bitmask("NO_DATA", planes), "depth": depth}
    image = _apply(exposure["image"].data, _image_block, geom, kern, np.float32, 0.0)
    variance = _apply(exposure["variance"].data, _variance_block, geom, kern, np.float32, 0.0)
    mask = _apply(exposure["mask"].data, _mask_block, geom, kern, np.uint32, 0)
    out = exposure.drop_vars([v for v in ("psf", "psf_x", "psf_y") if v in exposure.variables])
    out = out.copy()
    for name, data in (("image", image), ("variance", variance), ("mask", mask)):
        out[name] = (("y", "x"), data, dict(exposure[name].attrs))
    out.attrs = dict(exposure.attrs)
    return out


def convolve_kernel_model(
    exposure: xr.Dataset,
    kernel_model: KernelModel,
    *,
    config: ModelPsfMatchConfig = ModelPsfMatchConfig(),
) -> xr.Dataset:
    """Correlate an exposure with a spatially varying kernel model (lazy when the input is dask).

    Image ``sum K I``, variance ``sum K² V``, mask OR under the non-zero taps, with the kernel
    divided by its sum at every pixel; non-finite inputs spread over the kernel footprint
    (NaN image, +inf or NaN variance); a border of the kernel radius becomes ``(NaN, NO_DATA, +inf)``.
    The ``psf`` variable is dropped (the caller declares the new one). Only the ``convolution``,
    ``fft_precision``, ``max_kernel_error``, ``max_variance_kernel_error`` and ``low_rank_region``
    fields of ``config`` are used (see :func:`model_psf_match`).
    """
    validate(exposure, check_wcs=False)
    planes = _check_exposure(exposure, data_ids(exposure))
    box = Box.of(exposure)
    return _convolve(exposure, _kernel_arrays(kernel_model, box, config), kernel_model.radius, planes)


def _declared_nodes(box: Box, config: ModelPsfMatchConfig) -> tuple[int, int]:
    return tuple(min(max(round(n / c) + 1, 2), 9) for n, c in (
        (box.width, config.size_cell_x), (box.height, config.size_cell_y)))


def _solve_from_grid(images, xs, ys, reference_psf, box, config, ids):
    science = GridPsf(images, x=xs, y=ys, fill_missing=True)
    return solve_kernel_model(science, reference_psf, box, config=config, ids=ids)[0]


def _achieved_grid(kernel_model, images, xs, ys, box, config, psf_size):
    science = GridPsf(images, x=xs, y=ys, fill_missing=True)
    grid = MatchedPsf(science, kernel_model, psf_size).to_grid(box, _declared_nodes(box, config), size=psf_size)
    return grid.values


def model_psf_match(
    exposure: xr.Dataset,
    reference_psf: PsfModel,
    *,
    config: ModelPsfMatchConfig = ModelPsfMatchConfig(),
) -> tuple[xr.Dataset, KernelModel]:
    """Convolve ``exposure`` so that its PSF (the ``psf`` variable) becomes ``reference_psf``.

    Returns the matched exposure (lazy when the input is dask-backed) and the fitted
    :class:`KernelModel`, whose ``report`` gives per cell the achieved PSF (science PSF (x) kernel)
    and its residual against the target (maximum relative to the target peak, also in the
    exposure's ``psf_match_residual_max`` attribute). The output's ``psf`` is the achieved PSF on a
    grid of nodes (``declared_psf='achieved'``) or the target model (``'target'``), on the stamp
    size of the fit. The kernel solve touches only the PSF models; the convolution of the pixels
    is lazy.

    Notes
    -----
    LSST task: ``lsst.ip.diffim.ModelPsfMatchTask`` (``run(exposure, referencePsfModel)``), kernel
    config ``PsfMatchConfigAL``/``PsfMatchConfigDF``. Config mapping: ``kernel_basis`` =
    kernelBasisSet, ``kernel_size`` = kernelSize, ``scale_by_fwhm`` = scaleByFwhm (off, as in
    ModelPsfMatch), ``kernel_size_fwhm_scaling``/``kernel_size_min``/``kernel_size_max`` =
    kernelSizeFwhmScaling/Min/Max, ``alard_*`` = alardNGauss, alardDegGauss, alardSigGauss,
    alardGaussBeta, alardMinSig, alardMinSigDeconv, ``spatial_model_type``/``spatial_kernel_order``
    = spatialModelType/spatialKernelOrder, ``size_cell_x/y`` = sizeCellX/Y, ``do_auto_pad_psf``,
    ``auto_pad_psf_to``, ``pad_psf_by`` = doAutoPadPsf, autoPadPsfTo, padPsfBy,
    ``check_condition_number``/``max_condition_number``/``max_spatial_condition_number`` =
    checkConditionNumber/maxConditionNumber/maxSpatialConditionNumber (numerically singular fits
    always raise), ``use_regularization``, ``regularization_type``,
    ``central_regularization_stencil``, ``forward_regularization_orders``,
    ``regularization_border_penalty``, ``lambda_value`` = the DF regularisation fields (lambdaType
    absolute only). ``flux_conservation='reference'`` reproduces the reference's overwrite of the
    constant coefficient by ``kernelSum = 1``; the default rescales by the fitted sum.
    ``grow_cell_grid=True`` gives the reference's cell layout (cells over the exposure grown by one
    cell per side, PSFs extrapolated there); by default the cells span the exposure itself
    (``max_cells_per_axis``), which keeps a spatially varying match uniform up to the corners.
    ``max_width_ratio`` and ``declared_psf`` have no reference counterpart (the reference declares
    the target model; by default we declare the achieved PSF, what the pixels really have). Not
    implemented: fitForBackground (off in ModelPsfMatch), PCA of the spatial kernel, clipping (all
    off in ModelPsfMatch), the kernelSum argument (always 1).

    Uniform match (``spatial_fit='uniform'``, the default of the truncated solve). The reference
    fits a spatial model of fixed order (spatialKernelOrder 2) over cells of 128 px; when the PSF
    width changes across the exposure, order 2 cannot follow the kernel and the match degrades
    between and away from the cells (sigma 1.40-2.60 across 256 px, target sigma 3.5: at full rank
    2.7e-3 at the centre and 9.2e-3 between cells; truncated and judged at 7 x 7 positions, 9.1e-4
    and 9.9e-3). By default (1) cells are laid out for ``max_spatial_kernel_order`` (4), at least
    5 per axis, and the spatial order grows from ``spatial_kernel_order`` until the full-rank
    spatial fit's largest residual over the judging grid is at most ``spatial_order_factor``
    (1.2) x the largest single-cell full-rank residual: higher orders only where the spatial model,
    not the basis, limits the match (an unreachable target keeps order 2 and its noise gain);
    (2) each cell weighs in the spatial fit as its own single-cell full-rank residual (at least
    ``solve_tolerance``) to the power ``cell_weight_power`` (3), so the model spends its freedom
    where the basis struggles instead of perfecting the easiest
    cells; (3) the truncation is judged on up to 17 x 17 positions. Measured on that case: 2.4e-3
    at the centre, at most 3.0e-3 (1.25x) at nine positions and along lines through the box; width
    varying along both axes (sigma 1.24-2.77): 4.0e-3 and 4.7e-3 (1.16x) against 7.7e-3 and
    1.9e-2 at full rank. ``cell_weight_power=0`` matches the centre 12x better and the edges 14x
    worse than the centre; 2 gives the lowest worst residual (9.5e-4, 3.3x the centre's 2.6e-4).
    The per-position capacity of the basis itself varies ~9x over that exposure, so "within 2x of
    the centre" is reached by evening the residual out, not by the best match at every position.
    A constant PSF keeps the configured order and equal weights: its kernel is unchanged.
    ``spatial_fit='reference'`` keeps the earlier truncated solve (fixed order, equal weights, up
    to 9 x 9 positions); ``solve_tolerance=0`` is the reference's full-rank solve, and with
    ``grow_cell_grid=True`` also its cell layout.

    Solve. The reference solves every least-squares problem (per cell and spatial) at full rank
    (Cholesky / eigen-decomposition of the normal matrix, every eigenvalue inverted); with the AL
    basis the design's singular values span 1e6-1e7 (eigenvalue ratios 1e12-1e14), so directions
    that barely change the fit get huge coefficients and the kernel oscillates: matching a
    sigma-3 Gaussian PSF to ``model_psf()`` with a 21-px kernel gives L1(K) = 52 and
    ``sum K² = 297``, the factor by which white noise variance grows. ``solve_tolerance = 0``
    keeps that solve. By default the solve is a truncated SVD at the smallest rank that is good
    enough: the AL constant term is never dropped; for each candidate rank the kernel is
    rescaled to unit sum and applied to the whole science stamp, and the rank is accepted when the
    largest ``|achieved - target|`` is at most ``solve_tolerance`` x the target peak (5e-4, half
    the 1e-3 a representable match reaches) or at most ``solve_residual_factor`` (1.3) x the
    full-rank value when the basis cannot reach the target. The per-cell solves use the rule
    cell by cell; the spatial fit uses it on the stacked design (spatial terms made orthonormal
    over the cells, so that the singular directions are those of the kernel basis, and a constant
    PSF still gives a constant kernel), the largest residual taken over a grid of positions
    (ranks scanned every 8, then one by one below the first accepted one). This is a
    discrepancy rule rather than a penalty: a relative singular-value cut alone fails
    representable matches whose kernel needs directions at 1e-5 of the largest singular value,
    while a fixed Tikhonov weight has no scale that suits both regimes. Measured (512 x 512, 9
    cells, target ``model_psf()``): sigma 1.5 / 2.09 / 3.0 go from L1 1.15 / 6.55 / 51.6 and
    ``sum K²`` 0.016 / 2.79 / 297 to 1.00 / 1.04 / 2.15 and 0.0073 / 0.021 / 0.42, residual_max
    0.161 / 0.115 / 0.067 to 0.183 / 0.141 / 0.077. The report gives ``kernel_sum_sq`` and
    ``kernel_l1`` per cell and the ranks used (``solve_rank_single``, attrs
    ``spatial_solve_rank`` of ``spatial_solve_unknowns``).

    Convolution. The reference evaluates the kernel at the corners of sub-regions of at most 10 px
    and interpolates it bilinearly. Here the spatial weights of the kernel model are exact at every
    pixel. ``convolution='exact'``: one forward FFT per tile plus one inverse FFT per component
    kernel (6 for order 2) for the image, and ``K²`` regrouped over the spatial terms of twice the
    order for the variance (15 inverse FFTs), all in float64. ``convolution='low-rank'`` (default):
    the kernels over a region (and their squares) are sampled on a grid of positions, and the
    fewest singular images whose sampled L1 error is at most half of ``max_kernel_error``
    (``max_variance_kernel_error`` for ``K²``, relative to ``sum K²``) replace the components; the
    half covers the error between samples (measured at most 1.25x the sampled value on a 513 x 513
    grid; 1.005x at every pixel of 64-px regions of an order-4 model). The regions are squares of
    ``low_rank_region`` px (1000) on a grid anchored at the exposure's first pixel, sampled at least
    as densely as 65 positions per axis over the whole exposure (17 x 17 per 1000-px region of a
    4000-px exposure); a kernel that varies over the exposure varies less over a region and needs
    fewer images (benchmark exposure, order 4: 5 images for ``K`` and 4 for ``K²`` over the
    exposure, 3-4 and 3-4 per region, so 6.6 inverse transforms per FFT tile instead of 9). Which
    images serve a pixel depends on its region only, not on the chunking; blocks that straddle
    regions transform each part with its own images (chunks that are multiples of the region cost
    least). ``low_rank_region=0`` chooses one set for the whole exposure. The tile mean ``c`` is
    subtracted before the transforms and added back through the exact kernel sum, so per pixel
    ``|image error| <= max_kernel_error x max |I - c|`` and
    ``|variance error| <= max_variance_kernel_error x sum(K²) x max |V - c|`` under the kernel,
    plus the transforms' rounding: at most 1e-6 x L1(K) x the largest ``|I - c|`` in the FFT tile
    with ``fft_precision='float32'`` (the default; measured at most 8e-8 x L1(K) x the spread on
    star fields; it depends on the chunking), 1e-15 with ``'float64'``, whose results agree across
    chunkings to the float32 output's rounding. FFT tiles are sized per block from measured
    transform costs (4 x 250 px on 270-long transforms for 1000-px blocks); each block reads its
    neighbours' edge strips in place (no halo'd copy) and combines the inverse transforms as they
    come; the tile loads' sums are also the finiteness check (a block whose halo holds a NaN or an
    infinity is redone on the path that marks their footprints, no separate pass over the pixels);
    the kernel arrays are one key of the graph that every block task refers to; the tile
    transforms use ducc0 (the same results to rounding as scipy.fft, about 20% faster here). The default ``1e-3`` keeps the image error at most 0.3 sigma of
    the photon noise at the peak of a star of 1e5 e- and at 1e-3 of the noise for sky pixels
    (``|I - c|`` a few sigma); ``2e-2`` on the variance is small next to the covariance the variance
    plane ignores (a factor ``1 / sum K²`` of several on sums of pixels).

    With an in-memory ``psf`` variable the solve runs now and errors raise at once; with a lazy
    (dask) one it becomes a delayed task, the returned kernel model is a ``dask.delayed`` object and
    PSF-dependent errors raise when the graph runs.
    """
    validate(exposure)
    ids = data_ids(exposure)
    if not isinstance(reference_psf, PsfModel):
        raise SchemaError(f"reference_psf must be a PsfModel, got {type(reference_psf).__name__}", ids=ids)
    if "psf" not in exposure.variables:
        raise PsfMatchError("the exposure has no PSF (no 'psf' variable); cannot PSF-match it", ids=ids)
    planes = _check_exposure(exposure, ids)
    box = Box.of(exposure)
    psf = exposure["psf"]
    if dask.is_dask_collection(psf.data):
        return _model_psf_match_lazy(exposure, psf, reference_psf, box, planes, config, ids)
    science_psf = GridPsf.from_dataset(exposure, fill_missing=True)
    kernel_model, psf_size = solve_kernel_model(science_psf, reference_psf, box, config=config, ids=ids)
    out = _convolve(exposure, _kernel_arrays(kernel_model, box, config), kernel_model.radius, planes)
    if config.declared_psf == "target":
        out["psf"] = reference_psf.to_grid(box, 1, size=psf_size)
    else:
        out["psf"] = MatchedPsf(science_psf, kernel_model, psf_size).to_grid(
            box, _declared_nodes(box, config), size=psf_size)
    rep = kernel_model.report
    inside = rep["residual_max"].values[rep["in_exposure"].values]
    out.attrs["psf_match_residual_max"] = float(inside.max() if inside.size else rep["residual_max"].values.max())
    return with_provenance(out, "model_psf_match", config), kernel_model


def _model_psf_match_lazy(exposure, psf, reference_psf, box, planes, config, ids):
    """The solve as a delayed task on a lazy PSF grid (nothing computes here)."""
    if config.scale_by_fwhm:
        raise SchemaError(
            "scale_by_fwhm needs the PSF in memory (the kernel size sets the halo of the graph); load the "
            "'psf' variable first", ids=ids)
    if psf.dims != PSF_DIMS:
        raise SchemaError(f"variable 'psf' has dims {psf.dims}, expected {PSF_DIMS}", ids=ids)
    ksize = config.kernel_size
    psf_size = _stamp_size(int(psf.shape[2]), ksize, config, ids)
    xs, ys = np.asarray(psf["psf_x"].values, float), np.asarray(psf["psf_y"].values, float)
    solve = dask.delayed(_solve_from_grid, pure=True)
    kernel_model = solve(psf.data, xs, ys, reference_psf, box, config, ids)
    kern = dask.delayed(_kernel_arrays, pure=True)(kernel_model, box, config)
    out = _convolve(exposure, kern, ksize // 2, planes)
    if config.declared_psf == "target":
        out["psf"] = reference_psf.to_grid(box, 1, size=psf_size)
    else:
        nx, ny = _declared_nodes(box, config)
        grid = dask.delayed(_achieved_grid, pure=True)(kernel_model, psf.data, xs, ys, box, config, psf_size)
        nodes = reference_psf.to_grid(box, (nx, ny), size=3)  # node positions only
        out["psf"] = xr.DataArray(
            da.from_delayed(grid, shape=(ny, nx, psf_size, psf_size), dtype=np.float64), dims=PSF_DIMS,
            coords={"psf_y": nodes["psf_y"].values, "psf_x": nodes["psf_x"].values})
    return with_provenance(out, "model_psf_match", config), kernel_model
