"""PSF models: analytic, pixelised, gridded (the data model's ``psf`` variable) and PSFEx.

Every model realises a normalised, odd-sized image centred on the middle pixel of the stamp at
any parent-frame position ``(x, y)``: ``image_at(x, y, size=...)``. Analytic models are
point-sampled at integer offsets from the centre (no pixel integration), as the reference's
``GaussianPsf``/``DoubleGaussianPsf`` are; pixelised models are cropped or zero-padded centrally
when another stamp size is asked for. ``moments``/``fwhm`` measure adaptive second moments of the
realised image; ``to_grid`` samples any model onto the data model's ``psf`` variable.

Models are small immutable objects that pickle cheaply, so they can travel inside dask graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from .errors import SchemaError
from .model.geometry import Box
from .model.schema import PSF_DIMS, data_ids, psf_grid

__all__ = [
    "FWHM_PER_SIGMA",
    "PsfModel",
    "GaussianPsf",
    "DoubleGaussianPsf",
    "MoffatPsf",
    "ImagePsf",
    "GridPsf",
    "PsfexPsf",
    "model_psf",
    "adaptive_moments",
    "odd_size",
]

#: FWHM of a Gaussian in units of its sigma, 2 sqrt(2 ln 2)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def odd_size(n: float) -> int:
    """Smallest odd integer >= ``n`` (at least 1)."""
    k = max(int(math.ceil(n)), 1)
    return k if k % 2 else k + 1


def _offsets(size: int) -> tuple[np.ndarray, np.ndarray]:
    h = size // 2
    u = np.arange(-h, h + 1, dtype=np.float64)
    return u[None, :], u[:, None]


def _check_size(size, what: str = "PSF stamp size") -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise SchemaError(f"{what} must be an integer, got {size!r}")
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise SchemaError(f"{what} must be a positive odd integer, got {size}")
    return size


def _normalised(img: np.ndarray, what: str) -> np.ndarray:
    total = img.sum()
    if not np.isfinite(total) or total <= 0:
        raise SchemaError(f"{what} has a non-positive or non-finite sum ({total})")
    return img / total


def _recentre(img: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad an odd image centrally to ``size``."""
    n_y, n_x = img.shape
    out = np.zeros((size, size), dtype=np.float64)
    cy, cx, c = n_y // 2, n_x // 2, size // 2
    ry, rx = min(cy, c), min(cx, c)
    out[c - ry : c + ry + 1, c - rx : c + rx + 1] = img[cy - ry : cy + ry + 1, cx - rx : cx + rx + 1]
    return out


def adaptive_moments(image: np.ndarray, *, sigma0: float = 2.0, max_iter: int = 200, tol: float = 1e-9):
    """Adaptive (elliptical Gaussian-weighted) second moments of a centred stamp.

    Iterates the weight covariance ``Q`` to the fixed point where the weighted second moments
    equal ``Q/2`` (true for a Gaussian profile with covariance ``Q``), re-centring each step.
    Returns ``(dx, dy, ixx, iyy, ixy)``: centroid offset from the stamp centre and the moments;
    for a Gaussian profile the moments are its covariance. Raises ``ValueError`` when the
    iteration does not converge or the moments stop being positive definite.
    """
    img = np.asarray(image, dtype=np.float64)
    ny, nx = img.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    xx -= nx // 2
    yy -= ny // 2
    xc = yc = 0.0
    qxx = qyy = sigma0**2
    qxy = 0.0
    for _ in range(max_iter):
        det = qxx * qyy - qxy * qxy
        if not (det > 0 and qxx > 0 and qyy > 0):
            raise ValueError("adaptive moments are not positive definite")
        ixx, iyy, ixy = qyy / det, qxx / det, -qxy / det
        dx, dy = xx - xc, yy - yc
        w = np.exp(-0.5 * (ixx * dx * dx + 2.0 * ixy * dx * dy + iyy * dy * dy)) * img
        s0 = w.sum()
        if not s0 > 0:
            raise ValueError("adaptive moments: weighted flux is not positive")
        mx, my = (w * dx).sum() / s0, (w * dy).sum() / s0
        mxx = (w * dx * dx).sum() / s0 - mx * mx
        myy = (w * dy * dy).sum() / s0 - my * my
        mxy = (w * dx * dy).sum() / s0 - mx * my
        nxx, nyy, nxy = 2.0 * mxx, 2.0 * myy, 2.0 * mxy
        xc, yc = xc + mx, yc + my
        change = abs(nxx - qxx) + abs(nyy - qyy) + abs(nxy - qxy) + abs(mx) + abs(my)
        qxx, qyy, qxy = nxx, nyy, nxy
        if change < tol * (qxx + qyy):
            return xc, yc, qxx, qyy, qxy
    raise ValueError(f"adaptive moments did not converge in {max_iter} iterations")


class PsfModel:
    """Interface of every PSF model.

    Subclasses implement ``_render(x, y, size)`` (un-normalised image, odd ``size``) and
    ``default_size(x, y)``; the base class provides normalisation, moments and gridding.
    """

    def default_size(self, x: float, y: float) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def _render(self, x: float, y: float, size: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def image_at(self, x: float, y: float, *, size: int | None = None) -> np.ndarray:
        """Normalised (sum 1) image of the PSF at parent pixel ``(x, y)``, centred in an odd stamp."""
        size = self.default_size(x, y) if size is None else _check_size(size)
        return _normalised(self._render(float(x), float(y), size), f"{type(self).__name__} image at ({x}, {y})")

    def moments(self, x: float, y: float) -> tuple[float, float, float]:
        """Adaptive second moments ``(ixx, iyy, ixy)`` in pixels² at ``(x, y)``."""
        img = self.image_at(x, y, size=max(self.default_size(x, y), 31))
        sigma0 = max(self.sigma_guess(x, y), 0.5)
        _, _, ixx, iyy, ixy = adaptive_moments(img, sigma0=sigma0)
        return ixx, iyy, ixy

    def sigma_guess(self, x: float, y: float) -> float:
        return self.default_size(x, y) / 6.0

    def determinant_radius(self, x: float, y: float) -> float:
        ixx, iyy, ixy = self.moments(x, y)
        return float((ixx * iyy - ixy * ixy) ** 0.25)

    def fwhm(self, x: float, y: float) -> float:
        """FWHM in pixels: ``2 sqrt(2 ln 2)`` times the determinant radius of the adaptive moments."""
        return FWHM_PER_SIGMA * self.determinant_radius(x, y)

    def to_grid(self, box: Box, n: int | tuple[int, int] = 1, *, size: int | None = None) -> xr.DataArray:
        """The data model's ``psf`` variable: images on an ``ny x nx`` grid of nodes spanning ``box``.

        ``n`` is the node count per axis (or ``(nx, ny)``); nodes sit on the first and last pixel
        of the box and evenly in between (one node: the box centre).
        """
        nx, ny = (n, n) if np.isscalar(n) else n
        if box.empty:
            raise SchemaError(f"cannot grid a PSF over an empty box {box}")
        if nx < 1 or ny < 1:
            raise SchemaError(f"PSF grid needs at least one node per axis, got {nx}x{ny}")
        xs = _nodes(box.x0, box.x1, nx)
        ys = _nodes(box.y0, box.y1, ny)
        if size is None:
            size = max(self.default_size(x, y) for y in ys for x in xs)
        imgs = np.stack([np.stack([self.image_at(x, y, size=size) for x in xs]) for y in ys])
        return psf_grid(imgs, x=xs, y=ys)


def _nodes(lo: int, hi: int, n: int) -> np.ndarray:
    if n == 1:
        return np.array([(lo + hi - 1) / 2.0])
    return np.linspace(lo, hi - 1, n)


@dataclass(frozen=True)
class GaussianPsf(PsfModel):
    """Circular Gaussian, point-sampled; ``sigma`` may vary linearly with position.

    ``sigma(x, y) = sigma + gradient[0] (x - center[0]) + gradient[1] (y - center[1])``, which
    must stay positive where the model is evaluated. ``size`` defaults to ``odd(8 sigma + 1)``.
    """

    sigma: float
    size: int | None = None
    gradient: tuple[float, float] = (0.0, 0.0)
    center: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        if not (np.isfinite(self.sigma) and self.sigma > 0):
            raise SchemaError(f"GaussianPsf sigma must be positive, got {self.sigma}")
        if self.size is not None:
            _check_size(self.size)

    def sigma_at(self, x: float, y: float) -> float:
        s = self.sigma + self.gradient[0] * (x - self.center[0]) + self.gradient[1] * (y - self.center[1])
        if not s > 0:
            raise SchemaError(f"GaussianPsf sigma at ({x}, {y}) is {s}; it must stay positive")
        return float(s)

    def default_size(self, x, y):
        return self.size if self.size is not None else odd_size(8.0 * self.sigma_at(x, y) + 1.0)

    def sigma_guess(self, x, y):
        return self.sigma_at(x, y)

    def _render(self, x, y, size):
        s = self.sigma_at(x, y)
        u, v = _offsets(size)
        return np.exp(-(u * u + v * v) / (2.0 * s * s))


@dataclass(frozen=True)
class DoubleGaussianPsf(PsfModel):
    """``exp(-r²/2 sigma1²) + b exp(-r²/2 sigma2²)``, point-sampled, normalised on the stamp.

    The pipeline's model PSF (reference ``DoubleGaussianPsf``); build it from a FWHM with
    :meth:`from_fwhm` (the reference's ``GaussianPsfFactory``) or :func:`model_psf`.
    """

    sigma1: float
    sigma2: float = 0.0
    b: float = 0.0
    size: int | None = None

    def __post_init__(self):
        if not (np.isfinite(self.sigma1) and self.sigma1 > 0):
            raise SchemaError(f"DoubleGaussianPsf sigma1 must be positive, got {self.sigma1}")
        if self.b < 0 or (self.b > 0 and not self.sigma2 > 0):
            raise SchemaError(f"DoubleGaussianPsf needs b >= 0 and sigma2 > 0 when b > 0 (b={self.b}, sigma2={self.sigma2})")
        if self.size is not None:
            _check_size(self.size)

    @classmethod
    def from_fwhm(
        cls,
        fwhm: float = 3.0,
        *,
        add_wing: bool = True,
        wing_fwhm_factor: float = 2.5,
        wing_amplitude: float = 0.1,
        size_factor: float = 3.0,
        min_size: int = 5,
        max_size: int | None = None,
        size: int | None = None,
    ) -> DoubleGaussianPsf:
        """The reference's ``GaussianPsfFactory``: core ``sigma1 = fwhm / 2.3548``, optional wing.

        Stamp ``size`` defaults to ``2 floor(floor(size_factor fwhm) / 2) + 1`` clamped to
        ``[min_size, max_size]`` (made odd).
        """
        if not (np.isfinite(fwhm) and fwhm > 0):
            raise SchemaError(f"model PSF FWHM must be positive, got {fwhm}")
        if size is None:
            size = 2 * (int(math.floor(size_factor * fwhm)) // 2) + 1
            size = max(size, min_size)
            if max_size is not None:
                size = min(size, max_size)
            size = odd_size(size)
        sigma1 = fwhm / FWHM_PER_SIGMA
        if add_wing:
            return cls(sigma1, wing_fwhm_factor * sigma1, wing_amplitude, size=size)
        return cls(sigma1, 0.0, 0.0, size=size)

    def default_size(self, x, y):
        return self.size if self.size is not None else odd_size(8.0 * max(self.sigma1, self.sigma2) + 1.0)

    def sigma_guess(self, x, y):
        return self.sigma1

    def _render(self, x, y, size):
        u, v = _offsets(size)
        r2 = u * u + v * v
        img = np.exp(-r2 / (2.0 * self.sigma1**2))
        if self.b > 0:
            img = img + self.b * np.exp(-r2 / (2.0 * self.sigma2**2))
        return img


def model_psf(
    fwhm: float = 7.7,
    *,
    add_wing: bool = True,
    wing_fwhm_factor: float = 2.5,
    wing_amplitude: float = 0.1,
    size_factor: float = 3.0,
    min_size: int = 5,
    max_size: int | None = None,
    size: int | None = None,
) -> DoubleGaussianPsf:
    """The model PSF of PSF-matched warps (reference ``MakePsfMatchedWarpConfig.modelPsf``).

    Defaults give ``sigma1 = 3.2699``, ``sigma2 = 8.1747``, ``b = 0.1`` on a 23x23 stamp.
    """
    return DoubleGaussianPsf.from_fwhm(
        fwhm, add_wing=add_wing, wing_fwhm_factor=wing_fwhm_factor, wing_amplitude=wing_amplitude,
        size_factor=size_factor, min_size=min_size, max_size=max_size, size=size,
    )


@dataclass(frozen=True)
class MoffatPsf(PsfModel):
    """Circular Moffat profile ``(1 + r²/alpha²)^-beta``, point-sampled; ``alpha`` from the FWHM."""

    fwhm_px: float
    beta: float = 3.5
    size: int | None = None

    def __post_init__(self):
        if not (np.isfinite(self.fwhm_px) and self.fwhm_px > 0):
            raise SchemaError(f"MoffatPsf FWHM must be positive, got {self.fwhm_px}")
        if not self.beta > 1:
            raise SchemaError(f"MoffatPsf beta must exceed 1, got {self.beta}")
        if self.size is not None:
            _check_size(self.size)

    @property
    def alpha(self) -> float:
        return self.fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))

    def default_size(self, x, y):
        return self.size if self.size is not None else odd_size(4.0 * self.fwhm_px + 1.0)

    def sigma_guess(self, x, y):
        return self.fwhm_px / FWHM_PER_SIGMA

    def _render(self, x, y, size):
        u, v = _offsets(size)
        return (1.0 + (u * u + v * v) / self.alpha**2) ** (-self.beta)


class ImagePsf(PsfModel):
    """A spatially constant pixelised PSF (odd-sized image; normalised on construction)."""

    def __init__(self, image):
        img = np.array(image, dtype=np.float64)
        if img.ndim != 2 or img.shape[0] != img.shape[1]:
            raise SchemaError(f"ImagePsf needs a square 2-D image, got shape {img.shape}")
        _check_size(img.shape[0], "ImagePsf image size")
        if not np.all(np.isfinite(img)):
            raise SchemaError("ImagePsf image contains non-finite values")
        self.image = _normalised(img, "ImagePsf image")
        self.image.flags.writeable = False

    def __repr__(self):
        return f"ImagePsf(size={self.image.shape[0]})"

    def default_size(self, x, y):
        return self.image.shape[0]

    def _render(self, x, y, size):
        return _recentre(self.image, size)


class GridPsf(PsfModel):
    """PSF images on a grid of nodes (the data model's ``psf`` variable), bilinear in between.

    Outside the grid the nearest edge node values are used (no extrapolation). With
    ``fill_missing``, nodes whose image is not finite (a warped PSF where the exposure does not
    reach) take the image of the nearest finite node.
    """

    def __init__(self, images, *, x, y, fill_missing: bool = False):
        arr = np.array(images, dtype=np.float64)
        xs = np.atleast_1d(np.asarray(x, dtype=np.float64))
        ys = np.atleast_1d(np.asarray(y, dtype=np.float64))
        if arr.ndim == 2:
            arr = arr[None, None]
        if arr.ndim != 4 or arr.shape[:2] != (ys.size, xs.size):
            raise SchemaError(f"PSF images of shape {arr.shape} do not match a {ys.size}x{xs.size} grid")
        if arr.shape[2] != arr.shape[3] or arr.shape[2] % 2 == 0:
            raise SchemaError(f"PSF grid images must be square with an odd size, got {arr.shape[2]}x{arr.shape[3]}")
        if (xs.size > 1 and np.any(np.diff(xs) <= 0)) or (ys.size > 1 and np.any(np.diff(ys) <= 0)):
            raise SchemaError("PSF grid node positions must increase strictly")
        finite = np.all(np.isfinite(arr), axis=(2, 3))
        if not finite.all():
            if not fill_missing:
                raise SchemaError("PSF grid images contain non-finite values")
            if not finite.any():
                raise SchemaError("no PSF grid node has a finite image")
            good = np.argwhere(finite)
            for j, i in np.argwhere(~finite):
                gj, gi = good[np.argmin((good[:, 0] - j) ** 2 + (good[:, 1] - i) ** 2)]
                arr[j, i] = arr[gj, gi]
        sums = arr.sum(axis=(2, 3), keepdims=True)
        if np.any(sums <= 0):
            raise SchemaError("PSF grid images must have a positive sum")
        arr = arr / sums
        self.images, self.xs, self.ys = arr, xs, ys
        for a in (self.images, self.xs, self.ys):
            a.flags.writeable = False

    def __repr__(self):
        return f"GridPsf(nodes={self.ys.size}x{self.xs.size}, size={self.images.shape[2]})"

    @classmethod
    def from_dataset(cls, ds: xr.Dataset, *, fill_missing: bool = False) -> GridPsf:
        """The ``psf`` variable of a Dataset as a model; the variable must be in memory (numpy)."""
        ids = data_ids(ds)
        if "psf" not in ds.variables:
            raise SchemaError("the exposure has no 'psf' variable (no PSF model)", ids=ids)
        psf = ds["psf"]
        if psf.dims != PSF_DIMS:
            raise SchemaError(f"variable 'psf' has dims {psf.dims}, expected {PSF_DIMS}", ids=ids)
        import dask

        if dask.is_dask_collection(psf.data):
            raise SchemaError("the 'psf' variable is lazy; load it before building a PSF model from it", ids=ids)
        return cls(psf.data, x=ds["psf_x"].data, y=ds["psf_y"].data, fill_missing=fill_missing)

    def default_size(self, x, y):
        return self.images.shape[2]

    def _weights(self, nodes: np.ndarray, v: float):
        if nodes.size == 1 or v <= nodes[0]:
            return 0, 0, 0.0
        if v >= nodes[-1]:
            return nodes.size - 1, nodes.size - 1, 0.0
        i = int(np.searchsorted(nodes, v, side="right")) - 1
        return i, i + 1, (v - nodes[i]) / (nodes[i + 1] - nodes[i])

    def _render(self, x, y, size):
        i0, i1, fx = self._weights(self.xs, x)
        j0, j1, fy = self._weights(self.ys, y)
        im = self.images
        img = (1 - fy) * ((1 - fx) * im[j0, i0] + fx * im[j0, i1]) + fy * ((1 - fx) * im[j1, i0] + fx * im[j1, i1])
        return _recentre(img, size)


@dataclass(frozen=True)
class PsfexPsf(PsfModel):
    """A PSFEx model (anything with ``image_at(x, y, size=None)``, e.g. ``pipeline.io.psfex.PsfexModel``)."""

    model: object = field(repr=False)

    @classmethod
    def from_file(cls, path, *, x0: int = 0, y0: int = 0) -> PsfexPsf:
        """Read a PSFEx ``.psf`` file; ``(x0, y0)`` is the parent-frame pixel of the first pixel of
        the image PSFEx was run on (positions are then taken in the parent frame)."""
        from .io.psfex import PsfexModel

        return cls(PsfexModel.from_file(path, x0=x0, y0=y0))

    def default_size(self, x, y):
        size = getattr(self.model, "default_size", None)
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            return int(size)
        return int(np.shape(self.model.image_at(x, y))[0])

    def _render(self, x, y, size):
        img = np.asarray(self.model.image_at(x, y, size=size), dtype=np.float64)
        if img.ndim != 2 or img.shape[0] != img.shape[1] or img.shape[0] % 2 == 0:
            raise SchemaError(f"PSFEx image at ({x}, {y}) has shape {img.shape}; expected square and odd")
        return img if img.shape[0] == size else _recentre(img, size)
