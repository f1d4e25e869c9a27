"""The skystack data model: one ``xr.Dataset`` per exposure, warp, coadd or difference image.

Variables ``image`` (float32), ``variance`` (float32), ``mask`` (uint32 bit field) on dims
``("y", "x")``, optionally with a leading ``visit`` dimension for a stack of warps of one patch.
Coordinates ``y``/``x`` are integer pixel indices in the parent frame (detector for exposures,
tract for warps and coadds). A 0-d ``wcs`` coordinate carries the WCS, an optional ``psf``
variable the PSF on a grid of positions. attrs are JSON-only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from ..errors import SchemaError
from .masks import CANONICAL_PLANES, MaskPlane, mask_attrs, planes_from_attrs
from .wcs import WCS_COORD, check_celestial, get_wcs, has_wcs, wcs_coord

__all__ = [
    "SCHEMA_VERSION",
    "KINDS",
    "ID_KEYS",
    "PSF_DIMS",
    "NJY_ZERO_POINT",
    "make_dataset",
    "validate",
    "data_ids",
    "mask_planes",
    "psf_grid",
    "with_provenance",
    "provenance",
    "njy_per_unit",
    "calibrate_to_njy",
    "origin",
    "empty_like_frame",
]

SCHEMA_VERSION = 1
KINDS = ("exposure", "warp", "psf_matched_warp", "coadd", "template", "diffim", "artifact_mask")
ID_KEYS = ("visit", "detector", "tract", "patch", "band")
PSF_DIMS = ("psf_y", "psf_x", "ky", "kx")
#: AB magnitude of 1 nJy: mag = 31.4 - 2.5 log10(flux / nJy)
NJY_ZERO_POINT = 31.4

_DTYPES = {"image": np.float32, "variance": np.float32, "mask": np.uint32}


def _json_check(attrs: Mapping[str, Any]) -> None:
    try:
        json.dumps(dict(attrs))
    except TypeError as exc:
        raise SchemaError(f"attrs must be JSON-serialisable: {exc}") from None


def make_dataset(
    image,
    variance,
    mask,
    *,
    wcs,
    kind: str = "exposure",
    x0: int = 0,
    y0: int = 0,
    planes: Mapping[str, int] | None = None,
    psf: xr.DataArray | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Assemble a Dataset of the data model from numpy or dask arrays.

    ``x0``/``y0`` is the parent-frame pixel of element ``[0, 0]``; ``wcs`` (astropy WCS, header or
    header string) must describe the parent frame. Arrays are cast to the model's dtypes.
    """
    image = _as_dtype(image, np.float32)
    variance = _as_dtype(variance, np.float32)
    mask = _as_dtype(mask, np.uint32)
    if not (image.shape == variance.shape == mask.shape):
        raise SchemaError(
            f"image {image.shape}, variance {variance.shape} and mask {mask.shape} must have one shape"
        )
    if image.ndim != 2:
        raise SchemaError(f"image must be 2-D (y, x), got {image.ndim} dimensions")
    ny, nx = image.shape
    coords = {
        "y": np.arange(y0, y0 + ny, dtype=np.int64),
        "x": np.arange(x0, x0 + nx, dtype=np.int64),
        WCS_COORD: wcs_coord(wcs),
    }
    mattrs = mask_attrs(planes)
    ds = xr.Dataset(
        {
            "image": (("y", "x"), image, {"grid_mapping": WCS_COORD}),
            "variance": (("y", "x"), variance, {"grid_mapping": WCS_COORD}),
            "mask": (("y", "x"), mask, {"grid_mapping": WCS_COORD, **mattrs}),
        },
        coords=coords,
    )
    if psf is not None:
        ds["psf"] = psf
    base = {"schema_version": SCHEMA_VERSION, "kind": kind}
    base.update(attrs or {})
    _json_check(base)
    ds.attrs.update(base)
    validate(ds)
    return ds


def _as_dtype(a, dtype):
    if getattr(a, "dtype", None) == dtype:
        return a
    if hasattr(a, "astype") and hasattr(a, "shape"):
        return a.astype(dtype)
    return np.asarray(a, dtype=dtype)


def data_ids(ds: xr.Dataset) -> dict[str, Any]:
    """The ids (visit, detector, tract, patch, band) present in ``ds.attrs``."""
    return {k: ds.attrs[k] for k in ID_KEYS if ds.attrs.get(k) is not None}


def mask_planes(ds: xr.Dataset | xr.DataArray) -> dict[str, int]:
    """The name -> bit dictionary of a Dataset's (or a mask DataArray's) mask."""
    mask = ds["mask"] if isinstance(ds, xr.Dataset) else ds
    return planes_from_attrs(mask.attrs)


def validate(ds: xr.Dataset, *, kind: str | None = None, check_wcs: bool = True) -> xr.Dataset:
    """Check ``ds`` against the data model; raise :class:`SchemaError` naming what is wrong.

    Only metadata is inspected (no pixel is computed). Returns ``ds`` for chaining.
    """
    ids = data_ids(ds) if isinstance(ds, xr.Dataset) else {}
    if not isinstance(ds, xr.Dataset):
        raise SchemaError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    for name, dtype in _DTYPES.items():
        if name not in ds.data_vars:
            raise SchemaError(f"variable {name!r} is missing (have {sorted(ds.data_vars)})", ids=ids)
        var = ds[name]
        if var.dtype != dtype:
            raise SchemaError(f"variable {name!r} has dtype {var.dtype}, expected {np.dtype(dtype)}", ids=ids)
        if var.dims[-2:] != ("y", "x"):
            raise SchemaError(f"variable {name!r} has dims {var.dims}; the last two must be ('y', 'x')", ids=ids)
        extra = var.dims[:-2]
        if extra not in ((), ("visit",)):
            raise SchemaError(f"variable {name!r} has leading dims {extra}; only 'visit' is allowed", ids=ids)
    if not (ds["image"].shape == ds["variance"].shape == ds["mask"].shape):
        raise SchemaError(
            f"image {ds['image'].shape}, variance {ds['variance'].shape} and mask {ds['mask'].shape} "
            "must have one shape",
            ids=ids,
        )
    for axis in ("y", "x"):
        if axis not in ds.coords:
            raise SchemaError(f"coordinate {axis!r} is missing", ids=ids)
        values = ds.indexes[axis].values if axis in ds.indexes else np.asarray(ds.coords[axis])
        if not np.issubdtype(values.dtype, np.integer):
            raise SchemaError(f"coordinate {axis!r} must hold integer pixel indices, got {values.dtype}", ids=ids)
        if values.size > 1 and not np.all(np.diff(values) == 1):
            raise SchemaError(f"coordinate {axis!r} must be contiguous and increasing by 1", ids=ids)
    mask_planes(ds)  # raises on malformed plane attributes
    if "schema_version" not in ds.attrs:
        raise SchemaError("attrs lack 'schema_version'", ids=ids)
    if ds.attrs["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(
            f"schema_version {ds.attrs['schema_version']} is not supported (this code reads {SCHEMA_VERSION})",
            ids=ids,
        )
    got_kind = ds.attrs.get("kind")
    if got_kind not in KINDS:
        raise SchemaError(f"attrs 'kind' is {got_kind!r}; expected one of {KINDS}", ids=ids)
    if kind is not None and got_kind != kind:
        raise SchemaError(f"expected a {kind!r} dataset, got kind {got_kind!r}", ids=ids)
    if check_wcs:
        if not has_wcs(ds):
            raise SchemaError("the 'wcs' coordinate (FITS header string) is missing", ids=ids)
        try:
            check_celestial(get_wcs(ds))
        except SchemaError as exc:
            raise SchemaError(exc.reason, ids=ids) from None
    if "psf" in ds.variables:
        psf = ds["psf"]
        if psf.dims != PSF_DIMS:
            raise SchemaError(f"variable 'psf' has dims {psf.dims}, expected {PSF_DIMS}", ids=ids)
        ky, kx = psf.shape[2:]
        if ky % 2 == 0 or kx % 2 == 0:
            raise SchemaError(f"PSF images must have odd sizes, got {ky}x{kx}", ids=ids)
        for axis in ("psf_y", "psf_x"):
            if axis not in ds.coords:
                raise SchemaError(f"PSF grid coordinate {axis!r} is missing", ids=ids)
    return ds


def psf_grid(images, *, x, y) -> xr.DataArray:
    """A PSF variable from images on a grid of parent-frame positions.

    ``images`` has shape ``(len(y), len(x), ky, kx)`` (or ``(ky, kx)`` for one constant PSF, with
    scalar ``x``/``y``). Each image is normalised to sum 1; sizes must be odd.
    """
    arr = np.asarray(images, dtype=np.float64)
    xs = np.atleast_1d(np.asarray(x, dtype=np.float64))
    ys = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if arr.ndim == 2:
        arr = arr[None, None]
    if arr.ndim != 4 or arr.shape[:2] != (ys.size, xs.size):
        raise SchemaError(f"PSF images of shape {arr.shape} do not match a {ys.size}x{xs.size} grid")
    if arr.shape[2] % 2 == 0 or arr.shape[3] % 2 == 0:
        raise SchemaError(f"PSF images must have odd sizes, got {arr.shape[2]}x{arr.shape[3]}")
    if not np.all(np.isfinite(arr)):
        raise SchemaError("PSF images contain non-finite values")
    sums = arr.sum(axis=(2, 3), keepdims=True)
    if np.any(sums <= 0):
        raise SchemaError("PSF images must have a positive sum")
    arr = arr / sums
    return xr.DataArray(arr, dims=PSF_DIMS, coords={"psf_y": ys, "psf_x": xs})


def with_provenance(ds: xr.Dataset, task: str, config: Any = None) -> xr.Dataset:
    """A shallow copy of ``ds`` with one provenance step appended (task name, config JSON, version)."""
    from .. import __version__

    if config is None:
        cfg = None
    elif hasattr(config, "model_dump"):
        cfg = config.model_dump(mode="json")
    else:
        cfg = config
    steps = provenance(ds)
    steps.append({"task": task, "config": cfg, "code_version": __version__})
    out = ds.copy()
    out.attrs = dict(ds.attrs)
    out.attrs["provenance"] = json.dumps(steps, sort_keys=True)
    return out


def provenance(ds: xr.Dataset) -> list[dict]:
    """The provenance steps recorded on ``ds`` (oldest first)."""
    raw = ds.attrs.get("provenance")
    return json.loads(raw) if raw else []


def njy_per_unit(zero_point: float) -> float:
    """Flux in nJy of one image unit for an AB zero point (mag = zp - 2.5 log10(value))."""
    return float(10.0 ** ((NJY_ZERO_POINT - zero_point) / 2.5))


def calibrate_to_njy(ds: xr.Dataset) -> xr.Dataset:
    """Return ``ds`` with image in nJy (variance scaled by the square); lazy, input untouched."""
    ids = data_ids(ds)
    if ds.attrs.get("bunit") == "nJy":
        return ds
    zp = ds.attrs.get("zero_point")
    if zp is None or not np.isfinite(zp):
        raise SchemaError(f"no finite photometric zero point (zero_point={zp!r})", ids=ids)
    scale = njy_per_unit(zp)
    out = ds.copy()
    out["image"] = (ds["image"] * np.float32(scale)).astype(np.float32)
    out["variance"] = (ds["variance"] * np.float32(scale * scale)).astype(np.float32)
    for name in ("image", "variance"):
        out[name].attrs = dict(ds[name].attrs)
    out.attrs = dict(ds.attrs)
    out.attrs.update(zero_point=NJY_ZERO_POINT, bunit="nJy")
    return out


def origin(ds: xr.Dataset | xr.DataArray) -> tuple[int, int]:
    """Parent-frame ``(x0, y0)`` of element ``[0, 0]``."""
    return int(ds.indexes["x"][0]), int(ds.indexes["y"][0])


def empty_like_frame(
    *, x0: int, y0: int, nx: int, ny: int, wcs, kind: str, attrs: Mapping[str, Any] | None = None, chunks=None
) -> xr.Dataset:
    """The standard no-data Dataset (NaN, NO_DATA, +inf) on a frame; dask-backed if ``chunks``."""
    if chunks is not None:
        import dask.array as da

        image = da.full((ny, nx), np.nan, dtype=np.float32, chunks=chunks)
        variance = da.full((ny, nx), np.inf, dtype=np.float32, chunks=chunks)
        mask = da.full((ny, nx), int(MaskPlane.NO_DATA), dtype=np.uint32, chunks=chunks)
    else:
        image = np.full((ny, nx), np.nan, dtype=np.float32)
        variance = np.full((ny, nx), np.inf, dtype=np.float32)
        mask = np.full((ny, nx), int(MaskPlane.NO_DATA), dtype=np.uint32)
    return make_dataset(image, variance, mask, wcs=wcs, kind=kind, x0=x0, y0=y0, planes=CANONICAL_PLANES, attrs=attrs)
