"""FITS in and out in the layout of LSST calibrated exposures ("calexp").

Layout read and written:

- primary HDU: header with ``VISIT``, ``DETECTOR``, ``BAND`` (or ``FILTER``), ``MJD-OBS``,
  ``EXPTIME`` and the photometric zero point as ``FLUXMAG0`` (flux of magnitude 0 in image units;
  ``zero_point = 2.5 log10 FLUXMAG0``) or ``MAGZERO``; skystack adds ``SKYKIND`` (the Dataset
  kind), ``TRACT``/``PATCH`` for warps and coadds and ``SKYATTRS`` (the remaining attrs as JSON);
- ``IMAGE`` (float32, carries the WCS), ``MASK`` (integer, ``MP_<PLANE> = bit`` keywords),
  ``VARIANCE`` (float32); optional ``PSF`` (normalised PSF image at the exposure centre) and,
  for coadds, ``NIMAGE`` (int32 number of inputs per pixel).

The WCS in a FITS file applies to the FITS array (1-based); the array's place in its parent frame
is given by ``LTV1``/``LTV2`` (= ``-x0``, ``-y0``) and by an alternate linear WCS ``A`` whose
``CRVAL1A``/``CRVAL2A`` are the parent coordinates of FITS pixel ``CRPIX1A``/``CRPIX2A``. Reading
moves the WCS to the parent frame of the Dataset (``x``/``y`` coordinates are parent pixels);
writing moves it back.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Any

import dask
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS

from ..errors import FitsFormatError, MaskPlaneError, SchemaError
from ..model.geometry import Box
from ..model.masks import CANONICAL_PLANES, MAX_PLANES, MaskPlane, add_planes, remap_mask
from ..model.schema import (
    KINDS,
    NJY_ZERO_POINT,
    SCHEMA_VERSION,
    data_ids,
    make_dataset,
    mask_planes,
    origin,
    psf_grid,
    validate,
)
from ..model.wcs import WCS_COORD, check_celestial, shift_header, wcs_header_string
from .psfex import PsfexModel

__all__ = ["read_fits", "write_fits", "REQUIRED_HDUS", "ZERO_POINT_KEYWORDS"]

REQUIRED_HDUS = ("IMAGE", "MASK", "VARIANCE")
#: keywords searched (primary header, then IMAGE header) for the photometric zero point
ZERO_POINT_KEYWORDS = ("MAGZERO", "FLUXMAG0")

_NONFINITE_BITS = np.uint32(MaskPlane.NO_DATA | MaskPlane.UNMASKEDNAN)
_BAD_VARIANCE_BIT = np.uint32(MaskPlane.BAD_VARIANCE)
_NO_DATA_BIT = np.uint32(MaskPlane.NO_DATA)
# attrs carried by their own header keywords (everything else JSON-encoded in SKYATTRS)
_KEYWORD_ATTRS = ("kind", "schema_version", "visit", "detector", "tract", "patch", "band", "mjd_obs",
                  "exptime", "zero_point", "bunit")
# attrs re-derived on every read
_DERIVED_ATTRS = ("source", "n_nonfinite", "n_bad_variance")


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_fits(path, *, psf_file=None, psf_nodes: tuple[int, int] = (3, 3)) -> xr.Dataset:
    """Read an LSST-style multi-extension FITS exposure (or a warp/coadd we wrote) into a Dataset.

    The result is numpy-backed, in the parent pixel frame, with the file's mask planes mapped
    by name onto the canonical bits (unknown names kept on free bits). NaN/inf image pixels not
    already flagged ``NO_DATA`` get ``NO_DATA|UNMASKEDNAN``; other pixels whose variance is not
    positive and finite get ``BAD_VARIANCE``. Attrs ``n_nonfinite`` counts all non-finite image
    pixels, ``n_bad_variance`` the pixels flagged ``BAD_VARIANCE``. Neither raises nor warns.

    Parameters
    ----------
    path
        The FITS file.
    psf_file
        Optional PSFEx ``.psf`` file measured on this exposure; realised on a ``psf_nodes =
        (n_y, n_x)`` grid over the exposure. Takes precedence over a ``PSF`` HDU.

    Raises
    ------
    FitsFormatError
        Naming the file and what is wrong: missing HDU, planes whose shapes disagree, no or
        non-celestial WCS, no zero point, truncated or unreadable file, bad PSF.
    """
    name = os.path.basename(os.fspath(path))
    ids: dict[str, Any] = {"file": name}
    with _open(path, ids) as hdul:
        hdus = {h.name.upper(): h for h in reversed(list(hdul))}
        missing = [h for h in REQUIRED_HDUS if h not in hdus]
        if missing:
            raise FitsFormatError(
                f"missing HDU(s) {', '.join(missing)} (HDUs present: {[h.name for h in hdul]})", ids=ids
            )
        primary = hdul[0].header
        image_hdu = hdus["IMAGE"]
        header = image_hdu.header
        image = _data(image_hdu, "IMAGE", ids)
        mask_raw = _data(hdus["MASK"], "MASK", ids)
        variance = _data(hdus["VARIANCE"], "VARIANCE", ids)
        psf_raw = _data(hdus["PSF"], "PSF", ids) if "PSF" in hdus else None
        nimage = _data(hdus["NIMAGE"], "NIMAGE", ids) if "NIMAGE" in hdus else None
        mask_header = hdus["MASK"].header

    _check_shapes(ids, IMAGE=image, MASK=mask_raw, VARIANCE=variance, NIMAGE=nimage)
    image = np.array(image, dtype=np.float32)
    variance = np.array(variance, dtype=np.float32)
    if not np.issubdtype(mask_raw.dtype, np.integer):
        raise FitsFormatError(f"MASK HDU holds {mask_raw.dtype} data; an integer bit field is expected", ids=ids)
    mask_file = (mask_raw.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)

    x0, y0 = _parent_origin(header, ids)
    wcs_string = _parent_wcs(header, x0, y0, ids)

    file_planes = _file_planes(mask_header, mask_file, ids)
    extra = [n for n, _ in sorted(file_planes.items(), key=lambda kv: kv[1]) if n not in CANONICAL_PLANES]
    try:
        planes = add_planes(CANONICAL_PLANES, extra)
    except MaskPlaneError as exc:
        raise FitsFormatError(f"MASK HDU: {exc.reason}", ids=ids) from None
    mask = np.asarray(remap_mask(mask_file, file_planes, planes), dtype=np.uint32)

    # the standard no-data pixel (NaN, NO_DATA, +inf) is already masked and stays as it is
    no_data = (mask & _NO_DATA_BIT) != 0
    nonfinite = ~np.isfinite(image)
    mask[nonfinite & ~no_data] |= _NONFINITE_BITS
    no_data |= nonfinite
    bad_variance = ~(np.isfinite(variance) & (variance > 0)) & ~no_data
    mask[bad_variance] |= _BAD_VARIANCE_BIT

    attrs = _read_attrs(primary, header, ids)
    attrs["source"] = name
    attrs["n_nonfinite"] = int(nonfinite.sum())
    attrs["n_bad_variance"] = int(bad_variance.sum())
    kind = attrs.pop("kind")
    attrs.pop("schema_version", None)

    ny, nx = image.shape
    box = Box.from_shape((ny, nx), x0=x0, y0=y0)
    if psf_file is not None:
        psf = PsfexModel.from_file(psf_file, x0=x0, y0=y0).to_psf_grid(box, n=psf_nodes)
    elif psf_raw is not None:
        psf = _psf_from_hdu(psf_raw, box, ids)
    else:
        psf = None

    ds = make_dataset(image, variance, mask, wcs=wcs_string, kind=kind, x0=x0, y0=y0, planes=planes,
                      psf=psf, attrs=attrs)
    if nimage is not None:
        ds["n_image"] = (("y", "x"), np.array(nimage, dtype=np.int32), {"grid_mapping": WCS_COORD})
    return ds


class _open:
    """Open a FITS file, turning unreadable or truncated files into :class:`FitsFormatError`."""

    def __init__(self, path, ids):
        self.path, self.ids = path, ids
        self.hdul = None

    def __enter__(self) -> fits.HDUList:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.hdul = fits.open(self.path, memmap=False, lazy_load_hdus=False)
            except FileNotFoundError:
                raise
            except Exception as exc:
                raise FitsFormatError(f"unreadable FITS file: {exc}", ids=self.ids) from None
        problems = [str(w.message).splitlines()[0] for w in caught
                    if any(s in str(w.message).lower() for s in ("truncat", "corrupt", "not multiple of 2880"))]
        try:
            self._check_size()
        except FitsFormatError:
            self.hdul.close()
            raise
        if problems:
            self.hdul.close()
            raise FitsFormatError(f"truncated or unreadable FITS file: {problems[0]}", ids=self.ids)
        return self.hdul

    def _check_size(self):
        size = os.path.getsize(self.path)
        for i, hdu in enumerate(self.hdul):
            info = self.hdul.fileinfo(i)
            # unpadded size for plain HDUs; on-disk span for tile-compressed ones (hdu.size is the image)
            need = info["datLoc"] + min(hdu.size, info["datSpan"])
            if need > size:
                raise FitsFormatError(
                    f"truncated FITS file: HDU {i} ({hdu.name}) needs {need} bytes but the file has {size}",
                    ids=self.ids,
                )

    def __exit__(self, *exc):
        if self.hdul is not None:
            self.hdul.close()
        return False


def _data(hdu, what: str, ids) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = hdu.data
            data = None if data is None else np.array(data)
    except Exception as exc:
        raise FitsFormatError(f"truncated or unreadable {what} HDU: {exc}", ids=ids) from None
    if data is None:
        raise FitsFormatError(f"{what} HDU holds no data; a 2-D image is expected", ids=ids)
    if data.ndim != 2:
        raise FitsFormatError(f"{what} HDU must hold a 2-D image, found data of shape {data.shape}", ids=ids)
    return data.astype(data.dtype.newbyteorder("="), copy=False)


def _check_shapes(ids, **arrays):
    shapes = {k: v.shape for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise FitsFormatError(f"image planes have different shapes: {listing}", ids=ids)


def _parent_origin(header: fits.Header, ids) -> tuple[int, int]:
    """Parent-frame pixel of the first FITS pixel, from LTV1/LTV2 and/or the linear 'A' WCS."""
    found: dict[str, tuple[float, float]] = {}
    if "LTV1" in header or "LTV2" in header:
        for key in ("LTM1_1", "LTM2_2"):
            if key in header and float(header[key]) != 1.0:
                raise FitsFormatError(f"{key} = {header[key]}; only unbinned (LTM = 1) sub-images are supported",
                                      ids=ids)
        found["LTV1/LTV2"] = (-float(header.get("LTV1", 0.0)), -float(header.get("LTV2", 0.0)))
    if ("CRVAL1A" in header or "CRVAL2A" in header) and str(header.get("CTYPE1A", "LINEAR")).strip().upper() in (
        "LINEAR",
        "",
    ):
        xy = []
        for axis in (1, 2):
            scale = float(header.get(f"CD{axis}_{axis}A", header.get(f"CDELT{axis}A", 1.0)))
            if scale != 1.0:
                raise FitsFormatError(f"the parent-frame WCS 'A' has scale {scale} on axis {axis}; expected 1",
                                      ids=ids)
            crval = float(header.get(f"CRVAL{axis}A", 0.0))
            crpix = float(header.get(f"CRPIX{axis}A", 1.0))
            xy.append(crval + (1.0 - crpix))
        found["CRVAL1A/CRVAL2A"] = (xy[0], xy[1])
    if not found:
        return 0, 0
    values = list(found.values())
    if len(values) == 2 and values[0] != values[1]:
        raise FitsFormatError(f"parent origins disagree: {found}", ids=ids)
    ox, oy = values[0]
    if ox != round(ox) or oy != round(oy):
        raise FitsFormatError(f"parent origin {values[0]} is not an integer pixel", ids=ids)
    return int(round(ox)), int(round(oy))


def _parent_wcs(header: fits.Header, x0: int, y0: int, ids) -> str:
    """The IMAGE HDU's celestial WCS as a header string in the parent frame."""
    if "CTYPE1" not in header and "CTYPE2" not in header:
        raise FitsFormatError("IMAGE HDU has no WCS (no CTYPE1/CTYPE2 keywords)", ids=ids)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(header, relax=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(exc).__name__
        raise FitsFormatError(f"IMAGE HDU WCS cannot be parsed: {detail}", ids=ids) from None
    try:
        check_celestial(wcs, what="IMAGE HDU WCS")
    except SchemaError as exc:
        raise FitsFormatError(exc.reason, ids=ids) from None
    return shift_header(wcs_header_string(wcs), -x0, -y0)


def _file_planes(header: fits.Header, mask: np.ndarray, ids) -> dict[str, int]:
    """name -> bit from ``MP_`` keywords (canonical planes when none); bits set but unnamed kept."""
    planes: dict[str, int] = {}
    owner: dict[int, str] = {}
    for key in header.keys():
        if not key.upper().startswith("MP_") or len(key) <= 3:
            continue
        plane = key[3:].upper()
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < MAX_PLANES:
            raise FitsFormatError(f"MASK keyword {key} = {value!r} is not a bit index in 0..{MAX_PLANES - 1}",
                                  ids=ids)
        if int(value) in owner:
            raise FitsFormatError(f"MASK keywords MP_{owner[int(value)]} and {key} both claim bit {value}", ids=ids)
        owner[int(value)] = plane
        planes[plane] = int(value)
    if not planes:
        planes = dict(CANONICAL_PLANES)
    used = int(np.bitwise_or.reduce(mask, axis=None)) if mask.size else 0
    named = set(planes.values())
    for bit in range(MAX_PLANES):
        if used >> bit & 1 and bit not in named:
            planes[f"UNNAMED_BIT{bit}"] = bit
    return planes


def _lookup(key: str, *headers: fits.Header):
    for h in headers:
        value = h.get(key)
        if value is not None:
            return value
    return None


def _read_attrs(primary: fits.Header, header: fits.Header, ids) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    raw = _lookup("SKYATTRS", primary)
    if raw:
        try:
            extra = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise FitsFormatError(f"SKYATTRS is not valid JSON: {exc}", ids=ids) from None
        if isinstance(extra, dict):
            attrs.update({k: v for k, v in extra.items() if k not in _KEYWORD_ATTRS + _DERIVED_ATTRS})
    kind = _lookup("SKYKIND", primary) or "exposure"
    if kind not in KINDS:
        raise FitsFormatError(f"SKYKIND {kind!r} is not one of {KINDS}", ids=ids)
    attrs["kind"] = kind
    for attr, key, cast in (("visit", "VISIT", int), ("detector", "DETECTOR", int), ("tract", "TRACT", int)):
        value = _lookup(key, primary, header)
        if value is not None:
            try:
                attrs[attr] = cast(value)
            except (TypeError, ValueError):
                raise FitsFormatError(f"{key} = {value!r} is not an integer", ids=ids) from None
    patch = _lookup("PATCH", primary, header)
    if patch is not None:
        attrs["patch"] = patch if isinstance(patch, (int, np.integer)) and not isinstance(patch, bool) else str(patch)
        if isinstance(attrs["patch"], np.integer):
            attrs["patch"] = int(attrs["patch"])
    band = _lookup("BAND", primary, header)
    if band is None:
        band = _lookup("FILTER", primary, header)
    if band is not None:
        attrs["band"] = str(band).strip()
    for attr, key in (("mjd_obs", "MJD-OBS"), ("exptime", "EXPTIME")):
        value = _lookup(key, primary, header)
        if value is not None:
            try:
                attrs[attr] = float(value)
            except (TypeError, ValueError):
                raise FitsFormatError(f"{key} = {value!r} is not a number", ids=ids) from None
    for attr in ("visit", "detector", "band", "tract", "patch"):
        if attr in attrs:
            ids[attr] = attrs[attr]
    bunit = _lookup("BUNIT", header, primary)
    attrs["bunit"] = "nJy" if bunit is not None and str(bunit).strip().lower() == "njy" else "adu"
    attrs["zero_point"] = _zero_point(primary, header, attrs["bunit"], ids)
    return attrs


def _zero_point(primary, header, bunit, ids) -> float:
    magzero = _lookup("MAGZERO", primary, header)
    if magzero is not None:
        zp = _number("MAGZERO", magzero, ids)
    else:
        fluxmag0 = _lookup("FLUXMAG0", primary, header)
        if fluxmag0 is None:
            if bunit == "nJy":
                return NJY_ZERO_POINT
            raise FitsFormatError(
                f"no photometric zero point: none of the keywords {', '.join(ZERO_POINT_KEYWORDS)} is in the "
                "primary or IMAGE header",
                ids=ids,
            )
        flux = _number("FLUXMAG0", fluxmag0, ids)
        if flux <= 0:
            raise FitsFormatError(f"FLUXMAG0 = {flux!r} must be positive", ids=ids)
        zp = 2.5 * float(np.log10(flux))
    return zp


def _number(key, value, ids) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise FitsFormatError(f"{key} = {value!r} is not a number", ids=ids) from None
    if not np.isfinite(out):
        raise FitsFormatError(f"{key} = {value!r} is not finite", ids=ids)
    return out


def _psf_from_hdu(data: np.ndarray, box: Box, ids) -> xr.DataArray:
    ky, kx = data.shape
    if ky % 2 == 0 or kx % 2 == 0:
        raise FitsFormatError(f"PSF HDU must have odd sizes, got {ky}x{kx}", ids=ids)
    data = np.array(data, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise FitsFormatError("PSF HDU contains non-finite values", ids=ids)
    total = float(data.sum())
    if total <= 0:
        raise FitsFormatError(f"PSF HDU must have a positive sum, got {total:g}", ids=ids)
    cx = box.x0 + (box.width - 1) / 2.0
    cy = box.y0 + (box.height - 1) / 2.0
    return psf_grid(data, x=cx, y=cy)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def write_fits(ds: xr.Dataset, path, *, overwrite: bool = False) -> str:
    """Write an exposure, warp or coadd to ``path`` in the layout :func:`read_fits` reads.

    Dask-backed Datasets are computed here (in one pass). The file is written next to ``path``
    under a temporary name and renamed into place, so ``path`` never holds a partial file.
    The PSF written is the grid node nearest the centre; ``n_image`` becomes an ``NIMAGE`` HDU.
    Returns the path written.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    SchemaError
        ``ds`` does not follow the data model or is a stack with a ``visit`` dimension.
    """
    ids = data_ids(ds) if isinstance(ds, xr.Dataset) else {}
    validate(ds)
    if "visit" in ds["image"].dims:
        raise SchemaError(
            f"write_fits writes one image; this Dataset is a stack of {ds.sizes['visit']} visits "
            "(select one with .isel(visit=i))",
            ids=ids,
        )
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")

    names = ["image", "variance", "mask"] + (["n_image"] if "n_image" in ds.data_vars else [])
    psf = _central_psf(ds)
    computed = dask.compute(*[ds[n].data for n in names], psf)
    arrays = dict(zip(names, computed[:-1]))
    psf_image = computed[-1]

    x0, y0 = origin(ds)
    base = _plane_header(ds, x0, y0)
    primary = _primary_header(ds)
    hdus = [fits.PrimaryHDU(header=primary)]

    image_header = base.copy()
    image_header["BUNIT"] = ds.attrs.get("bunit", "adu")
    hdus.append(fits.ImageHDU(np.asarray(arrays["image"], dtype=np.float32), header=image_header, name="IMAGE"))

    mask_header = base.copy()
    for plane, bit in sorted(mask_planes(ds).items(), key=lambda kv: kv[1]):
        key = f"MP_{plane}"
        mask_header.set(key if len(key) <= 8 else f"HIERARCH {key}", bit, "mask plane bit")
    mask = np.asarray(arrays["mask"], dtype=np.uint32).view(np.int32)
    hdus.append(fits.ImageHDU(mask, header=mask_header, name="MASK"))

    hdus.append(fits.ImageHDU(np.asarray(arrays["variance"], dtype=np.float32), header=base.copy(), name="VARIANCE"))
    if psf_image is not None:
        hdus.append(fits.ImageHDU(np.asarray(psf_image, dtype=np.float64), name="PSF"))
    if "n_image" in arrays:
        hdus.append(fits.ImageHDU(np.asarray(arrays["n_image"]).astype(np.int32), header=base.copy(), name="NIMAGE"))

    hdul = fits.HDUList(hdus)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            hdul.writeto(fh, output_verify="exception")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _central_psf(ds: xr.Dataset):
    if "psf" not in ds.variables:
        return None
    psf = ds["psf"]
    box = Box.of(ds)
    cx = box.x0 + (box.width - 1) / 2.0
    cy = box.y0 + (box.height - 1) / 2.0
    iy = int(np.argmin(np.abs(np.asarray(psf["psf_y"].values, dtype=float) - cy)))
    ix = int(np.argmin(np.abs(np.asarray(psf["psf_x"].values, dtype=float) - cx)))
    return psf.isel(psf_y=iy, psf_x=ix).data


def _plane_header(ds: xr.Dataset, x0: int, y0: int) -> fits.Header:
    """WCS in the FITS array frame plus the parent-origin keywords (LTV and the linear 'A' WCS)."""
    header = fits.Header.fromstring(shift_header(ds.coords[WCS_COORD].attrs["fits_header"], x0, y0))
    header["LTV1"] = (-x0, "parent x of FITS pixel 1 is -LTV1")
    header["LTV2"] = (-y0, "parent y of FITS pixel 1 is -LTV2")
    header["LTM1_1"] = 1.0
    header["LTM2_2"] = 1.0
    header["WCSNAMEA"] = "PARENT"
    for axis, value in ((1, x0), (2, y0)):
        header[f"CTYPE{axis}A"] = "LINEAR"
        header[f"CRPIX{axis}A"] = 1.0
        header[f"CRVAL{axis}A"] = float(value)
        header[f"CUNIT{axis}A"] = "PIXEL"
    return header


def _primary_header(ds: xr.Dataset) -> fits.Header:
    attrs = ds.attrs
    header = fits.Header()
    header["SKYKIND"] = (attrs["kind"], "skystack dataset kind")
    header["SKYVERS"] = (int(attrs.get("schema_version", SCHEMA_VERSION)), "skystack schema version")
    for attr, key in (("visit", "VISIT"), ("detector", "DETECTOR"), ("tract", "TRACT"), ("patch", "PATCH"),
                      ("band", "BAND"), ("mjd_obs", "MJD-OBS"), ("exptime", "EXPTIME")):
        value = attrs.get(attr)
        if value is not None:
            header[key] = value
    if "band" in attrs and attrs["band"] is not None:
        header["FILTER"] = attrs["band"]
    zp = attrs.get("zero_point")
    if zp is not None and np.isfinite(zp):
        header["MAGZERO"] = (float(zp), "AB magnitude of one image unit")
        header["FLUXMAG0"] = (float(10.0 ** (0.4 * zp)), "flux (image units) of magnitude 0")
    header["BUNIT"] = attrs.get("bunit", "adu")
    rest = {k: v for k, v in attrs.items() if k not in _KEYWORD_ATTRS + _DERIVED_ATTRS}
    if rest:
        # "/" escaped (valid JSON): astropy misreads " / " inside CONTINUE-d long strings
        header["SKYATTRS"] = json.dumps(rest, sort_keys=True).replace("/", "\\/")
    return header

