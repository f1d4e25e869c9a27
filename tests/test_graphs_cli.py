"""The command line end to end: ingest, ls, export, warp, coadd, demo, on real FITS files and a real Zarr store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from click.testing import CliRunner

from graphs.cli import main
from pipeline.io.fits import read_fits, write_fits
from pipeline.io.repo import open_repo
from pipeline.model.masks import planes_from_attrs
from pipeline.model.wcs import get_wcs
from pipeline.sim import SimConfig, simulate


def _run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def sim():
    return simulate(SimConfig.small(n_visits=3, shape=(240, 256), sip_amplitude_px=1.5, n_stars=300.0), seed=7)


@pytest.fixture
def fits_files(sim, tmp_path):
    paths = []
    for ds in sim.exposures:
        path = tmp_path / f"calexp_{ds.attrs['visit']}.fits"
        write_fits(ds, path)
        paths.append(path)
    return paths


def _corners(ds):
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    x0, y0 = int(ds.x[0]), int(ds.y[0])
    gx, gy = np.meshgrid(np.arange(nx + 1) - 0.5 + x0, np.arange(ny + 1) - 0.5 + y0)
    ra, dec = get_wcs(ds).all_pix2world(gx, gy, 0)
    return ra, dec


def test_round_trip_fits_ingest_zarr_export_is_exact(sim, fits_files, tmp_path):
    repo = tmp_path / "repo.zarr"
    _run("ingest", *fits_files, "--repo", repo)
    for ds in sim.exposures:
        out = tmp_path / f"back_{ds.attrs['visit']}.fits"
        _run("export", "--repo", repo, "--visit", ds.attrs["visit"], "--detector", ds.attrs["detector"], "-o", out)
        back = read_fits(out)
        for name in ("image", "variance", "mask"):
            np.testing.assert_array_equal(back[name].values, ds[name].values, err_msg=name)
        assert planes_from_attrs(back["mask"].attrs) == planes_from_attrs(ds["mask"].attrs)
        assert back.attrs["zero_point"] == ds.attrs["zero_point"]
        ra0, dec0 = _corners(ds)
        ra1, dec1 = _corners(back)
        assert np.max(np.abs(ra1 - ra0) * np.cos(np.radians(dec0))) < 1e-9
        assert np.max(np.abs(dec1 - dec0)) < 1e-9


def test_ingest_skips_duplicates_and_overwrites_on_request(fits_files, tmp_path):
    repo = tmp_path / "repo.zarr"
    _run("ingest", *fits_files[:2], "--repo", repo)
    again = _run("ingest", *fits_files, "--repo", repo)
    assert "1 exposure(s) ingested, 2 skipped" in again.output
    assert "skipped visit=1000 detector=0" in again.output
    forced = _run("ingest", fits_files[0], "--repo", repo, "--overwrite")
    assert "1 exposure(s) ingested, 0 skipped" in forced.output


def test_bad_file_names_the_file_and_leaves_no_repository(fits_files, tmp_path):
    bad = tmp_path / "broken.fits"
    with fits.open(fits_files[0]) as hdul:
        fits.HDUList([h.copy() for h in hdul if h.name != "VARIANCE"]).writeto(bad)
    repo = tmp_path / "repo.zarr"
    result = _run("ingest", fits_files[0], bad, "--repo", repo, ok=False)
    assert result.exit_code == 1
    assert "broken.fits" in result.output and "VARIANCE" in result.output
    assert not repo.exists()


def test_bad_file_leaves_existing_repository_unchanged(fits_files, tmp_path):
    repo = tmp_path / "repo.zarr"
    _run("ingest", fits_files[0], "--repo", repo)
    before = json.loads(_run("ls", "--repo", repo, "--json").output)
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(Path(fits_files[1]).read_bytes()[:20000])
    result = _run("ingest", fits_files[2], truncated, "--repo", repo, ok=False)
    assert result.exit_code == 1 and "truncated.fits" in result.output
    assert json.loads(_run("ls", "--repo", repo, "--json").output) == before


def test_ls_json_and_table(fits_files, tmp_path):
    repo = tmp_path / "repo.zarr"
    _run("ingest", *fits_files, "--repo", repo)
    records = json.loads(_run("ls", "--repo", repo, "--json").output)
    assert sorted(r["visit"] for r in records) == [1000, 1001, 1002]
    assert all(r["kind"] == "exposure" and r["complete"] and r["band"] == "r" for r in records)
    table = _run("ls", "--repo", repo).output
    assert "tract 0:" in table and "exposure" in table


def test_missing_repository_is_a_clear_error(tmp_path):
    result = _run("ls", "--repo", tmp_path / "nowhere.zarr", ok=False)
    assert result.exit_code == 1
    assert "error:" in result.output and "nowhere.zarr" in result.output


def test_warp_coadd_export_recovers_star_fluxes(sim, fits_files, tmp_path):
    """Calibration, warping and stacking together keep the truth fluxes of isolated stars."""
    repo_path = tmp_path / "repo.zarr"
    _run("ingest", *fits_files, "--repo", repo_path, "--patch-size", 400, "--patch-border", 20)
    warp = _run("warp", "--repo", repo_path)
    assert "6 done, 0 skipped, 0 failed" in warp.output
    again = _run("warp", "--repo", repo_path)
    assert "0 done, 6 skipped" in again.output
    coadd = _run("coadd", "--repo", repo_path)
    assert "failed" in coadd.output and " 0 failed" in coadd.output
    repo = open_repo(repo_path)
    records = [r for r in repo.inventory() if r["kind"] == "coadd"]
    assert records and all(r["complete"] for r in records)

    out = tmp_path / "coadd.fits"
    _run("export", "--repo", repo_path, "--tract", 0, "--patch", "0,0", "--band", "r", "-o", out)
    exported = read_fits(out)
    assert exported.attrs["bunit"] == "nJy" and "n_image" in exported

    for kind in ("direct", "psf_matched"):
        wout = tmp_path / f"warp_{kind}.fits"
        _run("export", "--repo", repo_path, "--tract", 0, "--patch", "0,0", "--visit", 1000, "--kind", kind, "-o", wout)
        w = read_fits(wout)
        assert w.attrs["bunit"] == "nJy" and w.attrs["visit"] == 1000
        assert 0.05 < np.isfinite(w["image"].values).mean() <= 1.0

    c = repo.open_coadd(0, "r").compute()
    w = get_wcs(c)
    stars = sim.truth.stars
    x, y = w.all_world2pix(stars["ra"], stars["dec"], 0)
    ix, iy = np.round(x).astype(int) - int(c.x[0]), np.round(y).astype(int) - int(c.y[0])
    ny, nx = c.sizes["y"], c.sizes["x"]
    r = 6
    inside = (ix >= r) & (iy >= r) & (ix < nx - r) & (iy < ny - r) & ~stars["saturating"]
    checked = 0
    img, var, nimg = c["image"].values, c["variance"].values, c["n_image"].values
    for k in np.flatnonzero(inside & (stars["flux"] > 5_000)):
        win = (slice(iy[k] - r, iy[k] + r + 1), slice(ix[k] - r, ix[k] + r + 1))
        if np.any(nimg[win] < 2) or not np.all(np.isfinite(img[win])):
            continue
        if np.sum(np.hypot(x - x[k], y - y[k]) < 2 * r) > 1:
            continue
        flux, sigma = img[win].sum(), np.sqrt(var[win].sum())
        # a 13x13 box holds > 99 % of a Gaussian PSF of FWHM <= 1" at 0.2"/px; resampling
        # correlates the noise, so allow 5 sigma of the per-pixel variance sum, times 1.5
        assert abs(flux - stars["flux"][k]) < 0.01 * stars["flux"][k] + 7.5 * sigma
        checked += 1
    assert checked >= 5


@pytest.mark.slow
def test_demo_runs_and_resumes(tmp_path):
    out = tmp_path / "demo"
    first = _run("demo", "--out", out, "--visits", 3, "--size", 256)
    assert "[5/5]" in first.output
    pngs = list(out.glob("*.png"))
    fitsfiles = list(out.glob("coadd_*.fits"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
    assert len(fitsfiles) == 1
    coadd = read_fits(fitsfiles[0])
    n = coadd["n_image"].values
    assert n.max() == 3
    again = _run("demo", "--out", out, "--visits", 3, "--size", 256)
    assert "0 done, 3 already done" in again.output
