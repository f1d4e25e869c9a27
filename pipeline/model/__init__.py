"""Data model: schema, mask planes, WCS coordinate, PSF grid, calibration, sky map."""

from .geometry import Box
from .masks import (
    CANONICAL_PLANES,
    MaskPlane,
    add_planes,
    bitmask,
    check_same_planes,
    decode_pixel,
    mask_attrs,
    planes_from_attrs,
    remap_mask,
)
from .schema import (
    ID_KEYS,
    KINDS,
    NJY_ZERO_POINT,
    PSF_DIMS,
    SCHEMA_VERSION,
    calibrate_to_njy,
    data_ids,
    empty_like_frame,
    make_dataset,
    mask_planes,
    njy_per_unit,
    origin,
    provenance,
    psf_grid,
    validate,
    with_provenance,
)
from .wcs import WCS_COORD, check_celestial, get_wcs, has_wcs, pixel_scale_arcsec, shift_header, wcs_coord, wcs_header_string

__all__ = [
    "Box",
    "CANONICAL_PLANES", "MaskPlane", "add_planes", "bitmask", "check_same_planes", "decode_pixel",
    "mask_attrs", "planes_from_attrs", "remap_mask",
    "ID_KEYS", "KINDS", "NJY_ZERO_POINT", "PSF_DIMS", "SCHEMA_VERSION", "calibrate_to_njy", "data_ids",
    "empty_like_frame", "make_dataset", "mask_planes", "njy_per_unit", "origin", "provenance", "psf_grid",
    "validate", "with_provenance",
    "WCS_COORD", "check_celestial", "get_wcs", "has_wcs", "pixel_scale_arcsec", "shift_header", "wcs_coord",
    "wcs_header_string",
]
