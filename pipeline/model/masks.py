"""Mask planes: one canonical bit assignment, stored as CF ``flag_masks``/``flag_meanings``.

The first eleven planes are the reference's fixed initial planes; the coadd planes follow in the
order the reference creates them. Planes that arrive from elsewhere under other names (for
instance an ``MP_FOO`` keyword in a FITS mask header) are kept under their own names and given
free bits above the canonical ones; the mapping travels with the data in the mask attributes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import numpy as np

from ..errors import MaskPlaneError

__all__ = [
    "MaskPlane",
    "CANONICAL_PLANES",
    "MAX_PLANES",
    "planes_from_attrs",
    "mask_attrs",
    "bitmask",
    "add_planes",
    "check_same_planes",
    "remap_mask",
    "decode_pixel",
]

MAX_PLANES = 32


class MaskPlane(enum.IntFlag):
    """Canonical mask bits (value = 1 << bit)."""

    BAD = 1 << 0  # known bad pixel (defect)
    SAT = 1 << 1  # saturated
    INTRP = 1 << 2  # value was interpolated
    CR = 1 << 3  # cosmic ray
    EDGE = 1 << 4  # near the edge of the detector or a kernel border
    DETECTED = 1 << 5  # inside a positive detection footprint
    DETECTED_NEGATIVE = 1 << 6  # inside a negative detection footprint
    SUSPECT = 1 << 7  # value suspect (near saturation, non-linear)
    NO_DATA = 1 << 8  # no valid data
    VIGNETTED = 1 << 9  # vignetted
    STREAK = 1 << 10  # satellite streak
    CLIPPED = 1 << 11  # input removed as an outlier (sigma clip or artifact mask)
    REJECTED = 1 << 12  # an input rejected for a bad-mask bit other than EDGE/NO_DATA/CLIPPED
    SENSOR_EDGE = 1 << 13  # an input rejected because it had EDGE
    INEXACT_PSF = 1 << 14  # coadd PSF not exact here
    BRIGHT_OBJECT = 1 << 15  # inside a bright-star exclusion region
    NOT_DEBLENDED = 1 << 16  # pass-through from upstream processing
    CROSSTALK = 1 << 17  # pass-through from upstream processing
    UNMASKEDNAN = 1 << 18  # pass-through from upstream processing
    BAD_VARIANCE = 1 << 19  # variance not positive and finite: never used as a weight


#: name -> bit index of the canonical planes
CANONICAL_PLANES: dict[str, int] = {p.name: int(p).bit_length() - 1 for p in MaskPlane}


def _split_meanings(meanings: str | Iterable[str]) -> list[str]:
    if isinstance(meanings, str):
        return meanings.split()
    return [str(m) for m in meanings]


def planes_from_attrs(attrs: Mapping) -> dict[str, int]:
    """Return the name -> bit dictionary held in CF mask attributes.

    Attributes without ``flag_masks`` describe the canonical planes.
    """
    if "flag_masks" not in attrs and "flag_meanings" not in attrs:
        return dict(CANONICAL_PLANES)
    try:
        masks = [int(v) for v in np.atleast_1d(attrs["flag_masks"])]
        names = _split_meanings(attrs["flag_meanings"])
    except KeyError as exc:
        raise MaskPlaneError(f"mask attributes need both flag_masks and flag_meanings; {exc} is missing") from None
    if len(masks) != len(names):
        raise MaskPlaneError(
            f"mask attributes disagree: {len(masks)} flag_masks but {len(names)} flag_meanings"
        )
    planes: dict[str, int] = {}
    for name, value in zip(names, masks):
        if value <= 0 or value & (value - 1):
            raise MaskPlaneError(f"mask plane {name!r} has flag_mask {value}, which is not a single bit")
        bit = value.bit_length() - 1
        if bit >= MAX_PLANES:
            raise MaskPlaneError(f"mask plane {name!r} uses bit {bit}; masks are 32-bit")
        if name in planes:
            raise MaskPlaneError(f"mask plane {name!r} is listed twice")
        planes[name] = bit
    if len(set(planes.values())) != len(planes):
        raise MaskPlaneError("two mask planes share one bit")
    return planes


def mask_attrs(planes: Mapping[str, int] | None = None) -> dict:
    """CF attributes (JSON-only) describing a plane dictionary, ordered by bit."""
    planes = CANONICAL_PLANES if planes is None else planes
    items = sorted(planes.items(), key=lambda kv: kv[1])
    return {
        "flag_masks": [int(1 << bit) for _, bit in items],
        "flag_meanings": " ".join(name for name, _ in items),
    }


def bitmask(names: str | Iterable[str], planes: Mapping[str, int] | None = None, *, strict: bool = True) -> int:
    """OR of the bits of ``names``. Unknown names raise unless ``strict`` is false (then skipped)."""
    planes = CANONICAL_PLANES if planes is None else planes
    if isinstance(names, str):
        names = [names]
    value = 0
    for name in names:
        if name in planes:
            value |= 1 << planes[name]
        elif strict:
            raise MaskPlaneError(f"unknown mask plane {name!r}; known planes: {', '.join(planes)}")
    return value


def add_planes(planes: Mapping[str, int], names: Iterable[str]) -> dict[str, int]:
    """Return a copy of ``planes`` with ``names`` added: canonical bit if free, else next free bit."""
    out = dict(planes)
    for name in names:
        if name in out:
            continue
        used = set(out.values())
        bit = CANONICAL_PLANES.get(name)
        if bit is None or bit in used:
            free = [b for b in range(len(CANONICAL_PLANES), MAX_PLANES) if b not in used]
            free += [b for b in range(len(CANONICAL_PLANES)) if b not in used]
            if not free:
                raise MaskPlaneError(f"no free mask bit left for plane {name!r} (at most {MAX_PLANES} planes)")
            bit = free[0]
        out[name] = bit
    return out


def check_same_planes(*plane_dicts: Mapping[str, int], what: Iterable[str] | None = None) -> dict[str, int]:
    """Raise :class:`MaskPlaneError` unless every dictionary is the same; return it."""
    labels = list(what) if what is not None else [f"input {i}" for i in range(len(plane_dicts))]
    first = dict(plane_dicts[0])
    for label, other in zip(labels[1:], plane_dicts[1:]):
        if dict(other) != first:
            diff = sorted(set(first.items()) ^ set(dict(other).items()))
            raise MaskPlaneError(
                f"mask planes of {label} differ from those of {labels[0]}: {diff}; "
                "remap one of them with remap_mask first"
            )
    return first


def remap_mask(mask: np.ndarray, from_planes: Mapping[str, int], to_planes: Mapping[str, int]) -> np.ndarray:
    """Move bits of an integer mask from one plane dictionary to another (uint32 result).

    Every plane set in ``mask`` must exist in ``to_planes``; bits that no plane names are dropped.
    Works on numpy and dask arrays alike (elementwise only).
    """
    missing = [n for n in from_planes if n not in to_planes]
    if missing:
        raise MaskPlaneError(f"mask planes {missing} have no bit in the target dictionary")
    if all(from_planes[n] == to_planes[n] for n in from_planes):
        keep = sum(1 << b for b in from_planes.values())
        return (mask & np.uint32(keep)).astype(np.uint32)
    src = mask.astype(np.uint32)
    out = src & np.uint32(0)
    for name, bit in from_planes.items():
        dest = to_planes[name]
        out = out | (((src >> np.uint32(bit)) & np.uint32(1)) << np.uint32(dest))
    return out.astype(np.uint32)


def decode_pixel(value: int, planes: Mapping[str, int] | None = None) -> list[str]:
    """Names of the planes set in one mask value (handy in notebooks and error messages)."""
    planes = CANONICAL_PLANES if planes is None else planes
    return [name for name, bit in sorted(planes.items(), key=lambda kv: kv[1]) if int(value) >> bit & 1]
