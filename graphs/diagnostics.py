"""Diagnostic pictures of pipeline results (they compute what they draw, so they live in graphs/)."""

from __future__ import annotations

import dask
import numpy as np

from pipeline.match_backgrounds import STATUS_MESSAGES, MatchResult

__all__ = ["plot_match_diagnostics"]


def plot_match_diagnostics(result: MatchResult, visit, path) -> None:
    """Write the seed's debug plot for ``visit`` to ``path`` (PNG): model with grid points, residuals.

    This computes the model image and the diagnostic grid of that visit (it is a reporting helper,
    called from notebooks or the CLI).
    """
    import matplotlib.colors as mcolors
    from matplotlib.figure import Figure

    if visit not in result.visits:
        raise ValueError(f"visit {visit} is not among the matched visits {result.visits}")
    k = result.visits.index(visit)
    model_da = result.models[k]
    plan, model_img = dask.compute(result.plans[k], model_da.data)
    X, Y, Z, dZ, model = plan["X"], plan["Y"], plan["Z"], plan["dZ"], plan["model"]
    x0, y0 = int(model_da.x[0]), int(model_da.y[0])
    dy, dx = model_img.shape
    fig = Figure(figsize=(10, 5), layout="constrained")  # no pyplot: no global figure or backend state
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    extent = (x0 - 0.5, x0 + dx - 0.5, y0 + dy - 0.5, y0 - 0.5)
    if Z.size == 0 or model.size == 0:
        axes[0].imshow(model_img, extent=extent, cmap="Spectral")
        axes[0].set_title(f"visit {visit}: no grid ({STATUS_MESSAGES.get(plan['status'], '')})")
    else:
        resid = Z - model
        norm = mcolors.Normalize(vmin=float(np.nanmin(Z)), vmax=float(np.nanmax(Z)))
        maxdiff = float(np.nanmax(np.abs(resid))) or 1.0
        dnorm = mcolors.Normalize(vmin=-maxdiff, vmax=maxdiff)
        rms = float(np.sqrt(np.nanmean(resid**2)))
        size = 15.0 * np.mean(dZ) / dZ
        im = axes[0].imshow(model_img, extent=extent, norm=norm, cmap="Spectral")
        axes[0].scatter(X, Y, c=Z, s=size, edgecolor="none", norm=norm, marker="o", cmap="Spectral")
        sc = axes[1].scatter(X, Y, c=resid, edgecolor="none", norm=dnorm, marker="s", cmap="seismic")
        fig.colorbar(im, ax=axes[0], location="top")
        fig.colorbar(sc, ax=axes[1], location="top")
        axes[0].set_xlabel("model and grid")
        axes[1].set_xlabel(f"residuals. rms = {rms:0.3f}")
    axes[0].set_xlim(x0, x0 + dx)
    axes[0].set_ylim(y0 + dy, y0)
    fig.savefig(path, format="png")
