"""MatchBackgrounds (legacy): matched backgrounds, reference choice, per-visit failures, laziness."""

from __future__ import annotations

import dask
import numpy as np
import pydantic
import pytest
import xarray as xr

from pipeline.errors import MaskPlaneError, SchemaError
from pipeline.match_backgrounds import (
    NO_OVERLAP,
    OK,
    REFERENCE,
    UNDERSAMPLED,
    MatchBackgroundsConfig,
    match_backgrounds,
    plot_match_diagnostics,
    select_reference,
)
from pipeline.model.masks import MaskPlane, bitmask
from pipeline.model.schema import make_dataset
from pipeline.testing import assert_lazy, graph_size, raise_if_dask_computes
from tests.conftest import make_tan_wcs

H, W = 256, 320
SIGMAS = (1.0, 1.3, 0.8, 1.1)
SPLINE = MatchBackgroundsConfig(bin_size=32)
POLY = MatchBackgroundsConfig(bin_size=32, use_polynomial=True, order=3)


def _backgrounds(h=H, w=W):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / w, y / h
    return [
        100.0 + 0.0 * u,
        103.0 + 2.0 * u - 1.0 * v,  # plane
        98.0 + 3.0 * u * v + 2.0 * v**2,  # smooth 2-D polynomial
        101.0 - 2.0 * u**2 + v + 0.5 * u**3,
    ]


def _sources(h=H, w=W):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for xs, ys, amp in ((40, 50, 300.0), (200, 120, 80.0), (290, 220, 150.0), (120, 200, 40.0)):
        img += amp * np.exp(-((x - xs) ** 2 + (y - ys) ** 2) / (2 * 2.5**2))
    return img


def _warps(seed=0, x0=1000, y0=2000, visits=(11, 12, 13, 14), no_data=None):
    rng = np.random.default_rng(seed)
    src = _sources()
    det = np.where(src > 0.5, np.uint32(MaskPlane.DETECTED), np.uint32(0))
    out = []
    for k, (bg, sig) in enumerate(zip(_backgrounds(), SIGMAS)):
        img = bg + src + rng.normal(0.0, sig, (H, W))
        mask = det.copy()
        if no_data is not None and no_data[k] is not None:
            sl = no_data[k]
            img[sl] = np.nan
            mask[sl] |= np.uint32(MaskPlane.NO_DATA)
        out.append(make_dataset(img, np.full((H, W), sig * sig), mask, wcs=make_tan_wcs(), kind="warp", x0=x0,
                                y0=y0, attrs={"visit": visits[k], "tract": 9, "patch": 4}))
    return out


def _hand_reference(warps, config):
    bad = bitmask(config.bad_mask_planes)
    var, lvl, npt = [], [], []
    for w in warps:
        img = w["image"].values.astype(np.float64)
        good = ((w["mask"].values & bad) == 0) & np.isfinite(img)
        var.append(img[good].var(ddof=1))
        lvl.append(img[good].mean())
        npt.append(good.sum())
    var, lvl, npt = map(np.array, (var, lvl, npt))
    cost = (config.best_ref_weight_variance * var / var.max() + config.best_ref_weight_level * lvl / lvl.max()
            + config.best_ref_weight_coverage * npt.min() / npt)
    return int(np.argmin(cost)), cost


@pytest.mark.parametrize("config", [SPLINE, POLY], ids=["spline", "polynomial"])
def test_backgrounds_matched_to_reference(config):
    warps = _warps()
    result = match_backgrounds(warps, config=config)
    ref = int(result.reference_index.compute())
    diag = result.diagnostics.compute()
    bgs = _backgrounds()
    for k in range(len(warps)):
        matched = result.warps[k]["image"].values.astype(np.float64)
        model = matched - warps[k]["image"].values.astype(np.float64)
        np.testing.assert_allclose(model, result.models[k].values, atol=1e-4, equal_nan=True)
        rms = np.sqrt(np.mean((bgs[k] + model - bgs[ref]) ** 2))
        assert rms < 0.1 * min(SIGMAS), (k, rms)
        if k == ref:
            assert bool(diag.isReference[k]) and int(diag.status[k]) == REFERENCE and diag.fitRMS[k] == 0.0
            np.testing.assert_array_equal(result.warps[k]["image"].values, warps[k]["image"].values)
            assert np.isnan(diag.matchedMSE[k]) and np.isnan(diag.diffImVar[k])
        else:
            assert not bool(diag.isReference[k]) and int(diag.status[k]) == OK and diag.failure[k] == ""
            # the reference's own success criterion; the variance planes are constant here
            expected_var = SIGMAS[k] ** 2 + SIGMAS[ref] ** 2
            np.testing.assert_allclose(diag.diffImVar[k], expected_var, rtol=1e-6)
            assert diag.matchedMSE[k] < 1.01 * diag.diffImVar[k]
            np.testing.assert_allclose(diag.matchedMSE[k], expected_var, rtol=0.03)
            assert 0.0 <= diag.fitRMS[k] < 0.05
        assert result.warps[k]["variance"].equals(warps[k]["variance"])
        np.testing.assert_array_equal(result.warps[k]["mask"].values, warps[k]["mask"].values)
    assert list(diag.visit.values) == [11, 12, 13, 14]


def test_reference_is_the_cost_function_choice():
    # coverage and level differ: warp 2 loses a third of its pixels, warp 0 has the lowest level
    warps = _warps(no_data=[None, None, (slice(None), slice(0, 110)), None])
    index, cost = select_reference(warps, config=SPLINE)
    hand, hand_cost = _hand_reference(warps, SPLINE)
    assert int(index.compute()) == hand
    np.testing.assert_allclose(cost.compute(), hand_cost, rtol=1e-9)
    # other weights, other choices: the level term alone picks the lowest mean level, which is
    # warp 2 once the NO_DATA columns are left out
    for wv, wl, wc in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.1, 0.7, 0.2)):
        cfg = MatchBackgroundsConfig(best_ref_weight_variance=wv, best_ref_weight_level=wl,
                                     best_ref_weight_coverage=wc)
        hand_w, _ = _hand_reference(warps, cfg)
        assert int(select_reference(warps, config=cfg)[0].compute()) == hand_w
    assert _hand_reference(warps, MatchBackgroundsConfig(best_ref_weight_variance=0.0, best_ref_weight_level=1.0,
                                                         best_ref_weight_coverage=0.0))[0] == 2
    result = match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=32, best_ref_weight_coverage=0.0,
                                                                    best_ref_weight_level=1.0,
                                                                    best_ref_weight_variance=0.0))
    assert list(result.diagnostics.isReference.values) == [False, False, True, False]


def test_given_reference_and_duplicates():
    warps = _warps(visits=(11, 12, 11, 14))
    result = match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=32, ref_visit=11))
    diag = result.diagnostics.compute()
    assert list(diag.isReference.values) == [True, False, True, False]
    assert int(result.reference_index.compute()) == 0
    for k in (0, 2):  # every copy of the reference visit is left alone
        np.testing.assert_array_equal(result.warps[k]["image"].values, warps[k]["image"].values)
    bgs = _backgrounds()
    model = result.models[1].values
    assert np.sqrt(np.mean((bgs[1] + model - bgs[0]) ** 2)) < 0.1


def test_stack_input_gives_stack_output():
    warps = _warps()
    stack = xr.concat([w.assign_coords(visit=w.attrs["visit"]) for w in warps], dim="visit")
    stack.attrs = {k: v for k, v in warps[0].attrs.items() if k != "visit"}
    result = match_backgrounds(stack, config=SPLINE)
    listed = match_backgrounds(warps, config=SPLINE)
    assert isinstance(result.warps, xr.Dataset) and list(result.warps.visit.values) == [11, 12, 13, 14]
    np.testing.assert_array_equal(result.warps["image"].values,
                                  np.stack([w["image"].values for w in listed.warps]))
    assert result.visits == [11, 12, 13, 14]


def test_per_visit_failures_are_reported():
    # visit 13 has no data at all, visit 14 only covers the left 96 columns
    warps = _warps(no_data=[None, None, (slice(None), slice(None)), (slice(None), slice(96, None))])
    cfg = MatchBackgroundsConfig(bin_size=64, use_polynomial=True, order=3, ref_visit=11,
                                 undersample_style="THROW_EXCEPTION")
    result = match_backgrounds(warps, config=cfg)
    diag = result.diagnostics.compute()
    assert list(diag.status.values) == [REFERENCE, OK, NO_OVERLAP, UNDERSAMPLED]
    assert diag.failure[2] == "No overlap with reference. Nothing to match"
    assert diag.failure[3] == "Image does not cover enough of ref image for order and binsize"
    for k in (2, 3):  # failed visits are returned unchanged, with NaN diagnostics
        np.testing.assert_array_equal(result.warps[k]["image"].values, warps[k]["image"].values)
        assert np.isnan(diag.fitRMS[k]) and np.isnan(diag.matchedMSE[k]) and np.isnan(diag.diffImVar[k])
    # with REDUCE_INTERP_ORDER the partial warp is fitted with order min(2 columns of cells) - 1 = 1
    result = match_backgrounds(warps, config=cfg.model_copy(update={"undersample_style": "REDUCE_INTERP_ORDER"}))
    diag = result.diagnostics.compute()
    assert list(diag.status.values) == [REFERENCE, OK, NO_OVERLAP, OK]
    plan = dask.compute(result.plans[3])[0]
    assert plan["order"] == 1 and plan["weighting"] is True
    # spline mode: no usable cell is also "no overlap" (the reference would add a NaN model)
    result = match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=32, ref_visit=11))
    assert int(result.diagnostics.status[2]) == NO_OVERLAP


def test_eager_errors():
    warps = _warps()
    with pytest.raises(ValueError, match="no exposures to match"):
        match_backgrounds([], config=SPLINE)
    small = warps[1].isel(x=slice(0, 300))
    with pytest.raises(SchemaError, match=r"Exposures are different dimensions: visit 12 .*\(300, 256\) but visit 11 "
                                          r".*\(320, 256\).*\[visit=12 tract=9 patch=4\]"):
        match_backgrounds([warps[0], small], config=SPLINE)
    with pytest.raises(ValueError, match="300 = config.bin_size > shorter dimension = 256"):
        match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=300, use_polynomial=True, order=1))
    with pytest.raises(ValueError, match="8 = config.order > npoints - 1 = 3"):
        match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=64, use_polynomial=True))
    with pytest.raises(ValueError, match=r"ref_visit 99 is not among the visits \[11, 12, 13, 14\]"):
        match_backgrounds(warps, config=MatchBackgroundsConfig(bin_size=32, ref_visit=99))
    with pytest.raises(ValueError, match=r"too few cells \(2x1\) for AKIMA_SPLINE"):
        match_backgrounds(warps, config=MatchBackgroundsConfig(undersample_style="THROW_EXCEPTION"))
    other = warps[1].copy()
    other["mask"] = other["mask"].copy()
    other["mask"].attrs = {"flag_masks": [1, 2], "flag_meanings": "BAD SAT"}
    with pytest.raises(MaskPlaneError, match="mask planes of visit 12 differ from those of visit 11"):
        match_backgrounds([warps[0], other], config=SPLINE)
    with pytest.raises(SchemaError, match="needs a 'visit' dimension"):
        match_backgrounds(warps[0], config=SPLINE)
    with pytest.raises(SchemaError, match="every warp must be an xarray.Dataset, got int"):
        match_backgrounds([warps[0], 3], config=SPLINE)
    with pytest.raises(pydantic.ValidationError, match="INCREASE_NXNYSAMPLE|undersample_style"):
        MatchBackgroundsConfig(undersample_style="INCREASE_NXNYSAMPLE")
    with pytest.raises(pydantic.ValidationError, match="interp_style NONE cannot model the difference"):
        MatchBackgroundsConfig(interp_style="NONE")


@pytest.mark.parametrize("config", [SPLINE, POLY], ids=["spline", "polynomial"])
def test_numpy_dask_equal_and_lazy(config):
    warps = _warps()
    before = [w.copy(deep=True) for w in warps]
    eager = match_backgrounds(warps, config=config)
    chunked = [w.chunk({"y": 100, "x": 130}) for w in warps]  # 3 x 3 chunks that do not divide the image
    lazy = assert_lazy(lambda: match_backgrounds(chunked, config=config))
    with raise_if_dask_computes():
        for w in lazy.warps:
            assert dask.is_dask_collection(w["image"].data)
    for a, b in zip(eager.warps, lazy.warps):
        np.testing.assert_allclose(a["image"].values, b["image"].values, rtol=1e-6, atol=1e-5)
    de, dl = dask.compute(eager.diagnostics, lazy.diagnostics)
    for key in ("fitRMS", "matchedMSE", "diffImVar"):
        np.testing.assert_allclose(de[key].values, dl[key].values, rtol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(de.status.values, dl.status.values)
    for w, b in zip(warps, before):
        np.testing.assert_array_equal(w["image"].values, b["image"].values)


def test_graph_size_bounded():
    warps = [w.chunk({"y": 64, "x": 80}) for w in _warps()]  # 4 x 4 chunks per warp
    sizes = []
    for n in (2, 4):
        result = match_backgrounds(warps[:n], config=SPLINE)
        g = dask.base.collections_to_expr([w["image"].data for w in result.warps] + [result.diagnostics])
        sizes.append(len(g.__dask_graph__()))
    # linear in the number of warps (each output block reads one block per warp for the lazy
    # reference pick, so tasks grow with n while their inputs grow with n too)
    assert sizes[1] < 2.6 * sizes[0]
    assert graph_size(result.warps[0]["image"].data) < 400 * 16


def test_plot_writes_png(tmp_path):
    warps = _warps()
    result = match_backgrounds(warps, config=POLY)
    ref_visit = result.visits[int(result.reference_index.compute())]
    other = next(v for v in result.visits if v != ref_visit)
    path = tmp_path / "match.png"
    plot_match_diagnostics(result, other, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    plot_match_diagnostics(result, ref_visit, tmp_path / "ref.png")  # no grid: still a picture
    assert (tmp_path / "ref.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="visit 77 is not among the matched visits"):
        plot_match_diagnostics(result, 77, tmp_path / "x.png")
