"""The ``skystack`` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

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

    from .ingest import ingest_files

    if psf_files and len(psf_files) != len(files):
        raise click.BadParameter(f"got {len(psf_files)} --psf files for {len(files)} exposures", param_hint="--psf")
    psf_map = {f: p for f, p in zip(files, psf_files)} if psf_files else None
    tract_kw = {"pixel_scale_arcsec": pixel_scale, "patch_inner": (patch_size, patch_size), "patch_border": patch_border}
    skymap = SkyMap.discrete([tract_centre], tract_overlap_deg=tract_overlap, **tract_kw) if tract_centre else None
    repo = _open(url, create=True, mode="a")
    report = ingest_files(repo, files, overwrite=overwrite, psf_files=psf_map, skymap=skymap,
                          skymap_kwargs=tract_kw, on_item=_echo)
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
@click.option("--patch", required=True, help="Patch as 'i,j' or a sequential index.")
@click.option("--band", default=None, help="Band of the coadd (coadds only).")
@click.option("--visit", type=int, default=None, help="Export this visit's warp instead of a coadd.")
@click.option("--kind", type=click.Choice(["deep", "template", "direct", "psf_matched"]), default=None,
              help="Coadd name (deep, template) or warp kind (direct, psf_matched).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="FITS file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export(url, tract, patch, band, visit, kind, output, overwrite):
    """Write a coadd (or one visit's warp) of a patch to FITS, in the LSST calexp layout."""
    from pipeline.io.fits import write_fits
    from pipeline.model.skymap import SkyMap

    repo = _open(url)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
