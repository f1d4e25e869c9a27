"""Input and output: FITS exposures, PSFEx models, the Zarr repository."""
