"""Diagnostic pictures of pipeline results (they compute what they draw, so they live in graphs/)."""

from __future__ import annotations

import dask
import numpy as np

from pipeline.match_backgrounds import STATUS_MESSAGES, MatchResult

__all__ = ["plot_match_diagnostics", "plot_psf_match_report"]


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


_REPORT_VARS = ("residual_max", "achieved_fwhm", "target_fwhm", "kernel_sum_sq")


def plot_psf_match_report(report, path, *, title: str | None = None) -> dict:
    """Write a PNG of the per-cell PSF-matching report (``KernelModel.report``) to ``path``.

    Three maps over the cell centres: the largest |achieved - target| PSF residual (relative to the
    target peak), the achieved minus target FWHM (px), and the noise gain sum K^2 of the applied
    kernel. Cells outside the exposure are drawn hollow. Returns the figures the titles quote:
    ``worst_residual`` and its cell centre ``worst_cell`` (x, y), ``centre_residual`` (the cell
    nearest the middle of the cell grid), ``max_fwhm_error`` (px) and ``max_noise_gain``.
    """
    from matplotlib.figure import Figure

    missing = [v for v in _REPORT_VARS if v not in report]
    if missing:
        raise ValueError(f"not a PSF-matching report: missing {', '.join(missing)}")
    x = np.asarray(report["cell_x"], dtype=float)
    y = np.asarray(report["cell_y"], dtype=float)
    inside = np.asarray(report["in_exposure"], dtype=bool) if "in_exposure" in report.coords else np.ones(x.size, bool)
    res = np.asarray(report["residual_max"], dtype=float)
    dfwhm = np.asarray(report["achieved_fwhm"], dtype=float) - np.asarray(report["target_fwhm"], dtype=float)
    gain = np.asarray(report["kernel_sum_sq"], dtype=float)
    worst = int(np.nanargmax(res))
    mid = int(np.argmin((x - 0.5 * (x.min() + x.max())) ** 2 + (y - 0.5 * (y.min() + y.max())) ** 2))
    summary = {
        "worst_residual": float(res[worst]), "worst_cell": (float(x[worst]), float(y[worst])),
        "centre_residual": float(res[mid]), "max_fwhm_error": float(np.nanmax(np.abs(dfwhm))),
        "max_noise_gain": float(np.nanmax(gain)),
    }
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    lim = summary["max_fwhm_error"] or 1.0
    panels = (
        (res, "viridis", None, f"PSF residual / peak: worst {res[worst]:.2e} at ({x[worst]:.0f}, {y[worst]:.0f}), "
                               f"centre {res[mid]:.2e}"),
        (dfwhm, "coolwarm", (-lim, lim), f"achieved - target FWHM (px): max |.| {summary['max_fwhm_error']:.3f}"),
        (gain, "magma", None, f"noise gain sum K$^2$: max {summary['max_noise_gain']:.3g}"),
    )
    for ax, (values, cmap, vlim, text) in zip(axes, panels):
        kw = {"vmin": vlim[0], "vmax": vlim[1]} if vlim else {}
        sc = ax.scatter(x[inside], y[inside], c=values[inside], cmap=cmap, s=60, marker="s", **kw)
        if (~inside).any():
            ax.scatter(x[~inside], y[~inside], facecolors="none", edgecolors="0.5", s=60, marker="s")
        bar = fig.colorbar(sc, ax=ax, location="top")
        bar.ax.locator_params(nbins=5)
        ax.set_title(text, fontsize=9)
        ax.set_xlabel("x (parent px)")
        ax.set_aspect("equal")
    axes[0].set_ylabel("y (parent px)")
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")
    return summary
