"""The ``skystack`` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import sys

import click

import pipeline
from pipeline.errors import ProductIncompleteError, SkystackError


class _Group(click.Group):
    """Turns skystack errors into one clear line and exit status 1 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SkystackError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


def _echo(message: str) -> None:
    click.echo(message, err=True)


@contextlib.contextmanager
def _client(ctx: click.Context):
    """A distributed Client when --scheduler or --workers was given, else None (threaded scheduler)."""
    opts = ctx.find_root().obj or {}
    address, workers = opts.get("scheduler"), opts.get("workers")
    if address is None and not workers:
        yield None
        return
    from .cluster import cluster

    kwargs = {} if address else {"n_workers": workers}
    with cluster(address, **kwargs) as client:
        _echo(f"dask cluster: {client.scheduler.address}")
        yield client


def _open(url: str, *, create: bool = False, mode: str = "r"):
    from pipeline.io.repo import open_repo

    return open_repo(url, create=create, mode=mode)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(pipeline.__version__, prog_name="skystack")
@click.option("--scheduler", metavar="ADDRESS", default=None, envvar="SKYSTACK_SCHEDULER",
              help="Run on an existing dask scheduler (tcp://host:port or a scheduler file); env SKYSTACK_SCHEDULER.")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Start a local dask cluster with this many workers.")
@click.option("-v", "--verbose", is_flag=True, help="Log what every step does.")
@click.pass_context
def main(ctx: click.Context, scheduler: str | None, workers: int | None, verbose: bool) -> None:
    """skystack: deep-sky coadds and difference images as lazy dask graphs over Zarr."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"scheduler": scheduler, "workers": workers}


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--repo", "url", required=True, help="Repository URL or path (created if missing).")
@click.option("--overwrite", is_flag=True, help="Replace exposures already in the repository.")
@click.option("--psf", "psf_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="PSFEx .psf file for the FILE at the same position (repeat once per FILE).")
@click.option("--pixel-scale", type=float, default=0.2, show_default=True, help="Tract pixel scale (arcsec) of a new sky map.")
@click.option("--patch-size", type=int, default=4000, show_default=True, help="Patch inner size (pixels) of a new sky map.")
@click.option("--patch-border", type=int, default=100, show_default=True, help="Patch border (pixels) of a new sky map.")
@click.option("--tract-centre", nargs=3, type=float, default=None, metavar="RA DEC RADIUS",
              help="An explicit tract (deg) instead of one centred on the data.")
@click.option("--tract-overlap", type=float, default=0.0, show_default=True,
              help="Extra radius (deg) of an explicit --tract-centre tract (the reference's tractOverlap).")
def ingest(files, url, overwrite, psf_files, pixel_scale, patch_size, patch_border, tract_centre, tract_overlap):
    """Put calibrated exposures (LSST-style FITS) into the repository.

    Every file is read and checked before anything is written: a bad file stops the ingest with
    the file named and the repository unchanged. The first ingest sets the repository's sky map.
    """
    from pipeline.model.skymap import SkyMap

    from .ingest import ingest_datasets, read_all

    if psf_files and len(psf_files) != len(files):
        raise click.BadParameter(f"got {len(psf_files)} --psf files for {len(files)} exposures", param_hint="--psf")
    psf_map = {f: p for f, p in zip(files, psf_files)} if psf_files else None
    tract_kw = {"pixel_scale_arcsec": pixel_scale, "patch_inner": (patch_size, patch_size), "patch_border": patch_border}
    skymap = SkyMap.discrete([tract_centre], tract_overlap_deg=tract_overlap, **tract_kw) if tract_centre else None
    exposures = read_all(files, psf_files=psf_map)  # every file checked before the repository is touched
    repo = _open(url, create=True, mode="a")
    report = ingest_datasets(repo, exposures, overwrite=overwrite, skymap=skymap, skymap_kwargs=tract_kw, on_item=_echo)
    _echo(f"{len(report.written)} exposure(s) ingested, {len(report.skipped)} skipped (already there; use --overwrite) into {repo.url}")


@main.command("ls")
@click.option("--repo", "url", required=True, help="Repository URL or path.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per product unit, for scripts.")
def ls_(url, as_json):
    """List what the repository holds: exposures, warps, coadds, and whether each is complete."""
    repo = _open(url)
    records = repo.inventory()
    if as_json:
        click.echo(json.dumps(records, indent=1))
        return
    sm = repo.skymap_json
    if sm:
        from pipeline.model.skymap import SkyMap

        for tract in SkyMap.from_json(sm).tracts:
            nx, ny = tract.n_patches
            click.echo(f"tract {tract.id}: centre ({tract.ra:.5f}, {tract.dec:.5f}) deg, {tract.pixel_scale_arcsec}\"/px, "
                       f"{nx}x{ny} patches of {tract.patch_inner[0]}x{tract.patch_inner[1]} px")
    from pipeline.io.repo import format_inventory

    click.echo(format_inventory(records))


@main.command()
@click.option("--repo", "url", required=True, help="Repository URL or path.")
@click.option("--tract", type=int, default=0, show_default=True)
@click.option("--patch", default=None, help="Patch as 'i,j' or a sequential index (coadds and warps).")
@click.option("--band", default=None, help="Band of the coadd (coadds only).")
@click.option("--visit", type=int, default=None, help="Export this visit's warp (or, with --detector, its exposure).")
@click.option("--detector", type=int, default=None, help="With --visit: export the ingested exposure itself.")
@click.option("--kind", type=click.Choice(["deep", "template", "direct", "psf_matched"]), default=None,
              help="Coadd name (deep, template) or warp kind (direct, psf_matched).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="FITS file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export(url, tract, patch, band, visit, detector, kind, output, overwrite):
    """Write a coadd, one visit's warp, or an ingested exposure to FITS (LSST calexp layout).

    \b
    coadd:     --tract T --patch P --band B [--kind deep|template]
    warp:      --tract T --patch P --visit V [--kind direct|psf_matched]
    exposure:  --visit V --detector D
    """
    from pipeline.io.fits import write_fits
    from pipeline.model.skymap import SkyMap

    repo = _open(url)
    if detector is not None:
        if visit is None:
            raise click.BadParameter("--detector goes with --visit", param_hint="--detector")
        path = write_fits(repo.open_exposure(visit, detector), output, overwrite=overwrite)
        _echo(f"wrote exposure visit {visit} detector {detector} to {path}")
        return
    if patch is None:
        raise click.BadParameter("give the patch ('i,j' or an index)", param_hint="--patch")
    if repo.skymap_json is None:
        raise click.ClickException(f"{url} has no sky map yet: ingest exposures first")
    patch_obj = SkyMap.from_json(repo.skymap_json).tract(tract).patch(patch)
    if visit is not None:
        kind = kind or "direct"
        if kind not in ("direct", "psf_matched"):
            raise click.BadParameter("a visit's warp is 'direct' or 'psf_matched'", param_hint="--kind")
        opener = lambda box: repo.open_warp(tract, visit, kind, window=box)  # noqa: E731
        what = f"{kind} warp of visit {visit}"
    else:
        kind = kind or "deep"
        if kind not in ("deep", "template"):
            raise click.BadParameter("a coadd is 'deep' or 'template'", param_hint="--kind")
        if band is None:
            raise click.BadParameter("give the band of the coadd", param_hint="--band")
        opener = lambda box: repo.open_coadd(tract, band, kind, patch_box=box)  # noqa: E731
        what = f"{kind} coadd in band {band}"
    try:
        ds = opener(patch_obj.outer)
        box = "outer"
    except ProductIncompleteError:
        ds = opener(patch_obj.inner)
        box = "inner (a neighbouring patch is not complete)"
    ds = ds.assign_attrs(tract=tract, patch=patch_obj.name)
    path = write_fits(ds, output, overwrite=overwrite)
    _echo(f"wrote the {what}, tract {tract} patch {patch_obj.name} {box} box, to {path}")

@main.command()
@click.option("--repo", "url", required=True, help="Repository URL or path.")
@click.option("--tract", type=int, default=None, help="Only this tract (default: every tract the data touch).")
@click.option("--visit", "visits", type=int, multiple=True, help="Only these visits (repeatable).")
@click.option("--overwrite", is_flag=True, help="Redo warps that are already complete.")
@click.option("--psf-matched/--direct-only", default=True, show_default=True,
              help="Also make PSF-matched warps (ModelPsfMatch to the model PSF, FWHM 7.7 px).")
@click.pass_context
def warp(ctx, url, tract, visits, overwrite, psf_matched):
    """Warp every visit onto the tracts it touches: direct warps (Lanczos3, nJy) and PSF-matched warps."""
    from .execute import run_units
    from .psf_matched_warps import psf_matched_warp_units
    from .warps import warp_units

    repo = _open(url, mode="r+")
    units = warp_units(repo, tract=tract, visits=visits or None, overwrite=overwrite)
    if psf_matched:
        units += psf_matched_warp_units(repo, tract=tract, visits=visits or None, overwrite=overwrite)
    with _client(ctx) as client:
        report = run_units(units, client=client)
    _finish(report, "warp")


@main.command()
@click.option("--repo", "url", required=True, help="Repository URL or path.")
@click.option("--tract", type=int, default=None, help="Only this tract.")
@click.option("--patch", "patches", multiple=True, help="Only these patches ('i,j' or index; repeatable).")
@click.option("--band", default=None, help="Only this band.")
@click.option("--name", default="deep", show_default=True, help="Name of the coadd product.")
@click.option("--overwrite", is_flag=True, help="Redo patches that are already complete.")
@click.pass_context
def coadd(ctx, url, tract, patches, band, name, overwrite):
    """Coadd the direct warps of every patch (weighted 3-sigma clipped mean, AssembleCoadd)."""
    from .coadd import coadd_units
    from .execute import run_units

    repo = _open(url, mode="r+")
    units = coadd_units(repo, tract=tract, band=band, patches=patches or None, name=name, overwrite=overwrite)
    with _client(ctx) as client:
        report = run_units(units, client=client)
    _finish(report, "coadd")


@main.command()
@click.option("--out", "out", default="skystack-demo", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the simulated FITS files, the repository and the outputs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the simulated sky.")
@click.option("--visits", type=click.IntRange(2, 64), default=6, show_default=True, help="Number of simulated visits.")
@click.option("--size", type=click.IntRange(128, 4096), default=1024, show_default=True, help="Detector size (pixels).")
@click.pass_context
def demo(ctx, out, seed, visits, size):
    """The main job on built-in simulated data: simulate, ingest, warp, coadd, export, quicklook."""
    from .demo import run_demo

    with _client(ctx) as client:
        run_demo(out, seed=seed, n_visits=visits, shape=(size, size), client=client, echo=_echo)


def _finish(report, what: str) -> None:
    _echo(report.summary())
    if report.failed:
        raise click.ClickException(f"{len(report.failed)} {what} unit(s) failed; run again to retry them")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
