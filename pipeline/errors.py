"""Exceptions and warnings raised by skystack.

Every error that concerns a particular piece of data carries its ids (visit, detector, tract,
patch, band, file) in ``ids`` and in its message, so a failure deep inside a cluster run still
says which input was at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "SkystackError",
    "SchemaError",
    "MaskPlaneError",
    "FitsFormatError",
    "RepositoryError",
    "ProductIncompleteError",
    "SkyMapError",
    "DataQualityError",
    "PsfMatchError",
    "SkystackWarning",
    "describe_ids",
]

_ID_KEYS = ("file", "visit", "detector", "tract", "patch", "band", "kind")


def describe_ids(ids: Mapping[str, Any] | None) -> str:
    """Format data ids as ``visit=12 detector=3`` in a stable order ("" when none)."""
    if not ids:
        return ""
    keys = [k for k in _ID_KEYS if ids.get(k) is not None]
    keys += sorted(k for k in ids if k not in _ID_KEYS and ids[k] is not None)
    return " ".join(f"{k}={ids[k]}" for k in keys)


class SkystackError(Exception):
    """Base class of all skystack errors; ``ids`` names the data concerned."""

    def __init__(self, message: str, *, ids: Mapping[str, Any] | None = None):
        self.ids = dict(ids or {})
        where = describe_ids(self.ids)
        super().__init__(f"{message} [{where}]" if where else message)
        self.reason = message


class SchemaError(SkystackError, ValueError):
    """A Dataset does not follow the skystack data model."""


class MaskPlaneError(SkystackError, ValueError):
    """Mask plane dictionaries disagree or a plane name is unknown."""


class FitsFormatError(SkystackError, ValueError):
    """A FITS file is not a readable exposure (missing HDU, bad shapes, no WCS, ...)."""


class RepositoryError(SkystackError):
    """The Zarr repository is missing, malformed, or holds a conflicting product."""


class ProductIncompleteError(RepositoryError):
    """A product exists in the repository but was never marked complete."""


class SkyMapError(SkystackError, ValueError):
    """Sky-map geometry requests that cannot be satisfied (bad index, no overlap)."""


class DataQualityError(SkystackError):
    """A failure that depends on pixel values, raised while a graph runs."""


class PsfMatchError(SkystackError, ValueError):
    """The PSF-matching kernel cannot be built or solved (bad geometry, ill-conditioned, deconvolution)."""


class SkystackWarning(UserWarning):
    """Warnings issued by skystack (the test-suite turns them into errors)."""
