"""Sky-map geometry: tract layout, patches, sky <-> pixel, exposure overlap, JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.errors import SchemaError, SkyMapError
from pipeline.model.geometry import Box
from pipeline.model.skymap import SKYMAP_JSON_KIND, Patch, SkyMap, Tract
from pipeline.model.wcs import pixel_scale_arcsec
from conftest import make_tan_wcs

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def small_tract(**kw) -> Tract:
    """1 arcsec pixels, radius 0.1 deg, inner 200, border 10: laid out by hand below."""
    args = dict(id=3, ra=10.0, dec=20.0, radius_deg=0.1, pixel_scale_arcsec=1.0, patch_inner=(200, 200),
                patch_border=10, tract_overlap_deg=0.0)
    args.update(kw)
    return Tract(**args)


def separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    return SkyCoord(ra1, dec1, unit="deg").separation(SkyCoord(ra2, dec2, unit="deg")).deg


# ------------------------------------------------------------------------------ layout by hand
def test_small_tract_layout_by_hand():
    # half width: tan(0.1 deg) in arcsec = 360.000366 px; integer pixels touched: -360..360 -> W0 = 721.
    # n = ceil(721 / 200) = 4 -> 800 px; delta 79 -> 39 extra on the low side: box starts at -399.
    t = small_tract()
    assert t.n_patches == (4, 4)
    assert t.bbox == Box(0, 0, 800, 800)
    assert t.centre_pixel == (399.0, 399.0)
    w = t.wcs()
    np.testing.assert_allclose(w.wcs.crpix, [400.0, 400.0], rtol=0, atol=0)
    assert w.pixel_shape == (800, 800)
    assert pixel_scale_arcsec(w) == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(t.sky_to_pixel(10.0, 20.0), (399.0, 399.0), rtol=0, atol=1e-8)
    np.testing.assert_allclose(t.pixel_to_sky(399.0, 399.0), (10.0, 20.0), rtol=0, atol=1e-12)

    p = t.patch(6)
    assert (p.tract, p.index, p.i, p.j, p.name) == (3, 6, 2, 1, "2,1")
    assert p.inner == Box(400, 200, 600, 400)
    assert p.outer == Box(390, 190, 610, 410)
    assert t.patch((0, 0)).outer == Box(0, 0, 210, 210)
    assert t.patch((3, 3)).outer == Box(590, 590, 800, 800)
    assert t.patch((3, 0)).outer == Box(590, 0, 800, 210)
    assert t.patch("1,2") == t.patch(9) == t.patch((1, 2)) == t.patch("9") == t.patch(np.int64(9))
    assert t.patch(" (1, 2) ").index == 9
    assert [q.index for q in t.patches()] == list(range(16))


def test_rectangular_patches_by_hand():
    # y: n = ceil(721 / 150) = 5 -> 750 px, delta 29 -> 14 extra below: box starts at -374.
    t = small_tract(patch_inner=(200, 150))
    assert t.n_patches == (4, 5)
    assert t.bbox == Box(0, 0, 800, 750)
    assert t.centre_pixel == (399.0, 374.0)
    assert t.patch(19).inner == Box(600, 600, 800, 750)
    assert t.patch(19).outer == Box(590, 590, 800, 750)


def test_overlap_grows_the_tract_radius():
    # radius 0.05 + overlap 0.05 deg gives the same layout as radius 0.1 without overlap.
    a = small_tract(radius_deg=0.05, tract_overlap_deg=0.05)
    b = small_tract()
    assert (a.bbox, a.centre_pixel) == (b.bbox, b.centre_pixel)


def test_spec_defaults():
    t = Tract(id=0, ra=0.0, dec=0.0, radius_deg=0.1)
    assert (t.pixel_scale_arcsec, t.patch_inner, t.patch_border, t.tract_overlap_deg, t.projection) == (
        0.2, (4000, 4000), 100, 1.0, "TAN")
    # 1.1 deg at 0.2 arcsec: half width 19802.4 px, W0 = 39605 -> 10 patches of 4000 per axis.
    assert t.n_patches == (10, 10)


def test_rotation_sets_position_angle_of_plus_y():
    t = small_tract(rotation_deg=30.0)
    cx, cy = t.centre_pixel
    ra, dec = t.pixel_to_sky(cx, cy + 100.0)
    centre = SkyCoord(t.ra, t.dec, unit="deg")
    there = SkyCoord(ra, dec, unit="deg")
    assert centre.position_angle(there).deg == pytest.approx(30.0, abs=1e-6)
    assert centre.separation(there).arcsec == pytest.approx(100.0, rel=1e-6)
    ra, dec = t.pixel_to_sky(cx - 100.0, cy)  # -x points east of +y by 90 deg
    assert centre.position_angle(SkyCoord(ra, dec, unit="deg")).deg == pytest.approx(120.0, abs=1e-6)


def test_header_is_the_wcs():
    t = small_tract(rotation_deg=12.0, dec=-60.0)
    from astropy.io import fits
    w2 = WCS(fits.Header.fromstring(t.wcs_header()))
    x = np.array([0.0, 123.4, 799.0])
    y = np.array([0.0, 555.5, 799.0])
    np.testing.assert_allclose(w2.wcs_pix2world(x, y, 0), t.wcs().wcs_pix2world(x, y, 0), rtol=0, atol=1e-12)
    assert t.wcs() is not t.wcs()


def test_sky_to_pixel_shapes_and_far_side():
    t = small_tract()
    x, y = t.sky_to_pixel(np.array([[10.0, 10.01]]), 20.0)
    assert x.shape == (1, 2) and y.shape == (1, 2)
    xf, yf = t.sky_to_pixel(190.0, -20.0)  # antipode: no TAN pixel
    assert math.isnan(xf) and math.isnan(yf)
    assert t.contains_sky(190.0, -20.0) is False
    assert t.patch_index_at_sky(190.0, -20.0) == -1
    assert t.contains_sky(10.0, 20.0) is True
    np.testing.assert_array_equal(t.contains_sky([10.0, 10.3, 190.0], [20.0, 20.0, -20.0]), [True, False, False])


# -------------------------------------------------------------------------- property tests
@st.composite
def tracts(draw):
    dec = draw(st.one_of(st.floats(-90.0, 90.0), st.sampled_from([-90.0, 90.0, -89.99, 89.99, 0.0])))
    ra = draw(st.one_of(st.floats(0.0, 359.999999), st.sampled_from([0.0, 359.9999999, 180.0])))
    radius = draw(st.floats(0.001, 20.0))
    overlap = draw(st.floats(0.0, 1.0))
    half_pixels = draw(st.integers(40, 1500))
    scale = math.degrees(math.tan(math.radians(radius + overlap))) * 3600.0 / half_pixels
    inner = (draw(st.integers(16, 400)), draw(st.integers(16, 400)))
    border = draw(st.integers(0, min(inner)))
    rotation = draw(st.floats(-180.0, 180.0))
    return Tract(id=draw(st.integers(0, 1000)), ra=ra, dec=dec, radius_deg=radius, tract_overlap_deg=overlap,
                 pixel_scale_arcsec=scale, patch_inner=inner, patch_border=border, rotation_deg=rotation)


@PROPERTY
@given(tracts())
def test_inner_boxes_tile_the_tract_and_outer_boxes_overlap_by_twice_the_border(t):
    nx, ny = t.n_patches
    bb = t.bbox
    assert (bb.x0, bb.y0) == (0, 0)
    assert bb.width == nx * t.patch_inner[0] and bb.height == ny * t.patch_inner[1]
    grid = {(p.i, p.j): p for p in t.patches()}
    assert len(grid) == nx * ny
    # columns: the same x interval for every row, consecutive, covering [0, width) exactly
    for i in range(nx):
        xs = {(grid[i, j].inner.x0, grid[i, j].inner.x1) for j in range(ny)}
        assert len(xs) == 1
        (x0, x1), = xs
        assert x0 == (grid[i - 1, 0].inner.x1 if i else 0)
    assert grid[nx - 1, 0].inner.x1 == bb.x1
    for j in range(ny):
        ys = {(grid[i, j].inner.y0, grid[i, j].inner.y1) for i in range(nx)}
        assert len(ys) == 1
        (y0, y1), = ys
        assert y0 == (grid[0, j - 1].inner.y1 if j else 0)
    assert grid[0, ny - 1].inner.y1 == bb.y1
    assert sum(p.inner.width * p.inner.height for p in grid.values()) == bb.width * bb.height
    b = t.patch_border
    for (i, j), p in grid.items():
        assert p.index == j * nx + i
        assert p.outer == p.inner.grow(b).intersect(bb)
        if i + 1 < nx:
            assert p.outer.intersect(grid[i + 1, j].outer).width == 2 * b
        if j + 1 < ny:
            assert p.outer.intersect(grid[i, j + 1].outer).height == 2 * b
        assert (p.outer.x0 == 0) == (i == 0 or b >= p.inner.x0)
        assert (p.outer.x1 == bb.x1) == (i == nx - 1 or p.inner.x1 + b >= bb.x1)


@PROPERTY
@given(tracts(), st.integers(0, 2**32 - 1))
@example(Tract(id=0, ra=0.0, dec=90.0, radius_deg=2.0, pixel_scale_arcsec=20.0, patch_inner=(100, 100),
               patch_border=5, tract_overlap_deg=0.0), 1)
@example(Tract(id=0, ra=359.9999999, dec=-89.5, radius_deg=1.0, pixel_scale_arcsec=10.0, patch_inner=(64, 90),
               patch_border=5, tract_overlap_deg=0.1, rotation_deg=45.0), 2)
def test_positions_in_the_tract_round_trip_and_fall_in_exactly_one_inner_box(t, seed):
    rng = np.random.default_rng(seed)
    bb = t.bbox
    x = rng.uniform(-0.5, bb.x1 - 0.5, 500)
    y = rng.uniform(-0.5, bb.y1 - 0.5, 500)
    ra, dec = t.pixel_to_sky(x, y)
    assert np.all((ra >= 0) & (ra < 360))
    x2, y2 = t.sky_to_pixel(ra, dec)
    ra2, dec2 = t.pixel_to_sky(x2, y2)
    assert separation_deg(ra, dec, ra2, dec2).max() < 1e-9
    np.testing.assert_allclose(x2, x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(y2, y, rtol=0, atol=1e-6)

    index = t.patch_index_at_sky(ra, dec)
    px, py = np.floor(x2 + 0.5), np.floor(y2 + 0.5)
    patches = t.patches()
    x0 = np.array([p.inner.x0 for p in patches])[:, None]
    x1 = np.array([p.inner.x1 for p in patches])[:, None]
    y0 = np.array([p.inner.y0 for p in patches])[:, None]
    y1 = np.array([p.inner.y1 for p in patches])[:, None]
    holds = (px >= x0) & (px < x1) & (py >= y0) & (py < y1)
    np.testing.assert_array_equal(holds.sum(axis=0), 1)
    np.testing.assert_array_equal(np.argmax(holds, axis=0), index)
    assert t.contains_sky(ra, dec).all()
    k = int(rng.integers(0, ra.size))
    p = t.patch_at_sky(float(ra[k]), float(dec[k]))
    assert p.index == index[k] and p.inner.contains(px[k], py[k])


@PROPERTY
@given(tracts(), st.integers(0, 2**32 - 1))
def test_the_whole_circle_of_radius_plus_overlap_is_in_the_tract(t, seed):
    rng = np.random.default_rng(seed)
    centre = SkyCoord(t.ra, t.dec, unit="deg")
    reach = (t.radius_deg + t.tract_overlap_deg) * rng.uniform(0.0, 0.999, 300)
    pts = centre.directional_offset_by(rng.uniform(0, 360, 300) * u.deg, reach * u.deg)
    assert t.contains_sky(pts.ra.deg, pts.dec.deg).all()


# ------------------------------------------------------------------- exposure overlap
def overlap_tract() -> Tract:
    # 1 arcsec pixels, 7 x 7 patches of 60 px
    return Tract(id=1, ra=150.0, dec=2.0, radius_deg=0.05, pixel_scale_arcsec=1.0, patch_inner=(60, 60),
                 patch_border=5, tract_overlap_deg=0.0)


def brute_force(t: Tract, wcs: WCS, shape, grow: int) -> set[int]:
    """Patches whose inner box grown by ``grow`` holds the tract pixel of some exposure pixel centre."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    ra, dec = wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
    tx, ty = t.sky_to_pixel(ra, dec)
    px, py = np.floor(tx + 0.5), np.floor(ty + 0.5)
    return {p.index for p in t.patches() if p.inner.grow(grow).contains(px, py).any()}


@PROPERTY
@given(
    dx=st.floats(-250.0, 250.0), dy=st.floats(-250.0, 250.0), rotation=st.floats(-180.0, 180.0),
    scale=st.floats(0.5, 1.3), nx=st.integers(1, 150), ny=st.integers(1, 150),
)
def test_patches_overlapping_agrees_with_brute_force(dx, dy, rotation, scale, nx, ny):
    t = overlap_tract()
    cx, cy = t.centre_pixel
    ra, dec = t.pixel_to_sky(cx + dx, cy + dy)
    wcs = make_tan_wcs(ra, dec, scale, crpix=(nx / 2, ny / 2), rotation_deg=rotation)
    got = {p.index for p in t.patches_overlapping(wcs, (ny, nx))}
    # exposure pixels are at most 1.3 tract pixels wide, so every overlapping patch holds a pixel
    # centre within 2 pixels of its inner box; every patch holding a centre overlaps.
    assert brute_force(t, wcs, (ny, nx), 0) <= got <= brute_force(t, wcs, (ny, nx), 2)


def test_patches_overlapping_closed_cases():
    t = overlap_tract()
    cx, cy = t.centre_pixel
    # an exposure of 10 x 10 tract pixels centred on pixel (cx, cy) = (209, 209): patch (3, 3) only
    ra, dec = t.pixel_to_sky(cx, cy)
    w = make_tan_wcs(ra, dec, 1.0, crpix=(4.5, 4.5))
    assert [p.index for p in t.patches_overlapping(w, (10, 10))] == [3 * 7 + 3]
    # the same exposure described with a parent-frame origin gives the same answer
    w_shift = make_tan_wcs(ra, dec, 1.0, crpix=(4.5 + 1000, 4.5 - 300))
    assert [p.index for p in t.patches_overlapping(w_shift, (10, 10), x0=1000, y0=-300)] == [24]
    # larger than the tract: every patch
    big = make_tan_wcs(ra, dec, 1.0, crpix=(300.0, 300.0), rotation_deg=33.0)
    assert [p.index for p in t.patches_overlapping(big, (601, 601))] == list(range(49))
    # larger than a patch, rotated 45 deg, centred on a patch corner
    ra, dec = t.pixel_to_sky(239.5, 239.5)
    diamond = make_tan_wcs(ra, dec, 1.0, crpix=(49.5, 49.5), rotation_deg=45.0)
    # half diagonal 70.7 px: reaches patches 2..5 along the axes through (239.5, 239.5) but not the
    # corners (2, 2), (2, 5), (5, 2), (5, 5) of the 4 x 4 block
    got = {(p.i, p.j) for p in t.patches_overlapping(diamond, (100, 100))}
    block = {(i, j) for i in range(2, 6) for j in range(2, 6)}
    assert got == block - {(2, 2), (2, 5), (5, 2), (5, 5)}
    # far away and on the far side of the sky: nothing
    assert t.patches_overlapping(make_tan_wcs(160.0, 2.0, 1.0), (100, 100)) == []
    assert t.patches_overlapping(make_tan_wcs(330.0, -2.0, 1.0), (100, 100)) == []


def test_patches_overlapping_margin():
    t = overlap_tract()
    # a 10 x 10 exposure whose pixels cover tract columns 63..72 (continuous 62.5..72.5), rows 63..72;
    # patch (0, 0) inner ends at 59.5: 3 pixels away.
    ra, dec = t.pixel_to_sky(67.5, 67.5)
    w = make_tan_wcs(ra, dec, 1.0, crpix=(4.5, 4.5))
    assert [p.index for p in t.patches_overlapping(w, (10, 10))] == [8]
    assert [p.index for p in t.patches_overlapping(w, (10, 10), margin=2)] == [8]
    assert [p.index for p in t.patches_overlapping(w, (10, 10), margin=4)] == [0, 1, 7, 8]


# ------------------------------------------------------------------------------ sky maps
def test_find_tracts_and_lookup():
    sm = SkyMap.discrete([(10.0, 20.0, 0.1), (10.15, 20.0, 0.1)], pixel_scale_arcsec=1.0,
                         patch_inner=(200, 200), tract_overlap_deg=0.0)
    assert sm.tract_ids == [0, 1]
    assert sm.tract(1).ra == 10.15
    assert [t.id for t in sm.find_tracts(10.05, 20.0)] == [0, 1]
    assert [t.id for t in sm.find_tracts(10.1, 20.0)] == [1, 0]
    assert [t.id for t in sm.find_tracts(10.0, 19.95)] == [0]
    assert sm.find_tracts(100.0, 0.0) == []
    # a discrete map normalises RA into [0, 360)
    assert SkyMap.discrete([(-10.0, 0.0, 1.0)]).tracts[0].ra == 350.0


@PROPERTY
@given(st.lists(tracts(), min_size=1, max_size=4))
def test_json_round_trip_is_exact(ts):
    sm = SkyMap(tracts=tuple(t.model_copy(update={"id": k}) for k, t in enumerate(ts)))
    text = json.dumps(sm.to_json())
    back = SkyMap.from_json(json.loads(text))
    assert back == sm
    assert json.dumps(back.to_json()) == text
    assert [b.bbox for b in back.tracts] == [t.bbox for t in sm.tracts]


def test_centred_on_footprints():
    # three dithered, rotated 300 x 200 exposures at 0.2 arcsec near RA = 0
    wcss = [make_tan_wcs(359.99, -5.0, 0.2, crpix=(150.0, 100.0), rotation_deg=10.0),
            make_tan_wcs(0.005, -5.003, 0.2, crpix=(150.0, 100.0), rotation_deg=-20.0),
            make_tan_wcs(0.0, -4.99, 0.2, crpix=(10.0, 20.0))]
    fps = [(w, (200, 300)) for w in wcss[:2]] + [(wcss[2], (200, 300), (5, 7))]
    sm = SkyMap.centred_on(fps, pixel_scale_arcsec=0.2, patch_inner=(500, 500), patch_border=20, margin_arcsec=6.0)
    (t,) = sm.tracts
    assert (t.id, t.tract_overlap_deg, t.patch_inner, t.patch_border) == (0, 0.0, (500, 500), 20)
    # centre: the normalised mean of the corner unit vectors, computed independently
    vecs = []
    corners = []
    for w, shape, *origin in fps:
        x0, y0 = origin[0] if origin else (0, 0)
        ny, nx = shape
        cx = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5]) + x0
        cy = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5]) + y0
        c = SkyCoord(*w.all_pix2world(cx, cy, 0), unit="deg")
        corners.append(c)
        vecs.append(c.cartesian.xyz.value.T)
    mean = np.concatenate(vecs).mean(axis=0)
    centre = SkyCoord(x=mean[0], y=mean[1], z=mean[2], representation_type="cartesian").spherical
    assert separation_deg(t.ra, t.dec, centre.lon.deg, centre.lat.deg) < 1e-10
    far = max(SkyCoord(t.ra, t.dec, unit="deg").separation(c).deg.max() for c in corners)
    assert t.radius_deg == pytest.approx(far + 6.0 / 3600.0, rel=0, abs=1e-9)
    for c in corners:
        assert t.contains_sky(c.ra.deg, c.dec.deg).all()
    for w, shape, *origin in fps:
        x0, y0 = origin[0] if origin else (0, 0)
        assert len(t.patches_overlapping(w, shape, x0=x0, y0=y0)) >= 1


# ------------------------------------------------------------------------- error branches
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(ra=360.0), "less than 360"),
        (dict(ra=-1.0), "greater than or equal to 0"),
        (dict(dec=90.5), "less than or equal to 90"),
        (dict(radius_deg=0.0), "greater than 0"),
        (dict(pixel_scale_arcsec=0.0), "greater than 0"),
        (dict(patch_inner=(0, 200)), r"patch_inner \(0, 200\) must hold two sizes"),
        (dict(patch_border=-1), "greater than or equal to 0"),
        (dict(radius_deg=80.0, tract_overlap_deg=9.5), "89.5 deg is too large for a TAN tract"),
        (dict(radius_deg=60.0, pixel_scale_arcsec=1e-4), r"sides are limited to 2147483647.*\[tract=3\]"),
        (dict(projection="STG"), "Input should be 'TAN'"),
        (dict(colour="red"), "Extra inputs are not permitted"),
    ],
)
def test_tract_validation(kw, match):
    with pytest.raises(ValidationError, match=match):
        small_tract(**kw)


def test_tract_is_frozen():
    t = small_tract()
    with pytest.raises(ValidationError, match="frozen"):
        t.ra = 11.0


@pytest.mark.parametrize(
    "index, match",
    [
        (16, r"patch 16 is out of range: tract 3 has 4 x 4 patches \(sequential index 0..15, i in 0..3, j in 0..3\)"),
        (-1, r"patch -1 is out of range"),
        ((4, 0), r"patch \(4, 0\) is out of range"),
        ((0, -1), r"patch \(0, -1\) is out of range"),
        ("2,7", r"patch '2,7' is out of range"),
        ("20", r"patch '20' is out of range"),
        ("a,b", r"cannot parse patch 'a,b': expected 'i,j' or a sequential index \[tract=3\]"),
        (2.0, r"patch must be an int, an \(i, j\) pair or an 'i,j' string, not 2.0"),
        (True, r"not True"),
        ((1, 2, 3), r"not \(1, 2, 3\)"),
    ],
)
def test_patch_errors(index, match):
    with pytest.raises(SkyMapError, match=match):
        small_tract().patch(index)


def test_patch_at_sky_errors():
    t = small_tract()
    with pytest.raises(SkyMapError, match=r"position \(ra=11.00000000, dec=20.00000000\) deg is outside tract 3"):
        t.patch_at_sky(11.0, 20.0)
    with pytest.raises(SkyMapError, match="patch_at_sky takes one position; use patch_index_at_sky"):
        t.patch_at_sky(np.array([10.0, 10.0]), np.array([20.0, 20.0]))


def test_patches_overlapping_errors():
    t = small_tract()
    w = make_tan_wcs(10.0, 20.0, 1.0)
    with pytest.raises(SkyMapError, match=r"exposure shape \(10, 0\) must be two positive integers"):
        t.patches_overlapping(w, (10, 0))
    with pytest.raises(SkyMapError, match=r"exposure shape \(10,\) must be two positive integers"):
        t.patches_overlapping(w, (10,))
    with pytest.raises(SkyMapError, match=r"exposure origin \(0.5, 0\) must be integers"):
        t.patches_overlapping(w, (10, 10), x0=0.5)
    with pytest.raises(SkyMapError, match="margin -1 must be a non-negative integer"):
        t.patches_overlapping(w, (10, 10), margin=-1)
    linear = WCS(naxis=2)
    linear.wcs.ctype = ["X", "Y"]
    with pytest.raises(SchemaError, match=r"exposure WCS is not a 2-D celestial WCS"):
        t.patches_overlapping(linear, (10, 10))


def test_skymap_errors():
    sm = SkyMap.discrete([(10.0, 20.0, 0.1)], tract_overlap_deg=0.0)
    with pytest.raises(SkyMapError, match=r"no tract 5 in this sky map \(tract ids: \[0\]\) \[tract=5\]"):
        sm.tract(5)
    with pytest.raises(ValidationError, match=r"tract ids must be unique; repeated: \[0\]"):
        SkyMap(tracts=(sm.tracts[0], sm.tracts[0]))
    with pytest.raises(ValidationError, match="at least 1 item"):
        SkyMap(tracts=())
    with pytest.raises(SkyMapError, match="at least one"):
        SkyMap.discrete([])
    with pytest.raises(SkyMapError, match=r"centre 1 has 2 values \(5.0, 6.0\); expected \(ra, dec, radius_deg\)"):
        SkyMap.discrete([(1.0, 2.0, 0.1), (5.0, 6.0)])
    with pytest.raises(SkyMapError, match="'ra' comes from the centres list"):
        SkyMap.discrete([(1.0, 2.0, 0.1)], ra=3.0)


def test_from_json_errors():
    good = SkyMap.discrete([(10.0, 20.0, 0.1)]).to_json()
    assert good["kind"] == SKYMAP_JSON_KIND
    with pytest.raises(SkyMapError, match=r"not a skystack sky map \(kind 'other'"):
        SkyMap.from_json({**good, "kind": "other"})
    with pytest.raises(SkyMapError, match=r"not a skystack sky map \(kind 'list'"):
        SkyMap.from_json([good])
    with pytest.raises(SkyMapError, match="unsupported sky map version 99"):
        SkyMap.from_json({**good, "version": 99})
    bad = json.loads(json.dumps(good))
    bad["tracts"][0]["dec"] = 100.0
    with pytest.raises(SkyMapError, match=r"invalid sky map: .*\ntracts\.0\.dec\n\s+Input should be less than or equal to 90"):
        SkyMap.from_json(bad)


def test_centred_on_errors():
    w = make_tan_wcs(10.0, 20.0, 0.2)
    with pytest.raises(SkyMapError, match="at least one"):
        SkyMap.centred_on([])
    with pytest.raises(SkyMapError, match=r"margin_arcsec -1.0 must be finite and >= 0"):
        SkyMap.centred_on([(w, (10, 10))], margin_arcsec=-1.0)
    with pytest.raises(SkyMapError, match=r"footprint 0 must be \(wcs, \(ny, nx\)\)"):
        SkyMap.centred_on([w])
    with pytest.raises(SkyMapError, match="footprint 0: expected an astropy WCS, got str"):
        SkyMap.centred_on([("header", (10, 10))])
    with pytest.raises(SkyMapError, match=r"footprint 1: shape \(10, -2\) must be two positive integers"):
        SkyMap.centred_on([(w, (10, 10)), (w, (10, -2))])
    linear = WCS(naxis=2)
    with pytest.raises(SchemaError, match="footprint 0 WCS is not a 2-D celestial WCS"):
        SkyMap.centred_on([(linear, (10, 10))])
    sin = WCS(naxis=2)
    sin.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    sin.wcs.cdelt = [-1.0, 1.0]
    with pytest.raises(SkyMapError, match="footprint 0: the WCS does not map the whole outline to the sky"):
        SkyMap.centred_on([(sin, (200, 200))])
    opposite = [(make_tan_wcs(ra, dec, 1.0, crpix=(1.0, 1.0)), (3, 3)) for ra, dec in [(0, 0), (180, 0), (90, 0), (270, 0),
                                                                     (0, 90), (0, -90)]]
    with pytest.raises(SkyMapError, match="surround the whole sphere"):
        SkyMap.centred_on(opposite)
    wide = [(make_tan_wcs(ra, 0.0, 1.0), (3, 3)) for ra in (0.0, 100.0)]
    with pytest.raises(SkyMapError, match=r"reach 90\.\d{3} deg from their centre: too wide for one TAN tract"):
        SkyMap.centred_on(wide, margin_arcsec=3600.0 * 40)


def test_patch_model_is_frozen_and_named():
    p = small_tract().patch((2, 3))
    assert isinstance(p, Patch) and p.name == "2,3"
    with pytest.raises(ValidationError, match="frozen"):
        p.i = 0
