"""Simulated skies with known truth: seeded exposures of a static sky plus injected artifacts.

``simulate(config, seed=...)`` draws a static sky (stars with power-law fluxes, Sersic galaxies)
and observes it in ``n_visits`` calibrated exposures ("calexps", units ADU): dithered and rotated
TAN WCSs (optional small SIP distortion), a zero point, a spatially varying Gaussian or Moffat PSF,
a sky with a gradient (and an optional 2-D polynomial), Poisson and read noise, mask planes as a
calibrated exposure has them (BAD columns, SAT stars, EDGE border, NO_DATA only on request), and
transient artifacts (satellite trails, cosmic rays, a moving asteroid, a variable star). Everything
drawn is kept in a :class:`Truth`, which also renders the noiseless static sky onto any grid and the
artifact footprints of any visit onto any grid.

Sources are rendered as exact pixel integrals (see :mod:`pipeline._kernels_sim`), so a noiseless
star sums to its flux and centres on its WCS position to numerical precision. All randomness comes
from ``numpy.random.Generator`` streams derived from ``seed``; the catalogue does not depend on the
number of visits, and visit ``i`` does not depend on how many visits follow it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from . import _kernels_sim as _k
from .errors import SkystackError
from .model.masks import CANONICAL_PLANES, MaskPlane
from .model.schema import NJY_ZERO_POINT, make_dataset, njy_per_unit, origin, psf_grid
from .model.wcs import get_wcs, pixel_scale_arcsec, wcs_header_string

__all__ = [
    "SimConfig",
    "Simulation",
    "Truth",
    "VisitTruth",
    "Trail",
    "simulate",
    "ARTIFACT_KINDS",
]

#: kinds of per-visit features :meth:`Truth.artifact_mask` can draw
ARTIFACT_KINDS = ("trail", "cosmic_ray", "asteroid", "variable")
_DEFAULT_KINDS = ("trail", "cosmic_ray", "asteroid")

_ARCSEC = 1.0 / 3600.0

STAR_DTYPE = np.dtype(
    [("id", "i8"), ("ra", "f8"), ("dec", "f8"), ("flux", "f8"), ("mag", "f8"), ("saturating", "?")]
)
GALAXY_DTYPE = np.dtype(
    [
        ("id", "i8"),
        ("ra", "f8"),
        ("dec", "f8"),
        ("flux", "f8"),
        ("mag", "f8"),
        ("r_e", "f8"),
        ("axis_ratio", "f8"),
        ("pa", "f8"),
        ("sersic_n", "f8"),
    ]
)


def _range(lo: float, hi: float, description: str, default: tuple[float, float]):
    return Field(default=default, description=f"{description} (min, max); bounds [{lo}, {hi}]")


class SimConfig(BaseModel):
    """Parameters of a simulated sky and its visits (frozen). ``SimConfig.small()`` suits tests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # geometry and ids
    n_visits: int = Field(6, ge=1, le=1000, description="number of visits (one detector each)")
    shape: tuple[int, int] = Field((1024, 1024), description="detector shape (ny, nx); each in [16, 8192]")
    pixel_scale_arcsec: float = Field(0.2, gt=0.01, le=5.0, description="pixel scale at the detector centre (arcsec)")
    ra: float = Field(150.0, ge=0.0, lt=360.0, description="field centre right ascension (deg)")
    dec: float = Field(2.0, ge=-85.0, le=85.0, description="field centre declination (deg)")
    dither_arcsec: float = Field(30.0, ge=0.0, le=3600.0, description="radius of the random pointing dither (arcsec)")
    rotation_deg: tuple[float, float] = _range(-180.0, 180.0, "range of the detector rotation angle (deg)", (-15.0, 15.0))
    sip_amplitude_px: float = Field(
        0.0, ge=0.0, le=20.0, description="size of a second-order SIP distortion at the detector corner (pixels); 0 = none"
    )
    band: str = Field("r", min_length=1, max_length=16, description="filter band name")
    detector: int = Field(0, ge=0, le=100_000, description="detector id written to every exposure")
    first_visit: int = Field(1000, ge=0, le=10**9, description="visit id of the first visit (then +1 each)")
    mjd_start: float = Field(60400.1, ge=0.0, le=100_000.0, description="MJD of the first visit")
    visit_interval_hours: float = Field(0.25, gt=0.0, le=1e5, description="time between visits (hours)")
    exptime: float = Field(30.0, gt=0.0, le=1e5, description="exposure time (s)")
    # photometry, sky, noise
    zero_point: float = Field(31.5, ge=15.0, le=40.0, description="mean AB zero point of one ADU in an exposure (mag)")
    zero_point_scatter: float = Field(0.1, ge=0.0, le=1.0, description="half-range of the uniform per-visit zero-point offset (mag)")
    gain: float = Field(1.5, gt=0.0, le=100.0, description="gain (electrons per ADU)")
    read_noise_adu: float = Field(5.0, ge=0.0, le=1000.0, description="Gaussian read noise (ADU)")
    saturation_adu: float = Field(60000.0, gt=0.0, le=1e9, description="saturation level of the raw pixel value, sky included (ADU)")
    sky_adu: float = Field(800.0, ge=0.0, le=1e6, description="mean sky level (ADU per pixel)")
    sky_scatter: float = Field(0.2, ge=0.0, le=0.9, description="half-range of the uniform per-visit fractional sky-level change")
    sky_gradient: float = Field(
        0.05, ge=0.0, le=1.0, description="fractional change of the sky across the detector width along a random direction"
    )
    sky_poly_order: int = Field(0, ge=0, le=6, description="order of an extra smooth 2-D polynomial sky term (0 = none)")
    sky_poly_amplitude: float = Field(0.02, ge=0.0, le=1.0, description="fractional size of each extra polynomial sky coefficient")
    sky_subtraction: Literal["none", "constant", "model"] = Field(
        "model", description="what is subtracted from the image: nothing, the mean sky level, or the exact sky model"
    )
    variance_factor: float = Field(1.0, gt=0.0, le=100.0, description="the variance plane is the true variance times this factor")
    # PSF
    psf_model: Literal["gaussian", "moffat"] = Field("gaussian", description="PSF profile")
    moffat_beta: float = Field(3.5, gt=2.0, le=20.0, description="Moffat beta (psf_model='moffat')")
    seeing_fwhm_arcsec: tuple[float, float] = _range(0.1, 10.0, "range of the per-visit PSF FWHM at the detector centre (arcsec)", (0.7, 1.0))
    psf_fwhm_gradient: float = Field(
        0.1, ge=0.0, le=0.5, description="fractional change of the PSF FWHM across the detector along a random direction"
    )
    psf_grid_nodes: int = Field(3, ge=1, le=9, description="PSF grid nodes per axis in the psf variable")
    psf_stamp_size: int = Field(25, ge=5, le=101, description="size of the PSF images in the psf variable (odd)")
    # static sky
    n_stars: float = Field(150.0, ge=0.0, le=1e5, description="mean number of stars per detector area")
    star_mag_range: tuple[float, float] = _range(10.0, 35.0, "star AB magnitude range", (17.5, 25.0))
    star_count_slope: float = Field(0.6, gt=0.0, le=3.0, description="star counts N(>f) ~ f**-slope")
    n_galaxies: float = Field(150.0, ge=0.0, le=1e5, description="mean number of galaxies per detector area")
    galaxy_mag_range: tuple[float, float] = _range(10.0, 35.0, "galaxy AB magnitude range", (18.5, 25.0))
    galaxy_count_slope: float = Field(0.9, gt=0.0, le=3.0, description="galaxy counts N(>f) ~ f**-slope")
    galaxy_r_e_arcsec: tuple[float, float] = _range(0.05, 4.0, "log-uniform half-light radius range (arcsec)", (0.2, 1.0))
    galaxy_axis_ratio: tuple[float, float] = _range(0.1, 1.0, "uniform axis-ratio range", (0.3, 1.0))
    devaucouleurs_fraction: float = Field(0.3, ge=0.0, le=1.0, description="fraction of galaxies with Sersic n=4 (others n=1)")
    sersic_truncation: float = Field(5.0, ge=2.0, le=20.0, description="profile truncation radius in half-light radii (cosine taper over the last 20 %)")
    # detector defects and artifacts
    n_saturated_stars: int = Field(2, ge=0, le=1000, description="extra bright stars near the field centre that saturate")
    saturated_star_mag_range: tuple[float, float] = _range(5.0, 30.0, "magnitude range of the saturating stars", (14.0, 15.0))
    n_bad_columns: int = Field(2, ge=0, le=1000, description="bad (hot) detector columns, masked BAD in every visit")
    bad_column_offset_adu: float = Field(1000.0, ge=-1e6, le=1e6, description="spurious value added in bad columns (ADU)")
    edge_width: int = Field(2, ge=0, le=1000, description="width of the EDGE-masked detector border (pixels)")
    no_data_corner: int = Field(0, ge=0, le=8192, description="side of a NO_DATA square at the (max x, max y) corner (pixels); 0 = none")
    n_trails: int = Field(1, ge=0, le=1000, description="satellite trails, each in one random visit (not masked)")
    trail_fwhm_arcsec: float = Field(1.0, gt=0.0, le=60.0, description="FWHM of the Gaussian trail cross-section (arcsec)")
    trail_peak_adu: float = Field(150.0, ge=0.0, le=1e7, description="trail surface brightness on its centre line (ADU per pixel)")
    n_cosmic_rays: int = Field(5, ge=0, le=100_000, description="cosmic-ray hits per visit (1-4 connected pixels each)")
    cosmic_ray_adu: tuple[float, float] = _range(0.0, 1e7, "uniform per-pixel cosmic-ray deposit (ADU)", (500.0, 5000.0))
    cosmic_rays_masked: bool = Field(False, description="set the CR mask plane on cosmic-ray pixels")
    asteroid: bool = Field(True, description="inject one asteroid moving linearly on the sky")
    asteroid_mag: float = Field(20.0, ge=10.0, le=35.0, description="asteroid AB magnitude")
    asteroid_rate_arcsec_per_hour: float = Field(20.0, ge=0.0, le=1e5, description="asteroid angular speed (arcsec/hour)")
    variable_star: bool = Field(True, description="inject one variable star")
    variable_mag: float = Field(20.0, ge=10.0, le=35.0, description="mean AB magnitude of the variable star")
    variable_amplitude_mag: float = Field(0.5, ge=0.0, le=5.0, description="half-range of the uniform per-visit magnitude offset of the variable star")
    footprint_fwhm: float = Field(
        1.5, gt=0.0, le=20.0, description="artifact footprints: radius of point artifacts and half-width of trails in FWHMs"
    )

    @model_validator(mode="after")
    def _check(self) -> SimConfig:
        ny, nx = self.shape
        for n in (ny, nx):
            if not 16 <= n <= 8192:
                raise ValueError(f"shape {self.shape} must have both sizes in [16, 8192]")
        pairs = {
            "rotation_deg": (self.rotation_deg, -180.0, 180.0),
            "seeing_fwhm_arcsec": (self.seeing_fwhm_arcsec, 0.1, 10.0),
            "star_mag_range": (self.star_mag_range, 10.0, 35.0),
            "galaxy_mag_range": (self.galaxy_mag_range, 10.0, 35.0),
            "galaxy_r_e_arcsec": (self.galaxy_r_e_arcsec, 0.05, 4.0),
            "galaxy_axis_ratio": (self.galaxy_axis_ratio, 0.1, 1.0),
            "saturated_star_mag_range": (self.saturated_star_mag_range, 5.0, 30.0),
            "cosmic_ray_adu": (self.cosmic_ray_adu, 0.0, 1e7),
        }
        for name, ((lo, hi), vmin, vmax) in pairs.items():
            if not (vmin <= lo <= hi <= vmax):
                raise ValueError(f"{name}={(lo, hi)} must satisfy {vmin} <= min <= max <= {vmax}")
        if self.psf_stamp_size % 2 == 0:
            raise ValueError(f"psf_stamp_size={self.psf_stamp_size} must be odd")
        if 2 * self.edge_width >= min(ny, nx):
            raise ValueError(f"edge_width={self.edge_width} leaves no interior on a {self.shape} detector")
        if self.n_bad_columns > nx - 2 * self.edge_width:
            raise ValueError(f"n_bad_columns={self.n_bad_columns} exceeds the {nx - 2 * self.edge_width} interior columns")
        if self.no_data_corner > min(ny, nx):
            raise ValueError(f"no_data_corner={self.no_data_corner} is larger than the {self.shape} detector")
        return self

    @classmethod
    def small(cls, **overrides) -> SimConfig:
        """A quick configuration for tests: 4 visits of 256x256 with every artifact switched on."""
        base = dict(
            n_visits=4,
            shape=(256, 256),
            dither_arcsec=5.0,
            rotation_deg=(-5.0, 5.0),
            n_stars=30.0,
            n_galaxies=20.0,
            n_saturated_stars=1,
            n_bad_columns=1,
            n_cosmic_rays=3,
        )
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------------------------------
# sky geometry helpers


def _to_sky(ra0: float, dec0: float, xi, eta):
    """Gnomonic inverse: tangent-plane offsets (arcsec, xi east, eta north) to (ra, dec) deg."""
    xi = np.radians(np.asarray(xi, dtype=np.float64) * _ARCSEC)
    eta = np.radians(np.asarray(eta, dtype=np.float64) * _ARCSEC)
    d0 = math.radians(dec0)
    den = math.cos(d0) - eta * math.sin(d0)
    ra = math.radians(ra0) + np.arctan2(xi, den)
    dec = np.arctan2(math.sin(d0) + eta * math.cos(d0), np.hypot(xi, den))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _to_tangent(ra0, dec0, ra, dec):
    """Gnomonic projection of (ra, dec) about (ra0, dec0) (broadcasting) to arcsec (xi east, eta north)."""
    a0, d0 = np.radians(ra0), np.radians(dec0)
    a, d = np.radians(ra), np.radians(dec)
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi) * 3600.0, np.degrees(eta) * 3600.0


def _as_wcs(wcs) -> WCS:
    """A fresh astropy WCS from a WCS, a FITS header or a header string."""
    if isinstance(wcs, WCS):
        return wcs.deepcopy()
    if isinstance(wcs, (str, fits.Header)):
        header = fits.Header.fromstring(wcs) if isinstance(wcs, str) else wcs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(header, relax=True)
    raise SkystackError(f"expected an astropy WCS, a FITS header or a header string, got {type(wcs).__name__}")


def _world2pix(w: WCS, ra, dec):
    """0-based pixel positions, inverting any SIP distortion to 1e-9 pixel."""
    if w.sip is None:
        return w.wcs_world2pix(ra, dec, 0)
    return w.all_world2pix(ra, dec, 0, tolerance=1e-9, maxiter=100, quiet=True)


def _jacobian_arcsec(wcs: WCS, x, y, ra, dec) -> np.ndarray:
    """Local d(xi, eta)/d(x, y) in arcsec per pixel at each position (central differences)."""
    n = x.size
    px = np.concatenate([x + 0.5, x - 0.5, x, x])
    py = np.concatenate([y, y, y + 0.5, y - 0.5])
    wra, wdec = wcs.all_pix2world(px, py, 0)
    xi, eta = _to_tangent(np.tile(ra, 4), np.tile(dec, 4), wra, wdec)
    jac = np.empty((n, 2, 2))
    jac[:, 0, 0] = xi[:n] - xi[n : 2 * n]
    jac[:, 1, 0] = eta[:n] - eta[n : 2 * n]
    jac[:, 0, 1] = xi[2 * n : 3 * n] - xi[3 * n :]
    jac[:, 1, 1] = eta[2 * n : 3 * n] - eta[3 * n :]
    return jac


def _galaxy_matrices(gal: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """M = r_e A^-T J^-T per galaxy: wave vector (cycles/pixel) -> cycles per half-light radius."""
    q = gal["axis_ratio"]
    th = np.radians(gal["pa"])
    # rows: major-axis direction (sin th, cos th) and minor-axis direction (cos th, -sin th) in (xi, eta)
    rot = np.empty((gal.size, 2, 2))
    rot[:, 0, 0], rot[:, 0, 1] = np.sin(th), np.cos(th)
    rot[:, 1, 0], rot[:, 1, 1] = np.cos(th), -np.sin(th)
    # A = diag(sqrt q, 1/sqrt q) R ; A^-T = diag(1/sqrt q, sqrt q) R (R orthogonal)
    a_inv_t = rot * np.stack([1.0 / np.sqrt(q), np.sqrt(q)], axis=1)[:, :, None]
    j_inv_t = np.linalg.inv(jac).transpose(0, 2, 1)
    return gal["r_e"][:, None, None] * a_inv_t @ j_inv_t


# --------------------------------------------------------------------------------------------
# truth records


@dataclass(frozen=True, eq=False)
class Trail:
    """A satellite trail: a straight line across the detector with a Gaussian cross-section."""

    visit: int
    x: tuple[float, float]  # detector-frame endpoints of the line across the detector (pixels)
    y: tuple[float, float]
    ra: tuple[float, float]  # the same endpoints on the sky (deg)
    dec: tuple[float, float]
    fwhm_px: float
    fwhm_arcsec: float
    peak_adu: float

    def distance(self, x, y):
        """Perpendicular distance (detector pixels) of detector-frame points from the trail line."""
        x0, x1 = self.x
        y0, y1 = self.y
        dx, dy = x1 - x0, y1 - y0
        norm = math.hypot(dx, dy)
        return np.abs((np.asarray(x) - x0) * dy - (np.asarray(y) - y0) * dx) / norm

    def profile(self, x, y):
        """Noiseless trail surface brightness (ADU per pixel) at detector-frame points."""
        sigma = self.fwhm_px / _k.FWHM_PER_SIGMA
        return self.peak_adu * np.exp(-0.5 * (self.distance(x, y) / sigma) ** 2)


@dataclass(frozen=True, eq=False)
class VisitTruth:
    """Everything drawn for one visit (detector frame = parent frame of its exposure)."""

    index: int
    visit: int
    detector: int
    band: str
    mjd: float
    exptime: float
    zero_point: float
    shape: tuple[int, int]
    wcs_header: str
    gain: float
    read_noise_adu: float
    saturation_adu: float
    variance_factor: float
    psf_model: str
    moffat_beta: float
    psf_fwhm_px: float  # FWHM at the detector centre
    psf_gradient: tuple[float, float]  # fractional FWHM change across the full width / height
    seeing_fwhm_arcsec: float
    sky_coeffs: np.ndarray  # ADU; polyval2d in u=(x-cx)/(nx/2), v=(y-cy)/(ny/2)
    sky_subtraction: str
    bad_columns: np.ndarray
    trails: tuple[Trail, ...]
    cosmic_rays: np.ndarray  # structured: id, y, x, adu
    asteroid: dict | None  # ra, dec, x, y, flux (nJy), flux_adu, fwhm_px
    variable: dict | None  # ra, dec, x, y, flux (nJy), flux_adu, fwhm_px
    footprint_fwhm: float = 1.5

    def footprint(self, kinds: Iterable[str] = _DEFAULT_KINDS) -> np.ndarray:
        """Boolean detector-frame footprint of this visit's artifacts of ``kinds``."""
        kinds = _check_kinds(kinds, self.visit)
        ny, nx = self.shape
        out = np.zeros((ny, nx), dtype=bool)
        if "trail" in kinds and self.trails:
            gy, gx = np.ogrid[0:ny, 0:nx]
            for tr in self.trails:
                out |= tr.distance(gx, gy) <= self.footprint_fwhm * tr.fwhm_px
        for kind in ("asteroid", "variable"):
            rec = self.asteroid if kind == "asteroid" else self.variable
            if kind not in kinds or rec is None:
                continue
            rad = self.footprint_fwhm * rec["fwhm_px"]
            ya, yb = max(int(math.floor(rec["y"] - rad)), 0), min(int(math.ceil(rec["y"] + rad)) + 1, ny)
            xa, xb = max(int(math.floor(rec["x"] - rad)), 0), min(int(math.ceil(rec["x"] + rad)) + 1, nx)
            if ya < yb and xa < xb:
                gy, gx = np.ogrid[ya:yb, xa:xb]
                out[ya:yb, xa:xb] |= np.hypot(gx - rec["x"], gy - rec["y"]) <= rad
        if "cosmic_ray" in kinds and self.cosmic_rays.size:
            out[self.cosmic_rays["y"], self.cosmic_rays["x"]] = True
        return out

    @property
    def njy_per_adu(self) -> float:
        return njy_per_unit(self.zero_point)

    def wcs(self) -> WCS:
        """A fresh astropy WCS of the detector (0-based pixels)."""
        return _as_wcs(self.wcs_header)

    def _uv(self, x, y):
        ny, nx = self.shape
        return (np.asarray(x, float) - (nx - 1) / 2.0) / (nx / 2.0), (np.asarray(y, float) - (ny - 1) / 2.0) / (ny / 2.0)

    def psf_fwhm(self, x, y):
        """True PSF FWHM (pixels) at detector pixel positions: linear across the detector."""
        ny, nx = self.shape
        gx, gy = self.psf_gradient
        return self.psf_fwhm_px * (
            1.0 + gx * (np.asarray(x, float) - (nx - 1) / 2.0) / nx + gy * (np.asarray(y, float) - (ny - 1) / 2.0) / ny
        )

    def _psf_param(self, fwhm):
        if self.psf_model == "gaussian":
            return np.asarray(fwhm) / _k.FWHM_PER_SIGMA
        return _k.moffat_alpha(fwhm, self.moffat_beta)

    def psf_image(self, x: float, y: float, size: int = 25) -> np.ndarray:
        """The true pixel-integrated PSF at ``(x, y)``, centred in an odd ``size`` stamp (sum 1)."""
        if size % 2 == 0:
            raise SkystackError(f"PSF stamp size must be odd, got {size}", ids={"visit": self.visit})
        param = float(self._psf_param(self.psf_fwhm(x, y)))
        img = _k.psf_stamp(size, psf_kind=self.psf_model, psf_param=param, beta=self.moffat_beta)
        return img / img.sum()

    def sky(self, x, y):
        """True sky (ADU per pixel) at detector positions."""
        u, v = self._uv(x, y)
        return np.polynomial.polynomial.polyval2d(u, v, self.sky_coeffs)

    def subtracted(self, x, y):
        """The sky that was subtracted from the image (ADU)."""
        if self.sky_subtraction == "model":
            return self.sky(x, y)
        if self.sky_subtraction == "constant":
            return np.full(np.broadcast(np.asarray(x), np.asarray(y)).shape, self.sky_coeffs[0, 0])
        return np.zeros(np.broadcast(np.asarray(x), np.asarray(y)).shape)

    def background(self, x, y):
        """The sky left in the image (ADU): ``sky - subtracted``."""
        return self.sky(x, y) - self.subtracted(x, y)

    def _sky_image(self):
        ny, nx = self.shape
        u, v = self._uv(np.arange(nx), np.arange(ny))
        # separable evaluation of sum_ij c_ij u^i v^j
        pu = np.stack([u**i for i in range(self.sky_coeffs.shape[0])])  # (i, x)
        pv = np.stack([v**j for j in range(self.sky_coeffs.shape[1])])  # (j, y)
        return np.ascontiguousarray((pv.T @ self.sky_coeffs.T) @ pu)


@dataclass(frozen=True, eq=False)
class Truth:
    """The catalogues and per-visit records of a simulation, and renderers on arbitrary grids."""

    config: SimConfig
    seed: int
    stars: np.ndarray  # STAR_DTYPE; flux in nJy, (ra, dec) in deg
    galaxies: np.ndarray  # GALAXY_DTYPE; r_e in arcsec, pa in deg east of north
    asteroid: dict | None  # ra_ref, dec_ref, mjd_ref, rate_xi, rate_eta (arcsec/day), flux (nJy)
    variable: dict | None  # ra, dec, mean_flux (nJy), flux (nJy per visit)
    visits: tuple[VisitTruth, ...]

    @property
    def visit_ids(self) -> list[int]:
        return [v.visit for v in self.visits]

    def visit(self, visit: int) -> VisitTruth:
        """The record of visit id ``visit``."""
        for v in self.visits:
            if v.visit == visit:
                return v
        raise SkystackError(f"no visit {visit!r} in this simulation (visits {self.visit_ids})", ids={"visit": visit})

    def asteroid_position(self, mjd):
        """(ra, dec) in deg of the asteroid at ``mjd``: linear motion in the tangent plane."""
        if self.asteroid is None:
            raise SkystackError("this simulation has no asteroid (config.asteroid=False)")
        a = self.asteroid
        dt = np.asarray(mjd, dtype=np.float64) - a["mjd_ref"]
        return _to_sky(a["ra_ref"], a["dec_ref"], a["rate_xi"] * dt, a["rate_eta"] * dt)

    # ---------------------------------------------------------------------------- rendering

    def static_sky(self, wcs, shape: tuple[int, int], *, x0: int = 0, y0: int = 0, psf=None) -> np.ndarray:
        """Noiseless static sky (stars and galaxies, no transients) in nJy per pixel on a grid.

        ``wcs`` (astropy WCS, header or header string) describes the parent frame; element
        ``[i, j]`` is parent pixel ``(x0 + j, y0 + i)``. ``psf``: a Gaussian sigma in pixels of
        this grid, an odd 2-D PSF image (normalised here), or None for a Gaussian of the mean
        seeing FWHM of the visits at this grid's pixel scale.
        """
        w = _as_wcs(wcs)
        ny, nx = _check_shape(shape)
        kind, param, image = self._grid_psf(w, psf)
        out = np.zeros((ny, nx), dtype=np.float64)
        _render_catalogue(
            out, w, x0, y0, self.stars["ra"], self.stars["dec"], self.stars["flux"], None, kind, param, image,
            self.config,
        )
        _render_catalogue(
            out, w, x0, y0, self.galaxies["ra"], self.galaxies["dec"], self.galaxies["flux"], self.galaxies, kind,
            param, image, self.config,
        )
        return out

    def static_sky_like(self, ds: xr.Dataset, *, psf=None) -> np.ndarray:
        """:meth:`static_sky` on the frame of a Dataset of the data model (only metadata is read)."""
        x0, y0 = origin(ds)
        return self.static_sky(get_wcs(ds), (ds.sizes["y"], ds.sizes["x"]), x0=x0, y0=y0, psf=psf)

    def _grid_psf(self, w: WCS, psf):
        if psf is None:
            fwhm = float(np.mean([v.seeing_fwhm_arcsec for v in self.visits])) / pixel_scale_arcsec(w)
            return "gaussian", lambda x, y: np.full(np.shape(x), fwhm / _k.FWHM_PER_SIGMA), None
        if np.ndim(psf) == 0:
            sigma = float(psf)
            if not (np.isfinite(sigma) and sigma > 0):
                raise SkystackError(f"PSF sigma must be positive and finite, got {psf!r}")
            return "gaussian", lambda x, y: np.full(np.shape(x), sigma), None
        img = np.asarray(psf, dtype=np.float64)
        if img.ndim != 2 or img.shape[0] % 2 == 0 or img.shape[1] % 2 == 0:
            raise SkystackError(f"a PSF image must be 2-D with odd sizes, got shape {img.shape}")
        if not np.all(np.isfinite(img)) or img.sum() <= 0:
            raise SkystackError("a PSF image must be finite with a positive sum")
        return "image", None, img / img.sum()

    def expected_image(self, visit: int) -> np.ndarray:
        """The noiseless image plane of a visit in ADU (before noise, cosmic rays, bad columns and
        saturation; with the same sky subtraction as the exposure)."""
        vt = self.visit(visit)
        total, sky = _visit_model(self, vt)
        return total - _subtracted_image(vt, sky)

    def artifact_mask_like(self, visit: int, ds: xr.Dataset, *, kinds: Iterable[str] = _DEFAULT_KINDS) -> np.ndarray:
        """:meth:`artifact_mask` on the frame of a Dataset of the data model (only metadata is read)."""
        x0, y0 = origin(ds)
        return self.artifact_mask(visit, get_wcs(ds), (ds.sizes["y"], ds.sizes["x"]), x0=x0, y0=y0, kinds=kinds)

    def artifact_mask(
        self,
        visit: int,
        wcs,
        shape: tuple[int, int],
        *,
        x0: int = 0,
        y0: int = 0,
        kinds: Iterable[str] = _DEFAULT_KINDS,
    ) -> np.ndarray:
        """Boolean footprint of a visit's transient artifacts on any grid.

        Trails: pixels within ``footprint_fwhm`` trail FWHMs of the trail line; asteroid and
        variable star: within ``footprint_fwhm`` PSF FWHMs of their position in that visit; cosmic
        rays: the hit pixels (on another grid, every pixel whose centre falls within one grid pixel
        of a hit pixel). Only the part inside the visit's detector is drawn.
        """
        vt = self.visit(visit)
        kinds = _check_kinds(kinds, visit)
        w = _as_wcs(wcs)
        ny, nx = _check_shape(shape)
        dny, dnx = vt.shape
        same = wcs_header_string(w) == vt.wcs_header
        out = np.zeros((ny, nx), dtype=bool)
        if same:
            # the detector frame itself: no resampling
            ya, yb = max(y0, 0), min(y0 + ny, dny)
            xa, xb = max(x0, 0), min(x0 + nx, dnx)
            if ya >= yb or xa >= xb:
                return out
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = vt.footprint(kinds)[ya:yb, xa:xb]
            return out
        # bounding box of the detector on this grid
        cx = np.array([-0.5, dnx - 0.5, dnx - 0.5, -0.5])
        cy = np.array([-0.5, -0.5, dny - 0.5, dny - 0.5])
        det = vt.wcs()
        tx, ty = _world2pix(w, *det.all_pix2world(cx, cy, 0))
        xa = max(int(math.floor(np.min(tx))) - 1, x0)
        xb = min(int(math.ceil(np.max(tx))) + 2, x0 + nx)
        ya = max(int(math.floor(np.min(ty))) - 1, y0)
        yb = min(int(math.ceil(np.max(ty))) + 2, y0 + ny)
        if xa >= xb or ya >= yb:
            return out
        gy, gx = np.mgrid[ya:yb, xa:xb]
        xd, yd = _world2pix(det, *w.all_pix2world(gx.ravel(), gy.ravel(), 0))
        ratio = pixel_scale_arcsec(w) / pixel_scale_arcsec(det)
        pad = int(math.ceil(0.5 * ratio * math.sqrt(2.0) - 1e-9))
        sub = _footprint_detector(vt, xd, yd, kinds, pad=pad).reshape(gx.shape)
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = sub
        return out


def _check_kinds(kinds, visit) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in ARTIFACT_KINDS]
    if unknown:
        raise SkystackError(f"unknown artifact kinds {unknown}; known: {ARTIFACT_KINDS}", ids={"visit": visit})
    return kinds


def _check_shape(shape) -> tuple[int, int]:
    try:
        ny, nx = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise SkystackError(f"shape must be a pair (ny, nx), got {shape!r}") from None
    if ny < 1 or nx < 1:
        raise SkystackError(f"shape must be positive, got {shape!r}")
    return ny, nx


def _footprint_detector(vt: VisitTruth, xd, yd, kinds, *, pad: int) -> np.ndarray:
    """Artifact footprint at detector-frame points (any shape)."""
    dny, dnx = vt.shape
    xd = np.asarray(xd, float)
    yd = np.asarray(yd, float)
    inside = (xd >= -0.5) & (xd < dnx - 0.5) & (yd >= -0.5) & (yd < dny - 0.5)
    hit = np.zeros(xd.shape, dtype=bool)
    if "trail" in kinds:
        for tr in vt.trails:
            hit |= tr.distance(xd, yd) <= vt.footprint_fwhm * tr.fwhm_px
    points = [vt.asteroid if k == "asteroid" else vt.variable for k in ("asteroid", "variable") if k in kinds]
    for rec in points:
        if rec is not None:
            hit |= np.hypot(xd - rec["x"], yd - rec["y"]) <= vt.footprint_fwhm * rec["fwhm_px"]
    if "cosmic_ray" in kinds and vt.cosmic_rays.size:
        crimg = np.zeros(vt.shape, dtype=bool)
        crimg[vt.cosmic_rays["y"], vt.cosmic_rays["x"]] = True
        if pad:
            crimg = ndimage.binary_dilation(crimg, structure=np.ones((2 * pad + 1, 2 * pad + 1), bool))
        ix = np.clip(np.floor(xd + 0.5).astype(np.int64), 0, dnx - 1)
        iy = np.clip(np.floor(yd + 0.5).astype(np.int64), 0, dny - 1)
        hit |= crimg[iy, ix]
    return hit & inside


def _render_catalogue(out, w, x0, y0, ra, dec, flux, gal, kind, param_fn, image, config):
    """Render sources at sky positions onto ``out`` (grid with origin x0, y0); flux in out's units."""
    if ra.size == 0:
        return
    px, py = _world2pix(w, ra, dec)
    ny, nx = out.shape
    lim = _k.MAX_STAMP_SIZE // 2 + 1  # no stamp reaches further
    near = (px - x0 > -lim) & (px - x0 < nx + lim) & (py - y0 > -lim) & (py - y0 < ny + lim)
    if not near.any():
        return
    px, py, f = px[near], py[near], flux[near]
    param = None if param_fn is None else param_fn(px, py)
    beta = config.moffat_beta
    if gal is None:
        _k.render_sources(
            out.shape, px - x0, py - y0, f, psf_kind=kind, psf_param=param, psf_image=image, beta=beta, out=out
        )
        return
    g = gal[near]
    jac = _jacobian_arcsec(w, px, py, g["ra"], g["dec"])
    mats = _galaxy_matrices(g, jac)
    _k.render_sources(
        out.shape, px - x0, py - y0, f, psf_kind=kind, psf_param=param, psf_image=image, beta=beta,
        sersic_n=g["sersic_n"], shape_matrix=mats, truncation=config.sersic_truncation, out=out,
    )


def _visit_model(truth: Truth, vt: VisitTruth) -> tuple[np.ndarray, np.ndarray]:
    """(noiseless total in ADU including sky, sky image in ADU) on the detector of a visit."""
    w = vt.wcs()
    cfg = truth.config
    scale = 1.0 / vt.njy_per_adu
    sky = vt._sky_image()
    total = sky.copy()

    def param_fn(x, y):
        return vt._psf_param(vt.psf_fwhm(x, y))

    kind = vt.psf_model
    st = truth.stars
    _render_catalogue(total, w, 0, 0, st["ra"], st["dec"], st["flux"] * scale, None, kind, param_fn, None, cfg)
    ga = truth.galaxies
    _render_catalogue(total, w, 0, 0, ga["ra"], ga["dec"], ga["flux"] * scale, ga, kind, param_fn, None, cfg)
    for rec in (vt.asteroid, vt.variable):
        if rec is not None:
            _k.render_sources(
                total.shape, [rec["x"]], [rec["y"]], [rec["flux_adu"]], psf_kind=kind,
                psf_param=param_fn(np.array([rec["x"]]), np.array([rec["y"]])), beta=cfg.moffat_beta, out=total,
            )
    if vt.trails:
        ny, nx = vt.shape
        gy, gx = np.ogrid[0:ny, 0:nx]
        for tr in vt.trails:
            total += tr.profile(gx, gy)
    return total, sky


def _subtracted_image(vt: VisitTruth, sky: np.ndarray) -> np.ndarray:
    if vt.sky_subtraction == "model":
        return sky
    if vt.sky_subtraction == "constant":
        return np.full(vt.shape, vt.sky_coeffs[0, 0])
    return np.zeros(vt.shape)


# --------------------------------------------------------------------------------------------
# drawing


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _power_law_mags(rng, n: int, mag_range, slope: float) -> np.ndarray:
    """Magnitudes with cumulative counts N(>f) ~ f**-slope between the magnitude limits."""
    bright, faint = mag_range
    if n == 0:
        return np.empty(0)
    if bright == faint:
        return np.full(n, bright)
    ratio = 10.0 ** (-0.4 * (bright - faint))  # f_max / f_min
    u = rng.uniform(size=n)
    f = (1.0 - u * (1.0 - ratio ** (-slope))) ** (-1.0 / slope)  # in units of f_min, in [1, ratio]
    return faint - 2.5 * np.log10(f)


def _mag_to_njy(mag):
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - NJY_ZERO_POINT))


def _uniform_disc(rng, n: int, radius: float):
    r = radius * np.sqrt(rng.uniform(size=n))
    phi = rng.uniform(0.0, 2.0 * np.pi, size=n)
    return r * np.cos(phi), r * np.sin(phi)


def _draw_catalogue(cfg: SimConfig, seed: int):
    rng = _rng(seed, 0)
    ny, nx = cfg.shape
    scale = cfg.pixel_scale_arcsec
    det_area = nx * ny * scale**2
    radius = 0.5 * math.hypot(nx, ny) * scale + cfg.dither_arcsec + 5.0
    field_area = math.pi * radius**2
    n_st = int(round(cfg.n_stars * field_area / det_area))
    n_ga = int(round(cfg.n_galaxies * field_area / det_area))
    # stars
    xi, eta = _uniform_disc(rng, n_st, radius)
    mags = _power_law_mags(rng, n_st, cfg.star_mag_range, cfg.star_count_slope)
    half = 0.35 * min(nx, ny) * scale
    sxi = rng.uniform(-half, half, size=cfg.n_saturated_stars)
    seta = rng.uniform(-half, half, size=cfg.n_saturated_stars)
    smag = rng.uniform(*cfg.saturated_star_mag_range, size=cfg.n_saturated_stars)
    stars = np.zeros(n_st + cfg.n_saturated_stars, dtype=STAR_DTYPE)
    stars["id"] = np.arange(stars.size)
    ra, dec = _to_sky(cfg.ra, cfg.dec, np.concatenate([xi, sxi]), np.concatenate([eta, seta]))
    stars["ra"], stars["dec"] = ra, dec
    stars["mag"] = np.concatenate([mags, smag])
    stars["flux"] = _mag_to_njy(stars["mag"])
    stars["saturating"][n_st:] = True
    # galaxies
    gxi, geta = _uniform_disc(rng, n_ga, radius)
    gal = np.zeros(n_ga, dtype=GALAXY_DTYPE)
    gal["id"] = 1_000_000 + np.arange(n_ga)
    gal["ra"], gal["dec"] = _to_sky(cfg.ra, cfg.dec, gxi, geta)
    gal["mag"] = _power_law_mags(rng, n_ga, cfg.galaxy_mag_range, cfg.galaxy_count_slope)
    gal["flux"] = _mag_to_njy(gal["mag"])
    lo, hi = cfg.galaxy_r_e_arcsec
    gal["r_e"] = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n_ga))
    gal["axis_ratio"] = rng.uniform(*cfg.galaxy_axis_ratio, size=n_ga)
    gal["pa"] = rng.uniform(0.0, 180.0, size=n_ga)
    gal["sersic_n"] = np.where(rng.uniform(size=n_ga) < cfg.devaucouleurs_fraction, 4.0, 1.0)
    return stars, gal


def _visit_wcs(cfg: SimConfig, rng) -> tuple[WCS, float]:
    ny, nx = cfg.shape
    dxi, deta = _uniform_disc(rng, 1, cfg.dither_arcsec)
    ra0, dec0 = _to_sky(cfg.ra, cfg.dec, dxi, deta)
    rot = rng.uniform(*cfg.rotation_deg)
    sip = rng.uniform(-1.0, 1.0, size=6)
    s = cfg.pixel_scale_arcsec * _ARCSEC
    c, sn = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    header = fits.Header()
    header["NAXIS"] = 2
    header["NAXIS1"] = nx
    header["NAXIS2"] = ny
    header["CTYPE1"] = "RA---TAN"
    header["CTYPE2"] = "DEC--TAN"
    header["CRVAL1"] = float(ra0[0])
    header["CRVAL2"] = float(dec0[0])
    header["CRPIX1"] = (nx - 1) / 2.0 + 1.0
    header["CRPIX2"] = (ny - 1) / 2.0 + 1.0
    header["CD1_1"] = -s * c
    header["CD1_2"] = s * sn
    header["CD2_1"] = s * sn
    header["CD2_2"] = s * c
    header["CUNIT1"] = "deg"
    header["CUNIT2"] = "deg"
    if cfg.sip_amplitude_px > 0:
        header["CTYPE1"] = "RA---TAN-SIP"
        header["CTYPE2"] = "DEC--TAN-SIP"
        r2 = (0.5 * nx) ** 2 + (0.5 * ny) ** 2
        header["A_ORDER"] = 2
        header["B_ORDER"] = 2
        amp = cfg.sip_amplitude_px / r2
        for key, val in zip(("A_2_0", "A_1_1", "A_0_2", "B_2_0", "B_1_1", "B_0_2"), sip):
            header[key] = float(amp * val)
    return _as_wcs(header), rot


def _trail_through(vt_shape, px, py, angle) -> tuple[tuple[float, float], tuple[float, float]]:
    """Endpoints of the line through (px, py) at ``angle`` clipped to the detector rectangle."""
    ny, nx = vt_shape
    dx, dy = math.cos(angle), math.sin(angle)
    ts = []
    for p, d, lo, hi in ((px, dx, -0.5, nx - 0.5), (py, dy, -0.5, ny - 0.5)):
        if abs(d) > 1e-12:
            ts += [(lo - p) / d, (hi - p) / d]
    ts = sorted(ts)
    # the segment inside the rectangle is between the 2nd and 3rd crossings
    t0, t1 = ts[1], ts[2]
    return (px + t0 * dx, px + t1 * dx), (py + t0 * dy, py + t1 * dy)


def simulate(config: SimConfig | None = None, *, seed: int = 0, **overrides) -> Simulation:
    """Simulate ``config.n_visits`` exposures of one static sky with artifacts, plus the truth.

    ``overrides`` are applied on top of ``config`` (default :class:`SimConfig`), e.g.
    ``simulate(SimConfig.small(), seed=3, n_visits=2)``. Deterministic for a seed.

    Notes
    -----
    Exposures follow the data model (kind "exposure", units ADU, canonical mask planes, parent
    frame = detector, ``psf`` grid of the true PSF) and mimic LSST calibrated exposures
    ("calexp", the output of CalibrateTask): ``zero_point`` converts ADU to AB magnitudes
    (``flux_nJy = ADU * 10**((31.4 - zero_point) / 2.5)``). The variance plane is the true
    expected variance ``(sky + light) / gain + read_noise**2`` (ADU^2) times
    ``variance_factor``, where light includes stars, galaxies, trails, the asteroid and the
    variable star but not cosmic rays (deposited after the noise). Saturated pixels are clipped
    at ``saturation_adu`` (sky included) and flagged SAT; bad columns carry
    ``bad_column_offset_adu`` and are flagged BAD; the border is flagged EDGE; trails are not
    masked. ``sky_subtraction`` decides how much of the true sky is left in the image
    (``VisitTruth.background``), as a background-subtracted calexp has none of it.
    """
    if config is None:
        config = SimConfig()
    if not isinstance(config, SimConfig):
        raise SkystackError(f"config must be a SimConfig, got {type(config).__name__}")
    if overrides:
        config = SimConfig(**{**config.model_dump(), **overrides})
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SkystackError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    cfg = config
    ny, nx = cfg.shape
    stars, galaxies = _draw_catalogue(cfg, seed)

    # global transient set-up
    grng = _rng(seed, 1)
    scale = cfg.pixel_scale_arcsec
    mjds = cfg.mjd_start + np.arange(cfg.n_visits) * cfg.visit_interval_hours / 24.0
    mjd_ref = float(mjds.mean())
    ast_xi, ast_eta = grng.uniform(-0.2, 0.2, size=2) * np.array([nx, ny]) * scale
    ast_dir = grng.uniform(0.0, 2.0 * np.pi)
    var_xi, var_eta = grng.uniform(-0.3, 0.3, size=2) * np.array([nx, ny]) * scale
    var_dmag = grng.uniform(-cfg.variable_amplitude_mag, cfg.variable_amplitude_mag, size=cfg.n_visits)
    trail_visit = grng.integers(0, cfg.n_visits, size=cfg.n_trails)
    trail_pos = grng.uniform(-0.3, 0.3, size=(cfg.n_trails, 2))
    trail_angle = grng.uniform(0.0, np.pi, size=cfg.n_trails)
    bad_cols = np.sort(grng.choice(np.arange(cfg.edge_width, nx - cfg.edge_width), size=cfg.n_bad_columns, replace=False)) if cfg.n_bad_columns else np.empty(0, np.int64)

    asteroid = None
    if cfg.asteroid:
        ra_ref, dec_ref = _to_sky(cfg.ra, cfg.dec, ast_xi, ast_eta)
        rate = cfg.asteroid_rate_arcsec_per_hour * 24.0
        asteroid = dict(
            ra_ref=float(ra_ref), dec_ref=float(dec_ref), mjd_ref=mjd_ref,
            rate_xi=float(rate * math.cos(ast_dir)), rate_eta=float(rate * math.sin(ast_dir)),
            mag=cfg.asteroid_mag, flux=float(_mag_to_njy(cfg.asteroid_mag)),
        )
    variable = None
    if cfg.variable_star:
        vra, vdec = _to_sky(cfg.ra, cfg.dec, var_xi, var_eta)
        mags = cfg.variable_mag + var_dmag
        variable = dict(
            ra=float(vra), dec=float(vdec), mean_mag=cfg.variable_mag, mean_flux=float(_mag_to_njy(cfg.variable_mag)),
            mag=mags, flux=_mag_to_njy(mags),
        )

    truth_visits: list[VisitTruth] = []
    exposures: list[xr.Dataset] = []
    truth = Truth(config=cfg, seed=seed, stars=stars, galaxies=galaxies, asteroid=asteroid, variable=variable, visits=())
    for i in range(cfg.n_visits):
        vt = _draw_visit(cfg, seed, i, float(mjds[i]), truth, bad_cols, trail_visit, trail_pos, trail_angle)
        truth_visits.append(vt)
    truth = Truth(
        config=cfg, seed=seed, stars=stars, galaxies=galaxies, asteroid=asteroid, variable=variable,
        visits=tuple(truth_visits),
    )
    for vt in truth.visits:
        exposures.append(_observe(truth, vt, seed))
    return Simulation(exposures=exposures, truth=truth, config=cfg, seed=seed)


def _draw_visit(cfg, seed, i, mjd, truth, bad_cols, trail_visit, trail_pos, trail_angle) -> VisitTruth:
    rng = _rng(seed, 2, i)
    ny, nx = cfg.shape
    w, _rot = _visit_wcs(cfg, rng)
    header = wcs_header_string(w)
    zp = cfg.zero_point + rng.uniform(-cfg.zero_point_scatter, cfg.zero_point_scatter)
    seeing = rng.uniform(*cfg.seeing_fwhm_arcsec)
    fwhm_px = seeing / cfg.pixel_scale_arcsec
    phi = rng.uniform(0.0, 2.0 * np.pi)
    gradient = (cfg.psf_fwhm_gradient * math.cos(phi), cfg.psf_fwhm_gradient * math.sin(phi))
    level = cfg.sky_adu * (1.0 + rng.uniform(-cfg.sky_scatter, cfg.sky_scatter))
    sphi = rng.uniform(0.0, 2.0 * np.pi)
    order = max(1, cfg.sky_poly_order)
    coeffs = np.zeros((order + 1, order + 1))
    coeffs[0, 0] = level
    # the gradient term changes the sky by sky_gradient * level across the full width (u spans 2)
    coeffs[1, 0] = 0.5 * cfg.sky_gradient * level * math.cos(sphi)
    coeffs[0, 1] = 0.5 * cfg.sky_gradient * level * math.sin(sphi)
    extra = rng.normal(size=coeffs.shape) * cfg.sky_poly_amplitude * level
    for a in range(order + 1):
        for b in range(order + 1):
            if 2 <= a + b <= cfg.sky_poly_order:
                coeffs[a, b] = extra[a, b]
    # cosmic rays: short random walks
    n_cr = cfg.n_cosmic_rays
    lengths = rng.integers(1, 5, size=n_cr)
    starts = np.stack([rng.integers(0, ny, size=n_cr), rng.integers(0, nx, size=n_cr)], axis=1)
    steps = rng.integers(-1, 2, size=(n_cr, 4, 2))
    adus = rng.uniform(*cfg.cosmic_ray_adu, size=(n_cr, 4))
    cr = []
    for j in range(n_cr):
        y, x = starts[j]
        seen = set()
        for s in range(lengths[j]):
            if (y, x) not in seen and 0 <= y < ny and 0 <= x < nx:
                seen.add((y, x))
                cr.append((j, y, x, adus[j, s]))
            y, x = y + steps[j, s, 0], x + steps[j, s, 1]
    cosmic = np.array(cr, dtype=[("id", "i8"), ("y", "i8"), ("x", "i8"), ("adu", "f8")])
    visit_id = cfg.first_visit + i
    beta = cfg.moffat_beta

    def point(ra, dec, flux):
        x, y = _world2pix(w, np.atleast_1d(ra), np.atleast_1d(dec))
        x, y = float(x[0]), float(y[0])
        fw = fwhm_px * (1.0 + gradient[0] * (x - (nx - 1) / 2.0) / nx + gradient[1] * (y - (ny - 1) / 2.0) / ny)
        return dict(ra=float(ra), dec=float(dec), x=x, y=y, flux=float(flux), flux_adu=float(flux / njy_per_unit(zp)), fwhm_px=float(fw))

    ast = None
    if truth.asteroid is not None:
        ra, dec = truth.asteroid_position(mjd)
        ast = point(ra, dec, truth.asteroid["flux"])
    var = None
    if truth.variable is not None:
        var = point(truth.variable["ra"], truth.variable["dec"], truth.variable["flux"][i])
    trails = []
    tfwhm_px = cfg.trail_fwhm_arcsec / cfg.pixel_scale_arcsec
    for t in np.flatnonzero(trail_visit == i):
        px = (nx - 1) / 2.0 + trail_pos[t, 0] * nx
        py = (ny - 1) / 2.0 + trail_pos[t, 1] * ny
        xs, ys = _trail_through((ny, nx), px, py, float(trail_angle[t]))
        tra, tdec = w.all_pix2world(np.array(xs), np.array(ys), 0)
        trails.append(
            Trail(
                visit=visit_id, x=xs, y=ys, ra=(float(tra[0]), float(tra[1])), dec=(float(tdec[0]), float(tdec[1])),
                fwhm_px=tfwhm_px, fwhm_arcsec=cfg.trail_fwhm_arcsec, peak_adu=cfg.trail_peak_adu,
            )
        )
    vt = VisitTruth(
        index=i, visit=visit_id, detector=cfg.detector, band=cfg.band, mjd=mjd, exptime=cfg.exptime,
        zero_point=float(zp), shape=(ny, nx), wcs_header=header, gain=cfg.gain, read_noise_adu=cfg.read_noise_adu,
        saturation_adu=cfg.saturation_adu, variance_factor=cfg.variance_factor, psf_model=cfg.psf_model,
        moffat_beta=beta, psf_fwhm_px=float(fwhm_px), psf_gradient=gradient, seeing_fwhm_arcsec=float(seeing),
        sky_coeffs=coeffs, sky_subtraction=cfg.sky_subtraction, bad_columns=np.asarray(bad_cols, dtype=np.int64),
        trails=tuple(trails), cosmic_rays=cosmic, asteroid=ast, variable=var, footprint_fwhm=cfg.footprint_fwhm,
    )
    return vt


def _observe(truth: Truth, vt: VisitTruth, seed: int) -> xr.Dataset:
    cfg = truth.config
    ny, nx = vt.shape
    rng = _rng(seed, 3, vt.index)
    total, sky = _visit_model(truth, vt)
    np.maximum(total, 0.0, out=total)
    variance = (total / vt.gain + vt.read_noise_adu**2) * vt.variance_factor
    raw = rng.poisson(total * vt.gain).astype(np.float64) / vt.gain
    if vt.read_noise_adu > 0:
        raw += vt.read_noise_adu * rng.standard_normal(size=(ny, nx))
    mask = np.zeros((ny, nx), dtype=np.uint32)
    if vt.cosmic_rays.size:
        np.add.at(raw, (vt.cosmic_rays["y"], vt.cosmic_rays["x"]), vt.cosmic_rays["adu"])
        if cfg.cosmic_rays_masked:
            mask[vt.cosmic_rays["y"], vt.cosmic_rays["x"]] |= np.uint32(MaskPlane.CR)
    sat = raw >= vt.saturation_adu
    raw[sat] = vt.saturation_adu
    mask[sat] |= np.uint32(MaskPlane.SAT)
    if vt.bad_columns.size:
        raw[:, vt.bad_columns] += cfg.bad_column_offset_adu
        mask[:, vt.bad_columns] |= np.uint32(MaskPlane.BAD)
    image = raw - _subtracted_image(vt, sky)
    e = cfg.edge_width
    if e:
        edge = np.zeros((ny, nx), dtype=bool)
        edge[:e, :] = edge[-e:, :] = True
        edge[:, :e] = edge[:, -e:] = True
        mask[edge] |= np.uint32(MaskPlane.EDGE)
    if cfg.no_data_corner:
        c = cfg.no_data_corner
        image[ny - c :, nx - c :] = np.nan
        variance[ny - c :, nx - c :] = np.inf
        mask[ny - c :, nx - c :] |= np.uint32(MaskPlane.NO_DATA)
    g = cfg.psf_grid_nodes
    xs = (np.arange(g) + 0.5) * nx / g - 0.5
    ys = (np.arange(g) + 0.5) * ny / g - 0.5
    stamps = np.stack([np.stack([vt.psf_image(x, y, cfg.psf_stamp_size) for x in xs]) for y in ys])
    attrs = {
        "visit": vt.visit,
        "detector": vt.detector,
        "band": vt.band,
        "mjd_obs": vt.mjd,
        "exptime": vt.exptime,
        "zero_point": vt.zero_point,
        "bunit": "adu",
    }
    return make_dataset(
        image.astype(np.float32),
        variance.astype(np.float32),
        mask,
        wcs=vt.wcs_header,
        kind="exposure",
        planes=CANONICAL_PLANES,
        psf=psf_grid(stamps, x=xs, y=ys),
        attrs=attrs,
    )


@dataclass(frozen=True, eq=False)
class Simulation:
    """The result of :func:`simulate`: exposures (numpy-backed Datasets) and their truth."""

    exposures: list[xr.Dataset]
    truth: Truth
    config: SimConfig
    seed: int

    def exposure(self, visit: int) -> xr.Dataset:
        """The exposure of visit id ``visit``."""
        return self.exposures[self.truth.visit(visit).index]
