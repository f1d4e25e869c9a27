"""The WCS coordinate: a 0-d ``wcs`` coordinate whose attrs hold a FITS header string.

The header always describes the *parent* frame of the Dataset: FITS pixel (1, 1) is parent pixel
(0, 0), so ``x``/``y`` coordinate values go straight into :func:`get_wcs` ``(...).pixel_to_world``.
Build a fresh :class:`astropy.wcs.WCS` for every use: WCS objects are not thread-safe.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from ..errors import SchemaError

__all__ = [
    "WCS_COORD",
    "wcs_coord",
    "wcs_header_string",
    "get_wcs",
    "has_wcs",
    "check_celestial",
    "shift_header",
    "pixel_scale_arcsec",
]

WCS_COORD = "wcs"
_HEADER_ATTR = "fits_header"


def wcs_header_string(wcs: WCS | fits.Header | str) -> str:
    """Canonical header string of a celestial WCS (SIP terms kept)."""
    if isinstance(wcs, str):
        wcs = fits.Header.fromstring(wcs)
    if isinstance(wcs, fits.Header):
        wcs = _wcs_from_header(wcs)
    header = wcs.to_header(relax=True)
    for key in ("DATE-OBS", "MJD-OBS", "DATEREF", "MJDREF", "MJDREFI", "MJDREFF", "WCSAXES"):
        header.remove(key, ignore_missing=True)
    if wcs.sip is not None:
        for key in ("CTYPE1", "CTYPE2"):
            if not header[key].endswith("-SIP"):
                header[key] = header[key] + "-SIP"
    return header.tostring()


def _wcs_from_header(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, relax=True)


def wcs_coord(wcs: WCS | fits.Header | str) -> xr.DataArray:
    """A 0-d coordinate carrying the WCS header string in its attrs."""
    return xr.DataArray(np.int32(0), attrs={_HEADER_ATTR: wcs_header_string(wcs)})


def has_wcs(ds: xr.Dataset | xr.DataArray) -> bool:
    return WCS_COORD in ds.coords and _HEADER_ATTR in ds.coords[WCS_COORD].attrs


def get_wcs(ds: xr.Dataset | xr.DataArray) -> WCS:
    """A new astropy WCS in the parent pixel frame of ``ds`` (0-based, x then y)."""
    if not has_wcs(ds):
        raise SchemaError("the dataset has no 'wcs' coordinate with a 'fits_header' attribute")
    return _wcs_from_header(fits.Header.fromstring(ds.coords[WCS_COORD].attrs[_HEADER_ATTR]))


def check_celestial(wcs: WCS, *, what: str = "WCS") -> None:
    """Raise :class:`SchemaError` unless ``wcs`` is a 2-D celestial WCS with an invertible matrix."""
    if wcs.naxis != 2 or not wcs.has_celestial or wcs.celestial.naxis != 2:
        raise SchemaError(f"{what} is not a 2-D celestial WCS (CTYPE {list(wcs.wcs.ctype)})")
    try:
        matrix = wcs.pixel_scale_matrix
    except Exception as exc:  # astropy raises several kinds here
        raise SchemaError(f"{what} has no usable pixel scale matrix: {exc}") from None
    det = float(np.linalg.det(matrix))
    with np.errstate(all="ignore"):
        cond = float(np.linalg.cond(matrix)) if np.all(np.isfinite(matrix)) else np.inf
    # singular: pixels of no size (|det| below 1e-30 deg^2, 3.6e-12 arcsec on a side) or degenerate shape
    if not np.isfinite(det) or abs(det) < 1e-30 or not np.isfinite(cond) or cond > 1e10:
        raise SchemaError(f"{what} has a singular pixel scale matrix (determinant {det:g}, condition number {cond:.3g})")


def shift_header(header_string: str, dx: float, dy: float) -> str:
    """Header of the same WCS for pixel coordinates shifted by ``(dx, dy)``: new = old - (dx, dy)."""
    header = fits.Header.fromstring(header_string)
    header["CRPIX1"] = header["CRPIX1"] - dx
    header["CRPIX2"] = header["CRPIX2"] - dy
    return header.tostring()


def pixel_scale_arcsec(wcs: WCS) -> float:
    """Mean pixel scale (arcsec/pixel) at the reference point."""
    return float(np.sqrt(abs(np.linalg.det(wcs.celestial.pixel_scale_matrix))) * 3600.0)
