"""``skystack demo``: the main job on built-in simulated data, start to finish.

Simulate calibrated exposures (with known truth and injected artifacts), write them as
LSST-style FITS files, ingest them into a fresh repository (sky map centred on the data), warp
every visit onto the tract, coadd every patch, export the central patch's coadd to FITS and draw
a quicklook PNG of the whole tract. Re-running it on the same directory skips finished work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io.fits import write_fits
from pipeline.io.repo import open_repo
from pipeline.model.skymap import SkyMap
from pipeline.sim import SimConfig, simulate

from .coadd import coadd_units
from .execute import RunReport, run_units
from .ingest import ingest_files
from .quicklook import write_quicklook
from .warps import warp_units

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """Where the demo put things, and what each stage did."""

    out: Path
    repo_url: str
    fits_inputs: list[Path] = field(default_factory=list)
    coadd_fits: Path | None = None
    quicklook: Path | None = None
    reports: dict[str, RunReport] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    coadd_stats: dict[str, float] = field(default_factory=dict)


def run_demo(
    out: str | Path = "skystack-demo",
    *,
    seed: int = 0,
    n_visits: int = 6,
    shape: tuple[int, int] = (1024, 1024),
    patch_inner: int = 1000,
    patch_border: int = 50,
    client=None,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo into ``out`` and return a :class:`DemoResult`.

    Fails (raises) if any unit of work fails; the repository then keeps every finished unit, so
    running again resumes.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out=out, repo_url=str(out / "repo.zarr"))

    t0 = time.perf_counter()
    echo(f"[1/5] simulating {n_visits} exposures of {shape[1]}x{shape[0]} pixels (seed {seed})")
    sim = simulate(SimConfig(n_visits=n_visits, shape=shape), seed=seed)
    raw = out / "calexp"
    raw.mkdir(exist_ok=True)
    for ds in sim.exposures:
        path = raw / f"calexp_{ds.attrs['band']}_{ds.attrs['visit']}_{ds.attrs['detector']}.fits"
        if not path.exists():
            write_fits(ds, path)
        result.fits_inputs.append(path)
    result.seconds["simulate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    echo(f"[2/5] ingesting {len(result.fits_inputs)} FITS files into {result.repo_url}")
    repo = open_repo(result.repo_url, create=True, mode="a")
    ingest_files(
        repo,
        result.fits_inputs,
        skymap_kwargs={"patch_inner": (patch_inner, patch_inner), "patch_border": patch_border},
        on_item=lambda m: echo("      " + m),
    )
    tract = SkyMap.from_json(repo.skymap_json).tracts[0]
    nx, ny = tract.n_patches
    echo(f"      sky map: tract {tract.id}, {tract.bbox.width}x{tract.bbox.height} px, {nx}x{ny} patches")
    result.seconds["ingest"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    echo("[3/5] warping every visit onto the tract (Lanczos3)")
    result.reports["warp"] = _run(warp_units(repo), client, echo)
    result.seconds["warp"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    echo("[4/5] coadding every patch")
    result.reports["coadd"] = _run(coadd_units(repo), client, echo)
    result.seconds["coadd"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    echo("[5/5] exporting the central patch and drawing the quicklook")
    band = sim.exposures[0].attrs["band"]
    centre = tract.patch_at_sky(tract.ra, tract.dec)
    coadd = repo.open_coadd(tract.id, band, "deep", patch_box=centre.inner)
    result.coadd_fits = Path(write_fits(coadd.assign_attrs(tract=tract.id, patch=centre.name),
                                        out / f"coadd_{band}_tract{tract.id}_patch{centre.i}-{centre.j}.fits",
                                        overwrite=True))
    whole = repo.open_coadd(tract.id, band, "deep", patch_box=_covered_box(repo, tract, band))
    result.quicklook = write_quicklook(whole, out / f"coadd_{band}_tract{tract.id}.png",
                                       title=f"deep coadd, band {band}, tract {tract.id} ({n_visits} visits)")
    result.coadd_stats = _summary(coadd)
    result.seconds["export"] = time.perf_counter() - t0

    total = sum(result.seconds.values())
    echo("")
    echo(f"done in {total:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in result.seconds.items())})")
    echo(f"  repository:      {result.repo_url}   (skystack ls --repo {result.repo_url})")
    echo(f"  central coadd:   {result.coadd_fits}")
    echo(f"  quicklook:       {result.quicklook}")
    s = result.coadd_stats
    echo(f"  central patch:   median inputs per pixel {s['median_n_image']:.0f}, "
         f"{100 * s['frac_clipped']:.2f} % of pixels with clipped inputs, "
         f"noise {s['noise_ratio']:.2f}x the coadd variance plane")
    return result


def _run(units, client, echo) -> RunReport:
    report = run_units(units, client=client, progress=True)
    if report.failed:
        report.raise_for_failures()
    echo(f"      {len(report.done)} done, {len(report.skipped)} already done")
    return report


def _covered_box(repo, tract, band):
    """The union of the inner boxes of the complete coadd patches (the quicklook's area)."""
    from pipeline.io.repo import coadd_path
    from pipeline.model.geometry import Box

    boxes = [b for u, b in repo.product_units(coadd_path(tract.id, band, "deep")).items()
             if repo.is_complete(coadd_path(tract.id, band, "deep"), u)]
    return Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes), max(b.x1 for b in boxes), max(b.y1 for b in boxes))


def _summary(coadd) -> dict[str, float]:
    """A few numbers a person can check at a glance (computed on the small exported patch)."""
    from pipeline.model.masks import bitmask, planes_from_attrs

    c = coadd.compute()
    planes = planes_from_attrs(c["mask"].attrs)
    n = c["n_image"].values
    clipped = (c["mask"].values & np.uint32(bitmask("CLIPPED", planes))) != 0
    good = (n > 0) & np.isfinite(c["image"].values) & (c["variance"].values > 0)
    img, var = c["image"].values[good], c["variance"].values[good]
    # robust scatter of the sky pixels relative to the variance plane
    z = (img - np.median(img)) / np.sqrt(var)
    lo, hi = np.percentile(z, [25, 75])
    return {
        "median_n_image": float(np.median(n[n > 0])) if np.any(n > 0) else 0.0,
        "frac_clipped": float(clipped[n > 0].mean()) if np.any(n > 0) else 0.0,
        "noise_ratio": float((hi - lo) * 0.741301109252802),
    }
