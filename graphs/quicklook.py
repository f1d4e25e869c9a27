"""Quicklook PNGs: what a person would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr


def _stretch(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image), 0.0, 1.0
    lo, med, hi = np.percentile(finite, [5.0, 50.0, 99.8])
    scale = max(float(np.median(np.abs(finite - med))) * 1.4826, 1e-12)
    stretched = np.arcsinh((image - med) / (3.0 * scale))
    vmin = float(np.arcsinh((lo - med) / (3.0 * scale)))
    vmax = float(np.arcsinh((hi - med) / (3.0 * scale)))
    return stretched, vmin, max(vmax, vmin + 1e-6)


def write_quicklook(coadd: xr.Dataset, path: str | Path, *, title: str = "", max_pixels: int = 1200) -> Path:
    """Write a PNG with the coadd image (asinh stretch), its number of inputs and flagged pixels.

    ``coadd`` may be lazy; it is subsampled to at most ``max_pixels`` per side before computing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.model.masks import CANONICAL_PLANES, planes_from_attrs

    step = max(1, int(np.ceil(max(coadd.sizes["y"], coadd.sizes["x"]) / max_pixels)))
    small = coadd.isel(y=slice(None, None, step), x=slice(None, None, step)).compute()
    image, vmin, vmax = _stretch(small["image"].values.astype(np.float64))
    extent = [int(small.x[0]), int(small.x[-1]), int(small.y[0]), int(small.y[-1])]
    panels = 2 + ("n_image" in small)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 5.0), constrained_layout=True)
    ax = axes[0]
    im = ax.imshow(image, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, extent=extent)
    ax.set_title(title or "image (asinh stretch)")
    ax.set_xlabel("x [tract pixel]")
    ax.set_ylabel("y [tract pixel]")
    fig.colorbar(im, ax=ax, shrink=0.8, label="asinh((I - median) / 3 sigma)")
    col = 1
    if "n_image" in small:
        ax = axes[col]
        im = ax.imshow(small["n_image"].values, origin="lower", cmap="viridis", extent=extent)
        ax.set_title("number of inputs per pixel")
        fig.colorbar(im, ax=ax, shrink=0.8)
        col += 1
    ax = axes[col]
    planes = planes_from_attrs(small["mask"].attrs) if "flag_masks" in small["mask"].attrs else CANONICAL_PLANES
    mask = small["mask"].values
    shown = [p for p in ("NO_DATA", "CLIPPED", "REJECTED", "SENSOR_EDGE", "SAT", "INTRP") if p in planes]
    layer = np.zeros(mask.shape, dtype=np.int16)
    for k, name in enumerate(shown, start=1):
        layer[(mask >> planes[name]) & 1 == 1] = k
    cmap = plt.get_cmap("tab10", len(shown) + 1)
    im = ax.imshow(layer, origin="lower", cmap=cmap, vmin=-0.5, vmax=len(shown) + 0.5, extent=extent, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, shrink=0.8, ticks=range(len(shown) + 1))
    cbar.ax.set_yticklabels(["none", *shown])
    ax.set_title("mask (last listed plane wins)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
