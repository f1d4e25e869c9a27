"""Sky-map geometry: tracts (one TAN projection each) split into patches.

A :class:`Tract` is a square TAN projection around a centre; its pixel frame is 0-based, starts at
(0, 0) and holds an integer number of patches of ``patch_inner`` pixels per axis. A :class:`Patch`
is a window of a tract: its *inner* box tiles the tract exactly (each tract pixel belongs to one
inner box) and its *outer* box is the inner box grown by ``patch_border`` pixels and clipped to the
tract. A :class:`SkyMap` is a tuple of tracts and round-trips through JSON exactly.

Pixel convention (as everywhere in skystack): the centre of pixel ``(x, y)`` has continuous
coordinate ``(x, y)``, so a continuous position belongs to pixel ``floor(x + 0.5)``.

Everything here is plain python/numpy/astropy: cheap, eager and free of dask.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from astropy.wcs import WCS
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ..errors import SkyMapError
from .geometry import Box
from .wcs import check_celestial, wcs_header_string

__all__ = ["Tract", "Patch", "SkyMap", "SKYMAP_JSON_KIND", "SKYMAP_JSON_VERSION"]

SKYMAP_JSON_KIND = "skystack.skymap"
SKYMAP_JSON_VERSION = 1

# Spacing (exposure pixels) of the points sampled along an exposure's edges.
_EDGE_STEP = 64
# Largest tract side (pixels) accepted: pixel coordinates must fit in int32.
_MAX_TRACT_SIDE = 2**31 - 1
# Intersections of smaller area (tract pixels squared) are treated as edge contact only.
_MIN_OVERLAP_AREA = 1e-9


def _pixel_of(v: np.ndarray) -> np.ndarray:
    """Integer pixel holding continuous coordinate ``v`` (pixel centres at integers)."""
    return np.floor(v + 0.5)


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    cd = np.cos(dec_r)
    return np.stack([cd * np.cos(ra_r), cd * np.sin(ra_r), np.sin(dec_r)], axis=-1)


def _separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Angular distance in degrees (Vincenty formula: accurate at every separation)."""
    l1, b1, l2, b2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    dl = l2 - l1
    num = np.hypot(np.cos(b2) * np.sin(dl), np.cos(b1) * np.sin(b2) - np.sin(b1) * np.cos(b2) * np.cos(dl))
    den = np.sin(b1) * np.sin(b2) + np.cos(b1) * np.cos(b2) * np.cos(dl)
    return np.degrees(np.arctan2(num, den))


def _normalise_ra(ra: np.ndarray) -> np.ndarray:
    ra = np.mod(ra, 360.0)
    return np.where(ra >= 360.0, 0.0, ra)


def _boundary(shape: tuple[int, int], x0: int, y0: int) -> tuple[np.ndarray, np.ndarray]:
    """Points along the pixel-edge outline of an array, counter-clockwise, spaced <= _EDGE_STEP."""
    ny, nx = shape
    xlo, xhi, ylo, yhi = x0 - 0.5, x0 + nx - 0.5, y0 - 0.5, y0 + ny - 0.5
    sx = np.linspace(xlo, xhi, max(2, math.ceil(nx / _EDGE_STEP) + 1))
    sy = np.linspace(ylo, yhi, max(2, math.ceil(ny / _EDGE_STEP) + 1))
    px = np.concatenate([sx[:-1], np.full(sy.size - 1, xhi), sx[::-1][:-1], np.full(sy.size - 1, xlo)])
    py = np.concatenate([np.full(sx.size - 1, ylo), sy[:-1], np.full(sx.size - 1, yhi), sy[::-1][:-1]])
    return px, py


def _clip_half_plane(px: np.ndarray, py: np.ndarray, axis: int, bound: float, keep_above: bool):
    """One Sutherland-Hodgman step: the part of polygon (px, py) on one side of ``v = bound``."""
    if px.size == 0:
        return px, py
    v = px if axis == 0 else py
    inside = v >= bound if keep_above else v <= bound
    qx, qy, qv, q_inside = np.roll(px, -1), np.roll(py, -1), np.roll(v, -1), np.roll(inside, -1)
    crossing = inside != q_inside
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(crossing, (bound - v) / np.where(crossing, qv - v, 1.0), 0.0)
    ix, iy = px + t * (qx - px), py + t * (qy - py)
    if axis == 0:
        ix = np.where(crossing, bound, ix)
    else:
        iy = np.where(crossing, bound, iy)
    keep = np.stack([inside, crossing], axis=1)
    return np.stack([px, ix], axis=1)[keep], np.stack([py, iy], axis=1)[keep]


def _clipped_area(px: np.ndarray, py: np.ndarray, xlo: float, xhi: float, ylo: float, yhi: float) -> float:
    """Area of the part of a simple polygon inside the rectangle ``[xlo, xhi] x [ylo, yhi]``."""
    for axis, bound, above in ((0, xlo, True), (0, xhi, False), (1, ylo, True), (1, yhi, False)):
        px, py = _clip_half_plane(px, py, axis, bound, above)
    if px.size < 3:
        return 0.0
    return 0.5 * abs(float(np.dot(px, np.roll(py, -1)) - np.dot(py, np.roll(px, -1))))


class Patch(BaseModel):
    """One patch of a tract: integer boxes in the tract pixel frame (half-open)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tract: int = Field(ge=0, description="Id of the tract the patch belongs to.")
    index: int = Field(ge=0, description="Sequential index j * nx + i.")
    i: int = Field(ge=0, description="Patch column (x direction).")
    j: int = Field(ge=0, description="Patch row (y direction).")
    inner: Box = Field(description="Inner box: the patches' inner boxes tile the tract exactly.")
    outer: Box = Field(description="Inner box grown by the patch border, clipped to the tract box.")

    @property
    def name(self) -> str:
        """The ``"i,j"`` name used on the command line and in repository paths."""
        return f"{self.i},{self.j}"


class Tract(BaseModel):
    """A TAN-projected tract around ``(ra, dec)`` laid out in patches (legacy tract builder).

    Layout: the minimal box of the circle ``radius_deg + tract_overlap_deg`` around the centre
    (the integer pixels it touches, width ``W0``) gets ``n = ceil(W0 / inner)`` patches per axis;
    the tract is grown to ``n * inner`` pixels keeping its centre (``floor(delta / 2)`` extra pixels
    on the low side) and re-based to start at pixel (0, 0).

    Notes
    -----
    lsst/skymap ``ExplicitTractInfo`` with ``LegacyTractBuilder``. Field mapping: ``ra``/``dec``
    <- ``raList``/``decList`` entry, ``radius_deg`` <- ``radiusList`` entry, ``pixel_scale_arcsec``
    <- ``pixelScale`` (reference default 0.333, ours 0.2 as in production), ``patch_inner`` <-
    ``patchInnerDimensions``, ``patch_border`` <- ``patchBorder``, ``tract_overlap_deg`` <-
    ``tractOverlap``, ``rotation_deg`` <- ``rotation``, ``projection`` <- ``projection`` (reference
    default STG, ours TAN). The reference bounds the tract by four points at bearings 0/90/180/270
    deg; we bound the whole circle, which is the same box at rotation 0 and covers the circle for
    any rotation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int = Field(ge=0, le=2**31 - 1, description="Tract id, unique within a sky map.")
    ra: float = Field(ge=0.0, lt=360.0, description="Right ascension of the tract centre (deg, ICRS).")
    dec: float = Field(ge=-90.0, le=90.0, description="Declination of the tract centre (deg, ICRS).")
    radius_deg: float = Field(gt=0.0, lt=90.0, description="Radius the tract must cover (deg).")
    pixel_scale_arcsec: float = Field(0.2, gt=0.0, le=3600.0, description="Pixel scale (arcsec/pixel).")
    patch_inner: tuple[int, int] = Field(
        (4000, 4000), description="Inner patch size (x, y) in pixels, each in [1, 2**20]."
    )
    patch_border: int = Field(100, ge=0, le=2**20, description="Border (pixels) added around each inner box.")
    tract_overlap_deg: float = Field(
        1.0, ge=0.0, lt=90.0, description="Extra radius (deg) so that neighbouring tracts overlap."
    )
    rotation_deg: float = Field(
        0.0, ge=-360.0, le=360.0, description="Position angle of the tract +y axis, north through east (deg)."
    )
    projection: Literal["TAN"] = Field("TAN", description="Sky projection (gnomonic only).")

    _layout: tuple[int, int, int, int] = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        if not (1 <= self.patch_inner[0] <= 2**20 and 1 <= self.patch_inner[1] <= 2**20):
            raise ValueError(f"patch_inner {self.patch_inner} must hold two sizes in [1, 2**20]")
        extent = self.radius_deg + self.tract_overlap_deg
        if extent >= 89.0:
            raise ValueError(
                f"radius_deg + tract_overlap_deg = {extent:g} deg is too large for a TAN tract (must be < 89)"
            )
        half = math.degrees(math.tan(math.radians(self.radius_deg + self.tract_overlap_deg)))
        half *= 3600.0 / self.pixel_scale_arcsec
        lo = math.floor(-half + 0.5)
        width0 = math.ceil(half - 0.5) + 1 - lo
        layout = []
        for inner in self.patch_inner:
            n = max(1, math.ceil(width0 / inner))
            layout += [lo - (n * inner - width0) // 2, n]
        (xlo, nx), (ylo, ny) = layout[:2], layout[2:]
        if nx * self.patch_inner[0] > _MAX_TRACT_SIDE or ny * self.patch_inner[1] > _MAX_TRACT_SIDE:
            raise SkyMapError(
                f"tract {self.id} would be {nx * self.patch_inner[0]} x {ny * self.patch_inner[1]} pixels; "
                f"sides are limited to {_MAX_TRACT_SIDE} (raise pixel_scale_arcsec or lower radius_deg)",
                ids={"tract": self.id},
            )
        # The tract centre sits at pixel (-xlo, -ylo) after re-basing the box to (0, 0).
        self._layout = (-xlo, -ylo, nx, ny)

    # ----------------------------------------------------------------------------------- layout
    @property
    def n_patches(self) -> tuple[int, int]:
        """Number of patches ``(nx, ny)``."""
        return self._layout[2], self._layout[3]

    @property
    def bbox(self) -> Box:
        """The tract box: ``Box(0, 0, nx * inner_x, ny * inner_y)``."""
        nx, ny = self.n_patches
        return Box(0, 0, nx * self.patch_inner[0], ny * self.patch_inner[1])

    @property
    def centre_pixel(self) -> tuple[float, float]:
        """Tract pixel ``(x, y)`` of the tract centre (the projection's tangent point)."""
        return float(self._layout[0]), float(self._layout[1])

    def wcs(self) -> WCS:
        """A new astropy WCS of the tract pixel frame (0-based pixel == astropy pixel)."""
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [self.ra, self.dec]
        cx, cy = self.centre_pixel
        w.wcs.crpix = [cx + 1.0, cy + 1.0]
        s = self.pixel_scale_arcsec / 3600.0
        c, sn = math.cos(math.radians(self.rotation_deg)), math.sin(math.radians(self.rotation_deg))
        w.wcs.cd = np.array([[-s * c, s * sn], [s * sn, s * c]])
        w.wcs.radesys = "ICRS"
        w.pixel_shape = (self.bbox.width, self.bbox.height)
        w.wcs.set()
        return w

    def wcs_header(self) -> str:
        """FITS header string of :meth:`wcs` (the form stored in a Dataset's ``wcs`` coordinate)."""
        return wcs_header_string(self.wcs())

    # ---------------------------------------------------------------------------------- patches
    def patch(self, index: int | tuple[int, int] | str) -> Patch:
        """The patch with sequential ``index`` (``j * nx + i``), ``(i, j)``, or a name ``"i,j"``/``"7"``."""
        nx, ny = self.n_patches
        i, j = self._parse_patch(index)
        if not (0 <= i < nx and 0 <= j < ny):
            raise SkyMapError(
                f"patch {index!r} is out of range: tract {self.id} has {nx} x {ny} patches "
                f"(sequential index 0..{nx * ny - 1}, i in 0..{nx - 1}, j in 0..{ny - 1})",
                ids={"tract": self.id},
            )
        inner_x, inner_y = self.patch_inner
        inner = Box(i * inner_x, j * inner_y, (i + 1) * inner_x, (j + 1) * inner_y)
        return Patch(
            tract=self.id, index=j * nx + i, i=i, j=j, inner=inner,
            outer=inner.grow(self.patch_border).intersect(self.bbox),
        )

    def _parse_patch(self, index: Any) -> tuple[int, int]:
        nx, _ = self.n_patches
        if isinstance(index, str):
            text = index.strip()
            m = re.fullmatch(r"\(?\s*([+-]?\d+)\s*,\s*([+-]?\d+)\s*\)?", text)
            if m:
                return int(m.group(1)), int(m.group(2))
            if re.fullmatch(r"[+-]?\d+", text):
                index = int(text)
            else:
                raise SkyMapError(
                    f"cannot parse patch {index!r}: expected 'i,j' or a sequential index", ids={"tract": self.id}
                )
        if isinstance(index, tuple) and len(index) == 2 and all(_is_int(v) for v in index):
            return int(index[0]), int(index[1])
        if _is_int(index):
            index = int(index)
            if index < 0:
                return -1, -1
            return index % nx, index // nx
        raise SkyMapError(
            f"patch must be an int, an (i, j) pair or an 'i,j' string, not {index!r}", ids={"tract": self.id}
        )

    def patches(self) -> list[Patch]:
        """All patches in sequential-index order."""
        nx, ny = self.n_patches
        return [self.patch(k) for k in range(nx * ny)]

    # ------------------------------------------------------------------------------ sky <-> pix
    def sky_to_pixel(self, ra, dec):
        """Tract pixel ``(x, y)`` of sky positions (deg); NaN on the far side of the projection.

        Scalars give floats, arrays give arrays of the broadcast shape.
        """
        ra_a, dec_a = np.broadcast_arrays(np.asarray(ra, dtype=float), np.asarray(dec, dtype=float))
        x = np.full(ra_a.shape, np.nan)
        y = np.full(ra_a.shape, np.nan)
        near = _separation_deg(self.ra, self.dec, ra_a, dec_a) < 90.0
        if near.any():
            xs, ys = self.wcs().wcs_world2pix(ra_a[near], dec_a[near], 0)
            x[near], y[near] = xs, ys
        if ra_a.ndim == 0:
            return float(x), float(y)
        return x, y

    def pixel_to_sky(self, x, y):
        """Sky position ``(ra, dec)`` in deg (ra in [0, 360)) of tract pixel coordinates (vectorised)."""
        x_a, y_a = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        ra, dec = self.wcs().wcs_pix2world(x_a.ravel(), y_a.ravel(), 0)
        ra = _normalise_ra(ra).reshape(x_a.shape)
        dec = np.asarray(dec).reshape(x_a.shape)
        if x_a.ndim == 0:
            return float(ra), float(dec)
        return ra, dec

    def patch_index_at_sky(self, ra, dec):
        """Sequential index of the patch whose inner box holds each position (-1 outside the tract)."""
        x, y = self.sky_to_pixel(ra, dec)
        px, py = _pixel_of(np.asarray(x)), _pixel_of(np.asarray(y))
        inside = np.isfinite(px) & np.isfinite(py) & self.bbox.contains(px, py)
        nx, _ = self.n_patches
        with np.errstate(invalid="ignore"):
            i = np.where(inside, px, 0).astype(np.int64) // self.patch_inner[0]
            j = np.where(inside, py, 0).astype(np.int64) // self.patch_inner[1]
        out = np.where(inside, j * nx + i, -1)
        return int(out) if out.ndim == 0 else out

    def contains_sky(self, ra, dec):
        """Whether sky positions fall on a pixel of the tract box (vectorised)."""
        index = self.patch_index_at_sky(ra, dec)
        return bool(index >= 0) if np.ndim(index) == 0 else index >= 0

    def patch_at_sky(self, ra: float, dec: float) -> Patch:
        """The patch whose inner box holds the pixel of one sky position."""
        if np.ndim(ra) != 0 or np.ndim(dec) != 0:
            raise SkyMapError(
                "patch_at_sky takes one position; use patch_index_at_sky for arrays", ids={"tract": self.id}
            )
        index = self.patch_index_at_sky(ra, dec)
        if index < 0:
            raise SkyMapError(
                f"position (ra={float(ra):.8f}, dec={float(dec):.8f}) deg is outside tract {self.id} "
                f"(centre ra={self.ra:.6f}, dec={self.dec:.6f}, box {self.bbox.width} x {self.bbox.height} px)",
                ids={"tract": self.id},
            )
        return self.patch(index)

    def patches_overlapping(
        self, wcs: WCS, shape: tuple[int, int], *, x0: int = 0, y0: int = 0, margin: int = 0
    ) -> list[Patch]:
        """Patches whose inner box, grown by ``margin`` tract pixels, overlaps an exposure footprint.

        The footprint is the outline of the exposure's pixels (``shape`` = (ny, nx), element [0, 0]
        at parent pixel ``(x0, y0)`` of ``wcs``), sampled every <= 64 pixels along each edge, mapped
        through the sky into tract pixels; a patch counts when the polygon and the patch region
        share a positive area. Returns patches in sequential-index order, [] when nothing overlaps.
        """
        if len(shape) != 2 or not all(_is_int(v) and v > 0 for v in shape):
            raise SkyMapError(f"exposure shape {tuple(shape)!r} must be two positive integers (ny, nx)",
                              ids={"tract": self.id})
        if not (_is_int(x0) and _is_int(y0)):
            raise SkyMapError(f"exposure origin ({x0!r}, {y0!r}) must be integers", ids={"tract": self.id})
        if not _is_int(margin) or margin < 0:
            raise SkyMapError(f"margin {margin!r} must be a non-negative integer (tract pixels)",
                              ids={"tract": self.id})
        check_celestial(wcs, what="exposure WCS")
        bx, by = _boundary((int(shape[0]), int(shape[1])), int(x0), int(y0))
        ra, dec = wcs.all_pix2world(bx, by, 0)
        tx, ty = self.sky_to_pixel(ra, dec)
        good = np.isfinite(tx) & np.isfinite(ty)
        if good.sum() < 3:
            return []
        tx, ty = tx[good], ty[good]
        inner_x, inner_y = self.patch_inner
        nx, ny = self.n_patches

        def index_range(lo: float, hi: float, inner: int, n: int) -> range:
            first = max(0, math.floor((lo + 0.5 - margin) / inner) - 1)
            last = min(n - 1, math.floor((hi + 0.5 + margin) / inner) + 1)
            return range(first, last + 1)

        found = []
        for j in index_range(ty.min(), ty.max(), inner_y, ny):
            for i in index_range(tx.min(), tx.max(), inner_x, nx):
                area = _clipped_area(
                    tx, ty,
                    i * inner_x - 0.5 - margin, (i + 1) * inner_x - 0.5 + margin,
                    j * inner_y - 0.5 - margin, (j + 1) * inner_y - 0.5 + margin,
                )
                if area > _MIN_OVERLAP_AREA:
                    found.append(j * nx + i)
        return [self.patch(k) for k in sorted(found)]


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


class SkyMap(BaseModel):
    """A set of tracts with unique ids; JSON-only and exactly round-tripping.

    Notes
    -----
    lsst/skymap ``DiscreteSkyMap`` (see :meth:`discrete`); :meth:`centred_on` builds the one-tract
    discrete map around a set of exposures that a repository uses by default.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tracts: tuple[Tract, ...] = Field(min_length=1, description="The tracts, ids unique.")

    @model_validator(mode="after")
    def _unique_ids(self) -> SkyMap:
        ids = [t.id for t in self.tracts]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"tract ids must be unique; repeated: {dupes}")
        return self

    def tract(self, id: int) -> Tract:
        """The tract with this id."""
        for t in self.tracts:
            if t.id == id:
                return t
        raise SkyMapError(
            f"no tract {id!r} in this sky map (tract ids: {[t.id for t in self.tracts]})", ids={"tract": id}
        )

    @property
    def tract_ids(self) -> list[int]:
        return [t.id for t in self.tracts]

    def find_tracts(self, ra: float, dec: float) -> list[Tract]:
        """Tracts whose box holds the position, nearest tract centre first ([] when none does)."""
        hits = [t for t in self.tracts if t.contains_sky(ra, dec)]
        return sorted(hits, key=lambda t: (float(_separation_deg(t.ra, t.dec, ra, dec)), t.id))

    # --------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        """A JSON-only dict (``json.dumps`` and :meth:`from_json` restore an equal sky map)."""
        return {
            "kind": SKYMAP_JSON_KIND,
            "version": SKYMAP_JSON_VERSION,
            "tracts": [t.model_dump(mode="json") for t in self.tracts],
        }

    @classmethod
    def from_json(cls, data: dict) -> SkyMap:
        """Inverse of :meth:`to_json`."""
        if not isinstance(data, dict) or data.get("kind") != SKYMAP_JSON_KIND:
            kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise SkyMapError(f"not a skystack sky map (kind {kind!r}, expected {SKYMAP_JSON_KIND!r})")
        if data.get("version") != SKYMAP_JSON_VERSION:
            raise SkyMapError(
                f"unsupported sky map version {data.get('version')!r} (this code reads {SKYMAP_JSON_VERSION})"
            )
        try:
            return cls.model_validate({"tracts": data.get("tracts")})
        except ValidationError as exc:
            raise SkyMapError(f"invalid sky map: {exc}") from None

    # ---------------------------------------------------------------------------- factories
    @classmethod
    def discrete(cls, centres: Sequence[Sequence[float]], **tract_kwargs: Any) -> SkyMap:
        """One tract per ``(ra, dec, radius_deg)`` centre, ids 0, 1, ...; other Tract fields as keywords.

        Notes
        -----
        lsst/skymap ``DiscreteSkyMap``: ``raList``/``decList``/``radiusList`` are the columns of
        ``centres``; entries of the wrong length raise (the reference's length-mismatch ValueError).
        """
        centres = list(centres)
        if not centres:
            raise SkyMapError("a discrete sky map needs at least one (ra, dec, radius) centre")
        for key in ("id", "ra", "dec", "radius_deg"):
            if key in tract_kwargs:
                raise SkyMapError(f"{key!r} comes from the centres list, not from keyword arguments")
        tracts = []
        for k, centre in enumerate(centres):
            if len(centre) != 3:
                raise SkyMapError(
                    f"centre {k} has {len(centre)} values {tuple(centre)!r}; expected (ra, dec, radius_deg)"
                )
            ra, dec, radius = (float(v) for v in centre)
            tracts.append(Tract(id=k, ra=float(_normalise_ra(ra)), dec=dec, radius_deg=radius, **tract_kwargs))
        return cls(tracts=tuple(tracts))

    @classmethod
    def centred_on(
        cls,
        footprints: Sequence[tuple],
        *,
        pixel_scale_arcsec: float = 0.2,
        patch_inner: tuple[int, int] = (4000, 4000),
        patch_border: int = 100,
        margin_arcsec: float = 30.0,
        rotation_deg: float = 0.0,
        tract_id: int = 0,
    ) -> SkyMap:
        """One tract (no tract overlap) covering every footprint.

        ``footprints`` holds ``(wcs, (ny, nx))`` or ``(wcs, (ny, nx), (x0, y0))`` items, the WCS in
        the parent pixel frame. Centre: the normalised mean unit vector of all footprint corners.
        Radius: the largest angular distance from it of any point of the footprint outlines, plus
        ``margin_arcsec``.
        """
        footprints = list(footprints)
        if not footprints:
            raise SkyMapError("centred_on needs at least one (wcs, shape) footprint")
        if not (math.isfinite(margin_arcsec) and margin_arcsec >= 0):
            raise SkyMapError(f"margin_arcsec {margin_arcsec!r} must be finite and >= 0")
        corners, outline = [], []
        for k, item in enumerate(footprints):
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise SkyMapError(f"footprint {k} must be (wcs, (ny, nx)) or (wcs, (ny, nx), (x0, y0))")
            wcs, shape = item[0], tuple(item[1])
            x0, y0 = tuple(item[2]) if len(item) == 3 else (0, 0)
            if not isinstance(wcs, WCS):
                raise SkyMapError(f"footprint {k}: expected an astropy WCS, got {type(wcs).__name__}")
            check_celestial(wcs, what=f"footprint {k} WCS")
            if len(shape) != 2 or not all(_is_int(v) and v > 0 for v in shape):
                raise SkyMapError(f"footprint {k}: shape {shape!r} must be two positive integers (ny, nx)")
            bx, by = _boundary((int(shape[0]), int(shape[1])), int(x0), int(y0))
            ra, dec = wcs.all_pix2world(bx, by, 0)
            if not (np.isfinite(ra).all() and np.isfinite(dec).all()):
                raise SkyMapError(f"footprint {k}: the WCS does not map the whole outline to the sky")
            outline.append((ra, dec))
            ny, nx = int(shape[0]), int(shape[1])
            cx = np.array([x0 - 0.5, x0 + nx - 0.5, x0 + nx - 0.5, x0 - 0.5])
            cy = np.array([y0 - 0.5, y0 - 0.5, y0 + ny - 0.5, y0 + ny - 0.5])
            corners.append(_unit_vectors(*wcs.all_pix2world(cx, cy, 0)))
        mean = np.concatenate(corners).mean(axis=0)
        norm = float(np.linalg.norm(mean))
        if norm < 1e-6:
            raise SkyMapError("the footprints surround the whole sphere; no single tract centre exists")
        mean /= norm
        ra_c = float(_normalise_ra(math.degrees(math.atan2(mean[1], mean[0]))))
        dec_c = math.degrees(math.asin(min(1.0, max(-1.0, mean[2]))))
        radius = max(float(_separation_deg(ra_c, dec_c, ra, dec).max()) for ra, dec in outline)
        radius += margin_arcsec / 3600.0
        if radius >= 89.0:
            raise SkyMapError(f"the footprints reach {radius:.3f} deg from their centre: too wide for one TAN tract")
        tract = Tract(
            id=tract_id, ra=ra_c, dec=dec_c, radius_deg=radius, pixel_scale_arcsec=pixel_scale_arcsec,
            patch_inner=patch_inner, patch_border=patch_border, tract_overlap_deg=0.0, rotation_deg=rotation_deg,
        )
        return cls(tracts=(tract,))
