"""Tests of graphs.diagnostics.plot_psf_match_report: the per-cell PSF-matching report as a picture."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from graphs.diagnostics import plot_psf_match_report
from pipeline.model.geometry import Box
from pipeline.psf import GaussianPsf
from pipeline.psf_match import solve_kernel_model


def test_report_plot_quotes_the_report_numbers(tmp_path):
    # width rising along x: the residual and noise gain vary over the cells
    sci = GaussianPsf(2.0, gradient=(0.0047, 0.0), center=(127.5, 127.5))
    km, _ = solve_kernel_model(sci, GaussianPsf(3.5), Box(0, 0, 256, 256))
    rep = km.report
    path = tmp_path / "report.png"
    got = plot_psf_match_report(rep, path, title="sigma 1.4-2.6 to 3.5")
    res = rep["residual_max"].values
    i = int(np.argmax(res))
    assert got["worst_residual"] == pytest.approx(res.max(), rel=1e-12)
    assert got["worst_cell"] == (pytest.approx(float(rep["cell_x"][i])), pytest.approx(float(rep["cell_y"][i])))
    assert got["max_noise_gain"] == pytest.approx(float(rep["kernel_sum_sq"].max()), rel=1e-12)
    dfwhm = rep["achieved_fwhm"].values - rep["target_fwhm"].values
    assert got["max_fwhm_error"] == pytest.approx(np.abs(dfwhm).max(), rel=1e-12)
    # the uniform default keeps every cell within 2x of the centre cell
    assert got["worst_residual"] <= 2.0 * got["centre_residual"]
    img = mpimg.imread(path)
    assert img.shape[:2] == (450, 1300) and img[..., :3].std() > 0.05  # 13 x 4.5 in at 100 dpi, not blank


def test_report_plot_refuses_other_datasets(tmp_path):
    km, _ = solve_kernel_model(GaussianPsf(1.5), GaussianPsf(2.5), Box(0, 0, 128, 128))
    with pytest.raises(ValueError, match="not a PSF-matching report: missing kernel_sum_sq"):
        plot_psf_match_report(km.report.drop_vars("kernel_sum_sq"), tmp_path / "x.png")
