"""The ``skystack`` command line."""

from __future__ import annotations

import click

import pipeline


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(pipeline.__version__, prog_name="skystack")
def main() -> None:
    """skystack: deep-sky coadds and difference images as lazy dask graphs over Zarr."""


if __name__ == "__main__":  # pragma: no cover
    main()
